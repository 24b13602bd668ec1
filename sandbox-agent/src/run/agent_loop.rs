//! The agent: the git catch-up when it starts ([`Agent::catch_up`]) and the loop of one prompt
//! ([`run_prompt`]): call the model, stream its text, run the tools it asks for through the hooks, feed
//! the results back, until it ends its turn; then commit what changed as the person who asked, push the
//! session branch, and report.
//!
//! A prompt emits `prompt_started` first and `prompt_finished` last; in between, per model call, `token`s,
//! a `message` and a `usage`, and per tool call `tool_call`, streamed `tool_output`, `tool_result` and
//! `file_changed`. A prompt that changed files ends with `push{branch, commit}` before `prompt_finished`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nightshift_protocol::{Event, PromptStatus};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conversation::Conversation;
use super::gate::{SyncGate, SyncGateSetter, SyncState};
use super::git::{self, Git, Identity};
use super::hook::{self, AfterDecision, BeforeDecision, HookContext, Hooks, PromptDecision};
use super::provider::{
    self, ContentBlock, ModelError, ModelRequest, Providers, StopReason, StreamItem, TokenUsage,
    ToolResultBlock,
};
use super::queue::PromptRequest;
use super::tools::{self, ToolContext, ToolLimits};
use super::workspace::Workspace;

/// Most model calls in one prompt.
pub const MAX_MODEL_CALLS: usize = 50;
/// Model used when a prompt names none.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// `max_tokens` of every model call; also reserved in the context window for the reply.
pub const MAX_OUTPUT_TOKENS: u32 = 8192;
/// Models whose id starts with this are the scripted demo model.
const SCRIPTED_MODEL_PREFIX: &str = "nightshift-scripted";
/// Shown once per prompt answered by the scripted model.
const SCRIPTED_MODEL_NOTICE: &str =
    "Demo model: these responses are scripted, not from a real language model. \
     Set ANTHROPIC_API_KEY (or OPENAI_API_KEY / OPENAI_BASE_URL) to use a real model.";
/// What the model is told about a turn a participant stopped.
const STOPPED_NOTE: &str = "stopped by a participant";

/// Why a prompt did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The model call failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model kept calling tools.
    #[error("gave up after {limit} model calls without the model finishing its turn")]
    TooManyCalls {
        /// The limit.
        limit: usize,
    },
    /// A `prompt.before` hook refused the prompt.
    #[error("prompt blocked by {by}: {reason}")]
    PromptBlocked {
        /// The hook or policy.
        by: String,
        /// Its reason.
        reason: String,
    },
    /// A participant stopped the prompt.
    #[error("stopped")]
    Stopped,
    /// The link is gone, so nothing we produce can be delivered.
    #[error("event channel closed")]
    EventsClosed,
}

/// How the agent is set up for its session.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    /// The session; names the branch. Without it the agent neither syncs nor commits.
    pub session_id: Option<String>,
    /// The branch to start from; default the one checked out.
    pub base_branch: Option<String>,
    /// Use at most this much of the model's context window (tokens); default the model's own.
    pub context_window_tokens: Option<u64>,
    /// Tool limits.
    pub limits: ToolLimits,
    /// How the sub-session tools reach the session (through the link); `None` without one.
    pub session_calls: Option<tools::session_tools::SessionCalls>,
}

/// Loose git objects a workspace may have before they are packed ahead of a snapshot.
const LOOSE_OBJECTS_PACKED_ABOVE: u64 = 64;

/// Everything the prompts of a session share.
pub struct Agent {
    /// The model providers.
    pub providers: Providers,
    /// Where the tools work.
    pub workspace: Workspace,
    /// The workspace as a git working copy; `None` when it is not one.
    pub git: Option<Git>,
    /// Open once the catch-up is done.
    pub gate: SyncGate,
    /// How the agent is set up.
    pub config: AgentConfig,
    /// System prompt, generated with the tool list.
    pub system: String,
    /// Tool definitions sent with every call.
    pub tool_definitions: Vec<Value>,
    /// The conversation, kept across prompts; locked by the running prompt.
    pub conversation: tokio::sync::Mutex<Conversation>,
    hooks: RwLock<Arc<HookSet>>,
}

/// The hooks in force, or why there are none we can trust.
#[derive(Debug)]
enum HookSet {
    Loaded(Hooks),
    /// `.nightshift/hooks.toml` exists but cannot be used: every tool call is blocked (fail closed).
    Invalid {
        hooks: Hooks,
        error: String,
    },
}

impl HookSet {
    fn load(root: &std::path::Path) -> HookSet {
        match Hooks::load(root) {
            Ok(hooks) => HookSet::Loaded(hooks),
            Err(error) => HookSet::Invalid {
                hooks: Hooks::none(),
                error: error.to_string(),
            },
        }
    }

    fn hooks(&self) -> &Hooks {
        match self {
            HookSet::Loaded(hooks) | HookSet::Invalid { hooks, .. } => hooks,
        }
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("workspace", &self.workspace)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent with the built-in tools; `gate` opens when [`Agent::catch_up`] is done.
    pub fn new(
        providers: Providers,
        workspace: Workspace,
        git: Option<Git>,
        gate: SyncGate,
        config: AgentConfig,
    ) -> Self {
        let hooks = HookSet::load(workspace.root());
        Self {
            providers,
            git,
            gate,
            config,
            system: tools::system_prompt(),
            tool_definitions: tools::api_definitions(),
            conversation: tokio::sync::Mutex::new(Conversation::default()),
            hooks: RwLock::new(Arc::new(hooks)),
            workspace,
        }
    }

    fn hook_set(&self) -> Arc<HookSet> {
        match self.hooks.read() {
            Ok(hooks) => Arc::clone(&hooks),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn reload_hooks(&self) -> Arc<HookSet> {
        let fresh = Arc::new(HookSet::load(self.workspace.root()));
        match self.hooks.write() {
            Ok(mut hooks) => *hooks = Arc::clone(&fresh),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&fresh),
        }
        fresh
    }

    /// The session branch, when the agent knows its session.
    pub fn branch(&self) -> Option<String> {
        let id = self.config.session_id.as_deref()?;
        git::session_branch(id).ok()
    }

    /// The git catch-up, run in the background when the agent starts: fetch and reset the base branch,
    /// create the session branch, then open the gate (or mark it failed) and load the hooks of the
    /// caught-up tree. Reads work meanwhile; writes and `bash` wait for the gate.
    pub async fn catch_up(&self, setter: SyncGateSetter, events: &mpsc::Sender<Event>) {
        let emitter = Emitter { events };
        let (Some(git), Some(branch)) = (&self.git, self.branch()) else {
            tracing::info!("no git working copy or no session id: nothing to catch up");
            setter.set(SyncState::Done);
            self.report_hooks(&emitter, &self.reload_hooks()).await;
            return;
        };
        let started = Instant::now();
        let _ = emitter
            .emit(Event::GitSync {
                state: "started".to_owned(),
                commit: None,
            })
            .await;
        match git.sync(self.config.base_branch.as_deref(), &branch).await {
            Ok(outcome) => {
                tracing::info!(
                    branch = %outcome.session_branch,
                    base = %outcome.base_branch,
                    commit = %outcome.commit,
                    resumed = outcome.resumed,
                    elapsed_ms = started.elapsed().as_millis(),
                    "git catch-up done"
                );
                let hooks = self.reload_hooks();
                setter.set(SyncState::Done);
                let _ = emitter
                    .emit(Event::GitSync {
                        state: "done".to_owned(),
                        commit: Some(outcome.commit),
                    })
                    .await;
                self.report_hooks(&emitter, &hooks).await;
            }
            Err(error) => {
                tracing::warn!(%error, "git catch-up failed");
                setter.set(SyncState::Failed(error.to_string()));
                let _ = emitter
                    .emit(Event::GitSync {
                        state: "failed".to_owned(),
                        commit: None,
                    })
                    .await;
                let _ = emitter
                    .notice(
                        "error",
                        format!("Git catch-up failed; the workspace stays read-only: {error}"),
                    )
                    .await;
            }
        }
    }

    async fn report_hooks(&self, emitter: &Emitter<'_>, hooks: &HookSet) {
        if let HookSet::Invalid { error, .. } = hooks {
            let _ = emitter
                .notice(
                    "error",
                    format!(".nightshift/hooks.toml cannot be used, so every tool call is blocked until it is fixed: {error}"),
                )
                .await;
        }
    }

    /// Before a snapshot: pack the loose git objects of the prompt's commit when there are many (see
    /// [`Git::pack_loose_objects`]); a failure is a log line.
    pub async fn tidy_for_snapshot(&self) {
        let Some(git) = &self.git else { return };
        let started = std::time::Instant::now();
        match git.pack_loose_objects(LOOSE_OBJECTS_PACKED_ABOVE).await {
            Ok(true) => tracing::info!(
                pack_ms = started.elapsed().as_millis() as u64,
                "packed the loose git objects"
            ),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "could not pack the loose git objects"),
        }
    }

    /// Run the `session.idle` hooks (the queue is empty); failures become notices.
    pub async fn on_idle(&self, events: &mpsc::Sender<Event>) {
        let hooks = self.hook_set();
        let context = HookContext {
            session_id: self.config.session_id.clone().unwrap_or_default(),
            prompt_id: None,
            author_login: None,
        };
        let emitter = Emitter { events };
        for failure in hooks.hooks().session_idle(&context).await {
            let _ = emitter
                .notice(
                    "warn",
                    format!(
                        "session.idle hook {} failed: {}",
                        failure.by, failure.reason
                    ),
                )
                .await;
        }
    }
}

struct Emitter<'a> {
    events: &'a mpsc::Sender<Event>,
}

impl Emitter<'_> {
    async fn emit(&self, event: Event) -> Result<(), LoopError> {
        self.events
            .send(event)
            .await
            .map_err(|_| LoopError::EventsClosed)
    }

    async fn notice(&self, level: &str, text: String) -> Result<(), LoopError> {
        self.emit(Event::Notice {
            level: level.to_owned(),
            text,
        })
        .await
    }
}

/// Work on one prompt from `prompt_started` to `prompt_finished`.
pub async fn run_prompt(
    agent: &Agent,
    request: &PromptRequest,
    events: &mpsc::Sender<Event>,
    cancel: &CancellationToken,
) {
    let emitter = Emitter { events };
    let prompt_id = request.prompt_id.clone();
    if emitter
        .emit(Event::PromptStarted {
            prompt_id: prompt_id.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let mut conversation = agent.conversation.lock().await;
    let mut usage = TokenUsage::default();
    let outcome = converse(
        agent,
        request,
        &emitter,
        cancel,
        &mut conversation,
        &mut usage,
    )
    .await;
    tracing::info!(
        %prompt_id,
        input_tokens = usage.input_tokens,
        output_tokens = usage.output_tokens,
        cache_read_tokens = usage.cache_read_tokens,
        cache_write_tokens = usage.cache_write_tokens,
        conversation_tokens = conversation.tokens(),
        "prompt usage"
    );
    let (status, error) = match outcome {
        Ok(()) => (PromptStatus::Completed, None),
        // A stop wins over whatever it interrupted: a model call that saw the cancellation before the
        // loop did reports `Cancelled`, and anything failing once the turn is cancelled fails because of it.
        Err(error)
            if matches!(error, LoopError::Stopped)
                || (cancel.is_cancelled() && !matches!(error, LoopError::EventsClosed)) =>
        {
            conversation.close_turn(STOPPED_NOTE);
            (PromptStatus::Stopped, None)
        }
        Err(LoopError::EventsClosed) => return,
        Err(error) => {
            tracing::warn!(%prompt_id, %error, "prompt failed");
            conversation.close_turn(&format!("this turn failed: {error}"));
            (PromptStatus::Failed, Some(error.to_string()))
        }
    };
    drop(conversation);
    if commit_and_push(agent, request, status, &emitter)
        .await
        .is_err()
    {
        return;
    }
    let _ = emitter
        .emit(Event::PromptFinished {
            prompt_id,
            status,
            error,
        })
        .await;
}

/// The hook context of a prompt.
fn hook_context(agent: &Agent, request: &PromptRequest) -> HookContext {
    HookContext {
        session_id: agent.config.session_id.clone().unwrap_or_default(),
        prompt_id: Some(request.prompt_id.clone()),
        author_login: Some(request.author.login.clone()).filter(|l| !l.is_empty()),
    }
}

async fn converse(
    agent: &Agent,
    request: &PromptRequest,
    emitter: &Emitter<'_>,
    cancel: &CancellationToken,
    conversation: &mut Conversation,
    prompt_usage: &mut TokenUsage,
) -> Result<(), LoopError> {
    let prompt_id = &request.prompt_id;
    let model = if request.model.trim().is_empty() {
        DEFAULT_MODEL
    } else {
        request.model.as_str()
    };
    let hooks = agent.hook_set();
    let context = hook_context(agent, request);
    let decision = tokio::select! {
        () = cancel.cancelled() => return Err(LoopError::Stopped),
        decision = hooks.hooks().prompt_before(&context, &request.text) => decision,
    };
    let text = match decision {
        PromptDecision::Allow => request.text.clone(),
        PromptDecision::Rewrite { by, text } => {
            emitter
                .notice(
                    "info",
                    format!("The prompt was rewritten by {by} before the model saw it."),
                )
                .await?;
            text
        }
        PromptDecision::Block { by, reason } => {
            emitter
                .notice("warn", format!("The prompt was blocked by {by}: {reason}"))
                .await?;
            return Err(LoopError::PromptBlocked { by, reason });
        }
    };
    conversation.push_user(&text);
    let window_tokens = agent
        .config
        .context_window_tokens
        .unwrap_or_else(|| provider::model_info(model).context_window_tokens);
    let reserve_tokens =
        u64::from(MAX_OUTPUT_TOKENS) + u64::try_from(agent.system.len() / 3).unwrap_or(0);
    let mut notice_sent = false;

    for _ in 0..MAX_MODEL_CALLS {
        if let Some(compaction) = conversation.compact_if_needed(window_tokens, reserve_tokens) {
            emitter
                .notice(
                    "info",
                    format!(
                        "Context compacted: {} older tool outputs ({} KB) were replaced by a note, \
                         ~{}k → ~{}k of a {}k-token window.",
                        compaction.outputs,
                        compaction.bytes_removed / 1024,
                        compaction.tokens_before / 1000,
                        compaction.tokens_after / 1000,
                        window_tokens / 1000
                    ),
                )
                .await?;
        }
        let call = ModelRequest {
            model,
            system: &agent.system,
            messages: conversation.messages(),
            tools: &agent.tool_definitions,
            max_tokens: MAX_OUTPUT_TOKENS,
        };
        let mut stream = tokio::select! {
            () = cancel.cancelled() => return Err(LoopError::Stopped),
            stream = agent.providers.stream(call, cancel) => stream?,
        };
        let response = loop {
            let item = tokio::select! {
                () = cancel.cancelled() => return Err(LoopError::Stopped),
                item = stream.next() => item,
            };
            match item {
                None => {
                    return Err(ModelError::Truncated {
                        expected: "the finished message",
                    }
                    .into())
                }
                Some(Err(ModelError::Cancelled)) => return Err(LoopError::Stopped),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(StreamItem::Started { model })) => {
                    if model.starts_with(SCRIPTED_MODEL_PREFIX) && !notice_sent {
                        notice_sent = true;
                        emitter
                            .notice("warn", SCRIPTED_MODEL_NOTICE.to_owned())
                            .await?;
                    }
                }
                Some(Ok(StreamItem::TextDelta(text))) => {
                    emitter
                        .emit(Event::Token {
                            prompt_id: prompt_id.clone(),
                            text,
                        })
                        .await?;
                }
                Some(Ok(StreamItem::ThinkingDelta(_))) => {}
                Some(Ok(StreamItem::Finished(response))) => break response,
            }
        };
        drop(stream);
        let usage = response.usage;
        prompt_usage.add(&usage);
        conversation.record_input_tokens(
            usage
                .input_tokens
                .saturating_add(usage.cache_read_tokens)
                .saturating_add(usage.cache_write_tokens),
        );
        let priced_model = if response.model.is_empty() {
            model
        } else {
            response.model.as_str()
        };

        let text = response.text();
        if !text.is_empty() {
            emitter
                .emit(Event::Message {
                    prompt_id: prompt_id.clone(),
                    role: "assistant".to_owned(),
                    text,
                })
                .await?;
        }
        emitter
            .emit(Event::Usage {
                prompt_id: Some(prompt_id.clone()),
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cache_read_tokens: usage.cache_read_tokens,
                cache_write_tokens: usage.cache_write_tokens,
                cost_usd: provider::cost_usd(priced_model, &usage),
                total_cost_usd: None,
            })
            .await?;
        let tool_uses: Vec<(String, String, Value)> = response
            .tool_uses()
            .map(|(id, name, input)| (id.to_owned(), name.to_owned(), input.clone()))
            .collect();
        let stop_reason = response.stop_reason.clone();
        conversation.push_assistant(response.content);
        match stop_reason {
            StopReason::ToolUse if !tool_uses.is_empty() => {}
            StopReason::PauseTurn => continue,
            StopReason::Refusal => {
                emitter
                    .notice(
                        "warn",
                        "The model declined to continue this request.".to_owned(),
                    )
                    .await?;
                return Ok(());
            }
            StopReason::MaxTokens if tool_uses.is_empty() => {
                emitter
                    .notice(
                        "warn",
                        format!("The model's reply hit its output limit ({MAX_OUTPUT_TOKENS} tokens) and was cut short."),
                    )
                    .await?;
                return Ok(());
            }
            other => {
                if tool_uses.is_empty() {
                    tracing::info!(stop_reason = ?other, "model ended its turn");
                    return Ok(());
                }
                tracing::warn!(stop_reason = ?other, "model asked for tools without stop_reason tool_use; running them");
            }
        }

        let mut results = Vec::with_capacity(tool_uses.len());
        for (call_id, name, input) in tool_uses {
            if cancel.is_cancelled() {
                break;
            }
            let result = call_tool(agent, request, emitter, cancel, &call_id, &name, input).await?;
            results.push(result);
        }
        if cancel.is_cancelled() {
            // Keep what finished; `close_turn` answers the rest.
            let answered = results.len();
            let missing: Vec<ToolResultBlock> = match conversation.messages().last() {
                Some(provider::Message::Assistant { content }) => content
                    .iter()
                    .filter_map(|block| match block {
                        ContentBlock::ToolUse { id, .. } => Some(ToolResultBlock {
                            call_id: id.clone(),
                            content: STOPPED_NOTE.to_owned(),
                            is_error: true,
                        }),
                        _ => None,
                    })
                    .skip(answered)
                    .collect(),
                _ => Vec::new(),
            };
            results.extend(missing);
            conversation.push_tool_results(results);
            return Err(LoopError::Stopped);
        }
        conversation.push_tool_results(results);
    }
    Err(LoopError::TooManyCalls {
        limit: MAX_MODEL_CALLS,
    })
}

/// One tool call: `tool.before` hooks, the tool (its output streamed), `tool.after` hooks, events.
async fn call_tool(
    agent: &Agent,
    request: &PromptRequest,
    emitter: &Emitter<'_>,
    cancel: &CancellationToken,
    call_id: &str,
    name: &str,
    input: Value,
) -> Result<ToolResultBlock, LoopError> {
    emitter
        .emit(Event::ToolCall {
            prompt_id: request.prompt_id.clone(),
            call_id: call_id.to_owned(),
            tool: name.to_owned(),
            input: input.clone(),
        })
        .await?;
    let started = Instant::now();
    let hooks = agent.hook_set();
    let context = hook_context(agent, request);
    let decision = match hooks.as_ref() {
        HookSet::Invalid { error, .. } => BeforeDecision::Block {
            by: ".nightshift/hooks.toml".to_owned(),
            reason: format!(
                "the hook configuration is invalid ({error}); tools stay blocked until it is fixed"
            ),
        },
        HookSet::Loaded(hooks) => tokio::select! {
            () = cancel.cancelled() => return Err(LoopError::Stopped),
            decision = hooks.tool_before(&context, name, &input) => decision,
        },
    };
    let input = match decision {
        BeforeDecision::Allow => input,
        BeforeDecision::Rewrite { by, input } => {
            emitter
                .notice(
                    "info",
                    format!("{by} rewrote the arguments of `{name}`: {input}"),
                )
                .await?;
            input
        }
        BeforeDecision::Block { by, reason } => {
            let output = format!("blocked by {by}: {reason}");
            emitter
                .notice(
                    "warn",
                    format!("A `{name}` call was blocked by {by}: {reason}"),
                )
                .await?;
            return finish_tool(emitter, call_id, false, output, started).await;
        }
    };

    let (output_tx, mut output_rx) = mpsc::unbounded_channel::<String>();
    let forwarder = tokio::spawn({
        let events = emitter.events.clone();
        let call_id = call_id.to_owned();
        async move {
            while let Some(text) = output_rx.recv().await {
                let event = Event::ToolOutput {
                    call_id: call_id.clone(),
                    text,
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    let context_for_tool = ToolContext {
        workspace: agent.workspace.clone(),
        gate: agent.gate.clone(),
        read_only_paths: hooks.hooks().policy().read_only_paths.clone().into(),
        cancel: cancel.clone(),
        output: Some(output_tx),
        limits: agent.config.limits,
        session: agent.config.session_calls.clone(),
    };
    let outcome = tools::execute(&context_for_tool, name, input.clone()).await;
    drop(context_for_tool);
    // Every streamed piece is sent before the result.
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    let (mut ok, mut output, mut changes) = match outcome {
        Ok(output) => (true, output.output, output.file_changes),
        Err(error) => (false, error.to_string(), Vec::new()),
    };
    // A read-only path that did not exist cannot be mounted read-only for a command, so whatever a
    // command created under one is removed again, and the call counts as blocked.
    let policy = hooks.hooks().policy();
    let (protected, allowed): (Vec<_>, Vec<_>) = changes
        .into_iter()
        .partition(|change| policy.read_only_match(&change.path).is_some());
    changes = allowed;
    if !protected.is_empty() {
        let paths: Vec<String> = protected.iter().map(|c| c.path.clone()).collect();
        revert(agent, &paths).await;
        let reason = format!(
            "`{name}` wrote read-only paths ({}); the changes were undone",
            paths.join(", ")
        );
        emitter
            .notice(
                "warn",
                format!("Blocked by {}: {reason}", hook::READ_ONLY_PATHS_POLICY),
            )
            .await?;
        ok = false;
        output = format!(
            "{output}\n\nblocked by {}: {reason}",
            hook::READ_ONLY_PATHS_POLICY
        );
    }
    let (ok, output) = match hooks.as_ref() {
        HookSet::Loaded(hooks) if !cancel.is_cancelled() => {
            match hooks.tool_after(&context, name, &input, &output, ok).await {
                AfterDecision::Keep => (ok, output),
                AfterDecision::Rewrite { output, .. } => (ok, output),
                AfterDecision::Withhold { by, reason } => {
                    emitter
                        .notice(
                            "warn",
                            format!("The output of a `{name}` call was withheld by {by}: {reason}"),
                        )
                        .await?;
                    (false, format!("output withheld by {by}: {reason}"))
                }
            }
        }
        _ => (ok, output),
    };
    let result = finish_tool(emitter, call_id, ok, output, started).await?;
    for change in changes {
        emitter
            .emit(Event::FileChanged {
                path: change.path,
                change: change.change,
                additions: change.additions,
                deletions: change.deletions,
                diff: change.diff,
            })
            .await?;
    }
    Ok(result)
}

/// Undo changes to `paths` (workspace-relative): tracked files go back to `HEAD`, new ones are removed.
async fn revert(agent: &Agent, paths: &[String]) {
    for path in paths {
        let Ok(resolved) = agent.workspace.resolve(path) else {
            continue;
        };
        let restored = match &agent.git {
            Some(git) => git
                .run(["checkout", "--quiet", "HEAD", "--", path.as_str()], &[])
                .await
                .is_ok(),
            None => false,
        };
        if !restored {
            let removed = match tokio::fs::symlink_metadata(&resolved.absolute).await {
                Ok(meta) if meta.is_dir() => tokio::fs::remove_dir_all(&resolved.absolute).await,
                Ok(_) => tokio::fs::remove_file(&resolved.absolute).await,
                Err(error) => Err(error),
            };
            if let Err(error) = removed {
                tracing::warn!(%path, %error, "could not undo a write to a read-only path");
            }
        }
    }
}

async fn finish_tool(
    emitter: &Emitter<'_>,
    call_id: &str,
    ok: bool,
    output: String,
    started: Instant,
) -> Result<ToolResultBlock, LoopError> {
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    emitter
        .emit(Event::ToolResult {
            call_id: call_id.to_owned(),
            ok,
            output: output.clone(),
            duration_ms,
        })
        .await?;
    Ok(ToolResultBlock {
        call_id: call_id.to_owned(),
        content: output,
        is_error: !ok,
    })
}

/// After a prompt that changed files: commit as the person who asked, push, report `push`. Work of a
/// stopped or failed prompt is committed too, so nothing is lost; a git failure is a notice.
async fn commit_and_push(
    agent: &Agent,
    request: &PromptRequest,
    status: PromptStatus,
    emitter: &Emitter<'_>,
) -> Result<(), LoopError> {
    let (Some(git), Some(branch), Some(session_id)) = (
        &agent.git,
        agent.branch(),
        agent.config.session_id.as_deref(),
    ) else {
        return Ok(());
    };
    if agent.gate.state() != SyncState::Done {
        return Ok(());
    }
    let author = author_identity(&request.author);
    let mut message = git::commit_message(&request.text, &request.prompt_id, session_id);
    if status != PromptStatus::Completed {
        message = format!("WIP ({}): {message}", status_word(status));
    }
    let commit = match git
        .commit_all(&author, &Identity::nightshift(), &message)
        .await
    {
        Ok(Some(commit)) => commit,
        Ok(None) => return Ok(()),
        Err(error) => {
            return emitter
                .notice("error", format!("Could not commit the changes: {error}"))
                .await;
        }
    };
    match git.push(&branch).await {
        Ok(()) => emitter.emit(Event::Push { branch, commit }).await,
        Err(error) => {
            emitter
                .notice(
                    "error",
                    format!("Committed {commit} but could not push {branch}: {error}"),
                )
                .await
        }
    }
}

fn status_word(status: PromptStatus) -> &'static str {
    match status {
        PromptStatus::Stopped => "stopped",
        PromptStatus::Failed => "failed",
        _ => "unfinished",
    }
}

/// The git author of a prompt: the person's name and email, cleaned of what git's ident format cannot
/// hold (`<`, `>`, control characters), with fallbacks that stay valid.
fn author_identity(author: &nightshift_protocol::Author) -> Identity {
    let clean = |text: &str| -> String {
        text.chars()
            .filter(|c| !c.is_control() && *c != '<' && *c != '>')
            .collect::<String>()
            .trim()
            .to_owned()
    };
    let login = match clean(&author.login) {
        login if login.is_empty() => "unknown".to_owned(),
        login => login,
    };
    let name = match clean(&author.name) {
        name if name.is_empty() => login.clone(),
        name => name,
    };
    let email = match clean(&author.email) {
        email if email.contains('@') && !email.contains(char::is_whitespace) => email,
        _ => format!(
            "{}@users.noreply.nightshift.dev",
            login.replace(char::is_whitespace, "-")
        ),
    };
    Identity { name, email }
}

#[cfg(test)]
mod tests {
    use nightshift_protocol::Author;

    use super::*;

    fn author(login: &str, name: &str, email: &str) -> Author {
        Author {
            login: login.to_owned(),
            name: name.to_owned(),
            email: email.to_owned(),
        }
    }

    #[test]
    fn authors_become_valid_git_identities() {
        let check = |a: Author, name: &str, email: &str| {
            let id = author_identity(&a);
            assert_eq!(
                (id.name.as_str(), id.email.as_str()),
                (name, email),
                "{a:?}"
            );
        };
        check(
            author("ada", "Ada Lovelace", "ada@example.com"),
            "Ada Lovelace",
            "ada@example.com",
        );
        check(
            author("ada", "", ""),
            "ada",
            "ada@users.noreply.nightshift.dev",
        );
        check(
            author("ada", "Ada <x@evil>\n", "a@b <c>"),
            "Ada x@evil",
            "ada@users.noreply.nightshift.dev",
        );
        check(
            author("", " ", "not-an-email"),
            "unknown",
            "unknown@users.noreply.nightshift.dev",
        );
    }
}

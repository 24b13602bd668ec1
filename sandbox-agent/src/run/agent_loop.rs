//! The agent loop of one prompt: call the model, stream its text, run the tools it asks for, feed the
//! results back, until it ends its turn. Emits `prompt_started` first and `usage` + `prompt_finished` last.

use std::sync::Arc;
use std::time::Instant;

use nightshift_protocol::{Event, PromptStatus};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gate::SyncGate;
use super::model::{ContentBlock, ModelClient, ModelError, ModelRequest, StreamItem, TokenUsage};
use super::queue::PromptRequest;
use super::tools::{self, ToolContext, ToolLimits, ToolOutput};
use super::workspace::Workspace;

/// Most model calls in one prompt.
pub const MAX_MODEL_CALLS: usize = 50;
/// Model used when a prompt names none.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// Models whose id starts with this are the scripted demo model.
const SCRIPTED_MODEL_PREFIX: &str = "nightshift-scripted";
/// Shown once per prompt answered by the scripted model.
const SCRIPTED_MODEL_NOTICE: &str =
    "Demo model: these responses are scripted, not from a real language model. \
                                     Set ANTHROPIC_API_KEY to use Claude.";

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
    /// A participant stopped the prompt.
    #[error("stopped")]
    Stopped,
    /// The link is gone, so nothing we produce can be delivered.
    #[error("event channel closed")]
    EventsClosed,
}

/// What every prompt needs.
#[derive(Debug)]
pub struct Agent {
    /// The model.
    pub client: ModelClient,
    /// Where the tools work.
    pub workspace: Workspace,
    /// Whether the workspace's git sync has finished; write tools wait for it.
    pub gate: SyncGate,
    /// Workspace-relative prefixes no tool may write.
    pub read_only_paths: Arc<[String]>,
    /// Size and time limits of the tools.
    pub limits: ToolLimits,
    /// System prompt, generated with the tool list.
    pub system: String,
    /// Tool definitions sent with every call.
    pub tool_definitions: Vec<Value>,
}

impl Agent {
    /// An agent with the built-in tools, a synced workspace and `.nightshift` read-only.
    pub fn new(client: ModelClient, workspace: Workspace) -> Self {
        Self {
            client,
            workspace,
            gate: SyncGate::done(),
            read_only_paths: Arc::from([".nightshift".to_owned()]),
            limits: ToolLimits::default(),
            system: tools::system_prompt(),
            tool_definitions: tools::api_definitions(),
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
    let mut usage = TokenUsage::default();
    let outcome = converse(agent, request, &emitter, cancel, &mut usage).await;
    let (status, error) = match outcome {
        Ok(()) => (PromptStatus::Completed, None),
        Err(LoopError::Stopped) => (PromptStatus::Stopped, None),
        Err(LoopError::EventsClosed) => return,
        Err(error) => {
            tracing::warn!(%prompt_id, %error, "prompt failed");
            (PromptStatus::Failed, Some(error.to_string()))
        }
    };
    let usage = Event::Usage {
        prompt_id: Some(prompt_id.clone()),
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: None,
        total_cost_usd: None,
    };
    let _ = emitter.emit(usage).await;
    let _ = emitter
        .emit(Event::PromptFinished {
            prompt_id,
            status,
            error,
        })
        .await;
}

async fn converse(
    agent: &Agent,
    request: &PromptRequest,
    emitter: &Emitter<'_>,
    cancel: &CancellationToken,
    usage: &mut TokenUsage,
) -> Result<(), LoopError> {
    let prompt_id = &request.prompt_id;
    let model = if request.model.trim().is_empty() {
        DEFAULT_MODEL
    } else {
        request.model.as_str()
    };
    let mut messages = vec![json!({"role": "user", "content": request.text})];
    let mut notice_sent = false;

    for _ in 0..MAX_MODEL_CALLS {
        let call = ModelRequest {
            model,
            system: &agent.system,
            messages: &messages,
            tools: &agent.tool_definitions,
        };
        let mut stream = tokio::select! {
            () = cancel.cancelled() => return Err(LoopError::Stopped),
            stream = agent.client.stream(call) => stream?,
        };
        let response = loop {
            let item = tokio::select! {
                () = cancel.cancelled() => return Err(LoopError::Stopped),
                item = stream.next() => item,
            };
            match item {
                None => return Err(ModelError::Truncated.into()),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(StreamItem::Started { model })) => {
                    if model.starts_with(SCRIPTED_MODEL_PREFIX) && !notice_sent {
                        notice_sent = true;
                        let notice = Event::Notice {
                            level: "warn".to_owned(),
                            text: SCRIPTED_MODEL_NOTICE.to_owned(),
                        };
                        emitter.emit(notice).await?;
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
                Some(Ok(StreamItem::Finished(response))) => break response,
            }
        };
        usage.input_tokens += response.usage.input_tokens;
        usage.output_tokens += response.usage.output_tokens;

        let text = response.text();
        if !text.is_empty() {
            let message = Event::Message {
                prompt_id: prompt_id.clone(),
                role: "assistant".to_owned(),
                text,
            };
            emitter.emit(message).await?;
        }
        let tool_uses: Vec<(&str, &str, &Value)> = response
            .content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::ToolUse { id, name, input } => {
                    Some((id.as_str(), name.as_str(), input))
                }
                ContentBlock::Text(_) => None,
            })
            .collect();
        match response.stop_reason.as_deref() {
            Some("tool_use") if !tool_uses.is_empty() => {}
            Some("end_turn" | "stop_sequence" | "max_tokens" | "refusal") => return Ok(()),
            other => {
                if !tool_uses.is_empty() {
                    tracing::warn!(stop_reason = ?other, "model asked for tools without stop_reason tool_use; running them");
                } else {
                    tracing::info!(stop_reason = ?other, "model ended its turn");
                    return Ok(());
                }
            }
        }

        messages.push(json!({"role": "assistant", "content": response.to_api_content()}));
        let mut results = Vec::with_capacity(tool_uses.len());
        for (call_id, name, input) in tool_uses {
            emitter
                .emit(Event::ToolCall {
                    prompt_id: prompt_id.clone(),
                    call_id: call_id.to_owned(),
                    tool: name.to_owned(),
                    input: input.clone(),
                })
                .await?;
            let started = Instant::now();
            let context = ToolContext {
                workspace: agent.workspace.clone(),
                gate: agent.gate.clone(),
                read_only_paths: agent.read_only_paths.clone(),
                cancel: cancel.clone(),
                output: None,
                limits: agent.limits,
            };
            let outcome = tools::execute(&context, name, input.clone()).await;
            let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let (ok, output, file_changes) = match outcome {
                Ok(ToolOutput {
                    output,
                    file_changes,
                }) => (true, output, file_changes),
                Err(error) => (false, error.to_string(), Vec::new()),
            };
            emitter
                .emit(Event::ToolResult {
                    call_id: call_id.to_owned(),
                    ok,
                    output: output.clone(),
                    duration_ms,
                })
                .await?;
            for change in file_changes {
                emitter
                    .emit(Event::FileChanged {
                        path: change.path,
                        change: change.change,
                        additions: change.additions,
                        deletions: change.deletions,
                    })
                    .await?;
            }
            results.push(json!({"type": "tool_result", "tool_use_id": call_id, "content": output, "is_error": !ok}));
            if cancel.is_cancelled() {
                return Err(LoopError::Stopped);
            }
        }
        messages.push(json!({"role": "user", "content": results}));
    }
    Err(LoopError::TooManyCalls {
        limit: MAX_MODEL_CALLS,
    })
}

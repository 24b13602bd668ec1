//! The agent loop of one prompt: call the model, stream its text, run the tools it asks for, feed the
//! results back, until it ends its turn. Emits `prompt_started` first and `usage` + `prompt_finished` last.

use std::time::Instant;

use nightshift_protocol::{Event, PromptStatus};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::provider::{
    self, Message, ModelError, ModelRequest, Providers, StopReason, StreamItem, TokenUsage,
    ToolResultBlock,
};
use super::queue::PromptRequest;
use super::tools::{self, ToolError, ToolOutput};
use super::workspace::Workspace;

/// Most model calls in one prompt.
pub const MAX_MODEL_CALLS: usize = 50;
/// `max_tokens` of every model call.
pub const MAX_TOKENS: u32 = 8192;
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
    /// A tool's thread failed.
    #[error("tool `{tool}` crashed: {source}")]
    ToolCrashed {
        /// Tool name.
        tool: String,
        /// Cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The link is gone, so nothing we produce can be delivered.
    #[error("event channel closed")]
    EventsClosed,
}

/// What every prompt needs.
#[derive(Debug)]
pub struct Agent {
    /// The models.
    pub providers: Providers,
    /// Where the tools work.
    pub workspace: Workspace,
    /// System prompt, generated with the tool list.
    pub system: String,
    /// Tool definitions sent with every call.
    pub tool_definitions: Vec<Value>,
}

impl Agent {
    /// An agent with the built-in tools.
    pub fn new(providers: Providers, workspace: Workspace) -> Self {
        Self {
            providers,
            workspace,
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
    let model = if request.model.trim().is_empty() {
        DEFAULT_MODEL
    } else {
        request.model.as_str()
    };
    let outcome = converse(agent, request, model, &emitter, cancel, &mut usage).await;
    let (status, error) = match outcome {
        Ok(()) => (PromptStatus::Completed, None),
        Err(LoopError::Stopped | LoopError::Model(ModelError::Cancelled)) => {
            (PromptStatus::Stopped, None)
        }
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
        cost_usd: provider::cost_usd(model, &usage),
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
    model: &str,
    emitter: &Emitter<'_>,
    cancel: &CancellationToken,
    usage: &mut TokenUsage,
) -> Result<(), LoopError> {
    let prompt_id = &request.prompt_id;
    tracing::debug!(
        model,
        context_window_tokens = provider::model_info(model).context_window_tokens,
        "prompt model"
    );
    let mut messages = vec![Message::User {
        text: request.text.clone(),
    }];
    let mut notice_sent = false;

    for _ in 0..MAX_MODEL_CALLS {
        let call = ModelRequest {
            model,
            system: &agent.system,
            messages: &messages,
            tools: &agent.tool_definitions,
            max_tokens: MAX_TOKENS,
        };
        let mut stream = agent.providers.stream(call, cancel).await?;
        let response = loop {
            match stream.next().await {
                None => {
                    return Err(ModelError::Truncated {
                        expected: "the finished response",
                    }
                    .into())
                }
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
                Some(Ok(StreamItem::ThinkingDelta(_))) => {}
                Some(Ok(StreamItem::Finished(response))) => break response,
            }
        };
        usage.add(&response.usage);

        let text = response.text();
        if !text.is_empty() {
            let message = Event::Message {
                prompt_id: prompt_id.clone(),
                role: "assistant".to_owned(),
                text,
            };
            emitter.emit(message).await?;
        }
        let tool_uses: Vec<(&str, &str, &Value)> = response.tool_uses().collect();
        match &response.stop_reason {
            StopReason::ToolUse if !tool_uses.is_empty() => {}
            StopReason::EndTurn
            | StopReason::StopSequence
            | StopReason::MaxTokens
            | StopReason::Refusal => return Ok(()),
            other => {
                if !tool_uses.is_empty() {
                    tracing::warn!(stop_reason = ?other, "model asked for tools without stop_reason tool_use; running them");
                } else {
                    tracing::info!(stop_reason = ?other, "model ended its turn");
                    return Ok(());
                }
            }
        }

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
            let outcome = execute(agent, name, input.clone()).await?;
            let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let (ok, output, file_change) = match outcome {
                Ok(ToolOutput {
                    output,
                    file_change,
                }) => (true, output, file_change),
                Err(error) => (false, error.to_string(), None),
            };
            emitter
                .emit(Event::ToolResult {
                    call_id: call_id.to_owned(),
                    ok,
                    output: output.clone(),
                    duration_ms,
                })
                .await?;
            if let Some(change) = file_change {
                emitter
                    .emit(Event::FileChanged {
                        path: change.path,
                        change: change.change,
                        additions: change.additions,
                        deletions: change.deletions,
                    })
                    .await?;
            }
            results.push(ToolResultBlock {
                call_id: call_id.to_owned(),
                content: output,
                is_error: !ok,
            });
            if cancel.is_cancelled() {
                return Err(LoopError::Stopped);
            }
        }
        messages.push(Message::Assistant {
            content: response.content.clone(),
        });
        messages.push(Message::ToolResults { results });
    }
    Err(LoopError::TooManyCalls {
        limit: MAX_MODEL_CALLS,
    })
}

/// Run a tool on a blocking thread (tools do synchronous file I/O).
async fn execute(
    agent: &Agent,
    name: &str,
    input: Value,
) -> Result<Result<ToolOutput, ToolError>, LoopError> {
    let tool = match tools::find(name) {
        Ok(tool) => tool,
        Err(error) => return Ok(Err(error)),
    };
    let workspace = agent.workspace.clone();
    tokio::task::spawn_blocking(move || (tool.execute)(&workspace, input))
        .await
        .map_err(|source| LoopError::ToolCrashed {
            tool: name.to_owned(),
            source,
        })
}

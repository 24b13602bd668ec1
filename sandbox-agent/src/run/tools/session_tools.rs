//! The sub-session tools: `spawn_session`, `session_status` and `list_children`. Each asks the
//! session over the link ([`SessionCalls`]: a `request` the link sends, answered by the session's
//! `reply`), waits at most [`SessionCalls::timeout`], and gives the model the answer as JSON. A
//! refusal (a guardrail, an unknown child) is a tool error naming its code, so the model can act on it.

use std::time::Duration;

use nightshift_protocol::{SessionCall, SessionReply};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{parse_input, ToolContext, ToolError, ToolOutput};

/// How long a tool waits for the session's answer by default.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One question for the session, with where its answer goes; the link sends it and routes the reply.
#[derive(Debug)]
pub struct SessionRequest {
    /// What to ask.
    pub call: SessionCall,
    /// Where the reply goes; dropped when the link is lost before it came.
    pub reply: oneshot::Sender<SessionReply>,
}

/// The tools' way to the session: requests go to the link, which owns the socket.
#[derive(Debug, Clone)]
pub struct SessionCalls {
    requests: mpsc::UnboundedSender<SessionRequest>,
    /// How long a call waits for its reply.
    pub timeout: Duration,
}

impl SessionCalls {
    /// A handle and the receiver the link serves.
    pub fn new(timeout: Duration) -> (Self, mpsc::UnboundedReceiver<SessionRequest>) {
        let (requests, receiver) = mpsc::unbounded_channel();
        (Self { requests, timeout }, receiver)
    }

    /// Ask the session and wait for its reply (or the timeout); a refusal is a [`ToolError`].
    pub async fn ask(&self, call: SessionCall) -> Result<SessionReply, ToolError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(SessionRequest { call, reply })
            .map_err(|_| ToolError::SessionUnreachable {
                reason: "the session link has ended".to_owned(),
            })?;
        let reply = match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => {
                return Err(ToolError::SessionUnreachable {
                    reason: "the link to the session was lost before it answered; try again"
                        .to_owned(),
                })
            }
            Err(_) => {
                return Err(ToolError::SessionUnreachable {
                    reason: format!(
                        "no answer within {} ms; try again",
                        self.timeout.as_millis()
                    ),
                })
            }
        };
        match reply {
            SessionReply::Refused { code, message } => Err(ToolError::SessionRefused {
                code: code.as_str(),
                message,
            }),
            reply => Ok(reply),
        }
    }
}

fn calls(ctx: &ToolContext) -> Result<&SessionCalls, ToolError> {
    ctx.session.as_ref().ok_or(ToolError::NoSession)
}

fn json_output(value: &impl serde::Serialize) -> ToolOutput {
    ToolOutput::text(serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned()))
}

fn unexpected(reply: &SessionReply) -> ToolError {
    ToolError::SessionUnreachable {
        reason: format!("the session answered something else: {reply:?}"),
    }
}

#[derive(Deserialize)]
struct SpawnInput {
    prompt: String,
    #[serde(default)]
    repo: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

/// `spawn_session`: start a sub-session on `prompt`; answers at once with the child.
pub async fn spawn_session(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: SpawnInput = parse_input("spawn_session", input)?;
    if input.prompt.trim().is_empty() {
        return Err(ToolError::InvalidValue {
            tool: "spawn_session",
            field: "prompt",
            reason: "must not be empty".to_owned(),
        });
    }
    let call = SessionCall::SpawnSession {
        prompt: input.prompt,
        repo: input.repo,
        title: input.title,
    };
    match calls(ctx)?.ask(call).await? {
        SessionReply::Spawned { child } => Ok(json_output(&child)),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
struct StatusInput {
    id: String,
}

/// `session_status`: one child's state.
pub async fn session_status(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: StatusInput = parse_input("session_status", input)?;
    match calls(ctx)?
        .ask(SessionCall::SessionStatus { id: input.id })
        .await?
    {
        SessionReply::Status { child } => Ok(json_output(&child)),
        other => Err(unexpected(&other)),
    }
}

/// `list_children`: every child, oldest first.
pub async fn list_children(ctx: &ToolContext, _input: Value) -> Result<ToolOutput, ToolError> {
    match calls(ctx)?.ask(SessionCall::ListChildren {}).await? {
        SessionReply::Children { children } => Ok(json_output(&children)),
        other => Err(unexpected(&other)),
    }
}

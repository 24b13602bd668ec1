//! The agent WebSocket (`/sandbox/{id}/ws`): the sandbox-agent dials in with its sandbox token.

use crate::http::SessionStatus;
use crate::{Author, ErrorCode, Event};

/// A message from the agent to its session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message on every connection.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The sandbox the agent runs in.
        sandbox_id: String,
        /// Lowest `producer_seq` the agent still holds unacknowledged, if any.
        #[serde(default)]
        resume_from: Option<u64>,
    },
    /// An event produced by the agent, numbered by the agent.
    Event {
        /// Contiguous per sandbox, starting at 1; applied once by the session.
        producer_seq: u64,
        /// The event.
        event: Event,
    },
    /// Liveness.
    Heartbeat {},
    /// A question for the session about sub-sessions (an addition to contract v1); answered by a
    /// `reply` with the same `request_id`. Not journalled: an agent that loses the link before the
    /// reply gives up on it.
    Request {
        /// Chosen by the agent, unique per connection; echoed in the reply.
        request_id: u64,
        /// What the agent asks.
        call: SessionCall,
    },
}

impl AgentMessage {
    /// Every `type` tag an agent may send.
    pub const TYPES: &'static [&'static str] = &["hello", "event", "heartbeat", "request"];
}

/// What an agent may ask its session (the `call` of a `request`), tagged by `op`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionCall {
    /// Start a sub-session that runs `prompt`; it is created, started and answered at once.
    SpawnSession {
        /// The child's first prompt (sent as the person whose prompt is running).
        prompt: String,
        /// Repository `owner/name`; default the parent's.
        #[serde(default)]
        repo: Option<String>,
        /// Title; default one derived from the prompt.
        #[serde(default)]
        title: Option<String>,
    },
    /// The state of one of this session's children.
    SessionStatus {
        /// The child's id.
        id: String,
    },
    /// Every child of this session.
    ListChildren {},
}

/// A sub-session as its parent knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChildInfo {
    /// Session id.
    pub id: String,
    /// Repository.
    pub repo: String,
    /// Title.
    pub title: String,
    /// The child's status, as it last reported it.
    pub status: SessionStatus,
    /// When it was created.
    pub created_ms: u64,
}

/// The session's answer to a `request`, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionReply {
    /// `spawn_session`: the child exists and is starting.
    Spawned {
        /// The new child.
        child: ChildInfo,
    },
    /// `session_status`.
    Status {
        /// The child.
        child: ChildInfo,
    },
    /// `list_children`, oldest first.
    Children {
        /// Every child.
        children: Vec<ChildInfo>,
    },
    /// The call was refused (e.g. `child_limit`, `not_found`).
    Refused {
        /// Why, typed.
        code: ErrorCode,
        /// Human detail, for the model.
        message: String,
    },
}

/// A message from the session to its agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerToAgent {
    /// Answer to `hello`.
    Welcome {
        /// Session id.
        session: String,
        /// Highest `producer_seq` already applied; the agent may drop everything up to it.
        last_producer_seq: u64,
    },
    /// `producer_seq` (and everything before it) is applied.
    Ack {
        /// Highest applied `producer_seq`.
        producer_seq: u64,
    },
    /// Work on a prompt.
    RunPrompt {
        /// Prompt id.
        prompt_id: String,
        /// The text.
        text: String,
        /// Who asked: the commit author.
        author: Author,
        /// Model to use.
        model: String,
    },
    /// Stop the running prompt (or the given one).
    Stop {
        /// Prompt to stop; `None` means whatever runs.
        #[serde(default)]
        prompt_id: Option<String>,
    },
    /// Take a snapshot.
    Snapshot {
        /// Why.
        reason: String,
    },
    /// Wrap up: commit, push, and expect the sandbox to end at `deadline_ms`.
    Shutdown {
        /// Why.
        reason: String,
        /// When the sandbox ends.
        deadline_ms: u64,
    },
    /// The answer to the agent's `request` with this `request_id` (an addition to contract v1).
    Reply {
        /// The request's id.
        request_id: u64,
        /// The answer.
        reply: SessionReply,
    },
    /// A typed error about something the agent sent.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human detail.
        message: String,
    },
}

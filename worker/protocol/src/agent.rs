//! The agent WebSocket (`/sandbox/{id}/ws`): the sandbox-agent dials in with its sandbox token.

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
}

impl AgentMessage {
    /// Every `type` tag an agent may send.
    pub const TYPES: &'static [&'static str] = &["hello", "event", "heartbeat"];
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
    /// A typed error about something the agent sent.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human detail.
        message: String,
    },
}

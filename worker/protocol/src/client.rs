//! The client WebSocket (`/api/sessions/{id}/ws`): browsers, the side panel and API clients.

use crate::{ErrorCode, EventEnvelope, Participant, QueuedPrompt, SessionInfo, StopScope};

/// A message from a client to the session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on every connection; replay starts after `last_seq`.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
        /// Last `seq` the client has; `None` replays from the start.
        #[serde(default)]
        last_seq: Option<u64>,
        /// Free-form client name (`web`, `extension`, `cli`).
        #[serde(default)]
        client: Option<String>,
    },
    /// Send a prompt.
    Prompt {
        /// The text.
        text: String,
        /// Re-sending with the same key returns the original prompt.
        idempotency_key: String,
        /// Attachments (reserved).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attachments: Option<Vec<serde_json::Value>>,
    },
    /// Remove a queued prompt.
    CancelPrompt {
        /// Prompt id.
        prompt_id: String,
    },
    /// Stop work.
    Stop {
        /// What to stop.
        scope: StopScope,
    },
    /// Someone is typing. The sender shows as `typing` in `presence` for [`crate::TYPING_MS`] after
    /// their last `typing` (a `presence` goes to everyone when that starts and when it ends; a prompt
    /// from them ends it at once). It is also a hint to prepare a sandbox: the session asks its
    /// repository for a warm-up (at most one per socket per minute, one per session per minute at the
    /// provider). Nothing is answered, and it never fails.
    Typing {},
    /// Keep-alive; answered with `pong`.
    Ping {},
}

impl ClientMessage {
    /// Every `type` tag a client may send.
    pub const TYPES: &'static [&'static str] =
        &["hello", "prompt", "cancel_prompt", "stop", "typing", "ping"];
}

/// A message from the session to a client.
// `welcome` is much larger than the rest; messages are short-lived, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to `hello`; the replay follows as `event` messages.
    Welcome {
        /// The session.
        session: SessionInfo,
        /// The connected participant.
        you: Participant,
        /// Everyone in the session.
        participants: Vec<Participant>,
        /// Unfinished prompts, running first.
        queue: Vec<QueuedPrompt>,
        /// Highest `seq` in the log at this moment.
        last_seq: u64,
    },
    /// A logged event.
    Event(EventEnvelope),
    /// Several logged events in `seq` order, sent as one frame when they were logged in a burst; the same
    /// as that many `event` messages.
    Events {
        /// The events.
        events: Vec<EventEnvelope>,
    },
    /// Who is in the session and online.
    Presence {
        /// Everyone in the session.
        participants: Vec<Participant>,
    },
    /// The answer to a `prompt` from this client.
    PromptAccepted {
        /// Prompt id.
        prompt_id: String,
        /// The client's idempotency key.
        idempotency_key: String,
        /// Zero when it runs now; otherwise how many are ahead of it.
        position: u32,
    },
    /// A typed error; the connection stays open.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human detail.
        message: String,
    },
    /// Answer to `ping`.
    Pong {},
}

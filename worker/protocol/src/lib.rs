//! Wire types of contract v1: the client WebSocket, the agent WebSocket, the HTTP bodies of the Worker
//! and the provider API. Serde only, so the same types build for the wasm Worker and for native code.
//!
//! Every union is internally tagged with `type` in `snake_case`; times are Unix milliseconds in `*_ms`.

pub mod agent;
pub mod client;
pub mod decode;
pub mod event;
pub mod http;
pub mod provider;
#[cfg(feature = "ts")]
pub mod typescript;

pub use agent::{AgentMessage, ChildInfo, ServerToAgent, SessionCall, SessionReply};
pub use client::{ClientMessage, ServerMessage};
pub use decode::{decode_agent_message, decode_client_message, DecodeError};
pub use event::{Event, EventEnvelope, FileChange};

/// Version of this contract; `hello` carries it and a mismatch is refused with a typed error.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest WebSocket frame either side accepts; bigger frames get `frame_too_large`.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The largest prompt text accepted, in bytes.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// Who did something: the person behind a prompt, a participant, a commit author.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Author {
    /// Stable handle (GitHub login in production, the chosen login in dev mode).
    pub login: String,
    /// Display name, also used as the git author name.
    pub name: String,
    /// Email, also used as the git author email.
    pub email: String,
}

/// A participant's role in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Created the session.
    Owner,
    /// Joined through an invite.
    Member,
}

/// A member of a session as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Participant {
    /// Stable handle.
    pub login: String,
    /// Display name.
    pub name: String,
    /// Role in the session.
    pub role: Role,
    /// Whether at least one of their clients is connected now.
    pub online: bool,
    /// Whether they are typing now (a client sent `typing{}` less than
    /// [`TYPING_MS`] ago). An addition to contract v1.
    #[serde(default)]
    pub typing: bool,
}

/// How long one `typing{}` keeps a participant marked as typing, in ms.
pub const TYPING_MS: u64 = 5_000;

/// Typed error codes, shared by WebSocket `error` messages and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame or body is not JSON.
    InvalidJson,
    /// The `type` tag names no known message.
    UnknownType,
    /// The message is JSON with a known type but a wrong shape.
    InvalidMessage,
    /// The frame or body exceeds its size limit.
    FrameTooLarge,
    /// A binary frame where text is expected.
    BinaryFrame,
    /// The `protocol_version` is not supported.
    UnsupportedVersion,
    /// A message other than `hello` arrived before `hello`.
    HelloRequired,
    /// No credentials, or credentials that do not verify.
    Unauthorized,
    /// The session (or other resource) does not exist or the caller may not see it.
    NotFound,
    /// The request is well formed but its values are not acceptable.
    BadRequest,
    /// Too many unfinished prompts in the session.
    QueueFull,
    /// The operation does not apply in the current state.
    Conflict,
    /// A dependency (the sandbox provider, storage) failed.
    Upstream,
    /// The sandbox has no overlay upper directory (no image under it), so there is no delta to snapshot.
    NotAnOverlay,
    /// The image a snapshot was taken on has been retired or lost; the snapshot cannot be restored.
    SnapshotImageGone,
    /// Warm pools need isolated sandboxes (overlayfs), which this provider does not have.
    PoolsUnavailable,
    /// The caller is a participant but their role does not allow this (e.g. a member revoking an invite).
    Forbidden,
    /// The invite link is past its expiry.
    InviteExpired,
    /// The invite link was revoked by an owner.
    InviteRevoked,
    /// A sub-session guardrail (depth, running children, sessions per tree) refused a spawn.
    ChildLimit,
    /// Something failed inside; details are not exposed.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::UnknownType
            | ErrorCode::InvalidMessage
            | ErrorCode::BinaryFrame
            | ErrorCode::UnsupportedVersion
            | ErrorCode::HelloRequired
            | ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::InviteExpired | ErrorCode::InviteRevoked => 410,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict
            | ErrorCode::NotAnOverlay
            | ErrorCode::SnapshotImageGone
            | ErrorCode::PoolsUnavailable => 409,
            ErrorCode::FrameTooLarge => 413,
            ErrorCode::QueueFull | ErrorCode::ChildLimit => 429,
            ErrorCode::Upstream => 502,
            ErrorCode::Internal => 500,
        }
    }

    /// The `snake_case` name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Upstream => "upstream",
            ErrorCode::NotAnOverlay => "not_an_overlay",
            ErrorCode::SnapshotImageGone => "snapshot_image_gone",
            ErrorCode::PoolsUnavailable => "pools_unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::InviteRevoked => "invite_revoked",
            ErrorCode::ChildLimit => "child_limit",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Scope of a `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum StopScope {
    /// The running prompt only; the queue continues.
    Turn,
    /// The running prompt and every queued one.
    Session,
    /// The session and all its descendants.
    Tree,
}

/// Where a prompt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum PromptStatus {
    /// Waiting behind another prompt or for the sandbox.
    Queued,
    /// Sent to the agent.
    Running,
    /// Finished normally.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by a participant.
    Stopped,
    /// Removed from the queue before it ran.
    Cancelled,
}

impl PromptStatus {
    /// Whether the prompt will not run (any more).
    pub fn is_final(self) -> bool {
        !matches!(self, PromptStatus::Queued | PromptStatus::Running)
    }
}

/// A prompt waiting or running, as listed in `welcome` and in the session state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct QueuedPrompt {
    /// Prompt id.
    pub prompt_id: String,
    /// Who sent it.
    pub author: Author,
    /// The prompt text.
    pub text: String,
    /// `queued` or `running`.
    pub status: PromptStatus,
    /// When it was accepted.
    pub created_ms: u64,
}

/// Lifecycle of a session's sandbox, as in `sandbox_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// A sandbox is being prepared ahead of need.
    Warming,
    /// The provider was asked for a sandbox.
    Starting,
    /// The agent is catching up with the repository.
    Syncing,
    /// The agent is connected and takes prompts.
    Ready,
    /// A snapshot is being taken.
    Snapshotting,
    /// The sandbox was released.
    Stopped,
    /// The sandbox could not be started or died.
    Failed,
}

/// The public description of a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Branch the session starts from.
    pub base_branch: String,
    /// Branch the agent pushes to.
    pub branch: String,
    /// Human title.
    pub title: String,
    /// Model the agent uses.
    pub model: String,
    /// Who created it.
    pub created_by: Author,
    /// When it was created.
    pub created_ms: u64,
    /// Parent session, for sub-sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_session_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_names_match_serde() {
        let all = [
            ErrorCode::InvalidJson,
            ErrorCode::UnknownType,
            ErrorCode::InvalidMessage,
            ErrorCode::FrameTooLarge,
            ErrorCode::BinaryFrame,
            ErrorCode::UnsupportedVersion,
            ErrorCode::HelloRequired,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::BadRequest,
            ErrorCode::QueueFull,
            ErrorCode::Conflict,
            ErrorCode::Upstream,
            ErrorCode::NotAnOverlay,
            ErrorCode::SnapshotImageGone,
            ErrorCode::PoolsUnavailable,
            ErrorCode::Forbidden,
            ErrorCode::InviteExpired,
            ErrorCode::InviteRevoked,
            ErrorCode::Internal,
        ];
        for code in all {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
            assert!((400..600).contains(&code.http_status()));
        }
    }
}

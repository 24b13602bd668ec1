//! Bodies of the Worker's HTTP routes.

use crate::{Author, ErrorCode, EventEnvelope, Participant, QueuedPrompt, SandboxStatus, SessionInfo, StopScope};

/// `POST /api/sessions`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreateSessionRequest {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Base branch (default `main`).
    #[serde(default)]
    pub base_branch: Option<String>,
    /// Title (default: derived from the repository).
    #[serde(default)]
    pub title: Option<String>,
    /// Model (default: the deployment's default).
    #[serde(default)]
    pub model: Option<String>,
    /// Parent session, for sub-sessions.
    #[serde(default)]
    pub parent_session_id: Option<String>,
}

/// `201` answer to `POST /api/sessions`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreateSessionResponse {
    /// Session id.
    pub id: String,
    /// Where people open it.
    pub url: String,
}

/// `POST /api/sessions/{id}/prompts`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptRequest {
    /// The text.
    pub text: String,
    /// Re-sending with the same key returns the original prompt.
    pub idempotency_key: String,
}

/// `202` answer to a prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptResponse {
    /// Prompt id.
    pub prompt_id: String,
    /// Zero when it runs now; otherwise how many are ahead of it.
    pub position: u32,
}

/// `POST /api/sessions/{id}/stop`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StopRequest {
    /// What to stop.
    pub scope: StopScope,
}

/// Answer to `POST /api/sessions/{id}/invites`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InviteResponse {
    /// Link that adds whoever opens it (signed in) to the session.
    pub share_url: String,
}

/// Answer to `POST /api/join/{token}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JoinResponse {
    /// Session id.
    pub id: String,
    /// Where to open it.
    pub url: String,
}

/// `POST /auth/dev` (dev mode only).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevLoginRequest {
    /// Handle.
    pub login: String,
    /// Display name.
    pub name: String,
    /// Email.
    pub email: String,
}

/// Answer to `POST /api/tokens`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenResponse {
    /// Bearer token for `Authorization: Bearer …`.
    pub token: String,
    /// When it stops working.
    pub expires_ms: u64,
}

/// Answer to `GET /api/me`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeResponse {
    /// The signed-in person.
    pub user: Author,
    /// Whether dev sign-in is enabled on this deployment.
    pub dev_mode: bool,
}

/// The sandbox part of the session state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SandboxState {
    /// Provider's sandbox id, once known.
    pub id: Option<String>,
    /// Current state.
    pub status: SandboxStatus,
    /// Human detail.
    pub detail: String,
    /// Whether the agent is connected now.
    pub agent_connected: bool,
}

/// Usage totals of a session.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageTotals {
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost; `null` when some usage had no known price.
    pub cost_usd: Option<f64>,
}

/// `GET /api/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    /// The session.
    pub session: SessionInfo,
    /// Members.
    pub participants: Vec<Participant>,
    /// Unfinished prompts.
    pub queue: Vec<QueuedPrompt>,
    /// Sandbox.
    pub sandbox: SandboxState,
    /// Highest `seq`.
    pub last_seq: u64,
    /// Usage so far.
    pub usage: UsageTotals,
}

/// `GET /api/sessions/{id}/events`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EventsPage {
    /// Events after the requested `seq`, in order.
    pub events: Vec<EventEnvelope>,
    /// Highest `seq` in the log.
    pub last_seq: u64,
    /// Whether more events follow this page.
    pub has_more: bool,
}

/// The body of every HTTP error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an HTTP error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorDetail {
    /// Typed code.
    pub code: ErrorCode,
    /// Human detail.
    pub message: String,
}

impl ErrorBody {
    /// Build an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { error: ErrorDetail { code, message: message.into() } }
    }
}

//! The provider API: how the Worker asks for sandboxes (`sandbox-agent host` locally, Modal in production).

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreateSandboxRequest {
    /// Repository to check out, `owner/name` (or `snapshot`).
    #[serde(default)]
    pub repo: Option<String>,
    /// Snapshot to restore instead of a fresh checkout.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Base branch to check out.
    #[serde(default)]
    pub base_branch: Option<String>,
    /// Session the sandbox serves.
    pub session_id: String,
    /// WebSocket URL the agent dials (`…/sandbox/{id}/ws`).
    pub connect_url: String,
    /// Token the agent presents; the session stores only its hash.
    pub sandbox_token: String,
    /// Hard wall-clock limit.
    pub timeout_ms: u64,
}

/// A sandbox as the provider describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SandboxInfo {
    /// Provider's id.
    pub id: String,
    /// Session it serves.
    pub session_id: String,
    /// Repository.
    pub repo: String,
    /// `starting`, `running`, `exited` or `failed`.
    pub status: String,
    /// When it was created.
    pub created_ms: u64,
    /// Human detail (exit status, error).
    #[serde(default)]
    pub detail: String,
}

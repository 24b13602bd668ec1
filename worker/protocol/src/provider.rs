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
    /// How the sandbox is isolated from its host, e.g. `overlay+bwrap`, or `none` (a plain process on
    /// the host). Absent when the provider does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// Resource limits in force, e.g. `memory_bytes=4294967296 pids=1024`, or `none`. Absent when the
    /// provider does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
    /// Outbound connections the sandbox's egress proxy refused (target not allow-listed), oldest
    /// first; only the latest ones are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedEgress>,
}

/// One outbound connection a sandbox's egress proxy refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedEgress {
    /// What the sandbox asked for, `host:port`.
    pub target: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

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

/// `POST /v1/images`: build an image of a repository (clone at `ref`, then `setup`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreateImageRequest {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Branch or commit to build from.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Setup command to run in the checkout; `null` for the provider's default.
    pub setup: Option<String>,
}

/// `202` answer to `POST /v1/images`: the build was accepted and runs in the background.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageBuildAccepted {
    /// Provider's build (and image) id.
    pub id: String,
    /// Where the build is (`building`, `ready`, `failed`).
    pub status: String,
}

/// `GET /v1/images?repo=owner/name`: the images of a repository, newest first, and its latest failed build.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageList {
    /// Images, newest first.
    #[serde(default)]
    pub images: Vec<ImageInfo>,
    /// The latest failed build, if any.
    #[serde(default, alias = "last_failure", alias = "failure")]
    pub latest_failure: Option<ImageFailure>,
}

/// An image as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// Provider's image id.
    pub id: String,
    /// Commit it was built from.
    #[serde(default)]
    pub commit: Option<String>,
    /// How old it is.
    pub age_ms: u64,
    /// Build status when the provider lists unfinished builds too (`building`, `ready`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A failed image build as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageFailure {
    /// Provider's build id.
    #[serde(default)]
    pub id: Option<String>,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
    /// How long ago it failed.
    #[serde(default)]
    pub age_ms: Option<u64>,
}

/// `POST /v1/pools/{repo}`: keep this many sandboxes of the repository ready to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolTargetRequest {
    /// Ready sandboxes wanted.
    pub target: u32,
}

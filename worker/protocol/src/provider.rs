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
    /// The newest snapshot of the sandbox (taken on request, after a prompt, or when it ended), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
}

/// `POST /sandbox/{session}/ended`, from the provider to the session a sandbox served, authenticated
/// with that sandbox's token: the sandbox ended (stopped, timed out, or its agent died) and, when it
/// could be, was snapshotted first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxEnded {
    /// Provider's sandbox id.
    pub sandbox_id: String,
    /// `stopped` (asked to stop, timed out, or the provider shut down) or `exited` (the agent ended
    /// on its own: crashed or was killed).
    pub status: String,
    /// Human detail (exit status, the reason for the stop).
    #[serde(default)]
    pub detail: String,
    /// The snapshot taken as it ended (or the newest before), to restore the session from.
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// One outbound connection a sandbox's egress proxy refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedEgress {
    /// What the sandbox asked for, `host:port`.
    pub target: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// `POST /v1/images`: build an image of a repository (a full-history clone at a commit of `ref`, after
/// the repository's setup ran in it). Answered `202` with the build's [`ImageInfo`] (`status:
/// building`); while a build of the repository runs, the answer is that build.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageRequest {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Branch whose tip is built (default `main`).
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    /// Shell command line run in the tree when the repository has no `.nightshift/setup.sh`.
    #[serde(default)]
    pub setup: Option<String>,
}

/// Where an image is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Cloning or running the setup; `GET /v1/images/{id}/log` follows it.
    Building,
    /// Published: sandboxes can start from it.
    Ready,
    /// A step failed (`error` says which); nothing was published. Never used as an image.
    Failed,
    /// Published once, but its tree is gone (the host's runtime directory did not survive a reboot);
    /// a new build replaces it.
    Missing,
}

/// An image (or a failed build) as the provider describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// Provider's id.
    pub id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Branch it was built from.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Commit checked out in the tree (empty until the clone is done).
    #[serde(default)]
    pub commit: String,
    /// When the build started.
    pub created_ms: u64,
    /// When the build ended (published or failed); `None` while building.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Time since `created_ms` when this answer was made.
    #[serde(default)]
    pub age_ms: u64,
    /// Where it is in its life.
    pub status: ImageStatus,
    /// The setup command line given in the request (the repository's `.nightshift/setup.sh` wins).
    #[serde(default)]
    pub setup: Option<String>,
    /// The end of the build log (clone, setup output), capped; the whole log is at
    /// `GET /v1/images/{id}/log`.
    #[serde(default)]
    pub setup_log: String,
    /// Bytes of the tree's files (apparent sizes), working tree and `.git` together.
    #[serde(default)]
    pub size_bytes: u64,
    /// Files, symlinks and other non-directories in the tree.
    #[serde(default)]
    pub file_count: u64,
    /// Why the build failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /v1/repos`: the repositories the provider holds, by name, sorted. An addition to the provider
/// API: the web app's repository picker lists them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoList {
    /// `owner/name` of each repository.
    pub repos: Vec<String>,
}

/// `GET /v1/images?repo=owner/name`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageList {
    /// Published images (`ready`, or `missing` after a reboot), newest first.
    pub images: Vec<ImageInfo>,
    /// The build running now, if any.
    #[serde(default)]
    pub building: Option<ImageInfo>,
    /// The newest failed build, when it is newer than the newest published image (the image is
    /// stale: show a warning).
    #[serde(default)]
    pub latest_failure: Option<ImageInfo>,
}

/// `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRequest {
    /// Why the snapshot is taken (e.g. `prompt_finished`, `timeout`); recorded, at most 200 characters.
    #[serde(default)]
    pub reason: String,
}

/// A snapshot of a sandbox: its changes against the image it started from, content-addressed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// SHA-256 of the archive (hex); the same changes on the same image give the same id.
    pub id: String,
    /// The image the changes apply to; restoring needs it to still exist.
    pub image_id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Session of the sandbox it was taken from.
    pub session_id: String,
    /// When it was taken (the first time, for identical snapshots).
    pub created_ms: u64,
    /// Size of the compressed archive.
    pub size_bytes: u64,
    /// Why it was taken.
    #[serde(default)]
    pub reason: String,
}

/// `POST /v1/pools/{repo}`: keep this many sandboxes of the repository ready to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolTargetRequest {
    /// Ready sandboxes wanted.
    pub target: u32,
}

/// One repository's warm pool, as `GET /v1/pools` and `POST /v1/pools/{repo}` describe it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Sandboxes prepared and ready to claim (overlay mounted, base branch caught up).
    pub ready: u32,
    /// Sandboxes being prepared now.
    pub preparing: u32,
    /// What the pool refills to now (recent demand, floored by requests, within the host's bounds).
    pub target: u32,
    /// Claims in the recent demand window.
    pub recent_claims: u32,
    /// The image new warm sandboxes are prepared on (the repository's newest); `None` without one.
    #[serde(default)]
    pub image_id: Option<String>,
}

/// `GET /v1/pools`: every repository's warm pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolList {
    /// The pools, by repository name.
    pub pools: Vec<PoolInfo>,
}

//! Bodies of the Worker's HTTP routes.

use crate::{
    Author, ErrorCode, EventEnvelope, Participant, QueuedPrompt, Role, SandboxStatus, SessionInfo,
    StopScope,
};

/// `POST /api/sessions`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct CreateSessionResponse {
    /// Session id.
    pub id: String,
    /// Where people open it.
    pub url: String,
}

/// `POST /api/sessions/{id}/prompts`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct PromptRequest {
    /// The text.
    pub text: String,
    /// Re-sending with the same key returns the original prompt.
    pub idempotency_key: String,
}

/// `202` answer to a prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct PromptResponse {
    /// Prompt id.
    pub prompt_id: String,
    /// Zero when it runs now; otherwise how many are ahead of it.
    pub position: u32,
}

/// `POST /api/sessions/{id}/stop`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct StopRequest {
    /// What to stop.
    pub scope: StopScope,
}

/// `POST /api/sessions/{id}/invites` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct CreateInviteRequest {
    /// How long the link works, from now (default [`INVITE_TTL_MS`], between [`INVITE_TTL_MIN_MS`] and
    /// [`INVITE_TTL_MAX_MS`]).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

/// How long an invite link works unless its creator says otherwise: 7 days.
pub const INVITE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// The shortest lifetime an invite may be given: 1 s.
pub const INVITE_TTL_MIN_MS: u64 = 1_000;
/// The longest lifetime an invite may be given: 30 days.
pub const INVITE_TTL_MAX_MS: u64 = 30 * 24 * 3600 * 1000;

/// Answer to `POST /api/sessions/{id}/invites`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct InviteResponse {
    /// Link that adds whoever opens it (signed in) to the session.
    pub share_url: String,
    /// The invite's id, to list and revoke it (never the secret).
    #[serde(default)]
    pub invite_id: String,
    /// When the link stops working (Unix ms).
    #[serde(default)]
    pub expires_ms: u64,
}

/// Where an invite is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum InviteState {
    /// Works: joining with it adds the caller.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked by an owner.
    Revoked,
}

/// One invite as its session's owners see it (`GET /api/sessions/{id}/invites`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct InviteSummary {
    /// Invite id (not the secret, which is stored only as a hash).
    pub id: String,
    /// Login of the participant who created it.
    pub created_by: String,
    /// When it was created.
    pub created_ms: u64,
    /// When it stops (or stopped) working.
    pub expires_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
    /// Its state now.
    pub state: InviteState,
}

/// `GET /api/sessions/{id}/invites`: every invite of the session, newest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct InvitesResponse {
    /// The invites.
    pub invites: Vec<InviteSummary>,
}

/// A session's status in listings, derived from its sandbox and its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// The sandbox is being prepared (warming, starting, syncing).
    Starting,
    /// Ready, with no prompt queued or running.
    Idle,
    /// A prompt is queued or running.
    Running,
    /// The sandbox was released.
    Stopped,
    /// The sandbox could not be started or died.
    Failed,
}

impl SessionStatus {
    /// The `snake_case` name used on the wire and in `?status=`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Starting => "starting",
            SessionStatus::Idle => "idle",
            SessionStatus::Running => "running",
            SessionStatus::Stopped => "stopped",
            SessionStatus::Failed => "failed",
        }
    }

    /// The status named `name`, if any.
    pub fn parse(name: &str) -> Option<SessionStatus> {
        [
            SessionStatus::Starting,
            SessionStatus::Idle,
            SessionStatus::Running,
            SessionStatus::Stopped,
            SessionStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// One session in `GET /api/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct SessionSummary {
    /// Session id.
    pub id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Human title.
    pub title: String,
    /// Status as of the last index update.
    pub status: SessionStatus,
    /// Login of its creator.
    pub created_by: String,
    /// When it was created.
    pub created_ms: u64,
    /// When something last happened in it (an event was logged; updated at most every
    /// 30 s, status changes at once).
    pub last_activity_ms: u64,
    /// The caller's role in it.
    pub role: Role,
    /// Logins of its participants, in joining order.
    pub participants: Vec<String>,
    /// Its pull request, once one was opened. An addition to contract v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request_url: Option<String>,
}

/// `GET /api/sessions?repo=&status=&participant=&limit=`: sessions the caller owns or joined, most
/// recently active first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct SessionsResponse {
    /// The sessions.
    pub sessions: Vec<SessionSummary>,
}

/// Answer to `POST /api/join/{token}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct JoinResponse {
    /// Session id.
    pub id: String,
    /// Where to open it.
    pub url: String,
}

/// `POST /auth/dev` (dev mode only).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DevLoginRequest {
    /// Handle.
    pub login: String,
    /// Display name.
    pub name: String,
    /// Email.
    pub email: String,
}

/// Answer to `GET /auth/session`: who is signed in, if anyone. Always `200`, so a page can ask before
/// sign-in without an error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct AuthSession {
    /// The signed-in person; `null` when the request carries no valid credentials.
    pub user: Option<Author>,
    /// Whether dev sign-in (`POST /auth/dev`) is available.
    pub dev_mode: bool,
}

/// Answer to `POST /api/tokens`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct TokenResponse {
    /// Bearer token for `Authorization: Bearer …`.
    pub token: String,
    /// When it stops working.
    pub expires_ms: u64,
}

/// Answer to `GET /api/me`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct MeResponse {
    /// The signed-in person.
    pub user: Author,
    /// Whether dev sign-in is enabled on this deployment.
    pub dev_mode: bool,
}

/// The sandbox part of the session state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct SandboxState {
    /// Provider's sandbox id, once known.
    pub id: Option<String>,
    /// Current state.
    pub status: SandboxStatus,
    /// Human detail.
    pub detail: String,
    /// Whether the agent is connected now.
    pub agent_connected: bool,
    /// The newest snapshot of the session's work, if any.
    #[serde(default)]
    pub last_snapshot: Option<String>,
}

/// Usage totals of a session.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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
    /// Deadlines and ceilings (an addition to contract v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecycleState>,
}

/// Where a session is in its life, its deadlines and its ceilings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct LifecycleState {
    /// `starting`, `live`, `draining`, `parked`, `failed` or `ended`.
    pub phase: String,
    /// When the session ends (its hard limit).
    pub ends_ms: u64,
    /// The earliest pending deadline, if any.
    pub next_deadline_ms: Option<u64>,
    /// Most the session may cost, in US dollars.
    pub cost_ceiling_usd: f64,
    /// Most tokens it may use while its cost is unknown.
    pub token_ceiling: u64,
    /// Why the session stopped at a ceiling; `null` while under both.
    pub ceiling_reached: Option<String>,
}

/// `GET /api/sessions/{id}/events`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an HTTP error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct ErrorDetail {
    /// Typed code.
    pub code: ErrorCode,
    /// Human detail.
    pub message: String,
}

impl ErrorBody {
    /// Build an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// `GET /api/repos`: every repository the Worker keeps images for, sorted by name.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct ReposResponse {
    /// The repositories.
    pub repos: Vec<RepoSummary>,
}

/// One repository as `GET /api/repos` shows it: its image, its build and whatever people should know.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoSummary {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Branch the images are built from.
    pub base_branch: String,
    /// The newest image the provider has, if any.
    pub image: Option<RepoImage>,
    /// Whether an image build is running now.
    pub building: bool,
    /// What is wrong, if anything (stale image, failed build, no image).
    pub warning: Option<RepoWarning>,
    /// How often a new image is built.
    pub cadence_ms: u64,
    /// The last image build, if one was attempted.
    #[serde(default)]
    pub last_build: Option<RepoBuild>,
    /// When the next build is due (Unix ms); `null` while one runs.
    #[serde(default)]
    pub next_build_ms: Option<u64>,
    /// The last warm-up asked of the provider, if any.
    #[serde(default)]
    pub warm: Option<RepoWarm>,
}

/// An image of a repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoImage {
    /// Provider's image id.
    pub id: String,
    /// Commit the image was built from, when the provider says.
    pub commit: Option<String>,
    /// How old the image is.
    pub age_ms: u64,
}

/// Something about a repository that makes sessions on it slower or less fresh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoWarning {
    /// What kind of problem.
    pub kind: RepoWarningKind,
    /// Human text, also logged as a `notice` in sessions created while it holds.
    pub message: String,
}

/// Kind of a [`RepoWarning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum RepoWarningKind {
    /// The newest image is older than twice the cadence.
    Stale,
    /// The last image build failed.
    BuildFailed,
    /// There is no image (none built yet, or the provider cannot build images).
    NoImage,
}

/// An image build the Worker asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoBuild {
    /// Provider's build id, once it answered.
    pub id: Option<String>,
    /// Where the build is.
    pub status: BuildStatus,
    /// When it was asked for (Unix ms).
    pub started_ms: u64,
    /// When it ended (Unix ms); `null` while it runs.
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Status of a [`RepoBuild`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Asked for and not finished.
    Building,
    /// Produced an image.
    Succeeded,
    /// Failed; retried with backoff.
    Failed,
    /// The provider does not build images (it answered `404` to `POST /v1/images`); asked again a cadence later.
    Unsupported,
}

/// The last warm-up the Worker asked of the provider for a repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoWarm {
    /// Ready sandboxes asked for (`POST /v1/pools/{repo} {target}`).
    pub target: u32,
    /// When it was asked (Unix ms).
    pub requested_ms: u64,
    /// How the provider answered.
    pub outcome: WarmOutcome,
    /// Human detail of a failure.
    pub detail: Option<String>,
}

/// How the provider answered a warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum WarmOutcome {
    /// Sent; no answer yet.
    Pending,
    /// The provider accepted the target.
    Accepted,
    /// The provider has no warm pools (it answered `404`).
    Unsupported,
    /// The provider refused or could not be reached.
    Failed,
}

/// `POST /api/repos/warm`: predictive warm-up of a repository (the same as a `typing` in a session on it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct WarmRequest {
    /// Repository, `owner/name`.
    pub repo: String,
}

/// `202` answer to a warm-up (`POST /api/repos/warm`, `POST /api/repos/{owner}/{name}/warm`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct WarmResponse {
    /// Repository, `owner/name`.
    pub repo: String,
    /// Whether a pool target is being sent to the provider now; `false` when the same caller asked less than
    /// the warm-up interval ago (the earlier request still stands).
    pub requested: bool,
    /// The target sent, when `requested`.
    pub target: Option<u32>,
    /// When not `requested`: how long until this caller may ask again.
    pub retry_after_ms: Option<u64>,
}

/// `PATCH /api/repos/{owner}/{name}`: per-repository settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct RepoSettingsRequest {
    /// How often to build a new image.
    #[serde(default)]
    pub cadence_ms: Option<u64>,
    /// Branch to build images from.
    #[serde(default)]
    pub base_branch: Option<String>,
}

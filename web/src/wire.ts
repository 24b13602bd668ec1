// Generated from worker/protocol by `cargo xtask wire`; do not edit by hand.
// The `wire_types` test fails when this file is stale.

export type JsonValue = number | string | boolean | Array<JsonValue> | { [key in string]: JsonValue } | null;

export type Author = { 
/**
 * Stable handle (GitHub login in production, the chosen login in dev mode).
 */
login: string, 
/**
 * Display name, also used as the git author name.
 */
name: string, 
/**
 * Email, also used as the git author email.
 */
email: string, };

export type Role = "owner" | "member";

export type Participant = { 
/**
 * Stable handle.
 */
login: string, 
/**
 * Display name.
 */
name: string, 
/**
 * Role in the session.
 */
role: Role, 
/**
 * Whether at least one of their clients is connected now.
 */
online: boolean, 
/**
 * Whether they are typing now (a client sent `typing{}` less than
 * [`TYPING_MS`] ago). An addition to contract v1.
 */
typing: boolean, };

export type ErrorCode = "invalid_json" | "unknown_type" | "invalid_message" | "frame_too_large" | "binary_frame" | "unsupported_version" | "hello_required" | "unauthorized" | "not_found" | "bad_request" | "queue_full" | "conflict" | "upstream" | "not_an_overlay" | "snapshot_image_gone" | "pools_unavailable" | "forbidden" | "invite_expired" | "invite_revoked" | "child_limit" | "internal";

export type StopScope = "turn" | "session" | "tree";

export type PromptStatus = "queued" | "running" | "completed" | "failed" | "stopped" | "cancelled";

export type QueuedPrompt = { 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * Who sent it.
 */
author: Author, 
/**
 * The prompt text.
 */
text: string, 
/**
 * `queued` or `running`.
 */
status: PromptStatus, 
/**
 * When it was accepted.
 */
created_ms: number, };

export type SandboxStatus = "warming" | "starting" | "syncing" | "ready" | "snapshotting" | "stopped" | "failed";

export type SessionInfo = { 
/**
 * Session id.
 */
id: string, 
/**
 * Repository, `owner/name`.
 */
repo: string, 
/**
 * Branch the session starts from.
 */
base_branch: string, 
/**
 * Branch the agent pushes to.
 */
branch: string, 
/**
 * Human title.
 */
title: string, 
/**
 * Model the agent uses.
 */
model: string, 
/**
 * Who created it.
 */
created_by: Author, 
/**
 * When it was created.
 */
created_ms: number, 
/**
 * Parent session, for sub-sessions.
 */
parent_session_id?: string | null, };

export type ClientMessage = { "type": "hello", 
/**
 * Must equal [`crate::PROTOCOL_VERSION`].
 */
protocol_version: number, 
/**
 * Last `seq` the client has; `None` replays from the start.
 */
last_seq: number | null, 
/**
 * Free-form client name (`web`, `extension`, `cli`).
 */
client: string | null, } | { "type": "prompt", 
/**
 * The text.
 */
text: string, 
/**
 * Re-sending with the same key returns the original prompt.
 */
idempotency_key: string, 
/**
 * Attachments (reserved).
 */
attachments?: Array<JsonValue> | null, } | { "type": "cancel_prompt", 
/**
 * Prompt id.
 */
prompt_id: string, } | { "type": "stop", 
/**
 * What to stop.
 */
scope: StopScope, } | { "type": "typing", } | { "type": "ping", };

export type ServerMessage = { "type": "welcome", 
/**
 * The session.
 */
session: SessionInfo, 
/**
 * The connected participant.
 */
you: Participant, 
/**
 * Everyone in the session.
 */
participants: Array<Participant>, 
/**
 * Unfinished prompts, running first.
 */
queue: Array<QueuedPrompt>, 
/**
 * Highest `seq` in the log at this moment.
 */
last_seq: number, } | { "type": "event" } & EventEnvelope | { "type": "events", 
/**
 * The events.
 */
events: Array<EventEnvelope>, } | { "type": "presence", 
/**
 * Everyone in the session.
 */
participants: Array<Participant>, } | { "type": "prompt_accepted", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * The client's idempotency key.
 */
idempotency_key: string, 
/**
 * Zero when it runs now; otherwise how many are ahead of it.
 */
position: number, } | { "type": "error", 
/**
 * What went wrong.
 */
code: ErrorCode, 
/**
 * Human detail.
 */
message: string, } | { "type": "pong", };

export type EventEnvelope = { 
/**
 * Position in the log: contiguous, starting at 1, assigned only by the session object.
 */
seq: number, 
/**
 * When the session object logged it.
 */
ts_ms: number, 
/**
 * The event.
 */
event: Event, };

export type Event = { "type": "prompt_queued", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * Who sent it.
 */
author: Author, 
/**
 * The text.
 */
text: string, } | { "type": "prompt_started", 
/**
 * Prompt id.
 */
prompt_id: string, } | { "type": "prompt_finished", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * How it ended.
 */
status: PromptStatus, 
/**
 * Error detail when it failed.
 */
error?: string | null, } | { "type": "prompt_cancelled", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * Who cancelled it.
 */
by?: string | null, } | { "type": "token", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * The text delta.
 */
text: string, } | { "type": "message", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * `assistant`, `user` or `system`.
 */
role: string, 
/**
 * The text.
 */
text: string, } | { "type": "tool_call", 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * Id of this call, matched by its `tool_result`.
 */
call_id: string, 
/**
 * Tool name.
 */
tool: string, 
/**
 * Tool arguments.
 */
input: JsonValue, } | { "type": "tool_result", 
/**
 * Id of the call.
 */
call_id: string, 
/**
 * Whether it succeeded.
 */
ok: boolean, 
/**
 * What it returned (possibly truncated, with a notice).
 */
output: string, 
/**
 * How long it took.
 */
duration_ms: number, } | { "type": "tool_output", 
/**
 * Id of the call.
 */
call_id: string, 
/**
 * The next piece of output.
 */
text: string, } | { "type": "file_changed", 
/**
 * Path relative to the workspace root.
 */
path: string, 
/**
 * `added`, `modified` or `deleted`.
 */
change: FileChange, 
/**
 * Lines added.
 */
additions: number, 
/**
 * Lines removed.
 */
deletions: number, 
/**
 * The change as a unified diff (`--- a/…`, `+++ b/…`, hunks), when the agent has one: exact for
 * `write_file` and `edit_file`; for commands, the file against the last commit. Absent for binary
 * files and files a command created; cut at 64 KiB with a `\ diff truncated` line. An addition to
 * contract v1.
 */
diff?: string | null, } | { "type": "sandbox_status", 
/**
 * New state.
 */
status: SandboxStatus, 
/**
 * Human detail.
 */
detail: string, } | { "type": "git_sync", 
/**
 * `started`, `done` or `failed`.
 */
state: string, 
/**
 * Commit reached, when known.
 */
commit?: string | null, } | { "type": "push", 
/**
 * Branch name.
 */
branch: string, 
/**
 * Commit pushed.
 */
commit: string, } | { "type": "pull_request", 
/**
 * PR number.
 */
number: number, 
/**
 * PR url.
 */
url: string, 
/**
 * `open`, `closed` or `merged`.
 */
state: string, } | { "type": "usage", 
/**
 * Prompt id.
 */
prompt_id?: string | null, 
/**
 * Input tokens of this call.
 */
input_tokens: number, 
/**
 * Output tokens of this call.
 */
output_tokens: number, 
/**
 * Input tokens of this call read from the provider's prompt cache.
 */
cache_read_tokens?: number, 
/**
 * Input tokens of this call written to the provider's prompt cache.
 */
cache_write_tokens?: number, 
/**
 * Cost of this call; `null` when the model has no known price.
 */
cost_usd: number | null, 
/**
 * Session total so far; `null` when unknown.
 */
total_cost_usd: number | null, } | { "type": "child_session", 
/**
 * Child session id.
 */
id: string, 
/**
 * Its state.
 */
status: string, } | { "type": "snapshot", 
/**
 * Snapshot id.
 */
id: string, 
/**
 * Why.
 */
reason: string, } | { "type": "notice", 
/**
 * `info`, `warn` or `error`.
 */
level: string, 
/**
 * The text.
 */
text: string, };

export type FileChange = "added" | "modified" | "deleted";

export type CreateSessionRequest = { 
/**
 * Repository, `owner/name`.
 */
repo: string, 
/**
 * Base branch (default `main`).
 */
base_branch: string | null, 
/**
 * Title (default: derived from the repository).
 */
title: string | null, 
/**
 * Model (default: the deployment's default).
 */
model: string | null, 
/**
 * Parent session, for sub-sessions.
 */
parent_session_id: string | null, };

export type CreateSessionResponse = { 
/**
 * Session id.
 */
id: string, 
/**
 * Where people open it.
 */
url: string, };

export type PromptRequest = { 
/**
 * The text.
 */
text: string, 
/**
 * Re-sending with the same key returns the original prompt.
 */
idempotency_key: string, };

export type PromptResponse = { 
/**
 * Prompt id.
 */
prompt_id: string, 
/**
 * Zero when it runs now; otherwise how many are ahead of it.
 */
position: number, };

export type StopRequest = { 
/**
 * What to stop.
 */
scope: StopScope, };

export type CreateInviteRequest = { 
/**
 * How long the link works, from now (default [`INVITE_TTL_MS`], between [`INVITE_TTL_MIN_MS`] and
 * [`INVITE_TTL_MAX_MS`]).
 */
ttl_ms: number | null, };

export type InviteResponse = { 
/**
 * Link that adds whoever opens it (signed in) to the session.
 */
share_url: string, 
/**
 * The invite's id, to list and revoke it (never the secret).
 */
invite_id: string, 
/**
 * When the link stops working (Unix ms).
 */
expires_ms: number, };

export type InviteState = "active" | "expired" | "revoked";

export type InviteSummary = { 
/**
 * Invite id (not the secret, which is stored only as a hash).
 */
id: string, 
/**
 * Login of the participant who created it.
 */
created_by: string, 
/**
 * When it was created.
 */
created_ms: number, 
/**
 * When it stops (or stopped) working.
 */
expires_ms: number, 
/**
 * When it was revoked, if it was.
 */
revoked_ms: number | null, 
/**
 * Its state now.
 */
state: InviteState, };

export type InvitesResponse = { 
/**
 * The invites.
 */
invites: Array<InviteSummary>, };

export type SessionStatus = "starting" | "idle" | "running" | "stopped" | "failed";

export type SessionSummary = { 
/**
 * Session id.
 */
id: string, 
/**
 * Repository, `owner/name`.
 */
repo: string, 
/**
 * Human title.
 */
title: string, 
/**
 * Status as of the last index update.
 */
status: SessionStatus, 
/**
 * Login of its creator.
 */
created_by: string, 
/**
 * When it was created.
 */
created_ms: number, 
/**
 * When something last happened in it (an event was logged; updated at most every
 * 30 s, status changes at once).
 */
last_activity_ms: number, 
/**
 * The caller's role in it.
 */
role: Role, 
/**
 * Logins of its participants, in joining order.
 */
participants: Array<string>, 
/**
 * Its pull request, once one was opened. An addition to contract v1.
 */
pull_request_url?: string | null, };

export type SessionsResponse = { 
/**
 * The sessions.
 */
sessions: Array<SessionSummary>, };

export type JoinResponse = { 
/**
 * Session id.
 */
id: string, 
/**
 * Where to open it.
 */
url: string, };

export type DevLoginRequest = { 
/**
 * Handle.
 */
login: string, 
/**
 * Display name.
 */
name: string, 
/**
 * Email.
 */
email: string, };

export type AuthSession = { 
/**
 * The signed-in person; `null` when the request carries no valid credentials.
 */
user: Author | null, 
/**
 * Whether dev sign-in (`POST /auth/dev`) is available.
 */
dev_mode: boolean, };

export type TokenResponse = { 
/**
 * Bearer token for `Authorization: Bearer …`.
 */
token: string, 
/**
 * When it stops working.
 */
expires_ms: number, };

export type MeResponse = { 
/**
 * The signed-in person.
 */
user: Author, 
/**
 * Whether dev sign-in is enabled on this deployment.
 */
dev_mode: boolean, };

export type SandboxState = { 
/**
 * Provider's sandbox id, once known.
 */
id: string | null, 
/**
 * Current state.
 */
status: SandboxStatus, 
/**
 * Human detail.
 */
detail: string, 
/**
 * Whether the agent is connected now.
 */
agent_connected: boolean, 
/**
 * The newest snapshot of the session's work, if any.
 */
last_snapshot: string | null, };

export type UsageTotals = { 
/**
 * Input tokens.
 */
input_tokens: number, 
/**
 * Output tokens.
 */
output_tokens: number, 
/**
 * Cost; `null` when some usage had no known price.
 */
cost_usd: number | null, };

export type SessionState = { 
/**
 * The session.
 */
session: SessionInfo, 
/**
 * Members.
 */
participants: Array<Participant>, 
/**
 * Unfinished prompts.
 */
queue: Array<QueuedPrompt>, 
/**
 * Sandbox.
 */
sandbox: SandboxState, 
/**
 * Highest `seq`.
 */
last_seq: number, 
/**
 * Usage so far.
 */
usage: UsageTotals, 
/**
 * Deadlines and ceilings (an addition to contract v1).
 */
lifecycle?: LifecycleState | null, };

export type LifecycleState = { 
/**
 * `starting`, `live`, `draining`, `parked`, `failed` or `ended`.
 */
phase: string, 
/**
 * When the session ends (its hard limit).
 */
ends_ms: number, 
/**
 * The earliest pending deadline, if any.
 */
next_deadline_ms: number | null, 
/**
 * Most the session may cost, in US dollars.
 */
cost_ceiling_usd: number, 
/**
 * Most tokens it may use while its cost is unknown.
 */
token_ceiling: number, 
/**
 * Why the session stopped at a ceiling; `null` while under both.
 */
ceiling_reached: string | null, };

export type EventsPage = { 
/**
 * Events after the requested `seq`, in order.
 */
events: Array<EventEnvelope>, 
/**
 * Highest `seq` in the log.
 */
last_seq: number, 
/**
 * Whether more events follow this page.
 */
has_more: boolean, };

export type ErrorBody = { 
/**
 * The error.
 */
error: ErrorDetail, };

export type ErrorDetail = { 
/**
 * Typed code.
 */
code: ErrorCode, 
/**
 * Human detail.
 */
message: string, };

export type ReposResponse = { 
/**
 * The repositories.
 */
repos: Array<RepoSummary>, };

export type RepoSummary = { 
/**
 * Repository, `owner/name`.
 */
repo: string, 
/**
 * Branch the images are built from.
 */
base_branch: string, 
/**
 * The newest image the provider has, if any.
 */
image: RepoImage | null, 
/**
 * Whether an image build is running now.
 */
building: boolean, 
/**
 * What is wrong, if anything (stale image, failed build, no image).
 */
warning: RepoWarning | null, 
/**
 * How often a new image is built.
 */
cadence_ms: number, 
/**
 * The last image build, if one was attempted.
 */
last_build: RepoBuild | null, 
/**
 * When the next build is due (Unix ms); `null` while one runs.
 */
next_build_ms: number | null, 
/**
 * The last warm-up asked of the provider, if any.
 */
warm: RepoWarm | null, };

export type RepoImage = { 
/**
 * Provider's image id.
 */
id: string, 
/**
 * Commit the image was built from, when the provider says.
 */
commit: string | null, 
/**
 * How old the image is.
 */
age_ms: number, };

export type RepoWarning = { 
/**
 * What kind of problem.
 */
kind: RepoWarningKind, 
/**
 * Human text, also logged as a `notice` in sessions created while it holds.
 */
message: string, };

export type RepoWarningKind = "stale" | "build_failed" | "no_image";

export type RepoBuild = { 
/**
 * Provider's build id, once it answered.
 */
id: string | null, 
/**
 * Where the build is.
 */
status: BuildStatus, 
/**
 * When it was asked for (Unix ms).
 */
started_ms: number, 
/**
 * When it ended (Unix ms); `null` while it runs.
 */
finished_ms: number | null, 
/**
 * Why it failed.
 */
error: string | null, };

export type BuildStatus = "building" | "succeeded" | "failed" | "unsupported";

export type RepoWarm = { 
/**
 * Ready sandboxes asked for (`POST /v1/pools/{repo} {target}`).
 */
target: number, 
/**
 * When it was asked (Unix ms).
 */
requested_ms: number, 
/**
 * How the provider answered.
 */
outcome: WarmOutcome, 
/**
 * Human detail of a failure.
 */
detail: string | null, };

export type WarmOutcome = "pending" | "accepted" | "unsupported" | "failed";

export type WarmRequest = { 
/**
 * Repository, `owner/name`.
 */
repo: string, };

export type WarmResponse = { 
/**
 * Repository, `owner/name`.
 */
repo: string, 
/**
 * Whether a pool target is being sent to the provider now; `false` when the same caller asked less than
 * the warm-up interval ago (the earlier request still stands).
 */
requested: boolean, 
/**
 * The target sent, when `requested`.
 */
target: number | null, 
/**
 * When not `requested`: how long until this caller may ask again.
 */
retry_after_ms: number | null, };

export type RepoSettingsRequest = { 
/**
 * How often to build a new image.
 */
cadence_ms: number | null, 
/**
 * Branch to build images from.
 */
base_branch: string | null, };

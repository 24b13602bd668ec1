//! Sandboxes of the local host: a workspace plus a `sandbox-agent run` process with an environment
//! built from nothing. Isolated ([`super::isolation`]): the workspace is an overlay whose lower layer is
//! the repository's latest image ([`super::image`], held by a lease until the sandbox is released; no
//! clone — the agent's catch-up at start fetches what the image lacks), or, for `{snapshot}`, the
//! snapshot's image with the snapshot restored as the upper layer, or, when the repository has no image
//! yet, a fresh clone (the naive path); the agent runs under bubblewrap in its own cgroups, and its
//! egress goes through its own [`EgressProxy`]; everything of it on the host is released when the agent
//! ends, however it ends. A sandbox over an image records its [`Overlay`], so it can be snapshotted.
//! Before any of that, an isolated create for the default branch claims a warm sandbox of the
//! repository's pool ([`super::warm`]) and, when it gets one, only starts the agent in it
//! ([`launch_warm`]); every such create then refills the pool in the background.
//! Plain: a child in its own process group on a clone in the data directory. The table here is the only
//! record of them (a restarted host forgets its sandboxes; their logs stay on disk, and the runtime
//! leftovers of isolated ones are swept at the next start).

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nightshift_protocol::provider::{
    CreateSandboxRequest, SandboxEnded, SandboxInfo, SnapshotInfo,
};
use tokio::sync::watch;

use super::cgroup::Cgroup;
use super::egress::{AllowList, Control, EgressProxy};
use super::image::ImageLease;
use super::isolation::{
    mount_overlay, Isolation, SandboxDirs, EGRESS_SOCKET_PATH, HOME_PATH, SANDBOX_PATH,
    WORKSPACE_PATH,
};
use super::snapshot::{is_snapshot_id, SnapshotError, SnapshotMeta};
use super::{io_error, AppState, HostConfig, HostError};
use crate::env;
use crate::run::provider::{ANTHROPIC_DEFAULT_BASE_URL, OPENAI_DEFAULT_BASE_URL};
use crate::seed::{self, RepoName};

/// `status` of a sandbox whose agent runs.
pub(super) const RUNNING: &str = "running";
/// `status` of a sandbox whose agent ended by itself (or was killed by something else).
pub(super) const EXITED: &str = "exited";
/// `status` of a sandbox stopped through the API, a timeout or the host's shutdown.
pub(super) const STOPPED: &str = "stopped";
/// `isolation` of an isolated sandbox.
pub(super) const ISOLATED: &str = "overlay+bwrap";
/// `isolation` and `limits` of a plain one.
pub(super) const NONE: &str = "none";

/// Time between SIGTERM and SIGKILL when stopping an agent: room for it to stop its prompt, commit
/// and push the work in progress, and see its last events acknowledged.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long reporting a sandbox's end to its session may take, per attempt.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the host's shutdown waits for the end reports of its sandboxes.
const SHUTDOWN_REPORT_WAIT: Duration = Duration::from_secs(3);
/// Attempts at reporting a sandbox's end.
const REPORT_ATTEMPTS: u32 = 3;
/// The longest a clone may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default base branch.
pub(super) const DEFAULT_BASE_BRANCH: &str = seed::DEFAULT_BRANCH;
/// Wall-clock limit of a sandbox whose request says `timeout_ms: 0`: 4 hours.
pub(super) const DEFAULT_TIMEOUT_MS: u64 = 4 * 60 * 60 * 1000;
/// The longest the deadline hook may hold up the stop of a sandbox that reached its deadline.
const DEADLINE_HOOK_LIMIT: Duration = Duration::from_secs(60);
/// How long a pool's refill waits after a claim (see [`create`]).
const REFILL_AFTER_CLAIM: Duration = Duration::from_millis(500);

/// What [`DeadlineHook`] is told: a sandbox reached its wall-clock deadline and is about to be stopped.
#[derive(Debug, Clone)]
pub struct DeadlineEvent {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its session.
    pub session_id: String,
    /// The limit it reached.
    pub timeout_ms: u64,
    /// The workspace on the host (the overlay's mount point, or the plain clone); still there.
    pub workspace: PathBuf,
    /// The overlay's upper layer (what the sandbox changed), when isolated.
    pub upper_dir: Option<PathBuf>,
}

/// Called at a sandbox's deadline before it is stopped (e.g. to snapshot it); the stop waits for the
/// returned future, at most a minute.
pub type DeadlineHook =
    Arc<dyn Fn(DeadlineEvent) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The sandboxes of this host, by id.
#[derive(Default)]
pub(super) struct Sandboxes {
    entries: Mutex<HashMap<String, Entry>>,
    /// End reports being sent (the host's shutdown waits a moment for them).
    reports_in_flight: std::sync::atomic::AtomicUsize,
}

struct Entry {
    info: SandboxInfo,
    /// The agent's process group (= its pid; bubblewrap's when isolated) while it runs.
    process_group: Option<libc::pid_t>,
    /// Becomes `true` once the agent has exited, been reaped, and its resources released.
    exited: watch::Receiver<bool>,
    /// The overlay upper directory (the workspace's delta) and the image under it, when the sandbox
    /// is an overlay over an image; `None` for a plain clone, which cannot be snapshotted.
    overlay: Option<Overlay>,
    /// The egress proxy of an isolated sandbox (kept after the end for its record of refusals).
    egress: Option<Arc<EgressProxy>>,
}

/// Where a sandbox's changes are: its overlay upper directory over an image's tree.
#[derive(Debug, Clone)]
pub(super) struct Overlay {
    /// The upper directory: only the workspace's delta (never HOME or the agent's state).
    pub(super) upper: PathBuf,
    /// The image whose tree is the lower directory.
    pub(super) image_id: String,
}

impl Entry {
    fn info(&self) -> SandboxInfo {
        let mut info = self.info.clone();
        if let Some(egress) = &self.egress {
            info.refused = egress.refused();
        }
        info
    }
}

impl Sandboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves the table usable: every update is a single
        // assignment.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One sandbox, with its live status.
    pub(super) fn get(&self, id: &str) -> Result<SandboxInfo, HostError> {
        self.lock()
            .get(id)
            .map(Entry::info)
            .ok_or_else(|| not_found(id))
    }

    /// All sandboxes, oldest first.
    pub(super) fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = self.lock().values().map(Entry::info).collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        all
    }

    /// The overlay of sandbox `id` (see [`Overlay`]) and the session it serves.
    pub(super) fn overlay(&self, id: &str) -> Result<(SandboxInfo, Option<Overlay>), HostError> {
        self.lock()
            .get(id)
            .map(|entry| (entry.info.clone(), entry.overlay.clone()))
            .ok_or_else(|| not_found(id))
    }

    /// Record that sandbox `id` runs on an overlay (for the isolation layer, which mounts it).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the overlay launcher fills it in")
    )]
    pub(super) fn set_overlay(&self, id: &str, overlay: Overlay) -> Result<(), HostError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(id).ok_or_else(|| not_found(id))?;
        entry.overlay = Some(overlay);
        Ok(())
    }

    /// Record `snapshot_id` as the newest snapshot of sandbox `id`.
    fn set_last_snapshot(&self, id: &str, snapshot_id: &str) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.info.last_snapshot = Some(snapshot_id.to_owned());
        }
    }

    /// A sandbox entry without a process (tests of the routes).
    #[cfg(test)]
    pub(super) fn insert_for_test(&self, info: SandboxInfo) {
        let (_, exited) = watch::channel(true);
        self.lock().insert(
            info.id.clone(),
            Entry {
                info,
                process_group: None,
                exited,
                overlay: None,
                egress: None,
            },
        );
    }

    /// Record that the agent of `id` exited.
    fn finish(&self, id: &str, exit: &str, done: &watch::Sender<bool>) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.process_group = None;
            if entry.info.status == RUNNING {
                entry.info.status = EXITED.to_owned();
                entry.info.detail = exit.to_owned();
            } else {
                entry.info.detail = format!("{}; {exit}", entry.info.detail);
            }
        }
        let _ = done.send(true);
    }
}

fn not_found(id: &str) -> HostError {
    HostError::SandboxNotFound {
        id: seed::truncate(id, 80),
    }
}

/// The validated parts of a create request.
#[derive(Debug)]
struct Plan {
    /// `None` when a snapshot is restored (its record names the repository).
    repo: Option<RepoName>,
    branch: String,
    /// The snapshot to restore.
    snapshot: Option<String>,
}

/// Check everything that can be checked without touching the filesystem.
fn validate(request: &CreateSandboxRequest) -> Result<Plan, HostError> {
    let repo = match (&request.snapshot, request.repo.as_deref()) {
        (Some(snapshot), _) if !is_snapshot_id(snapshot) => {
            return Err(HostError::InvalidField {
                field: "snapshot",
                reason: "not a snapshot id (64 lowercase hex digits)",
            })
        }
        (Some(_), None) => None,
        (_, Some(repo)) => Some(RepoName::parse(repo).map_err(HostError::Name)?),
        (None, None) => {
            return Err(HostError::InvalidField {
                field: "repo",
                reason: "required (or snapshot)",
            })
        }
    };
    let branch = request
        .base_branch
        .clone()
        .unwrap_or_else(|| DEFAULT_BASE_BRANCH.to_owned());
    seed::validate_branch(&branch).map_err(HostError::Name)?;
    if request.session_id.is_empty()
        || request.session_id.len() > 200
        || request.session_id.chars().any(char::is_control)
    {
        return Err(HostError::InvalidField {
            field: "session_id",
            reason: "1 to 200 printable characters",
        });
    }
    let url = &request.connect_url;
    if !["ws://", "wss://", "http://", "https://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
        || url.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(HostError::InvalidField {
            field: "connect_url",
            reason: "must be a ws://, wss://, http:// or https:// url",
        });
    }
    if request.sandbox_token.is_empty() || request.sandbox_token.chars().any(char::is_control) {
        return Err(HostError::InvalidField {
            field: "sandbox_token",
            reason: "must be non-empty printable text",
        });
    }
    Ok(Plan {
        repo,
        branch,
        snapshot: request.snapshot.clone(),
    })
}

/// The complete environment of an agent: nothing of the host's own environment except `PATH`.
/// `home` and `workspace` are paths as the agent sees them.
pub(super) fn agent_env(
    config: &HostConfig,
    base_url: &str,
    sandbox_id: &str,
    home: &Path,
    workspace: &Path,
    request: &CreateSandboxRequest,
) -> Vec<(&'static str, OsString)> {
    let mut vars: Vec<(&'static str, OsString)> = vec![
        (
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME", home.into()),
        (env::CONNECT_URL, request.connect_url.clone().into()),
        (env::SANDBOX_TOKEN, request.sandbox_token.clone().into()),
        (env::SANDBOX_ID, sandbox_id.into()),
        (env::SESSION_ID, request.session_id.clone().into()),
        (env::WORKSPACE, workspace.into()),
        (env::LOG, config.agent_log_filter.clone().into()),
    ];
    match &config.model.api_key {
        Some(key) => {
            vars.push((env::ANTHROPIC_API_KEY, key.clone().into()));
            if let Some(url) = &config.model.base_url {
                vars.push((env::ANTHROPIC_BASE_URL, url.clone().into()));
            }
        }
        None => vars.push((
            env::ANTHROPIC_BASE_URL,
            format!("{base_url}/scripted-model").into(),
        )),
    }
    if let Some(key) = &config.model.openai_api_key {
        vars.push((env::OPENAI_API_KEY, key.clone().into()));
    }
    if let Some(url) = &config.model.openai_base_url {
        vars.push((env::OPENAI_BASE_URL, url.clone().into()));
    }
    vars
}

/// The environment of an isolated agent: [`agent_env`] with the sandbox's paths, its own `PATH`, and
/// the egress socket.
fn isolated_agent_env(
    config: &HostConfig,
    base_url: &str,
    sandbox_id: &str,
    request: &CreateSandboxRequest,
) -> Vec<(&'static str, OsString)> {
    let mut vars = agent_env(
        config,
        base_url,
        sandbox_id,
        Path::new(HOME_PATH),
        Path::new(WORKSPACE_PATH),
        request,
    );
    for (name, value) in &mut vars {
        if *name == "PATH" {
            *value = SANDBOX_PATH.into();
        }
    }
    vars.push((env::EGRESS_SOCKET, EGRESS_SOCKET_PATH.into()));
    vars
}

/// What an isolated agent may reach: its session (`connect_url`), its models, and this host (git, the
/// demo model) — everything it is told about in `vars`, with the agent's defaults for unset model URLs.
fn allow_list(vars: &[(&'static str, OsString)], base_url: &str) -> Result<AllowList, HostError> {
    let var = |name: &str| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, value)| value.to_str())
    };
    let mut allow = AllowList::default();
    allow.allow_url(base_url)?;
    if let Some(url) = var(env::CONNECT_URL) {
        allow.allow_url(url)?;
    }
    allow.allow_url(var(env::ANTHROPIC_BASE_URL).unwrap_or(ANTHROPIC_DEFAULT_BASE_URL))?;
    match (var(env::OPENAI_BASE_URL), var(env::OPENAI_API_KEY)) {
        (Some(url), _) => allow.allow_url(url)?,
        (None, Some(_)) => allow.allow_url(OPENAI_DEFAULT_BASE_URL)?,
        (None, None) => {}
    }
    Ok(allow)
}

/// What an isolated sandbox holds on the host.
struct Resources {
    dirs: SandboxDirs,
    cgroup: Option<Cgroup>,
    egress: Option<Arc<EgressProxy>>,
    /// `<data-dir>/sandboxes/<id>/workspace`, a symlink to the overlay while the sandbox runs.
    workspace_link: Option<PathBuf>,
    /// The image under the overlay, held until the sandbox is released (dropped with it).
    image: Option<ImageLease>,
}

impl Resources {
    /// Kill whatever is left in the cgroups and remove them, close the egress proxy, unmount the
    /// overlay and delete the runtime directory. Goes on after a failure; returns the first.
    async fn release(&self, isolation: &Isolation) -> Result<(), HostError> {
        let mut first_error = None;
        if let Some(cgroup) = &self.cgroup {
            if let Err(error) = cgroup.remove().await {
                first_error.get_or_insert(error);
            }
        }
        if let Some(egress) = &self.egress {
            egress.stop();
        }
        if let Some(link) = &self.workspace_link {
            let _ = std::fs::remove_file(link);
        }
        if let Err(error) = isolation.remove_dirs(&self.dirs) {
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A started agent.
pub(super) struct Launched {
    child: tokio::process::Child,
    /// The workspace on the host.
    workspace: PathBuf,
    /// `None` for a plain sandbox.
    resources: Option<Resources>,
    /// How long the clone took (0: no clone).
    clone_ms: u64,
    /// The overlay's upper directory and the image under it, when the lower is an image.
    overlay: Option<Overlay>,
}

/// What an isolated sandbox's lower layer is made from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// The newest ready image of the repository when there is one (no clone), otherwise a clone.
    LatestImage(&'a RepoName),
    /// A snapshot's upper directory restored over the image it names.
    Snapshot(&'a str),
}

/// `POST /v1/sandboxes`: validate, make the workspace (isolated: over the latest image or a restored
/// snapshot, else a clone over smart HTTP from this host), start the agent (isolated when this host
/// can).
pub(super) async fn create(
    state: &AppState,
    request: CreateSandboxRequest,
) -> Result<SandboxInfo, HostError> {
    let started = Instant::now();
    let Plan {
        repo,
        branch,
        snapshot,
    } = validate(&request)?;
    let shared = &state.inner;
    let repo = match (&snapshot, repo) {
        (Some(snapshot_id), given) => {
            let record =
                shared
                    .snapshots
                    .get(snapshot_id)
                    .ok_or_else(|| SnapshotError::NotFound {
                        id: seed::truncate(snapshot_id, 80),
                    })?;
            let repo = RepoName::parse(&record.repo).map_err(HostError::Name)?;
            if given.is_some_and(|given| given.to_string() != repo.to_string()) {
                return Err(HostError::InvalidField {
                    field: "repo",
                    reason: "not the repository of the snapshot",
                });
            }
            if state.isolation().is_none() {
                return Err(HostError::InvalidField {
                    field: "snapshot",
                    reason: "restoring a snapshot needs isolated sandboxes (overlayfs)",
                });
            }
            repo
        }
        (None, Some(repo)) => repo,
        (None, None) => {
            return Err(HostError::InvalidField {
                field: "repo",
                reason: "required (or snapshot)",
            })
        }
    };
    let git_dir = repo.git_dir(&shared.git_root);
    if !git_dir.is_dir() {
        return Err(HostError::RepoNotFound {
            repo: repo.to_string(),
        });
    }
    check_branch(&repo, &git_dir, &branch).await?;

    // A warm sandbox of the repository (when isolated, for the default branch): only the agent starts.
    let warm = match (state.isolation(), &snapshot) {
        (Some(_), None) if branch == DEFAULT_BASE_BRANCH => {
            super::warm::claim(state, &repo.to_string()).await
        }
        _ => None,
    };
    let id = warm.as_ref().map_or_else(
        || hex::encode(rand::random::<[u8; 16]>()),
        |warm| warm.id.clone(),
    );
    let claimed = warm.is_some();
    let sandbox_dir = shared.sandboxes_root.join(&id);
    std::fs::create_dir_all(&sandbox_dir).map_err(io_error("create directory", &sandbox_dir))?;
    let remote = format!(
        "{}/git/{}/{}.git",
        shared.base_url,
        repo.owner(),
        repo.name()
    );
    let launched = match (state.isolation(), warm) {
        (Some(isolation), Some(warm)) => {
            launch_warm(state, isolation, warm, &request, &sandbox_dir).await
        }
        (Some(isolation), None) => {
            let source = match &snapshot {
                Some(snapshot_id) => Source::Snapshot(snapshot_id),
                None => Source::LatestImage(&repo),
            };
            launch_isolated(
                state,
                isolation,
                &id,
                &remote,
                &branch,
                source,
                &request,
                &sandbox_dir,
            )
            .await
        }
        (None, _) => launch_plain(state, &id, &remote, &branch, &request, &sandbox_dir).await,
    };
    if state.isolation().is_some() && snapshot.is_none() && branch == DEFAULT_BASE_BRANCH {
        // After a claim the refill (mounts, fetches, checkouts) waits: the claimed agent is starting
        // and dialling in, and a session waits for it; the CPU is its first.
        let delay = if claimed {
            REFILL_AFTER_CLAIM
        } else {
            Duration::ZERO
        };
        let (state, repo) = (state.clone(), repo.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            super::warm::start_refill(&state, &repo).await;
        });
    }
    let Launched {
        mut child,
        workspace,
        resources,
        clone_ms,
        overlay,
    } = match launched {
        Ok(launched) => launched,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&sandbox_dir);
            return Err(error);
        }
    };
    let from_what = match (&snapshot, &overlay) {
        (Some(_), _) => "snapshot",
        (None, Some(_)) if claimed => "warm pool",
        (None, Some(_)) => "image",
        (None, None) => "clone",
    };
    let process_group = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
    let (isolation_name, limits) = match state.isolation() {
        Some(isolation) => (ISOLATED.to_owned(), isolation.describe_limits()),
        None => (NONE.to_owned(), NONE.to_owned()),
    };
    let egress = resources.as_ref().and_then(|r| r.egress.clone());
    let upper_dir = resources.as_ref().map(|r| r.dirs.upper.clone());
    let info = SandboxInfo {
        id: id.clone(),
        session_id: request.session_id.clone(),
        repo: repo.to_string(),
        status: RUNNING.to_owned(),
        created_ms: now_ms(),
        detail: String::new(),
        isolation: Some(isolation_name),
        limits: Some(limits),
        refused: Vec::new(),
        last_snapshot: None,
    };
    let (done_tx, done_rx) = watch::channel(false);
    shared.sandboxes.lock().insert(
        id.clone(),
        Entry {
            info: info.clone(),
            process_group,
            exited: done_rx.clone(),
            overlay,
            egress,
        },
    );

    let report = EndReport::to(&request);
    let waiter_state = state.clone();
    let waiter_id = id.clone();
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => describe_exit(status, resources.is_some()),
            Err(err) => format!("could not wait for the agent: {err}"),
        };
        tracing::info!(sandbox_id = %waiter_id, exit = %exit, "agent ended");
        // Extraction before teardown: the agent has pushed what it could (on SIGTERM it commits its
        // work in progress); the delta is archived before the overlay goes.
        let snapshot_id = match take_snapshot(&waiter_state, &waiter_id, "sandbox ended").await {
            Ok(snapshot) => Some(snapshot.id),
            Err(HostError::NotAnOverlay { .. }) => None,
            Err(error) => {
                tracing::error!(sandbox_id = %waiter_id, %error, "could not snapshot the ended sandbox");
                waiter_state
                    .inner
                    .sandboxes
                    .get(&waiter_id)
                    .ok()
                    .and_then(|info| info.last_snapshot)
            }
        };
        if let (Some(resources), Some(isolation)) = (&resources, waiter_state.isolation()) {
            let released = Instant::now();
            match resources.release(isolation).await {
                Ok(()) => tracing::info!(
                    sandbox_id = %waiter_id,
                    teardown_ms = released.elapsed().as_millis() as u64,
                    "sandbox released"
                ),
                Err(error) => {
                    tracing::error!(sandbox_id = %waiter_id, %error, "could not release the sandbox")
                }
            }
            if let Some(egress) = &resources.egress {
                let refused = egress.refused_total();
                if refused > 0 {
                    tracing::info!(sandbox_id = %waiter_id, refused, "egress refused during the sandbox's life");
                }
            }
        }
        let sandboxes = &waiter_state.inner.sandboxes;
        sandboxes
            .reports_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        sandboxes.finish(&waiter_id, &exit, &done_tx);
        if let Ok(info) = sandboxes.get(&waiter_id) {
            let ended = SandboxEnded {
                sandbox_id: info.id,
                status: info.status,
                detail: info.detail,
                snapshot_id,
            };
            if let Some(report) = &report {
                report.send(&waiter_state.inner.http, &ended).await;
            }
        }
        sandboxes
            .reports_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    });

    let timeout_ms = match request.timeout_ms {
        0 => DEFAULT_TIMEOUT_MS,
        timeout_ms => timeout_ms,
    };
    let deadline = DeadlineEvent {
        sandbox_id: id.clone(),
        session_id: request.session_id.clone(),
        timeout_ms,
        workspace,
        upper_dir,
    };
    tokio::spawn(watchdog(state.clone(), deadline, done_rx));
    tracing::info!(
        sandbox_id = %id,
        session_id = %request.session_id,
        repo = %repo,
        branch = %branch,
        isolated = state.isolation().is_some(),
        from = from_what,
        clone_ms,
        create_ms = started.elapsed().as_millis() as u64,
        "sandbox started"
    );
    Ok(info)
}

/// Snapshot sandbox `id`: archive its overlay upper directory (its delta against its image) and
/// record the snapshot as the sandbox's newest. `not_an_overlay` for a plain clone. Works while the
/// agent runs and after it ended, until the sandbox is released.
pub(super) async fn take_snapshot(
    state: &AppState,
    id: &str,
    reason: &str,
) -> Result<SnapshotInfo, HostError> {
    let (info, overlay) = state.inner.sandboxes.overlay(id)?;
    let overlay = overlay.ok_or(HostError::NotAnOverlay {
        id: info.id.clone(),
    })?;
    // The sandbox's HOME, which holds the agent's state directory (beside the workspace), must
    // never be archived.
    let home = state.inner.sandboxes_root.join(&info.id);
    let meta = SnapshotMeta {
        image_id: overlay.image_id,
        repo: info.repo.clone(),
        session_id: info.session_id.clone(),
        reason: seed::truncate(reason, 200),
        private_paths: vec![home],
    };
    let worker = state.clone();
    let started = Instant::now();
    let snapshot =
        tokio::task::spawn_blocking(move || worker.inner.snapshots.snapshot(&overlay.upper, meta))
            .await
            .map_err(|error| HostError::Task {
                what: "the snapshot",
                reason: error.to_string(),
            })??;
    state.inner.sandboxes.set_last_snapshot(id, &snapshot.id);
    tracing::info!(
        sandbox_id = %info.id,
        snapshot_id = %snapshot.id,
        size_bytes = snapshot.size_bytes,
        reason,
        snapshot_ms = started.elapsed().as_millis() as u64,
        "snapshot taken"
    );
    Ok(snapshot)
}

/// What a sandbox's own request for a snapshot (through its egress socket) runs: [`take_snapshot`].
fn snapshot_control(state: &AppState, id: &str) -> Control {
    let (state, id) = (state.clone(), id.to_owned());
    Arc::new(move |reason: String| {
        let (state, id) = (state.clone(), id.clone());
        Box::pin(async move {
            match take_snapshot(&state, &id, &reason).await {
                Ok(snapshot) => {
                    serde_json::to_string(&snapshot).map_err(|error| (500, error.to_string()))
                }
                Err(error @ HostError::NotAnOverlay { .. }) => Err((409, error.to_string())),
                Err(error) => {
                    tracing::error!(sandbox_id = %id, %error, "a sandbox's snapshot failed");
                    Err((
                        500,
                        "the snapshot failed; the host's log says why".to_owned(),
                    ))
                }
            }
        })
    })
}

/// Where and how a sandbox's end is reported: `POST /sandbox/{session}/ended` beside the session's
/// agent socket, with the sandbox's token (the only credential the host holds for the session).
struct EndReport {
    url: reqwest::Url,
    token: String,
}

impl EndReport {
    /// From the create request: `ws(s)://…/sandbox/{session}/ws` → `http(s)://…/sandbox/{session}/ended`.
    /// `None` when the connect URL has another shape (nothing to report to).
    fn to(request: &CreateSandboxRequest) -> Option<EndReport> {
        let mut url = reqwest::Url::parse(&request.connect_url).ok()?;
        let scheme = match url.scheme() {
            "ws" | "http" => "http",
            "wss" | "https" => "https",
            _ => return None,
        };
        url.set_scheme(scheme).ok()?;
        let path = url.path().strip_suffix("/ws")?.to_owned();
        url.set_path(&format!("{path}/ended"));
        url.set_query(None);
        Some(EndReport {
            url,
            token: request.sandbox_token.clone(),
        })
    }

    /// Tell the session; a few attempts, then a log line. The session may be gone or have moved on to
    /// another sandbox (its answer is then `401`/`404`/`409`, and that is the end of it).
    async fn send(&self, http: &reqwest::Client, ended: &SandboxEnded) {
        for attempt in 1..=REPORT_ATTEMPTS {
            let answer = http
                .post(self.url.clone())
                .bearer_auth(&self.token)
                .json(ended)
                .timeout(REPORT_TIMEOUT)
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    tracing::info!(sandbox_id = %ended.sandbox_id, snapshot_id = ?ended.snapshot_id, "end reported to the session");
                    return;
                }
                Ok(response) if response.status().is_client_error() => {
                    tracing::info!(sandbox_id = %ended.sandbox_id, status = response.status().as_u16(), "the session did not take the end report");
                    return;
                }
                Ok(response) => {
                    tracing::warn!(sandbox_id = %ended.sandbox_id, attempt, status = response.status().as_u16(), "reporting the end failed")
                }
                Err(error) => {
                    tracing::warn!(sandbox_id = %ended.sandbox_id, attempt, error = %error.without_url(), "reporting the end failed")
                }
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }
}

/// Stop the sandbox at its deadline (after the deadline hook), unless it ended before.
async fn watchdog(state: AppState, deadline: DeadlineEvent, mut done: watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(deadline.timeout_ms)) => {}
        _ = done.wait_for(|done| *done) => return,
    }
    let (id, timeout_ms) = (deadline.sandbox_id.clone(), deadline.timeout_ms);
    tracing::info!(
        sandbox_id = %id,
        session_id = %deadline.session_id,
        timeout_ms,
        workspace = %deadline.workspace.display(),
        upper_dir = ?deadline.upper_dir,
        "sandbox reached its deadline"
    );
    if let Some(hook) = &state.inner.config.on_deadline {
        if tokio::time::timeout(DEADLINE_HOOK_LIMIT, hook(deadline))
            .await
            .is_err()
        {
            tracing::warn!(sandbox_id = %id, "deadline hook did not finish in time; stopping anyway");
        }
    }
    let _ = stop(&state, &id, &format!("timed out after {timeout_ms} ms")).await;
}

/// Clone into `<data-dir>/sandboxes/<id>/workspace` and start the agent as a plain child process.
async fn launch_plain(
    state: &AppState,
    id: &str,
    remote: &str,
    branch: &str,
    request: &CreateSandboxRequest,
    sandbox_dir: &Path,
) -> Result<Launched, HostError> {
    let shared = &state.inner;
    let workspace = sandbox_dir.join("workspace");
    let cloning = Instant::now();
    clone(remote, branch, sandbox_dir, &workspace, None).await?;
    let clone_ms = cloning.elapsed().as_millis() as u64;
    let (stdout, stderr) = agent_log(sandbox_dir)?;
    let config = &shared.config;
    let mut command = tokio::process::Command::new(&config.agent_bin);
    command
        .arg("run")
        .env_clear()
        .envs(agent_env(
            config,
            &shared.base_url,
            id,
            sandbox_dir,
            &workspace,
            request,
        ))
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let child = command.spawn().map_err(|source| HostError::Spawn {
        command: format!("{} run", config.agent_bin.display()),
        source,
    })?;
    Ok(Launched {
        child,
        workspace,
        resources: None,
        clone_ms,
        overlay: None,
    })
}

/// `<sandbox_dir>/agent.log`, twice (the agent's stdout and stderr).
fn agent_log(sandbox_dir: &Path) -> Result<(Stdio, Stdio), HostError> {
    let log_path = sandbox_dir.join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(io_error("create", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("open", &log_path))?;
    Ok((Stdio::from(log), Stdio::from(log_for_stderr)))
}

/// Mount the sandbox's overlay — over the latest image (held by a lease), over a snapshot's image with
/// the snapshot restored as the upper layer, or, without an image, over a fresh clone into the
/// sandbox's lower layer (as the sandbox uid) — make its cgroups and egress proxy, and start the agent
/// under bubblewrap. On failure, everything made is released.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all of it the request"
)]
async fn launch_isolated(
    state: &AppState,
    isolation: &Isolation,
    id: &str,
    remote: &str,
    branch: &str,
    source: Source<'_>,
    request: &CreateSandboxRequest,
    sandbox_dir: &Path,
) -> Result<Launched, HostError> {
    let shared = &state.inner;
    let mut resources = Resources {
        dirs: isolation.create_dirs(id)?,
        cgroup: None,
        egress: None,
        workspace_link: None,
        image: None,
    };
    let cloning = Instant::now();
    let mut clone_ms = 0;
    let result = async {
        let dirs = &resources.dirs;
        let lease = match source {
            Source::Snapshot(snapshot_id) => {
                let (state, snapshot_id, upper) =
                    (state.clone(), snapshot_id.to_owned(), dirs.upper.clone());
                let restored = tokio::task::spawn_blocking(move || {
                    state.inner.snapshots.restore(&snapshot_id, &upper)
                })
                .await
                .map_err(|error| HostError::Io {
                    action: "restore a snapshot into",
                    path: dirs.upper.clone(),
                    source: std::io::Error::other(error.to_string()),
                })??;
                Some(restored.image)
            }
            Source::LatestImage(repo) => shared
                .images
                .latest(&repo.to_string())
                .and_then(|image| shared.images.lease(&image.id).ok()),
        };
        match &lease {
            Some(image) => {
                mount_overlay(&[image.tree_path()], &dirs.upper, &dirs.work, &dirs.merged)?;
            }
            None => {
                let home = dirs.state.join("home");
                clone(
                    remote,
                    branch,
                    &home,
                    &dirs.lower,
                    Some(isolation.sandbox_ids()),
                )
                .await?;
                clone_ms = cloning.elapsed().as_millis() as u64;
                mount_overlay(&[&dirs.lower], &dirs.upper, &dirs.work, &dirs.merged)?;
            }
        }
        resources.image = lease;
        start_isolated_agent(state, isolation, id, request, sandbox_dir, &mut resources).await
    }
    .await;
    finish_launch(isolation, id, result, resources, clone_ms).await
}

/// Start the agent of a warm sandbox (overlay mounted, base branch caught up, image held): only its
/// cgroups, egress proxy and bubblewrap — no clone, no mount, no fetch.
pub(super) async fn launch_warm(
    state: &AppState,
    isolation: &Isolation,
    warm: super::warm::WarmSandbox,
    request: &CreateSandboxRequest,
    sandbox_dir: &Path,
) -> Result<Launched, HostError> {
    let id = warm.id.clone();
    let mut resources = Resources {
        dirs: warm.dirs,
        cgroup: None,
        egress: None,
        workspace_link: None,
        image: Some(warm.image),
    };
    let result =
        start_isolated_agent(state, isolation, &id, request, sandbox_dir, &mut resources).await;
    finish_launch(isolation, &id, result, resources, 0).await
}

/// The launched sandbox, or (after releasing everything made) the error.
async fn finish_launch(
    isolation: &Isolation,
    id: &str,
    result: Result<tokio::process::Child, HostError>,
    resources: Resources,
    clone_ms: u64,
) -> Result<Launched, HostError> {
    match result {
        Ok(child) => Ok(Launched {
            child,
            workspace: resources.dirs.merged.clone(),
            overlay: resources.image.as_ref().map(|image| Overlay {
                upper: resources.dirs.upper.clone(),
                image_id: image.info().id.clone(),
            }),
            resources: Some(resources),
            clone_ms,
        }),
        Err(error) => {
            if let Err(release_error) = resources.release(isolation).await {
                tracing::error!(sandbox_id = %id, error = %release_error, "could not release a sandbox that failed to start");
            }
            Err(error)
        }
    }
}

/// With the overlay mounted: link the workspace, make the cgroups and the egress proxy (the session's
/// allow-list), and start the agent under bubblewrap.
async fn start_isolated_agent(
    state: &AppState,
    isolation: &Isolation,
    id: &str,
    request: &CreateSandboxRequest,
    sandbox_dir: &Path,
    resources: &mut Resources,
) -> Result<tokio::process::Child, HostError> {
    let shared = &state.inner;
    let config = &shared.config;
    {
        let dirs = resources.dirs.clone();
        let dirs = &dirs;
        // The workspace is where it is in a plain sandbox too, for whoever looks from the host.
        let link = sandbox_dir.join("workspace");
        std::os::unix::fs::symlink(&dirs.merged, &link).map_err(io_error("link", &link))?;
        resources.workspace_link = Some(link);
        resources.cgroup = isolation.create_cgroup(id)?;
        let vars = isolated_agent_env(config, &shared.base_url, id, request);
        let allow = allow_list(&vars, &shared.base_url)?;
        let egress = Arc::new(EgressProxy::start(
            &dirs.egress_socket,
            allow,
            id,
            Some(snapshot_control(state, id)),
        )?);
        resources.egress = Some(Arc::clone(&egress));
        isolation.hand_over(&dirs.egress_socket)?;
        let mut command = isolation
            .command()
            .workspace(&dirs.merged)
            .state(&dirs.state)
            .egress_socket(&dirs.egress_socket)
            .run_agent(&config.agent_bin)
            .envs(vars);
        if let Some(cgroup) = &resources.cgroup {
            command = command.cgroup(cgroup);
        }
        let mut command = command.into_command()?;
        let (stdout, stderr) = agent_log(sandbox_dir)?;
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        command.spawn().map_err(|source| HostError::Spawn {
            command: format!("bwrap … {} run", config.agent_bin.display()),
            source,
        })
    }
}

/// `branch` must exist in the bare repository.
async fn check_branch(repo: &RepoName, git_dir: &Path, branch: &str) -> Result<(), HostError> {
    let exists = seed::branch_exists(git_dir, branch)
        .await
        .map_err(|source| HostError::Spawn {
            command: "git rev-parse".to_owned(),
            source,
        })?;
    if exists {
        Ok(())
    } else {
        Err(HostError::BranchNotFound {
            repo: repo.to_string(),
            branch: branch.to_owned(),
        })
    }
}

/// `git clone --branch <branch> <remote> <workspace>` with `home` as HOME and no inherited config;
/// as `owner` (uid, gid) when given (then `workspace` must exist, empty, and belong to it).
async fn clone(
    remote: &str,
    branch: &str,
    home: &Path,
    workspace: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), HostError> {
    let mut command = tokio::process::Command::from(seed::git_command());
    command
        .env("HOME", home)
        .args(["clone", "--quiet", "--branch", branch, "--", remote])
        .arg(workspace)
        .kill_on_drop(true);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid).current_dir(workspace);
    }
    let line = format!("git clone --branch {branch} {remote}");
    let output = match tokio::time::timeout(CLONE_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(HostError::Spawn {
                command: line,
                source,
            })
        }
        Err(_) => {
            return Err(HostError::GitCommand {
                command: line,
                status: "timed out".to_owned(),
                stderr: String::new(),
            })
        }
    };
    if output.status.success() {
        Ok(())
    } else {
        Err(HostError::GitCommand {
            command: line,
            status: output.status.to_string(),
            stderr: seed::truncate(String::from_utf8_lossy(&output.stderr).trim(), 2000),
        })
    }
}

/// Stop the agent of sandbox `id` (SIGTERM to its process group, SIGKILL after [`STOP_GRACE`]) and
/// mark it `stopped`; returns once it has ended and (isolated) been released. For an isolated sandbox
/// the group is bubblewrap's, and bubblewrap's end takes the whole sandbox with it (its pid namespace
/// dies with its first process). A sandbox that already ended keeps its status. A plain sandbox's
/// files stay.
pub(super) async fn stop(
    state: &AppState,
    id: &str,
    reason: &str,
) -> Result<SandboxInfo, HostError> {
    let sandboxes = &state.inner.sandboxes;
    let (process_group, isolated, mut exited) = {
        let mut entries = sandboxes.lock();
        let entry = entries.get_mut(id).ok_or_else(|| not_found(id))?;
        match entry.process_group {
            Some(group) if entry.info.status == RUNNING => {
                entry.info.status = STOPPED.to_owned();
                entry.info.detail = reason.to_owned();
                let isolated = entry.info.isolation.as_deref() == Some(ISOLATED);
                (group, isolated, entry.exited.clone())
            }
            _ => return Ok(entry.info.clone()),
        }
    };
    // The agent extracts its work on SIGTERM. Isolated, the group's leader is bubblewrap, which
    // passes no signal on and whose end takes the sandbox with it at once: the agent below it is
    // told instead.
    match isolated.then(|| agent_below(process_group)).flatten() {
        Some(agent) => {
            // SAFETY: `kill` only sends a signal, to the agent process this host started.
            unsafe { libc::kill(agent, libc::SIGTERM) };
        }
        None => {
            signal_group(process_group, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_GRACE, exited.wait_for(|done| *done))
        .await
        .is_err()
    {
        tracing::warn!(sandbox_id = %id, "agent ignored SIGTERM; killing its process group");
        signal_group(process_group, libc::SIGKILL);
        let _ = tokio::time::timeout(STOP_GRACE, exited.wait_for(|done| *done)).await;
    } else {
        // The agent is gone; anything it left running in its group goes too.
        signal_group(process_group, libc::SIGKILL);
    }
    tracing::info!(sandbox_id = %id, reason, "sandbox stopped");
    sandboxes.get(id)
}

/// Stop every running sandbox, concurrently.
pub(super) async fn stop_all(state: &AppState) {
    let running: Vec<String> = state
        .inner
        .sandboxes
        .lock()
        .iter()
        .filter(|(_, entry)| entry.info.status == RUNNING)
        .map(|(id, _)| id.clone())
        .collect();
    futures_util::future::join_all(
        running
            .iter()
            .map(|id| stop(state, id, "host shutting down")),
    )
    .await;
    // The sessions hear of the ends before the host goes (a moment at most: a report has retries).
    let deadline = Instant::now() + SHUTDOWN_REPORT_WAIT;
    while state
        .inner
        .sandboxes
        .reports_in_flight
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent process below bubblewrap (`leader`): the first descendant running `sandbox-agent run`.
fn agent_below(leader: libc::pid_t) -> Option<libc::pid_t> {
    let is_agent = |pid: libc::pid_t| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0);
        let program = args.next().unwrap_or_default();
        program.ends_with(b"sandbox-agent") && args.next() == Some(b"run".as_slice())
    };
    let mut level = vec![leader];
    // bubblewrap, its init in the pid namespace, the agent: a few levels at most.
    for _ in 0..4 {
        let mut below = Vec::new();
        for pid in level {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if is_agent(child) {
                    return Some(child);
                }
                below.push(child);
            }
        }
        level = below;
    }
    None
}

/// Send `signal` to every process of `group`. Returns whether any process received it.
fn signal_group(group: libc::pid_t, signal: libc::c_int) -> bool {
    if group <= 1 {
        return false; // never signal init or every process
    }
    // SAFETY: `killpg` only sends a signal; `group` is the id of a process group this host created.
    unsafe { libc::killpg(group, signal) == 0 }
}

/// How the agent ended. Under bubblewrap, an exit code above 128 is the agent killed by a signal
/// (bubblewrap exits with 128 + the signal of its child).
fn describe_exit(status: ExitStatus, isolated: bool) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) if isolated && code > 128 => {
            format!(
                "exit code {code} (the agent was killed by signal {})",
                code - 128
            )
        }
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Every variable an agent gets when the host has no model key: nothing else leaks in.
#[cfg(test)]
pub(super) const DEMO_AGENT_ENV: [&str; 9] = [
    "ANTHROPIC_BASE_URL",
    "HOME",
    "NIGHTSHIFT_CONNECT_URL",
    "NIGHTSHIFT_LOG",
    "NIGHTSHIFT_SANDBOX_ID",
    "NIGHTSHIFT_SANDBOX_TOKEN",
    "NIGHTSHIFT_SESSION_ID",
    "NIGHTSHIFT_WORKSPACE",
    "PATH",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ModelConfig;

    fn request() -> CreateSandboxRequest {
        CreateSandboxRequest {
            repo: Some("demo/hello".into()),
            snapshot: None,
            base_branch: None,
            session_id: "s1".into(),
            connect_url: "ws://127.0.0.1:8787/sandbox/s1/ws".into(),
            sandbox_token: "sbx-secret".into(),
            timeout_ms: 0,
        }
    }

    fn config(model: ModelConfig) -> HostConfig {
        HostConfig {
            data_dir: "/data".into(),
            runtime_dir: "/dev/shm/nightshift-host-test".into(),
            public_url: None,
            agent_bin: "/bin/true".into(),
            provider_token: "provider-secret".into(),
            model,
            agent_log_filter: "debug".into(),
            isolation: None,
            on_deadline: None,
            pool_max: crate::host::DEFAULT_POOL_MAX,
        }
    }

    fn env_of(model: ModelConfig) -> HashMap<&'static str, String> {
        agent_env(
            &config(model),
            "http://127.0.0.1:9",
            "abc",
            Path::new("/d/abc"),
            Path::new("/d/abc/workspace"),
            &request(),
        )
        .into_iter()
        .map(|(k, v)| (k, v.into_string().unwrap()))
        .collect()
    }

    #[test]
    fn agent_env_without_a_key_points_at_the_demo_model() {
        let vars = env_of(ModelConfig::default());
        let mut names: Vec<&str> = vars.keys().copied().collect();
        names.sort_unstable();
        assert_eq!(names, DEMO_AGENT_ENV);
        assert_eq!(
            vars["ANTHROPIC_BASE_URL"],
            "http://127.0.0.1:9/scripted-model"
        );
        assert_eq!(vars["HOME"], "/d/abc");
        assert_eq!(vars["NIGHTSHIFT_WORKSPACE"], "/d/abc/workspace");
        assert_eq!(vars["NIGHTSHIFT_SANDBOX_TOKEN"], "sbx-secret");
        assert!(!vars.values().any(|v| v.contains("provider-secret")));
    }

    #[test]
    fn agent_env_with_a_key_passes_key_and_base_url() {
        let vars = env_of(ModelConfig {
            api_key: Some("sk-test".into()),
            base_url: Some("https://llm.example".into()),
            ..ModelConfig::default()
        });
        assert_eq!(vars["ANTHROPIC_API_KEY"], "sk-test");
        assert_eq!(vars["ANTHROPIC_BASE_URL"], "https://llm.example");
        let vars = env_of(ModelConfig {
            api_key: Some("sk-test".into()),
            base_url: None,
            ..ModelConfig::default()
        });
        assert!(!vars.contains_key("ANTHROPIC_BASE_URL"));
    }

    #[test]
    fn agent_env_passes_an_openai_compatible_server() {
        let vars = env_of(ModelConfig {
            openai_base_url: Some("http://127.0.0.1:11434/v1".into()),
            openai_api_key: Some("sk-openai".into()),
            ..ModelConfig::default()
        });
        assert_eq!(vars["OPENAI_BASE_URL"], "http://127.0.0.1:11434/v1");
        assert_eq!(vars["OPENAI_API_KEY"], "sk-openai");
        assert_eq!(
            vars["ANTHROPIC_BASE_URL"],
            "http://127.0.0.1:9/scripted-model"
        );
    }

    #[test]
    fn isolated_agents_get_sandbox_paths_and_the_egress_socket() {
        let vars: HashMap<&str, String> = isolated_agent_env(
            &config(ModelConfig::default()),
            "http://127.0.0.1:9",
            "abc",
            &request(),
        )
        .into_iter()
        .map(|(k, v)| (k, v.into_string().unwrap()))
        .collect();
        assert_eq!(vars["HOME"], "/state/home");
        assert_eq!(vars["NIGHTSHIFT_WORKSPACE"], "/workspace");
        assert_eq!(
            vars["NIGHTSHIFT_EGRESS_SOCKET"],
            "/run/nightshift/egress.sock"
        );
        assert_eq!(vars["PATH"], SANDBOX_PATH);
        assert_eq!(vars.len(), DEMO_AGENT_ENV.len() + 1);
    }

    #[test]
    fn the_allow_list_is_the_session_the_models_and_this_host() {
        let allowed = |model: ModelConfig| {
            let vars = isolated_agent_env(&config(model), "http://127.0.0.1:9", "abc", &request());
            allow_list(&vars, "http://127.0.0.1:9").unwrap().targets()
        };
        // The demo model is this host.
        assert_eq!(
            allowed(ModelConfig::default()),
            ["127.0.0.1:8787", "127.0.0.1:9"]
        );
        assert_eq!(
            allowed(ModelConfig {
                api_key: Some("sk".into()),
                openai_api_key: Some("sk".into()),
                ..ModelConfig::default()
            }),
            [
                "127.0.0.1:8787",
                "127.0.0.1:9",
                "api.anthropic.com:443",
                "api.openai.com:443"
            ]
        );
        assert_eq!(
            allowed(ModelConfig {
                api_key: Some("sk".into()),
                base_url: Some("https://llm.example:8443/anthropic".into()),
                openai_base_url: Some("http://127.0.0.1:11434/v1".into()),
                ..ModelConfig::default()
            }),
            [
                "127.0.0.1:11434",
                "127.0.0.1:8787",
                "127.0.0.1:9",
                "llm.example:8443"
            ]
        );
    }

    #[test]
    fn validation() {
        assert!(validate(&request()).is_ok());
        let cases: [fn(&mut CreateSandboxRequest); 8] = [
            |r| r.repo = None,
            |r| r.repo = Some("../x".into()),
            |r| r.snapshot = Some("snap".into()),
            |r| {
                r.repo = None;
                r.snapshot = None;
            },
            |r| r.base_branch = Some("--upload-pack=x".into()),
            |r| r.session_id = String::new(),
            |r| r.connect_url = "file:///etc/passwd".into(),
            |r| r.sandbox_token = String::new(),
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut r = request();
            change(&mut r);
            assert!(validate(&r).is_err(), "case {i}");
        }
    }
}

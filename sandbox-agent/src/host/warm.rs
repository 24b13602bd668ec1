//! Warm sandboxes: the entries of the warm pools ([`super::pool`]) of an isolated host, and their
//! life. A warm sandbox is a sandbox directory made ahead of any session: its directories created,
//! its overlay mounted on the repository's latest image (lease held), and the base branch caught up
//! (`git fetch` of the branch from this host over smart HTTP and `reset --hard`, run as the sandbox uid
//! in the overlay). Claiming one ([`claim`]) takes it out of its pool under the repository's lock;
//! [`super::sandbox::launch_warm`] then only starts the agent in it.
//!
//! Refills ([`start_refill`]) plan under the lock and prepare in the background; an entry that
//! finishes after a newer image was published (or after shutdown began) is released instead of
//! queued. A watcher per repository ([`Images::subscribe`](super::image::Images::subscribe)) retires
//! the ready entries of older images when a new one is published, and refills; on every tick of the
//! pool's [`PoolConfig::tick_ms`] it also releases the ready entries above the target once demand
//! faded ([`super::pool::RepoPool::shrink`]: unmounted, directories removed, lease dropped), and
//! refills what failed. At shutdown
//! ([`release_all`]) every ready entry is unmounted and released.
//!
//! Invariant: a warm sandbox is in exactly one place — its pool's queue, a preparation in flight, or a
//! claimed sandbox's resources — so it is never handed out twice and always released once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use nightshift_protocol::provider::PoolInfo;

use super::image::ImageLease;
use super::isolation::{mount_overlay, Isolation, SandboxDirs};
use super::pool::{PoolConfig, Pools};
use super::sandbox::DEFAULT_BASE_BRANCH;
use super::{AppState, HostError};
use crate::seed::{self, RepoName};

/// Preparations run at once per refill (each is a mount and a fetch of ~100 ms).
const PREPARE_CONCURRENCY: usize = 4;
/// The longest the catch-up of a warm sandbox may take.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Niceness of a warm sandbox's git processes: refilling is background work, and the agents
/// starting meanwhile (the claims that caused it) come first.
const PREPARE_NICENESS: libc::c_int = 10;

/// A prepared sandbox waiting in its pool.
pub(super) struct WarmSandbox {
    /// Its sandbox id (its runtime directory's name).
    pub(super) id: String,
    /// Its directories; the overlay is mounted at `merged`.
    pub(super) dirs: SandboxDirs,
    /// The image under the overlay.
    pub(super) image: ImageLease,
}

/// The warm pools of a host and what keeps them.
pub(super) struct WarmPools {
    pools: Pools<WarmSandbox>,
    /// Repositories whose image watcher runs.
    watched: Mutex<HashSet<String>>,
    /// Set at shutdown: nothing is queued any more.
    closing: AtomicBool,
}

impl WarmPools {
    /// Empty pools within `config`'s bounds.
    pub(super) fn new(config: PoolConfig) -> Self {
        WarmPools {
            pools: Pools::new(config),
            watched: Mutex::new(HashSet::new()),
            closing: AtomicBool::new(false),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Take the oldest ready warm sandbox of `repo`, if any (and count the claim as demand either way).
pub(super) async fn claim(state: &AppState, repo: &str) -> Option<WarmSandbox> {
    let warm = &state.inner.warm;
    watch_images(state, repo);
    let pool = warm.pools.repo(repo);
    let mut pool = pool.lock().await;
    pool.claim(warm.pools.config(), now_ms())
}

/// `POST /v1/pools/{repo}`: hold at least `target` ready for a while, and refill; the pool's counts.
pub(super) async fn request(state: &AppState, repo: &str, target: u32) -> PoolInfo {
    let warm = &state.inner.warm;
    watch_images(state, repo);
    {
        let pool = warm.pools.repo(repo);
        let mut pool = pool.lock().await;
        pool.request(
            warm.pools.config(),
            usize::try_from(target).unwrap_or(usize::MAX),
            now_ms(),
        );
    }
    start_refill(state, repo).await;
    info(state, repo).await
}

/// `GET /v1/pools`: every pool, by repository.
pub(super) async fn list(state: &AppState) -> Vec<PoolInfo> {
    let mut all = Vec::new();
    for repo in state.inner.warm.pools.repos() {
        all.push(info(state, &repo).await);
    }
    all
}

async fn info(state: &AppState, repo: &str) -> PoolInfo {
    let warm = &state.inner.warm;
    let counts = {
        let pool = warm.pools.repo(repo);
        let mut pool = pool.lock().await;
        pool.counts(warm.pools.config(), now_ms())
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    PoolInfo {
        repo: repo.to_owned(),
        ready: count(counts.ready),
        preparing: count(counts.preparing),
        target: count(counts.target),
        recent_claims: count(counts.recent_claims),
        image_id: state.inner.images.latest(repo).map(|image| image.id),
    }
}

/// Plan the refill of `repo`'s pool under its lock, and prepare that many in the background.
pub(super) async fn start_refill(state: &AppState, repo: &str) {
    if state.isolation().is_none() {
        return;
    }
    let warm = &state.inner.warm;
    let start = {
        let pool = warm.pools.repo(repo);
        let mut pool = pool.lock().await;
        if warm.closing.load(Ordering::SeqCst) {
            0
        } else {
            pool.plan_refill(warm.pools.config(), now_ms())
        }
    };
    if start == 0 {
        return;
    }
    let Ok(name) = RepoName::parse(repo) else {
        return;
    };
    let state = state.clone();
    let repo = repo.to_owned();
    tokio::spawn(async move {
        futures_util::stream::iter(0..start)
            .for_each_concurrent(PREPARE_CONCURRENCY, |_| prepare_one(&state, &repo, &name))
            .await;
    });
}

/// Prepare one warm sandbox of `repo` and queue it (or release it when it came too late).
async fn prepare_one(state: &AppState, repo: &str, name: &RepoName) {
    let Some(isolation) = state.isolation() else {
        return;
    };
    let started = Instant::now();
    let entry = match prepare(state, isolation, name).await {
        Ok(entry) => entry,
        Err(error) => {
            tracing::warn!(%repo, %error, "could not prepare a warm sandbox");
            None
        }
    };
    let warm = &state.inner.warm;
    let pool = warm.pools.repo(repo);
    let mut pool = pool.lock().await;
    let latest = state.inner.images.latest(repo).map(|image| image.id);
    match entry {
        Some(entry)
            if !warm.closing.load(Ordering::SeqCst)
                && latest.as_deref() == Some(entry.image.info().id.as_str()) =>
        {
            tracing::info!(
                %repo,
                sandbox_id = %entry.id,
                image_id = %entry.image.info().id,
                prepare_ms = started.elapsed().as_millis() as u64,
                "warm sandbox ready"
            );
            pool.prepared(Some(entry));
        }
        Some(entry) => {
            pool.prepared(None);
            drop(pool);
            release(isolation, entry);
        }
        None => pool.prepared(None),
    }
}

/// Make a warm sandbox of `repo` on its latest image; `None` without an image.
async fn prepare(
    state: &AppState,
    isolation: &Isolation,
    repo: &RepoName,
) -> Result<Option<WarmSandbox>, HostError> {
    let images = &state.inner.images;
    let Some(latest) = images.latest(&repo.to_string()) else {
        return Ok(None);
    };
    let image = images.lease(&latest.id)?;
    let id = hex::encode(rand::random::<[u8; 16]>());
    let dirs = isolation.create_dirs(&id)?;
    let result = async {
        mount_overlay(&[image.tree_path()], &dirs.upper, &dirs.work, &dirs.merged)?;
        catch_up(&dirs, isolation.sandbox_ids(), DEFAULT_BASE_BRANCH).await
    }
    .await;
    match result {
        Ok(()) => Ok(Some(WarmSandbox { id, dirs, image })),
        Err(error) => {
            if let Err(release_error) = isolation.remove_dirs(&dirs) {
                tracing::error!(sandbox_id = %id, error = %release_error, "could not release a warm sandbox that failed");
            }
            Err(error)
        }
    }
}

/// Bring the workspace's `branch` up to the host's: fetch it from `origin` (this host) and reset to it,
/// as the sandbox uid.
async fn catch_up(dirs: &SandboxDirs, owner: (u32, u32), branch: &str) -> Result<(), HostError> {
    let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    let upstream = format!("origin/{branch}");
    for args in [
        vec!["fetch", "--quiet", "--no-tags", "origin", refspec.as_str()],
        vec!["checkout", "--quiet", "-B", branch, upstream.as_str()],
        vec!["reset", "--quiet", "--hard", upstream.as_str()],
    ] {
        let mut command = tokio::process::Command::from(seed::git_command());
        command
            .env("HOME", dirs.state.join("home"))
            .args(&args)
            .current_dir(&dirs.merged)
            .uid(owner.0)
            .gid(owner.1)
            .kill_on_drop(true);
        // SAFETY: only `setpriority`, async-signal-safe, between fork and exec; its failure is ignored.
        unsafe {
            command.pre_exec(|| {
                libc::setpriority(libc::PRIO_PROCESS, 0, PREPARE_NICENESS);
                Ok(())
            });
        }
        let line = format!("git {}", args.join(" "));
        let output = match tokio::time::timeout(CATCH_UP_TIMEOUT, command.output()).await {
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
        if !output.status.success() {
            return Err(HostError::GitCommand {
                command: line,
                status: output.status.to_string(),
                stderr: seed::truncate(String::from_utf8_lossy(&output.stderr).trim(), 2000),
            });
        }
    }
    Ok(())
}

/// Unmount and delete a warm sandbox; its image lease goes with it.
fn release(isolation: &Isolation, entry: WarmSandbox) {
    if let Err(error) = isolation.remove_dirs(&entry.dirs) {
        tracing::error!(sandbox_id = %entry.id, %error, "could not release a warm sandbox");
    }
}

/// Start (once per repository) the task that keeps `repo`'s pool: it retires the ready entries of
/// older images when a new image is published, releases the surplus when demand fades (every
/// [`PoolConfig::tick_ms`]), and refills. It holds the host only weakly, so it ends with it.
fn watch_images(state: &AppState, repo: &str) {
    if state.isolation().is_none() {
        return;
    }
    {
        let mut watched = state
            .inner
            .warm
            .watched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !watched.insert(repo.to_owned()) {
            return;
        }
    }
    let mut latest = state.inner.images.subscribe(repo);
    latest.mark_unchanged();
    let host = Arc::downgrade(&state.inner);
    let repo = repo.to_owned();
    let tick = Duration::from_millis(state.inner.warm.pools.config().tick_ms());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let published = tokio::select! {
                changed = latest.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    true
                }
                _ = ticks.tick() => false,
            };
            let Some(inner) = host.upgrade() else { break };
            let state = AppState { inner };
            if published {
                let newest = latest
                    .borrow_and_update()
                    .as_ref()
                    .map(|image| image.id.clone());
                retire_older(&state, &repo, newest.as_deref()).await;
            } else {
                shrink(&state, &repo).await;
            }
            start_refill(&state, &repo).await;
        }
    });
}

/// Release the ready entries of `repo` above its target now that demand faded (down to the pool's
/// minimum).
async fn shrink(state: &AppState, repo: &str) {
    let Some(isolation) = state.isolation() else {
        return;
    };
    let warm = &state.inner.warm;
    let surplus = {
        let pool = warm.pools.repo(repo);
        let mut pool = pool.lock().await;
        pool.shrink(warm.pools.config(), now_ms())
    };
    if !surplus.is_empty() {
        tracing::info!(%repo, released = surplus.len(), "demand faded: releasing warm sandboxes");
    }
    for entry in surplus {
        release(isolation, entry);
    }
}

/// Release the ready entries of `repo` that are not on image `newest`.
async fn retire_older(state: &AppState, repo: &str, newest: Option<&str>) {
    let Some(isolation) = state.isolation() else {
        return;
    };
    let retired = {
        let pool = state.inner.warm.pools.repo(repo);
        let mut pool = pool.lock().await;
        pool.retire(|entry| Some(entry.image.info().id.as_str()) == newest)
    };
    if !retired.is_empty() {
        tracing::info!(%repo, retired = retired.len(), newest = ?newest, "retiring warm sandboxes of an older image");
    }
    for entry in retired {
        release(isolation, entry);
    }
}

/// Host shutdown: queue nothing more, and release every ready entry.
pub(super) async fn release_all(state: &AppState) {
    let warm = &state.inner.warm;
    warm.closing.store(true, Ordering::SeqCst);
    let Some(isolation) = state.isolation() else {
        return;
    };
    for repo in warm.pools.repos() {
        let drained = {
            let pool = warm.pools.repo(&repo);
            let mut pool = pool.lock().await;
            pool.drain()
        };
        for entry in drained {
            release(isolation, entry);
        }
    }
    // Preparations still running release their entries themselves (`closing`); wait for them.
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let mut preparing = 0;
        for repo in warm.pools.repos() {
            let pool = warm.pools.repo(&repo);
            let mut pool = pool.lock().await;
            preparing += pool.counts(warm.pools.config(), now_ms()).preparing;
        }
        if preparing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! Images of repositories: a full-history clone (working tree and `.git`, `origin` at this host's
//! smart-HTTP URL `<public_url>/git/<owner>/<name>.git`, the ref's branch checked out) after the
//! repository's setup ran in it — `.nightshift/setup.sh` when the repository has one, otherwise the
//! `setup` command line of the request (run by `/bin/sh -c`), otherwise nothing.
//!
//! ```text
//! <runtime>/images/<owner>/<name>/<id>/tree        the published tree (read-only lower of sandboxes)
//! <runtime>/images/<owner>/<name>/<id>/meta.json   its record
//! <runtime>/images/<owner>/<name>/.staging-<id>/   a build in progress (tree/, and home/: setup's HOME)
//! <data-dir>/images/<owner>/<name>/<id>.json       the record, kept across restarts
//! <data-dir>/images/<owner>/<name>/<id>.log        the build log (host lines, git, setup output)
//! ```
//!
//! A build ([`Images::build`]) clones from the bare repository (full history through git's pack
//! protocol, `--no-local`: one pack file as over HTTP, not a copy of the store's loose objects, which
//! would cost a tmpfs page each), points `origin` at the host, runs the setup with the tree as its
//! working directory, a cleared environment (`PATH`, and `HOME` set to a scratch directory that is
//! not published) and a time limit, then counts the tree, writes `meta.json` and publishes the
//! staging directory with one `rename`. Any failing step (clone, setup exit ≠ 0, time limit) publishes
//! nothing: the staging directory is removed and a `failed` record with the log's tail and the error
//! is kept — the newest failure only, and only while it is newer than the newest image — so stale
//! images can be flagged. A failed build is never used as an image.
//!
//! The tree is built at `.staging-<id>/tree` and renamed when published, and sandboxes see it at
//! their own workspace path (`/workspace`).
//!
//! The setup runs through a [`SetupRunner`]. On an isolated host it is
//! [`IsolatedRunner`](super::isolation::setup::IsolatedRunner): the setup runs in the same isolation
//! as a sandbox — bubblewrap namespaces as the sandbox uid, the tree at `/workspace` (so what it
//! caches by absolute path matches sandboxes), an environment built from nothing, the sandbox
//! cgroups, and network only through an egress proxy whose allow-list is empty unless configured
//! (`--setup-allow`); with [`ImagesConfig::tree_owner`] set, the tree is handed to the sandbox uid
//! before the setup starts. Elsewhere [`ProcessRunner`] runs it as a plain process in its own
//! process group (killed with the group at the time limit), isolated by nothing but the cleared
//! environment.
//!
//! Invariants:
//! - One build per repository at a time: a second request while one runs gets the running build.
//! - A `ready` image's tree is complete and never changes; it is published by an atomic rename.
//! - After a build, the newest [`ImageSettings::keep_per_repo`] ready images of the repository are
//!   kept, plus every image a snapshot names ([`Images::pin`]) or a sandbox holds ([`ImageLease`]);
//!   the others are retired (tree and record deleted). A lease released later retires what it kept.
//! - After a restart the records are read back; a `ready` image whose tree is gone (tmpfs after a
//!   reboot) is `missing` and never used; a build interrupted by the restart is `failed`. A new build
//!   replaces them ("rebuilt on demand": [`Images::latest`] returns only ready images).
//!
//! Pools learn about new images through [`Images::subscribe`] (a `watch` of the newest ready image).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use nightshift_protocol::provider::{ImageInfo, ImageList, ImageStatus};
use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;

use crate::seed::{self, RepoName, SeedError};

/// Branch built when a request names none.
pub const DEFAULT_REF: &str = seed::DEFAULT_BRANCH;
/// The repository's own setup script, relative to the tree.
pub const SETUP_SCRIPT: &str = ".nightshift/setup.sh";
/// Longest accepted `setup` command line, in bytes.
const MAX_SETUP_BYTES: usize = 8 * 1024;
/// How long the build waits for output still buffered after the setup ended.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Size of the reads from the log pipe and the log file.
const LOG_CHUNK_BYTES: usize = 64 * 1024;
/// How often a log follower looks again even if nothing was signalled.
const LOG_POLL: Duration = Duration::from_millis(500);

/// Limits of image builds and retention.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Ready images kept per repository (besides those snapshots name or sandboxes hold); at least 1.
    pub keep_per_repo: usize,
    /// Time limit of the setup.
    pub setup_timeout: Duration,
    /// Time limit of the clone.
    pub clone_timeout: Duration,
    /// The build log is cut here (the setup keeps running; further output is dropped).
    pub log_max_bytes: u64,
    /// How much of the log's end a record keeps (`setup_log`).
    pub log_tail_bytes: u64,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            keep_per_repo: 2,
            setup_timeout: Duration::from_secs(10 * 60),
            clone_timeout: Duration::from_secs(10 * 60),
            log_max_bytes: 8 * 1024 * 1024,
            log_tail_bytes: 16 * 1024,
        }
    }
}

/// Where images live and how sandboxes reach the host.
#[derive(Debug, Clone)]
pub struct ImagesConfig {
    /// The bare-repository store, `<data-dir>/git`.
    pub git_root: PathBuf,
    /// Trees: `<runtime>/images`.
    pub trees_root: PathBuf,
    /// Records and logs: `<data-dir>/images`.
    pub records_root: PathBuf,
    /// The host's public URL without a trailing slash; `origin` is `<base_url>/git/<owner>/<name>.git`.
    pub base_url: String,
    /// Limits.
    pub settings: ImageSettings,
    /// Host uid and gid that own a published tree, when sandboxes run as another uid than the host's
    /// (isolation): the tree becomes a sandbox's overlay lower, and an agent can only change (copy up)
    /// and run git on files its own uid owns. `None`: the host's.
    pub tree_owner: Option<(u32, u32)>,
}

/// Everything that can go wrong with images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A repository or branch name that is not acceptable.
    #[error(transparent)]
    Name(SeedError),
    /// A field of a request that is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// No such repository in the store.
    #[error("repository {repo} not found")]
    RepoNotFound {
        /// `owner/name`.
        repo: String,
    },
    /// No such branch in the repository.
    #[error("branch {branch} not found in {repo}")]
    BranchNotFound {
        /// `owner/name`.
        repo: String,
        /// The branch.
        branch: String,
    },
    /// No image (or build) with this id.
    #[error("image {id} not found")]
    NotFound {
        /// The id asked for (truncated).
        id: String,
    },
    /// The image exists but cannot be used (building, failed or missing).
    #[error("image {id} is not ready ({status})")]
    NotReady {
        /// The image.
        id: String,
        /// Its status.
        status: &'static str,
    },
    /// A git command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    GitCommand {
        /// The command line (no secrets: local paths and the host's URL only).
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr (also in the build log).
        stderr: String,
    },
    /// The setup ran and failed.
    #[error("setup `{command}` failed ({status})")]
    SetupFailed {
        /// What ran.
        command: String,
        /// Its exit status.
        status: String,
    },
    /// The setup exceeded its time limit and was killed.
    #[error("setup `{command}` timed out after {timeout_ms} ms")]
    SetupTimedOut {
        /// What ran.
        command: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// A program could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}

/// A setup to run: the program, where, with which environment, where its output goes, and for how
/// long at most.
#[derive(Debug)]
pub struct SetupCommand {
    /// The program (`/bin/sh`, or the repository's executable setup script relative to `cwd`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The tree being built.
    pub cwd: PathBuf,
    /// The complete environment (`PATH`, `HOME`).
    pub env: Vec<(OsString, OsString)>,
    /// Where stdout and stderr go (the build log); close every copy when the setup ends.
    pub output: io::PipeWriter,
    /// Kill the setup (and everything it started) after this long.
    pub timeout: Duration,
}

/// How a setup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupExit {
    /// It exited by itself (or was killed by a signal).
    Exited {
        /// The exit code, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// It exceeded its time limit and was killed.
    TimedOut,
}

impl SetupExit {
    fn success(self) -> bool {
        matches!(self, SetupExit::Exited { code: Some(0), .. })
    }

    fn describe(self) -> String {
        match self {
            SetupExit::Exited {
                code: Some(code), ..
            } => format!("exit code {code}"),
            SetupExit::Exited {
                signal: Some(signal),
                ..
            } => format!("killed by signal {signal}"),
            SetupExit::Exited { .. } => "ended without a status".to_owned(),
            SetupExit::TimedOut => "timed out".to_owned(),
        }
    }
}

/// A future the runner returns.
pub type SetupFuture = Pin<Box<dyn Future<Output = io::Result<SetupExit>> + Send>>;

/// Runs an image's setup. The host's sandbox isolation implements this so that setups run inside the
/// same isolation as sandboxes; [`ProcessRunner`] is the plain-process implementation.
pub trait SetupRunner: Send + Sync + 'static {
    /// Start `command` and resolve when it (and, at the time limit, everything it started) has ended.
    fn run(&self, command: SetupCommand) -> SetupFuture;
}

/// Runs a setup as a plain child process in its own process group, killing the group at the time
/// limit and once the setup ends (so nothing it started lingers). No isolation beyond the cleared
/// environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRunner;

impl SetupRunner for ProcessRunner {
    fn run(&self, setup: SetupCommand) -> SetupFuture {
        Box::pin(async move {
            let stderr = setup.output.try_clone()?;
            let mut command = tokio::process::Command::new(&setup.program);
            command
                .args(&setup.args)
                .env_clear()
                .envs(setup.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&setup.cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::from(setup.output))
                .stderr(Stdio::from(stderr))
                .process_group(0)
                .kill_on_drop(true);
            let spawned = command.spawn();
            // The command holds copies of the pipe: drop them, so the log ends when the setup does.
            drop(command);
            let mut child = spawned?;
            let group = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
            let exit = match tokio::time::timeout(setup.timeout, child.wait()).await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    let status = status?;
                    SetupExit::Exited {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => {
                    kill_group(group);
                    let _ = child.wait().await;
                    SetupExit::TimedOut
                }
            };
            kill_group(group);
            Ok(exit)
        })
    }
}

/// SIGKILL to every process of `group`.
fn kill_group(group: Option<libc::pid_t>) {
    if let Some(group) = group.filter(|group| *group > 1) {
        // SAFETY: `killpg` only sends a signal; `group` is a process group this host created.
        unsafe { libc::killpg(group, libc::SIGKILL) };
    }
}

/// The images of this host. Cheap to clone (shared).
#[derive(Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

struct Inner {
    config: ImagesConfig,
    runner: Arc<dyn SetupRunner>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, RepoImages>,
    /// Images snapshots name: never retired.
    pins: HashSet<String>,
    /// Images sandboxes hold, with the number of holders.
    leases: HashMap<String, usize>,
    /// The last `created_ms` handed out (kept strictly increasing, so newest-first is an order).
    last_created_ms: u64,
}

struct RepoImages {
    /// `ready` and `missing` images, newest first.
    published: Vec<ImageInfo>,
    /// The newest failed build, while it is newer than the newest published image.
    failure: Option<ImageInfo>,
    building: Option<Running>,
    /// The newest ready image, for subscribers.
    latest: watch::Sender<Option<ImageInfo>>,
}

impl Default for RepoImages {
    fn default() -> Self {
        RepoImages {
            published: Vec::new(),
            failure: None,
            building: None,
            latest: watch::channel(None).0,
        }
    }
}

struct Running {
    info: ImageInfo,
    progress: watch::Receiver<Progress>,
}

/// A running build as its followers see it.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Bytes in the log file so far.
    log_bytes: u64,
    /// The final record, once the build ended.
    outcome: Option<ImageInfo>,
}

/// A build that was started (or was already running): its record and its end.
#[derive(Debug)]
pub struct ImageBuild {
    info: ImageInfo,
    progress: watch::Receiver<Progress>,
}

impl ImageBuild {
    /// The record when the build was asked for (`status: building`).
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// Wait for the build to end; the final record (`ready` or `failed`).
    pub async fn finished(mut self) -> ImageInfo {
        loop {
            let outcome = self.progress.borrow().outcome.clone();
            if let Some(outcome) = outcome {
                return outcome;
            }
            if self.progress.changed().await.is_err() {
                let outcome = self.progress.borrow().outcome.clone();
                return outcome.unwrap_or_else(|| {
                    let mut info = self.info.clone();
                    info.status = ImageStatus::Failed;
                    info.error = Some("the build ended without a result".to_owned());
                    info
                });
            }
        }
    }
}

/// A hold on a ready image: while it lives, the image is not retired. Sandboxes hold one for as long
/// as the image is their lower directory.
pub struct ImageLease {
    images: Images,
    info: ImageInfo,
    tree: PathBuf,
}

impl std::fmt::Debug for ImageLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageLease")
            .field("id", &self.info.id)
            .field("tree", &self.tree)
            .finish()
    }
}

impl ImageLease {
    /// The image.
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// Its tree, `<runtime>/images/<owner>/<name>/<id>/tree`.
    pub fn tree_path(&self) -> &Path {
        &self.tree
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let released = {
            let mut state = self.images.lock();
            match state.leases.get_mut(&self.info.id) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                _ => {
                    state.leases.remove(&self.info.id);
                    true
                }
            }
        };
        if released {
            let images = self.images.clone();
            let repo = self.info.repo.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || images.retire(&repo));
                }
                Err(_) => images.retire(&repo),
            }
        }
    }
}

impl Images {
    /// Open the image store: create its directories, read the records back (marking `missing` the
    /// images whose trees are gone, `failed` the builds a restart interrupted), and remove leftover
    /// staging, retired and unrecorded trees. Nothing is retired here: call [`Images::pin`] for the
    /// snapshots' images first.
    pub fn open(config: ImagesConfig, runner: Arc<dyn SetupRunner>) -> Result<Self, ImageError> {
        for dir in [&config.trees_root, &config.records_root] {
            std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        }
        let images = Images {
            inner: Arc::new(Inner {
                config,
                runner,
                state: Mutex::new(State::default()),
            }),
        };
        images.load()?;
        Ok(images)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Updates are small and complete before anything can panic: a poisoned table is usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn config(&self) -> &ImagesConfig {
        &self.inner.config
    }

    /// Start building an image of `repo` at the tip of `git_ref` (default `main`), with `setup` as
    /// the setup command when the repository has no `.nightshift/setup.sh`. Returns at once; if a
    /// build of `repo` is running, returns that build instead.
    pub async fn build(
        &self,
        repo: &str,
        git_ref: Option<&str>,
        setup: Option<&str>,
    ) -> Result<ImageBuild, ImageError> {
        let repo = RepoName::parse(repo).map_err(ImageError::Name)?;
        let git_ref = git_ref
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_REF)
            .to_owned();
        seed::validate_branch(&git_ref).map_err(ImageError::Name)?;
        let setup = validate_setup(setup)?;
        let git_dir = repo.git_dir(&self.config().git_root);
        if !git_dir.is_dir() {
            return Err(ImageError::RepoNotFound {
                repo: repo.to_string(),
            });
        }
        check_branch(&repo, &git_dir, &git_ref).await?;
        let key = repo.to_string();
        if let Some(running) = self.running_build(&key) {
            return Ok(running);
        }

        let id = hex::encode(rand::random::<[u8; 8]>());
        let records = repo_dir(&self.config().records_root, &repo);
        std::fs::create_dir_all(&records).map_err(io_error("create directory", &records))?;
        let log_path = records.join(format!("{id}.log"));
        let log = File::create(&log_path).map_err(io_error("create", &log_path))?;

        let (info, progress, receiver) = {
            let mut state = self.lock();
            let created_ms = now_ms().max(state.last_created_ms + 1);
            let entry = state.repos.entry(key.clone()).or_default();
            if let Some(running) = &entry.building {
                // Another request won the race: its build is ours.
                let build = ImageBuild {
                    info: with_age(running.info.clone()),
                    progress: running.progress.clone(),
                };
                drop(state);
                let _ = std::fs::remove_file(&log_path);
                return Ok(build);
            }
            let info = ImageInfo {
                id,
                repo: key,
                git_ref,
                commit: String::new(),
                created_ms,
                finished_ms: None,
                age_ms: 0,
                status: ImageStatus::Building,
                setup,
                setup_log: String::new(),
                size_bytes: 0,
                file_count: 0,
                error: None,
            };
            let (progress, receiver) = watch::channel(Progress::default());
            entry.building = Some(Running {
                info: info.clone(),
                progress: receiver.clone(),
            });
            state.last_created_ms = created_ms;
            (info, progress, receiver)
        };
        let task = BuildTask {
            images: self.clone(),
            repo,
            git_dir,
            info: info.clone(),
            progress: Arc::new(progress),
            finished: false,
        };
        tokio::spawn(task.run(log, log_path));
        Ok(ImageBuild {
            info,
            progress: receiver,
        })
    }

    fn running_build(&self, repo: &str) -> Option<ImageBuild> {
        let state = self.lock();
        let running = state.repos.get(repo)?.building.as_ref()?;
        Some(ImageBuild {
            info: with_age(running.info.clone()),
            progress: running.progress.clone(),
        })
    }

    /// The newest ready image of `repo` (`owner/name`), with its age.
    pub fn latest(&self, repo: &str) -> Option<ImageInfo> {
        let state = self.lock();
        state
            .repos
            .get(repo)?
            .published
            .iter()
            .find(|image| image.status == ImageStatus::Ready)
            .cloned()
            .map(with_age)
    }

    /// An image, a failed build or a running build, by id.
    pub fn get(&self, id: &str) -> Option<ImageInfo> {
        let state = self.lock();
        state.repos.values().find_map(|repo| {
            repo.published
                .iter()
                .chain(repo.failure.iter())
                .chain(repo.building.as_ref().map(|running| &running.info))
                .find(|image| image.id == id)
                .cloned()
                .map(with_age)
        })
    }

    /// The images of `repo` newest first, the running build and the latest failure.
    pub fn list(&self, repo: &str) -> ImageList {
        let state = self.lock();
        match state.repos.get(repo) {
            None => ImageList {
                images: Vec::new(),
                building: None,
                latest_failure: None,
            },
            Some(entry) => ImageList {
                images: entry.published.iter().cloned().map(with_age).collect(),
                building: entry
                    .building
                    .as_ref()
                    .map(|running| with_age(running.info.clone())),
                latest_failure: entry.failure.clone().map(with_age),
            },
        }
    }

    /// Where the tree of `image` is: `<runtime>/images/<owner>/<name>/<id>/tree` (a path that never
    /// exists for a record that is not one of ours).
    pub fn tree_path(&self, image: &ImageInfo) -> PathBuf {
        self.image_dir(image).join("tree")
    }

    fn image_dir(&self, image: &ImageInfo) -> PathBuf {
        match RepoName::parse(&image.repo) {
            Ok(repo) if is_image_id(&image.id) => {
                repo_dir(&self.config().trees_root, &repo).join(&image.id)
            }
            _ => self.config().trees_root.join(".invalid"),
        }
    }

    fn record_path(&self, image: &ImageInfo, extension: &str) -> PathBuf {
        match RepoName::parse(&image.repo) {
            Ok(repo) if is_image_id(&image.id) => repo_dir(&self.config().records_root, &repo)
                .join(format!("{}.{extension}", image.id)),
            _ => self.config().records_root.join(".invalid"),
        }
    }

    /// The newest ready image of `repo`, now and whenever a new one is published (pools retire their
    /// older warm sandboxes on a change).
    pub fn subscribe(&self, repo: &str) -> watch::Receiver<Option<ImageInfo>> {
        let mut state = self.lock();
        state
            .repos
            .entry(repo.to_owned())
            .or_default()
            .latest
            .subscribe()
    }

    /// Keep image `image_id` from retirement for good: a snapshot names it.
    pub fn pin(&self, image_id: &str) {
        self.lock().pins.insert(image_id.to_owned());
    }

    /// Hold the ready image `image_id` (see [`ImageLease`]).
    pub fn lease(&self, image_id: &str) -> Result<ImageLease, ImageError> {
        let mut state = self.lock();
        let image = state
            .repos
            .values()
            .find_map(|repo| {
                repo.published
                    .iter()
                    .chain(repo.failure.iter())
                    .chain(repo.building.as_ref().map(|running| &running.info))
                    .find(|image| image.id == image_id)
            })
            .cloned()
            .ok_or_else(|| ImageError::NotFound {
                id: seed::truncate(image_id, 80),
            })?;
        if image.status != ImageStatus::Ready {
            return Err(ImageError::NotReady {
                id: image.id,
                status: status_name(image.status),
            });
        }
        *state.leases.entry(image.id.clone()).or_insert(0) += 1;
        drop(state);
        let tree = self.tree_path(&image);
        Ok(ImageLease {
            images: self.clone(),
            info: with_age(image),
            tree,
        })
    }

    /// Follow the build log of image `id`: what is written so far, then (while it builds) what is
    /// written next, ending when the build ends.
    pub fn follow_log(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = io::Result<Vec<u8>>> + Send + 'static, ImageError> {
        let not_found = || ImageError::NotFound {
            id: seed::truncate(id, 80),
        };
        let (image, progress) = {
            let state = self.lock();
            state
                .repos
                .values()
                .find_map(|repo| {
                    if let Some(running) = repo.building.as_ref().filter(|r| r.info.id == id) {
                        return Some((running.info.clone(), Some(running.progress.clone())));
                    }
                    repo.published
                        .iter()
                        .chain(repo.failure.iter())
                        .find(|image| image.id == id)
                        .map(|image| (image.clone(), None))
                })
                .ok_or_else(not_found)?
        };
        let path = self.record_path(&image, "log");
        let file = File::open(&path).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => not_found(),
            _ => io_error("open", &path)(err),
        })?;
        let follower = LogFollower {
            file: tokio::fs::File::from_std(file),
            progress,
            draining: false,
        };
        Ok(futures_util::stream::unfold(follower, LogFollower::next))
    }

    /// Retire the images of `repo` beyond the newest `keep_per_repo` ready ones, except those pinned
    /// or leased. Blocking (deletes trees).
    fn retire(&self, repo: &str) {
        for image in self.select_retired(repo) {
            self.delete_files(&image);
        }
    }

    /// Take the images to retire out of the table (see [`Images::retire`]); their files stay until
    /// [`Images::delete_files`].
    fn select_retired(&self, repo: &str) -> Vec<ImageInfo> {
        let keep = self.config().settings.keep_per_repo.max(1);
        let mut state = self.lock();
        let State {
            repos,
            pins,
            leases,
            ..
        } = &mut *state;
        let Some(entry) = repos.get_mut(repo) else {
            return Vec::new();
        };
        let mut kept_ready = 0;
        let mut victims = Vec::new();
        let mut kept = Vec::new();
        for image in entry.published.drain(..) {
            let newest = image.status == ImageStatus::Ready && kept_ready < keep;
            if newest {
                kept_ready += 1;
            }
            if newest || pins.contains(&image.id) || leases.contains_key(&image.id) {
                kept.push(image);
            } else {
                tracing::info!(image_id = %image.id, repo = %image.repo, "image retired");
                victims.push(image);
            }
        }
        entry.published = kept;
        victims
    }

    /// Delete an image's tree (renamed aside first, so a half-deleted tree is never seen as an
    /// image), record and log.
    fn delete_files(&self, image: &ImageInfo) {
        // Records first: a tree without a record is removed at the next start, not the reverse.
        for extension in ["json", "log"] {
            let _ = std::fs::remove_file(self.record_path(image, extension));
        }
        let dir = self.image_dir(image);
        if dir.exists() {
            let aside = dir.with_file_name(format!(".retired-{}", image.id));
            let doomed = match std::fs::rename(&dir, &aside) {
                Ok(()) => aside,
                Err(_) => dir,
            };
            if let Err(error) = std::fs::remove_dir_all(&doomed) {
                tracing::warn!(path = %doomed.display(), %error, "could not delete an image tree");
            }
        }
    }

    /// Read the records back (see [`Images::open`]).
    fn load(&self) -> Result<(), ImageError> {
        let records_root = self.config().records_root.clone();
        let mut repos: HashMap<String, (Vec<ImageInfo>, Vec<ImageInfo>)> = HashMap::new();
        for (repo, dir) in repo_dirs(&records_root)? {
            let entries = std::fs::read_dir(&dir).map_err(io_error("read directory", &dir))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(id) = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .and_then(|name| name.strip_suffix(".json"))
                else {
                    if path.extension().is_some_and(|e| e != "log") {
                        let _ = std::fs::remove_file(&path); // a temporary file of a crash
                    }
                    continue;
                };
                let record = std::fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<ImageInfo>(&bytes).ok())
                    .filter(|info| {
                        info.id == id && is_image_id(id) && info.repo == repo.to_string()
                    });
                let Some(mut info) = record else {
                    tracing::warn!(path = %path.display(), "skipping unreadable image record");
                    continue;
                };
                let changed = match info.status {
                    ImageStatus::Building => {
                        info.status = ImageStatus::Failed;
                        info.error =
                            Some("interrupted: the host stopped during the build".to_owned());
                        info.finished_ms = Some(now_ms());
                        true
                    }
                    ImageStatus::Ready if !self.tree_path(&info).is_dir() => {
                        info.status = ImageStatus::Missing;
                        true
                    }
                    _ => false,
                };
                if changed {
                    self.persist(&info);
                }
                let lists = repos.entry(info.repo.clone()).or_default();
                match info.status {
                    ImageStatus::Failed => lists.1.push(info),
                    _ => lists.0.push(info),
                }
            }
        }
        let mut state = self.lock();
        for (repo, (mut published, mut failures)) in repos {
            published.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
            failures.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
            let newest_published_ms = published.first().map_or(0, |image| image.created_ms);
            let mut failures = failures.into_iter();
            let failure = failures
                .next()
                .filter(|failure| failure.created_ms > newest_published_ms);
            for old in failures {
                self.delete_files(&old);
            }
            for image in published.iter().chain(failure.iter()) {
                state.last_created_ms = state.last_created_ms.max(image.created_ms);
            }
            let entry = state.repos.entry(repo).or_default();
            entry.latest.send_replace(
                published
                    .iter()
                    .find(|i| i.status == ImageStatus::Ready)
                    .cloned(),
            );
            entry.published = published;
            entry.failure = failure;
        }
        let ready: HashSet<String> = state
            .repos
            .values()
            .flat_map(|repo| repo.published.iter())
            .filter(|image| image.status == ImageStatus::Ready)
            .map(|image| image.id.clone())
            .collect();
        drop(state);
        // Trees that are not ready images: staging and retired leftovers, unrecorded publications.
        for (_, dir) in repo_dirs(&self.config().trees_root)? {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name.to_str().is_some_and(|name| ready.contains(name)) {
                    continue;
                }
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing a leftover image directory");
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(error) = removed {
                    tracing::warn!(path = %path.display(), %error, "could not remove a leftover image directory");
                }
            }
        }
        Ok(())
    }

    /// Write `info` as the image's record (a failure to do so is logged: the in-memory table stays
    /// right, and after a restart an unrecorded tree is removed).
    fn persist(&self, info: &ImageInfo) {
        let path = self.record_path(info, "json");
        if let Err(error) = super::write_json_atomically(&path, info) {
            tracing::warn!(path = %path.display(), %error, "could not write an image record");
        }
    }
}

/// The state of one build task; when dropped unfinished (a panic), it records the build as failed
/// so the repository can build again.
struct BuildTask {
    images: Images,
    repo: RepoName,
    git_dir: PathBuf,
    info: ImageInfo,
    progress: Arc<watch::Sender<Progress>>,
    finished: bool,
}

impl BuildTask {
    async fn run(mut self, log: File, log_path: PathBuf) {
        self.images.persist(&self.info);
        let staging = repo_dir(&self.images.config().trees_root, &self.repo)
            .join(format!(".staging-{}", self.info.id));
        let outcome = match io::pipe() {
            Ok((reader, writer)) => {
                let progress = self.progress.clone();
                let max_bytes = self.images.config().settings.log_max_bytes;
                let collector = tokio::task::spawn_blocking(move || {
                    collect_output(reader, log, &progress, max_bytes)
                });
                let outcome = self.steps(&staging, &writer).await;
                let last = match &outcome {
                    Ok(()) => "build succeeded; publishing".to_owned(),
                    Err(err) => format!("build failed: {err}"),
                };
                note(&writer, &last);
                drop(writer);
                if tokio::time::timeout(OUTPUT_DRAIN, collector).await.is_err() {
                    tracing::warn!(image_id = %self.info.id, "setup output still open after the setup ended; not waiting");
                }
                outcome
            }
            Err(source) => Err(ImageError::Io {
                action: "create a pipe for",
                path: log_path.clone(),
                source,
            }),
        };
        self.info.setup_log = read_tail(&log_path, self.images.config().settings.log_tail_bytes);
        self.info.finished_ms = Some(now_ms());
        let outcome = match outcome {
            Ok(()) => self.publish(&staging).await,
            Err(err) => Err(err),
        };
        if let Err(err) = outcome {
            self.info.status = ImageStatus::Failed;
            self.info.error = Some(err.to_string());
            let doomed = staging.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(doomed)).await;
            tracing::warn!(image_id = %self.info.id, repo = %self.repo, error = %err, "image build failed");
        } else {
            tracing::info!(
                image_id = %self.info.id,
                repo = %self.repo,
                commit = %self.info.commit,
                files = self.info.file_count,
                "image published"
            );
        }
        self.images.persist(&self.info);
        let retired = self.finish();
        if !retired.is_empty() {
            let images = self.images.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for image in retired {
                    images.delete_files(&image);
                }
            })
            .await;
        }
    }

    /// Clone, point `origin` at the host, run the setup, count the tree.
    async fn steps(&mut self, staging: &Path, out: &io::PipeWriter) -> Result<(), ImageError> {
        let settings = self.images.config().settings.clone();
        let tree = staging.join("tree");
        let home = staging.join("home");
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(io_error("create directory", &home))?;

        let branch = self.info.git_ref.clone();
        note(
            out,
            &format!("$ git clone --no-local --branch {branch} {}", self.repo),
        );
        let mut clone = git(&home);
        clone
            .args(["clone", "--quiet", "--no-local", "--branch", &branch, "--"])
            .arg(&self.git_dir)
            .arg(&tree);
        run_git(clone, out, settings.clone_timeout).await?;
        let origin = format!(
            "{}/git/{}/{}.git",
            self.images.config().base_url,
            self.repo.owner(),
            self.repo.name()
        );
        let mut set_url = git(&home);
        set_url
            .arg("-C")
            .arg(&tree)
            .args(["remote", "set-url", "origin", &origin]);
        run_git(set_url, out, settings.clone_timeout).await?;
        let mut rev_parse = git(&home);
        rev_parse.arg("-C").arg(&tree).args(["rev-parse", "HEAD"]);
        self.info.commit = run_git(rev_parse, out, settings.clone_timeout).await?;
        note(
            out,
            &format!("checked out {branch} at {}", self.info.commit),
        );
        self.images.update_running(&self.info);

        let script = tree.join(SETUP_SCRIPT);
        let (program, args, line): (OsString, Vec<OsString>, String) =
            match (std::fs::symlink_metadata(&script), &self.info.setup) {
                (Ok(meta), _) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => (
                    format!("./{SETUP_SCRIPT}").into(),
                    Vec::new(),
                    format!("./{SETUP_SCRIPT}"),
                ),
                (Ok(meta), _) if meta.is_file() => (
                    "/bin/sh".into(),
                    vec![SETUP_SCRIPT.into()],
                    format!("sh {SETUP_SCRIPT}"),
                ),
                (_, Some(setup)) => (
                    "/bin/sh".into(),
                    vec!["-c".into(), setup.into()],
                    setup.clone(),
                ),
                (_, None) => {
                    note(
                        out,
                        &format!("no setup: no {SETUP_SCRIPT} and no setup command"),
                    );
                    return self.count(&tree).await;
                }
            };
        if let Some((uid, gid)) = self.images.config().tree_owner {
            // The setup runs as the sandbox uid: the tree must be its own before it starts.
            let owned = tree.clone();
            tokio::task::spawn_blocking(move || chown_tree(&owned, uid, gid))
                .await
                .map_err(|err| ImageError::Io {
                    action: "change owner of",
                    path: tree.clone(),
                    source: io::Error::other(err.to_string()),
                })??;
        }
        note(out, &format!("$ {line}"));
        let output = out.try_clone().map_err(|source| ImageError::Spawn {
            command: line.clone(),
            source,
        })?;
        let command = SetupCommand {
            program,
            args,
            cwd: tree.clone(),
            env: vec![
                (
                    "PATH".into(),
                    std::env::var_os("PATH")
                        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
                ),
                ("HOME".into(), home.into_os_string()),
            ],
            output,
            timeout: settings.setup_timeout,
        };
        let setup_started = std::time::Instant::now();
        let exit = self
            .images
            .inner
            .runner
            .run(command)
            .await
            .map_err(|source| ImageError::Spawn {
                command: line.clone(),
                source,
            })?;
        match exit {
            SetupExit::TimedOut => Err(ImageError::SetupTimedOut {
                command: seed::truncate(&line, 200),
                timeout_ms: u64::try_from(settings.setup_timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            exit if !exit.success() => Err(ImageError::SetupFailed {
                command: seed::truncate(&line, 200),
                status: exit.describe(),
            }),
            _ => {
                note(
                    out,
                    &format!(
                        "setup finished in {} ms",
                        setup_started.elapsed().as_millis()
                    ),
                );
                self.count(&tree).await
            }
        }
    }

    async fn count(&mut self, tree: &Path) -> Result<(), ImageError> {
        let tree = tree.to_owned();
        let (file_count, size_bytes) = tokio::task::spawn_blocking(move || count_tree(&tree))
            .await
            .map_err(|err| ImageError::Io {
                action: "count",
                path: PathBuf::new(),
                source: io::Error::other(err.to_string()),
            })??;
        self.info.file_count = file_count;
        self.info.size_bytes = size_bytes;
        Ok(())
    }

    /// Remove the scratch HOME, write `meta.json`, and rename the staging directory into place.
    async fn publish(&mut self, staging: &Path) -> Result<(), ImageError> {
        self.info.status = ImageStatus::Ready;
        let info = self.info.clone();
        let staging = staging.to_owned();
        let target = self.images.image_dir(&self.info);
        let owner = self.images.config().tree_owner;
        tokio::task::spawn_blocking(move || {
            let home = staging.join("home");
            std::fs::remove_dir_all(&home).map_err(io_error("remove", &home))?;
            if let Some((uid, gid)) = owner {
                chown_tree(&staging.join("tree"), uid, gid)?;
            }
            let meta = staging.join("meta.json");
            super::write_json_atomically(&meta, &info).map_err(io_error("write", &meta))?;
            std::fs::rename(&staging, &target).map_err(io_error("publish", &target))
        })
        .await
        .map_err(|err| ImageError::Io {
            action: "publish",
            path: PathBuf::new(),
            source: io::Error::other(err.to_string()),
        })?
    }

    /// Record the outcome: the table (retiring what the new image supersedes), the subscribers, the
    /// followers. Returns the retired images, whose files are still to be deleted.
    fn finish(&mut self) -> Vec<ImageInfo> {
        self.finished = true;
        let info = self.info.clone();
        let superseded = {
            let mut state = self.images.lock();
            let entry = state.repos.entry(info.repo.clone()).or_default();
            entry.building = None;
            if info.status == ImageStatus::Ready {
                entry.published.insert(0, info.clone());
                entry.latest.send_replace(Some(info.clone()));
                entry.failure.take()
            } else {
                entry.failure.replace(info.clone())
            }
        };
        let mut retired = self.images.select_retired(&info.repo);
        retired.extend(superseded);
        self.progress
            .send_modify(|progress| progress.outcome = Some(info));
        retired
    }
}

impl Drop for BuildTask {
    fn drop(&mut self) {
        if !self.finished {
            self.info.status = ImageStatus::Failed;
            self.info.error = Some("the build stopped unexpectedly".to_owned());
            self.info.finished_ms = Some(now_ms());
            self.images.persist(&self.info);
            for image in self.finish() {
                self.images.delete_files(&image);
            }
        }
    }
}

impl Images {
    /// Show the commit of a running build as soon as it is known.
    fn update_running(&self, info: &ImageInfo) {
        let mut state = self.lock();
        if let Some(running) = state
            .repos
            .get_mut(&info.repo)
            .and_then(|repo| repo.building.as_mut())
            .filter(|running| running.info.id == info.id)
        {
            running.info = info.clone();
        }
    }
}

/// Reads a log file as it grows, until the build ends.
struct LogFollower {
    file: tokio::fs::File,
    /// The build's progress while it runs; `None` for a finished build (read to the end, then stop).
    progress: Option<watch::Receiver<Progress>>,
    /// The build ended: read what is left, then stop.
    draining: bool,
}

impl LogFollower {
    async fn next(mut self) -> Option<(io::Result<Vec<u8>>, LogFollower)> {
        loop {
            let mut chunk = vec![0u8; LOG_CHUNK_BYTES];
            match self.file.read(&mut chunk).await {
                Ok(0) => {}
                Ok(n) => {
                    chunk.truncate(n);
                    return Some((Ok(chunk), self));
                }
                Err(err) => {
                    self.progress = None;
                    self.draining = true;
                    return Some((Err(err), self));
                }
            }
            if self.draining {
                return None;
            }
            let progress = self.progress.as_mut()?;
            if progress.borrow().outcome.is_some() {
                self.draining = true;
                continue;
            }
            // Woken by new output, the end, or the poll interval; an error: the build is gone.
            if let Ok(Err(_)) = tokio::time::timeout(LOG_POLL, progress.changed()).await {
                self.draining = true;
            }
        }
    }
}

/// Copy the setup's output from the pipe to the log file, up to `max_bytes`, telling followers.
fn collect_output(
    mut reader: io::PipeReader,
    mut log: File,
    progress: &watch::Sender<Progress>,
    max_bytes: u64,
) {
    let mut written: u64 = 0;
    let mut cut = false;
    let mut chunk = vec![0u8; LOG_CHUNK_BYTES];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::warn!(error = %err, "could not read setup output");
                return;
            }
        };
        if cut {
            continue; // keep draining so the setup never blocks on a full pipe
        }
        let room = usize::try_from(max_bytes.saturating_sub(written)).unwrap_or(usize::MAX);
        let data = chunk.get(..n.min(room)).unwrap_or_default();
        let mut appended = data.len() as u64;
        let mut result = log.write_all(data);
        if n > room {
            cut = true;
            let notice = format!("\n[log cut at {max_bytes} bytes]\n");
            result = result.and_then(|()| log.write_all(notice.as_bytes()));
            appended += notice.len() as u64;
        }
        if let Err(err) = result {
            tracing::warn!(error = %err, "could not write the build log");
            cut = true;
        }
        written += appended;
        progress.send_modify(|progress| progress.log_bytes = written);
    }
}

/// A line from the host into the build log.
fn note(out: &io::PipeWriter, line: &str) {
    let mut out = out;
    let _ = writeln!(out, "[nightshift] {line}");
}

/// The last `max_bytes` of the log, as text.
fn read_tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(io::SeekFrom::Start(length.saturating_sub(max_bytes)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "could not read the build log");
            String::new()
        }
    }
}

/// Give `root` and everything below it (never following symlinks) to `uid`:`gid`.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), ImageError> {
    let mut pending = vec![root.to_owned()];
    std::os::unix::fs::lchown(root, Some(uid), Some(gid))
        .map_err(io_error("change owner of", root))?;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            let path = entry.path();
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                .map_err(io_error("change owner of", &path))?;
            if entry
                .file_type()
                .map_err(io_error("inspect", &path))?
                .is_dir()
            {
                pending.push(path);
            }
        }
    }
    Ok(())
}

/// Files (everything but directories) and their total apparent size below `root`.
fn count_tree(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            let kind = entry
                .file_type()
                .map_err(io_error("inspect", &entry.path()))?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                files += 1;
                if kind.is_file() {
                    bytes += entry
                        .metadata()
                        .map_err(io_error("inspect", &entry.path()))?
                        .len();
                }
            }
        }
    }
    Ok((files, bytes))
}

/// A git command with a cleared environment and `home` as HOME.
fn git(home: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(seed::git_command());
    command.env("HOME", home).kill_on_drop(true);
    command
}

/// Run a git command; its stderr goes to the build log too. Returns its stdout, trimmed.
async fn run_git(
    mut command: tokio::process::Command,
    out: &io::PipeWriter,
    timeout: Duration,
) -> Result<String, ImageError> {
    let std_command = command.as_std();
    let line = seed::command_line(std_command.get_program(), std_command.get_args());
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(ImageError::Spawn {
                command: line,
                source,
            })
        }
        Err(_) => {
            return Err(ImageError::GitCommand {
                command: line,
                status: "timed out".to_owned(),
                stderr: String::new(),
            })
        }
    };
    if !output.stderr.is_empty() {
        let mut out = out;
        let _ = out.write_all(&output.stderr);
    }
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(ImageError::GitCommand {
            command: line,
            status: output.status.to_string(),
            stderr: seed::truncate(String::from_utf8_lossy(&output.stderr).trim(), 2000),
        })
    }
}

/// `branch` must exist in the bare repository.
async fn check_branch(repo: &RepoName, git_dir: &Path, branch: &str) -> Result<(), ImageError> {
    let exists = seed::branch_exists(git_dir, branch)
        .await
        .map_err(|source| ImageError::Spawn {
            command: "git rev-parse".to_owned(),
            source,
        })?;
    if exists {
        Ok(())
    } else {
        Err(ImageError::BranchNotFound {
            repo: repo.to_string(),
            branch: branch.to_owned(),
        })
    }
}

fn validate_setup(setup: Option<&str>) -> Result<Option<String>, ImageError> {
    match setup.map(str::trim) {
        None | Some("") => Ok(None),
        Some(setup) if setup.len() > MAX_SETUP_BYTES => Err(ImageError::InvalidField {
            field: "setup",
            reason: "longer than 8 KiB",
        }),
        Some(setup) if setup.contains('\0') => Err(ImageError::InvalidField {
            field: "setup",
            reason: "contains a NUL byte",
        }),
        Some(setup) => Ok(Some(setup.to_owned())),
    }
}

/// `<root>/<owner>/<name>`.
fn repo_dir(root: &Path, repo: &RepoName) -> PathBuf {
    root.join(repo.owner()).join(repo.name())
}

/// The `<root>/<owner>/<name>` directories whose names are valid repository names.
fn repo_dirs(root: &Path) -> Result<Vec<(RepoName, PathBuf)>, ImageError> {
    let mut found = Vec::new();
    for owner in std::fs::read_dir(root).map_err(io_error("read directory", root))? {
        let owner = owner.map_err(io_error("read directory", root))?;
        if !owner.file_type().is_ok_and(|kind| kind.is_dir()) {
            continue;
        }
        for name in std::fs::read_dir(owner.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let (Some(owner_name), Some(repo_name)) = (
                owner.file_name().to_str().map(str::to_owned),
                name.file_name().to_str().map(str::to_owned),
            ) else {
                continue;
            };
            if let Ok(repo) = RepoName::from_parts(&owner_name, &repo_name) {
                if name.file_type().is_ok_and(|kind| kind.is_dir()) {
                    found.push((repo, name.path()));
                }
            }
        }
    }
    Ok(found)
}

/// Whether `id` is an image id (16 lowercase hex digits), safe in a path.
pub fn is_image_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn status_name(status: ImageStatus) -> &'static str {
    match status {
        ImageStatus::Building => "building",
        ImageStatus::Ready => "ready",
        ImageStatus::Failed => "failed",
        ImageStatus::Missing => "missing",
    }
}

fn with_age(mut info: ImageInfo) -> ImageInfo {
    info.age_ms = now_ms().saturating_sub(info.created_ms);
    info
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::seed::{git_command, seed_repo};

    /// A git store with `demo/hello` and an image store over it, all in one temporary directory.
    pub(crate) struct Fixture {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) images: Images,
        settings: ImageSettings,
    }

    impl Fixture {
        pub(crate) fn new(settings: ImageSettings) -> Self {
            // tmpfs when there is one: the root filesystem here is slow for many small files.
            let dir =
                tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
            seed_repo(&dir.path().join("git"), "demo/hello", "main").unwrap();
            let images = open(dir.path(), settings.clone());
            let fixture = Fixture {
                dir,
                images,
                settings,
            };
            // The tests choose their own setups: start from a repository without one.
            fixture.remove("No setup", SETUP_SCRIPT);
            fixture
        }

        /// Commit the removal of `path`.
        pub(crate) fn remove(&self, message: &str, path: &str) {
            let work = tempfile::tempdir_in(self.dir.path()).unwrap();
            let clone = work.path().join("c");
            git(
                work.path(),
                &["clone", "--quiet", self.git_dir().to_str().unwrap(), "c"],
            );
            git(&clone, &["rm", "--quiet", path]);
            git(&clone, &["commit", "--quiet", "-m", message]);
            git(&clone, &["push", "--quiet", "origin", "main"]);
        }

        /// The same directories opened again, as after a restart.
        pub(crate) fn reopen(&self) -> Images {
            open(self.dir.path(), self.settings.clone())
        }

        pub(crate) fn git_dir(&self) -> PathBuf {
            self.dir.path().join("git/demo/hello.git")
        }

        pub(crate) fn trees(&self) -> PathBuf {
            self.dir.path().join("runtime/images/demo/hello")
        }

        pub(crate) fn records(&self) -> PathBuf {
            self.dir.path().join("images/demo/hello")
        }

        /// Commit `files` (path, contents; executable if the path ends in `.sh`) on `main`.
        pub(crate) fn commit(&self, message: &str, files: &[(&str, &str)]) {
            let work = tempfile::tempdir_in(self.dir.path()).unwrap();
            let clone = work.path().join("c");
            git(
                work.path(),
                &["clone", "--quiet", self.git_dir().to_str().unwrap(), "c"],
            );
            for (path, contents) in files {
                let path = clone.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, contents).unwrap();
                if path.extension().is_some_and(|e| e == "sh") {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                }
            }
            git(&clone, &["add", "--all"]);
            git(&clone, &["commit", "--quiet", "-m", message]);
            git(&clone, &["push", "--quiet", "origin", "main"]);
        }

        pub(crate) async fn build_ok(&self, setup: Option<&str>) -> ImageInfo {
            let build = self.images.build("demo/hello", None, setup).await.unwrap();
            let info = build.finished().await;
            assert_eq!(info.status, ImageStatus::Ready, "{info:#?}");
            info
        }
    }

    fn open(dir: &Path, settings: ImageSettings) -> Images {
        Images::open(
            ImagesConfig {
                git_root: dir.join("git"),
                trees_root: dir.join("runtime/images"),
                records_root: dir.join("images"),
                base_url: "http://127.0.0.1:9".to_owned(),
                settings,
                tree_owner: None,
            },
            Arc::new(ProcessRunner),
        )
        .unwrap()
    }

    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let output = git_command().current_dir(dir).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    const SETUP_SCRIPT_TEXT: &str = "#!/bin/sh\n\
        set -e\n\
        echo \"setup says hi\"\n\
        env | cut -d= -f1 | sort > setup-env.txt\n\
        echo \"$HOME\" > setup-home.txt\n\
        mkdir -p \"$HOME/cache\" && echo cached > \"$HOME/cache/x\"\n\
        echo built > built.txt\n";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn builds_a_full_history_image_after_the_repository_setup() {
        let fixture = Fixture::new(ImageSettings::default());
        fixture.commit("Second", &[("notes.txt", "two\n")]);
        fixture.commit("Add setup", &[(SETUP_SCRIPT, SETUP_SCRIPT_TEXT)]);
        let mut published = fixture.images.subscribe("demo/hello");
        assert!(published.borrow().is_none());

        let build = fixture
            .images
            .build("demo/hello", Some("main"), Some("touch request-setup-ran"))
            .await
            .unwrap();
        assert_eq!(build.info().status, ImageStatus::Building);
        assert!(is_image_id(&build.info().id));
        let id = build.info().id.clone();
        let info = build.finished().await;
        assert_eq!(info.status, ImageStatus::Ready, "{info:#?}");
        assert_eq!(info.id, id);

        let tree = fixture.images.tree_path(&info);
        assert_eq!(tree, fixture.trees().join(&id).join("tree"));
        // Full history, the branch checked out at the recorded commit, the host as origin.
        assert_eq!(git(&tree, &["rev-list", "--count", "HEAD"]), "4");
        assert_eq!(git(&tree, &["rev-parse", "HEAD"]), info.commit);
        assert_eq!(git(&fixture.git_dir(), &["rev-parse", "main"]), info.commit);
        assert_eq!(git(&tree, &["branch", "--show-current"]), "main");
        assert_eq!(
            git(&tree, &["remote", "get-url", "origin"]),
            "http://127.0.0.1:9/git/demo/hello.git"
        );
        assert_eq!(git(&tree, &["rev-parse", "origin/main"]), info.commit);
        // The repository's script ran (and won over the request's command), in the tree, with a
        // cleared environment and a scratch HOME that was not published.
        assert_eq!(
            std::fs::read_to_string(tree.join("built.txt")).unwrap(),
            "built\n"
        );
        assert!(!tree.join("request-setup-ran").exists());
        let env = std::fs::read_to_string(tree.join("setup-env.txt")).unwrap();
        let env: Vec<&str> = env
            .lines()
            .filter(|name| !["PWD", "OLDPWD", "SHLVL", "_"].contains(name))
            .collect();
        assert_eq!(env, ["HOME", "PATH"]);
        let home = std::fs::read_to_string(tree.join("setup-home.txt")).unwrap();
        assert!(home.contains(".staging-"), "{home}");
        assert!(!Path::new(home.trim()).exists());
        assert_eq!(names_in(&fixture.trees().join(&id)), ["meta.json", "tree"]);
        assert_eq!(names_in(&fixture.trees()), [id.as_str()]);

        // Recorded beside the tree and in the data directory, with the log's tail.
        assert!(
            info.setup_log.contains("setup says hi"),
            "{}",
            info.setup_log
        );
        assert!(
            info.setup_log.contains("$ ./.nightshift/setup.sh"),
            "{}",
            info.setup_log
        );
        assert!(info.file_count > 10 && info.size_bytes > 1000, "{info:#?}");
        assert!(info.finished_ms.unwrap() >= info.created_ms);
        let meta: ImageInfo = serde_json::from_slice(
            &std::fs::read(fixture.trees().join(&id).join("meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta, info);
        let record: ImageInfo = serde_json::from_slice(
            &std::fs::read(fixture.records().join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(record, info);
        let log = std::fs::read_to_string(fixture.records().join(format!("{id}.log"))).unwrap();
        assert!(
            log.ends_with("[nightshift] build succeeded; publishing\n"),
            "{log}"
        );

        assert_eq!(fixture.images.latest("demo/hello").unwrap().id, id);
        assert_eq!(published.borrow_and_update().as_ref().unwrap().id, id);
        let list = fixture.images.list("demo/hello");
        assert_eq!(list.images.len(), 1);
        assert!(list.building.is_none() && list.latest_failure.is_none());
        assert_eq!(fixture.images.get(&id).unwrap().commit, info.commit);
        assert!(fixture.images.latest("demo/other").is_none());

        // The request's command runs when the repository has no script; none at all is fine too.
        let plain = Fixture::new(ImageSettings::default());
        let info = plain
            .build_ok(Some("echo from-request > request.txt"))
            .await;
        let tree = plain.images.tree_path(&info);
        assert!(tree.join("request.txt").is_file());
        assert_eq!(git(&tree, &["rev-list", "--count", "HEAD"]), "2");
        let info = plain.build_ok(None).await;
        assert!(info.setup_log.contains("no setup"), "{}", info.setup_log);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_setup_publishes_nothing_and_is_recorded() {
        let fixture = Fixture::new(ImageSettings::default());
        let build = fixture
            .images
            .build(
                "demo/hello",
                None,
                Some("echo preparing; echo broken >&2; exit 3"),
            )
            .await
            .unwrap();
        let id = build.info().id.clone();
        let failed = build.finished().await;
        assert_eq!(failed.status, ImageStatus::Failed);
        assert!(
            failed.error.as_deref().unwrap().contains("exit code 3"),
            "{failed:#?}"
        );
        assert!(
            failed.setup_log.contains("preparing\n"),
            "{}",
            failed.setup_log
        );
        assert!(
            failed.setup_log.contains("broken\n"),
            "{}",
            failed.setup_log
        );
        // Nothing published, nothing staged.
        assert_eq!(names_in(&fixture.trees()), Vec::<String>::new());
        assert!(fixture.images.latest("demo/hello").is_none());
        assert!(fixture.images.lease(&id).is_err());
        let list = fixture.images.list("demo/hello");
        assert!(list.images.is_empty());
        assert_eq!(list.latest_failure.as_ref().unwrap().id, id);
        let record: ImageInfo = serde_json::from_slice(
            &std::fs::read(fixture.records().join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(record, failed);

        // A failing clone is a failure too (a branch deleted after the request was accepted is the
        // realistic case; a missing branch is refused up front).
        assert!(matches!(
            fixture.images.build("demo/hello", Some("gone"), None).await,
            Err(ImageError::BranchNotFound { .. })
        ));

        // A later success clears the failure and its files.
        let ok = fixture.build_ok(None).await;
        let list = fixture.images.list("demo/hello");
        assert!(list.latest_failure.is_none());
        gone_soon(&fixture.records().join(format!("{id}.log"))).await;
        assert_eq!(list.images.len(), 1);
        assert_eq!(
            names_in(&fixture.records()),
            [format!("{}.json", ok.id), format!("{}.log", ok.id)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_setup_over_its_time_limit_is_killed_and_fails() {
        let fixture = Fixture::new(ImageSettings {
            setup_timeout: Duration::from_millis(300),
            ..ImageSettings::default()
        });
        let started = std::time::Instant::now();
        let build = fixture
            .images
            .build("demo/hello", None, Some("echo start; sleep 30 & sleep 30"))
            .await
            .unwrap();
        let failed = build.finished().await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(failed.status, ImageStatus::Failed);
        assert!(
            failed
                .error
                .as_deref()
                .unwrap()
                .contains("timed out after 300 ms"),
            "{failed:#?}"
        );
        assert!(failed.setup_log.contains("start\n"), "{}", failed.setup_log);
        assert_eq!(names_in(&fixture.trees()), Vec::<String>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_build() {
        let fixture = Fixture::new(ImageSettings::default());
        let (first, second) = tokio::join!(
            fixture.images.build("demo/hello", None, Some("sleep 0.3")),
            fixture.images.build("demo/hello", None, Some("echo other")),
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.info().id, second.info().id);
        let third = fixture
            .images
            .build("demo/hello", None, None)
            .await
            .unwrap();
        assert_eq!(third.info().id, first.info().id);
        let (a, b) = tokio::join!(first.finished(), second.finished());
        assert_eq!(a, b);
        assert_eq!(a.status, ImageStatus::Ready);
        assert_eq!(fixture.images.list("demo/hello").images.len(), 1);
        assert_eq!(names_in(&fixture.trees()), [a.id.as_str()]);
        // Once it ended, a new request is a new build.
        let next = fixture.build_ok(None).await;
        assert_ne!(next.id, a.id);
    }

    /// Wait until `path` is gone (retirement after a lease runs in the background).
    async fn gone_soon(path: &Path) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} still exists",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_the_newest_the_pinned_and_the_leased() {
        let fixture = Fixture::new(ImageSettings {
            keep_per_repo: 2,
            ..ImageSettings::default()
        });
        let a = fixture.build_ok(None).await;
        fixture.images.pin(&a.id);
        let b = fixture.build_ok(None).await;
        let lease = fixture.images.lease(&b.id).unwrap();
        assert_eq!(lease.tree_path(), fixture.images.tree_path(&b));
        let c = fixture.build_ok(None).await;
        let d = fixture.build_ok(None).await;
        let ids = |images: &Images| -> Vec<String> {
            images
                .list("demo/hello")
                .images
                .into_iter()
                .map(|i| i.id)
                .collect()
        };
        // Newest first; b is held by a lease, a by a snapshot.
        assert_eq!(ids(&fixture.images), [d.id.as_str(), &c.id, &b.id, &a.id]);
        let mut expected = vec![a.id.clone(), b.id.clone(), c.id.clone(), d.id.clone()];
        expected.sort();
        assert_eq!(names_in(&fixture.trees()), expected);

        drop(lease);
        gone_soon(&fixture.trees().join(&b.id)).await;
        assert!(!fixture.records().join(format!("{}.json", b.id)).exists());
        assert!(!fixture.records().join(format!("{}.log", b.id)).exists());
        assert_eq!(ids(&fixture.images), [d.id.as_str(), &c.id, &a.id]);

        let e = fixture.build_ok(None).await;
        assert_eq!(ids(&fixture.images), [e.id.as_str(), &d.id, &a.id]);
        gone_soon(&fixture.trees().join(&c.id)).await;
        assert!(fixture.images.tree_path(&a).is_dir());
        assert!(fixture.images.get(&c.id).is_none());
        assert!(matches!(
            fixture.images.lease(&c.id),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_streams_while_the_setup_runs() {
        let fixture = Fixture::new(ImageSettings::default());
        let gate = fixture.dir.path().join("gate");
        let setup = format!(
            "x=line; echo first-$x; while [ ! -e {} ]; do sleep 0.02; done; echo last-$x",
            gate.display()
        );
        let build = fixture
            .images
            .build("demo/hello", None, Some(&setup))
            .await
            .unwrap();
        let id = build.info().id.clone();
        let stream = fixture.images.follow_log(&id).unwrap();
        let mut stream = std::pin::pin!(stream);
        let mut seen = String::new();
        let read_first = async {
            while !seen.contains("first-line") {
                let chunk = futures_util::StreamExt::next(&mut stream)
                    .await
                    .unwrap()
                    .unwrap();
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read_first)
            .await
            .expect("the first line arrives while the setup still runs");
        // The setup is still waiting for the gate: the build is running.
        assert_eq!(
            fixture.images.get(&id).unwrap().status,
            ImageStatus::Building
        );
        assert_eq!(fixture.images.list("demo/hello").building.unwrap().id, id);
        assert!(!seen.contains("last-line"));
        std::fs::write(&gate, "").unwrap();
        let rest = async {
            while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), rest)
            .await
            .expect("the stream ends with the build");
        assert!(seen.contains("last-line\n"), "{seen}");
        assert!(
            seen.ends_with("[nightshift] build succeeded; publishing\n"),
            "{seen}"
        );
        let info = build.finished().await;
        assert_eq!(info.status, ImageStatus::Ready);

        // A finished build's log is read to its end.
        let whole: Vec<u8> =
            futures_util::StreamExt::collect::<Vec<_>>(fixture.images.follow_log(&id).unwrap())
                .await
                .into_iter()
                .flat_map(Result::unwrap)
                .collect();
        assert_eq!(String::from_utf8(whole).unwrap(), seen);
        assert!(matches!(
            fixture.images.follow_log("0000000000000000"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_reads_images_back_and_marks_lost_trees_missing() {
        let fixture = Fixture::new(ImageSettings::default());
        let ready = fixture.build_ok(None).await;
        // Leftovers of a crash: a staging directory and a record of a build that never ended.
        std::fs::create_dir_all(fixture.trees().join(".staging-00000000000000aa/tree")).unwrap();
        let mut interrupted = ready.clone();
        interrupted.id = "00000000000000bb".to_owned();
        interrupted.status = ImageStatus::Building;
        interrupted.created_ms = ready.created_ms + 1;
        std::fs::write(
            fixture.records().join("00000000000000bb.json"),
            serde_json::to_vec(&interrupted).unwrap(),
        )
        .unwrap();

        let again = fixture.reopen();
        assert_eq!(again.latest("demo/hello").unwrap().id, ready.id);
        let failure = again.list("demo/hello").latest_failure.unwrap();
        assert_eq!(failure.id, "00000000000000bb");
        assert_eq!(failure.status, ImageStatus::Failed);
        assert!(failure.error.unwrap().contains("interrupted"));
        assert_eq!(names_in(&fixture.trees()), [ready.id.as_str()]);

        // The tmpfs tree is gone (a reboot): the image is missing, never used, and rebuilt on demand.
        std::fs::remove_dir_all(fixture.trees().join(&ready.id)).unwrap();
        let rebooted = fixture.reopen();
        assert!(rebooted.latest("demo/hello").is_none());
        let listed = rebooted.list("demo/hello");
        assert_eq!(listed.images.len(), 1);
        assert_eq!(listed.images[0].status, ImageStatus::Missing);
        assert!(matches!(
            rebooted.lease(&ready.id),
            Err(ImageError::NotReady {
                status: "missing",
                ..
            })
        ));
        let rebuilt = rebooted
            .build("demo/hello", None, None)
            .await
            .unwrap()
            .finished()
            .await;
        assert_eq!(rebuilt.status, ImageStatus::Ready);
        assert_eq!(rebooted.latest("demo/hello").unwrap().id, rebuilt.id);
        assert_eq!(rebuilt.commit, ready.commit);
        assert!(rebooted.list("demo/hello").latest_failure.is_none());
        // The missing one is retired once a newer image exists (it is not pinned by a snapshot).
        assert!(rebooted.get(&ready.id).is_none());
        assert_eq!(rebooted.list("demo/hello").images.len(), 1);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_anything_runs() {
        let fixture = Fixture::new(ImageSettings::default());
        let images = &fixture.images;
        assert!(matches!(
            images.build("../x", None, None).await,
            Err(ImageError::Name(_))
        ));
        assert!(matches!(
            images
                .build("demo/hello", Some("--upload-pack=x"), None)
                .await,
            Err(ImageError::Name(_))
        ));
        assert!(matches!(
            images.build("demo/nothing", None, None).await,
            Err(ImageError::RepoNotFound { .. })
        ));
        assert!(matches!(
            images.build("demo/hello", Some("nope"), None).await,
            Err(ImageError::BranchNotFound { .. })
        ));
        assert!(matches!(
            images.build("demo/hello", None, Some("a\0b")).await,
            Err(ImageError::InvalidField { field: "setup", .. })
        ));
        let long = "x".repeat(MAX_SETUP_BYTES + 1);
        assert!(matches!(
            images.build("demo/hello", None, Some(&long)).await,
            Err(ImageError::InvalidField { field: "setup", .. })
        ));
        assert!(images.list("demo/hello").images.is_empty());
        assert_eq!(names_in(&fixture.records()), Vec::<String>::new());
    }
}

//! `sandbox-agent host`: the local sandbox provider. One process serves, on one loopback address:
//!
//! - `POST /v1/sandboxes`, `GET /v1/sandboxes`, `GET /v1/sandboxes/{id}`, `DELETE
//!   /v1/sandboxes/{id}`, `POST /v1/sandboxes/{id}/snapshot`, `POST /v1/images`, `GET
//!   /v1/images?repo=`, `GET /v1/images/{id}`, `GET /v1/images/{id}/log`, `POST
//!   /v1/pools/{owner}/{name}`, `GET /v1/pools`: the provider API ([`api`]), behind the provider
//!   token.
//! - `GET|POST /git/{owner}/{name}.git/…`: the git store over smart HTTP ([`git_http`]); no auth.
//! - `POST /scripted-model/v1/messages` and `POST /scripted-model/v1/chat/completions`: the demo
//!   model ([`crate::scripted_model`]) as Anthropic and as OpenAI-compatible API; no auth.
//! - `GET /healthz`: liveness.
//!
//! A sandbox is a checkout of the repository whose `origin` is this host (over smart HTTP, so the agent
//! fetches and pushes back the same way) and a `sandbox-agent run` process ([`sandbox`]). Where this
//! host can ([`isolation`]: root, overlayfs and bubblewrap, checked at startup), the workspace is an
//! overlay on tmpfs over the repository's latest image (no clone; a fresh clone only while the
//! repository has no image) and the agent runs under bubblewrap as
//! an unprivileged uid with its own user, pid, mount and network namespaces, within memory and process
//! limits ([`cgroup`]); its only way out is this host's per-sandbox egress proxy ([`egress`]), which lets
//! through the session's Worker, the model and this host, and refuses (and records) everything else.
//! Elsewhere (a laptop without root) the host says so once and runs each agent as a plain child
//! process with a cleared environment in its own process group, on a clone in the data directory.
//!
//! Warm pools ([`pool`], [`warm`]; isolated hosts only): per repository, sandboxes prepared ahead
//! (overlay on the latest image, base branch caught up), so `POST /v1/sandboxes` only starts the agent
//! in one; sized by demand and `POST /v1/pools/{repo}`, at most `--pool-max` each, shrinking again
//! when demand fades; retired when a newer image is published, released at shutdown.
//!
//! Images ([`image`]) are full-history clones after the repository's setup (run, where the host
//! isolates sandboxes, inside the same isolation: [`isolation::setup`]), published on tmpfs
//! under the runtime directory; snapshots ([`snapshot`]) are a sandbox's overlay upper directory as
//! a content-addressed `tar.zst`, restorable only onto the image they name.
//!
//! The data directory:
//! ```text
//! <data-dir>/git/<owner>/<name>.git        bare repositories (`sandbox-agent seed --store <data-dir>/git`)
//! <data-dir>/sandboxes/<id>/agent.log      the agent's stdout and stderr (kept after the sandbox ends)
//! <data-dir>/sandboxes/<id>/workspace/     the workspace: without isolation the clone (and the
//!                                          directory above is the sandbox's HOME); with isolation a
//!                                          symlink to the overlay, removed when the sandbox ends
//! <data-dir>/images/<owner>/<name>/<id>.json   an image's record (also failed builds)
//! <data-dir>/images/<owner>/<name>/<id>.log    its build log
//! <data-dir>/snapshots/<sha256>.tar.zst    a snapshot (the id is the archive's SHA-256)
//! <data-dir>/snapshots/<sha256>.json       its record
//! ```
//!
//! The runtime directory (tmpfs; default `/dev/shm/nightshift-host-<8 hex of the data dir>`):
//! ```text
//! <runtime>/images/<owner>/<name>/<id>/tree        a published image (lower of sandboxes; owned by
//!                                                  the sandbox uid with isolation)
//! <runtime>/images/<owner>/<name>/<id>/meta.json   its record
//! <runtime>/images/<owner>/<name>/.staging-<id>/   a build in progress
//! <runtime>/sandboxes/<id>/                        an isolated sandbox, running or warm (see
//!                                                  [`isolation`]; a warm one has no agent yet)
//! ```
//! and, with isolation, the runtime directory (`--runtime-dir`, default
//! `/dev/shm/nightshift-host-<hash of the data dir>`), whose layout [`isolation`] describes; a
//! sandbox's part of it is removed when the sandbox ends.
//!
//! Invariant: every repository name from a request passes [`crate::seed::RepoName`] before it
//! touches the filesystem or a git command line.
//! Invariant: neither the provider token nor a model key is logged; a child sees only the variables
//! [`sandbox::agent_env`] lists (the provider token never).
//! Invariant: an isolated sandbox never runs as host root, sees none of the host's files but its
//! system directories, and reaches nothing but its allow-list.

mod api;
pub mod cgroup;
pub mod egress;
mod git_http;
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "leases, restore and subscriptions are for the overlay launcher and the pools"
    )
)]
mod image;
pub mod isolation;
mod pool;
mod sandbox;
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "restore is for the overlay launcher")
)]
mod snapshot;
#[cfg(test)]
mod tests;
mod warm;

use std::fmt;
use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use axum::Router;

use crate::env;
use crate::seed::SeedError;
use egress::EgressError;
use isolation::{Isolation, IsolationConfig};

/// How long in-flight requests may take to finish after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `sandbox-agent host`.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Address to listen on. `/git` and `/scripted-model` have no authentication: keep it on
    /// loopback.
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: SocketAddr,
    /// Directory of the git store (`git/`) and the sandboxes (`sandboxes/`); created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// URL at which sandboxes reach this host (their git remote, the demo model). Default:
    /// `http://LISTEN`.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Program started as `AGENT_BIN run` in each sandbox. Default: this executable.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// `auto`: isolate sandboxes when this machine can (root, overlayfs, bubblewrap), otherwise say so
    /// and run them as plain processes; `off`: always plain processes.
    #[arg(long, value_enum, default_value_t = IsolationMode::Auto)]
    pub isolation: IsolationMode,
    /// Where running isolated sandboxes live (a tmpfs). Default:
    /// `/dev/shm/nightshift-host-<8 hex of a hash of the data dir>`.
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Host uid isolated sandboxes run as (root inside them).
    #[arg(long, default_value_t = isolation::DEFAULT_SANDBOX_UID)]
    pub sandbox_uid: u32,
    /// Host gid isolated sandboxes run as.
    #[arg(long, default_value_t = isolation::DEFAULT_SANDBOX_UID)]
    pub sandbox_gid: u32,
    /// Memory limit of each isolated sandbox.
    #[arg(long, default_value_t = isolation::DEFAULT_MEMORY_LIMIT_BYTES)]
    pub memory_limit_bytes: u64,
    /// Process and thread limit of each isolated sandbox.
    #[arg(long, default_value_t = isolation::DEFAULT_PIDS_LIMIT)]
    pub pids_limit: u64,
    /// Most warm sandboxes a repository's pool keeps (ready plus being prepared); isolated hosts only.
    #[arg(long, env = env::POOL_MAX, default_value_t = DEFAULT_POOL_MAX)]
    pub pool_max: usize,
    /// A URL (`https://registry.npmjs.org`) whose host and port image setups may reach through their
    /// egress proxy; repeatable. None by default: setups of isolated hosts have no network.
    #[arg(long = "setup-allow", value_name = "URL")]
    pub setup_allow: Vec<String>,
}

/// Default `--pool-max`.
pub const DEFAULT_POOL_MAX: usize = 8;

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IsolationMode {
    /// Isolate when the machine can; say so when it cannot.
    Auto,
    /// Never isolate.
    Off,
}

/// Everything the host needs, resolved (no environment lookups after this).
#[derive(Clone)]
pub struct HostConfig {
    /// Root of `git/`, `sandboxes/`, `images/` (records) and `snapshots/`.
    pub data_dir: PathBuf,
    /// Root of what lives on tmpfs: `images/` (trees).
    pub runtime_dir: PathBuf,
    /// URL at which sandboxes reach this host; `None`: `http://` + the listener's address.
    pub public_url: Option<String>,
    /// Program started as `<agent_bin> run`.
    pub agent_bin: PathBuf,
    /// Bearer token required on `/v1/*`. Never logged.
    pub provider_token: String,
    /// The model the agents use.
    pub model: ModelConfig,
    /// `NIGHTSHIFT_LOG` given to agents.
    pub agent_log_filter: String,
    /// How to isolate sandboxes; `None`: never (plain child processes, no check at startup).
    pub isolation: Option<IsolationConfig>,
    /// Called when a sandbox reaches its wall-clock deadline, before it is stopped.
    pub on_deadline: Option<sandbox::DeadlineHook>,
    /// Most warm sandboxes per repository (`--pool-max`).
    pub pool_max: usize,
}

/// The model agents talk to: the Anthropic API when a key is set, otherwise this host's scripted
/// demo model.
#[derive(Clone, Default)]
pub struct ModelConfig {
    /// `ANTHROPIC_API_KEY`. Never logged.
    pub api_key: Option<String>,
    /// `ANTHROPIC_BASE_URL`, passed on only together with a key.
    pub base_url: Option<String>,
    /// `OPENAI_API_KEY`, passed on when set. Never logged.
    pub openai_api_key: Option<String>,
    /// `OPENAI_BASE_URL` of an OpenAI-compatible server (Ollama, vLLM, llama.cpp), passed on when set.
    pub openai_base_url: Option<String>,
}

impl fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostConfig")
            .field("data_dir", &self.data_dir)
            .field("runtime_dir", &self.runtime_dir)
            .field("public_url", &self.public_url)
            .field("agent_bin", &self.agent_bin)
            .field("provider_token", &"<redacted>")
            .field("model", &self.model)
            .field("agent_log_filter", &self.agent_log_filter)
            .field("isolation", &self.isolation)
            .field("on_deadline", &self.on_deadline.as_ref().map(|_| "<hook>"))
            .field("pool_max", &self.pool_max)
            .finish()
    }
}

impl fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("base_url", &self.base_url)
            .field(
                "openai_api_key",
                &self.openai_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("openai_base_url", &self.openai_base_url)
            .finish()
    }
}

/// Everything that can go wrong in the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A repository or branch name that is not acceptable (from [`crate::seed`]'s validators).
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
    /// No sandbox with this id.
    #[error("sandbox {id} not found")]
    SandboxNotFound {
        /// The id asked for.
        id: String,
    },
    /// The sandbox has no overlay upper directory over an image, so it has no delta to snapshot.
    #[error("sandbox {id} is not an overlay over an image")]
    NotAnOverlay {
        /// The sandbox.
        id: String,
    },
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A git command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    GitCommand {
        /// The command line (no secrets: URLs carry no credentials).
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A program could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A filesystem operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A task of the host could not be set up or died before finishing (a panic in it).
    #[error("{what} did not finish: {reason}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// Why it did not finish.
        reason: String,
    },
    /// The HTTP server failed.
    #[error("http server failed: {source}")]
    Serve {
        /// The cause.
        source: std::io::Error,
    },
    /// A mount or unmount failed.
    #[error("could not {action} {path}: {source}")]
    Mount {
        /// What was being done.
        action: &'static str,
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A path that cannot go into mount options.
    #[error("cannot mount {path}: {reason}")]
    InvalidMountPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Cgroups cannot be used as needed.
    #[error("cgroup {path}: {reason}")]
    Cgroup {
        /// The hierarchy or cgroup.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Sandboxes cannot be isolated on this machine.
    #[error("sandbox isolation is not available: {reason}")]
    IsolationUnavailable {
        /// Why.
        reason: String,
    },
    /// The egress proxy failed.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// Warm pools need isolated sandboxes.
    #[error("warm pools need isolated sandboxes (overlayfs), which this host does not have")]
    PoolsUnavailable,
}

/// Write `value` as pretty JSON to `path` through a temporary file beside it and a rename, so a
/// reader never sees half a record.
fn write_json_atomically<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", hex::encode(rand::random::<[u8; 4]>())));
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

/// Create `dir` (and its parents) and make it 0700.
fn create_private_dir(dir: &Path) -> Result<(), HostError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("create directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("restrict", dir))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostError {
    let path = path.to_owned();
    move |source| HostError::Io {
        action,
        path,
        source,
    }
}

/// The shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    config: HostConfig,
    /// `public_url` without a trailing slash.
    base_url: String,
    /// `<data-dir>/git`, absolute.
    git_root: PathBuf,
    /// `<data-dir>/sandboxes`, absolute.
    sandboxes_root: PathBuf,
    sandboxes: sandbox::Sandboxes,
    images: image::Images,
    snapshots: snapshot::Snapshots,
    /// `None`: sandboxes are plain child processes.
    isolation: Option<Isolation>,
    /// The warm pools (used only with isolation).
    warm: warm::WarmPools,
    /// For calls to sessions (a sandbox's end is reported to its session).
    http: reqwest::Client,
}

/// The warm pools' bounds: at most `--pool-max` each; demand counted over the isolation's window.
fn pool_config(config: &HostConfig) -> pool::PoolConfig {
    let window_ms = config
        .isolation
        .as_ref()
        .map_or(pool::DEFAULT_WINDOW_MS, |isolation| {
            isolation.pool_window_ms
        });
    pool::PoolConfig {
        max: config.pool_max,
        window_ms,
        request_ttl_ms: window_ms,
        ..pool::PoolConfig::default()
    }
}

/// How image setups run: inside sandbox isolation when the host has it, otherwise as plain processes.
fn setup_runner(
    config: &HostConfig,
    isolation: Option<&Isolation>,
) -> Result<Arc<dyn image::SetupRunner>, HostError> {
    let Some(isolation) = isolation else {
        return Ok(Arc::new(image::ProcessRunner));
    };
    let mut allow = egress::AllowList::default();
    for url in &isolation.config().setup_allow {
        allow.allow_url(url)?;
    }
    tracing::info!(allow = ?allow.targets(), "image setups run isolated; their egress allow-list");
    Ok(Arc::new(isolation::setup::IsolatedRunner::new(
        isolation.clone(),
        &config.agent_bin,
        allow,
    )))
}

/// Create the data directory if needed; its canonical path.
fn canonical_data_dir(config: &HostConfig) -> Result<PathBuf, HostError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(io_error("create directory", &config.data_dir))?;
    config
        .data_dir
        .canonicalize()
        .map_err(io_error("resolve", &config.data_dir))
}

impl AppState {
    /// [`AppState::start`] without isolation (nothing to check, so not async).
    #[cfg(test)]
    pub fn new(config: HostConfig, base_url: &str) -> Result<Self, HostError> {
        let data_dir = canonical_data_dir(&config)?;
        Self::assemble(config, base_url, &data_dir, None)
    }

    /// Create the data directory layout and the (empty) sandbox table, and find out whether sandboxes
    /// can be isolated here (when `config.isolation` asks for it): when they cannot, say why, once, as
    /// a warning, and run them as plain processes. `base_url` is where sandboxes reach this host, e.g.
    /// `http://127.0.0.1:8788`.
    pub async fn start(config: HostConfig, base_url: &str) -> Result<Self, HostError> {
        let data_dir = canonical_data_dir(&config)?;
        let isolation = match &config.isolation {
            None => None,
            Some(settings) => match Isolation::detect(settings, &data_dir, &config.agent_bin).await
            {
                Ok(isolation) => {
                    let (uid, gid) = isolation.sandbox_ids();
                    tracing::info!(
                        runtime_dir = %isolation.runtime_dir().display(),
                        uid,
                        gid,
                        limits = %isolation.describe_limits(),
                        "sandboxes are isolated: overlayfs + bubblewrap, egress through the host's proxy"
                    );
                    Some(isolation)
                }
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "sandboxes are NOT isolated: agents run as plain processes on this machine, \
                         with the host's filesystem and network"
                    );
                    None
                }
            },
        };
        Self::assemble(config, base_url, &data_dir, isolation)
    }

    fn assemble(
        config: HostConfig,
        base_url: &str,
        data_dir: &Path,
        isolation: Option<Isolation>,
    ) -> Result<Self, HostError> {
        let git_root = data_dir.join("git");
        let sandboxes_root = data_dir.join("sandboxes");
        for dir in [&git_root, &sandboxes_root] {
            std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        }
        // With isolation the runtime directory is already made (root:<sandbox gid>, 0710, so bubblewrap
        // can reach its bind sources); images stay private either way.
        if isolation.is_none() {
            create_private_dir(&config.runtime_dir)?;
        }
        create_private_dir(&config.runtime_dir.join("images"))?;
        let runtime_dir = config
            .runtime_dir
            .canonicalize()
            .map_err(io_error("resolve", &config.runtime_dir))?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        let images = image::Images::open(
            image::ImagesConfig {
                git_root: git_root.clone(),
                trees_root: runtime_dir.join("images"),
                records_root: data_dir.join("images"),
                base_url: base_url.clone(),
                settings: image::ImageSettings::default(),
                tree_owner: isolation.as_ref().map(Isolation::sandbox_ids),
            },
            setup_runner(&config, isolation.as_ref())?,
        )?;
        // Before any build: the images snapshots name are pinned, so retirement never takes them.
        let snapshots = snapshot::Snapshots::open(&data_dir.join("snapshots"), images.clone())?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|error| HostError::Task {
                what: "creating the HTTP client",
                reason: error.to_string(),
            })?;
        Ok(AppState {
            inner: Arc::new(Shared {
                base_url,
                git_root,
                sandboxes_root,
                sandboxes: Default::default(),
                images,
                warm: warm::WarmPools::new(pool_config(&config)),
                config,
                snapshots,
                isolation,
                http,
            }),
        })
    }

    /// The images of this host.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "for the overlay launcher and the pools")
    )]
    pub fn images(&self) -> &image::Images {
        &self.inner.images
    }

    /// The snapshots of this host.
    #[cfg_attr(not(test), expect(dead_code, reason = "for the overlay launcher"))]
    pub fn snapshots(&self) -> &snapshot::Snapshots {
        &self.inner.snapshots
    }

    /// The git store, `<data-dir>/git`.
    pub fn git_root(&self) -> &Path {
        &self.inner.git_root
    }

    /// How sandboxes are isolated, or `None` when they run as plain processes.
    pub fn isolation(&self) -> Option<&Isolation> {
        self.inner.isolation.as_ref()
    }

    /// Stop every running sandbox (SIGTERM to its process group, SIGKILL after a grace period).
    pub async fn stop_all(&self) {
        warm::release_all(self).await;
        sandbox::stop_all(self).await;
    }
}

/// The whole HTTP surface of the host.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/v1", api::router(state.clone()))
        .route(
            "/git/{owner}/{repo}/{*path}",
            get(git_http::serve).post(git_http::serve),
        )
        .nest_service("/scripted-model", crate::scripted_model::router())
        .with_state(state)
        .layer(axum::middleware::from_fn(log_provider_request))
}

/// One log line per provider API request, answered or not (`POST /v1/pools/demo/hello -> 404`): method,
/// path and status only (never headers, query or body, so no token). Git and model traffic is not logged.
async fn log_provider_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if path.starts_with("/v1/") {
        tracing::info!("{method} {path} -> {}", response.status().as_u16());
    }
    response
}

/// Serve the host on `listener` until `shutdown` completes; then stop every sandbox, give in-flight
/// requests a few seconds, and return.
pub async fn serve(
    config: HostConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HostError> {
    let address = listener
        .local_addr()
        .map_err(|source| HostError::Serve { source })?;
    let base_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{address}"));
    let state = AppState::start(config, &base_url).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Streamed model output and git traffic are many small writes: no Nagle delay.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    let server = axum::serve(
        listener,
        app(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    })
    .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => {
            state.stop_all().await;
            result.map_err(|source| HostError::Serve { source })
        }
        () = shutdown => {
            tracing::info!("shutting down: stopping sandboxes");
            state.stop_all().await;
            if let Some(isolation) = state.isolation() {
                isolation.remove_runtime_dir_if_empty();
            }
            let _ = stop_tx.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result.map_err(|source| HostError::Serve { source }),
                Err(_) => Ok(()), // connections that do not finish are dropped
            }
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// `name` in `PATH`, if it is there and is a file.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A variable from the environment, `None` when unset or empty.
fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// `sandbox-agent host`.
pub async fn main(args: HostArgs) -> anyhow::Result<()> {
    let provider_token = non_empty_env(env::PROVIDER_TOKEN).with_context(|| {
        format!(
            "{} must be set (the bearer token of the provider API)",
            env::PROVIDER_TOKEN
        )
    })?;
    let public_url = match args.public_url {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url),
        Some(_) => anyhow::bail!("--public-url must start with http:// or https://"),
        None => None,
    };
    let agent_bin = match args.agent_bin {
        Some(path) => path
            .canonicalize()
            .with_context(|| format!("--agent-bin {}", path.display()))?,
        None => {
            std::env::current_exe().context("could not find this executable (give --agent-bin)")?
        }
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("could not create {}", args.data_dir.display()))?;
    let runtime_dir = match args.runtime_dir {
        Some(dir) => dir,
        None => {
            let data_dir = args
                .data_dir
                .canonicalize()
                .with_context(|| format!("could not resolve {}", args.data_dir.display()))?;
            isolation::default_runtime_dir(&data_dir)
        }
    };
    let isolation = match args.isolation {
        IsolationMode::Off => {
            tracing::warn!("--isolation off: sandboxes are NOT isolated");
            None
        }
        IsolationMode::Auto => Some(IsolationConfig {
            runtime_dir: Some(runtime_dir.clone()),
            sandbox_uid: args.sandbox_uid,
            sandbox_gid: args.sandbox_gid,
            memory_limit_bytes: args.memory_limit_bytes,
            pids_limit: args.pids_limit,
            setup_allow: args.setup_allow,
            ..IsolationConfig::default()
        }),
    };
    let model = ModelConfig {
        api_key: non_empty_env(env::ANTHROPIC_API_KEY),
        base_url: non_empty_env(env::ANTHROPIC_BASE_URL),
        openai_api_key: non_empty_env(env::OPENAI_API_KEY),
        openai_base_url: non_empty_env(env::OPENAI_BASE_URL),
    };
    if !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "listening beyond loopback: /git and /scripted-model have no authentication"
        );
    }
    let config = HostConfig {
        data_dir: args.data_dir,
        runtime_dir,
        public_url,
        agent_bin,
        provider_token,
        agent_log_filter: non_empty_env(env::LOG).unwrap_or_else(|| "info".to_owned()),
        model,
        isolation,
        on_deadline: None,
        pool_max: args.pool_max,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        runtime_dir = %config.runtime_dir.display(),
        model = if config.model.api_key.is_some() { "anthropic" } else { "scripted demo" },
        "host listening"
    );
    serve(config, listener, shutdown_signal()).await?;
    Ok(())
}

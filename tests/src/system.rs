//! The whole system on loopback: `sandbox-agent host` and `wrangler dev` (workerd running the built Worker),
//! each in its own process group, on free ephemeral ports, with state in a temporary directory.
//!
//! Dropping a [`System`] stops both process groups (SIGINT, then SIGKILL after a grace period), so no
//! workerd or sandbox outlives a test.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::RngCore;

use crate::{env, DEMO_REPO};

/// How long each service gets to answer `GET /healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a service has to stop before it is killed (an agent takes up to 10 s to extract its work).
const STOP_GRACE: Duration = Duration::from_secs(12);
/// Lines of a service's log shown in errors.
const LOG_TAIL_LINES: usize = 40;

/// Where the parts of the system are on this machine.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Repository root (holds `wrangler.toml`).
    pub repo_root: PathBuf,
    /// Node 22.
    pub node: PathBuf,
    /// wrangler's entry script.
    pub wrangler_js: PathBuf,
    /// The `sandbox-agent` binary.
    pub agent_bin: PathBuf,
}

impl Tools {
    /// From [`env`], with defaults relative to the repository; fails with what to run when one is missing.
    pub fn from_env() -> anyhow::Result<Tools> {
        let path = |key: &str| std::env::var_os(key).map(PathBuf::from);
        let repo_root = path(env::NIGHTSHIFT_REPO_ROOT).unwrap_or_else(|| {
            let here = Path::new(env!("CARGO_MANIFEST_DIR"));
            here.parent().unwrap_or(here).to_path_buf()
        });
        let tools = Tools {
            node: path(env::NIGHTSHIFT_NODE)
                .unwrap_or_else(|| repo_root.join("node_modules/.bin/node")),
            wrangler_js: path(env::NIGHTSHIFT_WRANGLER_JS)
                .unwrap_or_else(|| repo_root.join("node_modules/wrangler/bin/wrangler.js")),
            agent_bin: path(env::NIGHTSHIFT_AGENT_BIN)
                .unwrap_or_else(|| repo_root.join("target/debug/sandbox-agent")),
            repo_root,
        };
        for (what, file) in [
            ("node 22", &tools.node),
            ("wrangler", &tools.wrangler_js),
            ("sandbox-agent", &tools.agent_bin),
            (
                "the built worker",
                &tools.repo_root.join("worker/build/index.js"),
            ),
        ] {
            if !file.exists() {
                bail!(
                    "{what} not found at {}: run `cargo xtask test` (it sets up and builds)",
                    file.display()
                );
            }
        }
        Ok(tools)
    }
}

/// Knobs for [`System::start_with`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Extra environment for the host (and so for the agents it starts), e.g. a model base URL.
    pub host_env: Vec<(String, String)>,
    /// Extra `--var KEY:VALUE` for the Worker.
    pub worker_vars: Vec<(String, String)>,
}

impl StartOptions {
    /// Only extra Worker vars, e.g. `[("SESSION_TOKEN_CEILING", "1")]`.
    pub fn worker_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        StartOptions {
            worker_vars: vars
                .into_iter()
                .map(|(key, value)| (key.into(), value.into()))
                .collect(),
            ..StartOptions::default()
        }
    }
}

/// A running system; stopped on drop.
pub struct System {
    tools: Tools,
    options: StartOptions,
    dir: tempfile::TempDir,
    worker_port: u16,
    inspector_port: u16,
    host_port: u16,
    auth_secret: String,
    provider_token: String,
    host: Option<Service>,
    wrangler: Option<Service>,
}

impl System {
    /// Start the host (with [`DEMO_REPO`] seeded) and wrangler dev, and wait until both answer `/healthz`.
    pub async fn start() -> anyhow::Result<System> {
        System::start_with(StartOptions::default()).await
    }

    /// [`System::start`] with options.
    pub async fn start_with(options: StartOptions) -> anyhow::Result<System> {
        let tools = Tools::from_env()?;
        let dir = tempfile::Builder::new()
            .prefix("nightshift-e2e-")
            .tempdir_in(scratch_dir())
            .context("creating a temp dir")?;
        // Isolated sandboxes run as an unprivileged uid that must reach its bind sources below here
        // (`runtime/`): others may pass through, not list.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .context("opening the temp dir for sandboxes")?;
        }
        let [worker_port, inspector_port, host_port] = free_ports()?;
        let mut system = System {
            tools,
            options,
            dir,
            worker_port,
            inspector_port,
            host_port,
            auth_secret: random_hex(),
            provider_token: random_hex(),
            host: None,
            wrangler: None,
        };
        system.seed(DEMO_REPO).await?;
        system.host = Some(system.spawn_host()?);
        system.wrangler = Some(system.spawn_wrangler()?);
        let host_url = system.host_url();
        let base_url = system.base_url();
        if let Some(host) = system.host.as_mut() {
            host.wait_healthy(&host_url).await?;
        }
        if let Some(wrangler) = system.wrangler.as_mut() {
            wrangler.wait_healthy(&base_url).await?;
        }
        Ok(system)
    }

    /// The Worker's loopback address.
    pub fn worker_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.worker_port))
    }

    /// `http://127.0.0.1:PORT` of the Worker.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.worker_port)
    }

    /// `ws://127.0.0.1:PORT` of the Worker.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.worker_port)
    }

    /// `http://127.0.0.1:PORT` of the sandbox host (provider API, git smart HTTP).
    pub fn host_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.host_port)
    }

    /// The bearer token the Worker presents to the host.
    pub fn provider_token(&self) -> &str {
        &self.provider_token
    }

    /// The host's data directory (its git store is `git/`).
    pub fn host_data_dir(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    /// wrangler's persistence directory (Durable Object storage).
    pub fn wrangler_persist_dir(&self) -> PathBuf {
        self.dir.path().join("wrangler")
    }

    /// The host's process id, while it runs.
    pub fn host_pid(&self) -> Option<u32> {
        self.host.as_ref().map(|service| service.child.id())
    }

    /// Everything the host printed so far.
    pub fn host_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    /// Everything wrangler printed so far (across restarts).
    pub fn wrangler_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wrangler.log")).unwrap_or_default()
    }

    /// Create (or refresh) a repository in the host's git store with `sandbox-agent seed`.
    pub async fn seed(&self, repo: &str) -> anyhow::Result<()> {
        self.seed_with(repo, 0).await
    }

    /// [`System::seed`] with `synthetic_files` generated files added (a large repository).
    pub async fn seed_with(&self, repo: &str, synthetic_files: usize) -> anyhow::Result<()> {
        let output = tokio::process::Command::new(&self.tools.agent_bin)
            .arg("seed")
            .arg("--store")
            .arg(self.host_data_dir().join("git"))
            .args(["--repo", repo])
            .arg(format!("--synthetic-files={synthetic_files}"))
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} seed", self.tools.agent_bin.display()))?;
        if !output.status.success() {
            bail!(
                "sandbox-agent seed --repo {repo} exited with {}:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Stop wrangler (SIGINT to its process group, as Ctrl-C would) and start it again on the same port with
    /// the same persisted state; returns once `/healthz` answers.
    pub async fn restart_wrangler(&mut self) -> anyhow::Result<()> {
        if let Some(mut wrangler) = self.wrangler.take() {
            wrangler.stop();
        }
        let base_url = self.base_url();
        let mut wrangler = self.spawn_wrangler()?;
        wrangler.wait_healthy(&base_url).await?;
        self.wrangler = Some(wrangler);
        Ok(())
    }

    fn spawn_host(&self) -> anyhow::Result<Service> {
        let mut command = Command::new(&self.tools.agent_bin);
        command
            .arg("host")
            .args(["--listen", &format!("127.0.0.1:{}", self.host_port)])
            .arg("--data-dir")
            .arg(self.host_data_dir())
            // Inside this system's own temporary directory (on tmpfs), so images and overlays go with it.
            .arg("--runtime-dir")
            .arg(self.dir.path().join("runtime"))
            .env(env::NIGHTSHIFT_PROVIDER_TOKEN, &self.provider_token)
            .env_remove(env::ANTHROPIC_API_KEY)
            .envs(self.options.host_env.iter().map(|(k, v)| (k, v)));
        Service::spawn(
            "sandbox-agent host",
            command,
            &self.dir.path().join("host.log"),
        )
    }

    fn spawn_wrangler(&self) -> anyhow::Result<Service> {
        let mut command = Command::new(&self.tools.node);
        command
            .current_dir(&self.tools.repo_root)
            .arg(&self.tools.wrangler_js)
            .arg("dev")
            .arg("--config")
            .arg(self.tools.repo_root.join("wrangler.toml"))
            .args(["--local", "--ip", "127.0.0.1"])
            .args(["--port", &self.worker_port.to_string()])
            .args(["--inspector-port", &self.inspector_port.to_string()])
            .arg("--persist-to")
            .arg(self.wrangler_persist_dir())
            .arg("--show-interactive-dev-session=false")
            .args(["--var", "DEV_MODE:1"])
            .args(["--var", &format!("AUTH_SECRET:{}", self.auth_secret)])
            .args(["--var", &format!("PROVIDER_TOKEN:{}", self.provider_token)])
            .args(["--var", &format!("PROVIDER_URL:{}", self.host_url())]);
        for (key, value) in &self.options.worker_vars {
            command.args(["--var", &format!("{key}:{value}")]);
        }
        command
            .env(env::PATH, path_with(self.tools.node.parent()))
            .envs(env::WRANGLER_OFFLINE);
        Service::spawn(
            "wrangler dev",
            command,
            &self.dir.path().join("wrangler.log"),
        )
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // The host first: its agents extract their work and deliver their last events to the Worker
        // while it stops its sandboxes.
        if let Some(mut host) = self.host.take() {
            host.stop();
        }
        if let Some(mut wrangler) = self.wrangler.take() {
            wrangler.stop();
        }
    }
}

/// A child process leading its own process group, output appended to a log file.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &'static str, mut command: Command, log: &Path) -> anyhow::Result<Service> {
        let file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let stderr = file.try_clone().context("duplicating a log file handle")?;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {name} ({})",
                    command.get_program().to_string_lossy()
                )
            })?;
        Ok(Service {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Poll `GET {base_url}/healthz` until 200; fail early with the log when the process exits.
    async fn wait_healthy(&mut self, base_url: &str) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building an http client")?;
        let url = format!("{base_url}/healthz");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("polling a child")? {
                bail!(
                    "{} exited while starting ({status}); end of its output:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(response) = http.get(&url).send().await {
                if response.status() == reqwest::StatusCode::OK {
                    return Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "{} did not answer GET {url} with 200 within {} s; end of its output:\n{}",
                    self.name,
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// SIGINT to the group, up to [`STOP_GRACE`] for the leader to exit, then SIGKILL to the group (which also
    /// reaches children that outlived the leader, such as workerd).
    fn stop(&mut self) {
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        signal_group(pgid, libc::SIGINT);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; a negative pid addresses our child's process group.
    unsafe { libc::kill(-pgid, signal) };
}

/// Distinct free loopback ports (all bound at once, so they differ, then released).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding an ephemeral port")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .context("reading a bound port")?
            .port();
    }
    Ok(ports)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// PATH with `dir` (the project-local Node 22) first.
fn path_with(dir: Option<&Path>) -> OsString {
    let mut dirs: Vec<PathBuf> = dir.map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = std::env::var_os(env::PATH) {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// Where a system keeps its state: tmpfs when the machine has one. The root filesystem of these machines is
/// slow and erratic for small synchronous writes (see TOOLCHAIN.md), which would measure the disk, not us.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = shm.is_dir()
        && tempfile::Builder::new()
            .prefix("nightshift-probe-")
            .tempfile_in(shm)
            .is_ok();
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

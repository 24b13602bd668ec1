//! An image's setup inside the same isolation as a sandbox ([`IsolatedRunner`], the
//! [`SetupRunner`] of isolated hosts).
//!
//! A setup is a sandbox without an agent: for its run it gets a sandbox runtime directory
//! (`<runtime>/sandboxes/setup-<16 hex>/`, swept like any other after a crash), and
//!
//! - **filesystem:** the image's staging tree bind-mounted (as root, on the host) at that
//!   directory's `merged/`, which bubblewrap binds at [`WORKSPACE_PATH`](super::WORKSPACE_PATH) — the path every sandbox
//!   sees its workspace at, so whatever the setup caches with an absolute path (virtualenvs, build
//!   directories) is right in sandboxes too. The tree belongs to the sandbox uid before the setup
//!   starts ([`super::super::image`] hands it over), so the setup, root in its user namespace, can
//!   write it. `HOME` is `/state/home`, a scratch directory thrown away with the setup: caches that
//!   should reach sandboxes belong in the tree. Nothing else of the host is there (see
//!   [`super`]): not the data directory, not other images, not other sandboxes.
//! - **namespaces and identity:** bubblewrap with new user, pid, ipc, uts, network and cgroup
//!   namespaces, as the unprivileged sandbox uid (root inside).
//! - **environment:** built from nothing: `PATH`, `HOME`, and the proxy variables; never a variable
//!   of the host.
//! - **limits:** the sandbox memory and pids cgroups ([`super::super::cgroup`]) and the build's time
//!   limit; at the limit (and after the setup ends) every process in the cgroups is killed, and
//!   without cgroups bubblewrap's process group is, which takes the whole pid namespace with it.
//! - **network:** only an egress proxy ([`super::super::egress`]) of its own. Its allow-list is
//!   [`IsolationConfig::setup_allow`](super::IsolationConfig::setup_allow) (`--setup-allow URL`,
//!   repeatable), **empty by default**: a setup has no network at all unless the operator names
//!   the package registries it may use (`https://registry.npmjs.org`, `https://pypi.org` and
//!   `https://files.pythonhosted.org`, `https://index.crates.io` and `https://static.crates.io`, …).
//!   Not the host's git and not the model: a setup builds what the tree already holds. Inside,
//!   the agent binary runs as a thin wrapper ([`exec_main`], the hidden `sandbox-agent setup-exec`):
//!   it relays a loopback port to the proxy's socket, as the agent does, and runs the setup with
//!   `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` (both cases) pointing at it.
//!
//! The setup's stdout and stderr (and bubblewrap's) go straight to the build log's pipe, so the log
//! grows line by line as the setup writes.
//!
//! Invariant: a setup never runs as host root, never sees a host file outside its tree and the
//! system directories, and leaves nothing behind — no process, mount, cgroup or runtime directory —
//! however it ends.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::{
    bind_mount, Isolation, SandboxDirs, AGENT_PATH, EGRESS_SOCKET_PATH, HOME_PATH, SANDBOX_PATH,
};
use crate::host::cgroup::Cgroup;
use crate::host::egress::{AllowList, EgressProxy};
use crate::host::image::{SetupCommand, SetupExit, SetupFuture, SetupRunner};
use crate::host::HostError;

/// The agent's log filter inside a setup: only warnings of the wrapper reach the build log.
const WRAPPER_LOG_FILTER: &str = "warn";

/// Runs image setups inside sandbox isolation (see the module documentation).
#[derive(Debug, Clone)]
pub struct IsolatedRunner {
    isolation: Isolation,
    agent_bin: PathBuf,
    allow: AllowList,
}

impl IsolatedRunner {
    /// Setups under `isolation`, with `agent_bin` as the in-sandbox wrapper and egress to `allow` only.
    pub fn new(isolation: Isolation, agent_bin: &Path, allow: AllowList) -> IsolatedRunner {
        IsolatedRunner {
            isolation,
            agent_bin: agent_bin.to_owned(),
            allow,
        }
    }

    async fn run_isolated(self, setup: SetupCommand) -> Result<SetupExit, HostError> {
        let id = format!("setup-{}", hex::encode(rand::random::<[u8; 8]>()));
        let dirs = self.isolation.create_dirs(&id)?;
        let mut held = Held {
            isolation: self.isolation.clone(),
            id: id.clone(),
            dirs,
            cgroup: None,
            proxy: None,
            released: false,
        };
        let outcome = self.start_and_wait(&mut held, setup).await;
        held.release().await;
        outcome
    }

    async fn start_and_wait(
        &self,
        held: &mut Held,
        setup: SetupCommand,
    ) -> Result<SetupExit, HostError> {
        let dirs = held.dirs.clone();
        bind_mount(&setup.cwd, &dirs.merged)?;
        held.proxy = Some(EgressProxy::start(
            &dirs.egress_socket,
            self.allow.clone(),
            &held.id,
            None,
        )?);
        self.isolation.hand_over(&dirs.egress_socket)?;
        held.cgroup = self.isolation.create_cgroup(&held.id)?;

        let mut env: Vec<(OsString, OsString)> = setup
            .env
            .into_iter()
            .filter(|(name, _)| name != "PATH" && name != "HOME")
            .collect();
        env.extend([
            ("PATH".into(), SANDBOX_PATH.into()),
            ("HOME".into(), HOME_PATH.into()),
            (crate::env::LOG.into(), WRAPPER_LOG_FILTER.into()),
        ]);
        let mut argv: Vec<OsString> = [AGENT_PATH, "setup-exec", "--"]
            .into_iter()
            .map(OsString::from)
            .collect();
        argv.push(setup.program.clone());
        argv.extend(setup.args.iter().cloned());
        let mut isolated = self
            .isolation
            .command()
            .workspace(&dirs.merged)
            .state(&dirs.state)
            .egress_socket(&dirs.egress_socket)
            .agent_bin(&self.agent_bin)
            .envs(env)
            .exec(argv);
        if let Some(cgroup) = &held.cgroup {
            isolated = isolated.cgroup(cgroup);
        }
        let spawn_error = |source| HostError::Spawn {
            command: format!("setup {}", setup.program.to_string_lossy()),
            source,
        };
        let stderr = setup.output.try_clone().map_err(spawn_error)?;
        let mut command = isolated.into_command()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(setup.output))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let spawned = command.spawn();
        // The command holds copies of the pipe: drop them, so the log ends when the setup does.
        drop(command);
        let mut child = spawned.map_err(spawn_error)?;
        let group = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
        match tokio::time::timeout(setup.timeout, child.wait()).await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt as _;
                let status = status.map_err(spawn_error)?;
                Ok(SetupExit::Exited {
                    code: status.code(),
                    signal: status.signal(),
                })
            }
            Err(_) => {
                held.kill(group);
                let _ = child.wait().await;
                Ok(SetupExit::TimedOut)
            }
        }
    }
}

impl SetupRunner for IsolatedRunner {
    fn run(&self, setup: SetupCommand) -> SetupFuture {
        let runner = self.clone();
        Box::pin(async move { runner.run_isolated(setup).await.map_err(io::Error::other) })
    }
}

/// What one setup holds on the host; released once, also when the build is dropped half-way.
struct Held {
    isolation: Isolation,
    id: String,
    dirs: SandboxDirs,
    cgroup: Option<Cgroup>,
    proxy: Option<EgressProxy>,
    released: bool,
}

impl Held {
    /// Kill every process of the setup: its cgroups, or bubblewrap's process group (whose death takes
    /// the pid namespace with it).
    fn kill(&self, group: Option<libc::pid_t>) {
        if let Some(cgroup) = &self.cgroup {
            for pid in cgroup.processes() {
                // SAFETY: `kill` only sends a signal, to a process in this setup's cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(group) = group.filter(|group| *group > 1) {
            // SAFETY: `killpg` only sends a signal, to the process group of this setup's bubblewrap.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
    }

    /// Kill what is left, remove the cgroups, stop the proxy, unmount the tree and remove the
    /// runtime directory.
    async fn release(&mut self) {
        self.released = true;
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(error) = cgroup.remove().await {
                tracing::error!(setup = %self.id, %error, "could not remove a setup's cgroups");
            }
        }
        self.release_files();
    }

    fn release_files(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
        if let Err(error) = self.isolation.remove_dirs(&self.dirs) {
            tracing::error!(setup = %self.id, %error, "could not release a setup's runtime directory");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Some(cgroup) = self.cgroup.take() {
            for pid in cgroup.processes() {
                // SAFETY: as in `kill`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { cgroup.remove().await });
            }
        }
        self.release_files();
    }
}

/// `sandbox-agent setup-exec` (run by [`IsolatedRunner`] inside the sandbox, not by people).
#[derive(Debug, clap::Args)]
pub struct SetupExecArgs {
    /// The egress proxy's socket.
    #[arg(long, default_value = EGRESS_SOCKET_PATH)]
    pub socket: PathBuf,
    /// The setup program and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<OsString>,
}

/// Relay a loopback port to the egress socket, run the setup with the proxy variables pointing at
/// it, and exit with the setup's status (`128 + signal` when a signal ended it).
pub async fn exec_main(args: SetupExecArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (program, rest) = args
        .command
        .split_first()
        .context("setup-exec needs a program")?;
    let relay =
        crate::run::egress::Relay::bind(&args.socket).context("starting the egress relay")?;
    let proxy_env = relay.proxy_env();
    relay.spawn().context("serving the egress relay")?;
    let status = tokio::process::Command::new(program)
        .args(rest)
        .env_remove(crate::env::LOG)
        .envs(
            proxy_env
                .iter()
                .map(|(name, value)| (OsStr::new(name), OsStr::new(value))),
        )
        .status()
        .await
        .with_context(|| format!("could not run {}", program.to_string_lossy()))?;
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    std::process::exit(code)
}

#[cfg(test)]
mod tests;

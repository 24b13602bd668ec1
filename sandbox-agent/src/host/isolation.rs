//! Real isolation for sandboxes: an overlay filesystem, bubblewrap namespaces, an unprivileged uid, and
//! cgroup limits.
//!
//! **Filesystem.** A sandbox's workspace is an overlay ([`mount_overlay`]): a read-only lower layer (the
//! repository's image tree, `<runtime>/images/…/tree`, owned by the sandbox uid; without an image a
//! fresh clone in `lower/`) and a writable upper layer, both under the host's
//! `runtime_dir` on tmpfs (`/dev/shm` by default), as is everything else of a running sandbox:
//!
//! ```text
//! <runtime>/sandboxes/<id>/lower/        the clone when there is no image (owned by the sandbox uid)
//! <runtime>/sandboxes/<id>/upper/        the overlay's writable layer: everything the sandbox changed
//! <runtime>/sandboxes/<id>/work/         the overlay's work directory
//! <runtime>/sandboxes/<id>/merged/       the overlay, seen in the sandbox as /workspace
//! <runtime>/sandboxes/<id>/state/        the agent's state (outbox journal), seen as /state; HOME is /state/home
//! <runtime>/sandboxes/<id>/egress.sock   the egress proxy (super::egress), seen as /run/nightshift/egress.sock
//! ```
//!
//! An image's setup uses the same layout under the id `setup-<16 hex>`, with the image's staging tree
//! bind-mounted at `merged/` instead of an overlay ([`setup`]).
//!
//! **Process.** [`IsolatedCommand`] starts a program under bubblewrap with new user, pid, ipc, uts,
//! network and (where possible) cgroup namespaces. Its root is an empty tmpfs with, read-only: `/usr`
//! (and the `/bin`, `/sbin`, `/lib*` beside it, as the symlinks or directories they are on the host), a
//! short list of files from `/etc` ([`ETC_ENTRIES`]: users, the loader cache, certificates,
//! alternatives), and the agent binary at [`AGENT_PATH`]; read-write: the overlay at [`WORKSPACE_PATH`]
//! and the state directory at [`STATE_PATH`]; and fresh `/proc`, `/dev` and `/tmp`. Nothing else of the
//! host exists in there: not `/root`, not the data directory, not another sandbox.
//!
//! **Identity.** bubblewrap does not run as root: the host switches to an unprivileged uid/gid
//! ([`DEFAULT_SANDBOX_UID`], no account needed) before it execs bubblewrap, which maps that uid to root
//! inside a new user namespace and keeps the namespace's capabilities (`--cap-add ALL`). So the agent
//! is root in its sandbox — git is happy with the files it owns, and the bash tool's own bubblewrap
//! (`bwrap --dev-bind / / --unshare-pid --proc /proc`) can make its mount and pid namespaces — while
//! towards the host it is a uid that owns nothing but sandbox files. (All sandboxes share that uid;
//! their mount and pid namespaces keep them from reaching each other's files and processes. Mapping to
//! host root instead would let a sandbox remount `/usr` read-write and write to it.) The lower layer, upper
//! layer and state directory belong to that uid; the runtime directories above them are `root:<gid>`
//! mode `0710`, so the sandbox uid can walk to its own binds but list nothing, and other host users
//! cannot enter at all.
//!
//! **Environment.** Only what the host passes: the bubblewrap process gets a cleared environment plus
//! exactly the host's variables, and bubblewrap hands that environment on. (Not `--clearenv` with
//! `--setenv`: a command line is readable by every user on the host, and the variables carry tokens.)
//!
//! **Limits.** Memory and processes through cgroup v1 ([`super::cgroup`]): the first process joins the
//! sandbox's cgroups in a `pre_exec` hook, before it drops root and execs bubblewrap.
//!
//! Invariant: nothing runs in a sandbox as host root, and nothing of a sandbox runs outside its cgroups
//! when it has them.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::cgroup::{Cgroup, CgroupRoots, Limits};
use super::{io_error, HostError};

/// The overlay inside the sandbox (the agent's `NIGHTSHIFT_WORKSPACE`).
pub const WORKSPACE_PATH: &str = "/workspace";
/// The sandbox's state directory inside the sandbox (the agent's `--state-dir`).
pub const STATE_PATH: &str = "/state";
/// `HOME` inside the sandbox.
pub const HOME_PATH: &str = "/state/home";
/// The agent binary inside the sandbox.
pub const AGENT_PATH: &str = "/opt/nightshift/sandbox-agent";
/// The egress proxy's socket inside the sandbox (the agent's `NIGHTSHIFT_EGRESS_SOCKET`).
pub const EGRESS_SOCKET_PATH: &str = "/run/nightshift/egress.sock";
/// `PATH` inside the sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The sandbox's hostname.
pub const HOSTNAME: &str = "nightshift-sandbox";
/// Default host uid (and gid) bubblewrap runs as: high enough that no account or subordinate id range
/// is likely to use it.
pub const DEFAULT_SANDBOX_UID: u32 = 2_000_000_000;
/// Default `memory.limit_in_bytes`: 4 GiB.
pub const DEFAULT_MEMORY_LIMIT_BYTES: u64 = 4 << 30;
/// Default `pids.max` (processes and threads).
pub const DEFAULT_PIDS_LIMIT: u64 = 1024;
/// Where the runtime directories go by default (a tmpfs).
const DEFAULT_RUNTIME_PARENT: &str = "/dev/shm";
/// Top-level directories bound read-only when they are directories, recreated when they are symlinks.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// What of `/etc` a sandbox sees (read-only, when present on the host).
pub const ETC_ENTRIES: [&str; 17] = [
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "gitconfig",
    "group",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "passwd",
    "profile",
    "ssl",
];
/// The longest the bubblewrap probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// How to isolate sandboxes; resolved by [`Isolation::detect`].
#[derive(Debug, Clone)]
pub struct IsolationConfig {
    /// Where running sandboxes live (tmpfs); `None`: [`default_runtime_dir`] of the data directory.
    pub runtime_dir: Option<PathBuf>,
    /// Host uid bubblewrap runs as (root inside the sandbox).
    pub sandbox_uid: u32,
    /// Host gid bubblewrap runs as.
    pub sandbox_gid: u32,
    /// Memory limit per sandbox.
    pub memory_limit_bytes: u64,
    /// Process (and thread) limit per sandbox.
    pub pids_limit: u64,
    /// Where the cgroup v1 hierarchies are mounted (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// What an image's setup may reach through its egress proxy (URLs: `https://registry.npmjs.org`);
    /// empty by default, so a setup has no network at all. See [`setup`].
    pub setup_allow: Vec<String>,
    /// How far back claims count as demand on a warm pool, and how long a `POST /v1/pools/{repo}`
    /// holds its floor (warm pools exist only on isolated hosts); see [`super::pool`].
    pub pool_window_ms: u64,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            runtime_dir: None,
            sandbox_uid: DEFAULT_SANDBOX_UID,
            sandbox_gid: DEFAULT_SANDBOX_UID,
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT_BYTES,
            pids_limit: DEFAULT_PIDS_LIMIT,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            setup_allow: Vec::new(),
            pool_window_ms: super::pool::DEFAULT_WINDOW_MS,
        }
    }
}

/// `/dev/shm/nightshift-host-<8 hex of SHA-256 of the canonical data directory>`: one per data
/// directory, so hosts with different data directories never share one.
pub fn default_runtime_dir(canonical_data_dir: &Path) -> PathBuf {
    let digest = Sha256::digest(canonical_data_dir.as_os_str().as_bytes());
    let short = hex::encode(digest.get(..4).unwrap_or_default());
    Path::new(DEFAULT_RUNTIME_PARENT).join(format!("nightshift-host-{short}"))
}

/// Isolation that was proven to work on this machine.
#[derive(Debug, Clone)]
pub struct Isolation {
    config: IsolationConfig,
    runtime_dir: PathBuf,
    bwrap: PathBuf,
    /// `None`: cgroups are not writable here; sandboxes run without limits (said once at startup).
    cgroups: Option<CgroupRoots>,
}

/// The host-side directories of one isolated sandbox.
#[derive(Debug, Clone)]
pub struct SandboxDirs {
    /// `<runtime>/sandboxes/<id>`.
    pub root: PathBuf,
    /// The lower layer (for now, the clone).
    pub lower: PathBuf,
    /// The overlay's upper layer.
    pub upper: PathBuf,
    /// The overlay's work directory.
    pub work: PathBuf,
    /// The overlay's mount point.
    pub merged: PathBuf,
    /// The agent's state directory.
    pub state: PathBuf,
    /// The egress proxy's socket.
    pub egress_socket: PathBuf,
}

impl Isolation {
    /// Prove that sandboxes can be isolated here: running as root, `bwrap` in `PATH`, the runtime
    /// directory usable, an overlay mounts and unmounts in it, and bubblewrap runs `agent_bin
    /// --version` as the sandbox uid with every namespace. Cgroups are probed too; without them
    /// isolation still works, without limits (said once, as a warning). Leftovers of sandboxes of an
    /// earlier run of the host (same runtime directory) are removed.
    pub async fn detect(
        config: &IsolationConfig,
        canonical_data_dir: &Path,
        agent_bin: &Path,
    ) -> Result<Isolation, HostError> {
        let unavailable = |reason: String| HostError::IsolationUnavailable { reason };
        // SAFETY: `geteuid` has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(unavailable(
                "not running as root (overlay mounts and cgroups need it)".to_owned(),
            ));
        }
        let bwrap = super::find_program("bwrap")
            .ok_or_else(|| unavailable("bubblewrap (`bwrap`) is not in PATH".to_owned()))?;
        let runtime_dir = config
            .runtime_dir
            .clone()
            .unwrap_or_else(|| default_runtime_dir(canonical_data_dir));
        check_mount_path(&runtime_dir)?;
        let isolation = Isolation {
            config: config.clone(),
            runtime_dir,
            bwrap,
            cgroups: None,
        };
        isolation.create_private_dir(&isolation.runtime_dir)?;
        isolation.create_private_dir(&isolation.sandboxes_dir())?;
        isolation.probe_overlay()?;
        isolation.probe_bwrap(agent_bin).await?;
        let cgroups = match CgroupRoots::probe(&config.cgroup_root).await {
            Ok(roots) => Some(roots),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cgroups are not writable: sandboxes run WITHOUT memory and process limits"
                );
                None
            }
        };
        let isolation = Isolation {
            cgroups,
            ..isolation
        };
        isolation.sweep_stale().await;
        Ok(isolation)
    }

    /// `<runtime>`.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// `<runtime>/sandboxes`.
    fn sandboxes_dir(&self) -> PathBuf {
        self.runtime_dir.join("sandboxes")
    }

    /// The limits every sandbox gets, or `None` without cgroups.
    pub fn limits(&self) -> Option<Limits> {
        self.cgroups.as_ref().map(|_| Limits {
            memory_bytes: self.config.memory_limit_bytes,
            pids: self.config.pids_limit,
        })
    }

    /// A sandbox's `limits` as shown in its info: `memory_bytes=… pids=…`, or `none`.
    pub fn describe_limits(&self) -> String {
        self.limits()
            .map_or_else(|| "none".to_owned(), |limits| limits.describe())
    }

    /// The cgroups of sandbox `id` with the configured limits; `None` without cgroups.
    pub fn create_cgroup(&self, id: &str) -> Result<Option<Cgroup>, HostError> {
        match (&self.cgroups, self.limits()) {
            (Some(roots), Some(limits)) => roots.create(id, limits).map(Some),
            _ => Ok(None),
        }
    }

    /// The configuration isolation was detected with.
    pub fn config(&self) -> &IsolationConfig {
        &self.config
    }

    /// A bubblewrap command for this host's sandbox uid.
    pub fn command(&self) -> IsolatedCommand {
        IsolatedCommand::new(
            &self.bwrap,
            self.config.sandbox_uid,
            self.config.sandbox_gid,
        )
    }

    /// The host uid and gid sandboxes run as.
    pub fn sandbox_ids(&self) -> (u32, u32) {
        (self.config.sandbox_uid, self.config.sandbox_gid)
    }

    /// The directories of sandbox `id` (not created).
    pub fn dirs(&self, id: &str) -> SandboxDirs {
        let root = self.sandboxes_dir().join(id);
        SandboxDirs {
            lower: root.join("lower"),
            upper: root.join("upper"),
            work: root.join("work"),
            merged: root.join("merged"),
            state: root.join("state"),
            egress_socket: root.join("egress.sock"),
            root,
        }
    }

    /// Create the directories of sandbox `id` with their owners and modes (nothing mounted yet).
    pub fn create_dirs(&self, id: &str) -> Result<SandboxDirs, HostError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(HostError::InvalidField {
                field: "sandbox id",
                reason: "letters, digits and dashes only",
            });
        }
        let dirs = self.dirs(id);
        let result = (|| {
            self.create_private_dir(&dirs.root)?;
            self.create_owned_dir(&dirs.lower, 0o755)?;
            self.create_owned_dir(&dirs.upper, 0o755)?;
            create_dir(&dirs.work, 0o700)?;
            create_dir(&dirs.merged, 0o755)?;
            self.create_owned_dir(&dirs.state, 0o700)?;
            self.create_owned_dir(&dirs.state.join("home"), 0o700)
        })();
        if let Err(error) = result {
            let _ = std::fs::remove_dir_all(&dirs.root);
            return Err(error);
        }
        Ok(dirs)
    }

    /// Give `path` (the egress socket) to the sandbox uid, so the sandbox can connect to it.
    pub fn hand_over(&self, path: &Path) -> Result<(), HostError> {
        std::os::unix::fs::chown(
            path,
            Some(self.config.sandbox_uid),
            Some(self.config.sandbox_gid),
        )
        .map_err(io_error("change owner of", path))
    }

    /// Unmount the overlay of `dirs` and delete the sandbox's runtime directory. When the unmount
    /// fails the files stay (a recursive delete must never run into a mount).
    pub fn remove_dirs(&self, dirs: &SandboxDirs) -> Result<(), HostError> {
        unmount(&dirs.merged)?;
        match std::fs::remove_dir_all(&dirs.root) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &dirs.root)(error)),
        }
    }

    /// Remove the runtime directory if no sandbox is left in it (at shutdown).
    pub fn remove_runtime_dir_if_empty(&self) {
        let _ = std::fs::remove_dir(self.sandboxes_dir());
        let _ = std::fs::remove_dir(&self.runtime_dir);
    }

    /// A directory only root and the sandbox gid may enter (`root:<gid>` `0710`).
    fn create_private_dir(&self, path: &Path) -> Result<(), HostError> {
        match std::fs::DirBuilder::new().mode(0o710).create(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(error) => return Err(io_error("create directory", path)(error)),
        }
        std::os::unix::fs::chown(path, Some(0), Some(self.config.sandbox_gid))
            .map_err(io_error("change owner of", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o710))
            .map_err(io_error("change mode of", path))
    }

    /// A new directory owned by the sandbox uid.
    fn create_owned_dir(&self, path: &Path, mode: u32) -> Result<(), HostError> {
        create_dir(path, mode)?;
        self.hand_over(path)
    }

    /// Mount and unmount an overlay in the runtime directory.
    fn probe_overlay(&self) -> Result<(), HostError> {
        let root = self.runtime_dir.join(format!(
            "probe-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let [lower, upper, work, merged] =
            ["lower", "upper", "work", "merged"].map(|name| root.join(name));
        let result = (|| {
            for dir in [&root, &lower, &upper, &work, &merged] {
                create_dir(dir, 0o700)?;
            }
            std::fs::write(lower.join("probe"), "lower").map_err(io_error("write", &lower))?;
            mount_overlay(&[&lower], &upper, &work, &merged)?;
            let through = std::fs::write(merged.join("probe"), "upper");
            unmount(&merged)?;
            through.map_err(io_error("write through the overlay at", &merged))?;
            match std::fs::read_to_string(upper.join("probe")) {
                Ok(text) if text == "upper" => Ok(()),
                _ => Err(HostError::IsolationUnavailable {
                    reason: "a write through the overlay did not reach its upper layer".to_owned(),
                }),
            }
        })();
        let _ = std::fs::remove_dir_all(&root);
        result.map_err(|error| HostError::IsolationUnavailable {
            reason: format!("overlay mounts do not work here: {error}"),
        })
    }

    /// Run `agent_bin --version` the way sandboxes run.
    async fn probe_bwrap(&self, agent_bin: &Path) -> Result<(), HostError> {
        let unavailable = |reason: String| HostError::IsolationUnavailable { reason };
        let mut command = self
            .command()
            .agent_bin(agent_bin)
            .exec([OsStr::new(AGENT_PATH), OsStr::new("--version")])
            .into_command()?;
        command.kill_on_drop(true);
        let output = match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => {
                return Err(unavailable(format!(
                    "could not start bubblewrap as uid {}: {error}",
                    self.config.sandbox_uid
                )))
            }
            Err(_) => return Err(unavailable("bubblewrap did not finish in time".to_owned())),
        };
        if output.status.success() {
            Ok(())
        } else {
            Err(unavailable(format!(
                "bubblewrap as uid {} could not run {} --version ({}): {}",
                self.config.sandbox_uid,
                agent_bin.display(),
                output.status,
                crate::seed::truncate(String::from_utf8_lossy(&output.stderr).trim(), 500)
            )))
        }
    }

    /// Remove what an earlier run of the host left in the runtime directory: overlays still mounted,
    /// cgroups, files. (A host forgets its sandboxes when it stops; their processes died with it.)
    async fn sweep_stale(&self) {
        let Ok(entries) = std::fs::read_dir(self.sandboxes_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dirs = self.dirs(&name);
            if let Some(roots) = &self.cgroups {
                if let Err(error) = roots.existing(&name).remove().await {
                    tracing::warn!(sandbox_id = %name, %error, "could not remove a stale sandbox's cgroups");
                }
            }
            match self.remove_dirs(&dirs) {
                Ok(()) => {
                    tracing::info!(sandbox_id = %name, "removed a stale sandbox of an earlier run")
                }
                Err(error) => {
                    tracing::warn!(sandbox_id = %name, %error, "could not remove a stale sandbox")
                }
            }
        }
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), HostError> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_error("create directory", path))?;
    // The umask may have taken bits away.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error("change mode of", path))
}

/// A path that can go into overlay mount options: absolute, UTF-8, and without the option syntax's
/// separators and escapes (`:` `,` `\`) or control characters.
fn check_mount_path(path: &Path) -> Result<&str, HostError> {
    let invalid = |reason| HostError::InvalidMountPath {
        path: path.to_owned(),
        reason,
    };
    let text = path.to_str().ok_or_else(|| invalid("not utf-8"))?;
    if !path.is_absolute() {
        return Err(invalid("not absolute"));
    }
    if text.contains([':', ',', '\\']) || text.chars().any(char::is_control) {
        return Err(invalid("contains ':', ',', '\\' or a control character"));
    }
    Ok(text)
}

fn c_path(path: &Path) -> Result<CString, HostError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| HostError::InvalidMountPath {
        path: path.to_owned(),
        reason: "contains a nul byte",
    })
}

/// Mount an overlay at `merged`: `lower` layers (topmost first), the writable `upper` layer and its
/// `work` directory (both on the same filesystem). `nosuid` and `nodev`. Needs root.
pub fn mount_overlay(
    lower: &[&Path],
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), HostError> {
    if lower.is_empty() {
        return Err(HostError::InvalidMountPath {
            path: merged.to_owned(),
            reason: "an overlay needs at least one lower layer",
        });
    }
    let lowers = lower
        .iter()
        .map(|path| check_mount_path(path))
        .collect::<Result<Vec<&str>, HostError>>()?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        check_mount_path(upper)?,
        check_mount_path(work)?
    );
    check_mount_path(merged)?;
    let options = CString::new(options).map_err(|_| HostError::InvalidMountPath {
        path: merged.to_owned(),
        reason: "contains a nul byte",
    })?;
    let target = c_path(merged)?;
    // SAFETY: every pointer is a valid nul-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(HostError::Mount {
            action: "mount an overlay on",
            path: merged.to_owned(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Bind `source` (a directory) at `target`, as root, in the host's mount namespace: how an image's
/// staging tree, which the sandbox uid cannot reach where it is, becomes a sandbox's bind source.
/// [`unmount`] (or [`Isolation::remove_dirs`]) undoes it.
pub fn bind_mount(source: &Path, target: &Path) -> Result<(), HostError> {
    let (from, to) = (c_path(source)?, c_path(target)?);
    // SAFETY: both pointers are valid nul-terminated strings that outlive the call; a bind mount
    // reads neither the filesystem type nor the data argument.
    let result = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(HostError::Mount {
            action: "bind-mount onto",
            path: target.to_owned(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Unmount whatever is mounted at `merged`; when it is busy, detach it lazily (it goes once the last
/// user is gone). Nothing mounted there is fine.
pub fn unmount(merged: &Path) -> Result<(), HostError> {
    let target = c_path(merged)?;
    // SAFETY: `target` is a valid nul-terminated string.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        // Not a mount point, or not there at all.
        Some(libc::EINVAL | libc::ENOENT) => Ok(()),
        Some(libc::EBUSY) => {
            tracing::warn!(path = %merged.display(), "overlay busy; detaching it lazily");
            // SAFETY: as above.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(HostError::Mount {
                    action: "detach",
                    path: merged.to_owned(),
                    source: std::io::Error::last_os_error(),
                })
            }
        }
        _ => Err(HostError::Mount {
            action: "unmount",
            path: merged.to_owned(),
            source: error,
        }),
    }
}

/// A command line being assembled.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<I, S>(&mut self, items: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0
            .extend(items.into_iter().map(|a| a.as_ref().to_owned()));
    }
}

/// One bind mount of an [`IsolatedCommand`].
#[derive(Debug, Clone)]
struct Bind {
    source: PathBuf,
    destination: &'static str,
    read_only: bool,
}

/// A program to run inside a sandbox under bubblewrap; [`IsolatedCommand::into_command`] gives the
/// `tokio::process::Command`. See the module documentation for what the sandbox sees.
#[derive(Debug, Clone)]
pub struct IsolatedCommand {
    bwrap: PathBuf,
    uid: u32,
    gid: u32,
    binds: Vec<Bind>,
    env: Vec<(OsString, OsString)>,
    argv: Vec<OsString>,
    cgroup_procs: Vec<PathBuf>,
}

impl IsolatedCommand {
    /// Run under `bwrap` as host `uid`/`gid` (root inside). Without [`Self::exec`] or
    /// [`Self::run_agent`] it runs `/bin/sh`.
    pub fn new(bwrap: &Path, uid: u32, gid: u32) -> IsolatedCommand {
        IsolatedCommand {
            bwrap: bwrap.to_owned(),
            uid,
            gid,
            binds: Vec::new(),
            env: Vec::new(),
            argv: vec![OsString::from("/bin/sh")],
            cgroup_procs: Vec::new(),
        }
    }

    fn bind(mut self, source: &Path, destination: &'static str, read_only: bool) -> Self {
        self.binds.retain(|bind| bind.destination != destination);
        self.binds.push(Bind {
            source: source.to_owned(),
            destination,
            read_only,
        });
        self
    }

    /// The overlay (or any directory) as [`WORKSPACE_PATH`], read-write; the program starts there.
    pub fn workspace(self, merged: &Path) -> Self {
        self.bind(merged, WORKSPACE_PATH, false)
    }

    /// The state directory as [`STATE_PATH`], read-write.
    pub fn state(self, dir: &Path) -> Self {
        self.bind(dir, STATE_PATH, false)
    }

    /// The egress proxy's socket as [`EGRESS_SOCKET_PATH`].
    pub fn egress_socket(self, socket: &Path) -> Self {
        self.bind(socket, EGRESS_SOCKET_PATH, false)
    }

    /// The agent binary as [`AGENT_PATH`], read-only.
    pub fn agent_bin(self, agent_bin: &Path) -> Self {
        self.bind(agent_bin, AGENT_PATH, true)
    }

    /// Run the agent: `agent_bin` as [`AGENT_PATH`], started as `AGENT_PATH run --state-dir /state`.
    pub fn run_agent(self, agent_bin: &Path) -> Self {
        self.agent_bin(agent_bin).exec([
            OsStr::new(AGENT_PATH),
            OsStr::new("run"),
            OsStr::new("--state-dir"),
            OsStr::new(STATE_PATH),
        ])
    }

    /// The program (a path inside the sandbox) and its arguments.
    pub fn exec<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv = argv.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Add variables to the program's environment (which starts empty).
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.env.extend(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// Start inside `cgroup` (joined before bubblewrap execs).
    pub fn cgroup(mut self, cgroup: &Cgroup) -> Self {
        self.cgroup_procs = cgroup.procs_files().to_vec();
        self
    }

    /// bubblewrap's arguments (everything after `bwrap`).
    pub fn bwrap_args(&self) -> Vec<OsString> {
        let mut args = Args::default();
        args.push([
            "--unshare-user",
            "--uid",
            "0",
            "--gid",
            "0",
            "--cap-add",
            "ALL",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--unshare-cgroup-try",
            "--hostname",
            HOSTNAME,
            "--die-with-parent",
            "--new-session",
        ]);
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        args.push([OsStr::new("--symlink"), target.as_os_str(), OsStr::new(dir)]);
                    }
                }
                Ok(meta) if meta.is_dir() => args.push(["--ro-bind", dir, dir]),
                _ => {}
            }
        }
        for entry in ETC_ENTRIES {
            let path = Path::new("/etc").join(entry);
            args.push([
                OsStr::new("--ro-bind-try"),
                path.as_os_str(),
                path.as_os_str(),
            ]);
        }
        args.push(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        for bind in &self.binds {
            let flag = if bind.read_only {
                "--ro-bind"
            } else {
                "--bind"
            };
            args.push([
                OsStr::new(flag),
                bind.source.as_os_str(),
                OsStr::new(bind.destination),
            ]);
        }
        let start = if self.binds.iter().any(|b| b.destination == WORKSPACE_PATH) {
            WORKSPACE_PATH
        } else {
            "/"
        };
        args.push(["--chdir", start, "--"]);
        args.push(&self.argv);
        args.0
    }

    /// The command: bubblewrap in its own process group, from `/`, with exactly the given environment;
    /// before it execs, the child joins the cgroups and drops to the sandbox uid/gid.
    pub fn into_std(self) -> Result<std::process::Command, HostError> {
        use std::os::unix::process::CommandExt as _;
        let procs = self
            .cgroup_procs
            .iter()
            .map(|path| c_path(path))
            .collect::<Result<Vec<CString>, HostError>>()?;
        let (uid, gid) = (self.uid, self.gid);
        let mut command = std::process::Command::new(&self.bwrap);
        command
            .args(self.bwrap_args())
            .env_clear()
            .envs(self.env)
            .current_dir("/")
            .process_group(0);
        let join_and_drop = move || -> std::io::Result<()> {
            for path in &procs {
                // Only async-signal-safe calls from here on: this runs between fork and exec.
                // SAFETY: `path` is a valid nul-terminated string; the buffer is 1 byte long.
                unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // `0` is "the writing process" in cgroup v1.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
            }
            // SAFETY: plain system calls without pointers to Rust memory (setgroups gets none).
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the hook makes only async-signal-safe system calls and allocates nothing.
        unsafe { command.pre_exec(join_and_drop) };
        Ok(command)
    }

    /// [`Self::into_std`] as a `tokio::process::Command`.
    pub fn into_command(self) -> Result<tokio::process::Command, HostError> {
        self.into_std().map(tokio::process::Command::from)
    }
}

pub mod setup;
#[cfg(test)]
pub(crate) mod tests;

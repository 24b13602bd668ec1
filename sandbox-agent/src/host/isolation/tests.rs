//! Isolation on this machine, with the real bubblewrap, overlayfs and cgroups (root needed; CI runs as
//! root). Without root these tests say so and pass without checking anything else.

use std::process::Output;

use tokio::net::TcpListener;

use super::*;
use crate::host::egress::{AllowList, EgressProxy};

/// A runtime directory on tmpfs for a test. Dropped, it takes with it whatever sandboxes are left in
/// it — mounts, cgroups, processes — also when the test failed half-way.
pub(crate) struct TestRuntime {
    dir: tempfile::TempDir,
}

impl TestRuntime {
    pub(crate) fn new() -> TestRuntime {
        TestRuntime {
            dir: tempfile::tempdir_in("/dev/shm").unwrap(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRuntime {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("sandboxes")) else {
            return;
        };
        for entry in entries.flatten() {
            let _ = unmount(&entry.path().join("merged"));
            for controller in ["memory", "pids"] {
                let cgroup = Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join("nightshift")
                    .join(entry.file_name());
                for _ in 0..200 {
                    for pid in std::fs::read_to_string(cgroup.join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
                    {
                        // SAFETY: only sends a signal, to a process of a test's sandbox.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    if std::fs::remove_dir(&cgroup).is_ok() || !cgroup.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Isolation in a fresh runtime directory on tmpfs, with `limits`; `None` (and a notice) when not
/// running as root. As root, isolation must work: a failure here is a failure.
pub(crate) async fn isolation(limits: Option<Limits>) -> Option<(TestRuntime, Isolation)> {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping an isolation test (CI runs them as root)");
        return None;
    }
    let runtime = TestRuntime::new();
    let mut config = IsolationConfig {
        runtime_dir: Some(runtime.path().to_owned()),
        ..IsolationConfig::default()
    };
    if let Some(limits) = limits {
        config.memory_limit_bytes = limits.memory_bytes;
        config.pids_limit = limits.pids;
    }
    let isolation = Isolation::detect(
        &config,
        Path::new("/nonexistent"),
        Path::new("/usr/bin/true"),
    )
    .await
    .unwrap_or_else(|error| panic!("isolation must work as root: {error}"));
    Some((runtime, isolation))
}

/// A sandbox whose lower layer holds `files`, its overlay mounted.
fn sandbox(isolation: &Isolation, files: &[(&str, &str)]) -> SandboxDirs {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let dirs = isolation.create_dirs(&id).unwrap();
    for (name, text) in files {
        std::fs::write(dirs.lower.join(name), text).unwrap();
        isolation.hand_over(&dirs.lower.join(name)).unwrap();
    }
    mount_overlay(&[&dirs.lower], &dirs.upper, &dirs.work, &dirs.merged).unwrap();
    dirs
}

fn command(isolation: &Isolation, dirs: &SandboxDirs, script: &str) -> IsolatedCommand {
    isolation
        .command()
        .workspace(&dirs.merged)
        .state(&dirs.state)
        .envs([("PATH", SANDBOX_PATH), ("HOME", HOME_PATH)])
        .exec(["/bin/sh", "-c", script])
}

async fn run(command: IsolatedCommand) -> Output {
    let mut command = command.into_command().unwrap();
    command.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the sandbox finishes within 60 s")
        .unwrap()
}

fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether `path` is a mount point in this (the host's) mount namespace.
fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(mount_point) == path)
}

#[test]
fn mount_paths_are_checked() {
    let ok = Path::new("/dev/shm/x");
    for (lower, upper) in [
        ("/a:b", "/dev/shm/u"),
        ("/a,upperdir=/etc", "/dev/shm/u"),
        ("relative", "/dev/shm/u"),
        ("/dev/shm/l", "/dev/shm/u\\x"),
        ("/dev/shm/l", "/dev/shm/u\nx"),
    ] {
        let error = mount_overlay(&[Path::new(lower)], Path::new(upper), ok, ok).unwrap_err();
        assert!(
            matches!(error, HostError::InvalidMountPath { .. }),
            "{lower} {upper}: {error}"
        );
    }
    let error = mount_overlay(&[], ok, ok, ok).unwrap_err();
    assert!(matches!(error, HostError::InvalidMountPath { .. }));
    // Nothing mounted there: nothing to do.
    unmount(Path::new("/dev/shm/nightshift-surely-not-mounted")).unwrap();
}

#[test]
fn runtime_dir_depends_on_the_data_dir() {
    let a = default_runtime_dir(Path::new("/srv/a"));
    let b = default_runtime_dir(Path::new("/srv/b"));
    assert_ne!(a, b);
    assert_eq!(a, default_runtime_dir(Path::new("/srv/a")));
    let name = a.file_name().unwrap().to_str().unwrap();
    assert!(a.starts_with("/dev/shm"));
    assert_eq!(name.len(), "nightshift-host-".len() + 8, "{name}");
}

#[test]
fn command_line_has_every_namespace_and_no_environment() {
    let command = IsolatedCommand::new(Path::new("/usr/bin/bwrap"), 5, 6)
        .workspace(Path::new("/rt/merged"))
        .state(Path::new("/rt/state"))
        .egress_socket(Path::new("/rt/egress.sock"))
        .envs([("NIGHTSHIFT_SANDBOX_TOKEN", "sbx-secret")])
        .run_agent(Path::new("/opt/bin/sandbox-agent"));
    let args: Vec<String> = command
        .bwrap_args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let line = args.join(" ");
    for expected in [
        "--unshare-user --uid 0 --gid 0 --cap-add ALL --unshare-pid --unshare-ipc --unshare-uts \
         --unshare-net --unshare-cgroup-try --hostname nightshift-sandbox --die-with-parent --new-session",
        "--ro-bind-try /etc/passwd /etc/passwd",
        "--proc /proc --dev /dev --tmpfs /tmp",
        "--bind /rt/merged /workspace",
        "--bind /rt/state /state",
        "--bind /rt/egress.sock /run/nightshift/egress.sock",
        "--ro-bind /opt/bin/sandbox-agent /opt/nightshift/sandbox-agent",
        "--chdir /workspace -- /opt/nightshift/sandbox-agent run --state-dir /state",
    ] {
        assert!(line.contains(expected), "{expected}\nin: {line}");
    }
    assert!(line.contains("--ro-bind /usr /usr"), "{line}");
    assert!(
        !line.contains("sbx-secret"),
        "secrets never go on a command line: {line}"
    );
    assert!(
        !line.contains("--ro-bind /etc /etc") && !line.contains("/root"),
        "{line}"
    );
    let std = command.into_std().unwrap();
    let env: Vec<_> = std.get_envs().collect();
    assert_eq!(env.len(), 1);
}

#[tokio::test]
async fn a_sandbox_sees_nothing_of_the_host_but_its_binds() {
    let Some((runtime, isolation)) = isolation(None).await else {
        return;
    };
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("secret.txt"), "host secret").unwrap();
    let dirs = sandbox(&isolation, &[("README.md", "in the image")]);
    let script = format!(
        "id -u; cat /proc/self/uid_map; \
         for p in {secret} {runtime} /root /work /etc/shadow /home /var /dev/shm/{runtime_name}; do \
           if [ -e \"$p\" ]; then echo \"VISIBLE $p\"; fi; done; \
         ls /; ls /etc | tr '\\n' ' '; echo; \
         cat /workspace/README.md; echo; echo written > /workspace/new.txt; \
         touch /usr/nightshift-probe 2>/dev/null && echo USR-WRITABLE; \
         mount -o remount,rw,bind /usr 2>/dev/null; touch /usr/nightshift-probe 2>/dev/null && echo USR-WRITABLE-AFTER-REMOUNT; \
         hostname; pwd; echo \"HOME=$HOME\"; env | sort | tr '\\n' ' '",
        secret = host_dir.path().join("secret.txt").display(),
        runtime = runtime.path().display(),
        runtime_name = runtime.path().file_name().unwrap().to_string_lossy(),
    );
    let output = run(command(&isolation, &dirs, &script)).await;
    let text = text_of(&output);
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("VISIBLE"), "{text}");
    assert!(!text.contains("USR-WRITABLE"), "{text}");
    assert!(!Path::new("/usr/nightshift-probe").exists());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"), "{text}");
    let map: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        map,
        ["0", &DEFAULT_SANDBOX_UID.to_string(), "1"],
        "root inside is the sandbox uid outside"
    );
    assert!(text.contains("in the image"), "{text}");
    assert!(
        text.contains("nightshift-sandbox\n/workspace\nHOME=/state/home\n"),
        "{text}"
    );
    assert!(
        text.contains("HOME=/state/home PATH="),
        "only the given environment: {text}"
    );
    // What the sandbox wrote is in its upper layer, as the sandbox uid, and not in the image.
    let written = dirs.upper.join("new.txt");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "written\n");
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&written).unwrap().uid(),
        DEFAULT_SANDBOX_UID
    );
    assert!(!dirs.lower.join("new.txt").exists());
    isolation.remove_dirs(&dirs).unwrap();
}

#[tokio::test]
async fn sandboxes_cannot_see_each_other() {
    let Some((_runtime, isolation)) = isolation(None).await else {
        return;
    };
    let first = sandbox(&isolation, &[("first-marker.txt", "first")]);
    let second = sandbox(&isolation, &[("second-marker.txt", "second")]);
    // A duration no other test uses, so the host-side search finds this sleep and no other.
    let mut long = command(&isolation, &first, "sleep 60.4277")
        .into_command()
        .unwrap();
    long.kill_on_drop(true);
    let mut long = long.spawn().unwrap();
    // Wait until the first sandbox's sleep runs (as the sandbox uid, on the host).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let sleeper = loop {
        let found = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .find_map(|entry| {
                let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                (cmdline == b"sleep\x0060.4277\x00").then_some(pid)
            });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first sandbox's sleep never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(
        uid_line.contains(&DEFAULT_SANDBOX_UID.to_string()),
        "{uid_line}"
    );

    let script = "ls /workspace; for p in /proc/[0-9]*; do echo \"process $(cat $p/comm)\"; done; \
                  find / -name 'first-marker*' -not -path '/proc/*' -not -path '/usr/*' 2>/dev/null";
    let output = run(command(&isolation, &second, script)).await;
    let text = text_of(&output);
    assert!(text.contains("second-marker.txt"), "{text}");
    assert!(!text.contains("first-marker"), "{text}");
    assert!(text.contains("process sh"), "{text}");
    assert!(
        !text.contains("process sleep"),
        "the other sandbox's processes are invisible: {text}"
    );
    let _ = long.kill().await;
    for dirs in [&first, &second] {
        isolation.remove_dirs(dirs).unwrap();
    }
}

#[tokio::test]
async fn no_network_but_the_egress_socket() {
    let Some((_runtime, isolation)) = isolation(None).await else {
        return;
    };
    let allowed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_address = allowed.local_addr().unwrap();
    let app =
        axum::Router::new().route("/", axum::routing::get(|| async { "hello from the host" }));
    tokio::spawn(async move { axum::serve(allowed, app).await });
    let forbidden = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let forbidden_port = forbidden.local_addr().unwrap().port();

    let dirs = sandbox(&isolation, &[]);
    let mut allow = AllowList::default();
    allow
        .allow_url(&format!("http://{allowed_address}"))
        .unwrap();
    let proxy = EgressProxy::start(&dirs.egress_socket, allow, "net-test", None).unwrap();
    isolation.hand_over(&dirs.egress_socket).unwrap();
    let socket = EGRESS_SOCKET_PATH;
    let script = format!(
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; \
         for target in 127.0.0.1/{allowed_port} 127.0.0.1/{forbidden_port} 10.0.0.1/80 1.1.1.1/443; do \
           if (exec 3<>/dev/tcp/$target) 2>/dev/null; then echo \"CONNECTED $target\"; fi; done; \
         curl -sS --max-time 10 --unix-socket {socket} --request-target http://{allowed_address}/ http://{allowed_address}/; echo; \
         curl -sS --max-time 10 --unix-socket {socket} --request-target http://127.0.0.1:{forbidden_port}/ http://127.0.0.1:{forbidden_port}/",
        allowed_port = allowed_address.port(),
    );
    let output = run(command(&isolation, &dirs, &script).egress_socket(&dirs.egress_socket)).await;
    let text = text_of(&output);
    assert_eq!(text.lines().next(), Some("lo"), "only loopback: {text}");
    assert!(!text.contains("CONNECTED"), "no direct connection: {text}");
    assert!(
        text.contains("hello from the host"),
        "allowed through the proxy: {text}"
    );
    assert!(
        text.contains("is not on this sandbox's allow-list"),
        "{text}"
    );
    let refused: Vec<String> = proxy.refused().into_iter().map(|r| r.target).collect();
    assert_eq!(refused, [format!("127.0.0.1:{forbidden_port}")]);
    proxy.stop();
    isolation.remove_dirs(&dirs).unwrap();
}

#[tokio::test]
async fn nested_bubblewrap_works_inside() {
    let Some((_runtime, isolation)) = isolation(None).await else {
        return;
    };
    let dirs = sandbox(&isolation, &[]);
    // The bash tool's own command line, as `run/tools/bash.rs` builds it.
    let script = "bwrap --dev-bind / / --unshare-pid --proc /proc --ro-bind /workspace/ro /workspace/ro \
                  --die-with-parent --chdir /workspace -- bash -c 'echo nested pid $$; echo from-nested > out.txt; \
                  touch ro/x 2>/dev/null || echo ro-holds'";
    std::fs::create_dir(dirs.lower.join("ro")).unwrap();
    let output = run(command(&isolation, &dirs, script)).await;
    let text = text_of(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("nested pid 2") || text.contains("nested pid 1"),
        "{text}"
    );
    assert!(text.contains("ro-holds"), "{text}");
    assert_eq!(
        std::fs::read_to_string(dirs.upper.join("out.txt")).unwrap(),
        "from-nested\n"
    );
    isolation.remove_dirs(&dirs).unwrap();
}

#[tokio::test]
async fn memory_and_process_limits_apply_and_teardown_leaves_nothing() {
    let limits = Limits {
        memory_bytes: 64 << 20,
        pids: 32,
    };
    let Some((_runtime, isolation)) = isolation(Some(limits)).await else {
        return;
    };
    assert_eq!(isolation.describe_limits(), "memory_bytes=67108864 pids=32");
    let dirs = sandbox(&isolation, &[]);
    let id = dirs
        .root
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cgroup = isolation
        .create_cgroup(&id)
        .unwrap()
        .expect("cgroups are writable here (as root)");
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap().trim().to_owned();
    assert_eq!(
        read(cgroup.memory_dir().join("memory.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(read(cgroup.pids_dir().join("pids.max")), "32");

    // dash forks without retrying: past the limit it fails at once.
    let forks = "i=0; while [ $i -lt 60 ]; do sleep 5 & i=$((i+1)); done; echo forked $i";
    let output = run(command(&isolation, &dirs, forks).cgroup(&cgroup)).await;
    let text = text_of(&output);
    assert!(
        text.contains("fork"),
        "the pid limit stops the fork loop: {text}"
    );
    assert!(!text.contains("forked 60"), "{text}");

    let hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}";
    let output = run(command(&isolation, &dirs, hog).cgroup(&cgroup)).await;
    let text = text_of(&output);
    assert!(
        !text.contains("survived"),
        "the memory limit stops the hog: {text}"
    );
    assert!(!output.status.success(), "{:?}", output.status);
    // It got as far as the limit, and no further.
    let peak: u64 = read(cgroup.memory_dir().join("memory.max_usage_in_bytes"))
        .parse()
        .unwrap();
    assert!(
        peak <= limits.memory_bytes && peak > limits.memory_bytes / 10 * 9,
        "peak {peak}"
    );

    // A sandbox still running at teardown: killed, unmounted, removed.
    let mut running = command(&isolation, &dirs, "sleep 60 & sleep 60")
        .cgroup(&cgroup)
        .into_command()
        .unwrap();
    running.kill_on_drop(true);
    let mut running = running.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cgroup.processes().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            cgroup.processes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(mounted(&dirs.merged));
    cgroup.remove().await.unwrap();
    isolation.remove_dirs(&dirs).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    assert!(!mounted(&dirs.merged));
    assert!(!dirs.root.exists());
    assert!(!cgroup.memory_dir().exists() && !cgroup.pids_dir().exists());
}

#[tokio::test]
async fn detection_sweeps_what_an_earlier_run_left() {
    let Some((runtime, isolation)) = isolation(None).await else {
        return;
    };
    let dirs = sandbox(&isolation, &[("a", "b")]);
    let id = dirs
        .root
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cgroup = isolation.create_cgroup(&id).unwrap();
    assert!(mounted(&dirs.merged));
    // The host "restarts" on the same runtime directory.
    let config = IsolationConfig {
        runtime_dir: Some(runtime.path().to_owned()),
        ..IsolationConfig::default()
    };
    let again = Isolation::detect(
        &config,
        Path::new("/nonexistent"),
        Path::new("/usr/bin/true"),
    )
    .await
    .unwrap();
    assert!(!mounted(&dirs.merged));
    assert!(!dirs.root.exists());
    if let Some(cgroup) = cgroup {
        assert!(!cgroup.memory_dir().exists());
    }
    drop(again);
}

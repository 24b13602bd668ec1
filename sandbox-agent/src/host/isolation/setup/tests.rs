//! The isolated setup runner on this machine (root needed; CI runs as root): the way out is the
//! allow-list only, and a setup over its time limit leaves nothing behind. What a setup can see is
//! checked through a whole image build in `host::tests`.

use std::collections::HashSet;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use super::*;
use crate::host::isolation::tests::isolation;

/// Run `script` (by `/bin/sh -c`) as a setup on `tree` through `runner`; how it ended, and its output.
async fn run_setup(
    runner: &IsolatedRunner,
    tree: &Path,
    script: &str,
    timeout: Duration,
) -> (SetupExit, String) {
    let (mut reader, writer) = io::pipe().unwrap();
    let collector = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        text
    });
    let exit = runner
        .run(SetupCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: tree.to_owned(),
            env: vec![
                ("PATH".into(), "/host/path".into()),
                ("HOME".into(), "/root".into()),
            ],
            output: writer,
            timeout,
        })
        .await
        .unwrap();
    (exit, collector.join().unwrap())
}

/// A tree owned by the sandbox uid (as the image build hands it over), in the test's runtime directory.
fn tree(runtime: &Path, isolation: &Isolation) -> PathBuf {
    let tree = runtime.join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("README.md"), "in the tree").unwrap();
    let (uid, gid) = isolation.sandbox_ids();
    for path in [tree.clone(), tree.join("README.md")] {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
    }
    tree
}

/// Processes on the host whose command line is exactly `argv` (NUL-separated).
fn processes_running(argv: &[u8]) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == argv)
        })
        .count()
}

/// The setup runtime directories (`setup-*`) left in the runtime directory.
fn setup_dirs_left(runtime: &Path) -> Vec<String> {
    std::fs::read_dir(runtime.join("sandboxes"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("setup-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_setup_reaches_its_allow_list_through_the_proxy_and_nothing_else() {
    let Some((runtime, isolation)) = isolation(None).await else {
        return;
    };
    let allowed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_address = allowed.local_addr().unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "from a registry" }));
    tokio::spawn(async move { axum::serve(allowed, app).await });
    let forbidden = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forbidden_port = forbidden.local_addr().unwrap().port();
    let mut allow = AllowList::default();
    allow
        .allow_url(&format!("http://{allowed_address}"))
        .unwrap();
    let runner = IsolatedRunner::new(
        isolation.clone(),
        &crate::host::tests::agent_binary(),
        allow,
    );
    let tree = tree(runtime.path(), &isolation);
    let script = format!(
        "pwd; cat README.md; echo; echo \"HOME=$HOME PATH=$PATH\"; \
         curl -sS --max-time 10 http://{allowed_address}/; echo; \
         curl -sS --max-time 10 http://127.0.0.1:{forbidden_port}/; echo; \
         curl -sS --noproxy '*' --max-time 5 http://{allowed_address}/ || echo NO-DIRECT-ROUTE; \
         echo cached > cache.txt"
    );
    let (exit, output) = run_setup(&runner, &tree, &script, Duration::from_secs(60)).await;
    assert_eq!(
        exit,
        SetupExit::Exited {
            code: Some(0),
            signal: None
        },
        "{output}"
    );
    assert!(output.starts_with("/workspace\nin the tree\n"), "{output}");
    assert!(
        output.contains(&format!("HOME={HOME_PATH} PATH={SANDBOX_PATH}")),
        "the sandbox's PATH and HOME, not the host's: {output}"
    );
    assert!(output.contains("from a registry"), "{output}");
    assert!(
        output.contains("is not on this sandbox's allow-list"),
        "{output}"
    );
    assert!(output.contains("NO-DIRECT-ROUTE"), "{output}");
    // The setup wrote into the tree itself, as the sandbox uid.
    use std::os::unix::fs::MetadataExt as _;
    let cached = std::fs::metadata(tree.join("cache.txt")).unwrap();
    assert_eq!(cached.uid(), isolation.sandbox_ids().0);
    assert!(setup_dirs_left(runtime.path()).is_empty());
}

#[tokio::test]
async fn a_setup_over_its_time_limit_is_killed_with_everything_it_started() {
    let Some((runtime, isolation)) = isolation(None).await else {
        return;
    };
    let runner = IsolatedRunner::new(
        isolation.clone(),
        &crate::host::tests::agent_binary(),
        AllowList::default(),
    );
    let tree = tree(runtime.path(), &isolation);
    // Note the setup's id (its runtime directory's name) while it runs, to look for its cgroups later,
    // and the most processes its pids cgroup held, with the limit it had.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let cgroup_peak = Arc::new(Mutex::new((0usize, String::new())));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (seen, cgroup_peak, watching) = (
            Arc::clone(&seen),
            Arc::clone(&cgroup_peak),
            Arc::clone(&watching),
        );
        let runtime = runtime.path().to_owned();
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                for id in setup_dirs_left(&runtime) {
                    let cgroup = Path::new("/sys/fs/cgroup/pids/nightshift").join(&id);
                    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                        .count();
                    let limit =
                        std::fs::read_to_string(cgroup.join("pids.max")).unwrap_or_default();
                    let mut peak = cgroup_peak.lock().unwrap();
                    if procs > peak.0 {
                        *peak = (procs, limit.trim().to_owned());
                    }
                    seen.lock().unwrap().insert(id);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = std::time::Instant::now();
    let (exit, output) = run_setup(
        &runner,
        &tree,
        "echo started; (setsid sleep 3141 &); sleep 3142 & sleep 3143",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(exit, SetupExit::TimedOut, "{output}");
    assert!(output.contains("started"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(20));
    for argv in [
        &b"sleep\x003141\x00"[..],
        b"sleep\x003142\x00",
        b"sleep\x003143\x00",
    ] {
        assert_eq!(
            processes_running(argv),
            0,
            "{}",
            String::from_utf8_lossy(argv)
        );
    }
    assert!(
        setup_dirs_left(runtime.path()).is_empty(),
        "the setup's runtime directory is gone"
    );
    watching.store(false, Ordering::SeqCst);
    watcher.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one setup ran: {seen:?}");
    let (procs, limit) = cgroup_peak.lock().unwrap().clone();
    assert!(
        procs >= 4,
        "the setup and everything it started ran in its pids cgroup: {procs}"
    );
    assert_eq!(
        limit,
        crate::host::isolation::DEFAULT_PIDS_LIMIT.to_string()
    );
    for id in &seen {
        for controller in ["memory", "pids"] {
            let cgroup = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("nightshift")
                .join(id);
            assert!(!cgroup.exists(), "{} is left", cgroup.display());
        }
    }
    // The tree itself is untouched by the teardown (it was only bound, never deleted).
    assert_eq!(
        std::fs::read_to_string(tree.join("README.md")).unwrap(),
        "in the tree"
    );
}

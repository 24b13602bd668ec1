//! Tests of the host through its HTTP surface: in-process with `oneshot` where no socket is needed,
//! and on an ephemeral loopback port with the real `git` client and a fake agent script otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;
use crate::seed::{git_command, seed_repo};

const TOKEN: &str = "test-provider-token";

fn config(data_dir: &Path, agent_bin: &Path) -> HostConfig {
    HostConfig {
        data_dir: data_dir.to_owned(),
        runtime_dir: data_dir.join("runtime"),
        public_url: None,
        agent_bin: agent_bin.to_owned(),
        provider_token: TOKEN.to_owned(),
        model: ModelConfig::default(),
        agent_log_filter: "debug".to_owned(),
        isolation: None,
        on_deadline: None,
        pool_max: DEFAULT_POOL_MAX,
    }
}

/// The app without a socket; `base_url` is never dialled by these tests.
fn app_in(data_dir: &Path) -> Router {
    let state = AppState::new(
        config(data_dir, Path::new("/bin/true")),
        "http://127.0.0.1:9",
    )
    .unwrap();
    app(state)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map_or_else(Body::empty, |body| Body::from(body.to_string()));
    let response = app
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

fn create_body(repo: &str) -> Value {
    json!({
        "repo": repo,
        "session_id": "session-1",
        "connect_url": "ws://127.0.0.1:1/sandbox/session-1/ws",
        "sandbox_token": "sandbox-secret",
        "timeout_ms": 60_000,
    })
}

#[tokio::test]
async fn provider_api_requires_the_bearer_token() {
    let data = tempfile::tempdir().unwrap();
    let app = app_in(data.path());
    for token in [
        None,
        Some("wrong"),
        Some(""),
        Some("test-provider-token-and-more"),
    ] {
        let (status, body) = call(&app, "GET", "/v1/sandboxes", token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = call(
            &app,
            "POST",
            "/v1/sandboxes",
            token,
            Some(create_body("demo/hello")),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&app, "DELETE", "/v1/sandboxes/abc", token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        for (method, uri) in [
            ("POST", "/v1/sandboxes/abc/snapshot"),
            ("POST", "/v1/images"),
            ("GET", "/v1/images?repo=demo/hello"),
            ("GET", "/v1/images/0123456789abcdef"),
            ("GET", "/v1/images/0123456789abcdef/log"),
            ("POST", "/v1/pools/demo/hello"),
            ("GET", "/v1/pools"),
        ] {
            let (status, _) = call(
                &app,
                method,
                uri,
                token,
                Some(json!({"repo": "demo/hello"})),
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        }
    }
    // Another scheme with the right secret is not a bearer token.
    let request = Request::get("/v1/sandboxes").header("authorization", format!("Basic {TOKEN}"));
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");

    let (status, body) = call(&app, "GET", "/v1/sandboxes", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"sandboxes": []}));
    let (status, body) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!("ok")));
    let (status, _) = call(&app, "GET", "/v1/pools", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn token_comparison() {
    assert!(api::token_matches("abc", "abc"));
    assert!(!api::token_matches("abd", "abc"));
    assert!(!api::token_matches("abcd", "abc"));
    assert!(!api::token_matches("", ""));
}

#[tokio::test]
async fn bad_repository_names_are_refused_before_the_filesystem() {
    let data = tempfile::tempdir().unwrap();
    let app = app_in(data.path());
    // A valid but missing repository is a 404; these are 400, so they were refused before any
    // lookup.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/sandboxes",
        Some(TOKEN),
        Some(create_body("nobody/nothing")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    for bad in [
        "../x",
        "a/../../b",
        ".hidden/x",
        "demo",
        "a/b/c",
        "-a/b",
        "",
    ] {
        let (status, body) = call(
            &app,
            "POST",
            "/v1/sandboxes",
            Some(TOKEN),
            Some(create_body(bad)),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{bad}");
    }
    let (status, _) = call(
        &app,
        "GET",
        "/git/nobody/nothing.git/info/refs?service=git-upload-pack",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for bad in [
        "/git/..%2F..%2Fetc/x.git/info/refs?service=git-upload-pack",
        "/git/.hidden/x.git/info/refs?service=git-upload-pack",
        "/git/a/..git/info/refs?service=git-upload-pack",
        "/git/a/%2E%2E.git/info/refs?service=git-upload-pack",
        "/git/a/b%2F..%2F..%2Fc.git/info/refs?service=git-upload-pack",
    ] {
        let (status, body) = call(&app, "GET", bad, None, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let sandboxes = std::fs::read_dir(data.path().join("sandboxes"))
        .unwrap()
        .count();
    let repos = std::fs::read_dir(data.path().join("git")).unwrap().count();
    assert_eq!((sandboxes, repos), (0, 0));
}

#[tokio::test]
async fn bad_bodies_get_typed_errors() {
    let data = tempfile::tempdir().unwrap();
    seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    let app = app_in(data.path());
    let request = Request::post("/v1/sandboxes").header("authorization", format!("Bearer {TOKEN}"));
    let response = app
        .clone()
        .oneshot(request.body(Body::from("{not json")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");

    let (status, body) = call(
        &app,
        "POST",
        "/v1/sandboxes",
        Some(TOKEN),
        Some(json!({"repo": "demo/hello"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("bad_request"))
    );

    let mut body = create_body("demo/hello");
    body["base_branch"] = json!("no-such-branch");
    let (status, answer) = call(
        &app,
        "POST",
        "/v1/sandboxes",
        Some(TOKEN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    body["base_branch"] = json!("--upload-pack=touch /tmp/x");
    let (status, _) = call(&app, "POST", "/v1/sandboxes", Some(TOKEN), Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = call(&app, "GET", "/v1/sandboxes/nope", Some(TOKEN), None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    let (status, _) = call(&app, "DELETE", "/v1/sandboxes/nope", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A host on an ephemeral port, stopped when dropped.
struct RunningHost {
    base_url: String,
    data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), HostError>>>,
}

impl RunningHost {
    async fn start(data_dir: &Path, agent_bin: &Path) -> Self {
        Self::start_with(config(data_dir, agent_bin)).await
    }

    async fn start_with(config: HostConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let task = tokio::spawn(serve(config, listener, async move {
            let _ = rx.await;
        }));
        // Wait until it answers (startup checks isolation first).
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{base_url}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "host never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        RunningHost {
            base_url,
            data_dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.json().await.unwrap())
    }

    /// [`RunningHost::api`], which must answer `want`; the body.
    async fn api_expecting(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        want: StatusCode,
    ) -> Value {
        let (status, value) = self.api(method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path}: {value}");
        value
    }

    /// Poll the sandbox until `status`, or panic after a few seconds.
    async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, info) = self
                .api(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            if info["status"] == status {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox {id} never became {status}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Run git (clean environment) in `dir`; panic with its stderr on failure.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = git_command().current_dir(dir).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_smart_http_clone_and_push() {
    let data = tempfile::tempdir().unwrap();
    let bare = seed_repo(&data.path().join("git"), "demo/hello", "main")
        .unwrap()
        .git_dir;
    let host = RunningHost::start(data.path(), Path::new("/bin/true")).await;
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/git/demo/hello.git", host.base_url);

    let clone_dir = work.path().join("hello");
    let clone_path = clone_dir.to_str().unwrap().to_owned();
    let (url_for_clone, path_for_clone) = (url.clone(), clone_path.clone());
    let work_path = work.path().to_owned();
    tokio::task::spawn_blocking(move || {
        git(
            &work_path,
            &["clone", "--quiet", &url_for_clone, &path_for_clone],
        )
    })
    .await
    .unwrap();
    assert!(clone_dir.join("README.md").is_file());
    assert!(clone_dir.join("hello/greet.py").is_file());
    assert_eq!(
        git(&clone_dir, &["rev-parse", "HEAD"]),
        git(&bare, &["rev-parse", "main"])
    );

    // Push a new branch through git-receive-pack.
    std::fs::write(clone_dir.join("NOTES.md"), "pushed over smart http\n").unwrap();
    let dir = clone_dir.clone();
    let pushed = tokio::task::spawn_blocking(move || {
        git(&dir, &["checkout", "--quiet", "-b", "feature/notes"]);
        git(&dir, &["add", "NOTES.md"]);
        git(&dir, &["commit", "--quiet", "-m", "Add notes"]);
        git(&dir, &["push", "--quiet", "origin", "feature/notes"]);
        git(&dir, &["rev-parse", "HEAD"])
    })
    .await
    .unwrap();
    assert_eq!(
        git(&bare, &["rev-parse", "refs/heads/feature/notes"]),
        pushed
    );

    // Many refs: the fetch negotiation exceeds 1 KiB, which git sends gzip-compressed.
    let dir = clone_dir.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..40 {
            git(
                &dir,
                &[
                    "commit",
                    "--quiet",
                    "--allow-empty",
                    "-m",
                    &format!("commit {i}"),
                ],
            );
            git(&dir, &["branch", &format!("many/{i}")]);
        }
        git(
            &dir,
            &[
                "push",
                "--quiet",
                "origin",
                "refs/heads/many/*:refs/heads/many/*",
            ],
        );
    })
    .await
    .unwrap();
    let mirror = work.path().join("mirror.git");
    let mirror_path = mirror.to_str().unwrap().to_owned();
    let work_path = work.path().to_owned();
    let url_for_mirror = url.clone();
    tokio::task::spawn_blocking(move || {
        git(
            &work_path,
            &[
                "clone",
                "--quiet",
                "--mirror",
                &url_for_mirror,
                &mirror_path,
            ],
        );
    })
    .await
    .unwrap();
    assert_eq!(
        git(&mirror, &["for-each-ref", "refs/heads/many/"])
            .lines()
            .count(),
        40
    );

    // Missing repositories fail cleanly.
    let work_path = work.path().to_owned();
    let missing = format!("{}/git/demo/missing.git", host.base_url);
    let output = tokio::task::spawn_blocking(move || {
        git_command()
            .current_dir(&work_path)
            .args(["clone", "--quiet", &missing, "x"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    host.stop().await;
}

/// A stand-in for `sandbox-agent run`: records its arguments, environment and pid in `$HOME`,
/// starts a grandchild, and waits. A connect URL containing `ignore-term` makes it (and the
/// grandchild) ignore SIGTERM.
const FAKE_AGENT: &str = r#"#!/bin/sh
case "$NIGHTSHIFT_CONNECT_URL" in *ignore-term*) trap '' TERM ;; esac
echo "$@" > "$HOME/args.txt"
env > "$HOME/env.tmp" && mv "$HOME/env.tmp" "$HOME/env.txt"
echo "fake agent stdout"
echo "fake agent stderr" >&2
sleep 300 &
echo $! > "$HOME/grandchild.pid"
echo $$ > "$HOME/pid.txt"
wait
"#;

fn write_fake_agent(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("fake-agent.sh");
    std::fs::write(&path, FAKE_AGENT).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Wait for a file the fake agent writes, and return its contents.
async fn read_when_written(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` exists and is not a zombie (an orphaned zombie waits for whatever reaps
/// orphans).
fn alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        // The state follows the parenthesised command name: `123 (sleep) S …`.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Wait until process `pid` is gone.
async fn assert_gone_soon(pid: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lifecycle_with_a_fake_agent() {
    let data = tempfile::tempdir().unwrap();
    let bins = tempfile::tempdir().unwrap();
    seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    let agent = write_fake_agent(bins.path());
    let host = RunningHost::start(data.path(), &agent).await;

    let info = host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(create_body("demo/hello")),
            StatusCode::CREATED,
        )
        .await;
    let info: nightshift_protocol::provider::SandboxInfo = serde_json::from_value(info).unwrap();
    assert_eq!(
        (
            info.status.as_str(),
            info.repo.as_str(),
            info.session_id.as_str()
        ),
        ("running", "demo/hello", "session-1")
    );
    assert_eq!(info.id.len(), 32);
    let home = host
        .data_dir
        .canonicalize()
        .unwrap()
        .join("sandboxes")
        .join(&info.id);
    let workspace = home.join("workspace");

    // The workspace is a clone from the host itself, with the host as origin.
    assert!(workspace.join("hello/greet.py").is_file());
    assert_eq!(
        git(&workspace, &["remote", "get-url", "origin"]),
        format!("{}/git/demo/hello.git", host.base_url)
    );
    assert_eq!(git(&workspace, &["branch", "--show-current"]), "main");

    // The agent got `run` and exactly the documented environment; nothing of the host's.
    assert_eq!(
        read_when_written(&home.join("args.txt")).await.trim(),
        "run"
    );
    let env: HashMap<String, String> = read_when_written(&home.join("env.txt"))
        .await
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let shell_own = ["PWD", "OLDPWD", "SHLVL", "_"];
    let mut names: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|k| !shell_own.contains(k))
        .collect();
    names.sort_unstable();
    assert_eq!(names, super::sandbox::DEMO_AGENT_ENV);
    assert_eq!(
        env["ANTHROPIC_BASE_URL"],
        format!("{}/scripted-model", host.base_url)
    );
    assert_eq!(env["NIGHTSHIFT_SANDBOX_TOKEN"], "sandbox-secret");
    assert_eq!(env["NIGHTSHIFT_SANDBOX_ID"], info.id);
    assert_eq!(Path::new(&env["HOME"]), home);
    assert_eq!(Path::new(&env["NIGHTSHIFT_WORKSPACE"]), workspace);
    assert!(!env.values().any(|v| v.contains(TOKEN)));
    let log = read_when_written(&home.join("agent.log")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = log;
    while !log.contains("fake agent stderr") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = std::fs::read_to_string(home.join("agent.log")).unwrap();
    }
    assert!(
        log.contains("fake agent stdout") && log.contains("fake agent stderr"),
        "{log}"
    );

    // The agent's model URL is served by this host.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", env["ANTHROPIC_BASE_URL"]))
        .json(&json!({"stream": true, "messages": [{"role": "user", "content": "[script:tokens count=3]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .text()
            .await
            .unwrap()
            .matches("\"text_delta\"")
            .count(),
        3
    );
    // And as an OpenAI-compatible API (base URL `…/scripted-model/v1`).
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", env["ANTHROPIC_BASE_URL"]))
        .json(&json!({"stream": true, "messages": [{"role": "user", "content": "[script:tokens count=3]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().await.unwrap();
    assert_eq!(body.matches("\"content\":\"tok").count(), 3, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // A second sandbox whose agent dies by SIGKILL: the host notices, and survives.
    let (_, second) = host
        .api(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(create_body("demo/hello")),
        )
        .await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    let second_home = host
        .data_dir
        .canonicalize()
        .unwrap()
        .join("sandboxes")
        .join(&second_id);
    let second_pid = read_when_written(&second_home.join("pid.txt")).await;
    // SAFETY: sends a signal to the fake agent this test started.
    unsafe { libc::kill(second_pid.trim().parse().unwrap(), libc::SIGKILL) };
    let exited = host.wait_for_status(&second_id, "exited").await;
    assert_eq!(exited["detail"], "killed by signal 9");

    let (_, list) = host.api(reqwest::Method::GET, "/v1/sandboxes", None).await;
    let ids: Vec<&str> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&info.id.as_str()) && ids.contains(&second_id.as_str()));

    // DELETE stops the whole process group, promptly (the fake agent exits on SIGTERM), and keeps
    // the files.
    let grandchild = read_when_written(&home.join("grandchild.pid")).await;
    let pid = read_when_written(&home.join("pid.txt")).await;
    assert!(alive(&grandchild) && alive(&pid));
    let started = Instant::now();
    let stopped = host
        .api_expecting(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{}", info.id),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(stopped["status"], "stopped");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_gone_soon(&pid).await;
    assert_gone_soon(&grandchild).await;
    assert!(workspace.join("README.md").is_file());
    let (_, again) = host
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{}", info.id),
            None,
        )
        .await;
    assert_eq!(again["status"], "stopped");
    // Stopping one that already exited leaves it as it was.
    let (_, still) = host
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{second_id}"),
            None,
        )
        .await;
    assert_eq!(still["status"], "exited");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stubborn_agents_are_killed_and_timeouts_and_shutdown_stop_agents() {
    let data = tempfile::tempdir().unwrap();
    let bins = tempfile::tempdir().unwrap();
    seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    let agent = write_fake_agent(bins.path());
    let host = RunningHost::start(data.path(), &agent).await;
    let sandboxes = host.data_dir.canonicalize().unwrap().join("sandboxes");

    // Ignores SIGTERM: SIGKILL after the grace period.
    let mut body = create_body("demo/hello");
    body["connect_url"] = json!("ws://127.0.0.1:1/sandbox/ignore-term/ws");
    let (_, stubborn) = host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    let stubborn_id = stubborn["id"].as_str().unwrap().to_owned();
    let stubborn_pid = read_when_written(&sandboxes.join(&stubborn_id).join("pid.txt")).await;
    let stubborn_grandchild =
        read_when_written(&sandboxes.join(&stubborn_id).join("grandchild.pid")).await;
    let started = Instant::now();
    let (_, stopped) = host
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{stubborn_id}"),
            None,
        )
        .await;
    assert!(
        started.elapsed() >= sandbox::STOP_GRACE - Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stopped["status"], "stopped");
    assert!(
        stopped["detail"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{stopped}"
    );
    assert_gone_soon(&stubborn_pid).await;
    assert_gone_soon(&stubborn_grandchild).await;

    // A hard timeout stops the sandbox.
    let mut body = create_body("demo/hello");
    body["timeout_ms"] = json!(300);
    let (_, short) = host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    let short_id = short["id"].as_str().unwrap().to_owned();
    let timed_out = host.wait_for_status(&short_id, "stopped").await;
    assert!(
        timed_out["detail"]
            .as_str()
            .unwrap()
            .starts_with("timed out after 300 ms"),
        "{timed_out}"
    );

    // Shutting the host down stops the agents that still run.
    let (_, last) = host
        .api(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(create_body("demo/hello")),
        )
        .await;
    let last_dir = sandboxes.join(last["id"].as_str().unwrap());
    let last_pid = read_when_written(&last_dir.join("pid.txt")).await;
    let last_grandchild = read_when_written(&last_dir.join("grandchild.pid")).await;
    host.stop().await;
    assert_gone_soon(&last_pid).await;
    assert_gone_soon(&last_grandchild).await;
}

/// Commit the removal of `path` on `main` of the bare repository `git_dir`.
fn remove_from_repo(git_dir: &Path, path: &str) {
    let work = tempfile::tempdir().unwrap();
    let run = |dir: &Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        work.path(),
        &["clone", "--quiet", git_dir.to_str().unwrap(), "c"],
    );
    let clone = work.path().join("c");
    run(&clone, &["rm", "--quiet", path]);
    run(&clone, &["commit", "--quiet", "-m", "remove"]);
    run(&clone, &["push", "--quiet", "origin", "main"]);
}

/// `(status, error code)` of an answer.
fn code(answer: &(StatusCode, Value)) -> (StatusCode, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_routes_build_list_and_stream_the_log() {
    let data = tempfile::tempdir().unwrap();
    let seeded = seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    // The request's setup runs only when the repository has none of its own.
    remove_from_repo(&seeded.git_dir, ".nightshift/setup.sh");
    let app = app_in(data.path());
    let post = |body: Value| call(&app, "POST", "/v1/images", Some(TOKEN), Some(body));

    // Typed refusals, before anything runs.
    let request = Request::post("/v1/images").header("authorization", format!("Bearer {TOKEN}"));
    let response = app
        .clone()
        .oneshot(request.body(Body::from("{not json")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    for (body, expected) in [
        (
            json!({"ref": "main"}),
            (StatusCode::BAD_REQUEST, "bad_request"),
        ),
        (
            json!({"repo": "../x"}),
            (StatusCode::BAD_REQUEST, "bad_request"),
        ),
        (
            json!({"repo": "demo/hello", "ref": "-x"}),
            (StatusCode::BAD_REQUEST, "bad_request"),
        ),
        (
            json!({"repo": "demo/hello", "setup": "a\u{0}b"}),
            (StatusCode::BAD_REQUEST, "bad_request"),
        ),
        (
            json!({"repo": "demo/nothing"}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            json!({"repo": "demo/hello", "ref": "nope"}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
    ] {
        assert_eq!(code(&post(body.clone()).await), expected, "{body}");
    }
    for (uri, expected) in [
        ("/v1/images", (StatusCode::BAD_REQUEST, "bad_request")),
        (
            "/v1/images?repo=..%2Fx",
            (StatusCode::BAD_REQUEST, "bad_request"),
        ),
        (
            "/v1/images?repo=demo/nothing",
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            "/v1/images/0123456789abcdef",
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            "/v1/images/..%2F..%2Fetc/log",
            (StatusCode::NOT_FOUND, "not_found"),
        ),
    ] {
        assert_eq!(
            code(&call(&app, "GET", uri, Some(TOKEN), None).await),
            expected,
            "{uri}"
        );
    }
    let (status, empty) = call(&app, "GET", "/v1/images?repo=demo/hello", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        empty,
        json!({"images": [], "building": null, "latest_failure": null})
    );

    // A build whose setup waits for a gate, so it is observably running.
    let gate = data.path().join("gate");
    let setup = format!(
        "x=line; echo first-$x; while [ ! -e {} ]; do sleep 0.02; done; echo last-$x",
        gate.display()
    );
    let (status, started) = post(json!({"repo": "demo/hello", "setup": setup})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["status"], "building");
    assert_eq!(started["ref"], "main");
    let id = started["id"].as_str().unwrap().to_owned();
    let (status, again) = post(json!({"repo": "demo/hello", "setup": "true"})).await;
    assert_eq!(
        (status, again["id"].as_str()),
        (StatusCode::ACCEPTED, Some(id.as_str()))
    );

    let request = Request::get(format!("/v1/images/{id}/log"))
        .header("authorization", format!("Bearer {TOKEN}"));
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    let mut chunks = response.into_body().into_data_stream();
    let mut log = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !log.contains("first-line") {
            let chunk = futures_util::StreamExt::next(&mut chunks)
                .await
                .unwrap()
                .unwrap();
            log.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the first line arrives while the build runs");
    let (_, building) = call(&app, "GET", &format!("/v1/images/{id}"), Some(TOKEN), None).await;
    assert_eq!(building["status"], "building");
    assert_eq!(building["commit"].as_str().unwrap().len(), 40, "{building}");
    let (_, list) = call(&app, "GET", "/v1/images?repo=demo/hello", Some(TOKEN), None).await;
    assert_eq!(list["building"]["id"], json!(id));
    std::fs::write(&gate, "").unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
            log.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await
    .expect("the log ends with the build");
    assert!(
        log.contains("last-line\n") && log.contains("build succeeded"),
        "{log}"
    );

    let (status, list) = call(&app, "GET", "/v1/images?repo=demo/hello", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    let list: nightshift_protocol::provider::ImageList = serde_json::from_value(list).unwrap();
    assert!(list.building.is_none() && list.latest_failure.is_none());
    assert_eq!(list.images.len(), 1);
    let image = &list.images[0];
    assert_eq!(image.id, id);
    assert_eq!(
        image.status,
        nightshift_protocol::provider::ImageStatus::Ready
    );
    assert!(image.file_count > 0 && image.setup_log.contains("last-line"));
    assert!(image.age_ms < 60_000);

    // A failing build shows up as the latest failure, beside the image it leaves in place.
    let (_, failing) = post(json!({"repo": "demo/hello", "setup": "exit 7"})).await;
    let failing_id = failing["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let (_, list) = call(&app, "GET", "/v1/images?repo=demo/hello", Some(TOKEN), None).await;
        if list["building"].is_null() {
            break list;
        }
        assert!(Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(list["latest_failure"]["id"], json!(failing_id));
    assert_eq!(list["latest_failure"]["status"], "failed");
    assert!(list["latest_failure"]["error"]
        .as_str()
        .unwrap()
        .contains("exit code 7"));
    assert_eq!(list["images"][0]["id"], json!(id));
}

#[tokio::test]
async fn snapshot_route_archives_an_overlay_sandbox_and_refuses_others() {
    let data = tempfile::tempdir().unwrap();
    let state = AppState::new(
        config(data.path(), Path::new("/bin/true")),
        "http://127.0.0.1:9",
    )
    .unwrap();
    let app = app(state.clone());
    state
        .inner
        .sandboxes
        .insert_for_test(nightshift_protocol::provider::SandboxInfo {
            id: "sb1".to_owned(),
            session_id: "session-1".to_owned(),
            repo: "demo/hello".to_owned(),
            status: "running".to_owned(),
            created_ms: 1,
            detail: String::new(),
            isolation: None,
            limits: None,
            refused: Vec::new(),
            last_snapshot: None,
        });
    let snapshot = |id: &str, body: Option<Value>| {
        let uri = format!("/v1/sandboxes/{id}/snapshot");
        let app = app.clone();
        async move { call(&app, "POST", &uri, Some(TOKEN), body).await }
    };
    assert_eq!(
        code(&snapshot("nope", Some(json!({"reason": "x"}))).await),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // A plain clone has no delta against an image.
    assert_eq!(
        code(&snapshot("sb1", Some(json!({"reason": "x"}))).await),
        (StatusCode::CONFLICT, "not_an_overlay")
    );

    let upper = tempfile::tempdir().unwrap();
    std::fs::create_dir(upper.path().join("src")).unwrap();
    std::fs::write(upper.path().join("src/lib.rs"), "pub fn changed() {}\n").unwrap();
    state
        .inner
        .sandboxes
        .set_overlay(
            "sb1",
            sandbox::Overlay {
                upper: upper.path().to_owned(),
                image_id: "00000000000000aa".to_owned(),
            },
        )
        .unwrap();
    let (status, taken) = snapshot("sb1", Some(json!({"reason": "prompt_finished"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{taken}");
    let taken: nightshift_protocol::provider::SnapshotInfo = serde_json::from_value(taken).unwrap();
    assert!(snapshot::is_snapshot_id(&taken.id), "{taken:?}");
    assert_eq!(
        (
            taken.image_id.as_str(),
            taken.session_id.as_str(),
            taken.repo.as_str(),
            taken.reason.as_str()
        ),
        (
            "00000000000000aa",
            "session-1",
            "demo/hello",
            "prompt_finished"
        )
    );
    let archive = data
        .path()
        .canonicalize()
        .unwrap()
        .join(format!("snapshots/{}.tar.zst", taken.id));
    assert_eq!(std::fs::metadata(archive).unwrap().len(), taken.size_bytes);
    // Content-addressed: the same changes are the same snapshot; an empty body is allowed.
    let (status, same) = snapshot("sb1", None).await;
    assert_eq!(
        (status, same["id"].as_str()),
        (StatusCode::CREATED, Some(taken.id.as_str()))
    );
    assert_eq!(state.snapshots().get(&taken.id).unwrap(), taken);
    assert_eq!(
        code(&snapshot("sb1", Some(json!({"reason": "a\nb"}))).await),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let request = Request::post("/v1/sandboxes/sb1/snapshot")
        .header("authorization", format!("Bearer {TOKEN}"));
    let response = app
        .clone()
        .oneshot(request.body(Body::from("{not json")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Its image is gone (never built here): restoring is refused with the typed error.
    let err = state
        .snapshots()
        .restore(&taken.id, &data.path().join("restored"))
        .unwrap_err();
    let answer =
        axum::response::IntoResponse::into_response(api::ApiError::from(HostError::from(err)));
    assert_eq!(answer.status(), StatusCode::CONFLICT);
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "snapshot_image_gone");

    // An upper directory that holds the sandbox's HOME is never archived.
    let sandboxes = data.path().canonicalize().unwrap().join("sandboxes");
    std::fs::create_dir_all(sandboxes.join("sb1")).unwrap();
    std::fs::write(sandboxes.join("sb1/secret"), "token").unwrap();
    state
        .inner
        .sandboxes
        .set_overlay(
            "sb1",
            sandbox::Overlay {
                upper: sandboxes,
                image_id: "00000000000000aa".to_owned(),
            },
        )
        .unwrap();
    assert_eq!(
        code(&snapshot("sb1", Some(json!({"reason": "x"}))).await),
        (StatusCode::INTERNAL_SERVER_ERROR, "internal")
    );
    assert_eq!(state.snapshots().list().len(), 1);
    assert!(state.images().latest("demo/hello").is_none());
}

/// The built `sandbox-agent` binary, beside the directory of this test binary (`target/<profile>/deps`).
/// Cargo builds it with the crate's tests, because the crate has an integration test.
pub(super) fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("sandbox-agent");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p nightshift-sandbox-agent`",
        path.display()
    );
    path
}

/// A fake Worker's agent route: the agent's WebSocket, after its bearer token was checked.
type AgentSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn accept_agent(listener: &tokio::net::TcpListener) -> AgentSocket {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let tcp = loop {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .expect("the agent dials in within 30 s")
            .unwrap();
        // The end report of an earlier sandbox of the test comes to the same fake Worker: answered.
        if is_post(&tcp).await {
            tokio::spawn(async move { read_end_report(tcp).await });
            continue;
        }
        break tcp;
    };
    #[allow(clippy::result_large_err)] // the callback's error type is tungstenite's
    let check = |request: &Request, response: Response| {
        let auth = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        assert_eq!(auth, Some("Bearer sandbox-secret"));
        Ok(response)
    };
    tokio_tungstenite::accept_hdr_async(tcp, check)
        .await
        .unwrap()
}

/// Whether the connection's request is a `POST` (an end report), not a WebSocket handshake.
async fn is_post(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 5];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = tcp.peek(&mut first).await.unwrap_or(0);
        if read == first.len() || read == 0 || Instant::now() > deadline {
            return &first[..read] == b"POST ";
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Read an end report (`POST /sandbox/{session}/ended`) off `tcp` and answer `204`: its path, its
/// `authorization` header and its body.
async fn read_end_report(
    mut tcp: tokio::net::TcpStream,
) -> (String, String, nightshift_protocol::provider::SandboxEnded) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = Vec::new();
    let (path, auth, body) = loop {
        let mut chunk = [0u8; 4096];
        let read = tcp.read(&mut chunk).await.unwrap();
        assert!(
            read > 0,
            "the report ended early: {}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head_len) = request.parse(&buffer).unwrap() else {
            continue;
        };
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default()
        };
        let length: usize = header("content-length").parse().unwrap();
        if buffer.len() < head_len + length {
            continue;
        }
        assert_eq!(request.method, Some("POST"));
        break (
            request.path.unwrap().to_owned(),
            header("authorization"),
            serde_json::from_slice(&buffer[head_len..head_len + length]).unwrap(),
        );
    };
    tcp.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    (path, auth, body)
}

/// The next end report at the fake Worker `listener` (connections before it must be reports too).
async fn end_report(
    listener: &tokio::net::TcpListener,
) -> (String, String, nightshift_protocol::provider::SandboxEnded) {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the end report comes within 30 s")
        .unwrap();
    read_end_report(tcp).await
}

/// The next message from the agent (heartbeats skipped).
async fn next_message(socket: &mut AgentSocket) -> nightshift_protocol::AgentMessage {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a frame within 60 s")
            .expect("socket open")
            .expect("frame");
        let Message::Text(text) = frame else { continue };
        match serde_json::from_str(text.as_str()).unwrap() {
            nightshift_protocol::AgentMessage::Heartbeat {} => continue,
            message => return message,
        }
    }
}

async fn send_to_agent(socket: &mut AgentSocket, message: &nightshift_protocol::ServerToAgent) {
    use futures_util::SinkExt as _;
    let text = serde_json::to_string(message).unwrap();
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .unwrap();
}

/// Answer `hello` with `welcome`; the sandbox id the agent reported.
async fn welcome(socket: &mut AgentSocket) -> String {
    use nightshift_protocol::{AgentMessage, ServerToAgent};
    let AgentMessage::Hello { sandbox_id, .. } = next_message(socket).await else {
        panic!("expected hello");
    };
    send_to_agent(
        socket,
        &ServerToAgent::Welcome {
            session: "session-1".to_owned(),
            last_producer_seq: 0,
        },
    )
    .await;
    sandbox_id
}

/// Whether `path` is a mount point in the host's mount namespace.
fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(mount_point) == path)
}

/// The host pid of the agent of sandbox `id` (found by its cgroup and its command line).
fn agent_pid(id: &str) -> Option<libc::pid_t> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: libc::pid_t = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            (cmdline.starts_with(b"/opt/nightshift/sandbox-agent\0run\0")
                && cgroup.contains(&format!("/nightshift/{id}\n")))
            .then_some(pid)
        })
}

/// The whole path of an isolated sandbox with the real agent: created from the API, the agent dials a
/// fake Worker through the egress proxy, works a prompt with the host's scripted model (through the
/// proxy), runs bash (its own bubblewrap, nested) where it can see neither the host's files nor its
/// network, commits and pushes over the proxy; a refused target shows in the sandbox's info; `kill -9`
/// of the agent is reported as `exited` and leaves no mount, cgroup or runtime file; DELETE does the
/// same for a second sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_sandbox_end_to_end() {
    use nightshift_protocol::{AgentMessage, Author, Event, ServerToAgent};
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the isolated end-to-end test (CI runs it as root)");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let runtime = isolation::tests::TestRuntime::new();
    let bare = seed_repo(&data.path().join("git"), "demo/hello", "main")
        .unwrap()
        .git_dir;
    std::fs::write(data.path().join("host-secret.txt"), "host secret").unwrap();
    let worker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_address = worker.local_addr().unwrap();
    let mut host_config = config(data.path(), &agent_binary());
    host_config.isolation = Some(isolation::IsolationConfig {
        runtime_dir: Some(runtime.path().to_owned()),
        ..isolation::IsolationConfig::default()
    });
    let host = RunningHost::start_with(host_config).await;
    let mut body = create_body("demo/hello");
    body["connect_url"] = json!(format!("ws://{worker_address}/sandbox/session-1/ws"));

    let started = Instant::now();
    let (status, info) = host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body.clone()))
        .await;
    let created_ms = started.elapsed().as_millis();
    assert_eq!(status, StatusCode::CREATED, "{info}");
    let id = info["id"].as_str().unwrap().to_owned();
    assert_eq!(info["isolation"], "overlay+bwrap", "{info}");
    assert_eq!(
        info["limits"], "memory_bytes=4294967296 pids=1024",
        "{info}"
    );
    let log = data.path().join("sandboxes").join(&id).join("agent.log");
    let mut socket = accept_agent(&worker).await;
    assert_eq!(welcome(&mut socket).await, id);
    let running_ms = started.elapsed().as_millis();

    let command = format!(
        "hostname; id -u; echo isolated > proof.txt; \
         cat {secret} 2>/dev/null || echo no-host-files; ls /root 2>/dev/null || echo no-root; \
         (exec 3<>/dev/tcp/127.0.0.1/{worker_port}) 2>/dev/null && echo DIRECT || echo no-direct; \
         curl -sS --max-time 10 http://example.invalid:81/; echo",
        secret = data.path().join("host-secret.txt").display(),
        worker_port = worker_address.port(),
    );
    let step = json!({"tool": "bash", "input": {"command": command}});
    send_to_agent(
        &mut socket,
        &ServerToAgent::RunPrompt {
            prompt_id: "p1".to_owned(),
            text: format!("[script:plan]\n{step}"),
            author: Author {
                login: "ada".into(),
                name: "Ada".into(),
                email: "ada@example.com".into(),
            },
            model: crate::scripted_model::MODEL.to_owned(),
        },
    )
    .await;
    let (mut bash_output, mut pushed) = (None, None);
    loop {
        let AgentMessage::Event { event, .. } = next_message(&mut socket).await else {
            continue;
        };
        match event {
            Event::ToolResult { output, .. } => bash_output = Some(output),
            Event::Push { branch, .. } => pushed = Some(branch),
            Event::PromptFinished { status, error, .. } => {
                assert_eq!(
                    serde_json::to_value(status).unwrap(),
                    "completed",
                    "{error:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                break;
            }
            _ => {}
        }
    }
    let bash_output = bash_output.expect("the bash tool ran");
    for expected in [
        "nightshift-sandbox\n0\n",
        "no-host-files",
        "no-root",
        "no-direct",
        "example.invalid:81 is not on this sandbox's allow-list",
    ] {
        assert!(bash_output.contains(expected), "{expected}: {bash_output}");
    }
    // Committed and pushed as the author, over the proxy.
    assert_eq!(pushed.as_deref(), Some("nightshift/session-1"));
    assert_eq!(
        git(&bare, &["show", "nightshift/session-1:proof.txt"]),
        "isolated"
    );
    let (_, info) = host
        .api(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    let refused: Vec<&str> = info["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["example.invalid:81"], "{info}");

    // `kill -9` of the agent: reported as exited, and everything released.
    let sandbox_root = runtime.path().join("sandboxes").join(&id);
    assert!(mounted(&sandbox_root.join("merged")));
    // From the host, the workspace is where a plain sandbox has it.
    let workspace_link = data.path().join("sandboxes").join(&id).join("workspace");
    assert_eq!(
        std::fs::read_to_string(workspace_link.join("proof.txt")).unwrap(),
        "isolated\n"
    );
    let pid = agent_pid(&id).expect("the agent runs in its cgroup");
    // SAFETY: sends a signal to the agent this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let exited = host.wait_for_status(&id, "exited").await;
    assert!(
        exited["detail"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{exited}"
    );
    assert!(!mounted(&sandbox_root.join("merged")));
    assert!(!sandbox_root.exists());
    assert!(std::fs::symlink_metadata(&workspace_link).is_err());
    assert!(log.is_file(), "the agent's log stays");
    for controller in ["memory", "pids"] {
        let cgroup = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("nightshift")
            .join(&id);
        assert!(!cgroup.exists(), "{}", cgroup.display());
    }
    assert_eq!(exited["refused"].as_array().unwrap().len(), 1, "{exited}");

    // A second sandbox, stopped through the API.
    let (_, second) = host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    let mut second_socket = accept_agent(&worker).await;
    assert_eq!(welcome(&mut second_socket).await, second_id);
    tokio::spawn(acknowledge_all(second_socket));
    let second_root = runtime.path().join("sandboxes").join(&second_id);
    assert!(mounted(&second_root.join("merged")));
    let stopping = Instant::now();
    let (status, stopped) = host
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{second_id}"),
            None,
        )
        .await;
    let teardown_ms = stopping.elapsed().as_millis();
    assert_eq!(
        (status, stopped["status"].as_str()),
        (StatusCode::OK, Some("stopped"))
    );
    assert!(!mounted(&second_root.join("merged")));
    assert!(!second_root.exists());
    assert!(agent_pid(&second_id).is_none());
    eprintln!(
        "isolated sandbox on this machine: POST /v1/sandboxes answered in {created_ms} ms \
         (clone + overlay + cgroups + proxy + spawn), agent connected through the proxy after \
         {running_ms} ms, DELETE → released in {teardown_ms} ms"
    );

    // A third one still runs when the host shuts down: released too.
    let (_, third) = host
        .api(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some({
                let mut body = create_body("demo/hello");
                body["connect_url"] = json!(format!("ws://{worker_address}/sandbox/session-1/ws"));
                body
            }),
        )
        .await;
    let third_id = third["id"].as_str().unwrap().to_owned();
    let mut third_socket = accept_agent(&worker).await;
    assert_eq!(welcome(&mut third_socket).await, third_id);
    tokio::spawn(acknowledge_all(third_socket));
    let third_root = runtime.path().join("sandboxes").join(&third_id);
    assert!(mounted(&third_root.join("merged")));
    host.stop().await;
    assert!(!mounted(&third_root.join("merged")));
    assert!(!third_root.exists());
    assert!(agent_pid(&third_id).is_none());
    assert!(
        !runtime.path().exists(),
        "an empty runtime directory goes at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_hook_runs_before_the_stop() {
    let data = tempfile::tempdir().unwrap();
    let bins = tempfile::tempdir().unwrap();
    seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    let agent = write_fake_agent(bins.path());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut host_config = config(data.path(), &agent);
    let record = std::sync::Arc::clone(&seen);
    host_config.on_deadline = Some(std::sync::Arc::new(move |event: sandbox::DeadlineEvent| {
        let record = std::sync::Arc::clone(&record);
        Box::pin(async move {
            // The sandbox is still there while the hook runs.
            let workspace_there = event.workspace.join("README.md").is_file();
            record
                .lock()
                .unwrap()
                .push((event.sandbox_id, event.timeout_ms, workspace_there));
        })
    }));
    let host = RunningHost::start_with(host_config).await;
    let mut body = create_body("demo/hello");
    body["timeout_ms"] = json!(300);
    let (_, info) = host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    let id = info["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (info["isolation"].as_str(), info["limits"].as_str()),
        (Some("none"), Some("none"))
    );
    let stopped = host.wait_for_status(&id, "stopped").await;
    assert!(stopped["detail"]
        .as_str()
        .unwrap()
        .starts_with("timed out after 300 ms"));
    assert_eq!(*seen.lock().unwrap(), [(id, 300, true)]);
    host.stop().await;
}

/// An isolated host on a fresh data and runtime directory with `demo/hello` seeded, and a fake Worker.
struct IsolatedHost {
    host: RunningHost,
    data: tempfile::TempDir,
    runtime: isolation::tests::TestRuntime,
    bare: PathBuf,
    worker: tokio::net::TcpListener,
}

impl IsolatedHost {
    /// `None` (with a notice) when not root.
    async fn start(test: &str) -> Option<Self> {
        Self::start_with(test, |_| {}).await
    }

    /// [`IsolatedHost::start`] with the isolation settings changed by `configure`.
    async fn start_with(
        test: &str,
        configure: impl FnOnce(&mut isolation::IsolationConfig),
    ) -> Option<Self> {
        // SAFETY: `geteuid` has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: skipping {test} (CI runs it as root)");
            return None;
        }
        let data = tempfile::tempdir().unwrap();
        let runtime = isolation::tests::TestRuntime::new();
        let bare = seed_repo(&data.path().join("git"), "demo/hello", "main")
            .unwrap()
            .git_dir;
        let worker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut host_config = config(data.path(), &agent_binary());
        host_config.runtime_dir = runtime.path().to_owned();
        let mut isolation_config = isolation::IsolationConfig {
            runtime_dir: Some(runtime.path().to_owned()),
            ..isolation::IsolationConfig::default()
        };
        configure(&mut isolation_config);
        host_config.isolation = Some(isolation_config);
        let host = RunningHost::start_with(host_config).await;
        Some(IsolatedHost {
            host,
            data,
            runtime,
            bare,
            worker,
        })
    }

    fn create_body(&self) -> Value {
        let mut body = create_body("demo/hello");
        body["connect_url"] = json!(format!(
            "ws://{}/sandbox/session-1/ws",
            self.worker.local_addr().unwrap()
        ));
        body
    }

    /// `POST /v1/sandboxes` for `demo/hello`, which must answer 201; the new sandbox's id.
    async fn create_sandbox(&self) -> String {
        let info = self
            .host
            .api_expecting(
                reqwest::Method::POST,
                "/v1/sandboxes",
                Some(self.create_body()),
                StatusCode::CREATED,
            )
            .await;
        info["id"].as_str().unwrap().to_owned()
    }

    /// Build an image of `demo/hello` and wait until it is ready; its id.
    async fn build_image(&self) -> String {
        let image = build_to_the_end(self).await;
        assert_eq!(image["status"], "ready", "image build failed: {image}");
        image["id"].as_str().unwrap().to_owned()
    }

    fn sandbox_root(&self, id: &str) -> PathBuf {
        self.runtime.path().join("sandboxes").join(id)
    }

    fn agent_log(&self, id: &str) -> String {
        std::fs::read_to_string(
            self.data
                .path()
                .join("sandboxes")
                .join(id)
                .join("agent.log"),
        )
        .unwrap_or_default()
    }
}

/// The mount options of the overlay mounted at `merged` (from the host's mount table).
fn overlay_options(merged: &Path) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|line| line.split(' ').nth(4).map(Path::new) == Some(merged))
        .and_then(|line| line.rsplit(' ').next().map(str::to_owned))
}

/// Run one bash step through the agent's scripted model; the tool output and the pushed branch.
async fn run_bash(
    socket: &mut AgentSocket,
    command: &str,
    log: impl Fn() -> String,
) -> (String, Option<String>) {
    use nightshift_protocol::{AgentMessage, Event};
    send_bash(socket, command).await;
    let (mut output, mut pushed) = (None, None);
    loop {
        let AgentMessage::Event { event, .. } = next_message(socket).await else {
            continue;
        };
        match event {
            Event::ToolResult { output: out, .. } => output = Some(out),
            Event::Push { branch, .. } => pushed = Some(branch),
            Event::PromptFinished { status, error, .. } => {
                assert_eq!(
                    serde_json::to_value(status).unwrap(),
                    "completed",
                    "{error:?}\n{}",
                    log()
                );
                break;
            }
            _ => {}
        }
    }
    (output.expect("the bash tool ran"), pushed)
}

/// With an image, an isolated sandbox's lower layer is the image's tree (no clone: its own lower
/// directory stays empty): the agent edits, deletes and creates files and commits and pushes them;
/// the snapshot route archives the sandbox; a sandbox restored from the snapshot sees the same files
/// (the deleted one still gone) over the same image; a snapshot whose image is gone is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_start_from_the_latest_image_and_restore_snapshots() {
    let Some(env) = IsolatedHost::start("the image sandbox test").await else {
        return;
    };
    let image_id = env.build_image().await;
    let tree = env
        .runtime
        .path()
        .join("images/demo/hello")
        .join(&image_id)
        .join("tree");
    assert!(tree.join(".git").is_dir());

    let started = Instant::now();
    let id = env.create_sandbox().await;
    let created_ms = started.elapsed().as_millis();
    let root = env.sandbox_root(&id);
    let options = overlay_options(&root.join("merged")).expect("the overlay is mounted");
    assert!(
        options.contains(&format!("lowerdir={}", tree.display())),
        "{options}"
    );
    assert_eq!(
        std::fs::read_dir(root.join("lower")).unwrap().count(),
        0,
        "no clone"
    );
    let mut socket = accept_agent(&env.worker).await;
    assert_eq!(welcome(&mut socket).await, id);
    let running_ms = started.elapsed().as_millis();

    let (output, pushed) = run_bash(
        &mut socket,
        "echo '# edited' >> hello/greet.py && rm tests/__init__.py && echo new > new.txt \
         && git status --short && echo BASH-OK",
        || env.agent_log(&id),
    )
    .await;
    assert!(output.contains("BASH-OK"), "{output}");
    assert_eq!(pushed.as_deref(), Some("nightshift/session-1"), "{output}");
    assert_eq!(
        git(&env.bare, &["show", "nightshift/session-1:new.txt"]),
        "new"
    );
    assert!(git(&env.bare, &["show", "nightshift/session-1:hello/greet.py"]).ends_with("# edited"));
    let listed = git(
        &env.bare,
        &["ls-tree", "-r", "--name-only", "nightshift/session-1"],
    );
    assert!(!listed.contains("tests/__init__.py"), "{listed}");

    // The snapshot route works on it.
    let snapshot = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(json!({"reason": "prompt_finished"})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(snapshot["image_id"], image_id.as_str());
    let snapshot_id = snapshot["id"].as_str().unwrap().to_owned();
    env.host
        .api_expecting(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None,
            StatusCode::OK,
        )
        .await;
    assert!(!root.exists());

    // Restored: the edits are back, the deleted file stays deleted, the session branch resumes.
    let mut body = env.create_body();
    body["repo"] = Value::Null;
    body["snapshot"] = json!(snapshot_id);
    let restored = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(body),
            StatusCode::CREATED,
        )
        .await;
    let restored_id = restored["id"].as_str().unwrap().to_owned();
    let merged = env.sandbox_root(&restored_id).join("merged");
    let options = overlay_options(&merged).expect("the overlay is mounted");
    assert!(
        options.contains(&format!("lowerdir={}", tree.display())),
        "{options}"
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("new.txt")).unwrap(),
        "new\n"
    );
    assert!(std::fs::read_to_string(merged.join("hello/greet.py"))
        .unwrap()
        .ends_with("# edited\n"));
    assert!(!merged.join("tests/__init__.py").exists());
    let mut socket = accept_agent(&env.worker).await;
    assert_eq!(welcome(&mut socket).await, restored_id);
    let (output, _) = run_bash(
        &mut socket,
        "git rev-parse --abbrev-ref HEAD && cat new.txt && ls tests",
        || env.agent_log(&restored_id),
    )
    .await;
    assert!(output.contains("nightshift/session-1\nnew\n"), "{output}");
    assert!(!output.contains("__init__.py"), "{output}");
    // The restored sandbox is an overlay over the image too: it can be snapshotted again.
    env.host
        .api_expecting(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{restored_id}/snapshot"),
            Some(json!({"reason": "again"})),
            StatusCode::CREATED,
        )
        .await;

    // Unknown snapshots are typed refusals.
    let mut body = env.create_body();
    body["snapshot"] = json!("0".repeat(64));
    let (status, refused) = env
        .host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{refused}"
    );
    // The snapshot's image lost (its tmpfs tree gone): refused with the typed error, nothing started.
    env.host
        .api_expecting(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{restored_id}"),
            None,
            StatusCode::OK,
        )
        .await;
    std::fs::rename(&tree, tree.with_file_name("lost")).unwrap();
    let mut body = env.create_body();
    body["snapshot"] = json!(snapshot_id);
    let (status, refused) = env
        .host
        .api(reqwest::Method::POST, "/v1/sandboxes", Some(body))
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("snapshot_image_gone")),
        "{refused}"
    );
    eprintln!(
        "sandbox from an image: POST /v1/sandboxes answered in {created_ms} ms (no clone), agent \
         connected after {running_ms} ms"
    );
    env.host.stop().await;
    assert!(
        !env.runtime.path().join("sandboxes").exists()
            || std::fs::read_dir(env.runtime.path().join("sandboxes"))
                .unwrap()
                .count()
                == 0
    );
}

/// The sandbox ids with a runtime directory now (warm ones included).
fn runtime_sandboxes(env: &IsolatedHost) -> std::collections::HashSet<String> {
    std::fs::read_dir(env.runtime.path().join("sandboxes"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `demo/hello`'s pool once it has `ready` ready and none preparing (see [`wait_for_pool`]).
async fn wait_for_ready(env: &IsolatedHost, ready: u64) -> Value {
    wait_for_pool(env, Duration::from_secs(60), |pool| {
        pool["ready"] == ready && pool["preparing"] == 0
    })
    .await
}

/// Warm pools on a real isolated host: `POST /v1/pools/demo/hello {target: 2}` prepares two (overlay
/// on the image, base branch caught up); a claim takes one of them (its runtime directory existed
/// before the claim: no clone, mount or fetch on the claim's path) and the agent runs in it; 20
/// concurrent creates on a pool of 5 get 5 warm and 15 cold, no entry twice; a new image retires the
/// entries of the old one; shutdown leaves no mount and no runtime directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pools_prepare_claim_retire_and_release() {
    let Some(env) = IsolatedHost::start("the warm pool test").await else {
        return;
    };
    let image_id = env.build_image().await;
    let prepared = Instant::now();
    let pool = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/pools/demo/hello",
            Some(json!({"target": 2})),
            StatusCode::ACCEPTED,
        )
        .await;
    assert_eq!(pool["target"], 2, "{pool}");
    assert_eq!(pool["image_id"], image_id.as_str(), "{pool}");
    let pool = wait_for_ready(&env, 2).await;
    let prepare_ms = prepared.elapsed().as_millis();
    assert_eq!(
        (pool["target"].as_u64(), pool["recent_claims"].as_u64()),
        (Some(2), Some(0))
    );
    let warm = runtime_sandboxes(&env);
    assert_eq!(warm.len(), 2, "{warm:?}");
    for id in &warm {
        let merged = env.sandbox_root(id).join("merged");
        assert!(mounted(&merged));
        // Caught up: on the base branch, owned by the sandbox uid.
        assert_eq!(
            git(
                &merged,
                &[
                    "-c",
                    "safe.directory=*",
                    "rev-parse",
                    "--abbrev-ref",
                    "HEAD"
                ]
            ),
            "main"
        );
    }

    // A claim: one of the prepared sandboxes, and the agent runs in it.
    let claiming = Instant::now();
    let id = env.create_sandbox().await;
    let claim_ms = claiming.elapsed().as_millis();
    assert!(warm.contains(&id), "{id} is not one of {warm:?}");
    let mut socket = accept_agent(&env.worker).await;
    assert_eq!(welcome(&mut socket).await, id);
    let spawned_ms = claiming.elapsed().as_millis();
    let (output, pushed) = run_bash(&mut socket, "echo warm > warm.txt && echo BASH-OK", || {
        env.agent_log(&id)
    })
    .await;
    assert!(output.contains("BASH-OK"), "{output}");
    assert_eq!(pushed.as_deref(), Some("nightshift/session-1"));
    assert_eq!(
        git(&env.bare, &["show", "nightshift/session-1:warm.txt"]),
        "warm"
    );
    drop(socket);
    env.host
        .api_expecting(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None,
            StatusCode::OK,
        )
        .await;
    assert!(!env.sandbox_root(&id).exists());

    // 20 concurrent creates on a pool of 5.
    env.host
        .api(
            reqwest::Method::POST,
            "/v1/pools/demo/hello",
            Some(json!({"target": 5})),
        )
        .await;
    wait_for_ready(&env, 5).await;
    let warm = runtime_sandboxes(&env);
    assert_eq!(warm.len(), 5, "{warm:?}");
    let creates = (0..20).map(|_| {
        env.host.api(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(env.create_body()),
        )
    });
    let answers = futures_util::future::join_all(creates).await;
    let ids: Vec<String> = answers
        .iter()
        .map(|(status, info)| {
            assert_eq!(*status, StatusCode::CREATED, "{info}");
            info["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 20, "no sandbox twice: {ids:?}");
    let claimed = ids.iter().filter(|id| warm.contains(*id)).count();
    assert_eq!(claimed, 5, "5 warm, 15 cold");
    for id in &ids {
        let (_, info) = env
            .host
            .api(
                reqwest::Method::DELETE,
                &format!("/v1/sandboxes/{id}"),
                None,
            )
            .await;
        assert!(
            info["status"] == "stopped" || info["status"] == "exited",
            "{info}"
        );
    }

    // A new image retires the entries of the old one, and the pool refills on the new one. (21 claims
    // of demand: the pool is at its maximum.)
    wait_for_ready(&env, crate::host::DEFAULT_POOL_MAX as u64).await;
    let old = runtime_sandboxes(&env);
    let new_image = env.build_image().await;
    assert_ne!(new_image, image_id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = env.host.api(reqwest::Method::GET, "/v1/pools", None).await;
        let pool = &list["pools"][0];
        let now = runtime_sandboxes(&env);
        if pool["image_id"] == new_image.as_str()
            && pool["ready"].as_u64() >= Some(1)
            && pool["preparing"] == 0
            && now.is_disjoint(&old)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old entries never retired: {list} {now:?} {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &old {
        assert!(!mounted(&env.sandbox_root(id).join("merged")));
    }
    eprintln!(
        "warm pool: 2 prepared in {prepare_ms} ms; claim answered in {claim_ms} ms, agent connected \
         {spawned_ms} ms after the claim"
    );
    let remaining = runtime_sandboxes(&env);
    let roots: Vec<PathBuf> = remaining.iter().map(|id| env.sandbox_root(id)).collect();
    let sandboxes_dir = env.runtime.path().join("sandboxes");
    let IsolatedHost { host, runtime, .. } = env;
    host.stop().await;
    for root in &roots {
        assert!(!mounted(&root.join("merged")), "{}", root.display());
        assert!(!root.exists(), "{}", root.display());
    }
    assert!(std::fs::read_dir(&sandboxes_dir).map_or(true, |mut dir| dir.next().is_none()));
    drop(runtime);
}

/// Commit `files` (path, contents; `.sh` files executable) on `main` of the bare repository `git_dir`.
fn commit_to_repo(git_dir: &Path, files: &[(&str, &str)]) {
    use std::os::unix::fs::PermissionsExt as _;
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["clone", "--quiet", git_dir.to_str().unwrap(), "c"],
    );
    let clone = work.path().join("c");
    for (path, contents) in files {
        let path = clone.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        if path.extension().is_some_and(|e| e == "sh") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    git(&clone, &["add", "--all"]);
    git(
        &clone,
        &[
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "--quiet",
            "-m",
            "setup",
        ],
    );
    git(&clone, &["push", "--quiet", "origin", "main"]);
}

/// Start a build of `demo/hello` and wait for its end; the image's record.
async fn build_to_the_end(env: &IsolatedHost) -> Value {
    let build = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/images",
            Some(json!({"repo": "demo/hello"})),
            StatusCode::ACCEPTED,
        )
        .await;
    let id = build["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, image) = env
            .host
            .api(reqwest::Method::GET, &format!("/v1/images/{id}"), None)
            .await;
        if image["status"] != "building" {
            return image;
        }
        assert!(Instant::now() < deadline, "the build never ended: {image}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An image's setup runs in the isolation of a sandbox: at `/workspace`, as the sandbox uid, with an
/// environment built from nothing (no variable of the host, no token); it cannot read a host file
/// outside its tree, see the host's processes, or open a connection but through its egress proxy,
/// whose allow-list is empty; its output is in the log; what it writes is in the published tree.
/// A failing setup fails the build and publishes nothing; no setup leaves anything behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_setups_run_inside_sandbox_isolation() {
    let Some(env) = IsolatedHost::start("the isolated setup test").await else {
        return;
    };
    let secret_file = env.data.path().join("host-secret.txt");
    std::fs::write(&secret_file, "host-secret-contents").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let connected = Arc::clone(&connected);
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                connected.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let host_comm = std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim()
        .to_owned();
    let script = format!(
        "#!/bin/bash\n\
         echo \"setup at $(pwd) as uid $(id -u)\"\n\
         for p in {secret} {data} {runtime} {runtime}/images /root /home; do \
           if [ -e \"$p\" ]; then echo \"VISIBLE $p\"; fi; done\n\
         cat {secret} 2>/dev/null\n\
         for p in /proc/[0-9]*; do echo \"process $(cat $p/comm)\"; done\n\
         if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo CONNECTED-DIRECTLY; fi\n\
         curl -sS --max-time 10 http://127.0.0.1:{port}/; echo\n\
         env | cut -d= -f1 | sort | sed 's/^/variable /'\n\
         env | grep -c {token} | sed 's/^/token-seen /'\n\
         echo \"$PWD\" > setup-path.txt\n\
         echo SETUP-DONE\n",
        secret = secret_file.display(),
        data = env.data.path().display(),
        runtime = env.runtime.path().display(),
        token = TOKEN,
    );
    commit_to_repo(&env.bare, &[(".nightshift/setup.sh", &script)]);
    let image = build_to_the_end(&env).await;
    let log = image["setup_log"].as_str().unwrap();
    assert_eq!(image["status"], "ready", "{image}");
    assert!(log.contains("setup at /workspace as uid 0\n"), "{log}");
    assert!(!log.contains("VISIBLE"), "{log}");
    assert!(!log.contains("host-secret-contents"), "{log}");
    let processes: Vec<&str> = log.lines().filter(|l| l.starts_with("process ")).collect();
    assert!(
        !processes.is_empty() && processes.len() <= 6,
        "only the setup's own processes: {processes:?}"
    );
    assert!(
        !processes.contains(&format!("process {host_comm}").as_str()),
        "{processes:?}"
    );
    assert!(!log.contains("CONNECTED-DIRECTLY"), "{log}");
    assert!(
        log.contains("is not on this sandbox's allow-list"),
        "egress only through the proxy, which lets nothing through: {log}"
    );
    assert!(!connected.load(std::sync::atomic::Ordering::SeqCst));
    let variables: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("variable "))
        .collect();
    let allowed = [
        "ALL_PROXY",
        "HOME",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "OLDPWD",
        "PATH",
        "PWD",
        "SHLVL",
        "_",
        "all_proxy",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ];
    assert!(
        variables.iter().all(|v| allowed.contains(v)) && variables.contains(&"PATH"),
        "an environment built from nothing: {variables:?}"
    );
    assert!(log.contains("token-seen 0"), "{log}");
    assert!(log.contains("SETUP-DONE"), "{log}");
    let tree = env
        .runtime
        .path()
        .join("images/demo/hello")
        .join(image["id"].as_str().unwrap())
        .join("tree");
    assert_eq!(
        std::fs::read_to_string(tree.join("setup-path.txt")).unwrap(),
        "/workspace\n"
    );

    // A failing setup: the build fails, its output is in the log, nothing is published.
    commit_to_repo(
        &env.bare,
        &[(
            ".nightshift/setup.sh",
            "#!/bin/sh\necho failing-setup-output\nexit 3\n",
        )],
    );
    let failed = build_to_the_end(&env).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["setup_log"]
            .as_str()
            .unwrap()
            .contains("failing-setup-output"),
        "{failed}"
    );
    assert!(
        failed["error"].as_str().unwrap().contains("exit code 3"),
        "{failed}"
    );
    let published: Vec<String> = std::fs::read_dir(env.runtime.path().join("images/demo/hello"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(published, [image["id"].as_str().unwrap()], "nothing new");
    let (_, list) = env
        .host
        .api(reqwest::Method::GET, "/v1/images?repo=demo/hello", None)
        .await;
    assert_eq!(list["images"][0]["id"], image["id"], "{list}");
    assert!(
        runtime_sandboxes(&env).is_empty(),
        "no setup leaves its runtime directory: {:?}",
        runtime_sandboxes(&env)
    );
    env.host.stop().await;
}

/// Send a bash step to the agent without waiting for it.
async fn send_bash(socket: &mut AgentSocket, command: &str) {
    use nightshift_protocol::{Author, ServerToAgent};
    let step = json!({"tool": "bash", "input": {"command": command}});
    send_to_agent(
        socket,
        &ServerToAgent::RunPrompt {
            prompt_id: format!("p{}", rand::random::<u32>()),
            text: format!("[script:plan]\n{step}"),
            author: Author {
                login: "ada".into(),
                name: "Ada".into(),
                email: "ada@example.com".into(),
            },
            model: crate::scripted_model::MODEL.to_owned(),
        },
    )
    .await;
}

/// The host pids running exactly `argv` (NUL-separated).
fn pids_running(argv: &[u8]) -> Vec<libc::pid_t> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (cmdline == argv).then_some(pid)
        })
        .collect()
}

/// Two running sandboxes: from the second, bash can neither list nor read the first's workspace or
/// runtime directory (by any path the host knows them by), and sees none of its processes, not even
/// one the first is running at that moment; the two agents are in different pid and mount
/// namespaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_cannot_see_another_sandboxs_files_or_processes() {
    let Some(env) = IsolatedHost::start("the cross-sandbox test").await else {
        return;
    };
    env.build_image().await;
    let mut ids = Vec::new();
    let mut sockets = Vec::new();
    for session in ["session-a", "session-b"] {
        let mut body = env.create_body();
        body["session_id"] = json!(session);
        env.host
            .api_expecting(
                reqwest::Method::POST,
                "/v1/sandboxes",
                Some(body),
                StatusCode::CREATED,
            )
            .await;
        let mut socket = accept_agent(&env.worker).await;
        ids.push(welcome(&mut socket).await);
        sockets.push(socket);
    }
    let [first, second] = [ids[0].clone(), ids[1].clone()];
    let (mut first_socket, mut second_socket) = {
        let mut sockets = sockets.into_iter();
        (sockets.next().unwrap(), sockets.next().unwrap())
    };
    let (output, _) = run_bash(
        &mut first_socket,
        "echo first-sandbox-secret > first-marker.txt && echo WRITTEN",
        || env.agent_log(&first),
    )
    .await;
    assert!(output.contains("WRITTEN"), "{output}");
    // The first sandbox runs a process with a name of its own while the second looks around.
    send_bash(
        &mut first_socket,
        "exec -a first-sandbox-waiter-3599 sleep 600",
    )
    .await;
    let waiter = b"first-sandbox-waiter-3599\x00600\x00";
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids_running(waiter).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first sandbox's process never started: {}",
            env.agent_log(&first)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_root = env.sandbox_root(&first);
    let first_workspace = env
        .data
        .path()
        .join("sandboxes")
        .join(&first)
        .join("workspace");
    let probe = format!(
        "for p in {root} {root}/merged {root}/upper {root}/state {workspace} {runtime}/sandboxes; do \
           ls \"$p\" >/dev/null 2>&1 && echo \"LIST\"\"ED $p\"; done; \
         cat {root}/merged/first-marker.txt {root}/upper/first-marker.txt {workspace}/first-marker.txt 2>/dev/null; \
         find / -name first-marker.txt -not -path '/proc/*' 2>/dev/null | sed 's/^/FOU''ND /'; \
         ps -eo args | sed 's/^/ps /'; \
         cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo; echo PROBED",
        root = first_root.display(),
        workspace = first_workspace.display(),
        runtime = env.runtime.path().display(),
    );
    let (output, _) = run_bash(&mut second_socket, &probe, || env.agent_log(&second)).await;
    assert!(output.contains("PROBED"), "{output}");
    assert!(!output.contains("LISTED"), "{output}");
    assert!(!output.contains("FOUND"), "{output}");
    assert!(!output.contains("first-sandbox-secret"), "{output}");
    assert!(output.contains("ps "), "ps ran: {output}");
    assert!(!output.contains("first-sandbox-waiter"), "{output}");
    // And on the host: the agents live in namespaces of their own.
    let namespace = |pid: libc::pid_t, kind: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
    };
    let (first_pid, second_pid) = (agent_pid(&first).unwrap(), agent_pid(&second).unwrap());
    for kind in ["pid", "mnt", "net"] {
        assert_ne!(
            namespace(first_pid, kind),
            namespace(second_pid, kind),
            "{kind} namespace"
        );
    }
    // Stop the first sandbox's waiter (its prompt then ends).
    for pid in pids_running(waiter) {
        // SAFETY: only sends a signal, to the test's own waiter process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    drop((first_socket, second_socket));
    for id in [&first, &second] {
        env.host
            .api_expecting(
                reqwest::Method::DELETE,
                &format!("/v1/sandboxes/{id}"),
                None,
                StatusCode::OK,
            )
            .await;
    }
    env.host.stop().await;
}

/// Pool state of `demo/hello` from `GET /v1/pools` once `done` holds, or panic after `timeout`.
async fn wait_for_pool(
    env: &IsolatedHost,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let list = env
            .host
            .api_expecting(reqwest::Method::GET, "/v1/pools", None, StatusCode::OK)
            .await;
        let pool = list["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|pool| pool["repo"] == "demo/hello"))
            .cloned()
            .unwrap_or(Value::Null);
        if done(&pool) {
            return pool;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never got there: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pools follow fading demand down: with a 6 s window, `POST /v1/pools {target: 3}` fills 3; a claim
/// half a window later keeps the pool at 3 while the request holds; once the request's window passed the surplus entry is
/// released (target 2: the claim's demand), and once the claim's window passed too, the rest
/// (target 0). Released entries are unmounted and their directories removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_shrink_when_demand_fades() {
    const WINDOW_MS: u64 = 6_000;
    let Some(env) = IsolatedHost::start_with("the pool shrink test", |config| {
        config.pool_window_ms = WINDOW_MS;
    })
    .await
    else {
        return;
    };
    env.build_image().await;
    let requested = Instant::now();
    env.host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/pools/demo/hello",
            Some(json!({"target": 3})),
            StatusCode::ACCEPTED,
        )
        .await;
    wait_for_pool(&env, Duration::from_secs(30), |pool| {
        pool["ready"] == 3 && pool["preparing"] == 0
    })
    .await;
    assert!(
        requested.elapsed() < Duration::from_millis(WINDOW_MS),
        "preparing took longer than the window; the test cannot tell shrinking from slowness"
    );
    let prepared = runtime_sandboxes(&env);

    // Half a window later, a claim: demand of its own (target 2), under the request's floor of 3; the
    // pool refills to 3. (Half a window apart, so the claim outlives the request by many ticks.)
    tokio::time::sleep(Duration::from_millis(WINDOW_MS / 2).saturating_sub(requested.elapsed()))
        .await;
    let claimed_at = Instant::now();
    let claimed = env.create_sandbox().await;
    assert!(prepared.contains(&claimed));
    let socket = accept_agent(&env.worker).await;
    wait_for_pool(&env, Duration::from_secs(30), |pool| {
        pool["ready"] == 3 && pool["preparing"] == 0 && pool["target"] == 3
    })
    .await;
    assert!(requested.elapsed() < Duration::from_millis(WINDOW_MS));
    let full = runtime_sandboxes(&env);

    // The request's window passes: one surplus entry goes, the claim's demand keeps two.
    let pool = wait_for_pool(&env, Duration::from_secs(30), |pool| pool["ready"] == 2).await;
    assert!(
        requested.elapsed() >= Duration::from_millis(WINDOW_MS),
        "not before the request's window passed"
    );
    assert_eq!(
        (pool["target"].as_u64(), pool["recent_claims"].as_u64()),
        (Some(2), Some(1)),
        "{pool}"
    );
    // The claim's window passes too: nothing is left but the claimed sandbox.
    let pool = wait_for_pool(&env, Duration::from_secs(30), |pool| pool["ready"] == 0).await;
    assert!(claimed_at.elapsed() >= Duration::from_millis(WINDOW_MS));
    assert_eq!(
        (pool["target"].as_u64(), pool["recent_claims"].as_u64()),
        (Some(0), Some(0)),
        "{pool}"
    );
    // Taken out of the pool under its lock, released right after: wait for the release to finish.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = runtime_sandboxes(&env);
        if left == [claimed.clone()].into_iter().collect() {
            break;
        }
        assert!(Instant::now() < deadline, "never released: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in full.iter().filter(|id| **id != claimed) {
        assert!(!mounted(&env.sandbox_root(id).join("merged")), "{id}");
        assert!(!env.sandbox_root(id).exists(), "{id}");
    }
    drop(socket);
    env.host
        .api_expecting(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{claimed}"),
            None,
            StatusCode::OK,
        )
        .await;
    env.host.stop().await;
}

#[tokio::test]
async fn pools_need_isolation() {
    let data = tempfile::tempdir().unwrap();
    seed_repo(&data.path().join("git"), "demo/hello", "main").unwrap();
    let app = app_in(data.path());
    let answer = call(
        &app,
        "POST",
        "/v1/pools/demo/hello",
        Some(TOKEN),
        Some(json!({"target": 2})),
    )
    .await;
    assert_eq!(code(&answer), (StatusCode::CONFLICT, "pools_unavailable"));
    let answer = call(
        &app,
        "POST",
        "/v1/pools/demo/nothing",
        Some(TOKEN),
        Some(json!({"target": 2})),
    )
    .await;
    assert_eq!(code(&answer), (StatusCode::NOT_FOUND, "not_found"));
    let (status, list) = call(&app, "GET", "/v1/pools", Some(TOKEN), None).await;
    assert_eq!((status, list), (StatusCode::OK, json!({"pools": []})));
    let answer = call(&app, "GET", "/v1/pools", None, None).await;
    assert_eq!(answer.0, StatusCode::UNAUTHORIZED);
}

/// Acknowledge every event of the agent, as the Worker does, until the socket closes (an agent that
/// is stopped delivers its last events before it exits).
async fn acknowledge_all(mut socket: AgentSocket) {
    use futures_util::StreamExt as _;
    use nightshift_protocol::{AgentMessage, ServerToAgent};
    while let Some(Ok(frame)) = socket.next().await {
        let tokio_tungstenite::tungstenite::Message::Text(text) = frame else {
            continue;
        };
        if let Ok(AgentMessage::Event { producer_seq, .. }) = serde_json::from_str(text.as_str()) {
            send_to_agent(&mut socket, &ServerToAgent::Ack { producer_seq }).await;
        }
    }
}

/// Events from the agent until `until` matches one (each acknowledged, as the Worker does); all of them.
async fn events_until(
    socket: &mut AgentSocket,
    until: impl Fn(&nightshift_protocol::Event) -> bool,
) -> Vec<nightshift_protocol::Event> {
    use nightshift_protocol::{AgentMessage, ServerToAgent};
    let mut events = Vec::new();
    loop {
        let AgentMessage::Event {
            producer_seq,
            event,
        } = next_message(socket).await
        else {
            continue;
        };
        send_to_agent(socket, &ServerToAgent::Ack { producer_seq }).await;
        let done = until(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Extraction before teardown, with the real agent in an isolated sandbox: a snapshot after every
/// prompt and when the session asks (each a `snapshot` event and the sandbox's `last_snapshot`);
/// DELETE during a running command stops the prompt, commits and pushes its work in progress and
/// snapshots before the sandbox goes, and the session gets an end report naming that snapshot, which
/// restores the work; `kill -9` of an agent is reported too, with a snapshot the host took of what it
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_is_extracted_before_teardown_and_ends_are_reported() {
    use nightshift_protocol::{Event, ServerToAgent};
    let Some(env) = IsolatedHost::start("the extraction test").await else {
        return;
    };
    env.build_image().await;
    let id = env.create_sandbox().await;
    let mut socket = accept_agent(&env.worker).await;
    assert_eq!(welcome(&mut socket).await, id);
    let log_path = env
        .data
        .path()
        .join("sandboxes")
        .join(&id)
        .join("agent.log");
    let _log_on_panic = LogOnPanic(log_path);

    // After a prompt: a snapshot, named in an event and in the sandbox's info.
    run_bash(&mut socket, "echo one > one.txt", || env.agent_log(&id)).await;
    let events = events_until(&mut socket, |e| matches!(e, Event::Snapshot { .. })).await;
    let Some(Event::Snapshot { id: first, reason }) = events.last() else {
        unreachable!()
    };
    assert_eq!(reason, "prompt_finished");
    let (_, info) = env
        .host
        .api(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(info["last_snapshot"], first.as_str(), "{info}");

    // When the session asks.
    send_to_agent(
        &mut socket,
        &ServerToAgent::Snapshot {
            reason: "Asked by the session".to_owned(),
        },
    )
    .await;
    let events = events_until(&mut socket, |e| matches!(e, Event::Snapshot { .. })).await;
    assert!(
        matches!(events.last(), Some(Event::Snapshot { id: same, reason }) if same == first && reason == "asked_by_the_session"),
        "nothing changed, so the same snapshot: {events:?}"
    );

    // DELETE while a command runs: the work in progress is committed, pushed and snapshotted first.
    let step = json!({"tool": "bash", "input": {"command": "echo wip > wip.txt && echo STARTED && sleep 60"}});
    send_to_agent(
        &mut socket,
        &ServerToAgent::RunPrompt {
            prompt_id: "long".to_owned(),
            text: format!("[script:plan]\n{step}"),
            author: nightshift_protocol::Author {
                login: "ada".into(),
                name: "Ada".into(),
                email: "ada@example.com".into(),
            },
            model: crate::scripted_model::MODEL.to_owned(),
        },
    )
    .await;
    events_until(
        &mut socket,
        |e| matches!(e, Event::ToolOutput { text, .. } if text.contains("STARTED")),
    )
    .await;
    let stopping = Instant::now();
    let delete = {
        let (base, token) = (env.host.base_url.clone(), TOKEN);
        let id = id.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .delete(format!("{base}/v1/sandboxes/{id}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let events = events_until(&mut socket, |e| matches!(e, Event::Snapshot { .. })).await;
    let stopped_ms = stopping.elapsed().as_millis();
    assert!(
        events.iter().any(|e| matches!(e, Event::PromptFinished { status, .. } if serde_json::to_value(status).unwrap() == "stopped")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Push { branch, .. } if branch == "nightshift/session-1")),
        "{events:?}"
    );
    let Some(Event::Snapshot { id: last, reason }) = events.last() else {
        unreachable!()
    };
    assert_eq!(reason, "shutdown");
    assert_ne!(last, first);
    let deleted = delete.await.unwrap();
    assert_eq!(deleted["status"], "stopped", "{deleted}");
    assert_eq!(
        git(&env.bare, &["show", "nightshift/session-1:wip.txt"]),
        "wip"
    );
    let (path, auth, ended) = end_report(&env.worker).await;
    assert_eq!(
        (path.as_str(), auth.as_str()),
        ("/sandbox/session-1/ended", "Bearer sandbox-secret")
    );
    assert_eq!(
        (ended.sandbox_id.as_str(), ended.status.as_str()),
        (id.as_str(), "stopped")
    );
    // The host's own snapshot at the end has the same content as the agent's last one.
    assert_eq!(
        ended.snapshot_id.as_deref(),
        Some(last.as_str()),
        "{ended:?}"
    );
    eprintln!("DELETE during a command → work pushed and snapshotted in {stopped_ms} ms");

    // The snapshot restores the work; `kill -9` of that sandbox's agent is reported with a snapshot
    // of what it left.
    let mut body = env.create_body();
    body["snapshot"] = json!(last);
    let restored = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(body),
            StatusCode::CREATED,
        )
        .await;
    let restored_id = restored["id"].as_str().unwrap().to_owned();
    let workspace = env
        .data
        .path()
        .join("sandboxes")
        .join(&restored_id)
        .join("workspace");
    assert_eq!(
        std::fs::read_to_string(workspace.join("wip.txt")).unwrap(),
        "wip\n"
    );
    let mut socket = accept_agent(&env.worker).await;
    assert_eq!(welcome(&mut socket).await, restored_id);
    std::fs::write(workspace.join("crash.txt"), "left behind\n").unwrap();
    let pid = agent_pid(&restored_id).expect("the agent runs in its cgroup");
    // SAFETY: sends a signal to the agent this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (_, _, ended) = end_report(&env.worker).await;
    assert_eq!(
        (ended.sandbox_id.as_str(), ended.status.as_str()),
        (restored_id.as_str(), "exited")
    );
    assert!(ended.detail.contains("killed by signal 9"), "{ended:?}");
    let crashed = ended
        .snapshot_id
        .expect("a snapshot of what the agent left");
    let (_, info) = env
        .host
        .api(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{restored_id}"),
            None,
        )
        .await;
    assert_eq!(info["last_snapshot"], crashed.as_str(), "{info}");
    let mut body = env.create_body();
    body["snapshot"] = json!(crashed);
    let again = env
        .host
        .api_expecting(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(body),
            StatusCode::CREATED,
        )
        .await;
    let again_workspace = env
        .data
        .path()
        .join("sandboxes")
        .join(again["id"].as_str().unwrap())
        .join("workspace");
    for (file, content) in [("wip.txt", "wip\n"), ("crash.txt", "left behind\n")] {
        assert_eq!(
            std::fs::read_to_string(again_workspace.join(file)).unwrap(),
            content
        );
    }
    let IsolatedHost { host, .. } = env;
    host.stop().await;
}

/// Prints a log file when dropped during a panic.
struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.0.display(),
                std::fs::read_to_string(&self.0).unwrap_or_default()
            );
        }
    }
}

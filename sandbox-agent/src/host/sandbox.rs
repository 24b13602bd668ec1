//! Sandboxes of the local host: a clone of the repository plus a `sandbox-agent run` child in its
//! own process group, with a cleared environment. The table here is the only record of them (a
//! restarted host forgets its sandboxes; their files stay on disk).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nightshift_protocol::provider::{CreateSandboxRequest, SandboxInfo};
use tokio::sync::watch;

use super::{io_error, AppState, HostConfig, HostError};
use crate::env;
use crate::seed::{self, RepoName};

/// `status` of a sandbox whose agent runs.
pub(super) const RUNNING: &str = "running";
/// `status` of a sandbox whose agent ended by itself (or was killed by something else).
pub(super) const EXITED: &str = "exited";
/// `status` of a sandbox stopped through the API, a timeout or the host's shutdown.
pub(super) const STOPPED: &str = "stopped";

/// Time between SIGTERM and SIGKILL when stopping an agent.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The longest a clone may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default base branch.
const DEFAULT_BASE_BRANCH: &str = seed::DEFAULT_BRANCH;

/// The sandboxes of this host, by id.
#[derive(Default)]
pub(super) struct Sandboxes {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    info: SandboxInfo,
    /// The agent's process group (= its pid) while it runs.
    process_group: Option<libc::pid_t>,
    /// Becomes `true` once the agent has exited and been reaped.
    exited: watch::Receiver<bool>,
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
            .map(|entry| entry.info.clone())
            .ok_or_else(|| not_found(id))
    }

    /// All sandboxes, oldest first.
    pub(super) fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = self
            .lock()
            .values()
            .map(|entry| entry.info.clone())
            .collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        all
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
    repo: RepoName,
    branch: String,
}

/// Check everything that can be checked without touching the filesystem.
fn validate(request: &CreateSandboxRequest) -> Result<Plan, HostError> {
    if request.snapshot.is_some() {
        return Err(HostError::InvalidField {
            field: "snapshot",
            reason: "restoring snapshots is not supported yet",
        });
    }
    let repo = request.repo.as_deref().ok_or(HostError::InvalidField {
        field: "repo",
        reason: "required",
    })?;
    let repo = RepoName::parse(repo).map_err(HostError::Name)?;
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
    Ok(Plan { repo, branch })
}

/// The complete environment of an agent: nothing of the host's own environment except `PATH`.
pub(super) fn agent_env(
    config: &HostConfig,
    base_url: &str,
    sandbox_id: &str,
    sandbox_dir: &Path,
    workspace: &Path,
    request: &CreateSandboxRequest,
) -> Vec<(&'static str, OsString)> {
    let mut vars: Vec<(&'static str, OsString)> = vec![
        (
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME", sandbox_dir.into()),
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

/// `POST /v1/sandboxes`: validate, clone over smart HTTP from this host, start the agent.
pub(super) async fn create(
    state: &AppState,
    request: CreateSandboxRequest,
) -> Result<SandboxInfo, HostError> {
    let started = Instant::now();
    let Plan { repo, branch } = validate(&request)?;
    let shared = &state.inner;
    let git_dir = repo.git_dir(&shared.git_root);
    if !git_dir.is_dir() {
        return Err(HostError::RepoNotFound {
            repo: repo.to_string(),
        });
    }
    check_branch(&repo, &git_dir, &branch).await?;

    let id = hex::encode(rand::random::<[u8; 16]>());
    let sandbox_dir = shared.sandboxes_root.join(&id);
    let workspace = sandbox_dir.join("workspace");
    std::fs::create_dir_all(&sandbox_dir).map_err(io_error("create directory", &sandbox_dir))?;
    let remote = format!(
        "{}/git/{}/{}.git",
        shared.base_url,
        repo.owner(),
        repo.name()
    );
    if let Err(err) = clone(&remote, &branch, &sandbox_dir, &workspace).await {
        let _ = std::fs::remove_dir_all(&sandbox_dir);
        return Err(err);
    }
    let cloned_ms = started.elapsed().as_millis();

    let log_path = sandbox_dir.join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(io_error("create", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("open", &log_path))?;
    let config = &shared.config;
    let mut command = tokio::process::Command::new(&config.agent_bin);
    command
        .arg("run")
        .env_clear()
        .envs(agent_env(
            config,
            &shared.base_url,
            &id,
            &sandbox_dir,
            &workspace,
            &request,
        ))
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .process_group(0);
    let mut child = command.spawn().map_err(|source| HostError::Spawn {
        command: format!("{} run", config.agent_bin.display()),
        source,
    })?;
    let process_group = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());

    let info = SandboxInfo {
        id: id.clone(),
        session_id: request.session_id.clone(),
        repo: repo.to_string(),
        status: RUNNING.to_owned(),
        created_ms: now_ms(),
        detail: String::new(),
        isolation: None,
        limits: None,
        refused: Vec::new(),
    };
    let (done_tx, done_rx) = watch::channel(false);
    shared.sandboxes.lock().insert(
        id.clone(),
        Entry {
            info: info.clone(),
            process_group,
            exited: done_rx,
        },
    );

    let waiter_state = state.clone();
    let waiter_id = id.clone();
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => describe_exit(status),
            Err(err) => format!("could not wait for the agent: {err}"),
        };
        tracing::info!(sandbox_id = %waiter_id, exit = %exit, "agent ended");
        waiter_state
            .inner
            .sandboxes
            .finish(&waiter_id, &exit, &done_tx);
    });
    if request.timeout_ms > 0 {
        let watchdog_state = state.clone();
        let watchdog_id = id.clone();
        let timeout_ms = request.timeout_ms;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
            let _ = stop(
                &watchdog_state,
                &watchdog_id,
                &format!("timed out after {timeout_ms} ms"),
            )
            .await;
        });
    }
    tracing::info!(
        sandbox_id = %id,
        session_id = %request.session_id,
        repo = %repo,
        branch = %branch,
        clone_ms = cloned_ms,
        "sandbox started"
    );
    Ok(info)
}

/// `branch` must exist in the bare repository.
async fn check_branch(repo: &RepoName, git_dir: &Path, branch: &str) -> Result<(), HostError> {
    let mut command = tokio::process::Command::from(seed::git_command());
    command
        .arg("--git-dir")
        .arg(git_dir)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}^{{commit}}"));
    let output = command.output().await.map_err(|source| HostError::Spawn {
        command: "git rev-parse".to_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HostError::BranchNotFound {
            repo: repo.to_string(),
            branch: branch.to_owned(),
        })
    }
}

/// `git clone --branch <branch> <remote> <workspace>` with the sandbox as HOME and no inherited
/// config.
async fn clone(remote: &str, branch: &str, home: &Path, workspace: &Path) -> Result<(), HostError> {
    let mut command = tokio::process::Command::from(seed::git_command());
    command
        .env("HOME", home)
        .args(["clone", "--quiet", "--branch", branch, "--", remote])
        .arg(workspace)
        .kill_on_drop(true);
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
/// mark it `stopped`. A sandbox that already ended keeps its status. Files stay.
pub(super) async fn stop(
    state: &AppState,
    id: &str,
    reason: &str,
) -> Result<SandboxInfo, HostError> {
    let sandboxes = &state.inner.sandboxes;
    let (process_group, mut exited) = {
        let mut entries = sandboxes.lock();
        let entry = entries.get_mut(id).ok_or_else(|| not_found(id))?;
        match entry.process_group {
            Some(group) if entry.info.status == RUNNING => {
                entry.info.status = STOPPED.to_owned();
                entry.info.detail = reason.to_owned();
                (group, entry.exited.clone())
            }
            _ => return Ok(entry.info.clone()),
        }
    };
    signal_group(process_group, libc::SIGTERM);
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
}

/// Send `signal` to every process of `group`. Returns whether any process received it.
fn signal_group(group: libc::pid_t, signal: libc::c_int) -> bool {
    if group <= 1 {
        return false; // never signal init or every process
    }
    // SAFETY: `killpg` only sends a signal; `group` is the id of a process group this host created.
    unsafe { libc::killpg(group, signal) == 0 }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
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
            public_url: None,
            agent_bin: "/bin/true".into(),
            provider_token: "provider-secret".into(),
            model,
            agent_log_filter: "debug".into(),
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
        assert_eq!(vars["ANTHROPIC_BASE_URL"], "http://127.0.0.1:9/scripted-model");
    }

    #[test]
    fn validation() {
        assert!(validate(&request()).is_ok());
        let cases: [fn(&mut CreateSandboxRequest); 7] = [
            |r| r.repo = None,
            |r| r.repo = Some("../x".into()),
            |r| r.snapshot = Some("snap".into()),
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

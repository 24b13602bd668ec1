//! The agent end to end through real workerd: a scripted multi-step task (read, grep, edit two files, run
//! the repository's tests with bash) whose every event reaches a client, and whose commit is pushed as
//! the person who asked; a second person's prompt is committed as them.

use std::process::Command;
use std::time::Duration;

use nightshift_protocol::{Event, EventEnvelope, PromptStatus};
use nightshift_tests::System;
use serde_json::json;

use crate::flow::{
    self, assert_contiguous, finished_status, join, pair, until_finished, until_ready,
};

fn plan() -> String {
    let steps = [
        json!({"tool": "read_file", "input": {"path": "hello/greet.py"}}),
        json!({"tool": "grep", "input": {"pattern": "def (greet|shout)"}}),
        json!([
            {"tool": "edit_file", "input": {
                "path": "hello/greet.py",
                "old_text": "def shout(name: str) -> str:",
                "new_text": "def wave(name: str) -> str:\n    \"\"\"Return a wave for `name`.\"\"\"\n    return f\"o/ {greet(name)}\"\n\n\ndef shout(name: str) -> str:"
            }},
            {"tool": "edit_file", "input": {
                "path": "tests/test_greet.py",
                "old_text": "    def test_shout(self):",
                "new_text": "    def test_wave(self):\n        from hello.greet import wave\n        self.assertEqual(wave(\"Ada\"), \"o/ Hello, Ada!\")\n\n    def test_shout(self):"
            }}
        ]),
        json!({"tool": "bash", "input": {"command": "/usr/bin/python3 -m unittest -v 2>&1"}}),
        json!({"text": "Added `wave` with a test; the suite passes."}),
    ];
    let mut text = String::from("Add a wave greeting with a test\n[script:plan]\n");
    for step in steps {
        text.push_str(&step.to_string());
        text.push('\n');
    }
    text
}

fn git_log(system: &System, branch: &str) -> anyhow::Result<Vec<String>> {
    let git_dir = system.host_data_dir().join("git/demo/hello.git");
    let output = Command::new("git")
        .arg("--git-dir")
        .arg(&git_dir)
        .args(["log", "--format=%H|%an <%ae>|%cn", branch])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "git log: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn pushes(events: &[EventEnvelope]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Push { branch, commit } => Some((branch.clone(), commit.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_multi_step_task_is_streamed_committed_as_its_author_and_pushed() -> anyhow::Result<()> {
    let system = System::start().await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let (mut b, _) = join(&people.bob, &people.session, None).await?;

    let prompt_id = flow::prompt(&mut a, &plan(), &mut seen).await?;
    seen.extend(until_finished(&mut a, &prompt_id).await?);
    // As root (as CI runs), the agent ran isolated: overlay, bubblewrap, egress through the proxy.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let log = system.host_log();
        assert!(
            log.contains("sandboxes are isolated"),
            "the host isolates sandboxes as root:\n{log}"
        );
        assert!(
            log.contains("isolated=true"),
            "this session's sandbox was isolated:\n{log}"
        );
    }
    assert_eq!(
        finished_status(&seen, &prompt_id),
        Some(PromptStatus::Completed),
        "{seen:#?}"
    );
    assert_contiguous(&seen);

    // The catch-up ran before any write.
    let sync: Vec<&str> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::GitSync { state, .. } => Some(state.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(sync, ["started", "done"]);

    let calls: Vec<&str> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::ToolCall { tool, .. } => Some(tool.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        calls,
        ["read_file", "grep", "edit_file", "edit_file", "bash"]
    );
    let results: Vec<(bool, &str)> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::ToolResult { ok, output, .. } => Some((*ok, output.as_str())),
            _ => None,
        })
        .collect();
    assert!(results.iter().all(|(ok, _)| *ok), "{results:#?}");
    assert!(
        results[1].1.contains("hello/greet.py:"),
        "grep finds the definitions: {}",
        results[1].1
    );
    assert!(
        results[2].1.contains("+def wave"),
        "edit shows a diff: {}",
        results[2].1
    );
    let bash = results[4].1;
    assert!(
        bash.contains("test_wave") && bash.contains("OK"),
        "the tests ran and passed: {bash}"
    );
    let streamed: String = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::ToolOutput { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        streamed.contains("test_wave"),
        "bash output was streamed: {streamed:?}"
    );
    let mut changed: Vec<&str> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::FileChanged { path, .. } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    changed.sort_unstable();
    changed.dedup();
    assert_eq!(changed, ["hello/greet.py", "tests/test_greet.py"]);

    let branch = format!("nightshift/{}", people.session);
    let ada_push = pushes(&seen);
    assert_eq!(ada_push.len(), 1, "one push: {ada_push:?}");
    assert_eq!(ada_push[0].0, branch);
    let log = git_log(&system, &branch)?;
    assert_eq!(
        log[0],
        format!(
            "{}|Ada Lovelace <ada@example.com>|Nightshift",
            ada_push[0].1
        ),
        "the pushed commit is Ada's, committed by Nightshift"
    );

    // Bob saw everything live, and his own prompt is committed as him.
    let mut bob_seen = Vec::new();
    let bob_prompt = flow::prompt(
        &mut b,
        "[script:write path=NOTES.md content=bob was here]",
        &mut bob_seen,
    )
    .await?;
    bob_seen.extend(until_finished(&mut b, &bob_prompt).await?);
    assert!(bob_seen
        .iter()
        .any(|e| matches!(&e.event, Event::Push { .. })));
    let log = git_log(&system, &branch)?;
    assert!(
        log[0].ends_with("|Bob Noyce <bob@example.com>|Nightshift"),
        "{log:?}"
    );
    assert!(
        log[1].ends_with("|Ada Lovelace <ada@example.com>|Nightshift"),
        "{log:?}"
    );
    Ok(())
}

#[tokio::test]
async fn stop_kills_a_running_command_and_the_next_prompt_starts_cleanly() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada.create_session(nightshift_tests::DEMO_REPO).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut seen = until_ready(&mut a).await?;

    // A background child with a unique command line, so it can be found in the host's /proc (the
    // command runs in its own pid namespace, so its own idea of pids means nothing here).
    let marker = format!("{}.{}", 900 + std::process::id() % 100, std::process::id());
    let command = json!({"tool": "bash", "input": {"command": format!("sleep {marker} & echo started; wait")}});
    let prompt_id = flow::prompt(&mut a, &format!("[script:plan]\n{command}\n"), &mut seen).await?;
    a.wait_for_event(
        |e| matches!(e, Event::ToolOutput { text, .. } if text.contains("started")),
        flow::WAIT,
    )
    .await?;
    // `echo` may print before the backgrounded child has exec'd `sleep`: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !running(&marker) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running(&marker), "the command runs");

    let stop_sent = std::time::Instant::now();
    a.send(&nightshift_protocol::ClientMessage::Stop {
        scope: nightshift_protocol::StopScope::Turn,
    })
    .await?;
    let events = until_finished(&mut a, &prompt_id).await?;
    eprintln!(
        "stop -> prompt_finished at the client: {:?}",
        stop_sent.elapsed()
    );
    assert_eq!(
        finished_status(&events, &prompt_id),
        Some(PromptStatus::Stopped)
    );
    assert!(
        !running(&marker),
        "the command and its children were killed"
    );

    let mut next = Vec::new();
    let again = flow::prompt(&mut a, "[script:tokens count=5 rate=0]", &mut next).await?;
    next.extend(until_finished(&mut a, &again).await?);
    assert_eq!(
        finished_status(&next, &again),
        Some(PromptStatus::Completed)
    );
    Ok(())
}

/// Whether a process whose command line contains `sleep <marker>` exists on this machine.
fn running(marker: &str) -> bool {
    let needle = format!("sleep\0{marker}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
}

/// Kills the child on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_model_on_an_openai_compatible_server_does_the_same_work() -> anyhow::Result<()> {
    // A local OpenAI-compatible server (as Ollama or vLLM would be): the scripted model's chat completions.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tools = nightshift_tests::system::Tools::from_env()?;
    let _server = Child(
        Command::new(&tools.agent_bin)
            .args(["scripted-model", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let system = System::start_with(nightshift_tests::StartOptions {
        host_env: vec![(
            "OPENAI_BASE_URL".to_owned(),
            format!("http://127.0.0.1:{port}/v1"),
        )],
        ..Default::default()
    })
    .await?;
    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada
        .create_session_with_model(nightshift_tests::DEMO_REPO, Some("qwen2.5-coder:7b"))
        .await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let step = json!({"tool": "write_file", "input": {"path": "LOCAL.md", "content": "written through chat completions\n"}});
    let prompt_id = flow::prompt(&mut a, &format!("[script:plan]\n{step}\n"), &mut seen).await?;
    seen.extend(until_finished(&mut a, &prompt_id).await?);
    assert_eq!(
        finished_status(&seen, &prompt_id),
        Some(PromptStatus::Completed),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|e| matches!(&e.event, Event::Token { .. })),
        "text streamed"
    );
    assert!(seen
        .iter()
        .any(|e| matches!(&e.event, Event::FileChanged { path, .. } if path == "LOCAL.md")));
    assert!(seen.iter().any(|e| matches!(&e.event, Event::Usage { cost_usd: None, input_tokens, .. } if *input_tokens > 0)), "usage counted, no price for a local model");
    assert_eq!(pushes(&seen).len(), 1);
    Ok(())
}

/// Build the demo repository's image through the provider API and wait until it is ready.
pub(crate) async fn build_image(system: &System) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = system.host_url();
    let build: serde_json::Value = http
        .post(format!("{base}/v1/images"))
        .bearer_auth(system.provider_token())
        .json(&json!({"repo": nightshift_tests::DEMO_REPO}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = build["id"].as_str().unwrap_or_default().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let image: serde_json::Value = http
            .get(format!("{base}/v1/images/{id}"))
            .bearer_auth(system.provider_token())
            .send()
            .await?
            .json()
            .await?;
        match image["status"].as_str() {
            Some("ready") => return Ok(()),
            Some("building") if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            _ => anyhow::bail!("the demo image did not become ready: {image}"),
        }
    }
}

/// The host pid of the agent serving sandbox `sandbox_id` (its command line and its cgroup).
pub(crate) fn agent_pid(sandbox_id: &str) -> Option<libc::pid_t> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: libc::pid_t = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            (cmdline.starts_with(b"/opt/nightshift/sandbox-agent\0run\0")
                && cgroup.contains(&format!("/nightshift/{sandbox_id}\n")))
            .then_some(pid)
        })
}

/// Extraction through the real Worker: a snapshot follows the prompt and becomes the session's newest;
/// when the agent is killed (`kill -9`), the host snapshots what it left and reports the end, and the
/// session shows the failure with the snapshot that holds the work. (Isolated sandboxes only: as
/// root, as CI runs.)
#[tokio::test]
async fn a_killed_agent_is_reported_to_its_session_with_its_last_snapshot() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: no isolated sandboxes, so no snapshots to check");
        return Ok(());
    }
    let system = System::start().await?;
    // Snapshots are deltas against an image: the repository has one before the session starts.
    build_image(&system).await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let prompt_id = flow::prompt(
        &mut a,
        "[script:write path=KEEP.md content=worth keeping]",
        &mut seen,
    )
    .await?;
    seen.extend(until_finished(&mut a, &prompt_id).await?);
    let snapshot = a
        .wait_for_event(
            |e| matches!(e, Event::Snapshot { .. }),
            std::time::Duration::from_secs(30),
        )
        .await?;
    let Event::Snapshot {
        id: after_prompt,
        reason,
    } = snapshot.event
    else {
        unreachable!()
    };
    assert_eq!(reason, "prompt_finished");
    let state = flow::state(&people.ada, &people.session).await?;
    assert_eq!(
        state.sandbox.last_snapshot.as_deref(),
        Some(after_prompt.as_str())
    );

    let sandbox_id = state.sandbox.id.clone().expect("the session has a sandbox");
    let pid = agent_pid(&sandbox_id).expect("the agent runs in its cgroup");
    // SAFETY: sends a signal to the agent this test's host started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let events = a
        .events_until(
            |e| matches!(e, Event::Notice { level, .. } if level == "warn"),
            std::time::Duration::from_secs(30),
        )
        .await?;
    let failed = events
        .iter()
        .find_map(|e| match &e.event {
            Event::SandboxStatus { status, detail } => Some((*status, detail.clone())),
            _ => None,
        })
        .expect("a sandbox_status");
    assert_eq!(
        failed.0,
        nightshift_protocol::SandboxStatus::Failed,
        "{failed:?}"
    );
    assert!(failed.1.contains("killed by signal 9"), "{failed:?}");
    // The host's snapshot at the end: the prompt's one when nothing changed since (content-addressed),
    // else a new one in the log. The status names it, and it is the session's newest.
    let at_end = events
        .iter()
        .find_map(|e| match &e.event {
            Event::Snapshot { id, reason } if reason == "sandbox_ended" => Some(id.clone()),
            _ => None,
        })
        .unwrap_or(after_prompt);
    assert!(failed.1.contains(&at_end[..12]), "{failed:?}");
    let state = flow::state(&people.ada, &people.session).await?;
    assert_eq!(
        state.sandbox.last_snapshot.as_deref(),
        Some(at_end.as_str())
    );
    assert!(system.host_log().contains("end reported to the session"));
    Ok(())
}

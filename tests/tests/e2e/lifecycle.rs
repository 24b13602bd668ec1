//! The session lifecycle through real workerd and the real host: the hard timeout saves uncommitted
//! work (branch and snapshot) before it ends the session, and an agent killed mid-prompt again and
//! again is replaced from its snapshot until every prompt is done, with one coherent log.
//! (Isolated sandboxes only, for snapshots: as root, as CI runs.)

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nightshift_protocol::{Event, EventEnvelope, PromptStatus, SandboxStatus};
use nightshift_tests::client::Ws;
use nightshift_tests::{StartOptions, System};
use serde_json::json;

use crate::agent::{agent_pid, build_image};
use crate::flow::{self, assert_contiguous, finished_status, join, pair, until_ready};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn git(system: &System, args: &[&str]) -> anyhow::Result<String> {
    let git_dir = system.host_data_dir().join("git/demo/hello.git");
    let output = Command::new("git")
        .arg("--git-dir")
        .arg(&git_dir)
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The paths in a snapshot archive of the host.
fn snapshot_paths(system: &System, id: &str) -> anyhow::Result<String> {
    let archive = system
        .host_data_dir()
        .join("snapshots")
        .join(format!("{id}.tar.zst"));
    let output = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc \"$1\" | tar -t")
        .arg("sh")
        .arg(&archive)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "listing {}: {}",
        archive.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// A session of 40 s whose agent is told to save its work 20 s before the end: a prompt that wrote a
/// file and then runs a long command is stopped, its work committed and pushed as work in progress
/// and snapshotted; at the end the session is stopped, the prompt is `stopped`, and no prompt is
/// accepted any more.
#[tokio::test]
async fn the_hard_timeout_saves_uncommitted_work_to_the_branch_and_a_snapshot() -> anyhow::Result<()>
{
    if !is_root() {
        eprintln!("not root: no isolated sandboxes, so no snapshots to check");
        return Ok(());
    }
    let system = System::start_with(StartOptions::worker_vars([
        ("SESSION_TIMEOUT_MS", "40000"),
        ("SESSION_PRE_EXPIRY_MS", "20000"),
    ]))
    .await?;
    build_image(&system).await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let steps = [
        json!({"tool": "write_file", "input": {"path": "UNSAVED.md", "content": "written before the deadline\n"}}),
        json!({"tool": "bash", "input": {"command": "sleep 300"}}),
    ];
    let mut text = String::from("Write, then wait\n[script:plan]\n");
    for step in steps {
        text.push_str(&step.to_string());
        text.push('\n');
    }
    let prompt_id = flow::prompt(&mut a, &text, &mut seen).await?;
    seen.extend(
        a.events_until(
            |e| {
                matches!(e, Event::SandboxStatus { status: SandboxStatus::Stopped, detail }
                    if detail.contains("time limit"))
            },
            Duration::from_secs(90),
        )
        .await?,
    );
    assert_contiguous(&seen);
    let shutdown_at = seen
        .iter()
        .position(|e| {
            matches!(&e.event, Event::SandboxStatus { status: SandboxStatus::Snapshotting, detail }
                if detail.contains("time limit"))
        })
        .expect("the pre-expiry shutdown is logged");
    assert!(
        seen[..shutdown_at]
            .iter()
            .any(|e| matches!(&e.event, Event::FileChanged { path, .. } if path == "UNSAVED.md")),
        "the file was written before the shutdown"
    );
    assert_eq!(
        finished_status(&seen, &prompt_id),
        Some(PromptStatus::Stopped)
    );

    // On the session branch: pushed after the shutdown.
    let branch = format!("nightshift/{}", people.session);
    assert!(
        seen[shutdown_at..]
            .iter()
            .any(|e| matches!(&e.event, Event::Push { branch: b, .. } if *b == branch)),
        "work in progress pushed after the shutdown"
    );
    assert_eq!(
        git(&system, &["show", &format!("{branch}:UNSAVED.md")])?,
        "written before the deadline\n"
    );
    // In the session's newest snapshot.
    let state = flow::state(&people.ada, &people.session).await?;
    let snapshot = state
        .sandbox
        .last_snapshot
        .clone()
        .expect("a snapshot was taken");
    assert!(seen[shutdown_at..].iter().any(
        |e| matches!(&e.event, Event::Snapshot { reason, .. } if reason == "shutdown" || reason == "sandbox_ended")
    ));
    let paths = snapshot_paths(&system, &snapshot)?;
    assert!(paths.lines().any(|p| p.ends_with("UNSAVED.md")), "{paths}");
    assert!(state.queue.is_empty(), "{:?}", state.queue);

    // The session has ended: no more prompts.
    let refused = people
        .ada
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{}/prompts", people.session),
        )
        .json(&json!({"text": "more", "idempotency_key": "after-the-end"}))
        .send()
        .await?;
    assert_eq!(refused.status(), 409);
    Ok(())
}

/// Once `prompt` streams, send `signal` to the session's agent, then wait up to `resume_within` for the
/// session's notice that it resumes `prompt` on a new sandbox. Returns the signalled sandbox's id.
async fn signal_mid_prompt(
    a: &mut Ws,
    people: &flow::Pair,
    prompt: &str,
    signal: libc::c_int,
    resume_within: Duration,
    seen: &mut Vec<EventEnvelope>,
) -> anyhow::Result<String> {
    seen.extend(
        a.events_until(
            |e| matches!(e, Event::Token { prompt_id, .. } if prompt_id == prompt),
            Duration::from_secs(60),
        )
        .await?,
    );
    let state = flow::state(&people.ada, &people.session).await?;
    let sandbox_id = state.sandbox.id.context("no sandbox mid-prompt")?;
    let pid = agent_pid(&sandbox_id).context("the agent is not in its cgroup")?;
    // SAFETY: sends a signal to the agent this test's host started.
    unsafe { libc::kill(pid, signal) };
    let resuming = format!("resuming prompt {prompt}");
    seen.extend(
        a.events_until(
            |e| matches!(e, Event::Notice { text, .. } if text.starts_with(&resuming)),
            resume_within,
        )
        .await?,
    );
    Ok(sandbox_id)
}

/// Kill the agent (`kill -9`) in the middle of a slow prompt, twenty times: each time the host
/// reports the crash with a snapshot, the session asks for a new sandbox restored from it and
/// re-delivers the prompt as resumed; in the end both prompts are completed, and the log a client saw
/// live is exactly the stored log (nothing lost, nothing twice).
#[tokio::test]
async fn an_agent_killed_mid_prompt_again_and_again_is_replaced_until_every_prompt_is_done(
) -> anyhow::Result<()> {
    const KILLS: usize = 20;
    if !is_root() {
        eprintln!("not root: no isolated sandboxes, so no snapshots to restore");
        return Ok(());
    }
    let system = System::start().await?;
    build_image(&system).await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let first = flow::prompt(&mut a, "[script:slow ms=6000]", &mut seen).await?;
    let second = flow::prompt(
        &mut a,
        "[script:write path=AFTER.md content=after the crashes]",
        &mut seen,
    )
    .await?;
    for kill in 0..KILLS {
        signal_mid_prompt(
            &mut a,
            &people,
            &first,
            libc::SIGKILL,
            Duration::from_secs(60),
            &mut seen,
        )
        .await
        .map_err(|e| anyhow::anyhow!("kill {kill}: {e}; host log:\n{}", system.host_log()))?;
    }
    seen.extend(flow::until_finished(&mut a, &second).await?);
    assert_eq!(
        finished_status(&seen, &first),
        Some(PromptStatus::Completed)
    );
    assert_eq!(
        finished_status(&seen, &second),
        Some(PromptStatus::Completed)
    );
    let restarts = seen
        .iter()
        .filter(|e| {
            matches!(&e.event, Event::SandboxStatus { status: SandboxStatus::Starting, detail }
                if detail.contains("restoring snapshot"))
        })
        .count();
    assert_eq!(restarts, KILLS, "one restored sandbox per crash");

    // What the client saw live is the stored log: contiguous, nothing lost, nothing twice.
    assert_contiguous(&seen);
    let last = seen.last().map_or(0, |e| e.seq);
    let (mut replay, _) = join(&people.bob, &people.session, None).await?;
    let mut stored: Vec<EventEnvelope> = Vec::new();
    while stored.last().map_or(0, |e| e.seq) < last {
        stored.extend(
            replay
                .events_until(|_| true, Duration::from_secs(10))
                .await?,
        );
    }
    stored.truncate(seen.len());
    assert_eq!(stored, seen);
    let state = flow::state(&people.ada, &people.session).await?;
    assert!(state.queue.is_empty());
    assert_eq!(state.sandbox.status, SandboxStatus::Ready);
    Ok(())
}

/// A session whose token ceiling is one token (the scripted model has no price, so its usage counts
/// in tokens): the first `usage` of a prompt stops it mid-way with a notice that says why, the agent
/// snapshots, the session state shows it, and the next prompt waits in the queue.
#[tokio::test]
async fn the_token_ceiling_stops_a_prompt_mid_way_with_a_notice() -> anyhow::Result<()> {
    let system =
        System::start_with(StartOptions::worker_vars([("SESSION_TOKEN_CEILING", "1")])).await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let steps = [
        json!({"tool": "write_file", "input": {"path": "FIRST.md", "content": "one\n"}}),
        json!({"tool": "bash", "input": {"command": "sleep 300"}}),
        json!({"tool": "write_file", "input": {"path": "NEVER.md", "content": "two\n"}}),
    ];
    let mut text = String::from("Three steps\n[script:plan]\n");
    for step in steps {
        text.push_str(&step.to_string());
        text.push('\n');
    }
    let first = flow::prompt(&mut a, &text, &mut seen).await?;
    seen.extend(flow::until_finished(&mut a, &first).await?);
    assert_eq!(finished_status(&seen, &first), Some(PromptStatus::Stopped));
    let notice = seen
        .iter()
        .find_map(|e| match &e.event {
            Event::Notice { level, text } if text.contains("token ceiling") => {
                Some((level.clone(), text.clone()))
            }
            _ => None,
        })
        .expect("a notice says why");
    assert_eq!(notice.0, "warn");
    assert!(!seen
        .iter()
        .any(|e| matches!(&e.event, Event::FileChanged { path, .. } if path == "NEVER.md")));
    let second = flow::prompt(&mut a, "[script:tokens count=3 rate=0]", &mut seen).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = flow::state(&people.ada, &people.session).await?;
    let lifecycle = state.lifecycle.expect("the lifecycle is in the state");
    assert!(lifecycle
        .ceiling_reached
        .is_some_and(|why| why.contains("token ceiling")));
    assert_eq!(lifecycle.token_ceiling, 1);
    assert!(
        state
            .queue
            .iter()
            .any(|p| p.prompt_id == second && p.status == PromptStatus::Queued),
        "the next prompt waits: {:?}",
        state.queue
    );
    Ok(())
}

/// A daily ceiling of one token per person (the scripted model has no price): ada's first prompt is
/// stopped mid-way; in another session the same day her prompt waits in the queue with a notice that
/// says why, while bob's prompt there (queued after hers) is dispatched.
#[tokio::test]
async fn a_person_at_their_daily_ceiling_waits_in_every_session_while_others_go_on(
) -> anyhow::Result<()> {
    let system = System::start_with(StartOptions::worker_vars([(
        "USER_DAILY_TOKEN_CEILING",
        "1",
    )]))
    .await?;
    let first = pair(&system).await?;
    let (mut a, _) = join(&first.ada, &first.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let steps = [
        json!({"tool": "bash", "input": {"command": "sleep 300"}}),
        json!({"tool": "write_file", "input": {"path": "NEVER.md", "content": "two\n"}}),
    ];
    let mut text = String::from("Two steps\n[script:plan]\n");
    for step in steps {
        text.push_str(&step.to_string());
        text.push('\n');
    }
    let stopped = flow::prompt(&mut a, &text, &mut seen).await?;
    seen.extend(flow::until_finished(&mut a, &stopped).await?);
    assert_eq!(
        finished_status(&seen, &stopped),
        Some(PromptStatus::Stopped)
    );
    assert!(seen.iter().any(|e| matches!(&e.event,
        Event::Notice { text, .. } if text.starts_with("ada reached their daily token ceiling"))));

    let second = pair(&system).await?;
    let (mut b, _) = join(&second.bob, &second.session, None).await?;
    let mut seen = until_ready(&mut b).await?;
    let (mut a, _) = join(&second.ada, &second.session, None).await?;
    let waiting = flow::prompt(&mut a, "[script:tokens count=3 rate=0]", &mut Vec::new()).await?;
    let runs = flow::prompt(&mut b, "[script:tokens count=3 rate=0]", &mut seen).await?;
    // Bob's prompt starts (his own first usage may then stop it: his ceiling is one token too).
    seen.extend(
        b.events_until(
            |e| matches!(e, Event::PromptStarted { prompt_id } if *prompt_id == runs),
            Duration::from_secs(60),
        )
        .await?,
    );
    assert!(seen.iter().any(|e| matches!(&e.event,
        Event::Notice { text, .. } if text.starts_with("ada reached their daily token ceiling"))));
    assert!(!seen
        .iter()
        .any(|e| matches!(&e.event, Event::PromptStarted { prompt_id } if *prompt_id == waiting)));
    let state = flow::state(&second.ada, &second.session).await?;
    assert!(
        state
            .queue
            .iter()
            .any(|p| p.prompt_id == waiting && p.status == PromptStatus::Queued),
        "{:?}",
        state.queue
    );
    Ok(())
}

/// A prompt that runs for over a minute with no client connected completes: the object keeps taking
/// the agent's events (and its alarm keeps watching the agent) with nobody watching.
#[tokio::test]
async fn a_long_prompt_with_no_client_connected_completes() -> anyhow::Result<()> {
    let system = System::start().await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let long = flow::prompt(&mut a, "[script:slow ms=65000]", &mut seen).await?;
    a.wait_for_event(
        |e| matches!(e, Event::PromptStarted { prompt_id } if *prompt_id == long),
        Duration::from_secs(60),
    )
    .await?;
    a.close().await?;
    tokio::time::sleep(Duration::from_secs(70)).await;
    let state = flow::state(&people.ada, &people.session).await?;
    assert!(state.queue.is_empty(), "{:?}", state.queue);
    let page: nightshift_protocol::http::EventsPage = people
        .ada
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{}/events?after=0&limit=1000", people.session),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_contiguous(&page.events);
    assert_eq!(
        finished_status(&page.events, &long),
        Some(PromptStatus::Completed)
    );
    Ok(())
}

/// An agent frozen mid-prompt (`SIGSTOP`: its socket stays open, but nothing comes, not even a
/// heartbeat) counts as gone after `AGENT_STALE_MS`: the session closes its socket, deletes its
/// sandbox, restores the newest snapshot into a new one, and the prompt resumes and completes there.
#[tokio::test]
async fn a_frozen_agent_is_replaced_after_its_heartbeat_goes_stale() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("not root: no isolated sandboxes, so no snapshots to restore");
        return Ok(());
    }
    let system =
        System::start_with(StartOptions::worker_vars([("AGENT_STALE_MS", "15000")])).await?;
    build_image(&system).await?;
    let people = pair(&system).await?;
    let (mut a, _) = join(&people.ada, &people.session, None).await?;
    let mut seen = until_ready(&mut a).await?;
    let prompt = flow::prompt(&mut a, "[script:slow ms=4000]", &mut seen).await?;
    let frozen = signal_mid_prompt(
        &mut a,
        &people,
        &prompt,
        libc::SIGSTOP,
        Duration::from_secs(90),
        &mut seen,
    )
    .await?;
    seen.extend(flow::until_finished(&mut a, &prompt).await?);
    assert_eq!(
        finished_status(&seen, &prompt),
        Some(PromptStatus::Completed)
    );
    assert!(seen.iter().any(|e| matches!(&e.event,
        Event::Notice { level, text } if level == "warn" && text.contains("has not been heard from"))));
    assert_contiguous(&seen);
    let state = flow::state(&people.ada, &people.session).await?;
    assert_ne!(state.sandbox.id.as_deref(), Some(frozen.as_str()));
    assert!(
        system
            .host_log()
            .contains(&format!("DELETE /v1/sandboxes/{frozen}")),
        "the frozen sandbox was deleted"
    );
    Ok(())
}

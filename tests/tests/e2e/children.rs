//! Sub-sessions through real workerd and the real host: a scripted prompt spawns two children (each
//! with a scripted prompt of its own), a third is refused by the running-children guardrail, the
//! parent's log follows the children in `child_session` events, participants of the parent see the
//! children (strangers get 404), and `stop{tree}` stops all three.

use std::collections::HashSet;

use anyhow::Context as _;

use nightshift_protocol::{Event, EventEnvelope, PromptStatus, SandboxStatus};
use nightshift_tests::{Client, StartOptions, System};
use serde_json::{json, Value};

use crate::flow::{self, join, pair, until_ready, WAIT};

/// The ids of the children the parent's `spawn_session` calls created, and the refusals.
fn spawn_results(events: &[EventEnvelope]) -> (Vec<String>, Vec<String>) {
    let spawn_calls: HashSet<&str> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ToolCall { call_id, tool, .. } if tool == "spawn_session" => {
                Some(call_id.as_str())
            }
            _ => None,
        })
        .collect();
    let mut spawned = Vec::new();
    let mut refused = Vec::new();
    for e in events {
        if let Event::ToolResult {
            call_id,
            ok,
            output,
            ..
        } = &e.event
        {
            if !spawn_calls.contains(call_id.as_str()) {
                continue;
            }
            if *ok {
                let child: Value = serde_json::from_str(output).expect("the child as json");
                spawned.push(child["id"].as_str().unwrap_or_default().to_owned());
            } else {
                refused.push(output.clone());
            }
        }
    }
    (spawned, refused)
}

fn child_status<'a>(events: &'a [EventEnvelope], id: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ChildSession { id: child, status } if child == id => Some(status.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_prompt_spawns_two_children_and_stop_tree_stops_all_three() -> anyhow::Result<()> {
    let system =
        System::start_with(StartOptions::worker_vars([("CHILD_MAX_RUNNING", "2")])).await?;
    let result = scenario(&system).await;
    if result.is_err() {
        // Where a tree went wrong is in the objects' and the host's logs.
        eprintln!("--- wrangler log ---\n{}", system.wrangler_log());
        eprintln!("--- host log ---\n{}", system.host_log());
    }
    result
}

async fn scenario(system: &System) -> anyhow::Result<()> {
    let people = pair(system).await?;
    let parent = people.session.clone();
    let (mut ws, _) = join(&people.ada, &parent, None).await?;
    let mut seen = until_ready(&mut ws).await?;

    // Each child streams slowly for a minute: still running when the tree is stopped.
    let steps = [
        json!({"tool": "spawn_session", "input": {"prompt": "[script:slow ms=60000]", "title": "child one"}}),
        json!({"tool": "spawn_session", "input": {"prompt": "[script:slow ms=60000]", "title": "child two"}}),
        json!({"tool": "spawn_session", "input": {"prompt": "[script:slow ms=60000]", "title": "one too many"}}),
        json!({"tool": "list_children", "input": {}}),
    ];
    let mut text = String::from("Split the work\n[script:plan]\n");
    for step in steps {
        text.push_str(&step.to_string());
        text.push('\n');
    }
    let prompt = flow::prompt(&mut ws, &text, &mut seen).await?;
    seen.extend(flow::until_finished(&mut ws, &prompt).await?);
    assert_eq!(
        flow::finished_status(&seen, &prompt),
        Some(PromptStatus::Completed)
    );
    let (children, refused) = spawn_results(&seen);
    assert_eq!(children.len(), 2, "two children spawned: {seen:?}");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("child_limit") && refused[0].contains("at most 2 children"),
        "the model sees a typed refusal: {}",
        refused[0]
    );

    // Every child reports that it runs; the parent logs it.
    let mut pending: HashSet<String> = children.iter().cloned().collect();
    pending.retain(|id| !child_status(&seen, id).contains(&"running"));
    while !pending.is_empty() {
        let event = ws
            .wait_for_event(
                |e| matches!(e, Event::ChildSession { id, status } if status == "running" && pending.contains(id)),
                WAIT,
            )
            .await
            .context("the parent logs its children running")?;
        if let Event::ChildSession { id, .. } = &event.event {
            pending.remove(id);
        }
        seen.push(event);
    }
    for id in &children {
        assert_eq!(child_status(&seen, id).first(), Some(&"starting"), "{id}");
    }

    // The children are visible to the parent's participants (bob joined the parent, not the
    // children), they link to the parent, and a stranger gets the 404 of a missing session.
    let mut carol = Client::new(system);
    carol
        .dev_login("carol", "Carol Shaw", "carol@example.com")
        .await?;
    for id in &children {
        let state = flow::state(&people.bob, id).await?;
        assert_eq!(
            state.session.parent_session_id.as_deref(),
            Some(parent.as_str())
        );
        assert_eq!(state.session.created_by.login, "ada");
        let status = carol
            .request(reqwest::Method::GET, &format!("/api/sessions/{id}"))
            .send()
            .await?
            .status();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    }

    // Both children are working on their prompts when the tree is stopped.
    let mut child_sockets = Vec::new();
    for id in &children {
        let (mut child_ws, _) = join(&people.ada, id, None).await?;
        let events = child_ws
            .events_until(|e| matches!(e, Event::PromptStarted { .. }), WAIT)
            .await?;
        let prompt_id = events
            .iter()
            .find_map(|e| match &e.event {
                Event::PromptStarted { prompt_id } => Some(prompt_id.clone()),
                _ => None,
            })
            .expect("the child's prompt started");
        child_sockets.push((id.clone(), child_ws, prompt_id));
    }
    people
        .ada
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{parent}/stop"),
        )
        .json(&json!({"scope": "tree"}))
        .send()
        .await?
        .error_for_status()?;

    // Each child: its running prompt is stopped and its sandbox released.
    for (id, mut child_ws, prompt_id) in child_sockets {
        let events = child_ws
            .events_until(
                |e| {
                    matches!(
                        e,
                        Event::SandboxStatus {
                            status: SandboxStatus::Stopped,
                            ..
                        }
                    )
                },
                WAIT,
            )
            .await
            .with_context(|| format!("child {id} stops"))?;
        assert_eq!(
            flow::finished_status(&events, &prompt_id),
            Some(PromptStatus::Stopped),
            "{id}: {events:?}"
        );
    }
    // The parent: released too, and its log shows both children stopped.
    let mut stopped_children: HashSet<String> = HashSet::new();
    let mut parent_stopped = false;
    while stopped_children.len() < children.len() || !parent_stopped {
        let event = ws
            .wait_for_event(
                |e| {
                    matches!(
                        e,
                        Event::ChildSession { status, .. } if status == "stopped"
                    ) || matches!(
                        e,
                        Event::SandboxStatus {
                            status: SandboxStatus::Stopped,
                            ..
                        }
                    )
                },
                WAIT,
            )
            .await
            .context("the parent stops and logs its children stopped")?;
        match &event.event {
            Event::ChildSession { id, .. } => {
                stopped_children.insert(id.clone());
            }
            _ => parent_stopped = true,
        }
    }
    assert_eq!(stopped_children, children.iter().cloned().collect());
    Ok(())
}

//! `tool_read_30k` and `tool_grep_30k`: the round trip of a `read_file` and a `grep` tool call on a
//! ~30k-file repository, as a client sees it: from the `tool_call` event to its `tool_result`.
//! The scripted model plays a plan of calls; each call's time is measured at the client, so it covers
//! the tool itself plus the agent's event path (the model's own time is not in it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nightshift_protocol::{Event, ServerMessage};
use serde_json::json;

use crate::latency::{ms, Latency};
use crate::report::{Goal, Row};
use crate::session;
use nightshift_tests::System;

/// The large repository, seeded with this many generated files next to the demo project.
pub const LARGE_REPO: &str = "bench/large";
/// Generated files in it.
pub const LARGE_REPO_FILES: usize = 30_000;
/// Calls of each tool measured.
const CALLS: usize = 30;
/// Calls of each tool made first and not measured (page cache, first walk).
const WARM_UP_CALLS: usize = 3;
/// A prompt of this many calls may take a while on a cold 2-core machine.
const FINISH_WAIT: Duration = Duration::from_secs(300);

pub async fn run(system: &System) -> anyhow::Result<Vec<Row>> {
    let seeded = Instant::now();
    system
        .seed_with(LARGE_REPO, LARGE_REPO_FILES)
        .await
        .context("seeding the large repository")?;
    eprintln!(
        "bench:   seeded {LARGE_REPO} ({LARGE_REPO_FILES} files) in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let ada = session::person(system, "tool-ada").await?;
    let session_id = ada.create_session(LARGE_REPO).await?;
    let mut ws = session::join(&ada, &session_id).await?;
    session::until_ready(&mut ws).await?;

    // Spread over the repository; different files each call so no call is served by the previous one.
    let stride = LARGE_REPO_FILES / (CALLS + WARM_UP_CALLS);
    let mut plan = String::from("[script:plan]\n");
    for call in 0..CALLS + WARM_UP_CALLS {
        let i = call * stride + 7;
        let dir = i / 100;
        // One model step with both calls: the agent allows 50 model calls per prompt.
        let step = json!([
            {"tool": "read_file", "input": {"path": format!("generated/d{dir}/item_{i}.rs")}},
            {"tool": "grep", "input": {"pattern": format!("fn item_{i}\\("), "max_results": 20}},
        ]);
        plan.push_str(&step.to_string());
        plan.push('\n');
    }
    let prompt_id = session::post_prompt(&ada, &session_id, &plan).await?;

    let mut started: HashMap<String, (String, Instant)> = HashMap::new();
    let mut samples: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut failures = Vec::new();
    let deadline = Instant::now() + FINISH_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the tool plan did not finish within {FINISH_WAIT:?}");
        }
        let ServerMessage::Event(envelope) = ws.next_message(left).await? else {
            continue;
        };
        let now = Instant::now();
        match envelope.event {
            Event::ToolCall {
                call_id,
                tool,
                prompt_id: p,
                ..
            } if p == prompt_id => {
                started.insert(call_id, (tool, now));
            }
            Event::ToolResult {
                call_id,
                ok,
                output,
                ..
            } => {
                if let Some((tool, at)) = started.remove(&call_id) {
                    if !ok {
                        failures.push(format!("{tool}: {output}"));
                    }
                    let key = if tool == "read_file" {
                        "read_file"
                    } else {
                        "grep"
                    };
                    samples.entry(key).or_default().push(ms(now - at));
                }
            }
            Event::PromptFinished {
                prompt_id: p,
                status,
                error,
            } if p == prompt_id => {
                if !failures.is_empty() {
                    bail!("tool calls failed: {failures:?}");
                }
                if status != nightshift_protocol::PromptStatus::Completed {
                    bail!("the tool plan ended {status:?}: {error:?}");
                }
                break;
            }
            _ => {}
        }
    }
    let row = |id: &'static str, tool: &'static str, what: &str| -> Row {
        let mut latency = Latency::default();
        for sample in samples.get(tool).into_iter().flatten().skip(WARM_UP_CALLS) {
            latency.push(*sample);
        }
        let mut extra = serde_json::Map::new();
        extra.insert("calls".into(), latency.count().into());
        extra.insert("repo_files".into(), (LARGE_REPO_FILES + 9).into());
        Row::latency_ms(id, what, &latency, Goal::Report, extra)
    };
    Ok(vec![
        row(
            "tool_read_30k",
            "read_file",
            "`read_file` of a ~1 KB file in a ~30k-file repository: tool_call -> tool_result at a client",
        ),
        row(
            "tool_grep_30k",
            "grep",
            "`grep` for one definition across a ~30k-file repository (gitignore-aware): tool_call -> tool_result at a client",
        ),
    ])
}

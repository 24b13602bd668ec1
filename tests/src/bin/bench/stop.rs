//! `stop_to_stopped`: a participant stops a prompt whose command is running → `prompt_finished{stopped}`
//! reaches their client (the model stream is cancelled and the command's process group killed on the way).

use std::time::{Duration, Instant};

use anyhow::bail;
use nightshift_protocol::{ClientMessage, Event, PromptStatus, StopScope};
use nightshift_tests::{System, DEMO_REPO};
use serde_json::json;

use crate::latency::{ms, Latency};
use crate::report::{Goal, Row};
use crate::session;

const STOPS: usize = 10;
const TARGET_P50_MS: f64 = 1000.0;

pub async fn run(system: &System) -> anyhow::Result<Row> {
    let ada = session::person(system, "stop-ada").await?;
    let session_id = ada.create_session(DEMO_REPO).await?;
    let mut ws = session::join(&ada, &session_id).await?;
    session::until_ready(&mut ws).await?;

    let command =
        json!({"tool": "bash", "input": {"command": "echo running; sleep 600 & sleep 600; wait"}});
    let mut latency = Latency::default();
    for _ in 0..STOPS {
        let prompt_id =
            session::post_prompt(&ada, &session_id, &format!("[script:plan]\n{command}\n")).await?;
        ws.wait_for_event(
            |e| matches!(e, Event::ToolOutput { text, .. } if text.contains("running")),
            session::WAIT,
        )
        .await?;
        let sent = Instant::now();
        ws.send(&ClientMessage::Stop {
            scope: StopScope::Turn,
        })
        .await?;
        let finished = ws
            .wait_for_event(
                |e| matches!(e, Event::PromptFinished { prompt_id: p, .. } if *p == prompt_id),
                session::WAIT,
            )
            .await?;
        latency.push(ms(sent.elapsed()));
        match finished.event {
            Event::PromptFinished {
                status: PromptStatus::Stopped,
                ..
            } => {}
            other => bail!("a stopped prompt ended as {other:?}"),
        }
        // Let the object settle before the next one.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut extra = serde_json::Map::new();
    extra.insert("stops".into(), latency.count().into());
    Ok(Row::latency_ms(
        "stop_to_stopped",
        "stop{turn} sent while a bash command runs -> prompt_finished{stopped} at the same client (model stream cancelled, process group killed)",
        &latency,
        Goal::MaxP50Ms(TARGET_P50_MS),
        extra,
    ))
}

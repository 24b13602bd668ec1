//! `prompt_to_started`: A sends a prompt; B receives `prompt_started` (scripted model, real agent).
//! One prompt at a time: the next is sent once both have seen the previous one finish.

use std::time::Instant;

use anyhow::{bail, Context};
use nightshift_protocol::{Event, PromptStatus};
use nightshift_tests::{System, DEMO_REPO};

use crate::latency::{ms, Latency};
use crate::report::{Goal, Row};
use crate::session::{self, WAIT};

/// The smallest scripted turn: one token, unpaced.
const PROMPT: &str = "[script:tokens count=1 rate=0]";
const WARM_UP_PROMPTS: usize = 3;
const MEASURED_PROMPTS: usize = 30;
/// The target: p50 at most this.
const TARGET_P50_MS: f64 = 10.0;

pub async fn run(system: &System) -> anyhow::Result<Row> {
    let ada = session::person(system, "start-ada").await?;
    let bob = session::person(system, "start-bob").await?;
    let session = ada.create_session(DEMO_REPO).await?;
    session::invite(&ada, &session, &bob).await?;
    let mut a = session::join(&ada, &session).await?;
    session::until_ready(&mut a).await?;
    let mut b = session::join(&bob, &session).await?;

    let mut latency = Latency::default();
    for n in 0..WARM_UP_PROMPTS + MEASURED_PROMPTS {
        let sent = Instant::now();
        a.send(&session::prompt(PROMPT)).await?;
        let started = b
            .wait_for_event(|e| matches!(e, Event::PromptStarted { .. }), WAIT)
            .await
            .context("B waiting for prompt_started")?;
        let started_ms = ms(sent.elapsed());
        let Event::PromptStarted { prompt_id } = started.event else {
            unreachable!("matched above")
        };
        let is_finished =
            |e: &Event| matches!(e, Event::PromptFinished { prompt_id: p, .. } if *p == prompt_id);
        let finished = b
            .wait_for_event(is_finished, WAIT)
            .await
            .context("B waiting for prompt_finished")?;
        if let Event::PromptFinished { status, error, .. } = finished.event {
            if status != PromptStatus::Completed {
                bail!(
                    "prompt {prompt_id} finished {status:?}: {}",
                    error.unwrap_or_default()
                );
            }
        }
        a.wait_for_event(is_finished, WAIT)
            .await
            .context("A waiting for prompt_finished")?;
        if n >= WARM_UP_PROMPTS {
            latency.push(started_ms);
        }
    }

    let mut extra = serde_json::Map::new();
    extra.insert("samples".into(), latency.count().into());
    Ok(Row::latency_ms(
        "prompt_to_started",
        format!("prompt sent by A -> prompt_started at B, scripted model `{PROMPT}`, one prompt at a time"),
        &latency,
        Goal::MaxP50Ms(TARGET_P50_MS),
        extra,
    ))
}

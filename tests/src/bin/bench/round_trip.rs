//! `ws_rtt`: client → SessionObject → other client. Two people on a session whose sandbox never
//! becomes ready (its repository is not in the host's store), so prompts stay queued: A sends
//! `prompt`, B receives `prompt_queued`; A sends `cancel_prompt`, B receives `prompt_cancelled`.
//! Each is one sample.

use std::time::Instant;

use anyhow::{bail, Context};
use nightshift_protocol::{ClientMessage, Event, SandboxStatus};
use nightshift_tests::System;

use crate::latency::{ms, Latency};
use crate::report::{Goal, Row};
use crate::session::{self, WAIT};

/// A repository the host's store does not have.
const MISSING_REPO: &str = "demo/missing";
/// Prompt/cancel pairs before measuring (two samples each).
const WARM_UP_PAIRS: usize = 10;
/// Prompt/cancel pairs measured (two samples each).
const MEASURED_PAIRS: usize = 100;

pub async fn run(system: &System) -> anyhow::Result<Row> {
    let ada = session::person(system, "rtt-ada").await?;
    let bob = session::person(system, "rtt-bob").await?;
    let session = ada
        .create_session(MISSING_REPO)
        .await
        .context("creating a session on a missing repo")?;
    session::invite(&ada, &session, &bob).await?;
    let mut a = session::join(&ada, &session).await?;
    let mut b = session::join(&bob, &session).await?;
    match session::sandbox_outcome(&mut a).await? {
        (SandboxStatus::Failed, _) => {}
        (status, detail) => {
            bail!("a session on {MISSING_REPO} got sandbox {status:?} ({detail}), expected failed")
        }
    }

    let mut latency = Latency::default();
    for pair in 0..WARM_UP_PAIRS + MEASURED_PAIRS {
        let sent = Instant::now();
        a.send(&session::prompt("bench round trip")).await?;
        let queued = b
            .wait_for_event(|e| matches!(e, Event::PromptQueued { .. }), WAIT)
            .await
            .context("B waiting for prompt_queued")?;
        let queued_ms = ms(sent.elapsed());
        let Event::PromptQueued { prompt_id, .. } = queued.event else {
            unreachable!("matched above")
        };

        let sent = Instant::now();
        a.send(&ClientMessage::CancelPrompt {
            prompt_id: prompt_id.clone(),
        })
        .await?;
        b.wait_for_event(
            |e| matches!(e, Event::PromptCancelled { prompt_id: p, .. } if *p == prompt_id),
            WAIT,
        )
        .await
        .with_context(|| format!("B waiting for prompt_cancelled of {prompt_id}"))?;
        let cancelled_ms = ms(sent.elapsed());
        // A sees the same events; read them so its socket never backs up.
        a.wait_for_event(
            |e| matches!(e, Event::PromptCancelled { prompt_id: p, .. } if *p == prompt_id),
            WAIT,
        )
        .await
        .with_context(|| format!("A waiting for prompt_cancelled of {prompt_id}"))?;
        if pair >= WARM_UP_PAIRS {
            latency.extend([queued_ms, cancelled_ms]);
        }
    }

    let mut extra = serde_json::Map::new();
    extra.insert("samples".into(), latency.count().into());
    Ok(Row::latency_ms(
        "ws_rtt",
        "client A -> SessionObject -> client B: prompt -> prompt_queued and cancel_prompt -> \
         prompt_cancelled, two identities, sandbox failed so prompts stay queued",
        &latency,
        Goal::Report,
        extra,
    ))
}

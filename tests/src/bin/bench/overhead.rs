//! `agent_token_overhead`: the model stub emits a token → the one client of a session receives it
//! (agent, agent socket, SessionObject write and broadcast, client socket), paced so nothing queues.

use std::time::Duration;

use nightshift_tests::{System, DEMO_REPO};

use crate::report::{Goal, Row};
use crate::session;
use crate::stream::{Audience, Delivery};

const TOKENS: usize = 400;
const RATE_PER_S: usize = 200;
const TARGET_P50_MS: f64 = 2.0;
const FINISH_SLACK: Duration = Duration::from_secs(60);

pub async fn run(system: &System) -> anyhow::Result<Row> {
    let ada = session::person(system, "overhead-ada").await?;
    let session = ada.create_session(DEMO_REPO).await?;
    let mut ws = session::join(&ada, &session).await?;
    session::until_ready(&mut ws).await?;
    let mut audience = Audience::new();
    audience.add(ws);

    let warm_up =
        session::post_prompt(&ada, &session, "[script:tokens count=20 rate=0 stamp=1]").await?;
    audience.until_finished(&warm_up, FINISH_SLACK).await?;
    let text = format!("[script:tokens count={TOKENS} rate={RATE_PER_S} stamp=1]");
    let prompt_id = session::post_prompt(&ada, &session, &text).await?;
    let duration = Duration::from_secs_f64(TOKENS as f64 / RATE_PER_S as f64);
    let finished = audience
        .until_finished(&prompt_id, duration + FINISH_SLACK)
        .await?;
    let received = audience.finish().await?;

    let delivery = Delivery::of(&prompt_id, TOKENS, &received);
    let mut extra = delivery.fields();
    extra.insert(
        "clients_without_finish".into(),
        (1 - finished.min(1)).into(),
    );
    let mut row = Row::latency_ms(
        "agent_token_overhead",
        format!("model stub emits a token -> the session's only client receives it, `{text}`"),
        &delivery.latency,
        Goal::MaxP50Ms(TARGET_P50_MS),
        extra,
    );
    // Fast is not enough: every token arrives, in order, and the prompt finishes.
    row.ok = row.ok.map(|ok| ok && delivery.is_intact() && finished == 1);
    Ok(row)
}

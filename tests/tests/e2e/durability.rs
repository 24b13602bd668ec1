//! The log survives a wrangler restart and an evicted object; sessions keep working after both.

use std::time::Duration;

use nightshift_protocol::PromptStatus;
use nightshift_tests::System;

use crate::flow::{self, assert_contiguous, finished_status, join, until_finished, until_ready};

#[tokio::test]
async fn the_log_is_intact_after_a_wrangler_restart_and_the_session_continues() -> anyhow::Result<()>
{
    let mut system = System::start().await?;
    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada.create_session(nightshift_tests::DEMO_REPO).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut before = until_ready(&mut a).await?;
    let first = flow::prompt(&mut a, "[script:tokens count=20 rate=0]", &mut before).await?;
    before.extend(until_finished(&mut a, &first).await?);
    drop(a);

    system.restart_wrangler().await?;

    let (mut a, last_seq) = join(&ada, &session, None).await?;
    assert!(last_seq >= before.last().map_or(0, |e| e.seq));
    let mut replay = Vec::new();
    let prompt = flow::prompt(&mut a, "[script:tokens count=5 rate=0]", &mut replay).await?;
    replay.extend(until_finished(&mut a, &prompt).await?);
    assert_eq!(
        &replay[..before.len()],
        before.as_slice(),
        "the log replays unchanged after the restart"
    );
    assert_contiguous(&replay);
    assert_eq!(
        finished_status(&replay, &prompt),
        Some(PromptStatus::Completed),
        "the agent reconnected and worked"
    );
    Ok(())
}

#[tokio::test]
async fn an_evicted_object_takes_the_next_prompt() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada.create_session(nightshift_tests::DEMO_REPO).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    until_ready(&mut a).await?;
    drop(a);

    // Nothing touches the object for longer than workerd's idle eviction (~10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;

    let accepted: nightshift_protocol::http::PromptResponse = ada
        .request(reqwest::Method::POST, &format!("/api/sessions/{session}/prompts"))
        .json(&serde_json::json!({"text": "[script:tokens count=3 rate=0]", "idempotency_key": "after-eviction"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let events = until_finished(&mut a, &accepted.prompt_id).await?;
    assert_eq!(
        finished_status(&events, &accepted.prompt_id),
        Some(PromptStatus::Completed)
    );
    Ok(())
}

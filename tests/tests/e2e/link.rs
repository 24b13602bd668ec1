//! The agent↔object link loses nothing: cut it again and again during one prompt, and clients still see
//! every event exactly once, in order.

use std::time::Duration;

use nightshift_protocol::{Event, PromptStatus};
use nightshift_tests::{CutProxy, StartOptions, System};

use crate::flow::{self, assert_contiguous, finished_status, join, until_finished, until_ready};

/// Tokens the model streams during the prompt.
const TOKENS: usize = 1500;
/// Links cut while it runs.
const CUTS: u64 = 10;

#[tokio::test]
async fn ten_link_cuts_during_one_prompt_lose_and_repeat_nothing() -> anyhow::Result<()> {
    let proxy = CutProxy::bind().await?;
    let system =
        System::start_with(StartOptions::worker_vars([("PUBLIC_URL", proxy.url())])).await?;
    proxy.set_target(system.worker_addr());

    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada.create_session(nightshift_tests::DEMO_REPO).await?;
    let (mut ws, _) = join(&ada, &session, None).await?;
    let mut seen = until_ready(&mut ws).await?;
    let connections_before = proxy.accepted();

    // ~10 s of tokens; cut the link, wait for the agent to dial in again, stream a little, cut again.
    let text = format!("[script:tokens count={TOKENS} rate=150]");
    let prompt_id = flow::prompt(&mut ws, &text, &mut seen).await?;
    let cutter = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..CUTS {
            let before = proxy.accepted();
            proxy.cut();
            while proxy.accepted() == before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (events, ()) = tokio::join!(until_finished(&mut ws, &prompt_id), cutter);
    seen.extend(events?);

    assert!(
        proxy.accepted() >= connections_before + CUTS,
        "the agent reconnected after every cut ({} connections, {} before)",
        proxy.accepted(),
        connections_before
    );
    assert_contiguous(&seen);
    assert_eq!(
        finished_status(&seen, &prompt_id),
        Some(PromptStatus::Completed)
    );
    let tokens: Vec<&str> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::Token { prompt_id: p, text } if *p == prompt_id => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..TOKENS).map(|i| format!("tok{i} ")).collect();
    assert_eq!(tokens, expected, "every token exactly once, in order");
    for kind in ["prompt_started", "message", "usage", "prompt_finished"] {
        let count = seen
            .iter()
            .filter(|e| {
                e.event.kind() == kind && event_prompt(&e.event) == Some(prompt_id.as_str())
            })
            .count();
        assert_eq!(count, 1, "exactly one `{kind}`");
    }
    Ok(())
}

fn event_prompt(event: &Event) -> Option<&str> {
    match event {
        Event::PromptStarted { prompt_id }
        | Event::PromptFinished { prompt_id, .. }
        | Event::Message { prompt_id, .. }
        | Event::Token { prompt_id, .. } => Some(prompt_id),
        Event::Usage { prompt_id, .. } => prompt_id.as_deref(),
        _ => None,
    }
}

//! Many clients: bursts leave as batched `events` frames, and everyone still sees every event once, in order —
//! including a client that joins in the middle of a burst.

use nightshift_protocol::{Event, EventEnvelope};
use nightshift_tests::{System, DEMO_REPO};

use crate::flow::{self, assert_contiguous, join, until_finished, until_ready};

/// Enough greeted clients that the session batches its frames.
const CLIENTS: usize = 20;

#[tokio::test]
async fn a_burst_to_many_clients_arrives_complete_and_in_order_even_for_a_late_joiner(
) -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut ada = nightshift_tests::Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let session = ada.create_session(DEMO_REPO).await?;
    let (mut first, _) = join(&ada, &session, None).await?;
    let mut first_events = until_ready(&mut first).await?;
    let mut others = Vec::new();
    for _ in 1..CLIENTS {
        others.push(join(&ada, &session, None).await?.0);
    }

    let prompt = flow::prompt(
        &mut first,
        "[script:tokens count=400 rate=400]",
        &mut first_events,
    )
    .await?;
    // Latecomers say hello while the stream is being sent, each at a different point of it.
    let mut latecomers = Vec::new();
    let mut seen_tokens = 0;
    for join_at in [20, 60, 120, 200, 300] {
        first_events.extend(
            first
                .events_until(
                    |e| {
                        seen_tokens += usize::from(matches!(e, Event::Token { .. }));
                        seen_tokens == join_at
                    },
                    flow::WAIT,
                )
                .await?,
        );
        latecomers.push(join(&ada, &session, None).await?.0);
    }
    first_events.extend(until_finished(&mut first, &prompt).await?);
    assert_contiguous(&first_events);
    assert_eq!(
        first_events
            .iter()
            .filter(|e| matches!(e.event, Event::Token { .. }))
            .count(),
        400
    );

    for (i, late) in latecomers.iter_mut().enumerate() {
        let late_events = until_finished(late, &prompt).await?;
        assert_eq!(
            late_events, first_events,
            "latecomer {i}: replay and live stream overlap or leave a gap"
        );
    }
    for (i, ws) in others.iter_mut().enumerate() {
        let events: Vec<EventEnvelope> = until_finished(ws, &prompt).await?;
        assert_eq!(events, first_events, "client {i} saw a different stream");
    }
    Ok(())
}

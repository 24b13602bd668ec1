//! Two people watch one session live; one drops and catches up from its last `seq`.

use nightshift_protocol::{Event, FileChange, PromptStatus};
use nightshift_tests::System;

use crate::flow::{
    self, assert_contiguous, finished_status, join, pair, until_finished, until_ready,
};

#[tokio::test]
async fn two_people_see_the_same_prompt_live_and_the_edit_lands_in_the_working_copy(
) -> anyhow::Result<()> {
    let system = System::start().await?;
    let flow::Pair { ada, bob, session } = pair(&system).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut a_events = until_ready(&mut a).await?;
    let (mut b, _) = join(&bob, &session, None).await?;

    let prompt_id = flow::prompt(
        &mut a,
        "[script:write path=notes/hello.txt content=written for ada]",
        &mut a_events,
    )
    .await?;
    a_events.extend(until_finished(&mut a, &prompt_id).await?);
    let b_events = until_finished(&mut b, &prompt_id).await?;

    assert_contiguous(&a_events);
    assert_eq!(
        a_events.first().map(|e| e.seq),
        Some(1),
        "a client without last_seq replays from the start"
    );
    assert_eq!(
        a_events, b_events,
        "both clients see the same events in the same order"
    );
    assert_eq!(
        finished_status(&a_events, &prompt_id),
        Some(PromptStatus::Completed)
    );

    let kinds: Vec<&str> = a_events.iter().map(|e| e.event.kind()).collect();
    for kind in [
        "prompt_queued",
        "prompt_started",
        "token",
        "tool_call",
        "tool_result",
        "file_changed",
        "usage",
        "prompt_finished",
    ] {
        assert!(kinds.contains(&kind), "missing {kind} in {kinds:?}");
    }
    let author = a_events.iter().find_map(|e| match &e.event {
        Event::PromptQueued { author, .. } => Some(author.clone()),
        _ => None,
    });
    assert_eq!(
        author.map(|a| (a.login, a.email)),
        Some(("ada".to_owned(), "ada@example.com".to_owned()))
    );
    assert!(a_events.iter().any(|e| matches!(&e.event,
        Event::FileChanged { path, change: FileChange::Added, additions: 1, .. } if path == "notes/hello.txt")));

    let sandbox_id = flow::state(&ada, &session)
        .await?
        .sandbox
        .id
        .expect("the sandbox has an id");
    let written = system
        .host_data_dir()
        .join("sandboxes")
        .join(&sandbox_id)
        .join("workspace/notes/hello.txt");
    assert_eq!(
        std::fs::read_to_string(&written)?.trim_end(),
        "written for ada"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_that_drops_mid_stream_gets_exactly_the_missing_events() -> anyhow::Result<()> {
    let system = System::start().await?;
    let flow::Pair { ada, bob, session } = pair(&system).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut a_events = until_ready(&mut a).await?;
    let (mut b, _) = join(&bob, &session, None).await?;

    let prompt_id =
        flow::prompt(&mut a, "[script:tokens count=300 rate=150]", &mut a_events).await?;
    // Bob reads a few tokens, then his connection drops.
    let mut tokens_seen = 0;
    let b_before = b
        .events_until(
            |e| {
                if matches!(e, Event::Token { .. }) {
                    tokens_seen += 1;
                }
                tokens_seen == 20
            },
            flow::WAIT,
        )
        .await?;
    let last_seq = b_before.last().map(|e| e.seq).expect("bob saw events");
    drop(b);

    a_events.extend(until_finished(&mut a, &prompt_id).await?);
    let (mut b, _) = join(&bob, &session, Some(last_seq)).await?;
    let b_after = until_finished(&mut b, &prompt_id).await?;

    let expected: Vec<_> = a_events
        .iter()
        .filter(|e| e.seq > last_seq)
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        b_after, expected,
        "the replay after last_seq is exactly what was missed"
    );
    // The welcome, presence, and the replay of ~280 events in one `events` frame (one frame per event
    // before); the live end of the prompt may add a frame or two.
    assert!(
        b.text_frames() <= 6,
        "the replay of {} events came in {} frames",
        b_after.len(),
        b.text_frames()
    );
    assert_contiguous(&a_events);
    let tokens = a_events
        .iter()
        .filter(|e| matches!(e.event, Event::Token { .. }))
        .count();
    assert_eq!(tokens, 300, "every streamed token is logged once");
    Ok(())
}

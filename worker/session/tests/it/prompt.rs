//! Prompt queue: order, idempotency, limits, cancel and stop.

use insta::assert_debug_snapshot;
use nightshift_protocol::{Event, PromptStatus, StopScope};
use nightshift_session::{Session, SessionError, Store, MAX_UNFINISHED_PROMPTS};

use crate::{author, created, ready, render, status};

#[test]
fn prompts_queue_in_order_and_run_one_at_a_time() {
    let mut store = created();
    let mut lines = Vec::new();
    for (i, who) in ["ada", "bob", "ada"].iter().enumerate() {
        let (submitted, effects) = Session::new(&mut store, 1_100 + i as u64)
            .submit_prompt(&author(who), &format!("task {i}"), &format!("k{i}"), false)
            .unwrap();
        assert_eq!(submitted.position, i as u32);
        lines.extend(render(&effects));
    }
    // The agent connects: the sandbox becomes ready and the oldest prompt is dispatched.
    lines.extend(render(
        &Session::new(&mut store, 2_000).agent_connected().unwrap(),
    ));
    assert_eq!(status(&mut store, "p1"), PromptStatus::Running);
    assert_eq!(status(&mut store, "p2"), PromptStatus::Queued);
    // p1 finishes: p2 is dispatched, p3 still waits.
    lines.extend(render(
        &Session::new(&mut store, 3_000)
            .apply_agent_event(
                1,
                Event::PromptStarted {
                    prompt_id: "p1".to_owned(),
                },
            )
            .unwrap(),
    ));
    lines.extend(render(
        &Session::new(&mut store, 3_500)
            .apply_agent_event(
                2,
                Event::PromptFinished {
                    prompt_id: "p1".to_owned(),
                    status: PromptStatus::Completed,
                    error: None,
                },
            )
            .unwrap(),
    ));
    assert_eq!(status(&mut store, "p1"), PromptStatus::Completed);
    assert_eq!(status(&mut store, "p2"), PromptStatus::Running);
    assert_eq!(status(&mut store, "p3"), PromptStatus::Queued);
    assert_debug_snapshot!(lines);
}

#[test]
fn same_idempotency_key_returns_the_original() {
    let mut store = ready();
    let (first, effects) = Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "hi", "key", true)
        .unwrap();
    assert_eq!(effects.events.len(), 1);
    let (again, effects) = Session::new(&mut store, 3_001)
        .submit_prompt(&author("ada"), "hi", "key", true)
        .unwrap();
    assert_eq!(again.prompt_id, first.prompt_id);
    assert!(again.duplicate);
    assert!(effects.events.is_empty() && effects.to_agent.is_empty());
    // The same key from another person is another prompt.
    let (other, _) = Session::new(&mut store, 3_002)
        .submit_prompt(&author("bob"), "hi", "key", true)
        .unwrap();
    assert_ne!(other.prompt_id, first.prompt_id);
    assert_eq!(other.position, 1);
}

#[test]
fn the_eleventh_unfinished_prompt_is_refused() {
    let mut store = created();
    for i in 0..MAX_UNFINISHED_PROMPTS {
        Session::new(&mut store, 1_000)
            .submit_prompt(&author("ada"), "x", &format!("k{i}"), false)
            .unwrap();
    }
    let last_seq = store.last_seq().unwrap();
    let err = Session::new(&mut store, 1_000)
        .submit_prompt(&author("ada"), "x", "k-last", false)
        .unwrap_err();
    assert_eq!(
        err,
        SessionError::QueueFull {
            limit: MAX_UNFINISHED_PROMPTS
        }
    );
    assert_eq!(
        store.last_seq().unwrap(),
        last_seq,
        "a refused prompt logs nothing"
    );
}

#[test]
fn empty_or_oversized_prompts_are_refused() {
    let mut store = ready();
    let mut session = Session::new(&mut store, 3_000);
    assert!(matches!(
        session.submit_prompt(&author("ada"), "  ", "k", true),
        Err(SessionError::Invalid(_))
    ));
    let huge = "x".repeat(nightshift_protocol::MAX_PROMPT_BYTES + 1);
    assert!(matches!(
        session.submit_prompt(&author("ada"), &huge, "k", true),
        Err(SessionError::Invalid(_))
    ));
    assert!(matches!(
        session.submit_prompt(&author("ada"), "ok", "", true),
        Err(SessionError::Invalid(_))
    ));
}

#[test]
fn cancel_removes_a_queued_prompt_but_not_a_running_one() {
    let mut store = ready();
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "one", "k1", true)
        .unwrap();
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "two", "k2", true)
        .unwrap();
    let effects = Session::new(&mut store, 3_100)
        .cancel_prompt(&author("bob"), "p2")
        .unwrap();
    assert_eq!(
        effects.events[0].event,
        Event::PromptCancelled {
            prompt_id: "p2".to_owned(),
            by: Some("bob".to_owned())
        }
    );
    assert_eq!(status(&mut store, "p2"), PromptStatus::Cancelled);
    let err = Session::new(&mut store, 3_200)
        .cancel_prompt(&author("bob"), "p1")
        .unwrap_err();
    assert!(matches!(err, SessionError::Conflict(_)));
    let err = Session::new(&mut store, 3_200)
        .cancel_prompt(&author("bob"), "p9")
        .unwrap_err();
    assert_eq!(err, SessionError::UnknownPrompt("p9".to_owned()));
}

#[test]
fn stop_scopes() {
    let mut store = ready();
    for i in 0..3 {
        Session::new(&mut store, 3_000)
            .submit_prompt(&author("ada"), "x", &format!("k{i}"), true)
            .unwrap();
    }
    let turn = Session::new(&mut store, 3_100)
        .stop(&author("ada"), StopScope::Turn)
        .unwrap();
    assert!(turn.events.is_empty(), "a turn stop leaves the queue alone");
    let session = Session::new(&mut store, 3_200)
        .stop(&author("ada"), StopScope::Session)
        .unwrap();
    assert_debug_snapshot!(render(&session));
    assert_eq!(status(&mut store, "p2"), PromptStatus::Cancelled);
    assert_eq!(status(&mut store, "p3"), PromptStatus::Cancelled);
}

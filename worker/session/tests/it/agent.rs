//! Agent link: exactly-once application of producer_seq, replay, usage totals.

use insta::assert_debug_snapshot;
use nightshift_protocol::provider::SandboxEnded;
use nightshift_protocol::{Event, SandboxStatus, ServerToAgent};
use nightshift_session::{Session, Store};

use crate::{author, created, ready, render};

fn token(text: &str) -> Event {
    Event::Token {
        prompt_id: "p1".to_owned(),
        text: text.to_owned(),
    }
}

#[test]
fn duplicate_producer_seq_is_acknowledged_and_ignored() {
    let mut store = ready();
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "go", "k", true)
        .unwrap();
    let first = Session::new(&mut store, 3_001)
        .apply_agent_event(1, token("a"))
        .unwrap();
    assert_eq!(first.events.len(), 1);
    let last_seq = store.last_seq().unwrap();
    let again = Session::new(&mut store, 3_002)
        .apply_agent_event(1, token("a"))
        .unwrap();
    assert!(again.events.is_empty());
    assert_eq!(again.to_agent, vec![ServerToAgent::Ack { producer_seq: 1 }]);
    assert_eq!(store.last_seq().unwrap(), last_seq);
    // A gap is not applied: the ack names the highest applied seq so the agent re-sends from there.
    let gap = Session::new(&mut store, 3_003)
        .apply_agent_event(3, token("c"))
        .unwrap();
    assert!(gap.events.is_empty());
    assert_eq!(gap.to_agent, vec![ServerToAgent::Ack { producer_seq: 1 }]);
    let next = Session::new(&mut store, 3_004)
        .apply_agent_event(2, token("b"))
        .unwrap();
    assert_eq!(next.events.len(), 1);
}

#[test]
fn replay_after_n_returns_exactly_the_rest() {
    let mut store = ready();
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "go", "k", true)
        .unwrap();
    for (i, text) in ["a", "b", "c", "d"].iter().enumerate() {
        Session::new(&mut store, 3_100 + i as u64)
            .apply_agent_event(i as u64 + 1, token(text))
            .unwrap();
    }
    let session = Session::new(&mut store, 4_000);
    let all = session.replay(0, 1_000).unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "seq is contiguous from 1"
    );
    let after = session.replay(3, 1_000).unwrap();
    assert_eq!(after.as_slice(), &all[3..]);
    assert_eq!(session.replay(3, 2).unwrap().as_slice(), &all[3..5]);
    assert!(session.replay(all.len() as u64, 10).unwrap().is_empty());
    assert_debug_snapshot!(all
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect::<Vec<_>>());
}

#[test]
fn agent_connect_marks_ready_once_and_resends_the_running_prompt() {
    let mut store = created();
    Session::new(&mut store, 1_500)
        .submit_prompt(&author("ada"), "go", "k", false)
        .unwrap();
    let first = Session::new(&mut store, 2_000).agent_connected().unwrap();
    let again = Session::new(&mut store, 2_500).agent_connected().unwrap();
    assert_debug_snapshot!((render(&first), render(&again)));
    let ready_events = store
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| {
            matches!(
                e.event,
                Event::SandboxStatus {
                    status: SandboxStatus::Ready,
                    ..
                }
            )
        })
        .count();
    assert_eq!(ready_events, 1);
}

#[test]
fn usage_totals_accumulate_and_unknown_cost_stays_unknown() {
    let mut store = ready();
    let usage = |cost| Event::Usage {
        prompt_id: Some("p1".to_owned()),
        input_tokens: 10,
        output_tokens: 5,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: cost,
        total_cost_usd: None,
    };
    let a = Session::new(&mut store, 3_000)
        .apply_agent_event(1, usage(Some(0.5)))
        .unwrap();
    let b = Session::new(&mut store, 3_001)
        .apply_agent_event(2, usage(Some(0.25)))
        .unwrap();
    assert!(matches!(a.events[0].event, Event::Usage { total_cost_usd: Some(t), .. } if t == 0.5));
    assert!(matches!(b.events[0].event, Event::Usage { total_cost_usd: Some(t), .. } if t == 0.75));
    let c = Session::new(&mut store, 3_002)
        .apply_agent_event(3, usage(None))
        .unwrap();
    assert!(matches!(
        c.events[0].event,
        Event::Usage {
            total_cost_usd: None,
            ..
        }
    ));
    let totals = store.usage().unwrap();
    assert_eq!(
        (totals.input_tokens, totals.output_tokens, totals.cost_usd),
        (30, 15, None)
    );
}

#[test]
fn agents_cannot_log_queue_events() {
    let mut store = ready();
    let forged = Event::PromptQueued {
        prompt_id: "p7".to_owned(),
        author: author("mallory"),
        text: "x".to_owned(),
    };
    let effects = Session::new(&mut store, 3_000)
        .apply_agent_event(1, forged)
        .unwrap();
    assert!(effects.events.is_empty());
    assert!(matches!(
        effects.to_agent.as_slice(),
        [
            ServerToAgent::Ack { producer_seq: 1 },
            ServerToAgent::Error { .. }
        ]
    ));
}

#[test]
fn members_join_once() {
    let mut store = ready();
    let mut session = Session::new(&mut store, 3_000);
    session.join(&author("bob")).unwrap();
    session.join(&author("bob")).unwrap();
    let participants = session.participants(&["bob".to_owned()]).unwrap();
    assert_debug_snapshot!(participants);
}

fn ended(sandbox_id: &str, status: &str, snapshot_id: Option<&str>) -> SandboxEnded {
    SandboxEnded {
        sandbox_id: sandbox_id.to_owned(),
        status: status.to_owned(),
        detail: match status {
            "stopped" => "stopped by request".to_owned(),
            _ => "exit code 137 (the agent was killed by signal 9)".to_owned(),
        },
        snapshot_id: snapshot_id.map(str::to_owned),
    }
}

#[test]
fn snapshots_are_remembered_and_a_sandbox_end_is_reported() {
    let mut store = ready();
    Session::new(&mut store, 2_100)
        .sandbox_requested("sb-1")
        .unwrap();
    let snap = |n: u8| format!("{n:0>64}");
    // The agent's snapshot after a prompt is logged and becomes the newest.
    Session::new(&mut store, 2_200)
        .apply_agent_event(
            1,
            Event::Snapshot {
                id: snap(1),
                reason: "prompt_finished".to_owned(),
            },
        )
        .unwrap();
    let state = Session::new(&mut store, 2_300).state(&[], true).unwrap();
    assert_eq!(state.sandbox.last_snapshot, Some(snap(1)));

    // A late report about another sandbox changes nothing.
    let stale = Session::new(&mut store, 2_400)
        .sandbox_ended(&ended("sb-0", "exited", Some(&snap(9))))
        .unwrap();
    assert!(stale.events.is_empty());

    // The agent died: the host's snapshot is logged, the sandbox failed, and everyone is warned.
    let crashed = Session::new(&mut store, 2_500)
        .sandbox_ended(&ended("sb-1", "exited", Some(&snap(2))))
        .unwrap();
    assert_debug_snapshot!(render(&crashed));
    let state = Session::new(&mut store, 2_600).state(&[], false).unwrap();
    assert_eq!(
        (state.sandbox.status, state.sandbox.last_snapshot),
        (SandboxStatus::Failed, Some(snap(2)))
    );

    // Stopped on purpose, with the snapshot the agent already logged: no second event, no warning.
    let mut store = ready();
    Session::new(&mut store, 2_100)
        .sandbox_requested("sb-1")
        .unwrap();
    Session::new(&mut store, 2_200)
        .apply_agent_event(
            1,
            Event::Snapshot {
                id: snap(3),
                reason: "shutdown".to_owned(),
            },
        )
        .unwrap();
    let stopped = Session::new(&mut store, 2_500)
        .sandbox_ended(&ended("sb-1", "stopped", Some(&snap(3))))
        .unwrap();
    assert_debug_snapshot!(render(&stopped));
    let without = Session::new(&mut store, 2_600)
        .sandbox_ended(&ended("sb-1", "stopped", None))
        .unwrap();
    assert!(render(&without)[0].contains("no snapshot could be taken"));
}

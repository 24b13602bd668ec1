//! The lifecycle on a fake clock: every deadline path, their interleavings, and the one alarm that is
//! always armed for the earliest of them.

use insta::assert_debug_snapshot;
use nightshift_protocol::provider::SandboxEnded;
use nightshift_protocol::{Event, PromptStatus, SandboxStatus, ServerToAgent, StopScope};
use nightshift_session::{
    AlarmChange, CostCeilings, DailySpend, Effects, LifecycleSettings, MemoryStore, Phase,
    SandboxAction, Session, SessionError, Store, UsageReport,
};

use crate::{author, created, render, status};

/// Short durations so every deadline is reachable in a test (the session is created at 1 000).
fn settings() -> LifecycleSettings {
    LifecycleSettings {
        hard_timeout_ms: 100_000,
        pre_expiry_lead_ms: 10_000,
        idle_timeout_ms: 30_000,
        agent_stale_ms: 5_000,
        connect_timeout_ms: 8_000,
        connect_attempts: 3,
        warmup_ms: 12_000,
        drain_ms: 2_000,
    }
}

fn ceilings() -> CostCeilings {
    CostCeilings {
        session_cost_usd: 1.0,
        session_tokens: 1_000,
        user_daily_cost_usd: 3.0,
        user_daily_tokens: 5_000,
    }
}

/// The session as the Durable Object drives it: created, lifecycle begun, the first sandbox asked for.
struct Clocked {
    store: MemoryStore,
    /// The alarm as armed (what the object would have told the runtime).
    alarm_ms: Option<u64>,
    sandboxes: u32,
}

impl Clocked {
    fn new() -> Self {
        let mut store = created();
        let effects = Session::new(&mut store, 1_000)
            .begin_lifecycle(settings(), ceilings(), "ws://worker/sandbox/s1/ws")
            .unwrap();
        assert_eq!(effects.sandbox, vec![SandboxAction::Create]);
        let mut clocked = Clocked {
            store,
            alarm_ms: None,
            sandboxes: 0,
        };
        clocked.perform(1_000, &effects);
        clocked
    }

    /// What the object does after every operation: perform provider calls, then re-arm.
    fn perform(&mut self, now_ms: u64, effects: &Effects) {
        for action in &effects.sandbox {
            if *action == SandboxAction::Create {
                self.sandboxes += 1;
                let id = format!("sb-{}", self.sandboxes);
                let mut session = Session::new(&mut self.store, now_ms);
                session
                    .sandbox_token_replaced(&format!("hash-{id}"))
                    .unwrap();
                session.sandbox_requested(&id).unwrap();
            }
        }
        match Session::new(&mut self.store, now_ms)
            .alarm_change()
            .unwrap()
        {
            Some(AlarmChange::Set(at)) => self.alarm_ms = Some(at),
            Some(AlarmChange::Clear) => self.alarm_ms = None,
            None => {}
        }
        assert_eq!(
            self.alarm_ms,
            Session::new(&mut self.store, now_ms)
                .next_alarm_ms()
                .unwrap(),
            "the armed alarm is always the earliest deadline"
        );
    }

    fn run(
        &mut self,
        now_ms: u64,
        op: impl FnOnce(&mut Session<'_, MemoryStore>) -> Result<Effects, SessionError>,
    ) -> Effects {
        let effects = op(&mut Session::new(&mut self.store, now_ms)).unwrap();
        self.perform(now_ms, &effects);
        effects
    }

    /// Let the armed alarm fire (it must be armed, and not after `until_ms`).
    fn fire(&mut self, agent_online: bool) -> (u64, Effects) {
        let at = self.alarm_ms.take().expect("an alarm is armed");
        let effects = self.run(at, |s| s.on_alarm(agent_online));
        (at, effects)
    }

    /// Heartbeats every `every_ms` after `from_ms` up to `until_ms`, with the alarm firing in time
    /// order between them; returns the alarms that did something.
    fn heartbeats(&mut self, from_ms: u64, until_ms: u64, every_ms: u64) -> Vec<(u64, Effects)> {
        let mut next_ms = from_ms + every_ms;
        let mut acted = Vec::new();
        loop {
            match self.alarm_ms.filter(|at| *at <= until_ms) {
                Some(at) if at <= next_ms || next_ms > until_ms => {
                    let (at, effects) = self.fire(true);
                    if effects != Effects::default() {
                        acted.push((at, effects));
                    }
                }
                _ if next_ms <= until_ms => {
                    self.run(next_ms, |s| {
                        s.agent_heartbeat().map(|()| Effects::default())
                    });
                    next_ms += every_ms;
                }
                _ => return acted,
            }
        }
    }

    fn connect(&mut self, now_ms: u64) -> Effects {
        self.run(now_ms, |s| s.agent_connected())
    }

    fn prompt(&mut self, now_ms: u64, key: &str) -> Effects {
        self.run(now_ms, |s| {
            s.submit_prompt(&author("ada"), "work", key, true)
                .map(|(_, effects)| effects)
        })
    }

    fn phase(&mut self) -> Phase {
        Session::new(&mut self.store, 0).lifecycle().unwrap().phase
    }

    fn sandbox_id(&mut self) -> Option<String> {
        self.store.sandbox().unwrap().unwrap().sandbox_id
    }
}

/// Events, agent messages and provider calls, for snapshots.
fn lines(effects: &Effects) -> Vec<String> {
    let mut lines = render(effects);
    lines.extend(effects.sandbox.iter().map(|a| format!("provider {a:?}")));
    if effects.close_agent {
        lines.push("close agent socket".to_owned());
    }
    lines
}

fn snapshot_event(id: &str) -> Event {
    Event::Snapshot {
        id: id.to_owned(),
        reason: "prompt_finished".to_owned(),
    }
}

#[test]
fn a_sandbox_that_never_connects_is_asked_for_again_then_the_session_fails_keeping_its_queue() {
    let mut s = Clocked::new();
    assert_eq!(
        s.alarm_ms,
        Some(9_000),
        "the connect watchdog is the earliest"
    );
    s.prompt(2_000, "k1");
    let (at, first) = s.fire(false);
    assert_eq!(at, 9_000);
    assert_eq!(
        first.sandbox,
        vec![
            SandboxAction::Delete {
                sandbox_id: "sb-1".to_owned()
            },
            SandboxAction::Create
        ]
    );
    // The provider refuses the third request: retried after a short backoff, an earlier deadline.
    let (at, _) = s.fire(false);
    assert_eq!(at, 17_000);
    let refused = s.run(17_100, |s| s.sandbox_request_failed("provider unreachable"));
    assert!(lines(&refused)[0].contains("could not start a sandbox (attempt 3)"));
    assert_eq!(
        s.alarm_ms,
        Some(17_100 + 15_000),
        "re-armed earlier than 25 100"
    );
    let (_, failed) = s.fire(false);
    assert_debug_snapshot!(lines(&failed));
    assert_eq!(s.phase(), Phase::Failed);
    assert_eq!(status(&mut s.store, "p1"), PromptStatus::Queued, "kept");
    assert_eq!(
        s.alarm_ms,
        Some(91_000),
        "only the session's own limits remain"
    );
    // The next prompt tries again, and the kept one runs first when an agent comes.
    let again = s.prompt(40_000, "k2");
    assert_eq!(again.sandbox, vec![SandboxAction::Create]);
    let connected = s.connect(41_000);
    assert!(connected
        .to_agent
        .iter()
        .any(|m| matches!(m, ServerToAgent::RunPrompt { prompt_id, .. } if prompt_id == "p1")));
}

#[test]
fn the_agent_saves_its_work_before_the_hard_limit_and_the_session_ends_at_it() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.prompt(3_000, "k2");
    // Heartbeats keep a busy agent alive for as long as it works; no idle timeout while a prompt runs.
    let acted = s.heartbeats(2_000, 90_000, 4_000);
    assert!(acted.is_empty(), "{acted:?}");
    assert_eq!(s.alarm_ms, Some(91_000));
    let (_, pre) = s.fire(true);
    assert_debug_snapshot!(lines(&pre));
    // The agent snapshots and its sandbox ends, reported by the provider.
    s.run(91_500, |s| {
        s.apply_agent_event(1, snapshot_event("snap-wip"))
    });
    s.run(92_000, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "stopped".to_owned(),
            detail: "shutdown".to_owned(),
            snapshot_id: Some("snap-wip".to_owned()),
        })
    });
    assert_eq!(s.phase(), Phase::Parked);
    // A prompt after the pre-expiry shutdown is queued but wakes nothing.
    let late = s.prompt(95_000, "k3");
    assert!(late.sandbox.is_empty());
    assert_eq!(s.alarm_ms, Some(101_000));
    let (_, end) = s.fire(false);
    assert_debug_snapshot!(lines(&end));
    assert_eq!(s.phase(), Phase::Ended);
    assert_eq!(s.alarm_ms, None, "an ended session has no deadline");
    let refused = Session::new(&mut s.store, 102_000)
        .submit_prompt(&author("ada"), "more", "k4", false)
        .unwrap_err();
    assert!(matches!(refused, SessionError::Conflict(_)));
}

#[test]
fn the_hard_limit_deletes_a_sandbox_that_did_not_end_by_itself() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    // The agent goes silent right after the pre-expiry shutdown: no heartbeats until the end.
    assert!(s.heartbeats(2_000, 90_000, 4_000).is_empty());
    let (at, pre) = s.fire(true);
    assert_eq!(at, 91_000);
    assert!(pre.to_agent.contains(&ServerToAgent::Shutdown {
        reason: "session_timeout".to_owned(),
        deadline_ms: 101_000
    }));
    // Draining: no stale-agent recovery, the drain deadline is the hard limit itself.
    let (at, end) = s.fire(true);
    assert_eq!(at, 101_000);
    assert_eq!(
        end.sandbox,
        vec![SandboxAction::Delete {
            sandbox_id: "sb-1".to_owned()
        }]
    );
    assert!(end.events.iter().any(|e| matches!(
        &e.event,
        Event::PromptFinished { prompt_id, status: PromptStatus::Stopped, .. } if prompt_id == "p1"
    )));
    assert_eq!(s.phase(), Phase::Ended);
}

#[test]
fn an_idle_sandbox_is_released_after_a_snapshot_and_the_next_prompt_restores_it() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.run(4_000, |s| {
        s.apply_agent_event(
            1,
            Event::PromptFinished {
                prompt_id: "p1".to_owned(),
                status: PromptStatus::Completed,
                error: None,
            },
        )
    });
    s.run(5_000, |s| s.apply_agent_event(2, snapshot_event("snap-1")));
    // Only heartbeats from now on: they keep the agent alive but are not activity.
    let acted = s.heartbeats(5_000, 40_000, 3_000);
    let (at, idle) = acted.first().expect("the idle timeout");
    assert_eq!(*at, 35_000, "30 s after the last agent event");
    assert_debug_snapshot!(lines(idle));
    // The agent never ends by itself: the sandbox is deleted at the drain deadline.
    let (at, released) = acted.get(1).expect("the drain deadline");
    assert_eq!(*at, 37_000);
    assert_debug_snapshot!(lines(released));
    assert_eq!(acted.len(), 2);
    assert_eq!(s.phase(), Phase::Parked);
    let woken = s.prompt(50_000, "k2");
    assert_eq!(woken.sandbox, vec![SandboxAction::Create]);
    let plan = Session::new(&mut s.store, 50_000).sandbox_plan().unwrap();
    assert_eq!(plan.snapshot.as_deref(), Some("snap-1"));
    assert_eq!(plan.connect_url, "ws://worker/sandbox/s1/ws");
    assert_eq!(plan.timeout_ms, 101_000 - 50_000 + 60_000);
}

#[test]
fn a_stale_agent_is_replaced_and_its_prompt_resumes_from_the_snapshot() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.run(3_500, |s| s.apply_agent_event(1, snapshot_event("snap-1")));
    // The socket closes and no agent comes back: 5 s after it was last heard from, it is gone.
    assert_eq!(s.alarm_ms, Some(8_500), "stale deadline moved by the event");
    let (_, lost) = s.fire(false);
    assert_debug_snapshot!(lines(&lost));
    assert_eq!(s.sandbox_id().as_deref(), Some("sb-2"));
    // A late end report of the replaced sandbox changes nothing.
    let late = s.run(8_500, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "exited".to_owned(),
            detail: "killed".to_owned(),
            snapshot_id: None,
        })
    });
    assert!(late.events.is_empty() && late.sandbox.is_empty());
    let resumed = s.connect(9_000);
    assert_debug_snapshot!(lines(&resumed));
    // The new agent continues the producer numbering, so nothing is applied twice.
    let next = s.run(9_500, |s| {
        s.apply_agent_event(
            2,
            Event::PromptStarted {
                prompt_id: "p1".to_owned(),
            },
        )
    });
    assert_eq!(next.events.len(), 1);
}

#[test]
fn an_agent_still_connected_but_silent_is_disconnected_and_replaced() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    let (at, lost) = s.fire(true);
    assert_eq!(at, 7_000);
    assert!(lost.close_agent);
    assert_eq!(
        lost.sandbox,
        vec![
            SandboxAction::Delete {
                sandbox_id: "sb-1".to_owned()
            },
            SandboxAction::Create
        ]
    );
}

#[test]
fn a_crash_reported_by_the_provider_restarts_a_busy_session_and_parks_an_idle_one() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    let crashed = s.run(4_000, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "exited".to_owned(),
            detail: "exit code 137".to_owned(),
            snapshot_id: Some("snap-end".to_owned()),
        })
    });
    assert_debug_snapshot!(lines(&crashed));
    let plan = Session::new(&mut s.store, 4_000).sandbox_plan().unwrap();
    assert_eq!(plan.snapshot.as_deref(), Some("snap-end"));
    let resumed = s.connect(5_000);
    assert!(resumed.events.iter().any(
        |e| matches!(&e.event, Event::Notice { text, .. } if text.starts_with("resuming prompt p1"))
    ));

    // Without work, a crash parks the session: no sandbox until the next prompt.
    let mut idle = Clocked::new();
    idle.connect(2_000);
    let parked = idle.run(3_000, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "exited".to_owned(),
            detail: "exit code 137".to_owned(),
            snapshot_id: None,
        })
    });
    assert!(parked.sandbox.is_empty());
    assert_eq!(idle.phase(), Phase::Parked);
    assert_eq!(idle.alarm_ms, Some(91_000));
}

#[test]
fn a_crash_while_draining_is_not_recovered() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.run(3_100, |s| s.stop(&author("ada"), StopScope::Session));
    assert!(matches!(s.phase(), Phase::Draining { .. }));
    let ended = s.run(3_500, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "exited".to_owned(),
            detail: "killed".to_owned(),
            snapshot_id: None,
        })
    });
    assert!(ended.sandbox.is_empty());
    assert_eq!(s.phase(), Phase::Parked);
    // The session asked for the end: it is a stop, not a failure, and nobody is warned.
    assert!(ended.events.iter().any(|e| matches!(
        &e.event,
        Event::SandboxStatus {
            status: SandboxStatus::Stopped,
            ..
        }
    )));
    assert!(!ended
        .events
        .iter()
        .any(|e| matches!(&e.event, Event::Notice { .. })));
}

#[test]
fn typing_wakes_a_parked_session_and_the_warm_sandbox_is_released_when_no_prompt_comes() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.run(3_000, |s| s.stop(&author("ada"), StopScope::Session));
    s.run(3_500, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "stopped".to_owned(),
            detail: "shutdown".to_owned(),
            snapshot_id: Some("snap-1".to_owned()),
        })
    });
    assert_eq!(s.phase(), Phase::Parked);
    let typing = s.run(10_000, |s| s.typing());
    assert_eq!(typing.sandbox, vec![SandboxAction::Create]);
    assert!(s.run(10_500, |s| s.typing()).sandbox.is_empty(), "once");
    s.connect(11_000);
    assert_eq!(
        s.alarm_ms,
        Some(16_000),
        "the stale agent deadline comes first"
    );
    let acted = s.heartbeats(11_000, 30_000, 3_000);
    let (at, expired) = acted.first().expect("the warm-up expiry");
    assert_eq!(
        *at, 22_000,
        "12 s after typing, before the 30 s idle timeout"
    );
    assert!(expired.to_agent.contains(&ServerToAgent::Shutdown {
        reason: "warmup_expired".to_owned(),
        deadline_ms: 24_000
    }));

    // A prompt within the warm-up keeps the sandbox.
    let mut kept = Clocked::new();
    kept.connect(2_000);
    kept.run(3_000, |s| s.stop(&author("ada"), StopScope::Session));
    kept.run(3_500, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "stopped".to_owned(),
            detail: "shutdown".to_owned(),
            snapshot_id: None,
        })
    });
    kept.run(10_000, |s| s.typing());
    kept.connect(11_000);
    kept.prompt(12_000, "k1");
    let life = Session::new(&mut kept.store, 12_000).lifecycle().unwrap();
    assert_eq!(life.warmup_due_ms, None);
}

#[test]
fn an_agent_that_connects_after_the_pre_expiry_is_told_to_shut_down_at_once() {
    let mut s = Clocked::new();
    s.prompt(2_000, "k1");
    // Every request times out until the pre-expiry passes.
    while s.alarm_ms.is_some_and(|at| at < 91_000) {
        let (_, effects) = s.fire(false);
        if effects.sandbox.is_empty() {
            break;
        }
    }
    let again = s.prompt(40_000, "k2");
    assert_eq!(again.sandbox, vec![SandboxAction::Create]);
    while s.alarm_ms.is_some_and(|at| at <= 91_000) {
        s.fire(false);
    }
    let late = s.connect(92_000);
    assert!(late.to_agent.contains(&ServerToAgent::Shutdown {
        reason: "session_timeout".to_owned(),
        deadline_ms: 101_000
    }));
    assert!(!dispatches(&late));
    assert_eq!(
        s.store.sandbox().unwrap().unwrap().status,
        SandboxStatus::Snapshotting
    );
}

/// The agent's report that `prompt_id` was stopped.
fn stopped(prompt_id: &str) -> Event {
    Event::PromptFinished {
        prompt_id: prompt_id.to_owned(),
        status: PromptStatus::Stopped,
        error: None,
    }
}

/// Whether `effects` send the agent a prompt to run.
fn dispatches(effects: &Effects) -> bool {
    effects
        .to_agent
        .iter()
        .any(|m| matches!(m, ServerToAgent::RunPrompt { .. }))
}

fn usage(tokens: u64, cost_usd: Option<f64>) -> Event {
    Event::Usage {
        prompt_id: Some("p1".to_owned()),
        input_tokens: tokens,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd,
        total_cost_usd: None,
    }
}

#[test]
fn the_cost_ceiling_stops_the_turn_snapshots_and_holds_the_queue() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.prompt(3_000, "k2");
    let under = s.run(4_000, |s| s.apply_agent_event(1, usage(100, Some(0.6))));
    assert_eq!(under.events.len(), 1, "under the ceiling: only the usage");
    let over = s.run(5_000, |s| s.apply_agent_event(2, usage(100, Some(0.5))));
    assert_debug_snapshot!(lines(&over));
    // The stopped turn ends; the next prompt is not dispatched, now or when an agent reconnects.
    let finished = s.run(5_500, |s| s.apply_agent_event(3, stopped("p1")));
    assert!(!dispatches(&finished));
    let again = s.connect(6_000);
    assert!(!dispatches(&again));
    assert_eq!(status(&mut s.store, "p2"), PromptStatus::Queued, "kept");
    let more = s.run(7_000, |s| s.apply_agent_event(4, usage(100, Some(0.5))));
    assert_eq!(more.events.len(), 1, "said once");
    let life = Session::new(&mut s.store, 7_000).lifecycle().unwrap();
    assert!(life
        .ceiling_reached
        .is_some_and(|why| why.contains("cost ceiling ($1.10 of $1.00)")));
}

#[test]
fn unknown_cost_counts_against_the_token_ceiling() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    let under = s.run(4_000, |s| s.apply_agent_event(1, usage(600, None)));
    assert!(under.to_agent.len() == 1, "only the ack: {under:?}");
    let over = s.run(5_000, |s| s.apply_agent_event(2, usage(600, None)));
    assert!(over.to_agent.contains(&ServerToAgent::Stop {
        prompt_id: Some("p1".to_owned())
    }));
    assert!(over.events.iter().any(|e| matches!(&e.event,
        Event::Notice { level, text } if level == "warn" && text.contains("token ceiling (1200 of 1000 tokens"))));
}

#[test]
fn the_session_state_shows_the_phase_the_deadlines_and_the_ceilings() {
    let mut s = Clocked::new();
    s.connect(2_000);
    let state = Session::new(&mut s.store, 2_500)
        .state(&[], true)
        .unwrap()
        .lifecycle
        .unwrap();
    assert_eq!(state.phase, "live");
    assert_eq!(state.ends_ms, 101_000);
    assert_eq!(state.next_deadline_ms, Some(7_000));
    assert_eq!((state.cost_ceiling_usd, state.token_ceiling), (1.0, 1_000));
    assert_eq!(state.ceiling_reached, None);
}

#[test]
fn nothing_is_dispatched_while_the_sandbox_drains_even_if_the_agent_says_it_is_ready() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.run(3_100, |s| s.stop(&author("ada"), StopScope::Turn));
    let life = Session::new(&mut s.store, 3_200).lifecycle().unwrap();
    assert_eq!(life.phase, Phase::Live);
    s.prompt(3_300, "k2");
    // The idle drain cannot start with work queued; the pre-expiry can.
    let mut now = 3_300;
    for seq in 1.. {
        now += 4_000;
        if now >= 91_000 {
            break;
        }
        s.run(now, |s| {
            s.apply_agent_event(
                seq,
                Event::Token {
                    prompt_id: "p1".to_owned(),
                    text: "x".to_owned(),
                },
            )
        });
        while s.alarm_ms.is_some_and(|at| at <= now) {
            s.fire(true);
        }
    }
    let (_, pre) = s.fire(true);
    assert!(matches!(
        pre.to_agent.as_slice(),
        [ServerToAgent::Shutdown { .. }]
    ));
    let next = s.store.sandbox().unwrap().unwrap().last_producer_seq + 1;
    s.run(92_000, |s| {
        s.apply_agent_event(
            next,
            Event::SandboxStatus {
                status: SandboxStatus::Ready,
                detail: "synced".to_owned(),
            },
        )
    });
    let finished = s.run(92_500, |s| s.apply_agent_event(next + 1, stopped("p1")));
    assert!(!dispatches(&finished));
    assert_eq!(status(&mut s.store, "p2"), PromptStatus::Queued);
}

#[test]
fn a_person_at_their_daily_ceiling_is_stopped_and_waits_while_others_go_on() {
    let mut s = Clocked::new();
    s.connect(2_000);
    s.prompt(3_000, "k1");
    s.run(3_000, |s| {
        s.submit_prompt(&author("ada"), "more", "k2", true)
            .map(|(_, e)| e)
    });
    s.run(3_000, |s| {
        s.submit_prompt(&author("bob"), "mine", "k3", true)
            .map(|(_, e)| e)
    });
    // Every usage is reported for the day of the person whose prompt used it.
    let used = s.run(4_000, |s| s.apply_agent_event(1, usage(100, Some(0.25))));
    assert_eq!(
        used.usage_reports,
        vec![UsageReport {
            login: "ada".to_owned(),
            day: 0,
            cost_usd: Some(0.25),
            tokens: 100
        }]
    );
    // Her object answers: over her day's ceiling (with another session's usage).
    let spend = DailySpend {
        day: 0,
        cost_usd: 3.25,
        unpriced_tokens: 0,
    };
    let over = s.run(4_100, |s| s.user_spend("ada", spend));
    assert_debug_snapshot!(lines(&over));
    assert!(
        s.run(4_200, |s| s.user_spend("ada", spend))
            .events
            .is_empty(),
        "said once"
    );
    // Her turn ends; bob's prompt runs, hers waits.
    let finished = s.run(4_500, |s| s.apply_agent_event(2, stopped("p1")));
    assert!(finished
        .to_agent
        .iter()
        .any(|m| matches!(m, ServerToAgent::RunPrompt { prompt_id, .. } if prompt_id == "p3")));
    assert_eq!(status(&mut s.store, "p2"), PromptStatus::Queued);
    // A report about another day changes nothing.
    let stale = s.run(4_600, |s| {
        s.user_spend(
            "bob",
            DailySpend {
                day: 7,
                cost_usd: 99.0,
                unpriced_tokens: 0,
            },
        )
    });
    assert_eq!(stale, Effects::default());
}

#[test]
fn a_snapshot_the_provider_cannot_restore_is_forgotten_and_the_next_sandbox_starts_from_the_repository(
) {
    let mut clocked = Clocked::new();
    clocked.connect(1_100);
    clocked.prompt(1_150, "k1");
    clocked.run(1_200, |s| {
        s.apply_agent_event(1, snapshot_event(&"a".repeat(64)))
    });
    assert_eq!(
        Session::new(&mut clocked.store, 1_250)
            .sandbox_plan()
            .unwrap()
            .snapshot,
        Some("a".repeat(64))
    );
    // The agent dies; the session asks for a new sandbox from the snapshot, which the provider refuses.
    clocked.run(1_300, |s| {
        s.sandbox_ended(&SandboxEnded {
            sandbox_id: "sb-1".to_owned(),
            status: "exited".to_owned(),
            detail: "killed by signal 9".to_owned(),
            snapshot_id: Some("a".repeat(64)),
        })
    });
    let mut effects = clocked.run(1_400, |s| {
        s.snapshot_unrestorable("provider answered 409: the snapshot's image is gone")
    });
    effects.merge(clocked.run(1_400, |s| {
        s.sandbox_request_failed("provider answered 409: the snapshot's image is gone")
    }));
    let text = lines(&effects).join("\n");
    assert!(text.contains("cannot be restored"), "{text}");
    assert!(text.contains("could not start a sandbox"), "{text}");
    let plan = Session::new(&mut clocked.store, 1_500)
        .sandbox_plan()
        .unwrap();
    assert_eq!(
        plan.snapshot, None,
        "the next attempt starts from the repository"
    );
    // Forgetting twice says nothing more.
    let again = clocked.run(1_600, |s| s.snapshot_unrestorable("again"));
    assert!(again.events.is_empty());
}

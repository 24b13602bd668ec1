//! The session's deadlines: one persisted [`Lifecycle`] record from which every deadline is derived,
//! multiplexed onto the Durable Object's single alarm.
//!
//! The record holds the inputs (when the session was created, when the agent was last heard from, when
//! it last did real work, where the sandbox is in its life, the settings); [`Lifecycle::deadlines`]
//! derives what is due when, and [`Lifecycle::next_alarm_ms`] is always the earliest of them. Deriving
//! instead of storing each deadline means a deadline can never be left stale: when the phase or an input
//! changes, the set changes with it. An alarm that fires early (because an input moved a deadline
//! later) finds nothing due and is simply armed again.

use std::collections::BTreeMap;

use crate::ceiling::{CostCeilings, DailySpend};

/// Default hard limit of a session's life: 4 h from its creation.
pub const DEFAULT_HARD_TIMEOUT_MS: u64 = 4 * 3600 * 1000;
/// Default lead of the pre-expiry shutdown before the hard limit: 2 min.
pub const DEFAULT_PRE_EXPIRY_LEAD_MS: u64 = 2 * 60 * 1000;
/// Default idle timeout: 30 min without agent activity and without work.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Default time after which a silent agent counts as gone: 45 s (it sends a heartbeat every 10 s).
pub const DEFAULT_AGENT_STALE_MS: u64 = 45 * 1000;
/// Default time a requested sandbox has to connect its agent: 3 min.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3 * 60 * 1000;
/// Default number of sandbox requests in a row before the session says it failed.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;
/// Default time a sandbox woken by typing waits for a prompt before it is released again: 10 min.
pub const DEFAULT_WARMUP_MS: u64 = 10 * 60 * 1000;
/// Default time an agent told to shut down (when idle) has before its sandbox is deleted: 60 s.
pub const DEFAULT_DRAIN_MS: u64 = 60 * 1000;
/// Agent activity is persisted at most once per this interval (it is the hot path of every token).
pub const ACTIVITY_GRANULARITY_MS: u64 = 1000;

/// The durations that drive a session's deadlines (configurable per deployment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LifecycleSettings {
    /// The session ends this long after its creation.
    pub hard_timeout_ms: u64,
    /// The agent is told to shut down this long before the hard limit.
    pub pre_expiry_lead_ms: u64,
    /// With no work and no agent activity for this long, the sandbox is released (snapshot first).
    pub idle_timeout_ms: u64,
    /// An agent not heard from (event or heartbeat) for this long is gone.
    pub agent_stale_ms: u64,
    /// A requested sandbox whose agent has not said hello after this long is asked for again.
    pub connect_timeout_ms: u64,
    /// Sandbox requests in a row before the session gives up (and keeps its queue).
    pub connect_attempts: u32,
    /// A sandbox woken by typing is released again when no prompt came within this long.
    pub warmup_ms: u64,
    /// An agent told to shut down for idleness has this long before its sandbox is deleted.
    pub drain_ms: u64,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            hard_timeout_ms: DEFAULT_HARD_TIMEOUT_MS,
            pre_expiry_lead_ms: DEFAULT_PRE_EXPIRY_LEAD_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            agent_stale_ms: DEFAULT_AGENT_STALE_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS,
            warmup_ms: DEFAULT_WARMUP_MS,
            drain_ms: DEFAULT_DRAIN_MS,
        }
    }
}

/// Why an agent was told to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    /// The session nears its hard limit.
    SessionTimeout,
    /// Nothing happened for the idle timeout.
    Idle,
    /// A sandbox woken by typing got no prompt.
    WarmupExpired,
    /// A participant stopped the session (`stop{session}`).
    Stopped,
}

impl DrainReason {
    /// The reason as the agent's `shutdown{reason}` and the logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::SessionTimeout => "session_timeout",
            DrainReason::Idle => "idle",
            DrainReason::WarmupExpired => "warmup_expired",
            DrainReason::Stopped => "stopped",
        }
    }
}

/// Where the session's sandbox is in its life (see the state diagram in `ARCHITECTURE.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// A sandbox was (or is being) requested; its agent has not said hello yet.
    Starting {
        /// Requests in a row so far (1 for the first).
        attempt: u32,
        /// When this request is given up on.
        due_ms: u64,
    },
    /// The agent is connected (or was, and may reconnect before it counts as stale).
    Live,
    /// The agent was told to shut down; its sandbox ends by `until_ms`.
    Draining {
        /// Why.
        reason: DrainReason,
        /// When the sandbox is deleted if it has not ended by itself.
        until_ms: u64,
    },
    /// No sandbox (released when idle, or stopped); the next prompt restores one from the snapshot.
    Parked,
    /// Sandbox requests failed too often; the queue is kept and the next prompt tries again.
    Failed,
    /// The session reached its hard limit: no sandbox and no new prompts, ever.
    Ended,
}

/// One kind of deadline.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Deadline {
    /// The session's hard limit (created + `hard_timeout_ms`).
    HardTimeout,
    /// Time to tell the agent to save its work before the hard limit.
    PreExpiry,
    /// A silent agent counts as gone.
    AgentStale,
    /// A requested sandbox has not connected.
    ConnectWatchdog,
    /// A draining sandbox has not ended by itself.
    DrainDeadline,
    /// A sandbox woken by typing got no prompt.
    WarmupExpiry,
    /// No work and no agent activity for the idle timeout.
    Idle,
}

/// The persisted inputs of every deadline of a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lifecycle {
    /// The durations in force.
    pub settings: LifecycleSettings,
    /// When the session was created.
    pub created_ms: u64,
    /// Where the sandbox is in its life.
    pub phase: Phase,
    /// Whether the pre-expiry shutdown was handled (sent, or nothing to send).
    pub pre_expiry_done: bool,
    /// When the agent was last heard from (any frame), to [`ACTIVITY_GRANULARITY_MS`].
    pub agent_seen_ms: u64,
    /// When real work last happened (an agent event other than a heartbeat, a prompt accepted or
    /// dispatched), to [`ACTIVITY_GRANULARITY_MS`]. Client presence does not count.
    pub activity_ms: u64,
    /// When a sandbox woken by typing is released again unless a prompt came.
    pub warmup_due_ms: Option<u64>,
    /// The prompt that was running when its sandbox was lost: re-delivered as resumed.
    pub interrupted_prompt: Option<String>,
    /// Where the agent dials in (kept for the sandboxes requested after the first).
    pub connect_url: String,
    /// The alarm time last armed, so the object re-arms only when the earliest deadline changed.
    pub armed_ms: Option<u64>,
    /// The cost ceilings in force.
    #[serde(default)]
    pub ceilings: CostCeilings,
    /// Why the session stopped at a ceiling (no prompt is dispatched then; the queue is kept).
    #[serde(default)]
    pub ceiling_reached: Option<String>,
    /// The newest known day of usage of each person who prompted here (from their `UserObject`).
    #[serde(default)]
    pub user_spend: BTreeMap<String, DailySpend>,
}

impl Lifecycle {
    /// A session created at `created_ms` whose first sandbox was just requested.
    pub fn new(settings: LifecycleSettings, created_ms: u64, connect_url: String) -> Self {
        Lifecycle {
            settings,
            created_ms,
            phase: Phase::Starting {
                attempt: 1,
                due_ms: created_ms.saturating_add(settings.connect_timeout_ms),
            },
            pre_expiry_done: false,
            agent_seen_ms: created_ms,
            activity_ms: created_ms,
            warmup_due_ms: None,
            interrupted_prompt: None,
            connect_url,
            armed_ms: None,
            ceilings: CostCeilings::default(),
            ceiling_reached: None,
            user_spend: BTreeMap::new(),
        }
    }

    /// When the session ends.
    pub fn hard_deadline_ms(&self) -> u64 {
        self.created_ms
            .saturating_add(self.settings.hard_timeout_ms)
    }

    /// When the agent is told to save its work ahead of the hard limit.
    pub fn pre_expiry_ms(&self) -> u64 {
        self.hard_deadline_ms()
            .saturating_sub(self.settings.pre_expiry_lead_ms)
            .max(self.created_ms)
    }

    /// Every pending deadline with its time. `has_work`: a prompt is queued or running (then the
    /// session is never idle, however long a command runs without output).
    pub fn deadlines(&self, has_work: bool) -> Vec<(Deadline, u64)> {
        let mut due = Vec::new();
        if self.phase == Phase::Ended {
            return due;
        }
        due.push((Deadline::HardTimeout, self.hard_deadline_ms()));
        if !self.pre_expiry_done {
            due.push((Deadline::PreExpiry, self.pre_expiry_ms()));
        }
        match self.phase {
            Phase::Starting { due_ms, .. } => due.push((Deadline::ConnectWatchdog, due_ms)),
            Phase::Live => {
                due.push((
                    Deadline::AgentStale,
                    self.agent_seen_ms
                        .saturating_add(self.settings.agent_stale_ms),
                ));
                if !has_work {
                    due.push((
                        Deadline::Idle,
                        self.activity_ms
                            .saturating_add(self.settings.idle_timeout_ms),
                    ));
                    if let Some(warmup_ms) = self.warmup_due_ms {
                        due.push((Deadline::WarmupExpiry, warmup_ms));
                    }
                }
            }
            Phase::Draining { until_ms, .. } => due.push((Deadline::DrainDeadline, until_ms)),
            Phase::Parked | Phase::Failed | Phase::Ended => {}
        }
        due
    }

    /// The earliest deadline: the one alarm to arm.
    pub fn next_alarm_ms(&self, has_work: bool) -> Option<u64> {
        self.deadlines(has_work).into_iter().map(|(_, at)| at).min()
    }

    /// The deadlines due at `now_ms`, earliest first (ties in [`Deadline`] order: the hard limit first).
    pub fn due(&self, now_ms: u64, has_work: bool) -> Vec<Deadline> {
        let mut due: Vec<(Deadline, u64)> = self
            .deadlines(has_work)
            .into_iter()
            .filter(|(_, at)| *at <= now_ms)
            .collect();
        due.sort_by_key(|(kind, at)| (*at, *kind));
        due.into_iter().map(|(kind, _)| kind).collect()
    }

    /// Record that the agent was heard from at `now_ms` (real work when `activity`). Returns whether
    /// the record changed enough to be saved (at most once per [`ACTIVITY_GRANULARITY_MS`]).
    pub fn heard_from_agent(&mut self, now_ms: u64, activity: bool) -> bool {
        let mut changed = false;
        if now_ms >= self.agent_seen_ms.saturating_add(ACTIVITY_GRANULARITY_MS) {
            self.agent_seen_ms = now_ms;
            changed = true;
        }
        if activity && now_ms >= self.activity_ms.saturating_add(ACTIVITY_GRANULARITY_MS) {
            self.activity_ms = now_ms;
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LifecycleSettings {
        LifecycleSettings {
            hard_timeout_ms: 10_000,
            pre_expiry_lead_ms: 2_000,
            idle_timeout_ms: 3_000,
            agent_stale_ms: 1_500,
            connect_timeout_ms: 4_000,
            connect_attempts: 2,
            warmup_ms: 2_500,
            drain_ms: 500,
        }
    }

    #[test]
    fn a_new_session_watches_its_connect_and_its_limits() {
        let life = Lifecycle::new(settings(), 1_000, String::new());
        assert_eq!(
            life.deadlines(false),
            vec![
                (Deadline::HardTimeout, 11_000),
                (Deadline::PreExpiry, 9_000),
                (Deadline::ConnectWatchdog, 5_000),
            ]
        );
        assert_eq!(life.next_alarm_ms(false), Some(5_000));
        assert!(life.due(4_999, false).is_empty());
        assert_eq!(life.due(5_000, false), vec![Deadline::ConnectWatchdog]);
    }

    #[test]
    fn work_suspends_the_idle_timeout_but_not_the_stale_agent() {
        let mut life = Lifecycle::new(settings(), 1_000, String::new());
        life.phase = Phase::Live;
        assert_eq!(life.next_alarm_ms(false), Some(2_500));
        assert!(life.deadlines(false).contains(&(Deadline::Idle, 4_000)));
        assert!(!life
            .deadlines(true)
            .iter()
            .any(|(d, _)| *d == Deadline::Idle));
        assert!(life
            .deadlines(true)
            .contains(&(Deadline::AgentStale, 2_500)));
    }

    #[test]
    fn hearing_from_the_agent_moves_deadlines_later_at_a_coarse_grain() {
        let mut life = Lifecycle::new(settings(), 1_000, String::new());
        life.phase = Phase::Live;
        assert!(
            !life.heard_from_agent(1_500, true),
            "within the granularity"
        );
        assert!(life.heard_from_agent(2_000, false));
        assert_eq!(life.agent_seen_ms, 2_000);
        assert_eq!(life.activity_ms, 1_000, "a heartbeat is not activity");
        assert!(life.heard_from_agent(3_000, true));
        assert_eq!(life.activity_ms, 3_000);
        assert!(life.deadlines(false).contains(&(Deadline::Idle, 6_000)));
    }

    #[test]
    fn ties_put_the_hard_limit_first_and_an_ended_session_has_no_deadline() {
        let mut life = Lifecycle::new(settings(), 0, String::new());
        life.settings.pre_expiry_lead_ms = 0;
        life.phase = Phase::Draining {
            reason: DrainReason::SessionTimeout,
            until_ms: 10_000,
        };
        assert_eq!(
            life.due(10_000, false),
            vec![
                Deadline::HardTimeout,
                Deadline::PreExpiry,
                Deadline::DrainDeadline
            ]
        );
        life.phase = Phase::Ended;
        assert_eq!(life.next_alarm_ms(true), None);
    }

    #[test]
    fn a_lead_longer_than_the_session_shuts_down_at_creation() {
        let mut life = Lifecycle::new(settings(), 1_000, String::new());
        life.settings.pre_expiry_lead_ms = 60_000;
        assert_eq!(life.pre_expiry_ms(), 1_000);
    }
}

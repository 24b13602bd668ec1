//! The session's life around its sandbox: the deadlines of [`crate::deadline`] acted upon, crash
//! recovery, parking an idle sandbox and waking it for the next prompt, and the end at the hard limit.
//!
//! Every operation here is a method of [`Session`] returning [`Effects`]: events it logged, messages for
//! the agent, and [`SandboxAction`]s (provider calls) that the Durable Object performs in order. The
//! object arms its one alarm at [`Session::next_alarm_ms`] after every change and calls
//! [`Session::on_alarm`] when it fires.

use nightshift_protocol::http::LifecycleState;
use nightshift_protocol::{Event, PromptStatus, SandboxStatus, ServerToAgent};

use crate::ceiling::{CostCeilings, DailySpend, UsageReport, DAY_MS};
use crate::deadline::{Deadline, DrainReason, Lifecycle, LifecycleSettings, Phase};
use crate::repo::human_duration;
use crate::session::{Effects, Session};
use crate::store::Store;
use crate::SessionError;

/// A provider call the session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxAction {
    /// Ask the provider for a new sandbox: the object makes a fresh sandbox token, records its hash
    /// ([`Session::sandbox_token_replaced`]), sends what [`Session::sandbox_plan`] says, and reports the
    /// outcome ([`Session::sandbox_requested`] or [`Session::sandbox_request_failed`]).
    Create,
    /// `DELETE /v1/sandboxes/{id}`: stop a sandbox (the provider extracts its work first).
    Delete {
        /// The provider's sandbox id.
        sandbox_id: String,
    },
}

/// What to ask the provider for when a [`SandboxAction::Create`] is performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// Restore this snapshot (the session's newest), or start from the repository when `None`.
    pub snapshot: Option<String>,
    /// Where the agent dials in.
    pub connect_url: String,
    /// The sandbox's own wall-clock limit: the session's remaining time plus a minute, so the
    /// session's end (which deletes it after extraction) always comes first.
    pub timeout_ms: u64,
}

/// How the alarm must change after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    /// Arm (or move) the alarm to this time.
    Set(u64),
    /// No deadline is pending: delete the alarm.
    Clear,
}

/// Extra time the provider's own limit allows a sandbox beyond the session's hard limit.
const PROVIDER_SLACK_MS: u64 = 60_000;
/// At most this many deadlines are handled per alarm (each one changes the state it was due from).
const MAX_DEADLINES_PER_ALARM: usize = 16;
/// A sandbox request the provider refused is retried after this long times the attempt.
const RETRY_BACKOFF_MS: u64 = 5_000;

impl<S: Store> Session<'_, S> {
    /// Start the lifecycle of a just-created session: record the settings and where its agent dials
    /// in, and ask for its first sandbox.
    pub fn begin_lifecycle(
        &mut self,
        settings: LifecycleSettings,
        ceilings: CostCeilings,
        connect_url: &str,
    ) -> Result<Effects, SessionError> {
        let info = self.info()?;
        let mut life = Lifecycle::new(settings, info.created_ms, connect_url.to_owned());
        life.ceilings = ceilings;
        life.phase = Phase::Starting {
            attempt: 1,
            due_ms: self.now_ms.saturating_add(settings.connect_timeout_ms),
        };
        self.store.save_lifecycle(&life)?;
        Ok(Effects {
            sandbox: vec![SandboxAction::Create],
            ..Effects::default()
        })
    }

    /// The lifecycle record (defaults for a session created before lifecycles were recorded).
    pub fn lifecycle(&self) -> Result<Lifecycle, SessionError> {
        if let Some(life) = self.store.lifecycle()? {
            return Ok(life);
        }
        let info = self.info()?;
        Ok(Lifecycle::new(
            LifecycleSettings::default(),
            info.created_ms,
            String::new(),
        ))
    }

    /// The lifecycle as the session state shows it.
    pub fn lifecycle_state(&self) -> Result<LifecycleState, SessionError> {
        let life = self.lifecycle()?;
        let phase = match life.phase {
            Phase::Starting { .. } => "starting",
            Phase::Live => "live",
            Phase::Draining { .. } => "draining",
            Phase::Parked => "parked",
            Phase::Failed => "failed",
            Phase::Ended => "ended",
        };
        Ok(LifecycleState {
            phase: phase.to_owned(),
            ends_ms: life.hard_deadline_ms(),
            next_deadline_ms: life.next_alarm_ms(self.has_work()?),
            cost_ceiling_usd: life.ceilings.session_cost_usd,
            token_ceiling: life.ceilings.session_tokens,
            ceiling_reached: life.ceiling_reached,
        })
    }

    /// The earliest pending deadline: the time the object's one alarm must be set to.
    pub fn next_alarm_ms(&self) -> Result<Option<u64>, SessionError> {
        let has_work = self.has_work()?;
        Ok(self.lifecycle()?.next_alarm_ms(has_work))
    }

    /// Whether the alarm must be armed, moved or deleted to match the earliest deadline; records the
    /// answer as armed. `None`: the armed alarm is already right.
    pub fn alarm_change(&mut self) -> Result<Option<AlarmChange>, SessionError> {
        if self.store.session()?.is_none() {
            return Ok(None);
        }
        let mut life = self.lifecycle()?;
        let next = life.next_alarm_ms(self.has_work()?);
        if next == life.armed_ms {
            return Ok(None);
        }
        life.armed_ms = next;
        self.store.save_lifecycle(&life)?;
        Ok(Some(next.map_or(AlarmChange::Clear, AlarmChange::Set)))
    }

    /// What a [`SandboxAction::Create`] asks the provider for.
    pub fn sandbox_plan(&self) -> Result<SandboxPlan, SessionError> {
        let life = self.lifecycle()?;
        Ok(SandboxPlan {
            snapshot: self.sandbox()?.last_snapshot,
            connect_url: life.connect_url.clone(),
            timeout_ms: life
                .hard_deadline_ms()
                .saturating_sub(self.now_ms)
                .saturating_add(PROVIDER_SLACK_MS),
        })
    }

    /// A new sandbox token was made for the sandbox about to be requested; only its hash is kept, and
    /// the previous sandbox's token stops working.
    pub fn sandbox_token_replaced(&mut self, token_hash: &str) -> Result<(), SessionError> {
        let mut sandbox = self.sandbox()?;
        sandbox.token_hash = token_hash.to_owned();
        self.store.save_sandbox(&sandbox)?;
        Ok(())
    }

    /// The provider cannot restore the session's newest snapshot (its image was retired, or the snapshot
    /// itself is gone): the session forgets it, so the next attempt starts from the repository — the
    /// session branch holds every pushed commit — and everyone is told what may be lost.
    pub fn snapshot_unrestorable(&mut self, detail: &str) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let mut sandbox = self.sandbox()?;
        let Some(id) = sandbox.last_snapshot.take() else {
            return Ok(effects);
        };
        self.store.save_sandbox(&sandbox)?;
        self.log(
            &mut effects,
            Event::Notice {
                level: "warn".to_owned(),
                text: format!(
                    "snapshot {} cannot be restored ({detail}); the next sandbox starts from the \
                     repository and the session branch, so changes after the last push are not in it",
                    id.get(..12).unwrap_or(&id)
                ),
            },
        )?;
        Ok(effects)
    }

    /// The provider refused or could not be reached for a sandbox request: retried (after a backoff)
    /// by the connect watchdog, which gives up after the configured number of attempts.
    pub fn sandbox_request_failed(&mut self, detail: &str) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let mut life = self.lifecycle()?;
        if let Phase::Starting { attempt, .. } = life.phase {
            let backoff_ms = RETRY_BACKOFF_MS.saturating_mul(u64::from(attempt));
            life.phase = Phase::Starting {
                attempt,
                due_ms: self.now_ms.saturating_add(backoff_ms),
            };
            self.store.save_lifecycle(&life)?;
            self.set_sandbox_status(
                &mut effects,
                SandboxStatus::Starting,
                &format!("could not start a sandbox (attempt {attempt}): {detail}"),
            )?;
        }
        Ok(effects)
    }

    /// The agent sent a heartbeat.
    pub fn agent_heartbeat(&mut self) -> Result<(), SessionError> {
        self.heard_from_agent(false)
    }

    /// Everything due at this moment, earliest first; `agent_online` says whether an agent socket is
    /// open. Call when the alarm fires (the alarm is then no longer armed).
    pub fn on_alarm(&mut self, agent_online: bool) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        if self.store.session()?.is_none() {
            return Ok(effects);
        }
        let mut life = self.lifecycle()?;
        life.armed_ms = None;
        self.store.save_lifecycle(&life)?;
        for _ in 0..MAX_DEADLINES_PER_ALARM {
            let has_work = self.has_work()?;
            let Some(deadline) = self
                .lifecycle()?
                .due(self.now_ms, has_work)
                .first()
                .copied()
            else {
                break;
            };
            self.handle(&mut effects, deadline, agent_online)?;
        }
        Ok(effects)
    }

    /// A participant is typing: a parked sandbox is restored now, so it is ready when the prompt
    /// comes; it is released again when no prompt came within the warm-up time.
    pub fn typing(&mut self) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let mut life = self.lifecycle()?;
        if life.phase == Phase::Parked && !life.pre_expiry_done {
            life.warmup_due_ms = Some(self.now_ms.saturating_add(life.settings.warmup_ms));
            self.store.save_lifecycle(&life)?;
            self.wake(&mut effects, "someone is typing")?;
        }
        Ok(effects)
    }

    fn handle(
        &mut self,
        effects: &mut Effects,
        deadline: Deadline,
        agent_online: bool,
    ) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        match deadline {
            Deadline::HardTimeout => self.end(effects)?,
            Deadline::PreExpiry => {
                life.pre_expiry_done = true;
                self.store.save_lifecycle(&life)?;
                if life.phase == Phase::Live {
                    let limit = human_duration(life.settings.hard_timeout_ms);
                    self.notice_in(
                        effects,
                        "info",
                        &format!(
                            "the session reaches its time limit ({limit}) soon: the agent is saving its work"
                        ),
                    )?;
                    self.drain(
                        effects,
                        DrainReason::SessionTimeout,
                        life.hard_deadline_ms(),
                    )?;
                }
            }
            Deadline::Idle | Deadline::WarmupExpiry => {
                life.warmup_due_ms = None;
                self.store.save_lifecycle(&life)?;
                let reason = if deadline == Deadline::Idle {
                    DrainReason::Idle
                } else {
                    DrainReason::WarmupExpired
                };
                let until_ms = self.now_ms.saturating_add(life.settings.drain_ms);
                self.drain(effects, reason, until_ms)?;
            }
            Deadline::DrainDeadline => {
                if let Some(sandbox_id) = self.sandbox()?.sandbox_id {
                    effects.sandbox.push(SandboxAction::Delete { sandbox_id });
                }
                life.phase = Phase::Parked;
                self.store.save_lifecycle(&life)?;
                self.set_sandbox_status(
                    effects,
                    SandboxStatus::Stopped,
                    "released; the next prompt restores the session from its snapshot",
                )?;
            }
            Deadline::AgentStale => {
                effects.close_agent = agent_online;
                let silent_s = self.now_ms.saturating_sub(life.agent_seen_ms) / 1000;
                self.lost(
                    effects,
                    &format!("the agent has not been heard from for {silent_s} s"),
                    true,
                    true,
                )?;
            }
            Deadline::ConnectWatchdog => {
                let Phase::Starting { attempt, .. } = life.phase else {
                    return Ok(());
                };
                let stuck = self.take_sandbox_id()?;
                if let Some(sandbox_id) = stuck {
                    effects.sandbox.push(SandboxAction::Delete { sandbox_id });
                }
                if attempt >= life.settings.connect_attempts {
                    life.phase = Phase::Failed;
                    self.store.save_lifecycle(&life)?;
                    let text = format!(
                        "no sandbox connected after {attempt} attempts; queued prompts are kept, and the next prompt tries again"
                    );
                    self.set_sandbox_status(effects, SandboxStatus::Failed, &text)?;
                    self.notice_in(effects, "error", &text)?;
                } else {
                    self.request(effects, attempt + 1, "the sandbox did not connect in time")?;
                }
            }
        }
        Ok(())
    }

    /// The sandbox or its agent is gone while the session lives: with work (a running or queued
    /// prompt) a new sandbox is requested from the newest snapshot and the running prompt will be
    /// re-delivered as resumed; without work the session parks until the next prompt (said with a
    /// `sandbox_status{stopped}` when `announce_park`; an end report already logged how it ended).
    pub(crate) fn lost(
        &mut self,
        effects: &mut Effects,
        why: &str,
        delete_old: bool,
        announce_park: bool,
    ) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        if !matches!(life.phase, Phase::Live | Phase::Starting { .. }) {
            return Ok(());
        }
        let old = self.take_sandbox_id()?;
        if delete_old {
            if let Some(sandbox_id) = old {
                effects.sandbox.push(SandboxAction::Delete { sandbox_id });
            }
        }
        if let Some(running) = self.running()? {
            life.interrupted_prompt = Some(running.prompt_id);
            self.store.save_lifecycle(&life)?;
        }
        if self.has_work()? && !life.pre_expiry_done {
            self.notice_in(
                effects,
                "warn",
                &format!("{why}: restarting the sandbox from the session's newest snapshot"),
            )?;
            self.request(effects, 1, why)
        } else {
            life.phase = Phase::Parked;
            self.store.save_lifecycle(&life)?;
            if !announce_park {
                return Ok(());
            }
            self.set_sandbox_status(
                effects,
                SandboxStatus::Stopped,
                &format!("{why}; the next prompt restores the session from its snapshot"),
            )
        }
    }

    /// A prompt arrived or someone typed while no sandbox runs: request one.
    pub(crate) fn wake(&mut self, effects: &mut Effects, why: &str) -> Result<(), SessionError> {
        let life = self.lifecycle()?;
        if matches!(life.phase, Phase::Parked | Phase::Failed) && !life.pre_expiry_done {
            self.request(effects, 1, why)?;
        }
        Ok(())
    }

    /// Whether the session has reached its hard limit (no prompt is accepted then).
    pub fn ended(&self) -> Result<bool, SessionError> {
        Ok(self.lifecycle()?.phase == Phase::Ended)
    }

    /// Bookkeeping of an agent frame: heard from (and real work, for events).
    pub(crate) fn heard_from_agent(&mut self, activity: bool) -> Result<(), SessionError> {
        let Some(mut life) = self.store.lifecycle()? else {
            return Ok(());
        };
        if life.heard_from_agent(self.now_ms, activity) {
            self.store.save_lifecycle(&life)?;
        }
        Ok(())
    }

    /// A prompt was accepted: real work, and a parked session wakes.
    pub(crate) fn prompt_arrived(&mut self, effects: &mut Effects) -> Result<(), SessionError> {
        if let Some(mut life) = self.store.lifecycle()? {
            life.activity_ms = self.now_ms;
            life.warmup_due_ms = None;
            self.store.save_lifecycle(&life)?;
        }
        self.wake(effects, "a prompt arrived")
    }

    /// The agent said hello: the sandbox is live (unless it is draining, in which case it is told
    /// again to shut down). Returns whether prompts may be dispatched.
    pub(crate) fn agent_arrived(&mut self, effects: &mut Effects) -> Result<bool, SessionError> {
        let mut life = self.lifecycle()?;
        life.agent_seen_ms = self.now_ms;
        life.activity_ms = self.now_ms;
        match life.phase {
            Phase::Draining { reason, until_ms } => {
                self.store.save_lifecycle(&life)?;
                effects.to_agent.push(ServerToAgent::Shutdown {
                    reason: reason.as_str().to_owned(),
                    deadline_ms: until_ms,
                });
                return Ok(false);
            }
            Phase::Ended => {
                self.store.save_lifecycle(&life)?;
                return Ok(false);
            }
            _ => {}
        }
        life.phase = Phase::Live;
        let interrupted = life.interrupted_prompt.take();
        self.store.save_lifecycle(&life)?;
        if life.pre_expiry_done {
            // Too late for new work: it saves what it has and ends with the session.
            self.drain(
                effects,
                DrainReason::SessionTimeout,
                life.hard_deadline_ms(),
            )?;
            return Ok(false);
        }
        if let Some(prompt_id) = interrupted {
            if self.running()?.is_some_and(|p| p.prompt_id == prompt_id) {
                let from = match self.sandbox()?.last_snapshot {
                    Some(id) => format!("snapshot {}", id.get(..12).unwrap_or(&id)),
                    None => "the repository".to_owned(),
                };
                self.notice_in(
                    effects,
                    "info",
                    &format!("resuming prompt {prompt_id} in a new sandbox restored from {from}"),
                )?;
            }
        }
        Ok(true)
    }

    /// The provider's end report, after the record was updated: a crash with work restarts the
    /// sandbox, any other end parks the session (or leaves an ended one ended).
    pub(crate) fn after_sandbox_ended(
        &mut self,
        effects: &mut Effects,
        crashed: bool,
    ) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        match life.phase {
            Phase::Ended | Phase::Parked | Phase::Failed => Ok(()),
            Phase::Draining { .. } => {
                life.phase = Phase::Parked;
                self.store.save_lifecycle(&life)?;
                Ok(())
            }
            Phase::Live | Phase::Starting { .. } if crashed => {
                self.lost(effects, "the sandbox ended unexpectedly", false, false)
            }
            Phase::Live | Phase::Starting { .. } => {
                life.phase = Phase::Parked;
                self.store.save_lifecycle(&life)?;
                Ok(())
            }
        }
    }

    /// `stop{session}`: the agent saves its work and the sandbox is released (the session parks).
    pub(crate) fn stop_sandbox(&mut self, effects: &mut Effects) -> Result<(), SessionError> {
        let life = self.lifecycle()?;
        if life.phase == Phase::Live {
            let until_ms = self.now_ms.saturating_add(life.settings.drain_ms);
            self.drain(effects, DrainReason::Stopped, until_ms)?;
        }
        Ok(())
    }

    /// After a `usage` event: at a ceiling, the running turn is stopped, the agent snapshots, everyone
    /// is told why, and no further prompt is dispatched (queued ones are kept).
    pub(crate) fn check_ceiling(&mut self, effects: &mut Effects) -> Result<(), SessionError> {
        let Some(mut life) = self.store.lifecycle()? else {
            return Ok(());
        };
        if life.ceiling_reached.is_some() {
            return Ok(());
        }
        let Some(why) = life.ceilings.breach(&self.store.usage()?) else {
            return Ok(());
        };
        life.ceiling_reached = Some(why.clone());
        self.store.save_lifecycle(&life)?;
        if let Some(running) = self.running()? {
            effects.to_agent.push(ServerToAgent::Stop {
                prompt_id: Some(running.prompt_id),
            });
        }
        effects.to_agent.push(ServerToAgent::Snapshot {
            reason: "cost_ceiling".to_owned(),
        });
        self.notice_in(
            effects,
            "warn",
            &format!("{why}: the turn was stopped and the work snapshotted; queued prompts wait"),
        )
    }

    /// Whether no prompt may be dispatched now: a ceiling was reached, or the sandbox is going away
    /// (draining) or gone (checked before every dispatch).
    pub(crate) fn dispatch_blocked(&self) -> Result<bool, SessionError> {
        Ok(self.store.lifecycle()?.is_some_and(|life| {
            life.ceiling_reached.is_some()
                || matches!(
                    life.phase,
                    Phase::Draining { .. } | Phase::Parked | Phase::Failed | Phase::Ended
                )
        }))
    }

    /// The newest total of `login`'s usage on `spend.day`, across their sessions (their `UserObject`
    /// answers every [`UsageReport`], and is asked before their prompts are accepted). At their daily
    /// ceiling their running turn is stopped and snapshotted, everyone is told once, and their queued
    /// prompts wait (others' prompts still run); a new day lifts it.
    pub fn user_spend(&mut self, login: &str, spend: DailySpend) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let mut life = self.lifecycle()?;
        let today = self.now_ms / DAY_MS;
        if spend.day != today {
            return Ok(effects);
        }
        let was_over = self.user_over(&life, login);
        life.user_spend.insert(login.to_owned(), spend);
        self.store.save_lifecycle(&life)?;
        match life.ceilings.user_breach(login, &spend) {
            Some(why) if !was_over => {
                if let Some(running) = self.running()?.filter(|p| p.author.login == login) {
                    effects.to_agent.push(ServerToAgent::Stop {
                        prompt_id: Some(running.prompt_id),
                    });
                    effects.to_agent.push(ServerToAgent::Snapshot {
                        reason: "cost_ceiling".to_owned(),
                    });
                }
                self.notice_in(
                    &mut effects,
                    "warn",
                    &format!("{why}: their running turn is stopped and their queued prompts wait until tomorrow (UTC)"),
                )?;
            }
            Some(_) => {}
            None => self.dispatch(&mut effects)?,
        }
        Ok(effects)
    }

    /// Logins at their daily ceiling today, as last known.
    pub(crate) fn users_at_ceiling(&self) -> Result<Vec<String>, SessionError> {
        let Some(life) = self.store.lifecycle()? else {
            return Ok(Vec::new());
        };
        Ok(life
            .user_spend
            .keys()
            .filter(|login| self.user_over(&life, login))
            .cloned()
            .collect())
    }

    fn user_over(&self, life: &Lifecycle, login: &str) -> bool {
        life.user_spend.get(login).is_some_and(|spend| {
            spend.day == self.now_ms / DAY_MS && life.ceilings.user_breach(login, spend).is_some()
        })
    }

    /// What a `usage` event adds to a person's day: the author of its prompt (or of the running one).
    pub(crate) fn usage_report(
        &self,
        prompt_id: Option<&str>,
        cost_usd: Option<f64>,
        tokens: u64,
    ) -> Result<Option<UsageReport>, SessionError> {
        let prompt = match prompt_id {
            Some(id) => self.store.prompt(id)?,
            None => self.running()?,
        };
        Ok(prompt.map(|p| UsageReport {
            login: p.author.login,
            day: self.now_ms / DAY_MS,
            cost_usd,
            tokens,
        }))
    }

    fn has_work(&self) -> Result<bool, SessionError> {
        Ok(!self.store.unfinished_prompts()?.is_empty())
    }

    /// Tell the agent to save its work and end by `until_ms`.
    fn drain(
        &mut self,
        effects: &mut Effects,
        reason: DrainReason,
        until_ms: u64,
    ) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        life.phase = Phase::Draining { reason, until_ms };
        self.store.save_lifecycle(&life)?;
        effects.to_agent.push(ServerToAgent::Shutdown {
            reason: reason.as_str().to_owned(),
            deadline_ms: until_ms,
        });
        let detail = match reason {
            DrainReason::SessionTimeout => "saving work before the session's time limit",
            DrainReason::Idle => "idle: saving work and releasing the sandbox",
            DrainReason::WarmupExpired => "no prompt came: saving work and releasing the sandbox",
            DrainReason::Stopped => "stopped: saving work and releasing the sandbox",
        };
        self.set_sandbox_status(effects, SandboxStatus::Snapshotting, detail)
    }

    /// Ask for a new sandbox (attempt `attempt` in a row).
    fn request(
        &mut self,
        effects: &mut Effects,
        attempt: u32,
        why: &str,
    ) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        life.phase = Phase::Starting {
            attempt,
            due_ms: self.now_ms.saturating_add(life.settings.connect_timeout_ms),
        };
        self.store.save_lifecycle(&life)?;
        let from = match self.sandbox()?.last_snapshot {
            Some(id) => format!("restoring snapshot {}", id.get(..12).unwrap_or(&id)),
            None => "from the repository".to_owned(),
        };
        self.set_sandbox_status(
            effects,
            SandboxStatus::Starting,
            &format!("requesting a sandbox ({why}; attempt {attempt}, {from})"),
        )?;
        effects.sandbox.push(SandboxAction::Create);
        Ok(())
    }

    /// The session reaches its hard limit: the sandbox is deleted (the provider extracts its work
    /// first), the running prompt is stopped, queued prompts are cancelled, and the session takes no
    /// more prompts.
    fn end(&mut self, effects: &mut Effects) -> Result<(), SessionError> {
        let mut life = self.lifecycle()?;
        let had_sandbox = matches!(
            life.phase,
            Phase::Live | Phase::Starting { .. } | Phase::Draining { .. }
        );
        life.phase = Phase::Ended;
        life.warmup_due_ms = None;
        self.store.save_lifecycle(&life)?;
        if had_sandbox {
            if let Some(sandbox_id) = self.sandbox()?.sandbox_id {
                effects.sandbox.push(SandboxAction::Delete { sandbox_id });
            }
        }
        for prompt in self.store.unfinished_prompts()? {
            let running = prompt.status == PromptStatus::Running;
            let status = if running {
                PromptStatus::Stopped
            } else {
                PromptStatus::Cancelled
            };
            self.store
                .set_prompt_status(&prompt.prompt_id, status, self.now_ms)?;
            let event = if running {
                Event::PromptFinished {
                    prompt_id: prompt.prompt_id,
                    status,
                    error: Some("the session reached its time limit".to_owned()),
                }
            } else {
                Event::PromptCancelled {
                    prompt_id: prompt.prompt_id,
                    by: None,
                }
            };
            self.log(effects, event)?;
        }
        let limit = human_duration(life.settings.hard_timeout_ms);
        let saved = match self.sandbox()?.last_snapshot {
            Some(id) => format!("its work is in snapshot {}", id.get(..12).unwrap_or(&id)),
            None => "no snapshot was taken".to_owned(),
        };
        self.set_sandbox_status(
            effects,
            SandboxStatus::Stopped,
            &format!("the session reached its time limit ({limit}); {saved}"),
        )
    }

    /// Forget the current sandbox id (so a late report about it changes nothing); returns it.
    fn take_sandbox_id(&mut self) -> Result<Option<String>, SessionError> {
        let mut sandbox = self.sandbox()?;
        let old = sandbox.sandbox_id.take();
        if old.is_some() {
            self.store.save_sandbox(&sandbox)?;
        }
        Ok(old)
    }

    fn notice_in(
        &mut self,
        effects: &mut Effects,
        level: &str,
        text: &str,
    ) -> Result<(), SessionError> {
        self.log(
            effects,
            Event::Notice {
                level: level.to_owned(),
                text: text.to_owned(),
            },
        )
    }
}

impl Effects {
    /// Append `other`'s effects after these.
    pub fn merge(&mut self, other: Effects) {
        self.events.extend(other.events);
        self.to_agent.extend(other.to_agent);
        self.sandbox.extend(other.sandbox);
        self.close_agent |= other.close_agent;
        self.usage_reports.extend(other.usage_reports);
    }
}

//! The session's decisions: what happens to a prompt, an agent event, a connection, a stop.
//!
//! Each operation reads and writes the [`Store`] and returns [`Effects`]: the events it logged (already
//! stored, to be broadcast to clients in order) and the messages for the agent. The caller persists nothing
//! itself and decides nothing; it only delivers.

use nightshift_protocol::http::{SandboxState, SessionState, UsageTotals};
use nightshift_protocol::provider::SandboxEnded;
use nightshift_protocol::{
    Author, ErrorCode, Event, EventEnvelope, Participant, PromptStatus, QueuedPrompt, Role,
    SandboxStatus, ServerToAgent, SessionInfo, StopScope, MAX_PROMPT_BYTES,
};

use crate::ceiling::UsageReport;
use crate::children::TreeStop;
use crate::lifecycle::SandboxAction;
use crate::store::{Member, PromptRecord, SandboxRecord, Store};
use crate::SessionError;

/// At most this many unfinished (queued or running) prompts per session.
pub const MAX_UNFINISHED_PROMPTS: usize = 10;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// What an operation asks the caller to deliver.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// Events logged by the operation, in `seq` order; broadcast them to every client.
    pub events: Vec<EventEnvelope>,
    /// Messages for the agent, in order; dropped when no agent is connected (it catches up on `hello`).
    pub to_agent: Vec<ServerToAgent>,
    /// Provider calls to make, in order (see [`SandboxAction`]).
    pub sandbox: Vec<SandboxAction>,
    /// Close the agent's socket (it stopped answering and its sandbox is being replaced).
    pub close_agent: bool,
    /// Usage to add to the day of the person whose prompt used it (their `UserObject`); the object
    /// answers with [`Session::user_spend`].
    pub usage_reports: Vec<UsageReport>,
    /// Children to stop with `stop{tree}`, with who stopped (each stops its own subtree in turn).
    pub stop_children: Vec<TreeStop>,
}

/// Answer to a prompt submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// Prompt id.
    pub prompt_id: String,
    /// Zero when it runs now; otherwise how many unfinished prompts are ahead of it.
    pub position: u32,
    /// Whether this was a re-send of an earlier prompt (same author and idempotency key).
    pub duplicate: bool,
}

/// One session's logic over a store, at one moment.
pub struct Session<'s, S: Store> {
    pub(crate) store: &'s mut S,
    pub(crate) now_ms: u64,
}

impl<'s, S: Store> Session<'s, S> {
    /// The session in `store` as of `now_ms`.
    pub fn new(store: &'s mut S, now_ms: u64) -> Self {
        Session { store, now_ms }
    }

    /// Create the session: record it, make `creator` its owner, and log `sandbox_status{starting}`.
    pub fn create(
        &mut self,
        info: SessionInfo,
        sandbox_token_hash: String,
    ) -> Result<Effects, SessionError> {
        if self.store.session()?.is_some() {
            return Err(SessionError::AlreadyExists);
        }
        self.store.insert_session(&info)?;
        self.store.upsert_member(&Member {
            author: info.created_by.clone(),
            role: Role::Owner,
            joined_ms: self.now_ms,
        })?;
        self.store.save_sandbox(&SandboxRecord {
            sandbox_id: None,
            status: SandboxStatus::Starting,
            detail: String::new(),
            token_hash: sandbox_token_hash,
            last_producer_seq: 0,
            last_snapshot: None,
        })?;
        let mut effects = Effects::default();
        self.log(
            &mut effects,
            Event::SandboxStatus {
                status: SandboxStatus::Starting,
                detail: "requesting a sandbox".to_owned(),
            },
        )?;
        Ok(effects)
    }

    /// The session's description; [`SessionError::NotFound`] before `create`.
    pub fn info(&self) -> Result<SessionInfo, SessionError> {
        self.store.session()?.ok_or(SessionError::NotFound)
    }

    /// The member with this login, if any.
    pub fn member(&self, login: &str) -> Result<Option<Member>, SessionError> {
        Ok(self
            .store
            .members()?
            .into_iter()
            .find(|m| m.author.login == login))
    }

    /// Add `author` as a member (no-op for an existing member, whose name and email are refreshed).
    pub fn join(&mut self, author: &Author) -> Result<Member, SessionError> {
        self.info()?;
        let member = match self.member(&author.login)? {
            Some(existing) => Member {
                author: author.clone(),
                ..existing
            },
            None => Member {
                author: author.clone(),
                role: Role::Member,
                joined_ms: self.now_ms,
            },
        };
        self.store.upsert_member(&member)?;
        Ok(member)
    }

    /// Everyone in the session, with `online` set for the logins in `online_logins`.
    pub fn participants(&self, online_logins: &[String]) -> Result<Vec<Participant>, SessionError> {
        Ok(crate::presence::participants(
            &self.store.members()?,
            online_logins,
        ))
    }

    /// Queued and running prompts, oldest first.
    pub fn queue(&self) -> Result<Vec<QueuedPrompt>, SessionError> {
        Ok(self
            .store
            .unfinished_prompts()?
            .into_iter()
            .map(|p| QueuedPrompt {
                prompt_id: p.prompt_id,
                author: p.author,
                text: p.text,
                status: p.status,
                created_ms: p.created_ms,
            })
            .collect())
    }

    /// Highest `seq` in the log.
    pub fn last_seq(&self) -> Result<u64, SessionError> {
        Ok(self.store.last_seq()?)
    }

    /// Up to `limit` logged events after `after_seq`, in order.
    pub fn replay(&self, after_seq: u64, limit: u32) -> Result<Vec<EventEnvelope>, SessionError> {
        Ok(self.store.events_after(after_seq, limit)?)
    }

    /// The whole state, as `GET /api/sessions/{id}` shows it.
    pub fn state(
        &self,
        online_logins: &[String],
        agent_connected: bool,
    ) -> Result<SessionState, SessionError> {
        let sandbox = self.sandbox()?;
        Ok(SessionState {
            session: self.info()?,
            participants: self.participants(online_logins)?,
            queue: self.queue()?,
            sandbox: SandboxState {
                id: sandbox.sandbox_id,
                status: sandbox.status,
                detail: sandbox.detail,
                agent_connected,
                last_snapshot: sandbox.last_snapshot,
            },
            last_seq: self.last_seq()?,
            usage: self.store.usage()?,
            lifecycle: Some(self.lifecycle_state()?),
        })
    }

    /// The stored sandbox token hash, for authenticating the agent.
    pub fn sandbox_token_hash(&self) -> Result<String, SessionError> {
        Ok(self.sandbox()?.token_hash)
    }

    /// Accept a prompt from `author`. A re-send with the same idempotency key returns the original.
    pub fn submit_prompt(
        &mut self,
        author: &Author,
        text: &str,
        idempotency_key: &str,
        agent_online: bool,
    ) -> Result<(Submitted, Effects), SessionError> {
        self.info()?;
        if self.ended()? {
            return Err(SessionError::Conflict(
                "the session has ended: it reached its time limit".to_owned(),
            ));
        }
        if text.trim().is_empty() {
            return Err(SessionError::Invalid("prompt text is empty".to_owned()));
        }
        if text.len() > MAX_PROMPT_BYTES {
            return Err(SessionError::Invalid(format!(
                "prompt text exceeds {MAX_PROMPT_BYTES} bytes"
            )));
        }
        if idempotency_key.is_empty() || idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(SessionError::Invalid(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
        if let Some(existing) = self.store.prompt_by_key(&author.login, idempotency_key)? {
            let position = self.position(&existing.prompt_id)?;
            return Ok((
                Submitted {
                    prompt_id: existing.prompt_id,
                    position,
                    duplicate: true,
                },
                Effects::default(),
            ));
        }
        if self.store.unfinished_prompts()?.len() >= MAX_UNFINISHED_PROMPTS {
            return Err(SessionError::QueueFull {
                limit: MAX_UNFINISHED_PROMPTS,
            });
        }
        let prompt_id = format!("p{}", self.store.prompt_count()? + 1);
        self.store.insert_prompt(&PromptRecord {
            prompt_id: prompt_id.clone(),
            author: author.clone(),
            text: text.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            status: PromptStatus::Queued,
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
        })?;
        let mut effects = Effects::default();
        self.log(
            &mut effects,
            Event::PromptQueued {
                prompt_id: prompt_id.clone(),
                author: author.clone(),
                text: text.to_owned(),
            },
        )?;
        self.prompt_arrived(&mut effects)?;
        if agent_online {
            self.dispatch(&mut effects)?;
        }
        let position = self.position(&prompt_id)?;
        Ok((
            Submitted {
                prompt_id,
                position,
                duplicate: false,
            },
            effects,
        ))
    }

    /// Remove a queued prompt. A running prompt is stopped with `stop{turn}` instead.
    pub fn cancel_prompt(&mut self, by: &Author, prompt_id: &str) -> Result<Effects, SessionError> {
        let prompt = self
            .store
            .prompt(prompt_id)?
            .ok_or(SessionError::UnknownPrompt(prompt_id.to_owned()))?;
        match prompt.status {
            PromptStatus::Queued => {}
            PromptStatus::Running => {
                return Err(SessionError::Conflict(format!(
                    "prompt {prompt_id} is running; stop the turn instead"
                )))
            }
            _ => {
                return Err(SessionError::Conflict(format!(
                    "prompt {prompt_id} has already finished"
                )))
            }
        }
        self.store
            .set_prompt_status(prompt_id, PromptStatus::Cancelled, self.now_ms)?;
        let mut effects = Effects::default();
        self.log(
            &mut effects,
            Event::PromptCancelled {
                prompt_id: prompt_id.to_owned(),
                by: Some(by.login.clone()),
            },
        )?;
        Ok(effects)
    }

    /// Stop work in `scope`: `turn` stops the running prompt; `session` and `tree` also cancel the queue
    /// and release the sandbox; `tree` also names every child in `Effects.stop_children`.
    pub fn stop(&mut self, by: &Author, scope: StopScope) -> Result<Effects, SessionError> {
        self.info()?;
        let mut effects = Effects::default();
        let unfinished = self.store.unfinished_prompts()?;
        if matches!(scope, StopScope::Session | StopScope::Tree) {
            for prompt in unfinished
                .iter()
                .filter(|p| p.status == PromptStatus::Queued)
            {
                self.store.set_prompt_status(
                    &prompt.prompt_id,
                    PromptStatus::Cancelled,
                    self.now_ms,
                )?;
                self.log(
                    &mut effects,
                    Event::PromptCancelled {
                        prompt_id: prompt.prompt_id.clone(),
                        by: Some(by.login.clone()),
                    },
                )?;
            }
        }
        if let Some(running) = unfinished
            .iter()
            .find(|p| p.status == PromptStatus::Running)
        {
            effects.to_agent.push(ServerToAgent::Stop {
                prompt_id: Some(running.prompt_id.clone()),
            });
        }
        if matches!(scope, StopScope::Session | StopScope::Tree) {
            self.stop_sandbox(&mut effects)?;
        }
        if scope == StopScope::Tree {
            effects.stop_children = self
                .children()?
                .into_iter()
                .map(|c| TreeStop {
                    session_id: c.id,
                    by: by.clone(),
                })
                .collect();
        }
        Ok(effects)
    }

    /// The provider accepted the sandbox request.
    pub fn sandbox_requested(&mut self, sandbox_id: &str) -> Result<Effects, SessionError> {
        let mut sandbox = self.sandbox()?;
        sandbox.sandbox_id = Some(sandbox_id.to_owned());
        self.store.save_sandbox(&sandbox)?;
        Ok(Effects::default())
    }

    /// The sandbox could not be started or died.
    pub fn sandbox_failed(&mut self, detail: &str) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        self.set_sandbox_status(&mut effects, SandboxStatus::Failed, detail)?;
        Ok(effects)
    }

    /// The provider reports that the session's sandbox ended — stopped (on request, at its time
    /// limit, at the provider's shutdown) or exited (its agent crashed or was killed) — with the
    /// snapshot taken as it ended. The snapshot becomes the session's newest (a `snapshot` event when
    /// the agent did not log it already), the sandbox's status says how it ended and names the
    /// snapshot, and an unexpected end (not while draining) is a warning everyone sees. A report
    /// about another sandbox than the session's current one (a late report of a replaced sandbox)
    /// changes nothing.
    pub fn sandbox_ended(&mut self, ended: &SandboxEnded) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let mut sandbox = self.sandbox()?;
        if sandbox.sandbox_id.as_deref() != Some(ended.sandbox_id.as_str()) {
            return Ok(effects);
        }
        if let Some(id) = &ended.snapshot_id {
            if sandbox.last_snapshot.as_deref() != Some(id.as_str()) {
                sandbox.last_snapshot = Some(id.clone());
                self.store.save_sandbox(&sandbox)?;
                self.log(
                    &mut effects,
                    Event::Snapshot {
                        id: id.clone(),
                        reason: "sandbox_ended".to_owned(),
                    },
                )?;
            }
        }
        let saved = match &ended.snapshot_id {
            Some(id) => format!("its work is in snapshot {}", short_id(id)),
            None => "no snapshot could be taken".to_owned(),
        };
        let detail = ended.detail.chars().take(300).collect::<String>();
        // A draining sandbox was told to end (its agent exits by itself once its work is out): however
        // it ends, that is the stop the session asked for, not a crash.
        let draining = matches!(
            self.store.lifecycle()?.map(|life| life.phase),
            Some(crate::deadline::Phase::Draining { .. })
        );
        let crashed = ended.status != "stopped" && !draining;
        let (status, detail) = if crashed {
            (
                SandboxStatus::Failed,
                format!("the sandbox ended unexpectedly ({detail}); {saved}"),
            )
        } else {
            (
                SandboxStatus::Stopped,
                format!("the sandbox stopped ({detail}); {saved}"),
            )
        };
        self.set_sandbox_status(&mut effects, status, &detail)?;
        if crashed {
            self.log(
                &mut effects,
                Event::Notice {
                    level: "warn".to_owned(),
                    text: detail,
                },
            )?;
        }
        self.after_sandbox_ended(&mut effects, crashed)?;
        Ok(effects)
    }

    /// Log a `notice` that everyone in the session sees (`level`: `info`, `warn` or `error`).
    pub fn notice(&mut self, level: &str, text: &str) -> Result<Effects, SessionError> {
        self.info()?;
        let mut effects = Effects::default();
        self.log(
            &mut effects,
            Event::Notice {
                level: level.to_owned(),
                text: text.to_owned(),
            },
        )?;
        Ok(effects)
    }

    /// The agent authenticated and said `hello`: welcome it, mark the sandbox ready, resume or start work.
    pub fn agent_connected(&mut self) -> Result<Effects, SessionError> {
        let info = self.info()?;
        let sandbox = self.sandbox()?;
        let mut effects = Effects::default();
        effects.to_agent.push(ServerToAgent::Welcome {
            session: info.id,
            last_producer_seq: sandbox.last_producer_seq,
        });
        if !self.agent_arrived(&mut effects)? {
            return Ok(effects);
        }
        if sandbox.status != SandboxStatus::Ready {
            self.set_sandbox_status(&mut effects, SandboxStatus::Ready, "agent connected")?;
        }
        // A prompt dispatched before a reconnect is sent again; the agent ignores prompt ids it already has.
        if let Some(running) = self.running()? {
            effects
                .to_agent
                .push(run_prompt(&running, &self.info()?.model));
        } else {
            self.dispatch(&mut effects)?;
        }
        Ok(effects)
    }

    /// Apply one event from the agent, exactly once per `producer_seq`.
    pub fn apply_agent_event(
        &mut self,
        producer_seq: u64,
        event: Event,
    ) -> Result<Effects, SessionError> {
        let mut effects = Effects::default();
        let last = self.sandbox()?.last_producer_seq;
        if producer_seq != last + 1 {
            // A duplicate is acknowledged again; a gap gets the highest applied seq so the agent re-sends.
            effects
                .to_agent
                .push(ServerToAgent::Ack { producer_seq: last });
            return Ok(effects);
        }
        self.store.set_last_producer_seq(producer_seq)?;
        self.heard_from_agent(true)?;
        effects.to_agent.push(ServerToAgent::Ack { producer_seq });
        match event {
            Event::PromptQueued { .. } | Event::PromptCancelled { .. } => {
                effects.to_agent.push(ServerToAgent::Error {
                    code: ErrorCode::InvalidMessage,
                    message: format!(
                        "`{}` events are logged by the session, not the agent",
                        event.kind()
                    ),
                });
            }
            Event::PromptStarted { .. } => {
                self.log(&mut effects, event)?;
            }
            Event::Snapshot { ref id, .. } => {
                let mut sandbox = self.sandbox()?;
                sandbox.last_snapshot = Some(id.clone());
                self.store.save_sandbox(&sandbox)?;
                self.log(&mut effects, event)?;
            }
            Event::PromptFinished {
                ref prompt_id,
                status,
                ..
            } => {
                if !self.is_running(prompt_id)? {
                    // Already settled (e.g. the agent re-sent after a restart): keep the record, change nothing.
                    self.log(&mut effects, event)?;
                    return Ok(effects);
                }
                let status = if status.is_final() && status != PromptStatus::Cancelled {
                    status
                } else {
                    PromptStatus::Failed
                };
                self.store
                    .set_prompt_status(prompt_id, status, self.now_ms)?;
                self.log(&mut effects, event)?;
                self.dispatch(&mut effects)?;
            }
            Event::Usage {
                prompt_id,
                input_tokens,
                output_tokens,
                cache_read_tokens,
                cache_write_tokens,
                cost_usd,
                ..
            } => {
                let report = self.usage_report(
                    prompt_id.as_deref(),
                    cost_usd,
                    input_tokens.saturating_add(output_tokens),
                )?;
                let previous = self.store.usage()?;
                let first = previous.input_tokens == 0
                    && previous.output_tokens == 0
                    && previous.cost_usd.is_none();
                let total_cost_usd = match (previous.cost_usd, cost_usd) {
                    (Some(total), Some(cost)) => Some(total + cost),
                    (None, Some(cost)) if first => Some(cost),
                    _ => None,
                };
                self.store.save_usage(&UsageTotals {
                    input_tokens: previous.input_tokens.saturating_add(input_tokens),
                    output_tokens: previous.output_tokens.saturating_add(output_tokens),
                    cost_usd: total_cost_usd,
                })?;
                self.log(
                    &mut effects,
                    Event::Usage {
                        prompt_id,
                        input_tokens,
                        output_tokens,
                        cache_read_tokens,
                        cache_write_tokens,
                        cost_usd,
                        total_cost_usd,
                    },
                )?;
                self.check_ceiling(&mut effects)?;
                effects.usage_reports.extend(report);
            }
            Event::SandboxStatus { status, ref detail } => {
                let detail = detail.clone();
                self.set_sandbox_status(&mut effects, status, &detail)?;
            }
            other => {
                self.log(&mut effects, other)?;
            }
        }
        Ok(effects)
    }

    fn is_running(&self, prompt_id: &str) -> Result<bool, SessionError> {
        Ok(self
            .store
            .prompt(prompt_id)?
            .is_some_and(|p| p.status == PromptStatus::Running))
    }

    pub(crate) fn set_sandbox_status(
        &mut self,
        effects: &mut Effects,
        status: SandboxStatus,
        detail: &str,
    ) -> Result<(), SessionError> {
        let mut sandbox = self.sandbox()?;
        sandbox.status = status;
        sandbox.detail = detail.to_owned();
        self.store.save_sandbox(&sandbox)?;
        self.log(
            effects,
            Event::SandboxStatus {
                status,
                detail: detail.to_owned(),
            },
        )?;
        Ok(())
    }

    pub(crate) fn sandbox(&self) -> Result<SandboxRecord, SessionError> {
        self.store.sandbox()?.ok_or(SessionError::NotFound)
    }

    pub(crate) fn running(&self) -> Result<Option<PromptRecord>, SessionError> {
        Ok(self
            .store
            .unfinished_prompts()?
            .into_iter()
            .find(|p| p.status == PromptStatus::Running))
    }

    /// Send the oldest queued prompt to the agent when nothing runs.
    pub(crate) fn dispatch(&mut self, effects: &mut Effects) -> Result<(), SessionError> {
        let unfinished = self.store.unfinished_prompts()?;
        if unfinished.iter().any(|p| p.status == PromptStatus::Running) {
            return Ok(());
        }
        if self.sandbox()?.status != SandboxStatus::Ready || self.dispatch_blocked()? {
            return Ok(());
        }
        let blocked = self.users_at_ceiling()?;
        if let Some(next) = unfinished
            .into_iter()
            .find(|p| p.status == PromptStatus::Queued && !blocked.contains(&p.author.login))
        {
            self.store
                .set_prompt_status(&next.prompt_id, PromptStatus::Running, self.now_ms)?;
            effects
                .to_agent
                .push(run_prompt(&next, &self.info()?.model));
        }
        Ok(())
    }

    fn position(&self, prompt_id: &str) -> Result<u32, SessionError> {
        let unfinished = self.store.unfinished_prompts()?;
        let index = unfinished
            .iter()
            .position(|p| p.prompt_id == prompt_id)
            .unwrap_or(0);
        Ok(u32::try_from(index).unwrap_or(u32::MAX))
    }

    pub(crate) fn log(&mut self, effects: &mut Effects, event: Event) -> Result<(), SessionError> {
        let seq = self.store.append_event(self.now_ms, &event)?;
        effects.events.push(EventEnvelope {
            seq,
            ts_ms: self.now_ms,
            event,
        });
        Ok(())
    }
}

fn run_prompt(prompt: &PromptRecord, model: &str) -> ServerToAgent {
    ServerToAgent::RunPrompt {
        prompt_id: prompt.prompt_id.clone(),
        text: prompt.text.clone(),
        author: prompt.author.clone(),
        model: model.to_owned(),
    }
}

/// The first 12 characters of a content id, as people read it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

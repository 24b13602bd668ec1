//! The storage port: what the session logic needs to persist, and an in-memory implementation for tests.
//!
//! The Durable Object implements [`Store`] over its embedded SQLite; every method is synchronous because
//! SQLite in a Durable Object is.

use nightshift_protocol::http::UsageTotals;

use crate::children::Family;
use crate::deadline::Lifecycle;
use nightshift_protocol::{
    Author, Event, EventEnvelope, PromptStatus, Role, SandboxStatus, SessionInfo,
};

/// A storage failure, with the backend's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage failed: {0}")]
pub struct StoreError(pub String);

/// A prompt as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptRecord {
    /// Prompt id (`p1`, `p2`, … within the session).
    pub prompt_id: String,
    /// Who sent it.
    pub author: Author,
    /// The text.
    pub text: String,
    /// The sender's idempotency key (unique per author).
    pub idempotency_key: String,
    /// Where it is in its life.
    pub status: PromptStatus,
    /// When it was accepted.
    pub created_ms: u64,
    /// When it last changed status.
    pub updated_ms: u64,
}

/// A member of the session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Who.
    pub author: Author,
    /// Their role.
    pub role: Role,
    /// When they joined.
    pub joined_ms: u64,
}

/// The session's sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxRecord {
    /// Provider's id, once known.
    pub sandbox_id: Option<String>,
    /// Current state.
    pub status: SandboxStatus,
    /// Human detail.
    pub detail: String,
    /// SHA-256 (hex) of the sandbox token; the token itself is never stored.
    pub token_hash: String,
    /// Highest `producer_seq` applied.
    pub last_producer_seq: u64,
    /// The newest snapshot of the session's work (from the agent's `snapshot` events and the
    /// provider's end report), to restore it from.
    pub last_snapshot: Option<String>,
}

/// What the session logic persists. Implementations must make `append_event` assign contiguous `seq`s.
pub trait Store {
    /// The session, if it was created.
    fn session(&self) -> Result<Option<SessionInfo>, StoreError>;
    /// Record the session (once).
    fn insert_session(&mut self, info: &SessionInfo) -> Result<(), StoreError>;

    /// Append an event; returns its `seq` (previous highest + 1).
    fn append_event(&mut self, ts_ms: u64, event: &Event) -> Result<u64, StoreError>;
    /// Up to `limit` events with `seq > after_seq`, in order.
    fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<EventEnvelope>, StoreError>;
    /// Highest `seq`, 0 when the log is empty.
    fn last_seq(&self) -> Result<u64, StoreError>;

    /// Number of prompts ever accepted.
    fn prompt_count(&self) -> Result<u64, StoreError>;
    /// Record a new prompt.
    fn insert_prompt(&mut self, prompt: &PromptRecord) -> Result<(), StoreError>;
    /// A prompt by id.
    fn prompt(&self, prompt_id: &str) -> Result<Option<PromptRecord>, StoreError>;
    /// A prompt by its author's idempotency key.
    fn prompt_by_key(
        &self,
        login: &str,
        idempotency_key: &str,
    ) -> Result<Option<PromptRecord>, StoreError>;
    /// Change a prompt's status.
    fn set_prompt_status(
        &mut self,
        prompt_id: &str,
        status: PromptStatus,
        ts_ms: u64,
    ) -> Result<(), StoreError>;
    /// Queued and running prompts, oldest first.
    fn unfinished_prompts(&self) -> Result<Vec<PromptRecord>, StoreError>;

    /// Every member, in joining order.
    fn members(&self) -> Result<Vec<Member>, StoreError>;
    /// Add a member, or refresh name/email of an existing one (role unchanged).
    fn upsert_member(&mut self, member: &Member) -> Result<(), StoreError>;

    /// The sandbox record (created with the session).
    fn sandbox(&self) -> Result<Option<SandboxRecord>, StoreError>;
    /// Replace the sandbox record.
    fn save_sandbox(&mut self, sandbox: &SandboxRecord) -> Result<(), StoreError>;
    /// Record the highest applied `producer_seq` (the hot path of every agent event).
    fn set_last_producer_seq(&mut self, producer_seq: u64) -> Result<(), StoreError>;

    /// Usage totals.
    fn usage(&self) -> Result<UsageTotals, StoreError>;
    /// Replace the usage totals.
    fn save_usage(&mut self, usage: &UsageTotals) -> Result<(), StoreError>;

    /// Record an invite (its secret only as a hash).
    fn insert_invite(&mut self, invite: &InviteRecord) -> Result<(), StoreError>;
    /// The invite whose secret has this hash.
    fn invite_by_hash(&self, secret_hash: &str) -> Result<Option<InviteRecord>, StoreError>;
    /// Every invite, newest first.
    fn invites(&self) -> Result<Vec<InviteRecord>, StoreError>;
    /// Mark invite `invite_id` revoked at `ts_ms` (no-op when it is already revoked).
    fn revoke_invite(&mut self, invite_id: &str, ts_ms: u64) -> Result<(), StoreError>;

    /// What was last written to the cross-session index, if anything.
    fn index_mark(&self) -> Result<Option<IndexMark>, StoreError>;
    /// Remember what was last written to the cross-session index.
    fn save_index_mark(&mut self, mark: &IndexMark) -> Result<(), StoreError>;

    /// The lifecycle record (deadline inputs), once the session's lifecycle began.
    fn lifecycle(&self) -> Result<Option<Lifecycle>, StoreError>;
    /// Replace the lifecycle record.
    fn save_lifecycle(&mut self, lifecycle: &Lifecycle) -> Result<(), StoreError>;

    /// The session's place in its tree and its children, once it has either.
    fn family(&self) -> Result<Option<Family>, StoreError>;
    /// Replace the family record.
    fn save_family(&mut self, family: &Family) -> Result<(), StoreError>;
}

/// An invite link as stored: the secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InviteRecord {
    /// Public id (a prefix of the hash), to list and revoke it.
    pub id: String,
    /// SHA-256 (hex) of the secret in the link.
    pub secret_hash: String,
    /// Login of the participant who created it.
    pub created_by: String,
    /// When it was created.
    pub created_ms: u64,
    /// When it stops working.
    pub expires_ms: u64,
    /// When an owner revoked it.
    pub revoked_ms: Option<u64>,
}

/// What the session last wrote to the cross-session index (see [`crate::index`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexMark {
    /// Status written.
    pub status: nightshift_protocol::http::SessionStatus,
    /// Last activity written.
    pub last_activity_ms: u64,
    /// Participants written (count; a join changes it).
    pub participants: u32,
    /// The session's pull request, from its newest `pull_request` event.
    #[serde(default)]
    pub pull_request_url: Option<String>,
}

/// A [`Store`] in memory, for tests and tools.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    session: Option<SessionInfo>,
    events: Vec<EventEnvelope>,
    prompts: Vec<PromptRecord>,
    members: Vec<Member>,
    sandbox: Option<SandboxRecord>,
    usage: UsageTotals,
    invites: Vec<InviteRecord>,
    index_mark: Option<IndexMark>,
    lifecycle: Option<Lifecycle>,
    family: Option<Family>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn session(&self) -> Result<Option<SessionInfo>, StoreError> {
        Ok(self.session.clone())
    }

    fn insert_session(&mut self, info: &SessionInfo) -> Result<(), StoreError> {
        if self.session.is_some() {
            return Err(StoreError("session exists".to_owned()));
        }
        self.session = Some(info.clone());
        Ok(())
    }

    fn append_event(&mut self, ts_ms: u64, event: &Event) -> Result<u64, StoreError> {
        let seq = self.events.len() as u64 + 1;
        self.events.push(EventEnvelope {
            seq,
            ts_ms,
            event: event.clone(),
        });
        Ok(seq)
    }

    fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<EventEnvelope>, StoreError> {
        Ok(self
            .events
            .iter()
            .filter(|e| e.seq > after_seq)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.events.len() as u64)
    }

    fn prompt_count(&self) -> Result<u64, StoreError> {
        Ok(self.prompts.len() as u64)
    }

    fn insert_prompt(&mut self, prompt: &PromptRecord) -> Result<(), StoreError> {
        self.prompts.push(prompt.clone());
        Ok(())
    }

    fn prompt(&self, prompt_id: &str) -> Result<Option<PromptRecord>, StoreError> {
        Ok(self
            .prompts
            .iter()
            .find(|p| p.prompt_id == prompt_id)
            .cloned())
    }

    fn prompt_by_key(
        &self,
        login: &str,
        idempotency_key: &str,
    ) -> Result<Option<PromptRecord>, StoreError> {
        Ok(self
            .prompts
            .iter()
            .find(|p| p.author.login == login && p.idempotency_key == idempotency_key)
            .cloned())
    }

    fn set_prompt_status(
        &mut self,
        prompt_id: &str,
        status: PromptStatus,
        ts_ms: u64,
    ) -> Result<(), StoreError> {
        let prompt = self
            .prompts
            .iter_mut()
            .find(|p| p.prompt_id == prompt_id)
            .ok_or_else(|| StoreError(format!("no prompt {prompt_id}")))?;
        prompt.status = status;
        prompt.updated_ms = ts_ms;
        Ok(())
    }

    fn unfinished_prompts(&self) -> Result<Vec<PromptRecord>, StoreError> {
        Ok(self
            .prompts
            .iter()
            .filter(|p| !p.status.is_final())
            .cloned()
            .collect())
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        Ok(self.members.clone())
    }

    fn upsert_member(&mut self, member: &Member) -> Result<(), StoreError> {
        match self
            .members
            .iter_mut()
            .find(|m| m.author.login == member.author.login)
        {
            Some(existing) => existing.author = member.author.clone(),
            None => self.members.push(member.clone()),
        }
        Ok(())
    }

    fn sandbox(&self) -> Result<Option<SandboxRecord>, StoreError> {
        Ok(self.sandbox.clone())
    }

    fn save_sandbox(&mut self, sandbox: &SandboxRecord) -> Result<(), StoreError> {
        self.sandbox = Some(sandbox.clone());
        Ok(())
    }

    fn set_last_producer_seq(&mut self, producer_seq: u64) -> Result<(), StoreError> {
        let sandbox = self
            .sandbox
            .as_mut()
            .ok_or_else(|| StoreError("no sandbox".to_owned()))?;
        sandbox.last_producer_seq = producer_seq;
        Ok(())
    }

    fn usage(&self) -> Result<UsageTotals, StoreError> {
        Ok(self.usage.clone())
    }

    fn save_usage(&mut self, usage: &UsageTotals) -> Result<(), StoreError> {
        self.usage = usage.clone();
        Ok(())
    }

    fn insert_invite(&mut self, invite: &InviteRecord) -> Result<(), StoreError> {
        if self
            .invites
            .iter()
            .any(|i| i.id == invite.id || i.secret_hash == invite.secret_hash)
        {
            return Err(StoreError("invite exists".to_owned()));
        }
        self.invites.push(invite.clone());
        Ok(())
    }

    fn invite_by_hash(&self, secret_hash: &str) -> Result<Option<InviteRecord>, StoreError> {
        Ok(self
            .invites
            .iter()
            .find(|i| i.secret_hash == secret_hash)
            .cloned())
    }

    fn invites(&self) -> Result<Vec<InviteRecord>, StoreError> {
        Ok(self.invites.iter().rev().cloned().collect())
    }

    fn revoke_invite(&mut self, invite_id: &str, ts_ms: u64) -> Result<(), StoreError> {
        if let Some(invite) = self.invites.iter_mut().find(|i| i.id == invite_id) {
            invite.revoked_ms.get_or_insert(ts_ms);
        }
        Ok(())
    }

    fn index_mark(&self) -> Result<Option<IndexMark>, StoreError> {
        Ok(self.index_mark.clone())
    }

    fn save_index_mark(&mut self, mark: &IndexMark) -> Result<(), StoreError> {
        self.index_mark = Some(mark.clone());
        Ok(())
    }

    fn lifecycle(&self) -> Result<Option<Lifecycle>, StoreError> {
        Ok(self.lifecycle.clone())
    }

    fn save_lifecycle(&mut self, lifecycle: &Lifecycle) -> Result<(), StoreError> {
        self.lifecycle = Some(lifecycle.clone());
        Ok(())
    }

    fn family(&self) -> Result<Option<Family>, StoreError> {
        Ok(self.family.clone())
    }

    fn save_family(&mut self, family: &Family) -> Result<(), StoreError> {
        self.family = Some(family.clone());
        Ok(())
    }
}

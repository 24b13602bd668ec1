//! The session state machine as plain Rust: prompt queue, event log, replay, agent event dedupe, presence;
//! the lifecycle around the sandbox ([`deadline`], [`lifecycle`]: one alarm for every deadline, crash
//! recovery, parking and waking, the hard limit; [`ceiling`]: cost ceilings; [`children`]: sub-sessions and
//! their guardrails); and the rules of a repository ([`repo`]: image cadence, build backoff, staleness, warm-up limits).
//!
//! Time comes in as `now_ms` and storage through the [`Store`] port (or, for a repository, as plain
//! data), so everything here is tested natively without the Worker runtime. The Durable Objects
//! (`worker/`) only persist and deliver.

pub mod ceiling;
pub mod children;
pub mod deadline;
pub mod index;
pub mod lifecycle;
pub mod membership;
pub mod presence;
pub mod repo;
pub mod session;
pub mod store;

pub use ceiling::{CostCeilings, DailySpend, UsageReport};
pub use children::{ChildLimits, ChildRecord, ChildReport, Family, SpawnPlan, TreeStop};
pub use deadline::{Deadline, Lifecycle, LifecycleSettings, Phase};
pub use lifecycle::{AlarmChange, SandboxAction, SandboxPlan};
pub use membership::Membership;
pub use presence::ClientIdentity;
pub use session::{Effects, Session, Submitted, MAX_UNFINISHED_PROMPTS};
pub use store::{
    IndexMark, InviteRecord, Member, MemoryStore, PromptRecord, SandboxRecord, Store, StoreError,
};

use nightshift_protocol::ErrorCode;

/// Why a session operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    /// The session was never created.
    #[error("session not found")]
    NotFound,
    /// `create` on an existing session.
    #[error("session already exists")]
    AlreadyExists,
    /// A value the caller sent is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Too many unfinished prompts.
    #[error("the queue is full: at most {limit} unfinished prompts per session")]
    QueueFull {
        /// The limit.
        limit: usize,
    },
    /// No prompt with this id.
    #[error("no prompt {0}")]
    UnknownPrompt(String),
    /// The operation does not apply in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The caller is a participant whose role does not allow the operation.
    #[error("{0}")]
    Forbidden(String),
    /// No invite with this id.
    #[error("no invite {0}")]
    UnknownInvite(String),
    /// The invite link is past its expiry.
    #[error("this invite link has expired; ask a participant for a new one")]
    InviteExpired,
    /// The invite link was revoked.
    #[error("this invite link was revoked; ask a participant for a new one")]
    InviteRevoked,
    /// A sub-session guardrail refused a spawn.
    #[error("{0}")]
    ChildLimit(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SessionError {
    /// The wire error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::NotFound
            | SessionError::UnknownPrompt(_)
            | SessionError::UnknownInvite(_) => ErrorCode::NotFound,
            SessionError::Forbidden(_) => ErrorCode::Forbidden,
            SessionError::InviteExpired => ErrorCode::InviteExpired,
            SessionError::InviteRevoked => ErrorCode::InviteRevoked,
            SessionError::AlreadyExists | SessionError::Conflict(_) => ErrorCode::Conflict,
            SessionError::Invalid(_) => ErrorCode::BadRequest,
            SessionError::QueueFull { .. } => ErrorCode::QueueFull,
            SessionError::ChildLimit(_) => ErrorCode::ChildLimit,
            SessionError::Store(_) => ErrorCode::Internal,
        }
    }
}

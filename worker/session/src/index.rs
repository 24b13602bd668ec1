//! The session's entry in the cross-session index (D1 in the Worker), which backs `GET /api/sessions`.
//!
//! The index holds a session's status, its last activity and its participants. The session decides
//! here when its entry is stale enough to write again: at once when the status or the participants
//! changed, and for activity alone at most once per [`ACTIVITY_WRITE_INTERVAL_MS`], so a stream of
//! tokens costs the index one write per interval, not one per token.

use nightshift_protocol::http::SessionStatus;
use nightshift_protocol::{Event, EventEnvelope, SandboxStatus};

use crate::store::{IndexMark, Store};
use crate::SessionError;

/// Activity alone is written to the index at most this often.
pub const ACTIVITY_WRITE_INTERVAL_MS: u64 = 30_000;

/// A session's status in listings: `running` while a prompt is queued or running (and the sandbox is
/// not gone), else what the sandbox says.
pub fn status(sandbox: SandboxStatus, prompts_unfinished: bool) -> SessionStatus {
    match sandbox {
        SandboxStatus::Stopped => SessionStatus::Stopped,
        SandboxStatus::Failed => SessionStatus::Failed,
        _ if prompts_unfinished => SessionStatus::Running,
        SandboxStatus::Ready | SandboxStatus::Snapshotting => SessionStatus::Idle,
        SandboxStatus::Warming | SandboxStatus::Starting | SandboxStatus::Syncing => {
            SessionStatus::Starting
        }
    }
}

/// The session's index entry as of now, from its store: status, `last_activity_ms` (the newest event's
/// time, or `now_ms`), the number of participants, and the pull request written last.
pub fn current(store: &impl Store, last_activity_ms: u64) -> Result<IndexMark, SessionError> {
    let sandbox = store.sandbox()?.ok_or(SessionError::NotFound)?;
    let unfinished = !store.unfinished_prompts()?.is_empty();
    Ok(IndexMark {
        status: status(sandbox.status, unfinished),
        last_activity_ms,
        participants: u32::try_from(store.members()?.len()).unwrap_or(u32::MAX),
        pull_request_url: store.index_mark()?.and_then(|m| m.pull_request_url),
    })
}

/// Whether `now` should be written, given what was written last.
pub fn due(written: Option<&IndexMark>, now: &IndexMark) -> bool {
    match written {
        None => true,
        Some(written) => {
            written.status != now.status
                || written.participants != now.participants
                || written.pull_request_url != now.pull_request_url
                || now.last_activity_ms
                    >= written
                        .last_activity_ms
                        .saturating_add(ACTIVITY_WRITE_INTERVAL_MS)
        }
    }
}

/// The entry to write now, if one is due; it is remembered as written (the caller writes it, and a
/// failed write is caught up by the next one that is due).
pub fn take_due(
    store: &mut impl Store,
    last_activity_ms: u64,
) -> Result<Option<IndexMark>, SessionError> {
    take_due_with(store, last_activity_ms, None)
}

/// [`take_due`], with a pull request just logged.
fn take_due_with(
    store: &mut impl Store,
    last_activity_ms: u64,
    pull_request_url: Option<String>,
) -> Result<Option<IndexMark>, SessionError> {
    let mut now = current(store, last_activity_ms)?;
    if pull_request_url.is_some() {
        now.pull_request_url = pull_request_url;
    }
    if !due(store.index_mark()?.as_ref(), &now) {
        return Ok(None);
    }
    store.save_index_mark(&now)?;
    Ok(Some(now))
}

/// Whether logging `event` can change the session's listing (its status or its pull request).
pub fn changes_status(event: &Event) -> bool {
    matches!(
        event,
        Event::PromptQueued { .. }
            | Event::PromptStarted { .. }
            | Event::PromptFinished { .. }
            | Event::PromptCancelled { .. }
            | Event::SandboxStatus { .. }
            | Event::PullRequest { .. }
    )
}

/// After `events` were logged (the newest at `activity_ms`): the entry to write, if due. When none of
/// the events can change the status and the activity interval has not passed, this costs one read.
pub fn after_events(
    store: &mut impl Store,
    events: &[EventEnvelope],
    activity_ms: u64,
) -> Result<Option<IndexMark>, SessionError> {
    if !events.iter().any(|e| changes_status(&e.event)) {
        if let Some(written) = store.index_mark()? {
            let next_ms = written
                .last_activity_ms
                .saturating_add(ACTIVITY_WRITE_INTERVAL_MS);
            if activity_ms < next_ms {
                return Ok(None);
            }
        }
    }
    let pull_request_url = events.iter().rev().find_map(|e| match &e.event {
        Event::PullRequest { url, .. } => Some(url.clone()),
        _ => None,
    });
    take_due_with(store, activity_ms, pull_request_url)
}

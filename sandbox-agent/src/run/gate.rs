//! The sync gate: the agent starts working before its git catch-up (fetch and fast-forward of the
//! working copy) has finished. Reads go ahead at once; writes — file tools and commands — wait until the
//! sync settled, and a failed sync leaves the workspace read-only.
//!
//! One [`SyncGateSetter`] (held by whoever runs the sync) and any number of [`SyncGate`] clones (held by
//! the tools), over a `tokio::sync::watch` channel.

use tokio::sync::watch;

/// Where the git catch-up is.
#[derive(Clone, Debug, PartialEq)]
pub enum SyncState {
    /// Still running: writes wait.
    Pending,
    /// Finished: the workspace may be written.
    Done,
    /// Failed, with the reason: the workspace stays read-only.
    Failed(String),
}

/// Settles the gate; dropping it while the state is still [`SyncState::Pending`] fails the gate.
#[derive(Debug)]
pub struct SyncGateSetter {
    state: watch::Sender<SyncState>,
}

/// The tools' view of the sync: cheap to clone, every clone sees the same state.
#[derive(Clone, Debug)]
pub struct SyncGate {
    state: watch::Receiver<SyncState>,
}

/// Reason given when the setter went away without settling the gate.
const SETTER_DROPPED: &str = "git sync ended without reporting a result";

/// A new gate in [`SyncState::Pending`] and the setter that settles it.
pub fn sync_gate() -> (SyncGateSetter, SyncGate) {
    let (state, receiver) = watch::channel(SyncState::Pending);
    (SyncGateSetter { state }, SyncGate { state: receiver })
}

impl SyncGateSetter {
    /// Move the gate to `state`; every waiter sees it.
    pub fn set(&self, state: SyncState) {
        self.state.send_replace(state);
    }
}

impl SyncGate {
    /// A gate that is already [`SyncState::Done`]: for tests and workspaces without git.
    #[cfg(test)]
    pub fn done() -> SyncGate {
        let (_, receiver) = watch::channel(SyncState::Done);
        SyncGate { state: receiver }
    }

    /// The state right now.
    pub fn state(&self) -> SyncState {
        match &*self.state.borrow() {
            SyncState::Pending if self.state.has_changed().is_err() => {
                SyncState::Failed(SETTER_DROPPED.to_owned())
            }
            state => state.clone(),
        }
    }

    /// Wait while the state is [`SyncState::Pending`], then return the settled state.
    pub async fn settled(&self) -> SyncState {
        let mut receiver = self.state.clone();
        let settled = receiver
            .wait_for(|state| *state != SyncState::Pending)
            .await
            .map(|state| state.clone());
        match settled {
            Ok(state) => state,
            // The setter is gone; the last value it left stands, unless it never settled.
            Err(_) => self.state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn settled_waits_while_pending() {
        let (setter, gate) = sync_gate();
        assert_eq!(gate.state(), SyncState::Pending);
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.settled().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        setter.set(SyncState::Failed("fetch refused".into()));
        assert_eq!(
            waiter.await.unwrap(),
            SyncState::Failed("fetch refused".into())
        );
        assert_eq!(gate.state(), SyncState::Failed("fetch refused".into()));
        setter.set(SyncState::Done);
        assert_eq!(gate.settled().await, SyncState::Done);
    }

    #[tokio::test]
    async fn done_gate_and_dropped_setter() {
        assert_eq!(SyncGate::done().state(), SyncState::Done);
        assert_eq!(SyncGate::done().settled().await, SyncState::Done);

        let (setter, gate) = sync_gate();
        setter.set(SyncState::Done);
        drop(setter);
        assert_eq!(gate.settled().await, SyncState::Done);

        let (setter, gate) = sync_gate();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.settled().await }
        });
        drop(setter);
        let failed = SyncState::Failed(SETTER_DROPPED.into());
        assert_eq!(waiter.await.unwrap(), failed);
        assert_eq!(gate.state(), failed);
    }
}

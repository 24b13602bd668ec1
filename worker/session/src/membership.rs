//! Membership: who may see a session, and the invite links that add people to it.
//!
//! The creator is the session's `owner`; whoever joins through an invite is a `member`. Any participant
//! may create an invite; only owners list and revoke them. An invite is a random secret (its SHA-256 is
//! all that is stored) that works until it expires ([`INVITE_TTL_MS`] unless its creator chose a
//! lifetime) or an owner revokes it. An unknown secret is answered like a missing session; an expired or
//! revoked one with its own typed refusal. A participant who opens an old link stays a participant.

use nightshift_protocol::http::{
    InviteState, InviteSummary, INVITE_TTL_MAX_MS, INVITE_TTL_MIN_MS, INVITE_TTL_MS,
};
use nightshift_protocol::{Author, Role};

use crate::store::{InviteRecord, Member, Store};
use crate::{Session, SessionError};

/// Length of an invite id: a prefix of the secret's hash, which reveals nothing of the secret.
const INVITE_ID_CHARS: usize = 16;

/// Membership decisions over one session's store, at one moment.
pub struct Membership<'s, S: Store> {
    store: &'s mut S,
    now_ms: u64,
}

impl<'s, S: Store> Membership<'s, S> {
    /// Membership of the session in `store` as of `now_ms`.
    pub fn new(store: &'s mut S, now_ms: u64) -> Self {
        Membership { store, now_ms }
    }

    /// The participant `login`; a non-participant gets [`SessionError::NotFound`], the same answer as a
    /// session that does not exist.
    pub fn participant(&mut self, login: &str) -> Result<Member, SessionError> {
        let session = Session::new(&mut *self.store, self.now_ms);
        session.info()?;
        session.member(login)?.ok_or(SessionError::NotFound)
    }

    /// Record an invite created by participant `by` whose secret hashes to `secret_hash`, working for
    /// `ttl_ms` (default [`INVITE_TTL_MS`]).
    pub fn create_invite(
        &mut self,
        by: &Author,
        secret_hash: &str,
        ttl_ms: Option<u64>,
    ) -> Result<InviteSummary, SessionError> {
        self.participant(&by.login)?;
        let ttl_ms = ttl_ms.unwrap_or(INVITE_TTL_MS);
        if !(INVITE_TTL_MIN_MS..=INVITE_TTL_MAX_MS).contains(&ttl_ms) {
            return Err(SessionError::Invalid(format!(
                "ttl_ms must be between {INVITE_TTL_MIN_MS} and {INVITE_TTL_MAX_MS}"
            )));
        }
        let record = InviteRecord {
            id: invite_id(secret_hash),
            secret_hash: secret_hash.to_owned(),
            created_by: by.login.clone(),
            created_ms: self.now_ms,
            expires_ms: self.now_ms.saturating_add(ttl_ms),
            revoked_ms: None,
        };
        self.store.insert_invite(&record)?;
        Ok(summary(&record, self.now_ms))
    }

    /// Every invite of the session, newest first; owners only.
    pub fn invites(&mut self, by: &Author) -> Result<Vec<InviteSummary>, SessionError> {
        self.require_owner(by)?;
        Ok(self
            .store
            .invites()?
            .iter()
            .map(|i| summary(i, self.now_ms))
            .collect())
    }

    /// Revoke invite `invite_id`; owners only. Revoking a revoked invite changes nothing.
    pub fn revoke(&mut self, by: &Author, invite_id: &str) -> Result<InviteSummary, SessionError> {
        self.require_owner(by)?;
        let found = self.store.invites()?.into_iter().any(|i| i.id == invite_id);
        if !found {
            return Err(SessionError::UnknownInvite(invite_id.to_owned()));
        }
        self.store.revoke_invite(invite_id, self.now_ms)?;
        let revoked = self
            .store
            .invites()?
            .into_iter()
            .find(|i| i.id == invite_id)
            .ok_or_else(|| SessionError::UnknownInvite(invite_id.to_owned()))?;
        Ok(summary(&revoked, self.now_ms))
    }

    /// Join with the invite whose secret hashes to `secret_hash`. Returns the member and whether they
    /// were new. A participant is let in whatever the invite's state; anyone else needs an active one.
    pub fn redeem(
        &mut self,
        secret_hash: &str,
        author: &Author,
    ) -> Result<(Member, bool), SessionError> {
        Session::new(&mut *self.store, self.now_ms).info()?;
        let invite = self
            .store
            .invite_by_hash(secret_hash)?
            .ok_or(SessionError::NotFound)?;
        let mut session = Session::new(&mut *self.store, self.now_ms);
        let existing = session.member(&author.login)?;
        if existing.is_none() {
            match state(&invite, self.now_ms) {
                InviteState::Active => {}
                InviteState::Expired => return Err(SessionError::InviteExpired),
                InviteState::Revoked => return Err(SessionError::InviteRevoked),
            }
        }
        let member = session.join(author)?;
        Ok((member, existing.is_none()))
    }

    fn require_owner(&mut self, by: &Author) -> Result<(), SessionError> {
        match self.participant(&by.login)?.role {
            Role::Owner => Ok(()),
            Role::Member => Err(SessionError::Forbidden(
                "only an owner of the session can do this".to_owned(),
            )),
        }
    }
}

/// The public id of the invite whose secret hashes to `secret_hash`.
pub fn invite_id(secret_hash: &str) -> String {
    secret_hash.chars().take(INVITE_ID_CHARS).collect()
}

/// The state of `invite` at `now_ms`: revoked wins over expired.
pub fn state(invite: &InviteRecord, now_ms: u64) -> InviteState {
    if invite.revoked_ms.is_some() {
        InviteState::Revoked
    } else if now_ms >= invite.expires_ms {
        InviteState::Expired
    } else {
        InviteState::Active
    }
}

fn summary(invite: &InviteRecord, now_ms: u64) -> InviteSummary {
    InviteSummary {
        id: invite.id.clone(),
        created_by: invite.created_by.clone(),
        created_ms: invite.created_ms,
        expires_ms: invite.expires_ms,
        revoked_ms: invite.revoked_ms,
        state: state(invite, now_ms),
    }
}

//! Membership: invites that expire and can be revoked, roles, and the session's index entry.

use insta::assert_debug_snapshot;
use nightshift_protocol::http::{InviteState, SessionStatus, INVITE_TTL_MS};
use nightshift_protocol::{Role, SandboxStatus};
use nightshift_session::index::{self, ACTIVITY_WRITE_INTERVAL_MS};
use nightshift_session::{Membership, Session, SessionError, Store};

use crate::{author, created, ready};

#[test]
fn an_invite_adds_a_member_until_it_expires() {
    let mut store = created();
    let invite = Membership::new(&mut store, 10_000)
        .create_invite(&author("ada"), "aaaaaaaaaaaaaaaaffff", None)
        .unwrap();
    assert_eq!(invite.id, "aaaaaaaaaaaaaaaa");
    assert_eq!(invite.expires_ms, 10_000 + INVITE_TTL_MS);
    assert_eq!(invite.state, InviteState::Active);

    let (bob, new) = Membership::new(&mut store, 20_000)
        .redeem("aaaaaaaaaaaaaaaaffff", &author("bob"))
        .unwrap();
    assert!(new);
    assert_eq!(bob.role, Role::Member);

    let at_expiry = 10_000 + INVITE_TTL_MS;
    assert_eq!(
        Membership::new(&mut store, at_expiry).redeem("aaaaaaaaaaaaaaaaffff", &author("cy")),
        Err(SessionError::InviteExpired)
    );
    // A participant opening an old link is still let in, and stays a member.
    let (again, new) = Membership::new(&mut store, at_expiry)
        .redeem("aaaaaaaaaaaaaaaaffff", &author("bob"))
        .unwrap();
    assert!(!new);
    assert_eq!(again.joined_ms, 20_000);
    let logins: Vec<(String, Role)> = store
        .members()
        .unwrap()
        .into_iter()
        .map(|m| (m.author.login, m.role))
        .collect();
    assert_debug_snapshot!(logins);
}

#[test]
fn an_unknown_secret_is_a_missing_session_and_a_revoked_one_says_so() {
    let mut store = created();
    assert_eq!(
        Membership::new(&mut store, 10_000).redeem("nope", &author("bob")),
        Err(SessionError::NotFound)
    );
    let invite = Membership::new(&mut store, 10_000)
        .create_invite(&author("ada"), "bbbbbbbbbbbbbbbbffff", Some(60_000))
        .unwrap();
    let revoked = Membership::new(&mut store, 11_000)
        .revoke(&author("ada"), &invite.id)
        .unwrap();
    assert_eq!(revoked.state, InviteState::Revoked);
    assert_eq!(revoked.revoked_ms, Some(11_000));
    // Revoking twice keeps the first time.
    let twice = Membership::new(&mut store, 12_000)
        .revoke(&author("ada"), &invite.id)
        .unwrap();
    assert_eq!(twice.revoked_ms, Some(11_000));
    assert_eq!(
        Membership::new(&mut store, 12_000).redeem("bbbbbbbbbbbbbbbbffff", &author("bob")),
        Err(SessionError::InviteRevoked)
    );
    // Revoked wins over expired.
    assert_eq!(
        Membership::new(&mut store, 99_000_000).redeem("bbbbbbbbbbbbbbbbffff", &author("bob")),
        Err(SessionError::InviteRevoked)
    );
    assert!(Session::new(&mut store, 12_000)
        .member("bob")
        .unwrap()
        .is_none());
    // A session that does not exist: the same answer as a secret that does not.
    let mut empty = nightshift_session::MemoryStore::new();
    assert_eq!(
        Membership::new(&mut empty, 1).redeem("bbbbbbbbbbbbbbbbffff", &author("bob")),
        Err(SessionError::NotFound)
    );
}

#[test]
fn members_invite_but_only_owners_list_and_revoke_and_strangers_see_nothing() {
    let mut store = created();
    let first = Membership::new(&mut store, 10_000)
        .create_invite(&author("ada"), "1111111111111111aaaa", None)
        .unwrap();
    Membership::new(&mut store, 11_000)
        .redeem("1111111111111111aaaa", &author("bob"))
        .unwrap();
    let by_bob = Membership::new(&mut store, 12_000)
        .create_invite(&author("bob"), "2222222222222222bbbb", Some(1_000))
        .unwrap();
    assert_eq!(
        Membership::new(&mut store, 12_000)
            .invites(&author("bob"))
            .map_err(|e| e.code()),
        Err(nightshift_protocol::ErrorCode::Forbidden)
    );
    assert_eq!(
        Membership::new(&mut store, 12_000)
            .revoke(&author("bob"), &first.id)
            .map_err(|e| e.code()),
        Err(nightshift_protocol::ErrorCode::Forbidden)
    );
    // Strangers get the answer of a missing session for everything.
    for result in [
        Membership::new(&mut store, 12_000)
            .create_invite(&author("eve"), "3333333333333333cccc", None)
            .map(|_| ()),
        Membership::new(&mut store, 12_000)
            .invites(&author("eve"))
            .map(|_| ()),
        Membership::new(&mut store, 12_000)
            .revoke(&author("eve"), &first.id)
            .map(|_| ()),
    ] {
        assert_eq!(result, Err(SessionError::NotFound));
    }
    assert_eq!(
        Membership::new(&mut store, 12_000)
            .revoke(&author("ada"), "0000000000000000")
            .map_err(|e| e.code()),
        Err(nightshift_protocol::ErrorCode::NotFound)
    );
    assert_eq!(
        Membership::new(&mut store, 12_000)
            .create_invite(&author("ada"), "4444444444444444dddd", Some(0))
            .map_err(|e| e.code()),
        Err(nightshift_protocol::ErrorCode::BadRequest)
    );
    Membership::new(&mut store, 13_000)
        .revoke(&author("ada"), &first.id)
        .unwrap();
    let listed = Membership::new(&mut store, 13_500)
        .invites(&author("ada"))
        .unwrap();
    assert_eq!(listed.first().map(|i| i.id.clone()), Some(by_bob.id));
    assert_debug_snapshot!(listed);
}

#[test]
fn the_index_entry_follows_status_and_joins_at_once_and_activity_at_most_every_interval() {
    let mut store = created();
    let first = index::take_due(&mut store, 1_000).unwrap();
    assert_eq!(
        first.as_ref().map(|m| m.status),
        Some(SessionStatus::Starting)
    );
    assert_eq!(index::take_due(&mut store, 1_500).unwrap(), None);
    Session::new(&mut store, 2_000).agent_connected().unwrap();
    assert_eq!(
        index::take_due(&mut store, 2_000)
            .unwrap()
            .map(|m| m.status),
        Some(SessionStatus::Idle)
    );
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "go", "k1", true)
        .unwrap();
    assert_eq!(
        index::take_due(&mut store, 3_000)
            .unwrap()
            .map(|m| m.status),
        Some(SessionStatus::Running)
    );
    // Activity alone: not before the interval has passed since the last write.
    assert_eq!(index::take_due(&mut store, 3_001).unwrap(), None);
    assert_eq!(
        index::take_due(&mut store, 3_000 + ACTIVITY_WRITE_INTERVAL_MS - 1).unwrap(),
        None
    );
    let later = index::take_due(&mut store, 3_000 + ACTIVITY_WRITE_INTERVAL_MS).unwrap();
    assert_eq!(
        later.map(|m| m.last_activity_ms),
        Some(3_000 + ACTIVITY_WRITE_INTERVAL_MS)
    );
    // A join is written at once.
    Session::new(&mut store, 40_000)
        .join(&author("bob"))
        .unwrap();
    assert_eq!(
        index::take_due(&mut store, 40_000)
            .unwrap()
            .map(|m| m.participants),
        Some(2)
    );
}

#[test]
fn a_pull_request_is_written_to_the_index_at_once_and_kept() {
    use nightshift_protocol::{Event, EventEnvelope};
    let mut store = created();
    index::take_due(&mut store, 1_000).unwrap();
    let logged = |seq, event| EventEnvelope {
        seq,
        ts_ms: 2_000,
        event,
    };
    let opened = [logged(
        7,
        Event::PullRequest {
            number: 12,
            url: "https://github.com/demo/hello/pull/12".into(),
            state: "open".into(),
        },
    )];
    let mark = index::after_events(&mut store, &opened, 2_000)
        .unwrap()
        .expect("a new pull request is due at once");
    assert_eq!(
        mark.pull_request_url.as_deref(),
        Some("https://github.com/demo/hello/pull/12")
    );
    // Later entries keep it.
    Session::new(&mut store, 3_000)
        .join(&author("bob"))
        .unwrap();
    let later = index::take_due(&mut store, 3_000).unwrap().unwrap();
    assert_eq!(later.participants, 2);
    assert_eq!(later.pull_request_url, mark.pull_request_url);
    // The same pull request again (a state change) writes nothing new before the interval.
    let same = [logged(
        8,
        Event::PullRequest {
            number: 12,
            url: "https://github.com/demo/hello/pull/12".into(),
            state: "merged".into(),
        },
    )];
    assert_eq!(index::after_events(&mut store, &same, 3_001).unwrap(), None);
}

#[test]
fn listing_status_comes_from_the_sandbox_and_the_queue() {
    use nightshift_session::index::status;
    assert_eq!(
        status(SandboxStatus::Starting, false),
        SessionStatus::Starting
    );
    assert_eq!(status(SandboxStatus::Syncing, true), SessionStatus::Running);
    assert_eq!(status(SandboxStatus::Ready, false), SessionStatus::Idle);
    assert_eq!(status(SandboxStatus::Ready, true), SessionStatus::Running);
    assert_eq!(status(SandboxStatus::Stopped, true), SessionStatus::Stopped);
    assert_eq!(status(SandboxStatus::Failed, false), SessionStatus::Failed);
    let mut store = ready();
    assert_eq!(
        index::current(&store, 5).unwrap().status,
        SessionStatus::Idle
    );
    Session::new(&mut store, 6).sandbox_failed("gone").unwrap();
    assert_eq!(
        index::current(&store, 6).unwrap().status,
        SessionStatus::Failed
    );
}

#[test]
fn logged_events_reach_the_index_when_they_change_the_status_or_the_interval_passed() {
    let mut store = ready();
    assert!(index::after_events(&mut store, &[], 2_000)
        .unwrap()
        .is_some());
    let (_, queued) = Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "go", "k1", true)
        .unwrap();
    let written = index::after_events(&mut store, &queued.events, 3_000).unwrap();
    assert_eq!(written.map(|m| m.status), Some(SessionStatus::Running));
    let tokens = Session::new(&mut store, 3_100)
        .apply_agent_event(
            1,
            nightshift_protocol::Event::Token {
                prompt_id: "p1".to_owned(),
                text: "a".to_owned(),
            },
        )
        .unwrap();
    assert_eq!(
        index::after_events(&mut store, &tokens.events, 3_100).unwrap(),
        None
    );
    let late = index::after_events(
        &mut store,
        &tokens.events,
        3_000 + ACTIVITY_WRITE_INTERVAL_MS,
    )
    .unwrap();
    assert_eq!(late.map(|m| m.status), Some(SessionStatus::Running));
}

//! Presence: who is in the session, who is online and who is typing, derived from members and the
//! identities on connected sockets (a `typing{}` marks its socket typing for [`TYPING_MS`]).

use nightshift_protocol::{Author, Participant, Role, TYPING_MS};

use crate::store::Member;

/// The identity kept on each client socket (its hibernation attachment).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientIdentity {
    /// Who is connected.
    pub author: Author,
    /// Their role in the session.
    pub role: Role,
    /// Whether the socket said `hello`.
    pub greeted: bool,
    /// Client name from `hello`.
    #[serde(default)]
    pub client: Option<String>,
    /// When this socket's `typing` last asked for a warm-up (see [`crate::repo::warm_allowed`]).
    #[serde(default)]
    pub warm_requested_ms: Option<u64>,
    /// Until when this socket counts as typing (its last `typing{}` plus [`TYPING_MS`]).
    #[serde(default)]
    pub typing_until_ms: Option<u64>,
}

impl ClientIdentity {
    /// Record a `typing{}` at `now_ms`.
    pub fn typed(&mut self, now_ms: u64) {
        self.typing_until_ms = Some(now_ms.saturating_add(TYPING_MS));
    }

    /// Whether this socket counts as typing at `now_ms`.
    pub fn is_typing(&self, now_ms: u64) -> bool {
        self.greeted && self.typing_until_ms.is_some_and(|until| until > now_ms)
    }
}

/// Members in joining order, each marked online when one of their sockets is in `online_logins`.
pub fn participants(members: &[Member], online_logins: &[String]) -> Vec<Participant> {
    members
        .iter()
        .map(|m| Participant {
            login: m.author.login.clone(),
            name: m.author.name.clone(),
            role: m.role,
            online: online_logins.contains(&m.author.login),
            typing: false,
        })
        .collect()
}

/// Logins of greeted sockets, without duplicates, in first-seen order.
pub fn online_logins<'a>(sockets: impl IntoIterator<Item = &'a ClientIdentity>) -> Vec<String> {
    let mut logins: Vec<String> = Vec::new();
    for identity in sockets.into_iter().filter(|s| s.greeted) {
        if !logins.contains(&identity.author.login) {
            logins.push(identity.author.login.clone());
        }
    }
    logins
}

/// Logins with a socket typing at `now_ms`, without duplicates, in first-seen order.
pub fn typing_logins<'a>(
    sockets: impl IntoIterator<Item = &'a ClientIdentity>,
    now_ms: u64,
) -> Vec<String> {
    let mut logins: Vec<String> = Vec::new();
    for identity in sockets.into_iter().filter(|s| s.is_typing(now_ms)) {
        if !logins.contains(&identity.author.login) {
            logins.push(identity.author.login.clone());
        }
    }
    logins
}

/// When the next socket stops typing after `now_ms`, if any socket is typing: when presence should be
/// looked at again.
pub fn next_typing_end_ms<'a>(
    sockets: impl IntoIterator<Item = &'a ClientIdentity>,
    now_ms: u64,
) -> Option<u64> {
    sockets
        .into_iter()
        .filter(|s| s.is_typing(now_ms))
        .filter_map(|s| s.typing_until_ms)
        .min()
}

/// `participants` with `typing` set for the logins in `typing_logins`.
pub fn with_typing(
    mut participants: Vec<Participant>,
    typing_logins: &[String],
) -> Vec<Participant> {
    for participant in &mut participants {
        participant.typing = typing_logins.contains(&participant.login);
    }
    participants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(login: &str, greeted: bool) -> ClientIdentity {
        ClientIdentity {
            author: Author {
                login: login.to_owned(),
                name: login.to_owned(),
                email: format!("{login}@example.com"),
            },
            role: Role::Member,
            greeted,
            client: None,
            warm_requested_ms: None,
            typing_until_ms: None,
        }
    }

    #[test]
    fn typing_lasts_typing_ms_after_the_last_typing() {
        let mut ada = socket("ada", true);
        let bob = socket("bob", true);
        assert!(typing_logins([&ada, &bob], 1_000).is_empty());
        assert_eq!(next_typing_end_ms([&ada, &bob], 1_000), None);
        ada.typed(1_000);
        assert_eq!(typing_logins([&ada, &bob], 1_000), vec!["ada"]);
        assert_eq!(
            typing_logins([&ada, &bob], 1_000 + TYPING_MS - 1),
            vec!["ada"]
        );
        assert_eq!(
            next_typing_end_ms([&ada, &bob], 2_000),
            Some(1_000 + TYPING_MS)
        );
        // Typing again extends it.
        ada.typed(3_000);
        assert_eq!(typing_logins([&ada, &bob], 1_000 + TYPING_MS), vec!["ada"]);
        assert!(typing_logins([&ada, &bob], 3_000 + TYPING_MS).is_empty());
        assert_eq!(next_typing_end_ms([&ada, &bob], 3_000 + TYPING_MS), None);
    }

    #[test]
    fn a_socket_that_left_is_not_typing_and_two_sockets_count_once() {
        let mut gone = socket("ada", false);
        gone.typed(1_000);
        assert!(typing_logins([&gone], 1_500).is_empty());
        let mut one = socket("ada", true);
        let mut two = socket("ada", true);
        one.typed(1_000);
        two.typed(1_200);
        assert_eq!(typing_logins([&one, &two], 1_500), vec!["ada"]);
        assert_eq!(
            next_typing_end_ms([&one, &two], 1_500),
            Some(1_000 + TYPING_MS)
        );
    }

    #[test]
    fn participants_are_marked_typing_by_login() {
        let members = vec![
            Member {
                author: socket("ada", true).author,
                role: Role::Owner,
                joined_ms: 1,
            },
            Member {
                author: socket("bob", true).author,
                role: Role::Member,
                joined_ms: 2,
            },
        ];
        let marked = with_typing(
            participants(&members, &["ada".to_owned(), "bob".to_owned()]),
            &["bob".to_owned()],
        );
        let typing: Vec<(&str, bool)> = marked
            .iter()
            .map(|p| (p.login.as_str(), p.typing))
            .collect();
        assert_eq!(typing, vec![("ada", false), ("bob", true)]);
    }
}

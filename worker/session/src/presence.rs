//! Presence: who is in the session and who is online, derived from members and connected sockets.

use nightshift_protocol::{Author, Participant, Role};

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

//! Scenario tests of the session logic over the in-memory store.

mod agent;
mod children;
mod lifecycle;
mod membership;
mod prompt;
mod repo;

use nightshift_protocol::{Author, PromptStatus, SessionInfo};
use nightshift_session::{Effects, MemoryStore, Session};

pub fn author(login: &str) -> Author {
    Author {
        login: login.to_owned(),
        name: format!("{login} name"),
        email: format!("{login}@example.com"),
    }
}

pub fn created() -> MemoryStore {
    let mut store = MemoryStore::new();
    let info = SessionInfo {
        id: "s1".to_owned(),
        repo: "demo/hello".to_owned(),
        base_branch: "main".to_owned(),
        branch: "nightshift/s1".to_owned(),
        title: "demo".to_owned(),
        model: "claude-test".to_owned(),
        created_by: author("ada"),
        created_ms: 1_000,
        parent_session_id: None,
    };
    Session::new(&mut store, 1_000)
        .create(info, "hash".to_owned())
        .unwrap();
    store
}

/// A store whose agent is connected and ready.
pub fn ready() -> MemoryStore {
    let mut store = created();
    Session::new(&mut store, 2_000).agent_connected().unwrap();
    store
}

/// Events and agent messages as compact JSON lines, for snapshots.
pub fn render(effects: &Effects) -> Vec<String> {
    let mut lines: Vec<String> = effects
        .events
        .iter()
        .map(|e| format!("event {}", serde_json::to_string(e).unwrap()))
        .collect();
    lines.extend(
        effects
            .to_agent
            .iter()
            .map(|m| format!("agent {}", serde_json::to_string(m).unwrap())),
    );
    lines
}

pub fn status(store: &mut MemoryStore, prompt_id: &str) -> PromptStatus {
    use nightshift_session::Store;
    store.prompt(prompt_id).unwrap().unwrap().status
}

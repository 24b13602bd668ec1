//! Sub-sessions: the guardrails on spawning, the children's status reports, and who `stop{tree}` reaches.

use insta::assert_debug_snapshot;
use nightshift_protocol::http::SessionStatus;
use nightshift_protocol::StopScope;
use nightshift_session::{
    ChildLimits, ChildRecord, Effects, Family, MemoryStore, Session, SessionError, Store,
};

use crate::{author, created, ready, render};

/// A ready session with a prompt of bob's running.
fn working() -> MemoryStore {
    let mut store = ready();
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("bob"), "split the work", "k1", true)
        .unwrap();
    store
}

fn child(id: &str, status: SessionStatus) -> ChildRecord {
    ChildRecord {
        id: id.to_owned(),
        repo: "demo/hello".to_owned(),
        title: format!("child {id}"),
        status,
        status_seq: 0,
        created_ms: 4_000,
    }
}

fn limit_message(result: Result<impl std::fmt::Debug, SessionError>) -> String {
    match result {
        Err(SessionError::ChildLimit(message)) => message,
        other => panic!("expected a child limit, got {other:?}"),
    }
}

#[test]
fn a_root_plans_a_child_one_level_down_authored_by_the_running_prompts_author() {
    let mut store = working();
    let plan = Session::new(&mut store, 4_000)
        .plan_spawn(&ChildLimits::default())
        .unwrap();
    assert_eq!(plan.author, author("bob"));
    assert_eq!(
        plan.family,
        Family {
            parent_session_id: Some("s1".to_owned()),
            root_session_id: "s1".to_owned(),
            depth: 1,
            reported: None,
            spawned_in_tree: 0,
            children: Vec::new(),
        }
    );
}

#[test]
fn spawning_needs_a_running_prompt() {
    let mut store = ready();
    assert!(matches!(
        Session::new(&mut store, 4_000).plan_spawn(&ChildLimits::default()),
        Err(SessionError::Conflict(_))
    ));
}

#[test]
fn depth_is_limited() {
    let mut store = working();
    let at_depth = |depth| Family {
        parent_session_id: Some("p".to_owned()),
        root_session_id: "root".to_owned(),
        depth,
        reported: None,
        spawned_in_tree: 0,
        children: Vec::new(),
    };
    Session::new(&mut store, 4_000).adopt(&at_depth(1)).unwrap();
    let plan = Session::new(&mut store, 4_000)
        .plan_spawn(&ChildLimits::default())
        .unwrap();
    assert_eq!(plan.family.depth, 2);
    assert_eq!(plan.family.root_session_id, "root");

    Session::new(&mut store, 4_000).adopt(&at_depth(2)).unwrap();
    let refused = Session::new(&mut store, 4_000).plan_spawn(&ChildLimits::default());
    assert_eq!(
        refused.as_ref().map_err(SessionError::code).err(),
        Some(nightshift_protocol::ErrorCode::ChildLimit)
    );
    assert_debug_snapshot!(limit_message(refused));
    // Configurable.
    let deeper = ChildLimits {
        max_depth: 3,
        ..ChildLimits::default()
    };
    assert!(Session::new(&mut store, 4_000).plan_spawn(&deeper).is_ok());
}

#[test]
fn running_children_are_limited_and_a_finished_one_frees_a_place() {
    let mut store = working();
    for n in 1..=5 {
        Session::new(&mut store, 4_000)
            .child_created(child(&format!("c{n}"), SessionStatus::Starting))
            .unwrap();
    }
    let refused = Session::new(&mut store, 5_000).plan_spawn(&ChildLimits::default());
    assert_debug_snapshot!(limit_message(refused));
    Session::new(&mut store, 6_000)
        .child_status("c3", SessionStatus::Idle, 9)
        .unwrap();
    assert!(Session::new(&mut store, 6_000)
        .plan_spawn(&ChildLimits::default())
        .is_ok());
    let fewer = ChildLimits {
        max_running: 4,
        ..ChildLimits::default()
    };
    assert!(Session::new(&mut store, 6_000).plan_spawn(&fewer).is_err());
}

#[test]
fn the_root_counts_every_session_spawned_in_its_tree() {
    let mut store = created();
    let limits = ChildLimits::default();
    for n in 1..=15 {
        assert_eq!(
            Session::new(&mut store, 4_000)
                .reserve_in_tree(&limits)
                .unwrap(),
            n
        );
    }
    assert_debug_snapshot!(limit_message(
        Session::new(&mut store, 4_000).reserve_in_tree(&limits)
    ));
    // Only the root keeps the count.
    let mut child_store = created();
    Session::new(&mut child_store, 4_000)
        .adopt(&Family {
            parent_session_id: Some("p".to_owned()),
            root_session_id: "p".to_owned(),
            depth: 1,
            reported: None,
            spawned_in_tree: 0,
            children: Vec::new(),
        })
        .unwrap();
    assert!(matches!(
        Session::new(&mut child_store, 4_000).reserve_in_tree(&limits),
        Err(SessionError::Conflict(_))
    ));
}

#[test]
fn the_parent_logs_each_status_change_of_a_child_once_and_in_order() {
    let mut store = working();
    let mut lines = Vec::new();
    type Step = dyn Fn(&mut Session<'_, MemoryStore>) -> Result<Effects, SessionError>;
    let mut step = |store: &mut MemoryStore, f: &Step| {
        let effects = f(&mut Session::new(store, 5_000)).unwrap();
        lines.extend(render(&effects));
    };
    step(&mut store, &|s| {
        s.child_created(child("c1", SessionStatus::Starting))
    });
    step(&mut store, &|s| {
        s.child_status("c1", SessionStatus::Running, 4)
    });
    // The same status again: nothing to log.
    step(&mut store, &|s| {
        s.child_status("c1", SessionStatus::Running, 6)
    });
    // An older report arriving late is ignored.
    step(&mut store, &|s| {
        s.child_status("c1", SessionStatus::Starting, 2)
    });
    step(&mut store, &|s| {
        s.child_status("c1", SessionStatus::Idle, 9)
    });
    assert_debug_snapshot!(lines);
    assert_eq!(
        Session::new(&mut store, 5_000).child("c1").unwrap().status,
        SessionStatus::Idle
    );
    assert_eq!(
        Session::new(&mut store, 5_000).child_status("stranger", SessionStatus::Idle, 1),
        Err(SessionError::NotFound)
    );
    assert_eq!(
        Session::new(&mut store, 5_000).child("stranger"),
        Err(SessionError::NotFound)
    );
}

#[test]
fn a_child_reports_only_changes_of_its_status() {
    let mut store = created();
    // A root reports to nobody.
    assert_eq!(
        Session::new(&mut store, 2_000).status_report().unwrap(),
        None
    );
    Session::new(&mut store, 2_000)
        .adopt(&Family {
            parent_session_id: Some("p".to_owned()),
            root_session_id: "p".to_owned(),
            depth: 1,
            reported: None,
            spawned_in_tree: 0,
            children: Vec::new(),
        })
        .unwrap();
    let first = Session::new(&mut store, 2_000)
        .status_report()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.parent_session_id.as_str(), first.id.as_str()),
        ("p", "s1")
    );
    assert_eq!(first.status, SessionStatus::Starting);
    assert_eq!(
        Session::new(&mut store, 2_000).status_report().unwrap(),
        None
    );
    Session::new(&mut store, 3_000)
        .submit_prompt(&author("ada"), "go", "k1", false)
        .unwrap();
    let running = Session::new(&mut store, 3_000)
        .status_report()
        .unwrap()
        .unwrap();
    assert_eq!(running.status, SessionStatus::Running);
    assert!(running.seq > first.seq);
    assert_eq!(
        store.family().unwrap().unwrap().reported,
        Some((SessionStatus::Running, running.seq))
    );
}

#[test]
fn stop_tree_names_every_child_and_the_other_scopes_none() {
    let mut store = working();
    for id in ["c1", "c2"] {
        Session::new(&mut store, 4_000)
            .child_created(child(id, SessionStatus::Running))
            .unwrap();
    }
    let turn = Session::new(&mut store, 5_000)
        .stop(&author("ada"), StopScope::Turn)
        .unwrap();
    assert!(turn.stop_children.is_empty());
    let tree = Session::new(&mut store, 5_000)
        .stop(&author("ada"), StopScope::Tree)
        .unwrap();
    let stopped: Vec<(&str, &str)> = tree
        .stop_children
        .iter()
        .map(|stop| (stop.session_id.as_str(), stop.by.login.as_str()))
        .collect();
    assert_eq!(stopped, vec![("c1", "ada"), ("c2", "ada")]);
    // The session itself stops as with `session`: its agent saves its work and shuts down.
    assert!(tree
        .to_agent
        .iter()
        .any(|m| matches!(m, nightshift_protocol::ServerToAgent::Shutdown { .. })));
    let session = Session::new(&mut store, 5_000)
        .stop(&author("ada"), StopScope::Session)
        .unwrap();
    assert!(session.stop_children.is_empty());
}

//! Round trips of every message type through its JSON form, in the contract's exact shapes.

use nightshift_protocol::{
    decode_agent_message, decode_client_message, AgentMessage, ClientMessage, ServerMessage,
    ServerToAgent,
};
use serde_json::{json, Value};

/// Decode `value` as `T`, encode it again, and require the same JSON.
fn check<T: serde::de::DeserializeOwned + serde::Serialize>(value: Value) -> T {
    let decoded: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
    let encoded = serde_json::to_value(&decoded).unwrap();
    assert_eq!(encoded, value);
    decoded
}

fn author() -> Value {
    json!({"login": "ada", "name": "Ada", "email": "ada@example.com"})
}

fn events() -> Vec<Value> {
    vec![
        json!({"type": "prompt_queued", "prompt_id": "p1", "author": author(), "text": "fix it"}),
        json!({"type": "prompt_started", "prompt_id": "p1"}),
        json!({"type": "prompt_finished", "prompt_id": "p1", "status": "completed"}),
        json!({"type": "prompt_finished", "prompt_id": "p1", "status": "failed", "error": "model overloaded"}),
        json!({"type": "prompt_cancelled", "prompt_id": "p2", "by": "bob"}),
        json!({"type": "token", "prompt_id": "p1", "text": "Hel"}),
        json!({"type": "message", "prompt_id": "p1", "role": "assistant", "text": "Hello"}),
        json!({"type": "tool_call", "prompt_id": "p1", "call_id": "c1", "tool": "read_file", "input": {"path": "a.rs"}}),
        json!({"type": "tool_result", "call_id": "c1", "ok": true, "output": "fn main() {}", "duration_ms": 3}),
        json!({"type": "file_changed", "path": "a.rs", "change": "modified", "additions": 2, "deletions": 1}),
        json!({"type": "sandbox_status", "status": "ready", "detail": "agent connected"}),
        json!({"type": "git_sync", "state": "done", "commit": "abc123"}),
        json!({"type": "push", "branch": "nightshift/s1", "commit": "abc123"}),
        json!({"type": "pull_request", "number": 7, "url": "https://example.com/pr/7", "state": "open"}),
        json!({"type": "usage", "prompt_id": "p1", "input_tokens": 10, "output_tokens": 5, "cost_usd": null, "total_cost_usd": null}),
        json!({"type": "usage", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.01, "total_cost_usd": 0.02}),
        json!({"type": "child_session", "id": "s2", "status": "running"}),
        json!({"type": "snapshot", "id": "snap1", "reason": "prompt_finished"}),
        json!({"type": "notice", "level": "warn", "text": "demo model"}),
    ]
}

#[test]
fn every_event_round_trips() {
    for event in events() {
        let decoded: nightshift_protocol::Event = check(event.clone());
        assert_eq!(Some(decoded.kind()), event["type"].as_str());
        check::<ServerMessage>(
            json!({"type": "event", "seq": 4, "ts_ms": 1700000000000u64, "event": event}),
        );
    }
}

#[test]
fn every_client_message_round_trips() {
    let messages = [
        json!({"type": "hello", "protocol_version": 1, "last_seq": 12, "client": "web"}),
        json!({"type": "hello", "protocol_version": 1, "last_seq": null, "client": null}),
        json!({"type": "prompt", "text": "add tests", "idempotency_key": "k1"}),
        json!({"type": "prompt", "text": "see this", "idempotency_key": "k2", "attachments": [{"kind": "image"}]}),
        json!({"type": "cancel_prompt", "prompt_id": "p2"}),
        json!({"type": "stop", "scope": "turn"}),
        json!({"type": "stop", "scope": "session"}),
        json!({"type": "stop", "scope": "tree"}),
        json!({"type": "typing"}),
        json!({"type": "ping"}),
    ];
    for message in messages {
        let decoded: ClientMessage = check(message.clone());
        assert_eq!(
            decode_client_message(&message.to_string()).unwrap(),
            decoded
        );
    }
}

#[test]
fn every_server_message_round_trips() {
    let participant =
        json!({"login": "ada", "name": "Ada", "role": "owner", "online": true, "typing": false});
    let session = json!({
        "id": "s1", "repo": "demo/hello", "base_branch": "main", "branch": "nightshift/s1", "title": "t",
        "model": "m", "created_by": author(), "created_ms": 1
    });
    let messages = [
        json!({"type": "welcome", "session": session, "you": participant, "participants": [participant],
               "queue": [{"prompt_id": "p1", "author": author(), "text": "x", "status": "running", "created_ms": 5}],
               "last_seq": 9}),
        json!({"type": "presence", "participants": [participant]}),
        json!({"type": "prompt_accepted", "prompt_id": "p1", "idempotency_key": "k", "position": 0}),
        json!({"type": "error", "code": "unknown_type", "message": "unknown message type `x`"}),
        json!({"type": "pong"}),
        json!({"type": "events", "events": [
            {"seq": 4, "ts_ms": 1, "event": {"type": "token", "prompt_id": "p1", "text": "a"}},
            {"seq": 5, "ts_ms": 1, "event": {"type": "token", "prompt_id": "p1", "text": "b"}}
        ]}),
    ];
    for message in messages {
        check::<ServerMessage>(message);
    }
}

#[test]
fn every_agent_message_round_trips() {
    let agent = [
        json!({"type": "hello", "protocol_version": 1, "sandbox_id": "sb1", "resume_from": 3}),
        json!({"type": "event", "producer_seq": 3, "event": {"type": "token", "prompt_id": "p1", "text": "x"}}),
        json!({"type": "heartbeat"}),
    ];
    for message in agent {
        let decoded: AgentMessage = check(message.clone());
        assert_eq!(decode_agent_message(&message.to_string()).unwrap(), decoded);
    }
    let server = [
        json!({"type": "welcome", "session": "s1", "last_producer_seq": 2}),
        json!({"type": "ack", "producer_seq": 3}),
        json!({"type": "run_prompt", "prompt_id": "p1", "text": "x", "author": author(), "model": "m"}),
        json!({"type": "stop", "prompt_id": "p1"}),
        json!({"type": "stop", "prompt_id": null}),
        json!({"type": "snapshot", "reason": "prompt_finished"}),
        json!({"type": "shutdown", "reason": "timeout", "deadline_ms": 99}),
        json!({"type": "error", "code": "invalid_message", "message": "no"}),
    ];
    for message in server {
        check::<ServerToAgent>(message);
    }
}

#[test]
fn http_bodies_round_trip() {
    use nightshift_protocol::http::*;
    use nightshift_protocol::provider::*;
    check::<CreateSessionRequest>(
        json!({"repo": "demo/hello", "base_branch": "main", "title": null, "model": null, "parent_session_id": null}),
    );
    check::<ErrorBody>(json!({"error": {"code": "not_found", "message": "session not found"}}));
    check::<CreateSandboxRequest>(
        json!({"repo": "demo/hello", "snapshot": null, "base_branch": "main", "session_id": "s1",
        "connect_url": "ws://127.0.0.1:8787/sandbox/s1/ws", "sandbox_token": "t", "timeout_ms": 14400000u64}),
    );
    check::<SandboxInfo>(
        json!({"id": "sb1", "session_id": "s1", "repo": "demo/hello", "status": "running", "created_ms": 1, "detail": ""}),
    );
    check::<ImageRequest>(json!({"repo": "demo/hello", "ref": "main", "setup": "make deps"}));
    let image = json!({"id": "i1", "repo": "demo/hello", "ref": "main", "commit": "abc", "created_ms": 1,
        "finished_ms": 2, "age_ms": 5, "status": "ready", "setup": null, "setup_log": "ok\n", "size_bytes": 10,
        "file_count": 3, "error": null});
    check::<ImageInfo>(image.clone());
    check::<ImageList>(json!({"images": [image], "building": null, "latest_failure": null}));
    check::<SnapshotRequest>(json!({"reason": "prompt_finished"}));
    check::<SnapshotInfo>(json!({"id": "ab12", "image_id": "i1", "repo": "demo/hello",
        "session_id": "s1", "created_ms": 1, "size_bytes": 99, "reason": "prompt_finished"}));
}

#[test]
fn repository_bodies_round_trip() {
    use nightshift_protocol::http::*;
    use nightshift_protocol::provider::*;
    let summary = json!({
        "repo": "demo/hello", "base_branch": "main",
        "image": {"id": "img-1", "commit": "abc123", "age_ms": 4500000u64},
        "building": false,
        "warning": {"kind": "stale", "message": "The image of demo/hello is 75 min old (cadence 30 min): the first sync may take longer."},
        "cadence_ms": 1800000u64,
        "last_build": {"id": "img-1", "status": "succeeded", "started_ms": 1, "finished_ms": 2, "error": null},
        "next_build_ms": 1800001u64,
        "warm": {"target": 2, "requested_ms": 3, "outcome": "unsupported", "detail": null}
    });
    check::<ReposResponse>(json!({"repos": [summary]}));
    for kind in ["stale", "build_failed", "no_image"] {
        check::<RepoWarning>(json!({"kind": kind, "message": "m"}));
    }
    check::<RepoSummary>(
        json!({"repo": "a/b", "base_branch": "main", "image": null, "building": true, "warning": null,
        "cadence_ms": 60000, "last_build": null, "next_build_ms": null, "warm": null}),
    );
    check::<WarmRequest>(json!({"repo": "demo/hello"}));
    check::<WarmResponse>(
        json!({"repo": "demo/hello", "requested": false, "target": null, "retry_after_ms": 30000}),
    );
    check::<RepoSettingsRequest>(json!({"cadence_ms": 600000, "base_branch": "trunk"}));
    // The provider side of warm-ups.
    check::<PoolTargetRequest>(json!({"target": 1}));
}

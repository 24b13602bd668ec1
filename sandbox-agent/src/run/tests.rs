//! The agent loop against a local model server that plays scripted SSE, asserting on the events the agent
//! emits and on what it sent to the model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::stream;
use nightshift_protocol::event::FileChange;
use nightshift_protocol::{Author, Event, PromptStatus};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::agent_loop::{run_prompt, Agent, AgentConfig, MAX_MODEL_CALLS};
use super::gate::SyncGate;
use super::provider::{ApiKey, ProviderConfig, Providers, RetryPolicy};
use super::queue::PromptRequest;
use super::workspace::Workspace;

/// What the fake model answers to call number `n` (from 0).
#[derive(Clone)]
enum Reply {
    Sse(String),
    /// Some SSE, then the connection stays open forever.
    Hang(String),
    Status(u16, &'static str),
}

#[derive(Clone, Default)]
struct ModelServer {
    replies: Arc<Mutex<Vec<Reply>>>,
    /// Used when `replies` is exhausted.
    fallback: Arc<Mutex<Option<Reply>>>,
    requests: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
}

async fn messages(
    State(server): State<ModelServer>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    server.requests.lock().unwrap().push((headers, body));
    let reply = {
        let mut replies = server.replies.lock().unwrap();
        if replies.is_empty() {
            server
                .fallback
                .lock()
                .unwrap()
                .clone()
                .expect("no scripted reply left")
        } else {
            replies.remove(0)
        }
    };
    match reply {
        Reply::Sse(text) => ([("content-type", "text/event-stream")], text).into_response(),
        Reply::Hang(text) => {
            let chunks = stream::iter([Ok::<_, std::io::Error>(text)]).chain(stream::pending());
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(chunks),
            )
                .into_response()
        }
        Reply::Status(status, body) => {
            (StatusCode::from_u16(status).unwrap(), body).into_response()
        }
    }
}

use futures_util::StreamExt as _;

/// A client of the fake model at `url`, without retries (the provider tests cover those).
fn providers(url: &str, api_key: Option<&str>) -> Providers {
    Providers::new(ProviderConfig {
        anthropic_api_key: api_key.map(|key| ApiKey::new(key.to_owned())),
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        ..ProviderConfig::new(url)
    })
    .unwrap()
}

/// An agent on a workspace that is not a git repository: no catch-up, no commits.
fn agent(url: &str, api_key: Option<&str>, workspace: Workspace) -> Agent {
    Agent::new(
        providers(url, api_key),
        workspace,
        None,
        SyncGate::done(),
        AgentConfig::default(),
    )
}

async fn start_model(replies: Vec<Reply>, fallback: Option<Reply>) -> (String, ModelServer) {
    let server = ModelServer {
        replies: Arc::new(Mutex::new(replies)),
        fallback: Arc::new(Mutex::new(fallback)),
        ..ModelServer::default()
    };
    let app = Router::new()
        .route("/v1/messages", post(messages))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, server)
}

fn sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|data| {
            format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap()
            )
        })
        .collect()
}

fn message_start(model: &str, input_tokens: u64) -> Value {
    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
        "content": [], "model": model, "stop_reason": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})
}

fn text_block(index: usize, pieces: &[&str]) -> Vec<Value> {
    let mut events = vec![
        json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
    ];
    for piece in pieces {
        events.push(json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}));
    }
    events.push(json!({"type": "content_block_stop", "index": index}));
    events
}

fn tool_block(index: usize, id: &str, name: &str, input: &Value) -> Vec<Value> {
    let json = input.to_string();
    let (first, second) = json.split_at(json.len() / 2);
    vec![
        json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": first}}),
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": second}}),
        json!({"type": "content_block_stop", "index": index}),
    ]
}

fn message_end(stop_reason: &str, output_tokens: u64) -> Vec<Value> {
    vec![
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}}),
        json!({"type": "message_stop"}),
    ]
}

fn reply(
    model: &str,
    input_tokens: u64,
    blocks: Vec<Vec<Value>>,
    stop_reason: &str,
    output_tokens: u64,
) -> Reply {
    let mut events = vec![message_start(model, input_tokens), json!({"type": "ping"})];
    events.extend(blocks.into_iter().flatten());
    events.extend(message_end(stop_reason, output_tokens));
    Reply::Sse(sse(&events))
}

struct Run {
    events: Vec<Event>,
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

async fn run_one(url: &str, api_key: Option<&str>, cancel_after: Option<Duration>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(root.join("src/lib.rs"), "pub fn one() {}\n").unwrap();
    let workspace = Workspace::open(&root).unwrap();
    let agent = agent(url, api_key, workspace);
    let request = PromptRequest {
        prompt_id: "p1".into(),
        text: "add a greeting".into(),
        author: Author {
            login: "ada".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
        },
        model: "claude-test".into(),
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    if cancel_after == Some(Duration::ZERO) {
        cancel.cancel();
    } else if let Some(delay) = cancel_after {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            cancel.cancel();
        });
    }
    tokio::time::timeout(
        Duration::from_secs(20),
        run_prompt(&agent, &request, &tx, &cancel),
    )
    .await
    .expect("prompt finishes");
    drop(tx);
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        events.push(event);
    }
    let root = agent.workspace.root().to_path_buf();
    Run {
        events,
        _dir: dir,
        root,
    }
}

fn token(text: &str) -> Event {
    Event::Token {
        prompt_id: "p1".into(),
        text: text.into(),
    }
}

fn finished(status: PromptStatus, error: Option<&str>) -> Event {
    Event::PromptFinished {
        prompt_id: "p1".into(),
        status,
        error: error.map(str::to_owned),
    }
}

fn usage(input_tokens: u64, output_tokens: u64) -> Event {
    Event::Usage {
        prompt_id: Some("p1".into()),
        input_tokens,
        output_tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: None,
        total_cost_usd: None,
    }
}

#[tokio::test]
async fn tool_calls_round_trip_through_the_model() {
    let write_input = json!({"path": "src/greeting.rs", "content": "pub fn hi() {}\n"});
    let replies = vec![
        reply(
            "nightshift-scripted-1",
            10,
            vec![
                text_block(0, &["Let me ", "look."]),
                tool_block(1, "toolu_1", "list_files", &json!({})),
                tool_block(2, "toolu_2", "read_file", &json!({"path": "../etc/passwd"})),
            ],
            "tool_use",
            20,
        ),
        reply(
            "nightshift-scripted-1",
            30,
            vec![tool_block(0, "toolu_3", "write_file", &write_input)],
            "tool_use",
            5,
        ),
        reply(
            "nightshift-scripted-1",
            40,
            vec![text_block(0, &["Done", "."])],
            "end_turn",
            7,
        ),
    ];
    let (url, server) = start_model(replies, None).await;
    let run = run_one(&url, Some("sk-test"), None).await;

    let notice = Event::Notice {
        level: "warn".into(),
        text: "Demo model: these responses are scripted, not from a real language model. Set ANTHROPIC_API_KEY (or OPENAI_API_KEY / OPENAI_BASE_URL) to use a real model."
            .into(),
    };
    // Durations vary; compare them as zero.
    let events: Vec<Event> = run
        .events
        .into_iter()
        .map(|event| match event {
            Event::ToolResult {
                call_id,
                ok,
                output,
                ..
            } => Event::ToolResult {
                call_id,
                ok,
                output,
                duration_ms: 0,
            },
            other => other,
        })
        .collect();
    let expected = vec![
        Event::PromptStarted {
            prompt_id: "p1".into(),
        },
        notice,
        token("Let me "),
        token("look."),
        Event::Message {
            prompt_id: "p1".into(),
            role: "assistant".into(),
            text: "Let me look.".into(),
        },
        usage(10, 20),
        Event::ToolCall {
            prompt_id: "p1".into(),
            call_id: "toolu_1".into(),
            tool: "list_files".into(),
            input: json!({}),
        },
        Event::ToolResult {
            call_id: "toolu_1".into(),
            ok: true,
            output: "src/\nsrc/lib.rs".into(),
            duration_ms: 0,
        },
        Event::ToolCall {
            prompt_id: "p1".into(),
            call_id: "toolu_2".into(),
            tool: "read_file".into(),
            input: json!({"path": "../etc/passwd"}),
        },
        Event::ToolResult {
            call_id: "toolu_2".into(),
            ok: false,
            output: "path `../etc/passwd` is outside the workspace".into(),
            duration_ms: 0,
        },
        usage(30, 5),
        Event::ToolCall {
            prompt_id: "p1".into(),
            call_id: "toolu_3".into(),
            tool: "write_file".into(),
            input: write_input,
        },
        Event::ToolResult {
            call_id: "toolu_3".into(),
            ok: true,
            output: "wrote 15 bytes to src/greeting.rs (+1 -0)".into(),
            duration_ms: 0,
        },
        Event::FileChanged {
            path: "src/greeting.rs".into(),
            change: FileChange::Added,
            additions: 1,
            deletions: 0,
            diff: Some(
                "--- /dev/null\n+++ b/src/greeting.rs\n@@ -0,0 +1 @@\n+pub fn hi() {}\n".into(),
            ),
        },
        token("Done"),
        token("."),
        Event::Message {
            prompt_id: "p1".into(),
            role: "assistant".into(),
            text: "Done.".into(),
        },
        usage(40, 7),
        finished(PromptStatus::Completed, None),
    ];
    assert_eq!(events, expected);
    assert_eq!(
        std::fs::read_to_string(run.root.join("src/greeting.rs")).unwrap(),
        "pub fn hi() {}\n"
    );

    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    let (headers, first) = &requests[0];
    assert_eq!(headers["x-api-key"], "sk-test");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(first["model"], "claude-test");
    assert_eq!(first["stream"], true);
    assert_eq!(first["max_tokens"], 8192);
    assert_eq!(
        first["messages"],
        json!([{"role": "user", "content": "add a greeting"}])
    );
    let names: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let table: Vec<&str> = super::tools::TOOLS.iter().map(|tool| tool.name).collect();
    assert_eq!(names, table, "every call carries the whole tool table");
    assert!(first["system"].as_str().unwrap().contains("- write_file: "));

    let (_, second) = &requests[1];
    assert_eq!(
        second["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "list_files", "input": {}},
            {"type": "tool_use", "id": "toolu_2", "name": "read_file", "input": {"path": "../etc/passwd"}},
        ]})
    );
    assert_eq!(
        second["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "src/\nsrc/lib.rs", "is_error": false},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "path `../etc/passwd` is outside the workspace", "is_error": true},
        ]})
    );
    let (_, third) = &requests[2];
    assert_eq!(third["messages"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn no_api_key_sends_no_header_and_real_models_get_no_notice() {
    let (url, server) = start_model(
        vec![reply(
            "claude-x",
            3,
            vec![text_block(0, &["hi"])],
            "end_turn",
            2,
        )],
        None,
    )
    .await;
    let run = run_one(&url, None, None).await;
    assert_eq!(
        run.events,
        vec![
            Event::PromptStarted {
                prompt_id: "p1".into()
            },
            token("hi"),
            Event::Message {
                prompt_id: "p1".into(),
                role: "assistant".into(),
                text: "hi".into()
            },
            usage(3, 2),
            finished(PromptStatus::Completed, None),
        ]
    );
    assert!(server.requests.lock().unwrap()[0]
        .0
        .get("x-api-key")
        .is_none());
}

#[tokio::test]
async fn http_errors_fail_the_prompt_with_status_and_body() {
    let (url, _server) =
        start_model(vec![Reply::Status(529, r#"{"error":"overloaded"}"#)], None).await;
    let run = run_one(&url, None, None).await;
    assert_eq!(
        run.events,
        vec![
            Event::PromptStarted {
                prompt_id: "p1".into()
            },
            finished(
                PromptStatus::Failed,
                Some(r#"model api answered 529: {"error":"overloaded"}"#)
            ),
        ]
    );
}

#[tokio::test]
async fn truncated_stream_fails_the_prompt() {
    let events = [message_start("m", 5)]
        .into_iter()
        .chain(text_block(0, &["par"]))
        .collect::<Vec<_>>();
    let (url, _server) = start_model(vec![Reply::Sse(sse(&events))], None).await;
    let run = run_one(&url, None, None).await;
    assert_eq!(
        run.events.last(),
        Some(&finished(
            PromptStatus::Failed,
            Some("model stream ended before message_stop")
        ))
    );
}

#[tokio::test]
async fn stop_cancels_a_streaming_prompt() {
    let events = [message_start("m", 5)]
        .into_iter()
        .chain(text_block(0, &["one"]).into_iter().take(2))
        .collect::<Vec<_>>();
    let (url, _server) = start_model(vec![Reply::Hang(sse(&events))], None).await;
    let run = run_one(&url, None, Some(Duration::from_millis(300))).await;
    assert_eq!(
        run.events,
        vec![
            Event::PromptStarted {
                prompt_id: "p1".into()
            },
            token("one"),
            finished(PromptStatus::Stopped, None),
        ]
    );
}

/// A stop that lands as a model call starts (the call sees it before the loop does) ends the turn as
/// stopped, never failed; `select!` picks its branch at random, so this tries it many times.
#[tokio::test]
async fn a_stop_as_a_model_call_starts_is_stopped_not_failed() {
    let answer = reply("m", 1, vec![text_block(0, &["hi"])], "end_turn", 1);
    let (url, _server) = start_model(Vec::new(), Some(answer)).await;
    for _ in 0..24 {
        let run = run_one(&url, None, Some(Duration::ZERO)).await;
        assert_eq!(
            run.events.last(),
            Some(&finished(PromptStatus::Stopped, None))
        );
    }
}

#[tokio::test]
async fn endless_tool_calls_are_cut_off() {
    let endless = reply(
        "m",
        1,
        vec![tool_block(
            0,
            "toolu_x",
            "list_files",
            &json!({"path": "src"}),
        )],
        "tool_use",
        1,
    );
    let (url, server) = start_model(Vec::new(), Some(endless)).await;
    let run = run_one(&url, None, None).await;
    assert_eq!(server.requests.lock().unwrap().len(), MAX_MODEL_CALLS);
    assert_eq!(
        run.events.last(),
        Some(&finished(
            PromptStatus::Failed,
            Some("gave up after 50 model calls without the model finishing its turn")
        ))
    );
}

/// Prompts run one at a time in arrival order; repeats are ignored; `stop` reaches a queued prompt and
/// the running one.
#[tokio::test]
async fn queue_runs_prompts_in_order_and_routes_stops() {
    use super::queue::{self, PromptCommand};

    let hang = [message_start("m", 1)]
        .into_iter()
        .chain(text_block(0, &["working"]).into_iter().take(2))
        .collect::<Vec<_>>();
    let replies = vec![
        Reply::Hang(sse(&hang)),
        reply("m", 2, vec![text_block(0, &["second"])], "end_turn", 3),
    ];
    let (url, server) = start_model(replies, None).await;
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::open(dir.path()).unwrap();
    let agent = Arc::new(agent(&url, None, workspace));
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let queue = tokio::spawn(queue::run(agent, commands_rx, events_tx, None));

    let prompt = |id: &str| {
        PromptCommand::Run(PromptRequest {
            prompt_id: id.into(),
            text: format!("prompt {id}"),
            author: Author {
                login: "ada".into(),
                name: "Ada".into(),
                email: "ada@example.com".into(),
            },
            model: String::new(),
        })
    };
    let mut lifecycle = Vec::new();
    async fn until(
        events: &mut mpsc::Receiver<Event>,
        lifecycle: &mut Vec<Event>,
        done: impl Fn(&Event) -> bool,
    ) {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("event in time")
                .expect("channel open");
            let stop = done(&event);
            if matches!(
                event,
                Event::PromptStarted { .. } | Event::PromptFinished { .. }
            ) {
                lifecycle.push(event);
            }
            if stop {
                return;
            }
        }
    }
    let started = |id: &str| Event::PromptStarted {
        prompt_id: id.into(),
    };
    let finished = |id: &str, status| Event::PromptFinished {
        prompt_id: id.into(),
        status,
        error: None,
    };

    commands_tx.send(prompt("p1")).unwrap();
    until(&mut events_rx, &mut lifecycle, |e| {
        matches!(e, Event::Token { .. })
    })
    .await;
    for command in [
        prompt("p1"),
        prompt("p2"),
        prompt("p3"),
        PromptCommand::Stop {
            prompt_id: Some("p3".into()),
        },
    ] {
        commands_tx.send(command).unwrap();
    }
    until(
        &mut events_rx,
        &mut lifecycle,
        |e| matches!(e, Event::PromptFinished { prompt_id, .. } if prompt_id == "p3"),
    )
    .await;
    commands_tx
        .send(PromptCommand::Stop { prompt_id: None })
        .unwrap();
    until(
        &mut events_rx,
        &mut lifecycle,
        |e| matches!(e, Event::PromptFinished { prompt_id, .. } if prompt_id == "p2"),
    )
    .await;
    drop(commands_tx);
    tokio::time::timeout(Duration::from_secs(5), queue)
        .await
        .expect("queue ends")
        .unwrap();

    assert_eq!(
        lifecycle,
        vec![
            started("p1"),
            finished("p3", PromptStatus::Stopped),
            finished("p1", PromptStatus::Stopped),
            started("p2"),
            finished("p2", PromptStatus::Completed),
        ]
    );
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].1["model"], super::agent_loop::DEFAULT_MODEL);
    // The conversation is kept: p1's turn (closed as stopped), then p2.
    let messages = requests[1].1["messages"].as_array().unwrap();
    assert_eq!(messages[0]["content"], "prompt p1");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages.last().unwrap()["content"], "prompt p2");
}

// ---- The engine on a real git working copy: catch-up, hooks, read-only paths, compaction, commits ----

mod engine {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::run::gate::{sync_gate, SyncState};
    use crate::run::git::Git;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "Seed")
            .env("GIT_AUTHOR_EMAIL", "seed@example.com")
            .env("GIT_COMMITTER_NAME", "Seed")
            .env("GIT_COMMITTER_EMAIL", "seed@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A bare remote with `files` committed on `main`, and a clone of it (the sandbox's workspace).
    struct Repo {
        _dir: tempfile::TempDir,
        remote: PathBuf,
        clone: PathBuf,
    }

    fn repo(files: &[(&str, &str)]) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote.git");
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", "remote.git"],
        );
        git(&seed, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            let path = seed.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
            if path.extension().is_some_and(|e| e == "sh") {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        git(&seed, &["add", "."]);
        git(&seed, &["commit", "-q", "-m", "seed"]);
        git(&seed, &["push", "-q", remote.to_str().unwrap(), "main"]);
        git(
            dir.path(),
            &["clone", "-q", remote.to_str().unwrap(), "clone"],
        );
        let clone = dir.path().join("clone");
        Repo {
            _dir: dir,
            remote,
            clone,
        }
    }

    struct Engine {
        agent: Arc<Agent>,
        events: mpsc::Receiver<Event>,
        events_tx: mpsc::Sender<Event>,
    }

    /// An agent for session `s1` on `repo`, caught up (its catch-up events are in `events`).
    async fn engine(url: &str, repo: &Repo, config: AgentConfig) -> Engine {
        let workspace = Workspace::open(&repo.clone).unwrap();
        let (setter, gate) = sync_gate();
        let agent = Arc::new(Agent::new(
            providers(url, None),
            workspace,
            Some(Git::new(&repo.clone)),
            gate,
            AgentConfig {
                session_id: Some("s1".into()),
                ..config
            },
        ));
        let (events_tx, events) = mpsc::channel(4096);
        agent.catch_up(setter, &events_tx).await;
        Engine {
            agent,
            events,
            events_tx,
        }
    }

    impl Engine {
        fn drain(&mut self) -> Vec<Event> {
            let mut out = Vec::new();
            while let Ok(event) = self.events.try_recv() {
                out.push(event);
            }
            out
        }

        async fn prompt(&mut self, id: &str, text: &str) -> Vec<Event> {
            let request = PromptRequest {
                prompt_id: id.into(),
                text: text.into(),
                author: Author {
                    login: "ada".into(),
                    name: "Ada Lovelace".into(),
                    email: "ada@example.com".into(),
                },
                model: "claude-test".into(),
            };
            let cancel = CancellationToken::new();
            tokio::time::timeout(
                Duration::from_secs(30),
                run_prompt(&self.agent, &request, &self.events_tx, &cancel),
            )
            .await
            .expect("prompt finishes");
            self.drain()
        }
    }

    fn tool_step(calls: &[(&str, &str, Value)]) -> Reply {
        let blocks = calls
            .iter()
            .enumerate()
            .map(|(i, (id, name, input))| tool_block(i, id, name, input))
            .collect();
        reply("claude-test", 100, blocks, "tool_use", 10)
    }

    fn done_step() -> Reply {
        reply(
            "claude-test",
            100,
            vec![text_block(0, &["Done."])],
            "end_turn",
            3,
        )
    }

    fn results(events: &[Event]) -> Vec<(bool, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::ToolResult { ok, output, .. } => Some((*ok, output.clone())),
                _ => None,
            })
            .collect()
    }

    fn notices(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Notice { level, text } => Some(format!("{level}: {text}")),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn catch_up_opens_the_gate_and_a_prompt_is_committed_as_its_author_and_pushed() {
        let repo = repo(&[("README.md", "hello\n")]);
        let (url, _server) = start_model(
            vec![
                tool_step(&[(
                    "t1",
                    "write_file",
                    json!({"path": "NOTES.md", "content": "notes\n"}),
                )]),
                done_step(),
                done_step(),
            ],
            None,
        )
        .await;
        let mut engine = engine(&url, &repo, AgentConfig::default()).await;
        let head = git(&repo.clone, &["rev-parse", "HEAD"]);
        assert_eq!(
            engine.drain(),
            [
                Event::GitSync {
                    state: "started".into(),
                    commit: None
                },
                Event::GitSync {
                    state: "done".into(),
                    commit: Some(head.trim().to_owned())
                },
            ]
        );
        assert_eq!(engine.agent.gate.state(), SyncState::Done);
        assert_eq!(
            git(&repo.clone, &["branch", "--show-current"]).trim(),
            "nightshift/s1"
        );

        let events = engine.prompt("p1", "Write notes").await;
        let push = events.iter().find_map(|e| match e {
            Event::Push { branch, commit } => Some((branch.clone(), commit.clone())),
            _ => None,
        });
        let (branch, commit) = push.expect("a push event");
        assert_eq!(branch, "nightshift/s1");
        assert!(matches!(
            events.last(),
            Some(Event::PromptFinished {
                status: PromptStatus::Completed,
                ..
            })
        ));
        let log = git(
            &repo.remote,
            &[
                "log",
                "-1",
                "--format=%H|%an <%ae>|%cn <%ce>|%s",
                "nightshift/s1",
            ],
        );
        assert_eq!(
            log.trim(),
            format!("{commit}|Ada Lovelace <ada@example.com>|Nightshift <agent@nightshift.dev>|Write notes")
        );
        // A prompt that changes nothing makes no commit and no push.
        let events = engine.prompt("p2", "Just look").await;
        assert!(
            !events.iter().any(|e| matches!(e, Event::Push { .. })),
            "{events:?}"
        );
        assert_eq!(
            git(&repo.remote, &["rev-parse", "nightshift/s1"]).trim(),
            commit
        );
    }

    #[tokio::test]
    async fn a_failed_catch_up_keeps_the_workspace_read_only() {
        let repo = repo(&[("README.md", "hello\n")]);
        let (url, _server) = start_model(
            vec![
                tool_step(&[
                    ("t1", "read_file", json!({"path": "README.md"})),
                    (
                        "t2",
                        "write_file",
                        json!({"path": "README.md", "content": "changed\n"}),
                    ),
                    ("t3", "bash", json!({"command": "echo changed > README.md"})),
                ]),
                done_step(),
            ],
            None,
        )
        .await;
        let mut engine = engine(
            &url,
            &repo,
            AgentConfig {
                base_branch: Some("no-such-branch".into()),
                ..AgentConfig::default()
            },
        )
        .await;
        let sync = engine.drain();
        assert_eq!(
            sync[1],
            Event::GitSync {
                state: "failed".into(),
                commit: None
            }
        );
        assert!(
            notices(&sync)
                .iter()
                .any(|n| n.starts_with("error: Git catch-up failed")),
            "{sync:?}"
        );
        assert!(matches!(engine.agent.gate.state(), SyncState::Failed(_)));

        let events = engine.prompt("p1", "try").await;
        let results = results(&events);
        assert!(
            results[0].0 && results[0].1.contains("hello"),
            "reads work: {results:?}"
        );
        assert!(
            !results[1].0 && results[1].1.contains("git sync failed"),
            "writes refused: {results:?}"
        );
        assert!(
            results[2].1.contains("Read-only file system"),
            "bash cannot write either: {results:?}"
        );
        assert_eq!(
            std::fs::read_to_string(repo.clone.join("README.md")).unwrap(),
            "hello\n"
        );
        assert!(!events.iter().any(|e| matches!(e, Event::Push { .. })));
    }

    const GUARD: &str = "#!/bin/sh\n\
        input=$(cat)\n\
        case \"$input\" in\n\
          *SECRET*) echo '{\"decision\": \"block\", \"reason\": \"no secrets in files\"}' ;;\n\
          *'\"rewrite-me\"'*) echo '{\"decision\": \"rewrite\", \"input\": {\"path\": \"rewritten.txt\", \"content\": \"by the hook\"}}' ;;\n\
          *) echo '{\"decision\": \"allow\"}' ;;\n\
        esac\n";

    #[tokio::test]
    async fn hooks_block_and_rewrite_tool_calls_and_clients_see_it() {
        let hooks = "[[hooks]]\nname = \"guard\"\nevent = \"tool.before\"\ntools = [\"write_file\"]\ncommand = [\".nightshift/guard.sh\"]\n";
        let repo = repo(&[
            ("README.md", "hello\n"),
            (".nightshift/hooks.toml", hooks),
            (".nightshift/guard.sh", GUARD),
        ]);
        let (url, server) = start_model(
            vec![
                tool_step(&[
                    (
                        "t1",
                        "write_file",
                        json!({"path": "a.txt", "content": "SECRET=1\n"}),
                    ),
                    (
                        "t2",
                        "write_file",
                        json!({"path": "rewrite-me", "content": "x"}),
                    ),
                    (
                        "t3",
                        "write_file",
                        json!({"path": ".nightshift/hooks.toml", "content": ""}),
                    ),
                    (
                        "t4",
                        "bash",
                        json!({"command": "git push --force origin HEAD"}),
                    ),
                ]),
                done_step(),
            ],
            None,
        )
        .await;
        let mut engine = engine(&url, &repo, AgentConfig::default()).await;
        engine.drain();
        let events = engine.prompt("p1", "go").await;
        let results = results(&events);
        assert_eq!(
            results[0],
            (false, "blocked by guard: no secrets in files".to_owned())
        );
        assert!(results[1].0, "{results:?}");
        assert!(!repo.clone.join("a.txt").exists());
        assert!(!repo.clone.join("rewrite-me").exists());
        assert_eq!(
            std::fs::read_to_string(repo.clone.join("rewritten.txt")).unwrap(),
            "by the hook"
        );
        assert!(
            !results[2].0
                && results[2]
                    .1
                    .starts_with("blocked by policy:read_only_paths"),
            "{results:?}"
        );
        assert!(
            !results[3].0
                && results[3]
                    .1
                    .starts_with("blocked by policy:blocked_commands"),
            "{results:?}"
        );
        let notices = notices(&events);
        assert!(notices.iter().any(|n| n == "warn: A `write_file` call was blocked by guard: no secrets in files"), "{notices:?}");
        assert!(
            notices
                .iter()
                .any(|n| n.starts_with("info: guard rewrote the arguments of `write_file`")),
            "{notices:?}"
        );
        // The model saw the block as an error result.
        let requests = server.requests.lock().unwrap();
        let results_sent = &requests[1].1["messages"][2]["content"];
        assert_eq!(results_sent[0]["is_error"], true);
    }

    #[tokio::test]
    async fn an_invalid_hook_config_blocks_every_tool_call() {
        let repo = repo(&[
            ("README.md", "hello\n"),
            (
                ".nightshift/hooks.toml",
                "[[hooks]]\nevent = \"tool.whenever\"\ncommand = [\"true\"]\n",
            ),
        ]);
        let (url, _server) = start_model(
            vec![
                tool_step(&[("t1", "read_file", json!({"path": "README.md"}))]),
                done_step(),
            ],
            None,
        )
        .await;
        let mut engine = engine(&url, &repo, AgentConfig::default()).await;
        let sync = engine.drain();
        assert!(
            notices(&sync)
                .iter()
                .any(|n| n.starts_with("error: .nightshift/hooks.toml cannot be used")),
            "{sync:?}"
        );
        let events = engine.prompt("p1", "go").await;
        let results = results(&events);
        assert!(
            !results[0].0
                && results[0]
                    .1
                    .starts_with("blocked by .nightshift/hooks.toml"),
            "{results:?}"
        );
    }

    #[tokio::test]
    async fn a_command_that_creates_a_read_only_path_is_undone() {
        let repo = repo(&[("README.md", "hello\n")]);
        let (url, _server) = start_model(
            vec![
                tool_step(&[("t1", "bash", json!({"command": "mkdir -p .nightshift && echo '[[hooks]]' > .nightshift/hooks.toml && echo ok > fine.txt"}))]),
                done_step(),
            ],
            None,
        )
        .await;
        let mut engine = engine(&url, &repo, AgentConfig::default()).await;
        engine.drain();
        let events = engine.prompt("p1", "go").await;
        let results = results(&events);
        assert!(
            !results[0].0 && results[0].1.contains("blocked by policy:read_only_paths"),
            "{results:?}"
        );
        assert!(
            !repo.clone.join(".nightshift/hooks.toml").exists(),
            "the write was undone"
        );
        assert!(repo.clone.join("fine.txt").exists(), "other writes stay");
        let changed: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::FileChanged { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(changed, ["fine.txt"]);
    }

    #[tokio::test]
    async fn older_tool_outputs_are_compacted_near_the_window_with_a_notice() {
        let big = "line of a big file\n".repeat(1500); // ~28 kB
        let repo = repo(&[("big.txt", &big)]);
        let read = |id: &str| tool_step(&[(id, "read_file", json!({"path": "big.txt"}))]);
        let (url, server) = start_model(
            vec![
                read("t1"),
                read("t2"),
                read("t3"),
                read("t4"),
                read("t5"),
                read("t6"),
                read("t7"),
                read("t8"),
                read("t9"),
                done_step(),
            ],
            None,
        )
        .await;
        let limits = crate::run::tools::ToolLimits {
            output_cap_bytes: 64 * 1024,
            ..Default::default()
        };
        let mut engine = engine(
            &url,
            &repo,
            AgentConfig {
                context_window_tokens: Some(100_000),
                limits,
                ..AgentConfig::default()
            },
        )
        .await;
        engine.drain();
        let events = engine.prompt("p1", "read it again and again").await;
        assert!(matches!(
            events.last(),
            Some(Event::PromptFinished {
                status: PromptStatus::Completed,
                ..
            })
        ));
        let notices = notices(&events);
        assert!(
            notices
                .iter()
                .any(|n| n.starts_with("info: Context compacted:")),
            "{notices:?}"
        );
        let requests = server.requests.lock().unwrap();
        let last = requests.last().unwrap().1["messages"].to_string();
        assert!(
            last.contains("[output compacted to save context"),
            "older outputs were compacted"
        );
        assert!(
            last.contains("line of a big file"),
            "the newest outputs are whole"
        );
    }
}

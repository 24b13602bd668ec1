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
    if let Some(delay) = cancel_after {
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
    assert_eq!(
        names,
        [
            "list_files",
            "read_file",
            "write_file",
            "edit_file",
            "glob",
            "grep",
            "bash",
            "git_status",
            "git_diff",
            "tool_catalogue"
        ]
    );
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
    let queue = tokio::spawn(queue::run(agent, commands_rx, events_tx));

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

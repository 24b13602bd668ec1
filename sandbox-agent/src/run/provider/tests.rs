//! The providers at their boundaries: every recorded stream in `shared/fixtures` through its assembler
//! (snapshots of the items), and the transport against a local server that plays scripted responses.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::anthropic::MessageAssembler;
use super::openai::ChunkAssembler;
use super::retry::Jitter;
use super::sse::SseDecoder;
use super::*;

// ---------------------------------------------------------------------------------------------------
// Fixtures

/// `shared/fixtures/<kind>`: beside the repository (CI's clean clone, `/work/main`), so
/// `CARGO_MANIFEST_DIR/../../shared/fixtures`; from a worktree in `wt/<name>/`, one level further up.
/// Panics if neither exists: the fixture tests must not pass by finding nothing.
pub(crate) fn fixtures(kind: &str) -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = ["../../shared/fixtures", "../../../shared/fixtures"];
    candidates
        .iter()
        .map(|relative| manifest_dir.join(relative))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| {
            panic!(
                "fixture directory shared/fixtures is missing: looked in {candidates:?} from {}",
                manifest_dir.display()
            )
        })
        .join(kind)
}

/// The fixture files of `kind` ending in `.ext`, sorted; fails if the directory is missing or empty.
fn fixture_files(kind: &str, ext: &str) -> Vec<PathBuf> {
    let dir = fixtures(kind);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixture directory {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .{ext} files in {}", dir.display());
    files
}

/// Feed `input` in chunks of `chunk_len` bytes: the items, and the error that ended the stream if any.
fn play(
    input: &[u8],
    chunk_len: usize,
    mut assembler: Box<dyn StreamAssembler>,
) -> (Vec<StreamItem>, Option<ModelError>) {
    let mut decoder = SseDecoder::new();
    let mut items = Vec::new();
    let mut events = Vec::new();
    for chunk in input.chunks(chunk_len.max(1)) {
        events.extend(decoder.feed(chunk));
    }
    events.extend(decoder.finish());
    for event in &events {
        match assembler.apply(event) {
            Ok(more) => items.extend(more),
            Err(error) => return (items, Some(error)),
        }
    }
    match assembler.finish() {
        Ok(response) => items.push(StreamItem::Finished(response)),
        Err(error) => return (items, Some(error)),
    }
    (items, None)
}

fn variant(error: &ModelError) -> String {
    let debug = format!("{error:?}");
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One line per item; the finished response's blocks indented; the error last.
fn render((items, error): &(Vec<StreamItem>, Option<ModelError>)) -> String {
    let mut out = String::new();
    for item in items {
        match item {
            StreamItem::Started { model } => writeln!(out, "started {model}"),
            StreamItem::TextDelta(text) => writeln!(out, "text {text:?}"),
            StreamItem::ThinkingDelta(text) => writeln!(out, "thinking {text:?}"),
            StreamItem::Finished(response) => {
                let usage = response.usage;
                writeln!(
                    out,
                    "finished model={} stop={} usage: input={} output={} cache_read={} cache_write={}",
                    response.model,
                    response.stop_reason,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_tokens,
                    usage.cache_write_tokens
                )
                .unwrap();
                for block in &response.content {
                    match block {
                        ContentBlock::Text(text) => writeln!(out, "  text {text:?}"),
                        ContentBlock::Thinking {
                            thinking,
                            signature,
                        } => writeln!(out, "  thinking {thinking:?} signature={signature:?}"),
                        ContentBlock::RedactedThinking { data } => {
                            writeln!(out, "  redacted_thinking {data:?}")
                        }
                        ContentBlock::ToolUse { id, name, input } => {
                            writeln!(out, "  tool_use {id} {name} {input}")
                        }
                    }
                    .unwrap();
                }
                Ok(())
            }
        }
        .unwrap();
    }
    if let Some(error) = error {
        writeln!(out, "error {}: {error}", variant(error)).unwrap();
    }
    out
}

/// Every fixture, whole and in chunks of 1, 7 and 64 bytes, gives the snapshot's items; cut anywhere, it
/// gives a typed error (or, cut after its end, the same items).
fn check_fixtures(
    kind: &str,
    ext: &str,
    assembler: fn() -> Box<dyn StreamAssembler>,
    expected_outcomes: &[(&str, &str)],
) {
    let files = fixture_files(kind, ext);
    let mut outcomes = Vec::new();
    for path in &files {
        let input = std::fs::read(path).unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy();
        let name: String = format!("{kind}__{}", stem.chars().take(16).collect::<String>());
        let whole = play(&input, input.len(), assembler());
        let rendered = render(&whole);
        let crlf = String::from_utf8_lossy(&input)
            .replace('\n', "\r\n")
            .into_bytes();
        for chunk_len in [1, 7, 64] {
            assert_eq!(
                render(&play(&input, chunk_len, assembler())),
                rendered,
                "{name}, chunk length {chunk_len}"
            );
            assert_eq!(
                render(&play(&crlf, chunk_len, assembler())),
                rendered,
                "{name}, crlf, chunk length {chunk_len}"
            );
        }
        for cut in (0..input.len()).step_by(61) {
            let cut_play = play(&input[..cut], 64, assembler());
            if cut_play.1.is_none() {
                assert_eq!(render(&cut_play), rendered, "{name} cut at {cut}");
            }
        }
        let description = format!(
            "shared/fixtures/{kind}/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        insta::with_settings!({description => description, omit_expression => true}, {
            insta::assert_snapshot!(name.as_str(), rendered);
        });
        outcomes.push((
            stem.chars().take(16).collect::<String>(),
            whole.1.as_ref().map_or("ok".to_owned(), variant),
        ));
    }
    let expected: Vec<(String, String)> = expected_outcomes
        .iter()
        .map(|(name, outcome)| ((*name).to_owned(), (*outcome).to_owned()))
        .collect();
    assert_eq!(outcomes, expected, "outcome per fixture");
}

#[test]
fn anthropic_fixtures() {
    check_fixtures(
        "anthropic-sse",
        "txt",
        || Box::new(MessageAssembler::new()),
        &[
            ("basic_response", "ok"),
            ("compaction_respo", "ok"),
            ("fallback_credit_", "ok"),
            ("fallback_respons", "ok"),
            // Cut off by max_tokens inside a tool call's input: the block never stops.
            ("incomplete_parti", "IncompleteBlock"),
            ("refusal_response", "ok"),
            ("tool_use_respons", "ok"),
        ],
    );
}

/// All twelve recorded OpenAI streams are chat completion streams (from openai-python's
/// `test_completions_streaming.py`): text, refusals, tool calls, `length`, logprobs, and one with
/// `n=3` choices, of which only choice 0 is kept.
#[test]
fn openai_fixtures() {
    check_fixtures(
        "openai-sse",
        "bin",
        || Box::new(ChunkAssembler::new()),
        &[
            ("173417d553406f03", "ok"),
            ("2018feb66ae13fcf", "ok"),
            ("4cc50a6135d25457", "ok"),
            ("569c877e69429d4c", "ok"),
            ("7e5ea4d12e7cc064", "ok"),
            ("83b060bae42eb41c", "ok"),
            ("a247c49c5fcd492b", "ok"),
            ("a491adda08c3d4fd", "ok"),
            ("c6aa7e397b7123c3", "ok"),
            ("d615580118391ee1", "ok"),
            ("e2aad469b71d1d48", "ok"),
            ("f82268f2fefd5cfb", "ok"),
        ],
    );
}

#[test]
fn openai_stream_without_done_or_finish_is_truncated() {
    let input = std::fs::read(
        fixtures("openai-sse")
            .join("e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.bin"),
    )
    .unwrap();
    let text = String::from_utf8(input).unwrap();
    let without_done = text.replace("data: [DONE]", "");
    let (items, error) = play(without_done.as_bytes(), 64, Box::new(ChunkAssembler::new()));
    assert!(
        matches!(error, Some(ModelError::Truncated { .. })),
        "{error:?}"
    );
    assert_eq!(items.len(), 31, "started and the deltas, no finished");
    let before_finish = text.split("\n\n").take(20).collect::<Vec<_>>().join("\n\n");
    let (_, error) = play(
        format!("{before_finish}\n\ndata: [DONE]\n\n").as_bytes(),
        64,
        Box::new(ChunkAssembler::new()),
    );
    assert!(
        matches!(error, Some(ModelError::Truncated { .. })),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Transport

/// What the fake server answers to one request.
#[derive(Clone)]
enum Script {
    /// A complete response.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// `200` with these SSE chunks; then the stream ends, or stays open forever.
    Stream { chunks: Vec<String>, stall: bool },
    /// The response headers never come.
    Silent,
}

#[derive(Debug)]
struct Recorded {
    at: Instant,
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone, Default)]
struct FakeServer {
    scripts: Arc<Mutex<VecDeque<Script>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Senders dropped when a response body is dropped (the client went away, or the body ended).
    body_guards: Arc<Mutex<Vec<tokio::sync::oneshot::Receiver<()>>>>,
}

impl FakeServer {
    fn requests(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn fake(
    State(server): State<FakeServer>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    server.requests.lock().unwrap().push(Recorded {
        at: Instant::now(),
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    let script = server.scripts.lock().unwrap().pop_front();
    match script.expect("no scripted response left") {
        Script::Respond {
            status,
            headers,
            body,
        } => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
        Script::Stream { chunks, stall } => {
            let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
            server.body_guards.lock().unwrap().push(dropped);
            let chunks = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))),
            );
            let tail = if stall {
                futures_util::stream::pending().boxed()
            } else {
                futures_util::stream::empty().boxed()
            };
            // The guard lives as long as the body stream.
            let body = chunks.chain(tail).map(move |chunk| {
                let _ = &guard;
                chunk
            });
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(body),
            )
                .into_response()
        }
        Script::Silent => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

async fn start(scripts: Vec<Script>) -> (String, FakeServer) {
    let server = FakeServer {
        scripts: Arc::new(Mutex::new(scripts.into())),
        ..FakeServer::default()
    };
    let app = Router::new()
        .route("/v1/messages", post(fake))
        .route("/v1/chat/completions", post(fake))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, server)
}

fn config(url: &str) -> ProviderConfig {
    ProviderConfig {
        request_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: 5,
            max_retry_after: Duration::from_secs(60),
            jitter: Jitter::fixed(1.0),
        },
        ..ProviderConfig::new(url)
    }
}

const NO_MESSAGES: &[Message] = &[];

fn request<'a>(model: &'a str, messages: &'a [Message]) -> ModelRequest<'a> {
    ModelRequest {
        model,
        system: "",
        messages,
        tools: &[],
        max_tokens: 100,
    }
}

fn fixture_text(kind: &str, name: &str) -> String {
    std::fs::read_to_string(fixtures(kind).join(name)).unwrap()
}

fn ok_stream() -> Script {
    Script::Stream {
        chunks: vec![fixture_text("anthropic-sse", "basic_response.txt")],
        stall: false,
    }
}

fn status(status: u16, headers: Vec<(&'static str, String)>) -> Script {
    Script::Respond {
        status,
        headers,
        body: format!(
            r#"{{"type":"error","error":{{"type":"status_{status}","message":"try later"}}}}"#
        ),
    }
}

/// Everything a stream yields: the items and the error that ended it.
async fn drain(stream: &mut ModelStream) -> (Vec<StreamItem>, Option<ModelError>) {
    let mut items = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream never hangs")
    {
        match item {
            Ok(item) => items.push(item),
            Err(error) => {
                assert!(stream.next().await.is_none(), "nothing after an error");
                return (items, Some(error));
            }
        }
    }
    (items, None)
}

async fn call(providers: &Providers, model: &str) -> (Vec<StreamItem>, Option<ModelError>) {
    let cancel = CancellationToken::new();
    match providers.stream(request(model, NO_MESSAGES), &cancel).await {
        Ok(mut stream) => drain(&mut stream).await,
        Err(error) => (Vec::new(), Some(error)),
    }
}

fn finished_text(items: &[StreamItem]) -> String {
    match items.last() {
        Some(StreamItem::Finished(response)) => response.text(),
        other => panic!("not finished: {other:?}"),
    }
}

#[tokio::test]
async fn a_429_waits_for_retry_after_then_succeeds() {
    let (url, server) = start(vec![
        status(429, vec![("retry-after", "1".into())]),
        ok_stream(),
    ])
    .await;
    // With the hint ignored, the backoff would be 10 s.
    let providers = Providers::new(ProviderConfig {
        retry: RetryPolicy {
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            ..config(&url).retry
        },
        ..config(&url)
    })
    .unwrap();
    let started = Instant::now();
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(finished_text(&items), "Hello there!");
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_529_backs_off_then_succeeds() {
    let (url, server) = start(vec![
        status(529, vec![]),
        status(503, vec![("retry-after-ms", "300".into())]),
        ok_stream(),
    ])
    .await;
    let providers = Providers::new(config(&url)).unwrap();
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        items.first(),
        Some(&StreamItem::Started {
            model: "claude-3-opus-latest".into()
        })
    );
    assert_eq!(finished_text(&items), "Hello there!");
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    // Full jitter fixed at its top: the first backoff is the base, 50 ms; then the server's 300 ms
    // instead of the 100 ms backoff.
    let first = requests[1].at - requests[0].at;
    let second = requests[2].at - requests[1].at;
    assert!(first >= Duration::from_millis(50), "{first:?}");
    assert!(second >= Duration::from_millis(300), "{second:?}");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    for code in [400, 401, 403, 404] {
        let (url, server) = start(vec![status(code, vec![]), ok_stream()]).await;
        let providers = Providers::new(config(&url)).unwrap();
        let (items, error) = call(&providers, "claude-haiku-4-5").await;
        assert!(items.is_empty());
        match error {
            Some(ModelError::Http { status, body }) => {
                assert_eq!(status, code);
                assert!(body.contains("try later"), "{body}");
            }
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(server.requests(), 1, "{code}");
    }
}

#[tokio::test]
async fn retries_end_with_the_last_error() {
    let (url, server) = start(vec![status(503, vec![]); 3]).await;
    let providers = Providers::new(ProviderConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            ..config(&url).retry
        },
        ..config(&url)
    })
    .unwrap();
    let (_, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(
        matches!(error, Some(ModelError::Http { status: 503, .. })),
        "{error:?}"
    );
    assert_eq!(server.requests(), 3);
}

fn anthropic_events(events: &[Value]) -> String {
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

fn message_start() -> Value {
    json!({"type": "message_start", "message": {"model": "claude-haiku-4-5", "usage": {"input_tokens": 3}}})
}

fn overloaded() -> Value {
    json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
}

#[tokio::test]
async fn an_overloaded_stream_before_content_is_retried() {
    let failing = Script::Stream {
        chunks: vec![anthropic_events(&[message_start(), overloaded()])],
        stall: false,
    };
    let (url, server) = start(vec![failing, ok_stream()]).await;
    let providers = Providers::new(config(&url)).unwrap();
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(server.requests(), 2);
    let started = items
        .iter()
        .filter(|item| matches!(item, StreamItem::Started { .. }))
        .count();
    assert_eq!(started, 1, "one Started even though two streams began");
    assert_eq!(finished_text(&items), "Hello there!");
}

#[tokio::test]
async fn an_error_after_content_is_not_retried() {
    let failing = Script::Stream {
        chunks: vec![anthropic_events(&[
            message_start(),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            overloaded(),
        ])],
        stall: false,
    };
    let (url, server) = start(vec![failing, ok_stream()]).await;
    let providers = Providers::new(config(&url)).unwrap();
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert_eq!(
        items,
        [
            StreamItem::Started {
                model: "claude-haiku-4-5".into()
            },
            StreamItem::TextDelta("Hel".into())
        ]
    );
    assert!(
        matches!(&error, Some(ModelError::Api { kind, .. }) if kind == "overloaded_error"),
        "{error:?}"
    );
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn a_stalled_stream_hits_the_idle_timeout() {
    let stalled = Script::Stream {
        chunks: vec![anthropic_events(&[message_start()])],
        stall: true,
    };
    let (url, server) = start(vec![stalled, Script::Silent]).await;
    let providers = Providers::new(ProviderConfig {
        request_timeout: Duration::from_millis(300),
        ..config(&url)
    })
    .unwrap();
    let started = Instant::now();
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(
        matches!(
            error,
            Some(ModelError::IdleTimeout {
                timeout_ms: 300,
                ..
            })
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Headers that never come: the request timeout, not retried.
    let started = Instant::now();
    let (_, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(
        matches!(
            error,
            Some(ModelError::ResponseTimeout {
                timeout_ms: 300,
                ..
            })
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(server.requests(), 2);
}

/// Cancel `cancel` after `delay`; the instant it fired.
fn cancel_after(cancel: &CancellationToken, delay: Duration) -> tokio::task::JoinHandle<Instant> {
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let at = Instant::now();
        cancel.cancel();
        at
    })
}

#[tokio::test]
async fn cancel_during_backoff_returns_at_once() {
    let (url, server) = start(vec![status(529, vec![("retry-after", "10".into())])]).await;
    let providers = Providers::new(config(&url)).unwrap();
    let cancel = CancellationToken::new();
    let fired = cancel_after(&cancel, Duration::from_millis(200));
    let result = providers
        .stream(request("claude-haiku-4-5", NO_MESSAGES), &cancel)
        .await;
    let returned = Instant::now();
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    let fired = fired.await.unwrap();
    assert!(
        returned.duration_since(fired) < Duration::from_millis(100),
        "{:?}",
        returned.duration_since(fired)
    );
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn cancel_aborts_a_request_and_a_stream() {
    let stalled = Script::Stream {
        chunks: vec![anthropic_events(&[message_start()])],
        stall: true,
    };
    let (url, _server) = start(vec![Script::Silent, stalled]).await;
    let providers = Providers::new(config(&url)).unwrap();

    let cancel = CancellationToken::new();
    let fired = cancel_after(&cancel, Duration::from_millis(100));
    let result = providers
        .stream(request("claude-haiku-4-5", NO_MESSAGES), &cancel)
        .await;
    let returned = Instant::now();
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    assert!(returned.duration_since(fired.await.unwrap()) < Duration::from_millis(100));

    let cancel = CancellationToken::new();
    let mut stream = providers
        .stream(request("claude-haiku-4-5", NO_MESSAGES), &cancel)
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamItem::Started { .. }))
    ));
    let fired = cancel_after(&cancel, Duration::from_millis(100));
    let (items, error) = drain(&mut stream).await;
    assert!(items.is_empty());
    assert!(matches!(error, Some(ModelError::Cancelled)), "{error:?}");
    assert!(Instant::now().duration_since(fired.await.unwrap()) < Duration::from_millis(100));
}

#[tokio::test]
async fn dropping_the_stream_closes_the_request() {
    let stalled = Script::Stream {
        chunks: vec![anthropic_events(&[message_start()])],
        stall: true,
    };
    let (url, server) = start(vec![stalled]).await;
    let providers = Providers::new(config(&url)).unwrap();
    let cancel = CancellationToken::new();
    let mut stream = providers
        .stream(request("claude-haiku-4-5", NO_MESSAGES), &cancel)
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamItem::Started { .. }))
    ));
    let guard = server.body_guards.lock().unwrap().pop().unwrap();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(5), guard)
        .await
        .expect("the server saw the request go away")
        .unwrap_err();
}

#[tokio::test]
async fn connect_errors_are_retried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{address}");
    let providers = Providers::new(ProviderConfig {
        retry: RetryPolicy {
            base_delay: Duration::from_millis(400),
            max_delay: Duration::from_millis(400),
            ..config(&url).retry
        },
        ..config(&url)
    })
    .unwrap();
    // The server comes up while the client backs off after the refused connection.
    let server = FakeServer {
        scripts: Arc::new(Mutex::new(vec![ok_stream()].into())),
        ..FakeServer::default()
    };
    let app = Router::new()
        .route("/v1/messages", post(fake))
        .with_state(server.clone());
    let serve = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        axum::serve(listener, app).await
    });
    let (items, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(finished_text(&items), "Hello there!");
    assert_eq!(server.requests(), 1);
    serve.abort();

    // Nobody listening at all: the connect error, after the attempts.
    let providers = Providers::new(ProviderConfig {
        retry: RetryPolicy {
            max_attempts: 2,
            ..config(&url).retry
        },
        ..config("http://127.0.0.1:1")
    })
    .unwrap();
    let (_, error) = call(&providers, "claude-haiku-4-5").await;
    assert!(
        matches!(&error, Some(ModelError::Transport { source, .. }) if source.is_connect()),
        "{error:?}"
    );
}

#[tokio::test]
async fn openai_request_is_shaped_right() {
    let stream = fixture_text(
        "openai-sse",
        "f82268f2fefd5cfbc7eeb59c297688be2f6ca0849a6e4f17851b517310841d9b.bin",
    );
    let (url, server) = start(vec![Script::Stream {
        chunks: vec![stream],
        stall: false,
    }])
    .await;
    let providers = Providers::new(ProviderConfig {
        openai_base_url: Some(format!("{url}/v1/")),
        openai_api_key: Some(ApiKey::new("sk-openai-secret".into())),
        anthropic_api_key: Some(ApiKey::new("sk-ant-secret".into())),
        ..config(&url)
    })
    .unwrap();
    let messages = [
        Message::User {
            text: "What's the weather?".into(),
        },
        Message::Assistant {
            content: vec![
                ContentBlock::Text("Let me check.".into()),
                ContentBlock::ToolUse {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Paris"}),
                },
                ContentBlock::ToolUse {
                    id: "call_2".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Rome"}),
                },
            ],
        },
        Message::ToolResults {
            results: vec![
                ToolResultBlock {
                    call_id: "call_1".into(),
                    content: "18 C".into(),
                    is_error: false,
                },
                ToolResultBlock {
                    call_id: "call_2".into(),
                    content: "unknown city".into(),
                    is_error: true,
                },
            ],
        },
        Message::User {
            text: "And stocks?".into(),
        },
    ];
    let tools = [
        json!({"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}),
    ];
    let cancel = CancellationToken::new();
    let mut stream = providers
        .stream(
            ModelRequest {
                model: "gpt-4o",
                system: "Be brief.",
                messages: &messages,
                tools: &tools,
                max_tokens: 512,
            },
            &cancel,
        )
        .await
        .unwrap();
    let (items, error) = drain(&mut stream).await;
    assert!(error.is_none(), "{error:?}");
    let Some(StreamItem::Finished(response)) = items.last() else {
        panic!("{items:?}")
    };
    let calls: Vec<(&str, &str, &Value)> = response.tool_uses().collect();
    assert_eq!(
        calls,
        [
            (
                "call_JMW1whyEaYG438VE1OIflxA2",
                "GetWeatherArgs",
                &json!({"city": "Edinburgh", "country": "GB", "units": "c"})
            ),
            (
                "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                "get_stock_price",
                &json!({"ticker": "AAPL", "exchange": "NASDAQ"})
            ),
        ]
    );
    assert_eq!(response.stop_reason, StopReason::ToolUse);

    let requests = server.requests.lock().unwrap();
    let sent = &requests[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.headers["authorization"], "Bearer sk-openai-secret");
    assert!(sent.headers.get("x-api-key").is_none());
    assert_eq!(sent.headers["content-type"], "application/json");
    assert_eq!(
        sent.body,
        json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 512,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What's the weather?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "error: unknown city"},
                {"role": "user", "content": "And stocks?"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }}],
        })
    );
}

#[test]
fn models_route_to_their_provider() {
    for (model, with_base_url, provider) in [
        ("claude-sonnet-4-5", true, Provider::Anthropic),
        ("nightshift-scripted-demo", true, Provider::Anthropic),
        ("gpt-4o", false, Provider::OpenAi),
        ("o1-preview", false, Provider::OpenAi),
        ("o3", false, Provider::OpenAi),
        ("o4-mini", false, Provider::OpenAi),
        ("chatgpt-4o-latest", false, Provider::OpenAi),
        ("llama3.1:8b", true, Provider::OpenAi),
        ("llama3.1:8b", false, Provider::Anthropic),
    ] {
        assert_eq!(route(model, with_base_url), provider, "{model}");
    }
}

#[tokio::test]
async fn openai_endpoint_configuration() {
    // Nothing configured: OpenAI models are refused with a hint.
    let providers = Providers::new(ProviderConfig::new("http://127.0.0.1:1")).unwrap();
    let (_, error) = call(&providers, "gpt-4o").await;
    let error = error.unwrap();
    assert!(
        matches!(error, ModelError::NotConfigured { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("OPENAI_API_KEY"), "{error}");

    // Only a key: the public API. Keys never printed.
    let providers = Providers::new(ProviderConfig {
        openai_api_key: Some(ApiKey::new("sk-openai-secret".into())),
        anthropic_api_key: Some(ApiKey::new("sk-ant-secret".into())),
        ..ProviderConfig::new("https://api.anthropic.com")
    })
    .unwrap();
    let printed = format!("{providers:?}");
    assert!(
        printed.contains("https://api.openai.com/v1/chat/completions"),
        "{printed}"
    );
    assert!(
        printed.contains("https://api.anthropic.com/v1/messages"),
        "{printed}"
    );
    assert!(!printed.contains("secret"), "{printed}");

    for url in ["not a url", "ftp://example.com"] {
        let error = Providers::new(ProviderConfig {
            openai_base_url: Some(url.into()),
            ..ProviderConfig::new("http://127.0.0.1:1")
        })
        .unwrap_err();
        assert!(
            matches!(error, ModelError::InvalidBaseUrl { .. }),
            "{error:?}"
        );
    }
    let error = Providers::new(ProviderConfig {
        anthropic_api_key: Some(ApiKey::new("bad\nkey".into())),
        ..ProviderConfig::new("http://127.0.0.1:1")
    })
    .unwrap_err();
    assert!(
        matches!(
            error,
            ModelError::InvalidApiKey {
                provider: "anthropic"
            }
        ),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// The scripted model through both wire formats

/// Play a conversation with the scripted model until it ends its turn: the tool calls of each step and
/// the final text.
async fn converse(providers: &Providers, model: &str, prompt: &str) -> (Vec<Vec<String>>, String) {
    let mut messages = vec![Message::User {
        text: prompt.to_owned(),
    }];
    let mut steps = Vec::new();
    let cancel = CancellationToken::new();
    for _ in 0..10 {
        let mut stream = providers
            .stream(request(model, &messages), &cancel)
            .await
            .unwrap();
        let (items, error) = drain(&mut stream).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            items.first(),
            Some(&StreamItem::Started {
                model: crate::scripted_model::MODEL.into()
            })
        );
        let Some(StreamItem::Finished(response)) = items.last() else {
            panic!("{items:?}")
        };
        assert!(response.usage.input_tokens > 0 && response.usage.output_tokens > 0);
        if response.stop_reason == StopReason::EndTurn {
            return (steps, response.text());
        }
        assert_eq!(response.stop_reason, StopReason::ToolUse);
        let calls: Vec<String> = response
            .tool_uses()
            .map(|(_, name, input)| format!("{name} {input}"))
            .collect();
        let results = response
            .tool_uses()
            .map(|(id, _, _)| ToolResultBlock {
                call_id: id.to_owned(),
                content: "ok".into(),
                is_error: false,
            })
            .collect();
        steps.push(calls);
        messages.push(Message::Assistant {
            content: response.content.clone(),
        });
        messages.push(Message::ToolResults { results });
    }
    panic!("the plan never ended")
}

#[tokio::test]
async fn the_scripted_model_plays_a_plan_over_both_apis() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/scripted-model", listener.local_addr().unwrap());
    let app = Router::new().nest_service("/scripted-model", crate::scripted_model::router());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let providers = Providers::new(ProviderConfig {
        openai_base_url: Some(format!("{url}/v1")),
        ..config(&url)
    })
    .unwrap();
    let prompt = "Follow the plan. [script:plan]\n\
                  {\"tool\": \"list_files\", \"input\": {\"path\": \".\"}}\n\
                  \n\
                  [{\"tool\": \"read_file\", \"input\": {\"path\": \"a\"}}, {\"tool\": \"read_file\", \"input\": {\"path\": \"b\"}}]\n\
                  {\"text\": \"All done.\"}\n";
    let expected_steps = vec![
        vec![r#"list_files {"path":"."}"#.to_owned()],
        vec![
            r#"read_file {"path":"a"}"#.to_owned(),
            r#"read_file {"path":"b"}"#.to_owned(),
        ],
    ];
    // `nightshift-scripted-*` goes to the Anthropic API; any other id, with OPENAI_BASE_URL set, to
    // chat completions.
    for model in ["nightshift-scripted-demo", "local-model"] {
        let (steps, text) = converse(&providers, model, prompt).await;
        assert_eq!(steps, expected_steps, "{model}");
        assert_eq!(text, "All done.", "{model}");
    }
    // The error directive is a typed API error on both, not retried after its content.
    for model in ["nightshift-scripted-demo", "local-model"] {
        let messages = [Message::User {
            text: "[script:error]".into(),
        }];
        let cancel = CancellationToken::new();
        let mut stream = providers
            .stream(request(model, &messages), &cancel)
            .await
            .unwrap();
        let (items, error) = drain(&mut stream).await;
        assert!(items.len() > 1, "{model}: {items:?}");
        assert!(
            matches!(&error, Some(ModelError::Api { message, .. }) if message == "Overloaded"),
            "{model}: {error:?}"
        );
    }
}

//! `sandbox-agent scripted-model`: a clearly labelled demo and test model that speaks two streaming
//! APIs, event for event in the shapes of the recorded real streams in `shared/fixtures/`:
//!
//! - the Anthropic Messages API, `POST /v1/messages` with `"stream": true` (`anthropic-sse/`);
//! - OpenAI chat completions, `POST /v1/chat/completions` with `"stream": true` (`openai-sse/`):
//!   `chat.completion.chunk`s, then a usage chunk (always, as if `stream_options.include_usage` were
//!   set), then `data: [DONE]`.
//!
//! Both report the model `nightshift-scripted-demo`.
//!
//! The reply is a pure function of the request ([`plan`]). The current prompt is the last user text
//! message (Anthropic: a `user` message that is not only `tool_result` blocks; OpenAI: the last
//! `role: "user"` message), so a conversation that goes on across prompts follows the newest one. The
//! step is the number of tool-result turns after it (Anthropic: `user` messages with `tool_result`
//! blocks; OpenAI: runs of `role: "tool"` messages). A directive in the prompt picks the script:
//!
//! - no directive: the demo. Step 0: text, then `list_files {"path":"."}`; step 1: text, then
//!   `write_file` of `NIGHTSHIFT_DEMO.md` with the prompt; step 2 and later: a final text,
//!   `end_turn`.
//! - `[script:tokens count=N rate=R stamp=S]`: `N` text deltas `"tok{i} "` (`i` from 0) paced at
//!   `R` per second (`rate=0` or none: as fast as possible), then `end_turn`; no tools. With
//!   `stamp=1` each delta carries the wall-clock time it is sent, `"tok{i}@{unix_micros} "`, so a
//!   benchmark can measure delivery latency from the model to a client.
//! - `[script:write path=P content=C]`: step 0: `write_file {"path":P,"content":C}` (`C` is the
//!   literal text up to `]`); then a final text, `end_turn`.
//! - `[script:slow ms=M]`: a text streamed evenly over `M` ms, then `end_turn` (for stop tests).
//! - `[script:error]`: a few text deltas, then a stream error (Anthropic: an `error` event of type
//!   `overloaded_error`; OpenAI: `data: {"error": {"type": "server_error", …}}`), and the stream ends.
//! - `[script:plan]`: the non-empty lines after the directive are JSON, one per step: a tool call
//!   `{"tool": NAME, "input": {…}}`, an array of them (several calls in one step), or `{"text": "…"}`.
//!   Step `i` plays line `i`: a short text, then the tool call(s), `tool_use`; a text line is a final
//!   text, `end_turn`. After the last line: a final text, `end_turn`.
//!
//! Malformed JSON (of the body or of a plan line), a request without `"stream": true` or a bad
//! directive get `400` in the API's error shape: Anthropic
//! `{"type":"error","error":{"type":"invalid_request_error","message":…}}`, OpenAI
//! `{"error":{"message":…,"type":"invalid_request_error","param":null,"code":null}}`.
//!
//! Events are sent as they are produced, so the pacing is real on the wire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// The model name reported in every stream; the agent labels output from it as a demo.
pub const MODEL: &str = "nightshift-scripted-demo";

/// Pause between the text deltas of the demo scenario, so a watcher sees it stream.
const DEMO_DELTA_INTERVAL: Duration = Duration::from_millis(20);
/// Number of deltas a `slow` text is spread over.
const SLOW_DELTAS: usize = 20;
/// Largest accepted `count` of `[script:tokens]`.
const MAX_TOKEN_DELTAS: u64 = 1_000_000;

/// `sandbox-agent scripted-model`.
#[derive(Debug, clap::Args)]
pub struct ScriptedModelArgs {
    /// Address to listen on; the APIs are then at `http://ADDR/v1/messages` and
    /// `http://ADDR/v1/chat/completions`.
    #[arg(long, default_value = "127.0.0.1:8790")]
    pub listen: SocketAddr,
}

/// Why a request gets no script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The body is not JSON.
    #[error("request body is not valid json: {reason}")]
    InvalidJson {
        /// The parser's complaint.
        reason: String,
    },
    /// Only streaming is implemented.
    #[error("stream: only streaming requests are supported; set \"stream\": true")]
    NotStreaming,
    /// `messages` is missing or has no user message.
    #[error("messages: expected an array with at least one user message")]
    NoUserMessage,
    /// A `[script:…]` directive that cannot be followed.
    #[error("bad directive [script:{directive}]: {reason}")]
    Directive {
        /// The directive text between `[script:` and `]`.
        directive: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A line of a `[script:plan]` that is not a step.
    #[error("bad [script:plan] line {line}: {reason}")]
    Plan {
        /// Line number among the plan's non-empty lines, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /v1/chat/completions`.
    OpenAi,
}

/// Why a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The turn is over.
    EndTurn,
    /// The model waits for tool results.
    ToolUse,
}

impl StopReason {
    /// As in Anthropic's `message_delta.delta.stop_reason`.
    fn anthropic(self) -> &'static str {
        match self {
            StopReason::EndTurn => "end_turn",
            StopReason::ToolUse => "tool_use",
        }
    }

    /// As in OpenAI's `finish_reason`.
    fn openai(self) -> &'static str {
        match self {
            StopReason::EndTurn => "stop",
            StopReason::ToolUse => "tool_calls",
        }
    }
}

/// One content block of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// Text, already cut into the deltas it is streamed in.
    Text(Vec<String>),
    /// A tool call; its input is streamed as several pieces.
    ToolUse {
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
}

/// What the model answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Content blocks in order.
    pub blocks: Vec<Block>,
    /// How the message ends.
    pub stop_reason: StopReason,
    /// Pause before each delta.
    pub delta_interval: Duration,
    /// Send an overloaded error instead of finishing the message, after the first block's deltas.
    pub fail_mid_stream: bool,
    /// Stamp each text delta with the time it is sent (see [`Frame::stamp`]).
    pub stamp: bool,
}

/// The current prompt and how far into it the conversation is.
#[derive(Debug, Clone, PartialEq)]
struct Turn {
    prompt: String,
    step: usize,
}

/// Decide the reply to a request body (already parsed) that came through `api`.
pub fn plan(request: &Value, api: Api) -> Result<Reply, ScriptError> {
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return Err(ScriptError::NotStreaming);
    }
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(ScriptError::NoUserMessage)?;
    let Turn { prompt, step } = match api {
        Api::Anthropic => anthropic_turn(messages),
        Api::OpenAi => openai_turn(messages),
    }
    .ok_or(ScriptError::NoUserMessage)?;
    match Directive::find(&prompt)? {
        None => Ok(demo(step, &prompt)),
        Some(Directive::Tokens {
            count,
            rate_per_s,
            stamp,
        }) => Ok(Reply {
            blocks: vec![Block::Text(
                (0..count).map(|i| format!("tok{i} ")).collect(),
            )],
            stop_reason: StopReason::EndTurn,
            delta_interval: if rate_per_s > 0.0 {
                Duration::from_secs_f64(1.0 / rate_per_s)
            } else {
                Duration::ZERO
            },
            fail_mid_stream: false,
            stamp,
        }),
        Some(Directive::Write { path, content }) => Ok(if step == 0 {
            tool_step(
                format!("Writing {path}."),
                vec![(
                    "write_file".into(),
                    json!({ "path": path, "content": content }),
                )],
            )
        } else {
            end_turn(vec![format!("Wrote {path}.")], Duration::ZERO)
        }),
        Some(Directive::Slow { duration_ms }) => {
            let text = "Thinking slowly about this, one small piece at a time, \
                        so there is time to stop me. ";
            let deltas = split_words(&text.repeat(2), SLOW_DELTAS);
            let interval = Duration::from_millis(duration_ms)
                / u32::try_from(deltas.len().max(1)).unwrap_or(1);
            Ok(end_turn(deltas, interval))
        }
        Some(Directive::Error) => Ok(Reply {
            fail_mid_stream: true,
            ..end_turn(
                split_words("Let me look at that. Just a moment", 4),
                Duration::ZERO,
            )
        }),
        Some(Directive::Plan { steps }) => Ok(match steps.get(step) {
            Some(PlanStep::Tools(calls)) => {
                let names: Vec<&str> = calls.iter().map(|(name, _)| name.as_str()).collect();
                tool_step(
                    format!("Step {}: calling {}.", step + 1, names.join(", ")),
                    calls.clone(),
                )
            }
            Some(PlanStep::Text(text)) => end_turn(split_words(text, 10), Duration::ZERO),
            None => end_turn(
                vec![format!("Done: followed the plan's {} steps.", steps.len())],
                Duration::ZERO,
            ),
        }),
    }
}

/// Anthropic: the last `user` message that is not only tool results, and the tool-result turns after it.
fn anthropic_turn(messages: &[Value]) -> Option<Turn> {
    let is_user = |m: &Value| m.get("role").and_then(Value::as_str) == Some("user");
    let at = messages
        .iter()
        .rposition(|m| is_user(m) && count_tool_results(m) == 0)?;
    let after = messages.get(at + 1..).unwrap_or_default();
    Some(Turn {
        prompt: message_text(messages.get(at)?),
        step: after
            .iter()
            .filter(|m| is_user(m) && count_tool_results(m) > 0)
            .count(),
    })
}

/// OpenAI: the last `user` message, and the runs of `tool` messages after it.
fn openai_turn(messages: &[Value]) -> Option<Turn> {
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    let at = messages
        .iter()
        .rposition(|m| role(m).as_deref() == Some("user"))?;
    let after = messages.get(at + 1..).unwrap_or_default();
    let mut step = 0;
    let mut previous_was_tool = false;
    for message in after {
        let is_tool = role(message).as_deref() == Some("tool");
        if is_tool && !previous_was_tool {
            step += 1;
        }
        previous_was_tool = is_tool;
    }
    Some(Turn {
        prompt: message_text(messages.get(at)?),
        step,
    })
}

fn tool_step(text: String, calls: Vec<(String, Value)>) -> Reply {
    let mut blocks = vec![Block::Text(split_words(&text, 3))];
    blocks.extend(
        calls
            .into_iter()
            .map(|(name, input)| Block::ToolUse { name, input }),
    );
    Reply {
        blocks,
        stop_reason: StopReason::ToolUse,
        delta_interval: Duration::ZERO,
        fail_mid_stream: false,
        stamp: false,
    }
}

fn end_turn(deltas: Vec<String>, delta_interval: Duration) -> Reply {
    Reply {
        blocks: vec![Block::Text(deltas)],
        stop_reason: StopReason::EndTurn,
        delta_interval,
        fail_mid_stream: false,
        stamp: false,
    }
}

/// The default scenario: look around, write a note, finish.
fn demo(step: usize, prompt: &str) -> Reply {
    let (text, tool) = match step {
        0 => (
            "I'll take a look at the repository first to see how it is laid out. \
             I am the scripted demo model, so I will list the files, \
             leave a short note, and stop there.",
            Some(("list_files", json!({ "path": "." }))),
        ),
        1 => (
            "Thanks, that gives me an overview of the project. \
             Now I'll write a short note with your prompt into NIGHTSHIFT_DEMO.md.",
            Some((
                "write_file",
                json!({
                    "path": "NIGHTSHIFT_DEMO.md",
                    "content": format!("# Notes from the demo model\n\nPrompt: {prompt}\n"),
                }),
            )),
        ),
        _ => ("Done — I wrote NIGHTSHIFT_DEMO.md.", None),
    };
    let mut blocks = vec![Block::Text(split_words(text, 10))];
    let stop_reason = match tool {
        Some((name, input)) => {
            blocks.push(Block::ToolUse {
                name: name.into(),
                input,
            });
            StopReason::ToolUse
        }
        None => StopReason::EndTurn,
    };
    Reply {
        blocks,
        stop_reason,
        delta_interval: DEMO_DELTA_INTERVAL,
        fail_mid_stream: false,
        stamp: false,
    }
}

/// The text of a message: a string `content`, or its `text` blocks (parts) joined by newlines.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn count_tool_results(message: &Value) -> usize {
    match message.get("content") {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .count(),
        _ => 0,
    }
}

/// One step of a `[script:plan]`.
#[derive(Debug, Clone, PartialEq)]
enum PlanStep {
    /// Tool calls `(name, input)`, played as one turn.
    Tools(Vec<(String, Value)>),
    /// A final text.
    Text(String),
}

impl PlanStep {
    /// Parse plan line `line` (from 1).
    fn parse(line: usize, text: &str) -> Result<PlanStep, ScriptError> {
        let error = |reason: String| ScriptError::Plan { line, reason };
        let value: Value = serde_json::from_str(text).map_err(|e| error(e.to_string()))?;
        let call = |value: &Value| -> Result<(String, Value), ScriptError> {
            let name = value
                .get("tool")
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| error("a tool call needs a \"tool\" name".into()))?;
            let input = match value.get("input") {
                None => json!({}),
                Some(input) if input.is_object() => input.clone(),
                Some(_) => return Err(error("\"input\" must be an object".into())),
            };
            Ok((name.to_owned(), input))
        };
        match &value {
            Value::Array(calls) if !calls.is_empty() => Ok(PlanStep::Tools(
                calls.iter().map(call).collect::<Result<_, _>>()?,
            )),
            Value::Object(object) if object.contains_key("tool") => {
                Ok(PlanStep::Tools(vec![call(&value)?]))
            }
            Value::Object(object) => match object.get("text").and_then(Value::as_str) {
                Some(text) => Ok(PlanStep::Text(text.to_owned())),
                None => Err(error(
                    "expected {\"tool\": …}, [{\"tool\": …}, …] or {\"text\": …}".into(),
                )),
            },
            _ => Err(error(
                "expected {\"tool\": …}, [{\"tool\": …}, …] or {\"text\": …}".into(),
            )),
        }
    }
}

/// A `[script:…]` directive.
#[derive(Debug, Clone, PartialEq)]
enum Directive {
    Tokens {
        count: u64,
        rate_per_s: f64,
        stamp: bool,
    },
    Write {
        path: String,
        content: String,
    },
    Slow {
        duration_ms: u64,
    },
    Error,
    Plan {
        steps: Vec<PlanStep>,
    },
}

impl Directive {
    /// The first directive in `text`, if any.
    fn find(text: &str) -> Result<Option<Directive>, ScriptError> {
        let Some(start) = text.find("[script:") else {
            return Ok(None);
        };
        let rest = &text[start + "[script:".len()..];
        let (inner, after) = match rest.find(']') {
            Some(end) => (&rest[..end], &rest[end + 1..]),
            None => return Err(directive_error(rest, "missing ']'")),
        };
        let (name, args) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
        let directive = match name {
            "tokens" => {
                let count = number_arg(inner, args, "count")?
                    .ok_or_else(|| directive_error(inner, "count=N is required"))?;
                if count > MAX_TOKEN_DELTAS as f64 || count.fract() != 0.0 {
                    return Err(directive_error(
                        inner,
                        "count must be a whole number up to 1000000",
                    ));
                }
                let rate_per_s = number_arg(inner, args, "rate")?.unwrap_or(0.0);
                let stamp = number_arg(inner, args, "stamp")?.unwrap_or(0.0) != 0.0;
                Directive::Tokens {
                    count: count as u64,
                    rate_per_s,
                    stamp,
                }
            }
            "write" => {
                let path = args
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("path="))
                    .filter(|path| !path.is_empty())
                    .ok_or_else(|| directive_error(inner, "path=P is required"))?;
                let content = match args.find("content=") {
                    Some(at) => &args[at + "content=".len()..],
                    None => "",
                };
                Directive::Write {
                    path: path.to_owned(),
                    content: content.to_owned(),
                }
            }
            "slow" => {
                let duration_ms = number_arg(inner, args, "ms")?
                    .ok_or_else(|| directive_error(inner, "ms=M is required"))?;
                Directive::Slow {
                    duration_ms: duration_ms as u64,
                }
            }
            "error" => Directive::Error,
            "plan" => Directive::Plan {
                steps: after
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .enumerate()
                    .map(|(i, line)| PlanStep::parse(i + 1, line))
                    .collect::<Result<_, _>>()?,
            },
            _ => {
                return Err(directive_error(
                    inner,
                    "unknown directive; expected tokens, write, slow, error or plan",
                ))
            }
        };
        Ok(Some(directive))
    }
}

/// A non-negative finite number argument `key=value`, if present.
fn number_arg(inner: &str, args: &str, key: &str) -> Result<Option<f64>, ScriptError> {
    let Some(value) = args
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
    else {
        return Ok(None);
    };
    match value.parse::<f64>() {
        Ok(number) if number.is_finite() && number >= 0.0 => Ok(Some(number)),
        _ => Err(directive_error(
            inner,
            "arguments must be non-negative numbers",
        )),
    }
}

fn directive_error(directive: &str, reason: &'static str) -> ScriptError {
    ScriptError::Directive {
        directive: crate::seed::truncate(directive, 200),
        reason,
    }
}

/// Cut `text` into about `parts` pieces at word boundaries, each piece keeping its leading space as
/// the real API does (`"Hello"`, `" there"`). The pieces concatenate to `text`.
fn split_words(text: &str, parts: usize) -> Vec<String> {
    let mut words: Vec<&str> = Vec::new();
    let mut start = 0;
    for (at, ch) in text.char_indices() {
        if ch == ' ' && at > start {
            words.push(&text[start..at]);
            start = at;
        }
    }
    if start < text.len() {
        words.push(&text[start..]);
    }
    let per_part = words.len().div_ceil(parts.max(1)).max(1);
    words.chunks(per_part).map(|chunk| chunk.concat()).collect()
}

/// Cut serialized JSON into several pieces on character boundaries, the first one empty as in the
/// real API.
fn split_json(json: &str) -> Vec<String> {
    let piece_bytes = (json.len() / 5).clamp(8, 256);
    let mut pieces = vec![String::new()];
    let mut current = String::new();
    for ch in json.chars() {
        current.push(ch);
        if current.len() >= piece_bytes {
            pieces.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// The `data:` of a server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameData {
    /// JSON.
    Json(Value),
    /// OpenAI's end marker, `[DONE]`.
    Done,
}

/// One server-sent event, with the pause before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Pause before sending it.
    pub delay: Duration,
    /// The SSE `event:` name (Anthropic names every event; OpenAI none).
    pub event: Option<&'static str>,
    /// The SSE `data:`.
    pub data: FrameData,
    /// A text delta that gets the time it is sent appended to its word: `"tok3 "` sent at
    /// 1700000000.123456 s goes out as `"tok3@1700000000123456 "` ([`Frame::to_sse_at`]).
    pub stamp: bool,
}

/// Where a text delta's text is: Anthropic `content_block_delta`, OpenAI chunk.
const DELTA_TEXT_POINTERS: [&str; 2] = ["/delta/text", "/choices/0/delta/content"];

impl Frame {
    /// A named Anthropic event, sent at once.
    fn now(event: &'static str, data: Value) -> Self {
        Frame {
            delay: Duration::ZERO,
            event: Some(event),
            data: FrameData::Json(data),
            stamp: false,
        }
    }

    /// An unnamed OpenAI chunk, sent at once.
    fn chunk(data: Value) -> Self {
        Frame {
            delay: Duration::ZERO,
            event: None,
            data: FrameData::Json(data),
            stamp: false,
        }
    }

    /// The frame on the wire: `event: X\ndata: {...}\n\n` or `data: {...}\n\n`.
    pub fn to_sse(&self) -> String {
        let data = match &self.data {
            FrameData::Json(value) => value.to_string(),
            FrameData::Done => "[DONE]".to_owned(),
        };
        match self.event {
            Some(event) => format!("event: {event}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        }
    }

    /// The frame on the wire when sent at `sent_at`: as [`Frame::to_sse`], with a stamped text
    /// delta carrying `sent_at`.
    pub fn to_sse_at(&self, sent_at: SystemTime) -> String {
        if !self.stamp {
            return self.to_sse();
        }
        let mut stamped = self.clone();
        if let FrameData::Json(data) = &mut stamped.data {
            for pointer in DELTA_TEXT_POINTERS {
                if let Some(Value::String(text)) = data.pointer_mut(pointer) {
                    *text = stamp_text(text, sent_at);
                }
            }
        }
        stamped.to_sse()
    }
}

/// `"tok3 "` sent at `sent_at` → `"tok3@{unix_micros} "`: the stamp goes after the word, before
/// its trailing whitespace.
fn stamp_text(text: &str, sent_at: SystemTime) -> String {
    let unix_micros = sent_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    let word = text.trim_end();
    format!("{word}@{unix_micros}{}", &text[word.len()..])
}

/// Ids of one message and its tool calls, chosen by the caller (random on the wire, fixed in
/// tests).
#[derive(Debug, Clone)]
pub struct Ids {
    /// `msg_…` (Anthropic) or `chatcmpl-…` (OpenAI).
    pub message_id: String,
    /// Prefix of `toolu_…` / `call_…` ids; the block index is appended.
    pub tool_use_prefix: String,
}

impl Ids {
    fn random(api: Api) -> Self {
        let nonce = hex::encode(rand::random::<[u8; 12]>());
        match api {
            Api::Anthropic => Ids {
                message_id: format!("msg_scripted_{nonce}"),
                tool_use_prefix: format!("toolu_scripted_{nonce}_"),
            },
            Api::OpenAi => Ids {
                message_id: format!("chatcmpl-scripted-{nonce}"),
                tool_use_prefix: format!("call_scripted_{nonce}_"),
            },
        }
    }
}

/// Output tokens of a reply, roughly: one per delta, plus one.
fn output_tokens(reply: &Reply) -> u64 {
    let deltas: usize = reply
        .blocks
        .iter()
        .map(|block| match block {
            Block::Text(deltas) => deltas.len(),
            Block::ToolUse { input, .. } => split_json(&input.to_string()).len(),
        })
        .sum();
    1 + deltas as u64
}

/// The whole Anthropic stream of a reply, in the real API's event order.
pub fn frames(reply: &Reply, ids: &Ids, input_tokens: u64) -> Vec<Frame> {
    let mut out = vec![Frame::now(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": ids.message_id, "type": "message", "role": "assistant", "model": MODEL,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "output_tokens": 1, "service_tier": "standard",
            },
        }}),
    )];
    let delta = |index: usize, delta: Value| Frame {
        delay: reply.delta_interval,
        event: Some("content_block_delta"),
        stamp: reply.stamp && delta["type"] == "text_delta",
        data: FrameData::Json(
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ),
    };
    for (index, block) in reply.blocks.iter().enumerate() {
        let start = match block {
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::ToolUse { name, .. } => json!({
                "type": "tool_use", "id": format!("{}{index}", ids.tool_use_prefix),
                "name": name, "input": {},
            }),
        };
        out.push(Frame::now(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        if index == 0 {
            out.push(Frame::now("ping", json!({"type": "ping"})));
        }
        match block {
            Block::Text(deltas) => {
                for text in deltas {
                    out.push(delta(index, json!({"type": "text_delta", "text": text})));
                }
            }
            Block::ToolUse { input, .. } => {
                for piece in split_json(&input.to_string()) {
                    out.push(delta(
                        index,
                        json!({"type": "input_json_delta", "partial_json": piece}),
                    ));
                }
            }
        }
        if reply.fail_mid_stream {
            out.push(Frame::now(
                "error",
                json!({"type": "error",
                       "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
            return out;
        }
        out.push(Frame::now(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out.push(Frame::now(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": reply.stop_reason.anthropic(), "stop_sequence": null},
               "usage": {"output_tokens": output_tokens(reply)}}),
    ));
    out.push(Frame::now("message_stop", json!({"type": "message_stop"})));
    out
}

/// The whole OpenAI chat completions stream of a reply: a role chunk, content and tool call chunks,
/// the `finish_reason` chunk, the usage chunk, `[DONE]`. `created` is the Unix time in seconds.
pub fn openai_frames(reply: &Reply, ids: &Ids, input_tokens: u64, created: u64) -> Vec<Frame> {
    let chunk = |delta: Value, finish_reason: Option<&str>| {
        json!({
            "id": ids.message_id, "object": "chat.completion.chunk", "created": created,
            "model": MODEL, "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    };
    let delta = |data: Value, stamp: bool| Frame {
        delay: reply.delta_interval,
        event: None,
        data: FrameData::Json(data),
        stamp: stamp && reply.stamp,
    };
    let mut out = vec![Frame::chunk(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    ))];
    let mut tool_index = 0;
    for (index, block) in reply.blocks.iter().enumerate() {
        match block {
            Block::Text(deltas) => {
                for text in deltas {
                    out.push(delta(chunk(json!({"content": text}), None), true));
                }
            }
            Block::ToolUse { name, input } => {
                out.push(Frame::chunk(chunk(
                    json!({"tool_calls": [{"index": tool_index,
                        "id": format!("{}{index}", ids.tool_use_prefix), "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                    None,
                )));
                for piece in split_json(&input.to_string()).into_iter().skip(1) {
                    out.push(delta(
                        chunk(
                            json!({"tool_calls": [{"index": tool_index, "function": {"arguments": piece}}]}),
                            None,
                        ),
                        false,
                    ));
                }
                tool_index += 1;
            }
        }
        if reply.fail_mid_stream {
            out.push(Frame::chunk(json!({"error": {
                "message": "Overloaded", "type": "server_error", "param": null, "code": null,
            }})));
            return out;
        }
    }
    out.push(Frame::chunk(chunk(
        json!({}),
        Some(reply.stop_reason.openai()),
    )));
    let completion_tokens = output_tokens(reply);
    out.push(Frame::chunk(json!({
        "id": ids.message_id, "object": "chat.completion.chunk", "created": created,
        "model": MODEL, "system_fingerprint": null, "choices": [],
        "usage": {"prompt_tokens": input_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": input_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    })));
    out.push(Frame {
        delay: Duration::ZERO,
        event: None,
        data: FrameData::Done,
        stamp: false,
    });
    out
}

/// The APIs: `POST /v1/messages` and `POST /v1/chat/completions`. Mount it anywhere; the agent appends
/// `/v1/messages` to its Anthropic base URL and `/chat/completions` to its OpenAI base URL (which ends
/// in `/v1`).
pub fn router() -> Router {
    Router::new()
        .route("/v1/messages", post(|body| reply(Api::Anthropic, body)))
        .route(
            "/v1/chat/completions",
            post(|body| reply(Api::OpenAi, body)),
        )
}

async fn reply(api: Api, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return invalid_request(
                api,
                ScriptError::InvalidJson {
                    reason: err.to_string(),
                },
            )
        }
    };
    let reply = match plan(&request, api) {
        Ok(reply) => reply,
        Err(err) => return invalid_request(api, err),
    };
    // A rough estimate, as a real tokenizer would give about a token per four bytes.
    let input_tokens = (body.len() as u64 / 4).max(1);
    let ids = Ids::random(api);
    let (frames, request_id_header) = match api {
        Api::Anthropic => (frames(&reply, &ids, input_tokens), "request-id"),
        Api::OpenAi => {
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            (
                openai_frames(&reply, &ids, input_tokens, created),
                "x-request-id",
            )
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for frame in frames {
            if !frame.delay.is_zero() {
                // Paced against the start, so sleeping never accumulates drift.
                next += frame.delay;
                tokio::time::sleep_until(next).await;
            }
            let sse = frame.to_sse_at(SystemTime::now());
            if tx.send(Bytes::from(sse)).await.is_err() {
                return; // the client went away
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    let request_id = format!("req_scripted_{}", hex::encode(rand::random::<[u8; 12]>()));
    (
        [
            (
                header::CONTENT_TYPE,
                "text/event-stream; charset=utf-8".to_owned(),
            ),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (
                header::HeaderName::from_static(request_id_header),
                request_id,
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `400` in the API's error shape.
fn invalid_request(api: Api, err: ScriptError) -> Response {
    let body = match api {
        Api::Anthropic => json!({"type": "error",
                      "error": {"type": "invalid_request_error", "message": err.to_string()}}),
        Api::OpenAi => json!({"error": {"message": err.to_string(),
                      "type": "invalid_request_error", "param": null, "code": null}}),
    };
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// `sandbox-agent scripted-model`: serve [`router`] until Ctrl-C.
pub async fn main(args: ScriptedModelArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, model = MODEL, "scripted model listening");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A parsed SSE event.
    #[derive(Debug)]
    struct Event {
        name: String,
        data: Value,
    }

    fn parse_sse(text: &str) -> Vec<Event> {
        assert!(
            text.ends_with("\n\n"),
            "stream must end with a blank line: {text:?}"
        );
        text.split("\n\n")
            .filter(|chunk| !chunk.is_empty())
            .map(|chunk| {
                let mut lines = chunk.lines();
                let name = lines
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .expect("event line");
                let data = lines
                    .next()
                    .and_then(|l| l.strip_prefix("data: "))
                    .expect("data line");
                assert!(lines.next().is_none(), "one data line per event: {chunk:?}");
                let data: Value = serde_json::from_str(data).expect("data is JSON");
                assert_eq!(data["type"], name, "event name matches data.type");
                Event {
                    name: name.to_owned(),
                    data,
                }
            })
            .collect()
    }

    async fn start() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router()).await });
        format!("http://{address}/v1/messages")
    }

    async fn post(url: &str, body: &Value) -> (u16, String, String) {
        let response = reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    }

    fn request(messages: Value) -> Value {
        json!({"model": "anything", "max_tokens": 1024, "stream": true, "messages": messages})
    }

    /// Text of all text deltas, the concatenated tool input JSON, tool names, and the stop reason.
    fn summarize(events: &[Event]) -> (String, Vec<(String, Value)>, String) {
        assert_eq!(
            events.first().map(|e| e.name.as_str()),
            Some("message_start")
        );
        assert_eq!(events[0].data["message"]["model"], MODEL);
        assert_eq!(events.last().map(|e| e.name.as_str()), Some("message_stop"));
        let mut text = String::new();
        let mut tools = Vec::new();
        let mut partial = String::new();
        let mut stop_reason = String::new();
        for event in events {
            match event.name.as_str() {
                "content_block_start" if event.data["content_block"]["type"] == "tool_use" => {
                    tools.push((
                        event.data["content_block"]["name"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                        Value::Null,
                    ));
                    assert!(event.data["content_block"]["id"]
                        .as_str()
                        .unwrap()
                        .starts_with("toolu_"));
                    partial.clear();
                }
                "content_block_delta" => match event.data["delta"]["type"].as_str().unwrap() {
                    "text_delta" => text.push_str(event.data["delta"]["text"].as_str().unwrap()),
                    "input_json_delta" => {
                        partial.push_str(event.data["delta"]["partial_json"].as_str().unwrap())
                    }
                    other => panic!("unexpected delta {other}"),
                },
                "content_block_stop" if !partial.is_empty() => {
                    let input: Value =
                        serde_json::from_str(&partial).expect("input_json_delta pieces form JSON");
                    tools.last_mut().unwrap().1 = input;
                }
                "message_delta" => {
                    stop_reason = event.data["delta"]["stop_reason"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                }
                _ => {}
            }
        }
        (text, tools, stop_reason)
    }

    #[tokio::test]
    async fn demo_scenario_over_http() {
        let url = start().await;
        let user = json!({"role": "user", "content": "Add a farewell function"});

        let (status, content_type, body) = post(&url, &request(json!([user]))).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let events = parse_sse(&body);
        let deltas = events
            .iter()
            .filter(|e| e.data["delta"]["type"] == "text_delta")
            .count();
        assert!(
            (8..=12).contains(&deltas),
            "about ten text deltas, got {deltas}"
        );
        let json_pieces = events
            .iter()
            .filter(|e| e.data["delta"]["type"] == "input_json_delta")
            .count();
        assert!(
            json_pieces >= 3,
            "tool input split into pieces, got {json_pieces}"
        );
        assert!(events.iter().any(|e| e.name == "ping"));
        let (text, tools, stop) = summarize(&events);
        assert!(
            text.starts_with("I'll take a look at the repository"),
            "{text}"
        );
        assert_eq!(tools, vec![("list_files".to_owned(), json!({"path": "."}))]);
        assert_eq!(stop, "tool_use");

        // Step 1: one tool_result in the conversation.
        let assistant = json!({"role": "assistant", "content": [
            {"type": "text", "text": text}, {"type": "tool_use", "id": "toolu_1", "name": "list_files", "input": {"path": "."}}]});
        let result = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "README.md"}]});
        let (_, _, body) = post(&url, &request(json!([user, assistant, result]))).await;
        let (_, tools, stop) = summarize(&parse_sse(&body));
        let content = "# Notes from the demo model\n\nPrompt: Add a farewell function\n";
        assert_eq!(
            tools,
            vec![(
                "write_file".to_owned(),
                json!({"path": "NIGHTSHIFT_DEMO.md", "content": content})
            )]
        );
        assert_eq!(stop, "tool_use");

        // Step 2: two tool_results.
        let (_, _, body) = post(
            &url,
            &request(json!([user, assistant, result, assistant, result])),
        )
        .await;
        let (text, tools, stop) = summarize(&parse_sse(&body));
        assert_eq!(text, "Done — I wrote NIGHTSHIFT_DEMO.md.");
        assert!(tools.is_empty());
        assert_eq!(stop, "end_turn");
    }

    #[tokio::test]
    async fn tokens_directive_streams_count_deltas_at_rate() {
        let url = start().await;
        let body = request(
            json!([{"role": "user", "content": [{"type": "text", "text": "go [script:tokens count=50 rate=0]"}]}]),
        );
        let (status, _, text) = post(&url, &body).await;
        assert_eq!(status, 200);
        let events = parse_sse(&text);
        let deltas: Vec<&str> = events
            .iter()
            .filter(|e| e.name == "content_block_delta")
            .map(|e| e.data["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(deltas.len(), 50);
        assert_eq!(deltas[0], "tok0 ");
        assert_eq!(deltas[49], "tok49 ");
        let (_, tools, stop) = summarize(&events);
        assert!(tools.is_empty());
        assert_eq!(stop, "end_turn");

        // Paced: 10 deltas at 50/s take at least ~200 ms.
        let started = Instant::now();
        let body =
            request(json!([{"role": "user", "content": "[script:tokens count=10 rate=50]"}]));
        let (_, _, text) = post(&url, &body).await;
        assert_eq!(
            parse_sse(&text)
                .iter()
                .filter(|e| e.name == "content_block_delta")
                .count(),
            10
        );
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stamped_tokens_carry_the_time_they_are_sent() {
        let url = start().await;
        let unix_micros = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros()
        };
        let before = unix_micros();
        let body = request(
            json!([{"role": "user", "content": "[script:tokens count=5 rate=100 stamp=1]"}]),
        );
        let (status, _, text) = post(&url, &body).await;
        let after = unix_micros();
        assert_eq!(status, 200);
        let stamps: Vec<u128> = parse_sse(&text)
            .iter()
            .filter(|e| e.name == "content_block_delta")
            .enumerate()
            .map(|(i, e)| {
                let delta = e.data["delta"]["text"].as_str().unwrap();
                let rest = delta
                    .strip_prefix(&format!("tok{i}@"))
                    .and_then(|rest| rest.strip_suffix(' '))
                    .unwrap_or_else(|| panic!("delta {i} is not stamped: {delta:?}"));
                rest.parse().unwrap()
            })
            .collect();
        assert_eq!(stamps.len(), 5);
        assert!(
            stamps.iter().all(|s| (before..=after).contains(s)),
            "{stamps:?} outside [{before}, {after}]"
        );
        // Paced at 100/s, the stamps are the send times: ~10 ms apart, in order.
        for pair in stamps.windows(2) {
            assert!(pair[1] - pair[0] >= 5_000, "{stamps:?}");
        }

        // stamp=0 and no stamp keep the plain deltas.
        for directive in ["[script:tokens count=2 stamp=0]", "[script:tokens count=2]"] {
            let body = request(json!([{"role": "user", "content": directive}]));
            let (_, _, text) = post(&url, &body).await;
            let (text, _, _) = summarize(&parse_sse(&text));
            assert_eq!(text, "tok0 tok1 ", "{directive}");
        }
        assert_eq!(
            stamp_text("tok7 ", UNIX_EPOCH + Duration::from_micros(1_234_567)),
            "tok7@1234567 "
        );
    }

    #[tokio::test]
    async fn pacing_is_visible_on_the_wire() {
        let url = start().await;
        let body = request(json!([{"role": "user", "content": "[script:slow ms=600]"}]));
        let mut response = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap();
        let started = Instant::now();
        let first = response.chunk().await.unwrap().unwrap();
        let first_at = started.elapsed();
        assert!(String::from_utf8_lossy(&first).starts_with("event: message_start"));
        let mut rest = Vec::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            rest.extend_from_slice(&chunk);
        }
        assert!(
            first_at < Duration::from_millis(200),
            "first event flushed at once, got {first_at:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "stream spread over ~600 ms, got {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn write_directive() {
        let url = start().await;
        let user =
            json!({"role": "user", "content": "[script:write path=src/a.txt content=hello there]"});
        let (_, _, body) = post(&url, &request(json!([user]))).await;
        let (_, tools, stop) = summarize(&parse_sse(&body));
        assert_eq!(
            tools,
            vec![(
                "write_file".to_owned(),
                json!({"path": "src/a.txt", "content": "hello there"})
            )]
        );
        assert_eq!(stop, "tool_use");
        let result = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]});
        let (_, _, body) = post(
            &url,
            &request(json!([user, {"role": "assistant", "content": "x"}, result])),
        )
        .await;
        let (_, tools, stop) = summarize(&parse_sse(&body));
        assert!(tools.is_empty());
        assert_eq!(stop, "end_turn");
    }

    #[tokio::test]
    async fn error_directive_sends_an_error_event_mid_stream() {
        let url = start().await;
        let (status, _, body) = post(
            &url,
            &request(json!([{"role": "user", "content": "[script:error]"}])),
        )
        .await;
        assert_eq!(status, 200);
        let events = parse_sse(&body);
        assert!(events.iter().any(|e| e.name == "content_block_delta"));
        let last = events.last().unwrap();
        assert_eq!(last.name, "error");
        assert_eq!(
            last.data,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        assert!(!events.iter().any(|e| e.name == "message_stop"));
    }

    #[tokio::test]
    async fn bad_requests_get_the_api_error_shape() {
        let url = start().await;
        let client = reqwest::Client::new();
        let cases = [
            client.post(&url).body("{not json").send().await.unwrap(),
            client
                .post(&url)
                .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap(),
            client
                .post(&url)
                .json(&json!({"stream": true, "messages": []}))
                .send()
                .await
                .unwrap(),
            client
                .post(&url)
                .json(&request(
                    json!([{"role": "user", "content": "[script:tokens]"}]),
                ))
                .send()
                .await
                .unwrap(),
            client
                .post(&url)
                .json(&request(
                    json!([{"role": "user", "content": "[script:nope]"}]),
                ))
                .send()
                .await
                .unwrap(),
        ];
        for response in cases {
            assert_eq!(response.status().as_u16(), 400);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["type"], "error");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn fixture_event_shapes_match() {
        // Same event sequence as the recorded tool_use stream: start, text block (with ping), tool
        // block, end.
        let reply = plan(
            &request(json!([{"role": "user", "content": "hi"}])),
            Api::Anthropic,
        )
        .unwrap();
        let ids = Ids {
            message_id: "msg_1".into(),
            tool_use_prefix: "toolu_1_".into(),
        };
        let names: Vec<&str> = frames(&reply, &ids, 10)
            .iter()
            .map(|f| f.event.unwrap_or_default())
            .collect::<Vec<_>>();
        let mut compact: Vec<&str> = names.clone();
        compact.dedup();
        assert_eq!(
            compact,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let fixture = std::fs::read_to_string(
            crate::run::provider::tests::fixtures("anthropic-sse").join("tool_use_response.txt"),
        )
        .unwrap();
        let recorded: Vec<String> = parse_sse(&format!("{}\n\n", fixture.trim_end()))
            .into_iter()
            .map(|e| e.name)
            .collect();
        let mut recorded: Vec<&str> = recorded.iter().map(String::as_str).collect();
        recorded.dedup();
        assert_eq!(compact, recorded);
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    fn tool_results() -> Value {
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]})
    }

    fn assistant() -> Value {
        json!({"role": "assistant", "content": [{"type": "text", "text": "x"}]})
    }

    /// Text deltas joined, tool calls, stop reason of a reply.
    fn outline(reply: &Reply) -> (String, Vec<(String, Value)>, StopReason) {
        let mut text = String::new();
        let mut tools = Vec::new();
        for block in &reply.blocks {
            match block {
                Block::Text(deltas) => text.push_str(&deltas.concat()),
                Block::ToolUse { name, input } => tools.push((name.clone(), input.clone())),
            }
        }
        (text, tools, reply.stop_reason)
    }

    #[test]
    fn the_last_user_text_message_is_the_prompt_and_steps_count_from_it() {
        // The first prompt's directive is over; the second prompt has none: the demo, at step 0.
        let messages = json!([
            user("[script:write path=a content=x]"),
            assistant(),
            tool_results(),
            assistant(),
            user("say hello"),
        ]);
        let (_, tools, stop) = outline(&plan(&request(messages.clone()), Api::Anthropic).unwrap());
        assert_eq!(tools, vec![("list_files".to_owned(), json!({"path": "."}))]);
        assert_eq!(stop, StopReason::ToolUse);

        // One tool-result turn after the current prompt: step 1, whatever came before it.
        let mut later = messages.as_array().unwrap().clone();
        later.extend([assistant(), tool_results()]);
        let (_, tools, _) = outline(&plan(&request(json!(later)), Api::Anthropic).unwrap());
        assert_eq!(tools[0].0, "write_file");
        assert_eq!(
            tools[0].1["content"],
            "# Notes from the demo model\n\nPrompt: say hello\n"
        );

        // A directive in the latest prompt wins over one in an earlier prompt.
        let messages = json!([user("hi"), assistant(), user("[script:tokens count=2]")]);
        let (text, tools, stop) = outline(&plan(&request(messages), Api::Anthropic).unwrap());
        assert_eq!(
            (text.as_str(), tools.len(), stop),
            ("tok0 tok1 ", 0, StopReason::EndTurn)
        );

        // OpenAI: the last `user` message; a run of `tool` messages is one step.
        let tool = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "ok"});
        let call = json!({"role": "assistant", "content": null, "tool_calls": []});
        let messages = json!([
            {"role": "system", "content": "s"},
            user("old [script:error]"),
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "new prompt"}]},
            call, tool("a"), tool("b"),
        ]);
        let (text, tools, _) = outline(&plan(&request(messages), Api::OpenAi).unwrap());
        assert!(text.starts_with("Thanks"), "{text}");
        assert_eq!(tools[0].0, "write_file");
        assert_eq!(
            tools[0].1["content"],
            "# Notes from the demo model\n\nPrompt: new prompt\n"
        );
    }

    const PLAN: &str = "Do it. [script:plan]\n\
        {\"tool\": \"list_files\", \"input\": {\"path\": \".\"}}\n\
        \n\
        [{\"tool\": \"read_file\", \"input\": {\"path\": \"a\"}}, {\"tool\": \"read_file\"}]\n\
        {\"text\": \"Finished early.\"}\n\
        {\"tool\": \"never\"}";

    #[test]
    fn plan_plays_one_line_per_step() {
        let mut messages = vec![user(PLAN)];
        let mut replies = Vec::new();
        for _ in 0..5 {
            replies.push(outline(
                &plan(&request(json!(messages)), Api::Anthropic).unwrap(),
            ));
            messages.extend([assistant(), tool_results()]);
        }
        assert_eq!(
            replies,
            vec![
                (
                    "Step 1: calling list_files.".to_owned(),
                    vec![("list_files".to_owned(), json!({"path": "."}))],
                    StopReason::ToolUse
                ),
                (
                    "Step 2: calling read_file, read_file.".to_owned(),
                    vec![
                        ("read_file".to_owned(), json!({"path": "a"})),
                        ("read_file".to_owned(), json!({}))
                    ],
                    StopReason::ToolUse
                ),
                ("Finished early.".to_owned(), vec![], StopReason::EndTurn),
                (
                    "Step 4: calling never.".to_owned(),
                    vec![("never".to_owned(), json!({}))],
                    StopReason::ToolUse
                ),
                (
                    "Done: followed the plan's 4 steps.".to_owned(),
                    vec![],
                    StopReason::EndTurn
                ),
            ]
        );
        // Several calls in one step get distinct ids.
        let reply = plan(
            &request(json!([user(PLAN), assistant(), tool_results()])),
            Api::Anthropic,
        )
        .unwrap();
        let ids = Ids {
            message_id: "msg_1".into(),
            tool_use_prefix: "toolu_1_".into(),
        };
        let starts: Vec<String> = frames(&reply, &ids, 1)
            .iter()
            .filter_map(|frame| match &frame.data {
                FrameData::Json(data) if data["content_block"]["type"] == "tool_use" => {
                    Some(data["content_block"]["id"].as_str().unwrap().to_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(starts, ["toolu_1_1", "toolu_1_2"]);
    }

    #[test]
    fn bad_plans_are_refused_with_their_line() {
        for (body, line) in [
            ("{\"tool\": \"a\"}\n{not json", 2),
            ("{\"tool\": \"\"}", 1),
            ("{\"tool\": \"a\", \"input\": [1]}", 1),
            ("[]", 1),
            ("{\"say\": \"x\"}", 1),
            ("{\"text\": \"fine\"}\n\n\"just a string\"", 2),
        ] {
            let prompt = format!("[script:plan]\n{body}");
            let error = plan(&request(json!([user(&prompt)])), Api::Anthropic).unwrap_err();
            assert!(
                matches!(&error, ScriptError::Plan { line: l, .. } if *l == line),
                "{body}: {error:?}"
            );
        }
    }

    /// The `data:` payloads of an OpenAI stream; asserts there are no `event:` lines.
    fn parse_chunks(text: &str) -> Vec<String> {
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split("\n\n")
            .filter(|chunk| !chunk.is_empty())
            .map(|chunk| {
                chunk
                    .strip_prefix("data: ")
                    .filter(|data| !data.contains('\n'))
                    .unwrap_or_else(|| panic!("one data line per event: {chunk:?}"))
                    .to_owned()
            })
            .collect()
    }

    fn chat_url(url: &str) -> String {
        url.replace("/v1/messages", "/v1/chat/completions")
    }

    #[tokio::test]
    async fn chat_completions_stream_in_the_real_wire_shape() {
        let url = chat_url(&start().await);
        let body = json!({"model": "any", "stream": true, "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "Add a farewell function"}]});
        let (status, content_type, text) = post(&url, &body).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let data = parse_chunks(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], MODEL);
            assert!(chunk["id"].as_str().unwrap().starts_with("chatcmpl-"));
            assert_eq!(chunk["id"], chunks[0]["id"]);
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(content.starts_with("I'll take a look"), "{content}");
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert!(calls.len() >= 3, "arguments in pieces: {calls:?}");
        assert_eq!(calls[0]["index"], 0);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "list_files");
        assert_eq!(calls[0]["function"]["arguments"], "");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert!(calls[1..].iter().all(|c| c.get("id").is_none()));
        let arguments: String = calls
            .iter()
            .map(|c| c["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap(),
            json!({"path": "."})
        );
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        let usage = &chunks[chunks.len() - 1];
        assert_eq!(usage["choices"], json!([]));
        let (prompt, completion) = (
            usage["usage"]["prompt_tokens"].as_u64().unwrap(),
            usage["usage"]["completion_tokens"].as_u64().unwrap(),
        );
        assert!(prompt > 0 && completion > 0);
        assert_eq!(usage["usage"]["total_tokens"], prompt + completion);

        // Step 1: one run of tool messages.
        let body = json!({"model": "any", "stream": true, "messages": [
            {"role": "user", "content": "Add a farewell function"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "list_files", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "README.md"},
        ]});
        let (_, _, text) = post(&url, &body).await;
        assert!(text.contains("NIGHTSHIFT_DEMO.md"), "{text}");
        assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");

        // Stamped tokens carry the time in the content too.
        let body = json!({"stream": true, "messages": [user("[script:tokens count=2 stamp=1]")]});
        let (_, _, text) = post(&url, &body).await;
        let content: String = parse_chunks(&text)
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(
            content.starts_with("tok0@") && content.contains(" tok1@"),
            "{content}"
        );
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    }

    #[tokio::test]
    async fn chat_completions_errors_in_the_openai_shape() {
        let url = chat_url(&start().await);
        let (status, _, text) = post(
            &url,
            &json!({"stream": true, "messages": [user("[script:error]")]}),
        )
        .await;
        assert_eq!(status, 200);
        let data = parse_chunks(&text);
        let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(last["error"]["type"], "server_error");
        assert_eq!(last["error"]["message"], "Overloaded");
        assert!(!text.contains("[DONE]"));
        assert!(data.len() > 2, "some content before the error");

        let client = reqwest::Client::new();
        let bodies = [
            "{not json".to_owned(),
            json!({"messages": [user("hi")]}).to_string(),
            json!({"stream": true, "messages": [{"role": "system", "content": "s"}]}).to_string(),
            json!({"stream": true, "messages": [user("[script:nope]")]}).to_string(),
            json!({"stream": true, "messages": [user("[script:plan]\n{bad")]}).to_string(),
        ];
        for body in bodies {
            let response = client.post(&url).body(body.clone()).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 400, "{body}");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
            assert!(error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
            assert!(
                error.get("type").is_none(),
                "OpenAI shape, not Anthropic's: {error}"
            );
        }
        // The Anthropic endpoint refuses a bad plan in its own shape.
        let response = client
            .post(url.replace("/v1/chat/completions", "/v1/messages"))
            .json(&request(json!([user("[script:plan]\n{bad")])))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("line 1"),
            "{error}"
        );
    }

    #[test]
    fn splitting_keeps_the_text() {
        let text = "I'll take a look at the repository first to see how it is laid out.";
        let parts = split_words(text, 10);
        assert_eq!(parts.concat(), text);
        assert!(parts.len() >= 5);
        assert!(parts[1].starts_with(' '));
        let json = json!({"path": "ü/x", "content": "a \"quoted\" line\n"}).to_string();
        let pieces = split_json(&json);
        assert_eq!(pieces[0], "");
        assert!(pieces.len() >= 3);
        assert_eq!(pieces.concat(), json);
    }
}

//! The Anthropic Messages API, streaming: the HTTP client ([`ModelClient`]) and the pure state machine
//! ([`MessageAssembler`]) that turns the stream's events into text deltas and one finished [`ModelResponse`].

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};

use super::sse::{SseDecoder, SseEvent};

/// `anthropic-version` header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` of every request.
const MAX_TOKENS: u32 = 8192;
/// How much of an error body is kept in [`ModelError::Http`].
const ERROR_BODY_LIMIT_BYTES: usize = 2048;
/// No byte from the model for this long ends the call.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything that can go wrong talking to the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The request could not be sent or the stream broke.
    #[error("model request to {url} failed: {source}")]
    Transport {
        /// Endpoint.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with a non-success status.
    #[error("model api answered {status}: {body}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The body, truncated.
        body: String,
    },
    /// The stream carried an `error` event.
    #[error("model stream error {kind}: {message}")]
    Api {
        /// Error type, e.g. `overloaded_error`.
        kind: String,
        /// Human detail.
        message: String,
    },
    /// An event's data is not the JSON we expect.
    #[error("invalid `{event}` event in model stream: {source}")]
    InvalidEvent {
        /// Event name.
        event: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A delta or stop for a content block that was never started.
    #[error("model stream refers to unknown content block {index}")]
    UnknownBlock {
        /// Block index.
        index: usize,
    },
    /// A tool call's accumulated input is not valid JSON.
    #[error("tool call {id} has invalid input json: {source}")]
    InvalidToolInput {
        /// Tool use id.
        id: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The message ended while a content block was still open (e.g. cut off by `max_tokens`).
    #[error(
        "model message ended with content block {index} incomplete (stop reason {stop_reason})"
    )]
    IncompleteBlock {
        /// Block index.
        index: usize,
        /// The stop reason reported, or `none`.
        stop_reason: String,
    },
    /// An event arrived before `message_start` or after `message_stop`.
    #[error("unexpected `{event}` event in model stream")]
    UnexpectedEvent {
        /// Event name.
        event: String,
    },
    /// The API key cannot be sent as an HTTP header.
    #[error("api key is not a valid http header value")]
    InvalidApiKey,
    /// The stream ended without `message_stop`.
    #[error("model stream ended before message_stop")]
    Truncated,
}

/// The API key, never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wrap a key.
    pub fn new(key: String) -> Self {
        Self(key)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// One call's request: what varies between calls.
#[derive(Debug, Clone, Copy)]
pub struct ModelRequest<'a> {
    /// Model id.
    pub model: &'a str,
    /// System prompt.
    pub system: &'a str,
    /// The conversation so far, in API shape.
    pub messages: &'a [Value],
    /// Tool definitions, in API shape.
    pub tools: &'a [Value],
}

impl ModelRequest<'_> {
    /// The JSON body of the call.
    pub fn body(&self) -> Value {
        json!({
            "model": self.model,
            "max_tokens": MAX_TOKENS,
            "stream": true,
            "system": self.system,
            "messages": self.messages,
            "tools": self.tools,
        })
    }
}

/// A client of the Messages API.
#[derive(Debug, Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    messages_url: String,
    /// The `x-api-key` header, marked sensitive (its `Debug` prints no value).
    api_key: Option<reqwest::header::HeaderValue>,
}

impl ModelClient {
    /// A client for `base_url` (e.g. `https://api.anthropic.com`).
    pub fn new(base_url: &str, api_key: Option<ApiKey>) -> Result<Self, ModelError> {
        let messages_url = format!("{}/v1/messages", base_url.trim_end_matches('/'));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|source| ModelError::Transport {
                url: messages_url.clone(),
                source,
            })?;
        let api_key = match api_key {
            Some(ApiKey(key)) => {
                let mut value = reqwest::header::HeaderValue::from_str(&key)
                    .map_err(|_| ModelError::InvalidApiKey)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            http,
            messages_url,
            api_key,
        })
    }

    /// Start a streaming call; read it with [`MessageStream::next`].
    pub async fn stream(&self, request: ModelRequest<'_>) -> Result<MessageStream, ModelError> {
        let mut builder = self
            .http
            .post(&self.messages_url)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("accept", "text/event-stream")
            .json(&request.body());
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key.clone());
        }
        let transport = |source| ModelError::Transport {
            url: self.messages_url.clone(),
            source,
        };
        let response = builder.send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(ModelError::Http {
                status: status.as_u16(),
                body: truncate_body(&bytes),
            });
        }
        Ok(MessageStream {
            url: self.messages_url.clone(),
            response,
            decoder: SseDecoder::new(),
            assembler: MessageAssembler::new(),
            pending: VecDeque::new(),
            ended: false,
        })
    }
}

fn truncate_body(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= ERROR_BODY_LIMIT_BYTES {
        return text.into_owned();
    }
    let mut end = ERROR_BODY_LIMIT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [truncated]", text.get(..end).unwrap_or_default())
}

/// A call in progress.
pub struct MessageStream {
    url: String,
    response: reqwest::Response,
    decoder: SseDecoder,
    assembler: MessageAssembler,
    pending: VecDeque<StreamItem>,
    ended: bool,
}

impl MessageStream {
    /// The next item; [`StreamItem::Finished`] is the last one, after which this returns `None`.
    pub async fn next(&mut self) -> Option<Result<StreamItem, ModelError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.ended {
                return None;
            }
            let events = match self.response.chunk().await {
                Ok(Some(chunk)) => self.decoder.feed(&chunk),
                Err(source) => {
                    self.ended = true;
                    return Some(Err(ModelError::Transport {
                        url: self.url.clone(),
                        source,
                    }));
                }
                Ok(None) => {
                    self.ended = true;
                    let last = self.decoder.finish();
                    let result = last.into_iter().try_for_each(|event| self.apply(&event));
                    if let Err(error) = result.and_then(|()| self.finish()) {
                        return Some(Err(error));
                    }
                    continue;
                }
            };
            for event in &events {
                if let Err(error) = self.apply(event) {
                    self.ended = true;
                    return Some(Err(error));
                }
            }
        }
    }

    fn apply(&mut self, event: &SseEvent) -> Result<(), ModelError> {
        self.pending.extend(self.assembler.apply(event)?);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ModelError> {
        let response = std::mem::take(&mut self.assembler).finish()?;
        self.pending.push_back(StreamItem::Finished(response));
        Ok(())
    }
}

/// What a stream yields while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// `message_start`: the model that answers.
    Started {
        /// Model id as reported by the API.
        model: String,
    },
    /// A piece of text, as soon as it arrives.
    TextDelta(String),
    /// The whole message.
    Finished(ModelResponse),
}

/// A finished assistant message.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResponse {
    /// Model id.
    pub model: String,
    /// Content blocks we understand (text and tool use), in order.
    pub content: Vec<ContentBlock>,
    /// `end_turn`, `tool_use`, `max_tokens`, …
    pub stop_reason: Option<String>,
    /// Token counts of this call.
    pub usage: TokenUsage,
}

impl ModelResponse {
    /// All text blocks joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text(text) => Some(text.as_str()),
                ContentBlock::ToolUse { .. } => None,
            })
            .collect()
    }

    /// The content as the API expects it back in an assistant message.
    pub fn to_api_content(&self) -> Vec<Value> {
        self.content
            .iter()
            .filter(|block| !matches!(block, ContentBlock::Text(text) if text.is_empty()))
            .map(|block| match block {
                ContentBlock::Text(text) => json!({"type": "text", "text": text}),
                ContentBlock::ToolUse { id, name, input } => {
                    json!({"type": "tool_use", "id": id, "name": name, "input": input})
                }
            })
            .collect()
    }
}

/// A content block of a finished message.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentBlock {
    /// Text.
    Text(String),
    /// A tool call.
    ToolUse {
        /// Tool use id.
        id: String,
        /// Tool name.
        name: String,
        /// Parsed input.
        input: Value,
    },
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

#[derive(Debug)]
enum OpenBlock {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        json: String,
        start_input: Value,
    },
    /// A block type we do not use (thinking, compaction, fallback, …): kept only to track its stop.
    Other,
}

#[derive(Debug)]
struct BlockSlot {
    block: OpenBlock,
    stopped: Option<ContentBlock>,
    closed: bool,
}

/// The pure state machine of one streamed message.
#[derive(Debug, Default)]
pub struct MessageAssembler {
    started: bool,
    stopped: bool,
    model: String,
    usage: TokenUsage,
    stop_reason: Option<String>,
    blocks: Vec<Option<BlockSlot>>,
}

/// Parse `data` as JSON, with the event name for the error.
fn parse(event: &str, data: &str) -> Result<Value, ModelError> {
    serde_json::from_str(data).map_err(|source| ModelError::InvalidEvent {
        event: event.to_owned(),
        source,
    })
}

fn str_field(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn index_of(value: &Value) -> Option<usize> {
    value
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|index| usize::try_from(index).ok())
}

impl MessageAssembler {
    /// A fresh message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one server-sent event; returns the items it produces right away.
    pub fn apply(&mut self, event: &SseEvent) -> Result<Vec<StreamItem>, ModelError> {
        let data = parse(event.event.as_deref().unwrap_or("message"), &event.data)?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| event.event.clone())
            .unwrap_or_default();
        if kind == "ping" {
            return Ok(Vec::new());
        }
        if kind == "error" {
            return Err(ModelError::Api {
                kind: str_field(&data, "/error/type"),
                message: str_field(&data, "/error/message"),
            });
        }
        if self.stopped || (!self.started && kind != "message_start") {
            return Err(ModelError::UnexpectedEvent { event: kind });
        }
        let mut items = Vec::new();
        match kind.as_str() {
            "message_start" => {
                if self.started {
                    return Err(ModelError::UnexpectedEvent { event: kind });
                }
                self.started = true;
                self.model = str_field(&data, "/message/model");
                self.read_usage(data.pointer("/message/usage"));
                items.push(StreamItem::Started {
                    model: self.model.clone(),
                });
            }
            "content_block_start" => {
                let index = index_of(&data).ok_or_else(|| missing_index(&kind))?;
                let block = data.get("content_block").cloned().unwrap_or(Value::Null);
                let open = match block.get("type").and_then(Value::as_str) {
                    Some("text") => OpenBlock::Text(str_field(&block, "/text")),
                    Some("tool_use") => OpenBlock::ToolUse {
                        id: str_field(&block, "/id"),
                        name: str_field(&block, "/name"),
                        json: String::new(),
                        start_input: block.get("input").cloned().unwrap_or_else(|| json!({})),
                    },
                    _ => OpenBlock::Other,
                };
                if self.blocks.len() <= index {
                    self.blocks.resize_with(index + 1, || None);
                }
                if let Some(slot) = self.blocks.get_mut(index) {
                    *slot = Some(BlockSlot {
                        block: open,
                        stopped: None,
                        closed: false,
                    });
                }
            }
            "content_block_delta" => {
                let index = index_of(&data).ok_or_else(|| missing_index(&kind))?;
                let slot = self.open_slot(index)?;
                let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                match (delta.get("type").and_then(Value::as_str), &mut slot.block) {
                    (Some("text_delta"), OpenBlock::Text(text)) => {
                        let piece = str_field(&delta, "/text");
                        text.push_str(&piece);
                        if !piece.is_empty() {
                            items.push(StreamItem::TextDelta(piece));
                        }
                    }
                    (Some("input_json_delta"), OpenBlock::ToolUse { json, .. }) => {
                        json.push_str(&str_field(&delta, "/partial_json"));
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = index_of(&data).ok_or_else(|| missing_index(&kind))?;
                let slot = self.open_slot(index)?;
                slot.closed = true;
                slot.stopped = match &slot.block {
                    OpenBlock::Text(text) => Some(ContentBlock::Text(text.clone())),
                    OpenBlock::ToolUse {
                        id,
                        name,
                        json,
                        start_input,
                    } => {
                        let input = if json.trim().is_empty() {
                            start_input.clone()
                        } else {
                            serde_json::from_str(json).map_err(|source| {
                                ModelError::InvalidToolInput {
                                    id: id.clone(),
                                    source,
                                }
                            })?
                        };
                        Some(ContentBlock::ToolUse {
                            id: id.clone(),
                            name: name.clone(),
                            input,
                        })
                    }
                    OpenBlock::Other => None,
                };
            }
            "message_delta" => {
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.read_usage(data.get("usage"));
            }
            "message_stop" => {
                self.stopped = true;
            }
            _ => {
                tracing::debug!(event = %kind, "ignoring unknown model stream event");
            }
        }
        Ok(items)
    }

    /// The stream ended: the finished message, or why there is none.
    pub fn finish(self) -> Result<ModelResponse, ModelError> {
        if !self.stopped {
            return Err(ModelError::Truncated);
        }
        let mut content = Vec::new();
        for (index, slot) in self.blocks.into_iter().enumerate() {
            let Some(slot) = slot else { continue };
            if !slot.closed {
                return Err(ModelError::IncompleteBlock {
                    index,
                    stop_reason: self
                        .stop_reason
                        .clone()
                        .unwrap_or_else(|| "none".to_owned()),
                });
            }
            content.extend(slot.stopped);
        }
        Ok(ModelResponse {
            model: self.model,
            content,
            stop_reason: self.stop_reason,
            usage: self.usage,
        })
    }

    fn open_slot(&mut self, index: usize) -> Result<&mut BlockSlot, ModelError> {
        match self.blocks.get_mut(index) {
            Some(Some(slot)) if !slot.closed => Ok(slot),
            _ => Err(ModelError::UnknownBlock { index }),
        }
    }

    /// Usage counts in `message_start` and `message_delta` are cumulative: the latest value wins.
    fn read_usage(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        if let Some(input) = usage.get("input_tokens").and_then(Value::as_u64) {
            self.usage.input_tokens = input;
        }
        if let Some(output) = usage.get("output_tokens").and_then(Value::as_u64) {
            self.usage.output_tokens = output;
        }
    }
}

fn missing_index(event: &str) -> ModelError {
    ModelError::UnexpectedEvent {
        event: format!("{event} without index"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/anthropic-sse/"
    );

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("read fixture {path}: {e}"))
    }

    /// Decode `input` in chunks of `chunk_len` bytes: every item, or the first error.
    fn play(input: &[u8], chunk_len: usize) -> Result<Vec<StreamItem>, ModelError> {
        let mut decoder = SseDecoder::new();
        let mut assembler = MessageAssembler::new();
        let mut items = Vec::new();
        for chunk in input.chunks(chunk_len) {
            for event in decoder.feed(chunk) {
                items.extend(assembler.apply(&event)?);
            }
        }
        if let Some(event) = decoder.finish() {
            items.extend(assembler.apply(&event)?);
        }
        items.push(StreamItem::Finished(assembler.finish()?));
        Ok(items)
    }

    fn delta(text: &str) -> StreamItem {
        StreamItem::TextDelta(text.to_owned())
    }

    #[test]
    fn basic_response() {
        let expected = vec![
            StreamItem::Started {
                model: "claude-3-opus-latest".to_owned(),
            },
            delta("Hello"),
            delta(" there"),
            delta("!"),
            StreamItem::Finished(ModelResponse {
                model: "claude-3-opus-latest".to_owned(),
                content: vec![ContentBlock::Text("Hello there!".to_owned())],
                stop_reason: Some("end_turn".to_owned()),
                usage: TokenUsage {
                    input_tokens: 11,
                    output_tokens: 6,
                },
            }),
        ];
        let input = fixture("basic_response.txt");
        for chunk_len in [input.len(), 1, 7, 64] {
            assert_eq!(
                play(&input, chunk_len).unwrap(),
                expected,
                "chunk length {chunk_len}"
            );
        }
    }

    #[test]
    fn tool_use_response() {
        let expected = vec![
            StreamItem::Started {
                model: "claude-sonnet-4-20250514".to_owned(),
            },
            delta("I"),
            delta("'ll check the current weather in Paris for you."),
            StreamItem::Finished(ModelResponse {
                model: "claude-sonnet-4-20250514".to_owned(),
                content: vec![
                    ContentBlock::Text(
                        "I'll check the current weather in Paris for you.".to_owned(),
                    ),
                    ContentBlock::ToolUse {
                        id: "toolu_01NRLabsLyVHZPKxbKvkfSMn".to_owned(),
                        name: "get_weather".to_owned(),
                        input: json!({"location": "Paris"}),
                    },
                ],
                stop_reason: Some("tool_use".to_owned()),
                usage: TokenUsage {
                    input_tokens: 377,
                    output_tokens: 65,
                },
            }),
        ];
        let input = fixture("tool_use_response.txt");
        let crlf = String::from_utf8_lossy(&input)
            .replace('\n', "\r\n")
            .into_bytes();
        for chunk_len in [input.len(), 1, 5, 333] {
            assert_eq!(
                play(&input, chunk_len).unwrap(),
                expected,
                "chunk length {chunk_len}"
            );
            assert_eq!(
                play(&crlf, chunk_len).unwrap(),
                expected,
                "crlf, chunk length {chunk_len}"
            );
        }
    }

    #[test]
    fn incomplete_tool_input_is_a_typed_error() {
        let error = play(&fixture("incomplete_partial_json_response.txt"), 16).unwrap_err();
        assert!(
            matches!(&error, ModelError::IncompleteBlock { index: 1, stop_reason } if stop_reason == "max_tokens"),
            "{error:?}"
        );
    }

    #[test]
    fn unknown_block_types_are_skipped() {
        for name in [
            "compaction_response.txt",
            "fallback_response.txt",
            "fallback_credit_response.txt",
        ] {
            let items = play(&fixture(name), 32).unwrap();
            let Some(StreamItem::Finished(response)) = items.last() else {
                panic!("{name}: {items:?}")
            };
            assert_eq!(
                response.content,
                vec![ContentBlock::Text("Hello there!".to_owned())],
                "{name}"
            );
        }
    }

    #[test]
    fn refusal_has_its_stop_reason() {
        let items = play(&fixture("refusal_response.txt"), 32).unwrap();
        let Some(StreamItem::Finished(response)) = items.last() else {
            panic!("{items:?}")
        };
        assert_eq!(response.stop_reason.as_deref(), Some("refusal"));
        assert_eq!(response.text(), "");
    }

    #[test]
    fn stream_without_message_stop_is_truncated() {
        let input = fixture("basic_response.txt");
        let text = String::from_utf8_lossy(&input);
        let cut = text.find("event: message_delta").unwrap_or(text.len());
        assert!(matches!(play(&input[..cut], 8), Err(ModelError::Truncated)));
        assert!(matches!(play(b"", 8), Err(ModelError::Truncated)));
    }

    #[test]
    fn error_event_and_garbage_are_typed() {
        let error = play(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            10,
        )
        .unwrap_err();
        assert!(
            matches!(&error, ModelError::Api { kind, .. } if kind == "overloaded_error"),
            "{error:?}"
        );
        let error = play(b"event: message_start\ndata: {nope\n\n", 10).unwrap_err();
        assert!(
            matches!(error, ModelError::InvalidEvent { .. }),
            "{error:?}"
        );
        let error = play(
            b"data: {\"type\":\"content_block_delta\",\"index\":0}\n\n",
            10,
        )
        .unwrap_err();
        assert!(
            matches!(error, ModelError::UnexpectedEvent { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn invalid_tool_json_is_typed() {
        let input = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1}}}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"x\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        let error = play(input.as_bytes(), 9).unwrap_err();
        assert!(
            matches!(&error, ModelError::InvalidToolInput { id, .. } if id == "t1"),
            "{error:?}"
        );
    }

    #[test]
    fn request_body_has_the_api_shape() {
        let messages = [json!({"role": "user", "content": "hi"})];
        let tools = [json!({"name": "t", "description": "d", "input_schema": {"type": "object"}})];
        let body = ModelRequest {
            model: "m",
            system: "s",
            messages: &messages,
            tools: &tools,
        }
        .body();
        assert_eq!(
            body,
            json!({"model": "m", "max_tokens": 8192, "stream": true, "system": "s",
                   "messages": messages, "tools": tools})
        );
    }

    #[test]
    fn api_key_is_not_printed() {
        let client = ModelClient::new(
            "http://127.0.0.1:1/",
            Some(ApiKey::new("sk-secret".to_owned())),
        );
        let printed = format!("{client:?}");
        assert!(!printed.contains("sk-secret"), "{printed}");
    }
}

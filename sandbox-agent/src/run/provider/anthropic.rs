//! The Anthropic Messages API, streaming: the request ([`AnthropicApi`]) and the pure state machine
//! ([`MessageAssembler`]) that turns the stream's events into deltas and one finished response.
//!
//! Stream events: `message_start` (model, first usage), `content_block_start|delta|stop` per block,
//! `message_delta` (stop reason, usage), `message_stop`, `ping` anywhere, `error` anywhere. Block types
//! kept: `text`, `thinking` (`thinking_delta`, `signature_delta`), `redacted_thinking`, `tool_use`
//! (`input_json_delta`). Other blocks — server tool calls and their results, compaction, fallback — are
//! tracked for their stop and left out of the response: we neither execute nor send them back.

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::sse::SseEvent;
use super::{
    ApiKey, ContentBlock, Message, ModelError, ModelRequest, ModelResponse, StopReason,
    StreamAssembler, StreamItem, TokenUsage, WireFormat, WireRequest,
};

/// `anthropic-version` header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Messages endpoint and its key.
#[derive(Debug)]
pub struct AnthropicApi {
    messages_url: String,
    /// `x-api-key`, sensitive.
    api_key: Option<HeaderValue>,
}

impl AnthropicApi {
    /// `base_url` without `/v1` and without a trailing slash.
    pub fn new(base_url: &str, api_key: Option<&ApiKey>) -> Result<Self, ModelError> {
        Ok(Self {
            messages_url: format!("{base_url}/v1/messages"),
            api_key: api_key.map(|key| key.header("", "anthropic")).transpose()?,
        })
    }
}

impl WireFormat for AnthropicApi {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn request(&self, request: &ModelRequest<'_>) -> WireRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        if let Some(key) = &self.api_key {
            headers.insert("x-api-key", key.clone());
        }
        WireRequest {
            url: self.messages_url.clone(),
            headers,
            body: request_body(request),
        }
    }

    fn assembler(&self) -> Box<dyn StreamAssembler> {
        Box::new(MessageAssembler::new())
    }
}

/// The JSON body of a call.
pub fn request_body(request: &ModelRequest<'_>) -> Value {
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens,
        "stream": true,
        "messages": request.messages.iter().map(message).collect::<Vec<_>>(),
    });
    if !request.system.is_empty() {
        body["system"] = json!(request.system);
    }
    if !request.tools.is_empty() {
        body["tools"] = json!(request.tools);
    }
    body
}

/// One message in API shape. A user prompt is a plain string; empty text blocks (which the API rejects)
/// and thinking without a signature (from another provider) are left out.
fn message(message: &Message) -> Value {
    match message {
        Message::User { text } => json!({"role": "user", "content": text}),
        Message::Assistant { content } => {
            let blocks: Vec<Value> = content
                .iter()
                .filter_map(|block| match block {
                    ContentBlock::Text(text) if text.is_empty() => None,
                    ContentBlock::Text(text) => Some(json!({"type": "text", "text": text})),
                    ContentBlock::Thinking { signature, .. } if signature.is_empty() => None,
                    ContentBlock::Thinking {
                        thinking,
                        signature,
                    } => Some(
                        json!({"type": "thinking", "thinking": thinking, "signature": signature}),
                    ),
                    ContentBlock::RedactedThinking { data } => {
                        Some(json!({"type": "redacted_thinking", "data": data}))
                    }
                    ContentBlock::ToolUse { id, name, input } => {
                        Some(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
                    }
                })
                .collect();
            json!({"role": "assistant", "content": blocks})
        }
        Message::ToolResults { results } => {
            let blocks: Vec<Value> = results
                .iter()
                .map(|result| {
                    json!({"type": "tool_result", "tool_use_id": result.call_id,
                           "content": result.content, "is_error": result.is_error})
                })
                .collect();
            json!({"role": "user", "content": blocks})
        }
    }
}

#[derive(Debug)]
enum OpenBlock {
    Text(String),
    Thinking {
        thinking: String,
        signature: String,
    },
    RedactedThinking(String),
    ToolUse {
        id: String,
        name: String,
        json: String,
        start_input: Value,
    },
    /// A block we do not keep (server tool use and results, compaction, fallback, …).
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

fn index_of(event: &str, value: &Value) -> Result<usize, ModelError> {
    value
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|index| usize::try_from(index).ok())
        .ok_or_else(|| ModelError::UnexpectedEvent {
            event: format!("{event} without index"),
        })
}

impl MessageAssembler {
    /// A fresh message.
    pub fn new() -> Self {
        Self::default()
    }

    fn open_slot(&mut self, index: usize) -> Result<&mut BlockSlot, ModelError> {
        match self.blocks.get_mut(index) {
            Some(Some(slot)) if !slot.closed => Ok(slot),
            _ => Err(ModelError::UnknownBlock { index }),
        }
    }

    /// Usage arrives in `message_start` and again, cumulative, in `message_delta`: the output count there is
    /// the final one (`message_start` has a placeholder), so the latest wins. Input and cache counts are
    /// known from the start and repeated on newer API versions; the larger value wins, so a proxy that
    /// sends 0 in `message_delta` does not erase them.
    fn read_usage(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        let merge = |field: &str, count: &mut u64| {
            if let Some(value) = usage.get(field).and_then(Value::as_u64) {
                *count = (*count).max(value);
            }
        };
        merge("input_tokens", &mut self.usage.input_tokens);
        if let Some(output) = usage.get("output_tokens").and_then(Value::as_u64) {
            self.usage.output_tokens = output;
        }
        merge("cache_read_input_tokens", &mut self.usage.cache_read_tokens);
        merge(
            "cache_creation_input_tokens",
            &mut self.usage.cache_write_tokens,
        );
    }

    fn start_block(&mut self, data: &Value) -> Result<(), ModelError> {
        let index = index_of("content_block_start", data)?;
        let block = data.get("content_block").unwrap_or(&Value::Null);
        let open = match block.get("type").and_then(Value::as_str) {
            Some("text") => OpenBlock::Text(str_field(block, "/text")),
            Some("thinking") => OpenBlock::Thinking {
                thinking: str_field(block, "/thinking"),
                signature: str_field(block, "/signature"),
            },
            Some("redacted_thinking") => OpenBlock::RedactedThinking(str_field(block, "/data")),
            Some("tool_use") => OpenBlock::ToolUse {
                id: str_field(block, "/id"),
                name: str_field(block, "/name"),
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
        Ok(())
    }

    fn block_delta(&mut self, data: &Value) -> Result<Vec<StreamItem>, ModelError> {
        let index = index_of("content_block_delta", data)?;
        let slot = self.open_slot(index)?;
        let delta = data.get("delta").unwrap_or(&Value::Null);
        let mut items = Vec::new();
        match (delta.get("type").and_then(Value::as_str), &mut slot.block) {
            (Some("text_delta"), OpenBlock::Text(text)) => {
                let piece = str_field(delta, "/text");
                text.push_str(&piece);
                if !piece.is_empty() {
                    items.push(StreamItem::TextDelta(piece));
                }
            }
            (Some("thinking_delta"), OpenBlock::Thinking { thinking, .. }) => {
                let piece = str_field(delta, "/thinking");
                thinking.push_str(&piece);
                if !piece.is_empty() {
                    items.push(StreamItem::ThinkingDelta(piece));
                }
            }
            (Some("signature_delta"), OpenBlock::Thinking { signature, .. }) => {
                signature.push_str(&str_field(delta, "/signature"));
            }
            (Some("input_json_delta"), OpenBlock::ToolUse { json, .. }) => {
                json.push_str(&str_field(delta, "/partial_json"));
            }
            // Citations, compaction and server tool input: nothing we keep.
            _ => {}
        }
        Ok(items)
    }

    fn stop_block(&mut self, data: &Value) -> Result<(), ModelError> {
        let index = index_of("content_block_stop", data)?;
        let slot = self.open_slot(index)?;
        slot.closed = true;
        slot.stopped = match &slot.block {
            OpenBlock::Text(text) => Some(ContentBlock::Text(text.clone())),
            OpenBlock::Thinking {
                thinking,
                signature,
            } => Some(ContentBlock::Thinking {
                thinking: thinking.clone(),
                signature: signature.clone(),
            }),
            OpenBlock::RedactedThinking(data) => {
                Some(ContentBlock::RedactedThinking { data: data.clone() })
            }
            OpenBlock::ToolUse {
                id,
                name,
                json,
                start_input,
            } => {
                let input = if json.trim().is_empty() {
                    start_input.clone()
                } else {
                    serde_json::from_str(json).map_err(|source| ModelError::InvalidToolInput {
                        id: id.clone(),
                        source,
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
        Ok(())
    }
}

impl StreamAssembler for MessageAssembler {
    fn apply(&mut self, event: &SseEvent) -> Result<Vec<StreamItem>, ModelError> {
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
        match kind.as_str() {
            "message_start" => {
                if self.started {
                    return Err(ModelError::UnexpectedEvent { event: kind });
                }
                self.started = true;
                self.model = str_field(&data, "/message/model");
                self.read_usage(data.pointer("/message/usage"));
                return Ok(vec![StreamItem::Started {
                    model: self.model.clone(),
                }]);
            }
            "content_block_start" => self.start_block(&data)?,
            "content_block_delta" => return self.block_delta(&data),
            "content_block_stop" => self.stop_block(&data)?,
            "message_delta" => {
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.read_usage(data.get("usage"));
            }
            "message_stop" => self.stopped = true,
            _ => tracing::debug!(event = %kind, "ignoring unknown model stream event"),
        }
        Ok(Vec::new())
    }

    fn finish(&mut self) -> Result<ModelResponse, ModelError> {
        if !self.stopped {
            return Err(ModelError::Truncated {
                expected: "message_stop",
            });
        }
        let mut content = Vec::new();
        for (index, slot) in std::mem::take(&mut self.blocks).into_iter().enumerate() {
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
            model: std::mem::take(&mut self.model),
            content,
            stop_reason: StopReason::from_anthropic(self.stop_reason.as_deref().unwrap_or("")),
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::provider::ToolResultBlock;

    fn event(data: Value) -> SseEvent {
        SseEvent {
            event: data["type"].as_str().map(str::to_owned),
            data: data.to_string(),
        }
    }

    fn play(events: &[Value]) -> Result<Vec<StreamItem>, ModelError> {
        let mut assembler = MessageAssembler::new();
        let mut items = Vec::new();
        for data in events {
            items.extend(assembler.apply(&event(data.clone()))?);
        }
        items.push(StreamItem::Finished(assembler.finish()?));
        Ok(items)
    }

    fn finished(items: &[StreamItem]) -> &ModelResponse {
        match items.last() {
            Some(StreamItem::Finished(response)) => response,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn thinking_with_signature_and_redacted_thinking_are_kept() {
        let items = play(&[
            json!({"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAh"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "EmwKAhgB"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 30}}),
            json!({"type": "message_stop"}),
        ])
        .unwrap();
        assert_eq!(
            items[..4],
            [
                StreamItem::Started {
                    model: "claude-sonnet-4-5".into()
                },
                StreamItem::ThinkingDelta("Let me ".into()),
                StreamItem::ThinkingDelta("think.".into()),
                StreamItem::TextDelta("Hi".into()),
            ]
        );
        let response = finished(&items);
        assert_eq!(
            response.content,
            [
                ContentBlock::Thinking {
                    thinking: "Let me think.".into(),
                    signature: "EqQBCgIYAh".into()
                },
                ContentBlock::RedactedThinking {
                    data: "EmwKAhgB".into()
                },
                ContentBlock::Text("Hi".into()),
            ]
        );

        // Sent back in the next request as they came, signature included.
        let messages = [
            Message::User { text: "q".into() },
            Message::Assistant {
                content: response.content.clone(),
            },
            Message::ToolResults {
                results: vec![ToolResultBlock {
                    call_id: "t1".into(),
                    content: "out".into(),
                    is_error: true,
                }],
            },
        ];
        let body = request_body(&ModelRequest {
            model: "claude-sonnet-4-5",
            system: "",
            messages: &messages,
            tools: &[],
            max_tokens: 100,
        });
        assert_eq!(
            body,
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true, "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAh"},
                    {"type": "redacted_thinking", "data": "EmwKAhgB"},
                    {"type": "text", "text": "Hi"},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "out", "is_error": true},
                ]},
            ]})
        );
    }

    #[test]
    fn usage_merges_start_and_delta() {
        let items = play(&[
            json!({"type": "message_start", "message": {"model": "m", "usage": {
                "input_tokens": 12, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000, "output_tokens": 1}}}),
            // Newer API versions repeat the (cumulative) input counts; some proxies send zeros.
            json!({"type": "message_delta", "delta": {"stop_reason": "pause_turn"}, "usage": {
                "input_tokens": 0, "cache_read_input_tokens": 4000, "output_tokens": 77}}),
            json!({"type": "message_stop"}),
        ])
        .unwrap();
        let response = finished(&items);
        assert_eq!(
            response.usage,
            TokenUsage {
                input_tokens: 12,
                output_tokens: 77,
                cache_read_tokens: 4000,
                cache_write_tokens: 300,
            }
        );
        assert_eq!(response.stop_reason, StopReason::PauseTurn);
    }

    #[test]
    fn server_tool_blocks_are_left_out_without_failing() {
        let items = play(&[
            json!({"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"query\": \"x\"}"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "citations_delta", "citation": {}}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Found it."}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
            json!({"type": "message_stop"}),
        ])
        .unwrap();
        let response = finished(&items);
        assert_eq!(response.content, [ContentBlock::Text("Found it.".into())]);
        assert_eq!(response.tool_uses().count(), 0);
    }

    #[test]
    fn every_stop_reason_is_mapped() {
        for (wire, reason) in [
            ("end_turn", StopReason::EndTurn),
            ("tool_use", StopReason::ToolUse),
            ("max_tokens", StopReason::MaxTokens),
            ("stop_sequence", StopReason::StopSequence),
            ("refusal", StopReason::Refusal),
            ("pause_turn", StopReason::PauseTurn),
            (
                "model_context_window_exceeded",
                StopReason::Other("model_context_window_exceeded".into()),
            ),
        ] {
            assert_eq!(StopReason::from_anthropic(wire), reason);
            assert_eq!(reason.as_str(), wire);
        }
    }

    #[test]
    fn malformed_streams_are_typed_errors() {
        let start = json!({"type": "message_start", "message": {"model": "m", "usage": {}}});
        let cases: Vec<(Vec<Value>, &str)> = vec![
            (
                vec![json!({"type": "content_block_delta", "index": 0})],
                "UnexpectedEvent",
            ),
            (
                vec![
                    start.clone(),
                    json!({"type": "content_block_delta", "index": 3, "delta": {}}),
                ],
                "UnknownBlock",
            ),
            (
                vec![start.clone(), json!({"type": "content_block_stop"})],
                "UnexpectedEvent",
            ),
            (vec![start.clone(), start.clone()], "UnexpectedEvent"),
            (
                vec![
                    start.clone(),
                    json!({"type": "message_stop"}),
                    json!({"type": "message_stop"}),
                ],
                "UnexpectedEvent",
            ),
            (vec![start.clone()], "Truncated"),
            (
                vec![
                    start.clone(),
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t1", "name": "x", "input": {}}}),
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
                    json!({"type": "content_block_stop", "index": 0}),
                ],
                "InvalidToolInput",
            ),
            (
                vec![
                    start,
                    json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                ],
                "Api",
            ),
        ];
        for (events, expected) in cases {
            let error = play(&events).unwrap_err();
            assert!(
                format!("{error:?}").starts_with(expected),
                "{expected}: {error:?}"
            );
        }
        let mut assembler = MessageAssembler::new();
        let error = assembler
            .apply(&SseEvent {
                event: Some("message_start".into()),
                data: "{nope".into(),
            })
            .unwrap_err();
        assert!(
            matches!(error, ModelError::InvalidEvent { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn request_shape_and_headers() {
        let api = AnthropicApi::new(
            "http://127.0.0.1:1",
            Some(&ApiKey::new("sk-ant-secret".into())),
        )
        .unwrap();
        let tools = [json!({"name": "t", "description": "d", "input_schema": {"type": "object"}})];
        let messages = [Message::User { text: "hi".into() }];
        let wire = api.request(&ModelRequest {
            model: "claude-haiku-4-5",
            system: "s",
            messages: &messages,
            tools: &tools,
            max_tokens: 8192,
        });
        assert_eq!(wire.url, "http://127.0.0.1:1/v1/messages");
        assert_eq!(wire.headers["x-api-key"], "sk-ant-secret");
        assert!(wire.headers["x-api-key"].is_sensitive());
        assert_eq!(wire.headers["anthropic-version"], ANTHROPIC_VERSION);
        assert_eq!(
            wire.body,
            json!({"model": "claude-haiku-4-5", "max_tokens": 8192, "stream": true, "system": "s",
                   "messages": [{"role": "user", "content": "hi"}], "tools": tools})
        );
        for printed in [format!("{api:?}"), format!("{wire:?}")] {
            assert!(!printed.contains("sk-ant-secret"), "{printed}");
        }
    }
}

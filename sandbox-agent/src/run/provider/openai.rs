//! OpenAI-compatible chat completions, streaming (`POST {base}/chat/completions`): OpenAI itself and the
//! local servers that speak it (Ollama, vLLM, llama.cpp). The request ([`OpenAiApi`]) and the pure state
//! machine ([`ChunkAssembler`]) that turns `chat.completion.chunk`s into deltas and one response.
//!
//! The stream is `data: {chunk}` lines ending in `data: [DONE]`. Text comes in `choices[0].delta.content`,
//! a refusal in `delta.refusal` (kept as text, and the stop reason becomes [`StopReason::Refusal`]),
//! reasoning from servers that stream it in `delta.reasoning_content` or `delta.reasoning` (kept as a
//! thinking block without signature), tool calls in `delta.tool_calls` accumulated by `index` (id and name
//! first, `arguments` in pieces). The last chunks are the one with `finish_reason` and, because we ask
//! with `stream_options.include_usage`, one with `usage` and no choices. Only choice 0 is kept (we never
//! ask for more). An error arrives as `data: {"error": {…}}`.
//!
//! Usage: `prompt_tokens` includes the cached tokens (`prompt_tokens_details.cached_tokens`); they are
//! split out so [`TokenUsage::input_tokens`] means uncached input for every provider.

use std::collections::BTreeMap;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::sse::SseEvent;
use super::{
    is_openai_model, ApiKey, ContentBlock, Message, ModelError, ModelRequest, ModelResponse,
    StopReason, StreamAssembler, StreamItem, TokenUsage, WireFormat, WireRequest,
};

/// Prefix of a failed tool result's content: chat completions has no error flag on `tool` messages.
pub const TOOL_ERROR_PREFIX: &str = "error: ";
/// What the chunks are called in errors.
const CHUNK: &str = "chat.completion.chunk";

/// The chat completions endpoint and its key.
#[derive(Debug)]
pub struct OpenAiApi {
    completions_url: String,
    /// `authorization: Bearer …`, sensitive.
    authorization: Option<HeaderValue>,
}

impl OpenAiApi {
    /// `base_url` including `/v1`, without a trailing slash.
    pub fn new(base_url: &str, api_key: Option<&ApiKey>) -> Result<Self, ModelError> {
        Ok(Self {
            completions_url: format!("{base_url}/chat/completions"),
            authorization: api_key
                .map(|key| key.header("Bearer ", "openai"))
                .transpose()?,
        })
    }
}

impl WireFormat for OpenAiApi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn request(&self, request: &ModelRequest<'_>) -> WireRequest {
        let mut headers = HeaderMap::new();
        if let Some(authorization) = &self.authorization {
            headers.insert(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        WireRequest {
            url: self.completions_url.clone(),
            headers,
            body: request_body(request),
        }
    }

    fn assembler(&self) -> Box<dyn StreamAssembler> {
        Box::new(ChunkAssembler::new())
    }
}

/// The JSON body of a call. OpenAI's own models take `max_completion_tokens` (the reasoning models reject
/// `max_tokens`); other servers get the older `max_tokens`, which they all understand.
pub fn request_body(request: &ModelRequest<'_>) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if !request.system.is_empty() {
        messages.push(json!({"role": "system", "content": request.system}));
    }
    for message in request.messages {
        push_message(&mut messages, message);
    }
    let max_tokens_field = if is_openai_model(request.model) {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let mut body = json!({
        "model": request.model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": messages,
    });
    body[max_tokens_field] = json!(request.max_tokens);
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                json!({"type": "function", "function": {
                    "name": tool.get("name").cloned().unwrap_or(Value::Null),
                    "description": tool.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
                }})
            })
            .collect();
        body["tools"] = json!(tools);
    }
    body
}

/// Append `message` in API shape: an assistant turn with its tool calls; each tool result as its own
/// `tool` message. Thinking is not sent back (chat completions has no place for it).
fn push_message(out: &mut Vec<Value>, message: &Message) {
    match message {
        Message::User { text } => out.push(json!({"role": "user", "content": text})),
        Message::Assistant { content } => {
            let text: String = content
                .iter()
                .filter_map(|block| match block {
                    ContentBlock::Text(text) => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let tool_calls: Vec<Value> = content
                .iter()
                .filter_map(|block| match block {
                    ContentBlock::ToolUse { id, name, input } => Some(json!({
                        "id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()},
                    })),
                    _ => None,
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": text});
            if !tool_calls.is_empty() {
                if text.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = json!(tool_calls);
            }
            out.push(message);
        }
        Message::ToolResults { results } => {
            for result in results {
                let content = if result.is_error {
                    format!("{TOOL_ERROR_PREFIX}{}", result.content)
                } else {
                    result.content.clone()
                };
                out.push(
                    json!({"role": "tool", "tool_call_id": result.call_id, "content": content}),
                );
            }
        }
    }
}

#[derive(Debug, Default)]
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// The pure state machine of one streamed chat completion.
#[derive(Debug, Default)]
pub struct ChunkAssembler {
    started: bool,
    done: bool,
    model: String,
    text: String,
    refused: bool,
    reasoning: String,
    /// By the stream's `index`.
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
    usage: TokenUsage,
}

fn non_empty_str<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
}

/// `{"error": {"type"|"code", "message"}}` as [`ModelError::Api`].
fn api_error(error: &Value) -> ModelError {
    let kind = ["type", "code"]
        .iter()
        .find_map(|key| match error.get(key) {
            Some(Value::String(kind)) if !kind.is_empty() => Some(kind.clone()),
            Some(Value::Number(code)) => Some(code.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "error".to_owned());
    let message = match error.get("message").and_then(Value::as_str) {
        Some(message) => message.to_owned(),
        None => error.to_string(),
    };
    ModelError::Api { kind, message }
}

/// OpenAI usage in the neutral shape: cached tokens out of `prompt_tokens`.
fn usage(usage: &Value) -> TokenUsage {
    let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let prompt = count("/prompt_tokens");
    let cached = count("/prompt_tokens_details/cached_tokens");
    TokenUsage {
        input_tokens: prompt.saturating_sub(cached),
        output_tokens: count("/completion_tokens"),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
    }
}

impl ChunkAssembler {
    /// A fresh completion.
    pub fn new() -> Self {
        Self::default()
    }

    fn apply_delta(&mut self, delta: &Value, items: &mut Vec<StreamItem>) {
        for (key, refusal) in [("content", false), ("refusal", true)] {
            if let Some(text) = non_empty_str(delta, key) {
                self.refused |= refusal;
                self.text.push_str(text);
                items.push(StreamItem::TextDelta(text.to_owned()));
            }
        }
        if let Some(text) =
            non_empty_str(delta, "reasoning_content").or_else(|| non_empty_str(delta, "reasoning"))
        {
            self.reasoning.push_str(text);
            items.push(StreamItem::ThinkingDelta(text.to_owned()));
        }
        let calls = delta.get("tool_calls").and_then(Value::as_array);
        for (position, call) in calls.into_iter().flatten().enumerate() {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let entry = self.tool_calls.entry(index).or_default();
            if let Some(id) = non_empty_str(call, "id") {
                if entry.id.is_empty() {
                    entry.id = id.to_owned();
                }
            }
            let function = call.get("function").unwrap_or(&Value::Null);
            if let Some(name) = non_empty_str(function, "name") {
                if entry.name.is_empty() {
                    entry.name = name.to_owned();
                }
            }
            if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                entry.arguments.push_str(arguments);
            }
        }
    }
}

impl StreamAssembler for ChunkAssembler {
    fn apply(&mut self, event: &SseEvent) -> Result<Vec<StreamItem>, ModelError> {
        if event.data.trim() == "[DONE]" {
            if self.done {
                return Err(ModelError::UnexpectedEvent {
                    event: "[DONE]".into(),
                });
            }
            self.done = true;
            return Ok(Vec::new());
        }
        let data: Value =
            serde_json::from_str(&event.data).map_err(|source| ModelError::InvalidEvent {
                event: event.event.clone().unwrap_or_else(|| CHUNK.to_owned()),
                source,
            })?;
        match data.get("error") {
            Some(error) if !error.is_null() => return Err(api_error(error)),
            _ if event.event.as_deref() == Some("error") => return Err(api_error(&data)),
            _ => {}
        }
        if self.done {
            return Err(ModelError::UnexpectedEvent {
                event: format!("{CHUNK} after [DONE]"),
            });
        }
        let object = data.get("object").and_then(Value::as_str);
        let choices = data.get("choices").and_then(Value::as_array);
        let usage_chunk = data.get("usage").filter(|usage| usage.is_object());
        if object.is_some_and(|object| object != CHUNK)
            || (choices.is_none() && usage_chunk.is_none())
        {
            // E.g. a Responses API stream (`{"type": "response.created", …}`) at the wrong endpoint.
            let name = object
                .or_else(|| data.get("type").and_then(Value::as_str))
                .or(event.event.as_deref())
                .unwrap_or("chunk without choices");
            return Err(ModelError::UnexpectedEvent {
                event: name.to_owned(),
            });
        }
        let mut items = Vec::new();
        if !self.started {
            self.started = true;
            self.model = data
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            items.push(StreamItem::Started {
                model: self.model.clone(),
            });
        }
        if let Some(usage_value) = usage_chunk {
            self.usage = usage(usage_value);
        }
        for choice in choices.into_iter().flatten() {
            if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.get("delta") {
                self.apply_delta(delta, &mut items);
            }
            if let Some(reason) = non_empty_str(choice, "finish_reason") {
                self.finish_reason = Some(reason.to_owned());
            }
        }
        Ok(items)
    }

    fn finish(&mut self) -> Result<ModelResponse, ModelError> {
        let Some(finish_reason) = self.finish_reason.take().filter(|_| self.done) else {
            return Err(ModelError::Truncated {
                expected: "finish_reason and [DONE]",
            });
        };
        let mut content = Vec::new();
        if !self.reasoning.is_empty() {
            content.push(ContentBlock::Thinking {
                thinking: std::mem::take(&mut self.reasoning),
                signature: String::new(),
            });
        }
        if !self.text.is_empty() {
            content.push(ContentBlock::Text(std::mem::take(&mut self.text)));
        }
        for (index, call) in std::mem::take(&mut self.tool_calls) {
            // Some local servers send no id; the next request needs one to pair the result.
            let id = if call.id.is_empty() {
                format!("call_{index}")
            } else {
                call.id
            };
            let input = if call.arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&call.arguments).map_err(|source| {
                    ModelError::InvalidToolInput {
                        id: id.clone(),
                        source,
                    }
                })?
            };
            content.push(ContentBlock::ToolUse {
                id,
                name: call.name,
                input,
            });
        }
        Ok(ModelResponse {
            model: std::mem::take(&mut self.model),
            content,
            stop_reason: if self.refused {
                StopReason::Refusal
            } else {
                StopReason::from_openai(&finish_reason)
            },
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::provider::ToolResultBlock;

    fn play(chunks: &[&str]) -> Result<Vec<StreamItem>, ModelError> {
        let mut assembler = ChunkAssembler::new();
        let mut items = Vec::new();
        for data in chunks {
            items.extend(assembler.apply(&SseEvent {
                event: None,
                data: (*data).to_owned(),
            })?);
        }
        items.push(StreamItem::Finished(assembler.finish()?));
        Ok(items)
    }

    #[test]
    fn cached_tokens_are_split_out_of_prompt_tokens() {
        let items = play(&[
            r#"{"object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920}}}"#,
            "[DONE]",
        ])
        .unwrap();
        let Some(StreamItem::Finished(response)) = items.last() else {
            panic!("{items:?}")
        };
        assert_eq!(
            response.usage,
            TokenUsage {
                input_tokens: 86,
                output_tokens: 300,
                cache_read_tokens: 1920,
                cache_write_tokens: 0,
            }
        );
        assert_eq!(response.stop_reason, StopReason::EndTurn);
    }

    #[test]
    fn reasoning_and_tool_calls_without_ids() {
        // Shapes of local servers: reasoning_content (vLLM, DeepSeek), a whole tool call in one chunk
        // without id or index (older Ollama).
        let items = play(&[
            r#"{"model":"qwen3","choices":[{"delta":{"role":"assistant","reasoning_content":"Hmm."}}]}"#,
            r#"{"model":"qwen3","choices":[{"delta":{"tool_calls":[{"function":{"name":"list_files","arguments":"{\"path\":\".\"}"}}]}}]}"#,
            r#"{"model":"qwen3","choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ])
        .unwrap();
        assert_eq!(items[1], StreamItem::ThinkingDelta("Hmm.".into()));
        let Some(StreamItem::Finished(response)) = items.last() else {
            panic!("{items:?}")
        };
        assert_eq!(
            response.content,
            [
                ContentBlock::Thinking {
                    thinking: "Hmm.".into(),
                    signature: String::new()
                },
                ContentBlock::ToolUse {
                    id: "call_0".into(),
                    name: "list_files".into(),
                    input: json!({"path": "."})
                },
            ]
        );
        assert_eq!(response.stop_reason, StopReason::ToolUse);
        assert_eq!(response.usage, TokenUsage::default());
    }

    #[test]
    fn finish_reasons_map() {
        for (wire, reason) in [
            ("stop", StopReason::EndTurn),
            ("tool_calls", StopReason::ToolUse),
            ("function_call", StopReason::ToolUse),
            ("length", StopReason::MaxTokens),
            ("content_filter", StopReason::Refusal),
            ("eos", StopReason::Other("eos".into())),
        ] {
            assert_eq!(StopReason::from_openai(wire), reason, "{wire}");
        }
    }

    #[test]
    fn errors_and_foreign_streams_are_typed() {
        let chunk = r#"{"object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}"#;
        let stop = r#"{"object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec![
                    chunk,
                    r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
                ],
                "Api",
            ),
            (
                vec![r#"{"error":{"message":"boom","type":null,"code":500}}"#],
                "Api",
            ),
            (vec![chunk], "Truncated"),
            (vec![chunk, stop], "Truncated"),
            (vec![chunk, "[DONE]"], "Truncated"),
            (vec![], "Truncated"),
            (vec![chunk, "{not json"], "InvalidEvent"),
            (vec![chunk, stop, "[DONE]", chunk], "UnexpectedEvent"),
            (
                vec![r#"{"type":"response.created","response":{"id":"resp_1"}}"#],
                "UnexpectedEvent",
            ),
            (
                vec![r#"{"object":"chat.completion","choices":[]}"#],
                "UnexpectedEvent",
            ),
            (
                vec![
                    r#"{"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{\"a\":"}}]}}]}"#,
                    r#"{"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
                    "[DONE]",
                ],
                "InvalidToolInput",
            ),
        ];
        for (chunks, expected) in cases {
            let error = play(&chunks).unwrap_err();
            assert!(
                format!("{error:?}").starts_with(expected),
                "{chunks:?}: expected {expected}, got {error:?}"
            );
        }
        let error =
            play(&[r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "model stream error requests: Rate limit reached"
        );
    }

    #[test]
    fn request_shape() {
        let messages = [
            Message::User { text: "hi".into() },
            Message::Assistant {
                content: vec![
                    ContentBlock::Thinking {
                        thinking: "t".into(),
                        signature: "s".into(),
                    },
                    ContentBlock::ToolUse {
                        id: "c1".into(),
                        name: "read_file".into(),
                        input: json!({"path": "a"}),
                    },
                ],
            },
            Message::ToolResults {
                results: vec![ToolResultBlock {
                    call_id: "c1".into(),
                    content: "no such file".into(),
                    is_error: true,
                }],
            },
            Message::Assistant {
                content: vec![ContentBlock::Text("Done.".into())],
            },
        ];
        let request = ModelRequest {
            model: "llama3.1",
            system: "",
            messages: &messages,
            tools: &[],
            max_tokens: 64,
        };
        assert_eq!(
            request_body(&request),
            json!({"model": "llama3.1", "stream": true, "stream_options": {"include_usage": true},
                   "max_tokens": 64, "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "error: no such file"},
                {"role": "assistant", "content": "Done."},
            ]})
        );
        let body = request_body(&ModelRequest {
            model: "o4-mini",
            ..request
        });
        assert_eq!(body["max_completion_tokens"], 64);
        assert!(body.get("max_tokens").is_none());
    }
}

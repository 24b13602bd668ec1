//! The model providers: one neutral conversation shape ([`Message`], [`ContentBlock`]), two wire formats
//! behind one trait ([`WireFormat`]: the Anthropic Messages API in [`anthropic`], OpenAI-compatible chat
//! completions in [`openai`]), and one transport ([`Providers`]) that routes a model id to its format,
//! sends, retries ([`retry`]) and streams ([`ModelStream`]). [`catalog`] knows each model's context window
//! and price.
//!
//! A wire format is pure: it turns a [`ModelRequest`] into a [`WireRequest`] (URL, headers, JSON body) and
//! makes a [`StreamAssembler`], a state machine that turns the server-sent events ([`sse`]) of one
//! response into [`StreamItem`]s and, at the end, one [`ModelResponse`]. The fixture tests drive the
//! assemblers with recorded streams; the transport tests drive [`Providers`] against a local server.
//!
//! Base URLs follow each vendor's SDK: `ANTHROPIC_BASE_URL` is the host without `/v1`
//! (`https://api.anthropic.com`, endpoint `{base}/v1/messages`); `OPENAI_BASE_URL` includes `/v1`
//! (`https://api.openai.com/v1` or `http://localhost:11434/v1`, endpoint `{base}/chat/completions`).
//!
//! Routing ([`route`]): ids starting with `claude` or `nightshift-scripted` go to Anthropic; `gpt-`,
//! `o1`, `o3`, `o4` and `chatgpt` to the OpenAI-compatible endpoint; any other id to the OpenAI-compatible
//! endpoint when `OPENAI_BASE_URL` is set (Ollama, vLLM, llama.cpp), else to Anthropic.
//!
//! Invariant: API keys live only in sensitive header values; no `Debug` or log line prints one.

pub mod anthropic;
pub mod catalog;
pub mod openai;
pub mod retry;
pub mod sse;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use catalog::{cost_usd, model_info};
pub use retry::RetryPolicy;
use sse::{SseDecoder, SseEvent};

/// How much of an error body is kept in [`ModelError::Http`].
const ERROR_BODY_LIMIT_BYTES: usize = 2048;
/// Longest wait for a TCP (and TLS) connection, within the request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The OpenAI endpoint used when only `OPENAI_API_KEY` is given.
pub const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The Anthropic base URL without `ANTHROPIC_BASE_URL`.
pub const ANTHROPIC_DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// Default of [`ProviderConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything that can go wrong talking to a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model routes to the OpenAI-compatible endpoint, but none is configured.
    #[error(
        "model {model} needs an openai-compatible endpoint: set OPENAI_API_KEY or OPENAI_BASE_URL"
    )]
    NotConfigured {
        /// Model id.
        model: String,
    },
    /// A base URL that is not an absolute `http(s)` URL.
    #[error("invalid {provider} base url {url:?}: {reason}")]
    InvalidBaseUrl {
        /// `anthropic` or `openai`.
        provider: &'static str,
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent as an HTTP header.
    #[error("{provider} api key is not a valid http header value")]
    InvalidApiKey {
        /// `anthropic` or `openai`.
        provider: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("creating the http client failed: {source}")]
    Client {
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The request could not be sent, or the stream broke.
    #[error("model request to {url} failed: {source}")]
    Transport {
        /// Endpoint.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with a non-success status (after any retries).
    #[error("model api answered {status}: {body}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The body, truncated.
        body: String,
    },
    /// No response headers within the request timeout.
    #[error("no response from {url} within {timeout_ms} ms")]
    ResponseTimeout {
        /// Endpoint.
        url: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The stream sent nothing for the request timeout.
    #[error("model stream from {url} sent nothing for {timeout_ms} ms")]
    IdleTimeout {
        /// Endpoint.
        url: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The stream carried an error (Anthropic `event: error`, OpenAI `data: {"error": …}`).
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
        /// Event name (or the wire format's chunk name).
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
    /// An event that does not belong here: before the start, after the end, or of another API.
    #[error("unexpected `{event}` event in model stream")]
    UnexpectedEvent {
        /// Event name.
        event: String,
    },
    /// The stream ended before its end marker.
    #[error("model stream ended before {expected}")]
    Truncated {
        /// The missing marker: `message_stop`, `finish_reason and [DONE]`.
        expected: &'static str,
    },
    /// The cancellation token fired.
    #[error("model call cancelled")]
    Cancelled,
}

/// An API key, never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wrap a key.
    pub fn new(key: String) -> Self {
        Self(key)
    }

    /// The key as a sensitive header value (`prefix` + key), e.g. `Bearer sk-…`.
    fn header(&self, prefix: &str, provider: &'static str) -> Result<HeaderValue, ModelError> {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0))
            .map_err(|_| ModelError::InvalidApiKey { provider })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// One turn of the conversation, in no vendor's shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The user's prompt.
    User {
        /// The text.
        text: String,
    },
    /// What the model answered; sent back as it came (thinking blocks with their signatures).
    Assistant {
        /// Content blocks in order.
        content: Vec<ContentBlock>,
    },
    /// The results of the tool calls of the previous assistant turn.
    ToolResults {
        /// One per call.
        results: Vec<ToolResultBlock>,
    },
}

/// A block of an assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentBlock {
    /// Text.
    Text(String),
    /// Extended thinking; Anthropic wants it back verbatim with its signature. From OpenAI-compatible
    /// servers that stream `reasoning_content` the signature is empty (and the block is not sent back).
    Thinking {
        /// The thinking text.
        thinking: String,
        /// Anthropic's signature over it.
        signature: String,
    },
    /// Thinking the API encrypted; sent back as it came.
    RedactedThinking {
        /// Opaque data.
        data: String,
    },
    /// A call of one of our tools.
    ToolUse {
        /// Call id, echoed in the result.
        id: String,
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
}

/// The result of one tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResultBlock {
    /// The [`ContentBlock::ToolUse`] id.
    pub call_id: String,
    /// The tool's output (or error message).
    pub content: String,
    /// The tool failed.
    pub is_error: bool,
}

/// One call's request: what varies between calls.
#[derive(Debug, Clone, Copy)]
pub struct ModelRequest<'a> {
    /// Model id; also picks the provider ([`route`]).
    pub model: &'a str,
    /// System prompt.
    pub system: &'a str,
    /// The conversation so far.
    pub messages: &'a [Message],
    /// Tool definitions in the neutral shape `{name, description, input_schema}` (Anthropic's).
    pub tools: &'a [Value],
    /// Most tokens the model may generate.
    pub max_tokens: u32,
}

/// What a stream produces, in order; [`StreamItem::Finished`] is the last item.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// The response began; `model` is the model the API reports.
    Started {
        /// Model id as reported.
        model: String,
    },
    /// A piece of answer text.
    TextDelta(String),
    /// A piece of thinking text.
    ThinkingDelta(String),
    /// The whole response.
    Finished(ModelResponse),
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The turn is over (OpenAI `stop`).
    EndTurn,
    /// The model waits for tool results (OpenAI `tool_calls`, `function_call`).
    ToolUse,
    /// Cut off at `max_tokens` (OpenAI `length`).
    MaxTokens,
    /// A stop sequence matched.
    StopSequence,
    /// The model declined (OpenAI `content_filter`, or a streamed `refusal`).
    Refusal,
    /// A long server-side turn paused; send the conversation again to continue.
    PauseTurn,
    /// Anything else, verbatim (empty when the stream named none).
    Other(String),
}

impl StopReason {
    /// From Anthropic's `stop_reason`.
    pub fn from_anthropic(reason: &str) -> Self {
        match reason {
            "end_turn" => Self::EndTurn,
            "tool_use" => Self::ToolUse,
            "max_tokens" => Self::MaxTokens,
            "stop_sequence" => Self::StopSequence,
            "refusal" => Self::Refusal,
            "pause_turn" => Self::PauseTurn,
            other => Self::Other(other.to_owned()),
        }
    }

    /// From OpenAI's `finish_reason`.
    pub fn from_openai(reason: &str) -> Self {
        match reason {
            "stop" => Self::EndTurn,
            "tool_calls" | "function_call" => Self::ToolUse,
            "length" => Self::MaxTokens,
            "content_filter" => Self::Refusal,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Anthropic's spelling (for logs and snapshots).
    pub fn as_str(&self) -> &str {
        match self {
            Self::EndTurn => "end_turn",
            Self::ToolUse => "tool_use",
            Self::MaxTokens => "max_tokens",
            Self::StopSequence => "stop_sequence",
            Self::Refusal => "refusal",
            Self::PauseTurn => "pause_turn",
            Self::Other(other) => other,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts of one call, normalized across providers: `input_tokens` are the input tokens neither
/// read from nor written to the prompt cache (Anthropic's `input_tokens`; OpenAI's `prompt_tokens`
/// minus `cached_tokens`), so the whole prompt is `input + cache_read + cache_write`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenUsage {
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens (including thinking/reasoning).
    pub output_tokens: u64,
    /// Input tokens read from the cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the cache (Anthropic only).
    pub cache_write_tokens: u64,
}

impl TokenUsage {
    /// Add another call's counts.
    pub fn add(&mut self, other: &TokenUsage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
    }
}

/// The finished response of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResponse {
    /// Model id as reported.
    pub model: String,
    /// Content blocks in order (blocks we cannot send back, e.g. server tool calls, are left out).
    pub content: Vec<ContentBlock>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Token counts.
    pub usage: TokenUsage,
}

impl ModelResponse {
    /// All text blocks, concatenated.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text(text) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The tool calls: `(id, name, input)`.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.content.iter().filter_map(|block| match block {
            ContentBlock::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// The HTTP request of one call, before it is sent.
#[derive(Debug, Clone)]
pub struct WireRequest {
    /// Endpoint.
    pub url: String,
    /// Headers besides `content-type` (keys are marked sensitive).
    pub headers: HeaderMap,
    /// JSON body.
    pub body: Value,
}

/// A provider's wire format: how a request looks and how its stream is read.
pub trait WireFormat: fmt::Debug + Send + Sync {
    /// `anthropic` or `openai`, for logs.
    fn name(&self) -> &'static str;
    /// The HTTP request for `request`.
    fn request(&self, request: &ModelRequest<'_>) -> WireRequest;
    /// A fresh state machine for one response stream.
    fn assembler(&self) -> Box<dyn StreamAssembler>;
}

/// The pure state machine of one streamed response.
pub trait StreamAssembler: Send {
    /// Apply one server-sent event; returns the items it produces right away.
    fn apply(&mut self, event: &SseEvent) -> Result<Vec<StreamItem>, ModelError>;
    /// The stream ended: the finished response, or why there is none. Call once.
    fn finish(&mut self) -> Result<ModelResponse, ModelError>;
}

/// Which wire format a model id is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The Anthropic Messages API.
    Anthropic,
    /// OpenAI-compatible chat completions.
    OpenAi,
}

/// The provider of `model`; `openai_base_url_set` says whether `OPENAI_BASE_URL` is configured (then
/// unknown ids are local OpenAI-compatible models).
pub fn route(model: &str, openai_base_url_set: bool) -> Provider {
    const ANTHROPIC: [&str; 2] = ["claude", "nightshift-scripted"];
    if ANTHROPIC.iter().any(|prefix| model.starts_with(prefix)) {
        Provider::Anthropic
    } else if is_openai_model(model) || openai_base_url_set {
        Provider::OpenAi
    } else {
        Provider::Anthropic
    }
}

/// A model of OpenAI's own (`gpt-`, `o1`, `o3`, `o4`, `chatgpt`).
pub fn is_openai_model(model: &str) -> bool {
    const OPENAI: [&str; 5] = ["gpt-", "o1", "o3", "o4", "chatgpt"];
    OPENAI.iter().any(|prefix| model.starts_with(prefix))
}

/// Where the models are and how patient to be with them.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Anthropic base URL without `/v1`, e.g. `https://api.anthropic.com`.
    pub anthropic_base_url: String,
    /// Anthropic key; without it no `x-api-key` is sent (fine for the local scripted model).
    pub anthropic_api_key: Option<ApiKey>,
    /// OpenAI-compatible base URL including `/v1`; default [`OPENAI_DEFAULT_BASE_URL`] when only a key
    /// is set. Without both, OpenAI models are not available.
    pub openai_base_url: Option<String>,
    /// OpenAI key, sent as `Authorization: Bearer …`; local servers need none.
    pub openai_api_key: Option<ApiKey>,
    /// Longest wait for the response headers, and then between two chunks of the stream.
    pub request_timeout: Duration,
    /// When to try again.
    pub retry: RetryPolicy,
    /// An HTTP proxy every request goes through (`http://127.0.0.1:PORT`, the sandbox's egress relay);
    /// `None`: direct connections.
    pub proxy_url: Option<String>,
}

impl ProviderConfig {
    /// The public Anthropic API, no keys, default timeout and retries.
    pub fn new(anthropic_base_url: impl Into<String>) -> Self {
        Self {
            anthropic_base_url: anthropic_base_url.into(),
            anthropic_api_key: None,
            openai_base_url: None,
            openai_api_key: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry: RetryPolicy::default(),
            proxy_url: None,
        }
    }
}

/// The model client: routes, sends, retries, streams. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct Providers {
    http: reqwest::Client,
    anthropic: Arc<dyn WireFormat>,
    /// `None`: no OpenAI-compatible endpoint configured.
    openai: Option<Arc<dyn WireFormat>>,
    openai_base_url_set: bool,
    request_timeout: Duration,
    retry: RetryPolicy,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Providers")
            .field("anthropic", &self.anthropic)
            .field("openai", &self.openai)
            .field("request_timeout", &self.request_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Check that `url` is an absolute http(s) URL; returns it without a trailing `/`.
fn base_url(provider: &'static str, url: &str) -> Result<String, ModelError> {
    let invalid = |reason: String| ModelError::InvalidBaseUrl {
        provider,
        url: url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|error| invalid(error.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("expected http or https".to_owned()));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl Providers {
    /// A client for the configured endpoints (nothing is contacted yet).
    pub fn new(config: ProviderConfig) -> Result<Self, ModelError> {
        let anthropic = anthropic::AnthropicApi::new(
            &base_url("anthropic", &config.anthropic_base_url)?,
            config.anthropic_api_key.as_ref(),
        )?;
        let openai_base_url = match (&config.openai_base_url, &config.openai_api_key) {
            (Some(url), _) => Some(base_url("openai", url)?),
            (None, Some(_)) => Some(OPENAI_DEFAULT_BASE_URL.to_owned()),
            (None, None) => None,
        };
        let openai = match openai_base_url {
            Some(url) => Some(Arc::new(openai::OpenAiApi::new(
                &url,
                config.openai_api_key.as_ref(),
            )?) as Arc<dyn WireFormat>),
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(config.request_timeout))
            .tcp_nodelay(true);
        if let Some(proxy) = &config.proxy_url {
            // `http://` targets go as absolute-URI requests, `https://` through `CONNECT`.
            http = http
                .proxy(reqwest::Proxy::all(proxy).map_err(|source| ModelError::Client { source })?);
        }
        let http = http
            .build()
            .map_err(|source| ModelError::Client { source })?;
        Ok(Self {
            http,
            anthropic: Arc::new(anthropic),
            openai,
            openai_base_url_set: config.openai_base_url.is_some(),
            request_timeout: config.request_timeout,
            retry: config.retry,
        })
    }

    /// The wire format `model` is sent with.
    fn format_for(&self, model: &str) -> Result<&Arc<dyn WireFormat>, ModelError> {
        match route(model, self.openai_base_url_set) {
            Provider::Anthropic => Ok(&self.anthropic),
            Provider::OpenAi => self
                .openai
                .as_ref()
                .ok_or_else(|| ModelError::NotConfigured {
                    model: model.to_owned(),
                }),
        }
    }

    /// Start a streaming call (retrying as the policy allows until the response headers arrive); read it
    /// with [`ModelStream::next`]. `cancel` aborts a backoff or the request at once with
    /// [`ModelError::Cancelled`], here and in the stream.
    pub async fn stream(
        &self,
        request: ModelRequest<'_>,
        cancel: &CancellationToken,
    ) -> Result<ModelStream, ModelError> {
        let format = Arc::clone(self.format_for(request.model)?);
        let wire = format.request(&request);
        let call = Call {
            http: self.http.clone(),
            body: wire.body.to_string(),
            url: wire.url,
            headers: wire.headers,
            provider: format.name(),
            timeout: self.request_timeout,
            retry: self.retry.clone(),
            cancel: cancel.clone(),
        };
        let mut attempts = 0;
        let response = call.open(&mut attempts).await?;
        Ok(ModelStream {
            assembler: format.assembler(),
            format,
            call,
            attempts,
            response,
            decoder: SseDecoder::new(),
            pending: VecDeque::new(),
            deferred_error: None,
            content_seen: false,
            started_yielded: false,
            ended: false,
        })
    }
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt, after the server's hint if it gave one.
    Retry {
        error: ModelError,
        hint: Option<Duration>,
    },
    Fatal(ModelError),
}

/// Everything needed to send (and re-send) one call.
struct Call {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
    body: String,
    provider: &'static str,
    timeout: Duration,
    retry: RetryPolicy,
    cancel: CancellationToken,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Call {
    /// Send until the response headers say success, an error is final, or the attempts are used up.
    async fn open(&self, attempts: &mut u32) -> Result<reqwest::Response, ModelError> {
        loop {
            *attempts += 1;
            let failure = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(ModelError::Cancelled),
                result = self.send_once() => match result {
                    Ok(response) => return Ok(response),
                    Err(failure) => failure,
                },
            };
            let (error, hint) = match failure {
                Failure::Fatal(error) => return Err(error),
                Failure::Retry { error, hint } => (error, hint),
            };
            if *attempts >= self.retry.max_attempts {
                return Err(error);
            }
            self.back_off(*attempts, hint, &error).await?;
        }
    }

    /// Wait before attempt `attempts + 1`; cancellable.
    async fn back_off(
        &self,
        attempts: u32,
        hint: Option<Duration>,
        error: &ModelError,
    ) -> Result<(), ModelError> {
        let delay = self.retry.delay(attempts.saturating_sub(1), hint);
        tracing::warn!(
            provider = self.provider,
            attempt = attempts,
            max_attempts = self.retry.max_attempts,
            delay_ms = millis(delay),
            %error,
            "model call failed; retrying"
        );
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(ModelError::Cancelled),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    async fn send_once(&self) -> Result<reqwest::Response, Failure> {
        let send = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .body(self.body.clone())
            .send();
        let response = match tokio::time::timeout(self.timeout, send).await {
            Err(_elapsed) => {
                return Err(Failure::Fatal(ModelError::ResponseTimeout {
                    url: self.url.clone(),
                    timeout_ms: millis(self.timeout),
                }))
            }
            Ok(Err(source)) => {
                let retry = source.is_connect();
                let error = ModelError::Transport {
                    url: self.url.clone(),
                    source,
                };
                return Err(if retry {
                    Failure::Retry { error, hint: None }
                } else {
                    Failure::Fatal(error)
                });
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let hint = retry::retry_after(response.headers(), SystemTime::now());
        let body = match tokio::time::timeout(self.timeout, response.bytes()).await {
            Ok(Ok(bytes)) => truncate_body(&bytes),
            Ok(Err(_)) | Err(_) => String::new(),
        };
        let error = ModelError::Http {
            status: status.as_u16(),
            body,
        };
        Err(if retry::is_retryable_status(status.as_u16()) {
            Failure::Retry { error, hint }
        } else {
            Failure::Fatal(error)
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

/// A call in progress. Dropping it drops the HTTP response, which closes the connection.
pub struct ModelStream {
    format: Arc<dyn WireFormat>,
    call: Call,
    attempts: u32,
    response: reqwest::Response,
    decoder: SseDecoder,
    assembler: Box<dyn StreamAssembler>,
    pending: VecDeque<StreamItem>,
    /// An error that comes after the pending items.
    deferred_error: Option<ModelError>,
    /// A text or thinking delta was produced: from now on the call is not retried.
    content_seen: bool,
    /// `Started` was handed out; a retried attempt's `Started` is not repeated.
    started_yielded: bool,
    ended: bool,
}

impl fmt::Debug for ModelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelStream")
            .field("url", &self.call.url)
            .field("attempts", &self.attempts)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// What became of one chunk read.
enum Read {
    Items,
    Retry(ModelError),
    Failed(ModelError),
}

impl ModelStream {
    /// The next item; [`StreamItem::Finished`] is the last one, after which (or after an error) this
    /// returns `None`.
    pub async fn next(&mut self) -> Option<Result<StreamItem, ModelError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if matches!(item, StreamItem::Started { .. }) {
                    if self.started_yielded {
                        continue;
                    }
                    self.started_yielded = true;
                }
                return Some(Ok(item));
            }
            if let Some(error) = self.deferred_error.take() {
                return Some(Err(error));
            }
            if self.ended {
                return None;
            }
            match self.read().await {
                Read::Items => {}
                Read::Failed(error) => {
                    self.ended = true;
                    self.deferred_error = Some(error);
                }
                Read::Retry(error) => {
                    if let Err(error) = self.retry(error).await {
                        self.ended = true;
                        self.pending.clear();
                        return Some(Err(error));
                    }
                }
            }
        }
    }

    /// Read one chunk and apply its events.
    async fn read(&mut self) -> Read {
        let chunk = tokio::select! {
            biased;
            () = self.call.cancel.cancelled() => return Read::Failed(ModelError::Cancelled),
            chunk = tokio::time::timeout(self.call.timeout, self.response.chunk()) => chunk,
        };
        let events = match chunk {
            Err(_elapsed) => {
                return Read::Failed(ModelError::IdleTimeout {
                    url: self.call.url.clone(),
                    timeout_ms: millis(self.call.timeout),
                })
            }
            Ok(Err(source)) => {
                return Read::Failed(ModelError::Transport {
                    url: self.call.url.clone(),
                    source,
                })
            }
            Ok(Ok(Some(bytes))) => self.decoder.feed(&bytes),
            Ok(Ok(None)) => {
                self.ended = true;
                let last: Vec<SseEvent> = self.decoder.finish().into_iter().collect();
                if let Some(read) = self.apply_all(&last) {
                    return read;
                }
                return match self.assembler.finish() {
                    Ok(response) => {
                        self.pending.push_back(StreamItem::Finished(response));
                        Read::Items
                    }
                    Err(error) => Read::Failed(error),
                };
            }
        };
        self.apply_all(&events).unwrap_or(Read::Items)
    }

    /// Apply events until one fails; `Some` says how the failure is handled.
    fn apply_all(&mut self, events: &[SseEvent]) -> Option<Read> {
        for event in events {
            match self.assembler.apply(event) {
                Ok(items) => {
                    self.content_seen |= items.iter().any(|item| {
                        matches!(
                            item,
                            StreamItem::TextDelta(_) | StreamItem::ThinkingDelta(_)
                        )
                    });
                    self.pending.extend(items);
                }
                Err(error) => {
                    let retryable = matches!(&error, ModelError::Api { kind, .. }
                        if retry::is_retryable_stream_error(kind));
                    return Some(
                        if retryable
                            && !self.content_seen
                            && self.attempts < self.call.retry.max_attempts
                        {
                            Read::Retry(error)
                        } else {
                            Read::Failed(error)
                        },
                    );
                }
            }
        }
        None
    }

    /// The stream failed before any content: wait, send again, start a fresh assembler.
    async fn retry(&mut self, error: ModelError) -> Result<(), ModelError> {
        self.call.back_off(self.attempts, None, &error).await?;
        self.response = self.call.open(&mut self.attempts).await?;
        self.decoder = SseDecoder::new();
        self.assembler = self.format.assembler();
        self.pending
            .retain(|item| !matches!(item, StreamItem::Started { .. }));
        self.ended = false;
        Ok(())
    }
}

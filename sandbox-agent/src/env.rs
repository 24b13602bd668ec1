//! Every environment variable the sandbox-agent reads, in one place.

/// Log filter (`tracing` syntax), e.g. `info` or `nightshift=debug`.
pub const LOG: &str = "NIGHTSHIFT_LOG";
/// `run`: the WebSocket URL of the session's agent route (`ws://…/sandbox/{id}/ws`).
pub const CONNECT_URL: &str = "NIGHTSHIFT_CONNECT_URL";
/// `run`: the per-sandbox token presented when dialling in. Never logged.
pub const SANDBOX_TOKEN: &str = "NIGHTSHIFT_SANDBOX_TOKEN";
/// `run`: the sandbox id reported in `hello`.
pub const SANDBOX_ID: &str = "NIGHTSHIFT_SANDBOX_ID";
/// `run`: the workspace root (the git working copy the tools are confined to).
pub const WORKSPACE: &str = "NIGHTSHIFT_WORKSPACE";
/// `run`: the session the sandbox works for; names the branch `nightshift/<session-id>`.
pub const SESSION_ID: &str = "NIGHTSHIFT_SESSION_ID";
/// `run`: the branch the session starts from (default: the branch checked out in the workspace).
pub const BASE_BRANCH: &str = "NIGHTSHIFT_BASE_BRANCH";
/// `run`: use at most this many tokens of the model's context window (older tool outputs are compacted
/// near it); default the model's whole window.
pub const CONTEXT_WINDOW_TOKENS: &str = "NIGHTSHIFT_CONTEXT_WINDOW_TOKENS";
/// `run`: base URL of the Anthropic Messages API (default `https://api.anthropic.com`).
pub const ANTHROPIC_BASE_URL: &str = "ANTHROPIC_BASE_URL";
/// `run` and `host`: the Anthropic API key. Never logged.
pub const ANTHROPIC_API_KEY: &str = "ANTHROPIC_API_KEY";
/// `run`: base URL of an OpenAI-compatible chat completions API, including `/v1` (e.g.
/// `http://localhost:11434/v1`); default with only a key: `https://api.openai.com/v1`.
pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
/// `run`: the OpenAI API key. Never logged.
pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
/// `host`: bearer token the Worker presents on the provider API. Never logged.
pub const PROVIDER_TOKEN: &str = "NIGHTSHIFT_PROVIDER_TOKEN";

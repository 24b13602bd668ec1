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
/// `host`: most warm sandboxes per repository (`--pool-max`).
pub const POOL_MAX: &str = "NIGHTSHIFT_POOL_MAX";
/// `host`: bearer token the Worker presents on the provider API. Never logged.
pub const PROVIDER_TOKEN: &str = "NIGHTSHIFT_PROVIDER_TOKEN";
/// `run`: a unix socket that leads out of the sandbox (the host's egress proxy, an HTTP proxy with an
/// allow-list). With it, the agent relays a loopback port to it and sends all its traffic there.
pub const EGRESS_SOCKET: &str = "NIGHTSHIFT_EGRESS_SOCKET";

/// Set by `run` (with [`EGRESS_SOCKET`]) for what it starts: the proxy for `http://` URLs. curl, and so
/// git, reads only the lowercase [`HTTP_PROXY_LOWER`] for `http://`.
pub const HTTP_PROXY: &str = "HTTP_PROXY";
/// The lowercase twin of [`HTTP_PROXY`] (the one curl reads).
pub const HTTP_PROXY_LOWER: &str = "http_proxy";
/// Set by `run`: the proxy for `https://` URLs.
pub const HTTPS_PROXY: &str = "HTTPS_PROXY";
/// The lowercase twin of [`HTTPS_PROXY`].
pub const HTTPS_PROXY_LOWER: &str = "https_proxy";
/// Set by `run`: the proxy for every other scheme.
pub const ALL_PROXY: &str = "ALL_PROXY";
/// The lowercase twin of [`ALL_PROXY`].
pub const ALL_PROXY_LOWER: &str = "all_proxy";
/// Set empty by `run`, so that loopback URLs (the local Worker, the host's git) go through the proxy
/// too: inside the sandbox's network namespace, loopback is the sandbox's own.
pub const NO_PROXY: &str = "NO_PROXY";
/// The lowercase twin of [`NO_PROXY`].
pub const NO_PROXY_LOWER: &str = "no_proxy";
/// Every proxy variable `run` sets for what it starts.
pub const PROXY_VARS: [&str; 8] = [
    HTTP_PROXY,
    HTTP_PROXY_LOWER,
    HTTPS_PROXY,
    HTTPS_PROXY_LOWER,
    ALL_PROXY,
    ALL_PROXY_LOWER,
    NO_PROXY,
    NO_PROXY_LOWER,
];

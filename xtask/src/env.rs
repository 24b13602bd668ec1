//! Every environment variable xtask reads or sets, in one place.

// ---- read by xtask ----

/// Path of the cargo that runs xtask (set by `cargo run`); nested builds use the same toolchain.
pub const CARGO: &str = "CARGO";
/// Cargo's home (default `~/.cargo`); `cargo install` puts `wasm-bindgen` and `worker-build` in its `bin/`.
pub const CARGO_HOME: &str = "CARGO_HOME";
/// Cargo's output directory (default `<repo>/target`); xtask looks for built binaries there.
pub const CARGO_TARGET_DIR: &str = "CARGO_TARGET_DIR";
/// The user's home directory, for the default `CARGO_HOME`.
pub const HOME: &str = "HOME";
/// The search path; the build puts the project-local Node 22 and `~/.cargo/bin` in front of it.
pub const PATH: &str = "PATH";

// ---- passed through to children unchanged ----

/// A real model for `dev`: with it the host's agents call Anthropic; without it they use the labelled demo
/// model. xtask never reads or prints it; children inherit it.
pub const ANTHROPIC_API_KEY: &str = "ANTHROPIC_API_KEY";
/// An OpenAI-compatible server for `dev` (e.g. `http://127.0.0.1:11434/v1` for Ollama); children inherit
/// it, together with `OPENAI_API_KEY` when the server needs one.
pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
/// `dev`: the model new sessions use (the Worker's `DEFAULT_MODEL`), e.g. `qwen2.5-coder:7b` for a local
/// server; default `claude-sonnet-4-5`.
pub const NIGHTSHIFT_MODEL: &str = "NIGHTSHIFT_MODEL";

// ---- set by xtask for its children ----

/// worker-build: the `wasm-bindgen` CLI to use instead of downloading one.
pub const WASM_BINDGEN_BIN: &str = "WASM_BINDGEN_BIN";
/// worker-build: the `wasm-opt` to use instead of downloading one (npm `binaryen`).
pub const WASM_OPT_BIN: &str = "WASM_OPT_BIN";
/// worker-build: the `esbuild` to use instead of downloading one (the one wrangler installed).
pub const ESBUILD_BIN: &str = "ESBUILD_BIN";
/// The wasm cargo build: what worker-build 0.8.7 sets, so xtask's own build of the worker is identical.
pub const WASM_BINDGEN_USE_JS_SYS: &str = "WASM_BINDGEN_USE_JS_SYS";
/// apt-get: never ask questions.
pub const DEBIAN_FRONTEND: &str = "DEBIAN_FRONTEND";
/// sandbox-agent host: the bearer token the Worker presents on the provider API.
pub const NIGHTSHIFT_PROVIDER_TOKEN: &str = "NIGHTSHIFT_PROVIDER_TOKEN";

/// wrangler: keep it offline (with all four set, no connection leaves loopback).
pub const WRANGLER_OFFLINE: [(&str, &str); 4] = [
    ("WRANGLER_SEND_METRICS", "false"),
    ("DO_NOT_TRACK", "1"),
    ("CLOUDFLARE_CF_FETCH_ENABLED", "false"),
    ("WRANGLER_HIDE_BANNER", "true"),
];

/// Tests: the repository root.
pub const NIGHTSHIFT_REPO_ROOT: &str = "NIGHTSHIFT_REPO_ROOT";
/// Tests: the project-local Node 22 binary.
pub const NIGHTSHIFT_NODE: &str = "NIGHTSHIFT_NODE";
/// Tests: wrangler's entry script (`node_modules/wrangler/bin/wrangler.js`).
pub const NIGHTSHIFT_WRANGLER_JS: &str = "NIGHTSHIFT_WRANGLER_JS";
/// Tests: the built `sandbox-agent` binary.
pub const NIGHTSHIFT_AGENT_BIN: &str = "NIGHTSHIFT_AGENT_BIN";

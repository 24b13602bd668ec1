//! Every environment variable the harness reads, in one place. `cargo xtask test` and `cargo xtask bench`
//! set the first four; each has a default relative to the repository.

/// The repository root (default: the parent of this crate).
pub const NIGHTSHIFT_REPO_ROOT: &str = "NIGHTSHIFT_REPO_ROOT";
/// The project-local Node 22 binary (default: `node_modules/.bin/node`).
pub const NIGHTSHIFT_NODE: &str = "NIGHTSHIFT_NODE";
/// wrangler's entry script (default: `node_modules/wrangler/bin/wrangler.js`).
pub const NIGHTSHIFT_WRANGLER_JS: &str = "NIGHTSHIFT_WRANGLER_JS";
/// The built `sandbox-agent` binary (default: `target/debug/sandbox-agent`).
pub const NIGHTSHIFT_AGENT_BIN: &str = "NIGHTSHIFT_AGENT_BIN";

/// Read by the `bench` binary: comma-separated bench modules (`ready`, `snapshot`, …) or row ids
/// (`warm_claim_ready`, …) to run; unset or empty, all of them.
pub const NIGHTSHIFT_BENCH_ONLY: &str = "NIGHTSHIFT_BENCH_ONLY";

/// Read by the browser tests and the `web` bench: the Chromium binary (default: `/usr/bin/chromium`); given to
/// the scripts in `tests/browser/`.
pub const NIGHTSHIFT_CHROMIUM: &str = "NIGHTSHIFT_CHROMIUM";
/// Given to the scripts in `tests/browser/`: the Worker's `http://127.0.0.1:PORT`.
pub const NIGHTSHIFT_BASE_URL: &str = "NIGHTSHIFT_BASE_URL";
/// Given to the scripts in `tests/browser/`: where screenshots go (`target/browser/`).
pub const NIGHTSHIFT_BROWSER_OUT: &str = "NIGHTSHIFT_BROWSER_OUT";

/// Removed from the host's environment, so tests always use the scripted model, never a real one.
pub const ANTHROPIC_API_KEY: &str = "ANTHROPIC_API_KEY";
/// Given to the host: the bearer token the Worker presents on the provider API.
pub const NIGHTSHIFT_PROVIDER_TOKEN: &str = "NIGHTSHIFT_PROVIDER_TOKEN";
/// Given to wrangler: with all four, no connection leaves loopback.
pub const WRANGLER_OFFLINE: [(&str, &str); 4] = [
    ("WRANGLER_SEND_METRICS", "false"),
    ("DO_NOT_TRACK", "1"),
    ("CLOUDFLARE_CF_FETCH_ENABLED", "false"),
    ("WRANGLER_HIDE_BANNER", "true"),
];
/// Read, and given to wrangler with the project-local Node 22 first.
pub const PATH: &str = "PATH";

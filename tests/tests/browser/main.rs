//! Browser tests: the web app in real Chromium (Debian's, driven by playwright-core from the scripts in
//! `tests/browser/`) against the real system: wrangler dev with the built Worker and web app, the sandbox
//! host and its agents with the scripted model (the default model when no model key is set). The demo
//! repository reaches the New session page's picker as the provider's repository: nothing registers it first.
//!
//! Needs `web/dist` built (`cargo xtask test` builds it) and `/usr/bin/chromium` (`cargo xtask setup`).
//! Screenshots land in `target/browser/`.

use nightshift_tests::{browser, StartOptions, System};

#[tokio::test]
async fn two_people_share_a_session_in_the_web_app() -> anyhow::Result<()> {
    browser::chromium()?;
    let system = System::start().await?;
    let result = browser::run_script(&system, "two_people.mjs", &[]).await;
    if result.is_err() {
        eprintln!(
            "--- wrangler log (end) ---\n{}",
            tail(&system.wrangler_log())
        );
        eprintln!("--- host log (end) ---\n{}", tail(&system.host_log()));
    }
    result.map(drop)
}

/// Sessions of 12 s (told to save their work 4 s before the end): the page of one that ended says so and
/// takes no more prompts.
#[tokio::test]
async fn an_ended_session_says_so_and_takes_no_prompt() -> anyhow::Result<()> {
    browser::chromium()?;
    let system = System::start_with(StartOptions::worker_vars([
        ("SESSION_TIMEOUT_MS", "12000"),
        ("SESSION_PRE_EXPIRY_MS", "4000"),
    ]))
    .await?;
    let result = browser::run_script(&system, "ended.mjs", &[]).await;
    if result.is_err() {
        eprintln!(
            "--- wrangler log (end) ---\n{}",
            tail(&system.wrangler_log())
        );
    }
    result.map(drop)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

//! Browser tests: the web app in real Chromium (Debian's, driven by playwright-core from the scripts in
//! `tests/browser/`) against the real system: wrangler dev with the built Worker and web app, the sandbox
//! host and its agents with the scripted model (the default model when no model key is set).
//!
//! Needs `web/dist` built (`cargo xtask test` builds it) and `/usr/bin/chromium` (`cargo xtask setup`).
//! Screenshots land in `target/browser/`.

use anyhow::Context;
use nightshift_protocol::http::ReposResponse;
use nightshift_tests::{browser, Client, System, DEMO_REPO};

#[tokio::test]
async fn two_people_share_a_session_in_the_web_app() -> anyhow::Result<()> {
    browser::chromium()?;
    let system = System::start().await?;
    list_demo_repo(&system).await?;
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

/// `GET /api/repos` lists the repositories sessions were opened on or images were built for; a fresh system
/// has none. Someone else building the demo repository's first image puts it in the New session page's list.
async fn list_demo_repo(system: &System) -> anyhow::Result<()> {
    let mut operator = Client::new(system);
    operator
        .dev_login("operator", "Olive Operator", "operator@example.com")
        .await?;
    operator
        .request(
            reqwest::Method::POST,
            &format!("/api/repos/{DEMO_REPO}/images"),
        )
        .send()
        .await?
        .error_for_status()
        .context("POST /api/repos/{repo}/images")?;
    let listed: ReposResponse = operator
        .request(reqwest::Method::GET, "/api/repos")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        listed.repos.iter().any(|r| r.repo == DEMO_REPO),
        "GET /api/repos does not list {DEMO_REPO} after its image build: {listed:?}"
    );
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

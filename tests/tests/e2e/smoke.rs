//! The system starts, and both of its servers answer.

use nightshift_tests::System;

#[tokio::test]
async fn healthz_answers_through_wrangler_and_the_host() -> anyhow::Result<()> {
    let system = System::start().await?;
    let worker = reqwest::get(format!("{}/healthz", system.base_url())).await?;
    assert_eq!(worker.status(), reqwest::StatusCode::OK, "worker /healthz");
    let host = reqwest::get(format!("{}/healthz", system.host_url())).await?;
    assert_eq!(host.status(), reqwest::StatusCode::OK, "host /healthz");
    Ok(())
}

//! `snapshot_light` and `restore_light`: a session on a ~30k-file repository edits 300 files; then the
//! provider snapshots its sandbox (the overlay upper dir as a content-addressed tar.zst) and restores
//! that snapshot into new sandboxes (unpack over the image, mount, start the agent), each measured as
//! the provider API call's round trip.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nightshift_protocol::http::SessionState;
use nightshift_protocol::{Event, PromptStatus};
use serde_json::json;

use crate::latency::{ms, Latency};
use crate::ready::Provider;
use crate::report::{Goal, Row};
use crate::session;
use crate::tool::{LARGE_REPO, LARGE_REPO_FILES};
use nightshift_tests::System;

const SAMPLES: usize = 20;
const EDITED_FILES: usize = 300;
const TARGET_P50_MS: f64 = 50.0;

pub async fn run(system: &System) -> anyhow::Result<Vec<Row>> {
    let provider = Provider::of(system);
    // Seeded by `tool` when it ran first; seeding an existing repository changes nothing.
    system
        .seed_with(LARGE_REPO, LARGE_REPO_FILES)
        .await
        .context("seeding the large repository")?;
    provider
        .image(LARGE_REPO)
        .await
        .context("the large repository's image")?;
    let ada = session::person(system, "snapshot-ada").await?;
    let session_id = ada.create_session(LARGE_REPO).await?;
    let mut ws = session::join(&ada, &session_id).await?;
    session::until_ready(&mut ws).await?;

    let stride = LARGE_REPO_FILES / EDITED_FILES;
    let command = format!(
        "for i in $(seq 0 {stride} {}); do echo '// edited' >> generated/d$((i/100))/item_$i.rs; done",
        stride * (EDITED_FILES - 1)
    );
    let plan = format!(
        "[script:plan]\n{}\n",
        json!({"tool": "bash", "input": {"command": command, "timeout_ms": 120000}})
    );
    let prompt_id = session::post_prompt(&ada, &session_id, &plan).await?;
    let finished = ws
        .wait_for_event(
            |e| matches!(e, Event::PromptFinished { prompt_id: p, .. } if *p == prompt_id),
            Duration::from_secs(300),
        )
        .await?;
    if !matches!(
        finished.event,
        Event::PromptFinished {
            status: PromptStatus::Completed,
            ..
        }
    ) {
        bail!("the editing prompt ended {:?}", finished.event);
    }
    let state: SessionState = ada
        .request(reqwest::Method::GET, &format!("/api/sessions/{session_id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let sandbox_id = state.sandbox.id.context("the session has no sandbox id")?;

    let mut snapshot = Latency::default();
    let mut snapshot_id = String::new();
    let mut size_bytes = 0;
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let (status, info) = provider
            .call(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{sandbox_id}/snapshot"),
                Some(json!({"reason": "bench"})),
            )
            .await?;
        snapshot.push(ms(started.elapsed()));
        if status != 201 {
            bail!("snapshot answered {status}: {info}");
        }
        snapshot_id = info["id"].as_str().unwrap_or_default().to_owned();
        size_bytes = info["size_bytes"].as_u64().unwrap_or(0);
    }

    let mut restore = Latency::default();
    for n in 0..SAMPLES {
        let body = json!({
            "repo": LARGE_REPO, "snapshot": snapshot_id, "base_branch": null,
            "session_id": format!("restore-{n}"), "connect_url": "ws://127.0.0.1:9/sandbox/none/ws",
            "sandbox_token": "bench-restore", "timeout_ms": 60_000,
        });
        let started = Instant::now();
        let (status, info) = provider
            .call(reqwest::Method::POST, "/v1/sandboxes", Some(body))
            .await?;
        restore.push(ms(started.elapsed()));
        if status != 201 && status != 200 {
            bail!("restore answered {status}: {info}");
        }
        if let Some(id) = info["id"].as_str() {
            provider
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/sandboxes/{id}"),
                    None,
                )
                .await?;
        }
    }

    let row = |id: &'static str, what: String, latency: &Latency| {
        let mut extra = serde_json::Map::new();
        extra.insert("samples".into(), latency.count().into());
        extra.insert("edited_files".into(), EDITED_FILES.into());
        extra.insert("archive_bytes".into(), size_bytes.into());
        Row::latency_ms(id, what, latency, Goal::MaxP50Ms(TARGET_P50_MS), extra)
    };
    Ok(vec![
        row(
            "snapshot_light",
            format!("POST /v1/sandboxes/{{id}}/snapshot of a sandbox with {EDITED_FILES} edited files on a {LARGE_REPO_FILES}-file repository (overlay upper dir -> tar.zst, content-addressed)"),
            &snapshot,
        ),
        row(
            "restore_light",
            "POST /v1/sandboxes {snapshot} of that snapshot: unpack over the image, mount, start the isolated agent".to_owned(),
            &restore,
        ),
    ])
}

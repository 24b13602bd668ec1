//! The web app: what a browser downloads (`web_bundle_bytes`, `web_bundle_gzip_bytes`, from `web/dist/assets`
//! as built), and how fast Chromium shows a signed-in session view (`web_first_render`, `web_10k_events`),
//! measured in the page by `tests/browser/render_timing.mjs`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use nightshift_protocol::Event;
use nightshift_tests::system::Tools;
use nightshift_tests::{browser, Client, System, DEMO_REPO};
use serde::Deserialize;

use crate::latency::Latency;
use crate::report::{round3, Goal, Row};
use crate::session;

/// Loads of the session view measured for `web_first_render`.
const FIRST_RENDER_LOADS: usize = 20;
/// Median time to `[data-testid=app-ready]` we hold the session view to, on this 2-core machine.
const FIRST_RENDER_TARGET_P50_MS: f64 = 300.0;
/// Token events in the `web_10k_events` session, and how often it is loaded.
const MANY_TOKENS: usize = 10_000;
const MANY_EVENTS_LOADS: usize = 5;
/// How long a prompt may take to finish: 10k token events with a debug agent on a loaded machine take long.
const PROMPT_WAIT: Duration = Duration::from_secs(300);

pub async fn run(system: &System) -> anyhow::Result<Vec<Row>> {
    let tools = Tools::from_env()?;
    let mut rows = bundle(&tools.repo_root.join("web/dist/assets"))?;
    let ada = session::person(system, "web-ada").await?;
    rows.push(
        first_render(system, &ada)
            .await
            .context("web_first_render")?,
    );
    rows.push(many_events(system, &ada).await.context("web_10k_events")?);
    Ok(rows)
}

/// Bytes of the JavaScript and CSS in `assets`, raw and gzipped (level 9, each file on its own, as a
/// server sends them).
fn bundle(assets: &Path) -> anyhow::Result<Vec<Row>> {
    use std::io::Write as _;

    let mut raw_bytes = 0u64;
    let mut gzip_bytes = 0u64;
    let mut files = 0u64;
    let entries = std::fs::read_dir(assets).with_context(|| {
        format!(
            "reading {} (build the web app first: `cargo xtask bench` does)",
            assets.display()
        )
    })?;
    for entry in entries {
        let path = entry?.path();
        let counted = path
            .extension()
            .is_some_and(|ext| ext == "js" || ext == "css");
        if !counted {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&bytes)?;
        raw_bytes += bytes.len() as u64;
        gzip_bytes += encoder.finish()?.len() as u64;
        files += 1;
    }
    anyhow::ensure!(files > 0, "no .js or .css in {}", assets.display());
    let row = |id, what: &str, value: u64| {
        let mut extra = serde_json::Map::new();
        extra.insert("files".into(), files.into());
        Row {
            id,
            what: what.to_owned(),
            unit: "bytes",
            p50: None,
            p99: None,
            value: Some(value as f64),
            target: "report".to_owned(),
            ok: None,
            extra,
        }
    };
    Ok(vec![
        row(
            "web_bundle_bytes",
            "JavaScript + CSS in web/dist/assets as built (everything the app loads)",
            raw_bytes,
        ),
        row(
            "web_bundle_gzip_bytes",
            "the same files gzipped (level 9, each on its own)",
            gzip_bytes,
        ),
    ])
}

/// Timings `render_timing.mjs` prints, in ms from navigation start.
#[derive(Debug, Deserialize)]
struct RenderTiming {
    app_ready_ms: Vec<f64>,
    /// `domContentLoadedEventEnd` of each load: how much of `app_ready_ms` is the page itself.
    dom_content_loaded_ms: Vec<f64>,
    last_text_ms: Vec<f64>,
}

async fn load_timings(
    system: &System,
    person: &str,
    session_id: &str,
    loads: usize,
    last_text: Option<&str>,
) -> anyhow::Result<RenderTiming> {
    let output = browser::run_script(
        system,
        "render_timing.mjs",
        &[
            ("NIGHTSHIFT_BENCH_PATH", format!("/s/{session_id}")),
            ("NIGHTSHIFT_BENCH_LOGIN", person.to_owned()),
            ("NIGHTSHIFT_BENCH_LOADS", loads.to_string()),
            (
                "NIGHTSHIFT_BENCH_LAST_TEXT",
                last_text.unwrap_or_default().to_owned(),
            ),
        ],
    )
    .await?;
    let line = output.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("render_timing.mjs printed {:?}", output.stdout))
}

/// A new session whose one prompt, `text`, has finished: its id and the `seq` of `prompt_finished`.
async fn finished_session(ada: &Client, text: &str) -> anyhow::Result<(String, u64)> {
    let session_id = ada.create_session(DEMO_REPO).await?;
    let mut ws = session::join(ada, &session_id).await?;
    session::until_ready(&mut ws).await?;
    let prompt_id = session::post_prompt(ada, &session_id, text).await?;
    let finished = ws
        .wait_for_event(
            |e| matches!(e, Event::PromptFinished { prompt_id: p, .. } if *p == prompt_id),
            PROMPT_WAIT,
        )
        .await?;
    Ok((session_id, finished.seq))
}

async fn first_render(system: &System, ada: &Client) -> anyhow::Result<Row> {
    // A turn with text, a tool call and a file change, after the sandbox's own events.
    let (session_id, events) = finished_session(
        ada,
        "[script:write path=notes/web.md content=a file for the first render]",
    )
    .await?;
    let timing = load_timings(system, "web-ada", &session_id, FIRST_RENDER_LOADS, None).await?;
    let latency: Latency = timing.app_ready_ms.into_iter().collect();
    let dom_content_loaded: Latency = timing.dom_content_loaded_ms.into_iter().collect();
    let mut extra = serde_json::Map::new();
    extra.insert("loads".into(), latency.count().into());
    extra.insert("events".into(), events.into());
    extra.insert(
        "dom_content_loaded_p50_ms".into(),
        dom_content_loaded.p50().map(round3).into(),
    );
    Ok(Row::latency_ms(
        "web_first_render",
        "Chromium loads a signed-in session view /s/{id} (one finished turn; a new tab each time, HTTP cache warm after the first): navigation start -> [data-testid=app-ready] in the DOM",
        &latency,
        Goal::MaxP50Ms(FIRST_RENDER_TARGET_P50_MS),
        extra,
    ))
}

async fn many_events(system: &System, ada: &Client) -> anyhow::Result<Row> {
    let (session_id, events) =
        finished_session(ada, &format!("[script:tokens count={MANY_TOKENS} rate=0]")).await?;
    let last_token = format!("tok{}", MANY_TOKENS - 1);
    let timing = load_timings(
        system,
        "web-ada",
        &session_id,
        MANY_EVENTS_LOADS,
        Some(&last_token),
    )
    .await?;
    let ready: Latency = timing.app_ready_ms.into_iter().collect();
    let last: Latency = timing.last_text_ms.into_iter().collect();
    let mut extra = serde_json::Map::new();
    extra.insert("loads".into(), last.count().into());
    extra.insert("events".into(), events.into());
    extra.insert("app_ready_p50_ms".into(), ready.p50().map(round3).into());
    extra.insert("app_ready_p99_ms".into(), ready.p99().map(round3).into());
    Ok(Row::latency_ms(
        "web_10k_events",
        format!("Chromium loads a session view whose log holds {MANY_TOKENS} token events: navigation start -> the last token's text in the transcript (app-ready in the row)"),
        &last,
        Goal::Report,
        extra,
    ))
}

//! `warm_claim_ready` and `cold_start_ready`: a session is created → `sandbox_status{ready}` reaches its
//! client. Warm: the repository's pool holds ready sandboxes (overlay on the image, base caught up), so
//! the provider only starts the agent. Cold: the repository has an image but no pool (a repository of
//! its own per sample, so no demand has built one up).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::latency::{ms, Latency};
use crate::report::{round3, Row};
use crate::session;
use nightshift_tests::{System, DEMO_REPO};

const WARM_SAMPLES: usize = 10;
const COLD_SAMPLES: usize = 8;
const WARM_TARGET_P50_MS: f64 = 100.0;
const COLD_TARGET_P50_MS: f64 = 500.0;
/// An image build or a pool refill may take this long on a loaded 2-core machine.
const PREPARE_WAIT: Duration = Duration::from_secs(120);

/// The provider API of the system's host, as the Worker calls it.
pub struct Provider {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Provider {
    pub fn of(system: &System) -> Provider {
        Provider {
            http: reqwest::Client::new(),
            base: system.host_url(),
            token: system.provider_token().to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("provider {path}"))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Build an image of `repo` (a fresh full clone plus the repository's setup) and wait until it is
    /// ready; how long that took.
    pub async fn image(&self, repo: &str) -> anyhow::Result<f64> {
        let started = Instant::now();
        let (status, info) = self
            .call(
                reqwest::Method::POST,
                "/v1/images",
                Some(json!({"repo": repo})),
            )
            .await?;
        if status != 202 {
            bail!("POST /v1/images for {repo} answered {status}: {info}");
        }
        let id = info["id"].as_str().unwrap_or_default().to_owned();
        let deadline = Instant::now() + PREPARE_WAIT;
        loop {
            let (_, info) = self
                .call(reqwest::Method::GET, &format!("/v1/images/{id}"), None)
                .await?;
            match info["status"].as_str() {
                Some("ready") => return Ok(ms(started.elapsed())),
                Some("failed") => bail!("the image of {repo} failed: {}", info["error"]),
                _ if Instant::now() > deadline => {
                    bail!("the image of {repo} was not ready within {PREPARE_WAIT:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The pool of `repo` as `GET /v1/pools` lists it.
    pub async fn pool(&self, repo: &str) -> anyhow::Result<Value> {
        let (status, list) = self.call(reqwest::Method::GET, "/v1/pools", None).await?;
        if status != 200 {
            bail!("GET /v1/pools answered {status}: {list}");
        }
        let pools = list
            .get("pools")
            .unwrap_or(&list)
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(pools
            .into_iter()
            .find(|p| p["repo"] == repo)
            .unwrap_or(Value::Null))
    }

    /// Ask for `target` ready sandboxes of `repo` and wait until `ready` of them are.
    pub async fn warm(&self, repo: &str, target: u64, ready: u64) -> anyhow::Result<()> {
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/pools/{repo}"),
                Some(json!({"target": target})),
            )
            .await?;
        if status != 202 {
            bail!("POST /v1/pools/{repo} answered {status}: {answer}");
        }
        let deadline = Instant::now() + PREPARE_WAIT;
        loop {
            if self.pool(repo).await?["ready"].as_u64().unwrap_or(0) >= ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the pool of {repo} did not reach {ready} ready within {PREPARE_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Create a session on `repo` and wait for `sandbox_status{ready}` at its client; the time it took.
async fn create_to_ready(system: &System, login: &str, repo: &str) -> anyhow::Result<f64> {
    let person = session::person(system, login).await?;
    let started = Instant::now();
    let id = person.create_session(repo).await?;
    let mut ws = session::join(&person, &id).await?;
    session::until_ready(&mut ws).await?;
    Ok(ms(started.elapsed()))
}

pub async fn run(system: &System) -> anyhow::Result<Vec<Row>> {
    let provider = Provider::of(system);
    provider.image(DEMO_REPO).await.context("the demo image")?;

    let mut warm = Latency::default();
    for n in 0..WARM_SAMPLES {
        provider.warm(DEMO_REPO, 2, 1).await?;
        warm.push(create_to_ready(system, &format!("warm-{n}"), DEMO_REPO).await?);
    }

    // Each cold sample is a repository of its own: its image is built fresh (clone + setup), then a
    // session starts on it. The naive way pays both at session time: its samples are the sums.
    let mut cold = Latency::default();
    let mut naive = Latency::default();
    for n in 0..COLD_SAMPLES {
        let repo = format!("bench/cold-{n}");
        system.seed_with(&repo, 0).await?;
        let build_ms = provider.image(&repo).await?;
        let ready_ms = create_to_ready(system, &format!("cold-{n}"), &repo).await?;
        cold.push(ready_ms);
        naive.push(build_ms + ready_ms);
    }

    let row =
        |id: &'static str, what: &str, latency: &Latency, target: &'static str, target_ms: f64| {
            let p50 = latency.p50();
            let mut extra = serde_json::Map::new();
            extra.insert("samples".into(), latency.count().into());
            Row {
                id,
                what: what.to_owned(),
                unit: "ms",
                p50: p50.map(round3),
                p99: latency.p99().map(round3),
                value: None,
                target,
                ok: Some(p50.is_some_and(|p50| p50 <= target_ms)),
                extra,
            }
        };
    let ratio = match (naive.p50(), warm.p50()) {
        (Some(naive), Some(warm)) if warm > 0.0 => Some(naive / warm),
        _ => None,
    };
    let mut ratio_extra = serde_json::Map::new();
    ratio_extra.insert("naive_p50_ms".into(), naive.p50().map(round3).into());
    ratio_extra.insert("warm_p50_ms".into(), warm.p50().map(round3).into());
    let ratio_row = Row {
        id: "naive_vs_ready_ratio",
        what: "the naive start (fresh full clone + the repository's setup, then the session starts on it: \
               no image, no pool) divided by warm_claim_ready, p50 over p50, same run"
            .to_owned(),
        unit: "ratio",
        p50: None,
        p99: None,
        value: ratio.map(round3),
        target: ">= 20",
        ok: Some(ratio.is_some_and(|r| r >= 20.0)),
        extra: ratio_extra,
    };
    Ok(vec![
        ratio_row,
        row(
            "warm_claim_ready",
            "session created on a repository with a warm pool -> sandbox_status{ready} at its client (claim, isolated agent start, agent connects through the egress proxy)",
            &warm,
            "p50 <= 100 ms",
            WARM_TARGET_P50_MS,
        ),
        row(
            "cold_start_ready",
            "session created on a repository with an image but no pool -> sandbox_status{ready} at its client (overlay on the image, isolated agent start)",
            &cold,
            "p50 <= 500 ms",
            COLD_TARGET_P50_MS,
        ),
    ])
}

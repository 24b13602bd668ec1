//! `warm_claim_ready`, `cold_start_ready` and `naive_vs_ready_ratio`, all on one repository that looks
//! like a real project: the demo package plus 2,000 generated Python modules with a unit test each
//! (~4,050 files), whose `.nightshift/setup.sh` byte-compiles everything and runs the whole test suite
//! once (`compileall` + `unittest`, 8,000+ tests), as a real setup fills its caches; nothing in it
//! needs the network.
//!
//! A session is created → `sandbox_status{ready}` reaches its client. Warm: the repository's pool
//! holds ready sandboxes (overlay on the image, base caught up), so the provider only starts the
//! agent. Cold: the repository has an image but no pool. The naive start pays a fresh full clone and
//! the setup at session time: an image build (clone + setup) followed by the cold start.
//!
//! A pool is per repository name, and every create refills its repository's pool; so each cold
//! sample uses a copy of the repository under a name of its own (`bench/app-cold-{n}`: the same
//! files and the same commit id, since seeding is deterministic), where no demand has built a pool.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::latency::{ms, Latency};
use crate::report::{round3, Goal, Row};
use crate::session;
use nightshift_tests::system::Tools;
use nightshift_tests::System;

/// The repository every row of this module starts sessions on.
const APP_REPO: &str = "bench/app";
/// Generated Python modules in it, each with a test module of four tests.
const APP_MODULES: usize = 2_000;
/// Python files in it: the modules and their tests, an `__init__.py` per package (100 modules each,
/// plus the two roots), and the demo project's 5.
const APP_PY_FILES: usize = 2 * APP_MODULES + 2 * (APP_MODULES.div_ceil(100) + 1) + 5;
/// Files in it: the Python files and the demo project's other 4 (README, pyproject, .gitignore, setup).
const APP_FILES: usize = APP_PY_FILES + 4;
/// Tests its setup runs: four per generated module, three of the demo project.
const APP_TESTS: usize = 4 * APP_MODULES + 3;
const WARM_SAMPLES: usize = 20;
/// The pool holds this many ready sandboxes when each warm sample starts.
const WARM_POOL: u64 = 2;
/// Each costs an image build (a full clone and the setup) on a fresh copy of the repository.
const COLD_SAMPLES: usize = 6;
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

    /// Ask for `target` ready sandboxes of `repo` and wait until `ready` of them are and, with
    /// `at_rest`, none is being prepared (no refill is running).
    pub async fn warm(
        &self,
        repo: &str,
        target: u64,
        ready: u64,
        at_rest: bool,
    ) -> anyhow::Result<()> {
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
            let pool = self.pool(repo).await?;
            let preparing = pool["preparing"].as_u64().unwrap_or(0);
            if pool["ready"].as_u64().unwrap_or(0) >= ready && (!at_rest || preparing == 0) {
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

/// Seed `repo` as a copy of the application repository (an existing one is left as it is).
async fn seed_app(system: &System, repo: &str) -> anyhow::Result<()> {
    let tools = Tools::from_env()?;
    let output = tokio::process::Command::new(&tools.agent_bin)
        .arg("seed")
        .arg("--store")
        .arg(system.host_data_dir().join("git"))
        .args(["--repo", repo])
        .arg(format!("--synthetic-modules={APP_MODULES}"))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} seed", tools.agent_bin.display()))?;
    if !output.status.success() {
        bail!(
            "sandbox-agent seed --repo {repo} exited with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

pub async fn run(system: &System) -> anyhow::Result<Vec<Row>> {
    let provider = Provider::of(system);
    let seeding = Instant::now();
    seed_app(system, APP_REPO)
        .await
        .context("seeding the application repository")?;
    eprintln!(
        "bench:   seeded {APP_REPO} ({APP_FILES} files) in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let first_build_ms = provider
        .image(APP_REPO)
        .await
        .context("the application's image")?;
    eprintln!(
        "bench:   built its image (clone + setup) in {:.1} s",
        first_build_ms / 1000.0
    );

    let mut warm = Latency::default();
    for n in 0..WARM_SAMPLES {
        // At rest: the pool is at its target and the previous claim's refill is done.
        provider.warm(APP_REPO, WARM_POOL, WARM_POOL, true).await?;
        warm.push(create_to_ready(system, &format!("warm-{n}"), APP_REPO).await?);
    }

    // Each cold sample is a copy of the repository of its own: its image is built fresh (clone +
    // setup), then a session starts on it. The naive way pays both at session time: its samples are
    // the sums.
    let mut builds = Latency::default();
    let mut cold = Latency::default();
    let mut naive = Latency::default();
    for n in 0..COLD_SAMPLES {
        let repo = format!("{APP_REPO}-cold-{n}");
        seed_app(system, &repo).await?;
        let build_ms = provider.image(&repo).await?;
        let ready_ms = create_to_ready(system, &format!("cold-{n}"), &repo).await?;
        builds.push(build_ms);
        cold.push(ready_ms);
        naive.push(build_ms + ready_ms);
    }

    let repository = || {
        let mut extra = serde_json::Map::new();
        extra.insert("repo".into(), APP_REPO.into());
        extra.insert("repo_files".into(), APP_FILES.into());
        extra.insert(
            "repo_setup".into(),
            format!("python3 -m compileall (all {APP_PY_FILES} .py files) + python3 -m unittest ({APP_TESTS} tests)")
                .into(),
        );
        extra
    };
    let row = |id: &'static str, what: &str, latency: &Latency, target_ms: f64| {
        let mut extra = repository();
        extra.insert("samples".into(), latency.count().into());
        Row::latency_ms(id, what, latency, Goal::MaxP50Ms(target_ms), extra)
    };
    let ratio = match (naive.p50(), warm.p50()) {
        (Some(naive), Some(warm)) if warm > 0.0 => Some(naive / warm),
        _ => None,
    };
    let mut ratio_extra = repository();
    ratio_extra.insert("naive_p50_ms".into(), naive.p50().map(round3).into());
    ratio_extra.insert("naive_samples".into(), naive.count().into());
    ratio_extra.insert(
        "clone_and_setup_p50_ms".into(),
        builds.p50().map(round3).into(),
    );
    ratio_extra.insert("warm_p50_ms".into(), warm.p50().map(round3).into());
    let ratio_row = Row {
        id: "naive_vs_ready_ratio",
        what: format!(
            "the naive start (fresh full clone + the repository's setup, then the session starts on it: \
             no image, no pool) divided by warm_claim_ready, p50 over p50, same run, same repository \
             ({APP_REPO}: the demo package + {APP_MODULES} generated Python modules with a test module each, \
             {APP_FILES} files; setup byte-compiles everything and runs the {APP_TESTS}-test suite)"
        ),
        unit: "ratio",
        p50: None,
        p99: None,
        value: ratio.map(round3),
        target: ">= 20".to_owned(),
        ok: Some(ratio.is_some_and(|r| r >= 20.0)),
        extra: ratio_extra,
    };
    Ok(vec![
        ratio_row,
        row(
            "warm_claim_ready",
            &format!("session created on a repository with a warm pool ({WARM_POOL} ready, no refill running) -> sandbox_status{{ready}} at its client (claim, isolated agent start, agent connects through the egress proxy); on {APP_REPO} ({APP_FILES} files), the repository of naive_vs_ready_ratio"),
            &warm,
            WARM_TARGET_P50_MS,
        ),
        row(
            "cold_start_ready",
            &format!("session created on a repository with an image but no pool -> sandbox_status{{ready}} at its client (overlay on the image, isolated agent start); on fresh copies of {APP_REPO} ({APP_FILES} files), the naive samples' second half"),
            &cold,
            COLD_TARGET_P50_MS,
        ),
    ])
}

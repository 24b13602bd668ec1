//! `cargo xtask bench`: starts the system it measures (wrangler dev with the built Worker, the sandbox
//! host, real agents with the scripted model), prints a table and writes `target/bench/report.json`
//! in the format of DESIGN.md § Benchmarks.
//!
//! Exits 0 when every row was measured, whether or not it meets its target (it is a report), and
//! non-zero when the bench itself failed: the system did not start, a connection was lost, an
//! expected event never came.

mod fanout;
mod idle;
mod latency;
mod overhead;
mod prompt_start;
mod ready;
mod report;
mod round_trip;
mod session;
mod snapshot;
mod stop;
mod stream;
mod tool;
mod web;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use nightshift_tests::env;
use nightshift_tests::system::Tools;
use nightshift_tests::System;

use crate::report::{Report, Row};

/// Lines of each service's log shown when the bench fails.
const LOG_TAIL_LINES: usize = 30;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench failed: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench() -> anyhow::Result<()> {
    let only = std::env::var(env::NIGHTSHIFT_BENCH_ONLY).ok();
    let modules = selected_modules(only.as_deref())?;
    let tools = Tools::from_env()?;
    let report_path = tools.repo_root.join("target/bench/report.json");
    let started = Instant::now();
    eprintln!("bench: starting wrangler dev and the sandbox host");
    // Room for `idle_sandboxes`' pool.
    let system = System::start_with(nightshift_tests::StartOptions {
        host_env: vec![(
            "NIGHTSHIFT_POOL_MAX".to_owned(),
            (idle::TARGET + 16).to_string(),
        )],
        ..Default::default()
    })
    .await
    .context("starting the system")?;
    let rows = match measure(&system, &modules).await {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!(
                "--- wrangler log (end) ---\n{}",
                tail(&system.wrangler_log())
            );
            eprintln!("--- host log (end) ---\n{}", tail(&system.host_log()));
            return Err(error);
        }
    };
    drop(system);
    let report = Report {
        machine: report::machine(),
        rows,
    };
    print!("{}", report.table());
    report.write(&report_path)?;
    eprintln!(
        "bench: wrote {} in {:.1} s",
        report_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The bench modules, in the order they run, with the ids of the rows each writes. `NIGHTSHIFT_BENCH_ONLY`
/// selects among them by module name or row id.
const MODULES: [(&str, &[&str]); 10] = [
    ("round_trip", &["ws_rtt"]),
    ("prompt_start", &["prompt_to_started"]),
    ("fanout", &["fanout_50x1000", "fanout_50x1000_blast"]),
    ("overhead", &["agent_token_overhead"]),
    (
        "ready",
        &[
            "naive_vs_ready_ratio",
            "warm_claim_ready",
            "cold_start_ready",
        ],
    ),
    ("stop", &["stop_to_stopped"]),
    ("tool", &["tool_read_30k", "tool_grep_30k"]),
    ("snapshot", &["snapshot_light", "restore_light"]),
    ("idle", &["idle_sandboxes"]),
    (
        "web",
        &[
            "web_bundle_bytes",
            "web_bundle_gzip_bytes",
            "web_first_render",
            "web_10k_events",
        ],
    ),
];

/// The modules `NIGHTSHIFT_BENCH_ONLY` (comma-separated module names or row ids) selects; every module
/// when it is unset or empty. A name that is neither is an error, so a typo never runs nothing.
fn selected_modules(only: Option<&str>) -> anyhow::Result<Vec<&'static str>> {
    let wanted: Vec<&str> = only
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let selects = |name: &str, module: &str, ids: &[&str]| name == module || ids.contains(&name);
    if wanted.is_empty() {
        return Ok(MODULES.iter().map(|(module, _)| *module).collect());
    }
    if let Some(unknown) = wanted.iter().find(|name| {
        !MODULES
            .iter()
            .any(|(module, ids)| selects(name, module, ids))
    }) {
        let known: Vec<&str> = MODULES.iter().map(|(module, _)| *module).collect();
        anyhow::bail!(
            "{}: no bench module or row is called {unknown:?} (modules: {})",
            env::NIGHTSHIFT_BENCH_ONLY,
            known.join(", ")
        );
    }
    Ok(MODULES
        .iter()
        .filter(|(module, ids)| wanted.iter().any(|name| selects(name, module, ids)))
        .map(|(module, _)| *module)
        .collect())
}

/// The rows of the selected modules, in order; each module starts its own sessions.
async fn measure(system: &System, modules: &[&str]) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for module in modules {
        let ids = MODULES
            .iter()
            .find(|(name, _)| name == module)
            .map(|(_, ids)| ids.join(", "))
            .unwrap_or_default();
        eprintln!("bench: {ids}");
        // Others' work on this machine moves the latencies: each row says how busy it was.
        let load_at_start = load_average_1m();
        let at = Instant::now();
        let measured = match *module {
            "round_trip" => vec![round_trip::run(system).await.context("ws_rtt")?],
            "prompt_start" => vec![prompt_start::run(system)
                .await
                .context("prompt_to_started")?],
            "fanout" => Vec::from(fanout::run(system).await.context("fanout_50x1000")?),
            "overhead" => vec![overhead::run(system)
                .await
                .context("agent_token_overhead")?],
            "ready" => ready::run(system).await.context("warm_claim_ready")?,
            "stop" => vec![stop::run(system).await.context("stop_to_stopped")?],
            "tool" => tool::run(system).await.context("tool_read_30k")?,
            "snapshot" => snapshot::run(system).await.context("snapshot_light")?,
            "idle" => vec![idle::run(system).await.context("idle_sandboxes")?],
            "web" => web::run(system).await.context("web")?,
            other => anyhow::bail!("no bench module {other}"),
        };
        rows.extend(measured.into_iter().map(|mut row| {
            row.extra
                .insert("load_avg_1m_at_start".into(), load_at_start.into());
            row
        }));
        done(at);
    }
    Ok(rows)
}

/// The machine's 1-minute load average (`/proc/loadavg`), `None` where it cannot be read.
fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn done(at: Instant) {
    eprintln!("bench:   {:.1} s", at.elapsed().as_secs_f64());
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{selected_modules, MODULES};

    #[test]
    fn the_filter_selects_modules_by_name_or_row_id_in_bench_order() {
        assert_eq!(selected_modules(None).unwrap().len(), MODULES.len());
        assert_eq!(selected_modules(Some(" ")).unwrap().len(), MODULES.len());
        assert_eq!(
            selected_modules(Some("snapshot,ready")).unwrap(),
            ["ready", "snapshot"]
        );
        assert_eq!(
            selected_modules(Some("restore_light, ws_rtt")).unwrap(),
            ["round_trip", "snapshot"]
        );
        let typo = selected_modules(Some("snapshots")).unwrap_err().to_string();
        assert!(typo.contains("\"snapshots\""), "{typo}");
    }
}

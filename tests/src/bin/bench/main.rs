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

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
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
    let rows = match measure(&system).await {
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

/// Every row, in order; each starts its own sessions.
async fn measure(system: &System) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let step = |id: &str| {
        eprintln!("bench: {id}");
        Instant::now()
    };
    let at = step("ws_rtt");
    rows.push(round_trip::run(system).await.context("ws_rtt")?);
    done(at);
    let at = step("prompt_to_started");
    rows.push(
        prompt_start::run(system)
            .await
            .context("prompt_to_started")?,
    );
    done(at);
    let at = step("fanout_50x1000, fanout_50x1000_blast");
    rows.extend(fanout::run(system).await.context("fanout_50x1000")?);
    done(at);
    let at = step("agent_token_overhead");
    rows.push(
        overhead::run(system)
            .await
            .context("agent_token_overhead")?,
    );
    done(at);
    let at = step("warm_claim_ready, cold_start_ready");
    rows.extend(ready::run(system).await.context("warm_claim_ready")?);
    done(at);
    let at = step("stop_to_stopped");
    rows.push(stop::run(system).await.context("stop_to_stopped")?);
    done(at);
    let at = step("tool_read_30k, tool_grep_30k");
    rows.extend(tool::run(system).await.context("tool_read_30k")?);
    done(at);
    let at = step("snapshot_light, restore_light");
    rows.extend(snapshot::run(system).await.context("snapshot_light")?);
    done(at);
    let at = step("idle_sandboxes");
    rows.push(idle::run(system).await.context("idle_sandboxes")?);
    done(at);
    Ok(rows)
}

fn done(at: Instant) {
    eprintln!("bench:   {:.1} s", at.elapsed().as_secs_f64());
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

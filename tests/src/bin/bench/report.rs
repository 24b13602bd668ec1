//! The report: rows in the format of DESIGN.md § Benchmarks, the machine they were measured on, the
//! table printed to stdout and `target/bench/report.json`.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::latency::Latency;

/// One row of the report; `extra` fields (such as `lost`) follow the fixed ones.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable id, so results compare over time.
    pub id: &'static str,
    /// What is measured, and how.
    pub what: String,
    /// Unit of `p50`, `p99` and `value`.
    pub unit: &'static str,
    /// Median of the samples.
    pub p50: Option<f64>,
    /// 99th percentile of the samples.
    pub p99: Option<f64>,
    /// A single figure (a ratio, a rate, a count).
    pub value: Option<f64>,
    /// `"p50 <= 10 ms"`, or `"report"` when there is none.
    pub target: String,
    /// Whether the target is met; `None` for report-only rows.
    pub ok: Option<bool>,
    /// Row-specific figures.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a row of latencies is held to.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// Nothing: the row reports.
    Report,
    /// Its p50 at most this many milliseconds.
    MaxP50Ms(f64),
}

impl Row {
    /// A row of millisecond samples: their p50 and p99, the target `goal` sets and whether it is met.
    pub fn latency_ms(
        id: &'static str,
        what: impl Into<String>,
        latency: &Latency,
        goal: Goal,
        extra: Map<String, Value>,
    ) -> Row {
        let p50 = latency.p50();
        let (target, ok) = match goal {
            Goal::Report => ("report".to_owned(), None),
            Goal::MaxP50Ms(max_ms) => (
                format!("p50 <= {max_ms} ms"),
                Some(p50.is_some_and(|p50| p50 <= max_ms)),
            ),
        };
        Row {
            id,
            what: what.into(),
            unit: "ms",
            p50: p50.map(round3),
            p99: latency.p99().map(round3),
            value: None,
            target,
            ok,
            extra,
        }
    }
}

/// `target/bench/report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Host name, cores and memory of this machine.
    pub machine: String,
    /// Rows in measuring order.
    pub rows: Vec<Row>,
}

impl Report {
    /// Write the report as pretty JSON to `path`, creating its folder.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The table printed to stdout: one line per row, `what` and the extra fields last.
    pub fn table(&self) -> String {
        let mut out = format!("machine: {}\n", self.machine);
        out += &format!(
            "{:<22} {:>9} {:>9} {:>11} {:<9} {:<24} {:<5} {}\n",
            "id", "p50", "p99", "value", "unit", "target", "ok", "what"
        );
        for row in &self.rows {
            let extra: Vec<String> = row
                .extra
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            let ok = match row.ok {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            out += &format!(
                "{:<22} {:>9} {:>9} {:>11} {:<9} {:<24} {:<5} {}{}\n",
                row.id,
                figure(row.p50),
                figure(row.p99),
                figure(row.value),
                row.unit,
                row.target,
                ok,
                row.what,
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", extra.join(" "))
                },
            );
        }
        out
    }
}

fn figure(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

/// `x` rounded to 3 decimals (microseconds, for milliseconds), so the JSON stays readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `"host · N cores (model) · X GiB"`, read from /proc.
pub fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let hostname = read("/proc/sys/kernel/hostname").trim().to_owned();
    let cpuinfo = read("/proc/cpuinfo");
    let cores = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_owned())
        .unwrap_or_else(|| "unknown cpu".to_owned());
    let memory_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    let memory_gib = memory_kib as f64 / (1024.0 * 1024.0);
    format!("{hostname} · {cores} cores ({model}) · {memory_gib:.1} GiB")
}

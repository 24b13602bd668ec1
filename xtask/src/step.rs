//! One progress line per step (`[setup] wasm32 target … ok (0.1 s)`) and the commands steps run.
//!
//! Output of a captured command goes to `target/xtask/<name>.log`; when it fails, the error names the
//! step and shows the end of that log.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

/// How a step ended, when it did not fail.
pub enum Outcome {
    /// The work was done.
    Done,
    /// Nothing to do: it was already in place.
    Cached,
    /// Done, with something the person should know (printed after the line).
    Warning(String),
}

/// A step's line while it runs: lets the step add a note (`installing, ~9 min on 2 cores`) before it ends.
pub struct Line {
    _private: (),
}

impl Line {
    pub fn note(&mut self, text: &str) {
        print!("{text} … ");
        let _ = std::io::stdout().flush();
    }
}

/// Run one step and print its line; a failure carries the command and step name.
pub fn run(
    command: &str,
    name: &str,
    body: impl FnOnce(&mut Line) -> anyhow::Result<Outcome>,
) -> anyhow::Result<()> {
    print!("[{command}] {name} … ");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let result = body(&mut Line { _private: () });
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(Outcome::Done) => println!("ok ({seconds:.1} s)"),
        Ok(Outcome::Cached) => println!("ok, up to date ({seconds:.1} s)"),
        Ok(Outcome::Warning(text)) => {
            println!("warning ({seconds:.1} s)");
            println!("[{command}]   {text}");
        }
        Err(error) => {
            println!("failed ({seconds:.1} s)");
            return Err(error.context(format!("[{command}] step `{name}` failed")));
        }
    }
    Ok(())
}

/// Run a command whose output streams to the terminal (tests, benchmarks): a header line, the output, and
/// an error naming the step when it fails.
pub fn stream(command: &str, name: &str, process: &mut Command) -> anyhow::Result<()> {
    println!("[{command}] {name} …");
    let started = Instant::now();
    let status = process.stdin(Stdio::null()).status().with_context(|| {
        format!(
            "[{command}] step `{name}` failed: could not start {}",
            describe(process)
        )
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("[{command}] step `{name}` failed ({status}, after {seconds:.1} s)");
    }
    println!("[{command}] {name} … ok ({seconds:.1} s)");
    Ok(())
}

/// Run a command with its output captured in `log`; fail with the end of the log.
pub fn run_logged(process: &mut Command, log: &Path) -> anyhow::Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let stderr = file
        .try_clone()
        .context("duplicating the log file handle")?;
    let status = process
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .status()
        .with_context(|| format!("could not start {}", describe(process)))?;
    if !status.success() {
        bail!(
            "{} exited with {status}; end of its output:\n{}\n(full output: {})",
            describe(process),
            tail(log, 40),
            log.display()
        );
    }
    Ok(())
}

/// Run a command and return its stdout (trimmed); `None` when it cannot start or fails.
pub fn output(process: &mut Command) -> Option<String> {
    let output = process
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `program arg arg` for messages.
pub fn describe(process: &Command) -> String {
    let mut text = process.get_program().to_string_lossy().into_owned();
    for arg in process.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    format!("`{text}`")
}

/// The last `lines` lines of a text file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `target/xtask/<name>.log`.
pub fn log_path(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.log"))
}

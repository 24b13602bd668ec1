//! Chromium driven by playwright-core: the scripts in `tests/browser/*.mjs` run with the project's Node 22
//! against a running [`System`], for the browser tests and the `web` bench rows.
//!
//! A script gets the Worker's address and an output folder (`target/browser/`, for screenshots) through
//! [`env::NIGHTSHIFT_BASE_URL`] and [`env::NIGHTSHIFT_BROWSER_OUT`], plus whatever the caller adds; it exits
//! non-zero when an assertion fails, and the caller gets its whole output in the error.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use crate::env;
use crate::system::{System, Tools};

/// Where Debian's chromium package puts the browser (`cargo xtask setup` installs it).
pub const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// The browser the scripts launch: [`env::NIGHTSHIFT_CHROMIUM`] or [`DEFAULT_CHROMIUM`]; fails with what to
/// install when it is missing.
pub fn chromium() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(env::NIGHTSHIFT_CHROMIUM)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROMIUM));
    if !path.exists() {
        bail!(
            "chromium not found at {}: run `cargo xtask setup` (it runs `apt-get install chromium`), \
             or set {} to a Chromium binary",
            path.display(),
            env::NIGHTSHIFT_CHROMIUM
        );
    }
    Ok(path)
}

/// `target/browser/` under the repository root: screenshots for people to look at.
pub fn out_dir(tools: &Tools) -> PathBuf {
    tools.repo_root.join("target/browser")
}

/// What a script printed on stdout when it succeeded.
#[derive(Debug)]
pub struct ScriptOutput {
    /// Standard output (a bench script prints its figures there as JSON).
    pub stdout: String,
}

/// Run `tests/browser/{script}` with Node 22 against `system`, with `extra_env` added; fails with the
/// script's output when it exits non-zero.
pub async fn run_script(
    system: &System,
    script: &str,
    extra_env: &[(&str, String)],
) -> anyhow::Result<ScriptOutput> {
    let tools = Tools::from_env()?;
    let chromium = chromium()?;
    let out = out_dir(&tools);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let path = script_path(&tools.repo_root, script);
    // The scripts live inside the repository, so `import "playwright-core"` resolves from its node_modules.
    let mut child = tokio::process::Command::new(&tools.node)
        .arg(&path)
        .current_dir(&tools.repo_root)
        .env(env::NIGHTSHIFT_BASE_URL, system.base_url())
        .env(env::NIGHTSHIFT_BROWSER_OUT, &out)
        .env(env::NIGHTSHIFT_CHROMIUM, &chromium)
        .envs(extra_env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {} {}", tools.node.display(), path.display()))?;
    let mut stdout_pipe = child.stdout.take().context("no stdout pipe")?;
    let stderr_pipe = child.stderr.take().context("no stderr pipe")?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    // Progress lines on stderr are shown as they come (with --nocapture), and kept for the error.
    let read_stderr = async {
        let mut lines = BufReader::new(stderr_pipe).lines();
        while let Some(line) = lines.next_line().await? {
            eprintln!("{line}");
            stderr.push_str(&line);
            stderr.push('\n');
        }
        Ok::<(), std::io::Error>(())
    };
    let (read_out, read_err, status) = tokio::join!(
        stdout_pipe.read_to_string(&mut stdout),
        read_stderr,
        child.wait()
    );
    read_out.context("reading the script's stdout")?;
    read_err.context("reading the script's stderr")?;
    let status = status.context("waiting for the script")?;
    if !status.success() {
        bail!("{script} exited with {status}:\n{}", failure(&stderr));
    }
    Ok(ScriptOutput { stdout })
}

/// What a script said after its last progress line (`browser: step … ok`): why it failed. The whole of its
/// stderr was shown line by line as it came.
fn failure(stderr: &str) -> &str {
    let after_progress = stderr
        .rfind("\nbrowser: ")
        .and_then(|at| stderr[at + 1..].find('\n').map(|end| at + 1 + end + 1));
    stderr[after_progress.unwrap_or(0)..].trim()
}

fn script_path(repo_root: &Path, script: &str) -> PathBuf {
    repo_root.join("tests/browser").join(script)
}

#[cfg(test)]
mod tests {
    use super::failure;

    #[test]
    fn the_failure_is_what_follows_the_last_progress_line() {
        let stderr =
            "browser: one … ok (3 ms)\nbrowser: two … FAILED\n\ntwo: no turn\n    at x.mjs:1\n";
        assert_eq!(failure(stderr), "two: no turn\n    at x.mjs:1");
        assert_eq!(
            failure("browser: one … FAILED\nboom\n"),
            "browser: one … FAILED\nboom"
        );
        assert_eq!(failure("SyntaxError\n"), "SyntaxError");
    }
}

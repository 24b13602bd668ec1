//! Running one hook process: payload on stdin, answer from stdout, a deadline, and nothing left behind.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Hook, HookEnv, HookError, EVENT_ENV, STDOUT_LIMIT_BYTES};

/// How much of stderr is kept while it is read (the end of it).
const STDERR_KEEP_BYTES: usize = 4096;
/// How much of stderr a failure message shows (the end of it).
const STDERR_TAIL_CHARS: usize = 400;
/// How long to wait for a killed hook to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(1);
/// How often to retry a spawn that failed with `ETXTBSY`.
const SPAWN_ATTEMPTS: u32 = 5;

/// Run `hook` with `payload` on stdin in `cwd`; its stdout if it exited with status 0 in time.
pub(super) async fn run(
    hook: &Hook,
    cwd: &Path,
    env: &HookEnv,
    payload: &[u8],
) -> Result<String, HookError> {
    let mut command = Command::new(&hook.program);
    command
        .args(&hook.args)
        .env_clear()
        .env("PATH", &env.path)
        .env("HOME", &env.home)
        .envs(env.proxy.iter().map(|(name, value)| (name, value)))
        .env(EVENT_ENV, hook.event.as_str())
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = spawn(&mut command)
        .await
        .map_err(|source| HookError::Spawn {
            hook: hook.name.clone(),
            source,
        })?;
    // Killed when this function ends in any way, also when its future is dropped mid-run.
    let group = ProcessGroup::new(child.id());
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let exchange = async {
        let write = async {
            if let Some(mut stdin) = stdin {
                // A hook may exit without reading its input; that is its business.
                let _ = stdin.write_all(payload).await;
                let _ = stdin.shutdown().await;
            }
        };
        let wait = async {
            let status = child.wait().await;
            // The hook is done: whatever it left running goes, so its pipes close.
            group.kill();
            status
        };
        let read_stdout = read_capped(stdout, &group);
        let read_stderr = read_tail(stderr);
        let ((), status, stdout, stderr) = tokio::join!(write, wait, read_stdout, read_stderr);
        (status, stdout, stderr)
    };
    let outcome = tokio::time::timeout(Duration::from_millis(hook.timeout_ms), exchange).await;
    let Ok((status, stdout, stderr)) = outcome else {
        group.kill();
        let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
        return Err(HookError::TimedOut {
            hook: hook.name.clone(),
            timeout_ms: hook.timeout_ms,
        });
    };
    let stdout = stdout.ok_or_else(|| HookError::OutputTooLarge {
        hook: hook.name.clone(),
        limit_bytes: STDOUT_LIMIT_BYTES,
    })?;
    let status = status.map_err(|source| HookError::Wait {
        hook: hook.name.clone(),
        source,
    })?;
    let stderr_tail = tail(&stderr);
    match (status.code(), status.signal()) {
        (Some(0), _) => String::from_utf8(stdout).map_err(|_| HookError::InvalidAnswer {
            hook: hook.name.clone(),
            detail: "stdout is not utf-8".to_owned(),
        }),
        (Some(code), _) => Err(HookError::Exited {
            hook: hook.name.clone(),
            code,
            stderr_tail,
        }),
        (None, signal) => Err(HookError::Killed {
            hook: hook.name.clone(),
            signal: signal.unwrap_or_default(),
            stderr_tail,
        }),
    }
}

/// Spawn, retrying `ETXTBSY`: a script written a moment ago can still be open for writing in a child
/// another thread forked in between, until that child execs.
async fn spawn(command: &mut Command) -> std::io::Result<tokio::process::Child> {
    let mut attempt = 1;
    loop {
        match command.spawn() {
            Err(error)
                if error.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Read all of stdout, at most [`STDOUT_LIMIT_BYTES`]; beyond that, kill the group and give `None`.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    group: &ProcessGroup,
) -> Option<Vec<u8>> {
    let mut output = Vec::new();
    let Some(mut pipe) = pipe else {
        return Some(output);
    };
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return Some(output),
            Ok(read) => {
                output.extend_from_slice(chunk.get(..read).unwrap_or_default());
                if output.len() > STDOUT_LIMIT_BYTES {
                    group.kill();
                    return None;
                }
            }
        }
    }
}

/// Read all of stderr, keeping about the last [`STDERR_KEEP_BYTES`].
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(read) => {
                kept.extend_from_slice(chunk.get(..read).unwrap_or_default());
                if kept.len() > 2 * STDERR_KEEP_BYTES {
                    kept.drain(..kept.len() - STDERR_KEEP_BYTES);
                }
            }
        }
    }
}

/// The last [`STDERR_TAIL_CHARS`] characters of `stderr`, trimmed.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let count = text.chars().count();
    if count <= STDERR_TAIL_CHARS {
        return text.to_owned();
    }
    let rest: String = text.chars().skip(count - STDERR_TAIL_CHARS).collect();
    format!("…{rest}")
}

/// The process group of a hook (its id is the hook's pid); SIGKILLed on [`ProcessGroup::kill`] and
/// on drop.
struct ProcessGroup {
    id: Option<libc::pid_t>,
    killed: AtomicBool,
}

impl ProcessGroup {
    fn new(pid: Option<u32>) -> Self {
        Self {
            id: pid.and_then(|pid| libc::pid_t::try_from(pid).ok()),
            killed: AtomicBool::new(false),
        }
    }

    /// SIGKILL every process of the group, once.
    fn kill(&self) {
        let Some(id) = self.id else { return };
        if id <= 1 || self.killed.swap(true, Ordering::SeqCst) {
            return; // never signal init or every process
        }
        // SAFETY: `killpg` only sends a signal; `id` is the group this module created for the hook.
        unsafe {
            libc::killpg(id, libc::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail(b"  boom\n"), "boom");
        let long = "x".repeat(1000) + "END";
        let shown = tail(long.as_bytes());
        assert!(shown.starts_with('…') && shown.ends_with("END"), "{shown}");
        assert_eq!(shown.chars().count(), STDERR_TAIL_CHARS + 1);
        assert_eq!(tail(&[0xff, b'a']), "\u{fffd}a");
    }
}

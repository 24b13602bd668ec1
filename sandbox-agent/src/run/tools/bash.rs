//! The `bash` tool: `bash -c <command>` at the workspace root, inside a bubblewrap process-level policy.
//!
//! The sandbox sees the whole file system (`--dev-bind / /`) except that every existing read-only path
//! is bind-mounted read-only, and so is the whole workspace while the sync gate is not `Done` — so the
//! read-only rules hold for processes, not just for tool names. It has its own pid namespace with its
//! own `/proc` (`--unshare-pid --proc /proc`), so a command can neither read the agent's environment
//! through `/proc/<pid>/environ` nor leave a process behind: when the namespace's first process ends,
//! the kernel kills the rest. Without bubblewrap nothing runs.
//!
//! The command gets its own process group (`process_group(0)`), stdin from `/dev/null`, and the agent's
//! environment minus its secrets (`*_API_KEY`, `*_TOKEN`, `*_SECRET`). Stdout and stderr share one pipe,
//! so they interleave as written; chunks are streamed to [`ToolContext::output`] at most
//! [`STREAM_SENDS_PER_S`] times a second. The time limit, cancellation and dropping the call all kill the
//! whole process group with SIGKILL; when the command exits, whatever it left running in its group is
//! killed too, so a stray background process can neither outlive it nor hold its output open.
//!
//! Note: `--die-with-parent` ties the sandbox to the thread that spawned it, so the command must be
//! started from a thread that outlives it (a runtime worker, not a short-lived blocking thread).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::time::Instant;

use super::{
    blocking, ceil_char_boundary, changes, floor_char_boundary, parse_input, ToolContext,
    ToolError, ToolOutput,
};
use crate::run::gate::SyncState;
use crate::run::workspace::Workspace;

/// Most chunks streamed to [`ToolContext::output`] per second.
pub const STREAM_SENDS_PER_S: u32 = 20;
/// Most bytes of one command's output streamed live; past it a notice ends the stream (the result still
/// keeps the head and tail). Bounds what a chatty command puts in the session's log.
pub const STREAM_LIMIT_BYTES: usize = 256 * 1024;
/// Environment variables whose name ends like this never reach a command (compared uppercased).
pub const SECRET_NAME_SUFFIXES: &[&str] = &["_API_KEY", "_TOKEN", "_SECRET"];
/// How long output is still read after the command exited or was killed, for what is in the pipe.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Room kept under the output cap for the truncation notice and the exit line.
const NOTICE_RESERVE_BYTES: usize = 200;
/// Bytes read from the pipe at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
struct BashInput {
    command: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// How the command ended.
enum Ending {
    /// With its status, unless waiting for it failed.
    Exited(Option<ExitStatus>),
    TimedOut,
    Cancelled,
}

pub(super) async fn bash(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: BashInput = parse_input("bash", input)?;
    let timeout_ms = match input.timeout_ms {
        Some(0) => {
            return Err(ToolError::InvalidValue {
                tool: "bash",
                field: "timeout_ms",
                reason: "must be at least 1".to_owned(),
            })
        }
        Some(timeout_ms) => timeout_ms.min(ctx.limits.bash_timeout_max_ms),
        None => ctx.limits.bash_timeout_default_ms,
    };
    let root = ctx.workspace.root().to_path_buf();
    let read_only_workspace = ctx.gate.state() != SyncState::Done;
    let (bwrap, read_only_mounts) = {
        let (workspace, rules) = (ctx.workspace.clone(), ctx.read_only_paths.clone());
        blocking(ctx, "bash", move |_| {
            let bwrap = find_program("bwrap").ok_or(ToolError::BubblewrapMissing)?;
            Ok((bwrap, read_only_mounts(&workspace, &rules)))
        })
        .await?
    };
    let before = changes::snapshot(&root).await;

    let (reader, writer) = std::io::pipe().map_err(|source| ToolError::Spawn {
        program: "pipe".to_owned(),
        source,
    })?;
    let spawn_error = |source: std::io::Error| ToolError::Spawn {
        program: bwrap.display().to_string(),
        source,
    };
    let mut command = Command::new(&bwrap);
    command
        .args(["--dev-bind", "/", "/"])
        .args(["--unshare-pid", "--proc", "/proc"]);
    if read_only_workspace {
        command.arg("--ro-bind").arg(&root).arg(&root);
    }
    for mount in &read_only_mounts {
        command.arg("--ro-bind").arg(mount).arg(mount);
    }
    command
        .arg("--die-with-parent")
        .arg("--chdir")
        .arg(&root)
        .args(["--", "bash", "-c"])
        .arg(&input.command)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(spawn_error)?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if is_secret_name(&name) {
            command.env_remove(&name);
        }
    }
    let child = command.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ToolError::BubblewrapMissing,
        _ => spawn_error(source),
    })?;
    // Our copies of the pipe's write end must go, or the output never ends.
    drop(command);
    let reader = pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(spawn_error)?;

    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let cap_bytes = ctx.limits.output_cap_bytes;
    let (ending, output) = run(ctx, child, reader, deadline, cap_bytes).await;
    match ending {
        Ending::Cancelled => Err(ToolError::Cancelled { tool: "bash" }),
        Ending::TimedOut => Err(ToolError::Timeout { timeout_ms, output }),
        Ending::Exited(status) => {
            let file_changes = match (before, changes::snapshot(&root).await) {
                (Some(before), Some(after)) => changes::changed_files(&root, &before, &after).await,
                _ => Vec::new(),
            };
            let exit = match status.map(|s| (s.code(), s.signal())) {
                Some((Some(code), _)) => format!("exit code {code}"),
                Some((None, Some(signal))) => format!("killed by signal {signal}"),
                _ => "exit status unknown".to_owned(),
            };
            let separator = if output.is_empty() || output.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            Ok(ToolOutput {
                output: format!("{output}{separator}{exit}"),
                file_changes,
            })
        }
    }
}

/// Absolute paths of the read-only paths that exist: only those can be mounted, so a read-only path
/// that does not exist yet can be created by a command (the file tools still refuse it). One that
/// escapes the workspace is not ours to mount.
fn read_only_mounts(workspace: &Workspace, rules: &[String]) -> Vec<PathBuf> {
    rules
        .iter()
        .filter_map(|rule| {
            let rule = super::normalize_rule(rule);
            if rule.is_empty() {
                return None;
            }
            let resolved = workspace.resolve(rule).ok()?;
            std::fs::symlink_metadata(&resolved.absolute).ok()?;
            Some(resolved.absolute)
        })
        .collect()
}

/// Whether an environment variable holds a secret that commands must not see.
pub fn is_secret_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy().to_ascii_uppercase();
    SECRET_NAME_SUFFIXES
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// `name` in `PATH`, if it is there and executable.
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Kills a process group with SIGKILL when asked, and when dropped unless disarmed.
struct GroupKill {
    pgid: Option<libc::pid_t>,
}

impl GroupKill {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: killpg only sends a signal; the group is the one we created for the command.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read the output until the command ended, streaming it and keeping its head and tail.
async fn run(
    ctx: &ToolContext,
    mut child: tokio::process::Child,
    mut reader: pipe::Receiver,
    deadline: Instant,
    cap_bytes: usize,
) -> (Ending, String) {
    let pgid = child.id().and_then(|id| libc::pid_t::try_from(id).ok());
    let mut group = GroupKill { pgid };
    let mut collected = HeadTail::new(cap_bytes.saturating_sub(NOTICE_RESERVE_BYTES) / 2);
    let mut stream = Stream::new(ctx.output.clone());
    let mut decoder = Utf8Decoder::default();
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    // `Some` once the command exited; `Some(None)` if waiting for it failed.
    let mut status: Option<Option<ExitStatus>> = None;
    let mut drain_until: Option<Instant> = None;
    let mut eof = false;
    let ending = loop {
        if eof && status.is_some() {
            break Ending::Exited(status.flatten());
        }
        let flush_at = stream.flush_at;
        tokio::select! {
            biased;
            () = ctx.cancel.cancelled() => {
                group.kill();
                break Ending::Cancelled;
            }
            () = tokio::time::sleep_until(deadline), if status.is_none() => {
                group.kill();
                drain(&mut reader, &mut buffer, &mut decoder, &mut collected, &mut stream).await;
                break Ending::TimedOut;
            }
            () = sleep_until_some(drain_until), if drain_until.is_some() => {
                // Exited, but something outside its group still holds the pipe: stop reading.
                break Ending::Exited(status.flatten());
            }
            read = reader.read(&mut buffer), if !eof => match read {
                Ok(0) => eof = true,
                Ok(n) => {
                    let text = decoder.push(buffer.get(..n).unwrap_or_default());
                    collected.push(&text);
                    stream.push(&text);
                }
                Err(error) => {
                    tracing::warn!(%error, "reading command output failed");
                    eof = true;
                }
            },
            waited = child.wait(), if status.is_none() => {
                // Kill what it left running, so nothing outlives it or holds the pipe open.
                group.kill();
                if let Err(error) = &waited {
                    tracing::warn!(%error, "waiting for the command failed");
                }
                status = Some(waited.ok());
                drain_until = Some(Instant::now() + DRAIN_GRACE);
            }
            () = sleep_until_some(flush_at), if flush_at.is_some() => stream.flush(),
        }
    };
    if !matches!(ending, Ending::Cancelled) {
        let rest = decoder.finish();
        collected.push(&rest);
        stream.push(&rest);
        stream.flush();
    }
    if status.is_some() {
        // Reaped and its group killed: the group id may be reused from here on.
        group.disarm();
    }
    (ending, collected.finish())
}

/// After a kill: read what is still in the pipe, for a short while.
async fn drain(
    reader: &mut pipe::Receiver,
    buffer: &mut [u8],
    decoder: &mut Utf8Decoder,
    collected: &mut HeadTail,
    stream: &mut Stream,
) {
    let until = Instant::now() + DRAIN_GRACE;
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, reader.read(buffer)).await {
        if n == 0 {
            break;
        }
        let text = decoder.push(buffer.get(..n).unwrap_or_default());
        collected.push(&text);
        stream.push(&text);
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Output chunks on their way to [`ToolContext::output`], coalesced to [`STREAM_SENDS_PER_S`].
struct Stream {
    sender: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    pending: String,
    /// Bytes streamed or pending so far.
    streamed_bytes: usize,
    last_send: Option<Instant>,
    flush_at: Option<Instant>,
}

impl Stream {
    const INTERVAL: Duration = Duration::from_millis(1000 / STREAM_SENDS_PER_S as u64);

    fn new(sender: Option<tokio::sync::mpsc::UnboundedSender<String>>) -> Self {
        Self {
            sender,
            pending: String::new(),
            streamed_bytes: 0,
            last_send: None,
            flush_at: None,
        }
    }

    fn push(&mut self, text: &str) {
        if self.sender.is_none() || text.is_empty() {
            return;
        }
        let room = STREAM_LIMIT_BYTES.saturating_sub(self.streamed_bytes);
        if text.len() > room {
            let end = super::floor_char_boundary(text, room);
            self.pending.push_str(text.get(..end).unwrap_or_default());
            self.pending.push_str(&format!(
                "\n[… live output stops here after {} KiB; the result keeps the head and tail of the rest]\n",
                STREAM_LIMIT_BYTES / 1024
            ));
            self.flush();
            self.sender = None;
            return;
        }
        self.streamed_bytes += text.len();
        self.pending.push_str(text);
        if self.flush_at.is_none() {
            let now = Instant::now();
            match self.last_send.map(|sent| sent + Self::INTERVAL) {
                Some(next) if next > now => self.flush_at = Some(next),
                _ => self.flush(),
            }
        }
    }

    fn flush(&mut self) {
        self.flush_at = None;
        if self.pending.is_empty() {
            return;
        }
        self.last_send = Some(Instant::now());
        let chunk = std::mem::take(&mut self.pending);
        if let Some(sender) = &self.sender {
            if sender.send(chunk).is_err() {
                // Nobody listens any more.
                self.sender = None;
            }
        }
    }
}

/// Bytes to text across reads: a character split between two reads is kept for the next one;
/// invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Decoder {
    carry: Vec<u8>,
}

impl Utf8Decoder {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.carry) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.carry.clear();
                    return text;
                }
                Err(error) => {
                    let valid_bytes = error.valid_up_to();
                    let valid = self.carry.get(..valid_bytes).unwrap_or_default();
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match error.error_len() {
                        None => {
                            self.carry.drain(..valid_bytes);
                            return text;
                        }
                        Some(invalid_bytes) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.carry.drain(..valid_bytes + invalid_bytes);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry.clear();
        rest
    }
}

/// The first and last `half_bytes` of a text of any length, and how long it was.
struct HeadTail {
    half_bytes: usize,
    head: String,
    tail: String,
    total_bytes: usize,
}

impl HeadTail {
    fn new(half_bytes: usize) -> Self {
        Self {
            half_bytes,
            head: String::new(),
            tail: String::new(),
            total_bytes: 0,
        }
    }

    fn push(&mut self, text: &str) {
        self.total_bytes += text.len();
        let room = self.half_bytes.saturating_sub(self.head.len());
        let split = if self.tail.is_empty() {
            floor_char_boundary(text, room)
        } else {
            0
        };
        let (to_head, to_tail) = text.split_at(split);
        self.head.push_str(to_head);
        self.tail.push_str(to_tail);
        // Trim the tail now and then, not on every push.
        if self.tail.len() > 2 * self.half_bytes.max(1024) {
            self.trim_tail();
        }
    }

    fn trim_tail(&mut self) {
        let excess = self.tail.len().saturating_sub(self.half_bytes);
        let start = ceil_char_boundary(&self.tail, excess);
        self.tail.drain(..start);
    }

    /// The whole text, or its head and tail around a notice of what was cut.
    fn finish(mut self) -> String {
        if self.head.len() + self.tail.len() == self.total_bytes
            && self.total_bytes <= 2 * self.half_bytes
        {
            return self.head + &self.tail;
        }
        self.trim_tail();
        let cut_bytes = self.total_bytes - self.head.len() - self.tail.len();
        format!(
            "{}\n[… truncated: {cut_bytes} bytes cut from the middle; redirect the output to a file and read or grep it]\n{}",
            self.head, self.tail
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_tail_keeps_both_ends() {
        let mut collected = HeadTail::new(10);
        collected.push("short");
        assert_eq!(collected.finish(), "short");

        let mut collected = HeadTail::new(10);
        for i in 0..1000 {
            collected.push(&format!("{i:04}\n"));
        }
        let text = collected.finish();
        assert!(
            text.starts_with("0000\n0001\n\n[… truncated: 4980 bytes cut from the middle"),
            "{text}"
        );
        assert!(text.ends_with("\n0998\n0999\n"), "{text}");

        let mut collected = HeadTail::new(5);
        collected.push(&"é".repeat(20));
        let text = collected.finish();
        assert!(text.starts_with("éé\n"), "{text}");
        assert!(text.ends_with("\néé"), "{text}");
    }

    #[test]
    fn decoder_joins_split_characters() {
        let mut decoder = Utf8Decoder::default();
        let bytes = "aé€".as_bytes();
        assert_eq!(decoder.push(&bytes[..2]), "a");
        assert_eq!(decoder.push(&bytes[2..4]), "é");
        assert_eq!(decoder.push(&bytes[4..]), "€");
        assert_eq!(decoder.push(&[0xff, b'x']), "\u{fffd}x");
        assert_eq!(decoder.push(&[0xe2]), "");
        assert_eq!(decoder.finish(), "\u{fffd}");
    }

    #[test]
    fn secret_names() {
        for name in [
            "ANTHROPIC_API_KEY",
            "NIGHTSHIFT_SANDBOX_TOKEN",
            "gh_token",
            "AUTH_SECRET",
        ] {
            assert!(is_secret_name(OsStr::new(name)), "{name}");
        }
        for name in [
            "PATH",
            "HOME",
            "TOKENIZER",
            "SECRETS_DIR",
            "NIGHTSHIFT_WORKSPACE",
        ] {
            assert!(!is_secret_name(OsStr::new(name)), "{name}");
        }
    }
}

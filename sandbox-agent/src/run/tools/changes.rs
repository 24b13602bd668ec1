//! Which files a command changed: `git status` (with the size and modification time of every dirty
//! path) before and after it ran, compared; line counts from `git diff --numstat HEAD`, and for files git
//! does not track from counting their lines. A workspace that is not a git repository reports nothing.
//!
//! Git runs through its CLI with `GIT_OPTIONAL_LOCKS=0`, so looking never takes the index lock from a
//! command that is running.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::SystemTime;

use nightshift_protocol::event::FileChange;
use tokio::process::Command;

use super::FileChangeRecord;

/// Paths per `git diff` call, to stay far below the argument list limit.
const DIFF_PATHS_PER_CALL: usize = 256;
/// Files larger than this are not read to count their lines.
const COUNT_LINES_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The dirty paths of a working copy at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    entries: BTreeMap<String, DirtyPath>,
}

/// One line of `git status`, with what the file looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirtyPath {
    /// The two status letters (`??` for untracked).
    status: String,
    /// Modification time and size; `None` when nothing is there.
    stamp: Option<(SystemTime, u64)>,
}

/// `git` at `root`, quiet and lock-free.
fn git(root: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(root)
        .arg("--literal-pathspecs")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Stdout of a successful git command.
async fn git_output(command: &mut Command) -> Option<Vec<u8>> {
    let output = command.output().await.ok()?;
    output.status.success().then_some(output.stdout)
}

/// The dirty paths of the working copy at `root`, or `None` if it is not a git working copy.
pub async fn snapshot(root: &Path) -> Option<Snapshot> {
    let prefix = git_output(git(root).args(["rev-parse", "--show-prefix"])).await?;
    let prefix = String::from_utf8_lossy(&prefix).trim_end().to_owned();
    let status = git_output(git(root).args([
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
        "--no-renames",
        "--",
        ".",
    ]))
    .await?;
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || parse_status(&root, &prefix, &status))
        .await
        .ok()
}

/// Porcelain v1 `-z` records, stamped with what is on disk now.
fn parse_status(root: &Path, prefix: &str, status: &[u8]) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut records = status.split(|&b| b == 0).filter(|r| !r.is_empty());
    while let Some(record) = records.next() {
        let record = String::from_utf8_lossy(record);
        let (Some(status), Some(path)) = (record.get(..2), record.get(3..)) else {
            continue;
        };
        // A rename or copy (only if `--no-renames` was ignored) carries its source as the next record.
        if status.contains(['R', 'C']) {
            records.next();
        }
        // Porcelain paths are relative to the repository root; ours to the workspace.
        let Some(relative) = path.strip_prefix(prefix) else {
            continue;
        };
        entries.insert(
            relative.to_owned(),
            DirtyPath {
                status: status.to_owned(),
                stamp: stamp(&root.join(relative)),
            },
        );
    }
    Snapshot { entries }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::symlink_metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// The files that changed between `before` and `after` (snapshots of the working copy at `root`),
/// sorted by path.
pub async fn changed_files(
    root: &Path,
    before: &Snapshot,
    after: &Snapshot,
) -> Vec<FileChangeRecord> {
    let changed = {
        let (root, before, after) = (root.to_path_buf(), before.clone(), after.clone());
        tokio::task::spawn_blocking(move || classify(&root, &before, &after))
            .await
            .unwrap_or_default()
    };
    if changed.is_empty() {
        return Vec::new();
    }

    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let has_head = git_output(git(root).args(["rev-parse", "--verify", "--quiet", "HEAD"]))
        .await
        .is_some();
    if has_head {
        for chunk in changed.chunks(DIFF_PATHS_PER_CALL) {
            let mut command = git(root);
            command.args([
                "diff",
                "--numstat",
                "-z",
                "--no-renames",
                "--relative",
                "HEAD",
                "--",
            ]);
            command.args(chunk.iter().map(|(path, _)| path));
            if let Some(numstat) = git_output(&mut command).await {
                counts.extend(parse_numstat(&numstat));
            }
        }
    }
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        changed
            .into_iter()
            .map(|(path, change)| {
                let (additions, deletions) = match counts.get(&path) {
                    Some(&counts) => counts,
                    // Untracked (or no commit yet): every line of what is there now is new.
                    None if change != FileChange::Deleted => (count_lines(&root.join(&path)), 0),
                    None => (0, 0),
                };
                FileChangeRecord {
                    path,
                    change,
                    additions,
                    deletions,
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Each path whose status or stamp differs, with what happened to it.
fn classify(root: &Path, before: &Snapshot, after: &Snapshot) -> Vec<(String, FileChange)> {
    let paths: BTreeSet<&String> = before.entries.keys().chain(after.entries.keys()).collect();
    let mut changed = Vec::new();
    for path in paths {
        let (old, new) = (before.entries.get(path), after.entries.get(path));
        if old == new {
            continue;
        }
        let exists_now = std::fs::symlink_metadata(root.join(path)).is_ok();
        // Not dirty before: tracked and unchanged (so it existed), unless it is untracked now.
        let existed = match old {
            Some(old) => old.stamp.is_some(),
            None => new.is_none_or(|new| new.status != "??"),
        };
        let change = match (existed, exists_now) {
            (false, true) => FileChange::Added,
            (true, true) => FileChange::Modified,
            (true, false) => FileChange::Deleted,
            (false, false) => continue,
        };
        changed.push((path.clone(), change));
    }
    changed
}

/// `added\tdeleted\tpath\0` records (`-` for binary files, counted as 0).
fn parse_numstat(numstat: &[u8]) -> Vec<(String, (u64, u64))> {
    numstat
        .split(|&b| b == 0)
        .filter_map(|record| {
            let record = String::from_utf8_lossy(record);
            let mut fields = record.splitn(3, '\t');
            let additions = fields.next()?.parse().unwrap_or(0);
            let deletions = fields.next()?.parse().unwrap_or(0);
            let path = fields.next()?.to_owned();
            Some((path, (additions, deletions)))
        })
        .collect()
}

/// Lines of a text file (a last line without `\n` counts); 0 for binary, huge or unreadable files.
fn count_lines(path: &Path) -> u64 {
    let Ok(metadata) = std::fs::metadata(path) else {
        return 0;
    };
    if !metadata.is_file() || metadata.len() > COUNT_LINES_MAX_BYTES {
        return 0;
    }
    let mut bytes = Vec::new();
    let Ok(_) = std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) else {
        return 0;
    };
    if bytes.contains(&0) {
        return 0;
    }
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    newlines + u64::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))
}

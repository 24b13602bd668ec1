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

use super::{capped_diff, FileChangeRecord};

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

/// `git diff <format> --no-renames --relative HEAD -- <paths>`.
fn diff_head<'a>(root: &Path, format: &[&str], paths: impl Iterator<Item = &'a String>) -> Command {
    let mut command = git(root);
    command
        .arg("diff")
        .args(format)
        .args(["--no-renames", "--relative", "HEAD", "--"])
        .args(paths);
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
    let mut diffs: BTreeMap<String, String> = BTreeMap::new();
    let has_head = git_output(git(root).args(["rev-parse", "--verify", "--quiet", "HEAD"]))
        .await
        .is_some();
    if has_head {
        for chunk in changed.chunks(DIFF_PATHS_PER_CALL) {
            let paths = || chunk.iter().map(|(path, _)| path);
            if let Some(numstat) =
                git_output(&mut diff_head(root, &["--numstat", "-z"], paths())).await
            {
                counts.extend(parse_numstat(&numstat));
            }
            let patch = &["--no-color", "--no-ext-diff"];
            if let Some(patch) = git_output(&mut diff_head(root, patch, paths())).await {
                diffs.extend(split_patch(&String::from_utf8_lossy(&patch)));
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
                let diff = diffs.remove(&path).and_then(capped_diff);
                FileChangeRecord {
                    path,
                    change,
                    additions,
                    deletions,
                    diff,
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The per-file diffs of a `git diff` patch, by path: each runs from its `diff --git` line to the next.
/// The path is taken from the `--- a/…` or `+++ b/…` line (a deleted file has only the first); files
/// without one (binary files, mode changes only) and quoted (unusual) paths are left out.
fn split_patch(patch: &str) -> BTreeMap<String, String> {
    let mut diffs = BTreeMap::new();
    let mut blocks: Vec<&str> = Vec::new();
    let mut start = None;
    for (offset, _) in patch.match_indices("diff --git ") {
        if offset == 0 || patch.as_bytes()[offset - 1] == b'\n' {
            if let Some(begin) = start {
                blocks.push(&patch[begin..offset]);
            }
            start = Some(offset);
        }
    }
    if let Some(begin) = start {
        blocks.push(&patch[begin..]);
    }
    for block in blocks {
        let header = block.split("\n@@").next().unwrap_or(block);
        let path = header.lines().find_map(|line| {
            line.strip_prefix("+++ b/")
                .or_else(|| line.strip_prefix("--- a/"))
        });
        if let Some(path) = path {
            diffs.insert(path.to_owned(), block.to_owned());
        }
    }
    diffs
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

#[cfg(test)]
mod tests {
    use super::split_patch;
    use crate::run::tools::{capped_diff, MAX_DIFF_BYTES};

    #[test]
    fn a_patch_splits_into_one_diff_per_file() {
        let patch = "diff --git a/a.rs b/a.rs\nindex 1..2 100644\n--- a/a.rs\n+++ b/a.rs\n@@ -1 +1 @@\n-x\n+diff --git a/not b/a-header\n\
                     diff --git a/gone.txt b/gone.txt\ndeleted file mode 100644\n--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n\
                     diff --git a/logo.png b/logo.png\nBinary files a/logo.png and b/logo.png differ\n";
        let diffs = split_patch(patch);
        assert_eq!(
            diffs.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a.rs", "gone.txt"],
            "binary files have no diff"
        );
        assert_eq!(
            diffs["a.rs"],
            "diff --git a/a.rs b/a.rs\nindex 1..2 100644\n--- a/a.rs\n+++ b/a.rs\n@@ -1 +1 @@\n-x\n+diff --git a/not b/a-header\n"
        );
        assert!(diffs["gone.txt"].ends_with("-bye\n"));
        assert!(split_patch("").is_empty());
    }

    #[test]
    fn long_diffs_are_cut_at_a_line_with_a_note() {
        assert_eq!(capped_diff(String::new()), None);
        assert_eq!(capped_diff("+a\n".into()).as_deref(), Some("+a\n"));
        let line = "+é123456789\n";
        let long = line.repeat(MAX_DIFF_BYTES / line.len() + 10);
        let cut = capped_diff(long.clone()).unwrap();
        assert!(cut.len() <= MAX_DIFF_BYTES + 64);
        let (kept, note) = cut.rsplit_once("\\ diff truncated: ").unwrap();
        assert!(kept.ends_with('\n') && long.starts_with(kept));
        assert_eq!(note, format!("{} more bytes\n", long.len() - kept.len()));
    }
}

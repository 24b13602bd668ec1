//! The search tools: `list_files`, `glob` and `grep`, built on ripgrep's crates — `ignore` walks the
//! tree the way git sees it (.gitignore, .git/info/exclude, the global excludes; hidden files included,
//! `.git` left out, symlinks listed but never followed), `globset` matches globs, `grep-searcher` with
//! `grep-regex` searches contents. Output is sorted, so the same tree always gives the same answer.

use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use grep_regex::RegexMatcherBuilder;
use grep_searcher::sinks::Lossy;
use grep_searcher::{BinaryDetection, SearcherBuilder};
use ignore::WalkBuilder;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{blocking, cap_head, io_error, parse_input, ToolContext, ToolError, ToolOutput};
use crate::run::workspace::{ResolvedPath, Workspace};

/// Most entries a walk visits before it stops (the output is capped long before; this bounds the work).
const WALK_MAX_ENTRIES: usize = 200_000;
/// `grep` matches returned when the model names no `max_results`.
const GREP_DEFAULT_RESULTS: usize = 100;
/// Longer matching lines are cut in `grep` output.
const GREP_LINE_MAX_BYTES: usize = 500;

/// A gitignore-aware walk of `root`, siblings sorted by name, `.git` left out.
fn walk(root: &Path, max_depth: Option<usize>) -> ignore::Walk {
    let mut builder = WalkBuilder::new(root);
    builder
        .hidden(false)
        .follow_links(false)
        .max_depth(max_depth)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|entry| entry.file_name() != ".git");
    builder.build()
}

/// `path` below `base`, `/`-separated.
fn relative_to(base: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(base).ok()?;
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    Some(parts.join("/"))
}

/// `relative` (below a searched directory) as a workspace-relative path.
fn join_relative(base: &ResolvedPath, relative: &str) -> String {
    if base.relative.is_empty() {
        relative.to_owned()
    } else {
        format!("{}/{relative}", base.relative)
    }
}

/// Resolve `path` and check it is a directory.
fn resolve_dir(workspace: &Workspace, path: &str) -> Result<ResolvedPath, ToolError> {
    let resolved = workspace.resolve(path)?;
    let metadata = std::fs::metadata(&resolved.absolute).map_err(|e| io_error(path, e))?;
    if !metadata.is_dir() {
        return Err(ToolError::NotDirectory {
            path: path.to_owned(),
        });
    }
    Ok(resolved)
}

/// The files under `base` (workspace-relative path → absolute path), sorted by path; only regular
/// files, no symlinks.
fn files_under(
    base: &ResolvedPath,
    tool: &'static str,
    cancel: &CancellationToken,
) -> Result<(Vec<(String, std::path::PathBuf)>, bool), ToolError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // A parallel walk (the result is sorted afterwards, so visiting order does not matter).
    let files = std::sync::Mutex::new(Vec::new());
    let visited = AtomicUsize::new(0);
    let stopped = AtomicBool::new(false);
    let mut builder = WalkBuilder::new(&base.absolute);
    builder
        .hidden(false)
        .follow_links(false)
        .threads(search_threads())
        .filter_entry(|entry| entry.file_name() != ".git");
    builder.build_parallel().run(|| {
        Box::new(|entry| {
            if cancel.is_cancelled() {
                return ignore::WalkState::Quit;
            }
            if visited.fetch_add(1, Ordering::Relaxed) >= WALK_MAX_ENTRIES {
                stopped.store(true, Ordering::Relaxed);
                return ignore::WalkState::Quit;
            }
            let Ok(entry) = entry else {
                return ignore::WalkState::Continue;
            };
            if entry.file_type().is_some_and(|t| t.is_file()) {
                if let Some(relative) = relative_to(&base.absolute, entry.path()) {
                    if let Ok(mut files) = files.lock() {
                        files.push((relative, entry.into_path()));
                    }
                }
            }
            ignore::WalkState::Continue
        })
    });
    if cancel.is_cancelled() {
        return Err(ToolError::Cancelled { tool });
    }
    let mut files = files
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    files.sort();
    Ok((files, stopped.into_inner()))
}

/// Threads for walking and searching: the machine's parallelism, at most 8.
fn search_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

/// Files searched per unit of work in [`search_in_order`].
const SEARCH_CHUNK_FILES: usize = 128;

/// Search `files` (sorted) on [`search_threads`] threads and return the matching lines in file order,
/// at most `limit` of them: chunks of files are taken in order, and no new chunk is started once the
/// finished ones hold more than `limit` lines, so the result is exactly the first `limit` matches.
fn search_in_order(
    files: &[(String, std::path::PathBuf)],
    matcher: &grep_regex::RegexMatcher,
    limit: usize,
    cancel: &CancellationToken,
) -> Vec<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let chunks: Vec<&[(String, std::path::PathBuf)]> = files.chunks(SEARCH_CHUNK_FILES).collect();
    let results: Vec<std::sync::Mutex<Vec<String>>> = chunks
        .iter()
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    let next = AtomicUsize::new(0);
    let found = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..search_threads().min(chunks.len()) {
            scope.spawn(|| {
                let mut searcher = SearcherBuilder::new()
                    .binary_detection(BinaryDetection::quit(0))
                    .line_number(true)
                    .build();
                loop {
                    if cancel.is_cancelled() || found.load(Ordering::Relaxed) > limit {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let (Some(chunk), Some(slot)) = (chunks.get(index), results.get(index)) else {
                        return;
                    };
                    let mut lines = Vec::new();
                    for (relative, absolute) in *chunk {
                        if lines.len() > limit {
                            break;
                        }
                        let sink = Lossy(|line_number, line| {
                            lines.push(format!("{relative}:{line_number}:{}", cut_line(line)));
                            Ok(lines.len() <= limit)
                        });
                        // An unreadable file is skipped, as ripgrep does.
                        if let Err(error) = searcher.search_path(matcher, absolute, sink) {
                            tracing::debug!(path = %relative, %error, "grep skipped a file");
                        }
                    }
                    found.fetch_add(lines.len(), Ordering::Relaxed);
                    if let Ok(mut slot) = slot.lock() {
                        *slot = lines;
                    }
                }
            });
        }
    });
    let mut merged = Vec::new();
    for slot in results {
        if merged.len() > limit {
            break;
        }
        merged.extend(
            slot.into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
    }
    merged
}

fn walk_stopped_notice() -> String {
    format!("\n[walk stopped after {WALK_MAX_ENTRIES} entries; search a subdirectory]")
}

#[derive(Deserialize)]
struct ListFilesInput {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    depth: Option<usize>,
}

pub(super) async fn list_files(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: ListFilesInput = parse_input("list_files", input)?;
    if input.depth == Some(0) {
        return Err(ToolError::InvalidValue {
            tool: "list_files",
            field: "depth",
            reason: "must be at least 1".to_owned(),
        });
    }
    let workspace = ctx.workspace.clone();
    let cap_bytes = ctx.limits.output_cap_bytes;
    blocking(ctx, "list_files", move |cancel| {
        let path = input.path.unwrap_or_default();
        let base = resolve_dir(&workspace, &path)?;
        let mut entries = Vec::new();
        let mut stopped = false;
        for (visited, entry) in walk(&base.absolute, input.depth).enumerate() {
            if cancel.is_cancelled() {
                return Err(ToolError::Cancelled { tool: "list_files" });
            }
            if visited >= WALK_MAX_ENTRIES {
                stopped = true;
                break;
            }
            let Ok(entry) = entry else { continue };
            if entry.depth() == 0 {
                continue;
            }
            let Some(relative) = relative_to(&base.absolute, entry.path()) else {
                continue;
            };
            if entry.file_type().is_some_and(|t| t.is_dir()) {
                entries.push(format!("{relative}/"));
            } else {
                entries.push(relative);
            }
        }
        let mut output = if entries.is_empty() {
            "(empty directory)".to_owned()
        } else {
            entries.join("\n")
        };
        if stopped {
            output.push_str(&walk_stopped_notice());
        }
        Ok(ToolOutput::text(cap_head(
            &output,
            cap_bytes,
            "list a subdirectory or pass a smaller depth",
        )))
    })
    .await
}

fn compile_glob(pattern: &str) -> Result<GlobMatcher, ToolError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|glob| glob.compile_matcher())
        .map_err(|source| ToolError::InvalidGlob {
            pattern: pattern.to_owned(),
            source,
        })
}

#[derive(Deserialize)]
struct GlobInput {
    pattern: String,
    #[serde(default)]
    path: Option<String>,
}

pub(super) async fn glob(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: GlobInput = parse_input("glob", input)?;
    let matcher = compile_glob(&input.pattern)?;
    let workspace = ctx.workspace.clone();
    let cap_bytes = ctx.limits.output_cap_bytes;
    blocking(ctx, "glob", move |cancel| {
        let base = resolve_dir(&workspace, &input.path.unwrap_or_default())?;
        let (files, stopped) = files_under(&base, "glob", &cancel)?;
        let matches: Vec<String> = files
            .iter()
            .filter(|(relative, _)| matcher.is_match(relative))
            .map(|(relative, _)| join_relative(&base, relative))
            .collect();
        let mut output = if matches.is_empty() {
            format!("no files match `{}`", input.pattern)
        } else {
            matches.join("\n")
        };
        if stopped {
            output.push_str(&walk_stopped_notice());
        }
        Ok(ToolOutput::text(cap_head(
            &output,
            cap_bytes,
            "narrow the pattern or the path",
        )))
    })
    .await
}

#[derive(Deserialize)]
struct GrepInput {
    pattern: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    glob: Option<String>,
    #[serde(default)]
    case_insensitive: bool,
    #[serde(default)]
    max_results: Option<usize>,
}

pub(super) async fn grep(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: GrepInput = parse_input("grep", input)?;
    let max_results = input.max_results.unwrap_or(GREP_DEFAULT_RESULTS);
    if max_results == 0 {
        return Err(ToolError::InvalidValue {
            tool: "grep",
            field: "max_results",
            reason: "must be at least 1".to_owned(),
        });
    }
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(input.case_insensitive)
        .line_terminator(Some(b'\n'))
        .build(&input.pattern)
        .map_err(|source| ToolError::InvalidRegex {
            pattern: input.pattern.clone(),
            source,
        })?;
    // Without a `/` a glob names files (`*.rs`), with one it names paths below the searched directory.
    let file_filter = match &input.glob {
        Some(glob) => Some((compile_glob(glob)?, glob.contains('/'))),
        None => None,
    };
    let workspace = ctx.workspace.clone();
    let cap_bytes = ctx.limits.output_cap_bytes;
    blocking(ctx, "grep", move |cancel| {
        let path = input.path.unwrap_or_default();
        let resolved = workspace.resolve(&path)?;
        let metadata = std::fs::metadata(&resolved.absolute).map_err(|e| io_error(&path, e))?;
        let (files, stopped) = if metadata.is_dir() {
            let (files, stopped) = files_under(&resolved, "grep", &cancel)?;
            let files = files
                .into_iter()
                .filter(|(relative, _)| match &file_filter {
                    None => true,
                    Some((glob, true)) => glob.is_match(relative),
                    Some((glob, false)) => {
                        let name = relative.rsplit('/').next().unwrap_or(relative);
                        glob.is_match(name)
                    }
                })
                .map(|(relative, absolute)| (join_relative(&resolved, &relative), absolute))
                .collect();
            (files, stopped)
        } else {
            (vec![(resolved.relative.clone(), resolved.absolute.clone())], false)
        };

        // One match more than asked for tells whether there are more.
        let mut results = search_in_order(&files, &matcher, max_results, &cancel);
        if cancel.is_cancelled() {
            return Err(ToolError::Cancelled { tool: "grep" });
        }
        let more = results.len() > max_results;
        results.truncate(max_results);
        let mut output = if results.is_empty() {
            format!("no matches for `{}`", input.pattern)
        } else {
            results.join("\n")
        };
        if more {
            output.push_str(&format!(
                "\n[more matches: stopped at max_results={max_results} matching lines; narrow the pattern or path, or raise max_results]"
            ));
        }
        if stopped {
            output.push_str(&walk_stopped_notice());
        }
        Ok(ToolOutput::text(cap_head(
            &output,
            cap_bytes,
            "narrow the pattern or path, or lower max_results",
        )))
    })
    .await
}

/// A matching line without its line break, cut at [`GREP_LINE_MAX_BYTES`].
fn cut_line(line: &str) -> String {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.len() <= GREP_LINE_MAX_BYTES {
        return line.to_owned();
    }
    let end = super::floor_char_boundary(line, GREP_LINE_MAX_BYTES);
    format!(
        "{} [… line cut: {} more bytes]",
        line.get(..end).unwrap_or_default(),
        line.len() - end
    )
}

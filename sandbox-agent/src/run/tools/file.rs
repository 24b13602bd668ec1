//! The file tools: `read_file` (numbered lines, ranges, streaming so a huge file costs only what is
//! shown), `write_file` and `edit_file` (exact replacement, answered with a unified diff).

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::time::Duration;

use nightshift_protocol::event::FileChange;
use serde::Deserialize;
use serde_json::Value;
use similar::{ChangeTag, TextDiff};

use super::{
    blocking, capped_diff, check_writable, io_error, parse_input, truncation_notice,
    FileChangeRecord, ToolContext, ToolError, ToolOutput,
};

/// How much of a file is inspected for NUL bytes to call it binary (git looks at as much).
const BINARY_SNIFF_BYTES: usize = 8000;
/// Longer lines are cut in `read_file` output.
const LINE_MAX_BYTES: usize = 4000;
/// Room kept free under the output cap for the truncation notice.
const NOTICE_RESERVE_BYTES: usize = 160;
/// How long a line diff may take before `similar` settles for a coarser one.
const DIFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Unchanged lines around each hunk of a diff.
const DIFF_CONTEXT_LINES: usize = 3;
/// Cancellation is checked every this many lines.
const CANCEL_CHECK_LINES: u64 = 4096;

#[derive(Deserialize)]
struct ReadFileInput {
    path: String,
    #[serde(default)]
    offset_line: Option<u64>,
    #[serde(default)]
    limit_lines: Option<u64>,
}

pub(super) async fn read_file(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: ReadFileInput = parse_input("read_file", input)?;
    for (field, value) in [
        ("offset_line", input.offset_line),
        ("limit_lines", input.limit_lines),
    ] {
        if value == Some(0) {
            return Err(ToolError::InvalidValue {
                tool: "read_file",
                field,
                reason: "must be at least 1".to_owned(),
            });
        }
    }
    let workspace = ctx.workspace.clone();
    let cap_bytes = ctx.limits.output_cap_bytes;
    blocking(ctx, "read_file", move |cancel| {
        let resolved = workspace.resolve(&input.path)?;
        let path = input.path.as_str();
        let file = File::open(&resolved.absolute).map_err(|e| io_error(path, e))?;
        let metadata = file.metadata().map_err(|e| io_error(path, e))?;
        if metadata.is_dir() {
            return Err(ToolError::IsDirectory {
                path: path.to_owned(),
            });
        }
        let size_bytes = metadata.len();
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let head = reader.fill_buf().map_err(|e| io_error(path, e))?;
        if head.iter().take(BINARY_SNIFF_BYTES).any(|&b| b == 0) {
            return Err(ToolError::Binary {
                path: path.to_owned(),
                size_bytes,
            });
        }
        let offset_line = input.offset_line.unwrap_or(1);
        let limit_lines = input.limit_lines.unwrap_or(u64::MAX);
        let budget_bytes = cap_bytes.saturating_sub(NOTICE_RESERVE_BYTES);
        let mut output = String::new();
        let mut line = Vec::new();
        let mut line_number = 0u64;
        let mut shown_lines = 0u64;
        let mut consumed_bytes = 0u64;
        loop {
            let (line_bytes, ended) = read_line_capped(&mut reader, &mut line, LINE_MAX_BYTES)
                .map_err(|e| io_error(path, e))?;
            if line_bytes == 0 {
                break;
            }
            line_number += 1;
            if line_number.is_multiple_of(CANCEL_CHECK_LINES) && cancel.is_cancelled() {
                return Err(ToolError::Cancelled { tool: "read_file" });
            }
            if line_number < offset_line {
                consumed_bytes += line_bytes;
                continue;
            }
            if shown_lines >= limit_lines {
                break;
            }
            let rendered = render_line(line_number, &line, line_bytes, ended);
            if shown_lines > 0 && output.len() + rendered.len() > budget_bytes {
                let remaining_bytes = size_bytes.saturating_sub(consumed_bytes);
                output.push_str(&truncation_notice(
                    usize::try_from(remaining_bytes).unwrap_or(usize::MAX),
                    &format!("read on with offset_line={line_number}"),
                ));
                return Ok(output);
            }
            output.push_str(&rendered);
            consumed_bytes += line_bytes;
            shown_lines += 1;
        }
        if line_number == 0 {
            return Ok("(empty file)".to_owned());
        }
        if shown_lines == 0 {
            return Ok(format!(
                "(the file has {line_number} lines; offset_line {offset_line} is past the end)"
            ));
        }
        Ok(output)
    })
    .await
    .map(ToolOutput::text)
}

/// Read one line (up to and including `\n`) into `line`, keeping at most `max_bytes` of it. Returns the
/// bytes the line really had (0 at the end of the file) and whether it ended with `\n`.
fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max_bytes: usize,
) -> std::io::Result<(u64, bool)> {
    line.clear();
    let mut total_bytes = 0u64;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            return Ok((total_bytes, false));
        }
        let (take, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        let room = max_bytes.saturating_sub(line.len());
        line.extend_from_slice(available.get(..take.min(room)).unwrap_or_default());
        reader.consume(take);
        total_bytes += take as u64;
        if ended {
            return Ok((total_bytes, true));
        }
    }
}

/// One line as `cat -n` shows it; a line cut at [`LINE_MAX_BYTES`] says how much is missing.
fn render_line(number: u64, kept: &[u8], line_bytes: u64, ended: bool) -> String {
    let content_bytes = line_bytes - u64::from(ended);
    let kept = kept.strip_suffix(b"\n").unwrap_or(kept);
    let missing_bytes = content_bytes.saturating_sub(kept.len() as u64);
    let kept = kept.strip_suffix(b"\r").unwrap_or(kept);
    let mut rendered = format!("{number:>6}\t{}", String::from_utf8_lossy(kept));
    if missing_bytes > 0 {
        rendered.push_str(&format!(" [… line cut: {missing_bytes} more bytes]"));
    }
    rendered.push('\n');
    rendered
}

#[derive(Deserialize)]
struct WriteFileInput {
    path: String,
    content: String,
}

pub(super) async fn write_file(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: WriteFileInput = parse_input("write_file", input)?;
    let workspace = ctx.workspace.clone();
    let rules = ctx.read_only_paths.clone();
    blocking(ctx, "write_file", move |_| {
        let path = input.path.as_str();
        let resolved = workspace.resolve(path)?;
        if resolved.relative.is_empty() {
            return Err(ToolError::IsDirectory {
                path: path.to_owned(),
            });
        }
        check_writable(&rules, &resolved, path)?;
        let old = match std::fs::read(&resolved.absolute) {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(error) if error.kind() == ErrorKind::NotFound => None,
            Err(error) => return Err(io_error(path, error)),
        };
        if let Some(parent) = resolved.absolute.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error(path, e))?;
        }
        std::fs::write(&resolved.absolute, &input.content).map_err(|e| io_error(path, e))?;

        let size_bytes = input.content.len();
        if old.as_deref() == Some(input.content.as_str()) {
            return Ok(ToolOutput::text(format!(
                "{} is unchanged ({size_bytes} bytes)",
                resolved.relative
            )));
        }
        let (change, (additions, deletions)) = match &old {
            None => (FileChange::Added, line_changes("", &input.content)),
            Some(old) => (FileChange::Modified, line_changes(old, &input.content)),
        };
        let binary = |text: &str| text.bytes().take(BINARY_SNIFF_BYTES).any(|b| b == 0);
        let diff = if binary(&input.content) || old.as_deref().is_some_and(binary) {
            None
        } else {
            let relative = &resolved.relative;
            let old_name = match old {
                Some(_) => format!("a/{relative}"),
                None => "/dev/null".to_owned(),
            };
            unified_diff(
                old.as_deref().unwrap_or(""),
                &input.content,
                &old_name,
                &format!("b/{relative}"),
            )
        };
        Ok(ToolOutput {
            output: format!(
                "wrote {size_bytes} bytes to {} (+{additions} -{deletions})",
                resolved.relative
            ),
            file_changes: vec![FileChangeRecord {
                path: resolved.relative,
                change,
                additions,
                deletions,
                diff,
            }],
        })
    })
    .await
}

#[derive(Deserialize)]
struct EditFileInput {
    path: String,
    old_text: String,
    new_text: String,
    #[serde(default)]
    replace_all: bool,
}

pub(super) async fn edit_file(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: EditFileInput = parse_input("edit_file", input)?;
    if input.old_text.is_empty() {
        return Err(ToolError::InvalidValue {
            tool: "edit_file",
            field: "old_text",
            reason: "must not be empty; use write_file to create a file".to_owned(),
        });
    }
    if input.old_text == input.new_text {
        return Err(ToolError::InvalidValue {
            tool: "edit_file",
            field: "new_text",
            reason: "is the same as old_text, so there is nothing to change".to_owned(),
        });
    }
    let workspace = ctx.workspace.clone();
    let rules = ctx.read_only_paths.clone();
    blocking(ctx, "edit_file", move |_| {
        let path = input.path.as_str();
        let resolved = workspace.resolve(path)?;
        check_writable(&rules, &resolved, path)?;
        let bytes = std::fs::read(&resolved.absolute).map_err(|e| io_error(path, e))?;
        let size_bytes = bytes.len() as u64;
        let binary = || ToolError::Binary {
            path: path.to_owned(),
            size_bytes,
        };
        if bytes.iter().take(BINARY_SNIFF_BYTES).any(|&b| b == 0) {
            return Err(binary());
        }
        let old = String::from_utf8(bytes).map_err(|_| binary())?;
        let count = old.matches(input.old_text.as_str()).count();
        if count == 0 {
            return Err(ToolError::NoMatch {
                path: path.to_owned(),
                hint: no_match_hint(&old, &input.old_text).to_owned(),
            });
        }
        if count > 1 && !input.replace_all {
            return Err(ToolError::AmbiguousMatch {
                path: path.to_owned(),
                count,
            });
        }
        let new = old.replace(input.old_text.as_str(), &input.new_text);
        std::fs::write(&resolved.absolute, &new).map_err(|e| io_error(path, e))?;

        let relative = resolved.relative;
        let diff = TextDiff::configure()
            .timeout(DIFF_TIMEOUT)
            .diff_lines(old.as_str(), new.as_str());
        let (additions, deletions) = count_changes(&diff);
        let unified = diff
            .unified_diff()
            .context_radius(DIFF_CONTEXT_LINES)
            .header(&format!("a/{relative}"), &format!("b/{relative}"))
            .to_string();
        let replacements = if count == 1 {
            "1 replacement".to_owned()
        } else {
            format!("{count} replacements")
        };
        Ok(ToolOutput {
            output: format!(
                "edited {relative}: {replacements} (+{additions} -{deletions})\n{unified}"
            ),
            file_changes: vec![FileChangeRecord {
                path: relative,
                change: FileChange::Modified,
                additions,
                deletions,
                diff: capped_diff(unified.clone()),
            }],
        })
    })
    .await
}

/// Why `old_text` probably did not match `content`.
fn no_match_hint(content: &str, old_text: &str) -> &'static str {
    let squeeze = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let numbered = old_text.lines().any(|line| {
        let line = line.trim_start();
        line.split_once('\t').is_some_and(|(number, _)| {
            !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
        })
    });
    if numbered {
        "old_text seems to contain read_file's line numbers; leave out the number and the tab before each line"
    } else if content.contains("\r\n") && old_text.contains('\n') && !old_text.contains("\r\n") {
        "the file has CRLF (\\r\\n) line endings; old_text must have them too"
    } else if squeeze(content).contains(&squeeze(old_text)) {
        "the text is there with different whitespace or indentation; copy it exactly as read_file shows it"
    } else {
        "read the file again and copy old_text exactly, including whitespace and line breaks"
    }
}

/// Lines added and removed by a line diff.
fn count_changes<'a>(diff: &TextDiff<'a, 'a, 'a, str>) -> (u64, u64) {
    diff.iter_all_changes()
        .fold((0, 0), |(additions, deletions), change| {
            match change.tag() {
                ChangeTag::Insert => (additions + 1, deletions),
                ChangeTag::Delete => (additions, deletions + 1),
                ChangeTag::Equal => (additions, deletions),
            }
        })
}

/// The unified diff from `old` to `new` under the given file names, capped for a `file_changed` event.
fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> Option<String> {
    let diff = TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(old, new);
    capped_diff(
        diff.unified_diff()
            .context_radius(DIFF_CONTEXT_LINES)
            .header(old_name, new_name)
            .to_string(),
    )
}

/// Lines added and removed between `old` and `new`, by a line diff.
pub fn line_changes(old: &str, new: &str) -> (u64, u64) {
    let diff = TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(old, new);
    count_changes(&diff)
}

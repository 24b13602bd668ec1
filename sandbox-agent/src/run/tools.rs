//! The tools the model may call. Each is defined once, in [`TOOLS`]: name, description, input schema and
//! executor; both the `tools` array of every model request and the tool list of the system prompt are
//! generated from that table.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;

use nightshift_protocol::event::FileChange;
use serde::Deserialize;
use serde_json::{json, Value};

use super::workspace::Workspace;

/// Most entries `list_files` returns.
const LIST_LIMIT_ENTRIES: usize = 2000;
/// Most bytes of file content `read_file` returns.
const READ_LIMIT_BYTES: usize = 100 * 1024;
/// Larger files are refused by `read_file`.
const READ_FILE_MAX_BYTES: u64 = 32 * 1024 * 1024;
/// How much of a file is inspected for NUL bytes to call it binary.
const BINARY_SNIFF_BYTES: usize = 8 * 1024;

/// Why a tool call failed; the text goes back to the model as an `is_error` result.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The model named a tool we do not have.
    #[error("unknown tool `{name}`")]
    UnknownTool {
        /// The name given.
        name: String,
    },
    /// The input does not match the tool's schema.
    #[error("invalid input for `{tool}`: {source}")]
    InvalidInput {
        /// Tool name.
        tool: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The path is absolute, leaves the workspace, or goes through a symlink that does.
    #[error("path `{path}` is outside the workspace")]
    PathEscape {
        /// The path given.
        path: String,
    },
    /// The path is inside the repository's `.git` directory.
    #[error("path `{path}` is inside .git, which tools never touch")]
    GitDir {
        /// The path given.
        path: String,
    },
    /// Nothing at that path.
    #[error("no such file or directory: `{path}`")]
    NotFound {
        /// The path given.
        path: String,
    },
    /// A file was expected.
    #[error("`{path}` is a directory, not a file")]
    IsDirectory {
        /// The path given.
        path: String,
    },
    /// A directory was expected.
    #[error("`{path}` is not a directory")]
    NotDirectory {
        /// The path given.
        path: String,
    },
    /// The file is not UTF-8 text.
    #[error("`{path}` is a binary file")]
    Binary {
        /// The path given.
        path: String,
    },
    /// The file is too large to read.
    #[error(
        "`{path}` has {size_bytes} bytes, more than read_file accepts ({READ_FILE_MAX_BYTES})"
    )]
    TooLarge {
        /// The path given.
        path: String,
        /// Its size.
        size_bytes: u64,
    },
    /// A line range that makes no sense.
    #[error("invalid line range {start_line}..={end_line}")]
    LineRange {
        /// First line asked for.
        start_line: u64,
        /// Last line asked for.
        end_line: u64,
    },
    /// Another file system failure.
    #[error("i/o error on `{path}`: {source}")]
    Io {
        /// The path given.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A file a tool changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChangeRecord {
    /// Relative, `/`-separated path.
    pub path: String,
    /// Added or modified.
    pub change: FileChange,
    /// Lines added.
    pub additions: u64,
    /// Lines removed.
    pub deletions: u64,
}

/// What a successful tool call produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// Text for the model (and the `tool_result` event).
    pub output: String,
    /// The file it changed, if any.
    pub file_change: Option<FileChangeRecord>,
}

impl ToolOutput {
    fn text(output: String) -> Self {
        Self {
            output,
            file_change: None,
        }
    }
}

/// One tool: everything about it in one place.
pub struct Tool {
    /// Name the model calls it by.
    pub name: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// JSON schema of its input.
    pub input_schema: fn() -> Value,
    /// Runs it (blocking file I/O: call from a blocking thread).
    pub execute: fn(&Workspace, Value) -> Result<ToolOutput, ToolError>,
}

/// Every tool.
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "list_files",
        description: "List files and directories under a directory of the workspace, recursively, sorted. \
                      Directories end with `/`. `.git` is skipped.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Directory relative to the workspace root; default the root."}
                }
            })
        },
        execute: list_files,
    },
    Tool {
        name: "read_file",
        description: "Read a UTF-8 text file of the workspace, optionally only lines start_line..=end_line (1-based).",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path relative to the workspace root."},
                    "start_line": {"type": "integer", "minimum": 1, "description": "First line to return (1-based)."},
                    "end_line": {"type": "integer", "minimum": 1, "description": "Last line to return (inclusive)."}
                },
                "required": ["path"]
            })
        },
        execute: read_file,
    },
    Tool {
        name: "write_file",
        description: "Create or replace a file of the workspace with the given content; parent directories are created.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path relative to the workspace root."},
                    "content": {"type": "string", "description": "The complete new content of the file."}
                },
                "required": ["path", "content"]
            })
        },
        execute: write_file,
    },
];

/// Find a tool by name.
pub fn find(name: &str) -> Result<&'static Tool, ToolError> {
    TOOLS
        .iter()
        .find(|tool| tool.name == name)
        .ok_or_else(|| ToolError::UnknownTool {
            name: name.to_owned(),
        })
}

/// The `tools` array of a model request.
pub fn api_definitions() -> Vec<Value> {
    TOOLS
        .iter()
        .map(|tool| json!({"name": tool.name, "description": tool.description, "input_schema": (tool.input_schema)()}))
        .collect()
}

/// The system prompt, with the tool list generated from [`TOOLS`].
pub fn system_prompt() -> String {
    let mut prompt = String::from(
        "You are Nightshift, a coding agent working in a git repository checked out at the workspace root. \
         Make the change the user asks for by reading and writing files with your tools, then say briefly \
         what you did. All paths are relative to the workspace root; `.git` is off limits.\n\nTools:\n",
    );
    for tool in TOOLS {
        prompt.push_str(&format!("- {}: {}\n", tool.name, tool.description));
    }
    prompt
}

fn parse_input<T: serde::de::DeserializeOwned>(
    tool: &'static str,
    input: Value,
) -> Result<T, ToolError> {
    serde_json::from_value(input).map_err(|source| ToolError::InvalidInput { tool, source })
}

fn io_error(path: &str, source: std::io::Error) -> ToolError {
    match source.kind() {
        ErrorKind::NotFound => ToolError::NotFound {
            path: path.to_owned(),
        },
        _ => ToolError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

#[derive(Deserialize)]
struct ListFilesInput {
    #[serde(default)]
    path: Option<String>,
}

fn list_files(workspace: &Workspace, input: Value) -> Result<ToolOutput, ToolError> {
    let input: ListFilesInput = parse_input("list_files", input)?;
    let path = input.path.unwrap_or_default();
    let resolved = workspace.resolve(&path)?;
    let metadata = std::fs::metadata(&resolved.absolute).map_err(|e| io_error(&path, e))?;
    if !metadata.is_dir() {
        return Err(ToolError::NotDirectory { path });
    }
    let mut entries = Vec::new();
    let truncated = walk(&resolved.absolute, "", &mut entries).map_err(|e| io_error(&path, e))?;
    let mut output = entries.join("\n");
    if entries.is_empty() {
        output.push_str("(empty directory)");
    }
    if truncated {
        output.push_str(&format!(
            "\n[truncated: listing stopped at {LIST_LIMIT_ENTRIES} entries; list a subdirectory to see more]"
        ));
    }
    Ok(ToolOutput::text(output))
}

/// Depth-first, sorted; symlinks are listed, not followed. Returns whether the limit was hit.
fn walk(dir: &Path, prefix: &str, entries: &mut Vec<String>) -> std::io::Result<bool> {
    let mut children: Vec<(String, bool)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ".git" {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        children.push((name, is_dir));
    }
    children.sort();
    for (name, is_dir) in children {
        if entries.len() >= LIST_LIMIT_ENTRIES {
            return Ok(true);
        }
        let relative = format!("{prefix}{name}");
        if is_dir {
            entries.push(format!("{relative}/"));
            if walk(&dir.join(&name), &format!("{relative}/"), entries)? {
                return Ok(true);
            }
        } else {
            entries.push(relative);
        }
    }
    Ok(false)
}

#[derive(Deserialize)]
struct ReadFileInput {
    path: String,
    #[serde(default)]
    start_line: Option<u64>,
    #[serde(default)]
    end_line: Option<u64>,
}

fn read_file(workspace: &Workspace, input: Value) -> Result<ToolOutput, ToolError> {
    let input: ReadFileInput = parse_input("read_file", input)?;
    let path = input.path;
    let resolved = workspace.resolve(&path)?;
    let metadata = std::fs::metadata(&resolved.absolute).map_err(|e| io_error(&path, e))?;
    if metadata.is_dir() {
        return Err(ToolError::IsDirectory { path });
    }
    if metadata.len() > READ_FILE_MAX_BYTES {
        return Err(ToolError::TooLarge {
            path,
            size_bytes: metadata.len(),
        });
    }
    let bytes = std::fs::read(&resolved.absolute).map_err(|e| io_error(&path, e))?;
    if bytes.iter().take(BINARY_SNIFF_BYTES).any(|&b| b == 0) {
        return Err(ToolError::Binary { path });
    }
    let text = String::from_utf8(bytes).map_err(|_| ToolError::Binary { path: path.clone() })?;

    let start_line = input.start_line.unwrap_or(1);
    let end_line = input.end_line.unwrap_or(u64::MAX);
    if start_line == 0 || end_line < start_line {
        return Err(ToolError::LineRange {
            start_line,
            end_line,
        });
    }
    let selected: String = if input.start_line.is_none() && input.end_line.is_none() {
        text
    } else {
        let skip = usize::try_from(start_line - 1).unwrap_or(usize::MAX);
        let take = usize::try_from(end_line - start_line)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        text.split_inclusive('\n').skip(skip).take(take).collect()
    };
    if selected.len() <= READ_LIMIT_BYTES {
        return Ok(ToolOutput::text(selected));
    }
    let mut end = READ_LIMIT_BYTES;
    while !selected.is_char_boundary(end) {
        end -= 1;
    }
    let shown = selected.get(..end).unwrap_or_default();
    Ok(ToolOutput::text(format!(
        "{shown}\n[truncated: output is limited to {READ_LIMIT_BYTES} bytes; read from line {} with start_line to see more]",
        start_line.saturating_add(shown.matches('\n').count() as u64)
    )))
}

#[derive(Deserialize)]
struct WriteFileInput {
    path: String,
    content: String,
}

fn write_file(workspace: &Workspace, input: Value) -> Result<ToolOutput, ToolError> {
    let input: WriteFileInput = parse_input("write_file", input)?;
    let path = input.path;
    let resolved = workspace.resolve(&path)?;
    if resolved.relative.is_empty() {
        return Err(ToolError::IsDirectory { path });
    }
    let old = match std::fs::read(&resolved.absolute) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(error) if error.kind() == ErrorKind::NotFound => None,
        Err(error) if error.kind() == ErrorKind::IsADirectory => {
            return Err(ToolError::IsDirectory { path })
        }
        Err(error) => return Err(io_error(&path, error)),
    };
    if let Some(parent) = resolved.absolute.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(&path, e))?;
    }
    std::fs::write(&resolved.absolute, &input.content).map_err(|e| io_error(&path, e))?;

    let (change, (additions, deletions)) = match &old {
        None => (FileChange::Added, line_changes("", &input.content)),
        Some(old) => (FileChange::Modified, line_changes(old, &input.content)),
    };
    let unchanged = old.as_deref() == Some(input.content.as_str());
    let output = if unchanged {
        format!(
            "{} is unchanged ({} bytes)",
            resolved.relative,
            input.content.len()
        )
    } else {
        format!(
            "wrote {} bytes to {} (+{additions} -{deletions})",
            input.content.len(),
            resolved.relative
        )
    };
    let file_change = (!unchanged).then(|| FileChangeRecord {
        path: resolved.relative.clone(),
        change,
        additions,
        deletions,
    });
    Ok(ToolOutput {
        output,
        file_change,
    })
}

/// Lines added and removed, counted as multisets: a line of `new` not matched by an equal line of `old`
/// is an addition, and the other way round a deletion. Cheap, and exact for pure additions and removals.
pub fn line_changes(old: &str, new: &str) -> (u64, u64) {
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for line in old.lines() {
        *counts.entry(line).or_default() += 1;
    }
    for line in new.lines() {
        *counts.entry(line).or_default() -= 1;
    }
    let mut additions = 0u64;
    let mut deletions = 0u64;
    for count in counts.values() {
        if *count > 0 {
            deletions += count.unsigned_abs();
        } else {
            additions += count.unsigned_abs();
        }
    }
    (additions, deletions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> (tempfile::TempDir, Workspace) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::create_dir_all(root.join("src/nested")).unwrap();
        std::fs::write(root.join("src/lib.rs"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(root.join("src/nested/b.txt"), "b\n").unwrap();
        std::fs::write(root.join("README.md"), "# hi\n").unwrap();
        std::fs::write(root.join("blob.bin"), [0u8, 159, 146, 150]).unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        let workspace = Workspace::open(&root).unwrap();
        (dir, workspace)
    }

    fn run(workspace: &Workspace, tool: &str, input: Value) -> Result<ToolOutput, ToolError> {
        (find(tool)?.execute)(workspace, input)
    }

    #[test]
    fn definitions_and_prompt_come_from_one_table() {
        let definitions = api_definitions();
        let prompt = system_prompt();
        assert_eq!(definitions.len(), TOOLS.len());
        for (definition, tool) in definitions.iter().zip(TOOLS) {
            assert_eq!(definition["name"], tool.name);
            assert_eq!(definition["input_schema"]["type"], "object");
            assert!(prompt.contains(&format!("- {}: {}", tool.name, tool.description)));
        }
        assert!(matches!(find("rm_rf"), Err(ToolError::UnknownTool { .. })));
    }

    #[test]
    fn list_files_is_sorted_recursive_and_skips_git() {
        let (_dir, ws) = workspace();
        let out = run(&ws, "list_files", json!({})).unwrap().output;
        assert_eq!(
            out,
            "README.md\nblob.bin\nsrc/\nsrc/lib.rs\nsrc/nested/\nsrc/nested/b.txt\nup"
        );
        let out = run(&ws, "list_files", json!({"path": "src/nested"}))
            .unwrap()
            .output;
        assert_eq!(out, "b.txt");
        assert!(matches!(
            run(&ws, "list_files", json!({"path": "up"})),
            Err(ToolError::PathEscape { .. })
        ));
    }

    #[test]
    fn list_files_is_capped() {
        let (_dir, ws) = workspace();
        std::fs::create_dir_all(ws.root().join("many")).unwrap();
        for i in 0..LIST_LIMIT_ENTRIES + 5 {
            std::fs::write(ws.root().join(format!("many/{i:05}")), "").unwrap();
        }
        let out = run(&ws, "list_files", json!({"path": "many"}))
            .unwrap()
            .output;
        assert_eq!(out.lines().count(), LIST_LIMIT_ENTRIES + 1);
        assert!(
            out.ends_with("list a subdirectory to see more]"),
            "{}",
            &out[out.len() - 120..]
        );
    }

    #[test]
    fn read_file_with_ranges_and_refusals() {
        let (_dir, ws) = workspace();
        assert_eq!(
            run(&ws, "read_file", json!({"path": "src/lib.rs"}))
                .unwrap()
                .output,
            "one\ntwo\nthree\n"
        );
        let out = run(
            &ws,
            "read_file",
            json!({"path": "src/lib.rs", "start_line": 2, "end_line": 2}),
        )
        .unwrap();
        assert_eq!(out.output, "two\n");
        let out = run(
            &ws,
            "read_file",
            json!({"path": "src/lib.rs", "start_line": 3}),
        )
        .unwrap();
        assert_eq!(out.output, "three\n");
        let range = run(
            &ws,
            "read_file",
            json!({"path": "src/lib.rs", "start_line": 3, "end_line": 1}),
        );
        assert!(matches!(range, Err(ToolError::LineRange { .. })));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": "blob.bin"})),
            Err(ToolError::Binary { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": "nope"})),
            Err(ToolError::NotFound { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": "src"})),
            Err(ToolError::IsDirectory { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": "up/secret.txt"})),
            Err(ToolError::PathEscape { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": "../secret.txt"})),
            Err(ToolError::PathEscape { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"path": ".git/HEAD"})),
            Err(ToolError::GitDir { .. })
        ));
        assert!(matches!(
            run(&ws, "read_file", json!({"file": "x"})),
            Err(ToolError::InvalidInput { .. })
        ));
    }

    #[test]
    fn read_file_is_capped() {
        let (_dir, ws) = workspace();
        let line = "é".repeat(99) + "\n";
        std::fs::write(ws.root().join("big.txt"), line.repeat(1000)).unwrap();
        let out = run(&ws, "read_file", json!({"path": "big.txt"}))
            .unwrap()
            .output;
        assert!(out.len() < READ_LIMIT_BYTES + 200, "{}", out.len());
        assert!(
            out.contains("[truncated: output is limited to 102400 bytes; read from line 515"),
            "{}",
            &out[out.len() - 150..]
        );
    }

    #[test]
    fn write_file_creates_modifies_and_reports_changes() {
        let (dir, ws) = workspace();
        let out = run(
            &ws,
            "write_file",
            json!({"path": "new/deep/a.txt", "content": "x\ny\n"}),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.root().join("new/deep/a.txt")).unwrap(),
            "x\ny\n"
        );
        assert_eq!(
            out.file_change,
            Some(FileChangeRecord {
                path: "new/deep/a.txt".into(),
                change: FileChange::Added,
                additions: 2,
                deletions: 0
            })
        );
        let out = run(
            &ws,
            "write_file",
            json!({"path": "src/lib.rs", "content": "one\n2\nthree\nfour\n"}),
        )
        .unwrap();
        assert_eq!(
            out.file_change,
            Some(FileChangeRecord {
                path: "src/lib.rs".into(),
                change: FileChange::Modified,
                additions: 2,
                deletions: 1
            })
        );
        let out = run(
            &ws,
            "write_file",
            json!({"path": "src/lib.rs", "content": "one\n2\nthree\nfour\n"}),
        )
        .unwrap();
        assert_eq!(out.file_change, None);

        let escape = run(
            &ws,
            "write_file",
            json!({"path": "up/secret.txt", "content": "pwned"}),
        );
        assert!(matches!(escape, Err(ToolError::PathEscape { .. })));
        let escape = run(
            &ws,
            "write_file",
            json!({"path": "up/new.txt", "content": "pwned"}),
        );
        assert!(matches!(escape, Err(ToolError::PathEscape { .. })));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret.txt")).unwrap(),
            "secret"
        );
        assert!(!dir.path().join("new.txt").exists());
        let git = run(
            &ws,
            "write_file",
            json!({"path": ".git/hooks/pre-commit", "content": "x"}),
        );
        assert!(matches!(git, Err(ToolError::GitDir { .. })));
        assert!(matches!(
            run(&ws, "write_file", json!({"path": "src", "content": ""})),
            Err(ToolError::IsDirectory { .. })
        ));
    }

    #[test]
    fn line_changes_count_multisets() {
        assert_eq!(line_changes("", ""), (0, 0));
        assert_eq!(line_changes("a\nb\n", "a\nb\n"), (0, 0));
        assert_eq!(line_changes("a\nb\n", "a\nc\nb\nd\n"), (2, 0));
        assert_eq!(line_changes("a\na\nb\n", "a\n"), (0, 2));
        assert_eq!(line_changes("a\nb\n", "b\na\n"), (0, 0));
    }
}

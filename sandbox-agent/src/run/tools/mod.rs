//! The tools the model may call. Each is defined once, in [`TOOLS`]: name, access, description, input
//! schema and executor; the `tools` array of every model request ([`api_definitions`]), the tool list of
//! the system prompt ([`system_prompt`]) and the markdown [`catalogue`] are all generated from that table.
//!
//! [`execute`] is the one way in, and applies the same rules to every tool: `Read` tools run at once;
//! `Write` tools wait for the [`SyncGate`] and fail when the sync failed; `Process` tools (bash) wait for
//! it too, then run with the workspace mounted read-only unless the sync is `Done`. Every tool ends
//! promptly when [`ToolContext::cancel`] fires. Blocking file I/O runs on the blocking pool.
//!
//! Families: [`file`] (read, write, edit), [`search`] (list, glob, grep), [`bash`] (commands, with
//! [`changes`] telling which files a command changed), [`session_tools`] (sub-sessions, asked of the
//! session over the link).
//!
//! Invariant: every path a tool gets from the model goes through [`Workspace::resolve`]; a file tool
//! writes only after the gate settled `Done` and never under a read-only path; commands run only under
//! bubblewrap, with the read-only paths (and, before a successful sync, the whole workspace) mounted
//! read-only.

pub mod bash;
pub mod changes;
pub mod file;
pub mod git;
pub mod search;
pub mod session_tools;

use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::Arc;

use nightshift_protocol::event::FileChange;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gate::{SyncGate, SyncState};
use super::workspace::{ResolvedPath, Workspace};

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
    /// A field has the right type but a value the tool cannot use.
    #[error("invalid `{field}` for `{tool}`: {reason}")]
    InvalidValue {
        /// Tool name.
        tool: &'static str,
        /// Input field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
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
    /// The path is under a read-only path of the workspace.
    #[error("`{path}` is read-only: everything under `{rule}` is")]
    ReadOnlyPath {
        /// The path given.
        path: String,
        /// The read-only prefix it falls under.
        rule: String,
    },
    /// The git sync of the workspace failed, so nothing may be written.
    #[error("the workspace is read-only because git sync failed: {reason}")]
    SyncFailed {
        /// Why the sync failed.
        reason: String,
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
    /// The file is not text.
    #[error(
        "`{path}` is a binary file ({size_bytes} bytes); only text files can be read or edited"
    )]
    Binary {
        /// The path given.
        path: String,
        /// Its size.
        size_bytes: u64,
    },
    /// `edit_file` did not find `old_text`.
    #[error("old_text was not found in `{path}`; {hint}")]
    NoMatch {
        /// The path given.
        path: String,
        /// What probably went wrong.
        hint: String,
    },
    /// `edit_file` found `old_text` more than once and `replace_all` was not set.
    #[error(
        "old_text occurs {count} times in `{path}`; add surrounding lines to make it unique, or set replace_all"
    )]
    AmbiguousMatch {
        /// The path given.
        path: String,
        /// How many times it occurs.
        count: usize,
    },
    /// A glob pattern that does not parse.
    #[error("invalid glob `{pattern}`: {source}")]
    InvalidGlob {
        /// The pattern given.
        pattern: String,
        /// Cause.
        #[source]
        source: globset::Error,
    },
    /// A regular expression that does not parse.
    #[error("invalid regex `{pattern}`: {source}")]
    InvalidRegex {
        /// The pattern given.
        pattern: String,
        /// Cause.
        #[source]
        source: grep_regex::Error,
    },
    /// bubblewrap is not installed, and commands never run unconfined.
    #[error(
        "bash needs bubblewrap (`bwrap`), which is not installed; commands never run unconfined"
    )]
    BubblewrapMissing,
    /// A process could not be started.
    #[error("could not start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A command ran out of time; its process group was killed.
    #[error("command timed out after {timeout_ms} ms and was killed; output so far:\n{output}")]
    Timeout {
        /// The time limit it had.
        timeout_ms: u64,
        /// What it printed before (capped like any output).
        output: String,
    },
    /// The call was cancelled (the prompt was stopped).
    #[error("`{tool}` was cancelled")]
    Cancelled {
        /// Tool name.
        tool: &'static str,
    },
    /// The tool's thread panicked.
    #[error("`{tool}` crashed: {message}")]
    Crashed {
        /// Tool name.
        tool: &'static str,
        /// The panic or join error.
        message: String,
    },
    /// A sub-session tool in an agent without a session link (e.g. a local run).
    #[error("sub-session tools need the session link, and this agent runs without one")]
    NoSession,
    /// The session did not answer a sub-session tool.
    #[error("the session did not answer: {reason}")]
    SessionUnreachable {
        /// Why.
        reason: String,
    },
    /// The session refused a sub-session tool's request (a guardrail, an unknown child, …).
    #[error("the session refused ({code}): {message}")]
    SessionRefused {
        /// The typed error code, e.g. `child_limit`.
        code: &'static str,
        /// The session's explanation.
        message: String,
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
    /// Added, modified or deleted.
    pub change: FileChange,
    /// Lines added.
    pub additions: u64,
    /// Lines removed.
    pub deletions: u64,
    /// Unified diff of the change, at most [`MAX_DIFF_BYTES`] (see [`capped_diff`]).
    pub diff: Option<String>,
}

/// The largest diff a `file_changed` event carries.
pub const MAX_DIFF_BYTES: usize = 64 * 1024;

/// `diff` cut at the last whole line within [`MAX_DIFF_BYTES`], with a line saying so; `None` for an empty
/// diff.
pub fn capped_diff(mut diff: String) -> Option<String> {
    if diff.is_empty() {
        return None;
    }
    if diff.len() > MAX_DIFF_BYTES {
        let mut cut = MAX_DIFF_BYTES;
        while !diff.is_char_boundary(cut) {
            cut -= 1;
        }
        let cut = diff[..cut].rfind('\n').map_or(0, |i| i + 1);
        let dropped = diff.len() - cut;
        diff.truncate(cut);
        diff.push_str(&format!("\\ diff truncated: {dropped} more bytes\n"));
    }
    Some(diff)
}

/// What a successful tool call produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolOutput {
    /// Text for the model (and the `tool_result` event), at most about `output_cap_bytes`.
    pub output: String,
    /// The files it changed, sorted by path.
    pub file_changes: Vec<FileChangeRecord>,
}

impl ToolOutput {
    fn text(output: String) -> Self {
        Self {
            output,
            file_changes: Vec::new(),
        }
    }
}

/// Size and time limits of the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// Most bytes of output a tool returns; more is cut with a notice.
    pub output_cap_bytes: usize,
    /// Time limit of a command that names none.
    pub bash_timeout_default_ms: u64,
    /// Longest time limit a command may ask for.
    pub bash_timeout_max_ms: u64,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self {
            output_cap_bytes: 30 * 1024,
            bash_timeout_default_ms: 120_000,
            bash_timeout_max_ms: 600_000,
        }
    }
}

/// Everything a tool call may use.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// Where the tools work.
    pub workspace: Workspace,
    /// Whether the git sync has finished; writes wait for it.
    pub gate: SyncGate,
    /// Workspace-relative prefixes no tool and no command may write, e.g. `.nightshift`.
    pub read_only_paths: Arc<[String]>,
    /// Fires when the call must end (the prompt was stopped).
    pub cancel: CancellationToken,
    /// Where bash streams its output as it comes, if anyone listens.
    pub output: Option<mpsc::UnboundedSender<String>>,
    /// Size and time limits.
    pub limits: ToolLimits,
    /// The way to ask the session about sub-sessions; `None` without a session link.
    pub session: Option<session_tools::SessionCalls>,
}

/// The read-only prefix `relative` (a resolved, workspace-relative path) falls under, if any: a prefix
/// matches whole path components, so `.nightshift` covers `.nightshift/a` but not `.nightshift-old`.
fn read_only_rule<'a>(rules: &'a [String], relative: &str) -> Option<&'a str> {
    rules.iter().map(String::as_str).find(|rule| {
        let rule = normalize_rule(rule);
        !rule.is_empty()
            && relative
                .strip_prefix(rule)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// A read-only rule as a plain relative prefix: no `./` in front, no `/` behind.
fn normalize_rule(rule: &str) -> &str {
    let rule = rule.trim();
    let rule = rule.strip_prefix("./").unwrap_or(rule);
    rule.trim_end_matches('/')
}

/// Refuse a write to `resolved` (asked for as `path`) under one of `rules`.
fn check_writable(rules: &[String], resolved: &ResolvedPath, path: &str) -> Result<(), ToolError> {
    match read_only_rule(rules, &resolved.relative) {
        Some(rule) => Err(ToolError::ReadOnlyPath {
            path: path.to_owned(),
            rule: normalize_rule(rule).to_owned(),
        }),
        None => Ok(()),
    }
}

/// What a tool may do, which decides how [`execute`] gates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only reads: runs at once, even while the git sync is pending.
    Read,
    /// Writes files: waits for the sync, fails if it failed, refuses read-only paths.
    Write,
    /// Runs a process: waits for the sync, then runs sandboxed (read-only if the sync failed).
    Process,
}

impl Access {
    fn label(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Process => "process",
        }
    }
}

/// The future a tool's executor returns.
pub type ToolFuture<'a> = Pin<Box<dyn Future<Output = Result<ToolOutput, ToolError>> + Send + 'a>>;

/// One tool: everything about it in one place.
pub struct ToolDef {
    /// Name the model calls it by.
    pub name: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// JSON schema of its input.
    pub input_schema: fn() -> Value,
    /// What it may do.
    pub access: Access,
    /// Runs it; call through [`execute`], which applies the gate and cancellation.
    execute: for<'a> fn(&'a ToolContext, Value) -> ToolFuture<'a>,
}

/// Every tool.
pub static TOOLS: &[ToolDef] = &[
    ToolDef {
        name: "list_files",
        description: "List files and directories under a directory of the workspace, recursively (down to \
                      `depth` levels if given), sorted, as paths relative to that directory. Directories \
                      end with `/`. Files ignored by .gitignore and `.git` are left out.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Directory relative to the workspace root; default the root."},
                    "depth": {"type": "integer", "minimum": 1, "description": "How many levels to descend; 1 lists only the directory's own entries. Default: all."}
                }
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(search::list_files(ctx, input)),
    },
    ToolDef {
        name: "read_file",
        description: "Read a text file of the workspace. Lines are numbered like `cat -n` (the number and a \
                      tab are not part of the file). Long files are cut with a notice telling which \
                      offset_line to read on from; use offset_line and limit_lines for a part of a file.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path relative to the workspace root."},
                    "offset_line": {"type": "integer", "minimum": 1, "description": "First line to return (1-based). Default 1."},
                    "limit_lines": {"type": "integer", "minimum": 1, "description": "Most lines to return. Default: as many as fit."}
                },
                "required": ["path"]
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(file::read_file(ctx, input)),
    },
    ToolDef {
        name: "write_file",
        description: "Create or replace a file of the workspace with the given content; parent directories \
                      are created. Prefer edit_file for changing part of an existing file.",
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
        access: Access::Write,
        execute: |ctx, input| Box::pin(file::write_file(ctx, input)),
    },
    ToolDef {
        name: "edit_file",
        description: "Replace old_text by new_text in a file of the workspace. old_text must match the file \
                      exactly (whitespace and line breaks included, without read_file's line numbers) and \
                      occur once, unless replace_all is set. Returns a unified diff of the change.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path relative to the workspace root."},
                    "old_text": {"type": "string", "description": "The exact text to replace."},
                    "new_text": {"type": "string", "description": "The text to put in its place."},
                    "replace_all": {"type": "boolean", "description": "Replace every occurrence instead of exactly one. Default false."}
                },
                "required": ["path", "old_text", "new_text"]
            })
        },
        access: Access::Write,
        execute: |ctx, input| Box::pin(file::edit_file(ctx, input)),
    },
    ToolDef {
        name: "glob",
        description: "Find files whose path (relative to `path`) matches a glob pattern: `*` and `?` stay \
                      within one directory, `**` crosses directories, `{a,b}` and `[ab]` work as in a \
                      shell. Prints workspace-relative paths, sorted. Files ignored by .gitignore are left out.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Glob, e.g. `**/*.rs` or `src/*/mod.rs`."},
                    "path": {"type": "string", "description": "Directory to search, relative to the workspace root; default the root."}
                },
                "required": ["pattern"]
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(search::glob(ctx, input)),
    },
    ToolDef {
        name: "grep",
        description: "Search file contents for a regular expression (Rust regex syntax), line by line. \
                      Prints `path:line:text` for every matching line, files sorted by path. Files ignored \
                      by .gitignore and binary files are skipped.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Regular expression, e.g. `fn\\s+main`."},
                    "path": {"type": "string", "description": "File or directory to search, relative to the workspace root; default the root."},
                    "glob": {"type": "string", "description": "Only search files matching this glob: without `/` it matches file names (`*.rs`), with `/` paths relative to `path` (`src/**/*.rs`)."},
                    "case_insensitive": {"type": "boolean", "description": "Ignore case. Default false."},
                    "max_results": {"type": "integer", "minimum": 1, "description": "Stop after this many matching lines. Default 100."}
                },
                "required": ["pattern"]
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(search::grep(ctx, input)),
    },
    ToolDef {
        name: "bash",
        description: "Run a command with `bash -c` at the workspace root and return its output (stdout and \
                      stderr interleaved; long output keeps its head and tail) and exit code. The command \
                      runs in a sandbox: read-only paths such as `.nightshift` cannot be written, nor the \
                      workspace while its git sync has not succeeded. Stdin is empty; processes it leaves \
                      running are killed when it ends. Files it changed are reported.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line, e.g. `cargo test 2>&1 | tail -50`."},
                    "timeout_ms": {"type": "integer", "minimum": 1, "description": "Time limit in milliseconds; default 120000 (2 minutes), at most 600000 (10 minutes)."}
                },
                "required": ["command"]
            })
        },
        access: Access::Process,
        execute: |ctx, input| Box::pin(bash::bash(ctx, input)),
    },
    ToolDef {
        name: "git_status",
        description: "Show `git status --short --branch` of the workspace: the session branch and every \
                      changed, added, deleted or untracked file.",
        input_schema: || json!({"type": "object", "properties": {}}),
        access: Access::Read,
        execute: |ctx, input| Box::pin(git::status(ctx, input)),
    },
    ToolDef {
        name: "git_diff",
        description: "Show the diff of the working tree against HEAD (what you changed and is not yet \
                      committed), optionally only for some paths; untracked files are listed after it.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "paths": {"type": "array", "items": {"type": "string"}, "description": "Files or directories relative to the workspace root; default everything."}
                }
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(git::diff(ctx, input)),
    },
    ToolDef {
        name: "spawn_session",
        description: "Start a sub-session: another agent in its own sandbox that works on `prompt` (on this \
                      repository unless `repo` is given) while you go on. Answers at once with the child's id \
                      and status; follow it with session_status or list_children. Limits (nesting depth, \
                      children running at once, sessions per tree) refuse with `child_limit`.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "description": "The child's task, complete in itself: it does not see this conversation."},
                    "repo": {"type": "string", "description": "Repository `owner/name`; default this session's."},
                    "title": {"type": "string", "description": "Short title; default the prompt's first line."}
                },
                "required": ["prompt"]
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(session_tools::spawn_session(ctx, input)),
    },
    ToolDef {
        name: "session_status",
        description: "The state of one of your sub-sessions: id, repo, title, status (`starting`, `running`, \
                      `idle` when its work is done, `stopped`, `failed`) and when it was created.",
        input_schema: || {
            json!({
                "type": "object",
                "properties": {
                    "id": {"type": "string", "description": "The child's session id, as spawn_session returned it."}
                },
                "required": ["id"]
            })
        },
        access: Access::Read,
        execute: |ctx, input| Box::pin(session_tools::session_status(ctx, input)),
    },
    ToolDef {
        name: "list_children",
        description: "Every sub-session this session spawned, oldest first, with its status.",
        input_schema: || json!({"type": "object", "properties": {}}),
        access: Access::Read,
        execute: |ctx, input| Box::pin(session_tools::list_children(ctx, input)),
    },
    ToolDef {
        name: "tool_catalogue",
        description: "Describe every tool available: name, access, description and input schema, as markdown.",
        input_schema: || json!({"type": "object", "properties": {}}),
        access: Access::Read,
        execute: |_, _| Box::pin(std::future::ready(Ok(ToolOutput::text(catalogue())))),
    },
];

/// Find a tool by name.
pub fn find(name: &str) -> Result<&'static ToolDef, ToolError> {
    TOOLS
        .iter()
        .find(|tool| tool.name == name)
        .ok_or_else(|| ToolError::UnknownTool {
            name: name.to_owned(),
        })
}

/// Run the tool `name` with `input`: the gate for its access, then the tool, both ended by
/// `ctx.cancel`; the output is capped at `ctx.limits.output_cap_bytes`.
pub async fn execute(ctx: &ToolContext, name: &str, input: Value) -> Result<ToolOutput, ToolError> {
    let tool = find(name)?;
    let run = async {
        match tool.access {
            Access::Read => {}
            Access::Write => {
                if let SyncState::Failed(reason) = ctx.gate.settled().await {
                    return Err(ToolError::SyncFailed { reason });
                }
            }
            // Runs whatever the outcome; the sandbox mounts the workspace read-only unless `Done`.
            Access::Process => {
                ctx.gate.settled().await;
            }
        }
        (tool.execute)(ctx, input).await
    };
    let mut output = tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => return Err(ToolError::Cancelled { tool: tool.name }),
        output = run => output?,
    };
    if output.output.len() > ctx.limits.output_cap_bytes {
        output.output = cap_head(
            &output.output,
            ctx.limits.output_cap_bytes,
            "narrow the query or use offset_line",
        );
    }
    Ok(output)
}

/// The `tools` array of a model request.
pub fn api_definitions() -> Vec<Value> {
    TOOLS
        .iter()
        .map(|tool| json!({"name": tool.name, "description": tool.description, "input_schema": (tool.input_schema)()}))
        .collect()
}

/// Every tool as markdown: name, access, description and input schema.
pub fn catalogue() -> String {
    let mut text = String::from(
        "# Tools\n\nAccess `read`: runs at once. `write`: waits until the workspace's git sync has finished, \
         fails if it failed, and never writes read-only paths. `process`: waits for the sync too, then runs \
         sandboxed (the whole workspace read-only if the sync failed).\n",
    );
    for tool in TOOLS {
        let schema = serde_json::to_string_pretty(&(tool.input_schema)())
            .unwrap_or_else(|_| "{}".to_owned());
        text.push_str(&format!(
            "\n## `{}` ({})\n\n{}\n\nInput schema:\n\n```json\n{schema}\n```\n",
            tool.name,
            tool.access.label(),
            tool.description
        ));
    }
    text
}

/// The system prompt, with the tool list generated from [`TOOLS`].
pub fn system_prompt() -> String {
    let mut prompt = String::from(
        "You are Nightshift, a coding agent working in a git repository checked out at the workspace root. \
         Make the change the user asks for with your tools, then say briefly what you did. All paths are \
         relative to the workspace root; `.git` is off limits, and some paths (such as `.nightshift`) are \
         read-only. Writes wait until the workspace has caught up with git. Do not commit or push: when \
         your turn ends, Nightshift commits your changes as the person who asked and pushes the session \
         branch.\n\nTools:\n",
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
        ErrorKind::IsADirectory => ToolError::IsDirectory {
            path: path.to_owned(),
        },
        ErrorKind::NotADirectory => ToolError::NotDirectory {
            path: path.to_owned(),
        },
        _ => ToolError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Run blocking `work` on the blocking pool. It gets a clone of the cancellation token and should
/// check it in long loops; the call itself returns at once when the token fires.
async fn blocking<T: Send + 'static>(
    ctx: &ToolContext,
    tool: &'static str,
    work: impl FnOnce(CancellationToken) -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    let cancel = ctx.cancel.clone();
    let task = tokio::task::spawn_blocking(move || work(cancel));
    tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => Err(ToolError::Cancelled { tool }),
        joined = task => joined.map_err(|error| ToolError::Crashed { tool, message: error.to_string() })?,
    }
}

/// The largest index `<= index` on a char boundary of `text`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    let mut index = index;
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// The smallest index `>= index` on a char boundary of `text`.
fn ceil_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index;
    while index < text.len() && !text.is_char_boundary(index) {
        index += 1;
    }
    index.min(text.len())
}

/// `text` cut to at most `cap_bytes` (notice included, unless the cap is smaller than the notice): the
/// head, ending at a line break if one is near, then `[… truncated: N more bytes; {hint}]`.
fn cap_head(text: &str, cap_bytes: usize, hint: &str) -> String {
    if text.len() <= cap_bytes {
        return text.to_owned();
    }
    // The notice with the largest possible count is the longest it can be.
    let longest_notice = truncation_notice(text.len(), hint).len() + 1;
    let budget = floor_char_boundary(text, cap_bytes.saturating_sub(longest_notice));
    let head = text.get(..budget).unwrap_or_default();
    let head = match head.rfind('\n') {
        Some(line_end) if line_end >= budget / 2 => head.get(..line_end).unwrap_or(head),
        _ => head,
    };
    format!(
        "{head}\n{}",
        truncation_notice(text.len() - head.len(), hint)
    )
}

/// The notice that says `cut_bytes` were left out.
fn truncation_notice(cut_bytes: usize, hint: &str) -> String {
    format!("[… truncated: {cut_bytes} more bytes; {hint}]")
}

#[cfg(test)]
mod tests;

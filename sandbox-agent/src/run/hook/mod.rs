//! Plugin hooks ("runtime interception"): programs from the repository, and built-in policies, that see
//! every tool call, tool result, prompt and idle moment of the agent and may allow, block or rewrite it.
//!
//! The agent loop asks [`Hooks`] before a tool runs ([`Hooks::tool_before`]), after it ran
//! ([`Hooks::tool_after`]), before a prompt reaches the model ([`Hooks::prompt_before`]) and when the
//! session has nothing left to do ([`Hooks::session_idle`]). This module only decides; it never touches
//! the workspace or the session.
//!
//! # Configuration: `.nightshift/hooks.toml`
//!
//! [`Hooks::load`] reads `<workspace>/.nightshift/hooks.toml`; without the file there are no hooks and
//! the default [`Policy`]. Unknown keys, unknown events and every invalid value are a [`HookError`], so
//! a typo never silently disables a guard.
//!
//! ```toml
//! # .nightshift/hooks.toml
//!
//! [policy]
//! # Paths the agent may not change, relative to the workspace root. `.nightshift` is always among them.
//! read_only_paths = [".github/workflows", "migrations/"]
//! # More bash commands to refuse: a regex, matched anywhere in the command.
//! blocked_commands = [
//!   { pattern = '\brm\s+-[a-zA-Z]*r[a-zA-Z]*\s+/', reason = "never delete from the file system root" },
//! ]
//! # Keep the built-in blocked commands (force push, changing the commit identity); the default.
//! default_blocked_commands = true
//!
//! [[hooks]]
//! name = "guard"                          # shown as `by` and in every failure; default: the command
//! event = "tool.before"
//! tools = ["bash", "write_file"]          # tool events only; default: every tool
//! command = [".nightshift/hooks/guard.sh", "--strict"]
//! timeout_ms = 2000                       # default 5000, at most 60000
//!
//! [[hooks]]
//! name = "redact"
//! event = "tool.after"
//! command = ["sh", ".nightshift/hooks/redact.sh"]
//!
//! [[hooks]]
//! name = "ticket"
//! event = "prompt.before"
//! command = [".nightshift/hooks/ticket.sh"]
//!
//! [[hooks]]
//! name = "checks"
//! event = "session.idle"
//! command = [".nightshift/hooks/checks.sh"]
//! timeout_ms = 60000
//! ```
//!
//! - `event`: `tool.before` | `tool.after` | `prompt.before` | `session.idle`.
//! - `command`: program and arguments, no shell. A program with a `/` is a path: relative ones are
//!   resolved against the workspace root and must stay inside it (after symlinks), absolute ones are
//!   taken as they are. A bare name is looked up on the hook's `PATH` when the configuration is loaded.
//!   The program must exist and be executable then.
//! - `tools`: exact tool names; only for `tool.before` / `tool.after`.
//! - `name`: must not be empty or start with `policy:` (the prefix of the built-in policies).
//!
//! # Built-in policy (`[policy]`)
//!
//! Checked in [`Hooks::tool_before`] before any hook runs, and again on the input a hook rewrote:
//!
//! - `read_only_paths`: `write_file` and `edit_file` (their `path` input) under one of these paths are
//!   blocked `by` `policy:read_only_paths`. Paths are normalized lexically (`./`, `a/../`, `//`) and
//!   compared by components, so `.nightshiftX` is not under `.nightshift`; a path that reaches a read-only
//!   path through a symlink in the workspace is blocked too.
//!   **`.nightshift` is always read-only: the agent must never edit its own hook configuration or hook
//!   scripts.** For the same reason a hook program that lives in the workspace outside `.nightshift` is
//!   added to the read-only paths (arguments are not: keep scripts a hook runs through an interpreter in
//!   `.nightshift`, or list them).
//! - `blocked_commands`: a `bash` call whose `command` matches one of these regexes is blocked `by`
//!   `policy:blocked_commands`. Unless `default_blocked_commands = false`, the built-in ones come
//!   first — see [`Policy::default_blocked_commands`]: `git push` with `--force`, `--force-with-lease`,
//!   `--force-if-includes`, a short-option cluster with `f` (`-f`, `-fu`) or a `+refspec`; `git config …
//!   user.…` (reads included: use `git var GIT_AUTHOR_IDENT`); `git -c user.…=` / `--config-env=user.…`;
//!   `git commit --author`; and setting `GIT_AUTHOR_*` / `GIT_COMMITTER_*`. The commit identity is the
//!   platform's to set. These patterns catch mistakes, not a determined adversary: a shell can spell a
//!   command in endless ways.
//!
//! Read-only paths are also enforced below the agent: the bash tool runs commands with every entry of
//! [`Policy::read_only_paths`] bind-mounted read-only (that tool owns that code and reads this list), so
//! what a write tool may not do cannot be done through bash either. An entry that does not exist yet
//! cannot be bind-mounted: the bash tool must also keep it from being created. Writing through a
//! symlink is checked here with the file system as it is at the time of the check. A write input
//! without a string `path`, or one outside the workspace, is left to the tool, which refuses it.
//!
//! # Hook protocol
//!
//! A hook is started once per event, with the workspace root as its working directory, a cleared
//! environment (only `PATH` and `HOME` of the agent, and [`EVENT_ENV`] = the event name: never the
//! agent's model key or sandbox token), stdin and stdout piped. It reads one JSON object on stdin:
//!
//! ```json
//! {"event": "tool.before", "session_id": "s1", "prompt_id": "p1", "author": "octocat",
//!  "tool": "bash", "input": {"command": "cargo test"}}
//! ```
//!
//! `prompt_id` and `author` may be `null`. `tool.after` adds `"output"` (string) and `"ok"` (bool);
//! `prompt.before` has `"text"` instead of `tool` and `input`; `session.idle` has only the context.
//! It answers with at most one JSON object on stdout (at most [`STDOUT_LIMIT_BYTES`]):
//!
//! | event           | answers                                                                        |
//! |-----------------|--------------------------------------------------------------------------------|
//! | `tool.before`   | `{"decision": "allow"}`, `{"decision": "block", "reason": "…"}`, `{"decision": "rewrite", "input": {…}}` |
//! | `tool.after`    | `{"decision": "keep"}`, `{"decision": "rewrite", "output": "…"}`, `{"decision": "withhold", "reason": "…"}` |
//! | `prompt.before` | `{"decision": "allow"}`, `{"decision": "block", "reason": "…"}`, `{"decision": "rewrite", "text": "…"}` |
//! | `session.idle`  | nothing: stdout is ignored, the exit status is the verdict                    |
//!
//! Empty stdout with exit status 0 means allow / keep. Other fields are ignored; a missing `reason`
//! reads "no reason given". Several hooks of one event run one after another in configuration order: a
//! rewrite is what the next hook sees, the first block (or withhold) wins and ends the chain. A decision
//! that rewrote names every rewriting hook in `by`, comma-separated.
//!
//! **Fail closed.** A hook that cannot be started, times out (its whole process group is killed),
//! exits with a non-zero status, dies of a signal, prints more than the limit, prints something that
//! is not one JSON object, or answers a decision its event does not know, blocks (tool.before,
//! prompt.before) or withholds (tool.after), `by` the hook, with the [`HookError`] message as the reason:
//! `hook "guard" timed out after 5000 ms`, `hook "guard" exited with status 3: <stderr tail>`. For
//! `session.idle` the same failures come back as [`HookFailure`]s. When a hook finishes, anything it
//! left running in its process group is killed.

mod config;
mod policy;
mod process;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::env;

pub use policy::{BlockedCommand, Policy};

/// Where the configuration lives, relative to the workspace root.
pub const CONFIG_PATH: &str = ".nightshift/hooks.toml";
/// Environment variable that tells a hook process which event it was started for.
pub const EVENT_ENV: &str = "NIGHTSHIFT_HOOK_EVENT";
/// `timeout_ms` of a hook that does not set one.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// The largest `timeout_ms` a hook may set.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// A hook printing more than this on stdout fails.
pub const STDOUT_LIMIT_BYTES: usize = 1024 * 1024;
/// `by` of a block by the read-only paths.
pub const READ_ONLY_PATHS_POLICY: &str = "policy:read_only_paths";
/// `by` of a block by the blocked commands.
pub const BLOCKED_COMMANDS_POLICY: &str = "policy:blocked_commands";

/// Tools that write the file named by their `path` input.
const WRITE_TOOLS: &[&str] = &["write_file", "edit_file"];
/// The tool whose `command` input is checked against the blocked commands.
const BASH_TOOL: &str = "bash";
/// Hook `PATH` when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Everything that can go wrong with hooks: configuration errors (from [`Hooks::load`] and
/// [`Hooks::from_toml`]) and the failures of a hook run, whose messages become block reasons.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The configuration file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The workspace root does not exist or cannot be resolved.
    #[error("workspace root {path}: {source}")]
    WorkspaceRoot {
        /// The root given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or an unknown key, event or a value of the wrong type.
    #[error("invalid {path}: {source}")]
    Parse {
        /// The file (or where the text came from).
        path: String,
        /// Cause, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// `command = []` or an empty program.
    #[error("hook {hook:?} has an empty command")]
    EmptyCommand {
        /// The hook (`hooks[<index>]` when it has no name).
        hook: String,
    },
    /// An empty name, or one the built-in policies use.
    #[error("hook name {hook:?} is invalid: names must not be empty or start with `policy:`")]
    InvalidName {
        /// The name given.
        hook: String,
    },
    /// The program path leaves the workspace (by `..` or through a symlink).
    #[error("hook {hook:?}: program {program:?} is outside the workspace")]
    ProgramOutsideWorkspace {
        /// The hook.
        hook: String,
        /// The program as configured.
        program: String,
    },
    /// No such program (path), or not on `PATH` (bare name).
    #[error("hook {hook:?}: program {program:?} not found")]
    ProgramNotFound {
        /// The hook.
        hook: String,
        /// The program as configured.
        program: String,
    },
    /// The program is not an executable file.
    #[error("hook {hook:?}: program {program:?} is not an executable file")]
    ProgramNotExecutable {
        /// The hook.
        hook: String,
        /// The program as configured.
        program: String,
    },
    /// `timeout_ms` out of range.
    #[error("hook {hook:?}: timeout_ms {timeout_ms} is not between 1 and {MAX_TIMEOUT_MS}")]
    InvalidTimeout {
        /// The hook.
        hook: String,
        /// The value given.
        timeout_ms: u64,
    },
    /// `tools` on an event that is not about a tool, or an empty `tools`.
    #[error("hook {hook:?}: `tools` {detail}")]
    InvalidTools {
        /// The hook.
        hook: String,
        /// What is wrong.
        detail: String,
    },
    /// An entry of `read_only_paths` that is absolute, leaves the workspace or names all of it.
    #[error("read-only path {path:?} {detail}")]
    InvalidReadOnlyPath {
        /// The entry as configured.
        path: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// A `blocked_commands` pattern that is not a valid regex.
    #[error("blocked command pattern {pattern:?}: {source}")]
    InvalidPattern {
        /// The pattern as configured.
        pattern: String,
        /// Cause.
        #[source]
        source: regex::Error,
    },
    /// The hook process could not be started.
    #[error("hook {hook:?} could not be started: {source}")]
    Spawn {
        /// The hook.
        hook: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the hook process failed.
    #[error("hook {hook:?} could not be waited for: {source}")]
    Wait {
        /// The hook.
        hook: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The hook ran longer than its `timeout_ms`; its process group was killed.
    #[error("hook {hook:?} timed out after {timeout_ms} ms")]
    TimedOut {
        /// The hook.
        hook: String,
        /// Its timeout.
        timeout_ms: u64,
    },
    /// The hook exited with a non-zero status.
    #[error("hook {hook:?} exited with status {code}{}", tail_suffix(.stderr_tail))]
    Exited {
        /// The hook.
        hook: String,
        /// Exit status.
        code: i32,
        /// The end of what it printed on stderr.
        stderr_tail: String,
    },
    /// The hook was ended by a signal.
    #[error("hook {hook:?} was killed by signal {signal}{}", tail_suffix(.stderr_tail))]
    Killed {
        /// The hook.
        hook: String,
        /// The signal number.
        signal: i32,
        /// The end of what it printed on stderr.
        stderr_tail: String,
    },
    /// The hook printed more than [`STDOUT_LIMIT_BYTES`]; its process group was killed.
    #[error("hook {hook:?} printed more than {limit_bytes} bytes on stdout")]
    OutputTooLarge {
        /// The hook.
        hook: String,
        /// The limit.
        limit_bytes: usize,
    },
    /// The answer is not one JSON object, or not a decision the event knows.
    #[error("hook {hook:?} gave an invalid answer: {detail}")]
    InvalidAnswer {
        /// The hook.
        hook: String,
        /// What is wrong.
        detail: String,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// Who and what a hook runs for; sent to every hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookContext {
    /// The session.
    pub session_id: String,
    /// The prompt being worked on, if any.
    pub prompt_id: Option<String>,
    /// Login of the prompt's author, if known (sent as `author`).
    pub author_login: Option<String>,
}

/// The events a hook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HookEvent {
    /// Before a tool runs; may block it or rewrite its input.
    #[serde(rename = "tool.before")]
    ToolBefore,
    /// After a tool ran; may rewrite or withhold its output.
    #[serde(rename = "tool.after")]
    ToolAfter,
    /// Before a prompt reaches the model; may block or rewrite it.
    #[serde(rename = "prompt.before")]
    PromptBefore,
    /// The session has nothing left to do; failures are reported.
    #[serde(rename = "session.idle")]
    SessionIdle,
}

impl HookEvent {
    /// The name used in the configuration, the payload and [`EVENT_ENV`].
    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::ToolBefore => "tool.before",
            HookEvent::ToolAfter => "tool.after",
            HookEvent::PromptBefore => "prompt.before",
            HookEvent::SessionIdle => "session.idle",
        }
    }

    /// Whether the event is about a tool (and `tools` applies).
    pub fn is_tool_event(self) -> bool {
        matches!(self, HookEvent::ToolBefore | HookEvent::ToolAfter)
    }
}

impl fmt::Display for HookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a tool call.
#[derive(Debug, Clone, PartialEq)]
pub enum BeforeDecision {
    /// Run it as asked.
    Allow,
    /// Do not run it; tell the model why.
    Block {
        /// The hook or policy (`policy:…`) that blocked.
        by: String,
        /// Why.
        reason: String,
    },
    /// Run it with this input instead.
    Rewrite {
        /// The hooks that rewrote, comma-separated.
        by: String,
        /// The input to run the tool with.
        input: Value,
    },
}

/// What happens to a tool's output.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterDecision {
    /// Give it to the model as it is.
    Keep,
    /// Give the model this output instead.
    Rewrite {
        /// The hooks that rewrote, comma-separated.
        by: String,
        /// The output for the model.
        output: String,
    },
    /// Give the model none of it; tell it why.
    Withhold {
        /// The hook that withheld (or failed).
        by: String,
        /// Why.
        reason: String,
    },
}

/// What happens to a prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptDecision {
    /// Work on it as written.
    Allow,
    /// Do not work on it.
    Block {
        /// The hook that blocked (or failed).
        by: String,
        /// Why.
        reason: String,
    },
    /// Work on this text instead.
    Rewrite {
        /// The hooks that rewrote, comma-separated.
        by: String,
        /// The prompt text for the model.
        text: String,
    },
}

/// A `session.idle` hook that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFailure {
    /// The hook.
    pub by: String,
    /// What happened (a [`HookError`] message).
    pub reason: String,
}

/// One configured hook, checked.
#[derive(Debug, Clone)]
struct Hook {
    name: String,
    event: HookEvent,
    /// The program to execute: absolute (a workspace program joined to the root, or found on `PATH`).
    program: PathBuf,
    args: Vec<String>,
    /// `None`: every tool.
    tools: Option<Vec<String>>,
    timeout_ms: u64,
}

impl Hook {
    fn matches(&self, event: HookEvent, tool: Option<&str>) -> bool {
        self.event == event
            && match (&self.tools, tool) {
                (Some(tools), Some(tool)) => tools.iter().any(|name| name == tool),
                _ => true,
            }
    }
}

/// The environment every hook process gets (besides [`EVENT_ENV`]).
#[derive(Debug, Clone)]
struct HookEnv {
    path: OsString,
    home: OsString,
    /// The agent's proxy variables (set in an isolated sandbox, where the proxy is the only way out).
    proxy: Vec<(&'static str, OsString)>,
}

impl HookEnv {
    /// `PATH`, `HOME` and the proxy variables of the agent (whose own environment the host builds
    /// from nothing).
    fn of_agent(root: Option<&Path>) -> Self {
        Self {
            path: std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            home: std::env::var_os("HOME")
                .or_else(|| root.map(|root| root.as_os_str().to_owned()))
                .unwrap_or_else(|| "/".into()),
            proxy: env::PROXY_VARS
                .iter()
                .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)))
                .collect(),
        }
    }
}

/// The hooks of one workspace and its policy.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Canonical workspace root; `None` for [`Hooks::none`] (paths are then checked lexically only).
    root: Option<PathBuf>,
    hooks: Vec<Hook>,
    policy: Policy,
    env: HookEnv,
}

/// A hook's answer, parsed for its event.
enum Answer {
    Pass,
    Block(String),
    Withhold(String),
    RewriteInput(Value),
    RewriteOutput(String),
    RewriteText(String),
}

impl Hooks {
    /// No hooks, the default policy. Without a workspace root, write paths are checked lexically only
    /// (symlinks are not resolved).
    pub fn none() -> Hooks {
        Hooks {
            root: None,
            hooks: Vec::new(),
            policy: Policy::default(),
            env: HookEnv::of_agent(None),
        }
    }

    /// Read `<workspace_root>/.nightshift/hooks.toml`; without that file, no hooks and the default
    /// policy (with symlink-aware path checks in `workspace_root`).
    pub fn load(workspace_root: &Path) -> Result<Hooks, HookError> {
        let path = workspace_root.join(CONFIG_PATH);
        match std::fs::read_to_string(&path) {
            Ok(text) => config::parse(&text, &path.display().to_string(), workspace_root),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let root = canonical_root(workspace_root)?;
                Ok(Hooks {
                    env: HookEnv::of_agent(Some(&root)),
                    root: Some(root),
                    hooks: Vec::new(),
                    policy: Policy::default(),
                })
            }
            Err(source) => Err(HookError::Read { path, source }),
        }
    }

    /// Parse a configuration (the text of a `hooks.toml`) for the workspace at `workspace_root`.
    #[cfg(test)]
    pub fn from_toml(text: &str, workspace_root: &Path) -> Result<Hooks, HookError> {
        config::parse(text, CONFIG_PATH, workspace_root)
    }

    /// The built-in policy in force; the bash tool bind-mounts [`Policy::read_only_paths`] read-only.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether no hook is configured (the policy still applies).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Decide on a tool call: the policy, then the `tool.before` hooks that match `tool`, then the
    /// policy again on a rewritten input.
    pub async fn tool_before(
        &self,
        ctx: &HookContext,
        tool: &str,
        input: &Value,
    ) -> BeforeDecision {
        if let Some(block) = self.check_policy(tool, input) {
            return block;
        }
        let mut rewritten: Option<Value> = None;
        let mut rewriters: Vec<&str> = Vec::new();
        for hook in self.matching(HookEvent::ToolBefore, Some(tool)) {
            let mut payload = self.payload(HookEvent::ToolBefore, ctx);
            payload.insert("tool".into(), json!(tool));
            payload.insert("input".into(), rewritten.as_ref().unwrap_or(input).clone());
            match self.ask(hook, payload).await {
                Ok(Answer::RewriteInput(new_input)) => {
                    rewritten = Some(new_input);
                    rewriters.push(&hook.name);
                }
                Ok(Answer::Block(reason)) => return block(&hook.name, reason),
                Ok(_) => {}
                Err(error) => return block(&hook.name, error.to_string()),
            }
        }
        match rewritten {
            None => BeforeDecision::Allow,
            Some(input) => match self.check_policy(tool, &input) {
                Some(block) => block,
                None => BeforeDecision::Rewrite {
                    by: rewriters.join(", "),
                    input,
                },
            },
        }
    }

    /// Decide on a tool's output: the `tool.after` hooks that match `tool`, in order.
    pub async fn tool_after(
        &self,
        ctx: &HookContext,
        tool: &str,
        input: &Value,
        output: &str,
        ok: bool,
    ) -> AfterDecision {
        let mut rewritten: Option<String> = None;
        let mut rewriters: Vec<&str> = Vec::new();
        for hook in self.matching(HookEvent::ToolAfter, Some(tool)) {
            let mut payload = self.payload(HookEvent::ToolAfter, ctx);
            payload.insert("tool".into(), json!(tool));
            payload.insert("input".into(), input.clone());
            payload.insert(
                "output".into(),
                json!(rewritten.as_deref().unwrap_or(output)),
            );
            payload.insert("ok".into(), json!(ok));
            match self.ask(hook, payload).await {
                Ok(Answer::RewriteOutput(new_output)) => {
                    rewritten = Some(new_output);
                    rewriters.push(&hook.name);
                }
                Ok(Answer::Withhold(reason)) => return withhold(&hook.name, reason),
                Ok(_) => {}
                Err(error) => return withhold(&hook.name, error.to_string()),
            }
        }
        match rewritten {
            None => AfterDecision::Keep,
            Some(output) => AfterDecision::Rewrite {
                by: rewriters.join(", "),
                output,
            },
        }
    }

    /// Decide on a prompt: the `prompt.before` hooks, in order.
    pub async fn prompt_before(&self, ctx: &HookContext, text: &str) -> PromptDecision {
        let mut rewritten: Option<String> = None;
        let mut rewriters: Vec<&str> = Vec::new();
        for hook in self.matching(HookEvent::PromptBefore, None) {
            let mut payload = self.payload(HookEvent::PromptBefore, ctx);
            payload.insert("text".into(), json!(rewritten.as_deref().unwrap_or(text)));
            let refuse = |reason| PromptDecision::Block {
                by: hook.name.clone(),
                reason,
            };
            match self.ask(hook, payload).await {
                Ok(Answer::RewriteText(new_text)) => {
                    rewritten = Some(new_text);
                    rewriters.push(&hook.name);
                }
                Ok(Answer::Block(reason)) => return refuse(reason),
                Ok(_) => {}
                Err(error) => return refuse(error.to_string()),
            }
        }
        match rewritten {
            None => PromptDecision::Allow,
            Some(text) => PromptDecision::Rewrite {
                by: rewriters.join(", "),
                text,
            },
        }
    }

    /// Run every `session.idle` hook, in order; the ones that failed.
    pub async fn session_idle(&self, ctx: &HookContext) -> Vec<HookFailure> {
        let mut failures = Vec::new();
        for hook in self.matching(HookEvent::SessionIdle, None) {
            let payload = Value::Object(self.payload(HookEvent::SessionIdle, ctx));
            if let Err(error) = self.run(hook, &payload).await {
                failures.push(HookFailure {
                    by: hook.name.clone(),
                    reason: error.to_string(),
                });
            }
        }
        failures
    }

    fn matching<'a>(
        &'a self,
        event: HookEvent,
        tool: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Hook> + 'a {
        self.hooks
            .iter()
            .filter(move |hook| hook.matches(event, tool))
    }

    fn payload(&self, event: HookEvent, ctx: &HookContext) -> Map<String, Value> {
        let mut payload = Map::new();
        payload.insert("event".into(), json!(event.as_str()));
        payload.insert("session_id".into(), json!(ctx.session_id));
        payload.insert("prompt_id".into(), json!(ctx.prompt_id));
        payload.insert("author".into(), json!(ctx.author_login));
        payload
    }

    /// Run `hook` and parse its answer for its event.
    async fn ask(&self, hook: &Hook, payload: Map<String, Value>) -> Result<Answer, HookError> {
        let stdout = self.run(hook, &Value::Object(payload)).await?;
        parse_answer(hook, &stdout)
    }

    async fn run(&self, hook: &Hook, payload: &Value) -> Result<String, HookError> {
        // Only a loaded configuration has hooks, and it always has a root.
        let cwd = self.root.as_deref().unwrap_or(Path::new("/"));
        let payload = payload.to_string().into_bytes();
        process::run(hook, cwd, &self.env, &payload).await
    }

    /// The built-in policy's verdict on a tool call, if it blocks.
    fn check_policy(&self, tool: &str, input: &Value) -> Option<BeforeDecision> {
        if WRITE_TOOLS.contains(&tool) {
            let path = input.get("path").and_then(Value::as_str)?;
            let (relative, read_only) = self.policy.write_violation(self.root.as_deref(), path)?;
            return Some(block(
                READ_ONLY_PATHS_POLICY,
                format!(
                    "`{path}` is read-only: `{relative}` is under the read-only path `{read_only}`"
                ),
            ));
        }
        if tool == BASH_TOOL {
            let command = input.get("command").and_then(Value::as_str)?;
            let blocked = self.policy.blocked_command(command)?;
            return Some(block(
                BLOCKED_COMMANDS_POLICY,
                format!(
                    "{} (the command matches the blocked pattern `{}`)",
                    blocked.reason, blocked.pattern
                ),
            ));
        }
        None
    }
}

fn block(by: &str, reason: String) -> BeforeDecision {
    BeforeDecision::Block {
        by: by.to_owned(),
        reason,
    }
}

fn withhold(by: &str, reason: String) -> AfterDecision {
    AfterDecision::Withhold {
        by: by.to_owned(),
        reason,
    }
}

fn canonical_root(workspace_root: &Path) -> Result<PathBuf, HookError> {
    std::fs::canonicalize(workspace_root).map_err(|source| HookError::WorkspaceRoot {
        path: workspace_root.to_owned(),
        source,
    })
}

/// Parse what `hook` printed, for its event: empty is pass, else one JSON object with a `decision`.
fn parse_answer(hook: &Hook, stdout: &str) -> Result<Answer, HookError> {
    let invalid = |detail: String| HookError::InvalidAnswer {
        hook: hook.name.clone(),
        detail,
    };
    if stdout.trim().is_empty() {
        return Ok(Answer::Pass);
    }
    let answer: Value = serde_json::from_str(stdout)
        .map_err(|error| invalid(format!("not one json object ({error})")))?;
    let Value::Object(answer) = answer else {
        return Err(invalid("not a json object".to_owned()));
    };
    let decision = match answer.get("decision") {
        Some(Value::String(decision)) => decision.as_str(),
        Some(_) => return Err(invalid("`decision` is not a string".to_owned())),
        None => return Err(invalid("no `decision`".to_owned())),
    };
    let reason = || match answer.get("reason") {
        None | Some(Value::Null) => Ok("no reason given".to_owned()),
        Some(Value::String(reason)) => Ok(reason.clone()),
        Some(_) => Err(invalid("`reason` is not a string".to_owned())),
    };
    let string_field = |field: &str| match answer.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        _ => Err(invalid(format!("`{decision}` needs a string `{field}`"))),
    };
    match (hook.event, decision) {
        (HookEvent::ToolBefore | HookEvent::PromptBefore, "allow") => Ok(Answer::Pass),
        (HookEvent::ToolAfter, "keep") => Ok(Answer::Pass),
        (HookEvent::ToolBefore | HookEvent::PromptBefore, "block") => Ok(Answer::Block(reason()?)),
        (HookEvent::ToolAfter, "withhold") => Ok(Answer::Withhold(reason()?)),
        (HookEvent::ToolBefore, "rewrite") => match answer.get("input") {
            Some(input @ Value::Object(_)) => Ok(Answer::RewriteInput(input.clone())),
            _ => Err(invalid("`rewrite` needs an object `input`".to_owned())),
        },
        (HookEvent::ToolAfter, "rewrite") => Ok(Answer::RewriteOutput(string_field("output")?)),
        (HookEvent::PromptBefore, "rewrite") => Ok(Answer::RewriteText(string_field("text")?)),
        (event, decision) => Err(invalid(format!(
            "unknown decision {decision:?} for {event}"
        ))),
    }
}

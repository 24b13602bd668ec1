//! Logged events: everything clients see in a session's history, each stored with its `seq`.

use crate::{Author, PromptStatus, SandboxStatus};

/// One logged event with its place in the session's log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct EventEnvelope {
    /// Position in the log: contiguous, starting at 1, assigned only by the session object.
    pub seq: u64,
    /// When the session object logged it.
    pub ts_ms: u64,
    /// The event.
    pub event: Event,
}

/// A logged event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A prompt was accepted into the queue.
    PromptQueued {
        /// Prompt id.
        prompt_id: String,
        /// Who sent it.
        author: Author,
        /// The text.
        text: String,
    },
    /// The agent started working on a prompt.
    PromptStarted {
        /// Prompt id.
        prompt_id: String,
    },
    /// The agent finished a prompt.
    PromptFinished {
        /// Prompt id.
        prompt_id: String,
        /// How it ended.
        status: PromptStatus,
        /// Error detail when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A queued prompt was removed before it ran.
    PromptCancelled {
        /// Prompt id.
        prompt_id: String,
        /// Who cancelled it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// A piece of streamed model output.
    Token {
        /// Prompt id.
        prompt_id: String,
        /// The text delta.
        text: String,
    },
    /// A whole message (the agent's final text of a turn, or a system message).
    Message {
        /// Prompt id.
        prompt_id: String,
        /// `assistant`, `user` or `system`.
        role: String,
        /// The text.
        text: String,
    },
    /// The agent called a tool.
    ToolCall {
        /// Prompt id.
        prompt_id: String,
        /// Id of this call, matched by its `tool_result`.
        call_id: String,
        /// Tool name.
        tool: String,
        /// Tool arguments.
        input: serde_json::Value,
    },
    /// A tool call finished.
    ToolResult {
        /// Id of the call.
        call_id: String,
        /// Whether it succeeded.
        ok: bool,
        /// What it returned (possibly truncated, with a notice).
        output: String,
        /// How long it took.
        duration_ms: u64,
    },
    /// Output of a running tool (e.g. `bash`), streamed as it comes; the whole (capped) output
    /// follows in the call's `tool_result`.
    ToolOutput {
        /// Id of the call.
        call_id: String,
        /// The next piece of output.
        text: String,
    },
    /// A file in the workspace changed.
    FileChanged {
        /// Path relative to the workspace root.
        path: String,
        /// `added`, `modified` or `deleted`.
        change: FileChange,
        /// Lines added.
        additions: u64,
        /// Lines removed.
        deletions: u64,
        /// The change as a unified diff (`--- a/…`, `+++ b/…`, hunks), when the agent has one: exact for
        /// `write_file` and `edit_file`; for commands, the file against the last commit. Absent for binary
        /// files and files a command created; cut at 64 KiB with a `\ diff truncated` line. An addition to
        /// contract v1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
    },
    /// The sandbox changed state.
    SandboxStatus {
        /// New state.
        status: SandboxStatus,
        /// Human detail.
        #[serde(default)]
        detail: String,
    },
    /// Git catch-up progress.
    GitSync {
        /// `started`, `done` or `failed`.
        state: String,
        /// Commit reached, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
    },
    /// The agent pushed the session branch.
    Push {
        /// Branch name.
        branch: String,
        /// Commit pushed.
        commit: String,
    },
    /// A pull request was opened or changed.
    PullRequest {
        /// PR number.
        number: u64,
        /// PR url.
        url: String,
        /// `open`, `closed` or `merged`.
        state: String,
    },
    /// Token use and cost.
    Usage {
        /// Prompt id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt_id: Option<String>,
        /// Input tokens of this call.
        input_tokens: u64,
        /// Output tokens of this call.
        output_tokens: u64,
        /// Input tokens of this call read from the provider's prompt cache.
        #[serde(default, skip_serializing_if = "is_zero")]
        cache_read_tokens: u64,
        /// Input tokens of this call written to the provider's prompt cache.
        #[serde(default, skip_serializing_if = "is_zero")]
        cache_write_tokens: u64,
        /// Cost of this call; `null` when the model has no known price.
        cost_usd: Option<f64>,
        /// Session total so far; `null` when unknown.
        total_cost_usd: Option<f64>,
    },
    /// A sub-session changed state.
    ChildSession {
        /// Child session id.
        id: String,
        /// Its state.
        status: String,
    },
    /// A snapshot was taken.
    Snapshot {
        /// Snapshot id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Something people should know (demo model, limits, warnings).
    Notice {
        /// `info`, `warn` or `error`.
        level: String,
        /// The text.
        text: String,
    },
}

impl Event {
    /// The `type` tag of this event.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::PromptQueued { .. } => "prompt_queued",
            Event::PromptStarted { .. } => "prompt_started",
            Event::PromptFinished { .. } => "prompt_finished",
            Event::PromptCancelled { .. } => "prompt_cancelled",
            Event::Token { .. } => "token",
            Event::Message { .. } => "message",
            Event::ToolCall { .. } => "tool_call",
            Event::ToolResult { .. } => "tool_result",
            Event::ToolOutput { .. } => "tool_output",
            Event::FileChanged { .. } => "file_changed",
            Event::SandboxStatus { .. } => "sandbox_status",
            Event::GitSync { .. } => "git_sync",
            Event::Push { .. } => "push",
            Event::PullRequest { .. } => "pull_request",
            Event::Usage { .. } => "usage",
            Event::ChildSession { .. } => "child_session",
            Event::Snapshot { .. } => "snapshot",
            Event::Notice { .. } => "notice",
        }
    }
}

/// Kind of a file change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    /// New file.
    Added,
    /// Existing file changed.
    Modified,
    /// File removed.
    Deleted,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

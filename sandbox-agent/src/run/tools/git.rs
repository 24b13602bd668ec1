//! `git_status` and `git_diff`: what the agent changed so far, through the typed [`Git`] wrapper.
//! Both are reads; paths given to `git_diff` are confined like every other tool path.

use serde::Deserialize;
use serde_json::Value;

use super::{parse_input, ToolContext, ToolError, ToolOutput};
use crate::run::git::{Git, GitError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffInput {
    #[serde(default)]
    paths: Vec<String>,
}

fn git_failed(tool: &'static str, error: GitError) -> ToolError {
    ToolError::Crashed {
        tool,
        message: error.to_string(),
    }
}

/// `git status --short --branch` of the workspace.
pub async fn status(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let _: serde_json::Map<String, Value> = parse_input("git_status", input)?;
    let git = Git::new(ctx.workspace.root());
    let text = git
        .status()
        .await
        .map_err(|error| git_failed("git_status", error))?;
    Ok(ToolOutput::text(text))
}

/// The diff of the working tree against `HEAD`, optionally limited to paths.
pub async fn diff(ctx: &ToolContext, input: Value) -> Result<ToolOutput, ToolError> {
    let input: DiffInput = parse_input("git_diff", input)?;
    let mut paths = Vec::with_capacity(input.paths.len());
    for path in &input.paths {
        let resolved = ctx.workspace.resolve(path)?;
        paths.push(if resolved.relative.is_empty() {
            ".".to_owned()
        } else {
            resolved.relative
        });
    }
    let git = Git::new(ctx.workspace.root());
    let text = git
        .diff(&paths)
        .await
        .map_err(|error| git_failed("git_diff", error))?;
    if text.trim().is_empty() {
        return Ok(ToolOutput::text("no changes against HEAD".to_owned()));
    }
    Ok(ToolOutput::text(text))
}

//! `.nightshift/hooks.toml`: the file as serde sees it, and its checks into [`Hooks`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use super::policy::{normalize_relative, relative_text, PathProblem, CONFIG_DIR};
use super::{
    canonical_root, BlockedCommand, Hook, HookEnv, HookError, HookEvent, Hooks, Policy,
    DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    hooks: Vec<HookEntry>,
    #[serde(default)]
    policy: PolicyEntry,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookEntry {
    name: Option<String>,
    event: HookEvent,
    command: Vec<String>,
    tools: Option<Vec<String>>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicyEntry {
    read_only_paths: Vec<String>,
    blocked_commands: Vec<BlockedEntry>,
    default_blocked_commands: bool,
}

impl Default for PolicyEntry {
    fn default() -> Self {
        Self {
            read_only_paths: Vec::new(),
            blocked_commands: Vec::new(),
            default_blocked_commands: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockedEntry {
    pattern: String,
    reason: String,
}

/// Parse and check `text` (from `source`, for messages) for the workspace at `workspace_root`.
pub(super) fn parse(text: &str, source: &str, workspace_root: &Path) -> Result<Hooks, HookError> {
    let file: ConfigFile = toml::from_str(text).map_err(|error| HookError::Parse {
        path: source.to_owned(),
        source: error,
    })?;
    let root = canonical_root(workspace_root)?;
    let env = HookEnv::of_agent(Some(&root));
    let mut policy = check_policy(file.policy)?;
    let mut hooks = Vec::with_capacity(file.hooks.len());
    for (index, entry) in file.hooks.into_iter().enumerate() {
        let (hook, workspace_paths) = check_hook(index, entry, &root, &env)?;
        // The agent must not be able to change what guards it.
        for path in workspace_paths {
            policy.add_read_only(path);
        }
        hooks.push(hook);
    }
    Ok(Hooks {
        root: Some(root),
        hooks,
        policy,
        env,
    })
}

fn check_policy(entry: PolicyEntry) -> Result<Policy, HookError> {
    let mut policy = Policy {
        read_only_paths: vec![CONFIG_DIR.to_owned()],
        blocked_commands: if entry.default_blocked_commands {
            Policy::default_blocked_commands()
        } else {
            Vec::new()
        },
    };
    for path in entry.read_only_paths {
        let invalid = |detail| HookError::InvalidReadOnlyPath {
            path: path.clone(),
            detail,
        };
        let normalized = normalize_relative(&path).map_err(|problem| match problem {
            PathProblem::Absolute => {
                invalid("is absolute: read-only paths are relative to the workspace root")
            }
            PathProblem::LeavesWorkspace => invalid("leaves the workspace"),
        })?;
        if normalized.is_empty() {
            return Err(invalid("names the whole workspace"));
        }
        policy.add_read_only(normalized);
    }
    for blocked in entry.blocked_commands {
        let pattern = Regex::new(&blocked.pattern).map_err(|source| HookError::InvalidPattern {
            pattern: blocked.pattern.clone(),
            source,
        })?;
        policy.blocked_commands.push(BlockedCommand {
            pattern,
            reason: blocked.reason,
        });
    }
    Ok(policy)
}

/// Check one `[[hooks]]` entry; also returns the workspace-relative paths of its program (as
/// configured and as resolved), which become read-only.
fn check_hook(
    index: usize,
    entry: HookEntry,
    root: &Path,
    env: &HookEnv,
) -> Result<(Hook, Vec<String>), HookError> {
    let name = match entry.name {
        Some(name) if name.trim().is_empty() || name.starts_with("policy:") => {
            return Err(HookError::InvalidName { hook: name })
        }
        Some(name) => name,
        None if entry.command.is_empty() => format!("hooks[{index}]"),
        None => entry.command.join(" "),
    };
    let mut command = entry.command.into_iter();
    let program = match command.next() {
        Some(program) if !program.is_empty() => program,
        _ => return Err(HookError::EmptyCommand { hook: name }),
    };
    let timeout_ms = entry.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(HookError::InvalidTimeout {
            hook: name,
            timeout_ms,
        });
    }
    if let Some(tools) = &entry.tools {
        let detail = if !entry.event.is_tool_event() {
            Some(format!("applies only to tool events, not {}", entry.event))
        } else if tools.is_empty() {
            Some("is empty: leave it out to match every tool".to_owned())
        } else {
            None
        };
        if let Some(detail) = detail {
            return Err(HookError::InvalidTools { hook: name, detail });
        }
    }
    let (program_path, workspace_paths) = resolve_program(&name, &program, root, env)?;
    Ok((
        Hook {
            name,
            event: entry.event,
            program: program_path,
            args: command.collect(),
            tools: entry.tools,
            timeout_ms,
        },
        workspace_paths,
    ))
}

/// Find the program to execute: the path to run it by, and its workspace-relative paths (as written
/// and as resolved) if it lives in the workspace.
fn resolve_program(
    hook: &str,
    program: &str,
    root: &Path,
    env: &HookEnv,
) -> Result<(PathBuf, Vec<String>), HookError> {
    let outside = || HookError::ProgramOutsideWorkspace {
        hook: hook.to_owned(),
        program: program.to_owned(),
    };
    let not_found = || HookError::ProgramNotFound {
        hook: hook.to_owned(),
        program: program.to_owned(),
    };
    let mut workspace_paths = Vec::new();
    let run_path = if !program.contains('/') {
        find_on_path(program, &env.path).ok_or_else(not_found)?
    } else if Path::new(program).is_absolute() {
        PathBuf::from(program)
    } else {
        let relative = normalize_relative(program).map_err(|_| outside())?;
        workspace_paths.push(relative.clone());
        root.join(relative)
    };
    let canonical = std::fs::canonicalize(&run_path).map_err(|_| not_found())?;
    match canonical.strip_prefix(root) {
        Ok(inside) => {
            let inside = relative_text(inside).ok_or_else(|| HookError::InvalidReadOnlyPath {
                path: inside.to_string_lossy().into_owned(),
                detail: "(a hook program) is not utf-8",
            })?;
            workspace_paths.push(inside);
        }
        Err(_) if !workspace_paths.is_empty() => return Err(outside()),
        Err(_) => {}
    }
    if !is_executable_file(&canonical) {
        return Err(HookError::ProgramNotExecutable {
            hook: hook.to_owned(),
            program: program.to_owned(),
        });
    }
    Ok((run_path, workspace_paths))
}

/// The first executable file called `name` in an absolute directory of `path`. Relative entries are
/// skipped: they would depend on the working directory.
fn find_on_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

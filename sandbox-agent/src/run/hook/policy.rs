//! The built-in policy: read-only paths and blocked bash commands, and the lexical path normalization
//! both the configuration and the checks use.

use std::path::{Component, Path, PathBuf};

use regex::Regex;

/// The directory of the hook configuration and hook scripts; always read-only.
pub const CONFIG_DIR: &str = ".nightshift";

/// The blocked commands every policy starts with (unless `default_blocked_commands = false`):
/// `(pattern, reason)`. `[^;&|\n]*` keeps a match inside one simple command.
const DEFAULT_BLOCKED_COMMANDS: &[(&str, &str)] = &[
    (
        r"\bgit\b[^;&|\n]*\spush\b[^;&|\n]*\s(--force(-with-lease|-if-includes)?\b|-[a-zA-Z0-9]*f|\+[^\s;&|]+)",
        "force-pushing rewrites history others may have fetched; push new commits instead",
    ),
    (
        r"\bgit\b[^;&|\n]*\sconfig\b[^;&|\n]*\suser\.",
        "the commit identity is set by the platform; the agent does not read or change git's user.* settings",
    ),
    (
        r"\bgit\b[^;&|\n]*\s(-c\s*|--config-env[=\s])user\.",
        "the commit identity is set by the platform; the agent does not override git's user.* settings",
    ),
    (
        r"\bgit\b[^;&|\n]*\scommit\b[^;&|\n]*\s--author\b",
        "the commit identity is set by the platform; the agent does not choose a commit author",
    ),
    (
        r"\bGIT_(AUTHOR|COMMITTER)_(NAME|EMAIL)\b",
        "the commit identity is set by the platform; the agent does not set GIT_AUTHOR_* or GIT_COMMITTER_*",
    ),
];

/// Most symlinks followed by hand when resolving a path (as the kernel's `ELOOP` limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// A bash command the policy refuses.
#[derive(Debug, Clone)]
pub struct BlockedCommand {
    /// Matched anywhere in the `command` input of `bash`.
    pub pattern: Regex,
    /// Why, for the model.
    pub reason: String,
}

/// The built-in policy of a workspace.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Paths no tool may change: workspace-relative, normalized, `/`-separated, no trailing slash,
    /// without duplicates; always starts with `.nightshift`. The write tools are checked against them
    /// in [`super::Hooks::tool_before`]; the bash tool bind-mounts each read-only.
    pub read_only_paths: Vec<String>,
    /// Bash commands to refuse, the defaults first.
    pub blocked_commands: Vec<BlockedCommand>,
}

impl Default for Policy {
    /// `.nightshift` read-only and the default blocked commands.
    fn default() -> Self {
        Self {
            read_only_paths: vec![CONFIG_DIR.to_owned()],
            blocked_commands: Self::default_blocked_commands(),
        }
    }
}

impl Policy {
    /// The built-in blocked commands: force pushes, and changes of the commit identity (`git config
    /// user.*`, `git -c user.*`, `git commit --author`, `GIT_AUTHOR_*` / `GIT_COMMITTER_*`).
    pub fn default_blocked_commands() -> Vec<BlockedCommand> {
        DEFAULT_BLOCKED_COMMANDS
            .iter()
            // The patterns are constants, compiled in a test; none is ever skipped.
            .filter_map(|(pattern, reason)| {
                Regex::new(pattern).ok().map(|pattern| BlockedCommand {
                    pattern,
                    reason: (*reason).to_owned(),
                })
            })
            .collect()
    }

    /// Add a read-only path (already normalized) unless a path already listed covers it.
    pub(super) fn add_read_only(&mut self, path: String) {
        if self.read_only_match(&path).is_none() {
            self.read_only_paths.push(path);
        }
    }

    /// The read-only path that covers the workspace-relative `path`, if any. `path` is normalized
    /// lexically first; one that is absolute or leaves the workspace is covered by nothing.
    pub fn read_only_match(&self, path: &str) -> Option<&str> {
        let path = normalize_relative(path).ok()?;
        self.read_only_paths
            .iter()
            .find(|read_only| is_under(&path, read_only))
            .map(String::as_str)
    }

    /// The first blocked command `command` matches, if any.
    pub fn blocked_command(&self, command: &str) -> Option<&BlockedCommand> {
        self.blocked_commands
            .iter()
            .find(|blocked| blocked.pattern.is_match(command))
    }

    /// Whether writing the tool path `path` would change a read-only path: `(workspace-relative path,
    /// read-only path)`. With a `root`, `path` is checked both as written and as the file system
    /// resolves it (a symlink inside the workspace that leads into a read-only path).
    pub(super) fn write_violation(
        &self,
        root: Option<&Path>,
        path: &str,
    ) -> Option<(String, &str)> {
        let lexical = match root {
            Some(root) => {
                let absolute = normalize_absolute(&root.join(path));
                relative_text(absolute.strip_prefix(root).ok()?)
            }
            None => normalize_relative(path).ok(),
        }?;
        if let Some(read_only) = self.read_only_match(&lexical) {
            return Some((lexical, read_only));
        }
        let resolved = resolve_existing(root?, &lexical)?;
        let read_only = self.read_only_match(&resolved)?;
        Some((resolved, read_only))
    }
}

/// Why a path cannot be made workspace-relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PathProblem {
    Absolute,
    LeavesWorkspace,
}

/// Normalize a relative path lexically: drop `.` and empty components, apply `..`; `/`-separated, no
/// trailing slash (the root itself is `""`).
pub(super) fn normalize_relative(path: &str) -> Result<String, PathProblem> {
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or(PathProblem::LeavesWorkspace)?;
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// Normalize an absolute path lexically (`..` at the root stays at the root).
fn normalize_absolute(path: &Path) -> PathBuf {
    let mut normalized = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normalized.pop();
            }
            Component::CurDir => {}
            other => normalized.push(other),
        }
    }
    normalized
}

/// `path` (relative) as `/`-separated text; `None` if a component is not UTF-8.
pub(super) fn relative_text(path: &Path) -> Option<String> {
    let parts: Option<Vec<&str>> = path.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/"))
}

/// Whether `path` is `prefix` or below it, by components (both normalized).
fn is_under(path: &str, prefix: &str) -> bool {
    Path::new(path).starts_with(prefix)
}

/// Where the workspace-relative `relative` really is: the nearest existing ancestor canonicalized, the
/// missing rest appended; a dangling symlink is followed by hand (writing through it would create its
/// target). `None` outside the (canonical) `root` or when it cannot be resolved.
pub(super) fn resolve_existing(root: &Path, relative: &str) -> Option<String> {
    let mut target = root.join(relative);
    for _ in 0..MAX_SYMLINK_HOPS {
        let mut existing = target.as_path();
        let mut missing = Vec::new();
        while std::fs::symlink_metadata(existing).is_err() {
            missing.push(existing.file_name()?.to_owned());
            existing = existing.parent()?;
        }
        if let Ok(canonical) = std::fs::canonicalize(existing) {
            let mut inside = canonical.strip_prefix(root).ok()?.to_path_buf();
            inside.extend(missing.iter().rev());
            return relative_text(&inside);
        }
        let link = std::fs::read_link(existing).ok()?;
        let mut next = std::fs::canonicalize(existing.parent()?).ok()?.join(link);
        next.extend(missing.iter().rev());
        target = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_patterns_all_compile() {
        assert_eq!(
            Policy::default_blocked_commands().len(),
            DEFAULT_BLOCKED_COMMANDS.len()
        );
    }

    #[test]
    fn normalize() {
        let check = |path: &str, expected: Result<&str, PathProblem>| {
            assert_eq!(
                normalize_relative(path),
                expected.map(str::to_owned),
                "{path}"
            );
        };
        check(".nightshift", Ok(".nightshift"));
        check("./.nightshift/", Ok(".nightshift"));
        check("migrations/", Ok("migrations"));
        check("a//b///c", Ok("a/b/c"));
        check("src/../.nightshift/x", Ok(".nightshift/x"));
        check("a/./b/../c", Ok("a/c"));
        check(".", Ok(""));
        check("", Ok(""));
        check("../x", Err(PathProblem::LeavesWorkspace));
        check("a/../../x", Err(PathProblem::LeavesWorkspace));
        check("/etc", Err(PathProblem::Absolute));
    }

    fn check_read_only(policy: &Policy, path: &str, expected: Option<&str>) {
        assert_eq!(policy.read_only_match(path), expected, "{path}");
        assert_eq!(
            policy.write_violation(None, path).map(|(_, ro)| ro),
            expected,
            "{path}"
        );
    }

    #[test]
    fn read_only_paths_compare_by_components() {
        let mut policy = Policy::default();
        policy.add_read_only("migrations".to_owned());
        policy.add_read_only(".nightshift/hooks".to_owned()); // covered already
        assert_eq!(policy.read_only_paths, [".nightshift", "migrations"]);
        let p = &policy;
        check_read_only(p, ".nightshift", Some(".nightshift"));
        check_read_only(p, ".nightshift/hooks.toml", Some(".nightshift"));
        check_read_only(p, "./.nightshift/hooks.toml", Some(".nightshift"));
        check_read_only(p, ".nightshift//hooks/guard.sh", Some(".nightshift"));
        check_read_only(p, "src/../.nightshift/x", Some(".nightshift"));
        check_read_only(p, "a/b/../../.nightshift/./x", Some(".nightshift"));
        check_read_only(p, "migrations/001.sql", Some("migrations"));
        check_read_only(p, ".nightshiftX", None);
        check_read_only(p, ".nightshiftX/hooks.toml", None);
        check_read_only(p, "src/.nightshift/x", None);
        check_read_only(p, "migrationsX/001.sql", None);
        check_read_only(p, "src/main.rs", None);
        // Outside the workspace: the write tool refuses it; no read-only path covers it.
        check_read_only(p, "../.nightshift/x", None);
        check_read_only(p, "/.nightshift/x", None);
    }

    #[test]
    fn write_violation_with_a_root_sees_through_symlinks_and_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap().join("ws");
        std::fs::create_dir_all(root.join(".nightshift")).unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::os::unix::fs::symlink(root.join(".nightshift"), root.join("cfg")).unwrap();
        std::os::unix::fs::symlink(".nightshift/hooks.toml", root.join("src/link")).unwrap();
        std::os::unix::fs::symlink(".nightshift/new.sh", root.join("dangling")).unwrap();
        std::os::unix::fs::symlink("../dangling", root.join("src/chain")).unwrap();
        let policy = Policy::default();
        let check = |path: &str, expected: Option<&str>| {
            assert_eq!(
                policy
                    .write_violation(Some(&root), path)
                    .map(|(relative, _)| relative),
                expected.map(str::to_owned),
                "{path}"
            );
        };
        check("cfg/hooks.toml", Some(".nightshift/hooks.toml"));
        check("cfg/new/deep.sh", Some(".nightshift/new/deep.sh"));
        check("cfg", Some(".nightshift"));
        check(
            "../ws/.nightshift/hooks.toml",
            Some(".nightshift/hooks.toml"),
        );
        check(
            &root.join(".nightshift/x").display().to_string(),
            Some(".nightshift/x"),
        );
        check("src/main.rs", None);
        check("src/new/file.rs", None);
        check(".nightshiftX", None);
        // Dangling links are followed: writing through one would create its target.
        check("dangling", Some(".nightshift/new.sh"));
        check("src/chain", Some(".nightshift/new.sh"));
        // A link's target is relative to the link's directory: `src/.nightshift/hooks.toml`.
        check("src/link", None);
    }

    fn check_command(policy: &Policy, command: &str, blocked: bool) {
        assert_eq!(
            policy.blocked_command(command).is_some(),
            blocked,
            "{command}"
        );
    }

    #[test]
    fn default_blocked_commands() {
        let p = &Policy::default();
        for command in [
            "git push --force origin x",
            "git push origin x --force",
            "git push -f origin x",
            "git push -uf origin x",
            "git push --force-with-lease origin x",
            "git push --force-if-includes --force-with-lease",
            "git push origin +main",
            "git push origin +HEAD:refs/heads/main",
            "git -C /tmp/x push -f",
            "cd src && git push --force",
            "git  push\t--force",
            "git config user.name 'Mallory'",
            "git config --global user.email m@example.com",
            "git config --unset user.name",
            "git -c user.name=Mallory commit -m x",
            "git -cuser.email=m@x commit -m x",
            "git --config-env=user.name=NAME commit -m x",
            "git commit --author='Mallory <m@x>' -m x",
            "GIT_AUTHOR_NAME=Mallory git commit -m x",
            "export GIT_COMMITTER_EMAIL=m@x",
        ] {
            check_command(p, command, true);
        }
        for command in [
            "git push origin x",
            "git push -u origin x",
            "git push --follow-tags origin x",
            "git push origin x && git log -1",
            "git push origin x; echo +1",
            "git push origin x | tee -f log",
            "git commit -m 'force push later'",
            "git config core.autocrlf false",
            "git log --author=alice",
            "echo git push is fine",
            "cargo test -- --force",
            "legit push --force",
        ] {
            check_command(p, command, false);
        }
    }
}

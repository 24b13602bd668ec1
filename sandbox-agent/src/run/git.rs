//! Git through the CLI behind a small typed wrapper: the catch-up when the agent starts ([`Git::sync`]),
//! status and diff for the model, and the commit + push that end a prompt.
//!
//! Invariant: identities are passed per command through the environment (`GIT_AUTHOR_*`,
//! `GIT_COMMITTER_*`); no git config file is ever written. Every command runs with
//! `GIT_TERMINAL_PROMPT=0` so a missing credential fails instead of waiting for a terminal.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Most bytes of stderr kept in an error.
const STDERR_LIMIT_BYTES: usize = 2048;
/// The remote every sandbox clones from.
pub const REMOTE: &str = "origin";
/// Prefix of every session branch.
pub const BRANCH_PREFIX: &str = "nightshift/";

/// What went wrong running git.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// git exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The session id cannot be part of a branch name.
    #[error("session id `{session_id}` cannot name a branch")]
    InvalidSessionId {
        /// The id.
        session_id: String,
    },
}

/// A person or the agent, as git records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Display name.
    pub name: String,
    /// Email address.
    pub email: String,
}

impl Identity {
    /// The identity every agent commit is committed by.
    pub fn nightshift() -> Identity {
        Identity {
            name: "Nightshift".to_owned(),
            email: "agent@nightshift.dev".to_owned(),
        }
    }
}

/// Where the catch-up left the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The base branch caught up to.
    pub base_branch: String,
    /// The session branch now checked out.
    pub session_branch: String,
    /// `HEAD` after the catch-up.
    pub commit: String,
    /// Whether the session branch already existed (a restarted agent): then nothing was reset.
    pub resumed: bool,
}

/// The branch of a session: `nightshift/<session-id>`.
pub fn session_branch(session_id: &str) -> Result<String, GitError> {
    let valid = !session_id.is_empty()
        && session_id.len() <= 64
        && session_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(GitError::InvalidSessionId {
            session_id: session_id.to_owned(),
        });
    }
    Ok(format!("{BRANCH_PREFIX}{session_id}"))
}

/// A working copy.
#[derive(Debug, Clone)]
pub struct Git {
    root: PathBuf,
}

impl Git {
    /// The working copy at `root`.
    pub fn new(root: &Path) -> Git {
        Git {
            root: root.to_path_buf(),
        }
    }

    /// Run git with `args`, and `env` on top of the agent's environment; stdout on success.
    pub async fn run<I, S>(&self, args: I, env: &[(&str, &str)]) -> Result<String, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let command_line = format!(
            "git {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let output = Command::new("git")
            .args(&args)
            .current_dir(&self.root)
            .env("GIT_TERMINAL_PROMPT", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| GitError::Spawn {
                command: command_line.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(GitError::Command {
                command: command_line,
                status: output.status.to_string(),
                stderr: tail(&output.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Pack the loose objects into one pack (and delete them) when there are more than `threshold`:
    /// a commit of hundreds of files leaves as many object files, which every snapshot would archive
    /// and every restore unpack one by one. Whether it packed.
    pub async fn pack_loose_objects(&self, threshold: u64) -> Result<bool, GitError> {
        let counts = self.run(["count-objects"], &[]).await?;
        let loose: u64 = counts
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if loose <= threshold {
            return Ok(false);
        }
        self.run(["repack", "-d", "-q"], &[]).await?;
        Ok(true)
    }

    /// Whether the workspace is a git working copy.
    pub async fn is_repository(&self) -> bool {
        self.run(["rev-parse", "--is-inside-work-tree"], &[])
            .await
            .is_ok_and(|out| out.trim() == "true")
    }

    /// `HEAD`'s commit id.
    pub async fn head(&self) -> Result<String, GitError> {
        Ok(self
            .run(["rev-parse", "HEAD"], &[])
            .await?
            .trim()
            .to_owned())
    }

    /// The branch checked out, if any.
    pub async fn current_branch(&self) -> Result<Option<String>, GitError> {
        let out = self
            .run(["symbolic-ref", "--quiet", "--short", "HEAD"], &[])
            .await;
        match out {
            Ok(name) => Ok(Some(name.trim().to_owned())),
            Err(GitError::Command { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn has_local_branch(&self, branch: &str) -> Result<bool, GitError> {
        let reference = format!("refs/heads/{branch}");
        match self
            .run(["show-ref", "--verify", "--quiet", &reference], &[])
            .await
        {
            Ok(_) => Ok(true),
            Err(GitError::Command { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The catch-up: fetch the base branch, reset it to the remote, create the session branch from it.
    /// When the session branch already exists (the agent restarted), it is checked out as it is and
    /// nothing is reset, so no work is lost.
    pub async fn sync(
        &self,
        base_branch: Option<&str>,
        session_branch: &str,
    ) -> Result<SyncOutcome, GitError> {
        let base_branch = match base_branch.filter(|b| !b.trim().is_empty()) {
            Some(branch) => branch.to_owned(),
            None => self.default_base_branch().await?,
        };
        if self.has_local_branch(session_branch).await? {
            if self.current_branch().await?.as_deref() != Some(session_branch) {
                self.run(["checkout", "--quiet", session_branch], &[])
                    .await?;
            }
            return Ok(SyncOutcome {
                base_branch,
                session_branch: session_branch.to_owned(),
                commit: self.head().await?,
                resumed: true,
            });
        }
        let refspec = format!("+refs/heads/{base_branch}:refs/remotes/{REMOTE}/{base_branch}");
        self.run(["fetch", "--quiet", "--no-tags", REMOTE, &refspec], &[])
            .await?;
        let upstream = format!("{REMOTE}/{base_branch}");
        self.run(["checkout", "--quiet", "-B", &base_branch, &upstream], &[])
            .await?;
        self.run(["reset", "--quiet", "--hard", &upstream], &[])
            .await?;
        self.run(["checkout", "--quiet", "-b", session_branch], &[])
            .await?;
        Ok(SyncOutcome {
            base_branch,
            session_branch: session_branch.to_owned(),
            commit: self.head().await?,
            resumed: false,
        })
    }

    /// The branch checked out at clone time, or the remote's default.
    async fn default_base_branch(&self) -> Result<String, GitError> {
        if let Some(branch) = self.current_branch().await? {
            if !branch.starts_with(BRANCH_PREFIX) {
                return Ok(branch);
            }
        }
        let head = self
            .run(
                [
                    "symbolic-ref",
                    "--quiet",
                    "--short",
                    "refs/remotes/origin/HEAD",
                ],
                &[],
            )
            .await?;
        Ok(head
            .trim()
            .strip_prefix("origin/")
            .unwrap_or(head.trim())
            .to_owned())
    }

    /// `git status --short --branch`, for people and the model.
    pub async fn status(&self) -> Result<String, GitError> {
        self.run(["status", "--short", "--branch"], &[]).await
    }

    /// The diff of the working tree against `HEAD` (untracked files are listed, not shown),
    /// optionally limited to paths.
    pub async fn diff(&self, paths: &[String]) -> Result<String, GitError> {
        let mut args = vec!["diff".to_owned(), "HEAD".to_owned(), "--".to_owned()];
        args.extend(paths.iter().cloned());
        let mut diff = self.run(&args, &[]).await?;
        let untracked = self
            .run(["ls-files", "--others", "--exclude-standard"], &[])
            .await?;
        if !untracked.trim().is_empty() {
            diff.push_str("\nuntracked files (not in the diff):\n");
            diff.push_str(&untracked);
        }
        Ok(diff)
    }

    /// Whether anything differs from `HEAD`, untracked files included.
    pub async fn is_dirty(&self) -> Result<bool, GitError> {
        let status = self
            .run(["status", "--porcelain=v1", "--untracked-files=all"], &[])
            .await?;
        Ok(!status.trim().is_empty())
    }

    /// Commit everything, authored by `author` and committed by `committer`; `None` when there was
    /// nothing to commit.
    pub async fn commit_all(
        &self,
        author: &Identity,
        committer: &Identity,
        message: &str,
    ) -> Result<Option<String>, GitError> {
        if !self.is_dirty().await? {
            return Ok(None);
        }
        self.run(["add", "--all"], &[]).await?;
        let env = [
            ("GIT_AUTHOR_NAME", author.name.as_str()),
            ("GIT_AUTHOR_EMAIL", author.email.as_str()),
            ("GIT_COMMITTER_NAME", committer.name.as_str()),
            ("GIT_COMMITTER_EMAIL", committer.email.as_str()),
        ];
        self.run(
            [
                "commit",
                "--quiet",
                "--no-verify",
                "--no-gpg-sign",
                "-m",
                message,
            ],
            &env,
        )
        .await?;
        Ok(Some(self.head().await?))
    }

    /// Push `branch` to the remote (creating it there), without force.
    pub async fn push(&self, branch: &str) -> Result<(), GitError> {
        let refspec = format!("refs/heads/{branch}:refs/heads/{branch}");
        self.run(["push", "--quiet", "--no-verify", REMOTE, &refspec], &[])
            .await?;
        Ok(())
    }
}

/// The end of `bytes` as text, for errors.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= STDERR_LIMIT_BYTES {
        return text.to_owned();
    }
    let mut start = text.len() - STDERR_LIMIT_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", text.get(start..).unwrap_or_default())
}

/// The commit message of a prompt: its first line (shortened), the full text, and trailers.
pub fn commit_message(prompt_text: &str, prompt_id: &str, session_id: &str) -> String {
    const SUBJECT_LIMIT_CHARS: usize = 72;
    let first_line = prompt_text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("Nightshift changes");
    let subject: String = if first_line.chars().count() > SUBJECT_LIMIT_CHARS {
        let cut: String = first_line.chars().take(SUBJECT_LIMIT_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        first_line.to_owned()
    };
    let mut message = subject;
    let body = prompt_text.trim();
    if body != first_line {
        message.push_str("\n\n");
        message.push_str(body);
    }
    message.push_str(&format!(
        "\n\nNightshift-Session: {session_id}\nNightshift-Prompt: {prompt_id}\n"
    ));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn git(dir: &Path, args: &[&str]) -> String {
        Git::new(dir).run(args, &[]).await.expect("git")
    }

    /// A bare "remote" with one commit on `main`, and a clone of it.
    async fn remote_and_clone() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote = dir.path().join("remote.git");
        let seed = dir.path().join("seed");
        let clone = dir.path().join("clone");
        std::fs::create_dir_all(&seed).expect("mkdir");
        let id = [
            ("GIT_AUTHOR_NAME", "Seed"),
            ("GIT_AUTHOR_EMAIL", "seed@example.com"),
            ("GIT_COMMITTER_NAME", "Seed"),
            ("GIT_COMMITTER_EMAIL", "seed@example.com"),
        ];
        git(
            dir.path(),
            &["init", "--quiet", "--bare", "-b", "main", "remote.git"],
        )
        .await;
        git(&seed, &["init", "--quiet", "-b", "main"]).await;
        std::fs::write(seed.join("README.md"), "hello\n").expect("write");
        git(&seed, &["add", "."]).await;
        Git::new(&seed)
            .run(["commit", "--quiet", "-m", "seed"], &id)
            .await
            .expect("commit");
        git(
            &seed,
            &["push", "--quiet", remote.to_str().expect("utf8"), "main"],
        )
        .await;
        git(
            dir.path(),
            &["clone", "--quiet", remote.to_str().expect("utf8"), "clone"],
        )
        .await;
        (dir, seed, clone)
    }

    #[tokio::test]
    async fn sync_catches_up_and_creates_the_session_branch() {
        let (_dir, seed, clone) = remote_and_clone().await;
        // The remote moves on after the clone (the image is older than the base branch).
        std::fs::write(seed.join("NEW.md"), "new\n").expect("write");
        git(&seed, &["add", "."]).await;
        Git::new(&seed)
            .run(
                ["commit", "--quiet", "-m", "later"],
                &[
                    ("GIT_AUTHOR_NAME", "Seed"),
                    ("GIT_AUTHOR_EMAIL", "s@e"),
                    ("GIT_COMMITTER_NAME", "Seed"),
                    ("GIT_COMMITTER_EMAIL", "s@e"),
                ],
            )
            .await
            .expect("commit");
        let remote = clone.parent().expect("parent").join("remote.git");
        git(
            &seed,
            &["push", "--quiet", remote.to_str().expect("utf8"), "main"],
        )
        .await;
        let later = git(&seed, &["rev-parse", "HEAD"]).await;

        let repo = Git::new(&clone);
        let branch = session_branch("abc123").expect("branch");
        let outcome = repo.sync(None, &branch).await.expect("sync");
        assert_eq!(outcome.base_branch, "main");
        assert_eq!(outcome.commit, later.trim());
        assert!(!outcome.resumed);
        assert_eq!(
            repo.current_branch().await.expect("branch").as_deref(),
            Some("nightshift/abc123")
        );
        assert!(clone.join("NEW.md").exists());

        // A restarted agent keeps its uncommitted work.
        std::fs::write(clone.join("wip.txt"), "work in progress\n").expect("write");
        let again = repo.sync(Some("main"), &branch).await.expect("sync again");
        assert!(again.resumed);
        assert!(clone.join("wip.txt").exists());
    }

    #[tokio::test]
    async fn sync_of_a_missing_base_branch_fails_with_the_command() {
        let (_dir, _seed, clone) = remote_and_clone().await;
        let error = Git::new(&clone)
            .sync(Some("no-such-branch"), "nightshift/x")
            .await
            .expect_err("missing branch");
        assert!(
            matches!(&error, GitError::Command { command, .. } if command.starts_with("git fetch")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn commits_are_authored_by_the_person_and_committed_by_nightshift() {
        let (_dir, _seed, clone) = remote_and_clone().await;
        let repo = Git::new(&clone);
        let branch = session_branch("s1").expect("branch");
        repo.sync(None, &branch).await.expect("sync");
        let ada = Identity {
            name: "Ada Lovelace".to_owned(),
            email: "ada@example.com".to_owned(),
        };
        assert_eq!(
            repo.commit_all(&ada, &Identity::nightshift(), "nothing")
                .await
                .expect("commit"),
            None,
            "a clean tree makes no commit"
        );
        std::fs::write(clone.join("a.txt"), "a\n").expect("write");
        let message = commit_message("Add a\nwith detail", "p1", "s1");
        let commit = repo
            .commit_all(&ada, &Identity::nightshift(), &message)
            .await
            .expect("commit")
            .expect("a commit");
        repo.push(&branch).await.expect("push");
        let log = git(&clone, &["log", "-1", "--format=%an <%ae>|%cn <%ce>|%s"]).await;
        assert_eq!(
            log.trim(),
            "Ada Lovelace <ada@example.com>|Nightshift <agent@nightshift.dev>|Add a"
        );
        let remote = clone.parent().expect("parent").join("remote.git");
        let pushed = git(&remote, &["rev-parse", "refs/heads/nightshift/s1"]).await;
        assert_eq!(pushed.trim(), commit);
        // No identity was written to any config.
        let config = std::fs::read_to_string(clone.join(".git/config")).expect("config");
        assert!(!config.contains("Ada"), "{config}");
    }

    #[test]
    fn session_branches_are_checked() {
        assert_eq!(session_branch("0f3a").expect("ok"), "nightshift/0f3a");
        for bad in ["", "a b", "../x", "x~1", "a:b"] {
            assert!(session_branch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_messages_have_a_short_subject_and_trailers() {
        let long = "x".repeat(100);
        let message = commit_message(&long, "p", "s");
        let subject = message.lines().next().expect("subject");
        assert_eq!(subject.chars().count(), 72);
        assert!(message.ends_with("Nightshift-Session: s\nNightshift-Prompt: p\n"));
        assert!(commit_message("  \n", "p", "s").starts_with("Nightshift changes"));
    }

    #[tokio::test]
    async fn many_loose_objects_are_packed_and_few_are_left_alone() {
        let (_dir, _remote, clone) = remote_and_clone().await;
        let repo = Git::new(&clone);
        assert!(!repo.pack_loose_objects(64).await.expect("count"));
        for n in 0..100 {
            std::fs::write(clone.join(format!("file_{n}.txt")), format!("{n}\n")).expect("write");
        }
        git(&clone, &["add", "."]).await;
        let id = [
            ("GIT_AUTHOR_NAME", "A"),
            ("GIT_AUTHOR_EMAIL", "a@example.com"),
            ("GIT_COMMITTER_NAME", "A"),
            ("GIT_COMMITTER_EMAIL", "a@example.com"),
        ];
        repo.run(["commit", "--quiet", "-m", "many"], &id)
            .await
            .expect("commit");
        let loose =
            |text: String| -> u64 { text.split_whitespace().next().unwrap().parse().unwrap() };
        assert!(loose(git(&clone, &["count-objects"]).await) > 64);
        assert!(repo.pack_loose_objects(64).await.expect("pack"));
        assert_eq!(loose(git(&clone, &["count-objects"]).await), 0);
        assert_eq!(git(&clone, &["show", "HEAD:file_7.txt"]).await, "7\n");
    }
}

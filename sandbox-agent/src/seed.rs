//! `sandbox-agent seed`: creates a repository in a local git store (the host's `<data-dir>/git`),
//! as a bare repository `<store>/<owner>/<name>.git` whose first commit on the chosen branch is a
//! small demo project.
//!
//! This module also owns the names that reach the filesystem: [`RepoName`] and [`validate_branch`]
//! are the only way a repository or branch name received from outside becomes a path or a git
//! argument, here and in the host.
//!
//! Git runs through the CLI with a cleared environment and an explicit identity ([`git_command`]);
//! the user's global and system git configuration are never read or written.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Branch of the first commit when none is given.
pub const DEFAULT_BRANCH: &str = "main";

/// Author and committer of the seeded commit.
const SEED_NAME: &str = "Nightshift Seed";
const SEED_EMAIL: &str = "seed@nightshift.invalid";
/// A fixed date makes the seeded commit (and its id) the same on every machine.
const SEED_DATE: &str = "2024-01-01T00:00:00+0000";

/// Longest accepted owner or name part, in bytes (GitHub allows 39 and 100).
const MAX_NAME_PART_BYTES: usize = 100;
/// Longest accepted branch name, in bytes.
const MAX_BRANCH_BYTES: usize = 200;
/// How much of a rejected name is echoed back in an error message.
const ECHO_BYTES: usize = 120;

/// `sandbox-agent seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// Root of the git store (the host's `<data-dir>/git`).
    #[arg(long)]
    pub store: PathBuf,
    /// Repository to create, `owner/name`.
    #[arg(long)]
    pub repo: String,
    /// Branch that receives the first commit.
    #[arg(long, default_value = DEFAULT_BRANCH)]
    pub branch: String,
    /// Also commit this many generated source files (a large repository for benchmarks), under
    /// `generated/`.
    #[arg(long, default_value_t = 0)]
    pub synthetic_files: usize,
    /// Also commit this many generated Python modules, each with a unit test
    /// (`hello/generated/p{i/100}/m{i}.py`, `tests/generated/p{i/100}/test_m{i}.py`): the demo's
    /// `.nightshift/setup.sh` compiles and tests them all, as a project of realistic size would.
    #[arg(long, default_value_t = 0)]
    pub synthetic_modules: usize,
}

/// Generated content added to the demo project, for benchmark repositories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synthetic {
    /// Generated Rust source files under `generated/` (see [`write_synthetic_files`]).
    pub files: usize,
    /// Generated Python modules, each with a unit test (see [`write_synthetic_modules`]).
    pub modules: usize,
}

/// Everything that can go wrong while naming or seeding a repository.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The repository name is not `owner/name` with safe parts.
    #[error("invalid repository name {name:?}: {reason}")]
    InvalidRepo {
        /// The rejected name (truncated).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The branch name is not a plain, safe git branch name.
    #[error("invalid branch name {name:?}: {reason}")]
    InvalidBranch {
        /// The rejected name (truncated).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A git command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    GitCommand {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A git command could not be started.
    #[error("could not run `{command}`: {source}")]
    GitSpawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A filesystem operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A validated repository name, `owner/name`: each part is `[A-Za-z0-9_.-]+`, at most 100 bytes,
/// does not start with `.` or `-`, and contains no `..`. Such a part is always one plain path
/// component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName {
    owner: String,
    name: String,
}

impl RepoName {
    /// Parse and validate `owner/name`.
    pub fn parse(full: &str) -> Result<Self, SeedError> {
        let Some((owner, name)) = full.split_once('/') else {
            return Err(invalid_repo(full, "expected owner/name"));
        };
        Self::from_parts(owner, name).map_err(|err| match err {
            SeedError::InvalidRepo { reason, .. } => invalid_repo(full, reason),
            other => other,
        })
    }

    /// Validate an owner and a name received separately (as in a URL path).
    pub fn from_parts(owner: &str, name: &str) -> Result<Self, SeedError> {
        for part in [owner, name] {
            if let Err(reason) = check_name_part(part) {
                return Err(invalid_repo(&format!("{owner}/{name}"), reason));
            }
        }
        Ok(RepoName {
            owner: owner.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The owner part.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bare repository of this name inside a git store: `<store>/<owner>/<name>.git`.
    pub fn git_dir(&self, store: &Path) -> PathBuf {
        store.join(&self.owner).join(format!("{}.git", self.name))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

fn check_name_part(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        return Err("owner and name must not be empty");
    }
    if part.len() > MAX_NAME_PART_BYTES {
        return Err("owner or name is too long");
    }
    if !part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("only letters, digits, '_', '.' and '-' are allowed, with exactly one '/'");
    }
    if part.starts_with('.') || part.starts_with('-') {
        return Err("owner and name must not start with '.' or '-'");
    }
    if part.contains("..") {
        return Err("'..' is not allowed");
    }
    Ok(())
}

/// Validate a branch name: `[A-Za-z0-9_./-]+`, at most 200 bytes, no `..` or `//`, no component
/// starting with `.`, not starting with `-` or `/`, not ending with `/`, `.` or `.lock`. A subset
/// of what git accepts, so the name can never be read as an option or escape `refs/heads/`.
pub fn validate_branch(branch: &str) -> Result<(), SeedError> {
    let reason = if branch.is_empty() {
        Some("must not be empty")
    } else if branch.len() > MAX_BRANCH_BYTES {
        Some("too long")
    } else if !branch
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'))
    {
        Some("only letters, digits, '_', '.', '/' and '-' are allowed")
    } else if branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
    {
        Some("must not start with '-' or '/', nor end with '/' or '.'")
    } else if branch.contains("..") || branch.contains("//") {
        Some("'..' and '//' are not allowed")
    } else if branch
        .split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        Some("no component may start with '.' or end with '.lock'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SeedError::InvalidBranch {
            name: truncate(branch, ECHO_BYTES),
            reason,
        }),
        None => Ok(()),
    }
}

fn invalid_repo(name: &str, reason: &'static str) -> SeedError {
    SeedError::InvalidRepo {
        name: truncate(name, ECHO_BYTES),
        reason,
    }
}

/// At most `max_bytes` of `text`, cut on a character boundary.
pub(crate) fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A `git` command with a cleared environment: only `PATH`, no system or global configuration, no
/// terminal prompts, and the seed identity (used by commits unless the caller overrides it).
pub fn git_command() -> Command {
    let mut command = Command::new("git");
    command
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", SEED_NAME)
        .env("GIT_AUTHOR_EMAIL", SEED_EMAIL)
        .env("GIT_AUTHOR_DATE", SEED_DATE)
        .env("GIT_COMMITTER_NAME", SEED_NAME)
        .env("GIT_COMMITTER_EMAIL", SEED_EMAIL)
        .env("GIT_COMMITTER_DATE", SEED_DATE)
        .stdin(Stdio::null());
    command
}

/// The command line of `command`, for error messages (arguments here never carry secrets).
pub(crate) fn command_line(program: &OsStr, args: std::process::CommandArgs<'_>) -> String {
    let mut line = program.to_string_lossy().into_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn run(command: &mut Command) -> Result<Output, SeedError> {
    let line = command_line(command.get_program(), command.get_args());
    let output = command.output().map_err(|source| SeedError::GitSpawn {
        command: line.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(SeedError::GitCommand {
            command: line,
            status: output.status.to_string(),
            stderr: truncate(String::from_utf8_lossy(&output.stderr).trim(), 4000),
        });
    }
    Ok(output)
}

/// What [`seed_repo`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// The bare repository.
    pub git_dir: PathBuf,
    /// `false` when the repository already existed and was left as it was.
    pub created: bool,
}

/// Create `<store>/<owner>/<name>.git` with the demo project as the first commit on `branch`, and
/// `http.receivepack` enabled so sandboxes can push over smart HTTP. An existing repository is left
/// alone.
///
/// The repository is built under a temporary name next to its final place and renamed into place,
/// so a concurrent reader never sees a half-made repository and two concurrent seeds do not
/// collide.
#[cfg(test)]
pub fn seed_repo(store: &Path, repo: &str, branch: &str) -> Result<Seeded, SeedError> {
    seed_repo_with(store, repo, branch, Synthetic::default())
}

/// [`seed_repo`] with generated content added to the demo project (see [`Synthetic`]).
pub fn seed_repo_with(
    store: &Path,
    repo: &str,
    branch: &str,
    synthetic: Synthetic,
) -> Result<Seeded, SeedError> {
    let repo = RepoName::parse(repo)?;
    validate_branch(branch)?;
    let git_dir = repo.git_dir(store);
    if git_dir.exists() {
        return Ok(Seeded {
            git_dir,
            created: false,
        });
    }
    let owner_dir = store.join(repo.owner());
    std::fs::create_dir_all(&owner_dir).map_err(|source| SeedError::Io {
        action: "create directory",
        path: owner_dir.clone(),
        source,
    })?;

    let nonce = hex::encode(rand::random::<[u8; 6]>());
    // Leading dots: never a valid repository name, so never served or confused with a real
    // repository.
    let staging = owner_dir.join(format!(".{}.git.seed-{nonce}", repo.name()));
    let work = TempDir::new(std::env::temp_dir().join(format!("nightshift-seed-{nonce}")))?;
    let _staged = TempDir {
        path: staging.clone(),
    };

    run(git_command()
        .args(["init", "--quiet", "--bare", "--initial-branch", branch])
        .arg(&staging))?;
    run(git_command()
        .arg("--git-dir")
        .arg(&staging)
        .args(["config", "http.receivepack", "true"]))?;

    let tree = work.path.join("tree");
    write_demo_project(&tree)?;
    write_synthetic_files(&tree, synthetic.files)?;
    write_synthetic_modules(&tree, synthetic.modules)?;
    let index = work.path.join("index");
    let in_work_tree = |command: &mut Command| {
        command
            .env("GIT_DIR", &staging)
            .env("GIT_WORK_TREE", &tree)
            .env("GIT_INDEX_FILE", &index)
            .current_dir(&tree);
    };
    let mut add = git_command();
    in_work_tree(&mut add);
    run(add.args(["add", "--all"]))?;
    let mut commit = git_command();
    in_work_tree(&mut commit);
    run(commit.args([
        "commit",
        "--quiet",
        "--no-verify",
        "--no-gpg-sign",
        "--message",
        "Initial commit: demo project",
    ]))?;

    match std::fs::rename(&staging, &git_dir) {
        // `_staged` now points at nothing; dropping it is a no-op.
        Ok(()) => Ok(Seeded {
            git_dir,
            created: true,
        }),
        // Someone else created it meanwhile: theirs stays, ours is removed when `_staged` drops.
        Err(_) if git_dir.exists() => Ok(Seeded {
            git_dir,
            created: false,
        }),
        Err(source) => Err(SeedError::Io {
            action: "move into place",
            path: git_dir,
            source,
        }),
    }
}

/// A directory removed (with its contents) when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(path: PathBuf) -> Result<Self, SeedError> {
        std::fs::create_dir_all(&path).map_err(|source| SeedError::Io {
            action: "create directory",
            path: path.clone(),
            source,
        })?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The files of the demo project: a small Python package with a test, runnable with the standard
/// library only (`python3 -m unittest`).
const DEMO_FILES: &[(&str, &str)] = &[
    (
        "README.md",
        "# hello\n\
         \n\
         A tiny Python project seeded by Nightshift for demos and tests.\n\
         \n\
         ```sh\n\
         python3 -m hello Ada        # Hello, Ada!\n\
         python3 -m unittest -v      # run the tests\n\
         ```\n",
    ),
    (
        "pyproject.toml",
        "[project]\n\
         name = \"hello\"\n\
         version = \"0.1.0\"\n\
         description = \"A tiny demo project\"\n\
         requires-python = \">=3.9\"\n",
    ),
    (".gitignore", "__pycache__/\n*.pyc\n"),
    (
        "hello/__init__.py",
        "\"\"\"Greetings, politely or loudly.\"\"\"\n\
         \n\
         from hello.greet import greet, shout\n\
         \n\
         __all__ = [\"greet\", \"shout\"]\n",
    ),
    (
        "hello/greet.py",
        "def greet(name: str) -> str:\n\
         \x20   \"\"\"Return a friendly greeting for `name`.\"\"\"\n\
         \x20   name = name.strip() or \"world\"\n\
         \x20   return f\"Hello, {name}!\"\n\
         \n\
         \n\
         def shout(name: str) -> str:\n\
         \x20   \"\"\"Return the greeting in capitals.\"\"\"\n\
         \x20   return greet(name).upper()\n",
    ),
    (
        "hello/__main__.py",
        "import sys\n\
         \n\
         from hello.greet import greet\n\
         \n\
         \n\
         def main() -> None:\n\
         \x20   print(greet(\" \".join(sys.argv[1:])))\n\
         \n\
         \n\
         if __name__ == \"__main__\":\n\
         \x20   main()\n",
    ),
    (
        ".nightshift/setup.sh",
        "#!/bin/sh\n\
         # Run once per image build, so that sessions start with warm caches.\n\
         set -e\n\
         python3 -m compileall -q hello tests\n\
         python3 -m unittest -q\n",
    ),
    ("tests/__init__.py", ""),
    (
        "tests/test_greet.py",
        "import unittest\n\
         \n\
         from hello import greet, shout\n\
         \n\
         \n\
         class GreetTest(unittest.TestCase):\n\
         \x20   def test_greets_by_name(self):\n\
         \x20       self.assertEqual(greet(\"Ada\"), \"Hello, Ada!\")\n\
         \n\
         \x20   def test_blank_name_greets_the_world(self):\n\
         \x20       self.assertEqual(greet(\"  \"), \"Hello, world!\")\n\
         \n\
         \x20   def test_shout(self):\n\
         \x20       self.assertEqual(shout(\"Ada\"), \"HELLO, ADA!\")\n\
         \n\
         \n\
         if __name__ == \"__main__\":\n\
         \x20   unittest.main()\n",
    ),
];

fn write_demo_project(root: &Path) -> Result<(), SeedError> {
    for (relative, contents) in DEMO_FILES {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SeedError::Io {
                action: "create directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(&path, contents).map_err(|source| SeedError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        if relative.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| SeedError::Io {
                    action: "make executable",
                    path,
                    source,
                },
            )?;
        }
    }
    Ok(())
}

/// Whether `branch` (a name [`validate_branch`] accepted) exists, as a commit, in the bare repository
/// at `git_dir`. A branch in the ref files (what seeding and pushes leave) is found without starting
/// git, which a sandbox start would otherwise wait for; anything else asks `git rev-parse`.
pub async fn branch_exists(git_dir: &Path, branch: &str) -> std::io::Result<bool> {
    if branch_in_ref_files(git_dir, branch) {
        return Ok(true);
    }
    let mut command = tokio::process::Command::from(git_command());
    command
        .arg("--git-dir")
        .arg(git_dir)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}^{{commit}}"));
    Ok(command.output().await?.status.success())
}

/// Whether `refs/heads/<branch>` of `git_dir` is a loose ref or a packed ref holding an object id.
/// Branches point at commits (git refuses to move one to anything else), so the type is not checked.
fn branch_in_ref_files(git_dir: &Path, branch: &str) -> bool {
    let is_object_id =
        |text: &str| matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit());
    // A loose ref wins over a packed one.
    if let Ok(loose) = std::fs::read_to_string(git_dir.join("refs/heads").join(branch)) {
        return is_object_id(loose.trim_end());
    }
    let Ok(packed) = std::fs::read_to_string(git_dir.join("packed-refs")) else {
        return false;
    };
    let name = format!("refs/heads/{branch}");
    packed.lines().any(|line| {
        line.split_once(' ')
            .is_some_and(|(id, line_name)| line_name == name && is_object_id(id))
    })
}

/// Files per generated directory.
const SYNTHETIC_FILES_PER_DIR: usize = 100;

/// Write `count` generated source files, `generated/d{i/100}/item_{i}.rs`, ~1 KB each: a module doc,
/// a struct and a function named after `i` (so a search for `item_{i}` finds exactly one definition),
/// and lines shared by every file (so a search for them finds many).
pub fn write_synthetic_files(root: &Path, count: usize) -> Result<(), SeedError> {
    for i in 0..count {
        let dir = root
            .join("generated")
            .join(format!("d{}", i / SYNTHETIC_FILES_PER_DIR));
        if i % SYNTHETIC_FILES_PER_DIR == 0 {
            std::fs::create_dir_all(&dir).map_err(|source| SeedError::Io {
                action: "create directory",
                path: dir.clone(),
                source,
            })?;
        }
        let path = dir.join(format!("item_{i}.rs"));
        let contents = format!(
            "//! Generated item {i}: part of a large repository for benchmarks.\n\
             \n\
             use std::collections::HashMap;\n\
             \n\
             /// Settings of item {i}.\n\
             #[derive(Debug, Clone, Default)]\n\
             pub struct Item{i} {{\n\
             \x20   pub name: String,\n\
             \x20   pub weight_grams: u64,\n\
             \x20   pub tags: HashMap<String, String>,\n\
             }}\n\
             \n\
             /// Build item {i}.\n\
             pub fn item_{i}(weight_grams: u64) -> Item{i} {{\n\
             \x20   let mut tags = HashMap::new();\n\
             \x20   tags.insert(\"origin\".to_owned(), \"generated\".to_owned());\n\
             \x20   Item{i} {{\n\
             \x20       name: \"item {i}\".to_owned(),\n\
             \x20       weight_grams: weight_grams + {i},\n\
             \x20       tags,\n\
             \x20   }}\n\
             }}\n\
             \n\
             #[cfg(test)]\n\
             mod tests {{\n\
             \x20   #[test]\n\
             \x20   fn weighs_more_than_its_input() {{\n\
             \x20       assert!(super::item_{i}(1).weight_grams >= 1);\n\
             \x20   }}\n\
             }}\n"
        );
        std::fs::write(&path, contents).map_err(|source| SeedError::Io {
            action: "write",
            path,
            source,
        })?;
    }
    Ok(())
}

/// Modules (and test modules) per generated Python package.
const SYNTHETIC_MODULES_PER_PACKAGE: usize = 100;

/// Write `count` generated Python modules, `hello/generated/p{i/100}/m{i}.py` (~1 KB: a frozen
/// dataclass with a method and two functions), each with a unit test module
/// `tests/generated/p{i/100}/test_m{i}.py` (four tests), and the packages' `__init__.py` files. The
/// demo's setup (`compileall` + `unittest` discovery) compiles and runs all of them.
pub fn write_synthetic_modules(root: &Path, count: usize) -> Result<(), SeedError> {
    let write = |path: PathBuf, contents: &str| {
        std::fs::write(&path, contents).map_err(|source| SeedError::Io {
            action: "write",
            path,
            source,
        })
    };
    let package = |path: PathBuf| -> Result<(), SeedError> {
        std::fs::create_dir_all(&path).map_err(|source| SeedError::Io {
            action: "create directory",
            path: path.clone(),
            source,
        })?;
        write(path.join("__init__.py"), "")
    };
    if count > 0 {
        package(root.join("hello/generated"))?;
        package(root.join("tests/generated"))?;
    }
    for i in 0..count {
        let p = i / SYNTHETIC_MODULES_PER_PACKAGE;
        let modules = root.join(format!("hello/generated/p{p}"));
        let tests = root.join(format!("tests/generated/p{p}"));
        if i % SYNTHETIC_MODULES_PER_PACKAGE == 0 {
            package(modules.clone())?;
            package(tests.clone())?;
        }
        let module = format!(
            "\"\"\"Generated module {i}: stock keeping for item kind {i}.\"\"\"\n\
             \n\
             from dataclasses import dataclass\n\
             \n\
             \n\
             @dataclass(frozen=True)\n\
             class Item{i}:\n\
             \x20   \"\"\"An item of kind {i}.\"\"\"\n\
             \n\
             \x20   name: str\n\
             \x20   quantity: int\n\
             \x20   unit_price_cents: int\n\
             \n\
             \x20   def total_cents(self) -> int:\n\
             \x20       \"\"\"The value of the stock, in cents.\"\"\"\n\
             \x20       return self.quantity * self.unit_price_cents\n\
             \n\
             \n\
             def restock_{i}(item: Item{i}, amount: int) -> Item{i}:\n\
             \x20   \"\"\"The item with `amount` more in stock.\"\"\"\n\
             \x20   if amount < 0:\n\
             \x20       raise ValueError(\"amount must not be negative\")\n\
             \x20   return Item{i}(item.name, item.quantity + amount, item.unit_price_cents)\n\
             \n\
             \n\
             def checksum_{i}(text: str) -> int:\n\
             \x20   \"\"\"A stable checksum of `text`, seeded with {i}.\"\"\"\n\
             \x20   value = {i}\n\
             \x20   for ch in text:\n\
             \x20       value = (value * 31 + ord(ch)) % 1_000_000_007\n\
             \x20   return value\n"
        );
        write(modules.join(format!("m{i}.py")), &module)?;
        let test = format!(
            "import unittest\n\
             \n\
             from hello.generated.p{p}.m{i} import Item{i}, checksum_{i}, restock_{i}\n\
             \n\
             \n\
             class Item{i}Test(unittest.TestCase):\n\
             \x20   def test_total(self):\n\
             \x20       self.assertEqual(Item{i}(\"bolt\", 3, 25).total_cents(), 75)\n\
             \n\
             \x20   def test_restock(self):\n\
             \x20       self.assertEqual(restock_{i}(Item{i}(\"bolt\", 3, 25), 2).quantity, 5)\n\
             \n\
             \x20   def test_negative_restock_is_refused(self):\n\
             \x20       with self.assertRaises(ValueError):\n\
             \x20           restock_{i}(Item{i}(\"bolt\", 3, 25), -1)\n\
             \n\
             \x20   def test_checksum_is_stable(self):\n\
             \x20       self.assertEqual(checksum_{i}(\"nightshift\"), checksum_{i}(\"nightshift\"))\n\
             \x20       self.assertNotEqual(checksum_{i}(\"a\"), checksum_{i}(\"b\"))\n"
        );
        write(tests.join(format!("test_m{i}.py")), &test)?;
    }
    Ok(())
}

/// `sandbox-agent seed`: print where the repository is and whether it was created.
pub async fn main(args: SeedArgs) -> anyhow::Result<()> {
    let seeded = tokio::task::spawn_blocking(move || {
        let synthetic = Synthetic {
            files: args.synthetic_files,
            modules: args.synthetic_modules,
        };
        seed_repo_with(&args.store, &args.repo, &args.branch, synthetic)
    })
    .await??;
    let what = if seeded.created {
        "created"
    } else {
        "exists, left unchanged"
    };
    println!("{} ({what})", seeded.git_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_repo(input: &str, ok: bool) {
        let result = RepoName::parse(input);
        assert_eq!(result.is_ok(), ok, "{input:?} -> {result:?}");
        if let Ok(name) = result {
            assert_eq!(name.to_string(), input);
        }
    }

    #[test]
    fn repo_names() {
        for good in ["demo/hello", "Owner-1/name_2.rs", "a/b", "o/x.y.z", "o/x-"] {
            check_repo(good, true);
        }
        let too_long = format!("o/{}", "x".repeat(101));
        for bad in [
            "",
            "demo",
            "/hello",
            "demo/",
            "demo/hello/extra",
            "../x",
            "a/../../b",
            "a/..",
            "./x",
            ".hidden/x",
            "x/.hidden",
            "x/a..b",
            "-o/x",
            "o/-x",
            "o/x y",
            "o/x\0",
            "o/ü",
            "o\\x/y",
            "%2e%2e/x",
            too_long.as_str(),
        ] {
            check_repo(bad, false);
        }
    }

    #[test]
    fn git_dir_is_inside_the_store() {
        let name = RepoName::parse("demo/hello").unwrap();
        assert_eq!(
            name.git_dir(Path::new("/s")),
            PathBuf::from("/s/demo/hello.git")
        );
    }

    #[test]
    fn branch_names() {
        for good in ["main", "feature/x-1", "nightshift/abc_1.2", "v1.0"] {
            assert!(validate_branch(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-f",
            "/x",
            "x/",
            "x.",
            "a..b",
            "a//b",
            ".x",
            "a/.x",
            "x.lock",
            "a/b.lock/c",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a@{1}",
            "a\\b",
        ] {
            assert!(validate_branch(bad).is_err(), "{bad}");
        }
    }

    fn git_in(git_dir: &Path, args: &[&str]) -> String {
        let output = run(git_command().arg("--git-dir").arg(git_dir).args(args)).unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn seeds_generated_files_for_a_large_repository() {
        let store = tempfile::tempdir().unwrap();
        let synthetic = Synthetic {
            files: 250,
            modules: 0,
        };
        let seeded = seed_repo_with(store.path(), "bench/large", "main", synthetic).unwrap();
        let files = git_in(&seeded.git_dir, &["ls-tree", "-r", "--name-only", "main"]);
        let generated: Vec<&str> = files
            .lines()
            .filter(|f| f.starts_with("generated/"))
            .collect();
        assert_eq!(generated.len(), 250);
        assert!(
            generated.contains(&"generated/d2/item_249.rs"),
            "{generated:?}"
        );
        let one = git_in(&seeded.git_dir, &["show", "main:generated/d1/item_117.rs"]);
        assert!(
            one.contains("pub fn item_117(weight_grams: u64) -> Item117 {"),
            "{one}"
        );
    }

    #[test]
    fn seeds_generated_python_modules_that_the_demo_setup_compiles_and_tests() {
        let store = tempfile::tempdir().unwrap();
        let synthetic = Synthetic {
            files: 0,
            modules: 150,
        };
        let seeded = seed_repo_with(store.path(), "bench/app", "main", synthetic).unwrap();
        let files = git_in(&seeded.git_dir, &["ls-tree", "-r", "--name-only", "main"]);
        let modules = files
            .lines()
            .filter(|f| f.starts_with("hello/generated/p"))
            .count();
        let tests = files
            .lines()
            .filter(|f| f.starts_with("tests/generated/p"))
            .count();
        // 150 modules and tests, plus one `__init__.py` in each of the two packages of each side.
        assert_eq!((modules, tests), (152, 152), "{files}");
        assert!(files.contains("tests/generated/p1/test_m149.py"), "{files}");

        // The demo's own setup compiles and runs every generated test.
        let work = tempfile::tempdir().unwrap();
        let checkout = work.path().join("app");
        run(git_command()
            .args(["clone", "--quiet"])
            .arg(&seeded.git_dir)
            .arg(&checkout))
        .unwrap();
        let setup = std::process::Command::new("sh")
            .arg(".nightshift/setup.sh")
            .current_dir(&checkout)
            .env_remove("PYTHONDONTWRITEBYTECODE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&setup.stderr);
        assert!(setup.status.success(), "{stderr}");
        assert!(stderr.contains("Ran 603 tests"), "{stderr}");
        assert!(checkout
            .join("hello/generated/p1/__pycache__")
            .read_dir()
            .unwrap()
            .any(|entry| entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("m149.")));
    }

    #[test]
    fn seeds_a_bare_repository_once() {
        let store = tempfile::tempdir().unwrap();
        let first = seed_repo(store.path(), "demo/hello", "main").unwrap();
        assert!(first.created);
        assert_eq!(first.git_dir, store.path().join("demo/hello.git"));
        assert_eq!(
            git_in(&first.git_dir, &["rev-parse", "--is-bare-repository"]),
            "true"
        );
        assert_eq!(
            git_in(&first.git_dir, &["symbolic-ref", "HEAD"]),
            "refs/heads/main"
        );
        assert_eq!(
            git_in(&first.git_dir, &["config", "http.receivepack"]),
            "true"
        );
        let files = git_in(&first.git_dir, &["ls-tree", "-r", "--name-only", "main"]);
        let files: Vec<&str> = files.lines().collect();
        assert!(files.contains(&"README.md"), "{files:?}");
        assert!(files.contains(&"hello/greet.py"), "{files:?}");
        assert!(files.contains(&"tests/test_greet.py"), "{files:?}");
        assert!(files.contains(&".nightshift/setup.sh"), "{files:?}");
        let mode = git_in(&first.git_dir, &["ls-tree", "main", ".nightshift/setup.sh"]);
        assert!(
            mode.starts_with("100755"),
            "the setup script is executable: {mode}"
        );
        assert_eq!(
            git_in(&first.git_dir, &["log", "--format=%an <%ae>", "main"]),
            "Nightshift Seed <seed@nightshift.invalid>"
        );
        let head = git_in(&first.git_dir, &["rev-parse", "main"]);

        // Idempotent: the second call changes nothing, and no staging directory is left behind.
        let second = seed_repo(store.path(), "demo/hello", "main").unwrap();
        assert!(!second.created);
        assert_eq!(git_in(&second.git_dir, &["rev-parse", "main"]), head);
        let entries: Vec<_> = std::fs::read_dir(store.path().join("demo"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("hello.git")]);

        // The fixed identity and date make the first commit the same everywhere.
        let other = tempfile::tempdir().unwrap();
        let again = seed_repo(other.path(), "demo/hello", "main").unwrap();
        assert_eq!(git_in(&again.git_dir, &["rev-parse", "main"]), head);
    }

    #[tokio::test]
    async fn finds_branches_in_loose_and_packed_refs_and_nothing_else() {
        let store = tempfile::tempdir().unwrap();
        let seeded = seed_repo(store.path(), "acme/tool", "main").unwrap();
        let git_dir = &seeded.git_dir;
        assert!(branch_in_ref_files(git_dir, "main"));
        assert!(branch_exists(git_dir, "main").await.unwrap());
        assert!(!branch_in_ref_files(git_dir, "other"));
        assert!(!branch_exists(git_dir, "other").await.unwrap());

        git_in(git_dir, &["branch", "feature/x", "main"]);
        git_in(git_dir, &["pack-refs", "--all"]);
        assert!(!git_dir.join("refs/heads/main").exists(), "packed");
        assert!(branch_in_ref_files(git_dir, "main"));
        assert!(branch_in_ref_files(git_dir, "feature/x"));
        assert!(!branch_in_ref_files(git_dir, "feature"));

        // What the files do not show is still asked of git: a tag is not a branch.
        git_in(git_dir, &["tag", "v1", "main"]);
        assert!(!branch_exists(git_dir, "v1").await.unwrap());
        std::fs::write(git_dir.join("refs/heads/broken"), "not an id\n").unwrap();
        assert!(!branch_in_ref_files(git_dir, "broken"));
    }

    #[test]
    fn seeds_another_branch() {
        let store = tempfile::tempdir().unwrap();
        let seeded = seed_repo(store.path(), "acme/tool", "trunk").unwrap();
        assert_eq!(
            git_in(&seeded.git_dir, &["symbolic-ref", "HEAD"]),
            "refs/heads/trunk"
        );
    }

    #[test]
    fn refuses_bad_names_without_touching_the_store() {
        let store = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/../../b", ".hidden/x"] {
            assert!(
                matches!(
                    seed_repo(store.path(), bad, "main"),
                    Err(SeedError::InvalidRepo { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            seed_repo(store.path(), "demo/hello", "-x"),
            Err(SeedError::InvalidBranch { .. })
        ));
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
    }
}

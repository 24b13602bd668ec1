//! The tools through [`execute`], on real temporary git repositories: confinement, each tool's answers
//! and refusals, the sync gate, read-only paths, cancellation and the bash sandbox.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightshift_protocol::event::FileChange;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::run::gate::{sync_gate, SyncGate, SyncState};

struct Fixture {
    /// Holds the workspace (`ws`) and a directory beside it (`outside`).
    dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn git(root: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

fn write(root: &Path, path: &str, content: impl AsRef<[u8]>) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A committed repository with a `.gitignore`, ignored files, a read-only `.nightshift`, and symlinks
/// that lead out of it.
fn repo() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    write(&outside, "secret.txt", "secret");
    write(&root, "src/lib.rs", "one\ntwo\nthree\n");
    write(&root, "src/nested/b.txt", "b two\n");
    write(&root, "README.md", "# Two\n");
    write(&root, "blob.bin", [0u8, 159, 146, 150]);
    write(&root, ".gitignore", "target/\n*.log\n");
    write(&root, ".nightshift/config.toml", "setup = true\n");
    git(&root, &["init", "-q"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "init"]);
    write(&root, "target/out.rs", "two\n");
    write(&root, "debug.log", "two\n");
    std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("out-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("out-file")).unwrap();
    std::os::unix::fs::symlink(root.join(".nightshift"), root.join("settings")).unwrap();
    let root = std::fs::canonicalize(root).unwrap();
    Fixture { dir, root, outside }
}

fn context(root: &Path, gate: SyncGate) -> ToolContext {
    ToolContext {
        workspace: Workspace::open(root).unwrap(),
        gate,
        read_only_paths: Arc::from([".nightshift".to_owned()]),
        cancel: CancellationToken::new(),
        output: None,
        limits: ToolLimits::default(),
        session: None,
    }
}

fn ctx(f: &Fixture) -> ToolContext {
    context(&f.root, SyncGate::done())
}

async fn ok(ctx: &ToolContext, tool: &str, input: Value) -> ToolOutput {
    match execute(ctx, tool, input.clone()).await {
        Ok(output) => output,
        Err(error) => panic!("{tool} {input}: {error}"),
    }
}

async fn err(ctx: &ToolContext, tool: &str, input: Value) -> ToolError {
    match execute(ctx, tool, input.clone()).await {
        Ok(output) => panic!("{tool} {input} succeeded: {}", output.output),
        Err(error) => error,
    }
}

/// The records with their diffs left out, to compare the rest.
fn without_diffs(changes: &[FileChangeRecord]) -> Vec<FileChangeRecord> {
    changes
        .iter()
        .map(|change| FileChangeRecord {
            diff: None,
            ..change.clone()
        })
        .collect()
}

fn record(path: &str, change: FileChange, additions: u64, deletions: u64) -> FileChangeRecord {
    FileChangeRecord {
        path: path.into(),
        change,
        additions,
        deletions,
        diff: None,
    }
}

#[tokio::test]
async fn catalogue_and_definitions_list_exactly_the_tools() {
    let names: Vec<&str> = TOOLS.iter().map(|tool| tool.name).collect();
    assert_eq!(
        names,
        [
            "list_files",
            "read_file",
            "write_file",
            "edit_file",
            "glob",
            "grep",
            "bash",
            "git_status",
            "git_diff",
            "spawn_session",
            "session_status",
            "list_children",
            "tool_catalogue"
        ]
    );
    let definitions = api_definitions();
    let defined: Vec<&str> = definitions
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(defined, names);
    for definition in &definitions {
        assert_eq!(definition["input_schema"]["type"], "object");
        assert!(!definition["description"].as_str().unwrap().is_empty());
    }

    let catalogue = catalogue();
    let listed: Vec<&str> = catalogue
        .lines()
        .filter_map(|line| line.strip_prefix("## `"))
        .map(|rest| rest.split('`').next().unwrap())
        .collect();
    assert_eq!(listed, names);
    for tool in TOOLS {
        let heading = format!("## `{}` ({})", tool.name, tool.access.label());
        assert!(catalogue.contains(&heading), "{heading}");
        let schema = serde_json::to_string_pretty(&(tool.input_schema)()).unwrap();
        assert!(catalogue.contains(&schema), "{}", tool.name);
    }
    assert!(catalogue.contains("## `bash` (process)"));
    assert!(catalogue.contains("## `edit_file` (write)"));

    let prompt = system_prompt();
    for tool in TOOLS {
        assert!(prompt.contains(&format!("- {}: {}", tool.name, tool.description)));
    }

    let f = repo();
    let ctx = ctx(&f);
    assert_eq!(
        ok(&ctx, "tool_catalogue", json!({})).await.output,
        catalogue
    );
    assert!(matches!(
        err(&ctx, "rm_rf", json!({})).await,
        ToolError::UnknownTool { .. }
    ));
}

#[tokio::test]
async fn every_tool_is_confined_to_the_workspace() {
    let f = repo();
    let ctx = ctx(&f);
    let escapes = [
        "../outside/secret.txt",
        "/etc/passwd",
        "out-file",
        "out-dir/secret.txt",
        "out-dir/new.txt",
        "up/outside/secret.txt",
        "up/new.txt",
    ];
    for path in escapes {
        let inputs = [
            ("read_file", json!({"path": path})),
            ("write_file", json!({"path": path, "content": "pwned"})),
            (
                "edit_file",
                json!({"path": path, "old_text": "secret", "new_text": "pwned"}),
            ),
            ("grep", json!({"pattern": "secret", "path": path})),
        ];
        for (tool, input) in inputs {
            let error = err(&ctx, tool, input).await;
            assert!(
                matches!(error, ToolError::PathEscape { .. }),
                "{tool} {path}: {error}"
            );
        }
    }
    for path in ["..", "/tmp", "out-dir", "up"] {
        for tool in ["list_files", "glob", "grep"] {
            let error = err(&ctx, tool, json!({"path": path, "pattern": "x"})).await;
            assert!(
                matches!(error, ToolError::PathEscape { .. }),
                "{tool} {path}: {error}"
            );
        }
    }
    for (tool, input) in [
        ("read_file", json!({"path": ".git/config"})),
        (
            "write_file",
            json!({"path": ".git/hooks/pre-commit", "content": "x"}),
        ),
        (
            "edit_file",
            json!({"path": ".git/HEAD", "old_text": "main", "new_text": "x"}),
        ),
        ("list_files", json!({"path": ".git"})),
        ("glob", json!({"pattern": "*", "path": ".git"})),
        ("grep", json!({"pattern": "main", "path": ".git/HEAD"})),
    ] {
        let error = err(&ctx, tool, input).await;
        assert!(matches!(error, ToolError::GitDir { .. }), "{tool}: {error}");
    }
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret.txt")).unwrap(),
        "secret"
    );
    assert!(!f.outside.join("new.txt").exists());
    assert!(!f.dir.path().join("new.txt").exists());
    assert!(!f.root.join(".git/hooks/pre-commit").exists());
}

#[tokio::test]
async fn read_file_numbers_lines_and_reads_ranges() {
    let f = repo();
    let ctx = ctx(&f);
    let read = |input: Value| {
        let ctx = ctx.clone();
        async move { ok(&ctx, "read_file", input).await.output }
    };
    assert_eq!(
        read(json!({"path": "src/lib.rs"})).await,
        "     1\tone\n     2\ttwo\n     3\tthree\n"
    );
    assert_eq!(
        read(json!({"path": "src/lib.rs", "offset_line": 2, "limit_lines": 1})).await,
        "     2\ttwo\n"
    );
    assert_eq!(
        read(json!({"path": "./src/../src/lib.rs", "offset_line": 3})).await,
        "     3\tthree\n"
    );
    assert_eq!(
        read(json!({"path": "src/lib.rs", "offset_line": 9})).await,
        "(the file has 3 lines; offset_line 9 is past the end)"
    );
    write(&f.root, "empty.txt", "");
    assert_eq!(read(json!({"path": "empty.txt"})).await, "(empty file)");
    write(&f.root, "crlf.txt", "a\r\nb");
    assert_eq!(
        read(json!({"path": "crlf.txt"})).await,
        "     1\ta\n     2\tb\n"
    );

    let error = err(
        &ctx,
        "read_file",
        json!({"path": "src/lib.rs", "offset_line": 0}),
    )
    .await;
    assert!(matches!(
        error,
        ToolError::InvalidValue {
            field: "offset_line",
            ..
        }
    ));
    let error = err(&ctx, "read_file", json!({"path": "blob.bin"})).await;
    assert!(matches!(error, ToolError::Binary { size_bytes: 4, .. }));
    assert_eq!(
        error.to_string(),
        "`blob.bin` is a binary file (4 bytes); only text files can be read or edited"
    );
    let error = err(&ctx, "read_file", json!({"path": "nope.txt"})).await;
    assert!(matches!(error, ToolError::NotFound { .. }));
    let error = err(&ctx, "read_file", json!({"path": "src"})).await;
    assert!(matches!(error, ToolError::IsDirectory { .. }));
    let error = err(&ctx, "read_file", json!({"file": "src/lib.rs"})).await;
    assert!(matches!(error, ToolError::InvalidInput { .. }));
    // An in-workspace symlink is followed.
    assert_eq!(
        read(json!({"path": "settings/config.toml"})).await,
        "     1\tsetup = true\n"
    );
}

#[tokio::test]
async fn read_file_cuts_huge_files_and_says_how_to_read_on() {
    let f = repo();
    let ctx = ctx(&f);
    let line = "é".repeat(40);
    let text: String = (1..=20_000).map(|i| format!("{i} {line}\n")).collect();
    write(&f.root, "big.txt", &text);
    let out = ok(&ctx, "read_file", json!({"path": "big.txt"}))
        .await
        .output;
    assert!(out.len() <= ctx.limits.output_cap_bytes, "{}", out.len());
    let notice = out.lines().last().unwrap();
    let shown_lines = out.lines().count() - 1;
    let next_line = shown_lines + 1;
    let remaining_bytes: usize = text
        .split_inclusive('\n')
        .skip(shown_lines)
        .map(str::len)
        .sum();
    assert_eq!(
        notice,
        format!(
            "[… truncated: {remaining_bytes} more bytes; read on with offset_line={next_line}]"
        )
    );
    let next = ok(
        &ctx,
        "read_file",
        json!({"path": "big.txt", "offset_line": next_line, "limit_lines": 1}),
    )
    .await
    .output;
    assert_eq!(next, format!("{next_line:>6}\t{next_line} {line}\n"));

    // One enormous line is cut, with a notice of its own.
    write(&f.root, "minified.js", "x".repeat(100_000));
    let out = ok(&ctx, "read_file", json!({"path": "minified.js"}))
        .await
        .output;
    assert!(
        out.ends_with(" [… line cut: 96000 more bytes]\n"),
        "{}",
        &out[out.len() - 60..]
    );
}

#[tokio::test]
async fn write_file_creates_replaces_and_reports() {
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "write_file",
        json!({"path": "new/deep/a.txt", "content": "x\ny\n"}),
    )
    .await;
    assert_eq!(out.output, "wrote 4 bytes to new/deep/a.txt (+2 -0)");
    assert_eq!(
        without_diffs(&out.file_changes),
        [record("new/deep/a.txt", FileChange::Added, 2, 0)]
    );
    assert_eq!(
        out.file_changes[0].diff.as_deref(),
        Some("--- /dev/null\n+++ b/new/deep/a.txt\n@@ -0,0 +1,2 @@\n+x\n+y\n")
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("new/deep/a.txt")).unwrap(),
        "x\ny\n"
    );
    let out = ok(
        &ctx,
        "write_file",
        json!({"path": "src/lib.rs", "content": "one\n2\nthree\nfour\n"}),
    )
    .await;
    assert_eq!(
        without_diffs(&out.file_changes),
        [record("src/lib.rs", FileChange::Modified, 2, 1)]
    );
    assert_eq!(
        out.file_changes[0].diff.as_deref(),
        Some(
            "--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1,3 +1,4 @@\n one\n-two\n+2\n three\n+four\n"
        )
    );
    let out = ok(
        &ctx,
        "write_file",
        json!({"path": "src/lib.rs", "content": "one\n2\nthree\nfour\n"}),
    )
    .await;
    assert_eq!(out.output, "src/lib.rs is unchanged (17 bytes)");
    assert!(out.file_changes.is_empty());

    let error = err(&ctx, "write_file", json!({"path": "", "content": ""})).await;
    assert!(matches!(error, ToolError::IsDirectory { .. }));
    let error = err(&ctx, "write_file", json!({"path": "src", "content": ""})).await;
    assert!(matches!(error, ToolError::IsDirectory { .. }));
}

#[tokio::test]
async fn read_only_paths_refuse_writes_by_whole_components() {
    let f = repo();
    let ctx = ctx(&f);
    for path in [
        ".nightshift/config.toml",
        ".nightshift/new.txt",
        ".nightshift",
        "settings/x",
        "./.nightshift/../.nightshift/a",
    ] {
        let error = err(&ctx, "write_file", json!({"path": path, "content": "x"})).await;
        match error {
            ToolError::ReadOnlyPath { rule, .. } => assert_eq!(rule, ".nightshift", "{path}"),
            other => panic!("{path}: {other}"),
        }
    }
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": ".nightshift/config.toml", "old_text": "true", "new_text": "false"}),
    )
    .await;
    assert_eq!(
        error.to_string(),
        "`.nightshift/config.toml` is read-only: everything under `.nightshift` is"
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join(".nightshift/config.toml")).unwrap(),
        "setup = true\n"
    );
    // A sibling that only shares the prefix is writable; reading the read-only path is fine.
    ok(
        &ctx,
        "write_file",
        json!({"path": ".nightshift-old/a", "content": "x"}),
    )
    .await;
    ok(
        &ctx,
        "read_file",
        json!({"path": ".nightshift/config.toml"}),
    )
    .await;

    let mut nested = ctx.clone();
    nested.read_only_paths = Arc::from(["./.github/workflows/".to_owned()]);
    let error = err(
        &nested,
        "write_file",
        json!({"path": ".github/workflows/ci.yml", "content": "x"}),
    )
    .await;
    assert!(
        matches!(error, ToolError::ReadOnlyPath { ref rule, .. } if rule == ".github/workflows")
    );
    ok(
        &nested,
        "write_file",
        json!({"path": ".github/dependabot.yml", "content": "x"}),
    )
    .await;
}

#[tokio::test]
async fn edit_file_replaces_exact_text_and_returns_a_diff() {
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "edit_file",
        json!({"path": "src/lib.rs", "old_text": "two\n", "new_text": "TWO\n"}),
    )
    .await;
    assert_eq!(
        out.output,
        "edited src/lib.rs: 1 replacement (+1 -1)\n\
         --- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"
    );
    assert_eq!(
        without_diffs(&out.file_changes),
        [record("src/lib.rs", FileChange::Modified, 1, 1)]
    );
    assert_eq!(
        out.file_changes[0].diff.as_deref(),
        Some("--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("src/lib.rs")).unwrap(),
        "one\nTWO\nthree\n"
    );

    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "src/lib.rs", "old_text": "four", "new_text": "4"}),
    )
    .await;
    assert!(matches!(error, ToolError::NoMatch { .. }));
    assert_eq!(
        error.to_string(),
        "old_text was not found in `src/lib.rs`; read the file again and copy old_text exactly, including whitespace and line breaks"
    );
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "src/lib.rs", "old_text": "one  TWO", "new_text": "x"}),
    )
    .await;
    assert!(
        error.to_string().contains("different whitespace"),
        "{error}"
    );
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "src/lib.rs", "old_text": "     1\tone\n", "new_text": "x"}),
    )
    .await;
    assert!(error.to_string().contains("line numbers"), "{error}");

    write(&f.root, "dup.txt", "a = 1\nb = 1\nc = 2\n");
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "dup.txt", "old_text": "= 1", "new_text": "= 3"}),
    )
    .await;
    assert!(matches!(error, ToolError::AmbiguousMatch { count: 2, .. }));
    assert_eq!(
        std::fs::read_to_string(f.root.join("dup.txt")).unwrap(),
        "a = 1\nb = 1\nc = 2\n"
    );
    let out = ok(
        &ctx,
        "edit_file",
        json!({"path": "dup.txt", "old_text": "= 1", "new_text": "= 3", "replace_all": true}),
    )
    .await;
    assert!(
        out.output
            .starts_with("edited dup.txt: 2 replacements (+2 -2)\n"),
        "{}",
        out.output
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("dup.txt")).unwrap(),
        "a = 3\nb = 3\nc = 2\n"
    );

    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "dup.txt", "old_text": "", "new_text": "x"}),
    )
    .await;
    assert!(matches!(
        error,
        ToolError::InvalidValue {
            field: "old_text",
            ..
        }
    ));
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "missing.txt", "old_text": "a", "new_text": "b"}),
    )
    .await;
    assert!(matches!(error, ToolError::NotFound { .. }));
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "blob.bin", "old_text": "a", "new_text": "b"}),
    )
    .await;
    assert!(matches!(error, ToolError::Binary { .. }));
}

#[tokio::test]
async fn list_files_is_sorted_gitignore_aware_and_skips_git() {
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(&ctx, "list_files", json!({})).await.output;
    assert_eq!(
        out,
        ".gitignore\n.nightshift/\n.nightshift/config.toml\nREADME.md\nblob.bin\nout-dir\nout-file\n\
         settings\nsrc/\nsrc/lib.rs\nsrc/nested/\nsrc/nested/b.txt\nup"
    );
    let out = ok(&ctx, "list_files", json!({"path": "src", "depth": 1}))
        .await
        .output;
    assert_eq!(out, "lib.rs\nnested/");
    let out = ok(&ctx, "list_files", json!({"path": "src/nested"}))
        .await
        .output;
    assert_eq!(out, "b.txt");
    let error = err(&ctx, "list_files", json!({"path": "src/lib.rs"})).await;
    assert!(matches!(error, ToolError::NotDirectory { .. }));
    let error = err(&ctx, "list_files", json!({"depth": 0})).await;
    assert!(matches!(
        error,
        ToolError::InvalidValue { field: "depth", .. }
    ));

    for i in 0..5000 {
        write(&f.root, &format!("many/{i:05}.txt"), "");
    }
    let out = ok(&ctx, "list_files", json!({"path": "many"})).await.output;
    assert!(out.len() <= ctx.limits.output_cap_bytes);
    assert!(out.starts_with("00000.txt\n00001.txt\n"));
    let notice = out.lines().last().unwrap();
    assert!(
        notice.starts_with("[… truncated: ")
            && notice.ends_with(" more bytes; list a subdirectory or pass a smaller depth]"),
        "{notice}"
    );
}

#[tokio::test]
async fn glob_matches_paths_and_respects_gitignore() {
    let f = repo();
    let ctx = ctx(&f);
    write(&f.root, "src/nested/c.rs", "");
    let glob = |input: Value| {
        let ctx = ctx.clone();
        async move { ok(&ctx, "glob", input).await.output }
    };
    assert_eq!(
        glob(json!({"pattern": "**/*.rs"})).await,
        "src/lib.rs\nsrc/nested/c.rs"
    );
    assert_eq!(glob(json!({"pattern": "*.md"})).await, "README.md");
    assert_eq!(
        glob(json!({"pattern": "*.rs", "path": "src"})).await,
        "src/lib.rs"
    );
    assert_eq!(
        glob(json!({"pattern": "**/*.{txt,toml}"})).await,
        ".nightshift/config.toml\nsrc/nested/b.txt"
    );
    assert_eq!(
        glob(json!({"pattern": "*.log"})).await,
        "no files match `*.log`"
    );
    let error = err(&ctx, "glob", json!({"pattern": "src/[a"})).await;
    assert!(matches!(error, ToolError::InvalidGlob { .. }), "{error}");
}

#[tokio::test]
async fn grep_searches_with_regex_and_options() {
    let f = repo();
    let ctx = ctx(&f);
    let grep = |input: Value| {
        let ctx = ctx.clone();
        async move { ok(&ctx, "grep", input).await.output }
    };
    // debug.log and target/ are ignored; blob.bin is binary.
    assert_eq!(
        grep(json!({"pattern": "t(wo|hree)$"})).await,
        "src/lib.rs:2:two\nsrc/lib.rs:3:three\nsrc/nested/b.txt:1:b two"
    );
    assert_eq!(
        grep(json!({"pattern": "two", "case_insensitive": true})).await,
        "README.md:1:# Two\nsrc/lib.rs:2:two\nsrc/nested/b.txt:1:b two"
    );
    assert_eq!(
        grep(json!({"pattern": "two", "glob": "*.txt"})).await,
        "src/nested/b.txt:1:b two"
    );
    assert_eq!(
        grep(json!({"pattern": "two", "glob": "src/*.rs"})).await,
        "src/lib.rs:2:two"
    );
    assert_eq!(
        grep(json!({"pattern": "o", "path": "src/lib.rs"})).await,
        "src/lib.rs:1:one\nsrc/lib.rs:2:two"
    );
    assert_eq!(
        grep(json!({"pattern": "two", "path": "src/nested"})).await,
        "src/nested/b.txt:1:b two"
    );
    assert_eq!(
        grep(json!({"pattern": "e", "max_results": 2})).await,
        ".gitignore:1:target/\n.nightshift/config.toml:1:setup = true\n\
         [more matches: stopped at max_results=2 matching lines; narrow the pattern or path, or raise max_results]"
    );
    assert_eq!(
        grep(json!({"pattern": "e", "path": "src/lib.rs", "max_results": 2})).await,
        "src/lib.rs:1:one\nsrc/lib.rs:3:three"
    );
    assert_eq!(
        grep(json!({"pattern": "nowhere"})).await,
        "no matches for `nowhere`"
    );
    let error = err(&ctx, "grep", json!({"pattern": "("})).await;
    assert!(matches!(error, ToolError::InvalidRegex { .. }), "{error}");
    let error = err(&ctx, "grep", json!({"pattern": "x", "max_results": 0})).await;
    assert!(matches!(
        error,
        ToolError::InvalidValue {
            field: "max_results",
            ..
        }
    ));
}

#[tokio::test]
async fn writes_wait_for_the_sync_gate_and_reads_do_not() {
    let f = repo();
    let (setter, gate) = sync_gate();
    let ctx = context(&f.root, gate);
    let write = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            execute(
                &ctx,
                "write_file",
                json!({"path": "late.txt", "content": "x\n"}),
            )
            .await
        }
    });
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        execute(&ctx, "read_file", json!({"path": "src/lib.rs"})),
    )
    .await
    .expect("reads do not wait");
    assert!(read.is_ok());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!write.is_finished());
    assert!(!f.root.join("late.txt").exists());
    setter.set(SyncState::Done);
    let written = tokio::time::timeout(Duration::from_secs(2), write)
        .await
        .expect("write finishes once the gate is done")
        .unwrap()
        .unwrap();
    assert_eq!(
        without_diffs(&written.file_changes),
        [record("late.txt", FileChange::Added, 1, 0)]
    );
}

#[tokio::test]
async fn a_failed_sync_makes_the_workspace_read_only() {
    let f = repo();
    let (setter, gate) = sync_gate();
    setter.set(SyncState::Failed("fetch: connection refused".into()));
    let ctx = context(&f.root, gate);
    let error = err(&ctx, "write_file", json!({"path": "x.txt", "content": "x"})).await;
    assert_eq!(
        error.to_string(),
        "the workspace is read-only because git sync failed: fetch: connection refused"
    );
    let error = err(
        &ctx,
        "edit_file",
        json!({"path": "src/lib.rs", "old_text": "one", "new_text": "1"}),
    )
    .await;
    assert!(matches!(error, ToolError::SyncFailed { .. }));
    ok(&ctx, "grep", json!({"pattern": "one"})).await;

    // bash still runs, so the agent can look around, but cannot write the workspace.
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "cat src/lib.rs; echo x > x.txt; touch src/lib.rs; rm README.md; exit 0"}),
    )
    .await;
    assert!(
        out.output.starts_with("one\ntwo\nthree\n"),
        "{}",
        out.output
    );
    assert_eq!(
        out.output.matches("Read-only file system").count(),
        3,
        "{}",
        out.output
    );
    assert!(out.file_changes.is_empty());
    assert!(!f.root.join("x.txt").exists());
    assert!(f.root.join("README.md").exists());
}

#[tokio::test]
async fn cancel_ends_a_waiting_write() {
    let f = repo();
    let (_setter, gate) = sync_gate();
    let ctx = context(&f.root, gate);
    let cancel = ctx.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let error = err(&ctx, "write_file", json!({"path": "x.txt", "content": "x"})).await;
    assert!(matches!(error, ToolError::Cancelled { tool: "write_file" }));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn output_is_capped_with_a_notice() {
    let f = repo();
    let mut ctx = ctx(&f);
    ctx.limits.output_cap_bytes = 300;
    let out = ok(&ctx, "tool_catalogue", json!({})).await.output;
    assert!(out.len() <= 300, "{}", out.len());
    assert!(
        out.ends_with("more bytes; narrow the query or use offset_line]"),
        "{out}"
    );
    assert!(out.starts_with("# Tools\n"));
}

// ---- bash ----

#[tokio::test]
async fn bash_reports_output_and_exit_code() {
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "pwd; echo out; echo err >&2; exit 3"}),
    )
    .await;
    assert_eq!(
        out.output,
        format!("{}\nout\nerr\nexit code 3", f.root.display())
    );
    assert!(out.file_changes.is_empty());
    let out = ok(&ctx, "bash", json!({"command": "printf 'no newline'"})).await;
    assert_eq!(out.output, "no newline\nexit code 0");
    let out = ok(&ctx, "bash", json!({"command": "true"})).await;
    assert_eq!(out.output, "exit code 0");
    // Stdin is empty, so nothing waits for input.
    let out = ok(&ctx, "bash", json!({"command": "cat; echo \"rc=$?\""})).await;
    assert_eq!(out.output, "rc=0\nexit code 0");
    let error = err(&ctx, "bash", json!({"command": "true", "timeout_ms": 0})).await;
    assert!(matches!(
        error,
        ToolError::InvalidValue {
            field: "timeout_ms",
            ..
        }
    ));
}

#[tokio::test]
async fn bash_streams_chunks_while_the_command_runs() {
    let f = repo();
    let mut ctx = ctx(&f);
    let (sender, mut chunks) = mpsc::unbounded_channel();
    ctx.output = Some(sender);
    let started = Instant::now();
    let run = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            execute(
                &ctx,
                "bash",
                json!({"command": "echo a; sleep 0.6; echo b"}),
            )
            .await
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(5), chunks.recv())
        .await
        .unwrap()
        .unwrap();
    let first_after = started.elapsed();
    assert_eq!(first, "a\n");
    assert!(!run.is_finished());
    let out = run.await.unwrap().unwrap();
    let total = started.elapsed();
    assert!(total >= Duration::from_millis(600));
    assert!(
        first_after + Duration::from_millis(400) < total,
        "{first_after:?} of {total:?}"
    );
    assert_eq!(out.output, "a\nb\nexit code 0");
    drop(ctx);
    let mut rest = String::new();
    while let Some(chunk) = chunks.recv().await {
        rest.push_str(&chunk);
    }
    assert_eq!(rest, "b\n");
}

#[tokio::test]
async fn bash_coalesces_chunks() {
    let f = repo();
    let mut ctx = ctx(&f);
    let (sender, mut chunks) = mpsc::unbounded_channel();
    ctx.output = Some(sender);
    let command = "for i in $(seq 1 50); do echo $i; sleep 0.01; done";
    let started = Instant::now();
    let out = ok(&ctx, "bash", json!({ "command": command })).await;
    let elapsed = started.elapsed();
    drop(ctx);
    let mut received = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        received.push(chunk);
    }
    let expected: String = (1..=50).map(|i| format!("{i}\n")).collect();
    assert_eq!(received.concat(), expected);
    assert_eq!(out.output, format!("{expected}exit code 0"));
    // At most 20 sends a second (plus the first and the last).
    let most = (elapsed.as_secs_f64() * 20.0).ceil() as usize + 2;
    assert!(
        received.len() <= most,
        "{} sends in {elapsed:?}",
        received.len()
    );
    assert!(received.len() > 1, "streamed, not sent at the end");
}

#[tokio::test]
async fn live_output_stops_at_its_limit_with_a_notice() {
    let f = repo();
    let mut ctx = ctx(&f);
    let (sender, mut chunks) = mpsc::unbounded_channel();
    ctx.output = Some(sender);
    // ~1 MiB of output, four times the live limit.
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "yes 0123456789abcdef | head -c 1048576"}),
    )
    .await;
    drop(ctx);
    let mut streamed = String::new();
    while let Some(chunk) = chunks.recv().await {
        streamed.push_str(&chunk);
    }
    assert!(
        streamed.len() < super::bash::STREAM_LIMIT_BYTES + 1024,
        "{} bytes streamed",
        streamed.len()
    );
    assert!(
        streamed.ends_with("KiB; the result keeps the head and tail of the rest]\n"),
        "{}",
        &streamed[streamed.len() - 200..]
    );
    assert!(
        out.output.ends_with("exit code 0"),
        "the command ran to its end"
    );
}

/// A `sleep` argument no other process has: seconds with a unique fraction.
fn sleep_marker() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!(
        "1000.{}{:04}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a live (not zombie) `sleep <marker>` exists anywhere on the machine.
fn sleeping(marker: &str) -> bool {
    let cmdline = format!("sleep\0{marker}\0");
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let dir = entry.path();
        std::fs::read(dir.join("cmdline")).is_ok_and(|c| c == cmdline.as_bytes())
            && std::fs::read_to_string(dir.join("stat")).is_ok_and(|stat| {
                !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or_default()
                    .trim_start()
                    .starts_with('Z')
            })
    })
}

async fn wait_gone(marker: &str) {
    let started = Instant::now();
    while sleeping(marker) {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "sleep {marker} survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_sleeping(marker: &str) {
    let started = Instant::now();
    while !sleeping(marker) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "sleep {marker} never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bash_timeout_kills_the_whole_process_group() {
    let f = repo();
    let ctx = ctx(&f);
    let (child, main) = (sleep_marker(), sleep_marker());
    let started = Instant::now();
    let run = tokio::spawn({
        let ctx = ctx.clone();
        let command = format!("sleep {child} & echo started; sleep {main}");
        async move {
            execute(
                &ctx,
                "bash",
                json!({"command": command, "timeout_ms": 1000}),
            )
            .await
        }
    });
    wait_sleeping(&child).await;
    let error = run.await.unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    let ToolError::Timeout { timeout_ms, output } = &error else {
        panic!("{error}");
    };
    assert_eq!(*timeout_ms, 1000);
    assert_eq!(output, "started\n");
    assert_eq!(
        error.to_string(),
        "command timed out after 1000 ms and was killed; output so far:\nstarted\n"
    );
    wait_gone(&child).await;
    wait_gone(&main).await;

    // Asking for more than the maximum gets the maximum.
    let mut short = ctx.clone();
    short.limits.bash_timeout_max_ms = 300;
    let error = err(
        &short,
        "bash",
        json!({"command": "sleep 5", "timeout_ms": 60000}),
    )
    .await;
    assert!(matches!(
        error,
        ToolError::Timeout {
            timeout_ms: 300,
            ..
        }
    ));
}

#[tokio::test]
async fn bash_kills_what_the_command_left_running() {
    let f = repo();
    let ctx = ctx(&f);
    let (child, detached) = (sleep_marker(), sleep_marker());
    let started = Instant::now();
    let command = format!("sleep {child} & setsid sleep {detached} & sleep 0.3; echo left");
    let out = ok(&ctx, "bash", json!({ "command": command })).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(out.output, "left\nexit code 0");
    wait_gone(&child).await;
    wait_gone(&detached).await;
}

#[tokio::test]
async fn bash_cancel_kills_the_group_within_a_second() {
    let f = repo();
    let ctx = ctx(&f);
    let (child, main) = (sleep_marker(), sleep_marker());
    let run = tokio::spawn({
        let ctx = ctx.clone();
        let command = format!("sleep {child} & sleep {main}");
        async move { execute(&ctx, "bash", json!({ "command": command })).await }
    });
    wait_sleeping(&child).await;
    wait_sleeping(&main).await;
    let cancelled_at = Instant::now();
    ctx.cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(1), run)
        .await
        .expect("bash ends within a second of cancel")
        .unwrap();
    assert!(matches!(result, Err(ToolError::Cancelled { tool: "bash" })));
    wait_gone(&child).await;
    wait_gone(&main).await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        cancelled_at.elapsed()
    );
}

#[tokio::test]
async fn bash_output_keeps_head_and_tail() {
    let f = repo();
    let mut ctx = ctx(&f);
    ctx.limits.output_cap_bytes = 2000;
    let out = ok(&ctx, "bash", json!({"command": "seq 1 20000"}))
        .await
        .output;
    assert!(out.len() <= 2000, "{}", out.len());
    assert!(out.starts_with("1\n2\n3\n"), "{out}");
    assert!(out.ends_with("19999\n20000\nexit code 0"), "{out}");
    let total: usize = (1..=20000).map(|i: u32| i.to_string().len() + 1).sum();
    let (head, rest) = out.split_once("\n[… truncated: ").unwrap();
    let (cut, tail) = rest.split_once(" bytes cut from the middle").unwrap();
    let tail = tail
        .split_once("]\n")
        .unwrap()
        .1
        .strip_suffix("exit code 0")
        .unwrap();
    assert_eq!(
        head.len() + cut.parse::<usize>().unwrap() + tail.len(),
        total
    );
}

#[tokio::test]
async fn bash_cannot_write_read_only_paths() {
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "echo x > .nightshift/f; echo x > settings/g; echo y > other.txt; cat other.txt"}),
    )
    .await;
    assert_eq!(
        out.output.matches("Read-only file system").count(),
        2,
        "{}",
        out.output
    );
    assert!(out.output.ends_with("y\nexit code 0"), "{}", out.output);
    assert!(!f.root.join(".nightshift/f").exists());
    assert_eq!(
        out.file_changes,
        [record("other.txt", FileChange::Added, 1, 0)]
    );
}

#[tokio::test]
async fn bash_does_not_see_the_agents_secrets() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        std::env::set_var("NIGHTSHIFT_TOOLS_TEST_API_KEY", "sk-1");
        std::env::set_var("NIGHTSHIFT_TOOLS_TEST_TOKEN", "t-1");
        std::env::set_var("nightshift_tools_test_secret", "s-1");
        std::env::set_var("NIGHTSHIFT_TOOLS_TEST_PLAIN", "visible");
    });
    let f = repo();
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "env | grep -i '^nightshift_tools_test_' | sort"}),
    )
    .await;
    assert_eq!(
        out.output,
        "NIGHTSHIFT_TOOLS_TEST_PLAIN=visible\nexit code 0"
    );
    // Nor through /proc: the agent's process is not in the command's pid namespace.
    let agent = std::process::id();
    let command =
        format!("test -e /proc/{agent}/environ || echo hidden; ls -d /proc/[0-9]* | wc -l");
    let out = ok(&ctx, "bash", json!({ "command": command })).await;
    let (hidden, rest) = out.output.split_once('\n').unwrap();
    assert_eq!(hidden, "hidden");
    let visible: u32 = rest.lines().next().unwrap().trim().parse().unwrap();
    assert!(visible < 10, "{visible} processes visible");
}

#[tokio::test]
async fn bash_reports_the_files_it_changed() {
    let f = repo();
    let ctx = ctx(&f);
    // Dirty before the command: a change it makes on top still counts; one it leaves alone does not.
    write(&f.root, "src/nested/b.txt", "b two\nmore\n");
    write(&f.root, "untouched.txt", "u\n");
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "sed -i 's/two/TWO/' src/lib.rs && printf 'a\\nb\\nc' > new.txt && rm README.md \
                           && echo again >> src/nested/b.txt && echo ignored >> debug.log"}),
    )
    .await;
    assert_eq!(out.output, "exit code 0");
    assert_eq!(
        without_diffs(&out.file_changes),
        [
            record("README.md", FileChange::Deleted, 0, 1),
            record("new.txt", FileChange::Added, 3, 0),
            record("src/lib.rs", FileChange::Modified, 1, 1),
            record("src/nested/b.txt", FileChange::Modified, 2, 0),
        ]
    );
    // Tracked files carry their diff against the last commit; a file the command created has none.
    let diffs: Vec<Option<&str>> = out.file_changes.iter().map(|c| c.diff.as_deref()).collect();
    let readme = diffs[0].expect("the deleted file has a diff");
    assert!(
        readme.starts_with("diff --git a/README.md b/README.md\ndeleted file mode"),
        "{readme}"
    );
    assert!(
        readme.contains("\n--- a/README.md\n+++ /dev/null\n"),
        "{readme}"
    );
    assert_eq!(diffs[1], None);
    let lib = diffs[2].expect("the modified file has a diff");
    assert!(
        lib.contains("\n--- a/src/lib.rs\n+++ b/src/lib.rs\n"),
        "{lib}"
    );
    assert!(lib.contains("\n-two\n+TWO\n"), "{lib}");
    assert!(!lib.contains("b.txt"), "one file per diff: {lib}");
    // Nothing changed, nothing reported.
    let out = ok(
        &ctx,
        "bash",
        json!({"command": "git status --short >/dev/null"}),
    )
    .await;
    assert!(out.file_changes.is_empty());
}

#[tokio::test]
async fn bash_outside_git_reports_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), SyncGate::done());
    let out = ok(&ctx, "bash", json!({"command": "echo x > f.txt"})).await;
    assert_eq!(out.output, "exit code 0");
    assert!(out.file_changes.is_empty());
    assert!(dir.path().join("f.txt").exists());
}

#[test]
fn missing_programs_are_not_found() {
    assert!(bash::find_program("bwrap").is_some());
    assert!(bash::find_program("nightshift-no-such-program").is_none());
}

#[tokio::test]
async fn grep_in_parallel_returns_the_first_matches_in_path_order() {
    let f = repo();
    for i in 0..700 {
        write(
            &f.root,
            &format!("many/f{i:04}.txt"),
            "a needle\nno\nanother needle\n",
        );
    }
    let ctx = ctx(&f);
    let out = ok(
        &ctx,
        "grep",
        json!({"pattern": "needle", "path": "many", "max_results": 301}),
    )
    .await;
    let lines: Vec<&str> = out.output.lines().collect();
    let expected: Vec<String> = (0..151)
        .flat_map(|i| {
            [
                format!("many/f{i:04}.txt:1:a needle"),
                format!("many/f{i:04}.txt:3:another needle"),
            ]
        })
        .take(301)
        .collect();
    assert_eq!(&lines[..301], expected.as_slice());
    assert!(
        lines[301].starts_with("[more matches: stopped at max_results=301"),
        "{}",
        lines[301]
    );
    // Without a limit in sight every file is searched, still in order.
    let all = ok(
        &ctx,
        "grep",
        json!({"pattern": "another", "path": "many", "max_results": 5000}),
    )
    .await;
    let files: Vec<&str> = all
        .output
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    let mut sorted = files.clone();
    sorted.sort_unstable();
    assert_eq!(files.len(), 700);
    assert_eq!(files, sorted);
}

/// The sub-session tools ask the session and hand the model its answer; a refusal is an error that
/// names its code; without a session link they say so.
#[tokio::test]
async fn session_tools_ask_the_session_and_report_refusals() {
    use nightshift_protocol::http::SessionStatus;
    use nightshift_protocol::{ChildInfo, ErrorCode, SessionCall, SessionReply};
    let f = repo();
    let (calls, mut requests) = session_tools::SessionCalls::new(Duration::from_secs(5));
    let mut context = ctx(&f);
    context.session = Some(calls);
    let session = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(request) = requests.recv().await {
            let reply = match &request.call {
                SessionCall::SpawnSession { prompt, .. } if prompt == "too much" => {
                    SessionReply::Refused {
                        code: ErrorCode::ChildLimit,
                        message: "at most 5 children may run at once".to_owned(),
                    }
                }
                SessionCall::SpawnSession { title, .. } => SessionReply::Spawned {
                    child: ChildInfo {
                        id: "c1".to_owned(),
                        repo: "demo/hello".to_owned(),
                        title: title.clone().unwrap_or_default(),
                        status: SessionStatus::Starting,
                        created_ms: 7,
                    },
                },
                _ => SessionReply::Children { children: vec![] },
            };
            seen.push(request.call);
            let _ = request.reply.send(reply);
        }
        seen
    });
    let spawned = ok(
        &context,
        "spawn_session",
        json!({"prompt": "write docs", "title": "docs"}),
    )
    .await;
    let child: Value = serde_json::from_str(&spawned.output).unwrap();
    assert_eq!(child["id"], "c1");
    assert_eq!(child["status"], "starting");
    let refused = err(&context, "spawn_session", json!({"prompt": "too much"})).await;
    assert_eq!(
        refused.to_string(),
        "the session refused (child_limit): at most 5 children may run at once"
    );
    assert!(matches!(
        err(&context, "spawn_session", json!({"prompt": "  "})).await,
        ToolError::InvalidValue { .. }
    ));
    assert_eq!(ok(&context, "list_children", json!({})).await.output, "[]");
    drop(context);
    let seen = session.await.unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(matches!(
        err(&ctx(&f), "session_status", json!({"id": "c1"})).await,
        ToolError::NoSession
    ));
}

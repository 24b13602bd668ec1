//! Hooks with real hook executables: small shell scripts in a temporary workspace.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap().join("ws");
        std::fs::create_dir_all(root.join(".nightshift/hooks")).unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        Self { _dir: dir, root }
    }

    /// Write an executable `#!/bin/sh` script at the workspace-relative `path`.
    fn script_at(&self, path: &str, body: &str) {
        let file = self.root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Write `.nightshift/hooks/<name>.sh`; its path for `command`.
    fn script(&self, name: &str, body: &str) -> String {
        let path = format!(".nightshift/hooks/{name}.sh");
        self.script_at(&path, body);
        path
    }

    fn hooks(&self, config: &str) -> Hooks {
        Hooks::from_toml(config, &self.root).unwrap()
    }

    /// A config of one hook named `name` for `event` running the script `body`, plus `extra` lines.
    fn one_hook(&self, name: &str, event: &str, body: &str, extra: &str) -> Hooks {
        let path = self.script(name, body);
        self.hooks(&format!(
            "[[hooks]]\nname = \"{name}\"\nevent = \"{event}\"\ncommand = [\"{path}\"]\n{extra}\n"
        ))
    }

    /// The JSON a hook saved with `cat > <file>`.
    fn saved_json(&self, file: &str) -> Value {
        let text = std::fs::read_to_string(self.root.join(file)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn pid(&self, file: &str) -> i32 {
        std::fs::read_to_string(self.root.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

fn ctx() -> HookContext {
    HookContext {
        session_id: "s1".to_owned(),
        prompt_id: Some("p1".to_owned()),
        author_login: Some("octocat".to_owned()),
    }
}

fn blocked(by: &str, reason: &str) -> BeforeDecision {
    BeforeDecision::Block {
        by: by.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The reason of a block, or a panic.
fn block_reason(decision: &BeforeDecision, by: &str) -> String {
    match decision {
        BeforeDecision::Block { by: got, reason } if got == by => reason.clone(),
        other => panic!("expected a block by {by}, got {other:?}"),
    }
}

/// Whether process `pid` is gone (a zombie nobody reaped yet counts as gone), waiting up to 2 s.
async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim().to_owned()));
        match state {
            None => return true,
            Some(rest) if rest.starts_with('Z') => return true,
            Some(_) if Instant::now() > deadline => return false,
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

const BASH_INPUT: &str = r#"{"command": "cargo test"}"#;

fn bash_input() -> Value {
    serde_json::from_str(BASH_INPUT).unwrap()
}

#[tokio::test]
async fn allow_by_empty_stdout_and_by_answer_and_the_payload() {
    let f = Fixture::new();
    let quiet = f.script(
        "quiet",
        r#"cat > seen-quiet.json; echo "$NIGHTSHIFT_HOOK_EVENT" > event.txt"#,
    );
    let answer = f.script(
        "answer",
        r#"echo '{"decision": "allow", "note": "extra fields are ignored"}'"#,
    );
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        event = "tool.before"
        command = ["{quiet}"]
        [[hooks]]
        event = "tool.before"
        command = ["{answer}"]
        "#
    ));
    let decision = hooks.tool_before(&ctx(), "bash", &bash_input()).await;
    assert_eq!(decision, BeforeDecision::Allow);
    assert_eq!(
        f.saved_json("seen-quiet.json"),
        json!({"event": "tool.before", "session_id": "s1", "prompt_id": "p1", "author": "octocat",
               "tool": "bash", "input": {"command": "cargo test"}})
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("event.txt")).unwrap(),
        "tool.before\n"
    );

    // The context may be partly unknown.
    let anonymous = HookContext {
        session_id: "s2".to_owned(),
        ..HookContext::default()
    };
    hooks
        .tool_before(&anonymous, "read_file", &json!({"path": "a"}))
        .await;
    assert_eq!(
        f.saved_json("seen-quiet.json"),
        json!({"event": "tool.before", "session_id": "s2", "prompt_id": null, "author": null,
               "tool": "read_file", "input": {"path": "a"}})
    );
}

#[tokio::test]
async fn block_with_and_without_reason() {
    let f = Fixture::new();
    let hooks = f.one_hook(
        "guard",
        "tool.before",
        r#"echo '{"decision": "block", "reason": "no network in tests"}'"#,
        "",
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        blocked("guard", "no network in tests")
    );
    let hooks = f.one_hook("terse", "tool.before", r#"echo '{"decision":"block"}'"#, "");
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        blocked("terse", "no reason given")
    );
}

#[tokio::test]
async fn rewrite_input_from_what_the_hook_read() {
    let f = Fixture::new();
    // Appends ` --offline` to the command it was given (the payload is one line of compact JSON).
    let hooks = f.one_hook(
        "offline",
        "tool.before",
        r#"sed 's/.*"command":"\([^"]*\)".*/{"decision":"rewrite","input":{"command":"\1 --offline"}}/'"#,
        r#"tools = ["bash"]"#,
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        BeforeDecision::Rewrite {
            by: "offline".to_owned(),
            input: json!({"command": "cargo test --offline"}),
        }
    );
}

#[tokio::test]
async fn chained_hooks_rewrite_then_block_and_the_first_block_wins() {
    let f = Fixture::new();
    let first = f.script(
        "first",
        r#"echo '{"decision": "rewrite", "input": {"command": "make all"}}'"#,
    );
    let second = f.script(
        "second",
        r#"cat > seen-second.json; echo '{"decision": "block", "reason": "make is not allowed"}'"#,
    );
    let third = f.script("third", "touch third-ran");
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "first"
        event = "tool.before"
        command = ["{first}"]
        [[hooks]]
        name = "second"
        event = "tool.before"
        command = ["{second}"]
        [[hooks]]
        name = "third"
        event = "tool.before"
        command = ["{third}"]
        "#
    ));
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        blocked("second", "make is not allowed")
    );
    assert_eq!(
        f.saved_json("seen-second.json")["input"],
        json!({"command": "make all"})
    );
    assert!(
        !f.root.join("third-ran").exists(),
        "a hook after a block ran"
    );
}

#[tokio::test]
async fn chained_rewrites_name_every_rewriter() {
    let f = Fixture::new();
    let first = f.script(
        "first",
        r#"echo '{"decision": "rewrite", "input": {"command": "make all"}}'"#,
    );
    let second = f.script(
        "second",
        r#"sed 's/.*"command":"\([^"]*\)".*/{"decision":"rewrite","input":{"command":"\1 -j2"}}/'"#,
    );
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "first"
        event = "tool.before"
        command = ["{first}"]
        [[hooks]]
        name = "second"
        event = "tool.before"
        command = ["{second}"]
        "#
    ));
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        BeforeDecision::Rewrite {
            by: "first, second".to_owned(),
            input: json!({"command": "make all -j2"}),
        }
    );
}

#[tokio::test]
async fn tool_matcher_is_respected() {
    let f = Fixture::new();
    let hooks = f.one_hook(
        "bash-only",
        "tool.before",
        r#"echo '{"decision": "block", "reason": "no"}'"#,
        r#"tools = ["bash", "edit_file"]"#,
    );
    let input = json!({"path": "src/lib.rs", "content": "x"});
    assert_eq!(
        hooks.tool_before(&ctx(), "write_file", &input).await,
        BeforeDecision::Allow
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "read_file", &input).await,
        BeforeDecision::Allow
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        blocked("bash-only", "no")
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "edit_file", &input).await,
        blocked("bash-only", "no")
    );

    let hooks = f.one_hook(
        "after-bash",
        "tool.after",
        r#"echo '{"decision": "rewrite", "output": "x"}'"#,
        r#"tools = ["bash"]"#,
    );
    assert_eq!(
        hooks
            .tool_after(&ctx(), "read_file", &input, "text", true)
            .await,
        AfterDecision::Keep
    );
    assert!(matches!(
        hooks
            .tool_after(&ctx(), "bash", &bash_input(), "text", true)
            .await,
        AfterDecision::Rewrite { .. }
    ));
}

#[tokio::test]
async fn tool_after_rewrite_chain_keep_and_withhold() {
    let f = Fixture::new();
    let redact = f.script(
        "redact",
        r#"cat > seen-redact.json; echo '{"decision": "rewrite", "output": "token=[redacted]"}'"#,
    );
    let keep = f.script(
        "keep",
        r#"cat > seen-keep.json; echo '{"decision": "keep"}'"#,
    );
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "redact"
        event = "tool.after"
        command = ["{redact}"]
        [[hooks]]
        name = "keep"
        event = "tool.after"
        command = ["{keep}"]
        "#
    ));
    let decision = hooks
        .tool_after(&ctx(), "bash", &bash_input(), "token=hunter2", false)
        .await;
    assert_eq!(
        decision,
        AfterDecision::Rewrite {
            by: "redact".to_owned(),
            output: "token=[redacted]".to_owned(),
        }
    );
    assert_eq!(
        f.saved_json("seen-redact.json"),
        json!({"event": "tool.after", "session_id": "s1", "prompt_id": "p1", "author": "octocat",
               "tool": "bash", "input": {"command": "cargo test"}, "output": "token=hunter2", "ok": false})
    );
    assert_eq!(f.saved_json("seen-keep.json")["output"], "token=[redacted]");

    let hooks = f.one_hook(
        "secrets",
        "tool.after",
        r#"echo '{"decision": "withhold", "reason": "looks like a private key"}'"#,
        "",
    );
    assert_eq!(
        hooks
            .tool_after(
                &ctx(),
                "read_file",
                &json!({"path": "id_rsa"}),
                "-----BEGIN",
                true
            )
            .await,
        AfterDecision::Withhold {
            by: "secrets".to_owned(),
            reason: "looks like a private key".to_owned(),
        }
    );

    let hooks = f.one_hook("silent", "tool.after", "true", "");
    assert_eq!(
        hooks
            .tool_after(&ctx(), "bash", &bash_input(), "ok", true)
            .await,
        AfterDecision::Keep
    );
}

#[tokio::test]
async fn prompt_before_block_and_rewrite() {
    let f = Fixture::new();
    let hooks = f.one_hook(
        "ticket",
        "prompt.before",
        r#"cat > seen-ticket.json; echo '{"decision": "block", "reason": "mention a ticket"}'"#,
        "",
    );
    assert_eq!(
        hooks.prompt_before(&ctx(), "fix it").await,
        PromptDecision::Block {
            by: "ticket".to_owned(),
            reason: "mention a ticket".to_owned(),
        }
    );
    assert_eq!(
        f.saved_json("seen-ticket.json"),
        json!({"event": "prompt.before", "session_id": "s1", "prompt_id": "p1", "author": "octocat",
               "text": "fix it"})
    );

    let prefix = f.script(
        "prefix",
        r#"sed 's/.*"text":"\([^"]*\)".*/{"decision":"rewrite","text":"[NS-1] \1"}/'"#,
    );
    let seen = f.script("seen", r#"cat > seen-prompt.json"#);
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "prefix"
        event = "prompt.before"
        command = ["{prefix}"]
        [[hooks]]
        name = "seen"
        event = "prompt.before"
        command = ["{seen}"]
        "#
    ));
    assert_eq!(
        hooks.prompt_before(&ctx(), "fix it").await,
        PromptDecision::Rewrite {
            by: "prefix".to_owned(),
            text: "[NS-1] fix it".to_owned(),
        }
    );
    assert_eq!(f.saved_json("seen-prompt.json")["text"], "[NS-1] fix it");

    let hooks = f.one_hook("quiet", "prompt.before", "exit 0", "");
    assert_eq!(
        hooks.prompt_before(&ctx(), "fix it").await,
        PromptDecision::Allow
    );
}

#[tokio::test]
async fn timeout_blocks_quickly_and_kills_the_process_group() {
    let f = Fixture::new();
    let hooks = f.one_hook(
        "guard",
        "tool.before",
        "echo $$ > leader.pid; sleep 10 & echo $! > child.pid; wait",
        "timeout_ms = 200",
    );
    let started = Instant::now();
    let decision = hooks.tool_before(&ctx(), "bash", &bash_input()).await;
    let elapsed = started.elapsed();
    assert_eq!(
        decision,
        blocked("guard", "hook \"guard\" timed out after 200 ms")
    );
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
    assert!(gone(f.pid("leader.pid")).await, "the hook survived");
    assert!(gone(f.pid("child.pid")).await, "the hook's child survived");
}

#[tokio::test]
async fn timeout_in_every_event_fails_closed() {
    let f = Fixture::new();
    for (event, body) in [("tool.after", "sleep 10"), ("prompt.before", "sleep 10")] {
        let hooks = f.one_hook("slow", event, body, "timeout_ms = 100");
        let reason = "hook \"slow\" timed out after 100 ms".to_owned();
        match event {
            "tool.after" => assert_eq!(
                hooks
                    .tool_after(&ctx(), "bash", &bash_input(), "out", true)
                    .await,
                AfterDecision::Withhold {
                    by: "slow".to_owned(),
                    reason
                }
            ),
            _ => assert_eq!(
                hooks.prompt_before(&ctx(), "hi").await,
                PromptDecision::Block {
                    by: "slow".to_owned(),
                    reason
                }
            ),
        }
    }
}

#[tokio::test]
async fn leftover_processes_are_killed_when_the_hook_exits() {
    let f = Fixture::new();
    // The background sleep keeps stdout open; the answer must not wait for it.
    let hooks = f.one_hook(
        "leaky",
        "tool.before",
        r#"sleep 10 & echo $! > bg.pid; echo '{"decision": "allow"}'"#,
        "",
    );
    let started = Instant::now();
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        BeforeDecision::Allow
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(gone(f.pid("bg.pid")).await, "the leftover survived");
}

#[tokio::test]
async fn dropping_the_decision_kills_the_hook() {
    let f = Fixture::new();
    let hooks = f.one_hook(
        "slow",
        "tool.before",
        "echo $$ > leader.pid; sleep 10 & echo $! > child.pid; wait",
        "timeout_ms = 10000",
    );
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        hooks.tool_before(&ctx(), "bash", &bash_input()),
    )
    .await;
    assert!(cancelled.is_err());
    assert!(gone(f.pid("leader.pid")).await, "the hook survived");
    assert!(gone(f.pid("child.pid")).await, "the hook's child survived");
}

#[tokio::test]
async fn crashes_and_failures_fail_closed_with_a_clear_reason() {
    let f = Fixture::new();
    let check = |body: &'static str, expected: &'static str| {
        let hooks = f.one_hook("guard", "tool.before", body, "");
        async move {
            let decision = hooks.tool_before(&ctx(), "bash", &bash_input()).await;
            let reason = block_reason(&decision, "guard");
            assert!(
                reason.starts_with(expected),
                "{body}: {reason:?} does not start with {expected:?}"
            );
        }
    };
    check("kill -9 $$", "hook \"guard\" was killed by signal 9").await;
    check(
        "echo 'first line' >&2; echo boom >&2; exit 3",
        "hook \"guard\" exited with status 3: first line\nboom",
    )
    .await;
    check("exit 1", "hook \"guard\" exited with status 1").await;
    check(
        "echo not json",
        "hook \"guard\" gave an invalid answer: not one json object",
    )
    .await;
    check(
        r#"echo '{"decision": "allow"} {"decision": "block"}'"#,
        "hook \"guard\" gave an invalid answer: not one json object",
    )
    .await;
    check(
        "echo '[1, 2]'",
        "hook \"guard\" gave an invalid answer: not a json object",
    )
    .await;
    check(
        r#"echo '{"verdict": "allow"}'"#,
        "hook \"guard\" gave an invalid answer: no `decision`",
    )
    .await;
    check(
        r#"echo '{"decision": "maybe"}'"#,
        "hook \"guard\" gave an invalid answer: unknown decision \"maybe\" for tool.before",
    )
    .await;
    check(
        r#"echo '{"decision": "keep"}'"#,
        "hook \"guard\" gave an invalid answer: unknown decision \"keep\" for tool.before",
    )
    .await;
    check(
        r#"echo '{"decision": "rewrite", "input": "rm -rf /"}'"#,
        "hook \"guard\" gave an invalid answer: `rewrite` needs an object `input`",
    )
    .await;
    check(
        r#"echo '{"decision": "block", "reason": 7}'"#,
        "hook \"guard\" gave an invalid answer: `reason` is not a string",
    )
    .await;
    check(
        "head -c 2000000 /dev/zero | tr '\\0' a",
        "hook \"guard\" printed more than 1048576 bytes on stdout",
    )
    .await;
    check(
        "printf '\\377\\n'",
        "hook \"guard\" gave an invalid answer: stdout is not utf-8",
    )
    .await;
}

#[tokio::test]
async fn failures_in_tool_after_withhold_and_in_prompt_before_block() {
    let f = Fixture::new();
    let hooks = f.one_hook("redact", "tool.after", "exit 2", "");
    assert_eq!(
        hooks
            .tool_after(&ctx(), "bash", &bash_input(), "out", true)
            .await,
        AfterDecision::Withhold {
            by: "redact".to_owned(),
            reason: "hook \"redact\" exited with status 2".to_owned(),
        }
    );
    let hooks = f.one_hook(
        "redact",
        "tool.after",
        r#"echo '{"decision": "rewrite"}'"#,
        "",
    );
    assert_eq!(
        hooks
            .tool_after(&ctx(), "bash", &bash_input(), "out", true)
            .await,
        AfterDecision::Withhold {
            by: "redact".to_owned(),
            reason: "hook \"redact\" gave an invalid answer: `rewrite` needs a string `output`"
                .to_owned(),
        }
    );
    let hooks = f.one_hook(
        "ticket",
        "prompt.before",
        r#"echo '{"decision": "withhold"}'"#,
        "",
    );
    assert_eq!(
        hooks.prompt_before(&ctx(), "hi").await,
        PromptDecision::Block {
            by: "ticket".to_owned(),
            reason: "hook \"ticket\" gave an invalid answer: unknown decision \"withhold\" for prompt.before"
                .to_owned(),
        }
    );
}

#[tokio::test]
async fn session_idle_reports_failures_in_order() {
    let f = Fixture::new();
    let fine = f.script("fine", r#"cat > seen-idle.json; echo "stdout is ignored""#);
    let tests = f.script("tests", "echo '2 tests failed' >&2; exit 1");
    let slow = f.script("slow", "sleep 10");
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "fine"
        event = "session.idle"
        command = ["{fine}"]
        [[hooks]]
        name = "tests"
        event = "session.idle"
        command = ["{tests}"]
        [[hooks]]
        name = "slow"
        event = "session.idle"
        command = ["{slow}"]
        timeout_ms = 100
        "#
    ));
    assert_eq!(
        hooks.session_idle(&ctx()).await,
        vec![
            HookFailure {
                by: "tests".to_owned(),
                reason: "hook \"tests\" exited with status 1: 2 tests failed".to_owned(),
            },
            HookFailure {
                by: "slow".to_owned(),
                reason: "hook \"slow\" timed out after 100 ms".to_owned(),
            },
        ]
    );
    assert_eq!(
        f.saved_json("seen-idle.json"),
        json!({"event": "session.idle", "session_id": "s1", "prompt_id": "p1", "author": "octocat"})
    );
    assert_eq!(Hooks::none().session_idle(&ctx()).await, vec![]);
}

#[tokio::test]
async fn hooks_get_a_clean_environment_and_run_in_the_workspace_root() {
    // Set for the whole test process: a hook must not see it anyway.
    std::env::set_var("ANTHROPIC_API_KEY", "sk-test-secret");
    std::env::set_var("NIGHTSHIFT_SANDBOX_TOKEN", "sandbox-secret");
    let f = Fixture::new();
    let hooks = f.one_hook("env", "tool.before", "env > env.txt; pwd -P > pwd.txt", "");
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        BeforeDecision::Allow
    );
    let env = std::fs::read_to_string(f.root.join("env.txt")).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    assert!(!env.contains("secret"), "{env}");
    for name in ["PATH", "HOME", EVENT_ENV] {
        assert!(names.contains(&name), "{name} missing: {env}");
    }
    // Besides ours, only what the shell itself sets.
    for name in &names {
        assert!(
            ["PATH", "HOME", EVENT_ENV, "PWD", "SHLVL", "_", "OLDPWD"].contains(name),
            "unexpected {name}: {env}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(f.root.join("pwd.txt"))
            .unwrap()
            .trim(),
        f.root.display().to_string()
    );
}

#[tokio::test]
async fn bare_programs_are_found_on_path_with_arguments() {
    let f = Fixture::new();
    f.script_at(
        ".nightshift/hooks/plain.sh",
        "echo \"$1\" > arg.txt; cat > /dev/null",
    );
    std::fs::set_permissions(
        f.root.join(".nightshift/hooks/plain.sh"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let hooks = f.hooks(
        r#"
        [[hooks]]
        event = "tool.before"
        command = ["sh", ".nightshift/hooks/plain.sh", "--strict"]
        "#,
    );
    assert_eq!(
        hooks.tool_before(&ctx(), "bash", &bash_input()).await,
        BeforeDecision::Allow
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("arg.txt")).unwrap(),
        "--strict\n"
    );
}

#[tokio::test]
async fn read_only_paths_block_writes_before_any_hook_runs() {
    let f = Fixture::new();
    let spy = f.script("spy", "touch spy-ran");
    let hooks = f.hooks(&format!(
        r#"
        [policy]
        read_only_paths = ["migrations/", ".github/workflows"]

        [[hooks]]
        event = "tool.before"
        command = ["{spy}"]
        "#
    ));
    assert_eq!(
        hooks.policy().read_only_paths,
        [".nightshift", "migrations", ".github/workflows"]
    );
    for (tool, path) in [
        ("write_file", ".nightshift/hooks.toml"),
        ("write_file", "./.nightshift/hooks.toml"),
        ("edit_file", "src/../.nightshift/x"),
        ("write_file", ".nightshift//hooks/spy.sh"),
        ("write_file", ".nightshift"),
        ("edit_file", "migrations/001_init.sql"),
        ("write_file", ".github/workflows/ci.yml"),
    ] {
        let decision = hooks
            .tool_before(&ctx(), tool, &json!({"path": path, "content": "x"}))
            .await;
        let reason = block_reason(&decision, READ_ONLY_PATHS_POLICY);
        assert!(reason.contains("read-only"), "{path}: {reason}");
    }
    assert_eq!(
        block_reason(
            &hooks
                .tool_before(&ctx(), "write_file", &json!({"path": "src/../.nightshift/x"}))
                .await,
            READ_ONLY_PATHS_POLICY
        ),
        "`src/../.nightshift/x` is read-only: `.nightshift/x` is under the read-only path `.nightshift`"
    );
    assert!(
        !f.root.join("spy-ran").exists(),
        "a hook ran for a blocked write"
    );

    for (tool, path) in [
        ("write_file", ".nightshiftX"),
        ("write_file", ".nightshiftX/hooks.toml"),
        ("edit_file", "migrationsX/1.sql"),
        ("write_file", ".github/README.md"),
        ("read_file", ".nightshift/hooks.toml"),
        ("list_files", ".nightshift"),
    ] {
        assert_eq!(
            hooks
                .tool_before(&ctx(), tool, &json!({"path": path}))
                .await,
            BeforeDecision::Allow,
            "{tool} {path}"
        );
    }
}

#[tokio::test]
async fn read_only_paths_hold_through_symlinks_and_rewrites() {
    let f = Fixture::new();
    std::os::unix::fs::symlink(f.root.join(".nightshift"), f.root.join("cfg")).unwrap();
    let sneaky = f.script(
        "sneaky",
        r#"echo '{"decision": "rewrite", "input": {"path": "./.nightshift/hooks.toml", "content": ""}}'"#,
    );
    let hooks = f.hooks(&format!(
        r#"
        [[hooks]]
        name = "sneaky"
        event = "tool.before"
        tools = ["write_file"]
        command = ["{sneaky}"]
        "#
    ));
    block_reason(
        &hooks
            .tool_before(&ctx(), "write_file", &json!({"path": "cfg/hooks.toml"}))
            .await,
        READ_ONLY_PATHS_POLICY,
    );
    block_reason(
        &hooks
            .tool_before(&ctx(), "write_file", &json!({"path": "src/main.rs"}))
            .await,
        READ_ONLY_PATHS_POLICY,
    );
}

#[tokio::test]
async fn the_default_policy_applies_without_hooks() {
    let hooks = Hooks::none();
    assert_eq!(hooks.policy().read_only_paths, [".nightshift"]);
    assert!(hooks.is_empty());
    block_reason(
        &hooks
            .tool_before(
                &ctx(),
                "write_file",
                &json!({"path": "./.nightshift/hooks.toml"}),
            )
            .await,
        READ_ONLY_PATHS_POLICY,
    );
    block_reason(
        &hooks
            .tool_before(
                &ctx(),
                "bash",
                &json!({"command": "git push --force origin x"}),
            )
            .await,
        BLOCKED_COMMANDS_POLICY,
    );
    assert_eq!(
        hooks
            .tool_before(&ctx(), "bash", &json!({"command": "git push origin x"}))
            .await,
        BeforeDecision::Allow
    );
    assert_eq!(
        hooks
            .tool_after(&ctx(), "bash", &bash_input(), "x", true)
            .await,
        AfterDecision::Keep
    );
    assert_eq!(
        hooks.prompt_before(&ctx(), "hi").await,
        PromptDecision::Allow
    );
}

#[tokio::test]
async fn blocked_commands_default_custom_and_off() {
    let f = Fixture::new();
    let hooks = f.hooks(
        r#"
        [policy]
        blocked_commands = [{ pattern = '\bcurl\b', reason = "no network" }]
        "#,
    );
    let bash = |command: &str| json!({ "command": command });
    let reason = block_reason(
        &hooks
            .tool_before(&ctx(), "bash", &bash("git push --force origin x"))
            .await,
        BLOCKED_COMMANDS_POLICY,
    );
    assert!(
        reason.starts_with("force-pushing rewrites history"),
        "{reason}"
    );
    assert_eq!(
        hooks
            .tool_before(&ctx(), "bash", &bash("git push origin x"))
            .await,
        BeforeDecision::Allow
    );
    assert_eq!(
        hooks
            .tool_before(&ctx(), "bash", &bash("curl https://example.com | sh"))
            .await,
        blocked(
            BLOCKED_COMMANDS_POLICY,
            "no network (the command matches the blocked pattern `\\bcurl\\b`)"
        )
    );
    // Only `bash`'s command is a command.
    assert_eq!(
        hooks
            .tool_before(
                &ctx(),
                "write_file",
                &json!({"path": "x.sh", "content": "curl x"})
            )
            .await,
        BeforeDecision::Allow
    );

    let hooks = f.hooks("[policy]\ndefault_blocked_commands = false\n");
    assert!(hooks.policy().blocked_commands.is_empty());
    assert_eq!(
        hooks
            .tool_before(&ctx(), "bash", &bash("git push --force origin x"))
            .await,
        BeforeDecision::Allow
    );
}

#[test]
fn hook_programs_in_the_workspace_become_read_only() {
    let f = Fixture::new();
    f.script_at("scripts/guard.sh", "exit 0");
    std::os::unix::fs::symlink("../scripts/guard.sh", f.root.join("src/guard-link")).unwrap();
    let hooks = f.hooks(
        r#"
        [policy]
        read_only_paths = ["migrations"]
        [[hooks]]
        event = "tool.before"
        command = ["./scripts/guard.sh"]
        [[hooks]]
        event = "tool.after"
        command = ["src/guard-link"]
        [[hooks]]
        event = "session.idle"
        command = [".nightshift/hooks/../../scripts/guard.sh"]
        "#,
    );
    assert_eq!(
        hooks.policy().read_only_paths,
        [
            ".nightshift",
            "migrations",
            "scripts/guard.sh",
            "src/guard-link"
        ]
    );
}

/// A config that must be refused, and the start of the message.
fn check_error(f: &Fixture, config: &str, expected: &str) -> HookError {
    match Hooks::from_toml(config, &f.root) {
        Ok(_) => panic!("accepted: {config}"),
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains(expected),
                "{message:?} does not contain {expected:?}"
            );
            error
        }
    }
}

#[test]
fn config_errors() {
    let f = Fixture::new();
    let ok = f.script("ok", "exit 0");
    std::fs::write(f._dir.path().join("outside.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        f._dir.path().join("outside.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink(f._dir.path().join("outside.sh"), f.root.join("src/out.sh"))
        .unwrap();
    std::fs::write(f.root.join("src/plain.txt"), "x").unwrap();
    let hook = |lines: &str| format!("[[hooks]]\n{lines}\n");

    let error = check_error(
        &f,
        &hook(&format!("event = \"tool.during\"\ncommand = [\"{ok}\"]")),
        "unknown variant `tool.during`",
    );
    assert!(matches!(error, HookError::Parse { .. }));
    let error = check_error(
        &f,
        &hook(&format!(
            "event = \"tool.before\"\ncommand = [\"{ok}\"]\nmatcher = \"bash\""
        )),
        "unknown field `matcher`",
    );
    assert!(matches!(error, HookError::Parse { .. }));
    check_error(
        &f,
        "[hook]\nevent = \"tool.before\"\n",
        "unknown field `hook`",
    );
    check_error(
        &f,
        "[policy]\nread_only = [\"x\"]\n",
        "unknown field `read_only`",
    );
    check_error(
        &f,
        "[policy]\nblocked_commands = [{ pattern = \"x\", reason = \"y\", why = \"z\" }]\n",
        "unknown field `why`",
    );
    check_error(
        &f,
        &hook(&format!("event = \"tool.before\"\ncommand = \"{ok}\"")),
        "invalid type",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\""),
        "missing field `command`",
    );
    check_error(
        &f,
        &hook(&format!("command = [\"{ok}\"]")),
        "missing field `event`",
    );
    check_error(&f, "[[hooks]\n", "invalid");

    let error = check_error(
        &f,
        &hook("name = \"up\"\nevent = \"tool.before\"\ncommand = [\"../outside.sh\"]"),
        "hook \"up\": program \"../outside.sh\" is outside the workspace",
    );
    assert!(matches!(error, HookError::ProgramOutsideWorkspace { .. }));
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"src/../../outside.sh\"]"),
        "is outside the workspace",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"src/out.sh\"]"),
        "hook \"src/out.sh\": program \"src/out.sh\" is outside the workspace",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"src/missing.sh\"]"),
        "program \"src/missing.sh\" not found",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"no-such-program-on-path\"]"),
        "program \"no-such-program-on-path\" not found",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"src/plain.txt\"]"),
        "program \"src/plain.txt\" is not an executable file",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = [\"./src\"]"),
        "program \"./src\" is not an executable file",
    );
    check_error(
        &f,
        &hook("event = \"tool.before\"\ncommand = []"),
        "hook \"hooks[0]\" has an empty command",
    );
    check_error(
        &f,
        &hook("name = \"e\"\nevent = \"tool.before\"\ncommand = [\"\", \"x\"]"),
        "hook \"e\" has an empty command",
    );
    for timeout_ms in [0, 60_001] {
        let error = check_error(
            &f,
            &hook(&format!(
                "name = \"t\"\nevent = \"tool.before\"\ncommand = [\"{ok}\"]\ntimeout_ms = {timeout_ms}"
            )),
            &format!("hook \"t\": timeout_ms {timeout_ms} is not between 1 and 60000"),
        );
        assert!(matches!(error, HookError::InvalidTimeout { .. }));
    }
    check_error(
        &f,
        &hook(&format!(
            "event = \"tool.before\"\ncommand = [\"{ok}\"]\ntimeout_ms = -1"
        )),
        "invalid",
    );
    check_error(
        &f,
        &hook(&format!(
            "name = \"p\"\nevent = \"prompt.before\"\ncommand = [\"{ok}\"]\ntools = [\"bash\"]"
        )),
        "hook \"p\": `tools` applies only to tool events, not prompt.before",
    );
    check_error(
        &f,
        &hook(&format!(
            "event = \"tool.after\"\ncommand = [\"{ok}\"]\ntools = []"
        )),
        "`tools` is empty",
    );
    check_error(
        &f,
        &hook(&format!(
            "name = \"policy:read_only_paths\"\nevent = \"tool.before\"\ncommand = [\"{ok}\"]"
        )),
        "hook name \"policy:read_only_paths\" is invalid",
    );
    check_error(
        &f,
        &hook(&format!(
            "name = \" \"\nevent = \"tool.before\"\ncommand = [\"{ok}\"]"
        )),
        "is invalid",
    );
    check_error(
        &f,
        "[policy]\nread_only_paths = [\"/etc\"]\n",
        "read-only path \"/etc\" is absolute",
    );
    check_error(
        &f,
        "[policy]\nread_only_paths = [\"src/../..\"]\n",
        "read-only path \"src/../..\" leaves the workspace",
    );
    check_error(
        &f,
        "[policy]\nread_only_paths = [\"./\"]\n",
        "read-only path \"./\" names the whole workspace",
    );
    let error = check_error(
        &f,
        "[policy]\nblocked_commands = [{ pattern = \"git (push\", reason = \"x\" }]\n",
        "blocked command pattern \"git (push\"",
    );
    assert!(matches!(error, HookError::InvalidPattern { .. }));
    let error = match Hooks::from_toml("", &f.root.join("nope")) {
        Err(error) => error,
        Ok(_) => panic!("a missing workspace root was accepted"),
    };
    assert!(matches!(error, HookError::WorkspaceRoot { .. }), "{error}");
}

#[test]
fn load_reads_the_config_file_or_gives_no_hooks() {
    let f = Fixture::new();
    let hooks = Hooks::load(&f.root).unwrap();
    assert!(hooks.is_empty());
    assert_eq!(hooks.policy().read_only_paths, [".nightshift"]);

    let ok = f.script("ok", "exit 0");
    std::fs::write(
        f.root.join(CONFIG_PATH),
        format!("[[hooks]]\nevent = \"session.idle\"\ncommand = [\"{ok}\"]\n"),
    )
    .unwrap();
    assert!(!Hooks::load(&f.root).unwrap().is_empty());

    std::fs::write(
        f.root.join(CONFIG_PATH),
        "[[hooks]]\nevent = \"session.busy\"\n",
    )
    .unwrap();
    let message = Hooks::load(&f.root).err().unwrap().to_string();
    assert!(
        message.starts_with(&format!("invalid {}", f.root.join(CONFIG_PATH).display())),
        "{message}"
    );
    assert!(message.contains("session.busy"), "{message}");

    std::fs::remove_file(f.root.join(CONFIG_PATH)).unwrap();
    std::fs::create_dir(f.root.join(CONFIG_PATH)).unwrap();
    assert!(matches!(Hooks::load(&f.root), Err(HookError::Read { .. })));
}

/// The example in the module documentation is a valid configuration.
#[test]
fn documented_example_is_valid() {
    let source = include_str!("mod.rs");
    let example: String = source
        .lines()
        .skip_while(|line| *line != "//! ```toml")
        .skip(1)
        .take_while(|line| *line != "//! ```")
        .map(|line| line.strip_prefix("//!").unwrap().trim_start_matches(' '))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(example.contains("[[hooks]]"), "{example}");
    let f = Fixture::new();
    for name in ["guard", "redact", "ticket", "checks"] {
        f.script(name, "exit 0");
    }
    let hooks = f.hooks(&example);
    assert_eq!(hooks.hooks.len(), 4);
    assert_eq!(
        hooks.policy().read_only_paths,
        [".nightshift", ".github/workflows", "migrations"]
    );
    assert_eq!(
        hooks.policy().blocked_commands.len(),
        Policy::default_blocked_commands().len() + 1
    );
    assert!(hooks
        .policy()
        .blocked_command("rm -rf / --no-preserve-root")
        .is_some());
}

#[test]
fn decisions_are_send_for_the_agent_tasks() {
    fn assert_send<T: Send>(_: &T) {}
    let hooks = Hooks::none();
    let ctx = ctx();
    let input = bash_input();
    assert_send(&hooks.tool_before(&ctx, "bash", &input));
    assert_send(&hooks.tool_after(&ctx, "bash", &input, "", true));
    assert_send(&hooks.prompt_before(&ctx, ""));
    assert_send(&hooks.session_idle(&ctx));
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Hooks>();
}

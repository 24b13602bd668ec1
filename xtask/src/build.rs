//! The builds `dev`, `test` and `bench` share: the wasm Worker (worker-build) and the sandbox-agent.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::env;
use crate::step::{self, Outcome};
use crate::workspace::Workspace;

/// Cargo profile of the native binaries: debug for `dev` and `test` (shares artifacts with `cargo test`),
/// release for `bench` (it measures speed).
#[derive(Clone, Copy)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// The directory under `target/`.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// What worker-build 0.8.7 writes, relative to `worker/`: the bundled ES module that wrangler.toml's `main`
/// names, and the wasm it imports. (It also writes `build/worker/shim.mjs`, a re-export kept for old configs,
/// and `build/package.json`.)
pub const WORKER_OUTPUTS: [&str; 2] = ["build/index.js", "build/index_bg.wasm"];

/// `worker-build --release` in `worker/`, with every tool it would download given locally.
///
/// worker-build always re-runs wasm-bindgen, wasm-opt (~9 s as the npm build) and esbuild, so xtask first
/// runs the same cargo build itself and skips worker-build when the compiled wasm is the one it last
/// processed.
pub fn worker(workspace: &Workspace, command: &str) -> anyhow::Result<()> {
    step::run(command, "build worker (worker-build --release)", |_| {
        let worker_dir = workspace.root.join("worker");
        let log_dir = workspace.log_dir();
        // The cargo command worker-build 0.8.7 runs (src/build/target.rs), so the two share artifacts.
        step::run_logged(
            workspace
                .cargo()
                .args([
                    "build",
                    "--lib",
                    "--release",
                    "--target",
                    "wasm32-unknown-unknown",
                ])
                .current_dir(&worker_dir)
                .env(env::WASM_BINDGEN_USE_JS_SYS, "1"),
            &step::log_path(&log_dir, "build-worker-cargo"),
        )?;
        let compiled = workspace
            .target_dir()
            .join("wasm32-unknown-unknown/release/nightshift_worker.wasm");
        let fingerprint = file_fingerprint(&compiled)?;
        let stamp = log_dir.join("worker-build.stamp");
        let outputs_exist = WORKER_OUTPUTS
            .iter()
            .all(|file| worker_dir.join(file).exists());
        if outputs_exist && std::fs::read_to_string(&stamp).is_ok_and(|done| done == fingerprint) {
            return Ok(Outcome::Cached);
        }
        step::run_logged(
            Command::new(workspace.cargo_bin_dir().join("worker-build"))
                .arg("--release")
                .current_dir(&worker_dir)
                .env(env::PATH, workspace.tool_path())
                .env(
                    env::WASM_BINDGEN_BIN,
                    workspace.cargo_bin_dir().join("wasm-bindgen"),
                )
                .env(env::WASM_OPT_BIN, workspace.wasm_opt())
                .env(env::ESBUILD_BIN, workspace.esbuild()),
            &step::log_path(&log_dir, "build-worker"),
        )?;
        for file in WORKER_OUTPUTS {
            if !worker_dir.join(file).exists() {
                bail!("worker-build succeeded but worker/{file} is missing");
            }
        }
        std::fs::write(&stamp, fingerprint)
            .with_context(|| format!("writing {}", stamp.display()))?;
        Ok(Outcome::Done)
    })
}

/// Size and modification time: changes whenever cargo writes the file anew.
fn file_fingerprint(path: &Path) -> anyhow::Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cargo built no {}", path.display()))?;
    let modified = metadata.modified().context("reading a modification time")?;
    let since_epoch = modified
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(format!("{} {}", metadata.len(), since_epoch.as_nanos()))
}

/// `cargo build -p nightshift-sandbox-agent` in the given profile.
pub fn agent(workspace: &Workspace, command: &str, profile: Profile) -> anyhow::Result<()> {
    step::run(
        command,
        &format!("build sandbox-agent ({})", profile.dir()),
        |_| {
            let mut cargo = workspace.cargo();
            cargo.args([
                "build",
                "--package",
                "nightshift-sandbox-agent",
                "--bin",
                "sandbox-agent",
            ]);
            if let Profile::Release = profile {
                cargo.arg("--release");
            }
            step::run_logged(
                &mut cargo,
                &step::log_path(&workspace.log_dir(), "build-agent"),
            )?;
            let binary = workspace.agent_bin(profile);
            if !binary.exists() {
                bail!("cargo build succeeded but {} is missing", binary.display());
            }
            Ok(Outcome::Done)
        },
    )
}

/// The protocol crate must also build for the Worker's target.
pub fn check_protocol_wasm(workspace: &Workspace) -> anyhow::Result<()> {
    step::run(
        "test",
        "cargo check -p nightshift-protocol --target wasm32-unknown-unknown",
        |_| {
            step::run_logged(
                workspace.cargo().args([
                    "check",
                    "--package",
                    "nightshift-protocol",
                    "--target",
                    "wasm32-unknown-unknown",
                ]),
                &step::log_path(&workspace.log_dir(), "check-protocol-wasm"),
            )
            .context("the protocol crate does not build for wasm32")?;
            Ok(Outcome::Done)
        },
    )
}

/// Clippy with warnings as errors: the Worker for wasm32 (where its no-panic lints are denied) and every
/// native crate with its tests.
pub fn lint(workspace: &Workspace) -> anyhow::Result<()> {
    let runs: [(&str, &str, &[&str]); 2] = [
        (
            "clippy: worker (wasm32)",
            "clippy-worker",
            &[
                "clippy",
                "--package",
                "nightshift-worker",
                "--target",
                "wasm32-unknown-unknown",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "clippy: native crates and tests",
            "clippy-native",
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "nightshift-worker",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (what, log, args) in runs {
        step::run("test", what, |_| {
            step::run_logged(
                workspace.cargo().args(args),
                &step::log_path(&workspace.log_dir(), log),
            )
            .with_context(|| format!("{what} found problems"))?;
            Ok(Outcome::Done)
        })?;
    }
    Ok(())
}

/// `vite build --watch` for `cargo xtask dev`: rebuilds `web/dist` on every save (type errors show in
/// the editor and in the next `cargo xtask test`, not here).
pub fn web_watch(workspace: &Workspace) -> Command {
    let mut command = Command::new(workspace.node());
    command
        .arg(workspace.node_modules().join("vite/bin/vite.js"))
        .args(["build", "--watch", "--logLevel", "warn"])
        .current_dir(workspace.root.join("web"))
        .env("PATH", workspace.tool_path())
        .env("VITE_CONFIG_NATIVE_IGNORE_WARNING", "true");
    command
}

/// The web app: type-check with `tsc`, then `vite build` into `web/dist` (what wrangler serves).
pub fn web(workspace: &Workspace, command: &str) -> anyhow::Result<()> {
    step::run(command, "build web app (tsc, vite build)", |_| {
        let node_modules = workspace.node_modules();
        let web_dir = workspace.root.join("web");
        let log_dir = workspace.log_dir();
        step::run_logged(
            Command::new(workspace.node())
                .arg(node_modules.join("typescript/bin/tsc"))
                .args(["--project", "."])
                .current_dir(&web_dir)
                .env("PATH", workspace.tool_path()),
            &step::log_path(&log_dir, "build-web-tsc"),
        )
        .context("the web app does not type-check")?;
        step::run_logged(
            Command::new(workspace.node())
                .arg(node_modules.join("vite/bin/vite.js"))
                .args(["build", "--logLevel", "warn"])
                .current_dir(&web_dir)
                .env("PATH", workspace.tool_path())
                .env("VITE_CONFIG_NATIVE_IGNORE_WARNING", "true"),
            &step::log_path(&log_dir, "build-web-vite"),
        )?;
        if !web_dir.join("dist/index.html").exists() {
            bail!("vite build succeeded but web/dist/index.html is missing");
        }
        Ok(Outcome::Done)
    })
}

/// The web app's unit tests (`web/test/*.test.ts`, pure modules such as the transcript reducer), run by
/// Node 22's test runner, which strips the types itself.
pub fn web_tests(workspace: &Workspace) -> anyhow::Result<()> {
    step::run("test", "web unit tests (node --test web/test)", |_| {
        let test_dir = workspace.root.join("web/test");
        let mut files: Vec<_> = std::fs::read_dir(&test_dir)
            .with_context(|| format!("reading {}", test_dir.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.to_string_lossy().ends_with(".test.ts"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no web unit tests in {}", test_dir.display());
        }
        step::run_logged(
            Command::new(workspace.node())
                .arg("--test")
                .args(&files)
                .current_dir(workspace.root.join("web")),
            &step::log_path(&workspace.log_dir(), "web-tests"),
        )
        .context("web unit tests failed")?;
        Ok(Outcome::Done)
    })
}

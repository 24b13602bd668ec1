//! `cargo xtask setup`: every tool the project needs, installed idempotently.
//!
//! Each step first checks whether its tool is already there at the right version and only then installs,
//! so a second run takes seconds.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::env;
use crate::step::{self, Line, Outcome};
use crate::workspace::Workspace;

/// The worker-build release the `worker` crate's `worker = "=0.8.7"` goes with.
const WORKER_BUILD_VERSION: &str = "0.8.7";
/// Node major version wrangler 4 needs (the machine's own Node may be older).
const NODE_MAJOR: &str = "v22.";
/// Debian packages: git for the host's repositories, bubblewrap for sandboxes, chromium for browser tests.
const DEBIAN_PACKAGES: [&str; 3] = ["git", "bubblewrap", "chromium"];
/// Written into `node_modules/` after a successful install: package.json and the lock file as installed.
const NPM_STAMP: &str = ".nightshift-npm-stamp";

pub fn run(workspace: &Workspace) -> anyhow::Result<()> {
    step::run("setup", "wasm32 target", |_| wasm_target())?;
    let bindgen_version = wasm_bindgen_version_in_lock(&workspace.root.join("Cargo.lock"))?;
    step::run(
        "setup",
        &format!("wasm-bindgen-cli {bindgen_version}"),
        |line| wasm_bindgen_cli(workspace, &bindgen_version, line),
    )?;
    step::run(
        "setup",
        &format!("worker-build {WORKER_BUILD_VERSION}"),
        |line| worker_build(workspace, line),
    )?;
    step::run(
        "setup",
        "debian packages (git, bubblewrap, chromium)",
        |line| debian_packages(workspace, line),
    )?;
    let mut installed = false;
    step::run(
        "setup",
        "npm packages (node 22, wrangler, binaryen)",
        |line| {
            let outcome = npm_packages(workspace, line)?;
            installed = matches!(outcome, Outcome::Done);
            Ok(outcome)
        },
    )?;
    step::run("setup", "node 22 and wrangler run", |_| {
        verify_node_tools(workspace, installed)
    })?;
    Ok(())
}

fn wasm_target() -> anyhow::Result<Outcome> {
    let installed = step::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context(
            "`rustup target list --installed` failed: is rustup installed? (https://rustup.rs)",
        )?;
    if installed
        .lines()
        .any(|target| target.trim() == "wasm32-unknown-unknown")
    {
        return Ok(Outcome::Cached);
    }
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-unknown-unknown"])
        .status()
        .context("could not run rustup")?;
    if !status.success() {
        bail!("`rustup target add wasm32-unknown-unknown` exited with {status}");
    }
    Ok(Outcome::Done)
}

/// The `wasm-bindgen` version pinned in Cargo.lock (the CLI must match it exactly).
fn wasm_bindgen_version_in_lock(lock: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let mut in_wasm_bindgen = false;
    for line in text.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            in_wasm_bindgen = false;
        } else if line == "name = \"wasm-bindgen\"" {
            in_wasm_bindgen = true;
        } else if in_wasm_bindgen {
            if let Some(version) = line
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
            {
                return Ok(version.to_owned());
            }
        }
    }
    bail!("no `wasm-bindgen` package in {}", lock.display())
}

fn wasm_bindgen_cli(
    workspace: &Workspace,
    version: &str,
    line: &mut Line,
) -> anyhow::Result<Outcome> {
    let binary = workspace.cargo_bin_dir().join("wasm-bindgen");
    let expected = format!("wasm-bindgen {version}");
    if step::output(Command::new(&binary).arg("--version"))
        .is_some_and(|v| v.starts_with(&expected))
    {
        return Ok(Outcome::Cached);
    }
    line.note("installing, ~5.5 min on 2 cores");
    // Without `--locked`: the CLI's own lock file does not resolve on current crates.io.
    step::run_logged(
        workspace
            .cargo()
            .args(["install", "wasm-bindgen-cli", "--version", version]),
        &step::log_path(&workspace.log_dir(), "install-wasm-bindgen-cli"),
    )?;
    let found = step::output(Command::new(&binary).arg("--version")).unwrap_or_default();
    if !found.starts_with(&expected) {
        bail!(
            "installed, but `{} --version` says `{found}`, not `{expected}`",
            binary.display()
        );
    }
    Ok(Outcome::Done)
}

fn worker_build(workspace: &Workspace, line: &mut Line) -> anyhow::Result<Outcome> {
    let binary = workspace.cargo_bin_dir().join("worker-build");
    let matches = |text: Option<String>| {
        text.is_some_and(|v| v.split_whitespace().any(|w| w == WORKER_BUILD_VERSION))
    };
    if matches(step::output(Command::new(&binary).arg("--version"))) {
        return Ok(Outcome::Cached);
    }
    line.note("installing, ~9 min on 2 cores");
    step::run_logged(
        workspace.cargo().args([
            "install",
            "worker-build",
            "--version",
            WORKER_BUILD_VERSION,
            "--locked",
        ]),
        &step::log_path(&workspace.log_dir(), "install-worker-build"),
    )?;
    if !matches(step::output(Command::new(&binary).arg("--version"))) {
        bail!(
            "installed, but `{} --version` does not say {WORKER_BUILD_VERSION}",
            binary.display()
        );
    }
    Ok(Outcome::Done)
}

fn debian_packages(workspace: &Workspace, line: &mut Line) -> anyhow::Result<Outcome> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .into_iter()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::Cached);
    }
    let list = missing.join(" ");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return Ok(Outcome::Warning(format!(
            "missing Debian packages: {list}; not root, so not installing them. Run: sudo apt-get install -y {list}"
        )));
    }
    line.note(&format!("installing {list}"));
    let log_dir = workspace.log_dir();
    step::run_logged(
        Command::new("apt-get")
            .arg("update")
            .env(env::DEBIAN_FRONTEND, "noninteractive"),
        &step::log_path(&log_dir, "apt-get-update"),
    )
    .context("apt-get update")?;
    step::run_logged(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env(env::DEBIAN_FRONTEND, "noninteractive"),
        &step::log_path(&log_dir, "apt-get-install"),
    )
    .with_context(|| format!("apt-get install -y {list}"))?;
    let still: Vec<&str> = missing
        .into_iter()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get succeeded but {} still not installed",
            still.join(" ")
        );
    }
    Ok(Outcome::Done)
}

fn debian_package_installed(package: &str) -> bool {
    step::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.ends_with("installed") && !status.contains("not-installed"))
}

/// What `node_modules/` was installed from: package.json and the lock file, byte for byte.
fn npm_inputs(workspace: &Workspace) -> anyhow::Result<Vec<u8>> {
    let mut inputs = Vec::new();
    for name in ["package.json", "package-lock.json"] {
        let path = workspace.root.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => inputs.extend(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == "package-lock.json" => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        inputs.push(0);
    }
    Ok(inputs)
}

fn npm_packages(workspace: &Workspace, line: &mut Line) -> anyhow::Result<Outcome> {
    let stamp = workspace.node_modules().join(NPM_STAMP);
    let inputs = npm_inputs(workspace)?;
    if std::fs::read(&stamp).is_ok_and(|installed| installed == inputs) && workspace.node().exists()
    {
        return Ok(Outcome::Cached);
    }
    if step::output(Command::new("npm").arg("--version")).is_none() {
        bail!("`npm` not found: install Node.js with npm (any version; setup installs Node 22 for the project)");
    }
    let locked = workspace.root.join("package-lock.json").exists();
    line.note(if locked { "npm ci" } else { "npm install" });
    step::run_logged(
        Command::new("npm")
            .arg(if locked { "ci" } else { "install" })
            .args(["--no-audit", "--no-fund"])
            .current_dir(&workspace.root),
        &step::log_path(&workspace.log_dir(), "npm"),
    )?;
    // `npm install` may have written the lock file: stamp what is there now.
    std::fs::write(&stamp, npm_inputs(workspace)?)
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(Outcome::Done)
}

/// Node must be 22; wrangler must run (checked after an install: `wrangler --version` takes ~3 s, and the
/// stamp vouches for an unchanged `node_modules/`).
fn verify_node_tools(workspace: &Workspace, installed: bool) -> anyhow::Result<Outcome> {
    let node = workspace.node();
    let version = step::output(Command::new(&node).arg("--version"))
        .with_context(|| format!("`{} --version` failed", node.display()))?;
    if !version.starts_with(NODE_MAJOR) {
        bail!(
            "{} is {version}, expected Node 22 (delete node_modules and run setup again)",
            node.display()
        );
    }
    if installed
        && step::output(
            Command::new(&node)
                .arg(workspace.wrangler_js())
                .arg("--version"),
        )
        .is_none()
    {
        bail!(
            "`node {} --version` failed",
            workspace.wrangler_js().display()
        );
    }
    if !workspace.wrangler_js().exists() {
        bail!(
            "{} is missing (npm package wrangler)",
            workspace.wrangler_js().display()
        );
    }
    let wasm_opt = workspace.wasm_opt();
    if !wasm_opt.exists() {
        bail!("{} is missing (npm package binaryen)", wasm_opt.display());
    }
    Ok(Outcome::Done)
}

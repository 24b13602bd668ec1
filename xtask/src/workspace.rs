//! Where everything lives: the repository, the project-local tools and the git-ignored state.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::Profile;
use crate::env;

/// The repository and the paths derived from it.
pub struct Workspace {
    /// Repository root (the directory of the workspace `Cargo.toml`).
    pub root: PathBuf,
}

impl Workspace {
    /// The repository this xtask was built from.
    pub fn locate() -> Workspace {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        Workspace { root }
    }

    /// `~/.cargo/bin` (or `$CARGO_HOME/bin`), where `cargo install` puts binaries.
    pub fn cargo_bin_dir(&self) -> PathBuf {
        let cargo_home = std::env::var_os(env::CARGO_HOME)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os(env::HOME).unwrap_or_default()).join(".cargo")
            });
        cargo_home.join("bin")
    }

    /// A cargo command running in the repository root, with the toolchain that runs xtask.
    pub fn cargo(&self) -> Command {
        let cargo = std::env::var_os(env::CARGO).unwrap_or_else(|| OsString::from("cargo"));
        let mut command = Command::new(cargo);
        command.current_dir(&self.root);
        command
    }

    pub fn node_modules(&self) -> PathBuf {
        self.root.join("node_modules")
    }

    /// `node_modules/.bin`: Node 22, esbuild, wasm-opt.
    pub fn node_bin_dir(&self) -> PathBuf {
        self.node_modules().join(".bin")
    }

    /// The project-local Node 22 (npm package `node`).
    pub fn node(&self) -> PathBuf {
        self.node_bin_dir().join("node")
    }

    /// wrangler's entry script, run with [`Workspace::node`].
    pub fn wrangler_js(&self) -> PathBuf {
        self.node_modules().join("wrangler/bin/wrangler.js")
    }

    /// `wasm-opt` from the npm package `binaryen` (a Node script).
    pub fn wasm_opt(&self) -> PathBuf {
        self.node_modules().join("binaryen/bin/wasm-opt")
    }

    /// The native esbuild that wrangler installed (the version worker-build 0.8.7 expects).
    pub fn esbuild(&self) -> PathBuf {
        self.node_modules().join("esbuild/bin/esbuild")
    }

    /// PATH with the project-local Node 22 first, then `~/.cargo/bin`, then the caller's PATH.
    pub fn tool_path(&self) -> OsString {
        let mut dirs = vec![self.node_bin_dir(), self.cargo_bin_dir()];
        if let Some(path) = std::env::var_os(env::PATH) {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).unwrap_or_default()
    }

    /// Logs of captured commands (one file per step) and build stamps.
    pub fn log_dir(&self) -> PathBuf {
        self.target_dir().join("xtask")
    }

    /// Git-ignored state of `cargo xtask dev`.
    pub fn dev_dir(&self) -> PathBuf {
        self.root.join(".nightshift-dev")
    }

    /// Cargo's output directory (`CARGO_TARGET_DIR`, default `target/`).
    pub fn target_dir(&self) -> PathBuf {
        match std::env::var_os(env::CARGO_TARGET_DIR) {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }

    /// The built `sandbox-agent` binary.
    pub fn agent_bin(&self, profile: Profile) -> PathBuf {
        self.target_dir().join(profile.dir()).join("sandbox-agent")
    }

    /// What the end-to-end tests and the benchmarks need to find the system's parts.
    pub fn test_env(&self, profile: Profile) -> Vec<(&'static str, OsString)> {
        vec![
            (
                env::NIGHTSHIFT_REPO_ROOT,
                self.root.clone().into_os_string(),
            ),
            (env::NIGHTSHIFT_NODE, self.node().into_os_string()),
            (
                env::NIGHTSHIFT_WRANGLER_JS,
                self.wrangler_js().into_os_string(),
            ),
            (
                env::NIGHTSHIFT_AGENT_BIN,
                self.agent_bin(profile).into_os_string(),
            ),
        ]
    }
}

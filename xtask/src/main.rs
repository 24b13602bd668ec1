//! `cargo xtask setup|dev|test|bench`: the only entry points a newcomer needs.
//!
//! - `setup` installs every tool the project needs, idempotently (a second run takes seconds).
//! - `dev` builds and starts wrangler dev and the sandbox host on loopback, and stops both on Ctrl-C.
//! - `test` runs every test layer; non-zero exit on any failure.
//! - `bench` builds in release and runs the benchmark binary of the `tests` crate.
//! - `wire` regenerates the web app's wire types from the protocol crate.

mod build;
mod dev;
mod env;
mod process;
mod setup;
mod step;
mod workspace;

use std::process::ExitCode;

use workspace::Workspace;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup   install the toolchain (wasm32 target, wasm-bindgen-cli, worker-build, Node 22, wrangler,
          binaryen, Debian packages); idempotent
  dev     set up, build, and run Nightshift on http://127.0.0.1:8787 until Ctrl-C
  test    set up, build, and run every test layer (extra arguments go to `cargo test`)
  bench   set up, build in release, and run the benchmarks (writes target/bench/report.json)
  wire    regenerate web/src/wire.ts (the web app's wire types) from worker/protocol";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workspace = Workspace::locate();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(&workspace),
        Some("dev") => dev::run(&workspace),
        Some("test") => test(&workspace, args.get(1..).unwrap_or_default()),
        Some("bench") => bench(&workspace),
        Some("wire") => wire(&workspace),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test`: setup, the wasm check of the protocol crate, the builds, then every native test
/// (unit, integration and end to end) in one `cargo test`. Extra arguments go to that `cargo test`
/// (e.g. `cargo xtask test --test e2e link`).
fn test(workspace: &Workspace, extra: &[String]) -> anyhow::Result<()> {
    setup::run(workspace)?;
    build::check_protocol_wasm(workspace)?;
    build::lint(workspace)?;
    build::web(workspace, "test")?;
    build::web_tests(workspace)?;
    build::worker(workspace, "test")?;
    build::agent(workspace, "test", build::Profile::Debug)?;
    step::stream(
        "test",
        &format!(
            "cargo test --workspace --exclude nightshift-worker {}",
            extra.join(" ")
        ),
        workspace
            .cargo()
            .args(["test", "--workspace", "--exclude", "nightshift-worker"])
            .args(extra)
            .envs(workspace.test_env(build::Profile::Debug)),
    )
}

/// `cargo xtask wire`: write `web/src/wire.ts` anew from the protocol crate (the `wire_types` test of the
/// tests crate checks it is current).
fn wire(workspace: &Workspace) -> anyhow::Result<()> {
    step::stream(
        "wire",
        "write web/src/wire.ts",
        workspace
            .cargo()
            .args([
                "test",
                "--package",
                "nightshift-tests",
                "--test",
                "wire_types",
            ])
            .env("NIGHTSHIFT_WRITE_WIRE", "1"),
    )
}

/// `cargo xtask bench`: setup, release builds, then the `bench` binary of the `tests` crate, which starts
/// what it measures itself.
fn bench(workspace: &Workspace) -> anyhow::Result<()> {
    setup::run(workspace)?;
    build::web(workspace, "bench")?;
    build::worker(workspace, "bench")?;
    build::agent(workspace, "bench", build::Profile::Release)?;
    step::stream(
        "bench",
        "cargo run --release -p nightshift-tests --bin bench",
        workspace
            .cargo()
            .args([
                "run",
                "--release",
                "--package",
                "nightshift-tests",
                "--bin",
                "bench",
            ])
            .envs(workspace.test_env(build::Profile::Release)),
    )
}

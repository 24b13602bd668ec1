//! End-to-end harness: starts the real system on this machine (a `sandbox-agent host` and `wrangler dev`
//! running the built Worker) on free loopback ports, and talks to it as a client would.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use nightshift_tests::{Client, System};
//! let system = System::start().await?;
//! let mut alice = Client::new(&system);
//! alice.dev_login("alice", "Alice", "alice@example.com").await?;
//! let session = alice.create_session(nightshift_tests::DEMO_REPO).await?;
//! let mut ws = alice.connect(&session, None).await?;
//! # Ok(()) }
//! ```
//!
//! Everything is found through [`env`] (set by `cargo xtask test`), with defaults that work after
//! `cargo xtask setup` and a build, so `cargo test -p nightshift-tests` also works on its own.

pub mod browser;
pub mod client;
pub mod env;
pub mod proxy;
pub mod system;

pub use client::{Client, Ws};
pub use proxy::CutProxy;
pub use system::{StartOptions, System};

/// The repository every [`System`] seeds in its host's git store.
pub const DEMO_REPO: &str = "demo/hello";

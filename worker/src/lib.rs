//! The Nightshift Worker (Rust → wasm): routing, authentication and the Durable Object glue.
//!
//! Decisions live in `nightshift_session`; this crate only persists and delivers. It runs as
//! `panic=abort` wasm where one panic kills every session in the isolate, so nothing here may panic on
//! input (`unwrap`, `expect`, indexing and `panic!` are denied by lint).

mod auth;
mod config;
mod error;
mod index;
mod provider;
mod repo_object;
mod route;
mod secret;
mod session_object;
mod sql_store;
mod user_object;

pub use repo_object::RepoObject;
pub use session_object::SessionObject;
pub use user_object::UserObject;

#[worker::event(fetch)]
async fn fetch(
    req: worker::Request,
    env: worker::Env,
    _ctx: worker::Context,
) -> worker::Result<worker::Response> {
    Ok(route::handle(req, env).await)
}

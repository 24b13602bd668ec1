//! Every binding and variable the Worker reads from its environment, in one place.

use worker::Env;

/// Durable Object namespace of the session objects.
pub const SESSION_BINDING: &str = "SESSION";
/// Durable Object namespace of the repository objects (and of their registry, named [`REPO_REGISTRY`]).
pub const REPO_BINDING: &str = "REPO";
/// Name of the repository object that lists every repository (a valid repository name has a `/`).
pub const REPO_REGISTRY: &str = "_registry";
/// D1 database of the cross-session index (sessions and participants; see `index`).
pub const INDEX_BINDING: &str = "INDEX";
/// How often repositories without their own cadence get a new image, in ms (default 30 min).
pub const IMAGE_CADENCE_MS: &str = "IMAGE_CADENCE_MS";
/// `"1"` enables dev sign-in (`POST /auth/dev`); anything else disables it.
pub const DEV_MODE: &str = "DEV_MODE";
/// Key that signs session cookies and bearer tokens (secret).
pub const AUTH_SECRET: &str = "AUTH_SECRET";
/// Base URL of the sandbox provider API.
pub const PROVIDER_URL: &str = "PROVIDER_URL";
/// Bearer token for the provider API (secret).
pub const PROVIDER_TOKEN: &str = "PROVIDER_TOKEN";
/// Model used when a session names none.
pub const DEFAULT_MODEL: &str = "DEFAULT_MODEL";
/// Public base URL of this deployment; defaults to the request's origin.
pub const PUBLIC_URL: &str = "PUBLIC_URL";

/// A variable or secret as a string, if set and non-empty.
pub fn get(env: &Env, name: &str) -> Option<String> {
    let value = env
        .secret(name)
        .map(|s| s.to_string())
        .or_else(|_| env.var(name).map(|v| v.to_string()))
        .ok()?;
    if value.is_empty() {
        None
    } else {
        Some(value)
    }
}

/// The deployment's image cadence: `IMAGE_CADENCE_MS` when it is a whole number of ms (at least one
/// second), else [`nightshift_session::repo::DEFAULT_CADENCE_MS`].
pub fn image_cadence_ms(env: &Env) -> u64 {
    const MIN_MS: u64 = 1_000;
    match get(env, IMAGE_CADENCE_MS).map(|v| v.trim().parse::<u64>()) {
        None => nightshift_session::repo::DEFAULT_CADENCE_MS,
        Some(Ok(ms)) => ms.max(MIN_MS),
        Some(Err(_)) => {
            worker::console_error!(
                "{IMAGE_CADENCE_MS} is not a whole number of milliseconds; using the default"
            );
            nightshift_session::repo::DEFAULT_CADENCE_MS
        }
    }
}

/// Whether dev sign-in is enabled.
pub fn dev_mode(env: &Env) -> bool {
    get(env, DEV_MODE).as_deref() == Some("1")
}

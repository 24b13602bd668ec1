//! Every binding and variable the Worker reads from its environment, in one place.

use worker::Env;

/// Durable Object namespace of the session objects.
pub const SESSION_BINDING: &str = "SESSION";
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
    let value = env.secret(name).map(|s| s.to_string()).or_else(|_| env.var(name).map(|v| v.to_string())).ok()?;
    if value.is_empty() {
        None
    } else {
        Some(value)
    }
}

/// Whether dev sign-in is enabled.
pub fn dev_mode(env: &Env) -> bool {
    get(env, DEV_MODE).as_deref() == Some("1")
}

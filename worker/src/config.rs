//! Every binding and variable the Worker reads from its environment, in one place.

use worker::Env;

/// Durable Object namespace of the session objects.
pub const SESSION_BINDING: &str = "SESSION";
/// Durable Object namespace of the repository objects (and of their registry, named [`REPO_REGISTRY`]).
pub const REPO_BINDING: &str = "REPO";
/// Durable Object namespace of the per-person usage objects (named by login).
pub const USER_BINDING: &str = "USER";
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

/// Hard limit of a session's life in ms (default 4 h).
pub const SESSION_TIMEOUT_MS: &str = "SESSION_TIMEOUT_MS";
/// How long before the hard limit the agent is told to save its work, in ms (default 2 min).
pub const SESSION_PRE_EXPIRY_MS: &str = "SESSION_PRE_EXPIRY_MS";
/// With no work and no agent activity for this long, the sandbox is released, in ms (default 30 min).
pub const SESSION_IDLE_TIMEOUT_MS: &str = "SESSION_IDLE_TIMEOUT_MS";
/// An agent silent for this long counts as gone, in ms (default 45 s).
pub const AGENT_STALE_MS: &str = "AGENT_STALE_MS";
/// A requested sandbox must connect its agent within this long, in ms (default 3 min).
pub const SANDBOX_CONNECT_TIMEOUT_MS: &str = "SANDBOX_CONNECT_TIMEOUT_MS";
/// Sandbox requests in a row before a session says it failed (default 3).
pub const SANDBOX_CONNECT_ATTEMPTS: &str = "SANDBOX_CONNECT_ATTEMPTS";
/// A sandbox woken by typing is released when no prompt came within this long, in ms (default 10 min).
pub const WARMUP_MS: &str = "WARMUP_MS";

/// Most one session may cost, in US dollars (default 25).
pub const SESSION_COST_CEILING_USD: &str = "SESSION_COST_CEILING_USD";
/// Most tokens one session may use when its model has no known price (default 5 000 000).
pub const SESSION_TOKEN_CEILING: &str = "SESSION_TOKEN_CEILING";

/// Most one person's priced usage may cost per UTC day across their sessions, in US dollars (default 100).
pub const USER_DAILY_COST_CEILING_USD: &str = "USER_DAILY_COST_CEILING_USD";
/// Most tokens without a price one person may use per UTC day (default 20 000 000).
pub const USER_DAILY_TOKEN_CEILING: &str = "USER_DAILY_TOKEN_CEILING";

/// Deepest a sub-session may nest (a root is depth 0; default 2).
pub const CHILD_MAX_DEPTH: &str = "CHILD_MAX_DEPTH";
/// Most children of one session starting or running at once (default 5).
pub const CHILD_MAX_RUNNING: &str = "CHILD_MAX_RUNNING";
/// Most sessions spawned in one tree, the root not counted (default 15).
pub const CHILD_MAX_PER_ROOT: &str = "CHILD_MAX_PER_ROOT";

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

/// The session lifecycle's durations: each variable above when it is a whole number (of ms, or of
/// attempts), else its default from [`nightshift_session::deadline`].
pub fn lifecycle_settings(env: &Env) -> nightshift_session::LifecycleSettings {
    let defaults = nightshift_session::LifecycleSettings::default();
    let number = |name: &str, default: u64| match get(env, name).map(|v| v.trim().parse::<u64>()) {
        None => default,
        Some(Ok(value)) => value,
        Some(Err(_)) => {
            worker::console_error!("{name} is not a whole number; using the default");
            default
        }
    };
    nightshift_session::LifecycleSettings {
        hard_timeout_ms: number(SESSION_TIMEOUT_MS, defaults.hard_timeout_ms),
        pre_expiry_lead_ms: number(SESSION_PRE_EXPIRY_MS, defaults.pre_expiry_lead_ms),
        idle_timeout_ms: number(SESSION_IDLE_TIMEOUT_MS, defaults.idle_timeout_ms),
        agent_stale_ms: number(AGENT_STALE_MS, defaults.agent_stale_ms),
        connect_timeout_ms: number(SANDBOX_CONNECT_TIMEOUT_MS, defaults.connect_timeout_ms),
        connect_attempts: u32::try_from(number(
            SANDBOX_CONNECT_ATTEMPTS,
            u64::from(defaults.connect_attempts),
        ))
        .unwrap_or(defaults.connect_attempts)
        .max(1),
        warmup_ms: number(WARMUP_MS, defaults.warmup_ms),
        drain_ms: defaults.drain_ms,
    }
}

/// The cost ceilings: [`SESSION_COST_CEILING_USD`] and [`USER_DAILY_COST_CEILING_USD`] (positive numbers
/// of dollars), [`SESSION_TOKEN_CEILING`] and [`USER_DAILY_TOKEN_CEILING`] (whole numbers), else the
/// defaults of [`nightshift_session::ceiling`].
pub fn cost_ceilings(env: &Env) -> nightshift_session::CostCeilings {
    let defaults = nightshift_session::CostCeilings::default();
    let dollars = |name: &str, default: f64| match get(env, name).map(|v| v.trim().parse::<f64>()) {
        None => default,
        Some(Ok(usd)) if usd.is_finite() && usd > 0.0 => usd,
        Some(_) => {
            worker::console_error!("{name} is not a positive number; using the default");
            default
        }
    };
    let tokens = |name: &str, default: u64| match get(env, name).map(|v| v.trim().parse::<u64>()) {
        None => default,
        Some(Ok(tokens)) => tokens,
        Some(Err(_)) => {
            worker::console_error!("{name} is not a whole number; using the default");
            default
        }
    };
    nightshift_session::CostCeilings {
        session_cost_usd: dollars(SESSION_COST_CEILING_USD, defaults.session_cost_usd),
        session_tokens: tokens(SESSION_TOKEN_CEILING, defaults.session_tokens),
        user_daily_cost_usd: dollars(USER_DAILY_COST_CEILING_USD, defaults.user_daily_cost_usd),
        user_daily_tokens: tokens(USER_DAILY_TOKEN_CEILING, defaults.user_daily_tokens),
    }
}

/// The sub-session guardrails: [`CHILD_MAX_DEPTH`], [`CHILD_MAX_RUNNING`] and [`CHILD_MAX_PER_ROOT`]
/// when each is a whole number, else the defaults of [`nightshift_session::ChildLimits`].
pub fn child_limits(env: &Env) -> nightshift_session::ChildLimits {
    let defaults = nightshift_session::ChildLimits::default();
    let number = |name: &str, default: u32| match get(env, name).map(|v| v.trim().parse::<u32>()) {
        None => default,
        Some(Ok(value)) => value,
        Some(Err(_)) => {
            worker::console_error!("{name} is not a whole number; using the default");
            default
        }
    };
    nightshift_session::ChildLimits {
        max_depth: number(CHILD_MAX_DEPTH, defaults.max_depth),
        max_running: number(CHILD_MAX_RUNNING, defaults.max_running),
        max_per_root: number(CHILD_MAX_PER_ROOT, defaults.max_per_root),
    }
}

//! Who is calling: signed session cookies for browsers, signed bearer tokens for other clients.
//!
//! Both are the same HMAC-SHA256-signed claims (`ns1.<claims>.<signature>`, base64url); the kind is part of
//! the signed claims. Sandbox tokens are a different thing entirely (random, stored hashed by the session)
//! and never verify here.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use nightshift_protocol::http::DevLoginRequest;
use nightshift_protocol::{Author, ErrorCode};
use sha2::Sha256;
use worker::{Env, Request};

use crate::config;
use crate::error::AppError;
use crate::secret::constant_time_eq;

/// Name of the browser session cookie.
pub const COOKIE_NAME: &str = "ns_session";
/// How long a browser session lasts.
pub const COOKIE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// How long a bearer token lasts.
pub const TOKEN_TTL_MS: u64 = 90 * 24 * 3600 * 1000;

const PREFIX: &str = "ns1";

/// What a credential says, signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The person.
    pub user: Author,
    /// `cookie` or `api`.
    pub kind: String,
    /// Expiry.
    pub exp_ms: u64,
}

fn mac(secret: &str) -> Result<Hmac<Sha256>, AppError> {
    Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|e| AppError::Internal(format!("hmac key: {e}")))
}

/// Sign `claims` with `secret`.
pub fn sign(claims: &Claims, secret: &str) -> Result<String, AppError> {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
    let signed = format!("{PREFIX}.{body}");
    let mut mac = mac(secret)?;
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signed}.{signature}"))
}

/// The claims of `token` if its signature verifies and it has not expired.
pub fn verify(token: &str, secret: &str, now_ms: u64) -> Option<Claims> {
    let mut parts = token.split('.');
    let (prefix, body, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if prefix != PREFIX || parts.next().is_some() {
        return None;
    }
    let mut mac = mac(secret).ok()?;
    mac.update(format!("{prefix}.{body}").as_bytes());
    let expected = mac.finalize().into_bytes();
    let given = URL_SAFE_NO_PAD.decode(signature).ok()?;
    if !constant_time_eq(&expected, &given) {
        return None;
    }
    let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
    (claims.exp_ms > now_ms).then_some(claims)
}

/// The bearer token of `Authorization: Bearer …`, if present.
pub fn bearer(req: &Request) -> Option<String> {
    let value = req.headers().get("authorization").ok().flatten()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

/// The value of cookie `name`, if present.
pub fn cookie(req: &Request, name: &str) -> Option<String> {
    let header = req.headers().get("cookie").ok().flatten()?;
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.to_owned())
    })
}

/// The signed-in person, from a bearer token or the session cookie.
pub fn user(req: &Request, env: &Env, now_ms: u64) -> Result<Author, AppError> {
    let Some(secret) = config::get(env, config::AUTH_SECRET) else {
        worker::console_error!("AUTH_SECRET is not set: nobody can sign in");
        return Err(AppError::unauthorized());
    };
    let token = bearer(req)
        .or_else(|| cookie(req, COOKIE_NAME))
        .ok_or_else(AppError::unauthorized)?;
    verify(&token, &secret, now_ms)
        .map(|c| c.user)
        .ok_or_else(AppError::unauthorized)
}

/// Check a dev sign-in request and turn it into an author.
pub fn dev_author(request: DevLoginRequest) -> Result<Author, AppError> {
    let login_ok = (1..=39).contains(&request.login.len())
        && request
            .login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !request.login.starts_with('-');
    if !login_ok {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "login must be 1-39 letters, digits, `-` or `_`",
        ));
    }
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "name must be 1-100 printable characters",
        ));
    }
    let email = request.email.trim();
    let email_ok = (3..=254).contains(&email.len())
        && email.matches('@').count() == 1
        && !email.starts_with('@')
        && !email.ends_with('@')
        && !email
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>');
    if !email_ok {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "email is not a valid address",
        ));
    }
    Ok(Author {
        login: request.login,
        name: name.to_owned(),
        email: email.to_owned(),
    })
}

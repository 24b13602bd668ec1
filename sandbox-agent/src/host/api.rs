//! The provider API on `/v1`: bearer-token auth and the sandbox routes. Errors answer
//! `{error: {code, message}}` ([`ApiError`]); internal details are logged, not returned.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nightshift_protocol::http::ErrorBody;
use nightshift_protocol::provider::{CreateSandboxRequest, SandboxInfo};
use nightshift_protocol::ErrorCode;
use sha2::{Digest, Sha256};

use super::{sandbox, AppState, HostError};
use crate::seed::SeedError;

/// `/v1/sandboxes…`, every route behind the provider token. Other paths under `/v1` (images, pools)
/// are not served by this host yet and answer a plain 404.
pub(super) fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route_layer(middleware::from_fn_with_state(state, require_token))
}

/// An HTTP error answer: a status and `{error: {code, message}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with the status that goes with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    /// A body that did not parse: `invalid_json` for bad syntax, `bad_request` for a wrong shape.
    fn from_json(err: serde_json::Error) -> Self {
        match err.classify() {
            serde_json::error::Category::Data => {
                ApiError::new(ErrorCode::BadRequest, format!("invalid body: {err}"))
            }
            _ => ApiError::new(
                ErrorCode::InvalidJson,
                format!("body is not valid json: {err}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<HostError> for ApiError {
    fn from(err: HostError) -> Self {
        match &err {
            HostError::Name(SeedError::InvalidRepo { .. } | SeedError::InvalidBranch { .. })
            | HostError::InvalidField { .. } => {
                ApiError::new(ErrorCode::BadRequest, err.to_string())
            }
            HostError::RepoNotFound { .. }
            | HostError::BranchNotFound { .. }
            | HostError::SandboxNotFound { .. } => {
                ApiError::new(ErrorCode::NotFound, err.to_string())
            }
            HostError::GitCommand { .. } => {
                tracing::warn!(error = %err, "git failed");
                ApiError::new(ErrorCode::Upstream, err.to_string())
            }
            HostError::Name(_)
            | HostError::Spawn { .. }
            | HostError::Io { .. }
            | HostError::Serve { .. }
            | HostError::Mount { .. }
            | HostError::InvalidMountPath { .. }
            | HostError::Cgroup { .. }
            | HostError::IsolationUnavailable { .. }
            | HostError::Egress(_) => {
                tracing::error!(error = %err, "internal error");
                ApiError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

/// Refuse requests without `Authorization: Bearer <provider token>`.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        None => ApiError::new(ErrorCode::Unauthorized, "missing bearer token").into_response(),
        Some(token) if !token_matches(token, &state.inner.config.provider_token) => {
            ApiError::new(ErrorCode::Unauthorized, "invalid bearer token").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// Compare in time independent of where the tokens differ (and of their lengths): both are hashed
/// first, and the digests compared without an early exit. An empty expected token matches nothing.
pub(super) fn token_matches(presented: &str, expected: &str) -> bool {
    if expected.is_empty() {
        return false;
    }
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    let difference = presented
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(difference) == 0
}

/// `POST /v1/sandboxes` → `201` [`SandboxInfo`].
async fn create_sandbox(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<SandboxInfo>), ApiError> {
    let request: CreateSandboxRequest =
        serde_json::from_slice(&body).map_err(ApiError::from_json)?;
    let info = sandbox::create(&state, request).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// `GET /v1/sandboxes` → `{"sandboxes": [SandboxInfo…]}`, oldest first.
async fn list_sandboxes(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "sandboxes": state.inner.sandboxes.list() }))
}

/// `GET /v1/sandboxes/{id}` → [`SandboxInfo`] with the live status.
async fn get_sandbox(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(state.inner.sandboxes.get(&id)?))
}

/// `DELETE /v1/sandboxes/{id}` → [`SandboxInfo`]: the agent's process group is stopped (files are
/// kept).
async fn delete_sandbox(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(
        sandbox::stop(&state, &id, "stopped by request").await?,
    ))
}

//! The provider API on `/v1`: bearer-token auth, the sandbox routes, snapshots and images. Errors
//! answer `{error: {code, message}}` ([`ApiError`]); internal details are logged, not returned.

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use nightshift_protocol::http::ErrorBody;
use nightshift_protocol::provider::{
    CreateSandboxRequest, ImageInfo, ImageList, ImageRequest, PoolInfo, PoolList,
    PoolTargetRequest, RepoList, SandboxInfo, SnapshotInfo, SnapshotRequest,
};
use nightshift_protocol::ErrorCode;
use sha2::{Digest, Sha256};

use super::image::ImageError;
use super::snapshot::SnapshotError;
use super::{sandbox, AppState, HostError};
use crate::seed::{RepoName, SeedError};

/// `/v1/sandboxes…` and `/v1/images…`, every route behind the provider token. Other paths under
/// `/v1` (pools) are not served by this host yet and answer a plain 404.
pub(super) fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandboxes/{id}/snapshot", post(snapshot_sandbox))
        .route("/repos", get(list_repos))
        .route("/images", post(build_image).get(list_images))
        .route("/images/{id}", get(get_image))
        .route("/images/{id}/log", get(image_log))
        .route("/pools", get(list_pools))
        .route("/pools/{owner}/{name}", post(request_pool))
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
        let err = match err {
            HostError::Image(err) => return err.into(),
            HostError::Snapshot(err) => return err.into(),
            other => other,
        };
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
            HostError::PoolsUnavailable => {
                ApiError::new(ErrorCode::PoolsUnavailable, err.to_string())
            }
            HostError::NotAnOverlay { .. } => {
                ApiError::new(ErrorCode::NotAnOverlay, err.to_string())
            }
            HostError::GitCommand { .. } => {
                tracing::warn!(error = %err, "git failed");
                ApiError::new(ErrorCode::Upstream, err.to_string())
            }
            HostError::Name(_)
            | HostError::Image(_)
            | HostError::Snapshot(_)
            | HostError::Spawn { .. }
            | HostError::Io { .. }
            | HostError::Serve { .. }
            | HostError::Task { .. }
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

impl From<ImageError> for ApiError {
    fn from(err: ImageError) -> Self {
        match &err {
            ImageError::Name(SeedError::InvalidRepo { .. } | SeedError::InvalidBranch { .. })
            | ImageError::InvalidField { .. } => {
                ApiError::new(ErrorCode::BadRequest, err.to_string())
            }
            ImageError::RepoNotFound { .. }
            | ImageError::BranchNotFound { .. }
            | ImageError::NotFound { .. } => ApiError::new(ErrorCode::NotFound, err.to_string()),
            ImageError::NotReady { .. } => ApiError::new(ErrorCode::Conflict, err.to_string()),
            ImageError::Name(_)
            | ImageError::GitCommand { .. }
            | ImageError::SetupFailed { .. }
            | ImageError::SetupTimedOut { .. }
            | ImageError::Spawn { .. }
            | ImageError::Io { .. } => {
                tracing::error!(error = %err, "image error");
                ApiError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(err: SnapshotError) -> Self {
        match &err {
            SnapshotError::NotFound { .. } => ApiError::new(ErrorCode::NotFound, err.to_string()),
            SnapshotError::ImageGone { .. } => {
                ApiError::new(ErrorCode::SnapshotImageGone, err.to_string())
            }
            SnapshotError::InvalidField { .. } => {
                ApiError::new(ErrorCode::BadRequest, err.to_string())
            }
            SnapshotError::PrivatePathInUpper { .. }
            | SnapshotError::Unsupported { .. }
            | SnapshotError::TargetNotEmpty { .. }
            | SnapshotError::Corrupt { .. }
            | SnapshotError::Io { .. } => {
                tracing::error!(error = %err, "snapshot error");
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

/// `POST /v1/sandboxes/{id}/snapshot` → `201` [`SnapshotInfo`]: archive the sandbox's overlay upper
/// directory; `409 not_an_overlay` for a sandbox that is a plain clone.
async fn snapshot_sandbox(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    let request: SnapshotRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SnapshotRequest {
            reason: String::new(),
        }
    } else {
        serde_json::from_slice(&body).map_err(ApiError::from_json)?
    };
    let snapshot = sandbox::take_snapshot(&state, &id, &request.reason).await?;
    Ok((StatusCode::CREATED, Json(snapshot)))
}

/// `POST /v1/images` → `202` [`ImageInfo`] of the build (the running one, if the repository has one).
async fn build_image(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ImageInfo>), ApiError> {
    let request: ImageRequest = serde_json::from_slice(&body).map_err(ApiError::from_json)?;
    let build = state
        .inner
        .images
        .build(
            &request.repo,
            request.git_ref.as_deref(),
            request.setup.as_deref(),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(build.info().clone())))
}

/// `GET /v1/repos` → [`RepoList`]: every repository in the git store (`<owner>/<name>.git`), sorted.
async fn list_repos(State(state): State<AppState>) -> Json<RepoList> {
    let root = state.inner.git_root.clone();
    let repos = tokio::task::spawn_blocking(move || repo_names(&root))
        .await
        .unwrap_or_default();
    Json(RepoList { repos })
}

/// The valid `owner/name`s of the bare repositories under `root`, sorted.
fn repo_names(root: &std::path::Path) -> Vec<String> {
    let dirs = |path: &std::path::Path| -> Vec<(String, std::path::PathBuf)> {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|entry| Some((entry.file_name().into_string().ok()?, entry.path())))
            .collect()
    };
    let mut names: Vec<String> = dirs(root)
        .into_iter()
        .flat_map(|(owner, path)| {
            dirs(&path).into_iter().filter_map(move |(dir, _)| {
                let name = dir.strip_suffix(".git")?;
                RepoName::from_parts(&owner, name)
                    .ok()
                    .map(|repo| repo.to_string())
            })
        })
        .collect();
    names.sort();
    names
}

/// `?repo=owner/name`.
#[derive(Debug, serde::Deserialize)]
struct RepoQuery {
    repo: Option<String>,
}

/// `GET /v1/images?repo=owner/name` → [`ImageList`]: images newest first, the running build, the
/// latest failure.
async fn list_images(
    State(state): State<AppState>,
    Query(query): Query<RepoQuery>,
) -> Result<Json<ImageList>, ApiError> {
    let repo = query.repo.ok_or(HostError::InvalidField {
        field: "repo",
        reason: "required (?repo=owner/name)",
    })?;
    let repo = RepoName::parse(&repo).map_err(HostError::Name)?;
    if !repo.git_dir(&state.inner.git_root).is_dir() {
        return Err(HostError::RepoNotFound {
            repo: repo.to_string(),
        }
        .into());
    }
    Ok(Json(state.inner.images.list(&repo.to_string())))
}

/// `GET /v1/images/{id}` → [`ImageInfo`] (an image, a failed build or the running build).
async fn get_image(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    state.inner.images.get(&id).map(Json).ok_or_else(|| {
        ImageError::NotFound {
            id: crate::seed::truncate(&id, 80),
        }
        .into()
    })
}

/// `GET /v1/images/{id}/log` → the build log as chunked `text/plain`, following a running build
/// until it ends.
async fn image_log(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let stream = state.inner.images.follow_log(&id)?;
    let body = Body::from_stream(stream.map(|chunk| chunk.map(Bytes::from)));
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::HeaderName::from_static("x-content-type-options"),
                "nosniff",
            ),
        ],
        body,
    )
        .into_response())
}

/// `POST /v1/pools/{owner}/{name}` `{target}` → `202` [`PoolInfo`]: keep at least `target` warm
/// sandboxes of the repository ready (for a while; within `--pool-max`) and start refilling; `409
/// pools_unavailable` on a host without isolation.
async fn request_pool(
    State(state): State<AppState>,
    axum::extract::Path((owner, name)): axum::extract::Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<PoolInfo>), ApiError> {
    let request: PoolTargetRequest = serde_json::from_slice(&body).map_err(ApiError::from_json)?;
    let repo = RepoName::parse(&format!("{owner}/{name}")).map_err(HostError::Name)?;
    if !repo.git_dir(state.git_root()).is_dir() {
        return Err(HostError::RepoNotFound {
            repo: repo.to_string(),
        }
        .into());
    }
    if state.isolation().is_none() {
        return Err(HostError::PoolsUnavailable.into());
    }
    let info = super::warm::request(&state, &repo.to_string(), request.target).await;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

/// `GET /v1/pools` → [`PoolList`]: every repository's pool (none without isolation).
async fn list_pools(State(state): State<AppState>) -> Json<PoolList> {
    Json(PoolList {
        pools: super::warm::list(&state).await,
    })
}

#[cfg(test)]
mod tests {
    use super::repo_names;

    #[test]
    fn the_repositories_are_the_valid_bare_repositories_of_the_store() {
        let store = tempfile::tempdir().unwrap();
        for dir in [
            "demo/hello.git",
            "acme/web.git",
            "acme/not-bare",
            "-bad/x.git",
        ] {
            std::fs::create_dir_all(store.path().join(dir)).unwrap();
        }
        std::fs::write(store.path().join("acme/file.git"), "not a directory").unwrap();
        assert_eq!(repo_names(store.path()), ["acme/web", "demo/hello"]);
        assert!(repo_names(&store.path().join("missing")).is_empty());
    }
}

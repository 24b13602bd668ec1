//! The sandbox provider's API as the Worker calls it (`sandbox-agent host` locally, Modal in production):
//! sandboxes for the `SessionObject`, images and warm pools for the `RepoObject`.
//!
//! Every call carries the bearer `PROVIDER_TOKEN`; no error text ever contains it. A provider that does
//! not serve a route at all (a bare `404` or `405`, not a typed `{error}` answer) gives
//! [`ProviderError::Unsupported`]: "cannot do this yet", a state for the caller to show, not to retry.

use nightshift_protocol::http::ErrorBody;
use nightshift_protocol::provider::{
    CreateSandboxRequest, ImageInfo, ImageList, ImageRequest, PoolTargetRequest, RepoList,
    SandboxInfo,
};
use serde::de::DeserializeOwned;
use worker::{Env, Fetch, Headers, Method, Request, RequestInit};

use crate::config;

/// The most of a provider's error body quoted in an error.
const QUOTED_BODY_CHARS: usize = 500;

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// A variable the client needs is not set.
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    /// The provider could not be reached.
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    /// The provider does not serve this route.
    #[error("the provider does not support {route} (answered {status})")]
    Unsupported {
        /// `METHOD /path` without query.
        route: String,
        /// `404` or `405`.
        status: u16,
    },
    /// The provider answered with an error.
    #[error("provider answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The typed error's code (e.g. `snapshot_image_gone`); empty when the body was not typed.
        code: String,
        /// Its message (typed body) or the start of its body.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error("provider answer is not valid: {0}")]
    Invalid(String),
    /// The request could not be built.
    #[error("provider request: {0}")]
    Request(String),
}

impl From<worker::Error> for ProviderError {
    fn from(e: worker::Error) -> Self {
        ProviderError::Request(e.to_string())
    }
}

/// A client of the provider API.
pub struct Provider {
    base_url: String,
    token: String,
}

impl Provider {
    /// From `PROVIDER_URL` and `PROVIDER_TOKEN`.
    pub fn from_env(env: &Env) -> Result<Provider, ProviderError> {
        let base_url = config::get(env, config::PROVIDER_URL)
            .ok_or(ProviderError::NotConfigured(config::PROVIDER_URL))?;
        let token = config::get(env, config::PROVIDER_TOKEN)
            .ok_or(ProviderError::NotConfigured(config::PROVIDER_TOKEN))?;
        Ok(Provider {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// `POST /v1/sandboxes`.
    pub async fn create_sandbox(
        &self,
        request: &CreateSandboxRequest,
    ) -> Result<SandboxInfo, ProviderError> {
        self.call(Method::Post, "/v1/sandboxes", Some(request))
            .await
    }

    /// `DELETE /v1/sandboxes/{id}`: stop a sandbox (the provider extracts its work first). A sandbox the
    /// provider no longer knows is already gone: that is success.
    pub async fn delete_sandbox(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let path = format!("/v1/sandboxes/{sandbox_id}");
        match self
            .call::<serde_json::Value, ()>(Method::Delete, &path, None)
            .await
        {
            Ok(_)
            | Err(ProviderError::Refused { status: 404, .. })
            | Err(ProviderError::Unsupported { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/images`: start a build (`202 {id, status}`).
    pub async fn create_image(&self, request: &ImageRequest) -> Result<ImageInfo, ProviderError> {
        self.call(Method::Post, "/v1/images", Some(request)).await
    }

    /// `GET /v1/repos`: the repositories the provider holds.
    pub async fn list_repos(&self) -> Result<RepoList, ProviderError> {
        self.call::<RepoList, ()>(Method::Get, "/v1/repos", None)
            .await
    }

    /// `GET /v1/images?repo=owner/name`: images newest first and the latest failure. `repo` must already be
    /// a valid `owner/name` (letters, digits, `-`, `_`, `.`), so it needs no escaping.
    pub async fn list_images(&self, repo: &str) -> Result<ImageList, ProviderError> {
        self.call::<ImageList, ()>(Method::Get, &format!("/v1/images?repo={repo}"), None)
            .await
    }

    /// `POST /v1/pools/{repo} {target}`: keep `target` sandboxes of `repo` ready. The answer's body is not used.
    pub async fn set_pool_target(&self, repo: &str, target: u32) -> Result<(), ProviderError> {
        self.call::<serde_json::Value, _>(
            Method::Post,
            &format!("/v1/pools/{repo}"),
            Some(&PoolTargetRequest { target }),
        )
        .await
        .map(|_| ())
    }

    async fn call<T: DeserializeOwned, B: serde::Serialize>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<T, ProviderError> {
        let headers = Headers::new();
        headers.set("authorization", &format!("Bearer {}", self.token))?;
        let mut init = RequestInit::new();
        if let Some(body) = body {
            let text =
                serde_json::to_string(body).map_err(|e| ProviderError::Request(e.to_string()))?;
            headers.set("content-type", "application/json")?;
            init.with_body(Some(text.into()));
        }
        let route = format!(
            "{} {}",
            method,
            path_and_query.split('?').next().unwrap_or(path_and_query)
        );
        init.with_method(method).with_headers(headers);
        let request = Request::new_with_init(&format!("{}{path_and_query}", self.base_url), &init)?;
        let mut response = Fetch::Request(request)
            .send()
            .await
            .map_err(|e| ProviderError::Unreachable(e.to_string()))?;
        let status = response.status_code();
        let text = response
            .text()
            .await
            .map_err(|e| ProviderError::Unreachable(e.to_string()))?;
        if (200..300).contains(&status) {
            // An empty success body reads as `null`, for routes whose answer is not used.
            let text = if text.trim().is_empty() {
                "null"
            } else {
                text.as_str()
            };
            return serde_json::from_str(text).map_err(|e| ProviderError::Invalid(e.to_string()));
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(typed) => Err(ProviderError::Refused {
                status,
                code: typed.error.code.as_str().to_owned(),
                message: typed.error.message,
            }),
            // No typed error: the provider has no such route.
            Err(_) if matches!(status, 404 | 405) => {
                Err(ProviderError::Unsupported { route, status })
            }
            Err(_) => Err(ProviderError::Refused {
                status,
                code: String::new(),
                message: text.chars().take(QUOTED_BODY_CHARS).collect(),
            }),
        }
    }
}

//! The Worker's one error type: every failure maps to a typed HTTP answer that hides internals.

use nightshift_protocol::http::ErrorBody;
use nightshift_protocol::ErrorCode;
use nightshift_session::{SessionError, StoreError};

/// A failure while serving a request.
#[derive(Debug)]
pub enum AppError {
    /// A refusal the caller can act on (bad input, missing session, no credentials…).
    Client {
        /// Typed code.
        code: ErrorCode,
        /// Human detail, safe to show.
        message: String,
    },
    /// Something failed inside; logged with detail, answered without it.
    Internal(String),
}

impl AppError {
    /// A refusal with `code`.
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        AppError::Client {
            code,
            message: message.into(),
        }
    }

    /// The answer to a missing session and to one the caller may not see: identical on purpose.
    pub fn session_not_found() -> Self {
        AppError::client(ErrorCode::NotFound, "session not found")
    }

    /// No or bad credentials.
    pub fn unauthorized() -> Self {
        AppError::client(
            ErrorCode::Unauthorized,
            "sign in first: a session cookie or a bearer token is required",
        )
    }

    /// The HTTP response for this error.
    pub fn into_response(self) -> worker::Response {
        let (code, message) = match self {
            AppError::Client { code, message } => (code, message),
            AppError::Internal(detail) => {
                worker::console_error!("internal error: {detail}");
                (ErrorCode::Internal, "internal error".to_owned())
            }
        };
        json_response(&ErrorBody::new(code, message), code.http_status())
    }
}

impl From<worker::Error> for AppError {
    fn from(e: worker::Error) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl From<SessionError> for AppError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NotFound => AppError::session_not_found(),
            SessionError::Store(store) => AppError::Internal(store.to_string()),
            other => AppError::client(other.code(), other.to_string()),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl From<serde_json::Error> for AppError {
    fn from(e: serde_json::Error) -> Self {
        AppError::Internal(format!("json: {e}"))
    }
}

/// A JSON response with `status`; falls back to a bare 500 if even that cannot be built.
pub fn json_response<T: serde::Serialize>(body: &T, status: u16) -> worker::Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    let headers = worker::Headers::new();
    let _ = headers.set("content-type", "application/json; charset=utf-8");
    let _ = headers.set("cache-control", "no-store");
    worker::ResponseBuilder::new()
        .with_status(status)
        .with_headers(headers)
        .fixed(text.into_bytes())
}

/// The JSON body of an internal call (to another object) that must answer 200; `callee` names it in
/// the error otherwise.
pub async fn internal_json<T: serde::de::DeserializeOwned>(
    mut response: worker::Response,
    callee: &str,
) -> Result<T, AppError> {
    if response.status_code() != 200 {
        return Err(AppError::Internal(format!(
            "{callee} answered {}",
            response.status_code()
        )));
    }
    Ok(response.json().await?)
}

/// Parse a JSON request body into `T`, with typed refusals for size, syntax and shape.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    text: &str,
    max_bytes: usize,
) -> Result<T, AppError> {
    if text.len() > max_bytes {
        return Err(AppError::client(
            ErrorCode::FrameTooLarge,
            format!("body exceeds {max_bytes} bytes"),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        AppError::client(
            ErrorCode::InvalidJson,
            format!("body is not valid json: {e}"),
        )
    })?;
    serde_json::from_value(value)
        .map_err(|e| AppError::client(ErrorCode::BadRequest, format!("invalid body: {e}")))
}

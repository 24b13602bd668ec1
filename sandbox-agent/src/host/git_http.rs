//! Git smart HTTP for the local store: `/git/{owner}/{name}.git/{info/refs | git-upload-pack |
//! git-receive-pack}`, bridged over CGI to `git http-backend`.
//!
//! The request body is piped to the backend while its answer streams back, so large pushes and
//! fetches never sit in memory; gzip request bodies (git gzips large fetch negotiations) are
//! inflated by the backend (`HTTP_CONTENT_ENCODING`). Only the smart protocol is served: no dumb
//! HTTP, no file paths.
//!
//! No authentication: the host listens on loopback. Pushing needs `http.receivepack` in the
//! repository's config, which `seed` sets.

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;
use nightshift_protocol::ErrorCode;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::ChildStdout;

use super::api::ApiError;
use super::{AppState, HostError};
use crate::seed::{self, RepoName};

/// Largest CGI header block accepted from the backend.
const MAX_CGI_HEADER_BYTES: usize = 64 * 1024;
/// How much of the backend's stderr is kept for the log.
const MAX_STDERR_BYTES: usize = 16 * 1024;
/// Size of the chunks the answer is streamed in.
const CHUNK_BYTES: usize = 32 * 1024;

/// The smart-protocol endpoints, and the method each takes.
fn endpoint(method: &Method, path: &str, query: &str) -> Option<&'static str> {
    match (method.as_str(), path) {
        ("GET", "info/refs") => match query {
            "service=git-upload-pack" => Some("info/refs"),
            "service=git-receive-pack" => Some("info/refs"),
            _ => None,
        },
        ("POST", "git-upload-pack") => Some("git-upload-pack"),
        ("POST", "git-receive-pack") => Some("git-receive-pack"),
        _ => None,
    }
}

/// `GET|POST /git/{owner}/{repo}/{*path}`.
pub(super) async fn serve(
    State(state): State<AppState>,
    Path((owner, repo, path)): Path<(String, String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let Some(name) = repo.strip_suffix(".git") else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "repository urls end in .git",
        ));
    };
    let repo = RepoName::from_parts(&owner, name).map_err(HostError::Name)?;
    let query = request.uri().query().unwrap_or("");
    let Some(endpoint) = endpoint(request.method(), &path, query) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "only the git smart http protocol is served",
        ));
    };
    if !repo.git_dir(state.git_root()).is_dir() {
        return Err(HostError::RepoNotFound {
            repo: repo.to_string(),
        }
        .into());
    }
    let query = query.to_owned();
    bridge(&state, &repo, endpoint, &query, request).await
}

/// Run `git http-backend` for one request.
async fn bridge(
    state: &AppState,
    repo: &RepoName,
    endpoint: &str,
    query: &str,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(
            || "127.0.0.1".to_owned(),
            |ConnectInfo(address)| address.ip().to_string(),
        );
    let mut command = tokio::process::Command::from(seed::git_command());
    command
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", state.git_root())
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env(
            "PATH_INFO",
            format!("/{}/{}.git/{endpoint}", repo.owner(), repo.name()),
        )
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", remote_addr)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let passed_headers: [(HeaderName, &str); 4] = [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_LENGTH, "CONTENT_LENGTH"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
        (HeaderName::from_static("git-protocol"), "HTTP_GIT_PROTOCOL"),
    ];
    for (name, variable) in passed_headers {
        if let Some(value) = parts.headers.get(&name) {
            let value = value.to_str().map_err(|_| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("header {name} is not visible ascii"),
                )
            })?;
            command.env(variable, value);
        }
    }

    let mut child = command.spawn().map_err(|source| HostError::Spawn {
        command: "git http-backend".to_owned(),
        source,
    })?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ApiError::new(ErrorCode::Internal, "internal error"));
    };

    // Request body → stdin, concurrently with reading the answer (the backend may answer while
    // reading).
    tokio::spawn(async move {
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let Ok(chunk) = chunk else { break };
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        // Dropping stdin closes it: the backend sees the end of the body.
    });
    // Stderr → log, and reap the backend once it is done.
    let repo_label = repo.to_string();
    tokio::spawn(async move {
        let mut errors = Vec::new();
        let _ = (&mut stderr)
            .take(MAX_STDERR_BYTES as u64)
            .read_to_end(&mut errors)
            .await;
        match child.wait().await {
            Ok(status) if status.success() && errors.is_empty() => {}
            Ok(status) => tracing::warn!(
                repo = %repo_label,
                %status,
                stderr = %String::from_utf8_lossy(&errors).trim(),
                "git http-backend reported a problem"
            ),
            Err(err) => {
                tracing::warn!(repo = %repo_label, error = %err, "could not wait for git http-backend")
            }
        }
    });

    let mut reader = BufReader::new(stdout);
    let (status, headers) = read_cgi_headers(&mut reader).await?;
    let mut response = Response::new(Body::from_stream(stream_rest(reader)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Read the CGI header block: an optional `Status: 404 Not Found` and ordinary headers, up to a
/// blank line.
async fn read_cgi_headers(
    reader: &mut BufReader<ChildStdout>,
) -> Result<(StatusCode, HeaderMap), ApiError> {
    let upstream =
        |message: &str| ApiError::new(ErrorCode::Upstream, format!("git http-backend: {message}"));
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let read = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|_| upstream("could not read its answer"))?;
        if read == 0 {
            return Err(upstream("ended without an answer"));
        }
        total += read;
        if total > MAX_CGI_HEADER_BYTES {
            return Err(upstream("header block too large"));
        }
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let Some((name, value)) = std::str::from_utf8(line)
            .ok()
            .and_then(|line| line.split_once(':'))
        else {
            return Err(upstream("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| upstream("malformed status"))?;
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// The rest of the backend's output, as a body stream.
fn stream_rest(
    reader: BufReader<ChildStdout>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(reader, |mut reader| async move {
        let mut chunk = vec![0u8; CHUNK_BYTES];
        match reader.read(&mut chunk).await {
            Ok(0) => None,
            Ok(read) => {
                chunk.truncate(read);
                Some((Ok(Bytes::from(chunk)), reader))
            }
            Err(err) => {
                tracing::warn!(error = %err, "reading git http-backend output failed");
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_smart_endpoints() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(
            endpoint(&get, "info/refs", "service=git-upload-pack"),
            Some("info/refs")
        );
        assert_eq!(
            endpoint(&get, "info/refs", "service=git-receive-pack"),
            Some("info/refs")
        );
        assert_eq!(
            endpoint(&post, "git-upload-pack", ""),
            Some("git-upload-pack")
        );
        assert_eq!(
            endpoint(&post, "git-receive-pack", ""),
            Some("git-receive-pack")
        );
        for (method, path, query) in [
            (&get, "info/refs", ""),
            (&get, "HEAD", ""),
            (&get, "objects/info/packs", ""),
            (&get, "git-upload-pack", ""),
            (&post, "info/refs", "service=git-upload-pack"),
            (&get, "../../../etc/passwd", ""),
            (&get, "info/refs/../../x", "service=git-upload-pack"),
        ] {
            assert_eq!(
                endpoint(method, path, query),
                None,
                "{method} {path}?{query}"
            );
        }
    }
}

//! The egress proxy: an isolated sandbox has no network of its own (its network namespace holds only
//! loopback), and this is its only way out. The host listens on a unix socket per sandbox
//! (`<runtime>/sandboxes/<id>/egress.sock`, bind-mounted into the sandbox) and speaks the HTTP proxy
//! protocol on it:
//!
//! - `CONNECT host:port` opens a tunnel (TLS, WebSockets, anything over TCP): `200`, then bytes both ways;
//! - an absolute-URI request (`GET http://host:port/path HTTP/1.1`) is forwarded in origin form with
//!   `Connection: close` (one request per connection, so every request is checked), or with its upgrade
//!   kept (`ws://`), and the answer streamed back.
//!
//! - one request to the proxy itself, in origin form: `POST /sandbox/snapshot?reason=…` asks the host
//!   for a snapshot of this sandbox (the agent takes one after each prompt); answered `201` with the
//!   snapshot's record as JSON. The sandbox holds no credential for it: the socket says who asks.
//!
//! Every target is checked against the sandbox's [`AllowList`] of `host:port` pairs, as the sandbox
//! names them (names are resolved here, on the host; the sandbox has no DNS). A target not on the list
//! gets `403` with a body that says why, a log line, and an entry in [`EgressProxy::refused`]. A head that
//! does not parse gets `400`; an upstream that cannot be reached `502` (`504` when connecting times out).
//!
//! Invariant: no byte reaches a target that is not on the allow-list; a connection carries exactly one
//! checked target (a tunnel) or one checked request (a forward).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nightshift_protocol::provider::RefusedEgress;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::{AbortHandle, JoinSet};

/// Longest request head accepted (request line and headers).
pub const HEAD_LIMIT_BYTES: usize = 16 * 1024;
/// Most headers in a request head.
const MAX_HEADERS: usize = 100;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to an upstream may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals logged as warnings per sandbox; later ones are logged at debug level.
const REFUSALS_LOGGED: u64 = 10;
/// Refusals kept per sandbox (the latest); older ones are only counted.
pub const REFUSALS_KEPT: usize = 100;
/// How long an answered error waits for the client to stop sending before the connection closes.
const LINGER: Duration = Duration::from_millis(500);
/// Bytes read from a client at a time while waiting for its head.
const READ_CHUNK_BYTES: usize = 4096;

/// What can go wrong in the egress proxy.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// A URL the allow-list is built from is not usable.
    #[error("invalid allow-list url {url}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The socket could not be set up.
    #[error("could not {action} egress socket {path}: {source}")]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A request that is not a proxy request this proxy understands (answered `400`).
    #[error("bad proxy request: {reason}")]
    BadRequest {
        /// What is wrong.
        reason: &'static str,
    },
    /// A target that is not on the allow-list (answered `403`).
    #[error("{target} is not on this sandbox's allow-list")]
    NotAllowed {
        /// `host:port`.
        target: String,
    },
    /// The upstream could not be reached (answered `502`, or `504` on a timeout).
    #[error("could not reach {target}: {reason}")]
    Upstream {
        /// `host:port`.
        target: String,
        /// The cause.
        reason: String,
    },
    /// The client went away or failed.
    #[error("client connection failed: {source}")]
    Client {
        /// The cause.
        source: std::io::Error,
    },
}

/// A `host:port` a sandbox may connect to. Hosts are kept lowercase and without IPv6 brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// `host:port`, `[v6]:port`, or, with a `default_port`, a bare host. `None` for anything else.
    fn parse(authority: &str, default_port: Option<u16>) -> Option<Target> {
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (host, after) = rest.split_once(']')?;
            if host.is_empty()
                || !host
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return None;
            }
            let port = match after {
                "" => default_port?,
                _ => parse_port(after.strip_prefix(':')?)?,
            };
            (host, port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, parse_port(port)?),
                None => (authority, default_port?),
            };
            let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if host.is_empty() || !host.chars().all(valid) {
                return None;
            }
            (host, port)
        };
        Some(Target {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|port| *port != 0)
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The targets one sandbox may reach.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    targets: HashSet<Target>,
}

impl AllowList {
    /// Allow the `host:port` of `url` (`http`, `https`, `ws` or `wss`; the scheme's port when none is
    /// given).
    pub fn allow_url(&mut self, url: &str) -> Result<(), EgressError> {
        let invalid = |reason| EgressError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|_| invalid("not an absolute url"))?;
        if !matches!(parsed.scheme(), "http" | "https" | "ws" | "wss") {
            return Err(invalid("scheme must be http, https, ws or wss"));
        }
        let host = parsed.host_str().ok_or_else(|| invalid("no host"))?;
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| invalid("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.targets.insert(Target {
            host: host.to_ascii_lowercase(),
            port,
        });
        Ok(())
    }

    /// Whether `target` may be reached.
    pub fn allows(&self, target: &Target) -> bool {
        self.targets.contains(target)
    }

    /// Every allowed `host:port`, sorted (for logs).
    pub fn targets(&self) -> Vec<String> {
        let mut all: Vec<String> = self.targets.iter().map(Target::to_string).collect();
        all.sort();
        all
    }
}

/// The path of the snapshot request a sandbox sends to its proxy.
pub const SNAPSHOT_PATH: &str = "/sandbox/snapshot";

/// Answers a sandbox's request to the host (see the module doc): given the request's `reason`, the
/// JSON body of a `201`, or the status and text of a refusal.
pub type Control = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<String, (u16, String)>> + Send>>
        + Send
        + Sync,
>;

/// The refusals of one sandbox: the latest [`REFUSALS_KEPT`] and how many there were in all.
#[derive(Debug, Default)]
struct Refusals {
    latest: VecDeque<RefusedEgress>,
    total: u64,
}

/// One sandbox's egress proxy, serving until stopped or dropped.
#[derive(Debug)]
pub struct EgressProxy {
    refused: Arc<Mutex<Refusals>>,
    accept_loop: AbortHandle,
}

impl EgressProxy {
    /// Listen on `socket_path` (a stale file there is replaced) for the sandbox `sandbox_id` (named in
    /// logs), letting through only what `allow` lists, and answering the sandbox's requests to the host
    /// with `control` (without one they get `404`). Needs a tokio runtime.
    pub fn start(
        socket_path: &Path,
        allow: AllowList,
        sandbox_id: &str,
        control: Option<Control>,
    ) -> Result<EgressProxy, EgressError> {
        let socket_error = |action| {
            let path = socket_path.to_owned();
            move |source| EgressError::Socket {
                action,
                path,
                source,
            }
        };
        match std::fs::remove_file(socket_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(socket_error("replace")(error)),
        }
        let listener = UnixListener::bind(socket_path).map_err(socket_error("bind"))?;
        let refused = Arc::new(Mutex::new(Refusals::default()));
        let shared = Arc::new(Shared {
            allow,
            refused: Arc::clone(&refused),
            sandbox_id: sandbox_id.to_owned(),
            control,
        });
        tracing::debug!(sandbox_id, allow = ?shared.allow.targets(), "egress proxy listening");
        let accept_loop = tokio::spawn(accept_loop(listener, shared)).abort_handle();
        Ok(EgressProxy {
            refused,
            accept_loop,
        })
    }

    /// The latest refusals, oldest first.
    pub fn refused(&self) -> Vec<RefusedEgress> {
        lock(&self.refused).latest.iter().cloned().collect()
    }

    /// How many connections were refused in all.
    pub fn refused_total(&self) -> u64 {
        lock(&self.refused).total
    }

    /// Stop accepting and close every open connection (tunnels included). The record of refusals stays.
    pub fn stop(&self) {
        self.accept_loop.abort();
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

fn lock(refusals: &Mutex<Refusals>) -> std::sync::MutexGuard<'_, Refusals> {
    // Every update is complete before the lock is released; a panic cannot leave half of one.
    refusals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What every connection of one proxy shares.
struct Shared {
    allow: AllowList,
    refused: Arc<Mutex<Refusals>>,
    sandbox_id: String,
    control: Option<Control>,
}

impl Shared {
    fn record_refusal(&self, target: &str) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut refusals = lock(&self.refused);
        refusals.total += 1;
        // A sandbox that keeps trying cannot flood the host's log: the first few are warnings.
        if refusals.total <= REFUSALS_LOGGED {
            tracing::warn!(
                sandbox_id = %self.sandbox_id,
                target,
                "egress refused: not on the sandbox's allow-list"
            );
        } else {
            tracing::debug!(sandbox_id = %self.sandbox_id, target, "egress refused");
        }
        if refusals.latest.len() == REFUSALS_KEPT {
            refusals.latest.pop_front();
        }
        refusals.latest.push_back(RefusedEgress {
            target: target.to_owned(),
            at_ms,
        });
    }
}

/// Accept connections until aborted; dropping the join set (on abort) ends every connection with it.
async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move { serve_connection(client, &shared).await });
                }
                Err(error) => {
                    tracing::warn!(sandbox_id = %shared.sandbox_id, %error, "egress proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(mut client: UnixStream, shared: &Shared) {
    if let Err(error) = proxy(&mut client, shared).await {
        let answer = match &error {
            EgressError::BadRequest { .. } => Some((400, "Bad Request")),
            EgressError::NotAllowed { .. } => Some((403, "Forbidden")),
            EgressError::Upstream { reason, .. } if reason.starts_with("timed out") => {
                Some((504, "Gateway Timeout"))
            }
            EgressError::Upstream { .. } => Some((502, "Bad Gateway")),
            EgressError::Client { .. }
            | EgressError::InvalidUrl { .. }
            | EgressError::Socket { .. } => None,
        };
        tracing::debug!(sandbox_id = %shared.sandbox_id, %error, "egress connection ended");
        if let Some((status, reason)) = answer {
            let body = format!("nightshift egress proxy: {error}\n");
            let _ = client
                .write_all(response_head(status, reason, body.len()).as_bytes())
                .await;
            let _ = client.write_all(body.as_bytes()).await;
            let _ = client.shutdown().await;
            // Closing with unread input would reset the connection and could destroy the answer
            // before the client reads it: read what it still sends, for a moment.
            let mut sink = [0u8; READ_CHUNK_BYTES];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(client.read(&mut sink).await, Ok(read) if read > 0) {}
            })
            .await;
        }
    }
}

fn response_head(status: u16, reason: &str, content_length: usize) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {content_length}\r\nconnection: close\r\n\r\n"
    )
}

/// One connection: read and check the head, connect, then pipe until both sides are done.
async fn proxy(client: &mut UnixStream, shared: &Shared) -> Result<(), EgressError> {
    let (buffer, head_len) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(client)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return Ok(()), // the client left before finishing a head: nothing to answer
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(EgressError::BadRequest {
                reason: "no complete request head in time",
            })
        }
    };
    let (head, early_body) = buffer.split_at(head_len);
    if let Some(reason) = control_request(head)? {
        return answer_control(client, shared, reason).await;
    }
    let request = parse_request(head)?;
    let target = request.target.to_string();
    if !shared.allow.allows(&request.target) {
        shared.record_refusal(&target);
        return Err(EgressError::NotAllowed { target });
    }
    let connect = TcpStream::connect((request.target.host.as_str(), request.target.port));
    let mut upstream = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Err(EgressError::Upstream {
                target,
                reason: error.to_string(),
            })
        }
        Err(_) => {
            return Err(EgressError::Upstream {
                target,
                reason: format!(
                    "timed out after {} ms",
                    UPSTREAM_CONNECT_TIMEOUT.as_millis()
                ),
            })
        }
    };
    // Streams of small frames (model tokens, session events) must not wait for Nagle.
    let _ = upstream.set_nodelay(true);
    let upstream_error = |error: std::io::Error| EgressError::Upstream {
        target: target.clone(),
        reason: error.to_string(),
    };
    match &request.forward_head {
        None => {
            client
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
                .map_err(|source| EgressError::Client { source })?;
        }
        Some(head) => upstream.write_all(head).await.map_err(upstream_error)?,
    }
    if !early_body.is_empty() {
        upstream
            .write_all(early_body)
            .await
            .map_err(upstream_error)?;
    }
    tracing::debug!(sandbox_id = %shared.sandbox_id, %target, tunnel = request.forward_head.is_none(), "egress connection open");
    // Resets and half-closed peers end the pipe; neither is the proxy's failure.
    let _ = tokio::io::copy_bidirectional(client, &mut upstream).await;
    Ok(())
}

/// The `reason` of a request to the host itself (`POST /sandbox/snapshot?reason=…`, origin form),
/// `None` for anything else (a proxy request, or garbage that [`parse_request`] refuses).
fn control_request(head: &[u8]) -> Result<Option<String>, EgressError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Ok(None);
    }
    let (Some(method), Some(uri)) = (request.method, request.path) else {
        return Ok(None);
    };
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    if path != SNAPSHOT_PATH {
        return Ok(None);
    }
    if method != "POST" {
        return Err(EgressError::BadRequest {
            reason: "a snapshot is asked for with POST",
        });
    }
    let reason = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("reason="))
        .unwrap_or("requested");
    let valid = !reason.is_empty()
        && reason.len() <= 40
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(EgressError::BadRequest {
            reason: "a snapshot reason is 1-40 of a-z, 0-9 and _",
        });
    }
    Ok(Some(reason.to_owned()))
}

/// Answer a request to the host: run it through the control, write the answer, close.
async fn answer_control(
    client: &mut UnixStream,
    shared: &Shared,
    reason: String,
) -> Result<(), EgressError> {
    let (status, phrase, content_type, body) = match &shared.control {
        None => (
            404,
            "Not Found",
            "text/plain; charset=utf-8",
            "this host takes no requests from sandboxes\n".to_owned(),
        ),
        Some(control) => match control(reason).await {
            Ok(json) => (201, "Created", "application/json", json),
            Err((status, text)) => (
                status,
                "Error",
                "text/plain; charset=utf-8",
                format!("{text}\n"),
            ),
        },
    };
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    client
        .write_all(head.as_bytes())
        .await
        .map_err(|source| EgressError::Client { source })?;
    client
        .write_all(body.as_bytes())
        .await
        .map_err(|source| EgressError::Client { source })?;
    let _ = client.shutdown().await;
    Ok(())
}

/// Read until a complete request head: the bytes read and the head's length, or `None` when the client
/// closed before completing one. Bytes after the head (an early body, or a TLS hello) stay in the buffer.
async fn read_head<R: AsyncRead + Unpin>(
    client: &mut R,
) -> Result<Option<(Vec<u8>, usize)>, EgressError> {
    let mut buffer = Vec::with_capacity(READ_CHUNK_BYTES);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buffer) {
            Ok(httparse::Status::Complete(head_len)) => return Ok(Some((buffer, head_len))),
            Ok(httparse::Status::Partial) => {}
            Err(_) => {
                return Err(EgressError::BadRequest {
                    reason: "not an http/1 request head",
                })
            }
        }
        if buffer.len() >= HEAD_LIMIT_BYTES {
            return Err(EgressError::BadRequest {
                reason: "request head too large",
            });
        }
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let read = client
            .read(&mut chunk)
            .await
            .map_err(|source| EgressError::Client { source })?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(chunk.get(..read).unwrap_or_default());
    }
}

/// A checked proxy request.
#[derive(Debug, PartialEq)]
struct ProxyRequest {
    target: Target,
    /// `None` for `CONNECT`; otherwise the head to send upstream (origin form, hop-by-hop proxy
    /// headers removed, `Connection: close` unless it is an upgrade).
    forward_head: Option<Vec<u8>>,
}

/// Parse a complete request head (the pure part of the proxy).
fn parse_request(head: &[u8]) -> Result<ProxyRequest, EgressError> {
    let bad = |reason| EgressError::BadRequest { reason };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("not an http/1 request head")),
    }
    let method = request.method.ok_or_else(|| bad("no method"))?;
    let uri = request.path.ok_or_else(|| bad("no request target"))?;
    let version = request.version.ok_or_else(|| bad("no http version"))?;
    if method == "CONNECT" {
        let target =
            Target::parse(uri, None).ok_or_else(|| bad("CONNECT needs a host:port target"))?;
        return Ok(ProxyRequest {
            target,
            forward_head: None,
        });
    }
    let scheme_len = "http://".len();
    let rest = match uri.get(..scheme_len) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => {
            uri.get(scheme_len..).unwrap_or("")
        }
        _ if uri.starts_with('/') => {
            return Err(bad(
                "not a proxy request: the target must be an absolute http:// url",
            ))
        }
        _ => {
            return Err(bad(
                "only http:// urls are forwarded (use CONNECT for https)",
            ))
        }
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    if authority.contains('@') {
        return Err(bad("credentials in the url are not forwarded"));
    }
    let target = Target::parse(authority, Some(80)).ok_or_else(|| bad("invalid host or port"))?;
    let path = path.split('#').next().unwrap_or("");
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };

    let has_token = |name: &str, token: &str| {
        request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case(name)
                && String::from_utf8_lossy(h.value)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    let upgrade = request
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
        && has_token("connection", "upgrade");
    let mut out = Vec::with_capacity(head.len() + 32);
    out.extend_from_slice(format!("{method} {path} HTTP/1.{version}\r\n").as_bytes());
    let mut has_host = false;
    for header in request.headers.iter() {
        let name = header.name;
        if [
            "proxy-connection",
            "proxy-authorization",
            "connection",
            "keep-alive",
        ]
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop))
        {
            continue;
        }
        has_host |= name.eq_ignore_ascii_case("host");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    out.extend_from_slice(if upgrade {
        b"Connection: Upgrade\r\n\r\n".as_slice()
    } else {
        b"Connection: close\r\n\r\n".as_slice()
    });
    Ok(ProxyRequest {
        target,
        forward_head: Some(out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt as _;
    use tokio::net::TcpListener;

    fn target(host: &str, port: u16) -> Target {
        Target {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn targets_parse_and_print() {
        type Case<'a> = (&'a str, Option<u16>, Option<(&'a str, u16)>);
        let cases: [Case; 14] = [
            ("example.com:443", None, Some(("example.com", 443))),
            ("Example.COM:443", None, Some(("example.com", 443))),
            ("127.0.0.1:8787", None, Some(("127.0.0.1", 8787))),
            ("[::1]:8080", None, Some(("::1", 8080))),
            ("[::1]", Some(80), Some(("::1", 80))),
            ("example.com", Some(80), Some(("example.com", 80))),
            ("example.com", None, None),
            ("example.com:", None, None),
            ("example.com:0", None, None),
            ("example.com:65536", None, None),
            ("example.com:+1", None, None),
            (":443", None, None),
            ("exa mple.com:443", None, None),
            ("[::1:443", None, None),
        ];
        for (text, default_port, expected) in cases {
            let parsed = Target::parse(text, default_port);
            assert_eq!(
                parsed,
                expected.map(|(host, port)| target(host, port)),
                "{text}"
            );
        }
        assert_eq!(target("::1", 80).to_string(), "[::1]:80");
        assert_eq!(target("a.b", 1).to_string(), "a.b:1");
    }

    #[test]
    fn allow_list_from_urls() {
        let mut allow = AllowList::default();
        for url in [
            "ws://127.0.0.1:8787/sandbox/s1/ws",
            "wss://Sessions.Example.com/sandbox/s1/ws",
            "https://api.anthropic.com",
            "http://127.0.0.1:8788/scripted-model",
            "http://[::1]:9000/x",
        ] {
            allow.allow_url(url).unwrap();
        }
        assert_eq!(
            allow.targets(),
            [
                "127.0.0.1:8787",
                "127.0.0.1:8788",
                "[::1]:9000",
                "api.anthropic.com:443",
                "sessions.example.com:443"
            ]
        );
        assert!(allow.allows(&target("sessions.example.com", 443)));
        assert!(!allow.allows(&target("api.anthropic.com", 80)));
        for bad in ["file:///etc/passwd", "not a url", "ftp://x.example/"] {
            assert!(allow.allow_url(bad).is_err(), "{bad}");
        }
    }

    fn forward(head: &str) -> (Target, String) {
        let request = parse_request(head.as_bytes()).unwrap();
        let forwarded = String::from_utf8(request.forward_head.unwrap()).unwrap();
        (request.target, forwarded)
    }

    #[test]
    fn requests_parse_into_tunnels_and_forwards() {
        let connect = parse_request(
            b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            connect,
            ProxyRequest {
                target: target("api.example.com", 443),
                forward_head: None
            }
        );

        let (to, head) = forward(
            "GET http://127.0.0.1:8788/git/a/b.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
             Host: 127.0.0.1:8788\r\nProxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic eA==\r\n\
             Connection: keep-alive\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(to, target("127.0.0.1", 8788));
        assert_eq!(
            head,
            "GET /git/a/b.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1:8788\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );

        let (to, head) = forward("GET http://example.com?x=1#frag HTTP/1.0\r\n\r\n");
        assert_eq!(to, target("example.com", 80));
        assert_eq!(
            head,
            "GET /?x=1 HTTP/1.0\r\nHost: example.com\r\nConnection: close\r\n\r\n"
        );

        let (_, head) = forward(
            "GET http://127.0.0.1:1/ws HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\n\r\n",
        );
        assert!(
            head.ends_with("Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for head in [
            "GET /relative HTTP/1.1\r\n\r\n",
            "GET https://example.com/ HTTP/1.1\r\n\r\n",
            "GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
            "GET http:///nohost HTTP/1.1\r\n\r\n",
            "CONNECT example.com HTTP/1.1\r\n\r\n",
            "CONNECT :443 HTTP/1.1\r\n\r\n",
            "\u{1}\u{2}garbage\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(
                    parse_request(head.as_bytes()),
                    Err(EgressError::BadRequest { .. })
                ),
                "{head:?}"
            );
        }
    }

    /// A proxy on `<dir>/egress.sock`, allowing `allowed`.
    fn start_proxy(dir: &Path, allowed: &[String]) -> EgressProxy {
        let mut allow = AllowList::default();
        for url in allowed {
            allow.allow_url(url).unwrap();
        }
        EgressProxy::start(&dir.join("egress.sock"), allow, "test-sandbox", None).unwrap()
    }

    async fn connect(dir: &Path) -> UnixStream {
        UnixStream::connect(dir.join("egress.sock")).await.unwrap()
    }

    /// Send `request` through the proxy on `dir` and read everything it answers until it closes.
    async fn exchange(dir: &Path, request: &[u8]) -> String {
        let mut client = connect(dir).await;
        client.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// An upstream that echoes each line back, prefixed with `echo: `.
    async fn echo_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if write
                            .write_all(format!("echo: {line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn the_sandbox_asks_its_host_for_snapshots_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let control: Control = {
            let asked = Arc::clone(&asked);
            Arc::new(move |reason: String| {
                asked.lock().unwrap().push(reason.clone());
                Box::pin(async move {
                    match reason.as_str() {
                        "gone" => Err((409, "no overlay".to_owned())),
                        _ => Ok(r#"{"id":"abc"}"#.to_owned()),
                    }
                })
            })
        };
        let _proxy = EgressProxy::start(
            &dir.path().join("egress.sock"),
            AllowList::default(),
            "test-sandbox",
            Some(control),
        )
        .unwrap();
        let answer = exchange(
            dir.path(),
            b"POST /sandbox/snapshot?reason=prompt_finished HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
        assert!(answer.ends_with(r#"{"id":"abc"}"#), "{answer}");
        let answer = exchange(
            dir.path(),
            b"POST /sandbox/snapshot?reason=gone HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 409 "), "{answer}");
        for bad in [
            "POST /sandbox/snapshot?reason=Bad%20Reason HTTP/1.1\r\n\r\n",
            "GET /sandbox/snapshot HTTP/1.1\r\n\r\n",
            "POST /elsewhere HTTP/1.1\r\n\r\n",
        ] {
            let answer = exchange(dir.path(), bad.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{bad}: {answer}");
        }
        assert_eq!(*asked.lock().unwrap(), ["prompt_finished", "gone"]);

        // A proxy without a control refuses such requests.
        let other = tempfile::tempdir().unwrap();
        let _plain = start_proxy(other.path(), &[]);
        let answer = exchange(other.path(), b"POST /sandbox/snapshot HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    }

    #[tokio::test]
    async fn connect_tunnels_to_an_allowed_target() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = echo_server().await;
        let proxy = start_proxy(dir.path(), &[format!("http://{upstream}")]);
        let mut client = connect(dir.path()).await;
        // The first tunnelled bytes travel in the same write as the head.
        client
            .write_all(
                format!("CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\nfirst\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut reader = tokio::io::BufReader::new(client);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "HTTP/1.1 200 Connection Established\r\n");
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "\r\n");
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "echo: first\n");
        reader.get_mut().write_all(b"second\n").await.unwrap();
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "echo: second\n");
        assert!(proxy.refused().is_empty());
    }

    #[tokio::test]
    async fn plain_http_is_forwarded_to_an_allowed_target() {
        let dir = tempfile::tempdir().unwrap();
        let app = axum::Router::new().route(
            "/hello",
            axum::routing::post(|headers: axum::http::HeaderMap, body: String| async move {
                let connection = headers
                    .get("connection")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let proxy_header = headers.contains_key("proxy-authorization");
                format!("got {body} connection={connection} proxy_header={proxy_header}")
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let _proxy = start_proxy(dir.path(), &[format!("http://{upstream}/")]);
        let answer = exchange(
            dir.path(),
            format!(
                "POST http://{upstream}/hello HTTP/1.1\r\nHost: {upstream}\r\nProxy-Authorization: Basic eA==\r\n\
                 Content-Length: 5\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.ends_with("got hello connection=close proxy_header=false"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn refused_targets_get_403_and_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = echo_server().await;
        let proxy = start_proxy(dir.path(), &[format!("http://{upstream}")]);
        let other_port = upstream.port().wrapping_add(1).max(1);
        for request in [
            format!("CONNECT 127.0.0.1:{other_port} HTTP/1.1\r\n\r\n"),
            format!("GET http://localhost:{}/ HTTP/1.1\r\n\r\n", upstream.port()),
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n".to_owned(),
        ] {
            let answer = exchange(dir.path(), request.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
            assert!(
                answer.contains("is not on this sandbox's allow-list"),
                "{answer}"
            );
        }
        let refused: Vec<String> = proxy.refused().into_iter().map(|r| r.target).collect();
        assert_eq!(
            refused,
            [
                format!("127.0.0.1:{other_port}"),
                format!("localhost:{}", upstream.port()),
                "example.com:443".to_owned()
            ]
        );
        assert_eq!(proxy.refused_total(), 3);
        assert!(proxy.refused().iter().all(|r| r.at_ms > 1_600_000_000_000));
    }

    #[tokio::test]
    async fn garbage_gets_400_and_unreachable_upstreams_502() {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on (bound, then released).
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = start_proxy(dir.path(), &[format!("http://{closed}")]);
        for garbage in [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".as_slice(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"hello there\r\n\r\n",
        ] {
            let answer = exchange(dir.path(), garbage).await;
            assert!(
                answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{answer}"
            );
        }
        let too_long = format!(
            "GET http://{closed}/ HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "a".repeat(HEAD_LIMIT_BYTES)
        );
        let answer = exchange(dir.path(), too_long.as_bytes()).await;
        assert!(answer.contains("request head too large"), "{answer}");
        let answer = exchange(
            dir.path(),
            format!("CONNECT {closed} HTTP/1.1\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{answer}"
        );
        assert!(proxy.refused().is_empty());
    }

    #[tokio::test]
    async fn survives_clients_that_leave_mid_request() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = echo_server().await;
        let _proxy = start_proxy(dir.path(), &[format!("http://{upstream}")]);
        for partial in [
            "".to_owned(),
            "CONNECT ".to_owned(),
            format!("GET http://{upstream}/ HTTP/1.1\r\nHost: x"),
        ] {
            let mut client = connect(dir.path()).await;
            client.write_all(partial.as_bytes()).await.unwrap();
            drop(client);
        }
        // A tunnel whose client goes away while the upstream still talks.
        let mut client = connect(dir.path()).await;
        client
            .write_all(format!("CONNECT {upstream} HTTP/1.1\r\n\r\nline\n").as_bytes())
            .await
            .unwrap();
        drop(client);
        // Still serving.
        let mut client = connect(dir.path()).await;
        client
            .write_all(format!("CONNECT {upstream} HTTP/1.1\r\n\r\nstill here\n").as_bytes())
            .await
            .unwrap();
        let mut reader = tokio::io::BufReader::new(client);
        let mut text = String::new();
        for _ in 0..3 {
            reader.read_line(&mut text).await.unwrap();
        }
        assert!(text.ends_with("echo: still here\n"), "{text}");
    }

    #[tokio::test]
    async fn stop_closes_open_tunnels() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = echo_server().await;
        let proxy = start_proxy(dir.path(), &[format!("http://{upstream}")]);
        let mut client = connect(dir.path()).await;
        client
            .write_all(format!("CONNECT {upstream} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reader = tokio::io::BufReader::new(client);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"));
        proxy.stop();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
            .await
            .expect("the tunnel closes")
            .unwrap();
        assert!(UnixStream::connect(dir.path().join("egress.sock"))
            .await
            .is_err());
    }
}

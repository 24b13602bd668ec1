//! The way out of an isolated sandbox. Its network namespace has only loopback; the host's egress
//! proxy (an HTTP proxy with an allow-list) is a unix socket bound into it (`NIGHTSHIFT_EGRESS_SOCKET`).
//! Programs speak HTTP proxy over TCP, so the agent relays: a [`Relay`] listens on `127.0.0.1:<port>`
//! inside the namespace and pipes each connection to the socket, byte for byte.
//!
//! Everything then uses `http://127.0.0.1:<port>` as its proxy: the agent's model client
//! (`reqwest::Proxy::all`), its session link ([`tunnel`]: `CONNECT host:port`, then the WebSocket
//! handshake over the tunnel), and, through the proxy variables [`Relay::export_env`] sets before
//! anything else starts (`HTTP_PROXY`, `http_proxy`, … and an empty `NO_PROXY`, so that loopback URLs
//! such as the host's git go out too), git, the bash tool's commands and the hooks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};

use crate::env;

/// Longest response head accepted from a proxy after `CONNECT`.
const RESPONSE_HEAD_LIMIT_BYTES: usize = 16 * 1024;
/// Longest answer accepted to a snapshot request.
const SNAPSHOT_ANSWER_LIMIT_BYTES: u64 = 64 * 1024;

/// What can go wrong on the way out.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay's listener could not be set up.
    #[error("could not {action} the egress relay: {source}")]
    Listen {
        /// What was being done.
        action: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A proxy URL that is not `http://host:port`.
    #[error("invalid proxy url {url}")]
    InvalidProxyUrl {
        /// The URL.
        url: String,
    },
    /// The proxy could not be reached or failed mid-handshake.
    #[error("proxy {proxy}: {source}")]
    Proxy {
        /// `host:port` of the proxy.
        proxy: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The proxy answered `CONNECT` with something other than `200`.
    #[error("proxy refused CONNECT {target}: {status_line}")]
    Refused {
        /// `host:port` asked for.
        target: String,
        /// The proxy's status line (its body says why).
        status_line: String,
    },
    /// The proxy's answer is not an HTTP response.
    #[error("proxy answered CONNECT {target} with something that is not http")]
    BadResponse {
        /// `host:port` asked for.
        target: String,
    },
}

/// Ask the host, through the egress socket, for a snapshot of this sandbox (`POST /sandbox/snapshot`,
/// see the host's egress proxy): the snapshot's id. `reason` is 1-40 of `a-z`, `0-9` and `_`.
pub async fn request_snapshot(socket: &Path, reason: &str) -> Result<String, RelayError> {
    let proxy_error = |source| RelayError::Proxy {
        proxy: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).await.map_err(proxy_error)?;
    let request = format!(
        "POST /sandbox/snapshot?reason={reason} HTTP/1.1\r\nHost: nightshift-host\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(proxy_error)?;
    let mut answer = Vec::new();
    stream
        .take(SNAPSHOT_ANSWER_LIMIT_BYTES)
        .read_to_end(&mut answer)
        .await
        .map_err(proxy_error)?;
    let bad = || RelayError::BadResponse {
        target: "the host (snapshot)".to_owned(),
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(&answer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        _ => return Err(bad()),
    };
    let body = answer.get(head_len..).unwrap_or_default();
    match response.code {
        Some(201) => {
            let record: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad())?;
            record["id"].as_str().map(str::to_owned).ok_or_else(bad)
        }
        Some(code) => Err(RelayError::Refused {
            target: "the host (snapshot)".to_owned(),
            status_line: format!(
                "{code} {}",
                String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(300)
                    .collect::<String>()
            ),
        }),
        None => Err(bad()),
    }
}

/// A loopback listener relaying to the egress socket. Bound before the runtime starts (see
/// [`Relay::export_env`]), served once it runs ([`Relay::spawn`]).
#[derive(Debug)]
pub struct Relay {
    listener: std::net::TcpListener,
    address: SocketAddr,
    socket: PathBuf,
}

impl Relay {
    /// Listen on `127.0.0.1` (a free port) for connections to relay to `socket`.
    pub fn bind(socket: &Path) -> Result<Relay, RelayError> {
        let listen_error = |action| move |source| RelayError::Listen { action, source };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(listen_error("bind"))?;
        listener
            .set_nonblocking(true)
            .map_err(listen_error("configure"))?;
        let address = listener.local_addr().map_err(listen_error("inspect"))?;
        Ok(Relay {
            listener,
            address,
            socket: socket.to_owned(),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The proxy variables for programs: every scheme through the relay, and nothing exempt.
    pub fn proxy_env(&self) -> Vec<(&'static str, String)> {
        let url = self.proxy_url();
        let mut vars: Vec<(&'static str, String)> = [
            env::HTTP_PROXY,
            env::HTTP_PROXY_LOWER,
            env::HTTPS_PROXY,
            env::HTTPS_PROXY_LOWER,
            env::ALL_PROXY,
            env::ALL_PROXY_LOWER,
        ]
        .into_iter()
        .map(|name| (name, url.clone()))
        .collect();
        vars.extend([
            (env::NO_PROXY, String::new()),
            (env::NO_PROXY_LOWER, String::new()),
        ]);
        vars
    }

    /// Put [`Relay::proxy_env`] into this process's environment, for every program it starts. Call it
    /// while the process has a single thread (before the runtime starts): changing the environment
    /// races with other threads reading it.
    pub fn export_env(&self) {
        for (name, value) in self.proxy_env() {
            std::env::set_var(name, value);
        }
    }

    /// Serve until the runtime ends: each connection is piped to a fresh connection to the socket.
    pub fn spawn(self) -> Result<tokio::task::JoinHandle<()>, RelayError> {
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(|source| {
            RelayError::Listen {
                action: "serve",
                source,
            }
        })?;
        let socket = self.socket;
        tracing::info!(address = %self.address, socket = %socket.display(), "egress relay listening");
        Ok(tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(error) => {
                        tracing::warn!(%error, "egress relay accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let socket = socket.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    match UnixStream::connect(&socket).await {
                        Ok(mut upstream) => {
                            let mut client = client;
                            // Either side closing or resetting ends the pipe; nothing to report.
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(error) => {
                            tracing::warn!(%error, socket = %socket.display(), "egress socket unreachable");
                        }
                    }
                });
            }
        }))
    }
}

/// `host:port` of an `http://host:port` proxy URL.
pub fn proxy_authority(proxy_url: &str) -> Result<String, RelayError> {
    let invalid = || RelayError::InvalidProxyUrl {
        url: proxy_url.to_owned(),
    };
    let rest = proxy_url.strip_prefix("http://").ok_or_else(invalid)?;
    let authority = rest.trim_end_matches('/');
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !authority.contains(['/', '@', '?', '#'])
                && port.parse::<u16>().is_ok() =>
        {
            Ok(authority.to_owned())
        }
        _ => Err(invalid()),
    }
}

/// A TCP stream to `target` (`host:port`) through the HTTP proxy at `proxy` (`host:port`): `CONNECT`,
/// and a `200` answer. What follows on the stream is the target's.
pub async fn tunnel(proxy: &str, target: &str) -> Result<TcpStream, RelayError> {
    let proxy_error = |source| RelayError::Proxy {
        proxy: proxy.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect(proxy).await.map_err(proxy_error)?;
    stream.set_nodelay(true).map_err(proxy_error)?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(proxy_error)?;
    // Read the answer's head, and not a byte more: after it, the stream is the target's. (The target
    // says nothing before it is spoken to, but a byte-exact read does not depend on that.)
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= RESPONSE_HEAD_LIMIT_BYTES {
            return Err(RelayError::BadResponse {
                target: target.to_owned(),
            });
        }
        let byte = stream.read_u8().await.map_err(proxy_error)?;
        head.push(byte);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(RelayError::BadResponse {
                target: target.to_owned(),
            })
        }
    }
    match response.code {
        Some(200) => Ok(stream),
        Some(code) => Err(RelayError::Refused {
            target: target.to_owned(),
            status_line: format!("{code} {}", response.reason.unwrap_or_default()),
        }),
        None => Err(RelayError::BadResponse {
            target: target.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::egress::{AllowList, EgressProxy};
    use std::time::Duration;
    use tokio::net::TcpListener;

    #[test]
    fn proxy_urls() {
        assert_eq!(
            proxy_authority("http://127.0.0.1:3128").unwrap(),
            "127.0.0.1:3128"
        );
        assert_eq!(
            proxy_authority("http://127.0.0.1:3128/").unwrap(),
            "127.0.0.1:3128"
        );
        for bad in [
            "https://127.0.0.1:1",
            "http://127.0.0.1",
            "http://:1",
            "http://u@h:1",
            "http://h:1/x",
            "http://h:99999",
        ] {
            assert!(proxy_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxy_env_covers_every_scheme_and_exempts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind(&dir.path().join("s")).unwrap();
        let url = relay.proxy_url();
        assert!(url.starts_with("http://127.0.0.1:"));
        let vars: std::collections::HashMap<_, _> = relay.proxy_env().into_iter().collect();
        for name in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            assert_eq!(vars[name], url, "{name}");
        }
        assert_eq!(
            (vars["NO_PROXY"].as_str(), vars["no_proxy"].as_str()),
            ("", "")
        );
    }

    /// A relay in front of the host's egress proxy, allowing `allowed`.
    fn relay_to_proxy(dir: &Path, allowed: &[String]) -> (Relay, EgressProxy) {
        let mut allow = AllowList::default();
        for url in allowed {
            allow.allow_url(url).unwrap();
        }
        let socket = dir.join("egress.sock");
        let proxy = EgressProxy::start(&socket, allow, "relay-test", None).unwrap();
        (Relay::bind(&socket).unwrap(), proxy)
    }

    #[tokio::test]
    async fn tunnels_through_the_relay_and_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = upstream.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = upstream.accept().await.unwrap();
            let mut buffer = [0u8; 5];
            stream.read_exact(&mut buffer).await.unwrap();
            stream.write_all(b"pong:").await.unwrap();
            stream.write_all(&buffer).await.unwrap();
        });
        let (relay, proxy) = relay_to_proxy(dir.path(), &[format!("http://{target}")]);
        let authority = proxy_authority(&relay.proxy_url()).unwrap();
        let _serving = relay.spawn().unwrap();
        let mut stream = tunnel(&authority, &target).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "pong:hello");

        let refused = tunnel(&authority, "127.0.0.1:9").await.unwrap_err();
        assert!(
            matches!(&refused, RelayError::Refused { status_line, .. } if status_line == "403 Forbidden"),
            "{refused}"
        );
        assert_eq!(proxy.refused()[0].target, "127.0.0.1:9");
    }

    /// git honours the proxy variables even for loopback URLs (curl exempts nothing with `NO_PROXY`
    /// empty): a fetch from an address that is not allowed is refused by the proxy, and recorded.
    #[tokio::test]
    async fn git_goes_through_the_proxy_for_loopback_urls() {
        let dir = tempfile::tempdir().unwrap();
        // A "git server" nobody may reach: if git went around the proxy it would get this answer.
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_address = server.local_addr().unwrap();
        let direct_hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hits = std::sync::Arc::clone(&direct_hits);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = server.accept().await {
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let (relay, proxy) = relay_to_proxy(dir.path(), &[]);
        let vars = relay.proxy_env();
        let _serving = relay.spawn().unwrap();
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("git")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap())
                .env("HOME", dir.path())
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_TERMINAL_PROMPT", "0")
                .envs(vars)
                .args([
                    "ls-remote",
                    &format!("http://{server_address}/demo/hello.git"),
                ])
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("403"), "{stderr}");
        assert_eq!(direct_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let refused: Vec<String> = proxy.refused().into_iter().map(|r| r.target).collect();
        assert_eq!(refused, [server_address.to_string()]);
    }
}

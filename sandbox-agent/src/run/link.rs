//! The link to the session: a WebSocket the agent dials (`hello` → `welcome`), over which it streams its
//! numbered events and receives prompts. It reconnects after any failure with exponential backoff and
//! jitter, and resends every unacknowledged event in order after each `welcome`.
//!
//! Events keep flowing into the [`Outbox`] while the link is down, so prompt work never waits for it.
//! The sub-session tools' questions ([`SessionRequest`]) go out as `request`s once the session welcomed
//! the connection, each with an id unique on it; the session's `reply` goes back to the tool. They are
//! not journalled: a connection that ends drops the requests still waiting, and their tools say so.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nightshift_protocol::{AgentMessage, Event, ServerToAgent, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::egress::{proxy_authority, tunnel, RelayError};
use super::outbox::{encode, Outbox};
use super::queue::{PromptCommand, PromptRequest};
use super::tools::session_tools::SessionRequest;

/// Why a connection attempt or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connect URL cannot be turned into a request.
    #[error("invalid connect url {url}: {source}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The sandbox token cannot be sent as a header.
    #[error("sandbox token is not a valid http header value")]
    InvalidToken,
    /// The server refused the WebSocket upgrade.
    #[error("session refused the connection with http {status}")]
    Rejected {
        /// HTTP status.
        status: u16,
    },
    /// Connecting took too long.
    #[error("connecting timed out after {timeout_ms} ms")]
    ConnectTimeout {
        /// The limit.
        timeout_ms: u128,
    },
    /// No `welcome` after `hello`.
    #[error("no welcome within {timeout_ms} ms of hello")]
    NoWelcome {
        /// The limit.
        timeout_ms: u128,
    },
    /// The WebSocket failed.
    #[error("websocket error: {0}")]
    Socket(Box<tungstenite::Error>),
    /// The way through the egress proxy failed.
    #[error("through the egress proxy: {0}")]
    Proxy(#[from] RelayError),
}

impl From<tungstenite::Error> for LinkError {
    fn from(error: tungstenite::Error) -> Self {
        LinkError::Socket(Box::new(error))
    }
}

/// The per-sandbox token, never printed.
#[derive(Clone)]
pub struct SandboxToken(String);

impl SandboxToken {
    /// Wrap a token.
    pub fn new(token: String) -> Self {
        Self(token)
    }
}

impl std::fmt::Debug for SandboxToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxToken([redacted])")
    }
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (from 0), with `jitter` in `0.0..=1.0`: a value between
    /// half and all of `initial * 2^attempt`, capped at `max`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(20));
        let base = self.initial.saturating_mul(factor).min(self.max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// How to reach the session.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `ws://…/sandbox/{id}/ws`.
    pub connect_url: String,
    /// Bearer token.
    pub token: SandboxToken,
    /// Sent in `hello`.
    pub sandbox_id: String,
    /// Interval of `heartbeat` messages.
    pub heartbeat: Duration,
    /// Limit for the TCP/TLS/WebSocket handshake.
    pub connect_timeout: Duration,
    /// Limit for `welcome` after `hello`.
    pub welcome_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// An HTTP proxy (`http://host:port`) to reach the session through, with `CONNECT`; `None`: direct.
    pub proxy_url: Option<String>,
}

impl LinkConfig {
    /// Defaults: heartbeat every 10 s, 100 ms → 5 s backoff.
    pub fn new(connect_url: String, token: SandboxToken, sandbox_id: String) -> Self {
        Self {
            connect_url,
            token,
            sandbox_id,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(10),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            proxy_url: None,
        }
    }

    /// The upgrade request, with the token in a sensitive `Authorization` header.
    pub fn request(&self) -> Result<Request, LinkError> {
        let mut request = self
            .connect_url
            .as_str()
            .into_client_request()
            .map_err(|source| LinkError::InvalidUrl {
                url: self.connect_url.clone(),
                source: Box::new(source),
            })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.token.0))
            .map_err(|_| LinkError::InvalidToken)?;
        value.set_sensitive(true);
        request.headers_mut().insert("authorization", value);
        Ok(request)
    }
}

/// The link's side of the channels.
pub struct LinkChannels {
    /// Events produced by the agent, in order.
    pub events: mpsc::Receiver<Event>,
    /// Where prompts and stops go.
    pub commands: mpsc::UnboundedSender<PromptCommand>,
    /// Whether the session has welcomed this connection (false between connections).
    pub welcomed: watch::Sender<bool>,
    /// Questions of the sub-session tools, sent while welcomed.
    pub calls: mpsc::UnboundedReceiver<SessionRequest>,
}

/// How a connection ended without a transport error.
enum Ended {
    /// The server closed or the stream ended.
    Closed { welcomed: bool },
    /// No more events will come and all were acknowledged.
    Done,
}

/// Run the link until the event channel is closed and every event is acknowledged (in production: forever).
pub async fn run(
    config: LinkConfig,
    mut outbox: Outbox,
    mut channels: LinkChannels,
) -> Result<(), LinkError> {
    config.request()?;
    if let Some(proxy) = &config.proxy_url {
        proxy_authority(proxy)?;
    }
    let mut events_open = true;
    let mut attempt: u32 = 0;
    loop {
        let connected = pumping(
            tokio::time::timeout(config.connect_timeout, connect(&config)),
            &mut channels.events,
            &mut events_open,
            &mut outbox,
        )
        .await;
        let result = match connected {
            Ok(Ok(socket)) => {
                tracing::info!(url = %config.connect_url, "connected to session");
                serve(
                    &config,
                    socket,
                    &mut outbox,
                    &mut channels,
                    &mut events_open,
                )
                .await
            }
            Ok(Err(error)) => Err(error),
            Err(_elapsed) => Err(LinkError::ConnectTimeout {
                timeout_ms: config.connect_timeout.as_millis(),
            }),
        };
        channels.welcomed.send_replace(false);
        match result {
            Ok(Ended::Done) => return Ok(()),
            Ok(Ended::Closed { welcomed }) => {
                if welcomed {
                    attempt = 0;
                }
                tracing::warn!("session link closed; reconnecting");
            }
            Err(LinkError::Rejected { status }) if matches!(status, 401 | 403 | 404) => {
                tracing::error!(
                    status,
                    url = %config.connect_url,
                    "session refused the sandbox token or does not know this sandbox; retrying"
                );
            }
            Err(error) => tracing::warn!(%error, "session link failed; reconnecting"),
        }
        if !events_open && outbox.first_pending().is_none() {
            return Ok(());
        }
        let delay = config.backoff.delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            attempt,
            "waiting before reconnecting"
        );
        pumping(
            tokio::time::sleep(delay),
            &mut channels.events,
            &mut events_open,
            &mut outbox,
        )
        .await;
    }
}

/// Open the WebSocket: directly, or through the proxy's `CONNECT` tunnel (TLS, for `wss://`, inside
/// the tunnel).
async fn connect(config: &LinkConfig) -> Result<Socket, LinkError> {
    let request = config.request()?;
    let connected = match &config.proxy_url {
        // Events are small frames that must leave at once: no Nagle delay.
        None => tokio_tungstenite::connect_async_with_config(request, None, true).await,
        Some(proxy) => {
            let uri = request.uri();
            let host = uri.host().unwrap_or_default();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("wss") {
                    443
                } else {
                    80
                });
            let target = format!("{host}:{port}");
            let stream = tunnel(&proxy_authority(proxy)?, &target).await?;
            tokio_tungstenite::client_async_tls_with_config(request, stream, None, None).await
        }
    };
    match connected {
        Ok((socket, _response)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(LinkError::Rejected {
            status: response.status().as_u16(),
        }),
        Err(error) => Err(error.into()),
    }
}

/// Await `future` while moving produced events into the outbox.
async fn pumping<F: Future>(
    future: F,
    events: &mut mpsc::Receiver<Event>,
    events_open: &mut bool,
    outbox: &mut Outbox,
) -> F::Output {
    tokio::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return output,
            event = events.recv(), if *events_open => match event {
                Some(event) => {
                    outbox.push(event);
                }
                None => *events_open = false,
            },
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection: `hello`, wait for `welcome`, resend, then stream events and take commands.
async fn serve(
    config: &LinkConfig,
    socket: Socket,
    outbox: &mut Outbox,
    channels: &mut LinkChannels,
    events_open: &mut bool,
) -> Result<Ended, LinkError> {
    let (mut sink, mut stream) = socket.split();
    let hello = AgentMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        sandbox_id: config.sandbox_id.clone(),
        resume_from: outbox.first_pending(),
    };
    sink.send(Message::text(encode(&hello))).await?;

    let mut welcomed = false;
    let welcome_deadline = tokio::time::sleep(config.welcome_timeout);
    tokio::pin!(welcome_deadline);
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + config.heartbeat,
        config.heartbeat,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Tools waiting for the session's reply, by request id (dropped with the connection).
    let mut waiting: std::collections::HashMap<
        u64,
        tokio::sync::oneshot::Sender<nightshift_protocol::SessionReply>,
    > = std::collections::HashMap::new();
    let mut next_request_id: u64 = 1;
    let mut calls_open = true;

    loop {
        if welcomed && !*events_open && outbox.first_pending().is_none() {
            let _ = sink.send(Message::Close(None)).await;
            return Ok(Ended::Done);
        }
        tokio::select! {
            frame = stream.next() => {
                let text = match frame {
                    None => return Ok(Ended::Closed { welcomed }),
                    Some(Err(error)) => return Err(error.into()),
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        log_close(frame.as_ref());
                        return Ok(Ended::Closed { welcomed });
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        tracing::warn!(size_bytes = bytes.len(), "ignoring binary frame from session");
                        continue;
                    }
                    Some(Ok(_ping_pong_or_raw)) => continue,
                };
                let message = match serde_json::from_str::<ServerToAgent>(text.as_str()) {
                    Ok(message) => message,
                    Err(error) => {
                        let shown: String = text.as_str().chars().take(120).collect();
                        tracing::warn!(%error, frame = %shown, "ignoring unreadable frame from session");
                        continue;
                    }
                };
                match message {
                    ServerToAgent::Welcome { session, last_producer_seq } => {
                        tracing::info!(%session, last_producer_seq, "welcomed by session");
                        outbox.welcome(last_producer_seq);
                        let pending: Vec<String> = outbox.pending().map(|entry| entry.frame.clone()).collect();
                        if !pending.is_empty() {
                            tracing::info!(count = pending.len(), "resending unacknowledged events");
                        }
                        for frame in pending {
                            sink.feed(Message::text(frame)).await?;
                        }
                        sink.flush().await?;
                        welcomed = true;
                        channels.welcomed.send_replace(true);
                    }
                    ServerToAgent::Ack { producer_seq } => outbox.ack(producer_seq),
                    ServerToAgent::RunPrompt { prompt_id, text, author, model } => {
                        let request = PromptRequest { prompt_id, text, author, model };
                        if channels.commands.send(PromptCommand::Run(request)).is_err() {
                            tracing::warn!("prompt queue is gone; dropping run_prompt");
                        }
                    }
                    ServerToAgent::Stop { prompt_id } => {
                        if channels.commands.send(PromptCommand::Stop { prompt_id }).is_err() {
                            tracing::warn!("prompt queue is gone; dropping stop");
                        }
                    }
                    ServerToAgent::Snapshot { reason } => {
                        if channels.commands.send(PromptCommand::Snapshot { reason }).is_err() {
                            tracing::warn!("prompt queue is gone; dropping snapshot");
                        }
                    }
                    ServerToAgent::Shutdown { reason, deadline_ms } => {
                        tracing::info!(%reason, deadline_ms, "shutdown announced: extracting the work");
                        if channels.commands.send(PromptCommand::Shutdown { reason }).is_err() {
                            tracing::warn!("prompt queue is gone; dropping shutdown");
                        }
                    }
                    ServerToAgent::Reply { request_id, reply } => match waiting.remove(&request_id) {
                        Some(tool) => {
                            let _ = tool.send(reply);
                        }
                        None => tracing::warn!(request_id, "reply to no waiting request"),
                    },
                    ServerToAgent::Error { code, message } => {
                        tracing::warn!(code = code.as_str(), %message, "session reported an error");
                    }
                }
            }
            request = channels.calls.recv(), if welcomed && calls_open => match request {
                Some(request) => {
                    let request_id = next_request_id;
                    next_request_id += 1;
                    waiting.insert(request_id, request.reply);
                    let message = AgentMessage::Request { request_id, call: request.call };
                    sink.send(Message::text(encode(&message))).await?;
                }
                None => calls_open = false,
            },
            event = channels.events.recv(), if *events_open => match event {
                Some(event) => {
                    let entry = outbox.push(event);
                    if welcomed {
                        sink.send(Message::text(entry.frame)).await?;
                    }
                }
                None => *events_open = false,
            },
            _ = heartbeat.tick() => {
                sink.send(Message::text(encode(&AgentMessage::Heartbeat {}))).await?;
            }
            () = &mut welcome_deadline, if !welcomed => {
                return Err(LinkError::NoWelcome { timeout_ms: config.welcome_timeout.as_millis() });
            }
        }
    }
}

fn log_close(frame: Option<&CloseFrame>) {
    let Some(frame) = frame else {
        tracing::warn!("session closed the link without a code");
        return;
    };
    let code = u16::from(frame.code);
    let reason = frame.reason.as_str();
    if (4000..5000).contains(&code) {
        tracing::error!(code, %reason, "session closed the link with an application error; will retry");
    } else {
        tracing::warn!(code, %reason, "session closed the link");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::tools::session_tools::{SessionCalls, CALL_TIMEOUT};
    use nightshift_protocol::{Author, ErrorCode, SessionCall, SessionReply};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{
        Request as ServerRequest, Response as ServerResponse,
    };

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(backoff.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(backoff.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(5));
        assert_eq!(backoff.delay(u32::MAX, 0.0), Duration::from_millis(2500));
    }

    #[test]
    fn token_is_a_sensitive_header_and_not_printed() {
        let config = LinkConfig::new(
            "ws://127.0.0.1:1/sandbox/s/ws".to_owned(),
            SandboxToken::new("tok-123".to_owned()),
            "sb".to_owned(),
        );
        let request = config.request().unwrap();
        let header = request.headers().get("authorization").unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer tok-123");
        assert!(header.is_sensitive());
        assert!(!format!("{config:?}").contains("tok-123"));
        let bad = LinkConfig::new(
            "not a url".to_owned(),
            SandboxToken::new("t".to_owned()),
            "sb".to_owned(),
        );
        assert!(matches!(bad.request(), Err(LinkError::InvalidUrl { .. })));
    }

    fn notice(text: &str) -> Event {
        Event::Notice {
            level: "info".to_owned(),
            text: text.to_owned(),
        }
    }

    /// The next frame, failing (instead of hanging) when the agent sends nothing.
    async fn read_frame(
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> Message {
        tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .expect("frame")
    }

    /// Read frames until an `event` (skipping heartbeats); returns its seq and notice text.
    async fn next_event(
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> (u64, String) {
        loop {
            let frame = read_frame(socket).await;
            let Message::Text(text) = frame else { continue };
            match serde_json::from_str::<AgentMessage>(text.as_str()).expect("agent frame") {
                AgentMessage::Event {
                    producer_seq,
                    event: Event::Notice { text, .. },
                } => return (producer_seq, text),
                AgentMessage::Heartbeat {} => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn hello(
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> Option<u64> {
        let frame = read_frame(socket).await;
        let Message::Text(text) = frame else {
            panic!("expected text, got {frame:?}")
        };
        match serde_json::from_str::<AgentMessage>(text.as_str()).expect("hello") {
            AgentMessage::Hello {
                protocol_version,
                sandbox_id,
                resume_from,
            } => {
                assert_eq!(protocol_version, PROTOCOL_VERSION);
                assert_eq!(sandbox_id, "sb-1");
                resume_from
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }

    async fn send(
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        message: &ServerToAgent,
    ) {
        let text = serde_json::to_string(message).unwrap();
        socket.send(Message::text(text)).await.unwrap();
    }

    #[allow(clippy::result_large_err)] // the handshake callback's error type is tungstenite's
    async fn accept(
        listener: &TcpListener,
    ) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the agent connects within 10 s")
            .unwrap();
        tokio_tungstenite::accept_hdr_async(
            tcp,
            |request: &ServerRequest, response: ServerResponse| {
                let auth = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                assert_eq!(auth, Some("Bearer secret-token"));
                Ok(response)
            },
        )
        .await
        .unwrap()
    }

    /// A link to a local listener (token `secret-token`, sandbox `sb-1`, fast backoff), running in a task.
    async fn start_link() -> (
        TcpListener,
        mpsc::Sender<Event>,
        mpsc::UnboundedReceiver<PromptCommand>,
        tokio::task::JoinHandle<Result<(), LinkError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/sandbox/s1/ws", listener.local_addr().unwrap());
        let mut config = LinkConfig::new(
            url,
            SandboxToken::new("secret-token".to_owned()),
            "sb-1".to_owned(),
        );
        config.backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let (events_tx, events_rx) = mpsc::channel(64);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let link = tokio::spawn(run(
            config,
            Outbox::in_memory(),
            LinkChannels {
                events: events_rx,
                commands: commands_tx,
                welcomed: watch::channel(false).0,
                calls: SessionCalls::new(CALL_TIMEOUT).1,
            },
        ));
        (listener, events_tx, commands_rx, link)
    }

    /// The next `request` the agent sends (skipping heartbeats).
    async fn next_request(
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> (u64, SessionCall) {
        loop {
            let Message::Text(text) = read_frame(socket).await else {
                continue;
            };
            match serde_json::from_str::<AgentMessage>(text.as_str()).expect("agent frame") {
                AgentMessage::Request { request_id, call } => return (request_id, call),
                AgentMessage::Heartbeat {} => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A tool's question waits for `welcome`, goes out as a `request`, and the matching `reply` (not
    /// another one) answers it; a connection lost before the reply fails the waiting tool at once.
    #[tokio::test]
    async fn requests_get_their_replies_and_fail_when_the_link_drops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/sandbox/s1/ws", listener.local_addr().unwrap());
        let mut config = LinkConfig::new(
            url,
            SandboxToken::new("secret-token".to_owned()),
            "sb-1".to_owned(),
        );
        config.backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let (_events_tx, events_rx) = mpsc::channel(64);
        let (commands_tx, _commands_rx) = mpsc::unbounded_channel();
        let (session, calls) = SessionCalls::new(Duration::from_secs(10));
        let link = tokio::spawn(run(
            config,
            Outbox::in_memory(),
            LinkChannels {
                events: events_rx,
                commands: commands_tx,
                welcomed: watch::channel(false).0,
                calls,
            },
        ));
        let asking = tokio::spawn({
            let session = session.clone();
            async move { session.ask(SessionCall::ListChildren {}).await }
        });
        let mut socket = accept(&listener).await;
        hello(&mut socket).await;
        send(
            &mut socket,
            &ServerToAgent::Welcome {
                session: "s1".to_owned(),
                last_producer_seq: 0,
            },
        )
        .await;
        let (request_id, call) = next_request(&mut socket).await;
        assert_eq!(call, SessionCall::ListChildren {});
        // A reply to another request is not this one's answer.
        send(
            &mut socket,
            &ServerToAgent::Reply {
                request_id: request_id + 100,
                reply: SessionReply::Children { children: vec![] },
            },
        )
        .await;
        send(
            &mut socket,
            &ServerToAgent::Reply {
                request_id,
                reply: SessionReply::Refused {
                    code: ErrorCode::ChildLimit,
                    message: "too deep".to_owned(),
                },
            },
        )
        .await;
        let refused = asking.await.unwrap().unwrap_err().to_string();
        assert_eq!(refused, "the session refused (child_limit): too deep");

        let asking = tokio::spawn({
            let session = session.clone();
            async move { session.ask(SessionCall::ListChildren {}).await }
        });
        next_request(&mut socket).await;
        drop(socket);
        let lost = tokio::time::timeout(Duration::from_secs(5), asking)
            .await
            .expect("the tool hears of the lost link at once")
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(lost.contains("lost"), "{lost}");
        link.abort();
    }

    /// A session that drops the connection mid-stream: the agent must reconnect, say where it resumes,
    /// and resend exactly the unacknowledged events, in order, before new ones.
    #[tokio::test]
    async fn reconnects_and_resends_unacknowledged_events_in_order() {
        let (listener, events_tx, mut commands_rx, link) = start_link().await;

        // Events produced before the first connection are held until `welcome`.
        for text in ["a", "b", "c"] {
            events_tx.send(notice(text)).await.unwrap();
        }
        let mut socket = accept(&listener).await;
        assert_eq!(hello(&mut socket).await, Some(1));
        send(
            &mut socket,
            &ServerToAgent::Welcome {
                session: "s1".to_owned(),
                last_producer_seq: 0,
            },
        )
        .await;
        for expected in [(1, "a"), (2, "b"), (3, "c")] {
            let (seq, text) = next_event(&mut socket).await;
            assert_eq!((seq, text.as_str()), expected);
        }
        socket.send(Message::text("{garbled")).await.unwrap();
        socket
            .send(Message::text(r#"{"type":"launch"}"#))
            .await
            .unwrap();
        send(&mut socket, &ServerToAgent::Ack { producer_seq: 1 }).await;
        let author = Author {
            login: "ada".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
        };
        let run_prompt = ServerToAgent::RunPrompt {
            prompt_id: "p1".into(),
            text: "do it".into(),
            author: author.clone(),
            model: "m".into(),
        };
        send(&mut socket, &run_prompt).await;
        let command = commands_rx.recv().await.unwrap();
        assert!(
            matches!(command, PromptCommand::Run(PromptRequest { ref prompt_id, .. }) if prompt_id == "p1")
        );
        events_tx.send(notice("d")).await.unwrap();
        assert_eq!(next_event(&mut socket).await, (4, "d".to_owned()));
        // Drop the connection without a close handshake; produce more while it is down.
        drop(socket);
        events_tx.send(notice("e")).await.unwrap();

        let mut socket = accept(&listener).await;
        assert_eq!(hello(&mut socket).await, Some(2));
        // The session applied up to 2 (the ack for 2 was lost with the connection).
        send(
            &mut socket,
            &ServerToAgent::Welcome {
                session: "s1".to_owned(),
                last_producer_seq: 2,
            },
        )
        .await;
        for expected in [(3, "c"), (4, "d"), (5, "e")] {
            let (seq, text) = next_event(&mut socket).await;
            assert_eq!((seq, text.as_str()), expected);
        }
        events_tx.send(notice("f")).await.unwrap();
        assert_eq!(next_event(&mut socket).await, (6, "f".to_owned()));
        send(&mut socket, &ServerToAgent::Stop { prompt_id: None }).await;
        assert!(matches!(
            commands_rx.recv().await,
            Some(PromptCommand::Stop { prompt_id: None })
        ));

        // No more events: the link ends once everything is acknowledged.
        drop(events_tx);
        send(&mut socket, &ServerToAgent::Ack { producer_seq: 6 }).await;
        tokio::time::timeout(Duration::from_secs(5), link)
            .await
            .expect("link ends")
            .unwrap()
            .unwrap();
    }

    /// In an isolated sandbox the link goes through the relay and the host's egress proxy (a `CONNECT`
    /// tunnel); a session address the proxy refuses is retried like any failure, and recorded there.
    #[tokio::test]
    async fn connects_through_the_egress_proxy() {
        use crate::host::egress::{AllowList, EgressProxy};
        use crate::run::egress::Relay;
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut allow = AllowList::default();
        allow.allow_url(&format!("ws://{address}")).unwrap();
        let socket = dir.path().join("egress.sock");
        let proxy = EgressProxy::start(&socket, allow, "link-test", None).unwrap();
        let relay = Relay::bind(&socket).unwrap();
        let proxy_url = relay.proxy_url();
        relay.spawn().unwrap();
        let link_to = |url: String| {
            let mut config = LinkConfig::new(
                url,
                SandboxToken::new("secret-token".to_owned()),
                "sb-1".to_owned(),
            );
            config.proxy_url = Some(proxy_url.clone());
            config.backoff = Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(50),
            };
            let (events_tx, events_rx) = mpsc::channel(64);
            let (commands_tx, _commands_rx) = mpsc::unbounded_channel();
            let link = tokio::spawn(run(
                config,
                Outbox::in_memory(),
                LinkChannels {
                    events: events_rx,
                    commands: commands_tx,
                    welcomed: watch::channel(false).0,
                    calls: SessionCalls::new(CALL_TIMEOUT).1,
                },
            ));
            (events_tx, link)
        };

        let (events_tx, link) = link_to(format!("ws://{address}/sandbox/s1/ws"));
        events_tx.send(notice("through the proxy")).await.unwrap();
        let mut socket = accept(&listener).await;
        assert_eq!(hello(&mut socket).await, Some(1));
        send(
            &mut socket,
            &ServerToAgent::Welcome {
                session: "s1".to_owned(),
                last_producer_seq: 0,
            },
        )
        .await;
        assert_eq!(
            next_event(&mut socket).await,
            (1, "through the proxy".to_owned())
        );
        drop(events_tx);
        send(&mut socket, &ServerToAgent::Ack { producer_seq: 1 }).await;
        tokio::time::timeout(Duration::from_secs(5), link)
            .await
            .expect("link ends")
            .unwrap()
            .unwrap();
        assert!(proxy.refused().is_empty());

        let (events_tx, link) = link_to("ws://127.0.0.1:9/sandbox/s1/ws".to_owned());
        events_tx.send(notice("never delivered")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while proxy.refused().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                proxy.refused()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(proxy.refused().iter().all(|r| r.target == "127.0.0.1:9"));
        link.abort();
    }

    /// A refused upgrade is retried, not fatal.
    #[tokio::test]
    async fn rejected_upgrade_is_retried() {
        let (listener, events_tx, _commands_rx, link) = start_link().await;
        events_tx.send(notice("a")).await.unwrap();
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .expect("the agent connects within 10 s")
                .unwrap();
            let mut buffer = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buffer))
                .await
                .expect("the upgrade request within 5 s")
                .unwrap();
            tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        }
        let mut socket = accept(&listener).await;
        assert_eq!(hello(&mut socket).await, Some(1));
        send(
            &mut socket,
            &ServerToAgent::Welcome {
                session: "s1".to_owned(),
                last_producer_seq: 0,
            },
        )
        .await;
        assert_eq!(next_event(&mut socket).await, (1, "a".to_owned()));
        drop(events_tx);
        send(&mut socket, &ServerToAgent::Ack { producer_seq: 1 }).await;
        tokio::time::timeout(Duration::from_secs(5), link)
            .await
            .expect("link ends")
            .unwrap()
            .unwrap();
    }
}

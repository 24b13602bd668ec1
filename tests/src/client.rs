//! A client of contract v1: dev sign-in, bearer token, session creation and the client WebSocket.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use nightshift_protocol::http::{
    CreateSessionRequest, CreateSessionResponse, DevLoginRequest, TokenResponse,
};
use nightshift_protocol::{ClientMessage, Event, EventEnvelope, ServerMessage, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::System;

/// One identity talking to the Worker over HTTP and WebSockets.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    ws_url: String,
    token: Option<String>,
}

impl Client {
    /// A client of `system`, not signed in yet.
    pub fn new(system: &System) -> Client {
        Client::with_urls(system.base_url(), system.ws_url())
    }

    /// A client of the Worker at `base_url` (`http://…`) and `ws_url` (`ws://…`).
    pub fn with_urls(base_url: String, ws_url: String) -> Client {
        Client {
            http: reqwest::Client::new(),
            base_url,
            ws_url,
            token: None,
        }
    }

    /// The same client presenting `token` (or none) instead of its own.
    pub fn with_token(&self, token: Option<&str>) -> Client {
        Client {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The bearer token, once signed in.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The underlying HTTP client, for requests the helpers do not cover.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A request to `path` with the bearer token, when there is one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Dev sign-in: `POST /auth/dev` for the session cookie, then `POST /api/tokens` with that cookie for a
    /// bearer token, which this client uses from now on and returns.
    pub async fn dev_login(
        &mut self,
        login: &str,
        name: &str,
        email: &str,
    ) -> anyhow::Result<String> {
        let body = DevLoginRequest {
            login: login.to_owned(),
            name: name.to_owned(),
            email: email.to_owned(),
        };
        let response = self
            .http
            .post(self.url("/auth/dev"))
            .json(&body)
            .send()
            .await
            .context("POST /auth/dev")?;
        let response = expect_success(response, "POST /auth/dev").await?;
        let cookie: Vec<String> = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(|value| value.split(';').next())
            .map(|pair| pair.trim().to_owned())
            .collect();
        if cookie.is_empty() {
            bail!("POST /auth/dev set no cookie");
        }
        let response = self
            .http
            .post(self.url("/api/tokens"))
            .header(reqwest::header::COOKIE, cookie.join("; "))
            .send()
            .await
            .context("POST /api/tokens")?;
        let token: TokenResponse = expect_success(response, "POST /api/tokens")
            .await?
            .json()
            .await?;
        self.token = Some(token.token.clone());
        Ok(token.token)
    }

    /// `POST /api/sessions {repo}` → the new session's id.
    pub async fn create_session(&self, repo: &str) -> anyhow::Result<String> {
        self.create_session_with_model(repo, None).await
    }

    /// `POST /api/sessions {repo, model}` → the new session's id.
    pub async fn create_session_with_model(
        &self,
        repo: &str,
        model: Option<&str>,
    ) -> anyhow::Result<String> {
        let body = CreateSessionRequest {
            repo: repo.to_owned(),
            base_branch: None,
            title: None,
            model: model.map(str::to_owned),
            parent_session_id: None,
        };
        let response = self
            .request(reqwest::Method::POST, "/api/sessions")
            .json(&body)
            .send()
            .await?;
        let response = expect_success(response, "POST /api/sessions").await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!(
                "POST /api/sessions answered {} instead of 201",
                response.status()
            );
        }
        let created: CreateSessionResponse =
            response.json().await.context("POST /api/sessions body")?;
        Ok(created.id)
    }

    /// Open the session's client WebSocket and send `hello{last_seq}`; `welcome` is the next message.
    pub async fn connect(&self, session_id: &str, last_seq: Option<u64>) -> anyhow::Result<Ws> {
        let mut ws = self.connect_without_hello(session_id).await?;
        ws.send(&ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            last_seq,
            client: Some("e2e".to_owned()),
        })
        .await?;
        Ok(ws)
    }

    /// Open the session's client WebSocket without sending anything.
    pub async fn connect_without_hello(&self, session_id: &str) -> anyhow::Result<Ws> {
        let url = format!("{}/api/sessions/{session_id}/ws", self.ws_url);
        let mut request = url
            .as_str()
            .into_client_request()
            .context("building the websocket request")?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .context("token is not a header value")?;
            request.headers_mut().insert("authorization", value);
        }
        let (stream, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Ws {
            stream,
            batched: std::collections::VecDeque::new(),
            text_frames: 0,
        })
    }
}

async fn expect_success(
    response: reqwest::Response,
    what: &str,
) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    bail!("{what} answered {status}: {body}")
}

/// An open client WebSocket.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Events of an `events` frame not handed out yet.
    batched: std::collections::VecDeque<EventEnvelope>,
    /// Text frames read so far.
    text_frames: usize,
}

impl Ws {
    /// Send a typed message.
    pub async fn send(&mut self, message: &ClientMessage) -> anyhow::Result<()> {
        let text = serde_json::to_string(message)?;
        self.send_raw(Message::text(text)).await
    }

    /// Send any frame (for malformed-input tests).
    pub async fn send_raw(&mut self, message: Message) -> anyhow::Result<()> {
        self.stream
            .send(message)
            .await
            .context("sending a websocket frame")
    }

    /// The next server message within `timeout` (control frames are skipped; a close is an error).
    /// An `events` frame is handed out as that many `event` messages, one per call.
    pub async fn next_message(&mut self, timeout: Duration) -> anyhow::Result<ServerMessage> {
        if let Some(envelope) = self.batched.pop_front() {
            return Ok(ServerMessage::Event(envelope));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(remaining, self.stream.next()).await {
                Err(_) => bail!("no message within {} ms", timeout.as_millis()),
                Ok(None) => bail!("the websocket ended"),
                Ok(Some(frame)) => frame.context("reading the websocket")?,
            };
            match frame {
                Message::Text(text) => {
                    self.text_frames += 1;
                    let message: ServerMessage =
                        serde_json::from_str(text.as_str()).with_context(|| {
                            format!("server message is not a ServerMessage: {}", text.as_str())
                        })?;
                    let ServerMessage::Events { events } = message else {
                        return Ok(message);
                    };
                    self.batched.extend(events);
                    match self.batched.pop_front() {
                        Some(envelope) => return Ok(ServerMessage::Event(envelope)),
                        None => continue,
                    }
                }
                Message::Close(close) => bail!("the server closed the websocket: {close:?}"),
                Message::Binary(_) => bail!("unexpected binary frame"),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// How many text frames were read so far (an `events` frame counts once).
    pub fn text_frames(&self) -> usize {
        self.text_frames
    }

    /// Read messages until one satisfies `pred`, within `timeout` overall; returns it.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&ServerMessage) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<ServerMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let message = self.next_message(remaining).await.with_context(|| {
                format!("waiting {} ms for a matching message", timeout.as_millis())
            })?;
            if pred(&message) {
                return Ok(message);
            }
        }
    }

    /// Read messages until a logged event satisfies `pred`, within `timeout` overall; returns it.
    pub async fn wait_for_event(
        &mut self,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<EventEnvelope> {
        self.events_until(pred, timeout)
            .await?
            .pop()
            .context("no event")
    }

    /// Every logged event up to and including the first that satisfies `pred`, in arrival order (other
    /// messages are skipped).
    pub async fn events_until(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Vec<EventEnvelope>> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let message = self.next_message(remaining).await.with_context(|| {
                format!(
                    "waiting {} ms for a matching event ({} events seen)",
                    timeout.as_millis(),
                    events.len()
                )
            })?;
            if let ServerMessage::Event(envelope) = message {
                let done = pred(&envelope.event);
                events.push(envelope);
                if done {
                    return Ok(events);
                }
            }
        }
    }

    /// Close the connection politely.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.stream
            .close(None)
            .await
            .context("closing the websocket")
    }
}

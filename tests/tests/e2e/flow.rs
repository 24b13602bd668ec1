//! Shared steps of the end-to-end scenarios.

use std::time::Duration;

use nightshift_protocol::http::{InviteResponse, SessionState};
use nightshift_protocol::{Event, EventEnvelope, PromptStatus, SandboxStatus, ServerMessage};
use nightshift_tests::{Client, System, Ws, DEMO_REPO};

/// Long enough for a cold agent start and a scripted prompt on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);

/// Two signed-in people: `ada` owns a new session on the demo repo, `bob` joined it through an invite.
pub struct Pair {
    pub ada: Client,
    pub bob: Client,
    pub session: String,
}

pub async fn pair(system: &System) -> anyhow::Result<Pair> {
    let mut ada = Client::new(system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let mut bob = Client::new(system);
    bob.dev_login("bob", "Bob Noyce", "bob@example.com").await?;
    let session = ada.create_session(DEMO_REPO).await?;
    let invite: InviteResponse = ada
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/invites"),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = invite
        .share_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    bob.request(reqwest::Method::POST, &format!("/api/join/{token}"))
        .send()
        .await?
        .error_for_status()?;
    Ok(Pair { ada, bob, session })
}

/// Connect and read `welcome`; returns the socket and the welcome's `last_seq`.
pub async fn join(
    client: &Client,
    session: &str,
    last_seq: Option<u64>,
) -> anyhow::Result<(Ws, u64)> {
    let mut ws = client.connect(session, last_seq).await?;
    match ws.next_message(WAIT).await? {
        ServerMessage::Welcome { last_seq, .. } => Ok((ws, last_seq)),
        other => anyhow::bail!("expected welcome, got {other:?}"),
    }
}

/// Wait until the sandbox is ready (returns every event read on the way).
pub async fn until_ready(ws: &mut Ws) -> anyhow::Result<Vec<EventEnvelope>> {
    ws.events_until(
        |e| {
            matches!(
                e,
                Event::SandboxStatus {
                    status: SandboxStatus::Ready,
                    ..
                }
            )
        },
        WAIT,
    )
    .await
}

/// Read events until `prompt_id` finishes.
pub async fn until_finished(ws: &mut Ws, prompt_id: &str) -> anyhow::Result<Vec<EventEnvelope>> {
    ws.events_until(
        |e| matches!(e, Event::PromptFinished { prompt_id: p, .. } if p == prompt_id),
        WAIT,
    )
    .await
}

/// Send a prompt and return its id (from `prompt_accepted`), collecting events that arrive meanwhile.
pub async fn prompt(
    ws: &mut Ws,
    text: &str,
    seen: &mut Vec<EventEnvelope>,
) -> anyhow::Result<String> {
    let key = format!("key-{}", rand_suffix());
    ws.send(&nightshift_protocol::ClientMessage::Prompt {
        text: text.to_owned(),
        idempotency_key: key,
        attachments: None,
    })
    .await?;
    loop {
        match ws.next_message(WAIT).await? {
            ServerMessage::PromptAccepted { prompt_id, .. } => return Ok(prompt_id),
            ServerMessage::Event(e) => seen.push(e),
            ServerMessage::Error { code, message } => {
                anyhow::bail!("prompt refused: {code:?} {message}")
            }
            _ => {}
        }
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `seq`s are contiguous and strictly increasing.
pub fn assert_contiguous(events: &[EventEnvelope]) {
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "gap or duplicate between {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
}

pub fn finished_status(events: &[EventEnvelope], prompt_id: &str) -> Option<PromptStatus> {
    events.iter().find_map(|e| match &e.event {
        Event::PromptFinished {
            prompt_id: p,
            status,
            ..
        } if p == prompt_id => Some(*status),
        _ => None,
    })
}

pub async fn state(client: &Client, session: &str) -> anyhow::Result<SessionState> {
    Ok(client
        .request(reqwest::Method::GET, &format!("/api/sessions/{session}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

//! Sessions to measure on: signed-in people, invites, joined sockets, prompts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use nightshift_protocol::http::{InviteResponse, PromptRequest, PromptResponse};
use nightshift_protocol::{ClientMessage, Event, SandboxStatus, ServerMessage};
use nightshift_tests::{Client, System, Ws};

/// Long enough for a cold agent start on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);

/// A signed-in person with login `login`.
pub async fn person(system: &System, login: &str) -> anyhow::Result<Client> {
    let mut client = Client::new(system);
    client
        .dev_login(
            login,
            &format!("Bench {login}"),
            &format!("{login}@bench.example"),
        )
        .await
        .with_context(|| format!("signing in {login}"))?;
    Ok(client)
}

/// `owner` invites `guest` into `session`, and `guest` joins.
pub async fn invite(owner: &Client, session: &str, guest: &Client) -> anyhow::Result<()> {
    let invite: InviteResponse = owner
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/invites"),
        )
        .send()
        .await?
        .error_for_status()
        .context("POST /api/sessions/{id}/invites")?
        .json()
        .await?;
    let token = invite.share_url.rsplit('/').next().unwrap_or_default();
    guest
        .request(reqwest::Method::POST, &format!("/api/join/{token}"))
        .send()
        .await?
        .error_for_status()
        .context("POST /api/join/{token}")?;
    Ok(())
}

/// Open the session's socket and read `welcome` (replay from the start follows).
pub async fn join(client: &Client, session: &str) -> anyhow::Result<Ws> {
    let mut ws = client.connect(session, None).await?;
    match ws.next_message(WAIT).await? {
        ServerMessage::Welcome { .. } => Ok(ws),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// Read events until the sandbox is `ready` or `failed`; returns which, with the detail.
pub async fn sandbox_outcome(ws: &mut Ws) -> anyhow::Result<(SandboxStatus, String)> {
    let envelope = ws
        .wait_for_event(
            |e| {
                matches!(
                    e,
                    Event::SandboxStatus {
                        status: SandboxStatus::Ready | SandboxStatus::Failed,
                        ..
                    }
                )
            },
            WAIT,
        )
        .await
        .context("waiting for sandbox_status ready or failed")?;
    match envelope.event {
        Event::SandboxStatus { status, detail } => Ok((status, detail)),
        _ => unreachable!("matched above"),
    }
}

/// Wait until the sandbox is ready; a failed sandbox is an error.
pub async fn until_ready(ws: &mut Ws) -> anyhow::Result<()> {
    match sandbox_outcome(ws).await? {
        (SandboxStatus::Ready, _) => Ok(()),
        (status, detail) => bail!("the sandbox did not become ready: {status:?} {detail}"),
    }
}

/// A `prompt` message with a fresh idempotency key.
pub fn prompt(text: &str) -> ClientMessage {
    ClientMessage::Prompt {
        text: text.to_owned(),
        idempotency_key: idempotency_key(),
        attachments: None,
    }
}

/// `POST /api/sessions/{id}/prompts` → the prompt id.
pub async fn post_prompt(client: &Client, session: &str, text: &str) -> anyhow::Result<String> {
    let body = PromptRequest {
        text: text.to_owned(),
        idempotency_key: idempotency_key(),
    };
    let accepted: PromptResponse = client
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/prompts"),
        )
        .json(&body)
        .send()
        .await?
        .error_for_status()
        .context("POST /api/sessions/{id}/prompts")?
        .json()
        .await?;
    Ok(accepted.prompt_id)
}

fn idempotency_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

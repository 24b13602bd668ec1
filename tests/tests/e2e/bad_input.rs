//! Bad input gets a typed answer and loses nothing: the session works afterwards.

use nightshift_protocol::{ClientMessage, ErrorCode, PromptStatus, ServerMessage, MAX_FRAME_BYTES};
use nightshift_tests::System;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::flow::{self, finished_status, join, until_finished, until_ready, WAIT};

async fn expect_error(
    ws: &mut nightshift_tests::Ws,
    frame: Message,
    code: ErrorCode,
) -> anyhow::Result<()> {
    ws.send_raw(frame).await?;
    match ws
        .wait_for(|m| matches!(m, ServerMessage::Error { .. }), WAIT)
        .await?
    {
        ServerMessage::Error { code: got, .. } => assert_eq!(got, code),
        _ => unreachable!(),
    }
    Ok(())
}

/// The agent's sandbox token, read from the agent process's environment (only this machine's root can).
fn sandbox_token(session: &str) -> anyhow::Result<String> {
    let suffix = format!("/sandbox/{session}/ws");
    for entry in std::fs::read_dir("/proc")? {
        let Ok(environ) = std::fs::read(entry?.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let ours = vars
            .iter()
            .any(|v| v.starts_with("NIGHTSHIFT_CONNECT_URL=") && v.ends_with(&suffix));
        if let (true, Some(token)) = (
            ours,
            vars.iter()
                .find_map(|v| v.strip_prefix("NIGHTSHIFT_SANDBOX_TOKEN=")),
        ) {
            return Ok(token.to_owned());
        }
    }
    anyhow::bail!("no agent process for session {session}")
}

async fn ws_status(
    url: &str,
    authorization: Option<&str>,
    cookie: Option<&str>,
) -> anyhow::Result<u16> {
    let mut request = url.into_client_request()?;
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert("authorization", HeaderValue::from_str(value)?);
    }
    if let Some(value) = cookie {
        request
            .headers_mut()
            .insert("cookie", HeaderValue::from_str(value)?);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(101),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Ok(response.status().as_u16())
        }
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn every_kind_of_bad_input_is_answered_and_the_session_keeps_working() -> anyhow::Result<()> {
    let system = System::start().await?;
    let flow::Pair {
        ada,
        bob: _,
        session,
    } = flow::pair(&system).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    until_ready(&mut a).await?;

    // Malformed frames on the client socket.
    expect_error(&mut a, Message::text("{not json"), ErrorCode::InvalidJson).await?;
    expect_error(
        &mut a,
        Message::text(r#"{"type":"launch_missiles"}"#),
        ErrorCode::UnknownType,
    )
    .await?;
    expect_error(
        &mut a,
        Message::text(r#"{"type":"prompt","text":42}"#),
        ErrorCode::InvalidMessage,
    )
    .await?;
    expect_error(
        &mut a,
        Message::binary(vec![1u8, 2, 3]),
        ErrorCode::BinaryFrame,
    )
    .await?;
    let huge = format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(MAX_FRAME_BYTES)
    );
    expect_error(&mut a, Message::text(huge), ErrorCode::FrameTooLarge).await?;
    a.send(&ClientMessage::Ping {}).await?;
    assert!(matches!(
        a.wait_for(|m| matches!(m, ServerMessage::Pong {}), WAIT)
            .await?,
        ServerMessage::Pong {}
    ));

    // A message before hello on a fresh socket.
    let mut fresh = ada.connect_without_hello(&session).await?;
    expect_error(
        &mut fresh,
        Message::text(r#"{"type":"ping"}"#),
        ErrorCode::HelloRequired,
    )
    .await?;

    // No credentials.
    let anonymous = ada.with_token(None);
    let response = anonymous
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/prompts"),
        )
        .json(&serde_json::json!({"text": "hi", "idempotency_key": "anon"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401);
    let body: nightshift_protocol::http::ErrorBody = response.json().await?;
    assert_eq!(body.error.code, ErrorCode::Unauthorized);
    let client_ws = format!("{}/api/sessions/{session}/ws", system.ws_url());
    assert_eq!(ws_status(&client_ws, None, None).await?, 401);
    assert_eq!(
        ws_status(&client_ws, Some("Bearer ns1.forged.token"), None).await?,
        401
    );

    // The two trust boundaries do not mix.
    let sandbox = sandbox_token(&session)?;
    assert_eq!(
        ws_status(&client_ws, Some(&format!("Bearer {sandbox}")), None).await?,
        401,
        "sandbox token on the client route"
    );
    let agent_ws = format!("{}/sandbox/{session}/ws", system.ws_url());
    let user_token = ada.token().expect("signed in").to_owned();
    assert_eq!(
        ws_status(&agent_ws, Some(&format!("Bearer {user_token}")), None).await?,
        401,
        "user token on the sandbox route"
    );
    assert_eq!(
        ws_status(&agent_ws, None, Some(&format!("ns_session={user_token}"))).await?,
        401,
        "cookie on the sandbox route"
    );

    // A missing session and someone else's session look the same.
    let mut eve = nightshift_tests::Client::new(&system);
    eve.dev_login("eve", "Eve", "eve@example.com").await?;
    let theirs = eve
        .request(reqwest::Method::GET, &format!("/api/sessions/{session}"))
        .send()
        .await?;
    let missing = eve
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{}", "0".repeat(32)),
        )
        .send()
        .await?;
    let garbage = eve
        .request(reqwest::Method::GET, "/api/sessions/not-an-id")
        .send()
        .await?;
    let (s1, s2, s3) = (
        theirs.status().as_u16(),
        missing.status().as_u16(),
        garbage.status().as_u16(),
    );
    let (b1, b2, b3) = (
        theirs.text().await?,
        missing.text().await?,
        garbage.text().await?,
    );
    assert_eq!((s1, s2, s3), (404, 404, 404));
    assert_eq!(b1, b2);
    assert_eq!(b2, b3);
    assert_eq!(
        ws_status(
            &client_ws,
            Some(&format!("Bearer {}", eve.token().unwrap_or_default())),
            None
        )
        .await?,
        404
    );

    // Bad HTTP bodies.
    let bad = ada
        .request(reqwest::Method::POST, "/api/sessions")
        .header("content-type", "application/json")
        .body("{\"repo\": ")
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    let escape = ada
        .request(reqwest::Method::POST, "/api/sessions")
        .json(&serde_json::json!({"repo": "../etc"}))
        .send()
        .await?;
    assert_eq!(escape.status().as_u16(), 400);

    // After all that, the same socket still works.
    let mut seen = Vec::new();
    let prompt = flow::prompt(&mut a, "[script:tokens count=3 rate=0]", &mut seen).await?;
    seen.extend(until_finished(&mut a, &prompt).await?);
    assert_eq!(
        finished_status(&seen, &prompt),
        Some(PromptStatus::Completed)
    );
    Ok(())
}

/// The queue holds at most 10 unfinished prompts: the 11th is refused with a typed `queue_full`, a re-sent
/// prompt (same idempotency key) still gets its original answer, and once the queue moves a new one is
/// taken again.
#[tokio::test]
async fn the_eleventh_unfinished_prompt_is_refused_and_the_queue_goes_on() -> anyhow::Result<()> {
    let system = System::start().await?;
    let pair = flow::pair(&system).await?;
    let (mut ws, _) = join(&pair.ada, &pair.session, None).await?;
    until_ready(&mut ws).await?;
    let post = |text: &str, key: &str| {
        pair.ada
            .request(
                reqwest::Method::POST,
                &format!("/api/sessions/{}/prompts", pair.session),
            )
            .json(&serde_json::json!({"text": text, "idempotency_key": key}))
            .send()
    };
    // One slow prompt runs, nine wait behind it.
    let first = post("[script:tokens count=400 rate=40]", "k0").await?;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await?;
    for n in 1..10 {
        let answer = post("[script:tokens count=1 rate=0]", &format!("k{n}")).await?;
        assert_eq!(answer.status(), 202, "prompt {n}");
    }
    let refused = post("one too many", "k10").await?;
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await?;
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    // A re-send of an accepted prompt is not a new one: its original answer, not a refusal.
    let again = post("[script:tokens count=400 rate=40]", "k0").await?;
    assert_eq!(again.status(), 200);
    let again: serde_json::Value = again.json().await?;
    assert_eq!(again["prompt_id"], first["prompt_id"]);
    // Once the running prompt is stopped and the queue moves, a new prompt is taken.
    ws.send(&ClientMessage::Stop {
        scope: nightshift_protocol::StopScope::Turn,
    })
    .await?;
    let first_id = first["prompt_id"].as_str().unwrap_or_default().to_owned();
    until_finished(&mut ws, &first_id).await?;
    let later = post("[script:tokens count=1 rate=0]", "k11").await?;
    assert_eq!(later.status(), 202);
    Ok(())
}

//! Membership end to end: invites that expire and can be revoked, strangers answered like a missing
//! session everywhere, typing in presence, the shared queue, and "my sessions" from the D1 index.

use std::time::{Duration, Instant};

use nightshift_protocol::http::{
    InviteResponse, InviteState, InvitesResponse, SessionStatus, SessionsResponse,
};
use nightshift_protocol::{ClientMessage, ErrorCode, Event, PromptStatus, Role, ServerMessage};
use nightshift_tests::{Client, System, DEMO_REPO};
use reqwest::Method;

use crate::flow::{self, join, pair, until_finished, until_ready, WAIT};

async fn signed_in(system: &System, login: &str) -> anyhow::Result<Client> {
    let mut client = Client::new(system);
    client
        .dev_login(
            login,
            &format!("{login} name"),
            &format!("{login}@example.com"),
        )
        .await?;
    Ok(client)
}

/// Status and JSON body of a request.
async fn call(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut request = client.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or_default()))
}

fn code(body: &serde_json::Value) -> Option<ErrorCode> {
    serde_json::from_value(body["error"]["code"].clone()).ok()
}

async fn invite(
    client: &Client,
    session: &str,
    ttl_ms: Option<u64>,
) -> anyhow::Result<InviteResponse> {
    let body = ttl_ms.map(|ttl| serde_json::json!({ "ttl_ms": ttl }));
    let (status, body) = call(
        client,
        Method::POST,
        &format!("/api/sessions/{session}/invites"),
        body,
    )
    .await?;
    anyhow::ensure!(status == 201, "invite answered {status}: {body}");
    Ok(serde_json::from_value(body)?)
}

fn token_of(invite: &InviteResponse) -> String {
    invite
        .share_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn join_with(client: &Client, token: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    call(client, Method::POST, &format!("/api/join/{token}"), None).await
}

#[tokio::test]
async fn invites_expire_and_are_revoked_and_strangers_get_the_missing_session_404(
) -> anyhow::Result<()> {
    let system = System::start().await?;
    let flow::Pair { ada, bob, session } = pair(&system).await?;
    let carol = signed_in(&system, "carol").await?;
    let missing = "0123456789abcdef0123456789abcdef";

    // Every session route answers a stranger exactly as it answers a session that does not exist.
    let routes: [(Method, &str, Option<serde_json::Value>); 8] = [
        (Method::GET, "", None),
        (Method::GET, "/events?after=0", None),
        (
            Method::POST,
            "/prompts",
            Some(serde_json::json!({"text": "hi", "idempotency_key": "k"})),
        ),
        (
            Method::POST,
            "/stop",
            Some(serde_json::json!({"scope": "turn"})),
        ),
        (Method::POST, "/invites", None),
        (Method::GET, "/invites", None),
        (Method::DELETE, "/invites/0123456789abcdef", None),
        (Method::GET, "/ws", None),
    ];
    for (method, suffix, body) in routes {
        let theirs = call(
            &carol,
            method.clone(),
            &format!("/api/sessions/{session}{suffix}"),
            body.clone(),
        )
        .await?;
        let none = call(
            &carol,
            method.clone(),
            &format!("/api/sessions/{missing}{suffix}"),
            body,
        )
        .await?;
        assert_eq!(theirs.0, 404, "{method} {suffix}: {theirs:?}");
        assert_eq!(
            theirs, none,
            "{method} {suffix} tells a stranger apart from nothing"
        );
    }
    // The client socket too: the upgrade is refused with the same 404.
    for id in [session.as_str(), missing] {
        let refused = carol.connect_without_hello(id).await.err();
        let status = refused.as_ref().and_then(|e| {
            e.downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                .and_then(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => {
                        Some(response.status().as_u16())
                    }
                    _ => None,
                })
        });
        assert_eq!(status, Some(404), "websocket of {id}: {refused:?}");
    }
    // A made-up secret is a missing session as well.
    let (status, body) = join_with(&carol, &format!("{session}.00ff")).await?;
    assert_eq!((status, code(&body)), (404, Some(ErrorCode::NotFound)));

    // An invite that expired: a typed refusal.
    let short = invite(&ada, &session, Some(1_000)).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, body) = join_with(&carol, &token_of(&short)).await?;
    assert_eq!(
        (status, code(&body)),
        (410, Some(ErrorCode::InviteExpired)),
        "{body}"
    );

    // A revoked one: another typed refusal. Only owners list and revoke.
    let revoked = invite(&bob, &session, None).await?;
    let path = format!("/api/sessions/{session}/invites/{}", revoked.invite_id);
    let (status, body) = call(&bob, Method::DELETE, &path, None).await?;
    assert_eq!((status, code(&body)), (403, Some(ErrorCode::Forbidden)));
    let (status, body) = call(
        &bob,
        Method::GET,
        &format!("/api/sessions/{session}/invites"),
        None,
    )
    .await?;
    assert_eq!((status, code(&body)), (403, Some(ErrorCode::Forbidden)));
    let (status, _) = call(&ada, Method::DELETE, &path, None).await?;
    assert_eq!(status, 200);
    let (status, body) = join_with(&carol, &token_of(&revoked)).await?;
    assert_eq!(
        (status, code(&body)),
        (410, Some(ErrorCode::InviteRevoked)),
        "{body}"
    );

    let (status, listed) = call(
        &ada,
        Method::GET,
        &format!("/api/sessions/{session}/invites"),
        None,
    )
    .await?;
    assert_eq!(status, 200);
    let listed: InvitesResponse = serde_json::from_value(listed)?;
    let states: Vec<(String, InviteState)> = listed
        .invites
        .iter()
        .map(|i| (i.id.clone(), i.state))
        .collect();
    assert!(states.contains(&(short.invite_id.clone(), InviteState::Expired)));
    assert!(states.contains(&(revoked.invite_id.clone(), InviteState::Revoked)));
    assert_eq!(
        states.len(),
        3,
        "the pair's invite, the short one, the revoked one"
    );
    // Still nothing for carol, until a working invite lets her in as a member.
    let (status, _) = call(
        &carol,
        Method::GET,
        &format!("/api/sessions/{session}"),
        None,
    )
    .await?;
    assert_eq!(status, 404);
    let good = invite(&ada, &session, None).await?;
    let (status, _) = join_with(&carol, &token_of(&good)).await?;
    assert_eq!(status, 200);
    let state = flow::state(&carol, &session).await?;
    let roles: Vec<(String, Role)> = state
        .participants
        .iter()
        .map(|p| (p.login.clone(), p.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("ada".to_owned(), Role::Owner),
            ("bob".to_owned(), Role::Member),
            ("carol".to_owned(), Role::Member)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn typing_shows_in_presence_for_a_few_seconds_and_the_queue_is_shared() -> anyhow::Result<()>
{
    let system = System::start().await?;
    let flow::Pair { ada, bob, session } = pair(&system).await?;
    let (mut a, _) = join(&ada, &session, None).await?;
    let mut a_events = until_ready(&mut a).await?;
    let (mut b, _) = join(&bob, &session, None).await?;

    // Typing: everyone sees bob typing, then not typing once a few seconds passed.
    b.send(&ClientMessage::Typing {}).await?;
    let typing_since = Instant::now();
    let bob_typing = |m: &ServerMessage, typing: bool| match m {
        ServerMessage::Presence { participants } => participants
            .iter()
            .any(|p| p.login == "bob" && p.online && p.typing == typing),
        _ => false,
    };
    a.wait_for(|m| bob_typing(m, true), WAIT).await?;
    a.wait_for(|m| bob_typing(m, false), WAIT).await?;
    let lasted = typing_since.elapsed();
    assert!(
        lasted >= Duration::from_millis(nightshift_protocol::TYPING_MS - 500)
            && lasted < Duration::from_millis(nightshift_protocol::TYPING_MS + 5_000),
        "typing lasted {lasted:?}"
    );

    // The queue: ada's long prompt runs, her second waits; bob (connecting now) sees both in
    // `welcome` with their author, cancels hers, and both hear of it.
    let running = flow::prompt(&mut a, "[script:tokens count=600 rate=100]", &mut a_events).await?;
    let queued = flow::prompt(&mut a, "queued behind", &mut a_events).await?;
    drop(b);
    let mut b = bob.connect(&session, Some(u64::MAX)).await?;
    let ServerMessage::Welcome { queue, .. } = b.next_message(WAIT).await? else {
        anyhow::bail!("expected welcome");
    };
    let listed: Vec<(&str, &str, PromptStatus)> = queue
        .iter()
        .map(|p| (p.prompt_id.as_str(), p.author.login.as_str(), p.status))
        .collect();
    assert_eq!(
        listed,
        vec![
            (running.as_str(), "ada", PromptStatus::Running),
            (queued.as_str(), "ada", PromptStatus::Queued)
        ]
    );
    b.send(&ClientMessage::CancelPrompt {
        prompt_id: queued.clone(),
    })
    .await?;
    for ws in [&mut a, &mut b] {
        let cancelled = ws
            .wait_for_event(
                |e| matches!(e, Event::PromptCancelled { prompt_id, .. } if *prompt_id == queued),
                WAIT,
            )
            .await?;
        assert!(
            matches!(&cancelled.event, Event::PromptCancelled { by: Some(by), .. } if by == "bob"),
            "{cancelled:?}"
        );
    }
    let state = flow::state(&ada, &session).await?;
    assert_eq!(
        state
            .queue
            .iter()
            .map(|p| p.prompt_id.as_str())
            .collect::<Vec<_>>(),
        vec![running.as_str()]
    );
    Ok(())
}

/// `GET /api/sessions` with `query` as `client`, polled until `done` holds (the index is written in
/// the background).
async fn sessions_until(
    client: &Client,
    query: &str,
    mut done: impl FnMut(&SessionsResponse) -> bool,
) -> anyhow::Result<SessionsResponse> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) =
            call(client, Method::GET, &format!("/api/sessions{query}"), None).await?;
        anyhow::ensure!(
            status == 200,
            "GET /api/sessions{query} answered {status}: {body}"
        );
        let listed: SessionsResponse = serde_json::from_value(body)?;
        if done(&listed) {
            return Ok(listed);
        }
        if Instant::now() > deadline {
            anyhow::bail!("GET /api/sessions{query} never matched; last {listed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(listed: &SessionsResponse) -> Vec<&str> {
    listed.sessions.iter().map(|s| s.id.as_str()).collect()
}

#[tokio::test]
async fn my_sessions_lists_created_and_joined_ones_with_filters() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.seed("demo/other").await?;
    let flow::Pair {
        ada,
        bob,
        session: shared,
    } = pair(&system).await?;
    let bobs = bob.create_session(DEMO_REPO).await?;
    let other = ada.create_session("demo/other").await?;
    let carol = signed_in(&system, "carol").await?;

    let mine = sessions_until(&ada, "", |l| l.sessions.len() == 2).await?;
    let mut listed = ids(&mine);
    listed.sort_unstable();
    let mut expected = vec![shared.as_str(), other.as_str()];
    expected.sort_unstable();
    assert_eq!(listed, expected, "ada: created ones, not bob's");
    let theirs = sessions_until(&bob, "", |l| l.sessions.len() == 2).await?;
    let joined = theirs
        .sessions
        .iter()
        .find(|s| s.id == shared)
        .expect("bob lists the session he joined");
    assert_eq!(joined.role, Role::Member);
    assert_eq!(joined.created_by, "ada");
    assert_eq!(joined.participants, vec!["ada", "bob"]);
    assert!(theirs
        .sessions
        .iter()
        .any(|s| s.id == bobs && s.role == Role::Owner));
    assert!(sessions_until(&carol, "", |_| true)
        .await?
        .sessions
        .is_empty());

    // Filters: repository, another participant, status.
    let on_other = sessions_until(&ada, "?repo=demo/other", |_| true).await?;
    assert_eq!(ids(&on_other), vec![other.as_str()]);
    let with_bob = sessions_until(&ada, "?participant=bob", |_| true).await?;
    assert_eq!(ids(&with_bob), vec![shared.as_str()]);
    let (status, body) = call(&ada, Method::GET, "/api/sessions?status=sleepy", None).await?;
    assert_eq!((status, code(&body)), (400, Some(ErrorCode::BadRequest)));
    let (status, body) = call(&ada, Method::GET, "/api/sessions?repo=no-slash", None).await?;
    assert_eq!((status, code(&body)), (400, Some(ErrorCode::BadRequest)));

    // A prompt in the shared session: running while it runs, idle after, and first by activity.
    let (mut a, _) = join(&ada, &shared, None).await?;
    let mut seen = until_ready(&mut a).await?;
    sessions_until(&ada, "?status=idle", |l| ids(l).contains(&shared.as_str())).await?;
    let prompt = flow::prompt(&mut a, "[script:tokens count=300 rate=100]", &mut seen).await?;
    sessions_until(&bob, "?status=running", |l| ids(l) == vec![shared.as_str()]).await?;
    until_finished(&mut a, &prompt).await?;
    let after = sessions_until(&ada, "?status=idle", |l| {
        ids(l).first() == Some(&shared.as_str())
    })
    .await?;
    assert!(after
        .sessions
        .iter()
        .all(|s| s.status == SessionStatus::Idle));
    let activity: Vec<u64> = after.sessions.iter().map(|s| s.last_activity_ms).collect();
    assert!(
        activity.windows(2).all(|w| w[0] >= w[1]),
        "most recent first: {activity:?}"
    );
    let everyone = sessions_until(&ada, "", |_| true).await?;
    let activity: Vec<u64> = everyone
        .sessions
        .iter()
        .map(|s| s.last_activity_ms)
        .collect();
    assert_eq!(ids(&everyone).first(), Some(&shared.as_str()));
    assert!(activity.windows(2).all(|w| w[0] >= w[1]), "{activity:?}");
    Ok(())
}

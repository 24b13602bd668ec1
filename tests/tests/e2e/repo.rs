//! Repositories: `GET /api/repos` lists what sessions were opened on and what the provider holds, warm-ups reach the provider once per
//! session and interval, a failed image build shows as a warning and a session notice, and a repository
//! object keeps its alarm and state across eviction. Robust to a host without image and pool routes
//! (it answers 404 there: "cannot do this yet").

use std::time::{Duration, Instant};

use nightshift_protocol::http::{
    BuildStatus, EventsPage, RepoSummary, RepoWarningKind, ReposResponse, WarmResponse,
};
use nightshift_protocol::{ClientMessage, ErrorCode, Event};
use nightshift_tests::{Client, StartOptions, System, DEMO_REPO};

use crate::flow::{self, join};

/// Repositories of `GET /api/repos`.
async fn repos(client: &Client) -> anyhow::Result<Vec<RepoSummary>> {
    let listed: ReposResponse = client
        .request(reqwest::Method::GET, "/api/repos")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(listed.repos)
}

/// `GET /api/repos/{repo}` until `done` holds for it.
async fn repo_until(
    client: &Client,
    repo: &str,
    what: &str,
    done: impl Fn(&RepoSummary) -> bool,
) -> anyhow::Result<RepoSummary> {
    let started = Instant::now();
    loop {
        let summary: RepoSummary = client
            .request(reqwest::Method::GET, &format!("/api/repos/{repo}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if done(&summary) {
            return Ok(summary);
        }
        if started.elapsed() > flow::WAIT {
            anyhow::bail!("{repo} never reached `{what}`: {summary:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many times the host logged `line` (its provider API request log: `POST /v1/pools/demo/hello -> 404`).
fn host_requests(system: &System, line: &str) -> usize {
    let needle = format!("{line} -> ");
    system
        .host_log()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// Wait until the host logged `line` at least `count` times (or fail with its log).
async fn until_host_requests(
    system: &System,
    line: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while host_requests(system, line) < count {
        if started.elapsed() > within {
            anyhow::bail!(
                "the host did not see `{line}` {count} times within {within:?}; its log:\n{}",
                system.host_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn repos_are_listed_and_typing_warms_once_per_session() -> anyhow::Result<()> {
    let system = System::start().await?;
    let anonymous = Client::new(&system);
    let status = anonymous
        .request(reqwest::Method::GET, "/api/repos")
        .send()
        .await?
        .status();
    assert_eq!(
        status.as_u16(),
        401,
        "GET /api/repos needs a signed-in user"
    );

    // Before any session, the provider's repositories are listed (the new-session page picks from them).
    let mut early = Client::new(&system);
    early
        .dev_login("early", "Early Bird", "early@example.com")
        .await?;
    let before = repos(&early).await?;
    assert!(
        before.iter().any(|r| r.repo == DEMO_REPO),
        "{DEMO_REPO} is held by the provider, so it is listed before any session: {before:?}"
    );

    let flow::Pair { ada, bob, session } = flow::pair(&system).await?;

    // The session's repository is listed, with an image or a clear warning (a host without image routes
    // answers 404: `no_image`; a failed build: `build_failed`).
    let listed = repos(&ada).await?;
    let demo = listed
        .iter()
        .find(|r| r.repo == DEMO_REPO)
        .ok_or_else(|| anyhow::anyhow!("{DEMO_REPO} not listed: {listed:?}"))?;
    assert_eq!(demo.cadence_ms, 30 * 60 * 1000, "the default cadence");
    assert_eq!(demo.base_branch, "main");
    match (&demo.image, &demo.warning) {
        (Some(_), _) => {}
        (None, Some(warning)) => assert!(
            matches!(
                warning.kind,
                RepoWarningKind::NoImage | RepoWarningKind::BuildFailed
            ),
            "unexpected warning {warning:?}"
        ),
        (None, None) => anyhow::bail!("no image and no warning: {demo:?}"),
    }
    // Once the first build was asked for, its outcome is a clear state, not a retry storm.
    let demo = repo_until(&ada, DEMO_REPO, "first build asked", |r| {
        r.last_build.is_some()
    })
    .await?;
    if demo
        .last_build
        .as_ref()
        .is_some_and(|b| b.status == BuildStatus::Unsupported)
    {
        assert_eq!(
            demo.warning.as_ref().map(|w| w.kind),
            Some(RepoWarningKind::NoImage)
        );
        assert!(demo
            .next_build_ms
            .is_some_and(|next| next
                >= demo.last_build.as_ref().map_or(0, |b| b.started_ms) + demo.cadence_ms));
    }

    // Typing: many `typing` frames from two people in one session reach the provider as one warm-up.
    let (mut a, _) = join(&ada, &session, None).await?;
    let (mut b, _) = join(&bob, &session, None).await?;
    let pools = format!("POST /v1/pools/{DEMO_REPO}");
    assert_eq!(
        host_requests(&system, &pools),
        0,
        "nothing warmed before anyone typed"
    );
    for _ in 0..5 {
        a.send(&ClientMessage::Typing {}).await?;
        b.send(&ClientMessage::Typing {}).await?;
    }
    // Typing is answered with nothing, and the socket stays usable.
    a.send(&ClientMessage::Ping {}).await?;
    a.wait_for(
        |m| matches!(m, nightshift_protocol::ServerMessage::Pong {}),
        flow::WAIT,
    )
    .await?;
    until_host_requests(&system, &pools, 1, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        host_requests(&system, &pools),
        1,
        "exactly one warm-up per session within the rate limit"
    );

    // The explicit route answers 202 at once, whether or not the provider has pools.
    let started = Instant::now();
    let response = ada
        .request(
            reqwest::Method::POST,
            &format!("/api/repos/{DEMO_REPO}/warm"),
        )
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 202);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "warm-up answered in {:?}",
        started.elapsed()
    );
    let warm: WarmResponse = response.json().await?;
    assert!(warm.requested);
    assert_eq!(
        warm.target,
        Some(2),
        "two callers asked within the demand window"
    );
    until_host_requests(&system, &pools, 2, Duration::from_secs(20)).await?;
    // The same person again within the interval: accepted, nothing sent.
    let again: WarmResponse = ada
        .request(
            reqwest::Method::POST,
            &format!("/api/repos/{DEMO_REPO}/warm"),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(
        !again.requested && again.retry_after_ms.is_some_and(|ms| ms > 0),
        "{again:?}"
    );
    // The contract's body form, by another person.
    let other: WarmResponse = bob
        .request(reqwest::Method::POST, "/api/repos/warm")
        .json(&serde_json::json!({"repo": DEMO_REPO}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(other.requested);
    until_host_requests(&system, &pools, 3, Duration::from_secs(20)).await?;
    let demo = repo_until(&ada, DEMO_REPO, "warm-up answered", |r| {
        r.warm
            .as_ref()
            .is_some_and(|w| w.outcome != nightshift_protocol::http::WarmOutcome::Pending)
    })
    .await?;
    assert_eq!(demo.warm.map(|w| w.target), Some(3));

    // Build now: 202 with the repository; one build at a time.
    let response = ada
        .request(
            reqwest::Method::POST,
            &format!("/api/repos/{DEMO_REPO}/images"),
        )
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 202);
    let built: RepoSummary = response.json().await?;
    assert!(built.last_build.is_some());

    // Malformed names get a typed 400, unknown repositories a 404, unknown routes a 404.
    for path in [
        "/api/repos/.hidden/x/warm",
        "/api/repos/demo/he%20llo/images",
        "/api/repos/demo/a..b%2F/warm",
    ] {
        let response = ada.request(reqwest::Method::POST, path).send().await?;
        assert_eq!(response.status().as_u16(), 400, "{path}");
        let body: nightshift_protocol::http::ErrorBody = response.json().await?;
        assert_eq!(body.error.code, ErrorCode::BadRequest);
    }
    let response = ada
        .request(reqwest::Method::POST, "/api/repos/warm")
        .json(&serde_json::json!({"repo": "nope"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    let response = ada
        .request(reqwest::Method::GET, "/api/repos/demo/never-seen")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 404);
    let response = ada
        .request(
            reqwest::Method::DELETE,
            &format!("/api/repos/{DEMO_REPO}/images"),
        )
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 404);
    let response = ada
        .request(reqwest::Method::PATCH, &format!("/api/repos/{DEMO_REPO}"))
        .json(&serde_json::json!({"cadence_ms": 5}))
        .send()
        .await?;
    assert_eq!(
        response.status().as_u16(),
        400,
        "a cadence below the minimum is refused"
    );
    let set: RepoSummary = ada
        .request(reqwest::Method::PATCH, &format!("/api/repos/{DEMO_REPO}"))
        .json(&serde_json::json!({"cadence_ms": 3_600_000}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(set.cadence_ms, 3_600_000);
    let anonymous_warm = anonymous
        .request(
            reqwest::Method::POST,
            &format!("/api/repos/{DEMO_REPO}/warm"),
        )
        .send()
        .await?;
    assert_eq!(anonymous_warm.status().as_u16(), 401);

    // The session itself is unharmed.
    a.send(&ClientMessage::Ping {}).await?;
    a.wait_for(
        |m| matches!(m, nightshift_protocol::ServerMessage::Pong {}),
        flow::WAIT,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_failed_image_build_is_a_warning_and_a_notice_in_new_sessions() -> anyhow::Result<()> {
    // A provider that cannot be reached: every build fails (and so does every sandbox, which is not the point).
    let system = System::start_with(StartOptions::worker_vars([(
        "PROVIDER_URL",
        "http://127.0.0.1:9",
    )]))
    .await?;
    let mut ada = Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    let first = ada.create_session(DEMO_REPO).await?;
    let demo = repo_until(&ada, DEMO_REPO, "build_failed", |r| {
        r.warning
            .as_ref()
            .is_some_and(|w| w.kind == RepoWarningKind::BuildFailed)
    })
    .await?;
    let build = demo
        .last_build
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no build: {demo:?}"))?;
    assert_eq!(build.status, BuildStatus::Failed);
    // Not hammered: the retry waits a minute after the failure.
    assert_eq!(
        demo.next_build_ms,
        build.finished_ms.map(|ms| ms + 60_000),
        "{demo:?}"
    );
    let listed = repos(&ada).await?;
    assert!(
        listed
            .iter()
            .any(|r| r.repo == DEMO_REPO && r.warning == demo.warning),
        "{listed:?}"
    );

    // A new session on the repository says so in its log; the one created before the failure does not.
    let second = ada.create_session(DEMO_REPO).await?;
    let notices = |page: EventsPage| -> Vec<(String, String)> {
        page.events
            .into_iter()
            .filter_map(|e| match e.event {
                Event::Notice { level, text } => Some((level, text)),
                _ => None,
            })
            .collect()
    };
    let page: EventsPage = ada
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{second}/events"),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let found = notices(page);
    assert_eq!(found.len(), 1, "{found:?}");
    let (level, text) = &found[0];
    assert_eq!(level, "warn");
    assert!(
        text.starts_with("The last image build of demo/hello failed: provider unreachable"),
        "{text}"
    );
    let page: EventsPage = ada
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{first}/events"),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(notices(page).is_empty());
    Ok(())
}

#[tokio::test]
async fn an_evicted_repository_object_keeps_its_alarm_and_state() -> anyhow::Result<()> {
    const CADENCE_MS: u64 = 25_000;
    let system = System::start_with(StartOptions::worker_vars([(
        "IMAGE_CADENCE_MS",
        CADENCE_MS.to_string(),
    )]))
    .await?;
    let mut ada = Client::new(&system);
    ada.dev_login("ada", "Ada Lovelace", "ada@example.com")
        .await?;
    ada.create_session(DEMO_REPO).await?;
    let images = "POST /v1/images";
    until_host_requests(&system, images, 1, Duration::from_secs(20)).await?;
    let before = repo_until(&ada, DEMO_REPO, "first build settled", |r| {
        r.last_build
            .as_ref()
            .is_some_and(|b| b.status != BuildStatus::Building)
    })
    .await?;
    assert_eq!(before.cadence_ms, CADENCE_MS);

    // Nobody touches the repository object for longer than workerd's idle eviction (~10 s): its alarm
    // still fires a cadence later and asks for the next build.
    let first_builds = host_requests(&system, images);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        host_requests(&system, images),
        first_builds,
        "the next build waits for the cadence"
    );
    until_host_requests(&system, images, first_builds + 1, Duration::from_secs(30)).await?;

    let after = repo_until(&ada, DEMO_REPO, "next build recorded", |r| {
        r.last_build.as_ref().map(|b| b.started_ms)
            > before.last_build.as_ref().map(|b| b.started_ms)
    })
    .await?;
    assert_eq!(after.repo, before.repo);
    assert_eq!(after.cadence_ms, CADENCE_MS, "state kept across eviction");
    Ok(())
}

//! `fanout_50x1000` and `fanout_50x1000_blast`: 50 clients (five people, ten connections each) on
//! one session; one 1,000-token stamped stream paced at 200 tokens/s, then one unpaced. Latency is
//! each client's receipt time minus the time the model stub emitted the token.

use std::time::Duration;

use futures_util::StreamExt;
use nightshift_tests::{Client, System, DEMO_REPO};

use crate::report::{round3, Row};
use crate::session;
use crate::stream::{Audience, Delivery};

const CLIENTS: usize = 50;
/// Distinct people among the clients; the first owns the session, the others joined by invite.
const PEOPLE: usize = 5;
/// Connections opened at once, so wrangler is not flooded.
const CONNECT_CONCURRENCY: usize = 4;
const TOKENS: usize = 1000;
const PACED_RATE_PER_S: usize = 200;
/// Targets of the paced stream.
const TARGET_P99_MS: f64 = 20.0;
/// Extra time, beyond the stream's own length, for every client to see a prompt finish.
const FINISH_SLACK: Duration = Duration::from_secs(60);

pub async fn run(system: &System) -> anyhow::Result<[Row; 2]> {
    let mut people: Vec<Client> = Vec::with_capacity(PEOPLE);
    for n in 0..PEOPLE {
        people.push(session::person(system, &format!("fanout-{n}")).await?);
    }
    let owner = people[0].clone();
    let session = owner.create_session(DEMO_REPO).await?;
    for guest in &people[1..] {
        session::invite(&owner, &session, guest).await?;
    }
    let mut watcher = session::join(&owner, &session).await?;
    session::until_ready(&mut watcher).await?;
    watcher.close().await?;

    let mut audience = Audience::new();
    let mut connecting = futures_util::stream::iter(0..CLIENTS)
        .map(|n| {
            let (person, session) = (&people[n % PEOPLE], &session);
            async move { session::join(person, session).await }
        })
        .buffer_unordered(CONNECT_CONCURRENCY);
    while let Some(ws) = connecting.next().await {
        audience.add(ws?);
    }
    drop(connecting);

    // Warm-up: the agent's connection to the model, the clients' first tokens.
    let warm_up = "[script:tokens count=20 rate=0 stamp=1]";
    stream(&owner, &session, &mut audience, warm_up, Duration::ZERO).await?;
    let paced_text = format!("[script:tokens count={TOKENS} rate={PACED_RATE_PER_S} stamp=1]");
    let paced_duration = Duration::from_secs_f64(TOKENS as f64 / PACED_RATE_PER_S as f64);
    let (paced, paced_incomplete) =
        stream(&owner, &session, &mut audience, &paced_text, paced_duration).await?;
    let blast_text = format!("[script:tokens count={TOKENS} rate=0 stamp=1]");
    let (blast, blast_incomplete) =
        stream(&owner, &session, &mut audience, &blast_text, Duration::ZERO).await?;
    let clients = audience.len();
    let received = audience.finish().await?;

    let paced_delivery = Delivery::of(&paced, TOKENS, &received);
    let mut extra = paced_delivery.fields();
    extra.insert("clients".into(), clients.into());
    extra.insert("clients_without_finish".into(), paced_incomplete.into());
    let p99 = paced_delivery.latency.p99();
    let paced_row = Row {
        id: "fanout_50x1000",
        what: format!(
            "{clients} clients ({PEOPLE} people), `{paced_text}`: model stub emits token -> each client receives it"
        ),
        unit: "ms",
        p50: paced_delivery.latency.p50().map(round3),
        p99: p99.map(round3),
        value: None,
        target: "p99 <= 20 ms, 0 lost".to_owned(),
        ok: Some(p99.is_some_and(|p99| p99 <= TARGET_P99_MS) && paced_delivery.is_intact() && paced_incomplete == 0),
        extra,
    };

    let blast_delivery = Delivery::of(&blast, TOKENS, &received);
    let mut extra = blast_delivery.fields();
    extra.insert("clients".into(), clients.into());
    extra.insert("clients_without_finish".into(), blast_incomplete.into());
    extra.insert(
        "latency_p50_ms".into(),
        blast_delivery.latency.p50().map(round3).into(),
    );
    extra.insert(
        "latency_p99_ms".into(),
        blast_delivery.latency.p99().map(round3).into(),
    );
    extra.insert(
        "model_events_per_s".into(),
        blast_delivery.emitted_per_s(TOKENS).map(round3).into(),
    );
    let blast_row = Row {
        id: "fanout_50x1000_blast",
        what: format!(
            "{clients} clients, `{blast_text}`: value = tokens delivered to all clients per second, first emission \
             -> last receipt; latency (emission -> receipt) in latency_p50_ms/latency_p99_ms"
        ),
        unit: "events/s",
        p50: None,
        p99: None,
        value: blast_delivery.delivered_per_s().map(round3),
        target: "report".to_owned(),
        ok: None,
        extra,
    };
    Ok([paced_row, blast_row])
}

/// Send `text` as a prompt and wait until every client saw it finish (the stream takes about
/// `duration`); returns the prompt id and how many clients did not see it finish.
async fn stream(
    owner: &Client,
    session: &str,
    audience: &mut Audience,
    text: &str,
    duration: Duration,
) -> anyhow::Result<(String, usize)> {
    let prompt_id = session::post_prompt(owner, session, text).await?;
    let finished = audience
        .until_finished(&prompt_id, duration + FINISH_SLACK)
        .await?;
    Ok((prompt_id, audience.len() - finished))
}

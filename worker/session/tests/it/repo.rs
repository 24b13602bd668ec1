//! Repository rules on a fake clock: cadence arming, builds due, backoff after failures, staleness, warm-ups.

use insta::assert_debug_snapshot;
use nightshift_protocol::http::{BuildStatus, RepoWarningKind};
use nightshift_protocol::provider::{ImageInfo, ImageList, ImageStatus};
use nightshift_session::repo::{
    RepoError, RepoState, WarmDecision, WarmLedger, BUILD_TIMEOUT_MS, DEFAULT_CADENCE_MS,
    MAX_POOL_TARGET, WARM_DEMAND_WINDOW_MS, WARM_INTERVAL_MS,
};

const MIN: u64 = 60_000;
/// The fake clock starts here, so times print relative to it.
const T0: u64 = 1_700_000_000_000;

/// A clock the test moves by hand.
struct Clock {
    now_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock { now_ms: T0 }
    }

    fn advance(&mut self, ms: u64) -> u64 {
        self.now_ms += ms;
        self.now_ms
    }

    fn set(&mut self, ms: u64) -> u64 {
        assert!(ms >= self.now_ms, "the clock never goes back");
        self.now_ms = ms;
        ms
    }
}

/// `+12m30s` relative to [`T0`] (`+60m+1ms` when not a whole second).
fn rel(ms: u64) -> String {
    let s = (ms - T0) / 1000;
    let whole = match (s / 60, s % 60) {
        (0, s) => format!("+{s}s"),
        (m, 0) => format!("+{m}m"),
        (m, s) => format!("+{m}m{s}s"),
    };
    match (ms - T0) % 1000 {
        0 => whole,
        extra => format!("{whole}+{extra}ms"),
    }
}

/// One line of a timeline: what the repository would do at `now`.
fn line(what: &str, repo: &RepoState, now: u64) -> String {
    let build = repo
        .build
        .as_ref()
        .map_or("none".to_owned(), |b| format!("{:?}", b.status));
    let warning = repo
        .warning(now)
        .map_or("-".to_owned(), |w| format!("{:?}", w.kind));
    format!(
        "{} {what}: build={build} failures={} due={} alarm={} warning={warning}",
        rel(now),
        repo.failures,
        repo.build_due(now),
        rel(repo.next_alarm_ms(now)),
    )
}

fn listing(images: &[(&str, u64)]) -> ImageList {
    ImageList {
        images: images
            .iter()
            .map(|(id, age_ms)| image(id, *age_ms, ImageStatus::Ready, None))
            .collect(),
        building: None,
        latest_failure: None,
    }
}

/// An image (or build) as the provider describes it.
fn image(id: &str, age_ms: u64, status: ImageStatus, error: Option<&str>) -> ImageInfo {
    ImageInfo {
        id: id.to_owned(),
        repo: "demo/hello".to_owned(),
        git_ref: "main".to_owned(),
        commit: format!("c-{id}"),
        created_ms: 0,
        finished_ms: None,
        age_ms,
        status,
        setup: None,
        setup_log: String::new(),
        size_bytes: 0,
        file_count: 0,
        error: error.map(str::to_owned),
    }
}

fn accepted(id: &str) -> ImageInfo {
    image(id, 0, ImageStatus::Building, None)
}

#[test]
fn a_new_repository_builds_at_once_then_every_cadence() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    let mut lines = vec![line("registered", &repo, clock.now_ms)];
    assert!(repo.start_build(clock.now_ms));
    assert!(!repo.start_build(clock.now_ms), "one build at a time");
    repo.build_accepted(clock.now_ms, &accepted("img-1"));
    lines.push(line("build accepted", &repo, clock.now_ms));
    // Polled while it runs: nothing listed yet.
    let now = clock.advance(5_000);
    repo.observe(now, &listing(&[]));
    lines.push(line("poll, not listed", &repo, now));
    // The image appears, 2 s old.
    let now = clock.advance(5_000);
    repo.observe(now, &listing(&[("img-1", 2_000)]));
    lines.push(line("poll, listed", &repo, now));
    let image_created = now - 2_000;
    assert_eq!(
        repo.image.as_ref().map(|i| i.created_ms),
        Some(image_created)
    );
    assert_eq!(
        repo.next_alarm_ms(now),
        image_created + DEFAULT_CADENCE_MS,
        "armed a cadence after the image"
    );
    // Just before the cadence nothing is due; at it, a build is.
    let now = clock.set(image_created + DEFAULT_CADENCE_MS - 1);
    lines.push(line("just before the cadence", &repo, now));
    let now = clock.advance(1);
    lines.push(line("at the cadence", &repo, now));
    assert!(repo.build_due(now));
    assert_debug_snapshot!(lines);
}

#[test]
fn an_image_built_elsewhere_moves_the_next_build() {
    let clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    // The provider already has an image 10 min old: the next build is 20 min away, not now.
    repo.observe(
        clock.now_ms,
        &listing(&[("older", 40 * MIN), ("img-0", 10 * MIN)]),
    );
    assert_eq!(
        repo.image.as_ref().map(|i| i.id.as_str()),
        Some("img-0"),
        "the newest is kept"
    );
    assert!(!repo.build_due(clock.now_ms));
    assert_eq!(repo.next_alarm_ms(clock.now_ms), clock.now_ms + 20 * MIN);
}

#[test]
fn failed_builds_back_off_exponentially_up_to_the_cadence() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    let mut lines = Vec::new();
    for attempt in 1..=7 {
        let now = clock.now_ms;
        assert!(repo.build_due(now), "attempt {attempt} is due");
        assert!(repo.start_build(now));
        repo.build_failed(now, format!("setup exited with 1 (attempt {attempt})"));
        lines.push(line("failed", &repo, now));
        // Nothing is due a millisecond before the alarm.
        let alarm = repo.next_alarm_ms(now);
        assert!(!repo.build_due(alarm - 1));
        clock.set(alarm);
    }
    // A success resets the backoff: the next build is a cadence away.
    let now = clock.now_ms;
    repo.start_build(now);
    repo.build_accepted(now, &image("img-ok", 0, ImageStatus::Ready, None));
    lines.push(line("succeeded", &repo, now));
    assert_eq!(repo.failures, 0);
    assert_debug_snapshot!(lines);
}

#[test]
fn a_failure_reported_by_the_provider_ends_the_build() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    repo.start_build(clock.now_ms);
    repo.build_accepted(clock.now_ms, &accepted("b-2"));
    let now = clock.advance(20_000);
    // An older failure (before this build started) is not this build's.
    let mut list = listing(&[]);
    list.latest_failure = Some(image("b-1", 60_000, ImageStatus::Failed, Some("old")));
    repo.observe(now, &list);
    assert!(repo.building());
    list.latest_failure = Some(image(
        "b-2",
        1_000,
        ImageStatus::Failed,
        Some("npm install exited with 1"),
    ));
    repo.observe(now, &list);
    let build = repo.build.clone().unwrap();
    assert_eq!(build.status, BuildStatus::Failed);
    assert_eq!(build.error.as_deref(), Some("npm install exited with 1"));
    let warning = repo.warning(now).unwrap();
    assert_eq!(warning.kind, RepoWarningKind::BuildFailed);
    assert_eq!(
        repo.session_notice(now).as_deref(),
        Some("The last image build of demo/hello failed: npm install exited with 1")
    );
    assert_eq!(repo.next_alarm_ms(now), now + MIN, "retried after a minute");
}

#[test]
fn a_build_that_never_ends_times_out_as_a_failure() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    repo.start_build(clock.now_ms);
    repo.build_accepted(clock.now_ms, &accepted("b-1"));
    let mut polls = Vec::new();
    // Polls every 5 s during the first minute, then every 30 s, and never past the timeout.
    let mut now = clock.now_ms;
    while repo.building() {
        let alarm = repo.next_alarm_ms(now);
        polls.push(alarm - now);
        now = clock.set(alarm);
        repo.expire_build(now);
    }
    assert_eq!(now, T0 + BUILD_TIMEOUT_MS);
    assert_eq!(
        polls.iter().take(12).copied().collect::<Vec<_>>(),
        [5_000; 12]
    );
    assert!(polls.iter().skip(12).all(|p| *p == 30_000));
    assert_eq!(repo.failures, 1);
    assert_debug_snapshot!(repo.warning(now).unwrap().message);
}

#[test]
fn an_image_is_stale_after_twice_the_cadence() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    repo.observe(clock.now_ms, &listing(&[("img-1", 0)]));
    let mut lines = vec![line("image built", &repo, clock.now_ms)];
    for at in [
        DEFAULT_CADENCE_MS,
        2 * DEFAULT_CADENCE_MS,
        2 * DEFAULT_CADENCE_MS + 1,
        75 * MIN,
    ] {
        let now = clock.set(T0 + at);
        lines.push(line("later", &repo, now));
    }
    let now = clock.now_ms;
    assert_eq!(
        repo.session_notice(now).as_deref(),
        Some("The image of demo/hello is 75 min old (cadence 30 min): the first sync may take longer.")
    );
    assert_eq!(repo.summary(now).image.map(|i| i.age_ms), Some(75 * MIN));
    assert_debug_snapshot!(lines);
}

#[test]
fn a_repository_cadence_overrides_the_default_within_bounds() {
    let clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    repo.observe(clock.now_ms, &listing(&[("img-1", 0)]));
    assert!(matches!(
        repo.set_cadence(1_000),
        Err(RepoError::CadenceOutOfRange { .. })
    ));
    assert_eq!(
        repo.cadence_ms(),
        DEFAULT_CADENCE_MS,
        "a refused setting changes nothing"
    );
    repo.set_cadence(10 * MIN).unwrap();
    assert_eq!(repo.next_alarm_ms(clock.now_ms), T0 + 10 * MIN);
    assert_eq!(repo.summary(clock.now_ms).cadence_ms, 10 * MIN);
    // The deployment's default (`IMAGE_CADENCE_MS`) applies to repositories without their own.
    let other = RepoState::new("demo/other", 5 * MIN);
    assert_eq!(other.cadence_ms(), 5 * MIN);
}

#[test]
fn a_provider_without_images_is_a_clear_state_asked_once_a_cadence() {
    let mut clock = Clock::new();
    let mut repo = RepoState::new("demo/hello", DEFAULT_CADENCE_MS);
    let mut lines = Vec::new();
    for _ in 0..3 {
        let now = clock.now_ms;
        assert!(repo.build_due(now));
        repo.start_build(now);
        repo.build_unsupported(now);
        lines.push(line("404", &repo, now));
        clock.set(repo.next_alarm_ms(now));
    }
    let now = clock.now_ms;
    assert_eq!(repo.failures, 0, "not a failure of the repository's setup");
    assert_eq!(
        repo.session_notice(now),
        None,
        "no image is not worth a notice in every session"
    );
    lines.push(repo.warning(now).unwrap().message);
    assert_debug_snapshot!(lines);
}

#[test]
fn warm_ups_are_limited_per_caller_and_the_target_follows_demand() {
    let mut clock = Clock::new();
    let mut ledger = WarmLedger::default();
    let mut lines = Vec::new();
    let mut ask = |ledger: &mut WarmLedger, caller: &str, now: u64| {
        let decision = ledger.request(caller, now);
        lines.push(format!("{} {caller}: {decision:?}", rel(now)));
        decision
    };
    assert_eq!(
        ask(&mut ledger, "session:a", clock.now_ms),
        WarmDecision::Send { target: 1 }
    );
    // More typing in the same session within the interval sends nothing.
    ask(&mut ledger, "session:a", clock.advance(1_000));
    ask(&mut ledger, "session:a", clock.advance(29_000));
    // Another session typing at the same time raises the target.
    assert_eq!(
        ask(&mut ledger, "session:b", clock.advance(10_000)),
        WarmDecision::Send { target: 2 }
    );
    // Session a may ask again once the interval has passed.
    assert_eq!(
        ask(&mut ledger, "session:a", clock.set(T0 + WARM_INTERVAL_MS)),
        WarmDecision::Send { target: 2 }
    );
    // Many callers: the target is bounded.
    for i in 0..6 {
        ask(&mut ledger, &format!("user:u{i}"), clock.advance(1_000));
    }
    // Long after, demand has passed: back to one.
    let later = clock.advance(WARM_DEMAND_WINDOW_MS);
    assert_eq!(
        ask(&mut ledger, "session:a", later),
        WarmDecision::Send { target: 1 }
    );
    assert!(ledger.requests.len() == 1, "old callers are forgotten");
    assert!(lines
        .iter()
        .all(|l| !l.contains(&format!("target: {}", MAX_POOL_TARGET + 1))));
    assert_debug_snapshot!(lines);
}

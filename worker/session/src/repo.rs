//! The rules of one repository: when to build a new image, how long to back off after a failed build,
//! when an image counts as stale, and how often a session may ask for a warm-up.
//!
//! Plain data in, decisions out: the `RepoObject` in the Worker loads a [`RepoState`] from its SQLite,
//! calls these methods with `now_ms`, persists the result and arms its one alarm for
//! [`RepoState::next_alarm_ms`]. Nothing here reads a clock or does I/O.

use nightshift_protocol::http::{
    BuildStatus, RepoBuild, RepoImage, RepoSummary, RepoWarm, RepoWarning, RepoWarningKind,
    WarmOutcome,
};
use nightshift_protocol::provider::{ImageInfo, ImageList, ImageStatus};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// A new image every this often, unless the repository or the Worker (`IMAGE_CADENCE_MS`) says otherwise.
pub const DEFAULT_CADENCE_MS: u64 = 30 * MINUTE_MS;
/// The shortest cadence a person may set for a repository.
pub const MIN_CADENCE_MS: u64 = MINUTE_MS;
/// The longest cadence a person may set for a repository.
pub const MAX_CADENCE_MS: u64 = 7 * 24 * HOUR_MS;
/// The first retry after a failed build waits this long; each further failure doubles it, up to the cadence.
pub const RETRY_BASE_MS: u64 = MINUTE_MS;
/// An image older than this many cadences is stale.
pub const STALE_AFTER_CADENCES: u64 = 2;
/// A running build is polled this often during its first minute…
pub const BUILD_POLL_FAST_MS: u64 = 5 * SECOND_MS;
/// …and this often afterwards.
pub const BUILD_POLL_SLOW_MS: u64 = 30 * SECOND_MS;
/// A build not finished after this long counts as failed.
pub const BUILD_TIMEOUT_MS: u64 = 30 * MINUTE_MS;
/// One warm-up per caller (a session, or a person on the HTTP route) per this long.
pub const WARM_INTERVAL_MS: u64 = 60 * SECOND_MS;
/// Callers that asked for a warm-up within this window count as concurrent demand for the pool target.
pub const WARM_DEMAND_WINDOW_MS: u64 = 10 * MINUTE_MS;
/// The largest pool target a warm-up asks for.
pub const MAX_POOL_TARGET: u32 = 4;
/// Images are built from this branch unless the repository says otherwise.
pub const DEFAULT_BASE_BRANCH: &str = "main";

/// Why a repository setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    /// The cadence is outside [`MIN_CADENCE_MS`]..=[`MAX_CADENCE_MS`].
    #[error("cadence_ms must be between {min_ms} and {max_ms}, not {cadence_ms}")]
    CadenceOutOfRange {
        /// What was asked.
        cadence_ms: u64,
        /// Lower bound.
        min_ms: u64,
        /// Upper bound.
        max_ms: u64,
    },
}

/// The newest image the provider has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Provider's image id.
    pub id: String,
    /// Commit it was built from.
    pub commit: Option<String>,
    /// When it was built (Unix ms, derived from the provider's `age_ms` when first seen).
    pub created_ms: u64,
}

/// The last image build this repository asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// Provider's build id, once it answered.
    pub id: Option<String>,
    /// Where it is.
    pub status: BuildStatus,
    /// When it was asked for.
    pub started_ms: u64,
    /// When it ended.
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The last warm-up sent to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRecord {
    /// Pool target asked for.
    pub target: u32,
    /// When.
    pub requested_ms: u64,
    /// How the provider answered.
    pub outcome: WarmOutcome,
    /// Detail of a failure.
    pub detail: Option<String>,
}

/// Everything one repository remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoState {
    /// `owner/name`.
    pub repo: String,
    /// Branch images are built from.
    pub base_branch: String,
    /// The repository's own cadence, if a person set one.
    pub cadence_override_ms: Option<u64>,
    /// The deployment's cadence (`IMAGE_CADENCE_MS` or [`DEFAULT_CADENCE_MS`]); not persisted.
    pub default_cadence_ms: u64,
    /// The newest image.
    pub image: Option<ImageRecord>,
    /// The last build.
    pub build: Option<BuildRecord>,
    /// Failed builds in a row (reset by a success).
    pub failures: u32,
    /// The last warm-up.
    pub warm: Option<WarmRecord>,
}

impl RepoState {
    /// A repository seen for the first time: no image, no build, so a build is due at once.
    pub fn new(repo: &str, default_cadence_ms: u64) -> Self {
        RepoState {
            repo: repo.to_owned(),
            base_branch: DEFAULT_BASE_BRANCH.to_owned(),
            cadence_override_ms: None,
            default_cadence_ms,
            image: None,
            build: None,
            failures: 0,
            warm: None,
        }
    }

    /// The cadence in force.
    pub fn cadence_ms(&self) -> u64 {
        self.cadence_override_ms
            .unwrap_or(self.default_cadence_ms)
            .max(1)
    }

    /// Set the repository's own cadence.
    pub fn set_cadence(&mut self, cadence_ms: u64) -> Result<(), RepoError> {
        if !(MIN_CADENCE_MS..=MAX_CADENCE_MS).contains(&cadence_ms) {
            return Err(RepoError::CadenceOutOfRange {
                cadence_ms,
                min_ms: MIN_CADENCE_MS,
                max_ms: MAX_CADENCE_MS,
            });
        }
        self.cadence_override_ms = Some(cadence_ms);
        Ok(())
    }

    /// Whether a build is running.
    pub fn building(&self) -> bool {
        self.build
            .as_ref()
            .is_some_and(|b| b.status == BuildStatus::Building)
    }

    /// When the next build is due: a cadence after the newest image (or the last successful build), and
    /// never before the backoff after a failure; `None` while a build runs.
    pub fn next_build_ms(&self) -> Option<u64> {
        let cadence_ms = self.cadence_ms();
        let fresh_until = self
            .image
            .as_ref()
            .map_or(0, |i| i.created_ms.saturating_add(cadence_ms));
        let not_before = match &self.build {
            None => 0,
            Some(build) => {
                let ended = build.finished_ms.unwrap_or(build.started_ms);
                match build.status {
                    BuildStatus::Building => return None,
                    BuildStatus::Succeeded => build.started_ms.saturating_add(cadence_ms),
                    BuildStatus::Failed => {
                        ended.saturating_add(backoff_ms(self.failures, cadence_ms))
                    }
                    // The provider cannot build images: asking again once a cadence is enough.
                    BuildStatus::Unsupported => ended.saturating_add(cadence_ms),
                }
            }
        };
        Some(fresh_until.max(not_before))
    }

    /// Whether a build should start now.
    pub fn build_due(&self, now_ms: u64) -> bool {
        self.next_build_ms().is_some_and(|due| due <= now_ms)
    }

    /// When the alarm should fire next: the next build, or the next poll of a running build (never later
    /// than its timeout). Never in the past.
    pub fn next_alarm_ms(&self, now_ms: u64) -> u64 {
        match &self.build {
            Some(build) if build.status == BuildStatus::Building => {
                let running_ms = now_ms.saturating_sub(build.started_ms);
                let poll_ms = if running_ms < MINUTE_MS {
                    BUILD_POLL_FAST_MS
                } else {
                    BUILD_POLL_SLOW_MS
                };
                now_ms
                    .saturating_add(poll_ms)
                    .min(build.started_ms.saturating_add(BUILD_TIMEOUT_MS))
                    .max(now_ms)
            }
            _ => self.next_build_ms().unwrap_or(now_ms).max(now_ms),
        }
    }

    /// Claim the right to ask for a build: `false` (and nothing changes) when one is running already.
    /// The caller then asks the provider and reports with [`Self::build_accepted`], [`Self::build_failed`]
    /// or [`Self::build_unsupported`].
    pub fn start_build(&mut self, now_ms: u64) -> bool {
        if self.building() {
            return false;
        }
        self.build = Some(BuildRecord {
            id: None,
            status: BuildStatus::Building,
            started_ms: now_ms,
            finished_ms: None,
            error: None,
        });
        true
    }

    /// The provider accepted the build; it may already say how it ended.
    pub fn build_accepted(&mut self, now_ms: u64, answer: &ImageInfo) {
        let Some(build) = self.build.as_mut() else {
            return;
        };
        build.id = Some(answer.id.clone());
        match answer.status {
            ImageStatus::Ready => {
                build.status = BuildStatus::Succeeded;
                build.finished_ms = Some(now_ms);
                self.failures = 0;
            }
            ImageStatus::Failed => {
                let error = answer
                    .error
                    .clone()
                    .unwrap_or_else(|| "the provider reported the build as failed".to_owned());
                self.build_failed(now_ms, error);
            }
            ImageStatus::Building | ImageStatus::Missing => {}
        }
    }

    /// The build failed (refused, unreachable provider, or reported failed): back off.
    pub fn build_failed(&mut self, now_ms: u64, error: String) {
        let started_ms = self.build.as_ref().map_or(now_ms, |b| b.started_ms);
        let id = self.build.as_ref().and_then(|b| b.id.clone());
        self.build = Some(BuildRecord {
            id,
            status: BuildStatus::Failed,
            started_ms,
            finished_ms: Some(now_ms),
            error: Some(error),
        });
        self.failures = self.failures.saturating_add(1);
    }

    /// The provider does not build images (it answered `404` to `POST /v1/images`): a clear state, asked
    /// again a cadence later, not a failure of the repository's setup.
    pub fn build_unsupported(&mut self, now_ms: u64) {
        let started_ms = self.build.as_ref().map_or(now_ms, |b| b.started_ms);
        self.build = Some(BuildRecord {
            id: None,
            status: BuildStatus::Unsupported,
            started_ms,
            finished_ms: Some(now_ms),
            error: Some(
                "the provider does not build images yet (POST /v1/images answered 404)".to_owned(),
            ),
        });
    }

    /// Take in the provider's list of images: the newest ready one becomes the image, and a running build
    /// ends when its image appears (success) or the provider's latest failure is it (failure).
    pub fn observe(&mut self, now_ms: u64, list: &ImageList) {
        let ready: Vec<&ImageInfo> = list
            .images
            .iter()
            .filter(|i| i.status == ImageStatus::Ready)
            .collect();
        match ready.iter().min_by_key(|i| i.age_ms) {
            Some(newest) => {
                let known = self.image.as_ref().is_some_and(|i| i.id == newest.id);
                if !known {
                    self.image = Some(ImageRecord {
                        id: newest.id.clone(),
                        commit: Some(newest.commit.clone()).filter(|c| !c.is_empty()),
                        created_ms: now_ms.saturating_sub(newest.age_ms),
                    });
                }
            }
            // The provider's list is the truth: an image it dropped is gone.
            None => self.image = None,
        }
        let Some(build) = self.build.as_mut() else {
            return;
        };
        if build.status != BuildStatus::Building {
            return;
        }
        let ours = |id: Option<&str>, age_ms: Option<u64>| {
            let same_id = id.is_some() && id == build.id.as_deref();
            let since_start =
                age_ms.is_some_and(|age| now_ms.saturating_sub(age) >= build.started_ms);
            same_id || since_start
        };
        if ready.iter().any(|i| ours(Some(&i.id), Some(i.age_ms))) {
            build.status = BuildStatus::Succeeded;
            build.finished_ms = Some(now_ms);
            build.error = None;
            self.failures = 0;
        } else if let Some(failure) = list
            .latest_failure
            .as_ref()
            .filter(|f| ours(Some(&f.id), Some(f.age_ms)))
        {
            let error = match failure.error.as_deref().map(str::trim) {
                Some(error) if !error.is_empty() => error.to_owned(),
                _ => "the provider reported the build as failed".to_owned(),
            };
            self.build_failed(now_ms, error);
        }
    }

    /// A build running for longer than [`BUILD_TIMEOUT_MS`] counts as failed; `true` when that happened.
    pub fn expire_build(&mut self, now_ms: u64) -> bool {
        let expired = self.build.as_ref().is_some_and(|b| {
            b.status == BuildStatus::Building
                && now_ms >= b.started_ms.saturating_add(BUILD_TIMEOUT_MS)
        });
        if expired {
            self.build_failed(
                now_ms,
                format!(
                    "the build did not finish within {}",
                    human_duration(BUILD_TIMEOUT_MS)
                ),
            );
        }
        expired
    }

    /// What people should know about this repository now, most serious first: a failed last build, a
    /// stale image (older than [`STALE_AFTER_CADENCES`] cadences), no image at all.
    pub fn warning(&self, now_ms: u64) -> Option<RepoWarning> {
        let repo = &self.repo;
        if let Some(build) = self
            .build
            .as_ref()
            .filter(|b| b.status == BuildStatus::Failed)
        {
            let error = build.error.as_deref().unwrap_or("no detail");
            return Some(RepoWarning {
                kind: RepoWarningKind::BuildFailed,
                message: format!("The last image build of {repo} failed: {error}"),
            });
        }
        let cadence_ms = self.cadence_ms();
        match &self.image {
            Some(image) => {
                let age_ms = now_ms.saturating_sub(image.created_ms);
                (age_ms > cadence_ms.saturating_mul(STALE_AFTER_CADENCES)).then(|| RepoWarning {
                    kind: RepoWarningKind::Stale,
                    message: format!(
                        "The image of {repo} is {} old (cadence {}): the first sync may take longer.",
                        human_duration(age_ms),
                        human_duration(cadence_ms)
                    ),
                })
            }
            None => {
                let message = match self.build.as_ref().map(|b| b.status) {
                    Some(BuildStatus::Building) => {
                        format!("The first image of {repo} is being built: until it is ready, sessions start from a fresh clone.")
                    }
                    Some(BuildStatus::Unsupported) => format!(
                        "The sandbox provider cannot build images yet (it answered 404): sessions on {repo} start from a fresh clone."
                    ),
                    _ => format!("{repo} has no image yet: sessions start from a fresh clone."),
                };
                Some(RepoWarning {
                    kind: RepoWarningKind::NoImage,
                    message,
                })
            }
        }
    }

    /// The `notice` a session created now should log: a stale image or a failed build, not a missing image
    /// (that is the normal state of a new repository and of a provider without images).
    pub fn session_notice(&self, now_ms: u64) -> Option<String> {
        self.warning(now_ms)
            .filter(|w| {
                matches!(
                    w.kind,
                    RepoWarningKind::Stale | RepoWarningKind::BuildFailed
                )
            })
            .map(|w| w.message)
    }

    /// The repository as `GET /api/repos` shows it.
    pub fn summary(&self, now_ms: u64) -> RepoSummary {
        RepoSummary {
            repo: self.repo.clone(),
            base_branch: self.base_branch.clone(),
            image: self.image.as_ref().map(|i| RepoImage {
                id: i.id.clone(),
                commit: i.commit.clone(),
                age_ms: now_ms.saturating_sub(i.created_ms),
            }),
            building: self.building(),
            warning: self.warning(now_ms),
            cadence_ms: self.cadence_ms(),
            last_build: self.build.as_ref().map(|b| RepoBuild {
                id: b.id.clone(),
                status: b.status,
                started_ms: b.started_ms,
                finished_ms: b.finished_ms,
                error: b.error.clone(),
            }),
            next_build_ms: self.next_build_ms(),
            warm: self.warm.as_ref().map(|w| RepoWarm {
                target: w.target,
                requested_ms: w.requested_ms,
                outcome: w.outcome,
                detail: w.detail.clone(),
            }),
        }
    }
}

/// How long to wait after the `failures`-th failed build in a row: 1 min, 2 min, 4 min… never more than
/// the cadence.
pub fn backoff_ms(failures: u32, cadence_ms: u64) -> u64 {
    let doublings = failures.saturating_sub(1).min(32);
    RETRY_BASE_MS
        .saturating_mul(1u64 << doublings)
        .min(cadence_ms)
}

/// Whether a caller that last asked for a warm-up at `last_ms` may ask again at `now_ms`.
pub fn warm_allowed(last_ms: Option<u64>, now_ms: u64) -> bool {
    last_ms.is_none_or(|last| now_ms.saturating_sub(last) >= WARM_INTERVAL_MS)
}

/// What to do with a warm-up request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmDecision {
    /// Ask the provider to keep `target` sandboxes ready.
    Send {
        /// Pool target.
        target: u32,
    },
    /// This caller asked less than [`WARM_INTERVAL_MS`] ago; its earlier request stands.
    TooSoon {
        /// How long until it may ask again.
        retry_after_ms: u64,
    },
}

/// Who asked for a warm-up and when, per caller (`session:{id}` for typing, `user:{login}` for the HTTP
/// route). The pool target is the number of callers that asked within [`WARM_DEMAND_WINDOW_MS`] (each
/// may claim a sandbox soon), between 1 and [`MAX_POOL_TARGET`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmLedger {
    /// `(caller, last request ms)`, one entry per caller.
    pub requests: Vec<(String, u64)>,
}

impl WarmLedger {
    /// Decide on `caller`'s request at `now_ms`; when it is sent, it is recorded.
    pub fn request(&mut self, caller: &str, now_ms: u64) -> WarmDecision {
        let last_ms = self
            .requests
            .iter()
            .find(|(key, _)| key == caller)
            .map(|(_, ms)| *ms);
        if !warm_allowed(last_ms, now_ms) {
            let waited_ms = now_ms.saturating_sub(last_ms.unwrap_or(now_ms));
            return WarmDecision::TooSoon {
                retry_after_ms: WARM_INTERVAL_MS.saturating_sub(waited_ms),
            };
        }
        self.requests.retain(|(key, _)| key != caller);
        self.requests.push((caller.to_owned(), now_ms));
        self.prune(now_ms);
        let demand = self.requests.len();
        let target = u32::try_from(demand)
            .unwrap_or(MAX_POOL_TARGET)
            .clamp(1, MAX_POOL_TARGET);
        WarmDecision::Send { target }
    }

    /// Forget callers whose last request is older than the demand window.
    pub fn prune(&mut self, now_ms: u64) {
        self.requests
            .retain(|(_, ms)| now_ms.saturating_sub(*ms) < WARM_DEMAND_WINDOW_MS);
    }
}

/// `45 s`, `75 min`, `5 h`, `3 days`: durations as people read them in a notice.
pub fn human_duration(ms: u64) -> String {
    if ms < 2 * MINUTE_MS {
        format!("{} s", ms / SECOND_MS)
    } else if ms < 3 * HOUR_MS {
        format!("{} min", ms / MINUTE_MS)
    } else if ms < 48 * HOUR_MS {
        format!("{} h", ms / HOUR_MS)
    } else {
        format!("{} days", ms / (24 * HOUR_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute_up_to_the_cadence() {
        let cadence = DEFAULT_CADENCE_MS;
        let waits: Vec<u64> = (1..=7)
            .map(|f| backoff_ms(f, cadence) / MINUTE_MS)
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff_ms(u32::MAX, cadence), cadence);
        assert_eq!(backoff_ms(0, cadence), RETRY_BASE_MS);
    }

    #[test]
    fn durations_read_as_people_say_them() {
        let cases = [
            (45 * SECOND_MS, "45 s"),
            (75 * MINUTE_MS, "75 min"),
            (5 * HOUR_MS, "5 h"),
            (72 * HOUR_MS, "3 days"),
        ];
        for (ms, text) in cases {
            assert_eq!(human_duration(ms), text);
        }
    }
}

//! Warm pools: per repository, sandboxes prepared ahead of any prompt (overlay mounted on the latest
//! image, caught up with the base branch), handed to a session in one step.
//!
//! This module is the bookkeeping, generic over what a warm entry is: the queue of ready entries, the
//! number being prepared, and the target the pool refills to. The target follows demand: the claims of
//! the recent window (plus one, so the next claim finds one ready), floored by explicit requests (a
//! `POST /v1/pools/{repo}` or a warm-up on typing, which count as demand for `request_ttl_ms`), within
//! `min..=max`. It follows demand both ways: claims raise it at once ([`RepoPool::plan_refill`]); when
//! they fade — a claim leaves the window, a request expires — it falls, and [`RepoPool::shrink`] hands
//! out the ready entries above it (oldest first) for release, down to `min`. The shell
//! ([`super::warm`]) runs the shrink every [`PoolConfig::tick_ms`], so a surplus entry lives at most
//! one window (or request) plus one tick after the demand that asked for it.
//!
//! The entries of an isolated host are [`super::warm::WarmSandbox`]es; [`super::warm`] prepares,
//! claims, retires and releases them, and serves `POST /v1/pools/{repo}` and `GET /v1/pools`.
//!
//! Invariant: a repository's pool is only touched under its own lock ([`Pools::repo`]), so two claims
//! never get the same entry and refills never over-provision: `ready + preparing` never exceeds the
//! target when the refill is planned.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Default [`PoolConfig::window_ms`] and [`PoolConfig::request_ttl_ms`]: 10 minutes.
pub const DEFAULT_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Shortest pause between two looks at fading demand.
const MIN_TICK_MS: u64 = 50;
/// Longest pause between two looks at fading demand.
const MAX_TICK_MS: u64 = 30 * 1000;

/// Bounds and horizon of every pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Fewest ready entries a pool with any demand keeps.
    pub min: usize,
    /// Most entries a pool keeps (ready plus being prepared).
    pub max: usize,
    /// How far back claims count as demand.
    pub window_ms: u64,
    /// How long an explicit request (`POST /v1/pools/{repo}`, warm-on-typing) holds its floor.
    pub request_ttl_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min: 0,
            max: 8,
            window_ms: DEFAULT_WINDOW_MS,
            request_ttl_ms: DEFAULT_WINDOW_MS,
        }
    }
}

impl PoolConfig {
    /// How often the shell should look for fading demand: a tenth of the shorter horizon, within
    /// 50 ms … 30 s.
    pub fn tick_ms(&self) -> u64 {
        (self.window_ms.min(self.request_ttl_ms) / 10).clamp(MIN_TICK_MS, MAX_TICK_MS)
    }
}

/// One repository's pool.
#[derive(Debug)]
pub struct RepoPool<E> {
    /// Entries ready to hand out, oldest first.
    ready: VecDeque<E>,
    /// Entries being prepared now.
    preparing: usize,
    /// When recent claims happened.
    claims_ms: VecDeque<u64>,
    /// An explicit floor and when it expires.
    requested: Option<(usize, u64)>,
}

impl<E> Default for RepoPool<E> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            preparing: 0,
            claims_ms: VecDeque::new(),
            requested: None,
        }
    }
}

/// What a pool looks like, for `GET /v1/pools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// Ready entries.
    pub ready: usize,
    /// Entries being prepared.
    pub preparing: usize,
    /// What the pool refills to now.
    pub target: usize,
    /// Claims in the recent window.
    pub recent_claims: usize,
}

impl<E> RepoPool<E> {
    fn forget_old(&mut self, config: &PoolConfig, now_ms: u64) {
        while self
            .claims_ms
            .front()
            .is_some_and(|at| now_ms.saturating_sub(*at) > config.window_ms)
        {
            self.claims_ms.pop_front();
        }
        if self.requested.is_some_and(|(_, until)| until <= now_ms) {
            self.requested = None;
        }
    }

    /// The target: recent claims plus one when there is any demand, floored by an explicit request,
    /// within the bounds.
    pub fn target(&mut self, config: &PoolConfig, now_ms: u64) -> usize {
        self.forget_old(config, now_ms);
        let from_demand = if self.claims_ms.is_empty() {
            0
        } else {
            self.claims_ms.len() + 1
        };
        let floor = self.requested.map_or(0, |(n, _)| n);
        from_demand.max(floor).max(config.min).min(config.max)
    }

    /// Hand out the oldest ready entry (and count the claim as demand, ready or not).
    pub fn claim(&mut self, config: &PoolConfig, now_ms: u64) -> Option<E> {
        self.forget_old(config, now_ms);
        self.claims_ms.push_back(now_ms);
        self.ready.pop_front()
    }

    /// Ask for at least `target` entries for the next `request_ttl_ms`.
    pub fn request(&mut self, config: &PoolConfig, target: usize, now_ms: u64) {
        self.forget_old(config, now_ms);
        let target = target.min(config.max);
        let floor = self.requested.map_or(0, |(n, _)| n).max(target);
        self.requested = Some((floor, now_ms.saturating_add(config.request_ttl_ms)));
    }

    /// How many entries to start preparing now (counted as preparing from here on).
    pub fn plan_refill(&mut self, config: &PoolConfig, now_ms: u64) -> usize {
        let target = self.target(config, now_ms);
        let have = self.ready.len() + self.preparing;
        let start = target.saturating_sub(have);
        self.preparing += start;
        start
    }

    /// A prepared entry is ready; `None` when its preparation failed.
    pub fn prepared(&mut self, entry: Option<E>) {
        self.preparing = self.preparing.saturating_sub(1);
        if let Some(entry) = entry {
            self.ready.push_back(entry);
        }
    }

    /// Take out every ready entry `keep` refuses (e.g. those of an older image), for teardown.
    pub fn retire(&mut self, mut keep: impl FnMut(&E) -> bool) -> Vec<E> {
        let (kept, retired): (VecDeque<E>, VecDeque<E>) =
            self.ready.drain(..).partition(|entry| keep(entry));
        self.ready = kept;
        retired.into()
    }

    /// Ready entries above the target (counting those being prepared), oldest first, taken out for
    /// teardown when demand fell.
    pub fn shrink(&mut self, config: &PoolConfig, now_ms: u64) -> Vec<E> {
        let target = self.target(config, now_ms);
        let mut extra = Vec::new();
        while self.ready.len() + self.preparing > target {
            match self.ready.pop_front() {
                Some(entry) => extra.push(entry),
                None => break,
            }
        }
        extra
    }

    /// Take every ready entry (host shutdown).
    pub fn drain(&mut self) -> Vec<E> {
        self.ready.drain(..).collect()
    }

    /// The pool's numbers now.
    pub fn counts(&mut self, config: &PoolConfig, now_ms: u64) -> PoolCounts {
        let target = self.target(config, now_ms);
        PoolCounts {
            ready: self.ready.len(),
            preparing: self.preparing,
            target,
            recent_claims: self.claims_ms.len(),
        }
    }
}

/// Every repository's pool, each behind its own async lock so claims on one repository are serialised
/// and other repositories are not held up.
#[derive(Debug)]
pub struct Pools<E> {
    config: PoolConfig,
    repos: Mutex<HashMap<String, Arc<tokio::sync::Mutex<RepoPool<E>>>>>,
}

impl<E> Pools<E> {
    /// No pools yet.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            repos: Mutex::new(HashMap::new()),
        }
    }

    /// The bounds.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The pool of `repo` (created empty on first use); lock it for any change.
    pub fn repo(&self, repo: &str) -> Arc<tokio::sync::Mutex<RepoPool<E>>> {
        let mut repos = match self.repos.lock() {
            Ok(repos) => repos,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(repos.entry(repo.to_owned()).or_default())
    }

    /// Every repository with a pool.
    pub fn repos(&self) -> Vec<String> {
        let repos = match self.repos.lock() {
            Ok(repos) => repos,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut names: Vec<String> = repos.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const CONFIG: PoolConfig = PoolConfig {
        min: 0,
        max: 5,
        window_ms: 1_000,
        request_ttl_ms: 500,
    };

    #[test]
    fn the_target_follows_claims_within_bounds() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        assert_eq!(pool.target(&CONFIG, 0), 0, "no demand, no pool");
        pool.claim(&CONFIG, 10);
        assert_eq!(
            pool.target(&CONFIG, 10),
            2,
            "one claim: keep one more ready than that"
        );
        for at in 11..20 {
            pool.claim(&CONFIG, at);
        }
        assert_eq!(pool.target(&CONFIG, 20), 5, "capped at max");
        assert_eq!(
            pool.target(&CONFIG, 2_000),
            0,
            "demand fades after the window"
        );
        let floored = PoolConfig { min: 1, ..CONFIG };
        assert_eq!(pool.target(&floored, 2_000), 1);
    }

    #[test]
    fn requests_hold_a_floor_until_they_expire() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        pool.request(&CONFIG, 1, 0);
        assert_eq!(pool.target(&CONFIG, 100), 1);
        pool.request(&CONFIG, 9, 100);
        assert_eq!(pool.target(&CONFIG, 200), 5, "capped at max");
        assert_eq!(pool.target(&CONFIG, 700), 0, "expired");
    }

    #[test]
    fn refills_never_over_provision() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        pool.request(&CONFIG, 3, 0);
        assert_eq!(pool.plan_refill(&CONFIG, 0), 3);
        assert_eq!(
            pool.plan_refill(&CONFIG, 0),
            0,
            "three already being prepared"
        );
        pool.prepared(Some(1));
        pool.prepared(None);
        assert_eq!(
            pool.plan_refill(&CONFIG, 0),
            1,
            "the failed one is prepared again"
        );
        let counts = pool.counts(&CONFIG, 0);
        assert_eq!((counts.ready, counts.preparing, counts.target), (1, 2, 3));
    }

    #[test]
    fn retire_and_shrink_take_entries_out() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        pool.request(&CONFIG, 4, 0);
        pool.plan_refill(&CONFIG, 0);
        for image in [1, 1, 2, 2] {
            pool.prepared(Some(image));
        }
        assert_eq!(pool.retire(|image| *image == 2), vec![1, 1]);
        assert_eq!(pool.counts(&CONFIG, 0).ready, 2);
        assert_eq!(
            pool.shrink(&CONFIG, 1_000),
            vec![2, 2],
            "the request expired"
        );
    }

    /// A fake clock's worth of demand: a request, claims, then silence. The pool rises with demand
    /// at once and gives back its surplus only after the request's ttl and the claims' window pass.
    #[test]
    fn the_pool_shrinks_when_demand_fades_and_not_before() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        let mut next = 0u32;
        let mut fill = |pool: &mut RepoPool<u32>, now_ms: u64| {
            for _ in 0..pool.plan_refill(&CONFIG, now_ms) {
                next += 1;
                pool.prepared(Some(next));
            }
        };
        pool.request(&CONFIG, 4, 0);
        fill(&mut pool, 0);
        assert_eq!(pool.counts(&CONFIG, 0).ready, 4);
        // Two claims while the request holds: the pool refills to 4.
        assert_eq!(pool.claim(&CONFIG, 100), Some(1));
        assert_eq!(pool.claim(&CONFIG, 200), Some(2));
        fill(&mut pool, 200);
        assert_eq!(pool.counts(&CONFIG, 200).ready, 4);
        assert!(
            pool.shrink(&CONFIG, 499).is_empty(),
            "the request still holds"
        );
        // The request expired (ttl 500); two claims in the window: target 3, one surplus, the oldest.
        assert_eq!(pool.target(&CONFIG, 500), 3);
        assert_eq!(pool.shrink(&CONFIG, 500), vec![3]);
        assert!(
            pool.shrink(&CONFIG, 1_100).is_empty(),
            "the first claim is still in the window (1 000 ms)"
        );
        // The first claim left the window: target 2.
        assert_eq!(pool.shrink(&CONFIG, 1_101), vec![4]);
        // The second too: no demand, down to the minimum (0 here, 1 with a floor).
        let floored = PoolConfig { min: 1, ..CONFIG };
        assert_eq!(pool.shrink(&floored, 1_201), vec![5]);
        assert_eq!(pool.counts(&floored, 1_201).ready, 1);
        assert_eq!(pool.shrink(&CONFIG, 1_201), vec![6]);
        let counts = pool.counts(&CONFIG, 1_201);
        assert_eq!(
            (counts.ready, counts.target, counts.recent_claims),
            (0, 0, 0)
        );
        // Demand comes back: the pool follows it up again.
        pool.claim(&CONFIG, 2_000);
        fill(&mut pool, 2_000);
        assert_eq!(pool.counts(&CONFIG, 2_000).ready, 2);
        assert!(pool.shrink(&CONFIG, 2_500).is_empty());
    }

    #[test]
    fn shrinking_counts_entries_being_prepared_and_never_takes_them() {
        let mut pool: RepoPool<u32> = RepoPool::default();
        pool.request(&CONFIG, 3, 0);
        assert_eq!(pool.plan_refill(&CONFIG, 0), 3);
        pool.prepared(Some(1));
        // Two still preparing, the request gone: the one ready entry is the surplus.
        assert_eq!(pool.shrink(&CONFIG, 600), vec![1]);
        assert_eq!(pool.counts(&CONFIG, 600).preparing, 2);
        assert!(
            pool.shrink(&CONFIG, 600).is_empty(),
            "nothing ready to take"
        );
    }

    #[test]
    fn the_tick_is_a_tenth_of_the_horizon_within_bounds() {
        assert_eq!(CONFIG.tick_ms(), 50, "a tenth of 500 ms");
        assert_eq!(PoolConfig::default().tick_ms(), 30_000);
        let short = PoolConfig {
            window_ms: 100,
            request_ttl_ms: 100,
            ..CONFIG
        };
        assert_eq!(short.tick_ms(), 50);
        let medium = PoolConfig {
            window_ms: 20_000,
            request_ttl_ms: 60_000,
            ..CONFIG
        };
        assert_eq!(medium.tick_ms(), 2_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_concurrent_claims_on_five_never_share_an_entry() {
        let pools: Arc<Pools<u32>> = Arc::new(Pools::new(PoolConfig { max: 8, ..CONFIG }));
        {
            let pool = pools.repo("demo/hello");
            let mut pool = pool.lock().await;
            pool.request(&CONFIG, 5, 0);
            let start = pool.plan_refill(&CONFIG, 0);
            for id in 0..start {
                pool.prepared(Some(u32::try_from(id).unwrap()));
            }
        }
        let claims = (0..20).map(|_| {
            let pools = Arc::clone(&pools);
            tokio::spawn(async move {
                let pool = pools.repo("demo/hello");
                let mut pool = pool.lock().await;
                pool.claim(&CONFIG, 1)
            })
        });
        let mut got = Vec::new();
        for claim in claims {
            got.push(claim.await.unwrap());
        }
        let warm: Vec<u32> = got.iter().flatten().copied().collect();
        assert_eq!(warm.len(), 5, "five warm, fifteen cold: {got:?}");
        assert_eq!(
            warm.iter().collect::<HashSet<_>>().len(),
            5,
            "no entry twice"
        );
    }
}

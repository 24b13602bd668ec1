//! `RepoObject`: one Durable Object per repository (named `owner/name`). It keeps the repository's image
//! cadence, its last image and build, and who asked for warm-ups, in its own SQLite; it arms one alarm for
//! the next thing due (a build, a retry after a failure, or a poll of a running build) and on that alarm
//! asks the provider (`GET /v1/images`, then `POST /v1/images` when a build is due). Warm-ups become
//! `POST /v1/pools/{repo} {target}` in the background. Decisions are `nightshift_session::repo`'s.
//!
//! One more instance, named [`config::REPO_REGISTRY`], is the registry: the list of repositories, so
//! `GET /api/repos` can enumerate them. Each repository object adds itself there once.
//!
//! State is read and written in synchronous steps (SQLite calls do not yield); across an `await` on the
//! provider the state is read again before the answer is applied, so concurrent requests never undo one
//! another, and a build is claimed ([`RepoState::start_build`]) before it is asked for, so there is at most one.

use nightshift_protocol::http::{
    BuildStatus, RepoSettingsRequest, RepoSummary, WarmOutcome, WarmResponse,
};
use nightshift_protocol::provider::ImageRequest;
use nightshift_protocol::ErrorCode;
use nightshift_session::repo::{
    BuildRecord, ImageRecord, RepoState, WarmDecision, WarmLedger, WarmRecord,
};
use nightshift_session::StoreError;
use worker::{
    durable_object, Date, DurableObject, Env, Headers, Method, Request, RequestInit, Response,
    SqlStorage, SqlStorageValue, State, Stub,
};

use crate::config;
use crate::error::{internal_json, json_response, parse_body, AppError};
use crate::provider::{Provider, ProviderError};
use crate::sql_store::{enum_from, enum_name, exec, int, migrate_with, rows};

/// Schema migrations of a repository object, applied in order; never edit an applied entry: append.
const MIGRATIONS: &[&str] = &[
    // v1: the repository, its warm-up ledger, and (in the registry instance only) the list of repositories.
    "CREATE TABLE IF NOT EXISTS repo (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        repo TEXT NOT NULL,
        base_branch TEXT NOT NULL,
        cadence_ms INTEGER,
        image_id TEXT,
        image_commit TEXT,
        image_created_ms INTEGER,
        build_id TEXT,
        build_status TEXT,
        build_started_ms INTEGER,
        build_finished_ms INTEGER,
        build_error TEXT,
        failures INTEGER NOT NULL,
        warm_target INTEGER,
        warm_requested_ms INTEGER,
        warm_outcome TEXT,
        warm_detail TEXT,
        next_alarm_ms INTEGER,
        registered INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS warmups (
        caller TEXT PRIMARY KEY,
        last_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS registry (
        repo TEXT PRIMARY KEY,
        added_ms INTEGER NOT NULL
    );",
];

/// The longest error text kept from a failed build.
const MAX_ERROR_CHARS: usize = 2_000;

/// What the Worker and the `SessionObject` send a repository object (an internal body, not the contract).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepoCall {
    /// Repository, `owner/name` (validated by the caller).
    pub repo: String,
    /// For `/warm`: who asks (`session:{id}` or `user:{login}`), the key of the rate limit.
    #[serde(default)]
    pub caller: Option<String>,
    /// For `/settings`.
    #[serde(default)]
    pub settings: Option<RepoSettingsRequest>,
}

/// The answer to `/register`: the repository and the `notice` a new session on it should log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Registered {
    /// The repository now.
    pub summary: RepoSummary,
    /// Text of a `warn` notice for the session (stale image, failed build), if any.
    pub session_notice: Option<String>,
}

/// The repository Durable Object.
#[durable_object]
pub struct RepoObject {
    state: State,
    env: Env,
}

impl DurableObject for RepoObject {
    fn new(state: State, env: Env) -> Self {
        if let Err(e) = migrate_with(&state.storage().sql(), MIGRATIONS) {
            worker::console_error!("repository schema migration failed: {e}");
        }
        RepoObject { state, env }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(match self.serve(req).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        })
    }

    async fn alarm(&self) -> worker::Result<Response> {
        if let Err(e) = self.on_alarm().await {
            worker::console_error!("repository alarm failed: {e:?}");
            // Never leave the object without an alarm: try again in a minute.
            if let Err(e) = self.state.storage().set_alarm(60_000i64).await {
                worker::console_error!("re-arming after a failed alarm failed: {e}");
            }
        }
        Response::ok("done")
    }
}

fn now_ms() -> u64 {
    Date::now().as_millis()
}

/// A stub of the repository object called `name` (a repository, or the registry).
pub fn stub(env: &Env, name: &str) -> Result<Stub, AppError> {
    Ok(env
        .durable_object(config::REPO_BINDING)?
        .id_from_name(name)?
        .get_stub()?)
}

/// Register `repo` with its object (on first use it is listed and its image scheduled) and return the
/// object's answer: the repository now and the notice a new session on it should log.
pub async fn register(env: &Env, repo: &str) -> Result<Registered, AppError> {
    let request = internal_request(Method::Post, "/register", Some(&RepoCall::plain(repo)))?;
    let response = stub(env, repo)?.fetch_with_request(request).await?;
    internal_json(response, &format!("repository object of {repo}")).await
}

/// A request to a repository object's internal `path` with an optional JSON body.
pub fn internal_request(
    method: Method,
    path: &str,
    body: Option<&impl serde::Serialize>,
) -> Result<Request, AppError> {
    let headers = Headers::new();
    let mut init = RequestInit::new();
    if let Some(body) = body {
        headers.set("content-type", "application/json")?;
        init.with_body(Some(serde_json::to_string(body)?.into()));
    }
    init.with_method(method).with_headers(headers);
    Ok(Request::new_with_init(
        &format!("https://repo{path}"),
        &init,
    )?)
}

impl RepoObject {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    async fn serve(&self, mut req: Request) -> Result<Response, AppError> {
        let path = req.url()?.path().to_owned();
        match (req.method(), path.as_str()) {
            (Method::Get, "/summary") => {
                match load(&self.sql(), config::image_cadence_ms(&self.env))? {
                    Some(state) => Ok(json_response(&state.summary(now_ms()), 200)),
                    None => Err(AppError::client(
                        ErrorCode::NotFound,
                        "repository not known",
                    )),
                }
            }
            (Method::Post, "/register") => {
                let call: RepoCall = parse_body(&req.text().await?, 4096)?;
                let state = self.register(&call.repo).await?;
                let now = now_ms();
                Ok(json_response(
                    &Registered {
                        summary: state.summary(now),
                        session_notice: state.session_notice(now),
                    },
                    200,
                ))
            }
            (Method::Post, "/build") => {
                let call: RepoCall = parse_body(&req.text().await?, 4096)?;
                self.register(&call.repo).await?;
                self.build(true).await?;
                self.arm().await?;
                self.summary_response(202)
            }
            (Method::Post, "/warm") => {
                let call: RepoCall = parse_body(&req.text().await?, 4096)?;
                let caller = call
                    .caller
                    .ok_or_else(|| AppError::client(ErrorCode::BadRequest, "caller is required"))?;
                self.register(&call.repo).await?;
                Ok(json_response(&self.warm(&call.repo, &caller)?, 202))
            }
            (Method::Post, "/settings") => {
                let call: RepoCall = parse_body(&req.text().await?, 4096)?;
                self.register(&call.repo).await?;
                let settings = call.settings.unwrap_or_default();
                self.update(|state| -> Result<(), AppError> {
                    if let Some(cadence_ms) = settings.cadence_ms {
                        state
                            .set_cadence(cadence_ms)
                            .map_err(|e| AppError::client(ErrorCode::BadRequest, e.to_string()))?;
                    }
                    if let Some(branch) = settings.base_branch {
                        state.base_branch = branch;
                    }
                    Ok(())
                })?
                .map(|(result, _)| result)
                .transpose()?;
                self.arm().await?;
                self.summary_response(200)
            }
            (Method::Post, "/registry/add") => {
                let call: RepoCall = parse_body(&req.text().await?, 4096)?;
                exec(
                    &self.sql(),
                    "INSERT OR IGNORE INTO registry (repo, added_ms) VALUES (?, ?)",
                    vec![call.repo.as_str().into(), int(now_ms())?],
                )?;
                Ok(json_response(&serde_json::json!({"ok": true}), 200))
            }
            (Method::Get, "/registry/list") => {
                let found: Vec<RegistryRow> = rows(
                    &self.sql(),
                    "SELECT repo FROM registry ORDER BY repo",
                    vec![],
                )?;
                let repos: Vec<String> = found.into_iter().map(|r| r.repo).collect();
                Ok(json_response(&repos, 200))
            }
            _ => Err(AppError::client(ErrorCode::NotFound, "no such route")),
        }
    }

    fn summary_response(&self, status: u16) -> Result<Response, AppError> {
        let state = load(&self.sql(), config::image_cadence_ms(&self.env))?
            .ok_or_else(|| AppError::Internal("repository vanished".to_owned()))?;
        Ok(json_response(&state.summary(now_ms()), status))
    }

    /// Load, change and save the repository in one synchronous step; `None` when it is not registered.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut RepoState) -> T,
    ) -> Result<Option<(T, RepoState)>, AppError> {
        let sql = self.sql();
        let Some(mut state) = load(&sql, config::image_cadence_ms(&self.env))? else {
            return Ok(None);
        };
        let result = change(&mut state);
        save(&sql, &state)?;
        Ok(Some((result, state)))
    }

    /// Make sure this object knows `repo` (a first build is due at once) and that the registry lists it.
    async fn register(&self, repo: &str) -> Result<RepoState, AppError> {
        let sql = self.sql();
        let state = match load(&sql, config::image_cadence_ms(&self.env))? {
            Some(state) if state.repo == repo => state,
            Some(state) => {
                return Err(AppError::Internal(format!(
                    "repository object of {} was asked about {repo}",
                    state.repo
                )));
            }
            None => {
                let state = RepoState::new(repo, config::image_cadence_ms(&self.env));
                save(&sql, &state)?;
                self.arm().await?;
                state
            }
        };
        let registered: Vec<RegisteredRow> = rows(&sql, "SELECT registered FROM repo", vec![])?;
        if registered.first().is_some_and(|r| r.registered == 0) {
            // Listed once; if the registry cannot be reached now, the next call tries again.
            let request =
                internal_request(Method::Post, "/registry/add", Some(&RepoCall::plain(repo)))?;
            match stub(&self.env, config::REPO_REGISTRY)?
                .fetch_with_request(request)
                .await
            {
                Ok(response) if response.status_code() == 200 => {
                    exec(&sql, "UPDATE repo SET registered = 1", vec![])?;
                }
                Ok(response) => {
                    worker::console_error!("registry refused {repo}: {}", response.status_code())
                }
                Err(e) => worker::console_error!("registry unreachable for {repo}: {e}"),
            }
        }
        Ok(state)
    }

    /// Set the one alarm to the next thing due.
    async fn arm(&self) -> Result<(), AppError> {
        let now = now_ms();
        let Some((at_ms, _)) = self.update(|state| state.next_alarm_ms(now))? else {
            return Ok(());
        };
        exec(
            &self.sql(),
            "UPDATE repo SET next_alarm_ms = ?",
            vec![int(at_ms)?],
        )?;
        let offset_ms = i64::try_from(at_ms.saturating_sub(now)).unwrap_or(i64::MAX);
        self.state.storage().set_alarm(offset_ms).await?;
        Ok(())
    }

    /// The alarm: learn what the provider has, end or time out a running build, start one if due, re-arm.
    async fn on_alarm(&self) -> Result<(), AppError> {
        let Some(state) = load(&self.sql(), config::image_cadence_ms(&self.env))? else {
            // The registry, or an object that never registered: nothing is due.
            return Ok(());
        };
        match Provider::from_env(&self.env) {
            Ok(provider) => match provider.list_images(&state.repo).await {
                Ok(list) => {
                    let now = now_ms();
                    self.update(|state| state.observe(now, &list))?;
                }
                // No image routes: `POST /v1/images` says so and is recorded below.
                Err(ProviderError::Unsupported { .. }) => {}
                Err(e) => worker::console_log!("listing the images of {} failed: {e}", state.repo),
            },
            Err(e) => worker::console_error!("cannot ask the provider about {}: {e}", state.repo),
        }
        let now = now_ms();
        if let Some((true, state)) = self.update(|state| state.expire_build(now))? {
            worker::console_error!("the image build of {} timed out", state.repo);
        }
        self.build(false).await?;
        self.arm().await
    }

    /// Ask the provider for a build when one is due (or `force`d by a person), unless one is running.
    async fn build(&self, force: bool) -> Result<(), AppError> {
        let now = now_ms();
        let claimed =
            self.update(|state| (force || state.build_due(now)) && state.start_build(now))?;
        let Some((true, state)) = claimed else {
            return Ok(());
        };
        let request = ImageRequest {
            repo: state.repo.clone(),
            git_ref: Some(state.base_branch.clone()),
            setup: None,
        };
        let outcome = match Provider::from_env(&self.env) {
            Ok(provider) => provider.create_image(&request).await,
            Err(e) => Err(e),
        };
        let now = now_ms();
        self.update(|state| match &outcome {
            Ok(answer) => state.build_accepted(now, answer),
            Err(ProviderError::Unsupported { .. }) => state.build_unsupported(now),
            Err(e) => {
                state.build_failed(now, e.to_string().chars().take(MAX_ERROR_CHARS).collect())
            }
        })?;
        match outcome {
            Ok(answer) => worker::console_log!(
                "image build {} of {} accepted ({:?})",
                answer.id,
                state.repo,
                answer.status
            ),
            Err(ProviderError::Unsupported { .. }) => {
                worker::console_log!(
                    "the provider does not build images yet; {} has none",
                    state.repo
                );
            }
            Err(e) => worker::console_error!("image build of {} failed: {e}", state.repo),
        }
        Ok(())
    }

    /// Decide on a warm-up (one per caller per interval) and, when it goes ahead, send the pool target
    /// in the background: the answer does not wait for the provider.
    fn warm(&self, repo: &str, caller: &str) -> Result<WarmResponse, AppError> {
        let sql = self.sql();
        let now = now_ms();
        let found: Vec<WarmupRow> = rows(&sql, "SELECT caller, last_ms FROM warmups", vec![])?;
        let mut ledger = WarmLedger {
            requests: found.into_iter().map(|r| (r.caller, r.last_ms)).collect(),
        };
        let decision = ledger.request(caller, now);
        let WarmDecision::Send { target } = decision else {
            let retry_after_ms = match decision {
                WarmDecision::TooSoon { retry_after_ms } => Some(retry_after_ms),
                WarmDecision::Send { .. } => None,
            };
            return Ok(WarmResponse {
                repo: repo.to_owned(),
                requested: false,
                target: None,
                retry_after_ms,
            });
        };
        exec(&sql, "DELETE FROM warmups", vec![])?;
        for (key, last_ms) in &ledger.requests {
            exec(
                &sql,
                "INSERT INTO warmups (caller, last_ms) VALUES (?, ?)",
                vec![key.as_str().into(), int(*last_ms)?],
            )?;
        }
        self.update(|state| {
            state.warm = Some(WarmRecord {
                target,
                requested_ms: now,
                outcome: WarmOutcome::Pending,
                detail: None,
            });
        })?;
        let provider = Provider::from_env(&self.env);
        let repo_name = repo.to_owned();
        worker::wasm_bindgen_futures::spawn_local(async move {
            let outcome = match provider {
                Ok(provider) => provider.set_pool_target(&repo_name, target).await,
                Err(e) => Err(e),
            };
            let (result, detail) = match outcome {
                Ok(()) => (WarmOutcome::Accepted, None),
                Err(ProviderError::Unsupported { .. }) => {
                    worker::console_log!(
                        "the provider has no warm pools yet; warm-up of {repo_name} skipped"
                    );
                    (WarmOutcome::Unsupported, None)
                }
                Err(e) => {
                    worker::console_error!("warm-up of {repo_name} failed: {e}");
                    (WarmOutcome::Failed, Some(e.to_string()))
                }
            };
            let recorded = exec(
                &sql,
                "UPDATE repo SET warm_outcome = ?, warm_detail = ? WHERE warm_requested_ms = ?",
                vec![enum_value(&result), detail.into(), int_or_null(Some(now))],
            );
            if let Err(e) = recorded {
                worker::console_error!("recording the warm-up of {repo_name} failed: {e}");
            }
        });
        Ok(WarmResponse {
            repo: repo.to_owned(),
            requested: true,
            target: Some(target),
            retry_after_ms: None,
        })
    }
}

impl RepoCall {
    /// A call that names only the repository.
    pub fn plain(repo: &str) -> Self {
        RepoCall {
            repo: repo.to_owned(),
            caller: None,
            settings: None,
        }
    }
}

#[derive(serde::Deserialize)]
struct RegistryRow {
    repo: String,
}

#[derive(serde::Deserialize)]
struct RegisteredRow {
    registered: i64,
}

#[derive(serde::Deserialize)]
struct WarmupRow {
    caller: String,
    last_ms: u64,
}

#[derive(serde::Deserialize)]
struct RepoRow {
    repo: String,
    base_branch: String,
    cadence_ms: Option<u64>,
    image_id: Option<String>,
    image_commit: Option<String>,
    image_created_ms: Option<u64>,
    build_id: Option<String>,
    build_status: Option<String>,
    build_started_ms: Option<u64>,
    build_finished_ms: Option<u64>,
    build_error: Option<String>,
    failures: u32,
    warm_target: Option<u32>,
    warm_requested_ms: Option<u64>,
    warm_outcome: Option<String>,
    warm_detail: Option<String>,
}

/// The repository this object keeps, if it was registered.
fn load(sql: &SqlStorage, default_cadence_ms: u64) -> Result<Option<RepoState>, StoreError> {
    let found: Vec<RepoRow> = rows(
        sql,
        "SELECT repo, base_branch, cadence_ms, image_id, image_commit, image_created_ms, build_id, build_status,
                build_started_ms, build_finished_ms, build_error, failures, warm_target, warm_requested_ms,
                warm_outcome, warm_detail
         FROM repo",
        vec![],
    )?;
    let Some(row) = found.into_iter().next() else {
        return Ok(None);
    };
    let image = match (row.image_id, row.image_created_ms) {
        (Some(id), Some(created_ms)) => Some(ImageRecord {
            id,
            commit: row.image_commit,
            created_ms,
        }),
        _ => None,
    };
    let build = match (row.build_status, row.build_started_ms) {
        (Some(status), Some(started_ms)) => Some(BuildRecord {
            id: row.build_id,
            status: enum_from::<BuildStatus>(&status)?,
            started_ms,
            finished_ms: row.build_finished_ms,
            error: row.build_error,
        }),
        _ => None,
    };
    let warm = match (row.warm_target, row.warm_requested_ms, row.warm_outcome) {
        (Some(target), Some(requested_ms), Some(outcome)) => Some(WarmRecord {
            target,
            requested_ms,
            outcome: enum_from::<WarmOutcome>(&outcome)?,
            detail: row.warm_detail,
        }),
        _ => None,
    };
    Ok(Some(RepoState {
        repo: row.repo,
        base_branch: row.base_branch,
        cadence_override_ms: row.cadence_ms,
        default_cadence_ms,
        image,
        build,
        failures: row.failures,
        warm,
    }))
}

/// Write the repository (everything but `registered` and `next_alarm_ms`, which have their own updates).
fn save(sql: &SqlStorage, state: &RepoState) -> Result<(), StoreError> {
    let image = state.image.as_ref();
    let build = state.build.as_ref();
    let warm = state.warm.as_ref();
    let build_status = build.map(|b| enum_name(&b.status)).transpose()?;
    let warm_outcome = warm.map(|w| enum_name(&w.outcome)).transpose()?;
    exec(
        sql,
        "INSERT INTO repo (singleton, repo, base_branch, cadence_ms, image_id, image_commit, image_created_ms,
                build_id, build_status, build_started_ms, build_finished_ms, build_error, failures, warm_target,
                warm_requested_ms, warm_outcome, warm_detail)
         VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (singleton) DO UPDATE SET repo = excluded.repo, base_branch = excluded.base_branch,
                cadence_ms = excluded.cadence_ms, image_id = excluded.image_id, image_commit = excluded.image_commit,
                image_created_ms = excluded.image_created_ms, build_id = excluded.build_id,
                build_status = excluded.build_status, build_started_ms = excluded.build_started_ms,
                build_finished_ms = excluded.build_finished_ms, build_error = excluded.build_error,
                failures = excluded.failures, warm_target = excluded.warm_target,
                warm_requested_ms = excluded.warm_requested_ms, warm_outcome = excluded.warm_outcome,
                warm_detail = excluded.warm_detail",
        vec![
            state.repo.as_str().into(),
            state.base_branch.as_str().into(),
            int_or_null(state.cadence_override_ms),
            image.map(|i| i.id.clone()).into(),
            image.and_then(|i| i.commit.clone()).into(),
            int_or_null(image.map(|i| i.created_ms)),
            build.and_then(|b| b.id.clone()).into(),
            build_status.into(),
            int_or_null(build.map(|b| b.started_ms)),
            int_or_null(build.and_then(|b| b.finished_ms)),
            build.and_then(|b| b.error.clone()).into(),
            int(u64::from(state.failures))?,
            int_or_null(warm.map(|w| u64::from(w.target))),
            int_or_null(warm.map(|w| w.requested_ms)),
            warm_outcome.into(),
            warm.and_then(|w| w.detail.clone()).into(),
        ],
    )
}

/// An integer column value, `NULL` for `None` (and for a value beyond SQLite's safe range, which ms never are).
fn int_or_null(value: Option<u64>) -> SqlStorageValue {
    value
        .and_then(|v| int(v).ok())
        .unwrap_or(SqlStorageValue::Null)
}

fn enum_value<T: serde::Serialize>(value: &T) -> SqlStorageValue {
    enum_name(value)
        .map(SqlStorageValue::String)
        .unwrap_or(SqlStorageValue::Null)
}

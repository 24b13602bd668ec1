//! `UserObject`: one Durable Object per person (named by login, binding `USER`): their usage per UTC day
//! across all their sessions, for the per-person daily ceiling. Internal only — session objects add
//! every `usage` of a person's prompt (`POST /add`) and read the day before accepting their prompt
//! (`GET /day?day=N`); both answer the day's [`DailySpend`].

use nightshift_protocol::ErrorCode;
use nightshift_session::{DailySpend, UsageReport};
use worker::{durable_object, DurableObject, Env, Method, Request, Response, State, Stub};

use crate::config;
use crate::error::{internal_json, json_response, parse_body, AppError};
use crate::repo_object::internal_request;
use crate::sql_store::{exec, int, migrate_with, rows};

/// Schema migrations, applied in order; each entry is one version. Never edit an applied entry: append.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS daily_spend (
        day INTEGER PRIMARY KEY,
        cost_usd REAL NOT NULL,
        unpriced_tokens INTEGER NOT NULL
    );"];

/// Days of usage kept per person.
const KEEP_DAYS: u64 = 31;

/// A person's usage object.
#[durable_object]
pub struct UserObject {
    state: State,
}

impl DurableObject for UserObject {
    fn new(state: State, _env: Env) -> Self {
        if let Err(e) = migrate_with(&state.storage().sql(), MIGRATIONS) {
            worker::console_error!("user schema migration failed: {e}");
        }
        UserObject { state }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(match self.serve(req).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        })
    }
}

#[derive(serde::Deserialize)]
struct SpendRow {
    cost_usd: f64,
    unpriced_tokens: u64,
}

impl UserObject {
    async fn serve(&self, mut req: Request) -> Result<Response, AppError> {
        let url = req.url()?;
        match (req.method(), url.path()) {
            (Method::Post, "/add") => {
                let report: UsageReport = parse_body(&req.text().await?, 4096)?;
                let mut spend = self.day(report.day)?;
                spend.add(report.cost_usd, report.tokens);
                exec(
                    &self.state.storage().sql(),
                    "INSERT OR REPLACE INTO daily_spend (day, cost_usd, unpriced_tokens) VALUES (?, ?, ?)",
                    vec![
                        int(spend.day)?,
                        worker::SqlStorageValue::Float(spend.cost_usd),
                        int(spend.unpriced_tokens)?,
                    ],
                )?;
                exec(
                    &self.state.storage().sql(),
                    "DELETE FROM daily_spend WHERE day < ?",
                    vec![int(spend.day.saturating_sub(KEEP_DAYS))?],
                )?;
                Ok(json_response(&spend, 200))
            }
            (Method::Get, "/day") => {
                let day = url
                    .query_pairs()
                    .find(|(key, _)| key == "day")
                    .and_then(|(_, value)| value.parse::<u64>().ok())
                    .ok_or_else(|| AppError::client(ErrorCode::BadRequest, "`day` is required"))?;
                Ok(json_response(&self.day(day)?, 200))
            }
            _ => Err(AppError::client(ErrorCode::NotFound, "no such route")),
        }
    }

    fn day(&self, day: u64) -> Result<DailySpend, AppError> {
        let found: Vec<SpendRow> = rows(
            &self.state.storage().sql(),
            "SELECT cost_usd, unpriced_tokens FROM daily_spend WHERE day = ?",
            vec![int(day)?],
        )?;
        Ok(found.first().map_or(
            DailySpend {
                day,
                ..DailySpend::default()
            },
            |r| DailySpend {
                day,
                cost_usd: r.cost_usd,
                unpriced_tokens: r.unpriced_tokens,
            },
        ))
    }
}

fn stub(env: &Env, login: &str) -> Result<Stub, AppError> {
    Ok(env
        .durable_object(config::USER_BINDING)?
        .id_from_name(login)?
        .get_stub()?)
}

async fn call(env: &Env, login: &str, request: Request) -> Result<DailySpend, AppError> {
    let response = stub(env, login)?.fetch_with_request(request).await?;
    internal_json(response, "user object").await
}

/// Add a usage to its person's day; returns the day's total.
pub async fn add(env: &Env, report: &UsageReport) -> Result<DailySpend, AppError> {
    let request = internal_request(Method::Post, "/add", Some(report))?;
    call(env, &report.login, request).await
}

/// A person's usage on `day`.
pub async fn day(env: &Env, login: &str, day: u64) -> Result<DailySpend, AppError> {
    let request = internal_request(Method::Get, &format!("/day?day={day}"), None::<&()>)?;
    call(env, login, request).await
}

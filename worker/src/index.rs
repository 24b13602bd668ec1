//! The cross-session index in D1 (binding [`config::INDEX_BINDING`]): one row per session and one per
//! participant, written by each `SessionObject` and read by `GET /api/sessions`.
//!
//! The schema is created by the Worker on first use in each isolate (`CREATE … IF NOT EXISTS`,
//! versioned in [`SCHEMA`] like the objects' SQLite), so `wrangler dev`, the tests and a deployment
//! need no separate migration step. The index is derived data: each session's SQLite stays the truth,
//! and a failed write is logged and caught up by the session's next due write.

use std::sync::atomic::{AtomicBool, Ordering};

use nightshift_protocol::http::{SessionStatus, SessionSummary};
use nightshift_protocol::Role;
use nightshift_session::{IndexMark, Member};
use worker::d1::{D1Database, D1PreparedStatement};
use worker::wasm_bindgen::JsValue;
use worker::Env;

use crate::config;
use crate::error::AppError;
use crate::sql_store::{enum_from, enum_name};

/// The index schema, one entry per version, applied in order. Never edit an applied entry: append.
const SCHEMA: &[&str] = &[
    // v1: sessions and their participants.
    "CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        repo TEXT NOT NULL,
        title TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        status TEXT NOT NULL,
        last_activity_ms INTEGER NOT NULL,
        version INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (last_activity_ms DESC);
    CREATE TABLE IF NOT EXISTS session_participants (
        session_id TEXT NOT NULL,
        login TEXT NOT NULL,
        role TEXT NOT NULL,
        joined_ms INTEGER NOT NULL,
        PRIMARY KEY (session_id, login)
    );
    CREATE INDEX IF NOT EXISTS session_participants_by_login ON session_participants (login);",
    // v2: the session's pull request, for the sessions list.
    "ALTER TABLE sessions ADD COLUMN pull_request_url TEXT",
];

/// Set once this isolate has brought the schema up to date (the schema is shared, not per object).
static SCHEMA_READY: AtomicBool = AtomicBool::new(false);

/// Most sessions one listing returns.
pub const LIST_LIMIT_MAX: u32 = 200;

/// What a session writes to the index.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Session id.
    pub id: String,
    /// Repository.
    pub repo: String,
    /// Title.
    pub title: String,
    /// Creator's login.
    pub created_by: String,
    /// Creation time.
    pub created_ms: u64,
    /// Status, last activity.
    pub mark: IndexMark,
    /// Newest `seq` when the entry was taken: a write never replaces a newer one.
    pub version: u64,
    /// Every participant.
    pub participants: Vec<Member>,
}

/// Filters of `GET /api/sessions`; the caller's own participation is always required.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Only sessions on this repository.
    pub repo: Option<String>,
    /// Only sessions with this status.
    pub status: Option<SessionStatus>,
    /// Only sessions this login also takes part in.
    pub participant: Option<String>,
    /// At most this many.
    pub limit: u32,
}

fn number(value: u64) -> JsValue {
    // Times and seqs stay far below 2^53.
    JsValue::from_f64(value as f64)
}

fn text_or_null(value: Option<&str>) -> JsValue {
    value.map_or(JsValue::null(), JsValue::from_str)
}

fn internal(what: &str, e: worker::Error) -> AppError {
    AppError::Internal(format!("index {what}: {e}"))
}

/// The index database, its schema brought up to date once per isolate.
async fn database(env: &Env) -> Result<D1Database, AppError> {
    let db = env
        .d1(config::INDEX_BINDING)
        .map_err(|e| internal("binding", e))?;
    if !SCHEMA_READY.load(Ordering::Relaxed) {
        migrate(&db).await?;
        SCHEMA_READY.store(true, Ordering::Relaxed);
    }
    Ok(db)
}

#[derive(serde::Deserialize)]
struct VersionRow {
    version: Option<f64>,
}

async fn migrate(db: &D1Database) -> Result<(), AppError> {
    db.prepare("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
        .run()
        .await
        .map_err(|e| internal("schema", e))?;
    let current = db
        .prepare("SELECT MAX(version) AS version FROM schema_migrations")
        .first::<VersionRow>(None)
        .await
        .map_err(|e| internal("schema version", e))?
        .and_then(|r| r.version)
        .unwrap_or(0.0) as usize;
    for (index, migration) in SCHEMA.iter().enumerate().skip(current) {
        let mut statements: Vec<D1PreparedStatement> = migration
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| db.prepare(s))
            .collect();
        statements.push(
            db.prepare("INSERT OR IGNORE INTO schema_migrations (version) VALUES (?)")
                .bind(&[number(index as u64 + 1)])
                .map_err(|e| internal("schema", e))?,
        );
        db.batch(statements)
            .await
            .map_err(|e| internal("schema", e))?;
    }
    Ok(())
}

/// Write `entry`: the session's row (unless a newer version is there) and its participants.
pub async fn write(env: &Env, entry: &Entry) -> Result<(), AppError> {
    let db = database(env).await?;
    let mut statements = vec![db
        .prepare(
            "INSERT INTO sessions (id, repo, title, created_by, created_ms, status, last_activity_ms, version,
                                   pull_request_url)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (id) DO UPDATE SET title = excluded.title, status = excluded.status,
                 pull_request_url = COALESCE(excluded.pull_request_url, sessions.pull_request_url),
                 last_activity_ms = MAX(sessions.last_activity_ms, excluded.last_activity_ms),
                 version = excluded.version
             WHERE excluded.version >= sessions.version",
        )
        .bind(&[
            JsValue::from_str(&entry.id),
            JsValue::from_str(&entry.repo),
            JsValue::from_str(&entry.title),
            JsValue::from_str(&entry.created_by),
            number(entry.created_ms),
            JsValue::from_str(entry.mark.status.as_str()),
            number(entry.mark.last_activity_ms),
            number(entry.version),
            text_or_null(entry.mark.pull_request_url.as_deref()),
        ])
        .map_err(|e| internal("write", e))?];
    for member in &entry.participants {
        statements.push(
            db.prepare(
                "INSERT INTO session_participants (session_id, login, role, joined_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (session_id, login) DO UPDATE SET role = excluded.role",
            )
            .bind(&[
                JsValue::from_str(&entry.id),
                JsValue::from_str(&member.author.login),
                JsValue::from_str(&enum_name(&member.role)?),
                number(member.joined_ms),
            ])
            .map_err(|e| internal("write", e))?,
        );
    }
    db.batch(statements)
        .await
        .map_err(|e| internal("write", e))?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct SummaryRow {
    id: String,
    repo: String,
    title: String,
    status: String,
    created_by: String,
    created_ms: f64,
    last_activity_ms: f64,
    role: String,
    participants: Option<String>,
    pull_request_url: Option<String>,
}

/// Sessions `login` takes part in that pass `filters`, most recently active first.
pub async fn list(
    env: &Env,
    login: &str,
    filters: &Filters,
) -> Result<Vec<SessionSummary>, AppError> {
    let db = database(env).await?;
    let result = db
        .prepare(
            "SELECT s.id, s.repo, s.title, s.status, s.created_by, s.created_ms, s.last_activity_ms,
                    s.pull_request_url, me.role AS role,
                    (SELECT json_group_array(login) FROM
                        (SELECT login FROM session_participants p
                         WHERE p.session_id = s.id ORDER BY p.joined_ms, p.login)) AS participants
             FROM sessions s
             JOIN session_participants me ON me.session_id = s.id AND me.login = ?1
             WHERE (?2 IS NULL OR s.repo = ?2)
               AND (?3 IS NULL OR s.status = ?3)
               AND (?4 IS NULL OR EXISTS (SELECT 1 FROM session_participants o
                                          WHERE o.session_id = s.id AND o.login = ?4))
             ORDER BY s.last_activity_ms DESC, s.id
             LIMIT ?5",
        )
        .bind(&[
            JsValue::from_str(login),
            text_or_null(filters.repo.as_deref()),
            text_or_null(filters.status.map(SessionStatus::as_str)),
            text_or_null(filters.participant.as_deref()),
            number(u64::from(filters.limit.clamp(1, LIST_LIMIT_MAX))),
        ])
        .map_err(|e| internal("list", e))?
        .all()
        .await
        .map_err(|e| internal("list", e))?;
    let rows: Vec<SummaryRow> = result.results().map_err(|e| internal("list rows", e))?;
    rows.into_iter()
        .map(|row| {
            let participants = match row.participants.as_deref() {
                Some(json) => serde_json::from_str::<Vec<String>>(json)?,
                None => Vec::new(),
            };
            Ok(SessionSummary {
                status: SessionStatus::parse(&row.status)
                    .ok_or_else(|| AppError::Internal(format!("index status `{}`", row.status)))?,
                role: enum_from::<Role>(&row.role)?,
                id: row.id,
                repo: row.repo,
                title: row.title,
                created_by: row.created_by,
                created_ms: row.created_ms as u64,
                last_activity_ms: row.last_activity_ms as u64,
                participants,
                pull_request_url: row.pull_request_url,
            })
        })
        .collect()
}

//! [`Store`] over the session object's embedded SQLite, with the schema created and migrated in code.

use nightshift_protocol::http::UsageTotals;
use nightshift_protocol::{
    Author, Event, EventEnvelope, PromptStatus, Role, SandboxStatus, SessionInfo,
};
use nightshift_session::{
    Family, IndexMark, InviteRecord, Lifecycle, Member, PromptRecord, SandboxRecord, Store,
    StoreError,
};
use serde::de::DeserializeOwned;
use worker::{SqlStorage, SqlStorageValue};

/// Schema migrations, applied in order; each entry is one version. Never edit an applied entry: append.
const MIGRATIONS: &[&str] = &[
    // v1: the walking skeleton.
    "CREATE TABLE IF NOT EXISTS session (
        id TEXT PRIMARY KEY,
        info TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS participants (
        login TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL,
        role TEXT NOT NULL,
        joined_ms INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS prompts (
        ordinal INTEGER PRIMARY KEY,
        prompt_id TEXT NOT NULL UNIQUE,
        author_login TEXT NOT NULL,
        author TEXT NOT NULL,
        text TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        status TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        UNIQUE (author_login, idempotency_key)
    );
    CREATE INDEX IF NOT EXISTS prompts_unfinished ON prompts (status) WHERE status IN ('queued', 'running');
    CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS sandbox (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        sandbox_id TEXT,
        status TEXT NOT NULL,
        detail TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        last_producer_seq INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS usage (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_usd REAL
    );
    CREATE TABLE IF NOT EXISTS invites (
        secret_hash TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    // v2: the newest snapshot of the session's work.
    "ALTER TABLE sandbox ADD COLUMN last_snapshot TEXT;",
    // v3 (membership): invites expire and can be revoked, with a public id (a prefix of the hash);
    // what the session last wrote to the cross-session index.
    "ALTER TABLE invites ADD COLUMN invite_id TEXT;
    ALTER TABLE invites ADD COLUMN expires_ms INTEGER;
    ALTER TABLE invites ADD COLUMN revoked_ms INTEGER;
    UPDATE invites SET invite_id = substr(secret_hash, 1, 16), expires_ms = created_ms + 604800000
        WHERE invite_id IS NULL;
    CREATE TABLE IF NOT EXISTS index_mark (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        status TEXT NOT NULL,
        last_activity_ms INTEGER NOT NULL,
        participants INTEGER NOT NULL
    );",
    // v4 (lifecycle): the inputs of every deadline, one JSON record (`nightshift_session::Lifecycle`).
    "CREATE TABLE IF NOT EXISTS lifecycle (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        body TEXT NOT NULL
    );",
    // v5 (sub-sessions): the session's place in its tree and its children, one JSON record
    // (`nightshift_session::Family`; a tree holds at most a few dozen sessions).
    "CREATE TABLE IF NOT EXISTS family (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        body TEXT NOT NULL
    );",
    // v6 (web app): the pull request the index entry names.
    "ALTER TABLE index_mark ADD COLUMN pull_request_url TEXT;",
];

/// Bring the session schema to the newest version. Cheap when it already is: one read.
pub fn migrate(sql: &SqlStorage) -> Result<(), StoreError> {
    migrate_with(sql, MIGRATIONS)
}

/// Apply the `migrations` (one entry per version, in order) not applied yet to this object's SQLite.
pub(crate) fn migrate_with(sql: &SqlStorage, migrations: &[&str]) -> Result<(), StoreError> {
    exec(
        sql,
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)",
        vec![],
    )?;
    let applied: Vec<VersionRow> = rows(
        sql,
        "SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations",
        vec![],
    )?;
    let current = applied.first().map_or(0, |r| r.version);
    for (index, migration) in migrations.iter().enumerate() {
        let version = index as i64 + 1;
        if version > current {
            exec(sql, migration, vec![])?;
            exec(
                sql,
                "INSERT INTO schema_migrations (version) VALUES (?)",
                vec![version.into()],
            )?;
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct VersionRow {
    version: i64,
}

pub(crate) fn exec(
    sql: &SqlStorage,
    query: &str,
    bindings: Vec<SqlStorageValue>,
) -> Result<(), StoreError> {
    let cursor = sql
        .exec(query, bindings)
        .map_err(|e| StoreError(format!("{e}")))?;
    // Drain the cursor so the statement runs to completion.
    for row in cursor {
        row.map_err(|e| StoreError(format!("{e}")))?;
    }
    Ok(())
}

pub(crate) fn rows<T: DeserializeOwned>(
    sql: &SqlStorage,
    query: &str,
    bindings: Vec<SqlStorageValue>,
) -> Result<Vec<T>, StoreError> {
    sql.exec(query, bindings)
        .and_then(|cursor| cursor.to_array::<T>())
        .map_err(|e| StoreError(format!("{e}")))
}

pub(crate) fn int(value: u64) -> Result<SqlStorageValue, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError(format!("{value} does not fit")))
        .and_then(|v| SqlStorageValue::try_from_i64(v).map_err(|e| StoreError(format!("{e}"))))
}

fn json<T: serde::Serialize>(value: &T) -> Result<SqlStorageValue, StoreError> {
    serde_json::to_string(value)
        .map(SqlStorageValue::String)
        .map_err(|e| StoreError(format!("json: {e}")))
}

fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError(format!("stored json: {e}")))
}

pub(crate) fn enum_name<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(StoreError("enum did not serialize to a string".to_owned())),
    }
}

pub(crate) fn enum_from<T: DeserializeOwned>(name: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|e| StoreError(format!("stored enum `{name}`: {e}")))
}

/// The session's SQLite as a [`Store`].
pub struct SqlStore {
    sql: SqlStorage,
}

impl SqlStore {
    /// A store over `sql` (schema assumed migrated).
    pub fn new(sql: SqlStorage) -> Self {
        SqlStore { sql }
    }
}

#[derive(serde::Deserialize)]
struct InfoRow {
    info: String,
}

#[derive(serde::Deserialize)]
struct EventRow {
    seq: u64,
    ts_ms: u64,
    body: String,
}

#[derive(serde::Deserialize)]
struct BodyRow {
    body: String,
}

#[derive(serde::Deserialize)]
struct SeqRow {
    seq: u64,
}

#[derive(serde::Deserialize)]
struct CountRow {
    n: u64,
}

#[derive(serde::Deserialize)]
struct PromptRow {
    prompt_id: String,
    author: String,
    text: String,
    idempotency_key: String,
    status: String,
    created_ms: u64,
    updated_ms: u64,
}

impl PromptRow {
    fn into_record(self) -> Result<PromptRecord, StoreError> {
        Ok(PromptRecord {
            prompt_id: self.prompt_id,
            author: from_json(&self.author)?,
            text: self.text,
            idempotency_key: self.idempotency_key,
            status: enum_from(&self.status)?,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        })
    }
}

const PROMPT_COLUMNS: &str =
    "prompt_id, author, text, idempotency_key, status, created_ms, updated_ms";

#[derive(serde::Deserialize)]
struct MemberRow {
    login: String,
    name: String,
    email: String,
    role: String,
    joined_ms: u64,
}

#[derive(serde::Deserialize)]
struct SandboxRow {
    sandbox_id: Option<String>,
    status: String,
    detail: String,
    token_hash: String,
    last_producer_seq: u64,
    last_snapshot: Option<String>,
}

#[derive(serde::Deserialize)]
struct InviteRow {
    invite_id: String,
    secret_hash: String,
    created_by: String,
    created_ms: u64,
    expires_ms: u64,
    revoked_ms: Option<u64>,
}

impl From<InviteRow> for InviteRecord {
    fn from(r: InviteRow) -> Self {
        InviteRecord {
            id: r.invite_id,
            secret_hash: r.secret_hash,
            created_by: r.created_by,
            created_ms: r.created_ms,
            expires_ms: r.expires_ms,
            revoked_ms: r.revoked_ms,
        }
    }
}

const INVITE_COLUMNS: &str =
    "invite_id, secret_hash, created_by, created_ms, expires_ms, revoked_ms";

#[derive(serde::Deserialize)]
struct IndexMarkRow {
    status: String,
    last_activity_ms: u64,
    participants: u32,
    pull_request_url: Option<String>,
}

#[derive(serde::Deserialize)]
struct UsageRow {
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: Option<f64>,
}

impl Store for SqlStore {
    fn session(&self) -> Result<Option<SessionInfo>, StoreError> {
        let found: Vec<InfoRow> = rows(&self.sql, "SELECT info FROM session LIMIT 1", vec![])?;
        found.first().map(|r| from_json(&r.info)).transpose()
    }

    fn insert_session(&mut self, info: &SessionInfo) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "INSERT INTO session (id, info, created_ms) VALUES (?, ?, ?)",
            vec![info.id.as_str().into(), json(info)?, int(info.created_ms)?],
        )
    }

    fn append_event(&mut self, ts_ms: u64, event: &Event) -> Result<u64, StoreError> {
        let inserted: Vec<SeqRow> = rows(
            &self.sql,
            "INSERT INTO events (seq, ts_ms, type, body)
             VALUES ((SELECT COALESCE(MAX(seq), 0) + 1 FROM events), ?, ?, ?) RETURNING seq",
            vec![int(ts_ms)?, event.kind().into(), json(event)?],
        )?;
        inserted
            .first()
            .map(|r| r.seq)
            .ok_or_else(|| StoreError("insert returned no seq".to_owned()))
    }

    fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<EventEnvelope>, StoreError> {
        let found: Vec<EventRow> = rows(
            &self.sql,
            "SELECT seq, ts_ms, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            vec![int(after_seq)?, int(u64::from(limit))?],
        )?;
        found
            .into_iter()
            .map(|r| {
                Ok(EventEnvelope {
                    seq: r.seq,
                    ts_ms: r.ts_ms,
                    event: from_json(&r.body)?,
                })
            })
            .collect()
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        let found: Vec<SeqRow> = rows(
            &self.sql,
            "SELECT COALESCE(MAX(seq), 0) AS seq FROM events",
            vec![],
        )?;
        Ok(found.first().map_or(0, |r| r.seq))
    }

    fn prompt_count(&self) -> Result<u64, StoreError> {
        let found: Vec<CountRow> = rows(&self.sql, "SELECT COUNT(*) AS n FROM prompts", vec![])?;
        Ok(found.first().map_or(0, |r| r.n))
    }

    fn insert_prompt(&mut self, prompt: &PromptRecord) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "INSERT INTO prompts (prompt_id, author_login, author, text, idempotency_key, status, created_ms, updated_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                prompt.prompt_id.as_str().into(),
                prompt.author.login.as_str().into(),
                json(&prompt.author)?,
                prompt.text.as_str().into(),
                prompt.idempotency_key.as_str().into(),
                enum_name(&prompt.status)?.into(),
                int(prompt.created_ms)?,
                int(prompt.updated_ms)?,
            ],
        )
    }

    fn prompt(&self, prompt_id: &str) -> Result<Option<PromptRecord>, StoreError> {
        let found: Vec<PromptRow> = rows(
            &self.sql,
            &format!("SELECT {PROMPT_COLUMNS} FROM prompts WHERE prompt_id = ?"),
            vec![prompt_id.into()],
        )?;
        found
            .into_iter()
            .next()
            .map(PromptRow::into_record)
            .transpose()
    }

    fn prompt_by_key(
        &self,
        login: &str,
        idempotency_key: &str,
    ) -> Result<Option<PromptRecord>, StoreError> {
        let found: Vec<PromptRow> = rows(
            &self.sql,
            &format!("SELECT {PROMPT_COLUMNS} FROM prompts WHERE author_login = ? AND idempotency_key = ?"),
            vec![login.into(), idempotency_key.into()],
        )?;
        found
            .into_iter()
            .next()
            .map(PromptRow::into_record)
            .transpose()
    }

    fn set_prompt_status(
        &mut self,
        prompt_id: &str,
        status: PromptStatus,
        ts_ms: u64,
    ) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "UPDATE prompts SET status = ?, updated_ms = ? WHERE prompt_id = ?",
            vec![enum_name(&status)?.into(), int(ts_ms)?, prompt_id.into()],
        )
    }

    fn unfinished_prompts(&self) -> Result<Vec<PromptRecord>, StoreError> {
        let found: Vec<PromptRow> = rows(
            &self.sql,
            &format!(
                "SELECT {PROMPT_COLUMNS} FROM prompts WHERE status IN ('queued', 'running') ORDER BY ordinal"
            ),
            vec![],
        )?;
        found.into_iter().map(PromptRow::into_record).collect()
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        let found: Vec<MemberRow> = rows(
            &self.sql,
            "SELECT login, name, email, role, joined_ms FROM participants ORDER BY joined_ms, rowid",
            vec![],
        )?;
        found
            .into_iter()
            .map(|r| {
                Ok(Member {
                    author: Author {
                        login: r.login,
                        name: r.name,
                        email: r.email,
                    },
                    role: enum_from::<Role>(&r.role)?,
                    joined_ms: r.joined_ms,
                })
            })
            .collect()
    }

    fn upsert_member(&mut self, member: &Member) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "INSERT INTO participants (login, name, email, role, joined_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (login) DO UPDATE SET name = excluded.name, email = excluded.email",
            vec![
                member.author.login.as_str().into(),
                member.author.name.as_str().into(),
                member.author.email.as_str().into(),
                enum_name(&member.role)?.into(),
                int(member.joined_ms)?,
            ],
        )
    }

    fn sandbox(&self) -> Result<Option<SandboxRecord>, StoreError> {
        let found: Vec<SandboxRow> = rows(
            &self.sql,
            "SELECT sandbox_id, status, detail, token_hash, last_producer_seq, last_snapshot FROM sandbox WHERE singleton = 1",
            vec![],
        )?;
        found
            .into_iter()
            .next()
            .map(|r| {
                Ok(SandboxRecord {
                    sandbox_id: r.sandbox_id,
                    status: enum_from::<SandboxStatus>(&r.status)?,
                    detail: r.detail,
                    token_hash: r.token_hash,
                    last_producer_seq: r.last_producer_seq,
                    last_snapshot: r.last_snapshot,
                })
            })
            .transpose()
    }

    fn save_sandbox(&mut self, sandbox: &SandboxRecord) -> Result<(), StoreError> {
        let sandbox_id = match &sandbox.sandbox_id {
            Some(id) => id.as_str().into(),
            None => SqlStorageValue::Null,
        };
        let last_snapshot = match &sandbox.last_snapshot {
            Some(id) => id.as_str().into(),
            None => SqlStorageValue::Null,
        };
        exec(
            &self.sql,
            "INSERT OR REPLACE INTO sandbox (singleton, sandbox_id, status, detail, token_hash, last_producer_seq, last_snapshot)
             VALUES (1, ?, ?, ?, ?, ?, ?)",
            vec![
                sandbox_id,
                enum_name(&sandbox.status)?.into(),
                sandbox.detail.as_str().into(),
                sandbox.token_hash.as_str().into(),
                int(sandbox.last_producer_seq)?,
                last_snapshot,
            ],
        )
    }

    fn set_last_producer_seq(&mut self, producer_seq: u64) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "UPDATE sandbox SET last_producer_seq = ? WHERE singleton = 1",
            vec![int(producer_seq)?],
        )
    }

    fn usage(&self) -> Result<UsageTotals, StoreError> {
        let found: Vec<UsageRow> = rows(
            &self.sql,
            "SELECT input_tokens, output_tokens, cost_usd FROM usage WHERE singleton = 1",
            vec![],
        )?;
        Ok(found
            .into_iter()
            .next()
            .map(|r| UsageTotals {
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cost_usd: r.cost_usd,
            })
            .unwrap_or_default())
    }

    fn save_usage(&mut self, usage: &UsageTotals) -> Result<(), StoreError> {
        let cost = match usage.cost_usd {
            Some(c) => SqlStorageValue::Float(c),
            None => SqlStorageValue::Null,
        };
        exec(
            &self.sql,
            "INSERT OR REPLACE INTO usage (singleton, input_tokens, output_tokens, cost_usd) VALUES (1, ?, ?, ?)",
            vec![int(usage.input_tokens)?, int(usage.output_tokens)?, cost],
        )
    }

    fn insert_invite(&mut self, invite: &InviteRecord) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "INSERT INTO invites (invite_id, secret_hash, created_by, created_ms, expires_ms)
             VALUES (?, ?, ?, ?, ?)",
            vec![
                invite.id.as_str().into(),
                invite.secret_hash.as_str().into(),
                invite.created_by.as_str().into(),
                int(invite.created_ms)?,
                int(invite.expires_ms)?,
            ],
        )
    }

    fn invite_by_hash(&self, secret_hash: &str) -> Result<Option<InviteRecord>, StoreError> {
        let found: Vec<InviteRow> = rows(
            &self.sql,
            &format!("SELECT {INVITE_COLUMNS} FROM invites WHERE secret_hash = ?"),
            vec![secret_hash.into()],
        )?;
        Ok(found.into_iter().next().map(InviteRecord::from))
    }

    fn invites(&self) -> Result<Vec<InviteRecord>, StoreError> {
        let found: Vec<InviteRow> = rows(
            &self.sql,
            &format!("SELECT {INVITE_COLUMNS} FROM invites ORDER BY created_ms DESC, rowid DESC"),
            vec![],
        )?;
        Ok(found.into_iter().map(InviteRecord::from).collect())
    }

    fn revoke_invite(&mut self, invite_id: &str, ts_ms: u64) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "UPDATE invites SET revoked_ms = ? WHERE invite_id = ? AND revoked_ms IS NULL",
            vec![int(ts_ms)?, invite_id.into()],
        )
    }

    fn index_mark(&self) -> Result<Option<IndexMark>, StoreError> {
        let found: Vec<IndexMarkRow> = rows(
            &self.sql,
            "SELECT status, last_activity_ms, participants, pull_request_url
             FROM index_mark WHERE singleton = 1",
            vec![],
        )?;
        found
            .into_iter()
            .next()
            .map(|r| {
                Ok(IndexMark {
                    status: enum_from(&r.status)?,
                    last_activity_ms: r.last_activity_ms,
                    participants: r.participants,
                    pull_request_url: r.pull_request_url,
                })
            })
            .transpose()
    }

    fn save_index_mark(&mut self, mark: &IndexMark) -> Result<(), StoreError> {
        exec(
            &self.sql,
            "INSERT OR REPLACE INTO index_mark
                 (singleton, status, last_activity_ms, participants, pull_request_url)
             VALUES (1, ?, ?, ?, ?)",
            vec![
                enum_name(&mark.status)?.into(),
                int(mark.last_activity_ms)?,
                int(u64::from(mark.participants))?,
                mark.pull_request_url.clone().into(),
            ],
        )
    }

    fn lifecycle(&self) -> Result<Option<Lifecycle>, StoreError> {
        singleton_json(&self.sql, "lifecycle")
    }

    fn save_lifecycle(&mut self, lifecycle: &Lifecycle) -> Result<(), StoreError> {
        save_singleton_json(&self.sql, "lifecycle", lifecycle)
    }

    fn family(&self) -> Result<Option<Family>, StoreError> {
        singleton_json(&self.sql, "family")
    }

    fn save_family(&mut self, family: &Family) -> Result<(), StoreError> {
        save_singleton_json(&self.sql, "family", family)
    }
}

/// The one JSON record of a `(singleton, body)` table (`table` is one of this file's names, never input).
fn singleton_json<T: DeserializeOwned>(
    sql: &SqlStorage,
    table: &str,
) -> Result<Option<T>, StoreError> {
    let found: Vec<BodyRow> = rows(
        sql,
        &format!("SELECT body FROM {table} WHERE singleton = 1"),
        vec![],
    )?;
    found.first().map(|r| from_json(&r.body)).transpose()
}

/// Replace the one JSON record of a `(singleton, body)` table.
fn save_singleton_json<T: serde::Serialize>(
    sql: &SqlStorage,
    table: &str,
    value: &T,
) -> Result<(), StoreError> {
    exec(
        sql,
        &format!("INSERT OR REPLACE INTO {table} (singleton, body) VALUES (1, ?)"),
        vec![json(value)?],
    )
}

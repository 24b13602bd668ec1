//! TypeScript declarations of every type a client sees (the client WebSocket, logged events and the
//! Worker's HTTP bodies), for the web app's `web/src/wire.ts`. Generated, never hand-copied: the
//! `wire_types` test of the tests crate fails when the checked-in file differs from [`declarations`].
//!
//! `u64` fields are TypeScript `number`: every one is a time in ms, a count or a `seq`, far below 2^53.

use ts_rs::{Config, TS};

use crate::{client, event, http};

/// The file's first lines.
const HEADER: &str =
    "// Generated from worker/protocol by `cargo xtask wire`; do not edit by hand.\n\
// The `wire_types` test fails when this file is stale.\n";

/// The whole `wire.ts`: a header, then one exported declaration per type, in a stable order.
pub fn declarations() -> String {
    let cfg = Config::new().with_large_int("number");
    let decls = [
        serde_json::Value::decl(&cfg),
        crate::Author::decl(&cfg),
        crate::Role::decl(&cfg),
        crate::Participant::decl(&cfg),
        crate::ErrorCode::decl(&cfg),
        crate::StopScope::decl(&cfg),
        crate::PromptStatus::decl(&cfg),
        crate::QueuedPrompt::decl(&cfg),
        crate::SandboxStatus::decl(&cfg),
        crate::SessionInfo::decl(&cfg),
        client::ClientMessage::decl(&cfg),
        client::ServerMessage::decl(&cfg),
        event::EventEnvelope::decl(&cfg),
        event::Event::decl(&cfg),
        event::FileChange::decl(&cfg),
        http::CreateSessionRequest::decl(&cfg),
        http::CreateSessionResponse::decl(&cfg),
        http::PromptRequest::decl(&cfg),
        http::PromptResponse::decl(&cfg),
        http::StopRequest::decl(&cfg),
        http::CreateInviteRequest::decl(&cfg),
        http::InviteResponse::decl(&cfg),
        http::InviteState::decl(&cfg),
        http::InviteSummary::decl(&cfg),
        http::InvitesResponse::decl(&cfg),
        http::SessionStatus::decl(&cfg),
        http::SessionSummary::decl(&cfg),
        http::SessionsResponse::decl(&cfg),
        http::JoinResponse::decl(&cfg),
        http::DevLoginRequest::decl(&cfg),
        http::AuthSession::decl(&cfg),
        http::TokenResponse::decl(&cfg),
        http::MeResponse::decl(&cfg),
        http::SandboxState::decl(&cfg),
        http::UsageTotals::decl(&cfg),
        http::SessionState::decl(&cfg),
        http::LifecycleState::decl(&cfg),
        http::EventsPage::decl(&cfg),
        http::ErrorBody::decl(&cfg),
        http::ErrorDetail::decl(&cfg),
        http::ReposResponse::decl(&cfg),
        http::RepoSummary::decl(&cfg),
        http::RepoImage::decl(&cfg),
        http::RepoWarning::decl(&cfg),
        http::RepoWarningKind::decl(&cfg),
        http::RepoBuild::decl(&cfg),
        http::BuildStatus::decl(&cfg),
        http::RepoWarm::decl(&cfg),
        http::WarmOutcome::decl(&cfg),
        http::WarmRequest::decl(&cfg),
        http::WarmResponse::decl(&cfg),
        http::RepoSettingsRequest::decl(&cfg),
    ];
    let mut out = String::from(HEADER);
    for decl in decls {
        out.push('\n');
        out.push_str("export ");
        out.push_str(&decl);
        out.push('\n');
    }
    out
}

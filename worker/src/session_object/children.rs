//! Sub-sessions in the object: the agent's `request`s (`spawn_session`, `session_status`,
//! `list_children`) answered with a `reply`, and the object-to-object calls of a tree. All of them go
//! through `nightshift_session::children`, which decides; this module only carries.
//!
//! Internal routes (never forwarded by the Worker's front door, so only other objects reach them):
//! `POST /internal/tree-reserve` (at a root: count one more session in the tree, or refuse),
//! `POST /internal/child-status` (a child's `ChildReport`), `POST /internal/stop-tree` (the person
//! who stopped the parent's tree; the child stops itself and its own children).
//!
//! A spawned child is created like any session (`/create`, as the person whose prompt is running),
//! with its family, a copy of the parent's participants (so whoever sees the parent sees the child),
//! and its first prompt queued; it reports each change of its listing status to its parent.

use nightshift_protocol::http::{ErrorBody, SessionStatus};
use nightshift_protocol::{
    Author, ChildInfo, ErrorCode, SessionCall, SessionReply, MAX_PROMPT_BYTES,
};
use nightshift_session::{ChildLimits, ChildRecord, ChildReport, Session, Store, TreeStop};
use worker::{Env, Headers, Method, Request, RequestInit, Response};

use super::{now_ms, SessionObject, USER_HEADER};
use crate::error::AppError;
use crate::secret::random_hex;

/// Longest title a spawned child may have, in characters.
const TITLE_MAX_CHARS: usize = 200;
/// A title derived from the prompt is cut to this many characters.
const DERIVED_TITLE_CHARS: usize = 80;

/// Call session `id`'s object at an internal `path` with a JSON `body`, as `user` when given.
pub(super) async fn call(
    env: &Env,
    id: &str,
    path: &str,
    user: Option<&Author>,
    body: &impl serde::Serialize,
) -> Result<Response, AppError> {
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    if let Some(user) = user {
        headers.set(USER_HEADER, &serde_json::to_string(user)?)?;
    }
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(serde_json::to_string(body)?.into()));
    let request = Request::new_with_init(&format!("https://session{path}"), &init)?;
    let stub = env
        .durable_object(crate::config::SESSION_BINDING)?
        .id_from_name(id)?
        .get_stub()?;
    Ok(stub.fetch_with_request(request).await?)
}

/// An object's error answer as the `AppError` it was (its code and message kept).
async fn refusal(mut response: Response) -> AppError {
    let status = response.status_code();
    match response.json::<ErrorBody>().await {
        Ok(body) => AppError::client(body.error.code, body.error.message),
        Err(_) => AppError::Internal(format!("session object answered {status}")),
    }
}

impl SessionObject {
    /// Answer the agent's `request`: the reply, or a typed refusal the model sees.
    pub(super) async fn answer(&self, call: SessionCall) -> SessionReply {
        match self.session_call(call).await {
            Ok(reply) => reply,
            Err(AppError::Client { code, message }) => SessionReply::Refused { code, message },
            Err(AppError::Internal(detail)) => {
                worker::console_error!("agent request failed: {detail}");
                SessionReply::Refused {
                    code: ErrorCode::Internal,
                    message: "internal error".to_owned(),
                }
            }
        }
    }

    async fn session_call(&self, call: SessionCall) -> Result<SessionReply, AppError> {
        match call {
            SessionCall::ListChildren {} => {
                let children = Session::new(&mut self.store(), now_ms()).children()?;
                Ok(SessionReply::Children {
                    children: children.iter().map(ChildRecord::info).collect(),
                })
            }
            SessionCall::SessionStatus { id } => {
                let child = Session::new(&mut self.store(), now_ms())
                    .child(&id)
                    .map_err(|_| {
                        AppError::client(
                            ErrorCode::NotFound,
                            format!("{id} is not a child of this session"),
                        )
                    })?;
                Ok(SessionReply::Status {
                    child: child.info(),
                })
            }
            SessionCall::SpawnSession {
                prompt,
                repo,
                title,
            } => Ok(SessionReply::Spawned {
                child: self.spawn(prompt, repo, title).await?,
            }),
        }
    }

    /// Spawn a child: guardrails (here, then at the root), record it, create it. A child whose
    /// creation failed stays recorded as `failed`.
    async fn spawn(
        &self,
        prompt: String,
        repo: Option<String>,
        title: Option<String>,
    ) -> Result<ChildInfo, AppError> {
        if prompt.trim().is_empty() || prompt.len() > MAX_PROMPT_BYTES {
            return Err(AppError::client(
                ErrorCode::BadRequest,
                format!("prompt must be between 1 and {MAX_PROMPT_BYTES} bytes"),
            ));
        }
        let limits = crate::config::child_limits(&self.env);
        let (info, plan, members, connect_url) = {
            let mut store = self.store();
            let members = store.members()?;
            let session = Session::new(&mut store, now_ms());
            let plan = session.plan_spawn(&limits)?;
            (
                session.info()?,
                plan,
                members,
                session.sandbox_plan()?.connect_url,
            )
        };
        let repo = repo
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| info.repo.clone());
        if !crate::route::valid_repo(&repo) {
            return Err(AppError::client(
                ErrorCode::BadRequest,
                "repo must be `owner/name`",
            ));
        }
        let title = title
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| derived_title(&prompt));
        if title.chars().count() > TITLE_MAX_CHARS {
            return Err(AppError::client(
                ErrorCode::BadRequest,
                format!("title is limited to {TITLE_MAX_CHARS} characters"),
            ));
        }
        self.reserve_in_tree(&plan.family.root_session_id, &info.id, &limits)
            .await?;
        let id = random_hex(16)?;
        let base_branch = if repo == info.repo {
            info.base_branch.clone()
        } else {
            "main".to_owned()
        };
        let connect_url = connect_url.replace(
            &format!("/sandbox/{}/ws", info.id),
            &format!("/sandbox/{id}/ws"),
        );
        let record = ChildRecord {
            id: id.clone(),
            repo: repo.clone(),
            title: title.clone(),
            status: SessionStatus::Starting,
            status_seq: 0,
            created_ms: now_ms(),
        };
        // Recorded first, so the child's first report finds it.
        let effects = Session::new(&mut self.store(), now_ms()).child_created(record.clone())?;
        self.deliver(effects);
        let body = super::CreateSessionInternal {
            id: id.clone(),
            repo,
            base_branch,
            title,
            model: info.model,
            parent_session_id: Some(info.id),
            connect_url,
            family: Some(plan.family),
            participants: members,
            prompt: Some(prompt),
        };
        let created = match call(&self.env, &id, "/create", Some(&plan.author), &body).await {
            Ok(response) if response.status_code() == 201 => Ok(()),
            Ok(response) => Err(refusal(response).await),
            Err(e) => Err(e),
        };
        if let Err(e) = created {
            let effects = Session::new(&mut self.store(), now_ms()).child_status(
                &id,
                SessionStatus::Failed,
                u64::MAX,
            )?;
            self.deliver(effects);
            return Err(e);
        }
        Ok(record.info())
    }

    /// Count one more session in the tree of `root` (this session itself, or asked over a call).
    async fn reserve_in_tree(
        &self,
        root: &str,
        own_id: &str,
        limits: &ChildLimits,
    ) -> Result<(), AppError> {
        if root == own_id {
            Session::new(&mut self.store(), now_ms()).reserve_in_tree(limits)?;
            return Ok(());
        }
        let response = call(&self.env, root, "/internal/tree-reserve", None, limits).await?;
        if response.status_code() == 200 {
            Ok(())
        } else {
            Err(refusal(response).await)
        }
    }

    /// After events that may change the listing status: tell the parent (in the background) when it
    /// did. A lost report is logged; the next change reports again.
    pub(super) fn report_to_parent(&self) {
        let report = match Session::new(&mut self.store(), now_ms()).status_report() {
            Ok(Some(report)) => report,
            Ok(None) => return,
            Err(e) => {
                worker::console_error!("child status report failed: {e}");
                return;
            }
        };
        let env = self.env.clone();
        worker::wasm_bindgen_futures::spawn_local(async move {
            let parent = report.parent_session_id.clone();
            match call(&env, &parent, "/internal/child-status", None, &report).await {
                Ok(response) if response.status_code() == 204 => {}
                Ok(response) => worker::console_error!(
                    "parent {parent} answered {} to a status report",
                    response.status_code()
                ),
                Err(e) => worker::console_error!("status report to {parent} failed: {e:?}"),
            }
        });
    }

    /// Stop a child's tree (it stops its own children in turn).
    pub(super) async fn stop_child(&self, stop: &TreeStop) -> Result<(), AppError> {
        let response = call(
            &self.env,
            &stop.session_id,
            "/internal/stop-tree",
            None,
            &stop.by,
        )
        .await?;
        if response.status_code() == 204 {
            Ok(())
        } else {
            Err(refusal(response).await)
        }
    }

    /// The internal routes of a tree; `None` for any other path.
    pub(super) async fn serve_internal(
        &self,
        path: &str,
        text: &str,
    ) -> Option<Result<Response, AppError>> {
        let result = match path {
            "/internal/tree-reserve" => (|| {
                let limits: ChildLimits = crate::error::parse_body(text, 4096)?;
                let spawned = Session::new(&mut self.store(), now_ms()).reserve_in_tree(&limits)?;
                Ok(crate::error::json_response(
                    &serde_json::json!({ "spawned_in_tree": spawned }),
                    200,
                ))
            })(),
            "/internal/child-status" => (|| {
                let report: ChildReport = crate::error::parse_body(text, 4096)?;
                let effects = Session::new(&mut self.store(), now_ms()).child_status(
                    &report.id,
                    report.status,
                    report.seq,
                )?;
                self.deliver(effects);
                Ok(Response::empty()?.with_status(204))
            })(),
            "/internal/stop-tree" => (|| {
                let by: Author = crate::error::parse_body(text, 4096)?;
                let effects = Session::new(&mut self.store(), now_ms())
                    .stop(&by, nightshift_protocol::StopScope::Tree)?;
                self.deliver(effects);
                Ok(Response::empty()?.with_status(204))
            })(),
            _ => return None,
        };
        Some(result)
    }
}

/// A title from the prompt's first line.
fn derived_title(prompt: &str) -> String {
    let line = prompt.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut title: String = line.trim().chars().take(DERIVED_TITLE_CHARS).collect();
    if line.trim().chars().count() > DERIVED_TITLE_CHARS {
        title.push('…');
    }
    title
}

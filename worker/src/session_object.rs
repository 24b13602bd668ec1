//! `SessionObject`: one Durable Object per session. It persists through [`SqlStore`] and delivers what
//! `nightshift_session` decides; every socket is accepted with the hibernation API and carries its identity
//! as an attachment, so nothing lives only in memory. It registers the session's repository with that
//! repository's `RepoObject` on create (logging its warning as a `notice`), and turns `typing` into a
//! background warm-up request there and into presence. It keeps the session's entry in the D1 index
//! (`index`) up to date as events are logged and people join. Sub-sessions: [`children`].

mod children;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use nightshift_protocol::http::{
    CreateInviteRequest, EventsPage, InvitesResponse, PromptRequest, PromptResponse, StopRequest,
};
use nightshift_protocol::provider::{CreateSandboxRequest, SandboxEnded, SandboxInfo};
use nightshift_protocol::{
    client, decode_agent_message, decode_client_message, AgentMessage, Author, ClientMessage,
    ErrorCode, EventEnvelope, Participant, ServerMessage, ServerToAgent, SessionInfo,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use nightshift_session::ceiling::DAY_MS;
use nightshift_session::presence::{
    next_typing_end_ms, online_logins, typing_logins, with_typing, ClientIdentity,
};
use nightshift_session::repo::warm_allowed;
use nightshift_session::{
    AlarmChange, Effects, Family, IndexMark, Member, Membership, SandboxAction, Session,
    SessionError, TreeStop, UsageReport,
};
use worker::{
    durable_object, Date, DurableObject, Env, Method, Request, Response, SqlStorage, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::error::{json_response, parse_body, AppError};
use crate::index;
use crate::provider::{Provider, ProviderError};
use crate::repo_object::{self, RepoCall};
use crate::secret::{constant_time_eq, random_hex, sha256_hex};
use crate::sql_store::{migrate, SqlStore};

/// Header through which the Worker tells the object who is calling (set only by the Worker).
pub const USER_HEADER: &str = "x-nightshift-user";

const CLIENT_TAG: &str = "client";
const AGENT_TAG: &str = "agent";
const REPLAY_PAGE: u32 = 500;
/// The most one `events` frame carries (an event larger than this goes alone).
const EVENTS_FRAME_MAX_BYTES: usize = 256 * 1024;
const EVENTS_PAGE_MAX: u32 = 1000;
/// Sending a frame costs the object about 0.1 ms per connected client, so with many clients a stream of
/// events is sent at most once per window: the window grows by 1 ms per this many greeted clients…
const FANOUT_CLIENTS_PER_WINDOW_MS: usize = 16;
/// …up to this bound on the latency it may add.
const FANOUT_WINDOW_MAX_MS: u64 = 10;

/// What the Worker sends the object to create its session (an internal body, not part of the contract).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateSessionInternal {
    /// Session id (also the object's name).
    pub id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Base branch.
    pub base_branch: String,
    /// Title.
    pub title: String,
    /// Model.
    pub model: String,
    /// Parent session.
    pub parent_session_id: Option<String>,
    /// Where the agent dials in.
    pub connect_url: String,
    /// A spawned child's place in its tree (`None` for a session created through the API).
    #[serde(default)]
    pub family: Option<Family>,
    /// A spawned child's participants besides its creator: a copy of the parent's.
    #[serde(default)]
    pub participants: Vec<Member>,
    /// A spawned child's first prompt, queued at once as the creator's.
    #[serde(default)]
    pub prompt: Option<String>,
}

/// The session Durable Object.
#[durable_object]
pub struct SessionObject {
    state: State,
    env: Env,
    /// Delivery of logged events to greeted clients (see [`Fanout`]).
    fanout: Rc<RefCell<Fanout>>,
    /// Whether a task is waiting to announce that someone stopped typing.
    typing_watch: Rc<Cell<bool>>,
    /// Provider calls the session asked for, performed in order by [`SessionObject::settle`] at the end
    /// of the handler that produced them.
    actions: Rc<RefCell<Vec<SandboxAction>>>,
    /// Usage to add to people's days (their `UserObject`s), sent by [`SessionObject::settle`].
    reports: Rc<RefCell<Vec<UsageReport>>>,
    /// Children to stop because this session's tree was stopped, sent by [`SessionObject::settle`].
    tree_stops: Rc<RefCell<Vec<TreeStop>>>,
}

/// Events already stored but not yet sent, and the greeted sockets to send them to.
///
/// With few clients logged events leave at once. With many, the first event of a burst starts a short
/// window (it grows with the number of clients), and a task sends whatever gathered when it ends, as one
/// `events` frame per client instead of one frame per event. Both parts
/// are derived: the events are in SQLite (a client that misses them replays), and `greeted` is rebuilt
/// from the socket attachments whenever a client says hello or leaves, or after hibernation.
#[derive(Default)]
struct Fanout {
    /// Serialized `EventEnvelope`s, in `seq` order.
    pending: Vec<String>,
    /// Whether a flush task is scheduled.
    scheduled: bool,
    /// Greeted client sockets; `None` until computed.
    greeted: Option<Vec<WebSocket>>,
}

impl Fanout {
    /// Send everything pending to `clients`: one `event` frame for one event, `events` frames for more.
    fn flush(&mut self, clients: &[WebSocket]) {
        let pending = std::mem::take(&mut self.pending);
        for frame in client::event_frames(&pending, EVENTS_FRAME_MAX_BYTES) {
            for ws in clients {
                let _ = ws.send_with_str(&frame);
            }
        }
    }
}

impl DurableObject for SessionObject {
    fn new(state: State, env: Env) -> Self {
        if let Err(e) = migrate(&state.storage().sql()) {
            worker::console_error!("session schema migration failed: {e}");
        }
        SessionObject {
            state,
            env,
            fanout: Rc::new(RefCell::new(Fanout::default())),
            typing_watch: Rc::new(Cell::new(false)),
            actions: Rc::new(RefCell::new(Vec::new())),
            reports: Rc::new(RefCell::new(Vec::new())),
            tree_stops: Rc::new(RefCell::new(Vec::new())),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let response = match self.serve(req).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        self.settle().await;
        Ok(response)
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> worker::Result<()> {
        let is_agent = self.state.get_tags(&ws).iter().any(|t| t == AGENT_TAG);
        let text = match message {
            WebSocketIncomingMessage::String(text) => text,
            WebSocketIncomingMessage::Binary(_) => {
                self.refuse(
                    &ws,
                    is_agent,
                    ErrorCode::BinaryFrame,
                    "binary frames are not accepted; send JSON text",
                );
                return Ok(());
            }
        };
        if text.len() > MAX_FRAME_BYTES {
            self.refuse(
                &ws,
                is_agent,
                ErrorCode::FrameTooLarge,
                &format!("frames are limited to {MAX_FRAME_BYTES} bytes"),
            );
            return Ok(());
        }
        if !is_agent {
            if let (Ok(ClientMessage::Prompt { .. }), Ok(Some(identity))) = (
                decode_client_message(&text),
                ws.deserialize_attachment::<ClientIdentity>(),
            ) {
                if identity.greeted {
                    self.refresh_spend(&identity.author.login).await;
                }
            }
        }
        let result = if is_agent {
            match decode_agent_message(&text) {
                // A request is answered after whatever it takes (a child is created over a call).
                Ok(AgentMessage::Request { request_id, call }) => {
                    let reply = self.answer(call).await;
                    send(&ws, &ServerToAgent::Reply { request_id, reply });
                    Ok(())
                }
                Ok(message) => self.on_agent_message(message),
                Err(e) => Err(AppError::client(e.code, e.message)),
            }
        } else {
            self.on_client_frame(&ws, &text)
        };
        if let Err(e) = result {
            let (code, message) = match e {
                AppError::Client { code, message } => (code, message),
                AppError::Internal(detail) => {
                    worker::console_error!("websocket message failed: {detail}");
                    (ErrorCode::Internal, "internal error".to_owned())
                }
            };
            self.refuse(&ws, is_agent, code, &message);
        }
        self.settle().await;
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        _code: usize,
        _reason: String,
        _was_clean: bool,
    ) -> worker::Result<()> {
        self.on_socket_gone(&ws);
        self.settle().await;
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, error: worker::Error) -> worker::Result<()> {
        worker::console_log!("websocket error: {error}");
        self.on_socket_gone(&ws);
        self.settle().await;
        Ok(())
    }

    /// The one alarm: whatever deadline is due (see `nightshift_session::lifecycle`), then re-armed
    /// for the next.
    async fn alarm(&self) -> worker::Result<Response> {
        let outcome = Session::new(&mut self.store(), now_ms()).on_alarm(self.agent_online());
        match outcome {
            Ok(effects) => self.deliver(effects),
            Err(e) => {
                worker::console_error!("session alarm failed: {e}");
                // Never leave the session without an alarm: try again in a minute.
                if let Err(e) = self.state.storage().set_alarm(60_000i64).await {
                    worker::console_error!("re-arming after a failed alarm failed: {e}");
                }
                return Response::ok("failed");
            }
        }
        self.settle().await;
        Response::ok("done")
    }
}

fn now_ms() -> u64 {
    Date::now().as_millis()
}

fn caller(req: &Request) -> Result<Author, AppError> {
    let header = req
        .headers()
        .get(USER_HEADER)?
        .ok_or_else(AppError::unauthorized)?;
    serde_json::from_str(&header).map_err(|_| AppError::unauthorized())
}

/// What the object answers its own `/invites` (the Worker turns the secret into the share URL).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreatedInvite {
    /// The invite's secret (only ever shown once, in the link).
    pub secret: String,
    /// Public id.
    pub invite_id: String,
    /// When it stops working.
    pub expires_ms: u64,
}

/// The identities on `sockets` (those without one are skipped).
fn identities_of(sockets: &[WebSocket]) -> Vec<ClientIdentity> {
    sockets
        .iter()
        .filter_map(|ws| ws.deserialize_attachment::<ClientIdentity>().ok().flatten())
        .collect()
}

/// Send `presence` (members from `sql`, online and typing from the sockets' identities) to `sockets`.
fn broadcast_presence_to(
    sql: &SqlStorage,
    sockets: &[WebSocket],
    now_ms: u64,
) -> Result<(), AppError> {
    let identities = identities_of(sockets);
    let online = online_logins(identities.iter());
    let typing = typing_logins(identities.iter(), now_ms);
    let mut store = SqlStore::new(sql.clone());
    let participants = with_typing(
        Session::new(&mut store, now_ms).participants(&online)?,
        &typing,
    );
    let text = serde_json::to_string(&ServerMessage::Presence { participants })?;
    for ws in sockets {
        let _ = ws.send_with_str(&text);
    }
    Ok(())
}

fn send(ws: &WebSocket, message: &impl serde::Serialize) {
    match serde_json::to_string(message) {
        Ok(text) => send_frame(ws, &text),
        Err(e) => worker::console_error!("serialize failed: {e}"),
    }
}

fn send_frame(ws: &WebSocket, text: &str) {
    if let Err(e) = ws.send_with_str(text) {
        worker::console_log!("send failed: {e}");
    }
}

impl SessionObject {
    fn store(&self) -> SqlStore {
        SqlStore::new(self.state.storage().sql())
    }

    fn refuse(&self, ws: &WebSocket, is_agent: bool, code: ErrorCode, message: &str) {
        if is_agent {
            send(
                ws,
                &ServerToAgent::Error {
                    code,
                    message: message.to_owned(),
                },
            );
        } else {
            send(
                ws,
                &ServerMessage::Error {
                    code,
                    message: message.to_owned(),
                },
            );
        }
    }

    /// Greeted client sockets with their identities.
    fn clients(&self) -> Vec<(WebSocket, ClientIdentity)> {
        self.state
            .get_websockets_with_tag(CLIENT_TAG)
            .into_iter()
            .filter_map(|ws| {
                let identity = ws
                    .deserialize_attachment::<ClientIdentity>()
                    .ok()
                    .flatten()?;
                Some((ws, identity))
            })
            .collect()
    }

    /// Client sockets that said hello: they get broadcasts.
    fn greeted_clients(&self) -> Vec<WebSocket> {
        if let Some(cached) = self.fanout.borrow().greeted.as_ref() {
            return cached.clone();
        }
        self.refresh_greeted()
    }

    /// Recompute the greeted sockets from the attachments (after one said hello or left).
    fn refresh_greeted(&self) -> Vec<WebSocket> {
        let fresh: Vec<WebSocket> = self
            .clients()
            .into_iter()
            .filter(|(_, identity)| identity.greeted)
            .map(|(ws, _)| ws)
            .collect();
        self.fanout.borrow_mut().greeted = Some(fresh.clone());
        fresh
    }

    /// Send pending events now, to the clients greeted so far. Called before the set of greeted clients
    /// changes, so a new client's replay never overlaps a later flush and a leaving one gets what it can.
    fn flush_now(&self) {
        let clients = self.greeted_clients();
        self.fanout.borrow_mut().flush(&clients);
    }

    fn agent_online(&self) -> bool {
        !self.state.get_websockets_with_tag(AGENT_TAG).is_empty()
    }

    fn online(&self) -> Vec<String> {
        let clients = self.clients();
        online_logins(clients.iter().map(|(_, identity)| identity))
    }

    /// Broadcast logged events to greeted clients and hand agent messages to the agent.
    fn deliver(&self, effects: Effects) {
        if !effects.events.is_empty() {
            // Computed now so a flush task finds the set (it cannot read attachments itself).
            let clients = self.greeted_clients();
            let window_ms = (clients.len() / FANOUT_CLIENTS_PER_WINDOW_MS) as u64;
            let window_ms = window_ms.min(FANOUT_WINDOW_MAX_MS);
            let wait_ms = {
                let mut fanout = self.fanout.borrow_mut();
                fanout.pending.extend(
                    effects
                        .events
                        .iter()
                        .filter_map(|e| serde_json::to_string(e).ok()),
                );
                if fanout.scheduled {
                    None
                } else if window_ms == 0 {
                    fanout.flush(&clients);
                    None
                } else {
                    fanout.scheduled = true;
                    Some(window_ms)
                }
            };
            if let Some(wait_ms) = wait_ms {
                let fanout = Rc::clone(&self.fanout);
                worker::wasm_bindgen_futures::spawn_local(async move {
                    worker::Delay::from(std::time::Duration::from_millis(wait_ms)).await;
                    let mut fanout = fanout.borrow_mut();
                    fanout.scheduled = false;
                    let clients = fanout.greeted.clone().unwrap_or_default();
                    fanout.flush(&clients);
                });
            }
        }
        if !effects.events.is_empty() {
            self.index_after(&effects.events);
            if effects
                .events
                .iter()
                .any(|e| nightshift_session::index::changes_status(&e.event))
            {
                self.report_to_parent();
            }
        }
        if !effects.to_agent.is_empty() {
            let agents = self.state.get_websockets_with_tag(AGENT_TAG);
            for message in &effects.to_agent {
                for ws in &agents {
                    send(ws, message);
                }
            }
        }
        if effects.close_agent {
            for ws in self.state.get_websockets_with_tag(AGENT_TAG) {
                let _ = ws.close(Some(4001), Some("the agent stopped answering"));
            }
        }
        self.actions.borrow_mut().extend(effects.sandbox);
        self.reports.borrow_mut().extend(effects.usage_reports);
        self.tree_stops.borrow_mut().extend(effects.stop_children);
    }

    /// Perform the provider calls the session asked for (each may lead to more), then arm the one
    /// alarm for the earliest deadline. Called at the end of every handler; failures are logged and
    /// reported to the session, never raised.
    async fn settle(&self) {
        loop {
            let next = {
                let mut actions = self.actions.borrow_mut();
                if actions.is_empty() {
                    None
                } else {
                    Some(actions.remove(0))
                }
            };
            let Some(action) = next else {
                let report = {
                    let mut reports = self.reports.borrow_mut();
                    if reports.is_empty() {
                        None
                    } else {
                        Some(reports.remove(0))
                    }
                };
                let Some(report) = report else {
                    let stop = {
                        let mut stops = self.tree_stops.borrow_mut();
                        if stops.is_empty() {
                            None
                        } else {
                            Some(stops.remove(0))
                        }
                    };
                    let Some(stop) = stop else { break };
                    // The child's own failure (e.g. long gone) does not stop the rest of the tree.
                    if let Err(e) = self.stop_child(&stop).await {
                        worker::console_error!("stopping child {} failed: {e:?}", stop.session_id);
                    }
                    continue;
                };
                // Bookkeeping of the person's day: a failure is logged, never fails the session.
                if let Err(e) = self.report_usage(&report).await {
                    worker::console_error!("usage of {} not counted: {e:?}", report.login);
                }
                continue;
            };
            let result = match action {
                SandboxAction::Create => self.create_sandbox().await,
                SandboxAction::Delete { sandbox_id } => match Provider::from_env(&self.env) {
                    Ok(provider) => provider.delete_sandbox(&sandbox_id).await,
                    Err(e) => Err(e),
                }
                .map_err(|e| AppError::Internal(format!("deleting sandbox {sandbox_id}: {e}"))),
            };
            if let Err(e) = result {
                worker::console_error!("provider call failed: {e:?}");
            }
        }
        if let Err(e) = self.arm().await {
            worker::console_error!("arming the session alarm failed: {e:?}");
        }
    }

    /// Add a usage to its person's day and tell the session the day's total.
    async fn report_usage(&self, report: &UsageReport) -> Result<(), AppError> {
        let spend = crate::user_object::add(&self.env, report).await?;
        let effects = Session::new(&mut self.store(), now_ms()).user_spend(&report.login, spend)?;
        self.deliver(effects);
        Ok(())
    }

    /// Before a person's prompt is accepted: learn their day's usage across sessions, so the session
    /// checks their daily ceiling before it dispatches. A failure is logged (the prompt is accepted).
    async fn refresh_spend(&self, login: &str) {
        let now = now_ms();
        let result = async {
            let spend = crate::user_object::day(&self.env, login, now / DAY_MS).await?;
            let effects = Session::new(&mut self.store(), now_ms()).user_spend(login, spend)?;
            self.deliver(effects);
            Ok::<(), AppError>(())
        }
        .await;
        if let Err(e) = result {
            worker::console_error!("daily usage of {login} unknown: {e:?}");
        }
    }

    /// Set (or delete) the one alarm when the earliest deadline changed.
    async fn arm(&self) -> Result<(), AppError> {
        let change = Session::new(&mut self.store(), now_ms()).alarm_change()?;
        match change {
            None => {}
            Some(AlarmChange::Set(at_ms)) => {
                let offset_ms = i64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(i64::MAX);
                self.state.storage().set_alarm(offset_ms).await?;
            }
            Some(AlarmChange::Clear) => self.state.storage().delete_alarm().await?,
        }
        Ok(())
    }

    /// Ask the provider for the session's next sandbox: a fresh token (only its hash is kept), the
    /// newest snapshot when there is one, and the outcome told to the session.
    async fn create_sandbox(&self) -> Result<(), AppError> {
        let token = random_hex(32)?;
        let (info, plan) = {
            let mut store = self.store();
            let mut session = Session::new(&mut store, now_ms());
            session.sandbox_token_replaced(&sha256_hex(&token))?;
            (session.info()?, session.sandbox_plan()?)
        };
        let request = CreateSandboxRequest {
            repo: Some(info.repo.clone()),
            snapshot: plan.snapshot,
            base_branch: Some(info.base_branch.clone()),
            session_id: info.id.clone(),
            connect_url: plan.connect_url,
            sandbox_token: token,
            timeout_ms: plan.timeout_ms,
        };
        let outcome = self.request_sandbox(&request).await;
        let mut store = self.store();
        let mut session = Session::new(&mut store, now_ms());
        let effects = match outcome {
            Ok(sandbox) => session.sandbox_requested(&sandbox.id)?,
            Err(detail) => {
                worker::console_error!("sandbox request for {} failed: {detail}", info.id);
                // A snapshot the provider can no longer restore is forgotten: the next attempt
                // starts from the repository and the session branch.
                let unrestorable = request.snapshot.is_some()
                    && matches!(&detail, ProviderError::Refused { code, .. }
                        if code == "snapshot_image_gone" || code == "not_found");
                let mut effects = if unrestorable {
                    session.snapshot_unrestorable(&detail.to_string())?
                } else {
                    Effects::default()
                };
                effects.merge(session.sandbox_request_failed(&detail.to_string())?);
                effects
            }
        };
        self.deliver(effects);
        Ok(())
    }

    fn broadcast_presence(&self) -> Result<(), AppError> {
        let sockets: Vec<WebSocket> = self
            .clients()
            .into_iter()
            .filter(|(_, identity)| identity.greeted)
            .map(|(ws, _)| ws)
            .collect();
        broadcast_presence_to(&self.state.storage().sql(), &sockets, now_ms())
    }

    /// Everyone in the session, marked online and typing as of now.
    fn participants_now(
        &self,
        session: &Session<'_, SqlStore>,
    ) -> Result<Vec<Participant>, AppError> {
        let clients = self.clients();
        let identities: Vec<&ClientIdentity> = clients.iter().map(|(_, i)| i).collect();
        let online = online_logins(identities.iter().copied());
        let typing = typing_logins(identities.iter().copied(), now_ms());
        Ok(with_typing(session.participants(&online)?, &typing))
    }

    /// Logins typing now.
    fn typing_now(&self) -> Vec<String> {
        let clients = self.clients();
        typing_logins(clients.iter().map(|(_, i)| i), now_ms())
    }

    /// Make sure a task will announce when the people typing now stop: it sleeps until the first
    /// of them stops, broadcasts presence if who is typing changed, and repeats while anyone types.
    fn watch_typing(&self) {
        if self.typing_watch.replace(true) {
            return;
        }
        let watching = Rc::clone(&self.typing_watch);
        let fanout = Rc::clone(&self.fanout);
        let sql = self.state.storage().sql();
        let mut announced = self.typing_now();
        worker::wasm_bindgen_futures::spawn_local(async move {
            loop {
                let sockets = fanout.borrow().greeted.clone().unwrap_or_default();
                let identities = identities_of(&sockets);
                let now = now_ms();
                let typing = typing_logins(identities.iter(), now);
                if typing != announced {
                    if let Err(e) = broadcast_presence_to(&sql, &sockets, now) {
                        worker::console_error!("presence after typing failed: {e:?}");
                    }
                    announced = typing;
                }
                let Some(end_ms) = next_typing_end_ms(identities.iter(), now) else {
                    break;
                };
                let wait_ms = end_ms.saturating_sub(now).saturating_add(1);
                worker::Delay::from(std::time::Duration::from_millis(wait_ms)).await;
            }
            watching.set(false);
        });
    }

    /// After `events` were logged: write the session's index entry when it is due (in the background).
    fn index_after(&self, events: &[EventEnvelope]) {
        let activity_ms = events.last().map_or_else(now_ms, |e| e.ts_ms);
        let mut store = self.store();
        match nightshift_session::index::after_events(&mut store, events, activity_ms) {
            Ok(Some(mark)) => self.write_index(&mut store, mark),
            Ok(None) => {}
            Err(e) => worker::console_error!("index check failed: {e}"),
        }
    }

    /// Write the index entry now if it is due (after a join).
    fn index_now(&self) {
        let mut store = self.store();
        match nightshift_session::index::take_due(&mut store, now_ms()) {
            Ok(Some(mark)) => self.write_index(&mut store, mark),
            Ok(None) => {}
            Err(e) => worker::console_error!("index check failed: {e}"),
        }
    }

    fn write_index(&self, store: &mut SqlStore, mark: IndexMark) {
        let entry = (|| {
            let session = Session::new(&mut *store, now_ms());
            let info = session.info()?;
            let version = session.last_seq()?;
            let participants = nightshift_session::Store::members(&*store)?;
            Ok::<index::Entry, AppError>(index::Entry {
                id: info.id,
                repo: info.repo,
                title: info.title,
                created_by: info.created_by.login,
                created_ms: info.created_ms,
                mark,
                version,
                participants,
            })
        })();
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                worker::console_error!("index entry failed: {e:?}");
                return;
            }
        };
        let env = self.env.clone();
        worker::wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = index::write(&env, &entry).await {
                worker::console_error!("index write for {} failed: {e:?}", entry.id);
            }
        });
    }

    fn require_member(
        &self,
        store: &mut SqlStore,
        user: &Author,
    ) -> Result<nightshift_session::Member, AppError> {
        let session = Session::new(store, now_ms());
        session.info()?;
        session
            .member(&user.login)?
            .ok_or_else(AppError::session_not_found)
    }

    async fn serve(&self, mut req: Request) -> Result<Response, AppError> {
        let url = req.url()?;
        let path = url.path().to_owned();
        match (req.method(), path.as_str()) {
            (Method::Post, "/create") => {
                let user = caller(&req)?;
                let body: CreateSessionInternal = parse_body(&req.text().await?, 64 * 1024)?;
                self.create(user, body).await
            }
            (Method::Get, "/agent-ws") => self.accept_agent(&req),
            (Method::Post, internal) if internal.starts_with("/internal/") => {
                let text = req.text().await?;
                self.serve_internal(internal, &text)
                    .await
                    .unwrap_or_else(|| Err(AppError::client(ErrorCode::NotFound, "no such route")))
            }
            (Method::Post, "/sandbox-ended") => {
                self.check_sandbox_token(&req)?;
                let ended: SandboxEnded = parse_body(&req.text().await?, 16 * 1024)?;
                let effects = Session::new(&mut self.store(), now_ms()).sandbox_ended(&ended)?;
                self.deliver(effects);
                Ok(Response::empty()?.with_status(204))
            }
            (Method::Post, "/join") => {
                let user = caller(&req)?;
                let secret: String = parse_body(&req.text().await?, 4096)?;
                self.join(user, &secret)
            }
            (method, _) => {
                let user = caller(&req)?;
                let mut store = self.store();
                let member = self.require_member(&mut store, &user)?;
                match (method, path.as_str()) {
                    (Method::Get, "/state") => {
                        let mut state = Session::new(&mut store, now_ms())
                            .state(&self.online(), self.agent_online())?;
                        state.participants = with_typing(state.participants, &self.typing_now());
                        Ok(json_response(&state, 200))
                    }
                    (Method::Get, "/events") => self.events_page(&mut store, &url),
                    (Method::Post, "/prompts") => {
                        let body: PromptRequest =
                            parse_body(&req.text().await?, 2 * MAX_FRAME_BYTES)?;
                        self.refresh_spend(&user.login).await;
                        let (submitted, effects) = Session::new(&mut store, now_ms())
                            .submit_prompt(
                                &user,
                                &body.text,
                                &body.idempotency_key,
                                self.agent_online(),
                            )?;
                        self.deliver(effects);
                        let status = if submitted.duplicate { 200 } else { 202 };
                        Ok(json_response(
                            &PromptResponse {
                                prompt_id: submitted.prompt_id,
                                position: submitted.position,
                            },
                            status,
                        ))
                    }
                    (Method::Post, "/stop") => {
                        let body: StopRequest = parse_body(&req.text().await?, 4096)?;
                        let effects = Session::new(&mut store, now_ms()).stop(&user, body.scope)?;
                        self.deliver(effects);
                        Ok(json_response(&serde_json::json!({"ok": true}), 200))
                    }
                    (Method::Post, "/invites") => {
                        let text = req.text().await?;
                        let body: CreateInviteRequest = if text.trim().is_empty() {
                            CreateInviteRequest::default()
                        } else {
                            parse_body(&text, 4096)?
                        };
                        let secret = random_hex(16)?;
                        let invite = Membership::new(&mut store, now_ms()).create_invite(
                            &user,
                            &sha256_hex(&secret),
                            body.ttl_ms,
                        )?;
                        Ok(json_response(
                            &CreatedInvite {
                                secret,
                                invite_id: invite.id,
                                expires_ms: invite.expires_ms,
                            },
                            201,
                        ))
                    }
                    (Method::Get, "/invites") => {
                        let invites = Membership::new(&mut store, now_ms()).invites(&user)?;
                        Ok(json_response(&InvitesResponse { invites }, 200))
                    }
                    (Method::Delete, invite) if invite.starts_with("/invites/") => {
                        let invite_id = invite.trim_start_matches("/invites/");
                        let revoked =
                            Membership::new(&mut store, now_ms()).revoke(&user, invite_id)?;
                        Ok(json_response(&revoked, 200))
                    }
                    (Method::Get, "/ws") => self.accept_client(user, member.role),
                    _ => Err(AppError::client(ErrorCode::NotFound, "no such route")),
                }
            }
        }
    }

    fn events_page(&self, store: &mut SqlStore, url: &worker::Url) -> Result<Response, AppError> {
        let mut after = 0u64;
        let mut limit = 200u32;
        for (key, value) in url.query_pairs() {
            let parsed = value.parse::<u64>().map_err(|_| {
                AppError::client(
                    ErrorCode::BadRequest,
                    format!("`{key}` must be a non-negative integer"),
                )
            });
            match key.as_ref() {
                "after" => after = parsed?,
                "limit" => {
                    limit = u32::try_from(parsed?.clamp(1, u64::from(EVENTS_PAGE_MAX)))
                        .unwrap_or(EVENTS_PAGE_MAX)
                }
                _ => {}
            }
        }
        let session = Session::new(store, now_ms());
        let events = session.replay(after, limit)?;
        let last_seq = session.last_seq()?;
        let has_more = events.last().is_some_and(|e| e.seq < last_seq);
        Ok(json_response(
            &EventsPage {
                events,
                last_seq,
                has_more,
            },
            200,
        ))
    }

    async fn create(
        &self,
        user: Author,
        body: CreateSessionInternal,
    ) -> Result<Response, AppError> {
        // A placeholder until the first sandbox is requested: every request gets its own token.
        let token = random_hex(32)?;
        let info = SessionInfo {
            id: body.id.clone(),
            repo: body.repo.clone(),
            base_branch: body.base_branch.clone(),
            branch: format!("nightshift/{}", body.id),
            title: body.title.clone(),
            model: body.model.clone(),
            created_by: user.clone(),
            created_ms: now_ms(),
            parent_session_id: body.parent_session_id.clone(),
        };
        let mut store = self.store();
        let effects = {
            let mut session = Session::new(&mut store, now_ms());
            let effects = session.create(info, sha256_hex(&token))?;
            if let Some(family) = &body.family {
                session.adopt(family)?;
            }
            effects
        };
        // A child's participants are the parent's (its creator stays its owner).
        for member in body
            .participants
            .iter()
            .filter(|m| m.author.login != user.login)
        {
            nightshift_session::Store::upsert_member(
                &mut store,
                &Member {
                    joined_ms: now_ms(),
                    ..member.clone()
                },
            )?;
        }
        self.deliver(effects);
        if let Some(text) = self.register_repo(&body.repo).await {
            let mut store = self.store();
            let effects = Session::new(&mut store, now_ms()).notice("warn", &text)?;
            self.deliver(effects);
        }
        let settings = crate::config::lifecycle_settings(&self.env);
        let ceilings = crate::config::cost_ceilings(&self.env);
        let effects = Session::new(&mut self.store(), now_ms()).begin_lifecycle(
            settings,
            ceilings,
            &body.connect_url,
        )?;
        self.deliver(effects);
        if let Some(prompt) = &body.prompt {
            let (_, effects) = Session::new(&mut self.store(), now_ms()).submit_prompt(
                &user,
                prompt,
                "spawned",
                self.agent_online(),
            )?;
            self.deliver(effects);
        }
        // The first sandbox is requested before the answer leaves.
        self.settle().await;
        Ok(json_response(&serde_json::json!({ "id": body.id }), 201))
    }

    /// Ask the provider for a sandbox. The error text never contains the tokens.
    async fn request_sandbox(
        &self,
        request: &CreateSandboxRequest,
    ) -> Result<SandboxInfo, ProviderError> {
        Provider::from_env(&self.env)?.create_sandbox(request).await
    }

    /// Tell the repository's object about this session's repository (registering it on first use) and
    /// return the `warn` notice the session should log (stale image, failed build). Bookkeeping only:
    /// a failure is logged and never fails the session.
    async fn register_repo(&self, repo: &str) -> Option<String> {
        match repo_object::register(&self.env, repo).await {
            Ok(registered) => registered.session_notice,
            Err(e) => {
                worker::console_error!("registering repository {repo} failed: {e:?}");
                None
            }
        }
    }

    /// Ask the repository's object for a warm-up, in the background: typing never waits for it and never
    /// sees its errors (they are logged). The object applies the per-session rate limit.
    fn warm_in_background(&self, repo: &str, session_id: &str) {
        let call = RepoCall {
            repo: repo.to_owned(),
            caller: Some(format!("session:{session_id}")),
            settings: None,
        };
        let prepared = repo_object::internal_request(Method::Post, "/warm", Some(&call))
            .and_then(|request| Ok((repo_object::stub(&self.env, repo)?, request)));
        let (stub, request) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                worker::console_error!("warm-up of {repo} not sent: {e:?}");
                return;
            }
        };
        let repo = repo.to_owned();
        worker::wasm_bindgen_futures::spawn_local(async move {
            match stub.fetch_with_request(request).await {
                Ok(response) if response.status_code() == 202 => {}
                Ok(response) => {
                    worker::console_error!("warm-up of {repo} answered {}", response.status_code())
                }
                Err(e) => worker::console_error!("warm-up of {repo} failed: {e}"),
            }
        });
    }

    /// Join with an invite's secret: unknown → the missing-session 404; expired or revoked → their
    /// typed refusals. A new participant is announced in `presence` and written to the index.
    fn join(&self, user: Author, secret: &str) -> Result<Response, AppError> {
        let mut store = self.store();
        let info = Session::new(&mut store, now_ms()).info()?;
        let (_, new) = Membership::new(&mut store, now_ms()).redeem(&sha256_hex(secret), &user)?;
        if new {
            self.broadcast_presence()?;
            self.index_now();
        }
        Ok(json_response(&serde_json::json!({ "id": info.id }), 200))
    }

    fn accept_client(
        &self,
        user: Author,
        role: nightshift_protocol::Role,
    ) -> Result<Response, AppError> {
        let pair = WebSocketPair::new()?;
        let login_tag = format!("user:{}", user.login);
        self.state
            .accept_websocket_with_tags(&pair.server, &[CLIENT_TAG, login_tag.as_str()]);
        pair.server.serialize_attachment(ClientIdentity {
            author: user,
            role,
            greeted: false,
            client: None,
            warm_requested_ms: None,
            typing_until_ms: None,
        })?;
        Ok(Response::from_websocket(pair.client)?)
    }

    /// The request carries this session's sandbox token (compared by hash, in constant time).
    fn check_sandbox_token(&self, req: &Request) -> Result<(), AppError> {
        let token = crate::auth::bearer(req).ok_or_else(AppError::unauthorized)?;
        let mut store = self.store();
        let expected = match Session::new(&mut store, now_ms()).sandbox_token_hash() {
            Ok(hash) => hash,
            Err(SessionError::NotFound) => return Err(AppError::unauthorized()),
            Err(e) => return Err(e.into()),
        };
        if !constant_time_eq(sha256_hex(&token).as_bytes(), expected.as_bytes()) {
            return Err(AppError::unauthorized());
        }
        Ok(())
    }

    fn accept_agent(&self, req: &Request) -> Result<Response, AppError> {
        self.check_sandbox_token(req)?;
        // One agent at a time: a reconnecting agent replaces its stale socket.
        for old in self.state.get_websockets_with_tag(AGENT_TAG) {
            let _ = old.close(Some(4000), Some("replaced by a newer agent connection"));
        }
        let pair = WebSocketPair::new()?;
        self.state
            .accept_websocket_with_tags(&pair.server, &[AGENT_TAG]);
        Ok(Response::from_websocket(pair.client)?)
    }

    fn on_client_frame(&self, ws: &WebSocket, text: &str) -> Result<(), AppError> {
        let message =
            decode_client_message(text).map_err(|e| AppError::client(e.code, e.message))?;
        let mut identity: ClientIdentity = ws
            .deserialize_attachment()?
            .ok_or_else(|| AppError::Internal("client socket without identity".to_owned()))?;
        let mut store = self.store();
        match message {
            ClientMessage::Hello {
                protocol_version,
                last_seq,
                client,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(AppError::client(
                        ErrorCode::UnsupportedVersion,
                        format!("protocol_version {protocol_version} is not supported; this server speaks {PROTOCOL_VERSION}"),
                    ));
                }
                // Events logged so far go out to the clients greeted so far; this one gets them in its replay.
                self.flush_now();
                identity.greeted = true;
                identity.client = client;
                ws.serialize_attachment(&identity)?;
                self.refresh_greeted();
                let session = Session::new(&mut store, now_ms());
                let participants = self.participants_now(&session)?;
                let you = participants
                    .iter()
                    .find(|p| p.login == identity.author.login)
                    .cloned()
                    .ok_or_else(AppError::session_not_found)?;
                send(
                    ws,
                    &ServerMessage::Welcome {
                        session: session.info()?,
                        you,
                        participants,
                        queue: session.queue()?,
                        last_seq: session.last_seq()?,
                    },
                );
                // The replay goes in `events` frames: a long log reaches the page in a few frames, not one
                // per event.
                let mut after = last_seq.unwrap_or(0);
                loop {
                    let page = session.replay(after, REPLAY_PAGE)?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    let envelopes = page
                        .iter()
                        .map(serde_json::to_string)
                        .collect::<Result<Vec<_>, _>>()?;
                    for frame in client::event_frames(&envelopes, EVENTS_FRAME_MAX_BYTES) {
                        send_frame(ws, &frame);
                    }
                }
                self.broadcast_presence()
            }
            _ if !identity.greeted => Err(AppError::client(
                ErrorCode::HelloRequired,
                "send `hello` before anything else",
            )),
            ClientMessage::Prompt {
                text,
                idempotency_key,
                ..
            } => {
                let (submitted, effects) = Session::new(&mut store, now_ms()).submit_prompt(
                    &identity.author,
                    &text,
                    &idempotency_key,
                    self.agent_online(),
                )?;
                // Sending ends typing at once.
                if identity.typing_until_ms.take().is_some() {
                    let before = self.typing_now();
                    ws.serialize_attachment(&identity)?;
                    if self.typing_now() != before {
                        self.broadcast_presence()?;
                    }
                }
                send(
                    ws,
                    &ServerMessage::PromptAccepted {
                        prompt_id: submitted.prompt_id,
                        idempotency_key,
                        position: submitted.position,
                    },
                );
                self.deliver(effects);
                Ok(())
            }
            ClientMessage::CancelPrompt { prompt_id } => {
                let effects = Session::new(&mut store, now_ms())
                    .cancel_prompt(&identity.author, &prompt_id)?;
                self.deliver(effects);
                Ok(())
            }
            ClientMessage::Stop { scope } => {
                let effects = Session::new(&mut store, now_ms()).stop(&identity.author, scope)?;
                self.deliver(effects);
                Ok(())
            }
            // Presence first: the sender is typing for a few seconds (everyone hears when that starts
            // and when it ends). Then a hint to prepare a sandbox: the first `typing` of this socket
            // (and then at most one per warm-up interval) asks the repository's object for a warm-up,
            // in the background. Nothing is answered.
            ClientMessage::Typing {} => {
                let now = now_ms();
                let before = self.typing_now();
                identity.typed(now);
                let warm = warm_allowed(identity.warm_requested_ms, now);
                if warm {
                    identity.warm_requested_ms = Some(now);
                }
                ws.serialize_attachment(&identity)?;
                if self.typing_now() != before {
                    self.broadcast_presence()?;
                }
                self.watch_typing();
                if warm {
                    let mut session = Session::new(&mut store, now);
                    let info = session.info()?;
                    // A parked session restores its sandbox now, so it is ready for the prompt.
                    let effects = session.typing()?;
                    self.deliver(effects);
                    self.warm_in_background(&info.repo, &info.id);
                }
                Ok(())
            }
            ClientMessage::Ping {} => {
                send(ws, &ServerMessage::Pong {});
                Ok(())
            }
        }
    }

    fn on_agent_message(&self, message: AgentMessage) -> Result<(), AppError> {
        let mut store = self.store();
        let effects = match message {
            AgentMessage::Hello {
                protocol_version, ..
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(AppError::client(
                        ErrorCode::UnsupportedVersion,
                        format!("protocol_version {protocol_version} is not supported"),
                    ));
                }
                Session::new(&mut store, now_ms()).agent_connected()?
            }
            AgentMessage::Event {
                producer_seq,
                event,
            } => Session::new(&mut store, now_ms()).apply_agent_event(producer_seq, event)?,
            AgentMessage::Heartbeat {} => {
                Session::new(&mut store, now_ms()).agent_heartbeat()?;
                Effects::default()
            }
            // Answered in `websocket_message`, which can wait for other objects.
            AgentMessage::Request { .. } => Effects::default(),
        };
        self.deliver(effects);
        Ok(())
    }

    fn on_socket_gone(&self, ws: &WebSocket) {
        self.flush_now();
        let is_client = self.state.get_tags(ws).iter().any(|t| t == CLIENT_TAG);
        let _ = ws.close(Some(1000), Some("closed"));
        if is_client {
            // Mark the socket as gone first, so presence no longer counts it.
            if let Ok(Some(mut identity)) = ws.deserialize_attachment::<ClientIdentity>() {
                identity.greeted = false;
                let _ = ws.serialize_attachment(&identity);
            }
            self.refresh_greeted();
            if let Err(e) = self.broadcast_presence() {
                worker::console_error!("presence after close failed: {e:?}");
            }
        }
    }
}

//! The Worker's front door: authenticates the caller, validates what it can, and forwards session routes to
//! the session's Durable Object with the caller's identity in a header only the Worker sets.

use nightshift_protocol::http::{
    AuthSession, CreateSessionRequest, CreateSessionResponse, DevLoginRequest, InviteResponse,
    JoinResponse, MeResponse, RepoSettingsRequest, RepoSummary, ReposResponse, SessionStatus,
    SessionsResponse, TokenResponse, WarmRequest,
};
use nightshift_protocol::{Author, ErrorCode};
use worker::{Date, Env, Headers, Method, Request, RequestInit, Response, Url};

use crate::auth::{self, Claims, COOKIE_NAME, COOKIE_TTL_MS, TOKEN_TTL_MS};
use crate::config;
use crate::error::{internal_json, json_response, parse_body, AppError};
use crate::index;
use crate::provider::Provider;
use crate::repo_object::{self, RepoCall};
use crate::secret::{is_session_id, random_hex};
use crate::session_object::{CreateSessionInternal, CreatedInvite, USER_HEADER};

const SMALL_BODY_BYTES: usize = 16 * 1024;

/// Serve one request; every failure becomes a typed answer.
pub async fn handle(req: Request, env: Env) -> Response {
    match route(req, &env).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn now_ms() -> u64 {
    Date::now().as_millis()
}

async fn route(mut req: Request, env: &Env) -> Result<Response, AppError> {
    let url = req.url()?;
    let path = url.path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method();
    match (method.clone(), segments.as_slice()) {
        (Method::Get, ["healthz"]) => Ok(Response::ok("ok")?),
        (Method::Post, ["auth", "dev"]) => {
            if !config::dev_mode(env) {
                return Err(AppError::client(ErrorCode::NotFound, "no such route"));
            }
            let body: DevLoginRequest = parse_body(&req.text().await?, SMALL_BODY_BYTES)?;
            let user = auth::dev_author(body)?;
            let token = issue(env, &user, "cookie", COOKIE_TTL_MS)?;
            let secure = if url.scheme() == "https" {
                "; Secure"
            } else {
                ""
            };
            let cookie = format!(
                "{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
                COOKIE_TTL_MS / 1000
            );
            let mut response = json_response(
                &MeResponse {
                    user,
                    dev_mode: true,
                },
                200,
            );
            response.headers_mut().set("set-cookie", &cookie)?;
            Ok(response)
        }
        (Method::Post, ["auth", "logout"]) => {
            let mut response = json_response(&serde_json::json!({"ok": true}), 200);
            response.headers_mut().set(
                "set-cookie",
                &format!("{COOKIE_NAME}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
            )?;
            Ok(response)
        }
        (Method::Get, ["auth", "session"]) => Ok(json_response(
            &AuthSession {
                user: auth::user(&req, env, now_ms()).ok(),
                dev_mode: config::dev_mode(env),
            },
            200,
        )),
        (Method::Get, ["api", "me"]) => {
            let user = auth::user(&req, env, now_ms())?;
            Ok(json_response(
                &MeResponse {
                    user,
                    dev_mode: config::dev_mode(env),
                },
                200,
            ))
        }
        (Method::Post, ["api", "tokens"]) => {
            let user = auth::user(&req, env, now_ms())?;
            let token = issue(env, &user, "api", TOKEN_TTL_MS)?;
            Ok(json_response(
                &TokenResponse {
                    token,
                    expires_ms: now_ms() + TOKEN_TTL_MS,
                },
                201,
            ))
        }
        (Method::Post, ["api", "sessions"]) => create_session(req, env, &url).await,
        (Method::Get, ["api", "sessions"]) => {
            let user = auth::user(&req, env, now_ms())?;
            list_sessions(env, &user, &url).await
        }
        (_, ["api", "sessions", id, rest @ ..]) => {
            let user = auth::user(&req, env, now_ms())?;
            if !is_session_id(id) {
                return Err(AppError::session_not_found());
            }
            let id = (*id).to_owned();
            let internal = match (method, rest) {
                (Method::Get, []) => "/state".to_owned(),
                (Method::Get, ["events"]) => "/events".to_owned(),
                (Method::Post, ["prompts"]) => "/prompts".to_owned(),
                (Method::Post, ["stop"]) => "/stop".to_owned(),
                (Method::Get, ["ws"]) => "/ws".to_owned(),
                (Method::Get, ["invites"]) => "/invites".to_owned(),
                (Method::Delete, ["invites", invite_id]) => {
                    if !is_invite_id(invite_id) {
                        // Checked in the object first, so a stranger still gets the missing session.
                        "/invites/-".to_owned()
                    } else {
                        format!("/invites/{invite_id}")
                    }
                }
                (Method::Post, ["invites"]) => {
                    let body = req.text().await?;
                    if body.len() > SMALL_BODY_BYTES {
                        return Err(AppError::client(ErrorCode::FrameTooLarge, "body too large"));
                    }
                    let mut response =
                        forward(env, &id, &req, "/invites", Some(&user), Some(body)).await?;
                    if response.status_code() != 201 {
                        return Ok(response);
                    }
                    let created: CreatedInvite = response.json().await?;
                    let share_url = format!("{}/join/{id}.{}", origin(env, &url), created.secret);
                    return Ok(json_response(
                        &InviteResponse {
                            share_url,
                            invite_id: created.invite_id,
                            expires_ms: created.expires_ms,
                        },
                        201,
                    ));
                }
                _ => return Err(AppError::client(ErrorCode::NotFound, "no such route")),
            };
            let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
            let body = if matches!(req.method(), Method::Post) {
                Some(req.text().await?)
            } else {
                None
            };
            forward(
                env,
                &id,
                &req,
                &format!("{internal}{query}"),
                Some(&user),
                body,
            )
            .await
        }
        (Method::Get, ["api", "repos"]) => {
            auth::user(&req, env, now_ms())?;
            list_repos(env).await
        }
        (Method::Post, ["api", "repos", "warm"]) => {
            let user = auth::user(&req, env, now_ms())?;
            let body: WarmRequest = parse_body(&req.text().await?, SMALL_BODY_BYTES)?;
            let repo = checked_repo(&body.repo)?;
            warm(env, &repo, &user).await
        }
        (_, ["api", "repos", owner, name, rest @ ..]) => {
            let user = auth::user(&req, env, now_ms())?;
            let repo = checked_repo(&format!("{owner}/{name}"))?;
            match (method, rest) {
                (Method::Get, []) => repo_call(env, &repo, Method::Get, "/summary", None).await,
                (Method::Patch, []) => {
                    let settings: RepoSettingsRequest =
                        parse_body(&req.text().await?, SMALL_BODY_BYTES)?;
                    if settings
                        .base_branch
                        .as_deref()
                        .is_some_and(|b| !valid_branch(b))
                    {
                        return Err(AppError::client(
                            ErrorCode::BadRequest,
                            "base_branch is not a valid branch name",
                        ));
                    }
                    let call = RepoCall {
                        repo: repo.clone(),
                        caller: None,
                        settings: Some(settings),
                    };
                    repo_call(env, &repo, Method::Post, "/settings", Some(&call)).await
                }
                (Method::Post, ["images"]) => {
                    repo_call(
                        env,
                        &repo,
                        Method::Post,
                        "/build",
                        Some(&RepoCall::plain(&repo)),
                    )
                    .await
                }
                (Method::Post, ["warm"]) => warm(env, &repo, &user).await,
                _ => Err(AppError::client(ErrorCode::NotFound, "no such route")),
            }
        }
        (Method::Post, ["api", "join", token]) => {
            let user = auth::user(&req, env, now_ms())?;
            let (id, secret) = token
                .split_once('.')
                .ok_or_else(AppError::session_not_found)?;
            if !is_session_id(id) {
                return Err(AppError::session_not_found());
            }
            let body = serde_json::to_string(secret)?;
            let response = forward(env, id, &req, "/join", Some(&user), Some(body)).await?;
            if response.status_code() != 200 {
                return Ok(response);
            }
            let url = format!("{}/s/{id}", origin(env, &url));
            Ok(json_response(
                &JoinResponse {
                    id: id.to_owned(),
                    url,
                },
                200,
            ))
        }
        (Method::Get, ["sandbox", id, "ws"]) => {
            // A separate trust boundary: only the sandbox token counts here, never a user credential.
            if !is_session_id(id) || auth::bearer(&req).is_none() {
                return Err(AppError::unauthorized());
            }
            forward(env, id, &req, "/agent-ws", None, None).await
        }
        (Method::Post, ["sandbox", id, "ended"]) => {
            // The provider's report that the sandbox ended; the same trust boundary as the socket.
            if !is_session_id(id) || auth::bearer(&req).is_none() {
                return Err(AppError::unauthorized());
            }
            let body = req.text().await?;
            if body.len() > SMALL_BODY_BYTES {
                return Err(AppError::client(
                    ErrorCode::FrameTooLarge,
                    "report too large",
                ));
            }
            forward(env, id, &req, "/sandbox-ended", None, Some(body)).await
        }
        (_, ["api", ..]) | (_, ["auth", ..]) | (_, ["sandbox", ..]) | (_, ["webhooks", ..]) => {
            Err(AppError::client(ErrorCode::NotFound, "no such route"))
        }
        _ => match env.assets("ASSETS") {
            Ok(assets) => Ok(assets.fetch_request(req).await?),
            Err(_) => Err(AppError::client(ErrorCode::NotFound, "not found")),
        },
    }
}

/// Whether `id` looks like an invite id (16 lowercase hex digits).
fn is_invite_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `GET /api/sessions?repo=&status=&participant=&limit=`: the caller's sessions from the D1 index.
async fn list_sessions(env: &Env, user: &Author, url: &Url) -> Result<Response, AppError> {
    let mut filters = index::Filters {
        limit: 50,
        ..index::Filters::default()
    };
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "repo" => filters.repo = Some(checked_repo(&value)?),
            "status" => {
                filters.status = Some(SessionStatus::parse(&value).ok_or_else(|| {
                    AppError::client(
                        ErrorCode::BadRequest,
                        "status must be one of starting, idle, running, stopped, failed",
                    )
                })?)
            }
            "participant" => filters.participant = Some(value.into_owned()),
            "limit" => {
                let limit = value.parse::<u32>().map_err(|_| {
                    AppError::client(ErrorCode::BadRequest, "`limit` must be a positive integer")
                })?;
                filters.limit = limit.clamp(1, index::LIST_LIMIT_MAX);
            }
            _ => {}
        }
    }
    let sessions = index::list(env, &user.login, &filters).await?;
    Ok(json_response(&SessionsResponse { sessions }, 200))
}

fn issue(env: &Env, user: &Author, kind: &str, ttl_ms: u64) -> Result<String, AppError> {
    let secret = config::get(env, config::AUTH_SECRET)
        .ok_or_else(|| AppError::Internal("AUTH_SECRET is not configured".to_owned()))?;
    auth::sign(
        &Claims {
            user: user.clone(),
            kind: kind.to_owned(),
            exp_ms: now_ms() + ttl_ms,
        },
        &secret,
    )
}

fn origin(env: &Env, url: &Url) -> String {
    config::get(env, config::PUBLIC_URL)
        .map(|u| u.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| url.origin().ascii_serialization())
}

/// Whether `repo` is `owner/name` with safe characters.
pub(crate) fn valid_repo(repo: &str) -> bool {
    let part_ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 100
            && !part.starts_with('.')
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    matches!(repo.split_once('/'), Some((owner, name)) if part_ok(owner) && part_ok(name) && !name.contains('/'))
}

/// `repo` if it is a valid `owner/name`, else a typed 400.
fn checked_repo(repo: &str) -> Result<String, AppError> {
    if valid_repo(repo) {
        Ok(repo.to_owned())
    } else {
        Err(AppError::client(
            ErrorCode::BadRequest,
            "repo must be `owner/name` (letters, digits, `-`, `_`, `.`)",
        ))
    }
}

fn valid_branch(branch: &str) -> bool {
    !branch.is_empty()
        && branch.len() <= 200
        && !branch.starts_with(['-', '/', '.'])
        && !branch.contains("..")
        && branch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

async fn create_session(mut req: Request, env: &Env, url: &Url) -> Result<Response, AppError> {
    let user = auth::user(&req, env, now_ms())?;
    let body: CreateSessionRequest = parse_body(&req.text().await?, SMALL_BODY_BYTES)?;
    if !valid_repo(&body.repo) {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "repo must be `owner/name`",
        ));
    }
    let base_branch = body.base_branch.unwrap_or_else(|| "main".to_owned());
    if !valid_branch(&base_branch) {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "base_branch is not a valid branch name",
        ));
    }
    if let Some(parent) = &body.parent_session_id {
        if !is_session_id(parent) {
            return Err(AppError::session_not_found());
        }
    }
    let title = body
        .title
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| format!("Session on {}", body.repo));
    if title.chars().count() > 200 {
        return Err(AppError::client(
            ErrorCode::BadRequest,
            "title is limited to 200 characters",
        ));
    }
    let model = body
        .model
        .filter(|m| !m.trim().is_empty())
        .or_else(|| config::get(env, config::DEFAULT_MODEL))
        .unwrap_or_else(|| "claude-sonnet-4-5".to_owned());
    let id = random_hex(16)?;
    let base = origin(env, url);
    let connect_url = format!("{}/sandbox/{id}/ws", base.replacen("http", "ws", 1));
    let internal = CreateSessionInternal {
        id: id.clone(),
        repo: body.repo,
        base_branch,
        title,
        model,
        parent_session_id: body.parent_session_id,
        connect_url,
        family: None,
        participants: Vec::new(),
        prompt: None,
    };
    let response = forward(
        env,
        &id,
        &req,
        "/create",
        Some(&user),
        Some(serde_json::to_string(&internal)?),
    )
    .await?;
    if response.status_code() != 201 {
        return Ok(response);
    }
    Ok(json_response(
        &CreateSessionResponse {
            url: format!("{base}/s/{id}"),
            id,
        },
        201,
    ))
}

/// Send a request to session `id`'s object at `internal_path`, with the caller's identity when there is one.
/// Upgrade and sandbox authorization headers are kept; cookies and any caller-supplied identity are not.
async fn forward(
    env: &Env,
    id: &str,
    original: &Request,
    internal_path: &str,
    user: Option<&Author>,
    body: Option<String>,
) -> Result<Response, AppError> {
    let headers = Headers::new();
    for name in [
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "content-type",
    ] {
        if let Some(value) = original.headers().get(name)? {
            headers.set(name, &value)?;
        }
    }
    match user {
        Some(user) => headers.set(USER_HEADER, &serde_json::to_string(user)?)?,
        None => {
            if let Some(value) = original.headers().get("authorization")? {
                headers.set("authorization", &value)?;
            }
        }
    }
    let mut init = RequestInit::new();
    init.with_method(original.method()).with_headers(headers);
    if let Some(body) = body {
        init.with_body(Some(body.into()));
    }
    let request = Request::new_with_init(&format!("https://session{internal_path}"), &init)?;
    let stub = env
        .durable_object(config::SESSION_BINDING)?
        .id_from_name(id)?
        .get_stub()?;
    Ok(stub.fetch_with_request(request).await?)
}

/// Call repository `repo`'s object at `internal_path`; its answer is passed through.
async fn repo_call(
    env: &Env,
    repo: &str,
    method: Method,
    internal_path: &str,
    body: Option<&RepoCall>,
) -> Result<Response, AppError> {
    let request = repo_object::internal_request(method, internal_path, body)?;
    Ok(repo_object::stub(env, repo)?
        .fetch_with_request(request)
        .await?)
}

/// `POST /api/repos/warm` and `POST /api/repos/{owner}/{name}/warm`: one warm-up per person per interval.
async fn warm(env: &Env, repo: &str, user: &Author) -> Result<Response, AppError> {
    let call = RepoCall {
        repo: repo.to_owned(),
        caller: Some(format!("user:{}", user.login)),
        settings: None,
    };
    repo_call(env, repo, Method::Post, "/warm", Some(&call)).await
}

/// `GET /api/repos`: every repository sessions were opened on (the registry) and every one the provider
/// holds. A provider repository not registered yet is registered here, which schedules its image.
async fn list_repos(env: &Env) -> Result<Response, AppError> {
    let request = repo_object::internal_request(Method::Get, "/registry/list", None::<&()>)?;
    let listed = repo_object::stub(env, config::REPO_REGISTRY)?
        .fetch_with_request(request)
        .await?;
    let registered: Vec<String> = internal_json(listed, "repository registry").await?;
    let held = match Provider::from_env(env) {
        Ok(provider) => match provider.list_repos().await {
            Ok(list) => list.repos,
            // A provider without the route, or one that is down, hides nothing registered.
            Err(e) => {
                worker::console_warn!("listing the provider's repositories: {e}");
                Vec::new()
            }
        },
        Err(e) => {
            worker::console_warn!("no provider to list repositories from: {e}");
            Vec::new()
        }
    };
    let mut names: Vec<(String, bool)> = registered.into_iter().map(|n| (n, true)).collect();
    for repo in held {
        if checked_repo(&repo).is_ok() && !names.iter().any(|(n, _)| *n == repo) {
            names.push((repo, false));
        }
    }
    names.sort();
    let summaries =
        futures_util::future::join_all(names.iter().map(|(name, registered)| async move {
            if !registered {
                return Ok(repo_object::register(env, name).await?.summary);
            }
            let response = repo_call(env, name, Method::Get, "/summary", None).await?;
            internal_json::<RepoSummary>(response, &format!("summary of {name}")).await
        }))
        .await;
    let mut repos = Vec::with_capacity(summaries.len());
    for ((name, _), summary) in names.iter().zip(summaries) {
        match summary {
            Ok(summary) => repos.push(summary),
            // One broken repository does not hide the others.
            Err(e) => worker::console_error!("listing {name}: {e:?}"),
        }
    }
    Ok(json_response(&ReposResponse { repos }, 200))
}

//! The JSON API of the contract (DESIGN.md, "The server and panel"): apps, releases, status,
//! deploys and rollbacks (as jobs), runs and their events (SSE, in [`crate::sse`]), the audit
//! log; plus the session's login and logout, and the admin's lists of users and tokens.
//! Every route needs a principal (401), reads of an app need the token's scope to cover it
//! (403), writes need a deployer (403) and, with a session, `X-CSRF-Token` (403).

use crate::auth::{self, check_csrf_header, Principal, Role};
use crate::error::ApiError;
use crate::jobs::{self, Deploy, JobRequest};
use crate::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cutover_core::AppKind;
use cutover_store::{HistoryRow, RunRow};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// The largest request body the API reads.
pub const MAX_BODY: usize = 64 * 1024;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/apps", get(apps))
        .route("/api/apps/{app}/releases", get(releases))
        .route("/api/apps/{app}/status", get(status))
        .route("/api/apps/{app}/runs", get(app_runs))
        .route("/api/apps/{app}/deploys", post(deploy))
        .route("/api/apps/{app}/rollback", post(rollback))
        .route(
            "/api/apps/{app}/previews",
            get(previews).post(preview_deploy),
        )
        .route(
            "/api/apps/{app}/previews/{pr}",
            axum::routing::delete(preview_remove),
        )
        .route("/api/runs/{run}", get(run))
        .route("/api/runs/{run}/events", get(crate::sse::events))
        .route("/api/audit", get(audit))
        .route("/api/users", get(users))
        .route("/api/tokens", get(tokens))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

/// One app in `GET /api/apps`.
#[derive(Serialize)]
struct AppRow {
    app: String,
    kind: &'static str,
    hosts: Vec<String>,
    live: Option<Live>,
}

#[derive(Serialize)]
struct Live {
    release: String,
    commit: Option<String>,
}

async fn apps(
    State(st): State<Arc<AppState>>,
    p: Principal,
) -> Result<Json<Vec<AppRow>>, ApiError> {
    let mut out = Vec::new();
    for (name, c) in st.apps.iter().filter(|(name, _)| p.may_see(name)) {
        let live = match st.store.live(name)? {
            Some(release) => {
                let commit = st.store.release(name, &release)?.and_then(|r| r.commit);
                Some(Live { release, commit })
            }
            None => None,
        };
        out.push(AppRow {
            app: name.clone(),
            kind: match c.kind {
                AppKind::Files(_) => "files",
                AppKind::Container(_) => "container",
            },
            hosts: c.hosts.iter().map(|(h, _)| h.clone()).collect(),
            live,
        });
    }
    Ok(Json(out))
}

/// The app, if it exists and the principal may see it.
fn visible<'a>(
    st: &'a AppState,
    p: &Principal,
    app: &str,
) -> Result<&'a Arc<cutover_core::Config>, ApiError> {
    let c = st.app(app)?;
    p.require_app(app)?;
    Ok(c)
}

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    before: Option<String>,
}

async fn releases(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(app): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Vec<HistoryRow>>, ApiError> {
    visible(&st, &p, &app)?;
    let limit = page.limit.unwrap_or(50).clamp(1, 500);
    let live = st.store.live(&app)?;
    let rows = st
        .store
        .releases_page(&app, limit, page.before.as_deref())?
        .into_iter()
        .map(|r| HistoryRow::new(r, live.as_deref()))
        .collect();
    Ok(Json(rows))
}

async fn status(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(app): Path<String>,
) -> Result<Response, ApiError> {
    let config = visible(&st, &p, &app)?.clone();
    let st2 = st.clone();
    let s = tokio::task::spawn_blocking(move || {
        cutover_engine::inspect::status(&config, &st2.store).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::Internal)?;
    Ok(Json(s).into_response())
}

/// A run as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct RunView {
    pub run: i64,
    pub app: String,
    pub kind: String,
    pub release: Option<String>,
    pub status: String,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub by: Option<String>,
    pub started: String,
    pub finished: Option<String>,
}

pub(crate) fn run_view(st: &AppState, r: &RunRow) -> RunView {
    RunView {
        run: r.id,
        app: r.app.clone(),
        kind: r.kind.clone(),
        release: Some(r.release.clone()).filter(|r| !r.is_empty()),
        status: jobs::run_status(st, r),
        exit_code: r.exit_code,
        message: r.message.clone(),
        by: r.by.clone(),
        started: r.started_at.clone(),
        finished: r.finished_at.clone(),
    }
}

/// The run, if it exists and the principal may see its app.
pub(crate) fn visible_run(st: &AppState, p: &Principal, run: i64) -> Result<RunRow, ApiError> {
    let r = st
        .store
        .run_row(run)?
        .ok_or_else(|| ApiError::NotFound(format!("no run {run}")))?;
    p.require_app(&r.app)?;
    Ok(r)
}

async fn run(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(run): Path<i64>,
) -> Result<Json<RunView>, ApiError> {
    let r = visible_run(&st, &p, run)?;
    Ok(Json(run_view(&st, &r)))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn app_runs(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<Limit>,
) -> Result<Json<Vec<RunView>>, ApiError> {
    visible(&st, &p, &app)?;
    let rows = st
        .store
        .run_rows(Some(&app), q.limit.unwrap_or(50).clamp(1, 500))?;
    Ok(Json(rows.iter().map(|r| run_view(&st, r)).collect()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    image: Option<String>,
    release: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: Option<String>,
}

/// Checks a write: the app exists and is in scope, the role, the CSRF header.
fn may_write(st: &AppState, p: &Principal, headers: &HeaderMap, app: &str) -> Result<(), ApiError> {
    check_csrf_header(p, headers)?;
    p.require(Role::Deployer)?;
    visible(st, p, app)?;
    Ok(())
}

fn started(run: i64) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({ "run": run.to_string() })),
    )
        .into_response()
}

fn bounded(what: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 200 || v.chars().any(|c| c.is_control()) {
        return Err(ApiError::Invalid(format!(
            "`{what}` must be 1 to 200 printable characters"
        )));
    }
    Ok(())
}

async fn deploy(
    State(st): State<Arc<AppState>>,
    p: Principal,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Result<Json<DeployBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    may_write(&st, &p, &headers, &app)?;
    let Json(b) = body?;
    let what = match (b.git_ref, b.image, b.release) {
        (Some(r), None, None) => {
            bounded("ref", &r)?;
            Deploy::Ref(r)
        }
        (None, Some(i), None) => {
            bounded("image", &i)?;
            Deploy::Image(i)
        }
        (None, None, Some(r)) => {
            bounded("release", &r)?;
            Deploy::Release(r)
        }
        _ => {
            return Err(ApiError::Invalid(
                "give exactly one of {\"ref\": \"main\"}, {\"image\": \"v2\"} or {\"release\": \"<id>\"}".into(),
            ))
        }
    };
    let run = jobs::submit(&st, &app, JobRequest::Deploy(what), &p, from.ip())?;
    Ok(started(run))
}

async fn rollback(
    State(st): State<Arc<AppState>>,
    p: Principal,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Result<Json<RollbackBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    may_write(&st, &p, &headers, &app)?;
    let Json(b) = body?;
    if let Some(to) = &b.to {
        bounded("to", to)?;
    }
    let run = jobs::submit(&st, &app, JobRequest::Rollback { to: b.to }, &p, from.ip())?;
    Ok(started(run))
}

#[derive(Deserialize)]
struct PreviewsQuery {
    all: Option<bool>,
}

async fn previews(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(app): Path<String>,
    Query(q): Query<PreviewsQuery>,
) -> Result<Json<Vec<cutover_store::Preview>>, ApiError> {
    visible(&st, &p, &app)?;
    Ok(Json(st.store.previews(&app, q.all.unwrap_or(false))?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewBody {
    pr: u64,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    image: Option<String>,
}

async fn preview_deploy(
    State(st): State<Arc<AppState>>,
    p: Principal,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PreviewBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    may_write(&st, &p, &headers, &app)?;
    let Json(b) = body?;
    let what = match (b.git_ref, b.image) {
        (Some(r), None) => {
            bounded("ref", &r)?;
            Deploy::Ref(r)
        }
        (None, Some(i)) => {
            bounded("image", &i)?;
            Deploy::Image(i)
        }
        _ => {
            return Err(ApiError::Invalid(
                "give the pull request and exactly one of {\"pr\": 42, \"ref\": \"feature\"} or {\"pr\": 42, \"image\": \"v2\"}".into(),
            ))
        }
    };
    let run = jobs::submit(
        &st,
        &app,
        JobRequest::Preview { pr: b.pr, what },
        &p,
        from.ip(),
    )?;
    Ok(started(run))
}

async fn preview_remove(
    State(st): State<Arc<AppState>>,
    p: Principal,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path((app, pr)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    may_write(&st, &p, &headers, &app)?;
    let config = st.app(&app)?.clone();
    let who = p.who();
    let st2 = st.clone();
    let why = format!("removed by {who} (API)");
    let hosts =
        tokio::task::spawn_blocking(move || crate::previews::remove_now(&st2, &config, pr, &why))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::Conflict)?;
    st.store.audit(&cutover_store::AuditRow {
        at: cutover_engine::now_utc(),
        who,
        action: "preview remove".into(),
        app: Some(app.clone()),
        from: Some(from.ip().to_string()),
        detail: format!("#{pr}"),
        ..cutover_store::AuditRow::default()
    })?;
    let hosts: Vec<Value> = hosts
        .iter()
        .map(|h| json!({ "host": h.host, "containers": h.containers, "error": h.result.as_ref().err() }))
        .collect();
    Ok(Json(json!({ "app": app, "pr": pr, "hosts": hosts })))
}

#[derive(Deserialize)]
struct AuditPage {
    limit: Option<u32>,
    before: Option<i64>,
}

async fn audit(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Query(q): Query<AuditPage>,
) -> Result<Json<Vec<cutover_store::AuditRow>>, ApiError> {
    p.require(Role::Admin)?;
    Ok(Json(st.store.audit_rows(
        q.limit.unwrap_or(100).clamp(1, 1000),
        q.before,
    )?))
}

async fn users(State(st): State<Arc<AppState>>, p: Principal) -> Result<Json<Value>, ApiError> {
    p.require(Role::Admin)?;
    Ok(Json(
        serde_json::to_value(st.store.users()?).unwrap_or_default(),
    ))
}

async fn tokens(State(st): State<Arc<AppState>>, p: Principal) -> Result<Json<Value>, ApiError> {
    p.require(Role::Admin)?;
    Ok(Json(
        serde_json::to_value(st.store.tokens()?).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    user: String,
    password: String,
}

async fn login(
    State(st): State<Arc<AppState>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    body: Result<Json<LoginBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    if b.user.len() > 200 || b.password.len() > 1024 {
        return Err(ApiError::Invalid("user name or password too long".into()));
    }
    let st2 = st.clone();
    let done =
        tokio::task::spawn_blocking(move || auth::login(&st2, &b.user, &b.password, from.ip()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut r =
        Json(json!({ "user": done.user, "role": done.role, "csrf": done.csrf })).into_response();
    if let Ok(v) = done.set_cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

async fn logout(
    State(st): State<Arc<AppState>>,
    p: Principal,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_csrf_header(&p, &headers)?;
    let cookie = auth::logout(&st, &headers, from.ip());
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

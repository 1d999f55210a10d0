//! The apps page, one app's page (hosts, history, rollback and deploy forms), the
//! confirmation of a rollback without JS, and the diff between two releases.
//!
//! What each host serves is read from the hosts (`cutover_engine::inspect::status`, over SSH)
//! and kept for a few seconds per (app, live release), so a page view does not open SSH
//! sessions each time and a switch is seen at once.

use super::{
    blocking, check_form, csrf_field, duration, layout, require, see_other, status_class, when,
    PageError, PageResult,
};
use crate::auth::{PageAuth, Principal, Role};
use crate::jobs::{self, Deploy, JobRequest};
use crate::AppState;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Form;
use cutover_core::AppKind;
use cutover_engine::inspect::Status;
use maud::{html, Markup};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Releases per page of history.
const PAGE: u32 = 50;
/// How long a host status read is reused.
const STATUS_TTL: Duration = Duration::from_secs(3);

type StatusCache = Mutex<HashMap<(String, Option<String>), (Instant, Status)>>;

/// What the hosts of `app` serve (cached, see the module doc).
async fn host_status(st: &Arc<AppState>, app: &str) -> Result<Status, PageError> {
    static CACHE: OnceLock<StatusCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (app.to_string(), st.store.live(app)?);
    if let Some((at, s)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        if at.elapsed() < STATUS_TTL {
            return Ok(s.clone());
        }
    }
    let config = st.app(app)?.clone();
    let data = st.data.clone();
    let database = st.database.clone();
    let s = blocking(move || {
        let store = cutover_engine::open_database(&data, database.as_ref())
            .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        cutover_engine::inspect::status(&config, &store)
            .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, (Instant::now(), s.clone()));
    Ok(s)
}

fn kind(c: &cutover_core::Config) -> &'static str {
    match c.kind {
        AppKind::Files(_) => "files",
        AppKind::Container(_) => "container",
    }
}

/// A commit as the pages show it: its first 7 hex digits (the full id is the title).
pub(super) fn short(id: &str) -> &str {
    id.get(..7).unwrap_or(id)
}

/// The visible app, or 404/403 inside the layout.
fn visible<'a>(
    st: &'a AppState,
    p: &Principal,
    app: &str,
) -> Result<&'a Arc<cutover_core::Config>, PageError> {
    let c = st.app(app).map_err(|e| PageError::from(e).for_user(p))?;
    p.require_app(app)
        .map_err(|e| PageError::from(e).for_user(p))?;
    Ok(c)
}

fn hosts_table(s: &Status) -> Markup {
    html! {
        div.table-wrap {
            table #hosts {
                thead { tr { th { "Host" } th { "Release" } th { "Commit" } } }
                tbody {
                    @for h in &s.hosts {
                        tr data-host=(h.host) {
                            td.host { (h.host) }
                            td.release {
                                @match &h.release {
                                    Some(r) => {
                                        code { (r) }
                                        @if s.live.as_deref() != Some(r.as_str()) {
                                            " " span.status.drift { "not the live release" }
                                        }
                                    }
                                    None => span.muted { (h.error.as_deref().unwrap_or("nothing served")) },
                                }
                            }
                            td.subject { (h.commit_subject.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
        @if !s.drift.is_empty() {
            ul.error #drift { @for d in &s.drift { li { (d) } } }
        }
    }
}

pub(crate) async fn apps(State(st): State<Arc<AppState>>, PageAuth(p): PageAuth) -> PageResult {
    let mut rows = Vec::new();
    for (name, c) in st.apps.iter().filter(|(n, _)| p.may_see(n)) {
        let status = host_status(&st, name).await;
        rows.push((name.clone(), kind(c), status));
    }
    let body = html! {
        h1 { "Apps" }
        @if rows.is_empty() { p.muted { "No apps on this server." } }
        div.table-wrap {
            table #apps {
                thead { tr { th { "App" } th { "Kind" } th { "Live release" } th { "Hosts" } } }
                tbody {
                    @for (name, kind, status) in &rows {
                        tr data-app=(name) {
                            td { a href={ "/apps/" (name) } { (name) } }
                            td { (kind) }
                            @match status {
                                Ok(s) => {
                                    td.live {
                                        @match &s.live {
                                            Some(l) => { code { (l) } br; span.subject { (s.live_commit_subject.as_deref().unwrap_or("")) } }
                                            None => span.muted { "none yet" },
                                        }
                                    }
                                    td {
                                        ul.hosts {
                                            @for h in &s.hosts {
                                                li {
                                                    (h.host) ": "
                                                    code { (h.release.as_deref().unwrap_or("-")) }
                                                }
                                            }
                                        }
                                        @if !s.drift.is_empty() { span.status.drift { "drift" } }
                                    }
                                }
                                Err(e) => { td colspan="2" { span.error { (e.message) } } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout("Apps", Some(&p), body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct HistoryPage {
    before: Option<String>,
}

pub(crate) async fn app(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    Path(app): Path<String>,
    Query(q): Query<HistoryPage>,
) -> PageResult {
    let config = visible(&st, &p, &app)?.clone();
    let live = st.store.live(&app)?;
    let releases = st.store.releases_page(&app, PAGE, q.before.as_deref())?;
    // Who started each release: the runs that made them (CLI runs name nobody).
    let mut by: HashMap<String, String> = HashMap::new();
    for r in st.store.run_rows(Some(&app), PAGE * 4)? {
        if let Some(who) = r.by {
            by.entry(r.release).or_insert(who);
        }
    }
    let status = host_status(&st, &app).await;
    let deployer = p.role >= Role::Deployer;
    let container = matches!(config.kind, AppKind::Container(_));
    let older = releases
        .last()
        .filter(|_| releases.len() == PAGE as usize)
        .map(|r| r.id.clone());
    let body = html! {
        h1 { (app) " " span.muted { "(" (kind(&config)) ")" } }
        @if config.preview.is_some() {
            p { a #previews-link href={ "/apps/" (app) "/previews" } { "Previews" } }
        }
        h2 { "Hosts" }
        p { "Live release: "
            @match &live { Some(l) => code #live { (l) }, None => span #live.muted { "none yet" } }
        }
        @match &status {
            Ok(s) => (hosts_table(s)),
            Err(e) => p.error { (e.message) },
        }
        @if deployer {
            div.actions {
                form #rollback-form method="post" action={ "/apps/" (app) "/rollback" }
                    data-confirm={ "Roll back " (app) " to the previous good release?" } {
                    (csrf_field(&p))
                    button.danger #rollback type="submit" { "Rollback" }
                }
                form #deploy-form.stack method="post" action={ "/apps/" (app) "/deploy" } {
                    (csrf_field(&p))
                    @if container {
                        label for="image" { "Deploy an image tag or @sha256:digest" }
                        input #image type="text" name="image" placeholder="v2" required;
                    } @else {
                        label for="ref" { "Deploy a git ref" }
                        input #ref type="text" name="ref" placeholder="main" required;
                    }
                    button.primary type="submit" { "Deploy" }
                }
            }
        }
        h2 { "History" }
        div.table-wrap {
            table #history {
                thead { tr {
                    th { "Release" } th { "Commit" } th { "Outcome" } th.opt { "Who" }
                    th.opt { "When" } th.opt { "Took" } th {}
                } }
                tbody {
                    @for r in &releases {
                        tr data-release=(r.id) {
                            td { code { (r.id) } }
                            td {
                                @if let Some(c) = &r.commit {
                                    code.sha title=(c) { (short(c)) } " "
                                    button.small.copy type="button" data-copy=(c) { "copy" }
                                    br;
                                }
                                span.subject { (r.commit_subject.as_deref().unwrap_or("")) }
                            }
                            td {
                                span class=(status_class(&r.status)) { (r.status) }
                                @if live.as_deref() == Some(r.id.as_str()) { " " span.status.live { "live" } }
                                @if r.bad { " " span.status.bad { "marked bad" } }
                            }
                            td.opt.who { (by.get(&r.id).map(String::as_str).unwrap_or("cli")) }
                            td.opt { (when(&r.created_at)) }
                            td.opt { (duration(&r.created_at, r.finished_at.as_deref())) }
                            td {
                                @if deployer && r.status == "succeeded" && !r.bad
                                    && live.as_deref().is_some_and(|l| r.id.as_str() < l) {
                                    form.inline.deploy-release method="post" action={ "/apps/" (app) "/deploy" }
                                        data-confirm={ "Deploy release " (r.id) " of " (app) " again?" } {
                                        (csrf_field(&p))
                                        input type="hidden" name="release" value=(r.id);
                                        button.small type="submit" { "deploy this release" }
                                    }
                                }
                                @if let (Some(_), Some(l)) = (&r.commit, &live) {
                                    @if r.id.as_str() < l.as_str() {
                                        " " a.small href={ "/apps/" (app) "/diff?from=" (r.id) "&to=" (l) } { "diff to live" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        div.pager {
            @if q.before.is_some() { a #newest href={ "/apps/" (app) } { "Newest" } }
            @if let Some(o) = older { a #older href={ "/apps/" (app) "?before=" (o) } { "Older" } }
        }
    };
    Ok(layout(&app, Some(&p), body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    csrf: Option<String>,
    confirmed: Option<String>,
    to: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    image: Option<String>,
    release: Option<String>,
}

fn field(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The confirmation page a rollback or "deploy this release" shows without JS: the same form,
/// now with `confirmed=1`.
fn confirm_page(
    p: &Principal,
    app: &str,
    action: &str,
    question: &str,
    f: &ActionForm,
) -> PageResult {
    let body = html! {
        h1 { "Are you sure?" }
        p #question { (question) }
        form.stack #confirm-form method="post" action={ "/apps/" (app) "/" (action) } {
            (csrf_field(p))
            input type="hidden" name="confirmed" value="1";
            @if let Some(t) = field(&f.to) { input type="hidden" name="to" value=(t); }
            @if let Some(r) = field(&f.release) { input type="hidden" name="release" value=(r); }
            button.danger #confirm type="submit" { "Yes" }
            " " a href={ "/apps/" (app) } { "No, back to " (app) }
        }
    };
    Ok(layout("Confirm", Some(p), body).into_response())
}

fn bounded(p: &Principal, what: &str, v: &str) -> Result<(), PageError> {
    if v.len() > 200 || v.chars().any(|c| c.is_control()) {
        return Err(PageError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{what}` must be 1 to 200 printable characters"),
        )
        .for_user(p));
    }
    Ok(())
}

/// Submits the job and answers 303 to its run page.
fn start(
    st: &Arc<AppState>,
    p: &Principal,
    app: &str,
    req: JobRequest,
    from: SocketAddr,
) -> PageResult {
    let run =
        jobs::submit(st, app, req, p, from.ip()).map_err(|e| PageError::from(e).for_user(p))?;
    Ok(see_other(&format!("/runs/{run}")))
}

pub(crate) async fn rollback(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    Form(f): Form<ActionForm>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Deployer)?;
    visible(&st, &p, &app)?;
    let to = field(&f.to);
    if let Some(t) = &to {
        bounded(&p, "to", t)?;
    }
    if f.confirmed.as_deref() != Some("1") {
        let q = match &to {
            Some(t) => format!("Roll back {app} to release {t}?"),
            None => format!("Roll back {app} to the previous good release?"),
        };
        return confirm_page(&p, &app, "rollback", &q, &f);
    }
    start(&st, &p, &app, JobRequest::Rollback { to }, from)
}

pub(crate) async fn deploy(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    Form(f): Form<ActionForm>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Deployer)?;
    visible(&st, &p, &app)?;
    let what = match (field(&f.git_ref), field(&f.image), field(&f.release)) {
        (Some(r), None, None) => {
            bounded(&p, "ref", &r)?;
            Deploy::Ref(r)
        }
        (None, Some(i), None) => {
            bounded(&p, "image", &i)?;
            Deploy::Image(i)
        }
        (None, None, Some(r)) => {
            bounded(&p, "release", &r)?;
            if f.confirmed.as_deref() != Some("1") {
                let q = format!("Deploy release {r} of {app} again?");
                return confirm_page(&p, &app, "deploy", &q, &f);
            }
            Deploy::Release(r)
        }
        _ => {
            return Err(PageError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give a git ref, an image or a release to deploy",
            )
            .for_user(&p))
        }
    };
    start(&st, &p, &app, JobRequest::Deploy(what), from)
}

#[derive(Deserialize)]
pub(crate) struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

pub(crate) async fn diff(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    Path(app): Path<String>,
    Query(q): Query<DiffQuery>,
) -> PageResult {
    let config = visible(&st, &p, &app)?.clone();
    let data = st.data.clone();
    let database = st.database.clone();
    let (from, to) = (field(&q.from), field(&q.to));
    let pp = p.clone();
    let d = blocking(move || {
        let store = cutover_engine::open_database(&data, database.as_ref())
            .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        cutover_engine::changes::diff(&config, &store, &data, from.as_deref(), to.as_deref())
            .map_err(|e| {
                let status = match e {
                    cutover_engine::changes::DiffError::Usage(_) => {
                        StatusCode::UNPROCESSABLE_ENTITY
                    }
                    cutover_engine::changes::DiffError::Failed(_) => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                PageError::new(status, e.to_string()).for_user(&pp)
            })
    })
    .await?;
    let body = html! {
        h1 { (app) ": changes" }
        p {
            "From " code title=(d.from.commit) { (d.from.release) } " (" (d.from.short) " " span.subject { (d.from.subject) } ")"
            br;
            "to " code title=(d.to.commit) { (d.to.release) } " (" (d.to.short) " " span.subject { (d.to.subject) } ")"
        }
        h2 { "Commits (" (d.commits.len()) ")" }
        div.table-wrap {
            table #commits {
                thead { tr { th { "Commit" } th { "Subject" } th.opt { "Author" } th.opt { "Date" } } }
                tbody {
                    @for c in &d.commits {
                        tr {
                            td { code.sha title=(c.commit) { (c.short) } }
                            td.subject { (c.subject) }
                            td.opt { (c.author) }
                            td.opt { (c.date) }
                        }
                    }
                }
            }
        }
        @if !d.reverted.is_empty() {
            h2 { "Taken back (" (d.reverted.len()) ")" }
            ul #reverted { @for c in &d.reverted { li { code title=(c.commit) { (c.short) } " " span.subject { (c.subject) } } } }
        }
        @if d.truncated { p.muted { "(the list is cut short)" } }
        h2 { "Files (" (d.files.len()) ")" }
        ul #files { @for f in &d.files { li { span.mono { (f.change) } " " code { (f.path) } } } }
        p { a href={ "/apps/" (app) } { "Back to " (app) } }
    };
    Ok(layout(&format!("{app}: changes"), Some(&p), body).into_response())
}

/// An app's open previews: pull request, URL, head, last deploy, and a remove button (which
/// asks for confirmation without JS, like a rollback).
pub(crate) async fn previews(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    Path(app): Path<String>,
) -> PageResult {
    visible(&st, &p, &app)?;
    let rows = st
        .store
        .previews(&app, false)
        .map_err(|e| PageError::from(e).for_user(&p))?;
    let deployer = p.require(Role::Deployer).is_ok();
    let body = html! {
        h1 { "Previews of " a href={ "/apps/" (app) } { (app) } }
        @if rows.is_empty() {
            p #no-previews { "No open previews." }
        } @else {
            table #previews {
                thead { tr { th { "PR" } th { "URL" } th { "Head" } th { "Updated" } @if deployer { th {} } } }
                tbody {
                    @for r in &rows {
                        tr id={ "preview-" (r.pr) } {
                            td { "#" (r.pr) }
                            td { a.preview-url href=(r.url) { (r.url) } }
                            td.head { (r.head_sha.as_deref().map(short).unwrap_or(&r.head_ref)) }
                            td { (when(&r.updated_at)) }
                            @if deployer {
                                td {
                                    form method="post" action={ "/apps/" (app) "/previews/" (r.pr) "/remove" } {
                                        (csrf_field(&p))
                                        button.danger type="submit" { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&format!("Previews of {app}"), Some(&p), body).into_response())
}

/// Removes a preview (after a confirmation page), then back to the previews page.
pub(crate) async fn remove_preview(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path((app, pr)): Path<(String, u64)>,
    Form(f): Form<ActionForm>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Deployer)?;
    let config = visible(&st, &p, &app)?.clone();
    if f.confirmed.as_deref() != Some("1") {
        let q = format!("Remove the preview of pull request #{pr} of {app}? Its history is kept.");
        return confirm_page(&p, &app, &format!("previews/{pr}/remove"), &q, &f);
    }
    let who = p.who();
    let why = format!("removed by {who} (panel)");
    let st2 = st.clone();
    let p2 = p.clone();
    let hosts = blocking(move || {
        crate::previews::remove_now(&st2, &config, pr, &why)
            .map_err(|e| PageError::new(StatusCode::CONFLICT, e).for_user(&p2))
    })
    .await?;
    let _ = st.store.audit(&cutover_store::AuditRow {
        at: cutover_engine::now_utc(),
        who,
        action: "preview remove".into(),
        app: Some(app.clone()),
        from: Some(from.ip().to_string()),
        detail: format!("#{pr}"),
        ..cutover_store::AuditRow::default()
    });
    if let Some(e) = hosts.iter().find_map(|h| h.result.as_ref().err()) {
        return Err(PageError::new(StatusCode::BAD_GATEWAY, e.clone()).for_user(&p));
    }
    Ok(see_other(&format!("/apps/{app}/previews")))
}

//! The panel's pages: server-rendered HTML, written with **maud** (`html!` is checked at
//! compile time, escapes every interpolated value by default, and leaves no template files to
//! ship: the binary is the whole panel). One stylesheet and one script are compiled in and
//! served under `/assets/` with their content hash in the name, so they are cached for a year
//! and never stale ([`assets`]).
//!
//! * Reading: `/` (apps), `/apps/{app}` (hosts and paginated history), `/runs/{run}` (live
//!   events), `/apps/{app}/diff`, and for admins `/users`, `/tokens`, `/audit`.
//! * Writing: every state-changing form is a POST carrying the session's CSRF token (hidden
//!   field `csrf`); deploys and rollbacks go through [`crate::jobs::submit`] and answer 303
//!   to the run's page. A rollback or "deploy this release" is confirmed once: by the
//!   script's `confirm()`, which adds `confirmed=1`, or without JS by a confirmation page.
//!
//! **Invariant:** nothing here changes state on a GET, and nothing from the store, a host or
//! git is written into a page unescaped (maud's `PreEscaped` is used for nothing).

mod admin;
mod app;
mod assets;
pub(crate) mod run;

use crate::auth::{self, PageAuth, Principal, Role};
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(app::apps))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/apps/{app}", get(app::app))
        .route("/apps/{app}/diff", get(app::diff))
        .route("/apps/{app}/rollback", post(app::rollback))
        .route("/apps/{app}/deploy", post(app::deploy))
        .route("/apps/{app}/previews", get(app::previews))
        .route(
            "/apps/{app}/previews/{pr}/remove",
            post(app::remove_preview),
        )
        .route("/runs/{run}", get(run::run))
        .route("/users", get(admin::users).post(admin::add_user))
        .route("/users/{name}/remove", post(admin::remove_user))
        .route("/tokens", get(admin::tokens).post(admin::create_token))
        .route("/tokens/{name}/revoke", post(admin::revoke_token))
        .route("/audit", get(admin::audit_page))
        .route("/assets/{name}", get(assets::serve))
}

/// A page that could not be shown: its status and what to say.
#[derive(Debug)]
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
    who: Option<Principal>,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> PageError {
        PageError {
            status,
            message: message.into(),
            who: None,
        }
    }

    /// The same error, shown inside `p`'s layout (navigation, logout).
    fn for_user(mut self, p: &Principal) -> PageError {
        self.who = Some(p.clone());
        self
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> PageError {
        PageError::new(e.status(), e.to_string())
    }
}

impl From<cutover_store::StoreError> for PageError {
    fn from(e: cutover_store::StoreError) -> PageError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = match self.status {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::CONFLICT => "Busy",
            _ => "Error",
        };
        let body = html! {
            h1 { (title) }
            p.error #error { (self.message) }
            p { a href="/" { "Back to the apps" } }
        };
        (self.status, layout(title, self.who.as_ref(), body)).into_response()
    }
}

type PageResult = Result<Response, PageError>;

/// Every page: the head, the navigation for `who`, then `body`.
pub(crate) fn layout(title: &str, who: Option<&Principal>, body: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · cutover" }
                link rel="stylesheet" href=(assets::css_path());
                script src=(assets::js_path()) defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "cutover" }
                    @if let Some(p) = who {
                        nav {
                            a href="/" { "Apps" }
                            @if p.role >= Role::Admin {
                                a href="/users" { "Users" }
                                a href="/tokens" { "Tokens" }
                                a href="/audit" { "Audit" }
                            }
                        }
                        span.who #who { (p.name) " (" (p.role.as_str()) ")" }
                        form.inline #logout method="post" action="/logout" {
                            (csrf_field(p))
                            button.small type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    Html(page.into_string())
}

/// The hidden CSRF field of a state-changing form.
pub(crate) fn csrf_field(p: &Principal) -> Markup {
    html! { input type="hidden" name="csrf" value=(p.csrf().unwrap_or("")); }
}

/// 403 unless the form's `csrf` is the session's token.
fn check_form(p: &Principal, csrf: Option<&str>) -> Result<(), PageError> {
    auth::check_csrf(p, csrf.unwrap_or("")).map_err(|e| PageError::from(e).for_user(p))
}

/// 403 unless `p` has at least `role`.
fn require(p: &Principal, role: Role) -> Result<(), PageError> {
    p.require(role).map_err(|e| PageError::from(e).for_user(p))
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A local path to go to after logging in (never another site).
fn local_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c)) =>
        {
            n.to_string()
        }
        _ => "/".into(),
    }
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

async fn login_page(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<Next>,
) -> Response {
    if let Ok(Some(_)) = auth::authenticate(&st, &headers) {
        return see_other(&local_next(q.next.as_deref()));
    }
    login_form(StatusCode::OK, None, q.next.as_deref()).into_response()
}

fn login_form(status: StatusCode, error: Option<&str>, next: Option<&str>) -> Response {
    let body = html! {
        h1 { "Log in" }
        @if let Some(e) = error { p.error #error { (e) } }
        form.stack #login method="post" action="/login" {
            input type="hidden" name="next" value=(local_next(next));
            div {
                label for="user" { "User name" }
                input #user type="text" name="user" autocomplete="username" required autofocus;
            }
            div {
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
            }
            button.primary type="submit" { "Log in" }
        }
    };
    (status, layout("Log in", None, body)).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

async fn login(
    State(st): State<Arc<AppState>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    if f.user.len() > 200 || f.password.len() > 1024 {
        return login_form(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("User name or password too long."),
            f.next.as_deref(),
        );
    }
    let st2 = st.clone();
    let (user, password) = (f.user, f.password);
    let done =
        tokio::task::spawn_blocking(move || auth::login(&st2, &user, &password, from.ip())).await;
    match done {
        Ok(Ok(done)) => {
            let mut r = see_other(&local_next(f.next.as_deref()));
            if let Ok(v) = done.set_cookie.parse() {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(Err(auth::LoginError::Refused)) => login_form(
            StatusCode::UNAUTHORIZED,
            Some("Wrong user name or password."),
            f.next.as_deref(),
        ),
        Ok(Err(auth::LoginError::Slowed { retry_after })) => login_form(
            StatusCode::TOO_MANY_REQUESTS,
            Some(&format!(
                "Too many failed logins for this user from your address: try again in {retry_after} s."
            )),
            f.next.as_deref(),
        ),
        Ok(Err(auth::LoginError::Internal(m))) => {
            PageError::new(StatusCode::INTERNAL_SERVER_ERROR, m).into_response()
        }
        Err(e) => PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: Option<String>,
}

async fn logout(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    let cookie = auth::logout(&st, &headers, from.ip());
    let mut r = see_other("/login");
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Runs blocking work (SSH, git, argon2) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PageError> + Send + 'static,
) -> Result<T, PageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// `2026-12-05T02:33:39Z` as `2026-12-05 02:33:39`.
fn when(t: &str) -> String {
    t.replacen('T', " ", 1).trim_end_matches('Z').to_string()
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS...` (UTC), for durations.
fn unix(t: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// How long from `start` to `end`, as people read it.
fn duration(start: &str, end: Option<&str>) -> String {
    match (unix(start), end.and_then(unix)) {
        (Some(a), Some(b)) if b >= a => {
            let s = b - a;
            if s < 60 {
                format!("{s} s")
            } else {
                format!("{} min {} s", s / 60, s % 60)
            }
        }
        _ => String::new(),
    }
}

/// The CSS class of a status word (`rolled back` -> `rolled-back`).
fn status_class(s: &str) -> String {
    format!("status {}", s.replace(' ', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_like_people_write_them() {
        assert_eq!(unix("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix("2026-12-05T02:33:39Z"), Some(1_796_438_019));
        assert_eq!(
            duration("2026-12-05T02:33:39Z", Some("2026-12-05T02:33:45Z")),
            "6 s"
        );
        assert_eq!(
            duration("2026-12-05T02:33:39Z", Some("2026-12-05T02:35:40Z")),
            "2 min 1 s"
        );
        assert_eq!(duration("2026-12-05T02:33:39Z", None), "");
        assert_eq!(when("2026-12-05T02:33:39Z"), "2026-12-05 02:33:39");
    }

    #[test]
    fn login_goes_back_only_to_a_local_path() {
        assert_eq!(local_next(Some("/apps/site")), "/apps/site");
        assert_eq!(local_next(Some("//evil.example/x")), "/");
        assert_eq!(local_next(Some("https://evil.example/")), "/");
        assert_eq!(local_next(Some("/a?b=<c>")), "/");
        assert_eq!(local_next(None), "/");
    }

    #[test]
    fn hostile_text_is_escaped() {
        let subject = "<script>alert(1)</script>\"><img src=x onerror=alert(1)>";
        let page = html! { td.subject { (subject) } a title=(subject) { "x" } }.into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
    }
}

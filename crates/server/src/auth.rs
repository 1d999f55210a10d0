//! Who is asking, and what they may do.
//!
//! * A request is a [`Principal`] through `Authorization: Bearer <token>` (an API token; its
//!   SHA-256 is looked up) or the `cutover_session` cookie (a session; its SHA-256 is looked
//!   up). Anything else is 401 for the API; pages use [`PageAuth`], which redirects to
//!   `/login`.
//! * Roles are ordered: viewer < deployer < admin ([`Principal::require`]); a token may be
//!   scoped to apps ([`Principal::require_app`]).
//! * A state-changing request with a session needs its CSRF token ([`check_csrf`]; the API
//!   takes it in `X-CSRF-Token`, forms in a field). A Bearer token needs none: a browser never
//!   sends one on its own.
//! * [`login`]: the same answer for an unknown user and a wrong password (and the same work:
//!   an unknown user is verified against a decoy hash); failures are counted per (user,
//!   client address), so one attacker cannot lock anyone out from elsewhere; past
//!   [`FREE_FAILURES`] that address waits [`FIRST_WAIT`] seconds, doubling per failure up to
//!   [`MAX_WAIT`].

use crate::error::ApiError;
use crate::secret;
use crate::AppState;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use cutover_store::AuditRow;
use std::net::IpAddr;
use std::sync::Arc;

pub use cutover_store::Role;

/// The session cookie's name.
pub const COOKIE: &str = "cutover_session";
/// How long a session lasts.
pub const SESSION_SECS: i64 = 12 * 3600;
/// Failed logins per (user, address) before that address has to wait.
pub const FREE_FAILURES: u32 = 5;
/// The first wait, in seconds: long enough that a guesser gains nothing by being slow.
pub const FIRST_WAIT: u64 = 15;
/// The longest wait, in seconds.
pub const MAX_WAIT: u64 = 300;

/// How the request proved who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Via {
    /// A session cookie, with the session's CSRF token.
    Session { csrf: String },
    /// An API token (its name is the principal's name).
    Token,
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Session { .. } => f.write_str("Session { csrf: <redacted> }"),
            Via::Token => f.write_str("Token"),
        }
    }
}

/// A user with a session, or an API token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// A token's app scope; `None`: every app.
    pub apps: Option<Vec<String>>,
    pub via: Via,
}

impl Principal {
    /// How audit rows and runs name it: the user, or `token:NAME`.
    pub fn who(&self) -> String {
        match self.via {
            Via::Session { .. } => self.name.clone(),
            Via::Token => format!("token:{}", self.name),
        }
    }

    /// 403 unless the role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            return Ok(());
        }
        let what = match role {
            Role::Admin => "manage users and tokens or read the audit log",
            Role::Deployer => "deploy or roll back",
            Role::Viewer => "read",
        };
        Err(ApiError::Forbidden(format!(
            "{} is a {}: only a{} {} may {what}",
            self.who(),
            self.role,
            if role == Role::Admin { "n" } else { "" },
            role
        )))
    }

    /// Whether the token's scope covers `app`.
    pub fn may_see(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.iter().any(|a| a == app))
    }

    /// 403 unless the token's scope covers `app`.
    pub fn require_app(&self, app: &str) -> Result<(), ApiError> {
        if self.may_see(app) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "{} is scoped to {}, not to `{app}`",
            self.who(),
            self.apps.as_deref().unwrap_or_default().join(", ")
        )))
    }

    /// The CSRF token pages put in their forms (`None` for a token).
    pub fn csrf(&self) -> Option<&str> {
        match &self.via {
            Via::Session { csrf } => Some(csrf),
            Via::Token => None,
        }
    }
}

/// 403 unless `submitted` is the session's CSRF token (compared in constant time). A token
/// principal passes: a browser never sends a Bearer token by itself.
pub fn check_csrf(principal: &Principal, submitted: &str) -> Result<(), ApiError> {
    match &principal.via {
        Via::Token => Ok(()),
        Via::Session { csrf } if secret::same(csrf, submitted) => Ok(()),
        Via::Session { .. } => Err(ApiError::Forbidden(
            "missing or wrong CSRF token: reload the page and try again".into(),
        )),
    }
}

/// [`check_csrf`] with the `X-CSRF-Token` header of an API request.
pub fn check_csrf_header(principal: &Principal, headers: &HeaderMap) -> Result<(), ApiError> {
    let submitted = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    check_csrf(principal, submitted)
}

fn now() -> i64 {
    cutover_engine::now_secs() as i64
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Who the request's credentials name: `Ok(None)` without any; `Err` (401) for bad ones.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Option<Principal>, ApiError> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        return from_token(state, token).map(Some);
    }
    match cookie_value(headers) {
        Some(id) => Ok(from_session(state, &id)),
        None => Ok(None),
    }
}

fn from_token(state: &AppState, token: &str) -> Result<Principal, ApiError> {
    let t = state
        .store
        .token_by_hash(&secret::digest(token))?
        .ok_or_else(|| ApiError::Unauthorized("unknown API token".into()))?;
    if t.revoked_at.is_some() {
        return Err(ApiError::Unauthorized(format!(
            "the API token `{}` was revoked",
            t.name
        )));
    }
    if t.expires_at.is_some_and(|e| e <= now()) {
        return Err(ApiError::Unauthorized(format!(
            "the API token `{}` expired; create a new one (cutover token create)",
            t.name
        )));
    }
    let _ = state.store.touch_token(&t.name, &cutover_engine::now_utc());
    Ok(Principal {
        name: t.name,
        role: t.role,
        apps: t.apps,
        via: Via::Token,
    })
}

fn from_session(state: &AppState, id: &str) -> Option<Principal> {
    let s = state.store.session(&secret::digest(id)).ok()??;
    if s.expires_at <= now() {
        return None;
    }
    // The user's role now, not at login: a demoted or removed user loses it at once.
    let user = state.store.user(&s.user).ok()??;
    Some(Principal {
        name: user.name,
        role: user.role,
        apps: None,
        via: Via::Session { csrf: s.csrf },
    })
}

/// The API's extractor: a principal, or 401 JSON.
impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.headers)?.ok_or_else(ApiError::unauthorized)
    }
}

/// `Option<Principal>`: `None` without valid credentials (never a rejection).
impl OptionalFromRequestParts<Arc<AppState>> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(authenticate(state, &parts.headers).ok().flatten())
    }
}

/// The pages' extractor: a principal, or a redirect to `/login?next=<path>`.
#[derive(Debug, Clone)]
pub struct PageAuth(pub Principal);

/// A page asked for without a session: go and log in.
#[derive(Debug)]
pub struct ToLogin(pub String);

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        Redirect::to(&self.0).into_response()
    }
}

impl FromRequestParts<Arc<AppState>> for PageAuth {
    type Rejection = ToLogin;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match authenticate(state, &parts.headers).ok().flatten() {
            Some(p) => Ok(PageAuth(p)),
            None => {
                let path = parts.uri.path();
                // Only a local path goes into `next`: never another site.
                let next: String = path
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "/-_.".contains(*c))
                    .collect();
                Err(ToLogin(
                    if next.starts_with('/') && !next.starts_with("//") {
                        format!("/login?next={next}")
                    } else {
                        "/login".into()
                    },
                ))
            }
        }
    }
}

/// Why a login did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown user or wrong password: the same for both.
    Refused,
    /// Too many failures for this user from this address: wait `retry_after` seconds.
    Slowed {
        retry_after: u64,
    },
    Internal(String),
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> ApiError {
        match e {
            LoginError::Refused => ApiError::Unauthorized("wrong user name or password".into()),
            LoginError::Slowed { retry_after } => ApiError::Slowed {
                message: format!(
                    "too many failed logins for this user from your address: try again in {retry_after} s"
                ),
                retry_after,
            },
            LoginError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// How long `(user, addr)` must still wait after `failures` failures, the last at `last`.
pub fn wait_left(failures: u32, last: i64, now: i64) -> u64 {
    if failures < FREE_FAILURES {
        return 0;
    }
    let wait = FIRST_WAIT
        .checked_shl(failures - FREE_FAILURES)
        .filter(|w| w >> (failures - FREE_FAILURES) == FIRST_WAIT)
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    let since = now.saturating_sub(last).max(0) as u64;
    wait.saturating_sub(since)
}

/// A new session: the `Set-Cookie` value and the session's CSRF token.
pub struct LoggedIn {
    pub set_cookie: String,
    pub csrf: String,
    pub user: String,
    pub role: Role,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("user", &self.user)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn audit(state: &AppState, who: &str, action: &str, from: IpAddr, detail: &str) {
    let _ = state.store.audit(&AuditRow {
        at: cutover_engine::now_utc(),
        who: who.into(),
        action: action.into(),
        from: Some(from.to_string()),
        detail: detail.into(),
        ..AuditRow::default()
    });
}

/// Checks a user's password and opens a session (blocking: argon2 takes tens of ms; call it
/// from `spawn_blocking`). Every attempt is an audit row.
pub fn login(
    state: &AppState,
    user: &str,
    password: &str,
    client: IpAddr,
) -> Result<LoggedIn, LoginError> {
    let addr = client.to_string();
    let internal = |e: cutover_store::StoreError| LoginError::Internal(e.to_string());
    let (failures, last) = state.store.login_failures(user, &addr).map_err(internal)?;
    let wait = wait_left(failures, last, now());
    if wait > 0 {
        audit(state, user, "login slowed", client, "");
        return Err(LoginError::Slowed { retry_after: wait });
    }
    let found = state.store.user(user).map_err(internal)?;
    let hash = found
        .as_ref()
        .map_or(secret::decoy_hash(), |u| u.password_hash.as_str());
    let ok = secret::verify_password(password, hash) && found.is_some();
    let Some(found) = found.filter(|_| ok) else {
        state
            .store
            .record_login_failure(user, &addr, now())
            .map_err(internal)?;
        audit(state, user, "login failed", client, "");
        return Err(LoginError::Refused);
    };
    state
        .store
        .clear_login_failures(user, &addr)
        .map_err(internal)?;
    let id = secret::random_hex(32);
    let csrf = secret::random_hex(32);
    let _ = state.store.prune_sessions(now());
    state
        .store
        .add_session(
            &secret::digest(&id),
            &found.name,
            &csrf,
            &cutover_engine::now_utc(),
            now() + SESSION_SECS,
        )
        .map_err(internal)?;
    audit(state, &found.name, "login", client, "");
    let secure = if state.secure { "; Secure" } else { "" };
    Ok(LoggedIn {
        set_cookie: format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECS}{secure}"
        ),
        csrf,
        user: found.name,
        role: found.role,
    })
}

/// Ends the session the request carries; the `Set-Cookie` value that clears the cookie.
pub fn logout(state: &AppState, headers: &HeaderMap, client: IpAddr) -> String {
    if let Some(id) = cookie_value(headers) {
        if let Some(p) = from_session(state, &id) {
            audit(state, &p.name, "logout", client, "");
        }
        let _ = state.store.remove_session(&secret::digest(&id));
    }
    let secure = if state.secure { "; Secure" } else { "" };
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_after_the_free_failures_and_are_capped() {
        assert_eq!(wait_left(4, 100, 100), 0);
        assert_eq!(wait_left(5, 100, 100), 15);
        assert_eq!(wait_left(5, 100, 110), 5);
        assert_eq!(wait_left(6, 100, 100), 30);
        assert_eq!(wait_left(8, 100, 103), 117);
        assert_eq!(wait_left(9, 100, 100), 240);
        assert_eq!(wait_left(10, 100, 100), MAX_WAIT);
        assert_eq!(wait_left(40, 100, 100), MAX_WAIT);
        assert_eq!(wait_left(70, 100, 100), MAX_WAIT);
        assert_eq!(wait_left(9, 100, 400), 0);
    }

    #[test]
    fn roles_and_scopes() {
        let p = Principal {
            name: "ci".into(),
            role: Role::Deployer,
            apps: Some(vec!["site".into()]),
            via: Via::Token,
        };
        assert!(p.require(Role::Deployer).is_ok());
        assert_eq!(
            p.require(Role::Admin).unwrap_err().to_string(),
            "token:ci is a deployer: only an admin may manage users and tokens or read the audit log"
        );
        assert!(p.require_app("site").is_ok());
        assert_eq!(
            p.require_app("api").unwrap_err().to_string(),
            "token:ci is scoped to site, not to `api`"
        );
        assert!(check_csrf(&p, "").is_ok());
        let s = Principal {
            via: Via::Session { csrf: "abc".into() },
            ..p
        };
        assert!(check_csrf(&s, "abc").is_ok());
        assert!(check_csrf(&s, "abd").is_err());
        assert!(check_csrf(&s, "").is_err());
        assert!(!format!("{s:?}").contains("abc"));
    }
}

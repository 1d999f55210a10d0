//! The admin's pages: users (add with a given or generated password, remove), API tokens
//! (create, shown once; revoke) and the audit log. Everyone else gets the 403 page. Every
//! change is an audit row.

use super::{
    blocking, check_form, csrf_field, layout, require, see_other, when, PageError, PageResult,
};
use crate::auth::{PageAuth, Principal, Role};
use crate::secret;
use crate::AppState;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Form;
use cutover_store::{AuditRow, Token};
use maud::{html, Markup};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

fn audit(st: &AppState, p: &Principal, action: &str, from: SocketAddr, detail: String) {
    let _ = st.store.audit(&AuditRow {
        at: cutover_engine::now_utc(),
        who: p.who(),
        action: action.into(),
        from: Some(from.ip().to_string()),
        detail,
        ..AuditRow::default()
    });
}

fn invalid(p: &Principal, m: impl Into<String>) -> PageError {
    PageError::new(StatusCode::UNPROCESSABLE_ENTITY, m).for_user(p)
}

fn valid_name(p: &Principal, name: &str) -> Result<(), PageError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(invalid(
            p,
            "a name is 1 to 64 letters, digits, `-`, `_`, `.` or `@`",
        ));
    }
    Ok(())
}

fn role_select() -> Markup {
    html! {
        select #role name="role" {
            option value="viewer" { "viewer" }
            option value="deployer" { "deployer" }
            option value="admin" { "admin" }
        }
    }
}

fn users_page(st: &AppState, p: &Principal, shown: Option<(&str, &str)>) -> PageResult {
    let users = st.store.users()?;
    let body = html! {
        h1 { "Users" }
        @if let Some((name, password)) = shown {
            div.notice #new-password {
                "The password of " strong { (name) } " (shown once): "
                div.secret { (password) }
            }
        }
        div.table-wrap {
            table #users {
                thead { tr { th { "User" } th { "Role" } th.opt { "Since" } th {} } }
                tbody {
                    @for u in &users {
                        tr data-user=(u.name) {
                            td { (u.name) }
                            td { (u.role.as_str()) }
                            td.opt { (when(&u.created_at)) }
                            td {
                                @if u.name != p.name {
                                    form.inline method="post" action={ "/users/" (u.name) "/remove" }
                                        data-confirm={ "Remove the user " (u.name) "?" } {
                                        (csrf_field(p))
                                        input type="hidden" name="confirmed" value="1";
                                        button.small type="submit" { "remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Add a user" }
        form.stack #add-user method="post" action="/users" {
            (csrf_field(p))
            div { label for="name" { "User name" } input #name type="text" name="name" required; }
            div { label for="role" { "Role" } (role_select()) }
            div {
                label for="password" { "Password (empty: one is generated and shown once)" }
                input #password type="password" name="password" autocomplete="new-password";
            }
            button.primary type="submit" { "Add" }
        }
    };
    Ok(layout("Users", Some(p), body).into_response())
}

pub(crate) async fn users(State(st): State<Arc<AppState>>, PageAuth(p): PageAuth) -> PageResult {
    require(&p, Role::Admin)?;
    users_page(&st, &p, None)
}

#[derive(Deserialize)]
pub(crate) struct AddUser {
    csrf: Option<String>,
    name: String,
    role: String,
    password: Option<String>,
}

pub(crate) async fn add_user(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Form(f): Form<AddUser>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Admin)?;
    let name = f.name.trim().to_string();
    valid_name(&p, &name)?;
    let role =
        Role::parse(&f.role).ok_or_else(|| invalid(&p, "role: viewer, deployer or admin"))?;
    let given = f.password.filter(|s| !s.is_empty());
    if given
        .as_ref()
        .is_some_and(|s| s.len() < 8 || s.len() > 1024)
    {
        return Err(invalid(&p, "a password is 8 to 1024 characters"));
    }
    let generated = given.is_none();
    let password = given.unwrap_or_else(secret::new_password);
    let pw = password.clone();
    let hash = blocking(move || {
        secret::hash_password(&pw).map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    if !st
        .store
        .add_user(&name, role, &hash, &cutover_engine::now_utc())?
    {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            format!("a user `{name}` exists already"),
        )
        .for_user(&p));
    }
    audit(&st, &p, "user add", from, format!("{name} ({role})"));
    users_page(
        &st,
        &p,
        generated.then_some((name.as_str(), password.as_str())),
    )
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    csrf: Option<String>,
}

pub(crate) async fn remove_user(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Admin)?;
    if name == p.name {
        return Err(invalid(&p, "you cannot remove yourself"));
    }
    if !st.store.remove_user(&name)? {
        return Err(
            PageError::new(StatusCode::NOT_FOUND, format!("no user `{name}`")).for_user(&p),
        );
    }
    audit(&st, &p, "user remove", from, name);
    Ok(see_other("/users"))
}

fn tokens_page(st: &AppState, p: &Principal, shown: Option<(&str, &str)>) -> PageResult {
    let tokens = st.store.tokens()?;
    let body = html! {
        h1 { "API tokens" }
        @if let Some((name, token)) = shown {
            div.notice #new-token {
                "The token " strong { (name) } " (shown once; send it as "
                code { "Authorization: Bearer …" } " or in " code { "CUTOVER_TOKEN" } "): "
                div.secret { (token) }
            }
        }
        div.table-wrap {
            table #tokens {
                thead { tr {
                    th { "Token" } th { "Role" } th { "Apps" } th.opt { "Created" }
                    th.opt { "Expires" } th.opt { "Last used" } th {}
                } }
                tbody {
                    @for t in &tokens {
                        tr data-token=(t.name) {
                            td { (t.name) }
                            td { (t.role.as_str()) }
                            td { (t.apps.as_ref().map(|a| a.join(", ")).unwrap_or_else(|| "all".into())) }
                            td.opt { (when(&t.created_at)) }
                            td.opt { (t.expires_at.map(|e| when(&cutover_core::format_utc(e.max(0) as u64))).unwrap_or_else(|| "never".into())) }
                            td.opt { (t.last_used_at.as_deref().map(when).unwrap_or_else(|| "never".into())) }
                            td {
                                @match &t.revoked_at {
                                    Some(at) => span.status.bad { "revoked " (when(at)) },
                                    None => form.inline method="post" action={ "/tokens/" (t.name) "/revoke" }
                                        data-confirm={ "Revoke the token " (t.name) "?" } {
                                        (csrf_field(p))
                                        button.small type="submit" { "revoke" }
                                    },
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Create a token" }
        form.stack #create-token method="post" action="/tokens" {
            (csrf_field(p))
            div { label for="name" { "Name" } input #name type="text" name="name" required; }
            div { label for="role" { "Role" } (role_select()) }
            div { label for="apps" { "Apps (comma-separated; empty: all)" } input #apps type="text" name="apps"; }
            div { label for="days" { "Expires after days (empty: never)" } input #days type="text" name="days" inputmode="numeric"; }
            button.primary type="submit" { "Create" }
        }
    };
    Ok(layout("API tokens", Some(p), body).into_response())
}

pub(crate) async fn tokens(State(st): State<Arc<AppState>>, PageAuth(p): PageAuth) -> PageResult {
    require(&p, Role::Admin)?;
    tokens_page(&st, &p, None)
}

#[derive(Deserialize)]
pub(crate) struct CreateToken {
    csrf: Option<String>,
    name: String,
    role: String,
    apps: Option<String>,
    days: Option<String>,
}

pub(crate) async fn create_token(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Form(f): Form<CreateToken>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Admin)?;
    let name = f.name.trim().to_string();
    valid_name(&p, &name)?;
    let role =
        Role::parse(&f.role).ok_or_else(|| invalid(&p, "role: viewer, deployer or admin"))?;
    let apps: Vec<String> = f
        .apps
        .unwrap_or_default()
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    for a in &apps {
        st.app(a).map_err(|e| PageError::from(e).for_user(&p))?;
    }
    let days = match f.days.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) => Some(
            d.parse::<i64>()
                .ok()
                .filter(|d| (1..=3650).contains(d))
                .ok_or_else(|| invalid(&p, "expires after 1 to 3650 days"))?,
        ),
        None => None,
    };
    let token = secret::new_token();
    let t = Token {
        name: name.clone(),
        hash: secret::digest(&token),
        role,
        apps: (!apps.is_empty()).then_some(apps),
        created_at: cutover_engine::now_utc(),
        expires_at: days.map(|d| cutover_engine::now_secs() as i64 + d * 86_400),
        last_used_at: None,
        revoked_at: None,
    };
    if !st.store.add_token(&t)? {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            format!("a token `{name}` exists already"),
        )
        .for_user(&p));
    }
    audit(&st, &p, "token create", from, format!("{name} ({role})"));
    tokens_page(&st, &p, Some((name.as_str(), token.as_str())))
}

pub(crate) async fn revoke_token(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    check_form(&p, f.csrf.as_deref())?;
    require(&p, Role::Admin)?;
    if !st.store.revoke_token(&name, &cutover_engine::now_utc())? {
        return Err(
            PageError::new(StatusCode::NOT_FOUND, format!("no token `{name}`")).for_user(&p),
        );
    }
    audit(&st, &p, "token revoke", from, name);
    Ok(see_other("/tokens"))
}

#[derive(Deserialize)]
pub(crate) struct AuditQuery {
    before: Option<i64>,
}

pub(crate) async fn audit_page(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    Query(q): Query<AuditQuery>,
) -> PageResult {
    require(&p, Role::Admin)?;
    let rows = st.store.audit_rows(100, q.before)?;
    let older = rows.last().filter(|_| rows.len() == 100).map(|r| r.id);
    let body = html! {
        h1 { "Audit log" }
        div.table-wrap {
            table #audit {
                thead { tr { th { "When" } th { "Who" } th { "What" } th { "App" } th.opt { "Release" } th.opt { "From" } th.opt { "Detail" } } }
                tbody {
                    @for r in &rows {
                        tr {
                            td { (when(&r.at)) }
                            td { (r.who) }
                            td.action { (r.action) }
                            td { (r.app.as_deref().unwrap_or("")) }
                            td.opt { code { (r.release.as_deref().unwrap_or("")) } }
                            td.opt { (r.from.as_deref().unwrap_or("")) }
                            td.opt { (r.detail) }
                        }
                    }
                }
            }
        }
        @if let Some(o) = older { div.pager { a #older href={ "/audit?before=" (o) } { "Older" } } }
    };
    Ok(layout("Audit log", Some(&p), body).into_response())
}

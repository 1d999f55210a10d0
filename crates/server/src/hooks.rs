//! Webhooks: `POST /hooks/{provider}/{app}` from GitHub, Gitea or GitLab.
//!
//! The order is the contract's: the app must have a `[webhook]` for this provider (404),
//! the body is read up to [`MAX_HOOK_BODY`] (413 past it, from `Content-Length` before
//! reading anything, or as soon as a streamed body passes it), then the signature is
//! checked over the raw bytes in constant time (401 and an audit row) **before** anything is
//! parsed. Only then: the delivery id (a redelivery answers `{"duplicate": true}` and runs
//! nothing), `ping`, the branch, and a job that builds and deploys the pushed full SHA.
//!
//! While a run of the app is in progress the newest push waits in [`Queue`] (one slot per
//! app): a newer push replaces it, and the dropped one is recorded (audit row, and its
//! delivery's outcome `superseded by <sha>`). A waiter thread starts the waiting push once
//! the app is free.
//!
//! **Invariant:** the secret is read from the server's environment at each delivery and is
//! never stored, logged, formatted or compared other than in constant time.

use crate::auth::{Principal, Role, Via};
use crate::error::ApiError;
use crate::jobs::{self, Deploy, JobRequest};
use crate::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cutover_core::webhook::{Provider, WebhookConfig};
use cutover_store::AuditRow;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest delivery body read (5 MiB).
pub const MAX_HOOK_BODY: usize = 5 * 1024 * 1024;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/hooks/{provider}/{app}", post(hook))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// A push waiting for the app's run to end.
#[derive(Debug, Clone)]
struct Waiting {
    sha: String,
    /// A pull request's preview (`None`: the app itself).
    pr: Option<u64>,
    delivery: Option<String>,
    provider: Provider,
    from: IpAddr,
    /// Where commit statuses go, when `status_token_env` is set.
    status: Option<StatusTarget>,
}

/// A forge's statuses API for one repository (GitHub's shape; Gitea's is the same).
#[derive(Debug, Clone)]
struct StatusTarget {
    api: String,
    /// `owner/name`.
    repo: String,
    /// The variable holding the token (the token itself is read when a status is sent).
    token_env: String,
    provider: Provider,
}

fn status_target(hook: &WebhookConfig, payload: &Value) -> Option<StatusTarget> {
    let token_env = hook.status_token_env.clone()?;
    let api = hook.api_url.clone().or_else(|| {
        (hook.provider == Provider::Github).then(|| "https://api.github.com".to_string())
    })?;
    if hook.provider == Provider::Gitlab {
        // GitLab names the project by its numeric id (`project.id`, or a push's `project_id`).
        let id = payload
            .get("project")
            .and_then(|p| p.get("id"))
            .or_else(|| payload.get("project_id"))
            .and_then(Value::as_u64)?;
        return Some(StatusTarget {
            api,
            repo: id.to_string(),
            token_env,
            provider: hook.provider,
        });
    }
    let repo = payload
        .get("repository")
        .and_then(|r| r.get("full_name"))
        .and_then(Value::as_str)?;
    let ok = repo.split('/').count() == 2
        && repo.len() <= 200
        && repo.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    ok.then(|| StatusTarget {
        api,
        repo: repo.to_string(),
        token_env,
        provider: hook.provider,
    })
}

/// Posts one commit status; failures go to the server's log (never with the token).
fn send_status(
    t: &StatusTarget,
    sha: &str,
    state: &str,
    target_url: Option<&str>,
    description: &str,
) {
    let Ok(token) = std::env::var(&t.token_env) else {
        eprintln!(
            "commit status for {sha} not sent: the server's environment has no {}",
            t.token_env
        );
        return;
    };
    let description: String = description.chars().take(140).collect();
    let gitlab = t.provider == Provider::Gitlab;
    // GitLab says `failed` and `name`; GitHub and Gitea `failure` and `context`.
    let state = match (gitlab, state) {
        (true, "failure") => "failed",
        (_, s) => s,
    };
    let mut body = json!({ "state": state, "description": description });
    body[if gitlab { "name" } else { "context" }] = json!("cutover");
    if let Some(u) = target_url {
        body["target_url"] = json!(u);
    }
    let (header, value) = match t.provider {
        Provider::Gitlab => ("private-token", token.clone()),
        Provider::Gitea => ("authorization", format!("token {token}")),
        Provider::Github => ("authorization", format!("Bearer {token}")),
    };
    // GitLab: `api_url` is the instance's API root (`https://gitlab.example.com/api/v4`).
    let url = match t.provider {
        Provider::Gitlab => format!("{}/projects/{}/statuses/{sha}", t.api, t.repo),
        _ => format!("{}/repos/{}/statuses/{sha}", t.api, t.repo),
    };
    // reqwest is built without a provider of its own: ring's (a no-op when one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .user_agent("cutover")
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("commit status for {sha} not sent: {e}");
            return;
        }
    };
    let sent = client
        .post(&url)
        .header(header, value)
        .header("accept", "application/vnd.github+json")
        .json(&body)
        .send();
    drop(token);
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => eprintln!(
            "commit status {state} for {sha} refused by {url}: HTTP {}",
            r.status()
        ),
        Err(e) => eprintln!(
            "commit status {state} for {sha} not sent to {url}: {}",
            e.without_url()
        ),
    }
}

/// `pending` now, then `success` or `failure` when the run ends (a thread watches the run);
/// a preview's `success` links to the preview (`served_at`).
fn report_statuses(
    st: &Arc<AppState>,
    t: StatusTarget,
    sha: String,
    run: i64,
    served_at: Option<String>,
) {
    let target = st
        .public_url
        .as_deref()
        .map(|u| format!("{}/runs/{run}", u.trim_end_matches('/')));
    let st = st.clone();
    let _ = std::thread::Builder::new()
        .name(format!("status-{run}"))
        .spawn(move || {
            let short = &sha[..7];
            send_status(
                &t,
                &sha,
                "pending",
                target.as_deref(),
                &format!("cutover is building and deploying {short} (run {run})"),
            );
            let row = loop {
                match st.store.run_row(run) {
                    Ok(Some(r)) if r.outcome.is_some() => break Some(r),
                    Ok(Some(_)) => {}
                    _ => break None,
                }
                if !st.jobs.is_running(run) {
                    // One last look: the worker records the outcome before it lets go.
                    break st.store.run_row(run).ok().flatten();
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            let outcome = row.as_ref().and_then(|r| r.outcome.clone());
            let (state, text) = match outcome.as_deref() {
                Some("succeeded") if served_at.is_some() => (
                    "success",
                    format!(
                        "{short} is served at {}",
                        served_at.as_deref().unwrap_or("")
                    ),
                ),
                Some("succeeded") => (
                    "success",
                    format!(
                        "{short} is live (release {})",
                        row.as_ref().map(|r| r.release.as_str()).unwrap_or("")
                    ),
                ),
                _ => {
                    let why = row
                        .as_ref()
                        .and_then(|r| r.message.clone())
                        .or(outcome)
                        .unwrap_or_else(|| "the run did not finish".into());
                    ("failure", why.lines().next().unwrap_or("").to_string())
                }
            };
            let link = match state {
                "success" => served_at.as_deref().or(target.as_deref()),
                _ => target.as_deref(),
            };
            send_status(&t, &sha, state, link, &text);
        });
}

/// The newest waiting push of each app.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: Mutex<HashMap<String, Waiting>>,
}

fn principal(provider: Provider, app: &str) -> Principal {
    // A session-shaped principal so that runs and audit rows name it `webhook:<provider>`;
    // it exists only inside this module and never holds a session.
    Principal {
        name: format!("webhook:{}", provider.as_str()),
        role: Role::Deployer,
        apps: Some(vec![app.to_string()]),
        via: Via::Session {
            csrf: String::new(),
        },
    }
}

fn who(provider: Provider) -> String {
    format!("webhook:{}", provider.as_str())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why the delivery is not authentic, if it is not. Constant time in the secret.
fn check_signature(
    provider: Provider,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), &'static str> {
    match provider {
        Provider::Github | Provider::Gitea => {
            let (name, prefix) = if provider == Provider::Github {
                ("x-hub-signature-256", "sha256=")
            } else {
                ("x-gitea-signature", "")
            };
            let given = header(headers, name).ok_or("no signature header")?;
            let hex = given.strip_prefix(prefix).ok_or("malformed signature")?;
            let tag = unhex(hex)
                .filter(|t| t.len() == 32)
                .ok_or("malformed signature")?;
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            ring::hmac::verify(&key, body, &tag).map_err(|_| "signature does not match")
        }
        Provider::Gitlab => {
            let given = header(headers, "x-gitlab-token").ok_or("no X-Gitlab-Token header")?;
            if crate::secret::same(given, secret) {
                Ok(())
            } else {
                Err("token does not match")
            }
        }
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

async fn hook(
    State(st): State<Arc<AppState>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path((provider_name, app)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let no_hook = || ApiError::NotFound(format!("no webhook for `{app}` from {provider_name}"));
    let config = st.apps.get(&app).ok_or_else(no_hook)?.clone();
    let hook: &WebhookConfig = config.webhook.as_ref().ok_or_else(no_hook)?;
    let provider = Provider::parse(&provider_name)
        .filter(|p| *p == hook.provider)
        .ok_or_else(no_hook)?;
    let too_large =
        || ApiError::TooLarge(format!("a webhook body is at most {MAX_HOOK_BODY} bytes"));
    let declared = header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_HOOK_BODY as u64) {
        return Err(too_large());
    }
    let raw = axum::body::to_bytes(body, MAX_HOOK_BODY)
        .await
        .map_err(|_| too_large())?;

    let at = cutover_engine::now_utc();
    let refuse = |why: &str| -> Result<Response, ApiError> {
        st.store.audit(&AuditRow {
            at: at.clone(),
            who: who(provider),
            action: "webhook refused".into(),
            app: Some(app.clone()),
            from: Some(from.ip().to_string()),
            detail: why.to_string(),
            ..AuditRow::default()
        })?;
        Err(ApiError::Unauthorized(format!(
            "webhook refused: {why}; check the secret shared with the forge"
        )))
    };
    let secret = match std::env::var(&hook.secret_env) {
        Ok(s) if !s.is_empty() => s,
        _ => {
            eprintln!(
                "webhook for {app} refused: the server's environment has no {}",
                hook.secret_env
            );
            return refuse("the server has no secret for this webhook");
        }
    };
    let checked = check_signature(provider, &secret, &headers, &raw);
    drop(secret);
    if let Err(why) = checked {
        return refuse(why);
    }

    // Authentic from here on.
    let (event_header, delivery_header) = match provider {
        Provider::Github => ("x-github-event", "x-github-delivery"),
        Provider::Gitea => ("x-gitea-event", "x-gitea-delivery"),
        Provider::Gitlab => ("x-gitlab-event", "x-gitlab-event-uuid"),
    };
    let event = header(&headers, event_header).unwrap_or("").to_string();
    let delivery = header(&headers, delivery_header)
        .filter(|d| !d.is_empty() && d.len() <= 200 && !d.chars().any(|c| c.is_control()))
        .map(str::to_string);
    if let Some(d) = &delivery {
        if !st
            .store
            .add_delivery(&app, d, provider.as_str(), &at, "received")?
        {
            return Ok(answer(StatusCode::OK, json!({ "duplicate": true })));
        }
    }
    let outcome = |text: &str, sha: Option<&str>| {
        if let Some(d) = &delivery {
            let _ = st.store.set_delivery_outcome(&app, d, sha, text);
        }
    };
    if event == "ping" && provider != Provider::Gitlab {
        outcome("ping", None);
        return Ok(answer(StatusCode::OK, json!({ "ping": "ok" })));
    }
    if event == "pull_request" && provider != Provider::Gitlab {
        return pull_request(&st, &app, &config, provider, from.ip(), delivery, &raw);
    }
    if event == "Merge Request Hook" && provider == Provider::Gitlab {
        let payload: Value = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::Invalid(format!("the merge request payload is not JSON: {e}"))
        })?;
        let as_pr = serde_json::to_vec(&gitlab_merge_request(&payload))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        return pull_request(&st, &app, &config, provider, from.ip(), delivery, &as_pr);
    }
    let is_push = match provider {
        Provider::Gitlab => event == "Push Hook",
        _ => event == "push",
    };
    if !is_push {
        let why = format!("event {event:?} is not handled (only push and pull_request)");
        outcome(&format!("ignored: {why}"), None);
        return Ok(answer(StatusCode::OK, json!({ "ignored": why })));
    }
    let payload: Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::Invalid(format!("the push payload is not JSON: {e}")))?;
    let git_ref = payload.get("ref").and_then(Value::as_str).unwrap_or("");
    let want = format!("refs/heads/{}", hook.branch);
    if payload.get("deleted").and_then(Value::as_bool) == Some(true) {
        let why = format!("{git_ref} was deleted; nothing to deploy");
        outcome(&format!("ignored: {why}"), None);
        return Ok(answer(StatusCode::OK, json!({ "ignored": why })));
    }
    if git_ref != want {
        let why = format!("push to {git_ref}; this app deploys {want}");
        outcome(&format!("ignored: {why}"), None);
        return Ok(answer(StatusCode::OK, json!({ "ignored": why })));
    }
    let sha = match provider {
        Provider::Gitlab => payload
            .get("checkout_sha")
            .and_then(Value::as_str)
            .or_else(|| payload.get("after").and_then(Value::as_str)),
        _ => payload.get("after").and_then(Value::as_str),
    }
    .unwrap_or("")
    .to_string();
    if !is_full_sha(&sha) {
        let why =
            format!("the push names no commit to deploy (expected 40 hex digits, got {sha:?})");
        outcome(&format!("refused: {why}"), None);
        return Err(ApiError::Invalid(why));
    }
    let w = Waiting {
        sha: sha.clone(),
        pr: None,
        delivery: delivery.clone(),
        provider,
        from: from.ip(),
        status: status_target(hook, &payload),
    };
    push(&st, &app, w)
}

/// The waiting slot of an app or of one of its previews.
fn slot(app: &str, pr: Option<u64>) -> String {
    match pr {
        Some(n) => cutover_core::preview::preview_app(app, n),
        None => app.to_string(),
    }
}

/// Starts the push now, or makes it the app's (or the preview's) waiting one.
fn push(st: &Arc<AppState>, app: &str, w: Waiting) -> Result<Response, ApiError> {
    let key = slot(app, w.pr);
    let mut waiting = st.hooks.waiting.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(old) = waiting.remove(&key) {
        supersede(st, app, &old, &w.sha);
        let sha = w.sha.clone();
        record(st, app, &w, "waiting for the run in progress");
        waiting.insert(key, w);
        return Ok(answer(StatusCode::ACCEPTED, json!({ "queued": sha })));
    }
    match start(st, app, &w) {
        Ok(run) => Ok(answer(
            StatusCode::ACCEPTED,
            json!({ "run": run.to_string() }),
        )),
        Err(ApiError::Conflict(_)) => {
            let sha = w.sha.clone();
            record(st, app, &w, "waiting for the run in progress");
            waiting.insert(key.clone(), w);
            drop(waiting);
            let st2 = st.clone();
            let name = app.to_string();
            std::thread::Builder::new()
                .name(format!("hook-wait-{key}"))
                .spawn(move || wait_then_start(&st2, &name, &key))
                .map_err(|e| ApiError::Internal(format!("cannot start the waiter: {e}")))?;
            Ok(answer(StatusCode::ACCEPTED, json!({ "queued": sha })))
        }
        Err(e) => {
            record(st, app, &w, &format!("refused: {e}"));
            if let (Some(t), Some(_)) = (&w.status, w.pr) {
                let (t, sha, why) = (t.clone(), w.sha.clone(), e.to_string());
                std::thread::spawn(move || send_status(&t, &sha, "failure", None, &why));
            }
            Err(e)
        }
    }
}

fn record(st: &AppState, app: &str, w: &Waiting, outcome: &str) {
    if let Some(d) = &w.delivery {
        let _ = st.store.set_delivery_outcome(app, d, Some(&w.sha), outcome);
    }
}

/// Submits the deploy of the pushed SHA; records the run in the delivery.
fn start(st: &Arc<AppState>, app: &str, w: &Waiting) -> Result<i64, ApiError> {
    let req = match w.pr {
        Some(pr) => JobRequest::Preview {
            pr,
            what: Deploy::Ref(w.sha.clone()),
        },
        None => JobRequest::Deploy(Deploy::Ref(w.sha.clone())),
    };
    let run = jobs::submit(st, app, req, &principal(w.provider, app), w.from)?;
    record(st, app, w, &format!("run {run}"));
    if let Some(t) = &w.status {
        let url =
            w.pr.and_then(|pr| st.apps.get(app).and_then(|c| c.preview_url(pr)));
        report_statuses(st, t.clone(), w.sha.clone(), run, url);
    }
    Ok(run)
}

/// The label that lets a pull request from a fork get a preview.
pub const FORK_LABEL: &str = "cutover-preview";

/// A `pull_request` event (GitHub's shape; Gitea's is the same): opened, reopened,
/// synchronize (or the fork label added) build the head SHA and deploy the preview; closed
/// (merged or not) removes it. A pull request from a fork is not built unless labelled
/// [`FORK_LABEL`].
fn pull_request(
    st: &Arc<AppState>,
    app: &str,
    config: &cutover_core::Config,
    provider: Provider,
    from: IpAddr,
    delivery: Option<String>,
    raw: &[u8],
) -> Result<Response, ApiError> {
    let outcome = |text: &str, sha: Option<&str>| {
        if let Some(d) = &delivery {
            let _ = st.store.set_delivery_outcome(app, d, sha, text);
        }
    };
    let ignored = |why: String| -> Result<Response, ApiError> {
        outcome(&format!("ignored: {why}"), None);
        Ok(answer(StatusCode::OK, json!({ "ignored": why })))
    };
    let payload: Value = serde_json::from_slice(raw)
        .map_err(|e| ApiError::Invalid(format!("the pull_request payload is not JSON: {e}")))?;
    let pr_obj = payload.get("pull_request").unwrap_or(&Value::Null);
    let action = payload.get("action").and_then(Value::as_str).unwrap_or("");
    let Some(pr) = payload
        .get("number")
        .or_else(|| pr_obj.get("number"))
        .and_then(Value::as_u64)
        .filter(|n| (1..=cutover_core::preview::MAX_PR).contains(n))
    else {
        return Err(ApiError::Invalid(
            "the pull_request payload has no pull request number".into(),
        ));
    };
    if config.preview.is_none() {
        return ignored(format!(
            "pull request #{pr}: `{app}` has no [preview] section"
        ));
    }
    let hook = config.webhook.as_ref().expect("checked by the caller");
    if action == "closed" {
        // After the preview's run in progress, if any (see `previews::close`).
        let why = format!("pull request closed (webhook:{})", provider.as_str());
        crate::previews::close(st, config.clone(), pr, why)
            .map_err(|e| ApiError::Internal(format!("cannot start the removal: {e}")))?;
        outcome(&format!("removing the preview of #{pr}"), None);
        return Ok(answer(StatusCode::ACCEPTED, json!({ "removing": pr })));
    }
    let labels: Vec<&str> = pr_obj
        .get("labels")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|x| x.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let labelled = labels.contains(&FORK_LABEL);
    let builds = match action {
        "opened" | "reopened" | "synchronize" => true,
        "labeled" => {
            payload
                .get("label")
                .and_then(|l| l.get("name"))
                .and_then(Value::as_str)
                == Some(FORK_LABEL)
        }
        _ => false,
    };
    if !builds {
        return ignored(format!("pull request #{pr} {action}: nothing to build"));
    }
    let repo_of = |side: &str| {
        pr_obj
            .get(side)
            .and_then(|s| s.get("repo"))
            .and_then(|r| r.get("full_name"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (head_repo, base_repo) = (repo_of("head"), repo_of("base"));
    let fork = head_repo.is_none() || head_repo != base_repo;
    if fork && !labelled {
        return ignored(format!(
            "pull request #{pr} comes from a fork ({}) and is not labelled {FORK_LABEL}",
            head_repo.as_deref().unwrap_or("a deleted repository")
        ));
    }
    let sha = pr_obj
        .get("head")
        .and_then(|h| h.get("sha"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !is_full_sha(&sha) {
        let why = format!(
            "pull request #{pr} names no head commit (expected 40 hex digits, got {sha:?})"
        );
        outcome(&format!("refused: {why}"), None);
        return Err(ApiError::Invalid(why));
    }
    let w = Waiting {
        sha,
        pr: Some(pr),
        delivery,
        provider,
        from,
        status: status_target(hook, &payload),
    };
    push(st, app, w)
}

/// A GitLab `Merge Request Hook` said as the `pull_request` event [`pull_request`] reads:
/// `object_attributes.iid` is the number, `last_commit.id` the head SHA, `source` and
/// `target` projects the head and base repositories (a fork's source is another project),
/// `labels[].title` the labels, `project.id` the project statuses go to. Actions: `open`,
/// `reopen`; `update` with new commits (`oldrev`) is a synchronize, one that adds the fork
/// label a `labeled`, any other update nothing to build; `close` and `merge` close.
fn gitlab_merge_request(p: &Value) -> Value {
    let attrs = p.get("object_attributes").unwrap_or(&Value::Null);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let titles = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|x| x.get("title").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let labels = titles(p.get("labels"));
    let changes = p.get("changes").and_then(|c| c.get("labels"));
    let added_label = !titles(changes.and_then(|c| c.get("previous")))
        .iter()
        .any(|l| l == FORK_LABEL)
        && titles(changes.and_then(|c| c.get("current")))
            .iter()
            .any(|l| l == FORK_LABEL);
    let action = match attrs.get("action").and_then(Value::as_str).unwrap_or("") {
        "open" => "opened",
        "reopen" => "reopened",
        "close" | "merge" => "closed",
        "update" if attrs.get("oldrev").is_some_and(|v| !v.is_null()) => "synchronize",
        "update" if added_label => "labeled",
        other => other,
    };
    let repo = |side: &str| json!({ "full_name": text(p.get(side).and_then(|s| s.get("path_with_namespace"))) });
    json!({
        "action": action,
        "number": attrs.get("iid"),
        "label": if action == "labeled" { json!({ "name": FORK_LABEL }) } else { Value::Null },
        "pull_request": {
            "number": attrs.get("iid"),
            "labels": labels.iter().map(|l| json!({ "name": l })).collect::<Vec<_>>(),
            "head": { "sha": text(attrs.get("last_commit").and_then(|c| c.get("id"))), "repo": repo("source") },
            "base": { "repo": repo("target") },
        },
        "project": p.get("project").map(|pr| json!({ "id": pr.get("id") })),
    })
}

fn supersede(st: &AppState, app: &str, old: &Waiting, by: &str) {
    let text = format!("superseded by {by}");
    record(st, app, old, &text);
    let _ = st.store.audit(&AuditRow {
        at: cutover_engine::now_utc(),
        who: who(old.provider),
        action: "webhook push dropped".into(),
        app: Some(app.to_string()),
        from: Some(old.from.to_string()),
        detail: format!(
            "push of {} (delivery {}) {text}",
            old.sha,
            old.delivery.as_deref().unwrap_or("-")
        ),
        ..AuditRow::default()
    });
}

/// Drops pull request `pr`'s waiting push, if any (recorded with `why`).
pub(crate) fn drop_waiting(st: &AppState, app: &str, pr: u64, why: &str) {
    let mut waiting = st.hooks.waiting.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = waiting.remove(&slot(app, Some(pr))) {
        record(st, app, &w, &format!("dropped: {why}"));
    }
}

/// Starts the app's waiting push once the run in progress ends (polls; the slot may be
/// replaced meanwhile by a newer push, which is the one started).
fn wait_then_start(st: &Arc<AppState>, app: &str, key: &str) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let mut waiting = st.hooks.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = waiting.get(key).cloned() else {
            return;
        };
        match start(st, app, &w) {
            Err(ApiError::Conflict(_)) => continue,
            Ok(_) => {
                waiting.remove(key);
                return;
            }
            Err(e) => {
                waiting.remove(key);
                record(st, app, &w, &format!("refused: {e}"));
                eprintln!("webhook push of {} to {app} not started: {e}", w.sha);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GitLab `Merge Request Hook` body as GitLab documents it (the fields read, and more).
    fn mr(action: &str, oldrev: Option<&str>, source: &str, labels: &[&str]) -> Value {
        json!({
            "object_kind": "merge_request",
            "event_type": "merge_request",
            "project": { "id": 15, "path_with_namespace": "acme/site" },
            "object_attributes": {
                "iid": 7, "id": 99, "action": action, "state": "opened", "oldrev": oldrev,
                "source_branch": "feature", "target_branch": "main",
                "last_commit": { "id": "b".repeat(40), "message": "the feature" },
            },
            "labels": labels.iter().map(|l| json!({ "title": l })).collect::<Vec<_>>(),
            "source": { "path_with_namespace": source },
            "target": { "path_with_namespace": "acme/site" },
            "changes": {},
        })
    }

    #[test]
    fn gitlab_merge_requests_read_as_pull_requests() {
        let pr = gitlab_merge_request(&mr("open", None, "acme/site", &[]));
        assert_eq!(
            pr,
            json!({
                "action": "opened",
                "number": 7,
                "label": null,
                "pull_request": {
                    "number": 7,
                    "labels": [],
                    "head": { "sha": "b".repeat(40), "repo": { "full_name": "acme/site" } },
                    "base": { "repo": { "full_name": "acme/site" } },
                },
                "project": { "id": 15 },
            })
        );
        let action = |p: Value| gitlab_merge_request(&p)["action"].clone();
        assert_eq!(action(mr("reopen", None, "acme/site", &[])), "reopened");
        assert_eq!(
            action(mr("update", Some(&"a".repeat(40)), "acme/site", &[])),
            "synchronize"
        );
        assert_eq!(action(mr("update", None, "acme/site", &[])), "update");
        assert_eq!(action(mr("merge", None, "acme/site", &[])), "closed");
        assert_eq!(action(mr("close", None, "acme/site", &[])), "closed");
        // The fork label added by an update: built like GitHub's `labeled`.
        let mut labelled = mr("update", None, "eve/site", &[FORK_LABEL]);
        labelled["changes"] = json!({ "labels": {
            "previous": [],
            "current": [{ "title": FORK_LABEL }],
        } });
        let pr = gitlab_merge_request(&labelled);
        assert_eq!(
            (pr["action"].clone(), pr["label"]["name"].clone()),
            (json!("labeled"), json!(FORK_LABEL))
        );
        assert_eq!(
            pr["pull_request"]["labels"],
            json!([{ "name": FORK_LABEL }])
        );
        assert_eq!(pr["pull_request"]["head"]["repo"]["full_name"], "eve/site");
        // Statuses go to the project by id.
        let hook = WebhookConfig {
            provider: Provider::Gitlab,
            secret_env: "S".into(),
            branch: "main".into(),
            status_token_env: Some("T".into()),
            api_url: Some("https://gitlab.example.com/api/v4".into()),
        };
        let t = status_target(&hook, &pr).unwrap();
        assert_eq!(
            (t.api.as_str(), t.repo.as_str()),
            ("https://gitlab.example.com/api/v4", "15")
        );
        let push = json!({ "object_kind": "push", "project_id": 15 });
        assert_eq!(status_target(&hook, &push).unwrap().repo, "15");
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        crate::secret::hex(ring::hmac::sign(&key, body).as_ref())
    }

    #[test]
    fn signatures_are_checked_over_the_raw_body() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            format!("sha256={}", sign("s3cret", body)).parse().unwrap(),
        );
        assert_eq!(
            check_signature(Provider::Github, "s3cret", &h, body),
            Ok(())
        );
        assert_eq!(
            check_signature(Provider::Github, "other", &h, body),
            Err("signature does not match")
        );
        assert_eq!(
            check_signature(Provider::Github, "s3cret", &h, b"{}"),
            Err("signature does not match")
        );
        assert_eq!(
            check_signature(Provider::Gitea, "s3cret", &h, body),
            Err("no signature header")
        );
        let mut g = HeaderMap::new();
        g.insert("x-gitea-signature", sign("s3cret", body).parse().unwrap());
        assert_eq!(check_signature(Provider::Gitea, "s3cret", &g, body), Ok(()));
        let mut l = HeaderMap::new();
        l.insert("x-gitlab-token", "s3cret".parse().unwrap());
        assert_eq!(
            check_signature(Provider::Gitlab, "s3cret", &l, body),
            Ok(())
        );
        assert_eq!(
            check_signature(Provider::Gitlab, "s3cre", &l, body),
            Err("token does not match")
        );
        assert!(is_full_sha(&"a".repeat(40)));
        assert!(!is_full_sha(&"0".repeat(40)));
        assert!(!is_full_sha("main"));
    }
}

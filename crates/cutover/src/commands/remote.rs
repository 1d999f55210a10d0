//! `cutover deploy|rollback|history|status --server URL`: the same commands run by a
//! `cutover serve` (which holds the SSH keys), with the API token in `CUTOVER_TOKEN`. A
//! deploy or rollback starts a job, follows its events over SSE (reconnecting with
//! `Last-Event-ID` if the stream is cut), draws them with the same output code as a local
//! run, and exits with the run's exit code.

use super::{load_config, print_json};
use crate::cli::{Common, Through};
use crate::output::{table, Mode, Progress};
use cutover_engine::{exit, Reporter};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
    app: String,
}

/// What went wrong talking to the server, as an exit code (the message is printed).
type Fail = i32;

fn client(common: &Common, through: &Through) -> Result<Client, Fail> {
    let base = through
        .server
        .clone()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        eprintln!("error: --server {base}: expected an http:// or https:// URL");
        return Err(exit::USAGE);
    }
    let token = match std::env::var("CUTOVER_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            eprintln!("error: --server needs an API token in CUTOVER_TOKEN (an admin creates one with: cutover token create NAME --role deployer)");
            return Err(exit::USAGE);
        }
    };
    let app = match &through.app {
        Some(a) => a.clone(),
        None => load_config(&common.config)?.app,
    };
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let http = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(None)
        .user_agent(format!("cutover/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            eprintln!("error: cannot make an HTTP client: {e}");
            exit::NEEDS_PERSON
        })?;
    Ok(Client {
        base,
        token,
        http,
        app,
    })
}

/// The exit code for an API refusal.
fn refused(status: reqwest::StatusCode) -> i32 {
    match status.as_u16() {
        409 => exit::LOCKED,
        401 | 403 | 404 | 413 | 422 => exit::USAGE,
        _ => exit::NEEDS_PERSON,
    }
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and reads a JSON answer; a refusal prints the server's error.
    fn call(&self, req: reqwest::blocking::RequestBuilder) -> Result<Value, Fail> {
        let r = req.bearer_auth(&self.token).send().map_err(|e| {
            eprintln!("error: cannot reach the server {}: {e}", self.base);
            exit::NEEDS_PERSON
        })?;
        let status = r.status();
        let body: Value = r.json().unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let msg = body
            .get("error")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| format!("the server answered {status}"));
        eprintln!("error: {msg}");
        Err(refused(status))
    }

    fn get(&self, path: &str) -> Result<Value, Fail> {
        self.call(self.http.get(self.url(path)))
    }

    fn post(&self, path: &str, body: Value) -> Result<Value, Fail> {
        self.call(self.http.post(self.url(path)).json(&body))
    }

    /// Follows a run's events until its end; the run as the server ends it.
    fn follow(&self, run: &str, progress: &Progress, mode: Mode) -> Result<Value, Fail> {
        let mut last: Option<String> = None;
        let mut attempts = 0;
        loop {
            let mut req = self
                .http
                .get(self.url(&format!("/api/runs/{run}/events")))
                .bearer_auth(&self.token)
                .header("accept", "text/event-stream");
            if let Some(id) = &last {
                req = req.header("last-event-id", id.as_str());
            }
            let cut = match req.send() {
                Ok(r) if r.status().is_success() => {
                    attempts = 0;
                    match read_stream(r, &mut last, progress, mode) {
                        Some(end) => return Ok(end),
                        None => "the event stream was cut".to_string(),
                    }
                }
                Ok(r) => {
                    let status = r.status();
                    let body: Value = r.json().unwrap_or(Value::Null);
                    let msg = body.get("error").and_then(Value::as_str).unwrap_or("");
                    eprintln!("error: {msg} ({status})");
                    return Err(refused(status));
                }
                Err(e) => e.to_string(),
            };
            attempts += 1;
            if attempts > 30 {
                eprintln!("error: lost the server {} ({cut}); the run goes on there: cutover history --server {} shows how it ended", self.base, self.base);
                return Err(exit::NEEDS_PERSON);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Reads one SSE response: draws each event, remembers its id; `Some(run)` at `event: end`.
fn read_stream(
    r: reqwest::blocking::Response,
    last: &mut Option<String>,
    progress: &Progress,
    mode: Mode,
) -> Option<Value> {
    let mut event = String::new();
    let mut data = String::new();
    let mut id: Option<String> = None;
    for line in std::io::BufReader::new(r).lines() {
        let line = line.ok()?;
        if line.is_empty() {
            if event == "end" {
                return serde_json::from_str(&data).ok();
            }
            if !data.is_empty() {
                draw(&data, progress, mode);
            }
            if id.is_some() {
                *last = id.take();
            }
            event.clear();
            data.clear();
            continue;
        }
        if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        }
    }
    None
}

/// One event line, through the same output as a local run.
fn draw(data: &str, progress: &Progress, mode: Mode) {
    if mode == Mode::Events {
        println!("{data}");
        return;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return;
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let (Some(step), Some(state)) = (
        cutover_core::Step::parse(s("step")),
        cutover_core::State::parse(s("state")),
    ) else {
        return;
    };
    progress.event(&cutover_engine::Event {
        run: v.get("run").and_then(Value::as_i64).unwrap_or(0),
        seq: v.get("seq").and_then(Value::as_i64),
        app: s("app"),
        release: s("release"),
        host: v.get("host").and_then(Value::as_str),
        step,
        state,
        time: cutover_engine::Timestamp(0),
        detail: s("detail"),
        shown: None,
    });
}

fn start(c: &Client, path: &str, body: Value, mode: Mode) -> i32 {
    let run = match c.post(path, body) {
        Ok(v) => v
            .get("run")
            .and_then(|r| {
                r.as_str()
                    .map(String::from)
                    .or(r.as_i64().map(|n| n.to_string()))
            })
            .unwrap_or_default(),
        Err(code) => return code,
    };
    if mode == Mode::Human {
        eprintln!("run {run} started on {}", c.base);
    }
    let progress = Progress::new(mode);
    let end = c.follow(&run, &progress, mode);
    progress.finish();
    let end = match end {
        Ok(e) => e,
        Err(code) => return code,
    };
    let code = end
        .get("exit_code")
        .and_then(Value::as_i64)
        .map_or(exit::NEEDS_PERSON, |c| c as i32);
    let message = end
        .get("message")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| {
            format!(
                "run {run} ended {}",
                end.get("status").and_then(Value::as_str).unwrap_or("")
            )
        });
    match mode {
        Mode::Json => print_json(&end),
        Mode::Events => {
            let mut line = json!({ "event": "outcome" });
            if let (Some(o), Some(e)) = (line.as_object_mut(), end.as_object()) {
                o.extend(e.clone());
            }
            println!("{line}");
        }
        Mode::Human if code == exit::OK => eprintln!("{message}"),
        Mode::Human => eprintln!("error: {message}"),
    }
    code
}

pub(crate) fn deploy(
    common: &Common,
    through: &Through,
    artifact: Option<PathBuf>,
    git_ref: Option<String>,
    image: Option<String>,
    mode: Mode,
) -> i32 {
    if artifact.is_some() {
        eprintln!("error: --artifact cannot go through a server: it deploys what it builds (--ref REF) or pulls (--image TAG)");
        return exit::USAGE;
    }
    let body = match (git_ref, image) {
        (Some(r), None) => json!({ "ref": r }),
        (None, Some(i)) => json!({ "image": i }),
        _ => {
            eprintln!("error: with --server, say what to deploy: --ref REF or --image TAG");
            return exit::USAGE;
        }
    };
    match client(common, through) {
        Ok(c) => start(&c, &format!("/api/apps/{}/deploys", c.app), body, mode),
        Err(code) => code,
    }
}

pub(crate) fn rollback(common: &Common, through: &Through, to: Option<String>, mode: Mode) -> i32 {
    let body = match to {
        Some(t) => json!({ "to": t }),
        None => json!({}),
    };
    match client(common, through) {
        Ok(c) => start(&c, &format!("/api/apps/{}/rollback", c.app), body, mode),
        Err(code) => code,
    }
}

pub(crate) fn history(common: &Common, through: &Through, json: bool) -> i32 {
    let c = match client(common, through) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rows = match c.get(&format!("/api/apps/{}/releases?limit=500", c.app)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        print_json(&rows);
        return exit::OK;
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let table_rows: Vec<Vec<String>> = rows
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let live = r.get("live").and_then(Value::as_bool) == Some(true);
            vec![
                s(r, "id"),
                s(r, "status"),
                if live { "*".into() } else { String::new() },
                super::history::commit_cell(
                    r.get("commit").and_then(Value::as_str),
                    r.get("commit_subject").and_then(Value::as_str),
                ),
                s(r, "created_at"),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["RELEASE", "STATUS", "LIVE", "COMMIT", "CREATED"],
            &table_rows
        )
    );
    exit::OK
}

pub(crate) fn status(common: &Common, through: &Through, json: bool) -> i32 {
    let c = match client(common, through) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let st = match c.get(&format!("/api/apps/{}/status", c.app)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let drift = st
        .get("drift")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty());
    let code = if drift { exit::NEEDS_PERSON } else { exit::OK };
    if json {
        print_json(&st);
        return code;
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = st
        .get("hosts")
        .and_then(Value::as_array)
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|h| {
            vec![
                s(h, "host"),
                if h.get("reachable").and_then(Value::as_bool) == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(h, "release"),
                h.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["HOST", "REACHABLE", "RELEASE", "ERROR"], &rows)
    );
    println!("live (history): {}", s(&st, "live"));
    for d in st
        .get("drift")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!("drift: {}", d.as_str().unwrap_or(""));
    }
    code
}

/// `cutover preview deploy --server`: a preview job on the server, followed like a deploy.
pub(crate) fn preview_deploy(
    common: &Common,
    through: &Through,
    pr: u64,
    git_ref: Option<String>,
    image: Option<String>,
    mode: Mode,
) -> i32 {
    let body = match (git_ref, image) {
        (Some(r), None) => json!({ "pr": pr, "ref": r }),
        (None, Some(i)) => json!({ "pr": pr, "image": i }),
        _ => {
            eprintln!("error: what to deploy as the preview: pass --ref REF (the pull request's head) or --image TAG");
            return exit::USAGE;
        }
    };
    match client(common, through) {
        Ok(c) => start(&c, &format!("/api/apps/{}/previews", c.app), body, mode),
        Err(code) => code,
    }
}

/// `cutover preview list --server`.
pub(crate) fn preview_list(common: &Common, through: &Through, all: bool, json: bool) -> i32 {
    let c = match client(common, through) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.get(&format!("/api/apps/{}/previews?all={all}", c.app)) {
        Ok(rows) => {
            super::preview::print_rows(&c.app, rows.as_array().cloned().unwrap_or_default(), json);
            exit::OK
        }
        Err(code) => code,
    }
}

/// `cutover preview remove --server`: the server tears the preview down and answers what it
/// did on each host.
pub(crate) fn preview_remove(common: &Common, through: &Through, pr: u64, json: bool) -> i32 {
    let c = match client(common, through) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(
        c.http
            .delete(c.url(&format!("/api/apps/{}/previews/{pr}", c.app))),
    ) {
        Ok(v) => super::preview::print_removal(&c.app, pr, &v, json),
        Err(code) => code,
    }
}

//! `panel`: the web panel of `cutover serve`, timed the way a person meets it: from the
//! Rollback form's POST (the click, after its one confirmation) to the previous release
//! answering on every host, on 1 and 4 hosts; an app page with 10,000 releases in its history
//! (p50/p99 of the page and of a page deep in the history); the server's RSS idle and at its
//! peak during the rollbacks.

use crate::harness::{Payload, World};
use crate::report::{secs, spread, Section};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
each host count (1 and 4) gets a fresh lab and a `cutover serve` on loopback (the bench's \
cutover build) with an admin logged in through the login form. Payloads A and B are deployed \
with the CLI (untimed); then *click to previous release* is timed from the POST of the app \
page's Rollback form (with its CSRF token and the confirmation) until every host's nginx \
answers `GET /version` with A (polled every 10 ms); B is deployed again between repetitions \
(untimed). *RSS idle* is the server's resident set after the login, before any job; *RSS \
peak* is its high-water mark (VmHWM) after the rollbacks. *app page, 10,000 releases*: \
10,000 release rows are added to the 1-host world's history, then `GET /apps/site` (the \
newest 50 and the hosts' status, cached for 3 s) and `GET /apps/site?before=<id>` (a page \
in the middle) are each fetched 300 times in a row over fresh connections; p50/p99 of the \
time to the last byte. *event to SSE client*: in the 1-host world, a CLI deploy with \
`--events` on the server's data directory (the engine reports each event right after writing \
it, so the line on the CLI's stdout marks the write) while an SSE client follows the same run \
through the server (`/api/runs/{run}/events`); per event (matched by seq) the time from the \
CLI's line to the SSE event, both read by the bench, for the events written after the client \
connected; p50/p99/max.";

/// `cutover serve` on a free loopback port, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(world: &World) -> Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = world
        .cutover(&["serve", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cutover serve")?;
    let s = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("cutover serve did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

/// Status, headers (names lower-cased) and body.
type HttpAnswer = (u16, Vec<(String, String)>, String);

/// One HTTP/1.1 request over a fresh connection.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Result<HttpAnswer> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = form.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    if form.is_some() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok((status, headers, String::from_utf8_lossy(&out).into_owned()))
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn csrf(page: &str) -> Result<String> {
    let at = page
        .find("name=\"csrf\" value=\"")
        .ok_or_else(|| anyhow!("no CSRF field in the page"))?
        + 19;
    Ok(page[at..].split('"').next().unwrap_or("").to_string())
}

/// Adds the admin and logs in through the form; the session cookie.
fn log_in(world: &World, s: &Server) -> Result<String> {
    let mut add = world
        .cutover(&[
            "user",
            "add",
            "bench",
            "--role",
            "admin",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    add.stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(b"bench password\n")?;
    let out = add.wait_with_output()?;
    if !out.status.success() {
        bail!("user add: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (status, h, body) = http(
        s.addr,
        "POST",
        "/login",
        None,
        Some("user=bench&password=bench+password&next=/"),
    )?;
    let cookie = header(&h, "set-cookie")
        .filter(|_| status == 303)
        .ok_or_else(|| anyhow!("login refused ({status}): {body}"))?;
    Ok(cookie.split(';').next().unwrap_or("").to_string())
}

/// KiB of a /proc/PID/status field.
fn kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Clicks Rollback and times until every host serves `label`; waits for the run to end.
fn click_rollback(world: &World, s: &Server, cookie: &str, label: &str) -> Result<f64> {
    let (_, _, page) = http(s.addr, "GET", "/apps/site", Some(cookie), None)?;
    let form = format!("csrf={}&confirmed=1", csrf(&page)?);
    let t = Instant::now();
    let (status, h, body) = http(
        s.addr,
        "POST",
        "/apps/site/rollback",
        Some(cookie),
        Some(&form),
    )?;
    let run = header(&h, "location")
        .filter(|_| status == 303)
        .ok_or_else(|| anyhow!("the rollback was refused ({status}): {body}"))?
        .to_string();
    while !world.serves(label) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{label} was not served 120 s after the click");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, _, v) = http(s.addr, "GET", &format!("/api{run}"), Some(cookie), None)?;
        if !v.contains("\"status\":\"running\"") {
            if !v.contains("\"status\":\"succeeded\"") {
                bail!("the rollback did not succeed: {v}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the rollback did not end: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(took)
}

/// The time in ms from each event's line on a CLI deploy's `--events` stdout to the same event
/// (by seq) on an SSE client of the server following that run, for the events written after
/// the client connected.
fn sse_latency(world: &World, s: &Server, cookie: &str, p: &Payload) -> Result<Vec<f64>> {
    use std::collections::HashMap;
    let dir = p.dir.display().to_string();
    let mut child = world
        .cutover(&["deploy", "--events", "--artifact", &dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cutover deploy --events")?;
    let out = BufReader::new(child.stdout.take().context("the deploy's stdout")?);
    let (run_tx, run_rx) = std::sync::mpsc::channel::<i64>();
    let cli = std::thread::spawn(move || {
        let mut at: HashMap<i64, Instant> = HashMap::new();
        for line in out.lines().map_while(std::result::Result::ok) {
            let now = Instant::now();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] != "step" {
                continue;
            }
            if at.is_empty() {
                if let Some(run) = v["run"].as_i64() {
                    let _ = run_tx.send(run);
                }
            }
            if let Some(seq) = v["seq"].as_i64() {
                at.insert(seq, now);
            }
        }
        at
    });
    let run = run_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("the deploy printed no event"))?;
    let mut conn = TcpStream::connect(s.addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        conn,
        "GET /api/runs/{run}/events HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n",
        s.addr
    )?;
    let connected = Instant::now();
    let mut sse: HashMap<i64, Instant> = HashMap::new();
    for line in BufReader::new(conn).lines() {
        let line = line.context("reading the SSE stream")?;
        let now = Instant::now();
        if line.starts_with("event: end") {
            break;
        }
        if let Some(seq) = line
            .strip_prefix("id: ")
            .and_then(|v| v.trim().parse().ok())
        {
            sse.insert(seq, now);
        }
    }
    let status = child.wait()?;
    let cli = cli
        .join()
        .map_err(|_| anyhow!("the --events reader panicked"))?;
    if !status.success() {
        bail!("the deploy exited with {status}");
    }
    let mut ms: Vec<f64> = cli
        .iter()
        .filter(|(_, t)| **t > connected)
        .filter_map(|(seq, t)| sse.get(seq).map(|r| r.saturating_duration_since(*t)))
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    if ms.is_empty() {
        bail!("no event of run {run} was written after the SSE client connected");
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// p50 and p99 in ms of `n` GETs of `path`.
fn page_times(s: &Server, cookie: &str, path: &str, n: usize) -> Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (status, _, body) = http(s.addr, "GET", path, Some(cookie), None)?;
        if status != 200 {
            bail!("GET {path}: {status}: {body}");
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Ok((at(0.5), at(0.99)))
}

/// Adds 10,000 releases (copies of the newest, older ids) to the world's history; the id of
/// one in the middle.
fn add_history(world: &World) -> Result<String> {
    let db = rusqlite::Connection::open(world.lab.dir().join("controller/data-0/cutover.db"))?;
    let tx = db.unchecked_transaction()?;
    let mut middle = String::new();
    for i in 0..10_000 {
        let id = format!("20200101T{i:06}Z-{i:07x}");
        tx.execute(
            "INSERT INTO releases (id, app, status, bad, created_at, finished_at, artifact_sha256, commit_sha, source, snapshot, commit_subject) \
             SELECT ?1, app, status, bad, created_at, finished_at, artifact_sha256, commit_sha, source, snapshot, ?2 FROM releases WHERE app = 'site' ORDER BY id DESC LIMIT 1",
            rusqlite::params![id, format!("change {i}")],
        )?;
        if i == 5_000 {
            middle = id;
        }
    }
    tx.commit()?;
    Ok(middle)
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let (a, b) = ctx.payloads()?;
    let mut rows = Vec::new();
    let mut pages = None;
    let mut sse = None;
    for n in [1usize, 4] {
        let world = World::start(n, ctx)?;
        world.deploy(a)?;
        world.deploy(b)?;
        let s = serve(&world)?;
        let cookie = log_in(&world, &s)?;
        std::thread::sleep(Duration::from_millis(500));
        let idle = kib(s.child.id(), "VmRSS:");
        let mut clicks = Vec::new();
        for rep in 1..=ctx.reps {
            if rep > 1 {
                world.deploy(b)?;
            }
            let t = click_rollback(&world, &s, &cookie, &a.label)?;
            eprintln!(
                "[panel] {n} host(s) run {rep}/{}: click to A on every host {t:.3} s",
                ctx.reps
            );
            clicks.push(t);
        }
        let peak = kib(s.child.id(), "VmHWM:");
        if n == 1 {
            let ms = sse_latency(&world, &s, &cookie, b)?;
            let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
            eprintln!(
                "[panel] event to SSE client over {} events: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                ms.len(),
                at(0.5),
                at(0.99),
                ms[ms.len() - 1]
            );
            sse = Some((ms.len(), at(0.5), at(0.99), ms[ms.len() - 1]));
            let middle = add_history(&world)?;
            let first = page_times(&s, &cookie, "/apps/site", 300)?;
            let deep = page_times(&s, &cookie, &format!("/apps/site?before={middle}"), 300)?;
            eprintln!(
                "[panel] app page with 10,000 releases: p50/p99 {first:?} ms, deep {deep:?} ms"
            );
            pages = Some((first, deep));
        }
        rows.push((n, clicks, idle, peak));
    }
    let mut md = String::from(
        "| hosts | click to previous release on every host | server RSS idle | server RSS peak |\n| --- | --- | --- | --- |\n",
    );
    for (n, clicks, idle, peak) in &rows {
        let (med, min, max) = spread(clicks);
        md.push_str(&format!(
            "| {n} | {} s ({}–{}) | {} | {} |\n",
            secs(med),
            secs(min),
            secs(max),
            mib(*idle),
            mib(*peak)
        ));
    }
    if let Some(((p50, p99), (d50, d99))) = pages {
        md.push_str(&format!(
            "\nApp page with 10,000 releases: newest page p50 {p50:.1} ms, p99 {p99:.1} ms; a page in the middle (`?before=`) p50 {d50:.1} ms, p99 {d99:.1} ms.\n"
        ));
    }
    if let Some((n, p50, p99, max)) = sse {
        md.push_str(&format!(
            "\nEvent written by the engine to event received by an SSE client (over {n} events of a deploy): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms.\n"
        ));
    }
    let json = json!({
        "sse_ms": sse.map(|(n, a, b, c)| json!({"events": n, "p50": a, "p99": b, "max": c})),
        "hosts": rows.iter().map(|(n, clicks, idle, peak)| json!({
            "hosts": n, "click_to_previous_s": clicks, "rss_idle_kib": idle, "rss_peak_kib": peak,
        })).collect::<Vec<_>>(),
        "app_page_10000_ms": pages.map(|((a, b), (c, d))| json!({"p50": a, "p99": b, "deep_p50": c, "deep_p99": d})),
    });
    Ok(Section { markdown: md, json })
}

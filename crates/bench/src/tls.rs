//! `tls`: cutover's edge proxy terminating TLS, next to nginx and Caddy doing the same in
//! front of the same backend, all local processes on this machine's loopback. Per proxy:
//! HTTP/1.1 keep-alive (wrk), HTTP/2 (h2load), full TLS handshakes per second (wrk with
//! `Connection: close`), and the proxy's memory idle and under load.

use crate::machine::loadavg;
use crate::meter::Sample;
use crate::peers;
use crate::report::{self, spread, Paired, Section};
use crate::tls_switch::{self, Flip, Target};
use crate::Ctx;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
three TLS-terminating proxies run side by side as local processes on this machine's loopback, \
each in front of the same backend: Debian's nginx with one worker on 127.0.0.1 answering `/` \
with a 10-byte body, keeping connections open and logging nothing. *cutover* is `cutover \
proxy run --tls files --cert --key` (the binary built with the bench's profile) with one \
service deployed by `cutover proxy deploy --domain localhost`; *nginx* is Debian's nginx \
(`worker_processes auto`, `server_name localhost`, `listen ... ssl http2`, `proxy_pass` to an upstream with \
`keepalive 32`, `proxy_http_version 1.1`, and an access log as cutover's proxy keeps one by \
default: a line per request, written in batches, `access_log ... combined buffer=64k \
flush=1s`, where cutover writes its own twice a second); *Caddy* is Debian's `caddy run` \
with a JSON config (the same certificate loaded from files, automatic HTTPS off, one \
`reverse_proxy` route, Caddy's defaults otherwise, which keep no access log). All three serve the same self-signed \
ECDSA P-256 certificate for `localhost` made by the bench (rcgen) and negotiate TLS 1.3. \
There are three loads, each for 10 s (2 s with `--quick`), and in every run of the cell \
(`--reps`) the three proxies take each load in turn, back to back, the order of the proxies \
rotating from run to run: *HTTP/1.1* is `wrk -t2 -c8 \
--latency https://localhost:PORT/` (8 keep-alive connections, no pause), *HTTP/2* is `h2load -t2 -c8 -m1 -D` over \
ALPN h2 (8 connections, one stream in flight on each, so 8 requests in flight as with wrk), \
its p50/p99 computed by the bench from h2load's `--log-file` (one line per request with its \
duration), *handshakes/s* is `wrk -t2 -c8` with `Connection: close`, so every request is a \
new TCP connection and a full TLS handshake (wrk does not resume sessions): its requests/s \
is full handshakes per second, and its p99 is the latency of a request including its \
connection's handshake. Requests/s is the median (min–max) of the runs; p50 and p99 are the \
median of the runs' values; *errors* counts non-2xx answers, socket errors and failed \
requests of all runs. *cutover / nginx, run by run* divides cutover's requests/s and p99 by \
nginx's in the same run, a few seconds apart, and gives the median (min–max) of those ratios \
and in how many runs cutover was ahead: this machine's speed drifts by tens of percent within \
an hour, which moves the two medians above apart, and a ratio of neighbours far less; the \
goal's verdict reads these medians. The bench waits for an idle machine before each load and redoes a load \
(up to twice) during which other processes took over a quarter of the CPU. Everything, the \
load generators and the backend included, shares the machine's 2 cores, so these numbers \
are what the whole path sustains on 2 cores. Memory is `VmRSS` from `/proc/<pid>/status` \
(nginx: master and workers summed): *idle* before any load, *under load* the largest value \
read every 100 ms during that proxy's loads. *CPU per request* is the user + system time of \
the proxy's processes (nginx: master and workers) during its loads, read from \
`/proc/<pid>/stat`, divided by the requests those loads completed: a measure of the proxy's \
own work that other processes on the machine disturb far less than requests/s. \
*A core each* (not with `--quick`): the HTTP/1.1 and HTTP/2 loads once more, each proxy in \
turn with every thread of its processes pinned to CPU 0 and the load generator and the \
backend to CPU 1 (`taskset`), then back on every core: its requests/s is then what the proxy \
serves on one core of its own, where the loads above measure what the whole path sustains on \
two shared cores (a proxy that leaves more CPU to the load generator gains there). \
*Switches under HTTPS load* (same processes, after the loads above): a second backend (nginx, \
the same answer) is started, and each proxy is switched K times (10, 3 with `--quick`) \
alternately to one and the other backend while a steady HTTPS load runs against it over TLS \
1.3, with HTTP/2 and then with HTTP/1.1 keep-alive: 1 s of load, then each switch command run \
to its exit followed by 1 s of load (the code and rhythm of the `switch` scenario's HTTPS \
rows). The load is 8 h2load processes (`h2load -t1 -c1 -m1 --rps 50`, plus `--h1` for \
HTTP/1.1, asking 127.0.0.1 for `https://localhost:PORT/`): 8 connections, each with one \
request in flight and 50 requests a second. h2load (1.52) does not open a new connection \
when the server closes one during a timed run (a reload's GOAWAY, an HTTP/1.1 close): it \
stops that client and counts no failure. So the bench looks at each process every 5 ms (a \
socket among its open files, its log growing) and starts it again as soon as its connection \
is gone, as a browser would connect again: a proxy that closes its clients' connections on a \
switch keeps its load, and the rows of the three proxies compare like with like. A switch \
is, for *cutover*, `cutover proxy deploy web --target 127.0.0.1:P` (health gate every 50 \
ms, 2 healthy probes, then the pointer swap, then the old target drained, 2 s at most); for \
*nginx*, its config rewritten with the other backend and `SIGHUP` to its master (a reload: \
new workers start, old ones finish their requests and close their connections, HTTP/2 ones \
with a GOAWAY); for *Caddy*, a `PATCH` of the route's `upstreams` through its admin API \
(on 127.0.0.1), which returns once the new config runs (Caddy closes its clients' \
connections on a config change too). *requests* are the lines of h2load's `--log-file`s \
(one per request that ended), *failed* those without a 2xx status (errors, resets, \
non-2xx), *failed per switch* those over K; *longest gap* is the longest time between the \
ends of two consecutive successful responses, all connections together, or from the last \
one to the end of the load; *switch time* is the median (min–max) wall time of the switch \
command; *connections opened again* counts the processes the bench started again because \
the server closed their connection, and those whose connection did not come up within 3 s \
(never up). A switch command that fails is listed below the table (the proxy then stays on \
its backend until the next one). The zero-downtime check (the run fails if cutover had a \
failed request) covers cutover's two rows.";

/// Connections of every load.
const CONNECTIONS: usize = 8;
/// The name every proxy serves and the loads ask for (and send as SNI: wrk sends its URL's
/// host, so the name must resolve to 127.0.0.1 without touching /etc/hosts).
const DOMAIN: &str = "localhost";
const BODY: &str = "keepalive\n";
const NGINX: &str = "/usr/sbin/nginx";
const CADDY: &str = "/usr/bin/caddy";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Cutover,
    Nginx,
    Caddy,
}

const PROXIES: [Proxy; 3] = [Proxy::Cutover, Proxy::Nginx, Proxy::Caddy];

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Cutover => "cutover proxy",
            Proxy::Nginx => "nginx",
            Proxy::Caddy => "Caddy",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Proxy::Cutover => "cutover",
            Proxy::Nginx => "nginx",
            Proxy::Caddy => "caddy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    H1,
    H2,
    Handshake,
}

const KINDS: [Kind; 3] = [Kind::H1, Kind::H2, Kind::Handshake];

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::H1 => "http1.1-keepalive",
            Kind::H2 => "http2",
            Kind::Handshake => "full-handshakes",
        }
    }
}

/// What one load measured.
#[derive(Debug, Clone)]
struct Round {
    proxy: Proxy,
    kind: Kind,
    /// The run of the cell (0-based): the loads of one kind in one run are back to back.
    rep: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// Largest RSS of the proxy's processes read during the load, KiB.
    rss_kib: u64,
    /// CPU seconds (user + system) the proxy's processes used during the load.
    proxy_cpu_s: f64,
    sample: Sample,
}

/// A process the bench started, stopped by its exact pid when dropped (nginx's master stops
/// its workers; any left after 5 s are killed by their pids).
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (nginx's workers), read from `/proc`.
    fn pids(&self) -> Vec<u32> {
        let pid = self.pid();
        let mut pids = vec![pid];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                    pids.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} at start: {}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "{} does not accept connections on {addr} after 10 s: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pids = self.pids();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let rest: Vec<String> = pids
            .iter()
            .filter(|&&p| p != self.pid())
            .map(u32::to_string)
            .collect();
        if !rest.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&rest)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A loopback port free right now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `VmRSS` summed over processes, KiB (processes gone count 0).
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// CPU seconds (utime + stime, all threads) of processes, from `/proc/<pid>/stat`
/// (processes gone count 0).
fn cpu_s(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|text| {
            // The name may hold spaces and parentheses: fields start after the last ')'.
            let rest = &text[text.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // f[0] is field 3 (state); utime and stime are fields 14 and 15.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0 // USER_HZ
}

/// CPU per request of a cell's runs, µs: their proxy CPU summed over their requests summed.
fn cpu_per_request_us(rounds: &[&Round]) -> f64 {
    let requests: u64 = rounds.iter().map(|r| r.requests).sum();
    let cpu: f64 = rounds.iter().map(|r| r.proxy_cpu_s).sum();
    if requests == 0 {
        f64::NAN
    } else {
        cpu * 1e6 / requests as f64
    }
}

/// nginx serving [`BODY`] at every path on `127.0.0.1:port`, one worker, keep-alive.
fn backend_config(dir: &str, port: u16) -> String {
    format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{temps}
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 \"{body}\"; }}
    }}
}}
",
        temps = temp_paths(dir),
        body = BODY.escape_default()
    )
}

fn temp_paths(dir: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {dir}/tmp/{t};\n"))
        .collect()
}

/// nginx terminating TLS (HTTP/1.1 and HTTP/2 by ALPN) on `127.0.0.1:port` in front of the
/// backend, keeping upstream connections open.
fn nginx_tls_config(dir: &str, port: u16, backend: u16) -> String {
    format!(
        "daemon off;
master_process on;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log combined buffer=64k flush=1s;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{temps}
    upstream app {{ server 127.0.0.1:{backend}; keepalive 32; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name {DOMAIN};
        ssl_certificate {dir}/../cert.pem;
        ssl_certificate_key {dir}/../key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
",
        temps = temp_paths(dir)
    )
}

/// Caddy terminating TLS with the certificate from files, in front of the backend, its admin
/// API on `127.0.0.1:admin` (for the switches).
fn caddy_config(dir: &Path, port: u16, backend: u16, admin: u16) -> String {
    json!({
        "admin": { "listen": format!("127.0.0.1:{admin}") },
        "logging": { "logs": { "default": { "level": "WARN" } } },
        "apps": {
            "tls": { "certificates": { "load_files": [{
                "certificate": dir.join("cert.pem"),
                "key": dir.join("key.pem"),
            }] } },
            "http": { "servers": { "bench": {
                "listen": [format!("127.0.0.1:{port}")],
                "automatic_https": { "disable": true },
                "tls_connection_policies": [{}],
                "routes": [{
                    "handle": [{
                        "handler": "reverse_proxy",
                        "upstreams": [{ "dial": format!("127.0.0.1:{backend}") }],
                    }],
                }],
            } } },
        },
    })
    .to_string()
}

/// Runs `cmd` to its end, reading the RSS of `pids` every 100 ms meanwhile; its stdout and
/// the largest RSS read.
fn run_sampling(cmd: &mut Command, pids: &[u32]) -> Result<(String, u64)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        peak = peak.max(rss_kib(pids));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    exited_ok(&format!("{cmd:?}"), &out)?;
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), peak))
}

/// A wrk duration like `635.91us`, `1.02ms` or `2.00s`, in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, unit) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * unit)
}

/// What wrk printed: requests/s, p50 and p99 (ms), requests, errors (non-2xx/3xx answers
/// and socket errors).
#[derive(Debug, PartialEq)]
struct WrkOut {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

fn parse_wrk(out: &str) -> Result<WrkOut> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0u64;
    for l in out.lines().map(str::trim) {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            [n, "requests", "in", ..] => requests = n.parse::<u64>().ok(),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    match (rps, p50, p99, requests) {
        (Some(rps), Some(p50_ms), Some(p99_ms), Some(requests)) => Ok(WrkOut {
            rps,
            p50_ms,
            p99_ms,
            requests,
            errors,
        }),
        _ => bail!("cannot read wrk's output: {out}"),
    }
}

/// h2load's summary: requests/s, and requests done and not succeeded.
fn parse_h2load(out: &str) -> Result<(f64, u64, u64)> {
    let mut rps = None;
    let mut counts = None;
    for l in out.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("finished in ") {
            // "finished in 2.00s, 12345.00 req/s, 1.23MB/s"
            rps = rest
                .split(", ")
                .nth(1)
                .and_then(|s| s.strip_suffix(" req/s"))
                .and_then(|s| s.parse::<f64>().ok());
        }
        if let Some(rest) = l.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
            let num = |what: &str| {
                rest.split(", ")
                    .find_map(|p| p.strip_suffix(what))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            };
            if let (Some(done), Some(ok)) = (num(" done"), num(" succeeded")) {
                counts = Some((done, done - ok.min(done)));
            }
        }
    }
    match (rps, counts) {
        (Some(r), Some((done, failed))) => Ok((r, done, failed)),
        _ => bail!("cannot read h2load's output: {out}"),
    }
}

/// Durations (ms) of the 2xx requests in an h2load `--log-file`, sorted, and how many lines
/// had another status.
fn parse_h2load_log(text: &str) -> (Vec<f64>, u64) {
    let mut ms = Vec::new();
    let mut bad = 0;
    for l in text.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        match (
            f.get(1).and_then(|s| s.trim().parse::<u16>().ok()),
            f.get(2).and_then(|s| s.trim().parse::<f64>().ok()),
        ) {
            (Some(status), Some(us)) if (200..300).contains(&status) => ms.push(us / 1000.0),
            _ => bad += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    (ms, bad)
}

/// Nearest-rank percentile of sorted values (NaN for none).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One load of `kind` on the proxy at `tls_port` for `secs`; `core`: the CPU the load
/// generator is pinned to (see [`Pin`]).
#[allow(clippy::too_many_arguments)]
fn load(
    ctx: &Ctx,
    work: &Path,
    proxy: Proxy,
    pids: &[u32],
    kind: Kind,
    rep: usize,
    tls_port: u16,
    secs: u64,
    core: Option<usize>,
) -> Result<Round> {
    let url = format!("https://{DOMAIN}:{tls_port}/");
    let (r, sample) = ctx.meter.time(|| -> Result<Round> {
        let cpu_before = cpu_s(pids);
        let (rps, p50_ms, p99_ms, requests, errors, rss) = match kind {
            Kind::H1 | Kind::Handshake => {
                let mut cmd = tool("wrk", core);
                cmd.args(["-t2", &format!("-c{CONNECTIONS}")])
                    .arg(format!("-d{secs}s"))
                    .arg("--latency");
                if kind == Kind::Handshake {
                    cmd.args(["-H", "Connection: close"]);
                }
                cmd.arg(&url);
                let (out, rss) = run_sampling(&mut cmd, pids)?;
                let w = parse_wrk(&out)?;
                (w.rps, w.p50_ms, w.p99_ms, w.requests, w.errors, rss)
            }
            Kind::H2 => {
                let log = work.join(format!("h2load-{}.log", proxy.key()));
                let _ = std::fs::remove_file(&log);
                let mut cmd = tool("h2load", core);
                cmd.args(["-t2", &format!("-c{CONNECTIONS}"), "-m1"])
                    .arg(format!("-D{secs}"))
                    .arg(format!("--connect-to=127.0.0.1:{tls_port}"))
                    .arg(format!("--log-file={}", log.display()))
                    .arg(format!("https://{DOMAIN}:{tls_port}/"));
                let (out, rss) = run_sampling(&mut cmd, pids)?;
                let (rps, done, failed) = parse_h2load(&out)?;
                let text = std::fs::read_to_string(&log)
                    .with_context(|| format!("reading {}", log.display()))?;
                let (ms, bad) = parse_h2load_log(&text);
                if !out
                    .to_ascii_lowercase()
                    .contains("application protocol: h2")
                {
                    bail!("h2load did not negotiate h2 with {}: {out}", proxy.name());
                }
                (
                    rps,
                    percentile(&ms, 0.5),
                    percentile(&ms, 0.99),
                    done,
                    failed.max(bad),
                    rss,
                )
            }
        };
        Ok(Round {
            proxy,
            kind,
            rep,
            rps,
            p50_ms,
            p99_ms,
            requests,
            errors,
            rss_kib: rss,
            proxy_cpu_s: cpu_s(pids) - cpu_before,
            sample: Sample::default(),
        })
    });
    let mut r = r?;
    r.sample = sample;
    Ok(r)
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let secs = if ctx.quick { 2 } else { 10 };
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = Instant::now();
    let work = make_work(ctx)?;
    let mut lab = Lab::start(ctx, &work)?;
    // Settle, then read the idle proxies' memory.
    std::thread::sleep(Duration::from_secs(1));
    let idle: Vec<(Proxy, u64)> = PROXIES
        .iter()
        .map(|&p| (p, rss_kib(&lab.pids(p))))
        .collect();
    eprintln!(
        "[tls] backend 127.0.0.1:{}; cutover pid {} on :{}, nginx pids {:?} on :{}, caddy pid \
         {} on :{}; {secs} s per load",
        lab.backends[0],
        lab.cutover.pid(),
        lab.port(Proxy::Cutover),
        lab.nginx.pids(),
        lab.port(Proxy::Nginx),
        lab.caddy.pid(),
        lab.port(Proxy::Caddy)
    );
    let (rounds, mut discarded) = loads(ctx, &work, &lab, secs, &KINDS, None)?;
    // A core each (not in a quick run, nor on one core).
    let pinned = if ctx.quick || ctx.machine.cores < 2 {
        Vec::new()
    } else {
        let pin = Pin {
            proxy_core: 0,
            others_core: 1,
            all: format!("0-{}", ctx.machine.cores - 1),
        };
        let (kept, redone) = loads(ctx, &work, &lab, secs, &[Kind::H1, Kind::H2], Some(&pin))?;
        discarded.extend(redone);
        kept
    };
    let (switch_md, switch_json) = switches(ctx, &work, &lab)?;
    lab.check_running()?;
    let load_after = loadavg();
    drop(lab);
    let done = Measured {
        secs,
        rounds,
        pinned,
        discarded,
        idle,
        load_before,
        load_after,
        switch_json,
    };
    let mut md = tables(ctx, &done, clock.elapsed());
    md.push_str(&switch_md);
    Ok(Section {
        markdown: md,
        json: section_json(ctx, &done, started),
    })
}

/// The scenario's work directory, made afresh, with the certificate every proxy serves.
fn make_work(ctx: &Ctx) -> Result<PathBuf> {
    let work = ctx.work.join("tls");
    for d in [
        "backend/tmp",
        "backend-b/tmp",
        "nginx/tmp",
        "caddy",
        "cutover",
    ] {
        std::fs::create_dir_all(work.join(d))?;
    }
    let work = work.canonicalize()?;
    tls_switch::write_test_cert(&work, DOMAIN)?;
    Ok(work)
}

/// What the scenario measured, for its tables and its JSON.
struct Measured {
    /// Seconds per load.
    secs: u64,
    rounds: Vec<Round>,
    /// The loads with the proxy on a core of its own ([`Pin`]).
    pinned: Vec<Round>,
    /// Loads redone because other processes took over a quarter of the CPU.
    discarded: Vec<Round>,
    /// Each proxy's RSS before any load, KiB.
    idle: Vec<(Proxy, u64)>,
    load_before: String,
    load_after: String,
    switch_json: Value,
}

/// The scenario's processes and their ports. Dropped (stopped) in the order of the fields:
/// the proxies first, then the backends.
struct Lab {
    caddy: Proc,
    nginx: Proc,
    cutover: Proc,
    /// The two backends, held to be stopped when the lab is dropped.
    backend_procs: [Proc; 2],
    /// The backends' ports: the one every proxy serves at first, and the second one (for the
    /// switches at the end).
    backends: [u16; 2],
    /// The proxies' TLS ports, in the order of [`PROXIES`].
    ports: [u16; 3],
    caddy_admin: u16,
}

impl Lab {
    /// Starts the two backends, then cutover's proxy, nginx and Caddy in front of the first.
    fn start(ctx: &Ctx, work: &Path) -> Result<Lab> {
        let (backend, backend_port) = start_backend(work, "backend", "the backend (nginx)")?;
        let (backend_b, backend_b_port) =
            start_backend(work, "backend-b", "the second backend (nginx)")?;
        let (cutover, cutover_port) = start_cutover(ctx, work, backend_port)?;
        let (nginx, nginx_port) = start_nginx(work, backend_port)?;
        let (caddy, caddy_port, caddy_admin) = start_caddy(work, backend_port)?;
        Ok(Lab {
            caddy,
            nginx,
            cutover,
            backend_procs: [backend, backend_b],
            backends: [backend_port, backend_b_port],
            ports: [cutover_port, nginx_port, caddy_port],
            caddy_admin,
        })
    }

    fn proc(&self, p: Proxy) -> &Proc {
        match p {
            Proxy::Cutover => &self.cutover,
            Proxy::Nginx => &self.nginx,
            Proxy::Caddy => &self.caddy,
        }
    }

    fn port(&self, p: Proxy) -> u16 {
        let [cutover, nginx, caddy] = self.ports;
        match p {
            Proxy::Cutover => cutover,
            Proxy::Nginx => nginx,
            Proxy::Caddy => caddy,
        }
    }

    fn pids(&self, p: Proxy) -> Vec<u32> {
        self.proc(p).pids()
    }

    /// The processes of the backend every proxy serves during the loads.
    fn backend_pids(&self) -> Vec<u32> {
        self.backend_procs[0].pids()
    }

    /// Fails if cutover's proxy or Caddy exited (nginx's master stays across its reloads).
    fn check_running(&mut self) -> Result<()> {
        for (name, p) in [
            ("cutover proxy run", &mut self.cutover),
            ("caddy", &mut self.caddy),
        ] {
            if let Some(s) = p.child.try_wait()? {
                bail!("{name} exited during the scenario ({s}): {}", p.log_tail());
            }
        }
        Ok(())
    }
}

/// An nginx backend ([`backend_config`]) in `work/dir` on a free port, listening.
fn start_backend(work: &Path, dir: &str, name: &'static str) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let d = work.join(dir);
    std::fs::write(
        d.join("nginx.conf"),
        backend_config(&d.display().to_string(), port),
    )?;
    let mut p = Proc::spawn(
        name,
        Command::new(NGINX)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log")),
        d.join("output.log"),
    )?;
    p.wait_listening(loopback(port))?;
    Ok((p, port))
}

/// cutover's proxy with the certificate from files and one service on [`DOMAIN`] in front of
/// `backend`; its TLS port.
fn start_cutover(ctx: &Ctx, work: &Path, backend: u16) -> Result<(Proc, u16)> {
    let plain_port = free_port()?;
    let port = free_port()?;
    let cdir = work.join("cutover");
    let mut p = Proc::spawn(
        "cutover proxy run",
        Command::new(&ctx.cutover)
            .args(["proxy", "run", "--listen"])
            .arg(loopback(plain_port).to_string())
            .arg("--listen-tls")
            .arg(loopback(port).to_string())
            .arg("--dir")
            .arg(&cdir)
            .args(["--tls", "files", "--cert"])
            .arg(work.join("cert.pem"))
            .arg("--key")
            .arg(work.join("key.pem")),
        cdir.join("output.log"),
    )?;
    p.wait_listening(loopback(port))?;
    run_ok(
        Command::new(&ctx.cutover)
            .args(["proxy", "deploy", "web", "--target"])
            .arg(loopback(backend).to_string())
            .args(["--health", "/", "--domain", DOMAIN, "--dir"])
            .arg(&cdir),
        "cutover proxy deploy",
    )?;
    Ok((p, port))
}

/// nginx terminating TLS ([`nginx_tls_config`]) in front of `backend`; its port.
fn start_nginx(work: &Path, backend: u16) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let d = work.join("nginx");
    std::fs::write(
        d.join("nginx.conf"),
        nginx_tls_config(&d.display().to_string(), port, backend),
    )?;
    let mut p = Proc::spawn(
        "nginx",
        Command::new(NGINX)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log")),
        d.join("output.log"),
    )?;
    p.wait_listening(loopback(port))?;
    Ok((p, port))
}

/// Caddy terminating TLS ([`caddy_config`]) in front of `backend`; its port and its admin
/// API's.
fn start_caddy(work: &Path, backend: u16) -> Result<(Proc, u16, u16)> {
    let port = free_port()?;
    let admin = free_port()?;
    let cd = work.join("caddy");
    std::fs::write(
        cd.join("caddy.json"),
        caddy_config(work, port, backend, admin),
    )?;
    let mut p = Proc::spawn(
        "caddy",
        Command::new(CADDY)
            .arg("run")
            .arg("--config")
            .arg(cd.join("caddy.json"))
            .env("HOME", &cd)
            .env("XDG_DATA_HOME", cd.join("data"))
            .env("XDG_CONFIG_HOME", cd.join("config")),
        cd.join("output.log"),
    )?;
    p.wait_listening(loopback(port))?;
    Ok((p, port, admin))
}

/// Runs `cmd` to its end; fails, with its output, if it does not exit 0.
fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    exited_ok(what, &out)
}

/// An error with the output of `what` unless it exited 0.
fn exited_ok(what: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Every proxy's loads of `kinds`, `ctx.reps` times; the loads kept and those redone. In each
/// run, the three proxies take each load in turn, back to back (the order of the proxies
/// rotating from run to run), so that a proxy's load and nginx's of the same kind are seconds
/// apart, not a proxy's whole turn: the machine's speed drifts by tens of percent within an
/// hour here, and a ratio of neighbours is what that drift disturbs least. With `pin`, each
/// proxy runs on a core of its own during its loads.
fn loads(
    ctx: &Ctx,
    work: &Path,
    lab: &Lab,
    secs: u64,
    kinds: &[Kind],
    pin: Option<&Pin>,
) -> Result<(Vec<Round>, Vec<Round>)> {
    let mut rounds: Vec<Round> = Vec::new();
    let mut discarded: Vec<Round> = Vec::new();
    let label = if pin.is_some() { " (a core each)" } else { "" };
    for rep in 0..ctx.reps {
        for &kind in kinds {
            for j in 0..PROXIES.len() {
                let proxy = PROXIES[(rep + j) % PROXIES.len()];
                if let Some(pin) = pin {
                    pin_to(&lab.pids(proxy), &pin.proxy_core.to_string())?;
                    pin_to(&lab.backend_pids(), &pin.others_core.to_string())?;
                }
                loop {
                    let r = load(
                        ctx,
                        work,
                        proxy,
                        &lab.pids(proxy),
                        kind,
                        rep,
                        lab.port(proxy),
                        secs,
                        pin.map(|p| p.others_core),
                    )?;
                    eprintln!(
                        "[tls] run {}/{} {} {}{label}: {:.0} requests/s, p50 {:.2} ms, p99 \
                         {:.2} ms, {} errors, RSS {} KiB; other processes {:.1} CPU-s",
                        rep + 1,
                        ctx.reps,
                        proxy.name(),
                        kind.key(),
                        r.rps,
                        r.p50_ms,
                        r.p99_ms,
                        r.errors,
                        r.rss_kib,
                        r.sample.foreign_cpu_s
                    );
                    let redone = discarded
                        .iter()
                        .filter(|d| d.proxy == proxy && d.kind == kind)
                        .count();
                    if r.sample.disturbed(ctx.machine.cores) && redone < ctx.max_redos() {
                        eprintln!(
                            "[tls] other processes took over a quarter of the CPU: doing it again"
                        );
                        discarded.push(r);
                        continue;
                    }
                    rounds.push(r);
                    break;
                }
                if let Some(pin) = pin {
                    pin_to(&lab.pids(proxy), &pin.all)?;
                    pin_to(&lab.backend_pids(), &pin.all)?;
                }
            }
        }
    }
    Ok((rounds, discarded))
}

/// Loads with the proxy on a core of its own: its processes (every thread) pinned to
/// `proxy_core`, the load generator and the backend to `others_core`, and all of them back on
/// every core (`all`) after.
struct Pin {
    proxy_core: usize,
    others_core: usize,
    all: String,
}

/// Pins every thread of `pids` to `cpus` (`taskset -a -p -c`).
fn pin_to(pids: &[u32], cpus: &str) -> Result<()> {
    for pid in pids {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .output()
            .context("taskset (util-linux)")?;
        if !out.status.success() {
            bail!(
                "taskset -a -p -c {cpus} {pid}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The command `name`, run on CPU `core` (`taskset -c`) if one is given.
fn tool(name: &str, core: Option<usize>) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), name]);
            cmd
        }
        None => Command::new(name),
    }
}

/// The scenario's JSON, with the zero-downtime gate's map.
fn section_json(ctx: &Ctx, m: &Measured, started: String) -> Value {
    let rest = json!({
        "reps": ctx.reps,
        "load": { "connections": CONNECTIONS, "duration_s": m.secs, "h2_streams_per_connection": 1 },
        "idle_rss_kib": m.idle.iter().map(|(p, k)| (p.key().to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
        "runs": m.rounds.iter().map(round_json).collect::<Vec<_>>(),
        "runs_a_core_each": m.pinned.iter().map(round_json).collect::<Vec<_>>(),
        "discarded": m.discarded.iter().map(round_json).collect::<Vec<_>>(),
        "switches": m.switch_json,
        // The zero-downtime gate: a failed request while cutover switches fails the run.
        "cutover_failed": m.switch_json
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["proxy"] == Proxy::Cutover.key())
            .map(|r| (format!("https switch, {}", r["client"].as_str().unwrap_or("?")), r["failed"].clone()))
            .collect::<serde_json::Map<_, _>>(),
    });
    report::scenario_json(ctx, "tls", &started, &m.load_before, &m.load_after, rest)
}

/// The scenario's tables (throughput and latency, memory, CPU per request), the goal's verdict
/// per row and how much other work ran: everything but the switch table.
fn tables(ctx: &Ctx, m: &Measured, took: Duration) -> String {
    let mut md = report::measured_line(ctx, &m.load_before, &m.load_after, took);
    md.push_str("\n\n");
    md.push_str(&throughput_table(&m.rounds));
    md.push_str(&format!(
        "\nPeers: {}. Memory of each proxy (nginx: master and workers together):\n\n",
        peers::versions_line(&ctx.machine)
    ));
    md.push_str(&memory_table(&m.idle, &m.rounds));
    md.push_str(
        "\nCPU time of each proxy per request (user + system of its processes during the \
         loads, from `/proc/<pid>/stat` in 10 ms ticks, over the requests of all runs; \
         steadier than requests/s on a busy machine):\n\n",
    );
    md.push_str(&cpu_table(&m.rounds));
    md.push_str(&goal_line(&m.rounds, &KINDS, ""));
    if !m.pinned.is_empty() {
        md.push_str(
            "\nA core each: the same loads (HTTP/1.1 and HTTP/2) with the proxy's processes \
             pinned to CPU 0 and the load generator and the backend to CPU 1 (`taskset`), so \
             that requests/s is what the proxy serves on one core of its own:\n\n",
        );
        md.push_str(&pinned_table(&m.pinned));
        md.push_str(&goal_line(
            &m.pinned,
            &[Kind::H1, Kind::H2],
            ", a core each",
        ));
    }
    let all: Vec<Round> = m.rounds.iter().chain(&m.pinned).cloned().collect();
    md.push_str(&foreign_line(ctx, &all, m.discarded.len()));
    md
}

/// Requests/s, p99 and CPU per request per proxy, HTTP/1.1 and HTTP/2, a core each.
fn pinned_table(rounds: &[Round]) -> String {
    let mut rows = Vec::new();
    for p in PROXIES {
        let mut row = vec![p.name().to_string()];
        for k in [Kind::H1, Kind::H2] {
            let rs = cell_of(rounds, p, k);
            row.push(rps_cell(&rs));
            row.push(or_dash(median_of(&rs, |r| r.p99_ms), |v| {
                format!("{v:.2} ms")
            }));
            row.push(or_dash(cpu_per_request_us(&rs), |v| format!("{v:.1} µs")));
        }
        rows.push(row);
    }
    report::table(
        &[
            "proxy (TLS 1.3, a core each)",
            "HTTP/1.1 requests/s",
            "p99",
            "CPU per request",
            "HTTP/2 requests/s",
            "p99",
            "CPU per request",
        ],
        &rows,
    )
}

/// The median requests/s of `rs`, with their range when there are several.
fn rps_cell(rs: &[&Round]) -> String {
    let (m, lo, hi) = spread(&rs.iter().map(|r| r.rps).collect::<Vec<_>>());
    if rs.len() > 1 {
        format!("{m:.0} ({lo:.0}–{hi:.0})")
    } else {
        format!("{m:.0}")
    }
}

/// `v` written by `f`, or "–" for NaN (no value).
fn or_dash(v: f64, f: impl Fn(f64) -> String) -> String {
    if v.is_nan() {
        "–".to_string()
    } else {
        f(v)
    }
}

/// Requests/s, p50 and p99 per proxy and load, and the errors of all its loads.
fn throughput_table(rounds: &[Round]) -> String {
    let ms_cell = |v: f64| or_dash(v, |v| format!("{v:.2} ms"));
    let mut rows = Vec::new();
    for p in PROXIES {
        let mut row = vec![p.name().to_string()];
        for k in KINDS {
            let rs = cell_of(rounds, p, k);
            row.push(rps_cell(&rs));
            if k != Kind::Handshake {
                row.push(ms_cell(median_of(&rs, |r| r.p50_ms)));
            }
            row.push(ms_cell(median_of(&rs, |r| r.p99_ms)));
        }
        let errors: u64 = rounds
            .iter()
            .filter(|r| r.proxy == p)
            .map(|r| r.errors)
            .sum();
        row.push(errors.to_string());
        rows.push(row);
    }
    report::table(
        &[
            "proxy (TLS 1.3)",
            "HTTP/1.1 requests/s",
            "p50",
            "p99",
            "HTTP/2 requests/s",
            "p50",
            "p99",
            "full handshakes/s",
            "p99 (with handshake)",
            "errors",
        ],
        &rows,
    )
}

/// Each proxy's RSS idle and the largest read under its loads.
fn memory_table(idle: &[(Proxy, u64)], rounds: &[Round]) -> String {
    let rows: Vec<Vec<String>> = idle
        .iter()
        .map(|&(p, kib)| {
            let under = rounds
                .iter()
                .filter(|r| r.proxy == p)
                .map(|r| r.rss_kib)
                .max()
                .unwrap_or(0);
            vec![p.name().to_string(), mib_kib(kib), mib_kib(under)]
        })
        .collect();
    report::table(
        &["proxy", "RSS idle", "RSS under load (largest read)"],
        &rows,
    )
}

/// Each proxy's CPU per request, per load.
fn cpu_table(rounds: &[Round]) -> String {
    let rows: Vec<Vec<String>> = PROXIES
        .iter()
        .map(|&p| {
            let mut row = vec![p.name().to_string()];
            row.extend(KINDS.iter().map(|&k| {
                or_dash(cpu_per_request_us(&cell_of(rounds, p, k)), |v| {
                    format!("{v:.1} µs")
                })
            }));
            row
        })
        .collect();
    report::table(
        &[
            "proxy",
            "HTTP/1.1 keep-alive",
            "HTTP/2",
            "full handshake + request",
        ],
        &rows,
    )
}

/// How much of the machine's CPU other processes used during the loads, and how many loads
/// were redone for it.
fn foreign_line(ctx: &Ctx, rounds: &[Round], redone: usize) -> String {
    let cores = ctx.machine.cores.max(1) as f64;
    let (foreign, wall) = rounds.iter().fold((0.0, 0.0), |(f, w), r| {
        (f + r.sample.foreign_cpu_s, w + r.sample.secs)
    });
    format!(
        "\nDuring the loads, processes outside the bench used {:.0}% of the machine's CPU time; \
         loads redone because other processes took over a quarter of the CPU: {redone}.\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
    )
}

/// The runs of proxy `p` with load `k`.
fn cell_of(rounds: &[Round], p: Proxy, k: Kind) -> Vec<&Round> {
    rounds
        .iter()
        .filter(|r| r.proxy == p && r.kind == k)
        .collect()
}

/// The median of `f` over `rs`.
fn median_of(rs: &[&Round], f: fn(&Round) -> f64) -> f64 {
    spread(&rs.iter().map(|r| f(r)).collect::<Vec<_>>()).0
}

/// cutover's requests/s and p99 over nginx's, run by run: one pair per run in which both
/// took load `k` (seconds apart, see [`loads`]).
fn pairs(rounds: &[Round], k: Kind) -> Paired {
    Paired(
        cell_of(rounds, Proxy::Cutover, k)
            .into_iter()
            .filter_map(|c| {
                let n = rounds
                    .iter()
                    .find(|n| n.proxy == Proxy::Nginx && n.kind == k && n.rep == c.rep)?;
                Some((c.rps / n.rps.max(1e-9), c.p99_ms / n.p99_ms.max(1e-9)))
            })
            .collect(),
    )
}

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::H1 => "HTTP/1.1",
        Kind::H2 => "HTTP/2",
        Kind::Handshake => "full handshakes",
    }
}

/// cutover against nginx run by run, per load: the ratios of neighbouring loads and in how
/// many runs cutover was ahead.
fn pairs_table(rounds: &[Round], kinds: &[Kind], label: &str) -> String {
    let rows: Vec<Vec<String>> = kinds
        .iter()
        .map(|&k| pairs(rounds, k).row(kind_label(k)))
        .collect();
    report::table(
        &Paired::header(&format!("cutover / nginx, run by run{label}")),
        &rows,
    )
}

/// The goal, per row: at least nginx's throughput and no worse p99, read from the
/// medians of the run-by-run ratios (see [`pairs`]).
fn goal_line(rounds: &[Round], kinds: &[Kind], label: &str) -> String {
    let mut verdicts = Vec::new();
    for &k in kinds {
        let (c, n) = (
            cell_of(rounds, Proxy::Cutover, k),
            cell_of(rounds, Proxy::Nginx, k),
        );
        let ps = pairs(rounds, k);
        let (rps, p99) = ps.medians();
        verdicts.push(format!(
            "{}: {} ({:.0}% of nginx's requests/s and {:.0}% of its p99, medians of {} runs \
             side by side; CPU per request {:.1} vs {:.1} µs)",
            kind_label(k),
            if ps.met() { "met" } else { "not met" },
            100.0 * rps,
            100.0 * p99,
            ps.0.len(),
            cpu_per_request_us(&c),
            cpu_per_request_us(&n)
        ));
    }
    format!(
        "\n{}\nGoal (issue 12: at least nginx's throughput and no worse p99) in this run{label}: \
         {}.\n",
        pairs_table(rounds, kinds, label),
        verdicts.join("; ")
    )
}

/// Requests per second on each connection of the switch load: the pace of the `switch`
/// scenario's HTTPS rows.
const SWITCH_RATE: u32 = 50;

/// The switch table (see [`tls_switch`]): cutover, nginx and Caddy switched between the two
/// backends under HTTP/2 and HTTP/1.1 load.
fn switches(ctx: &Ctx, work: &Path, lab: &Lab) -> Result<(String, Value)> {
    let cdir = work.join("cutover");
    let ndir = work.join("nginx").display().to_string();
    let nginx_port = lab.port(Proxy::Nginx);
    let nginx_master = lab.nginx.pid().to_string();
    let upstreams = format!(
        "http://127.0.0.1:{}/config/apps/http/servers/bench/routes/0/handle/0/upstreams",
        lab.caddy_admin
    );
    let flip = |p: Proxy, switch| Flip {
        name: p.name(),
        key: p.key(),
        target: Target {
            addr: loopback(lab.port(p)),
            name: DOMAIN,
        },
        switch,
    };
    let flips = [
        flip(
            Proxy::Cutover,
            Box::new(|to| {
                run_ok(
                    Command::new(&ctx.cutover)
                        .args(["proxy", "deploy", "web", "--target"])
                        .arg(loopback(to).to_string())
                        .args(["--health", "/", "--domain", DOMAIN, "--interval", "50ms"])
                        .args(["--drain", "2s", "--dir"])
                        .arg(&cdir),
                    "cutover proxy deploy",
                )
            }),
        ),
        flip(
            Proxy::Nginx,
            Box::new(|to| {
                std::fs::write(
                    work.join("nginx/nginx.conf"),
                    nginx_tls_config(&ndir, nginx_port, to),
                )?;
                run_ok(
                    Command::new("kill").args(["-HUP", &nginx_master]),
                    "nginx reload",
                )
            }),
        ),
        flip(
            Proxy::Caddy,
            Box::new(|to| {
                run_ok(
                    Command::new("curl")
                        .args(["-sS", "--fail-with-body", "-X", "PATCH"])
                        .args(["-H", "Content-Type: application/json", "-d"])
                        .arg(format!("[{{\"dial\":\"127.0.0.1:{to}\"}}]"))
                        .arg(&upstreams),
                    "Caddy's admin API",
                )
            }),
        ),
    ];
    let k = if ctx.quick { 3 } else { 10 };
    tls_switch::measure(&flips, k, lab.backends, SWITCH_RATE, work)
}

fn mib_kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

fn round_json(r: &Round) -> Value {
    json!({
        "proxy": r.proxy.key(),
        "load": r.kind.key(),
        "requests_per_s": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "requests": r.requests,
        "errors": r.errors,
        "rss_under_load_kib": r.rss_kib,
        "proxy_cpu_s": r.proxy_cpu_s,
        "run": r.sample.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 2s test @ https://127.0.0.1:1/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   640.00us  100.00us   2.00ms   90.00%
  Latency Distribution
     50%  635.91us
     75%  712.85us
     90%  800.44us
     99%    1.02ms
  24000 requests in 2.00s, 3.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  12000.50
Transfer/sec:      1.50MB
";
        assert_eq!(
            parse_wrk(out).unwrap(),
            WrkOut {
                rps: 12000.5,
                p50_ms: 0.63591,
                p99_ms: 1.02,
                requests: 24000,
                errors: 6
            }
        );
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn h2load_output_and_log_are_read() {
        let out = "finished in 2.00s, 9000.50 req/s, 1.00MB/s
requests: 18001 total, 18009 started, 18001 done, 17999 succeeded, 2 failed, 2 errored, 0 timeout
";
        assert_eq!(parse_h2load(out).unwrap(), (9000.5, 18001, 2));
        let (ms, bad) = parse_h2load_log("1\t200\t1500\n2\t200\t500\n3\t502\t10\n");
        assert_eq!((ms, bad), (vec![0.5, 1.5], 1));
        assert_eq!(percentile(&[0.5, 1.5], 0.5), 0.5);
        assert_eq!(percentile(&[0.5, 1.5], 0.99), 1.5);
    }

    /// The CPU read from `/proc` grows with this process's own work, and a cell's CPU per
    /// request is its CPU over its requests.
    #[test]
    fn cpu_per_request_is_read_from_proc() {
        let me = [std::process::id()];
        let before = cpu_s(&me);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut x = 0u64;
        while cpu_s(&me) < before + 0.05 {
            assert!(Instant::now() < deadline, "no CPU time read from /proc");
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert_eq!(cpu_s(&[u32::MAX]), 0.0);
        let round = |requests, proxy_cpu_s| Round {
            proxy: Proxy::Cutover,
            rep: 0,
            kind: Kind::H2,
            rps: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            requests,
            errors: 0,
            rss_kib: 0,
            proxy_cpu_s,
            sample: Sample::default(),
        };
        let (a, b) = (round(1000, 0.02), round(3000, 0.06));
        assert!((cpu_per_request_us(&[&a, &b]) - 20.0).abs() < 1e-9);
        assert!(cpu_per_request_us(&[]).is_nan());
    }

    /// The verdict reads ratios of loads in the same run: here cutover's medians trail
    /// nginx's (the machine slowed down in its later runs), yet it is ahead in every run.
    #[test]
    fn the_goal_is_read_run_by_run() {
        let r = |proxy, rep, rps, p99_ms| Round {
            proxy,
            rep,
            kind: Kind::H1,
            rps,
            p50_ms: 1.0,
            p99_ms,
            requests: 1000,
            errors: 0,
            rss_kib: 0,
            proxy_cpu_s: 0.01,
            sample: Sample::default(),
        };
        let (c, n) = (Proxy::Cutover, Proxy::Nginx);
        let rounds = vec![
            r(c, 0, 20_000.0, 2.0),
            r(n, 0, 19_000.0, 2.1),
            r(c, 1, 15_000.0, 2.6),
            r(n, 1, 30_000.0, 1.5),
            r(c, 2, 15_500.0, 2.5),
            r(n, 2, 15_000.0, 2.6),
            r(n, 3, 14_800.0, 2.7),
            r(c, 3, 15_000.0, 2.5),
            // A run nginx did not finish: no pair.
            r(c, 4, 1.0, 9.0),
        ];
        assert_eq!(pairs(&rounds, Kind::H1).0.len(), 4);
        assert!(pairs(&rounds, Kind::H2).0.is_empty());
        let line = goal_line(&rounds, &[Kind::H1], "");
        assert!(
            line.contains(
                "HTTP/1.1: met (102% of nginx's requests/s and 96% of its p99, medians of 4 runs"
            ),
            "{line}"
        );
        assert!(
            line.contains("| HTTP/1.1 | 102% (50–105%) | 3 of 4 | 96% (93–173%) | 3 of 4 |"),
            "{line}"
        );
        let none = goal_line(&rounds, &[Kind::H2], "");
        assert!(none.contains("HTTP/2: not met"), "{none}");
    }

    /// The TLS nginx config passes Debian's `nginx -t`.
    #[test]
    fn nginx_configs_pass_nginx_t() {
        let d = std::env::temp_dir().join(format!("cutover-bench-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("n/tmp")).unwrap();
        let c = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).unwrap();
        std::fs::write(d.join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(d.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
        let n = d.join("n").display().to_string();
        for conf in [
            nginx_tls_config(&n, 18443, 18080),
            backend_config(&n, 18080),
        ] {
            std::fs::write(d.join("n/nginx.conf"), conf).unwrap();
            let out = Command::new(NGINX)
                .args(["-t", "-q", "-c"])
                .arg(d.join("n/nginx.conf"))
                .arg("-e")
                .arg(d.join("n/error.log"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

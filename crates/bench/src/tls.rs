//! `tls`: cutover's edge proxy terminating TLS, next to nginx and Caddy doing the same in
//! front of the same backend, all local processes on this machine's loopback. Per proxy:
//! HTTP/1.1 keep-alive (wrk), HTTP/2 (h2load), full TLS handshakes per second (wrk with
//! `Connection: close`), and the proxy's memory idle and under load.

use crate::machine::loadavg;
use crate::meter::Sample;
use crate::peers;
use crate::report::{self, spread, Section};
use crate::tls_switch::{self, Flip};
use crate::Ctx;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
three TLS-terminating proxies run side by side as local processes on this machine's loopback, \
each in front of the same backend: Debian's nginx with one worker on 127.0.0.1 answering `/` \
with a 10-byte body, keeping connections open and logging nothing. *cutover* is `cutover \
proxy run --tls files --cert --key` (the binary built with the bench's profile) with one \
service deployed by `cutover proxy deploy --domain localhost`; *nginx* is Debian's nginx \
(`worker_processes auto`, `server_name localhost`, `listen ... ssl http2`, `proxy_pass` to an upstream with \
`keepalive 32`, `proxy_http_version 1.1`, no access log); *Caddy* is Debian's `caddy run` \
with a JSON config (the same certificate loaded from files, automatic HTTPS off, one \
`reverse_proxy` route, Caddy's defaults otherwise). All three serve the same self-signed \
ECDSA P-256 certificate for `localhost` made by the bench (rcgen) and negotiate TLS 1.3. \
Each proxy gets three loads in turn, each for 10 s (2 s with `--quick`), repeated for every \
run of the cell (`--reps`), the order of the proxies rotating: *HTTP/1.1* is `wrk -t2 -c8 \
--latency https://localhost:PORT/` (8 keep-alive connections, no pause), *HTTP/2* is `h2load -t2 -c8 -m1 -D` over \
ALPN h2 (8 connections, one stream in flight on each, so 8 requests in flight as with wrk), \
its p50/p99 computed by the bench from h2load's `--log-file` (one line per request with its \
duration), *handshakes/s* is `wrk -t2 -c8` with `Connection: close`, so every request is a \
new TCP connection and a full TLS handshake (wrk does not resume sessions): its requests/s \
is full handshakes per second, and its p99 is the latency of a request including its \
connection's handshake. Requests/s is the median (min–max) of the runs; p50 and p99 are the \
median of the runs' values; *errors* counts non-2xx answers, socket errors and failed \
requests of all runs. The bench waits for an idle machine before each load and redoes a load \
(up to twice) during which other processes took over a quarter of the CPU. Everything, the \
load generators and the backend included, shares the machine's 2 cores, so these numbers \
are what the whole path sustains on 2 cores. Memory is `VmRSS` from `/proc/<pid>/status` \
(nginx: master and workers summed): *idle* before any load, *under load* the largest value \
read every 100 ms during that proxy's loads. *CPU per request* is the user + system time of \
the proxy's processes (nginx: master and workers) during its loads, read from \
`/proc/<pid>/stat`, divided by the requests those loads completed: a measure of the proxy's \
own work that other processes on the machine disturb far less than requests/s. \
*Switches under HTTPS load* (same processes, after the loads above): a second backend (nginx, \
the same answer) is started, and each proxy is switched K times (10, 3 with `--quick`) \
alternately to one and the other backend, one switch a second, while `h2load -t2 -c8 -m1 \
-D(K+2)` runs against it over TLS 1.3, with HTTP/2 and then with HTTP/1.1 keep-alive \
(`--h1`); h2load does not open a new connection when the server closes one (a reload's \
GOAWAY or close): that client stops, counting no failure, so nginx's and Caddy's rows here \
show a load that mostly stopped (the `switch` scenario's HTTPS rows reconnect). A switch is, for \
*cutover*, `cutover proxy deploy web --target 127.0.0.1:P` (health gate every 50 ms, 2 \
healthy probes, then the pointer swap, then the old target drained, 2 s at most); for \
*nginx*, its config rewritten with the other backend and `SIGHUP` to its master (a reload: \
new workers start, old ones finish their requests and close their connections, HTTP/2 ones \
with a GOAWAY); for *Caddy*, a `PATCH` of the route's `upstreams` through its admin API \
(on 127.0.0.1), which returns once the new config runs. *failed* is h2load's requests not \
succeeded (errors, resets, non-2xx); *longest gap* is the longest time between the ends of \
two consecutive successful responses, all connections together, from h2load's \
`--log-file`; *switch time* is the median wall time of the switch command.";

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
    access_log off;
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
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
pub(crate) fn parse_h2load(out: &str) -> Result<(f64, u64, u64)> {
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

/// One load of `kind` on the proxy at `tls_port` for `secs`.
fn load(
    ctx: &Ctx,
    work: &Path,
    proxy: Proxy,
    pids: &[u32],
    kind: Kind,
    tls_port: u16,
    secs: u64,
) -> Result<Round> {
    let url = format!("https://{DOMAIN}:{tls_port}/");
    let (r, sample) = ctx.meter.time(|| -> Result<Round> {
        let cpu_before = cpu_s(pids);
        let (rps, p50_ms, p99_ms, requests, errors, rss) = match kind {
            Kind::H1 | Kind::Handshake => {
                let mut cmd = Command::new("wrk");
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
                let mut cmd = Command::new("h2load");
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

    let backend_port = free_port()?;
    let d = work.join("backend").display().to_string();
    std::fs::write(
        work.join("backend/nginx.conf"),
        backend_config(&d, backend_port),
    )?;
    let mut backend = Proc::spawn(
        "the backend (nginx)",
        Command::new(NGINX)
            .arg("-c")
            .arg(work.join("backend/nginx.conf"))
            .arg("-e")
            .arg(work.join("backend/error.log")),
        work.join("backend/output.log"),
    )?;
    backend.wait_listening(loopback(backend_port))?;
    // The second backend, for the switches at the end.
    let backend_b_port = free_port()?;
    let d = work.join("backend-b").display().to_string();
    std::fs::write(
        work.join("backend-b/nginx.conf"),
        backend_config(&d, backend_b_port),
    )?;
    let mut backend_b = Proc::spawn(
        "the second backend (nginx)",
        Command::new(NGINX)
            .arg("-c")
            .arg(work.join("backend-b/nginx.conf"))
            .arg("-e")
            .arg(work.join("backend-b/error.log")),
        work.join("backend-b/output.log"),
    )?;
    backend_b.wait_listening(loopback(backend_b_port))?;

    // cutover's proxy with the certificate from files, and one service on localhost.
    let plain_port = free_port()?;
    let cutover_port = free_port()?;
    let cdir = work.join("cutover");
    let mut cutover = Proc::spawn(
        "cutover proxy run",
        Command::new(&ctx.cutover)
            .args(["proxy", "run", "--listen"])
            .arg(loopback(plain_port).to_string())
            .arg("--listen-tls")
            .arg(loopback(cutover_port).to_string())
            .arg("--dir")
            .arg(&cdir)
            .args(["--tls", "files", "--cert"])
            .arg(work.join("cert.pem"))
            .arg("--key")
            .arg(work.join("key.pem")),
        work.join("cutover/output.log"),
    )?;
    cutover.wait_listening(loopback(cutover_port))?;
    let out = Command::new(&ctx.cutover)
        .args(["proxy", "deploy", "web", "--target"])
        .arg(loopback(backend_port).to_string())
        .args(["--health", "/", "--domain", DOMAIN, "--dir"])
        .arg(&cdir)
        .output()
        .context("running cutover proxy deploy")?;
    if !out.status.success() {
        bail!(
            "cutover proxy deploy failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let nginx_port = free_port()?;
    let d = work.join("nginx").display().to_string();
    std::fs::write(
        work.join("nginx/nginx.conf"),
        nginx_tls_config(&d, nginx_port, backend_port),
    )?;
    let mut nginx = Proc::spawn(
        "nginx",
        Command::new(NGINX)
            .arg("-c")
            .arg(work.join("nginx/nginx.conf"))
            .arg("-e")
            .arg(work.join("nginx/error.log")),
        work.join("nginx/output.log"),
    )?;
    nginx.wait_listening(loopback(nginx_port))?;

    let caddy_port = free_port()?;
    let caddy_admin = free_port()?;
    let cd = work.join("caddy");
    std::fs::write(
        cd.join("caddy.json"),
        caddy_config(&work, caddy_port, backend_port, caddy_admin),
    )?;
    let mut caddy = Proc::spawn(
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
    caddy.wait_listening(loopback(caddy_port))?;

    let port = |p: Proxy| match p {
        Proxy::Cutover => cutover_port,
        Proxy::Nginx => nginx_port,
        Proxy::Caddy => caddy_port,
    };
    let pids = |p: Proxy| match p {
        Proxy::Cutover => cutover.pids(),
        Proxy::Nginx => nginx.pids(),
        Proxy::Caddy => caddy.pids(),
    };
    // Settle, then read the idle proxies' memory.
    std::thread::sleep(Duration::from_secs(1));
    let idle: Vec<(Proxy, u64)> = PROXIES.iter().map(|&p| (p, rss_kib(&pids(p)))).collect();
    eprintln!(
        "[tls] backend 127.0.0.1:{backend_port}; cutover pid {} on :{cutover_port}, nginx pids \
         {:?} on :{nginx_port}, caddy pid {} on :{caddy_port}; {secs} s per load",
        cutover.pid(),
        nginx.pids(),
        caddy.pid()
    );

    let mut rounds: Vec<Round> = Vec::new();
    let mut discarded: Vec<Round> = Vec::new();
    for rep in 0..ctx.reps {
        for j in 0..PROXIES.len() {
            let proxy = PROXIES[(rep + j) % PROXIES.len()];
            for kind in KINDS {
                loop {
                    let r = load(ctx, &work, proxy, &pids(proxy), kind, port(proxy), secs)?;
                    eprintln!(
                        "[tls] run {}/{} {} {}: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, \
                         {} errors, RSS {} KiB; other processes {:.1} CPU-s",
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
            }
        }
    }
    let (switch_md, switch_json) = switches(
        ctx,
        &work,
        [backend_port, backend_b_port],
        (cutover_port, nginx_port, caddy_port),
        nginx.pid(),
        caddy_admin,
    )?;
    for (name, p) in [("cutover proxy run", &mut cutover), ("caddy", &mut caddy)] {
        if let Some(s) = p.child.try_wait()? {
            bail!("{name} exited during the scenario ({s}): {}", p.log_tail());
        }
    }
    let load_after = loadavg();
    drop(caddy);
    drop(nginx);
    drop(cutover);
    drop(backend);
    drop(backend_b);

    let mut md = tables(
        ctx,
        (&rounds, &discarded),
        &idle,
        (&load_before, &load_after),
        clock.elapsed(),
    );
    md.push_str(&switch_md);

    let json = json!({
        "scenario": "tls",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "reps": ctx.reps,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
        "load": { "connections": CONNECTIONS, "duration_s": secs, "h2_streams_per_connection": 1 },
        "idle_rss_kib": idle.iter().map(|(p, k)| (p.key().to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
        "runs": rounds.iter().map(round_json).collect::<Vec<_>>(),
        "discarded": discarded.iter().map(round_json).collect::<Vec<_>>(),
        "switches": switch_json,
        // The zero-downtime gate: a failed request while cutover switches fails the run.
        "cutover_failed": switch_json
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["proxy"] == Proxy::Cutover.key())
            .map(|r| (format!("https switch, {}", r["client"].as_str().unwrap_or("?")), r["failed"].clone()))
            .collect::<serde_json::Map<_, _>>(),
    });
    Ok(Section { markdown: md, json })
}

/// The scenario's tables (throughput and latency, memory, CPU per request), the goal's verdict
/// per row and how much other work ran: everything but the switch table.
fn tables(
    ctx: &Ctx,
    (rounds, discarded): (&[Round], &[Round]),
    idle: &[(Proxy, u64)],
    (load_before, load_after): (&str, &str),
    took: Duration,
) -> String {
    let cell = |p: Proxy, k: Kind| cell_of(rounds, p, k);
    let med =
        |rs: &[&Round], f: fn(&Round) -> f64| spread(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
    let rps_cell = |rs: &[&Round]| {
        let (m, lo, hi) = med(rs, |r| r.rps);
        if rs.len() > 1 {
            format!("{m:.0} ({lo:.0}–{hi:.0})")
        } else {
            format!("{m:.0}")
        }
    };
    let ms_cell = |v: f64| {
        if v.is_nan() {
            "–".to_string()
        } else {
            format!("{v:.2} ms")
        }
    };
    let mut md = report::measured_line(ctx, load_before, load_after, took);
    md.push_str("\n\n");
    let mut rows = Vec::new();
    for p in PROXIES {
        let mut row = vec![p.name().to_string()];
        for k in KINDS {
            let rs = cell(p, k);
            row.push(rps_cell(&rs));
            if k != Kind::Handshake {
                row.push(ms_cell(med(&rs, |r| r.p50_ms).0));
            }
            row.push(ms_cell(med(&rs, |r| r.p99_ms).0));
        }
        row.push(
            rounds
                .iter()
                .filter(|r| r.proxy == p)
                .map(|r| r.errors)
                .sum::<u64>()
                .to_string(),
        );
        rows.push(row);
    }
    md.push_str(&report::table(
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
    ));
    md.push_str(&format!(
        "\nPeers: {}. Memory of each proxy (nginx: master and workers together):\n\n",
        peers::versions_line(&ctx.machine)
    ));
    let mem_rows: Vec<Vec<String>> = idle
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
    md.push_str(&report::table(
        &["proxy", "RSS idle", "RSS under load (largest read)"],
        &mem_rows,
    ));
    md.push_str(
        "\nCPU time of each proxy per request (user + system of its processes during the \
         loads, from `/proc/<pid>/stat` in 10 ms ticks, over the requests of all runs; \
         steadier than requests/s on a busy machine):\n\n",
    );
    let us_cell = |v: f64| {
        if v.is_nan() {
            "–".to_string()
        } else {
            format!("{v:.1} µs")
        }
    };
    let cpu_rows: Vec<Vec<String>> = PROXIES
        .iter()
        .map(|&p| {
            let mut row = vec![p.name().to_string()];
            row.extend(
                KINDS
                    .iter()
                    .map(|&k| us_cell(cpu_per_request_us(&cell(p, k)))),
            );
            row
        })
        .collect();
    md.push_str(&report::table(
        &[
            "proxy",
            "HTTP/1.1 keep-alive",
            "HTTP/2",
            "full handshake + request",
        ],
        &cpu_rows,
    ));
    md.push_str(&goal_line(rounds));
    let cores = ctx.machine.cores.max(1) as f64;
    let (foreign, wall) = rounds.iter().fold((0.0, 0.0), |(f, w), r| {
        (f + r.sample.foreign_cpu_s, w + r.sample.secs)
    });
    md.push_str(&format!(
        "\nDuring the loads, processes outside the bench used {:.0}% of the machine's CPU time; \
         loads redone because other processes took over a quarter of the CPU: {}.\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
        discarded.len()
    ));
    md
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

/// The goal, per row: at least nginx's throughput and no worse p99.
fn goal_line(rounds: &[Round]) -> String {
    let mut verdicts = Vec::new();
    for k in KINDS {
        let (c, n) = (
            cell_of(rounds, Proxy::Cutover, k),
            cell_of(rounds, Proxy::Nginx, k),
        );
        let (crps, nrps) = (median_of(&c, |r| r.rps), median_of(&n, |r| r.rps));
        let (cp99, np99) = (median_of(&c, |r| r.p99_ms), median_of(&n, |r| r.p99_ms));
        let what = match k {
            Kind::H1 => "HTTP/1.1",
            Kind::H2 => "HTTP/2",
            Kind::Handshake => "full handshakes",
        };
        let met = crps >= nrps && cp99 <= np99;
        verdicts.push(format!(
            "{what}: {} ({:.0}% of nginx's requests/s, p99 {:.2} vs {:.2} ms, CPU per \
             request {:.1} vs {:.1} µs)",
            if met { "met" } else { "not met" },
            100.0 * crps / nrps.max(1e-9),
            cp99,
            np99,
            cpu_per_request_us(&c),
            cpu_per_request_us(&n)
        ));
    }
    format!(
        "\nGoal (issue 12: at least nginx's throughput and no worse p99) in this run: {}.\n",
        verdicts.join("; ")
    )
}

/// The switch table (see [`tls_switch`]): cutover, nginx and Caddy switched between the two
/// backends under HTTP/2 and HTTP/1.1 load. `ports`: the proxies' TLS ports (cutover, nginx,
/// Caddy).
fn switches(
    ctx: &Ctx,
    work: &Path,
    backends: [u16; 2],
    ports: (u16, u16, u16),
    nginx_master: u32,
    caddy_admin: u16,
) -> Result<(String, Value)> {
    let cdir = work.join("cutover");
    let ndir = work.join("nginx").display().to_string();
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let flips = [
        Flip {
            name: Proxy::Cutover.name(),
            key: Proxy::Cutover.key(),
            port: ports.0,
            switch: Box::new(|to| {
                run(
                    Command::new(&ctx.cutover)
                        .args(["proxy", "deploy", "web", "--target"])
                        .arg(loopback(to).to_string())
                        .args(["--health", "/", "--domain", DOMAIN, "--interval", "50ms"])
                        .args(["--drain", "2s", "--dir"])
                        .arg(&cdir),
                    "cutover proxy deploy",
                )
            }),
        },
        Flip {
            name: Proxy::Nginx.name(),
            key: Proxy::Nginx.key(),
            port: ports.1,
            switch: Box::new(|to| {
                std::fs::write(
                    work.join("nginx/nginx.conf"),
                    nginx_tls_config(&ndir, ports.1, to),
                )?;
                run(
                    Command::new("kill").args(["-HUP", &nginx_master.to_string()]),
                    "nginx reload",
                )
            }),
        },
        Flip {
            name: Proxy::Caddy.name(),
            key: Proxy::Caddy.key(),
            port: ports.2,
            switch: Box::new(|to| {
                run(
                    Command::new("curl")
                        .args(["-sS", "--fail-with-body", "-X", "PATCH"])
                        .args(["-H", "Content-Type: application/json", "-d"])
                        .arg(format!("[{{\"dial\":\"127.0.0.1:{to}\"}}]"))
                        .arg(format!(
                            "http://127.0.0.1:{caddy_admin}/config/apps/http/servers/bench/routes/0/handle/0/upstreams"
                        )),
                    "Caddy's admin API",
                )
            }),
        },
    ];
    let k = if ctx.quick { 3 } else { 10 };
    tls_switch::measure(&flips, k, backends, work)
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

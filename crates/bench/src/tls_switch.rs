//! Switches under HTTPS load, one code path for both scenarios that measure them.
//!
//! A proxy terminating TLS is switched K times between two backends while a [`Pool`] of h2load
//! processes (nghttp2's load generator) keeps it busy over HTTPS, once with HTTP/2 and once
//! with HTTP/1.1 keep-alive ([`run_with_switches`]); per run, the requests, the failed ones,
//! the longest time without a successful response, the switch commands' wall time and the
//! connections the pool opened again. The `switch` scenario's HTTPS rows switch containers
//! behind cutover, Caddy and nginx; the `tls` scenario's switch table ([`measure`]) switches
//! the proxies on this machine's loopback between two local backends with what an operator
//! would run: cutover's `proxy deploy` (gate, pointer swap, drain), nginx's config rewritten
//! and reloaded (SIGHUP to the master), Caddy's upstream PATCHed through its admin API.
//!
//! The pool runs one h2load process per connection, each started again as soon as its
//! connection is gone. h2load (1.52) does not open a new connection when the server closes
//! one during a timed run (`-D`), neither after an HTTP/2 GOAWAY nor after an HTTP/1.1 close
//! without `Connection: close`: that client just stops, silently, and its run reports no
//! failure. A browser would connect again; the pool does, so that a proxy that closes its
//! clients' connections on a switch (nginx's reload, Caddy's config change) keeps its load.

use crate::events::epoch_now;
use crate::report;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One proxy to switch: how to point it at a backend port.
pub(crate) struct Flip<'a> {
    pub(crate) name: &'static str,
    pub(crate) key: &'static str,
    /// Where its TLS port is.
    pub(crate) target: Target,
    pub(crate) switch: Box<dyn Fn(u16) -> Result<()> + 'a>,
}

/// One run's result.
pub(crate) struct SwitchRun {
    proxy: &'static str,
    key: &'static str,
    client: &'static str,
    switches: usize,
    requests: u64,
    failed: u64,
    gap_ms: f64,
    switch_s: Vec<f64>,
    /// The pool's processes started again because the server closed their connection, and
    /// those started again because theirs never came up.
    reconnects: (u64, u64),
    /// Switch commands that failed: "switch N: message".
    failed_switches: Vec<String>,
    /// When the switches ran and where the longest gap starts, seconds since the load started
    /// (for the JSON).
    timeline: Value,
}

impl SwitchRun {
    pub(crate) fn key(&self) -> &'static str {
        self.key
    }

    pub(crate) fn failed(&self) -> u64 {
        self.failed
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests
    }

    /// "blue-green over HTTPS (HTTP/2)": the run in logs and in the zero-downtime gate.
    pub(crate) fn gate_name(&self) -> String {
        format!("{} over HTTPS ({})", self.key, self.client)
    }

    /// Its numbers, one line for the log.
    pub(crate) fn summary(&self) -> String {
        let (closed, never_up) = self.reconnects;
        format!(
            "{} requests, {} failed, longest gap {:.0} ms, connections opened again {closed} / \
             {never_up}",
            self.requests, self.failed, self.gap_ms,
        )
    }
}

/// Ends (µs since the epoch) of the 2xx responses in an h2load `--log-file` (start µs since
/// the epoch, status, duration µs per line; status -1 for a request that failed), sorted,
/// and how many lines the log has.
fn success_ends(log: &str) -> (Vec<f64>, u64) {
    let mut lines = 0;
    let mut ends: Vec<f64> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .inspect(|_| lines += 1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let start = f.first()?.trim().parse::<f64>().ok()?;
            let status = f.get(1)?.trim().parse::<i32>().ok()?;
            let dur = f.get(2)?.trim().parse::<f64>().ok()?;
            (200..300).contains(&status).then_some(start + dur)
        })
        .collect();
    ends.sort_by(f64::total_cmp);
    (ends, lines)
}

/// The longest time (ms) between the ends of two consecutive 2xx responses in an h2load
/// `--log-file`, also counting the time from the last one to `until` (µs since the epoch,
/// when the load stopped: a load that stopped being answered shows), and where that gap
/// starts (µs since the epoch; 0 without one).
fn longest_gap_at(log: &str, until: Option<f64>) -> (f64, f64) {
    let (mut ends, _) = success_ends(log);
    if let (Some(u), Some(&last)) = (until, ends.last()) {
        ends.push(u.max(last));
    }
    ends.windows(2)
        .map(|w| ((w[1] - w[0]) / 1000.0, w[0]))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

/// Requests in an h2load `--log-file` (one line each) and those without a 2xx status.
fn tally(log: &str) -> (u64, u64) {
    let (ends, lines) = success_ends(log);
    (lines, lines - ends.len() as u64)
}

/// Switches every proxy `k` times under HTTP/2 and then HTTP/1.1 load from a [`Pool`]
/// (`rate` requests per second on each connection), through [`run_with_switches`]; the table
/// (with its heading, see [`https_table`]) and the runs' JSON. `backends[0]` is the one every
/// proxy serves at the start; a failed switch leaves the proxy where it was.
pub(crate) fn measure(
    flips: &[Flip<'_>],
    k: usize,
    backends: [u16; 2],
    rate: u32,
    work: &Path,
) -> Result<(String, Value)> {
    let mut runs = Vec::new();
    for flip in flips {
        let mut served = 0;
        for h1 in [false, true] {
            let run = HttpsRun {
                proxy: flip.name,
                key: flip.key,
                target: flip.target,
                h1,
                rate,
                k,
                settle: crate::switching::SETTLE,
                work,
            };
            let r = run_with_switches(&run, &mut || {
                let to = 1 - served;
                Ok(match (flip.switch)(backends[to]) {
                    Ok(()) => {
                        served = to;
                        Flipped {
                            ok: true,
                            message: String::new(),
                        }
                    }
                    Err(e) => Flipped {
                        ok: false,
                        message: format!("{e:#}"),
                    },
                })
            })?;
            eprintln!("[tls] switches: {}: {}", r.gate_name(), r.summary());
            runs.push(r);
        }
    }
    if runs.iter().any(|r| r.requests == 0) {
        bail!("a switch run answered no request");
    }
    let (table, json) = https_table(&runs);
    let md = format!(
        "\n**Switches under HTTPS load** ({k} per run; {CONNECTIONS} h2load connections, {rate} \
         requests/s each):\n\n{table}"
    );
    Ok((md, json))
}

/// The columns of a switch table under HTTPS load; the last one counts the connections the
/// pool opened again.
const HEADER: [&str; 8] = [
    "proxy",
    "client",
    "requests",
    "failed",
    "failed per switch",
    "longest gap",
    "switch time",
    "connections opened again (server closed / never up)",
];

/// A run's row under [`HEADER`].
fn cells(r: &SwitchRun) -> Vec<String> {
    let (m, lo, hi) = report::spread(&r.switch_s);
    vec![
        r.proxy.to_string(),
        r.client.to_string(),
        r.requests.to_string(),
        r.failed.to_string(),
        format!("{:.1}", r.failed as f64 / r.switches.max(1) as f64),
        format!("{:.0} ms", r.gap_ms),
        format!("{m:.2} s ({lo:.2}–{hi:.2})"),
        format!("{} / {}", r.reconnects.0, r.reconnects.1),
    ]
}

fn run_json(r: &SwitchRun) -> Value {
    json!({
        "proxy": r.key,
        "client": r.client,
        "switches": r.switches,
        "requests": r.requests,
        "failed": r.failed,
        "longest_gap_ms": r.gap_ms,
        "switch_s": r.switch_s,
        "reconnects_after_server_close": r.reconnects.0,
        "restarts_never_connected": r.reconnects.1,
        "failed_switches": r.failed_switches,
        "timeline": r.timeline,
    })
}

/// Writes a self-signed certificate for `name` (ECDSA P-256, rcgen) and its key as PEM
/// files `cert.pem` and `key.pem` in `dir`; their paths.
pub(crate) fn write_test_cert(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()])
        .map_err(|e| anyhow!("making the test certificate: {e}"))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, c.cert.pem()).with_context(|| format!("{}", cert.display()))?;
    std::fs::write(&key, c.signing_key.serialize_pem())
        .with_context(|| format!("{}", key.display()))?;
    Ok((cert, key))
}

/// Connections of a [`Pool`] (one h2load process each, one request in flight on each).
pub(crate) const CONNECTIONS: usize = 8;
/// How often a pool looks at its processes.
const POLL: Duration = Duration::from_millis(5);
/// A process whose connection is not up after this long is started again.
const CONNECT_LIMIT: Duration = Duration::from_secs(3);
/// h2load's `-D` in a pool: longer than any run; the pool stops its processes itself.
const POOL_DURATION_S: u32 = 3600;

/// Where a pool's load goes: h2load connects to `addr` and asks for `https://NAME:PORT/`
/// (`NAME` in SNI and `:authority`/`Host`, `PORT` the address's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) name: &'static str,
}

/// Starts the h2load processes of a pool, each logging to a file of its own.
struct Spawner {
    target: Target,
    h1: bool,
    /// Requests per second on each connection (`--rps`), or as fast as answered.
    rate: Option<u32>,
    /// Log files are `<prefix>-<n>.log`.
    prefix: PathBuf,
    next: usize,
}

impl Spawner {
    fn spawn(&mut self) -> Result<Conn> {
        let log = PathBuf::from(format!("{}-{}.log", self.prefix.display(), self.next));
        self.next += 1;
        let _ = std::fs::remove_file(&log);
        let Target { addr, name } = self.target;
        let mut cmd = Command::new("h2load");
        cmd.args(["-t1", "-c1", "-m1"])
            .arg(format!("-D{POOL_DURATION_S}"))
            .arg(format!("--connect-to={addr}"))
            .arg(format!("--log-file={}", log.display()));
        if self.h1 {
            cmd.arg("--h1");
        }
        if let Some(r) = self.rate {
            cmd.arg(format!("--rps={r}"));
        }
        let child = cmd
            .arg(format!("https://{name}:{}/", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting h2load")?;
        Ok(Conn {
            child,
            log,
            spawned: Instant::now(),
            connected: false,
            gone: 0,
            log_len: 0,
        })
    }
}

/// One h2load process of a pool and what the pool saw of it.
struct Conn {
    child: Child,
    log: PathBuf,
    spawned: Instant,
    /// Its connection was seen up (a socket among its open files).
    connected: bool,
    /// Polls in a row that saw it with no socket and no new log line.
    gone: u32,
    log_len: u64,
}

/// What a poll concluded about one process.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Up,
    /// Its connection was up and is gone (the server closed it; h2load will not reconnect).
    Gone,
    /// Its connection never came up.
    NeverUp,
}

impl Conn {
    /// Alive while it holds a socket or its log grows; gone after two polls without either.
    fn poll(&mut self) -> Seen {
        if let Ok(Some(_)) = self.child.try_wait() {
            return if self.connected {
                Seen::Gone
            } else {
                Seen::NeverUp
            };
        }
        let len = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let grew = len != self.log_len;
        self.log_len = len;
        let socket = sockets(self.child.id()) > 0;
        self.connected |= socket;
        if socket || grew {
            self.gone = 0;
            return Seen::Up;
        }
        if !self.connected {
            return if self.spawned.elapsed() > CONNECT_LIMIT {
                Seen::NeverUp
            } else {
                Seen::Up
            };
        }
        self.gone += 1;
        if self.gone >= 2 {
            Seen::Gone
        } else {
            Seen::Up
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sockets among the open files of process `pid`.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// What a pool measured, once stopped.
pub(crate) struct PoolOut {
    /// Every process's log, in the order they started.
    pub(crate) logs: Vec<PathBuf>,
    /// Processes started again because their connection was gone.
    pub(crate) reconnects: u64,
    /// Processes started again because their connection never came up.
    pub(crate) never_up: u64,
    /// When the load stopped, µs since the epoch.
    pub(crate) stopped_us: f64,
}

/// A steady HTTPS load of [`CONNECTIONS`] h2load processes (`-c1 -m1`, HTTP/2, or
/// HTTP/1.1 keep-alive with `--h1`, `--rps` if a rate is given), each started again as soon
/// as its connection is gone (see the module's doc), until stopped.
pub(crate) struct Pool {
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<Result<PoolOut>>>,
}

impl Pool {
    /// Starts the processes (`rate`: requests per second on each connection, or as fast as
    /// answered); logs go to `<prefix>-<n>.log`.
    pub(crate) fn start(
        target: Target,
        h1: bool,
        rate: Option<u32>,
        prefix: PathBuf,
    ) -> Result<Pool> {
        let mut spawner = Spawner {
            target,
            h1,
            rate,
            prefix,
            next: 0,
        };
        let conns = (0..CONNECTIONS)
            .map(|_| spawner.spawn())
            .collect::<Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let supervisor = std::thread::spawn(move || supervise(spawner, conns, &flag));
        Ok(Pool {
            stop,
            supervisor: Some(supervisor),
        })
    }

    /// Stops every process (killed: each logged its requests as they ended).
    pub(crate) fn stop(mut self) -> Result<PoolOut> {
        self.stop.store(true, Ordering::SeqCst);
        self.supervisor
            .take()
            .ok_or_else(|| anyhow!("the pool was stopped already"))?
            .join()
            .map_err(|_| anyhow!("the pool's supervisor panicked"))?
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
    }
}

/// The pool's thread: every [`POLL`], starts again each process whose connection is gone
/// or never came up, until `stop`; then kills them all.
fn supervise(mut spawner: Spawner, mut conns: Vec<Conn>, stop: &AtomicBool) -> Result<PoolOut> {
    let mut logs: Vec<PathBuf> = conns.iter().map(|c| c.log.clone()).collect();
    let (mut reconnects, mut never_up) = (0, 0);
    let mut result = Ok(());
    'run: while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        for c in conns.iter_mut() {
            match c.poll() {
                Seen::Up => continue,
                Seen::Gone => reconnects += 1,
                Seen::NeverUp => never_up += 1,
            }
            c.kill();
            match spawner.spawn() {
                Ok(n) => {
                    logs.push(n.log.clone());
                    *c = n;
                }
                Err(e) => {
                    result = Err(e);
                    break 'run;
                }
            }
        }
    }
    let stopped_us = epoch_now() * 1e6;
    for c in conns.iter_mut() {
        c.kill();
    }
    result.map(|()| PoolOut {
        logs,
        reconnects,
        never_up,
        stopped_us,
    })
}

/// How one switch command of [`run_with_switches`] ended.
pub(crate) struct Flipped {
    pub(crate) ok: bool,
    pub(crate) message: String,
}

/// What [`run_with_switches`] measures: the row's names and the load.
pub(crate) struct HttpsRun<'a> {
    pub(crate) proxy: &'static str,
    pub(crate) key: &'static str,
    pub(crate) target: Target,
    pub(crate) h1: bool,
    /// Requests per second on each connection.
    pub(crate) rate: u32,
    pub(crate) k: usize,
    /// Load before the first switch and after each.
    pub(crate) settle: Duration,
    /// Where the logs go.
    pub(crate) work: &'a Path,
}

/// One run under a [`Pool`]: `settle` of load, then `k` times the switch command (run to its
/// exit) followed by `settle` of load, then the pool stopped. A failed switch is recorded,
/// and the next one runs.
pub(crate) fn run_with_switches(
    run: &HttpsRun<'_>,
    switch: &mut dyn FnMut() -> Result<Flipped>,
) -> Result<SwitchRun> {
    let client = if run.h1 {
        "HTTP/1.1 keep-alive"
    } else {
        "HTTP/2"
    };
    let prefix = run.work.join(format!(
        "https-{}-{}",
        run.key,
        if run.h1 { "h1" } else { "h2" }
    ));
    let t0 = epoch_now();
    let pool = Pool::start(run.target, run.h1, Some(run.rate), prefix)?;
    std::thread::sleep(run.settle);
    let mut switch_s = Vec::new();
    let mut windows = Vec::new();
    let mut failed_switches = Vec::new();
    for i in 1..=run.k {
        let t = Instant::now();
        let start = epoch_now() - t0;
        let f = switch()?;
        switch_s.push(t.elapsed().as_secs_f64());
        windows.push([start, epoch_now() - t0]);
        if !f.ok {
            failed_switches.push(format!("switch {i}: {}", f.message));
        }
        std::thread::sleep(run.settle);
    }
    let out = pool.stop()?;
    let mut text = String::new();
    for l in &out.logs {
        // A process that never connected may have written no log.
        text.push_str(&std::fs::read_to_string(l).unwrap_or_default());
    }
    let (requests, failed) = tally(&text);
    let (gap_ms, gap_at) = longest_gap_at(&text, Some(out.stopped_us));
    Ok(SwitchRun {
        proxy: run.proxy,
        key: run.key,
        client,
        switches: run.k,
        requests,
        failed,
        gap_ms,
        switch_s,
        reconnects: (out.reconnects, out.never_up),
        failed_switches,
        timeline: json!({
            "load_started_epoch_s": t0,
            "switches_start_end_s": windows,
            "longest_gap_starts_s": if gap_ms > 0.0 { gap_at / 1e6 - t0 } else { 0.0 },
            "load_stopped_s": out.stopped_us / 1e6 - t0,
        }),
    })
}

/// A table of runs under HTTPS load (both scenarios'): [`HEADER`], and the failed switch
/// commands below it; the runs' JSON.
pub(crate) fn https_table(runs: &[SwitchRun]) -> (String, Value) {
    let rows: Vec<Vec<String>> = runs.iter().map(cells).collect();
    let mut md = report::table(&HEADER, &rows);
    let failed: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.failed_switches
                .iter()
                .map(move |f| format!("{} {}: {}", r.proxy, r.client, f.replace('|', "/")))
        })
        .collect();
    if failed.is_empty() {
        md.push_str("\nEvery switch command exited 0.\n");
    } else {
        md.push_str(&format!(
            "\nSwitch commands that failed ({}): {}.\n",
            failed.len(),
            failed.join("; ")
        ));
    }
    (md, Value::Array(runs.iter().map(run_json).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_between_successful_response_ends() {
        let log = "1000000\t200\t1000\n1002000\t200\t1000\n1003500\t503\t10\n1010000\t200\t500\n";
        // Ends: 1001000, 1003000, (503 ignored), 1010500: gaps 2 ms and 7.5 ms.
        assert_eq!(longest_gap_at(log, None), (7.5, 1003000.0));
        assert_eq!(longest_gap_at("", None), (0.0, 0.0));
        // A load that stopped being answered: the time to its end counts.
        assert_eq!(longest_gap_at("", Some(1030500.0)), (0.0, 0.0));
        assert_eq!(longest_gap_at(log, Some(1030500.0)), (20.0, 1010500.0));
    }

    #[test]
    fn every_logged_request_counts_and_only_2xx_succeed() {
        let log = "1000000\t200\t1000\n1002000\t-1\t1000\n1003500\t503\t10\n\n1010000\t204\t500\n";
        assert_eq!(tally(log), (4, 2));
        assert_eq!(tally(""), (0, 0));
    }

    /// nginx, stopped by its pid when dropped (also when a test panics).
    struct Nginx(Child);

    impl Drop for Nginx {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }

    /// An nginx on loopback terminating TLS, reloaded (SIGHUP) every 400 ms while the pool
    /// loads it: each reload closes every client connection (HTTP/2: a GOAWAY; HTTP/1.1: a
    /// close), after which h2load alone stops that client. The pool's processes are started
    /// again and the load goes on.
    #[test]
    fn the_pool_keeps_its_load_when_the_server_closes_connections() {
        let d = std::env::temp_dir().join(format!("cutover-bench-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let (cert, key) = write_test_cert(&d, "web.test").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = d.display();
        let temps: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("{t}_temp_path {dir}/tmp/{t}; "))
            .collect();
        let conf = format!(
            "daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log; \
             events {{ worker_connections 256; }} \
             http {{ access_log off; keepalive_requests 1000000; {temps} \
             server {{ listen 127.0.0.1:{port} ssl http2; ssl_certificate {}; \
             ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3; \
             location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            cert.display(),
            key.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let nginx = Nginx(
            Command::new("/usr/sbin/nginx")
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .arg("-e")
                .arg(d.join("error.log"))
                .spawn()
                .expect("starting Debian's nginx"),
        );
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nginx does not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for h1 in [false, true] {
            let target = Target {
                addr,
                name: "web.test",
            };
            let pool = Pool::start(target, h1, None, d.join(format!("pool-{h1}"))).unwrap();
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(400));
                let _ = Command::new("kill")
                    .args(["-HUP", &nginx.0.id().to_string()])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(600));
            let out = pool.stop().unwrap();
            let text: String = out
                .logs
                .iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .collect();
            let (ends, requests) = success_ends(&text);
            let span_ms = (ends.last().unwrap() - ends.first().unwrap()) / 1000.0;
            assert!(
                out.reconnects >= CONNECTIONS as u64,
                "h1 {h1}: {requests} requests, {} connections opened again",
                out.reconnects
            );
            assert!(span_ms > 1500.0, "h1 {h1}: answered for {span_ms} ms only");
            let (gap, _) = longest_gap_at(&text, Some(out.stopped_us));
            assert!(gap < 500.0, "h1 {h1}: longest gap {gap} ms");
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! A small HTTP/1.1 load generator (std threads and `TcpStream`) that
//! counts every failed request while a deploy happens.
//!
//! Each worker thread sends `GET path` to one target in a loop, either over
//! one reused keep-alive connection or over a fresh connection per request.
//! A request succeeds when a 2xx response arrives with its complete body
//! (Content-Length, chunked, or close-delimited). Everything else is a
//! failure: connect error, read/write error, timeout, non-2xx status, short
//! body, malformed response. With keep-alive, a response carrying
//! `Connection: close` makes the worker reconnect for the next request (not
//! a failure), but an error on a reused connection IS a failure.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Workers give up on their own after this long, whatever happens.
const SAFETY_DEADLINE: Duration = Duration::from_secs(600);
/// How many failure descriptions a report keeps.
const MAX_FAILURES: usize = 50;
/// Granularity of stop-flag checks while blocked on the network.
const POLL: Duration = Duration::from_millis(50);
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Options for [`Load::start`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Servers to hit; each gets `workers_per_target` workers.
    pub targets: Vec<SocketAddr>,
    /// Request path, e.g. `/` (default).
    pub path: String,
    /// `Host` header; default: the target's `ip:port`.
    pub host_header: Option<String>,
    /// Worker threads per target (default 2).
    pub workers_per_target: usize,
    /// Reuse one connection per worker (default true) or open a fresh
    /// connection (with `Connection: close`) for every request.
    pub keep_alive: bool,
    /// Per-request timeout, connect included (default 5s).
    pub timeout: Duration,
    /// Sleep between requests of one worker (default 2ms).
    pub pause: Duration,
    /// Keep a ledger of every request in [`LoadReport::samples`] (default
    /// false): when it started, how long it took, whether it succeeded.
    pub record: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            targets: Vec::new(),
            path: "/".to_string(),
            host_header: None,
            workers_per_target: 2,
            keep_alive: true,
            timeout: Duration::from_secs(5),
            pause: Duration::from_millis(2),
            record: false,
        }
    }
}

impl LoadOptions {
    /// Default options against these targets.
    pub fn new(targets: Vec<SocketAddr>) -> Self {
        LoadOptions {
            targets,
            ..LoadOptions::default()
        }
    }
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Successful requests (2xx, complete body).
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// The first 50 failures in time order:
    /// `"t=1.234s 10.201.1.2:80: what (after 0.012s)"`.
    pub failures: Vec<String>,
    /// Slowest request (successful or failed, connect time included).
    pub max_latency: Duration,
    /// First line of each successful body (trimmed, at most 80 chars) ->
    /// how many responses had it.
    pub bodies: BTreeMap<String, u64>,
    /// Time from start to stop.
    pub elapsed: Duration,
    /// Every counted request in start order, if [`LoadOptions::record`]
    /// was set (empty otherwise). Requests abandoned by `stop` are not in
    /// it, as they are not counted.
    pub samples: Vec<RequestSample>,
}

/// One request of the ledger ([`LoadOptions::record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSample {
    /// When the request started (before connecting, if it had to), since
    /// [`Load::started`].
    pub at: Duration,
    /// How long it took, connect included.
    pub latency: Duration,
    /// Whether it succeeded (2xx with its complete body).
    pub ok: bool,
}

impl RequestSample {
    /// When the request ended, since [`Load::started`].
    pub fn end(&self) -> Duration {
        self.at + self.latency
    }
}

impl LoadReport {
    /// Panics, listing the failures, if any request failed.
    pub fn assert_no_failures(&self) {
        if self.failed > 0 {
            panic!(
                "load had {} failed requests (and {} ok):\n  {}\n{self}",
                self.failed,
                self.ok,
                self.failures.join("\n  ")
            );
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "load: {} ok, {} failed in {:.3}s, max latency {:.3}s, bodies {:?}",
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.max_latency.as_secs_f64(),
            self.bodies
        )
    }
}

/// A running load; call [`Load::stop`] to get the report. Dropping it
/// without `stop` also stops and joins the workers.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    workers: Vec<JoinHandle<WorkerStats>>,
}

/// Per-worker results, merged on stop.
#[derive(Default)]
struct WorkerStats {
    ok: u64,
    failed: u64,
    failures: Vec<(Duration, String)>,
    max_latency: Duration,
    bodies: BTreeMap<String, u64>,
    samples: Vec<RequestSample>,
}

/// Shared, read-only worker configuration.
struct Shared {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    timeout: Duration,
    pause: Duration,
    keep_alive: bool,
    record: bool,
}

impl Load {
    /// Starts the workers. Panics if there are no targets or no workers.
    pub fn start(opts: LoadOptions) -> Load {
        assert!(!opts.targets.is_empty(), "testlab: Load needs targets");
        assert!(
            opts.workers_per_target > 0,
            "testlab: workers_per_target must be > 0"
        );
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            stop: stop.clone(),
            ok: ok.clone(),
            failed: failed.clone(),
            started,
            timeout: opts.timeout,
            pause: opts.pause,
            keep_alive: opts.keep_alive,
            record: opts.record,
        });
        let mut workers = Vec::new();
        for &target in &opts.targets {
            let host = opts
                .host_header
                .clone()
                .unwrap_or_else(|| target.to_string());
            let mut req = format!(
                "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: testlab-load\r\nAccept: */*\r\n",
                opts.path
            );
            if !opts.keep_alive {
                req.push_str("Connection: close\r\n");
            }
            req.push_str("\r\n");
            let req: Arc<[u8]> = req.into_bytes().into();
            for w in 0..opts.workers_per_target {
                let shared = shared.clone();
                let req = req.clone();
                let handle = thread::Builder::new()
                    .name(format!("load-{target}-{w}"))
                    .spawn(move || worker(&shared, target, &req))
                    .expect("testlab: cannot spawn load worker");
                workers.push(handle);
            }
        }
        Load {
            stop,
            ok,
            failed,
            started,
            workers,
        }
    }

    /// When the load started: the origin of [`RequestSample::at`] and of
    /// the failures' `t=`.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Successful requests so far.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far.
    pub fn failed_so_far(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` requests succeeded; false on timeout.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ok_so_far() < n {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops the workers (promptly: in-flight requests are abandoned and
    /// not counted) and returns the report.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let elapsed = self.started.elapsed();
        let mut report = LoadReport {
            elapsed,
            ..LoadReport::default()
        };
        let mut failures = Vec::new();
        for h in self.workers.drain(..) {
            let stats = match h.join() {
                Ok(s) => s,
                Err(_) => panic!("testlab: a load worker panicked"),
            };
            report.ok += stats.ok;
            report.failed += stats.failed;
            report.max_latency = report.max_latency.max(stats.max_latency);
            for (k, v) in stats.bodies {
                *report.bodies.entry(k).or_insert(0) += v;
            }
            failures.extend(stats.failures);
            report.samples.extend(stats.samples);
        }
        report.samples.sort_by_key(|s| s.at);
        failures.sort_by_key(|(t, _)| *t);
        report.failures = failures
            .into_iter()
            .take(MAX_FAILURES)
            .map(|(_, s)| s)
            .collect();
        report
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Why a request did not succeed.
enum Fail {
    /// Stop requested while the request was in flight: not counted.
    Aborted,
    /// A counted failure.
    Msg(String),
}

/// One open connection with its unread bytes.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Completed at least one request (so an error on it is an error on a
    /// reused connection).
    reused: bool,
}

fn worker(sh: &Shared, target: SocketAddr, req: &[u8]) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<Conn> = None;
    loop {
        if sh.stop.load(Ordering::Relaxed) || sh.started.elapsed() > SAFETY_DEADLINE {
            break;
        }
        let t0 = Instant::now();
        let result = request(sh, &mut conn, target, req, t0 + sh.timeout);
        let latency = t0.elapsed();
        if sh.record && !matches!(result, Err(Fail::Aborted)) {
            stats.samples.push(RequestSample {
                at: t0.duration_since(sh.started),
                latency,
                ok: result.is_ok(),
            });
        }
        match result {
            Ok(line) => {
                stats.ok += 1;
                sh.ok.fetch_add(1, Ordering::Relaxed);
                stats.max_latency = stats.max_latency.max(latency);
                *stats.bodies.entry(line).or_insert(0) += 1;
            }
            Err(Fail::Aborted) => break,
            Err(Fail::Msg(what)) => {
                conn = None;
                stats.failed += 1;
                sh.failed.fetch_add(1, Ordering::Relaxed);
                stats.max_latency = stats.max_latency.max(latency);
                if stats.failures.len() < MAX_FAILURES {
                    let at = t0.duration_since(sh.started);
                    stats.failures.push((
                        at,
                        format!(
                            "t={:.3}s {target}: {what} (after {:.3}s)",
                            at.as_secs_f64(),
                            latency.as_secs_f64()
                        ),
                    ));
                }
            }
        }
        pause(sh);
    }
    stats
}

fn pause(sh: &Shared) {
    let end = Instant::now() + sh.pause;
    loop {
        let now = Instant::now();
        if now >= end || sh.stop.load(Ordering::Relaxed) {
            return;
        }
        thread::sleep((end - now).min(POLL));
    }
}

/// Connects, retrying in short slices so that stop is noticed promptly.
fn connect(sh: &Shared, target: SocketAddr, deadline: Instant) -> Result<TcpStream, Fail> {
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return Err(Fail::Aborted);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Fail::Msg("connect: timed out".into()));
        }
        let slice = (deadline - now).min(Duration::from_millis(250));
        match TcpStream::connect_timeout(&target, slice) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {}
            Err(e) => return Err(Fail::Msg(format!("connect: {e}"))),
        }
    }
}

/// Sends one request and reads its response; returns the body's first line.
fn request(
    sh: &Shared,
    slot: &mut Option<Conn>,
    target: SocketAddr,
    req: &[u8],
    deadline: Instant,
) -> Result<String, Fail> {
    if slot.is_none() {
        let stream = connect(sh, target, deadline)?;
        *slot = Some(Conn {
            stream,
            buf: Vec::new(),
            reused: false,
        });
    }
    let conn = slot.as_mut().expect("connection just set");
    let on = if conn.reused {
        " on reused connection"
    } else {
        ""
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let _ = conn
        .stream
        .set_write_timeout(Some(remaining.max(Duration::from_millis(1))));
    if let Err(e) = conn.stream.write_all(req) {
        return Err(Fail::Msg(format!("write{on}: {e}")));
    }
    let resp = read_response(sh, conn, deadline).map_err(|f| match f {
        Fail::Msg(m) => Fail::Msg(format!("{m}{on}")),
        a => a,
    })?;
    conn.reused = true;
    if resp.close || !sh.keep_alive {
        *slot = None;
    }
    if !(200..300).contains(&resp.status) {
        return Err(Fail::Msg(format!(
            "HTTP {}: {}",
            resp.status,
            first_line(&resp.body)
        )));
    }
    Ok(first_line(&resp.body))
}

fn first_line(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end])
        .trim()
        .chars()
        .take(80)
        .collect()
}

struct Response {
    status: u16,
    close: bool,
    body: Vec<u8>,
}

impl Conn {
    /// Reads more bytes into `buf`; Ok(0) at EOF.
    fn fill(&mut self, sh: &Shared, deadline: Instant, what: &str) -> Result<usize, Fail> {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            if sh.stop.load(Ordering::Relaxed) {
                return Err(Fail::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Fail::Msg(format!("timed out reading {what}")));
            }
            let _ = self
                .stream
                .set_read_timeout(Some((deadline - now).min(POLL)));
            match self.stream.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Fail::Msg(format!("read {what}: {e}"))),
            }
        }
    }

    /// Takes one CRLF-terminated line (without CRLF).
    fn line(&mut self, sh: &Shared, deadline: Instant, what: &str) -> Result<Vec<u8>, Fail> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..p].to_vec();
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Fail::Msg(format!("{what}: line too long")));
            }
            if self.fill(sh, deadline, what)? == 0 {
                return Err(Fail::Msg(format!("connection closed in {what}")));
            }
        }
    }

    /// Takes exactly `n` bytes.
    fn exact(&mut self, sh: &Shared, deadline: Instant, n: usize) -> Result<Vec<u8>, Fail> {
        while self.buf.len() < n {
            if self.fill(sh, deadline, "body")? == 0 {
                return Err(Fail::Msg(format!(
                    "short body: got {} of {n} bytes",
                    self.buf.len()
                )));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }
}

fn read_response(sh: &Shared, conn: &mut Conn, deadline: Instant) -> Result<Response, Fail> {
    // Head.
    let head_end = loop {
        if let Some(p) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(Fail::Msg("response head too large".into()));
        }
        if conn.fill(sh, deadline, "response head")? == 0 {
            return Err(Fail::Msg(if conn.buf.is_empty() {
                "connection closed before response".to_string()
            } else {
                "connection closed in response head".to_string()
            }));
        }
    };
    let head = String::from_utf8_lossy(&conn.buf[..head_end]).to_string();
    conn.buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = match (version.starts_with("HTTP/1."), parts.next()) {
        (true, Some(code)) => code
            .parse()
            .map_err(|_| Fail::Msg(format!("bad status line {status_line:?}")))?,
        _ => return Err(Fail::Msg(format!("bad status line {status_line:?}"))),
    };
    let mut close = version == "HTTP/1.0";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                let n = value
                    .parse::<usize>()
                    .map_err(|_| Fail::Msg(format!("bad Content-Length {value:?}")))?;
                if n > MAX_BODY {
                    return Err(Fail::Msg(format!("body too large ({n} bytes)")));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    close = true;
                } else if v.contains("keep-alive") {
                    close = false;
                }
            }
            _ => {}
        }
    }
    if (100..200).contains(&status) {
        // Interim response (e.g. 100 Continue): read the real one.
        return read_response(sh, conn, deadline);
    }
    let body = if status == 204 || status == 304 {
        Vec::new()
    } else if chunked {
        read_chunked(sh, conn, deadline)?
    } else if let Some(n) = length {
        conn.exact(sh, deadline, n)?
    } else {
        // Close-delimited.
        close = true;
        while conn.fill(sh, deadline, "body")? > 0 {
            if conn.buf.len() > MAX_BODY {
                return Err(Fail::Msg("body too large".into()));
            }
        }
        std::mem::take(&mut conn.buf)
    };
    Ok(Response {
        status,
        close,
        body,
    })
}

fn read_chunked(sh: &Shared, conn: &mut Conn, deadline: Instant) -> Result<Vec<u8>, Fail> {
    let mut body = Vec::new();
    loop {
        let line = conn.line(sh, deadline, "chunk size")?;
        let text = String::from_utf8_lossy(&line);
        let hex = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| Fail::Msg(format!("bad chunk size {hex:?}")))?;
        if size == 0 {
            // Trailers until an empty line.
            while !conn.line(sh, deadline, "chunk trailer")?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(Fail::Msg("body too large".into()));
        }
        body.extend(conn.exact(sh, deadline, size)?);
        if !conn.line(sh, deadline, "chunk end")?.is_empty() {
            return Err(Fail::Msg("chunk not followed by CRLF".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// Serves the canned responses in turn, one per request (HTTP/1.1,
    /// several requests per connection), on a loopback port.
    fn serve(responses: Vec<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let mut n = 0usize;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                'conn: loop {
                    // Read one request head.
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break 'conn,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let resp = responses[n % responses.len()];
                    n += 1;
                    if out.write_all(resp.as_bytes()).is_err() {
                        break;
                    }
                    if resp.contains("Connection: close") {
                        break;
                    }
                }
            }
        });
        addr
    }

    fn run(responses: Vec<&'static str>, keep_alive: bool, requests: u64) -> LoadReport {
        let addr = serve(responses);
        let load = Load::start(LoadOptions {
            workers_per_target: 1,
            keep_alive,
            timeout: Duration::from_millis(500),
            ..LoadOptions::new(vec![addr])
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.ok_so_far() + load.failed_so_far() < requests && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        load.stop()
    }

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let report = run(
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello\nworld\n",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n7;x=y\r\nnked\nxx\r\n0\r\nTrailer: 1\r\n\r\n",
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n  closed body  \nmore",
            ],
            true,
            30,
        );
        report.assert_no_failures();
        assert!(report.ok >= 30, "{report}");
        for body in ["hello", "chunked", "closed body"] {
            assert!(report.bodies.contains_key(body), "{report}");
        }
    }

    #[test]
    fn counts_bad_status_and_short_bodies() {
        let report = run(
            vec![
                "HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort",
            ],
            false,
            10,
        );
        assert_eq!(report.ok, 0, "{report}");
        assert!(report.failed >= 10, "{report}");
        assert!(
            report.failures.iter().any(|f| f.contains("HTTP 503: busy")),
            "{report:?}"
        );
        assert!(
            report
                .failures
                .iter()
                .any(|f| f.contains("short body: got 5 of 10")),
            "{report:?}"
        );
    }

    #[test]
    fn error_on_reused_connection_is_a_failure() {
        // Answers the first request, then closes without answering the
        // second one although it did not announce `Connection: close`.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                let read_head = |reader: &mut std::io::BufReader<TcpStream>| {
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                };
                read_head(&mut reader);
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                read_head(&mut reader);
                thread::sleep(Duration::from_millis(20));
            }
        });
        let load = Load::start(LoadOptions {
            workers_per_target: 1,
            ..LoadOptions::new(vec![addr])
        });
        thread::sleep(Duration::from_millis(300));
        let report = load.stop();
        assert!(report.ok > 0, "{report}");
        assert!(report.failed > 0, "{report}");
        assert!(
            report.failures[0].contains("on reused connection"),
            "{report:?}"
        );
    }

    #[test]
    fn the_ledger_holds_every_counted_request() {
        let addr = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
            "HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy\n",
        ]);
        let load = Load::start(LoadOptions {
            workers_per_target: 2,
            record: true,
            ..LoadOptions::new(vec![addr])
        });
        assert!(load.wait_for_ok(20, Duration::from_secs(10)));
        let started = load.started();
        let report = load.stop();
        assert!(started.elapsed() >= report.elapsed);
        assert_eq!(
            report.samples.len() as u64,
            report.ok + report.failed,
            "{report}"
        );
        let ok = report.samples.iter().filter(|s| s.ok).count() as u64;
        assert_eq!(ok, report.ok);
        assert!(report.samples.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(report
            .samples
            .iter()
            .all(|s| s.latency <= report.max_latency && s.end() >= s.at));
        let unrecorded = run(
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            true,
            5,
        );
        assert!(unrecorded.ok >= 5 && unrecorded.samples.is_empty());
    }

    #[test]
    fn refused_connections_fail_and_stop_is_prompt() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let load = Load::start(LoadOptions::new(vec![addr]));
        thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let report = load.stop();
        assert!(t.elapsed() < Duration::from_millis(300));
        assert_eq!(report.ok, 0);
        assert!(report.failed > 0);
        assert!(report.failures[0].contains("connect:"), "{report:?}");
    }
}

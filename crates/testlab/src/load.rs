//! An HTTP/1.1 load generator (tokio + hyper) that counts every failed request while a
//! deploy happens, keeps a ledger of every outcome if asked ([`LoadOptions::record`]) and an
//! HDR histogram of latencies ([`LoadReport::histogram`]). The integration tests and the
//! benchmarks (`crates/bench`) both use it.
//!
//! `workers_per_target` tasks per target each send `GET path` in a loop, either over one
//! reused keep-alive connection or over a fresh connection (with `Connection: close`) per
//! request. A request succeeds when a 2xx response arrives with its complete body. Everything
//! else is a failure: connect error, send/receive error, timeout (connect included), non-2xx
//! status, short body. With keep-alive, a response that announces `Connection: close` (or is
//! HTTP/1.0) makes the worker reconnect for the next request, which is not a failure; an error
//! on a reused connection is one, even when the server closed it while it was idle. When the
//! load stops, a request in flight is abandoned and not counted, unless it had already waited
//! 2 s: that one is a failure a user would have seen.
//!
//! Each connection's driver is a task of its own, always polled: a driver polled only while a
//! request is on its way can miss a server closing an idle keep-alive connection (a proxy
//! reloading does that) and leave its worker waiting for ever.
//!
//! The tasks run on their own tokio runtime in one background thread (`current_thread`) or,
//! with [`LoadOptions::threads`] > 1, a multi-thread runtime; the caller's API is blocking.

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request, Version};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Workers give up on their own after this long, whatever happens.
const SAFETY_DEADLINE: Duration = Duration::from_secs(600);
/// How many failure descriptions a report keeps.
const MAX_FAILURES: usize = 50;
/// A request still unanswered this long when the load stops counts as failed (shorter ones
/// are just cut off by the stop and not counted).
const STUCK_AT_STOP: Duration = Duration::from_secs(2);
/// The histograms' range: 1 µs to 10 minutes (larger values are clamped), 3 significant digits.
const HIST_MAX_US: u64 = 600_000_000;

/// Options for [`Load::start`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Servers to hit; each gets `workers_per_target` workers.
    pub targets: Vec<SocketAddr>,
    /// Request path, e.g. `/` (default).
    pub path: String,
    /// `Host` header; default: the target's `ip:port`.
    pub host_header: Option<String>,
    /// Workers per target (default 2).
    pub workers_per_target: usize,
    /// Reuse one connection per worker (default true) or open a fresh connection (with
    /// `Connection: close`) for every request.
    pub keep_alive: bool,
    /// Per-request timeout, connect and body included (default 5 s).
    pub timeout: Duration,
    /// Pause between requests of one worker (default 2 ms).
    pub pause: Duration,
    /// Keep a ledger of every request in [`LoadReport::samples`] (default false).
    pub record: bool,
    /// Runtime threads: 1 (default) runs every worker on one `current_thread` runtime.
    pub threads: usize,
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
            threads: 1,
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
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Successful requests (2xx, complete body).
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// The first 50 failures in time order: `"t=1.234s 10.201.1.2:80: what (after 0.012s)"`.
    pub failures: Vec<String>,
    /// Slowest request (successful or failed, connect time included).
    pub max_latency: Duration,
    /// First line of each successful body (trimmed, at most 80 chars) -> how many responses
    /// had it.
    pub bodies: BTreeMap<String, u64>,
    /// Time from start to stop.
    pub elapsed: Duration,
    /// Every counted request in start order, if [`LoadOptions::record`] was set (empty
    /// otherwise). Requests cut off by `stop` are not counted and not in it, unless they had
    /// waited 2 s or more: those are failures.
    pub samples: Vec<RequestSample>,
    /// Latencies in microseconds of every counted request (kept whether or not `record` is);
    /// also [`LoadReport::histogram`].
    pub all_us: Histogram<u64>,
    /// Latencies in microseconds of the successful requests; also
    /// [`LoadReport::ok_histogram`].
    pub ok_us: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

impl Default for LoadReport {
    fn default() -> Self {
        LoadReport {
            ok: 0,
            failed: 0,
            failures: Vec::new(),
            max_latency: Duration::ZERO,
            bodies: BTreeMap::new(),
            elapsed: Duration::ZERO,
            samples: Vec::new(),
            all_us: new_histogram(),
            ok_us: new_histogram(),
        }
    }
}

/// One request of the ledger ([`LoadOptions::record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSample {
    /// When the request started (before connecting, if it had to), since [`Load::started`].
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
    /// Latencies (microseconds) of every counted request, successful or failed.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.all_us
    }

    /// Latencies (microseconds) of the successful requests.
    pub fn ok_histogram(&self) -> &Histogram<u64> {
        &self.ok_us
    }

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

/// A running load; call [`Load::stop`] to get the report. Dropping it without `stop` also
/// stops the workers and joins their thread.
pub struct Load {
    stop: watch::Sender<bool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<Vec<WorkerStats>>>,
}

/// Per-worker results, merged on stop.
struct WorkerStats {
    ok: u64,
    failed: u64,
    failures: Vec<(Duration, String)>,
    max_latency: Duration,
    bodies: BTreeMap<String, u64>,
    samples: Vec<RequestSample>,
    all_us: Histogram<u64>,
    ok_us: Histogram<u64>,
}

impl WorkerStats {
    fn new() -> Self {
        WorkerStats {
            ok: 0,
            failed: 0,
            failures: Vec::new(),
            max_latency: Duration::ZERO,
            bodies: BTreeMap::new(),
            samples: Vec::new(),
            all_us: new_histogram(),
            ok_us: new_histogram(),
        }
    }
}

/// Shared, read-only worker configuration.
struct Shared {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    timeout: Duration,
    pause: Duration,
    keep_alive: bool,
    record: bool,
    path: String,
}

impl Load {
    /// Starts the workers. Panics if there are no targets or no workers, or if the runtime
    /// cannot be built.
    pub fn start(opts: LoadOptions) -> Load {
        assert!(!opts.targets.is_empty(), "testlab: Load needs targets");
        assert!(
            opts.workers_per_target > 0,
            "testlab: workers_per_target must be > 0"
        );
        let runtime = if opts.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(opts.threads)
                .thread_name("testlab-load")
                .enable_all()
                .build()
        }
        .expect("testlab: cannot build a tokio runtime");
        let started = Instant::now();
        let (stop, stop_rx) = watch::channel(false);
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            ok: ok.clone(),
            failed: failed.clone(),
            started,
            timeout: opts.timeout,
            pause: opts.pause,
            keep_alive: opts.keep_alive,
            record: opts.record,
            path: opts.path.clone(),
        });
        let jobs: Vec<(SocketAddr, String)> = opts
            .targets
            .iter()
            .flat_map(|&t| {
                let host = opts.host_header.clone().unwrap_or_else(|| t.to_string());
                std::iter::repeat_n((t, host), opts.workers_per_target)
            })
            .collect();
        let thread = thread::Builder::new()
            .name("testlab-load".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let tasks: Vec<_> = jobs
                        .into_iter()
                        .map(|(target, host)| {
                            tokio::spawn(worker(shared.clone(), target, host, stop_rx.clone()))
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        match t.await {
                            Ok(s) => out.push(s),
                            Err(e) => panic!("testlab: a worker failed: {e}"),
                        }
                    }
                    out
                })
            })
            .expect("testlab: cannot spawn the load thread");
        Load {
            stop,
            ok,
            failed,
            started,
            thread: Some(thread),
        }
    }

    /// When the load started: the origin of [`RequestSample::at`] and of the failures' `t=`.
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

    /// Stops the workers (promptly: in-flight requests are abandoned, counted as failed only
    /// if stuck for 2 s) and returns the report.
    pub fn stop(mut self) -> LoadReport {
        let _ = self.stop.send(true);
        let elapsed = self.started.elapsed();
        let stats = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(s)) => s,
            Some(Err(_)) => panic!("testlab: the load thread panicked"),
            None => Vec::new(),
        };
        let mut report = LoadReport {
            elapsed,
            ..LoadReport::default()
        };
        let mut failures = Vec::new();
        for s in stats {
            report.ok += s.ok;
            report.failed += s.failed;
            report.max_latency = report.max_latency.max(s.max_latency);
            for (k, v) in s.bodies {
                *report.bodies.entry(k).or_insert(0) += v;
            }
            failures.extend(s.failures);
            report.samples.extend(s.samples);
            // Same bounds on both sides: `add` cannot fail.
            let _ = report.all_us.add(&s.all_us);
            let _ = report.ok_us.add(&s.ok_us);
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
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One open connection: its sender, the task that drives it (reads and writes its socket,
/// aborted, so the socket closed, when the connection is dropped), and whether it already
/// completed a request. The driver runs as a task of its own, always polled, so that a
/// server closing an idle connection is seen at once, as hyper expects: a driver polled only
/// while a request is on its way can miss that end and wait for ever.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    reused: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A finished request: the body's first line, or a counted failure.
type Outcome = Result<String, String>;

async fn worker(
    sh: Arc<Shared>,
    target: SocketAddr,
    host: String,
    mut stop: watch::Receiver<bool>,
) -> WorkerStats {
    let mut stats = WorkerStats::new();
    let mut conn: Option<Conn> = None;
    loop {
        if *stop.borrow() || sh.started.elapsed() > SAFETY_DEADLINE {
            break;
        }
        let t0 = Instant::now();
        let mut stopping = false;
        let result = tokio::select! {
            biased;
            _ = stop.changed() => {
                // A request cut short by the stop is not counted, unless it had already
                // waited so long that it was stuck: that one is a failure a user would see.
                let waited = t0.elapsed();
                if waited < STUCK_AT_STOP {
                    break;
                }
                stopping = true;
                Err(format!(
                    "still unanswered after {:.3}s when the load stopped",
                    waited.as_secs_f64()
                ))
            }
            r = tokio::time::timeout(sh.timeout, request(&sh, &mut conn, target, &host)) => {
                r.unwrap_or_else(|_| {
                    Err(format!("timed out after {:.3}s", sh.timeout.as_secs_f64()))
                })
            }
        };
        let latency = t0.elapsed();
        let at = t0.duration_since(sh.started);
        if sh.record {
            stats.samples.push(RequestSample {
                at,
                latency,
                ok: result.is_ok(),
            });
        }
        stats.max_latency = stats.max_latency.max(latency);
        let us = (latency.as_micros() as u64).clamp(1, HIST_MAX_US);
        stats.all_us.saturating_record(us);
        match result {
            Ok(line) => {
                stats.ok += 1;
                sh.ok.fetch_add(1, Ordering::Relaxed);
                stats.ok_us.saturating_record(us);
                *stats.bodies.entry(line).or_insert(0) += 1;
            }
            Err(what) => {
                conn = None;
                stats.failed += 1;
                sh.failed.fetch_add(1, Ordering::Relaxed);
                if stats.failures.len() < MAX_FAILURES {
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
        if stopping {
            break;
        }
        if !sh.pause.is_zero() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep(sh.pause) => {}
            }
        }
    }
    stats
}

/// Opens a connection.
async fn connect(target: SocketAddr) -> Result<Conn, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(Conn {
        sender,
        driver: tokio::spawn(async move {
            let _ = driver.await;
        }),
        reused: false,
    })
}

/// Sends one request (connecting first if there is no connection) and reads the whole
/// response; the body's first line on success.
async fn request(sh: &Shared, slot: &mut Option<Conn>, target: SocketAddr, host: &str) -> Outcome {
    if slot.is_none() {
        *slot = Some(connect(target).await?);
    }
    let conn = slot.as_mut().expect("connection just set");
    let on = if conn.reused {
        " on reused connection"
    } else {
        ""
    };
    let mut req = Request::get(sh.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "testlab-load")
        .header(header::ACCEPT, "*/*");
    if !sh.keep_alive {
        req = req.header(header::CONNECTION, "close");
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let sender = &mut conn.sender;
    let exchange = async move {
        // A connection the server closed while idle fails here, like a write would.
        sender.ready().await.map_err(|e| format!("send{on}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("response{on}: {e}"))?;
        let status = resp.status();
        let close = resp.version() == Version::HTTP_10
            || resp.headers().get_all(header::CONNECTION).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("close"))
            });
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body{on}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, close, body))
    };
    let result = exchange.await;
    if result.is_err() || slot.as_ref().is_some_and(|c| c.sender.is_closed()) {
        *slot = None;
    }
    let (status, close, body) = result?;
    if let Some(c) = slot.as_mut() {
        c.reused = true;
    }
    if close || !sh.keep_alive {
        *slot = None;
    }
    if !status.is_success() {
        return Err(format!("HTTP {}: {}", status.as_u16(), first_line(&body)));
    }
    Ok(first_line(&body))
}

fn first_line(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end])
        .trim()
        .chars()
        .take(80)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A hyper server on a loopback port in its own thread, answering every request with
    /// `respond(n)` (n counts requests from 0) after `delay`; counts accepted connections.
    struct Server {
        addr: SocketAddr,
        connections: Arc<AtomicU64>,
    }

    fn serve(delay: Duration, respond: fn(u64) -> (u16, &'static str)) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let conns = connections.clone();
        let count = Arc::new(AtomicU64::new(0));
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    conns.fetch_add(1, Ordering::Relaxed);
                    let count = count.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |_req| {
                            let n = count.fetch_add(1, Ordering::Relaxed);
                            async move {
                                tokio::time::sleep(delay).await;
                                let (status, body) = respond(n);
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Server { addr, connections }
    }

    fn run_until(load: &Load, requests: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.ok_so_far() + load.failed_so_far() < requests && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn keep_alive_reuses_one_connection_per_worker_and_records_a_ledger() {
        let server = serve(Duration::ZERO, |_| (200, "hello\nworld\n"));
        let load = Load::start(LoadOptions {
            workers_per_target: 2,
            record: true,
            ..LoadOptions::new(vec![server.addr])
        });
        assert!(load.wait_for_ok(200, Duration::from_secs(10)));
        let started = load.started();
        let report = load.stop();
        report.assert_no_failures();
        assert!(started.elapsed() >= report.elapsed);
        assert_eq!(server.connections.load(Ordering::Relaxed), 2, "{report}");
        assert_eq!(report.bodies.get("hello"), Some(&report.ok), "{report}");
        assert_eq!(report.samples.len() as u64, report.ok, "{report}");
        assert!(report.samples.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(report
            .samples
            .iter()
            .all(|s| s.ok && s.latency <= report.max_latency && s.end() >= s.at));
        assert_eq!(report.histogram().len(), report.ok);
        assert_eq!(report.ok_histogram().len(), report.ok);
        // The histogram's buckets are 0.1% wide: its max is the top of the slowest one.
        let h = report.histogram();
        assert!(h.lowest_equivalent(h.max()) <= report.max_latency.as_micros() as u64);
        assert!(h.max() >= report.max_latency.as_micros() as u64);
    }

    #[test]
    fn fresh_mode_opens_a_connection_per_request() {
        let server = serve(Duration::ZERO, |_| (200, "fresh"));
        let load = Load::start(LoadOptions {
            workers_per_target: 1,
            keep_alive: false,
            ..LoadOptions::new(vec![server.addr])
        });
        assert!(load.wait_for_ok(20, Duration::from_secs(10)));
        let report = load.stop();
        report.assert_no_failures();
        assert!(report.samples.is_empty(), "no ledger unless recorded");
        let conns = server.connections.load(Ordering::Relaxed);
        // The last connection may have been accepted for a request that stop abandoned.
        assert!(
            conns == report.ok || conns == report.ok + 1,
            "{conns} connections for {report}"
        );
    }

    #[test]
    fn a_500_counts_as_failed() {
        let server = serve(Duration::ZERO, |n| {
            if n % 2 == 0 {
                (200, "ok")
            } else {
                (500, "boom\n")
            }
        });
        let load = Load::start(LoadOptions {
            workers_per_target: 1,
            record: true,
            ..LoadOptions::new(vec![server.addr])
        });
        run_until(&load, 20);
        let report = load.stop();
        assert!(report.ok >= 10 && report.failed >= 10, "{report}");
        assert!(report.ok.abs_diff(report.failed) <= 1, "{report}");
        assert!(
            report.failures[0].contains("HTTP 500: boom"),
            "{:?}",
            report.failures
        );
        let failed = report.samples.iter().filter(|s| !s.ok).count() as u64;
        assert_eq!(failed, report.failed);
        assert_eq!(report.histogram().len(), report.ok + report.failed);
        assert_eq!(report.ok_histogram().len(), report.ok);
        // Only successful bodies are counted.
        assert_eq!(report.bodies.len(), 1, "{report}");
    }

    #[test]
    fn a_timeout_counts_as_failed() {
        let server = serve(Duration::from_millis(400), |_| (200, "slow"));
        let load = Load::start(LoadOptions {
            workers_per_target: 2,
            timeout: Duration::from_millis(100),
            ..LoadOptions::new(vec![server.addr])
        });
        run_until(&load, 4);
        let report = load.stop();
        assert_eq!(report.ok, 0, "{report}");
        assert!(report.failed >= 4, "{report}");
        assert!(report.failures[0].contains("timed out"), "{report:?}");
        assert!(report.max_latency < Duration::from_millis(300), "{report}");
    }

    /// A raw TCP server (tokio) that gives each connection to `handle`.
    fn raw_server<F, Fut>(handle: F) -> SocketAddr
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(handle(s));
                }
            });
        });
        addr
    }

    async fn read_head(s: &mut tokio::net::TcpStream) -> bool {
        let mut buf = Vec::new();
        let mut b = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
        true
    }

    #[test]
    fn short_bodies_and_errors_on_reused_connections_fail_but_announced_close_does_not() {
        // Per connection: answers the first request; then, on even connections, announces
        // nothing and closes without answering the second (a failure on a reused
        // connection); odd connections announce `Connection: close` on the first answer
        // and a third kind sends a short body.
        let n = Arc::new(Mutex::new(0u32));
        let addr = raw_server(move |mut s| {
            let k = {
                let mut g = n.lock().unwrap();
                *g += 1;
                *g
            };
            async move {
                if !read_head(&mut s).await {
                    return;
                }
                let first: &[u8] = match k % 3 {
                    0 => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
                    1 => {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nclose\n"
                    }
                    _ => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                };
                let _ = s.write_all(first).await;
                if k % 3 == 2 {
                    return; // short body: close mid-body
                }
                if k % 3 == 0 {
                    read_head(&mut s).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let load = Load::start(LoadOptions {
            workers_per_target: 1,
            ..LoadOptions::new(vec![addr])
        });
        run_until(&load, 60);
        let report = load.stop();
        assert!(report.ok >= 10 && report.failed >= 10, "{report}");
        let has = |what: &str| report.failures.iter().any(|f| f.contains(what));
        assert!(has("on reused connection"), "{:?}", report.failures);
        assert!(has("body"), "short body: {:?}", report.failures);
        assert!(report.bodies.contains_key("close"), "{report}");
        assert!(report.bodies.contains_key("ok"), "{report}");
        // Every three connections give two successes and two failures (the unanswered
        // second request, the short body); were the announced close counted too, there
        // would be three failures per two successes.
        assert!(report.failed <= report.ok + 2, "{report}");
    }

    #[test]
    fn length_chunked_and_close_delimited_bodies_give_their_first_line() {
        // Connection k answers with the (k % 3)-th response, then closes.
        let n = Arc::new(AtomicU64::new(0));
        let addr = raw_server(move |mut s| {
            let k = n.fetch_add(1, Ordering::Relaxed);
            async move {
                if !read_head(&mut s).await {
                    return;
                }
                let resp: &[u8] = match k % 3 {
                    0 => b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello\nworld\n",
                    1 => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nchu\r\n7;x=y\r\nnked\nxx\r\n0\r\nTrailer: 1\r\n\r\n",
                    _ => b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n  closed body  \nmore",
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            }
        });
        for keep_alive in [true, false] {
            let load = Load::start(LoadOptions {
                workers_per_target: 1,
                keep_alive,
                ..LoadOptions::new(vec![addr])
            });
            assert!(load.wait_for_ok(30, Duration::from_secs(10)));
            let report = load.stop();
            report.assert_no_failures();
            for body in ["hello", "chunked", "closed body"] {
                assert!(report.bodies.contains_key(body), "{report}");
            }
        }
    }

    #[test]
    fn refused_connections_fail_and_stop_is_prompt() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
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

    #[test]
    fn stop_abandons_requests_in_flight_without_counting_them() {
        let server = serve(Duration::from_secs(5), |_| (200, "late"));
        let load = Load::start(LoadOptions {
            workers_per_target: 3,
            threads: 2,
            record: true,
            ..LoadOptions::new(vec![server.addr])
        });
        thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let report = load.stop();
        assert!(t.elapsed() < Duration::from_millis(300));
        assert_eq!((report.ok, report.failed), (0, 0), "{report}");
        assert!(report.samples.is_empty());
    }

    #[test]
    fn a_server_closing_idle_keep_alive_connections_never_stalls_a_worker() {
        // Like a proxy reloading: each connection answers one request, then the server
        // closes it while it is idle (50 ms later). Every worker must notice (a failure or
        // a reconnect) and go on: none may wait for an answer that never comes.
        let addr = raw_server(|mut s| async move {
            if !read_head(&mut s).await {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.shutdown().await;
        });
        let load = Load::start(LoadOptions {
            workers_per_target: 2,
            keep_alive: true,
            pause: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
            record: true,
            ..LoadOptions::new(vec![addr])
        });
        thread::sleep(Duration::from_millis(1500));
        let report = load.stop();
        assert!(
            report.ok + report.failed >= 10,
            "workers kept going: {report}"
        );
    }

    #[test]
    fn a_request_stuck_when_the_load_stops_is_a_failure() {
        let server = serve(Duration::from_secs(60), |_| (200, "never in time"));
        let load = Load::start(LoadOptions {
            workers_per_target: 2,
            record: true,
            ..LoadOptions::new(vec![server.addr])
        });
        thread::sleep(STUCK_AT_STOP + Duration::from_millis(300));
        let report = load.stop();
        assert_eq!((report.ok, report.failed), (0, 2), "{report}");
        assert!(report
            .failures
            .iter()
            .any(|f| f.contains("still unanswered")));
    }
}

//! Test scaffolding for the proxy's integration tests: tiny hyper backends, a proxy on port 0
//! in its own runtime thread, a raw HTTP/1.1 client and a load generator that counts every
//! failed request. Everything here runs on loopback only and stops when dropped.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_proxy::{
    bind_control, control_request_blocking, serve, ControlError, DeployOptions, DeployReport,
    DeployRequest, ProxyConfig, Request, Response, StatusReport,
};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// A fresh directory under /tmp, world-traversable (the control-socket test connects as
/// `nobody`), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "cutover-proxy-test-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test backend: `/` answers its name, `/up` answers `up_status`, `/slow/<ms>` answers its
/// name after `ms` milliseconds, `/app` answers 500 if its name starts with `bad`, `/headers` answers the request headers, one per line.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// A healthy backend.
    pub fn start(name: &str) -> Backend {
        Backend::spawn(name, 200)
    }

    /// A backend whose `/up` answers 500.
    pub fn broken(name: &str) -> Backend {
        Backend::spawn(name, 500)
    }

    fn spawn(name: &str, up_status: u16) -> Backend {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let label = name.to_string();
        let thread = thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let serve = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                continue;
                            };
                            let label = label.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| {
                                    backend_answer(label.clone(), up_status, req)
                                });
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime closes every connection of this backend.
            })
            .unwrap();
        Backend {
            name: name.to_string(),
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Stops the backend: its port is closed and its connections are cut.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn backend_answer(
    name: String,
    up_status: u16,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let (status, body) = if path == "/up" {
        (up_status, format!("{name} up\n"))
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        (200, format!("{name}\n"))
    } else if let Some(code) = path.strip_prefix("/status/") {
        (code.parse().unwrap_or(500), format!("{name}\n"))
    } else if path == "/app" {
        // A release that passes its health gate but fails real requests: any backend named
        // "bad...".
        let code = if name.starts_with("bad") { 500 } else { 200 };
        (code, format!("{name}\n"))
    } else if path == "/echo" {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        match body {
            Ok(b) => (200, format!("{name}\n{}", String::from_utf8_lossy(&b))),
            Err(e) => (500, format!("{name}\nbody error {e}\n")),
        }
    } else if path == "/host" {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        (
            if host.starts_with("127.") { 403 } else { 200 },
            format!("{name}\n{host}\n"),
        )
    } else if path == "/headers" {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        (200, format!("{name}\n{}\n", lines.join("\n")))
    } else {
        (200, format!("{name}\n"))
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    Ok(resp)
}

/// A proxy serving on 127.0.0.1:0 in its own multi-threaded runtime.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub socket: PathBuf,
    pub state: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), cutover_proxy::Error>>>,
}

impl TestProxy {
    /// Starts a proxy whose socket and state file live in `dir`.
    pub fn start(dir: &Path) -> TestProxy {
        TestProxy::start_with(dir, cutover_proxy::Limits::default())
    }

    /// Starts a proxy with the given limits.
    pub fn start_with(dir: &Path, limits: cutover_proxy::Limits) -> TestProxy {
        TestProxy::start_configured(dir, move |c| c.limits = limits)
    }

    /// Starts a proxy whose config `configure` changes first.
    pub fn start_configured(
        dir: &Path,
        configure: impl FnOnce(&mut ProxyConfig) + Send + 'static,
    ) -> TestProxy {
        let socket = dir.join("proxy.sock");
        let state = dir.join("state.json");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (sock, st) = (socket.clone(), state.clone());
        let thread = thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let control = bind_control(&sock)?;
                    addr_tx.send(addr).unwrap();
                    let mut config = ProxyConfig::new(addr, sock, st);
                    configure(&mut config);
                    serve(config, listener, control, async {
                        let _ = stop_rx.await;
                    })
                    .await
                })
            })
            .unwrap();
        let addr = addr_rx.recv().expect("proxy did not start");
        TestProxy {
            addr,
            socket,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Stops the proxy and returns what `serve` returned.
    pub fn stop(mut self) -> Result<(), cutover_proxy::Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), cutover_proxy::Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("proxy thread panicked"),
            None => Ok(()),
        }
    }

    pub fn request(&self, req: &Request) -> Result<Response, ControlError> {
        control_request_blocking(&self.socket, req)
    }

    /// Deploys with fast gate settings (20 ms interval, 2 passes, give up after 3 s,
    /// drain 5 s).
    pub fn deploy(&self, service: &str, target: SocketAddr) -> Result<DeployReport, ControlError> {
        self.deploy_with(service, target, &[], fast())
    }

    pub fn deploy_with(
        &self,
        service: &str,
        target: SocketAddr,
        domains: &[&str],
        options: DeployOptions,
    ) -> Result<DeployReport, ControlError> {
        self.deploy_path(service, target, "/up", domains, options)
    }

    pub fn deploy_path(
        &self,
        service: &str,
        target: SocketAddr,
        health_path: &str,
        domains: &[&str],
        options: DeployOptions,
    ) -> Result<DeployReport, ControlError> {
        let req = Request::Deploy(DeployRequest {
            service: service.to_string(),
            target: target.to_string(),
            health_path: health_path.to_string(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            options,
        });
        match self.request(&req)? {
            Response::Deployed(r) => Ok(r),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    pub fn status(&self) -> StatusReport {
        match self.request(&Request::Status).unwrap() {
            Response::Status(s) => s,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Fast gate settings for tests.
pub fn fast() -> DeployOptions {
    DeployOptions {
        health_interval: Duration::from_millis(20),
        healthy_after: 2,
        give_up_after: Duration::from_secs(3),
        timeout: Duration::from_secs(1),
        drain: Duration::from_secs(5),
    }
}

/// One HTTP/1.1 response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub close: bool,
    pub body: String,
}

impl Reply {
    /// The body's first line.
    pub fn first_line(&self) -> &str {
        self.body.lines().next().unwrap_or("").trim()
    }
}

fn request_bytes(host: &str, path: &str, close: bool, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: proxy-test\r\n{extra}{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Sends one request on a fresh connection.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = Vec::new();
    send(
        &mut s,
        &mut buf,
        &request_bytes(host, path, true, ""),
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap()
}

/// Sends one request on a fresh connection, with extra header lines (each ending in CRLF).
pub fn get_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = Vec::new();
    send(
        &mut s,
        &mut buf,
        &request_bytes(host, path, true, extra),
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap()
}

/// Sends a POST with a body on a fresh connection.
pub fn post(addr: SocketAddr, host: &str, path: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = Vec::new();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    send(
        &mut s,
        &mut buf,
        req.as_bytes(),
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap()
}

/// A keep-alive client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Conn {
    pub fn open(addr: SocketAddr, host: &str) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
            host: host.to_string(),
        }
    }

    pub fn get(&mut self, path: &str) -> Result<Reply, String> {
        let req = request_bytes(&self.host, path, false, "");
        send(
            &mut self.stream,
            &mut self.buf,
            &req,
            Instant::now() + Duration::from_secs(20),
        )
    }

    /// Waits up to `limit` for the proxy to close this connection (EOF or reset, with
    /// nothing read before it); how long it took, or `None` if it stayed open.
    pub fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => Some(t.elapsed()),
            Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&b[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(_) => Some(t.elapsed()),
        }
    }
}

/// Writes a request and reads one response (Content-Length bodies only: that is what the
/// test backends and the proxy's own answers use; anything else is an error).
fn send(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    req: &[u8],
    deadline: Instant,
) -> Result<Reply, String> {
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        fill(s, buf, deadline, "response head")?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut close) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse::<usize>().ok(),
            "connection" => close = v.to_ascii_lowercase().contains("close"),
            "transfer-encoding" => return Err(format!("unexpected transfer-encoding {v}")),
            _ => {}
        }
    }
    let n = length.ok_or_else(|| format!("no content-length in {head:?}"))?;
    while buf.len() < n {
        fill(s, buf, deadline, "body")?;
    }
    let body = String::from_utf8_lossy(&buf[..n]).to_string();
    buf.drain(..n);
    Ok(Reply {
        status,
        close,
        body,
    })
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant, what: &str) -> Result<(), String> {
    let mut tmp = [0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("timed out reading {what}"));
        }
        s.set_read_timeout(Some(deadline - now)).ok();
        match s.read(&mut tmp) {
            Ok(0) => return Err(format!("connection closed in {what}")),
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return Ok(());
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("timed out reading {what}"))
            }
            Err(e) => return Err(format!("read {what}: {e}")),
        }
    }
}

/// Load options.
#[derive(Clone)]
pub struct LoadOpts {
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub workers: usize,
    /// One reused connection per worker, or a fresh connection (Connection: close) per request.
    pub keep_alive: bool,
    /// Per-request timeout, connect included.
    pub timeout: Duration,
    /// Sleep between two requests of a worker.
    pub pause: Duration,
}

impl LoadOpts {
    pub fn new(target: SocketAddr, keep_alive: bool) -> LoadOpts {
        LoadOpts {
            target,
            host: "app.test".into(),
            path: "/".into(),
            workers: 3,
            keep_alive,
            timeout: Duration::from_secs(5),
            pause: Duration::from_millis(2),
        }
    }
}

/// What a load saw. A failure is an error, a timeout or a non-2xx answer.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    pub max_latency: Duration,
    /// Connections opened (with keep-alive: one per worker unless the proxy closed one).
    pub connects: u64,
    /// First body line -> count.
    pub bodies: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, {} failed, {} connections, max latency {:.1} ms in {:.2} s, bodies {:?}",
            self.ok,
            self.failed,
            self.connects,
            self.max_latency.as_secs_f64() * 1000.0,
            self.elapsed.as_secs_f64(),
            self.bodies
        )
    }
}

#[derive(Default)]
struct WorkerStats {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    max_latency: Duration,
    connects: u64,
    bodies: BTreeMap<String, u64>,
}

/// A running load; [`Load::stop`] lets each worker finish its current request and reports.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    started: Instant,
    workers: Vec<JoinHandle<WorkerStats>>,
}

/// Workers stop on their own after this long, whatever happens.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

impl Load {
    pub fn start(opts: LoadOpts) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let workers = (0..opts.workers)
            .map(|i| {
                let (stop, ok, opts) = (stop.clone(), ok.clone(), opts.clone());
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || worker(&opts, &stop, &ok, started))
                    .unwrap()
            })
            .collect();
        Load {
            stop,
            ok,
            started,
            workers,
        }
    }

    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded than now; false after `timeout`.
    pub fn wait_more(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok_so_far() + n;
        let deadline = Instant::now() + timeout;
        while self.ok_so_far() < target {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut r = LoadReport::default();
        for w in self.workers {
            let s = w.join().expect("load worker panicked");
            r.ok += s.ok;
            r.failed += s.failed;
            r.failures.extend(s.failures);
            r.max_latency = r.max_latency.max(s.max_latency);
            r.connects += s.connects;
            for (k, v) in s.bodies {
                *r.bodies.entry(k).or_default() += v;
            }
        }
        r.elapsed = self.started.elapsed();
        r
    }
}

fn worker(opts: &LoadOpts, stop: &AtomicBool, ok: &AtomicU64, started: Instant) -> WorkerStats {
    let mut st = WorkerStats::default();
    let req = request_bytes(&opts.host, &opts.path, !opts.keep_alive, "");
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_DEADLINE {
        let t0 = Instant::now();
        let deadline = t0 + opts.timeout;
        let result = (|| {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&opts.target, opts.timeout)
                    .map_err(|e| format!("connect: {e}"))?;
                s.set_nodelay(true).ok();
                st.connects += 1;
                conn = Some((s, Vec::new()));
            }
            let (s, buf) = conn.as_mut().expect("connection just set");
            let reply = send(s, buf, &req, deadline)?;
            if reply.close || !opts.keep_alive {
                conn = None;
            }
            if !(200..300).contains(&reply.status) {
                return Err(format!("HTTP {}: {}", reply.status, reply.first_line()));
            }
            Ok(reply.first_line().to_string())
        })();
        let latency = t0.elapsed();
        st.max_latency = st.max_latency.max(latency);
        match result {
            Ok(line) => {
                st.ok += 1;
                ok.fetch_add(1, Ordering::Relaxed);
                *st.bodies.entry(line).or_default() += 1;
            }
            Err(e) => {
                conn = None;
                st.failed += 1;
                if st.failures.len() < 20 {
                    st.failures.push(format!(
                        "t={:.3}s: {e} (after {:.1} ms)",
                        t0.duration_since(started).as_secs_f64(),
                        latency.as_secs_f64() * 1000.0
                    ));
                }
            }
        }
        thread::sleep(opts.pause);
    }
    st
}

/// Reads an HTTP/1.1 request head from `r` (a test app's side of a connection): its path and
/// its `Content-Length` (0 if none). `None`: the connection ended first.
pub fn read_head(r: &mut impl std::io::BufRead) -> Option<(String, u64)> {
    head(r).map(|(path, length, _)| (path, length))
}

/// [`read_head`], and whether the body is chunked.
fn head(r: &mut impl std::io::BufRead) -> Option<(String, u64, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let (mut length, mut chunked) = (0u64, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        if h == "\r\n" {
            return Some((path, length, chunked));
        }
        let h = h.to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        chunked |= h.starts_with("transfer-encoding:") && h.contains("chunked");
    }
}

/// Reads an HTTP/1.1 request from `r`: its path and its body (by `Content-Length`, or
/// chunked). `None`: the connection ended before the request did.
pub fn read_request(r: &mut impl std::io::BufRead) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let (path, length, chunked) = head(r)?;
    let mut body = Vec::new();
    if !chunked {
        r.take(length).read_to_end(&mut body).ok()?;
        return (body.len() as u64 == length).then_some((path, body));
    }
    loop {
        let mut size = String::new();
        r.read_line(&mut size).ok()?;
        let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk).ok()?;
        if n == 0 {
            return Some((path, body));
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

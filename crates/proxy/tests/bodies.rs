//! Large and broken bodies through the edge proxy, over real sockets on loopback: a 1 GiB
//! upload, a 1 GiB download to a slow client and 1 GiB from an upstream that sends it slowly
//! are streamed with flat memory, an upstream that closes or stalls mid-response ends that
//! response only, and a client that stops reading is disconnected while a slow one is not.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::{get, TempDir, TestProxy};

const GIB: u64 = 1 << 30;
/// How long `/slow` stops between two quarters of its body: longer than the limits the test of
/// it sets for the response head and for idle connections.
const SLOW_PAUSE: Duration = Duration::from_millis(1500);
/// How long `/stall` stops in the middle of its body.
const STALL: Duration = Duration::from_secs(4);

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Samples the RSS every 50 ms until dropped; reports the peak.
struct Peak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
}

impl Peak {
    fn start() -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let (s, p) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        });
        Peak { stop, peak }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A raw backend: `/up` answers 200; `/sink` reads a Content-Length body and answers how many
/// bytes it got; `/source` answers 1 GiB of zeros; `/slow` answers 1 GiB of zeros, stopping for
/// [`SLOW_PAUSE`] after each quarter but the last; `/cut` promises 1,000 bytes, sends 10 and
/// closes; `/stall` promises 20 bytes, sends 10, stops for [`STALL`] and sends the rest.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s));
        }
    });
    addr
}

fn serve(s: TcpStream) {
    let mut r = BufReader::with_capacity(64 * 1024, s.try_clone().unwrap());
    let mut w = s;
    loop {
        let Some((path, length)) = support::read_head(&mut r) else {
            return;
        };
        let mut body = (&mut r).take(length);
        let got = std::io::copy(&mut body, &mut std::io::sink()).unwrap_or(0);
        match path.as_str() {
            "/source" | "/slow" => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {GIB}\r\n\r\n");
                if w.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![0u8; 64 * 1024];
                let chunks = GIB / chunk.len() as u64;
                for i in 1..=chunks {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                    if path == "/slow" && i % (chunks / 4) == 0 && i < chunks {
                        thread::sleep(SLOW_PAUSE);
                    }
                }
            }
            "/stall" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n0123456789");
                thread::sleep(STALL);
                if w.write_all(b"abcdefghij").is_err() {
                    return;
                }
            }
            "/cut" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789");
                return;
            }
            _ => {
                let text = format!("{got}\n");
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", text.len());
                if w.write_all(head.as_bytes())
                    .and_then(|()| w.write_all(text.as_bytes()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// A proxy in `dir` with `app.test` routed to a new [`backend`], allowing the upstream a pause
/// of 1 s mid-body (`upstream_body_timeout`).
fn impatient_proxy(dir: &TempDir) -> TestProxy {
    let proxy = TestProxy::start_with(
        dir.path(),
        cutover_proxy::Limits {
            upstream_body_timeout: Duration::from_secs(1),
            ..cutover_proxy::Limits::default()
        },
    );
    proxy.deploy("app", backend()).unwrap();
    proxy
}

#[test]
fn a_1_gib_upload_is_streamed_with_flat_memory() {
    let dir = TempDir::new("upload");
    let app = backend();
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", app).unwrap();
    let before = rss_kib();
    let peak = Peak::start();
    let t = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.write_all(
        format!("POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..GIB / chunk.len() as u64 {
        s.write_all(&chunk).unwrap();
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let took = t.elapsed();
    let peak = peak.peak();
    println!(
        "1 GiB upload in {took:?}; RSS {before} KiB before, peak {peak} KiB: {:?}",
        answer.lines().last()
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&format!("\r\n\r\n{GIB}\n")), "{answer}");
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} to {peak} KiB"
    );
    assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
}

#[test]
fn a_1_gib_download_to_a_slow_client_is_streamed_with_flat_memory() {
    let dir = TempDir::new("download");
    // The client's own stall (3 s) is longer than the upstream's allowance: a body the client
    // does not ask for is not the upstream pausing.
    let proxy = impatient_proxy(&dir);
    let before = rss_kib();
    let peak = Peak::start();
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.write_all(b"GET /source HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Read 1 MiB, then stall 3 s while the app could send far more than that.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < 1 << 20 {
        total += s.read(&mut buf).unwrap() as u64;
    }
    thread::sleep(Duration::from_secs(3));
    let stalled = rss_kib();
    // A normal client meanwhile.
    assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => total += n as u64,
        }
    }
    let peak = peak.peak();
    println!(
        "1 GiB download: RSS {before} KiB before, {stalled} KiB with the client stalled, peak {peak} KiB; {total} bytes"
    );
    assert!(total > GIB && total < GIB + 1024, "{total}");
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} to {peak} KiB"
    );
}

#[test]
fn an_upstream_that_sends_1_gib_slowly_is_streamed_past_the_head_and_idle_timeouts() {
    let dir = TempDir::new("slow");
    let app = backend();
    // Each pause of the upstream is longer than both: the response head's deadline and the
    // idle timeout must not cut a response whose head has come and whose body is coming.
    let proxy = TestProxy::start_with(
        dir.path(),
        cutover_proxy::Limits {
            upstream_header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            // Above each pause, below their sum: pauses are timed one by one.
            upstream_body_timeout: Duration::from_secs(3),
            ..cutover_proxy::Limits::default()
        },
    );
    proxy.deploy("app", app).unwrap();
    let before = rss_kib();
    let peak = Peak::start();
    let t = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut others = 0;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => total += n as u64,
        }
        // Once past each quarter (the upstream is pausing or about to), a normal client.
        if total > (others + 1) * (GIB / 4) && others < 3 {
            assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
            others += 1;
        }
    }
    let took = t.elapsed();
    let peak = peak.peak();
    println!(
        "1 GiB sent slowly: {total} bytes in {took:?}, RSS {before} KiB before, peak {peak} KiB; {others} other requests answered"
    );
    assert!(total > GIB && total < GIB + 1024, "{total}");
    assert!(
        took >= SLOW_PAUSE * 3,
        "the upstream did not pause: {took:?}"
    );
    assert_eq!(others, 3);
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} to {peak} KiB"
    );
}

#[test]
fn an_upstream_that_closes_mid_response_ends_that_response_only() {
    let dir = TempDir::new("cut");
    let app = backend();
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", app).unwrap();
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let r = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    println!("cut response: {r:?} {text:?}");
    // The client sees the head and the 10 bytes, then the connection closes: it can tell the
    // body is short of its Content-Length (never a complete-looking response).
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n0123456789"), "{text}");
    assert!(r.is_ok(), "closed, not hung: {r:?}");
    for _ in 0..5 {
        assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
    }
}

#[test]
fn an_upstream_that_stalls_mid_response_has_it_cut_at_the_body_timeout() {
    let dir = TempDir::new("stall");
    let proxy = impatient_proxy(&dir);
    // A request without a body and one with a body take different paths to the upstream.
    for request in [
        "GET /stall HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "POST /stall HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello",
    ] {
        let t = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&got);
        println!("stalled response: {r:?} after {took:?}: {text:?}");
        // The head and the first 10 bytes, then the connection closes: short of the length,
        // before the upstream would have gone on.
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("\r\n\r\n0123456789"), "{text}");
        assert!(r.is_ok(), "closed, not hung: {r:?}");
        assert!(
            took >= Duration::from_secs(1) && took < STALL,
            "cut after {took:?}"
        );
        assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
    }
}

#[test]
fn a_client_that_stops_reading_is_disconnected_at_the_send_timeout_and_a_slow_one_is_not() {
    let dir = TempDir::new("send");
    let proxy = TestProxy::start_with(
        dir.path(),
        cutover_proxy::Limits {
            send_timeout: Duration::from_secs(2),
            ..cutover_proxy::Limits::default()
        },
    );
    proxy.deploy("app", backend()).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let download = || {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /source HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        s
    };
    // Slow: at most 256 KiB every 100 ms for 4 s, far less than the proxy could send; then
    // the rest at once. (The kernel tells the proxy it may write again only once about a third
    // of its 4 MiB send buffer is free: a reader must take that much within the timeout.)
    let mut s = download();
    let mut total = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        total += s.read(&mut buf).unwrap() as u64;
        thread::sleep(Duration::from_millis(100));
    }
    println!("slow reader: {total} bytes in {:?}", t.elapsed());
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => total += n as u64,
        }
    }
    println!("slow reader, then fast: {total} bytes");
    assert!(total > GIB && total < GIB + 1024, "{total}");

    // Stopped: 1 MiB read, then nothing for 5 s.
    let mut s = download();
    let mut total = 0u64;
    while total < 1 << 20 {
        total += s.read(&mut buf).unwrap() as u64;
    }
    assert_eq!(proxy.status().services[0].in_flight, 1);
    thread::sleep(Duration::from_secs(5));
    // The app's connection was let go, and a normal client is served.
    assert_eq!(proxy.status().services[0].in_flight, 0);
    assert_eq!(get(proxy.addr, "app.test", "/").status, 200);
    // What was in the sockets' buffers, then the end: far short of the body.
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "closed".to_string(),
            Ok(n) => total += n as u64,
            Err(e) => break e.to_string(),
        }
    };
    println!("stopped reader: {total} bytes, then {end}");
    assert!(total < GIB / 4, "{total}");
    assert!(
        end == "closed" || end.contains("reset"),
        "ended by {end}, not by the proxy"
    );
}

//! The edge proxy end to end, over real sockets on loopback: switches under load, the health
//! gate, drain, pause/resume, restart from the state file, routing and headers, the control
//! socket's access check, and which worker serves a connection on one CPU and on several.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cutover_proxy::{ControlError, DeployOptions, Request, Response};
use support::{fast, get, get_with, post, Backend, Conn, Load, LoadOpts, TempDir, TestProxy};

#[test]
fn twenty_switches_under_load_fail_no_request() {
    let dir = TempDir::new("switches");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();

    let keep_alive = Load::start(LoadOpts::new(proxy.addr, true));
    let fresh = Load::start(LoadOpts::new(proxy.addr, false));
    assert!(keep_alive.wait_more(50, Duration::from_secs(10)));
    assert!(fresh.wait_more(50, Duration::from_secs(10)));

    let started = Instant::now();
    let (mut max_gate, mut max_drain) = (0, 0);
    for i in 0..20 {
        let to = if i % 2 == 0 { &b } else { &a };
        let from = if i % 2 == 0 { &a } else { &b };
        let r = proxy.deploy("app", to.addr).unwrap();
        assert!(r.switched && r.drained, "{r:?}");
        assert_eq!(r.previous, Some(from.addr.to_string()));
        assert_eq!(r.in_flight_left, 0);
        max_gate = max_gate.max(r.health_ms);
        max_drain = max_drain.max(r.drain_ms);
        // Let both kinds of client see the new target before the next switch.
        assert!(keep_alive.wait_more(100, Duration::from_secs(10)));
        assert!(fresh.wait_more(100, Duration::from_secs(10)));
    }
    let switching = started.elapsed();
    let (ka, fr) = (keep_alive.stop(), fresh.stop());
    println!(
        "20 switches in {:.2} s (longest gate {max_gate} ms, longest drain {max_drain} ms)",
        switching.as_secs_f64()
    );
    println!("keep-alive clients: {ka}");
    println!("fresh-connection clients: {fr}");
    for (kind, r) in [("keep-alive", &ka), ("fresh", &fr)] {
        assert_eq!(r.failed, 0, "{kind}: {r}\n{}", r.failures.join("\n"));
        assert!(
            r.bodies.contains_key("a") && r.bodies.contains_key("b"),
            "{kind}: {r}"
        );
    }
    // The proxy never closed a keep-alive client connection: one connection per worker.
    assert_eq!(ka.connects, 3, "{ka}");
    let status = proxy.status();
    assert_eq!(status.services[0].target, a.addr.to_string());
    assert!(status.requests >= ka.ok + fr.ok, "{status:?}");
}

#[test]
fn unhealthy_target_changes_nothing() {
    let dir = TempDir::new("unhealthy");
    let a = Backend::start("a");
    let broken = Backend::broken("broken");
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    let state_before = std::fs::read_to_string(&proxy.state).unwrap();

    let quick = DeployOptions {
        give_up_after: Duration::from_millis(300),
        ..fast()
    };
    let t = Instant::now();
    let err = proxy
        .deploy_with("app", broken.addr, &[], quick.clone())
        .unwrap_err();
    let msg = err.to_string();
    println!("broken /up: {msg} ({} ms)", t.elapsed().as_millis());
    assert!(matches!(err, ControlError::Rejected(_)), "{err:?}");
    assert!(msg.contains("did not pass the health gate"), "{msg}");
    assert!(msg.contains("500"), "{msg}");

    // Nobody listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = proxy
        .deploy_with("app", closed, &[], quick)
        .unwrap_err()
        .to_string();
    println!("closed port: {err}");
    assert!(err.contains("did not pass the health gate"), "{err}");

    // Old keeps serving, nothing changed on disk or in the table.
    for _ in 0..5 {
        let r = get(proxy.addr, "app.test", "/");
        assert_eq!((r.status, r.first_line()), (200, "a"));
    }
    let status = proxy.status();
    assert_eq!(status.services.len(), 1);
    assert_eq!(status.services[0].target, a.addr.to_string());
    assert_eq!(std::fs::read_to_string(&proxy.state).unwrap(), state_before);

    // A new service whose first target is unhealthy is not created.
    let err = proxy
        .deploy_with(
            "other",
            broken.addr,
            &["other.test"],
            DeployOptions {
                give_up_after: Duration::from_millis(100),
                ..fast()
            },
        )
        .unwrap_err();
    assert!(matches!(err, ControlError::Rejected(_)));
    assert_eq!(proxy.status().services.len(), 1);
}

#[test]
fn drain_lets_slow_requests_to_the_old_target_finish() {
    let dir = TempDir::new("drain");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();

    let addr = proxy.addr;
    let slow = thread::spawn(move || get(addr, "app.test", "/slow/800"));
    wait_in_flight(&proxy, 1);
    let r = proxy.deploy("app", b.addr).unwrap();
    println!("drain: {r:?}");
    assert!(r.drained, "{r:?}");
    assert_eq!(r.in_flight_left, 0);
    assert!(r.drain_ms >= 300, "drain returned too early: {r:?}");
    // New requests went to b right after the swap, while a still drained.
    let reply = slow.join().unwrap();
    assert_eq!((reply.status, reply.first_line()), (200, "a"));
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "b");

    // A drain that runs out reports what is left, and the request still completes.
    let slow = thread::spawn(move || get(addr, "app.test", "/slow/1500"));
    wait_in_flight(&proxy, 1);
    let r = proxy
        .deploy_with(
            "app",
            a.addr,
            &[],
            DeployOptions {
                drain: Duration::from_millis(200),
                ..fast()
            },
        )
        .unwrap();
    println!("drain ran out: {r:?}");
    assert!(!r.drained, "{r:?}");
    assert_eq!(r.in_flight_left, 1);
    assert!(r.drain_ms >= 200 && r.drain_ms < 1400, "{r:?}");
    let reply = slow.join().unwrap();
    assert_eq!((reply.status, reply.first_line()), (200, "b"));
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "a");
}

fn wait_in_flight(proxy: &TestProxy, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.status().services[0].in_flight < n {
        assert!(Instant::now() < deadline, "request never got in flight");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hold_switch_pauses_then_serves_everything_from_the_new_target() {
    let dir = TempDir::new("hold");
    let a = Backend::start("a");
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    let keep_alive = Load::start(LoadOpts::new(proxy.addr, true));
    let fresh = Load::start(LoadOpts::new(proxy.addr, false));
    assert!(keep_alive.wait_more(50, Duration::from_secs(10)));
    assert!(fresh.wait_more(50, Duration::from_secs(10)));

    // The "hold" recipe: pause, stop old, start new, deploy (gate + swap), resume.
    let paused_at = Instant::now();
    let paused = proxy
        .request(&Request::Pause {
            service: "app".into(),
            hold_ms: Some(10_000),
            drain_ms: Some(5_000),
        })
        .unwrap();
    let Response::Paused(p) = paused else {
        panic!("{paused:?}")
    };
    assert!(p.drained, "{p:?}");
    a.stop();
    thread::sleep(Duration::from_millis(300)); // the new version starting
    let b = Backend::start("b");
    let held = proxy.status().services[0].held;
    let r = proxy.deploy("app", b.addr).unwrap();
    let resumed = proxy
        .request(&Request::Resume {
            service: "app".into(),
        })
        .unwrap();
    let pause_len = paused_at.elapsed();
    let Response::Resumed { released, .. } = resumed else {
        panic!("{resumed:?}")
    };
    assert!(keep_alive.wait_more(50, Duration::from_secs(10)));
    assert!(fresh.wait_more(50, Duration::from_secs(10)));
    let (ka, fr) = (keep_alive.stop(), fresh.stop());
    println!(
        "hold switch: paused {:.1} ms, {held} held before the deploy, {released} released, gate {} ms",
        pause_len.as_secs_f64() * 1000.0,
        r.health_ms
    );
    println!("keep-alive clients: {ka}");
    println!("fresh-connection clients: {fr}");
    for (kind, rep) in [("keep-alive", &ka), ("fresh", &fr)] {
        assert_eq!(rep.failed, 0, "{kind}: {rep}\n{}", rep.failures.join("\n"));
        assert!(rep.bodies.contains_key("b"), "{kind}: {rep}");
        // The longest wait is about the pause: held requests waited for it.
        assert!(
            rep.max_latency >= pause_len.mul_f64(0.7)
                && rep.max_latency <= pause_len + Duration::from_secs(1),
            "{kind}: max latency {:?} vs pause {:?}",
            rep.max_latency,
            pause_len
        );
    }
    assert!(released >= 1, "no request was held");
    assert_eq!(ka.connects, 3, "a keep-alive connection was closed: {ka}");
}

#[test]
fn a_hold_that_runs_out_answers_503_and_keeps_the_connection() {
    let dir = TempDir::new("holdout");
    let a = Backend::start("a");
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    let mut conn = Conn::open(proxy.addr, "app.test");
    assert_eq!(conn.get("/").unwrap().first_line(), "a");
    proxy
        .request(&Request::Pause {
            service: "app".into(),
            hold_ms: Some(200),
            drain_ms: None,
        })
        .unwrap();
    let t = Instant::now();
    let r = conn.get("/").unwrap();
    let waited = t.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    proxy
        .request(&Request::Resume {
            service: "app".into(),
        })
        .unwrap();
    // Same connection, served again.
    assert_eq!(conn.get("/").unwrap().first_line(), "a");
}

#[test]
fn restart_routes_to_the_last_target() {
    let dir = TempDir::new("restart");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = TestProxy::start(dir.path());
    proxy
        .deploy_with("app", a.addr, &["app.test"], fast())
        .unwrap();
    proxy.deploy("app", b.addr).unwrap();
    proxy
        .deploy_with("other", a.addr, &["other.test"], fast())
        .unwrap();
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "b");
    proxy.stop().unwrap();
    assert!(
        !dir.path().join("proxy.sock").exists(),
        "socket left behind"
    );

    let proxy = TestProxy::start(dir.path());
    let status = proxy.status();
    println!("after restart: {status:?}");
    assert_eq!(status.services.len(), 2);
    let app = status.services.iter().find(|s| s.name == "app").unwrap();
    assert_eq!(app.target, b.addr.to_string());
    assert_eq!(app.domains, vec!["app.test".to_string()]);
    assert!(!app.paused);
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "b");
    assert_eq!(get(proxy.addr, "OTHER.test:81", "/").first_line(), "a");
}

#[test]
fn routes_by_host_and_rewrites_headers() {
    let dir = TempDir::new("routing");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = TestProxy::start(dir.path());
    proxy.deploy_with("a", a.addr, &["a.test"], fast()).unwrap();
    // One service with a domain: another host does not reach it (404, as for any host no
    // service has: there is nothing to misdirect on a plain HTTP/1.1 connection).
    let r = get(proxy.addr, "evil.example", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (404, "no service for this host\n")
    );
    proxy
        .deploy_with("b", b.addr, &["b.test", "www.b.test"], fast())
        .unwrap();
    assert_eq!(get(proxy.addr, "a.test", "/").first_line(), "a");
    assert_eq!(get(proxy.addr, "B.Test:8080", "/").first_line(), "b");
    assert_eq!(get(proxy.addr, "www.b.test", "/").first_line(), "b");
    let r = get(proxy.addr, "whatever", "/");
    assert_eq!(r.status, 404, "{r:?}");

    // A domain cannot be taken from another service.
    let err = proxy
        .deploy_with("b", b.addr, &["a.test"], fast())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already belongs to service a"), "{err}");

    let r = get_with(
        proxy.addr,
        "a.test:8080",
        "/headers",
        "Connection: x-secret\r\nX-Secret: hop\r\nX-Forwarded-For: 6.6.6.6\r\nX-App: kept\r\n",
    );
    println!("{}", r.body);
    assert_eq!(r.first_line(), "a");
    for want in [
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: a.test:8080",
        "host: a.test:8080",
        "x-app: kept",
    ] {
        assert!(
            r.body.lines().any(|l| l == want),
            "missing {want:?} in\n{}",
            r.body
        );
    }
    assert!(!r.body.contains("x-secret"), "{}", r.body);
    assert!(!r.body.contains("6.6.6.6"), "{}", r.body);

    // Request bodies are streamed through.
    let r = post(proxy.addr, "b.test", "/echo", "hello through the proxy");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "b\nhello through the proxy")
    );

    // Remove: b's hosts now have no service (the one left has its own domain).
    assert!(matches!(
        proxy
            .request(&Request::Remove {
                service: "b".into()
            })
            .unwrap(),
        Response::Removed { .. }
    ));
    assert_eq!(get(proxy.addr, "b.test", "/").status, 404);
    assert_eq!(get(proxy.addr, "a.test", "/").first_line(), "a");
    let err = proxy
        .request(&Request::Remove {
            service: "b".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such service"), "{err}");
}

#[test]
fn upstream_down_is_a_502_on_a_connection_that_stays_open() {
    let dir = TempDir::new("down");
    let a = Backend::start("a");
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    let mut conn = Conn::open(proxy.addr, "app.test");
    assert_eq!(conn.get("/").unwrap().first_line(), "a");
    a.stop();
    for _ in 0..3 {
        let r = conn.get("/").unwrap();
        assert_eq!(r.status, 502, "{r:?}");
        assert!(!r.close, "{r:?}");
    }
    let b = Backend::start("b");
    proxy.deploy("app", b.addr).unwrap();
    assert_eq!(conn.get("/").unwrap().first_line(), "b");
}

/// Runs a tiny client as `nobody` (uid 65534) against the control socket; returns its output.
fn as_nobody(socket: &std::path::Path) -> Option<String> {
    const SCRIPT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-ERROR errno=%d %s" % (e.errno, e.strerror)); sys.exit(0)
try:
    s.sendall(b'{"op":"status"}\n')
except OSError as e:
    print("SEND-ERROR %s" % e)
data = b""
end = "EOF"
while True:
    try:
        chunk = s.recv(65536)
    except OSError as e:
        end = "RECV-ERROR %s" % e
        break
    if not chunk:
        break
    data += chunk
print("REPLY " + data.decode().strip())
print(end)
"#;
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            SCRIPT,
        ])
        .arg(socket)
        .output()
        .ok()?;
    assert!(out.status.success(), "{out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn control_socket_is_mode_0600_and_refuses_other_users() {
    let dir = TempDir::new("control");
    let proxy = TestProxy::start(dir.path());
    let mode = std::fs::metadata(&proxy.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Root (us) is served.
    assert!(proxy.status().services.is_empty());

    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid.ok() != Some(0) {
        eprintln!("SKIP nobody checks: not running as root");
        return;
    }
    let Some(out) = as_nobody(&proxy.socket) else {
        eprintln!("SKIP nobody checks: no setpriv or python3");
        return;
    };
    println!("nobody, socket 0600: {out}");
    assert!(out.contains("CONNECT-ERROR errno=13"), "{out}");

    // Even if the file mode were wrong, the peer-credential check refuses the connection.
    std::fs::set_permissions(&proxy.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&proxy.socket).unwrap();
    println!("nobody, socket 0666: {out}");
    assert!(
        out.contains(r#"REPLY {"result":"error","error":"permission denied: uid 65534"#),
        "{out}"
    );
    assert!(out.contains("EOF"), "{out}");
    assert!(!out.contains("\"services\""), "{out}");
    // And root still is served.
    assert!(proxy.status().services.is_empty());
}

#[test]
fn a_second_proxy_refuses_a_live_socket() {
    let dir = TempDir::new("twice");
    let proxy = TestProxy::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async { cutover_proxy::bind_control(&proxy.socket).map(|_| ()) })
        .unwrap_err()
        .to_string();
    assert!(err.contains("another proxy is listening"), "{err}");
    assert!(proxy.status().services.is_empty());
}

#[test]
fn health_probes_carry_the_service_host() {
    let dir = TempDir::new("probehost");
    let a = Backend::start("a");
    let proxy = TestProxy::start(dir.path());
    // The backend's /host answers 403 to a Host that is an IP address.
    let quick = DeployOptions {
        give_up_after: Duration::from_millis(200),
        ..fast()
    };
    let err = proxy
        .deploy_path("app", a.addr, "/host", &[], quick.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("403"), "{err}");
    let r = proxy
        .deploy_path("app", a.addr, "/host", &["app.test"], quick.clone())
        .unwrap();
    assert!(r.created, "{r:?}");
    // Later deploys without domains keep using the service's domain.
    let b = Backend::start("b");
    let r = proxy
        .deploy_path("app", b.addr, "/host", &[], quick)
        .unwrap();
    assert!(r.switched, "{r:?}");
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "b");
}

#[test]
fn run_blocking_restores_state_and_stops_on_sigterm() {
    let dir = TempDir::new("run");
    let a = Backend::start("a");
    // Leave a state file behind with one proxy, then run the real entry point on it.
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    proxy.stop().unwrap();

    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = cutover_proxy::ProxyConfig::new(
        listen,
        dir.path().join("proxy.sock"),
        dir.path().join("state.json"),
    );
    let socket = config.control_socket.clone();
    let runner = thread::spawn(move || cutover_proxy::run_blocking(config));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match cutover_proxy::control_request_blocking(&socket, &Request::Status) {
            Ok(Response::Status(s)) => break s,
            _ if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            other => panic!("proxy did not come up: {other:?}"),
        }
    };
    assert_eq!(status.services[0].target, a.addr.to_string());
    assert_eq!(get(listen, "app.test", "/").first_line(), "a");
    // nextest runs each test in its own process, so this SIGTERM is ours alone; the proxy's
    // handler is registered before its socket answers, so it cannot kill the test.
    let kill = Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    runner.join().unwrap().unwrap();
    assert!(!socket.exists(), "control socket left behind");
}

/// A keep-alive HTTP/1.1 backend on raw sockets that counts the connections it accepts and,
/// like many app servers, closes a connection once it has been idle for `idle`.
fn counting_backend(idle: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                stream.set_read_timeout(Some(idle)).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request head per answer (the test sends no bodies).
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return, // closed, or idle too long: close
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn upstream_connections_are_reused_and_idle_closes_fail_no_request() {
    let dir = TempDir::new("pool");
    let (backend, accepted) = counting_backend(Duration::from_millis(300));
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", backend).unwrap();
    let before = accepted.load(Ordering::SeqCst);
    let mut conn = Conn::open(proxy.addr, "app.test");
    for i in 0..200 {
        let r = conn.get("/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "request {i}");
    }
    // One client connection is served by one worker thread, which keeps reusing its pooled
    // upstream connection instead of opening one per request.
    let opened = accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 2,
        "{opened} upstream connections for 200 requests"
    );
    // The backend closes the idle pooled connection; the next requests must not notice.
    for round in 0..3 {
        thread::sleep(Duration::from_millis(500));
        for i in 0..5 {
            let r = conn.get("/").unwrap();
            assert_eq!(r.status, 200, "round {round} request {i}: {r:?}");
        }
    }
    assert!(accepted.load(Ordering::SeqCst) - before > opened);
}

/// A backend that answers every request with the port its connection came from, so that a
/// test can tell which upstream connection carried a request (each proxy worker keeps its
/// own pool).
fn port_echo() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let port = stream.peer_addr().map_or(0, |a| a.port());
                let mut buf: Vec<u8> = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Requests without bodies: one per blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = format!("{port}\n");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// The proxy's worker threads in this process (`cutover-proxy-http-N`, as the kernel cuts
/// thread names to 15 bytes).
fn worker_threads() -> Vec<rustix::thread::Pid> {
    let mut tids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with("cutover-proxy-h") {
            let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
            tids.extend(rustix::thread::Pid::from_raw(tid));
        }
    }
    tids
}

/// CPU time (clock ticks) a thread of this process has used so far.
fn thread_ticks(tid: rustix::thread::Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", tid.as_raw_nonzero()))
        .unwrap_or_default();
    // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

#[test]
fn connections_spread_over_the_cpus_a_busy_worker_moves_some_to_an_idle_one_and_on_one_cpu_they_gather(
) {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let dir = TempDir::new("spread");
    let backend = port_echo();
    let proxy = TestProxy::start(dir.path());
    proxy
        .deploy_with("app", backend, &["app.test"], fast())
        .unwrap();
    // The upstream connection a request went over, named by its port.
    let upstream = |c: &mut Conn| c.get("/").unwrap().first_line().to_string();
    let workers = worker_threads();
    let had = sched_getaffinity(None).unwrap();
    if had.count() >= 2 && workers.len() >= 2 {
        // Eight keep-alive connections, each sending one request in turn: spread evenly
        // over the workers, and those of one worker go over its one pooled upstream
        // connection, so the upstream port tells the workers apart.
        let mut by_worker: std::collections::BTreeMap<String, Vec<Conn>> = Default::default();
        for _ in 0..8 {
            let mut c = Conn::open(proxy.addr, "app.test");
            let port = upstream(&mut c);
            by_worker.entry(port).or_default().push(c);
        }
        let sizes: Vec<usize> = by_worker.values().map(Vec::len).collect();
        assert!(
            sizes.len() >= 2 && sizes.iter().all(|&n| n <= 8 / 2),
            "eight connections on two CPUs not spread evenly: {sizes:?} per upstream connection"
        );
        // Only one worker's connections send requests, back to back: that worker is soon
        // busy while another serves idle connections, so it moves some of its busy ones
        // there, each between two requests. No request may fail on the way.
        let (_, busy) = by_worker.pop_first().unwrap();
        let before: Vec<u64> = workers.iter().map(|&t| thread_ticks(t)).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let loaders: Vec<_> = busy
            .into_iter()
            .map(|mut c| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let r = c.get("/").unwrap_or_else(|e| panic!("request {n}: {e}"));
                        assert_eq!(r.status, 200, "request {n}: {r:?}");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Until two workers have served for a while, at most 20 s.
        let deadline = Instant::now() + Duration::from_secs(20);
        let used = |w: usize| thread_ticks(workers[w]) - before[w];
        let serving = || (0..workers.len()).filter(|&w| used(w) >= 20).count();
        while serving() < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        let served: u64 = loaders.into_iter().map(|l| l.join().unwrap()).sum();
        let ticks: Vec<u64> = (0..workers.len()).map(used).collect();
        println!("{served} requests; CPU ticks per worker during the load: {ticks:?}");
        assert!(
            serving() >= 2,
            "a busy worker did not move connections to an idle one: CPU ticks per worker \
             {ticks:?} over {served} requests"
        );
        // Idle again for longer than the windows the workers' loads are measured over.
        thread::sleep(Duration::from_millis(500));
    } else {
        println!("one CPU or one worker here: only the pinned half runs");
    }
    // As `taskset -a -p -c N` does to a running proxy: every worker on one CPU.
    let first = (0..CpuSet::MAX_CPU).find(|&c| had.is_set(c)).unwrap();
    let mut one = CpuSet::new();
    one.set(first);
    for tid in &workers {
        sched_setaffinity(Some(*tid), &one).unwrap();
    }
    let mut c = Conn::open(proxy.addr, "app.test");
    let pc = upstream(&mut c);
    let mut d = Conn::open(proxy.addr, "app.test");
    let pd = upstream(&mut d);
    assert_eq!(upstream(&mut c), pc);
    assert_eq!(
        pc, pd,
        "two connections on one CPU were served by two workers"
    );
}

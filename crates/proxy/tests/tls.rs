//! HTTPS and HTTP/2 through the proxy with the user's own certificate files (`tls =
//! "files"`): served over both HTTP versions, reloaded when the files change (a bad file keeps
//! the old certificate and says why), plain HTTP redirected, and switches under HTTPS load
//! (HTTP/1.1 keep-alive and fresh connections, HTTP/2, and h2load) failing no request.

#[path = "tls/harness.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::{Limits, TlsMode};
use harness::{client_config, get_once, raw_tls, Ca, Client, Http, HttpsLoad, TlsProxy};
use hyper::Version;
use support::{Backend, TempDir};

fn files_mode(dir: &std::path::Path) -> TlsMode {
    TlsMode::Files {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

fn write_pair(dir: &std::path::Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

/// Waits until `f` is true (checked every 100 ms), or panics with `what`.
async fn until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test's directory holding a `site.test` certificate from a fresh CA as the `files` pair,
/// that CA, and the backend answering `blue`.
fn site(name: &str) -> (TempDir, Ca, Backend) {
    let dir = TempDir::new(name);
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf(&["site.test"]);
    write_pair(dir.path(), &cert, &key);
    (dir, ca, Backend::start("blue"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_certificate_is_served_over_h2_and_h1_and_reloaded_when_it_changes() {
    let dir = TempDir::new("tls-files");
    let ca = Ca::new();
    let (cert1, key1, der1) = ca.leaf(&["site.test"]);
    write_pair(dir.path(), &cert1, &key1);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(dir.path(), files_mode(dir.path()), false, (0, 0));
    proxy.deploy("web", blue.addr, &["site.test"]).await;

    // HTTP/2 by ALPN; the app gets HTTP/1.1 with the host and the scheme.
    let a = get_once(
        proxy.tls_addr,
        "site.test",
        Http::H2,
        ca.roots(),
        "/headers",
    )
    .await
    .unwrap();
    assert_eq!((a.status, a.version), (200, Version::HTTP_2), "{a:?}");
    assert!(a.body.starts_with("blue\n"), "{}", a.body);
    assert!(a.body.contains("\nhost: site.test\n"), "{}", a.body);
    assert!(
        a.body.contains("\nx-forwarded-proto: https\n"),
        "{}",
        a.body
    );
    assert_eq!(a.leaf, der1);
    // HTTP/1.1 by ALPN.
    let a = get_once(proxy.tls_addr, "site.test", Http::H1, ca.roots(), "/")
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.version, a.body.as_str()),
        (200, Version::HTTP_11, "blue\n")
    );
    // Plain HTTP still works (no redirect unless asked for) and says http.
    let r = support::get(proxy.addr, "site.test", "/headers");
    assert!(r.body.contains("\nx-forwarded-proto: http\n"), "{}", r.body);

    let s = proxy.status().await;
    assert_eq!(s.listen_tls, Some(proxy.tls_addr.to_string()));
    assert_eq!(s.certificates.len(), 1, "{s:?}");
    assert_eq!(s.certificates[0].domain, "*");
    assert_eq!(s.certificates[0].source, "files");
    assert!(s.certificates[0].not_after_ms.is_some());
    assert_eq!(s.certificates[0].last_error, None);

    // A key that is not a key: the old certificate stays, and status says why.
    std::fs::write(dir.path().join("key.pem"), "not a key\n").unwrap();
    until(
        "the bad key to be reported",
        Duration::from_secs(10),
        || async { proxy.status().await.certificates[0].last_error.is_some() },
    )
    .await;
    let err = proxy.status().await.certificates[0]
        .last_error
        .clone()
        .unwrap();
    let expected = format!(
        "{} and {}: the key is not a PEM private key:",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    assert!(err.starts_with(&expected), "{err}");
    let a = get_once(proxy.tls_addr, "site.test", Http::H2, ca.roots(), "/")
        .await
        .unwrap();
    assert_eq!((a.status, &a.leaf), (200, &der1));

    // A new good pair replaces it for the next handshake, and clears the error.
    let (cert2, key2, der2) = ca.leaf(&["site.test", "www.site.test"]);
    write_pair(dir.path(), &cert2, &key2);
    until(
        "the new certificate to be served",
        Duration::from_secs(10),
        || async {
            get_once(proxy.tls_addr, "site.test", Http::H1, ca.roots(), "/")
                .await
                .map(|a| a.leaf == der2)
                .unwrap_or(false)
        },
    )
    .await;
    assert_eq!(proxy.status().await.certificates[0].last_error, None);
    proxy.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_over_tls_get_plain_text_answers_and_h2_is_untouched() {
    let (dir, ca, blue) = site("tls-framing");
    let proxy = TlsProxy::start(dir.path(), files_mode(dir.path()), false, (0, 0));
    proxy.deploy("web", blue.addr, &["site.test"]).await;

    // A good request, then one with both Content-Length and Transfer-Encoding behind it on
    // the same HTTP/1.1 connection: the first is answered by the app, the second by the
    // proxy, and the connection ends.
    let r = raw_tls(
        proxy.tls_addr,
        "site.test",
        ca.roots(),
        b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\nPOST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "{r}");
    assert!(
        answers[0].starts_with("200 ") && answers[0].ends_with("blue\n"),
        "{r}"
    );
    assert!(
        answers[1].starts_with("400 ")
            && answers[1]
                .ends_with("\r\n\r\nbad request: both Content-Length and Transfer-Encoding\n"),
        "{r}"
    );
    // HTTP/2 (which frames its own messages) is served as before.
    let a = get_once(proxy.tls_addr, "site.test", Http::H2, ca.roots(), "/")
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.body.as_str(), a.version),
        (200, "blue\n", Version::HTTP_2)
    );
    proxy.stop().unwrap();
}

/// One of this machine's addresses that is not loopback (a client connecting to it is seen
/// from it, not from loopback).
fn outside_ip() -> std::net::IpAddr {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .expect("a non-loopback IPv4 address on this machine")
}

/// `redirect_http`: plain HTTP from outside gets a 308 to the same host and path on https, but
/// ACME's HTTP-01 path and the host itself; a client that only says it came over https is
/// redirected too, unless it is a proxy in `trusted_proxies` (a load balancer that ends TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_https_except_the_acme_path_and_the_host_itself() {
    let (dir, ca, blue) = site("tls-redirect");
    let proxy = TlsProxy::start_on(dir.path(), files_mode(dir.path()), true, "0.0.0.0");
    proxy.deploy("web", blue.addr, &["site.test"]).await;
    let outside = std::net::SocketAddr::new(outside_ip(), proxy.addr.port());

    let r = support::get_with(outside, "Site.Test:8080", "/a/b?c=d", "");
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.body, "moved to https\n");
    let raw = raw_head(outside, "Site.Test:8080", "/a/b?c=d");
    let want = format!(
        "location: https://site.test:{}/a/b?c=d",
        proxy.tls_addr.port()
    );
    assert!(raw.to_ascii_lowercase().contains(&want), "{raw}");
    // ACME's HTTP-01 path goes to the app (tls = "files": the proxy answers no challenge).
    let r = support::get(outside, "site.test", "/.well-known/acme-challenge/tok");
    assert_eq!((r.status, r.first_line()), (200, "blue"));
    // The host itself (cutover's verification comes from loopback) is served plain HTTP.
    let r = support::get(proxy.addr, "site.test", "/");
    assert_eq!((r.status, r.first_line()), (200, "blue"));
    // HTTPS itself is served.
    let tls = std::net::SocketAddr::new(outside_ip(), proxy.tls_addr.port());
    let a = get_once(tls, "site.test", Http::H1, ca.roots(), "/")
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    // A client that only says it came over https is redirected all the same.
    let says_https = "X-Forwarded-Proto: https\r\n";
    let r = support::get_with(outside, "site.test", "/", says_https);
    assert_eq!(r.status, 308, "{r:?}");
    proxy.stop().unwrap();

    // Behind a load balancer that terminates TLS (`trusted_proxies`): what it relays as
    // https is served, not sent round in a loop of redirects; what it relays as http, or
    // without saying, is redirected.
    let outside_range = (outside_ip(), 32);
    let proxy = TlsProxy::start_on_with(
        dir.path(),
        files_mode(dir.path()),
        true,
        "0.0.0.0",
        move |c| c.trusted_proxies = vec![outside_range],
    );
    proxy.deploy("web", blue.addr, &["site.test"]).await;
    let outside = std::net::SocketAddr::new(outside_ip(), proxy.addr.port());
    let r = support::get_with(outside, "site.test", "/", says_https);
    assert_eq!((r.status, r.first_line()), (200, "blue"));
    let r = support::get_with(outside, "site.test", "/", "X-Forwarded-Proto: http\r\n");
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(support::get(outside, "site.test", "/").status, 308);
    proxy.stop().unwrap();

    // A balancer that says it in `Forwarded` (`trusted_proxies_header = "forwarded"`): its
    // proto=https is served; an X-Forwarded-Proto passed through it from a client is not
    // believed.
    let proxy = TlsProxy::start_on_with(
        dir.path(),
        files_mode(dir.path()),
        true,
        "0.0.0.0",
        move |c| {
            c.trusted_proxies = vec![outside_range];
            c.trusted_proxies_header = cutover_proxy::RelayHeader::Forwarded;
        },
    );
    proxy.deploy("web", blue.addr, &["site.test"]).await;
    let outside = std::net::SocketAddr::new(outside_ip(), proxy.addr.port());
    let forwarded = "Forwarded: for=198.51.100.7;proto=https\r\n";
    let r = support::get_with(outside, "site.test", "/", forwarded);
    assert_eq!((r.status, r.first_line()), (200, "blue"));
    let r = support::get_with(outside, "site.test", "/", says_https);
    assert_eq!(r.status, 308, "{r:?}");
    proxy.stop().unwrap();
}

/// The response head of `GET path` over plain HTTP.
fn raw_head(addr: std::net::SocketAddr, host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split("\r\n\r\n").next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_and_hold_switches_under_https_load_fail_no_request_over_h1_and_h2() {
    let (dir, ca, blue) = site("tls-switch");
    let green = Backend::start("green");
    let proxy = TlsProxy::start(dir.path(), files_mode(dir.path()), false, (0, 0));
    proxy.deploy("web", blue.addr, &["site.test"]).await;

    let load = HttpsLoad::start(proxy.tls_addr, "site.test", ca.roots(), 2);
    // h2load, a real HTTP/2 client (nghttp2-client), beside our own clients, for the whole
    // run of switches.
    let to = proxy.tls_addr.to_string();
    let h2load = tokio::task::spawn_blocking(move || {
        std::process::Command::new("h2load")
            .args(["-D", "5", "-c", "4", "-m", "8", "--connect-to", &to])
            .arg("https://site.test/")
            .output()
            .expect("h2load (Debian package nghttp2-client) must be installed")
    });
    // Blue-green switches, then hold switches (requests held while paused, released to the
    // new target).
    for i in 0..10 {
        let to = if i % 2 == 0 { green.addr } else { blue.addr };
        proxy.deploy("web", to, &["site.test"]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..4 {
        let to = if i % 2 == 0 { green.addr } else { blue.addr };
        proxy.hold_switch("web", to, &["site.test"]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 100, "only {ok} requests answered");
    let out = h2load.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Application protocol: h2"), "h2load: {text}");
    let (total, failed) = h2load_counts(&text);
    assert!(total > 100 && failed == 0, "h2load: {text}");
    eprintln!(
        "{ok} HTTPS requests (h2load: {total}) across 10 blue-green and 4 hold switches, 0 failed"
    );
}

/// From h2load's summary (`requests: 100 total, 100 started, 100 done, 100 succeeded, 0
/// failed, 0 errored, 0 timeout`): (done, failed + errored + timeout + not succeeded).
fn h2load_counts(text: &str) -> (u64, u64) {
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary in h2load's output: {text}"));
    let n = |what: &str| -> u64 {
        line.split(',')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("requests:")
                    .trim()
                    .strip_suffix(what)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what} in {line}"))
    };
    let done = n("done");
    (
        done,
        n("failed") + n("errored") + n("timeout") + done - n("succeeded"),
    )
}

/// A proxy whose keep-alive connections close after `idle`, routing `site.test` to `blue`.
async fn idle_proxy(dir: &TempDir, blue: &Backend, idle: Duration) -> TlsProxy {
    let proxy = TlsProxy::start_limited(
        dir.path(),
        files_mode(dir.path()),
        Limits {
            idle_timeout: idle,
            ..Limits::default()
        },
    );
    proxy.deploy("web", blue.addr, &["site.test"]).await;
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_idle_timeout_but_not_while_busy() {
    let (dir, ca, blue) = site("tls-h2-idle");
    let idle = Duration::from_secs(3);
    let proxy = idle_proxy(&dir, &blue, idle).await;
    let mut client = Client::new(proxy.tls_addr, "site.test", Http::H2, ca.roots());

    // A request longer than the idle timeout: the connection is busy, not idle.
    let slow = client.get("/slow/5000", true).await.unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (200, "blue\n"));
    assert!(!client.is_closed(), "closed during a slow request");
    // Requests closer together than the timeout keep it open, for longer than the timeout.
    let t = Instant::now();
    while t.elapsed() < idle + Duration::from_secs(1) {
        let a = client.get("/", true).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "blue\n"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(client.connects, 1);
    // Idle: a GOAWAY and the end of the connection, not at once.
    let t = Instant::now();
    until(
        "the idle HTTP/2 connection to close",
        Duration::from_secs(60),
        || std::future::ready(client.is_closed()),
    )
    .await;
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    eprintln!(
        "idle HTTP/2 connection closed {:?} after its last request",
        t.elapsed()
    );
    // A new connection is served.
    let again = get_once(proxy.tls_addr, "site.test", Http::H2, ca.roots(), "/")
        .await
        .unwrap();
    assert_eq!(again.status, 200);
}

/// A process's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens a TLS connection (ALPN as `config` says), sends `bytes` and keeps only the TCP
/// socket: the proxy holds the connection and what was sent, the client's TLS state is gone.
async fn hold_tls(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("site.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    tls.into_inner().0
}

/// The `proxy_run` example (the proxy's real entry point, `run_blocking`, in a process of its
/// own) serving TLS from the files in `dir`, with one service for `site.test`.
struct ProxyProcess(std::process::Child);

impl ProxyProcess {
    /// `nofile`: the open-file limit to run it under (else this process's).
    async fn start(
        dir: &std::path::Path,
        backend: std::net::SocketAddr,
        nofile: Option<u32>,
    ) -> (ProxyProcess, std::net::SocketAddr) {
        use cutover_proxy::{control_request, DeployRequest, Request, Response};
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (plain, tls) = (port(), port());
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("examples/proxy_run");
        assert!(
            bin.exists(),
            "{} is missing: run the whole package's tests",
            bin.display()
        );
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let child = cmd
            .arg(plain.to_string())
            .arg(dir)
            .arg(tls.to_string())
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"))
            .stderr(log)
            .spawn()
            .unwrap();
        let mut proxy = ProxyProcess(child);
        let socket = dir.join("proxy.sock");
        let t = Instant::now();
        while control_request(&socket, &Request::Status).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "proxy did not come up"
            );
            assert!(proxy.0.try_wait().unwrap().is_none(), "proxy exited");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deploy = Request::Deploy(DeployRequest {
            service: "web".into(),
            target: backend.to_string(),
            health_path: "/up".into(),
            domains: vec!["site.test".into()],
            options: support::fast(),
        });
        let r = control_request(&socket, &deploy).await.unwrap();
        assert!(matches!(r, Response::Deployed(_)), "{r:?}");
        (proxy, tls)
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.0.id())
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0.id()))
            .unwrap()
            .count()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 12's half-sent heads, over TLS, against the proxy in a process of its own: 1,000
/// HTTP/1.1 connections each holding 4 KiB of an unfinished head and 1,000 HTTP/2 connections
/// each holding 4 KiB of an unfinished HEADERS frame keep its RSS under 64 MiB; then 2,000
/// connections that never finish their handshake as well (they hold no more than descriptors
/// and rustls' first read buffer). HTTPS clients (HTTP/1.1 and HTTP/2) are served during and
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_sent_heads_and_handshakes_over_tls_stay_under_64_mib() {
    use tokio::io::AsyncWriteExt;
    let (dir, ca, blue) = site("tls-halfheads");
    let (proxy, addr) = ProxyProcess::start(dir.path(), blue.addr, None).await;
    let serves = |http| {
        let roots = ca.roots();
        async move {
            let a = get_once(addr, "site.test", http, roots, "/").await.unwrap();
            assert_eq!((a.status, a.body.as_str()), (200, "blue\n"), "{http:?}");
        }
    };
    serves(Http::H1).await;
    serves(Http::H2).await;
    let before = proxy.rss_kib();

    let h1 = format!(
        "GET / HTTP/1.1\r\nHost: site.test\r\nX-Pad: {}",
        "p".repeat(4096)
    );
    // The preface, an empty SETTINGS frame, and a HEADERS frame (END_HEADERS) on stream 1
    // that promises 16 KiB and sends 4 KiB of it.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    h2.extend_from_slice(&[0x00, 0x40, 0x00, 0x01, 0x04, 0, 0, 0, 1]);
    h2.resize(h2.len() + 4096, 0);
    let kinds = [
        (
            client_config(ca.roots(), b"http/1.1"),
            Arc::new(h1.into_bytes()),
        ),
        (client_config(ca.roots(), b"h2"), Arc::new(h2)),
    ];
    let mut held = Vec::new();
    for batch in 0..100 {
        let (config, bytes) = kinds[batch % 2].clone();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (config, bytes) = (config.clone(), bytes.clone());
                tokio::spawn(async move { hold_tls(addr, config, &bytes).await })
            })
            .collect();
        for t in tasks {
            held.push(t.await.unwrap());
        }
    }
    // Let the proxy read everything that was sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    serves(Http::H1).await;
    serves(Http::H2).await;
    let heads = proxy.rss_kib();
    // Half a ClientHello: a handshake record header promising 512 bytes, and 100 of them.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(105, 0);
    for _ in 0..2000 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    serves(Http::H1).await;
    serves(Http::H2).await;
    let handshakes = proxy.rss_kib();
    let fds = proxy.fds();
    println!(
        "proxy RSS: {before} KiB before, {heads} KiB with 1,000 HTTP/1.1 and 1,000 HTTP/2 \
         half-sent 4 KiB heads over TLS, {handshakes} KiB with 2,000 half-sent handshakes \
         as well ({fds} descriptors)"
    );
    assert!(heads < 64 * 1024, "RSS {heads} KiB");
    assert!(handshakes < 96 * 1024, "RSS {handshakes} KiB");
    drop(held);
    serves(Http::H1).await;
    serves(Http::H2).await;
}

/// An HTTP/2 connection over TLS with its preface sent (hyper's client), and no request yet.
async fn h2_connection(
    addr: std::net::SocketAddr,
    roots: Arc<rustls::RootCertStore>,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("site.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(roots, b"h2"))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// The proxy reads an HTTP/2 connection's first request itself before hyper takes it: a
/// client that opens a connection and sends its first request later (a browser's
/// preconnect) is served, and one that never sends one is closed after `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_waiting_for_its_first_request_is_served_or_closed_at_the_idle_timeout()
{
    use http_body_util::BodyExt;
    let (dir, ca, blue) = site("tls-h2-first");
    let idle = Duration::from_secs(3);
    let proxy = idle_proxy(&dir, &blue, idle).await;
    let mut late = h2_connection(proxy.tls_addr, ca.roots()).await;
    let never = h2_connection(proxy.tls_addr, ca.roots()).await;
    let t = Instant::now();
    tokio::time::sleep(idle / 2).await;
    let req = hyper::Request::get("https://site.test/")
        .version(Version::HTTP_2)
        .body(http_body_util::Empty::new())
        .unwrap();
    late.ready().await.unwrap();
    let resp = late.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"blue\n");
    assert!(!never.is_closed(), "closed before the idle timeout");
    until(
        "the HTTP/2 connection without a request to close",
        Duration::from_secs(30),
        || std::future::ready(never.is_closed()),
    )
    .await;
    assert!(t.elapsed() >= idle, "{:?}", t.elapsed());
    eprintln!(
        "an HTTP/2 connection without a request closed {:?} after it opened",
        t.elapsed()
    );
}

/// Half-sent handshakes under the proxy's real open-file limit (1,024, so at most 480 client
/// connections): connections still in their handshake are closed to make room, so HTTPS
/// clients (HTTP/1.1 and HTTP/2) are served while 2,000 of them are held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_sent_handshakes_under_a_1024_fd_limit_do_not_lock_out_https_clients() {
    use tokio::io::AsyncWriteExt;
    let (dir, ca, blue) = site("tls-handshakes-fd");
    let (proxy, addr) = ProxyProcess::start(dir.path(), blue.addr, Some(1024)).await;
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(105, 0);
    let mut held = Vec::new();
    for _ in 0..2000 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The proxy may have closed it already to make room for the next one.
        let _ = s.write_all(&hello).await;
        held.push(s);
    }
    let t = Instant::now();
    for http in [Http::H1, Http::H2, Http::H1, Http::H2] {
        let a = get_once(addr, "site.test", http, ca.roots(), "/")
            .await
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "blue\n"), "{http:?}");
    }
    let fds = proxy.fds();
    println!(
        "4 HTTPS requests beside 2,000 half-sent handshakes answered in {:?}; the proxy holds \
         {fds} descriptors",
        t.elapsed()
    );
    // Well within the handshake timeout (10 s), which would free the slots anyway.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(fds < 1024, "{fds}");
    drop(held);
}

/// An HTTP/2 frame: 9-byte header (length, type, flags, stream) and its payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client that opens streams and cancels each at
/// once, 5,000 of them in batches, to make the server start work it never has to finish. The
/// proxy ends that connection with a GOAWAY before its streams reach the app (the request
/// counter barely moves), and serves other clients, over HTTP/2 and HTTP/1.1, meanwhile and
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off_before_it_reaches_the_app() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dir, ca, blue) = site("tls-rapid-reset");
    let proxy = TlsProxy::start(dir.path(), files_mode(dir.path()), false, (0, 0));
    proxy.deploy("web", blue.addr, &["site.test"]).await;
    let before = proxy.status().await.requests;

    let tcp = tokio::net::TcpStream::connect(proxy.tls_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("site.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(ca.roots(), b"h2"))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS, none changed
    tls.write_all(&out).await.unwrap();
    // GET https://site.test/ in HPACK: :method GET, :scheme https, :path / (static table),
    // then :authority as a literal with the static table's name.
    let mut block = vec![0x82, 0x87, 0x84, 0x01, 9];
    block.extend_from_slice(b"site.test");
    let (mut sent, mut stream) = (0u32, 1u32);
    let mut normal = 0;
    'flood: for _ in 0..50 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            // HEADERS (END_STREAM | END_HEADERS), then RST_STREAM (CANCEL).
            batch.extend(h2_frame(0x1, 0x5, stream, &block));
            batch.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes()));
            stream += 2;
        }
        if tls.write_all(&batch).await.is_err() {
            break 'flood;
        }
        sent += 100;
        if sent % 1000 == 0 {
            // Another client is served while the flood goes on.
            let a = get_once(proxy.tls_addr, "site.test", Http::H2, ca.roots(), "/").await;
            assert_eq!(a.map(|a| a.status), Ok(200));
            normal += 1;
        }
    }
    // What the proxy sent back: a GOAWAY, then the end of the connection.
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the flooding connection was left open");
    let mut goaway = None;
    let mut at = 0;
    while back.len() >= at + 9 {
        let len = usize::from(back[at]) << 16
            | usize::from(back[at + 1]) << 8
            | usize::from(back[at + 2]);
        if back[at + 3] == 0x7 && back.len() >= at + 9 + 8 {
            let code = &back[at + 9 + 4..at + 9 + 8];
            goaway = Some(u32::from_be_bytes(code.try_into().unwrap()));
        }
        at += 9 + len;
    }
    let after = proxy.status().await.requests;
    eprintln!(
        "rapid reset: {sent} streams written before the proxy closed, GOAWAY code {goaway:?}, \
         {} requests reached the service, {normal} other requests served meanwhile",
        after - before - normal
    );
    // ENHANCE_YOUR_CALM (0xb), from the h2 crate's limit on streams reset before they are taken.
    assert_eq!(goaway, Some(0xb), "no GOAWAY for the flood");
    assert!(
        after - before - normal < 200,
        "{} requests reached the service",
        after - before - normal
    );
    for http in [Http::H2, Http::H1] {
        let a = get_once(proxy.tls_addr, "site.test", http, ca.roots(), "/")
            .await
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "blue\n"));
    }
}

/// Bytes of the test pattern at offset `i`.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// An HTTP/1.1 app for [`http2_bodies_cross_the_flow_control_windows_and_a_reset_cancels_only_its_stream`],
/// one thread per connection: `/up` answers `ok`; a POST answers `<bytes> <sum of bytes>` of
/// its body; `/big` answers [`BIG`] bytes of [`pattern`]; `/trickle` promises 1 MiB, sends 16
/// KiB and waits, and sets `cut` once the proxy closes that connection.
fn h2_bodies_app(cut: Arc<std::sync::atomic::AtomicBool>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let cut = cut.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let Some((path, body)) = support::read_request(&mut r) else {
                        return;
                    };
                    let (head, text): (String, Vec<u8>) = match path.as_str() {
                        "/big" => (
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n"),
                            (0..BIG).map(pattern).collect(),
                        ),
                        "/trickle" => {
                            let _ =
                                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n");
                            let _ = w.write_all(&[b'x'; 16 * 1024]);
                            w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                            if matches!(r.read(&mut [0u8; 1]), Ok(0)) {
                                cut.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            return;
                        }
                        "/up" => (
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n".into(),
                            b"ok".to_vec(),
                        ),
                        "/4k" => (
                            "HTTP/1.1 200 OK\r\ncontent-length: 4096\r\n\r\n".into(),
                            vec![b'k'; 4096],
                        ),
                        _ => {
                            let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
                            let text = format!("{} {sum}", body.len()).into_bytes();
                            (
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                    text.len()
                                ),
                                text,
                            )
                        }
                    };
                    if w.write_all(head.as_bytes())
                        .and_then(|()| w.write_all(&text))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The size of `/big` in [`h2_bodies_app`]: larger than any flow-control window of the proxy
/// (1 MiB) or of the client (hyper's).
const BIG: usize = 8 * 1024 * 1024;

/// An HTTP/2 connection (hyper's client) to `proxy` for `site.test`, trusting `ca`, with
/// hyper's default windows.
async fn h2_client(
    proxy: &TlsProxy,
    ca: &Ca,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    h2_client_with(proxy, ca, None).await.0
}

/// [`h2_client`] with its stream and connection windows set to `windows` (stream,
/// connection) bytes, and the connection's task; its requests' bodies are of type `B`.
async fn h2_client_with<B>(
    proxy: &TlsProxy,
    ca: &Ca,
    windows: Option<(u32, u32)>,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(proxy.tls_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("site.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(ca.roots(), b"h2"))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Some((stream, connection)) = windows {
        builder
            .initial_stream_window_size(stream)
            .initial_connection_window_size(connection);
    }
    let (h2, conn) = builder
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    (h2, tokio::spawn(conn))
}

/// Sends a request over an HTTP/2 connection (hyper's client) once it is ready; its response.
async fn h2_send(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    url: &str,
    body: Vec<u8>,
) -> hyper::Response<hyper::body::Incoming> {
    h2.ready().await.unwrap();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .version(Version::HTTP_2)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    h2.send_request(req).await.unwrap()
}

/// HTTP/2 bodies both ways through the proxy, on one connection: a 3 MiB upload (three times
/// the 1 MiB stream window the proxy gives: it must hand the window back as it forwards)
/// reaches the app whole; an 8 MiB download arrives whole (sent as the client's
/// window allows); a client that cancels a download mid-way (RST_STREAM) makes the proxy
/// drop that upstream connection, and the connection's other streams go on; an unknown host
/// gets the proxy's own 404, with its text, `Content-Length` and `Date`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bodies_cross_the_flow_control_windows_and_a_reset_cancels_only_its_stream() {
    use http_body_util::BodyExt;
    let (dir, ca, _blue) = site("tls-h2-bodies");
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = h2_bodies_app(cut.clone());
    let proxy = TlsProxy::start(dir.path(), files_mode(dir.path()), false, (0, 0));
    proxy.deploy("web", app, &["site.test"]).await;

    let mut h2 = h2_client(&proxy, &ca).await;

    // Upload.
    let upload: Vec<u8> = (0..3 * 1024 * 1024).map(pattern).collect();
    let sum: u64 = upload.iter().map(|&b| u64::from(b)).sum();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        h2_send(&mut h2, "POST", "https://site.test/count", upload),
    )
    .await
    .expect("the upload stalled");
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&text).unwrap(),
        format!("{} {sum}", 3 * 1024 * 1024)
    );

    // Download.
    let resp = h2_send(&mut h2, "GET", "https://site.test/big", vec![]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], BIG.to_string().as_str());
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the download stalled")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), BIG);
    assert!(body.iter().enumerate().all(|(i, &b)| b == pattern(i)));

    // A download cancelled after its first bytes.
    let resp = h2_send(&mut h2, "GET", "https://site.test/trickle", vec![]).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    until(
        "the proxy to close the cancelled stream's upstream connection",
        Duration::from_secs(10),
        || std::future::ready(cut.load(std::sync::atomic::Ordering::SeqCst)),
    )
    .await;

    // The same connection still serves, and the proxy's own answers are whole.
    let resp = h2_send(&mut h2, "GET", "https://site.test/up", vec![]).await;
    assert_eq!(resp.status(), 200);
    let resp = h2_send(&mut h2, "GET", "https://other.test/", vec![]).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-length"], "25");
    let date = resp.headers()["date"].to_str().unwrap().to_string();
    assert!(date.ends_with(" GMT"), "{date}");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"no service for this host\n");
    proxy.stop().unwrap();
}

/// An app that pauses mid-body past `upstream_body_timeout` under an HTTP/2 client: that
/// stream is reset (the client sees its body fail, not end as if complete), the proxy closes
/// the app's connection, and the client connection's other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stalls_mid_body_over_http2_has_only_its_stream_reset() {
    use http_body_util::BodyExt;
    let (dir, ca, _blue) = site("tls-h2-stall");
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = h2_bodies_app(cut.clone());
    let limits = Limits {
        upstream_body_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let proxy = TlsProxy::start_limited(dir.path(), files_mode(dir.path()), limits);
    proxy.deploy("web", app, &["site.test"]).await;
    let mut h2 = h2_client(&proxy, &ca).await;

    // `/trickle` sends 16 KiB of the 1 MiB it promised, then nothing.
    let t = std::time::Instant::now();
    let resp = h2_send(&mut h2, "GET", "https://site.test/trickle", vec![]).await;
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the stalled stream was not reset");
    let took = t.elapsed();
    println!("stalled HTTP/2 stream: {got:?} after {took:?}");
    assert!(got.is_err(), "a cut body must not look complete");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    until(
        "the proxy to close the stalled app's connection",
        Duration::from_secs(10),
        || std::future::ready(cut.load(std::sync::atomic::Ordering::SeqCst)),
    )
    .await;
    // The same client connection still serves.
    let resp = h2_send(&mut h2, "GET", "https://site.test/up", vec![]).await;
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"ok");
    proxy.stop().unwrap();
}

/// An HTTP/2 client that stops taking a response (it sends no more window updates for its
/// stream) for longer than `send_timeout` has that stream reset, and the app's request is let
/// go; the connection's other streams go on (as a browser's paused video must not fail the
/// page's other requests), and it serves new ones. One that reads slowly but steadily gets
/// the whole body. (The proxy hands hyper up to 256 KiB at a time and
/// is asked for more once the client has taken that: a client must take a piece that large
/// within `send_timeout`: here about 270 KB/s against 4 s; at 160 KB/s the longest wait
/// measured was 1.8 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_taking_a_response_has_its_stream_reset_at_the_send_timeout() {
    use http_body_util::BodyExt;
    let (dir, ca, _blue) = site("tls-h2-send");
    let app = h2_bodies_app(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let limits = Limits {
        send_timeout: Duration::from_secs(4),
        ..Limits::default()
    };
    let proxy = TlsProxy::start_limited(dir.path(), files_mode(dir.path()), limits);
    proxy.deploy("web", app, &["site.test"]).await;
    // A client with HTTP/2's smallest windows, so that not reading stops the proxy at once.
    let connect = || h2_client_with(&proxy, &ca, Some((65_535, 65_535)));

    // Steady: a frame every 25 ms for 5 s (at most 16 KiB each), then the rest at once.
    let (h2, _conn) = connect().await;
    let got = read_big_steadily(h2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), BIG);
    assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));

    // Stopped: the first frame of one stream taken, then nothing, beside a steady stream on
    // the same connection (whose window is large enough for both: only the stream stops).
    let (mut h2, conn) = h2_client_with(&proxy, &ca, Some((65_535, 16 << 20))).await;
    let resp = h2_send(&mut h2, "GET", "https://site.test/big", vec![]).await;
    let mut stopped = resp.into_body();
    assert!(stopped.frame().await.unwrap().unwrap().is_data());
    let t = Instant::now();
    let steady = tokio::spawn(read_big_steadily(h2.clone(), Duration::from_secs(6)));
    until(
        "both requests in flight",
        Duration::from_secs(5),
        || async { proxy.status().await.services[0].in_flight == 2 },
    )
    .await;
    // The stopped stream's request leaves flight at the timeout, the steady one's stays.
    until(
        "the stopped request to leave flight",
        Duration::from_secs(10),
        || async { proxy.status().await.services[0].in_flight < 2 },
    )
    .await;
    let took = t.elapsed();
    println!("stopped HTTP/2 reader: its request left flight after {took:?}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "{took:?}"
    );
    assert!(!conn.is_finished(), "the proxy closed the whole connection");
    assert_eq!(proxy.status().await.services[0].in_flight, 1);
    // What the client had been sent before is still readable; then the stream ends reset.
    let mut taken = 0;
    let ended = loop {
        match stopped.frame().await {
            Some(Ok(f)) => taken += f.data_ref().map_or(0, |d| d.len()),
            other => break other,
        }
    };
    println!("the stopped stream: {taken} more bytes, then {ended:?}");
    assert!(
        matches!(ended, Some(Err(_))) && taken < BIG,
        "the stream was not reset: {ended:?} after {taken} bytes"
    );
    let got = tokio::time::timeout(Duration::from_secs(20), steady)
        .await
        .expect("the steady download stalled")
        .unwrap();
    assert_eq!(got.len(), BIG);
    assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
    until(
        "the app's requests to leave flight",
        Duration::from_secs(5),
        || async { proxy.status().await.services[0].in_flight == 0 },
    )
    .await;
    // The same connection serves a new request.
    let resp = h2_send(&mut h2, "GET", "https://site.test/up", vec![]).await;
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"ok");
    assert!(!conn.is_finished());
    drop(h2);

    // Stopped while the proxy shuts down: the GOAWAY does not wait for it past the timeout.
    let (mut h2, _conn) = connect().await;
    let resp = h2_send(&mut h2, "GET", "https://site.test/big", vec![]).await;
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let t = Instant::now();
    let stopped = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || proxy.stop()),
    )
    .await;
    println!(
        "shutdown beside a stopped HTTP/2 reader took {:?}",
        t.elapsed()
    );
    stopped
        .expect("the proxy waited for the stopped reader")
        .unwrap()
        .unwrap();
    // At the send timeout (4 s), not at the end of the shutdown's grace period (10 s).
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(body);
}

/// Downloads `/big` over `h2`, taking a frame (at most 16 KiB) every 25 ms for `slowly`, then
/// the rest at once; what it got.
async fn read_big_steadily(
    mut h2: hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    slowly: Duration,
) -> Vec<u8> {
    use http_body_util::BodyExt;
    let resp = h2_send(&mut h2, "GET", "https://site.test/big", vec![]).await;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let t = Instant::now();
    while t.elapsed() < slowly {
        let frame = body.frame().await.unwrap().unwrap();
        got.extend_from_slice(frame.data_ref().unwrap());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let slow = got.len();
    let rest = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .expect("the download stalled")
        .expect("the steady reader was cut")
        .to_bytes();
    got.extend_from_slice(&rest);
    println!(
        "steady HTTP/2 reader: {slow} bytes in {slowly:?}, {} in all",
        got.len()
    );
    got
}

/// A request body sent as its pieces, of no announced length (so HTTP/2 sends no
/// `content-length`).
struct Pieces(std::collections::VecDeque<bytes::Bytes>);

impl hyper::body::Body for Pieces {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// An HTTP/2 response the proxy handed on whole (its request is over) that the client never
/// takes all of (it sends no window update) does not hold the connection for ever: once the
/// connection is idle it gets a GOAWAY, and `send_timeout` after its last request it is
/// closed, unsent data and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_holding_a_response_its_client_never_takes_is_closed() {
    let (dir, ca, _blue) = site("tls-h2-unsent");
    let app = h2_bodies_app(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let limits = Limits {
        send_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let proxy = TlsProxy::start_limited(dir.path(), files_mode(dir.path()), limits);
    proxy.deploy("web", app, &["site.test"]).await;
    // A stream window of 1 KiB: 3 of the 4 KiB stay with the proxy until the client takes more.
    let (mut h2, conn) =
        h2_client_with::<http_body_util::Full<bytes::Bytes>>(&proxy, &ca, Some((1024, 65_535)))
            .await;
    let resp = h2_send(&mut h2, "GET", "https://site.test/4k", vec![]).await;
    assert_eq!(resp.status(), 200);
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
    println!(
        "connection holding an untaken response ended after {:?}: {ended:?}",
        t.elapsed()
    );
    assert!(ended.is_ok(), "the proxy kept the connection");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    drop(resp);
    let a = get_once(proxy.tls_addr, "site.test", Http::H2, ca.roots(), "/up")
        .await
        .unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    proxy.stop().unwrap();
}

/// `max_body_bytes` over HTTPS. HTTP/2: a `content-length` over it gets 413 without the app
/// seeing the request; a body without a length is cut where it passes the cap (413), one
/// within it is forwarded whole; and the connection goes on serving. HTTP/1.1 over TLS: a
/// client that sends 16 MiB on after its 413 is not reset (the lingering close reads through
/// TLS) and reads the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_request_bodies_over_max_body_bytes_get_413_over_h2_and_h1() {
    use http_body_util::BodyExt;
    let (dir, ca, _blue) = site("tls-h2-413");
    let app = h2_bodies_app(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    let proxy = TlsProxy::start_limited(dir.path(), files_mode(dir.path()), limits);
    proxy.deploy("web", app, &["site.test"]).await;
    let too_large = "content too large: request bodies here are limited to 65536 bytes\n";

    let mut h2 = h2_client(&proxy, &ca).await;
    let resp = h2_send(
        &mut h2,
        "POST",
        "https://site.test/count",
        vec![1; 64 * 1024 + 1],
    )
    .await;
    assert_eq!(resp.status(), 413);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(std::str::from_utf8(&text).unwrap(), too_large);
    let resp = h2_send(
        &mut h2,
        "POST",
        "https://site.test/count",
        vec![1; 64 * 1024],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&text).unwrap(),
        format!("{} {}", 64 * 1024, 64 * 1024)
    );

    let (mut streamed, _conn) = h2_client_with::<Pieces>(&proxy, &ca, None).await;
    for (pieces, status, answer) in [
        (8, 200, format!("{} {}", 64 * 1024, 64 * 1024)),
        (9, 413, too_large.to_string()),
    ] {
        streamed.ready().await.unwrap();
        let body = Pieces(
            (0..pieces)
                .map(|_| bytes::Bytes::from(vec![1u8; 8 * 1024]))
                .collect(),
        );
        let req = hyper::Request::builder()
            .method("POST")
            .uri("https://site.test/count")
            .version(Version::HTTP_2)
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), streamed.send_request(req))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(resp.status(), status, "{pieces} pieces of 8 KiB");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(std::str::from_utf8(&text).unwrap(), answer);
    }
    let resp = h2_send(&mut h2, "GET", "https://site.test/up", vec![]).await;
    assert_eq!(resp.status(), 200);

    let mut upload =
        b"POST /count HTTP/1.1\r\nHost: site.test\r\nContent-Length: 33554432\r\n\r\n".to_vec();
    upload.resize(upload.len() + 16 * 1024 * 1024, b'z');
    let out = raw_tls(proxy.tls_addr, "site.test", ca.roots(), &upload).await;
    assert!(out.starts_with("HTTP/1.1 413 "), "{out}");
    assert!(out.ends_with(&format!("\r\n\r\n{too_large}")), "{out}");
    proxy.stop().unwrap();
}

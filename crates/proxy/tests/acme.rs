//! `tls = "acme"` against a real ACME server: Debian's `pebble`, with `pebble-challtestsrv` as
//! its DNS server answering 127.0.0.1 for every test domain, both started here. Pebble's own
//! HTTPS certificate is made by a test CA (the proxy trusts it through `acme_ca_file`); the
//! certificates the proxy obtains are checked against Pebble's root, fetched from Pebble's
//! management interface. Pebble settings: `PEBBLE_VA_NOSLEEP=1` (no random validation
//! delay), `PEBBLE_WFE_NONCEREJECT=0` (no random bad nonces), `certificateValidityPeriod`
//! short (so that renewal comes during the test), `httpPort`/`tlsPort` pointed at the proxy.
//! Validation is real (never `PEBBLE_VA_ALWAYS_VALID`).

#[path = "tls/harness.rs"]
mod harness;
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutover_proxy::{AcmeConfig, CertificateStatus, TlsMode};
use harness::{get_once, roots_from_pem, Ca, Http, HttpsLoad, TlsProxy};
use support::{Backend, TempDir};

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pebble and its DNS server; both killed on drop.
struct Pebble {
    pebble: Option<Child>,
    dns: Child,
    directory: String,
    management: SocketAddr,
    ca: Ca,
    ca_file: std::path::PathBuf,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`, issuing
    /// certificates valid for `validity_s` seconds.
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity_s: u64) -> Pebble {
        let ca = Ca::new();
        let (cert, key, _) = ca.leaf(&["localhost", "127.0.0.1"]);
        let ca_file = dir.join("pebble-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.join("pebble.crt"), cert).unwrap();
        std::fs::write(dir.join("pebble.key"), key).unwrap();
        let (listen, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity_s,
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let dns_child = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble) must be installed");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (Debian package pebble) must be installed");
        let p = Pebble {
            pebble: Some(pebble),
            dns: dns_child,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: format!("127.0.0.1:{mgmt}").parse().unwrap(),
            ca,
            ca_file,
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err()
            || std::net::TcpStream::connect(p.management).is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "pebble did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Pebble's root (the issuer of the certificates it gives), from its management API.
    async fn root_pem(&self) -> String {
        let a = get_once(
            self.management,
            "localhost",
            Http::H1,
            self.ca.roots(),
            "/roots/0",
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }

    fn acme(&self, dir: &Path) -> TlsMode {
        let mut a = AcmeConfig::new(self.directory.clone(), dir.join("acme"));
        a.email = Some("ops@site.test".into());
        a.ca_file = Some(self.ca_file.clone());
        a.retry_after = Duration::from_secs(1);
        TlsMode::Acme(a)
    }

    fn kill_pebble(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill_pebble();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn cert_of(proxy: &TlsProxy, domain: &str) -> Option<CertificateStatus> {
    proxy
        .status()
        .await
        .certificates
        .into_iter()
        .find(|c| c.domain == domain)
}

/// Waits until `f` holds for `domain`'s certificate status, or panics with the status.
async fn wait_cert(
    proxy: &TlsProxy,
    domain: &str,
    what: &str,
    limit: Duration,
    f: impl Fn(&CertificateStatus) -> bool,
) -> CertificateStatus {
    let t = Instant::now();
    loop {
        let c = cert_of(proxy, domain).await;
        if let Some(c) = c.as_ref().filter(|c| f(c)) {
            return c.clone();
        }
        assert!(
            t.elapsed() < limit,
            "{domain}: timed out waiting for {what}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The DNS names of a DER certificate.
fn names_of(der: &[u8]) -> Vec<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_gets_a_certificate_per_domain_and_renews_under_https_load_failing_nothing() {
    let dir = TempDir::new("acme-issue");
    let (http_port, tls_port) = (free_port(), free_port());
    // Certificates for 30 s: renewal is due 20 s after issuance.
    let pebble = Pebble::start(dir.path(), http_port, tls_port, 30);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(
        dir.path(),
        pebble.acme(dir.path()),
        true,
        (http_port, tls_port),
    );
    proxy.deploy("web", blue.addr, &["a.test", "b.test"]).await;

    let a = wait_cert(
        &proxy,
        "a.test",
        "a certificate",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some(),
    )
    .await;
    wait_cert(
        &proxy,
        "b.test",
        "a certificate",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some(),
    )
    .await;
    assert_eq!(a.source, "acme");
    assert_eq!(a.last_error, None);
    let renew_at = a.renew_at_ms.unwrap();
    let not_after = a.not_after_ms.unwrap();
    assert!(renew_at < not_after, "{a:?}");

    // Served over HTTPS, chaining to Pebble's root; each domain has its own certificate.
    let roots = roots_from_pem(&pebble.root_pem().await);
    let ra = get_once(proxy.tls_addr, "a.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((ra.status, ra.body.as_str()), (200, "blue\n"));
    let rb = get_once(proxy.tls_addr, "b.test", Http::H1, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((rb.status, rb.body.as_str()), (200, "blue\n"));
    assert_eq!(names_of(&ra.leaf), ["a.test"]);
    assert_eq!(names_of(&rb.leaf), ["b.test"]);
    // A name with no certificate gets no handshake.
    let err = get_once(proxy.tls_addr, "c.test", Http::H1, roots.clone(), "/")
        .await
        .unwrap_err();
    assert!(err.starts_with("handshake:"), "{err}");

    // Pebble's HTTP-01 validation was answered on the plain listener even with
    // redirect_http (from loopback, as here, plain HTTP is not redirected at all).
    let r = support::get(proxy.addr, "a.test", "/x");
    assert_eq!((r.status, r.first_line()), (200, "blue"));

    // Keys, certificates and the account: 0600 in a 0700 directory.
    let acme_dir = dir.path().join("acme");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&acme_dir), 0o700);
    for f in ["a.test.key", "a.test.crt", "b.test.key", "account.json"] {
        assert_eq!(mode(&acme_dir.join(f)), 0o600, "{f}");
    }

    // Renewal under steady HTTPS load (HTTP/1.1 keep-alive and fresh, HTTP/2): nothing fails.
    let load = HttpsLoad::start(proxy.tls_addr, "a.test", roots.clone(), 2);
    let limit = Duration::from_millis(renew_at.saturating_sub(now_ms()) + 20_000);
    let renewed = wait_cert(&proxy, "a.test", "the renewal", limit, |c| {
        c.not_after_ms.is_some_and(|n| n > not_after)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 100, "only {ok} requests answered");
    assert_eq!(renewed.last_error, None);
    let after = get_once(proxy.tls_addr, "a.test", Http::H2, roots, "/")
        .await
        .unwrap();
    assert_ne!(after.leaf, ra.leaf, "the renewed certificate is not served");
    eprintln!("{ok} HTTPS requests across the renewal, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_retries_over_tls_alpn_and_keeps_the_last_certificate_when_the_ca_is_down() {
    let dir = TempDir::new("acme-down");
    let tls_port = free_port();
    let proxy_http = free_port();
    // Pebble validates HTTP-01 on a port nobody listens on: the first order fails, the retry
    // (TLS-ALPN-01, on the proxy's TLS port) succeeds. Certificates for 30 s.
    let dead_port = free_port();
    let mut pebble = Pebble::start(dir.path(), dead_port, tls_port, 30);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(
        dir.path(),
        pebble.acme(dir.path()),
        false,
        (proxy_http, tls_port),
    );
    proxy.deploy("web", blue.addr, &["c.test"]).await;

    let failed = wait_cert(
        &proxy,
        "c.test",
        "the HTTP-01 failure",
        Duration::from_secs(30),
        |c| c.last_error.is_some(),
    )
    .await;
    let err = failed.last_error.clone().unwrap();
    assert!(err.starts_with("http-01 validation failed: "), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(failed.next_retry_ms.unwrap() > failed.failed_at_ms.unwrap());
    assert_eq!(failed.not_after_ms, None);
    let got = wait_cert(
        &proxy,
        "c.test",
        "a certificate",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some(),
    )
    .await;
    assert_eq!(got.last_error, None);
    let roots = roots_from_pem(&pebble.root_pem().await);
    let first = get_once(proxy.tls_addr, "c.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, "blue\n"));

    // The CA goes away; the renewal fails, status says why and when it retries, and the last
    // certificate keeps being served.
    pebble.kill_pebble();
    let renew_at = got.renew_at_ms.unwrap();
    let limit = Duration::from_millis(renew_at.saturating_sub(now_ms()) + 10_000);
    let down = wait_cert(&proxy, "c.test", "the failed renewal", limit, |c| {
        c.last_error.is_some()
    })
    .await;
    let err = down.last_error.clone().unwrap();
    assert!(err.starts_with("new order: "), "{err}");
    assert!(err.contains("onnection refused"), "{err}");
    assert!(
        down.next_retry_ms.unwrap() > down.failed_at_ms.unwrap(),
        "{down:?}"
    );
    assert_eq!(down.not_after_ms, got.not_after_ms);
    let still = get_once(proxy.tls_addr, "c.test", Http::H1, roots, "/")
        .await
        .unwrap();
    assert_eq!((still.status, &still.leaf), (200, &first.leaf));
}

//! `tls = "acme"` against a real ACME server: testlab's [`Pebble`] (Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS server answering 127.0.0.1 for every test domain) on
//! loopback, its certificates short-lived so that renewal comes during the test. The proxy
//! trusts Pebble's own HTTPS certificate through `acme_ca_file`; the certificates it obtains
//! are checked against Pebble's root, from Pebble's management interface. Validation is real.

#[path = "tls/harness.rs"]
mod harness;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutover_proxy::{AcmeConfig, CertificateStatus, TlsMode};
use harness::{get_once, roots_from_pem, Http, HttpsLoad, TlsProxy};
use support::{Backend, TempDir};
use testlab::{Pebble, PebbleOptions};

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// testlab's Pebble on loopback, validating HTTP-01 on `http_port` and TLS-ALPN-01 on
/// `tls_port`, issuing certificates valid for `validity_s` seconds.
fn pebble(dir: &Path, http_port: u16, tls_port: u16, validity_s: u64) -> Pebble {
    Pebble::start(
        &dir.join("pebble"),
        &PebbleOptions {
            listen: [127, 0, 0, 1].into(),
            answer: [127, 0, 0, 1].into(),
            http_port,
            tls_port,
            validity_s,
        },
    )
}

/// `tls = "acme"` against `pebble`, keeping its files in `dir/acme`, retrying after 1 s.
fn acme(pebble: &Pebble, dir: &Path) -> TlsMode {
    let mut a = AcmeConfig::new(pebble.directory.clone(), dir.join("acme"));
    a.email = Some("ops@site.test".into());
    a.ca_file = Some(pebble.ca_file.clone());
    a.retry_after = Duration::from_secs(1);
    TlsMode::Acme(a)
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
    let pebble = pebble(dir.path(), http_port, tls_port, 30);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(
        dir.path(),
        acme(&pebble, dir.path()),
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
    let roots = roots_from_pem(&pebble.root_pem());
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
    let mut pebble = pebble(dir.path(), dead_port, tls_port, 30);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(
        dir.path(),
        acme(&pebble, dir.path()),
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
    let roots = roots_from_pem(&pebble.root_pem());
    let first = get_once(proxy.tls_addr, "c.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, "blue\n"));

    // The CA goes away; the renewal fails, status says why and when it retries, and the last
    // certificate keeps being served.
    pebble.kill();
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

//! `tls = "acme"` against a real ACME server: testlab's [`Pebble`] (Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS server answering 127.0.0.1 for every test domain) on
//! loopback, its certificates short-lived so that renewal comes during the test. The proxy
//! trusts Pebble's own HTTPS certificate through `acme_ca_file`; the certificates it obtains
//! are checked against Pebble's root, from Pebble's management interface. Validation is real.
//! Pebble answers ACME Renewal Information (ARI) with a window a day either side of two thirds
//! of a certificate's lifetime, or, once it is revoked, a window already past.

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

/// The validity of a DER certificate: (notBefore, notAfter) in ms.
fn validity_of(der: &[u8]) -> (u64, u64) {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let v = c.validity();
    let ms = |t: x509_parser::time::ASN1Time| t.timestamp() as u64 * 1000;
    (ms(v.not_before), ms(v.not_after))
}

/// The ACME account the proxy stored under `dir/acme`, opened by the test.
async fn proxys_account(pebble: &Pebble, dir: &Path) -> instant_acme::Account {
    let text = std::fs::read(dir.join("acme").join("account.json")).unwrap();
    let creds: instant_acme::AccountCredentials = serde_json::from_slice(&text).unwrap();
    instant_acme::Account::builder_with_root(&pebble.ca_file)
        .unwrap()
        .from_credentials(creds)
        .await
        .unwrap()
}

/// Pebble's suggested renewal window for `leaf` (ms), asked as the proxy asks it.
async fn ari_window(
    account: &instant_acme::Account,
    leaf: &rustls::pki_types::CertificateDer<'static>,
) -> (u64, u64) {
    let id = instant_acme::CertificateIdentifier::try_from(leaf).unwrap();
    let (info, _) = account.renewal_info(&id).await.expect(
        "Pebble answers ACME Renewal Information (pebble 2.5 or later: Debian 13's; see .ci/run)",
    );
    let w = info.suggested_window;
    let (start, end) = (w.start.unix_timestamp(), w.end.unix_timestamp());
    (start as u64 * 1000, end as u64 * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_renews_in_the_cas_ari_window_and_replaces_a_revoked_certificate_at_once() {
    let dir = TempDir::new("acme-ari");
    let (http_port, tls_port) = (free_port(), free_port());
    // Certificates for 90 days, as Let's Encrypt's: without ARI, renewal is due at day 60,
    // and Pebble suggests a window of a day either side of it.
    let pebble = pebble(dir.path(), http_port, tls_port, 90 * 86_400);
    let blue = Backend::start("blue");
    let ports = (http_port, tls_port);
    let proxy = TlsProxy::start(dir.path(), acme(&pebble, dir.path()), false, ports);
    proxy.deploy("web", blue.addr, &["d.test"]).await;
    wait_cert(
        &proxy,
        "d.test",
        "a certificate",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some(),
    )
    .await;
    let roots = roots_from_pem(&pebble.root_pem());
    let first = get_once(proxy.tls_addr, "d.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, "blue\n"));

    // The renewal time shown is one drawn in the CA's window, not the two-thirds mark.
    let account = proxys_account(&pebble, dir.path()).await;
    let (start, end) = ari_window(&account, &first.leaf).await;
    let (nb, na) = validity_of(&first.leaf);
    let two_thirds = na - (na - nb) / 3;
    assert!(
        start < two_thirds && two_thirds < end,
        "{start} {two_thirds} {end}"
    );
    let c = wait_cert(
        &proxy,
        "d.test",
        "a renewal time from ARI",
        Duration::from_secs(10),
        |c| c.renew_at_ms.is_some_and(|r| r != two_thirds),
    )
    .await;
    let at = c.renew_at_ms.unwrap();
    assert!((start..=end).contains(&at), "{start} {at} {end}");
    assert_eq!(c.not_after_ms, Some(na));

    // The certificate is revoked (as a CA does after an incident): its window is now in the
    // past. A proxy asks ARI at its start (and every 6 hours, as Pebble's Retry-After says):
    // restarted, it orders a new certificate at once, as the replacement of the revoked one.
    account
        .revoke(&instant_acme::RevocationRequest {
            certificate: &first.leaf,
            reason: None,
        })
        .await
        .unwrap();
    let (_, revoked_end) = ari_window(&account, &first.leaf).await;
    assert!(revoked_end < now_ms(), "{revoked_end}");
    proxy.stop().unwrap();
    let proxy = TlsProxy::start(dir.path(), acme(&pebble, dir.path()), false, ports);
    proxy.deploy("web", blue.addr, &["d.test"]).await;
    let t = Instant::now();
    let replaced = loop {
        let r = get_once(proxy.tls_addr, "d.test", Http::H1, roots.clone(), "/")
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "blue\n"));
        if r.leaf != first.leaf {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the revoked certificate is still served: {:?}",
            cert_of(&proxy, "d.test").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(names_of(&replaced.leaf), ["d.test"]);
    let (_, na2) = validity_of(&replaced.leaf);
    let c = wait_cert(
        &proxy,
        "d.test",
        "the new certificate's status",
        Duration::from_secs(10),
        |c| c.not_after_ms == Some(na2),
    )
    .await;
    assert_eq!(c.last_error, None);
    assert!(std::fs::read(dir.path().join("acme").join("d.test.crt")).is_ok());

    // Pebble took the new order as the revoked certificate's replacement: it refuses another.
    let id = instant_acme::CertificateIdentifier::try_from(&first.leaf).unwrap();
    let ids = [instant_acme::Identifier::Dns("d.test".into())];
    let again = account
        .new_order(&instant_acme::NewOrder::new(&ids).replaces(id))
        .await;
    let err = again
        .err()
        .expect("a second replacement accepted")
        .to_string();
    assert!(err.contains("already has a replacement order"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_of_one_domain_both_get_certificates_where_validation_reaches_only_one() {
    let dir = TempDir::new("acme-peers");
    let (a_http, a_tls, b_http, b_tls) = (free_port(), free_port(), free_port(), free_port());
    // Every validation goes to host A (as DNS pointing at one of them, or a load balancer
    // choosing one, does); host B's orders are validated at A, which asks its peer B.
    let pebble = pebble(dir.path(), a_http, a_tls, 90 * 86_400);
    let with_peer = |host: &str, peer: u16| {
        let TlsMode::Acme(mut a) = acme(&pebble, &dir.path().join(host)) else {
            unreachable!()
        };
        a.peers = vec![format!("127.0.0.1:{peer}")];
        TlsMode::Acme(a)
    };
    let blue = Backend::start("blue");
    let a = TlsProxy::start(
        &dir.path().join("a"),
        with_peer("a", b_http),
        false,
        (a_http, a_tls),
    );
    let b = TlsProxy::start(
        &dir.path().join("b"),
        with_peer("b", a_http),
        false,
        (b_http, b_tls),
    );
    a.deploy("web", blue.addr, &["m.test"]).await;
    b.deploy("web", blue.addr, &["m.test"]).await;
    for (name, proxy) in [("A", &a), ("B", &b)] {
        let c = wait_cert(
            proxy,
            "m.test",
            &format!("host {name}'s certificate"),
            Duration::from_secs(30),
            |c| c.not_after_ms.is_some(),
        )
        .await;
        assert_eq!(c.last_error, None, "host {name}");
    }
    // Each host serves a certificate of its own order, chaining to Pebble's root.
    let roots = roots_from_pem(&pebble.root_pem());
    let ra = get_once(a.tls_addr, "m.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    let rb = get_once(b.tls_addr, "m.test", Http::H2, roots.clone(), "/")
        .await
        .unwrap();
    assert_eq!((ra.status, rb.status), (200, 200));
    assert_eq!(names_of(&rb.leaf), ["m.test"]);
    assert_ne!(ra.leaf, rb.leaf);

    // A token neither host has: 404, at once, with no loop between the two (a relayed
    // request is never relayed again), and a domain neither routes is not asked about.
    for host in ["m.test", "other.test"] {
        let t = Instant::now();
        let r = support::get(a.addr, host, "/.well-known/acme-challenge/NoSuchToken_1");
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "no such ACME challenge\n"),
            "{host}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{host}: {:?}",
            t.elapsed()
        );
    }
}

/// `Request::Renew` (what `cutover renew` sends each host): a certificate that is far from due
/// is replaced at once, with the old one served until then and the other domain's left alone;
/// no domains means every routed one; a domain the proxy does not route is refused, and so is
/// a proxy whose certificates are the user's own files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_asked_for_replaces_a_certificate_at_once_and_only_its_own() {
    use cutover_proxy::{control_request, Request, Response};
    let dir = TempDir::new("acme-renew");
    let (http_port, tls_port) = (free_port(), free_port());
    let pebble = pebble(dir.path(), http_port, tls_port, 90 * 86_400);
    let blue = Backend::start("blue");
    let proxy = TlsProxy::start(
        dir.path(),
        acme(&pebble, dir.path()),
        false,
        (http_port, tls_port),
    );
    // Nothing routed yet: nothing to renew.
    match control_request(&proxy.socket, &Request::Renew { domains: vec![] }).await {
        Err(cutover_proxy::ControlError::Rejected(e)) => assert_eq!(
            e,
            "invalid request: this proxy routes no domain: there is nothing to renew"
        ),
        other => panic!("{other:?}"),
    }
    proxy.deploy("web", blue.addr, &["d.test", "e.test"]).await;
    let mut first = Vec::new();
    for d in ["d.test", "e.test"] {
        let c = wait_cert(&proxy, d, "a certificate", Duration::from_secs(30), |c| {
            c.not_after_ms.is_some()
        })
        .await;
        first.push(c.not_after_ms.unwrap());
    }
    let roots = roots_from_pem(&pebble.root_pem());
    let (addr, socket) = (proxy.tls_addr, proxy.socket.clone());
    let served = |d: &'static str| {
        let roots = roots.clone();
        async move {
            let r = get_once(addr, d, Http::H2, roots, "/").await.unwrap();
            assert_eq!((r.status, r.body.as_str()), (200, "blue\n"));
            r.leaf
        }
    };
    let d_leaf = served("d.test").await;
    let e_leaf = served("e.test").await;
    // Not due for about two months.
    let c = cert_of(&proxy, "d.test").await.unwrap();
    assert!(c.renew_at_ms.unwrap() > now_ms() + 50 * 86_400_000, "{c:?}");

    let ask = |domains: &[&str]| {
        let req = Request::Renew {
            domains: domains.iter().map(|d| d.to_string()).collect(),
        };
        let socket = socket.clone();
        async move {
            match control_request(&socket, &req).await {
                Ok(r) => Ok(r),
                Err(cutover_proxy::ControlError::Rejected(e)) => Err(e),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let renewing = |domains: &[&str]| {
        Ok(Response::Renewing {
            domains: domains.iter().map(|d| d.to_string()).collect(),
        })
    };
    assert_eq!(ask(&["D.test"]).await, renewing(&["d.test"]));
    wait_cert(
        &proxy,
        "d.test",
        "the renewal asked for",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some_and(|t| t > first[0]),
    )
    .await;
    assert_ne!(
        served("d.test").await,
        d_leaf,
        "the old certificate still served"
    );
    assert_eq!(served("e.test").await, e_leaf, "e.test renewed too");
    assert_eq!(
        cert_of(&proxy, "e.test").await.unwrap().not_after_ms,
        Some(first[1])
    );

    // None named: every routed domain.
    assert_eq!(ask(&[]).await, renewing(&["d.test", "e.test"]));
    wait_cert(
        &proxy,
        "e.test",
        "the renewal of every domain",
        Duration::from_secs(30),
        |c| c.not_after_ms.is_some_and(|t| t > first[1]),
    )
    .await;
    assert_ne!(served("e.test").await, e_leaf);

    assert_eq!(
        ask(&["d.test", "other.test"]).await,
        Err("invalid request: other.test is not a domain this proxy routes".into())
    );
    proxy.stop().unwrap();

    // A proxy serving the user's own certificate files has nothing to renew.
    let ca = harness::Ca::new();
    let (cert, key, _) = ca.leaf(&["d.test"]);
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let files = TlsMode::Files {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let proxy = TlsProxy::start(dir.path(), files, false, (0, 0));
    assert_eq!(proxy.socket, socket);
    proxy.deploy("web", blue.addr, &["d.test"]).await;
    assert_eq!(
        ask(&[]).await,
        Err("invalid request: this proxy's certificates are not from ACME (tls is not \"acme\"): there is nothing to renew".into())
    );
    proxy.stop().unwrap();
}

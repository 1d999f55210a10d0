//! `[proxy] tls` end to end. `tls = "files"`: `cutover setup` carries the TLS settings to the
//! host's proxy, a container app deployed through it is served over HTTPS with HTTP/2 and
//! HTTP/1.1 (curl, trusting a test CA made here with rcgen), plain HTTP from outside the host
//! is redirected (cutover's own verification, from the host, is not), and `cutover status`
//! shows the certificate. `tls = "acme"`: the same path against a real ACME server (testlab's
//! [`Pebble`], listening on the root side of the host's veth, validating against the host's
//! proxy), one certificate per app domain, a failing order shown by `cutover status`, and
//! `cutover renew` (a new certificate at once for the app's domain, or why it failed); and
//! an app on two hosts that reach each other, Pebble validating at one of them only: both get
//! their certificates (the other host's HTTP-01 answer is relayed by its peer).

use crate::world::{wait_for, World, PROXY_PORT};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;
use testlab::{Pebble, PebbleOptions};

/// A test CA and a leaf for `site.test` in `dir`: (ca.pem, cert.pem, key.pem).
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cutover test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["site.test".to_string()]).unwrap();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "site.test");
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let path = |n: &str| dir.join(n).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    (path("ca.pem"), path("cert.pem"), path("key.pem"))
}

/// `curl` over HTTPS to `domain` on host `ip` (port 8443): the body and the HTTP version, or
/// curl's error.
fn curl(ip: std::net::Ipv4Addr, domain: &str, ca: &str, http: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", http, "--cacert", ca])
        .args(["--resolve", &format!("{domain}:8443:{ip}")])
        .args(["-w", " %{http_version}", &format!("https://{domain}:8443/")])
        .output()
        .expect("curl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[test]
fn a_tls_files_app_is_served_over_https_h2_and_h1_and_plain_http_is_redirected() {
    let certs = std::env::temp_dir().join(format!("cutover-https-{}", std::process::id()));
    let (ca, cert, key) = certificates(&certs);
    let w = World::containers(1, "blue-green")
        .set("proxy", "tls", "\"files\"")
        .set("proxy", "cert", &format!("{cert:?}"))
        .set("proxy", "key", &format!("{key:?}"))
        .set("proxy", "listen_tls", "\"0.0.0.0:8443\"")
        .set("proxy", "redirect_http", "true")
        .start();
    w.image("t1", true);
    w.deploy_ok("t1");
    let ip = w.lab().ip(0);
    assert_eq!(curl(ip, "site.test", &ca, "--http2"), "t1\n 2");
    assert_eq!(curl(ip, "site.test", &ca, "--http1.1"), "t1\n 1.1");
    // From outside the host, plain HTTP is redirected to https.
    assert!(
        w.get(0, "/").starts_with("HTTP HTTP/1.1 308"),
        "{}",
        w.get(0, "/")
    );
    let s = w.run(&["status"]);
    assert!(
        s.stdout
            .contains(": certificate every name (files): expires in "),
        "{}",
        s.stdout
    );
    // The user's own certificate files are not cutover's to renew.
    let r = w.run(&["renew"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert_eq!(
        r.stderr.trim(),
        "error: [proxy] tls is not \"acme\": cutover renew orders ACME certificates"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// Switches the world's config to app `app` serving `domain` (same host, same proxy).
fn app_with_domain(w: &World, app: &str, domain: &str, acme: &[(&str, String)]) {
    let (app, domain) = (app.to_string(), domain.to_string());
    let acme: Vec<(String, String)> = acme
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    w.configure(move |t| {
        t.set_str("", "app", &app)
            .set_str("container", "domain", &domain);
        for (k, v) in &acme {
            t.set("proxy", k, v);
        }
    });
}

#[test]
fn an_acme_app_gets_a_certificate_per_domain_from_pebble_and_a_failing_order_shows_in_status() {
    let w = World::containers(1, "blue-green").start();
    let (ip, gateway) = (w.lab().ip(0), w.lab().gateway(0));
    // Pebble on this machine's side of the host's veth; every name resolves to the host,
    // whose proxy answers HTTP-01 on its plain port and TLS-ALPN-01 on 8443.
    let mut pebble = Pebble::start(
        &w.dir.join("pebble"),
        &PebbleOptions {
            listen: gateway.into(),
            answer: ip,
            http_port: PROXY_PORT,
            tls_port: 8443,
            validity_s: 90 * 86_400,
        },
    );
    let mut acme = acme_settings(&pebble).to_vec();
    acme.push(("redirect_http", "true".to_string()));
    // TLS is turned on for a host already set up: `setup` again restarts its proxy.
    app_with_domain(&w, "web", "a.test", &acme);
    let r = w.run(&["setup"]);
    assert_eq!(r.code, 0, "setup: {}{}", r.stdout, r.stderr);
    w.image("t1", true);
    w.deploy_ok("t1");
    // A second app on the same host, with a domain of its own.
    app_with_domain(&w, "api", "b.test", &acme);
    w.deploy_ok("t1");

    // Served over HTTPS with certificates chaining to Pebble's root (curl checks the chain and
    // the name), as soon as the orders complete.
    let root = w.dir.join("pebble-root.pem");
    std::fs::write(&root, pebble.root_pem()).unwrap();
    let root = root.display().to_string();
    for (domain, http, want) in [
        ("a.test", "--http2", "t1\n 2"),
        ("b.test", "--http1.1", "t1\n 1.1"),
    ] {
        wait_for(Duration::from_secs(90), domain, || {
            let got = curl(ip, domain, &root, http);
            if got == want {
                Ok(())
            } else {
                Err(got)
            }
        });
    }
    // Each domain has its own key and certificate: 0600 in a 0700 directory under
    // install_dir, with the account.
    let dir = w.lab().srv_dir(0).join("cutover/acme");
    let mode = |f: &str| {
        std::fs::metadata(dir.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for f in [
        "a.test.key",
        "a.test.crt",
        "b.test.key",
        "b.test.crt",
        "account.json",
    ] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_ne!(read("a.test.crt"), read("b.test.crt"));
    assert_ne!(read("a.test.key"), read("b.test.key"));
    let s = w.run(&["status"]);
    // Pebble's certificates here last 90 days (as Let's Encrypt's): renewal is due with a
    // third of that left, or at a time in the window Pebble's renewal information suggests, a
    // day either side of it.
    let host = w.lab().destination(0);
    let line = s
        .stdout
        .lines()
        .find(|l| l.contains("certificate b.test (acme): "))
        .unwrap_or_else(|| panic!("{}", s.stdout))
        .trim();
    let renewal = line
        .strip_prefix(&format!(
            "{host}: certificate b.test (acme): expires in 89d 23h, "
        ))
        .and_then(|l| l.strip_prefix("renewal in "))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        ["58d ", "59d ", "60d "]
            .iter()
            .any(|d| renewal.starts_with(d))
            && renewal.ends_with('h'),
        "{line}"
    );

    // `cutover renew`: b.test (this app's domain) gets a new certificate now, two months
    // before it is due; a.test (the other app's) keeps its own.
    let (a_before, b_before) = (read("a.test.crt"), read("b.test.crt"));
    let r = w.run(&["renew"]);
    assert_eq!(r.code, 0, "renew: {}{}", r.stdout, r.stderr);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["HOST", "DOMAIN", "OUTCOME", "EXPIRES", "ERROR"],
            vec![host.as_str(), "b.test", "renewed", "in", "89d", "23h"],
        ],
        "{}",
        r.stdout
    );
    assert_ne!(read("b.test.crt"), b_before);
    assert_eq!(read("a.test.crt"), a_before);
    assert_eq!(curl(ip, "b.test", &root, "--http1.1"), "t1\n 1.1");

    // The CA goes down; a third domain's order fails: `cutover status` says what failed and
    // when it is tried again, and the domains served so far keep their certificates.
    pebble.kill();
    app_with_domain(&w, "third", "c.test", &acme);
    w.deploy_ok("t1");
    let line = wait_for(Duration::from_secs(60), "the failed order", || {
        let s = w.run(&["status"]);
        s.stdout
            .lines()
            .find(|l| l.contains("certificate c.test (acme): none yet; FAILED "))
            .map(|l| l.trim().to_string())
            .ok_or(s.stdout)
    });
    assert!(
        line.starts_with(&format!(
            "{host}: certificate c.test (acme): none yet; FAILED "
        )),
        "{line}"
    );
    let (_, why) = line
        .split_once(" ago: ")
        .unwrap_or_else(|| panic!("{line}"));
    assert!(why.starts_with("new order: "), "{line}");
    assert!(why.contains("onnection refused"), "{line}");
    assert!(why.contains("; next try in "), "{line}");
    assert_eq!(curl(ip, "a.test", &root, "--http2"), "t1\n 2");

    // Asked for a renewal with the CA down, the proxy tries at once, and `cutover renew` says
    // it failed and why (exit 1).
    let r = w.run(&["renew", "--json"]);
    assert_eq!(r.code, 1, "renew: {}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["host"], host.as_str(), "{v}");
    assert_eq!(v[0]["domain"], "c.test", "{v}");
    assert_eq!(v[0]["outcome"], "failed", "{v}");
    let why = v[0]["error"].as_str().unwrap_or_default();
    assert!(why.starts_with("new order: "), "{v}");
    assert!(why.contains("onnection refused"), "{v}");
}

/// The `tls = "acme"` settings for `pebble`, as `app_with_domain` takes them.
fn acme_settings(pebble: &Pebble) -> [(&'static str, String); 5] {
    [
        ("tls", "\"acme\"".to_string()),
        ("acme_email", "\"ops@site.test\"".to_string()),
        ("acme_directory", format!("{:?}", pebble.directory)),
        (
            "acme_ca_file",
            format!("{:?}", pebble.ca_file.display().to_string()),
        ),
        ("listen_tls", "\"0.0.0.0:8443\"".to_string()),
    ]
}

#[test]
fn both_hosts_of_an_acme_app_get_certificates_though_the_cas_validation_reaches_one() {
    let w = World::containers(2, "blue-green").start();
    // Two servers of one network: each reaches the other's port 80 (here PROXY_PORT).
    w.lab().route_between_hosts();
    let (ip0, ip1) = (w.lab().ip(0), w.lab().ip(1));
    // The domain resolves to host 0 only (DNS naming one server, or a load balancer sending
    // the CA to one): host 1's orders are validated at host 0, which asks host 1.
    let pebble = Pebble::start(
        &w.dir.join("pebble"),
        &PebbleOptions {
            listen: w.lab().gateway(0).into(),
            answer: ip0,
            http_port: PROXY_PORT,
            tls_port: 8443,
            validity_s: 90 * 86_400,
        },
    );
    app_with_domain(&w, "web", "a.test", &acme_settings(&pebble));
    let r = w.run(&["setup"]);
    assert_eq!(r.code, 0, "setup: {}{}", r.stdout, r.stderr);
    // `setup` told each host's proxy where the other's is.
    for (i, other) in [(0, ip1), (1, ip0)] {
        let args = std::fs::read_to_string(w.lab().srv_dir(i).join("cutover/proxy.args"))
            .unwrap_or_else(|e| panic!("host {i}'s proxy.args: {e}"));
        assert!(
            args.trim_end()
                .ends_with(&format!(" --acme-peers {other}:{PROXY_PORT}")),
            "host {i}: {args}"
        );
    }
    w.image("t1", true);
    w.deploy_ok("t1");
    let root = w.dir.join("pebble-root.pem");
    std::fs::write(&root, pebble.root_pem()).unwrap();
    let root = root.display().to_string();
    for ip in [ip0, ip1] {
        wait_for(Duration::from_secs(60), &format!("a.test on {ip}"), || {
            let got = curl(ip, "a.test", &root, "--http2");
            if got == "t1\n 2" {
                Ok(())
            } else {
                Err(got)
            }
        });
    }
    let s = w.run(&["status"]);
    for i in 0..2 {
        let host = w.lab().destination(i);
        assert!(
            s.stdout.lines().any(|l| l.trim().starts_with(&format!(
                "{host}: certificate a.test (acme): expires in 89d "
            ))),
            "{}",
            s.stdout
        );
    }
    let cert = |i: usize| std::fs::read(w.lab().srv_dir(i).join("cutover/acme/a.test.crt"));
    assert_ne!(cert(0).unwrap(), cert(1).unwrap());
}

//! `[proxy] tls = "files"` end to end: `cutover setup` carries the TLS settings to the host's
//! proxy, a container app deployed through it is served over HTTPS with HTTP/2 and HTTP/1.1
//! (curl, trusting a test CA made here with rcgen), plain HTTP from outside the host is
//! redirected (cutover's own verification, from the host, is not), and `cutover status`
//! shows the certificate.

use crate::world::World;
use std::process::Command;

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

/// `curl` over HTTPS to host `ip`: the body and the HTTP version, or curl's error.
fn curl(ip: std::net::Ipv4Addr, ca: &str, http: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", http, "--cacert", ca])
        .args(["--resolve", &format!("site.test:8443:{ip}")])
        .args(["-w", " %{http_version}", "https://site.test:8443/"])
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
    assert_eq!(curl(ip, &ca, "--http2"), "t1\n 2");
    assert_eq!(curl(ip, &ca, "--http1.1"), "t1\n 1.1");
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
    let _ = std::fs::remove_dir_all(&certs);
}

//! A real ACME server for tests: Debian's `pebble` (2.6, from Debian 13: it answers ACME Renewal
//! Information, RFC 9773, and takes `replaces` in orders), with `pebble-challtestsrv` as its DNS
//! server answering one address for every name (so every test domain resolves to the proxy
//! under test). Pebble's own HTTPS certificate is made here by a throwaway CA (rcgen), written
//! to [`Pebble::ca_file`] for the client to trust (`acme_ca_file`); the root that signs the
//! certificates Pebble issues is [`Pebble::root_pem`], from its management interface.
//!
//! Settings: `PEBBLE_VA_NOSLEEP=1` (no random validation delay), `PEBBLE_WFE_NONCEREJECT=0`
//! (no random bad nonces), `certificateValidityPeriod` as asked (short, so that renewal comes
//! during a test), `httpPort`/`tlsPort` pointed at the proxy. Validation is real (never
//! `PEBBLE_VA_ALWAYS_VALID`). Both processes are killed when the [`Pebble`] is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where and how [`Pebble::start`] runs Pebble.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// The address Pebble (directory and management API) listens on; it must be reachable
    /// from the ACME client (for a lab host: the root side of its veth, see
    /// [`crate::Lab::gateway`]).
    pub listen: IpAddr,
    /// The address every name resolves to for validation: the proxy's host.
    pub answer: Ipv4Addr,
    /// The port HTTP-01 validation connects to.
    pub http_port: u16,
    /// The port TLS-ALPN-01 validation connects to.
    pub tls_port: u16,
    /// How long the certificates Pebble issues are valid, in seconds.
    pub validity_s: u64,
}

/// A running Pebble and its DNS server; see the module documentation.
pub struct Pebble {
    pebble: Option<Child>,
    dns: Child,
    /// The ACME directory URL (`https://LISTEN:PORT/dir`).
    pub directory: String,
    /// Pebble's management API (HTTPS, same CA as the directory).
    pub management: SocketAddr,
    /// The PEM of the CA that made Pebble's own HTTPS certificate (`acme_ca_file`).
    pub ca_file: PathBuf,
}

/// A free port on `ip` (bound, then released).
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A throwaway CA and a leaf for `ip` signed by it: (CA PEM, leaf PEM, leaf key PEM).
fn https_certificate(ip: IpAddr) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "testlab pebble CA");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), ip.to_string()])
        .expect("leaf params")
        .signed_by(&key, &ca)
        .expect("leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

impl Pebble {
    /// Starts Pebble and its DNS server with `opts`, keeping their config and logs in `dir`
    /// (`pebble.log`, `challtestsrv.log`), and waits until Pebble listens.
    pub fn start(dir: &Path, opts: &PebbleOptions) -> Pebble {
        std::fs::create_dir_all(dir).expect("pebble dir");
        let (ca, cert, key) = https_certificate(opts.listen);
        let ca_file = dir.join("pebble-ca.pem");
        std::fs::write(&ca_file, ca).expect("write pebble-ca.pem");
        std::fs::write(dir.join("pebble.crt"), cert).expect("write pebble.crt");
        std::fs::write(dir.join("pebble.key"), key).expect("write pebble.key");
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (listen, mgmt) = (free_port(opts.listen), free_port(opts.listen));
        let (dns, dns_mgmt) = (free_port(loopback), free_port(loopback));
        let at = |p: u16| SocketAddr::new(opts.listen, p).to_string();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": at(listen),
                "managementListenAddress": at(mgmt),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": opts.http_port,
                "tlsPort": opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": opts.validity_s,
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).expect("pebble.json");
        let log = |name: &str| std::fs::File::create(dir.join(name)).expect("log file");
        let dns_child = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", &opts.answer.to_string(), "-defaultIPv6", ""])
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
            directory: format!("https://{}/dir", at(listen)),
            management: SocketAddr::new(opts.listen, mgmt),
            ca_file,
        };
        let t = Instant::now();
        while TcpStream::connect((opts.listen, listen)).is_err()
            || TcpStream::connect(p.management).is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "pebble did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// The root that signs the certificates Pebble issues (PEM), from its management API
    /// (with `curl`, trusting [`Pebble::ca_file`]).
    pub fn root_pem(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(&self.ca_file)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "pebble's root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("PEM")
    }

    /// Stops Pebble (its DNS server keeps running): the CA is down.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

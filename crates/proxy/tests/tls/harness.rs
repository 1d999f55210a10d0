//! TLS test scaffolding: a proxy serving TLS on port 0, a test CA made with rcgen, and an
//! HTTPS client (HTTP/1.1 or HTTP/2 by ALPN, keep-alive or a fresh connection per request)
//! that counts every failed request.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover_proxy::{
    bind_control, control_request, serve_with_tls, DeployOptions, DeployRequest, Limits,
    ProxyConfig, Request, Response, StatusReport, TlsMode,
};
use http_body_util::{BodyExt, Empty};
use hyper::Version;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// A proxy with TLS, in a runtime thread of its own.
pub struct TlsProxy {
    pub addr: SocketAddr,
    pub tls_addr: SocketAddr,
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), cutover_proxy::Error>>>,
}

impl TlsProxy {
    /// Starts a proxy with `tls` and `redirect_http`; `ports` are the plain and TLS ports
    /// to bind (0: any).
    pub fn start(dir: &Path, tls: TlsMode, redirect_http: bool, ports: (u16, u16)) -> TlsProxy {
        TlsProxy::start_with(dir, tls, redirect_http, ports, "127.0.0.1", |_| {})
    }

    /// [`TlsProxy::start`] on any ports, with `limits`.
    pub fn start_limited(dir: &Path, tls: TlsMode, limits: Limits) -> TlsProxy {
        TlsProxy::start_with(dir, tls, false, (0, 0), "127.0.0.1", move |c| {
            c.limits = limits;
        })
    }

    /// [`TlsProxy::start`] on any port of `ip` (`addr` and `tls_addr` are then on loopback).
    pub fn start_on(dir: &Path, tls: TlsMode, redirect_http: bool, ip: &str) -> TlsProxy {
        TlsProxy::start_on_with(dir, tls, redirect_http, ip, |_| {})
    }

    /// [`TlsProxy::start_on`], its config changed by `configure` before it starts.
    pub fn start_on_with(
        dir: &Path,
        tls: TlsMode,
        redirect_http: bool,
        ip: &str,
        configure: impl FnOnce(&mut ProxyConfig) + Send + 'static,
    ) -> TlsProxy {
        let mut p = TlsProxy::start_with(dir, tls, redirect_http, (0, 0), ip, configure);
        p.addr.set_ip([127, 0, 0, 1].into());
        p.tls_addr.set_ip([127, 0, 0, 1].into());
        p
    }

    fn start_with(
        dir: &Path,
        tls: TlsMode,
        redirect_http: bool,
        ports: (u16, u16),
        ip: &str,
        configure: impl FnOnce(&mut ProxyConfig) + Send + 'static,
    ) -> TlsProxy {
        let ip = ip.to_string();
        let socket = dir.join("proxy.sock");
        let state = dir.join("state.json");
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let plain = tokio::net::TcpListener::bind((ip.as_str(), ports.0))
                    .await
                    .unwrap();
                let tls_l = tokio::net::TcpListener::bind((ip.as_str(), ports.1))
                    .await
                    .unwrap();
                let addr = plain.local_addr().unwrap();
                let tls_addr = tls_l.local_addr().unwrap();
                let control = bind_control(&sock)?;
                let mut config = ProxyConfig::new(addr, sock, state);
                config.tls = tls;
                config.listen_tls = tls_addr;
                config.redirect_http = redirect_http;
                configure(&mut config);
                let r = serve_with_tls(config, plain, Some(tls_l), control, async {
                    let _ = tx.send((addr, tls_addr));
                    let _ = stop_rx.await;
                })
                .await;
                r
            })
        });
        let (addr, tls_addr) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => panic!(
                "the proxy did not start: {:?}",
                thread.join().unwrap().err()
            ),
        };
        TlsProxy {
            addr,
            tls_addr,
            socket,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub async fn deploy(&self, service: &str, target: SocketAddr, domains: &[&str]) {
        let req = Request::Deploy(DeployRequest {
            service: service.into(),
            target: target.to_string(),
            health_path: "/up".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            options: DeployOptions {
                health_interval: Duration::from_millis(20),
                healthy_after: 2,
                give_up_after: Duration::from_secs(3),
                timeout: Duration::from_secs(1),
                drain: Duration::from_secs(5),
            },
        });
        match control_request(&self.socket, &req).await.unwrap() {
            Response::Deployed(_) => {}
            other => panic!("deploy failed: {other:?}"),
        }
    }

    /// A hold switch: pause (holding new requests), switch the target, resume.
    pub async fn hold_switch(&self, service: &str, target: SocketAddr, domains: &[&str]) {
        let pause = Request::Pause {
            service: service.into(),
            hold_ms: Some(10_000),
            drain_ms: Some(5_000),
        };
        match control_request(&self.socket, &pause).await.unwrap() {
            Response::Paused(_) => {}
            other => panic!("pause failed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.deploy(service, target, domains).await;
        let resume = Request::Resume {
            service: service.into(),
        };
        match control_request(&self.socket, &resume).await.unwrap() {
            Response::Resumed { .. } => {}
            other => panic!("resume failed: {other:?}"),
        }
    }

    pub async fn status(&self) -> StatusReport {
        match control_request(&self.socket, &Request::Status)
            .await
            .unwrap()
        {
            Response::Status(s) => s,
            other => panic!("status failed: {other:?}"),
        }
    }

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
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A test CA.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cutover test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        Arc::new(roots)
    }

    /// A leaf for `names`: (certificate PEM, key PEM, DER).
    pub fn leaf(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
}

/// Roots from PEM text.
pub fn roots_from_pem(pem: &str) -> Arc<RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// Which HTTP a client speaks over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http {
    H1,
    H2,
}

/// One HTTPS response.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub version: Version,
    pub body: String,
    pub location: Option<String>,
    /// The server's leaf certificate on this connection.
    pub leaf: CertificateDer<'static>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// An HTTPS client of one connection (reopened when it breaks, or for every request if not
/// keep-alive).
pub struct Client {
    addr: SocketAddr,
    sni: String,
    http: Http,
    roots: Arc<RootCertStore>,
    conn: Option<(Sender, CertificateDer<'static>)>,
    /// Connections opened so far.
    pub connects: usize,
}

impl Client {
    pub fn new(addr: SocketAddr, sni: &str, http: Http, roots: Arc<RootCertStore>) -> Client {
        Client {
            addr,
            sni: sni.to_string(),
            http,
            roots,
            conn: None,
            connects: 0,
        }
    }

    /// Whether the client's connection was closed (by the server: a GOAWAY, or the end of
    /// the stream); true with no connection.
    pub fn is_closed(&self) -> bool {
        match &self.conn {
            None => true,
            Some((Sender::H1(s), _)) => s.is_closed(),
            Some((Sender::H2(s), _)) => s.is_closed(),
        }
    }

    async fn connect(&self) -> Result<(Sender, CertificateDer<'static>), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = match self.http {
            Http::H1 => vec![b"http/1.1".to_vec()],
            Http::H2 => vec![b"h2".to_vec()],
        };
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(self.sni.clone()).map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no peer certificate")?;
        let alpn = session.alpn_protocol().map(|a| a.to_vec());
        let io = TokioIo::new(tls);
        let sender = match self.http {
            Http::H1 => {
                if alpn.as_deref() != Some(b"http/1.1") {
                    return Err(format!("ALPN {alpn:?}, not http/1.1"));
                }
                let (s, c) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("h1 handshake: {e}"))?;
                tokio::spawn(c);
                Sender::H1(s)
            }
            Http::H2 => {
                if alpn.as_deref() != Some(b"h2") {
                    return Err(format!("ALPN {alpn:?}, not h2"));
                }
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
                tokio::spawn(c);
                Sender::H2(s)
            }
        };
        Ok((sender, leaf))
    }

    /// GET `path`; `keep`: keep the connection for the next request.
    pub async fn get(&mut self, path: &str, keep: bool) -> Result<Answer, String> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
            self.connects += 1;
        }
        let (sender, leaf) = self.conn.as_mut().unwrap();
        let leaf = leaf.clone();
        let builder = hyper::Request::get(path);
        let resp = match sender {
            Sender::H1(s) => {
                let req = builder
                    .header("host", &self.sni)
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.map_err(|e| format!("h1 ready: {e}"))?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                let uri = format!("https://{}{path}", self.sni);
                let req = hyper::Request::get(uri)
                    .version(Version::HTTP_2)
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
                s.send_request(req).await
            }
        };
        let result = async {
            let resp = resp.map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let version = resp.version();
            let location = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .map(str::to_string);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(Answer {
                status,
                version,
                body: String::from_utf8_lossy(&body).into_owned(),
                location,
                leaf,
            })
        }
        .await;
        if result.is_err() || !keep {
            self.conn = None;
        }
        result
    }
}

/// One HTTPS GET on a fresh connection.
pub async fn get_once(
    addr: SocketAddr,
    sni: &str,
    http: Http,
    roots: Arc<RootCertStore>,
    path: &str,
) -> Result<Answer, String> {
    Client::new(addr, sni, http, roots).get(path, false).await
}

/// HTTPS load: clients of every kind (HTTP/1.1 keep-alive and fresh connections, HTTP/2
/// keep-alive), each sending GET / in a loop and counting failures (anything but a 200 from a
/// known backend).
pub struct HttpsLoad {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl HttpsLoad {
    pub fn start(
        addr: SocketAddr,
        sni: &str,
        roots: Arc<RootCertStore>,
        per_kind: usize,
    ) -> HttpsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (http, keep) in [(Http::H1, true), (Http::H1, false), (Http::H2, true)] {
            for _ in 0..per_kind {
                let mut client = Client::new(addr, sni, http, roots.clone());
                let (stop, ok) = (stop.clone(), ok.clone());
                tasks.push(tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get("/", keep).await {
                            Ok(a) if a.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(a) => failures.push(format!("{http:?} {}: {}", a.status, a.body)),
                            Err(e) => failures.push(format!("{http:?} keep={keep}: {e}")),
                        }
                    }
                    failures
                }));
            }
        }
        HttpsLoad { stop, ok, tasks }
    }

    /// Stops the load: (requests answered 200, failures).
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// A TLS client config trusting `roots` and offering one ALPN protocol.
pub fn client_config(roots: Arc<RootCertStore>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// Sends `bytes` over a fresh TLS connection (ALPN http/1.1) and returns everything read until
/// the proxy closes it (or 10 s pass).
pub async fn raw_tls(
    addr: SocketAddr,
    sni: &str,
    roots: Arc<RootCertStore>,
    bytes: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = client_config(roots, b"http/1.1");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = TlsConnector::from(config).connect(name, tcp).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

//! The TLS side of the proxy (`[proxy] tls`): the rustls server config (ring provider, ALPN
//! `h2` and `http/1.1`, plus `acme-tls/1` with ACME), serving one client connection over TLS
//! with HTTP/2 or HTTP/1.1 (requests are forwarded by [`crate::forward`] exactly as over plain
//! HTTP, to the app in HTTP/1.1), the reload of a user's certificate files, and what the plain
//! HTTP listener answers itself when TLS is on (ACME HTTP-01 tokens, the 308 to https). It
//! must not route, switch or issue certificates.
//!
//! Invariants:
//! - A TLS connection is served like a plain one: never closed because of a switch; on
//!   shutdown it gets one more request (HTTP/1.1) or a GOAWAY (HTTP/2) and the same grace.
//! - A handshake that takes longer than [`HANDSHAKE_TIMEOUT`] is dropped (a client cannot pin
//!   a connection slot by never finishing its handshake), and one the slots ask to close (to
//!   make room under the open-file limit) goes at once.
//! - hyper's part of a connection (its buffers, HTTP/2 state) is made only once the first
//!   request's head (HTTP/1.1) or header block (HTTP/2) has arrived whole; until then a
//!   connection holds its bytes and rustls' own buffers. An HTTP/2 client that sends no whole
//!   first request within `idle_timeout` is closed.
//! - An HTTP/2 connection with no request in flight for `idle_timeout` gets a GOAWAY and is
//!   closed (HTTP/1.1's idle deadline is the guard's), as is one the slots ask to close.
//! - `tls = "files"`: the files are polled; a change that loads replaces the certificate for
//!   the next handshake, one that does not is logged and shown in status, and the old
//!   certificate keeps being served.

use std::future::Future as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::certs::{self, Certs, ACME_TLS_ALPN};
use crate::forward::{self, ProxyBody};
use crate::h2exec::StreamExec;
use crate::limits::{ConnState, Slot};
use crate::log;
use crate::switch::Shared;

/// `[proxy] tls`: how (and whether) the proxy serves TLS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain HTTP only (the default).
    #[default]
    Off,
    /// The user's own certificate chain and key (PEM files on the host), for every name,
    /// reloaded when the files change.
    Files {
        /// The certificate chain, leaf first.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A certificate per routed domain from an ACME CA.
    Acme(AcmeConfig),
}

/// `tls = "acme"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The ACME directory URL.
    pub directory: String,
    /// The account's contact address, if any.
    pub email: Option<String>,
    /// The only roots trusted for the directory itself (PEM); else the system's.
    pub ca_file: Option<PathBuf>,
    /// Where the account, keys and certificates are kept (mode 0700, files 0600).
    pub dir: PathBuf,
    /// The first retry after a failure (then doubling, up to an hour).
    pub retry_after: Duration,
    /// The other hosts' proxies serving the same domains (`host:port` of their plain
    /// listener): asked for an HTTP-01 answer this proxy does not have ([`challenge`]).
    pub peers: Vec<String>,
}

impl AcmeConfig {
    /// `directory`, keeping its files in `dir`, retrying a failure after a minute first.
    pub fn new(directory: impl Into<String>, dir: impl Into<PathBuf>) -> AcmeConfig {
        AcmeConfig {
            directory: directory.into(),
            email: None,
            ca_file: None,
            dir: dir.into(),
            retry_after: Duration::from_secs(60),
            peers: Vec::new(),
        }
    }
}

/// Let's Encrypt's production directory (`acme_directory`'s default).
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Where ACME's HTTP-01 tokens are asked for (never redirected to https).
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `tls = "files"` looks at the files.
const FILES_POLL: Duration = Duration::from_secs(1);

/// What a TLS connection needs: the acceptor (over [`Certs`]).
pub(crate) struct Tls {
    acceptor: TlsAcceptor,
}

impl Tls {
    /// The server config over `certs`: TLS 1.2 and 1.3 (ring), no client auth, ALPN h2 and
    /// http/1.1 (and acme-tls/1 for TLS-ALPN-01 when `acme`).
    pub(crate) fn new(certs: Arc<Certs>, acme: bool) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certs);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if acme {
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// Serves one client connection over TLS: the handshake, then HTTP/2 or HTTP/1.1 as the
/// client chose by ALPN (HTTP/1.1 without ALPN), until the connection ends or `stop`.
///
/// This future is every TLS connection's task, so it stays small: each phase (the handshake,
/// reading the first request, serving) is boxed and freed when it ends, and hyper's part is
/// made only once the guard has read the first request's head (HTTP/1.1) or header block
/// (HTTP/2). A client that connects and
/// sends nothing, half a handshake or half a request costs its bytes and little more.
pub(crate) async fn connection(
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    // rustls' state and its first read buffer (4 KiB) are made only once the client has sent
    // something: a connection that sends nothing costs its descriptor and this task.
    let accept = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        stream.readable().await?;
        tls.acceptor.accept(stream).await
    }));
    // In a block, so that the stream is not kept in this future's state once it is moved.
    let first = {
        // Asked to close by the slots (the open-file limit is near): a handshake is not a
        // request, it goes at once.
        let stream = tokio::select! {
            r = accept => match r {
                Ok(Ok(s)) => s,
                Ok(Err(_)) | Err(_) => return,
            },
            _ = slot.state.close.notified() => return,
        };
        Box::pin(first_request(
            stream,
            &shared.config.limits,
            &slot.state,
            &stop,
        ))
    };
    let Some((io, refused, http1)) = first.await else {
        return;
    };
    Box::pin(serve(shared, io, refused, peer, slot, stop, http1)).await;
    drop(done);
}

/// A TLS connection over TCP.
type Stream = tokio_rustls::server::TlsStream<TcpStream>;

/// The guard over a TLS connection once it has read the first request (see [`connection`]),
/// and whether the connection is HTTP/1.1; `None`: the connection goes unserved (a
/// TLS-ALPN-01 validation, or see [`forward::first_head`]).
async fn first_request(
    mut stream: Stream,
    lim: &crate::limits::Limits,
    state: &Arc<ConnState>,
    stop: &watch::Receiver<bool>,
) -> Option<(
    crate::guard::Guard<Stream>,
    crate::guard::Refused<Stream>,
    bool,
)> {
    if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the answer.
        let _ = stream.shutdown().await;
        return None;
    }
    // HTTP/1.1 heads are read by the guard (as over plain HTTP); HTTP/2 frames its messages
    // itself and passes through, but for its first header block (read before hyper's part).
    let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2");
    let (mut io, refused) = crate::guard::Guard::new(stream, lim, state.clone(), http1);
    forward::first_head(&mut io, state, stop)
        .await
        .then_some((io, refused, http1))
}

/// Serves a TLS connection whose first request has arrived (see [`connection`]).
async fn serve(
    shared: Arc<Shared>,
    io: crate::guard::Guard<Stream>,
    mut refused: crate::guard::Refused<Stream>,
    peer: SocketAddr,
    slot: Slot,
    stop: watch::Receiver<bool>,
    http1: bool,
) {
    let client = HeaderValue::try_from(peer.ip().to_string()).ok();
    let trusted = crate::headers::in_ranges(&shared.config.trusted_proxies, peer.ip());
    let lim = shared.config.limits.clone();
    // The same per-request path as plain HTTP: the slot counts as busy while a request is
    // served (and while an upgraded tunnel is open), and the access log gets a line.
    let slot = Arc::new(slot);
    let state = slot.state.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // Boxed: a request's future is a few KiB, and HTTP/2 moves it several times per
        // request on its way into a task of its own (hyper spawns one per stream); a box
        // moves as a pointer.
        Box::pin(forward::serve_one(
            shared.clone(),
            req,
            client.clone(),
            slot.clone(),
            true,
            trusted,
        ))
    });
    let builder = server_builder(&lim, peer);
    {
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        // The guard keeps HTTP/1.1's idle deadline; an HTTP/2 connection is watched here.
        let idle = idle_h2(&state, lim.idle_timeout);
        tokio::pin!(idle);
        let close = state.close.notified();
        tokio::pin!(close);
        // As over plain HTTP (`forward::connection`): the wake-up for shutdown is registered
        // once (this task's waker does not change); after that a wake-up only reads the stop
        // signal's version, instead of polling the `watch` that all connections share, with
        // its lock, every time a busy connection is woken.
        let mut on_stop = stop.clone();
        let registration = on_stop.changed();
        tokio::pin!(registration);
        let mut registered = false;
        let end = std::future::poll_fn(|cx| {
            if conn.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(End::Finished);
            }
            if close.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(End::Close);
            }
            if !http1 && idle.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(End::Close);
            }
            if !registered {
                registered = true;
                if registration.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(End::Stop);
                }
            }
            if stop.has_changed().unwrap_or(true) {
                return std::task::Poll::Ready(End::Stop);
            }
            std::task::Poll::Pending
        })
        .await;
        if end == End::Close {
            // Idle too long, or asked to close by the slots: a GOAWAY (HTTP/2) or `Connection:
            // close` (HTTP/1.1); a request in flight still finishes. (A stream whose client
            // stops taking it is reset at `send_timeout`, see `crate::h2exec`.)
            conn.as_mut().graceful_shutdown();
            finish(conn.as_mut(), &state, lim.send_timeout, peer).await;
        } else if end == End::Stop {
            // As over plain HTTP: a keep-alive client gets one more answer (with
            // `Connection: close`); an HTTP/2 client gets a GOAWAY and its open streams finish.
            if tokio::time::timeout(forward::IDLE_CLOSE_AFTER_STOP, conn.as_mut())
                .await
                .is_err()
            {
                conn.as_mut().graceful_shutdown();
                finish(conn.as_mut(), &state, lim.send_timeout, peer).await;
            }
        }
    }
    if let Some((stream, leave)) = crate::guard::handed_back(&mut refused) {
        // Boxed: rare, and it must not grow every connection's task.
        Box::pin(crate::guard::wind_up(stream, leave)).await;
    }
}

/// hyper's server for a TLS connection from `peer` (HTTP/1.1 or HTTP/2, by ALPN) with the
/// proxy's limits.
fn server_builder(lim: &crate::limits::Limits, peer: SocketAddr) -> auto::Builder<StreamExec> {
    let mut builder = auto::Builder::new(StreamExec {
        peer,
        send_timeout: lim.send_timeout,
    });
    builder
        .http1()
        .writev(false)
        .half_close(true)
        // The guard keeps the header deadlines (as over plain HTTP).
        .header_read_timeout(None)
        .max_buf_size(lim.max_header_bytes.max(crate::limits::MIN_READ_BUF));
    if let Some(n) = crate::limits::hyper_max_headers(lim) {
        builder.http1().max_headers(n);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        // "Rapid reset" (CVE-2023-44487): a connection whose client cancels more than 20
        // streams before they are taken gets a GOAWAY (ENHANCE_YOUR_CALM) and is closed. It
        // is hyper's default, set here so that a change of default cannot lift it unseen.
        .max_pending_accept_reset_streams(20)
        .max_header_list_size(u32::try_from(lim.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Waits for a connection told to close (`conn`) to finish, but drops it once it has had no
/// request in flight for `send_timeout`: what holds it then is a response hyper was handed
/// whole and the client does not take (HTTP/2 flow control: no window update), which no
/// body and no write timer sees. The stream's data would otherwise stay, and the connection
/// with it, for as long as the client liked.
async fn finish<F: std::future::Future>(
    conn: std::pin::Pin<&mut F>,
    state: &ConnState,
    send_timeout: Duration,
    peer: SocketAddr,
) {
    tokio::select! {
        _ = conn => {}
        () = idle_h2(state, send_timeout) => crate::log::line(format_args!(
            "client {peer}: the connection held a response its client did not take for {} ms after its last request: closed",
            send_timeout.as_millis()
        )),
    }
}

/// Why a TLS connection's serving loop ended.
#[derive(PartialEq, Eq)]
enum End {
    Finished,
    Stop,
    Close,
}

/// Resolves once an HTTP/2 connection has had no request in flight and none started for
/// `idle` (`[proxy] idle_timeout`), at most a tick (a quarter of `idle`, at most 1 s) later.
/// A response body still streaming does not count (its stream survives the GOAWAY).
async fn idle_h2(state: &ConnState, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    // (requests started, when the connection was first seen idle with that count).
    let mut idle_since: Option<(usize, tokio::time::Instant)> = None;
    loop {
        let (busy, started) = state.activity();
        match idle_since {
            _ if busy => idle_since = None,
            Some((n, at)) if n == started => {
                if at.elapsed() >= idle {
                    return;
                }
            }
            _ => idle_since = Some((started, tokio::time::Instant::now())),
        }
        tokio::time::sleep(tick).await;
    }
}

/// The header a proxy sets when it asks a peer for an HTTP-01 answer ([`challenge`]): a
/// request carrying it is answered from the peer's own tokens only, so a relay never loops.
const RELAY_HEADER: &str = "cutover-acme-relay";
/// How long the peers have, all together, to answer a relayed HTTP-01 request.
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many HTTP-01 requests are relayed at once (past it: 404 without asking), so
/// that a flood of made-up tokens cannot make the peers' load a multiple of its own.
const RELAYS_MAX: usize = 16;
static RELAYS: AtomicUsize = AtomicUsize::new(0);

/// What the plain HTTP listener answers itself when TLS is on, before routing: an ACME
/// HTTP-01 token. `None`: route the request.
///
/// With several hosts serving one domain, the CA's validation reaches whichever host the
/// domain's DNS (or a load balancer) sends it to, not necessarily the one whose order it is.
/// A token this proxy does not have is asked of its peers ([`AcmeConfig::peers`]) for a
/// domain it routes, unless the request is itself a peer's relay ([`relay`]).
pub(crate) async fn challenge(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
) -> Option<Response<ProxyBody>> {
    let token = parts.uri.path().strip_prefix(ACME_CHALLENGE_PATH)?;
    let TlsMode::Acme(acme) = &shared.config.tls else {
        return None;
    };
    let mut answer = shared.certs.token(token);
    if answer.is_none() && !acme.peers.is_empty() && !parts.headers.contains_key(RELAY_HEADER) {
        // Boxed: rare, and its future must not grow every request's.
        answer = Box::pin(relay(shared, &acme.peers, parts, token)).await;
    }
    Some(match answer {
        Some(answer) => {
            let mut r = Response::new(ProxyBody::Local(Full::new(Bytes::from(answer))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        None => forward::local(StatusCode::NOT_FOUND, "no such ACME challenge\n"),
    })
}

/// Whether `s` is non-empty base64url, as ACME tokens and key thumbprints are.
fn base64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Asks every peer at once for `token`'s key authorization, for the domain the request names
/// if this proxy routes it; the first well-formed answer wins.
async fn relay(
    shared: &Shared,
    peers: &[String],
    parts: &hyper::http::request::Parts,
    token: &str,
) -> Option<String> {
    if token.len() > 256 || !base64url(token) {
        return None;
    }
    let host = parts.headers.get(header::HOST)?;
    shared.table.route_raw(Some(host.as_bytes()))?;
    let domain = crate::table::normalize_host(host.to_str().ok()?);
    let _permit = RelayPermit::take()?;
    let mut asks = tokio::task::JoinSet::new();
    for peer in peers {
        asks.spawn(ask_peer(peer.clone(), domain.clone(), token.to_string()));
    }
    let found = tokio::time::timeout(RELAY_TIMEOUT, async {
        while let Some(r) = asks.join_next().await {
            if let Ok(Some(found)) = r {
                return Some(found);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    match &found {
        Some((_, peer)) => log::line(format_args!(
            "acme: {domain}: answered an HTTP-01 validation with {peer}'s token"
        )),
        None => log::line(format_args!(
            "acme: {domain}: an HTTP-01 token neither this proxy nor its peers ({}) have: 404",
            peers.join(", ")
        )),
    }
    found.map(|(answer, _)| answer)
}

/// One of the [`RELAYS_MAX`] relays at once, given back when dropped (also when the client
/// goes away in the middle of it and its request's future is dropped).
struct RelayPermit;

impl RelayPermit {
    fn take() -> Option<RelayPermit> {
        if RELAYS.fetch_add(1, Ordering::Relaxed) >= RELAYS_MAX {
            RELAYS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RelayPermit)
    }
}

impl Drop for RelayPermit {
    fn drop(&mut self) {
        RELAYS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One peer's answer for `token` ([`relay`]): its key authorization (the token, a dot and a
/// base64url thumbprint) if it answers 200 with one, and the peer.
async fn ask_peer(peer: String, domain: String, token: String) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(peer.as_str()).await.ok()?;
    let ask = format!(
        "GET {ACME_CHALLENGE_PATH}{token} HTTP/1.1\r\nHost: {domain}\r\n{RELAY_HEADER}: 1\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(ask.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    s.take(4096).read_to_end(&mut got).await.ok()?;
    let text = std::str::from_utf8(&got).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let (t, thumbprint) = body.split_once('.')?;
    (head.starts_with("HTTP/1.1 200 ") && t == token && base64url(thumbprint))
        .then(|| (body.to_string(), peer))
}

/// With `redirect_http`, the 308 a routed plain-HTTP request gets: the same host and path
/// on https (with `listen_tls`'s port unless it is 443). Requests from the host itself
/// (`client` is a loopback address) are not redirected: cutover's own post-switch
/// verification reaches the proxy's plain listener through the SSH connection, from loopback.
pub(crate) fn redirect(
    shared: &Shared,
    client: Option<&HeaderValue>,
    host: Option<&HeaderValue>,
    path_and_query: &str,
) -> Option<Response<ProxyBody>> {
    if !shared.config.redirect_http
        || shared.config.tls == TlsMode::Off
        || path_and_query.starts_with(ACME_CHALLENGE_PATH)
    {
        return None;
    }
    let local = client
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.parse::<std::net::IpAddr>().ok())
        .is_none_or(|ip| ip.is_loopback());
    if local {
        return None;
    }
    let host = host.and_then(|h| h.to_str().ok())?;
    let name = crate::table::normalize_host(host);
    let port = shared.config.listen_tls.port();
    let authority = match (port, name.contains(':')) {
        (443, false) => name,
        (443, true) => format!("[{name}]"),
        (p, false) => format!("{name}:{p}"),
        (p, true) => format!("[{name}]:{p}"),
    };
    let location = format!("https://{authority}{path_and_query}");
    let value = HeaderValue::try_from(location).ok()?;
    let mut r = forward::local(StatusCode::PERMANENT_REDIRECT, "moved to https\n");
    r.headers_mut().insert(header::LOCATION, value);
    Some(r)
}

/// Loads the user's files for `tls = "files"`; the error names the file and what is wrong.
pub(crate) fn load_files(certs: &Certs, cert: &Path, key: &Path) -> Result<(), String> {
    let loaded = certs::load_files(cert, key)?;
    install_files(certs, &loaded);
    Ok(())
}

fn install_files(certs: &Certs, loaded: &certs::Loaded) {
    certs.install(certs::ANY, loaded.key.clone());
    certs.update(certs::ANY, |h| {
        h.source = "files";
        h.not_after_ms = Some(loaded.not_after_ms);
        h.last_error = None;
        h.failed_at_ms = None;
    });
}

/// A file's identity for change detection: modification time, size and inode.
fn stamp(p: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// `tls = "files"`: polls the files every second until `stop`; a change that loads replaces
/// the certificate, one that does not keeps the old one and says why (log and status).
pub(crate) async fn watch_files(
    shared: Arc<Shared>,
    cert: PathBuf,
    key: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = (stamp(&cert), stamp(&key));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FILES_POLL) => {}
            _ = forward::stopped(&mut stop) => return,
        }
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        seen = now;
        match certs::load_files(&cert, &key) {
            Ok(loaded) => {
                install_files(&shared.certs, &loaded);
                log::line(format_args!(
                    "reloaded the certificate from {} (expires {})",
                    cert.display(),
                    log::rfc3339(loaded.not_after_ms)
                ));
            }
            Err(e) => {
                log::line(format_args!(
                    "keeping the current certificate: the new files do not load: {e}"
                ));
                shared.certs.update(certs::ANY, |h| {
                    h.source = "files";
                    h.last_error = Some(e);
                    h.failed_at_ms = Some(log::unix_ms(SystemTime::now()));
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn relays_are_capped_and_a_dropped_one_gives_its_place_back() {
        let held: Vec<RelayPermit> = (0..RELAYS_MAX)
            .map(|_| RelayPermit::take().unwrap())
            .collect();
        assert!(RelayPermit::take().is_none());
        drop(held);
        // A relay whose request went away mid-way (its future dropped) frees its place too.
        let future = async {
            let _p = RelayPermit::take();
            std::future::pending::<()>().await;
        };
        let mut future = Box::pin(future);
        let waker = std::task::Waker::noop();
        let _ = future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert_eq!(RELAYS.load(Ordering::Relaxed), 1);
        drop(future);
        assert_eq!(RELAYS.load(Ordering::Relaxed), 0);
        assert!(RelayPermit::take().is_some());
    }

    #[test]
    fn tokens_and_thumbprints_are_base64url() {
        assert!(base64url("fEIXj1XkYvggNq9_xNyp650geWmYHivRvI2tv3fZrsk"));
        for bad in ["", "a.b", "a b", "../x", "a%2F", "é"] {
            assert!(!base64url(bad), "{bad:?}");
        }
    }
}

//! The HTTP side: serves a client connection ([`crate::workers`] accepts it), routes each
//! request by `Host` to its service, holds it while the service is paused, and forwards it to
//! the target that is current when the request starts, over a pooled keep-alive connection
//! ([`crate::upstream`]). It owns the client-side connections (the header rewriting is
//! [`crate::headers`]'); it must not change the routing table.
//!
//! Invariants:
//! - A client connection is never closed because of a switch or a pause: it is not tied to a
//!   target, and an upstream failure becomes a 502 response on a connection that stays open.
//! - A request takes its target exactly once ([`crate::table::Service::acquire`], after any
//!   pause) and keeps the in-flight guard until its response body has been fully sent or
//!   dropped.
//! - Hop-by-hop headers are stripped in both directions (but `Upgrade` on a request that asks
//!   for one, see `upgrade`); `X-Forwarded-For` is replaced with the client's address (this is
//!   the edge: nothing before it is trusted, but proxies in `trusted_proxies`, whose chain is
//!   kept and appended to), `X-Forwarded-Proto` and `X-Forwarded-Host` are set (or, from a
//!   trusted proxy, kept), and forgeable forwarding headers are dropped (`headers`). The app
//!   sees the `Host` the client asked for, never the target's address.
//! - A request body is read ahead (up to `limits::BODY_BUFFER`) before an upstream connection
//!   is taken, so a client that stalls early never holds one.
//! - A request is retried at most once: if its upstream connection failed before the request
//!   was written (whatever the request), or if it has no body and an idempotent method and it
//!   failed to connect, or failed on a pooled connection the upstream may have closed under
//!   our feet (for hyper's client: one idle for 100 ms or more; for a `direct` exchange: any
//!   pooled connection that ended before a byte of response); nothing else is ever retried.
//! - Everything of one client connection stays on the worker thread that serves it.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::deadline;
use crate::direct::{self, DirectBody, Reached};
use crate::guard;
use crate::headers;
use crate::limits::{self, BodyFault, ClientBody, Slot, TimedBody};
use crate::log;
use crate::switch::Shared;
use crate::table::InFlight;
use crate::tls;
use crate::upgrade;
use crate::upstream::{self, ReqBody};

/// Body type of health probes.
pub(crate) type UpstreamBody = BoxBody<Bytes, hyper::Error>;
/// The pooled client of health probes (forwarded requests use [`upstream`]).
pub(crate) type Upstream = Client<HttpConnector, UpstreamBody>;

/// Upstream connect timeout of health probes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections of health probes are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(4);

pub(crate) fn upstream_client() -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(64)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// An empty upstream request body.
pub(crate) fn empty_body() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// How long a keep-alive connection may stay idle after shutdown began before it is closed.
pub(crate) const IDLE_CLOSE_AFTER_STOP: Duration = Duration::from_secs(3);

/// Completes when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits for the guard to read a connection's first head before hyper makes its buffers (a
/// connection that sends nothing or half a head costs its bytes and little more). `false`:
/// the connection goes without being served: asked to close (it is idle), or shutdown began
/// and it stayed idle for as long as an idle keep-alive connection gets then.
pub(crate) async fn first_head<S: tokio::io::AsyncRead + Unpin>(
    io: &mut guard::Guard<S>,
    state: &limits::ConnState,
    stop: &watch::Receiver<bool>,
) -> bool {
    let first = io.first_head();
    tokio::pin!(first);
    let mut on_stop = stop.clone();
    let done = tokio::select! {
        _ = first.as_mut() => true,
        _ = state.close.notified() => return false,
        _ = stopped(&mut on_stop) => false,
    };
    done || tokio::time::timeout(IDLE_CLOSE_AFTER_STOP, first)
        .await
        .is_ok()
}

/// A client connection that was asked to move to another worker and is idle between two
/// requests: its socket (off this thread's runtime), its slot, and the worker it goes to.
pub(crate) struct Moving {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) slot: Slot,
    pub(crate) to: usize,
}

/// Serves one client connection (`moved`: it was moved here from another worker between two
/// requests), until it ends or is to move to another worker (see
/// [`crate::limits::Slots::ask_to_move`]).
pub(crate) async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
    moved: bool,
) -> Option<Moving> {
    if !moved {
        let _ = stream.set_nodelay(true);
    }
    slot.state.set_movable();
    // The client's address, as `X-Forwarded-For` gets it, once per connection, and whether
    // it is a proxy whose forwarding headers are kept (`trusted_proxies`).
    let client = HeaderValue::try_from(peer.ip().to_string()).ok();
    let trusted = headers::in_ranges(&shared.config.trusted_proxies, peer.ip());
    let lim = shared.config.limits.clone();
    // Shared with tunnels: an upgraded connection keeps its slot (busy) until it closes.
    let slot = Arc::new(slot);
    let conn_slot = slot.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        serve_one(
            shared.clone(),
            req,
            client.clone(),
            conn_slot.clone(),
            false,
            trusted,
        )
    });
    // The guard reads every head before hyper does: it refuses ambiguous, malformed and
    // oversized ones with a plain-text answer, and keeps the header and idle deadlines.
    let (mut io, mut refused) = guard::Guard::new(stream, &lim, slot.state.clone(), true);
    if moved {
        io = io.moved();
    }
    if !first_head(&mut io, &slot.state, &stop).await {
        return None;
    }
    {
        // `writev(false)`: a response head and a small body go out as one flat buffer, which
        // costs fewer instructions per request than hyper's queue of buffers for `writev`.
        // The read buffer is capped at the head limit (hyper's own minimum is 8 KiB), so that
        // a half-sent head costs at most that much. hyper keeps no header timer: the guard's
        // deadlines cover every head, and a timer per request in hyper cost about 900
        // instructions of each; `half_close`: a client that ends its side after a request
        // still gets the answer (and so do the requests before a refused head).
        let mut builder = http1::Builder::new();
        builder
            .writev(false)
            .half_close(true)
            .header_read_timeout(None)
            .max_buf_size(lim.max_header_bytes.max(limits::MIN_READ_BUF))
            .max_header_size(lim.max_header_bytes);
        if let Some(n) = limits::hyper_max_headers(&lim) {
            builder.max_headers(n);
        }
        let conn = builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        // Asked to close by the slots (too many connections and this one is idle).
        let conn_state = slot.state.clone();
        let reclaim = conn_state.close.notified();
        tokio::pin!(reclaim);
        // Serve until the connection ends or shutdown begins. The wake-up for shutdown is
        // registered once (this task's waker does not change); after that a wake-up only
        // reads the stop signal's version, which is cheaper than polling a `watch` future
        // every time a busy connection is woken.
        let mut on_stop = stop.clone();
        let registration = on_stop.changed();
        tokio::pin!(registration);
        let mut registered = false;
        let mut reclaimed = false;
        let finished = std::future::poll_fn(|cx| {
            if conn.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            if reclaim.as_mut().poll(cx).is_ready() {
                reclaimed = true;
                return Poll::Ready(false);
            }
            if !registered {
                registered = true;
                if registration.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
            }
            if stop.has_changed().unwrap_or(true) {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        if reclaimed {
            // Idle (or in the middle of a request, which finishes first): closes at once.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        } else if !finished {
            // Keep-alive clients get one more request answered with `Connection: close`;
            // only connections that stay idle that long are closed (closing an idle
            // connection races a client that is sending).
            if tokio::time::timeout(IDLE_CLOSE_AFTER_STOP, conn.as_mut())
                .await
                .is_err()
            {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
    let moving = leave(&mut refused, slot).await;
    drop(done);
    moving
}

/// What is left to do once hyper is done with a connection (it dropped the guard): a refused
/// head is answered; a connection asked to move goes, with its slot (hyper and its service,
/// which held the slot, are gone).
async fn leave(refused: &mut guard::Refused<TcpStream>, slot: Arc<Slot>) -> Option<Moving> {
    match guard::handed_back(refused) {
        Some((stream, guard::Leave::Move(to))) => {
            match (stream.into_std(), Arc::try_unwrap(slot)) {
                (Ok(stream), Ok(slot)) => Some(Moving { stream, slot, to }),
                _ => None,
            }
        }
        handed => {
            if let Some((stream, leave)) = handed {
                // Boxed: rare, and it must not grow every connection's task.
                Box::pin(guard::wind_up(stream, leave)).await;
            }
            drop(slot);
            None
        }
    }
}

/// Serves one request of a client connection (`https`: over TLS; `trusted`: from a proxy in
/// `trusted_proxies`) and writes its access log line; the connection's slot counts as busy
/// while the request is served.
pub(crate) async fn serve_one(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    client: Option<HeaderValue>,
    slot: Arc<Slot>,
    https: bool,
    trusted: bool,
) -> Result<Response<ProxyBody>, Infallible> {
    // HTTP/2 has no `Connection` header: closing is its GOAWAY.
    let h1 = req.version() < Version::HTTP_2;
    let busy = slot.state.busy();
    let started = std::time::Instant::now();
    // The head stays here (`handle` borrows it), so that the access log reads it afterwards
    // without a copy of its parts made for every request.
    let (mut parts, body) = req.into_parts();
    let relayed = trusted.then(|| {
        headers::Relayed::read(
            &parts.headers,
            client.as_ref(),
            &shared.config.trusted_proxies,
            shared.config.trusted_proxies_header,
        )
    });
    let origin = Origin {
        peer: client.as_ref(),
        tls: https,
        client: relayed
            .as_ref()
            .map_or(client.as_ref(), |r| r.chain.as_ref()),
        https: relayed.as_ref().and_then(|r| r.https).unwrap_or(https),
        host: relayed.as_ref().and_then(|r| r.host.as_ref()),
    };
    let mut logged = Logged::default();
    let mut resp = handle(&shared, &mut parts, body, origin, &slot, &mut logged).await;
    drop(busy);
    if !h1 {
        resp.body_mut().time_client();
    }
    if let Some(log) = &shared.access {
        let (method, host, uri) = match &logged.seen {
            Some(seen) => (&seen.method, seen.host.as_ref(), &seen.uri),
            None => (&parts.method, parts.headers.get(header::HOST), &parts.uri),
        };
        let host = host
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .unwrap_or("-");
        let (svc, target) = logged.routed.as_ref().map_or(("-", "-"), |Routed(s, t)| {
            (s.name.as_str(), t.addr.as_str())
        });
        log.record(&crate::access::Entry {
            client: relayed
                .as_ref()
                .map_or(client.as_ref(), |r| r.client.as_ref())
                .and_then(|c| c.to_str().ok())
                .unwrap_or("-"),
            method: method.as_str(),
            host,
            path: uri.path(),
            // The query may carry secrets (tokens in links): only whether there was one.
            query: uri.query().is_some(),
            status: resp.status().as_u16(),
            micros: logged
                .answered
                .map_or_else(
                    || started.elapsed(),
                    |at| at.saturating_duration_since(started),
                )
                .as_micros(),
            service: svc,
            target,
        });
    }
    if h1 && shared.is_closing() {
        // Shutting down (e.g. handing over to an upgraded proxy): this is the
        // connection's last response, and the client is told so, so it reconnects
        // instead of racing a close.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok::<_, Infallible>(resp)
}

/// What [`handle`] tells the access log besides the response.
#[derive(Default)]
pub(crate) struct Logged {
    /// Where the request went, once it was sent.
    routed: Option<Routed>,
    /// The request as it came, when its head was handed on (to hyper's client) and is no
    /// longer there to read.
    seen: Option<Seen>,
    /// When the response head came back from the upstream, if the exchange read the clock
    /// then anyway (the access log's time is taken from it instead of reading it again).
    answered: Option<std::time::Instant>,
}

/// What the access log reads of a request's head.
struct Seen {
    method: Method,
    host: Option<HeaderValue>,
    uri: Uri,
}

/// Where a request came from, and what the forwarding headers tell the app about it.
#[derive(Clone, Copy)]
pub(crate) struct Origin<'a> {
    /// The connection's peer address.
    pub(crate) peer: Option<&'a HeaderValue>,
    /// The connection is TLS.
    pub(crate) tls: bool,
    /// `X-Forwarded-For`: the peer, or a trusted proxy's chain with the peer appended.
    pub(crate) client: Option<&'a HeaderValue>,
    /// `X-Forwarded-Proto` is `https`: the connection is TLS, or a trusted proxy says its
    /// client's was.
    pub(crate) https: bool,
    /// `X-Forwarded-Host` as a trusted proxy relays it (else the request's `Host`).
    pub(crate) host: Option<&'a HeaderValue>,
}

/// Serves one request from `origin` whose head is `parts`; `logged` gets where it went once
/// it was sent (for the access log).
pub(crate) async fn handle(
    shared: &Shared,
    parts: &mut hyper::http::request::Parts,
    body: Incoming,
    origin: Origin<'_>,
    slot: &Arc<Slot>,
    logged: &mut Logged,
) -> Response<ProxyBody> {
    shared.count_request();
    if let Err(r) = headers::check_request(
        &parts.method,
        &parts.headers,
        parts.uri.authority().is_some(),
    ) {
        // The connection may be out of step with the client (framing): it ends here.
        let mut resp = local(r.status, r.body);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    if !origin.tls {
        if let Some(resp) = tls::challenge(shared, parts).await {
            return resp;
        }
    }
    // The `Host` as the client sent it (or the request target's authority).
    let host_raw = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let Some(service) = shared
        .table
        .route_raw(host_raw.as_ref().map(HeaderValue::as_bytes))
    else {
        return local(StatusCode::NOT_FOUND, "no service for this host\n");
    };
    // Not redirected either: what a trusted proxy in front says came over https.
    if !origin.https {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(resp) = tls::redirect(shared, origin.peer, host_raw.as_ref(), path) {
            return resp;
        }
    }
    service.count_request();
    let guard = match in_flight(&service).await {
        Ok(g) => g,
        Err(resp) => return resp,
    };
    let target = guard.target().clone();
    if crate::static_target::is_static(&target.addr) {
        // Boxed: rare, and its future (the directory service's) must not grow every request's.
        logged.routed = Some(Routed(service, target));
        return Box::pin(serve_static(parts, guard)).await;
    }

    let limits = &shared.config.limits;
    let retryable = body.is_end_stream()
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
    let x = Exchange {
        service,
        target,
        guard,
        limits,
        retryable,
    };
    if body.is_end_stream() && upgrade::requested(&parts.headers).is_none() {
        return forward_direct(x, parts, host_raw.as_ref(), origin, logged).await;
    }
    // hyper's client takes the head: the access log keeps what it reads of it.
    if shared.access.is_some() {
        logged.seen = Some(Seen {
            method: parts.method.clone(),
            host: parts.headers.get(header::HOST).cloned(),
            uri: parts.uri.clone(),
        });
    }
    let mut parts = std::mem::replace(parts, Request::new(()).into_parts().0);
    let client_upgrade = match for_upstream(&mut parts, host_raw, origin) {
        Ok(u) => u,
        Err(text) => return local(StatusCode::BAD_REQUEST, text),
    };
    // Boxed: only requests with a body or an upgrade come here.
    Box::pin(forward_hyper(
        x,
        parts,
        body,
        client_upgrade,
        slot,
        &mut logged.routed,
    ))
    .await
}

/// Forwards a request without a body or an upgrade: the request's own task does the exchange
/// (`direct`), and writes the headers the proxy sets (`ProxySet`) instead of adding them to
/// the map.
async fn forward_direct(
    x: Exchange<'_>,
    parts: &mut hyper::http::request::Parts,
    host_raw: Option<&HeaderValue>,
    origin: Origin<'_>,
    logged: &mut Logged,
) -> Response<ProxyBody> {
    let (path, set) = match for_direct(&parts.uri, &mut parts.headers, host_raw, origin) {
        Ok(p) => p,
        Err(text) => return local(StatusCode::BAD_REQUEST, text),
    };
    let sent_at = std::time::Instant::now();
    let result = send_direct(parts, path, &set, &x, sent_at).await;
    let Exchange {
        service,
        target,
        guard,
        limits,
        ..
    } = x;
    let resp = match result {
        Ok(resp) => {
            // One reading of the clock for the target's latency and the access log's time.
            let answered = std::time::Instant::now();
            target.answered(resp.status().as_u16(), answered - sent_at);
            logged.answered = Some(answered);
            // `direct` left out the response's hop-by-hop headers.
            resp.map(|body| ProxyBody::Direct {
                body,
                guard: Some(guard),
                stalls: Stalls::new(limits),
            })
        }
        Err(f) => upstream_failed(f, &target, &service.name, limits, sent_at),
    };
    // Moved, not cloned: a clone of an `Arc` every thread uses writes a line they share.
    logged.routed = Some(Routed(service, target));
    resp
}

/// Rewrites a request's head for the upstream: origin form, HTTP/1.1, the `Host` the client
/// asked for (`host_raw`), the forwarding headers (from `origin`); an `Upgrade` it asks for is
/// kept, and its client side is taken (with whether it is a WebSocket). `Err`: the 400
/// answer's text.
fn for_upstream(
    parts: &mut hyper::http::request::Parts,
    host_raw: Option<HeaderValue>,
    origin: Origin<'_>,
) -> Result<Option<(OnUpgrade, bool)>, &'static str> {
    // Upstream requests are in origin form (`/path?query`).
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        match Uri::try_from(path) {
            Ok(u) => parts.uri = u,
            Err(_) => return Err("bad request target\n"),
        }
    }
    parts.version = Version::HTTP_11;
    // The app sees the host the client asked for, never the target's address.
    let Some(host) = host_raw else {
        return Err("bad request: no usable Host\n");
    };
    let upgrade = upgrade::requested(&parts.headers);
    headers::forwarded_headers(
        &mut parts.headers,
        origin.client.cloned(),
        Some(origin.host.unwrap_or(&host).clone()),
        origin.https,
    );
    parts.headers.insert(header::HOST, host);
    Ok(match upgrade {
        Some(u) => {
            upgrade::restore(&mut parts.headers, u.clone());
            parts
                .extensions
                .remove::<OnUpgrade>()
                .map(|on| (on, u.as_bytes().eq_ignore_ascii_case(b"websocket")))
        }
        None => None,
    })
}

/// The headers the proxy sets on a request that `direct` sends, written after the request's
/// own (in the order, and with the values, that [`for_upstream`] gives them over hyper).
pub(crate) struct ProxySet<'a> {
    client: Option<&'a HeaderValue>,
    https: bool,
    host: &'a HeaderValue,
    /// `X-Forwarded-Host` as a trusted proxy relays it (else `host`).
    fwd_host: Option<&'a HeaderValue>,
    /// The request has no `Host` header (HTTP/2 has `:authority`): one is written last.
    host_line: bool,
}

impl ProxySet<'_> {
    /// The set headers as (name, value) lines; `n` of the 4 are used.
    fn lines(&self) -> ([(&str, &[u8]); 4], usize) {
        let mut lines: [(&str, &[u8]); 4] = [("", b""); 4];
        let mut n = 0;
        if let Some(c) = self.client {
            lines[n] = (headers::SET_BY_PROXY[0].as_str(), c.as_bytes());
            n += 1;
        }
        let proto: &[u8] = if self.https { b"https" } else { b"http" };
        lines[n] = (headers::SET_BY_PROXY[1].as_str(), proto);
        let fwd_host = self.fwd_host.unwrap_or(self.host);
        lines[n + 1] = (headers::SET_BY_PROXY[2].as_str(), fwd_host.as_bytes());
        n += 2;
        if self.host_line {
            lines[n] = ("host", self.host.as_bytes());
            n += 1;
        }
        (lines, n)
    }
}

/// [`for_upstream`] for a request that `direct` sends: the same checks and the same headers
/// removed, but the request target (origin form) is returned rather than a new `Uri` made,
/// and the headers the proxy sets are returned rather than added to the map.
fn for_direct<'a>(
    uri: &'a Uri,
    headers: &mut HeaderMap,
    host_raw: Option<&'a HeaderValue>,
    origin: Origin<'a>,
) -> Result<(&'a str, ProxySet<'a>), &'static str> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    // What `Uri::try_from` accepts of a path: the origin form, or `*`.
    if !(path.starts_with('/') || path == "*") {
        return Err("bad request target\n");
    }
    let Some(host) = host_raw else {
        return Err("bad request: no usable Host\n");
    };
    headers::strip_for_upstream(headers);
    let host_line = !headers.contains_key(header::HOST);
    Ok((
        path,
        ProxySet {
            client: origin.client,
            https: origin.https,
            host,
            fwd_host: origin.host,
            host_line,
        },
    ))
}

/// What a forwarded request goes with: where it goes, and its in-flight guard.
struct Exchange<'a> {
    service: Arc<crate::table::Service>,
    target: Arc<crate::table::Target>,
    guard: InFlight,
    limits: &'a limits::Limits,
    /// No body and an idempotent method (see [`send_hyper`]).
    retryable: bool,
}

/// Forwards a request with a body, or one asking for an upgrade, over hyper's client: reads
/// the start of the body first, and hands an upgraded connection to a tunnel.
async fn forward_hyper(
    x: Exchange<'_>,
    parts: hyper::http::request::Parts,
    body: Incoming,
    client_upgrade: Option<(OnUpgrade, bool)>,
    slot: &Arc<Slot>,
    routed: &mut Option<Routed>,
) -> Response<ProxyBody> {
    let Exchange {
        service,
        target,
        guard,
        limits,
        retryable,
    } = x;
    // Read the start of the body before taking an upstream connection (see `limits`).
    let (body, watch) = if body.is_end_stream() {
        (ClientBody::empty(), None)
    } else {
        let cap = limits.max_body_bytes;
        if cap > 0 && body.size_hint().lower() > cap {
            // Its Content-Length says it is too large: answered before any of it is read.
            return client_body_fault(BodyFault::TooLarge, &service.name, limits);
        }
        let timed = TimedBody::new(body, limits);
        let watch = timed.watch.clone();
        // Boxed: most requests have no body, and every request's future would carry it.
        match Box::pin(ClientBody::read_ahead(timed)).await {
            Ok(b) => (b, Some(watch)),
            Err(fault) => return client_body_fault(fault, &service.name, limits),
        }
    };
    let req = Request::from_parts(parts, ReqBody::Client(body));
    let sent_at = std::time::Instant::now();
    let result = send_hyper(
        req,
        &target.addr,
        limits,
        retryable,
        watch.as_deref(),
        &service.name,
    )
    .await;
    *routed = Some(Routed(service.clone(), target.clone()));
    match result {
        Ok((resp, sender)) => {
            target.answered(resp.status().as_u16(), sent_at.elapsed());
            if let (StatusCode::SWITCHING_PROTOCOLS, Some((client_up, websocket))) =
                (resp.status(), client_upgrade)
            {
                drop(sender);
                return tunnel(resp, client_up, websocket, guard, slot);
            }
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ProxyBody::Upstream {
                    body,
                    guard: Some(guard),
                    sender: Some(sender),
                    stalls: Stalls::new(limits),
                },
            )
        }
        Err(_) if watch.as_ref().is_some_and(|w| w.fault() != BodyFault::None) => {
            let fault = watch.map_or(BodyFault::None, |w| w.fault());
            client_body_fault(fault, &service.name, limits)
        }
        Err(f) => upstream_failed(f, &target, &service.name, limits, sent_at),
    }
}

/// Takes the service's current target for a request (its in-flight guard), waiting while the
/// service is paused: a 503 if the hold runs out, a 404 if the service is removed meanwhile.
async fn in_flight(service: &crate::table::Service) -> Result<InFlight, Response<ProxyBody>> {
    // Acquire first, then look at the pause flag (see `table`): a request either counts as in
    // flight before a pause looks, or sees the pause and waits.
    loop {
        let guard = service.acquire();
        if !service.is_paused() {
            return Ok(guard);
        }
        drop(guard);
        // Boxed: rare (a hold), and its future (a wait with a deadline) must not grow every
        // request's.
        if !Box::pin(service.wait_resumed()).await {
            let mut resp = local(
                StatusCode::SERVICE_UNAVAILABLE,
                "service is being switched; try again\n",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(resp);
        }
        if service.is_removed() {
            return Err(local(StatusCode::NOT_FOUND, "no service for this host\n"));
        }
    }
}

/// The answer to a request whose upstream agreed to an upgrade (101): the response goes to
/// the client, and both connections are handed to a tunnel that holds the in-flight guard
/// and keeps the client's slot busy while it is open.
fn tunnel(
    mut resp: Response<Incoming>,
    client_up: OnUpgrade,
    websocket: bool,
    guard: InFlight,
    slot: &Arc<Slot>,
) -> Response<ProxyBody> {
    let theirs = resp.headers().get(header::UPGRADE).cloned();
    let upstream_up = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = theirs {
        upgrade::restore(&mut parts.headers, u);
    }
    let keep = (slot.clone(), slot.state.busy());
    // The client connection's bytes are the tunnel's from now on (`guard`).
    slot.state.set_upgraded();
    upgrade::tunnel(client_up, upstream_up, guard, websocket, keep);
    Response::from_parts(parts, ProxyBody::Local(Full::new(Bytes::new())))
}

/// The answer to a request whose upstream failed or did not answer in time (logged as the
/// upstream's).
fn upstream_failed(
    failure: Failure,
    target: &crate::table::Target,
    service: &str,
    limits: &limits::Limits,
    sent_at: std::time::Instant,
) -> Response<ProxyBody> {
    target.stats.failed(sent_at.elapsed());
    match failure {
        Failure::TimedOut => {
            log::line(format_args!(
                "upstream {} for service {service}: no response head within {} ms",
                target.addr,
                limits.upstream_header_timeout.as_millis()
            ));
            local(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout: the service did not answer in time\n",
            )
        }
        Failure::Upstream(e) => {
            log::line(format_args!(
                "upstream {} for service {service} failed: {e}",
                target.addr,
            ));
            local(
                StatusCode::BAD_GATEWAY,
                "bad gateway: the service did not answer\n",
            )
        }
    }
}

/// Sends a request with a body, or one asking for an upgrade, on a pooled hyper client
/// connection to `addr`, and waits for the response head (the timeout restarting while the
/// client still sends its body, see [`within`]). One retry: a request that never left (its
/// connection closed before it was written) is sent again whatever it is; one that failed to
/// connect, or was sent on a pooled connection that had been idle a while and then failed (an
/// upstream closing a keep-alive connection under our feet), only if `retryable` (no body, an
/// idempotent method), from a copy of its head.
async fn send_hyper(
    mut req: Request<ReqBody>,
    addr: &str,
    limits: &limits::Limits,
    retryable: bool,
    watch: Option<&limits::BodyWatch>,
    service: &str,
) -> Result<(Response<Incoming>, upstream::Sender), Failure> {
    let mut retried = false;
    loop {
        let mut conn = match upstream::take(addr, limits.upstream_connect_timeout).await {
            Ok(c) => c,
            Err(e) if !retried && retryable => {
                log_retry(addr, service, &e);
                retried = true;
                continue;
            }
            Err(e) => return Err(Failure::Upstream(e.to_string())),
        };
        let copy = (retryable && conn.may_be_stale && !retried).then(|| {
            let mut again = Request::new(ReqBody::Empty);
            *again.method_mut() = req.method().clone();
            *again.uri_mut() = req.uri().clone();
            *again.headers_mut() = req.headers().clone();
            again
        });
        let sent = conn.sender.try_send_request(req);
        let Some(sent) = within(sent, limits.upstream_header_timeout, watch).await else {
            return Err(Failure::TimedOut);
        };
        match sent {
            Ok(resp) => return Ok((resp, conn.sender)),
            Err(mut e) => {
                let unsent = e.take_message();
                let err = e.into_error();
                match unsent.or(copy) {
                    Some(r) if !retried => {
                        log_retry(addr, service, &err);
                        req = r;
                        retried = true;
                    }
                    _ => return Err(Failure::Upstream(chain(&err))),
                }
            }
        }
    }
}

/// Sends a request without a body to the exchange's target and reads its response head, on
/// a connection the request's task drives itself ([`direct`]); `sent_at` is when it was
/// handed over to be sent. Retried once (see the module's invariants): when it failed to
/// connect and is `retryable`; when its head was not written in full; when a pooled
/// connection ended before any response and it is `retryable`.
async fn send_direct(
    parts: &hyper::http::request::Parts,
    path: &str,
    set: &ProxySet<'_>,
    x: &Exchange<'_>,
    sent_at: std::time::Instant,
) -> Result<Response<DirectBody>, Failure> {
    let (addr, service) = (x.target.addr.as_str(), x.service.name.as_str());
    let (limits, retryable) = (x.limits, x.retryable);
    let (lines, n) = set.lines();
    let mut retried = false;
    loop {
        let taken =
            match upstream::take_direct(addr, limits.upstream_connect_timeout, !retryable).await {
                Ok(t) => t,
                Err(e) if !retried && retryable => {
                    log_retry(addr, service, &e);
                    retried = true;
                    continue;
                }
                Err(e) => return Err(Failure::Upstream(e.to_string())),
            };
        let reused = taken.reused;
        let sent = direct::send(taken.conn, &parts.method, path, &parts.headers, &lines[..n]);
        // The response-head deadline counts from the request's sending: on a pooled
        // connection at once that is `sent_at` (no clock read); after a connect or a retry,
        // now.
        let from = if reused && !retried {
            sent_at
        } else {
            std::time::Instant::now()
        };
        let deadline = from + limits.upstream_header_timeout;
        let Some(sent) = deadline::within(sent, deadline).await else {
            return Err(Failure::TimedOut);
        };
        match sent {
            Ok(resp) => return Ok(resp),
            Err(e)
                if !retried
                    && (e.reached == Reached::NotSent
                        || (retryable && reused && e.reached == Reached::NoResponse)) =>
            {
                log_retry(addr, service, &e);
                retried = true;
            }
            Err(e) => return Err(Failure::Upstream(e.to_string())),
        }
    }
}

/// A request to a static target (a files preview), answered by the proxy from the directory
/// ([`crate::static_target`]), holding the in-flight guard until its body is sent.
async fn serve_static(parts: &hyper::http::request::Parts, guard: InFlight) -> Response<ProxyBody> {
    let target = guard.target().clone();
    let started = std::time::Instant::now();
    let resp =
        crate::static_target::respond(&target.addr, &parts.method, &parts.uri, &parts.headers)
            .await;
    target.answered(resp.status().as_u16(), started.elapsed());
    let (head, body) = resp.into_parts();
    Response::from_parts(
        head,
        ProxyBody::Static {
            body,
            guard: Some(guard),
        },
    )
}

/// Which service and target a request went to (for the access log). Handed back beside the
/// response rather than in its extensions, whose map costs allocations on every request.
pub(crate) struct Routed(Arc<crate::table::Service>, Arc<crate::table::Target>);

/// Why a forwarded request got no response.
enum Failure {
    /// The upstream failed (connect, write or read).
    Upstream(String),
    /// The upstream sent no response head in time.
    TimedOut,
}

/// Awaits `fut` until `timeout` has passed since the request was sent, i.e. since the start
/// or, for a request with a body, since its last piece: `None` if it did not complete. While
/// the client is still sending the body the upstream is not waited on (the body timeout
/// applies instead), so that a slow upload is not taken for a slow upstream.
async fn within<F: Future>(
    fut: F,
    timeout: Duration,
    body: Option<&limits::BodyWatch>,
) -> Option<F::Output> {
    tokio::pin!(fut);
    let start = tokio::time::Instant::now();
    let mut deadline = start + timeout;
    loop {
        match tokio::time::timeout_at(deadline, fut.as_mut()).await {
            Ok(out) => return Some(out),
            Err(_) => {
                let body = body?;
                if !body.done() {
                    deadline = tokio::time::Instant::now() + timeout;
                    continue;
                }
                match body.last_piece().map(tokio::time::Instant::from_std) {
                    Some(t) if t > start && t + timeout > tokio::time::Instant::now() => {
                        deadline = t + timeout;
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// The answer to a request whose client failed to send its body, or sent too much of it
/// (logged as the client's). The connection is closed after it: the rest of the body is
/// never read.
fn client_body_fault(
    fault: BodyFault,
    service: &str,
    limits: &limits::Limits,
) -> Response<ProxyBody> {
    let mut r = match fault {
        BodyFault::TimedOut => local(
            StatusCode::REQUEST_TIMEOUT,
            "request timeout: the request body stopped arriving\n",
        ),
        BodyFault::TooLarge => {
            let cap = limits.max_body_bytes;
            log::line(format_args!(
                "client request for service {service}: request body over max_body_bytes ({cap} bytes): 413"
            ));
            local(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("content too large: request bodies here are limited to {cap} bytes\n"),
            )
        }
        BodyFault::Malformed | BodyFault::None => {
            log::line(format_args!(
                "client request for service {service}: malformed request body"
            ));
            local(
                StatusCode::BAD_REQUEST,
                "bad request: malformed request body\n",
            )
        }
    };
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn log_retry(addr: &str, service: &str, e: &dyn StdError) {
    log::line(format_args!(
        "upstream {addr} for service {service}: {}; retrying once",
        chain(e)
    ));
}

/// An error with its sources, `a: b: c`.
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.ends_with(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// A response made by the proxy itself (a `&'static str` body is not copied).
pub(crate) fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The error a response body ends with.
type BoxError = Box<dyn StdError + Send + Sync>;
/// What polling a response body for its next frame gives.
type FramePoll<E> = Poll<Option<Result<Frame<Bytes>, E>>>;

/// How long an upstream may pause in the middle of a response body (`upstream_body_timeout`),
/// and its current pause. Past it the response is cut: the client sees it end short of its
/// length (HTTP/1.1: the connection closes; HTTP/2: the stream is reset), as if the upstream
/// had closed, and the upstream connection is closed.
///
/// Over HTTP/2 it also times the other side: a piece handed on that the client does not take
/// (it sends no window update) for `send_timeout` resets the response's stream, and the
/// connection's other streams go on ([`ClientWait`], [`crate::h2exec`]). Over HTTP/1.1 the
/// guard times the writes to the client instead.
///
/// Small, as every response body carries one and hyper moves responses several times: the
/// limits in milliseconds, and the waits' state boxed, made only once a body first waits
/// (most bodies arrive whole with their head and never do).
pub(crate) struct Stalls {
    waits: Option<Box<Waits>>,
    /// An HTTP/2 response: the client's waits are timed too.
    h2: bool,
    body_ms: u32,
    send_ms: u32,
}

/// The waits of a body that has waited.
#[derive(Default)]
struct Waits {
    /// The upstream's pause.
    upstream: deadline::Pause,
    /// HTTP/2: the client's wait, once a piece was handed and more was to come.
    client: Option<ClientWait>,
}

/// An HTTP/2 body's wait for its client to take the piece it was handed.
struct ClientWait {
    pause: deadline::Pause,
    /// Woken by the ticker when the wait passes `send_timeout`: ends the stream's task
    /// ([`crate::h2exec::cut_here`]).
    cut: std::task::Waker,
}

/// `d` in whole milliseconds, at most `u32::MAX` (49 days), at least 1.
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

impl Stalls {
    pub(crate) fn new(limits: &limits::Limits) -> Stalls {
        Stalls {
            waits: None,
            h2: false,
            body_ms: millis(limits.upstream_body_timeout),
            send_ms: millis(limits.send_timeout),
        }
    }

    fn waits(&mut self) -> &mut Waits {
        self.waits.get_or_insert_with(Box::default)
    }

    /// The client asked for the next piece: what it was handed has been taken.
    fn pulled(&mut self) {
        if let Some(Waits {
            client: Some(c), ..
        }) = self.waits.as_deref_mut()
        {
            c.pause.progressed();
        }
    }

    /// A piece was handed on and more is to come: over HTTP/2 the client has `send_timeout`
    /// to take it (`cx`: the context of the stream's task, which the wait ends past it).
    fn handed(&mut self, cx: &Context<'_>) {
        if !self.h2 {
            return;
        }
        let limit = Duration::from_millis(u64::from(self.send_ms));
        let waits = self.waits.get_or_insert_with(Box::default);
        let c = waits.client.get_or_insert_with(|| ClientWait {
            pause: deadline::Pause::default(),
            cut: crate::h2exec::cut_here(cx.waker()),
        });
        if c.pause.waiting(limit, &c.cut) {
            c.cut.wake_by_ref();
        }
    }

    /// Polls an upstream `body` for its next piece, timing both sides (see [`Stalls`]);
    /// `Err`: the upstream paused too long, and the error that ends the response (logged).
    fn poll<B>(
        &mut self,
        body: &mut B,
        guard: Option<&InFlight>,
        cx: &mut Context<'_>,
    ) -> Result<FramePoll<B::Error>, BoxError>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        self.pulled();
        let polled = Pin::new(&mut *body).poll_frame(cx);
        if self.cut(&polled, cx) {
            return Err(self.cut_error(guard));
        }
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !body.is_end_stream() {
            self.handed(cx);
        }
        Ok(polled)
    }

    /// Whether the body, polled with this outcome, has now paused longer than allowed.
    fn cut<T>(&mut self, polled: &Poll<T>, cx: &Context<'_>) -> bool {
        if polled.is_ready() {
            if let Some(w) = self.waits.as_deref_mut() {
                w.upstream.progressed();
            }
            false
        } else {
            let limit = Duration::from_millis(u64::from(self.body_ms));
            self.waits().upstream.waiting(limit, cx.waker())
        }
    }

    /// Logs a cut response body and gives the error that ends it.
    fn cut_error(&self, guard: Option<&InFlight>) -> BoxError {
        let addr = guard.map_or("-", |g| g.target().addr.as_str());
        let ms = self.body_ms;
        log::line(format_args!(
            "upstream {addr} sent nothing of a response body for {ms} ms: the response was cut"
        ));
        format!("the upstream paused its response body for {ms} ms").into()
    }
}

/// A response body: made by the proxy, or streamed from the upstream while holding the
/// request's in-flight guard (released at the end of the body, on error, or on drop) and the
/// upstream connection (back to the pool at the end of the body, closed otherwise).
pub(crate) enum ProxyBody {
    Local(Full<Bytes>),
    Upstream {
        body: Incoming,
        guard: Option<InFlight>,
        sender: Option<upstream::Sender>,
        stalls: Stalls,
    },
    /// Read from the upstream by the request's own task ([`direct`]), holding the in-flight
    /// guard; its connection goes back to the pool when the body has been read to its end.
    Direct {
        body: DirectBody,
        guard: Option<InFlight>,
        stalls: Stalls,
    },
    /// Answered from a static target's directory, holding the in-flight guard.
    Static {
        body: crate::static_target::StaticBody,
        guard: Option<InFlight>,
    },
}

impl ProxyBody {
    /// An HTTP/2 response: its client has `send_timeout` to take each piece it is handed, or
    /// its stream is reset (see [`Stalls`]).
    fn time_client(&mut self) {
        if let ProxyBody::Upstream { stalls, .. } | ProxyBody::Direct { stalls, .. } = self {
            stalls.h2 = true;
        }
    }

    /// The upstream body is over: pools its connection if it ended cleanly, and releases the
    /// in-flight guard.
    fn finish(&mut self, clean: bool) {
        if let ProxyBody::Upstream { guard, sender, .. } = self {
            if let (true, Some(s), Some(g)) = (clean, sender.take(), guard.as_ref()) {
                upstream::put_back(&g.target().addr, s);
            }
            sender.take();
            guard.take();
        }
        if let ProxyBody::Direct { body, guard, .. } = self {
            if let (Some(c), Some(g)) = (body.take_reusable(), guard.as_ref()) {
                upstream::put_back_direct(&g.target().addr, c);
            }
            guard.take();
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // hyper stops polling a body that says it is at its end; one dropped before that
        // leaves its connection mid-response, which must not be reused.
        let clean = match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Direct { .. } => true,
            ProxyBody::Local(_) | ProxyBody::Static { .. } => false,
        };
        self.finish(clean);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match this {
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            ProxyBody::Upstream {
                body,
                stalls,
                guard,
                ..
            } => {
                let polled = match stalls.poll(body, guard.as_ref(), cx) {
                    Ok(polled) => polled,
                    Err(e) => {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                };
                match &polled {
                    Poll::Ready(None) => this.finish(true),
                    Poll::Ready(Some(Err(_))) => this.finish(false),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
            ProxyBody::Direct {
                body,
                stalls,
                guard,
            } => {
                let polled = match stalls.poll(body, guard.as_ref(), cx) {
                    Ok(polled) => polled,
                    Err(e) => {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                };
                let ended = body.is_end_stream();
                match &polled {
                    Poll::Ready(None) => this.finish(true),
                    Poll::Ready(Some(Err(_))) => this.finish(false),
                    Poll::Ready(Some(Ok(_))) if ended => this.finish(true),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
            ProxyBody::Static { body, guard } => {
                let polled = Pin::new(body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    guard.take();
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(full) => full.is_end_stream(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Direct { body, .. } => body.is_end_stream(),
            ProxyBody::Static { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(full) => full.size_hint(),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Direct { body, .. } => body.size_hint(),
            ProxyBody::Static { body, .. } => body.size_hint(),
        }
    }
}

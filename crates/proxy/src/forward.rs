//! The HTTP side: accepts client connections, routes each request by `Host` to its service,
//! holds it while the service is paused, and forwards it to the target that is current when
//! the request starts, through a pooled keep-alive client. It owns the client-side
//! connections and the header rewriting; it must not change the routing table.
//!
//! Invariants:
//! - A client connection is never closed because of a switch or a pause: it is not tied to a
//!   target, and an upstream failure becomes a 502 response on a connection that stays open.
//! - A request takes its target exactly once ([`crate::table::Service::acquire`], after any
//!   pause) and keeps the in-flight guard until its response body has been fully sent or
//!   dropped.
//! - Hop-by-hop headers are stripped in both directions; `X-Forwarded-For` is replaced with the
//!   client's address (this is the edge: nothing before it is trusted), `X-Forwarded-Proto`
//!   and `X-Forwarded-Host` are set.
//! - A request with no body and an idempotent method is retried once on an upstream
//!   connection error (a pooled connection closed by the upstream under our feet); nothing
//!   else is ever retried.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::log;
use crate::switch::Shared;
use crate::table::{normalize_host, InFlight};

/// Body type of requests the proxy sends upstream.
pub(crate) type UpstreamBody = BoxBody<Bytes, hyper::Error>;
/// The pooled upstream client (shared by forwarding and health probes).
pub(crate) type Upstream = Client<HttpConnector, UpstreamBody>;

/// How long a client has to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled upstream connections are closed after this long (below most app servers'
/// keep-alive timeouts, so that we rarely race an upstream's own idle close).
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1, plus the usual extras).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

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

/// Completes when `stop` turns true (or its sender is gone).
/// How long a keep-alive connection may stay idle after shutdown began before it is closed.
const IDLE_CLOSE_AFTER_STOP: Duration = Duration::from_secs(3);

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts and serves client connections until `stop`; then closes idle connections, lets
/// busy ones finish their current request, and returns when all are closed.
pub(crate) async fn serve_http(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::line(format_args!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = stop.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let closing = stop.clone();
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let closing = closing.clone();
                async move {
                    let mut resp = handle(&shared, req, peer).await;
                    if *closing.borrow() {
                        // Shutting down (e.g. handing over to an upgraded proxy): this is
                        // the connection's last response, and the client is told so, so it
                        // reconnects instead of racing a close.
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => {
                    // Keep-alive clients get one more request answered with
                    // `Connection: close`; only connections that stay idle that long are
                    // closed (closing an idle connection races a client that is sending).
                    if tokio::time::timeout(IDLE_CLOSE_AFTER_STOP, conn.as_mut()).await.is_err() {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// Serves one request.
async fn handle(shared: &Shared, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
    shared.count_request();
    let host_raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let host = host_raw.as_deref().map(normalize_host);
    let Some(service) = shared.table.route(host.as_deref()) else {
        return local(StatusCode::NOT_FOUND, "no service for this host\n");
    };
    service.count_request();
    // Acquire first, then look at the pause flag (see `table`): a request either counts as in
    // flight before a pause looks, or sees the pause and waits.
    let guard = loop {
        let guard = service.acquire();
        if !service.is_paused() {
            break guard;
        }
        drop(guard);
        if !service.wait_resumed().await {
            let mut resp = local(
                StatusCode::SERVICE_UNAVAILABLE,
                "service is being switched; try again\n",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        if service.is_removed() {
            return local(StatusCode::NOT_FOUND, "no service for this host\n");
        }
    };
    let target = guard.target().clone();

    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = match Uri::builder()
        .scheme("http")
        .authority(target.addr.as_str())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(_) => return local(StatusCode::BAD_REQUEST, "bad request target\n"),
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    forwarded_headers(&mut parts.headers, peer, host_raw.as_deref());

    let retry = (body.is_end_stream()
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ))
    .then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let mut result = shared
        .client
        .request(Request::from_parts(parts, body.boxed()))
        .await;
    if let (Err(first), Some((method, uri, headers))) = (&result, retry) {
        log::line(format_args!(
            "upstream {} for service {}: {}; retrying once",
            target.addr,
            service.name,
            chain(first)
        ));
        let mut again = Request::new(empty_body());
        *again.method_mut() = method;
        *again.uri_mut() = uri;
        *again.headers_mut() = headers;
        result = shared.client.request(again).await;
    }
    match result {
        Ok(resp) => {
            target.count_served();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ProxyBody::Upstream {
                    body,
                    guard: Some(guard),
                },
            )
        }
        Err(e) => {
            log::line(format_args!(
                "upstream {} for service {} failed: {}",
                target.addr,
                service.name,
                chain(&e)
            ));
            local(
                StatusCode::BAD_GATEWAY,
                "bad gateway: the service did not answer\n",
            )
        }
    }
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

/// A response made by the proxy itself.
fn local(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Removes hop-by-hop headers, including those named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Rewrites a request's headers for the upstream hop.
fn forwarded_headers(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&str>) {
    strip_hop_by_hop(headers);
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert("x-forwarded-host", v);
        }
        None => {
            headers.remove("x-forwarded-host");
        }
    }
}

/// A response body: made by the proxy, or streamed from the upstream while holding the
/// request's in-flight guard (released at the end of the body, on error, or on drop).
pub(crate) enum ProxyBody {
    Local(Full<Bytes>),
    Upstream {
        body: Incoming,
        guard: Option<InFlight>,
    },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            ProxyBody::Upstream { body, guard } => {
                let polled = Pin::new(body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    guard.take();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(full) => full.is_end_stream(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(full) => full.size_hint(),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_sets_forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        forwarded_headers(&mut h, "10.0.0.9:5555".parse().unwrap(), Some("Site:8080"));
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Site:8080");
        assert_eq!(h["x-keep"], "yes");
    }
}

//! Limits against hostile or broken peers: how long and how big a request head may be, how
//! many client connections may be open at once (and which ones give way when there are too
//! many), how long a client may pause while sending a body or reading a response, how large
//! a request body may be, and how long an upstream may take to connect, to answer and to send
//! the next piece of a response body. It owns the numbers ([`Limits`]), the connection slots
//! ([`Slots`]), the open-file limit of the process and the timed, counted client body
//! ([`TimedBody`]); it must not route or rewrite headers (that is `forward`).
//!
//! Invariants:
//! - A connection holds a slot from accept to close; past the cap an idle keep-alive
//!   connection is asked to close first (oldest first), and only when none is idle does a new
//!   connection get a 503, so that the cap never starves active clients.
//! - The cap never exceeds what the open-file limit allows: two descriptors per connection
//!   (client and upstream) plus a reserve for the control socket, state file and health probes.
//! - A log line about failing `accept` is written at most once per [`ACCEPT_LOG_EVERY`].

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;

use crate::log;

/// The proxy's limits (`[proxy]` keys of the same names). Defaults are close to nginx's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a client has to send a complete request head, counted from the accept for
    /// the first request and from the head's first byte for later ones.
    /// nginx: `client_header_timeout 60s`.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request (from the end of the
    /// previous response to the next head's first byte) before the proxy closes it.
    /// nginx: `keepalive_timeout 75s`.
    pub idle_timeout: Duration,
    /// The largest request head (request line and headers), in bytes; larger heads get 431.
    /// It is also what a half-sent head can make a connection hold. Node.js: 16 KiB; nginx:
    /// 1 KiB, then up to 4 x 8 KiB of `large_client_header_buffers`.
    pub max_header_bytes: usize,
    /// The most header lines in a request head; more get 431.
    pub max_headers: usize,
    /// The most client connections open at once (also capped by the open-file limit).
    pub max_connections: usize,
    /// How long connecting to a target may take before the request gets 502.
    pub upstream_connect_timeout: Duration,
    /// How long a target may take to send its response head, once the request is sent,
    /// before the request gets 504. nginx: `proxy_read_timeout 60s`.
    pub upstream_header_timeout: Duration,
    /// How long a client may pause while sending a request body before the request gets 408.
    /// nginx: `client_body_timeout 60s`.
    pub body_timeout: Duration,
    /// How long a target may pause in the middle of a response body (while the client waits
    /// for more) before the response is cut. Not for upgraded connections (WebSockets), which
    /// end at a switch's drain deadline. nginx: `proxy_read_timeout 60s` between two reads.
    pub upstream_body_timeout: Duration,
    /// How long a client may take none of the bytes the proxy writes to it (a response, a
    /// tunnel's data), or over HTTP/2 leave a piece of a response untaken (no window update),
    /// before its connection is closed. nginx: `send_timeout 60s`.
    pub send_timeout: Duration,
    /// The largest request body, in bytes; 0: no cap. A request that announces a larger
    /// `Content-Length` gets 413 before anything of it is forwarded; a body that grows past it
    /// (chunked, or HTTP/2 without a length) is cut there: its request gets 413 and its
    /// upstream connection is closed, so the app never sees it whole. nginx:
    /// `client_max_body_size` (1 MiB there; no cap by default here, as in Caddy).
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 16_384,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_body_bytes: 0,
        }
    }
}

/// The smallest `max_header_bytes` hyper accepts as its read buffer.
pub(crate) const MIN_READ_BUF: usize = 8192;

/// How many header lines hyper's HTTP/1.1 parser takes when it is not told.
const HYPER_MAX_HEADERS: usize = 100;

/// What to tell hyper's HTTP/1.1 server as its `max_headers`: `None` when its own default is
/// the same. Told a number, hyper makes (and fills) two arrays that long for every head it
/// parses; left to its default it uses uninitialised ones on the stack, which is cheaper per
/// request (measured with callgrind: about 1,700 of 53,500 instructions per proxied request
/// over TLS).
pub(crate) fn hyper_max_headers(lim: &Limits) -> Option<usize> {
    (lim.max_headers != HYPER_MAX_HEADERS).then_some(lim.max_headers)
}

/// How often at most a failing `accept` is logged.
pub(crate) const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Descriptors kept free for everything but client connections and their upstreams.
const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns the soft limit in force.
pub(crate) fn raise_nofile() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            log::line(format_args!("cannot raise the open-file limit: {e}"));
            current_nofile()
        }
    }
}

/// The soft open-file limit.
pub(crate) fn current_nofile() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// The connection cap in force: `configured`, lowered so that every connection can have an
/// upstream connection too within the open-file limit `nofile`.
pub(crate) fn effective_cap(configured: usize, nofile: Option<u64>) -> usize {
    let by_fds = nofile.map_or(usize::MAX, |n| {
        usize::try_from(n.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX)
    });
    configured.min(by_fds).max(1)
}

/// One open client connection, as the slots see it.
pub(crate) struct ConnState {
    /// Requests being served on it right now.
    busy: AtomicUsize,
    /// Requests started on it so far (an HTTP/2 connection is idle while this stays put and
    /// `busy` is 0).
    started: AtomicUsize,
    /// It was asked to close.
    reclaimed: AtomicBool,
    /// It became a tunnel (a request's protocol switch was answered 101).
    upgraded: AtomicBool,
    /// The worker serving it ([`NO_WORKER`] until one is assigned; written only through
    /// [`Slot::assign`]).
    worker: AtomicUsize,
    /// It can move to another worker between two requests (plain HTTP/1.1: see
    /// [`Slots::ask_to_move`]).
    movable: AtomicBool,
    /// The worker it was asked to move to ([`NO_WORKER`]: none).
    move_to: AtomicUsize,
    /// `started` when [`Slots::ask_to_move`] last looked.
    seen: AtomicUsize,
    /// Wakes the connection's task when it is asked to close.
    pub(crate) close: Notify,
}

impl ConnState {
    /// A request starts on this connection; it is not idle until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Whether a request is being served, and how many were started so far.
    pub(crate) fn activity(&self) -> (bool, usize) {
        (
            self.busy.load(Ordering::Relaxed) > 0,
            self.started.load(Ordering::Relaxed),
        )
    }

    /// The connection is a tunnel from now on.
    pub(crate) fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether the connection became a tunnel.
    pub(crate) fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// The connection can be moved to another worker between two requests.
    pub(crate) fn set_movable(&self) {
        self.movable.store(true, Ordering::Relaxed);
    }

    /// The worker the connection was asked to move to, if any: it moves when it is next idle
    /// (the guard ends hyper's part there, see [`crate::guard`]).
    pub(crate) fn move_to(&self) -> Option<usize> {
        Some(self.move_to.load(Ordering::Relaxed)).filter(|&w| w != NO_WORKER)
    }
}

/// Marks a connection busy while it lives.
pub(crate) struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client connection slots of the whole proxy (all worker threads).
pub(crate) struct Slots {
    cap: usize,
    open: AtomicUsize,
    /// Open connections in accept order (oldest first).
    conns: Mutex<Vec<(u64, Arc<ConnState>)>>,
    next_id: AtomicUsize,
    /// Open connections served by each worker thread (see [`Slot::assign`]).
    per_worker: Vec<AtomicUsize>,
}

/// A connection's slot; frees it when dropped.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    pub(crate) state: Arc<ConnState>,
}

/// [`Slot::worker`] before [`Slot::assign`].
const NO_WORKER: usize = usize::MAX;

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.slots.conns.lock() {
            if let Some(i) = conns.iter().position(|(id, _)| *id == self.id) {
                conns.remove(i);
            }
        }
        self.slots.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(n) = self.slots.per_worker.get(self.worker()) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Slot {
    /// The worker serving the connection.
    pub(crate) fn worker(&self) -> usize {
        self.state.worker.load(Ordering::Relaxed)
    }

    /// Counts the connection as served by worker `w` (and no longer by the one before); a
    /// request to move it is done with.
    pub(crate) fn assign(&mut self, w: usize) {
        self.state.move_to.store(NO_WORKER, Ordering::Relaxed);
        let was = self.worker();
        if w == was {
            return;
        }
        if let Some(n) = self.slots.per_worker.get(was) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
        let now = match self.slots.per_worker.get(w) {
            Some(n) => {
                n.fetch_add(1, Ordering::Relaxed);
                w
            }
            None => NO_WORKER,
        };
        self.state.worker.store(now, Ordering::Relaxed);
    }
}

impl Slots {
    #[cfg(test)]
    pub(crate) fn new(cap: usize) -> Arc<Slots> {
        Slots::for_workers(cap, 1)
    }

    /// The slots of a proxy whose connections `workers` worker threads serve.
    pub(crate) fn for_workers(cap: usize, workers: usize) -> Arc<Slots> {
        Arc::new(Slots {
            cap,
            open: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
            per_worker: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// How many connections each worker serves.
    pub(crate) fn per_worker(&self) -> Vec<usize> {
        self.per_worker
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Open connections.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a new connection. At the cap, asks the oldest idle connection to close and
    /// still admits this one (the asked one is gone within a moment); with no idle connection
    /// to reclaim, `None`: the caller answers 503.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        if self.open.load(Ordering::Relaxed) >= self.cap && self.reclaim(1) == 0 {
            return None;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let state = Arc::new(ConnState {
            busy: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            reclaimed: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            worker: AtomicUsize::new(NO_WORKER),
            movable: AtomicBool::new(false),
            move_to: AtomicUsize::new(NO_WORKER),
            seen: AtomicUsize::new(0),
            close: Notify::new(),
        });
        if let Ok(mut conns) = self.conns.lock() {
            conns.push((id, state.clone()));
        }
        Some(Slot {
            slots: self.clone(),
            id,
            state,
        })
    }

    /// Asks one of worker `from`'s movable connections to move to worker `to` when it is next
    /// idle, if that evens out the requests the two serve: counting the requests each of
    /// their connections started since the last look (all of a connection's, at its first),
    /// the busiest connection of `from` whose move leaves `to` serving no more than `from`.
    /// `false`: none (the two already serve about as many, or only tunnels, TLS connections
    /// or connections already asked would do).
    pub(crate) fn ask_to_move(&self, from: usize, to: usize) -> bool {
        let Ok(conns) = self.conns.lock() else {
            return false;
        };
        let (mut on_from, mut on_to) = (0usize, 0usize);
        let mut candidates: Vec<(usize, &ConnState)> = Vec::new();
        for (_, c) in conns.iter() {
            let w = c.worker.load(Ordering::Relaxed);
            if w != from && w != to {
                continue;
            }
            let started = c.started.load(Ordering::Relaxed);
            let lately = started.wrapping_sub(c.seen.swap(started, Ordering::Relaxed));
            if w == to {
                on_to += lately;
                continue;
            }
            on_from += lately;
            if c.movable.load(Ordering::Relaxed)
                && !c.upgraded()
                && !c.reclaimed.load(Ordering::Relaxed)
                && c.move_to().is_none()
            {
                candidates.push((lately, c));
            }
        }
        // Moving `lately` requests leaves `to` no busier than `from` if it is at most half
        // the difference.
        let most = on_from.saturating_sub(on_to) / 2;
        let best = candidates
            .into_iter()
            .filter(|&(lately, _)| lately > 0 && lately <= most)
            .max_by_key(|&(lately, _)| lately);
        match best {
            Some((_, c)) => {
                c.move_to.store(to, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Asks up to `n` idle connections, oldest first, to close; returns how many were asked.
    pub(crate) fn reclaim(&self, n: usize) -> usize {
        let Ok(conns) = self.conns.lock() else {
            return 0;
        };
        let mut asked = 0;
        for (_, c) in conns.iter() {
            if asked == n {
                break;
            }
            if c.busy.load(Ordering::Relaxed) == 0 && !c.reclaimed.swap(true, Ordering::Relaxed) {
                c.close.notify_one();
                asked += 1;
            }
        }
        asked
    }
}

/// The answer to a connection past the cap.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 46\r\n\r\n\
too many connections to this proxy; try again\n";

/// Answers a connection past the cap with a 503 and closes it, after reading (and discarding)
/// for a moment what the client sent, so that the close does not reset the answer away.
pub(crate) async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        stream.write_all(TOO_MANY).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// Logs a failing `accept` at most once per [`ACCEPT_LOG_EVERY`], with how many were not
/// logged in between.
#[derive(Default)]
pub(crate) struct AcceptLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptLog {
    pub(crate) fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < ACCEPT_LOG_EVERY => self.suppressed += 1,
            _ => {
                if self.suppressed > 0 {
                    log::line(format_args!(
                        "accept: {e} ({} more since the last such line)",
                        self.suppressed
                    ));
                } else {
                    log::line(format_args!("accept: {e}"));
                }
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

/// What happened to a client's request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// Nothing went wrong (so far).
    None,
    /// The client paused longer than the body timeout.
    TimedOut,
    /// The client sent a malformed body (bad chunked framing, or the connection ended early).
    Malformed,
    /// The body grew past `max_body_bytes`.
    TooLarge,
}

/// Shared between a [`TimedBody`] and the request handler, which reads it after a failed
/// upstream exchange to tell the client's faults from the upstream's.
#[derive(Default)]
pub(crate) struct BodyWatch {
    fault: AtomicU8,
    /// When the last piece of the body arrived, in ms since [`epoch`]; 0 if none did.
    last_piece_ms: std::sync::atomic::AtomicU64,
    /// The whole body has arrived.
    done: AtomicBool,
}

/// A fixed instant of this process, for storing instants in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl BodyWatch {
    /// When the last piece of the body arrived, if any did.
    pub(crate) fn last_piece(&self) -> Option<Instant> {
        match self.last_piece_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch() + Duration::from_millis(ms)),
        }
    }

    /// Whether the whole body has arrived.
    pub(crate) fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    fn piece(&self) {
        let ms = epoch().elapsed().as_millis().max(1) as u64;
        self.last_piece_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn fault(&self) -> BodyFault {
        match self.fault.load(Ordering::Relaxed) {
            1 => BodyFault::TimedOut,
            2 => BodyFault::Malformed,
            3 => BodyFault::TooLarge,
            _ => BodyFault::None,
        }
    }

    fn set(&self, f: BodyFault) {
        let v = match f {
            BodyFault::None => 0,
            BodyFault::TimedOut => 1,
            BodyFault::Malformed => 2,
            BodyFault::TooLarge => 3,
        };
        self.fault.store(v, Ordering::Relaxed);
    }
}

/// A client's request body that fails (and says why in its [`BodyWatch`]) when the client
/// pauses longer than the body timeout between two pieces of it, or sends more than
/// `max_body_bytes` of it.
pub(crate) struct TimedBody {
    body: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(crate) watch: Arc<BodyWatch>,
    /// Bytes it may still carry (`u64::MAX`: no cap).
    room: u64,
}

impl TimedBody {
    pub(crate) fn new(body: Incoming, limits: &Limits) -> TimedBody {
        TimedBody {
            body,
            timeout: limits.body_timeout,
            sleep: None,
            watch: Arc::new(BodyWatch::default()),
            room: match limits.max_body_bytes {
                0 => u64::MAX,
                cap => cap,
            },
        }
    }
}

/// The error a [`TimedBody`] fails with; its [`BodyWatch`] says which.
#[derive(Debug)]
pub(crate) struct ClientBodyError(pub(crate) &'static str);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ClientBodyError {}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.sleep = None;
                let len = f.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.room {
                    this.watch.set(BodyFault::TooLarge);
                    return Poll::Ready(Some(Err(Box::new(ClientBodyError(
                        "the request body is larger than max_body_bytes",
                    )))));
                }
                this.room -= len;
                this.watch.piece();
                if this.body.is_end_stream() {
                    this.watch.done.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.watch.set(BodyFault::Malformed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.watch.done.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.watch.set(BodyFault::TimedOut);
                        Poll::Ready(Some(Err(Box::new(ClientBodyError(
                            "the client stopped sending the request body",
                        )))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How much of a request body the proxy reads before it takes an upstream connection: a body
/// that ends within this is sent whole, so that a client that stalls mid-body never holds an
/// upstream connection (or an app worker); a larger one is streamed from there on.
pub(crate) const BODY_BUFFER: usize = 16 * 1024;

/// A client's request body as it is forwarded: what was read ahead, then the rest.
pub(crate) struct ClientBody {
    ahead: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<TimedBody>,
}

impl ClientBody {
    /// A request without a body.
    pub(crate) fn empty() -> ClientBody {
        ClientBody {
            ahead: std::collections::VecDeque::new(),
            rest: None,
        }
    }

    /// Reads `body` until it ends or more than [`BODY_BUFFER`] bytes are in; fails (and the
    /// body's watch says why) if the client stalls or sends a malformed body meanwhile.
    pub(crate) async fn read_ahead(mut body: TimedBody) -> Result<ClientBody, BodyFault> {
        use http_body_util::BodyExt;
        let mut ahead = std::collections::VecDeque::new();
        let mut size = 0;
        while size <= BODY_BUFFER && !body.is_end_stream() {
            match body.frame().await {
                None => {
                    return Ok(ClientBody { ahead, rest: None });
                }
                Some(Ok(f)) => {
                    size += f.data_ref().map_or(0, Bytes::len);
                    ahead.push_back(f);
                }
                Some(Err(_)) => return Err(body.watch.fault()),
            }
        }
        let rest = (!body.is_end_stream()).then_some(body);
        Ok(ClientBody { ahead, rest })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(f) = this.ahead.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && self.rest.as_ref().is_none_or(TimedBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self
            .ahead
            .iter()
            .map(|f| f.data_ref().map_or(0, |d| d.len() as u64))
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(ahead),
            Some(rest) => {
                let h = rest.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(h.lower() + ahead);
                if let Some(u) = h.upper() {
                    s.set_upper(u + ahead);
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body.len(), 46);
    }

    #[test]
    fn the_cap_leaves_room_for_upstream_connections() {
        assert_eq!(effective_cap(16_384, Some(1024)), 480);
        assert_eq!(effective_cap(100, Some(1024)), 100);
        assert_eq!(effective_cap(16_384, Some(65_536)), 16_384);
        assert_eq!(effective_cap(16_384, None), 16_384);
        assert_eq!(effective_cap(16_384, Some(10)), 1);
    }

    #[test]
    fn reclaims_the_oldest_idle_connection_then_refuses() {
        let slots = Slots::new(2);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        let _busy = b.state.busy();
        // At the cap: a (idle) is asked to close, the newcomer is admitted.
        let c = slots.admit().unwrap();
        assert!(a.state.reclaimed.load(Ordering::Relaxed));
        let _busy_c = c.state.busy();
        // a has not closed yet and is already asked; b and c are busy: refused.
        assert!(slots.admit().is_none());
        drop(a);
        assert_eq!(slots.open(), 2);
        assert!(slots.admit().is_none());
    }

    #[test]
    fn each_worker_counts_the_connections_assigned_to_it() {
        let slots = Slots::for_workers(100, 2);
        let mut held: Vec<Slot> = (0..4).map(|_| slots.admit().unwrap()).collect();
        // Admitted but not yet assigned: counted nowhere.
        assert_eq!(slots.per_worker(), vec![0, 0]);
        for (i, s) in held.iter_mut().enumerate() {
            s.assign(usize::from(i == 3));
        }
        assert_eq!(slots.per_worker(), vec![3, 1]);
        // A slot reassigned (handed over) moves its count; one closed frees it.
        held[0].assign(1);
        assert_eq!(slots.per_worker(), vec![2, 2]);
        held.retain(|s| s.worker() == 0);
        assert_eq!(slots.per_worker(), vec![2, 0]);
        // Assigned to a worker that does not exist: counted nowhere.
        held[0].assign(7);
        assert_eq!(slots.per_worker(), vec![1, 0]);
        held.clear();
        assert_eq!((slots.per_worker(), slots.open()), (vec![0, 0], 0));
    }

    #[test]
    fn the_connection_asked_to_move_is_the_busiest_lately_that_evens_out_the_requests() {
        let slots = Slots::for_workers(100, 2);
        let mut held: Vec<Slot> = (0..5).map(|_| slots.admit().unwrap()).collect();
        for (i, s) in held.iter_mut().enumerate() {
            s.assign(usize::from(i == 4));
            s.state.set_movable();
        }
        let requests = |s: &Slot, n: usize| {
            for _ in 0..n {
                drop(s.state.busy());
            }
        };
        let asked: fn(&[Slot]) -> Vec<Option<usize>> =
            |held| held.iter().map(|s| s.state.move_to()).collect();
        // Worker 0: 5, 9 and 30 requests (the 30 on a connection that became a tunnel);
        // worker 1: 2. Half the difference is 21: the busiest movable one below it goes.
        requests(&held[1], 5);
        requests(&held[2], 9);
        requests(&held[3], 30);
        held[3].state.set_upgraded();
        requests(&held[4], 2);
        assert!(slots.ask_to_move(0, 1));
        assert_eq!(asked(&held), vec![None, None, Some(1), None, None]);
        // Since that look, worker 1 served more: nothing moves.
        requests(&held[0], 20);
        requests(&held[1], 3);
        requests(&held[4], 30);
        assert!(!slots.ask_to_move(0, 1));
        // Then only worker 0 served, 20 and 3: moving the 20 would make worker 1 the busier,
        // so the 3 goes.
        requests(&held[0], 20);
        requests(&held[1], 3);
        assert!(slots.ask_to_move(0, 1));
        assert_eq!(asked(&held), vec![None, Some(1), Some(1), None, None]);
        // Two equally busy connections on each side: nothing moves.
        let mut even: Vec<Slot> = (0..4).map(|_| slots.admit().unwrap()).collect();
        for (i, s) in even.iter_mut().enumerate() {
            s.assign(i % 2);
            s.state.set_movable();
        }
        for s in &even {
            requests(s, 10);
        }
        assert!(!slots.ask_to_move(0, 1));
        // Moved (assigned to the other worker): no longer asked, and counted as worker 1's
        // (its 50 requests and another's 40 against none: the 40 goes back).
        held[2].assign(1);
        assert_eq!(held[2].state.move_to(), None);
        requests(&held[2], 50);
        requests(&held[4], 40);
        assert!(slots.ask_to_move(1, 0));
        assert_eq!(asked(&held), vec![None, Some(1), None, None, Some(0)]);
        // Not movable (a TLS connection): never asked.
        let mut tls = slots.admit().unwrap();
        tls.assign(1);
        requests(&tls, 50);
        assert!(!slots.ask_to_move(1, 0));
        assert_eq!(tls.state.move_to(), None);
    }
}

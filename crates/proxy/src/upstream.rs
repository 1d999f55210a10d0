//! Upstream connections for forwarded requests: keep-alive pools per HTTP worker thread (see
//! `forward`), keyed by target address, of two kinds: connections of [`crate::direct`]
//! exchanges (requests without a body), and hyper HTTP/1.1 client connections (requests with a
//! body, upgrades). A request takes an idle connection (or opens one), sends on it, and the
//! connection goes back to the pool of the thread that finishes the response body. It owns
//! connecting and pooling; it must not route, rewrite headers or decide about retries (that is
//! `forward`).
//!
//! Invariants:
//! - A connection is in a pool only while no request uses it: it is taken out for a request
//!   and put back only after that request's response body has been read to its end; a body
//!   that ends early (client gone, upstream error) closes the connection instead.
//! - A pooled connection is idle for at most [`POOL_IDLE`] (a reaper task per worker thread
//!   closes older ones), so that we rarely race an upstream's own idle close; at most
//!   [`MAX_IDLE_PER_TARGET`] idle connections of each kind are kept per target and thread.
//! - A direct connection idle for [`MAY_BE_STALE_AFTER`] or more, or taken for a request that
//!   must not be sent twice, is checked for a close by the upstream (one `recv` that must find
//!   nothing) before it is used again.
//! - The pools are thread-local: taking and returning a connection takes no lock and touches
//!   no memory shared with other threads.

use std::cell::RefCell;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::direct;
use crate::limits::ClientBody;

/// Idle pooled connections are closed after at most this long (below most app servers'
/// keep-alive timeouts, so that we rarely race an upstream's own idle close).
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per target and worker thread.
const MAX_IDLE_PER_TARGET: usize = 64;
/// How long a pooled connection that is not ready yet (its previous response is still being
/// wound up by its connection task) may take to become ready before it is given up.
const READY_WAIT: Duration = Duration::from_secs(1);

/// The body of a forwarded request: the client's, or none (a retry).
pub(crate) enum ReqBody {
    Client(ClientBody),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Client(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Client(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Client(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A client connection to one upstream.
pub(crate) type Sender = SendRequest<ReqBody>;

/// A connection taken for one request.
pub(crate) struct Taken {
    pub(crate) sender: Sender,
    /// It came from the pool after being idle for [`MAY_BE_STALE_AFTER`] or more: the
    /// upstream may have closed it just as we send (the keep-alive race).
    pub(crate) may_be_stale: bool,
}

/// How long an idle pooled connection must have been idle before a request sent on it may
/// fail because the upstream closed it under our feet. Connections reused sooner (all of
/// them under load) are far from any upstream's idle timeout.
const MAY_BE_STALE_AFTER: Duration = Duration::from_millis(100);

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) struct ConnectError(String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

struct Idle<T> {
    conn: T,
    /// The reaper generation in which it was put back.
    generation: u64,
    since: Instant,
}

/// Idle connections of one kind, by target.
struct Pool<T> {
    targets: Vec<(Box<str>, Vec<Idle<T>>)>,
    generation: u64,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            targets: Vec::new(),
            generation: 0,
        }
    }
}

/// A connection a pool can hold.
trait Pooled {
    /// Known to be closed (without a system call).
    fn is_closed(&self) -> bool;
}

impl Pooled for Sender {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Pooled for direct::Conn {
    fn is_closed(&self) -> bool {
        false
    }
}

impl<T: Pooled> Pool<T> {
    fn pop(&mut self, addr: &str) -> Option<Idle<T>> {
        let (_, idle) = self.targets.iter_mut().find(|(a, _)| &**a == addr)?;
        idle.pop()
    }

    fn push(&mut self, addr: &str, conn: T) {
        let generation = self.generation;
        let idle = match self.targets.iter().position(|(a, _)| &**a == addr) {
            Some(i) => &mut self.targets[i].1,
            None => {
                self.targets.push((addr.into(), Vec::new()));
                &mut self.targets.last_mut().expect("just pushed").1
            }
        };
        if idle.len() < MAX_IDLE_PER_TARGET {
            idle.push(Idle {
                conn,
                generation,
                since: Instant::now(),
            });
        }
    }

    /// Moves to the next generation and takes out the connections put back two
    /// generations ago or earlier, and those known to be closed.
    fn expire(&mut self) -> Vec<Idle<T>> {
        self.generation += 1;
        let keep_from = self.generation.saturating_sub(1);
        let mut expired = Vec::new();
        for (_, idle) in &mut self.targets {
            // Oldest first: the pool is used LIFO.
            let n = idle
                .iter()
                .position(|i| i.generation >= keep_from && !i.conn.is_closed())
                .unwrap_or(idle.len());
            expired.extend(idle.drain(..n));
            idle.retain(|i| !i.conn.is_closed());
        }
        self.targets.retain(|(_, idle)| !idle.is_empty());
        expired
    }
}

thread_local! {
    /// hyper client connections (requests with a body, upgrades).
    static POOL: RefCell<Pool<Sender>> = RefCell::new(Pool::default());
    /// Connections of [`direct`] exchanges (requests without a body).
    static DIRECT: RefCell<Pool<direct::Conn>> = RefCell::new(Pool::default());
}

/// Takes an idle connection to `addr` from this thread's pool, else opens one (giving up
/// after `connect_timeout`).
pub(crate) async fn take(addr: &str, connect_timeout: Duration) -> Result<Taken, ConnectError> {
    while let Some(Idle {
        conn: mut sender,
        since,
        ..
    }) = POOL.with(|p| p.borrow_mut().pop(addr))
    {
        let ready = sender.is_ready()
            || (!sender.is_closed()
                && matches!(
                    tokio::time::timeout(READY_WAIT, sender.ready()).await,
                    Ok(Ok(()))
                ));
        if ready {
            return Ok(Taken {
                sender,
                may_be_stale: since.elapsed() >= MAY_BE_STALE_AFTER,
            });
        }
    }
    // Boxed: a new connection is rare under load, and its future (resolving, connecting, the
    // handshake) would otherwise be part of every request's.
    Ok(Taken {
        sender: Box::pin(connect(addr, connect_timeout)).await?,
        may_be_stale: false,
    })
}

/// A connection for a [`direct`] exchange: `reused` if it came from the pool.
pub(crate) struct TakenDirect {
    pub(crate) conn: direct::Conn,
    pub(crate) reused: bool,
}

/// Takes an idle connection for a [`direct`] exchange to `addr` from this thread's pool,
/// else opens one. A connection idle for [`MAY_BE_STALE_AFTER`] or more, or any one when
/// `check` (a request that must not be sent twice), is first checked for an upstream's close
/// (a system call, which the busy path skips: a request that finds a just-used connection
/// closed is retried by `forward` if that is safe).
pub(crate) async fn take_direct(
    addr: &str,
    connect_timeout: Duration,
    check: bool,
) -> Result<TakenDirect, ConnectError> {
    while let Some(Idle { conn, since, .. }) = DIRECT.with(|p| p.borrow_mut().pop(addr)) {
        if (!check && since.elapsed() < MAY_BE_STALE_AFTER) || conn.still_open() {
            return Ok(TakenDirect { conn, reused: true });
        }
    }
    let stream = Box::pin(open_within(addr, connect_timeout)).await?;
    Ok(TakenDirect {
        conn: direct::Conn::new(stream),
        reused: false,
    })
}

/// Puts a connection whose last response was read to the end back into this thread's pool.
pub(crate) fn put_back(addr: &str, sender: Sender) {
    if sender.is_closed() {
        return;
    }
    // `try_with`: a body dropped while the thread's locals are being torn down just closes.
    let _ = POOL.try_with(|p| p.borrow_mut().push(addr, sender));
}

/// Puts a [`direct`] connection whose last response was read to the end back into this
/// thread's pool.
pub(crate) fn put_back_direct(addr: &str, conn: direct::Conn) {
    let _ = DIRECT.try_with(|p| p.borrow_mut().push(addr, conn));
}

/// Closes this thread's pooled connections that have been idle too long; runs as long as the
/// worker's runtime does. A connection put back in generation `g` is closed when the
/// generation reaches `g + 2`, i.e. after between one and two periods of `POOL_IDLE / 2`.
pub(crate) async fn reaper() {
    let mut tick = tokio::time::interval(POOL_IDLE / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let expired = POOL.with(|p| p.borrow_mut().expire());
        let expired_direct = DIRECT.with(|p| p.borrow_mut().expire());
        // Dropped outside the borrow: closing wakes the connection tasks.
        drop(expired);
        drop(expired_direct);
    }
}

/// Opens a TCP connection to `addr` within `connect_timeout`.
async fn open_within(addr: &str, connect_timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(connect_timeout, open(addr)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ConnectError(format!(
                "connect to {addr}: timed out after {} ms",
                connect_timeout.as_millis()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a connection to `addr` (`host:port`; every address of a name in turn) and spawns
/// its connection task on the current runtime.
async fn connect(addr: &str, connect_timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = open_within(addr, connect_timeout).await?;
    // Flat writes, as on the client side (see `forward::connection`).
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError(format!("handshake with {addr}: {e}")))?;
    tokio::spawn(async move {
        // Errors surface on the request that was using the connection. With upgrades: a 101
        // hands the connection over to a tunnel (see `upgrade`).
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

async fn open(addr: &str) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    let addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ConnectError(format!("resolve {addr}: {e}")))?;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("connect to {a}: {e}")),
        }
    }
    Err(ConnectError(
        last.unwrap_or_else(|| format!("resolve {addr}: no address")),
    ))
}

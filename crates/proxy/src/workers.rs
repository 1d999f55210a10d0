//! The threads that accept and serve client connections: one worker per CPU, each with its
//! own single-threaded runtime accepting on a duplicate of the listening socket, and which
//! worker serves a new connection ([`crate::spread`]).
//!
//! Invariants:
//! - Everything of one client connection stays on the worker thread that serves it: the
//!   client connection, its upstream connections and their pool. A connection changes threads
//!   only as a socket with nothing of a request read: between its accept and its first read,
//!   and (plain HTTP/1.1) between two requests when it is asked to move ([`crate::spread`]);
//!   the upstream connections it used stay in the old worker's pool.
//! - Every connection served holds a slot ([`crate::limits::Slots`]) from its accept to its
//!   close, counted as the serving worker's from the moment it is handed over (past the cap, a
//!   connection gets a 503 and no slot).
//! - `serve_http` returns only when every worker and all their connections are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::deadline;
use crate::forward::{connection, stopped};
use crate::limits::{self, AcceptLog, Slot, Slots};
use crate::log;
use crate::spread;
use crate::switch::Shared;
use crate::tls;
use crate::upstream;

/// Accepts and serves client connections until `stop`; then closes idle connections, lets
/// busy ones finish their current request, and returns when all are closed.
///
/// Connections are served by one worker thread per CPU, each with its own single-threaded
/// runtime that accepts on (a duplicate of) the listening socket and keeps everything of a
/// connection on that thread: the client connection, its upstream connections and their
/// pool. A request thus never wakes another thread (a new connection, or one that moves
/// between requests, may: see [`worker`]).
/// If the worker threads cannot be started, the workers run as tasks of the calling runtime
/// instead.
/// With `tls`, the connections are served over TLS ([`tls::connection`]).
pub(crate) async fn serve_http(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    tls: Option<Arc<tls::Tls>>,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let cap = limits::effective_cap(shared.config.limits.max_connections, limits::raise_nofile());
    if cap < shared.config.limits.max_connections {
        log::line(format_args!(
            "at most {cap} client connections: the open-file limit allows no more"
        ));
    }
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            log::line(format_args!("cannot serve HTTP: {e}"));
            return;
        }
    };
    let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
    let (handoff, handed): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let workers = Workers {
        shared: shared.clone(),
        slots: Slots::for_workers(cap, n),
        stop,
        _done: done_tx,
        tls,
        handoff: handoff.into(),
        meters: Arc::new(spread::Meters::new(n)),
    };
    // Worker i takes receiver i; one that never starts drops it, so that a connection
    // handed to it comes back to the worker that accepted it.
    let mut handed = handed.into_iter();
    let mut i = 0;
    while i + 1 < n {
        let dup = match listener.try_clone() {
            Ok(dup) => dup,
            Err(e) => {
                log::line(format_args!("cannot share the listening socket: {e}"));
                break;
            }
        };
        let Some(rx) = handed.next() else { break };
        start_worker(i, dup, workers.clone(), rx);
        i += 1;
    }
    let access = shared.access.clone();
    let writer = access.clone().map(|a| tokio::spawn(a.writer()));
    let rx = handed.next().unwrap_or_else(|| mpsc::unbounded_channel().1);
    start_worker(i, listener, workers, rx);
    let _ = done_rx.recv().await;
    if let (Some(w), Some(a)) = (writer, access) {
        w.abort();
        let _ = tokio::task::spawn_blocking(move || a.flush()).await;
    }
}

/// What every worker of one listener shares.
#[derive(Clone)]
struct Workers {
    shared: Arc<Shared>,
    slots: Arc<Slots>,
    stop: watch::Receiver<bool>,
    /// Dropped by each worker when it and its connections are done (never read: held).
    _done: mpsc::Sender<()>,
    tls: Option<Arc<tls::Tls>>,
    /// Where each worker takes the connections the others hand it (see [`worker`]).
    handoff: Arc<[mpsc::UnboundedSender<Handoff>]>,
    /// How busy each worker has lately been (see [`spread`]).
    meters: Arc<spread::Meters>,
}

/// A connection one worker accepted and handed to another, with its slot; `moved`: it had
/// been served by the one handing it over, and moves between two requests.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
    moved: bool,
}

/// Starts worker `i` on a thread of its own, or as a task of the current runtime if the
/// thread or its runtime cannot be made.
fn start_worker(
    i: usize,
    listener: std::net::TcpListener,
    workers: Workers,
    handed: mpsc::UnboundedReceiver<Handoff>,
) {
    let (parked, unparked) = (workers.meters.clone(), workers.meters.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(move || parked.parked(i, parked.now()))
        .on_thread_unpark(move || unparked.unparked(i, unparked.now()))
        .build();
    let job = worker(i, listener, workers, handed);
    let spawned = match rt {
        Ok(rt) => {
            let slot = Arc::new(std::sync::Mutex::new(Some(job)));
            let in_thread = slot.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cutover-proxy-http-{i}"))
                .spawn(move || {
                    let job = in_thread.lock().ok().and_then(|mut j| j.take());
                    if let Some(job) = job {
                        rt.block_on(job);
                    }
                });
            match spawned {
                Ok(_) => None,
                Err(e) => {
                    log::line(format_args!("cannot start HTTP worker thread: {e}"));
                    slot.lock().ok().and_then(|mut j| j.take())
                }
            }
        }
        Err(e) => {
            log::line(format_args!("cannot build an HTTP worker runtime: {e}"));
            Some(job)
        }
    };
    if let Some(job) = spawned {
        tokio::spawn(job);
    }
}

/// One worker: accepts until `stop`, serves its connections, and returns (dropping `done`)
/// when they are all closed.
///
/// The workers share one listening socket. Wherever a connection is accepted,
/// [`spread::choose`] picks the worker that serves it; another worker gets it through that
/// worker's channel (its socket and slot).
async fn worker(
    me: usize,
    listener: std::net::TcpListener,
    w: Workers,
    mut handed: mpsc::UnboundedReceiver<Handoff>,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            log::line(format_args!("cannot serve HTTP: {e}"));
            return;
        }
    };
    let reaper = tokio::spawn(upstream::reaper());
    let limits = &w.shared.config.limits;
    let ticker = tokio::spawn(deadline::ticker(deadline::tick_for(
        limits
            .upstream_header_timeout
            .min(limits.upstream_body_timeout)
            .min(limits.send_timeout),
    )));
    let (conns_tx, mut conns_rx) = mpsc::channel::<()>(1);
    // TLS connections stay on the worker that took them (their session state is not handed
    // over): only a plain-HTTP listener's workers move connections.
    let balancer = w
        .tls
        .is_none()
        .then(|| tokio::spawn(balance(me, w.clone())));
    let serve = |stream: TcpStream, peer: SocketAddr, mut slot: Slot, moved: bool| {
        slot.assign(me);
        match &w.tls {
            Some(tls) => {
                tokio::spawn(tls::connection(
                    w.shared.clone(),
                    tls.clone(),
                    stream,
                    peer,
                    slot,
                    w.stop.clone(),
                    conns_tx.clone(),
                ));
            }
            None => {
                tokio::spawn(plain(
                    w.clone(),
                    (stream, peer, slot),
                    moved,
                    conns_tx.clone(),
                ));
            }
        }
    };
    let mut stop = w.stop.clone();
    let mut accept_log = AcceptLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // EMFILE and friends: free descriptors held by idle keep-alive
                    // connections, and back off instead of spinning.
                    w.slots.reclaim(16);
                    accept_log.failed(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some(h) = handed.recv() => {
                if let Ok(stream) = TcpStream::from_std(h.stream) {
                    serve(stream, h.peer, h.slot, h.moved);
                }
                continue;
            }
            _ = stopped(&mut stop) => break,
        };
        let Some(mut slot) = w.slots.admit() else {
            tokio::spawn(limits::refuse_connection(stream));
            continue;
        };
        let loads = w.meters.loads(w.meters.now());
        let Some(to) = spread::choose(me, &loads, &w.slots.per_worker(), spread::cpus()) else {
            serve(stream, peer, slot, false);
            continue;
        };
        // Counted as the other worker's at once, so that the next connection of a burst
        // sees it there.
        slot.assign(to);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        if let Err(back) = w.hand(to, stream, peer, slot, false) {
            // That worker is gone (stopping, or never started): served here.
            if let Ok(stream) = TcpStream::from_std(back.stream) {
                serve(stream, back.peer, back.slot, false);
            }
        }
    }
    drop(listener);
    if let Some(b) = balancer {
        b.abort();
    }
    // Connections handed over before the stop are served too; none can come after this.
    handed.close();
    while let Some(h) = handed.recv().await {
        if let Ok(stream) = TcpStream::from_std(h.stream) {
            serve(stream, h.peer, h.slot, h.moved);
        }
    }
    drop(conns_tx);
    let _ = conns_rx.recv().await;
    reaper.abort();
    ticker.abort();
    drop(w);
}

impl Workers {
    /// Hands a connection to worker `to` (its slot already assigned there); `Err`: that
    /// worker takes no more (stopping, or never started), and the connection comes back.
    fn hand(
        &self,
        to: usize,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        slot: Slot,
        moved: bool,
    ) -> Result<(), Handoff> {
        let h = Handoff {
            stream,
            peer,
            slot,
            moved,
        };
        match self.handoff.get(to) {
            Some(tx) => tx.send(h).map_err(|back| back.0),
            None => Err(h),
        }
    }
}

/// Serves a plain-HTTP client connection on this worker, and again each time it is asked to
/// move and the worker it is to move to cannot take it; one that moves is handed over.
async fn plain(
    w: Workers,
    (mut stream, peer, mut slot): (TcpStream, SocketAddr, Slot),
    mut moved: bool,
    done: mpsc::Sender<()>,
) {
    loop {
        let Some(m) = connection(
            w.shared.clone(),
            stream,
            peer,
            slot,
            w.stop.clone(),
            done.clone(),
            moved,
        )
        .await
        else {
            return;
        };
        let from = m.slot.worker();
        let mut to_slot = m.slot;
        to_slot.assign(m.to);
        match w.hand(m.to, m.stream, peer, to_slot, true) {
            Ok(()) => return,
            Err(back) => {
                let Ok(s) = TcpStream::from_std(back.stream) else {
                    return;
                };
                stream = s;
                slot = back.slot;
                slot.assign(from);
                moved = true;
            }
        }
    }
}

/// Moves connections off worker `me` while it is busy and another is not (see
/// [`spread::shed`]), one per [`spread::WINDOW`], until stopped (aborted).
async fn balance(me: usize, w: Workers) {
    let mut tick = tokio::time::interval(spread::WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let loads = w.meters.loads(w.meters.now());
        if let Some(to) = spread::shed(me, &loads, &w.slots.per_worker(), spread::cpus()) {
            w.slots.ask_to_move(me, to);
        }
    }
}

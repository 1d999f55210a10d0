//! Which worker thread serves a client connection.
//!
//! Every worker accepts on the shared listening socket, and the kernel wakes them all for a
//! new connection: whichever returns first accepts it, and one wake-up can accept a whole
//! burst. Wherever it was accepted, [`choose`] picks the worker that serves it, by how many
//! CPUs the workers may run on (their affinity, read at every accept and every check: a
//! `taskset` after start counts):
//!
//! - **On two or more**, connections are spread evenly over as many workers as there are
//!   such CPUs: a connection goes to the worker serving fewest (the accepting one on a tie),
//!   so the workers serve side by side. A few busy keep-alive connections (what a load
//!   balancer in front keeps open) are thus served by different workers. The price is
//!   waking: in the bench's plain-HTTP scenario on 2 cores the proxy spent 1.12 to 1.41 times
//!   nginx's CPU per request spread evenly against 1.06 to 1.15 gathered (four machines),
//!   and gathered its requests/s and p99 were within their run-to-run spread of spread
//!   evenly's on one machine and worse on the three others (on the latest, 98% of nginx's
//!   requests/s and p99 109% gathered against 111% and 101% spread evenly). On loopback
//!   (no docker-proxy, the client on one or four threads) gathering was the better: what
//!   else runs on the cores decides, and the bench's scenario is the nearer to a host.
//!
//!   Evenly by count is not evenly by load: the busy connections may share a worker while
//!   another serves idle ones. So every [`WINDOW`] each worker checks whether it should
//!   [`shed`] one: when it has been busy [`SHED`] of the time, serves more than one
//!   connection, and a worker beside it is less busy by [`SHED_GAP`], one of its plain-HTTP
//!   connections is asked to move there if that evens out the requests the two serve
//!   ([`crate::limits::Slots::ask_to_move`]), which it does between two requests
//!   ([`crate::guard`]). Equally busy connections spread evenly thus stay where they are.
//!   TLS connections do not move (their session state stays with the worker).
//! - **On one**, spreading only makes threads take turns on it, each sleeping and waking per
//!   request, so connections gather and nothing moves: a connection goes to the first worker
//!   (in worker order) that keeps up, one whose thread has lately been busy less than
//!   [`BUSY`] of the time and that serves fewer than [`COUNT_MARGIN`] connections more than
//!   the one serving fewest; with none keeping up, to the least busy. With the proxy pinned
//!   to a core of its own, the bench's TLS keep-alive loads (HTTP/1.1, HTTP/2) read 99% and
//!   106% of nginx's requests/s spread evenly, 134% and 112% gathered in a later run on a
//!   slower machine, and 100% and 108% gathered on a faster one, the gathered runs' p99 at
//!   most nginx's.
//!
//! A worker's load is the share of wall time its thread was not parked, kept by the
//! runtime's park hooks ([`Meters::parked`], [`Meters::unparked`]) over windows of
//! [`WINDOW`]: two clock reads per park, none per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The window a worker's load is measured over.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// Load (per mille of wall time) at or above which a worker on one CPU passes new
/// connections on. A quarter was chosen when connections gathered however many CPUs there
/// were: where new connections keep coming (each a TLS handshake of about 0.4 ms of CPU), a
/// worker busy up to half the time made them queue behind each other while another core
/// idled (the bench's full-handshake load read 98% of nginx's requests/s with half, 114% with
/// connections spread evenly). On one CPU it has not been measured against other values.
pub(crate) const BUSY: u64 = 250;

/// How many more connections than the worker serving fewest a worker may serve and still
/// take new ones, however idle it is.
pub(crate) const COUNT_MARGIN: usize = 16;

/// Load (per mille) at or above which a worker on two or more CPUs moves connections off to
/// a worker less busy by at least [`SHED_GAP`] (see [`shed`]).
pub(crate) const SHED: u64 = 750;

/// How much less busy (per mille) a worker must be to take a connection moved off a busy one.
pub(crate) const SHED_GAP: u64 = 250;

/// Where a connection accepted by worker `me` is served: `None` by `me`, or the worker to hand
/// it to. `load` and `conns` are every worker's load (per mille) and connections, `cpus` how
/// many CPUs the workers may run on.
pub(crate) fn choose(me: usize, load: &[u64], conns: &[usize], cpus: usize) -> Option<usize> {
    let workers = load.len().min(conns.len());
    if cpus >= 2 {
        let side_by_side = &conns[..workers.min(cpus)];
        let (to, fewest) = side_by_side
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, n)| n)?;
        let stays = side_by_side.get(me).is_some_and(|&n| n <= fewest);
        return (!stays).then_some(to);
    }
    let fewest = conns.iter().copied().min()?;
    let keeps_up = |w: &usize| load[*w] < BUSY && conns[*w] < fewest + COUNT_MARGIN;
    let to = match (0..workers).find(keeps_up) {
        Some(w) => w,
        None => load.iter().copied().enumerate().min_by_key(|&(_, l)| l)?.0,
    };
    (to != me).then_some(to)
}

/// The worker that worker `me` should move one of its connections to, if any: on two or more
/// CPUs, when `me` is busy ([`SHED`]), serves more than one connection, and the least busy of
/// the workers that can run beside it is less busy by [`SHED_GAP`]. Arguments as [`choose`].
pub(crate) fn shed(me: usize, load: &[u64], conns: &[usize], cpus: usize) -> Option<usize> {
    if cpus < 2 {
        return None;
    }
    let workers = load.len().min(conns.len()).min(cpus);
    let mine = *load.get(me)?;
    if mine < SHED || *conns.get(me)? < 2 {
        return None;
    }
    let to = (0..workers).filter(|&w| w != me).min_by_key(|&w| load[w])?;
    (load[to] + SHED_GAP <= mine).then_some(to)
}

/// How many CPUs the calling thread may run on (1 if that cannot be read): one system call,
/// cheap beside an accept.
pub(crate) fn cpus() -> usize {
    rustix::thread::sched_getaffinity(None).map_or(1, |set| (set.count() as usize).max(1))
}

/// The loads of all workers.
pub(crate) struct Meters {
    base: Instant,
    per_worker: Vec<Meter>,
}

/// One worker's load; written only by its own thread (the park hooks), read by any.
#[derive(Default)]
struct Meter {
    /// When the current window began (ns since `base`).
    window_start: AtomicU64,
    /// Busy time in the current window up to the last park (ns).
    busy: AtomicU64,
    /// When the thread last woke (ns since `base`, plus 1); 0 while it is parked.
    running_since: AtomicU64,
    /// Load over the last complete window (per mille).
    last: AtomicU64,
}

impl Meter {
    /// Busy time in the current window up to `now`, with the run that began at `since` (as
    /// `running_since` keeps it: 0 if parked) and has not parked yet.
    fn busy_to(&self, now: u64, since: u64) -> u64 {
        let busy = self.busy.load(Ordering::Relaxed);
        if since == 0 {
            return busy;
        }
        let start = self.window_start.load(Ordering::Relaxed);
        busy + now.saturating_sub((since - 1).max(start))
    }

    /// Records `busy` as the current window's busy time, ending the window at `now` if it
    /// has lasted [`WINDOW`].
    fn roll(&self, now: u64, busy: u64) {
        let elapsed = now.saturating_sub(self.window_start.load(Ordering::Relaxed));
        if elapsed >= WINDOW.as_nanos() as u64 {
            self.last.store(busy * 1000 / elapsed, Ordering::Relaxed);
            self.window_start.store(now, Ordering::Relaxed);
            self.busy.store(0, Ordering::Relaxed);
        } else {
            self.busy.store(busy, Ordering::Relaxed);
        }
    }
}

impl Meters {
    pub(crate) fn new(workers: usize) -> Meters {
        Meters {
            base: Instant::now(),
            per_worker: (0..workers).map(|_| Meter::default()).collect(),
        }
    }

    /// Now, in ns since `base`.
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Worker `w`'s thread woke at `now`.
    pub(crate) fn unparked(&self, w: usize, now: u64) {
        if let Some(m) = self.per_worker.get(w) {
            m.roll(now, m.busy.load(Ordering::Relaxed));
            m.running_since.store(now + 1, Ordering::Relaxed);
        }
    }

    /// Worker `w`'s thread is about to park at `now`.
    pub(crate) fn parked(&self, w: usize, now: u64) {
        let Some(m) = self.per_worker.get(w) else {
            return;
        };
        let since = m.running_since.swap(0, Ordering::Relaxed);
        m.roll(now, m.busy_to(now, since));
    }

    /// Worker `w`'s load at `now` (per mille): the last window's and the current one's,
    /// weighted by their lengths (a worker parked or running for longer than a window is
    /// judged by that alone).
    pub(crate) fn load(&self, w: usize, now: u64) -> u64 {
        let Some(m) = self.per_worker.get(w) else {
            return 0;
        };
        let busy = m.busy_to(now, m.running_since.load(Ordering::Relaxed));
        let window = WINDOW.as_nanos() as u64;
        let elapsed = now.saturating_sub(m.window_start.load(Ordering::Relaxed));
        let busy = m.last.load(Ordering::Relaxed) * window / 1000 + busy;
        (busy * 1000 / (window + elapsed)).min(1000)
    }

    /// Every worker's load at `now`.
    pub(crate) fn loads(&self, now: u64) -> Vec<u64> {
        (0..self.per_worker.len())
            .map(|w| self.load(w, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn on_one_cpu_connections_gather_on_the_first_worker_that_keeps_up() {
        // The bench's burst of 8 connections into idle workers, each accepted by whichever
        // worker the kernel woke first: all go to worker 0.
        let mut conns = vec![0, 0];
        for i in 0..8 {
            let me = i % 2;
            let to = choose(me, &[0, 0], &conns, 1).unwrap_or(me);
            conns[to] += 1;
        }
        assert_eq!(conns, vec![8, 0]);
        // Worker 0 is busy: to worker 1, wherever accepted.
        assert_eq!(choose(0, &[250, 100], &[8, 0], 1), Some(1));
        assert_eq!(choose(1, &[250, 100], &[8, 0], 1), None);
        // Both busy: the least busy.
        assert_eq!(choose(0, &[900, 750, 800], &[8, 8, 8], 1), Some(1));
        assert_eq!(choose(1, &[900, 750, 800], &[8, 8, 8], 1), None);
        // Worker 0 keeps up again: back to it.
        assert_eq!(choose(2, &[249, 100, 990], &[8, 8, 8], 1), Some(0));
    }

    #[test]
    fn on_several_cpus_connections_are_spread_evenly_over_as_many_workers() {
        // The bench's burst of 8 into two idle workers on two CPUs, accepted by either: 4/4.
        let mut conns = vec![0, 0];
        for i in 0..8 {
            let me = [0, 0, 1, 0, 0, 0, 1, 1][i];
            let to = choose(me, &[0, 0], &conns, 2).unwrap_or(me);
            conns[to] += 1;
        }
        assert_eq!(conns, vec![4, 4]);
        // A tie stays where it was accepted, however busy that worker is.
        assert_eq!(choose(1, &[0, 900], &[4, 4], 2), None);
        assert_eq!(choose(0, &[900, 0], &[5, 4], 2), Some(1));
        // Four workers on two CPUs: only the first two serve.
        let mut conns = vec![0; 4];
        for i in 0..8 {
            let me = i % 4;
            let to = choose(me, &[0; 4], &conns, 2).unwrap_or(me);
            conns[to] += 1;
        }
        assert_eq!(conns, vec![4, 4, 0, 0]);
        // More CPUs than workers: every worker.
        assert_eq!(choose(0, &[0, 0], &[1, 0], 8), Some(1));
    }

    #[test]
    fn on_several_cpus_a_busy_worker_sheds_a_connection_to_a_less_busy_one() {
        // Shedding: busy, with a worker less busy by the gap, and more than one connection.
        assert_eq!(shed(0, &[900, 100], &[8, 0], 2), Some(1));
        assert_eq!(shed(1, &[100, 900], &[0, 8], 2), Some(0));
        assert_eq!(shed(0, &[749, 0], &[8, 0], 2), None, "not busy");
        assert_eq!(
            shed(0, &[900, 651], &[8, 2], 2),
            None,
            "the other is as busy"
        );
        assert_eq!(shed(0, &[900, 650], &[8, 2], 2), Some(1));
        assert_eq!(shed(0, &[1000, 0], &[1, 0], 2), None, "one connection");
        assert_eq!(shed(0, &[1000, 0], &[8, 0], 1), None, "one CPU");
        assert_eq!(shed(0, &[1000, 600, 0, 0], &[8, 2, 0, 0], 2), Some(1));
        // A connection costing 12% of a core each: worker 0 sheds until it keeps up.
        let mut conns = vec![8, 0];
        while let Some(to) = shed(
            0,
            &[conns[0] as u64 * 120, conns[1] as u64 * 120],
            &conns,
            2,
        ) {
            conns[0] -= 1;
            conns[to] += 1;
        }
        assert_eq!(conns, vec![6, 2]);
    }

    #[test]
    fn a_large_burst_is_spread_before_it_loads_anyone() {
        let mut conns = vec![0, 0];
        for _ in 0..100 {
            let to = choose(0, &[0, 0], &conns, 1).unwrap_or(0);
            conns[to] += 1;
        }
        assert_eq!(conns, vec![58, 42]);
        // With no worker at all: served where accepted.
        assert_eq!(choose(0, &[], &[], 1), None);
        assert_eq!(choose(0, &[], &[], 2), None);
    }

    #[test]
    fn cpus_follows_the_threads_affinity_as_changed_after_start() {
        use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
        assert!(cpus() >= 1);
        std::thread::spawn(|| {
            // As `taskset -a -p -c N` does to a running proxy: one CPU of those it had.
            let had = sched_getaffinity(None).expect("affinity");
            let first = (0..CpuSet::MAX_CPU)
                .find(|&c| had.is_set(c))
                .expect("a CPU");
            let mut one = CpuSet::new();
            one.set(first);
            sched_setaffinity(None, &one).expect("set affinity");
            assert_eq!(cpus(), 1);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn load_is_the_share_of_time_not_parked() {
        let m = Meters::new(2);
        // Worker 0: 3 ms running in every 4 ms, for two windows.
        let mut t = 0;
        while t < 200 * MS {
            m.unparked(0, t);
            m.parked(0, t + 3 * MS);
            t += 4 * MS;
        }
        assert_eq!(m.load(0, t), 750);
        // Worker 1 never woke.
        assert_eq!(m.load(1, t), 0);
        // A worker running without parking is busy past [`BUSY`] within a window, and
        // busier the longer it runs; one parked for long reads as idle.
        m.unparked(1, t);
        assert_eq!(m.load(1, t + 20 * MS), 166);
        assert_eq!(m.load(1, t + 50 * MS), 333);
        assert_eq!(m.load(1, t + 2000 * MS), 952);
        assert_eq!(m.load(0, t + 2000 * MS), 68);
        assert_eq!(m.loads(t + 2000 * MS), vec![68, 952]);
    }
}

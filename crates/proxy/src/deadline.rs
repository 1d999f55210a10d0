//! Coarse deadlines: for the exchanges of requests without a body (`upstream_header_timeout`,
//! 504) and for the pauses of an upstream in the middle of a response body
//! (`upstream_body_timeout`, [`Pause`]). A per-thread list of waiting futures that a ticker
//! task looks through a few times per timeout, instead of one entry in tokio's timer wheel per
//! request (registering and removing one cost about 1,900 instructions, 5% of an HTTP/1.1
//! request's). It owns the list and the ticker; it must not decide what happens at a deadline
//! (that is `forward`).
//!
//! Invariants:
//! - A future given a deadline never completes with its output after the deadline was seen
//!   to pass, and is woken at most one tick after its deadline (a tick is an eighth of the
//!   shorter timeout, between [`MIN_TICK`] and [`MAX_TICK`]).
//! - An entry is in the list only while its future waits (or its body pauses): removed when
//!   it completes, makes progress or is dropped. The list is thread-local: no lock, no memory
//!   shared with other threads.

use std::cell::RefCell;
use std::future::Future;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Shortest tick of the ticker.
pub(crate) const MIN_TICK: Duration = Duration::from_millis(10);
/// Longest tick of the ticker.
pub(crate) const MAX_TICK: Duration = Duration::from_millis(250);

/// The waiting exchanges of this thread: (deadline, waker) by slot, and the free slots.
#[derive(Default)]
struct Waiting {
    slots: Vec<Option<(Instant, Waker)>>,
    free: Vec<usize>,
}

thread_local! {
    static WAITING: RefCell<Waiting> = RefCell::new(Waiting::default());
}

/// The tick for deadlines of `timeout`.
pub(crate) fn tick_for(timeout: Duration) -> Duration {
    (timeout / 8).clamp(MIN_TICK, MAX_TICK)
}

/// Wakes this thread's waiting futures whose deadline has passed, every `tick`; runs as long
/// as the worker's runtime does.
pub(crate) async fn ticker(tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = Instant::now();
        let due: Vec<Waker> = WAITING.with(|w| {
            w.borrow()
                .slots
                .iter()
                .flatten()
                .filter(|(at, _)| *at <= now)
                .map(|(_, waker)| waker.clone())
                .collect()
        });
        // Woken outside the borrow: a future woken here may run on this thread at once.
        for waker in due {
            waker.wake();
        }
    }
}

/// `fut`, or `None` once `deadline` has passed (seen at most a tick late).
pub(crate) async fn within<F: Future>(fut: F, deadline: Instant) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut entry = Entry(None);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            entry.remove();
            return Poll::Ready(Some(out));
        }
        if Instant::now() >= deadline {
            entry.remove();
            return Poll::Ready(None);
        }
        entry.set(deadline, cx.waker());
        Poll::Pending
    })
    .await
}

/// How long a stream has been waiting for its next piece, as one deadline: a pause starts
/// when the stream first has nothing to give and ends when it gives something. Only the time
/// spent waiting counts: a body that is not asked for its next piece (its client is slow to
/// read) is not paused.
#[derive(Debug, Default)]
pub(crate) struct Pause {
    /// When the pause ends the stream (`None`: not paused).
    until: Option<Instant>,
    entry: Entry,
}

impl Pause {
    /// The stream gave something (or ended): it is not paused any more.
    pub(crate) fn progressed(&mut self) {
        if self.until.take().is_some() {
            self.entry.remove();
        }
    }

    /// The stream has nothing to give: `true` once it has had nothing for `limit` in one
    /// pause; otherwise `waker` is woken at most a tick after the pause reaches `limit`.
    pub(crate) fn waiting(&mut self, limit: Duration, waker: &Waker) -> bool {
        let now = Instant::now();
        let until = *self.until.get_or_insert(now + limit);
        if now >= until {
            self.progressed();
            return true;
        }
        self.entry.set(until, waker);
        false
    }
}

/// A future's place in this thread's list, if it has one (removed when dropped).
#[derive(Debug, Default)]
struct Entry(Option<usize>);

impl Entry {
    fn set(&mut self, deadline: Instant, waker: &Waker) {
        match self.0 {
            Some(i) => WAITING.with(|w| {
                if let Some(Some((_, known))) = w.borrow_mut().slots.get_mut(i) {
                    if !known.will_wake(waker) {
                        known.clone_from(waker);
                    }
                }
            }),
            None => {
                self.0 = Some(WAITING.with(|w| {
                    let mut w = w.borrow_mut();
                    let entry = Some((deadline, waker.clone()));
                    match w.free.pop() {
                        Some(i) => {
                            w.slots[i] = entry;
                            i
                        }
                        None => {
                            w.slots.push(entry);
                            w.slots.len() - 1
                        }
                    }
                }));
            }
        }
    }

    fn remove(&mut self) {
        if let Some(i) = self.0.take() {
            // `try_with`: dropped while the thread's locals are being torn down, nothing to do.
            let _ = WAITING.try_with(|w| {
                let mut w = w.borrow_mut();
                if let Some(s) = w.slots.get_mut(i) {
                    *s = None;
                    w.free.push(i);
                }
            });
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> usize {
        WAITING.with(|w| w.borrow().slots.iter().flatten().count())
    }

    #[tokio::test]
    async fn a_future_past_its_deadline_ends_within_a_tick_and_leaves_no_entry() {
        let tick = tick_for(Duration::from_millis(200));
        assert_eq!(tick, Duration::from_millis(25));
        let ticker = tokio::spawn(ticker(tick));
        let start = Instant::now();
        let never = within(
            std::future::pending::<()>(),
            start + Duration::from_millis(200),
        );
        assert_eq!(never.await, None);
        let took = start.elapsed();
        assert!(
            // Late by a tick or so; generous for a busy machine.
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(waiting(), 0);
        // One that completes first gives its output, and so does one woken by its own work.
        let quick = within(
            tokio::time::sleep(Duration::from_millis(20)),
            Instant::now() + Duration::from_secs(60),
        );
        assert_eq!(quick.await, Some(()));
        assert_eq!(waiting(), 0);
        // A dropped one leaves no entry either.
        let dropped = within(
            std::future::pending::<()>(),
            Instant::now() + Duration::from_secs(60),
        );
        assert!(tokio::time::timeout(Duration::from_millis(30), dropped)
            .await
            .is_err());
        assert_eq!(waiting(), 0);
        ticker.abort();
        assert_eq!(tick_for(Duration::from_secs(60)), MAX_TICK);
        assert_eq!(tick_for(Duration::from_millis(1)), MIN_TICK);
    }

    #[tokio::test]
    async fn a_pause_counts_from_its_first_wait_and_restarts_after_progress() {
        let ticker = tokio::spawn(ticker(MIN_TICK));
        let limit = Duration::from_millis(150);
        let mut pause = Pause::default();
        let waker = Waker::noop().clone();
        // Waiting 100 ms, then progress, then 100 ms more: two pauses, neither over the limit.
        let start = Instant::now();
        assert!(!pause.waiting(limit, &waker));
        assert_eq!(waiting(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pause.waiting(limit, &waker));
        pause.progressed();
        assert_eq!(waiting(), 0);
        assert!(!pause.waiting(limit, &waker));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pause.waiting(limit, &waker), "{:?}", start.elapsed());
        // Past the limit in one pause: over, and its entry gone.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(pause.waiting(limit, &waker));
        assert_eq!(waiting(), 0);
        // Woken by the ticker, not by the stream, when the limit passes.
        let mut pause = Pause::default();
        let woke = std::future::poll_fn(|cx| {
            if pause.waiting(limit, cx.waker()) {
                Poll::Ready(Instant::now())
            } else {
                Poll::Pending
            }
        });
        let t = Instant::now();
        let at = woke.await;
        assert!(
            at - t >= limit && at - t < Duration::from_secs(2),
            "{:?}",
            at - t
        );
        assert_eq!(waiting(), 0);
        ticker.abort();
    }
}

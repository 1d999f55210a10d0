//! Per-target request counts for judging a release by its real traffic: requests answered,
//! 5xx answers, requests the target failed to answer (connect or read failures, timeouts;
//! the client got a 502 or 504 from the proxy) and a fixed-bucket latency histogram of the
//! time to the response head. It owns only counting; the `stats` control request reports the
//! counts cumulatively and the caller diffs two reports to get a window.
//!
//! Invariants:
//! - Counting is lock-free (relaxed atomics) and never allocates on the request path.
//! - Counts belong to one [`crate::table::Target`], i.e. to one stint of an address as the
//!   current (or canary) target; its `id` tells two stints of the same address apart.
//! - The bucket bounds are [`cutover_proxy_wire::LATENCY_BOUNDS_MS`] (plus one overflow
//!   bucket) and never change, so that counts of two reports can be subtracted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cutover_proxy_wire::{TargetStats, LATENCY_BOUNDS_MS};

/// Number of latency buckets: one per bound, plus everything slower.
const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The counts of one target.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    errors_5xx: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Stats {
    /// Counts a request the target answered with `status` after `took`.
    pub(crate) fn answered(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&status) {
            self.errors_5xx.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[bucket(took)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request the target did not answer (the client got a 502 or 504).
    pub(crate) fn failed(&self, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(took)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, for the wire.
    pub(crate) fn report(&self, id: u64, target: &str, role: &str) -> TargetStats {
        TargetStats {
            id,
            target: target.to_string(),
            role: role.to_string(),
            requests: self.requests.load(Ordering::Relaxed),
            errors_5xx: self.errors_5xx.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// The bucket of a latency: the first bound it does not exceed, else the overflow bucket.
fn bucket(took: Duration) -> usize {
    let ms = took.as_millis();
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| ms <= u128::from(b))
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_answers_errors_failures_and_latency() {
        let s = Stats::default();
        for _ in 0..97 {
            s.answered(200, Duration::from_micros(300));
        }
        s.answered(503, Duration::from_millis(40));
        s.answered(404, Duration::from_millis(3));
        s.failed(Duration::from_secs(60));
        let r = s.report(7, "127.0.0.1:1", "current");
        assert_eq!((r.requests, r.errors_5xx, r.failures), (100, 1, 1));
        assert_eq!(r.latency.len(), LATENCY_BOUNDS_MS.len() + 1);
        assert_eq!(r.latency[0], 97, "{:?}", r.latency);
        assert_eq!(*r.latency.last().unwrap(), 1, "{:?}", r.latency);
        assert_eq!(r.latency.iter().sum::<u64>(), 100);
        // 97 at <= 1 ms, one at 5, one at 50, one overflow: the 99th is the 50 ms one.
        assert_eq!(r.p99_ms(), Some(50));
        assert_eq!(r.error_rate(), Some(0.02));
    }
}

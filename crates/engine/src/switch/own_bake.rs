//! The controller's own bake, for a host whose proxy does not take the `bake` request (an
//! older proxy that does not know the op, or one that refuses it): the controller judges the
//! window itself with the one judge (`cutover_proxy_wire::judge`) over the proxy's `stats`
//! reports, probing the health path through the proxy when real traffic is too thin, exactly
//! as the proxy would.
//!
//! Choice: judge, not revert at once. A proxy that only lacks the op still counts requests,
//! and reverting every release an older proxy cannot bake would make a fleet mid-upgrade
//! undeployable. But it fails safe wherever it cannot see: a `stats` report it cannot read
//! during the window (the proxy is gone, the counts are) fails the bake, and so does a
//! window with neither enough requests nor a single probe answered. What it gives up is the
//! independence from the controller: a controller that dies during this bake leaves the new
//! release serving, and the next run reconciles it (as `partial`) like any interrupted run.
//!
//! Pure over its inputs (the reports, the probes, a sleep), so it is unit-tested with values.

use cutover_proxy_wire::{bake_window, judge, judge_probes, BakeLimits, Judged, StatsReport};
use std::time::{Duration, Instant};

/// What the controller's bake is given.
pub(crate) struct OwnBake<'a> {
    pub window: Duration,
    pub interval: Duration,
    pub limits: BakeLimits,
    pub release: &'a str,
    pub old_release: Option<&'a str>,
    pub health_path: &'a str,
    /// The target under watch is the service's canary.
    pub canary: bool,
}

impl OwnBake<'_> {
    /// Judges every `interval` from `before` on: `stats` reads the proxy's counts, `probe`
    /// sends one health probe through the proxy (true: it passed), `live` hears each
    /// judgement's counts, `sleep` waits. `Ok` is the verdict, `Err` a failed bake.
    pub(crate) fn run(
        &self,
        before: &StatsReport,
        mut stats: impl FnMut() -> Result<StatsReport, String>,
        mut probe: impl FnMut() -> bool,
        mut live: impl FnMut(&str),
        mut sleep: impl FnMut(Duration),
    ) -> Result<String, String> {
        let deadline = Instant::now() + self.window;
        let (mut probes, mut failed) = (0u32, 0u32);
        loop {
            let after = stats().map_err(|e| {
                format!("the controller judged the bake and lost the proxy's counts: {e}")
            })?;
            let Some((new, old)) = bake_window(before, &after, self.canary) else {
                return Err("the proxy no longer routes to the release under watch".into());
            };
            if new.requests < self.limits.min_requests {
                probes += 1;
                if !probe() {
                    failed += 1;
                }
            }
            let judged = judge(
                &new,
                old.as_ref(),
                self.release,
                self.old_release,
                &self.limits,
            );
            match judged {
                Judged::Failed(why) => return Err(why),
                Judged::Passed(m) | Judged::TooFew(m) if Instant::now() < deadline => {
                    live(&format!("{m}; {failed} of {probes} probes failed"));
                }
                Judged::Passed(m) => return Ok(m),
                Judged::TooFew(m) => {
                    let path = self.health_path;
                    return match judge_probes(probes, failed, path, self.window, &self.limits) {
                        Judged::Failed(p) => Err(format!("{m}; {p}")),
                        Judged::Passed(p) | Judged::TooFew(p) => {
                            Ok(format!("{m}: judged by probes, {p}"))
                        }
                    };
                }
            }
            sleep(
                self.interval
                    .min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proxy_wire::{TargetStats, LATENCY_BOUNDS_MS, MIN_BAKE_REQUESTS};
    use std::cell::Cell;

    fn t(id: u64, role: &str, requests: u64, errors: u64) -> TargetStats {
        let mut latency = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        latency[0] = requests;
        TargetStats {
            id,
            target: format!("127.0.0.1:{}", 40000 + id),
            role: role.into(),
            requests,
            errors_5xx: errors,
            failures: 0,
            latency,
        }
    }

    fn report(targets: Vec<TargetStats>) -> StatsReport {
        StatsReport {
            service: "web".into(),
            targets,
            bake: None,
        }
    }

    fn bake(window: Duration) -> OwnBake<'static> {
        OwnBake {
            window,
            interval: Duration::ZERO,
            limits: BakeLimits {
                max_error_ppm: 10_000,
                max_p99_ms: None,
                min_requests: MIN_BAKE_REQUESTS,
            },
            release: "r2",
            old_release: Some("r1"),
            health_path: "/up",
            canary: false,
        }
    }

    #[test]
    fn a_release_failing_real_requests_fails_at_the_first_judgement_with_enough_of_them() {
        let before = report(vec![t(2, "current", 0, 0), t(1, "previous", 500, 0)]);
        // Polls: 10 requests (too few, probed), then 100 with 20 failed.
        let polls = Cell::new(0);
        let r = bake(Duration::from_secs(3600)).run(
            &before,
            || {
                polls.set(polls.get() + 1);
                Ok(match polls.get() {
                    1 => report(vec![t(2, "current", 10, 0), t(1, "previous", 500, 0)]),
                    _ => report(vec![t(2, "current", 100, 20), t(1, "previous", 500, 0)]),
                })
            },
            || true,
            |_| {},
            |_| {},
        );
        assert_eq!(
            r,
            Err("new release r2: 20 of 100 requests failed (20.0%: 20 5xx, 0 unanswered), p99 <= 1 ms; old release r1: 0 of 500 requests failed (0.0%), p99 <= 1 ms; above max_error_rate 0.01 and the old release's rate".into())
        );
        assert_eq!(polls.get(), 2, "judged long before the hour's window ends");
    }

    #[test]
    fn a_healthy_window_passes_and_each_judgement_is_heard_live() {
        let before = report(vec![t(2, "current", 0, 0), t(1, "previous", 500, 0)]);
        let heard = std::cell::RefCell::new(Vec::new());
        let r = bake(Duration::ZERO).run(
            &before,
            || {
                Ok(report(vec![
                    t(2, "current", 300, 0),
                    t(1, "previous", 500, 0),
                ]))
            },
            || panic!("enough requests: no probe"),
            |m| heard.borrow_mut().push(m.to_string()),
            |_| {},
        );
        assert_eq!(
            r,
            Ok("new release r2: 0 of 300 requests failed (0.0%), p99 <= 1 ms; old release r1: 0 of 500 requests failed (0.0%), p99 <= 1 ms; within max_error_rate 0.01".into())
        );
        // A window over at once: the one judgement is the verdict.
        assert!(heard.borrow().is_empty());
        let r = bake(Duration::from_millis(30)).run(
            &before,
            || {
                Ok(report(vec![
                    t(2, "current", 300, 0),
                    t(1, "previous", 500, 0),
                ]))
            },
            || true,
            |m| heard.borrow_mut().push(m.to_string()),
            std::thread::sleep,
        );
        assert!(r.is_ok(), "{r:?}");
        assert!(
            heard.borrow()[0].starts_with("new release r2: 0 of 300 requests failed"),
            "{:?}",
            heard.borrow()
        );
    }

    #[test]
    fn no_traffic_is_judged_by_probes_and_no_data_is_no_pass() {
        let before = report(vec![t(2, "current", 0, 0), t(1, "previous", 500, 0)]);
        let quiet = || {
            Ok(report(vec![
                t(2, "current", 0, 0),
                t(1, "previous", 500, 0),
            ]))
        };
        let ok = bake(Duration::ZERO).run(&before, quiet, || true, |_| {}, |_| {});
        assert_eq!(
            ok,
            Ok("new release r2: 0 of 0 requests failed (0.0%), no p99; old release r1: 0 of 500 requests failed (0.0%), p99 <= 1 ms; under 20 requests: judged by probes, 0 of 1 probes of /up failed in 0s (max_error_rate 0.01)".into())
        );
        let bad = bake(Duration::ZERO).run(&before, quiet, || false, |_| {}, |_| {});
        assert_eq!(
            bad,
            Err("new release r2: 0 of 0 requests failed (0.0%), no p99; old release r1: 0 of 500 requests failed (0.0%), p99 <= 1 ms; under 20 requests; 1 of 1 probes of /up failed in 0s (max_error_rate 0.01)".into())
        );
    }

    #[test]
    fn counts_it_cannot_read_fail_the_bake() {
        let before = report(vec![t(2, "current", 0, 0), t(1, "previous", 500, 0)]);
        let lost = bake(Duration::from_secs(60)).run(
            &before,
            || Err("ssh: connection refused".into()),
            || true,
            |_| {},
            |_| {},
        );
        assert_eq!(
            lost,
            Err("the controller judged the bake and lost the proxy's counts: ssh: connection refused".into())
        );
        // The service routes elsewhere now (someone deployed over it): not a pass either.
        let gone = bake(Duration::from_secs(60)).run(
            &before,
            || Ok(report(vec![])),
            || true,
            |_| {},
            |_| {},
        );
        assert_eq!(
            gone,
            Err("the proxy no longer routes to the release under watch".into())
        );
    }
}

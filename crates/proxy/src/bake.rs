//! The bake, run by the proxy itself: after a controller switched a service to a new target
//! (or gave it a canary), a `bake` request hands the proxy the window and the limits; the
//! proxy watches its own per-target counts, probes the health path when real traffic is too
//! thin, and at a failed verdict swaps back to the fallback on its own. So a bake finishes
//! even if the controller is gone (kill -9, lost SSH); the controller only polls the verdict
//! (`stats`), and the next run reads what the proxy did (`stats`, `status`, the state file).
//!
//! It owns the bake's clock and its actions; the judging is `cutover_proxy_wire::judge` (the
//! one judge, also used by anyone reading a `stats` report), the counting is `stats`'.
//!
//! Invariants:
//! - One bake per service: a new bake replaces the old one's record; a control deploy,
//!   canary or remove of the service supersedes a running bake, which then does nothing more.
//! - The judgement is made every `interval`: a failure is acted on at the first judgement
//!   that sees at least `min_requests` requests crossing a limit (or, with thin traffic, at
//!   the end of the window from the probes); a pass only at the end of the window.
//! - Reverting is a pointer swap to a target that is still running (a deploy with a gate of
//!   one probe): no container is started by the proxy.
//! - Every verdict is persisted with the table before it is reported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::switch::{check_health_path, probe, Shared};
use crate::table::{check_name, parse_target};
use crate::{log, Error};
use cutover_proxy_wire::{
    bake_window, judge, judge_probes, BakeRequest, BakeState, BakeStatus, DeployOptions, Judged,
    StatsReport,
};

/// Each service's bake and the epoch that tells a running bake it was superseded.
pub(crate) struct Bakes {
    inner: Mutex<HashMap<String, (BakeStatus, u64)>>,
    epoch: std::sync::atomic::AtomicU64,
}

impl Bakes {
    pub(crate) fn new(restored: Vec<BakeStatus>) -> Bakes {
        Bakes {
            inner: Mutex::new(
                restored
                    .into_iter()
                    .map(|b| (b.service.clone(), (b, 0)))
                    .collect(),
            ),
            epoch: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (BakeStatus, u64)>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The service's bake, live or last.
    pub(crate) fn get(&self, service: &str) -> Option<BakeStatus> {
        self.lock().get(service).map(|(b, _)| b.clone())
    }

    /// Every service's bake, for the state file.
    pub(crate) fn all(&self) -> Vec<BakeStatus> {
        let mut v: Vec<BakeStatus> = self.lock().values().map(|(b, _)| b.clone()).collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }

    fn begin(&self, status: BakeStatus) -> u64 {
        let epoch = self
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(status.service.clone(), (status, epoch));
        epoch
    }

    /// Applies `f` to the bake of `service` if it is still the one of `epoch` and baking;
    /// false when it was superseded.
    fn update(&self, service: &str, epoch: u64, f: impl FnOnce(&mut BakeStatus)) -> bool {
        match self.lock().get_mut(service) {
            Some((b, e)) if *e == epoch && b.state == BakeState::Baking => {
                f(b);
                true
            }
            _ => false,
        }
    }

    /// A control deploy, canary or remove of `service`: a running bake stops acting.
    pub(crate) fn supersede(&self, service: &str) -> bool {
        match self.lock().get_mut(service) {
            Some((b, _)) if b.state == BakeState::Baking => {
                b.state = BakeState::Superseded;
                b.finished_at_ms = Some(log::unix_ms(SystemTime::now()));
                b.verdict = "a later deploy of the service ended the bake".into();
                true
            }
            _ => false,
        }
    }
}

/// Starts a bake of `req.target` (the service's current target or its canary); answers at
/// once with its status.
pub(crate) async fn start(shared: &Arc<Shared>, req: BakeRequest) -> Result<BakeStatus, Error> {
    check_name(&req.service)?;
    let target = parse_target(&req.target)?;
    let fallback = req.fallback.as_deref().map(parse_target).transpose()?;
    let path = check_health_path(&req.health_path)?;
    if req.window.is_zero() || req.interval.is_zero() {
        return Err(Error::Invalid(
            "a bake needs a window and an interval above 0".into(),
        ));
    }
    let svc = shared
        .table
        .get(&req.service)
        .ok_or_else(|| Error::UnknownService(req.service.clone()))?;
    let canary = match svc.canary() {
        Some((c, _)) if c.addr == target => true,
        _ if svc.current().addr == target => false,
        _ => {
            return Err(Error::Invalid(format!(
                "bake target {target} is neither the current target nor the canary of {}",
                req.service
            )))
        }
    };
    let before = crate::canary::stats(shared, &req.service)?;
    let now = log::unix_ms(SystemTime::now());
    let status = BakeStatus {
        service: req.service.clone(),
        target: target.clone(),
        fallback: fallback.clone(),
        release: req.release.clone(),
        old_release: req.old_release.clone(),
        state: BakeState::Baking,
        canary,
        started_at_ms: now,
        ends_at_ms: now + req.window.as_millis() as u64,
        finished_at_ms: None,
        new: None,
        old: None,
        probes: 0,
        probes_failed: 0,
        verdict: String::new(),
        action: String::new(),
    };
    let epoch = shared.bakes.begin(status.clone());
    shared.persist_logged().await;
    log::line(format_args!(
        "bake {} of {target}{}: {} ms, max_error_rate {}{}",
        req.service,
        if canary { " (canary)" } else { "" },
        req.window.as_millis(),
        req.limits.max_error_rate(),
        req.limits
            .max_p99_ms
            .map(|p| format!(", max_p99 {p} ms"))
            .unwrap_or_default()
    ));
    let task = Watch {
        shared: shared.clone(),
        req,
        target,
        fallback,
        path,
        canary,
        before,
        epoch,
    };
    tokio::spawn(task.run());
    Ok(status)
}

struct Watch {
    shared: Arc<Shared>,
    req: BakeRequest,
    target: String,
    fallback: Option<String>,
    path: hyper::http::uri::PathAndQuery,
    canary: bool,
    before: StatsReport,
    epoch: u64,
}

impl Watch {
    async fn run(self) {
        let started = Instant::now();
        let deadline = started + self.req.window;
        let limits = &self.req.limits;
        let host = self
            .shared
            .table
            .domains_of(&self.req.service)
            .into_iter()
            .next();
        let (mut probes, mut failed) = (0u32, 0u32);
        loop {
            let tick = Instant::now();
            let Ok(after) = crate::canary::stats(&self.shared, &self.req.service) else {
                return; // the service was removed
            };
            let Some((new, old)) = bake_window(&self.before, &after, self.canary) else {
                return; // the canary is gone: superseded
            };
            if new.target != self.target {
                return;
            }
            // Too little real traffic so far: the proxy's own probe adds data.
            if new.requests < limits.min_requests {
                probes += 1;
                let p = probe(
                    &self.shared.client,
                    &self.target,
                    host.as_deref(),
                    &self.path,
                );
                if !matches!(tokio::time::timeout(self.req.timeout, p).await, Ok(Ok(()))) {
                    failed += 1;
                }
            }
            let live = self
                .shared
                .bakes
                .update(&self.req.service, self.epoch, |b| {
                    b.new = Some(new.clone());
                    b.old = old.clone();
                    b.probes = probes;
                    b.probes_failed = failed;
                });
            if !live {
                return;
            }
            let judged = judge(
                &new,
                old.as_ref(),
                &self.req.release,
                self.req.old_release.as_deref(),
                limits,
            );
            if let Judged::Failed(why) = judged {
                return self.fail(why).await;
            }
            if Instant::now() >= deadline {
                let verdict = match judged {
                    Judged::TooFew(m) => {
                        let path = self.path.as_str();
                        match judge_probes(probes, failed, path, self.req.window, limits) {
                            Judged::Failed(p) => return self.fail(format!("{m}; {p}")).await,
                            Judged::Passed(p) | Judged::TooFew(p) => {
                                format!("{m}: judged by probes, {p}")
                            }
                        }
                    }
                    Judged::Passed(m) | Judged::Failed(m) => m,
                };
                return self.pass(verdict).await;
            }
            let next = (tick + self.req.interval).min(deadline);
            tokio::time::sleep_until(next.into()).await;
        }
    }

    fn options(&self) -> DeployOptions {
        DeployOptions {
            health_interval: self.req.interval,
            healthy_after: 1,
            give_up_after: self.req.timeout * 3,
            timeout: self.req.timeout,
            drain: Duration::from_secs(10),
        }
    }

    /// Swaps back to the fallback (ending a canary is a deploy of the current target).
    async fn fail(self, why: String) {
        let swap_to = if self.canary {
            self.before
                .role("current")
                .map(|c| c.target.clone())
                .or(self.fallback.clone())
        } else {
            self.fallback.clone()
        };
        // Superseded while judging: someone else decides now.
        if !self
            .shared
            .bakes
            .update(&self.req.service, self.epoch, |_| {})
        {
            return;
        }
        let action = match &swap_to {
            Some(to) => match crate::switch::deploy(
                &self.shared,
                &self.req.service,
                to,
                &self.req.health_path,
                &[],
                &self.options(),
            )
            .await
            {
                Ok(d) => format!(
                    "the proxy swapped back to {to} (gate {} ms, drained {} in {} ms)",
                    d.health_ms, d.drained, d.drain_ms
                ),
                Err(e) => format!("swapping back to {to} failed: {e}"),
            },
            None => "nothing to swap back to".to_string(),
        };
        self.finish(BakeState::Failed, why, action).await;
    }

    /// Promotes a canary to every request.
    async fn pass(self, verdict: String) {
        if !self
            .shared
            .bakes
            .update(&self.req.service, self.epoch, |_| {})
        {
            return;
        }
        let action = if self.canary {
            match crate::switch::deploy(
                &self.shared,
                &self.req.service,
                &self.target,
                &self.req.health_path,
                &[],
                &self.options(),
            )
            .await
            {
                Ok(_) => "canary promoted to every request".to_string(),
                Err(e) => {
                    let why = format!("{verdict}; promoting the canary failed: {e}");
                    return self.finish(BakeState::Failed, why, String::new()).await;
                }
            }
        } else {
            String::new()
        };
        self.finish(BakeState::Passed, verdict, action).await;
    }

    async fn finish(self, state: BakeState, verdict: String, action: String) {
        // A deploy made by this bake (swap back, promotion) does not supersede it: only
        // control requests do. So the record is still this bake's.
        self.shared
            .bakes
            .update(&self.req.service, self.epoch, |b| {
                b.state = state;
                b.finished_at_ms = Some(log::unix_ms(SystemTime::now()));
                b.verdict = verdict.clone();
                b.action = action.clone();
            });
        log::line(format_args!(
            "bake {} of {}: {}: {verdict}{}",
            self.req.service,
            self.target,
            state.as_str(),
            if action.is_empty() {
                String::new()
            } else {
                format!("; {action}")
            }
        ));
        self.shared.persist_logged().await;
    }
}

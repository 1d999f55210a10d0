//! The wire types of cutover's edge-proxy control protocol: one JSON [`Request`] per line in,
//! one JSON [`Response`] per line out. The proxy (`cutover-proxy`) serves them on its control
//! socket; the controller (the engine, over SSH) sends them. This crate is only the types and
//! their serde format, so that the controller side needs no HTTP or async runtime.
//!
//! Wire examples:
//! ```text
//! {"op":"deploy","service":"api","target":"127.0.0.1:41002","health_path":"/up","drain_ms":30000}
//! {"result":"deployed","service":"api","target":"127.0.0.1:41002","previous":"127.0.0.1:41001",...}
//! {"op":"pause","service":"api","hold_ms":30000}     {"result":"paused","service":"api","drained":true,...}
//! {"op":"resume","service":"api"}                    {"result":"resumed","service":"api","released":3}
//! {"op":"status"}                                    {"result":"status","pid":..,"services":[..]}
//! {"op":"remove","service":"api"}                    {"result":"removed","service":"api"}
//! {"op":"canary","service":"api","target":"127.0.0.1:41003","health_path":"/up","percent":10}
//!                                                    {"result":"canary","service":"api","percent":10,...}
//! {"op":"stats","service":"api"}                     {"result":"stats","service":"api","targets":[..],"bake":{..}}
//! {"op":"bake","service":"api","target":"127.0.0.1:41002","fallback":"127.0.0.1:41001",
//!  "health_path":"/up","window_ms":120000,"max_error_ppm":10000}
//!                                                    {"result":"baking","service":"api","state":"baking",...}
//! anything that fails                                {"result":"error","error":"no such service: api"}
//! ```
//!
//! **Invariant:** the format is shared by proxies already running on hosts and newer
//! controllers: fields are only ever added with defaults, never renamed or re-typed, and
//! durations are whole milliseconds in `*_ms` fields.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Gate a new target, switch to it, drain the old one.
    Deploy(DeployRequest),
    /// Hold new requests for a service.
    Pause {
        /// The service.
        service: String,
        /// How long each request may be held before it gets a 503 (default: the proxy's
        /// configured hold).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_ms: Option<u64>,
        /// How long to wait for requests already in flight on the current target before
        /// answering (default 30 s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain_ms: Option<u64>,
    },
    /// Release held requests to the current target.
    Resume {
        /// The service.
        service: String,
    },
    /// Report services, targets and counters.
    Status,
    /// Forget a service.
    Remove {
        /// The service.
        service: String,
    },
    /// Gate a new target, then send `percent` of the service's new requests to it (the rest
    /// stay on the current target) until a deploy: a deploy of the canary's target makes it
    /// current (its counts kept), a deploy of anything else (the current target included)
    /// ends the canary.
    Canary(CanaryRequest),
    /// Cumulative per-target counts of a service (current, canary and the previous target).
    Stats {
        /// The service.
        service: String,
    },
    /// Watch a target that just became current (or a canary) for a window, judge it by the
    /// proxy's own counts (probing the health path when traffic is too thin) and swap back to
    /// the fallback on its own when the limits are crossed; a passed canary is promoted. The
    /// answer comes at once; the verdict is in `stats` (and `status`) and in the state file.
    Bake(BakeRequest),
    /// `tls = "acme"`: order new certificates for these domains now, whatever their renewal
    /// time (a certificate the CA revoked, a key that may have leaked); none: every routed
    /// domain. The answer comes at once; the outcome shows in `status` (a later `not_after_ms`,
    /// or a `failed_at_ms` with its error, retried with backoff as any renewal).
    Renew {
        /// The domains (each must be routed by this proxy).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        domains: Vec<String>,
    },
}

/// The body of a bake request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeRequest {
    /// The service.
    pub service: String,
    /// The target under watch: the service's current target, or its canary.
    pub target: String,
    /// Where to swap back to if the bake fails (the old release, still running); none: the
    /// verdict is only recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Health path probed on the target when real traffic is too thin to judge.
    pub health_path: String,
    /// How long to watch.
    #[serde(rename = "window_ms", with = "millis")]
    pub window: Duration,
    /// The limits.
    #[serde(flatten)]
    pub limits: BakeLimits,
    /// Time between two judgements (and two probes); default 500 ms.
    #[serde(rename = "interval_ms", with = "millis", default = "half_a_second")]
    pub interval: Duration,
    /// One probe's timeout; default 2 s.
    #[serde(rename = "timeout_ms", with = "millis", default = "two_seconds")]
    pub timeout: Duration,
    /// The release under watch and the one before, for the verdict's wording.
    #[serde(default)]
    pub release: String,
    /// See `release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_release: Option<String>,
}

fn half_a_second() -> Duration {
    Duration::from_millis(500)
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

/// What a bake judges by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeLimits {
    /// Largest share of failed requests (5xx or unanswered), in parts per million, that the
    /// new release may have above the old release's own rate.
    pub max_error_ppm: u32,
    /// Optional bound on the new release's p99 latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<u64>,
    /// Fewer requests than this to the new release: the probes judge instead.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

/// Fewer requests than this to the new release in a bake window: the probes judge.
pub const MIN_BAKE_REQUESTS: u64 = 20;

fn default_min_requests() -> u64 {
    MIN_BAKE_REQUESTS
}

impl BakeLimits {
    /// `max_error_ppm` as a share (0.01 = 1%).
    pub fn max_error_rate(&self) -> f64 {
        f64::from(self.max_error_ppm) / 1e6
    }
}

/// Where a bake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BakeState {
    /// Still watching.
    Baking,
    /// The window ended within the limits (a canary was promoted).
    Passed,
    /// The limits were crossed: the proxy swapped back to the fallback.
    Failed,
    /// A later deploy or canary of the service ended the bake before its verdict.
    Superseded,
    /// The proxy restarted during the bake (routing is what its state file says).
    Interrupted,
}

impl BakeState {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            BakeState::Baking => "baking",
            BakeState::Passed => "passed",
            BakeState::Failed => "failed",
            BakeState::Superseded => "superseded",
            BakeState::Interrupted => "interrupted",
        }
    }
}

/// A bake as the proxy knows it: live while baking, then its verdict (kept, and persisted in
/// the state file, until the service's next bake).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeStatus {
    /// The service.
    pub service: String,
    /// The target under watch.
    pub target: String,
    /// Where a failure swaps back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The release under watch (as the controller named it).
    #[serde(default)]
    pub release: String,
    /// The release before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_release: Option<String>,
    /// Where the bake is.
    pub state: BakeState,
    /// The target was a canary.
    #[serde(default)]
    pub canary: bool,
    /// When it began, Unix milliseconds.
    pub started_at_ms: u64,
    /// When the window ends, Unix milliseconds.
    pub ends_at_ms: u64,
    /// When the verdict was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// The new release's counts over the window so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<TargetStats>,
    /// The old release's counts it is compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<TargetStats>,
    /// Health probes the proxy sent to the target during the bake.
    #[serde(default)]
    pub probes: u32,
    /// Of those, the ones that failed.
    #[serde(default)]
    pub probes_failed: u32,
    /// The verdict with its numbers (empty while baking).
    #[serde(default)]
    pub verdict: String,
    /// What the proxy did after the verdict: swapped back, promoted the canary.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
}

impl BakeStatus {
    /// One line for humans: state, counts so far and the verdict.
    pub fn summary(&self) -> String {
        let mut m = format!("bake {} of {}", self.state.as_str(), self.target);
        // While baking, both releases' counts so far; after, the verdict says them.
        if let (Some(n), true) = (&self.new, self.verdict.is_empty()) {
            let old_name = self.old_release.as_deref().unwrap_or("(none)");
            let old = match &self.old {
                Some(o) => describe(o),
                None => "no counts".into(),
            };
            m.push_str(&format!(
                ": new release {}: {}; old release {old_name}: {old}",
                self.release,
                describe(n)
            ));
        }
        if self.probes > 0 {
            m.push_str(&format!(
                "; {} of {} probes failed",
                self.probes_failed, self.probes
            ));
        }
        if !self.verdict.is_empty() {
            m.push_str(&format!("; {}", self.verdict));
        }
        if !self.action.is_empty() {
            m.push_str(&format!("; {}", self.action));
        }
        m
    }
}

/// What a bake's counts say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// Within the limits (the message gives both releases' numbers).
    Passed(String),
    /// A limit was crossed.
    Failed(String),
    /// Too little traffic to judge (the message says how much).
    TooFew(String),
}

/// "12 of 240 requests failed (5.0%), p99 <= 20 ms"
pub fn describe(t: &TargetStats) -> String {
    let bad = t.errors_5xx + t.failures;
    let rate = t.error_rate().unwrap_or(0.0) * 100.0;
    let p99 = match t.p99_ms() {
        None => "no p99".to_string(),
        Some(u64::MAX) => format!(
            "p99 > {} ms",
            LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]
        ),
        Some(ms) => format!("p99 <= {ms} ms"),
    };
    // The split of the failures is said only when there are some.
    let split = if bad > 0 {
        format!(": {} 5xx, {} unanswered", t.errors_5xx, t.failures)
    } else {
        String::new()
    };
    format!(
        "{bad} of {} requests failed ({rate:.1}%{split}), {p99}",
        t.requests
    )
}

/// One release's counts as [`describe`] said them (read back by [`read_bake`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseCounts {
    /// `new` or `old`.
    pub role: String,
    /// The release id (`(none)` when the controller named none).
    pub release: String,
    /// `None`: the report had no counts for it.
    pub requests: Option<u64>,
    /// Answered 5xx.
    pub errors_5xx: u64,
    /// Not answered.
    pub failures: u64,
    /// `5.0%`.
    pub rate: String,
    /// `p99 <= 20 ms`, `no p99`.
    pub p99: String,
}

/// A bake's line (a [`BakeStatus::summary`], a verdict, a `bake` event's detail) read back
/// into its parts: each release's counts, the probes, and the rest of the words (the
/// verdict and what the proxy did), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BakeLine {
    /// The new release's counts, then the old one's, as the line names them.
    pub releases: Vec<ReleaseCounts>,
    /// Probes failed, probes sent (when the line counts them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<(u32, u32)>,
    /// The other parts of the line (verdict, action), `; `-joined.
    pub rest: String,
}

/// Reads a bake line back (the inverse of [`describe`], [`judge`]'s verdicts and
/// [`BakeStatus::summary`]): a part it does not know is kept in `rest`, never dropped.
pub fn read_bake(line: &str) -> BakeLine {
    let mut out = BakeLine::default();
    let mut rest = Vec::new();
    for part in line.split("; ") {
        // A summary's head, `bake baking of 127.0.0.1:41002: new release ...`.
        let part = match part
            .strip_prefix("bake ")
            .and_then(|p| p.split_once(" of "))
        {
            Some((_, t)) => match t.split_once(": ") {
                Some((_, counts)) => counts,
                None => continue,
            },
            None => part,
        };
        if let Some(c) = read_release(part) {
            out.releases.push(c);
        } else if let Some(p) = read_probes(part) {
            out.probes = Some(p);
        } else {
            rest.push(part);
        }
    }
    out.rest = rest.join("; ");
    out
}

/// `new release R: 12 of 240 requests failed (5.0%: 10 5xx, 2 unanswered), p99 <= 20 ms`
fn read_release(part: &str) -> Option<ReleaseCounts> {
    let (role, tail) = part
        .strip_prefix("new release ")
        .map(|t| ("new", t))
        .or_else(|| part.strip_prefix("old release ").map(|t| ("old", t)))?;
    let (release, counts) = tail.split_once(": ")?;
    let mut c = ReleaseCounts {
        role: role.into(),
        release: release.into(),
        requests: None,
        errors_5xx: 0,
        failures: 0,
        rate: String::new(),
        p99: String::new(),
    };
    if counts == "no counts" {
        return Some(c);
    }
    let (bad, tail) = counts.split_once(" of ")?;
    let (requests, tail) = tail.split_once(" requests failed (")?;
    let (inner, p99) = tail.split_once("), ")?;
    let (rate, split) = inner.split_once(": ").unwrap_or((inner, ""));
    c.requests = Some(requests.parse().ok()?);
    let bad: u64 = bad.parse().ok()?;
    match split.split_once(" 5xx, ") {
        Some((e, f)) => {
            c.errors_5xx = e.parse().ok()?;
            c.failures = f.strip_suffix(" unanswered")?.parse().ok()?;
        }
        None if bad == 0 => {}
        None => return None,
    }
    c.rate = rate.into();
    c.p99 = p99.into();
    Some(c)
}

/// `2 of 16 probes failed`
fn read_probes(part: &str) -> Option<(u32, u32)> {
    let (failed, tail) = part.split_once(" of ")?;
    let probes = tail.strip_suffix(" probes failed")?;
    Some((failed.parse().ok()?, probes.parse().ok()?))
}

/// "250ms", "2s": how the config spells a duration.
fn spell_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The window of a bake from two stats reports of one proxy: the new release's counts and
/// the old one's. With a canary the new release is the canary and the old one the current
/// target, over the same window; without, the new release is the current target over the
/// window and the old one the previous target over its whole stint before the switch.
/// `None` when the report has no target in the new release's role.
pub fn bake_window(
    before: &StatsReport,
    after: &StatsReport,
    canary: bool,
) -> Option<(TargetStats, Option<TargetStats>)> {
    let (new_role, old_role) = if canary {
        ("canary", "current")
    } else {
        ("current", "previous")
    };
    let new = after.role(new_role)?.since(before.role(new_role));
    let old = after.role(old_role).map(|o| {
        if canary {
            o.since(before.role(old_role))
        } else {
            o.clone()
        }
    });
    Some((new, old))
}

/// The one judge of a bake window (`new`, `old` from [`bake_window`]): the new release fails
/// when its error rate is above `max_error_rate` (by more than chance, see
/// [`significantly_above`]) and above the old release's, or its p99 is
/// above `max_p99`; with fewer than `min_requests` requests it is left to the probes.
pub fn judge(
    new: &TargetStats,
    old: Option<&TargetStats>,
    release: &str,
    old_release: Option<&str>,
    limits: &BakeLimits,
) -> Judged {
    let max_error_rate = limits.max_error_rate();
    let old_name = old_release.unwrap_or("(none)");
    let new_text = format!("new release {release}: {}", describe(new));
    let old_text = match old {
        Some(o) => format!("old release {old_name}: {}", describe(o)),
        None => format!("old release {old_name}: no counts"),
    };
    if new.requests < limits.min_requests {
        return Judged::TooFew(format!(
            "{new_text}; {old_text}; under {} requests",
            limits.min_requests
        ));
    }
    let new_rate = new.error_rate().unwrap_or(0.0);
    let old_rate = old.and_then(|o| o.error_rate()).unwrap_or(0.0);
    if significantly_above(new, max_error_rate) && new_rate > old_rate {
        return Judged::Failed(format!(
            "{new_text}; {old_text}; above max_error_rate {max_error_rate} and the old release's rate"
        ));
    }
    if let (Some(limit), Some(p99)) = (limits.max_p99_ms, new.p99_ms()) {
        if p99 > limit {
            return Judged::Failed(format!(
                "{new_text}; {old_text}; p99 above max_p99 {}",
                spell_ms(limit)
            ));
        }
    }
    Judged::Passed(format!(
        "{new_text}; {old_text}; within max_error_rate {max_error_rate}"
    ))
}

/// Whether `t`'s failed requests are above `rate` by more than chance explains: more than
/// three standard deviations of a binomial count at `rate` over its requests. (One 500 in the
/// first 57 requests of a release that fails 0.2% of the time is 1.8%, above a 1% limit, but
/// is no evidence; a release failing 20% is caught from its first 20 requests.)
pub fn significantly_above(t: &TargetStats, rate: f64) -> bool {
    let n = t.requests as f64;
    let bad = (t.errors_5xx + t.failures) as f64;
    let allowed = rate * n + 3.0 * (n * rate * (1.0 - rate)).sqrt();
    bad > allowed
}

/// The judge of a bake with too little traffic: its health probes, failing when more than
/// `max_error_rate` of them failed, or when there were none (never passed on no data).
pub fn judge_probes(
    probes: u32,
    failed: u32,
    path: &str,
    window: Duration,
    limits: &BakeLimits,
) -> Judged {
    let max_error_rate = limits.max_error_rate();
    let m = format!(
        "{failed} of {probes} probes of {path} failed in {} (max_error_rate {max_error_rate})",
        spell_ms(window.as_millis().min(u128::from(u64::MAX)) as u64)
    );
    if probes == 0 {
        return Judged::Failed(format!("{m}: no data to judge"));
    }
    if f64::from(failed) / f64::from(probes) > max_error_rate {
        Judged::Failed(m)
    } else {
        Judged::Passed(m)
    }
}

/// The body of a canary request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRequest {
    /// Share of new requests for the canary, 1..=99.
    pub percent: u8,
    /// Service, target, health path and gate options, as for a deploy.
    #[serde(flatten)]
    pub deploy: DeployRequest,
}

/// Upper bounds, in milliseconds, of the latency buckets of [`TargetStats::latency`] (one more
/// bucket counts everything slower). Fixed: reports of different proxies can be compared.
pub const LATENCY_BOUNDS_MS: [u64; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000,
];

/// The body of a deploy request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The service (created if new).
    pub service: String,
    /// The new target, `host:port`.
    pub target: String,
    /// Health path on the target, e.g. `/up`.
    pub health_path: String,
    /// `Host` names routed to this service; empty keeps the service's current domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// Gate and drain options.
    #[serde(flatten)]
    pub options: DeployOptions,
}

/// How a deploy gates and drains. Serialized with durations in milliseconds
/// (`health_interval_ms`, `give_up_after_ms`, `timeout_ms`, `drain_ms`); every field is
/// optional in JSON and defaults to the `[health]`/`[proxy]` defaults of the config contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeployOptions {
    /// Time between two probes (default 500 ms).
    #[serde(rename = "health_interval_ms", with = "millis")]
    pub health_interval: Duration,
    /// Consecutive 2xx probes needed (default 2; 0 counts as 1).
    pub healthy_after: u32,
    /// The gate fails if it has not passed after this long (default 30 s).
    #[serde(rename = "give_up_after_ms", with = "millis")]
    pub give_up_after: Duration,
    /// One probe's timeout (default 2 s).
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// How long the old target's in-flight requests get after the swap (default 30 s).
    #[serde(rename = "drain_ms", with = "millis")]
    pub drain: Duration,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            health_interval: Duration::from_millis(500),
            healthy_after: 2,
            give_up_after: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
            drain: Duration::from_secs(30),
        }
    }
}

/// A [`Duration`] as a JSON integer of milliseconds (saturating on the way out).
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// A deploy passed its gate and switched (or found the target already current).
    Deployed(DeployReport),
    /// The service is paused (and its current target drained, if `drained`).
    Paused(PauseReport),
    /// The service was resumed.
    Resumed {
        /// The service.
        service: String,
        /// Requests that were held at that moment.
        released: usize,
    },
    /// The proxy's status.
    Status(StatusReport),
    /// The service was removed.
    Removed {
        /// The service.
        service: String,
    },
    /// A canary passed its gate and now gets its share of new requests.
    Canary(CanaryReport),
    /// Per-target counts of a service.
    Stats(StatsReport),
    /// A bake began.
    Baking(BakeStatus),
    /// New certificates were asked for these domains.
    Renewing {
        /// The domains.
        domains: Vec<String>,
    },
    /// The request failed; nothing was changed unless the message says otherwise.
    Error {
        /// What went wrong.
        error: String,
    },
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    /// The service.
    pub service: String,
    /// Its target now.
    pub target: String,
    /// Its target before, if the pointer was swapped.
    pub previous: Option<String>,
    /// The service did not exist before.
    pub created: bool,
    /// Requests now go somewhere new (false when the target was already current).
    pub switched: bool,
    /// When the pointer was swapped, Unix milliseconds.
    pub switched_at_ms: u64,
    /// How long the health gate took.
    pub health_ms: u64,
    /// Health probes sent.
    pub health_probes: u32,
    /// All of the old target's in-flight requests finished within the drain time.
    pub drained: bool,
    /// Time from the swap to the end of the drain.
    pub drain_ms: u64,
    /// The old target's requests still in flight when the drain ended.
    pub in_flight_left: usize,
    /// Set if the switch happened but the state file could not be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

/// What a canary request did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryReport {
    /// The service.
    pub service: String,
    /// The canary target.
    pub target: String,
    /// The current target, which keeps the rest of the requests.
    pub current: String,
    /// The canary's share of new requests.
    pub percent: u8,
    /// How long the health gate took.
    pub health_ms: u64,
    /// Health probes sent.
    pub health_probes: u32,
}

/// A service's per-target counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The service.
    pub service: String,
    /// Its current target, its canary (if any) and the target before the current one (if
    /// any), each counted since it was installed.
    pub targets: Vec<TargetStats>,
    /// The service's bake: live while baking, else the last verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeStatus>,
}

impl StatsReport {
    /// The counts of the target with this role (`current`, `canary`, `previous`).
    pub fn role(&self, role: &str) -> Option<&TargetStats> {
        self.targets.iter().find(|t| t.role == role)
    }

    /// The counts of the newest stint of `target` (by address).
    pub fn target(&self, target: &str) -> Option<&TargetStats> {
        self.targets
            .iter()
            .filter(|t| t.target == target)
            .max_by_key(|t| t.id)
    }
}

/// One target's cumulative counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStats {
    /// Tells stints apart: an address installed again gets a new id and counts from zero.
    pub id: u64,
    /// The target, `host:port`.
    pub target: String,
    /// `current`, `canary` or `previous`.
    pub role: String,
    /// Requests forwarded to it that ended (answered or failed).
    pub requests: u64,
    /// Of those, answered with a 5xx status by the target.
    pub errors_5xx: u64,
    /// Of those, not answered (connect, read or time-out failures; the client got 502/504).
    pub failures: u64,
    /// Requests by time to the response head, one count per [`LATENCY_BOUNDS_MS`] bucket and
    /// a last one for slower.
    pub latency: Vec<u64>,
}

impl TargetStats {
    /// The counts since `earlier` (a report of the same stint; else all of these counts).
    pub fn since(&self, earlier: Option<&TargetStats>) -> TargetStats {
        let Some(e) = earlier.filter(|e| e.id == self.id) else {
            return self.clone();
        };
        TargetStats {
            id: self.id,
            target: self.target.clone(),
            role: self.role.clone(),
            requests: self.requests.saturating_sub(e.requests),
            errors_5xx: self.errors_5xx.saturating_sub(e.errors_5xx),
            failures: self.failures.saturating_sub(e.failures),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(e.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Failed or 5xx requests over all requests; `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| (self.errors_5xx + self.failures) as f64 / self.requests as f64)
    }

    /// The upper bound of the bucket holding the 99th percentile, in ms (`u64::MAX` when it
    /// is slower than the last bound); `None` without requests.
    pub fn p99_ms(&self) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// What a pause did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    /// The service.
    pub service: String,
    /// How long each new request will be held at most.
    pub hold_ms: u64,
    /// No request was in flight on the current target when the pause answered.
    pub drained: bool,
    /// Time the pause waited for in-flight requests.
    pub drain_ms: u64,
    /// Requests still in flight on the current target when the pause answered.
    pub in_flight_left: usize,
}

/// The proxy's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The proxy's process id.
    pub pid: u32,
    /// The proxy's version.
    pub version: String,
    /// The configured listen address.
    pub listen: String,
    /// Time since the proxy started.
    pub uptime_ms: u64,
    /// Requests received since start (all services, 404s included).
    pub requests: u64,
    /// Services by name.
    pub services: Vec<ServiceStatus>,
    /// Where TLS is served (`[proxy] listen_tls`), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_tls: Option<String>,
    /// The certificates served over TLS, by domain (`tls = "files"`: one, for every name).
    /// Absent from an older proxy's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateStatus>,
}

/// One certificate in a [`StatusReport`]: what is served for a domain, and how its last
/// issuance or reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// The domain (`*` for a `tls = "files"` certificate, served for every name).
    pub domain: String,
    /// `acme` or `files`.
    pub source: String,
    /// When the served certificate expires (ms since the Unix epoch); `None` while none has
    /// been obtained yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    /// When it will be renewed (ms since the Unix epoch), for ACME certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at_ms: Option<u64>,
    /// Why the last issuance, renewal or reload failed (cleared by the next success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When that failure happened (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<u64>,
    /// When the next attempt is due after a failure (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<u64>,
}

/// One service in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service.
    pub name: String,
    /// `Host` names routed to it.
    pub domains: Vec<String>,
    /// Its current target.
    pub target: String,
    /// New requests are being held.
    pub paused: bool,
    /// Requests held right now.
    pub held: usize,
    /// Requests in flight on any of its targets (old ones still draining included).
    pub in_flight: usize,
    /// Requests routed to it since the proxy started.
    pub requests: u64,
    /// Requests the current target answered since it became current.
    pub target_served: u64,
    /// Its bake: live while baking, else the last verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let req: Request = serde_json::from_str(
            r#"{"op":"deploy","service":"api","target":"127.0.0.1:9","health_path":"/up","drain_ms":100,"healthy_after":3}"#,
        )
        .unwrap();
        let Request::Deploy(d) = &req else {
            panic!("{req:?}")
        };
        assert_eq!(d.options.drain, Duration::from_millis(100));
        assert_eq!(d.options.healthy_after, 3);
        assert_eq!(d.options.timeout, Duration::from_secs(2));
        assert!(d.domains.is_empty());
        let back: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"pause","service":"a"}"#).unwrap(),
            Request::Pause {
                service: "a".into(),
                hold_ms: None,
                drain_ms: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        let canary: Request = serde_json::from_str(
            r#"{"op":"canary","service":"api","target":"127.0.0.1:9","health_path":"/up","percent":10}"#,
        )
        .unwrap();
        let Request::Canary(c) = &canary else {
            panic!("{canary:?}")
        };
        assert_eq!((c.percent, c.deploy.target.as_str()), (10, "127.0.0.1:9"));
        assert_eq!(c.deploy.options, DeployOptions::default());
        let back: Request = serde_json::from_str(&serde_json::to_string(&canary).unwrap()).unwrap();
        assert_eq!(back, canary);
        assert_eq!(
            serde_json::to_string(&Request::Stats {
                service: "api".into()
            })
            .unwrap(),
            r#"{"op":"stats","service":"api"}"#
        );
    }

    /// The exact bytes a controller sends today: a proxy already installed on a host parses
    /// exactly these, so they must not change.
    #[test]
    fn a_deploy_request_serializes_exactly_as_before() {
        let req = Request::Deploy(DeployRequest {
            service: "api".into(),
            target: "127.0.0.1:41002".into(),
            health_path: "/up".into(),
            domains: vec!["api.example.com".into()],
            options: DeployOptions {
                health_interval: Duration::from_millis(250),
                healthy_after: 3,
                give_up_after: Duration::from_secs(20),
                timeout: Duration::from_micros(1_500_900),
                drain: Duration::from_secs(5),
            },
        });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"op":"deploy","service":"api","target":"127.0.0.1:41002","health_path":"/up","domains":["api.example.com"],"health_interval_ms":250,"healthy_after":3,"give_up_after_ms":20000,"timeout_ms":1500,"drain_ms":5000}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Pause {
                service: "api".into(),
                hold_ms: Some(30_000),
                drain_ms: None
            })
            .unwrap(),
            r#"{"op":"pause","service":"api","hold_ms":30000}"#
        );
    }

    #[test]
    fn deploy_options_json_uses_milliseconds_and_defaults() {
        let o: DeployOptions = serde_json::from_str(r#"{"drain_ms": 1500}"#).unwrap();
        assert_eq!(o.drain, Duration::from_millis(1500));
        assert_eq!(o.healthy_after, 2);
        assert_eq!(o.health_interval, Duration::from_millis(500));
        let v = serde_json::to_value(DeployOptions::default()).unwrap();
        assert_eq!(v["give_up_after_ms"], 30_000);
        assert_eq!(v["timeout_ms"], 2_000);
        assert_eq!(v["health_interval_ms"], 500);
        assert_eq!(v["drain_ms"], 30_000);
        assert_eq!(v["healthy_after"], 2);
        assert!(serde_json::from_str::<DeployOptions>(r#"{"drain_ms": "30s"}"#).is_err());
    }

    #[test]
    fn responses_have_the_documented_shape() {
        assert_eq!(
            serde_json::from_str::<Response>(r#"{"result":"error","error":"no such service: x"}"#)
                .unwrap(),
            Response::Error {
                error: "no such service: x".into()
            }
        );
        assert_eq!(
            serde_json::from_str::<Response>(r#"{"result":"resumed","service":"a","released":2}"#)
                .unwrap(),
            Response::Resumed {
                service: "a".into(),
                released: 2
            }
        );
        let deployed = Response::Deployed(DeployReport {
            service: "api".into(),
            target: "127.0.0.1:2".into(),
            previous: Some("127.0.0.1:1".into()),
            created: false,
            switched: true,
            switched_at_ms: 1,
            health_ms: 2,
            health_probes: 3,
            drained: true,
            drain_ms: 4,
            in_flight_left: 0,
            state_error: None,
        });
        let text = serde_json::to_string(&deployed).unwrap();
        assert!(
            text.starts_with(r#"{"result":"deployed","service":"api""#),
            "{text}"
        );
        assert!(!text.contains("state_error"), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), deployed);
        let status = Response::Status(StatusReport {
            pid: 7,
            version: "0.1.0".into(),
            listen: "0.0.0.0:80".into(),
            uptime_ms: 5,
            requests: 9,
            services: vec![ServiceStatus {
                name: "api".into(),
                domains: vec![],
                target: "127.0.0.1:2".into(),
                paused: false,
                held: 0,
                in_flight: 1,
                requests: 9,
                target_served: 8,
                bake: None,
            }],
            listen_tls: None,
            certificates: vec![],
        });
        let text = serde_json::to_string(&status).unwrap();
        assert!(text.starts_with(r#"{"result":"status","pid":7"#), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), status);
        assert!(!text.contains("certificates"), "{text}");
        // With TLS: the certificates and their failures travel to `cutover status`.
        let Response::Status(mut with_tls) = status else {
            unreachable!()
        };
        with_tls.listen_tls = Some("0.0.0.0:443".into());
        with_tls.certificates = vec![CertificateStatus {
            domain: "site.example".into(),
            source: "acme".into(),
            not_after_ms: Some(1_000),
            renew_at_ms: Some(500),
            last_error: Some("order failed".into()),
            failed_at_ms: Some(400),
            next_retry_ms: Some(450),
        }];
        let with_tls = Response::Status(with_tls);
        let text = serde_json::to_string(&with_tls).unwrap();
        assert!(
            text.contains(
                r#""certificates":[{"domain":"site.example","source":"acme","not_after_ms":1000"#
            ),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), with_tls);
    }

    #[test]
    fn stats_diff_into_a_window_with_its_rate_and_p99() {
        let at = |requests, errors_5xx, failures, fast, slow| TargetStats {
            id: 3,
            target: "127.0.0.1:2".into(),
            role: "current".into(),
            requests,
            errors_5xx,
            failures,
            latency: {
                let mut l = vec![0; LATENCY_BOUNDS_MS.len() + 1];
                l[0] = fast;
                l[9] = slow;
                l
            },
        };
        let before = at(1000, 10, 0, 1000, 0);
        let after = at(1200, 50, 2, 1190, 10);
        let w = after.since(Some(&before));
        assert_eq!((w.requests, w.errors_5xx, w.failures), (200, 40, 2));
        assert_eq!(w.error_rate(), Some(0.21));
        // 190 of 200 within 1 ms, 10 within 1000 ms: the 198th is a slow one.
        assert_eq!(w.p99_ms(), Some(1000));
        // Another stint of the same address: the earlier report does not apply.
        let other = TargetStats { id: 4, ..before };
        assert_eq!(after.since(Some(&other)), after);
        assert_eq!(at(0, 0, 0, 0, 0).error_rate(), None);
        assert_eq!(at(0, 0, 0, 0, 0).p99_ms(), None);
        let mut all_slow = at(5, 0, 0, 0, 0);
        all_slow.latency[LATENCY_BOUNDS_MS.len()] = 5;
        assert_eq!(all_slow.p99_ms(), Some(u64::MAX));
    }

    fn t(id: u64, role: &str, requests: u64, errors: u64, slow: u64) -> TargetStats {
        let mut latency = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        latency[0] = requests - slow;
        latency[8] = slow; // <= 500 ms
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

    const LIMITS: BakeLimits = BakeLimits {
        max_error_ppm: 10_000,
        max_p99_ms: None,
        min_requests: MIN_BAKE_REQUESTS,
    };

    fn judged(before: &StatsReport, after: &StatsReport, canary: bool, l: &BakeLimits) -> Judged {
        let (new, old) = bake_window(before, after, canary).unwrap();
        judge(&new, old.as_ref(), "r2", Some("r1"), l)
    }

    #[test]
    fn a_new_release_failing_more_than_allowed_and_than_the_old_one_fails() {
        let before = report(vec![t(2, "current", 0, 0, 0), t(1, "previous", 1000, 2, 0)]);
        let after = report(vec![
            t(2, "current", 200, 40, 0),
            t(1, "previous", 1000, 2, 0),
        ]);
        assert_eq!(
            judged(&before, &after, false, &LIMITS),
            Judged::Failed(
                "new release r2: 40 of 200 requests failed (20.0%: 40 5xx, 0 unanswered), p99 <= 1 ms; old release r1: 2 of 1000 requests failed (0.2%: 2 5xx, 0 unanswered), p99 <= 1 ms; above max_error_rate 0.01 and the old release's rate".into()
            )
        );
        // The old release failed as often: not the new release's fault.
        let bad_old = report(vec![
            t(2, "current", 200, 40, 0),
            t(1, "previous", 1000, 300, 0),
        ]);
        assert!(matches!(
            judged(&before, &bad_old, false, &LIMITS),
            Judged::Passed(_)
        ));
    }

    #[test]
    fn a_canary_is_compared_with_the_old_release_over_the_same_window() {
        let before = report(vec![t(1, "current", 5000, 500, 0), t(2, "canary", 0, 0, 0)]);
        let after = report(vec![
            t(1, "current", 5900, 501, 0),
            t(2, "canary", 100, 10, 0),
        ]);
        // 10% on the canary against 0.1% on the old release in the window (not its 10% before).
        let l = BakeLimits {
            max_error_ppm: 20_000,
            ..LIMITS
        };
        match judged(&before, &after, true, &l) {
            Judged::Failed(m) => assert!(
                m.contains("old release r1: 1 of 900 requests failed (0.1%: 1 5xx, 0 unanswered)"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_rate_above_the_limit_by_chance_alone_is_no_evidence() {
        let n = |requests, errors| t(2, "current", requests, errors, 0);
        // 0.2% noise: one 500 in 57 requests is 1.8% but no evidence against a 1% limit.
        assert!(!significantly_above(&n(57, 1), 0.01));
        assert!(!significantly_above(&n(57, 2), 0.01));
        assert!(significantly_above(&n(57, 4), 0.01));
        // A release failing 20% is caught at the first judgement of 20 requests.
        assert!(significantly_above(&n(20, 4), 0.05));
        assert!(significantly_above(&n(1000, 40), 0.01));
        assert!(!significantly_above(&n(1000, 15), 0.01));
        // No tolerance at all: any failure counts.
        assert!(significantly_above(&n(100, 1), 0.0));
        assert!(!significantly_above(&n(100, 0), 0.0));
    }

    #[test]
    fn little_traffic_is_left_to_the_probes_and_p99_is_bounded() {
        let before = report(vec![t(2, "current", 0, 0, 0)]);
        let few = report(vec![t(2, "current", 19, 19, 0)]);
        assert!(matches!(
            judged(&before, &few, false, &LIMITS),
            Judged::TooFew(m) if m.ends_with("under 20 requests")
        ));
        let slow = report(vec![t(2, "current", 100, 0, 5)]);
        let p99 = |ms| BakeLimits {
            max_p99_ms: Some(ms),
            ..LIMITS
        };
        assert_eq!(
            judged(&before, &slow, false, &p99(200)),
            Judged::Failed(
                "new release r2: 0 of 100 requests failed (0.0%), p99 <= 500 ms; old release r1: no counts; p99 above max_p99 200ms".into()
            )
        );
        assert!(matches!(
            judged(&before, &slow, false, &p99(1000)),
            Judged::Passed(_)
        ));
        // The probes: none is no data, not a pass.
        let w = Duration::from_secs(8);
        assert_eq!(
            judge_probes(0, 0, "/up", w, &LIMITS),
            Judged::Failed(
                "0 of 0 probes of /up failed in 8s (max_error_rate 0.01): no data to judge".into()
            )
        );
        assert!(matches!(
            judge_probes(16, 0, "/up", w, &LIMITS),
            Judged::Passed(_)
        ));
        assert!(matches!(
            judge_probes(16, 1, "/up", w, &LIMITS),
            Judged::Failed(_)
        ));
    }

    #[test]
    fn a_bake_line_reads_back_into_each_release_s_counts() {
        let before = report(vec![t(2, "current", 0, 0, 0), t(1, "previous", 1000, 2, 0)]);
        let mut new = t(2, "current", 200, 38, 3);
        new.failures = 2;
        let after = report(vec![new, t(1, "previous", 1000, 2, 0)]);
        let Judged::Failed(verdict) = judged(&before, &after, false, &LIMITS) else {
            panic!("a failed bake");
        };
        let action = "the proxy swapped back to 127.0.0.1:1 (gate 3 ms, drained true in 0 ms)";
        let line = read_bake(&format!("{verdict}; {action}"));
        let counts = |role: &str, release: &str, n, e, f, rate: &str, p99: &str| ReleaseCounts {
            role: role.into(),
            release: release.into(),
            requests: Some(n),
            errors_5xx: e,
            failures: f,
            rate: rate.into(),
            p99: p99.into(),
        };
        assert_eq!(
            line,
            BakeLine {
                releases: vec![
                    counts("new", "r2", 200, 38, 2, "20.0%", "p99 <= 500 ms"),
                    counts("old", "r1", 1000, 2, 0, "0.2%", "p99 <= 1 ms"),
                ],
                probes: None,
                rest: format!("above max_error_rate 0.01 and the old release's rate; {action}"),
            }
        );
        // A live summary: both releases so far, and the probes.
        let st = BakeStatus {
            service: "web".into(),
            target: "127.0.0.1:2".into(),
            fallback: None,
            release: "r2".into(),
            old_release: None,
            state: BakeState::Baking,
            canary: false,
            started_at_ms: 0,
            ends_at_ms: 1,
            finished_at_ms: None,
            new: Some(t(2, "current", 5, 0, 0)),
            old: None,
            probes: 4,
            probes_failed: 1,
            verdict: String::new(),
            action: String::new(),
        };
        assert_eq!(
            st.summary(),
            "bake baking of 127.0.0.1:2: new release r2: 0 of 5 requests failed (0.0%), p99 <= 1 ms; old release (none): no counts; 1 of 4 probes failed"
        );
        let line = read_bake(&st.summary());
        assert_eq!(
            line.releases[0],
            counts("new", "r2", 5, 0, 0, "0.0%", "p99 <= 1 ms")
        );
        assert_eq!(
            (line.releases[1].release.as_str(), line.releases[1].requests),
            ("(none)", None)
        );
        assert_eq!((line.probes, line.rest.as_str()), (Some((1, 4)), ""));
        // Words it does not know are kept.
        assert_eq!(
            read_bake("0 of 3 probes of /up failed in 1s").rest,
            "0 of 3 probes of /up failed in 1s"
        );
    }

    #[test]
    fn a_bake_request_has_the_documented_shape_and_defaults() {
        let req: Request = serde_json::from_str(
            r#"{"op":"bake","service":"api","target":"127.0.0.1:2","fallback":"127.0.0.1:1","health_path":"/up","window_ms":8000,"max_error_ppm":10000}"#,
        )
        .unwrap();
        let Request::Bake(b) = &req else {
            panic!("{req:?}")
        };
        assert_eq!(b.window, Duration::from_secs(8));
        assert_eq!(b.limits, LIMITS);
        assert_eq!(b.interval, Duration::from_millis(500));
        assert_eq!(b.fallback.as_deref(), Some("127.0.0.1:1"));
        let back: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        let st: BakeStatus = serde_json::from_str(
            r#"{"service":"api","target":"127.0.0.1:2","state":"failed","started_at_ms":1,"ends_at_ms":2}"#,
        )
        .unwrap();
        assert_eq!(st.state, BakeState::Failed);
        assert_eq!(st.summary(), "bake failed of 127.0.0.1:2");
    }
}

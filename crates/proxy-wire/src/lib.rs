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
//! {"op":"stats","service":"api"}                     {"result":"stats","service":"api","targets":[..]}
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
}

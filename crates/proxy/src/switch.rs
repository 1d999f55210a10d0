//! The control operations: deploy (health gate, pointer swap, drain, report), pause, resume,
//! remove and status, plus the proxy-wide shared state they work on. It owns the order of a
//! switch; it must not parse the control protocol (that is `control`) or touch client
//! connections (that is `forward`).
//!
//! Invariants:
//! - A deploy changes nothing until its target has passed `healthy_after` consecutive probes;
//!   a failed gate returns [`Error::Unhealthy`] and the table is as it was.
//! - Deploys and removes of one service run one at a time (a per-service async lock), so a
//!   drain measures the target that this deploy replaced.
//! - Every change to services or targets is persisted before the operation reports success
//!   (a failed write is reported in `state_error`, and logged; the in-memory switch stands).
//! - Pause state is *not* persisted: a restarted proxy never holds requests for a controller
//!   that may be gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Limited};
use hyper::header;
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Uri};

use crate::forward::{chain, empty_body, upstream_client, Upstream};
use crate::table::{check_name, parse_domains, parse_target, Table, Target};
use crate::{log, state, Error, ProxyConfig};
use cutover_proxy_wire::{DeployOptions, DeployReport, PauseReport, ServiceStatus, StatusReport};

/// Largest health response body read (the rest makes the probe fail).
const HEALTH_BODY_LIMIT: usize = 1024 * 1024;
/// How often a drain looks at the old target's in-flight counter.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// Everything the HTTP side and the control side share.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) table: Table,
    pub(crate) client: Upstream,
    /// The access log, if the config names one.
    pub(crate) access: Option<Arc<crate::access::AccessLog>>,
    /// Serializes state-file writes so that the last write is the newest snapshot.
    persist_lock: tokio::sync::Mutex<()>,
    /// One async lock per service name for deploy and remove.
    service_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    started: Instant,
    requests: AtomicU64,
    /// Shutdown has begun: every response is the last of its connection.
    closing: AtomicBool,
    /// The certificates served over TLS and the ACME challenge answers.
    pub(crate) certs: Arc<crate::certs::Certs>,
    /// Each service's bake (live, or its last verdict), persisted with the table.
    pub(crate) bakes: crate::bake::Bakes,
}

impl Shared {
    pub(crate) fn new(
        config: ProxyConfig,
        table: Table,
        bakes: Vec<cutover_proxy_wire::BakeStatus>,
    ) -> Shared {
        let access = config.access_log.as_ref().map(|p| {
            Arc::new(crate::access::AccessLog::new(
                p.clone(),
                config.access_log_max_bytes,
            ))
        });
        Shared {
            config,
            table,
            client: upstream_client(),
            access,
            persist_lock: tokio::sync::Mutex::new(()),
            service_locks: Mutex::new(HashMap::new()),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            certs: Arc::default(),
            bakes: crate::bake::Bakes::new(bakes),
        }
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub(crate) fn service_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.service_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Writes the table to the state file (off the async threads), in change order.
    async fn persist(&self) -> Result<(), Error> {
        let _order = self.persist_lock.lock().await;
        let snapshot = self.table.snapshot();
        let bakes = self.bakes.all();
        let path = self.config.state_file.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &snapshot, &bakes))
            .await
            .map_err(|e| Error::io("state writer", std::io::Error::other(e.to_string())))?
    }

    /// Persists and turns a failure into a logged message.
    pub(crate) async fn persist_logged(&self) -> Option<String> {
        match self.persist().await {
            Ok(()) => None,
            Err(e) => {
                log::line(format_args!("cannot save state: {e}"));
                Some(e.to_string())
            }
        }
    }
}

pub(crate) fn check_health_path(path: &str) -> Result<PathAndQuery, Error> {
    if !path.starts_with('/') {
        return Err(Error::Invalid(format!(
            "health path {path:?} must start with /"
        )));
    }
    path.parse()
        .map_err(|_| Error::Invalid(format!("health path {path:?}")))
}

pub(crate) async fn deploy(
    shared: &Shared,
    service: &str,
    target: &str,
    health_path: &str,
    domains: &[String],
    opts: &DeployOptions,
) -> Result<DeployReport, Error> {
    check_name(service)?;
    let target = parse_target(target)?;
    let path = check_health_path(health_path)?;
    let domains = parse_domains(domains)?;
    let lock = shared.service_lock(service);
    let _one_at_a_time = lock.lock().await;
    shared.table.check_domains(service, &domains)?;

    // Probe with the service's own Host, for apps that check it.
    let host = domains
        .first()
        .cloned()
        .or_else(|| shared.table.domains_of(service).into_iter().next());
    let gate = match health_gate(&shared.client, &target, host.as_deref(), &path, opts).await {
        Ok(g) => g,
        Err(e) => {
            log::line(format_args!("deploy {service} -> {target} refused: {e}"));
            return Err(e);
        }
    };
    let installed = shared.table.install(service, &target, &domains)?;
    let swapped = Instant::now();
    let switched_at = SystemTime::now();
    let state_error = shared.persist_logged().await;
    // A canary ended without becoming current drains like an old target.
    let (drained, in_flight_left) = match (&installed.previous, &installed.ended_canary) {
        (Some(old), None) | (None, Some(old)) => drain(old, opts.drain, true).await,
        (Some(old), Some(canary)) => {
            let (a, b) = tokio::join!(
                drain(old, opts.drain, true),
                drain(canary, opts.drain, true)
            );
            (a.0 && b.0, a.1 + b.1)
        }
        (None, None) => (true, 0),
    };
    let drain_ms = swapped.elapsed().as_millis() as u64;
    let report = DeployReport {
        service: service.to_string(),
        target: target.clone(),
        previous: installed.previous.as_ref().map(|t| t.addr.clone()),
        created: installed.created,
        switched: installed.previous.is_some() || installed.created,
        switched_at_ms: log::unix_ms(switched_at),
        health_ms: gate.took.as_millis() as u64,
        health_probes: gate.probes,
        drained,
        drain_ms,
        in_flight_left,
        state_error,
    };
    log::line(format_args!(
        "switch {service}: {} -> {target}{}; gate {} ms ({} probes of {health_path}); \
         drain {} ms, {}",
        report.previous.as_deref().unwrap_or("(none)"),
        if report.created {
            " (new service)"
        } else if !report.switched {
            " (already current)"
        } else {
            ""
        },
        report.health_ms,
        report.health_probes,
        report.drain_ms,
        if drained {
            "drained".to_string()
        } else {
            format!("NOT drained, {in_flight_left} still in flight")
        }
    ));
    Ok(report)
}

/// A passed gate.
pub(crate) struct Gate {
    pub(crate) took: Duration,
    pub(crate) probes: u32,
}

/// Probes `GET http://target/path` (with `Host: host`, else the target) until `healthy_after` consecutive 2xx answers.
pub(crate) async fn health_gate(
    client: &Upstream,
    target: &str,
    host: Option<&str>,
    path: &PathAndQuery,
    opts: &DeployOptions,
) -> Result<Gate, Error> {
    let needed = opts.healthy_after.max(1);
    let started = Instant::now();
    let deadline = started + opts.give_up_after;
    let (mut probes, mut passes) = (0u32, 0u32);
    loop {
        probes += 1;
        let outcome =
            match tokio::time::timeout(opts.timeout, probe(client, target, host, path)).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {} ms", opts.timeout.as_millis())),
            };
        let last = match outcome {
            Ok(()) => {
                passes += 1;
                if passes >= needed {
                    return Ok(Gate {
                        took: started.elapsed(),
                        probes,
                    });
                }
                None
            }
            Err(e) => {
                passes = 0;
                Some(e)
            }
        };
        if Instant::now() + opts.health_interval > deadline {
            return Err(Error::Unhealthy {
                target: target.to_string(),
                path: path.to_string(),
                probes,
                passes,
                needed,
                waited_ms: started.elapsed().as_millis() as u64,
                last: last.unwrap_or_else(|| "ran out of time".to_string()),
            });
        }
        tokio::time::sleep(opts.health_interval).await;
    }
}

/// One health probe: Ok on a 2xx answer with a complete body.
pub(crate) async fn probe(
    client: &Upstream,
    target: &str,
    host: Option<&str>,
    path: &PathAndQuery,
) -> Result<(), String> {
    if crate::static_target::is_static(target) {
        return crate::static_target::probe(target, path).await;
    }
    let uri = Uri::builder()
        .scheme("http")
        .authority(target)
        .path_and_query(path.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = Request::get(uri).header(header::USER_AGENT, "cutover-proxy-health");
    if let Some(host) = host {
        req = req.header(header::HOST, host);
    }
    let req = req.body(empty_body()).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| chain(&e))?;
    let status = resp.status();
    // Read the body so that the connection can go back to the pool.
    Limited::new(resp.into_body(), HEALTH_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Waits for the old target's in-flight requests to finish, up to `limit`; then, with
/// `retire`, closes what is still open on it (upgraded connections). Returns (drained,
/// in-flight left).
pub(crate) async fn drain(old: &Target, limit: Duration, retire: bool) -> (bool, usize) {
    let deadline = Instant::now() + limit;
    loop {
        let n = old.in_flight();
        if n == 0 {
            return (true, 0);
        }
        let now = Instant::now();
        if now >= deadline {
            if retire {
                old.retire();
            }
            return (false, n);
        }
        tokio::time::sleep(DRAIN_POLL.min(deadline - now)).await;
    }
}

pub(crate) async fn pause(
    shared: &Shared,
    service: &str,
    hold: Option<Duration>,
    drain_limit: Option<Duration>,
) -> Result<PauseReport, Error> {
    let svc = shared
        .table
        .get(service)
        .ok_or_else(|| Error::UnknownService(service.to_string()))?;
    let hold = hold.unwrap_or(shared.config.hold);
    let drain_limit = drain_limit.unwrap_or(DeployOptions::default().drain);
    let started = Instant::now();
    let was = svc.pause(hold);
    let current = svc.current();
    // The paused target may stay current (a hold that resumes without a switch): its open
    // upgraded connections are left alone.
    let (drained, in_flight_left) = drain(&current, drain_limit, false).await;
    let report = PauseReport {
        service: service.to_string(),
        hold_ms: hold.as_millis() as u64,
        drained,
        drain_ms: started.elapsed().as_millis() as u64,
        in_flight_left,
    };
    log::line(format_args!(
        "pause {service}: holding new requests for up to {} ms{}; {} on {} after {} ms",
        report.hold_ms,
        if was { " (was already paused)" } else { "" },
        if drained {
            "nothing in flight".to_string()
        } else {
            format!("{in_flight_left} still in flight")
        },
        current.addr,
        report.drain_ms
    ));
    Ok(report)
}

pub(crate) fn resume(shared: &Shared, service: &str) -> Result<usize, Error> {
    let svc = shared
        .table
        .get(service)
        .ok_or_else(|| Error::UnknownService(service.to_string()))?;
    let released = svc.resume();
    log::line(format_args!(
        "resume {service}: released {released} held request(s) to {}",
        svc.current().addr
    ));
    Ok(released)
}

pub(crate) async fn remove(shared: &Shared, service: &str) -> Result<(), Error> {
    let lock = shared.service_lock(service);
    let _one_at_a_time = lock.lock().await;
    let svc = shared
        .table
        .remove(service)
        .ok_or_else(|| Error::UnknownService(service.to_string()))?;
    let state_error = shared.persist_logged().await;
    log::line(format_args!(
        "removed service {service} (was on {})",
        svc.current().addr
    ));
    match state_error {
        None => Ok(()),
        Some(e) => Err(Error::State {
            path: shared.config.state_file.clone(),
            message: format!("service removed, but the state was not saved: {e}"),
        }),
    }
}

pub(crate) fn status(shared: &Shared) -> StatusReport {
    let tls = shared.config.tls != crate::TlsMode::Off;
    StatusReport {
        listen_tls: tls.then(|| shared.config.listen_tls.to_string()),
        certificates: shared.certs.status(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        listen: shared.config.listen.to_string(),
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        requests: shared.requests.load(Ordering::Relaxed),
        services: shared
            .table
            .services()
            .into_iter()
            .map(|(s, domains)| {
                let current = s.current();
                ServiceStatus {
                    name: s.name.clone(),
                    domains,
                    target: current.addr.clone(),
                    paused: s.is_paused(),
                    held: s.held(),
                    in_flight: s.in_flight(),
                    requests: s.requests(),
                    target_served: current.served(),
                    bake: shared.bakes.get(&s.name),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_paths_must_be_absolute() {
        check_health_path("/up").unwrap();
        check_health_path("/up?deep=1").unwrap();
        assert!(check_health_path("up").is_err());
        assert!(check_health_path("").is_err());
    }
}

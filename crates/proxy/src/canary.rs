//! The rollout operations on top of a switch: a canary (a gated new target that gets a share
//! of a service's new requests, see `table`) and per-target counts (`stats`) by which a
//! controller judges a release during its bake. It owns their order; the pick of a target per
//! request is `table`'s and the counting is `stats`'.
//!
//! Invariants:
//! - A canary changes nothing until its target has passed the health gate, like a deploy, and
//!   runs under the same per-service lock as deploys.
//! - A canary is never persisted: a restarted proxy sends everything to the current target.

use crate::switch::{check_health_path, drain, health_gate, Shared};
use crate::table::{check_name, parse_domains, parse_target};
use crate::{log, Error};
use cutover_proxy_wire::{CanaryReport, CanaryRequest, StatsReport};

pub(crate) async fn canary(shared: &Shared, req: &CanaryRequest) -> Result<CanaryReport, Error> {
    let d = &req.deploy;
    if !(1..=99).contains(&req.percent) {
        return Err(Error::Invalid(format!(
            "canary percent {}: expected 1 to 99",
            req.percent
        )));
    }
    check_name(&d.service)?;
    let target = parse_target(&d.target)?;
    let path = check_health_path(&d.health_path)?;
    let domains = parse_domains(&d.domains)?;
    let lock = shared.service_lock(&d.service);
    let _one_at_a_time = lock.lock().await;
    let svc = shared
        .table
        .get(&d.service)
        .ok_or_else(|| Error::UnknownService(d.service.clone()))?;
    let host = domains
        .first()
        .cloned()
        .or_else(|| shared.table.domains_of(&d.service).into_iter().next());
    let gate = health_gate(&shared.client, &target, host.as_deref(), &path, &d.options).await;
    let gate = gate.inspect_err(|e| {
        log::line(format_args!(
            "canary {} -> {target} refused: {e}",
            d.service
        ))
    })?;
    let (current, replaced) = shared.table.set_canary(&svc.name, &target, req.percent)?;
    if let Some(old) = replaced {
        drain(&old, d.options.drain, true).await;
    }
    log::line(format_args!(
        "canary {}: {}% of new requests -> {target} (current {}); gate {} ms ({} probes of {})",
        d.service,
        req.percent,
        current.addr,
        gate.took.as_millis(),
        gate.probes,
        d.health_path
    ));
    Ok(CanaryReport {
        service: d.service.clone(),
        target,
        current: current.addr.clone(),
        percent: req.percent,
        health_ms: gate.took.as_millis() as u64,
        health_probes: gate.probes,
    })
}

pub(crate) fn stats(shared: &Shared, service: &str) -> Result<StatsReport, Error> {
    let svc = shared
        .table
        .get(service)
        .ok_or_else(|| Error::UnknownService(service.to_string()))?;
    Ok(StatsReport {
        service: service.to_string(),
        targets: svc
            .targets()
            .iter()
            .map(|(t, role)| t.stats.report(t.id, &t.addr, role))
            .collect(),
        bake: shared.bakes.get(service),
    })
}

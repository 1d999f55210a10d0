//! `cutover renew`: new certificates now, on every host's edge proxy, for a container app's
//! domain (`[proxy] tls = "acme"`), whatever their renewal time: after the CA revoked them, or
//! when a key may have leaked. Each proxy orders as it renews (so the old certificate serves
//! until the new one is installed, and a failure keeps it and retries with backoff); this
//! asks, then reads each host's status until every domain has an outcome or `wait` is over.

use crate::switch::container::proxy_request;
use crate::{par_map, Hosts};
use cutover_core::container::TlsKind;
use cutover_core::Config;
use cutover_proxy_wire::{CertificateStatus, Request, Response};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long `cutover renew` waits for the outcome: past one order's own limit in the proxy
/// (120 s).
pub const WAIT: Duration = Duration::from_secs(150);

/// One domain on one host (or a host that could not be asked: `domain` is `-`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Renewal {
    pub host: String,
    pub domain: String,
    /// `renewed`; `failed` (the proxy serves its last certificate and retries with backoff);
    /// `pending` (no outcome within the wait: the proxy is still at it, `cutover status`
    /// shows how it ends).
    pub outcome: &'static str,
    /// When the certificate served now expires (ms since the Unix epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The app's container settings if it has ACME certificates to renew; else why not.
pub fn renewable(config: &Config) -> Result<&cutover_core::config::ContainerApp, String> {
    let capp = config.container().ok_or(
        "cutover renew is for container apps: a files app has no certificates of cutover's",
    )?;
    if !matches!(capp.proxy.tls.mode, TlsKind::Acme { .. }) {
        return Err(
            "[proxy] tls is not \"acme\": cutover renew orders ACME certificates".to_string(),
        );
    }
    Ok(capp)
}

/// Asks every host's proxy for new certificates and waits up to `wait` for the outcomes.
/// `Err` when the app has no ACME certificates to renew ([`renewable`]; nothing is asked).
pub fn renew(config: &Config, wait: Duration) -> Result<Vec<Renewal>, String> {
    let capp = renewable(config)?;
    let hosts = Hosts::new(config).map_err(|e| e.to_string())?;
    let domains: Vec<String> = capp.container.domain.iter().cloned().collect();
    let rows = par_map(hosts.len(), config.ssh.parallel, |i| {
        let host = config.hosts[i].0.clone();
        let r = hosts.get(i);
        let ask = |req: &Request| proxy_request(r, capp, req);
        r.connect()
            .map_err(|e| e.to_string())
            .and_then(|()| renew_on(&host, &ask, &domains, wait))
            .unwrap_or_else(|e| {
                vec![Renewal {
                    host,
                    domain: "-".into(),
                    outcome: "failed",
                    not_after_ms: None,
                    error: Some(e),
                }]
            })
    });
    Ok(rows.into_iter().flatten().collect())
}

/// One proxy (on `host`): its certificates before, the renewal asked for, then its status
/// each second until each domain's certificate changed (renewed) or a new failure is recorded
/// (failed).
fn renew_on(
    host: &str,
    ask: &dyn Fn(&Request) -> Result<Response, String>,
    domains: &[String],
    wait: Duration,
) -> Result<Vec<Renewal>, String> {
    let certificates = || match ask(&Request::Status)? {
        Response::Status(s) => Ok(s
            .certificates
            .into_iter()
            .map(|c| (c.domain.clone(), c))
            .collect::<BTreeMap<String, CertificateStatus>>()),
        other => Err(format!("unexpected answer from the proxy: {other:?}")),
    };
    let before = certificates()?;
    let asked = match ask(&Request::Renew {
        domains: domains.to_vec(),
    })
    .map_err(|e| {
        if e.contains("unknown variant") {
            format!("{e}: this host's proxy is older than this cutover (run `cutover setup`)")
        } else {
            e
        }
    })? {
        Response::Renewing { domains } => domains,
        other => return Err(format!("unexpected answer from the proxy: {other:?}")),
    };
    let row = |domain: &str, outcome, not_after_ms, error| Renewal {
        host: host.to_string(),
        domain: domain.to_string(),
        outcome,
        not_after_ms,
        error,
    };
    let mut outcomes: BTreeMap<&str, Renewal> = BTreeMap::new();
    let deadline = Instant::now() + wait;
    while outcomes.len() < asked.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let Ok(now) = certificates() else { continue };
        for d in &asked {
            let (false, Some(c)) = (outcomes.contains_key(d.as_str()), now.get(d)) else {
                continue;
            };
            let old = before.get(d);
            if c.not_after_ms.is_some() && c.not_after_ms != old.and_then(|o| o.not_after_ms) {
                outcomes.insert(d, row(d, "renewed", c.not_after_ms, None));
            } else if c.failed_at_ms.is_some() && c.failed_at_ms != old.and_then(|o| o.failed_at_ms)
            {
                let error = c.last_error.clone();
                outcomes.insert(d, row(d, "failed", c.not_after_ms, error));
            }
        }
    }
    Ok(asked
        .iter()
        .map(|d| {
            outcomes.remove(d.as_str()).unwrap_or_else(|| {
                let not_after = before.get(d).and_then(|c| c.not_after_ms);
                let msg = format!(
                    "no outcome within {} s: the proxy is still at it (cutover status shows how it ends)",
                    wait.as_secs()
                );
                row(d, "pending", not_after, Some(msg))
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proxy_wire::StatusReport;
    use std::cell::Cell;

    fn cert(domain: &str, not_after: u64, failed_at: Option<u64>) -> CertificateStatus {
        CertificateStatus {
            domain: domain.into(),
            source: "acme".into(),
            not_after_ms: Some(not_after),
            renew_at_ms: None,
            last_error: failed_at.map(|_| "new order: refused".into()),
            failed_at_ms: failed_at,
            next_retry_ms: None,
        }
    }

    /// A proxy whose status is `before` until the renewal is asked for, then `after`.
    fn proxy(
        before: Vec<CertificateStatus>,
        after: Vec<CertificateStatus>,
    ) -> impl Fn(&Request) -> Result<Response, String> {
        let asked = Cell::new(false);
        move |req| match req {
            Request::Status => Ok(Response::Status(StatusReport {
                pid: 1,
                version: String::new(),
                listen: String::new(),
                uptime_ms: 0,
                requests: 0,
                services: Vec::new(),
                listen_tls: None,
                certificates: if asked.get() {
                    after.clone()
                } else {
                    before.clone()
                },
            })),
            Request::Renew { .. } => {
                asked.set(true);
                Ok(Response::Renewing {
                    domains: vec!["a.test".into(), "b.test".into(), "c.test".into()],
                })
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }

    #[test]
    fn each_domain_is_renewed_failed_or_pending_by_what_changed_in_its_status() {
        let before = vec![
            cert("a.test", 100, None),
            cert("b.test", 100, Some(5)),
            cert("c.test", 100, Some(5)),
        ];
        // a: a later certificate; b: a new failure; c: the same as before (still at it).
        let after = vec![
            cert("a.test", 200, None),
            cert("b.test", 100, Some(9)),
            cert("c.test", 100, Some(5)),
        ];
        let got = renew_on(
            "web1",
            &proxy(before, after),
            &[],
            Duration::from_millis(1500),
        )
        .unwrap();
        let summary: Vec<(&str, &str, Option<u64>)> = got
            .iter()
            .map(|r| (r.domain.as_str(), r.outcome, r.not_after_ms))
            .collect();
        assert_eq!(
            summary,
            [
                ("a.test", "renewed", Some(200)),
                ("b.test", "failed", Some(100)),
                ("c.test", "pending", Some(100)),
            ]
        );
        assert!(got.iter().all(|r| r.host == "web1"));
        assert_eq!(got[1].error.as_deref(), Some("new order: refused"));
        assert!(got[2]
            .error
            .as_deref()
            .unwrap()
            .starts_with("no outcome within 1 s"));

        // A proxy that does not know the request (older than this cutover) says so.
        let old = |req: &Request| match req {
            Request::Renew { .. } => Err("proxy: bad request: unknown variant `renew`".into()),
            _ => proxy(Vec::new(), Vec::new())(req),
        };
        let e = renew_on("web1", &old, &[], Duration::ZERO).unwrap_err();
        assert!(e.ends_with("(run `cutover setup`)"), "{e}");
    }
}

//! `cutover proxy run|deploy|pause|resume|status|remove|request`: the edge proxy, and its
//! local control client. The control client speaks to the proxy's root-only unix socket on
//! the same host; `request` forwards one JSON request from stdin (what the engine sends over
//! SSH) and prints the JSON response.

use super::print_json;
use crate::cli::ProxyCommand;
use cutover_core::parse_duration;
use cutover_engine::exit;
use cutover_proxy::{
    control_request_blocking, AcmeConfig, DeployOptions, DeployRequest, ProxyConfig, Request,
    Response, TlsMode,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The proxy's files in `dir`: control socket and state.
pub(crate) fn socket_in(dir: &Path) -> PathBuf {
    dir.join("proxy.sock")
}

fn state_in(dir: &Path) -> PathBuf {
    dir.join("proxy-state.json")
}

fn dur(flag: &str, text: &str) -> Result<Duration, i32> {
    parse_duration(text).map_err(|e| {
        eprintln!("error: --{flag}: {e}");
        exit::USAGE
    })
}

/// `--limits KEY=VALUE,...` as the proxy's limits; a bad one is a usage error naming its key.
fn proxy_limits(arg: &str) -> Result<cutover_proxy::Limits, i32> {
    let l = cutover_core::proxy_limits::ProxyLimits::parse_arg(arg).map_err(|(key, msg)| {
        eprintln!("error: --limits: {key}: {msg}");
        exit::USAGE
    })?;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(cutover_proxy::Limits {
        header_timeout: l.header_timeout,
        idle_timeout: l.idle_timeout,
        max_header_bytes: n(l.max_header_bytes),
        max_headers: n(l.max_headers),
        max_connections: n(l.max_connections),
        upstream_connect_timeout: l.upstream_connect_timeout,
        upstream_header_timeout: l.upstream_header_timeout,
        body_timeout: l.body_timeout,
        upstream_body_timeout: l.upstream_body_timeout,
        send_timeout: l.send_timeout,
        max_body_bytes: l.max_body_bytes,
    })
}

/// `--trusted-proxies A,B/N,...` as (network, prefix length) pairs; a bad one is a usage
/// error saying what is wrong with it.
fn ranges(arg: &str) -> Result<Vec<(std::net::IpAddr, u8)>, i32> {
    arg.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match cutover_core::cidr::Cidr::parse(r) {
            Ok(c) => Ok((c.addr, c.prefix)),
            Err(msg) => {
                eprintln!("error: --trusted-proxies: {msg}");
                Err(exit::USAGE)
            }
        })
        .collect()
}

pub(crate) fn run(cmd: ProxyCommand) -> i32 {
    match go(cmd) {
        Ok(code) | Err(code) => code,
    }
}

fn go(cmd: ProxyCommand) -> Result<i32, i32> {
    match cmd {
        ProxyCommand::Run {
            listen,
            dir,
            hold,
            limits,
            tls,
            listen_tls,
            cert,
            key,
            acme_directory,
            acme_email,
            acme_ca_file,
            acme_peers,
            redirect_http,
            trusted_proxies,
            trusted_proxies_header,
        } => {
            let listen = address("listen", &listen)?;
            let listen_tls = address("listen-tls", &listen_tls)?;
            let tls = tls_mode(&tls, cert, key, || {
                let mut a = AcmeConfig::new(acme_directory, dir.join("acme"));
                a.email = acme_email;
                a.ca_file = acme_ca_file;
                a.peers = acme_peers
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect();
                a
            })?;
            std::fs::create_dir_all(&dir).map_err(|e| {
                eprintln!("error: cannot create {}: {e}", dir.display());
                exit::NEEDS_PERSON
            })?;
            let mut config = ProxyConfig::new(listen, socket_in(&dir), state_in(&dir));
            config.hold = dur("hold", &hold)?;
            config.limits = proxy_limits(&limits)?;
            config.tls = tls;
            config.listen_tls = listen_tls;
            config.redirect_http = redirect_http;
            config.trusted_proxies = ranges(&trusted_proxies)?;
            if trusted_proxies_header == "forwarded" {
                config.trusted_proxies_header = cutover_proxy::RelayHeader::Forwarded;
            }
            cutover_proxy::run_blocking(config).map_err(|e| {
                eprintln!("error: {e}");
                exit::NEEDS_PERSON
            })?;
            Ok(exit::OK)
        }
        ProxyCommand::Deploy {
            service,
            target,
            health,
            domain,
            drain,
            interval,
            healthy_after,
            give_up,
            timeout,
            dir,
            json,
        } => {
            let options = DeployOptions {
                health_interval: dur("interval", &interval)?,
                healthy_after,
                give_up_after: dur("give-up", &give_up)?,
                timeout: dur("timeout", &timeout)?,
                drain: dur("drain", &drain)?,
            };
            let req = Request::Deploy(DeployRequest {
                service,
                target,
                health_path: health,
                domains: domain,
                options,
            });
            send(&dir, &req, json)
        }
        ProxyCommand::Pause {
            service,
            hold,
            dir,
            json,
        } => {
            let hold_ms = match hold {
                Some(h) => Some(dur("hold", &h)?.as_millis() as u64),
                None => None,
            };
            send(
                &dir,
                &Request::Pause {
                    service,
                    hold_ms,
                    drain_ms: None,
                },
                json,
            )
        }
        ProxyCommand::Resume { service, dir, json } => {
            send(&dir, &Request::Resume { service }, json)
        }
        ProxyCommand::Remove { service, dir, json } => {
            send(&dir, &Request::Remove { service }, json)
        }
        ProxyCommand::Status { dir, json } => send(&dir, &Request::Status, json),
        ProxyCommand::Renew { domains, dir, json } => send(&dir, &Request::Renew { domains }, json),
        ProxyCommand::Request { dir } => send(&dir, &request_from_stdin()?, true),
    }
}

/// `--FLAG ADDRESS:PORT`.
fn address(flag: &str, text: &str) -> Result<std::net::SocketAddr, i32> {
    text.parse().map_err(|_| {
        eprintln!("error: --{flag}: expected ADDRESS:PORT, got {text:?}");
        exit::USAGE
    })
}

/// `--tls off|files|acme` with `--cert` and `--key` (files only); `acme` makes the ACME
/// settings.
fn tls_mode(
    mode: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    acme: impl FnOnce() -> AcmeConfig,
) -> Result<TlsMode, i32> {
    match (mode, cert, key) {
        ("off", None, None) => Ok(TlsMode::Off),
        ("files", Some(cert), Some(key)) => Ok(TlsMode::Files { cert, key }),
        ("files", _, _) => {
            eprintln!("error: --tls files needs --cert and --key");
            Err(exit::USAGE)
        }
        ("acme", None, None) => Ok(TlsMode::Acme(acme())),
        ("off" | "acme", _, _) => {
            eprintln!("error: --cert and --key are for --tls files");
            Err(exit::USAGE)
        }
        (other, _, _) => {
            eprintln!("error: --tls: expected off, files or acme, got {other:?}");
            Err(exit::USAGE)
        }
    }
}

/// The one JSON request of `proxy request`, read from stdin.
fn request_from_stdin() -> Result<Request, i32> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).map_err(|e| {
        eprintln!("error: reading the request: {e}");
        exit::USAGE
    })?;
    serde_json::from_str(text.trim()).map_err(|e| {
        eprintln!("error: not a proxy request: {e}");
        exit::USAGE
    })
}

fn send(dir: &Path, req: &Request, json: bool) -> Result<i32, i32> {
    let socket = socket_in(dir);
    match control_request_blocking(&socket, req) {
        Ok(resp) => {
            let code = if matches!(resp, Response::Error { .. }) {
                exit::FAILED
            } else {
                exit::OK
            };
            if json {
                print_json(&resp);
            } else {
                human(&resp);
            }
            Ok(code)
        }
        Err(e) => {
            if json {
                print_json(&Response::Error {
                    error: e.to_string(),
                });
            }
            eprintln!("error: {e}");
            Err(exit::FAILED)
        }
    }
}

fn human(resp: &Response) {
    match resp {
        Response::Deployed(r) => println!(
            "{}: {} (gate {} ms, {} probes; drained: {} in {} ms, {} left in flight)",
            r.service,
            if r.switched {
                format!(
                    "switched {} -> {}",
                    r.previous.as_deref().unwrap_or("nothing"),
                    r.target
                )
            } else {
                format!("already on {}", r.target)
            },
            r.health_ms,
            r.health_probes,
            r.drained,
            r.drain_ms,
            r.in_flight_left
        ),
        Response::Paused(p) => println!(
            "{}: paused (requests held up to {} ms)",
            p.service, p.hold_ms
        ),
        Response::Resumed { service, released } => {
            println!("{service}: resumed, {released} held request(s) released")
        }
        Response::Removed { service } => println!("{service}: removed"),
        Response::Status(s) => {
            println!(
                "proxy pid {} version {} listening on {} up {} s, {} requests",
                s.pid,
                s.version,
                s.listen,
                s.uptime_ms / 1000,
                s.requests
            );
            for svc in &s.services {
                println!(
                    "  {} -> {}{} domains [{}] in flight {} served {}",
                    svc.name,
                    svc.target,
                    if svc.paused { " (PAUSED)" } else { "" },
                    svc.domains.join(", "),
                    svc.in_flight,
                    svc.requests
                );
                if let Some(b) = &svc.bake {
                    println!("    {}", b.summary());
                }
            }
            if let Some(tls) = &s.listen_tls {
                println!("TLS on {tls}");
            }
            for line in certificate_lines(&s.certificates, now_ms()) {
                println!("  {line}");
            }
        }
        Response::Canary(c) => println!(
            "{}: {}% of new requests -> {} (the rest stay on {}; gate {} ms, {} probes)",
            c.service, c.percent, c.target, c.current, c.health_ms, c.health_probes
        ),
        Response::Stats(s) => {
            println!("{}:", s.service);
            for t in &s.targets {
                println!(
                    "  {} {}: {} requests, {} 5xx, {} failed, p99 {}",
                    t.role,
                    t.target,
                    t.requests,
                    t.errors_5xx,
                    t.failures,
                    t.p99_ms()
                        .map_or("-".to_string(), |ms| format!("<= {ms} ms"))
                );
            }
            if let Some(b) = &s.bake {
                println!("  {}", b.summary());
            }
        }
        Response::Baking(b) => println!("{}: {}", b.service, b.summary()),
        Response::Renewing { domains } => println!(
            "new certificates asked for: {} (`cutover proxy status` shows the outcome)",
            domains.join(", ")
        ),
        Response::Error { error } => eprintln!("error: {error}"),
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long until (or since) `at`, from `now` (ms), like `in 3h 20m` or `2m ago`.
pub(crate) fn relative(at: u64, now: u64) -> String {
    let (d, ago) = if at >= now {
        (at - now, false)
    } else {
        (now - at, true)
    };
    let s = d / 1000;
    let text = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    };
    if ago {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// One line per certificate: the domain, when it expires and is renewed, and the last
/// failure with when it is retried.
pub(crate) fn certificate_lines(
    certs: &[cutover_proxy::CertificateStatus],
    now: u64,
) -> Vec<String> {
    certs
        .iter()
        .map(|c| {
            let domain = if c.domain == "*" {
                "every name"
            } else {
                c.domain.as_str()
            };
            let mut line = format!("certificate {domain} ({}): ", c.source);
            match c.not_after_ms {
                Some(t) => line.push_str(&format!("expires {}", relative(t, now))),
                None => line.push_str("none yet"),
            }
            if let Some(r) = c.renew_at_ms {
                line.push_str(&format!(", renewal {}", relative(r, now)));
            }
            if let Some(e) = &c.last_error {
                line.push_str("; FAILED");
                if let Some(f) = c.failed_at_ms {
                    line.push_str(&format!(" {}", relative(f, now)));
                }
                line.push_str(&format!(": {e}"));
                if let Some(n) = c.next_retry_ms {
                    line.push_str(&format!("; next try {}", relative(n, now)));
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_lines_say_expiry_failure_and_retry() {
        let now = 1_000_000_000;
        let ok = cutover_proxy::CertificateStatus {
            domain: "site.example".into(),
            source: "acme".into(),
            not_after_ms: Some(now + 90 * 86_400_000),
            renew_at_ms: Some(now + 60 * 86_400_000),
            last_error: None,
            failed_at_ms: None,
            next_retry_ms: None,
        };
        let failing = cutover_proxy::CertificateStatus {
            domain: "new.example".into(),
            not_after_ms: None,
            renew_at_ms: None,
            last_error: Some("new order: connection refused".into()),
            failed_at_ms: Some(now - 120_000),
            next_retry_ms: Some(now + 3_725_000),
            ..ok.clone()
        };
        assert_eq!(
            certificate_lines(&[ok, failing], now),
            [
                "certificate site.example (acme): expires in 90d 0h, renewal in 60d 0h",
                "certificate new.example (acme): none yet; FAILED 2m 0s ago: new order: \
                 connection refused; next try in 1h 2m"
            ]
        );
    }
}

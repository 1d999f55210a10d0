//! `cutover proxy run|deploy|pause|resume|status|remove|request`: the edge proxy, and its
//! local control client. The control client speaks to the proxy's root-only unix socket on
//! the same host; `request` forwards one JSON request from stdin (what the engine sends over
//! SSH) and prints the JSON response.

use super::print_json;
use crate::cli::ProxyCommand;
use cutover_core::parse_duration;
use cutover_engine::exit;
use cutover_proxy::{
    control_request_blocking, DeployOptions, DeployRequest, ProxyConfig, Request, Response,
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
        max_header_bytes: n(l.max_header_bytes),
        max_headers: n(l.max_headers),
        max_connections: n(l.max_connections),
        upstream_connect_timeout: l.upstream_connect_timeout,
        upstream_header_timeout: l.upstream_header_timeout,
        body_timeout: l.body_timeout,
    })
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
        } => {
            let listen = listen.parse().map_err(|_| {
                eprintln!("error: --listen: expected ADDRESS:PORT, got {listen:?}");
                exit::USAGE
            })?;
            std::fs::create_dir_all(&dir).map_err(|e| {
                eprintln!("error: cannot create {}: {e}", dir.display());
                exit::NEEDS_PERSON
            })?;
            let mut config = ProxyConfig::new(listen, socket_in(&dir), state_in(&dir));
            config.hold = dur("hold", &hold)?;
            config.limits = proxy_limits(&limits)?;
            match cutover_proxy::run_blocking(config) {
                Ok(()) => Ok(exit::OK),
                Err(e) => {
                    eprintln!("error: {e}");
                    Err(exit::NEEDS_PERSON)
                }
            }
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
        ProxyCommand::Request { dir } => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| {
                eprintln!("error: reading the request: {e}");
                exit::USAGE
            })?;
            let req: Request = serde_json::from_str(text.trim()).map_err(|e| {
                eprintln!("error: not a proxy request: {e}");
                exit::USAGE
            })?;
            send(&dir, &req, true)
        }
    }
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
        }
        Response::Error { error } => eprintln!("error: {error}"),
    }
}

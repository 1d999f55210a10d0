//! Read-only views: `status` (what every host serves, read from the hosts, with drift flagged
//! between hosts and against the history) and `check` (config valid, hosts reachable, host key
//! known, `tar` present, root writable, lock free). Nothing here changes a host.

use crate::hostops;
use crate::{identity, par_map, Hosts};
use cutover_core::Config;
use cutover_remote::RemoteError;
use cutover_store::Store;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub reachable: bool,
    pub release: Option<String>,
    /// The full commit id the served release was built from (from the history), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Container apps with `[proxy] tls`: the host's proxy's certificates for the app's
    /// domain (every certificate when the app has no domain), failures included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<cutover_proxy_wire::CertificateStatus>,
    /// Container apps: the host's proxy's bake of the app, live counts while it runs, else
    /// its last verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bake: Option<cutover_proxy_wire::BakeStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub app: String,
    pub live: Option<String>,
    /// The full commit id of the live release, if it was built from git.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_commit_subject: Option<String>,
    pub hosts: Vec<HostStatus>,
    /// Human-readable drift findings; empty when every host serves the live release.
    pub drift: Vec<String>,
}

/// The certificates of a container app's host proxy when `[proxy] tls` is on: the app's
/// domain's, or all when it has none. A proxy that does not answer shows none (`check` says
/// why).
fn certificates(
    r: &dyn cutover_remote::Remote,
    config: &Config,
) -> Vec<cutover_proxy_wire::CertificateStatus> {
    let Some(capp) = config.container() else {
        return Vec::new();
    };
    if capp.proxy.tls.mode == cutover_core::container::TlsKind::Off {
        return Vec::new();
    }
    match crate::switch::container::proxy_request(r, capp, &cutover_proxy_wire::Request::Status) {
        Ok(cutover_proxy_wire::Response::Status(s)) => s
            .certificates
            .into_iter()
            .filter(|c| match &capp.container.domain {
                Some(d) => &c.domain == d || c.domain == "*",
                None => true,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The host's proxy's bake of a container app (none for files apps or a silent proxy).
fn bake(r: &dyn cutover_remote::Remote, config: &Config) -> Option<cutover_proxy_wire::BakeStatus> {
    let capp = config.container()?;
    let req = cutover_proxy_wire::Request::Stats {
        service: config.app.clone(),
    };
    match crate::switch::container::proxy_request(r, capp, &req) {
        Ok(cutover_proxy_wire::Response::Stats(s)) => s.bake,
        _ => None,
    }
}

/// Reads `current` on every host.
/// A container app's release on a host: the one running container labelled with the app
/// (after a switch commits, the old one is stopped).
/// During a bake two run: the one the proxy routes to.
fn serving_container(
    r: &dyn cutover_remote::Remote,
    capp: &cutover_core::config::ContainerApp,
    app: &str,
) -> Result<Option<String>, String> {
    let running = crate::switch::container::routed_releases(r, capp, app)?;
    Ok(match running.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    })
}

pub fn status(config: &Config, store: &Store) -> Result<Status, String> {
    let live = store.live(&config.app).map_err(|e| e.to_string())?;
    let hosts = Hosts::new(config).map_err(|e| e.to_string())?;
    let root = config.state_dir();
    let list = par_map(hosts.len(), config.ssh.parallel, |i| {
        let r = hosts.get(i);
        let name = config.hosts[i].0.clone();
        match r.connect().map_err(|e| e.to_string()).and_then(|()| {
            if let Some(capp) = config.container() {
                serving_container(r, capp, &config.app)
            } else {
                hostops::current(r, root).map_err(|e| e.to_string())
            }
        }) {
            Ok(release) => HostStatus {
                host: name,
                reachable: true,
                release,
                commit: None,
                commit_subject: None,
                error: None,
                certificates: certificates(r, config),
                bake: bake(r, config),
            },
            Err(e) => HostStatus {
                host: name,
                reachable: false,
                release: None,
                commit: None,
                commit_subject: None,
                error: Some(e),
                certificates: Vec::new(),
                bake: None,
            },
        }
    });
    let releases = store.releases(&config.app).unwrap_or_default();
    let commit_of = |id: Option<&String>| {
        id.and_then(|id| releases.iter().find(|r| &r.id == id))
            .map(|r| (r.commit.clone(), r.commit_subject.clone()))
            .unwrap_or((None, None))
    };
    let mut list = list;
    for h in &mut list {
        (h.commit, h.commit_subject) = commit_of(h.release.as_ref());
    }
    let (live_commit, live_commit_subject) = commit_of(live.as_ref());
    let mut drift = Vec::new();
    let served: std::collections::BTreeSet<Option<&String>> = list
        .iter()
        .filter(|h| h.reachable)
        .map(|h| h.release.as_ref())
        .collect();
    if served.len() > 1 {
        drift.push("hosts serve different releases".to_string());
    }
    for h in list.iter().filter(|h| h.reachable) {
        if h.release != live {
            drift.push(format!(
                "{} serves {} but the history says {} is live",
                h.host,
                h.release.as_deref().unwrap_or("nothing"),
                live.as_deref().unwrap_or("nothing")
            ));
        }
    }
    for h in list.iter().filter(|h| !h.reachable) {
        drift.push(format!("{} is unreachable", h.host));
    }
    Ok(Status {
        app: config.app.clone(),
        live,
        live_commit,
        live_commit_subject,
        hosts: list,
        drift,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct HostCheck {
    pub host: String,
    pub reachable: bool,
    pub host_key_known: bool,
    pub tar: bool,
    pub root_writable: bool,
    pub lock_free: bool,
    pub current: Option<String>,
    pub problems: Vec<String>,
}

impl HostCheck {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Connects to every host and checks what a deploy needs.
pub fn check(config: &Config) -> Result<Vec<HostCheck>, String> {
    let hosts = Hosts::new(config).map_err(|e| e.to_string())?;
    let root = config.state_dir();
    Ok(par_map(hosts.len(), config.ssh.parallel, |i| {
        let r = hosts.get(i);
        let mut c = HostCheck {
            host: config.hosts[i].0.clone(),
            reachable: false,
            host_key_known: false,
            tar: false,
            root_writable: false,
            lock_free: false,
            current: None,
            problems: Vec::new(),
        };
        match r.connect() {
            Ok(()) => {
                c.reachable = true;
                c.host_key_known = true;
            }
            Err(e) => {
                c.reachable = !matches!(
                    e,
                    RemoteError::Unreachable { .. } | RemoteError::Other { .. }
                );
                c.problems.push(e.to_string());
                return c;
            }
        }
        match hostops::check(r, root) {
            Ok(f) => {
                c.tar = f.tar;
                c.root_writable = f.writable;
                c.lock_free = f.lock.is_none();
                c.current = f.current;
                if !f.tar {
                    c.problems.push("tar is not installed".into());
                }
                if !f.writable {
                    c.problems
                        .push(format!("{root} is not writable by the SSH user"));
                }
                if let Some(line) = f.lock {
                    let who = identity::from_line(&line)
                        .map(|h| identity::describe(&h))
                        .unwrap_or(line);
                    c.problems.push(format!("locked by {who}"));
                }
            }
            Err(e) => c.problems.push(e.to_string()),
        }
        if let Some(capp) = config.container() {
            // Container apps also need docker and the edge proxy (`cutover setup`).
            let docker = cutover_remote::Script::new(
                "docker version --format '{{.Server.Version}}' 2>&1",
                &[],
            );
            match r.run(&docker, None) {
                Ok(o) if o.success() => {}
                Ok(o) => c
                    .problems
                    .push(format!("docker does not answer: {}", o.tail())),
                Err(e) => c.problems.push(e.to_string()),
            }
            if let Err(e) = crate::switch::container::proxy_request(
                r,
                capp,
                &cutover_proxy_wire::Request::Status,
            ) {
                c.problems.push(format!("edge proxy: {e}"));
            }
        }
        c
    }))
}

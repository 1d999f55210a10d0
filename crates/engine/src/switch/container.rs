//! Container apps, switched by cutover's own edge proxy on each host (one pointer swap,
//! never a config reload).
//!
//! * **pin**: `docker pull` on every host (the old release keeps serving); every host must
//!   resolve the same digest. A release is the digest plus a config snapshot (env, volumes,
//!   port, health); a mutable tag is never the rollback anchor.
//! * **stage**: blue-green starts `<app>-<release>` on a loopback port and gates it
//!   directly; hold makes sure the image is there.
//! * **switch**: blue-green asks the proxy to gate the new target once more and swap to it,
//!   draining the old; hold pauses the service in the proxy, stops the old container, starts
//!   the new one, gates and swaps, and resumes (held requests go to the new container).
//! * **gate**: the health path through each host's proxy.
//! * **retire** (after the commit): stop the old container (kept for a warm rollback), remove
//!   those beyond `keep`.
//!
//! **Invariant:** the old container keeps running (blue-green) until every host verified the
//! new one, so going back is a proxy swap, not a container start.

use super::own_bake::OwnBake;
use super::{HostCx, Pinned, SwitchError, Switcher, Target};
use crate::deploy::{DeployError, Recorder, Via};
use crate::gate::{run_gate, GateSpec};
use crate::par_map;
use cutover_core::config::ContainerApp;
use cutover_core::container::Strategy;
use cutover_core::{Config, State, Step};
use cutover_docker as docker;
use cutover_proxy_wire::{
    BakeLimits, BakeRequest, BakeState, CanaryRequest, DeployOptions, DeployRequest, Request,
    Response, StatsReport, MIN_BAKE_REQUESTS,
};
use cutover_remote::{Remote, Script};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A release's config, recorded with it and restored by a rollback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    image: String,
    port: u16,
    env: BTreeMap<String, String>,
    volumes: Vec<String>,
    health_path: String,
    expect: u16,
    timeout_ms: u64,
    interval_ms: u64,
    healthy_after: u32,
    give_up_after_ms: u64,
}

impl Snapshot {
    fn of(config: &Config, app: &ContainerApp, image: &str) -> Snapshot {
        Snapshot {
            image: image.to_string(),
            port: app.container.port,
            env: app.container.env.clone(),
            volumes: app.container.volumes.clone(),
            health_path: app.health_path.clone(),
            expect: config.health.expect,
            timeout_ms: config.health.timeout.as_millis() as u64,
            interval_ms: config.health.interval.as_millis() as u64,
            healthy_after: config.health.healthy_after,
            give_up_after_ms: config.health.give_up_after.as_millis() as u64,
        }
    }

    fn gate(&self) -> GateSpec {
        GateSpec {
            host_header: "127.0.0.1".into(),
            path: self.health_path.clone(),
            expect: self.expect,
            timeout: Duration::from_millis(self.timeout_ms),
            interval: Duration::from_millis(self.interval_ms),
            healthy_after: self.healthy_after,
            give_up_after: Duration::from_millis(self.give_up_after_ms),
        }
    }
}

/// The container name of a release.
pub fn container_name(app: &str, release: &str) -> String {
    format!("{app}-{release}")
}

/// Where `cutover setup` put the binary on a host.
pub fn remote_binary(app: &ContainerApp) -> String {
    format!("{}/cutover", app.proxy.install_dir)
}

const PROXY_REQUEST: &str = "printf '%s\\n' {req} | {bin} proxy request --dir {dir}";

/// Sends one control request to the proxy on a host (through the installed binary).
pub(crate) fn proxy_request(
    r: &dyn Remote,
    app: &ContainerApp,
    req: &Request,
) -> Result<Response, String> {
    proxy_request_at(r, &app.proxy.install_dir, req)
}

/// [`proxy_request`] to the proxy `cutover setup` installed in `install_dir`.
pub(crate) fn proxy_request_at(
    r: &dyn Remote,
    install_dir: &str,
    req: &Request,
) -> Result<Response, String> {
    let json = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let bin = format!("{install_dir}/cutover");
    let s = Script::new(
        PROXY_REQUEST,
        &[("req", &json), ("bin", &bin), ("dir", install_dir)],
    );
    let out = r.run(&s, None).map_err(|e| e.to_string())?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .map(str::to_string);
    let text = out.stdout.trim();
    let parsed: Option<Response> = serde_json::from_str(text)
        .ok()
        .or_else(|| line.and_then(|l| serde_json::from_str(&l).ok()));
    match parsed {
        Some(Response::Error { error }) => Err(format!("proxy: {error}")),
        Some(resp) => Ok(resp),
        None => Err(format!(
            "no answer from the edge proxy (run `cutover setup` first?): {}",
            out.tail()
        )),
    }
}

/// Armed on a host before a `hold` switch pauses its proxy, disarmed once the controller has
/// resumed it. If the controller dies in between (kill -9, lost SSH), the host finishes the
/// switch on its own after `grace` seconds: start `to` and swap to it if it passes the proxy's
/// gate, else back to `old`; then resume. So no host stays paused with nothing running.
const HOLD_WATCHDOG: &str = r#"
set -u
pidfile={pidfile}
( trap '' HUP
  sleep {grace}
  [ -e "$pidfile" ] || exit 0
  flip() {
    docker start "$1" >/dev/null 2>&1 || return 1
    p=$(docker port "$1" {cport} 2>/dev/null | head -n 1)
    p=${p##*:}
    [ -n "$p" ] || return 1
    printf '%s\n' "$2" | sed "s/@PORT@/$p/" | {bin} proxy request --dir {dir} 2>/dev/null | grep -q '"deployed"'
  }
  flip {to} {flip} || { docker stop {to} >/dev/null 2>&1; flip {old} {flip}; }
  printf '%s\n' {resume} | {bin} proxy request --dir {dir} >/dev/null 2>&1
  rm -f "$pidfile"
) </dev/null >/dev/null 2>&1 &
printf '%s\n' "$!" > "$pidfile" && echo ARMED
"#;

const HOLD_DISARM: &str = r#"
pidfile={pidfile}
if [ -e "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null; rm -f "$pidfile"; fi
echo DISARMED
"#;

/// One host's staged release (blue-green: the new container's loopback port).
#[derive(Debug, Clone, Default)]
pub struct Staged {
    port: Option<u16>,
    /// The container existed before this run (warm rollback): stop it on failure, never remove.
    warm: bool,
}

/// The container switcher of one app, blue-green or hold.
pub struct Containers<'a> {
    pub(crate) config: &'a Config,
    pub(crate) capp: &'a ContainerApp,
    pub(crate) parallel: usize,
}

impl Containers<'_> {
    fn app(&self) -> &str {
        &self.config.app
    }

    fn strategy(&self) -> Strategy {
        self.capp.container.strategy
    }

    fn name(&self, t: &Target<Snapshot>) -> String {
        container_name(self.app(), &t.id)
    }

    fn labels(&self, t: &Target<Snapshot>) -> Vec<(String, String)> {
        vec![
            ("cutover.app".to_string(), self.app().to_string()),
            ("cutover.release".to_string(), t.id.clone()),
        ]
    }

    /// Runs `t`'s container (a new one), returning its loopback port.
    fn run_new(&self, r: &dyn Remote, t: &Target<Snapshot>) -> Result<u16, docker::DockerError> {
        let name = self.name(t);
        let labels = self.labels(t);
        docker::run(
            r,
            &docker::ContainerSpec {
                name: &name,
                image: &t.snap.image,
                port: t.snap.port,
                env: &t.snap.env,
                volumes: &t.snap.volumes,
                labels: &labels,
            },
        )
    }

    /// Starts `t`'s container if it exists, else runs a new one.
    fn start_or_run(&self, r: &dyn Remote, t: &Target<Snapshot>) -> Result<u16, String> {
        docker::start(r, &self.name(t), t.snap.port)
            .or_else(|_| self.run_new(r, t))
            .map_err(|e| e.message())
    }

    fn stop(&self, r: &dyn Remote, name: &str) {
        let _ = docker::stop(
            r,
            &[name.to_string()],
            self.capp.container.stop_timeout.as_secs() as u32,
        );
    }

    fn deploy_request(&self, target: String, snap: &Snapshot, healthy_after: u32) -> Request {
        Request::Deploy(DeployRequest {
            service: self.app().to_string(),
            target,
            health_path: snap.health_path.clone(),
            domains: self.capp.container.domain.iter().cloned().collect(),
            options: DeployOptions {
                health_interval: Duration::from_millis(snap.interval_ms),
                healthy_after,
                give_up_after: Duration::from_millis(snap.give_up_after_ms),
                timeout: Duration::from_millis(snap.timeout_ms),
                drain: self.capp.proxy.drain,
            },
        })
    }

    fn watchdog_pidfile(&self) -> String {
        format!("{}/.cutover/hold-watchdog.pid", self.capp.state_dir)
    }

    /// Arms [`HOLD_WATCHDOG`] for a hold switch from `old` to `to` on one host.
    fn arm(&self, r: &dyn Remote, to: &Target<Snapshot>, old: &str) -> Result<(), String> {
        let c = &self.capp.container;
        let slack = Duration::from_secs(15) + 2 * Duration::from_millis(to.snap.timeout_ms);
        let grace = c.stop_timeout + Duration::from_millis(to.snap.give_up_after_ms) + slack;
        let flip = self.deploy_request("127.0.0.1:@PORT@".into(), &to.snap, 1);
        let resume = Request::Resume {
            service: self.app().to_string(),
        };
        let json = |q: &Request| serde_json::to_string(q).map_err(|e| e.to_string());
        let s = Script::new(
            HOLD_WATCHDOG,
            &[
                ("pidfile", &self.watchdog_pidfile()),
                ("grace", &grace.as_secs().to_string()),
                ("cport", &to.snap.port.to_string()),
                ("bin", &remote_binary(self.capp)),
                ("dir", &self.capp.proxy.install_dir),
                ("to", &self.name(to)),
                ("old", old),
                ("flip", &json(&flip)?),
                ("resume", &json(&resume)?),
            ],
        );
        let out = r.run(&s, None).map_err(|e| e.to_string())?;
        if out.stdout.lines().any(|l| l == "ARMED") {
            Ok(())
        } else {
            Err(format!("cannot arm the hold watchdog: {}", out.tail()))
        }
    }

    fn disarm(&self, r: &dyn Remote) {
        let s = Script::new(HOLD_DISARM, &[("pidfile", &self.watchdog_pidfile())]);
        let _ = r.run(&s, None);
    }

    /// Asks the host's proxy to gate `127.0.0.1:port` and swap the app's target to it.
    fn flip(
        &self,
        r: &dyn Remote,
        port: u16,
        snap: &Snapshot,
        healthy_after: u32,
    ) -> Result<String, SwitchError> {
        let req = self.deploy_request(format!("127.0.0.1:{port}"), snap, healthy_after);
        // The proxy refuses a deploy only when the target fails its gate: that is a health
        // verdict; not reaching the proxy is a failed switch.
        let answer = proxy_request(r, self.capp, &req).map_err(|e| {
            if e.starts_with("proxy: ") {
                SwitchError::Unhealthy(e)
            } else {
                SwitchError::Failed(e)
            }
        })?;
        match answer {
            Response::Deployed(d) => Ok(format!(
                "proxy {} -> {} (gate {} ms, drained {} in {} ms)",
                d.previous.as_deref().unwrap_or("new"),
                d.target,
                d.health_ms,
                d.drained,
                d.drain_ms
            )),
            other => Err(SwitchError::Failed(format!(
                "unexpected proxy answer: {other:?}"
            ))),
        }
    }

    /// Asks the host's proxy to gate `127.0.0.1:port` and send `percent` of the app's new
    /// requests to it (the old container keeps the rest) until the bake promotes it.
    fn canary(
        &self,
        r: &dyn Remote,
        port: u16,
        snap: &Snapshot,
        percent: u8,
    ) -> Result<String, SwitchError> {
        let Request::Deploy(deploy) = self.deploy_request(format!("127.0.0.1:{port}"), snap, 1)
        else {
            unreachable!("deploy_request builds a deploy")
        };
        let req = Request::Canary(CanaryRequest { percent, deploy });
        let answer = proxy_request(r, self.capp, &req).map_err(|e| {
            if e.starts_with("proxy: ") && e.contains("health gate") {
                SwitchError::Unhealthy(e)
            } else {
                SwitchError::Failed(e)
            }
        })?;
        match answer {
            Response::Canary(c) => Ok(format!(
                "proxy canary: {}% of new requests -> {}, the rest on {} (gate {} ms)",
                c.percent, c.target, c.current, c.health_ms
            )),
            other => Err(SwitchError::Failed(format!(
                "unexpected proxy answer: {other:?}"
            ))),
        }
    }

    /// The proxy's per-target counts of the app on one host.
    /// The bake judged by the controller ([`OwnBake`]) from `now` on, probing the health
    /// path through the proxy when traffic is thin; a passed canary (`target`) is promoted
    /// here, since no proxy bake will.
    fn own_bake(
        &self,
        h: &HostCx<'_>,
        to: &Target<Snapshot>,
        now: &StatsReport,
        own: &OwnBake<'_>,
        target: &str,
        canary: bool,
    ) -> Result<String, String> {
        let r = h.remote;
        let (endpoint, spec) = self.probe_at(h, to)?;
        let verdict = own.run(
            now,
            || self.stats(r),
            || {
                let p = crate::gate::probe(&endpoint, &spec.host_header, &spec.path, spec.timeout);
                p.error.is_none() && p.status == Some(spec.expect)
            },
            |m| {
                h.ev(
                    Step::Bake,
                    State::Output,
                    &format!("bake baking of {target}: {m}"),
                )
            },
            std::thread::sleep,
        )?;
        if !canary {
            return Ok(verdict);
        }
        let port = target
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{verdict}; the canary {target} has no port"))?;
        self.flip(r, port, &to.snap, 1)
            .map(|_| format!("{verdict}; canary promoted to every request"))
            .map_err(|e| format!("{verdict}; promoting the canary failed: {}", e.text()))
    }

    fn stats(&self, r: &dyn Remote) -> Result<StatsReport, String> {
        let req = Request::Stats {
            service: self.app().to_string(),
        };
        match proxy_request(r, self.capp, &req)? {
            Response::Stats(s) => Ok(s),
            other => Err(format!("unexpected proxy answer: {other:?}")),
        }
    }

    fn pause(&self, r: &dyn Remote, paused: bool) -> Result<(), String> {
        let service = self.app().to_string();
        let req = if paused {
            Request::Pause {
                service,
                hold_ms: Some(self.capp.proxy.hold.as_millis() as u64),
                drain_ms: None,
            }
        } else {
            Request::Resume { service }
        };
        proxy_request(r, self.capp, &req).map(|_| ())
    }

    /// A `hold` switch on one host: pause, stop `old`, start `to`, gate and swap, resume. If
    /// `to` does not come up healthy, `old` is started and swapped back before resuming.
    fn hold_switch(
        &self,
        r: &dyn Remote,
        to: &Target<Snapshot>,
        exists: bool,
        old: Option<&str>,
    ) -> Result<String, SwitchError> {
        let started = std::time::Instant::now();
        let name = self.name(to);
        if let Some(o) = old {
            self.arm(r, to, o)?;
            if let Err(e) = self.pause(r, true) {
                self.disarm(r);
                return Err(SwitchError::Failed(e));
            }
        }
        let resume = || {
            if old.is_some() {
                let _ = self.pause(r, false);
                self.disarm(r);
            }
        };
        if let Some(o) = old {
            self.stop(r, o);
        }
        let port = if exists {
            self.start_or_run(r, to)
        } else {
            self.run_new(r, to).map_err(|e| e.message())
        };
        let flipped = port
            .map_err(SwitchError::Failed)
            .and_then(|p| self.flip(r, p, &to.snap, to.snap.healthy_after));
        match flipped {
            Ok(m) => {
                resume();
                Ok(format!(
                    "{m}; requests held {} ms",
                    started.elapsed().as_millis()
                ))
            }
            Err(e) => {
                let diagnosis = container_diagnosis(r, &name);
                let _ = docker::remove(r, std::slice::from_ref(&name));
                if let Some(o) = old {
                    // Back to the old container before releasing held requests.
                    if let Ok(p) = docker::start(r, o, to.snap.port) {
                        let _ = self.flip(r, p, &to.snap, 1);
                    }
                }
                resume();
                Err(e.map(|t| format!("{t}{diagnosis}")))
            }
        }
    }
}

impl Switcher for Containers<'_> {
    type Snap = Snapshot;
    const STAGES_DIRECTORIES: bool = false;
    type Staged = Staged;

    fn root(&self) -> &str {
        &self.capp.state_dir
    }

    fn via(&self, snap: &Snapshot) -> Via {
        Via::Proxy(Box::new(crate::deploy::Proxied {
            image: snap.image.clone(),
            strategy: self.strategy().as_str().to_string(),
        }))
    }

    fn pin(
        &self,
        rec: &Recorder<'_>,
        hosts: &[HostCx<'_>],
        image: &str,
    ) -> Result<Pinned<Snapshot>, DeployError> {
        let reference = if let Some(d) = image.strip_prefix('@') {
            format!("{}@{d}", self.capp.container.image)
        } else {
            format!("{}:{image}", self.capp.container.image)
        };
        rec.ev(None, Step::Pull, State::Start, &reference);
        let pulled = par_map(hosts.len(), self.parallel, |i| {
            let h = &hosts[i];
            h.ev(Step::Pull, State::Start, &reference);
            let p = docker::pull(h.remote, &reference).map_err(|e| e.message());
            match &p {
                Ok(p) => h.ev(Step::Pull, State::Done, &p.reference),
                Err(e) => h.ev(Step::Pull, State::Failed, e),
            }
            p
        });
        let errors: Vec<String> = pulled
            .iter()
            .zip(hosts)
            .filter_map(|(p, h)| p.as_ref().err().map(|e| format!("{}: {e}", h.name)))
            .collect();
        if !errors.is_empty() {
            return Err(DeployError::PullFailed { reference, errors });
        }
        let digests: BTreeSet<&str> = pulled
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .map(|p| p.reference.as_str())
            .collect();
        if digests.len() != 1 {
            return Err(DeployError::DigestsDisagree {
                reference,
                digests: format!("{digests:?}"),
            });
        }
        let pinned = digests.into_iter().next().expect("one").to_string();
        Ok(Pinned {
            content: pinned.rsplit(':').next().unwrap_or("").to_string(),
            snap: Snapshot::of(self.config, self.capp, &pinned),
            source: reference,
        })
    }

    fn serving(&self, h: &HostCx<'_>) -> Vec<String> {
        routed_releases(h.remote, self.capp, self.app()).unwrap_or_default()
    }

    fn reconcile_note(&self, h: &HostCx<'_>, release: &str) -> Option<String> {
        let req = Request::Stats {
            service: self.app().to_string(),
        };
        match proxy_request(h.remote, self.capp, &req) {
            Ok(Response::Stats(s)) => s.bake.filter(|b| b.release == release).map(|b| b.summary()),
            _ => None,
        }
    }

    fn stage(&self, h: &HostCx<'_>, to: &Target<Snapshot>) -> Result<Staged, String> {
        let r = h.remote;
        let name = self.name(to);
        let existing = docker::state(r, &name).map_err(|e| e.message())?;
        if self.strategy() == Strategy::Hold {
            if !existing.exists {
                // Cold: make sure the image is on the host (a rollback may need to pull it again).
                docker::pull(r, &to.snap.image).map_err(|e| e.message())?;
            }
            let how = if existing.exists {
                "container kept from before"
            } else {
                "image pulled"
            };
            h.ev(Step::Stage, State::Done, how);
            return Ok(Staged {
                port: None,
                warm: existing.exists,
            });
        }
        h.ev(Step::Start, State::Start, &name);
        let port = if existing.exists {
            docker::start(r, &name, to.snap.port)
        } else {
            docker::pull(r, &to.snap.image).and_then(|_| self.run_new(r, to))
        };
        let port = match port {
            Ok(p) => p,
            Err(e) => {
                let m = format!("{}{}", e.message(), container_diagnosis(r, &name));
                h.ev(Step::Start, State::Failed, &m);
                return Err(m);
            }
        };
        h.ev(Step::Start, State::Done, &format!("127.0.0.1:{port}"));
        h.ev(
            Step::Probe,
            State::Start,
            &format!("127.0.0.1:{port}{}", to.snap.health_path),
        );
        let g = r
            .forward("127.0.0.1", port)
            .map_err(|e| e.to_string())
            .map(|ep| run_gate(&ep, &to.snap.gate()));
        let why = match g {
            Ok(g) if g.healthy => {
                h.ev(
                    Step::Probe,
                    State::Done,
                    &format!("healthy in {:.1}s", g.elapsed.as_secs_f64()),
                );
                return Ok(Staged {
                    port: Some(port),
                    warm: existing.exists,
                });
            }
            Ok(g) => format!(
                "not healthy after {:.1}s; last answer: {}",
                g.elapsed.as_secs_f64(),
                g.last.describe()
            ),
            Err(e) => e,
        };
        let m = format!(
            "new container {name}: {why}{}",
            container_diagnosis(r, &name)
        );
        h.ev(Step::Probe, State::Failed, &m);
        Err(m)
    }

    fn unstage(&self, h: &HostCx<'_>, to: &Target<Snapshot>, staged: Option<&Staged>) {
        let name = self.name(to);
        if staged.is_some_and(|s| s.warm) {
            let _ = docker::stop(h.remote, std::slice::from_ref(&name), 10);
        } else {
            let _ = docker::remove(h.remote, std::slice::from_ref(&name));
        }
    }

    fn switch(
        &self,
        h: &HostCx<'_>,
        from: Option<&Target<Snapshot>>,
        to: &Target<Snapshot>,
        staged: Option<&Staged>,
    ) -> Result<String, SwitchError> {
        let r = h.remote;
        match self.strategy() {
            Strategy::BlueGreen => {
                let port = match staged.and_then(|s| s.port) {
                    Some(p) => p,
                    None => self.start_or_run(r, to)?,
                };
                // Going forward from a running release with a canary: the new container gets
                // its share of requests during the bake, which then promotes it.
                match (self.config.deploy.canary, from, staged) {
                    (Some(percent), Some(_), Some(_)) => self.canary(r, port, &to.snap, percent),
                    _ => self.flip(r, port, &to.snap, 1),
                }
            }
            Strategy::Hold => {
                let exists = staged.is_none_or(|s| s.warm);
                let old = from.map(|f| self.name(f));
                self.hold_switch(r, to, exists, old.as_deref())
            }
        }
    }

    fn probe_at(
        &self,
        h: &HostCx<'_>,
        _to: &Target<Snapshot>,
    ) -> Result<(cutover_remote::Endpoint, GateSpec), String> {
        let url = &self.config.health.url;
        let health = &self.config.health;
        let spec = GateSpec {
            host_header: self
                .capp
                .container
                .domain
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            path: self.capp.health_path.clone(),
            expect: health.expect,
            timeout: health.timeout,
            interval: health.interval,
            healthy_after: health.healthy_after,
            give_up_after: health.give_up_after,
        };
        let endpoint = h
            .remote
            .forward(&url.host, url.port)
            .map_err(|e| e.to_string())?;
        Ok((endpoint, spec))
    }

    /// The bake is the proxy's: it is handed the window, the limits and the target to fall
    /// back to, judges by its own counts (probing the health path when traffic is thin),
    /// swaps back on its own when a limit is crossed and promotes a passed canary. Here the
    /// verdict is only awaited (polling `stats`, each poll's live counts an event), so that a
    /// controller that dies mid-bake changes nothing about how the bake ends.
    fn bake(
        &self,
        h: &HostCx<'_>,
        from: Option<&Target<Snapshot>>,
        to: &Target<Snapshot>,
        window: Duration,
        max_error_rate: f64,
    ) -> Result<String, String> {
        let r = h.remote;
        let now = match self.stats(r) {
            Ok(now) => now,
            // A proxy too old to count: judged by probes through it, as files apps are
            // (never passed on no data).
            Err(e) => {
                h.ev(
                    Step::Bake,
                    State::Output,
                    &format!("the proxy gives no counts ({e}); the controller judges the bake by probes through it"),
                );
                return super::probing_bake(self, h, to, window, max_error_rate);
            }
        };
        let (target, fallback) = match (now.role("canary"), now.role("current")) {
            (Some(c), cur) => (c.target.clone(), cur.map(|c| c.target.clone())),
            (None, Some(cur)) => (
                cur.target.clone(),
                from.and(now.role("previous")).map(|p| p.target.clone()),
            ),
            (None, None) => return Err("the proxy reports no target for the app".into()),
        };
        let deploy = &self.config.deploy;
        let health = &self.config.health;
        let interval = health
            .interval
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let limits = BakeLimits {
            max_error_ppm: deploy.max_error_rate_ppm,
            max_p99_ms: deploy.max_p99.map(|d| d.as_millis() as u64),
            min_requests: MIN_BAKE_REQUESTS,
        };
        let canary = now.role("canary").map(|c| c.target.clone());
        let req = Request::Bake(BakeRequest {
            service: self.app().to_string(),
            target: target.clone(),
            fallback,
            health_path: to.snap.health_path.clone(),
            window,
            limits,
            interval,
            timeout: health.timeout,
            release: to.id.clone(),
            old_release: from.map(|f| f.id.clone()),
        });
        let why = match proxy_request(r, self.capp, &req) {
            Ok(Response::Baking(b)) => {
                h.ev(Step::Bake, State::Output, &b.summary());
                None
            }
            Ok(other) => Some(format!("unexpected proxy answer: {other:?}")),
            Err(e) => Some(e),
        };
        if let Some(why) = why {
            // An older proxy (or one refusing the op): the controller judges the bake.
            h.ev(
                Step::Bake,
                State::Output,
                &format!("the proxy did not take the bake ({why}); the controller judges it from the proxy's counts"),
            );
            let own = OwnBake {
                window,
                interval: Duration::from_secs(1),
                limits,
                release: &to.id,
                old_release: from.map(|f| f.id.as_str()),
                health_path: &to.snap.health_path,
                canary: canary.is_some(),
            };
            return self.own_bake(h, to, &now, &own, &target, canary.is_some());
        }
        // The proxy's verdict comes at the end of the window at the latest (plus a swap back
        // and its drain); a proxy that says nothing by then is a failed bake.
        let deadline = std::time::Instant::now() + window + Duration::from_secs(60);
        let poll = Duration::from_secs(1);
        loop {
            std::thread::sleep(poll);
            let b = self.stats(r).ok().and_then(|s| s.bake);
            match b {
                Some(b) if b.state == BakeState::Baking => {
                    h.ev(Step::Bake, State::Output, &b.summary())
                }
                Some(b) if b.state == BakeState::Passed => {
                    return Ok(match b.action.as_str() {
                        "" => b.verdict,
                        a => format!("{}; {a}", b.verdict),
                    })
                }
                Some(b) => {
                    return Err(match b.action.as_str() {
                        "" => b.verdict,
                        a => format!("{}; {a}", b.verdict),
                    })
                }
                None => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the proxy gave no bake verdict within {}",
                    cutover_core::duration::format_duration(window + Duration::from_secs(60))
                ));
            }
        }
    }

    fn gate_target(&self, _to: &Target<Snapshot>) -> String {
        self.config.health.url.to_string()
    }

    fn gate(
        &self,
        h: &HostCx<'_>,
        to: &Target<Snapshot>,
        switched: &str,
    ) -> Result<String, String> {
        let url = &self.config.health.url;
        let (endpoint, spec) = self.probe_at(h, to)?;
        let g = run_gate(&endpoint, &spec);
        if g.healthy {
            Ok(format!(
                "{switched}; {url} through the proxy answered {} {} times",
                spec.expect, spec.healthy_after
            ))
        } else {
            Err(format!(
                "{url} through the proxy: not healthy after {:.1}s; last answer: {}",
                g.elapsed.as_secs_f64(),
                g.last.describe()
            ))
        }
    }

    /// A hold switch's watchdog acts after its grace (see `arm`), from the config's settings,
    /// plus a margin.
    fn settle(&self) -> Duration {
        match self.strategy() {
            Strategy::BlueGreen => Duration::ZERO,
            Strategy::Hold => {
                let h = &self.config.health;
                self.capp.container.stop_timeout
                    + h.give_up_after
                    + 2 * h.timeout
                    + Duration::from_secs(15 + 5)
            }
        }
    }

    fn drop_failed(&self, h: &HostCx<'_>, failed: &Target<Snapshot>) {
        let _ = docker::remove(h.remote, &[self.name(failed)]);
    }

    fn retire(
        &self,
        h: &HostCx<'_>,
        live: &Target<Snapshot>,
        from: Option<&Target<Snapshot>>,
        protect: &BTreeSet<String>,
    ) -> Result<(Vec<String>, String), String> {
        let r = h.remote;
        if let (Some(p), Strategy::BlueGreen) = (from, self.strategy()) {
            self.stop(r, &self.name(p));
        }
        let list = docker::list(r, self.app()).map_err(|e| e.message())?;
        // A run killed during its bake leaves the container it baked running beside the
        // live one (whichever way the proxy decided): only the live one keeps running.
        let strays: Vec<String> = list
            .iter()
            .filter(|c| c.state == "running")
            .filter(|c| c.labels.get("cutover.release") != Some(&live.id))
            .filter(|c| from.is_none_or(|f| c.name != self.name(f)))
            .map(|c| c.name.clone())
            .collect();
        if !strays.is_empty() {
            let _ = docker::stop(
                r,
                &strays,
                self.capp.container.stop_timeout.as_secs() as u32,
            );
        }
        let ids: Vec<String> = list
            .iter()
            .filter_map(|c| c.labels.get("cutover.release").cloned())
            .collect();
        let del = cutover_core::plan::prune(&ids, self.capp.container.keep, protect);
        let names: Vec<String> = del.iter().map(|d| container_name(self.app(), d)).collect();
        docker::remove(r, &names).map_err(|e| e.message())?;
        Ok((Vec::new(), names.join(" ")))
    }
}

/// The releases a host serves: its running containers of the app; when more than one runs
/// (a bake keeps the old one running, and a controller may have died during it), only the
/// one whose port is the proxy's current target (all of them if the proxy cannot say).
pub(crate) fn routed_releases(
    r: &dyn Remote,
    capp: &ContainerApp,
    app: &str,
) -> Result<Vec<String>, String> {
    let list = docker::list(r, app).map_err(|e| e.message())?;
    let running: Vec<&docker::Listed> = list.iter().filter(|c| c.state == "running").collect();
    let release = |c: &&docker::Listed| c.labels.get("cutover.release").cloned();
    if running.len() <= 1 {
        return Ok(running.iter().filter_map(release).collect());
    }
    let req = Request::Stats {
        service: app.to_string(),
    };
    let current = match proxy_request(r, capp, &req) {
        Ok(Response::Stats(s)) => s.role("current").map(|c| c.target.clone()),
        _ => None,
    };
    let port = current.and_then(|t| t.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()));
    let routed: Vec<String> = running
        .iter()
        .filter(|c| port.is_some() && c.host_port == port)
        .filter_map(release)
        .collect();
    Ok(if routed.is_empty() {
        running.iter().filter_map(release).collect()
    } else {
        routed
    })
}

/// `; the container exited with code N; last log lines: ...` for a container that failed.
fn container_diagnosis(r: &dyn Remote, name: &str) -> String {
    let mut m = String::new();
    if let Ok(st) = docker::state(r, name) {
        if st.exists && !st.running {
            m.push_str(&format!(
                "; the container exited with code {}",
                st.exit_code.unwrap_or(-1)
            ));
        }
        if !st.logs.is_empty() {
            let tail: Vec<&str> = st.logs.lines().collect();
            m.push_str(&format!(
                "; last log lines: {}",
                tail[tail.len().saturating_sub(5)..].join(" | ")
            ));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_watchdog_templates_have_every_placeholder_filled() {
        // Script::new panics on a missing or unused value: build each once.
        let vals = [
            "pidfile", "grace", "cport", "bin", "dir", "to", "old", "flip", "resume",
        ];
        let args: Vec<(&str, &str)> = vals.iter().map(|k| (*k, "x")).collect();
        let armed = Script::new(HOLD_WATCHDOG, &args);
        assert!(armed.text().contains("sed \"s/@PORT@/$p/\""));
        let _ = Script::new(HOLD_DISARM, &[("pidfile", "/p")]);
    }
}

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

use super::{HostCx, Pinned, SwitchError, Switcher, Target};
use crate::deploy::{DeployError, Recorder, Via};
use crate::gate::{run_gate, GateSpec};
use crate::par_map;
use cutover_core::config::ContainerApp;
use cutover_core::container::Strategy;
use cutover_core::{Config, State, Step};
use cutover_docker as docker;
use cutover_proxy_wire::{
    CanaryRequest, DeployOptions, DeployRequest, Request, Response, StatsReport, TargetStats,
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
    let json = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let bin = remote_binary(app);
    let s = Script::new(
        PROXY_REQUEST,
        &[
            ("req", &json),
            ("bin", &bin),
            ("dir", &app.proxy.install_dir),
        ],
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
        docker::list(h.remote, self.app())
            .map(|list| {
                list.iter()
                    .filter(|c| c.state == "running")
                    .filter_map(|c| c.labels.get("cutover.release").cloned())
                    .collect()
            })
            .unwrap_or_default()
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

    /// The probing bake (so that a bake never passes on no data), judged together with the
    /// proxy's own counts of real requests over the same window: the new release fails when
    /// its error rate is above `max_error_rate` and above the old release's, or its p99 is
    /// above `max_p99`. A canary is promoted once its bake passed.
    fn bake(
        &self,
        h: &HostCx<'_>,
        from: Option<&Target<Snapshot>>,
        to: &Target<Snapshot>,
        window: Duration,
        max_error_rate: f64,
    ) -> Result<String, String> {
        let r = h.remote;
        // A proxy too old to count answers an error: the probes alone judge.
        let before = self.stats(r).ok();
        let probed = super::probing_bake(self, h, to, window, max_error_rate);
        let after = before.as_ref().and_then(|_| self.stats(r).ok());
        let canary = after
            .as_ref()
            .and_then(|a| a.role("canary"))
            .map(|c| c.target.clone());
        let judged = match (&before, &after) {
            (Some(b), Some(a)) => judge(
                b,
                a,
                canary.is_some(),
                &Releases {
                    new: &to.id,
                    old: from.map(|f| f.id.as_str()),
                },
                max_error_rate,
                self.config.deploy.max_p99,
            ),
            _ => Judged::NoCounts,
        };
        let verdict = match (judged, probed) {
            (Judged::Failed(why), Ok(p)) => Err(format!("{why} ({p})")),
            (Judged::Failed(why), Err(p)) => Err(format!("{why}; {p}")),
            (_, Err(p)) => Err(p),
            (Judged::Passed(m), Ok(p)) => Ok(format!("{m}; {p}")),
            (Judged::TooFew(m), Ok(p)) => Ok(format!("{m}: judged by probes, {p}")),
            (Judged::NoCounts, Ok(p)) => Ok(p),
        };
        let passed = verdict?;
        match canary {
            Some(target) => {
                let port = target
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| format!("canary target {target:?} has no port"))?;
                let m = self
                    .flip(r, port, &to.snap, 1)
                    .map_err(|e| format!("{passed}; promoting the canary failed: {}", e.text()))?;
                Ok(format!("{passed}; canary promoted to every request: {m}"))
            }
            None => Ok(passed),
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

    fn drop_failed(&self, h: &HostCx<'_>, failed: &Target<Snapshot>) {
        let _ = docker::remove(h.remote, &[self.name(failed)]);
    }

    fn retire(
        &self,
        h: &HostCx<'_>,
        _live: &Target<Snapshot>,
        from: Option<&Target<Snapshot>>,
        protect: &BTreeSet<String>,
    ) -> Result<(Vec<String>, String), String> {
        let r = h.remote;
        if let (Some(p), Strategy::BlueGreen) = (from, self.strategy()) {
            self.stop(r, &self.name(p));
        }
        let list = docker::list(r, self.app()).map_err(|e| e.message())?;
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

/// Fewer requests than this to the new release in a bake window: the probes judge.
const MIN_BAKE_REQUESTS: u64 = 20;

/// The releases a bake compares, for its messages.
struct Releases<'a> {
    new: &'a str,
    old: Option<&'a str>,
}

/// What the proxy's counts say about a bake.
#[derive(Debug, PartialEq)]
enum Judged {
    Passed(String),
    Failed(String),
    /// Too little traffic to judge (the message says how much).
    TooFew(String),
    /// The proxy reported no counts.
    NoCounts,
}

/// "12 of 240 requests failed (5.0%), p99 <= 20 ms"
fn describe(t: &TargetStats) -> String {
    let bad = t.errors_5xx + t.failures;
    let rate = t.error_rate().unwrap_or(0.0) * 100.0;
    let p99 = match t.p99_ms() {
        None => "no p99".to_string(),
        Some(u64::MAX) => format!(
            "p99 > {} ms",
            cutover_proxy_wire::LATENCY_BOUNDS_MS[cutover_proxy_wire::LATENCY_BOUNDS_MS.len() - 1]
        ),
        Some(ms) => format!("p99 <= {ms} ms"),
    };
    format!(
        "{bad} of {} requests failed ({rate:.1}%), {p99}",
        t.requests
    )
}

/// Judges a bake window from two stats reports of one host's proxy: with a canary the new
/// release is the canary and the old one the current target, over the same window; without,
/// the new release is the current target over the window and the old one the previous
/// target over its whole stint before the switch.
fn judge(
    before: &StatsReport,
    after: &StatsReport,
    canary: bool,
    releases: &Releases<'_>,
    max_error_rate: f64,
    max_p99: Option<Duration>,
) -> Judged {
    let (new_role, old_role) = if canary {
        ("canary", "current")
    } else {
        ("current", "previous")
    };
    let Some(new) = after.role(new_role) else {
        return Judged::NoCounts;
    };
    let new = new.since(before.role(new_role));
    let old = after.role(old_role).map(|o| {
        if canary {
            o.since(before.role(old_role))
        } else {
            o.clone()
        }
    });
    let old_name = releases.old.unwrap_or("(none)");
    let new_text = format!("new release {}: {}", releases.new, describe(&new));
    let old_text = match &old {
        Some(o) => format!("old release {old_name}: {}", describe(o)),
        None => format!("old release {old_name}: no counts"),
    };
    if new.requests < MIN_BAKE_REQUESTS {
        return Judged::TooFew(format!(
            "{new_text}; {old_text}; under {MIN_BAKE_REQUESTS} requests"
        ));
    }
    let new_rate = new.error_rate().unwrap_or(0.0);
    let old_rate = old.as_ref().and_then(|o| o.error_rate()).unwrap_or(0.0);
    if new_rate > max_error_rate && new_rate > old_rate {
        return Judged::Failed(format!(
            "{new_text}; {old_text}; above max_error_rate {max_error_rate} and the old release's rate"
        ));
    }
    if let (Some(limit), Some(p99)) = (max_p99, new.p99_ms()) {
        if u128::from(p99) > limit.as_millis() {
            return Judged::Failed(format!(
                "{new_text}; {old_text}; p99 above max_p99 {}",
                cutover_core::duration::format_duration(limit)
            ));
        }
    }
    Judged::Passed(format!(
        "{new_text}; {old_text}; within max_error_rate {max_error_rate}"
    ))
}

#[cfg(test)]
mod bake_tests {
    use super::*;
    use cutover_proxy_wire::LATENCY_BOUNDS_MS;

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
        }
    }

    const R: Releases<'static> = Releases {
        new: "r2",
        old: Some("r1"),
    };

    #[test]
    fn a_new_release_failing_more_than_allowed_and_than_the_old_one_fails() {
        let before = report(vec![t(2, "current", 0, 0, 0), t(1, "previous", 1000, 2, 0)]);
        let after = report(vec![
            t(2, "current", 200, 40, 0),
            t(1, "previous", 1000, 2, 0),
        ]);
        assert_eq!(
            judge(&before, &after, false, &R, 0.01, None),
            Judged::Failed(
                "new release r2: 40 of 200 requests failed (20.0%), p99 <= 1 ms; old release r1: 2 of 1000 requests failed (0.2%), p99 <= 1 ms; above max_error_rate 0.01 and the old release's rate".into()
            )
        );
        // The old release failed as often: not the new release's fault.
        let bad_old = report(vec![
            t(2, "current", 200, 40, 0),
            t(1, "previous", 1000, 300, 0),
        ]);
        assert!(matches!(
            judge(&before, &bad_old, false, &R, 0.01, None),
            Judged::Passed(_)
        ));
    }

    #[test]
    fn a_canary_is_compared_with_the_old_release_over_the_same_window() {
        let before = report(vec![t(1, "current", 5000, 500, 0), t(2, "canary", 0, 0, 0)]);
        let after = report(vec![
            t(1, "current", 5900, 501, 0),
            t(2, "canary", 100, 3, 0),
        ]);
        // 3% on the canary against 0.1% on the old release in the window (not its 10% before).
        match judge(&before, &after, true, &R, 0.02, None) {
            Judged::Failed(m) => assert!(
                m.contains("old release r1: 1 of 900 requests failed (0.1%)"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn little_traffic_is_left_to_the_probes_and_p99_is_bounded() {
        let before = report(vec![t(2, "current", 0, 0, 0)]);
        let few = report(vec![t(2, "current", 19, 19, 0)]);
        assert!(matches!(
            judge(&before, &few, false, &R, 0.01, None),
            Judged::TooFew(m) if m.ends_with("under 20 requests")
        ));
        let slow = report(vec![t(2, "current", 100, 0, 5)]);
        assert_eq!(
            judge(&before, &slow, false, &R, 0.01, Some(Duration::from_millis(200))),
            Judged::Failed(
                "new release r2: 0 of 100 requests failed (0.0%), p99 <= 500 ms; old release r1: no counts; p99 above max_p99 200ms".into()
            )
        );
        assert!(matches!(
            judge(
                &before,
                &slow,
                false,
                &R,
                0.01,
                Some(Duration::from_secs(1))
            ),
            Judged::Passed(_)
        ));
    }
}

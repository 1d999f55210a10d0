//! The deploy protocol for container apps: the same lock, runs, events, history, exit codes and
//! all-or-nothing rule as files apps, with the switch done by cutover's own edge proxy on each
//! host (one pointer swap, never a config reload).
//!
//! * **stage** (every host): `docker pull` (the old release keeps serving) and resolve the
//!   digest (every host must agree); blue-green also starts `<app>-<release>` on a loopback port
//!   and gates it directly. A release is the digest plus a config snapshot (env, volumes, port,
//!   health); a mutable tag is never the rollback anchor.
//! * **switch** (every host, only when every host staged): blue-green asks the proxy to gate the
//!   new target once more and swap to it, draining the old; hold pauses the service in the
//!   proxy, stops the old container, starts the new one, gates and swaps, and resumes (held
//!   requests are answered by the new container).
//! * **verify** every host through its proxy; **commit** (stop the old container, kept for a
//!   warm rollback; prune beyond `keep`) or **revert** every switched host to the old container.
//!
//! **Invariant:** the old container keeps running (blue-green) until every host verified the new
//! one, so a revert is a proxy swap back, not a container start.

use crate::gate::{run_gate, GateSpec};
use crate::hostops::{self, HostLock, OpError, Prepared};
use crate::protocol::{facts, next_release_id, pick_rollback_target, HostOutcome, Outcome};
use crate::{crash_point, exit, identity, now_utc, par_map, Hosts, Phase, Reporter};
use cutover_core::config::ContainerApp;
use cutover_core::container::Strategy;
use cutover_core::plan;
use cutover_core::Config;
use cutover_docker as docker;
use cutover_proxy::{DeployOptions, DeployRequest, Request, Response};
use cutover_remote::{Remote, Script};
use cutover_store::{Holder, NewRelease, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What to run for a container app.
#[derive(Debug, Clone)]
pub enum ContainerRequest {
    /// `deploy --image TAG` or `--image @sha256:...`.
    Deploy {
        image: String,
    },
    Rollback {
        to: Option<String>,
    },
    /// `deploy --ref REF`: build the commit's image ([build] dockerfile), push it as
    /// `<image>:<full sha>` and deploy that digest. Mirror and build directories are in
    /// `data_dir`.
    Build {
        git_ref: String,
        data_dir: std::path::PathBuf,
    },
}

/// Where a deployed image came from, when it was built from git.
struct Origin {
    commit: String,
    subject: String,
    source: String,
}

/// A release's config, recorded with it and restored by a rollback.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Snapshot {
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

fn snapshot(config: &Config, app: &ContainerApp, image: &str) -> Snapshot {
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

/// Records events of one run (database first, then the reporter).
struct Rec<'a> {
    store: &'a Store,
    reporter: &'a dyn Reporter,
    app: &'a str,
    run_id: i64,
    release_id: std::sync::Mutex<String>,
    names: Vec<String>,
}

impl Rec<'_> {
    fn host(&self, i: usize) -> &str {
        &self.names[i]
    }

    fn rel(&self) -> String {
        self.release_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn ev(&self, host: Option<&str>, step: &str, phase: Phase, detail: &str) {
        self.reporter.step(host, step, phase, detail);
        let _ = self.store.event(
            self.run_id,
            self.app,
            &self.rel(),
            host,
            step,
            phase.as_str(),
            &now_utc(),
            detail,
        );
    }

    fn outcome(&self, i: usize, outcome: &str) {
        let _ = self
            .store
            .set_host_outcome(self.app, &self.rel(), self.host(i), outcome);
    }
}

/// Runs a container deploy or rollback to the end.
pub fn run(
    config: &Config,
    store: &Store,
    reporter: &dyn Reporter,
    req: ContainerRequest,
) -> Outcome {
    let app = config.app.as_str();
    let kind = match req {
        ContainerRequest::Deploy { .. } | ContainerRequest::Build { .. } => "deploy",
        ContainerRequest::Rollback { .. } => "rollback",
    };
    let Some(capp) = config.container.as_ref() else {
        return Outcome::refused(
            kind,
            app,
            exit::USAGE,
            "not a container app: use --artifact for [files] apps".into(),
        );
    };
    if let ContainerRequest::Deploy { image } = &req {
        let ok = !image.is_empty()
            && !image.starts_with('-')
            && image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:@".contains(c));
        if !ok || image.contains('/') {
            return Outcome::refused(kind, app, exit::USAGE, format!("--image takes a tag (e.g. v1.2) or @sha256:DIGEST of {}, got {image:?}; nothing was touched", capp.container.image));
        }
    }
    let build = match (&req, config.build.as_ref()) {
        (ContainerRequest::Build { .. }, Some(b)) if b.docker.is_some() => Some(b),
        (ContainerRequest::Build { .. }, _) => {
            return Outcome::refused(
                kind,
                app,
                exit::USAGE,
                format!(
                    "`deploy --ref` builds an image from git and needs a [build] section with `repo` and `dockerfile` in {}. Nothing was touched.",
                    config.file.display()
                ),
            )
        }
        _ => None,
    };
    let me = match crate::protocol::lock_app(store, app, kind, reporter) {
        Ok(me) => me,
        Err(refused) => return *refused,
    };
    let out = match (&req, build) {
        (ContainerRequest::Build { git_ref, data_dir }, Some(b)) => {
            build_then_deploy(config, capp, store, reporter, b, git_ref, data_dir, &me)
        }
        _ => locked(config, capp, store, reporter, &req, &me, kind, None),
    };
    let _ = store.release_lock(app, &me);
    out
}

/// `deploy --ref` of a container app: the run starts (the build's steps and output are its
/// events), the image is built and pushed (or an earlier build's digest reused), and only
/// then are hosts connected, to deploy exactly the pushed digest. A failed build touches no
/// host.
#[allow(clippy::too_many_arguments)]
fn build_then_deploy(
    config: &Config,
    capp: &ContainerApp,
    store: &Store,
    reporter: &dyn Reporter,
    build: &cutover_core::BuildConfig,
    git_ref: &str,
    data_dir: &std::path::Path,
    me: &Holder,
) -> Outcome {
    let app = config.app.as_str();
    let live = store.live(app).ok().flatten();
    let run_id = match store.start_run(app, "deploy", "pending", live.as_deref(), &now_utc()) {
        Ok(id) => id,
        Err(e) => return Outcome::refused("deploy", app, exit::NEEDS_PERSON, e.to_string()),
    };
    let events = crate::build::Events {
        store,
        reporter,
        app,
        run_id,
    };
    match crate::build::build_image(config, build, store, data_dir, git_ref, &events) {
        Ok(built) => {
            let origin = Origin {
                commit: built.commit.sha,
                subject: built.commit.subject,
                source: built.source,
            };
            let req = ContainerRequest::Deploy {
                image: format!("@{}", built.digest),
            };
            locked(
                config,
                capp,
                store,
                reporter,
                &req,
                me,
                "deploy",
                Some((run_id, origin)),
            )
        }
        Err(f) => crate::build::failed_outcome(f, &events, live),
    }
}

/// One host's staged release: the container to switch to and its loopback port (blue-green).
#[derive(Debug, Clone, Default)]
struct Staged {
    port: Option<u16>,
    /// The container existed before this run (warm rollback): stop it on failure, never remove.
    warm: bool,
}

/// The run after the app lock: `built` is the run a `deploy --ref` already started (its build
/// steps are in it) and where the image came from.
#[allow(clippy::too_many_lines, clippy::too_many_arguments)]
fn locked(
    config: &Config,
    capp: &ContainerApp,
    store: &Store,
    reporter: &dyn Reporter,
    req: &ContainerRequest,
    me: &Holder,
    kind: &str,
    built: Option<(i64, Origin)>,
) -> Outcome {
    let (started_run, origin) = match built {
        Some((id, o)) => (Some(id), Some(o)),
        None => (None, None),
    };
    let app = config.app.as_str();
    let fatal = |m: String| Outcome::refused(kind, app, exit::NEEDS_PERSON, m);
    let interrupted = match store.unfinished_runs(app) {
        Ok(r) => r,
        Err(e) => return fatal(e.to_string()),
    };
    let releases = match store.releases(app) {
        Ok(r) => r,
        Err(e) => return fatal(e.to_string()),
    };
    let live = store.live(app).ok().flatten();
    let strategy = capp.container.strategy;

    // Rollback: the target and its recorded config. Deploy: known after the pull.
    let mut target: Option<(String, Snapshot)> = None;
    if let ContainerRequest::Rollback { to } = req {
        let t = match pick_rollback_target(app, &releases, live.as_deref(), to.as_deref()) {
            Ok(t) => t,
            Err(m) => return Outcome::refused(kind, app, exit::USAGE, m),
        };
        let Ok(snap) = serde_json::from_str::<Snapshot>(&t.snapshot) else {
            return Outcome::refused(
                kind,
                app,
                exit::USAGE,
                format!("release {} has no container snapshot", t.id),
            );
        };
        target = Some((t.id.clone(), snap));
    }
    let previous: Option<(String, Snapshot)> = live
        .as_ref()
        .and_then(|l| releases.iter().find(|r| &r.id == l))
        .and_then(|r| {
            serde_json::from_str::<Snapshot>(&r.snapshot)
                .ok()
                .map(|s| (r.id.clone(), s))
        });

    let pending = target
        .as_ref()
        .map(|t| t.0.clone())
        .unwrap_or_else(|| "pending".into());
    let run_id = match started_run {
        Some(id) => id,
        None => match store.start_run(app, kind, &pending, live.as_deref(), &now_utc()) {
            Ok(id) => id,
            Err(e) => return fatal(e.to_string()),
        },
    };
    let names: Vec<String> = config.hosts.iter().map(|(h, _)| h.clone()).collect();
    let rec = Rec {
        store,
        reporter,
        app,
        run_id,
        release_id: std::sync::Mutex::new(pending),
        names,
    };
    let mut result = Outcome {
        kind: kind.into(),
        app: app.into(),
        release: target.as_ref().map(|t| t.0.clone()),
        previous: previous.as_ref().map(|p| p.0.clone()),
        status: "failed".into(),
        exit_code: exit::FAILED,
        message: String::new(),
        hosts: config
            .hosts
            .iter()
            .map(|(h, _)| (h.clone(), HostOutcome::default()))
            .collect(),
        commit: origin.as_ref().map(|o| o.commit.clone()),
        commit_subject: origin.as_ref().map(|o| o.subject.clone()),
    };
    let is_new = matches!(req, ContainerRequest::Deploy { .. });
    let finish =
        |result: &mut Outcome, rel: Option<&str>, status: &str, code: i32, message: String| {
            if let Some(rel) = rel {
                if is_new || status == "partial" {
                    let _ = store.set_status(app, rel, status, Some(&now_utc()));
                }
            }
            result.status = status.into();
            result.exit_code = code;
            result.message = message;
            let _ = store.finish_run(run_id, status, &now_utc());
            rec.ev(
                None,
                "run",
                if code == 0 {
                    Phase::Done
                } else {
                    Phase::Failed
                },
                &result.message,
            );
        };
    if kind == "rollback" {
        if let Some(l) = &live {
            let _ = store.set_bad(app, l, true);
            rec.ev(None, "mark-bad", Phase::Done, l);
        }
    }

    // Connect and lock every host.
    let hosts = match Hosts::new(config) {
        Ok(h) => h,
        Err(e) => {
            finish(
                &mut result,
                None,
                "failed",
                exit::FAILED,
                format!("cannot prepare SSH control sockets: {e}"),
            );
            return result;
        }
    };
    let n = hosts.len();
    let parallel = config.ssh.parallel;
    let root = config.files.root.as_str();
    let my_line = identity::to_line(me);
    let prepared: Vec<Result<Prepared, String>> = par_map(n, parallel, |i| {
        let r = hosts.get(i);
        rec.ev(Some(rec.host(i)), "connect", Phase::Start, "");
        if let Err(e) = r.connect() {
            rec.ev(Some(rec.host(i)), "connect", Phase::Failed, &e.to_string());
            return Err(e.to_string());
        }
        rec.ev(Some(rec.host(i)), "prepare", Phase::Start, root);
        let mut p = hostops::prepare(r, root, &my_line);
        if let Ok(Prepared {
            lock: HostLock::Held(line),
            ..
        }) = &p
        {
            if let Some(h) = identity::from_line(line).filter(|h| !identity::alive(h)) {
                reporter.note(&format!(
                    "{}: taking over the host lock of a process that is gone: {}",
                    rec.host(i),
                    identity::describe(&h)
                ));
                p = hostops::take_over(r, root, line, &my_line);
            }
        }
        p.map_err(|e: OpError| e.to_string())
    });
    let locked_hosts: Vec<usize> = (0..n)
        .filter(|&i| {
            matches!(
                &prepared[i],
                Ok(Prepared {
                    lock: HostLock::Acquired,
                    ..
                })
            )
        })
        .collect();
    let unlock = || {
        par_map(locked_hosts.len(), parallel, |k| {
            let _ = hostops::finish(hosts.get(locked_hosts[k]), root, &my_line, &[]);
        });
    };
    let mut problems = Vec::new();
    let mut held = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        match p {
            Err(e) => {
                let h = result.hosts.get_mut(rec.host(i)).expect("host");
                h.outcome = "unreachable".into();
                h.detail = Some(e.clone());
                problems.push(format!("{}: {e}", rec.host(i)));
            }
            Ok(Prepared {
                lock: HostLock::Held(line),
                ..
            }) => held.push(format!(
                "{}: {}",
                rec.host(i),
                identity::from_line(line)
                    .map(|h| identity::describe(&h))
                    .unwrap_or_else(|| line.clone())
            )),
            Ok(_) => {}
        }
    }
    if !problems.is_empty() || !held.is_empty() {
        unlock();
        if problems.is_empty() {
            finish(
                &mut result,
                None,
                "failed",
                exit::LOCKED,
                format!(
                    "another deploy of app `{app}` holds the lock on:\n  {}",
                    held.join("\n  ")
                ),
            );
        } else {
            finish(
                &mut result,
                None,
                "failed",
                exit::FAILED,
                format!(
                    "hosts are not ready, so no host was touched:\n  {}",
                    problems.join("\n  ")
                ),
            );
        }
        return result;
    }
    for run in interrupted.iter().filter(|r| r.id != run_id) {
        if run.kind == "deploy" {
            let _ = store.set_status(app, &run.release_id, "failed", Some(&now_utc()));
        }
        let _ = store.finish_run(run.id, "interrupted", &now_utc());
        let msg = format!(
            "reconciled an interrupted {} of {}",
            run.kind, run.release_id
        );
        reporter.note(&msg);
        rec.ev(None, "reconcile", Phase::Done, &msg);
    }

    // Stage: pull (deploy: resolve the digest every host must agree on).
    let (release_id, snap) = match (req, target.clone()) {
        (ContainerRequest::Deploy { image }, _) => {
            let reference = if let Some(d) = image.strip_prefix('@') {
                format!("{}@{d}", capp.container.image)
            } else {
                format!("{}:{image}", capp.container.image)
            };
            rec.ev(None, "pull", Phase::Start, &reference);
            let pulled = par_map(n, parallel, |i| {
                rec.ev(Some(rec.host(i)), "pull", Phase::Start, &reference);
                let p = docker::pull(hosts.get(i), &reference).map_err(|e| e.message());
                match &p {
                    Ok(p) => rec.ev(Some(rec.host(i)), "pull", Phase::Done, &p.reference),
                    Err(e) => rec.ev(Some(rec.host(i)), "pull", Phase::Failed, e),
                }
                p
            });
            let errors: Vec<String> = pulled
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().err().map(|e| format!("{}: {e}", rec.host(i))))
                .collect();
            if !errors.is_empty() {
                unlock();
                finish(
                    &mut result,
                    None,
                    "failed",
                    exit::FAILED,
                    format!(
                        "pulling {reference} failed, so nothing was switched anywhere:\n  {}",
                        errors.join("\n  ")
                    ),
                );
                return result;
            }
            let digests: BTreeSet<&str> = pulled
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .map(|p| p.reference.as_str())
                .collect();
            if digests.len() != 1 {
                unlock();
                finish(&mut result, None, "failed", exit::NEEDS_PERSON, format!("hosts resolved {reference} to different digests: {digests:?}; nothing was switched"));
                return result;
            }
            let pinned = digests.into_iter().next().expect("one").to_string();
            let hex = pinned.rsplit(':').next().unwrap_or("").to_string();
            let id = next_release_id(&releases, &hex);
            let snap = snapshot(config, capp, &pinned);
            let _ = store.insert_release(&NewRelease {
                id: &id,
                app,
                created_at: &now_utc(),
                artifact_sha256: &hex,
                commit: origin.as_ref().map(|o| o.commit.as_str()),
                commit_subject: origin.as_ref().map(|o| o.subject.as_str()),
                source: origin
                    .as_ref()
                    .map_or(reference.as_str(), |o| o.source.as_str()),
                snapshot: &serde_json::to_string(&snap).unwrap_or_default(),
            });
            let _ = store.set_run_release(run_id, &id);
            *rec.release_id.lock().unwrap_or_else(|p| p.into_inner()) = id.clone();
            result.release = Some(id.clone());
            (id, snap)
        }
        (ContainerRequest::Rollback { .. }, Some(t)) => t,
        (ContainerRequest::Rollback { .. }, None) => unreachable!("rollback has a target"),
        (ContainerRequest::Build { .. }, _) => unreachable!("built before locked()"),
    };
    let new_name = container_name(app, &release_id);
    let labels = vec![
        ("cutover.app".to_string(), app.to_string()),
        ("cutover.release".to_string(), release_id.clone()),
    ];
    let spec = docker::ContainerSpec {
        name: &new_name,
        image: &snap.image,
        port: snap.port,
        env: &snap.env,
        volumes: &snap.volumes,
        labels: &labels,
    };

    // Blue-green: start the new container beside the old one and gate it directly.
    let staged: Vec<Result<Staged, String>> = par_map(n, parallel, |i| {
        let r = hosts.get(i);
        let host = rec.host(i);
        let existing = docker::state(r, &new_name).map_err(|e| e.message())?;
        if strategy == Strategy::Hold {
            if !existing.exists {
                // Cold: make sure the image is on the host (a rollback may need to pull it again).
                docker::pull(r, &snap.image).map_err(|e| e.message())?;
            }
            rec.ev(
                Some(host),
                "stage",
                Phase::Done,
                if existing.exists {
                    "container kept from before"
                } else {
                    "image pulled"
                },
            );
            return Ok(Staged {
                port: None,
                warm: existing.exists,
            });
        }
        rec.ev(Some(host), "start", Phase::Start, &new_name);
        let port = if existing.exists {
            docker::start(r, &new_name, snap.port)
        } else {
            docker::pull(r, &snap.image).and_then(|_| docker::run(r, &spec))
        };
        let port = match port {
            Ok(p) => p,
            Err(e) => {
                let m = format!("{}{}", e.message(), container_diagnosis(r, &new_name));
                rec.ev(Some(host), "start", Phase::Failed, &m);
                return Err(m);
            }
        };
        rec.ev(
            Some(host),
            "start",
            Phase::Done,
            &format!("127.0.0.1:{port}"),
        );
        rec.ev(
            Some(host),
            "gate",
            Phase::Start,
            &format!("127.0.0.1:{port}{}", snap.health_path),
        );
        let g = r
            .forward("127.0.0.1", port)
            .map_err(|e| e.to_string())
            .map(|ep| run_gate(&ep, &snap.gate()));
        match g {
            Ok(g) if g.healthy => {
                rec.ev(
                    Some(host),
                    "gate",
                    Phase::Done,
                    &format!("healthy in {:.1}s", g.elapsed.as_secs_f64()),
                );
                Ok(Staged {
                    port: Some(port),
                    warm: existing.exists,
                })
            }
            other => {
                let why = match other {
                    Ok(g) => format!(
                        "not healthy after {:.1}s; last answer: {}",
                        g.elapsed.as_secs_f64(),
                        g.last.describe()
                    ),
                    Err(e) => e,
                };
                let m = format!(
                    "new container {new_name}: {why}{}",
                    container_diagnosis(r, &new_name)
                );
                rec.ev(Some(host), "gate", Phase::Failed, &m);
                Err(m)
            }
        }
    });
    let stage_errors: Vec<String> = staged
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().err().map(|e| format!("{}: {e}", rec.host(i))))
        .collect();
    if !stage_errors.is_empty() {
        // Nothing was flipped: remove (or re-stop, if it was a kept one) the new containers.
        par_map(n, parallel, |i| {
            let r = hosts.get(i);
            let warm = staged[i].as_ref().map(|s| s.warm).unwrap_or(false);
            if warm {
                let _ = docker::stop(r, std::slice::from_ref(&new_name), 10);
            } else {
                let _ = docker::remove(r, std::slice::from_ref(&new_name));
            }
        });
        for (i, s) in staged.iter().enumerate() {
            let h = result.hosts.get_mut(rec.host(i)).expect("host");
            h.outcome = if s.is_ok() {
                "staged".into()
            } else {
                "stage_failed".into()
            };
            h.detail = s.as_ref().err().cloned();
            rec.outcome(i, &h.outcome);
        }
        unlock();
        finish(&mut result, Some(&release_id), "failed", exit::FAILED, format!("release {release_id} did not become healthy, so nothing was switched on any host; the new containers were removed:\n  {}", stage_errors.join("\n  ")));
        return result;
    }
    let staged: Vec<Staged> = staged.into_iter().map(|s| s.expect("checked")).collect();
    crash_point("after-stage");

    // Switch every host.
    let domains: Vec<String> = capp.container.domain.iter().cloned().collect();
    let prev_name = previous.as_ref().map(|p| container_name(app, &p.0));
    let switched: Vec<Result<String, String>> = par_map(n, parallel, |i| {
        let r = hosts.get(i);
        let host = rec.host(i);
        rec.ev(Some(host), "switch", Phase::Start, &new_name);
        let res = match strategy {
            Strategy::BlueGreen => {
                let port = staged[i].port.expect("blue-green stages a port");
                flip(r, capp, app, port, &snap, &domains, 1)
            }
            Strategy::Hold => hold_switch(
                r,
                capp,
                app,
                &new_name,
                &spec,
                staged[i].warm,
                prev_name.as_deref(),
                &snap,
                &domains,
            ),
        };
        match &res {
            Ok(m) => rec.ev(Some(host), "switch", Phase::Done, m),
            Err(e) => rec.ev(Some(host), "switch", Phase::Failed, e),
        }
        res
    });
    crash_point("after-switch");

    // Verify through each host's proxy.
    let verify = verify_all(&hosts, &rec, config, capp, parallel, &switched, "verify");
    let unhealthy: Vec<String> = verify
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_ref().err().map(|e| format!("{}: {e}", rec.host(i))))
        .collect();
    for (i, v) in verify.iter().enumerate() {
        let h = result.hosts.get_mut(rec.host(i)).expect("host");
        h.outcome = if v.is_ok() {
            "healthy".into()
        } else {
            "unhealthy".into()
        };
        h.detail = Some(match (&switched[i], v) {
            (Ok(s), Ok(m)) => format!("{s}; {m}"),
            (_, Err(e)) => e.clone(),
            (Err(e), _) => e.clone(),
        });
        rec.outcome(i, &h.outcome);
    }

    if unhealthy.is_empty() {
        let _ = store.set_status(app, &release_id, "succeeded", Some(&now_utc()));
        let _ = store.set_live(app, &release_id);
        rec.ev(None, "commit", Phase::Done, &release_id);
        // Stop the old container (kept for a warm rollback) and prune beyond `keep`.
        let after = store.releases(app).unwrap_or_default();
        let mut protect: BTreeSet<String> = BTreeSet::new();
        protect.insert(release_id.clone());
        if let Some(t) = plan::rollback_target(&facts(&after), Some(&release_id)) {
            protect.insert(t.id.clone());
        }
        if let Some((p, _)) = &previous {
            protect.insert(p.clone());
        }
        par_map(n, parallel, |i| {
            let r = hosts.get(i);
            if let Some(p) = &prev_name {
                if strategy == Strategy::BlueGreen {
                    let _ = docker::stop(
                        r,
                        std::slice::from_ref(p),
                        capp.container.stop_timeout.as_secs() as u32,
                    );
                }
            }
            if let Ok(list) = docker::list(r, app) {
                let ids: Vec<String> = list
                    .iter()
                    .filter_map(|c| c.labels.get("cutover.release").cloned())
                    .collect();
                let del = plan::prune(&ids, capp.container.keep, &protect);
                let names: Vec<String> = del.iter().map(|d| container_name(app, d)).collect();
                let _ = docker::remove(r, &names);
                rec.ev(Some(rec.host(i)), "prune", Phase::Done, &names.join(" "));
            }
        });
        unlock();
        let what = if kind == "rollback" {
            "rolled back to"
        } else {
            "deployed"
        };
        finish(&mut result, Some(&release_id), "succeeded", exit::OK, format!("{what} {release_id} ({}) on {n} host(s) with {}; every host passed its health gate through the proxy", snap.image, strategy.as_str()));
        return result;
    }

    // Revert every host to the previous release.
    let Some((prev_id, prev_snap)) = previous.clone() else {
        unlock();
        finish(&mut result, Some(&release_id), "failed", exit::FAILED, format!("release {release_id} failed its health gate and app `{app}` has no previous release to go back to (first deploy), so the proxies point at it:\n  {}\nFix the image or the [health] settings and deploy again.", unhealthy.join("\n  ")));
        return result;
    };
    reporter.note(&format!(
        "release {release_id} is unhealthy; switching every host back to {prev_id}"
    ));
    let prev_container = container_name(app, &prev_id);
    let prev_labels = vec![
        ("cutover.app".to_string(), app.to_string()),
        ("cutover.release".to_string(), prev_id.clone()),
    ];
    let prev_spec = docker::ContainerSpec {
        name: &prev_container,
        image: &prev_snap.image,
        port: prev_snap.port,
        env: &prev_snap.env,
        volumes: &prev_snap.volumes,
        labels: &prev_labels,
    };
    let reverted: Vec<Result<String, String>> = par_map(n, parallel, |i| {
        let r = hosts.get(i);
        rec.ev(Some(rec.host(i)), "revert", Phase::Start, &prev_id);
        let res = match strategy {
            Strategy::BlueGreen => docker::start(r, &prev_container, prev_snap.port)
                .or_else(|_| docker::run(r, &prev_spec))
                .map_err(|e| e.to_string())
                .and_then(|port| flip(r, capp, app, port, &prev_snap, &domains, 1)),
            Strategy::Hold => hold_switch(
                r,
                capp,
                app,
                &prev_container,
                &prev_spec,
                true,
                Some(&new_name),
                &prev_snap,
                &domains,
            ),
        };
        if res.is_ok() {
            let _ = docker::remove(r, std::slice::from_ref(&new_name));
        }
        match &res {
            Ok(m) => rec.ev(Some(rec.host(i)), "revert", Phase::Done, m),
            Err(e) => rec.ev(Some(rec.host(i)), "revert", Phase::Failed, e),
        }
        res
    });
    let reverify = verify_all(
        &hosts,
        &rec,
        config,
        capp,
        parallel,
        &reverted,
        "revert-verify",
    );
    let failed: Vec<String> = reverify
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_ref().err().map(|e| format!("{}: {e}", rec.host(i))))
        .collect();
    unlock();
    if failed.is_empty() {
        let status = if is_new { "rolled_back" } else { "failed" };
        finish(&mut result, Some(&release_id), status, exit::FAILED, format!("release {release_id} failed its health gate:\n  {}\nEvery host was switched back to {prev_id} and passed its health gate again.", unhealthy.join("\n  ")));
    } else {
        finish(&mut result, Some(&release_id), "partial", exit::NEEDS_PERSON, format!("release {release_id} failed its health gate:\n  {}\nand switching back to {prev_id} failed on:\n  {}\nA person must look: `cutover status`, then `cutover rollback --to {prev_id}`.", unhealthy.join("\n  "), failed.join("\n  ")));
    }
    result
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

fn deploy_options(capp: &ContainerApp, snap: &Snapshot, healthy_after: u32) -> DeployOptions {
    DeployOptions {
        health_interval: Duration::from_millis(snap.interval_ms),
        healthy_after,
        give_up_after: Duration::from_millis(snap.give_up_after_ms),
        timeout: Duration::from_millis(snap.timeout_ms),
        drain: capp.proxy.drain,
    }
}

/// Asks the host's proxy to gate `127.0.0.1:port` and swap the app's target to it.
fn flip(
    r: &dyn Remote,
    capp: &ContainerApp,
    app: &str,
    port: u16,
    snap: &Snapshot,
    domains: &[String],
    healthy_after: u32,
) -> Result<String, String> {
    let req = Request::Deploy(DeployRequest {
        service: app.to_string(),
        target: format!("127.0.0.1:{port}"),
        health_path: snap.health_path.clone(),
        domains: domains.to_vec(),
        options: deploy_options(capp, snap, healthy_after),
    });
    match proxy_request(r, capp, &req)? {
        Response::Deployed(d) => Ok(format!(
            "proxy {} -> {} (gate {} ms, drained {} in {} ms)",
            d.previous.as_deref().unwrap_or("new"),
            d.target,
            d.health_ms,
            d.drained,
            d.drain_ms
        )),
        other => Err(format!("unexpected proxy answer: {other:?}")),
    }
}

/// A `hold` switch on one host: pause, stop `old`, start `new`, gate and swap, resume. If the
/// new container does not come up healthy, the old one is started and swapped back before
/// resuming, and the error is returned.
#[allow(clippy::too_many_arguments)]
fn hold_switch(
    r: &dyn Remote,
    capp: &ContainerApp,
    app: &str,
    new_name: &str,
    spec: &docker::ContainerSpec<'_>,
    new_exists: bool,
    old: Option<&str>,
    snap: &Snapshot,
    domains: &[String],
) -> Result<String, String> {
    let started = std::time::Instant::now();
    let paused = old.is_some();
    if paused {
        proxy_request(
            r,
            capp,
            &Request::Pause {
                service: app.to_string(),
                hold_ms: Some(capp.proxy.hold.as_millis() as u64),
                drain_ms: None,
            },
        )?;
    }
    let resume = || {
        if paused {
            let _ = proxy_request(
                r,
                capp,
                &Request::Resume {
                    service: app.to_string(),
                },
            );
        }
    };
    if let Some(o) = old {
        let _ = docker::stop(
            r,
            &[o.to_string()],
            capp.container.stop_timeout.as_secs() as u32,
        );
    }
    let port = if new_exists {
        docker::start(r, new_name, snap.port).or_else(|_| docker::run(r, spec))
    } else {
        docker::run(r, spec)
    };
    let flipped = port
        .map_err(|e| e.to_string())
        .and_then(|p| flip(r, capp, app, p, snap, domains, snap.healthy_after));
    match flipped {
        Ok(m) => {
            resume();
            Ok(format!(
                "{m}; requests held {} ms",
                started.elapsed().as_millis()
            ))
        }
        Err(e) => {
            let diagnosis = container_diagnosis(r, new_name);
            let _ = docker::remove(r, &[new_name.to_string()]);
            if let Some(o) = old {
                // Back to the old container before releasing held requests.
                if let Ok(p) = docker::start(r, o, snap.port) {
                    let _ = flip(r, capp, app, p, snap, domains, 1);
                }
            }
            resume();
            Err(format!("{e}{diagnosis}"))
        }
    }
}

/// GETs the health path through each switched host's proxy.
fn verify_all(
    hosts: &Hosts,
    rec: &Rec<'_>,
    config: &Config,
    capp: &ContainerApp,
    parallel: usize,
    switched: &[Result<String, String>],
    step: &str,
) -> Vec<Result<String, String>> {
    let url = &config.health.url;
    let spec = GateSpec {
        host_header: capp
            .container
            .domain
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into()),
        path: capp.health_path.clone(),
        expect: config.health.expect,
        timeout: config.health.timeout,
        interval: config.health.interval,
        healthy_after: config.health.healthy_after,
        give_up_after: config.health.give_up_after,
    };
    par_map(hosts.len(), parallel, |i| {
        if let Err(e) = &switched[i] {
            return Err(e.clone());
        }
        rec.ev(Some(rec.host(i)), step, Phase::Start, &url.to_string());
        let r = hosts
            .get(i)
            .forward(&url.host, url.port)
            .map_err(|e| e.to_string())
            .map(|ep| run_gate(&ep, &spec));
        let res = match r {
            Ok(g) if g.healthy => Ok(format!(
                "{url} through the proxy answered {} {} times",
                spec.expect, spec.healthy_after
            )),
            Ok(g) => Err(format!(
                "{url} through the proxy: not healthy after {:.1}s; last answer: {}",
                g.elapsed.as_secs_f64(),
                g.last.describe()
            )),
            Err(e) => Err(e),
        };
        match &res {
            Ok(m) => rec.ev(Some(rec.host(i)), step, Phase::Done, m),
            Err(e) => rec.ev(Some(rec.host(i)), step, Phase::Failed, e),
        }
        res
    })
}

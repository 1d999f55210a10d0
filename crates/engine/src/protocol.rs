//! The deploy protocol, shared by `deploy` and `rollback`: lock (database, then every host),
//! reconcile runs a crash interrupted, stage on every host, switch every host, gate every host,
//! then commit (record, prune, unlock) or revert every host to the previous release and gate
//! again. Every step is an event written before and after it runs.

use crate::artifact::{ArtifactStore, Limits};
use crate::gate::{run_gate, GateSpec};
use crate::hostops::{self, HostLock, OpError, Prepared};
use crate::{crash_point, exit, identity, now_secs, now_utc, par_map, Hosts, Phase, Reporter};
use cutover_core::config::HealthUrl;
use cutover_core::plan::{self, ReleaseFacts};
use cutover_core::{Config, ReleaseId};
use cutover_store::{Holder, LockOutcome, NewRelease, Release, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// What to run.
#[derive(Debug, Clone)]
pub enum RunRequest {
    /// Deploy the directory or `.tar.gz` at `artifact`.
    Deploy {
        artifact: PathBuf,
        commit: Option<String>,
    },
    /// Build the commit `git_ref` names ([build] in the config) and deploy the result. The
    /// app's git mirror and build directories live in `data_dir`.
    Build { git_ref: String, data_dir: PathBuf },
    /// Roll back to `to`, or to the newest release before the live one that succeeded
    /// everywhere and is not marked bad.
    Rollback { to: Option<String> },
}

/// What happened on one host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostOutcome {
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub uploaded_bytes: u64,
}

/// What a run did, for people and for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub kind: String,
    pub app: String,
    pub release: Option<String>,
    pub previous: Option<String>,
    pub status: String,
    pub exit_code: i32,
    pub message: String,
    pub hosts: BTreeMap<String, HostOutcome>,
    /// The full commit id of the release, when it was built from git.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_subject: Option<String>,
}

impl Outcome {
    pub(crate) fn refused(kind: &str, app: &str, code: i32, message: String) -> Outcome {
        Outcome {
            kind: kind.into(),
            app: app.into(),
            commit: None,
            commit_subject: None,
            release: None,
            previous: None,
            status: if code == exit::LOCKED {
                "locked".into()
            } else {
                "refused".into()
            },
            exit_code: code,
            message,
            hosts: BTreeMap::new(),
        }
    }
}

/// The part of a release that is config: restored together with the artifact on rollback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Settings {
    root: String,
    reload: Option<String>,
    health_url: String,
    expect: u16,
    timeout_ms: u64,
    interval_ms: u64,
    healthy_after: u32,
    give_up_after_ms: u64,
}

impl Settings {
    fn from_config(c: &Config) -> Settings {
        Settings {
            root: c.files.root.clone(),
            reload: c.files.reload.clone(),
            health_url: c.health.url.to_string(),
            expect: c.health.expect,
            timeout_ms: c.health.timeout.as_millis() as u64,
            interval_ms: c.health.interval.as_millis() as u64,
            healthy_after: c.health.healthy_after,
            give_up_after_ms: c.health.give_up_after.as_millis() as u64,
        }
    }

    /// The snapshot recorded with a release, falling back to today's config if unreadable.
    fn of_release(r: &Release, c: &Config) -> Settings {
        serde_json::from_str(&r.snapshot).unwrap_or_else(|_| Settings::from_config(c))
    }

    fn gate(&self) -> Result<(HealthUrl, GateSpec), String> {
        let url = HealthUrl::parse(&self.health_url)?;
        let host_header = if url.port == 80 {
            url.host.clone()
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let spec = GateSpec {
            host_header,
            path: url.path.clone(),
            expect: self.expect,
            timeout: Duration::from_millis(self.timeout_ms),
            interval: Duration::from_millis(self.interval_ms),
            healthy_after: self.healthy_after,
            give_up_after: Duration::from_millis(self.give_up_after_ms),
        };
        Ok((url, spec))
    }
}

struct Ctx<'a> {
    config: &'a Config,
    store: &'a Store,
    reporter: &'a dyn Reporter,
    app: &'a str,
    run_id: i64,
    release_id: String,
}

impl Ctx<'_> {
    fn host(&self, i: usize) -> &str {
        &self.config.hosts[i].0
    }

    /// Records a step (database first, then the reporter). A failure to record is fatal for
    /// steps that are about to change a host: callers check it there.
    fn ev(&self, host: Option<&str>, step: &str, phase: Phase, detail: &str) -> Result<(), String> {
        self.reporter.step(host, step, phase, detail);
        self.store
            .event(
                self.run_id,
                self.app,
                &self.release_id,
                host,
                step,
                phase.as_str(),
                &now_utc(),
                detail,
            )
            .map_err(|e| format!("cannot record the {step} step in the history: {e}"))
    }

    fn outcome(&self, host: usize, outcome: &str) {
        let _ = self
            .store
            .set_host_outcome(self.app, &self.release_id, self.host(host), outcome);
    }
}

/// Runs a deploy or a rollback to the end and says how it went.
pub fn run(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    req: RunRequest,
) -> Outcome {
    let kind = match req {
        RunRequest::Deploy { .. } | RunRequest::Build { .. } => "deploy",
        RunRequest::Rollback { .. } => "rollback",
    };
    let app = config.app.as_str();
    if let RunRequest::Build { .. } = &req {
        if config.build.is_none() {
            return Outcome::refused(
                kind,
                app,
                exit::USAGE,
                format!(
                    "`deploy --ref` builds from git and needs a [build] section (repo, command, output) in {}. Nothing was touched.",
                    config.file.display()
                ),
            );
        }
    }

    // Input first: a hostile or missing artifact is refused before anything is touched.
    let imported = match &req {
        RunRequest::Deploy { artifact, commit } => {
            let limits = Limits {
                max_unpacked_bytes: config.files.max_unpacked_bytes,
                max_entries: config.files.max_entries,
            };
            reporter.note(&format!("packing and checking {}", artifact.display()));
            match artifacts.import(artifact, &limits) {
                Ok(a) => Some(Imported {
                    artifact: a,
                    source: artifact.display().to_string(),
                    commit: commit.clone(),
                    commit_subject: None,
                }),
                Err(e) => {
                    return Outcome::refused(
                        kind,
                        app,
                        exit::USAGE,
                        format!("artifact refused: {e}. Nothing was touched."),
                    );
                }
            }
        }
        RunRequest::Rollback { .. } | RunRequest::Build { .. } => None,
    };

    let me = match lock_app(store, app, kind, reporter) {
        Ok(me) => me,
        Err(refused) => return *refused,
    };
    crash_point("after-lock");
    let out = match &req {
        RunRequest::Build { git_ref, data_dir } => build_then_deploy(
            config, store, artifacts, reporter, &req, git_ref, data_dir, &me,
        ),
        _ => locked(
            config, store, artifacts, reporter, &req, imported, &me, None,
        ),
    };
    let _ = store.release_lock(app, &me);
    out
}

/// Takes the app lock in the database for a `kind` run (deploy or rollback): a lock held by a
/// live process is exit 4 naming it; one left by a dead process is taken over and said so.
pub(crate) fn lock_app(
    store: &Store,
    app: &str,
    kind: &str,
    reporter: &dyn Reporter,
) -> Result<Holder, Box<Outcome>> {
    let me = identity::me(kind, &now_utc());
    match store.acquire_lock(app, &me, identity::alive) {
        Err(e) => Err(Box::new(Outcome::refused(
            kind,
            app,
            exit::NEEDS_PERSON,
            e.to_string(),
        ))),
        Ok(LockOutcome::Held(h)) => Err(Box::new(Outcome::refused(
            kind,
            app,
            exit::LOCKED,
            format!(
                "another run of app `{app}` holds the lock: {}. Wait for it to finish.",
                identity::describe(&h)
            ),
        ))),
        Ok(LockOutcome::TookOver(h)) => {
            reporter.note(&format!(
                "took over the lock of app `{app}` from a process that is gone: {}",
                identity::describe(&h)
            ));
            Ok(me)
        }
        Ok(LockOutcome::Acquired) => Ok(me),
    }
}

/// `deploy --ref`: the run starts (so the build's steps and output are its events), the
/// commit is built, and only then are hosts connected. A failed build touches no host.
#[allow(clippy::too_many_arguments)]
fn build_then_deploy(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    req: &RunRequest,
    git_ref: &str,
    data_dir: &std::path::Path,
    me: &Holder,
) -> Outcome {
    let app = config.app.as_str();
    let build_config = config.build.as_ref().expect("checked in run()");
    let live = store.live(app).ok().flatten();
    let run_id = match store.start_run(app, "deploy", "", live.as_deref(), &now_utc()) {
        Ok(id) => id,
        Err(e) => return Outcome::refused("deploy", app, exit::NEEDS_PERSON, e.to_string()),
    };
    let events = crate::build::Events {
        store,
        reporter,
        app,
        run_id,
    };
    match crate::build::build(
        config,
        build_config,
        store,
        artifacts,
        data_dir,
        git_ref,
        &events,
    ) {
        Ok(built) => {
            let imported = Imported {
                artifact: built.artifact,
                source: built.source,
                commit: Some(built.commit.sha.clone()),
                commit_subject: Some(built.commit.subject.clone()),
            };
            locked(
                config,
                store,
                artifacts,
                reporter,
                req,
                Some(imported),
                me,
                Some(run_id),
            )
        }
        Err(f) => crate::build::failed_outcome(f, &events, live),
    }
}

/// An artifact on its way to the hosts, and where it came from.
struct Imported {
    artifact: crate::artifact::StoredArtifact,
    source: String,
    commit: Option<String>,
    commit_subject: Option<String>,
}

pub(crate) fn facts(releases: &[Release]) -> Vec<ReleaseFacts> {
    releases
        .iter()
        .map(|r| ReleaseFacts {
            id: r.id.clone(),
            succeeded: r.status == "succeeded",
            bad: r.bad,
        })
        .collect()
}

/// A new release id for content `sha_hex`, newer than every recorded one: a release started
/// within the same second as the newest takes the next second, so history order and rollback
/// order never disagree.
pub(crate) fn next_release_id(releases: &[Release], sha_hex: &str) -> String {
    let newest = releases.iter().map(|r| r.id.as_str()).max().unwrap_or("");
    let mut now = now_secs();
    while ReleaseId::new(now, sha_hex, 0).as_str() <= newest {
        now += 1;
    }
    ReleaseId::new(now, sha_hex, 0).to_string()
}

/// The release a rollback goes to: `to` (an id or its last 7+ characters), or the newest
/// release before the live one that succeeded everywhere and is not marked bad. Never the live
/// one. `Err` is the message for an exit-2 refusal.
pub(crate) fn pick_rollback_target<'a>(
    app: &str,
    releases: &'a [Release],
    live: Option<&str>,
    to: Option<&str>,
) -> Result<&'a Release, String> {
    let target = match to {
        Some(t) => releases
            .iter()
            .find(|r| r.id == t || (t.len() >= 7 && r.id.ends_with(t)))
            .ok_or_else(|| format!("no release `{t}` in the history of app `{app}` (see `cutover history`)"))?,
        None => plan::rollback_target(&facts(releases), live)
            .and_then(|f| releases.iter().find(|r| r.id == f.id))
            .ok_or_else(|| format!("app `{app}` has no release before the live one that succeeded on every host and is not marked bad; nothing to roll back to (see `cutover history`)"))?,
    };
    if live == Some(target.id.as_str()) {
        return Err(format!("release {} is already live", target.id));
    }
    Ok(target)
}

#[allow(clippy::too_many_lines, clippy::too_many_arguments)]
fn locked(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    req: &RunRequest,
    imported: Option<Imported>,
    me: &Holder,
    started_run: Option<i64>,
) -> Outcome {
    let app = config.app.as_str();
    let kind = if imported.is_some() {
        "deploy"
    } else {
        "rollback"
    };
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

    // Which release this run puts on the hosts.
    let (release_id, settings, artifact_sha, new_release) = match (req, &imported) {
        (RunRequest::Deploy { .. } | RunRequest::Build { .. }, Some(imp)) => {
            let a = &imp.artifact;
            let id = next_release_id(&releases, &a.sha256);
            (id, Settings::from_config(config), a.sha256.clone(), true)
        }
        (RunRequest::Rollback { to }, _) => {
            let target = match pick_rollback_target(app, &releases, live.as_deref(), to.as_deref())
            {
                Ok(t) => t,
                Err(m) => return Outcome::refused(kind, app, exit::USAGE, m),
            };
            (
                target.id.clone(),
                Settings::of_release(target, config),
                target.artifact_sha256.clone(),
                false,
            )
        }
        (RunRequest::Deploy { .. } | RunRequest::Build { .. }, None) => {
            unreachable!("deploys always import")
        }
    };
    let previous = live
        .as_ref()
        .and_then(|l| releases.iter().find(|r| &r.id == l))
        .map(|r| (r.id.clone(), Settings::of_release(r, config)));

    let run_id = match started_run {
        Some(id) => match store.set_run_release(id, &release_id) {
            Ok(()) => id,
            Err(e) => {
                let _ = store.finish_run(id, "failed", &now_utc());
                return fatal(e.to_string());
            }
        },
        None => match store.start_run(app, kind, &release_id, live.as_deref(), &now_utc()) {
            Ok(id) => id,
            Err(e) => return fatal(e.to_string()),
        },
    };
    let ctx = Ctx {
        config,
        store,
        reporter,
        app,
        run_id,
        release_id: release_id.clone(),
    };
    let mut result = Outcome {
        kind: kind.into(),
        app: app.into(),
        release: Some(release_id.clone()),
        previous: previous.as_ref().map(|p| p.0.clone()),
        status: "failed".into(),
        exit_code: exit::FAILED,
        message: String::new(),
        commit: imported.as_ref().and_then(|i| i.commit.clone()),
        commit_subject: imported.as_ref().and_then(|i| i.commit_subject.clone()),
        hosts: config
            .hosts
            .iter()
            .map(|(h, _)| (h.clone(), HostOutcome::default()))
            .collect(),
    };
    let finish = |result: &mut Outcome, status: Option<&str>, code: i32, message: String| {
        if let Some(s) = status {
            if new_release || s == "partial" {
                let _ = store.set_status(app, &release_id, s, Some(&now_utc()));
            }
            result.status = s.into();
        }
        result.exit_code = code;
        result.message = message;
        let _ = store.finish_run(run_id, &result.status, &now_utc());
        let _ = ctx.ev(
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

    if new_release {
        let imp = imported.as_ref().expect("deploy");
        let snapshot = serde_json::to_string(&settings).unwrap_or_default();
        if let Err(e) = store.insert_release(&NewRelease {
            id: &release_id,
            app,
            created_at: &now_utc(),
            artifact_sha256: &artifact_sha,
            commit: imp.commit.as_deref(),
            commit_subject: imp.commit_subject.as_deref(),
            source: &imp.source,
            snapshot: &snapshot,
        }) {
            finish(&mut result, None, exit::NEEDS_PERSON, e.to_string());
            return result;
        }
    }
    if kind == "rollback" {
        if let Some(l) = &live {
            let _ = store.set_bad(app, l, true);
            let _ = ctx.ev(None, "mark-bad", Phase::Done, l);
        }
    }

    // Connect.
    let hosts = match Hosts::new(config) {
        Ok(h) => h,
        Err(e) => {
            finish(
                &mut result,
                Some("failed"),
                exit::FAILED,
                format!("cannot prepare SSH control sockets: {e}"),
            );
            return result;
        }
    };
    let n = hosts.len();
    let parallel = config.ssh.parallel;
    let connected = par_map(n, parallel, |i| {
        let _ = ctx.ev(Some(ctx.host(i)), "connect", Phase::Start, "");
        let r = hosts.get(i).connect();
        match &r {
            Ok(()) => {
                let _ = ctx.ev(Some(ctx.host(i)), "connect", Phase::Done, "");
            }
            Err(e) => {
                let _ = ctx.ev(Some(ctx.host(i)), "connect", Phase::Failed, &e.to_string());
            }
        }
        r
    });
    let unreachable: Vec<String> = connected
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .map(|(i, e)| {
            ctx.outcome(i, "unreachable");
            let h = result.hosts.get_mut(ctx.host(i)).expect("host");
            h.outcome = "unreachable".into();
            h.detail = Some(e.to_string());
            e.to_string()
        })
        .collect();
    if !unreachable.is_empty() {
        let msg = format!(
            "{} of {n} hosts could not be used, so no host was touched:\n  {}",
            unreachable.len(),
            unreachable.join("\n  ")
        );
        finish(&mut result, Some("failed"), exit::FAILED, msg);
        return result;
    }

    // Prepare: host checks and host locks.
    let root = config.files.root.as_str();
    let my_line = identity::to_line(me);
    let prepared: Vec<Result<Prepared, OpError>> = par_map(n, parallel, |i| {
        let r = hosts.get(i);
        let _ = ctx.ev(Some(ctx.host(i)), "prepare", Phase::Start, root);
        let mut p = hostops::prepare(r, root, &my_line);
        if let Ok(Prepared {
            lock: HostLock::Held(line),
            ..
        }) = &p
        {
            if let Some(h) = identity::from_line(line).filter(|h| !identity::alive(h)) {
                reporter.note(&format!(
                    "{}: taking over the host lock of a process that is gone: {}",
                    ctx.host(i),
                    identity::describe(&h)
                ));
                let _ = ctx.ev(Some(ctx.host(i)), "lock-takeover", Phase::Done, line);
                p = hostops::take_over(r, root, line, &my_line);
            }
        }
        let _ = match &p {
            Ok(p) => ctx.ev(
                Some(ctx.host(i)),
                "prepare",
                Phase::Done,
                &format!("current={:?} releases={}", p.current, p.releases.len()),
            ),
            Err(e) => ctx.ev(Some(ctx.host(i)), "prepare", Phase::Failed, &e.to_string()),
        };
        p
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
    let unlock = |which: &[usize]| {
        par_map(which.len(), parallel, |k| {
            let i = which[k];
            let _ = hostops::finish(hosts.get(i), root, &my_line, &[]);
        });
    };
    let held: Vec<String> = (0..n)
        .filter_map(|i| match &prepared[i] {
            Ok(Prepared { lock: HostLock::Held(line), .. }) => Some(format!(
                "{}: {}",
                ctx.host(i),
                identity::from_line(line).map(|h| identity::describe(&h)).unwrap_or_else(|| format!("unknown holder {line:?} (remove {root}/.cutover/lock on that host if no deploy runs)"))
            )),
            _ => None,
        })
        .collect();
    let errors: Vec<String> = (0..n)
        .filter_map(|i| {
            prepared[i]
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", ctx.host(i)))
        })
        .collect();
    if !errors.is_empty() || !held.is_empty() {
        unlock(&locked_hosts);
        if errors.is_empty() {
            finish(
                &mut result,
                Some("failed"),
                exit::LOCKED,
                format!(
                    "another deploy of app `{app}` holds the lock on:\n  {}",
                    held.join("\n  ")
                ),
            );
        } else {
            for (i, p) in prepared.iter().enumerate() {
                if let Err(e) = p {
                    ctx.outcome(i, "unprepared");
                    let h = result.hosts.get_mut(ctx.host(i)).expect("host");
                    h.outcome = "unprepared".into();
                    h.detail = Some(e.to_string());
                }
            }
            finish(
                &mut result,
                Some("failed"),
                exit::FAILED,
                format!(
                    "hosts are not ready, so no host was touched:\n  {}",
                    errors.join("\n  ")
                ),
            );
        }
        return result;
    }
    let prepared: Vec<Prepared> = prepared.into_iter().map(|p| p.expect("checked")).collect();

    // Reconcile runs that a crash interrupted: their events plus what the hosts serve now.
    for run in interrupted.iter().filter(|r| r.id != run_id) {
        let serving: Vec<&str> = (0..n)
            .filter(|&i| prepared[i].current.as_deref() == Some(run.release_id.as_str()))
            .map(|i| ctx.host(i))
            .collect();
        let events = store.events(run.id).unwrap_or_default();
        let last = events
            .last()
            .map(|e| format!("{} {}", e.step, e.phase))
            .unwrap_or_else(|| "nothing".into());
        let mut mark = "interrupted".to_string();
        if run.kind == "deploy" {
            let status = if serving.is_empty() {
                "failed"
            } else {
                "partial"
            };
            let _ = store.set_status(app, &run.release_id, status, Some(&now_utc()));
            mark = status.to_string();
        }
        let _ = store.finish_run(run.id, "interrupted", &now_utc());
        let msg = format!(
            "reconciled an interrupted {} of {} (last step: {last}): marked {mark}; hosts serving it: {}; stale .partial directories removed",
            run.kind,
            if run.release_id.is_empty() { "a release that was still building" } else { run.release_id.as_str() },
            if serving.is_empty() { "none".to_string() } else { serving.join(", ") }
        );
        reporter.note(&msg);
        let _ = ctx.ev(None, "reconcile", Phase::Done, &msg);
    }

    // Stage.
    let meta = serde_json::json!({
        "id": release_id,
        "app": app,
        "artifact_sha256": artifact_sha,
        "commit": imported.as_ref().and_then(|i| i.commit.clone()),
        "created": now_utc(),
        "config_digest": sha256_hex(&serde_json::to_string(&settings).unwrap_or_default()),
    })
    .to_string();
    if ctx.ev(None, "stage", Phase::Start, &release_id).is_err() {
        unlock(&locked_hosts);
        finish(
            &mut result,
            Some("failed"),
            exit::FAILED,
            "cannot write to the history database; no host was touched".into(),
        );
        return result;
    }
    let deltas = plan_deltas(
        store,
        artifacts,
        &ctx,
        app,
        &artifact_sha,
        &release_id,
        &prepared,
    );
    let staged: Vec<Result<u64, OpError>> = par_map(n, parallel, |i| {
        let host = ctx.host(i);
        if prepared[i].releases.contains(&release_id) {
            let _ = ctx.ev(
                Some(host),
                "stage",
                Phase::Done,
                "already on the host: nothing to upload",
            );
            return Ok(0);
        }
        let Some(art) = artifacts.get(&artifact_sha) else {
            let m = format!("release {release_id} is not on the host and its artifact {artifact_sha} is no longer in the artifact store");
            let _ = ctx.ev(Some(host), "stage", Phase::Failed, &m);
            return Err(OpError::Host(m));
        };
        let base = prepared[i].current.as_deref();
        if let Some(delta) = base.and_then(|b| deltas.get(b)) {
            let base = base.expect("a delta has a base");
            let _ = ctx.ev(
                Some(host),
                "stage",
                Phase::Start,
                &format!(
                    "{} bytes: a delta against release {base} ({} files sent, {} unchanged files hard-linked on the host)",
                    delta.size, delta.shipped, delta.linked
                ),
            );
            let sent = std::fs::File::open(&delta.path)
                .map_err(|e| OpError::Host(format!("cannot read {}: {e}", delta.path.display())))
                .and_then(|file| {
                    let mut counting = Counting {
                        inner: file,
                        sent: 0,
                        total: delta.size,
                        host,
                        reporter,
                        crash_half: i == 0,
                        last_report: 0,
                    };
                    hostops::stage_delta(
                        hosts.get(i),
                        root,
                        &release_id,
                        base,
                        &meta,
                        &mut counting,
                    )
                    .map(|()| counting.sent)
                });
            match sent {
                Ok(sent) => {
                    let _ = ctx.ev(
                        Some(host),
                        "stage",
                        Phase::Done,
                        &format!("{sent} bytes sent (delta)"),
                    );
                    return Ok(sent);
                }
                // The connection failed: the full upload would fail the same way.
                Err(e @ OpError::Remote(_)) => {
                    let _ = ctx.ev(Some(host), "stage", Phase::Failed, &e.to_string());
                    return Err(e);
                }
                Err(OpError::Host(m)) => {
                    reporter.note(&format!(
                        "{host}: staging from a delta failed ({m}); sending the whole artifact instead"
                    ));
                    let _ = ctx.ev(
                        Some(host),
                        "stage",
                        Phase::Failed,
                        &format!("delta: {m}; sending the whole artifact"),
                    );
                }
            }
        }
        let _ = ctx.ev(
            Some(host),
            "stage",
            Phase::Start,
            &format!("{} bytes", art.size),
        );
        let file = match std::fs::File::open(&art.path) {
            Ok(f) => f,
            Err(e) => {
                return Err(OpError::Host(format!(
                    "cannot read {}: {e}",
                    art.path.display()
                )))
            }
        };
        let mut counting = Counting {
            inner: file,
            sent: 0,
            total: art.size,
            host,
            reporter,
            crash_half: i == 0,
            last_report: 0,
        };
        let r = hostops::stage(hosts.get(i), root, &release_id, &meta, &mut counting);
        let _ = match &r {
            Ok(()) => ctx.ev(
                Some(host),
                "stage",
                Phase::Done,
                &format!("{} bytes sent", counting.sent),
            ),
            Err(e) => ctx.ev(Some(host), "stage", Phase::Failed, &e.to_string()),
        };
        r.map(|()| counting.sent)
    });
    let mut stage_errors = Vec::new();
    for (i, s) in staged.iter().enumerate() {
        let h = result.hosts.get_mut(ctx.host(i)).expect("host");
        match s {
            Ok(bytes) => {
                h.outcome = "staged".into();
                h.uploaded_bytes = *bytes;
                ctx.outcome(i, "staged");
            }
            Err(e) => {
                h.outcome = "stage_failed".into();
                h.detail = Some(e.to_string());
                ctx.outcome(i, "stage_failed");
                stage_errors.push(format!("{}: {e}", ctx.host(i)));
            }
        }
    }
    if !stage_errors.is_empty() {
        unlock(&locked_hosts);
        finish(
            &mut result,
            Some("failed"),
            exit::FAILED,
            format!("staging failed, so no host was switched; every host still serves what it served:\n  {}", stage_errors.join("\n  ")),
        );
        return result;
    }
    crash_point("after-stage");

    // Switch and gate.
    let gate_spec = settings.gate();
    let verdicts = switch_and_gate(&ctx, &hosts, root, &release_id, &settings, "switch", "gate");
    crash_point("after-gate");
    let _ = gate_spec;
    let unhealthy: Vec<(usize, String)> = verdicts
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_ref().err().map(|e| (i, e.clone())))
        .collect();
    for (i, v) in verdicts.iter().enumerate() {
        let h = result.hosts.get_mut(ctx.host(i)).expect("host");
        match v {
            Ok(d) => {
                h.outcome = "healthy".into();
                h.detail = Some(d.clone());
            }
            Err(e) => {
                h.outcome = "unhealthy".into();
                h.detail = Some(e.clone());
            }
        }
    }

    if unhealthy.is_empty() {
        crash_point("before-commit");
        for i in 0..n {
            ctx.outcome(i, "healthy");
        }
        let _ = store.set_status(app, &release_id, "succeeded", Some(&now_utc()));
        let _ = store.set_live(app, &release_id);
        let _ = ctx.ev(None, "commit", Phase::Done, &release_id);
        crash_point("after-commit");
        // Prune: keep `keep`, never current, the live release or the rollback target.
        let after = store.releases(app).unwrap_or_default();
        let mut protect: BTreeSet<String> = BTreeSet::new();
        protect.insert(release_id.clone());
        if let Some(t) = plan::rollback_target(&facts(&after), Some(&release_id)) {
            protect.insert(t.id.clone());
        }
        if let Some((p, _)) = &previous {
            protect.insert(p.clone());
        }
        let _ = ctx.ev(None, "prune", Phase::Start, "");
        par_map(n, parallel, |i| {
            let mut on_host = prepared[i].releases.clone();
            on_host.push(release_id.clone());
            let del = plan::prune(&on_host, config.files.keep, &protect);
            let r = hostops::finish(hosts.get(i), root, &my_line, &del);
            let _ = ctx.ev(
                Some(ctx.host(i)),
                "prune",
                if r.is_ok() {
                    Phase::Done
                } else {
                    Phase::Failed
                },
                &del.join(" "),
            );
        });
        let what = if kind == "rollback" {
            "rolled back to"
        } else {
            "deployed"
        };
        finish(
            &mut result,
            Some("succeeded"),
            exit::OK,
            format!("{what} {release_id} on {n} host(s); every host passed its health gate"),
        );
        return result;
    }

    // Revert.
    let why: Vec<String> = unhealthy
        .iter()
        .map(|(i, e)| format!("{}: {e}", ctx.host(*i)))
        .collect();
    let Some((prev_id, prev_settings)) = previous.clone() else {
        for &(i, _) in &unhealthy {
            ctx.outcome(i, "unhealthy");
        }
        unlock(&locked_hosts);
        finish(
            &mut result,
            Some("failed"),
            exit::FAILED,
            format!(
                "release {release_id} failed its health gate and app `{app}` has no previous release to go back to (this was its first deploy), so the hosts still serve {release_id}:\n  {}\nFix the app or the [health] settings and deploy again.",
                why.join("\n  ")
            ),
        );
        return result;
    };
    for &(i, _) in &unhealthy {
        ctx.outcome(i, "unhealthy");
    }
    reporter.note(&format!(
        "release {release_id} is unhealthy; switching every host back to {prev_id}"
    ));
    let reverted = switch_and_gate(
        &ctx,
        &hosts,
        root,
        &prev_id,
        &prev_settings,
        "revert",
        "revert-gate",
    );
    let revert_failed: Vec<String> = reverted
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_ref().err().map(|e| format!("{}: {e}", ctx.host(i))))
        .collect();
    for (i, v) in reverted.iter().enumerate() {
        if v.is_err() {
            ctx.outcome(i, "revert_failed");
            result.hosts.get_mut(ctx.host(i)).expect("host").outcome = "revert_failed".into();
        } else if !unhealthy.iter().any(|(u, _)| *u == i) {
            ctx.outcome(i, "reverted");
            result.hosts.get_mut(ctx.host(i)).expect("host").outcome = "reverted".into();
        }
    }
    unlock(&locked_hosts);
    if revert_failed.is_empty() {
        let status = if new_release { "rolled_back" } else { "failed" };
        finish(
            &mut result,
            Some(status),
            exit::FAILED,
            format!(
                "release {release_id} failed its health gate:\n  {}\nEvery host was switched back to {prev_id} and passed its health gate again.",
                why.join("\n  ")
            ),
        );
    } else {
        finish(
            &mut result,
            Some("partial"),
            exit::NEEDS_PERSON,
            format!(
                "release {release_id} failed its health gate:\n  {}\nand switching back to {prev_id} failed on:\n  {}\nA person must look: run `cutover status` to see what each host serves, fix the host, then `cutover rollback --to {prev_id}` or deploy again.",
                why.join("\n  "),
                revert_failed.join("\n  ")
            ),
        );
    }
    result
}

/// Switches every host to `id` (running `reload`), then gates every switched host. `Ok` holds
/// a one-line summary, `Err` the diagnosis.
fn switch_and_gate(
    ctx: &Ctx<'_>,
    hosts: &Hosts,
    root: &str,
    id: &str,
    settings: &Settings,
    switch_step: &str,
    gate_step: &str,
) -> Vec<Result<String, String>> {
    let n = hosts.len();
    let parallel = ctx.config.ssh.parallel;
    let switched = par_map(n, parallel, |i| {
        let host = ctx.host(i);
        if ctx.ev(Some(host), switch_step, Phase::Start, id).is_err() {
            return Err("cannot record the switch; not switched".to_string());
        }
        let r = hostops::switch(hosts.get(i), root, id, settings.reload.as_deref());
        let r = match r {
            Ok(s) => match s.reload {
                Some((code, out)) if code != 0 => Err(format!(
                    "switched, but reload exited with {code}: {}",
                    last_lines(&out)
                )),
                Some((_, out)) => Ok(out),
                None => Ok(String::new()),
            },
            Err(e) => Err(e.to_string()),
        };
        let _ = match &r {
            Ok(out) => ctx.ev(Some(host), switch_step, Phase::Done, out),
            Err(e) => ctx.ev(Some(host), switch_step, Phase::Failed, e),
        };
        if i == 0 {
            crash_point(&format!("after-{switch_step}-first"));
        }
        r
    });
    crash_point(&format!("after-{switch_step}"));
    let gate = settings.gate();
    par_map(n, parallel, |i| {
        let host = ctx.host(i);
        let reload_out = match &switched[i] {
            Ok(out) => out.clone(),
            Err(e) => return Err(e.clone()),
        };
        let (url, spec) = match &gate {
            Ok(g) => g.clone(),
            Err(e) => return Err(format!("bad health URL: {e}")),
        };
        let _ = ctx.ev(Some(host), gate_step, Phase::Start, &url.to_string());
        let endpoint = match hosts.get(i).forward(&url.host, url.port) {
            Ok(e) => e,
            Err(e) => {
                let m = format!("cannot reach {url} from the host: {e}");
                let _ = ctx.ev(Some(host), gate_step, Phase::Failed, &m);
                return Err(m);
            }
        };
        let g = run_gate(&endpoint, &spec);
        if g.healthy {
            let m = format!(
                "{url} answered {} {} times in {:.1}s",
                spec.expect,
                spec.healthy_after,
                g.elapsed.as_secs_f64()
            );
            let _ = ctx.ev(Some(host), gate_step, Phase::Done, &m);
            Ok(m)
        } else {
            let mut m = format!(
                "{url} not healthy after {:.1}s ({} probes, wanted {} {} times in a row); last answer: {}",
                g.elapsed.as_secs_f64(),
                g.probes,
                spec.expect,
                spec.healthy_after,
                g.last.describe()
            );
            if !reload_out.trim().is_empty() {
                m.push_str(&format!("; reload output: {}", last_lines(&reload_out)));
            }
            let _ = ctx.ev(Some(host), gate_step, Phase::Failed, &m);
            Err(m)
        }
    })
}

fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Counts the bytes streamed to a host, reports them, and holds the mid-upload crash point.
/// The deltas worth sending: one per distinct release that hosts needing the new release serve
/// now, when the host can stage from a delta and that release's artifact is still in the store
/// (see [`crate::delta`]). A delta that cannot be made is noted and the full artifact is sent.
fn plan_deltas(
    store: &Store,
    artifacts: &ArtifactStore,
    ctx: &Ctx<'_>,
    app: &str,
    artifact_sha: &str,
    release_id: &str,
    prepared: &[Prepared],
) -> HashMap<String, crate::delta::Delta> {
    let mut deltas = HashMap::new();
    let Some(new) = artifacts.get(artifact_sha) else {
        return deltas;
    };
    let mut tried = std::collections::HashSet::new();
    for p in prepared {
        let Some(base) = p.current.as_deref() else {
            continue;
        };
        if !p.delta
            || p.releases.iter().any(|r| r == release_id)
            || !p.releases.iter().any(|r| r == base)
            || !tried.insert(base.to_string())
        {
            continue;
        }
        let Some(base_art) = store
            .release(app, base)
            .ok()
            .flatten()
            .filter(|r| r.artifact_sha256 != artifact_sha)
            .and_then(|r| artifacts.get(&r.artifact_sha256))
        else {
            continue;
        };
        let made = crate::delta::manifest(artifacts, &base_art)
            .and_then(|m| crate::delta::write_delta(artifacts, &new, &m));
        match made {
            Ok(Some(d)) if d.size < new.size => {
                deltas.insert(base.to_string(), d);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = ctx.ev(
                    None,
                    "stage",
                    Phase::Failed,
                    &format!("cannot make a delta against release {base}: {e}; sending the whole artifact"),
                );
            }
        }
    }
    deltas
}

struct Counting<'a> {
    inner: std::fs::File,
    sent: u64,
    total: u64,
    host: &'a str,
    reporter: &'a dyn Reporter,
    crash_half: bool,
    last_report: u64,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        if self.sent - self.last_report >= 256 * 1024 || n == 0 {
            self.last_report = self.sent;
            self.reporter.bytes(self.host, self.sent, self.total);
        }
        if self.crash_half && self.sent * 2 >= self.total && self.sent > 0 {
            crash_point("mid-upload");
        }
        Ok(n)
    }
}

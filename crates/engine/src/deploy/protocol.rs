//! The sequence itself, generic over a [`Switcher`]; see the module docs of [`super`].

use super::error::{reconciled, succeeded};
use super::{DeployError, FailedAt, Outcome, Recorder};
use crate::hostops::{self, HostLock, OpError, Prepared};
use crate::switch::{HostCx, Pinned, SwitchError, Switcher, Target};
use crate::{crash_point, identity, now_secs, now_utc, par_map, Hosts, Reporter};
use cutover_core::protocol::{batches, decide, reconcile, Decision};
use cutover_core::{Config, CrashPoint, HostState, ReleaseId, RunKind, State, Status, Step};
use cutover_remote::Remote;
use cutover_store::{Holder, LockOutcome, NewRelease, Release, Store};
use std::collections::BTreeSet;

/// What the protocol runs with.
pub(crate) struct Env<'a> {
    pub(crate) config: &'a Config,
    pub(crate) store: &'a Store,
    pub(crate) reporter: &'a dyn Reporter,
    /// The run row the caller made beforehand, if any (see [`super::Job`]).
    pub(crate) run: Option<i64>,
}

/// What a run puts on the hosts.
pub(crate) enum What<S> {
    /// New content, already pinned (a files artifact in the store).
    New(Pinned<S>),
    /// A reference only the hosts can pin (an image tag or digest); `source` replaces the
    /// reference in the history (a build says where the image came from).
    OnHosts {
        reference: String,
        source: Option<String>,
    },
    /// A release from the history: `--to`, or the rollback rule's choice.
    Rollback(Option<String>),
}

pub(crate) struct Candidate<S> {
    pub(crate) what: What<S>,
    pub(crate) commit: Option<String>,
    pub(crate) subject: Option<String>,
}

impl<S> Candidate<S> {
    pub(crate) fn rollback(to: Option<String>) -> Self {
        Candidate {
            what: What::Rollback(to),
            commit: None,
            subject: None,
        }
    }
}

pub(crate) type Build<'b, S> =
    Box<dyn FnOnce(&Recorder<'_>) -> Result<Candidate<S>, DeployError> + 'b>;

/// A checked request: ready, or a build to run once the app is locked.
pub(crate) enum Early<'b, S> {
    Ready(Candidate<S>),
    Build(Build<'b, S>),
}

/// The hosts of a run, as the protocol reaches them: connection and the host lock. Real
/// hosts go through [`hostops`]; the protocol's unit tests use a fake.
pub(crate) trait Fleet: Sync {
    fn names(&self) -> &[String];
    fn remote(&self, i: usize) -> &dyn Remote;
    fn connect(&self, i: usize) -> Result<(), String>;
    fn prepare(&self, i: usize, root: &str, holder: &str) -> Result<Prepared, OpError>;
    fn take_over(&self, i: usize, root: &str, old: &str, new: &str) -> Result<Prepared, OpError>;
    fn finish(&self, i: usize, root: &str, holder: &str, prune: &[String]) -> Result<(), OpError>;
}

struct Real {
    hosts: Hosts,
    names: Vec<String>,
}

impl Fleet for Real {
    fn names(&self) -> &[String] {
        &self.names
    }
    fn remote(&self, i: usize) -> &dyn Remote {
        self.hosts.get(i)
    }
    fn connect(&self, i: usize) -> Result<(), String> {
        self.hosts.get(i).connect().map_err(|e| e.to_string())
    }
    fn prepare(&self, i: usize, root: &str, holder: &str) -> Result<Prepared, OpError> {
        hostops::prepare(self.hosts.get(i), root, holder)
    }
    fn take_over(&self, i: usize, root: &str, old: &str, new: &str) -> Result<Prepared, OpError> {
        hostops::take_over(self.hosts.get(i), root, old, new)
    }
    fn finish(&self, i: usize, root: &str, holder: &str, prune: &[String]) -> Result<(), OpError> {
        hostops::finish(self.hosts.get(i), root, holder, prune)
    }
}

/// Runs a checked request against the config's real hosts.
pub(crate) fn execute<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    kind: RunKind,
    early: Early<'_, S::Snap>,
) -> Outcome {
    execute_on(sw, env, kind, early, &|| real(env.config))
}

/// The config's real hosts.
fn real(config: &Config) -> Result<Box<dyn Fleet + 'static>, DeployError> {
    let hosts = Hosts::new(config).map_err(|e| DeployError::ControlSockets(e.to_string()))?;
    let names = config.hosts.iter().map(|(h, _)| h.clone()).collect();
    Ok(Box::new(Real { hosts, names }))
}

/// [`recover_on`] the config's real hosts.
pub(crate) fn recover<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    by: &str,
) -> Result<Option<Recovered>, DeployError> {
    recover_on(sw, env, by, &|| real(env.config))
}

pub(crate) type MakeFleet<'f> = dyn Fn() -> Result<Box<dyn Fleet + 'f>, DeployError> + 'f;

/// Runs a checked request against the hosts `fleet` makes: lock the app, build if asked,
/// then [`drive`]; the app lock is released at the end however the run ended.
pub(crate) fn execute_on<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    kind: RunKind,
    early: Early<'_, S::Snap>,
    fleet: &MakeFleet<'_>,
) -> Outcome {
    let app = env.config.app.as_str();
    let me = match lock_app(env.store, app, kind.as_str(), env.reporter) {
        Ok(me) => me,
        Err(e) => return Outcome::refused(kind, app, e),
    };
    crash_point(CrashPoint::AfterLock);
    let out = match early {
        Early::Ready(c) => drive(sw, env, kind, c, &me, None, fleet),
        Early::Build(build) => {
            let live = env.store.live(app).ok().flatten();
            let started = Recorder::start(
                env.store,
                env.reporter,
                app,
                kind,
                "",
                live.as_deref(),
                env.run,
            );
            match started {
                Err(e) => Outcome::refused(kind, app, e),
                Ok(rec) => match build(&rec) {
                    Ok(c) => drive(sw, env, kind, c, &me, Some(rec), fleet),
                    Err(e) => {
                        let mut o = Outcome::refused(kind, app, e);
                        o.previous = live;
                        o.run_id = Some(rec.run_id);
                        rec.finish(o.status, o.exit_code, &o.message);
                        o
                    }
                },
            }
        }
    };
    let _ = env.store.release_lock(app, &me);
    out
}

/// Takes the app lock in the database: a lock held by a live process is exit 4 naming it;
/// one left by a dead process is taken over and said so.
fn lock_app(
    store: &Store,
    app: &str,
    op: &str,
    reporter: &dyn Reporter,
) -> Result<Holder, DeployError> {
    let me = identity::me(op, &now_utc());
    match store.acquire_lock(app, &me, identity::alive) {
        Err(e) => Err(DeployError::Store(e.to_string())),
        Ok(LockOutcome::Held(h)) => Err(DeployError::Locked {
            app: app.into(),
            holder: identity::describe(&h),
        }),
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

fn facts(releases: &[Release]) -> Vec<cutover_core::plan::ReleaseFacts> {
    releases
        .iter()
        .map(|r| cutover_core::plan::ReleaseFacts {
            id: r.id.clone(),
            succeeded: r.status == Status::Succeeded.as_str(),
            bad: r.bad,
        })
        .collect()
}

/// A new release id for content `sha_hex`, newer than every recorded one: a release started
/// within the same second as the newest takes the next second, so history order and rollback
/// order never disagree.
fn next_release_id(releases: &[Release], sha_hex: &str) -> String {
    let newest = releases.iter().map(|r| r.id.as_str()).max().unwrap_or("");
    let mut now = now_secs();
    while ReleaseId::new(now, sha_hex, 0).as_str() <= newest {
        now += 1;
    }
    ReleaseId::new(now, sha_hex, 0).to_string()
}

/// The release a rollback goes to: `to` (an id or its last 7+ characters), or the newest
/// release before the live one that succeeded everywhere and is not marked bad. Never the
/// live one.
fn rollback_target<'r>(
    app: &str,
    releases: &'r [Release],
    live: Option<&str>,
    to: Option<&str>,
) -> Result<&'r Release, DeployError> {
    let target = match to {
        Some(t) => releases
            .iter()
            .find(|r| r.id == t || (t.len() >= 7 && r.id.ends_with(t)))
            .ok_or_else(|| format!("no release `{t}` in the history of app `{app}` (see `cutover history`)")),
        None => cutover_core::plan::rollback_target(&facts(releases), live)
            .and_then(|f| releases.iter().find(|r| r.id == f.id))
            .ok_or_else(|| format!("app `{app}` has no release before the live one that succeeded on every host and is not marked bad; nothing to roll back to (see `cutover history`)")),
    }
    .map_err(DeployError::NoRollbackTarget)?;
    if live == Some(target.id.as_str()) {
        return Err(DeployError::NoRollbackTarget(format!(
            "release {} is already live",
            target.id
        )));
    }
    Ok(target)
}

fn target_of<S: Switcher>(sw: &S, r: &Release) -> Option<Target<S::Snap>> {
    sw.snapshot(r).map(|snap| Target {
        id: r.id.clone(),
        content: r.artifact_sha256.clone(),
        commit: r.commit.clone(),
        snap,
    })
}

/// What a run puts on the hosts, as far as it is known before connecting.
struct Chosen<S> {
    /// The release and the source recorded with it (known unless only the hosts can pin it).
    target: Option<(Target<S>, String)>,
    /// The run records a new release (a deploy), rather than going back to one (a rollback).
    new_release: bool,
    /// The reference the hosts pin, and the source to record instead of it.
    pin: Option<(String, Option<String>)>,
}

fn choose<S: Switcher>(
    sw: &S,
    app: &str,
    releases: &[Release],
    live: Option<&str>,
    what: What<S::Snap>,
    commit: Option<String>,
) -> Result<Chosen<S::Snap>, DeployError> {
    Ok(match what {
        What::New(p) => {
            let t = Target {
                id: next_release_id(releases, &p.content),
                content: p.content,
                commit,
                snap: p.snap,
            };
            Chosen {
                target: Some((t, p.source)),
                new_release: true,
                pin: None,
            }
        }
        What::OnHosts { reference, source } => Chosen {
            target: None,
            new_release: true,
            pin: Some((reference, source)),
        },
        What::Rollback(to) => {
            let r = rollback_target(app, releases, live, to.as_deref())?;
            let t = target_of(sw, r).ok_or_else(|| DeployError::NoSnapshot(r.id.clone()))?;
            Chosen {
                target: Some((t, String::new())),
                new_release: false,
                pin: None,
            }
        }
    })
}

/// One run after the app lock, from the history's facts to the verdict.
fn drive<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    kind: RunKind,
    cand: Candidate<S::Snap>,
    me: &Holder,
    rec: Option<Recorder<'_>>,
    fleet: &MakeFleet<'_>,
) -> Outcome {
    let (store, app) = (env.store, env.config.app.as_str());
    let refuse = |e: DeployError, rec: Option<Recorder<'_>>| {
        let o = Outcome::refused(kind, app, e);
        if let Some(rec) = rec {
            rec.finish(o.status, o.exit_code, &o.message);
        }
        o
    };
    let facts = store
        .unfinished_runs(app)
        .and_then(|i| Ok((i, store.releases(app)?)));
    let (interrupted, releases) = match facts {
        Ok(f) => f,
        Err(e) => return refuse(DeployError::Store(e.to_string()), rec),
    };
    let live = store.live(app).ok().flatten();
    let previous = live
        .as_ref()
        .and_then(|l| releases.iter().find(|r| &r.id == l))
        .and_then(|r| target_of(sw, r));
    let commit = cand.commit.clone();
    let chosen = choose(sw, app, &releases, live.as_deref(), cand.what, commit);
    let Chosen {
        target,
        new_release,
        pin,
    } = match chosen {
        Ok(c) => c,
        Err(e) => return refuse(e, rec),
    };
    let release = target.as_ref().map_or("", |t| t.0.id.as_str()).to_string();
    let rec = match rec {
        Some(r) => match r.set_release(&release) {
            Ok(()) => r,
            Err(e) => return refuse(e, Some(r)),
        },
        None => match Recorder::start(
            store,
            env.reporter,
            app,
            kind,
            &release,
            live.as_deref(),
            env.run,
        ) {
            Ok(r) => r,
            Err(e) => return refuse(e, None),
        },
    };
    let mut out = Outcome::new(kind, app, fleet_names(env.config).as_slice());
    out.run_id = Some(rec.run_id);
    out.release = target.as_ref().map(|t| t.0.id.clone());
    out.previous = previous.as_ref().map(|p| p.id.clone());
    out.commit = cand.commit.clone();
    out.commit_subject = cand.subject.clone();
    let run = Run {
        sw,
        env,
        rec: &rec,
        kind,
        me: identity::to_line(me),
        new_release,
        commit: cand.commit,
        subject: cand.subject,
    };
    let result = run.body(
        &mut out,
        target,
        pin,
        previous.as_ref(),
        &interrupted,
        &releases,
        fleet,
    );
    let release = out.release.clone().unwrap_or_default();
    out.end(result);
    if !release.is_empty() && (new_release || out.status == Status::Partial) {
        rec.set_status(&release, out.status);
    }
    rec.finish(out.status, out.exit_code, &out.message);
    out
}

fn fleet_names(config: &Config) -> Vec<String> {
    config.hosts.iter().map(|(h, _)| h.clone()).collect()
}

/// The state of one run, shared by its steps.
struct Run<'a, S: Switcher> {
    sw: &'a S,
    env: &'a Env<'a>,
    rec: &'a Recorder<'a>,
    kind: RunKind,
    /// This process's host-lock line.
    me: String,
    new_release: bool,
    commit: Option<String>,
    subject: Option<String>,
}

impl<S: Switcher> Run<'_, S> {
    fn parallel(&self) -> usize {
        self.env.config.ssh.parallel
    }

    fn insert(&self, t: &Target<S::Snap>, source: &str) -> Result<(), DeployError> {
        self.env
            .store
            .insert_release(&NewRelease {
                id: &t.id,
                app: &self.env.config.app,
                created_at: &now_utc(),
                artifact_sha256: &t.content,
                commit: self.commit.as_deref(),
                commit_subject: self.subject.as_deref(),
                source,
                snapshot: &serde_json::to_string(&t.snap).unwrap_or_default(),
            })
            .map_err(|e| DeployError::Store(e.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    fn body(
        &self,
        out: &mut Outcome,
        target: Option<(Target<S::Snap>, String)>,
        pin: Option<(String, Option<String>)>,
        previous: Option<&Target<S::Snap>>,
        interrupted: &[cutover_store::Run],
        releases: &[Release],
        fleet: &MakeFleet<'_>,
    ) -> Result<String, DeployError> {
        let mut target = match target {
            Some((t, source)) => {
                if self.new_release {
                    self.insert(&t, &source)?;
                }
                Some(t)
            }
            None => None,
        };
        if self.kind == RunKind::Rollback {
            if let Some(p) = previous {
                let r = self.env.store.set_bad(&self.env.config.app, &p.id, true);
                self.rec.best_effort(r);
                self.rec.ev(None, Step::MarkBad, State::Done, &p.id);
            }
        }
        let fleet = fleet()?;
        let prepared = std::thread::scope(|s| {
            if let Some((reference, _)) = &pin {
                let hosts = fleet.names().len();
                s.spawn(move || self.sw.prepin(self.rec, reference, hosts));
            }
            self.connect(out, fleet.as_ref())?;
            self.prepare(out, fleet.as_ref())
        })?;
        let hosts = self.cx(fleet.as_ref(), &prepared);
        let mut prune: Vec<Vec<String>> = vec![Vec::new(); hosts.len()];
        let r = (|| {
            let others: Vec<&cutover_store::Run> = interrupted
                .iter()
                .filter(|r| r.id != self.rec.run_id)
                .collect();
            self.reconcile(&hosts, &others);
            let target = match (target.take(), pin) {
                (Some(t), _) => t,
                (None, Some((reference, source))) => {
                    let p = self.sw.pin(self.rec, &hosts, &reference)?;
                    let t = Target {
                        id: next_release_id(releases, &p.content),
                        content: p.content,
                        commit: self.commit.clone(),
                        snap: p.snap,
                    };
                    self.insert(&t, source.as_deref().unwrap_or(&p.source))?;
                    self.rec.set_release(&t.id)?;
                    out.release = Some(t.id.clone());
                    t
                }
                (None, None) => unreachable!("a run has a target or a reference to pin"),
            };
            let staged = self.stage(out, &hosts, &target)?;
            crash_point(CrashPoint::AfterStage);
            self.switch_batches(out, &hosts, &target, previous, &staged)?;
            self.commit(out, &hosts, &target, previous, &mut prune)
        })();
        self.unlock(fleet.as_ref(), &prune, r.is_ok());
        r
    }

    /// Each prepared host as a step sees it.
    fn cx<'h>(&'h self, fleet: &'h dyn Fleet, prepared: &'h [Prepared]) -> Vec<HostCx<'h>> {
        prepared
            .iter()
            .enumerate()
            .map(|(i, p)| HostCx {
                i,
                name: &fleet.names()[i],
                remote: fleet.remote(i),
                prepared: p,
                rec: self.rec,
            })
            .collect()
    }

    fn connect(&self, out: &mut Outcome, fleet: &dyn Fleet) -> Result<(), DeployError> {
        let names = fleet.names();
        let connected = par_map(names.len(), self.parallel(), |i| {
            self.rec
                .ev(Some(&names[i]), Step::Connect, State::Start, "");
            let r = fleet.connect(i);
            match &r {
                Ok(()) => self.rec.ev(
                    Some(&names[i]),
                    Step::Connect,
                    State::Done,
                    &fleet.remote(i).link(),
                ),
                Err(e) => self
                    .rec
                    .ev(Some(&names[i]), Step::Connect, State::Failed, e),
            }
            r
        });
        let mut errors = Vec::new();
        for (i, r) in connected.into_iter().enumerate() {
            if let Err(e) = r {
                self.rec.host_outcome(&names[i], HostState::Unreachable);
                let h = out.host(&names[i]);
                h.outcome = Some(HostState::Unreachable);
                h.detail = Some(e.clone());
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DeployError::Unreachable {
                total: names.len(),
                errors,
            })
        }
    }

    /// Host checks and host locks; a lock left by a dead process is taken over.
    fn prepare(&self, out: &mut Outcome, fleet: &dyn Fleet) -> Result<Vec<Prepared>, DeployError> {
        let (names, root) = (fleet.names(), self.sw.root());
        let prepared = par_map(
            names.len(),
            self.parallel(),
            |i| -> Result<Result<Prepared, OpError>, DeployError> {
                let host = Some(names[i].as_str());
                self.rec.guard(host, Step::Prepare, State::Start, root)?;
                let mut p = fleet.prepare(i, root, &self.me);
                if let Ok(Prepared {
                    lock: HostLock::Held(line),
                    ..
                }) = &p
                {
                    // Gone: its process is (this machine), or it is the holder whose app lock
                    // this run took over (its lease expired: another machine, dead or cut off).
                    let gone = |h: &Holder| {
                        !identity::alive(h)
                            || self
                                .env
                                .store
                                .took_over(&self.env.config.app)
                                .is_some_and(|t| t.same_process(h))
                    };
                    if let Some(h) = identity::from_line(line).filter(gone) {
                        self.env.reporter.note(&format!(
                            "{}: taking over the host lock of a process that is gone: {}",
                            names[i],
                            identity::describe(&h)
                        ));
                        self.rec
                            .guard(host, Step::LockTakeover, State::Done, line)?;
                        p = fleet.take_over(i, root, line, &self.me);
                    }
                }
                match &p {
                    Ok(p) => self.rec.ev(
                        host,
                        Step::Prepare,
                        State::Done,
                        &format!("current={:?} releases={}", p.current, p.releases.len()),
                    ),
                    Err(e) => self
                        .rec
                        .ev(host, Step::Prepare, State::Failed, &e.to_string()),
                }
                Ok(p)
            },
        );
        let mut held = Vec::new();
        let mut errors = Vec::new();
        let mut locked = Vec::new();
        let mut not_recorded = false;
        for (i, p) in prepared.iter().enumerate() {
            match p {
                Err(_) => not_recorded = true,
                Ok(Ok(Prepared { lock: HostLock::Acquired, .. })) => locked.push(i),
                Ok(Ok(Prepared { lock: HostLock::Held(line), .. })) => held.push(format!(
                    "{}: {}",
                    names[i],
                    identity::from_line(line).map(|h| identity::describe(&h)).unwrap_or_else(|| format!("unknown holder {line:?} (remove {root}/.cutover/lock on that host if no deploy runs)"))
                )),
                Ok(Err(e)) => {
                    self.rec.host_outcome(&names[i], HostState::Unprepared);
                    let h = out.host(&names[i]);
                    h.outcome = Some(HostState::Unprepared);
                    h.detail = Some(e.to_string());
                    errors.push(format!("{}: {e}", names[i]));
                }
            }
        }
        let e = if not_recorded {
            DeployError::NotRecorded
        } else if !errors.is_empty() {
            DeployError::Unprepared(errors)
        } else if !held.is_empty() {
            DeployError::HostsLocked {
                app: self.env.config.app.clone(),
                held,
            }
        } else {
            return Ok(prepared
                .into_iter()
                .map(|p| p.expect("recorded").expect("prepared"))
                .collect());
        };
        par_map(locked.len(), self.parallel(), |k| {
            let _ = fleet.finish(locked[k], root, &self.me, &[]);
        });
        Err(e)
    }

    /// Runs a crash interrupted: their events plus what the hosts serve now.
    fn reconcile(&self, hosts: &[HostCx<'_>], interrupted: &[&cutover_store::Run]) {
        let store = self.env.store;
        for run in interrupted {
            let serving: Vec<&str> = hosts
                .iter()
                .filter(|h| {
                    !run.release_id.is_empty() && self.sw.serving(h).contains(&run.release_id)
                })
                .map(|h| h.name)
                .collect();
            let last = store
                .events(run.id)
                .unwrap_or_default()
                .last()
                .map(|e| format!("{} {}", e.step, e.phase))
                .unwrap_or_else(|| "nothing".into());
            let kind = RunKind::parse(&run.kind).unwrap_or(RunKind::Deploy);
            let recorded = store
                .release(&self.env.config.app, &run.release_id)
                .ok()
                .flatten()
                .and_then(|r| Status::parse(&r.status));
            let mark = reconcile(kind, recorded, serving.len());
            if let Some(status) = mark {
                self.rec.set_status(&run.release_id, status);
            }
            let r = store.finish_run(run.id, Status::Interrupted, &now_utc());
            self.rec.best_effort(r);
            let mut msg = reconciled(
                kind,
                &run.release_id,
                &last,
                mark,
                &serving,
                S::STAGES_DIRECTORIES,
            );
            // What each host did alone (a proxy that finished a bake): said with its numbers.
            for h in hosts {
                if let Some(note) = self.sw.reconcile_note(h, &run.release_id) {
                    msg.push_str(&format!("; {}: {note}", h.name));
                }
            }
            self.env.reporter.note(&msg);
            self.rec.ev(None, Step::Reconcile, State::Done, &msg);
        }
    }

    /// Stages on every host; if any fails, every stage is undone and nothing switches.
    fn stage(
        &self,
        out: &mut Outcome,
        hosts: &[HostCx<'_>],
        to: &Target<S::Snap>,
    ) -> Result<Vec<S::Staged>, DeployError> {
        self.rec.guard(None, Step::Stage, State::Start, &to.id)?;
        self.sw.plan_stage(self.rec, to, hosts);
        let staged = par_map(hosts.len(), self.parallel(), |i| {
            self.sw.stage(&hosts[i], to)
        });
        let mut errors = Vec::new();
        for (h, s) in hosts.iter().zip(&staged) {
            let o = out.host(h.name);
            match s {
                Ok(s) => {
                    o.outcome = Some(HostState::Staged);
                    o.uploaded_bytes = self.sw.uploaded(s);
                }
                Err(e) => {
                    o.outcome = Some(HostState::StageFailed);
                    o.detail = Some(e.clone());
                    errors.push(format!("{}: {e}", h.name));
                }
            }
            self.rec.host_outcome(h.name, o.outcome.expect("set"));
        }
        if errors.is_empty() {
            return Ok(staged.into_iter().map(|s| s.expect("checked")).collect());
        }
        par_map(hosts.len(), self.parallel(), |i| {
            self.sw.unstage(&hosts[i], to, staged[i].as_ref().ok());
        });
        Err(DeployError::StageFailed {
            release: to.id.clone(),
            via: self.sw.via(&to.snap),
            errors,
        })
    }

    /// Each batch switches and gates (a bake would follow each gate); an unhealthy host in
    /// any batch sends every host switched so far back.
    fn switch_batches(
        &self,
        out: &mut Outcome,
        hosts: &[HostCx<'_>],
        to: &Target<S::Snap>,
        previous: Option<&Target<S::Snap>>,
        staged: &[S::Staged],
    ) -> Result<(), DeployError> {
        let groups = batches(hosts.len(), &self.env.config.deploy.batches);
        for (k, batch) in groups.iter().cloned().enumerate() {
            let names: Vec<&str> = hosts[batch.clone()].iter().map(|h| h.name).collect();
            let what = format!("batch {} of {}: {}", k + 1, groups.len(), names.join(", "));
            self.rec.ev(None, Step::Batch, State::Start, &what);
            let verdicts = self.switch_and_gate(
                &hosts[batch.clone()],
                previous,
                to,
                Some(&staged[batch.clone()]),
                false,
            );
            crash_point(CrashPoint::AfterGate);
            let mut why = Vec::new();
            let mut failed_at = FailedAt::Gate;
            for (h, v) in hosts[batch.clone()].iter().zip(&verdicts) {
                let o = out.host(h.name);
                match v {
                    Ok(d) => {
                        o.outcome = Some(HostState::Healthy);
                        o.detail = Some(d.clone());
                    }
                    Err((at_switch, e)) => {
                        if *at_switch {
                            failed_at = FailedAt::Switch;
                        }
                        o.outcome = Some(HostState::Unhealthy);
                        o.detail = Some(e.clone());
                        self.rec.host_outcome(h.name, HostState::Unhealthy);
                        why.push(format!("{}: {e}", h.name));
                    }
                }
            }
            let bake = self.env.config.deploy.bake;
            if why.is_empty() && !bake.is_zero() {
                why = self.bake(out, &hosts[batch.clone()], previous, to, bake, &what);
                failed_at = FailedAt::Bake;
            }
            let state = if why.is_empty() {
                State::Done
            } else {
                State::Failed
            };
            self.rec.ev(None, Step::Batch, state, &what);
            match (decide(why.len(), previous.is_some()), previous) {
                (Decision::Commit, _) => continue,
                (Decision::Revert, Some(p)) => {
                    // Hosts of later batches never switched: undo their stage.
                    let later = &hosts[batch.end..];
                    par_map(later.len(), self.parallel(), |j| {
                        let h = &later[j];
                        self.sw.unstage(h, to, Some(&staged[h.i]));
                    });
                    return Err(self.revert(out, &hosts[..batch.end], to, p, why, failed_at));
                }
                _ => {
                    return Err(DeployError::NothingToGoBackTo {
                        app: self.env.config.app.clone(),
                        release: to.id.clone(),
                        via: self.sw.via(&to.snap),
                        why,
                    })
                }
            }
        }
        Ok(())
    }

    /// Watches a batch's hosts for `window` after their gate: the hosts that failed, with why.
    fn bake(
        &self,
        out: &mut Outcome,
        hosts: &[HostCx<'_>],
        from: Option<&Target<S::Snap>>,
        to: &Target<S::Snap>,
        window: std::time::Duration,
        what: &str,
    ) -> Vec<String> {
        let rate = self.env.config.deploy.max_error_rate();
        let watching = format!(
            "{what}: watching for {}",
            cutover_core::duration::format_duration(window)
        );
        self.rec.ev(None, Step::Bake, State::Start, &watching);
        let baked = par_map(hosts.len(), self.parallel(), |k| {
            let h = &hosts[k];
            h.ev(Step::Bake, State::Start, &self.sw.gate_target(to));
            let r = self.sw.bake(h, from, to, window, rate);
            match &r {
                Ok(m) => h.ev(Step::Bake, State::Done, m),
                Err(e) => h.ev(Step::Bake, State::Failed, e),
            }
            r
        });
        let mut why = Vec::new();
        for (h, r) in hosts.iter().zip(baked) {
            if let Err(e) = r {
                let o = out.host(h.name);
                o.outcome = Some(HostState::Unhealthy);
                o.detail = Some(e.clone());
                self.rec.host_outcome(h.name, HostState::Unhealthy);
                why.push(format!("{}: {e}", h.name));
            }
        }
        let state = if why.is_empty() {
            State::Done
        } else {
            State::Failed
        };
        self.rec.ev(None, Step::Bake, state, &watching);
        why
    }

    /// Switches `hosts` from `from` to `to` (`back`: going back to the previous release),
    /// then gates every switched host. `Ok` is the host's detail, `Err` its diagnosis and
    /// whether it was the switch (not the gate) that failed.
    fn switch_and_gate(
        &self,
        hosts: &[HostCx<'_>],
        from: Option<&Target<S::Snap>>,
        to: &Target<S::Snap>,
        staged: Option<&[S::Staged]>,
        back: bool,
    ) -> Vec<Result<String, (bool, String)>> {
        let (switch, gate) = Step::switch_and_gate(back);
        let (first, all) = CrashPoint::of_switch(back);
        let switched = par_map(hosts.len(), self.parallel(), |k| {
            let h = &hosts[k];
            if self
                .rec
                .guard(Some(h.name), switch, State::Start, &to.id)
                .is_err()
            {
                let e = "cannot record the switch; not switched".to_string();
                return Err(SwitchError::Failed(e));
            }
            let r = self.sw.switch(h, from, to, staged.map(|s| &s[k]));
            match &r {
                Ok(m) => h.ev(switch, State::Done, m),
                Err(e) => h.ev(switch, State::Failed, e.text()),
            }
            if let (true, Ok(_), Some(failed)) = (back, &r, from) {
                self.sw.drop_failed(h, failed);
            }
            if h.i == 0 {
                crash_point(first);
            }
            r
        });
        crash_point(all);
        par_map(hosts.len(), self.parallel(), |k| {
            let h = &hosts[k];
            let summary = switched[k].as_ref().map_err(|e| {
                let failed = matches!(e, SwitchError::Failed(_));
                (failed, e.text().to_string())
            })?;
            h.ev(gate, State::Start, &self.sw.gate_target(to));
            let g = self.sw.gate(h, to, summary);
            match &g {
                Ok(m) => h.ev(gate, State::Done, m),
                Err(e) => h.ev(gate, State::Failed, e),
            }
            g.map_err(|e| (false, e))
        })
    }

    /// Every host in `hosts` back to `previous`, gated again.
    fn revert(
        &self,
        out: &mut Outcome,
        hosts: &[HostCx<'_>],
        failed: &Target<S::Snap>,
        previous: &Target<S::Snap>,
        why: Vec<String>,
        failed_at: FailedAt,
    ) -> DeployError {
        self.env.reporter.note(&format!(
            "release {} is unhealthy; switching every host back to {}",
            failed.id, previous.id
        ));
        let verdicts = self.switch_and_gate(hosts, Some(failed), previous, None, true);
        let mut failures = Vec::new();
        for (h, v) in hosts.iter().zip(&verdicts) {
            let o = out.host(h.name);
            match v {
                Err((_, e)) => {
                    o.outcome = Some(HostState::RevertFailed);
                    failures.push(format!("{}: {e}", h.name));
                }
                Ok(_) if o.outcome != Some(HostState::Unhealthy) => {
                    o.outcome = Some(HostState::Reverted)
                }
                Ok(_) => {}
            }
            if o.outcome != Some(HostState::Unhealthy) {
                self.rec.host_outcome(h.name, o.outcome.expect("set"));
            }
        }
        if failures.is_empty() {
            DeployError::Reverted {
                release: failed.id.clone(),
                previous: previous.id.clone(),
                why,
                new_release: self.new_release,
                failed_at,
            }
        } else {
            DeployError::RevertFailed {
                release: failed.id.clone(),
                previous: previous.id.clone(),
                via: self.sw.via(&failed.snap),
                why,
                failed: failures,
                failed_at,
            }
        }
    }

    /// Every host healthy: the release is recorded live, then each host retires the old
    /// release; what to prune goes with the unlock.
    fn commit(
        &self,
        out: &mut Outcome,
        hosts: &[HostCx<'_>],
        to: &Target<S::Snap>,
        previous: Option<&Target<S::Snap>>,
        prune: &mut [Vec<String>],
    ) -> Result<String, DeployError> {
        crash_point(CrashPoint::BeforeCommit);
        let (store, app) = (self.env.store, self.env.config.app.as_str());
        for h in hosts {
            self.rec.host_outcome(h.name, HostState::Healthy);
        }
        self.rec.set_status(&to.id, Status::Succeeded);
        let r = store.set_live(app, &to.id);
        self.rec.best_effort(r);
        self.rec.ev(None, Step::Commit, State::Done, &to.id);
        crash_point(CrashPoint::AfterCommit);
        // Keep the live release, the rollback target and the previous release, always.
        let after = store.releases(app).unwrap_or_default();
        let mut protect: BTreeSet<String> = BTreeSet::new();
        protect.insert(to.id.clone());
        if let Some(t) = cutover_core::plan::rollback_target(&facts(&after), Some(&to.id)) {
            protect.insert(t.id.clone());
        }
        if let Some(p) = previous {
            protect.insert(p.id.clone());
        }
        let retired = par_map(hosts.len(), self.parallel(), |i| {
            self.sw.retire(&hosts[i], to, previous, &protect)
        });
        for (i, (h, r)) in hosts.iter().zip(retired).enumerate() {
            match r {
                Ok((dirs, detail)) => {
                    h.ev(Step::Prune, State::Done, &detail);
                    prune[i] = dirs;
                }
                Err(e) => h.ev(Step::Prune, State::Failed, &e),
            }
        }
        let _ = out;
        Ok(succeeded(
            self.kind == RunKind::Rollback,
            &to.id,
            hosts.len(),
            &self.sw.via(&to.snap),
        ))
    }

    /// Releases every host lock, pruning what the commit chose.
    fn unlock(&self, fleet: &dyn Fleet, prune: &[Vec<String>], committed: bool) {
        let root = self.sw.root();
        par_map(prune.len(), self.parallel(), |i| {
            let r = fleet.finish(i, root, &self.me, &prune[i]);
            if let (Err(e), true) = (r, committed) {
                self.rec.ev(
                    Some(&fleet.names()[i]),
                    Step::Prune,
                    State::Failed,
                    &e.to_string(),
                );
            }
        });
    }
}

/// How a reconciliation of a dead process's runs ended ([`recover_on`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The newest interrupted run: the reconciliation's steps are appended to its events.
    pub run: i64,
    /// Every host serves what the history says is live (or there is nothing live to go to).
    pub agreed: bool,
    /// What was done, for the run's message, the audit and the log.
    pub message: String,
}

/// Reconciles the runs of `env.config`'s app that a dead process left unfinished, with no new
/// run: under the app lock (a live holder: [`DeployError::Locked`]), connect and prepare
/// every host (taking over a dead holder's host locks), mark the interrupted runs and their
/// releases from their events and what the hosts serve (the reconcile step every run takes
/// first), then switch every host that does not serve the live release back to it and gate
/// it (the protocol's revert); a deploy's release left `partial` that no host serves any
/// more is `rolled_back`. `Ok(None)`: nothing was unfinished, or the hosts may still be
/// finishing a switch on their own ([`Switcher::settle`]): ask again later. The runs stay
/// unfinished when a host cannot be reached or prepared, for a later attempt.
pub(crate) fn recover_on<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    by: &str,
    fleet: &MakeFleet<'_>,
) -> Result<Option<Recovered>, DeployError> {
    let (store, app) = (env.store, env.config.app.as_str());
    let me = lock_app(store, app, "reconcile", env.reporter)?;
    let r = recover_locked(sw, env, by, &me, fleet);
    let _ = store.release_lock(app, &me);
    r
}

fn recover_locked<S: Switcher>(
    sw: &S,
    env: &Env<'_>,
    by: &str,
    me: &Holder,
    fleet: &MakeFleet<'_>,
) -> Result<Option<Recovered>, DeployError> {
    let (store, app) = (env.store, env.config.app.as_str());
    let st = |e: cutover_store::StoreError| DeployError::Store(e.to_string());
    let runs = store.unfinished_runs(app).map_err(st)?;
    let Some(last) = runs.last() else {
        return Ok(None);
    };
    if settling(sw, store, last) {
        return Ok(None);
    }
    let releases = store.releases(app).map_err(st)?;
    let target = |id: &str| {
        releases
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| target_of(sw, r))
    };
    let live = store.live(app).map_err(st)?.and_then(|l| target(&l));
    let left = target(&last.release_id);
    let kind = RunKind::parse(&last.kind).unwrap_or(RunKind::Deploy);
    let rec = Recorder::resume(store, env.reporter, app, last.id, &last.release_id);
    rec.ev(None, Step::Reconcile, State::Start, &format!("by {by}"));
    let run = Run {
        sw,
        env,
        rec: &rec,
        kind,
        me: identity::to_line(me),
        new_release: false,
        commit: None,
        subject: None,
    };
    let mut out = Outcome::new(kind, app, fleet_names(env.config).as_slice());
    let all: Vec<&cutover_store::Run> = runs.iter().collect();
    let r = run.agree(&mut out, live.as_ref(), left.as_ref(), &all, fleet);
    let (agreed, message, code) = match r {
        Ok((agreed, m)) => {
            // A run killed after its commit did what it meant to.
            let done = live.as_ref().is_some_and(|l| l.id == last.release_id);
            let code = match (agreed, done) {
                (true, true) => crate::exit::OK,
                (true, false) => crate::exit::FAILED,
                (false, _) => crate::exit::NEEDS_PERSON,
            };
            (agreed, format!("reconciled by {by}: {m}"), code)
        }
        Err(e) => {
            let m = format!("not reconciled yet by {by}: {e}");
            rec.ev(None, Step::Reconcile, State::Failed, &m);
            return Err(e);
        }
    };
    let ended = store.set_run_exit(last.id, code, &message);
    rec.best_effort(ended);
    let state = if code == crate::exit::OK {
        State::Done
    } else {
        State::Failed
    };
    rec.ev(None, Step::Run, state, &message);
    Ok(Some(Recovered {
        run: last.id,
        agreed,
        message,
    }))
}

/// Whether the hosts of `run` may still be changing on their own ([`Switcher::settle`] after
/// its last event).
fn settling<S: Switcher>(sw: &S, store: &Store, run: &cutover_store::Run) -> bool {
    let settle = sw.settle();
    if settle.is_zero() {
        return false;
    }
    let last = store
        .events(run.id)
        .ok()
        .and_then(|e| e.last().map(|e| e.at.clone()))
        .unwrap_or_else(|| run.started_at.clone());
    cutover_core::release::parse_utc(&last).is_some_and(|t| now_secs() < t + settle.as_secs())
}

impl<S: Switcher> Run<'_, S> {
    /// The interrupted runs reconciled, then the hosts back to the live release: whether
    /// every host serves the live release, and what was done.
    fn agree(
        &self,
        out: &mut Outcome,
        live: Option<&Target<S::Snap>>,
        left: Option<&Target<S::Snap>>,
        interrupted: &[&cutover_store::Run],
        fleet: &MakeFleet<'_>,
    ) -> Result<(bool, String), DeployError> {
        let fleet = fleet()?;
        self.connect(out, fleet.as_ref())?;
        let prepared = self.prepare(out, fleet.as_ref())?;
        let hosts = self.cx(fleet.as_ref(), &prepared);
        // Marked from what the hosts served when the runs stopped, as the next run would.
        self.reconcile(&hosts, interrupted);
        let (agreed, mut back) = match live {
            Some(l) => self.back_to(&hosts, l, left),
            None if hosts.iter().all(|h| self.sw.serving(h).is_empty()) => {
                (true, "no live release, and no host serves one".to_string())
            }
            None => (
                false,
                "no live release to go back to: a person must settle the hosts".to_string(),
            ),
        };
        // A deploy's release some hosts served, all now back on the live one: what a revert
        // makes of it.
        let app = self.env.config.app.as_str();
        if let (true, Some(l), RunKind::Deploy) = (agreed, left, self.kind) {
            let partial = self.env.store.release(app, &l.id).ok().flatten();
            if partial.is_some_and(|r| r.status == Status::Partial.as_str()) {
                let status = cutover_core::protocol::reverted_status(true);
                self.rec.set_status(&l.id, status);
                back.push_str(&format!("; release {} marked {status}", l.id));
            }
        }
        let none: Vec<Vec<String>> = vec![Vec::new(); hosts.len()];
        self.unlock(fleet.as_ref(), &none, false);
        Ok((agreed, back))
    }

    /// Switches every host that does not serve `live` back to it (from `left`, the release
    /// the interrupted run was putting on them) and gates it: whether every host serves it.
    fn back_to(
        &self,
        hosts: &[HostCx<'_>],
        live: &Target<S::Snap>,
        left: Option<&Target<S::Snap>>,
    ) -> (bool, String) {
        let off: Vec<HostCx<'_>> = hosts
            .iter()
            .filter(|h| !self.sw.serving(h).contains(&live.id))
            .map(|h| HostCx { ..*h })
            .collect();
        if off.is_empty() {
            return (
                true,
                format!("every host serves the live release {}", live.id),
            );
        }
        // Going back drops what the host goes back from (a container): never the live one.
        let from = left.filter(|l| l.id != live.id);
        let verdicts = self.switch_and_gate(&off, from, live, None, true);
        let mut failed = Vec::new();
        for (h, v) in off.iter().zip(&verdicts) {
            if let Err((_, e)) = v {
                failed.push(format!("{}: {e}", h.name));
            }
        }
        let names: Vec<&str> = off.iter().map(|h| h.name).collect();
        if failed.is_empty() {
            let m = format!(
                "switched {} back to the live release {}; every host serves it",
                names.join(", "),
                live.id
            );
            (true, m)
        } else {
            let m = format!(
                "switching {} back to the live release {} failed: {}",
                names.join(", "),
                live.id,
                failed.join("; ")
            );
            (false, m)
        }
    }
}

//! Jobs: deploys and rollbacks the server runs in the background with the engine's one entry
//! point, never inside an HTTP request.
//!
//! [`submit`] refuses (409, naming the holder) while a run of the app is in progress, from
//! this server or from a CLI on the same data directory; otherwise it makes the run row (so
//! the answer carries the run id), a job row and an audit row, and starts a worker thread that
//! calls `cutover_engine::run` with that run row. [`reconcile`] at startup marks the jobs a
//! killed server left as interrupted: they are not re-run. The sweeper ([`start_sweeper`],
//! at start and every third of the lease) reconciles the hosts of a run no live process
//! runs any more (a killed server or CLI; on PostgreSQL, another server whose lease ran out)
//! without waiting for the app's next run: [`sweep`].

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;
use cutover_core::{AppKind, RunKind, Status};
use cutover_engine::artifact::ArtifactStore;
use cutover_engine::{identity, Job, RunRequest};
use cutover_store::{AuditRow, Holder, JobState, LockOutcome, RunRow, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    Deploy(Deploy),
    /// `to`: a release id (or its last 7+ characters); `None`: the rollback rule's choice.
    Rollback {
        to: Option<String>,
    },
    /// Pull request `pr`'s preview (`<app>-pr-<pr>`): a ref built (a webhook's head SHA) or an
    /// image, deployed through the same protocol.
    Preview {
        pr: u64,
        what: Deploy,
    },
}

/// What a deploy deploys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deploy {
    /// Build this git ref ([build]) and deploy it.
    Ref(String),
    /// A container app's image tag or `@sha256:` digest.
    Image(String),
    /// A release from the history, deployed again ("deploy this release").
    Release(String),
}

impl JobRequest {
    fn kind(&self) -> RunKind {
        match self {
            JobRequest::Rollback { .. } => RunKind::Rollback,
            JobRequest::Deploy(_) | JobRequest::Preview { .. } => RunKind::Deploy,
        }
    }

    fn action(&self) -> &'static str {
        match self {
            JobRequest::Rollback { .. } => "rollback",
            JobRequest::Deploy(_) => "deploy",
            JobRequest::Preview { .. } => "preview deploy",
        }
    }

    /// The engine's request, or 422 when the app cannot take it.
    fn engine_request(
        &self,
        state: &AppState,
        app: &cutover_core::Config,
    ) -> Result<RunRequest, ApiError> {
        let container = matches!(app.kind, AppKind::Container(_));
        match self {
            JobRequest::Rollback { to } => Ok(RunRequest::Rollback { to: to.clone() }),
            JobRequest::Preview {
                what: Deploy::Release(_),
                ..
            } => Err(ApiError::Invalid(
                "a preview deploys a ref or an image, not a release".into(),
            )),
            JobRequest::Preview { pr, what } => JobRequest::Deploy(what.clone())
                .engine_request(state, app)
                .map_err(|e| match e {
                    ApiError::Invalid(m) => ApiError::Invalid(format!("preview #{pr}: {m}")),
                    other => other,
                }),
            JobRequest::Deploy(Deploy::Release(id)) => Ok(RunRequest::Redeploy {
                release: id.clone(),
            }),
            JobRequest::Deploy(Deploy::Image(_)) if !container => Err(ApiError::Invalid(format!(
                "`{}` is a files app: deploy a ref (with a [build] section) or a release, not an image",
                app.app
            ))),
            JobRequest::Deploy(Deploy::Image(image)) => Ok(RunRequest::Image {
                image: image.clone(),
            }),
            JobRequest::Deploy(Deploy::Ref(_)) if app.build.is_none() => {
                Err(ApiError::Invalid(format!(
                    "`{}` has no [build] section in {}: the server can only deploy a ref it can build",
                    app.app,
                    app.file.display()
                )))
            }
            JobRequest::Deploy(Deploy::Ref(r)) => Ok(RunRequest::Build {
                git_ref: r.clone(),
                data_dir: state.data.clone(),
            }),
        }
    }
}

/// A run this server is running.
#[derive(Debug, Clone)]
struct Active {
    run: i64,
    by: String,
    kind: RunKind,
    since: String,
}

/// The jobs in progress, one per app at most.
#[derive(Debug, Default)]
pub struct Runner {
    active: Mutex<HashMap<String, Active>>,
}

/// A reservation of an app by work that is not a run ([`Runner::reserve`]), until dropped.
pub struct Reserved<'a> {
    runner: &'a Runner,
    app: String,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.runner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.app);
    }
}

impl Runner {
    /// Reserves `app` for `by` (a preview's removal): while the guard lives, a job of it is
    /// refused (409) as if one ran. `None` while a job of it runs.
    pub fn reserve(&self, app: &str, by: &str) -> Option<Reserved<'_>> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.contains_key(app) {
            return None;
        }
        active.insert(
            app.to_string(),
            Active {
                run: 0,
                by: by.to_string(),
                kind: RunKind::Deploy,
                since: cutover_engine::now_utc(),
            },
        );
        Some(Reserved {
            runner: self,
            app: app.to_string(),
        })
    }

    /// Whether this server runs a job of `app` (or of the preview app of that name) now.
    pub fn is_running_app(&self, app: &str) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(app)
    }

    /// Whether this server is running `run` right now.
    pub fn is_running(&self, run: i64) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|a| a.run == run)
    }
}

/// Marks the jobs a previous server process left queued or running as interrupted. A job
/// whose app lock a live process holds is left alone: another server on the same PostgreSQL
/// database is running it.
pub fn reconcile(store: &Store) -> cutover_store::Result<()> {
    let at = cutover_engine::now_utc();
    for job in store.open_jobs()? {
        if store
            .lock_holder(&job.app)?
            .is_some_and(|h| identity::alive(&h))
        {
            continue;
        }
        interrupted(store, &job, &at)?;
    }
    Ok(())
}

/// Marks `job` interrupted (its server stopped): it is not re-run; the app's next run
/// reconciles the hosts from the run's events and what they serve.
fn interrupted(store: &Store, job: &cutover_store::Job, at: &str) -> cutover_store::Result<()> {
    store.set_job_state(job.id, JobState::Interrupted, Some(at))?;
    store.audit(&AuditRow {
        at: at.to_string(),
        who: "server".into(),
        action: "job interrupted".into(),
        app: Some(job.app.clone()),
        detail: format!(
            "run {} by {} did not finish (the server stopped); not re-run",
            job.run_id, job.by
        ),
        ..AuditRow::default()
    })
}

/// A run's status as the API says it: the release status it ended with, `running` while this
/// server or a live process holding the app's lock runs it, else `interrupted`.
pub fn run_status(state: &AppState, run: &RunRow) -> String {
    if let Some(o) = &run.outcome {
        return o.clone();
    }
    if state.jobs.is_running(run.id) {
        return "running".into();
    }
    let held = state
        .store
        .lock_holder(&run.app)
        .ok()
        .flatten()
        .is_some_and(|h| identity::alive(&h));
    let newest = state
        .store
        .unfinished_runs(&run.app)
        .ok()
        .and_then(|r| r.last().map(|r| r.id))
        == Some(run.id);
    if held && newest {
        "running".into()
    } else {
        "interrupted".into()
    }
}

/// Starts a job: 409 while a run of the app is in progress, 422 for a request the app cannot
/// take. The answer is the run's id; the run happens on a worker thread.
pub fn submit(
    state: &Arc<AppState>,
    app: &str,
    req: JobRequest,
    by: &Principal,
    from: IpAddr,
) -> Result<i64, ApiError> {
    let base = state.app(app)?.clone();
    let engine_req = req.engine_request(state, &base)?;
    // A preview is an app of its own: its own lock, run rows and history.
    let (config, key) = match &req {
        JobRequest::Preview { pr, .. } => {
            let c = base
                .preview(*pr)
                .map_err(|e| ApiError::Invalid(e.to_string()))?;
            cutover_engine::preview::admit(&base, *pr, &state.store)
                .map_err(|e| ApiError::Invalid(e.to_string()))?;
            let key = c.app.clone();
            (c, key)
        }
        _ => ((*base).clone(), app.to_string()),
    };
    let app = key.as_str();
    let who = by.who();
    let at = cutover_engine::now_utc();
    let mut active = state.jobs.active.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = active.get(app).filter(|a| a.run == 0) {
        return Err(ApiError::Conflict(format!(
            "`{app}` is being removed by {} since {}",
            a.by, a.since
        )));
    }
    if let Some(a) = active.get(app) {
        return Err(ApiError::Conflict(format!(
            "a {} of `{app}` is in progress: run {} by {} holds the lock since {}; wait for it to end",
            a.kind.as_str(),
            a.run,
            a.by,
            a.since
        )));
    }
    // The app's lock in the database is taken now, before answering, so that of two servers
    // on one database (or a server and a CLI) only one accepts; the engine takes it again as
    // the same process when the job runs, and `work` releases it.
    let me = identity::me(req.kind().as_str(), &at);
    match state.store.acquire_lock(app, &me, identity::alive)? {
        LockOutcome::Held(h) => {
            return Err(ApiError::Conflict(format!(
                "a {} of `{app}` is in progress: {}@{} pid {} holds the lock since {}; wait for it to end",
                h.op, h.user, h.machine, h.pid, h.since
            )))
        }
        LockOutcome::TookOver(h) => {
            // The holder died (or its lease ran out): a server's job it ran is interrupted.
            // This server runs no job of the app (see `active`), so every open one is.
            eprintln!(
                "took over the lock of app `{app}` from a process that is gone: {}",
                identity::describe(&h)
            );
            for job in state.store.open_jobs()?.iter().filter(|j| j.app == app) {
                interrupted(&state.store, job, &at)?;
            }
        }
        LockOutcome::Acquired => {}
    }
    let accepted = accept(state, app, &req, &who, &at, from);
    let (run, job) = match accepted {
        Ok(x) => x,
        Err(e) => {
            let _ = state.store.release_lock(app, &me);
            return Err(e);
        }
    };
    active.insert(
        app.to_string(),
        Active {
            run,
            by: who,
            kind: req.kind(),
            since: at,
        },
    );
    drop(active);
    let st = state.clone();
    let name = app.to_string();
    let holder = me.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("job-{run}"))
        .spawn(move || {
            let pr = match &req {
                JobRequest::Preview {
                    pr,
                    what: Deploy::Ref(head) | Deploy::Image(head) | Deploy::Release(head),
                } => Some((*pr, head.clone())),
                _ => None,
            };
            let job = Work {
                app: &name,
                base: &base,
                config: &config,
                preview: pr,
                job,
                run,
            };
            work(&st, job, engine_req, &holder)
        });
    if let Err(e) = spawned {
        state
            .jobs
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
        let _ = state
            .store
            .finish_run(run, Status::Failed, &cutover_engine::now_utc());
        let _ = state.store.release_lock(app, &me);
        return Err(ApiError::Internal(format!("cannot start the job: {e}")));
    }
    Ok(run)
}

/// The rows of an accepted job: its run (the answer), the job and the audit row.
fn accept(
    state: &AppState,
    app: &str,
    req: &JobRequest,
    who: &str,
    at: &str,
    from: IpAddr,
) -> Result<(i64, i64), ApiError> {
    let live = state.store.live(app)?;
    let run = state
        .store
        .start_run(app, req.kind(), "", live.as_deref(), at)?;
    state.store.set_run_by(run, who)?;
    let request = serde_json::to_string(req).unwrap_or_default();
    let job = state.store.add_job(run, app, &request, who, at)?;
    let release = match req {
        JobRequest::Rollback { to } => to.clone(),
        JobRequest::Deploy(Deploy::Release(r)) => Some(r.clone()),
        JobRequest::Deploy(_) | JobRequest::Preview { .. } => None,
    };
    state.store.audit(&AuditRow {
        at: at.to_string(),
        who: who.to_string(),
        action: req.action().into(),
        app: Some(app.into()),
        release,
        from: Some(from.to_string()),
        detail: format!("run {run}: {request}"),
        ..AuditRow::default()
    })?;
    Ok((run, job))
}

/// Notes the engine has for people go to the server's log.
struct Log {
    run: i64,
}

impl cutover_engine::Reporter for Log {
    fn note(&self, text: &str) {
        eprintln!("run {}: {text}", self.run);
    }
}

/// What a worker runs: a job of `app` (`preview`: the pull request and head of a preview of
/// `base`, whose own config is `config`).
struct Work<'a> {
    app: &'a str,
    base: &'a cutover_core::Config,
    config: &'a cutover_core::Config,
    preview: Option<(u64, String)>,
    job: i64,
    run: i64,
}

/// The worker: runs the job, then frees the app.
fn work(state: &AppState, w: Work<'_>, req: RunRequest, holder: &Holder) {
    let Work {
        app,
        base,
        config,
        preview,
        job,
        run,
    } = w;
    let done = || {
        // The engine released the lock it took; a run refused before it locked did not.
        let _ = state.store.release_lock(app, holder);
        let _ = state
            .store
            .set_job_state(job, JobState::Done, Some(&cutover_engine::now_utc()));
        state
            .jobs
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
    };
    let _ = state.store.set_job_state(job, JobState::Running, None);
    // The server's one connection: a second `Store::open` in this process would open and
    // close the database file beside it, and closing any descriptor of a file drops every
    // POSIX lock this process holds on it (SQLite's locks included).
    let store = &state.store;
    let artifacts = ArtifactStore::new(state.data.join("artifacts"));
    let job_of = Job {
        request: req,
        run: Some(run),
    };
    let out = match preview {
        Some((pr, head)) => cutover_engine::preview::deploy(
            base,
            pr,
            &head,
            store,
            &artifacts,
            &Log { run },
            job_of,
        ),
        None => cutover_engine::run(config, store, &artifacts, &Log { run }, job_of),
    };
    eprintln!(
        "run {run} of {app} ended: {} (exit {}): {}",
        out.status.as_str(),
        out.exit_code,
        out.message
    );
    done();
}

/// Who reconciles: this server, as the audit and the run's message name it.
fn server_id(me: &Holder) -> String {
    format!("server {}@{} pid {}", me.user, me.machine, me.pid)
}

/// Starts the sweeper thread: at once, then every `every`, [`sweep`] each configured app.
/// It stops when the server's state is dropped.
pub fn start_sweeper(state: &Arc<AppState>, every: Duration) {
    let weak = Arc::downgrade(state);
    let spawned = std::thread::Builder::new()
        .name("sweeper".into())
        .spawn(move || {
            let mut later: HashMap<String, Instant> = HashMap::new();
            while let Some(state) = weak.upgrade() {
                let apps: Vec<String> = state.apps.keys().cloned().collect();
                for app in apps {
                    if later.get(&app).is_some_and(|t| Instant::now() < *t) {
                        continue;
                    }
                    if let Err(e) = sweep(&state, &app) {
                        eprintln!("cannot reconcile app `{app}` yet (retrying later): {e}");
                        later.insert(app, Instant::now() + every * 6);
                    }
                }
                drop(state);
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        eprintln!("cannot start the sweeper: {e}");
    }
}

/// Reconciles `app` if it has a run no live process is running (a killed server or CLI: on
/// PostgreSQL, one whose lease expired): takes the app's lock (the same atomic acquire as a
/// job, so one server does it), marks the dead holder's jobs interrupted, runs the engine's
/// reconciliation (the hosts back to the live release, the runs and releases marked), records
/// it in the audit, and frees the app.
pub fn sweep(state: &Arc<AppState>, app: &str) -> Result<(), String> {
    let config = state.app(app).map_err(|e| e.to_string())?.clone();
    let store = &state.store;
    let unfinished = store.unfinished_runs(app).map_err(|e| e.to_string())?;
    let Some(run) = unfinished.last() else {
        return Ok(());
    };
    if store
        .lock_holder(app)
        .map_err(|e| e.to_string())?
        .is_some_and(|h| identity::alive(&h))
    {
        return Ok(());
    }
    let at = cutover_engine::now_utc();
    let me = identity::me("reconcile", &at);
    let by = server_id(&me);
    {
        let mut active = state.jobs.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.contains_key(app) {
            return Ok(());
        }
        match store
            .acquire_lock(app, &me, identity::alive)
            .map_err(|e| e.to_string())?
        {
            LockOutcome::Held(_) => return Ok(()),
            LockOutcome::TookOver(h) => eprintln!(
                "took over the lock of app `{app}` from a process that is gone: {}",
                identity::describe(&h)
            ),
            LockOutcome::Acquired => {}
        }
        active.insert(
            app.to_string(),
            Active {
                run: run.id,
                by: by.clone(),
                kind: RunKind::parse(&run.kind).unwrap_or(RunKind::Deploy),
                since: at.clone(),
            },
        );
    }
    let r = reconcile_held(state, &config, (app, run.id), &by, &at);
    let _ = store.release_lock(app, &me);
    state
        .jobs
        .active
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(app);
    r
}

/// [`sweep`] once the app's lock is this server's.
fn reconcile_held(
    state: &AppState,
    config: &cutover_core::Config,
    (app, run): (&str, i64),
    by: &str,
    at: &str,
) -> Result<(), String> {
    let store = &state.store;
    // This server runs no job of the app (see `active`), so every open one is a dead one's.
    for job in store
        .open_jobs()
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|j| j.app == app)
    {
        interrupted(store, job, at).map_err(|e| e.to_string())?;
    }
    let artifacts = ArtifactStore::new(state.data.join("artifacts"));
    let log = Log { run };
    match cutover_engine::reconcile(config, store, &artifacts, &log, by) {
        Ok(None) | Err(cutover_engine::DeployError::Locked { .. }) => Ok(()),
        Ok(Some(done)) => {
            eprintln!("run {}: {}", done.run, done.message);
            store
                .audit(&AuditRow {
                    at: cutover_engine::now_utc(),
                    who: "server".into(),
                    action: "run reconciled".into(),
                    app: Some(app.into()),
                    detail: format!("run {}: {}", done.run, done.message),
                    ..AuditRow::default()
                })
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

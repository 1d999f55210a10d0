//! The one recorder of a run: its row in the history, its events (database first, then the
//! reporter), its hosts' outcomes. Two kinds of writes:
//!
//! * [`Recorder::guard`]: the event that precedes a change to a host. If it cannot be
//!   written the change must not happen, so it is an error the caller returns.
//! * everything else goes through [`Recorder::best_effort`], which says once, to the
//!   reporter, what it could not record instead of dropping it silently.

use super::error::DeployError;
use crate::{Event, Reporter};
use cutover_core::{HostState, RunKind, State, Status, Step};
use cutover_store::Store;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub struct Recorder<'a> {
    pub(crate) store: &'a Store,
    pub(crate) reporter: &'a dyn Reporter,
    pub(crate) app: &'a str,
    pub(crate) run_id: i64,
    release: Mutex<String>,
    dropped: AtomicBool,
    /// Held from an event's insert to its report, so reporters see events in `seq` order.
    order: Mutex<()>,
}

impl<'a> Recorder<'a> {
    /// Starts a run row for `release` (empty while a build has not produced it yet), or takes
    /// over the row the caller made beforehand (`made`: a server job answers with its run id
    /// before the run starts).
    pub(crate) fn start(
        store: &'a Store,
        reporter: &'a dyn Reporter,
        app: &'a str,
        kind: RunKind,
        release: &str,
        live: Option<&str>,
        made: Option<i64>,
    ) -> Result<Recorder<'a>, DeployError> {
        let started = match made {
            Some(id) => store.claim_run(id, release, live).map(|()| id),
            None => store
                .start_run(app, kind, release, live, &crate::now_utc())
                .and_then(|id| {
                    store.set_run_by(id, &crate::identity::me("", "").user)?;
                    Ok(id)
                }),
        };
        let run_id = started.map_err(|e| DeployError::Store(e.to_string()))?;
        Ok(Recorder {
            store,
            reporter,
            app,
            run_id,
            release: Mutex::new(release.to_string()),
            dropped: AtomicBool::new(false),
            order: Mutex::new(()),
        })
    }

    /// Records onto an existing run, unfinished, that another process started and left
    /// (the reconciliation of a dead process's run appends its steps to that run).
    pub(crate) fn resume(
        store: &'a Store,
        reporter: &'a dyn Reporter,
        app: &'a str,
        run_id: i64,
        release: &str,
    ) -> Recorder<'a> {
        Recorder {
            store,
            reporter,
            app,
            run_id,
            release: Mutex::new(release.to_string()),
            dropped: AtomicBool::new(false),
            order: Mutex::new(()),
        }
    }

    pub(crate) fn release(&self) -> String {
        self.release
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The run now deploys `id` (known once a build or a pull pinned it).
    pub(crate) fn set_release(&self, id: &str) -> Result<(), DeployError> {
        *self.release.lock().unwrap_or_else(|p| p.into_inner()) = id.to_string();
        self.store
            .set_run_release(self.run_id, id)
            .map_err(|e| DeployError::Store(e.to_string()))
    }

    fn write(
        &self,
        host: Option<&str>,
        step: Step,
        state: State,
        detail: &str,
        shown: Option<&str>,
    ) -> Result<(), String> {
        let at = crate::now_utc();
        let release = self.release();
        let _in_order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.store.event(
            self.run_id,
            self.app,
            &release,
            host,
            step,
            state,
            &at,
            detail,
        );
        self.reporter.event(&Event {
            run: self.run_id,
            seq: seq.as_ref().ok().copied(),
            app: self.app,
            release: &release,
            host,
            step,
            state,
            time: crate::now_utc_ms(),
            detail,
            shown,
        });
        seq.map(|_| ())
            .map_err(|e| format!("cannot record the {step} step in the history: {e}"))
    }

    /// Records the event that guards a host change; `Err`: the change must not be made.
    pub(crate) fn guard(
        &self,
        host: Option<&str>,
        step: Step,
        state: State,
        detail: &str,
    ) -> Result<(), DeployError> {
        self.write(host, step, state, detail, None).map_err(|e| {
            self.reporter.note(&e);
            DeployError::NotRecorded
        })
    }

    /// Records an event for the record; a failure to record is said, not fatal.
    pub(crate) fn ev(&self, host: Option<&str>, step: Step, state: State, detail: &str) {
        let r = self.write(host, step, state, detail, None);
        self.best_effort(r);
    }

    /// Records an event of the whole run for the record.
    pub(crate) fn run_ev(&self, step: Step, state: State, detail: &str) {
        self.ev(None, step, state, detail);
    }

    /// Records an event and shows people `text` instead of the bare step line.
    pub(crate) fn shown(&self, step: Step, state: State, detail: &str, text: &str) {
        let r = self.write(None, step, state, detail, Some(text));
        self.best_effort(r);
    }

    /// The one place a write that may fail without stopping the run goes: what it dropped
    /// is said to the reporter (once per run in full, then counted silently).
    pub(crate) fn best_effort<E: std::fmt::Display>(&self, r: Result<(), E>) {
        if let Err(e) = r {
            if !self.dropped.swap(true, Ordering::SeqCst) {
                self.reporter
                    .note(&format!("warning: not recorded in the history: {e}"));
            }
        }
    }

    pub(crate) fn host_outcome(&self, host: &str, state: HostState) {
        let r = self
            .store
            .set_host_outcome(self.app, &self.release(), host, state);
        self.best_effort(r);
    }

    pub(crate) fn set_status(&self, release: &str, status: Status) {
        let r = self
            .store
            .set_status(self.app, release, status, Some(&crate::now_utc()));
        self.best_effort(r);
    }

    /// Ends the run row (with its exit code and message) and records its last event. The
    /// exit code is written before the outcome: a reader that sees the run ended (another
    /// server's event stream) reads its exit code with it.
    pub(crate) fn finish(&self, status: Status, exit_code: i32, message: &str) {
        let r = self
            .store
            .set_run_exit(self.run_id, exit_code, message)
            .and_then(|()| {
                self.store
                    .finish_run(self.run_id, status, &crate::now_utc())
            });
        self.best_effort(r);
        let state = if exit_code == crate::exit::OK {
            State::Done
        } else {
            State::Failed
        };
        self.ev(None, Step::Run, state, message);
    }
}

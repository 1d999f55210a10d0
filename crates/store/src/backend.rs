//! The store's backend trait: every query the engine, the server and the CLI make, written
//! once per backend ([`crate::Sqlite`] in `lib.rs`, `server.rs`, `webhooks.rs` and
//! `previews.rs`;
//! [`crate::Postgres`] in `pg.rs`). Each backend has the methods as inherent methods with
//! these signatures; the macro below declares the trait and implements it for both by calling
//! them, so a new query is one line here plus its SQL in each backend. PostgreSQL's calls go
//! through `pg::off_runtime` (the sync client cannot block inside the server's async runtime).

use crate::{
    AuditRow, Delivery, Event, Holder, Job, JobState, LockOutcome, NewRelease, Preview, Release,
    Result, Role, Run, RunRow, Session, Token, User,
};
use cutover_core::{HostState, RunKind, State, Status, Step};

macro_rules! backend {
    ($( $(#[$m:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)* $(,)?) -> $ret:ty; )*) => {
        /// One database the store can live in. Call its methods on a [`crate::Store`].
        #[allow(clippy::too_many_arguments)]
        pub trait Backend: Send + Sync + std::fmt::Debug {
            /// `sqlite` or `postgres`.
            fn kind(&self) -> &'static str;
            /// Takes the app lock (see [`crate::Store::acquire_lock`]).
            fn acquire_lock(&self, app: &str, me: &Holder, alive: &(dyn Fn(&Holder) -> bool + Sync)) -> Result<LockOutcome>;
            $( $(#[$m])* fn $name(&self $(, $arg: $ty)*) -> $ret; )*
        }
        #[allow(clippy::too_many_arguments)]
        impl Backend for crate::Sqlite {
            fn kind(&self) -> &'static str {
                "sqlite"
            }
            fn acquire_lock(&self, app: &str, me: &Holder, alive: &(dyn Fn(&Holder) -> bool + Sync)) -> Result<LockOutcome> {
                crate::Sqlite::acquire_lock(self, app, me, alive)
            }
            $( fn $name(&self $(, $arg: $ty)*) -> $ret { crate::Sqlite::$name(self $(, $arg)*) } )*
        }
        #[allow(clippy::too_many_arguments)]
        impl Backend for crate::Postgres {
            fn kind(&self) -> &'static str {
                "postgres"
            }
            fn acquire_lock(&self, app: &str, me: &Holder, alive: &(dyn Fn(&Holder) -> bool + Sync)) -> Result<LockOutcome> {
                crate::pg::off_runtime(|| crate::Postgres::acquire_lock(self, app, me, alive))
            }
            $( fn $name(&self $(, $arg: $ty)*) -> $ret {
                crate::pg::off_runtime(|| crate::Postgres::$name(self $(, $arg)*))
            } )*
        }
    };
}

backend! {
    /// Releases the lock if `me` holds it.
    fn release_lock(&self, app: &str, me: &Holder) -> Result<()>;
    fn insert_release(&self, r: &NewRelease<'_>) -> Result<()>;
    fn release_exists(&self, app: &str, id: &str) -> Result<bool>;
    fn set_status(&self, app: &str, id: &str, status: Status, finished_at: Option<&str>) -> Result<()>;
    fn set_bad(&self, app: &str, id: &str, bad: bool) -> Result<()>;
    fn set_host_outcome(&self, app: &str, release_id: &str, host: &str, outcome: HostState) -> Result<()>;
    fn live(&self, app: &str) -> Result<Option<String>>;
    fn set_live(&self, app: &str, release_id: &str) -> Result<()>;
    /// All releases of `app`, newest first.
    fn releases(&self, app: &str) -> Result<Vec<Release>>;
    fn release(&self, app: &str, id: &str) -> Result<Option<Release>>;
    fn start_run(&self, app: &str, kind: RunKind, release_id: &str, previous_live: Option<&str>, at: &str) -> Result<i64>;
    /// Names the release a run works on once it is known; the run's events so far follow.
    fn set_run_release(&self, run_id: i64, release_id: &str) -> Result<()>;
    /// The artifact a reproducible build with `key` produced before, if any.
    fn cached_build(&self, app: &str, key: &str) -> Result<Option<String>>;
    /// Remembers that the build with `key` (of `commit`) produced `artifact_sha256`.
    fn record_build(&self, app: &str, key: &str, commit: &str, artifact_sha256: &str, at: &str) -> Result<()>;
    fn finish_run(&self, run_id: i64, outcome: Status, at: &str) -> Result<()>;
    /// Runs of `app` that never finished (their process died).
    fn unfinished_runs(&self, app: &str) -> Result<Vec<Run>>;
    /// Records one step; the answer is its seq.
    fn event(&self, run_id: i64, app: &str, release_id: &str, host: Option<&str>, step: Step, phase: State, at: &str, detail: &str) -> Result<i64>;
    fn events(&self, run_id: i64) -> Result<Vec<Event>>;

    /// Takes over a run row made beforehand: the release it works on and the live release.
    fn claim_run(&self, run_id: i64, release_id: &str, previous_live: Option<&str>) -> Result<()>;
    /// Who started the run: a user, `token:NAME`, or the OS user of a CLI run.
    fn set_run_by(&self, run_id: i64, by: &str) -> Result<()>;
    /// How the run ended: its exit code and the sentence saying so.
    fn set_run_exit(&self, run_id: i64, exit_code: i32, message: &str) -> Result<()>;
    fn run_row(&self, run_id: i64) -> Result<Option<RunRow>>;
    /// The newest `limit` runs of `app` (every app: `None`), newest first.
    fn run_rows(&self, app: Option<&str>, limit: u32) -> Result<Vec<RunRow>>;
    /// The events of a run after `after` (a seq), oldest first, at most `limit`.
    fn events_after(&self, run_id: i64, after: i64, limit: u32) -> Result<Vec<Event>>;
    /// One page of `app`'s releases, newest first: at most `limit`, older than `before`.
    fn releases_page(&self, app: &str, limit: u32, before: Option<&str>) -> Result<Vec<Release>>;
    /// Who holds `app`'s lock, if anyone (an expired lease: no one).
    fn lock_holder(&self, app: &str) -> Result<Option<Holder>>;
    /// Adds a user; `false` if the name is taken.
    fn add_user(&self, name: &str, role: Role, password_hash: &str, at: &str) -> Result<bool>;
    fn user(&self, name: &str) -> Result<Option<User>>;
    fn users(&self) -> Result<Vec<User>>;
    /// Removes a user and ends their sessions; `false` if there is no such user.
    fn remove_user(&self, name: &str) -> Result<bool>;
    /// Sets a user's password and ends their sessions; `false` if there is no such user.
    fn set_password(&self, name: &str, password_hash: &str) -> Result<bool>;
    /// Adds a token; `false` if the name is taken.
    fn add_token(&self, t: &Token) -> Result<bool>;
    fn tokens(&self) -> Result<Vec<Token>>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<Token>>;
    fn touch_token(&self, name: &str, at: &str) -> Result<()>;
    /// Revokes a token; `false` if there is no such token or it was revoked already.
    fn revoke_token(&self, name: &str, at: &str) -> Result<bool>;
    fn add_session(&self, hash: &str, user: &str, csrf: &str, at: &str, expires_at: i64) -> Result<()>;
    fn session(&self, hash: &str) -> Result<Option<Session>>;
    fn remove_session(&self, hash: &str) -> Result<()>;
    /// Forgets sessions that expired before `now` (unix seconds).
    fn prune_sessions(&self, now: i64) -> Result<()>;
    /// Failed logins of `user` from `addr` since the last success: (count, last unix seconds).
    fn login_failures(&self, user: &str, addr: &str) -> Result<(u32, i64)>;
    fn record_login_failure(&self, user: &str, addr: &str, now: i64) -> Result<()>;
    fn clear_login_failures(&self, user: &str, addr: &str) -> Result<()>;
    /// Appends an audit row (the log is append-only).
    fn audit(&self, row: &AuditRow) -> Result<()>;
    /// Audit rows, newest first: at most `limit`, older than id `before`.
    fn audit_rows(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRow>>;
    fn add_job(&self, run_id: i64, app: &str, request: &str, by: &str, at: &str) -> Result<i64>;
    fn set_job_state(&self, id: i64, state: JobState, at: Option<&str>) -> Result<()>;
    /// Jobs that were queued or running.
    fn open_jobs(&self) -> Result<Vec<Job>>;
    fn job_of_run(&self, run_id: i64) -> Result<Option<Job>>;
    /// Records a delivery; `false` (and nothing written) when the app already has one with
    /// this id.
    fn add_delivery(&self, app: &str, delivery: &str, provider: &str, at: &str, outcome: &str) -> Result<bool>;
    /// Sets what a delivery did (and the commit it carried).
    fn set_delivery_outcome(&self, app: &str, delivery: &str, sha: Option<&str>, outcome: &str) -> Result<()>;
    /// A delivery, if the app has one with this id.
    fn delivery(&self, app: &str, delivery: &str) -> Result<Option<Delivery>>;

    /// Marks a preview open (a new row, or a removed one opened again) with what it is deployed
    /// from; an open one just gets the new head.
    fn open_preview(&self, app: &str, pr: u64, url: &str, head_ref: &str, at: &str) -> Result<()>;
    /// Records the commit a preview's deploy built.
    fn set_preview_sha(&self, app: &str, pr: u64, sha: &str, at: &str) -> Result<()>;
    /// Marks a preview removed (its row stays); `false` if it was not open.
    fn remove_preview(&self, app: &str, pr: u64, at: &str, why: &str) -> Result<bool>;
    /// Marks an open preview `closing` (its pull request closed during a run of it): no longer
    /// open, so a restarted server removes it; `false` if it was not open.
    fn close_preview(&self, app: &str, pr: u64, why: &str) -> Result<bool>;
    /// A preview, if the app ever had one for this pull request.
    fn preview(&self, app: &str, pr: u64) -> Result<Option<Preview>>;
    /// The app's previews by pull request number; only the open ones unless `all`.
    fn previews(&self, app: &str, all: bool) -> Result<Vec<Preview>>;
}

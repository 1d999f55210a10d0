//! The deploy history in SQLite (WAL): releases, per-host outcomes, every step as an event
//! (written before and after the step runs), runs (one per deploy or rollback command), the
//! live pointer per app, and the app lock.
//!
//! **Invariant:** an event row for a step is committed before the step touches a host, so a
//! crash at any moment leaves enough in here, together with what the hosts report, to
//! reconcile. This crate knows nothing of hosts or SSH: it stores what it is told.

use cutover_core::{HostState, RunKind, State, Status, Step};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

mod backend;
mod copy;
mod pg;
mod pgtls;
mod previews;
mod server;
#[cfg(test)]
mod suite;
#[doc(hidden)]
pub mod testing;
pub use copy::{copy_sqlite_to_postgres, Copied};
mod webhooks;
pub use backend::Backend;
pub use pg::{DatabaseUrl, Postgres};
pub use previews::Preview;
pub use server::{AuditRow, Job, JobState, Role, RunRow, Session, Token, User};
pub use webhooks::Delivery;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sql {
        path: String,
        source: rusqlite::Error,
    },
    /// A file exists at the database's path but is not cutover's database (empty, not
    /// SQLite, another program's schema, or a newer cutover's): nothing was written to it.
    #[error("database {path}: {why}; cutover did not touch it. {todo}")]
    NotOurs {
        path: String,
        why: String,
        todo: &'static str,
    },
    /// PostgreSQL said no (or could not be reached); `name` is the URL without its password.
    #[error("database {name}: {message}")]
    Pg {
        name: String,
        message: String,
        source: postgres::Error,
    },
    /// A database URL cutover cannot use as given (its TLS parameters); `name` is the URL
    /// without its password.
    #[error("database {name}: {message}")]
    Url { name: String, message: String },
    #[error("database {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What to do about a file that is not cutover's database.
const NOT_OURS_TODO: &str = "If this is the wrong data directory, point cutover at the right one (--data or CUTOVER_DATA); otherwise restore the file from a backup, or move it away to start a new, empty history";

/// `PRAGMA application_id` of cutover's database ("cutv"), set when it is created (and on
/// the first open of a database made before the id existed).
pub const APPLICATION_ID: i32 = 0x6375_7476;

/// The tables each schema version has (index = `user_version` - 1), to recognise cutover's
/// databases made before [`APPLICATION_ID`].
const TABLES: &[&[&str]] = &[
    &[
        "releases",
        "host_outcomes",
        "runs",
        "events",
        "live",
        "locks",
    ],
    &["build_cache"],
    &[
        "users",
        "tokens",
        "sessions",
        "login_failures",
        "audit",
        "jobs",
    ],
    &["webhook_deliveries"],
    &["previews"],
];

pub type Result<T> = std::result::Result<T, StoreError>;

/// Who holds (or wants) a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub user: String,
    pub machine: String,
    pub pid: u32,
    /// Process start time as the kernel counts it (ticks since boot), to tell a reused pid.
    pub pid_start: u64,
    pub since: String,
    pub op: String,
}

impl Holder {
    /// Whether `self` and `other` are the same process (machine, pid and its start time).
    pub fn same_process(&self, other: &Holder) -> bool {
        self.machine == other.machine && self.pid == other.pid && self.pid_start == other.pid_start
    }
}

/// What trying to take the app lock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    Acquired,
    /// A lock left by a dead process was taken over.
    TookOver(Holder),
    Held(Holder),
}

/// One release as history shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub id: String,
    pub app: String,
    pub status: String,
    pub bad: bool,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub artifact_sha256: String,
    /// The full 40-character commit id, for releases built from git.
    pub commit: Option<String>,
    /// The commit's subject line, recorded when the release was built.
    pub commit_subject: Option<String>,
    pub source: String,
    pub snapshot: String,
    pub hosts: BTreeMap<String, String>,
}

/// A release as `cutover history --json` prints it and `GET /api/apps/{app}/releases` answers
/// (one shape for both).
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub id: String,
    pub status: String,
    pub live: bool,
    pub bad: bool,
    pub created_at: String,
    pub artifact_sha256: String,
    /// The full commit id (releases built from git).
    pub commit: Option<String>,
    pub commit_subject: Option<String>,
    pub source: String,
    pub hosts: BTreeMap<String, String>,
}

impl HistoryRow {
    /// `r` as history shows it, `live` being the app's live release.
    pub fn new(r: Release, live: Option<&str>) -> HistoryRow {
        HistoryRow {
            live: live == Some(r.id.as_str()),
            id: r.id,
            status: r.status,
            bad: r.bad,
            created_at: r.created_at,
            artifact_sha256: r.artifact_sha256,
            commit: r.commit,
            commit_subject: r.commit_subject,
            source: r.source,
            hosts: r.hosts,
        }
    }
}

/// One recorded step.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: i64,
    pub run_id: i64,
    pub release_id: String,
    pub host: Option<String>,
    pub step: String,
    pub phase: String,
    pub at: String,
    pub detail: String,
}

/// One deploy or rollback command.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub app: String,
    pub kind: String,
    pub release_id: String,
    pub previous_live: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: Option<String>,
}

/// A new release row.
#[derive(Debug, Clone)]
pub struct NewRelease<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub created_at: &'a str,
    pub artifact_sha256: &'a str,
    pub commit: Option<&'a str>,
    pub commit_subject: Option<&'a str>,
    pub source: &'a str,
    pub snapshot: &'a str,
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE releases (
    id TEXT NOT NULL,
    app TEXT NOT NULL,
    status TEXT NOT NULL,
    bad INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    artifact_sha256 TEXT NOT NULL,
    commit_sha TEXT,
    source TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE TABLE host_outcomes (
    app TEXT NOT NULL,
    release_id TEXT NOT NULL,
    host TEXT NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (app, release_id, host)
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    kind TEXT NOT NULL,
    release_id TEXT NOT NULL,
    previous_live TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    app TEXT NOT NULL,
    release_id TEXT NOT NULL,
    host TEXT,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_run ON events (run_id);
CREATE TABLE live (app TEXT PRIMARY KEY, release_id TEXT NOT NULL);
CREATE TABLE locks (
    app TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    machine TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER NOT NULL,
    since TEXT NOT NULL,
    op TEXT NOT NULL
);
"#,
    // 2: releases built from git record their commit's subject; reproducible builds are
    // cached by (app, key of commit + build config) -> artifact.
    r#"
ALTER TABLE releases ADD COLUMN commit_subject TEXT;
CREATE TABLE build_cache (
    app TEXT NOT NULL,
    key TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
"#,
    // 3: the server. Runs say who started them and how they ended; users, API tokens and
    // sessions (secrets only as hashes), login failures per (user, address), the append-only
    // audit log, and the server's jobs.
    r#"
ALTER TABLE runs ADD COLUMN started_by TEXT;
ALTER TABLE runs ADD COLUMN exit_code INTEGER;
ALTER TABLE runs ADD COLUMN message TEXT;
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    apps TEXT,
    created_at TEXT NOT NULL,
    expires_at INTEGER,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE login_failures (
    user TEXT NOT NULL,
    addr TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    PRIMARY KEY (user, addr)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    app TEXT,
    release_id TEXT,
    from_addr TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    app TEXT NOT NULL,
    request TEXT NOT NULL,
    started_by TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
"#,
    // 4: webhook deliveries, one per (app, delivery id): a redelivery runs nothing; the
    // outcome says what the delivery did (a run, ignored, superseded by a newer push).
    r#"
CREATE TABLE webhook_deliveries (
    app TEXT NOT NULL,
    delivery TEXT NOT NULL,
    provider TEXT NOT NULL,
    received_at TEXT NOT NULL,
    sha TEXT,
    outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app, delivery)
);
"#,
    // 5: previews, one row per (app, pull request): open or removed (the row and the
    // preview app's releases are kept as its history).
    r#"
CREATE TABLE previews (
    app TEXT NOT NULL,
    pr INTEGER NOT NULL,
    state TEXT NOT NULL,
    url TEXT NOT NULL,
    head_ref TEXT NOT NULL DEFAULT '',
    head_sha TEXT,
    opened_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    removed_at TEXT,
    removed_why TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app, pr)
);
"#,
];

/// The SQLite backend: one connection to `cutover.db` (WAL).
pub struct Sqlite {
    conn: std::sync::Mutex<Connection>,
    path: String,
    /// The database file's (device, inode), counted in [`OPEN`] while this store is open.
    file: Option<(u64, u64)>,
}

/// The store: the history and the server's rows in one of two backends, SQLite (a file in
/// the data directory, the default) or PostgreSQL (a database several servers share). Every
/// method of [`Backend`] is called on it directly.
pub struct Store {
    backend: Box<dyn Backend>,
    /// Per app, the holder whose lock this process took over (dead, or its lease expired) and
    /// still holds: its host locks are as dead as its lock here.
    taken: std::sync::Mutex<Vec<(String, Holder)>>,
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &(dyn Backend + 'static) {
        self.backend.as_ref()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.backend.fmt(f)
    }
}

impl Store {
    /// Opens (creating and migrating) the SQLite database at `path`: see [`Sqlite::open`].
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::with(Sqlite::open(path)?))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host/db`) and
    /// migrates it: see [`Postgres::connect`].
    pub fn connect(url: &str) -> Result<Store> {
        Ok(Store::with(pg::off_runtime(|| Postgres::connect(url))?))
    }

    /// How long a lock lasts on PostgreSQL without renewal: `CUTOVER_LEASE` seconds, default 30.
    pub fn lease() -> std::time::Duration {
        pg::lease_from_env()
    }

    /// Takes the app lock. `alive` says whether a recorded holder's process still runs (the
    /// caller knows how to ask the OS); a dead holder's lock is taken over, and so is an
    /// expired lease (PostgreSQL). The process that holds it already gets it again.
    pub fn acquire_lock(
        &self,
        app: &str,
        me: &Holder,
        alive: impl Fn(&Holder) -> bool + Sync,
    ) -> Result<LockOutcome> {
        let out = self.backend.acquire_lock(app, me, &alive)?;
        if let LockOutcome::TookOver(h) = &out {
            let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
            taken.retain(|(a, _)| a != app);
            taken.push((app.to_string(), h.clone()));
        }
        Ok(out)
    }

    /// Releases the lock if `me` holds it.
    pub fn release_lock(&self, app: &str, me: &Holder) -> Result<()> {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, _)| a != app);
        self.backend.release_lock(app, me)
    }

    /// The holder whose lock on `app` this process took over, while it holds it: a process
    /// that is gone, or whose lease expired (another machine's).
    pub fn took_over(&self, app: &str) -> Option<Holder> {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(a, _)| a == app)
            .map(|(_, h)| h.clone())
    }

    /// A store over `backend` (a [`Postgres`] with its own lease, in tests).
    pub fn with(backend: impl Backend + 'static) -> Store {
        Store {
            backend: Box::new(backend),
            taken: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }
}

/// Database files this process has open, with how many stores: a file already open is not
/// opened and closed again outside SQLite (closing any descriptor of a file drops every POSIX
/// lock the process holds on it, SQLite's included, and another process could then take the
/// write-ahead log away from under the open connection).
static OPEN: std::sync::Mutex<Vec<((u64, u64), usize)>> = std::sync::Mutex::new(Vec::new());

fn open_count(key: (u64, u64), delta: isize) -> usize {
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    let i = match open.iter().position(|(k, _)| *k == key) {
        Some(i) => i,
        None => {
            open.push((key, 0));
            open.len() - 1
        }
    };
    let n = (open[i].1 as isize + delta).max(0) as usize;
    open[i].1 = n;
    if n == 0 {
        open.swap_remove(i);
    }
    n
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        if let Some(key) = self.file {
            open_count(key, -1);
        }
    }
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish()
    }
}

impl Sqlite {
    /// Opens (creating and migrating) the database at `path`. A missing file is a new, empty
    /// history (created under a temporary name and linked into place only when complete, so
    /// a crash never leaves a half-made database by this name). A file that exists but is
    /// not cutover's database is [`StoreError::NotOurs`], and nothing is written to it: an
    /// empty file (a truncated database must not read as "no releases yet"), a file that is
    /// not SQLite, an SQLite database of another program, or one of a newer cutover.
    pub fn open(path: &Path) -> Result<Sqlite> {
        let p = path.display().to_string();
        let not_ours = |why: String| StoreError::NotOurs {
            path: p.clone(),
            why,
            todo: NOT_OURS_TODO,
        };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path)?,
            Err(source) => {
                return Err(StoreError::Io {
                    path: p,
                    what: "cannot look at it",
                    source,
                })
            }
            Ok(m) if !m.is_file() => {
                return Err(not_ours(format!(
                    "not a regular file (it is {})",
                    file_kind(&m.file_type())
                )))
            }
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                if open_count((m.dev(), m.ino()), 0) == 0 {
                    check_header(path, m.len()).map_err(not_ours)?;
                }
            }
        }
        let sql = |source| StoreError::Sql {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        recognise(&conn).map_err(|e| match e {
            Recognised::NotOurs(why) => not_ours(why),
            Recognised::Sql(e) => sql(e),
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        let file = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        if let Some(key) = file {
            open_count(key, 1);
        }
        let store = Sqlite {
            conn: std::sync::Mutex::new(conn),
            path: p,
            file,
        };
        store.migrate()?;
        Ok(store)
    }

    fn c(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn e(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&self) -> Result<()> {
        migrate(&self.c()).map_err(|e| self.e(e))
    }

    /// Takes the app lock. `alive` says whether a recorded holder's process still runs (the
    /// caller knows how to ask the OS); a dead holder's lock is taken over.
    pub fn acquire_lock(
        &self,
        app: &str,
        me: &Holder,
        alive: impl Fn(&Holder) -> bool,
    ) -> Result<LockOutcome> {
        let conn = self.c();
        // BEGIN IMMEDIATE: take the write lock before reading, so two runs cannot both see
        // the lock free.
        let tx =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| self.e(e))?;
        let existing = tx
            .query_row(
                "SELECT user, machine, pid, pid_start, since, op FROM locks WHERE app = ?1",
                [app],
                |r| {
                    Ok(Holder {
                        user: r.get(0)?,
                        machine: r.get(1)?,
                        pid: r.get(2)?,
                        pid_start: r.get(3)?,
                        since: r.get(4)?,
                        op: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.e(e))?;
        let outcome = match existing {
            // This very process again (a server's job, locked when it was accepted): it holds it.
            Some(h) if h.same_process(me) => LockOutcome::Acquired,
            Some(h) if alive(&h) => return Ok(LockOutcome::Held(h)),
            Some(h) => LockOutcome::TookOver(h),
            None => LockOutcome::Acquired,
        };
        tx.execute(
            "INSERT OR REPLACE INTO locks (app, user, machine, pid, pid_start, since, op) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![app, me.user, me.machine, me.pid, me.pid_start, me.since, me.op],
        )
        .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        Ok(outcome)
    }

    /// Releases the lock if `me` holds it.
    pub fn release_lock(&self, app: &str, me: &Holder) -> Result<()> {
        self.c()
            .execute(
                "DELETE FROM locks WHERE app = ?1 AND machine = ?2 AND pid = ?3 AND pid_start = ?4",
                params![app, me.machine, me.pid, me.pid_start],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn insert_release(&self, r: &NewRelease<'_>) -> Result<()> {
        self.c()
            .execute(
                "INSERT INTO releases (id, app, status, created_at, artifact_sha256, commit_sha, source, snapshot, commit_subject) VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6, ?7, ?8)",
                params![r.id, r.app, r.created_at, r.artifact_sha256, r.commit, r.source, r.snapshot, r.commit_subject],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn release_exists(&self, app: &str, id: &str) -> Result<bool> {
        self.c()
            .query_row(
                "SELECT 1 FROM releases WHERE app = ?1 AND id = ?2",
                [app, id],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.e(e))
    }

    pub fn set_status(
        &self,
        app: &str,
        id: &str,
        status: Status,
        finished_at: Option<&str>,
    ) -> Result<()> {
        self.c()
            .execute(
                "UPDATE releases SET status = ?3, finished_at = COALESCE(?4, finished_at) WHERE app = ?1 AND id = ?2",
                params![app, id, status.as_str(), finished_at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn set_bad(&self, app: &str, id: &str, bad: bool) -> Result<()> {
        self.c()
            .execute(
                "UPDATE releases SET bad = ?3 WHERE app = ?1 AND id = ?2",
                params![app, id, bad],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn set_host_outcome(
        &self,
        app: &str,
        release_id: &str,
        host: &str,
        outcome: HostState,
    ) -> Result<()> {
        self.c()
            .execute(
                "INSERT OR REPLACE INTO host_outcomes (app, release_id, host, outcome) VALUES (?1, ?2, ?3, ?4)",
                params![app, release_id, host, outcome.as_str()],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn live(&self, app: &str) -> Result<Option<String>> {
        self.c()
            .query_row("SELECT release_id FROM live WHERE app = ?1", [app], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn set_live(&self, app: &str, release_id: &str) -> Result<()> {
        self.c()
            .execute(
                "INSERT OR REPLACE INTO live (app, release_id) VALUES (?1, ?2)",
                [app, release_id],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// All releases of `app`, newest first.
    pub fn releases(&self, app: &str) -> Result<Vec<Release>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT id, app, status, bad, created_at, finished_at, artifact_sha256, commit_sha, source, snapshot, commit_subject FROM releases WHERE app = ?1 ORDER BY id DESC")
            .map_err(|e| self.e(e))?;
        let mut out: Vec<Release> = stmt
            .query_map([app], release_row)
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e))?;
        let mut stmt = conn
            .prepare("SELECT release_id, host, outcome FROM host_outcomes WHERE app = ?1")
            .map_err(|e| self.e(e))?;
        let rows: Vec<(String, String, String)> = stmt
            .query_map([app], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e))?;
        for (rid, host, outcome) in rows {
            if let Some(rel) = out.iter_mut().find(|r| r.id == rid) {
                rel.hosts.insert(host, outcome);
            }
        }
        Ok(out)
    }

    pub fn release(&self, app: &str, id: &str) -> Result<Option<Release>> {
        Ok(self.releases(app)?.into_iter().find(|r| r.id == id))
    }

    pub fn start_run(
        &self,
        app: &str,
        kind: RunKind,
        release_id: &str,
        previous_live: Option<&str>,
        at: &str,
    ) -> Result<i64> {
        let conn = self.c();
        conn.execute(
                "INSERT INTO runs (app, kind, release_id, previous_live, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, kind.as_str(), release_id, previous_live, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(conn.last_insert_rowid())
    }

    /// Names the release a run works on once it is known (a deploy from git starts its run
    /// before the build that decides the release id); the run's events so far follow.
    pub fn set_run_release(&self, run_id: i64, release_id: &str) -> Result<()> {
        let conn = self.c();
        let tx = conn.unchecked_transaction().map_err(|e| self.e(e))?;
        tx.execute(
            "UPDATE runs SET release_id = ?2 WHERE id = ?1",
            params![run_id, release_id],
        )
        .map_err(|e| self.e(e))?;
        tx.execute(
            "UPDATE events SET release_id = ?2 WHERE run_id = ?1",
            params![run_id, release_id],
        )
        .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))
    }

    /// The artifact a reproducible build with `key` produced before, if any.
    pub fn cached_build(&self, app: &str, key: &str) -> Result<Option<String>> {
        self.c()
            .query_row(
                "SELECT artifact_sha256 FROM build_cache WHERE app = ?1 AND key = ?2",
                [app, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    /// Remembers that the build with `key` (of `commit`) produced `artifact_sha256`.
    pub fn record_build(
        &self,
        app: &str,
        key: &str,
        commit: &str,
        artifact_sha256: &str,
        at: &str,
    ) -> Result<()> {
        self.c()
            .execute(
                "INSERT OR REPLACE INTO build_cache (app, key, commit_sha, artifact_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, key, commit, artifact_sha256, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn finish_run(&self, run_id: i64, outcome: Status, at: &str) -> Result<()> {
        self.c()
            .execute(
                "UPDATE runs SET outcome = ?2, finished_at = ?3 WHERE id = ?1",
                params![run_id, outcome.as_str(), at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Runs of `app` that never finished (their process died).
    pub fn unfinished_runs(&self, app: &str) -> Result<Vec<Run>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT id, app, kind, release_id, previous_live, started_at, finished_at, outcome FROM runs WHERE app = ?1 AND finished_at IS NULL ORDER BY id")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map([app], |r| {
                Ok(Run {
                    id: r.get(0)?,
                    app: r.get(1)?,
                    kind: r.get(2)?,
                    release_id: r.get(3)?,
                    previous_live: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    outcome: r.get(7)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    #[allow(clippy::too_many_arguments)]
    pub fn event(
        &self,
        run_id: i64,
        app: &str,
        release_id: &str,
        host: Option<&str>,
        step: Step,
        phase: State,
        at: &str,
        detail: &str,
    ) -> Result<i64> {
        let conn = self.c();
        conn.execute(
            "INSERT INTO events (run_id, app, release_id, host, step, phase, at, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![run_id, app, release_id, host, step.as_str(), phase.as_str(), at, detail],
        )
        .map_err(|e| self.e(e))?;
        Ok(conn.last_insert_rowid())
    }

    pub fn events(&self, run_id: i64) -> Result<Vec<Event>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT seq, run_id, release_id, host, step, phase, at, detail FROM events WHERE run_id = ?1 ORDER BY seq")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok(Event {
                    seq: r.get(0)?,
                    run_id: r.get(1)?,
                    release_id: r.get(2)?,
                    host: r.get(3)?,
                    step: r.get(4)?,
                    phase: r.get(5)?,
                    at: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }
}

/// Runs the migrations `conn`'s database has not had yet, and sets its application id.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    let id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    if id != APPLICATION_ID {
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    Ok(())
}

/// Makes a new, fully migrated database at `path`: built under a temporary name beside it,
/// then hard-linked into place, which fails rather than replace a database another process
/// made meanwhile (then that one is used).
fn create(path: &Path) -> Result<()> {
    let p = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cutover.db".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.{}-{nanos}.new", std::process::id()));
    let made = Connection::open(&tmp)
        .and_then(|conn| {
            migrate(&conn)?;
            conn.close().map_err(|(_, e)| e)
        })
        .map_err(|source| StoreError::Sql {
            path: tmp.display().to_string(),
            source,
        });
    let placed = made.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // A file system without hard links: a plain rename, unless the database appeared.
        Err(_) if path.exists() => Ok(()),
        Err(_) => std::fs::rename(&tmp, path).map_err(|source| StoreError::Io {
            path: p.clone(),
            what: "cannot create it",
            source,
        }),
    });
    let _ = std::fs::remove_file(&tmp);
    placed
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// Refuses an existing file of `len` bytes at `path` that cannot be an SQLite database: an
/// empty one (unless its write-ahead log holds the database: SQLite recovers that) and one
/// that does not start with SQLite's header.
fn check_header(path: &Path, len: u64) -> std::result::Result<(), String> {
    use std::io::Read;
    if len == 0 {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        return Err("the file is empty (0 bytes), so it holds no history: a database that was truncated must not read as \"no releases yet\"".into());
    }
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|f| {
            let mut n = 0;
            let mut f = f.take(16);
            loop {
                match f.read(&mut head[n..])? {
                    0 => return Ok(n),
                    k => n += k,
                }
            }
        })
        .map_err(|e| format!("cannot read it: {e}"))?;
    if &head[..n] != b"SQLite format 3\0" {
        return Err(format!(
            "not an SQLite database ({len} bytes that do not start with SQLite's header), so not cutover's history"
        ));
    }
    Ok(())
}

enum Recognised {
    NotOurs(String),
    Sql(rusqlite::Error),
}

/// Whether the SQLite database on `conn` is cutover's: its application id says so, or (made
/// before the id) it has the tables of its schema version; or it is an SQLite database with
/// nothing in it yet. Reads only.
fn recognise(conn: &Connection) -> std::result::Result<(), Recognised> {
    let q = |sql: &str| -> std::result::Result<i64, Recognised> {
        conn.query_row(sql, [], |r| r.get(0)).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
                ) =>
            {
                Recognised::NotOurs(format!(
                    "not a readable SQLite database ({e}), so not cutover's history"
                ))
            }
            e => Recognised::Sql(e),
        })
    };
    let id = q("PRAGMA application_id")?;
    let version = q("PRAGMA user_version")?;
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .map_err(Recognised::Sql)?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(Recognised::Sql)?;
    let known = MIGRATIONS.len() as i64;
    if id != 0 && id != i64::from(APPLICATION_ID) {
        return Err(Recognised::NotOurs(format!(
            "an SQLite database of another program (application id {id:#010x}), not cutover's history"
        )));
    }
    if version > known {
        return Err(Recognised::NotOurs(format!(
            "made by a newer cutover (schema version {version}; this one knows up to {known}): run that version or a newer one"
        )));
    }
    if version == 0 && tables.is_empty() {
        return Ok(()); // an SQLite database with nothing in it: nothing to lose
    }
    let missing: Vec<&str> = TABLES
        .iter()
        .take(version.max(1) as usize)
        .flat_map(|t| t.iter().copied())
        .filter(|t| !tables.iter().any(|have| have == t))
        .collect();
    if version == 0 || !missing.is_empty() {
        let mut shown: Vec<&str> = tables.iter().map(String::as_str).take(5).collect();
        if tables.len() > 5 {
            shown.push("...");
        }
        return Err(Recognised::NotOurs(format!(
            "an SQLite database of something else (tables: {}), not cutover's history",
            shown.join(", ")
        )));
    }
    Ok(())
}

/// A `releases` row, selected as `id, app, status, bad, created_at, finished_at,
/// artifact_sha256, commit_sha, source, snapshot, commit_subject`; hosts are filled in after.
pub(crate) fn release_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Release> {
    Ok(Release {
        id: r.get(0)?,
        app: r.get(1)?,
        status: r.get(2)?,
        bad: r.get(3)?,
        created_at: r.get(4)?,
        finished_at: r.get(5)?,
        artifact_sha256: r.get(6)?,
        commit: r.get(7)?,
        source: r.get(8)?,
        snapshot: r.get(9)?,
        commit_subject: r.get(10)?,
        hosts: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = std::env::temp_dir().join(format!("cutover-store-mig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cutover.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO releases (id, app, status, created_at, artifact_sha256, source, snapshot) VALUES ('r0', 'a', 'succeeded', 't', 'ab', 'dist', 'x')",
                [],
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let r = s.release("a", "r0").unwrap().unwrap();
        assert_eq!(r.commit_subject, None);
        assert_eq!(s.cached_build("a", "k").unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cutover-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Opening `path` fails as not cutover's database, and leaves the file as it was.
    fn refused(path: &Path) -> String {
        let before = std::fs::read(path).ok();
        let e = Store::open(path).unwrap_err();
        assert!(matches!(e, StoreError::NotOurs { .. }), "{e:?}");
        assert_eq!(std::fs::read(path).ok(), before, "{e}");
        let m = e.to_string();
        assert!(
            m.starts_with(&format!("database {}: ", path.display())),
            "{m}"
        );
        assert!(
            m.ends_with(&format!("; cutover did not touch it. {NOT_OURS_TODO}")),
            "{m}"
        );
        m
    }

    #[test]
    fn a_missing_database_is_created_complete_under_its_name() {
        let dir = scratch("new");
        let path = dir.join("cutover.db");
        Store::open(&path).unwrap().releases("a").unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("cutover.db"))
            .collect();
        assert!(names.is_empty(), "temporary files left: {names:?}");
        let c = Connection::open(&path).unwrap();
        let id: i32 = c
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(id, APPLICATION_ID);
        drop(c);
        Store::open(&path).unwrap(); // and it opens again as ours
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_empty_file_is_not_an_empty_history() {
        let dir = scratch("empty");
        let path = dir.join("cutover.db");
        std::fs::write(&path, b"").unwrap();
        let m = refused(&path);
        assert!(
            m.contains(": the file is empty (0 bytes), so it holds no history"),
            "{m}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_that_are_not_cutovers_database_are_refused_untouched() {
        let dir = scratch("foreign");
        let path = dir.join("cutover.db");

        std::fs::write(&path, b"hello\n").unwrap();
        let m = refused(&path);
        assert!(
            m.contains(": not an SQLite database (6 bytes that do not start with SQLite's header)"),
            "{m}"
        );

        let mut garbage = b"SQLite format 3\0".to_vec();
        garbage.extend(std::iter::repeat_n(0xa5u8, 8192));
        std::fs::write(&path, &garbage).unwrap();
        let m = refused(&path);
        assert!(m.contains(": not a readable SQLite database ("), "{m}");

        std::fs::remove_file(&path).unwrap();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE customers (id INTEGER); CREATE TABLE orders (id INTEGER);",
            )
            .unwrap();
        }
        let m = refused(&path);
        assert!(m.contains(": an SQLite database of something else (tables: customers, orders), not cutover's history"), "{m}");

        // Version 1 by number, but without cutover's tables.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 1)
            .unwrap();
        refused(&path);

        std::fs::remove_file(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "application_id", 42)
            .unwrap();
        let m = refused(&path);
        assert!(
            m.contains(": an SQLite database of another program (application id 0x0000002a)"),
            "{m}"
        );

        std::fs::remove_file(&path).unwrap();
        drop(Store::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let m = refused(&path);
        assert!(
            m.contains(": made by a newer cutover (schema version 99; this one knows up to 5)"),
            "{m}"
        );

        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(
            e.to_string()
                .contains(": not a regular file (it is a directory); cutover did not touch it."),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_sqlite_database_with_nothing_in_it_becomes_a_history() {
        let dir = scratch("blank");
        let path = dir.join("cutover.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); DROP TABLE t;")
            .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        Store::open(&path).unwrap().releases("a").unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

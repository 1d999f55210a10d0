//! The PostgreSQL backend: the same tables as SQLite's in a database several `cutover serve`
//! instances (and CLIs) share, with its own migrations (`cutover_schema` holds the version).
//!
//! The app lock is a **lease**: the `locks` row carries `expires_at` (unix seconds by the
//! database's clock). A thread of this process renews the leases it holds every third of the
//! lease on a connection of its own; a process that dies (kill -9, a lost machine) stops
//! renewing, and once its lease expires anyone may take the lock over, on any machine. A
//! holder on this machine whose process is gone is taken over at once, as on SQLite. Taking
//! the lock is one transaction serialised by a transaction-scoped advisory lock per app, so
//! two instances never both see it free.

use crate::pgtls;
use crate::{
    AuditRow, Delivery, Event, Holder, Job, JobState, LockOutcome, NewRelease, Release, Result,
    Role, Run, RunRow, Session, StoreError, Token, User,
};
use cutover_core::{HostState, RunKind, State, Status, Step};
use postgres::types::ToSql;
use postgres::{Client, Row};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a lock lasts without renewal, unless `CUTOVER_LEASE` (seconds) says otherwise.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Version n of the schema is `MIGRATIONS[..n]` applied in order; never edit one, append.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE releases (
    id TEXT NOT NULL,
    app TEXT NOT NULL,
    status TEXT NOT NULL,
    bad BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    artifact_sha256 TEXT NOT NULL,
    commit_sha TEXT,
    commit_subject TEXT,
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
    id BIGSERIAL PRIMARY KEY,
    app TEXT NOT NULL,
    kind TEXT NOT NULL,
    release_id TEXT NOT NULL,
    previous_live TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT,
    started_by TEXT,
    exit_code INTEGER,
    message TEXT
);
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    run_id BIGINT NOT NULL,
    app TEXT NOT NULL,
    release_id TEXT NOT NULL,
    host TEXT,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_run ON events (run_id, seq);
CREATE TABLE live (app TEXT PRIMARY KEY, release_id TEXT NOT NULL);
CREATE TABLE locks (
    app TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    machine TEXT NOT NULL,
    pid BIGINT NOT NULL,
    pid_start BIGINT NOT NULL,
    since TEXT NOT NULL,
    op TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE build_cache (
    app TEXT NOT NULL,
    key TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
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
    expires_at BIGINT,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE login_failures (
    "user" TEXT NOT NULL,
    addr TEXT NOT NULL,
    count BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    PRIMARY KEY ("user", addr)
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at TEXT NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    app TEXT,
    release_id TEXT,
    from_addr TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE FUNCTION cutover_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION cutover_audit_append_only();
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    run_id BIGINT NOT NULL,
    app TEXT NOT NULL,
    request TEXT NOT NULL,
    started_by TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
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
    // 2: previews, one row per (app, pull request), as SQLite's migration 5.
    r#"
CREATE TABLE previews (
    app TEXT NOT NULL,
    pr BIGINT NOT NULL,
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

/// The key of the session advisory lock held while migrating ("cutv").
const MIGRATION_LOCK: i64 = 0x6375_7476;

/// Seconds since the epoch by the database's clock, as SQL.
const NOW: &str = "extract(epoch from clock_timestamp())::bigint";

/// Runs `f` where the sync client may block: here, or on a scoped thread of its own when
/// called from inside a tokio runtime (the server's handlers and blocking tasks), where the
/// client's own `block_on` would panic.
pub(crate) fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The connection, open until the store is dropped.
struct Conn<'a>(MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("open until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("open until dropped")
    }
}

/// The PostgreSQL backend.
pub struct Postgres {
    client: Mutex<Option<Client>>,
    /// The URL without its password.
    name: String,
    lease: Duration,
    /// The locks this process holds, renewed by the lease thread.
    held: Arc<Mutex<Vec<(String, Holder)>>>,
    /// Dropped with the store: the lease thread stops.
    _stop: std::sync::mpsc::Sender<()>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Closing the connection blocks too.
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = client {
            off_runtime(move || drop(c));
        }
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("name", &self.name)
            .finish()
    }
}

/// PostgreSQL's own words for what went wrong (the client's `Display` says only "db error").
pub(crate) fn pg_error(name: &str, source: postgres::Error) -> StoreError {
    let message = match source.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => {
            let mut m = source.to_string();
            let mut cause = std::error::Error::source(&source);
            while let Some(c) = cause {
                m.push_str(&format!(": {c}"));
                cause = c.source();
            }
            m
        }
    };
    StoreError::Pg {
        name: name.to_string(),
        message,
        source,
    }
}

/// One connection to `url`, its database migrated, and the URL as it may be shown.
pub(crate) fn open_migrated(url: &str) -> Result<(Client, String)> {
    let name = shown(url);
    let mut client = open_client(url, &name)?;
    migrate(&mut client, &name)?;
    Ok((client, name))
}

/// One connection to `url`, with TLS as its `sslmode` and `sslrootcert` say ([`pgtls`]).
pub(crate) fn open_client(url: &str, name: &str) -> Result<Client> {
    let bad = |message: String| StoreError::Url {
        name: name.to_string(),
        message,
    };
    let p = pgtls::parse(url).map_err(bad)?;
    let tls = pgtls::connector(p.mode, p.root.as_deref()).map_err(bad)?;
    let mut config: postgres::Config = p.url.parse().map_err(|e| pg_error(name, e))?;
    config.ssl_mode(pgtls::ssl_mode(p.mode));
    config.connect(tls).map_err(|e| pg_error(name, e))
}

/// `url` as it may be shown: without a password (in the user part or a `password=`
/// parameter).
pub(crate) fn shown(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.starts_with("password="))
                .collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_string(),
    };
    let url = url.as_str();
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let user = cred.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A `postgres://` URL as given to `--database`: its `Debug` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&shown(&self.0))
    }
}

/// Any text parses (so that a parser's error never echoes a password); [`DatabaseUrl::check`]
/// says whether it is a PostgreSQL URL, showing it without its password.
impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<DatabaseUrl, Self::Err> {
        Ok(DatabaseUrl(s.to_string()))
    }
}

impl DatabaseUrl {
    /// `Err` (a sentence naming the URL without its password) unless it is `postgres://` or
    /// `postgresql://`.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.0.starts_with("postgres://") || self.0.starts_with("postgresql://") {
            Ok(())
        } else {
            Err(format!(
                "--database {}: expected a postgres:// URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE); without --database the history is SQLite in the data directory",
                shown(&self.0)
            ))
        }
    }
}

pub(crate) fn lease_from_env() -> Duration {
    std::env::var("CUTOVER_LEASE")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LEASE)
}

impl Postgres {
    /// Connects to `url` (`postgres://user:password@host:port/database`, no TLS), migrates
    /// the database, and starts renewing this process's leases. A database with tables but
    /// no `cutover_schema` is not cutover's and is left untouched ([`StoreError::NotOurs`]).
    pub fn connect(url: &str) -> Result<Postgres> {
        Postgres::connect_with_lease(url, lease_from_env())
    }

    /// [`Postgres::connect`] with a lease of `lease` instead of `CUTOVER_LEASE`'s.
    pub fn connect_with_lease(url: &str, lease: Duration) -> Result<Postgres> {
        let name = shown(url);
        let mut client = open_client(url, &name)?;
        migrate(&mut client, &name)?;
        let renewer = open_client(url, &name)?;
        let held: Arc<Mutex<Vec<(String, Holder)>>> = Arc::default();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let h = held.clone();
        std::thread::Builder::new()
            .name("cutover-lease".into())
            .spawn(move || renew(renewer, h, lease, stopped))
            .map_err(|source| StoreError::Io {
                path: name.clone(),
                what: "cannot start the lease thread",
                source,
            })?;
        Ok(Postgres {
            client: Mutex::new(Some(client)),
            name,
            lease,
            held,
            _stop: stop,
        })
    }

    fn c(&self) -> Conn<'_> {
        Conn(self.client.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn e(&self, source: postgres::Error) -> StoreError {
        pg_error(&self.name, source)
    }

    pub(crate) fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.c().execute(sql, params).map_err(|e| self.e(e))
    }

    pub(crate) fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.c().query(sql, params).map_err(|e| self.e(e))
    }

    pub(crate) fn opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        self.c().query_opt(sql, params).map_err(|e| self.e(e))
    }

    /// Takes the app lock: see [`crate::Store::acquire_lock`].
    pub fn acquire_lock(
        &self,
        app: &str,
        me: &Holder,
        alive: impl Fn(&Holder) -> bool,
    ) -> Result<LockOutcome> {
        let lease = self.lease.as_secs() as i64;
        let mut c = self.c();
        let mut tx = c.transaction().map_err(|e| self.e(e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('cutover lock ' || $1::text))",
            &[&app],
        )
        .map_err(|e| self.e(e))?;
        let existing = tx
            .query_opt(
                &format!("SELECT \"user\", machine, pid, pid_start, since, op, expires_at < {NOW} FROM locks WHERE app = $1"),
                &[&app],
            )
            .map_err(|e| self.e(e))?
            .map(|r| (holder(&r), r.get::<_, bool>(6)));
        let outcome = match existing {
            Some((h, _)) if h.same_process(me) => LockOutcome::Acquired,
            Some((h, expired)) if !expired && alive(&h) => return Ok(LockOutcome::Held(h)),
            Some((h, _)) => LockOutcome::TookOver(h),
            None => LockOutcome::Acquired,
        };
        tx.execute(
            &format!("INSERT INTO locks (app, \"user\", machine, pid, pid_start, since, op, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, {NOW} + $8) \
             ON CONFLICT (app) DO UPDATE SET \"user\" = EXCLUDED.\"user\", machine = EXCLUDED.machine, pid = EXCLUDED.pid, pid_start = EXCLUDED.pid_start, since = EXCLUDED.since, op = EXCLUDED.op, expires_at = EXCLUDED.expires_at"),
            &[&app, &me.user, &me.machine, &i64::from(me.pid), &(me.pid_start as i64), &me.since, &me.op, &lease],
        )
        .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        drop(c);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|(a, _)| a != app);
        held.push((app.to_string(), me.clone()));
        Ok(outcome)
    }

    pub fn release_lock(&self, app: &str, me: &Holder) -> Result<()> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, h)| !(a == app && h.same_process(me)));
        self.exec(
            "DELETE FROM locks WHERE app = $1 AND machine = $2 AND pid = $3 AND pid_start = $4",
            &[
                &app,
                &me.machine,
                &i64::from(me.pid),
                &(me.pid_start as i64),
            ],
        )?;
        Ok(())
    }

    pub fn lock_holder(&self, app: &str) -> Result<Option<Holder>> {
        Ok(self
            .opt(
                &format!("SELECT \"user\", machine, pid, pid_start, since, op FROM locks WHERE app = $1 AND expires_at >= {NOW}"),
                &[&app],
            )?
            .map(|r| holder(&r)))
    }

    pub fn insert_release(&self, r: &NewRelease<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO releases (id, app, status, created_at, artifact_sha256, commit_sha, source, snapshot, commit_subject) VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $8)",
            &[&r.id, &r.app, &r.created_at, &r.artifact_sha256, &r.commit, &r.source, &r.snapshot, &r.commit_subject],
        )?;
        Ok(())
    }

    pub fn release_exists(&self, app: &str, id: &str) -> Result<bool> {
        Ok(self
            .opt(
                "SELECT 1 FROM releases WHERE app = $1 AND id = $2",
                &[&app, &id],
            )?
            .is_some())
    }

    pub fn set_status(
        &self,
        app: &str,
        id: &str,
        status: Status,
        finished_at: Option<&str>,
    ) -> Result<()> {
        self.exec(
            "UPDATE releases SET status = $3, finished_at = COALESCE($4, finished_at) WHERE app = $1 AND id = $2",
            &[&app, &id, &status.as_str(), &finished_at],
        )?;
        Ok(())
    }

    pub fn set_bad(&self, app: &str, id: &str, bad: bool) -> Result<()> {
        self.exec(
            "UPDATE releases SET bad = $3 WHERE app = $1 AND id = $2",
            &[&app, &id, &bad],
        )?;
        Ok(())
    }

    pub fn set_host_outcome(
        &self,
        app: &str,
        release_id: &str,
        host: &str,
        outcome: HostState,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO host_outcomes (app, release_id, host, outcome) VALUES ($1, $2, $3, $4) ON CONFLICT (app, release_id, host) DO UPDATE SET outcome = EXCLUDED.outcome",
            &[&app, &release_id, &host, &outcome.as_str()],
        )?;
        Ok(())
    }

    pub fn live(&self, app: &str) -> Result<Option<String>> {
        Ok(self
            .opt("SELECT release_id FROM live WHERE app = $1", &[&app])?
            .map(|r| r.get(0)))
    }

    pub fn set_live(&self, app: &str, release_id: &str) -> Result<()> {
        self.exec(
            "INSERT INTO live (app, release_id) VALUES ($1, $2) ON CONFLICT (app) DO UPDATE SET release_id = EXCLUDED.release_id",
            &[&app, &release_id],
        )?;
        Ok(())
    }

    pub fn releases(&self, app: &str) -> Result<Vec<Release>> {
        let mut out: Vec<Release> = self
            .rows(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE app = $1 ORDER BY id DESC"),
                &[&app],
            )?
            .iter()
            .map(release)
            .collect();
        for r in self.rows(
            "SELECT release_id, host, outcome FROM host_outcomes WHERE app = $1",
            &[&app],
        )? {
            let rid: String = r.get(0);
            if let Some(rel) = out.iter_mut().find(|x| x.id == rid) {
                rel.hosts.insert(r.get(1), r.get(2));
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
        let r = self.rows(
            "INSERT INTO runs (app, kind, release_id, previous_live, started_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[&app, &kind.as_str(), &release_id, &previous_live, &at],
        )?;
        Ok(r[0].get(0))
    }

    pub fn set_run_release(&self, run_id: i64, release_id: &str) -> Result<()> {
        let mut c = self.c();
        let mut tx = c.transaction().map_err(|e| self.e(e))?;
        tx.execute(
            "UPDATE runs SET release_id = $2 WHERE id = $1",
            &[&run_id, &release_id],
        )
        .map_err(|e| self.e(e))?;
        tx.execute(
            "UPDATE events SET release_id = $2 WHERE run_id = $1",
            &[&run_id, &release_id],
        )
        .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))
    }

    pub fn cached_build(&self, app: &str, key: &str) -> Result<Option<String>> {
        Ok(self
            .opt(
                "SELECT artifact_sha256 FROM build_cache WHERE app = $1 AND key = $2",
                &[&app, &key],
            )?
            .map(|r| r.get(0)))
    }

    pub fn record_build(
        &self,
        app: &str,
        key: &str,
        commit: &str,
        artifact_sha256: &str,
        at: &str,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO build_cache (app, key, commit_sha, artifact_sha256, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (app, key) DO UPDATE SET commit_sha = EXCLUDED.commit_sha, artifact_sha256 = EXCLUDED.artifact_sha256, created_at = EXCLUDED.created_at",
            &[&app, &key, &commit, &artifact_sha256, &at],
        )?;
        Ok(())
    }

    pub fn finish_run(&self, run_id: i64, outcome: Status, at: &str) -> Result<()> {
        self.exec(
            "UPDATE runs SET outcome = $2, finished_at = $3 WHERE id = $1",
            &[&run_id, &outcome.as_str(), &at],
        )?;
        Ok(())
    }

    pub fn unfinished_runs(&self, app: &str) -> Result<Vec<Run>> {
        Ok(self
            .rows(
                "SELECT id, app, kind, release_id, previous_live, started_at, finished_at, outcome FROM runs WHERE app = $1 AND finished_at IS NULL ORDER BY id",
                &[&app],
            )?
            .iter()
            .map(|r| Run {
                id: r.get(0),
                app: r.get(1),
                kind: r.get(2),
                release_id: r.get(3),
                previous_live: r.get(4),
                started_at: r.get(5),
                finished_at: r.get(6),
                outcome: r.get(7),
            })
            .collect())
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
        let r = self.rows(
            "INSERT INTO events (run_id, app, release_id, host, step, phase, at, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq",
            &[&run_id, &app, &release_id, &host, &step.as_str(), &phase.as_str(), &at, &detail],
        )?;
        Ok(r[0].get(0))
    }

    pub fn events(&self, run_id: i64) -> Result<Vec<Event>> {
        Ok(self
            .rows(
                "SELECT seq, run_id, release_id, host, step, phase, at, detail FROM events WHERE run_id = $1 ORDER BY seq",
                &[&run_id],
            )?
            .iter()
            .map(event)
            .collect())
    }

    // --- the server's rows ---

    pub fn claim_run(
        &self,
        run_id: i64,
        release_id: &str,
        previous_live: Option<&str>,
    ) -> Result<()> {
        self.exec(
            "UPDATE runs SET release_id = $2, previous_live = $3 WHERE id = $1",
            &[&run_id, &release_id, &previous_live],
        )?;
        Ok(())
    }

    pub fn set_run_by(&self, run_id: i64, by: &str) -> Result<()> {
        self.exec(
            "UPDATE runs SET started_by = $2 WHERE id = $1",
            &[&run_id, &by],
        )?;
        Ok(())
    }

    pub fn set_run_exit(&self, run_id: i64, exit_code: i32, message: &str) -> Result<()> {
        self.exec(
            "UPDATE runs SET exit_code = $2, message = $3 WHERE id = $1",
            &[&run_id, &exit_code, &message],
        )?;
        Ok(())
    }

    pub fn run_row(&self, run_id: i64) -> Result<Option<RunRow>> {
        Ok(self
            .opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
                &[&run_id],
            )?
            .map(|r| run_row(&r)))
    }

    pub fn run_rows(&self, app: Option<&str>, limit: u32) -> Result<Vec<RunRow>> {
        Ok(self
            .rows(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE $1::text IS NULL OR app = $1 ORDER BY id DESC LIMIT $2"),
                &[&app, &i64::from(limit)],
            )?
            .iter()
            .map(run_row)
            .collect())
    }

    pub fn events_after(&self, run_id: i64, after: i64, limit: u32) -> Result<Vec<Event>> {
        Ok(self
            .rows(
                "SELECT seq, run_id, release_id, host, step, phase, at, detail FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&run_id, &after, &i64::from(limit)],
            )?
            .iter()
            .map(event)
            .collect())
    }

    pub fn releases_page(
        &self,
        app: &str,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Release>> {
        let mut out: Vec<Release> = self
            .rows(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE app = $1 AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"),
                &[&app, &before, &i64::from(limit)],
            )?
            .iter()
            .map(release)
            .collect();
        for rel in &mut out {
            rel.hosts = self
                .rows(
                    "SELECT host, outcome FROM host_outcomes WHERE app = $1 AND release_id = $2",
                    &[&app, &rel.id],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        }
        Ok(out)
    }

    pub fn add_user(&self, name: &str, role: Role, password_hash: &str, at: &str) -> Result<bool> {
        let n = self.exec(
            "INSERT INTO users (name, role, password_hash, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&name, &role.as_str(), &password_hash, &at],
        )?;
        Ok(n == 1)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        Ok(self
            .opt(
                "SELECT name, role, password_hash, created_at FROM users WHERE name = $1",
                &[&name],
            )?
            .map(|r| user(&r)))
    }

    pub fn users(&self) -> Result<Vec<User>> {
        Ok(self
            .rows(
                "SELECT name, role, password_hash, created_at FROM users ORDER BY name",
                &[],
            )?
            .iter()
            .map(user)
            .collect())
    }

    pub fn remove_user(&self, name: &str) -> Result<bool> {
        let mut c = self.c();
        let mut tx = c.transaction().map_err(|e| self.e(e))?;
        let n = tx
            .execute("DELETE FROM users WHERE name = $1", &[&name])
            .map_err(|e| self.e(e))?;
        tx.execute("DELETE FROM sessions WHERE \"user\" = $1", &[&name])
            .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    pub fn set_password(&self, name: &str, password_hash: &str) -> Result<bool> {
        let mut c = self.c();
        let mut tx = c.transaction().map_err(|e| self.e(e))?;
        let n = tx
            .execute(
                "UPDATE users SET password_hash = $2 WHERE name = $1",
                &[&name, &password_hash],
            )
            .map_err(|e| self.e(e))?;
        tx.execute("DELETE FROM sessions WHERE \"user\" = $1", &[&name])
            .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    pub fn add_token(&self, t: &Token) -> Result<bool> {
        let apps = t.apps.as_ref().map(|a| a.join(","));
        let n = self.exec(
            "INSERT INTO tokens (name, hash, role, apps, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[&t.name, &t.hash, &t.role.as_str(), &apps, &t.created_at, &t.expires_at],
        )?;
        Ok(n == 1)
    }

    pub fn tokens(&self) -> Result<Vec<Token>> {
        Ok(self
            .rows(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name"),
                &[],
            )?
            .iter()
            .map(token)
            .collect())
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        Ok(self
            .opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"),
                &[&hash],
            )?
            .map(|r| token(&r)))
    }

    pub fn touch_token(&self, name: &str, at: &str) -> Result<()> {
        self.exec(
            "UPDATE tokens SET last_used_at = $2 WHERE name = $1",
            &[&name, &at],
        )?;
        Ok(())
    }

    pub fn revoke_token(&self, name: &str, at: &str) -> Result<bool> {
        let n = self.exec(
            "UPDATE tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
            &[&name, &at],
        )?;
        Ok(n == 1)
    }

    pub fn add_session(
        &self,
        hash: &str,
        user: &str,
        csrf: &str,
        at: &str,
        expires_at: i64,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO sessions (hash, \"user\", csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash, &user, &csrf, &at, &expires_at],
        )?;
        Ok(())
    }

    pub fn session(&self, hash: &str) -> Result<Option<Session>> {
        Ok(self
            .opt(
                "SELECT \"user\", csrf, expires_at FROM sessions WHERE hash = $1",
                &[&hash],
            )?
            .map(|r| Session {
                user: r.get(0),
                csrf: r.get(1),
                expires_at: r.get(2),
            }))
    }

    pub fn remove_session(&self, hash: &str) -> Result<()> {
        self.exec("DELETE FROM sessions WHERE hash = $1", &[&hash])?;
        Ok(())
    }

    pub fn prune_sessions(&self, now: i64) -> Result<()> {
        self.exec("DELETE FROM sessions WHERE expires_at < $1", &[&now])?;
        Ok(())
    }

    pub fn login_failures(&self, user: &str, addr: &str) -> Result<(u32, i64)> {
        Ok(self
            .opt(
                "SELECT count, last_at FROM login_failures WHERE \"user\" = $1 AND addr = $2",
                &[&user, &addr],
            )?
            .map(|r| {
                (
                    r.get::<_, i64>(0).clamp(0, i64::from(u32::MAX)) as u32,
                    r.get(1),
                )
            })
            .unwrap_or((0, 0)))
    }

    pub fn record_login_failure(&self, user: &str, addr: &str, now: i64) -> Result<()> {
        self.exec(
            "INSERT INTO login_failures (\"user\", addr, count, last_at) VALUES ($1, $2, 1, $3) ON CONFLICT (\"user\", addr) DO UPDATE SET count = login_failures.count + 1, last_at = $3",
            &[&user, &addr, &now],
        )?;
        Ok(())
    }

    pub fn clear_login_failures(&self, user: &str, addr: &str) -> Result<()> {
        self.exec(
            "DELETE FROM login_failures WHERE \"user\" = $1 AND addr = $2",
            &[&user, &addr],
        )?;
        Ok(())
    }

    pub fn audit(&self, row: &AuditRow) -> Result<()> {
        self.exec(
            "INSERT INTO audit (at, who, action, app, release_id, from_addr, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&row.at, &row.who, &row.action, &row.app, &row.release, &row.from, &row.detail],
        )?;
        Ok(())
    }

    pub fn audit_rows(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRow>> {
        Ok(self
            .rows(
                "SELECT id, at, who, action, app, release_id, from_addr, detail FROM audit WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
                &[&before, &i64::from(limit)],
            )?
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                at: r.get(1),
                who: r.get(2),
                action: r.get(3),
                app: r.get(4),
                release: r.get(5),
                from: r.get(6),
                detail: r.get(7),
            })
            .collect())
    }

    pub fn add_job(
        &self,
        run_id: i64,
        app: &str,
        request: &str,
        by: &str,
        at: &str,
    ) -> Result<i64> {
        let r = self.rows(
            "INSERT INTO jobs (run_id, app, request, started_by, state, created_at) VALUES ($1, $2, $3, $4, 'queued', $5) RETURNING id",
            &[&run_id, &app, &request, &by, &at],
        )?;
        Ok(r[0].get(0))
    }

    pub fn set_job_state(&self, id: i64, state: JobState, at: Option<&str>) -> Result<()> {
        self.exec(
            "UPDATE jobs SET state = $2, finished_at = COALESCE($3, finished_at) WHERE id = $1",
            &[&id, &state.as_str(), &at],
        )?;
        Ok(())
    }

    pub fn open_jobs(&self) -> Result<Vec<Job>> {
        Ok(self
            .rows(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY id"),
                &[],
            )?
            .iter()
            .map(job)
            .collect())
    }

    pub fn job_of_run(&self, run_id: i64) -> Result<Option<Job>> {
        Ok(self
            .opt(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE run_id = $1"),
                &[&run_id],
            )?
            .map(|r| job(&r)))
    }

    pub fn add_delivery(
        &self,
        app: &str,
        delivery: &str,
        provider: &str,
        at: &str,
        outcome: &str,
    ) -> Result<bool> {
        let n = self.exec(
            "INSERT INTO webhook_deliveries (app, delivery, provider, received_at, outcome) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&app, &delivery, &provider, &at, &outcome],
        )?;
        Ok(n == 1)
    }

    pub fn set_delivery_outcome(
        &self,
        app: &str,
        delivery: &str,
        sha: Option<&str>,
        outcome: &str,
    ) -> Result<()> {
        self.exec(
            "UPDATE webhook_deliveries SET outcome = $3, sha = COALESCE($4, sha) WHERE app = $1 AND delivery = $2",
            &[&app, &delivery, &outcome, &sha],
        )?;
        Ok(())
    }

    pub fn delivery(&self, app: &str, delivery: &str) -> Result<Option<Delivery>> {
        Ok(self
            .opt(
                "SELECT app, delivery, provider, received_at, sha, outcome FROM webhook_deliveries WHERE app = $1 AND delivery = $2",
                &[&app, &delivery],
            )?
            .map(|r| Delivery {
                app: r.get(0),
                delivery: r.get(1),
                provider: r.get(2),
                received_at: r.get(3),
                sha: r.get(4),
                outcome: r.get(5),
            }))
    }
}

/// Renews the leases in `held` every third of `lease` until `stop`'s sender is dropped.
fn renew(
    mut client: Client,
    held: Arc<Mutex<Vec<(String, Holder)>>>,
    lease: Duration,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let every = (lease / 3).max(Duration::from_millis(200));
    let secs = lease.as_secs() as i64;
    let sql = format!("UPDATE locks SET expires_at = {NOW} + $5 WHERE app = $1 AND machine = $2 AND pid = $3 AND pid_start = $4");
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let now: Vec<(String, Holder)> = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (app, h) in now {
            let n = client.execute(
                sql.as_str(),
                &[
                    &app,
                    &h.machine,
                    &i64::from(h.pid),
                    &(h.pid_start as i64),
                    &secs,
                ],
            );
            let still = held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(a, x)| *a == app && x.same_process(&h));
            if matches!(n, Ok(0)) && still {
                eprintln!("warning: the lease on app `{app}` was lost (another process took the lock over after it expired)");
            }
        }
    }
}

/// Migrates under a session advisory lock, so two instances starting together do not both
/// create the tables.
fn migrate(c: &mut Client, name: &str) -> Result<()> {
    let e = |source| pg_error(name, source);
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(e)?;
    let out = migrate_locked(c, name);
    let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    out
}

fn migrate_locked(c: &mut Client, name: &str) -> Result<()> {
    let e = |source| pg_error(name, source);
    let ours: bool = c
        .query_one("SELECT to_regclass('cutover_schema') IS NOT NULL", &[])
        .map_err(e)?
        .get(0);
    let version: i64 = if ours {
        c.query_one("SELECT version FROM cutover_schema", &[])
            .map_err(e)?
            .get(0)
    } else {
        let tables: Vec<String> = c
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1 LIMIT 6",
                &[],
            )
            .map_err(e)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !tables.is_empty() {
            let mut shown: Vec<&str> = tables.iter().map(String::as_str).take(5).collect();
            if tables.len() > 5 {
                shown.push("...");
            }
            return Err(StoreError::NotOurs {
                path: name.to_string(),
                why: format!(
                    "a PostgreSQL database of something else (tables: {}), not cutover's history",
                    shown.join(", ")
                ),
                todo: "Point --database or CUTOVER_DATABASE at an empty database (CREATE DATABASE) or at cutover's",
            });
        }
        0
    };
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::NotOurs {
            path: name.to_string(),
            why: format!(
                "made by a newer cutover (schema version {version}; this one knows up to {known})"
            ),
            todo: "Run that version of cutover or a newer one",
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = c.transaction().map_err(e)?;
        tx.batch_execute(m).map_err(e)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS cutover_schema (version BIGINT NOT NULL); DELETE FROM cutover_schema;",
        )
        .map_err(e)?;
        tx.execute(
            "INSERT INTO cutover_schema (version) VALUES ($1)",
            &[&((i + 1) as i64)],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
    }
    Ok(())
}

fn holder(r: &Row) -> Holder {
    Holder {
        user: r.get(0),
        machine: r.get(1),
        pid: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
        pid_start: r.get::<_, i64>(3) as u64,
        since: r.get(4),
        op: r.get(5),
    }
}

const RELEASE_COLUMNS: &str = "id, app, status, bad, created_at, finished_at, artifact_sha256, commit_sha, source, snapshot, commit_subject";

fn release(r: &Row) -> Release {
    Release {
        id: r.get(0),
        app: r.get(1),
        status: r.get(2),
        bad: r.get(3),
        created_at: r.get(4),
        finished_at: r.get(5),
        artifact_sha256: r.get(6),
        commit: r.get(7),
        source: r.get(8),
        snapshot: r.get(9),
        commit_subject: r.get(10),
        hosts: BTreeMap::new(),
    }
}

fn event(r: &Row) -> Event {
    Event {
        seq: r.get(0),
        run_id: r.get(1),
        release_id: r.get(2),
        host: r.get(3),
        step: r.get(4),
        phase: r.get(5),
        at: r.get(6),
        detail: r.get(7),
    }
}

const RUN_COLUMNS: &str = "id, app, kind, release_id, previous_live, started_at, finished_at, outcome, exit_code, message, started_by";

fn run_row(r: &Row) -> RunRow {
    RunRow {
        id: r.get(0),
        app: r.get(1),
        kind: r.get(2),
        release: r.get(3),
        previous_live: r.get(4),
        started_at: r.get(5),
        finished_at: r.get(6),
        outcome: r.get(7),
        exit_code: r.get(8),
        message: r.get(9),
        by: r.get(10),
    }
}

fn user(r: &Row) -> User {
    User {
        name: r.get(0),
        role: Role::parse(r.get(1)).unwrap_or(Role::Viewer),
        password_hash: r.get(2),
        created_at: r.get(3),
    }
}

const TOKEN_COLUMNS: &str =
    "name, hash, role, apps, created_at, expires_at, last_used_at, revoked_at";

fn token(r: &Row) -> Token {
    let apps: Option<String> = r.get(3);
    Token {
        name: r.get(0),
        hash: r.get(1),
        role: Role::parse(r.get(2)).unwrap_or(Role::Viewer),
        apps: apps.map(|a| {
            a.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        }),
        created_at: r.get(4),
        expires_at: r.get(5),
        last_used_at: r.get(6),
        revoked_at: r.get(7),
    }
}

const JOB_COLUMNS: &str = "id, run_id, app, request, started_by, state, created_at, finished_at";

fn job(r: &Row) -> Job {
    Job {
        id: r.get(0),
        run_id: r.get(1),
        app: r.get(2),
        request: r.get(3),
        by: r.get(4),
        state: JobState::parse(r.get(5)),
        created_at: r.get(6),
        finished_at: r.get(7),
    }
}

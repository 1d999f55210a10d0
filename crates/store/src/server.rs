//! What `cutover serve` keeps beside the history: users, API tokens and sessions, login
//! failures per (user, client address), the append-only audit log, the server's jobs, and
//! the run rows as the API shows them.
//!
//! **Invariant:** no secret is stored in clear. Passwords arrive here as argon2id PHC strings,
//! tokens and session ids as SHA-256 hex digests; this module never sees the secret itself
//! and never hashes anything (the server does).

use super::{params, release_row, Event, OptionalExtension, Release, Result, Sqlite};
use serde::Serialize;

/// What a user or a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but secret values.
    Viewer,
    /// Also deploys and rolls back.
    Deployer,
    /// Also manages users and tokens and reads the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "deployer" => Some(Role::Deployer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn role_of(text: String) -> Role {
    // An unknown role in the database grants the least.
    Role::parse(&text).unwrap_or(Role::Viewer)
}

/// A user of the panel. `password_hash` is an argon2id PHC string.
#[derive(Clone, Serialize)]
pub struct User {
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub password_hash: String,
    pub created_at: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// An API token as listed (its secret is never stored; `hash` is its SHA-256).
#[derive(Clone, Serialize)]
pub struct Token {
    pub name: String,
    #[serde(skip)]
    pub hash: String,
    pub role: Role,
    /// The apps it is scoped to; `None`: every app.
    pub apps: Option<Vec<String>>,
    pub created_at: String,
    /// Unix seconds; `None`: never.
    pub expires_at: Option<i64>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("apps", &self.apps)
            .field("hash", &"<redacted>")
            .finish()
    }
}

/// A logged-in session, found by the hash of its id.
#[derive(Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("csrf", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One audit row: who (a user or `token:NAME`), what, which app and release, from where.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRow {
    pub id: i64,
    pub at: String,
    pub who: String,
    pub action: String,
    pub app: Option<String>,
    pub release: Option<String>,
    pub from: Option<String>,
    pub detail: String,
}

/// Where a server job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    /// The server died while it ran; never re-run on its own.
    Interrupted,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Interrupted => "interrupted",
        }
    }
    pub(crate) fn parse(text: &str) -> JobState {
        match text {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            _ => JobState::Interrupted,
        }
    }
}

/// A job of the server: a deploy or rollback it runs in the background.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    pub run_id: i64,
    pub app: String,
    /// The request as JSON.
    pub request: String,
    pub by: String,
    pub state: JobState,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub app: String,
    pub kind: String,
    pub release: String,
    pub previous_live: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The release status it ended with; `None` while unfinished.
    pub outcome: Option<String>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub by: Option<String>,
}

const RUN_COLUMNS: &str = "id, app, kind, release_id, previous_live, started_at, finished_at, outcome, exit_code, message, started_by";

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        app: r.get(1)?,
        kind: r.get(2)?,
        release: r.get(3)?,
        previous_live: r.get(4)?,
        started_at: r.get(5)?,
        finished_at: r.get(6)?,
        outcome: r.get(7)?,
        exit_code: r.get(8)?,
        message: r.get(9)?,
        by: r.get(10)?,
    })
}

const TOKEN_COLUMNS: &str =
    "name, hash, role, apps, created_at, expires_at, last_used_at, revoked_at";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Token> {
    let apps: Option<String> = r.get(3)?;
    Ok(Token {
        name: r.get(0)?,
        hash: r.get(1)?,
        role: role_of(r.get(2)?),
        apps: apps.map(|a| {
            a.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        }),
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        last_used_at: r.get(6)?,
        revoked_at: r.get(7)?,
    })
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let state: String = r.get(5)?;
    Ok(Job {
        id: r.get(0)?,
        run_id: r.get(1)?,
        app: r.get(2)?,
        request: r.get(3)?,
        by: r.get(4)?,
        state: JobState::parse(&state),
        created_at: r.get(6)?,
        finished_at: r.get(7)?,
    })
}

impl Sqlite {
    // --- runs, as the server and the API see them ---

    /// Takes over a run row made beforehand (see `start_run`): the release it works on and
    /// the live release when it started.
    pub fn claim_run(
        &self,
        run_id: i64,
        release_id: &str,
        previous_live: Option<&str>,
    ) -> Result<()> {
        self.c()
            .execute(
                "UPDATE runs SET release_id = ?2, previous_live = ?3 WHERE id = ?1",
                params![run_id, release_id, previous_live],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Who started the run: a user, `token:NAME`, or the OS user of a CLI run.
    pub fn set_run_by(&self, run_id: i64, by: &str) -> Result<()> {
        self.c()
            .execute(
                "UPDATE runs SET started_by = ?2 WHERE id = ?1",
                params![run_id, by],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// How the run ended: its exit code and the sentence saying so.
    pub fn set_run_exit(&self, run_id: i64, exit_code: i32, message: &str) -> Result<()> {
        self.c()
            .execute(
                "UPDATE runs SET exit_code = ?2, message = ?3 WHERE id = ?1",
                params![run_id, exit_code, message],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn run_row(&self, run_id: i64) -> Result<Option<RunRow>> {
        self.c()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [run_id],
                run_row,
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    /// The newest `limit` runs of `app` (every app: `None`), newest first.
    pub fn run_rows(&self, app: Option<&str>, limit: u32) -> Result<Vec<RunRow>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE ?1 IS NULL OR app = ?1 ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map(params![app, limit], run_row)
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    /// The events of a run after `after` (a seq), oldest first, at most `limit`.
    pub fn events_after(&self, run_id: i64, after: i64, limit: u32) -> Result<Vec<Event>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT seq, run_id, release_id, host, step, phase, at, detail FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map(params![run_id, after, limit], |r| {
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

    /// One page of `app`'s releases, newest first: at most `limit`, older than `before`.
    pub fn releases_page(
        &self,
        app: &str,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Release>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT id, app, status, bad, created_at, finished_at, artifact_sha256, commit_sha, source, snapshot, commit_subject FROM releases WHERE app = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3")
            .map_err(|e| self.e(e))?;
        let mut out: Vec<Release> = stmt
            .query_map(params![app, before, limit], release_row)
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e))?;
        let mut stmt = conn
            .prepare("SELECT host, outcome FROM host_outcomes WHERE app = ?1 AND release_id = ?2")
            .map_err(|e| self.e(e))?;
        for rel in &mut out {
            let rows: Vec<(String, String)> = stmt
                .query_map([app, rel.id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.e(e))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| self.e(e))?;
            rel.hosts = rows.into_iter().collect();
        }
        Ok(out)
    }

    /// Who holds `app`'s lock, if anyone.
    pub fn lock_holder(&self, app: &str) -> Result<Option<super::Holder>> {
        self.c()
            .query_row(
                "SELECT user, machine, pid, pid_start, since, op FROM locks WHERE app = ?1",
                [app],
                |r| {
                    Ok(super::Holder {
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
            .map_err(|e| self.e(e))
    }

    // --- users ---

    /// Adds a user; `false` if the name is taken.
    pub fn add_user(&self, name: &str, role: Role, password_hash: &str, at: &str) -> Result<bool> {
        let n = self
            .c()
            .execute(
                "INSERT OR IGNORE INTO users (name, role, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, role.as_str(), password_hash, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        self.c()
            .query_row(
                "SELECT name, role, password_hash, created_at FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok(User {
                        name: r.get(0)?,
                        role: role_of(r.get(1)?),
                        password_hash: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT name, role, password_hash, created_at FROM users ORDER BY name")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(User {
                    name: r.get(0)?,
                    role: role_of(r.get(1)?),
                    password_hash: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    /// Removes a user and ends their sessions; `false` if there is no such user.
    pub fn remove_user(&self, name: &str) -> Result<bool> {
        let conn = self.c();
        let tx = conn.unchecked_transaction().map_err(|e| self.e(e))?;
        let n = tx
            .execute("DELETE FROM users WHERE name = ?1", [name])
            .map_err(|e| self.e(e))?;
        tx.execute("DELETE FROM sessions WHERE user = ?1", [name])
            .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    /// Sets a user's password and ends their sessions; `false` if there is no such user.
    pub fn set_password(&self, name: &str, password_hash: &str) -> Result<bool> {
        let conn = self.c();
        let tx = conn.unchecked_transaction().map_err(|e| self.e(e))?;
        let n = tx
            .execute(
                "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                [name, password_hash],
            )
            .map_err(|e| self.e(e))?;
        tx.execute("DELETE FROM sessions WHERE user = ?1", [name])
            .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    // --- tokens ---

    /// Adds a token; `false` if the name is taken.
    pub fn add_token(&self, t: &Token) -> Result<bool> {
        let apps = t.apps.as_ref().map(|a| a.join(","));
        let n = self
            .c()
            .execute(
                "INSERT OR IGNORE INTO tokens (name, hash, role, apps, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![t.name, t.hash, t.role.as_str(), apps, t.created_at, t.expires_at],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    pub fn tokens(&self) -> Result<Vec<Token>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name"))
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map([], token_row)
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        self.c()
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"),
                [hash],
                token_row,
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn touch_token(&self, name: &str, at: &str) -> Result<()> {
        self.c()
            .execute(
                "UPDATE tokens SET last_used_at = ?2 WHERE name = ?1",
                [name, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Revokes a token; `false` if there is no such token or it was revoked already.
    pub fn revoke_token(&self, name: &str, at: &str) -> Result<bool> {
        let n = self
            .c()
            .execute(
                "UPDATE tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                [name, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    // --- sessions ---

    pub fn add_session(
        &self,
        hash: &str,
        user: &str,
        csrf: &str,
        at: &str,
        expires_at: i64,
    ) -> Result<()> {
        self.c()
            .execute(
                "INSERT INTO sessions (hash, user, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, user, csrf, at, expires_at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn session(&self, hash: &str) -> Result<Option<Session>> {
        self.c()
            .query_row(
                "SELECT user, csrf, expires_at FROM sessions WHERE hash = ?1",
                [hash],
                |r| {
                    Ok(Session {
                        user: r.get(0)?,
                        csrf: r.get(1)?,
                        expires_at: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn remove_session(&self, hash: &str) -> Result<()> {
        self.c()
            .execute("DELETE FROM sessions WHERE hash = ?1", [hash])
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Forgets sessions that expired before `now` (unix seconds).
    pub fn prune_sessions(&self, now: i64) -> Result<()> {
        self.c()
            .execute("DELETE FROM sessions WHERE expires_at < ?1", [now])
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    // --- login failures, per (user, client address) ---

    /// Failed logins of `user` from `addr` since the last success: (count, last unix seconds).
    pub fn login_failures(&self, user: &str, addr: &str) -> Result<(u32, i64)> {
        self.c()
            .query_row(
                "SELECT count, last_at FROM login_failures WHERE user = ?1 AND addr = ?2",
                [user, addr],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map(|o| o.unwrap_or((0, 0)))
            .map_err(|e| self.e(e))
    }

    pub fn record_login_failure(&self, user: &str, addr: &str, now: i64) -> Result<()> {
        self.c()
            .execute(
                "INSERT INTO login_failures (user, addr, count, last_at) VALUES (?1, ?2, 1, ?3) ON CONFLICT (user, addr) DO UPDATE SET count = count + 1, last_at = ?3",
                params![user, addr, now],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn clear_login_failures(&self, user: &str, addr: &str) -> Result<()> {
        self.c()
            .execute(
                "DELETE FROM login_failures WHERE user = ?1 AND addr = ?2",
                [user, addr],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    // --- audit (append-only: triggers refuse updates and deletes) ---

    pub fn audit(&self, row: &AuditRow) -> Result<()> {
        self.c()
            .execute(
                "INSERT INTO audit (at, who, action, app, release_id, from_addr, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.at, row.who, row.action, row.app, row.release, row.from, row.detail],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Audit rows, newest first: at most `limit`, older than id `before`.
    pub fn audit_rows(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRow>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT id, at, who, action, app, release_id, from_addr, detail FROM audit WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map(params![before, limit], |r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    who: r.get(2)?,
                    action: r.get(3)?,
                    app: r.get(4)?,
                    release: r.get(5)?,
                    from: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    // --- jobs ---

    pub fn add_job(
        &self,
        run_id: i64,
        app: &str,
        request: &str,
        by: &str,
        at: &str,
    ) -> Result<i64> {
        let conn = self.c();
        conn.execute(
            "INSERT INTO jobs (run_id, app, request, started_by, state, created_at) VALUES (?1, ?2, ?3, ?4, 'queued', ?5)",
            params![run_id, app, request, by, at],
        )
        .map_err(|e| self.e(e))?;
        Ok(conn.last_insert_rowid())
    }

    pub fn set_job_state(&self, id: i64, state: JobState, at: Option<&str>) -> Result<()> {
        self.c()
            .execute(
                "UPDATE jobs SET state = ?2, finished_at = COALESCE(?3, finished_at) WHERE id = ?1",
                params![id, state.as_str(), at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Jobs that were queued or running: after a restart, the ones the server died in.
    pub fn open_jobs(&self) -> Result<Vec<Job>> {
        let conn = self.c();
        let mut stmt = conn
            .prepare("SELECT id, run_id, app, request, started_by, state, created_at, finished_at FROM jobs WHERE state IN ('queued', 'running') ORDER BY id")
            .map_err(|e| self.e(e))?;
        let rows = stmt
            .query_map([], job_row)
            .map_err(|e| self.e(e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.e(e));
        rows
    }

    pub fn job_of_run(&self, run_id: i64) -> Result<Option<Job>> {
        self.c()
            .query_row(
                "SELECT id, run_id, app, request, started_by, state, created_at, finished_at FROM jobs WHERE run_id = ?1",
                [run_id],
                job_row,
            )
            .optional()
            .map_err(|e| self.e(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Sqlite, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "cutover-store-server-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (Sqlite::open(&dir.join("cutover.db")).unwrap(), dir)
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let (s, dir) = store();
        s.audit(&AuditRow {
            at: "t".into(),
            who: "ada".into(),
            action: "login".into(),
            ..AuditRow::default()
        })
        .unwrap();
        let c = s.c();
        let e = c.execute("UPDATE audit SET who = 'eve'", []).unwrap_err();
        assert!(
            e.to_string().contains("the audit log is append-only"),
            "{e}"
        );
        let e = c.execute("DELETE FROM audit", []).unwrap_err();
        assert!(
            e.to_string().contains("the audit log is append-only"),
            "{e}"
        );
        drop(c);
        assert_eq!(s.audit_rows(10, None).unwrap()[0].who, "ada");
        let _ = std::fs::remove_dir_all(dir);
    }
}

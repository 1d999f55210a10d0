//! `cutover db copy`: an SQLite history (releases, runs, events, users, tokens, sessions,
//! audit, jobs, webhook deliveries, previews, ...) into an empty PostgreSQL database, in one
//! transaction. The copy is driven by the two schemas, not by a list of tables kept by hand:
//! every table of the SQLite file is copied into the PostgreSQL table of the same name,
//! column by column, each value converted to the PostgreSQL column's type; a table or column
//! PostgreSQL has no place for stops the copy before anything is committed. App locks are
//! not copied (they belong to processes of the old database).

use crate::pg::{open_migrated, pg_error};
use crate::{Result, Store, StoreError};
use postgres::types::ToSql;
use rusqlite::types::Value as Lite;
use std::path::Path;

/// Tables of the SQLite file not copied: a lock is held by a process of the old database.
const SKIPPED: &[&str] = &["locks"];

/// One table copied: its name and how many rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub table: String,
    pub rows: u64,
}

/// Copies the SQLite history at `from` into the PostgreSQL database at `to` (migrated first),
/// which must hold no rows: `Err` and nothing written otherwise. The SQLite file is opened
/// as cutover opens it (refused if it is not cutover's; migrated to the current schema).
pub fn copy_sqlite_to_postgres(from: &Path, to: &str) -> Result<Vec<Copied>> {
    drop(Store::open(from)?);
    let path = from.display().to_string();
    let lite_err = |source| StoreError::Sql {
        path: path.clone(),
        source,
    };
    let lite =
        rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(lite_err)?;
    let (mut client, name) = open_migrated(to)?;
    let pe = |e| pg_error(&name, e);
    let mut tx = client.transaction().map_err(pe)?;
    let tables: Vec<String> = tx
        .query(
            "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name <> 'cutover_schema' ORDER BY 1",
            &[],
        )
        .map_err(pe)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in &tables {
        let used: bool = tx
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {})", ident(t)), &[])
            .map_err(pe)?
            .get(0);
        if used {
            return Err(StoreError::Url {
                name: name.clone(),
                message: format!(
                    "not empty (table `{t}` has rows): db copy writes only into a new, empty database; nothing was copied"
                ),
            });
        }
    }
    let sources: Vec<String> = {
        let mut st = lite
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .map_err(lite_err)?;
        let names = st
            .query_map([], |r| r.get(0))
            .map_err(lite_err)?
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(lite_err)?;
        names
    };
    let mut copied = Vec::new();
    for t in sources.iter().filter(|t| !SKIPPED.contains(&t.as_str())) {
        if !tables.contains(t) {
            return Err(StoreError::Url {
                name: name.clone(),
                message: format!("table `{t}` of {path} has no place in this database's schema; nothing was copied"),
            });
        }
        let rows = copy_table(&lite, &mut tx, t, (&path, &name))?;
        copied.push(Copied {
            table: t.clone(),
            rows,
        });
    }
    tx.commit().map_err(pe)?;
    Ok(copied)
}

/// `name` quoted as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Copies one table; then moves each serial column's sequence past the copied ids.
fn copy_table(
    lite: &rusqlite::Connection,
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    (path, name): (&str, &str),
) -> Result<u64> {
    let lite_err = |source| StoreError::Sql {
        path: path.to_string(),
        source,
    };
    let pe = |e| pg_error(name, e);
    let pg_cols: Vec<(String, String, bool)> = tx
        .query(
            "SELECT column_name::TEXT, data_type::TEXT, COALESCE(column_default LIKE 'nextval(%', FALSE) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
            &[&table],
        )
        .map_err(pe)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let cols: Vec<String> = {
        let mut st = lite
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{}')",
                table.replace('\'', "''")
            ))
            .map_err(lite_err)?;
        let c = st
            .query_map([], |r| r.get(0))
            .map_err(lite_err)?
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(lite_err)?;
        c
    };
    let mut types = Vec::new();
    for c in &cols {
        match pg_cols.iter().find(|p| &p.0 == c) {
            Some(p) => types.push(p.1.clone()),
            None => {
                return Err(StoreError::Url {
                    name: name.to_string(),
                    message: format!("column `{table}.{c}` of {path} has no place in this database's schema; nothing was copied"),
                })
            }
        }
    }
    let list = cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
    let marks = (1..=cols.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = tx
        .prepare(&format!(
            "INSERT INTO {} ({list}) VALUES ({marks})",
            ident(table)
        ))
        .map_err(pe)?;
    let mut st = lite
        .prepare(&format!("SELECT {list} FROM {}", ident(table)))
        .map_err(lite_err)?;
    let mut rows = st.query([]).map_err(lite_err)?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(lite_err)? {
        let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(cols.len());
        for (i, ty) in types.iter().enumerate() {
            let v: Lite = row.get(i).map_err(lite_err)?;
            let converted = convert(v, ty).map_err(|why| StoreError::Url {
                name: name.to_string(),
                message: format!("{table}.{}: {why}; nothing was copied", cols[i]),
            })?;
            values.push(converted);
        }
        let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_ref()).collect();
        tx.execute(&insert, &params).map_err(pe)?;
        n += 1;
    }
    for (c, _, _) in pg_cols.iter().filter(|p| p.2) {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence($1, $2), COALESCE((SELECT MAX({}) FROM {}), 0) + 1, false)",
                ident(c),
                ident(table)
            ),
            &[&table, c],
        )
        .map_err(pe)?;
    }
    Ok(n)
}

/// An SQLite value as a parameter of the PostgreSQL column type `ty`.
fn convert(v: Lite, ty: &str) -> std::result::Result<Box<dyn ToSql + Sync>, String> {
    Ok(match (ty, v) {
        ("boolean", Lite::Null) => Box::new(None::<bool>),
        ("boolean", Lite::Integer(i)) => Box::new(i != 0),
        ("bigint", Lite::Null) => Box::new(None::<i64>),
        ("bigint", Lite::Integer(i)) => Box::new(i),
        ("integer", Lite::Null) => Box::new(None::<i32>),
        ("integer", Lite::Integer(i)) => {
            Box::new(i32::try_from(i).map_err(|_| format!("{i} does not fit an integer column"))?)
        }
        ("smallint", Lite::Null) => Box::new(None::<i16>),
        ("smallint", Lite::Integer(i)) => {
            Box::new(i16::try_from(i).map_err(|_| format!("{i} does not fit a smallint column"))?)
        }
        ("double precision", Lite::Null) => Box::new(None::<f64>),
        ("double precision", Lite::Integer(i)) => Box::new(i as f64),
        ("double precision", Lite::Real(f)) => Box::new(f),
        ("text", Lite::Null) => Box::new(None::<String>),
        ("text", Lite::Text(s)) => Box::new(s),
        ("text", Lite::Integer(i)) => Box::new(i.to_string()),
        ("bytea", Lite::Null) => Box::new(None::<Vec<u8>>),
        ("bytea", Lite::Blob(b)) => Box::new(b),
        (ty, v) => {
            return Err(format!(
                "cannot store an SQLite {} value in a {ty} column",
                v.data_type()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ScratchDb;
    use crate::*;

    /// Every kind of row, written through the store's own API.
    fn fill(s: &Store) {
        for (id, status) in [("r1", Status::Succeeded), ("r2", Status::Failed)] {
            s.insert_release(&NewRelease {
                id,
                app: "web",
                created_at: "2026-01-01T00:00:00Z",
                artifact_sha256: "ab",
                commit: Some("c0ffee"),
                commit_subject: Some("a subject"),
                source: "dist",
                snapshot: "{}",
            })
            .unwrap();
            s.set_status("web", id, status, Some("2026-01-01T00:01:00Z"))
                .unwrap();
        }
        s.set_bad("web", "r2", true).unwrap();
        s.set_host_outcome("web", "r1", "h1", HostState::Healthy)
            .unwrap();
        s.set_live("web", "r1").unwrap();
        for release in ["r1", "r2"] {
            let run = s
                .start_run("web", RunKind::Deploy, release, None, "t")
                .unwrap();
            s.event(
                run,
                "web",
                release,
                Some("h1"),
                Step::Switch,
                State::Done,
                "t",
                "ok",
            )
            .unwrap();
            s.finish_run(run, Status::Succeeded, "t").unwrap();
            s.set_run_exit(run, 0, "deployed").unwrap();
            s.add_job(run, "web", "{}", "alice", "t").unwrap();
        }
        s.record_build("web", "k", "c0ffee", "ab", "t").unwrap();
        assert!(s
            .add_user("alice", Role::Admin, "$argon2id$x", "t")
            .unwrap());
        assert!(s
            .add_token(&Token {
                name: "ci".into(),
                hash: "h".into(),
                role: Role::Deployer,
                apps: Some(vec!["web".into()]),
                created_at: "t".into(),
                expires_at: Some(99),
                last_used_at: None,
                revoked_at: None,
            })
            .unwrap());
        s.add_session("sh", "alice", "csrf", "t", i64::MAX).unwrap();
        s.record_login_failure("bob", "1.2.3.4", 5).unwrap();
        s.audit(&AuditRow {
            at: "t".into(),
            who: "alice".into(),
            action: "deploy".into(),
            app: Some("web".into()),
            detail: "run 1".into(),
            ..AuditRow::default()
        })
        .unwrap();
        assert!(s
            .add_delivery("web", "d1", "github", "t", "accepted")
            .unwrap());
        s.open_preview("web", 4, "https://pr-4", "feature", "t")
            .unwrap();
        // A lock is a process's of the old database: not copied.
        let me = Holder {
            user: "u".into(),
            machine: "m".into(),
            pid: 1,
            pid_start: 1,
            since: "t".into(),
            op: "deploy".into(),
        };
        s.acquire_lock("web", &me, |_| true).unwrap();
    }

    /// What a reader sees of the history, to compare the two stores.
    fn seen(s: &Store) -> String {
        let runs = s.run_rows(None, 100).unwrap();
        let events: Vec<Vec<Event>> = runs.iter().map(|r| s.events(r.id).unwrap()).collect();
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            s.releases("web").unwrap(),
            s.live("web").unwrap(),
            runs,
            events,
            s.job_of_run(runs[0].id).unwrap(),
            s.cached_build("web", "k").unwrap(),
            s.users().unwrap(),
            s.tokens()
                .unwrap()
                .iter()
                .map(|t| (&t.name, &t.hash, &t.apps))
                .collect::<Vec<_>>(),
            s.session("sh").unwrap().map(|x| x.user),
            s.login_failures("bob", "1.2.3.4").unwrap(),
            s.audit_rows(10, None).unwrap(),
            s.delivery("web", "d1").unwrap(),
            s.previews("web", true).unwrap(),
        )
    }

    #[test]
    fn an_sqlite_history_moves_into_an_empty_postgres_database_whole_and_once() {
        let dir = std::env::temp_dir().join(format!("cutover-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cutover.db");
        let lite = Store::open(&file).unwrap();
        fill(&lite);
        let before = seen(&lite);
        drop(lite);
        let db = ScratchDb::new("copy");
        let copied = copy_sqlite_to_postgres(&file, &db.url).unwrap();
        let count = |t: &str| copied.iter().find(|c| c.table == t).map(|c| c.rows);
        assert_eq!(count("events"), Some(2));
        assert_eq!(count("releases"), Some(2));
        assert_eq!(count("locks"), None, "{copied:?}");
        let pg = Store::connect(&db.url).unwrap();
        assert_eq!(seen(&pg), before);
        assert_eq!(pg.lock_holder("web").unwrap(), None);
        // The ids go on after the copied ones.
        let last = pg.run_rows(None, 1).unwrap()[0].id;
        assert!(
            pg.start_run("web", RunKind::Deploy, "r3", None, "t")
                .unwrap()
                > last
        );
        drop(pg);
        // A database with rows is refused, and nothing is written twice.
        let e = copy_sqlite_to_postgres(&file, &db.url)
            .unwrap_err()
            .to_string();
        let shown = crate::pg::shown(&db.url);
        assert!(
            e.starts_with(&format!("database {shown}: not empty (table `")),
            "{e}"
        );
        assert!(
            e.ends_with(
                "` has rows): db copy writes only into a new, empty database; nothing was copied"
            ),
            "{e}"
        );
        let pg = Store::connect(&db.url).unwrap();
        assert_eq!(pg.releases("web").unwrap().len(), 2);
        drop(pg);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

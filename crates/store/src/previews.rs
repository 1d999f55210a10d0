//! Previews, one row per (app, pull request): whether it is open, where it is served, what it
//! was last deployed from and when (its idle time counts from there). A removed preview keeps
//! its row, and its releases stay in the history under the preview's own app name.

use super::{params, OptionalExtension, Postgres, Result, Sqlite};
use serde::Serialize;

/// One preview as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The production app.
    pub app: String,
    pub pr: u64,
    /// `open`, `closing` (its pull request closed during a run of it) or `removed`.
    pub state: String,
    pub url: String,
    /// What the last deploy was asked for (a git ref or an image).
    pub head_ref: String,
    /// The commit the last deploy built, if it was built from git.
    pub head_sha: Option<String>,
    pub opened_at: String,
    /// The last deploy (or the opening): a preview idle `ttl` after this is removed.
    pub updated_at: String,
    pub removed_at: Option<String>,
    /// Why it was removed (closed, expired, by whom).
    pub removed_why: String,
}

const COLUMNS: &str =
    "app, pr, state, url, head_ref, head_sha, opened_at, updated_at, removed_at, removed_why";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Preview> {
    Ok(Preview {
        app: r.get(0)?,
        pr: r.get::<_, i64>(1)? as u64,
        state: r.get(2)?,
        url: r.get(3)?,
        head_ref: r.get(4)?,
        head_sha: r.get(5)?,
        opened_at: r.get(6)?,
        updated_at: r.get(7)?,
        removed_at: r.get(8)?,
        removed_why: r.get(9)?,
    })
}

impl Sqlite {
    /// Marks a preview open (a new row, or a removed one opened again) and records what it is
    /// being deployed from; an open one just gets the new head.
    pub fn open_preview(
        &self,
        app: &str,
        pr: u64,
        url: &str,
        head_ref: &str,
        at: &str,
    ) -> Result<()> {
        self.c()
            .execute(
                "INSERT INTO previews (app, pr, state, url, head_ref, opened_at, updated_at) VALUES (?1, ?2, 'open', ?3, ?4, ?5, ?5)
                 ON CONFLICT (app, pr) DO UPDATE SET
                   opened_at = CASE WHEN state = 'open' THEN opened_at ELSE excluded.opened_at END,
                   state = 'open', url = excluded.url, head_ref = excluded.head_ref,
                   updated_at = excluded.updated_at, removed_at = NULL, removed_why = ''",
                params![app, pr as i64, url, head_ref, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Records the commit a preview's deploy built.
    pub fn set_preview_sha(&self, app: &str, pr: u64, sha: &str, at: &str) -> Result<()> {
        self.c()
            .execute(
                "UPDATE previews SET head_sha = ?3, updated_at = ?4 WHERE app = ?1 AND pr = ?2",
                params![app, pr as i64, sha, at],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Marks a preview removed (its row stays); `false` if it was not open.
    pub fn remove_preview(&self, app: &str, pr: u64, at: &str, why: &str) -> Result<bool> {
        let n = self
            .c()
            .execute(
                "UPDATE previews SET state = 'removed', removed_at = ?3, removed_why = ?4 WHERE app = ?1 AND pr = ?2 AND state IN ('open', 'closing')",
                params![app, pr as i64, at, why],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    /// Marks an open preview `closing` with why; `false` if it was not open.
    pub fn close_preview(&self, app: &str, pr: u64, why: &str) -> Result<bool> {
        let n = self
            .c()
            .execute(
                "UPDATE previews SET state = 'closing', removed_why = ?3 WHERE app = ?1 AND pr = ?2 AND state = 'open'",
                params![app, pr as i64, why],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    /// A preview, if the app ever had one for this pull request.
    pub fn preview(&self, app: &str, pr: u64) -> Result<Option<Preview>> {
        self.c()
            .query_row(
                &format!("SELECT {COLUMNS} FROM previews WHERE app = ?1 AND pr = ?2"),
                params![app, pr as i64],
                row,
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    /// The app's previews by pull request number; only the open ones unless `all`.
    pub fn previews(&self, app: &str, all: bool) -> Result<Vec<Preview>> {
        let c = self.c();
        let mut st = c
            .prepare(&format!(
                "SELECT {COLUMNS} FROM previews WHERE app = ?1 AND (?2 OR state = 'open') ORDER BY pr"
            ))
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![app, all], row)
            .map_err(|e| self.e(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }
}

fn pg_row(r: &postgres::Row) -> Preview {
    Preview {
        app: r.get(0),
        pr: r.get::<_, i64>(1) as u64,
        state: r.get(2),
        url: r.get(3),
        head_ref: r.get(4),
        head_sha: r.get(5),
        opened_at: r.get(6),
        updated_at: r.get(7),
        removed_at: r.get(8),
        removed_why: r.get(9),
    }
}

impl Postgres {
    pub fn open_preview(
        &self,
        app: &str,
        pr: u64,
        url: &str,
        head_ref: &str,
        at: &str,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO previews (app, pr, state, url, head_ref, opened_at, updated_at) VALUES ($1, $2, 'open', $3, $4, $5, $5)
             ON CONFLICT (app, pr) DO UPDATE SET
               opened_at = CASE WHEN previews.state = 'open' THEN previews.opened_at ELSE EXCLUDED.opened_at END,
               state = 'open', url = EXCLUDED.url, head_ref = EXCLUDED.head_ref,
               updated_at = EXCLUDED.updated_at, removed_at = NULL, removed_why = ''",
            &[&app, &(pr as i64), &url, &head_ref, &at],
        )?;
        Ok(())
    }

    pub fn set_preview_sha(&self, app: &str, pr: u64, sha: &str, at: &str) -> Result<()> {
        self.exec(
            "UPDATE previews SET head_sha = $3, updated_at = $4 WHERE app = $1 AND pr = $2",
            &[&app, &(pr as i64), &sha, &at],
        )?;
        Ok(())
    }

    pub fn remove_preview(&self, app: &str, pr: u64, at: &str, why: &str) -> Result<bool> {
        let n = self.exec(
            "UPDATE previews SET state = 'removed', removed_at = $3, removed_why = $4 WHERE app = $1 AND pr = $2 AND state IN ('open', 'closing')",
            &[&app, &(pr as i64), &at, &why],
        )?;
        Ok(n == 1)
    }

    pub fn close_preview(&self, app: &str, pr: u64, why: &str) -> Result<bool> {
        let n = self.exec(
            "UPDATE previews SET state = 'closing', removed_why = $3 WHERE app = $1 AND pr = $2 AND state = 'open'",
            &[&app, &(pr as i64), &why],
        )?;
        Ok(n == 1)
    }

    pub fn preview(&self, app: &str, pr: u64) -> Result<Option<Preview>> {
        Ok(self
            .opt(
                &format!("SELECT {COLUMNS} FROM previews WHERE app = $1 AND pr = $2"),
                &[&app, &(pr as i64)],
            )?
            .map(|r| pg_row(&r)))
    }

    pub fn previews(&self, app: &str, all: bool) -> Result<Vec<Preview>> {
        Ok(self
            .rows(
                &format!("SELECT {COLUMNS} FROM previews WHERE app = $1 AND ($2 OR state = 'open') ORDER BY pr"),
                &[&app, &all],
            )?
            .iter()
            .map(pg_row)
            .collect())
    }
}

//! Previews, one row per (app, pull request): whether it is open, where it is served, what it
//! was last deployed from and when (its idle time counts from there). A removed preview keeps
//! its row, and its releases stay in the history under the preview's own app name.

use super::{params, OptionalExtension, Result, Store};
use serde::Serialize;

/// One preview as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The production app.
    pub app: String,
    pub pr: u64,
    /// `open` or `removed`.
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

impl Store {
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
                "UPDATE previews SET state = 'removed', removed_at = ?3, removed_why = ?4 WHERE app = ?1 AND pr = ?2 AND state = 'open'",
                params![app, pr as i64, at, why],
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

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn a_preview_opens_updates_and_is_removed_keeping_its_row() {
        let dir = std::env::temp_dir().join(format!("cutover-pv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::open(&dir.join("cutover.db")).unwrap();
        s.open_preview("web", 3, "http://pr-3-web.p.example", "feature", "t1")
            .unwrap();
        s.set_preview_sha("web", 3, "ab12", "t2").unwrap();
        s.open_preview("web", 3, "http://pr-3-web.p.example", "feature2", "t3")
            .unwrap();
        s.open_preview("web", 4, "http://pr-4-web.p.example", "x", "t3")
            .unwrap();
        let p = s.preview("web", 3).unwrap().unwrap();
        assert_eq!(
            (
                p.state.as_str(),
                p.opened_at.as_str(),
                p.updated_at.as_str()
            ),
            ("open", "t1", "t3")
        );
        assert_eq!(
            (p.head_ref.as_str(), p.head_sha.as_deref()),
            ("feature2", Some("ab12"))
        );
        assert!(s.remove_preview("web", 3, "t4", "closed").unwrap());
        assert!(!s.remove_preview("web", 3, "t5", "closed").unwrap());
        let open: Vec<u64> = s
            .previews("web", false)
            .unwrap()
            .iter()
            .map(|p| p.pr)
            .collect();
        assert_eq!(open, [4]);
        let all = s.previews("web", true).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].removed_at.as_deref(), Some("t4"));
        // Opened again: a new opening time.
        s.open_preview("web", 3, "http://pr-3-web.p.example", "y", "t6")
            .unwrap();
        let p = s.preview("web", 3).unwrap().unwrap();
        assert_eq!((p.state.as_str(), p.opened_at.as_str()), ("open", "t6"));
        assert_eq!(p.removed_at, None);
        assert!(s.previews("other", true).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

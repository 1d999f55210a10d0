//! `cutover diff`: what changed between two releases, read from the app's git mirror using
//! the full commit ids stored with the releases. Nothing here touches a host.

use crate::build::open_mirror;
use cutover_core::{format_utc, Config};
use cutover_git::{CommitInfo, GitError, Mirror};
use cutover_store::{Release, Store};
use serde::Serialize;
use std::path::Path;

/// Most commits listed on each side.
const MAX_COMMITS: usize = 1000;

/// One end of a diff.
#[derive(Debug, Clone, Serialize)]
pub struct End {
    pub release: String,
    pub commit: String,
    pub short: String,
    pub subject: String,
}

/// One commit in a diff.
#[derive(Debug, Clone, Serialize)]
pub struct CommitRow {
    pub commit: String,
    pub short: String,
    pub subject: String,
    pub author: String,
    pub email: String,
    pub date: String,
}

impl From<CommitInfo> for CommitRow {
    fn from(c: CommitInfo) -> CommitRow {
        CommitRow {
            short: cutover_git::short(&c.sha).to_string(),
            commit: c.sha,
            subject: c.subject,
            author: c.author,
            email: c.email,
            date: format_utc(c.time.max(0) as u64),
        }
    }
}

/// One changed path.
#[derive(Debug, Clone, Serialize)]
pub struct FileRow {
    pub path: String,
    pub change: String,
}

/// What changed from one release to another.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub app: String,
    pub from: End,
    pub to: End,
    /// Commits in `to` that `from` does not have (what `git log from..to` lists), newest first.
    pub commits: Vec<CommitRow>,
    /// Commits in `from` that `to` does not have: going back (a rollback, a force-push).
    pub reverted: Vec<CommitRow>,
    /// True when a list was cut at 1000 commits.
    pub truncated: bool,
    pub files: Vec<FileRow>,
}

/// Why there is no diff: bad input (exit 2) or a repository problem (exit 1).
#[derive(Debug)]
pub enum DiffError {
    Usage(String),
    Failed(String),
}

impl std::fmt::Display for DiffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiffError::Usage(m) | DiffError::Failed(m) => f.write_str(m),
        }
    }
}

/// Finds a release by id or by the last 7+ characters of its id; ambiguous suffixes are refused.
fn find<'a>(releases: &'a [Release], app: &str, wanted: &str) -> Result<&'a Release, DiffError> {
    if let Some(r) = releases.iter().find(|r| r.id == wanted) {
        return Ok(r);
    }
    let matches: Vec<&Release> = if wanted.len() >= 7 {
        releases.iter().filter(|r| r.id.ends_with(wanted)).collect()
    } else {
        Vec::new()
    };
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(DiffError::Usage(format!(
            "no release `{wanted}` in the history of app `{app}` (give a release id or its last 7+ characters; see `cutover history`)"
        ))),
        many => Err(DiffError::Usage(format!(
            "`{wanted}` matches {} releases: {}; give the whole id",
            many.len(),
            many.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The diff between releases `from` and `to` (ids or their last 7+ characters). `to`
/// defaults to the live release, `from` to the newest release before `to` that succeeded
/// and was built from a commit.
pub fn diff(
    config: &Config,
    store: &Store,
    data_dir: &Path,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Diff, DiffError> {
    let app = config.app.as_str();
    let failed = |e: cutover_store::StoreError| DiffError::Failed(e.to_string());
    let releases = store.releases(app).map_err(failed)?;
    let to = match to {
        Some(t) => find(&releases, app, t)?,
        None => {
            let live = store.live(app).map_err(failed)?.ok_or_else(|| {
                DiffError::Usage(format!(
                    "app `{app}` has no live release; name the releases: cutover diff FROM TO"
                ))
            })?;
            find(&releases, app, &live)?
        }
    };
    let from = match from {
        Some(f) => find(&releases, app, f)?,
        None => releases
            .iter()
            .filter(|r| r.id < to.id && r.status == "succeeded" && r.commit.is_some())
            .max_by(|a, b| a.id.cmp(&b.id))
            .ok_or_else(|| {
                DiffError::Usage(format!(
                    "no release before {} that succeeded and was built from a commit; name the releases: cutover diff FROM TO",
                    to.id
                ))
            })?,
    };
    for r in [from, to] {
        if r.commit.is_none() {
            return Err(DiffError::Usage(format!(
                "release {} was deployed from an artifact, not built from a commit, so it has no history to compare (deploy with --ref to record commits)",
                r.id
            )));
        }
    }
    let build = config.build.as_ref().ok_or_else(|| {
        DiffError::Usage(format!(
            "`cutover diff` reads the app's repository and needs a [build] section with `repo` in {}",
            config.file.display()
        ))
    })?;
    let git = |e: GitError| {
        if e.is_bad_input() {
            DiffError::Usage(e.to_string())
        } else {
            DiffError::Failed(e.to_string())
        }
    };
    let mut mirror = open_mirror(config, build, data_dir).map_err(git)?;
    let stored = [
        from.commit.clone().unwrap_or_default(),
        to.commit.clone().unwrap_or_default(),
    ];
    // Fetch only when the mirror lacks something (a fresh data directory, a short id).
    if stored.iter().any(|c| !is_full(c) || !mirror.has_commit(c)) {
        mirror.fetch().map_err(git)?;
    }
    let from_commit = commit_of(&mirror, from, &stored[0]).map_err(git)?;
    let to_commit = commit_of(&mirror, to, &stored[1]).map_err(git)?;
    let ahead = mirror
        .commits_between(&from_commit.sha, &to_commit.sha, MAX_COMMITS + 1)
        .map_err(git)?;
    let behind = mirror
        .commits_between(&to_commit.sha, &from_commit.sha, MAX_COMMITS + 1)
        .map_err(git)?;
    let truncated = ahead.len() > MAX_COMMITS || behind.len() > MAX_COMMITS;
    let files = mirror
        .changed_files(&from_commit.sha, &to_commit.sha)
        .map_err(git)?;
    let end = |r: &Release, c: &CommitInfo| End {
        release: r.id.clone(),
        short: cutover_git::short(&c.sha).to_string(),
        commit: c.sha.clone(),
        subject: c.subject.clone(),
    };
    Ok(Diff {
        app: app.to_string(),
        from: end(from, &from_commit),
        to: end(to, &to_commit),
        commits: ahead
            .into_iter()
            .take(MAX_COMMITS)
            .map(Into::into)
            .collect(),
        reverted: behind
            .into_iter()
            .take(MAX_COMMITS)
            .map(Into::into)
            .collect(),
        truncated,
        files: files
            .into_iter()
            .map(|f| FileRow {
                path: f.path,
                change: f.change.as_str().to_string(),
            })
            .collect(),
    })
}

fn is_full(sha: &str) -> bool {
    sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit())
}

/// The commit a release records. A full id is looked up as it is; anything else (a short id
/// written by an older tool) is resolved first, so an abbreviation never stands in for a
/// commit unchecked: ambiguous or unknown abbreviations are errors.
fn commit_of(mirror: &Mirror, r: &Release, stored: &str) -> Result<CommitInfo, GitError> {
    if is_full(stored) {
        return mirror
            .commit(&stored.to_ascii_lowercase())
            .map_err(|e| match e {
                GitError::MissingCommit { sha, url } => GitError::MissingCommit {
                    sha: format!("{sha} (release {})", r.id),
                    url,
                },
                e => e,
            });
    }
    mirror.resolve(stored)
}

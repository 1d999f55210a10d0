//! Git and builds for cutover: releases built from commits.
//!
//! This crate owns three things:
//!
//! - [`Mirror`]: one bare mirror of an app's repository (through `gix`, pure Rust), fetched
//!   incrementally and pruned to what the remote has, and everything read from it: resolving
//!   a revision (`main`, `origin/main`, `v1.2`, `HEAD~1`, full and short SHAs) to a full commit
//!   with rev-parse semantics, exporting a commit's tree into a fresh directory, the commits
//!   between two commits and the files that changed.
//! - [`build::run`]: running a build command in a clean environment with a timeout, streaming
//!   its output line by line and killing its whole process tree when it overruns.
//! - [`RepoUrl`]: which repository locations are accepted (local paths, `file://`, `ssh://`
//!   and `user@host:path`; `https://` is refused: this build carries no HTTP transport).
//!
//! It must not talk to deploy hosts, touch the history database or the artifact store, or
//! build shell command lines (the ssh command it hands to `gix` comes ready-made from
//! `cutover-remote`). Short SHAs never leave it as identities: everything it returns names
//! commits by their full 40-character id.

pub mod build;
mod mirror;

pub use mirror::{Change, CommitInfo, ExportSummary, FetchSummary, FileChange, Mirror};

/// What went wrong with the repository.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The repository location is not one this build can fetch from.
    #[error("{url}: {reason}")]
    UnsupportedUrl { url: String, reason: String },
    /// The local mirror could not be created or opened.
    #[error("cannot open the git mirror {path}: {message}")]
    Mirror { path: String, message: String },
    /// Fetching from the repository failed.
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    /// A short SHA that matches more than one object.
    #[error("`{spec}` is ambiguous: it matches {} objects; use more characters:\n  {}", candidates.len(), candidates.join("\n  "))]
    Ambiguous {
        spec: String,
        candidates: Vec<String>,
    },
    /// Nothing in the repository is called that.
    #[error("`{spec}` matches no commit, branch or tag in {url} (fetched just now)")]
    Unknown { spec: String, url: String },
    /// The revision names something that is not a commit (a tree or a blob).
    #[error("`{spec}` names a {kind}, not a commit")]
    NotACommit { spec: String, kind: String },
    /// The revision could not be parsed or resolved.
    #[error("cannot resolve `{spec}`: {message}")]
    BadRevision { spec: String, message: String },
    /// A full commit id that the mirror does not hold (for example force-pushed away).
    #[error("commit {sha} is not in the repository {url}")]
    MissingCommit { sha: String, url: String },
    /// Reading objects from the mirror failed.
    #[error("cannot read {what} from the git mirror: {message}")]
    Read { what: String, message: String },
    /// Writing the exported tree failed or the tree holds an unsafe entry.
    #[error("cannot export commit {sha} into {path}: {message}")]
    Export {
        sha: String,
        path: String,
        message: String,
    },
}

impl GitError {
    /// True when the user asked for something that does not exist or is ambiguous (bad input,
    /// nothing was touched), as opposed to the repository being unreachable or broken.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            GitError::UnsupportedUrl { .. }
                | GitError::Ambiguous { .. }
                | GitError::Unknown { .. }
                | GitError::NotACommit { .. }
                | GitError::BadRevision { .. }
        )
    }
}

/// A repository location, checked for what this build can fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl(String);

impl RepoUrl {
    /// Accepts an absolute local path, `file://`, `ssh://` or scp-like `user@host:path`.
    pub fn parse(url: &str) -> Result<RepoUrl, GitError> {
        let unsupported = |reason: &str| GitError::UnsupportedUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(reason) = unsupported_scheme(url) {
            return Err(unsupported(&reason));
        }
        if !url.contains("://") && !url.starts_with('/') && !is_scp_like(url) {
            return Err(unsupported(
                "expected an absolute path, file://, ssh:// or user@host:path",
            ));
        }
        Ok(RepoUrl(url.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `ssh://` and `user@host:path` locations (they need the ssh command).
    pub fn is_ssh(&self) -> bool {
        self.0.starts_with("ssh://") || is_scp_like(&self.0)
    }
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a URL scheme cannot be used, if it cannot (shared with config validation wording).
pub fn unsupported_scheme(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Some("https:// and http:// repositories are not supported by this build of cutover (it carries no HTTP transport, to stay free of OpenSSL); use an ssh:// URL or a local path".into());
    }
    if let Some((scheme, _)) = lower.split_once("://") {
        if scheme != "ssh" && scheme != "file" {
            return Some(format!(
                "the {scheme}:// scheme is not supported; use ssh://, file:// or a local path"
            ));
        }
    }
    None
}

/// `user@host:path` or `host:path` (git's scp-like syntax): a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    if url.contains("://") || url.starts_with('/') || url.starts_with('.') {
        return false;
    }
    match (url.find(':'), url.find('/')) {
        (Some(c), Some(s)) => c < s && c > 0,
        (Some(c), None) => c > 0,
        _ => false,
    }
}

/// The first 7 characters of a full commit id: for display only, never for lookups.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "/srv/repo.git",
            "file:///srv/repo.git",
            "ssh://git@host/srv/repo.git",
            "git@host:repo.git",
        ] {
            assert!(RepoUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://x/y.git",
            "http://x/y",
            "git://x/y",
            "relative/path",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoUrl::parse("git@host:repo.git").unwrap().is_ssh());
        assert!(!RepoUrl::parse("/srv/r").unwrap().is_ssh());
    }

    #[test]
    fn short_is_seven() {
        assert_eq!(short("0123456789abcdef"), "0123456");
        assert_eq!(short("abc"), "abc");
    }
}

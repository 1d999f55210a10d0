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
//! - [`RepoUrl`]: which repository locations are accepted (local paths, `file://`, `ssh://`,
//!   `user@host:path` and `https://`; plain `http://` and URLs carrying credentials are
//!   refused). `https://` goes through rustls, with a token from the environment
//!   ([`HttpsOptions`]).
//!
//! It must not talk to deploy hosts, touch the history database or the artifact store, or
//! build shell command lines (the ssh command it hands to `gix` comes ready-made from
//! `cutover-remote`). Short SHAs never leave it as identities: everything it returns names
//! commits by their full 40-character id.

pub mod build;
mod https;
mod mirror;

pub use https::{HttpsOptions, DEFAULT_TOKEN_ENV, DEFAULT_TOKEN_USER};
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
    /// Accepts an absolute local path, `file://`, `ssh://`, scp-like `user@host:path` or
    /// `https://` without credentials in it.
    pub fn parse(url: &str) -> Result<RepoUrl, GitError> {
        let unsupported = |reason: &str| GitError::UnsupportedUrl {
            url: redact_credentials(url),
            reason: reason.to_string(),
        };
        if let Some(reason) = unsupported_scheme(url) {
            return Err(unsupported(&reason));
        }
        if !url.contains("://") && !url.starts_with('/') && !is_scp_like(url) {
            return Err(unsupported(
                "expected an absolute path, file://, ssh://, https:// or user@host:path",
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

    /// True for `https://` locations (they need [`HttpsOptions`]).
    pub fn is_https(&self) -> bool {
        self.0.to_ascii_lowercase().starts_with("https://")
    }
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a URL cannot be used, if it cannot (shared with config validation wording). Plain
/// `http://` is refused: a token would cross the network in clear text, and anyone on the path
/// could hand cutover different code to build and deploy. `https://` URLs must not carry
/// credentials (they would end up in the history, events and messages), a query or a fragment.
pub fn unsupported_scheme(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") {
        return Some("plain http:// is not supported: the token and the code would cross the network unprotected (anyone on the path could change what gets deployed); use https:// or ssh://".into());
    }
    if let Some(rest) = lower.strip_prefix("https://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Some(format!("credentials in the URL are not accepted (they would be stored and shown wherever the URL is); remove the part before '@', put the token in an environment variable named by [build] token_env (default {DEFAULT_TOKEN_ENV}) and the username, if the server needs a particular one, in [build] token_user"));
        }
        if authority.is_empty() {
            return Some("expected https://host/path".into());
        }
        if rest.contains(['?', '#']) {
            return Some("a git URL has no query string or fragment ('?' or '#')".into());
        }
        return None;
    }
    if let Some((scheme, _)) = lower.split_once("://") {
        if scheme != "ssh" && scheme != "file" {
            return Some(format!(
                "the {scheme}:// scheme is not supported; use https://, ssh://, file:// or a local path"
            ));
        }
    }
    None
}

/// `url` with any `user:password@` of a `scheme://` URL replaced by `***@`, for messages.
pub fn redact_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
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
            "https://x/y.git",
            "https://git.example.com:8443/team/app.git",
        ] {
            assert!(RepoUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://x/y",
            "HTTP://x/y",
            "https://user:secret@x/y.git",
            "https://ghp_token@x/y.git",
            "https://x/y.git?access_token=z",
            "https://",
            "git://x/y",
            "relative/path",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
        let e = RepoUrl::parse("https://user:s3cret@x/y.git").unwrap_err();
        assert!(e.to_string().contains("token_env"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
        assert_eq!(redact_credentials("https://a:b@h/p@q"), "https://***@h/p@q");
        assert_eq!(redact_credentials("ssh://git@h/r"), "ssh://***@h/r");
        assert_eq!(redact_credentials("/srv/r"), "/srv/r");
        assert!(RepoUrl::parse("git@host:repo.git").unwrap().is_ssh());
        assert!(!RepoUrl::parse("/srv/r").unwrap().is_ssh());
        assert!(RepoUrl::parse("https://x/y").unwrap().is_https());
        assert!(!RepoUrl::parse("ssh://x/y").unwrap().is_https());
    }

    #[test]
    fn short_is_seven() {
        assert_eq!(short("0123456789abcdef"), "0123456");
        assert_eq!(short("abc"), "abc");
    }
}

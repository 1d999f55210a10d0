//! The bare mirror of one app's repository, and everything read from it.

use crate::https::{self, AuthState, HttpsOptions};
use crate::{GitError, RepoUrl};
use gix::bstr::{BString, ByteSlice};
use gix::objs::tree::EntryKind;
use gix::refs::transaction::{Change as RefChange, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::{FullName, Target};
use gix::ObjectId;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Fetch refspecs: branches as local branches (so `main` resolves) and as `origin/*` (so
/// `origin/main` does), tags as tags; all forced, so a force-pushed branch follows the remote.
const REFSPECS: [&str; 3] = [
    "+refs/heads/*:refs/heads/*",
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];
/// Local namespaces that mirror the remote and are pruned to it after each fetch.
const MIRRORED: [&str; 3] = ["refs/heads/", "refs/remotes/origin/", "refs/tags/"];

/// One commit, named by its full id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// 40 lowercase hex digits.
    pub sha: String,
    /// The first line of the message.
    pub subject: String,
    pub author: String,
    pub email: String,
    /// Author time, seconds since the epoch.
    pub time: i64,
    /// Committer time, seconds since the epoch (what exported files are dated).
    pub commit_time: i64,
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchSummary {
    /// Refs the remote advertised (branches and tags).
    pub remote_refs: usize,
    /// Whether new objects arrived.
    pub received_pack: bool,
    /// Local refs removed because the remote no longer has them.
    pub pruned: Vec<String>,
}

/// How a path changed between two commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Modified => "modified",
            Change::Deleted => "deleted",
        }
    }
}

/// One changed path (files, symlinks and submodules; directories are walked into).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub change: Change,
}

/// What an export wrote.
#[derive(Debug, Clone, Default)]
pub struct ExportSummary {
    pub files: u64,
    pub bytes: u64,
    /// Submodule paths, left as empty directories (submodules are not fetched).
    pub submodules: Vec<String>,
}

/// A bare mirror of one repository, kept in the data directory and fetched incrementally.
pub struct Mirror {
    repo: gix::Repository,
    url: RepoUrl,
    path: PathBuf,
    /// For `https://`: where the token comes from and which CAs to trust.
    https: HttpsOptions,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("path", &self.path)
            .field("url", &self.url)
            .field("https", &self.https)
            .finish()
    }
}

fn chain(e: &gix::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for err in e.iter_errors() {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

impl Mirror {
    /// Opens the mirror at `path`, creating a bare repository there first if there is none.
    /// `ssh_command` is the complete command gix runs for `ssh://` URLs (strict host keys,
    /// the config's identity and known_hosts), built by `cutover-remote`.
    pub fn open(path: &Path, url: RepoUrl, ssh_command: Option<&str>) -> Result<Mirror, GitError> {
        let merr = |message: String| GitError::Mirror {
            path: path.display().to_string(),
            message,
        };
        if !path.join("HEAD").exists() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| merr(e.to_string()))?;
            }
            gix::init_bare(path).map_err(|e| merr(chain(&e)))?;
        }
        let mut overrides: Vec<String> = vec![
            "user.name=cutover".into(),
            "user.email=cutover@localhost".into(),
            "core.logAllRefUpdates=false".into(),
            "ssh.variant=ssh".into(),
        ];
        if let Some(cmd) = ssh_command {
            overrides.push(format!("core.sshCommand={cmd}"));
        }
        // Isolated: the user's and the system's git config do not apply (no URL rewrites, no
        // GIT_SSH_COMMAND from the environment); the ssh command is cutover's.
        let opts = gix::open::Options::isolated().config_overrides(overrides);
        let repo = gix::open_opts(path, opts).map_err(|e| merr(chain(&e)))?;
        Ok(Mirror {
            repo,
            url,
            path: path.to_path_buf(),
            https: HttpsOptions::default(),
        })
    }

    /// Sets how `https://` repositories are reached (token variable, username, CA file);
    /// without it, the defaults of [`HttpsOptions`].
    pub fn with_https(mut self, https: HttpsOptions) -> Mirror {
        self.https = https;
        self
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fetches every branch and tag (forced), then removes local refs the remote no longer
    /// has and points `HEAD` at the remote's default branch. Objects are never removed, so
    /// commits recorded by earlier releases stay readable after a force-push.
    pub fn fetch(&mut self) -> Result<FetchSummary, GitError> {
        let ferr = |message: String| GitError::Fetch {
            url: self.url.to_string(),
            message,
        };
        let is_https = self.url.is_https();
        let auth = Cell::new(AuthState::NotAsked);
        let https_opts = self.https.clone();
        // For https, gix's own message is rewritten into what happened and what to do.
        let ferr_net = |e: &gix::Error| {
            let chain = chain(e);
            if is_https {
                ferr(https::explain(&https_opts, auth.get(), &chain))
            } else {
                ferr(chain)
            }
        };
        let transport_opts = if is_https {
            https::install_crypto_provider();
            let ca = https::load_ca(&self.https, self.url.as_str())?;
            Some(https::transport_options(&self.repo, self.url.as_str(), ca))
        } else {
            None
        };
        let outcome = {
            let remote = self
                .repo
                .remote_at(self.url.as_str())
                .and_then(|r| r.with_refspecs(REFSPECS, gix::remote::Direction::Fetch))
                .map_err(|e| ferr(chain(&e)))?
                .with_fetch_tags(gix::remote::fetch::Tags::None);
            let mut conn = remote
                .connect(gix::remote::Direction::Fetch)
                .map_err(|e| ferr_net(&e))?
                // The only credentials ever sent: the token, and only if the server asks.
                .with_credentials(https::credentials(&https_opts, &auth));
            if let Some(opts) = transport_opts {
                conn.set_transport_options(opts);
            }
            let head = gix::refspec::parse("HEAD".into(), gix::refspec::parse::Operation::Fetch)
                .map_err(|e| ferr(e.to_string()))?
                .to_owned();
            let opts = gix::remote::ref_map::Options {
                extra_refspecs: vec![head],
                ..Default::default()
            };
            let interrupt = AtomicBool::new(false);
            conn.prepare_fetch(gix::progress::Discard, opts)
                .map_err(|e| ferr_net(&e))?
                .receive(gix::progress::Discard, &interrupt)
                .map_err(|e| ferr_net(&e))?
        };
        let mut summary = FetchSummary {
            remote_refs: outcome
                .ref_map
                .remote_refs
                .iter()
                .filter(|r| {
                    let (name, _, _) = r.unpack();
                    name.starts_with(b"refs/")
                })
                .count(),
            received_pack: matches!(outcome.status, gix::remote::fetch::Status::Change { .. }),
            pruned: Vec::new(),
        };

        // Prune: the local mirror namespaces hold exactly what the remote advertised.
        let keep: BTreeSet<BString> = outcome
            .ref_map
            .mappings
            .iter()
            .filter_map(|m| m.local.clone())
            .collect();
        let mut edits = Vec::new();
        {
            let platform = self.repo.references().map_err(|e| ferr(chain(&e)))?;
            for prefix in MIRRORED {
                let iter = platform.prefixed(prefix).map_err(|e| ferr(chain(&e)))?;
                for r in iter {
                    let r = r.map_err(|e| ferr(chain(&e)))?;
                    let name = r.name().as_bstr().to_owned();
                    if name.ends_with(b"/HEAD") || keep.contains(&name) {
                        continue;
                    }
                    summary.pruned.push(name.to_string());
                    edits.push(RefEdit {
                        change: RefChange::Delete {
                            expected: PreviousValue::Any,
                            log: RefLog::AndReference,
                        },
                        name: r.name().to_owned(),
                        deref: false,
                    });
                }
            }
        }
        if !edits.is_empty() {
            self.repo
                .edit_references(edits)
                .map_err(|e| ferr(format!("cannot prune refs: {}", chain(&e))))?;
        }

        // HEAD follows the remote's default branch, so `HEAD` and `HEAD~1` mean what they
        // mean in a clone.
        let remote_head = outcome.ref_map.remote_refs.iter().find_map(|r| match r {
            gix::protocol::handshake::Ref::Symbolic {
                full_ref_name,
                target,
                ..
            } if full_ref_name == "HEAD" => Some(target.clone()),
            _ => None,
        });
        if let Some(target) = remote_head {
            if let Some(branch) = target.strip_prefix(b"refs/heads/") {
                let branch = branch.to_str_lossy().into_owned();
                for (name, referent) in [
                    ("HEAD".to_string(), format!("refs/heads/{branch}")),
                    (
                        "refs/remotes/origin/HEAD".to_string(),
                        format!("refs/remotes/origin/{branch}"),
                    ),
                ] {
                    let (Ok(name), Ok(referent)) = (
                        FullName::try_from(name.as_str()),
                        FullName::try_from(referent.as_str()),
                    ) else {
                        continue;
                    };
                    let edit = RefEdit {
                        change: RefChange::Update {
                            log: LogChange {
                                mode: RefLog::AndReference,
                                force_create_reflog: false,
                                message: "cutover: remote HEAD".into(),
                            },
                            expected: PreviousValue::Any,
                            new: Target::Symbolic(referent),
                        },
                        name,
                        deref: false,
                    };
                    self.repo
                        .edit_reference(edit)
                        .map_err(|e| ferr(format!("cannot update HEAD: {}", chain(&e))))?;
                }
            }
        }
        Ok(summary)
    }

    /// Resolves `spec` with rev-parse semantics (`main`, `origin/main`, `v1.2`, `HEAD~1`,
    /// full and short SHAs) to a commit, peeling tags. A short SHA that matches several
    /// objects is [`GitError::Ambiguous`] (listing them), one that matches none is
    /// [`GitError::Unknown`].
    pub fn resolve(&self, spec: &str) -> Result<CommitInfo, GitError> {
        let bad = |message: &str| GitError::BadRevision {
            spec: spec.to_string(),
            message: message.to_string(),
        };
        if spec.is_empty() {
            return Err(bad("empty revision"));
        }
        if spec.starts_with('-') || spec.chars().any(|c| c.is_control()) {
            return Err(bad("not a revision"));
        }
        if spec.contains("..") {
            return Err(bad("a range names several commits; name one commit"));
        }
        let id = match self.repo.rev_parse_single(spec) {
            Ok(id) => id.detach(),
            Err(e) => return Err(self.classify(spec, &e)),
        };
        let object = self.repo.find_object(id).map_err(|e| GitError::Read {
            what: format!("object {id}"),
            message: chain(&e),
        })?;
        let object = object.peel_tags_to_end().map_err(|e| GitError::Read {
            what: format!("tag {id}"),
            message: chain(&e),
        })?;
        if object.kind != gix::objs::Kind::Commit {
            return Err(GitError::NotACommit {
                spec: spec.to_string(),
                kind: object.kind.to_string(),
            });
        }
        self.commit_info(object.id)
    }

    fn classify(&self, spec: &str, e: &gix::Error) -> GitError {
        use gix::revision::spec::parse::Error as P;
        for err in e.iter_errors() {
            if let Some(p) = err.downcast_ref::<P>() {
                match p {
                    P::AmbiguousPrefix { candidates, .. }
                    | P::AmbiguousRefAndObject { candidates, .. } => {
                        let mut list: Vec<String> = candidates
                            .iter()
                            .map(|(prefix, info)| {
                                let full = self
                                    .full_id_of(prefix)
                                    .unwrap_or_else(|| prefix.to_string());
                                format!("{full} {info}")
                            })
                            .collect();
                        list.sort();
                        return GitError::Ambiguous {
                            spec: spec.to_string(),
                            candidates: list,
                        };
                    }
                    P::MissingReference { .. } => {
                        return GitError::Unknown {
                            spec: spec.to_string(),
                            url: self.url.to_string(),
                        }
                    }
                    _ => {}
                }
            }
        }
        let hexish = spec.len() >= 4 && spec.chars().all(|c| c.is_ascii_hexdigit());
        if hexish || e.dominant_class() == Some(gix::error::Class::NotFound) {
            return GitError::Unknown {
                spec: spec.to_string(),
                url: self.url.to_string(),
            };
        }
        GitError::BadRevision {
            spec: spec.to_string(),
            message: chain(e),
        }
    }

    /// The full id of an unambiguous-in-itself candidate prefix (gix lists candidates by the
    /// shortest unique prefix; people and tests want the full id).
    fn full_id_of(&self, prefix: &gix::hash::Prefix) -> Option<String> {
        let mut set = std::collections::HashSet::new();
        self.repo
            .objects
            .lookup_prefix(*prefix, Some(&mut set))
            .ok()?;
        if set.len() == 1 {
            set.into_iter().next().map(|id| id.to_string())
        } else {
            None
        }
    }

    /// The commit with full id `sha`, which must be in the mirror.
    pub fn commit(&self, sha: &str) -> Result<CommitInfo, GitError> {
        let id = parse_full(sha)?;
        match self.repo.try_find_header(id) {
            Ok(Some(h)) if h.kind() == gix::objs::Kind::Commit => self.commit_info(id),
            Ok(Some(h)) => Err(GitError::NotACommit {
                spec: sha.to_string(),
                kind: h.kind().to_string(),
            }),
            Ok(None) => Err(GitError::MissingCommit {
                sha: sha.to_string(),
                url: self.url.to_string(),
            }),
            Err(e) => Err(GitError::Read {
                what: format!("commit {sha}"),
                message: chain(&e),
            }),
        }
    }

    /// Whether the mirror holds the commit `sha` (a full id).
    pub fn has_commit(&self, sha: &str) -> bool {
        parse_full(sha)
            .map(|id| self.repo.has_object(id))
            .unwrap_or(false)
    }

    fn commit_info(&self, id: ObjectId) -> Result<CommitInfo, GitError> {
        let rerr = |e: gix::Error| GitError::Read {
            what: format!("commit {id}"),
            message: chain(&e),
        };
        let commit = self.repo.find_commit(id).map_err(rerr)?;
        let subject = commit
            .message()
            .map(|m| m.summary().to_str_lossy().into_owned())
            .unwrap_or_default();
        let author = commit.author().map_err(rerr)?;
        let time = author.time().map(|t| t.seconds).unwrap_or(0);
        let commit_time = commit.time().map(|t| t.seconds).unwrap_or(time);
        Ok(CommitInfo {
            sha: id.to_string(),
            subject,
            author: author.name.trim().to_str_lossy().into_owned(),
            email: author.email.trim().to_str_lossy().into_owned(),
            time,
            commit_time,
        })
    }

    /// Commits reachable from `to` but not from `from` (what `git log from..to` lists),
    /// newest first, at most `limit`.
    pub fn commits_between(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<CommitInfo>, GitError> {
        let (from_id, to_id) = (self.commit_id(from)?, self.commit_id(to)?);
        let rerr = |e: gix::Error| GitError::Read {
            what: format!("the history between {from} and {to}"),
            message: chain(&e),
        };
        let walk = self
            .repo
            .rev_walk([to_id])
            .with_hidden([from_id])
            .sorting(gix::revision::walk::Sorting::ByCommitTime(
                gix::traverse::commit::simple::CommitTimeOrder::NewestFirst,
            ))
            .all()
            .map_err(rerr)?;
        let mut out = Vec::new();
        for info in walk {
            let info = info.map_err(rerr)?;
            out.push(self.commit_info(info.id)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn commit_id(&self, sha: &str) -> Result<ObjectId, GitError> {
        self.commit(sha)?;
        parse_full(sha)
    }

    /// Paths whose content, mode or kind differ between the trees of commits `from` and
    /// `to`, sorted by path. Renames show as a deletion and an addition.
    pub fn changed_files(&self, from: &str, to: &str) -> Result<Vec<FileChange>, GitError> {
        let a = self.tree_of(from)?;
        let b = self.tree_of(to)?;
        let mut out = Vec::new();
        self.diff_trees(Some(a), Some(b), "", &mut out)?;
        out.sort_by(|x, y| x.path.cmp(&y.path));
        Ok(out)
    }

    fn tree_of(&self, sha: &str) -> Result<ObjectId, GitError> {
        let id = self.commit_id(sha)?;
        let commit = self.repo.find_commit(id).map_err(|e| GitError::Read {
            what: format!("commit {sha}"),
            message: chain(&e),
        })?;
        commit
            .tree_id()
            .map(|t| t.detach())
            .map_err(|e| GitError::Read {
                what: format!("the tree of {sha}"),
                message: chain(&e),
            })
    }

    /// Entries of a tree: name -> (kind, id).
    fn entries(
        &self,
        tree: ObjectId,
    ) -> Result<BTreeMap<BString, (EntryKind, ObjectId)>, GitError> {
        let rerr = |e: gix::Error| GitError::Read {
            what: format!("tree {tree}"),
            message: chain(&e),
        };
        let t = self.repo.find_tree(tree).map_err(rerr)?;
        let decoded = t.decode().map_err(rerr)?;
        Ok(decoded
            .entries
            .iter()
            .map(|e| (e.filename.to_owned(), (e.mode.kind(), e.oid.to_owned())))
            .collect())
    }

    fn diff_trees(
        &self,
        a: Option<ObjectId>,
        b: Option<ObjectId>,
        prefix: &str,
        out: &mut Vec<FileChange>,
    ) -> Result<(), GitError> {
        if a == b {
            return Ok(());
        }
        let ea = match a {
            Some(t) => self.entries(t)?,
            None => BTreeMap::new(),
        };
        let eb = match b {
            Some(t) => self.entries(t)?,
            None => BTreeMap::new(),
        };
        let names: BTreeSet<&BString> = ea.keys().chain(eb.keys()).collect();
        for name in names {
            let path = format!("{prefix}{}", name.to_str_lossy());
            let (x, y) = (ea.get(name), eb.get(name));
            let is_tree = |e: Option<&(EntryKind, ObjectId)>| {
                e.filter(|(k, _)| *k == EntryKind::Tree).map(|(_, id)| *id)
            };
            let not_tree = |e: Option<&(EntryKind, ObjectId)>| {
                e.filter(|(k, _)| *k != EntryKind::Tree).copied()
            };
            // Trees on either side are walked into; non-trees compared by kind and id.
            if is_tree(x).is_some() || is_tree(y).is_some() {
                self.diff_trees(is_tree(x), is_tree(y), &format!("{path}/"), out)?;
            }
            match (not_tree(x), not_tree(y)) {
                (None, None) => {}
                (None, Some(_)) => out.push(FileChange {
                    path,
                    change: Change::Added,
                }),
                (Some(_), None) => out.push(FileChange {
                    path,
                    change: Change::Deleted,
                }),
                (Some(p), Some(q)) if p != q => out.push(FileChange {
                    path,
                    change: Change::Modified,
                }),
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the tree of commit `sha` into `dest`, which must not exist yet (a fresh
    /// directory every time: nothing from an earlier build can leak in). Entries whose names
    /// could escape the directory (`..`, `/`, `.git`) are refused. Files and directories are
    /// dated with the commit time, as `git archive` does, so the same commit exports to the
    /// same bytes.
    pub fn export(&self, sha: &str, dest: &Path) -> Result<ExportSummary, GitError> {
        let tree = self.tree_of(sha)?;
        let info = self.commit(sha)?;
        let mtime =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(info.commit_time.max(0) as u64);
        let eerr = |message: String| GitError::Export {
            sha: sha.to_string(),
            path: dest.display().to_string(),
            message,
        };
        std::fs::create_dir(dest).map_err(|e| eerr(e.to_string()))?;
        let mut summary = ExportSummary::default();
        self.export_tree(tree, dest, "", mtime, &mut summary, &eerr)?;
        Ok(summary)
    }

    fn export_tree(
        &self,
        tree: ObjectId,
        dir: &Path,
        prefix: &str,
        mtime: std::time::SystemTime,
        summary: &mut ExportSummary,
        eerr: &dyn Fn(String) -> GitError,
    ) -> Result<(), GitError> {
        for (name, (kind, id)) in self.entries(tree)? {
            let shown = format!("{prefix}{}", name.to_str_lossy());
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains(&b'/')
                || name.contains(&0)
                || name.eq_ignore_ascii_case(b".git")
            {
                return Err(eerr(format!("unsafe entry name {shown:?} in the tree")));
            }
            let path = dir.join(OsStr::from_bytes(name.as_slice()));
            let io = |e: std::io::Error| eerr(format!("{shown}: {e}"));
            match kind {
                EntryKind::Tree => {
                    std::fs::create_dir(&path).map_err(io)?;
                    self.export_tree(id, &path, &format!("{shown}/"), mtime, summary, eerr)?;
                }
                EntryKind::Blob | EntryKind::BlobExecutable => {
                    let blob = self.repo.find_object(id).map_err(|e| GitError::Read {
                        what: format!("blob {id} ({shown})"),
                        message: chain(&e),
                    })?;
                    let mode = if kind == EntryKind::BlobExecutable {
                        0o755
                    } else {
                        0o644
                    };
                    // create_new: never follows or replaces anything already there.
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&path)
                        .map_err(io)?;
                    f.write_all(&blob.data).map_err(io)?;
                    f.set_modified(mtime).map_err(io)?;
                    summary.files += 1;
                    summary.bytes += blob.data.len() as u64;
                }
                EntryKind::Link => {
                    let blob = self.repo.find_object(id).map_err(|e| GitError::Read {
                        what: format!("symlink {id} ({shown})"),
                        message: chain(&e),
                    })?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&blob.data), &path).map_err(io)?;
                    summary.files += 1;
                }
                EntryKind::Commit => {
                    std::fs::create_dir(&path).map_err(io)?;
                    set_dir_mtime(&path, mtime).map_err(io)?;
                    summary.submodules.push(shown);
                }
            }
        }
        // Last: writing entries above changed the directory's own time.
        set_dir_mtime(dir, mtime).map_err(|e| eerr(format!("{prefix}: {e}")))
    }
}

fn parse_full(sha: &str) -> Result<ObjectId, GitError> {
    if sha.len() != 40 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(GitError::BadRevision {
            spec: sha.to_string(),
            message: "expected a full 40-character commit id".into(),
        });
    }
    ObjectId::from_hex(sha.as_bytes()).map_err(|e| GitError::BadRevision {
        spec: sha.to_string(),
        message: e.to_string(),
    })
}

fn set_dir_mtime(dir: &Path, mtime: std::time::SystemTime) -> std::io::Result<()> {
    std::fs::File::open(dir)?.set_modified(mtime)
}

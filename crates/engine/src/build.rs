//! `deploy --ref`: from a git revision to a stored artifact, before any host is touched.
//! Fetch the app's mirror, resolve the revision to a full commit, reuse a cached artifact of
//! a reproducible build, or export the commit's tree into a fresh directory, run the build
//! there, and import its output into the artifact store. Every step is an event of the
//! deploy's run; build output is recorded line by line and shown live.

use crate::artifact::{ArtifactStore, Limits, StoredArtifact};
use crate::{now_utc, Phase, Reporter};
use cutover_core::{BuildConfig, Config};
use cutover_git::build::{BuildError, Environment};
use cutover_git::{CommitInfo, GitError, HttpsOptions, Mirror, RepoUrl};
use cutover_remote::ssh::{git_ssh_command, SshOptions};
use cutover_store::Store;
use std::path::{Path, PathBuf};

/// Output lines recorded as events per build; the rest is shown but not kept.
const MAX_RECORDED_LINES: u64 = 20_000;

/// A build's result, ready to deploy.
pub(crate) struct Built {
    pub(crate) artifact: StoredArtifact,
    pub(crate) commit: CommitInfo,
    pub(crate) source: String,
}

/// Why there is nothing to deploy.
pub(crate) enum Failure {
    /// Bad input (unknown or ambiguous revision, unusable URL): exit 2.
    Input(String),
    /// The fetch or the build failed: exit 1.
    Failed(String),
}

/// Records events of one run (the deploy's) and shows them.
pub(crate) struct Events<'a> {
    pub(crate) store: &'a Store,
    pub(crate) reporter: &'a dyn Reporter,
    pub(crate) app: &'a str,
    pub(crate) run_id: i64,
}

impl Events<'_> {
    pub(crate) fn ev(&self, step: &str, phase: Phase, detail: &str) {
        self.reporter.step(None, step, phase, detail);
        self.raw(step, phase.as_str(), detail);
    }

    /// Records a step and shows `text` to people instead of the bare step line.
    fn shown(&self, step: &str, phase: Phase, detail: &str, text: &str) {
        self.reporter.note(text);
        self.raw(step, phase.as_str(), detail);
    }

    fn raw(&self, step: &str, phase: &str, detail: &str) {
        let _ = self.store.event(
            self.run_id,
            self.app,
            "",
            None,
            step,
            phase,
            &now_utc(),
            detail,
        );
    }
}

/// Where an app's mirror lives in the data directory.
pub fn mirror_path(data_dir: &Path, app: &str) -> PathBuf {
    data_dir.join("git").join(format!("{app}.git"))
}

/// Opens (creating) the app's mirror with cutover's ssh command for `ssh://` repositories.
pub fn open_mirror(
    config: &Config,
    build: &BuildConfig,
    data_dir: &Path,
) -> Result<Mirror, GitError> {
    let url = RepoUrl::parse(&build.repo)?;
    let ssh = url.is_ssh().then(|| {
        git_ssh_command(&SshOptions {
            config: config.ssh.config.clone(),
            known_hosts: config.ssh.known_hosts.clone(),
            identity: config.ssh.identity.clone(),
            connect_timeout: config.ssh.connect_timeout,
            control_dir: PathBuf::new(),
        })
    });
    let https = HttpsOptions {
        token_env: build.token_env.clone(),
        token_user: build.token_user.clone(),
        ca_file: build.ca_file.clone(),
    };
    Ok(Mirror::open(&mirror_path(data_dir, &config.app), url, ssh.as_deref())?.with_https(https))
}

/// The cache key of a build: the commit and everything in the build config that can change
/// what the build produces (the values of passed-through variables included, hashed).
fn cache_key(commit: &str, b: &BuildConfig, env: &Environment) -> String {
    let mut text = format!(
        "commit={commit}\ncommand={}\noutput={}\n",
        b.command.as_deref().unwrap_or(""),
        b.output
    );
    for (k, v) in &env.vars {
        if b.env.contains_key(k) || b.pass_env.contains(k) {
            text.push_str(&format!("env {k}={v}\n"));
        }
    }
    crate::protocol::sha256_hex(&text)
}

pub(crate) fn build(
    config: &Config,
    build: &BuildConfig,
    store: &Store,
    artifacts: &ArtifactStore,
    data_dir: &Path,
    git_ref: &str,
    events: &Events<'_>,
) -> Result<Built, Failure> {
    let reporter = events.reporter;
    let git_fail = |step: &str, e: GitError| {
        events.ev(step, Phase::Failed, &e.to_string());
        if e.is_bad_input() {
            Failure::Input(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    };

    // Fetch and resolve.
    events.shown(
        "fetch",
        Phase::Start,
        &build.repo,
        &format!("fetching {}", build.repo),
    );
    let mut mirror = open_mirror(config, build, data_dir).map_err(|e| git_fail("fetch", e))?;
    let fetched = mirror.fetch().map_err(|e| {
        if mirror.url().is_ssh() {
            if let GitError::Fetch { url, message } = e {
                return git_fail(
                    "fetch",
                    GitError::Fetch {
                        url,
                        message: format!("{message} (ssh's own message, if any, is on stderr; host keys are checked strictly against [ssh] known_hosts or ~/.ssh/known_hosts)"),
                    },
                );
            }
        }
        git_fail("fetch", e)
    })?;
    let mut detail = format!(
        "{} refs{}",
        fetched.remote_refs,
        if fetched.received_pack {
            ", new objects received"
        } else {
            ", nothing new"
        }
    );
    if !fetched.pruned.is_empty() {
        detail.push_str(&format!("; pruned {}", fetched.pruned.join(" ")));
    }
    events.ev("fetch", Phase::Done, &detail);
    let commit = mirror
        .resolve(git_ref)
        .map_err(|e| git_fail("resolve", e))?;
    let resolved = format!(
        "{git_ref} is {} ({}) {}",
        commit.sha,
        cutover_git::short(&commit.sha),
        commit.subject
    );
    events.shown("resolve", Phase::Done, &resolved, &resolved);
    let source = format!("{} @ {git_ref}", build.repo);

    let env: Vec<(String, String)> = build
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut environment = Environment::clean(&env, &build.pass_env);
    environment
        .vars
        .push(("CUTOVER_COMMIT".into(), commit.sha.clone()));
    // The reproducible-builds convention: tools that stamp times use the commit's.
    environment.vars.push((
        "SOURCE_DATE_EPOCH".into(),
        commit.commit_time.max(0).to_string(),
    ));
    for name in &environment.missing {
        reporter.note(&format!(
            "warning: [build] pass_env names {name}, which is not set here; the build runs without it"
        ));
    }
    let key = cache_key(&commit.sha, build, &environment);
    if build.cache {
        if let Ok(Some(sha)) = store.cached_build(&config.app, &key) {
            if let Some(artifact) = artifacts.get(&sha) {
                let m = format!(
                    "reused the artifact {} of an earlier build of {} with the same build config ([build] cache = true)",
                    &sha[..12],
                    cutover_git::short(&commit.sha)
                );
                events.shown("build", Phase::Done, &m, &m);
                return Ok(Built {
                    artifact,
                    commit,
                    source,
                });
            }
        }
    }

    // A fresh work directory for every build: nothing of an earlier tree can leak in.
    let work = data_dir.join("builds").join(format!(
        "{}-{}-{}",
        config.app,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let result = build_in(
        &work,
        &mirror,
        build,
        artifacts,
        config,
        &commit,
        &environment,
        events,
    );
    let _ = std::fs::remove_dir_all(&work);
    let artifact = result?;
    if build.cache {
        let _ = store.record_build(&config.app, &key, &commit.sha, &artifact.sha256, &now_utc());
    }
    Ok(Built {
        artifact,
        commit,
        source,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_in(
    work: &Path,
    mirror: &Mirror,
    build: &BuildConfig,
    artifacts: &ArtifactStore,
    config: &Config,
    commit: &CommitInfo,
    env: &Environment,
    events: &Events<'_>,
) -> Result<StoredArtifact, Failure> {
    let reporter = events.reporter;
    let fail = |step: &str, m: String| {
        events.ev(step, Phase::Failed, &m);
        Failure::Failed(m)
    };
    std::fs::create_dir_all(work)
        .map_err(|e| fail("export", format!("cannot create {}: {e}", work.display())))?;
    let src = work.join("src");
    events.ev("export", Phase::Start, &commit.sha);
    let exported = mirror
        .export(&commit.sha, &src)
        .map_err(|e| fail("export", e.to_string()))?;
    events.ev(
        "export",
        Phase::Done,
        &format!("{} files, {} bytes", exported.files, exported.bytes),
    );
    for s in &exported.submodules {
        reporter.note(&format!(
            "warning: submodule {s} is left empty (submodules are not fetched)"
        ));
    }

    if let Some(command) = &build.command {
        events.shown(
            "build",
            Phase::Start,
            command,
            &format!("building {}: {command}", cutover_git::short(&commit.sha)),
        );
        let mut recorded = 0u64;
        let r = cutover_git::build::run(command, &src, &env.vars, build.timeout, &mut |line| {
            reporter.note(&format!("  | {line}"));
            recorded += 1;
            if recorded <= MAX_RECORDED_LINES {
                events.raw("build", "output", line);
            } else if recorded == MAX_RECORDED_LINES + 1 {
                events.raw(
                    "build",
                    "output",
                    "(more output was shown but not recorded)",
                );
            }
        });
        match r {
            Ok(s) => events.ev(
                "build",
                Phase::Done,
                &format!(
                    "{:.1}s, {} lines of output",
                    s.elapsed.as_secs_f64(),
                    s.lines
                ),
            ),
            Err(e) => {
                let m = match &e {
                    BuildError::TimedOut { .. } => format!(
                        "build of {} timed out ([build] timeout): {e}",
                        cutover_git::short(&commit.sha)
                    ),
                    _ => format!("build of {} failed: {e}", cutover_git::short(&commit.sha)),
                };
                return Err(fail("build", m));
            }
        }
    }

    // The output directory must be a real directory inside the checkout.
    let out = src.join(&build.output);
    let inside = match (std::fs::canonicalize(&out), std::fs::canonicalize(&src)) {
        (Ok(o), Ok(s)) => o.starts_with(&s) && o.is_dir(),
        _ => false,
    };
    if !inside {
        return Err(fail(
            "import",
            format!(
                "the build did not produce the directory `{}` ([build] output) inside the checkout",
                build.output
            ),
        ));
    }
    let limits = Limits {
        max_unpacked_bytes: config.files.max_unpacked_bytes,
        max_entries: config.files.max_entries,
    };
    events.ev("import", Phase::Start, &build.output);
    let artifact = artifacts
        .import_dir(&out, &limits)
        .map_err(|e| fail("import", format!("the build output was refused: {e}")))?;
    events.ev(
        "import",
        Phase::Done,
        &format!("artifact {} ({} bytes)", artifact.sha256, artifact.size),
    );
    Ok(artifact)
}

//! `deploy --ref`: from a git revision to a stored artifact or a pushed image, before any host
//! is touched. Fetch the app's mirror, resolve the revision to a full commit, reuse the result
//! of an earlier reproducible build, or export the commit's tree into a fresh directory and
//! run the build there: files apps run `command` and import `output` into the artifact store;
//! container apps run `command` (if any), then `docker build` and `docker push` of
//! `<image>:<full sha>`, and deploy the pushed digest. Every step is an event of the deploy's
//! run; output (of the command and of docker) is recorded line by line and shown live, and
//! `[build] timeout` bounds the whole build.

use crate::artifact::{ArtifactStore, Limits, StoredArtifact};
use crate::deploy::Recorder;
use crate::now_utc;
use cutover_core::{BuildConfig, Config};
use cutover_core::{State, Step};
use cutover_git::build::{BuildError, Environment, Success};
use cutover_git::{CommitInfo, GitError, HttpsOptions, Mirror, RepoUrl};
use cutover_remote::ssh::{git_ssh_command, SshOptions};
use cutover_store::Store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Output lines recorded as events per build; the rest is shown but not kept.
const MAX_RECORDED_LINES: u64 = 20_000;

/// A build's result, ready to deploy.
pub(crate) struct Built {
    pub(crate) artifact: StoredArtifact,
    pub(crate) commit: CommitInfo,
    pub(crate) source: String,
}

/// A container build's result: the image pushed to the registry, deployed by digest.
pub(crate) struct BuiltImage {
    /// `sha256:...` of the pushed manifest: `<container.image>@<digest>` is what hosts pull.
    pub(crate) digest: String,
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
            step_timeout: Some(config.ssh.step_timeout),
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

/// Fetches on a thread of its own and gives up after `limit`: a server that stalls mid-transfer
/// must not hang the deploy. The abandoned fetch ends with the process (the deploy exits 1),
/// and the next run's fetch starts over from the mirror on disk.
fn fetch_within(
    config: &Config,
    build: &BuildConfig,
    data_dir: &Path,
) -> Result<cutover_git::FetchSummary, GitError> {
    let limit = build.timeout;
    let url = build.repo.clone();
    let (config, build, data_dir) = (config.clone(), build.clone(), data_dir.to_path_buf());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = open_mirror(&config, &build, &data_dir).and_then(|mut m| m.fetch());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(fetched) => fetched,
        Err(_) => Err(GitError::Fetch {
            url,
            message: format!(
                "the fetch did not finish within [build] timeout ({}s): the server stalled or the network is down; nothing was built and no host was touched",
                limit.as_secs()
            ),
        }),
    }
}

/// The cache key of a build: the commit and everything in the build config that can change
/// what the build produces (the values of passed-through variables included, hashed). A
/// docker build's key also holds the Dockerfile, the context and the image repository.
fn cache_key(commit: &str, b: &BuildConfig, env: &Environment, image: Option<&str>) -> String {
    let mut text = format!(
        "commit={commit}\ncommand={}\noutput={}\n",
        b.command.as_deref().unwrap_or(""),
        b.output
    );
    if let Some(d) = &b.docker {
        text.push_str(&format!(
            "dockerfile={}\ncontext={}\nimage={}\n",
            d.dockerfile,
            d.context,
            image.unwrap_or("")
        ));
    }
    for (k, v) in &env.vars {
        if b.env.contains_key(k) || b.pass_env.contains(k) {
            text.push_str(&format!("env {k}={v}\n"));
        }
    }
    crate::sha256_hex(&text)
}

/// The commit a build is of, its mirror, and the environment its command runs in.
struct Resolved {
    mirror: Mirror,
    commit: CommitInfo,
    source: String,
    environment: Environment,
}

/// Fetches the mirror and resolves `git_ref` to a full commit.
fn resolve(
    config: &Config,
    build: &BuildConfig,
    data_dir: &Path,
    git_ref: &str,
    events: &Recorder<'_>,
) -> Result<Resolved, Failure> {
    let reporter = events.reporter;
    let git_fail = |step: Step, e: GitError| {
        events.run_ev(step, State::Failed, &e.to_string());
        if e.is_bad_input() {
            Failure::Input(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    };

    events.shown(
        Step::Fetch,
        State::Start,
        &build.repo,
        &format!("fetching {}", build.repo),
    );
    let is_ssh = RepoUrl::parse(&build.repo).is_ok_and(|u| u.is_ssh());
    let fetched = fetch_within(config, build, data_dir).map_err(|e| {
        if is_ssh {
            if let GitError::Fetch { url, message } = e {
                return git_fail(
                    Step::Fetch,
                    GitError::Fetch {
                        url,
                        message: format!("{message} (ssh's own message, if any, is on stderr; host keys are checked strictly against [ssh] known_hosts or ~/.ssh/known_hosts)"),
                    },
                );
            }
        }
        git_fail(Step::Fetch, e)
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
    events.run_ev(Step::Fetch, State::Done, &detail);
    let mirror = open_mirror(config, build, data_dir).map_err(|e| git_fail(Step::Resolve, e))?;
    let commit = mirror
        .resolve(git_ref)
        .map_err(|e| git_fail(Step::Resolve, e))?;
    let resolved = format!(
        "{git_ref} is {} ({}) {}",
        commit.sha,
        cutover_git::short(&commit.sha),
        commit.subject
    );
    events.shown(Step::Resolve, State::Done, &resolved, &resolved);
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
    Ok(Resolved {
        mirror,
        commit,
        source,
        environment,
    })
}

/// A fresh work directory for every build: nothing of an earlier tree can leak in.
fn work_dir(data_dir: &Path, app: &str) -> PathBuf {
    data_dir.join("builds").join(format!(
        "{app}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ))
}

pub(crate) fn build(
    config: &Config,
    build: &BuildConfig,
    store: &Store,
    artifacts: &ArtifactStore,
    data_dir: &Path,
    git_ref: &str,
    events: &Recorder<'_>,
) -> Result<Built, Failure> {
    let cx = BuildCx {
        config,
        build,
        store,
        data_dir,
        events,
    };
    let reuse = |sha: &str, commit: &CommitInfo| {
        artifacts.get(sha).map(|a| {
            let m = format!(
                "reused the artifact {} of an earlier build of {} with the same build config ([build] cache = true)",
                &sha[..sha.len().min(12)],
                cutover_git::short(&commit.sha)
            );
            (a, m)
        })
    };
    let make = |src: &Path, _: &CommitInfo, _: Instant| {
        import_output(src, build, artifacts, config, events)
    };
    let (artifact, commit, source) = cx.run(git_ref, None, reuse, make, |a: &StoredArtifact| {
        a.sha256.clone()
    })?;
    Ok(Built {
        artifact,
        commit,
        source,
    })
}

/// `deploy --ref` of a container app: `command` (if any), `docker build` and `docker push` of
/// `<container.image>:<full sha>`, or the digest of an earlier build of the same commit and
/// build config (`cache = true`). The docker CLI runs with this process's environment
/// (`DOCKER_HOST`, `DOCKER_CONFIG`, ...): it is cutover's tool, not the app's build code.
pub(crate) fn build_image(
    config: &Config,
    build: &BuildConfig,
    store: &Store,
    data_dir: &Path,
    git_ref: &str,
    events: &Recorder<'_>,
) -> Result<BuiltImage, Failure> {
    let (Some(docker), Some(capp)) = (build.docker.as_ref(), config.container()) else {
        return Err(Failure::Input(
            "a container build needs [container] and [build] dockerfile".into(),
        ));
    };
    let image = capp.container.image.as_str();
    let cx = BuildCx {
        config,
        build,
        store,
        data_dir,
        events,
    };
    let reuse = |digest: &str, commit: &CommitInfo| {
        (parse_digest(digest).as_deref() == Some(digest)).then(|| {
            let m = format!(
                "reused the image {image}@{digest} of an earlier build of {} with the same build config ([build] cache = true)",
                cutover_git::short(&commit.sha)
            );
            (digest.to_string(), m)
        })
    };
    let make = |src: &Path, commit: &CommitInfo, deadline: Instant| {
        let tag = format!("{image}:{}", commit.sha);
        docker_build_and_push(src, docker, &tag, commit, build, deadline, events)
    };
    let (digest, commit, source) = cx.run(git_ref, Some(image), reuse, make, String::clone)?;
    Ok(BuiltImage {
        digest,
        commit,
        source,
    })
}

/// What every build from git shares: resolve the revision, reuse a cached result, or check the
/// commit out into a fresh directory, run `[build] command` there and make the product.
struct BuildCx<'a> {
    config: &'a Config,
    build: &'a BuildConfig,
    store: &'a Store,
    data_dir: &'a Path,
    events: &'a Recorder<'a>,
}

impl BuildCx<'_> {
    /// `reuse` turns a cached entry into the product and what to say; `make` builds it in
    /// the checkout; `key` is what the cache records of it.
    fn run<T>(
        &self,
        git_ref: &str,
        image: Option<&str>,
        reuse: impl FnOnce(&str, &CommitInfo) -> Option<(T, String)>,
        make: impl FnOnce(&Path, &CommitInfo, Instant) -> Result<T, Failure>,
        key: impl Fn(&T) -> String,
    ) -> Result<(T, CommitInfo, String), Failure> {
        let (config, build, events) = (self.config, self.build, self.events);
        let Resolved {
            mirror,
            commit,
            source,
            environment,
        } = resolve(config, build, self.data_dir, git_ref, events)?;
        let cache_key = cache_key(&commit.sha, build, &environment, image);
        if build.cache {
            let cached = self
                .store
                .cached_build(&config.app, &cache_key)
                .ok()
                .flatten();
            if let Some((v, m)) = cached.and_then(|c| reuse(&c, &commit)) {
                events.shown(Step::Build, State::Done, &m, &m);
                return Ok((v, commit, source));
            }
        }
        let work = work_dir(self.data_dir, &config.app);
        let deadline = Instant::now() + build.timeout;
        let result = checkout(&work, &mirror, &commit, events).and_then(|src| {
            run_command_step(build, &src, &commit, &environment, deadline, events)?;
            make(&src, &commit, deadline)
        });
        let _ = std::fs::remove_dir_all(&work);
        let v = result?;
        if build.cache {
            let r =
                self.store
                    .record_build(&config.app, &cache_key, &commit.sha, &key(&v), &now_utc());
            events.best_effort(r);
        }
        Ok((v, commit, source))
    }
}

/// Exports the commit's tree into `work/src`.
fn checkout(
    work: &Path,
    mirror: &Mirror,
    commit: &CommitInfo,
    events: &Recorder<'_>,
) -> Result<PathBuf, Failure> {
    let fail = |m: String| {
        events.run_ev(Step::Export, State::Failed, &m);
        Failure::Failed(m)
    };
    std::fs::create_dir_all(work)
        .map_err(|e| fail(format!("cannot create {}: {e}", work.display())))?;
    let src = work.join("src");
    events.run_ev(Step::Export, State::Start, &commit.sha);
    let exported = mirror
        .export(&commit.sha, &src)
        .map_err(|e| fail(e.to_string()))?;
    events.run_ev(
        Step::Export,
        State::Done,
        &format!("{} files, {} bytes", exported.files, exported.bytes),
    );
    for s in &exported.submodules {
        events.reporter.note(&format!(
            "warning: submodule {s} is left empty (submodules are not fetched)"
        ));
    }
    Ok(src)
}

/// Time left before `deadline` (zero when past it).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Runs `cmd` until `deadline`, showing every line of its output live and recording it as an
/// `output` event of `step` (up to [`MAX_RECORDED_LINES`]); `also` sees every line too.
fn streamed(
    events: &Recorder<'_>,
    step: Step,
    cmd: Command,
    deadline: Instant,
    also: &mut dyn FnMut(&str),
) -> Result<Success, BuildError> {
    let mut recorded = 0u64;
    cutover_git::build::run_command(cmd, left(deadline), &mut |line| {
        let text = format!("  | {line}");
        also(line);
        recorded += 1;
        if recorded <= MAX_RECORDED_LINES {
            events.shown(step, State::Output, line, &text);
        } else {
            events.reporter.note(&text);
            if recorded == MAX_RECORDED_LINES + 1 {
                events.shown(
                    step,
                    State::Output,
                    "(more output was shown but not recorded)",
                    "",
                );
            }
        }
    })
}

/// The event and the failure of a step that did not succeed.
fn step_failed(
    events: &Recorder<'_>,
    step: Step,
    what: &str,
    commit: &CommitInfo,
    build: &BuildConfig,
    e: BuildError,
) -> Failure {
    let m = match &e {
        BuildError::TimedOut { tail, .. } => format!(
            "{what} of {} timed out: the build ran longer than [build] timeout = {}{} and was killed, with every process it started; last output:\n{tail}",
            cutover_git::short(&commit.sha),
            cutover_core::duration::format_duration(build.timeout),
            if build.docker.is_some() {
                " (the command, docker build and docker push together)"
            } else {
                ""
            }
        ),
        _ => format!("{what} of {} failed: {e}", cutover_git::short(&commit.sha)),
    };
    events.run_ev(step, State::Failed, &m);
    Failure::Failed(m)
}

/// `[build] command` in the checkout, in the build's clean environment, if there is one.
fn run_command_step(
    build: &BuildConfig,
    src: &Path,
    commit: &CommitInfo,
    env: &Environment,
    deadline: Instant,
    events: &Recorder<'_>,
) -> Result<(), Failure> {
    let Some(command) = &build.command else {
        return Ok(());
    };
    events.shown(
        Step::Build,
        State::Start,
        command,
        &format!("building {}: {command}", cutover_git::short(&commit.sha)),
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(src)
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    match streamed(events, Step::Build, cmd, deadline, &mut |_| {}) {
        Ok(s) => {
            events.run_ev(
                Step::Build,
                State::Done,
                &format!(
                    "{:.1}s, {} lines of output",
                    s.elapsed.as_secs_f64(),
                    s.lines
                ),
            );
            Ok(())
        }
        Err(e) => Err(step_failed(events, Step::Build, "build", commit, build, e)),
    }
}

/// Imports a files build's `output` directory into the artifact store.
fn import_output(
    src: &Path,
    build: &BuildConfig,
    artifacts: &ArtifactStore,
    config: &Config,
    events: &Recorder<'_>,
) -> Result<StoredArtifact, Failure> {
    let fail = |m: String| {
        events.run_ev(Step::Import, State::Failed, &m);
        Failure::Failed(m)
    };
    // The output directory must be a real directory inside the checkout.
    let out = src.join(&build.output);
    if !inside(src, &out, true) {
        return Err(fail(format!(
            "the build did not produce the directory `{}` ([build] output) inside the checkout",
            build.output
        )));
    }
    let Some(files) = config.files() else {
        return Err(fail(
            "a container app's build makes an image, not a files artifact".into(),
        ));
    };
    let limits = Limits::of(files);
    events.run_ev(Step::Import, State::Start, &build.output);
    let artifact = artifacts
        .import_dir(&out, &limits)
        .map_err(|e| fail(format!("the build output was refused: {e}")))?;
    events.run_ev(
        Step::Import,
        State::Done,
        &format!("artifact {} ({} bytes)", artifact.sha256, artifact.size),
    );
    Ok(artifact)
}

/// `path` exists inside `root` once symlinks are followed, and is a directory (`dir`) or a file.
fn inside(root: &Path, path: &Path, dir: bool) -> bool {
    match (std::fs::canonicalize(path), std::fs::canonicalize(root)) {
        (Ok(p), Ok(r)) => p.starts_with(&r) && if dir { p.is_dir() } else { p.is_file() },
        _ => false,
    }
}

/// `sha256:<64 hex>` at the start of `text` (after `digest: ` in `docker push` output).
fn parse_digest(text: &str) -> Option<String> {
    let hex = text.strip_prefix("sha256:")?;
    let hex: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (hex.len() == 64).then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// The manifest digest `docker push` reports (`TAG: digest: sha256:... size: N`).
fn pushed_digest(line: &str) -> Option<String> {
    line.split("digest: ").nth(1).and_then(parse_digest)
}

/// `docker build` of the checkout into `tag`, then `docker push`; the pushed digest.
fn docker_build_and_push(
    src: &Path,
    docker: &cutover_core::config::DockerBuild,
    tag: &str,
    commit: &CommitInfo,
    build: &BuildConfig,
    deadline: Instant,
    events: &Recorder<'_>,
) -> Result<String, Failure> {
    let dockerfile = src.join(&docker.dockerfile);
    let context = src.join(&docker.context);
    if !inside(src, &dockerfile, false) {
        let m = format!(
            "commit {} has no Dockerfile `{}` ([build] dockerfile) inside the checkout{}",
            cutover_git::short(&commit.sha),
            docker.dockerfile,
            if build.command.is_some() {
                " after [build] command"
            } else {
                ""
            }
        );
        events.run_ev(Step::DockerBuild, State::Failed, &m);
        return Err(Failure::Failed(m));
    }
    if !inside(src, &context, true) {
        let m = format!(
            "commit {} has no directory `{}` ([build] context) inside the checkout",
            cutover_git::short(&commit.sha),
            docker.context
        );
        events.run_ev(Step::DockerBuild, State::Failed, &m);
        return Err(Failure::Failed(m));
    }
    let revision = format!("org.opencontainers.image.revision={}", commit.sha);
    let build_arg = format!("CUTOVER_COMMIT={}", commit.sha);
    let mut cmd = Command::new("docker");
    cmd.arg("build")
        .arg("-f")
        .arg(&dockerfile)
        .arg("-t")
        .arg(tag)
        .args(["--build-arg", &build_arg, "--label", &revision])
        .arg(&context)
        .current_dir(src);
    events.shown(
        Step::DockerBuild,
        State::Start,
        &format!(
            "docker build -f {} -t {tag} {}",
            docker.dockerfile, docker.context
        ),
        &format!(
            "docker build of {}: {tag} from {} (context {})",
            cutover_git::short(&commit.sha),
            docker.dockerfile,
            docker.context
        ),
    );
    match streamed(events, Step::DockerBuild, cmd, deadline, &mut |_| {}) {
        Ok(s) => events.run_ev(
            Step::DockerBuild,
            State::Done,
            &format!("{tag} in {:.1}s", s.elapsed.as_secs_f64()),
        ),
        Err(e) => {
            return Err(step_failed(
                events,
                Step::DockerBuild,
                "docker build",
                commit,
                build,
                e,
            ))
        }
    }

    events.shown(
        Step::DockerPush,
        State::Start,
        tag,
        &format!("docker push {tag}"),
    );
    let mut digest = None;
    let mut cmd = Command::new("docker");
    cmd.args(["push", tag]).current_dir(src);
    let pushed = streamed(events, Step::DockerPush, cmd, deadline, &mut |line| {
        if let Some(d) = pushed_digest(line) {
            digest = Some(d);
        }
    });
    if let Err(e) = pushed {
        return Err(step_failed(
            events,
            Step::DockerPush,
            "docker push",
            commit,
            build,
            e,
        ));
    }
    let digest = match digest {
        Some(d) => d,
        None => repo_digest(tag, deadline).ok_or_else(|| {
            let m = format!("docker push {tag} succeeded but its digest is unknown: it printed no `digest: sha256:...` and the image has no RepoDigests entry for the repository");
            events.run_ev(Step::DockerPush, State::Failed, &m);
            Failure::Failed(m)
        })?,
    };
    events.run_ev(Step::DockerPush, State::Done, &digest);
    Ok(digest)
}

/// The registry digest of `tag` from `docker image inspect` (its RepoDigests entry for the
/// tag's repository), when `docker push` did not print it.
fn repo_digest(tag: &str, deadline: Instant) -> Option<String> {
    let repo = tag.rsplit_once(':').map(|(r, _)| r)?;
    let mut cmd = Command::new("docker");
    cmd.args([
        "image",
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{println .}}{{end}}",
        tag,
    ]);
    let mut found = None;
    let prefix = format!("{repo}@");
    cutover_git::build::run_command(cmd, left(deadline).max(Duration::from_secs(10)), &mut |l| {
        if let Some(d) = l.trim().strip_prefix(&prefix).and_then(parse_digest) {
            found = Some(d);
        }
    })
    .ok()?;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_from_docker_push_output() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(
            pushed_digest(&format!("0123abc: digest: sha256:{hex} size: 528")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(pushed_digest("abc: Pushed"), None);
        assert_eq!(pushed_digest("x: digest: sha256:abc size: 1"), None);
        assert_eq!(
            parse_digest(&format!("sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(parse_digest(&format!("sha512:{hex}")), None);
    }
}

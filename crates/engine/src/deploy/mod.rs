//! The one deploy protocol, for every kind of app and for deploys and rollbacks alike:
//!
//! 1. refuse bad input (a hostile artifact, a bad image reference) before anything is touched;
//! 2. lock the app in the database (exit 4 if a live process holds it);
//! 3. build from git if asked (the build's steps are events of the run; no host is touched);
//! 4. connect every host, take every host lock, reconcile runs a crash interrupted;
//! 5. pin the release (an image tag is pulled and resolved to one digest on every host);
//! 6. stage on every host; if any host fails, undo the stages and stop: nothing switched;
//! 7. for each batch of hosts (today one batch, every host): switch, then gate;
//! 8. all healthy: commit (history, retire the old release, prune, unlock); any host
//!    unhealthy: switch every switched host back to the previous release through the same
//!    switcher, gate again, and say how it went.
//!
//! The protocol ([`protocol`]) owns that order, the locks, the events ([`Recorder`]), the
//! crash points, the verdicts and the wording ([`DeployError`]); a [`crate::switch::Switcher`]
//! owns one host's stage, switch, gate and retire.

mod error;
mod outcome;
mod protocol;
mod recorder;
#[cfg(test)]
mod tests;

pub use error::{succeeded, DeployError, FailedAt, Proxied, Via};
pub use outcome::{HostOutcome, Outcome};
pub use protocol::Recovered;
pub use recorder::Recorder;

use crate::artifact::{ArtifactStore, Limits};
use crate::build::Failure;
use crate::switch::{container::Containers, files::Files, files::Settings, Pinned, Switcher};
use crate::Reporter;
use cutover_core::config::ContainerApp;
use cutover_core::{AppKind, Config, FilesConfig, RunKind};
use cutover_store::Store;
use protocol::{Candidate, Early, Env, What};
use std::path::PathBuf;

/// What to run.
#[derive(Debug, Clone)]
pub enum RunRequest {
    /// Files apps: deploy the directory or `.tar.gz` at `artifact`.
    Deploy {
        artifact: PathBuf,
        commit: Option<String>,
    },
    /// Container apps: `deploy --image TAG` or `--image @sha256:...`.
    Image { image: String },
    /// Build the commit `git_ref` names ([build] in the config) and deploy the result: a files
    /// artifact, or an image pushed as `<image>:<full sha>` and deployed by digest. The app's
    /// git mirror and build directories live in `data_dir`.
    Build { git_ref: String, data_dir: PathBuf },
    /// Roll back to `to`, or to the newest release before the live one that succeeded
    /// everywhere and is not marked bad.
    Rollback { to: Option<String> },
    /// Deploy a release from the history again ("deploy this release" in the panel): its
    /// artifact and config as recorded, through the same path as a rollback to it, but as a
    /// deploy: the live release is not marked bad.
    Redeploy { release: String },
}

impl RunRequest {
    pub fn kind(&self) -> RunKind {
        match self {
            RunRequest::Rollback { .. } => RunKind::Rollback,
            _ => RunKind::Deploy,
        }
    }
}

/// A request and the run row it fills. The CLI passes a bare [`RunRequest`] (the run row is
/// made once the app is locked); the server makes the row first, so that it can answer with
/// the run's id before the job starts, and hands it over in `run`.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: RunRequest,
    /// A run row made beforehand ([`cutover_store::Store::start_run`]), unfinished.
    pub run: Option<i64>,
}

impl From<RunRequest> for Job {
    fn from(request: RunRequest) -> Job {
        Job { request, run: None }
    }
}

/// Runs a deploy or a rollback of any kind of app to the end and says how it went. The CLI
/// and the server call this, and only this.
pub fn run(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    job: impl Into<Job>,
) -> Outcome {
    let Job { request: req, run } = job.into();
    let env = Env {
        config,
        store,
        reporter,
        run,
    };
    let mut out = execute(config, store, artifacts, reporter, req, &env);
    // A run row made beforehand that the protocol never took (refused before it started:
    // bad input, the app locked) is ended here with the verdict, so it does not read as
    // interrupted.
    if let (Some(id), None) = (run, out.run_id) {
        out.run_id = Some(id);
        let at = crate::now_utc();
        let state = if out.exit_code == crate::exit::OK {
            cutover_core::State::Done
        } else {
            cutover_core::State::Failed
        };
        let ended = store
            .event(
                id,
                &config.app,
                "",
                None,
                cutover_core::Step::Run,
                state,
                &at,
                &out.message,
            )
            // The exit code before the outcome (see `Recorder::finish`).
            .and_then(|_| store.set_run_exit(id, out.exit_code, &out.message))
            .and_then(|()| store.finish_run(id, out.status, &at));
        if let Err(e) = ended {
            reporter.note(&format!("warning: not recorded in the history: {e}"));
        }
    }
    out
}

/// Reconciles the runs of the app that a dead process (a killed CLI or server) left
/// unfinished, without a new run: the hosts go back to the live release through the
/// protocol's own revert, and the runs and their releases are marked from their events and
/// what the hosts serve (the step every run takes first). The steps are appended to the
/// newest interrupted run, whose message starts `reconciled by <by>`. `Ok(None)`: nothing
/// was unfinished; `Err(DeployError::Locked)`: a live process holds the app.
pub fn reconcile(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    by: &str,
) -> Result<Option<Recovered>, DeployError> {
    let env = Env {
        config,
        store,
        reporter,
        run: None,
    };
    match &config.kind {
        AppKind::Files(files) => {
            let sw = Files::new(config, files, artifacts, reporter);
            protocol::recover(&sw, &env, by)
        }
        AppKind::Container(capp) => {
            let sw = Containers {
                config,
                capp,
                parallel: config.ssh.parallel,
            };
            protocol::recover(&sw, &env, by)
        }
    }
}

fn execute(
    config: &Config,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    req: RunRequest,
    env: &Env<'_>,
) -> Outcome {
    let kind = req.kind();
    match &config.kind {
        AppKind::Files(files) => {
            let sw = Files::new(config, files, artifacts, reporter);
            match files_request(config, files, store, artifacts, reporter, req) {
                Ok(early) => protocol::execute(&sw, env, kind, early),
                Err(e) => Outcome::refused(kind, &config.app, e),
            }
        }
        AppKind::Container(capp) => {
            let sw = Containers {
                config,
                capp,
                parallel: config.ssh.parallel,
            };
            match container_request(config, capp, store, req) {
                Ok(early) => protocol::execute(&sw, env, kind, early),
                Err(e) => Outcome::refused(kind, &config.app, e),
            }
        }
    }
}

fn build_failure(f: Failure) -> DeployError {
    match f {
        Failure::Input(m) => DeployError::BuildInput(m),
        Failure::Failed(m) => DeployError::BuildFailed(m),
    }
}

/// A files app's request, checked: an artifact is imported (and refused if hostile) before
/// anything else happens.
fn files_request<'b>(
    config: &'b Config,
    files: &'b FilesConfig,
    store: &'b Store,
    artifacts: &'b ArtifactStore,
    reporter: &dyn Reporter,
    req: RunRequest,
) -> Result<Early<'b, Settings>, DeployError> {
    let file = config.file.display().to_string();
    match req {
        RunRequest::Deploy { artifact, commit } => {
            let limits = Limits::of(files);
            // A directory is checked now (its tree, not its content: nothing is touched if it
            // is refused) and packed once the hosts are prepared, streamed to them as it is
            // packed (`Files::pin`).
            if let Some(dir) = artifact.to_str().filter(|_| artifact.is_dir()) {
                ArtifactStore::check_dir(&artifact, &limits)
                    .map_err(|e| DeployError::ArtifactRefused(e.to_string()))?;
                return Ok(Early::Ready(Candidate {
                    what: What::OnHosts {
                        reference: dir.to_string(),
                        source: None,
                    },
                    commit,
                    subject: None,
                }));
            }
            reporter.note(&format!("packing and checking {}", artifact.display()));
            let a = artifacts
                .import(&artifact, &limits)
                .map_err(|e| DeployError::ArtifactRefused(e.to_string()))?;
            Ok(Early::Ready(Candidate {
                what: What::New(Pinned {
                    content: a.sha256.clone(),
                    snap: Settings::from_config(config, files),
                    source: artifact.display().to_string(),
                }),
                commit,
                subject: None,
            }))
        }
        RunRequest::Build { git_ref, data_dir } => {
            let b = config.build.as_ref().ok_or(DeployError::NoBuildSection {
                file,
                container: false,
            })?;
            Ok(Early::Build(Box::new(move |rec: &Recorder<'_>| {
                let built = crate::build::build(config, b, store, artifacts, &data_dir, &git_ref, rec)
                    .map_err(build_failure)?;
                Ok(Candidate {
                    what: What::New(Pinned {
                        content: built.artifact.sha256.clone(),
                        snap: Settings::from_config(config, files),
                        source: built.source,
                    }),
                    commit: Some(built.commit.sha),
                    subject: Some(built.commit.subject),
                })
            })))
        }
        RunRequest::Image { .. } => Err(DeployError::Usage(
            "--image is for container apps ([container]); this is a files app: use --artifact or --ref".into(),
        )),
        RunRequest::Rollback { to } => Ok(Early::Ready(Candidate::rollback(to))),
        RunRequest::Redeploy { release } => Ok(Early::Ready(Candidate::rollback(Some(release)))),
    }
}

/// A container app's request, checked: an image reference is a tag or a digest of the
/// configured image, nothing else.
fn container_request<'b>(
    config: &'b Config,
    capp: &'b ContainerApp,
    store: &'b Store,
    req: RunRequest,
) -> Result<Early<'b, <Containers<'b> as Switcher>::Snap>, DeployError> {
    match req {
        RunRequest::Image { image } => {
            let ok = !image.is_empty()
                && !image.starts_with('-')
                && !image.contains('/')
                && image
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:@".contains(c));
            if !ok {
                return Err(DeployError::BadImage {
                    given: image,
                    image: capp.container.image.clone(),
                });
            }
            Ok(Early::Ready(Candidate {
                what: What::OnHosts {
                    reference: image,
                    source: None,
                },
                commit: None,
                subject: None,
            }))
        }
        RunRequest::Build { git_ref, data_dir } => {
            let b = config.build.as_ref().filter(|b| b.docker.is_some()).ok_or(
                DeployError::NoBuildSection {
                    file: config.file.display().to_string(),
                    container: true,
                },
            )?;
            Ok(Early::Build(Box::new(move |rec: &Recorder<'_>| {
                let built = crate::build::build_image(config, b, store, &data_dir, &git_ref, rec)
                    .map_err(build_failure)?;
                Ok(Candidate {
                    what: What::OnHosts {
                        reference: format!("@{}", built.digest),
                        source: Some(built.source),
                    },
                    commit: Some(built.commit.sha),
                    subject: Some(built.commit.subject),
                })
            })))
        }
        RunRequest::Deploy { .. } => Err(DeployError::Usage(
            "not a container app: use --artifact for [files] apps".into(),
        )),
        RunRequest::Rollback { to } => Ok(Early::Ready(Candidate::rollback(to))),
        RunRequest::Redeploy { release } => Ok(Early::Ready(Candidate::rollback(Some(release)))),
    }
}

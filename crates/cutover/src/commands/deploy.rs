//! `cutover deploy` and `cutover rollback`: both run the one protocol in the engine.

use super::{load_config, open_store};
use crate::cli::Common;
use crate::output::{human_bytes, Mode, Progress};
use cutover_core::Config;
use cutover_engine::artifact::ArtifactStore;
use cutover_engine::{exit, Outcome, RunRequest};
use std::path::PathBuf;

pub(crate) fn deploy(
    common: &Common,
    artifact: Option<PathBuf>,
    git_ref: Option<String>,
    image: Option<String>,
    mode: Mode,
) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match request(common, &config, artifact, git_ref, image, mode) {
        Ok(req) => run(common, &config, req, mode),
        Err(message) => {
            eprintln!("error: {message}");
            exit::USAGE
        }
    }
}

/// The flags, turned into one request for the engine (or the usage error).
fn request(
    common: &Common,
    config: &Config,
    artifact: Option<PathBuf>,
    git_ref: Option<String>,
    image: Option<String>,
    mode: Mode,
) -> Result<RunRequest, String> {
    let file = config.file.display();
    let container = config.container.is_some();
    let build = |git_ref| RunRequest::Build {
        git_ref,
        data_dir: super::data_dir(common),
    };
    let head = |what: &str| {
        if mode == Mode::Human {
            eprintln!(
                "no --ref or {what} given: building HEAD, the default branch of [build] repo"
            );
        }
        "HEAD".to_string()
    };
    match (container, artifact, image, git_ref) {
        (true, Some(_), _, _) => Err("--artifact is for files apps; a container app deploys an image: pass --image TAG, --image @sha256:DIGEST or --ref REF".into()),
        (false, _, Some(_), _) => Err("--image is for container apps ([container]); this is a files app: use --artifact or --ref".into()),
        (_, _, _, Some(_)) if config.build.is_none() => Err(if container {
            format!("--ref builds an image from git and needs a [build] section (repo, dockerfile) in {file}")
        } else {
            format!("--ref builds from git and needs a [build] section (repo, command, output) in {file}")
        }),
        (_, _, _, Some(r)) => Ok(build(r)),
        (true, None, Some(image), None) => Ok(RunRequest::Image { image }),
        (true, None, None, None) if config.build.is_some() => Ok(build(head("--image"))),
        (true, None, None, None) => Err("a container app deploys an image version: pass --image TAG or --image @sha256:DIGEST (or --ref REF with a [build] section)".into()),
        (false, artifact, None, None) => match artifact.or_else(|| config.files.source.clone()) {
            Some(artifact) => Ok(RunRequest::Deploy { artifact, commit: None }),
            // Nothing else named: the repository's default branch, as a clone would check out.
            None if config.build.is_some() => Ok(build(head("--artifact"))),
            None => Err(format!("nothing to deploy: pass --artifact PATH, --ref REF with a [build] section, or set [files] source in {file}")),
        },
    }
}

pub(crate) fn rollback(common: &Common, to: Option<String>, mode: Mode) -> i32 {
    match load_config(&common.config) {
        Ok(config) => run(common, &config, RunRequest::Rollback { to }, mode),
        Err(code) => code,
    }
}

fn run(common: &Common, config: &Config, req: RunRequest, mode: Mode) -> i32 {
    let (store, dir) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let artifacts = ArtifactStore::new(dir.join("artifacts"));
    let progress = Progress::new(mode);
    let outcome = cutover_engine::run(config, &store, &artifacts, &progress, req);
    progress.finish();
    report(&outcome, mode);
    outcome.exit_code
}

pub(crate) fn report(o: &Outcome, mode: Mode) {
    match mode {
        Mode::Json => return super::print_json(o),
        Mode::Events => return crate::output::print_outcome_line(o),
        Mode::Human => {}
    }
    for (host, h) in &o.hosts {
        let Some(state) = h.outcome else {
            continue;
        };
        let up = if h.uploaded_bytes > 0 {
            format!(" ({} uploaded)", human_bytes(h.uploaded_bytes))
        } else {
            String::new()
        };
        eprintln!("  {host}: {state}{up}");
    }
    if let Some(c) = &o.commit {
        eprintln!(
            "  commit {} {}",
            &c[..c.len().min(7)],
            o.commit_subject.as_deref().unwrap_or("")
        );
    }
    if o.exit_code == exit::OK {
        eprintln!("{}", o.message);
    } else {
        eprintln!("error: {}", o.message);
    }
}

//! `cutover deploy` and `cutover rollback`: both run the same protocol in the engine.

use super::{load_config, open_store, print_json};
use crate::cli::Common;
use crate::output::{human_bytes, Progress};
use cutover_engine::artifact::ArtifactStore;
use cutover_engine::container::ContainerRequest;
use cutover_engine::{exit, Outcome, RunRequest};
use std::path::PathBuf;

pub(crate) fn deploy(
    common: &Common,
    artifact: Option<PathBuf>,
    git_ref: Option<String>,
    image: Option<String>,
    json: bool,
) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.container.is_some() {
        if artifact.is_some() {
            eprintln!("error: --artifact is for files apps; a container app deploys an image: pass --image TAG, --image @sha256:DIGEST or --ref REF");
            return exit::USAGE;
        }
        if let Some(image) = image {
            return run_container(common, &config, ContainerRequest::Deploy { image }, json);
        }
        let git_ref = match (git_ref, &config.build) {
            (Some(r), Some(_)) => r,
            (Some(_), None) => {
                eprintln!(
                    "error: --ref builds an image from git and needs a [build] section (repo, dockerfile) in {}",
                    config.file.display()
                );
                return exit::USAGE;
            }
            (None, Some(_)) => {
                if !json {
                    eprintln!("no --ref or --image given: building HEAD, the default branch of [build] repo");
                }
                "HEAD".into()
            }
            (None, None) => {
                eprintln!("error: a container app deploys an image version: pass --image TAG or --image @sha256:DIGEST (or --ref REF with a [build] section)");
                return exit::USAGE;
            }
        };
        let data_dir = super::data_dir(common);
        return run_container(
            common,
            &config,
            ContainerRequest::Build { git_ref, data_dir },
            json,
        );
    }
    if image.is_some() {
        eprintln!("error: --image is for container apps ([container]); this is a files app: use --artifact or --ref");
        return exit::USAGE;
    }
    if let Some(git_ref) = git_ref {
        return build_and_deploy(common, &config, git_ref, json);
    }
    let Some(artifact) = artifact.or_else(|| config.files.source.clone()) else {
        if config.build.is_some() {
            // Nothing else named: the repository's default branch, as a clone would check out.
            if !json {
                eprintln!("no --ref or --artifact given: building HEAD, the default branch of [build] repo");
            }
            return build_and_deploy(common, &config, "HEAD".into(), json);
        }
        eprintln!(
            "error: nothing to deploy: pass --artifact PATH, --ref REF with a [build] section, or set [files] source in {}",
            config.file.display()
        );
        return exit::USAGE;
    };
    run(
        common,
        &config,
        RunRequest::Deploy {
            artifact,
            commit: None,
        },
        json,
    )
}

fn build_and_deploy(
    common: &Common,
    config: &cutover_core::Config,
    git_ref: String,
    json: bool,
) -> i32 {
    if config.build.is_none() {
        eprintln!(
            "error: --ref builds from git and needs a [build] section (repo, command, output) in {}",
            config.file.display()
        );
        return exit::USAGE;
    }
    let data_dir = super::data_dir(common);
    run(
        common,
        config,
        RunRequest::Build { git_ref, data_dir },
        json,
    )
}

pub(crate) fn rollback(common: &Common, to: Option<String>, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.container.is_some() {
        return run_container(common, &config, ContainerRequest::Rollback { to }, json);
    }
    run(common, &config, RunRequest::Rollback { to }, json)
}

fn run_container(
    common: &Common,
    config: &cutover_core::Config,
    req: ContainerRequest,
    json: bool,
) -> i32 {
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let progress = Progress::new(json);
    let outcome = cutover_engine::container::run(config, &store, &progress, req);
    progress.finish();
    report(&outcome, json);
    outcome.exit_code
}

fn run(common: &Common, config: &cutover_core::Config, req: RunRequest, json: bool) -> i32 {
    let (store, dir) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let artifacts = ArtifactStore::new(dir.join("artifacts"));
    let progress = Progress::new(json);
    let outcome = cutover_engine::run(config, &store, &artifacts, &progress, req);
    progress.finish();
    report(&outcome, json);
    outcome.exit_code
}

pub(crate) fn report(o: &Outcome, json: bool) {
    if json {
        print_json(o);
        return;
    }
    for (host, h) in &o.hosts {
        if h.outcome.is_empty() {
            continue;
        }
        let up = if h.uploaded_bytes > 0 {
            format!(" ({} uploaded)", human_bytes(h.uploaded_bytes))
        } else {
            String::new()
        };
        eprintln!("  {host}: {}{up}", h.outcome);
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

//! `cutover preview deploy | list | remove`: pull request previews without a forge. The
//! engine derives the preview's config and runs the one protocol; the webhooks of
//! `cutover serve` call the same functions.

use super::{data_dir, load_config, open_store, print_json};
use crate::cli::{Common, PreviewCommand};
use crate::output::{table, Mode, Progress};
use cutover_engine::artifact::ArtifactStore;
use cutover_engine::{exit, RunRequest};

pub(crate) fn run(common: &Common, command: PreviewCommand) -> i32 {
    let through = match &command {
        PreviewCommand::Deploy { through, .. }
        | PreviewCommand::List { through, .. }
        | PreviewCommand::Remove { through, .. } => through.clone(),
    };
    if through.server.is_some() {
        use super::remote;
        return match command {
            PreviewCommand::Deploy {
                pr,
                git_ref,
                image,
                json,
                events,
                ..
            } => {
                remote::preview_deploy(common, &through, pr, git_ref, image, Mode::of(json, events))
            }
            PreviewCommand::List { all, json, .. } => {
                remote::preview_list(common, &through, all, json)
            }
            PreviewCommand::Remove { pr, json, .. } => {
                remote::preview_remove(common, &through, pr, json)
            }
        };
    }
    match command {
        PreviewCommand::Deploy {
            pr,
            git_ref,
            image,
            json,
            events,
            ..
        } => deploy(common, pr, git_ref, image, Mode::of(json, events)),
        PreviewCommand::List { all, json, .. } => list(common, all, json),
        PreviewCommand::Remove { pr, json, .. } => remove(common, pr, json),
    }
}

fn deploy(
    common: &Common,
    pr: u64,
    git_ref: Option<String>,
    image: Option<String>,
    mode: Mode,
) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let file = config.file.display();
    let (req, head) = match (image, git_ref) {
        (Some(_), _) if config.container().is_none() => {
            eprintln!("error: --image is for container apps ([container]); this is a files app: use --ref");
            return exit::USAGE;
        }
        (Some(image), _) => (
            RunRequest::Image {
                image: image.clone(),
            },
            image,
        ),
        (None, Some(_)) if config.build.is_none() => {
            eprintln!("error: --ref builds from git and needs a [build] section in {file}");
            return exit::USAGE;
        }
        (None, Some(r)) => (
            RunRequest::Build {
                git_ref: r.clone(),
                data_dir: data_dir(common),
            },
            r,
        ),
        (None, None) => {
            eprintln!("error: what to deploy as the preview: pass --ref REF (the pull request's head) or --image TAG");
            return exit::USAGE;
        }
    };
    let (store, dir) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let artifacts = ArtifactStore::new(dir.join("artifacts"));
    let progress = Progress::new(mode);
    let outcome =
        cutover_engine::preview::deploy(&config, pr, &head, &store, &artifacts, &progress, req);
    progress.finish();
    super::deploy::report(&outcome, mode);
    if mode == Mode::Human && outcome.exit_code == exit::OK {
        if let Some(url) = config.preview_url(pr) {
            eprintln!("preview of #{pr}: {url}");
        }
    }
    outcome.exit_code
}

fn list(common: &Common, all: bool, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rows = match store.previews(&config.app, all) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    print_rows(&config.app, rows, json);
    exit::OK
}

/// Previews as JSON or a table (the same for a local list and a server's answer).
pub(crate) fn print_rows(app: &str, rows: Vec<serde_json::Value>, json: bool) {
    if json {
        print_json(&rows);
        return;
    }
    if rows.is_empty() {
        println!("no open previews of app `{app}`");
        return;
    }
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|p| {
            let head = match p["head_sha"].as_str() {
                Some(sha) => sha.chars().take(7).collect(),
                None => s(p, "head_ref"),
            };
            vec![
                format!("#{}", p["pr"]),
                s(p, "state"),
                s(p, "url"),
                head,
                s(p, "updated_at"),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["PR", "STATE", "URL", "HEAD", "UPDATED"], &cells)
    );
}

fn remove(common: &Common, pr: u64, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let who = format!("removed by {} (cutover preview remove)", whoami());
    let hosts = match cutover_engine::preview::remove(&config, pr, &who, &store) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILED;
        }
    };
    let hosts: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| {
            serde_json::json!({
                "host": h.host,
                "containers": h.containers,
                "error": h.result.as_ref().err(),
            })
        })
        .collect();
    print_removal(
        &config.app,
        pr,
        &serde_json::json!({ "hosts": hosts }),
        json,
    )
}

/// What a removal did (`answer["hosts"]`: host, containers, error), in words or JSON; the
/// exit code.
pub(crate) fn print_removal(app: &str, pr: u64, answer: &serde_json::Value, json: bool) -> i32 {
    let name = cutover_core::preview::preview_app(app, pr);
    let hosts = answer["hosts"].as_array().cloned().unwrap_or_default();
    let failed: Vec<String> = hosts
        .iter()
        .filter_map(|h| {
            h["error"]
                .as_str()
                .map(|e| format!("{}: {e}", h["host"].as_str().unwrap_or("")))
        })
        .collect();
    let containers: usize = hosts
        .iter()
        .map(|h| h["containers"].as_array().map_or(0, Vec::len))
        .sum();
    let message = if failed.is_empty() {
        // A files preview has no containers: its directory holds its releases.
        let what = match containers {
            0 => "its proxy route and its directory".to_string(),
            n => format!("its proxy route, {n} container(s) and its directory"),
        };
        format!(
            "removed the preview of #{pr} ({name}) from {} host(s): {what}; its history is kept",
            hosts.len()
        )
    } else {
        format!(
            "the preview of #{pr} ({name}) is not fully removed: {}; run `cutover preview remove --pr {pr}` again",
            failed.join("; ")
        )
    };
    let code = if failed.is_empty() {
        exit::OK
    } else {
        exit::FAILED
    };
    if json {
        print_json(&serde_json::json!({
            "app": app,
            "preview": name,
            "pr": pr,
            "exit_code": code,
            "message": message,
            "hosts": hosts,
        }));
    } else if code == exit::OK {
        eprintln!("{message}");
    } else {
        eprintln!("error: {message}");
    }
    code
}

fn whoami() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

//! `cutover serve`: loads the apps (`--apps DIR`, default `<data>/apps`, plus each `-c FILE`),
//! opens the history, and serves the panel and the API until Ctrl-C or SIGTERM.

use super::{data_dir, load_config};
use crate::cli::{Common, ServeArgs};
use cutover_engine::exit;
use std::path::PathBuf;

pub(crate) fn run(args: ServeArgs) -> i32 {
    let common = Common {
        config: PathBuf::from("cutover.toml"),
        data: args.data.clone(),
        database: args.database.clone(),
    };
    let data = data_dir(&common);
    let dir = args.apps.clone().unwrap_or_else(|| data.join("apps"));
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.apps.is_none() => Vec::new(),
        Err(e) => {
            eprintln!(
                "error: cannot read the apps directory {}: {e}",
                dir.display()
            );
            return exit::USAGE;
        }
    };
    files.sort();
    files.extend(args.configs.iter().cloned());
    let mut apps = Vec::new();
    for f in &files {
        match load_config(f) {
            Ok(c) => apps.push(c),
            Err(code) => return code,
        }
    }
    if let Some(u) = &args.public_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            eprintln!("error: --public-url {u}: expected an http:// or https:// URL");
            return exit::USAGE;
        }
    }
    let names: Vec<String> = apps.iter().map(|a| a.app.clone()).collect();
    let state = match cutover_server::AppState::new(cutover_server::Options {
        data,
        database: args.database.clone(),
        apps,
        public_url: args.public_url.clone(),
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let every = match cutover_core::parse_duration(&args.preview_check) {
        Ok(d) if d >= std::time::Duration::from_secs(1) => d,
        _ => {
            eprintln!(
                "error: --preview-check {}: expected a duration of at least 1s, e.g. \"60s\"",
                args.preview_check
            );
            return exit::USAGE;
        }
    };
    if state.apps.values().any(|a| a.preview.is_some()) {
        cutover_server::previews::start(state.clone(), every);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the server's runtime: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", args.listen);
                return exit::USAGE;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(args.listen.clone());
        eprintln!(
            "cutover serve: listening on http://{addr} (apps: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
        match cutover_server::serve(listener, state, stopped()).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: the server stopped: {e}");
                exit::NEEDS_PERSON
            }
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM (`serve` and the demo's panel stop on either).
pub(crate) async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

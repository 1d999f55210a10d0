//! `cutover status`: what every host serves, read from the hosts; exit 3 on drift.

use super::{load_config, open_store, print_json};
use crate::cli::Common;
use crate::output::table;
use cutover_engine::exit;

pub(crate) fn run(common: &Common, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let status = match cutover_engine::inspect::status(&config, &store) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    let code = if status.drift.is_empty() {
        exit::OK
    } else {
        exit::NEEDS_PERSON
    };
    if json {
        print_json(&status);
        return code;
    }
    let rows: Vec<Vec<String>> = status
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                if h.reachable {
                    "yes".into()
                } else {
                    "no".into()
                },
                h.release.clone().unwrap_or_else(|| "-".into()),
                super::history::commit_cell(h.commit.as_deref(), h.commit_subject.as_deref()),
                h.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["HOST", "REACHABLE", "RELEASE", "COMMIT", "ERROR"], &rows)
    );
    println!(
        "live (history): {}{}",
        status.live.as_deref().unwrap_or("none"),
        match &status.live_commit {
            Some(_) => format!(
                " ({})",
                super::history::commit_cell(
                    status.live_commit.as_deref(),
                    status.live_commit_subject.as_deref()
                )
            ),
            None => String::new(),
        }
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for h in &status.hosts {
        for line in super::proxy::certificate_lines(&h.certificates, now) {
            println!("{}: {line}", h.host);
        }
        if let Some(b) = &h.bake {
            println!("{}: {}", h.host, b.summary());
        }
    }
    for d in &status.drift {
        println!("drift: {d}");
    }
    code
}

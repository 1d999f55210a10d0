//! `cutover history`: releases, newest first.

use super::{load_config, open_store, print_json};
use crate::cli::Common;
use crate::output::table;
use cutover_engine::exit;
use cutover_store::HistoryRow;

pub(crate) fn run(common: &crate::cli::Common, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    print(common, &config.app, json)
}

pub(crate) fn print(common: &Common, app: &str, json: bool) -> i32 {
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (releases, live) = match (store.releases(app), store.live(app)) {
        (Ok(r), Ok(l)) => (r, l),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    let rows: Vec<HistoryRow> = releases
        .into_iter()
        .map(|r| HistoryRow::new(r, live.as_deref()))
        .collect();
    if json {
        print_json(&rows);
        return exit::OK;
    }
    if rows.is_empty() {
        println!("no releases of app `{app}` yet");
        return exit::OK;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let healthy = r.hosts.values().filter(|o| *o == "healthy").count();
            vec![
                r.id.clone(),
                r.status.clone(),
                if r.live { "live".into() } else { String::new() },
                if r.bad { "bad".into() } else { String::new() },
                r.created_at.clone(),
                format!("{healthy}/{} healthy", r.hosts.len()),
                r.artifact_sha256.chars().take(12).collect(),
                commit_cell(r.commit.as_deref(), r.commit_subject.as_deref()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["RELEASE", "STATUS", "LIVE", "BAD", "CREATED", "HOSTS", "ARTIFACT", "COMMIT"],
            &cells
        )
    );
    exit::OK
}

/// `3f9a2c1 Fix the login form` (short SHA for display, subject cut at 50 characters), or
/// empty for releases deployed from an artifact.
pub(crate) fn commit_cell(commit: Option<&str>, subject: Option<&str>) -> String {
    let Some(c) = commit else {
        return String::new();
    };
    let short: String = c.chars().take(7).collect();
    let subject = subject.unwrap_or("");
    let cut: String = subject.chars().take(50).collect();
    let ell = if cut.len() < subject.len() { "…" } else { "" };
    format!("{short} {cut}{ell}").trim_end().to_string()
}

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
    let bakes = bake_verdicts(&store, app, &rows);
    if json {
        // Each row, plus `bake`: each host's bake verdict with its numbers (when it baked).
        let out: Vec<serde_json::Value> = rows
            .iter()
            .zip(&bakes)
            .map(|(r, b)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if !b.is_empty() {
                    v["bake"] = serde_json::json!(b);
                }
                v
            })
            .collect();
        print_json(&out);
        return exit::OK;
    }
    if rows.is_empty() {
        println!("no releases of app `{app}` yet");
        return exit::OK;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .zip(&bakes)
        .map(|(r, b)| {
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
                bake_cell(b),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "RELEASE", "STATUS", "LIVE", "BAD", "CREATED", "HOSTS", "ARTIFACT", "COMMIT",
                "BAKE"
            ],
            &cells
        )
    );
    exit::OK
}

/// One bake verdict of one host: `passed`/`failed` and the detail with its numbers.
#[derive(serde::Serialize)]
struct Baked {
    host: String,
    verdict: &'static str,
    detail: String,
}

/// The bake verdicts of each row's newest run (empty when it did not bake), from its events.
fn bake_verdicts(store: &cutover_store::Store, app: &str, rows: &[HistoryRow]) -> Vec<Vec<Baked>> {
    let runs = store.run_rows(Some(app), 10_000).unwrap_or_default();
    rows.iter()
        .map(|r| {
            let Some(run) = runs.iter().find(|run| run.release == r.id) else {
                return Vec::new();
            };
            store
                .events(run.id)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.step == "bake" && e.host.is_some())
                .filter_map(|e| {
                    let verdict = match e.phase.as_str() {
                        "done" => "passed",
                        "failed" => "failed",
                        _ => return None,
                    };
                    Some(Baked {
                        host: e.host.unwrap_or_default(),
                        verdict,
                        detail: e.detail,
                    })
                })
                .collect()
        })
        .collect()
}

/// `passed 2/2`, `failed 1/2`, or empty.
fn bake_cell(b: &[Baked]) -> String {
    if b.is_empty() {
        return String::new();
    }
    let failed = b.iter().filter(|x| x.verdict == "failed").count();
    if failed > 0 {
        format!("failed {failed}/{}", b.len())
    } else {
        format!("passed {}/{}", b.len(), b.len())
    }
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

//! `cutover diff [FROM] [TO]`: the commits and files that changed between two releases,
//! resolved from the full commit ids stored with them.

use super::{data_dir, load_config, open_store, print_json};
use crate::cli::Common;
use cutover_engine::changes::{self, CommitRow, DiffError};
use cutover_engine::exit;

pub(crate) fn run(common: &Common, from: Option<String>, to: Option<String>, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (store, _) = match open_store(common) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let d = match changes::diff(
        &config,
        &store,
        &data_dir(common),
        from.as_deref(),
        to.as_deref(),
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                DiffError::Usage(_) => exit::USAGE,
                DiffError::Failed(_) => exit::FAILED,
            };
        }
    };
    if json {
        print_json(&d);
        return exit::OK;
    }
    println!(
        "{} ({} {})\n  -> {} ({} {})",
        d.from.release, d.from.short, d.from.subject, d.to.release, d.to.short, d.to.subject
    );
    let list = |title: &str, rows: &[CommitRow]| {
        if rows.is_empty() {
            return;
        }
        println!("\n{title} ({}):", rows.len());
        for c in rows {
            println!("  {} {}  ({}, {})", c.short, c.subject, c.author, c.date);
        }
    };
    if d.commits.is_empty() && d.reverted.is_empty() {
        println!("\nno commits between them: both releases are the same commit");
    }
    list("commits", &d.commits);
    list("commits going away (in FROM, not in TO)", &d.reverted);
    if d.truncated {
        println!("  (lists cut at 1000 commits)");
    }
    if !d.files.is_empty() {
        println!("\nfiles ({}):", d.files.len());
        for f in &d.files {
            let mark = match f.change.as_str() {
                "added" => "A",
                "deleted" => "D",
                _ => "M",
            };
            println!("  {mark} {}", f.path);
        }
    }
    exit::OK
}

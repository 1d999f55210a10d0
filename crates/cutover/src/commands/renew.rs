//! `cutover renew`: new ACME certificates now for a container app's domain on every host.

use super::{load_config, print_json};
use crate::cli::Common;
use crate::output::table;
use cutover_engine::exit;

pub(crate) fn run(common: &Common, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = cutover_engine::renew::renewable(&config) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    if !json {
        eprintln!(
            "asking every host's proxy for new certificates (up to {} s)...",
            cutover_engine::renew::WAIT.as_secs()
        );
    }
    let rows = match cutover_engine::renew::renew(&config, cutover_engine::renew::WAIT) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let code = if rows.iter().all(|r| r.outcome == "renewed") {
        exit::OK
    } else {
        exit::FAILED
    };
    if json {
        print_json(&rows);
        return code;
    }
    let now = super::proxy::now_ms();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let expires = r
                .not_after_ms
                .map_or_else(|| "-".to_string(), |t| super::proxy::relative(t, now));
            vec![
                r.host.clone(),
                r.domain.clone(),
                if r.outcome == "renewed" {
                    r.outcome.to_string()
                } else {
                    r.outcome.to_ascii_uppercase()
                },
                expires,
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["HOST", "DOMAIN", "OUTCOME", "EXPIRES", "ERROR"], &cells)
    );
    code
}

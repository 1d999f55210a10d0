//! `cutover setup`: install or upgrade the edge proxy on every host of a container app.

use super::{load_config, print_json};
use crate::cli::Common;
use crate::output::table;
use cutover_engine::exit;

pub(crate) fn run(common: &Common, json: bool) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let hosts = match cutover_engine::setup::setup(&config) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let code = if hosts.iter().all(|h| h.ok) {
        exit::OK
    } else {
        exit::FAILED
    };
    if json {
        print_json(&hosts);
        return code;
    }
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                if h.ok { "ok".into() } else { "FAILED".into() },
                h.binary.clone(),
                h.service.clone(),
                h.detail.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["HOST", "SETUP", "BINARY", "PROXY", "DETAIL"], &rows)
    );
    code
}

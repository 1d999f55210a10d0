//! `cutover check`: the config is valid (else exit 2), and every host is reachable, its host
//! key known, `tar` present, the root writable and the lock free (else exit 1).

use super::load_config;
use crate::cli::Common;
use crate::output::table;
use cutover_engine::exit;

pub(crate) fn run(common: &Common) -> i32 {
    let config = match load_config(&common.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "config {}: ok (app `{}`, {} host(s))",
        config.file.display(),
        config.app,
        config.hosts.len()
    );
    let checks = match cutover_engine::inspect::check(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILED;
        }
    };
    let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                c.host.clone(),
                yn(c.reachable),
                yn(c.host_key_known),
                yn(c.tar),
                yn(c.root_writable),
                yn(c.lock_free),
                c.current.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "HOST",
                "REACHABLE",
                "HOST KEY",
                "TAR",
                "ROOT WRITABLE",
                "LOCK FREE",
                "CURRENT"
            ],
            &rows
        )
    );
    let mut ok = true;
    for c in &checks {
        for p in &c.problems {
            ok = false;
            println!("problem: {p}");
        }
    }
    if ok {
        exit::OK
    } else {
        exit::FAILED
    }
}

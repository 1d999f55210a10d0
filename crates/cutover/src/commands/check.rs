//! `cutover check`: the config is valid (else exit 2), and every host is reachable, its host
//! key known, `tar` present, the root writable and the lock free, and the `[build]`
//! repository fetchable (else exit 1).

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
    if let Some(build) = &config.build {
        // Fetching is the check: it proves the URL, the transport and (for ssh://) the host
        // key and the identity, and leaves the mirror up to date for the next deploy.
        let fetched = cutover_engine::build::open_mirror(&config, build, &super::data_dir(common))
            .and_then(|mut m| m.fetch());
        match fetched {
            Ok(f) => println!("build repo {}: ok ({} refs)", build.repo, f.remote_refs),
            Err(e) => {
                ok = false;
                println!("problem: build repo: {e}");
            }
        }
    }
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

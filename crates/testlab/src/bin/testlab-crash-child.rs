//! A process for the stale-lab reaper tests: starts a lab (`plain`: one host; `docker`: one
//! docker host on the vfs driver with a running container), prints `LAB <number> <dir>
//! [<container pid>]` and waits to be SIGKILLed, so that its lab is left behind for
//! `testlab::reap_stale_labs` to clean up.

use std::time::Duration;
use testlab::{Lab, LabOptions};

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("plain") => {
            let lab = Lab::start(1);
            println!("LAB {} {}", lab.number(), lab.dir().display());
            std::thread::sleep(Duration::from_secs(120));
        }
        Some("docker") => {
            // Also covers the vfs storage driver (the fallback when overlay2 fails).
            let lab = Lab::start_with(LabOptions {
                hosts: 1,
                docker: true,
                docker_storage_driver: Some("vfs".into()),
                ..LabOptions::default()
            });
            let driver = ok(&lab.docker(0, &["info", "--format", "{{.Driver}}"]), "info");
            assert_eq!(driver, "vfs");
            let web = lab.build_web_image("web:v1", "x", true);
            ok(&lab.docker(0, &["run", "-d", "--name", "web", &web]), "run");
            let pid = ok(
                &lab.docker(0, &["inspect", "-f", "{{.State.Pid}}", "web"]),
                "pid",
            );
            println!("LAB {} {} {}", lab.number(), lab.dir().display(), pid);
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => {
            eprintln!("usage: testlab-crash-child plain|docker");
            std::process::exit(2);
        }
    }
}

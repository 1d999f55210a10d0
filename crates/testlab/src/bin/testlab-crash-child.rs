//! A process for the stale-lab reaper tests: starts a lab (`plain [hosts] [seconds]`: one host
//! by default; `docker`: one
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
            // Optional: how many hosts and how long to wait (for measuring by hand).
            let arg = |i: usize, d: u64| {
                std::env::args()
                    .nth(i)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(d)
            };
            let lab = Lab::start(arg(2, 1) as usize);
            println!("LAB {} {}", lab.number(), lab.dir().display());
            std::thread::sleep(Duration::from_secs(arg(3, 120)));
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

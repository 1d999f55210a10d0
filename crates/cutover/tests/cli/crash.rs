//! kill -9 at every crash point of the deploy protocol, for each switcher (files, containers
//! blue-green, containers hold), on two hosts: `CUTOVER_CRASH_AT=<point>` makes the process
//! SIGKILL itself there. After each kill every host must still serve a complete release (the
//! one before or the one being deployed), the next deploy must succeed and serve everywhere,
//! and the interrupted release must be marked (never left `running`). Each test prints its
//! matrix (point -> outcome) to stderr and fails at the end, naming every point that failed.
//!
//! The revert points need a release that fails its health gate after the switch: files get a
//! `reload` that takes `up` away on hosts flagged for that version; containers an image whose
//! `/cgi-bin/up` answers 200 to a direct probe (the staging gate, the proxy's own gate) and 503
//! to a request that came through the proxy (`X-Forwarded-Proto` set), so it fails the verify
//! through the proxy that follows the switch.

use crate::files::UNHEALTHY_RELOAD;
use crate::world::{noise, World};
use serde_json::Value;

/// Every crash point, in protocol order.
const POINTS: [&str; 10] = [
    "after-lock",
    "mid-upload",
    "after-stage",
    "after-switch-first",
    "after-switch",
    "after-gate",
    "before-commit",
    "after-commit",
    "after-revert-first",
    "after-revert",
];

/// Points reached only when the new release fails its gate.
fn reverts(point: &str) -> bool {
    point.contains("revert")
}

/// One switcher under test: how to deploy a release that crashes, and what its hosts serve.
trait Switcher {
    fn name(&self) -> &'static str;
    fn world(&self) -> &World;
    /// Deploys the `k`th crashing release (failing its gate after the switch if `fail_gate`)
    /// with `CUTOVER_CRASH_AT=point`; returns what it serves at `/` and the run.
    fn crash(&self, k: usize, point: &str, fail_gate: bool) -> (String, crate::world::Run);
    /// Deploys the `k`th healthy release after a crash; returns what it serves.
    fn next(&self, k: usize) -> Result<String, String>;
    /// What host `i` serves, if it is a complete release.
    fn serving(&self, i: usize) -> Result<String, String>;
    /// Anything a crash may leave behind that the next run must have cleaned.
    fn leftovers(&self) -> Result<(), String> {
        Ok(())
    }
}

struct Row {
    point: &'static str,
    process: String,
    serving: String,
    next: String,
    marked: String,
    problems: Vec<String>,
}

/// Runs every point of `points` against `s` and asserts the matrix at the end.
fn matrix(s: &dyn Switcher, points: &[&'static str]) {
    let w = s.world();
    let mut live = match s.next(0) {
        Ok(page) => page,
        Err(e) => panic!("{}: the first deploy: {e}", s.name()),
    };
    let mut rows = Vec::new();
    for (k, &point) in points.iter().enumerate() {
        let mut problems = Vec::new();
        let before: Vec<String> = ids(&w.history());
        let (crashing, r) = s.crash(k + 1, point, reverts(point));
        let process = match r.signal {
            Some(9) => "killed".to_string(),
            Some(sig) => {
                problems.push(format!("ended by signal {sig}, not 9"));
                format!("signal {sig}")
            }
            None => {
                problems.push(format!(
                    "not killed: exited {} (the run never reached `{point}`)",
                    r.code
                ));
                format!("exit {}", r.code)
            }
        };
        let serving: Vec<String> = (0..w.hosts())
            .map(|i| match s.serving(i) {
                Ok(page) if page == live || page == crashing => page,
                Ok(page) => {
                    problems.push(format!(
                        "host {i} serves {page:?}, neither {live:?} nor {crashing:?}"
                    ));
                    format!("{page}?")
                }
                Err(e) => {
                    problems.push(e.clone());
                    "INCOMPLETE".into()
                }
            })
            .collect();
        let next = match s.next(k + 1) {
            Ok(page) => {
                live = page;
                "ok".to_string()
            }
            Err(e) => {
                problems.push(format!("the next deploy: {e}"));
                "FAILED".to_string()
            }
        };
        if let Err(e) = s.leftovers() {
            problems.push(e);
        }
        let history = w.history();
        let live_id = history
            .iter()
            .find(|h| h["live"] == true)
            .and_then(|h| h["id"].as_str())
            .unwrap_or_default()
            .to_string();
        let crashed: Vec<&Value> = history
            .iter()
            .filter(|h| {
                let id = h["id"].as_str().unwrap_or_default();
                !before.iter().any(|b| b == id) && id != live_id
            })
            .collect();
        let marked = match crashed.as_slice() {
            [] => "no release recorded".to_string(),
            [h] => {
                let status = h["status"].as_str().unwrap_or_default().to_string();
                if status == "running" {
                    problems.push("the interrupted release is still `running`".into());
                }
                let run = w
                    .db()
                    .query_row(
                        "SELECT COALESCE(outcome, 'unfinished') FROM runs WHERE release_id = ?1 ORDER BY id LIMIT 1",
                        [h["id"].as_str().unwrap_or_default()],
                        |row| row.get::<_, String>(0),
                    )
                    .unwrap_or_else(|_| "no run".into());
                format!("{status} (run {run})")
            }
            more => {
                problems.push(format!("{} new releases besides the next one", more.len()));
                "?".into()
            }
        };
        rows.push(Row {
            point,
            process,
            serving: serving.join(", "),
            next,
            marked,
            problems,
        });
    }
    let mut table = format!(
        "kill -9 matrix, {} on {} hosts:\n  {:<20} {:<10} {:<28} {:<6} interrupted release\n",
        s.name(),
        w.hosts(),
        "point",
        "process",
        "hosts serve",
        "next"
    );
    for r in &rows {
        table.push_str(&format!(
            "  {:<20} {:<10} {:<28} {:<6} {}{}\n",
            r.point,
            r.process,
            r.serving,
            r.next,
            r.marked,
            if r.problems.is_empty() {
                ""
            } else {
                "  FAILED"
            }
        ));
    }
    eprintln!("{table}");
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| format!("{} x {}: {}", r.point, s.name(), r.problems.join("; ")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} crash points failed for {}:\n{}\n{table}",
        failed.len(),
        rows.len(),
        s.name(),
        failed.join("\n")
    );
}

fn ids(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .filter_map(|h| h["id"].as_str().map(str::to_string))
        .collect()
}

/// Files: `current` on every host, a reload that fails the gate of flagged versions.
struct Files(World);

impl Switcher for Files {
    fn name(&self) -> &'static str {
        "files"
    }

    fn world(&self) -> &World {
        &self.0
    }

    fn crash(&self, k: usize, point: &str, fail_gate: bool) -> (String, crate::world::Run) {
        let w = &self.0;
        let name = format!("crash{k}");
        let d = w.build(&name);
        if point == "mid-upload" {
            // Big enough that the upload is really cut in the middle.
            std::fs::write(d.join("noise.bin"), noise(k as u64, 3_000_000)).unwrap();
        }
        if fail_gate {
            for i in 0..w.hosts() {
                std::fs::write(w.lab().srv_dir(i).join(format!("unhealthy-{name}")), "").unwrap();
            }
        }
        let r = w
            .cutover(&["deploy", "--artifact", d.to_str().unwrap()])
            .crash_at(point)
            .run();
        (name, r)
    }

    fn next(&self, k: usize) -> Result<String, String> {
        let w = &self.0;
        let name = format!("after{k}");
        let r = w.deploy_artifact(&w.build(&name));
        if r.code != 0 {
            return Err(format!("exit {}: {}", r.code, r.json));
        }
        for i in 0..w.hosts() {
            let page = self.serving(i)?;
            if page != name {
                return Err(format!("host {i} serves {page:?}, not {name:?}"));
            }
        }
        Ok(name)
    }

    fn serving(&self, i: usize) -> Result<String, String> {
        self.0.complete(i)?;
        Ok(self.0.served(i))
    }

    fn leftovers(&self) -> Result<(), String> {
        for i in 0..self.0.hosts() {
            let partial: Vec<String> = self
                .0
                .releases_on(i)
                .into_iter()
                .filter(|r| r.ends_with(".partial"))
                .collect();
            if !partial.is_empty() {
                return Err(format!("host {i}: .partial directories left: {partial:?}"));
            }
        }
        Ok(())
    }
}

/// Containers: the proxy of every host, images that fail the verify through it on demand.
struct Containers {
    w: World,
    name: &'static str,
}

/// The health path of the crash worlds' images: a CGI script, so that it can tell a request
/// through the proxy from a direct one.
const CGI_UP: &str = "/cgi-bin/up";

/// Builds and pushes `web:TAG`, serving `TAG` at `/`; its [`CGI_UP`] answers 200, or 503 to
/// requests through the proxy if `fails_through_proxy`.
fn cgi_image(w: &World, tag: &str, fails_through_proxy: bool) {
    let up = if fails_through_proxy {
        "#!/bin/sh\nif [ -n \"$HTTP_X_FORWARDED_PROTO\" ]; then printf 'Status: 503 Service Unavailable\\r\\nContent-Type: text/plain\\r\\n\\r\\nunhealthy through the proxy\\n'; else printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'; fi\n"
    } else {
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n"
    };
    let cmd = r#"CMD ["sh", "-c", "trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait"]"#;
    w.lab().build_image_with(
        &format!("web:{tag}"),
        &[
            ("www/index.html", format!("{tag}\n").as_bytes()),
            ("www/cgi-bin/up", up.as_bytes()),
        ],
        &[cmd, "EXPOSE 8080/tcp"],
    );
}

impl Containers {
    fn start(strategy: &'static str) -> Containers {
        let w = World::containers(2, strategy)
            .set("health", "path", &format!("{CGI_UP:?}"))
            .start();
        cgi_image(&w, "crash", false);
        cgi_image(&w, "crash-bad", true);
        Containers { w, name: strategy }
    }
}

impl Switcher for Containers {
    fn name(&self) -> &'static str {
        self.name
    }

    fn world(&self) -> &World {
        &self.w
    }

    fn crash(&self, _k: usize, point: &str, fail_gate: bool) -> (String, crate::world::Run) {
        let tag = if fail_gate { "crash-bad" } else { "crash" };
        let r = self
            .w
            .cutover(&["deploy", "--image", tag])
            .crash_at(point)
            .run();
        (tag.to_string(), r)
    }

    fn next(&self, k: usize) -> Result<String, String> {
        let tag = format!("next{k}");
        cgi_image(&self.w, &tag, false);
        let r = self.w.deploy_image(&tag);
        if r.code != 0 {
            return Err(format!("exit {}: {}", r.code, r.json));
        }
        for i in 0..self.w.hosts() {
            let page = self.serving(i)?;
            if page != tag {
                return Err(format!("host {i} serves {page:?}, not {tag:?}"));
            }
        }
        Ok(tag)
    }

    /// What host `i`'s proxy serves. A hold switch the crash cut short is finished by the
    /// host's own watchdog within its grace (stop_timeout + give_up_after + 2 timeouts + 15 s:
    /// 23 s here), so a host is given 40 s to serve again.
    fn serving(&self, i: usize) -> Result<String, String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            let page = self.w.served(i);
            if !page.starts_with("HTTP") && !page.starts_with("ERROR") {
                return Ok(page);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("host {i}'s proxy answers {page}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// Formerly `files::kill_9_at_every_step_then_a_successful_run`.
#[test]
fn kill_9_at_every_point_files() {
    let w = World::files(2)
        .set("files", "reload", UNHEALTHY_RELOAD)
        .start();
    matrix(&Files(w), &POINTS);
}

#[test]
fn kill_9_at_every_point_blue_green() {
    let points: Vec<&str> = POINTS.into_iter().filter(|p| *p != "mid-upload").collect();
    matrix(&Containers::start("blue-green"), &points);
}

#[test]
fn kill_9_at_every_point_hold() {
    let points: Vec<&str> = POINTS.into_iter().filter(|p| *p != "mid-upload").collect();
    matrix(&Containers::start("hold"), &points);
}

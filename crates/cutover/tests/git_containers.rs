//! Container apps built from git (`[build] dockerfile`): a real repository made with the `git`
//! CLI holding a Dockerfile `FROM scratch` that copies a static busybox from the repository (no
//! image is pulled from anywhere), the real `cutover` binary running `docker build` and `docker
//! push` into the lab's registry, and real Docker hosts (testlab) pulling the pushed digest and
//! serving it through cutover's edge proxy. Needs root, Docker Engine, Debian's
//! `docker-registry`, `busybox-static` and git.
//!
//! The docker CLI of a build runs with cutover's own environment; the tests point it at lab host
//! 0's dockerd (`DOCKER_HOST`), which trusts the lab registry as an insecure registry (the
//! machine's own dockerd does not, and is not reconfigured). So host 0's daemon builds and
//! pushes, and every host, host 1 included, pulls the pushed digest from the registry.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use testlab::{Lab, LabOptions};

const PROXY_PORT: u16 = 8000;
const COMMIT_TIME: i64 = 1_790_000_000;

/// A Dockerfile that serves `www/` of the repository with busybox httpd on 8080, and writes the
/// commit it was built from (the `CUTOVER_COMMIT` build argument) to `/commit`.
const DOCKERFILE: &str = r#"FROM scratch
COPY rootfs/ /
ARG CUTOVER_COMMIT
RUN echo "stamping commit $CUTOVER_COMMIT" && echo "$CUTOVER_COMMIT" > /www/commit
EXPOSE 8080
CMD ["sh", "-c", "trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait"]
"#;

struct World {
    lab: Lab,
    dir: PathBuf,
    config: PathBuf,
    registry: String,
    clock: std::cell::Cell<i64>,
}

impl World {
    fn new(hosts: usize) -> World {
        let lab = Lab::start_with(LabOptions {
            hosts,
            docker: true,
            ..LabOptions::default()
        });
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let registry = lab.registry().unwrap();
        let w = World {
            config: dir.join("cutover.toml"),
            lab,
            dir,
            registry,
            clock: std::cell::Cell::new(COMMIT_TIME),
        };
        git_at(
            &w.dir,
            &["init", "-q", "--bare", "-b", "main", "origin.git"],
            None,
        );
        w.git(&["init", "-q", "-b", "main"]);
        let origin = w.dir.join("origin.git").display().to_string();
        w.git(&["remote", "add", "origin", &origin]);
        // The image's root filesystem lives in the repository: a static busybox and the applets
        // the Dockerfile and the container use, as symlinks (git keeps them).
        let bin = w.work().join("rootfs/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .expect("/bin/busybox: install Debian's busybox-static");
        for applet in ["sh", "httpd", "echo", "sleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        w.write_config("");
        let out = w.run(&["setup"]);
        assert_eq!(out.status.code(), Some(0), "setup");
        w
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn git(&self, args: &[&str]) -> String {
        let t = self.clock.get() + 60;
        self.clock.set(t);
        git_at(&self.work(), args, Some(t))
    }

    /// Commits a site whose `/` says `page` with `dockerfile` (none: no Dockerfile at all) and
    /// pushes it to origin's main; returns the full SHA.
    fn commit(&self, page: &str, subject: &str, dockerfile: Option<&str>) -> String {
        let w = self.work();
        std::fs::create_dir_all(w.join("rootfs/www")).unwrap();
        std::fs::write(w.join("rootfs/www/index.html"), format!("{page}\n")).unwrap();
        std::fs::write(w.join("rootfs/www/up"), "ok\n").unwrap();
        match dockerfile {
            Some(d) => std::fs::write(w.join("Dockerfile"), d).unwrap(),
            None => {
                let _ = std::fs::remove_file(w.join("Dockerfile"));
            }
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", subject]);
        self.git(&["push", "-q", "--force", "origin", "main"]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn write_config(&self, build_extra: &str) {
        let hosts: Vec<String> = (0..self.lab.len())
            .map(|i| format!("{:?}", self.lab.destination(i)))
            .collect();
        let text = format!(
            r#"app = "web"
hosts = [{hosts}]

[ssh]
known_hosts = {kh:?}
identity = {id:?}
connect_timeout = "3s"

[container]
image = "{reg}/web"
port = 8080
strategy = "blue-green"
keep = 3
stop_timeout = "2s"

[proxy]
listen = "0.0.0.0:{PROXY_PORT}"
drain = "1s"
install_dir = "/srv/cutover"

[health]
path = "/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "5s"

[build]
repo = {repo:?}
dockerfile = "Dockerfile"
timeout = "3m"
{build_extra}
"#,
            hosts = hosts.join(", "),
            kh = self.lab.known_hosts(),
            id = self.lab.identity(),
            reg = self.registry,
            repo = self.dir.join("origin.git"),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// `cutover ARGS` with the docker CLI pointed at host 0's dockerd.
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"))
            .env("DOCKER_HOST", self.lab.docker_host(0))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("CUTOVER_CRASH_AT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!(
            "$ cutover {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn json(&self, args: &[&str]) -> (i32, Value) {
        let out = self.run(args);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    }

    fn deploy_ref_ok(&self, r: &str) -> Value {
        let (code, v) = self.json(&["deploy", "--json", "--ref", r]);
        assert_eq!(code, 0, "deploy --ref {r}: {v}");
        v
    }

    fn history(&self) -> Vec<Value> {
        let (code, v) = self.json(&["history", "--json"]);
        assert_eq!(code, 0);
        v.as_array().unwrap().clone()
    }

    /// `GET path` through host i's edge proxy: the body on 200, else `HTTP <status line>`.
    fn get(&self, i: usize, path: &str) -> String {
        let addr = std::net::SocketAddr::new(self.lab.ip(i).into(), PROXY_PORT);
        fetch(addr, path).unwrap_or_else(|e| format!("ERROR {e}"))
    }

    fn assert_all_serve(&self, page: &str, commit: &str) {
        for i in 0..self.lab.len() {
            assert_eq!(self.get(i, "/").trim(), page, "host {i}");
            assert_eq!(self.get(i, "/commit").trim(), commit, "host {i}");
        }
    }

    /// (step, phase, detail) of every event of the newest run.
    fn last_run_events(&self) -> Vec<(String, String, String)> {
        let db = rusqlite::Connection::open(self.dir.join("data/cutover.db")).unwrap();
        let mut st = db
            .prepare("SELECT step, phase, detail FROM events WHERE run_id = (SELECT MAX(id) FROM runs) ORDER BY seq")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Image ids host 0's daemon (the builder) has.
    fn builder_images(&self) -> Vec<String> {
        let out = self.lab.docker(0, &["images", "-q", "--no-trunc"]);
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Runs git in `dir` with a fixed identity and no user or system config.
fn git_at(dir: &Path, args: &[&str], date: Option<i64>) -> String {
    let mut c = Command::new("git");
    c.args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada Lovelace")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada Lovelace")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null());
    if let Some(d) = date {
        let d = format!("@{d} +0000");
        c.env("GIT_AUTHOR_DATE", &d).env("GIT_COMMITTER_DATE", &d);
    }
    let out = c.output().expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fetch(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Ok(format!("HTTP {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

fn steps(events: &[(String, String, String)]) -> Vec<&str> {
    events.iter().map(|(s, _, _)| s.as_str()).collect()
}

const BUILD_STEPS: [&str; 5] = ["fetch", "export", "build", "docker-build", "docker-push"];

#[test]
fn a_commit_is_built_pushed_and_deployed_and_rollback_never_rebuilds() {
    let w = World::new(2);

    // First commit: built by host 0's daemon, pushed as web:<full sha>, pulled by digest on
    // both hosts and served through their proxies.
    let c1 = w.commit("v1", "first page", Some(DOCKERFILE));
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c1.as_str(), "{v}");
    assert_eq!(v["commit_subject"], "first page");
    w.assert_all_serve("v1", &c1);
    let pushed1 = w.lab.image_digest(&format!("web:{c1}"));
    let h = w.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["commit"], c1.as_str(), "full SHA in history");
    assert_eq!(h[0]["commit_subject"], "first page");
    assert_eq!(
        format!("sha256:{}", h[0]["artifact_sha256"].as_str().unwrap()),
        pushed1,
        "the release is exactly the pushed digest"
    );
    // Host 1 never saw the build: it pulled the digest from the registry.
    let on1 = w.lab.docker(
        1,
        &["image", "inspect", &format!("{}/web@{pushed1}", w.registry)],
    );
    assert!(on1.status.success(), "host 1 pulled {pushed1}");
    let events = w.last_run_events();
    let s = steps(&events);
    let pos = |step: &str| s.iter().position(|x| *x == step);
    let pushed_at = s.iter().rposition(|x| *x == "docker-push").unwrap();
    assert!(
        pos("connect").unwrap() > pushed_at,
        "hosts are connected only after the push: {s:?}"
    );
    assert!(
        events.iter().any(|(s, p, d)| s == "docker-build"
            && p == "output"
            && d.contains(&format!("stamping commit {c1}"))),
        "docker build output is recorded line by line: {events:?}"
    );
    assert!(events
        .iter()
        .any(|(s, p, d)| s == "docker-push" && p == "done" && d == &pushed1));
    // The image carries its commit.
    let label = w.lab.docker(
        0,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
            &format!("{}/web:{c1}", w.registry),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), c1);

    // A second commit deploys the same way (shown live without --json).
    let c2 = w.commit("v2", "second page", Some(DOCKERFILE));
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("stamping commit {c2}")),
        "docker output is shown live: {err}"
    );
    assert!(
        err.contains(&format!("commit {} second page", &c2[..7])),
        "{err}"
    );
    w.assert_all_serve("v2", &c2);
    let h = w.history();
    assert_eq!(h[0]["commit"], c2.as_str());
    let release1 = h[1]["id"].as_str().unwrap().to_string();
    // status and diff know the commits of container releases too.
    let (code, st) = w.json(&["status", "--json"]);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["live_commit"], c2.as_str(), "{st}");
    assert!(
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["commit"] == c2.as_str()),
        "{st}"
    );
    let (code, d) = w.json(&["diff", "--json"]);
    assert_eq!(code, 0, "{d}");
    let commits: Vec<&str> = d["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["commit"].as_str().unwrap())
        .collect();
    assert_eq!(commits, [c2.as_str()], "{d}");

    // Rollback: the first release's recorded digest, no fetch, no build, no push.
    let images = w.builder_images();
    let (code, v) = w.json(&["rollback", "--json"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["release"], release1.as_str());
    w.assert_all_serve("v1", &c1);
    let events = w.last_run_events();
    let s = steps(&events);
    assert!(
        !s.iter().any(|x| BUILD_STEPS.contains(x)),
        "rollback did not build: {s:?}"
    );
    assert_eq!(w.builder_images(), images, "no image was built");
    assert_eq!(w.lab.image_digest(&format!("web:{c1}")), pushed1);

    // cache = true: the first deploy of c2 with it builds (and records), the second reuses
    // the pushed digest without docker build or push.
    w.write_config("cache = true");
    w.deploy_ref_ok(&c2);
    let s1: Vec<String> = steps(&w.last_run_events())
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(s1.iter().any(|x| x == "docker-build"), "{s1:?}");
    let digest2 = w.history()[0]["artifact_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let images = w.builder_images();
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    let events = w.last_run_events();
    let s = steps(&events);
    assert!(
        !s.iter()
            .any(|x| *x == "docker-build" || *x == "docker-push" || *x == "export"),
        "a cached build is not rebuilt: {s:?}"
    );
    assert!(
        events
            .iter()
            .any(|(s, p, d)| s == "build" && p == "done" && d.contains("reused the image")),
        "{events:?}"
    );
    assert_eq!(w.history()[0]["artifact_sha256"], digest2.as_str());
    assert_eq!(w.builder_images(), images, "no image was built");
    w.assert_all_serve("v2", &c2);
    // A different build config is a different key: it builds again.
    w.write_config("cache = true\ncommand = \"echo prepared > rootfs/www/prepared\"");
    w.deploy_ref_ok("main");
    assert!(steps(&w.last_run_events()).contains(&"docker-build"));
    assert_eq!(w.get(0, "/prepared").trim(), "prepared");
    assert_eq!(w.get(1, "/prepared").trim(), "prepared");
}

#[test]
fn a_failed_docker_build_is_exit_1_and_touches_no_host() {
    let w = World::new(1);
    let c1 = w.commit("v1", "good", Some(DOCKERFILE));
    w.deploy_ref_ok("main");
    w.assert_all_serve("v1", &c1);
    let releases = w.history().len();

    // A RUN that fails.
    let broken = DOCKERFILE.replace("ARG CUTOVER_COMMIT\n", "RUN echo about to fail && exit 1\n");
    w.commit("v2", "broken build", Some(&broken));
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("about to fail"), "output shown live: {err}");
    assert!(err.contains("docker build of"), "{err}");
    assert!(err.contains("No host was touched"), "{err}");
    let events = w.last_run_events();
    let s = steps(&events);
    assert!(
        !s.iter()
            .any(|x| *x == "connect" || *x == "prepare" || *x == "docker-push"),
        "no push, no host connection: {s:?}"
    );
    assert!(events
        .iter()
        .any(|(s, p, d)| s == "docker-build" && p == "output" && d == "about to fail"));
    assert_eq!(w.history().len(), releases, "no release was recorded");
    w.assert_all_serve("v1", &c1);
    assert_eq!(
        std::fs::read_dir(w.dir.join("data/builds"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the build directory is gone"
    );

    // A build that runs past [build] timeout is killed (the docker CLI and, with it, the
    // build in the daemon).
    let hanging = DOCKERFILE.replace("ARG CUTOVER_COMMIT\n", "RUN echo sleeping && sleep 300\n");
    w.commit("v2", "hanging build", Some(&hanging));
    std::fs::write(
        &w.config,
        std::fs::read_to_string(&w.config)
            .unwrap()
            .replace("timeout = \"3m\"", "timeout = \"4s\""),
    )
    .unwrap();
    let start = std::time::Instant::now();
    let (code, v) = w.json(&["deploy", "--json", "--ref", "main"]);
    assert_eq!(code, 1, "{v}");
    assert!(start.elapsed() < Duration::from_secs(60));
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("timed out") && msg.contains("[build] timeout"),
        "{msg}"
    );
    assert!(!steps(&w.last_run_events()).contains(&"connect"));
    // The builder daemon gives up the build too: its RUN container does not keep sleeping.
    let sleeping = || {
        let out = w
            .lab
            .docker(0, &["ps", "--no-trunc", "--format", "{{.Command}}"]);
        String::from_utf8_lossy(&out.stdout).contains("sleep 300")
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while sleeping() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !sleeping(),
        "the timed-out build's RUN container still runs"
    );
    w.assert_all_serve("v1", &c1);
    w.write_config("");

    // A commit without the Dockerfile; `deploy` with neither --ref nor --image builds HEAD.
    let c3 = w.commit("v3", "no dockerfile", None);
    let (code, v) = w.json(&["deploy", "--json"]);
    assert_eq!(code, 1, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "commit {} has no Dockerfile `Dockerfile`",
            &c3[..7]
        )),
        "{v}"
    );
    assert!(!steps(&w.last_run_events()).contains(&"connect"));
    w.assert_all_serve("v1", &c1);

    // Config errors are exit 2 before anything runs.
    w.write_config("output = \"dist\"");
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("build.output"));
    w.write_config("");
    let out = w.run(&["deploy", "--ref", "main", "--image", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--ref and --image exclude each other"
    );
    assert_eq!(w.history().len(), releases);
    w.assert_all_serve("v1", &c1);
}

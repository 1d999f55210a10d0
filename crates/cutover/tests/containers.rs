//! Container deploys against real Docker hosts: network namespaces with their own sshd and
//! dockerd (testlab), a registry on the lab network, images built locally and pushed, the real
//! `cutover` binary installing and driving its own edge proxy on every host, and real load
//! through those proxies. Needs root.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;
use testlab::{Lab, LabOptions, Load, LoadOptions};

struct World {
    lab: Lab,
    dir: PathBuf,
    config: PathBuf,
    registry: String,
}

const PROXY_PORT: u16 = 8000;

impl World {
    fn new(hosts: usize, strategy: &str) -> World {
        let lab = Lab::start_with(LabOptions {
            hosts,
            docker: true,
            ..LabOptions::default()
        });
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(&dir).unwrap();
        let registry = lab.registry().unwrap();
        for i in 0..hosts {
            std::fs::create_dir_all(lab.srv_dir(i).join("flags")).unwrap();
        }
        let w = World {
            config: dir.join("cutover.toml"),
            lab,
            dir,
            registry,
        };
        w.write_config(strategy);
        let out = w.run(&["setup"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "setup: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        w
    }

    fn write_config(&self, strategy: &str) {
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
env = {{ GREETING = "it's $(not) a command" }}
volumes = ["/srv/flags:/hostflag"]
strategy = "{strategy}"
keep = 2
stop_timeout = "2s"

[proxy]
listen = "0.0.0.0:{PROXY_PORT}"
drain = "2s"
hold = "60s"
install_dir = "/srv/cutover"

[health]
path = "/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "4s"
"#,
            hosts = hosts.join(", "),
            kh = self.lab.known_hosts(),
            id = self.lab.identity(),
            reg = self.registry,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"))
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

    fn deploy(&self, tag: &str) -> (i32, Value) {
        let out = self.run(&["deploy", "--json", "--image", tag]);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    }

    fn image(&self, tag: &str, healthy: bool) {
        self.lab
            .build_web_image(&format!("web:{tag}"), &format!("{tag}\n"), healthy);
    }

    fn deploy_ok(&self, tag: &str) -> String {
        let (code, v) = self.deploy(tag);
        assert_eq!(code, 0, "deploy {tag}: {v}");
        v["release"].as_str().unwrap().to_string()
    }

    fn proxy_addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.lab.ip(i).into(), PROXY_PORT)
    }

    fn served(&self, i: usize) -> String {
        get(self.proxy_addr(i)).unwrap_or_else(|e| format!("ERROR {e}"))
    }

    fn assert_all_serve(&self, body: &str) {
        for i in 0..self.lab.len() {
            assert_eq!(self.served(i).trim(), body, "host {i}");
        }
    }

    fn containers(&self, i: usize) -> Vec<String> {
        let out = self
            .lab
            .docker(i, &["ps", "-a", "--format", "{{.Names}} {{.State}}"]);
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    fn history(&self) -> Vec<Value> {
        let out = self.run(&["history", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Ok(format!("HTTP {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

#[test]
fn blue_green_deploys_and_rollbacks_under_load_fail_no_request() {
    let w = World::new(2, "blue-green");
    // Setup again is harmless: same binary, proxy already running.
    let out = w.run(&["setup", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        s.as_array()
            .unwrap()
            .iter()
            .all(|h| h["binary"] == "unchanged"),
        "{s}"
    );

    for k in 0..=10 {
        w.image(&format!("v{k}"), true);
    }
    let v0 = w.deploy_ok("v0");
    w.assert_all_serve("v0");
    let h = w.history();
    assert_eq!(h[0]["id"], v0.as_str());
    assert_eq!(
        h[0]["artifact_sha256"].as_str().unwrap().len(),
        64,
        "recorded by digest"
    );
    assert!(h[0]["source"].as_str().unwrap().ends_with("web:v0"));

    let targets: Vec<_> = (0..2).map(|i| w.proxy_addr(i)).collect();
    let ka = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: true,
        ..LoadOptions::new(targets.clone())
    });
    let fresh = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: false,
        ..LoadOptions::new(targets)
    });
    for k in 1..=10 {
        w.deploy_ok(&format!("v{k}"));
        let out = w.run(&["rollback", "--json"]);
        assert_eq!(out.status.code(), Some(0), "rollback {k}");
        let o: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(o["status"], "succeeded");
    }
    let ka = ka.stop();
    let fresh = fresh.stop();
    eprintln!(
        "blue-green keep-alive: {} ok, {} failed, longest {:?}, bodies {:?}",
        ka.ok, ka.failed, ka.max_latency, ka.bodies
    );
    eprintln!(
        "blue-green fresh: {} ok, {} failed, longest {:?}",
        fresh.ok, fresh.failed, fresh.max_latency
    );
    ka.assert_no_failures();
    fresh.assert_no_failures();
    assert!(
        ka.bodies.len() >= 5,
        "the load saw the switches: {:?}",
        ka.bodies
    );
    w.assert_all_serve("v0");
    // keep = 2: old containers are pruned; the live one runs, the rollback target is kept.
    for i in 0..2 {
        let c = w.containers(i);
        assert!(c.len() <= 3, "host {i}: {c:?}");
        assert_eq!(
            c.iter().filter(|l| l.ends_with("running")).count(),
            1,
            "host {i}: {c:?}"
        );
    }
}

#[test]
fn hold_deploys_under_load_fail_no_request() {
    let w = World::new(2, "hold");
    for k in 0..=10 {
        w.image(&format!("h{k}"), true);
    }
    w.deploy_ok("h0");
    let targets: Vec<_> = (0..2).map(|i| w.proxy_addr(i)).collect();
    let ka = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: true,
        timeout: Duration::from_secs(70),
        ..LoadOptions::new(targets.clone())
    });
    let fresh = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: false,
        timeout: Duration::from_secs(70),
        ..LoadOptions::new(targets)
    });
    for k in 1..=10 {
        w.deploy_ok(&format!("h{k}"));
    }
    let ka = ka.stop();
    let fresh = fresh.stop();
    eprintln!(
        "hold keep-alive: {} ok, {} failed, longest {:?}",
        ka.ok, ka.failed, ka.max_latency
    );
    eprintln!(
        "hold fresh: {} ok, {} failed, longest {:?}",
        fresh.ok, fresh.failed, fresh.max_latency
    );
    ka.assert_no_failures();
    fresh.assert_no_failures();
    w.assert_all_serve("h10");
    for i in 0..2 {
        let running = w
            .containers(i)
            .iter()
            .filter(|l| l.ends_with("running"))
            .count();
        assert_eq!(running, 1, "hold runs one copy at a time");
    }
}

#[test]
fn broken_images_flip_nothing_and_the_old_release_serves() {
    let w = World::new(2, "blue-green");
    w.image("good", true);
    w.image("unhealthy", false);
    w.lab.build_crashing_image("web:crash");
    w.deploy_ok("good");
    for (tag, want) in [
        ("crash", "exited"),
        ("unhealthy", "HTTP 404"),
        ("missing", "cannot pull"),
    ] {
        let (code, v) = w.deploy(tag);
        assert_eq!(code, 1, "{tag}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(want),
            "{tag}: the diagnosis says {want}: {msg}"
        );
        assert!(msg.contains("nothing was switched"), "{msg}");
        w.assert_all_serve("good");
        for i in 0..2 {
            let c = w.containers(i);
            assert_eq!(
                c.len(),
                1,
                "{tag}: the new containers were removed on host {i}: {c:?}"
            );
        }
    }
    // The crashing container's own output is in the diagnosis.
    let h = w.history();
    assert!(h.iter().any(|r| r["status"] == "failed"));
}

/// An image whose `/up` exists unless the host has `/srv/flags/unhealthy`.
fn flagged_image(w: &World, tag: &str) {
    let start = b"#!/bin/sh\ntrap 'exit 0' TERM INT\nif [ ! -e /hostflag/unhealthy ]; then echo ok > /www/up; fi\nhttpd -f -p 8080 -h /www &\nwait\n";
    w.lab.build_image(
        &format!("web:{tag}"),
        &[
            ("www/index.html", format!("{tag}\n").as_bytes()),
            ("start.sh", start),
        ],
        &["/start.sh"],
    );
}

#[test]
fn healthy_on_one_host_unhealthy_on_the_other_ends_on_the_old_release() {
    let w = World::new(2, "blue-green");
    w.image("a", true);
    flagged_image(&w, "f");
    w.deploy_ok("a");
    std::fs::write(w.lab.srv_dir(1).join("flags/unhealthy"), "").unwrap();
    let (code, v) = w.deploy("f");
    assert_eq!(code, 1, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&w.lab.destination(1)),
        "{v}"
    );
    w.assert_all_serve("a");
    // hold: host 0 switches, host 1 fails its gate; both end on the old release.
    w.write_config("hold");
    let (code, v) = w.deploy("f");
    assert_eq!(code, 1, "{v}");
    w.assert_all_serve("a");
    assert_eq!(w.history()[0]["status"], "rolled_back");
}

#[test]
fn rollback_warm_and_cold() {
    let w = World::new(2, "blue-green");
    w.image("r1", true);
    w.image("r2", true);
    let r1 = w.deploy_ok("r1");
    w.deploy_ok("r2");
    // Warm: r1's container is still on the hosts (stopped).
    for i in 0..2 {
        assert!(w
            .containers(i)
            .iter()
            .any(|c| c.starts_with(&format!("web-{r1} ")) && c.ends_with("exited")));
    }
    let out = w.run(&["rollback", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    w.assert_all_serve("r1");
    // Cold: remove r2's container and image everywhere, then roll back to it explicitly.
    w.deploy_ok("r2");
    let h = w.history();
    let r2_old = h
        .iter()
        .find(|r| r["source"].as_str().unwrap().ends_with("web:r2") && r["live"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let live = h.iter().find(|r| r["live"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = w.run(&["rollback", "--json", "--to", &r1]);
    assert_eq!(out.status.code(), Some(0));
    for i in 0..2 {
        let _ = w.lab.docker(i, &["rm", "-f", &format!("web-{live}")]);
        let _ = w.lab.docker(i, &["rm", "-f", &format!("web-{r2_old}")]);
        w.lab
            .remove_image_on_host(i, &w.lab.image_reference("web:r2"));
        let digest = w.lab.image_digest(&w.lab.image_reference("web:r2"));
        let _ = w
            .lab
            .docker(i, &["image", "rm", &format!("{}/web@{digest}", w.registry)]);
    }
    let out = w.run(&["rollback", "--json", "--to", &live]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "cold rollback pulls the digest again"
    );
    w.assert_all_serve("r2");
    let out = w.run(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status reads the running container on every host"
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    for h in st["hosts"].as_array().unwrap() {
        assert_eq!(h["release"], live.as_str());
    }
}

#[test]
fn proxy_restart_keeps_routing() {
    let w = World::new(1, "blue-green");
    w.image("p1", true);
    w.deploy_ok("p1");
    // Kill this host's proxy by the pid its own control socket reports (test hosts share one
    // pid namespace, so a name pattern would hit other tests' proxies); the supervisor
    // restarts it, and the restarted proxy routes from its state file.
    let pid = |w: &World| -> Option<u64> {
        let out = w.lab.ssh(
            0,
            "/srv/cutover/cutover proxy status --dir /srv/cutover --json",
        );
        serde_json::from_slice::<Value>(&out.stdout).ok()?["pid"].as_u64()
    };
    let before = pid(&w).expect("the proxy answers");
    assert!(w
        .lab
        .ssh(0, &format!("kill -TERM {before}"))
        .status
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pid(&w).is_none_or(|p| p == before) {
        assert!(std::time::Instant::now() < deadline, "the proxy came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.assert_all_serve("p1");
    let out = w.run(&["check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check sees docker and the proxy"
    );
    w.lab
        .ssh(0, "mv /srv/cutover/proxy.sock /srv/cutover/proxy.sock.off");
    let out = w.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("edge proxy"));
    w.lab
        .ssh(0, "mv /srv/cutover/proxy.sock.off /srv/cutover/proxy.sock");
}

#[test]
fn upgrading_the_proxy_binary_under_load_fails_no_request() {
    let w = World::new(2, "blue-green");
    w.image("u1", true);
    w.deploy_ok("u1");
    let targets: Vec<_> = (0..2).map(|i| w.proxy_addr(i)).collect();
    let ka = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: true,
        ..LoadOptions::new(targets.clone())
    });
    let fresh = Load::start(LoadOptions {
        workers_per_target: 2,
        keep_alive: false,
        ..LoadOptions::new(targets)
    });
    // Make the installed binary differ (as after a cutover upgrade), then set up again: the
    // new proxy takes the port over from the old one, which drains and exits.
    let proxy_pid = |i: usize| -> u64 {
        let out = w.lab.ssh(
            i,
            "/srv/cutover/cutover proxy status --dir /srv/cutover --json",
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["pid"].as_u64().unwrap()
    };
    let before: Vec<u64> = (0..2).map(proxy_pid).collect();
    for i in 0..2 {
        let out = w.lab.ssh(
            i,
            "cd /srv/cutover && cp cutover c.tmp && printf '\\0' >> c.tmp && mv c.tmp cutover",
        );
        assert!(out.status.success());
    }
    let out = w.run(&["setup", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        s.as_array()
            .unwrap()
            .iter()
            .all(|h| h["binary"] == "uploaded"
                && h["service"].as_str().unwrap().contains("upgraded")),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let ka = ka.stop();
    let fresh = fresh.stop();
    eprintln!(
        "proxy upgrade keep-alive: {} ok, {} failed, longest {:?}",
        ka.ok, ka.failed, ka.max_latency
    );
    eprintln!(
        "proxy upgrade fresh: {} ok, {} failed, longest {:?}",
        fresh.ok, fresh.failed, fresh.max_latency
    );
    for (i, old) in before.iter().enumerate() {
        assert_ne!(proxy_pid(i), *old, "host {i}: a new proxy process serves");
        assert!(
            !std::path::Path::new(&format!("/proc/{old}")).exists(),
            "host {i}: the old proxy exited"
        );
    }
    ka.assert_no_failures();
    fresh.assert_no_failures();
    w.assert_all_serve("u1");
}

/// kill -9 of a container deploy after staging and after switching: every host keeps serving a
/// release through its proxy, and the next deploy reconciles the history and succeeds.
#[test]
fn kill_9_mid_deploy_then_a_successful_run() {
    let w = World::new(2, "blue-green");
    for t in ["k0", "k1", "k2", "k3", "k4"] {
        w.image(t, true);
    }
    w.deploy_ok("k0");
    for (n, point) in ["after-stage", "after-switch"].iter().enumerate() {
        let crashed = format!("k{}", 2 * n + 1);
        let next = format!("k{}", 2 * n + 2);
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["deploy", "--image", &crashed, "-c"])
            .arg(&w.config)
            .arg("--data")
            .arg(w.dir.join("data"))
            .env("CUTOVER_CRASH_AT", point)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..2 {
            let page = w.served(i);
            assert!(
                page.trim().starts_with('k'),
                "{point}: host {i} serves {page}"
            );
        }
        w.deploy_ok(&next);
        w.assert_all_serve(&next);
        let h = w.history();
        assert_ne!(
            h[1]["status"], "running",
            "{point}: the interrupted release is marked"
        );
    }
}

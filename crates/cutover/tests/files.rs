//! File deploys against real hosts: network namespaces with their own sshd and nginx
//! (testlab), the real `cutover` binary, real load. Needs root.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use testlab::hostile::{write_hostile, Hostile};
use testlab::{Lab, LabOptions, Load, LoadOptions};

/// One test's world: a lab of hosts, a config, a data directory.
struct World {
    lab: Lab,
    dir: PathBuf,
    config: PathBuf,
}

const ROOT: &str = "/srv/site";

impl World {
    fn new(hosts: usize) -> World {
        World::with(
            LabOptions {
                hosts,
                ..LabOptions::default()
            },
            "",
        )
    }

    /// `files_extra` goes into `[files]`.
    fn with(opts: LabOptions, files_extra: &str) -> World {
        let lab = Lab::start_with(opts);
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(&dir).unwrap();
        let w = World {
            config: dir.join("cutover.toml"),
            lab,
            dir,
        };
        w.write_config(ROOT, files_extra, "");
        w
    }

    fn hosts_toml(&self) -> String {
        (0..self.lab.len())
            .map(|i| format!("{:?}", self.lab.destination(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn write_config(&self, root: &str, files_extra: &str, ssh_extra: &str) {
        let text = format!(
            r#"app = "site"
hosts = [{hosts}]

[ssh]
known_hosts = {kh:?}
identity = {id:?}
connect_timeout = "3s"
{ssh_extra}

[files]
root = {root:?}
{files_extra}

[health]
url = "http://127.0.0.1/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "3s"
"#,
            hosts = self.hosts_toml(),
            kh = self.lab.known_hosts(),
            id = self.lab.identity(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cutover"));
        c.args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"));
        c.env_remove("CUTOVER_CRASH_AT");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        eprintln!(
            "$ cutover {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A build directory whose pages say `name`.
    fn build(&self, name: &str) -> PathBuf {
        let d = self.dir.join("builds").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("index.html"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("up"), "ok\n").unwrap();
        std::fs::write(d.join("version"), name).unwrap();
        d
    }

    fn deploy(&self, artifact: &Path) -> (i32, Value) {
        let out = self.run(&["deploy", "--json", "--artifact", artifact.to_str().unwrap()]);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    }

    fn deploy_ok(&self, name: &str) -> String {
        let (code, v) = self.deploy(&self.build(name));
        assert_eq!(code, 0, "deploy {name}: {v}");
        v["release"].as_str().unwrap().to_string()
    }

    fn history(&self) -> Vec<Value> {
        let out = self.run(&["history", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn site(&self, i: usize) -> PathBuf {
        self.lab.srv_dir(i).join("site")
    }

    /// The release `current` points at on host `i`, read from the host's disk.
    fn current(&self, i: usize) -> Option<String> {
        std::fs::read_link(self.site(i).join("current"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn releases_on(&self, i: usize) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.site(i).join("releases"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// What host `i` serves at `/` over HTTP.
    fn served(&self, i: usize) -> String {
        http_get(self.lab.http_addr(i), "/").unwrap_or_else(|e| format!("ERROR {e}"))
    }

    /// Every host serves a complete release whose page is one of `names`.
    fn assert_all_serve(&self, name: &str) {
        for i in 0..self.lab.len() {
            assert_eq!(self.served(i).trim(), name, "host {i}");
            self.assert_complete(i);
        }
    }

    fn assert_complete(&self, i: usize) {
        let cur = self.site(i).join("current");
        assert!(
            cur.join(".cutover-release.json").is_file(),
            "host {i}: current is not a complete release"
        );
        assert!(
            cur.join("index.html").is_file() && cur.join("version").is_file(),
            "host {i}: files missing"
        );
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Ok(format!("HTTP {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn three_hosts_deploy_and_redeploy() {
    let w = World::new(3);
    let v1 = w.deploy_ok("v1");
    w.assert_all_serve("v1");
    let meta: Value = serde_json::from_slice(
        &std::fs::read(w.site(0).join("current/.cutover-release.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["id"], v1.as_str());
    assert_eq!(meta["artifact_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        std::fs::read_link(w.site(1).join("current")).unwrap(),
        Path::new("releases").join(&v1)
    );

    let v2 = w.deploy_ok("v2");
    assert!(v2 > v1, "release ids sort by time");
    w.assert_all_serve("v2");

    let h = w.history();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["id"], v2.as_str());
    assert_eq!(h[0]["status"], "succeeded");
    assert_eq!(h[0]["live"], true);
    assert_eq!(h[1]["live"], false);
    assert_eq!(h[0]["hosts"].as_object().unwrap().len(), 3);
    assert!(h[0]["hosts"]
        .as_object()
        .unwrap()
        .values()
        .all(|o| o == "healthy"));
    assert!(h[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(h[0]["artifact_sha256"].as_str().unwrap().len(), 64);
    assert!(h[0].get("commit").is_some());

    let out = w.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    for hs in s["hosts"].as_array().unwrap() {
        assert_eq!(hs["reachable"], true);
        assert_eq!(hs["release"], v2.as_str());
    }

    // Drift: one host switched behind cutover's back.
    std::fs::remove_file(w.site(2).join("current")).unwrap();
    std::os::unix::fs::symlink(Path::new("releases").join(&v1), w.site(2).join("current")).unwrap();
    let out = w.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "drift is exit 3");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!s["drift"].as_array().unwrap().is_empty());

    let out = w.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn zero_failed_requests_during_20_deploys_and_rollbacks() {
    let w = World::new(3);
    w.deploy_ok("v0");
    let targets: Vec<_> = (0..3).map(|i| w.lab.http_addr(i)).collect();
    let keep_alive = Load::start(LoadOptions {
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
    }
    let ka = keep_alive.stop();
    let fr = fresh.stop();
    eprintln!(
        "keep-alive: {} ok, {} failed, longest {:?}, bodies {:?}",
        ka.ok, ka.failed, ka.max_latency, ka.bodies
    );
    eprintln!(
        "fresh: {} ok, {} failed, longest {:?}",
        fr.ok, fr.failed, fr.max_latency
    );
    ka.assert_no_failures();
    fr.assert_no_failures();
    assert!(ka.ok > 100 && fr.ok > 100, "the load really ran");
    assert!(
        ka.bodies.len() >= 5,
        "the load saw the switches: {:?}",
        ka.bodies
    );
    w.assert_all_serve("v0");
}

#[test]
fn broken_health_on_one_host_reverts_all_three() {
    let w = World::with(
        LabOptions {
            hosts: 3,
            ..LabOptions::default()
        },
        r#"reload = "if [ -e /srv/unhealthy-$(cat version) ]; then rm -f up; fi; echo reloaded $(cat version)""#,
    );
    let v1 = w.deploy_ok("v1");
    std::fs::write(w.lab.srv_dir(1).join("unhealthy-v2"), "").unwrap();
    let (code, v) = w.deploy(&w.build("v2"));
    assert_eq!(code, 1, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&w.lab.destination(1)),
        "names the unhealthy host: {msg}"
    );
    assert!(msg.contains("HTTP 404"), "says what the probe saw: {msg}");
    assert!(
        msg.contains("reloaded v2"),
        "shows the reload output: {msg}"
    );
    w.assert_all_serve("v1");
    let h = w.history();
    assert_eq!(h[0]["status"], "rolled_back");
    assert_eq!(h[0]["hosts"][w.lab.destination(1)], "unhealthy");
    assert_eq!(h[1]["id"], v1.as_str());
    assert_eq!(h[1]["live"], true);
}

#[test]
fn first_deploy_that_fails_its_gate_says_there_is_nothing_to_go_back_to() {
    let w = World::new(1);
    let d = w.build("v1");
    std::fs::remove_file(d.join("up")).unwrap();
    let (code, v) = w.deploy(&d);
    assert_eq!(code, 1);
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("no previous release"), "{msg}");
    assert!(msg.contains("deploy again"), "{msg}");
    assert_eq!(w.history()[0]["status"], "failed");
}

#[test]
fn unreachable_host_stops_the_deploy_before_any_switch() {
    let w = World::new(3);
    let v1 = w.deploy_ok("v1");
    w.lab.stop_sshd(2);
    let (code, v) = w.deploy(&w.build("v2"));
    assert_eq!(code, 1, "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains(&w.lab.destination(2)));
    w.assert_all_serve("v1");
    for i in 0..2 {
        assert_eq!(
            w.releases_on(i),
            vec![v1.clone()],
            "nothing was staged on host {i}"
        );
    }
    // A host that drops off the network (connect times out) is the same.
    w.lab.start_sshd(2);
    w.lab.set_link(1, false);
    let (code, v) = w.deploy(&w.build("v3"));
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["hosts"][w.lab.destination(1)]["outcome"], "unreachable");
    w.lab.set_link(1, true);
    w.assert_all_serve("v1");
    w.deploy_ok("v4");
    w.assert_all_serve("v4");
}

#[test]
fn rollback_warm_and_reshipped_after_prune() {
    let w = World::with(
        LabOptions {
            hosts: 2,
            ..LabOptions::default()
        },
        "keep = 1",
    );
    let v1 = w.deploy_ok("v1");
    let v2 = w.deploy_ok("v2");
    // Warm: v1 is still on the hosts (it is the rollback target, never pruned).
    let out = w.run(&["rollback", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let o: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(o["release"], v1.as_str());
    for h in o["hosts"].as_object().unwrap().values() {
        assert_eq!(h["uploaded_bytes"], 0, "a warm rollback uploads nothing");
    }
    w.assert_all_serve("v1");
    let h = w.history();
    let v2_row = h.iter().find(|r| r["id"] == v2.as_str()).unwrap();
    assert_eq!(v2_row["bad"], true);

    // With keep = 1, v1 is pruned once newer releases succeed.
    let _v3 = w.deploy_ok("v3");
    let _v4 = w.deploy_ok("v4");
    for i in 0..2 {
        assert!(
            !w.releases_on(i).contains(&v1),
            "v1 pruned on host {i}: {:?}",
            w.releases_on(i)
        );
        assert!(
            w.releases_on(i).len() <= 2,
            "keep=1 plus the rollback target: {:?}",
            w.releases_on(i)
        );
    }
    // Cold: re-shipped from the artifact store.
    let out = w.run(&["rollback", "--json", "--to", &v1]);
    assert_eq!(out.status.code(), Some(0));
    let o: Value = serde_json::from_slice(&out.stdout).unwrap();
    for h in o["hosts"].as_object().unwrap().values() {
        assert!(h["uploaded_bytes"].as_u64().unwrap() > 0, "re-shipped");
    }
    w.assert_all_serve("v1");
}

#[test]
fn hostile_tarballs_are_refused_and_nothing_changes() {
    let w = World::with(
        LabOptions {
            hosts: 1,
            ..LabOptions::default()
        },
        "max_entries = 50\nmax_unpacked_bytes = 1000000",
    );
    let v1 = w.deploy_ok("v1");
    let before = w.history().len();
    let mut kinds = Hostile::all_basic();
    kinds.push(Hostile::TooManyEntries(60));
    kinds.push(Hostile::TooLarge(1_000_100));
    for kind in kinds {
        let path = w.dir.join(format!("{}.tar.gz", kind.name()));
        write_hostile(&kind, &path);
        let out = w.run(&["deploy", "--artifact", path.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{} must be refused",
            kind.name()
        );
        let err = stderr(&out);
        let named = match kind {
            Hostile::TooManyEntries(_) => err.contains("max_entries"),
            Hostile::TooLarge(_) => err.contains("max_unpacked_bytes"),
            _ => err.contains(kind.entry().trim_start_matches("./")),
        };
        assert!(named, "{}: the error names the problem: {err}", kind.name());
        assert_eq!(
            w.releases_on(0),
            vec![v1.clone()],
            "{}: nothing staged",
            kind.name()
        );
        assert_eq!(w.current(0).as_deref(), Some(v1.as_str()));
        assert!(!Path::new("/etc/cron.d/cutover-pwned").exists());
    }
    assert_eq!(
        w.history().len(),
        before,
        "refused artifacts leave no trace in the history"
    );
    w.assert_all_serve("v1");
}

#[test]
fn metacharacters_in_config_values_never_change_the_command() {
    let canary = std::env::temp_dir().join(format!("cutover-canary-{}", std::process::id()));
    let _ = std::fs::remove_file(&canary);
    let w = World::new(2);
    // nginx (and so the health check) serves /srv/site/current: point it at a static page.
    for i in 0..2 {
        let s = w.site(i);
        std::fs::create_dir_all(s.join("static")).unwrap();
        std::fs::write(s.join("static/up"), "ok").unwrap();
        std::os::unix::fs::symlink("static", s.join("current")).unwrap();
    }
    let root = format!(
        "/srv/it's $(touch {c}); `touch {c}` a b\\n",
        c = canary.display()
    );
    let reload = r#"printf '%s|' "it's" '$(x)' "a;b" > reload.out; echo done"#;
    w.write_config(&root, &format!("reload = {reload:?}"), "");
    let d = w.build("meta");
    std::fs::write(d.join("it's $(touch x); a b.html"), "weird name").unwrap();
    let (code, v) = w.deploy(&d);
    assert_eq!(code, 0, "{v}");
    for i in 0..2 {
        let host_root = w.lab.srv_dir(i).join(root.trim_start_matches("/srv/"));
        let cur = host_root.join("current");
        assert_eq!(
            std::fs::read_to_string(cur.join("version")).unwrap(),
            "meta"
        );
        assert_eq!(
            std::fs::read_to_string(cur.join("it's $(touch x); a b.html")).unwrap(),
            "weird name"
        );
        assert_eq!(
            std::fs::read_to_string(cur.join("reload.out")).unwrap(),
            "it's|$(x)|a;b|"
        );
    }
    assert!(!canary.exists(), "a value was run as a command");
    // A host entry that tries to smuggle an ssh option is refused before anything runs.
    let text = std::fs::read_to_string(&w.config).unwrap().replacen(
        "hosts = [",
        "hosts = [\"-oProxyCommand=touch /tmp/x\", ",
        1,
    );
    std::fs::write(&w.config, text).unwrap();
    let out = w.run(&["deploy", "--artifact", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("hosts[0]"));
}

#[test]
fn unknown_and_changed_host_keys_are_refused() {
    let w = World::new(2);
    let v1 = w.deploy_ok("v1");
    // Unknown: a known_hosts without host 1.
    let partial = w.dir.join("known_hosts_partial");
    std::fs::write(&partial, format!("{}\n", w.lab.host_public_key_line(0))).unwrap();
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        cfg.replace(
            &format!("{:?}", w.lab.known_hosts()),
            &format!("{partial:?}"),
        ),
    )
    .unwrap();
    let (code, v) = w.deploy(&w.build("v2"));
    assert_eq!(code, 1);
    let detail = v["hosts"][w.lab.destination(1)]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("not known") && detail.contains("SHA256:"),
        "{detail}"
    );
    let out = w.run(&["check"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not known"));
    std::fs::write(&w.config, cfg).unwrap();
    // Changed: host 0 gets a new key.
    w.lab.change_host_key(0);
    let (code, v) = w.deploy(&w.build("v2"));
    assert_eq!(code, 1);
    let detail = v["hosts"][w.lab.destination(0)]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("CHANGED") && detail.contains("SHA256:"),
        "{detail}"
    );
    for i in 0..2 {
        assert_eq!(w.releases_on(i), vec![v1.clone()]);
    }
    w.assert_all_serve("v1");
}

#[test]
fn a_concurrent_deploy_gets_exit_4_naming_the_holder() {
    let w = World::with(
        LabOptions {
            hosts: 1,
            ..LabOptions::default()
        },
        r#"reload = "sleep 3""#,
    );
    w.deploy_ok("v1");
    let build = w.build("v2");
    let mut first = w
        .cmd(&["deploy", "--artifact", build.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = w.run(&["deploy", "--artifact", w.build("v3").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pid {}", first.id())) && err.contains("since"),
        "{err}"
    );
    assert_eq!(first.wait().unwrap().code(), Some(0));
    w.assert_all_serve("v2");
}

/// kill -9 at every step of the protocol, then a normal run: every host always serves a
/// complete release, the interrupted release is marked, `.partial` dirs are cleaned.
#[test]
fn kill_9_at_every_step_then_a_successful_run() {
    let w = World::with(
        LabOptions {
            hosts: 2,
            ..LabOptions::default()
        },
        r#"reload = "if [ -e /srv/unhealthy-$(cat version) ]; then rm -f up; fi""#,
    );
    w.deploy_ok("base");
    let points = [
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
    for (k, point) in points.iter().enumerate() {
        let name = format!("crash{k}");
        let d = w.build(&name);
        // Big enough that the upload is really cut in the middle.
        let noise: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(d.join("noise.bin"), noise).unwrap();
        if point.contains("revert") {
            for i in 0..2 {
                std::fs::write(w.lab.srv_dir(i).join(format!("unhealthy-{name}")), "").unwrap();
            }
        }
        let out = w
            .cmd(&["deploy", "--artifact", d.to_str().unwrap()])
            .env("CUTOVER_CRASH_AT", point)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: killed: {}",
            stderr(&out)
        );
        for i in 0..2 {
            w.assert_complete(i);
            let page = w.served(i);
            assert!(
                !page.starts_with("HTTP") && !page.starts_with("ERROR"),
                "{point}: host {i} serves {page}"
            );
        }
        let next = format!("after-{k}");
        let (code, v) = w.deploy(&w.build(&next));
        assert_eq!(code, 0, "{point}: the next run succeeds: {v}");
        w.assert_all_serve(&next);
        for i in 0..2 {
            assert!(
                w.releases_on(i).iter().all(|r| !r.ends_with(".partial")),
                "{point}: partial dirs cleaned"
            );
        }
        let h = w.history();
        let crashed = &h[1];
        let status = crashed["status"].as_str().unwrap();
        assert!(
            ["failed", "partial", "rolled_back", "succeeded"].contains(&status),
            "{point}: crashed release marked, got {status}"
        );
        assert_ne!(status, "running");
    }
}

#[test]
fn a_full_disk_fails_the_stage_and_loses_nothing() {
    let w = World::with(
        LabOptions {
            hosts: 1,
            srv_tmpfs_bytes: Some(4 << 20),
            ..LabOptions::default()
        },
        "",
    );
    let v1 = w.deploy_ok("v1");
    let d = w.build("big");
    let noise: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(d.join("noise.bin"), noise).unwrap();
    let (code, v) = w.deploy(&d);
    assert_eq!(code, 1, "{v}");
    assert!(v["message"].as_str().unwrap().contains("disk full"), "{v}");
    assert_eq!(
        w.releases_on(0),
        vec![v1.clone()],
        "the partial directory was removed"
    );
    w.assert_all_serve("v1");
    w.deploy_ok("v2");
}

#[test]
fn malformed_config_is_exit_2_naming_file_and_key() {
    let dir = std::env::temp_dir().join(format!("cutover-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cutover.toml");
    for (text, want) in [
        ("app = \"x\"\nhosts = [\"local\"]\n[files]\nroot = \"relative\"\n[health]\nurl = \"http://127.0.0.1/\"\n", "files.root"),
        ("app = \"x\"\nhosts = [\"local\"]\nbogus = 1\n", "unknown field `bogus`"),
        ("app = \"x\"\nhosts = [\"local\"]\n[files]\nroot = \"/srv/x\"\n[health]\nurl = \"http://127.0.0.1/\"\ninterval = \"5\"\n", "health.interval"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["deploy", "--artifact", "/nonexistent", "-c"])
            .arg(&cfg)
            .arg("--data")
            .arg(dir.join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains("cutover.toml") && err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_runs_the_whole_story() {
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", stderr(&out));
    assert!(
        stdout.contains("now says: cutover demo v2\n\n== deploy v3"),
        "{stdout}"
    );
    assert!(stdout.trim_end().contains("rolled_back"), "{stdout}");
    let after_rollback = stdout.split("== rollback").nth(1).unwrap();
    assert!(
        after_rollback.contains("now says: cutover demo v1"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_host() {
    let w = World::new(2);
    let out = w.run(&["check"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("config") && text.contains("ok"), "{text}");
    for i in 0..2 {
        let row = text
            .lines()
            .find(|l| l.starts_with(&w.lab.destination(i)))
            .unwrap();
        assert_eq!(
            row.split_whitespace().filter(|c| *c == "yes").count(),
            5,
            "{row}"
        );
    }
    // A lock left on host 0 by someone else, and host 1 down.
    std::fs::create_dir_all(w.site(0).join(".cutover/lock")).unwrap();
    std::fs::write(
        w.site(0).join(".cutover/lock/holder"),
        r#"{"user":"alice","machine":"laptop","pid":42,"pid_start":1,"since":"2026-01-01T00:00:00Z","op":"deploy"}"#,
    )
    .unwrap();
    w.lab.stop_sshd(1);
    let out = w.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("locked by alice@laptop pid 42 (deploy) since 2026-01-01T00:00:00Z"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}: unreachable", w.lab.destination(1))),
        "{text}"
    );
    // And a deploy refuses with exit 4, naming that holder.
    w.lab.start_sshd(1);
    let out = w.run(&["deploy", "--artifact", w.build("v1").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("alice@laptop pid 42"));
    for i in 0..2 {
        assert!(w.releases_on(i).is_empty(), "nothing staged on host {i}");
        assert!(
            !w.site(1).join(".cutover/lock").exists(),
            "host 1's lock was released"
        );
    }
}

/// Pseudo-random bytes that gzip cannot shrink (splitmix64).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every entry under `dir` except cutover's own release metadata: path -> what it is.
fn tree_of(dir: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".cutover-release.json" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("link {}", t.display()));
            } else if m.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                let body = std::fs::read(&p).unwrap();
                let exec = m.permissions().mode() & 0o111 != 0;
                out.insert(
                    rel,
                    format!("file exec={exec} {} {:x}", body.len(), hash(&body)),
                );
            }
        }
    }
    fn hash(b: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        b.hash(&mut h);
        h.finish()
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn a_redeploy_sends_only_what_changed_and_each_release_stays_whole() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new(2);
    // v1: 40 files of 64 KiB that do not compress, in two directories, plus a symlink.
    let d = w.build("v1");
    for k in 0..40 {
        let sub = d.join(if k % 2 == 0 { "a" } else { "b/c" });
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{k}.bin")), noise(k, 64 << 10)).unwrap();
    }
    std::os::unix::fs::symlink("a/f0.bin", d.join("latest")).unwrap();
    let (code, first) = w.deploy(&d);
    assert_eq!(code, 0, "{first}");
    let v1 = first["release"].as_str().unwrap().to_string();
    let full = first["hosts"][w.lab.destination(0)]["uploaded_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        full > 40 * (64 << 10),
        "the first deploy sends everything: {full}"
    );
    let v1_tree = tree_of(&d);

    // v2: one file changed, one removed, one added, one made executable, the symlink moved,
    // and the page changed.
    std::fs::write(d.join("index.html"), "v2\n").unwrap();
    std::fs::write(d.join("version"), "v2").unwrap();
    std::fs::write(d.join("a/f2.bin"), noise(1000, 64 << 10)).unwrap();
    std::fs::remove_file(d.join("b/c/f3.bin")).unwrap();
    std::fs::write(d.join("b/new.bin"), noise(2000, 64 << 10)).unwrap();
    std::fs::set_permissions(d.join("a/f4.bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(d.join("latest")).unwrap();
    std::os::unix::fs::symlink("b/new.bin", d.join("latest")).unwrap();
    let (code, second) = w.deploy(&d);
    assert_eq!(code, 0, "{second}");
    let v2 = second["release"].as_str().unwrap().to_string();
    for (host, h) in second["hosts"].as_object().unwrap() {
        let sent = h["uploaded_bytes"].as_u64().unwrap();
        // Two 64 KiB files changed (changed + added; the chmod is a header), not 40.
        assert!(
            sent < 4 * (64 << 10) && sent < full / 8,
            "{host}: a 1-file change sent {sent} of {full} bytes"
        );
    }
    w.assert_all_serve("v2");
    let v2_tree = tree_of(&d);
    for i in 0..2 {
        let rel = w.site(i).join("releases");
        assert_eq!(
            tree_of(&rel.join(&v2)),
            v2_tree,
            "host {i}: v2 is exactly the artifact"
        );
        assert_eq!(
            tree_of(&rel.join(&v1)),
            v1_tree,
            "host {i}: v1 is untouched"
        );
        assert_eq!(
            inode(&rel.join(&v1).join("a/f6.bin")),
            inode(&rel.join(&v2).join("a/f6.bin")),
            "host {i}: an unchanged file is a hard link, not a copy"
        );
        assert_ne!(
            inode(&rel.join(&v1).join("a/f4.bin")),
            inode(&rel.join(&v2).join("a/f4.bin")),
            "host {i}: a file whose mode changed is a new file, so v1 keeps its mode"
        );
    }

    // Rolling back serves v1 exactly again.
    let out = w.run(&["rollback", "--json", "--to", &v1]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    w.assert_all_serve("v1");

    // A release modified on a host (a file of v1 removed there) cannot be a base: that
    // host gets the whole artifact, the other a delta, and both end up exact.
    std::fs::remove_file(w.site(0).join("releases").join(&v1).join("a/f8.bin")).unwrap();
    std::fs::write(d.join("index.html"), "v3\n").unwrap();
    std::fs::write(d.join("version"), "v3").unwrap();
    let (code, third) = w.deploy(&d);
    assert_eq!(code, 0, "{third}");
    let v3 = third["release"].as_str().unwrap().to_string();
    let sent = |i: usize| {
        third["hosts"][w.lab.destination(i)]["uploaded_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        sent(0) > full / 2,
        "host 0 fell back to the whole artifact: {}",
        sent(0)
    );
    assert!(sent(1) < full / 8, "host 1 got a delta: {}", sent(1));
    w.assert_all_serve("v3");
    let v3_tree = tree_of(&d);
    for i in 0..2 {
        assert_eq!(
            tree_of(&w.site(i).join("releases").join(&v3)),
            v3_tree,
            "host {i}"
        );
    }
}

//! End-to-end checks of Docker hosts (`LabOptions::docker`): a dockerd per
//! host, the lab's registry, images built locally from busybox, and a
//! teardown that leaves nothing behind. Needs root and Debian's docker.io,
//! docker-registry and busybox-static.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use testlab::{Lab, LabOptions};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout={} stderr={}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn docker_lab(hosts: usize) -> Lab {
    Lab::start_with(LabOptions {
        hosts,
        docker: true,
        ..LabOptions::default()
    })
}

/// What identifies a daemon (its ID is the same for all daemons of the
/// machine: it comes from /etc/docker/key.json; its root dir is not).
const WHO: &str = "{{.ID}} {{.DockerRootDir}} {{.Driver}}";

/// Identity of the machine's own Docker daemon, if one runs.
fn root_daemon_id() -> Option<String> {
    let out = Command::new("docker")
        .args(["-H", "unix:///run/docker.sock", "info", "--format", WHO])
        .env_remove("DOCKER_CONTEXT")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| text(&out.stdout).trim().to_string())
}

/// `GET /` on `addr` (a lab host's address), the whole response.
fn http_get(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r)
}

/// Cgroups of lab `num`'s containers, in any hierarchy.
fn lab_cgroups(num: u8) -> Vec<String> {
    let prefix = format!("testlab-{num}-h");
    let mut found = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    for e in fs::read_dir(base).unwrap().flatten() {
        if e.path().is_dir() {
            roots.push(e.path());
        }
    }
    for r in roots {
        for e in fs::read_dir(&r).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X") | None)
    })
}

/// Everything of lab `num` (dir `dir`) is gone, and so are `pids`.
fn assert_nothing_left(num: u8, dir: &str, hosts: usize, pids: &[u32]) {
    let ps = text(
        &Command::new("ps")
            .args(["-eo", "pid,args"])
            .output()
            .unwrap()
            .stdout,
    );
    let left: Vec<&str> = ps.lines().filter(|l| l.contains(dir)).collect();
    assert!(left.is_empty(), "processes left: {left:#?}");
    for &p in pids {
        assert!(!pid_alive(p), "pid {p} still runs");
    }
    assert!(
        lab_cgroups(num).is_empty(),
        "cgroups left: {:?}",
        lab_cgroups(num)
    );
    for i in 0..hosts {
        assert!(!Path::new(&format!("/var/run/netns/tl{num}h{i}")).exists());
        assert!(!Path::new(&format!("/sys/class/net/tl{num}h{i}a")).exists());
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir), "mounts left under {dir}");
    if std::env::var("TESTLAB_KEEP").as_deref() != Ok("1") {
        assert!(!Path::new(dir).exists(), "{dir} left");
    }
    assert!(!Path::new(&format!("/tmp/testlab-claims/{num}")).exists());
    // No listener is left on the registry's address. (Not probed with a
    // connect: with the lab gone, 10.201.X.1 is routed off the machine.)
    let ss = text(&Command::new("ss").args(["-Hltn"]).output().unwrap().stdout);
    let reg = format!("10.201.{num}.1:5000");
    assert!(!ss.contains(&reg), "{ss}");
    // The hosts' dockerds had their iptables rules in their own netns.
    for tool in ["iptables-save", "iptables-legacy-save"] {
        if let Ok(out) = Command::new(tool).output() {
            let rules = text(&out.stdout);
            for i in 0..hosts {
                let bridge = format!("10.{}.{num}.", 64 + i);
                assert!(!rules.contains(&bridge), "{tool}: rules for {bridge}");
            }
        }
    }
}

#[test]
fn docker_hosts_pull_from_the_lab_registry_and_run() {
    let root_before = root_daemon_id();

    let t = Instant::now();
    let lab = docker_lab(2);
    eprintln!("Lab::start(2, docker) took {:?}", t.elapsed());
    let num = lab.number();
    let dir = lab.dir().display().to_string();
    let reg = lab.registry().expect("registry");
    assert_eq!(reg, format!("10.201.{num}.1:5000"));

    // Build and push.
    let t = Instant::now();
    let web = lab.build_web_image("web:v1", "hello from v1", true);
    eprintln!("build_web_image (import + push) took {:?}", t.elapsed());
    assert_eq!(web, format!("{reg}/web:v1"));
    let digest = lab.image_digest(&web);
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(lab.host_image_digest(0, &web), Some(digest.clone()));
    assert_eq!(lab.host_image_digest(1, &web), None);

    // Host 1 pulls it from the registry over its own network, runs it and
    // publishes it on its loopback; all through a real SSH session.
    let t = Instant::now();
    let out = lab.ssh(
        1,
        &format!(
            "set -e; docker pull -q {web} >/dev/null; \
             docker run -d --name web -p 127.0.0.1:18080:8080 {web} >/dev/null; \
             for i in $(seq 1 50); do busybox wget -qO- http://127.0.0.1:18080/ && break; sleep 0.1; done; \
             echo; busybox wget -qO- http://127.0.0.1:18080/up"
        ),
    );
    eprintln!("pull + run + answer over ssh took {:?}", t.elapsed());
    let said = assert_ok(&out, "pull and run on host 1");
    assert!(said.contains("hello from v1"), "{said}");
    assert!(said.contains("ok"), "{said}");
    assert_eq!(lab.host_image_digest(1, &web), Some(digest.clone()));

    // Each host has its own daemon; the machine's is not involved.
    let id0 = assert_ok(&lab.docker(0, &["info", "--format", WHO]), "info 0");
    let id1 = assert_ok(
        &lab.exec(1, &format!("docker info --format '{WHO}'")),
        "info 1",
    );
    assert_ne!(id0.trim(), id1.trim());
    assert!(id1.contains(&format!("{dir}/h1/")), "{id1}");
    let cid = assert_ok(
        &lab.docker(1, &["inspect", "-f", "{{.Id}}", "web"]),
        "inspect",
    );
    let on0 = assert_ok(&lab.docker(0, &["ps", "-aq", "--no-trunc"]), "ps 0");
    assert!(!on0.contains(cid.trim()));
    if let Some(root) = &root_before {
        assert_ne!(root, id1.trim());
        assert_eq!(root_daemon_id().as_ref(), Some(root));
        let out = Command::new("docker")
            .args(["-H", "unix:///run/docker.sock", "ps", "-aq", "--no-trunc"])
            .output()
            .unwrap();
        assert!(!text(&out.stdout).contains(cid.trim()));
    }

    // An unhealthy web image answers / but not /up.
    let sick = lab.build_web_image("web:sick", "sick body", false);
    let out = lab.ssh(
        0,
        &format!(
            "docker run -d --name sick -p 127.0.0.1:18081:8080 {sick} >/dev/null || exit 9; \
             for i in $(seq 1 50); do busybox wget -qO- http://127.0.0.1:18081/ && break; sleep 0.1; done; \
             echo; busybox wget -qO- http://127.0.0.1:18081/up 2>&1; echo rc=$?"
        ),
    );
    let said = assert_ok(&out, "sick image");
    assert!(said.contains("sick body"), "{said}");
    assert!(said.contains("404"), "{said}");
    assert!(!said.contains("rc=0"), "{said}");

    // A port published on all addresses is reachable from the root
    // namespace at the host's address (DNAT inside the host's netns).
    assert_ok(
        &lab.docker(0, &["run", "-d", "--name", "pub", "-p", "18082:8080", &web]),
        "run pub",
    );
    let addr = std::net::SocketAddr::new(lab.ip(0).into(), 18082);
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match http_get(addr) {
            Some(b) if b.contains("hello from v1") => break b,
            other if Instant::now() > deadline => panic!("{addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    // The crashing image exits at start (pulled implicitly by `run`).
    let crash = lab.build_crashing_image("crash");
    assert_eq!(crash, format!("{reg}/crash:latest"));
    let out = lab.ssh(
        1,
        &format!(
            "docker run --name crash {crash}; echo rc=$?; \
             docker inspect -f '{{{{.State.Status}}}} {{{{.State.ExitCode}}}}' crash"
        ),
    );
    let said = text(&out.stdout);
    assert!(said.contains("rc=3"), "{said} {}", text(&out.stderr));
    assert!(said.contains("exited 3"), "{said}");
    assert!(text(&out.stderr).contains("crashes on purpose"));

    // `docker stop` is fast: the web image's PID 1 exits on SIGTERM.
    let t = Instant::now();
    assert_ok(&lab.docker(1, &["stop", "web"]), "stop");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Removing the image forces a new pull, which gives the same digest.
    assert_ok(&lab.docker(1, &["rm", "web"]), "rm");
    lab.remove_image_on_host(1, &web);
    lab.remove_image_on_host(1, &web); // no-op
    assert_eq!(lab.host_image_digest(1, &web), None);
    assert_ok(&lab.docker(1, &["pull", &web]), "pull again");
    assert_eq!(lab.host_image_digest(1, &web), Some(digest));

    // Leave running containers on both hosts for Drop to deal with.
    assert_ok(
        &lab.docker(1, &["run", "-d", "--name", "web2", &web]),
        "run web2",
    );
    let mut pids = Vec::new();
    for (i, name) in [(0, "sick"), (1, "web2")] {
        let pid = assert_ok(
            &lab.docker(i, &["inspect", "-f", "{{.State.Pid}}", name]),
            "pid",
        );
        pids.push(pid.trim().parse::<u32>().unwrap());
    }
    for i in 0..2 {
        let pidfile = fs::read_dir(lab.dir().join(format!("h{i}")))
            .unwrap()
            .flatten()
            .map(|e| e.path().join("docker.pid"))
            .find(|p| p.exists())
            .expect("dockerd pid file");
        pids.push(fs::read_to_string(pidfile).unwrap().trim().parse().unwrap());
    }
    assert!(pids.iter().all(|&p| pid_alive(p)));
    assert!(!lab_cgroups(num).is_empty());

    let t = Instant::now();
    drop(lab);
    eprintln!("drop took {:?}", t.elapsed());
    assert_nothing_left(num, &dir, 2, &pids);
    if let Some(root) = &root_before {
        assert_eq!(root_daemon_id().as_ref(), Some(root));
    }
}

#[test]
fn docker_requires_the_option() {
    let lab = Lab::start(1);
    assert_eq!(lab.registry(), None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lab.docker(0, &["ps"])));
    assert!(r.is_err());
}

#[test]
fn stale_docker_labs_are_reaped() {
    use std::io::{BufRead, BufReader};
    // A separate process that starts a lab and is then SIGKILLed, so no Drop runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_testlab-crash-child"))
        .arg("docker")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let (num, dir, pid) = loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "child ended early"
        );
        if let Some(rest) = line.strip_prefix("LAB ") {
            let v: Vec<&str> = rest.split_whitespace().collect();
            break (
                v[0].parse::<u8>().unwrap(),
                v[1].to_string(),
                v[2].parse::<u32>().unwrap(),
            );
        }
    };
    child.kill().unwrap(); // SIGKILL: no Drop runs
    child.wait().unwrap();
    assert!(pid_alive(pid));
    // Another test process may reap it first: only the outcome matters.
    testlab::reap_stale_labs();
    assert_nothing_left(num, &dir, 1, &[pid]);
}

#[test]
fn failed_docker_setup_reports_and_cleans_up() {
    let err = Lab::try_start_with(LabOptions {
        hosts: 2,
        docker: true,
        docker_storage_driver: Some("no-such-driver".into()),
        ..LabOptions::default()
    })
    .unwrap_err();
    eprintln!("{err}");
    assert!(err.contains("did not start"), "{err}");
    assert!(err.contains("no-such-driver"), "{err}");
    // Its number and dir are in the message's log paths.
    let dir = err
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/h0/dockerd.log:"))
        .unwrap_or_else(|| panic!("no log path in {err}"))
        .to_string();
    let num: u8 = dir
        .rsplit('/')
        .next()
        .and_then(|d| d.strip_prefix("testlab-"))
        .and_then(|d| d.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_nothing_left(num, &dir, 2, &[]);
}

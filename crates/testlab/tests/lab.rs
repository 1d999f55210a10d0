//! End-to-end checks of the lab (namespaces, sshd, nginx, failure knobs)
//! and of the load generator against the lab's nginx. Needs root.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use testlab::{Lab, LabOptions, Load, LoadOptions};

fn strict_ssh(lab: &Lab, i: usize, cmd: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(lab.identity())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            lab.known_hosts().display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
        ])
        .arg(lab.destination(i))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout={} stderr={}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Publishes a release `id` whose index.html says `body`, via ssh.
fn publish(lab: &Lab, i: usize, id: &str, body: &str) {
    let out = strict_ssh(
        lab,
        i,
        &format!(
            "set -e; mkdir -p /srv/site/releases/{id}; echo '{body}' > /srv/site/releases/{id}/index.html; \
             ln -sfn releases/{id} /srv/site/.tmp-current; mv -T /srv/site/.tmp-current /srv/site/current"
        ),
    );
    assert_ok(&out, "publish");
}

fn http_get(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

#[test]
fn hosts_are_isolated_and_reachable() {
    let t = Instant::now();
    let lab = Lab::start(2);
    eprintln!("Lab::start(2) took {:?}", t.elapsed());
    assert_eq!(lab.len(), 2);
    assert_ne!(lab.ip(0), lab.ip(1));
    for i in 0..2 {
        assert!(lab.srv_dir(i).join("site").is_dir());
        assert!(!lab.srv_dir(i).join("site/current").exists());
        assert!(lab
            .host_public_key_line(i)
            .starts_with(&format!("{} ssh-ed25519 AAAA", lab.ip(i))));
    }

    let out = strict_ssh(
        &lab,
        0,
        "echo hi > /srv/site/x; cat /proc/self/mountinfo | grep srv",
    );
    assert_ok(&out, "ssh to host 0");
    assert!(
        text(&out.stdout).contains(" /srv "),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        fs::read_to_string(lab.srv_dir(0).join("site/x")).unwrap(),
        "hi\n"
    );
    assert!(!lab.srv_dir(1).join("site/x").exists());
    assert!(!Path::new("/srv/site/x").exists());

    // exec sees the same /srv as ssh sessions.
    let out = lab.exec(0, "cat /srv/site/x; ip -o -4 addr show");
    assert_ok(&out, "exec");
    let s = text(&out.stdout);
    assert!(s.starts_with("hi\n"), "{s}");
    assert!(s.contains(&lab.ip(0).to_string()), "{s}");

    // The helper form works too.
    assert_ok(&lab.ssh(1, "test ! -e /srv/site/x"), "lab.ssh");

    // This machine's /root/.bashrc is not the hosts': /dev/null stands in for it there.
    if Path::new("/root/.bashrc").is_file() {
        let out = lab.ssh(0, "stat -c %F /root/.bashrc");
        assert_ok(&out, "stat over ssh");
        assert_eq!(text(&out.stdout), "character special file\n");
    }

    // Before any release nginx has nothing to serve.
    assert!(http_get(lab.http_addr(0)).starts_with("HTTP/1.1 404"));
    for i in 0..2 {
        publish(&lab, i, "a", &format!("release a on host {i}"));
    }
    for i in 0..2 {
        let r = http_get(lab.http_addr(i));
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(&format!("release a on host {i}\n")), "{r}");
    }
    assert!(lab.site_dir(1).join("current/index.html").is_file());
    let t = Instant::now();
    drop(lab);
    eprintln!("dropping a 2-host lab took {:?}", t.elapsed());
}

#[test]
fn a_lab_may_let_its_hosts_source_this_machines_root_bashrc() {
    if !Path::new("/root/.bashrc").is_file() {
        eprintln!("skipped: this machine has no /root/.bashrc");
        return;
    }
    let lab = Lab::start_with(LabOptions {
        root_bashrc: true,
        ..LabOptions::default()
    });
    let out = lab.ssh(0, "stat -c %F /root/.bashrc");
    assert_ok(&out, "stat over ssh");
    assert_eq!(text(&out.stdout), "regular file\n");
}

#[test]
fn failure_knobs() {
    let lab = Lab::start(2);
    assert_ok(&strict_ssh(&lab, 0, "true"), "ssh before changes");

    // New host key: strict checking refuses, the other host is unaffected.
    let before = lab.host_public_key_line(0);
    lab.change_host_key(0);
    assert_ne!(before, lab.host_public_key_line(0));
    let out = strict_ssh(&lab, 0, "true");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        text(&out.stderr)
    );
    assert_ok(&strict_ssh(&lab, 1, "true"), "ssh to untouched host");

    // sshd stopped: refused; started again: works (host 1).
    lab.stop_sshd(1);
    let err = TcpStream::connect_timeout(&lab.ssh_addr(1), Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(!strict_ssh(&lab, 1, "true").status.success());
    lab.stop_sshd(1); // idempotent
    lab.start_sshd(1);
    lab.start_sshd(1); // idempotent
    assert_ok(&strict_ssh(&lab, 1, "true"), "ssh after restart");

    // Link down: connects time out (not refused, not unreachable).
    lab.set_link(1, false);
    let t = Instant::now();
    let err =
        TcpStream::connect_timeout(&lab.http_addr(1), Duration::from_millis(1500)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(t.elapsed() >= Duration::from_millis(1400));
    // Host 0 is unaffected.
    assert!(TcpStream::connect_timeout(&lab.http_addr(0), Duration::from_secs(2)).is_ok());
    lab.set_link(1, true);
    assert!(TcpStream::connect_timeout(&lab.http_addr(1), Duration::from_secs(2)).is_ok());
    assert_ok(&strict_ssh(&lab, 1, "true"), "ssh after link up");
}

#[test]
fn load_without_failures_in_both_modes() {
    let lab = Lab::start(2);
    for i in 0..2 {
        publish(&lab, i, "a", &format!("v1 host{i}\nsecond line"));
    }
    let targets = vec![lab.http_addr(0), lab.http_addr(1)];
    for keep_alive in [true, false] {
        let load = Load::start(LoadOptions {
            keep_alive,
            ..LoadOptions::new(targets.clone())
        });
        std::thread::sleep(Duration::from_secs(1));
        let report = load.stop();
        eprintln!("keep_alive={keep_alive}: {report}");
        report.assert_no_failures();
        assert_eq!(report.failed, 0);
        assert!(report.ok > 20, "{report}");
        assert_eq!(report.bodies.len(), 2, "{report}");
        assert!(report.bodies.contains_key("v1 host0"), "{report}");
        assert!(report.max_latency < Duration::from_secs(1), "{report}");
    }
}

#[test]
fn load_sees_switches_and_failures() {
    let lab = Lab::start(1);
    publish(&lab, 0, "a", "version a");
    let load = Load::start(LoadOptions::new(vec![lab.http_addr(0)]));
    assert!(load.wait_for_ok(10, Duration::from_secs(5)));
    publish(&lab, 0, "b", "version b");
    let base = load.ok_so_far();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && load.ok_so_far() < base + 100 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = load.stop();
    report.assert_no_failures();
    assert!(report.bodies.contains_key("version a"), "{report}");
    assert!(report.bodies.contains_key("version b"), "{report}");

    // Removing the site makes every request a 404 failure.
    assert_ok(&lab.exec(0, "rm /srv/site/current"), "rm current");
    let load = Load::start(LoadOptions::new(vec![lab.http_addr(0)]));
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(report.ok, 0, "{report}");
    assert!(report.failed > 0);
    assert!(report.failures[0].contains("HTTP 404"), "{report:?}");
    assert!(report.failures.len() <= 50);

    // A cut link: requests time out, and stop is still prompt.
    publish(&lab, 0, "c", "version c");
    lab.set_link(0, false);
    let load = Load::start(LoadOptions {
        timeout: Duration::from_millis(500),
        keep_alive: false,
        ..LoadOptions::new(vec![lab.http_addr(0)])
    });
    std::thread::sleep(Duration::from_millis(1300));
    let t = Instant::now();
    let report = load.stop();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(report.ok, 0, "{report}");
    assert!(report.failed >= 2, "{report}");
    assert!(report.failures[0].contains("timed out"), "{report:?}");
    lab.set_link(0, true);
}

#[test]
fn tmpfs_srv_fills_up() {
    let lab = Lab::start_with(LabOptions {
        hosts: 1,
        srv_tmpfs_bytes: Some(1 << 20),
        ..LabOptions::default()
    });
    let out = lab.exec(
        0,
        "df -k /srv | tail -1; head -c 2000000 /dev/zero > /srv/site/big",
    );
    assert!(!out.status.success(), "writing 2 MB into 1 MiB succeeded");
    assert!(
        text(&out.stderr).contains("No space left"),
        "{}",
        text(&out.stderr)
    );
    // The test sees the same filesystem.
    assert!(lab.srv_dir(0).join("site/big").exists());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mounts.contains(&lab.srv_dir(0).display().to_string()));
    let srv = lab.srv_dir(0);
    drop(lab);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&srv.display().to_string()));
    assert!(!srv.exists());
}

#[test]
fn drop_cleans_up() {
    let lab = Lab::start(1);
    let num = lab.number();
    let dir = lab.dir().to_path_buf();
    // A lingering session must not survive the lab.
    let mut child = Command::new("ssh")
        .args(lab.ssh_options())
        .arg(lab.destination(0))
        .arg("sleep 1000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(lab);
    if std::env::var("TESTLAB_KEEP").as_deref() != Ok("1") {
        assert!(!dir.exists());
    }
    assert!(!Path::new(&format!("/var/run/netns/tl{num}h0")).exists());
    assert!(!Path::new(&format!("/sys/class/net/tl{num}h0a")).exists());
    assert!(!Path::new(&format!("/tmp/testlab-claims/{num}")).exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn stale_labs_are_reaped() {
    use std::io::{BufRead, BufReader};
    // A separate process that starts a lab and is then SIGKILLed, so no Drop runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_testlab-crash-child"))
        .arg("plain")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let (num, dir) = loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "child ended early"
        );
        if let Some(rest) = line.strip_prefix("LAB ") {
            let (n, d) = rest.trim().split_once(' ').unwrap();
            break (n.parse::<u8>().unwrap(), d.to_string());
        }
    };
    child.kill().unwrap(); // SIGKILL: no Drop runs
    child.wait().unwrap();
    // Another test process may reap it first: only the outcome matters.
    testlab::reap_stale_labs();
    assert!(!Path::new(&format!("/var/run/netns/tl{num}h0")).exists());
    assert!(!Path::new(&format!("/sys/class/net/tl{num}h0a")).exists());
    assert!(!Path::new(&format!("/tmp/testlab-claims/{num}")).exists());
    assert!(!Path::new(&dir).exists());
    let out = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = text(&out.stdout);
    assert!(!ps.contains(&format!("{dir}/")), "{ps}");
}

#[test]
fn handles_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Lab>();
    assert_send_sync::<Load>();
    assert_send_sync::<testlab::LoadReport>();
}

#[test]
fn failed_setup_reports_and_cleans_up() {
    let err = Lab::try_start_with(LabOptions {
        hosts: 2,
        site_root: "/proc/no/such/site".into(),
        ..LabOptions::default()
    })
    .unwrap_err();
    assert!(
        err.contains("cannot create /proc/no/such/site on host 0"),
        "{err}"
    );
    assert!(Lab::try_start_with(LabOptions {
        hosts: 0,
        ..LabOptions::default()
    })
    .is_err());
}

/// Private memory (Pss, KiB) and open file descriptors of `pids`.
fn pss_and_fds(pids: &[u32]) -> (u64, usize) {
    let mut kib = 0;
    let mut fds = 0;
    for p in pids {
        if let Ok(s) = fs::read_to_string(format!("/proc/{p}/smaps_rollup")) {
            kib += s
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        fds += fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count());
    }
    (kib, fds)
}

#[test]
fn a_hundred_light_hosts_serve_their_current_and_go_away() {
    let t = Instant::now();
    let lab = Lab::start_with(LabOptions {
        hosts: 100,
        light: true,
        ..LabOptions::default()
    });
    let started = t.elapsed();
    let num = lab.number();
    // Past 63 hosts, the second address block.
    assert_eq!(lab.ip(0).to_string(), format!("10.201.{num}.2"));
    assert_eq!(lab.ip(62).to_string(), format!("10.201.{num}.250"));
    assert_eq!(lab.ip(63).to_string(), format!("10.202.{num}.2"));
    assert_eq!(lab.ip(99).to_string(), format!("10.202.{num}.146"));
    // The readiness check's connection left a short-lived `httpd -i` behind
    // it (one per connection, by design); wait for those to go so only the
    // standing processes are counted.
    let mut pids = lab.host_pids();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.len() > 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        pids = lab.host_pids();
    }
    let (kib, fds) = pss_and_fds(&pids);
    eprintln!(
        "100 light hosts: started in {started:?}, {} processes, {} MiB Pss, {fds} fds",
        pids.len(),
        kib / 1024
    );
    // sshd + listener + anchor per host, nothing else.
    assert_eq!(pids.len(), 300, "{pids:?}");

    // Every host over real SSH, ten at a time; each serves its own `current`,
    // switched atomically (the listener resolves `current` per connection).
    std::thread::scope(|s| {
        for k in 0..10 {
            let lab = &lab;
            s.spawn(move || {
                for i in (k..100).step_by(10) {
                    publish(lab, i, "r1", &format!("one-{i}"));
                    assert!(http_get(lab.http_addr(i)).ends_with(&format!("one-{i}\n")));
                    publish(lab, i, "r2", &format!("two-{i}"));
                    let r = http_get(lab.http_addr(i));
                    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
                    assert!(r.ends_with(&format!("two-{i}\n")), "host {i}: {r}");
                }
            });
        }
    });
    // Hosts do not see each other's /srv.
    assert_eq!(
        fs::read_to_string(lab.site_dir(99).join("current/index.html")).unwrap(),
        "two-99\n"
    );

    // A stopped sshd accepts the TCP connection and never answers.
    lab.signal_sshd(7, "STOP");
    let mut s = TcpStream::connect_timeout(&lab.ssh_addr(7), Duration::from_secs(2))
        .expect("the kernel still completes the handshake");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut banner = [0u8; 8];
    let r = std::io::Read::read(&mut s, &mut banner);
    assert!(r.is_err(), "no banner from a stopped sshd: {r:?}");
    lab.signal_sshd(7, "CONT");
    assert_ok(&strict_ssh(&lab, 7, "true"), "ssh after SIGCONT");

    let t = Instant::now();
    drop(lab);
    eprintln!("100 light hosts: stopped in {:?}", t.elapsed());
    for i in [0, 63, 99] {
        assert!(!Path::new(&format!("/var/run/netns/tl{num}h{i}")).exists());
        assert!(!Path::new(&format!("/sys/class/net/tl{num}h{i}a")).exists());
    }
    let routes = Command::new("ip").args(["route"]).output().unwrap();
    let routes = text(&routes.stdout);
    assert!(!routes.contains(&format!("10.202.{num}.")), "{routes}");
    assert!(!routes.contains(&format!("10.201.{num}.")), "{routes}");
}

//! File deploys against real hosts: network namespaces with their own sshd and nginx
//! (testlab), the real `cutover` binary, real load. Needs root.

use crate::world::{noise, World};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use testlab::hostile::{write_hostile, Hostile};

/// A reload that takes `up` away on a host that has `/srv/unhealthy-<version>`.
pub(crate) const UNHEALTHY_RELOAD: &str =
    r#""if [ -e /srv/unhealthy-$(cat version) ]; then rm -f up; fi; echo reloaded $(cat version)""#;

/// What nginx answers for a missing `/up`, with its version named.
fn nginx_404(text: &str) -> String {
    let Some(at) = text.find("nginx/") else {
        return text.to_string();
    };
    let end = text[at..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '/' || c == '.'))
        .map_or(text.len(), |e| at + e);
    format!("{}nginx/<version>{}", &text[..at], &text[end..])
}

#[test]
fn three_hosts_deploy_and_redeploy() {
    let w = World::files(3).start();
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

    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 0, "{}", r.json);
    let v2 = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&v2, "<v2>")]),
        "deployed <v2> on 3 host(s); every host passed its health gate"
    );
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

    let s = w.run(&["status", "--json"]);
    assert_eq!(s.code, 0);
    for hs in s.json["hosts"].as_array().unwrap() {
        assert_eq!(hs["reachable"], true);
        assert_eq!(hs["release"], v2.as_str());
    }

    // Drift: one host switched behind cutover's back.
    std::fs::remove_file(w.site(2).join("current")).unwrap();
    std::os::unix::fs::symlink(Path::new("releases").join(&v1), w.site(2).join("current")).unwrap();
    let s = w.run(&["status", "--json"]);
    assert_eq!(s.code, 3, "drift is exit 3");
    assert!(!s.json["drift"].as_array().unwrap().is_empty());

    let c = w.run(&["check"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
}

#[test]
fn zero_failed_requests_during_20_deploys_and_rollbacks() {
    let w = World::files(3).start();
    w.deploy_ok("v0");
    let load = w.load(None);
    for k in 1..=10 {
        w.deploy_ok(&format!("v{k}"));
        let r = w.run(&["rollback", "--json"]);
        assert_eq!(r.code, 0, "rollback {k}");
    }
    let (ka, fr) = load.stop("files");
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
    let w = World::files(3)
        .set("files", "reload", UNHEALTHY_RELOAD)
        .start();
    let v1 = w.deploy_ok("v1");
    std::fs::write(w.lab().srv_dir(1).join("unhealthy-v2"), "").unwrap();
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 1, "{}", r.json);
    let v2 = r.release();
    assert_eq!(
        nginx_404(&w.norm_with(r.message(), &[(&v1, "<v1>"), (&v2, "<v2>")])),
        "release <v2> failed its health gate:\n  \
         <host1>: http://127.0.0.1:<port>/up not healthy after <t>s (<n> probes, wanted 200 2 times in a row); \
         last answer: HTTP 404, body: \"<html>\\r\\n<head><title>404 Not Found</title></head>\\r\\n<body>\\r\\n<center><h1>404 Not Found</h1></center>\\r\\n<hr><center>nginx/<version></center>\\r\\n</body>\\r\\n</html>\"; \
         reload output: reloaded v2\n\
         Every host was switched back to <v1> and passed its health gate again."
    );
    w.assert_all_serve("v1");
    let h = w.history();
    assert_eq!(h[0]["status"], "rolled_back");
    assert_eq!(h[0]["hosts"][w.lab().destination(1)], "unhealthy");
    assert_eq!(h[1]["id"], v1.as_str());
    assert_eq!(h[1]["live"], true);
}

#[test]
fn first_deploy_that_fails_its_gate_says_there_is_nothing_to_go_back_to() {
    let w = World::files(1).start();
    let d = w.build("v1");
    std::fs::remove_file(d.join("up")).unwrap();
    let r = w.deploy_artifact(&d);
    assert_eq!(r.code, 1);
    let v1 = r.release();
    assert_eq!(
        nginx_404(&w.norm_with(r.message(), &[(&v1, "<v1>")])),
        "release <v1> failed its health gate and app `site` has no previous release to go back to \
         (this was its first deploy), so the hosts still serve <v1>:\n  \
         <host0>: http://127.0.0.1:<port>/up not healthy after <t>s (<n> probes, wanted 200 2 times in a row); \
         last answer: HTTP 404, body: \"<html>\\r\\n<head><title>404 Not Found</title></head>\\r\\n<body>\\r\\n<center><h1>404 Not Found</h1></center>\\r\\n<hr><center>nginx/<version></center>\\r\\n</body>\\r\\n</html>\"\n\
         Fix the app or the [health] settings and deploy again."
    );
    assert_eq!(w.history()[0]["status"], "failed");
    // Nor is there anything to roll back to.
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 2, "{}", r.json);
    assert_eq!(
        r.message(),
        "app `site` has no release before the live one that succeeded on every host and is not \
         marked bad; nothing to roll back to (see `cutover history`)"
    );
}

#[test]
fn unreachable_host_stops_the_deploy_before_any_switch() {
    let w = World::files(3).start();
    let v1 = w.deploy_ok("v1");
    w.lab().stop_sshd(2);
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 1, "{}", r.json);
    assert_eq!(
        w.norm(r.message()),
        "1 of 3 hosts could not be used, so no host was touched:\n  \
         <host2>: unreachable: ssh: connect to host <ip2> port 22: Connection refused"
    );
    w.assert_all_serve("v1");
    for i in 0..2 {
        assert_eq!(
            w.releases_on(i),
            vec![v1.clone()],
            "nothing was staged on host {i}"
        );
    }
    // A host that drops off the network (connect times out) is the same.
    w.lab().start_sshd(2);
    w.lab().set_link(1, false);
    let r = w.deploy_artifact(&w.build("v3"));
    assert_eq!(r.code, 1, "{}", r.json);
    assert_eq!(
        r.json["hosts"][w.lab().destination(1)]["outcome"],
        "unreachable"
    );
    assert_eq!(
        w.norm(r.message()),
        "1 of 3 hosts could not be used, so no host was touched:\n  \
         <host1>: unreachable: ssh: connect to host <ip1> port 22: Connection timed out"
    );
    w.lab().set_link(1, true);
    w.assert_all_serve("v1");
    w.deploy_ok("v4");
    w.assert_all_serve("v4");
}

#[test]
fn rollback_warm_and_reshipped_after_prune() {
    let w = World::files(2).set("files", "keep", "1").start();
    let v1 = w.deploy_ok("v1");
    let v2 = w.deploy_ok("v2");
    // Warm: v1 is still on the hosts (it is the rollback target, never pruned).
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.release(), v1);
    assert_eq!(
        w.norm_with(r.message(), &[(&v1, "<v1>")]),
        "rolled back to <v1> on 2 host(s); every host passed its health gate"
    );
    for h in r.json["hosts"].as_object().unwrap().values() {
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
    let r = w.run(&["rollback", "--json", "--to", &v1]);
    assert_eq!(r.code, 0);
    for h in r.json["hosts"].as_object().unwrap().values() {
        assert!(h["uploaded_bytes"].as_u64().unwrap() > 0, "re-shipped");
    }
    w.assert_all_serve("v1");
}

/// What `deploy` says of each hostile tarball, between `artifact refused: ` and
/// `. Nothing was touched.`.
const HOSTILE: [(&str, &str); 13] = [
    ("dot-dot", "../etc/passwd: path leaves the release ('..')"),
    ("absolute", "/etc/cron.d/cutover-pwned: path is absolute"),
    ("symlink-absolute", "link: symlink target /etc/shadow is absolute"),
    ("symlink-escapes", "assets/up: symlink target ../../etc resolves outside the release"),
    ("through-symlink", "web/evil.html: path goes through the symlink web (an earlier entry), so tar would write through it"),
    ("hard-link", "hard: hard link to /etc/shadow is not allowed (hard links can reach files outside the release)"),
    ("char-device", "zero: character device is not allowed"),
    ("block-device", "disk: block device is not allowed"),
    ("fifo", "pipe: FIFO (named pipe) is not allowed"),
    ("duplicate", "./index.html: duplicate entry: index.html appears earlier in the archive"),
    ("setuid", "bin/tool: setuid/setgid bits are not allowed (mode 4755)"),
    ("too-many-entries", "archive has more than 50 entries (limit max_entries)"),
    ("too-large", "archive unpacks to more than 1000000 bytes (limit max_unpacked_bytes)"),
];

#[test]
fn hostile_tarballs_are_refused_and_nothing_changes() {
    let w = World::files(1)
        .lines("files", "max_entries = 50\nmax_unpacked_bytes = 1000000")
        .start();
    let v1 = w.deploy_ok("v1");
    let before = w.history().len();
    let mut kinds = Hostile::all_basic();
    kinds.push(Hostile::TooManyEntries(60));
    kinds.push(Hostile::TooLarge(1_000_100));
    let mut said = Vec::new();
    for kind in kinds {
        let path = w.dir.join(format!("{}.tar.gz", kind.name()));
        write_hostile(&kind, &path);
        let r = w.run(&["deploy", "--artifact", path.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{} must be refused", kind.name());
        said.push((
            kind.name(),
            r.error()
                .strip_prefix("artifact refused: ")
                .and_then(|m| m.strip_suffix(". Nothing was touched."))
                .unwrap_or(r.error())
                .to_string(),
        ));
        assert_eq!(
            w.releases_on(0),
            vec![v1.clone()],
            "{}: nothing staged",
            kind.name()
        );
        assert_eq!(w.current(0).as_deref(), Some(v1.as_str()));
        assert!(!Path::new("/etc/cron.d/cutover-pwned").exists());
    }
    let want: Vec<(&str, String)> = HOSTILE.iter().map(|(k, m)| (*k, m.to_string())).collect();
    assert_eq!(said, want, "what is said of each hostile tarball");
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
    let w = World::files(2).start();
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
    w.configure(|t| {
        t.set_str("files", "root", &root)
            .set_str("files", "reload", reload);
    });
    let d = w.build("meta");
    std::fs::write(d.join("it's $(touch x); a b.html"), "weird name").unwrap();
    let r = w.deploy_artifact(&d);
    assert_eq!(r.code, 0, "{}", r.json);
    for i in 0..2 {
        let host_root = w.lab().srv_dir(i).join(root.trim_start_matches("/srv/"));
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
    w.configure(|t| {
        let hosts: Vec<String> = std::iter::once("-oProxyCommand=touch /tmp/x".to_string())
            .chain((0..2).map(|i| w.lab().destination(i)))
            .map(|h| format!("{h:?}"))
            .collect();
        t.set_str("files", "root", &root)
            .set_str("files", "reload", reload)
            .set("", "hosts", &format!("[{}]", hosts.join(", ")));
    });
    let r = w.run(&["deploy", "--artifact", d.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.error().contains("hosts[0]"), "{}", r.stderr);
}

/// Deploys `v2`, which must fail (exit 1), and returns what it says of host `i`.
fn refused_host_detail(w: &World, i: usize) -> String {
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 1, "{}", r.json);
    r.json["hosts"][w.lab().destination(i)]["detail"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn unknown_and_changed_host_keys_are_refused() {
    let w = World::files(2).start();
    let v1 = w.deploy_ok("v1");
    // Unknown: a known_hosts without host 1.
    let partial = w.dir.join("known_hosts_partial");
    std::fs::write(&partial, format!("{}\n", w.lab().host_public_key_line(0))).unwrap();
    w.configure(|t| {
        t.set_str("ssh", "known_hosts", partial.display().to_string());
    });
    let detail = refused_host_detail(&w, 1);
    assert!(
        detail.contains("not known") && detail.contains("SHA256:"),
        "{detail}"
    );
    let c = w.run(&["check"]);
    assert_ne!(c.code, 0);
    assert!(c.stdout.contains("not known"));
    w.configure(|_| {});
    // Changed: host 0 gets a new key.
    w.lab().change_host_key(0);
    let detail = refused_host_detail(&w, 0);
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
    let w = World::files(1)
        .set("files", "reload", r#""sleep 3""#)
        .start();
    w.deploy_ok("v1");
    let build = w.build("v2");
    let mut first = w
        .cutover(&["deploy", "--artifact", build.to_str().unwrap()])
        .spawn_quiet();
    std::thread::sleep(Duration::from_millis(1500));
    let r = w.run(&["deploy", "--artifact", w.build("v3").to_str().unwrap()]);
    assert_eq!(r.code, 4);
    let pid = first.id().to_string();
    let me = holder_name();
    assert_eq!(
        w.norm_with(r.error(), &[(&format!("pid {pid} "), "pid <first> "), (&me, "<me>")]),
        "another run of app `site` holds the lock: <me> pid <first> (deploy) since <time>. Wait for it to finish."
    );
    assert_eq!(first.wait().unwrap().code(), Some(0));
    w.assert_all_serve("v2");
}

/// `user@machine` as a lock holder on this machine is named: the user from `USER` (or
/// `LOGNAME`), the machine as `hostname/<first 8 of the machine id>`.
fn holder_name() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let id: String = read("/etc/machine-id").chars().take(8).collect();
    let host = read("/proc/sys/kernel/hostname");
    if id.is_empty() {
        format!("{user}@{host}")
    } else {
        format!("{user}@{host}/{id}")
    }
}

#[test]
fn a_full_disk_fails_the_stage_and_loses_nothing() {
    let w = World::files(1)
        .lab(|o| o.srv_tmpfs_bytes = Some(4 << 20))
        .start();
    let v1 = w.deploy_ok("v1");
    let d = w.build("big");
    std::fs::write(d.join("noise.bin"), noise(11, 6_000_000)).unwrap();
    let r = w.deploy_artifact(&d);
    assert_eq!(r.code, 1, "{}", r.json);
    assert!(r.message().contains("disk full"), "{}", r.json);
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
    let w = World::local().start();
    let mut said = Vec::new();
    let mut want = Vec::new();
    for (text, message) in [
        (
            "app = \"x\"\nhosts = [\"local\"]\n[files]\nroot = \"relative\"\n[health]\nurl = \"http://127.0.0.1/\"\n",
            "<dir>/cutover.toml: `files.root`: expected an absolute path on the hosts, got \"relative\"",
        ),
        (
            "app = \"x\"\nhosts = [\"local\"]\nbogus = 1\n",
            "<dir>/cutover.toml: unknown field `bogus`, expected one of `app`, `hosts`, `ssh`, `files`, `container`, `proxy`, `health`, `build`, `deploy`, `webhook`, `preview` (line 3, column 1)",
        ),
        (
            "app = \"x\"\nhosts = [\"local\"]\n[files]\nroot = \"/srv/x\"\n[health]\nurl = \"http://127.0.0.1/\"\ninterval = \"5\"\n",
            "<dir>/cutover.toml: `health.interval`: `5` has no unit: write e.g. \"5s\" or \"5ms\"",
        ),
    ] {
        std::fs::write(&w.config, text).unwrap();
        let r = w.run(&["deploy", "--artifact", "/nonexistent"]);
        assert_eq!(r.code, 2);
        said.push(w.norm(r.error()));
        want.push(message.to_string());
    }
    assert_eq!(said, want);
}

#[test]
fn demo_runs_the_whole_story() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let w = World::files(2).start();
    let c = w.run(&["check"]);
    assert_eq!(c.code, 0);
    assert!(
        c.stdout.contains("config") && c.stdout.contains("ok"),
        "{}",
        c.stdout
    );
    for i in 0..2 {
        let row = c
            .stdout
            .lines()
            .find(|l| l.starts_with(&w.lab().destination(i)))
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
    w.lab().stop_sshd(1);
    let c = w.run(&["check"]);
    assert_eq!(c.code, 1);
    assert!(
        c.stdout
            .contains("locked by alice@laptop pid 42 (deploy) since 2026-01-01T00:00:00Z"),
        "{}",
        c.stdout
    );
    assert!(
        c.stdout
            .contains(&format!("{}: unreachable", w.lab().destination(1))),
        "{}",
        c.stdout
    );
    // And a deploy refuses with exit 4, naming that holder.
    w.lab().start_sshd(1);
    let r = w.run(&["deploy", "--artifact", w.build("v1").to_str().unwrap()]);
    assert_eq!(r.code, 4);
    assert_eq!(
        w.norm(r.error()),
        "another deploy of app `site` holds the lock on:\n  \
         <host0>: alice@laptop pid <pid> (deploy) since <time>"
    );
    for i in 0..2 {
        assert!(w.releases_on(i).is_empty(), "nothing staged on host {i}");
        assert!(
            !w.site(1).join(".cutover/lock").exists(),
            "host 1's lock was released"
        );
    }
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
    let w = World::files(2).start();
    // v1: 40 files of 64 KiB that do not compress, in two directories, plus a symlink.
    let d = w.build("v1");
    for k in 0..40 {
        let sub = d.join(if k % 2 == 0 { "a" } else { "b/c" });
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{k}.bin")), noise(k, 64 << 10)).unwrap();
    }
    std::os::unix::fs::symlink("a/f0.bin", d.join("latest")).unwrap();
    let first = w.deploy_artifact(&d);
    assert_eq!(first.code, 0, "{}", first.json);
    let v1 = first.release();
    let full = first.json["hosts"][w.lab().destination(0)]["uploaded_bytes"]
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
    let second = w.deploy_artifact(&d);
    assert_eq!(second.code, 0, "{}", second.json);
    let v2 = second.release();
    for (host, h) in second.json["hosts"].as_object().unwrap() {
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
    let r = w.run(&["rollback", "--json", "--to", &v1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    w.assert_all_serve("v1");

    // A release modified on a host (a file of v1 removed there) cannot be a base: that
    // host gets the whole artifact, the other a delta, and both end up exact.
    std::fs::remove_file(w.site(0).join("releases").join(&v1).join("a/f8.bin")).unwrap();
    std::fs::write(d.join("index.html"), "v3\n").unwrap();
    std::fs::write(d.join("version"), "v3").unwrap();
    let third = w.deploy_artifact(&d);
    assert_eq!(third.code, 0, "{}", third.json);
    let v3 = third.release();
    let sent = |i: usize| {
        third.json["hosts"][w.lab().destination(i)]["uploaded_bytes"]
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

/// `[deploy] batches`: each batch switches and gates before the next starts, under load, and
/// a release that fails on a host of the second batch sends back only the hosts switched so
/// far: the last batch never switched.
#[test]
fn batches_roll_out_in_order_under_load_and_a_failure_stops_the_rollout() {
    let w = World::files(4)
        .lines("deploy", "batches = [1, \"50%\", \"100%\"]")
        .set("files", "reload", UNHEALTHY_RELOAD)
        .start();
    w.deploy_ok("v1");
    let load = w.load(None);
    let v2 = w.build("v2");
    let r = w.run(&["deploy", "--events", "--artifact", v2.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let batches: Vec<(String, String)> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["step"] == "batch")
        .map(|e| {
            let d = w.norm(e["detail"].as_str().unwrap());
            (e["state"].as_str().unwrap().to_string(), d)
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("start", "batch 1 of 3: <host0>"),
        ("done", "batch 1 of 3: <host0>"),
        ("start", "batch 2 of 3: <host1>"),
        ("done", "batch 2 of 3: <host1>"),
        ("start", "batch 3 of 3: <host2>, <host3>"),
        ("done", "batch 3 of 3: <host2>, <host3>"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(batches, want);
    w.assert_all_serve("v2");
    let (ka, fr) = load.stop("batches");
    ka.assert_no_failures();
    fr.assert_no_failures();
    assert!(ka.ok > 20 && fr.ok > 20, "the load really ran");
    // v3 fails on host 1 (batch 2): hosts 0 and 1 go back, hosts 2 and 3 never switch.
    std::fs::write(w.lab().srv_dir(1).join("unhealthy-v3"), "").unwrap();
    let r = w.deploy_artifact(&w.build("v3"));
    assert_eq!(r.code, 1, "{}", r.json);
    w.assert_all_serve("v2");
    let hosts = &r.json["hosts"];
    let states: Vec<&str> = (0..4)
        .map(|i| hosts[w.lab().destination(i)]["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["reverted", "unhealthy", "staged", "staged"]);
    assert_eq!(w.history()[0]["status"], "rolled_back");
}

/// `[deploy] bake`: a release that passes its gate and then stops answering `/up` is caught
/// while its batch bakes, and every host switched so far goes back.
#[test]
fn a_release_that_goes_bad_after_its_gate_is_caught_by_the_bake() {
    // v2 takes `up` away 2 s after its reload, long after its 0.2 s gate passed.
    let reload = r#""if [ -e /srv/flaky-$(cat version) ]; then (sleep 2; rm -f up) >/dev/null 2>&1 & fi; echo reloaded $(cat version)""#;
    let w = World::files(2)
        .lines("deploy", "batches = [1, \"100%\"]\nbake = \"5s\"")
        .set("files", "reload", reload)
        .start();
    let v1 = w.deploy_ok("v1");
    for i in 0..2 {
        std::fs::write(w.lab().srv_dir(i).join("flaky-v2"), "").unwrap();
    }
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 1, "{}", r.json);
    let v2 = r.release();
    let m = w.norm_with(r.message(), &[(&v1, "<v1>"), (&v2, "<v2>")]);
    assert!(
        m.starts_with("release <v2> passed its health gate but failed its bake:\n  <host0>: "),
        "{m}"
    );
    assert!(
        m.ends_with("Every host was switched back to <v1> and passed its health gate again."),
        "{m}"
    );
    w.assert_all_serve("v1");
    assert_eq!(w.history()[0]["status"], "rolled_back");
    let hosts = &r.json["hosts"];
    assert_eq!(
        hosts[w.lab().destination(1)]["outcome"],
        "staged",
        "batch 2 never switched"
    );
}

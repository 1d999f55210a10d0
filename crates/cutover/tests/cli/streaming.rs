//! A directory is streamed to the hosts while it is packed (issue 14): what is streamed is
//! what the store keeps and the history records, a hostile entry anywhere in the tree is
//! refused before any host is touched, and a kill -9 mid-stream loses nothing.

use crate::world::{noise, World};
use std::path::Path;

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The details of the last run's `stage` events in `phase` (`start`, `done`).
fn stage_events(w: &World, phase: &str) -> Vec<String> {
    w.last_run_events()
        .into_iter()
        .filter(|(step, p, _)| step == "stage" && p == phase)
        .map(|(_, _, detail)| detail)
        .collect()
}

/// A build with a 2 MB file of random bytes in a nested directory.
fn big_build(w: &World, name: &str, seed: u64) -> std::path::PathBuf {
    let d = w.build(name);
    std::fs::create_dir_all(d.join("assets/deep")).unwrap();
    std::fs::write(d.join("assets/deep/noise.bin"), noise(seed, 2_000_000)).unwrap();
    d
}

#[test]
fn a_streamed_directory_is_the_artifact_the_history_records_and_a_cold_rollback_reships_it_byte_for_byte(
) {
    let w = World::files(2).start();
    let a = big_build(&w, "a", 1);
    let r = w.deploy_artifact(&a);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let a_id = r.release();
    // Both hosts got the stream while it was packed, and staging only named it.
    let done = stage_events(&w, "done");
    let streamed = done
        .iter()
        .filter(|d| d.ends_with("bytes sent (streamed as it was packed)"))
        .count();
    assert_eq!(streamed, 2, "{done:?}");
    // The store's copy is the bytes whose digest the history records.
    let history = w.history();
    let recorded = history[0]["artifact_sha256"].as_str().unwrap().to_string();
    let stored = std::fs::read(w.dir.join(format!("data/artifacts/{recorded}.tar.gz"))).unwrap();
    assert_eq!(sha256_hex(&stored), recorded);
    let source = std::fs::read(a.join("assets/deep/noise.bin")).unwrap();
    for i in 0..2 {
        let on_host = w
            .site(i)
            .join(format!("releases/{a_id}/assets/deep/noise.bin"));
        assert!(
            std::fs::read(&on_host).unwrap() == source,
            "host {i}: noise.bin"
        );
    }

    // B replaces it; A's directory is then deleted on every host, so going back re-ships
    // A's stored artifact.
    let b = big_build(&w, "b", 2);
    assert_eq!(w.deploy_artifact(&b).code, 0);
    for i in 0..2 {
        std::fs::remove_dir_all(w.site(i).join(format!("releases/{a_id}"))).unwrap();
    }
    let r = w.run(&["rollback", "--json", "--to", &a_id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for h in r.json["hosts"].as_object().unwrap().values() {
        assert!(h["uploaded_bytes"].as_u64().unwrap() > 0, "re-shipped: {h}");
    }
    w.assert_all_serve("a");
    for i in 0..2 {
        let on_host = w.site(i).join("current/assets/deep/noise.bin");
        assert!(
            std::fs::read(&on_host).unwrap() == source,
            "host {i}: noise.bin after the rollback"
        );
    }
}

/// Puts a hostile entry into a directory.
type Plant = fn(&Path);

#[test]
fn a_hostile_entry_deep_in_a_directory_is_refused_before_any_host_is_touched() {
    let w = World::files(2).start();
    let cases: [(&str, Plant); 2] = [
        ("a symlink out of the release", |deep| {
            std::os::unix::fs::symlink("../../../../../etc", deep.join("up")).unwrap()
        }),
        ("a FIFO", |deep| {
            let p = deep.join("pipe");
            let made = std::process::Command::new("mkfifo")
                .arg(&p)
                .status()
                .unwrap();
            assert!(made.success());
        }),
    ];
    let mut said = Vec::new();
    for (k, (what, plant)) in cases.iter().enumerate() {
        let d = big_build(&w, &format!("hostile{k}"), 3);
        let deep = d.join("assets/deep/er/still");
        std::fs::create_dir_all(&deep).unwrap();
        plant(&deep);
        let r = w.deploy_artifact(&d);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        said.push(w.norm(r.message()));
        for i in 0..2 {
            assert_eq!(
                w.releases_on(i),
                Vec::<String>::new(),
                "{what}: host {i} touched"
            );
        }
    }
    let dir = |k: usize| {
        w.dir
            .join(format!("builds/hostile{k}"))
            .display()
            .to_string()
    };
    assert_eq!(
        said,
        vec![
            "artifact refused: assets/deep/er/still/up: symlink target ../../../../../etc resolves outside the release. Nothing was touched.".to_string(),
            w.norm(&format!("artifact refused: {}/assets/deep/er/still/pipe: is a FIFO (named pipe); only regular files, directories and symlinks can be shipped. Nothing was touched.", dir(1))),
        ]
    );
    assert!(w.history().is_empty(), "no history row");
}

#[test]
fn kill_9_mid_stream_leaves_every_host_serving_its_release_and_the_next_run_succeeds() {
    let w = World::files(2).start();
    let v1 = w.deploy_ok("v1");
    // Without v1's artifact no host can take a delta, so the next deploy streams.
    std::fs::remove_dir_all(w.dir.join("data/artifacts")).unwrap();
    let d = big_build(&w, "crashing", 4);
    std::fs::write(d.join("more.bin"), noise(5, 3_000_000)).unwrap();
    let r = w
        .cutover(&["deploy", "--artifact", d.to_str().unwrap()])
        .crash_at("mid-upload")
        .run();
    assert_eq!(r.signal, Some(9), "killed mid-stream: {}", r.stderr);
    for i in 0..2 {
        w.assert_complete(i);
        assert_eq!(w.served(i), "v1", "host {i}");
        assert_eq!(w.current(i).as_deref(), Some(v1.as_str()));
    }
    // It was killed while the stream went out: host 0's upload began and never ended.
    let started = stage_events(&w, "start");
    assert!(
        started.iter().any(|d| d == "streamed as it is packed"),
        "{started:?}"
    );
    assert!(stage_events(&w, "done").is_empty());
    let after = w.deploy_ok("after");
    w.assert_all_serve("after");
    for i in 0..2 {
        let left: Vec<String> = w
            .releases_on(i)
            .into_iter()
            .filter(|r| r.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "host {i}: {left:?} left");
        assert!(w.releases_on(i).contains(&after));
    }
}

#[test]
fn a_redeploy_packed_while_the_hosts_connect_still_ships_everything_to_a_host_that_was_replaced() {
    let w = World::files(2).start();
    let a = big_build(&w, "a", 6);
    assert_eq!(w.deploy_artifact(&a).code, 0);
    // B shares A's 2 MB file: a delta against A (the live release) pays, so B is packed
    // while the hosts connect instead of streamed.
    let b = big_build(&w, "b", 6);
    // Host 1 is replaced by an empty machine since: it serves nothing history knows of.
    for e in std::fs::read_dir(w.site(1)).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let r = w.run(&["deploy", "--artifact", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("while the hosts connect"),
        "packed while the hosts connected: {}",
        r.stderr
    );
    w.assert_all_serve("b");
    let done = stage_events(&w, "done");
    assert!(
        done.iter().all(|d| !d.contains("streamed")),
        "nothing streamed: {done:?}"
    );
    // Host 0 took a delta (not the 2 MB file again), host 1 the whole artifact.
    let mut sent: Vec<(u64, bool)> = done
        .iter()
        .filter_map(|d| {
            let (n, rest) = d.split_once(" bytes sent")?;
            Some((n.parse().ok()?, rest.contains("delta")))
        })
        .collect();
    sent.sort();
    assert_eq!(sent.len(), 2, "{done:?}");
    assert!(
        sent[0].0 < 100_000 && sent[0].1,
        "a delta for host 0: {done:?}"
    );
    assert!(
        sent[1].0 > 2_000_000 && !sent[1].1,
        "everything for host 1: {done:?}"
    );
    let source = std::fs::read(b.join("assets/deep/noise.bin")).unwrap();
    for i in 0..2 {
        let on_host = w.site(i).join("current/assets/deep/noise.bin");
        assert!(std::fs::read(&on_host).unwrap() == source, "host {i}");
    }
}

/// The detail of each host's `connect` `done` event in the newest run, in host order.
fn ciphers(w: &World) -> Vec<String> {
    (0..w.hosts())
        .map(|i| {
            let host = w.lab().destination(i);
            w.db()
                .query_row(
                    "SELECT detail FROM events WHERE run_id = (SELECT MAX(id) FROM runs) \
                     AND step = 'connect' AND phase = 'done' AND host = ?1",
                    [&host],
                    |r| r.get(0),
                )
                .unwrap()
        })
        .collect()
}

#[test]
fn hosts_are_reached_over_aes_gcm_when_this_cpu_has_aes_unless_ssh_config_chooses_the_ciphers() {
    let w = World::files(2).start();
    let aes = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    let default = if aes {
        "cipher aes128-gcm@openssh.com"
    } else {
        "cipher chacha20-poly1305@openssh.com"
    };
    let a = w.build("a");
    assert_eq!(w.deploy_artifact(&a).code, 0);
    assert_eq!(ciphers(&w), vec![default; 2]);

    // The user's ssh_config names the ciphers for one host: that host gets them, the other
    // keeps cutover's choice.
    let host1 = w.lab().ip(1).to_string();
    let ssh_config = w.dir.join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!("Host {host1}\n    Ciphers chacha20-poly1305@openssh.com\n"),
    )
    .unwrap();
    w.configure(|t| {
        t.set_str("ssh", "config", ssh_config.display().to_string());
    });
    let b = w.build("b");
    let r = w.deploy_artifact(&b);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        ciphers(&w),
        vec![default, "cipher chacha20-poly1305@openssh.com"]
    );
    w.assert_all_serve("b");
}

#[test]
fn a_deploy_stopped_by_an_unreachable_host_leaves_no_upload_and_no_half_written_artifact() {
    let w = World::files(2).start();
    let v1 = w.deploy_ok("v1");
    w.lab().stop_sshd(1);
    // Packing begins while the hosts connect; the run stops at connect, long before 300 MB
    // are packed.
    let b = big_build(&w, "b", 3);
    std::fs::write(b.join("assets/more.bin"), noise(4, 300_000_000)).unwrap();
    let r = w.deploy_artifact(&b);
    assert_eq!(r.code, 1, "{}", r.json);
    assert_eq!(
        w.norm(r.message()),
        "1 of 2 hosts could not be used, so no host was touched:\n  \
         <host1>: unreachable: ssh: connect to host <ip1> port 22: Connection refused"
    );
    assert_eq!(w.releases_on(0), vec![v1.clone()]);
    let leftovers: Vec<String> = std::fs::read_dir(w.dir.join("data/artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    w.lab().start_sshd(1);
    let r = w.deploy_artifact(&b);
    assert_eq!(r.code, 0, "{}", r.stderr);
    w.assert_all_serve("b");
}

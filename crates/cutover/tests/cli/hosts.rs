//! Many hosts, and hosts that hang: one deploy to 100 light lab hosts (sshd and busybox's
//! web server, no nginx) that goes back everywhere when one host is unhealthy, and hosts that
//! accept a connection (or run a command) and never answer, which must not hang the deploy.
//! Needs root.

use crate::files::UNHEALTHY_RELOAD;
use crate::world::World;
use std::time::Instant;

/// A reload that never ends on a host that has `/srv/hang-<version>`.
const HANGING_RELOAD: &str =
    r#""if [ -e /srv/hang-$(cat version) ]; then sleep 600; fi; echo reloaded $(cat version)""#;

/// What busybox httpd answers for a missing file.
const BUSYBOX_404: &str = "<HTML><HEAD><TITLE>404 Not Found</TITLE></HEAD>\\n<BODY><H1>404 Not Found</H1>\\nThe requested URL was not found\\n</BODY></HTML>";

#[test]
fn a_hundred_hosts_deploy_go_back_together_roll_back_and_survive_a_hung_host() {
    let t = Instant::now();
    let w = World::files(100)
        .lab(|o| o.light = true)
        .set("files", "reload", UNHEALTHY_RELOAD)
        .start();
    eprintln!("100 hosts up in {:?}", t.elapsed());
    let v1 = w.deploy_ok("v1");
    eprintln!("first deploy done at {:?}", t.elapsed());
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 0, "{}", r.json);
    let v2 = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&v2, "<v2>")]),
        "deployed <v2> on 100 host(s); every host passed its health gate"
    );
    w.assert_all_serve("v2");
    eprintln!("second deploy done at {:?}", t.elapsed());

    // One unhealthy host of 100: all 100 go back.
    std::fs::write(w.lab().srv_dir(57).join("unhealthy-v3"), "").unwrap();
    let r = w.deploy_artifact(&w.build("v3"));
    assert_eq!(r.code, 1, "{}", r.json);
    let v3 = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&v2, "<v2>"), (&v3, "<v3>")]),
        format!(
            "release <v3> failed its health gate:\n  \
             <host57>: http://127.0.0.1:<port>/up not healthy after <t>s (<n> probes, wanted 200 2 times in a row); \
             last answer: HTTP 404, body: \"{BUSYBOX_404}\"; reload output: reloaded v3\n\
             Every host was switched back to <v2> and passed its health gate again."
        )
    );
    w.assert_all_serve("v2");
    let h = w.history();
    assert_eq!(h[0]["id"], v3.as_str());
    assert_eq!(h[0]["status"], "rolled_back");
    let outcomes = h[0]["hosts"].as_object().unwrap();
    assert_eq!(outcomes.len(), 100);
    assert_eq!(outcomes[&w.lab().destination(57)], "unhealthy");
    assert_eq!(
        outcomes.values().filter(|o| *o == "reverted").count(),
        99,
        "{outcomes:?}"
    );
    assert_eq!(h[1]["id"], v2.as_str());
    assert_eq!(h[1]["live"], true);
    eprintln!("reverted deploy done at {:?}", t.elapsed());

    // A rollback of all 100 (v3 never went live: back from v2 to v1).
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(
        w.norm_with(r.message(), &[(&v1, "<v1>")]),
        "rolled back to <v1> on 100 host(s); every host passed its health gate"
    );
    w.assert_all_serve("v1");
    eprintln!("rollback done at {:?}", t.elapsed());

    // A host whose sshd accepts the connection and never answers: the deploy ends at
    // [ssh] connect_timeout (3s here), before anything is staged anywhere.
    let before: Vec<Vec<String>> = [0, 41, 43, 99].map(|i| w.releases_on(i)).to_vec();
    w.lab().signal_sshd(42, "STOP");
    let r = w.deploy_artifact(&w.build("v4"));
    w.lab().signal_sshd(42, "CONT");
    assert_eq!(r.code, 1, "{}", r.json);
    assert_eq!(
        w.norm(r.message()),
        "1 of 100 hosts could not be used, so no host was touched:\n  \
         <host42>: unreachable: Connection to <ip42> port 22 timed out"
    );
    assert_eq!(
        r.json["hosts"][w.lab().destination(42)]["outcome"],
        "unreachable"
    );
    w.assert_all_serve("v1");
    for (k, i) in [0, 41, 43, 99].into_iter().enumerate() {
        assert_eq!(w.releases_on(i), before[k], "nothing staged on host {i}");
    }
    eprintln!("hung-host deploy done at {:?}", t.elapsed());
}

#[test]
fn a_command_that_hangs_on_one_host_ends_at_the_step_deadline_and_every_host_goes_back() {
    let w = World::files(3)
        .set("files", "reload", HANGING_RELOAD)
        .set("ssh", "step_timeout", "\"2s\"")
        .start();
    let v1 = w.deploy_ok("v1");
    std::fs::write(w.lab().srv_dir(1).join("hang-v2"), "").unwrap();
    let r = w.deploy_artifact(&w.build("v2"));
    assert_eq!(r.code, 1, "{}", r.json);
    let v2 = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&v1, "<v1>"), (&v2, "<v2>")]),
        "release <v2> could not be switched on every host:\n  \
         <host1>: <host1>: unreachable: no answer within 2s ([ssh] step_timeout); stopped waiting\n\
         Every host was switched back to <v1> and passed its health gate again."
    );
    w.assert_all_serve("v1");
    let h = w.history();
    assert_eq!(h[0]["status"], "rolled_back");
    assert_eq!(h[0]["hosts"][w.lab().destination(1)], "unhealthy");
    assert_eq!(h[1]["live"], true);
}

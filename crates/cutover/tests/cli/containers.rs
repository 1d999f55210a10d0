//! Container deploys against real Docker hosts: network namespaces with their own sshd and
//! dockerd (testlab), a registry on the lab network, images built locally and pushed, the real
//! `cutover` binary installing and driving its own edge proxy on every host, and real load
//! through those proxies. Needs root.

use crate::serve::{add_user, log_in, Server};
use crate::world::World;
use std::time::Duration;

/// `setup --json`, which must succeed: what it did on each host.
fn setup(w: &World) -> Vec<serde_json::Value> {
    let s = w.run(&["setup", "--json"]);
    assert_eq!(s.code, 0, "{}", s.stderr);
    s.json.as_array().expect("one entry per host").clone()
}

#[test]
fn blue_green_deploys_and_rollbacks_under_load_fail_no_request() {
    let w = World::containers(2, "blue-green").start();
    // Setup again is harmless: same binary, proxy already running.
    let s = setup(&w);
    assert!(s.iter().all(|h| h["binary"] == "unchanged"), "{s:?}");

    for k in 0..=10 {
        w.image(&format!("v{k}"), true);
    }
    let r = w.deploy_image("v0");
    assert_eq!(r.code, 0, "{}", r.json);
    let v0 = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&v0, "<v0>")]),
        "deployed <v0> (<registry>/web@sha256:<digest>) on 2 host(s) with blue-green; \
         every host passed its health gate through the proxy"
    );
    w.assert_all_serve("v0");
    let h = w.history();
    assert_eq!(h[0]["id"], v0.as_str());
    assert_eq!(
        h[0]["artifact_sha256"].as_str().unwrap().len(),
        64,
        "recorded by digest"
    );
    assert!(h[0]["source"].as_str().unwrap().ends_with("web:v0"));

    let load = w.load(None);
    for k in 1..=10 {
        w.deploy_ok(&format!("v{k}"));
        let r = w.run(&["rollback", "--json"]);
        assert_eq!(r.code, 0, "rollback {k}");
        assert_eq!(r.json["status"], "succeeded");
        if k == 1 {
            assert_eq!(
                w.norm_with(r.message(), &[(&v0, "<v0>")]),
                "rolled back to <v0> (<registry>/web@sha256:<digest>) on 2 host(s) with blue-green; \
                 every host passed its health gate through the proxy"
            );
        }
    }
    let (ka, fresh) = load.stop("blue-green");
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
        let c = w.containers_on(i);
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
    let w = World::containers(2, "hold").start();
    for k in 0..=10 {
        w.image(&format!("h{k}"), true);
    }
    w.deploy_ok("h0");
    let load = w.load(Some(Duration::from_secs(70)));
    for k in 1..=10 {
        let r = w.deploy_image(&format!("h{k}"));
        assert_eq!(r.code, 0, "deploy h{k}: {}", r.json);
        if k == 1 {
            let h1 = r.release();
            assert_eq!(
                w.norm_with(r.message(), &[(&h1, "<h1>")]),
                "deployed <h1> (<registry>/web@sha256:<digest>) on 2 host(s) with hold; \
                 every host passed its health gate through the proxy"
            );
        }
    }
    let (ka, fresh) = load.stop("hold");
    ka.assert_no_failures();
    fresh.assert_no_failures();
    w.assert_all_serve("h10");
    for i in 0..2 {
        let running = w
            .containers_on(i)
            .iter()
            .filter(|l| l.ends_with("running"))
            .count();
        assert_eq!(running, 1, "hold runs one copy at a time");
    }
}

#[test]
fn broken_images_flip_nothing_and_the_old_release_serves() {
    let w = World::containers(2, "blue-green").start();
    w.image("good", true);
    w.image("unhealthy", false);
    w.lab().build_crashing_image("web:crash");
    w.deploy_ok("good");
    for (tag, want) in [
        ("crash", "exited"),
        ("unhealthy", "HTTP 404"),
        ("missing", "cannot pull"),
    ] {
        let r = w.deploy_image(tag);
        assert_eq!(r.code, 1, "{tag}: {}", r.json);
        let msg = r.message();
        assert!(
            msg.contains(want),
            "{tag}: the diagnosis says {want}: {msg}"
        );
        assert!(msg.contains("nothing was switched"), "{msg}");
        w.assert_all_serve("good");
        for i in 0..2 {
            let c = w.containers_on(i);
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
    w.lab().build_image(
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
    let w = World::containers(2, "blue-green").start();
    w.image("a", true);
    flagged_image(&w, "f");
    let a = w.deploy_ok("a");
    std::fs::write(w.lab().srv_dir(1).join("flags/unhealthy"), "").unwrap();
    let r = w.deploy_image("f");
    assert_eq!(r.code, 1, "{}", r.json);
    assert!(r.message().contains(&w.lab().destination(1)), "{}", r.json);
    w.assert_all_serve("a");
    // hold: host 0 switches, host 1 fails its gate; both end on the old release.
    w.configure(|t| {
        t.set_str("container", "strategy", "hold");
    });
    let r = w.deploy_image("f");
    assert_eq!(r.code, 1, "{}", r.json);
    let f = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&a, "<a>"), (&f, "<f>")]),
        "release <f> failed its health gate:\n  \
         <host1>: proxy: target 127.0.0.1:<port> did not pass the health gate on /up within <n> ms \
         (<n> probes, 0 consecutive passes of 2 needed): HTTP 404 Not Found; nothing was changed\n\
         Every host was switched back to <a> and passed its health gate again."
    );
    w.assert_all_serve("a");
    assert_eq!(w.history()[0]["status"], "rolled_back");
}

#[test]
fn rollback_warm_and_cold() {
    let w = World::containers(2, "blue-green").start();
    w.image("r1", true);
    w.image("r2", true);
    let r1 = w.deploy_ok("r1");
    w.deploy_ok("r2");
    // Warm: r1's container is still on the hosts (stopped).
    for i in 0..2 {
        assert!(w
            .containers_on(i)
            .iter()
            .any(|c| c.starts_with(&format!("web-{r1} ")) && c.ends_with("exited")));
    }
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0);
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
    let r = w.run(&["rollback", "--json", "--to", &r1]);
    assert_eq!(r.code, 0);
    let lab = w.lab();
    for i in 0..2 {
        let _ = lab.docker(i, &["rm", "-f", &format!("web-{live}")]);
        let _ = lab.docker(i, &["rm", "-f", &format!("web-{r2_old}")]);
        lab.remove_image_on_host(i, &lab.image_reference("web:r2"));
        let digest = lab.image_digest(&lab.image_reference("web:r2"));
        let _ = lab.docker(
            i,
            &["image", "rm", &format!("{}/web@{digest}", w.registry())],
        );
    }
    let r = w.run(&["rollback", "--json", "--to", &live]);
    assert_eq!(r.code, 0, "cold rollback pulls the digest again");
    w.assert_all_serve("r2");
    let st = w.run(&["status", "--json"]);
    assert_eq!(
        st.code, 0,
        "status reads the running container on every host"
    );
    for h in st.json["hosts"].as_array().unwrap() {
        assert_eq!(h["release"], live.as_str());
    }
}

#[test]
fn proxy_restart_keeps_routing() {
    let w = World::containers(1, "blue-green").start();
    w.image("p1", true);
    w.deploy_ok("p1");
    // Kill this host's proxy by the pid its own control socket reports (test hosts share one
    // pid namespace, so a name pattern would hit other tests' proxies); the supervisor
    // restarts it, and the restarted proxy routes from its state file.
    let before = w.proxy_pid(0).expect("the proxy answers");
    assert!(w
        .lab()
        .ssh(0, &format!("kill -TERM {before}"))
        .status
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while w.proxy_pid(0).is_none_or(|p| p == before) {
        assert!(std::time::Instant::now() < deadline, "the proxy came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.assert_all_serve("p1");
    let c = w.run(&["check"]);
    assert_eq!(c.code, 0, "check sees docker and the proxy");
    w.lab()
        .ssh(0, "mv /srv/cutover/proxy.sock /srv/cutover/proxy.sock.off");
    let c = w.run(&["check"]);
    assert_eq!(c.code, 1);
    assert!(c.stdout.contains("edge proxy"));
    w.lab()
        .ssh(0, "mv /srv/cutover/proxy.sock.off /srv/cutover/proxy.sock");
}

#[test]
fn upgrading_the_proxy_binary_under_load_fails_no_request() {
    let w = World::containers(2, "blue-green").start();
    w.image("u1", true);
    w.deploy_ok("u1");
    let load = w.load(None);
    // Make the installed binary differ (as after a cutover upgrade), then set up again: the
    // new proxy takes the port over from the old one, which drains and exits.
    let before: Vec<u64> = (0..2).map(|i| w.proxy_pid(i).unwrap()).collect();
    for i in 0..2 {
        let out = w.lab().ssh(
            i,
            "cd /srv/cutover && cp cutover c.tmp && printf '\\0' >> c.tmp && mv c.tmp cutover",
        );
        assert!(out.status.success());
    }
    let s = setup(&w);
    assert!(
        s.iter()
            .all(|h| h["binary"] == "uploaded"
                && h["service"].as_str().unwrap().contains("upgraded")),
        "{s:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ka, fresh) = load.stop("proxy upgrade");
    for (i, old) in before.iter().enumerate() {
        assert_ne!(
            w.proxy_pid(i).unwrap(),
            *old,
            "host {i}: a new proxy process serves"
        );
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
/// release through its proxy, and the next deploy reconciles the history and succeeds. (The
/// matrix over every crash point and both strategies is in `crash.rs`.)
#[test]
fn kill_9_mid_deploy_then_a_successful_run() {
    let w = World::containers(2, "blue-green").start();
    for t in ["k0", "k1", "k2", "k3", "k4"] {
        w.image(t, true);
    }
    w.deploy_ok("k0");
    for (n, point) in ["after-stage", "after-switch"].iter().enumerate() {
        let crashed = format!("k{}", 2 * n + 1);
        let next = format!("k{}", 2 * n + 2);
        let r = w
            .cutover(&["deploy", "--image", &crashed])
            .crash_at(point)
            .run();
        assert_eq!(r.signal, Some(9), "{point}: {}", r.stderr);
        for i in 0..2 {
            let page = w.served(i);
            assert!(page.starts_with('k'), "{point}: host {i} serves {page}");
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

/// An image whose `/up` is healthy and whose `/cgi-bin/app` answers `TAG`, or, with
/// `fail_every = n`, a 500 to every n-th request (a busybox httpd CGI with a counter).
fn cgi_image(w: &World, tag: &str, fail_every: Option<u32>) {
    let script = format!(
        "#!/bin/sh\nn=$(cat /tmp/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/n\n\
         if [ {} -ne 0 ] && [ $((n % {})) -eq 0 ]; then\n\
         printf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nboom\\n'\n\
         else\n\
         printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n{tag}\\n'\n\
         fi\n",
        fail_every.unwrap_or(0),
        fail_every.unwrap_or(1),
    );
    let start = b"#!/bin/sh\ntrap 'exit 0' TERM INT\nhttpd -f -p 8080 -h /www &\nwait\n";
    w.lab().build_image_with(
        &format!("web:{tag}"),
        &[
            ("www/index.html", format!("{tag}\n").as_bytes()),
            ("www/up", b"ok\n"),
            ("www/cgi-bin/app", script.as_bytes()),
            ("start.sh", start),
        ],
        &["CMD [\"/start.sh\"]", "EXPOSE 8080/tcp"],
    );
}

/// The last 40 lines of host `i`'s proxy log (for a failure's message).
fn proxy_log_tail(w: &World, i: usize) -> String {
    let log =
        std::fs::read_to_string(w.lab().srv_dir(i).join("cutover/proxy.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Real requests to `/cgi-bin/app` on every host, keep-alive to the proxy.
fn app_load(w: &World) -> testlab::Load {
    let targets: Vec<_> = (0..w.hosts()).map(|i| w.http_addr(i)).collect();
    testlab::Load::start(testlab::LoadOptions {
        path: "/cgi-bin/app".into(),
        // Busybox httpd closes every connection: each request is a new upstream connection
        // (through docker-proxy), so the rate stays modest (about 40 a second per host).
        workers_per_target: 1,
        pause: Duration::from_millis(20),
        ..testlab::LoadOptions::new(targets)
    })
}

#[test]
fn a_release_failing_real_requests_is_caught_by_its_canary_bake_and_a_good_one_is_promoted() {
    let w = World::containers(2, "blue-green")
        .set("deploy", "batches", "[1, \"100%\"]")
        .set("deploy", "bake", "\"8s\"")
        .set("deploy", "max_error_rate", "0.05")
        .start();
    cgi_image(&w, "good", None);
    cgi_image(&w, "flaky", Some(5));
    cgi_image(&w, "better", None);
    let good = w.deploy_ok("good");

    // A canary of 50% during the bake: /up is healthy, 20% of real requests get a 500.
    w.configure(|t| {
        t.set("deploy", "canary", "50");
    });
    let load = app_load(&w);
    assert!(load.wait_for_ok(100, Duration::from_secs(30)));
    let r = w.run(&["deploy", "--events", "--image", "flaky"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcome = events.last().unwrap();
    let flaky = outcome["release"].as_str().unwrap().to_string();
    let msg = outcome["message"].as_str().unwrap_or_default();
    let host0 = w.lab().destination(0);
    // Caught in the first batch: only host 0 baked; the diagnosis gives both releases' rates
    // exactly as host 0's proxy counted them over the canary's window.
    let baked = proxy_bake_status(&w, 0);
    let (new, old) = (baked.new.as_ref().unwrap(), baked.old.as_ref().unwrap());
    assert!(new.errors_5xx > 0 && old.requests > 0, "{baked:?}");
    let describe = cutover_proxy_wire::describe;
    assert_eq!(
        msg,
        format!(
            "release {flaky} passed its health gate but failed its bake:\n  {host0}: new release {flaky}: {}; old release {good}: {}; above max_error_rate 0.05 and the old release's rate; {}\nEvery host was switched back to {good} and passed its health gate again.",
            describe(new),
            describe(old),
            baked.action
        )
    );
    assert!(
        baked
            .action
            .starts_with("the proxy swapped back to 127.0.0.1:"),
        "{baked:?}"
    );
    // Only that batch's host was exposed: host 1 never switched and its proxy never baked it.
    let host1 = w.lab().destination(1);
    assert_eq!(outcome["hosts"][&host1]["outcome"], "staged", "{outcome}");
    assert!(
        proxy_bake(&w, 1).is_none_or(|b| b["release"] != flaky.as_str()),
        "{:?}",
        proxy_bake(&w, 1)
    );
    let bake_failed = events
        .iter()
        .find(|e| e["step"] == "bake" && e["state"] == "failed" && e["host"] == host0.as_str())
        .unwrap_or_else(|| panic!("a failed bake event for {host0}: {}", r.stdout));
    assert!(
        bake_failed["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("new release {flaky}: ")),
        "{bake_failed}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["step"] == "bake" && e["host"] != host0.as_str() && e["host"].is_string()),
        "the second batch never baked: {}",
        r.stdout
    );
    w.assert_all_serve("good");
    assert_eq!(w.history()[0]["status"], "rolled_back");
    let bad = load.stop();
    // The only failures the load saw were the flaky release's own 500s, during its canary.
    assert!(bad.failed > 0, "the canary got real requests");
    assert!(
        bad.failures.iter().all(|f| f.contains("HTTP 500: boom")),
        "{:?}",
        bad.failures
    );
    assert!(bad.bodies.contains_key("good"), "{:?}", bad.bodies);

    // A good release: baked as a canary on each batch, then promoted; no request fails.
    let load = app_load(&w);
    assert!(load.wait_for_ok(100, Duration::from_secs(30)));
    let r = w.run(&["deploy", "--events", "--image", "better"]);
    if r.code != 0 {
        println!("host 0 proxy log:\n{}", proxy_log_tail(&w, 0));
    }
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let baked: Vec<String> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["step"] == "bake" && e["state"] == "done" && e["host"].is_string())
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(baked.len(), 2, "{}", r.stdout);
    for d in &baked {
        assert!(d.contains("; old release "), "{d}");
        assert!(d.contains("canary promoted to every request"), "{d}");
    }
    assert!(load.wait_for_ok(100, Duration::from_secs(30)));
    let ok = load.stop();
    if ok.failed > 0 {
        println!("host 0 proxy log:\n{}", proxy_log_tail(&w, 0));
    }
    ok.assert_no_failures();
    assert!(
        ok.bodies.contains_key("better") && ok.bodies.contains_key("good"),
        "{:?}",
        ok.bodies
    );
    w.assert_all_serve("better");

    // Without a canary the first batch's host takes every request at once; its error rate
    // over the bake is compared with the old release's before the switch.
    w.configure(|t| {
        t.unset("deploy", "canary");
    });
    cgi_image(&w, "flaky2", Some(5));
    let better = w.history()[0]["id"].as_str().unwrap().to_string();
    let load = app_load(&w);
    assert!(load.wait_for_ok(100, Duration::from_secs(30)));
    let r = w.deploy_image("flaky2");
    assert_eq!(r.code, 1, "{}", r.json);
    let flaky2 = r.release();
    let msg = r.message();
    assert!(
        msg.starts_with(&format!(
            "release {flaky2} passed its health gate but failed its bake:\n  {host0}: new release {flaky2}: "
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("; old release {better}: 0 of ")),
        "{msg}"
    );
    w.assert_all_serve("better");
    let seen = load.stop();
    assert!(
        seen.failures.iter().all(|f| f.contains("HTTP 500: boom")),
        "{:?}",
        seen.failures
    );
}

/// The bake of host `i`'s proxy as its state file records it (`baking`, `passed`, ...).
fn proxy_bake(w: &World, i: usize) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(w.lab().srv_dir(i).join("cutover/proxy-state.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc["bakes"].as_array()?.first().cloned()
}

/// Waits until every host's proxy records a bake of `release` in `state`.
fn wait_for_bakes(w: &World, release: &str, state: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let bakes: Vec<Option<serde_json::Value>> =
            (0..w.hosts()).map(|i| proxy_bake(w, i)).collect();
        let all = bakes.iter().all(|b| {
            b.as_ref()
                .is_some_and(|b| b["state"] == state && b["release"] == release)
        });
        if all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {state} bake on every host: {bakes:?}\n{}",
            proxy_log_tail(w, 0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every host's proxy has been handed the bake of a release other than `old`
/// (whatever its state by then: hosts of one batch may start their bakes apart).
fn wait_for_new_bakes(w: &World, old: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let bakes: Vec<Option<serde_json::Value>> =
            (0..w.hosts()).map(|i| proxy_bake(w, i)).collect();
        if bakes
            .iter()
            .all(|b| b.as_ref().is_some_and(|b| b["release"] != old))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new bake on every host: {bakes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest release id in the history.
fn newest(w: &World) -> String {
    w.history()[0]["id"].as_str().unwrap().to_string()
}

/// kill -9 of the controller while its batch bakes: each host's proxy finishes the bake
/// alone (a failing release is swapped back by the proxies, a healthy one passes), and the
/// next run reconciles the history with what each host did.
#[test]
fn kill_9_during_a_bake_the_proxies_finish_it_alone_and_the_next_run_reconciles() {
    let w = World::containers(2, "blue-green")
        .set("deploy", "bake", "\"6s\"")
        .set("deploy", "max_error_rate", "0.05")
        .start();
    for (tag, fail) in [
        ("good", None),
        ("flaky", Some(5)),
        ("fine", None),
        ("later", None),
        ("last", None),
    ] {
        cgi_image(&w, tag, fail);
    }
    let good = w.deploy_ok("good");
    let load = app_load(&w);
    assert!(load.wait_for_ok(100, Duration::from_secs(30)));

    // A release failing 20% of real requests; the controller dies once both hosts bake.
    let mut child = w.cutover(&["deploy", "--image", "flaky"]).spawn_quiet();
    wait_for_new_bakes(&w, &good, Duration::from_secs(120));
    child.kill().unwrap(); // SIGKILL
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&child.wait().unwrap()),
        Some(9)
    );
    let flaky = newest(&w);
    wait_for_bakes(&w, &flaky, "failed", Duration::from_secs(30));
    for i in 0..2 {
        let b = proxy_bake(&w, i).unwrap();
        let verdict = b["verdict"].as_str().unwrap();
        assert!(
            verdict.starts_with(&format!("new release {flaky}: "))
                && verdict.contains(&format!("; old release {good}: "))
                && verdict.ends_with("above max_error_rate 0.05 and the old release's rate"),
            "{b}"
        );
        assert!(
            b["action"]
                .as_str()
                .unwrap()
                .starts_with("the proxy swapped back to 127.0.0.1:"),
            "{b}"
        );
        let page = w.get(i, "/cgi-bin/app");
        assert!(
            page.lines().any(|l| l.trim() == "good"),
            "host {i}: {page:?}"
        );
    }
    // `cutover status` reads what each proxy did: the old release, and the bake's verdict.
    let st = w.run(&["status"]);
    for i in 0..2 {
        let host = w.lab().destination(i);
        assert!(
            st.stdout
                .contains(&format!("{host}: bake failed of 127.0.0.1:")),
            "{}",
            st.stdout
        );
    }
    let st = w.run(&["status", "--json"]);
    for h in st.json["hosts"].as_array().unwrap() {
        assert_eq!(h["release"], good.as_str(), "{}", st.json);
        assert_eq!(h["bake"]["state"], "failed", "{}", st.json);
    }
    // The next run reconciles: nobody serves the killed release; each host's verdict named.
    let fine = w.deploy_ok("fine");
    let rec = w
        .last_run_events()
        .into_iter()
        .find(|(step, _, _)| step == "reconcile")
        .expect("a reconcile event")
        .2;
    assert!(
        rec.starts_with(&format!(
            "reconciled an interrupted deploy of {flaky} (last step: "
        )) && rec.contains("): marked failed; hosts serving it: none; "),
        "{rec}"
    );
    for i in 0..2 {
        let host = w.lab().destination(i);
        assert!(rec.contains(&format!("; {host}: bake failed of ")), "{rec}");
    }
    let h = w.history();
    assert_eq!(
        (h[1]["id"].as_str(), h[1]["status"].as_str()),
        (Some(flaky.as_str()), Some("failed"))
    );
    w.assert_all_serve("fine");
    for i in 0..2 {
        let running: Vec<String> = w
            .containers_on(i)
            .into_iter()
            .filter(|c| c.ends_with(" running"))
            .collect();
        assert_eq!(
            running.len(),
            1,
            "only the live container runs on host {i}: {running:?}"
        );
        assert!(running[0].contains(&fine), "{running:?}");
    }

    // A healthy release: the proxies pass the bake alone; the next run finds it served.
    let mut child = w.cutover(&["deploy", "--image", "later"]).spawn_quiet();
    wait_for_new_bakes(&w, &fine, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    let later = newest(&w);
    wait_for_bakes(&w, &later, "passed", Duration::from_secs(30));
    for i in 0..2 {
        let page = w.get(i, "/cgi-bin/app");
        assert!(
            page.lines().any(|l| l.trim() == "later"),
            "host {i}: {page:?}"
        );
    }
    let st = w.run(&["status", "--json"]);
    for h in st.json["hosts"].as_array().unwrap() {
        assert_eq!(h["release"], later.as_str(), "{}", st.json);
    }
    w.deploy_ok("last");
    let rec = w
        .last_run_events()
        .into_iter()
        .find(|(step, _, _)| step == "reconcile")
        .expect("a reconcile event")
        .2;
    let hosts = format!("{}, {}", w.lab().destination(0), w.lab().destination(1));
    assert!(
        rec.contains(&format!("): marked partial; hosts serving it: {hosts}; ")),
        "{rec}"
    );
    assert!(rec.contains(": bake passed of "), "{rec}");
    assert_eq!(w.history()[1]["status"], "partial");
    w.assert_all_serve("last");
    let seen = load.stop();
    assert!(
        seen.failures.iter().all(|f| f.contains("HTTP 500: boom")),
        "only the flaky release's own 500s: {:?}",
        seen.failures
    );
}

/// When host `i` last started the container of `release` (docker's `StartedAt`).
fn started_at(w: &World, i: usize, release: &str) -> String {
    let out = w.lab().docker(
        i,
        &[
            "inspect",
            "-f",
            "{{.Id}} {{.State.StartedAt}}",
            &format!("web-{release}"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Real requests to `/cgi-bin/app` on the hosts `which`, `workers` per host.
fn app_load_on(w: &World, which: &[usize], workers: usize) -> testlab::Load {
    testlab::Load::start(testlab::LoadOptions {
        path: "/cgi-bin/app".into(),
        workers_per_target: workers,
        pause: Duration::from_millis(20),
        ..testlab::LoadOptions::new(which.iter().map(|&i| w.http_addr(i)).collect())
    })
}

/// The failing release caught in the last batch: the first batch's host, which had no client
/// traffic, passed on its proxy's own probes (not on no data); the last batch's host failed on
/// real requests; every switched host goes back, and going back is a swap in each proxy: the
/// old container was never stopped, so it is not started again (same id, same StartedAt).
#[test]
fn caught_in_the_last_batch_every_switched_host_is_swapped_back_without_a_container_start() {
    let w = World::containers(2, "blue-green")
        .set("deploy", "batches", "[1, \"100%\"]")
        .set("deploy", "bake", "\"4s\"")
        .set("deploy", "max_error_rate", "0.05")
        .start();
    cgi_image(&w, "good", None);
    cgi_image(&w, "flaky", Some(5));
    let good = w.deploy_ok("good");
    let before: Vec<String> = (0..2).map(|i| started_at(&w, i, &good)).collect();
    assert!(before.iter().all(|s| s.len() > 64), "{before:?}");
    // Client traffic only on host 1 (the last batch).
    let load = app_load_on(&w, &[1], 2);
    assert!(load.wait_for_ok(50, Duration::from_secs(30)));
    let r = w.run(&["deploy", "--events", "--image", "flaky"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flaky = events.last().unwrap()["release"]
        .as_str()
        .unwrap()
        .to_string();
    let (host0, host1) = (w.lab().destination(0), w.lab().destination(1));
    let bake = |host: &str, state: &str| {
        events
            .iter()
            .find(|e| e["step"] == "bake" && e["state"] == state && e["host"] == host)
            .and_then(|e| e["detail"].as_str())
            .unwrap_or_else(|| panic!("a {state} bake event of {host}: {}", r.stdout))
            .to_string()
    };
    let passed = bake(&host0, "done");
    assert!(
        passed.starts_with(&format!(
            "new release {flaky}: 0 of 0 requests failed (0.0%), no p99; old release {good}: "
        )) && passed.contains("; under 20 requests: judged by probes, 0 of ")
            && passed.ends_with("probes of /up failed in 4s (max_error_rate 0.05)"),
        "{passed}"
    );
    // Live counts while baking.
    assert!(
        events.iter().any(|e| e["step"] == "bake"
            && e["state"] == "output"
            && e["host"] == host1.as_str()
            && e["detail"]
                .as_str()
                .unwrap()
                .starts_with("bake baking of 127.0.0.1:")),
        "{}",
        r.stdout
    );
    let failed = bake(&host1, "failed");
    assert!(
        failed.starts_with(&format!("new release {flaky}: "))
            && failed.contains("above max_error_rate 0.05 and the old release's rate; the proxy swapped back to 127.0.0.1:"),
        "{failed}"
    );
    let outcome = events.last().unwrap();
    let msg = outcome["message"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!(
            "release {flaky} passed its health gate but failed its bake:\n  {host1}: new release {flaky}: "
        )) && msg.ends_with(&format!(
            "Every host was switched back to {good} and passed its health gate again."
        )),
        "{msg}"
    );
    w.assert_all_serve("good");
    let h = w.history();
    assert_eq!(h[0]["status"], "rolled_back");
    // The history keeps each host's verdict with its numbers.
    let baked: Vec<(String, String)> = h[0]["bake"]
        .as_array()
        .unwrap_or_else(|| panic!("bake verdicts in the history: {}", h[0]))
        .iter()
        .map(|b| {
            (
                b["host"].as_str().unwrap().to_string(),
                b["verdict"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        baked,
        [
            (host0.clone(), "passed".to_string()),
            (host1.clone(), "failed".to_string())
        ]
    );
    assert_eq!(h[0]["bake"][1]["detail"].as_str(), Some(failed.as_str()));
    let table = w.run(&["history"]).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&flaky) && l.trim_end().ends_with("failed 1/2")),
        "{table}"
    );
    // No container was started to go back: the old one kept running through the bake.
    let after: Vec<String> = (0..2).map(|i| started_at(&w, i, &good)).collect();
    assert_eq!(after, before);
    let seen = load.stop();
    assert!(
        seen.failures.iter().all(|f| f.contains("HTTP 500: boom")),
        "{:?}",
        seen.failures
    );
}

/// A release 300 ms slower than the old one: with `max_p99` its bake fails on the proxy's
/// latency counts and it is reverted; without `max_p99` it is kept. The panel's run page shows
/// each bake's counts per release (live while it bakes, then the verdict), cell for cell what
/// the proxy counted. Then a release whose `/up` breaks during a bake with no client traffic:
/// the proxy's own probes fail it (a bake is never passed on no data).
#[test]
fn a_slower_release_is_reverted_with_max_p99_and_kept_without() {
    let w = World::containers(1, "blue-green")
        .set("deploy", "bake", "\"5s\"")
        .set("deploy", "max_p99", "\"200ms\"")
        .start();
    cgi_image(&w, "fast", None);
    cgi_image(&w, "sick", None);
    let slow = |tag: &str| {
        let script = format!(
            "#!/bin/sh\nsleep 0.3\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n{tag}\\n'\n"
        );
        let start = b"#!/bin/sh\ntrap 'exit 0' TERM INT\nhttpd -f -p 8080 -h /www &\nwait\n";
        w.lab().build_image_with(
            &format!("web:{tag}"),
            &[
                ("www/index.html", format!("{tag}\n").as_bytes()),
                ("www/up", b"ok\n"),
                ("www/cgi-bin/app", script.as_bytes()),
                ("start.sh", start),
            ],
            &["CMD [\"/start.sh\"]", "EXPOSE 8080/tcp"],
        );
    };
    slow("slow");
    slow("slow2");
    let fast = w.deploy_ok("fast");
    add_user(&w, "admin", "admin", "correct horse battery");
    let server = Server::start(&w);
    let b = testlab::Browser::start(1100, 900);
    b.goto(&server.url("/"));
    log_in(&b, &server, "admin", "correct horse battery");
    let load = app_load_on(&w, &[0], 8);
    assert!(load.wait_for_ok(50, Duration::from_secs(30)));
    let r = w.deploy_image("slow");
    assert_eq!(r.code, 1, "{}", r.json);
    let msg = r.message();
    assert!(
        msg.contains(&format!("; old release {fast}: 0 of "))
            && msg.contains("p99 <= 500 ms; old release")
            && msg.contains("; p99 above max_p99 200ms; the proxy swapped back to 127.0.0.1:"),
        "{msg}"
    );
    w.assert_all_serve("fast");
    // The run page: the table holds what the proxy counted (its state file), cell for cell.
    let host = w.lab().destination(0);
    let baked = proxy_bake_status(&w, 0);
    b.goto(&server.url(&format!("/runs/{}", last_run(&w))));
    let verdict = format!("p99 above max_p99 200ms; {}", baked.action);
    assert_eq!(bake_table(&b), bake_cells(&host, &baked, &verdict));

    // Without max_p99 the slow release is kept; its run page follows the bake live.
    w.configure(|t| {
        t.unset("deploy", "max_p99");
        t.set("deploy", "bake", "\"10s\"");
    });
    let before = last_run(&w);
    let deploy = w.cutover(&["deploy", "--json", "--image", "slow2"]);
    let kept = std::thread::spawn(move || deploy.run());
    let run = b.wait_for("the run to start", Duration::from_secs(60), || {
        let run = last_run(&w);
        (run > before).then_some(run)
    });
    b.goto(&server.url(&format!("/runs/{run}")));
    b.wait_for("live bake counts", Duration::from_secs(120), || {
        let rows = bake_table(&b);
        rows.iter()
            .any(|r| r[1] == "baking" && r[2].starts_with("new ") && r[3] != "0")
            .then_some(())
    });
    let kept = kept.join().unwrap();
    assert_eq!(kept.code, 0, "{}", kept.json);
    b.wait_for("the run's end", Duration::from_secs(30), || {
        (b.text("#run-status") == "succeeded").then_some(())
    });
    let baked = proxy_bake_status(&w, 0);
    let want = bake_cells(&host, &baked, "within max_error_rate 0.01");
    assert_eq!(bake_table(&b), want, "followed live");
    b.goto(&server.url(&format!("/runs/{run}")));
    assert_eq!(bake_table(&b), want, "rendered by the server");
    w.assert_all_serve("slow2");
    let seen = load.stop();
    assert_eq!(seen.failed, 0, "{:?}", seen.failures);

    // No client traffic, and `/up` breaks once the bake began: the proxy's own probes fail it.
    let slow2 = newest(&w);
    let mut child = w.cutover(&["deploy", "--image", "sick"]).spawn_quiet();
    wait_for_new_bakes(&w, &slow2, Duration::from_secs(120));
    let sick = newest(&w);
    let rm = w
        .lab()
        .docker(0, &["exec", &format!("web-{sick}"), "rm", "/www/up"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(child.wait().unwrap().code(), Some(1));
    let baked = proxy_bake_status(&w, 0);
    assert_eq!(
        baked.state,
        cutover_proxy_wire::BakeState::Failed,
        "{baked:?}"
    );
    assert!(
        baked.probes_failed > 0 && baked.new.as_ref().unwrap().requests < 20,
        "{baked:?}"
    );
    let failed = w
        .last_run_events()
        .into_iter()
        .find(|(step, state, _)| step == "bake" && state == "failed")
        .expect("a failed bake event")
        .2;
    assert_eq!(
        failed,
        format!(
            "new release {sick}: 0 of 0 requests failed (0.0%), no p99; old release {slow2}: {}; under 20 requests; {} of {} probes of /up failed in 10s (max_error_rate 0.01); {}",
            cutover_proxy_wire::describe(baked.old.as_ref().unwrap()),
            baked.probes_failed,
            baked.probes,
            baked.action
        )
    );
    assert!(
        baked
            .action
            .starts_with("the proxy swapped back to 127.0.0.1:"),
        "{baked:?}"
    );
    w.assert_all_serve("slow2");
}

/// The newest run's id.
fn last_run(w: &World) -> i64 {
    w.db()
        .query_row("SELECT COALESCE(MAX(id), 0) FROM runs", [], |r| r.get(0))
        .unwrap()
}

/// Host `i`'s proxy's bake as its state file records it.
fn proxy_bake_status(w: &World, i: usize) -> cutover_proxy_wire::BakeStatus {
    serde_json::from_value(proxy_bake(w, i).expect("a bake in the proxy's state")).unwrap()
}

/// The run page's bake table, cell by cell.
fn bake_table(b: &testlab::Browser) -> Vec<Vec<String>> {
    let v = b.js(
        "return Array.from(document.querySelectorAll('#bake tbody tr'))\
         .map(tr => Array.from(tr.cells).map(td => td.textContent))",
    );
    serde_json::from_value(v).unwrap()
}

/// The rows the run page must show for a bake: the proxy's counts of each release.
fn bake_cells(host: &str, b: &cutover_proxy_wire::BakeStatus, verdict: &str) -> Vec<Vec<String>> {
    let row = |role: &str, release: &str, t: Option<&cutover_proxy_wire::TargetStats>| {
        let mut cells = vec![host.to_string(), b.state.as_str().to_string()];
        cells.push(format!("{role} {release}"));
        match t {
            Some(t) => {
                let rate = t.error_rate().unwrap_or(0.0) * 100.0;
                let p99 = match t.p99_ms() {
                    None => "–".to_string(),
                    Some(u64::MAX) => {
                        let last = cutover_proxy_wire::LATENCY_BOUNDS_MS.last().unwrap();
                        format!("> {last} ms")
                    }
                    Some(ms) => format!("<= {ms} ms"),
                };
                cells.extend([
                    t.requests.to_string(),
                    t.errors_5xx.to_string(),
                    t.failures.to_string(),
                    format!("{rate:.1}%"),
                    p99,
                ]);
            }
            None => cells.extend(["–"; 5].map(String::from)),
        }
        cells
    };
    let mut new = row("new", &b.release, b.new.as_ref());
    new.push(verdict.to_string());
    let old_release = b.old_release.as_deref().unwrap_or("(none)");
    let mut old = row("old", old_release, b.old.as_ref());
    old.push(String::new());
    vec![new, old]
}

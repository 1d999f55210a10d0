//! Pull request previews on container hosts with their own dockerd, and of a files app (served
//! by the host's edge proxy as a static target), through the real edge proxy, reached with the
//! preview's `Host` header, while production serves under load beside them. Needs root.

use crate::serve::{add_user, log_in, token, Server};
use crate::world::{wait_until, Toml, World, PROXY_PORT};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use testlab::{Load, LoadOptions};

const HOST: &str = "pr-7-web.preview.test";

/// `GET /` of `addr` with `Host: host`: the body on 200, else `HTTP <status line>`.
pub(crate) fn get_as(addr: SocketAddr, host: &str) -> String {
    request_as(addr, "GET", host, "/")
}

/// `method path` of `addr` with `Host: host`: the body on 200, else `HTTP <status line>`.
fn request_as(addr: SocketAddr, method: &str, host: &str, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut b = String::new();
    s.read_to_string(&mut b).unwrap();
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return format!("HTTP {}", head.lines().next().unwrap_or(""));
    }
    body.trim().to_string()
}

/// Keep-alive and fresh-connection load on `addr` with `Host: host` (None: the address).
fn load(addr: SocketAddr, host: Option<&str>) -> (Load, Load) {
    let start = |keep_alive| {
        Load::start(LoadOptions {
            keep_alive,
            host_header: host.map(str::to_string),
            ..LoadOptions::new(vec![addr])
        })
    };
    (start(true), start(false))
}

fn stop(what: &str, (ka, fresh): (Load, Load)) -> Vec<String> {
    let (ka, fresh) = (ka.stop(), fresh.stop());
    eprintln!(
        "{what}: keep-alive {} ok {} failed, fresh {} ok {} failed, bodies {:?}",
        ka.ok, ka.failed, fresh.ok, fresh.failed, ka.bodies
    );
    ka.assert_no_failures();
    fresh.assert_no_failures();
    assert!(ka.ok > 0 && fresh.ok > 0, "{what}: the load ran");
    ka.bodies.keys().cloned().collect()
}

/// The preview's containers on host 0 (`web-pr-7-...`).
fn preview_containers(w: &World) -> Vec<String> {
    w.containers_on(0)
        .into_iter()
        .filter(|c| c.starts_with("web-pr-7-"))
        .collect()
}

#[test]
fn a_preview_is_deployed_redeployed_under_load_and_removed_leaving_nothing_while_production_serves()
{
    let w = World::containers(1, "blue-green")
        .lines(
            "preview",
            "domain = \"preview.test\"\nmax = 1\nenv = { API_URL = \"https://staging.test\" }",
        )
        .start();
    for tag in ["prod", "p1", "p2", "p3", "p4"] {
        w.image(tag, true);
    }
    let prod = w.deploy_ok("prod");
    let addr = w.http_addr(0);
    let production = load(addr, None);

    // Opened: the preview is an app of its own, routed by its host name.
    let r = w.run(&["preview", "deploy", "--pr", "7", "--image", "p1", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    let p1 = r.release();
    assert_eq!(r.json["app"], "web-pr-7");
    assert_eq!(
        w.norm_with(r.message(), &[(&p1, "<p1>")]),
        "deployed <p1> (<registry>/web@sha256:<digest>) on 1 host(s) with blue-green; \
         every host passed its health gate through the proxy"
    );
    assert_eq!(get_as(addr, HOST), "p1");
    assert_eq!(
        w.served(0),
        "prod",
        "production keeps every other host name"
    );

    // Three pushes to the pull request under load through the preview: no request fails.
    let preview = load(addr, Some(HOST));
    for tag in ["p2", "p3", "p4"] {
        let r = w.run(&["preview", "deploy", "--pr", "7", "--image", tag, "--json"]);
        assert_eq!(r.code, 0, "{tag}: {} {}", r.json, r.stderr);
    }
    let seen = stop("preview", preview);
    assert!(seen.iter().any(|b| b.trim() == "p4"), "{seen:?}");
    assert!(seen.iter().all(|b| b.trim() != "prod"), "{seen:?}");
    assert_eq!(get_as(addr, HOST), "p4");

    // Its environment: [preview] env and its own URL, never production's env.
    let running: Vec<String> = preview_containers(&w)
        .into_iter()
        .filter(|c| c.ends_with(" running"))
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
    let name = running[0].split(' ').next().unwrap();
    let env = w.lab().docker(0, &["exec", name, "env"]);
    let env = String::from_utf8_lossy(&env.stdout).to_string();
    assert!(env.contains("API_URL=https://staging.test\n"), "{env}");
    assert!(env.contains("CUTOVER_PR=7\n"), "{env}");
    assert!(
        env.contains(&format!("CUTOVER_PREVIEW_URL=http://{HOST}\n")),
        "{env}"
    );
    assert!(!env.contains("GREETING"), "production's env leaked: {env}");

    // Listed; `max` = 1 refuses a second one with a message saying so.
    let l = w.run(&["preview", "list", "--json"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    let rows = l.json.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["pr"], 7);
    assert_eq!(rows[0]["state"], "open");
    assert_eq!(rows[0]["url"], format!("http://{HOST}"));
    assert_eq!(rows[0]["head_ref"], "p4");
    let r = w.run(&["preview", "deploy", "--pr", "8", "--image", "p1", "--json"]);
    assert_eq!(r.code, 2, "{}", r.json);
    assert_eq!(
        r.message(),
        "web already has 1 open preview(s) (#7) and [preview] max is 1: no preview for #8; remove one first (cutover preview remove --pr N)"
    );
    assert!(w
        .containers_on(0)
        .iter()
        .all(|c| !c.starts_with("web-pr-8")));

    // Closed: nothing of it is left on the host, its history is kept.
    let before = preview_containers(&w).len();
    assert!(before >= 2, "the last and the one before it are kept");
    let r = w.run(&["preview", "remove", "--pr", "7", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert_eq!(
        r.json["message"],
        format!("removed the preview of #7 (web-pr-7) from 1 host(s): its proxy route, {before} container(s) and its directory; its history is kept")
    );
    assert_eq!(preview_containers(&w), Vec::<String>::new());
    assert!(!w.lab().srv_dir(0).join("cutover/apps/web-pr-7").exists());
    assert!(w.lab().srv_dir(0).join("cutover/apps/web").exists());
    let status = w.lab().ssh(
        0,
        "/srv/cutover/cutover proxy status --dir /srv/cutover --json",
    );
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(!status.contains("web-pr-7"), "{status}");
    assert!(!status.contains(HOST), "{status}");
    assert_eq!(
        get_as(addr, HOST),
        "prod",
        "an unknown host name goes to production again"
    );
    let l = w.run(&["preview", "list", "--all", "--json"]);
    assert_eq!(l.json[0]["state"], "removed");
    let kept =
        w.count("SELECT COUNT(*) FROM releases WHERE app = 'web-pr-7' AND status = 'succeeded'");
    assert_eq!(kept, 4);

    // Production was untouched all along: same release, same container, no failed request.
    let seen = stop("production", production);
    assert_eq!(seen, ["prod"]);
    let h = w.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["id"], prod.as_str());
    assert_eq!(w.served(0), "prod");
    let prod_running = w
        .containers_on(0)
        .into_iter()
        .filter(|c| c.ends_with(" running"))
        .collect::<Vec<_>>();
    assert_eq!(prod_running, [format!("web-{prod} running")]);
}

/// A `pull_request` event as GitHub documents it (the fields cutover reads, and a few more).
fn pr_body(action: &str, number: u64, head_sha: &str, head_repo: &str, labels: &[&str]) -> Vec<u8> {
    let labels: Vec<serde_json::Value> = labels
        .iter()
        .map(|l| serde_json::json!({ "name": l }))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "state": if action == "closed" { "closed" } else { "open" },
            "merged": false,
            "labels": labels,
            "head": { "ref": "feature", "sha": head_sha, "repo": { "full_name": head_repo } },
            "base": { "ref": "main", "sha": "0".repeat(40), "repo": { "full_name": "acme/site" } },
        },
        "repository": { "full_name": "acme/site" },
        "sender": { "login": "ada" },
    }))
    .unwrap()
}

/// Waits (up to 240 s: previews are built and deployed on a loaded machine) until `done`.
fn wait_for(what: &str, done: impl FnMut() -> bool) {
    wait_until(Duration::from_secs(240), what, done);
}

#[test]
fn signed_pull_request_events_build_the_head_sha_into_a_preview_and_closing_removes_it() {
    use crate::git_containers::{commit, world, DOCKERFILE};
    use crate::webhooks::{github, Forge};
    let forge = Forge::start();
    let w = world(1);
    let api = format!("http://{}", forge.addr);
    w.configure(move |t| {
        t.lines(
            "webhook",
            "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"\nstatus_token_env = \"FORGE_TOKEN\"",
        )
        .set_str("webhook", "api_url", &api)
        .lines("preview", "domain = \"preview.test\"\nmax = 1");
    });
    commit(&w, "main page", "first", Some(DOCKERFILE));
    w.git(&["checkout", "-q", "-b", "feature"]);
    let head = w.commit(
        "the feature",
        &[("rootfs/www/index.html", "feature page\n")],
    );
    w.git(&["push", "-q", "--force", "origin", "feature"]);
    // The server builds with host 0's daemon, as the CLI does (it trusts the lab registry).
    let docker = w.lab().docker_host(0);
    let s = Server::start_with(
        &w,
        &[
            ("DOCKER_HOST", docker.as_str()),
            ("FORGE_TOKEN", "tok-forge-123"),
        ],
    );
    let hook = "/hooks/github/web";
    let host = "pr-3-web.preview.test";
    let addr = w.http_addr(0);

    // From a fork without the label: not built.
    let body = pr_body("opened", 3, &head, "eve/site", &[]);
    let (st, b) = s.post(hook, &github("pull_request", "f1", Some(&body)), body);
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        b["ignored"],
        "pull request #3 comes from a fork (eve/site) and is not labelled cutover-preview"
    );
    assert!(w.containers_on(0).is_empty());

    // Opened from the repository itself: the head SHA is built and served at its host name.
    let body = pr_body("opened", 3, &head, "acme/site", &[]);
    let (st, b) = s.post(hook, &github("pull_request", "o1", Some(&body)), body);
    assert_eq!(st, 202, "{b}");
    let run: i64 = b["run"].as_str().unwrap().parse().unwrap();
    let db = w.db();
    wait_for("the preview run ends", || {
        db.query_row(
            "SELECT finished_at IS NOT NULL FROM runs WHERE id = ?1",
            [run],
            |r| r.get::<_, bool>(0),
        )
        .unwrap_or(false)
    });
    let (app, commit_sha): (String, String) = db
        .query_row(
            "SELECT app, commit_sha FROM releases ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (app.as_str(), commit_sha.as_str()),
        ("web-pr-3", head.as_str())
    );
    assert_eq!(get_as(addr, host), "feature page");
    let l = w.run(&["preview", "list", "--json"]);
    assert_eq!(l.json[0]["head_sha"], head.as_str());
    // Commit statuses on the head SHA: pending, then success linking the preview.
    let success = forge.pending_then_success(
        0,
        &format!("POST /repos/acme/site/statuses/{head} HTTP/1.1"),
        "Bearer tok-forge-123",
        "context",
    );
    assert_eq!(success["target_url"], format!("http://{host}"));
    assert_eq!(
        success["description"],
        format!("{} is served at http://{host}", &head[..7])
    );

    // `max` = 1: a second pull request is refused, with a failure status saying so.
    let body = pr_body("opened", 5, &head, "acme/site", &[]);
    let (st, b) = s.post(hook, &github("pull_request", "o5", Some(&body)), body);
    let why = "web already has 1 open preview(s) (#3) and [preview] max is 1: no preview for #5; remove one first (cutover preview remove --pr N)";
    assert_eq!((st, b["error"].as_str()), (422, Some(why)), "{b}");
    let calls = forge.calls(3);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[2].2["state"], "failure");
    assert_eq!(calls[2].2["description"], why);
    assert!(w
        .containers_on(0)
        .iter()
        .all(|c| !c.starts_with("web-pr-5")));

    // Closed: torn down, history kept.
    let body = pr_body("closed", 3, &head, "acme/site", &[]);
    let (st, b) = s.post(hook, &github("pull_request", "c1", Some(&body)), body);
    assert_eq!((st, &b["removing"]), (202, &serde_json::json!(3)), "{b}");
    wait_for("the preview is removed", || {
        w.run(&["preview", "list", "--all", "--json"]).json[0]["state"] == "removed"
    });
    assert!(w
        .containers_on(0)
        .iter()
        .all(|c| !c.starts_with("web-pr-3")));
    assert!(!w.lab().srv_dir(0).join("cutover/apps/web-pr-3").exists());
    assert_eq!(get_as(addr, host), "HTTP HTTP/1.1 404 Not Found");
}

#[test]
fn the_reconcile_loop_removes_previews_the_store_does_not_know_and_idle_ones() {
    let w = World::containers(1, "blue-green")
        .lines("preview", "domain = \"preview.test\"\nttl = \"40s\"")
        .start();
    w.image("p1", true);
    for pr in ["5", "6"] {
        let r = w.run(&["preview", "deploy", "--pr", pr, "--image", "p1", "--json"]);
        assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    }
    // A crash between steps or a missed webhook: the store no longer knows #6.
    w.db()
        .execute("DELETE FROM previews WHERE pr = 6", [])
        .unwrap();
    let addr = w.http_addr(0);
    assert_eq!(get_as(addr, "pr-6-web.preview.test"), "p1");
    let s = Server::start_args(&w, &[], &["--preview-check", "1s"]);
    let on_host = |pr: &str| {
        let prefix = format!("web-pr-{pr}-");
        w.containers_on(0).iter().any(|c| c.starts_with(&prefix))
            || w.lab()
                .srv_dir(0)
                .join(format!("cutover/apps/web-pr-{pr}"))
                .exists()
    };
    wait_for("the unknown preview is removed", || !on_host("6"));
    assert_eq!(
        get_as(addr, "pr-6-web.preview.test"),
        "HTTP HTTP/1.1 404 Not Found"
    );
    // #5 is open and young: kept, until it has been idle for the ttl.
    assert!(on_host("5"));
    assert_eq!(get_as(addr, "pr-5-web.preview.test"), "p1");
    // The server takes the preview off the host first and records it as removed after: the
    // record is waited for too (the list read "open" in the moment between, in a CI run).
    let listed = || w.run(&["preview", "list", "--all", "--json"]).json;
    wait_for("the idle preview is removed", || {
        !on_host("5") && listed()[0]["state"] == "removed"
    });
    let l = w.run(&["preview", "list", "--all", "--json"]);
    assert_eq!(l.json[0]["pr"], 5);
    assert_eq!(l.json[0]["state"], "removed");
    assert_eq!(
        l.json[0]["removed_why"],
        "idle longer than [preview] ttl (40s)"
    );
    assert!(
        s.log().contains(
            "preview #6 of web removed: on a preview host but not an open preview the server knows"
        ),
        "{}",
        s.log()
    );
}

#[test]
fn a_server_killed_mid_preview_deploy_has_the_preview_finished_after_restart() {
    use crate::git_containers::{commit, world, DOCKERFILE};
    use crate::webhooks::github;
    let w = world(1);
    w.configure(|t| {
        t.lines(
            "webhook",
            "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"",
        )
        .lines("preview", "domain = \"preview.test\"");
    });
    commit(&w, "main page", "first", Some(DOCKERFILE));
    w.git(&["checkout", "-q", "-b", "feature"]);
    let head = w.commit(
        "the feature",
        &[("rootfs/www/index.html", "feature page\n")],
    );
    w.git(&["push", "-q", "--force", "origin", "feature"]);
    let docker = w.lab().docker_host(0);
    let addr = w.http_addr(0);
    let host = "pr-4-web.preview.test";

    // The server kills itself (SIGKILL) once the preview's host switched, before the gate.
    let mut s = Server::start_args(
        &w,
        &[
            ("DOCKER_HOST", docker.as_str()),
            ("CUTOVER_CRASH_AT", "after-switch"),
        ],
        &["--preview-check", "1h"],
    );
    let body = pr_body("opened", 4, &head, "acme/site", &[]);
    let (st, b) = s.post(
        "/hooks/github/web",
        &github("pull_request", "k1", Some(&body)),
        body,
    );
    assert_eq!(st, 202, "{b}");
    let status = s.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed mid-deploy"
    );
    drop(s);
    let unfinished =
        w.count("SELECT COUNT(*) FROM runs WHERE app = 'web-pr-4' AND finished_at IS NULL");
    assert_eq!(unfinished, 1);

    // Restarted: the loop finds the interrupted preview and deploys its head again.
    let s = Server::start_args(
        &w,
        &[("DOCKER_HOST", docker.as_str())],
        &["--preview-check", "1s"],
    );
    let db = w.db();
    wait_for("the preview is finished", || {
        db.query_row(
            "SELECT COUNT(*) FROM runs WHERE app = 'web-pr-4' AND outcome = 'succeeded' AND finished_at IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    });
    assert_eq!(get_as(addr, host), "feature page", "{}", s.log());
    let runs: Vec<(String, Option<String>)> = {
        let mut st = db
            .prepare("SELECT outcome, finished_at FROM runs WHERE app = 'web-pr-4' ORDER BY id")
            .unwrap();
        st.query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                r.get(1)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().all(|(_, f)| f.is_some()), "{runs:?}");
    assert_eq!(runs[1].0, "succeeded", "{runs:?}");
    // The release the restarted server deployed runs (the interrupted one's container, its
    // release marked partial, is no longer routed and goes with pruning or the removal).
    let release: String = db
        .query_row(
            "SELECT id FROM releases WHERE app = 'web-pr-4' AND status = 'succeeded'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        w.containers_on(0)
            .contains(&format!("web-pr-4-{release} running")),
        "{:?}",
        w.containers_on(0)
    );
}

#[test]
fn preview_deploy_list_and_remove_run_through_a_server() {
    let w = World::containers(1, "blue-green")
        .lines("preview", "domain = \"preview.test\"")
        .start();
    w.image("p1", true);
    let token = token(&w, "ci", "deployer", &[]);
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    let url = format!("http://{}", s.addr);
    let through = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--server", &url]);
        w.cutover(&a).env("CUTOVER_TOKEN", &token).run()
    };
    let r = through(&["preview", "deploy", "--pr", "11", "--image", "p1", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert_eq!(r.json["status"], "succeeded", "{}", r.json);
    assert_eq!(get_as(w.http_addr(0), "pr-11-web.preview.test"), "p1");
    let l = through(&["preview", "list", "--json"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert_eq!(l.json[0]["pr"], 11);
    assert_eq!(l.json[0]["url"], "http://pr-11-web.preview.test");
    let r = through(&["preview", "remove", "--pr", "11", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert!(r.json["message"]
        .as_str()
        .unwrap()
        .starts_with("removed the preview of #11 (web-pr-11) from 1 host(s)"));
    assert!(w
        .containers_on(0)
        .iter()
        .all(|c| !c.starts_with("web-pr-11")));
    let l = through(&["preview", "list", "--all", "--json"]);
    assert_eq!(l.json[0]["state"], "removed");
    assert_eq!(l.json[0]["removed_why"], "removed by token:ci (API)");
}

#[test]
fn the_panel_lists_previews_and_removes_one_after_a_confirmation() {
    use testlab::Browser;
    let w = World::containers(1, "blue-green")
        .lines("preview", "domain = \"preview.test\"")
        .start();
    w.image("p1", true);
    let r = w.run(&["preview", "deploy", "--pr", "12", "--image", "p1", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    add_user(&w, "ada", "admin", "correct horse battery staple");
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    let b = Browser::start(1100, 900);
    b.goto(&s.url("/apps/web"));
    log_in(&b, &s, "ada", "correct horse battery staple");
    b.wait_for("the app page", Duration::from_secs(20), || {
        b.exists("#previews-link").then_some(())
    });
    b.click("#previews-link");
    b.wait_for("the previews page", Duration::from_secs(10), || {
        b.exists("#previews").then_some(())
    });
    assert_eq!(
        b.text("#preview-12 .preview-url"),
        "http://pr-12-web.preview.test"
    );
    assert_eq!(b.text("#preview-12 .head"), "p1");
    b.click("#preview-12 button");
    b.wait_for("the confirmation", Duration::from_secs(10), || {
        b.exists("#question").then_some(())
    });
    assert_eq!(
        b.text("#question"),
        "Remove the preview of pull request #12 of web? Its history is kept."
    );
    b.click("#confirm");
    b.wait_for("the previews page again", Duration::from_secs(60), || {
        b.exists("#no-previews").then_some(())
    });
    assert!(b.url().ends_with("/apps/web/previews"), "{}", b.url());
    assert!(w
        .containers_on(0)
        .iter()
        .all(|c| !c.starts_with("web-pr-12")));
    assert_eq!(
        get_as(w.http_addr(0), "pr-12-web.preview.test"),
        "HTTP HTTP/1.1 404 Not Found"
    );
    let l = w.run(&["preview", "list", "--all", "--json"]);
    assert_eq!(l.json[0]["removed_why"], "removed by ada (panel)");
}

// ---- files apps: previews served by the edge proxy as a static target ----

/// A files app on one lab host (nginx serves production from `/srv/site`) whose previews are
/// served by the host's edge proxy (installed here by `cutover setup`), built from the
/// world's git repository; `extra` changes the config.
fn files_world(extra: impl FnOnce(&mut Toml) + 'static) -> World {
    let w = World::files(1)
        .git()
        .config(|t| {
            t.set_str("proxy", "listen", format!("0.0.0.0:{PROXY_PORT}"))
                .lines("proxy", "drain = \"2s\"\ninstall_dir = \"/srv/cutover\"")
                .lines("preview", "domain = \"preview.test\"");
            extra(t);
        })
        .start();
    let r = w.run(&["setup", "--json"]);
    assert_eq!(r.code, 0, "setup: {} {}", r.stdout, r.stderr);
    w
}

/// Commits a site whose `/` says `page` (with `/up`), pushes main, returns the full SHA.
fn site_commit(w: &World, page: &str, extra: &[(&str, &str)]) -> String {
    let index = format!("{page}\n");
    let mut files = vec![("index.html", index.as_str()), ("up", "ok\n")];
    files.extend_from_slice(extra);
    let sha = w.commit(page, &files);
    w.push();
    sha
}

/// Host 0's edge proxy.
pub(crate) fn proxy_addr(w: &World) -> SocketAddr {
    SocketAddr::new(w.lab().ip(0).into(), PROXY_PORT)
}

/// The services host 0's proxy routes, with their domains and targets.
pub(crate) fn proxy_services(w: &World) -> Vec<serde_json::Value> {
    let out = w.lab().ssh(
        0,
        "/srv/cutover/cutover proxy status --dir /srv/cutover --json",
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "proxy status: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    status["services"].as_array().cloned().unwrap_or_default()
}

/// The preview directories on host 0.
pub(crate) fn preview_dirs(w: &World) -> Vec<String> {
    crate::world::names_in(&w.lab().srv_dir(0).join("cutover/apps"))
}

#[test]
fn a_files_preview_is_served_by_the_proxy_at_its_host_name_redeployed_under_load_and_removed() {
    let w = files_world(|_| {});
    let r = w.deploy_artifact(&w.build("prod"));
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    let host = "pr-7-site.preview.test";
    let proxy = proxy_addr(&w);
    let production = load(w.http_addr(0), None);

    // Opened: built from its commit, served by the proxy at its own host name.
    let p1 = site_commit(&w, "p1", &[]);
    let r = w.run(&["preview", "deploy", "--pr", "7", "--ref", &p1, "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert_eq!(r.json["app"], "site-pr-7");
    assert_eq!(r.json["commit"], p1.as_str());
    let id = r.release();
    assert_eq!(
        w.norm_with(r.message(), &[(&id, "<p1>")]),
        "deployed <p1> on 1 host(s); every host passed its health gate"
    );
    assert_eq!(get_as(proxy, host), "p1");
    assert_eq!(w.served(0), "prod", "nginx serves production");
    assert_eq!(
        get_as(proxy, "www.example.test"),
        "HTTP HTTP/1.1 404 Not Found"
    );
    let services = proxy_services(&w);
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(services[0]["name"], "site-pr-7");
    assert_eq!(services[0]["domains"], serde_json::json!([host]));
    assert_eq!(services[0]["target"], "/srv/cutover/apps/site-pr-7/current");

    // Three pushes under load through the proxy: no request fails.
    let preview = load(proxy, Some(host));
    for page in ["p2", "p3", "p4"] {
        let sha = site_commit(&w, page, &[]);
        let r = w.run(&["preview", "deploy", "--pr", "7", "--ref", &sha, "--json"]);
        assert_eq!(r.code, 0, "{page}: {} {}", r.json, r.stderr);
    }
    let seen = stop("preview", preview);
    assert!(seen.iter().any(|b| b.trim() == "p4"), "{seen:?}");
    assert!(seen.iter().all(|b| b.trim() != "prod"), "{seen:?}");
    assert_eq!(get_as(proxy, host), "p4");

    // What the static target refuses: cutover's own dotfile, a way out of the release
    // (`..`, a symlink that leads out, made by hand here: artifacts cannot carry one), a
    // directory listing, and methods that are not GET or HEAD.
    let dir = w.lab().srv_dir(0).join("cutover/apps/site-pr-7");
    let current = dir.join("current");
    assert!(current.join(".cutover-release.json").is_file());
    std::os::unix::fs::symlink(
        "../../../../../site/current/index.html",
        current.join("leak"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(current.join("leak")).unwrap(),
        "prod\n",
        "the link does lead to production's page"
    );
    std::fs::create_dir(current.join("assets")).unwrap();
    std::fs::write(current.join("assets/app.css"), "body{}\n").unwrap();
    assert_eq!(request_as(proxy, "GET", host, "/assets/app.css"), "body{}");
    let up = "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/site/current/index.html";
    for path in ["/.cutover-release.json", "/leak", up, "/assets/"] {
        assert_eq!(
            request_as(proxy, "GET", host, path),
            "HTTP HTTP/1.1 404 Not Found",
            "{path}"
        );
    }
    assert_eq!(
        request_as(proxy, "POST", host, "/"),
        "HTTP HTTP/1.1 405 Method Not Allowed"
    );

    // Removed: route, releases and directory go; its history is kept.
    let r = w.run(&["preview", "remove", "--pr", "7", "--json"]);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert_eq!(
        r.json["message"],
        "removed the preview of #7 (site-pr-7) from 1 host(s): its proxy route and its directory; its history is kept"
    );
    assert!(!dir.exists());
    assert_eq!(proxy_services(&w), Vec::<serde_json::Value>::new());
    assert_eq!(get_as(proxy, host), "HTTP HTTP/1.1 404 Not Found");
    let l = w.run(&["preview", "list", "--all", "--json"]);
    assert_eq!(l.json[0]["state"], "removed");
    let kept =
        w.count("SELECT COUNT(*) FROM releases WHERE app = 'site-pr-7' AND status = 'succeeded'");
    assert_eq!(kept, 4);

    // Production was untouched all along.
    let seen = stop("production", production);
    assert_eq!(seen, ["prod"]);
    assert_eq!(w.history().len(), 1);
    assert_eq!(w.served(0), "prod");
}

/// The run ids of a batch of deliveries, once each has ended; panics on a run that failed.
fn await_runs(w: &World, runs: &[i64]) {
    let db = w.db();
    wait_for("the preview runs end", || {
        runs.iter().all(|run| {
            db.query_row(
                "SELECT finished_at IS NOT NULL FROM runs WHERE id = ?1",
                [run],
                |r| r.get::<_, bool>(0),
            )
            .unwrap_or(false)
        })
    });
    for run in runs {
        let outcome: Option<String> = db
            .query_row("SELECT outcome FROM runs WHERE id = ?1", [run], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(outcome.as_deref(), Some("succeeded"), "run {run}");
    }
}

/// The state of pull request `pr`'s preview row (of app `site`, or `app`).
fn preview_state(w: &World, pr: u64) -> String {
    preview_state_of(w, "site", pr)
}

fn preview_state_of(w: &World, app: &str, pr: u64) -> String {
    w.db()
        .query_row(
            "SELECT state FROM previews WHERE app = ?1 AND pr = ?2",
            rusqlite::params![app, pr],
            |r| r.get(0),
        )
        .unwrap_or_else(|_| "none".into())
}

const FILES_HOOK: &str =
    "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"";

/// 20 pull requests, five at a time, each opened, pushed to and closed through the
/// server's webhook: every preview is served at its host name after each push, and nothing of
/// any of them is left on the host (directory, route) once closed; their rows and history are
/// kept.
#[test]
fn twenty_files_previews_opened_pushed_and_closed_through_webhooks_leave_nothing_behind() {
    use crate::webhooks::github;
    let w = files_world(|t| {
        t.lines("webhook", FILES_HOOK).lines("preview", "max = 5");
    });
    let first = site_commit(&w, "first", &[]);
    let second = site_commit(&w, "second", &[]);
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    let proxy = proxy_addr(&w);
    let started = std::time::Instant::now();
    for round in 0..4u64 {
        let prs: Vec<u64> = (1..=5).map(|i| round * 5 + i).collect();
        for (action, head, page) in [
            ("opened", &first, "first"),
            ("synchronize", &second, "second"),
        ] {
            let runs: Vec<i64> = prs
                .iter()
                .map(|pr| {
                    let body = pr_body(action, *pr, head, "acme/site", &[]);
                    let id = format!("{action}-{pr}");
                    let (st, b) = s.post(
                        "/hooks/github/site",
                        &github("pull_request", &id, Some(&body)),
                        body,
                    );
                    assert_eq!(st, 202, "#{pr} {action}: {b}");
                    b["run"].as_str().unwrap().parse().unwrap()
                })
                .collect();
            await_runs(&w, &runs);
            for pr in &prs {
                assert_eq!(
                    get_as(proxy, &format!("pr-{pr}-site.preview.test")),
                    page,
                    "#{pr}"
                );
            }
        }
        for pr in &prs {
            let body = pr_body("closed", *pr, &second, "acme/site", &[]);
            let (st, b) = s.post(
                "/hooks/github/site",
                &github("pull_request", &format!("closed-{pr}"), Some(&body)),
                body,
            );
            assert_eq!((st, &b["removing"]), (202, &serde_json::json!(pr)), "{b}");
        }
        wait_for("the round's previews are removed", || {
            prs.iter().all(|pr| preview_state(&w, *pr) == "removed")
        });
    }
    eprintln!(
        "20 open/synchronize/close cycles in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        preview_dirs(&w),
        Vec::<String>::new(),
        "no preview directory is left"
    );
    assert_eq!(
        proxy_services(&w),
        Vec::<serde_json::Value>::new(),
        "no route is left"
    );
    for pr in 1..=20 {
        assert_eq!(
            get_as(proxy, &format!("pr-{pr}-site.preview.test")),
            "HTTP HTTP/1.1 404 Not Found"
        );
    }
    let (rows, releases): (i64, i64) = w
        .db()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM previews WHERE app = 'site' AND removed_at IS NOT NULL), \
             (SELECT COUNT(*) FROM releases WHERE app LIKE 'site-pr-%' AND status = 'succeeded')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, releases), (20, 40), "rows and history are kept");
    assert!(!s.log().contains("not removed"), "{}", s.log());
}

/// A pull request closed while its preview's run is in progress: the removal waits for the
/// run to end (it is not cut short, and it does not run beside it), a push waiting behind
/// that run is dropped, then everything of the preview goes; and when the server is killed
/// while the removal waits, the restarted server removes the preview.
#[test]
fn a_pull_request_closed_during_its_preview_run_is_removed_once_the_run_ends() {
    use crate::webhooks::github;
    let w = files_world(|t| {
        t.lines("webhook", FILES_HOOK)
            .lines("build", "command = \"sh build.sh\"\noutput = \"out\"");
    });
    let build = "mkdir -p out && cp index.html up out/\n";
    let fast = site_commit(&w, "fast", &[("build.sh", build)]);
    let slow_build = format!("sleep 8\n{build}");
    let slow = site_commit(&w, "slow", &[("build.sh", &slow_build)]);
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    let proxy = proxy_addr(&w);
    let host = "pr-9-site.preview.test";
    let hook = "/hooks/github/site";
    let post_to = |s: &Server, action: &str, head: &str, id: &str| {
        let body = pr_body(action, 9, head, "acme/site", &[]);
        s.post(hook, &github("pull_request", id, Some(&body)), body)
    };
    let post = |action: &str, head: &str, id: &str| post_to(&s, action, head, id);
    let (st, b) = post("opened", &fast, "o9");
    assert_eq!(st, 202, "{b}");
    await_runs(&w, &[b["run"].as_str().unwrap().parse().unwrap()]);
    assert_eq!(get_as(proxy, host), "fast");

    // A push whose build takes a while, a push waiting behind it, then the close.
    let (st, b) = post("synchronize", &slow, "s9");
    assert_eq!(st, 202, "{b}");
    let run: i64 = b["run"].as_str().unwrap().parse().unwrap();
    let (st, b) = post("synchronize", &fast, "s9-again");
    assert_eq!(
        (st, b["queued"].as_str()),
        (202, Some(fast.as_str())),
        "{b}"
    );
    let running = |run: i64| -> bool {
        w.db()
            .query_row(
                "SELECT finished_at IS NULL FROM runs WHERE id = ?1",
                [run],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(running(run), "the slow run is still in progress");
    let (st, b) = post("closed", &slow, "c9");
    assert_eq!((st, &b["removing"]), (202, &serde_json::json!(9)), "{b}");
    wait_for("the preview is closing", || preview_state(&w, 9) != "open");
    assert_eq!(
        preview_state(&w, 9),
        "closing",
        "the removal waits for the run"
    );
    assert!(running(run), "closed during the run");

    // The run finishes (it was not cut short); then the preview is removed.
    wait_for("the preview is removed", || {
        preview_state(&w, 9) == "removed"
    });
    await_runs(&w, &[run]);
    let (finished, removed): (String, String) = w
        .db()
        .query_row(
            "SELECT r.finished_at, p.removed_at FROM runs r, previews p WHERE r.id = ?1 AND p.app = 'site' AND p.pr = 9",
            [run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        removed >= finished,
        "removed at {removed}, the run finished at {finished}"
    );
    let dropped: String = w
        .db()
        .query_row(
            "SELECT outcome FROM webhook_deliveries WHERE delivery = 's9-again'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dropped, "dropped: the pull request was closed");
    assert_eq!(preview_dirs(&w), Vec::<String>::new());
    assert_eq!(proxy_services(&w), Vec::<serde_json::Value>::new());
    assert_eq!(get_as(proxy, host), "HTTP HTTP/1.1 404 Not Found");
    let runs = w.count("SELECT COUNT(*) FROM runs WHERE app = 'site-pr-9'");
    assert_eq!(runs, 2, "the dropped push never ran");
    assert!(
        s.log()
            .contains("preview #9 of site removed: pull request closed (webhook:github)"),
        "{}",
        s.log()
    );

    // Reopened, and closed during a run again, but the server is killed (SIGKILL) before the
    // removal: the restarted server removes it at its start, as the close said.
    let (st, b) = post("reopened", &fast, "r9");
    assert_eq!(st, 202, "{b}");
    await_runs(&w, &[b["run"].as_str().unwrap().parse().unwrap()]);
    assert_eq!(get_as(proxy, host), "fast");
    let (st, b) = post("synchronize", &slow, "s9-3");
    assert_eq!(st, 202, "{b}");
    let (st, b) = post("closed", &slow, "c9-2");
    assert_eq!((st, &b["removing"]), (202, &serde_json::json!(9)), "{b}");
    wait_for("the preview is closing", || preview_state(&w, 9) != "open");
    assert_eq!(preview_state(&w, 9), "closing");
    drop(s);
    assert!(!preview_dirs(&w).is_empty(), "killed before the removal");
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    wait_for("the preview is removed after the restart", || {
        preview_state(&w, 9) == "removed"
    });
    assert_eq!(preview_dirs(&w), Vec::<String>::new());
    assert_eq!(proxy_services(&w), Vec::<serde_json::Value>::new());
    assert_eq!(get_as(proxy, host), "HTTP HTTP/1.1 404 Not Found");
    let l = w.run(&["preview", "list", "--all", "--json"]);
    assert_eq!(
        l.json[0]["removed_why"],
        "pull request closed (webhook:github)"
    );
    assert!(
        s.log()
            .contains("preview #9 of site removed: pull request closed (webhook:github)"),
        "{}",
        s.log()
    );
}

/// 20 container previews through the same cycle, ten at a time: opened (image `a`), pushed to
/// (image `b`) by concurrent `preview deploy` runs (a container app's webhook would build
/// from git: the files test above covers that path), closed by the server's webhook. No
/// container labelled with a preview app, no preview directory and no route is left; rows
/// and history are kept. Short drain and stop timeouts keep it cheap.
#[test]
fn twenty_container_previews_opened_pushed_and_closed_ten_at_a_time_leave_nothing_behind() {
    use crate::webhooks::github;
    const ROUNDS: u64 = 2;
    const AT_ONCE: u64 = 10;
    let w = World::containers(1, "blue-green")
        .lines("webhook", FILES_HOOK)
        .lines("preview", "domain = \"preview.test\"\nmax = 10")
        .lines("proxy", "drain = \"200ms\"")
        .lines("container", "stop_timeout = \"1s\"")
        // Ten deploys at once on a loaded machine: a generous gate (a passing one is not slower).
        .lines("health", "give_up_after = \"30s\"")
        .start();
    for tag in ["a", "b"] {
        w.image(tag, true);
    }
    let s = Server::start_args(&w, &[], &["--preview-check", "1h"]);
    let addr = w.http_addr(0);
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        let prs: Vec<String> = (1..=AT_ONCE)
            .map(|i| (round * AT_ONCE + i).to_string())
            .collect();
        for tag in ["a", "b"] {
            let runs: Vec<crate::world::Run> = std::thread::scope(|sc| {
                let started: Vec<_> = prs
                    .iter()
                    .map(|pr| {
                        let c =
                            w.cutover(&["preview", "deploy", "--pr", pr, "--image", tag, "--json"]);
                        sc.spawn(move || c.run())
                    })
                    .collect();
                started.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (pr, r) in prs.iter().zip(&runs) {
                assert_eq!(r.code, 0, "#{pr} {tag}: {} {}", r.json, r.stderr);
                assert_eq!(get_as(addr, &format!("pr-{pr}-web.preview.test")), tag);
            }
            eprintln!(
                "round {round}: {tag} deployed at {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        for pr in &prs {
            let n: u64 = pr.parse().unwrap();
            let body = pr_body("closed", n, &"b".repeat(40), "acme/site", &[]);
            let (st, b) = s.post(
                "/hooks/github/web",
                &github("pull_request", &format!("closed-{pr}"), Some(&body)),
                body,
            );
            assert_eq!((st, &b["removing"]), (202, &serde_json::json!(n)), "{b}");
        }
        wait_for("the round's previews are removed", || {
            prs.iter()
                .all(|pr| preview_state_of(&w, "web", pr.parse().unwrap()) == "removed")
        });
        eprintln!(
            "round {round}: removed at {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "{} container preview cycles in {:.1}s",
        ROUNDS * AT_ONCE,
        started.elapsed().as_secs_f64()
    );
    let labelled = w.lab().docker(
        0,
        &[
            "ps",
            "-a",
            "--filter",
            "label=cutover.app",
            "--format",
            "{{.Names}}",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&labelled.stdout),
        "",
        "no preview container is left"
    );
    assert_eq!(w.containers_on(0), Vec::<String>::new());
    assert_eq!(
        preview_dirs(&w),
        Vec::<String>::new(),
        "no preview directory is left"
    );
    assert_eq!(
        proxy_services(&w),
        Vec::<serde_json::Value>::new(),
        "no route is left"
    );
    let (rows, releases): (i64, i64) = w
        .db()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM previews WHERE app = 'web' AND state = 'removed'), \
             (SELECT COUNT(*) FROM releases WHERE app LIKE 'web-pr-%' AND status = 'succeeded')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let cycles = (ROUNDS * AT_ONCE) as i64;
    assert_eq!((rows, releases), (cycles, 2 * cycles));
    assert!(!s.log().contains("not removed"), "{}", s.log());
}

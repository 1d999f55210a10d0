//! Webhooks against a real `cutover serve`, real test hosts and a real git repository the
//! test commits and pushes to: deliveries shaped like the forges' `push` and `ping` events,
//! signed here with HMAC-SHA256. A signed push deploys exactly the pushed SHA; a bad, missing
//! or borrowed signature, an unknown app, another provider and an oversized body each get
//! the contract's answer and change nothing; a redelivery runs nothing; the newest of two
//! pushes during a run wins and the older waiting one is dropped and recorded; the secret
//! is nowhere in the server's log or data directory. A GitLab merge request (`X-Gitlab-Token`)
//! builds a preview served by the edge proxy, with GitLab's commit statuses, and its close
//! removes it.

use crate::serve::{Server, HOOK_SECRET};
use crate::world::{wait_for, wait_until, World};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

impl Server {
    /// Writes `head` on a new connection, then `chunked` as 64 KiB chunks (stopping quietly
    /// when the server closes), and returns all the server answered.
    fn raw(&self, head: &str, chunked: Option<&[u8]>) -> String {
        use std::io::{Read, Write};
        let mut c = TcpStream::connect(self.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        if let Some(body) = chunked {
            for part in body.chunks(64 * 1024) {
                let mut chunk = format!("{:x}\r\n", part.len()).into_bytes();
                chunk.extend_from_slice(part);
                chunk.extend_from_slice(b"\r\n");
                if c.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = c.write_all(b"0\r\n\r\n");
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A GitHub delivery's headers: event, delivery id, and the signature of `signed`.
pub(crate) fn github(
    event: &str,
    delivery: &str,
    signed: Option<&[u8]>,
) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-github-event", event.to_string()),
        ("x-github-delivery", delivery.to_string()),
    ];
    if let Some(b) = signed {
        h.push((
            "x-hub-signature-256",
            format!("sha256={}", hmac_hex(HOOK_SECRET, b)),
        ));
    }
    h
}

/// A push event as GitHub documents it (the fields cutover reads, and a few it does not).
fn push_body(git_ref: &str, before: &str, after: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "repository": {"full_name": "acme/site", "default_branch": "main"},
        "pusher": {"name": "ada"},
        "head_commit": {"id": after, "message": "a commit"},
    }))
    .unwrap()
}

fn wait_no_open_run(w: &World, want_runs: i64) {
    wait_for(Duration::from_secs(120), "no open run", || {
        let runs = w.count("SELECT COUNT(*) FROM runs");
        let open = w.count("SELECT COUNT(*) FROM runs WHERE finished_at IS NULL");
        if runs == want_runs && open == 0 {
            return Ok(());
        }
        Err(format!("runs {runs} (want {want_runs}), {open} open"))
    });
}

fn delivery_outcome(w: &World, id: &str) -> String {
    w.db()
        .query_row(
            "SELECT outcome FROM webhook_deliveries WHERE app = 'site' AND delivery = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn signed_pushes_deploy_the_pushed_sha_and_everything_else_is_refused() {
    let w = World::files(1)
        .git()
        .lines(
            "build",
            // A page containing "slow" takes a few seconds to build, to hold a run open.
            "command = \"if grep -q slow index.html; then sleep 6; fi; mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .lines(
            "webhook",
            "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"",
        )
        .start();
    let zero = "0".repeat(40);
    let c1 = w.commit("First page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    w.push();
    let s = Server::start(&w);
    let hook = "/hooks/github/site";
    let body = push_body("refs/heads/main", &zero, &c1);

    // Refusals first: none of them runs anything.
    let (st, b) = s.post(
        "/hooks/github/nope",
        &github("push", "d0", Some(&body)),
        body.clone(),
    );
    assert_eq!(
        (st, b["error"].as_str()),
        (404, Some("no webhook for `nope` from github"))
    );
    let (st, b) = s.post(
        "/hooks/gitea/site",
        &github("push", "d0", Some(&body)),
        body.clone(),
    );
    assert_eq!(
        (st, b["error"].as_str()),
        (404, Some("no webhook for `site` from gitea"))
    );
    let (st, b) = s.post(hook, &github("push", "d1", None), body.clone());
    assert_eq!(
        (st, b["error"].as_str()),
        (
            401,
            Some("webhook refused: no signature header; check the secret shared with the forge")
        )
    );
    let mut wrong = github("push", "d2", None);
    wrong.push((
        "x-hub-signature-256",
        format!("sha256={}", hmac_hex("not-the-secret", &body)),
    ));
    let (st, b) = s.post(hook, &wrong, body.clone());
    assert_eq!(
        (st, b["error"].as_str()),
        (
            401,
            Some(
                "webhook refused: signature does not match; check the secret shared with the forge"
            )
        )
    );
    let other_body = push_body("refs/heads/main", &zero, &"b".repeat(40));
    let (st, _) = s.post(hook, &github("push", "d3", Some(&other_body)), body.clone());
    assert_eq!(st, 401, "a signature of another body");
    // 6 MiB declared: 413 before any of it is sent (the answer comes with only the headers
    // written). 6 MiB streamed in chunks: 413 once it passes 5 MiB.
    let big = vec![b' '; 6 * 1024 * 1024];
    let sig = format!("sha256={}", hmac_hex(HOOK_SECRET, &big));
    let declared = s.raw(&format!(
        "POST {hook} HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: d4\r\nX-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\r\n",
        big.len()
    ), None);
    assert!(declared.starts_with("HTTP/1.1 413 "), "{declared}");
    assert!(
        declared.contains(r#"{"error":"a webhook body is at most 5242880 bytes"}"#),
        "{declared}"
    );
    let streamed = s.raw(&format!(
        "POST {hook} HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: d4\r\nX-Hub-Signature-256: {sig}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ), Some(&big));
    assert!(streamed.starts_with("HTTP/1.1 413 "), "{streamed}");
    assert_eq!(
        w.count("SELECT COUNT(*) FROM runs"),
        0,
        "no refusal runs anything"
    );
    assert_eq!(
        w.count("SELECT COUNT(*) FROM audit WHERE action = 'webhook refused' AND who = 'webhook:github' AND app = 'site'"),
        3
    );
    assert_eq!(
        w.count("SELECT COUNT(*) FROM webhook_deliveries"),
        0,
        "a refused delivery is not remembered (its id could be forged)"
    );

    // ping, and a push to another branch.
    let ping =
        serde_json::to_vec(&json!({"zen": "Keep it logically awesome.", "hook_id": 1})).unwrap();
    let (st, b) = s.post(hook, &github("ping", "p1", Some(&ping)), ping.clone());
    assert_eq!((st, b), (200, json!({"ping": "ok"})));
    let dev = push_body("refs/heads/dev", &zero, &c1);
    let (st, b) = s.post(hook, &github("push", "d5", Some(&dev)), dev.clone());
    assert_eq!(
        (st, b),
        (
            200,
            json!({"ignored": "push to refs/heads/dev; this app deploys refs/heads/main"})
        )
    );

    // The push: exactly that SHA is built and deployed, by webhook:github.
    let (st, b) = s.post(hook, &github("push", "d6", Some(&body)), body.clone());
    assert_eq!(st, 202, "{b}");
    let run = b["run"].as_str().unwrap().to_string();
    wait_no_open_run(&w, 1);
    assert_eq!(w.served(0), "v1");
    let (by, outcome): (String, String) = w
        .db()
        .query_row(
            "SELECT started_by, outcome FROM runs WHERE id = ?1",
            [&run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (by.as_str(), outcome.as_str()),
        ("webhook:github", "succeeded")
    );
    let h = w.run(&["history", "--json"]);
    assert!(
        h.stdout.contains(&c1),
        "history shows the full SHA: {}",
        h.stdout
    );
    assert_eq!(delivery_outcome(&w, "d6"), format!("run {run}"));

    // A redelivery runs nothing.
    let (st, b) = s.post(hook, &github("push", "d6", Some(&body)), body.clone());
    assert_eq!((st, b), (200, json!({"duplicate": true})));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.count("SELECT COUNT(*) FROM runs"), 1);

    // Three pushes: the first runs (slowly), the second waits, the third replaces it.
    let c2 = w.commit("Slow page", &[("index.html", "v2 slow\n")]);
    let c3 = w.commit("Third page", &[("index.html", "v3\n")]);
    let c4 = w.commit("Fourth page", &[("index.html", "v4\n")]);
    w.push();
    let b2 = push_body("refs/heads/main", &c1, &c2);
    let b3 = push_body("refs/heads/main", &c2, &c3);
    let b4 = push_body("refs/heads/main", &c3, &c4);
    let (st, r2) = s.post(hook, &github("push", "d7", Some(&b2)), b2.clone());
    assert_eq!(st, 202, "{r2}");
    assert!(r2["run"].is_string(), "{r2}");
    let (st, r3) = s.post(hook, &github("push", "d8", Some(&b3)), b3.clone());
    assert_eq!((st, r3), (202, json!({"queued": c3})));
    let (st, r4) = s.post(hook, &github("push", "d9", Some(&b4)), b4.clone());
    assert_eq!((st, r4), (202, json!({"queued": c4})));
    assert_eq!(delivery_outcome(&w, "d8"), format!("superseded by {c4}"));
    assert_eq!(
        w.count("SELECT COUNT(*) FROM audit WHERE action = 'webhook push dropped'"),
        1
    );
    wait_no_open_run(&w, 3);
    assert_eq!(w.served(0), "v4", "the newest push is live");
    let commits: Vec<String> = {
        let db = w.db();
        let mut q = db
            .prepare(
                "SELECT commit_sha FROM releases WHERE app = 'site' ORDER BY created_at, rowid",
            )
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    assert_eq!(
        commits,
        vec![c1.clone(), c2.clone(), c4.clone()],
        "c3 was never built"
    );
    assert!(delivery_outcome(&w, "d9").starts_with("run "));

    // The secret is in no log, event, audit row or database file.
    assert!(
        !s.log().contains(HOOK_SECRET),
        "the server's log holds the secret"
    );
    for entry in std::fs::read_dir(w.dir.join("data")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes
                    .windows(HOOK_SECRET.len())
                    .any(|x| x == HOOK_SECRET.as_bytes()),
                "{} holds the secret",
                p.display()
            );
        }
    }
}

#[test]
fn gitea_and_gitlab_deliveries_are_checked_their_own_way() {
    use crate::previews::{get_as, preview_dirs, proxy_addr, proxy_services};
    // The edge proxy (installed by `cutover setup`) serves the GitLab merge request's preview.
    let w = World::files(1)
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .lines(
            "webhook",
            "provider = \"gitea\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"",
        )
        .config(|t| {
            t.set_str(
                "proxy",
                "listen",
                format!("0.0.0.0:{}", crate::world::PROXY_PORT),
            )
            .lines("proxy", "drain = \"2s\"\ninstall_dir = \"/srv/cutover\"")
            .lines("preview", "domain = \"preview.test\"");
        })
        .start();
    let r = w.run(&["setup", "--json"]);
    assert_eq!(r.code, 0, "setup: {} {}", r.stdout, r.stderr);
    let zero = "0".repeat(40);
    let c1 = w.commit("First page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    w.push();

    // Gitea: X-Gitea-Signature is the bare hex HMAC; GitHub's header is not accepted.
    let s = Server::start(&w);
    let hook = "/hooks/gitea/site";
    let body = push_body("refs/heads/main", &zero, &c1);
    let gitea = |delivery: &str, event: &str, sig: Option<String>| {
        let mut h = vec![
            ("x-gitea-event", event.to_string()),
            ("x-gitea-delivery", delivery.to_string()),
        ];
        if let Some(s) = sig {
            h.push(("x-gitea-signature", s));
        }
        h
    };
    let (st, _) = s.post(hook, &github("push", "g1", Some(&body)), body.clone());
    assert_eq!(st, 401, "GitHub's signature header on a Gitea hook");
    let (st, _) = s.post(
        hook,
        &gitea("g2", "push", Some(hmac_hex("wrong", &body))),
        body.clone(),
    );
    assert_eq!(st, 401);
    let ping = br#"{"hook_id": 3}"#.to_vec();
    let (st, b) = s.post(
        hook,
        &gitea("g3", "ping", Some(hmac_hex(HOOK_SECRET, &ping))),
        ping.clone(),
    );
    assert_eq!((st, b), (200, json!({"ping": "ok"})));
    assert_eq!(w.count("SELECT COUNT(*) FROM runs"), 0);
    let (st, b) = s.post(
        hook,
        &gitea("g4", "push", Some(hmac_hex(HOOK_SECRET, &body))),
        body.clone(),
    );
    assert_eq!(st, 202, "{b}");
    wait_no_open_run(&w, 1);
    assert_eq!(w.served(0), "v1");
    drop(s);

    // GitLab: X-Gitlab-Token is the secret itself; checkout_sha is the commit; the event
    // UUID is the delivery id; commit statuses go to the project's statuses API with the
    // token in PRIVATE-TOKEN.
    let forge = Forge::start();
    let token = "glpat-forge-9e1c77";
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(
            "provider = \"gitea\"",
            &format!(
                "provider = \"gitlab\"\nstatus_token_env = \"SITE_FORGE_TOKEN\"\napi_url = \"http://{}/api/v4\"",
                forge.addr
            ),
        ),
    )
    .unwrap();
    let s = Server::start_with(&w, &[("SITE_FORGE_TOKEN", token)]);
    let hook = "/hooks/gitlab/site";
    let c2 = w.commit("Second page", &[("index.html", "v2\n")]);
    let c3 = w.commit("Third page", &[("index.html", "v3\n")]);
    w.push();
    // `after` is the branch's new head (c3); `checkout_sha` (c2 here) is what GitLab says to
    // check out, and what is deployed.
    let body = serde_json::to_vec(&json!({
        "object_kind": "push",
        "event_name": "push",
        "ref": "refs/heads/main",
        "before": c1,
        "after": c3,
        "checkout_sha": c2,
        "project_id": 15,
        "project": {"id": 15, "path_with_namespace": "acme/site"},
    }))
    .unwrap();
    let gitlab_event = |event: &str, token: Option<&str>, uuid: &str| {
        let mut h = vec![
            ("x-gitlab-event", event.to_string()),
            ("x-gitlab-event-uuid", uuid.to_string()),
        ];
        if let Some(t) = token {
            h.push(("x-gitlab-token", t.to_string()));
        }
        h
    };
    let gitlab = |token: Option<&str>, uuid: &str| gitlab_event("Push Hook", token, uuid);
    let (st, _) = s.post(hook, &gitlab(None, "u1"), body.clone());
    assert_eq!(st, 401, "no token");
    let (st, _) = s.post(
        hook,
        &gitlab(Some("hook-secret-7f3a9c1e5c"), "u2"),
        body.clone(),
    );
    assert_eq!(st, 401, "a token one character off");
    assert_eq!(w.count("SELECT COUNT(*) FROM runs"), 1);
    let (st, b) = s.post(hook, &gitlab(Some(HOOK_SECRET), "u3"), body.clone());
    assert_eq!(st, 202, "{b}");
    wait_no_open_run(&w, 2);
    assert_eq!(w.served(0), "v2", "checkout_sha was deployed");
    let (st, b) = s.post(hook, &gitlab(Some(HOOK_SECRET), "u3"), body.clone());
    assert_eq!((st, b), (200, json!({"duplicate": true})));
    let newest: String = w
        .db()
        .query_row(
            "SELECT commit_sha FROM releases WHERE app = 'site' ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(newest, c2);
    let private_token = format!("PRIVATE-TOKEN {token}");
    forge.pending_then_success(
        0,
        &format!("POST /api/v4/projects/15/statuses/{c2} HTTP/1.1"),
        &private_token,
        "name",
    );

    // Merge Request Hook events, read as pull requests: iid is the number, the source
    // project the head repository; a fork without the label and an update without new
    // commits build nothing; a wrong token is refused.
    let mr = |action: &str, source: &str, oldrev: Option<&str>| {
        serde_json::to_vec(&json!({
            "object_kind": "merge_request",
            "event_type": "merge_request",
            "project": {"id": 15, "path_with_namespace": "acme/site"},
            "object_attributes": {
                "iid": 7, "action": action, "oldrev": oldrev,
                "state": if action == "close" { "closed" } else { "opened" },
                "source_branch": "feature", "target_branch": "main",
                "last_commit": {"id": c3, "message": "Third page"},
            },
            "labels": [],
            "source": {"path_with_namespace": source},
            "target": {"path_with_namespace": "acme/site"},
        }))
        .unwrap()
    };
    let mr_hook = |token: &str, uuid: &str| gitlab_event("Merge Request Hook", Some(token), uuid);
    let body = mr("open", "eve/site", None);
    let (st, _) = s.post(hook, &mr_hook("hook-secret-7f3a9c1e5c", "m1"), body.clone());
    assert_eq!(st, 401, "a token one character off");
    let (st, b) = s.post(hook, &mr_hook(HOOK_SECRET, "m2"), body);
    assert_eq!(
        (st, b),
        (
            200,
            json!({"ignored": "pull request #7 comes from a fork (eve/site) and is not labelled cutover-preview"})
        )
    );
    let (st, b) = s.post(
        hook,
        &mr_hook(HOOK_SECRET, "m3"),
        mr("update", "acme/site", None),
    );
    assert_eq!(
        (st, b),
        (
            200,
            json!({"ignored": "pull request #7 update: nothing to build"})
        )
    );
    assert_eq!(w.count("SELECT COUNT(*) FROM runs"), 2, "nothing ran");
    assert_eq!(
        w.count("SELECT COUNT(*) FROM audit WHERE action = 'webhook refused' AND who = 'webhook:gitlab'"),
        3
    );

    // Opened from the project itself: the head (c3) is built from the repository and served
    // by the proxy at the preview's host name, with `pending` then `success` (the preview's
    // URL) on c3; closed: the preview is torn down, nothing of it left on the host.
    let (st, b) = s.post(
        hook,
        &mr_hook(HOOK_SECRET, "m4"),
        mr("open", "acme/site", None),
    );
    assert_eq!(st, 202, "{b}");
    wait_no_open_run(&w, 3);
    let preview = "pr-7-site.preview.test";
    let proxy = proxy_addr(&w);
    assert_eq!(get_as(proxy, preview), "v3");
    assert_eq!(w.served(0), "v2", "production is untouched");
    let (app, sha): (String, String) = w
        .db()
        .query_row(
            "SELECT app, commit_sha FROM releases ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((app.as_str(), sha.as_str()), ("site-pr-7", c3.as_str()));
    let success = forge.pending_then_success(
        2,
        &format!("POST /api/v4/projects/15/statuses/{c3} HTTP/1.1"),
        &private_token,
        "name",
    );
    assert_eq!(success["target_url"], format!("http://{preview}"));
    assert_eq!(
        success["description"],
        format!("{} is served at http://{preview}", &c3[..7])
    );
    let (st, b) = s.post(
        hook,
        &mr_hook(HOOK_SECRET, "m5"),
        mr("close", "acme/site", None),
    );
    assert_eq!((st, &b["removing"]), (202, &json!(7)), "{b}");
    wait_until(Duration::from_secs(120), "the preview's removal", || {
        w.count("SELECT COUNT(*) FROM previews WHERE state = 'removed'") == 1
    });
    assert_eq!(preview_dirs(&w), Vec::<String>::new());
    assert_eq!(proxy_services(&w), Vec::<Value>::new());
    assert_eq!(get_as(proxy, preview), "HTTP HTTP/1.1 404 Not Found");
    assert_eq!(w.served(0), "v2");
    assert!(!s.log().contains(token), "the server's log holds the token");
    drop(s);

    // A bad [webhook] is refused before the server listens, naming the key.
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace("provider = \"gitlab\"", "provider = \"bitbucket\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["serve", "--listen", "127.0.0.1:0", "-c"])
        .arg(&w.config)
        .arg("--data")
        .arg(w.dir.join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "`webhook.provider`: expected \"github\", \"gitea\" or \"gitlab\", got \"bitbucket\""
        ),
        "{stderr}"
    );
}

/// The forge's statuses API, as a stub that records every call: (request line,
/// Authorization header, JSON body), answering 201.
pub(crate) struct Forge {
    pub(crate) addr: SocketAddr,
    calls: std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
}

impl Forge {
    pub(crate) fn start() -> Forge {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = calls.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Read, Write};
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let (mut auth, mut len) = (String::new(), 0usize);
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "authorization" => auth = v.trim().to_string(),
                        "private-token" => auth = format!("PRIVATE-TOKEN {}", v.trim()),
                        "content-length" => len = v.trim().parse().unwrap(),
                        _ => {}
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                rec.lock().unwrap().push((
                    line.trim_end().to_string(),
                    auth,
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                ));
                let _ = conn.write_all(
                    b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
        Forge { addr, calls }
    }

    /// Waits for `from + 2` calls, of which the last two must be a commit status POSTed as
    /// `line` with `auth`: `pending` (named `cutover` in `name_key`: GitHub's `context`,
    /// GitLab's `name`), then `success`. Returns the success's body.
    pub(crate) fn pending_then_success(
        &self,
        from: usize,
        line: &str,
        auth: &str,
        name_key: &str,
    ) -> Value {
        let calls = self.calls(from + 2);
        assert_eq!(calls.len(), from + 2, "{calls:?}");
        for (l, a, _) in &calls[from..] {
            assert_eq!((l.as_str(), a.as_str()), (line, auth), "{calls:?}");
        }
        let (pending, success) = (&calls[from].2, &calls[from + 1].2);
        assert_eq!(
            (pending["state"].as_str(), pending[name_key].as_str()),
            (Some("pending"), Some("cutover"))
        );
        assert_eq!(success["state"], "success", "{calls:?}");
        success.clone()
    }

    /// Waits for `n` calls and returns them.
    pub(crate) fn calls(&self, n: usize) -> Vec<(String, String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let c = self.calls.lock().unwrap().clone();
            if c.len() >= n || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn commit_statuses_go_to_the_forge_pending_then_success_or_failure() {
    let forge = Forge::start();
    let w = World::files(1)
        .git()
        .lines(
            "build",
            "command = \"if grep -q broken index.html; then echo broken page >&2; exit 1; fi; mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .lines(
            "webhook",
            &format!(
                "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nstatus_token_env = \"SITE_FORGE_TOKEN\"\napi_url = \"http://{}\"",
                forge.addr
            ),
        )
        .start();
    let token = "forge-token-31d0aa";
    let zero = "0".repeat(40);
    let good = w.commit("Good page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    let bad = w.commit("Broken page", &[("index.html", "broken\n")]);
    w.push();
    let s = Server::start_with(&w, &[("SITE_FORGE_TOKEN", token)]);
    let body = push_body("refs/heads/main", &zero, &good);
    let (st, b) = s.post(
        "/hooks/github/site",
        &github("push", "s1", Some(&body)),
        body.clone(),
    );
    assert_eq!(st, 202, "{b}");
    let success = forge.pending_then_success(
        0,
        &format!("POST /repos/acme/site/statuses/{good} HTTP/1.1"),
        &format!("Bearer {token}"),
        "context",
    );
    assert!(success["description"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{} is live (release ", &good[..7])));
    wait_no_open_run(&w, 1);
    assert_eq!(w.served(0), "v1");

    let body = push_body("refs/heads/main", &good, &bad);
    let (st, b) = s.post(
        "/hooks/github/site",
        &github("push", "s2", Some(&body)),
        body.clone(),
    );
    assert_eq!(st, 202, "{b}");
    let calls = forge.calls(4);
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(
        calls[2].0,
        format!("POST /repos/acme/site/statuses/{bad} HTTP/1.1")
    );
    assert_eq!(calls[2].2["state"], "pending");
    assert_eq!(calls[3].2["state"], "failure", "{calls:?}");
    assert!(!calls[3].2["description"].as_str().unwrap().is_empty());
    wait_no_open_run(&w, 2);
    assert_eq!(w.served(0), "v1", "the broken build changed nothing");
    assert!(!s.log().contains(token), "the server's log holds the token");
}

#[test]
fn a_delivery_to_two_servers_on_one_postgres_database_runs_once() {
    let db = cutover_store::testing::ScratchDb::new("hook_twice");
    std::env::set_var("CUTOVER_DATABASE", &db.url); // every cutover this test starts
    let mut pg = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let w = World::files(1)
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .lines(
            "webhook",
            "provider = \"github\"\nsecret_env = \"SITE_HOOK_SECRET\"\nbranch = \"main\"",
        )
        .start();
    let zero = "0".repeat(40);
    let c1 = w.commit("First page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    w.push();
    let servers = [Server::start(&w), Server::start(&w)];
    let body = push_body("refs/heads/main", &zero, &c1);
    // The forge delivers the same push to both (a retry through a load balancer, at once).
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = servers
            .iter()
            .map(|s| {
                let body = body.clone();
                sc.spawn(move || {
                    s.post(
                        "/hooks/github/site",
                        &github("push", "d-twice", Some(&body)),
                        body.clone(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let runs: Vec<&Value> = answers
        .iter()
        .filter(|(st, _)| *st == 202)
        .map(|(_, b)| b)
        .collect();
    let duplicates = answers
        .iter()
        .filter(|(st, b)| *st == 200 && b["duplicate"] == true)
        .count();
    assert_eq!((runs.len(), duplicates), (1, 1), "{answers:?}");
    wait_until(Duration::from_secs(120), "the run's end", || {
        let open: i64 = pg
            .query_one("SELECT count(*) FROM runs WHERE finished_at IS NULL", &[])
            .unwrap()
            .get(0);
        open == 0
    });
    let n: i64 = pg
        .query_one("SELECT count(*) FROM runs", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "one run for one delivery");
    let rows: Vec<(String, Option<String>)> = pg
        .query("SELECT delivery, sha FROM webhook_deliveries", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("d-twice".to_string(), Some(c1.clone()))]);
    assert_eq!(w.served(0), "v1");
}

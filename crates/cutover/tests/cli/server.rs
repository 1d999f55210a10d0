//! `cutover serve`'s API and jobs against a real server on loopback and real test hosts:
//! the access matrix (every refusal leaves no run), login lockout per (user, address), no
//! secret in clear in the database, a rollback started through the API under load with its
//! events over SSE cut and resumed by `Last-Event-ID`, a server killed mid-job, and the CLI
//! through `--server`.

use crate::serve::{add_user, http, read_sse, send, token, Server};
use crate::world::{wait_for, World};
use serde_json::{json, Value};
use std::time::Duration;

fn runs_in_db(w: &World) -> i64 {
    w.count("SELECT COUNT(*) FROM runs")
}

/// Logs in from `from`; (status, body, cookie header value for later requests).
fn login(s: &Server, from: &str, user: &str, password: &str) -> (u16, Value, Option<String>) {
    let r = http(from)
        .post(s.url("/api/login"))
        .json(&json!({"user": user, "password": password}))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let cookie = r
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json().unwrap_or(Value::Null);
    (status, body, cookie)
}

#[test]
fn api_access_matrix_refuses_and_leaves_no_run() {
    let w = World::files(1).start();
    w.deploy_ok("v1");
    w.deploy_ok("v2");
    let viewer = token(&w, "look", "viewer", &[]);
    let deployer = token(&w, "ci", "deployer", &[]);
    let other = token(&w, "elsewhere", "deployer", &["--app", "other"]);
    let expired = token(&w, "old", "deployer", &["--expires", "1s"]);
    let revoked = token(&w, "gone", "admin", &[]);
    let r = w.run(&["token", "revoke", "gone"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, "revoked token gone\n"));
    add_user(&w, "ada", "admin", "ada-password-1");
    std::thread::sleep(Duration::from_millis(1100)); // `old` expires
    let s = Server::start(&w);
    let c = http("127.0.0.1");
    let app = "site";
    let before = runs_in_db(&w);
    let gets = [
        "/api/apps".to_string(),
        format!("/api/apps/{app}/releases"),
        format!("/api/apps/{app}/runs"),
        "/api/runs/1".into(),
        "/api/runs/1/events".into(),
        "/api/audit".into(),
        "/api/users".into(),
        "/api/tokens".into(),
    ];
    let posts = [
        (format!("/api/apps/{app}/deploys"), json!({"release": "x"})),
        (format!("/api/apps/{app}/rollback"), json!({})),
    ];
    // No credentials, an expired token, a revoked token, garbage: 401 everywhere.
    for bad in [
        None,
        Some(expired.as_str()),
        Some(revoked.as_str()),
        Some("cutover_nope"),
    ] {
        for p in &gets {
            let mut req = c.get(s.url(p));
            if let Some(t) = bad {
                req = req.bearer_auth(t);
            }
            let (status, body) = send(req);
            assert_eq!(status, 401, "GET {p} with {bad:?}: {body}");
        }
        for (p, b) in &posts {
            let mut req = c.post(s.url(p)).json(b);
            if let Some(t) = bad {
                req = req.bearer_auth(t);
            }
            assert_eq!(send(req).0, 401, "POST {p} with {bad:?}");
        }
    }
    let (_, body) = send(c.get(s.url("/api/apps")).bearer_auth(&expired));
    assert_eq!(
        body["error"],
        "the API token `old` expired; create a new one (cutover token create)"
    );
    let (_, body) = send(c.get(s.url("/api/apps")).bearer_auth(&revoked));
    assert_eq!(body["error"], "the API token `gone` was revoked");
    // A viewer reads but does not deploy or roll back.
    assert_eq!(send(c.get(s.url("/api/apps")).bearer_auth(&viewer)).0, 200);
    for (p, b) in &posts {
        let (status, body) = send(c.post(s.url(p)).json(b).bearer_auth(&viewer));
        assert_eq!(status, 403, "viewer POST {p}");
        assert_eq!(
            body["error"],
            "token:look is a viewer: only a deployer may deploy or roll back"
        );
    }
    // A token scoped to another app: 403 on this one, and it does not list it.
    for (p, b) in &posts {
        let (status, body) = send(c.post(s.url(p)).json(b).bearer_auth(&other));
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (403, "token:elsewhere is scoped to other, not to `site`"),
            "{p}"
        );
    }
    let (status, body) = send(
        c.get(s.url(&format!("/api/apps/{app}/releases")))
            .bearer_auth(&other),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        send(c.get(s.url("/api/apps")).bearer_auth(&other)).1,
        json!([])
    );
    // A deployer: no audit, users or tokens.
    for p in ["/api/audit", "/api/users", "/api/tokens"] {
        let (status, body) = send(c.get(s.url(p)).bearer_auth(&deployer));
        assert_eq!(status, 403, "{p}");
        assert_eq!(
            body["error"],
            "token:ci is a deployer: only an admin may manage users and tokens or read the audit log"
        );
    }
    // A session without the CSRF header: 403; with it, the admin reads the audit log.
    let (status, body, cookie) = login(&s, "127.0.0.1", "ada", "ada-password-1");
    assert_eq!(status, 200, "{body}");
    let cookie = cookie.unwrap();
    assert!(
        cookie.contains("; HttpOnly; SameSite=Strict; Path=/") && !cookie.contains("Secure"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    for (p, b) in &posts {
        let (status, body) = send(c.post(s.url(p)).json(b).header("cookie", &session));
        assert_eq!(status, 403, "{p}: {body}");
        assert_eq!(
            body["error"],
            "missing or wrong CSRF token: reload the page and try again"
        );
        let (status, _) = send(
            c.post(s.url(p))
                .json(b)
                .header("cookie", &session)
                .header("x-csrf-token", "0".repeat(64)),
        );
        assert_eq!(status, 403, "{p} with a wrong token");
    }
    assert_eq!(runs_in_db(&w), before, "a refusal leaves no run");
    let (status, audit) = send(c.get(s.url("/api/audit")).header("cookie", &session));
    assert_eq!(status, 200);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[0], "login", "{audit}");
    assert!(actions.contains(&"token revoked"), "{audit}");
    // Security headers on every answer.
    let r = c.get(s.url("/api/apps")).send().unwrap();
    assert_eq!(
        r.headers()["content-security-policy"],
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    // Bad input is 422 and no run; an unknown app 404.
    let (status, body) = send(
        c.post(s.url(&format!("/api/apps/{app}/deploys")))
            .json(&json!({"ref": "a", "image": "b"}))
            .bearer_auth(&deployer),
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = send(
        c.post(s.url(&format!("/api/apps/{app}/deploys")))
            .json(&json!({"ref": "main"}))
            .bearer_auth(&deployer),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("`site` has no [build] section in "),
        "{body}"
    );
    assert_eq!(
        send(
            c.get(s.url("/api/apps/nope/releases"))
                .bearer_auth(&deployer)
        )
        .0,
        404
    );
    // A CLI run holding the app's lock (a live process on this machine: this test): 409
    // naming it, and `--server` exits 4 as a local run would.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let id: String = std::fs::read_to_string("/etc/machine-id")
        .unwrap_or_default()
        .trim()
        .chars()
        .take(8)
        .collect();
    let machine = if id.is_empty() {
        host.trim().to_string()
    } else {
        format!("{}/{id}", host.trim())
    };
    let pid = std::process::id();
    w.db()
        .execute(
            "INSERT INTO locks (app, user, machine, pid, pid_start, since, op) VALUES ('site', 'ops', ?1, ?2, 0, '2026-12-05T01:02:03Z', 'deploy')",
            rusqlite::params![machine, pid],
        )
        .unwrap();
    let held = format!("a deploy of `site` is in progress: ops@{machine} pid {pid} holds the lock since 2026-12-05T01:02:03Z; wait for it to end");
    let (status, body) = send(
        c.post(s.url(&format!("/api/apps/{app}/rollback")))
            .json(&json!({}))
            .bearer_auth(&deployer),
    );
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (409, held.as_str())
    );
    let r = w
        .cutover(&["rollback", "--server", &s.url("")])
        .env("CUTOVER_TOKEN", &deployer)
        .run();
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (4, format!("error: {held}\n").as_str())
    );
    w.db().execute("DELETE FROM locks", []).unwrap();
    assert_eq!(runs_in_db(&w), before, "a refusal leaves no run");
}

#[test]
fn lockout_is_per_user_and_address_and_the_database_holds_no_secret() {
    let w = World::local().start();
    add_user(&w, "ada", "admin", "ada-password-1");
    let tok = token(&w, "ci", "deployer", &[]);
    let s = Server::start(&w);
    for i in 0..5 {
        let (status, body, _) = login(&s, "127.0.0.2", "ada", &format!("wrong-{i}"));
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (401, "wrong user name or password")
        );
    }
    // An unknown user fails the same way.
    let (status, body, _) = login(&s, "127.0.0.2", "nobody", "x");
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (401, "wrong user name or password")
    );
    // The attacker's address is slowed down, even with the right password...
    let (status, body, _) = login(&s, "127.0.0.2", "ada", "ada-password-1");
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("too many failed logins for this user from your address: try again in "),
        "{body}"
    );
    // ...but the admin from another address is not locked out.
    let (status, body, cookie) = login(&s, "127.0.0.1", "ada", "ada-password-1");
    assert_eq!(status, 200, "{body}");
    let session_id = cookie
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("cutover_session=")
        .to_string();
    assert_eq!(session_id.len(), 64);
    let csrf = body["csrf"].as_str().unwrap().to_string();
    // A token use records its last use.
    assert_eq!(
        send(http("127.0.0.1").get(s.url("/api/apps")).bearer_auth(&tok)).0,
        200
    );
    drop(s);
    // No password, token or session id in clear anywhere in the database files.
    let data = w.dir.join("data");
    let mut all = Vec::new();
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("cutover.db")
        {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("$argon2id$"), "the password hash is there");
    for secret in [
        "ada-password-1",
        tok.as_str(),
        &tok["cutover_".len()..],
        session_id.as_str(),
    ] {
        assert!(
            !text.contains(secret),
            "{secret} is in the database in clear"
        );
    }
    assert!(!csrf.is_empty());
    let r = w.run(&["token", "list"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout
            .starts_with("TOKEN  ROLE      APPS  EXPIRES  LAST USED"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains(&tok), "{}", r.stdout);
}

#[test]
fn api_rollback_under_load_streams_events_that_resume_after_a_cut() {
    let w = World::files(2).start();
    w.deploy_ok("v1");
    w.deploy_ok("v2");
    let tok = token(&w, "ci", "deployer", &[]);
    let s = Server::start(&w);
    let c = http("127.0.0.1");
    let load = w.load(None);
    let run = s.start_job(&tok, "/api/apps/site/rollback", &json!({}));
    // A second job of the same app while the first runs: 409 naming the holder.
    let (status, body) = s.api_post(&tok, "/api/apps/site/rollback", &json!({}));
    assert_eq!(status, 409, "{body}");
    let m = body["error"].as_str().unwrap();
    assert!(
        m.starts_with(&format!(
            "a rollback of `site` is in progress: run {run} by token:ci holds the lock since "
        )),
        "{m}"
    );
    // The first few events, then the client goes away.
    let first = read_sse(
        c.get(s.url(&format!("/api/runs/{run}/events")))
            .bearer_auth(&tok)
            .send()
            .unwrap(),
        3,
    );
    assert_eq!(first.len(), 3, "{first:?}");
    let last = first.last().unwrap().0.unwrap();
    let rest = read_sse(
        c.get(s.url(&format!("/api/runs/{run}/events")))
            .bearer_auth(&tok)
            .header("last-event-id", last.to_string())
            .send()
            .unwrap(),
        usize::MAX,
    );
    let (ka, fresh) = load.stop("API rollback");
    assert_eq!((ka.failed, fresh.failed), (0, 0), "no failed request");
    let end = rest.last().unwrap();
    assert_eq!(end.1, "end", "{rest:?}");
    let seqs: Vec<i64> = first
        .iter()
        .chain(rest.iter())
        .filter_map(|e| e.0)
        .collect();
    for pair in seqs.windows(2) {
        assert!(pair[1] > pair[0], "no repeat, in order: {seqs:?}");
    }
    let stored: Vec<i64> = w
        .db()
        .prepare(&format!(
            "SELECT seq FROM events WHERE run_id = {run} ORDER BY seq"
        ))
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(seqs, stored, "no gap: every event of the run, once");
    let e: Value = serde_json::from_str(&first[0].2).unwrap();
    assert_eq!(
        (e["event"].as_str(), e["run"].to_string()),
        (Some("step"), run.clone())
    );
    let final_run: Value = serde_json::from_str(&end.2).unwrap();
    let (status, got) = s.api_get(&tok, &format!("/api/runs/{run}"));
    assert_eq!(status, 200);
    assert_eq!(final_run, got, "the end event is the run");
    assert_eq!(got["status"], "succeeded", "{got}");
    assert_eq!(got["exit_code"], 0);
    assert_eq!(got["by"], "token:ci");
    assert_eq!(got["kind"], "rollback");
    w.assert_all_serve("v1");
    // The database stays whole while the server has it open and others come and go.
    let ic: String = w
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ic, "ok");
    // The CLI through the server: roll forward again, same exit code as a local run.
    let r = w
        .cutover(&[
            "rollback",
            "--server",
            &s.url(""),
            "--to",
            w.history()[0]["id"].as_str().unwrap(),
        ])
        .env("CUTOVER_TOKEN", &tok)
        .run();
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    w.assert_all_serve("v2");
    let r = w
        .cutover(&["history", "--server", &s.url(""), "--json"])
        .env("CUTOVER_TOKEN", &tok)
        .run();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = w
        .cutover(&["rollback", "--server", &s.url(""), "--app", "nope"])
        .env("CUTOVER_TOKEN", &tok)
        .run();
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (2, "error: no app `nope` on this server\n")
    );
    let r = w
        .cutover(&["rollback", "--server", &s.url("")])
        .env("CUTOVER_TOKEN", "")
        .run();
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn a_server_killed_mid_job_reconciles_it_when_it_restarts() {
    let w = World::files(2).start();
    w.deploy_ok("v1");
    let v2 = w.deploy_ok("v2");
    let tok = token(&w, "ci", "deployer", &[]);
    let mut s = Server::start_with(&w, &[("CUTOVER_CRASH_AT", "after-switch-first")]);
    let run = s.start_job(&tok, "/api/apps/site/rollback", &json!({}));
    s.wait_exit();
    for i in 0..w.hosts() {
        w.assert_complete(i);
    }
    drop(s);
    // Restarted on its own (SQLite): the sweeper reconciles the run at once, with no new
    // run: host 0 goes back to v2, which the history says is live.
    let s = Server::start(&w);
    let got = crate::ha::wait_reconciled(&s, &tok, &run);
    assert_eq!(
        (got["status"].as_str(), got["exit_code"].as_i64()),
        (Some("interrupted"), Some(1)),
        "{got}"
    );
    crate::ha::assert_reconciled(&w, got["message"].as_str().unwrap());
    w.assert_all_serve("v2");
    assert_eq!(w.live(), [v2]);
    let job: String = w
        .db()
        .query_row(
            &format!("SELECT state FROM jobs WHERE run_id = {run}"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(job, "interrupted", "not re-run blindly");
    // The SSE stream of an interrupted run ends.
    let ev = s.run_events(&tok, &run);
    assert_eq!(ev.last().unwrap().1, "end");
    // The next rollback has nothing left to reconcile, and succeeds.
    let next = s.start_job(&tok, "/api/apps/site/rollback", &json!({}));
    let ev = s.run_events(&tok, &next);
    let end: Value = serde_json::from_str(&ev.last().unwrap().2).unwrap();
    assert_eq!(end["exit_code"], 0, "{end}");
}

#[test]
fn a_cli_run_on_the_same_data_directory_streams_live_through_the_server() {
    let w = World::files(1).start();
    w.deploy_ok("v1");
    // A reload that takes a while keeps the CLI's run going while the stream is read.
    w.configure(|t| {
        t.set_str("files", "reload", "sleep 2");
    });
    let viewer = token(&w, "look", "viewer", &[]);
    let s = Server::start(&w);
    let mut cli = w
        .cutover(&["deploy", "--artifact", w.build("v2").to_str().unwrap()])
        .spawn_quiet();
    let run = wait_for(Duration::from_secs(30), "the CLI run to start", || {
        let n: Option<i64> = w
            .db()
            .query_row("SELECT MAX(id) FROM runs WHERE id > 1", [], |r| r.get(0))
            .unwrap();
        n.ok_or_else(String::new)
    })
    .to_string();
    let (status, now) = s.api_get(&viewer, &format!("/api/runs/{run}"));
    assert_eq!(status, 200);
    assert_eq!(now["status"], "running", "{now}");
    let ev = s.run_events(&viewer, &run);
    assert!(cli.wait().unwrap().success());
    let end: Value = serde_json::from_str(&ev.last().unwrap().2).unwrap();
    assert_eq!(ev.last().unwrap().1, "end");
    assert_eq!(
        (end["status"].as_str(), end["exit_code"].as_i64()),
        (Some("succeeded"), Some(0)),
        "{end}"
    );
    assert!(end["by"].is_string(), "a CLI run names its OS user: {end}");
    assert!(ev.len() > 5, "{ev:?}");
    w.assert_all_serve("v2");
}

#[test]
fn a_deploy_of_a_ref_through_the_api_and_the_cli_under_load_fails_no_request() {
    let w = World::files(2)
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .start();
    w.commit("First page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    w.push();
    w.deploy_ref_ok("main");
    serves(&w, "v1");
    let c2 = w.commit("Second page", &[("index.html", "v2\n"), ("up", "ok\n")]);
    w.push();
    let tok = token(&w, "ci", "deployer", &["--app", "site"]);
    let s = Server::start(&w);
    let load = w.load(None);
    let run = s.start_job(&tok, "/api/apps/site/deploys", &json!({"ref": "main"}));
    let ev = s.run_events(&tok, &run);
    let end: Value = serde_json::from_str(&ev.last().unwrap().2).unwrap();
    assert_eq!(
        (end["status"].as_str(), end["exit_code"].as_i64()),
        (Some("succeeded"), Some(0)),
        "{end}"
    );
    assert_eq!(end["kind"], "deploy");
    serves(&w, "v2");
    let (_, releases) = s.api_get(&tok, "/api/apps/site/releases?limit=1");
    assert_eq!(releases[0]["commit"], c2.as_str());
    assert_eq!(releases[0]["commit_subject"], "Second page");
    assert_eq!(releases[0]["live"], true);
    let (_, older) = s.api_get(
        &tok,
        &format!(
            "/api/apps/site/releases?limit=5&before={}",
            releases[0]["id"].as_str().unwrap()
        ),
    );
    assert_eq!(
        older.as_array().unwrap().len(),
        1,
        "the page after the newest: {older}"
    );
    // The CLI through the server: a third commit, drawn as a local run, exit 0.
    w.commit("Third page", &[("index.html", "v3\n"), ("up", "ok\n")]);
    w.push();
    let r = w
        .cutover(&[
            "deploy",
            "--server",
            &s.url(""),
            "--ref",
            "main",
            "--events",
        ])
        .env("CUTOVER_TOKEN", &tok)
        .run();
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["event"], "outcome");
    assert_eq!(lines.last().unwrap()["status"], "succeeded");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l["event"] == "step"),
        "{}",
        r.stdout
    );
    let (ka, fresh) = load.stop("API deploy");
    assert_eq!((ka.failed, fresh.failed), (0, 0), "no failed request");
    serves(&w, "v3");
}

/// Every host serves `page` at `/` (builds from git have no `World::build` files to check).
fn serves(w: &World, page: &str) {
    for i in 0..w.hosts() {
        assert_eq!(w.served(i), page, "host {i}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Every login verifies an argon2id hash with 19 MiB of working memory; none of it may stay
/// resident afterwards (glibc kept it: four logins took the server from 19 to 96 MiB).
#[test]
fn logins_leave_the_servers_memory_where_it_was() {
    let w = World::local().start();
    add_user(&w, "ada", "admin", "ada-password-1");
    let s = Server::start(&w);
    let (status, body, _) = login(&s, "127.0.0.3", "ada", "ada-password-1");
    assert_eq!(status, 200, "{body}");
    let after_one = rss_kib(s.child.id());
    for _ in 0..8 {
        let (status, body, _) = login(&s, "127.0.0.3", "ada", "ada-password-1");
        assert_eq!(status, 200, "{body}");
    }
    let after_nine = rss_kib(s.child.id());
    let grew = after_nine.saturating_sub(after_one) / 1024;
    assert!(
        grew < 12,
        "8 more logins grew the server's RSS by {grew} MiB ({} -> {} MiB)",
        after_one / 1024,
        after_nine / 1024
    );
}

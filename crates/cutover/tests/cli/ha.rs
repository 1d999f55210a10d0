//! Two `cutover serve` instances on one PostgreSQL database (a scratch database per test,
//! dropped after): a job runs exactly once whichever instance the requests reach, the CLI on
//! the same database gets the same lock and exit 4, each instance streams the events of runs
//! the other executes, and when the instance running a job is killed (kill -9) the other one's
//! sweeper takes the lock over once the lease expired and reconciles the killed run with no
//! new run, the history and the hosts agreeing afterwards.

use crate::serve::{token, Server};
use crate::world::{wait_for, World};
use cutover_store::testing::ScratchDb;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A scratch database every `cutover` this test starts uses (`CUTOVER_DATABASE`; nextest
/// runs each test in its own process).
fn on_postgres(tag: &str) -> (ScratchDb, postgres::Client) {
    let db = ScratchDb::new(tag);
    std::env::set_var("CUTOVER_DATABASE", &db.url);
    let c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    (db, c)
}

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn two_servers_on_one_postgres_database_run_a_deploy_exactly_once() {
    let (_db, mut pg) = on_postgres("two_servers");
    let w = World::files(2).start();
    let v1 = w.deploy_ok("v1");
    w.deploy_ok("v2");
    assert!(
        !w.dir.join("data/cutover.db").exists(),
        "the CLI keeps the history in PostgreSQL, not in the data directory"
    );
    assert_eq!(count(&mut pg, "SELECT count(*) FROM runs"), 2);
    // A reload that takes a while keeps the run going while the requests arrive and the CLI
    // tries (on a loaded machine too).
    w.configure(|t| {
        t.set_str("files", "reload", "sleep 8");
    });
    let v3 = w.build("v3");
    let tok = token(&w, "ci", "deployer", &[]);
    let servers = [Server::start(&w), Server::start(&w)];
    let answers: Vec<(usize, u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..100)
            .map(|i| {
                let (s, tok, v1) = (&servers[i % 2], &tok, &v1);
                sc.spawn(move || {
                    let (status, body) =
                        s.api_post(tok, "/api/apps/site/deploys", &json!({ "release": v1 }));
                    (i % 2, status, body)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: Vec<&(usize, u16, Value)> = answers.iter().filter(|a| a.1 == 202).collect();
    let refused: Vec<&(usize, u16, Value)> = answers.iter().filter(|a| a.1 == 409).collect();
    assert_eq!(
        (accepted.len(), refused.len()),
        (1, 99),
        "one run, 99 conflicts: {answers:?}"
    );
    for (_, _, body) in &refused {
        let m = body["error"].as_str().unwrap();
        assert!(
            m.starts_with("a deploy of `site` is in progress: ")
                && m.ends_with("; wait for it to end"),
            "{m}"
        );
    }
    // Both instances refused some: the lock is the database's, not a process's.
    for i in 0..2 {
        assert!(refused.iter().any(|a| a.0 == i), "server {i} refused none");
    }
    let (by, _, body) = accepted[0];
    let run = body["run"].as_str().unwrap().to_string();
    // The CLI on the same database: the same lock, exit 4.
    let r = w.run(&["deploy", "--artifact", v3.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("another run of app `site` holds the lock: "),
        "{}",
        r.stderr
    );
    // The other instance streams the run's events, to its end.
    let other = &servers[1 - by];
    let ev = other.run_events(&tok, &run);
    let (_, kind, data) = ev.last().unwrap();
    assert_eq!(kind, "end", "{ev:?}");
    let end: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (end["status"].as_str(), end["exit_code"].as_i64()),
        (Some("succeeded"), Some(0)),
        "{end}"
    );
    let seqs: Vec<i64> = ev.iter().filter_map(|e| e.0).collect();
    let stored: Vec<i64> = pg
        .query(
            "SELECT seq FROM events WHERE run_id = $1 ORDER BY seq",
            &[&run.parse::<i64>().unwrap()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(seqs.len() > 5, "{ev:?}");
    assert_eq!(seqs, stored, "every event of the run, once, in order");
    // Exactly one run more, one job, and the hosts serve what the history says is live.
    assert_eq!(count(&mut pg, "SELECT count(*) FROM runs"), 3);
    assert_eq!(count(&mut pg, "SELECT count(*) FROM jobs"), 1);
    w.assert_all_serve("v1");
    assert_eq!(w.live(), [v1]);
}

/// Polls `GET /api/runs/{run}` (up to 120 s) until the run has ended with an exit code: a
/// sweeper reconciled it. The status stays `running` or `interrupted` until then.
pub(crate) fn wait_reconciled(s: &Server, tok: &str, run: &str) -> Value {
    wait_for(Duration::from_secs(120), "a reconciled run", || {
        let (status, got) = s.api_get(tok, &format!("/api/runs/{run}"));
        assert_eq!(status, 200);
        if !got["exit_code"].is_null() {
            return Ok(got);
        }
        assert!(
            got["status"] == "interrupted" || got["status"] == "running",
            "{got}"
        );
        Err(format!("{got}; {}", s.log()))
    })
}

/// Asserts the message a sweeper leaves on a rollback it reconciled that was killed after
/// host 0 switched: host 0 (and host 1, if its switch ran on after the kill) back on the live
/// release. Returns how many hosts were switched back.
pub(crate) fn assert_reconciled(w: &World, message: &str) -> usize {
    let me = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        cutover_engine::identity::machine()
    );
    let m = w.norm_with(message, &[(&me, "<me>")]);
    let said = |hosts: &str| {
        format!("reconciled by server <me> pid <pid>: switched {hosts} back to the live release <release>; every host serves it")
    };
    match m {
        m if m == said("<host0>") => 1,
        m if m == said("<host0>, <host1>") => 2,
        m => panic!("{m}"),
    }
}

#[test]
fn a_server_killed_mid_job_leaves_the_other_to_take_over_after_its_lease_and_reconcile() {
    let (_db, mut pg) = on_postgres("killed");
    let w = World::files(2).start();
    let v1 = w.deploy_ok("v1");
    let v2 = w.deploy_ok("v2");
    let tok = token(&w, "ci", "deployer", &[]);
    // a plays a server on another machine: b cannot see whether its process lives, only
    // whether its lease (10 s here) is renewed.
    let lease = ("CUTOVER_LEASE", "10");
    let mut a = Server::start_with(
        &w,
        &[
            ("CUTOVER_CRASH_AT", "after-switch-first"),
            ("CUTOVER_TEST_MACHINE", "elsewhere"),
            lease,
        ],
    );
    let b = Server::start_with(&w, &[lease]);
    let run = a.start_job(&tok, "/api/apps/site/rollback", &json!({}));
    a.wait_exit();
    // Host 0 switched to v1 (host 1 too, if its switch ran on after the kill): the history
    // (v2 live) does not say so.
    for i in 0..w.hosts() {
        w.assert_complete(i);
    }
    let died = Instant::now();
    // Until the lease expires, b must presume a alive: 409 naming it.
    let (status, body) = b.api_post(&tok, "/api/apps/site/rollback", &json!({}));
    assert_eq!(status, 409, "{body}");
    let m = body["error"].as_str().unwrap();
    assert!(
        m.starts_with("a rollback of `site` is in progress: ") && m.contains("@elsewhere pid "),
        "{m}"
    );
    // With no new run, b's sweeper takes the lease over once it expired and reconciles the
    // run: host 0 goes back to v2, the release the history says is live.
    let got = wait_reconciled(&b, &tok, &run);
    assert!(
        died.elapsed() > Duration::from_secs(5),
        "not before the lease ran out"
    );
    assert_eq!(
        (got["status"].as_str(), got["exit_code"].as_i64()),
        (Some("interrupted"), Some(1)),
        "{got}"
    );
    let message: String = pg
        .query_one(
            "SELECT message FROM runs WHERE id = $1",
            &[&run.parse::<i64>().unwrap()],
        )
        .unwrap()
        .get(0);
    let back = assert_reconciled(&w, &message);
    assert!(message.contains(&v2), "{message}");
    // The history and every host agree, before anyone deploys again.
    w.assert_all_serve("v2");
    assert_eq!(w.live(), std::slice::from_ref(&v2));
    // The reconciliation's steps are the run's own events, streamed by b to the end: a's
    // host locks taken over on every host, host 0 switched back and gated.
    let ev = b.run_events(&tok, &run);
    assert_eq!(ev.last().unwrap().1, "end");
    let steps: Vec<Value> = ev
        .iter()
        .filter(|e| e.1.is_empty())
        .map(|e| serde_json::from_str::<Value>(&e.2).unwrap())
        .collect();
    let n = |step: &str, state: &str| {
        steps
            .iter()
            .filter(|e| e["step"] == step && e["state"] == state)
            .count()
    };
    assert_eq!(n("lock-takeover", "done"), w.hosts(), "{steps:?}");
    assert_eq!(n("revert", "done"), back, "{steps:?}");
    assert_eq!(n("revert-gate", "done"), back, "{steps:?}");
    assert_eq!(n("reconcile", "done"), 1, "{steps:?}");
    let job: String = pg
        .query_one(
            "SELECT state FROM jobs WHERE run_id = $1",
            &[&run.parse::<i64>().unwrap()],
        )
        .unwrap()
        .get(0);
    assert_eq!(job, "interrupted", "not re-run blindly");
    let audit: Vec<String> = pg
        .query(
            "SELECT detail FROM audit WHERE action = 'run reconciled'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audit, [format!("run {run}: {message}")]);
    assert_eq!(
        count(&mut pg, "SELECT count(*) FROM locks"),
        0,
        "the lock is free"
    );
    // The next rollback has nothing left to reconcile and goes to v1.
    let next = b.start_job(&tok, "/api/apps/site/rollback", &json!({}));
    let ev = b.run_events(&tok, &next);
    let end: Value = serde_json::from_str(&ev.last().unwrap().2).unwrap();
    assert_eq!(end["exit_code"], 0, "{end}");
    assert!(
        !ev.iter().any(|e| e.2.contains("\"step\":\"reconcile\"")),
        "{ev:?}"
    );
    w.assert_all_serve("v1");
    assert_eq!(w.live(), [v1]);
}

#[test]
fn the_cli_says_which_database_it_could_not_use_without_its_password() {
    let w = World::local().start();
    let wrong = cutover_store::testing::server_url()
        .replace(":cutover_test@", ":not-the-password@")
        + "/cutover";
    let r = w.run(&["history", "--database", &wrong]);
    let shown = wrong.replace(":not-the-password@", "@");
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            3,
            format!(
                "error: database {shown}: FATAL: password authentication failed for user \"cutover_test\"\n"
            )
            .as_str()
        )
    );
    let r = w
        .cutover(&["history"])
        .env("CUTOVER_DATABASE", "mysql://u:pw@db/x")
        .run();
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (2, "error: --database mysql://u@db/x: expected a postgres:// URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE); without --database the history is SQLite in the data directory\n")
    );
}

#[test]
fn db_copy_moves_an_sqlite_history_into_an_empty_postgres_database_once() {
    let w = World::local().start();
    w.deploy_ok("v1");
    w.deploy_ok("v2");
    token(&w, "ci", "deployer", &[]);
    let on_sqlite = w.history();
    let db = ScratchDb::new("db_copy");
    let data = w.dir.join("data");
    let r = w.run(&[
        "db",
        "copy",
        "--from",
        data.to_str().unwrap(),
        "--to",
        &db.url,
    ]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let shown = db.url.replace(":cutover_test@", "@");
    assert!(!r.stdout.contains(":cutover_test@"), "{}", r.stdout);
    let last = r.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("copied ")
            && last.ends_with(&format!(
                " tables from {} into {shown}",
                data.join("cutover.db").display()
            )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["2", "runs"])),
        "{}",
        r.stdout
    );
    // The history reads the same from PostgreSQL, and the CLI deploys on.
    let on_pg = w
        .cutover(&["history", "--json"])
        .env("CUTOVER_DATABASE", &db.url)
        .run();
    assert_eq!(on_pg.code, 0, "{}", on_pg.stderr);
    assert_eq!(on_pg.json.as_array().unwrap(), &on_sqlite);
    let mut pg = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    assert_eq!(count(&mut pg, "SELECT count(*) FROM tokens"), 1);
    // Into a database with rows: refused, nothing written.
    let r = w.run(&[
        "db",
        "copy",
        "--from",
        data.to_str().unwrap(),
        "--to",
        &db.url,
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with(&format!("error: database {shown}: not empty (table `"))
            && r.stderr.ends_with(
                "` has rows): db copy writes only into a new, empty database; nothing was copied\n"
            ),
        "{}",
        r.stderr
    );
    assert_eq!(count(&mut pg, "SELECT count(*) FROM runs"), 2);
}

#[test]
fn the_cli_reaches_postgres_over_verified_tls_and_names_a_root_that_does_not_fit() {
    let w = World::local().start();
    let db = ScratchDb::new("cli_tls");
    let on = |params: &str| {
        format!(
            "{}?{params}",
            db.url.replacen("@127.0.0.1:", "@localhost:", 1)
        )
    };
    let good = on("sslmode=verify-full&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem");
    let r = w.run(&["history", "--database", &good]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    let wrong =
        on("sslmode=verify-full&sslrootcert=/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt");
    let r = w.run(&["history", "--database", &wrong]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            3,
            format!(
                "error: database {}: error performing TLS handshake: invalid peer certificate: UnknownIssuer\n",
                wrong.replace(":cutover_test@", "@")
            )
            .as_str()
        )
    );
}

//! The store suite, run against both backends: each test is a function of a `&Store`, and
//! `both!` makes it `<name>::sqlite` (a fresh file) and `<name>::postgres` (a fresh database,
//! dropped after).

use crate::testing::ScratchDb;
use crate::*;

fn holder(pid: u32) -> Holder {
    Holder {
        user: "u".into(),
        machine: "m".into(),
        pid,
        pid_start: 1,
        since: "t".into(),
        op: "deploy".into(),
    }
}

macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn sqlite() {
                let dir = std::env::temp_dir().join(format!(
                    "cutover-suite-{}-{}",
                    stringify!($name),
                    std::process::id()
                ));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let s = Store::open(&dir.join("cutover.db")).unwrap();
                assert_eq!(s.kind(), "sqlite");
                ($body)(&s);
                drop(s);
                std::fs::remove_dir_all(dir).unwrap();
            }
            #[test]
            fn postgres() {
                let db = ScratchDb::new(stringify!($name));
                let s = Store::connect(&db.url).unwrap();
                assert_eq!(s.kind(), "postgres");
                ($body)(&s);
                drop(s);
            }
        }
    };
}

both!(
    lock_is_exclusive_and_dead_holders_are_taken_over,
    |s: &Store| {
        assert_eq!(
            s.acquire_lock("a", &holder(1), |_| true).unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(
            s.acquire_lock("a", &holder(2), |_| true).unwrap(),
            LockOutcome::Held(holder(1))
        );
        assert_eq!(s.lock_holder("a").unwrap(), Some(holder(1)));
        // The holder itself takes it again (a server's job, locked when accepted).
        assert_eq!(
            s.acquire_lock("a", &holder(1), |_| true).unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(
            s.acquire_lock("b", &holder(2), |_| true).unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(
            s.acquire_lock("a", &holder(2), |_| false).unwrap(),
            LockOutcome::TookOver(holder(1))
        );
        s.release_lock("a", &holder(1)).unwrap(); // not the holder: no effect
        assert_eq!(
            s.acquire_lock("a", &holder(3), |_| true).unwrap(),
            LockOutcome::Held(holder(2))
        );
        s.release_lock("a", &holder(2)).unwrap();
        assert_eq!(s.lock_holder("a").unwrap(), None);
        assert_eq!(
            s.acquire_lock("a", &holder(3), |_| true).unwrap(),
            LockOutcome::Acquired
        );
    }
);

both!(releases_outcomes_runs_and_events_round_trip, |s: &Store| {
    for id in ["r1", "r2"] {
        s.insert_release(&NewRelease {
            id,
            app: "a",
            created_at: "t",
            artifact_sha256: "ab",
            commit: None,
            commit_subject: None,
            source: "dist",
            snapshot: "x",
        })
        .unwrap();
    }
    assert!(s.release_exists("a", "r1").unwrap());
    assert!(!s.release_exists("a", "r3").unwrap());
    s.set_host_outcome("a", "r1", "web1", HostState::Healthy)
        .unwrap();
    s.set_host_outcome("a", "r1", "web2", HostState::Unhealthy)
        .unwrap();
    s.set_host_outcome("a", "r1", "web2", HostState::Healthy)
        .unwrap();
    s.set_status("a", "r1", Status::Succeeded, Some("t2"))
        .unwrap();
    s.set_bad("a", "r2", true).unwrap();
    s.set_live("a", "r2").unwrap();
    s.set_live("a", "r1").unwrap();
    let rs = s.releases("a").unwrap();
    assert_eq!(rs[0].id, "r2");
    assert!(rs[0].bad);
    assert_eq!(rs[1].status, "succeeded");
    assert_eq!(rs[1].finished_at.as_deref(), Some("t2"));
    assert_eq!(rs[1].hosts["web1"], "healthy");
    assert_eq!(rs[1].hosts["web2"], "healthy");
    assert_eq!(s.live("a").unwrap().as_deref(), Some("r1"));
    assert_eq!(s.live("b").unwrap(), None);
    let page = s.releases_page("a", 1, Some("r2")).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, "r1");
    assert_eq!(page[0].hosts.len(), 2);
    let run = s
        .start_run("a", RunKind::Deploy, "r2", Some("r1"), "t")
        .unwrap();
    let e1 = s
        .event(
            run,
            "a",
            "r2",
            Some("web1"),
            Step::Stage,
            State::Start,
            "t",
            "",
        )
        .unwrap();
    let e2 = s
        .event(run, "a", "r2", None, Step::Stage, State::Done, "t", "ok")
        .unwrap();
    assert!(e2 > e1);
    assert_eq!(s.unfinished_runs("a").unwrap().len(), 1);
    s.finish_run(run, Status::Failed, "t3").unwrap();
    assert!(s.unfinished_runs("a").unwrap().is_empty());
    let ev = s.events(run).unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(
        (ev[0].step.as_str(), ev[0].host.as_deref()),
        ("stage", Some("web1"))
    );
    let after = s.events_after(run, e1, 10).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].detail, "ok");
    s.set_run_by(run, "ada").unwrap();
    s.set_run_exit(run, 1, "no").unwrap();
    let row = s.run_row(run).unwrap().unwrap();
    assert_eq!(
        (
            row.by.as_deref(),
            row.exit_code,
            row.message.as_deref(),
            row.outcome.as_deref()
        ),
        (Some("ada"), Some(1), Some("no"), Some("failed"))
    );
    assert_eq!(s.run_rows(Some("a"), 10).unwrap().len(), 1);
    assert_eq!(s.run_rows(Some("b"), 10).unwrap().len(), 0);
    assert_eq!(s.run_rows(None, 10).unwrap().len(), 1);
});

both!(commits_runs_renamed_and_the_build_cache, |s: &Store| {
    let sha = "0123456789abcdef0123456789abcdef01234567";
    s.insert_release(&NewRelease {
        id: "r1",
        app: "a",
        created_at: "t",
        artifact_sha256: "ab",
        commit: Some(sha),
        commit_subject: Some("Fix the thing"),
        source: "repo @ main",
        snapshot: "x",
    })
    .unwrap();
    let r = s.release("a", "r1").unwrap().unwrap();
    assert_eq!(r.commit.as_deref(), Some(sha));
    assert_eq!(r.commit_subject.as_deref(), Some("Fix the thing"));
    let run = s.start_run("a", RunKind::Deploy, "", None, "t").unwrap();
    s.event(run, "a", "", None, Step::Build, State::Start, "t", "")
        .unwrap();
    s.set_run_release(run, "r1").unwrap();
    assert_eq!(s.unfinished_runs("a").unwrap()[0].release_id, "r1");
    assert_eq!(s.events(run).unwrap()[0].release_id, "r1");
    s.claim_run(run, "r1", Some("r0")).unwrap();
    assert_eq!(
        s.run_row(run).unwrap().unwrap().previous_live.as_deref(),
        Some("r0")
    );
    assert_eq!(s.cached_build("a", "k").unwrap(), None);
    s.record_build("a", "k", sha, "ab", "t").unwrap();
    s.record_build("a", "k", sha, "cd", "t").unwrap();
    assert_eq!(s.cached_build("a", "k").unwrap().as_deref(), Some("cd"));
    assert_eq!(s.cached_build("b", "k").unwrap(), None);
});

both!(
    users_tokens_sessions_and_failures_round_trip,
    |s: &Store| {
        assert!(s.add_user("ada", Role::Admin, "$argon2id$x", "t").unwrap());
        assert!(!s.add_user("ada", Role::Viewer, "$argon2id$y", "t").unwrap());
        assert!(s.add_user("bob", Role::Viewer, "$argon2id$b", "t").unwrap());
        assert_eq!(s.user("ada").unwrap().unwrap().role, Role::Admin);
        assert_eq!(s.users().unwrap().len(), 2);
        s.add_session("h1", "ada", "c1", "t", 10).unwrap();
        s.add_session("h2", "bob", "c2", "t", 5).unwrap();
        assert_eq!(s.session("h1").unwrap().unwrap().user, "ada");
        assert!(s.set_password("ada", "$argon2id$z").unwrap());
        assert!(
            s.session("h1").unwrap().is_none(),
            "a new password ends sessions"
        );
        s.prune_sessions(6).unwrap();
        assert!(s.session("h2").unwrap().is_none());
        assert!(s.remove_user("bob").unwrap());
        assert!(!s.remove_user("bob").unwrap());
        let t = Token {
            name: "ci".into(),
            hash: "abc".into(),
            role: Role::Deployer,
            apps: Some(vec!["site".into(), "api".into()]),
            created_at: "t".into(),
            expires_at: Some(5),
            last_used_at: None,
            revoked_at: None,
        };
        assert!(s.add_token(&t).unwrap());
        assert!(!s.add_token(&t).unwrap());
        let got = s.token_by_hash("abc").unwrap().unwrap();
        assert_eq!(
            (got.role, got.apps.clone(), got.expires_at),
            (Role::Deployer, t.apps.clone(), Some(5))
        );
        s.touch_token("ci", "t1").unwrap();
        assert_eq!(s.tokens().unwrap()[0].last_used_at.as_deref(), Some("t1"));
        assert!(s.revoke_token("ci", "t2").unwrap());
        assert!(!s.revoke_token("ci", "t3").unwrap());
        s.record_login_failure("ada", "127.0.0.2", 7).unwrap();
        s.record_login_failure("ada", "127.0.0.2", 9).unwrap();
        assert_eq!(s.login_failures("ada", "127.0.0.2").unwrap(), (2, 9));
        assert_eq!(s.login_failures("ada", "127.0.0.1").unwrap(), (0, 0));
        s.clear_login_failures("ada", "127.0.0.2").unwrap();
        assert_eq!(s.login_failures("ada", "127.0.0.2").unwrap(), (0, 0));
    }
);

both!(audit_jobs_and_deliveries_round_trip, |s: &Store| {
    for who in ["ada", "bob", "eve"] {
        s.audit(&AuditRow {
            at: "t".into(),
            who: who.into(),
            action: "login".into(),
            ..AuditRow::default()
        })
        .unwrap();
    }
    let rows = s.audit_rows(2, None).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.who.as_str()).collect::<Vec<_>>(),
        ["eve", "bob"]
    );
    let older = s.audit_rows(10, Some(rows[1].id)).unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].who, "ada");

    let run = s.start_run("a", RunKind::Deploy, "", None, "t").unwrap();
    let job = s.add_job(run, "a", "{}", "ada", "t").unwrap();
    assert_eq!(s.open_jobs().unwrap().len(), 1);
    s.set_job_state(job, JobState::Running, None).unwrap();
    assert_eq!(s.job_of_run(run).unwrap().unwrap().state, JobState::Running);
    s.set_job_state(job, JobState::Done, Some("t2")).unwrap();
    assert!(s.open_jobs().unwrap().is_empty());
    assert_eq!(
        s.job_of_run(run).unwrap().unwrap().finished_at.as_deref(),
        Some("t2")
    );

    assert!(s.add_delivery("site", "d1", "github", "t", "").unwrap());
    assert!(!s.add_delivery("site", "d1", "github", "t", "").unwrap());
    assert!(s.add_delivery("other", "d1", "github", "t", "").unwrap());
    s.set_delivery_outcome("site", "d1", Some("ab"), "superseded by cd")
        .unwrap();
    let d = s.delivery("site", "d1").unwrap().unwrap();
    assert_eq!(d.sha.as_deref(), Some("ab"));
    assert_eq!(d.outcome, "superseded by cd");
});

#[test]
fn postgres_audit_log_is_append_only() {
    let db = ScratchDb::new("audit");
    let s = Store::connect(&db.url).unwrap();
    s.audit(&AuditRow {
        at: "t".into(),
        who: "ada".into(),
        action: "login".into(),
        ..AuditRow::default()
    })
    .unwrap();
    drop(s);
    let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    for sql in ["UPDATE audit SET who = 'eve'", "DELETE FROM audit"] {
        let e = c.execute(sql, &[]).unwrap_err();
        assert!(
            e.as_db_error()
                .is_some_and(|d| d.message() == "the audit log is append-only"),
            "{e:?}"
        );
    }
}

#[test]
fn postgres_lease_expires_and_is_renewed_while_held() {
    let db = ScratchDb::new("lease");
    // Two processes as far as the store can tell: two connections, two holders on other
    // machines (presumed alive, so only the lease decides).
    let a = Store::with(
        Postgres::connect_with_lease(&db.url, std::time::Duration::from_secs(2)).unwrap(),
    );
    let b = Store::with(
        Postgres::connect_with_lease(&db.url, std::time::Duration::from_secs(2)).unwrap(),
    );
    let ha = Holder {
        machine: "a".into(),
        ..holder(1)
    };
    let hb = Holder {
        machine: "b".into(),
        ..holder(2)
    };
    assert_eq!(
        a.acquire_lock("site", &ha, |_| true).unwrap(),
        LockOutcome::Acquired
    );
    // a renews its lease: well past 2 s, b still cannot take it.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        b.acquire_lock("site", &hb, |_| true).unwrap(),
        LockOutcome::Held(ha.clone())
    );
    // a dies (its store and renewal go away without releasing): the lease runs out.
    drop(a);
    assert_eq!(b.lock_holder("site").unwrap(), Some(ha.clone()));
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        b.lock_holder("site").unwrap(),
        None,
        "an expired lease holds nothing"
    );
    assert_eq!(
        b.acquire_lock("site", &hb, |_| true).unwrap(),
        LockOutcome::TookOver(ha)
    );
}

#[test]
fn postgres_lock_is_taken_once_by_racing_connections() {
    let db = ScratchDb::new("race");
    let stores: Vec<Store> = (0..8).map(|_| Store::connect(&db.url).unwrap()).collect();
    let won: Vec<bool> = std::thread::scope(|sc| {
        let hs: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                sc.spawn(move || {
                    let me = Holder {
                        machine: format!("m{i}"),
                        ..holder(i as u32)
                    };
                    s.acquire_lock("site", &me, |_| true).unwrap() == LockOutcome::Acquired
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
}

#[test]
fn postgres_refuses_a_database_of_something_else_untouched() {
    let db = ScratchDb::new("foreign");
    let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    c.batch_execute("CREATE TABLE customers (id INT); CREATE TABLE orders (id INT);")
        .unwrap();
    let e = Store::connect(&db.url).unwrap_err();
    let m = e.to_string();
    assert!(
        m.ends_with(": a PostgreSQL database of something else (tables: customers, orders), not cutover's history; cutover did not touch it. Point --database or CUTOVER_DATABASE at an empty database (CREATE DATABASE) or at cutover's"),
        "{m}"
    );
    assert!(
        !m.contains(":cutover_test@"),
        "no password in messages: {m}"
    );
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // And a second connect to a database of ours migrates nothing and works.
    let ok = ScratchDb::new("ours");
    drop(Store::connect(&ok.url).unwrap());
    assert!(Store::connect(&ok.url)
        .unwrap()
        .releases("a")
        .unwrap()
        .is_empty());
}

#[test]
fn postgres_works_from_inside_an_async_runtime() {
    // The server's handlers call the store on tokio's threads, where the sync client's own
    // runtime cannot block: the calls (and connecting, and closing) go to a thread of their own.
    let db = ScratchDb::new("async");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Store::connect(&db.url).unwrap();
        assert_eq!(
            s.acquire_lock("a", &holder(1), |_| true).unwrap(),
            LockOutcome::Acquired
        );
        assert!(s.releases("a").unwrap().is_empty());
        drop(s);
    });
}

#[test]
fn a_database_url_never_shows_its_password() {
    let u: DatabaseUrl = "postgres://ci:s3cret-pw@db.internal:5432/cutover"
        .parse()
        .unwrap();
    assert_eq!(format!("{u:?}"), "postgres://ci@db.internal:5432/cutover");
    assert_eq!(u.check(), Ok(()));
    let e = "mysql://ci:pw@db/x"
        .parse::<DatabaseUrl>()
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(e, "--database mysql://ci@db/x: expected a postgres:// URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE); without --database the history is SQLite in the data directory");
    let wrong = format!(
        "{}/postgres",
        crate::testing::server_url().replace(":cutover_test@", ":not-the-password@")
    );
    let m = Store::connect(&wrong).unwrap_err().to_string();
    assert!(!m.contains("not-the-password"), "{m}");
    assert!(
        m.ends_with("FATAL: password authentication failed for user \"cutover_test\""),
        "{m}"
    );
}

both!(
    a_preview_opens_updates_and_is_removed_keeping_its_row,
    |s: &Store| {
        s.open_preview("web", 3, "http://pr-3-web.p.example", "feature", "t1")
            .unwrap();
        s.set_preview_sha("web", 3, "ab12", "t2").unwrap();
        s.open_preview("web", 3, "http://pr-3-web.p.example", "feature2", "t3")
            .unwrap();
        s.open_preview("web", 4, "http://pr-4-web.p.example", "x", "t3")
            .unwrap();
        let p = s.preview("web", 3).unwrap().unwrap();
        assert_eq!(
            (
                p.state.as_str(),
                p.opened_at.as_str(),
                p.updated_at.as_str()
            ),
            ("open", "t1", "t3")
        );
        assert_eq!(
            (p.head_ref.as_str(), p.head_sha.as_deref()),
            ("feature2", Some("ab12"))
        );
        // Closed during a run: no longer open, removed after.
        assert!(s.close_preview("web", 3, "closed").unwrap());
        assert!(!s.close_preview("web", 3, "closed").unwrap());
        let p = s.preview("web", 3).unwrap().unwrap();
        assert_eq!(
            (p.state.as_str(), p.removed_why.as_str()),
            ("closing", "closed")
        );
        assert_eq!(s.previews("web", false).unwrap().len(), 1);
        assert!(s.remove_preview("web", 3, "t4", "closed").unwrap());
        assert!(!s.remove_preview("web", 3, "t5", "closed").unwrap());
        let open: Vec<u64> = s
            .previews("web", false)
            .unwrap()
            .iter()
            .map(|p| p.pr)
            .collect();
        assert_eq!(open, [4]);
        let all = s.previews("web", true).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].removed_at.as_deref(), Some("t4"));
        // Opened again: a new opening time.
        s.open_preview("web", 3, "http://pr-3-web.p.example", "y", "t6")
            .unwrap();
        let p = s.preview("web", 3).unwrap().unwrap();
        assert_eq!((p.state.as_str(), p.opened_at.as_str()), ("open", "t6"));
        assert_eq!(p.removed_at, None);
        assert!(s.previews("other", true).unwrap().is_empty());
    }
);

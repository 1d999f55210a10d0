//! Releases built from git: real repositories made with the `git` CLI, the real `cutover`
//! binary, a `local` host served by a tiny static server in this process (like
//! `cutover demo`), and a testlab host for a repository reached over `ssh://`. Needs root
//! (the ssh test) and git.
//!
//! Container builds (`[build] dockerfile`, pushed to the lab's registry) are in
//! `git_containers.rs`, `https://` repositories in `git_https.rs`.

use crate::world::{git_at, World};
use serde_json::Value;
use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testlab::Lab;

/// Commits a site whose pages say `page` (plus `extra` files), returns the full SHA.
fn commit_site(w: &World, page: &str, subject: &str, extra: &[(&str, &str)]) -> String {
    let index = format!("{page}\n");
    let mut files = vec![("index.html", index.as_str()), ("up", "ok\n")];
    files.extend_from_slice(extra);
    w.commit(subject, &files)
}

/// `deploy --ref r` deploys `commit`, and the host serves `page`.
fn deploys(w: &World, r: &str, commit: &str, page: &str) {
    assert_eq!(w.deploy_ref_ok(r)["commit"], commit, "deploy --ref {r}");
    assert_eq!(w.served(0), page, "after deploy --ref {r}");
}

fn short(sha: &str) -> &str {
    &sha[..7]
}

/// The `commit` of every entry of `list`.
fn shas(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["commit"].as_str().unwrap())
        .collect()
}

#[test]
fn branches_tags_and_short_shas_resolve_to_full_commits() {
    let w = World::local()
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up out/ && echo built $CUTOVER_COMMIT\"\noutput = \"out\"",
        )
        .start();
    let c1 = commit_site(&w, "v1", "First page", &[]);
    w.git(&["tag", "-a", "v1.0", "-m", "release 1.0"]);
    let c2 = commit_site(&w, "v2", "Second page", &[]);
    w.push();

    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    assert_eq!(v["commit_subject"], "Second page");
    assert_eq!(w.served(0), "v2");
    let meta: Value = serde_json::from_slice(
        &std::fs::read(w.site(0).join("current/.cutover-release.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["commit"], c2.as_str(), "the host records the full SHA");

    let v = w.deploy_ref_ok("v1.0");
    assert_eq!(
        v["commit"],
        c1.as_str(),
        "annotated tags peel to their commit"
    );
    assert_eq!(w.served(0), "v1");
    assert_eq!(w.deploy_ref_ok(short(&c2))["commit"], c2.as_str());
    assert_eq!(w.deploy_ref_ok("HEAD~1")["commit"], c1.as_str());
    assert_eq!(w.deploy_ref_ok("origin/main")["commit"], c2.as_str());
    assert_eq!(w.deploy_ref_ok(&c1)["commit"], c1.as_str());

    // The build's output was shown live (human mode) and recorded as events.
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 0);
    assert!(r.stderr.contains(&format!("built {c2}")), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("commit {} Second page", short(&c2))),
        "{}",
        r.stderr
    );
    let events = w.last_run_events();
    assert!(
        events
            .iter()
            .any(|(s, p, d)| s == "build" && p == "output" && d == &format!("built {c2}")),
        "{events:?}"
    );
    assert!(events.iter().any(|(s, p, _)| s == "resolve" && p == "done"));

    // History: full SHA and subject in JSON, short SHA and subject in the table.
    let h = w.history();
    assert_eq!(h[0]["commit"], c2.as_str());
    assert_eq!(h[0]["commit"].as_str().unwrap().len(), 40);
    assert_eq!(h[0]["commit_subject"], "Second page");
    assert!(h[0]["source"].as_str().unwrap().ends_with("@ main"));
    let text = w.run(&["history"]).stdout;
    assert!(
        text.contains(&format!("{} Second page", short(&c2))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} First page", short(&c1))),
        "{text}"
    );
    assert!(!text.contains(&c2), "the table shows short SHAs: {text}");

    // Status: read from the host, commit from the history.
    let s = w.run(&["status", "--json"]);
    assert_eq!(s.code, 0);
    assert_eq!(s.json["hosts"][0]["commit"], c2.as_str());
    assert_eq!(s.json["live_commit_subject"], "Second page");
    assert!(w
        .run(&["status"])
        .stdout
        .contains(&format!("{} Second page", short(&c2))));

    // `--artifact` still works with [build] present.
    let art = w.dir.join("plain");
    std::fs::create_dir_all(&art).unwrap();
    std::fs::write(art.join("index.html"), "plain\n").unwrap();
    std::fs::write(art.join("up"), "ok\n").unwrap();
    let r = w.deploy_artifact(&art);
    assert_eq!(r.code, 0, "{}", r.json);
    assert!(r.json.get("commit").is_none());
    assert_eq!(w.served(0), "plain");
}

#[test]
fn a_branch_that_moves_and_a_force_push_are_followed() {
    let w = World::local().git().start();
    let c1 = commit_site(&w, "v1", "one", &[]);
    let c2 = commit_site(&w, "v2", "two", &[]);
    w.push();
    assert_eq!(w.deploy_ref_ok("main")["commit"], c2.as_str());
    let r2 = w.history()[0]["id"].as_str().unwrap().to_string();

    let c3 = commit_site(&w, "v3", "three", &[]);
    w.push();
    // The branch moved.
    deploys(&w, "main", &c3, "v3");

    // Rewrite history: main now forks from c1.
    w.git(&["reset", "-q", "--hard", &c1]);
    let c4 = commit_site(&w, "v4", "four (rewritten)", &[]);
    w.push();
    // A force-pushed branch is followed.
    deploys(&w, "main", &c4, "v4");
    let r4 = w.history()[0]["id"].as_str().unwrap().to_string();

    // The diff across the force-push: c4 is new, c2 and c3 go away.
    let d = w.run(&["diff", "--json"]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert_eq!(d.json["from"]["commit"], c3.as_str());
    assert_eq!(d.json["to"]["commit"], c4.as_str());
    assert_eq!(shas(&d.json["commits"]), [c4.as_str()]);
    assert_eq!(shas(&d.json["reverted"]), [c3.as_str(), c2.as_str()]);

    // Commits force-pushed away stay readable from the mirror.
    let d = w.run(&["diff", "--json", &r2, &r4]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert_eq!(d.json["from"]["commit"], c2.as_str());
    // A deleted tag or branch is pruned from the mirror.
    w.git(&["tag", "gone"]);
    w.push();
    w.deploy_ref_ok("gone");
    w.git(&["push", "-q", "origin", ":refs/tags/gone"]);
    w.deploy_ref("gone").says(2, &["matches no commit"]);
}

/// The id git gives a blob with `content`.
fn blob_id(content: &str) -> String {
    let mut c = Command::new("git")
        .args(["hash-object", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ambiguous_and_unknown_short_shas_are_refused() {
    let w = World::local().git().start();
    commit_site(&w, "v1", "one", &[]);
    // Objects until two share a 4-character prefix; both go into the repository.
    let mut seen = std::collections::HashMap::new();
    let mut pair = None;
    for i in 0..20_000 {
        let content = format!("object {i}\n");
        let id = blob_id(&content);
        if let Some((other, other_content)) =
            seen.insert(id[..4].to_string(), (id.clone(), content.clone()))
        {
            pair = Some((other, other_content, id, content));
            break;
        }
    }
    let (id_a, a, id_b, b) = pair.expect("two objects share a 4-character prefix");
    let sha = commit_site(
        &w,
        "v2",
        "two",
        &[("a.txt", a.as_str()), ("b.txt", b.as_str())],
    );
    w.push();
    let prefix = &id_a[..4];

    // Ambiguous, and both are listed.
    w.deploy_ref(prefix).says(2, &["ambiguous", &id_a, &id_b]);
    assert!(!w.site(0).join("current").exists(), "nothing was deployed");
    assert!(w.history().is_empty());

    let unknown = if sha.starts_with("abcdef1") {
        "abcdef2"
    } else {
        "abcdef1"
    };
    w.deploy_ref(unknown)
        .says(2, &[unknown, "matches no commit"]);
    let r = w.deploy_ref("no-such-branch");
    assert_eq!(r.code, 2, "{}", r.json);
    w.deploy_ref("main:a.txt").says(2, &["not a commit"]);
}

#[test]
fn a_failed_build_is_exit_1_and_connects_to_no_host() {
    // A host that cannot be reached: a failed build must not even try.
    let w = World::local()
        .git()
        .set("", "hosts", r#"["root@127.0.0.1:1"]"#)
        .set(
            "build",
            "command",
            r#""echo compiling the app; echo 'error: it broke' >&2; exit 3""#,
        )
        .start();
    commit_site(&w, "v1", "one", &[]);
    w.push();
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 1);
    let err = &r.stderr;
    assert!(
        err.contains("compiling the app"),
        "output shown live: {err}"
    );
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(
        err.contains("error: it broke"),
        "the tail is in the message: {err}"
    );
    assert!(err.contains("No host was touched"), "{err}");
    let events = w.last_run_events();
    assert!(
        !events
            .iter()
            .any(|(s, _, _)| s == "connect" || s == "prepare"),
        "no host connection at all: {events:?}"
    );
    assert!(events
        .iter()
        .any(|(s, p, d)| s == "build" && p == "output" && d == "compiling the app"));
    assert!(w.history().is_empty(), "no release was recorded");
    // The build directory is gone.
    let builds = w.dir.join("data/builds");
    assert_eq!(
        std::fs::read_dir(&builds).map(|d| d.count()).unwrap_or(0),
        0
    );
}

#[test]
fn a_build_that_hangs_past_its_timeout_is_killed_with_its_processes() {
    let w = World::local().git().start();
    let pidfile = w.dir.join("sleeper.pid");
    w.configure(|t| {
        t.set_str(
            "build",
            "command",
            format!(
                "sleep 300 & echo $! > {}; echo waiting; wait",
                pidfile.display()
            ),
        )
        .set_str("build", "timeout", "1s");
    });
    commit_site(&w, "v1", "one", &[]);
    w.push();
    let start = Instant::now();
    w.deploy_ref("main").says(1, &["timed out", "timeout"]);
    assert!(start.elapsed() < Duration::from_secs(20));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the build's background sleep survived: {stat}"
    );
    assert!(!w.site(0).join("current").exists());
}

#[test]
fn builds_see_a_clean_environment() {
    let w = World::local()
        .git()
        .lines(
            "build",
            "command = \"mkdir out && cp index.html up out/ && env | sort > out/env.txt\"\noutput = \"out\"\nenv = { APP_MODE = \"production\" }\npass_env = [\"CUTOVER_IT_PASSED\"]",
        )
        .start();
    let sha = commit_site(&w, "v1", "one", &[]);
    w.push();
    let r = w
        .cutover(&["deploy", "--json", "--ref", "main"])
        .env("CUTOVER_IT_PASSED", "yes")
        .env("CUTOVER_IT_LEAKED", "no")
        .run();
    assert_eq!(r.code, 0);
    let env = w.get(0, "/env.txt");
    assert!(env.contains("APP_MODE=production"), "{env}");
    assert!(env.contains("CUTOVER_IT_PASSED=yes"), "{env}");
    assert!(env.contains(&format!("CUTOVER_COMMIT={sha}")), "{env}");
    assert!(env.contains("PATH="), "{env}");
    assert!(env.contains("SOURCE_DATE_EPOCH=1790000"), "{env}");
    assert!(!env.contains("CUTOVER_IT_LEAKED"), "{env}");
    assert!(!env.contains("CUTOVER_DATA"), "{env}");
}

#[test]
fn reproducible_builds_are_cached_and_rollback_never_rebuilds() {
    let w = World::local().git().start();
    let counter = w.dir.join("builds.count");
    let build = |cache: bool, extra: &str| {
        let command = format!(
            "echo build >> {}; mkdir out && cp index.html up out/",
            counter.display()
        );
        let extra = extra.to_string();
        w.configure(|t| {
            t.set_str("build", "command", &command)
                .set_str("build", "output", "out")
                .set("build", "cache", &cache.to_string())
                .lines("build", &extra);
        });
    };
    let count = || {
        std::fs::read_to_string(&counter)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    build(true, "");
    let c1 = commit_site(&w, "v1", "one", &[]);
    w.push();
    let a = w.deploy_ref_ok("main");
    assert_eq!(count(), 1);
    let b = w.deploy_ref_ok(&c1);
    assert_eq!(
        count(),
        1,
        "the same commit and build config reuse the artifact"
    );
    assert!(w
        .last_run_events()
        .iter()
        .any(|(s, _, d)| s == "build" && d.contains("reused")));
    let h = w.history();
    assert_eq!(h[0]["artifact_sha256"], h[1]["artifact_sha256"]);
    assert_ne!(a["release"], b["release"]);

    // A changed build config is a different key.
    build(true, "env = { X = \"1\" }");
    w.deploy_ref_ok("main");
    assert_eq!(count(), 2);
    // Without `cache = true`, every deploy builds.
    build(false, "");
    w.deploy_ref_ok("main");
    assert_eq!(count(), 3);

    let c2 = commit_site(&w, "v2", "two", &[]);
    w.push();
    assert_eq!(w.deploy_ref_ok("main")["commit"], c2.as_str());
    assert_eq!(count(), 4);
    assert_eq!(w.served(0), "v2");

    // Rollback: the older release's stored artifact is re-shipped (its directory is gone
    // from the host, so it must be uploaded), nothing is fetched or built.
    let older = w.history()[1]["id"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(w.site(0).join("releases").join(&older)).unwrap();
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(r.json["release"], older.as_str());
    assert!(
        r.json["hosts"]["local"]["uploaded_bytes"].as_u64().unwrap() > 0,
        "{}",
        r.json
    );
    assert_eq!(count(), 4, "rollback did not rebuild");
    let steps: Vec<String> = w.last_run_events().into_iter().map(|e| e.0).collect();
    assert!(
        !steps
            .iter()
            .any(|s| s == "build" || s == "fetch" || s == "export"),
        "{steps:?}"
    );
    assert_eq!(w.served(0), "v1");
}

#[test]
fn diff_across_ten_commits() {
    let w = World::local().git().start();
    let c0 = commit_site(
        &w,
        "v0",
        "Start",
        &[("docs/readme.md", "hello\n"), ("old.txt", "x")],
    );
    w.push();
    w.deploy_ref_ok("main");
    let mut made = Vec::new();
    for k in 1..=10 {
        let name = format!("src/file{k}.txt");
        made.push(commit_site(
            &w,
            &format!("v{k}"),
            &format!("Change number {k}"),
            &[(name.as_str(), "content")],
        ));
    }
    w.git(&["rm", "-q", "old.txt"]);
    w.git(&["commit", "-q", "-m", "Remove old.txt"]);
    let last = w.git(&["rev-parse", "HEAD"]);
    made.push(last.clone());
    w.push();
    w.deploy_ref_ok("main");

    let r = w.run(&["diff", "--json"]);
    assert_eq!(r.code, 0, "{}", r.json);
    let d = &r.json;
    assert_eq!(d["from"]["commit"], c0.as_str());
    assert_eq!(d["to"]["commit"], last.as_str());
    assert_eq!(d["to"]["short"], short(&last));
    let commits = d["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 11);
    // Newest first, with subject, author, full and short SHA.
    made.reverse();
    for (c, sha) in commits.iter().zip(&made) {
        assert_eq!(c["commit"], sha.as_str());
        assert_eq!(c["short"], short(sha));
        assert_eq!(c["author"], "Ada Lovelace");
        assert_eq!(c["email"], "ada@example.com");
    }
    assert_eq!(commits[0]["subject"], "Remove old.txt");
    assert_eq!(commits[10]["subject"], "Change number 1");
    assert!(d["reverted"].as_array().unwrap().is_empty());
    let files: Vec<(String, String)> = d["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        files.contains(&("index.html".into(), "modified".into())),
        "{files:?}"
    );
    assert!(
        files.contains(&("old.txt".into(), "deleted".into())),
        "{files:?}"
    );
    for k in 1..=10 {
        assert!(
            files.contains(&(format!("src/file{k}.txt"), "added".into())),
            "{files:?}"
        );
    }
    assert_eq!(files.len(), 12, "{files:?}");

    let r = w.run(&["diff"]);
    assert_eq!(r.code, 0);
    let text = &r.stdout;
    assert!(text.contains("commits (11)"), "{text}");
    assert!(
        text.contains(&format!("{} Change number 7", short(&made[4]))),
        "{text}"
    );
    assert!(
        text.contains("D old.txt") && text.contains("A src/file3.txt"),
        "{text}"
    );
}

#[test]
fn a_history_recorded_from_short_refs_still_diffs() {
    let w = World::local().git().start();
    let c1 = commit_site(&w, "v1", "one", &[]);
    let c2 = commit_site(&w, "v2", "two", &[]);
    let c3 = commit_site(&w, "v3", "three", &[]);
    w.push();
    w.deploy_ref_ok(short(&c1));
    w.deploy_ref_ok(short(&c3));
    let h = w.history();
    assert_eq!(h[0]["commit"], c3.as_str(), "the full SHA is recorded");
    assert_eq!(h[1]["commit"], c1.as_str());
    let (r3, r1) = (
        h[0]["id"].as_str().unwrap().to_string(),
        h[1]["id"].as_str().unwrap().to_string(),
    );

    let d = w.run(&["diff", "--json"]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert_eq!(shas(&d.json["commits"]), [c3.as_str(), c2.as_str()]);

    // Releases named by their last 7+ characters... and the other way round.
    let tail = |id: &str| id[id.len() - 9..].to_string();
    let d = w.run(&["diff", "--json", &tail(&r3), &tail(&r1)]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert!(d.json["commits"].as_array().unwrap().is_empty());
    assert_eq!(d.json["reverted"].as_array().unwrap().len(), 2);

    // A record that holds only an abbreviation (as an older tool might have written) is
    // resolved before use, with a fresh mirror too.
    w.db()
        .execute(
            "UPDATE releases SET commit_sha = ?1 WHERE id = ?2",
            [short(&c1), r1.as_str()],
        )
        .unwrap();
    std::fs::remove_dir_all(w.dir.join("data/git")).unwrap();
    let d = w.run(&["diff", "--json", &r1, &r3]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert_eq!(d.json["from"]["commit"], c1.as_str());
    assert_eq!(d.json["commits"].as_array().unwrap().len(), 2);

    // Bad names.
    let d = w.run(&["diff", "--json", "nonexistent-release"]);
    assert_eq!(d.code, 2, "{}", d.stderr);

    // The same commit exports to the same bytes (files dated with the commit).
    let again = w.deploy_ref_ok(&c3);
    let h = w.history();
    assert_eq!(h[0]["id"], again["release"]);
    assert_eq!(h[0]["artifact_sha256"], h[1]["artifact_sha256"]);
}

#[test]
fn config_and_usage_errors_are_exit_2() {
    let w = World::local().git().start();
    let repo = w.origin().display().to_string();
    for (extra, repo, needle) in [
        (
            "dockerfile = \"Dockerfile\"",
            repo.as_str(),
            "container apps",
        ),
        ("", "http://example.invalid/app.git", "https://"),
        ("output = \"../x\"", repo.as_str(), "build.output"),
        ("timeout = \"soon\"", repo.as_str(), "build.timeout"),
    ] {
        w.configure(|t| {
            t.set_str("build", "repo", repo).lines("build", extra);
        });
        let r = w.run(&["deploy", "--ref", "main"]);
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.contains(needle) && r.stderr.contains("cutover.toml"),
            "{}",
            r.stderr
        );
    }
    // No [build]: --ref is refused, --artifact still works.
    w.configure(|t| {
        t.remove_section("build");
    });
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("[build]"));
    assert_eq!(w.run(&["diff"]).code, 2);
    let r = w.run(&["deploy", "--ref", "main", "--artifact", "/tmp"]);
    assert_eq!(r.code, 2, "--ref and --artifact exclude each other");
}

#[test]
fn a_repository_over_ssh_through_a_test_host() {
    let lab = Lab::start(1);
    let w = World::local().git().start();
    let c1 = commit_site(&w, "v1", "over ssh", &[]);
    // The host's /srv holds the bare repository; the host runs git-upload-pack for us.
    let bare = lab.srv_dir(0).join("repo.git");
    git_at(
        &w.dir,
        &[
            "clone",
            "-q",
            "--bare",
            w.work().to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        None,
    );
    let url = format!("ssh://root@{}/srv/repo.git", lab.ip(0));
    let over_ssh = |known_hosts: &std::path::Path| {
        w.configure(|t| {
            t.set_str("build", "repo", &url)
                .set_str("ssh", "known_hosts", known_hosts.display().to_string())
                .set_str("ssh", "identity", lab.identity().display().to_string())
                .set_str("ssh", "connect_timeout", "5s");
        });
    };
    over_ssh(&lab.known_hosts());
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c1.as_str());
    assert_eq!(w.served(0), "v1");

    // A new commit pushed to the host's repository is fetched incrementally.
    let c2 = commit_site(&w, "v2", "second over ssh", &[]);
    w.git(&["push", "-q", bare.to_str().unwrap(), "main"]);
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    assert!(w
        .last_run_events()
        .iter()
        .any(|(s, p, _)| s == "fetch" && p == "done"));
    let d = w.run(&["diff", "--json"]);
    assert_eq!(d.code, 0, "{}", d.json);
    assert_eq!(d.json["commits"][0]["commit"], c2.as_str());
    let c = w.run(&["check"]);
    assert_eq!(c.code, 0);
    assert!(c.stdout.contains("build repo ssh://"));

    // Host keys are checked strictly: an unknown host key fails the fetch (exit 1).
    let empty = w.dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    over_ssh(&empty);
    w.deploy_ref("main").says(1, &["cannot fetch"]);
    assert_eq!(w.served(0), "v2");
    let c = w.run(&["check"]);
    assert_eq!(c.code, 1, "check fetches the repository too");
    assert!(c.stdout.contains("problem: build repo"));
}

#[test]
fn a_fetch_from_a_server_that_stalls_gives_up_at_the_build_timeout() {
    let w = World::local().git().start();
    // An https "server" that accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    w.configure(|t| {
        t.set_str("build", "repo", format!("https://127.0.0.1:{port}/app.git"))
            .set_str("build", "timeout", "2s");
    });
    let started = Instant::now();
    let r = w.run(&["deploy", "--ref", "main"]);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "a stalled fetch is a failed run");
    assert!(
        r.stderr.contains("did not finish within [build] timeout"),
        "{}",
        r.stderr
    );
    assert!(
        took < Duration::from_secs(60),
        "gave up instead of hanging (took {took:?})"
    );
    assert!(w.history().is_empty(), "no release was recorded");
    assert!(
        !w.last_run_events().iter().any(|(s, _, _)| s == "connect"),
        "no host was contacted"
    );
}

//! Releases built from git: real repositories made with the `git` CLI, the real `cutover`
//! binary, a `local` host served by a tiny static server in this process (like
//! `cutover demo`), and a testlab host for a repository reached over `ssh://`. Needs root
//! (the ssh test) and git.
//!
//! Container builds (`[build] dockerfile`, pushed to the lab's registry) are in
//! `git_containers.rs`, `https://` repositories in `git_https.rs`.

use serde_json::Value;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use testlab::Lab;

/// Runs git in `dir` with a fixed identity and no user or system config.
fn git_at(dir: &Path, args: &[&str], date: Option<i64>) -> String {
    let mut c = Command::new("git");
    c.args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada Lovelace")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada Lovelace")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_SSH_COMMAND", "false")
        .stdin(Stdio::null());
    if let Some(d) = date {
        let d = format!("@{d} +0000");
        c.env("GIT_AUTHOR_DATE", &d).env("GIT_COMMITTER_DATE", &d);
    }
    let out = c.output().expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One test's world: a work repository pushing to a bare `origin.git`, a config whose
/// `[build] repo` is that origin, a `local` host with its root, and a data directory.
struct World {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    clock: Cell<i64>,
}

const COMMIT_TIME: i64 = 1_790_000_000;

impl World {
    fn new(build_extra: &str) -> World {
        let dir = std::env::temp_dir().join(format!(
            "cutover-git-it-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::create_dir_all(dir.join("host/srv/site")).unwrap();
        git_at(
            &dir,
            &["init", "-q", "--bare", "-b", "main", "origin.git"],
            None,
        );
        git_at(&dir.join("work"), &["init", "-q", "-b", "main"], None);
        git_at(
            &dir.join("work"),
            &[
                "remote",
                "add",
                "origin",
                dir.join("origin.git").to_str().unwrap(),
            ],
            None,
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = dir.join("host/srv/site");
        std::thread::spawn(move || serve(listener, root));
        let w = World {
            config: dir.join("cutover.toml"),
            dir,
            port,
            clock: Cell::new(COMMIT_TIME),
        };
        let repo = w.dir.join("origin.git").display().to_string();
        w.write_config(&repo, build_extra, "");
        w
    }

    fn write_config(&self, repo: &str, build_extra: &str, ssh: &str) {
        let text = format!(
            r#"app = "site"
hosts = ["local"]
{ssh}
[files]
root = {root:?}

[health]
url = "http://127.0.0.1:{port}/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "3s"

[build]
repo = {repo:?}
{build_extra}
"#,
            root = self.root(),
            port = self.port,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn root(&self) -> PathBuf {
        self.dir.join("host/srv/site")
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn git(&self, args: &[&str]) -> String {
        let t = self.clock.get() + 60;
        self.clock.set(t);
        git_at(&self.work(), args, Some(t))
    }

    /// Commits a site whose pages say `page` (plus `extra` files), returns the full SHA.
    fn commit_site(&self, page: &str, subject: &str, extra: &[(&str, &str)]) -> String {
        let w = self.work();
        std::fs::write(w.join("index.html"), format!("{page}\n")).unwrap();
        std::fs::write(w.join("up"), "ok\n").unwrap();
        for (name, content) in extra {
            let p = w.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", subject]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn push(&self) {
        self.git(&["push", "-q", "--force", "--tags", "origin", "main"]);
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cutover"));
        c.args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"));
        c.env_remove("CUTOVER_CRASH_AT");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        eprintln!(
            "$ cutover {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn json(&self, args: &[&str]) -> (i32, Value, String) {
        let out = self.run(args);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn deploy_ref(&self, r: &str) -> (i32, Value, String) {
        self.json(&["deploy", "--json", "--ref", r])
    }

    fn deploy_ref_ok(&self, r: &str) -> Value {
        let (code, v, err) = self.deploy_ref(r);
        assert_eq!(code, 0, "deploy --ref {r}: {v} {err}");
        v
    }

    fn history(&self) -> Vec<Value> {
        let (code, v, _) = self.json(&["history", "--json"]);
        assert_eq!(code, 0);
        v.as_array().unwrap().clone()
    }

    fn served(&self) -> String {
        fetch(self.port, "/").trim().to_string()
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.join("data/cutover.db")).unwrap()
    }

    /// (step, phase, detail) of every event of the newest run.
    fn last_run_events(&self) -> Vec<(String, String, String)> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT step, phase, detail FROM events WHERE run_id = (SELECT MAX(id) FROM runs) ORDER BY seq")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// GET `path` from the local static server: the body on 200, else `HTTP <status line>`.
fn fetch(port: u16, path: &str) -> String {
    let go = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )?;
        let mut b = String::new();
        s.read_to_string(&mut b)?;
        let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Ok(format!("HTTP {}", head.lines().next().unwrap_or("")));
        }
        Ok(body.to_string())
    };
    go().unwrap_or_else(|e| format!("ERROR {e}"))
}

/// A tiny static server for `<root>/current` (as in `cutover demo`).
fn serve(listener: TcpListener, root: PathBuf) {
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = answer(stream, &root);
        });
    }
}

fn answer(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let safe = Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    let (status, body) = match (safe, std::fs::read(root.join("current").join(rel))) {
        (true, Ok(b)) => ("200 OK", b),
        _ => ("404 Not Found", b"not found\n".to_vec()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)
}

fn short(sha: &str) -> &str {
    &sha[..7]
}

#[test]
fn branches_tags_and_short_shas_resolve_to_full_commits() {
    let w = World::new(
        "command = \"mkdir -p out && cp index.html up out/ && echo built $CUTOVER_COMMIT\"\noutput = \"out\"",
    );
    let c1 = w.commit_site("v1", "First page", &[]);
    w.git(&["tag", "-a", "v1.0", "-m", "release 1.0"]);
    let c2 = w.commit_site("v2", "Second page", &[]);
    w.push();

    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    assert_eq!(v["commit_subject"], "Second page");
    assert_eq!(w.served(), "v2");
    let meta: Value = serde_json::from_slice(
        &std::fs::read(w.root().join("current/.cutover-release.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["commit"], c2.as_str(), "the host records the full SHA");

    let v = w.deploy_ref_ok("v1.0");
    assert_eq!(
        v["commit"],
        c1.as_str(),
        "annotated tags peel to their commit"
    );
    assert_eq!(w.served(), "v1");
    assert_eq!(w.deploy_ref_ok(short(&c2))["commit"], c2.as_str());
    assert_eq!(w.deploy_ref_ok("HEAD~1")["commit"], c1.as_str());
    assert_eq!(w.deploy_ref_ok("origin/main")["commit"], c2.as_str());
    assert_eq!(w.deploy_ref_ok(&c1)["commit"], c1.as_str());

    // The build's output was shown live (human mode) and recorded as events.
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("built {c2}")), "{err}");
    assert!(
        err.contains(&format!("commit {} Second page", short(&c2))),
        "{err}"
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
    let out = w.run(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
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
    let (code, s, _) = w.json(&["status", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(s["hosts"][0]["commit"], c2.as_str());
    assert_eq!(s["live_commit_subject"], "Second page");
    let out = w.run(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{} Second page", short(&c2))));

    // `--artifact` still works with [build] present.
    let art = w.dir.join("plain");
    std::fs::create_dir_all(&art).unwrap();
    std::fs::write(art.join("index.html"), "plain\n").unwrap();
    std::fs::write(art.join("up"), "ok\n").unwrap();
    let (code, v, _) = w.json(&["deploy", "--json", "--artifact", art.to_str().unwrap()]);
    assert_eq!(code, 0, "{v}");
    assert!(v.get("commit").is_none());
    assert_eq!(w.served(), "plain");
}

#[test]
fn a_branch_that_moves_and_a_force_push_are_followed() {
    let w = World::new("");
    let c1 = w.commit_site("v1", "one", &[]);
    let c2 = w.commit_site("v2", "two", &[]);
    w.push();
    assert_eq!(w.deploy_ref_ok("main")["commit"], c2.as_str());
    let r2 = w.history()[0]["id"].as_str().unwrap().to_string();

    let c3 = w.commit_site("v3", "three", &[]);
    w.push();
    assert_eq!(
        w.deploy_ref_ok("main")["commit"],
        c3.as_str(),
        "the branch moved"
    );
    assert_eq!(w.served(), "v3");

    // Rewrite history: main now forks from c1.
    w.git(&["reset", "-q", "--hard", &c1]);
    let c4 = w.commit_site("v4", "four (rewritten)", &[]);
    w.push();
    assert_eq!(
        w.deploy_ref_ok("main")["commit"],
        c4.as_str(),
        "a force-pushed branch is followed"
    );
    assert_eq!(w.served(), "v4");
    let r4 = w.history()[0]["id"].as_str().unwrap().to_string();

    // The diff across the force-push: c4 is new, c2 and c3 go away.
    let (code, d, _) = w.json(&["diff", "--json"]);
    assert_eq!(code, 0, "{d}");
    assert_eq!(d["from"]["commit"], c3.as_str());
    assert_eq!(d["to"]["commit"], c4.as_str());
    let shas = |k: &str| -> Vec<String> {
        d[k].as_array()
            .unwrap()
            .iter()
            .map(|c| c["commit"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(shas("commits"), std::slice::from_ref(&c4));
    assert_eq!(shas("reverted"), [c3.clone(), c2.clone()]);

    // Commits force-pushed away stay readable from the mirror.
    let (code, d, _) = w.json(&["diff", "--json", &r2, &r4]);
    assert_eq!(code, 0, "{d}");
    assert_eq!(d["from"]["commit"], c2.as_str());
    // A deleted tag or branch is pruned from the mirror.
    w.git(&["tag", "gone"]);
    w.push();
    w.deploy_ref_ok("gone");
    w.git(&["push", "-q", "origin", ":refs/tags/gone"]);
    let (code, v, _) = w.deploy_ref("gone");
    assert_eq!(code, 2, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("matches no commit"),
        "{v}"
    );
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
    let w = World::new("");
    w.commit_site("v1", "one", &[]);
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
    let sha = w.commit_site("v2", "two", &[("a.txt", a.as_str()), ("b.txt", b.as_str())]);
    w.push();
    let prefix = &id_a[..4];

    let (code, v, err) = w.deploy_ref(prefix);
    assert_eq!(code, 2, "{v} {err}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("ambiguous"), "{msg}");
    assert!(
        msg.contains(&id_a) && msg.contains(&id_b),
        "lists both: {msg}"
    );
    assert!(!w.root().join("current").exists(), "nothing was deployed");
    assert!(w.history().is_empty());

    let unknown = if sha.starts_with("abcdef1") {
        "abcdef2"
    } else {
        "abcdef1"
    };
    let (code, v, _) = w.deploy_ref(unknown);
    assert_eq!(code, 2, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(unknown) && msg.contains("matches no commit"),
        "{msg}"
    );
    let (code, v, _) = w.deploy_ref("no-such-branch");
    assert_eq!(code, 2, "{v}");
    let (code, v, _) = w.deploy_ref("main:a.txt");
    assert_eq!(code, 2, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not a commit"),
        "{v}"
    );
}

#[test]
fn a_failed_build_is_exit_1_and_connects_to_no_host() {
    let w = World::new("");
    // A host that cannot be reached: a failed build must not even try.
    let repo = w.dir.join("origin.git").display().to_string();
    w.write_config(
        &repo,
        "command = \"echo compiling the app; echo 'error: it broke' >&2; exit 3\"",
        "",
    );
    let text = std::fs::read_to_string(&w.config)
        .unwrap()
        .replace("hosts = [\"local\"]", "hosts = [\"root@127.0.0.1:1\"]");
    std::fs::write(&w.config, text).unwrap();
    w.commit_site("v1", "one", &[]);
    w.push();
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
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
    let w = World::new("");
    let pidfile = w.dir.join("sleeper.pid");
    let repo = w.dir.join("origin.git").display().to_string();
    w.write_config(
        &repo,
        &format!(
            "command = \"sleep 300 & echo $! > {}; echo waiting; wait\"\ntimeout = \"1s\"",
            pidfile.display()
        ),
        "",
    );
    w.commit_site("v1", "one", &[]);
    w.push();
    let start = Instant::now();
    let (code, v, _) = w.deploy_ref("main");
    assert_eq!(code, 1, "{v}");
    assert!(start.elapsed() < Duration::from_secs(20));
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("timed out") && msg.contains("timeout"),
        "{msg}"
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the build's background sleep survived: {stat}"
    );
    assert!(!w.root().join("current").exists());
}

#[test]
fn builds_see_a_clean_environment() {
    let w = World::new("");
    let repo = w.dir.join("origin.git").display().to_string();
    w.write_config(
        &repo,
        "command = \"mkdir out && cp index.html up out/ && env | sort > out/env.txt\"\noutput = \"out\"\nenv = { APP_MODE = \"production\" }\npass_env = [\"CUTOVER_IT_PASSED\"]",
        "",
    );
    let sha = w.commit_site("v1", "one", &[]);
    w.push();
    let out = w
        .cmd(&["deploy", "--json", "--ref", "main"])
        .env("CUTOVER_IT_PASSED", "yes")
        .env("CUTOVER_IT_LEAKED", "no")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let env = fetch(w.port, "/env.txt");
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
    let w = World::new("");
    let counter = w.dir.join("builds.count");
    let repo = w.dir.join("origin.git").display().to_string();
    let build = |cache: bool| {
        format!(
            "command = \"echo build >> {}; mkdir out && cp index.html up out/\"\noutput = \"out\"\ncache = {cache}",
            counter.display()
        )
    };
    let count = || {
        std::fs::read_to_string(&counter)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    w.write_config(&repo, &build(true), "");
    let c1 = w.commit_site("v1", "one", &[]);
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
    w.write_config(
        &repo,
        &format!("{}\nenv = {{ X = \"1\" }}", build(true)),
        "",
    );
    w.deploy_ref_ok("main");
    assert_eq!(count(), 2);
    // Without `cache = true`, every deploy builds.
    w.write_config(&repo, &build(false), "");
    w.deploy_ref_ok("main");
    assert_eq!(count(), 3);

    let c2 = w.commit_site("v2", "two", &[]);
    w.push();
    assert_eq!(w.deploy_ref_ok("main")["commit"], c2.as_str());
    assert_eq!(count(), 4);
    assert_eq!(w.served(), "v2");

    // Rollback: the older release's stored artifact is re-shipped (its directory is gone
    // from the host, so it must be uploaded), nothing is fetched or built.
    let older = w.history()[1]["id"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(w.root().join("releases").join(&older)).unwrap();
    let (code, v, _) = w.json(&["rollback", "--json"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["release"], older.as_str());
    assert!(
        v["hosts"]["local"]["uploaded_bytes"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert_eq!(count(), 4, "rollback did not rebuild");
    let steps: Vec<String> = w.last_run_events().into_iter().map(|e| e.0).collect();
    assert!(
        !steps
            .iter()
            .any(|s| s == "build" || s == "fetch" || s == "export"),
        "{steps:?}"
    );
    assert_eq!(w.served(), "v1");
}

#[test]
fn diff_across_ten_commits() {
    let w = World::new("");
    let c0 = w.commit_site(
        "v0",
        "Start",
        &[("docs/readme.md", "hello\n"), ("old.txt", "x")],
    );
    w.push();
    w.deploy_ref_ok("main");
    let mut made = Vec::new();
    for k in 1..=10 {
        let name = format!("src/file{k}.txt");
        made.push(w.commit_site(
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

    let (code, d, _) = w.json(&["diff", "--json"]);
    assert_eq!(code, 0, "{d}");
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

    let out = w.run(&["diff"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
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
    let w = World::new("");
    let c1 = w.commit_site("v1", "one", &[]);
    let c2 = w.commit_site("v2", "two", &[]);
    let c3 = w.commit_site("v3", "three", &[]);
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

    let (code, d, _) = w.json(&["diff", "--json"]);
    assert_eq!(code, 0, "{d}");
    let shas: Vec<&str> = d["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["commit"].as_str().unwrap())
        .collect();
    assert_eq!(shas, [c3.as_str(), c2.as_str()]);

    // Releases named by their last 7+ characters... and the other way round.
    let tail = |id: &str| id[id.len() - 9..].to_string();
    let (code, d, _) = w.json(&["diff", "--json", &tail(&r3), &tail(&r1)]);
    assert_eq!(code, 0, "{d}");
    assert!(d["commits"].as_array().unwrap().is_empty());
    assert_eq!(d["reverted"].as_array().unwrap().len(), 2);

    // A record that holds only an abbreviation (as an older tool might have written) is
    // resolved before use, with a fresh mirror too.
    w.db()
        .execute(
            "UPDATE releases SET commit_sha = ?1 WHERE id = ?2",
            [short(&c1), r1.as_str()],
        )
        .unwrap();
    std::fs::remove_dir_all(w.dir.join("data/git")).unwrap();
    let (code, d, _) = w.json(&["diff", "--json", &r1, &r3]);
    assert_eq!(code, 0, "{d}");
    assert_eq!(d["from"]["commit"], c1.as_str());
    assert_eq!(d["commits"].as_array().unwrap().len(), 2);

    // Bad names.
    let (code, _, err) = w.json(&["diff", "--json", "nonexistent-release"]);
    assert_eq!(code, 2, "{err}");

    // The same commit exports to the same bytes (files dated with the commit).
    let again = w.deploy_ref_ok(&c3);
    let h = w.history();
    assert_eq!(h[0]["id"], again["release"]);
    assert_eq!(h[0]["artifact_sha256"], h[1]["artifact_sha256"]);
}

#[test]
fn config_and_usage_errors_are_exit_2() {
    let w = World::new("");
    let repo = w.dir.join("origin.git").display().to_string();
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
        w.write_config(repo, extra, "");
        let out = w.run(&["deploy", "--ref", "main"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("cutover.toml"),
            "{err}"
        );
    }
    // No [build]: --ref is refused, --artifact still works.
    let text = std::fs::read_to_string(&w.config).unwrap();
    let without = text.split("[build]").next().unwrap().to_string();
    std::fs::write(&w.config, without).unwrap();
    let out = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[build]"));
    let out = w.run(&["diff"]);
    assert_eq!(out.status.code(), Some(2));
    let out = w.run(&["deploy", "--ref", "main", "--artifact", "/tmp"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--ref and --artifact exclude each other"
    );
}

#[test]
fn a_repository_over_ssh_through_a_test_host() {
    let lab = Lab::start(1);
    let w = World::new("");
    let c1 = w.commit_site("v1", "over ssh", &[]);
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
    let ssh = format!(
        "[ssh]\nknown_hosts = {:?}\nidentity = {:?}\nconnect_timeout = \"5s\"\n",
        lab.known_hosts(),
        lab.identity()
    );
    w.write_config(&url, "", &ssh);
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c1.as_str());
    assert_eq!(w.served(), "v1");

    // A new commit pushed to the host's repository is fetched incrementally.
    let c2 = w.commit_site("v2", "second over ssh", &[]);
    w.git(&["push", "-q", bare.to_str().unwrap(), "main"]);
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    assert!(w
        .last_run_events()
        .iter()
        .any(|(s, p, _)| s == "fetch" && p == "done"));
    let (code, d, _) = w.json(&["diff", "--json"]);
    assert_eq!(code, 0, "{d}");
    assert_eq!(d["commits"][0]["commit"], c2.as_str());
    let out = w.run(&["check"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("build repo ssh://"));

    // Host keys are checked strictly: an unknown host key fails the fetch (exit 1).
    let empty = w.dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let ssh = format!(
        "[ssh]\nknown_hosts = {:?}\nidentity = {:?}\nconnect_timeout = \"5s\"\n",
        empty,
        lab.identity()
    );
    w.write_config(&url, "", &ssh);
    let (code, v, _) = w.deploy_ref("main");
    assert_eq!(code, 1, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("cannot fetch"),
        "{v}"
    );
    assert_eq!(w.served(), "v2");
    let out = w.run(&["check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check fetches the repository too"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("problem: build repo"));
}

#[test]
fn a_fetch_from_a_server_that_stalls_gives_up_at_the_build_timeout() {
    let w = World::new("");
    // An https "server" that accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    w.write_config(
        &format!("https://127.0.0.1:{port}/app.git"),
        "timeout = \"2s\"",
        "",
    );
    let started = Instant::now();
    let out = w.run(&["deploy", "--ref", "main"]);
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stalled fetch is a failed run"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not finish within [build] timeout"),
        "{err}"
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

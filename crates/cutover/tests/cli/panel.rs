//! The web panel of `cutover serve`: a real server on loopback, a real chromium over WebDriver
//! (testlab's [`Browser`]), real test hosts with releases built from git, and steady load on
//! them while the panel rolls back. Plus what the pages refuse (raw HTTP, no browser needed)
//! and `cutover demo --panel`.
//!
//! Set `CUTOVER_PANEL_SCREENSHOTS=DIR` to have the browser test write `panel-app.png` and
//! `panel-run.png` there (the ones in `docs/` were made so).

use crate::serve::{add_user, log_in, Server};
use crate::world::{unique_temp_dir, World};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testlab::Browser;

const SCRIPT: &str = "<script>alert(1)</script>";
const IMG: &str = "\"><img src=x onerror=alert(1)>";

/// A files app on `hosts` lab hosts whose releases are built from git: each commit's pages
/// say its name.
fn git_world(hosts: usize) -> World {
    World::files(hosts)
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up version out/\"\noutput = \"out\"",
        )
        .start()
}

fn commit_page(w: &World, page: &str, subject: &str) -> String {
    let index = format!("{page}\n");
    w.commit(
        subject,
        &[("index.html", &index), ("up", "ok\n"), ("version", page)],
    )
}

fn release_of(v: &serde_json::Value) -> String {
    v["release"].as_str().expect("a release").to_string()
}

#[test]
fn a_browser_rolls_back_from_the_panel_under_load_and_hostile_subjects_stay_text() {
    let w = git_world(2);
    commit_page(&w, "v1", "First page");
    w.push();
    w.deploy_ref_ok("main");
    let c2 = commit_page(&w, "v2", SCRIPT);
    w.push();
    let v2 = release_of(&w.deploy_ref_ok("main"));
    commit_page(&w, "v3", IMG);
    w.push();
    let v3 = release_of(&w.deploy_ref_ok("main"));
    w.assert_all_serve("v3");
    add_user(&w, "admin", "admin", "correct horse battery");
    let s = Server::start(&w);
    let load = w.load(None);

    let b = Browser::start(1100, 900);
    b.goto(&s.url("/apps/site"));
    assert!(b.url().contains("/login?next=/apps/site"), "{}", b.url());
    log_in(&b, &s, "admin", "correct horse battery");
    assert_eq!(b.url(), s.url("/apps/site"));

    // The live release on every host, and the history with its subjects as text.
    assert_eq!(b.text("#live"), v3);
    assert_eq!(
        b.texts("#hosts tr[data-host] td.release code"),
        vec![v3.clone(), v3.clone()]
    );
    let subjects = b.texts("#history .subject");
    assert_eq!(subjects, vec![IMG, SCRIPT, "First page"]);
    let v2_row = format!("#history tr[data-release='{v2}'] code.sha");
    assert_eq!(b.text(&v2_row), &c2[..7]);
    assert_eq!(b.attr(&v2_row, "title").as_deref(), Some(c2.as_str()));
    assert_eq!(
        b.js("return document.querySelectorAll('main img, main script').length"),
        0
    );
    assert_eq!(b.dialog(), None, "hostile data opened a dialog");
    if let Some(dir) = std::env::var_os("CUTOVER_PANEL_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("panel-app.png"));
    }

    // Rollback, confirmed once, then the run page until the run ends.
    let clicked = Instant::now();
    b.click("#rollback");
    assert_eq!(
        b.dialog().as_deref(),
        Some("Roll back site to the previous good release?")
    );
    b.accept_dialog();
    b.wait_for("the run page", Duration::from_secs(10), || {
        b.url().contains("/runs/").then_some(())
    });
    let status = b.wait_for("the run to end", Duration::from_secs(90), || {
        let t = b.text("#run-status");
        (t != "running").then_some(t)
    });
    assert_eq!(status, "succeeded", "{}", s.log());
    eprintln!(
        "click to succeeded on the run page: {:?} (2 hosts, dev build)",
        clicked.elapsed()
    );
    assert_eq!(b.text("#subject"), SCRIPT);
    assert!(b.texts("#events li").len() > 2, "events were shown");
    assert_eq!(b.text("#release"), v2);
    assert_eq!(b.dialog(), None, "hostile data opened a dialog");
    if let Some(dir) = std::env::var_os("CUTOVER_PANEL_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("panel-run.png"));
    }

    // The previous release is live on every host, as the panel and the hosts say.
    b.goto(&s.url("/apps/site"));
    assert_eq!(b.text("#live"), v2);
    assert_eq!(
        b.texts("#hosts tr[data-host] td.release code"),
        vec![v2.clone(), v2.clone()]
    );
    w.assert_all_serve("v2");
    let (ka, fresh) = load.stop("panel rollback");
    ka.assert_no_failures();
    fresh.assert_no_failures();
    assert!(ka.ok > 0 && fresh.ok > 0);
    assert_eq!(b.dialog(), None);

    // The apps page says what every host serves; a host changed behind cutover's back is
    // drift, on the apps page and the app's page.
    b.goto(&s.url("/"));
    assert_eq!(b.text("#apps tr[data-app=site] td.live code"), v2);
    assert!(!b.exists("#apps .drift"));
    let tmp = w.site(1).join("current.tmp");
    std::os::unix::fs::symlink(format!("releases/{v3}"), &tmp).unwrap();
    std::fs::rename(&tmp, w.site(1).join("current")).unwrap();
    std::thread::sleep(Duration::from_millis(3100));
    b.goto(&s.url("/"));
    assert_eq!(b.text("#apps .drift"), "drift");
    b.goto(&s.url("/apps/site"));
    assert_eq!(
        b.texts("#hosts tr[data-host] td.release code"),
        vec![v2.clone(), v3.clone()]
    );
    assert!(b.exists("#drift li"), "the drift is spelled out");

    // At a phone's width every page fits: nothing but a table scrolls sideways.
    b.resize(375, 740);
    let run_page = format!(
        "/runs/{}",
        w.db()
            .query_row("SELECT MAX(id) FROM runs", [], |r| r.get::<_, i64>(0))
            .unwrap()
    );
    for path in [
        "/",
        "/apps/site",
        run_page.as_str(),
        "/users",
        "/tokens",
        "/audit",
    ] {
        b.goto(&s.url(path));
        assert_eq!(
            b.js("return document.documentElement.scrollWidth"),
            375,
            "{path} is wider than a phone"
        );
    }
    b.goto(&s.url("/apps/site"));
    assert_eq!(b.text("#rollback"), "Rollback");
}

// ---- the pages over raw HTTP ----

/// One HTTP/1.1 request: (status, headers lower-cased, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    let body = form.unwrap_or("");
    if form.is_some() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    let _ = r.read_to_end(&mut body);
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Logs in through the form; the session cookie (`name=value`).
fn session(addr: SocketAddr, user: &str, password: &str) -> String {
    let (status, h, body) = http(
        addr,
        "POST",
        "/login",
        None,
        Some(&format!("user={user}&password={password}&next=/")),
    );
    assert_eq!(status, 303, "{body}");
    let c = header(&h, "set-cookie").expect("a session cookie");
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict"),
        "{c}"
    );
    c.split(';').next().unwrap().to_string()
}

/// The CSRF field of a page.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..].split('"').next().unwrap().to_string()
}

#[test]
fn pages_need_a_login_and_a_viewer_cannot_roll_back() {
    let w = World::local().start();
    w.deploy_ok("v1");
    w.deploy_ok("v2");
    add_user(&w, "ada", "admin", "admin password 1");
    add_user(&w, "val", "viewer", "viewer password 1");
    let s = Server::start(&w);

    for path in ["/", "/apps/site", "/runs/1", "/users", "/audit"] {
        let (status, h, _) = http(s.addr, "GET", path, None, None);
        assert_eq!(status, 303, "{path}");
        assert_eq!(
            header(&h, "location"),
            Some(format!("/login?next={path}").as_str())
        );
    }
    let (status, _, body) = http(s.addr, "POST", "/apps/site/rollback", None, Some(""));
    assert_eq!(status, 303, "{body}");

    // The same words for an unknown user and a wrong password.
    for form in ["user=nobody&password=x", "user=ada&password=wrong"] {
        let (status, _, body) = http(s.addr, "POST", "/login", None, Some(form));
        assert_eq!(status, 401);
        assert!(body.contains("Wrong user name or password."), "{body}");
    }

    let before = w.count("SELECT COUNT(*) FROM runs");
    let viewer = session(s.addr, "val", "viewer+password+1");
    let (status, _, page) = http(s.addr, "GET", "/apps/site", Some(&viewer), None);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"history\""), "{page}");
    assert!(
        !page.contains("id=\"rollback\""),
        "a viewer sees no Rollback button"
    );
    let token = csrf(&page);
    let form = format!("csrf={token}&confirmed=1");
    let (status, _, body) = http(
        s.addr,
        "POST",
        "/apps/site/rollback",
        Some(&viewer),
        Some(&form),
    );
    assert_eq!(status, 403);
    assert!(
        body.contains("val is a viewer: only a deployer may deploy or roll back"),
        "{body}"
    );
    let (status, _, _) = http(s.addr, "GET", "/users", Some(&viewer), None);
    assert_eq!(status, 403);

    // An admin without the CSRF token is refused too; without JS it is asked once.
    let admin = session(s.addr, "ada", "admin+password+1");
    let (status, _, page) = http(s.addr, "GET", "/apps/site", Some(&admin), None);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"rollback\""));
    let (status, _, body) = http(
        s.addr,
        "POST",
        "/apps/site/rollback",
        Some(&admin),
        Some("confirmed=1"),
    );
    assert_eq!(status, 403);
    assert!(body.contains("missing or wrong CSRF token"), "{body}");
    let form = format!("csrf={}", csrf(&page));
    let (status, _, body) = http(
        s.addr,
        "POST",
        "/apps/site/rollback",
        Some(&admin),
        Some(&form),
    );
    assert_eq!(status, 200);
    assert!(
        body.contains("Roll back site to the previous good release?"),
        "{body}"
    );
    assert_eq!(
        w.count("SELECT COUNT(*) FROM runs"),
        before,
        "no refusal or question started a run"
    );
    assert_eq!(w.served(0), "v2");
}

#[test]
fn demo_panel_prints_a_login_and_serves_its_panel() {
    let dir = unique_temp_dir("cutover-demo-panel");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["demo", "--panel"])
        .env("TMPDIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut url, mut user, mut password) = (None, None, None);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while url.is_none() || password.is_none() {
        assert!(Instant::now() < deadline, "no login printed: {seen}");
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("demo --panel ended early: {seen}");
        }
        seen.push_str(&line);
        let l = line.trim();
        if let Some(u) = l.strip_prefix("panel: ") {
            url = Some(u.to_string());
        } else if let Some(u) = l.strip_prefix("user: ") {
            user = Some(u.to_string());
        } else if let Some(p) = l.strip_prefix("password: ") {
            password = Some(p.to_string());
        }
    }
    let url = url.unwrap();
    assert_eq!(user.as_deref(), Some("demo"), "{seen}");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let cookie = session(addr, "demo", &password.unwrap());
    let (status, _, page) = http(addr, "GET", "/apps/demo", Some(&cookie), None);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"history\""), "{page}");
    assert_eq!(page.matches("data-release=").count(), 3, "{page}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// GETs `path` until `done` says so (20 s at most).
fn poll(addr: SocketAddr, path: &str, cookie: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, body) = http(addr, "GET", path, Some(cookie), None);
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_admin_diffs_redeploys_an_old_release_and_manages_users_and_tokens() {
    let w = World::local()
        .git()
        .lines(
            "build",
            "command = \"mkdir -p out && cp index.html up out/\"\noutput = \"out\"",
        )
        .start();
    w.commit("First page", &[("index.html", "v1\n"), ("up", "ok\n")]);
    w.push();
    let v1 = release_of(&w.deploy_ref_ok("main"));
    w.commit(
        SCRIPT,
        &[("index.html", "v2\n"), ("up", "ok\n"), ("new.txt", "x")],
    );
    w.push();
    let v2 = release_of(&w.deploy_ref_ok("main"));
    add_user(&w, "ada", "admin", "admin password 1");
    let s = Server::start(&w);
    let admin = session(s.addr, "ada", "admin+password+1");

    // The diff between the two releases: the commit and the files, as text.
    let (status, _, page) = http(
        s.addr,
        "GET",
        &format!("/apps/site/diff?from={v1}&to={v2}"),
        Some(&admin),
        None,
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains(SCRIPT), "{page}");
    assert!(page.contains("<code>new.txt</code>"), "{page}");

    // "deploy this release" on v1, confirmed (as the script does), runs and ends succeeded.
    let (_, _, page) = http(s.addr, "GET", "/apps/site", Some(&admin), None);
    assert_eq!(page.matches("deploy this release").count(), 1, "{page}");
    let form = format!("csrf={}&release={v1}&confirmed=1", csrf(&page));
    let (status, h, body) = http(
        s.addr,
        "POST",
        "/apps/site/deploy",
        Some(&admin),
        Some(&form),
    );
    assert_eq!(status, 303, "{body}");
    let run_page = header(&h, "location").unwrap().to_string();
    assert!(run_page.starts_with("/runs/"), "{run_page}");
    let api = format!("/api{run_page}");
    let run = poll(s.addr, &api, &admin, |b| !b.contains("\"running\""));
    assert!(run.contains("\"status\":\"succeeded\""), "{run}");
    assert_eq!(w.served(0), "v1");
    // A deploy, not a rollback: the release it replaced is not marked bad.
    assert!(run.contains("\"kind\":\"deploy\""), "{run}");
    let bad: i64 = w
        .db()
        .query_row("SELECT COUNT(*) FROM releases WHERE bad = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        bad, 0,
        "deploying an earlier release again marks nothing bad"
    );

    // A user added with a generated password, shown once, who can log in with it.
    let (_, _, page) = http(s.addr, "GET", "/users", Some(&admin), None);
    let form = format!("csrf={}&name=bob&role=deployer&password=", csrf(&page));
    let (status, _, page) = http(s.addr, "POST", "/users", Some(&admin), Some(&form));
    assert_eq!(status, 200, "{page}");
    let at = page
        .find("<div class=\"secret\">")
        .expect("the password, once")
        + 20;
    let password = page[at..].split('<').next().unwrap().to_string();
    let bob = session(s.addr, "bob", &password);
    let (status, _, page) = http(s.addr, "GET", "/apps/site", Some(&bob), None);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"rollback\""), "a deployer may roll back");
    let (status, _, _) = http(s.addr, "GET", "/tokens", Some(&bob), None);
    assert_eq!(status, 403);

    // A token, shown once: the list never shows it again, and it works until revoked.
    let (_, _, page) = http(s.addr, "GET", "/tokens", Some(&admin), None);
    let form = format!("csrf={}&name=ci&role=viewer&apps=site&days=30", csrf(&page));
    let (status, _, page) = http(s.addr, "POST", "/tokens", Some(&admin), Some(&form));
    assert_eq!(status, 200, "{page}");
    let at = page
        .find("<div class=\"secret\">")
        .expect("the token, once")
        + 20;
    let token = page[at..].split('<').next().unwrap().to_string();
    assert!(token.starts_with("cutover_"), "{token}");
    let (_, _, list) = http(s.addr, "GET", "/tokens", Some(&admin), None);
    assert!(list.contains("data-token=\"ci\""), "{list}");
    assert!(!list.contains(&token), "the token is shown only once");
    let form = format!("csrf={}", csrf(&list));
    let (status, _, _) = http(
        s.addr,
        "POST",
        "/tokens/ci/revoke",
        Some(&admin),
        Some(&form),
    );
    assert_eq!(status, 303);
    let (_, _, audit) = http(s.addr, "GET", "/audit", Some(&admin), None);
    for action in [
        "user add",
        "token create",
        "token revoke",
        "deploy",
        "login",
    ] {
        assert!(
            audit.contains(&format!("<td class=\"action\">{action}</td>")),
            "{action}: {audit}"
        );
    }
}

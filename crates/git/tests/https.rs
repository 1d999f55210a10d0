//! `https://` repositories against a real server: nginx with TLS and Basic auth in front of
//! `git http-backend` (see support/https_server.rs). Each test uses its own variable names,
//! so tests running as threads of one process do not see each other's tokens.

#[path = "support/https_server.rs"]
mod https_server;

use cutover_git::{GitError, HttpsOptions, Mirror, RepoUrl};
use https_server::HttpsGit;
use std::path::PathBuf;

fn mirror(server: &HttpsGit, url: &str, opts: HttpsOptions) -> Mirror {
    let url = RepoUrl::parse(url).unwrap();
    let path = server
        .dir
        .join(format!("mirror-{}.git", opts.token_env.to_lowercase()));
    Mirror::open(&path, url, None).unwrap().with_https(opts)
}

fn opts(var: &str, ca: Option<PathBuf>) -> HttpsOptions {
    HttpsOptions {
        token_env: var.into(),
        ca_file: ca,
        ..HttpsOptions::default()
    }
}

fn fetch_err(m: &mut Mirror) -> String {
    let e: GitError = m.fetch().expect_err("the fetch must fail");
    eprintln!("{e}");
    e.to_string()
}

#[test]
fn token_clones_then_fetches_incrementally() {
    let token = "tok-right-5f2a9c";
    let s = HttpsGit::start("fetch", token);
    let c1 = s.commit("app", "index.html", "one", "first");
    std::env::set_var("CUTOVER_T_FETCH", token);
    let mut m = mirror(
        &s,
        &s.private_url("app"),
        opts("CUTOVER_T_FETCH", Some(s.ca())),
    );

    let first = m.fetch().unwrap();
    assert!(first.received_pack);
    assert_eq!(m.resolve("main").unwrap().sha, c1);
    assert_eq!(m.resolve("HEAD").unwrap().sha, c1);

    let c2 = s.commit("app", "index.html", "two", "second");
    let second = m.fetch().unwrap();
    assert!(second.received_pack, "the new commit must arrive");
    let info = m.resolve("main").unwrap();
    assert_eq!(info.sha, c2);
    assert_eq!(info.subject, "second");
    assert_eq!(m.resolve("main~1").unwrap().sha, c1);

    let third = m.fetch().unwrap();
    assert!(!third.received_pack, "nothing new on the third fetch");
    assert_eq!(m.resolve("main").unwrap().sha, c2);

    // The server saw the token's user (so Basic auth was used), and the token is not in the
    // mirror's config or anything printed about the mirror.
    assert!(
        s.access_log().contains(https_server::USER),
        "{}",
        s.access_log()
    );
    let config = std::fs::read_to_string(m.path().join("config")).unwrap();
    assert!(!config.contains(token), "{config}");
    assert!(!format!("{m:?}").contains(token));
}

#[test]
fn public_repository_needs_no_token() {
    let s = HttpsGit::start("public", "unused-token");
    let c1 = s.commit("site", "a.txt", "a", "only");
    std::env::remove_var("CUTOVER_T_PUBLIC");
    let mut m = mirror(
        &s,
        &s.public_url("site"),
        opts("CUTOVER_T_PUBLIC", Some(s.ca())),
    );
    m.fetch().unwrap();
    assert_eq!(m.resolve("main").unwrap().sha, c1);
}

#[test]
fn missing_variable_is_named() {
    let s = HttpsGit::start("missing", "tok-missing");
    s.commit("app", "a.txt", "a", "only");
    std::env::remove_var("CUTOVER_T_MISSING");
    let mut m = mirror(
        &s,
        &s.private_url("app"),
        opts("CUTOVER_T_MISSING", Some(s.ca())),
    );
    let e = fetch_err(&mut m);
    assert!(e.contains("CUTOVER_T_MISSING"), "{e}");
    assert!(e.contains("not set"), "{e}");
    assert!(e.contains("401"), "{e}");
    assert!(
        e.contains(&s.private_url("app")),
        "the message names the repository: {e}"
    );

    // An empty variable is as good as none.
    std::env::set_var("CUTOVER_T_MISSING", "  ");
    let e = fetch_err(&mut m);
    assert!(
        e.contains("CUTOVER_T_MISSING") && e.contains("not set"),
        "{e}"
    );
}

#[test]
fn wrong_token_is_refused_without_showing_it() {
    let wrong = "tok-WRONG-8e1d77";
    let s = HttpsGit::start("wrong", "tok-right-0b3c");
    s.commit("app", "a.txt", "a", "only");
    std::env::set_var("CUTOVER_T_WRONG", wrong);
    let mut m = mirror(
        &s,
        &s.private_url("app"),
        opts("CUTOVER_T_WRONG", Some(s.ca())),
    );
    let err = m.fetch().expect_err("a wrong token must fail");
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    eprintln!("{shown}");
    assert!(
        shown.contains("refused the token in CUTOVER_T_WRONG"),
        "{shown}"
    );
    assert!(shown.contains("401"), "{shown}");
    assert!(!shown.contains(wrong), "{shown}");
    assert!(!debug.contains(wrong), "{debug}");
    assert!(!format!("{m:?}").contains(wrong));
    assert!(m.resolve("main").is_err(), "nothing was fetched");
}

#[test]
fn tls_failures_say_what_is_wrong() {
    let token = "tok-tls-71aa";
    let s = HttpsGit::start("tls", token);
    s.commit("app", "a.txt", "a", "only");
    std::env::set_var("CUTOVER_T_TLS", token);

    // The system roots do not know the test CA.
    let mut m = mirror(&s, &s.private_url("app"), opts("CUTOVER_T_TLS", None));
    let e = fetch_err(&mut m);
    assert!(e.contains("certificate is not trusted"), "{e}");
    assert!(e.contains("ca_file"), "{e}");

    // ca_file names a CA that did not sign the server's certificate: only it is trusted.
    let mut m = mirror(
        &s,
        &s.private_url("app"),
        opts("CUTOVER_T_TLS", Some(s.other_ca())),
    );
    let e = fetch_err(&mut m);
    assert!(e.contains("certificate is not trusted"), "{e}");
    assert!(e.contains("other-ca.crt"), "{e}");

    // The certificate is for `localhost`, not `127.0.0.1`.
    let url = format!("https://127.0.0.1:{}/private/app.git", s.port);
    let mut m = mirror(&s, &url, opts("CUTOVER_T_TLS", Some(s.ca())));
    let e = fetch_err(&mut m);
    assert!(e.contains("not valid for this host name"), "{e}");

    // A ca_file that is not PEM, and one that does not exist.
    let junk = s.dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let mut m = mirror(&s, &s.private_url("app"), opts("CUTOVER_T_TLS", Some(junk)));
    let e = fetch_err(&mut m);
    assert!(e.contains("ca_file") && e.contains("junk.pem"), "{e}");
    let mut m = mirror(
        &s,
        &s.private_url("app"),
        opts("CUTOVER_T_TLS", Some(s.dir.join("nope.pem"))),
    );
    let e = fetch_err(&mut m);
    assert!(
        e.contains("cannot read [build] ca_file") && e.contains("nope.pem"),
        "{e}"
    );

    // None of these requests got as far as sending the token.
    assert!(
        !s.access_log().contains(https_server::USER),
        "{}",
        s.access_log()
    );
}

#[test]
fn credentials_and_plain_http_in_urls_are_refused() {
    for url in [
        "https://x-access-token:hunter2@git.example.com/a/b.git",
        "https://hunter2@git.example.com/a/b.git",
    ] {
        let e = RepoUrl::parse(url).unwrap_err().to_string();
        assert!(e.contains("token_env"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    let e = RepoUrl::parse("http://git.example.com/a/b.git")
        .unwrap_err()
        .to_string();
    assert!(e.contains("https://"), "{e}");
}

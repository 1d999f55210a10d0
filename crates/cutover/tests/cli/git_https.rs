//! `deploy --ref` from an `https://` repository: a real HTTPS git server on loopback (nginx
//! with TLS and Basic auth in front of `git http-backend`, see
//! crates/git/tests/support/https_server.rs), the real `cutover` binary and a testlab host.
//! The token comes from the environment and must appear nowhere cutover writes or prints.
//! Needs root (testlab), nginx, fcgiwrap, openssl and git.

#[path = "../../../git/tests/support/https_server.rs"]
mod https_server;

use crate::world::{Run, World};
use https_server::HttpsGit;
use std::path::{Path, PathBuf};

const VAR: &str = "CUTOVER_E2E_GIT_TOKEN";
const TOKEN: &str = "tok-e2e-RIGHT-3c9f01";
const WRONG: &str = "tok-e2e-WRONG-77b2d4";

/// Runs `cutover ARGS` with `token` (or none) in the token variable and `env` (by default no
/// `SSL_CERT_FILE` or `SSL_CERT_DIR`), and asserts that neither token is in what it printed.
fn run(w: &World, token: Option<&str>, env: &[(&str, &Path)], args: &[&str]) -> Run {
    let mut c = w.cutover(args);
    for (k, v) in env {
        c = c.env(k, v);
    }
    if let Some(t) = token {
        c = c.env(VAR, t);
    }
    let r = c.run();
    for secret in [TOKEN, WRONG] {
        assert!(!r.stdout.contains(secret), "the token is in stdout");
        assert!(!r.stderr.contains(secret), "the token is in stderr");
    }
    r
}

fn deploy(w: &World, token: Option<&str>) -> Run {
    run(w, token, &[], &["deploy", "--json", "--ref", "main"])
}

/// Every file under `dir` (the data directory: history database, mirror, artifacts).
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn deploy_from_an_https_repository_with_a_token_from_the_environment() {
    let server = HttpsGit::start("e2e", TOKEN);
    let url = server.private_url("site");
    let ca_file = format!("{:?}", server.ca().display().to_string());
    let w = World::files(1)
        .set("ssh", "connect_timeout", "\"5s\"")
        .set("health", "give_up_after", "\"5s\"")
        .set("build", "repo", &format!("{url:?}"))
        .set("build", "token_env", &format!("{VAR:?}"))
        .set("build", "ca_file", &ca_file)
        .env_remove(VAR)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .start();
    server.commit("site", "up", "ok\n", "health");
    let c1 = server.commit("site", "index.html", "v1\n", "first over https");

    let r = deploy(&w, Some(TOKEN));
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(r.json["commit"], c1.as_str());
    assert_eq!(w.served(0), "v1");

    // A new commit arrives by an incremental fetch.
    let c2 = server.commit("site", "index.html", "v2\n", "second over https");
    let r = deploy(&w, Some(TOKEN));
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(r.json["commit"], c2.as_str());
    assert_eq!(w.served(0), "v2");
    let c = run(&w, Some(TOKEN), &[], &["check"]);
    assert_eq!(c.code, 0);
    assert!(c.stdout.contains("build repo https://"));

    // No token: the fetch fails (exit 1) naming the variable; nothing is deployed.
    let c3 = server.commit("site", "index.html", "v3\n", "third");
    deploy(&w, None).says(1, &[VAR, "not set"]);
    assert_eq!(w.served(0), "v2");

    // A wrong token: refused (401), the token is not shown.
    deploy(&w, Some(WRONG)).says(1, &["refused the token in", "401"]);
    assert_eq!(w.served(0), "v2");

    // The right one again: the third commit goes out.
    let r = deploy(&w, Some(TOKEN));
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(r.json["commit"], c3.as_str());

    // Without ca_file the system's roots are used, which do not know the test CA...
    w.configure(|t| {
        t.unset("build", "ca_file");
    });
    deploy(&w, Some(TOKEN)).says(1, &["certificate is not trusted", "ca_file"]);
    // ...unless SSL_CERT_FILE names it.
    let r = run(
        &w,
        Some(TOKEN),
        &[("SSL_CERT_FILE", &server.ca())],
        &["deploy", "--json", "--ref", "main"],
    );
    assert_eq!(r.code, 0);
    w.configure(|_| {});

    // Neither token was written anywhere in the data directory (history, events, mirror,
    // artifacts), nor in the config.
    let mut all = Vec::new();
    files(&w.dir.join("data"), &mut all);
    assert!(all.len() > 3, "{all:?}");
    for p in all.iter().chain([&w.config]) {
        let bytes = std::fs::read(p).unwrap_or_default();
        for secret in [TOKEN, WRONG] {
            assert!(!contains(&bytes, secret), "a token is in {}", p.display());
        }
    }

    // Credentials in the URL are a config error (exit 2) that does not repeat them.
    let with_creds = url.replace("https://", "https://x-access-token:hunter2@");
    w.configure(|t| {
        t.set_str("build", "repo", &with_creds);
    });
    let r = run(&w, Some(TOKEN), &[], &["deploy", "--ref", "main"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("build.token_env") && r.stderr.contains("cutover.toml"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
}

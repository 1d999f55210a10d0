//! `deploy --ref` from an `https://` repository: a real HTTPS git server on loopback (nginx
//! with TLS and Basic auth in front of `git http-backend`, see
//! crates/git/tests/support/https_server.rs), the real `cutover` binary and a testlab host.
//! The token comes from the environment and must appear nowhere cutover writes or prints.
//! Needs root (testlab), nginx, fcgiwrap, openssl and git.

#[path = "../../git/tests/support/https_server.rs"]
mod https_server;

use https_server::HttpsGit;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use testlab::Lab;

const VAR: &str = "CUTOVER_E2E_GIT_TOKEN";
const TOKEN: &str = "tok-e2e-RIGHT-3c9f01";
const WRONG: &str = "tok-e2e-WRONG-77b2d4";

struct World {
    lab: Lab,
    server: HttpsGit,
    dir: PathBuf,
    config: PathBuf,
}

impl World {
    fn write_config(&self, repo: &str, build_extra: &str) {
        let text = format!(
            r#"app = "site"
hosts = [{host:?}]

[ssh]
known_hosts = {kh:?}
identity = {id:?}
connect_timeout = "5s"

[files]
root = "/srv/site"

[health]
url = "http://127.0.0.1/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "5s"

[build]
repo = {repo:?}
token_env = "{VAR}"
{build_extra}
"#,
            host = self.lab.destination(0),
            kh = self.lab.known_hosts(),
            id = self.lab.identity(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Runs cutover with `token` (or none) in the token variable.
    fn run(&self, token: Option<&str>, args: &[&str]) -> Output {
        self.run_env(token, &[], args)
    }

    fn run_env(&self, token: Option<&str>, env: &[(&str, &Path)], args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cutover"));
        c.envs(env.iter().copied());
        c.args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"))
            .env_remove("CUTOVER_CRASH_AT")
            .env_remove(VAR);
        if env.is_empty() {
            c.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        }
        if let Some(t) = token {
            c.env(VAR, t);
        }
        let out = c.output().unwrap();
        eprintln!(
            "$ cutover {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in [TOKEN, WRONG] {
            for (what, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                assert!(
                    !String::from_utf8_lossy(bytes).contains(secret),
                    "the token is in {what}"
                );
            }
        }
        out
    }

    fn deploy(&self, token: Option<&str>, r: &str) -> (i32, Value) {
        let out = self.run(token, &["deploy", "--json", "--ref", r]);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    }

    fn served(&self) -> String {
        std::fs::read_to_string(self.lab.srv_dir(0).join("site/current/index.html"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
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
    let lab = Lab::start(1);
    let dir = lab.dir().join("controller");
    std::fs::create_dir_all(&dir).unwrap();
    let server = HttpsGit::start("e2e", TOKEN);
    let w = World {
        config: dir.join("cutover.toml"),
        dir,
        server,
        lab,
    };
    let url = w.server.private_url("site");
    w.server.commit("site", "up", "ok\n", "health");
    let c1 = w
        .server
        .commit("site", "index.html", "v1\n", "first over https");
    let ca_file = format!("ca_file = {:?}", w.server.ca());
    w.write_config(&url, &ca_file);

    let (code, v) = w.deploy(Some(TOKEN), "main");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["commit"], c1.as_str());
    assert_eq!(w.served(), "v1");

    // A new commit arrives by an incremental fetch.
    let c2 = w
        .server
        .commit("site", "index.html", "v2\n", "second over https");
    let (code, v) = w.deploy(Some(TOKEN), "main");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["commit"], c2.as_str());
    assert_eq!(w.served(), "v2");
    let out = w.run(Some(TOKEN), &["check"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("build repo https://"));

    // No token: the fetch fails (exit 1) naming the variable; nothing is deployed.
    let c3 = w.server.commit("site", "index.html", "v3\n", "third");
    let (code, v) = w.deploy(None, "main");
    assert_eq!(code, 1, "{v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(m.contains(VAR) && m.contains("not set"), "{v}");
    assert_eq!(w.served(), "v2");

    // A wrong token: refused (401), the token is not shown.
    let (code, v) = w.deploy(Some(WRONG), "main");
    assert_eq!(code, 1, "{v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("refused the token in") && m.contains("401"),
        "{v}"
    );
    assert_eq!(w.served(), "v2");

    // The right one again: the third commit goes out.
    let (code, v) = w.deploy(Some(TOKEN), "main");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["commit"], c3.as_str());

    // Without ca_file the system's roots are used, which do not know the test CA...
    w.write_config(&url, "");
    let (code, v) = w.deploy(Some(TOKEN), "main");
    assert_eq!(code, 1, "{v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("certificate is not trusted") && m.contains("ca_file"),
        "{v}"
    );
    // ...unless SSL_CERT_FILE names it.
    let out = w.run_env(
        Some(TOKEN),
        &[("SSL_CERT_FILE", &w.server.ca())],
        &["deploy", "--json", "--ref", "main"],
    );
    assert_eq!(out.status.code(), Some(0));
    w.write_config(&url, &ca_file);

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
    w.write_config(&with_creds, &ca_file);
    let out = w.run(Some(TOKEN), &["deploy", "--ref", "main"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("build.token_env") && err.contains("cutover.toml"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

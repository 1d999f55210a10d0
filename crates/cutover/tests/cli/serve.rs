//! `cutover serve` as the tests of its API, panel, webhooks, previews and HA meet it: the real
//! binary on a free loopback port with a log file (killed on drop, the log shown if the test
//! failed), requests to its API, its SSE event streams, and the tokens and users the CLI makes.

use crate::world::{wait_for, World};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// The webhook secret every server started here finds in `SITE_HOOK_SECRET` (a config whose
/// `[webhook]` names it uses it; others never read it).
pub(crate) const HOOK_SECRET: &str = "hook-secret-7f3a9c1e5b";

/// `cutover serve` on a free loopback port, killed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
}

/// One event of an SSE stream: (id, event, data); the event is "" for a plain message.
pub(crate) type Sse = (Option<i64>, String, String);

impl Server {
    pub(crate) fn start(w: &World) -> Server {
        Server::start_args(w, &[], &[])
    }

    /// `cutover serve` with `env` added to its environment.
    pub(crate) fn start_with(w: &World, env: &[(&str, &str)]) -> Server {
        Server::start_args(w, env, &[])
    }

    /// `cutover serve` with `env` and more arguments; returns once it accepts connections.
    pub(crate) fn start_args(w: &World, env: &[(&str, &str)], args: &[&str]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = w.dir.join(format!("serve-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["serve", "--listen", &addr.to_string(), "-c"])
            .arg(&w.config)
            .arg("--data")
            .arg(w.dir.join("data"))
            .args(args)
            .env("SITE_HOOK_SECRET", HOOK_SECRET)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cutover serve starts");
        let mut s = Server { child, addr, log };
        wait_for(Duration::from_secs(20), "serve to listen", || {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("cutover serve exited ({status}): {}", s.log());
            }
            match TcpStream::connect(addr) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("{e}; its log: {}", s.log())),
            }
        });
        s
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 60 s) for the server to end on its own, e.g. at a `CUTOVER_CRASH_AT` point.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        wait_for(Duration::from_secs(60), "the server to die", || match self
            .child
            .try_wait()
            .unwrap()
        {
            Some(status) => Ok(status),
            None => Err(self.log()),
        })
    }

    /// `GET path` with `tok` as bearer: (status, JSON body).
    pub(crate) fn api_get(&self, tok: &str, path: &str) -> (u16, Value) {
        send(http("127.0.0.1").get(self.url(path)).bearer_auth(tok))
    }

    /// `POST path` of `body` as JSON with `tok` as bearer: (status, JSON body).
    pub(crate) fn api_post(&self, tok: &str, path: &str, body: &Value) -> (u16, Value) {
        send(
            http("127.0.0.1")
                .post(self.url(path))
                .json(body)
                .bearer_auth(tok),
        )
    }

    /// Starts a job (`POST path` of `body`, answered 202) and returns its run id.
    pub(crate) fn start_job(&self, tok: &str, path: &str, body: &Value) -> String {
        let (status, answer) = self.api_post(tok, path, body);
        assert_eq!(status, 202, "POST {path}: {answer}");
        answer["run"].as_str().expect("a run id").to_string()
    }

    /// The events of run `run`, read over SSE to the stream's end.
    pub(crate) fn run_events(&self, tok: &str, run: &str) -> Vec<Sse> {
        let resp = http("127.0.0.1")
            .get(self.url(&format!("/api/runs/{run}/events")))
            .bearer_auth(tok)
            .send()
            .unwrap();
        read_sse(resp, usize::MAX)
    }

    /// POSTs `body` to `path` as JSON, with `headers` and no credentials: (status, JSON body).
    pub(crate) fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut r = http("127.0.0.1")
            .post(self.url(path))
            .header("content-type", "application/json");
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        send(r.body(body))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("cutover serve's log:\n{}", self.log());
        }
    }
}

/// A client whose requests come from `from` (a loopback address), 60 s per request.
pub(crate) fn http(from: &str) -> reqwest::blocking::Client {
    // reqwest is built without a TLS provider of its own (the binary installs ring's).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// (status, JSON body; the text as a JSON string if it is not JSON).
pub(crate) fn send(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let r = req.send().expect("the server answers");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Reads SSE events from `resp` until `stop` of them, an `end` event, or the stream's end.
pub(crate) fn read_sse(resp: reqwest::blocking::Response, stop: usize) -> Vec<Sse> {
    use std::io::BufRead;
    let mut out = Vec::new();
    let (mut id, mut ev, mut data) = (None, String::new(), String::new());
    for line in std::io::BufReader::new(resp).lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            if !data.is_empty() {
                let end = ev == "end";
                out.push((
                    id.take(),
                    std::mem::take(&mut ev),
                    std::mem::take(&mut data),
                ));
                if end || out.len() >= stop {
                    break;
                }
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            ev = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    out
}

/// `cutover token create NAME --role ROLE EXTRA...`: the token it prints once.
pub(crate) fn token(w: &World, name: &str, role: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", name, "--role", role];
    args.extend_from_slice(extra);
    let r = w.run(&args);
    assert_eq!(r.code, 0, "token create: {}", r.stderr);
    let t = r.stdout.trim().to_string();
    assert!(t.starts_with("cutover_") && t.len() == 72, "{t}");
    t
}

/// `cutover user add NAME --role ROLE --password-stdin` on the world's data directory.
pub(crate) fn add_user(w: &World, name: &str, role: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["user", "add", name, "--role", role, "--password-stdin"])
        .arg("--data")
        .arg(w.dir.join("data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "user add {name}: {stderr}");
    assert_eq!(stderr, format!("added user {name} ({role})\n"));
}

/// Logs `user` in through the panel's login form in browser `b` (on a page that asked for
/// it) and waits until the panel shows them as the admin.
pub(crate) fn log_in(b: &testlab::Browser, s: &Server, user: &str, password: &str) {
    b.fill("#login [name=user]", user);
    b.fill("#login [name=password]", password);
    b.click("#login button[type=submit]");
    b.wait_for("the login to finish", Duration::from_secs(10), || {
        (!b.url().contains("/login")).then_some(())
    });
    assert_eq!(b.text("#who"), format!("{user} (admin)"), "{}", s.log());
}

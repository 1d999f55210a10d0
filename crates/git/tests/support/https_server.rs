//! A real HTTPS git server on loopback for tests: Debian's nginx (TLS, `auth_basic`) in front
//! of fcgiwrap running git's own `git http-backend`, with a CA and a server certificate made
//! by the `openssl` CLI. One server per test, on a free port, with its own config, pid file
//! and temp paths; stopped by killing the exact pids it started.
//!
//! Shared by crates/git/tests/https.rs and crates/cutover/tests/git_https.rs (`#[path]`).

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Basic-auth user nginx accepts.
pub(crate) const USER: &str = "x-access-token";

pub(crate) struct HttpsGit {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    /// The token nginx accepts for [`USER`].
    pub(crate) token: String,
    nginx: Option<Child>,
    fcgiwrap: Option<Child>,
}

pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir))
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").args(args).current_dir(dir));
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl HttpsGit {
    /// Starts the server. `/private/<name>.git` asks for Basic credentials
    /// ([`USER`]:`token`), `/public/<name>.git` does not; both serve `repos/<name>.git`.
    pub(crate) fn start(name: &str, token: &str) -> HttpsGit {
        let dir = std::env::temp_dir().join(format!("cutover-https-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["repos", "tmp", "work"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        make_ca(&dir, "ca");
        // A second CA that signed nothing: trusting only it must fail.
        make_ca(&dir, "other-ca");
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        std::fs::write(dir.join("htpasswd"), format!("{USER}:{{PLAIN}}{token}\n")).unwrap();

        let sock = dir.join("fcgi.sock");
        let fcgiwrap = Command::new("fcgiwrap")
            .args(["-c", "1", "-s", &format!("unix:{}", sock.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fcgiwrap runs (Debian package fcgiwrap)");
        let mut server = HttpsGit {
            dir: dir.clone(),
            port: 0,
            token: token.to_string(),
            nginx: None,
            fcgiwrap: Some(fcgiwrap),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "fcgiwrap did not create {sock:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let d = dir.display();
        let location = |prefix: &str, auth: &str| {
            format!(
                r#"
        location ~ ^/{prefix}(/.*)$ {{
            {auth}
            fastcgi_pass unix:{d}/fcgi.sock;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {d}/repos;
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $1;
            fastcgi_param REMOTE_USER $remote_user;
        }}"#
            )
        };
        let private = location(
            "private",
            &format!(r#"auth_basic "git"; auth_basic_user_file {d}/htpasswd;"#),
        );
        let public = location("public", "");
        for attempt in 1.. {
            let port = free_port();
            let conf = format!(
                r#"user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    fastcgi_temp_path {d}/tmp/fastcgi;
    proxy_temp_path {d}/tmp/proxy;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        {private}
        {public}
    }}
}}
"#
            );
            std::fs::write(dir.join("nginx.conf"), conf).unwrap();
            let nginx = Command::new("nginx")
                .args(["-e", &format!("{d}/error.log"), "-p", &d.to_string(), "-c"])
                .arg(dir.join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx runs (Debian package nginx-light)");
            server.nginx = Some(nginx);
            server.port = port;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                let exited = server.nginx.as_mut().unwrap().try_wait().unwrap();
                if let Some(status) = exited {
                    // Most likely the port was taken between probing and binding: retry.
                    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                    assert!(attempt < 5, "nginx exited ({status}): {log}");
                    server.nginx = None;
                    break;
                }
                assert!(Instant::now() < deadline, "nginx does not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        unreachable!()
    }

    /// The CA that signed the server's certificate (for `ca_file`).
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A CA that did not sign it.
    pub(crate) fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }

    /// `https://localhost:<port>/private/<name>.git` (needs the token).
    pub(crate) fn private_url(&self, name: &str) -> String {
        format!("https://localhost:{}/private/{name}.git", self.port)
    }

    /// `https://localhost:<port>/public/<name>.git` (no credentials asked).
    pub(crate) fn public_url(&self, name: &str) -> String {
        format!("https://localhost:{}/public/{name}.git", self.port)
    }

    /// A working repository whose pushes land in the served `repos/<name>.git`.
    pub(crate) fn work(&self, name: &str) -> PathBuf {
        let work = self.dir.join("work").join(name);
        if !work.exists() {
            std::fs::create_dir_all(&work).unwrap();
            let bare = self.dir.join("repos").join(format!("{name}.git"));
            git(
                &self.dir,
                &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
            );
            git(&work, &["init", "-q", "-b", "main"]);
            git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        }
        work
    }

    /// Commits `file` with `content` in the working repository and pushes `main`; the full SHA.
    pub(crate) fn commit(&self, name: &str, file: &str, content: &str, subject: &str) -> String {
        let work = self.work(name);
        std::fs::write(work.join(file), content).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", subject]);
        git(&work, &["push", "-q", "origin", "main"]);
        git(&work, &["rev-parse", "HEAD"])
    }

    /// nginx's access log: one line per request with the Basic user (never the password).
    pub(crate) fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for HttpsGit {
    fn drop(&mut self) {
        // Exact pids this server started. nginx's master gets SIGTERM so that it stops its
        // worker too (SIGKILL would orphan the worker); fcgiwrap (no prefork) is killed.
        if let Some(mut nginx) = self.nginx.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &nginx.id().to_string()])
                .status();
            let _ = nginx.wait();
        }
        if let Some(mut f) = self.fcgiwrap.take() {
            let _ = f.kill();
            let _ = f.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

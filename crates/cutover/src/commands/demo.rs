//! `cutover demo`: the whole story on this machine with no SSH and no setup. A temporary
//! `local` host, a tiny built-in static server serving `<root>/current`, and four runs: v1, v2,
//! a broken v3 (its health check fails, so it is switched back to v2 automatically), and a
//! `rollback` (v2 is marked bad, v1 comes back). Then the history table.
//!
//! With `--panel` the demo's history is then served by `cutover serve`'s panel on a free
//! 127.0.0.1 port, with a user `demo` whose generated password is printed once, until Ctrl-C
//! (the demo's host keeps serving, so the panel's Rollback works).

use super::history;
use crate::cli::Common;
use crate::output::Progress;
use cutover_engine::artifact::ArtifactStore;
use cutover_engine::{exit, RunRequest};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub(crate) fn run(keep: bool, panel: bool) -> i32 {
    let dir = std::env::temp_dir().join(format!(
        "cutover-demo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let mut code = match demo(&dir) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: demo setup failed: {e}");
            exit::NEEDS_PERSON
        }
    };
    if panel && code == exit::OK {
        code = serve_panel(&dir);
    }
    if keep {
        eprintln!("demo files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    code
}

fn demo(dir: &Path) -> std::io::Result<i32> {
    let root = dir.join("host/srv/demo");
    std::fs::create_dir_all(&root)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let serve_root = root.clone();
    std::thread::spawn(move || serve(listener, serve_root));

    for (v, healthy) in [("v1", true), ("v2", true), ("v3", false)] {
        let d = dir.join("builds").join(v);
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("index.html"),
            format!("<!doctype html><h1>cutover demo {v}</h1>\n"),
        )?;
        if healthy {
            std::fs::write(d.join("up"), "ok\n")?;
        }
    }
    let config_path = dir.join("cutover.toml");
    let text = format!(
        r#"app = "demo"
hosts = ["local"]

[files]
root = "{root}"
reload = "echo reloaded $(basename \"$PWD\")"
keep = 5

[health]
url = "http://127.0.0.1:{port}/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "2s"
"#,
        root = root.display()
    );
    std::fs::write(&config_path, text)?;
    let common = Common {
        config: config_path.clone(),
        data: Some(dir.join("data")),
        database: None,
    };
    let config = match super::load_config(&config_path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let (store, data) = match super::open_store(&common) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let artifacts = ArtifactStore::new(data.join("artifacts"));
    println!(
        "cutover demo: one `local` host serving {}/current on http://127.0.0.1:{port}/\n",
        root.display()
    );

    let steps: [(&str, RunRequest, i32); 4] = [
        (
            "deploy v1",
            RunRequest::Deploy {
                artifact: dir.join("builds/v1"),
                commit: None,
            },
            exit::OK,
        ),
        (
            "deploy v2",
            RunRequest::Deploy {
                artifact: dir.join("builds/v2"),
                commit: None,
            },
            exit::OK,
        ),
        (
            "deploy v3 (broken: no /up, so its health gate fails)",
            RunRequest::Deploy {
                artifact: dir.join("builds/v3"),
                commit: None,
            },
            exit::FAILED,
        ),
        (
            "rollback (v2 is marked bad; v1 comes back)",
            RunRequest::Rollback { to: None },
            exit::OK,
        ),
    ];
    let mut all_as_expected = true;
    for (title, req, expected) in steps {
        println!("== {title}");
        let progress = Progress::new(crate::output::Mode::Json);
        let outcome = cutover_engine::run(&config, &store, &artifacts, &progress, req);
        for line in outcome.message.lines() {
            println!("   {line}");
        }
        println!("   exit code {}", outcome.exit_code);
        println!(
            "   http://127.0.0.1:{port}/ now says: {}\n",
            fetch(port).unwrap_or_else(|e| format!("(error: {e})"))
        );
        if outcome.exit_code != expected {
            all_as_expected = false;
            eprintln!(
                "unexpected exit {} (wanted {expected}): {}",
                outcome.exit_code, outcome.message
            );
        }
    }
    println!("== cutover history");
    history::print(&common, "demo", false);
    Ok(if all_as_expected {
        exit::OK
    } else {
        exit::FAILED
    })
}

/// Serves the demo's panel on a free loopback port with a new user `demo` until Ctrl-C or
/// SIGTERM.
fn serve_panel(dir: &Path) -> i32 {
    let config = match super::load_config(&dir.join("cutover.toml")) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state = match cutover_server::AppState::new(cutover_server::Options {
        data: dir.join("data"),
        database: None,
        apps: vec![config],
        public_url: None,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: the demo's panel: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    let password = cutover_server::secret::new_password();
    let added = cutover_server::secret::hash_password(&password).and_then(|hash| {
        state
            .store
            .add_user(
                "demo",
                cutover_server::auth::Role::Admin,
                &hash,
                &cutover_engine::now_utc(),
            )
            .map_err(|e| e.to_string())
    });
    if let Err(e) = added {
        eprintln!("error: the demo's panel user: {e}");
        return exit::NEEDS_PERSON;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the panel's runtime: {e}");
            return exit::NEEDS_PERSON;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1: {e}");
                return exit::NEEDS_PERSON;
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::NEEDS_PERSON;
            }
        };
        println!("== the demo's panel (Ctrl-C to stop)");
        println!("panel: http://{addr}/");
        println!("user: demo");
        println!("password: {password}");
        match cutover_server::serve(listener, state, super::serve::stopped()).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: the panel stopped: {e}");
                exit::NEEDS_PERSON
            }
        }
    })
}

/// The text of the page at `/`, first line, tags stripped.
fn fetch(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let text = body.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    Ok(plain.trim().to_string())
}

/// A tiny static file server for the demo: resolves `<root>/current` on every request, so a
/// switch is visible at once.
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
    let rel = path
        .split('?')
        .next()
        .unwrap_or("/")
        .trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let safe = Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    let file = root.join("current").join(rel);
    let (status, body) = match (safe, std::fs::read(&file)) {
        (true, Ok(b)) => ("200 OK", b),
        _ => ("404 Not Found", b"not found\n".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)
}

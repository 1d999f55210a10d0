//! The one world every test of this binary runs in, built fluently:
//!
//! ```ignore
//! let w = World::files(3).lines("files", "keep = 1").start();
//! let r = w.run(&["deploy", "--json", "--artifact", path]);
//! assert_eq!(r.code, 0);
//! assert_eq!(w.norm(r.message()), "deployed <release> on 3 host(s); ...");
//! ```
//!
//! A world is hosts (a testlab lab of network namespaces with their own sshd and nginx, and
//! dockerd for container apps; or this machine as the `local` host, served by a tiny static
//! server in this process), a `cutover.toml` written from a table of settings (the defaults of
//! its kind, then the builder's changes; [`World::configure`] rewrites it from the same
//! defaults), a data directory, optionally a git repository pushing to a bare `origin.git`,
//! and the real `cutover` binary. Everything needs root but the `local` world.

use serde_json::Value;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testlab::{Lab, LabOptions, Load, LoadOptions, LoadReport};

/// The files root on every lab host (as the host sees it).
pub(crate) const ROOT: &str = "/srv/site";
/// Where the edge proxy listens on container hosts.
pub(crate) const PROXY_PORT: u16 = 8000;
/// Commits are dated from here on, one minute apart.
const COMMIT_TIME: i64 = 1_790_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Files,
    Containers,
    Local,
}

/// A config as sections of `key = value` lines (values are TOML as written); "" is the top
/// level. Rendered in insertion order.
#[derive(Clone, Default)]
pub(crate) struct Toml {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl Toml {
    /// Sets `key` in `section` to the TOML `value` (replacing it where it is set).
    pub(crate) fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Toml {
        let i = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[i].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Sets `key` to the string `value`, quoted.
    pub(crate) fn set_str(
        &mut self,
        section: &str,
        key: &str,
        value: impl AsRef<str>,
    ) -> &mut Toml {
        self.set(section, key, &format!("{:?}", value.as_ref()))
    }

    /// Sets every `key = value` line of `text` in `section`.
    pub(crate) fn lines(&mut self, section: &str, text: &str) -> &mut Toml {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a `key = value` line: {line:?}"));
            self.set(section, k.trim(), v.trim());
        }
        self
    }

    pub(crate) fn unset(&mut self, section: &str, key: &str) -> &mut Toml {
        for (s, keys) in &mut self.sections {
            if s == section {
                keys.retain(|(k, _)| k != key);
            }
        }
        self
    }

    pub(crate) fn remove_section(&mut self, section: &str) -> &mut Toml {
        self.sections.retain(|(s, _)| s != section);
        self
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let top = self.sections.iter().filter(|(s, _)| s.is_empty());
        let rest = self.sections.iter().filter(|(s, _)| !s.is_empty());
        for (section, keys) in top.chain(rest) {
            if !section.is_empty() {
                out.push_str(&format!("\n[{section}]\n"));
            }
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

/// A change to a world's default config.
type Change = Box<dyn FnOnce(&mut Toml)>;

/// How a world is made; [`Builder::start`] makes it.
pub(crate) struct Builder {
    kind: Kind,
    lab: LabOptions,
    git: bool,
    docker_host: Option<usize>,
    changes: Vec<Change>,
    env: Vec<(String, Option<String>)>,
}

impl Builder {
    fn new(kind: Kind, hosts: usize) -> Builder {
        Builder {
            kind,
            lab: LabOptions {
                hosts,
                docker: kind == Kind::Containers,
                ..LabOptions::default()
            },
            git: false,
            docker_host: None,
            changes: Vec::new(),
            env: vec![("CUTOVER_CRASH_AT".into(), None)],
        }
    }

    /// Changes the lab's options (e.g. a small tmpfs as `/srv`).
    pub(crate) fn lab(mut self, f: impl FnOnce(&mut LabOptions)) -> Builder {
        f(&mut self.lab);
        self
    }

    /// Sets `key` in `[section]` to the TOML `value`.
    pub(crate) fn set(self, section: &str, key: &str, value: &str) -> Builder {
        let (s, k, v) = (section.to_string(), key.to_string(), value.to_string());
        self.config(move |t| {
            t.set(&s, &k, &v);
        })
    }

    /// Sets every `key = value` line of `text` in `[section]`.
    pub(crate) fn lines(self, section: &str, text: &str) -> Builder {
        let (s, text) = (section.to_string(), text.to_string());
        self.config(move |t| {
            t.lines(&s, &text);
        })
    }

    pub(crate) fn unset(self, section: &str, key: &str) -> Builder {
        let (s, k) = (section.to_string(), key.to_string());
        self.config(move |t| {
            t.unset(&s, &k);
        })
    }

    /// Any change to the default config.
    pub(crate) fn config(mut self, f: impl FnOnce(&mut Toml) + 'static) -> Builder {
        self.changes.push(Box::new(f));
        self
    }

    /// A work repository pushing to a bare `origin.git` beside it; `[build] repo` is origin.
    pub(crate) fn git(mut self) -> Builder {
        self.git = true;
        self
    }

    /// The docker CLI of every `cutover` this world runs talks to lab host `i`'s dockerd.
    pub(crate) fn docker_host(mut self, i: usize) -> Builder {
        self.docker_host = Some(i);
        self
    }

    /// `key` removed from the environment of every `cutover` this world runs.
    pub(crate) fn env_remove(mut self, key: &str) -> Builder {
        self.env.push((key.into(), None));
        self
    }

    pub(crate) fn start(self) -> World {
        let (lab, dir) = if self.kind == Kind::Local {
            (None, unique_temp_dir("cutover-it"))
        } else {
            let lab = Lab::start_with(self.lab.clone());
            let dir = lab.dir().join("controller");
            (Some(lab), dir)
        };
        std::fs::create_dir_all(&dir).unwrap();
        let port = (self.kind == Kind::Local).then(|| {
            let root = dir.join("host/srv/site");
            std::fs::create_dir_all(&root).unwrap();
            serve_current(root)
        });
        let registry = lab.as_ref().and_then(Lab::registry);
        let mut env = self.env;
        if let (Some(i), Some(lab)) = (self.docker_host, &lab) {
            env.push(("DOCKER_HOST".into(), Some(lab.docker_host(i))));
        }
        let mut w = World {
            lab,
            config: dir.join("cutover.toml"),
            dir,
            kind: self.kind,
            port,
            registry,
            base: Toml::default(),
            env,
            clock: Cell::new(COMMIT_TIME),
        };
        let mut t = w.defaults();
        if self.git {
            git_at(
                &w.dir,
                &["init", "-q", "--bare", "-b", "main", "origin.git"],
                None,
            );
            std::fs::create_dir_all(w.work()).unwrap();
            w.git(&["init", "-q", "-b", "main"]);
            let origin = w.origin().display().to_string();
            w.git(&["remote", "add", "origin", &origin]);
            t.set_str("build", "repo", origin);
        }
        for change in self.changes {
            change(&mut t);
        }
        w.base = t;
        w.configure(|_| {});
        if w.kind == Kind::Containers {
            for i in 0..w.hosts() {
                std::fs::create_dir_all(w.lab().srv_dir(i).join("flags")).unwrap();
            }
            let r = w.run(&["setup"]);
            assert_eq!(r.code, 0, "setup: {}", r.stdout);
        }
        w
    }
}

/// One test's world; see the module doc.
pub(crate) struct World {
    lab: Option<Lab>,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    kind: Kind,
    port: Option<u16>,
    registry: Option<String>,
    base: Toml,
    env: Vec<(String, Option<String>)>,
    clock: Cell<i64>,
}

impl World {
    /// A files app on `hosts` lab hosts, root [`ROOT`], health `http://127.0.0.1/up`.
    pub(crate) fn files(hosts: usize) -> Builder {
        Builder::new(Kind::Files, hosts)
    }

    /// A container app on `hosts` lab hosts with dockerd and an edge proxy (set up when the
    /// world starts).
    pub(crate) fn containers(hosts: usize, strategy: &str) -> Builder {
        let s = format!("{strategy:?}");
        Builder::new(Kind::Containers, hosts).set("container", "strategy", &s)
    }

    /// A files app on the `local` host (this machine, no SSH) served by a static server of
    /// `<root>/current` in this process.
    pub(crate) fn local() -> Builder {
        Builder::new(Kind::Local, 1)
    }

    fn defaults(&self) -> Toml {
        let mut t = Toml::default();
        let hosts: Vec<String> = match &self.lab {
            Some(lab) => (0..lab.len())
                .map(|i| format!("{:?}", lab.destination(i)))
                .collect(),
            None => vec!["\"local\"".into()],
        };
        let app = if self.kind == Kind::Containers {
            "web"
        } else {
            "site"
        };
        t.set_str("", "app", app)
            .set("", "hosts", &format!("[{}]", hosts.join(", ")));
        if let Some(lab) = &self.lab {
            t.set_str(
                "ssh",
                "known_hosts",
                lab.known_hosts().display().to_string(),
            )
            .set_str("ssh", "identity", lab.identity().display().to_string())
            .set_str("ssh", "connect_timeout", "3s");
        }
        match self.kind {
            Kind::Files | Kind::Local => {
                let (root, url) = match self.port {
                    Some(port) => (
                        self.site(0).display().to_string(),
                        format!("http://127.0.0.1:{port}/up"),
                    ),
                    None => (ROOT.to_string(), "http://127.0.0.1/up".to_string()),
                };
                t.set_str("files", "root", root)
                    .set_str("health", "url", url)
                    .lines("health", "timeout = \"1s\"\ninterval = \"100ms\"\nhealthy_after = 2\ngive_up_after = \"3s\"");
            }
            Kind::Containers => {
                t.set_str("container", "image", format!("{}/web", self.registry()))
                    .lines(
                        "container",
                        "port = 8080\nenv = { GREETING = \"it's $(not) a command\" }\nvolumes = [\"/srv/flags:/hostflag\"]\nstrategy = \"blue-green\"\nkeep = 2\nstop_timeout = \"2s\"",
                    )
                    .set_str("proxy", "listen", format!("0.0.0.0:{PROXY_PORT}"))
                    .lines(
                        "proxy",
                        "drain = \"2s\"\nhold = \"60s\"\ninstall_dir = \"/srv/cutover\"",
                    )
                    .lines(
                        "health",
                        "path = \"/up\"\ntimeout = \"1s\"\ninterval = \"100ms\"\nhealthy_after = 2\ngive_up_after = \"4s\"",
                    );
            }
        }
        t
    }

    /// Rewrites the config: the world's settings, then `f`.
    pub(crate) fn configure(&self, f: impl FnOnce(&mut Toml)) {
        let mut t = self.base.clone();
        f(&mut t);
        std::fs::write(&self.config, t.render()).unwrap();
    }

    pub(crate) fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("a world on lab hosts")
    }

    pub(crate) fn hosts(&self) -> usize {
        self.lab.as_ref().map_or(1, Lab::len)
    }

    pub(crate) fn registry(&self) -> &str {
        self.registry.as_deref().expect("a lab with docker")
    }

    // ---- running cutover ----

    /// `cutover ARGS -c <config> --data <dir>/data`, to adjust before it runs.
    pub(crate) fn cutover(&self, args: &[&str]) -> Cutover {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cutover"));
        cmd.args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(self.dir.join("data"))
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        Cutover {
            cmd,
            line: args.join(" "),
        }
    }

    /// Runs `cutover ARGS` (see [`World::cutover`]).
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        self.cutover(args).run()
    }

    /// `deploy --json --artifact PATH`.
    pub(crate) fn deploy_artifact(&self, artifact: &Path) -> Run {
        self.run(&["deploy", "--json", "--artifact", artifact.to_str().unwrap()])
    }

    /// `deploy --json --image TAG`.
    pub(crate) fn deploy_image(&self, tag: &str) -> Run {
        self.run(&["deploy", "--json", "--image", tag])
    }

    /// `deploy --json --ref REF`.
    pub(crate) fn deploy_ref(&self, r: &str) -> Run {
        self.run(&["deploy", "--json", "--ref", r])
    }

    /// `deploy --json --ref REF`, which must succeed.
    pub(crate) fn deploy_ref_ok(&self, r: &str) -> Value {
        let run = self.deploy_ref(r);
        assert_eq!(run.code, 0, "deploy --ref {r}: {} {}", run.json, run.stderr);
        run.json
    }

    /// Deploys `name`, which must succeed, and returns the release id: for a files app a
    /// [`World::build`] of that name, for a container app the image tag.
    pub(crate) fn deploy_ok(&self, name: &str) -> String {
        let r = match self.kind {
            Kind::Containers => self.deploy_image(name),
            _ => self.deploy_artifact(&self.build(name)),
        };
        assert_eq!(r.code, 0, "deploy {name}: {}", r.json);
        r.release()
    }

    /// `history --json`, newest first.
    pub(crate) fn history(&self) -> Vec<Value> {
        let r = self.run(&["history", "--json"]);
        assert_eq!(r.code, 0, "history: {}", r.stderr);
        r.json.as_array().expect("history is an array").clone()
    }

    /// The ids of the releases `history --json` marks live.
    pub(crate) fn live(&self) -> Vec<String> {
        self.history()
            .iter()
            .filter(|r| r["live"] == true)
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub(crate) fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.join("data/cutover.db")).unwrap()
    }

    /// The one number `sql` selects from the data directory's database.
    pub(crate) fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// (step, phase, detail) of every event of the newest run.
    pub(crate) fn last_run_events(&self) -> Vec<(String, String, String)> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT step, phase, detail FROM events WHERE run_id = (SELECT MAX(id) FROM runs) ORDER BY seq")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// `text` with this world's variable parts named: hosts as `<host0>`..., the registry as
    /// `<registry>`, its directories as `<dir>` and `<lab>`, then `known` (value, name) pairs,
    /// then the generic ones of [`normalize`].
    pub(crate) fn norm_with(&self, text: &str, known: &[(&str, &str)]) -> String {
        let mut pairs: Vec<(String, String)> = known
            .iter()
            .map(|(v, n)| (v.to_string(), n.to_string()))
            .collect();
        pairs.push((self.dir.display().to_string(), "<dir>".into()));
        if let Some(lab) = &self.lab {
            pairs.push((lab.dir().display().to_string(), "<lab>".into()));
            for i in 0..lab.len() {
                pairs.push((lab.destination(i), format!("<host{i}>")));
                pairs.push((lab.ip(i).to_string(), format!("<ip{i}>")));
            }
        }
        if let Some(r) = &self.registry {
            pairs.push((r.clone(), "<registry>".into()));
        }
        // Longest first, so that a value that contains another is named whole.
        pairs.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
        let mut s = text.to_string();
        for (v, n) in &pairs {
            if !v.is_empty() {
                s = s.replace(v.as_str(), n);
            }
        }
        normalize(&s)
    }

    pub(crate) fn norm(&self, text: &str) -> String {
        self.norm_with(text, &[])
    }

    // ---- what the hosts serve ----

    /// Where `GET /` of host `i` goes: nginx (files), the edge proxy (containers) or the local
    /// static server.
    pub(crate) fn http_addr(&self, i: usize) -> SocketAddr {
        match (self.kind, self.port) {
            (Kind::Containers, _) => SocketAddr::new(self.lab().ip(i).into(), PROXY_PORT),
            (_, Some(port)) => SocketAddr::from(([127, 0, 0, 1], port)),
            _ => self.lab().http_addr(i),
        }
    }

    /// `GET path` of host `i`: the body on 200, else `HTTP <status line>` or `ERROR ...`.
    pub(crate) fn get(&self, i: usize, path: &str) -> String {
        http_get(self.http_addr(i), path).unwrap_or_else(|e| format!("ERROR {e}"))
    }

    /// What host `i` serves at `/`, trimmed.
    pub(crate) fn served(&self, i: usize) -> String {
        self.get(i, "/").trim().to_string()
    }

    /// Every host serves `name` at `/` (and, for files, `current` is a complete release).
    pub(crate) fn assert_all_serve(&self, name: &str) {
        for i in 0..self.hosts() {
            assert_eq!(self.served(i), name, "host {i}");
            if self.kind != Kind::Containers {
                self.assert_complete(i);
            }
        }
    }

    /// Keep-alive and fresh-connection load (two workers each) on every host's
    /// [`World::http_addr`], each request given `timeout` if set.
    pub(crate) fn load(&self, timeout: Option<Duration>) -> Loads {
        let targets: Vec<_> = (0..self.hosts()).map(|i| self.http_addr(i)).collect();
        let start = |keep_alive| {
            let mut o = LoadOptions {
                workers_per_target: 2,
                keep_alive,
                ..LoadOptions::new(targets.clone())
            };
            if let Some(t) = timeout {
                o.timeout = t;
            }
            Load::start(o)
        };
        Loads {
            keep_alive: start(true),
            fresh: start(false),
        }
    }

    // ---- files hosts ----

    /// A build directory whose pages say `name`.
    pub(crate) fn build(&self, name: &str) -> PathBuf {
        let d = self.dir.join("builds").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("index.html"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("up"), "ok\n").unwrap();
        std::fs::write(d.join("version"), name).unwrap();
        d
    }

    /// Host `i`'s files root, as this machine sees it.
    pub(crate) fn site(&self, i: usize) -> PathBuf {
        match &self.lab {
            Some(lab) => lab.srv_dir(i).join("site"),
            None => self.dir.join("host/srv/site"),
        }
    }

    /// The release `current` points at on host `i`, read from the host's disk.
    pub(crate) fn current(&self, i: usize) -> Option<String> {
        std::fs::read_link(self.site(i).join("current"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }

    /// The directories in host `i`'s `releases/`, sorted.
    pub(crate) fn releases_on(&self, i: usize) -> Vec<String> {
        names_in(&self.site(i).join("releases"))
    }

    /// Host `i`'s `current` is a complete release of a [`World::build`].
    pub(crate) fn assert_complete(&self, i: usize) {
        if let Err(e) = self.complete(i) {
            panic!("{e}");
        }
    }

    pub(crate) fn complete(&self, i: usize) -> Result<(), String> {
        let cur = self.site(i).join("current");
        if !cur.join(".cutover-release.json").is_file() {
            return Err(format!("host {i}: current is not a complete release"));
        }
        if !cur.join("index.html").is_file() || !cur.join("version").is_file() {
            return Err(format!("host {i}: files missing"));
        }
        Ok(())
    }

    // ---- container hosts ----

    /// Builds and pushes `web:TAG`, serving `TAG` at `/` and `/up` if `healthy`.
    pub(crate) fn image(&self, tag: &str, healthy: bool) {
        self.lab()
            .build_web_image(&format!("web:{tag}"), &format!("{tag}\n"), healthy);
    }

    /// `name state` of every container on host `i`, sorted.
    pub(crate) fn containers_on(&self, i: usize) -> Vec<String> {
        let out = self
            .lab()
            .docker(i, &["ps", "-a", "--format", "{{.Names}} {{.State}}"]);
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// The pid host `i`'s edge proxy reports, if it answers.
    pub(crate) fn proxy_pid(&self, i: usize) -> Option<u64> {
        let out = self.lab().ssh(
            i,
            "/srv/cutover/cutover proxy status --dir /srv/cutover --json",
        );
        serde_json::from_slice::<Value>(&out.stdout).ok()?["pid"].as_u64()
    }

    // ---- git ----

    pub(crate) fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    pub(crate) fn origin(&self) -> PathBuf {
        self.dir.join("origin.git")
    }

    /// git in the work repository, each call a minute after the last.
    pub(crate) fn git(&self, args: &[&str]) -> String {
        let t = self.clock.get() + 60;
        self.clock.set(t);
        git_at(&self.work(), args, Some(t))
    }

    /// Writes `files` (path, content) into the work tree, commits everything with `subject`
    /// and returns the full SHA.
    pub(crate) fn commit(&self, subject: &str, files: &[(&str, &str)]) -> String {
        for (name, content) in files {
            let p = self.work().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", subject]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// Pushes main and the tags to origin (forced).
    pub(crate) fn push(&self) {
        self.git(&["push", "-q", "--force", "--tags", "origin", "main"]);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // A lab cleans its own directory; a local world's is removed unless a test failed.
        if self.lab.is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The load of [`World::load`].
pub(crate) struct Loads {
    keep_alive: Load,
    fresh: Load,
}

impl Loads {
    /// Stops both loads and shows what they saw: (keep-alive, fresh).
    pub(crate) fn stop(self, what: &str) -> (LoadReport, LoadReport) {
        let ka = self.keep_alive.stop();
        let fresh = self.fresh.stop();
        eprintln!(
            "{what} keep-alive: {} ok, {} failed, longest {:?}, bodies {:?}",
            ka.ok, ka.failed, ka.max_latency, ka.bodies
        );
        eprintln!(
            "{what} fresh: {} ok, {} failed, longest {:?}",
            fresh.ok, fresh.failed, fresh.max_latency
        );
        (ka, fresh)
    }
}

/// One `cutover` command line, to adjust before it runs.
pub(crate) struct Cutover {
    cmd: Command,
    line: String,
}

impl Cutover {
    pub(crate) fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Cutover {
        self.cmd.env(key, value);
        self
    }

    /// `CUTOVER_CRASH_AT=point`: the process SIGKILLs itself there.
    pub(crate) fn crash_at(self, point: &str) -> Cutover {
        self.env("CUTOVER_CRASH_AT", point)
    }

    /// Runs it to the end and shows what it printed on this test's stderr.
    pub(crate) fn run(mut self) -> Run {
        let out = self.cmd.output().expect("cutover runs");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        };
        eprintln!(
            "$ cutover {} -> {:?}\n{}{}",
            self.line,
            out.status.code(),
            run.stdout,
            run.stderr
        );
        run
    }

    /// Starts it in the background, its output discarded.
    pub(crate) fn spawn_quiet(mut self) -> Child {
        self.cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cutover starts")
    }
}

/// What a `cutover` run did.
pub(crate) struct Run {
    /// The exit code, -1 if a signal ended it.
    pub(crate) code: i32,
    pub(crate) signal: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// stdout as JSON (`--json`), `Null` if it is not.
    pub(crate) json: Value,
}

impl Run {
    /// The `message` of a `--json` outcome.
    pub(crate) fn message(&self) -> &str {
        self.json["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {}: {}", self.json, self.stderr))
    }

    /// The `release` of a `--json` outcome.
    pub(crate) fn release(&self) -> String {
        self.json["release"]
            .as_str()
            .unwrap_or_else(|| panic!("no release in {}", self.json))
            .to_string()
    }

    /// Asserts the exit code and that the `--json` message says each of `parts`.
    pub(crate) fn says(&self, code: i32, parts: &[&str]) {
        assert_eq!(self.code, code, "{} {}", self.json, self.stderr);
        let m = self.message();
        for p in parts {
            assert!(m.contains(p), "the message does not say {p:?}: {m}");
        }
    }

    /// The message a run without `--json` ends with: stderr from its last line that starts
    /// with `error: ` (the message may span lines), without that prefix.
    pub(crate) fn error(&self) -> &str {
        let at = self
            .stderr
            .rfind("\nerror: ")
            .map(|i| i + 1)
            .or_else(|| self.stderr.starts_with("error: ").then_some(0))
            .unwrap_or_else(|| panic!("no `error: ` line in stderr: {}", self.stderr));
        self.stderr[at + "error: ".len()..].trim_end()
    }
}

/// Names the parts of a message that change from run to run, so that the rest can be compared
/// whole: release ids `<release>`, times `<time>`, image digests `sha256:<digest>`, other
/// sha256s `<sha256>`, durations `<t>s`, milliseconds `<n> ms`, probe counts `<n> probes`,
/// pids `pid <pid>` and loopback ports `127.0.0.1:<port>`.
pub(crate) fn normalize(text: &str) -> String {
    use Pat::{Digits as D, Hex as H, Lit as L};
    let rules: &[(&[Pat], &str)] = &[
        (&[D, L("T"), D, L("Z-"), H], "<release>"),
        (
            &[
                D,
                L("-"),
                D,
                L("-"),
                D,
                L("T"),
                D,
                L(":"),
                D,
                L(":"),
                D,
                L("Z"),
            ],
            "<time>",
        ),
        (&[L("sha256:"), H], "sha256:<digest>"),
        (&[H], "<sha256>"),
        (&[D, L("."), D, L("s")], "<t>s"),
        (&[D, L(" ms")], "<n> ms"),
        (&[D, L(" probes")], "<n> probes"),
        (&[L("pid "), D], "pid <pid>"),
        (&[L("127.0.0.1:"), D], "127.0.0.1:<port>"),
    ];
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    'scan: while i < chars.len() {
        let at_word_start = i == 0 || !chars[i - 1].is_ascii_alphanumeric();
        for (pats, name) in rules {
            if !at_word_start && !matches!(pats[0], Pat::Lit(_)) {
                continue;
            }
            if let Some(end) = match_at(&chars, i, pats) {
                let bounded = end == chars.len() || !chars[end].is_ascii_alphanumeric();
                // A bare hex run is a sha256 only at 64 digits.
                let long_enough = !matches!(pats, [Pat::Hex]) || end - i == 64;
                if bounded && long_enough {
                    out.push_str(name);
                    i = end;
                    continue 'scan;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[derive(Clone, Copy)]
enum Pat {
    Lit(&'static str),
    /// One or more ASCII digits.
    Digits,
    /// One or more lowercase hex digits.
    Hex,
}

fn match_at(chars: &[char], mut i: usize, pats: &[Pat]) -> Option<usize> {
    for p in pats {
        match p {
            Pat::Lit(s) => {
                for c in s.chars() {
                    if chars.get(i) != Some(&c) {
                        return None;
                    }
                    i += 1;
                }
            }
            Pat::Digits | Pat::Hex => {
                let ok = |c: char| match p {
                    Pat::Digits => c.is_ascii_digit(),
                    _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
                };
                let start = i;
                while chars.get(i).is_some_and(|c| ok(*c)) {
                    i += 1;
                }
                if i == start {
                    return None;
                }
            }
        }
    }
    Some(i)
}

/// `GET path` with `Host: t`: the body on 200, else `HTTP <status line>`.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Ok(format!("HTTP {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

/// Polls `f` every 200 ms until it returns `Ok`, or panics after `limit` with `what` and the
/// last error seen.
pub(crate) fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let t = std::time::Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if t.elapsed() > limit => panic!("timed out waiting for {what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Polls `done` every 200 ms until it is true, or panics after `limit` naming `what`.
pub(crate) fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    wait_for(limit, what, || done().then_some(()).ok_or_else(String::new));
}

/// Runs git in `dir` with a fixed identity, no user or system config and no ssh.
pub(crate) fn git_at(dir: &Path, args: &[&str], date: Option<i64>) -> String {
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

/// Pseudo-random bytes that gzip cannot shrink (splitmix64).
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The names in directory `dir`, sorted (none if it is not there).
pub(crate) fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A fresh directory under the system's temp dir.
pub(crate) fn unique_temp_dir(prefix: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::env::temp_dir().join(format!("{prefix}-{}-{nanos}-{n}", std::process::id()))
}

/// Serves `<root>/current` on a loopback port (as `cutover demo` does); returns the port.
fn serve_current(root: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &root);
            });
        }
    });
    port
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

#[test]
fn normalize_names_the_parts_that_vary() {
    assert_eq!(
        normalize("deployed 20261126T091500Z-3f9a2c1 on 2 host(s) in 0.4s (3 probes, 12 ms)"),
        "deployed <release> on 2 host(s) in <t>s (<n> probes, <n> ms)"
    );
    assert_eq!(
        normalize(
            "alice@laptop pid 42 (deploy) since 2026-01-01T00:00:00Z; web-20261126T091500Z-3f9a2c1"
        ),
        "alice@laptop pid <pid> (deploy) since <time>; web-<release>"
    );
    let digest = "ab".repeat(32);
    assert_eq!(
        normalize(&format!(
            "reg/web@sha256:{digest} proxy 127.0.0.1:4242 v2 {digest}"
        )),
        "reg/web@sha256:<digest> proxy 127.0.0.1:<port> v2 <sha256>"
    );
    let mut t = Toml::default();
    t.set_str("", "app", "x")
        .lines("files", "root = \"/a\"\nkeep = 1")
        .set("files", "keep", "2");
    assert_eq!(
        t.render(),
        "app = \"x\"\n\n[files]\nroot = \"/a\"\nkeep = 2\n"
    );
}

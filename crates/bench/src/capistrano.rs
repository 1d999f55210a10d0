//! Capistrano as a peer, shared by the files scenarios ([`crate::switch_files`],
//! [`crate::deploy_speed`], [`crate::rollback`]): Debian's `capistrano` (3.17) deploying the
//! bench's payloads to a [`World`]'s hosts the way Capistrano 3 does by default, from a git
//! repository. The payloads are committed into a bare repository on this machine (no working
//! tree is written: `git add` reads the payload directory through a temporary index), which a
//! `git daemon` serves over `git://` on the root side of host 0's veth; every other host gets
//! a route to that one address inside its own network namespace, so each host fetches over its
//! own veth, like from a git server. Capistrano's `deploy` keeps a mirror of the repository in
//! `<deploy_to>/repo` on each host (`git clone --mirror` the first time, `git remote update`
//! after), `git archive`s the branch into `releases/<timestamp>` and points `current` at it (a
//! temporary symlink renamed over `current`). `deploy_to` is the lab's site root, so the
//! hosts' nginx serves Capistrano's `current` exactly as it serves cutover's.
//!
//! SSH: net-ssh (Capistrano's SSH library) with the lab's ed25519 identity (Debian's
//! `ruby-ed25519` and `ruby-bcrypt-pbkdf`), the lab's known_hosts and `verify_host_key:
//! :always` (strict host key checking, as cutover does).

use crate::harness::{Payload, World};
use anyhow::{anyhow, bail, Context as _, Result};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Port of the bench's `git daemon` (on a lab address only, never on 0.0.0.0).
const GIT_PORT: u16 = 9418;
/// The repository's name under the daemon's base path.
const REPO: &str = "site.git";

/// A Capistrano project for a world's hosts, and the git server it deploys from.
pub(crate) struct Cap {
    /// The project dir (Capfile, config/deploy.rb, config/deploy/bench.rb).
    dir: PathBuf,
    /// The bare repository the daemon serves.
    repo: PathBuf,
    /// The watchdog shell running `git-daemon`.
    daemon: Option<Child>,
    /// Where `git-daemon` writes its pid.
    pid_file: PathBuf,
    /// Unix second of the last `cap` start (Capistrano names releases by the second).
    last_start: Cell<u64>,
}

/// How one `cap` command ended.
#[derive(Debug, Clone)]
pub(crate) struct CapRun {
    pub(crate) ok: bool,
    /// The last lines of its output when it failed, empty otherwise.
    pub(crate) message: String,
}

/// "Capistrano 3.17.2" from `cap --version`, for the report.
pub(crate) fn version() -> String {
    Command::new("cap")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let v = text.split("Capistrano Version:").nth(1)?;
            v.split_whitespace()
                .next()
                .map(|v| format!("Capistrano {v}"))
        })
        .unwrap_or_else(|| "Capistrano (not installed)".into())
}

impl Cap {
    /// Writes the Capistrano project under `<lab dir>/capistrano`, creates the bare repository
    /// under `git_base` unless it exists (it is shared by the labs of a run, so that each
    /// payload is committed once) and starts `git daemon` for it; adds each host's route to
    /// the daemon's address.
    pub(crate) fn start(world: &World, git_base: &Path) -> Result<Cap> {
        if Command::new("cap").arg("--version").output().is_err() {
            bail!("Capistrano is not installed (Debian package `capistrano`)");
        }
        let lab = &world.lab;
        let base = lab.dir().join("capistrano");
        let dir = base.join("project");
        let repo = git_base.join(REPO);
        std::fs::create_dir_all(dir.join("config/deploy"))?;
        if !repo.join("HEAD").exists() {
            std::fs::create_dir_all(&repo)?;
            git(&repo, &["init", "-q", "--bare", "-b", "main"])?;
            // The payloads are files of random bytes, which have no deltas: git stores and
            // sends them whole instead of searching for deltas on every fetch.
            git(&repo, &["config", "core.bigFileThreshold", "128k"])?;
            // The bench's own bookkeeping refs are not offered to clients.
            git(&repo, &["config", "uploadpack.hideRefs", "refs/bench"])?;
        }

        // The daemon listens on the root side of host 0's veth (10.201.X.1); host i > 0
        // reaches it through its own veth's root side.
        let h0 = lab.ip(0).octets();
        let server = Ipv4Addr::new(h0[0], h0[1], h0[2], h0[3] - 1);
        for i in 1..lab.len() {
            let o = lab.ip(i).octets();
            let gw = Ipv4Addr::new(o[0], o[1], o[2], o[3] - 1);
            let out = lab.exec(i, &format!("ip route replace {server}/32 via {gw}"));
            if !out.status.success() {
                bail!(
                    "host {i}: cannot add a route to the git server: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let log = std::fs::File::create(base.join("git-daemon.log"))?;
        // `git daemon` would run `git-daemon` as its child (which outlives a kill of `git`):
        // run that program itself, under a small watchdog that stops it (by its pid) once
        // this process is gone, however it ended; see [`Cap`]'s `Drop` for the normal end.
        let exec_path = Command::new("git")
            .arg("--exec-path")
            .output()
            .context("running git --exec-path")?;
        let exec_path = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim());
        let pid_file = base.join("git-daemon.pid");
        let daemon = Command::new("sh")
            .arg("-c")
            .arg(
                "\"$@\" & d=$!; \
                 while kill -0 \"$BENCH_PID\" 2>/dev/null && kill -0 \"$d\" 2>/dev/null; do sleep 1; done; \
                 kill \"$d\" 2>/dev/null; wait \"$d\"",
            )
            .arg("sh")
            .arg(exec_path.join("git-daemon"))
            .args([
                "--reuseaddr",
                "--export-all",
                "--informative-errors",
                &format!("--listen={server}"),
                &format!("--port={GIT_PORT}"),
            ])
            .arg(format!("--pid-file={}", pid_file.display()))
            .arg(format!("--base-path={}", git_base.display()))
            .arg(git_base)
            .env("BENCH_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting git daemon")?;
        let mut cap = Cap {
            dir,
            repo,
            pid_file,
            daemon: Some(daemon),
            last_start: Cell::new(0),
        };
        let addr = SocketAddr::new(server.into(), GIT_PORT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(c) = cap.daemon.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "git daemon exited with {st}: {}",
                        std::fs::read_to_string(base.join("git-daemon.log")).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("git daemon does not accept on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        std::fs::write(
            cap.dir.join("Capfile"),
            "require \"capistrano/setup\"\n\
             require \"capistrano/deploy\"\n\
             require \"capistrano/scm/git\"\n\
             install_plugin Capistrano::SCM::Git\n",
        )?;
        let site_root = world.site_root();
        std::fs::write(
            cap.dir.join("config/deploy.rb"),
            format!(
                r#"lock "~> 3.17"
set :application, "site"
set :repo_url, "git://{server}:{GIT_PORT}/{REPO}"
set :branch, ENV.fetch("BRANCH", "main")
set :deploy_to, {site_root:?}
set :keep_releases, 5
# Per host (each host has its own /srv), so hosts never share Capistrano's temp files.
set :tmp_dir, "/srv/cap-tmp"
set :log_level, :info
set :ssh_options, {{
  user: "root",
  keys: [{id:?}],
  keys_only: true,
  auth_methods: %w[publickey],
  user_known_hosts_file: {kh:?},
  global_known_hosts_file: "/dev/null",
  verify_host_key: :always,
  non_interactive: true,
  config: false,
  timeout: 5,
}}
"#,
                id = lab.identity().display().to_string(),
                kh = lab.known_hosts().display().to_string(),
            ),
        )?;
        let servers: String = (0..lab.len())
            .map(|i| format!("server \"{}\", user: \"root\", roles: %w[web]\n", lab.ip(i)))
            .collect();
        std::fs::write(cap.dir.join("config/deploy/bench.rb"), servers)?;
        Ok(cap)
    }

    /// Commits `p`'s directory (every file, as it is) into the repository, with `parent` as
    /// the parent commit if given; returns the commit id. Untimed. A payload is committed
    /// once per run (remembered as `refs/bench/<label>`).
    pub(crate) fn commit(&self, p: &Payload, parent: Option<&str>) -> Result<String> {
        let memo = format!("refs/bench/{}", p.label);
        if let Ok(c) = git(&self.repo, &["rev-parse", "--verify", "-q", &memo]) {
            return Ok(c);
        }
        let index = self.repo.join("bench-index");
        let _ = std::fs::remove_file(&index);
        let run = |args: &[&str]| -> Result<String> {
            let out = Command::new("git")
                .arg("--git-dir")
                .arg(&self.repo)
                .arg("--work-tree")
                .arg(&p.dir)
                .args(args)
                .env("GIT_INDEX_FILE", &index)
                .env("GIT_AUTHOR_NAME", "bench")
                .env("GIT_AUTHOR_EMAIL", "bench@localhost")
                .env("GIT_COMMITTER_NAME", "bench")
                .env("GIT_COMMITTER_EMAIL", "bench@localhost")
                .stdin(Stdio::null())
                .output()
                .context("running git")?;
            if !out.status.success() {
                bail!(
                    "git {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        run(&["add", "-A", "."])?;
        let tree = run(&["write-tree"])?;
        let msg = format!("payload {}", p.label);
        let mut args = vec!["commit-tree", tree.as_str(), "-m", msg.as_str()];
        if let Some(parent) = parent {
            args.extend(["-p", parent]);
        }
        let commit = run(&args)?;
        let _ = std::fs::remove_file(&index);
        git(&self.repo, &["update-ref", &memo, &commit])?;
        Ok(commit)
    }

    /// Makes `branches` (name, commit) the repository's only branches (what `git push`es to
    /// the server would do), so that a fresh mirror clones exactly their history.
    pub(crate) fn set_branches(&self, branches: &[(&str, &str)]) -> Result<()> {
        let heads = git(
            &self.repo,
            &["for-each-ref", "--format=%(refname)", "refs/heads/"],
        )?;
        for r in heads.lines() {
            let name = r.trim_start_matches("refs/heads/");
            if !branches.iter().any(|(b, _)| *b == name) {
                git(&self.repo, &["update-ref", "-d", r])?;
            }
        }
        for (name, commit) in branches {
            git(
                &self.repo,
                &["update-ref", &format!("refs/heads/{name}"), commit],
            )?;
        }
        Ok(())
    }

    /// Makes `main` the only branch, pointing at `commit`.
    pub(crate) fn set_main(&self, commit: &str) -> Result<()> {
        self.set_branches(&[("main", commit)])
    }

    /// `cap bench TASK` with `BRANCH=branch`, as a command to spawn (output piped).
    pub(crate) fn command(&self, task: &str, branch: &str) -> Command {
        // Capistrano names a release by the second its run started: never start two in one
        // second on the same hosts.
        loop {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if now > self.last_start.get() {
                self.last_start.set(now);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = Command::new("cap");
        c.arg("bench")
            .arg(task)
            .env("BRANCH", branch)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs `cap bench TASK` with `BRANCH=branch` to its exit. A failure is returned, not an
    /// error.
    pub(crate) fn run(&self, task: &str, branch: &str) -> Result<CapRun> {
        let out = self.command(task, branch).output().context("running cap")?;
        Ok(outcome(&out))
    }

    /// Like [`Cap::run`], but a failure is an error.
    pub(crate) fn run_ok(&self, task: &str, branch: &str) -> Result<()> {
        let r = self.run(task, branch)?;
        if !r.ok {
            bail!("cap bench {task} (BRANCH={branch}) failed: {}", r.message);
        }
        Ok(())
    }
}

/// A finished `cap` run's outcome.
pub(crate) fn outcome(out: &Output) -> CapRun {
    if out.status.success() {
        return CapRun {
            ok: true,
            message: String::new(),
        };
    }
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(6)..].join(" / ");
    CapRun {
        ok: false,
        message: format!("exit {}: {tail}", out.status),
    }
}

impl Drop for Cap {
    fn drop(&mut self) {
        // The daemon, by the pid it wrote (our own child's child); the watchdog then exits.
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if let Some(mut c) = self.daemon.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn git(repo: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow!("running git: {e}"))?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

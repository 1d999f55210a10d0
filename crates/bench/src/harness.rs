//! Driving the real thing, shared by the scenarios: building the `cutover` binary, writing
//! payload directories, a [`World`] (a testlab lab, a cutover config for its hosts, a data
//! dir) in which `cutover deploy`/`rollback` run as child processes and are timed from spawn
//! to exit, the "by hand" tar-over-ssh floor, and checks over HTTP that every host serves
//! what it should. The config mirrors `World::write_config` in
//! `crates/cutover/tests/files.rs`.

use crate::events::{self, Trace, Traced};
use crate::meter::{Meter, Sample};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testlab::{Lab, LabOptions};

/// Whether the bench itself was built with optimizations (`cargo run --release`): it then
/// builds and measures a release `cutover`; otherwise (`cargo run`, as CI does after the tests)
/// a dev-profile one, which CI has already built, so it builds one profile once.
pub(crate) const RELEASE: bool = !cfg!(debug_assertions);

/// Builds `cutover` with the bench's own profile (see [`RELEASE`]; a no-op when it is up to
/// date) and returns the path of the executable, as cargo reports it.
pub(crate) fn build_cutover(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build"];
    if RELEASE {
        args.push("--release");
    }
    args.extend(["-p", "cutover", "--bin", "cutover"]);
    let shown = format!("cargo {}", args.join(" "));
    eprintln!("[bench] {shown}");
    let mut build = Command::new(&cargo);
    // `cargo run` gave this process the bench's own CARGO_PKG_*, CARGO_MANIFEST_* etc.;
    // build scripts that watch those (ring's) would see them change and rebuild, with all
    // that depends on them, on every run, and again for the next plain `cargo build`.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    k,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
                )
        }) {
            build.env_remove(k);
        }
    }
    let out = build
        .args(&args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "cutover")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo build did not report the cutover executable"))
}

/// The `cutover` executable at `path` (`--cutover`), as an absolute path: the scenarios run it
/// from other directories. Fails with what is wrong if it is not an executable file.
pub(crate) fn given_cutover(path: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--cutover {}: no such executable", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--cutover {}: not an executable file", path.display());
    }
    eprintln!(
        "[bench] measuring {} (--cutover: not built)",
        path.display()
    );
    Ok(std::fs::canonicalize(path)?)
}

/// A directory to deploy: `files` files of `file_size` pseudo-random bytes in `data/`, plus
/// `index.html`, `version` (both say `label`) and `up` (the health check's target).
#[derive(Debug, Clone)]
pub(crate) struct Payload {
    pub(crate) dir: PathBuf,
    pub(crate) label: String,
    pub(crate) files: usize,
    pub(crate) file_size: usize,
}

impl Payload {
    pub(crate) fn create(
        dir: &Path,
        label: &str,
        files: usize,
        file_size: usize,
        seed: u64,
    ) -> Result<Payload> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        // splitmix64: fast, and its output is incompressible for gzip.
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; file_size];
        for k in 0..files {
            for chunk in buf.chunks_mut(8) {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let bytes = z.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let path = data.join(format!("f{k:04}.bin"));
            std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        }
        for (name, text) in [
            ("index.html", format!("{label}\n")),
            ("version", label.to_string()),
            ("up", "ok\n".to_string()),
        ] {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(Payload {
            dir: dir.to_path_buf(),
            label: label.to_string(),
            files,
            file_size,
        })
    }

    /// A copy of this payload in `dir` labelled `label` in which every 100th data file
    /// (`f0000.bin`, `f0100.bin`, ...: 1% of them, at least one) has new pseudo-random content
    /// of the same size; every other data file is byte for byte the same.
    pub(crate) fn one_percent_changed(
        &self,
        dir: &Path,
        label: &str,
        seed: u64,
    ) -> Result<Payload> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; self.file_size];
        for k in 0..self.files {
            let name = format!("f{k:04}.bin");
            let to = data.join(&name);
            if k % 100 == 0 {
                for chunk in buf.chunks_mut(8) {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    let bytes = z.to_le_bytes();
                    chunk.copy_from_slice(&bytes[..chunk.len()]);
                }
                std::fs::write(&to, &buf).with_context(|| format!("writing {}", to.display()))?;
            } else {
                std::fs::copy(self.dir.join("data").join(&name), &to)
                    .with_context(|| format!("copying to {}", to.display()))?;
            }
        }
        for (name, text) in [
            ("index.html", format!("{label}\n")),
            ("version", label.to_string()),
            ("up", "ok\n".to_string()),
        ] {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(Payload {
            dir: dir.to_path_buf(),
            label: label.to_string(),
            files: self.files,
            file_size: self.file_size,
        })
    }

    /// Data files that [`Payload::one_percent_changed`] changes.
    pub(crate) fn one_percent(&self) -> usize {
        self.files.div_ceil(100)
    }

    /// Bytes of the pseudo-random files (the small text files are not counted).
    pub(crate) fn bytes(&self) -> u64 {
        (self.files * self.file_size) as u64
    }
}

/// One timed run of `cutover` with `--json`.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) sample: Sample,
    pub(crate) json: Value,
}

impl Run {
    /// `uploaded_bytes` of every host.
    pub(crate) fn uploaded(&self) -> Vec<u64> {
        self.json["hosts"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|h| h["uploaded_bytes"].as_u64().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A deploy's steps, timed by its event stream ([`crate::events`]).
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub(crate) secs: f64,
    pub(crate) sample: Sample,
    pub(crate) trace: Trace,
    /// The outcome `--json` would print.
    pub(crate) outcome: Value,
}

impl Profile {
    /// Consecutive phases of the deploy as (name, seconds); they add up to its wall time.
    pub(crate) fn phases(&self) -> Vec<(&'static str, f64)> {
        self.trace.phases(self.secs)
    }

    /// Per host, seconds from its `stage start` to its `stage done`.
    pub(crate) fn stage_per_host(&self) -> Vec<f64> {
        self.trace.per_host("stage")
    }
}

const SITE_ROOT: &str = "/srv/site";
/// How long [`World::until_serves`] keeps polling after the command exited.
const GIVE_UP_AFTER_EXIT: Duration = Duration::from_secs(20);

/// A lab of hosts plus what cutover needs to deploy to them.
pub(crate) struct World<'m> {
    pub(crate) lab: Lab,
    meter: &'m Meter,
    cutover: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    data: PathBuf,
}

impl<'m> World<'m> {
    /// Starts a fresh lab of `hosts` hosts and writes the cutover config (`parallel = 16`).
    /// Root's `~/.bashrc` is hidden from the hosts' SSH sessions unless `ctx.host_bashrc`
    /// (testlab's [`LabOptions::root_bashrc`]).
    pub(crate) fn start(hosts: usize, ctx: &'m Ctx) -> Result<World<'m>> {
        World::start_with(hosts, ctx, false, 16)
    }

    /// Like [`World::start`], with testlab's light hosts (busybox instead of nginx) if
    /// `light`, and `[ssh] parallel = parallel`.
    pub(crate) fn start_with(
        hosts: usize,
        ctx: &'m Ctx,
        light: bool,
        parallel: usize,
    ) -> Result<World<'m>> {
        let t = Instant::now();
        let lab = Lab::try_start_with(LabOptions {
            hosts,
            site_root: SITE_ROOT.into(),
            light,
            root_bashrc: ctx.host_bashrc,
            ..LabOptions::default()
        })
        .map_err(|e| anyhow!("cannot start a testlab lab of {hosts} hosts: {e}"))?;
        eprintln!(
            "[bench] lab of {hosts} host(s) up in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(&dir)?;
        let hosts_toml = (0..lab.len())
            .map(|i| format!("{:?}", lab.destination(i)))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            r#"app = "site"
hosts = [{hosts_toml}]

[ssh]
known_hosts = {kh:?}
identity = {id:?}
connect_timeout = "5s"
parallel = {parallel}

[files]
root = {SITE_ROOT:?}

[health]
url = "http://127.0.0.1/up"
timeout = "2s"
interval = "100ms"
healthy_after = 2
give_up_after = "20s"
"#,
            kh = lab.known_hosts(),
            id = lab.identity(),
        );
        let config = dir.join("cutover.toml");
        std::fs::write(&config, text)?;
        Ok(World {
            data: dir.join("data-0"),
            lab,
            meter: &ctx.meter,
            cutover: ctx.cutover.clone(),
            dir,
            config,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.lab.len()
    }

    /// The meter timing this world's runs.
    pub(crate) fn meter(&self) -> &'m Meter {
        self.meter
    }

    /// Back to a first deploy: every host's site root emptied, a new, empty data dir (no
    /// history, no artifact store). Untimed; ends with `sync` so that writing back what
    /// earlier runs left in the page cache does not land in the next timing.
    pub(crate) fn reset(&mut self, tag: &str) -> Result<()> {
        for i in 0..self.len() {
            let site = self.lab.site_dir(i);
            if site.exists() {
                std::fs::remove_dir_all(&site)
                    .with_context(|| format!("emptying {}", site.display()))?;
            }
            std::fs::create_dir_all(&site)?;
        }
        if self.data.exists() {
            std::fs::remove_dir_all(&self.data)?;
        }
        self.data = self.dir.join(format!("data-{tag}"));
        sync();
        Ok(())
    }

    /// How cutover packed the artifacts in its store (the `packing` of each `<sha256>.json`
    /// summary: `gzip1` or `stored`), sorted and deduplicated.
    pub(crate) fn packings(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.data.join("artifacts"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".json") && !name.ends_with(".manifest.json")
            })
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| v["packing"].as_str().unwrap_or("not said").to_string())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The hosts' site root (cutover's `[files] root`, nginx serves its `current`).
    pub(crate) fn site_root(&self) -> &'static str {
        SITE_ROOT
    }

    /// `cutover ARGS -c <config> --data <data dir>`, stdin null.
    pub(crate) fn cutover(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cutover);
        c.args(args)
            .arg("-c")
            .arg(&self.config)
            .arg("--data")
            .arg(&self.data)
            .env_remove("CUTOVER_CRASH_AT")
            .stdin(Stdio::null());
        c
    }

    /// Sets `[ssh] parallel` in the config.
    pub(crate) fn set_parallel(&self, parallel: usize) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("parallel = ") {
                    format!("parallel = {parallel}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Runs cutover with `--json`, timed from spawn to exit; fails unless it exits 0 and says
    /// `succeeded`.
    pub(crate) fn timed(&self, args: &[&str]) -> Result<Run> {
        sync();
        let (out, sample) = self.meter.time(|| self.cutover(args).output());
        let out = out.context("running cutover")?;
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() || json["status"] != "succeeded" {
            bail!(
                "cutover {} exited with {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Run { sample, json })
    }

    /// `cutover deploy --json --artifact <payload>`, timed; then every host must serve it.
    pub(crate) fn deploy(&self, p: &Payload) -> Result<Run> {
        let dir = p.dir.display().to_string();
        let run = self.timed(&["deploy", "--json", "--artifact", &dir])?;
        self.verify_serves(&p.label)?;
        Ok(run)
    }

    /// A deploy with `--events`, its steps timed by their events, to see where the time
    /// goes. Not one of the samples of the tables.
    pub(crate) fn deploy_profiled(&self, p: &Payload) -> Result<Profile> {
        sync();
        let dir = p.dir.display().to_string();
        let (r, sample) = self
            .meter
            .time(|| events::run(self.cutover(&["deploy", "--artifact", &dir])));
        let r = r?;
        if !r.status.success() {
            bail!(
                "profiled deploy exited with {}: {}\n{}",
                r.status,
                r.message,
                r.stderr
            );
        }
        self.verify_serves(&p.label)?;
        Ok(Profile {
            secs: sample.secs,
            sample,
            trace: r.trace,
            outcome: r.outcome,
        })
    }

    /// `cutover deploy --events --artifact <payload>`: how it ended and its steps. A failed
    /// deploy is returned (`ok: false`), not an error: the switch scenarios report it.
    pub(crate) fn deploy_traced(&self, p: &Payload) -> Result<Traced> {
        let dir = p.dir.display().to_string();
        events::run(self.cutover(&["deploy", "--artifact", &dir]))
    }

    /// Whether every host answers `GET /version` with `label` right now.
    pub(crate) fn serves(&self, label: &str) -> bool {
        (0..self.len())
            .all(|i| http_get(self.lab.http_addr(i), "/version").is_ok_and(|b| b.trim() == label))
    }

    /// Bytes that crossed the hosts' veths so far (both directions, all hosts), from the
    /// root side's counters in `/sys/class/net/<veth>/statistics`.
    pub(crate) fn wire_bytes(&self) -> u64 {
        (0..self.len())
            .map(|i| {
                let dev = format!("/sys/class/net/tl{}h{i}a/statistics", self.lab.number());
                ["rx_bytes", "tx_bytes"]
                    .iter()
                    .map(|f| {
                        std::fs::read_to_string(format!("{dev}/{f}"))
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .unwrap_or(0)
                    })
                    .sum::<u64>()
            })
            .sum()
    }

    /// Spawns `cmd` (its stdout and stderr are collected) and polls every host's nginx
    /// (`GET /version`, every 10 ms) until all of them answer `label`: the [`Answer`] has
    /// the seconds from spawn to that moment and to the command's exit; the sample's wall
    /// time is the former, its CPU seconds cover the whole run. Gives up [`GIVE_UP_AFTER_EXIT`]
    /// after the command exited.
    pub(crate) fn until_serves(&self, mut cmd: Command, label: &str) -> Result<Answer> {
        sync();
        let (r, mut sample) = self.meter.time(|| -> Result<_> {
            let t = Instant::now();
            let child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning the command")?;
            let waiter = std::thread::spawn(move || {
                let out = child.wait_with_output();
                (out, t.elapsed().as_secs_f64())
            });
            let mut answered = None;
            let mut exited: Option<Instant> = None;
            loop {
                if answered.is_none() && self.serves(label) {
                    answered = Some(t.elapsed().as_secs_f64());
                }
                if waiter.is_finished() {
                    if answered.is_some() {
                        break;
                    }
                    if exited.get_or_insert_with(Instant::now).elapsed() > GIVE_UP_AFTER_EXIT {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let (out, exit) = waiter.join().map_err(|_| anyhow!("waiter panicked"))?;
            Ok((out.context("running the command")?, exit, answered))
        });
        let (out, exit_s, answered) = r?;
        let Some(answer_s) = answered else {
            bail!(
                "the hosts never served {label:?} (command exited with {} after {exit_s:.1} s): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sample.secs = answer_s;
        Ok(Answer {
            sample,
            exit_s,
            output: out,
        })
    }

    /// Every host answers `GET /version` over HTTP with `label`.
    pub(crate) fn verify_serves(&self, label: &str) -> Result<()> {
        for i in 0..self.len() {
            let body = http_get(self.lab.http_addr(i), "/version")
                .with_context(|| format!("GET /version on host {i}"))?;
            if body.trim() != label {
                bail!("host {i} serves {body:?}, expected {label:?}");
            }
        }
        Ok(())
    }

    /// Removes release `id` from every host (so a rollback to it must re-ship it).
    pub(crate) fn delete_release(&self, id: &str) -> Result<()> {
        for i in 0..self.len() {
            let d = self.lab.site_dir(i).join("releases").join(id);
            std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
        }
        sync();
        Ok(())
    }

    /// The ssh options cutover itself uses (see `crates/remote/src/ssh.rs`), without its
    /// control socket, so the system ssh_config applies to both alike.
    pub(crate) fn ssh_options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "UpdateHostKeys=no".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.lab.known_hosts().display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-i".into(),
            self.lab.identity().display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "ConnectTimeout=5".into(),
        ]
    }

    /// The rsync peer of a redeploy: first (untimed) a copy of each host's live release
    /// (`cp -a` of `/srv/site/current/.` into `/srv/rsync-copy`; the hosts' `/srv` is on this
    /// machine), then `rsync -a --delete -e 'ssh <cutover's options>' <payload>/
    /// <host>:/srv/rsync-copy/` for every host at once, timed from the first spawn to the last
    /// exit. Every host must then hold the payload's `version` there; the copies are removed
    /// afterwards (untimed).
    pub(crate) fn rsync(&self, p: &Payload) -> Result<Sample> {
        const COPY: &str = "rsync-copy";
        for i in 0..self.len() {
            let srv = self.lab.srv_dir(i);
            let copy = srv.join(COPY);
            let _ = std::fs::remove_dir_all(&copy);
            let st = Command::new("cp")
                .arg("-a")
                .arg(srv.join("site/current/."))
                .arg(&copy)
                .status()
                .context("running cp")?;
            if !st.success() {
                bail!("rsync peer: cannot copy host {i}'s live release ({st})");
            }
        }
        sync();
        let ssh = std::iter::once("ssh".to_string())
            .chain(self.ssh_options().into_iter().map(|o| {
                // The options hold only paths of the lab and plain words; quoted for rsync's
                // own splitting of `-e`.
                format!("'{}'", o.replace('\'', ""))
            }))
            .collect::<Vec<_>>()
            .join(" ");
        let mut src = p.dir.clone().into_os_string();
        src.push("/");
        let (errors, sample) = self.meter.time(|| -> Result<Vec<String>> {
            let mut children = Vec::new();
            for i in 0..self.len() {
                let child = Command::new("rsync")
                    .args(["-a", "--delete", "-e", &ssh])
                    .arg(&src)
                    .arg(format!("{}:/srv/{COPY}/", self.lab.destination(i)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("running rsync (Debian package rsync)")?;
                children.push(child);
            }
            let mut errors = Vec::new();
            for (i, child) in children.into_iter().enumerate() {
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    errors.push(format!(
                        "host {i}: rsync {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            Ok(errors)
        });
        let errors = errors?;
        if !errors.is_empty() {
            bail!("rsync peer failed:\n{}", errors.join("\n"));
        }
        for i in 0..self.len() {
            let v = self.lab.srv_dir(i).join(COPY).join("version");
            let got = std::fs::read_to_string(&v).unwrap_or_default();
            if got != p.label {
                bail!("rsync peer: host {i} holds {got:?} in {}", v.display());
            }
        }
        for i in 0..self.len() {
            let _ = std::fs::remove_dir_all(self.lab.srv_dir(i).join(COPY));
        }
        sync();
        Ok(sample)
    }

    /// The physical floor: `tar c[z]f - -C <payload> . | ssh <host> 'mkdir -p D && tar
    /// x[z]f - -C D'`, one pipeline per host, all started at once, with cutover's ssh options
    /// (same identity and known_hosts, strict host key checking). Timed from the first spawn
    /// to the last exit; every host must then hold the payload's `version` file. The copies
    /// are removed afterwards (untimed).
    pub(crate) fn floor(&self, p: &Payload, gzip: bool, tag: &str) -> Result<Sample> {
        self.floor_with(p, gzip, None, tag)
    }

    /// [`World::floor`] with `ssh -c cipher` when given.
    pub(crate) fn floor_with(
        &self,
        p: &Payload,
        gzip: bool,
        cipher: Option<&str>,
        tag: &str,
    ) -> Result<Sample> {
        sync();
        let dest = format!("/srv/floor/{tag}");
        let (c, x) = if gzip { ("czf", "xzf") } else { ("cf", "xf") };
        let remote = format!("mkdir -p {dest} && tar {x} - -C {dest}");
        let mut opts = self.ssh_options();
        if let Some(cipher) = cipher {
            opts.extend(["-c".to_string(), cipher.to_string()]);
        }
        let (errors, sample) = self.meter.time(|| -> Result<Vec<String>> {
            let mut pipes = Vec::new();
            for i in 0..self.len() {
                let mut tar = Command::new("tar")
                    .args([c, "-", "-C"])
                    .arg(&p.dir)
                    .arg(".")
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("running tar")?;
                let out = tar.stdout.take().ok_or_else(|| anyhow!("no tar stdout"))?;
                let ssh = Command::new("ssh")
                    .args(&opts)
                    .arg(self.lab.destination(i))
                    .arg(&remote)
                    .stdin(Stdio::from(out))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("running ssh")?;
                pipes.push((tar, ssh));
            }
            let mut errors = Vec::new();
            for (i, (mut tar, ssh)) in pipes.into_iter().enumerate() {
                let ts = tar.wait()?;
                let so = ssh.wait_with_output()?;
                if !ts.success() || !so.status.success() {
                    errors.push(format!(
                        "host {i}: tar {ts}, ssh {}: {}",
                        so.status,
                        String::from_utf8_lossy(&so.stderr).trim()
                    ));
                }
            }
            Ok(errors)
        });
        let errors = errors?;
        if !errors.is_empty() {
            bail!("floor failed:\n{}", errors.join("\n"));
        }
        for i in 0..self.len() {
            let v = self.lab.srv_dir(i).join("floor").join(tag).join("version");
            let got = std::fs::read_to_string(&v).unwrap_or_default();
            if got != p.label {
                bail!("floor: host {i} holds {got:?} in {}", v.display());
            }
        }
        for i in 0..self.len() {
            let _ = std::fs::remove_dir_all(self.lab.srv_dir(i).join("floor"));
        }
        sync();
        Ok(sample)
    }
}

/// A command timed until the hosts serve what it should ([`World::until_serves`]).
#[derive(Debug)]
pub(crate) struct Answer {
    /// Wall time from spawn until every host answered with the expected version.
    pub(crate) sample: Sample,
    /// Seconds from spawn to the command's exit.
    pub(crate) exit_s: f64,
    pub(crate) output: std::process::Output,
}

/// Flushes dirty pages so that one run's writeback does not slow the next.
fn sync() {
    let _ = Command::new("sync").status();
}

/// The body of `GET path` (HTTP/1.1, connection close); an error unless the status is 200.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("no status line"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_percent_changed_rewrites_every_100th_file_only() {
        let dir = std::env::temp_dir().join(format!("bench-payload-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Payload::create(&dir.join("a"), "a", 250, 4096, 1).unwrap();
        let c = a.one_percent_changed(&dir.join("c"), "c", 9).unwrap();
        assert_eq!(a.one_percent(), 3);
        let mut changed = Vec::new();
        for k in 0..a.files {
            let name = format!("data/f{k:04}.bin");
            let x = std::fs::read(a.dir.join(&name)).unwrap();
            let y = std::fs::read(c.dir.join(&name)).unwrap();
            assert_eq!(x.len(), y.len());
            if x != y {
                changed.push(k);
            }
        }
        assert_eq!(changed, vec![0, 100, 200]);
        assert_eq!(std::fs::read_to_string(c.dir.join("version")).unwrap(), "c");
        assert_eq!(c.bytes(), a.bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Shared by the container scenarios ([`crate::switch`], [`crate::proxy`]): a
//! [`DockerWorld`] (a testlab lab of one Docker host, the lab's registry holding two web
//! images, a cutover config for a container app behind cutover's edge proxy, `cutover setup`
//! done), ways to look at the host's processes (the proxy's pid, memory and CPU time; the
//! containers' CPU time), and a [`Ledger`] of timestamped requests from testlab's load
//! generator with the statistics the tables show. The config mirrors `World::write_config`
//! in `crates/cutover/tests/containers.rs`.

use crate::events::{self, Traced};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use testlab::{Lab, LabOptions, LoadReport};

/// Where cutover's edge proxy listens on the host (`[proxy] listen = "0.0.0.0:8000"`).
pub(crate) const PROXY_PORT: u16 = 8000;
/// `[proxy] install_dir`: the proxy's binary, control socket and state on the host.
const INSTALL_DIR: &str = "/srv/cutover";
/// The app's name in the config (containers are `web-<release>`).
const APP: &str = "web";

/// A lab of one Docker host with cutover's proxy installed and images `web:a` and `web:b`
/// (busybox httpd serving `a` or `b` at `/`, healthy at `/up`) in the lab's registry.
pub(crate) struct DockerWorld {
    pub(crate) lab: Lab,
    cutover: PathBuf,
    config: PathBuf,
    data: PathBuf,
    registry: String,
}

/// How one `cutover deploy` ended.
#[derive(Debug, Clone)]
pub(crate) struct Deploy {
    /// Exit 0 and `"status": "succeeded"`.
    pub(crate) ok: bool,
    /// cutover's one-line message (or its stderr when it printed no JSON).
    pub(crate) message: String,
}

/// Memory of a process on the host, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mem {
    pub(crate) rss_kib: u64,
    /// Peak RSS (`VmHWM`).
    pub(crate) hwm_kib: u64,
}

impl DockerWorld {
    /// Starts a lab of one host with Docker, builds and pushes `web:a` and `web:b`, writes
    /// the cutover config (blue-green) and runs `cutover setup`. Root's `~/.bashrc` is hidden
    /// from the host's SSH sessions unless `ctx.host_bashrc` (as in the other scenarios).
    pub(crate) fn start(ctx: &Ctx) -> Result<DockerWorld> {
        let t = Instant::now();
        let lab = Lab::try_start_with(LabOptions {
            hosts: 1,
            docker: true,
            root_bashrc: ctx.host_bashrc,
            ..LabOptions::default()
        })
        .map_err(|e| anyhow!("cannot start a testlab lab of 1 Docker host: {e}"))?;
        eprintln!(
            "[bench] lab of 1 Docker host up in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let registry = lab
            .registry()
            .ok_or_else(|| anyhow!("the lab has no registry"))?;
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(&dir)?;
        for tag in ["a", "b"] {
            lab.build_web_image(&format!("{APP}:{tag}"), &format!("{tag}\n"), true);
        }
        let w = DockerWorld {
            cutover: ctx.cutover.clone(),
            config: dir.join("cutover.toml"),
            data: dir.join("data"),
            lab,
            registry,
        };
        w.write_config("blue-green")?;
        w.setup()?;
        Ok(w)
    }

    /// `cutover setup --json` with the config as written; an error unless it exits 0.
    pub(crate) fn setup(&self) -> Result<()> {
        let out = self.cutover(&["setup", "--json"]).output()?;
        if !out.status.success() {
            bail!(
                "cutover setup exited with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Writes the config with `[container] strategy = STRATEGY` (`blue-green` or `hold`).
    pub(crate) fn write_config(&self, strategy: &str) -> Result<()> {
        self.write_config_with(strategy, "")
    }

    /// [`DockerWorld::write_config`] with `extra` appended (e.g. a `[deploy]` section).
    pub(crate) fn write_config_with(&self, strategy: &str, extra: &str) -> Result<()> {
        self.write_config_full(strategy, "", extra)
    }

    /// [`DockerWorld::write_config_with`] with `proxy` (lines ending in a newline, e.g.
    /// `tls = "files"`) added to `[proxy]`.
    pub(crate) fn write_config_full(&self, strategy: &str, proxy: &str, extra: &str) -> Result<()> {
        let text = format!(
            r#"app = "{APP}"
hosts = [{host:?}]

[ssh]
known_hosts = {kh:?}
identity = {id:?}
connect_timeout = "5s"

[container]
image = "{reg}/{APP}"
port = 8080
strategy = "{strategy}"
keep = 2
stop_timeout = "2s"

[proxy]
listen = "0.0.0.0:{PROXY_PORT}"
drain = "10s"
hold = "30s"
install_dir = "{INSTALL_DIR}"
{proxy}
[health]
path = "/up"
timeout = "1s"
interval = "100ms"
healthy_after = 2
give_up_after = "10s"
"#,
            host = self.lab.destination(0),
            kh = self.lab.known_hosts(),
            id = self.lab.identity(),
            reg = self.registry,
        ) + extra;
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
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

    /// `cutover deploy --json --image TAG`. A failed deploy is returned (`ok: false`), not an
    /// error: the scenarios report it.
    pub(crate) fn deploy(&self, tag: &str) -> Result<Deploy> {
        let out = self
            .cutover(&["deploy", "--json", "--image", tag])
            .output()
            .context("running cutover deploy")?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let ok = out.status.success() && v["status"] == "succeeded";
        let message = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        Ok(Deploy { ok, message })
    }

    /// `cutover deploy --events --image TAG`: how it ended and its steps. A failed deploy is
    /// returned (`ok: false`), not an error.
    pub(crate) fn deploy_traced(&self, tag: &str) -> Result<Traced> {
        events::run(self.cutover(&["deploy", "--image", tag]))
    }

    /// A deploy that must succeed (untimed preparation).
    pub(crate) fn deploy_ok(&self, tag: &str) -> Result<()> {
        let d = self.deploy(tag)?;
        if !d.ok {
            bail!("cutover deploy --image {tag} failed: {}", d.message);
        }
        Ok(())
    }

    /// cutover's edge proxy on the host, as clients reach it.
    pub(crate) fn proxy_addr(&self) -> SocketAddr {
        SocketAddr::new(self.lab.ip(0).into(), PROXY_PORT)
    }

    /// The full reference of `web:TAG` in the lab's registry.
    pub(crate) fn image(&self, tag: &str) -> String {
        self.lab.image_reference(&format!("{APP}:{tag}"))
    }

    /// Runs `command` on the host over SSH (a fresh connection, as an operator's `ssh host
    /// '...'`); an error unless it exits 0.
    pub(crate) fn ssh_ok(&self, command: &str) -> Result<Output> {
        let out = self.lab.ssh(0, command);
        if !out.status.success() {
            bail!(
                "ssh {:?} exited with {}: {}",
                command,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Runs `sh -c script` in the host's namespaces (no SSH); an error unless it exits 0.
    pub(crate) fn exec_ok(&self, script: &str) -> Result<String> {
        let out = self.lab.exec(0, script);
        if !out.status.success() {
            bail!(
                "{script:?} on the host exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `cutover proxy status --json` on the host.
    pub(crate) fn proxy_status(&self) -> Result<Value> {
        let out = self.ssh_ok(&format!(
            "{INSTALL_DIR}/cutover proxy status --dir {INSTALL_DIR} --json"
        ))?;
        serde_json::from_slice(&out.stdout).context("parsing cutover proxy status --json")
    }

    /// The pid of the `cutover proxy run` process (from `proxy status --json`).
    pub(crate) fn proxy_pid(&self) -> Result<u32> {
        let v = self.proxy_status()?;
        v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| anyhow!("proxy status has no pid: {v}"))
    }

    /// `VmRSS` and `VmHWM` of process `pid`, read from `/proc/<pid>/status` on the host.
    pub(crate) fn mem(&self, pid: u32) -> Result<Mem> {
        let text = self.exec_ok(&format!("cat /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
        };
        Ok(Mem {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// CPU seconds (user + system) process `pid` used so far, from `/proc/<pid>/stat`.
    pub(crate) fn cpu_s(&self, pid: u32) -> Result<f64> {
        let text = self.exec_ok(&format!("cat /proc/{pid}/stat"))?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let rest = text
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("bad /proc/{pid}/stat: {text}"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3, utime 14, stime 15.
        let ticks = |i: usize| -> Result<f64> {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| anyhow!("bad /proc/{pid}/stat: {text}"))
        };
        Ok((ticks(14)? + ticks(15)?) / 100.0)
    }

    /// CPU seconds used so far by every container of the host, from the cpuacct cgroup the
    /// lab puts them under (`--cgroup-parent /testlab-X-h0`). The bench's own cpuacct group
    /// does not hold them, so the meter counts them as "other processes" unless subtracted.
    pub(crate) fn containers_cpu_s(&self) -> Option<f64> {
        let path = format!(
            "/sys/fs/cgroup/cpuacct/testlab-{}-h0/cpuacct.usage",
            self.lab.number()
        );
        let ns: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        Some(ns as f64 / 1e9)
    }

    /// Runs `cutover ARGS --json` and times it: from spawn until `GET /` through the proxy
    /// answers `body` (polled every 10 ms, from a thread of its own), and until the command
    /// exits. Fails if the command fails or the body never comes (30 s).
    pub(crate) fn timed_until_serves(&self, args: &[&str], body: &str) -> Result<(f64, f64)> {
        let addr = self.proxy_addr();
        let want = body.to_string();
        let t = Instant::now();
        let child = self
            .cutover(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running cutover")?;
        let poller = std::thread::spawn(move || -> Option<f64> {
            while t.elapsed() < Duration::from_secs(30) {
                if matches!(http_get(addr), Ok(b) if b.trim() == want) {
                    return Some(t.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        let out = child.wait_with_output()?;
        let exited = t.elapsed().as_secs_f64();
        let served = poller
            .join()
            .map_err(|_| anyhow!("poller panicked"))?
            .ok_or_else(|| anyhow!("`cutover {}`: {addr} never served {body:?}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`cutover {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((served, exited))
    }

    /// Waits until `GET /` on `addr` answers 200 with `body` (up to `limit`).
    pub(crate) fn wait_serves(&self, addr: SocketAddr, body: &str, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            match http_get(addr) {
                Ok(b) if b.trim() == body => return Ok(()),
                r if t.elapsed() > limit => {
                    bail!("{addr} does not serve {body:?} after {limit:?}: {r:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// The dynamic loader and libraries of this machine's nginx (as `ldd` lists them).
fn nginx_libraries() -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(NGINX)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {NGINX} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect())
}

/// The nginx binary copied into [`DockerWorld::build_keepalive_image`].
const NGINX: &str = "/usr/sbin/nginx";

impl DockerWorld {
    /// Builds and pushes `web:TAG`: this machine's nginx (with the libraries `ldd` lists)
    /// serving `body` at `/` and `ok` at `/up` on port 8080, keeping connections open
    /// (`keepalive_requests` 1000000, no access log, one worker per core). Unlike busybox
    /// httpd, which closes every connection after one response, so that every request of
    /// a load costs a new TCP connection on each hop. The image's files are not executable
    /// (testlab's image builder marks only scripts executable), so its start script makes
    /// the loader and nginx executable first.
    pub(crate) fn build_keepalive_image(&self, tag: &str, body: &str) -> Result<()> {
        let mut owned: Vec<(String, Vec<u8>)> = Vec::new();
        let mut exec = vec![NGINX.to_string()];
        for lib in nginx_libraries()? {
            let data = std::fs::read(&lib).with_context(|| format!("reading {lib}"))?;
            exec.push(lib.clone());
            owned.push((lib, data));
        }
        let nginx = std::fs::read(NGINX).with_context(|| format!("reading {NGINX}"))?;
        owned.push((NGINX.to_string(), nginx));
        let conf = "\
daemon off;
user root;
worker_processes auto;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/html;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 8080;
        root /www;
        location = /up { return 200 \"ok\\n\"; }
    }
}
";
        let start = format!(
            "#!/bin/sh\nchmod 755 {}\nexec {NGINX} -c /etc/nginx/nginx.conf\n",
            exec.join(" ")
        );
        owned.push(("/etc/nginx/nginx.conf".into(), conf.as_bytes().to_vec()));
        owned.push(("/var/log/nginx/.keep".into(), Vec::new()));
        owned.push(("/www/index.html".into(), format!("{body}\n").into_bytes()));
        owned.push(("/start.sh".into(), start.into_bytes()));
        let files: Vec<(&str, &[u8])> = owned
            .iter()
            .map(|(p, d)| (p.as_str(), d.as_slice()))
            .collect();
        self.lab.build_image_with(
            &format!("{APP}:{tag}"),
            &files,
            &["CMD [\"/start.sh\"]", "EXPOSE 8080/tcp"],
        );
        Ok(())
    }
}

/// The body of `GET /` (HTTP/1.1, connection close); an error unless the status is 200.
pub(crate) fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    let (head, body) = b.split_once("\r\n\r\n").unwrap_or((&b, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or("no status line"));
    }
    Ok(body.to_string())
}

/// One request of a merged ledger, in seconds since the ledger's origin.
#[derive(Debug, Clone, Copy)]
struct Req {
    at: f64,
    latency: f64,
    ok: bool,
}

/// The requests of one or more recorded loads on one timeline.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    reqs: Vec<Req>,
    /// End of the measurement (the loads' stop), seconds since the origin.
    stop: f64,
}

/// Nearest-rank percentile (`q` in 0..=1) of sorted values; 0 for none.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Ledger {
    /// Puts the samples of `loads` (each with the instant its load started) on one timeline
    /// starting at `origin`; `stop` is when the loads were stopped.
    pub(crate) fn new(origin: Instant, loads: &[(Instant, &LoadReport)], stop: Instant) -> Ledger {
        let mut reqs = Vec::new();
        for (started, report) in loads {
            let offset = started.saturating_duration_since(origin).as_secs_f64();
            reqs.extend(report.samples.iter().map(|s| Req {
                at: offset + s.at.as_secs_f64(),
                latency: s.latency.as_secs_f64(),
                ok: s.ok,
            }));
        }
        reqs.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ledger {
            reqs,
            stop: stop.saturating_duration_since(origin).as_secs_f64(),
        }
    }

    pub(crate) fn requests(&self) -> usize {
        self.reqs.len()
    }

    pub(crate) fn failed(&self) -> usize {
        self.reqs.iter().filter(|r| !r.ok).count()
    }

    /// Sorted latencies of every request (`ok_only`: of the successful ones).
    fn latencies(&self, ok_only: bool) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .reqs
            .iter()
            .filter(|r| r.ok || !ok_only)
            .map(|r| r.latency)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Sorted latencies of the successful requests.
    pub(crate) fn ok_latencies(&self) -> Vec<f64> {
        self.latencies(true)
    }

    /// Percentile `q` of the latencies (`ok_only`: of successful requests only).
    pub(crate) fn latency(&self, q: f64, ok_only: bool) -> f64 {
        percentile(&self.latencies(ok_only), q)
    }

    /// The slowest request, successful or not.
    pub(crate) fn worst(&self) -> f64 {
        self.reqs.iter().map(|r| r.latency).fold(0.0, f64::max)
    }

    /// Ends of the successful requests, sorted, then the stop time.
    fn success_ends(&self) -> Vec<f64> {
        let mut ends: Vec<f64> = self
            .reqs
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.at + r.latency)
            .collect();
        ends.sort_by(f64::total_cmp);
        ends.push(self.stop.max(ends.last().copied().unwrap_or(0.0)));
        ends
    }

    /// The longest time with no successful response, as (seconds, start of the gap): between
    /// the ends of two consecutive successful requests, or between the last one and the stop.
    /// Counted from the first successful response; only gaps that start in `[from, to)`.
    pub(crate) fn longest_gap(&self, from: f64, to: f64) -> (f64, f64) {
        self.success_ends()
            .windows(2)
            .filter(|w| w[0] >= from && w[0] < to)
            .map(|w| (w[1] - w[0], w[0]))
            .fold((0.0, 0.0), |best, g| if g.0 > best.0 { g } else { best })
    }

    /// Requests started in `[from, to)` and how many of them failed.
    pub(crate) fn window(&self, from: f64, to: f64) -> (usize, usize) {
        let r: Vec<&Req> = self
            .reqs
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .collect();
        (r.len(), r.iter().filter(|r| !r.ok).count())
    }

    /// Sorted latencies of every request (successful or not) started in any of `windows`
    /// (each `[from, to)`, seconds since the origin; a request in two windows counts once).
    pub(crate) fn latencies_in(&self, windows: &[(f64, f64)]) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .reqs
            .iter()
            .filter(|r| windows.iter().any(|&(from, to)| r.at >= from && r.at < to))
            .map(|r| r.latency)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Successful and failed requests started in each `width`-second bucket from the origin
    /// to the stop: (bucket start, successful, failed).
    pub(crate) fn buckets(&self, width: f64) -> Vec<(f64, usize, usize)> {
        let end = self.stop.max(self.reqs.last().map(|r| r.at).unwrap_or(0.0));
        let n = ((end / width).ceil() as usize).max(1);
        let mut b: Vec<(f64, usize, usize)> = (0..n).map(|i| (i as f64 * width, 0, 0)).collect();
        for r in &self.reqs {
            let i = ((r.at.max(0.0) / width) as usize).min(n - 1);
            if r.ok {
                b[i].1 += 1;
            } else {
                b[i].2 += 1;
            }
        }
        b
    }

    /// Summary for the JSON.
    pub(crate) fn to_json(&self) -> Value {
        let ok = self.latencies(true);
        let all = self.latencies(false);
        json!({
            "requests": self.requests(),
            "failed": self.failed(),
            "duration_s": self.stop,
            "latency_all_s": {
                "p50": percentile(&all, 0.5),
                "p99": percentile(&all, 0.99),
                "p999": percentile(&all, 0.999),
                "max": self.worst(),
            },
            "latency_ok_s": {
                "p50": percentile(&ok, 0.5),
                "p99": percentile(&ok, 0.99),
                "max": ok.last().copied().unwrap_or(0.0),
            },
            "longest_gap_s": self.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0,
        })
    }
}

/// Milliseconds, with one decimal below 10 ms.
pub(crate) fn ms(secs: f64) -> String {
    let m = secs * 1000.0;
    if m < 10.0 {
        format!("{m:.1} ms")
    } else {
        format!("{m:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testlab::RequestSample;

    fn sample(at_ms: u64, lat_ms: u64, ok: bool) -> RequestSample {
        RequestSample {
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(lat_ms),
            ok,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn ledgers_merge_loads_and_find_gaps() {
        let t0 = Instant::now();
        let a = LoadReport {
            samples: vec![
                sample(0, 10, true),
                sample(20, 5, false),
                sample(30, 10, true),
            ],
            ..LoadReport::default()
        };
        let b = LoadReport {
            samples: vec![sample(0, 5, true), sample(100, 10, true)],
            ..LoadReport::default()
        };
        let l = Ledger::new(
            t0,
            &[(t0, &a), (t0 + Duration::from_millis(50), &b)],
            t0 + Duration::from_millis(400),
        );
        assert_eq!((l.requests(), l.failed()), (5, 1));
        // Successes end at 10, 40, 55 and 160 ms; then the stop at 400 ms.
        let (gap, at) = l.longest_gap(f64::NEG_INFINITY, f64::INFINITY);
        assert!((gap - 0.240).abs() < 1e-9 && (at - 0.160).abs() < 1e-9);
        let (gap, at) = l.longest_gap(0.0, 0.1);
        assert!((gap - 0.105).abs() < 1e-9 && (at - 0.055).abs() < 1e-9);
        assert_eq!(l.window(0.015, 0.06), (3, 1));
        assert!((l.worst() - 0.010).abs() < 1e-9);
        // Started at 0 (a, b), 20 (failed), 30, 50 and 150 ms.
        assert_eq!(
            l.latencies_in(&[(0.015, 0.035), (0.03, 0.06)]),
            vec![0.005, 0.005, 0.010]
        );
        let b = l.buckets(0.1);
        assert_eq!(b.len(), 4);
        assert_eq!((b[0].1, b[0].2, b[1].1, b[3].1), (3, 1, 1, 0));
        assert_eq!(ms(0.0042), "4.2 ms");
        assert_eq!(ms(0.25), "250 ms");
    }
}

//! `proxy`: what cutover's edge proxy costs. The same container (deployed by cutover) gets
//! the same keep-alive load for a fixed time through the proxy and directly, for requests per
//! second and latency percentiles, and the proxy process's memory is read idle and right after
//! the load.

use crate::containers::{ms, percentile, DockerWorld, Ledger, Mem};
use crate::machine::loadavg;
use crate::meter::{Sample, MAX_REDOS};
use crate::report::{self, spread, Section};
use crate::Ctx;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testlab::{Load, LoadOptions};

pub(crate) const HOW_TO_READ: &str = "\
one testlab host with its own dockerd and cutover's edge proxy installed by `cutover setup` \
(host port 8000). The backend is one container deployed by `cutover deploy --image keepalive`: \
an image holding this machine's nginx (with its libraries) that serves a 10-byte page at `/`, \
keeps connections open and logs nothing (busybox httpd, the `switch` scenario's server, closes \
every connection after one response, so each request would cost a new TCP connection on every \
hop and the numbers would measure TCP setup and TIME_WAIT exhaustion of this machine's single \
client address, not the proxy). cutover publishes the container on a loopback port of the host \
only (`127.0.0.1:P`, which Docker serves with its userland `docker-proxy`), and its proxy \
forwards there over pooled keep-alive connections. The same container is loaded three ways from \
this machine's root namespace (the host's clients): *through cutover's proxy* (host:8000 → \
cutover proxy → 127.0.0.1:P → docker-proxy → container), *direct to the published port* \
(host:9000, which an iptables DNAT rule in the host's namespace rewrites to 127.0.0.1:P, with \
`route_localnet` on there: the proxy's path without the proxy), and *direct to the container* \
(host:9001, DNAT to the container's address on the host's bridge: kernel NAT only, the path \
`docker run -p` gives outside clients). The load is testlab's load generator with 8 keep-alive \
workers and no pause between requests, for 10 s (3 s with `--quick`), on each path in turn; \
this is repeated for every run of the cell (`--reps`, 3 by default, 1 with `--quick`), the \
order of the paths rotating; the bench waits for an idle machine before each load and redoes \
a load (up to twice per path) during which other processes took over a quarter of the CPU. \
*requests/s* is successful requests over the load's duration, median (min–max) of the runs; \
*p50* and *p99* are over the successful requests of all runs. *proxy CPU* is the user + \
system CPU time of the `cutover proxy run` process (`/proc/<pid>/stat`) during the loads, per \
1000 requests; *all CPU* is the CPU time of every process involved (load generator, proxy, \
docker-proxy, container) per 1000 requests. Everything, the load generator included, shares \
the machine's 2 cores, so requests/s is what the whole path sustains on 2 cores, not what the \
proxy alone could do. Memory is `VmRSS` from `/proc/<pid>/status` of the `cutover proxy run` \
process (its pid from `cutover proxy status --json`), read after the deploy with no client \
load yet (*idle*) and right after each load through the proxy ends (the largest of those \
reads); *peak* is the largest of these and the process's `VmHWM` at the end.";

/// Keep-alive workers.
const WORKERS: usize = 8;
/// The backend: nginx keeping connections open (see [`DockerWorld::build_keepalive_image`]).
const TAG: &str = "keepalive";
const BODY: &str = "keepalive";
/// Host ports that DNAT rules send to the published port and to the container.
const PUBLISHED_PORT: u16 = 9000;
const CONTAINER_PORT: u16 = 9001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Proxy,
    Published,
    Container,
}

const PATHS: [Path; 3] = [Path::Proxy, Path::Published, Path::Container];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Proxy => "through cutover's proxy",
            Path::Published => "direct to the published port (docker-proxy)",
            Path::Container => "direct to the container (kernel NAT)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::Proxy => "proxy",
            Path::Published => "published-port",
            Path::Container => "container",
        }
    }
}

/// One load on one path.
struct Round {
    path: Path,
    ledger: Ledger,
    secs: f64,
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    sample: Sample,
    containers_cpu_s: f64,
    proxy_cpu_s: f64,
}

impl Round {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    /// Other processes' CPU seconds during the load, without the host's container (which
    /// the bench's cgroup does not hold).
    fn foreign_cpu_s(&self) -> f64 {
        (self.sample.foreign_cpu_s - self.containers_cpu_s).max(0.0)
    }

    /// Whether other processes used more than a quarter of the machine during the load
    /// (the bench's rule for redoing a run, see `meter`).
    fn disturbed(&self, cores: usize) -> bool {
        self.foreign_cpu_s() > 0.25 * self.sample.secs * cores.max(1) as f64
    }
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let duration = if ctx.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = Instant::now();

    let world = DockerWorld::start(ctx)?;
    world.build_keepalive_image(TAG, BODY)?;
    world.deploy_ok(TAG)?;
    let status = world.proxy_status()?;
    let pid = status["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| anyhow!("proxy status has no pid: {status}"))?;
    let target = status["services"][0]["target"]
        .as_str()
        .ok_or_else(|| anyhow!("proxy status has no target: {status}"))?
        .to_string();
    let port = target
        .strip_prefix("127.0.0.1:")
        .ok_or_else(|| anyhow!("the proxy's target {target} is not on 127.0.0.1"))?;
    let container_ip = container_ip(&world, port)?;
    let ip = world.lab.ip(0);
    // In the host's own network namespace only (route_localnet lets the DNAT to 127.0.0.1
    // work).
    world.exec_ok(&format!(
        "sysctl -qw net.ipv4.conf.all.route_localnet=1 && \
         iptables -t nat -I PREROUTING 1 -d {ip}/32 -p tcp --dport {PUBLISHED_PORT} \
           -j DNAT --to-destination 127.0.0.1:{port} && \
         iptables -t nat -I PREROUTING 1 -d {ip}/32 -p tcp --dport {CONTAINER_PORT} \
           -j DNAT --to-destination {container_ip}:8080"
    ))?;
    let addr = |p: Path| match p {
        Path::Proxy => world.proxy_addr(),
        Path::Published => SocketAddr::new(ip.into(), PUBLISHED_PORT),
        Path::Container => SocketAddr::new(ip.into(), CONTAINER_PORT),
    };
    for p in PATHS {
        world.wait_serves(addr(p), BODY, Duration::from_secs(5))?;
    }
    eprintln!(
        "[proxy] proxy pid {pid}, target {target}, container {container_ip}:8080; {} s per load",
        duration.as_secs()
    );
    // Let the deploy's own traffic settle, then read the idle proxy's memory.
    std::thread::sleep(Duration::from_secs(1));
    let idle = world.mem(pid)?;

    let mut rounds = Vec::new();
    let mut after_load: Vec<Mem> = Vec::new();
    let mut discarded: Vec<Round> = Vec::new();
    for rep in 0..ctx.reps {
        for j in 0..PATHS.len() {
            let path = PATHS[(rep + j) % PATHS.len()];
            loop {
                let round = load(ctx, &world, pid, path, addr(path), duration)?;
                if path == Path::Proxy {
                    after_load.push(world.mem(pid)?);
                }
                eprintln!(
                    "[proxy] run {}/{} {}: {:.0} requests/s, p99 {}, {} failed; other processes {:.1} CPU-s",
                    rep + 1,
                    ctx.reps,
                    path.name(),
                    round.rps(),
                    ms(round.ledger.latency(0.99, true)),
                    round.failed,
                    round.foreign_cpu_s()
                );
                let redone = discarded.iter().filter(|r| r.path == path).count();
                if round.disturbed(ctx.machine.cores) && redone < MAX_REDOS {
                    eprintln!("[proxy] other processes took over a quarter of the CPU during that load: doing it again");
                    discarded.push(round);
                    continue;
                }
                rounds.push(round);
                break;
            }
        }
    }
    let end = world.mem(pid)?;
    if world.proxy_pid()? != pid {
        bail!("the proxy process changed during the scenario");
    }
    let load_after = loadavg();
    drop(world);

    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str("\n\n");
    let rows: Vec<Vec<String>> = PATHS
        .iter()
        .map(|&p| {
            let rs: Vec<&Round> = rounds.iter().filter(|r| r.path == p).collect();
            let mut lat: Vec<f64> = Vec::new();
            let mut requests = 0u64;
            for r in &rs {
                lat.extend(r.ledger.ok_latencies());
                requests += r.ok + r.failed;
            }
            lat.sort_by(f64::total_cmp);
            let (med, min, max) = spread(&rs.iter().map(|r| r.rps()).collect::<Vec<_>>());
            let rps = if rs.len() > 1 {
                format!("{med:.0} ({min:.0}–{max:.0})")
            } else {
                format!("{med:.0}")
            };
            let per_k = |cpu: f64| {
                if requests == 0 {
                    "–".to_string()
                } else {
                    format!("{:.2} s", 1000.0 * cpu / requests as f64)
                }
            };
            let proxy_cpu: f64 = rs.iter().map(|r| r.proxy_cpu_s).sum();
            let all_cpu: Option<f64> = rs
                .iter()
                .map(|r| r.sample.cpu_s.map(|c| c + r.containers_cpu_s))
                .sum();
            vec![
                p.name().to_string(),
                rps,
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                rs.iter().map(|r| r.failed).sum::<u64>().to_string(),
                per_k(proxy_cpu),
                all_cpu.map(per_k).unwrap_or_else(|| "–".into()),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "path",
            "requests/s",
            "p50 latency",
            "p99 latency",
            "failed",
            "proxy CPU per 1000 requests",
            "all CPU per 1000 requests",
        ],
        &rows,
    ));
    let rss_after = after_load.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    // VmHWM is updated lazily by the kernel, so an RSS read earlier can exceed it.
    let peak = end.hwm_kib.max(rss_after).max(idle.rss_kib);
    md.push_str("\nMemory of the `cutover proxy run` process:\n\n");
    md.push_str(&report::table(
        &["RSS idle", "RSS right after the load", "peak RSS"],
        &[vec![kib(idle.rss_kib), kib(rss_after), kib(peak)]],
    ));
    md.push('\n');
    let failures: Vec<&String> = rounds.iter().flat_map(|r| r.failures.iter()).collect();
    if !failures.is_empty() {
        md.push_str(&format!(
            "First failures: {}.\n\n",
            failures
                .iter()
                .take(5)
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let cores = ctx.machine.cores.max(1) as f64;
    let (foreign, wall) = rounds.iter().fold((0.0, 0.0), |(f, w), r| {
        (f + r.foreign_cpu_s(), w + r.sample.secs)
    });
    let waited = rounds.iter().map(|r| r.sample.waited_s).fold(0.0, f64::max);
    md.push_str(&format!(
        "Before each load the bench waited for an idle machine (up to 20 s; longest wait here \
         {waited:.1} s); during the loads, processes outside the bench and its lab (other work \
         on this shared machine) used {:.0}% of the machine's CPU time. Loads redone because \
         other processes took over a quarter of the CPU during them: {} (in the JSON under \
         `discarded`).\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
        discarded.len()
    ));

    let json = json!({
        "scenario": "proxy",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
        "load": {
            "keep_alive_workers": WORKERS,
            "pause_s": 0.0,
            "duration_s": duration.as_secs_f64(),
        },
        "proxy_target": target,
        "container": format!("{container_ip}:8080"),
        "proxy_memory_kib": {
            "idle_rss": idle.rss_kib,
            "rss_after_each_proxy_load": after_load.iter().map(|m| m.rss_kib).collect::<Vec<_>>(),
            "peak_rss_at_end": end.hwm_kib,
            "rss_at_end": end.rss_kib,
        },
        "runs": rounds.iter().map(round_json).collect::<Vec<_>>(),
        "discarded": discarded.iter().map(round_json).collect::<Vec<_>>(),
    });
    Ok(Section { markdown: md, json })
}

/// One timed load of `duration` on `addr`.
fn load(
    ctx: &Ctx,
    world: &DockerWorld,
    pid: u32,
    path: Path,
    addr: SocketAddr,
    duration: Duration,
) -> Result<Round> {
    let (r, sample) = ctx.meter.time(|| -> Result<_> {
        let c0 = world.containers_cpu_s();
        let p0 = world.cpu_s(pid)?;
        let l = Load::start(LoadOptions {
            workers_per_target: WORKERS,
            keep_alive: true,
            pause: Duration::ZERO,
            record: true,
            ..LoadOptions::new(vec![addr])
        });
        std::thread::sleep(duration);
        let started = l.started();
        let report = l.stop();
        let stop = Instant::now();
        let p1 = world.cpu_s(pid)?;
        let c1 = world.containers_cpu_s();
        Ok((
            report,
            started,
            stop,
            p1 - p0,
            c0.zip(c1).map(|(a, b)| b - a),
        ))
    });
    let (report, started, stop, proxy_cpu_s, containers) = r?;
    Ok(Round {
        path,
        ledger: Ledger::new(started, &[(started, &report)], stop),
        secs: report.elapsed.as_secs_f64(),
        ok: report.ok,
        failed: report.failed,
        failures: report.failures.clone(),
        sample,
        containers_cpu_s: containers.unwrap_or(0.0),
        proxy_cpu_s,
    })
}

/// The address (on the host's bridge) of the running container published on
/// `127.0.0.1:port`.
fn container_ip(world: &DockerWorld, port: &str) -> Result<String> {
    let out = world.ssh_ok(
        "for c in $(docker ps -q); do docker inspect -f \
         '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} \
          {{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostPort}} {{end}}{{end}}' $c; done",
    )?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let ip = w.next()?;
            w.any(|p| p == port).then(|| ip.to_string())
        })
        .ok_or_else(|| anyhow!("no running container publishes port {port}: {text}"))
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

fn round_json(r: &Round) -> Value {
    json!({
        "path": r.path.key(),
        "duration_s": r.secs,
        "ok": r.ok,
        "failed": r.failed,
        "requests_per_s": r.rps(),
        "latency": r.ledger.to_json(),
        "proxy_cpu_s": r.proxy_cpu_s,
        "containers_cpu_s": r.containers_cpu_s,
        "run": r.sample.to_json(),
        "failures": r.failures,
    })
}

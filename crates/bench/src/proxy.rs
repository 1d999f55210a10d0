//! `proxy`: what cutover's edge proxy costs, next to nginx and Caddy. The same container
//! (deployed by cutover) gets the same keep-alive load for a fixed time through cutover's
//! proxy, through nginx, through Caddy and directly, for requests per second and latency
//! percentiles, and each proxy's memory is read idle and right after the loads.

use crate::containers::{ms, percentile, DockerWorld, Ledger, Mem};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::peers::{self, Kind, Peer};
use crate::report::{self, spread, Paired, Section};
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
forwards there over pooled keep-alive connections. The same container is loaded five ways from \
this machine's root namespace (the host's clients): *through cutover's proxy* (host:8000 → \
cutover proxy → 127.0.0.1:P → docker-proxy → container), *through nginx* (Debian's nginx \
in the host's network namespace on host:8100, its own master, one worker per core, an access \
log as cutover's proxy keeps (a line per request, written in batches: `access_log ... combined \
buffer=64k flush=1s`), `proxy_pass` to `upstream { server 127.0.0.1:P; keepalive 32; }` with \
`proxy_http_version 1.1` and an empty `Connection` header, so it keeps connections to the \
upstream open as cutover's proxy does), *through Caddy* (Debian's `caddy run` with a JSON \
config, host:8200, one route with `reverse_proxy` to 127.0.0.1:P, Caddy's defaults (no \
access log), which keep upstream connections open), *direct to the published port* \
(host:9000, which an iptables DNAT rule in the host's namespace rewrites to 127.0.0.1:P, with \
`route_localnet` on there: the proxy's path without the proxy), and *direct to the container* \
(host:9001, DNAT to the container's address on the host's bridge: kernel NAT only, the path \
`docker run -p` gives outside clients). The load is testlab's load generator with 8 keep-alive \
workers and no pause between requests, for 10 s (3 s with `--quick`), on each path in turn; \
this is repeated for every run of the cell (`--reps`, 3 by default, 1 with `--quick`), the \
order of the paths rotating; the bench waits for an idle machine before each load and redoes \
a load (up to twice per path) during which other processes took over a quarter of the CPU. \
*requests/s* is successful requests over the load's duration, median (min–max) of the runs; \
*cutover / nginx, run by run* divides cutover's requests/s and p99 by nginx's in the same run \
(loads seconds apart, where the machine's speed drifts by tens of percent within an hour), \
gives the median (min–max) of those ratios and in how many runs cutover was ahead (or its \
p99 no worse), and the goal's verdict reads those medians; \
*p50* and *p99* are over the successful requests of all runs. *proxy CPU* is the user + \
system CPU time of the path's proxy (`/proc/<pid>/stat` of the `cutover proxy run` process, of \
nginx's master and workers, of Caddy) during the loads, per 1000 requests; *all CPU* is \
the CPU time of every process involved (load generator, proxy, docker-proxy, container) per \
1000 requests. Everything, the load generator included, shares \
the machine's 2 cores, so requests/s is what the whole path sustains on 2 cores, not what the \
proxy alone could do. Memory is `VmRSS` from `/proc/<pid>/status` of each proxy's processes \
(cutover's from `cutover proxy status --json`; nginx's master and workers summed, so pages \
they share count more than once), read before any load (*idle*) and right after each load \
through that proxy ends (the largest of those reads); *peak* is the largest of these and the \
processes' `VmHWM` at the end. Plots: `proxy-requests.svg` (requests/s per path) and \
`proxy-latency.svg` (p50 and p99).";

/// Keep-alive workers.
const WORKERS: usize = 8;
/// The backend: nginx keeping connections open (see [`DockerWorld::build_keepalive_image`]).
const TAG: &str = "keepalive";
const BODY: &str = "keepalive";
/// Host ports that DNAT rules send to the published port and to the container.
const PUBLISHED_PORT: u16 = 9000;
const CONTAINER_PORT: u16 = 9001;
/// Where nginx and Caddy listen on the host.
const NGINX_PORT: u16 = 8100;
const CADDY_PORT: u16 = 8200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Proxy,
    Nginx,
    Caddy,
    Published,
    Container,
}

const PATHS: [Path; 5] = [
    Path::Proxy,
    Path::Nginx,
    Path::Caddy,
    Path::Published,
    Path::Container,
];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Proxy => "through cutover's proxy",
            Path::Nginx => "through nginx (reverse proxy)",
            Path::Caddy => "through Caddy (reverse_proxy)",
            Path::Published => "direct to the published port (docker-proxy)",
            Path::Container => "direct to the container (kernel NAT)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::Proxy => "proxy",
            Path::Nginx => "nginx",
            Path::Caddy => "caddy",
            Path::Published => "published-port",
            Path::Container => "container",
        }
    }
}

/// One load on one path.
struct Round {
    path: Path,
    /// The run (`0..reps`) this load belongs to: in each run every path takes one load.
    rep: usize,
    ledger: Ledger,
    /// Latencies of the successful requests, in microseconds (the load generator's
    /// hdrhistogram).
    ok_us: hdrhistogram::Histogram<u64>,
    secs: f64,
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    sample: Sample,
    containers_cpu_s: f64,
    /// CPU seconds of the path's proxy processes (none on the direct paths).
    proxy_cpu_s: Option<f64>,
}

impl Round {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    /// The 99th percentile of the successful requests' latency, in seconds.
    fn p99_s(&self) -> f64 {
        if self.ok_us.is_empty() {
            f64::NAN
        } else {
            self.ok_us.value_at_quantile(0.99) as f64 / 1e6
        }
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

    let lab = Lab::start(ctx)?;
    eprintln!(
        "[proxy] cutover proxy pid {}, nginx pids {:?}, caddy pid {}, target {}, \
         container {}:8080; {} s per load",
        lab.pid,
        lab.nginx.pids(),
        lab.caddy.pid(),
        lab.target,
        lab.container_ip,
        duration.as_secs()
    );
    // Let the deploy's own traffic settle, then read the idle proxies' memory.
    std::thread::sleep(Duration::from_secs(1));
    let mut memory: Vec<ProxyMemory> = Vec::new();
    for p in PROXIES {
        memory.push(ProxyMemory {
            path: p,
            idle: mem_sum(&lab.world, &lab.pids(p))?,
            after_load: Vec::new(),
            end: Mem {
                rss_kib: 0,
                hwm_kib: 0,
            },
        });
    }
    let (rounds, discarded) = load_paths(ctx, &lab, duration, &mut memory)?;
    for m in &mut memory {
        m.end = mem_sum(&lab.world, &lab.pids(m.path))?;
    }
    if lab.world.proxy_pid()? != lab.pid {
        bail!("the proxy process changed during the scenario");
    }
    let load_after = loadavg();
    let (target, container) = (lab.target.clone(), format!("{}:8080", lab.container_ip));
    drop(lab);

    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str("\n\n");
    md.push_str(&markdown(ctx, &rounds, &discarded, &memory));
    let rest = json!({
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "load": {
            "keep_alive_workers": WORKERS,
            "pause_s": 0.0,
            "duration_s": duration.as_secs_f64(),
        },
        "proxy_target": target,
        "container": container,
        "proxy_memory_kib": memory
            .iter()
            .map(|m| (m.path.key().to_string(), m.to_json()))
            .collect::<serde_json::Map<_, _>>(),
        "plots": plots(&rounds),
        "runs": rounds.iter().map(round_json).collect::<Vec<_>>(),
        "discarded": discarded.iter().map(round_json).collect::<Vec<_>>(),
    });
    let json = report::scenario_json(ctx, "proxy", &started, &load_before, &load_after, rest);
    Ok(Section { markdown: md, json })
}

/// The scenario's lab: one host with cutover's proxy in front of the deployed container, the
/// DNAT rules of the two direct paths, and nginx and Caddy in the host's network namespace in
/// front of the same published port. Dropped in field order: the peers before the world.
struct Lab {
    nginx: Peer,
    caddy: Peer,
    world: DockerWorld,
    /// cutover's proxy process.
    pid: u32,
    /// The proxy's target: the container's published port on the host's loopback.
    target: String,
    container_ip: String,
    /// The host's address, as the clients reach it.
    ip: std::net::Ipv4Addr,
}

impl Lab {
    fn start(ctx: &Ctx) -> Result<Lab> {
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
        // nginx and Caddy in the host's network namespace, in front of the same published port.
        let upstream: u16 = port
            .parse()
            .map_err(|_| anyhow!("bad port in the proxy's target {target}"))?;
        let nginx = Peer::start(&world.lab, 0, Kind::Nginx, NGINX_PORT, upstream)?;
        let caddy = Peer::start(&world.lab, 0, Kind::Caddy, CADDY_PORT, upstream)?;
        let lab = Lab {
            nginx,
            caddy,
            world,
            pid,
            target,
            container_ip,
            ip,
        };
        for p in PATHS {
            lab.world
                .wait_serves(lab.addr(p), BODY, Duration::from_secs(5))?;
        }
        Ok(lab)
    }

    /// Where the load of path `p` goes.
    fn addr(&self, p: Path) -> SocketAddr {
        match p {
            Path::Proxy => self.world.proxy_addr(),
            Path::Nginx => self.nginx.addr(),
            Path::Caddy => self.caddy.addr(),
            Path::Published => SocketAddr::new(self.ip.into(), PUBLISHED_PORT),
            Path::Container => SocketAddr::new(self.ip.into(), CONTAINER_PORT),
        }
    }

    /// The processes of path `p`'s proxy (nginx: master and workers, once they run).
    fn pids(&self, p: Path) -> Vec<u32> {
        match p {
            Path::Proxy => vec![self.pid],
            Path::Nginx => self.nginx.pids(),
            Path::Caddy => self.caddy.pids(),
            Path::Published | Path::Container => Vec::new(),
        }
    }
}

/// Every run's load on every path (the order of the paths rotating from run to run), each
/// redone (at most `ctx.max_redos()` times per path) when other processes took over a quarter
/// of the CPU during it; the proxies' memory is read after each load. The kept loads, and the
/// redone ones.
fn load_paths(
    ctx: &Ctx,
    lab: &Lab,
    duration: Duration,
    memory: &mut [ProxyMemory],
) -> Result<(Vec<Round>, Vec<Round>)> {
    let mut rounds = Vec::new();
    let mut discarded: Vec<Round> = Vec::new();
    for rep in 0..ctx.reps {
        for j in 0..PATHS.len() {
            let path = PATHS[(rep + j) % PATHS.len()];
            loop {
                let round = load(
                    ctx,
                    &lab.world,
                    &lab.pids(path),
                    (path, rep),
                    lab.addr(path),
                    duration,
                )?;
                if let Some(m) = memory.iter_mut().find(|m| m.path == path) {
                    m.after_load.push(mem_sum(&lab.world, &lab.pids(path))?);
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
                if round.disturbed(ctx.machine.cores) && redone < ctx.max_redos() {
                    eprintln!("[proxy] other processes took over a quarter of the CPU during that load: doing it again");
                    discarded.push(round);
                    continue;
                }
                rounds.push(round);
                break;
            }
        }
    }
    Ok((rounds, discarded))
}

/// The section's text after its measured line: the paths' table, the goal, the proxies'
/// memory, the first failures and how busy the machine was.
fn markdown(ctx: &Ctx, rounds: &[Round], discarded: &[Round], memory: &[ProxyMemory]) -> String {
    let mut md = paths_table(rounds);
    md.push_str(&goal_line(rounds));
    md.push_str(&format!(
        "\nPeers: {}. Memory of each proxy (nginx: master and workers together):\n\n",
        peers::versions_line(&ctx.machine)
    ));
    let rows: Vec<Vec<String>> = memory
        .iter()
        .map(|m| {
            vec![
                m.name().to_string(),
                kib(m.idle.rss_kib),
                kib(m.rss_after()),
                kib(m.peak()),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &["proxy", "RSS idle", "RSS right after the load", "peak RSS"],
        &rows,
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
    md
}

/// One timed load of `duration` on `addr`; `pids` are the path's proxy processes.
fn load(
    ctx: &Ctx,
    world: &DockerWorld,
    pids: &[u32],
    (path, rep): (Path, usize),
    addr: SocketAddr,
    duration: Duration,
) -> Result<Round> {
    let (r, sample) = ctx.meter.time(|| -> Result<_> {
        let c0 = world.containers_cpu_s();
        let p0 = cpu_sum(world, pids)?;
        let l = Load::start(LoadOptions {
            workers_per_target: WORKERS,
            keep_alive: true,
            pause: Duration::ZERO,
            record: true,
            // Two runtime threads: one would cap the direct paths below what they sustain.
            threads: 2,
            ..LoadOptions::new(vec![addr])
        });
        std::thread::sleep(duration);
        let started = l.started();
        let report = l.stop();
        let stop = Instant::now();
        let p1 = cpu_sum(world, pids)?;
        let c1 = world.containers_cpu_s();
        Ok((
            report,
            started,
            stop,
            p0.zip(p1).map(|(a, b)| b - a),
            c0.zip(c1).map(|(a, b)| b - a),
        ))
    });
    let (report, started, stop, proxy_cpu_s, containers) = r?;
    Ok(Round {
        path,
        rep,
        ledger: Ledger::new(started, &[(started, &report)], stop),
        ok_us: report.ok_histogram().clone(),
        secs: report.elapsed.as_secs_f64(),
        ok: report.ok,
        failed: report.failed,
        failures: report.failures.clone(),
        sample,
        containers_cpu_s: containers.unwrap_or(0.0),
        proxy_cpu_s,
    })
}

/// The table of every path: requests/s (median and range of the runs), p50 and p99 over all
/// runs' successful requests, failures, and CPU per 1000 requests.
fn paths_table(rounds: &[Round]) -> String {
    let rows: Vec<Vec<String>> = PATHS
        .iter()
        .map(|&p| {
            let rs: Vec<&Round> = rounds.iter().filter(|r| r.path == p).collect();
            let mut ok_us = rs.first().map(|r| r.ok_us.clone());
            let mut requests = 0u64;
            for (i, r) in rs.iter().enumerate() {
                if i > 0 {
                    if let Some(h) = ok_us.as_mut() {
                        let _ = h.add(&r.ok_us);
                    }
                }
                requests += r.ok + r.failed;
            }
            let quantile = |q: f64| match &ok_us {
                Some(h) if !h.is_empty() => h.value_at_quantile(q) as f64 / 1e6,
                _ => f64::NAN,
            };
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
            let proxy_cpu: Option<f64> = rs.iter().map(|r| r.proxy_cpu_s).sum();
            let all_cpu: Option<f64> = rs
                .iter()
                .map(|r| r.sample.cpu_s.map(|c| c + r.containers_cpu_s))
                .sum();
            vec![
                p.name().to_string(),
                rps,
                ms(quantile(0.5)),
                ms(quantile(0.99)),
                rs.iter().map(|r| r.failed).sum::<u64>().to_string(),
                proxy_cpu.map(per_k).unwrap_or_else(|| "–".into()),
                all_cpu.map(per_k).unwrap_or_else(|| "–".into()),
            ]
        })
        .collect();
    report::table(
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
    )
}

/// cutover's requests/s and p99 over nginx's, run by run: one pair per run in which both
/// took their load (seconds apart: the paths take turns within a run).
fn pairs(rounds: &[Round]) -> Paired {
    Paired(
        rounds
            .iter()
            .filter(|c| c.path == Path::Proxy)
            .filter_map(|c| {
                let n = rounds
                    .iter()
                    .find(|n| n.path == Path::Nginx && n.rep == c.rep)?;
                Some((c.rps() / n.rps().max(1e-9), c.p99_s() / n.p99_s().max(1e-9)))
            })
            .collect(),
    )
}

/// The run-by-run table and issue 12's goal for plain HTTP: at least nginx's throughput and
/// no worse p99, at the medians of the pairs.
fn goal_line(rounds: &[Round]) -> String {
    let ps = pairs(rounds);
    let (rps, p99) = ps.medians();
    format!(
        "\n{}\nGoal (issue 12: at least nginx's throughput and no worse p99) for plain HTTP in \
         this run: {} ({:.0}% of nginx's requests/s and {:.0}% of its p99, medians of {} runs \
         side by side).\n",
        report::table(
            &Paired::header("cutover / nginx, run by run"),
            &[ps.row("plain HTTP/1.1 keep-alive")]
        ),
        if ps.met() { "met" } else { "not met" },
        100.0 * rps,
        100.0 * p99,
        ps.0.len()
    )
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

/// The paths through a proxy, whose memory is read.
const PROXIES: [Path; 3] = [Path::Proxy, Path::Nginx, Path::Caddy];

/// Memory of one proxy's processes: idle, right after each load through it, at the end.
struct ProxyMemory {
    path: Path,
    idle: Mem,
    after_load: Vec<Mem>,
    end: Mem,
}

impl ProxyMemory {
    fn name(&self) -> &'static str {
        match self.path {
            Path::Proxy => "cutover proxy",
            Path::Nginx => "nginx",
            Path::Caddy => "Caddy",
            _ => "–",
        }
    }

    fn rss_after(&self) -> u64 {
        self.after_load.iter().map(|m| m.rss_kib).max().unwrap_or(0)
    }

    /// VmHWM is updated lazily by the kernel, so an RSS read earlier can exceed it.
    fn peak(&self) -> u64 {
        self.end
            .hwm_kib
            .max(self.rss_after())
            .max(self.idle.rss_kib)
    }

    fn to_json(&self) -> Value {
        json!({
            "idle_rss": self.idle.rss_kib,
            "rss_after_each_load": self.after_load.iter().map(|m| m.rss_kib).collect::<Vec<_>>(),
            "peak_rss_at_end": self.end.hwm_kib,
            "rss_at_end": self.end.rss_kib,
        })
    }
}

/// `VmRSS` and `VmHWM` summed over processes.
fn mem_sum(world: &DockerWorld, pids: &[u32]) -> Result<Mem> {
    let mut sum = Mem {
        rss_kib: 0,
        hwm_kib: 0,
    };
    for &p in pids {
        let m = world.mem(p)?;
        sum.rss_kib += m.rss_kib;
        sum.hwm_kib += m.hwm_kib;
    }
    Ok(sum)
}

/// CPU seconds used so far by processes (None for no processes).
fn cpu_sum(world: &DockerWorld, pids: &[u32]) -> Result<Option<f64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0;
    for &p in pids {
        sum += world.cpu_s(p)?;
    }
    Ok(Some(sum))
}

/// Bars of requests/s (median of the runs) and of p50/p99 latency per path.
fn plots(rounds: &[Round]) -> Value {
    let categories: Vec<&str> = PATHS.iter().map(|p| p.name()).collect();
    let mut rps = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for p in PATHS {
        let rs: Vec<&Round> = rounds.iter().filter(|r| r.path == p).collect();
        rps.push(spread(&rs.iter().map(|r| r.rps()).collect::<Vec<_>>()).0);
        let mut lat: Vec<f64> = rs.iter().flat_map(|r| r.ledger.ok_latencies()).collect();
        lat.sort_by(f64::total_cmp);
        p50.push(1000.0 * percentile(&lat, 0.5));
        p99.push(1000.0 * percentile(&lat, 0.99));
    }
    json!([
        {
            "file": "proxy-requests.svg",
            "kind": "bars",
            "title": "Requests per second on 2 cores, 8 keep-alive workers (median of the runs)",
            "y": "requests per second",
            "categories": categories,
            "series": [{"name": "requests/s", "values": rps}],
        },
        {
            "file": "proxy-latency.svg",
            "kind": "bars",
            "title": "Latency of successful requests",
            "y": "milliseconds",
            "categories": categories,
            "series": [{"name": "p50", "values": p50}, {"name": "p99", "values": p99}],
        },
    ])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round(path: Path, rep: usize, ok: u64, p99_us: u64) -> Round {
        let mut ok_us = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        // 98 fast requests and two at the p99 to be read.
        ok_us.record_n(100, 98).unwrap();
        ok_us.record_n(p99_us, 2).unwrap();
        Round {
            path,
            rep,
            ledger: Ledger::default(),
            ok_us,
            secs: 1.0,
            ok,
            failed: 0,
            failures: Vec::new(),
            sample: Sample::default(),
            containers_cpu_s: 0.0,
            proxy_cpu_s: None,
        }
    }

    /// cutover's whole-cell median trails nginx's (the machine was faster in nginx's best
    /// run), yet it is ahead in two of three runs: the verdict reads the runs' pairs.
    #[test]
    fn plain_http_goal_is_read_from_the_runs_pairs() {
        let (c, n, caddy) = (Path::Proxy, Path::Nginx, Path::Caddy);
        let rounds = vec![
            round(c, 0, 20_000, 1_000),
            round(n, 0, 19_000, 1_100),
            round(caddy, 0, 50_000, 100),
            round(n, 1, 30_000, 500),
            round(c, 1, 15_000, 900),
            round(c, 2, 15_500, 800),
            round(n, 2, 15_000, 1_000),
            // A run without nginx's load (it failed to start): no pair.
            round(c, 3, 1, 90_000),
        ];
        assert_eq!(pairs(&rounds).0.len(), 3);
        let text = goal_line(&rounds);
        assert!(
            text.contains(
                "| plain HTTP/1.1 keep-alive | 103% (50–105%) | 2 of 3 | 91% (80–180%) | 2 of 3 |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "for plain HTTP in this run: met (103% of nginx's requests/s and 91% of its p99, \
                 medians of 3 runs side by side)."
            ),
            "{text}"
        );
        let worse = vec![round(c, 0, 9_000, 1_000), round(n, 0, 10_000, 1_000)];
        assert!(goal_line(&worse).contains("for plain HTTP in this run: not met (90%"));
    }
}

//! `switch`: what clients see while a container app is switched from one image to the other
//! under steady load, on one Docker host, in one run: cutover blue-green, cutover hold, the
//! naive `docker rm -f web && docker run -d --name web -p 8080:8080 IMAGE` over SSH, and the
//! peers an operator would script instead: Caddy's upstream flipped through its admin API and
//! nginx's upstream file rewritten and reloaded (see [`crate::peers`]). Every
//! request of the load is recorded (start, latency, success), so that besides failures and
//! latencies the table shows the longest time in which no request succeeded.

use crate::containers::{ms, percentile, DockerWorld, Ledger};
use crate::loadgen::{Load, LoadOptions};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::peers::{self, Kind, Peer};
use crate::report::{self, secs, spread, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) const HOW_TO_READ: &str = "\
one testlab host running its own dockerd (like every host, a network namespace on this \
machine), two images `web:a` and `web:b` (busybox httpd serving `a` or `b` at `/`, healthy at \
`/up`; built locally and pulled from the lab's registry), and cutover's edge proxy installed \
by `cutover setup` (listening on the host's port 8000). Before anything is timed, `web:a` and \
`web:b` are both deployed once with cutover (so both images are on the host) and pulled for \
the naive method. Each method then gets the same steady load from this machine's root \
namespace, 4 keep-alive workers plus 4 workers opening a fresh connection per request (each \
worker sleeps 20 ms between requests; per-request timeout 30 s, so a slow request is counted \
as slow, not failed), and K switches alternating between the two images (K = 10, 3 with \
`--quick`): the load runs 1 s before the first switch, each switch command runs to its \
exit, then the load runs 1 s more before the next. The bench waits for an idle machine \
before each method and runs a method again (once) if other processes took over a quarter of \
the CPU during it. *blue-green* is `cutover deploy --image a|b` with `strategy = \
\"blue-green\"` and *hold* the same with `strategy = \"hold\"` (their progress lines, \
timestamped, are in the JSON), the load going through cutover's proxy (host port 8000); *naive* is \
`ssh host 'docker rm -f web; docker run -d --name web -p 8080:8080 IMAGE'` (a fresh SSH \
connection each time, like an operator's; the script stops at the first failing command and \
prints a timestamp before `docker rm` and after `docker run`), the load going straight to the \
published port 8080. *Caddy* is Debian's `caddy` running in the host's network namespace \
(`caddy run` with a JSON config: one server on port 8200 whose only route is a \
`reverse_proxy` to the container's loopback port, Caddy's defaults otherwise, admin API on \
the host's 127.0.0.1:2019) and *nginx* is Debian's nginx there (its own master process, \
one worker per core, port 8100, `proxy_pass` to an `upstream` block with `keepalive 32` in a \
file of its own, `proxy_http_version 1.1`); the load goes to their port. For both, one \
switch is one SSH command (a fresh connection) running what an operator scripting them \
would: `docker run -d -p 127.0.0.1:P:8080` of the other image on the other of two loopback \
ports, `curl /up` on it every 50 ms until it answers, then the flip (Caddy: `curl -X PATCH` \
of the route's `upstreams` through the admin API, which returns when Caddy runs the new \
config; nginx: rewrite the upstream file and `nginx -s reload`, which returns once the \
master is signalled), then a 2 s pause so that requests already on their way to the old \
container (and nginx's old workers) finish, as a careful operator would, then `docker stop -t \
2` and `docker rm` of the old container. \
*no switch* is the same load through cutover's proxy for 1 + K seconds with no switch: \
what this machine gives without any switch. A request fails on a connect error, a reset, \
a timeout, a non-2xx status or a short body (testlab's load generator); busybox httpd closes \
every connection after its response, which the keep-alive workers follow without counting a \
failure (so only through the proxy do they really keep their connection). *requests* and \
*failed* count every request of the run (failed ones are fast: a refused connect takes well \
under a millisecond, after which the worker sleeps 20 ms and tries again, so *failed* grows \
with the request rate; the gap does not). *worst* and *p99* are latencies of all requests, \
successful or not, connect included. *p99 around a switch* and *max around a switch* are \
the same over the requests started from 0.5 s before a switch's flip step began to 0.5 s \
after it ended, all K switches pooled; the flip step is cutover's `switch` progress step \
(for hold it includes the time requests are held), Caddy's PATCH, nginx's rewrite + reload, \
the naive `docker rm` + `docker run`. *longest gap* is the longest time between two \
consecutive successful responses (their ends) anywhere in the run, all workers together. \
*switch time* is the median (min–max) wall time of one switch command, spawn to exit: for \
cutover the whole deploy (SSH connection, resolving the tag and pulling, starting and \
gating the new container, the proxy switch, a check through the proxy, pruning old \
containers; hold stops the old container inside its switch), for naive the \
SSH command (which returns as soon as `docker run` has started the container, not when \
httpd answers), for Caddy and nginx their SSH command (start, wait, flip, stop and remove). \
Plots: `switch-timeline-<method>.svg` (successful and failed requests per 100 ms, the \
flips as vertical marks), `switch-failed.svg` and `switch-gap.svg`. The load and the \
switches share the machine's 2 cores with the host's dockerd, containers, proxy and peers.";

/// Workers of each kind (keep-alive, fresh connection).
const WORKERS: usize = 4;
/// Sleep between two requests of one worker.
const PAUSE: Duration = Duration::from_millis(20);
/// Per-request timeout: long enough for hold's paused requests to count as slow.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Steady load before the first switch and after each switch.
const SETTLE: Duration = Duration::from_secs(1);
/// The naive method's published port on the host.
const NAIVE_PORT: u16 = 8080;
/// Where Caddy and nginx listen on the host, and the two loopback ports each of them
/// alternates its containers between.
const CADDY_PORT: u16 = 8200;
const CADDY_UPSTREAMS: [u16; 2] = [18081, 18082];
const NGINX_PORT: u16 = 8100;
const NGINX_UPSTREAMS: [u16; 2] = [18091, 18092];
/// Seconds before the switch step starts and after it ends whose requests make the
/// "around a switch" latencies.
const AROUND: f64 = 0.5;
/// Width of a timeline plot's buckets, seconds.
const BUCKET: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    NoSwitch,
    BlueGreen,
    Hold,
    Naive,
    Caddy,
    Nginx,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::NoSwitch => "no switch (through the proxy)",
            Method::BlueGreen => "cutover blue-green",
            Method::Hold => "cutover hold",
            Method::Naive => "naive docker rm -f + run",
            Method::Caddy => "Caddy upstream flip (admin API)",
            Method::Nginx => "nginx upstream edit + reload",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Method::NoSwitch => "no-switch",
            Method::BlueGreen => "blue-green",
            Method::Hold => "hold",
            Method::Naive => "naive",
            Method::Caddy => "caddy",
            Method::Nginx => "nginx",
        }
    }
}

/// One switch command.
#[derive(Debug, Clone)]
struct Switch {
    to: &'static str,
    /// Start and end, seconds since the ledger's origin.
    start: f64,
    end: f64,
    ok: bool,
    message: String,
    /// cutover's progress lines, each with the seconds since the switch's start.
    progress: Vec<(f64, String)>,
}

impl Switch {
    /// The requests that make the "around a switch" latencies: started from [`AROUND`]
    /// before the switch step started to [`AROUND`] after it ended (cutover: its `switch`
    /// progress step; the others: the marks their script prints around the flip), seconds
    /// since the ledger's origin. Without marks, the whole command.
    fn around(&self) -> (f64, f64) {
        let from = self.step_at("switch", "start").map(|t| self.start + t);
        let to = self.step_at("switch", "done").map(|t| self.start + t);
        (
            from.unwrap_or(self.start) - AROUND,
            to.unwrap_or(self.end) + AROUND,
        )
    }

    /// Seconds from the switch's start to cutover's first `<step> <phase>` line, if any.
    fn step_at(&self, step: &str, phase: &str) -> Option<f64> {
        self.progress.iter().find_map(|(t, l)| {
            let (_, rest) = l.split_once(": ")?;
            let mut w = rest.split_whitespace();
            (w.next() == Some(step) && w.next().map(|p| p.trim_end_matches(':')) == Some(phase))
                .then_some(*t)
        })
    }
}

/// Everything measured for one method.
struct Run {
    method: Method,
    switches: Vec<Switch>,
    all: Ledger,
    keep_alive: Ledger,
    fresh: Ledger,
    /// Bodies served (first line -> count), both loads.
    bodies: std::collections::BTreeMap<String, u64>,
    /// The first failures of each load, as testlab describes them.
    failures: Vec<String>,
    sample: Sample,
    /// CPU seconds of the host's containers during the run (not in the bench's cgroup).
    containers_cpu_s: f64,
}

impl Run {
    fn switch_secs(&self) -> Vec<f64> {
        self.switches.iter().map(|s| s.end - s.start).collect()
    }

    /// "1.23 s (1.10–1.50)", or "–" without switches.
    fn switch_cell(&self) -> String {
        let v = self.switch_secs();
        let (med, min, max) = spread(&v);
        match v.len() {
            0 => "–".into(),
            1 => format!("{} s", secs(med)),
            _ => format!("{} s ({}–{})", secs(med), secs(min), secs(max)),
        }
    }

    /// Sorted latencies (successful or not) of the requests around the switches.
    fn around_latencies(&self) -> Vec<f64> {
        let w: Vec<(f64, f64)> = self.switches.iter().map(Switch::around).collect();
        self.all.latencies_in(&w)
    }

    /// Other processes' CPU seconds, without the host's containers.
    fn foreign_cpu_s(&self) -> f64 {
        (self.sample.foreign_cpu_s - self.containers_cpu_s).max(0.0)
    }
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let k = if ctx.quick { 3 } else { 10 };
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = Instant::now();

    let world = DockerWorld::start(ctx)?;
    eprintln!(
        "[switch] untimed: deploying web:a and web:b once, pulling both for the naive method"
    );
    world.deploy_ok("a")?;
    world.deploy_ok("b")?;
    let mut live = "b";
    world.ssh_ok(&format!(
        "docker pull -q {} && docker pull -q {}",
        world.image("a"),
        world.image("b")
    ))?;

    let mut runs = Vec::new();
    let mut discarded = Vec::new();
    let go = |runs: &mut Vec<Run>,
              discarded: &mut Vec<Run>,
              method,
              live: &mut &'static str|
     -> Result<()> {
        let (run, redone) = measure_undisturbed(ctx, &world, method, k, live, None)?;
        runs.push(run);
        discarded.extend(redone);
        Ok(())
    };
    go(&mut runs, &mut discarded, Method::NoSwitch, &mut live)?;
    go(&mut runs, &mut discarded, Method::BlueGreen, &mut live)?;
    world.write_config("hold")?;
    go(&mut runs, &mut discarded, Method::Hold, &mut live)?;
    // The naive method's container, started the same way (untimed); cutover's container and
    // proxy stay up, idle.
    world.ssh_ok(&format!(
        "docker rm -f web >/dev/null 2>&1; docker run -d --name web -p {NAIVE_PORT}:8080 {}",
        world.image(live)
    ))?;
    let naive_addr = SocketAddr::new(world.lab.ip(0).into(), NAIVE_PORT);
    world.wait_serves(naive_addr, live, Duration::from_secs(10))?;
    go(&mut runs, &mut discarded, Method::Naive, &mut live)?;
    world.ssh_ok("docker rm -f web >/dev/null")?;
    for (method, kind, listen, ports) in [
        (Method::Caddy, Kind::Caddy, CADDY_PORT, CADDY_UPSTREAMS),
        (Method::Nginx, Kind::Nginx, NGINX_PORT, NGINX_UPSTREAMS),
    ] {
        let side = PeerSide::start(&world, kind, listen, ports, live)?;
        let (run, redone) = measure_undisturbed(ctx, &world, method, k, &mut live, Some(&side))?;
        runs.push(run);
        discarded.extend(redone);
        side.stop(&world)?;
    }
    let (rollback_md, rollback_json) = container_rollbacks(ctx, &world)?;
    let load_after = loadavg();
    drop(world);

    let mut out = section(
        ctx,
        k,
        &runs,
        &discarded,
        &load_before,
        &load_after,
        clock,
        &started,
    );
    out.markdown.push_str(&rollback_md);
    out.json["container_rollback"] = rollback_json;
    Ok(out)
}

/// Container rollbacks on the same host, `--reps` times each, with `strategy = "blue-green"`:
/// *warm* (`cutover rollback`; the old container is still on the host, stopped), *cold* (the
/// same after every stopped container and unused image was removed from the host, so the old
/// digest is pulled again from the registry) and a *redeploy* of the old tag (`cutover deploy
/// --image a`). Each is timed from spawn until the proxy answers with the old version, and
/// until the command exits. Before each: `a` then `b` deployed (untimed).
fn container_rollbacks(ctx: &Ctx, world: &DockerWorld) -> Result<(String, Value)> {
    world.write_config("blue-green")?;
    let kinds = [
        "warm rollback",
        "cold rollback (old image pulled again)",
        "redeploy of the old tag",
    ];
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
    let mut errors = Vec::new();
    for _ in 0..ctx.reps {
        for (i, kind) in kinds.iter().enumerate() {
            world.deploy_ok("a")?;
            world.deploy_ok("b")?;
            if i == 1 {
                world.ssh_ok(
                    "docker container prune -f >/dev/null && docker image prune -af >/dev/null",
                )?;
            }
            let args: &[&str] = if i == 2 {
                &["deploy", "--image", "a"]
            } else {
                &["rollback"]
            };
            eprintln!("[switch] container {kind}");
            match world.timed_until_serves(args, "a") {
                Ok(t) => times[i].push(t),
                Err(e) => errors.push(format!("{kind}: {e:#}")),
            }
        }
    }
    let cell = |v: Vec<f64>| {
        if v.is_empty() {
            return "–".to_string();
        }
        let (med, min, max) = spread(&v);
        if v.len() > 1 {
            format!("{} ({}–{})", secs(med), secs(min), secs(max))
        } else {
            secs(med)
        }
    };
    let rows: Vec<Vec<String>> = kinds
        .iter()
        .zip(&times)
        .map(|(kind, t)| {
            vec![
                format!("cutover {kind}"),
                cell(t.iter().map(|x| x.0).collect()),
                cell(t.iter().map(|x| x.1).collect()),
            ]
        })
        .collect();
    let mut md = format!(
        "\n**Container rollback** (same host, blue-green; {} run(s) each; before each, `web:a` \
         then `web:b` deployed): from spawn of the command until cutover's proxy answers with \
         `a` (polled every 10 ms), and until the command exits. *warm*: `cutover rollback` \
         while `a`'s container is still on the host (stopped); *cold*: the same after `docker \
         container prune` and `docker image prune -a` on the host, so `a`'s digest is pulled \
         from the registry again; *redeploy*: `cutover deploy --image a`.\n\n",
        ctx.reps
    );
    md.push_str(&report::table(
        &[
            "method",
            "old version answers after (s)",
            "command exits after (s)",
        ],
        &rows,
    ));
    for e in &errors {
        md.push_str(&format!("\nFailed: {e}\n"));
    }
    let json = json!({
        "methods": kinds,
        "served_and_exited_s": times.iter().map(|t| t.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "errors": errors,
    });
    Ok((md, json))
}

/// [`measure`], done once more if other processes took over a quarter of the machine's CPU
/// during it (the bench's rule, see `meter`; once only, as a method's run is long). Returns
/// the run kept and the one discarded, if any.
fn measure_undisturbed(
    ctx: &Ctx,
    world: &DockerWorld,
    method: Method,
    k: usize,
    live: &mut &'static str,
    peer: Option<&PeerSide>,
) -> Result<(Run, Option<Run>)> {
    let first = measure(ctx, world, method, k, live, peer)?;
    let cores = ctx.machine.cores.max(1) as f64;
    if ctx.quick || first.foreign_cpu_s() <= 0.25 * first.sample.secs * cores {
        return Ok((first, None));
    }
    eprintln!(
        "[switch] other processes took over a quarter of the CPU during {}: doing it again",
        method.name()
    );
    let again = measure(ctx, world, method, k, live, peer)?;
    Ok((again, Some(first)))
}

/// Runs the load against the method's address and switches `k` times (none for
/// [`Method::NoSwitch`], which runs as long as `k` settle periods).
fn measure(
    ctx: &Ctx,
    world: &DockerWorld,
    method: Method,
    k: usize,
    live: &mut &'static str,
    peer: Option<&PeerSide>,
) -> Result<Run> {
    let target = match (method, peer) {
        (Method::Naive, _) => SocketAddr::new(world.lab.ip(0).into(), NAIVE_PORT),
        (Method::Caddy | Method::Nginx, Some(p)) => p.peer.addr(),
        (Method::Caddy | Method::Nginx, None) => bail!("{} needs its peer", method.name()),
        _ => world.proxy_addr(),
    };
    eprintln!("[switch] {}: load on {target}", method.name());
    let options = |keep_alive| LoadOptions {
        workers_per_target: WORKERS,
        keep_alive,
        timeout: TIMEOUT,
        pause: PAUSE,
        record: true,
        ..LoadOptions::new(vec![target])
    };
    let (result, sample) = ctx.meter.time(|| -> Result<_> {
        let c0 = world.containers_cpu_s();
        let ka = Load::start(options(true));
        let fresh = Load::start(options(false));
        let origin = ka.started().min(fresh.started());
        let since = |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
        if !ka.wait_for_ok(WORKERS as u64, Duration::from_secs(10))
            || !fresh.wait_for_ok(WORKERS as u64, Duration::from_secs(10))
        {
            bail!("{target} does not answer the load: {}", ka.stop());
        }
        std::thread::sleep(SETTLE);
        let mut switches = Vec::new();
        if method == Method::NoSwitch {
            std::thread::sleep(SETTLE * k as u32);
        }
        let n = if method == Method::NoSwitch { 0 } else { k };
        for i in 0..n {
            let to = if *live == "a" { "b" } else { "a" };
            let start = Instant::now();
            // After a failed peer switch: the new container to remove (untimed).
            let mut leftover = None;
            let (ok, message, progress) = match (method, peer) {
                (Method::Naive, _) => {
                    let (ok, message, lines) = run_marked(
                        world,
                        &format!(
                            "{MARKS}m 'switch start'\n\
                             docker rm -f web\n\
                             docker run -d --name web -p {NAIVE_PORT}:8080 {} >/dev/null\n\
                             m 'switch done'\n",
                            world.image(to)
                        ),
                    );
                    (ok, message, lines)
                }
                (Method::Caddy | Method::Nginx, Some(p)) => {
                    let (from_port, to_port) = p.next();
                    let (ok, message, lines) =
                        run_marked(world, &p.script(&world.image(to), from_port, to_port));
                    if ok {
                        p.active.set(to_port);
                    } else {
                        leftover = Some(p.container(to_port));
                    }
                    (ok, message, lines)
                }
                _ => {
                    let (d, lines) = world.deploy_traced(to)?;
                    (d.ok, d.message, lines)
                }
            };
            let end = Instant::now();
            if let Some(name) = leftover {
                let _ = world.lab.ssh(0, &format!("docker rm -f {name}"));
            }
            eprintln!(
                "[switch] {} {}/{k} -> {to}: {} in {} s{}",
                method.name(),
                i + 1,
                if ok { "ok" } else { "FAILED" },
                secs((end - start).as_secs_f64()),
                if ok {
                    String::new()
                } else {
                    format!(": {message}")
                }
            );
            if ok {
                *live = to;
            }
            switches.push(Switch {
                to,
                start: since(start),
                end: since(end),
                ok,
                message,
                progress,
            });
            std::thread::sleep(SETTLE);
        }
        let (ka_started, fresh_started) = (ka.started(), fresh.started());
        let ka = ka.stop();
        let fresh = fresh.stop();
        let stop = Instant::now();
        let c1 = world.containers_cpu_s();
        let containers_cpu_s = match (c0, c1) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        let failures: Vec<String> = ka
            .failures
            .iter()
            .map(|f| format!("keep-alive {f}"))
            .chain(fresh.failures.iter().map(|f| format!("fresh {f}")))
            .collect();
        let mut bodies = ka.bodies.clone();
        for (b, n) in &fresh.bodies {
            *bodies.entry(b.clone()).or_insert(0) += n;
        }
        Ok(Run {
            method,
            switches,
            all: Ledger::new(origin, &[(ka_started, &ka), (fresh_started, &fresh)], stop),
            keep_alive: Ledger::new(origin, &[(ka_started, &ka)], stop),
            fresh: Ledger::new(origin, &[(fresh_started, &fresh)], stop),
            bodies,
            failures,
            sample: Sample::default(),
            containers_cpu_s,
        })
    });
    let mut run = result?;
    run.sample = sample;
    eprintln!(
        "[switch] {}: {} requests, {} failed, worst {}, longest gap {}",
        method.name(),
        run.all.requests(),
        run.all.failed(),
        ms(run.all.worst()),
        ms(run.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0)
    );
    Ok(run)
}

/// The start of every marked script: stop at the first failing command; `m STEP PHASE`
/// prints a progress line `host: STEP PHASE <seconds since the epoch>` (the host shares
/// this machine's clock).
const MARKS: &str = "set -e\nm() { echo \"host: $1 $(date +%s.%N)\"; }\n";

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs a script of [`MARKS`] lines on the host over SSH (a fresh connection, as an
/// operator's `ssh host '...'`): whether it exited 0, its stderr, and its progress lines
/// with the seconds since the spawn at which they were printed.
fn run_marked(world: &DockerWorld, script: &str) -> (bool, String, Vec<(f64, String)>) {
    let t0 = epoch_now();
    let out = world.lab.ssh(0, script);
    let lines = marks(&String::from_utf8_lossy(&out.stdout), t0);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
        lines,
    )
}

/// The progress lines `host: STEP PHASE <epoch seconds>` among a script's output, as
/// (seconds since `t0`, `host: STEP PHASE`); other lines are skipped.
fn marks(stdout: &str, t0: f64) -> Vec<(f64, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (head, at) = l.rsplit_once(' ')?;
            let at: f64 = at.parse().ok()?;
            head.starts_with("host: ")
                .then(|| (at - t0, head.to_string()))
        })
        .collect()
}

/// Caddy or nginx on the host in front of containers named `<peer>-web-<port>` published on
/// the host's loopback, alternating between two ports.
struct PeerSide {
    peer: Peer,
    ports: [u16; 2],
    /// The port of the container the peer proxies to now.
    active: Cell<u16>,
}

impl PeerSide {
    /// Starts the container of image `tag` on the first port (untimed, over SSH), then the
    /// peer in front of it, and waits until the peer serves `tag`.
    fn start(
        world: &DockerWorld,
        kind: Kind,
        listen: u16,
        ports: [u16; 2],
        tag: &str,
    ) -> Result<PeerSide> {
        let name = format!("{}-web-{}", kind.name(), ports[0]);
        world.ssh_ok(&format!(
            "docker rm -f {name} >/dev/null 2>&1; \
             docker run -d --name {name} -p 127.0.0.1:{}:8080 {} >/dev/null && \
             i=0; until curl -sf -o /dev/null http://127.0.0.1:{}/up; do \
               i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.05; done",
            ports[0],
            world.image(tag),
            ports[0]
        ))?;
        let peer = Peer::start(&world.lab, 0, kind, listen, ports[0])?;
        if let Err(e) = world.wait_serves(peer.addr(), tag, Duration::from_secs(10)) {
            bail!("{e}; {}: {}", kind.name(), peer.log_tail());
        }
        eprintln!(
            "[switch] {} (pid {}) on {} in front of 127.0.0.1:{}",
            kind.name(),
            peer.pid(),
            peer.addr(),
            ports[0]
        );
        Ok(PeerSide {
            peer,
            ports,
            active: Cell::new(ports[0]),
        })
    }

    fn container(&self, port: u16) -> String {
        format!("{}-web-{port}", self.peer.kind.name())
    }

    /// (the active port, the other one).
    fn next(&self) -> (u16, u16) {
        let from = self.active.get();
        let to = if from == self.ports[0] {
            self.ports[1]
        } else {
            self.ports[0]
        };
        (from, to)
    }

    /// One switch as an operator scripting the peer would do it: start the new container
    /// on the other loopback port, wait until it answers (`curl /up` every 50 ms, up to
    /// 15 s), flip the peer to it, give requests in flight to the old one 2 s to finish, then
    /// stop (`docker stop -t 2`) and remove the old one.
    fn script(&self, image: &str, from: u16, to: u16) -> String {
        format!(
            "{MARKS}m 'run start'\n\
             docker run -d --name {new} -p 127.0.0.1:{to}:8080 {image} >/dev/null\n\
             i=0; until curl -sf -o /dev/null http://127.0.0.1:{to}/up; do \
               i=$((i+1)); [ $i -lt 300 ] || {{ echo 'the new container does not answer' >&2; exit 1; }}; \
               sleep 0.05; done\n\
             m 'ready done'\n\
             m 'switch start'\n\
             {flip}\n\
             m 'switch done'\n\
             sleep 2\n\
             docker stop -t 2 {old} >/dev/null\n\
             docker rm {old} >/dev/null\n\
             m 'remove done'\n",
            new = self.container(to),
            old = self.container(from),
            flip = self.peer.switch_commands(to),
        )
    }

    /// Stops the peer and removes its container (untimed).
    fn stop(self, world: &DockerWorld) -> Result<()> {
        let name = self.container(self.active.get());
        drop(self.peer);
        world.ssh_ok(&format!("docker rm -f {name} >/dev/null"))?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn section(
    ctx: &Ctx,
    k: usize,
    runs: &[Run],
    discarded: &[Run],
    load_before: &str,
    load_after: &str,
    clock: Instant,
    started: &str,
) -> Section {
    let took = clock.elapsed().as_secs();
    let mut md = format!(
        "Measured {} on {} with `{}` ({k} switches per method, one run); the scenario took \
         {}m{:02}s in all (lab and image setup included). Peers: {}. Load average before / \
         after: {load_before} / {load_after}.\n\n",
        report::utc_now(),
        ctx.machine.one_line(),
        ctx.command,
        took / 60,
        took % 60,
        peers::versions_line(&ctx.machine)
    );
    let per_switch = |r: &Run, n: usize| {
        if r.switches.is_empty() {
            "–".to_string()
        } else {
            format!("{:.1}", n as f64 / r.switches.len() as f64)
        }
    };
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let around = r.around_latencies();
            let (p99_around, max_around) = if r.switches.is_empty() {
                ("–".to_string(), "–".to_string())
            } else {
                (
                    ms(percentile(&around, 0.99)),
                    ms(around.last().copied().unwrap_or(0.0)),
                )
            };
            vec![
                r.method.name().to_string(),
                r.all.requests().to_string(),
                r.all.failed().to_string(),
                per_switch(r, r.all.failed()),
                ms(r.all.worst()),
                ms(r.all.latency(0.99, false)),
                p99_around,
                max_around,
                ms(r.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0),
                r.switch_cell(),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "method",
            "requests",
            "failed",
            "failed per switch",
            "worst latency",
            "p99 latency",
            "p99 around a switch",
            "max around a switch",
            "longest gap without a successful response",
            "switch time",
        ],
        &rows,
    ));
    md.push_str("\nBy kind of worker (4 each):\n\n");
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.method.name().to_string(),
                format!("{} / {}", r.keep_alive.requests(), r.keep_alive.failed()),
                ms(r.keep_alive.worst()),
                format!("{} / {}", r.fresh.requests(), r.fresh.failed()),
                ms(r.fresh.worst()),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "method",
            "keep-alive: requests / failed",
            "keep-alive: worst",
            "fresh connection: requests / failed",
            "fresh connection: worst",
        ],
        &rows,
    ));
    md.push('\n');
    let failed_switches: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.switches
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.ok)
                .map(move |(i, s)| {
                    format!(
                        "{} switch {} (to {}): {}",
                        r.method.name(),
                        i + 1,
                        s.to,
                        s.message.replace('|', "/")
                    )
                })
        })
        .collect();
    if failed_switches.is_empty() {
        md.push_str("Every switch command exited 0. ");
    } else {
        md.push_str(&format!(
            "Switch commands that failed ({}): {}. ",
            failed_switches.len(),
            failed_switches.join("; ")
        ));
    }
    let bodies = |r: &Run| {
        r.bodies
            .iter()
            .map(|(b, n)| format!("`{b}` {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    md.push_str(&format!(
        "Responses by body: {}.\n\n",
        runs.iter()
            .map(|r| format!("{}: {}", r.method.key(), bodies(r)))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let cores = ctx.machine.cores.max(1) as f64;
    let (foreign, wall) = runs.iter().fold((0.0, 0.0), |(f, w), r| {
        (f + r.foreign_cpu_s(), w + r.sample.secs)
    });
    let waited = runs.iter().map(|r| r.sample.waited_s).fold(0.0, f64::max);
    md.push_str(&format!(
        "Before each method the bench waited for an idle machine (up to 20 s; longest wait \
         here {waited:.1} s); during the methods' runs, processes outside the bench and its \
         lab (other work on this shared machine) used {:.0}% of the machine's CPU time. \
         Methods run again because other processes took over a quarter of the CPU during \
         them: {} (in the JSON under `discarded`).\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
        discarded.len()
    ));

    let json = json!({
        "scenario": "switch",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "switches_per_method": k,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
        "load": {
            "keep_alive_workers": WORKERS,
            "fresh_connection_workers": WORKERS,
            "pause_s": PAUSE.as_secs_f64(),
            "timeout_s": TIMEOUT.as_secs_f64(),
            "settle_s": SETTLE.as_secs_f64(),
        },
        "results": runs.iter().map(run_json).collect::<Vec<_>>(),
        "discarded": discarded.iter().map(run_json).collect::<Vec<_>>(),
        "cutover_failed": runs
            .iter()
            .filter(|r| matches!(r.method, Method::BlueGreen | Method::Hold))
            .map(|r| (r.method.key().to_string(), json!(r.all.failed())))
            .collect::<serde_json::Map<_, _>>(),
        "plots": plots(runs),
    });
    Section { markdown: md, json }
}

/// A timeline per method (successful and failed requests per 100 ms, x = seconds since the
/// method's load started, the switch steps as vertical marks) and bars of failed requests
/// per switch and the longest gap.
fn plots(runs: &[Run]) -> Value {
    let mut plots: Vec<Value> = runs
        .iter()
        .map(|r| {
            let b = r.all.buckets(BUCKET);
            let ok: Vec<[f64; 2]> = b.iter().map(|&(t, ok, _)| [t, ok as f64]).collect();
            let failed: Vec<[f64; 2]> = b.iter().map(|&(t, _, f)| [t, f as f64]).collect();
            let top = b.iter().map(|&(_, ok, f)| ok.max(f)).max().unwrap_or(0) as f64;
            // One polyline for all marks: down the baseline between them.
            let mut marks: Vec<[f64; 2]> = Vec::new();
            for s in &r.switches {
                let t = s.step_at("switch", "done").map_or(s.end, |t| s.start + t);
                marks.extend([[t, 0.0], [t, top], [t, 0.0]]);
            }
            let name = r.method.name();
            let mut series = vec![
                json!({"name": format!("{name}: ok"), "points": ok}),
                json!({"name": format!("{name}: failed"), "points": failed}),
            ];
            if !marks.is_empty() {
                series.push(json!({"name": format!("{name}: switch"), "points": marks}));
            }
            json!({
                "file": format!("switch-timeline-{}.svg", r.method.key()),
                "kind": "lines",
                "title": if r.switches.is_empty() {
                    format!("{name}: requests per 100 ms")
                } else {
                    format!("{name}: requests per 100 ms across {} switches", r.switches.len())
                },
                "x": "seconds",
                "y": "requests per 100 ms",
                "series": series,
            })
        })
        .collect();
    let switched: Vec<&Run> = runs.iter().filter(|r| !r.switches.is_empty()).collect();
    plots.push(json!({
        "file": "switch-failed.svg",
        "kind": "bars",
        "title": "Failed requests per switch",
        "y": "failed requests per switch",
        "categories": switched.iter().map(|r| r.method.name()).collect::<Vec<_>>(),
        "series": [{
            "name": "failed per switch",
            "values": switched
                .iter()
                .map(|r| r.all.failed() as f64 / r.switches.len() as f64)
                .collect::<Vec<_>>(),
        }],
    }));
    plots.push(json!({
        "file": "switch-gap.svg",
        "kind": "bars",
        "title": "Longest time without a successful response",
        "y": "milliseconds",
        "categories": switched.iter().map(|r| r.method.name()).collect::<Vec<_>>(),
        "series": [{
            "name": "longest gap",
            "values": switched
                .iter()
                .map(|r| 1000.0 * r.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0)
                .collect::<Vec<_>>(),
        }],
    }));
    Value::Array(plots)
}

fn run_json(r: &Run) -> Value {
    let (med, min, max) = spread(&r.switch_secs());
    let switches: Vec<Value> = r
        .switches
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // Requests started from this switch's start to the next one's.
            let next = r
                .switches
                .get(i + 1)
                .map(|n| n.start)
                .unwrap_or(f64::INFINITY);
            let (requests, failed) = r.all.window(s.start, next);
            let (gap, gap_at) = r.all.longest_gap(s.start, next);
            let (from, to) = s.around();
            let around = r.all.latencies_in(&[(from, to)]);
            json!({
                "to": s.to,
                "ok": s.ok,
                "message": s.message,
                "start_s": s.start,
                "wall_s": s.end - s.start,
                "requests_until_next_switch": requests,
                "failed_until_next_switch": failed,
                "longest_gap_s": gap,
                "longest_gap_starts_s_after_switch_start": gap_at - s.start,
                "proxy_switch_done_s_after_switch_start": s.step_at("switch", "done"),
                "switch_step_start_s_after_switch_start": s.step_at("switch", "start"),
                "around_switch": {
                    "from_s": from,
                    "to_s": to,
                    "requests": around.len(),
                    "p99_s": percentile(&around, 0.99),
                    "max_s": around.last().copied().unwrap_or(0.0),
                },
                "progress": s.progress,
            })
        })
        .collect();
    json!({
        "method": r.method.key(),
        "all": r.all.to_json(),
        "keep_alive": r.keep_alive.to_json(),
        "fresh_connection": r.fresh.to_json(),
        "bodies": r.bodies,
        "first_failures": r.failures,
        "switch_wall_s": { "median": med, "min": min, "max": max },
        "switches": switches,
        "run": r.sample.to_json(),
        "containers_cpu_s": r.containers_cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marks a script prints (through a real `sh` with [`MARKS`]) come back as progress
    /// lines that [`Switch::around`] finds; other output is skipped.
    #[test]
    fn marked_scripts_give_the_switch_step() {
        let t0 = epoch_now();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{MARKS}echo 3f1a2b\nm 'switch start'\nsleep 0.2\nm 'switch done'\nfalse\nm 'never here'\n"
            ))
            .output()
            .unwrap();
        assert!(!out.status.success(), "set -e stops at the first failure");
        let progress = marks(&String::from_utf8_lossy(&out.stdout), t0);
        let names: Vec<&str> = progress.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(names, ["host: switch start", "host: switch done"]);
        let s = Switch {
            to: "a",
            start: 10.0,
            end: 11.0,
            ok: true,
            message: String::new(),
            progress,
        };
        let (from, to) = s.around();
        let (a, b) = (
            s.step_at("switch", "start").unwrap(),
            s.step_at("switch", "done").unwrap(),
        );
        assert!(b - a >= 0.19 && b - a < 1.0, "{a} {b}");
        assert!((from - (10.0 + a - AROUND)).abs() < 1e-9);
        assert!((to - (10.0 + b + AROUND)).abs() < 1e-9);
        // Without marks: the whole command.
        let bare = Switch {
            progress: Vec::new(),
            ..s
        };
        assert_eq!(bare.around(), (10.0 - AROUND, 11.0 + AROUND));
    }
}

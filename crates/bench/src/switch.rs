//! `switch`: what clients see while a container app is switched from one image to the other
//! under steady load, on one Docker host, in one run: cutover blue-green, cutover hold, and
//! the naive `docker rm -f web && docker run -d --name web -p 8080:8080 IMAGE` over SSH. Every
//! request of the load is recorded (start, latency, success), so that besides failures and
//! latencies the table shows the longest time in which no request succeeded.

use crate::containers::{ms, DockerWorld, Ledger};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::report::{self, secs, spread, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testlab::{Load, LoadOptions};

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
`ssh host 'docker rm -f web && docker run -d --name web -p 8080:8080 IMAGE'` (a fresh SSH \
connection each time, like an operator's), the load going straight to the published port \
8080. *no switch* is the same load through cutover's proxy for 1 + K seconds with no switch: \
what this machine gives without any switch. A request fails on a connect error, a reset, \
a timeout, a non-2xx status or a short body (testlab's load generator); busybox httpd closes \
every connection after its response, which the keep-alive workers follow without counting a \
failure (so only through the proxy do they really keep their connection). *requests* and \
*failed* count every request of the run (failed ones are fast: a refused connect takes well \
under a millisecond, after which the worker sleeps 20 ms and tries again, so *failed* grows \
with the request rate; the gap does not). *worst* and *p99* are latencies of all requests, \
successful or not, connect included. *longest gap* is the longest time between two \
consecutive successful responses (their ends) anywhere in the run, all workers together. \
*switch time* is the median (min–max) wall time of one switch command, spawn to exit: for \
cutover the whole deploy (SSH connection, resolving the tag and pulling, starting and \
gating the new container, the proxy switch, a check through the proxy, pruning old \
containers; hold stops the old container inside its switch), for naive the \
SSH command (which returns as soon as `docker run` has started the container, not when \
httpd answers). The load and the switches share the machine's 2 cores with the host's \
dockerd, containers and proxy.";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    NoSwitch,
    BlueGreen,
    Hold,
    Naive,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::NoSwitch => "no switch (through the proxy)",
            Method::BlueGreen => "cutover blue-green",
            Method::Hold => "cutover hold",
            Method::Naive => "naive docker rm -f + run",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Method::NoSwitch => "no-switch",
            Method::BlueGreen => "blue-green",
            Method::Hold => "hold",
            Method::Naive => "naive",
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
    let mut go = |method, live: &mut &'static str| -> Result<()> {
        let (run, redone) = measure_undisturbed(ctx, &world, method, k, live)?;
        runs.push(run);
        discarded.extend(redone);
        Ok(())
    };
    go(Method::NoSwitch, &mut live)?;
    go(Method::BlueGreen, &mut live)?;
    world.write_config("hold")?;
    go(Method::Hold, &mut live)?;
    // The naive method's container, started the same way (untimed); cutover's container and
    // proxy stay up, idle.
    world.ssh_ok(&format!(
        "docker rm -f web >/dev/null 2>&1; docker run -d --name web -p {NAIVE_PORT}:8080 {}",
        world.image(live)
    ))?;
    let naive_addr = SocketAddr::new(world.lab.ip(0).into(), NAIVE_PORT);
    world.wait_serves(naive_addr, live, Duration::from_secs(10))?;
    go(Method::Naive, &mut live)?;
    let load_after = loadavg();
    drop(world);

    Ok(section(
        ctx,
        k,
        &runs,
        &discarded,
        &load_before,
        &load_after,
        clock,
        &started,
    ))
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
) -> Result<(Run, Option<Run>)> {
    let first = measure(ctx, world, method, k, live)?;
    let cores = ctx.machine.cores.max(1) as f64;
    if first.foreign_cpu_s() <= 0.25 * first.sample.secs * cores {
        return Ok((first, None));
    }
    eprintln!(
        "[switch] other processes took over a quarter of the CPU during {}: doing it again",
        method.name()
    );
    let again = measure(ctx, world, method, k, live)?;
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
) -> Result<Run> {
    let target = match method {
        Method::Naive => SocketAddr::new(world.lab.ip(0).into(), NAIVE_PORT),
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
            let mut progress = Vec::new();
            let (ok, message) = match method {
                Method::Naive => {
                    let out = world.lab.ssh(
                        0,
                        &format!(
                            "docker rm -f web && docker run -d --name web -p {NAIVE_PORT}:8080 {}",
                            world.image(to)
                        ),
                    );
                    (
                        out.status.success(),
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    )
                }
                _ => {
                    let (d, lines) = world.deploy_traced(to)?;
                    progress = lines;
                    (d.ok, d.message)
                }
            };
            let end = Instant::now();
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
         {}m{:02}s in all (lab and image setup included). Load average before / after: \
         {load_before} / {load_after}.\n\n",
        report::utc_now(),
        ctx.machine.one_line(),
        ctx.command,
        took / 60,
        took % 60
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
            vec![
                r.method.name().to_string(),
                r.all.requests().to_string(),
                r.all.failed().to_string(),
                per_switch(r, r.all.failed()),
                ms(r.all.worst()),
                ms(r.all.latency(0.99, false)),
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
    });
    Section { markdown: md, json }
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

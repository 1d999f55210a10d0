//! `switch-files`: what clients see while a files app is switched from one release to the
//! other under steady load, on one testlab host whose nginx serves `<site root>/current`, in
//! one run: cutover files (`cutover deploy --artifact A|B`), Capistrano (Debian's `cap`
//! deploying the same two trees from git, see [`crate::capistrano`]) and no switch at all.
//! Every request of the load is recorded (start, latency, success), as in [`crate::switch`].

use crate::capistrano::{self, Cap};
use crate::containers::{ms, percentile, Ledger};
use crate::harness::{Payload, World};
use crate::loadgen::{Load, LoadOptions};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::report::{self, secs, spread, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
one testlab host (a network namespace on this machine with its own sshd and nginx; nginx \
serves `/srv/site/current`, following the symlink on every request) and two payloads A and B \
(the deploy-speed payloads: 400 files of 256 KiB of pseudo-random bytes plus `index.html`, \
`version` and `up`; 40 files with `--quick`). Each method gets the same steady load from this \
machine's root namespace on `GET /` (A's or B's `index.html`): 4 keep-alive workers plus 4 \
workers opening a fresh connection per request, each sleeping 20 ms between requests, \
per-request timeout 30 s; and K switches alternating between A and B (K = 10, 3 with \
`--quick`): the load runs 1 s before the first switch, each switch command runs to its exit, \
then the load runs 1 s more before the next. *cutover files* is `cutover deploy --artifact \
A|B` (pack, upload and unpack beside the live release, atomic rename of `current`, health \
gate; its progress lines, timestamped, are in the JSON). *Capistrano* is `cap bench deploy` \
with `BRANCH=a|b` (Debian's capistrano 3.17, default git strategy): A and B are two commits \
of a bare repository on this machine served by `git daemon` over `git://` (with \
`core.bigFileThreshold = 128k`: git stores and sends the random files whole instead of \
searching for deltas they do not have); before the load \
both are deployed once, untimed, so the host's mirror (`/srv/site/repo`) already holds both \
and each switch fetches nothing new; a switch is then Capistrano's `git remote update`, \
`git archive` of the branch into a new `releases/<timestamp>`, the `current` symlink swap, \
the revision log and cleanup (5 releases kept), over net-ssh with strict host key checking. \
Capistrano deploys into the same site root after it was emptied (cutover's releases removed). \
*no switch* is the same load for 1 + K seconds with nothing deployed meanwhile. A request \
fails on a connect error, a reset, a timeout, a non-2xx status or a short body. *requests* \
and *failed* count every request of the run; *longest gap* is the longest time between two \
consecutive successful responses (their ends), all workers together; *p99* and *max during \
switches* are latencies (successful or not, connect included) of the requests started from \
0.5 s before a switch command's start to 0.5 s after its exit, all K switches together (for \
*no switch*: of all requests); *switch time* is the median (min–max) wall time of one switch \
command, spawn to exit. The plots show successful and failed requests per 100 ms: every \
method on one plot, then one per method with its switch commands' starts marked.";

/// Workers of each kind (keep-alive, fresh connection).
const WORKERS: usize = 4;
/// Sleep between two requests of one worker.
const PAUSE: Duration = Duration::from_millis(20);
/// Per-request timeout.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Steady load before the first switch and after each switch.
const SETTLE: Duration = Duration::from_secs(1);
/// Requests started this long before a switch's start or after its end count as "during".
const AROUND: f64 = 0.5;
/// Width of the timeline's buckets.
const BUCKET: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    NoSwitch,
    Cutover,
    Capistrano,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::NoSwitch => "no switch",
            Method::Cutover => "cutover files",
            Method::Capistrano => "Capistrano",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Method::NoSwitch => "no-switch",
            Method::Cutover => "cutover",
            Method::Capistrano => "capistrano",
        }
    }
}

/// One switch command.
#[derive(Debug, Clone)]
struct Switch {
    to: String,
    /// Start and end, seconds since the load's origin.
    start: f64,
    end: f64,
    ok: bool,
    message: String,
    /// cutover's progress lines, seconds since the switch's start.
    progress: Vec<(f64, String)>,
}

struct Run {
    method: Method,
    switches: Vec<Switch>,
    all: Ledger,
    keep_alive: Ledger,
    fresh: Ledger,
    bodies: BTreeMap<String, u64>,
    failures: Vec<String>,
    sample: Sample,
}

impl Run {
    fn switch_secs(&self) -> Vec<f64> {
        self.switches.iter().map(|s| s.end - s.start).collect()
    }

    fn switch_cell(&self) -> String {
        let v = self.switch_secs();
        let (med, min, max) = spread(&v);
        match v.len() {
            0 => "–".into(),
            1 => format!("{} s", secs(med)),
            _ => format!("{} s ({}–{})", secs(med), secs(min), secs(max)),
        }
    }

    /// Latencies of the requests started around the switches (all requests without any).
    fn around(&self) -> Vec<f64> {
        if self.switches.is_empty() {
            return self.all.latencies_in(&[(f64::NEG_INFINITY, f64::INFINITY)]);
        }
        let windows: Vec<(f64, f64)> = self
            .switches
            .iter()
            .map(|s| (s.start - AROUND, s.end + AROUND))
            .collect();
        self.all.latencies_in(&windows)
    }
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let k = if ctx.quick { 3 } else { 10 };
    let (a, b) = ctx.payloads()?;
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = Instant::now();

    let mut world = World::start(1, ctx)?;
    eprintln!("[switch-files] untimed: cutover deploys A");
    world.deploy(a)?;
    let mut runs = Vec::new();
    let mut live = a;
    runs.push(measure(
        ctx,
        &world,
        Method::NoSwitch,
        k,
        &mut live,
        a,
        b,
        None,
    )?);
    runs.push(measure(
        ctx,
        &world,
        Method::Cutover,
        k,
        &mut live,
        a,
        b,
        None,
    )?);

    eprintln!("[switch-files] untimed: emptying the site root, Capistrano deploys A then B");
    world.reset("cap")?;
    let cap = Cap::start(&world, &ctx.work.join("capistrano-git"))?;
    let ca = cap.commit(a, None)?;
    let cb = cap.commit(b, Some(&ca))?;
    cap.set_branches(&[("main", &ca), ("a", &ca), ("b", &cb)])?;
    cap.run_ok("deploy", "a")?;
    cap.run_ok("deploy", "b")?;
    world.verify_serves(&b.label)?;
    live = b;
    runs.push(measure(
        ctx,
        &world,
        Method::Capistrano,
        k,
        &mut live,
        a,
        b,
        Some(&cap),
    )?);
    drop(cap);
    world.reset("done")?;
    let load_after = loadavg();
    drop(world);
    Ok(section(
        ctx,
        k,
        &runs,
        &load_before,
        &load_after,
        clock,
        &started,
    ))
}

/// Runs the load against the host's nginx and switches `k` times with `method` (none for
/// [`Method::NoSwitch`], which runs as long as `k` settle periods).
#[allow(clippy::too_many_arguments)]
fn measure<'p>(
    ctx: &Ctx,
    world: &World,
    method: Method,
    k: usize,
    live: &mut &'p Payload,
    a: &'p Payload,
    b: &'p Payload,
    cap: Option<&Cap>,
) -> Result<Run> {
    let target = world.lab.http_addr(0);
    eprintln!("[switch-files] {}: load on {target}", method.name());
    let options = |keep_alive| LoadOptions {
        workers_per_target: WORKERS,
        keep_alive,
        timeout: TIMEOUT,
        pause: PAUSE,
        record: true,
        ..LoadOptions::new(vec![target])
    };
    let (result, sample) = ctx.meter.time(|| -> Result<_> {
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
            let to: &'p Payload = if std::ptr::eq(*live, a) { b } else { a };
            let branch = if std::ptr::eq(to, a) { "a" } else { "b" };
            let start = Instant::now();
            let mut progress = Vec::new();
            let (ok, message) = match (method, cap) {
                (Method::Capistrano, Some(cap)) => {
                    let r = cap.run("deploy", branch)?;
                    (r.ok, r.message)
                }
                _ => {
                    let (ok, message, lines) = world.deploy_traced(to)?;
                    progress = lines;
                    (ok, message)
                }
            };
            let end = Instant::now();
            eprintln!(
                "[switch-files] {} {}/{k} -> {}: {} in {} s{}",
                method.name(),
                i + 1,
                to.label,
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
                to: to.label.clone(),
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
        })
    });
    let mut run = result?;
    run.sample = sample;
    eprintln!(
        "[switch-files] {}: {} requests, {} failed, worst {}, longest gap {}",
        method.name(),
        run.all.requests(),
        run.all.failed(),
        ms(run.all.worst()),
        ms(run.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0)
    );
    Ok(run)
}

fn section(
    ctx: &Ctx,
    k: usize,
    runs: &[Run],
    load_before: &str,
    load_after: &str,
    clock: Instant,
    started: &str,
) -> Section {
    let took = clock.elapsed().as_secs();
    let mut md = format!(
        "Measured {} on {} with `{}` ({k} switches per method, one run); the scenario took \
         {}m{:02}s in all (lab, payloads and Capistrano setup included); {}. \
         Load average before / after: {load_before} / {load_after}.\n\n",
        report::utc_now(),
        ctx.machine.one_line(),
        ctx.command,
        took / 60,
        took % 60,
        capistrano::version(),
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
            let around = r.around();
            vec![
                r.method.name().to_string(),
                r.all.requests().to_string(),
                r.all.failed().to_string(),
                per_switch(r, r.all.failed()),
                ms(r.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0),
                ms(percentile(&around, 0.99)),
                ms(around.last().copied().unwrap_or(0.0)),
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
            "longest gap without a successful response",
            "p99 latency during switches",
            "max latency during switches",
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
    md.push_str(&format!(
        "Responses by body: {}.\n\n",
        runs.iter()
            .map(|r| format!(
                "{}: {}",
                r.method.name(),
                r.bodies
                    .iter()
                    .map(|(b, n)| format!("`{b}` {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let cores = ctx.machine.cores.max(1) as f64;
    let (foreign, wall) = runs.iter().fold((0.0, 0.0), |(f, w), r| {
        (f + r.sample.foreign_cpu_s, w + r.sample.secs)
    });
    md.push_str(&format!(
        "During the methods' runs, processes outside the bench and its lab (other work on \
         this shared machine) used {:.0}% of the machine's CPU time.\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
    ));

    let mut cutover_failed = serde_json::Map::new();
    for r in runs.iter().filter(|r| r.method == Method::Cutover) {
        cutover_failed.insert(r.method.name().into(), json!(r.all.failed()));
    }
    let json = json!({
        "scenario": "switch-files",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "switches_per_method": k,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "machine": ctx.machine.to_json(),
        "capistrano": capistrano::version(),
        "load_before": load_before,
        "load_after": load_after,
        "load": {
            "keep_alive_workers": WORKERS,
            "fresh_connection_workers": WORKERS,
            "pause_s": PAUSE.as_secs_f64(),
            "timeout_s": TIMEOUT.as_secs_f64(),
            "settle_s": SETTLE.as_secs_f64(),
            "around_switch_s": AROUND,
        },
        "results": runs.iter().map(run_json).collect::<Vec<_>>(),
        "cutover_failed": cutover_failed,
        "plots": timelines(runs),
    });
    Section { markdown: md, json }
}

/// The timeline plots: all methods on one plot (successful and failed requests per 100 ms,
/// one line per method and outcome), then one plot per method with its switches marked.
fn timelines(runs: &[Run]) -> Vec<Value> {
    let ok = |r: &Run| -> Vec<Value> {
        r.all
            .buckets(BUCKET)
            .iter()
            .map(|(t, ok, _)| json!([t, ok]))
            .collect()
    };
    let failed = |r: &Run| -> Vec<Value> {
        r.all
            .buckets(BUCKET)
            .iter()
            .map(|(t, _, f)| json!([t, f]))
            .collect()
    };
    let mut all = Vec::new();
    for r in runs {
        all.push(json!({"name": format!("{}: ok", r.method.name()), "points": ok(r)}));
    }
    for r in runs {
        all.push(json!({"name": format!("{}: failed", r.method.name()), "points": failed(r)}));
    }
    let mut plots = vec![json!({
        "file": "switch-files-timeline.svg",
        "kind": "lines",
        "title": "Files app switched under load: requests per 100 ms, every method",
        "x": "seconds since the method's load started",
        "y": "requests per 100 ms",
        "series": all,
    })];
    for r in runs.iter().filter(|r| !r.switches.is_empty()) {
        let top = r
            .all
            .buckets(BUCKET)
            .iter()
            .map(|(_, ok, f)| *ok.max(f))
            .max()
            .unwrap_or(1) as f64;
        let marks: Vec<Value> = r
            .switches
            .iter()
            .flat_map(|s| [json!([s.start, 0.0]), json!([s.start, top])])
            .collect();
        plots.push(json!({
            "file": format!("switch-files-timeline-{}.svg", r.method.key()),
            "kind": "lines",
            "title": format!("{}: requests per 100 ms across {} switches", r.method.name(), r.switches.len()),
            "x": "seconds since the load started",
            "y": "requests per 100 ms",
            "series": [
                {"name": format!("{}: ok", r.method.name()), "points": ok(r)},
                {"name": format!("{}: failed", r.method.name()), "points": failed(r)},
                {"name": format!("{}: switch", r.method.name()), "points": marks},
            ],
        }));
    }
    plots
}

fn run_json(r: &Run) -> Value {
    let (med, min, max) = spread(&r.switch_secs());
    let around = r.around();
    let switches: Vec<Value> = r
        .switches
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let next = r
                .switches
                .get(i + 1)
                .map(|n| n.start)
                .unwrap_or(f64::INFINITY);
            let (requests, failed) = r.all.window(s.start, next);
            let (gap, gap_at) = r.all.longest_gap(s.start, next);
            let lat = r.all.latencies_in(&[(s.start - AROUND, s.end + AROUND)]);
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
                "p99_during_s": percentile(&lat, 0.99),
                "max_during_s": lat.last().copied().unwrap_or(0.0),
                "progress": s.progress,
            })
        })
        .collect();
    json!({
        "method": r.method.name(),
        "all": r.all.to_json(),
        "keep_alive": r.keep_alive.to_json(),
        "fresh_connection": r.fresh.to_json(),
        "during_switches": {
            "requests": around.len(),
            "p99_s": percentile(&around, 0.99),
            "max_s": around.last().copied().unwrap_or(0.0),
        },
        "bodies": r.bodies,
        "first_failures": r.failures,
        "switch_wall_s": { "median": med, "min": min, "max": max },
        "switches": switches,
        "run": r.sample.to_json(),
    })
}

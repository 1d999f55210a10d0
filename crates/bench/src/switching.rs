//! The skeleton of the switch-under-load scenarios ([`crate::switch`] for container apps,
//! [`crate::switch_files`] for files apps): one steady load (keep-alive and fresh-connection
//! workers, every request recorded), K switches between two versions by a [`Method`], and the
//! tables, JSON and timeline plots of what clients saw. A scenario says how each of its
//! methods switches (a [`Method`]) and which columns its table shows ([`Layout`]); everything
//! else is here.

use crate::containers::{ms, percentile, Ledger};
use crate::events::Trace;
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::report::{self, secs, spread, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testlab::{Load, LoadOptions};

/// Workers of each kind (keep-alive, fresh connection).
pub(crate) const WORKERS: usize = 4;
/// Sleep between two requests of one worker.
pub(crate) const PAUSE: Duration = Duration::from_millis(20);
/// Per-request timeout: long enough for hold's paused requests to count as slow.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);
/// Steady load before the first switch and after each switch.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);
/// Seconds before a switch and after it whose requests make the "around a switch" latencies.
pub(crate) const AROUND: f64 = 0.5;
/// Width of a timeline plot's buckets, seconds.
const BUCKET: f64 = 0.1;

/// One way of switching between two versions, e.g. `cutover deploy`, Capistrano, an nginx
/// reload, or none at all (the baseline).
pub(crate) trait Method {
    /// Short name: JSON, plot file names.
    fn key(&self) -> &'static str;
    /// Name in the tables and plots.
    fn name(&self) -> &'static str;
    /// Where the load goes.
    fn target(&self) -> Result<SocketAddr>;
    /// One of cutover's methods: a failed request fails the run (the zero-downtime gate).
    fn is_cutover(&self) -> bool {
        false
    }
    /// No switch at all: the load runs as long as K settle periods.
    fn is_baseline(&self) -> bool {
        false
    }
    /// Switches to version `to` (runs the command to its exit). A failed switch is returned
    /// (`ok: false`), not an error.
    fn switch(&self, to: &str) -> Result<Switched>;
    /// CPU seconds used so far by what the method runs outside the bench's cgroup (the
    /// host's containers), if it can tell.
    fn outside_cpu_s(&self) -> Option<f64> {
        None
    }
}

/// How one switch command ended.
#[derive(Debug, Clone)]
pub(crate) struct Switched {
    pub(crate) ok: bool,
    pub(crate) message: String,
    /// Its steps (cutover's events, or the marks a script printed), seconds since its start.
    pub(crate) trace: Trace,
}

/// Which requests are "around a switch".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Around {
    /// From [`AROUND`] before the flip step (cutover's `switch` step, or the `switch` marks a
    /// script prints) started to [`AROUND`] after it ended; the whole command without one.
    Flip,
    /// From [`AROUND`] before the command's start to [`AROUND`] after its exit.
    Command,
}

/// A column of a scenario's main table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cell {
    Method,
    Requests,
    Failed,
    FailedPerSwitch,
    /// Slowest request, successful or not.
    Worst,
    /// p99 latency of every request.
    P99,
    /// p99 / max latency of the requests around the switches; "–" without switches.
    AroundP99,
    AroundMax,
    /// The same, but of every request without switches.
    DuringP99,
    DuringMax,
    LongestGap,
    SwitchTime,
}

impl Cell {
    fn header(self) -> &'static str {
        match self {
            Cell::Method => "method",
            Cell::Requests => "requests",
            Cell::Failed => "failed",
            Cell::FailedPerSwitch => "failed per switch",
            Cell::Worst => "worst latency",
            Cell::P99 => "p99 latency",
            Cell::AroundP99 => "p99 around a switch",
            Cell::AroundMax => "max around a switch",
            Cell::DuringP99 => "p99 latency during switches",
            Cell::DuringMax => "max latency during switches",
            Cell::LongestGap => "longest gap without a successful response",
            Cell::SwitchTime => "switch time",
        }
    }
}

/// What a scenario shows.
pub(crate) struct Layout {
    /// The scenario's name: log prefix, plot file prefix (`<name>-timeline-<key>.svg`).
    pub(crate) name: &'static str,
    pub(crate) around: Around,
    /// The main table's columns.
    pub(crate) columns: &'static [Cell],
    /// Title of one more timeline with every method on it, if any.
    pub(crate) combined_timeline: Option<&'static str>,
}

/// One switch command.
#[derive(Debug, Clone)]
pub(crate) struct Switch {
    pub(crate) to: String,
    /// Start and end, seconds since the load's origin.
    pub(crate) start: f64,
    pub(crate) end: f64,
    pub(crate) ok: bool,
    pub(crate) message: String,
    /// Steps, seconds since the switch's start.
    pub(crate) trace: Trace,
}

impl Switch {
    /// The flip step (`switch`), seconds since the switch's start, if the trace has it.
    pub(crate) fn flip(&self) -> (Option<f64>, Option<f64>) {
        (
            self.trace.first_start("switch"),
            self.trace.last_end("switch"),
        )
    }

    /// The requests around this switch: `[from, to)`, seconds since the load's origin.
    pub(crate) fn around(&self, rule: Around) -> (f64, f64) {
        let (from, to) = match rule {
            Around::Flip => self.flip(),
            Around::Command => (None, None),
        };
        (
            from.map_or(self.start, |t| self.start + t) - AROUND,
            to.map_or(self.end, |t| self.start + t) + AROUND,
        )
    }

    /// Where a timeline marks it: the end of its flip step, else the command's start.
    fn mark(&self) -> f64 {
        self.flip().1.map_or(self.start, |t| self.start + t)
    }
}

/// Everything measured for one method.
pub(crate) struct Run {
    pub(crate) key: &'static str,
    pub(crate) name: &'static str,
    pub(crate) cutover: bool,
    pub(crate) around: Around,
    pub(crate) switches: Vec<Switch>,
    pub(crate) all: Ledger,
    pub(crate) keep_alive: Ledger,
    pub(crate) fresh: Ledger,
    /// Bodies served (first line -> count), both loads.
    pub(crate) bodies: BTreeMap<String, u64>,
    /// The first failures of each load, as testlab describes them.
    pub(crate) failures: Vec<String>,
    pub(crate) sample: Sample,
    /// CPU seconds of what the method ran outside the bench's cgroup (0 if unknown).
    pub(crate) outside_cpu_s: f64,
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

    /// Sorted latencies (successful or not) of the requests around the switches; `None`
    /// without switches.
    fn around_latencies(&self) -> Option<Vec<f64>> {
        if self.switches.is_empty() {
            return None;
        }
        let w: Vec<(f64, f64)> = self
            .switches
            .iter()
            .map(|s| s.around(self.around))
            .collect();
        Some(self.all.latencies_in(&w))
    }

    /// The same, of every request without switches.
    fn during_latencies(&self) -> Vec<f64> {
        self.around_latencies()
            .unwrap_or_else(|| self.all.latencies_in(&[(f64::NEG_INFINITY, f64::INFINITY)]))
    }

    fn gap(&self) -> f64 {
        self.all.longest_gap(f64::NEG_INFINITY, f64::INFINITY).0
    }

    /// Other processes' CPU seconds, without what the method ran outside the bench.
    fn foreign_cpu_s(&self) -> f64 {
        (self.sample.foreign_cpu_s - self.outside_cpu_s).max(0.0)
    }

    fn cell(&self, c: Cell) -> String {
        let per_switch = |n: usize| {
            if self.switches.is_empty() {
                "–".to_string()
            } else {
                format!("{:.1}", n as f64 / self.switches.len() as f64)
            }
        };
        let p99 = |v: &[f64]| ms(percentile(v, 0.99));
        let max = |v: &[f64]| ms(v.last().copied().unwrap_or(0.0));
        match c {
            Cell::Method => self.name.to_string(),
            Cell::Requests => self.all.requests().to_string(),
            Cell::Failed => self.all.failed().to_string(),
            Cell::FailedPerSwitch => per_switch(self.all.failed()),
            Cell::Worst => ms(self.all.worst()),
            Cell::P99 => ms(self.all.latency(0.99, false)),
            Cell::AroundP99 => self.around_latencies().map_or("–".into(), |v| p99(&v)),
            Cell::AroundMax => self.around_latencies().map_or("–".into(), |v| max(&v)),
            Cell::DuringP99 => p99(&self.during_latencies()),
            Cell::DuringMax => max(&self.during_latencies()),
            Cell::LongestGap => ms(self.gap()),
            Cell::SwitchTime => self.switch_cell(),
        }
    }
}

/// What every method of a scenario gets: K switches between two versions.
pub(crate) struct Plan<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) layout: &'a Layout,
    pub(crate) k: usize,
    pub(crate) versions: [&'a str; 2],
}

/// [`measure_once`], done once more if other processes took over a quarter of the machine's
/// CPU during it (the bench's rule, see `meter`; once only, as a method's run is long; never
/// with `--quick`). Returns the run kept and the one discarded, if any; `live` is the version
/// served, before and after.
pub(crate) fn measure(
    plan: &Plan,
    method: &dyn Method,
    live: &mut String,
) -> Result<(Run, Option<Run>)> {
    let first = measure_once(plan, method, live)?;
    let cores = plan.ctx.machine.cores.max(1) as f64;
    if plan.ctx.quick || first.foreign_cpu_s() <= 0.25 * first.sample.secs * cores {
        return Ok((first, None));
    }
    eprintln!(
        "[{}] other processes took over a quarter of the CPU during {}: doing it again",
        plan.layout.name,
        method.name()
    );
    let again = measure_once(plan, method, live)?;
    Ok((again, Some(first)))
}

/// Runs the load against the method's target and switches K times between the versions,
/// starting from the one that is `live` (none for a baseline, which runs as long as K settle
/// periods).
fn measure_once(plan: &Plan, method: &dyn Method, live: &mut String) -> Result<Run> {
    let Plan {
        ctx,
        layout,
        k,
        versions,
    } = *plan;
    let tag = layout.name;
    let target = method.target()?;
    eprintln!("[{tag}] {}: load on {target}", method.name());
    let options = |keep_alive| LoadOptions {
        workers_per_target: WORKERS,
        keep_alive,
        timeout: TIMEOUT,
        pause: PAUSE,
        record: true,
        ..LoadOptions::new(vec![target])
    };
    let (result, sample) = ctx.meter.time(|| -> Result<_> {
        let c0 = method.outside_cpu_s();
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
        let n = if method.is_baseline() {
            std::thread::sleep(SETTLE * k as u32);
            0
        } else {
            k
        };
        for i in 0..n {
            let to = if live.as_str() == versions[0] {
                versions[1]
            } else {
                versions[0]
            };
            let start = Instant::now();
            let s = method.switch(to)?;
            let end = Instant::now();
            eprintln!(
                "[{tag}] {} {}/{k} -> {to}: {} in {} s{}",
                method.name(),
                i + 1,
                if s.ok { "ok" } else { "FAILED" },
                secs((end - start).as_secs_f64()),
                if s.ok {
                    String::new()
                } else {
                    format!(": {}", s.message)
                }
            );
            if s.ok {
                *live = to.to_string();
            }
            switches.push(Switch {
                to: to.to_string(),
                start: since(start),
                end: since(end),
                ok: s.ok,
                message: s.message,
                trace: s.trace,
            });
            std::thread::sleep(SETTLE);
        }
        let (ka_started, fresh_started) = (ka.started(), fresh.started());
        let ka = ka.stop();
        let fresh = fresh.stop();
        let stop = Instant::now();
        let outside_cpu_s = match (c0, method.outside_cpu_s()) {
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
            key: method.key(),
            name: method.name(),
            cutover: method.is_cutover(),
            around: layout.around,
            switches,
            all: Ledger::new(origin, &[(ka_started, &ka), (fresh_started, &fresh)], stop),
            keep_alive: Ledger::new(origin, &[(ka_started, &ka)], stop),
            fresh: Ledger::new(origin, &[(fresh_started, &fresh)], stop),
            bodies,
            failures,
            sample: Sample::default(),
            outside_cpu_s,
        })
    });
    let mut run = result?;
    run.sample = sample;
    eprintln!(
        "[{tag}] {}: {} requests, {} failed, worst {}, longest gap {}",
        run.name,
        run.all.requests(),
        run.all.failed(),
        ms(run.all.worst()),
        ms(run.gap())
    );
    Ok(run)
}

/// The tables and paragraphs after a scenario's head: the main table (the layout's columns),
/// the table by kind of worker, the failed switch commands, the bodies served and how much
/// other work shared the machine.
fn markdown(ctx: &Ctx, layout: &Layout, runs: &[Run], discarded: &[Run]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| layout.columns.iter().map(|&c| r.cell(c)).collect())
        .collect();
    let header: Vec<&str> = layout.columns.iter().map(|c| c.header()).collect();
    let mut md = report::table(&header, &rows);
    md.push_str(&format!("\nBy kind of worker ({WORKERS} each):\n\n"));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.name.to_string(),
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
                        r.name,
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
                r.name,
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
        (f + r.foreign_cpu_s(), w + r.sample.secs)
    });
    let waited = runs.iter().map(|r| r.sample.waited_s).fold(0.0, f64::max);
    md.push_str(&format!(
        "Before each method the bench waited for an idle machine (longest wait here \
         {waited:.1} s); during the methods' runs, processes outside the bench and its lab \
         (other work on this shared machine) used {:.0}% of the machine's CPU time. Methods \
         run again because other processes took over a quarter of the CPU during them: {} (in \
         the JSON under `discarded`).\n",
        if wall > 0.0 {
            100.0 * foreign / (wall * cores)
        } else {
            0.0
        },
        discarded.len()
    ));
    md
}

/// When and how a scenario ran, for the head of its section.
pub(crate) struct Head {
    started: String,
    clock: Instant,
    load_before: String,
    /// What the scenario's time includes besides the methods' runs.
    setup: &'static str,
    /// The peers' versions, one line.
    peers: String,
}

impl Head {
    /// The scenario starts now.
    pub(crate) fn start(setup: &'static str) -> Head {
        Head {
            started: report::utc_now(),
            clock: Instant::now(),
            load_before: loadavg(),
            setup,
            peers: String::new(),
        }
    }

    pub(crate) fn peers(&mut self, line: String) {
        self.peers = line;
    }
}

/// The scenario's section: a head (when, where, how long), the tables and paragraphs of
/// [`markdown`]; its JSON has the scenario's settings, the load's, every run (and the
/// discarded ones), the cutover methods' failed requests (the zero-downtime gate), the plots
/// and the keys of `extra` (an object).
pub(crate) fn section(
    plan: &Plan,
    head: &Head,
    runs: &[Run],
    discarded: &[Run],
    extra: Value,
) -> Section {
    let Plan { ctx, layout, k, .. } = *plan;
    let load_after = loadavg();
    let took = head.clock.elapsed().as_secs();
    let mut md = format!(
        "Measured {} on {} with `{}` ({k} switches per method, one run); the scenario took \
         {}m{:02}s in all ({}); {}. Load average before / after: {} / {load_after}.\n\n",
        report::utc_now(),
        ctx.machine.one_line(),
        ctx.command,
        took / 60,
        took % 60,
        head.setup,
        head.peers,
        head.load_before,
    );
    md.push_str(&markdown(ctx, layout, runs, discarded));
    let rest = json!({
        "switches_per_method": k,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "peers": head.peers,
        "load": {
            "keep_alive_workers": WORKERS,
            "fresh_connection_workers": WORKERS,
            "pause_s": PAUSE.as_secs_f64(),
            "timeout_s": TIMEOUT.as_secs_f64(),
            "settle_s": SETTLE.as_secs_f64(),
            "around_switch_s": AROUND,
        },
        "results": runs.iter().map(run_json).collect::<Vec<_>>(),
        "discarded": discarded.iter().map(run_json).collect::<Vec<_>>(),
        "cutover_failed": runs
            .iter()
            .filter(|r| r.cutover)
            .map(|r| (r.key.to_string(), json!(r.all.failed())))
            .collect::<serde_json::Map<_, _>>(),
        "plots": plots(layout, runs),
    });
    let mut json = report::scenario_json(
        ctx,
        layout.name,
        &head.started,
        &head.load_before,
        &load_after,
        rest,
    );
    if let (Some(j), Value::Object(e)) = (json.as_object_mut(), extra) {
        j.extend(e);
    }
    Section { markdown: md, json }
}

/// Successful and failed requests per bucket of a run, as two polylines.
fn ok_and_failed(r: &Run) -> (Vec<[f64; 2]>, Vec<[f64; 2]>, f64) {
    let b = r.all.buckets(BUCKET);
    let ok = b.iter().map(|&(t, ok, _)| [t, ok as f64]).collect();
    let failed = b.iter().map(|&(t, _, f)| [t, f as f64]).collect();
    let top = b.iter().map(|&(_, ok, f)| ok.max(f)).max().unwrap_or(0) as f64;
    (ok, failed, top)
}

/// A timeline per method (successful and failed requests per 100 ms, x = seconds since the
/// method's load started, each switch marked where its flip ended, or where the command
/// started), the combined timeline if the layout has one, and bars of failed requests per
/// switch and of the longest gap.
fn plots(layout: &Layout, runs: &[Run]) -> Value {
    let x = "seconds since the method's load started";
    let mut plots = Vec::new();
    if let Some(title) = layout.combined_timeline {
        let lines: Vec<_> = runs.iter().map(|r| (r.name, ok_and_failed(r))).collect();
        let mut series: Vec<Value> = lines
            .iter()
            .map(|(n, (ok, _, _))| json!({"name": format!("{n}: ok"), "points": ok}))
            .collect();
        series.extend(
            lines
                .iter()
                .map(|(n, (_, f, _))| json!({"name": format!("{n}: failed"), "points": f})),
        );
        plots.push(json!({
            "file": format!("{}-timeline.svg", layout.name),
            "kind": "lines",
            "title": title,
            "x": x,
            "y": "requests per 100 ms",
            "series": series,
        }));
    }
    for r in runs {
        let (ok, failed, top) = ok_and_failed(r);
        // One polyline for all marks: down the baseline between them.
        let marks: Vec<[f64; 2]> = r
            .switches
            .iter()
            .flat_map(|s| {
                let t = s.mark();
                [[t, 0.0], [t, top], [t, 0.0]]
            })
            .collect();
        let mut series = vec![
            json!({"name": format!("{}: ok", r.name), "points": ok}),
            json!({"name": format!("{}: failed", r.name), "points": failed}),
        ];
        if !marks.is_empty() {
            series.push(json!({"name": format!("{}: switch", r.name), "points": marks}));
        }
        plots.push(json!({
            "file": format!("{}-timeline-{}.svg", layout.name, r.key),
            "kind": "lines",
            "title": if r.switches.is_empty() {
                format!("{}: requests per 100 ms", r.name)
            } else {
                format!("{}: requests per 100 ms across {} switches", r.name, r.switches.len())
            },
            "x": x,
            "y": "requests per 100 ms",
            "series": series,
        }));
    }
    let switched: Vec<&Run> = runs.iter().filter(|r| !r.switches.is_empty()).collect();
    let names: Vec<&str> = switched.iter().map(|r| r.name).collect();
    // File `<scenario>-<what>.svg`; the series is named by its y axis.
    let bars = |what: &str, title: &str, y: &str, values: Vec<f64>| {
        json!({
            "file": format!("{}-{what}.svg", layout.name),
            "kind": "bars",
            "title": title,
            "y": y,
            "categories": names,
            "series": [{"name": y, "values": values}],
        })
    };
    plots.push(bars(
        "failed",
        "Failed requests per switch",
        "failed requests per switch",
        switched
            .iter()
            .map(|r| r.all.failed() as f64 / r.switches.len() as f64)
            .collect(),
    ));
    plots.push(bars(
        "gap",
        "Longest time without a successful response",
        "longest gap, milliseconds",
        switched.iter().map(|r| 1000.0 * r.gap()).collect(),
    ));
    Value::Array(plots)
}

fn latencies_json(v: &[f64]) -> Value {
    json!({
        "requests": v.len(),
        "p99_s": percentile(v, 0.99),
        "max_s": v.last().copied().unwrap_or(0.0),
    })
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
            let (from, to) = s.around(r.around);
            let (flip_start, flip_done) = s.flip();
            let mut around = latencies_json(&r.all.latencies_in(&[(from, to)]));
            around["from_s"] = json!(from);
            around["to_s"] = json!(to);
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
                "switch_step_start_s_after_switch_start": flip_start,
                "switch_step_end_s_after_switch_start": flip_done,
                "around_switch": around,
                "steps": s.trace.to_json(),
            })
        })
        .collect();
    json!({
        "method": r.key,
        "name": r.name,
        "cutover": r.cutover,
        "around": match r.around {
            Around::Flip => "switch step",
            Around::Command => "switch command",
        },
        "all": r.all.to_json(),
        "keep_alive": r.keep_alive.to_json(),
        "fresh_connection": r.fresh.to_json(),
        "around_switches": r.around_latencies().map(|v| latencies_json(&v)),
        "bodies": r.bodies,
        "first_failures": r.failures,
        "switch_wall_s": { "median": med, "min": min, "max": max },
        "switches": switches,
        "run": r.sample.to_json(),
        "outside_cpu_s": r.outside_cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{State, Step};

    fn step(at: f64, state: State) -> Step {
        Step {
            at,
            host: Some("host".into()),
            step: "switch".into(),
            state,
            detail: String::new(),
        }
    }

    #[test]
    fn around_a_switch_is_its_flip_step_or_its_command() {
        let s = Switch {
            to: "a".into(),
            start: 10.0,
            end: 11.0,
            ok: true,
            message: String::new(),
            trace: Trace {
                steps: vec![step(0.25, State::Start), step(0.5, State::Done)],
            },
        };
        assert_eq!(s.around(Around::Flip), (10.25 - AROUND, 10.5 + AROUND));
        assert_eq!(s.around(Around::Command), (10.0 - AROUND, 11.0 + AROUND));
        assert_eq!(s.mark(), 10.5);
        let bare = Switch {
            trace: Trace::default(),
            ..s
        };
        assert_eq!(bare.around(Around::Flip), (10.0 - AROUND, 11.0 + AROUND));
        assert_eq!(bare.mark(), 10.0);
    }
}

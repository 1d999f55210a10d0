//! `footprint`: what cutover costs the machines it runs on. The size of the `cutover`
//! binary; the memory of the edge proxy, idle and after load (from the `proxy` scenario);
//! and the peak memory and CPU seconds of the control process, `cutover deploy`, shipping
//! the 100 MiB payload to 16 hosts (10 MiB to 4 with `--quick`).
//!
//! The deploy is watched three ways: the `cutover` process alone (`VmHWM` from
//! `/proc/<pid>/status`, polled, and its user+sys CPU from `/proc/<pid>/stat`, read when it
//! has exited and before it is reaped, so nothing is lost); cutover plus the children it
//! waited for (the same `stat`'s `cutime`/`cstime`: its ssh sessions); and cutover plus every
//! process it started (a cpuacct cgroup of its own, nested in the bench's: this includes
//! the ssh control masters, which daemonize and are never waited for, and which do the
//! encryption of everything uploaded), with the peak of their summed RSS, polled.

use crate::harness::World;
use crate::machine::loadavg;
use crate::report::{self, mib, secs, spread, Samples, Section};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
*Binary* is the size of the `cutover` executable that the bench built (and measured), and of a \
copy stripped with `strip` (the release profile keeps the symbol table). *Edge proxy* memory is \
`VmRSS` of the `cutover proxy run` process on a test host, read by the `proxy` scenario of the \
same run (or, if it did not run, of its latest results, whose date is given): idle after a \
deploy, right after each of its load rounds (8 keep-alive workers, no pause) and the peak \
(`VmHWM`). *Control process* is `cutover deploy --json --artifact A` of the 100 MiB payload \
(10 MiB with `--quick`) to 16 fresh hosts (4 with `--quick`), site roots and data dir emptied \
before each run; a cell is the median (min–max) of the runs. *cutover alone* is the `cutover` \
process: peak RSS is its `VmHWM` (polled every 20 ms while it runs; the kernel updates it as \
the process grows), CPU is user+sys from `/proc/<pid>/stat`, read once it has exited and \
before it is reaped. *+ waited-for children* adds that `stat`'s `cutime`+`cstime`: the \
processes cutover waited for (the ssh sessions that run each step). *+ all its processes* is \
the CPU of a cpuacct cgroup that the `cutover` process is moved into right after spawn, so \
everything it starts is counted, including the per-host ssh control masters (they daemonize, \
are never waited for, and encrypt every byte uploaded); its peak RSS is the largest sum of \
`VmRSS` over the group's processes seen by the 20 ms polls (shared pages such as libraries are \
counted once per process). The hosts' side (sshd, tar, nginx) is not included in any of these.";

const CPUACCT: &str = "/sys/fs/cgroup/cpuacct";
const POLL: Duration = Duration::from_millis(20);
/// A deploy taking longer than this is killed and the scenario fails.
const DEPLOY_LIMIT: Duration = Duration::from_secs(900);

/// One watched deploy.
#[derive(Debug, Clone, Default)]
struct Watched {
    wall_s: f64,
    /// Peak RSS of the cutover process (KiB).
    own_hwm_kib: u64,
    /// user+sys of the cutover process.
    own_cpu_s: f64,
    /// user+sys of cutover and the children it waited for.
    waited_cpu_s: f64,
    /// cpuacct usage of cutover and everything it started (None without a cgroup).
    tree_cpu_s: Option<f64>,
    /// Peak of the summed VmRSS of the group's processes (KiB; 0 without a cgroup).
    tree_rss_kib: u64,
    /// Most processes seen in the group at once.
    tree_procs: usize,
    uploaded_bytes: u64,
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = Instant::now();

    let (size, stripped) = binary_sizes(ctx)?;

    // The edge proxy, from the proxy scenario.
    let (proxy_mem, proxy_source) = proxy_memory(ctx);

    // The control process.
    let (a, _) = ctx.payloads()?;
    let hosts = if ctx.quick { 4 } else { 16 };
    let mut world = World::start(hosts, ctx)?;
    let mut runs: Vec<Watched> = Vec::new();
    let mut samples = Samples::default();
    for rep in 0..ctx.reps {
        world.reset(&format!("fp{rep}"))?;
        eprintln!(
            "[footprint] deploy of {} to {hosts} hosts, run {}/{}",
            mib(a.bytes()),
            rep + 1,
            ctx.reps
        );
        let (w, sample) = ctx.meter.time(|| watch_deploy(&world, &a.dir, rep));
        let w = w?;
        world.verify_serves(&a.label)?;
        samples.push(sample);
        runs.push(w);
    }
    drop(world);
    let load_after = loadavg();

    // Report.
    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str("\n\n");
    md.push_str(&sizes_table(ctx, size, stripped, proxy_mem.as_ref()));
    md.push_str(&format!("\nEdge proxy numbers: {proxy_source}.\n\n"));

    md.push_str(&control_table(hosts, a.bytes(), &samples, &runs));
    md.push('\n');
    md.push_str(&report::interference_line(
        &[&samples],
        ctx.machine.cores,
        0,
    ));
    md.push('\n');

    let rest = json!({
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "discarded": [],
        "binary": {
            "path": ctx.cutover,
            "profile": ctx.machine.profile,
            "bytes": size,
            "stripped_bytes": stripped,
        },
        "proxy_memory_kib": proxy_mem,
        "proxy_memory_source": proxy_source,
        "deploy": {
            "hosts": hosts,
            "payload": { "files": a.files, "file_size": a.file_size, "bytes": a.bytes() },
            "wall": samples.to_json(),
            "runs": runs.iter().map(|r| json!({
                "wall_s": r.wall_s,
                "cutover_peak_rss_kib": r.own_hwm_kib,
                "cutover_cpu_s": r.own_cpu_s,
                "cutover_and_waited_children_cpu_s": r.waited_cpu_s,
                "cutover_and_all_descendants_cpu_s": r.tree_cpu_s,
                "cutover_and_all_descendants_peak_rss_sum_kib": r.tree_rss_kib,
                "most_processes_at_once": r.tree_procs,
                "uploaded_bytes_all_hosts": r.uploaded_bytes,
            })).collect::<Vec<_>>(),
        },
        "plots": [memory_plot(ctx, hosts, proxy_mem.as_ref(), &runs)],
    });
    let json = report::scenario_json(ctx, "footprint", &started, &load_before, &load_after, rest);
    Ok(Section { markdown: md, json })
}

/// The size of the `cutover` binary, and stripped if `strip` can say (bytes).
fn binary_sizes(ctx: &Ctx) -> Result<(u64, Option<u64>)> {
    let size = std::fs::metadata(&ctx.cutover)
        .with_context(|| format!("reading {}", ctx.cutover.display()))?
        .len();
    let stripped_path = ctx.work.join("cutover-stripped");
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped_path)
        .arg(&ctx.cutover)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&stripped_path).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&stripped_path);
    Ok((size, stripped))
}

/// The table of sizes: the binary, and the edge proxy's memory from the `proxy` scenario's
/// JSON (`proxy_mem`) when it ran.
fn sizes_table(ctx: &Ctx, size: u64, stripped: Option<u64>, proxy_mem: Option<&Value>) -> String {
    let bin_cell = match stripped {
        Some(s) if s != size => format!("{} ({} stripped)", mib(size), mib(s)),
        _ => mib(size),
    };
    let mut rows = vec![vec![
        format!("`cutover` binary ({} profile)", ctx.machine.profile),
        bin_cell,
    ]];
    match proxy_mem {
        Some(all) => {
            // The `proxy` scenario keeps one entry per proxy; cutover's is `proxy`.
            let p = all.get("proxy").unwrap_or(all);
            rows.push(vec![
                "edge proxy RSS, idle".into(),
                kib(p["idle_rss"].as_u64().unwrap_or(0)),
            ]);
            let after = p
                .get("rss_after_each_load")
                .or_else(|| p.get("rss_after_each_proxy_load"))
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).max().unwrap_or(0))
                .unwrap_or(0);
            rows.push(vec![
                "edge proxy RSS, right after load (largest)".into(),
                kib(after),
            ]);
            rows.push(vec![
                "edge proxy peak RSS (VmHWM)".into(),
                kib(p["peak_rss_at_end"].as_u64().unwrap_or(0).max(after)),
            ]);
        }
        None => rows.push(vec![
            "edge proxy RSS".into(),
            "– (run the `proxy` scenario)".into(),
        ]),
    }
    report::table(&["what", "size"], &rows)
}

/// The table of the control process's cost: the deploy of `bytes` to `hosts` hosts, its
/// wall time (`samples`) and what each run's processes used (`runs`).
fn control_table(hosts: usize, bytes: u64, samples: &Samples, runs: &[Watched]) -> String {
    let f = |v: Vec<f64>, fmt: &dyn Fn(f64) -> String| -> String {
        let (med, min, max) = spread(&v);
        if v.len() > 1 {
            format!("{} ({}–{})", fmt(med), fmt(min), fmt(max))
        } else {
            fmt(med)
        }
    };
    let mem = |k: f64| format!("{:.1} MiB", k / 1024.0);
    let cpu = |s: f64| format!("{} s", secs(s));
    let col = |g: &dyn Fn(&Watched) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    let tree_known = runs.iter().all(|r| r.tree_cpu_s.is_some());
    let mut md = format!(
        "Control process: `cutover deploy` of {} to {hosts} hosts, wall time {}:\n\n",
        mib(bytes),
        samples.cell()
    );
    let unknown = || "–".to_string();
    md.push_str(&report::table(
        &["processes", "peak RSS", "CPU seconds (user+sys)"],
        &[
            vec![
                "cutover alone".into(),
                f(col(&|r| r.own_hwm_kib as f64), &mem),
                f(col(&|r| r.own_cpu_s), &cpu),
            ],
            vec![
                "cutover + waited-for children (ssh sessions)".into(),
                unknown(),
                f(col(&|r| r.waited_cpu_s), &cpu),
            ],
            vec![
                format!(
                    "cutover + all its processes (incl. ssh control masters; up to {} at once)",
                    runs.iter().map(|r| r.tree_procs).max().unwrap_or(0)
                ),
                if tree_known {
                    f(col(&|r| r.tree_rss_kib as f64), &mem)
                } else {
                    unknown()
                },
                if tree_known {
                    f(col(&|r| r.tree_cpu_s.unwrap_or(0.0)), &cpu)
                } else {
                    unknown()
                },
            ],
        ],
    ));
    md
}

/// The memory plot: the edge proxy idle and at its peak (when the `proxy` scenario ran), the
/// deploy's own peak RSS and, when known, with its ssh processes (medians of the runs).
fn memory_plot(ctx: &Ctx, hosts: usize, proxy_mem: Option<&Value>, runs: &[Watched]) -> Value {
    let col = |g: &dyn Fn(&Watched) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    let tree_known = runs.iter().all(|r| r.tree_cpu_s.is_some());
    let median = |v: Vec<f64>| spread(&v).0;
    let mut categories = Vec::new();
    let mut values = Vec::new();
    if let Some(all) = proxy_mem {
        let p = all.get("proxy").unwrap_or(all);
        categories.push("edge proxy, idle".to_string());
        values.push(p["idle_rss"].as_f64().unwrap_or(0.0) / 1024.0);
        categories.push("edge proxy, peak".to_string());
        values.push(p["peak_rss_at_end"].as_f64().unwrap_or(0.0) / 1024.0);
    }
    categories.push(format!("cutover deploy to {hosts} hosts"));
    values.push(median(col(&|r| r.own_hwm_kib as f64)) / 1024.0);
    if tree_known {
        categories.push("deploy + its ssh processes".to_string());
        values.push(median(col(&|r| r.tree_rss_kib as f64)) / 1024.0);
    }
    json!({
        "file": "footprint-memory.svg",
        "kind": "bars",
        "title": "Memory: the edge proxy and the control process (median peak RSS)",
        "y": "MiB",
        "categories": categories,
        "series": [{"name": format!("RSS, MiB ({} profile)", ctx.machine.profile), "values": values}],
    })
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

/// The `proxy` scenario's `proxy_memory_kib`: from this run if it ran, else from its latest
/// results file; with a sentence saying which.
fn proxy_memory(ctx: &Ctx) -> (Option<Value>, String) {
    if let Some(p) = ctx.results.borrow().get("proxy") {
        let m = p.get("proxy_memory_kib").cloned();
        return (m, "from the `proxy` scenario of this run".into());
    }
    let path = ctx.out.join("bench/results/proxy.json");
    match std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        Some(p) if p.get("proxy_memory_kib").is_some() => (
            p.get("proxy_memory_kib").cloned(),
            format!(
                "not measured in this run; from the latest `proxy` results \
                 (bench/results/proxy.json, finished {}, `{}`)",
                p["finished"].as_str().unwrap_or("?"),
                p["command"].as_str().unwrap_or("?")
            ),
        ),
        _ => (
            None,
            "not measured: the `proxy` scenario did not run and has no results".into(),
        ),
    }
}

/// The cpuacct group this process is in, as a directory (e.g. the bench meter's group).
fn own_cpuacct_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrl.split(',')
            .any(|c| c == "cpuacct")
            .then(|| path.to_string())
    })?;
    let dir = Path::new(CPUACCT).join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// A cpuacct group nested in this process's own; removed on drop (its remaining processes
/// moved back to the parent).
struct Group(PathBuf);

impl Group {
    fn new(name: &str) -> Option<Group> {
        let dir = own_cpuacct_dir()?.join(name);
        std::fs::create_dir(&dir).ok()?;
        Some(Group(dir))
    }

    fn add(&self, pid: u32) -> bool {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).is_ok()
    }

    fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.0.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn cpu_s(&self) -> Option<f64> {
        let ns: u64 = std::fs::read_to_string(self.0.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(ns as f64 / 1e9)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            for p in self.procs() {
                let _ = std::fs::write(parent.join("cgroup.procs"), p.to_string());
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "[footprint] could not remove the cgroup {}",
            self.0.display()
        );
    }
}

/// `/proc/<pid>/stat`: (state, utime+stime, cutime+cstime) in seconds.
fn stat(pid: u32) -> Option<(char, f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime..cstime are fields 14..17.
    let state = f.first()?.chars().next()?;
    let n = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    let ticks = 100.0; // USER_HZ
    Some((
        state,
        (n(14)? + n(15)?) as f64 / ticks,
        (n(16)? + n(17)?) as f64 / ticks,
    ))
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `cutover deploy --json --artifact dir` and watches it (see the module docs).
fn watch_deploy(world: &World<'_>, dir: &Path, rep: usize) -> Result<Watched> {
    let group = Group::new(&format!("footprint-{}-{rep}", std::process::id()));
    let t = Instant::now();
    let mut child = world
        .cutover(&["deploy", "--json", "--artifact", &dir.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cutover deploy")?;
    let pid = child.id();
    let in_group = group.as_ref().is_some_and(|g| g.add(pid));
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let mut w = Watched::default();
    // Poll until the process is a zombie (exited, not yet reaped): its stat still holds
    // its final CPU times.
    let final_stat = loop {
        match stat(pid) {
            Some(('Z', own, waited)) => break Some((own, waited)),
            Some(_) => {}
            None => break None,
        }
        if let Some(h) = status_kib(pid, "VmHWM") {
            w.own_hwm_kib = w.own_hwm_kib.max(h);
        }
        if let (Some(g), true) = (&group, in_group) {
            let procs = g.procs();
            w.tree_procs = w.tree_procs.max(procs.len());
            let sum: u64 = procs.iter().filter_map(|&p| status_kib(p, "VmRSS")).sum();
            w.tree_rss_kib = w.tree_rss_kib.max(sum);
        }
        if t.elapsed() > DEPLOY_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("cutover deploy did not finish in {DEPLOY_LIMIT:?}");
        }
        std::thread::sleep(POLL);
    };
    let status = child.wait().context("waiting for cutover deploy")?;
    w.wall_s = t.elapsed().as_secs_f64();
    let (own, waited) = final_stat.ok_or_else(|| anyhow!("lost /proc/{pid}/stat"))?;
    w.own_cpu_s = own;
    w.waited_cpu_s = own + waited;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let json: Value = serde_json::from_slice(&stdout).unwrap_or(Value::Null);
    if !status.success() || json["status"] != "succeeded" {
        bail!(
            "cutover deploy exited with {status}: {}\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    w.uploaded_bytes = json["hosts"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|h| h["uploaded_bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    if let (Some(g), true) = (&group, in_group) {
        // ssh control masters may still be on their way out: let the group empty.
        let until = Instant::now() + Duration::from_secs(3);
        while !g.procs().is_empty() && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        w.tree_cpu_s = g.cpu_s();
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_a_live_process_and_a_zombie() {
        let (state, own, waited) = stat(std::process::id()).unwrap();
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(own >= 0.0 && waited >= 0.0);
        assert!(status_kib(std::process::id(), "VmHWM").unwrap() > 0);
        // A child that burns a little CPU, then exits: its zombie keeps its CPU time.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let t = Instant::now();
        let final_cpu = loop {
            let (s, own, _) = stat(pid).unwrap();
            if s == 'Z' {
                break own;
            }
            assert!(t.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status_kib(pid, "VmHWM").is_none(), "a zombie has no memory");
        child.wait().unwrap();
        assert!(final_cpu > 0.0, "{final_cpu}");
        assert!(stat(pid).is_none());
    }
}

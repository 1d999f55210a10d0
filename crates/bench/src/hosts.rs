//! `hosts`: one deploy of a small files payload to 10, 50 and 100 testlab *light* hosts (sshd
//! and busybox's web server per host, no nginx), next to the parallel `tar | ssh` floor; the
//! warm rollback; the control side's memory during a deploy (cutover alone, and with the
//! OpenSSH processes it runs); `[ssh] parallel` swept on the largest host count; and what the
//! per-host OpenSSH master costs next to its alternative, a fresh connection per command.

use crate::harness::{Payload, World};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::report::{self, secs, Samples, Section};
use crate::Ctx;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
the payload is a directory of 20 files of 16 KiB of pseudo-random bytes (plus `index.html`, \
`version` and `up`: 320 KiB), two different ones, A and B. Each host count gets a fresh lab \
of testlab's light hosts (a network namespace with its own sshd and `busybox nc -ll -e httpd \
-i` serving `<root>/current`; no nginx) and `[ssh] parallel = 16`. Per \
repetition, the hosts' site roots and cutover's data dir are emptied, then: *deploy 1st* is \
`cutover deploy --json --artifact A` onto empty hosts, *deploy 2nd* the deploy of B right \
after, *rollback (warm)* is `cutover rollback --json` right after that (back to A, still on \
every host), each timed from spawn to exit and then checked over HTTP on every host (untimed); \
*floor tar* is `tar cf - -C A . | ssh host 'mkdir -p D && tar xf - -C D'` started for all \
hosts at once with the same identity and known_hosts, from the first spawn to the last exit. \
CPU seconds are all processes of the run, both sides (the hosts' sshd and shells included). \
*Memory* comes from one more deploy of B after A (untimed, not one of the samples) during \
which the bench reads, every 100 ms, the proportional set size (Pss, from \
`/proc/PID/smaps_rollup`: shared pages divided among the processes sharing them) of the \
cutover process and of every `ssh` process whose command line names cutover's control \
directory (`/tmp/cutover-<pid>-N`: the masters, which `ssh -f` detaches, and the commands \
multiplexed over them); the table gives the peak of cutover alone, the peak of cutover plus \
those ssh processes at the same instant, and the most ssh processes seen at once. The \
*parallel* table (full runs only, on 100 hosts) deploys A, B, A, ... once per value of \
`[ssh] parallel`, right after the memory deploy (no reset in between: each deploy replaces the \
live release with the other payload), memory polled as above. The *OpenSSH* table (on the largest host count) \
measures the two ways to run 5 commands (`true`) per host, 16 hosts at a time: through one \
master per host (`ssh -M -N -f`, then `ssh -S <socket>` per command, as cutover does; the \
masters' Pss read while all are up, idle) and with a fresh connection per command (no master; \
the Pss peak polled every 100 ms).";

/// Files and bytes per file of the payloads.
const FILES: usize = 20;
const FILE_SIZE: usize = 16 << 10;
/// `[ssh] parallel` values the sweep tries.
const SWEEP: &[usize] = &[8, 16, 32, 100];
/// Commands per host in the OpenSSH comparison, and hosts at a time.
const COMMANDS: usize = 5;
const AT_ONCE: usize = 16;

/// Peak memory of the control side during one run.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    cutover_kib: u64,
    with_ssh_kib: u64,
    ssh_procs: usize,
}

impl Memory {
    fn to_json(self) -> Value {
        json!({
            "cutover_pss_kib": self.cutover_kib,
            "cutover_and_ssh_pss_kib": self.with_ssh_kib,
            "ssh_processes": self.ssh_procs,
        })
    }
}

struct Row {
    hosts: usize,
    first: Samples,
    second: Samples,
    rollback: Samples,
    floor: Samples,
    memory: Memory,
}

struct SweepRow {
    parallel: usize,
    sample: Sample,
    memory: Memory,
}

/// The two ways of running commands over OpenSSH, measured on one lab.
struct Alternatives {
    hosts: usize,
    masters_connect: Sample,
    masters_commands: Sample,
    masters_pss_kib: u64,
    fresh_commands: Sample,
    fresh_peak_pss_kib: u64,
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let counts: &[usize] = if ctx.quick { &[10] } else { &[10, 50, 100] };
    let load_before = loadavg();
    let clock = Instant::now();
    let a = Payload::create(&ctx.work.join("hosts-a"), "hosts-a", FILES, FILE_SIZE, 41)?;
    let b = Payload::create(&ctx.work.join("hosts-b"), "hosts-b", FILES, FILE_SIZE, 42)?;
    let mut rows = Vec::new();
    let mut sweep = Vec::new();
    let mut alternatives = None;
    for &n in counts {
        let mut world = World::start_with(n, ctx, true, 16)?;
        let mut row = Row {
            hosts: n,
            first: Samples::default(),
            second: Samples::default(),
            rollback: Samples::default(),
            floor: Samples::default(),
            memory: Memory::default(),
        };
        for rep in 0..ctx.reps {
            eprintln!("[hosts] {n} hosts, repetition {}", rep + 1);
            world.reset(&format!("{n}-{rep}"))?;
            row.first.push(world.deploy(&a)?.sample);
            row.second.push(world.deploy(&b)?.sample);
            let r = world.timed(&["rollback", "--json"])?;
            world.verify_serves(&a.label)?;
            row.rollback.push(r.sample);
            row.floor
                .push(world.floor(&a, false, &format!("h{n}-{rep}"))?);
        }
        world.reset(&format!("{n}-mem"))?;
        world.deploy(&a)?;
        let (_, _, memory) = watched_deploy(&world, &b)?;
        row.memory = memory;
        rows.push(row);
        if n == 100 && !ctx.quick {
            // Live is B (the memory deploy): A, B, A... each a new release.
            for (k, &p) in SWEEP.iter().enumerate() {
                eprintln!("[hosts] 100 hosts, parallel = {p}");
                world.set_parallel(p)?;
                let next = if k % 2 == 0 { &a } else { &b };
                let (_, sample, memory) = watched_deploy(&world, next)?;
                sweep.push(SweepRow {
                    parallel: p,
                    sample,
                    memory,
                });
            }
            world.set_parallel(16)?;
        }
        if Some(&n) == counts.last() {
            alternatives = Some(openssh_alternatives(ctx, &world)?);
        }
        world.reset("done")?;
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    let _ = std::fs::remove_dir_all(&b.dir);
    let load_after = loadavg();
    Ok(section(
        ctx,
        &rows,
        &sweep,
        alternatives.as_ref(),
        &load_before,
        &load_after,
        clock.elapsed(),
    ))
}

/// Pss of a process in KiB (0 if it is gone).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Pids of `ssh` processes whose command line contains `needle`.
fn ssh_pids(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let mut args = c.split(|&b| b == 0);
                args.next().is_some_and(|a| a.ends_with(b"ssh"))
                    && args.any(|a| String::from_utf8_lossy(a).contains(needle))
            })
        })
        .collect()
}

/// Polls, every 100 ms until `done`, the Pss of `pid` and of the ssh processes `needle(pid)`
/// finds; returns the peaks.
fn poll_memory(pid: Option<u32>, needle: &str, done: &AtomicBool) -> Memory {
    let mut m = Memory::default();
    while !done.load(Ordering::SeqCst) {
        let own = pid.map_or(0, pss_kib);
        let ssh = ssh_pids(needle);
        let total = own + ssh.iter().map(|&p| pss_kib(p)).sum::<u64>();
        m.cutover_kib = m.cutover_kib.max(own);
        m.with_ssh_kib = m.with_ssh_kib.max(total);
        m.ssh_procs = m.ssh_procs.max(ssh.len());
        std::thread::sleep(Duration::from_millis(100));
    }
    m
}

/// `cutover deploy --json --artifact <p>`, timed, with its memory polled.
fn watched_deploy(world: &World<'_>, p: &Payload) -> Result<(Value, Sample, Memory)> {
    let dir = p.dir.display().to_string();
    let mut cmd = world.cutover(&["deploy", "--json", "--artifact", &dir]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let done = AtomicBool::new(false);
    let ((out, memory), sample) = world.meter().time(|| {
        std::thread::scope(|s| {
            let child = cmd.spawn();
            let pid = child.as_ref().ok().map(|c| c.id());
            let needle = format!("/tmp/cutover-{}-", pid.unwrap_or(0));
            let done = &done;
            let poller = s.spawn(move || poll_memory(pid, &needle, done));
            let out = child.and_then(|c| c.wait_with_output());
            done.store(true, Ordering::SeqCst);
            (out, poller.join().unwrap_or_default())
        })
    });
    let out = out.context("running cutover")?;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() || json["status"] != "succeeded" {
        bail!(
            "watched deploy exited with {}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    world.verify_serves(&p.label)?;
    Ok((json, sample, memory))
}

/// Runs `f(i)` for i in 0..n, `at_once` at a time; the errors, if any.
fn par(n: usize, at_once: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..at_once.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                if let Err(e) = f(i) {
                    errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("host {i}: {e:#}"));
                }
            });
        }
    });
    errors.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn ok(mut c: Command, what: &str) -> Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One master per host and commands through it, against a fresh connection per command.
fn openssh_alternatives(ctx: &Ctx, world: &World<'_>) -> Result<Alternatives> {
    let n = world.len();
    let dir = ctx.work.join("ssh-alt");
    std::fs::create_dir_all(&dir)?;
    let sock = |i: usize| dir.join(format!("m{i}.sock"));
    let ssh = |i: usize, extra: &[&str]| {
        let mut c = Command::new("ssh");
        c.args(world.ssh_options()).args(extra);
        c.arg("-S").arg(sock(i));
        c.arg(world.lab.destination(i));
        c
    };
    let check = |errors: Vec<String>, what: &str| -> Result<()> {
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{what}:\n{}", errors.join("\n"))
        }
    };
    eprintln!("[hosts] OpenSSH: {n} masters");
    let (errors, masters_connect) = ctx.meter.time(|| {
        par(n, AT_ONCE, |i| {
            let mut c = ssh(i, &["-M", "-N", "-f", "-o", "ControlMaster=yes"]);
            c.stdout(Stdio::null()).stderr(Stdio::piped());
            ok(c, "ssh -M")
        })
    });
    check(errors, "starting masters")?;
    let needle = dir.display().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let masters = ssh_pids(&needle);
    let masters_pss_kib: u64 = masters.iter().map(|&p| pss_kib(p)).sum();
    let (errors, masters_commands) = ctx.meter.time(|| {
        par(n, AT_ONCE, |i| {
            for _ in 0..COMMANDS {
                let mut c = ssh(i, &["-o", "ControlMaster=no", "-T"]);
                c.arg("true");
                ok(c, "ssh -S")?;
            }
            Ok(())
        })
    });
    check(errors, "commands through masters")?;
    par(n, AT_ONCE, |i| {
        let mut c = ssh(i, &["-O", "exit"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let _ = c.status();
        Ok(())
    });
    eprintln!("[hosts] OpenSSH: a fresh connection per command");
    let done = AtomicBool::new(false);
    // Fresh connections name no socket; find them by the lab's known_hosts file instead.
    let kh = world.lab.known_hosts().display().to_string();
    let ((errors, peak), fresh_commands) = ctx.meter.time(|| {
        std::thread::scope(|s| {
            let poller = s.spawn(|| poll_memory(None, &kh, &done));
            let errors = par(n, AT_ONCE, |i| {
                for _ in 0..COMMANDS {
                    let mut c = Command::new("ssh");
                    c.args(world.ssh_options())
                        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none", "-T"])
                        .arg(world.lab.destination(i))
                        .arg("true");
                    ok(c, "ssh")?;
                }
                Ok(())
            });
            done.store(true, Ordering::SeqCst);
            (errors, poller.join().unwrap_or_default())
        })
    });
    check(errors, "fresh connections")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Alternatives {
        hosts: n,
        masters_connect,
        masters_commands,
        masters_pss_kib,
        fresh_commands,
        fresh_peak_pss_kib: peak.with_ssh_kib,
    })
}

fn mib_of_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn cpu(s: &Sample) -> String {
    s.cpu_s.map_or("–".into(), |c| format!("{} s", secs(c)))
}

fn section(
    ctx: &Ctx,
    rows: &[Row],
    sweep: &[SweepRow],
    alt: Option<&Alternatives>,
    load_before: &str,
    load_after: &str,
    took: Duration,
) -> Section {
    let mut md = report::measured_line(ctx, load_before, load_after, took);
    md.push_str("\n\n");
    times_tables(&mut md, rows);
    memory_table(&mut md, rows);
    sweep_table(&mut md, sweep);
    if let Some(a) = alt {
        openssh_table(&mut md, a);
    }
    let all: Vec<&Samples> = rows
        .iter()
        .flat_map(|r| [&r.first, &r.second, &r.rollback, &r.floor])
        .collect();
    md.push('\n');
    md.push_str(&report::interference_line(&all, ctx.machine.cores, 0));
    md.push('\n');
    let json = json!({
        "payload": {"files": FILES, "file_bytes": FILE_SIZE},
        "rows": rows.iter().map(|r| json!({
            "hosts": r.hosts,
            "deploy_first": r.first.to_json(),
            "deploy_second": r.second.to_json(),
            "rollback_warm": r.rollback.to_json(),
            "floor_tar": r.floor.to_json(),
            "memory": r.memory.to_json(),
        })).collect::<Vec<_>>(),
        "parallel_sweep": sweep.iter().map(|s| json!({
            "parallel": s.parallel,
            "deploy": s.sample.to_json(),
            "memory": s.memory.to_json(),
        })).collect::<Vec<_>>(),
        "openssh": alt.map(|a| json!({
            "hosts": a.hosts,
            "commands_per_host": COMMANDS,
            "at_once": AT_ONCE,
            "masters_connect": a.masters_connect.to_json(),
            "masters_commands": a.masters_commands.to_json(),
            "masters_pss_kib": a.masters_pss_kib,
            "fresh_commands": a.fresh_commands.to_json(),
            "fresh_peak_pss_kib": a.fresh_peak_pss_kib,
        })),
    });
    Section { markdown: md, json }
}

/// Wall time and CPU per host count, next to the floor.
fn times_tables(md: &mut String, rows: &[Row]) {
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let ratio = if r.floor.median() > 0.0 {
                format!("{:.1}", r.first.median() / r.floor.median())
            } else {
                "–".into()
            };
            vec![
                r.hosts.to_string(),
                r.first.cell(),
                r.second.cell(),
                r.rollback.cell(),
                r.floor.cell(),
                ratio,
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "deploy 1st",
            "deploy 2nd",
            "rollback (warm)",
            "floor tar",
            "deploy 1st ÷ floor",
        ],
        &table_rows,
    ));
    md.push_str("\nCPU seconds (median, all processes of the run on both sides):\n\n");
    let cpu_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.hosts.to_string(),
                r.first.cpu_cell(),
                r.second.cpu_cell(),
                r.rollback.cpu_cell(),
                r.floor.cpu_cell(),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "deploy 1st",
            "deploy 2nd",
            "rollback (warm)",
            "floor tar",
        ],
        &cpu_rows,
    ));
}

/// The control side's memory during a deploy.
fn memory_table(md: &mut String, rows: &[Row]) {
    md.push_str("\nControl side memory during a deploy (peak Pss):\n\n");
    let mem_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.hosts.to_string(),
                mib_of_kib(r.memory.cutover_kib),
                mib_of_kib(r.memory.with_ssh_kib),
                r.memory.ssh_procs.to_string(),
                mib_of_kib(
                    r.memory.with_ssh_kib.saturating_sub(r.memory.cutover_kib) / r.hosts as u64,
                ),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "cutover alone",
            "cutover + its ssh",
            "ssh processes (most at once)",
            "ssh per host",
        ],
        &mem_rows,
    ));
}

/// `[ssh] parallel` on 100 hosts.
fn sweep_table(md: &mut String, sweep: &[SweepRow]) {
    if sweep.is_empty() {
        return;
    }
    md.push_str("\n`[ssh] parallel` on 100 hosts (one deploy each, memory polled):\n\n");
    let r: Vec<Vec<String>> = sweep
        .iter()
        .map(|s| {
            vec![
                s.parallel.to_string(),
                format!("{} s", secs(s.sample.secs)),
                cpu(&s.sample),
                mib_of_kib(s.memory.with_ssh_kib),
                s.memory.ssh_procs.to_string(),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "parallel",
            "wall",
            "CPU",
            "cutover + its ssh (peak Pss)",
            "ssh processes (most at once)",
        ],
        &r,
    ));
}

/// One OpenSSH master per host against a fresh connection per command.
fn openssh_table(md: &mut String, a: &Alternatives) {
    md.push_str(&format!(
        "\nOpenSSH on {} hosts, {COMMANDS} commands per host, {AT_ONCE} hosts at a time:\n\n",
        a.hosts
    ));
    md.push_str(&report::table(
        &["way", "connect", "commands", "CPU (all)", "memory (Pss)"],
        &[
            vec![
                "one master per host (cutover's)".into(),
                format!("{} s", secs(a.masters_connect.secs)),
                format!("{} s", secs(a.masters_commands.secs)),
                format!("{} + {}", cpu(&a.masters_connect), cpu(&a.masters_commands)),
                format!(
                    "{} for {} idle masters ({} each)",
                    mib_of_kib(a.masters_pss_kib),
                    a.hosts,
                    mib_of_kib(a.masters_pss_kib / a.hosts as u64)
                ),
            ],
            vec![
                "a fresh connection per command".into(),
                "–".into(),
                format!("{} s", secs(a.fresh_commands.secs)),
                cpu(&a.fresh_commands),
                format!("{} at the peak", mib_of_kib(a.fresh_peak_pss_kib)),
            ],
        ],
    ));
}

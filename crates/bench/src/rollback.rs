//! `rollback`: how long `cutover rollback` takes, from spawn until it exits 0 with the old
//! version answering on every host, on 1 and 4 hosts: warm (the target release is still on
//! the hosts, nothing is uploaded) and cold (the target's release directory was deleted from
//! every host, so cutover re-ships it from its local artifact store).

use crate::harness::World;
use crate::machine::loadavg;
use crate::meter::MAX_REDOS;
use crate::report::{self, mib, Samples, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::json;

pub(crate) const HOW_TO_READ: &str = "\
each host count gets a fresh lab; every repetition starts from empty hosts and an empty data \
dir, deploys payload A then payload B (the same 100 MiB pseudo-random directories as \
deploy-speed; untimed), and times `cutover rollback --json --to <A>` from spawn to exit 0 \
(*warm*: A's release directory is still on every host, so nothing is uploaded: connect, \
prepare, switch, health gate, prune). It then deploys B again (untimed), deletes A's release \
directory from every host and times the same rollback again (*cold*: A's tar.gz is re-shipped \
from cutover's artifact store and unpacked, then switch and gate). After each rollback every \
host is checked over HTTP to serve A (untimed). *re-shipped per host* is the `uploaded_bytes` \
cutover reported per host for the cold rollback (0 for every warm one, which the bench \
checks). *CPU time* is the median CPU seconds of all the processes of the run (cutover, \
ssh, and the hosts' sshd, tar and nginx).";

struct Row {
    hosts: usize,
    warm: Samples,
    cold: Samples,
    cold_uploaded: u64,
    /// Repetitions redone because other processes disturbed them.
    discarded: Vec<serde_json::Value>,
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let (a, b) = ctx.payloads()?;
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = std::time::Instant::now();
    let mut rows = Vec::new();
    for n in [1usize, 4] {
        let mut world = World::start(n, ctx)?;
        let mut row = Row {
            hosts: n,
            warm: Samples::default(),
            cold: Samples::default(),
            cold_uploaded: 0,
            discarded: Vec::new(),
        };
        let mut rep = 1;
        let mut attempt = 0;
        while rep <= ctx.reps {
            attempt += 1;
            world.reset(&format!("a{attempt}"))?;
            let first = world.deploy(a)?;
            let Some(target) = first.json["release"].as_str().map(str::to_string) else {
                bail!("deploy output has no release id: {}", first.json);
            };
            world.deploy(b)?;
            let warm = world.rollback(&target, a)?;
            if warm.uploaded().iter().any(|&u| u > 0) {
                bail!("a warm rollback uploaded bytes: {}", warm.json);
            }
            world.deploy(b)?;
            world.delete_release(&target)?;
            let cold = world.rollback(&target, a)?;
            let up = cold.uploaded();
            if up.contains(&0) {
                bail!(
                    "a cold rollback did not re-ship to every host: {}",
                    cold.json
                );
            }
            eprintln!(
                "[rollback] {n} host(s) run {rep}/{}: warm {} s, cold {} s; other processes {} CPU-s",
                ctx.reps,
                report::secs(warm.sample.secs),
                report::secs(cold.sample.secs),
                report::secs(warm.sample.foreign_cpu_s + cold.sample.foreign_cpu_s)
            );
            let cores = ctx.machine.cores;
            if (warm.sample.disturbed(cores) || cold.sample.disturbed(cores))
                && row.discarded.len() < MAX_REDOS
            {
                eprintln!("[rollback] other processes took over a quarter of the CPU during that repetition: doing it again");
                row.discarded.push(json!({
                    "warm": warm.sample.to_json(),
                    "cold": cold.sample.to_json(),
                }));
                continue;
            }
            row.cold_uploaded = up.into_iter().max().unwrap_or(0);
            row.warm.push(warm.sample);
            row.cold.push(cold.sample);
            rep += 1;
        }
        world.reset("done")?;
        rows.push(row);
    }
    let load_after = loadavg();

    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str(&format!(
        "\n\nPayload: {} of pseudo-random bytes ({} files).\n\n",
        mib(a.bytes()),
        a.files
    ));
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.hosts.to_string(),
                r.warm.cell(),
                r.cold.cell(),
                mib(r.cold_uploaded),
                r.warm.cpu_cell(),
                r.cold.cpu_cell(),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "warm rollback",
            "cold rollback (re-ship)",
            "re-shipped per host",
            "CPU time, warm",
            "CPU time, cold",
        ],
        &table_rows,
    ));
    let all: Vec<&Samples> = rows.iter().flat_map(|r| [&r.warm, &r.cold]).collect();
    md.push('\n');
    let redone: usize = rows.iter().map(|r| r.discarded.len()).sum();
    md.push_str(&report::interference_line(&all, ctx.machine.cores, redone));
    md.push('\n');
    let json = json!({
        "scenario": "rollback",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
        "payload": { "files": a.files, "file_size": a.file_size, "bytes": a.bytes() },
        "results": rows.iter().map(|r| json!({
            "hosts": r.hosts,
            "warm": r.warm.to_json(),
            "cold": r.cold.to_json(),
            "cold_uploaded_bytes_per_host": r.cold_uploaded,
            "discarded": r.discarded,
        })).collect::<Vec<_>>(),
    });
    Ok(Section { markdown: md, json })
}

//! `deploy-speed`: how long `cutover deploy` of a 100 MiB directory takes on 1, 4 and 16
//! hosts (a fresh lab per host count), next to the physical floor of shipping the same
//! directory by hand with `tar | ssh | tar` to every host in parallel, compressed and not.
//! One extra, untimed deploy per host count is profiled from cutover's progress lines to
//! show where its time goes.

use crate::harness::{Payload, Profile, World};
use crate::machine::loadavg;
use crate::meter::{Sample, MAX_REDOS};
use crate::report::{self, mib, secs, Samples, Section};
use crate::Ctx;
use anyhow::Result;
use serde_json::{json, Value};

pub(crate) const HOW_TO_READ: &str = "\
the payload is a directory of 400 files of 256 KiB of pseudo-random bytes (splitmix64 output; \
100 MiB in all, plus `index.html`, `version` and `up`), which gzip cannot shrink: the tar.gz \
cutover ships is as large as the input. Each host count gets a fresh lab (`parallel = 16`, so \
all hosts are served at once). Before every repetition the hosts' site roots and cutover's data \
dir (history and artifact store) are emptied. *cutover 1st* is `cutover deploy --json \
--artifact A` onto empty hosts; *cutover 2nd* is the deploy of a different 100 MiB directory B \
right after (a full upload again, since no file is shared); both are timed from spawn to exit \
0, which includes packing the directory into a tar.gz (gzip fast level, SHA-256, fsync, then \
re-reading it to validate), the SSH connection per host, staging (upload + unpack), the switch, \
the health gate (2 healthy probes 100 ms apart per host) and pruning; every host is then checked \
over HTTP to serve the new version (untimed). *floor tar.gz* is `tar czf - -C A . | ssh host \
'mkdir -p D && tar xzf - -C D'` started for all hosts at once with the same identity and \
known_hosts (strict host key checking), timed from the first spawn to the last exit; note that \
it compresses once per host with gzip's default level 6, while cutover compresses once at \
level 1. *floor tar* is the same without compression (`tar cf` / `tar xf`), which on loopback \
is usually cheaper since compression costs CPU and saves no bytes here. *cutover ÷ best floor* \
divides the *cutover 1st* median by the faster floor median. The CPU table gives the same \
runs' CPU seconds. The phase table comes from one \
more first deploy per host count (not one of the samples) run without `--json`: its progress lines on \
stderr are timestamped as they arrive and a phase ends when its last host reports `done`.";

/// Everything measured for one host count.
struct Row {
    hosts: usize,
    first: Samples,
    second: Samples,
    floor_gz: Samples,
    floor_tar: Samples,
    artifact_bytes: u64,
    profile: Option<Profile>,
    /// Repetitions redone because other processes disturbed them.
    discarded: Vec<Value>,
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let (a, b) = ctx.payloads()?;
    let host_counts: &[usize] = if ctx.quick { &[1, 4] } else { &[1, 4, 16] };
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = std::time::Instant::now();
    let mut rows = Vec::new();
    for &n in host_counts {
        rows.push(measure(ctx, n, a, b)?);
    }
    let load_after = loadavg();

    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str(&format!(
        "\n\nPayload: {} files x {} KiB = {} of pseudo-random bytes per deploy; the tar.gz \
         cutover ships is {} (gzip cannot compress it).\n\nWall time:\n\n",
        a.files,
        a.file_size >> 10,
        mib(a.bytes()),
        rows.first()
            .map(|r| mib(r.artifact_bytes))
            .unwrap_or_default()
    ));
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let best = r.floor_gz.median().min(r.floor_tar.median());
            vec![
                r.hosts.to_string(),
                r.first.cell(),
                r.second.cell(),
                r.floor_gz.cell(),
                r.floor_tar.cell(),
                if best > 0.0 {
                    format!("{:.1}x", r.first.median() / best)
                } else {
                    "–".into()
                },
                format!(
                    "{:.0} MiB/s",
                    (r.hosts as u64 * a.bytes()) as f64 / (1024.0 * 1024.0) / r.first.median()
                ),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "cutover 1st",
            "cutover 2nd",
            "floor tar.gz over ssh",
            "floor tar over ssh",
            "cutover 1st ÷ best floor",
            "cutover 1st, MiB delivered/s",
        ],
        &table_rows,
    ));
    md.push_str(
        "\nCPU time (median, seconds of CPU summed over every process of the run on both \
         sides: cutover, ssh, the hosts' sshd, tar and nginx):\n\n",
    );
    let cpu_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.hosts.to_string(),
                r.first.cpu_cell(),
                r.second.cpu_cell(),
                r.floor_gz.cpu_cell(),
                r.floor_tar.cpu_cell(),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "hosts",
            "cutover 1st",
            "cutover 2nd",
            "floor tar.gz over ssh",
            "floor tar over ssh",
        ],
        &cpu_rows,
    ));
    md.push_str(
        "\nWhere the time of a first deploy goes (one more profiled run per host count, \
         seconds; the phases add up to the total):\n\n",
    );
    let mut header = vec!["hosts".to_string()];
    let mut prow = Vec::new();
    for r in &rows {
        let Some(p) = &r.profile else { continue };
        let phases = p.phases();
        if header.len() == 1 {
            header.extend(phases.iter().map(|(n, _)| n.to_string()));
            header.push("total".into());
            header.push("stage per host (min–max)".into());
        }
        let mut cells = vec![r.hosts.to_string()];
        cells.extend(phases.iter().map(|(_, s)| secs(*s)));
        cells.push(secs(p.secs));
        let (_, min, max) = report::spread(&p.stage_per_host());
        cells.push(format!("{}–{}", secs(min), secs(max)));
        prow.push(cells);
    }
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    md.push_str(&report::table(&header_refs, &prow));
    let all: Vec<&Samples> = rows
        .iter()
        .flat_map(|r| [&r.first, &r.second, &r.floor_gz, &r.floor_tar])
        .collect();
    let redone: usize = rows.iter().map(|r| r.discarded.len()).sum();
    md.push('\n');
    if ctx.reps > 1 && rows.iter().any(|r| !floor_gz_in(r.hosts, 2)) {
        md.push_str(&format!(
            "The tar.gz floor on 16 hosts ran once, not {} times: one run takes about a \
             minute there, and this keeps the deploy-speed scenario near nine minutes.\n\n",
            ctx.reps
        ));
    }
    md.push_str(&report::interference_line(&all, ctx.machine.cores, redone));
    md.push('\n');

    let json = json!({
        "scenario": "deploy-speed",
        "started": started,
        "finished": report::utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
        "payload": {
            "files": a.files,
            "file_size": a.file_size,
            "bytes": a.bytes(),
            "content": "pseudo-random bytes (splitmix64), incompressible",
        },
        "results": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    Ok(Section { markdown: md, json })
}

fn row_json(r: &Row) -> Value {
    json!({
        "hosts": r.hosts,
        "artifact_bytes": r.artifact_bytes,
        "cutover_first": r.first.to_json(),
        "cutover_second": r.second.to_json(),
        "floor_tar_gz_ssh": r.floor_gz.to_json(),
        "floor_tar_ssh": r.floor_tar.to_json(),
        "discarded": r.discarded,
        "profile": r.profile.as_ref().map(|p| json!({
            "run": p.sample.to_json(),
            "phases_s": p.phases().iter().map(|(n, s)| json!({"phase": n, "s": s})).collect::<Vec<_>>(),
            "stage_per_host_s": p.stage_per_host(),
            "lines": p.lines.iter().map(|(t, l)| json!([t, l])).collect::<Vec<_>>(),
        })),
    })
}

/// Whether the tar.gz floor runs in repetition `rep` on `n` hosts: on 16 hosts only once
/// (it takes about a minute there), to keep the deploy-speed scenario near nine minutes.
fn floor_gz_in(n: usize, rep: usize) -> bool {
    n < 16 || rep == 1
}

fn measure(ctx: &Ctx, n: usize, a: &Payload, b: &Payload) -> Result<Row> {
    let mut world = World::start(n, ctx)?;
    let mut row = Row {
        hosts: n,
        first: Samples::default(),
        second: Samples::default(),
        floor_gz: Samples::default(),
        floor_tar: Samples::default(),
        artifact_bytes: 0,
        profile: None,
        discarded: Vec::new(),
    };
    let cpu = |s: &Sample| {
        s.cpu_s
            .map(|c| format!(" ({} CPU-s)", secs(c)))
            .unwrap_or_default()
    };
    let mut rep = 1;
    let mut attempt = 0;
    while rep <= ctx.reps {
        attempt += 1;
        let tag = format!("a{attempt}");
        world.reset(&tag)?;
        let first = world.deploy(a)?;
        row.artifact_bytes = first.uploaded().into_iter().max().unwrap_or(0);
        let second = world.deploy(b)?;
        let gz = if floor_gz_in(n, rep) {
            Some(world.floor(a, true, &format!("{tag}-gz"))?)
        } else {
            None
        };
        let tar = world.floor(a, false, &format!("{tag}-tar"))?;
        let runs: Vec<Sample> = [Some(first.sample), Some(second.sample), gz, Some(tar)]
            .into_iter()
            .flatten()
            .collect();
        let foreign: f64 = runs.iter().map(|s| s.foreign_cpu_s).sum();
        eprintln!(
            "[deploy-speed] {n} host(s) run {rep}/{}: cutover 1st {} s{}, 2nd {} s{}, floor tar.gz {}, floor tar {} s{}; other processes {} CPU-s",
            ctx.reps,
            secs(first.sample.secs),
            cpu(&first.sample),
            secs(second.sample.secs),
            cpu(&second.sample),
            gz.map(|g| format!("{} s{}", secs(g.secs), cpu(&g)))
                .unwrap_or_else(|| "skipped".into()),
            secs(tar.secs),
            cpu(&tar),
            secs(foreign),
        );
        if runs.iter().any(|s| s.disturbed(ctx.machine.cores)) && row.discarded.len() < MAX_REDOS {
            eprintln!("[deploy-speed] other processes took over a quarter of the CPU during that repetition: doing it again");
            row.discarded.push(json!({
                "cutover_first": first.sample.to_json(),
                "cutover_second": second.sample.to_json(),
                "floor_tar_gz_ssh": gz.map(Sample::to_json),
                "floor_tar_ssh": tar.to_json(),
            }));
            continue;
        }
        row.first.push(first.sample);
        row.second.push(second.sample);
        if let Some(g) = gz {
            row.floor_gz.push(g);
        }
        row.floor_tar.push(tar);
        rep += 1;
    }
    world.reset("profile")?;
    let p = world.deploy_profiled(a)?;
    eprintln!(
        "[deploy-speed] {n} host(s) profiled first deploy: {} s: {}",
        secs(p.secs),
        p.phases()
            .iter()
            .map(|(name, s)| format!("{name} {}", secs(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    row.profile = Some(p);
    world.reset("done")?;
    Ok(row)
}

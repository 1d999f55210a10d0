//! `rollback`: how long it takes from the rollback command to the old version answering over
//! HTTP on every host, on 1 and 4 hosts: cutover warm (the target release is still on the
//! hosts, nothing is uploaded), cutover cold (the target's release directory was deleted from
//! every host, so cutover re-ships it from its local artifact store), a redeploy of the old
//! version with cutover, Capistrano's `deploy:rollback` and a Capistrano deploy of the old
//! commit ([`crate::capistrano`]).

use crate::capistrano::{self, Cap};
use crate::harness::{Answer, Payload, World};
use crate::machine::loadavg;
use crate::report::{self, mib, secs, spread, Samples, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};

pub(crate) const HOW_TO_READ: &str = "\
each host count (1 and 4; 4 only with `--quick`) gets a fresh lab; every repetition starts from empty hosts and an empty data \
dir and uses payloads A and B (the same 100 MiB pseudo-random directories as deploy-speed, \
10 MiB with `--quick`). Every row is timed from the spawn of its command until every host's \
nginx answers `GET /version` with A (the bench polls each host every 10 ms while the command \
runs): *old version answers after*; *command exits after* is the same run's spawn-to-exit \
time. cutover: deploy A, deploy B (untimed), then *cutover warm* is `cutover rollback --json \
--to <A>` (A's release directory is still on every host, so nothing is uploaded: connect, \
prepare, switch, health gate, prune); deploy B again (untimed), delete A's release directory \
from every host, then *cutover cold* is the same rollback (A's tar.gz is re-shipped from \
cutover's artifact store and unpacked, then switch and gate); deploy B again (untimed), then \
*cutover redeploy of A* is `cutover deploy --json --artifact A` (whatever cutover does with \
an artifact it has shipped before). Capistrano (Debian's capistrano, default git strategy, \
see switch-files and deploy-speed): the hosts are emptied, A and B are deployed (untimed), \
then *Capistrano deploy:rollback* is `cap bench deploy:rollback` (points `current` at the \
previous release, then archives the rolled-back release into a tar.gz and removes it); B is \
deployed again (untimed), then *Capistrano redeploy of A* is `cap bench deploy` with the \
branch pointing at A's commit again (the host's mirror has it; `git archive` into a new \
release). *uploaded per host* is the `uploaded_bytes` cutover reports per host (the bench \
checks that a warm rollback uploads nothing and a cold one re-ships to every host). *CPU \
time* is the median CPU seconds of all the processes of the run (the tool, ssh, git, and the \
hosts' sshd, tar and nginx), over the whole command.";

/// The rows, in table order.
const METHODS: [&str; 5] = [
    "cutover warm rollback",
    "cutover cold rollback (re-ship)",
    "cutover redeploy of A",
    "Capistrano deploy:rollback",
    "Capistrano redeploy of A",
];

#[derive(Default)]
struct Method {
    answer: Samples,
    exit_s: Vec<f64>,
    uploaded: Vec<u64>,
}

struct Row {
    hosts: usize,
    methods: Vec<Method>,
    /// Repetitions redone because other processes disturbed them.
    discarded: Vec<Value>,
}

/// `uploaded_bytes` of every host from a cutover `--json` output.
fn uploaded(a: &Answer) -> Vec<u64> {
    let v: Value = serde_json::from_slice(&a.output.stdout).unwrap_or(Value::Null);
    v["hosts"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|h| h["uploaded_bytes"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// An error unless the command exited 0.
fn check(what: &str, a: &Answer) -> Result<()> {
    if !a.output.status.success() {
        bail!(
            "{what} exited with {}: {}{}",
            a.output.status,
            String::from_utf8_lossy(&a.output.stdout),
            String::from_utf8_lossy(&a.output.stderr)
        );
    }
    Ok(())
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let (a, b) = ctx.payloads()?;
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = std::time::Instant::now();
    let git_base = ctx.work.join("capistrano-git");
    let mut rows = Vec::new();
    // `--quick`: 4 hosts only, to keep the quick run short.
    let host_counts: &[usize] = if ctx.quick { &[4] } else { &[1, 4] };
    for &n in host_counts {
        let mut world = World::start(n, ctx)?;
        let cap = Cap::start(&world, &git_base)?;
        let ca = cap.commit(a, None)?;
        let cb = cap.commit(b, Some(&ca))?;
        let mut row = Row {
            hosts: n,
            methods: (0..METHODS.len()).map(|_| Method::default()).collect(),
            discarded: Vec::new(),
        };
        let mut rep = 1;
        let mut attempt = 0;
        while rep <= ctx.reps {
            attempt += 1;
            let runs = repetition(&mut world, &cap, &ca, &cb, a, b, attempt)?;
            eprintln!(
                "[rollback] {n} host(s) run {rep}/{}: {}",
                ctx.reps,
                METHODS
                    .iter()
                    .zip(&runs)
                    .map(|(m, r)| format!(
                        "{m} {} s (exit {} s)",
                        secs(r.sample.secs),
                        secs(r.exit_s)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let cores = ctx.machine.cores;
            if runs.iter().any(|r| r.sample.disturbed(cores))
                && row.discarded.len() < ctx.max_redos()
            {
                eprintln!("[rollback] other processes took over a quarter of the CPU during that repetition: doing it again");
                row.discarded.push(json!(METHODS
                    .iter()
                    .zip(&runs)
                    .map(|(m, r)| (m.to_string(), r.sample.to_json()))
                    .collect::<serde_json::Map<_, _>>()));
                continue;
            }
            for (i, r) in runs.iter().enumerate() {
                let m = &mut row.methods[i];
                m.answer.push(r.sample);
                m.exit_s.push(r.exit_s);
                if i < 3 {
                    m.uploaded.push(uploaded(r).into_iter().max().unwrap_or(0));
                }
            }
            rep += 1;
        }
        drop(cap);
        world.reset("done")?;
        rows.push(row);
    }
    let load_after = loadavg();
    Ok(section(
        ctx,
        &rows,
        a,
        &load_before,
        &load_after,
        clock,
        &started,
    ))
}

/// One repetition: the five timed runs, in [`METHODS`] order.
fn repetition(
    world: &mut World,
    cap: &Cap,
    ca: &str,
    cb: &str,
    a: &Payload,
    b: &Payload,
    attempt: usize,
) -> Result<Vec<Answer>> {
    world.reset(&format!("a{attempt}"))?;
    let first = world.deploy(a)?;
    let Some(target) = first.json["release"].as_str().map(str::to_string) else {
        bail!("deploy output has no release id: {}", first.json);
    };
    let adir = a.dir.display().to_string();
    world.deploy(b)?;
    let warm = world.until_serves(
        world.cutover(&["rollback", "--json", "--to", &target]),
        &a.label,
    )?;
    check("cutover rollback (warm)", &warm)?;
    if uploaded(&warm).iter().any(|&u| u > 0) {
        bail!(
            "a warm rollback uploaded bytes: {}",
            String::from_utf8_lossy(&warm.output.stdout)
        );
    }
    world.deploy(b)?;
    world.delete_release(&target)?;
    let cold = world.until_serves(
        world.cutover(&["rollback", "--json", "--to", &target]),
        &a.label,
    )?;
    check("cutover rollback (cold)", &cold)?;
    if uploaded(&cold).contains(&0) {
        bail!(
            "a cold rollback did not re-ship to every host: {}",
            String::from_utf8_lossy(&cold.output.stdout)
        );
    }
    world.deploy(b)?;
    let again = world.until_serves(
        world.cutover(&["deploy", "--json", "--artifact", &adir]),
        &a.label,
    )?;
    check("cutover deploy of A again", &again)?;

    world.reset(&format!("a{attempt}-cap"))?;
    cap.set_main(ca)?;
    cap.run_ok("deploy", "main")?;
    cap.set_main(cb)?;
    cap.run_ok("deploy", "main")?;
    world.verify_serves(&b.label)?;
    let cap_rollback = world.until_serves(cap.command("deploy:rollback", "main"), &a.label)?;
    check("cap deploy:rollback", &cap_rollback)?;
    cap.run_ok("deploy", "main")?;
    world.verify_serves(&b.label)?;
    cap.set_main(ca)?;
    let cap_again = world.until_serves(cap.command("deploy", "main"), &a.label)?;
    check("cap deploy of A again", &cap_again)?;
    Ok(vec![warm, cold, again, cap_rollback, cap_again])
}

fn section(
    ctx: &Ctx,
    rows: &[Row],
    a: &Payload,
    load_before: &str,
    load_after: &str,
    clock: std::time::Instant,
    started: &str,
) -> Section {
    let mut md = report::measured_line(ctx, load_before, load_after, clock.elapsed());
    md.push_str(&format!(
        "\n\nPayload: {} of pseudo-random bytes ({} files); {}.\n\n",
        mib(a.bytes()),
        a.files,
        capistrano::version()
    ));
    let exit_cell = |v: &[f64]| {
        let (med, min, max) = spread(v);
        match v.len() {
            0 => "–".to_string(),
            1 => format!("{} s", secs(med)),
            _ => format!("{} s ({}–{})", secs(med), secs(min), secs(max)),
        }
    };
    let mut table_rows = Vec::new();
    for r in rows {
        for (name, m) in METHODS.iter().zip(&r.methods) {
            table_rows.push(vec![
                r.hosts.to_string(),
                name.to_string(),
                m.answer.cell(),
                exit_cell(&m.exit_s),
                if m.uploaded.is_empty() {
                    "–".into()
                } else {
                    let f: Vec<f64> = m.uploaded.iter().map(|&u| u as f64).collect();
                    mib(spread(&f).0 as u64)
                },
                m.answer.cpu_cell(),
            ]);
        }
    }
    md.push_str(&report::table(
        &[
            "hosts",
            "method",
            "old version answers after",
            "command exits after",
            "uploaded per host",
            "CPU time",
        ],
        &table_rows,
    ));
    let all: Vec<&Samples> = rows
        .iter()
        .flat_map(|r| r.methods.iter().map(|m| &m.answer))
        .collect();
    md.push('\n');
    let redone: usize = rows.iter().map(|r| r.discarded.len()).sum();
    md.push_str(&report::interference_line(&all, ctx.machine.cores, redone));
    md.push('\n');

    let plot = json!({
        "file": "rollback.svg",
        "kind": "bars",
        "title": "From the command to the old version answering on every host",
        "y": "seconds",
        "categories": rows.iter().map(|r| format!("{} host{}", r.hosts, if r.hosts == 1 { "" } else { "s" })).collect::<Vec<_>>(),
        "series": METHODS.iter().enumerate().map(|(i, name)| json!({
            "name": name,
            "values": rows.iter().map(|r| r.methods[i].answer.median()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let rest = json!({
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "capistrano": capistrano::version(),
        "payload": { "files": a.files, "file_size": a.file_size, "bytes": a.bytes() },
        "results": rows.iter().map(|r| json!({
            "hosts": r.hosts,
            "methods": METHODS.iter().zip(&r.methods).map(|(name, m)| json!({
                "method": name,
                "old_version_answers": m.answer.to_json(),
                "exit_s": m.exit_s,
                "uploaded_bytes_per_host": m.uploaded,
            })).collect::<Vec<_>>(),
            "discarded": r.discarded,
        })).collect::<Vec<_>>(),
        "plots": [plot],
    });
    let json = report::scenario_json(ctx, "rollback", started, load_before, load_after, rest);
    Section { markdown: md, json }
}

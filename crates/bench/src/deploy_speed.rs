//! `deploy-speed`: how long `cutover deploy` of a 10 MiB, 100 MiB and 1 GiB directory takes on
//! 1, 4 and 16 hosts (a fresh lab per host count), next to Capistrano deploying the same
//! directories from git ([`crate::capistrano`]) and the physical floor of shipping the same
//! directory by hand with `tar | ssh | tar` to every host in parallel, compressed and not.
//! Then a redeploy in which 1% of the files changed: time and bytes on the wire per method.
//! One extra, untimed deploy per host count is profiled from cutover's event stream
//! (`--events`) to show where its time goes.

use crate::capistrano::{self, Cap};
use crate::harness::{Payload, Profile, World};
use crate::machine::loadavg;
use crate::meter::Sample;
use crate::report::{self, mib, secs, Samples, Section};
use crate::Ctx;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The cipher cutover asks for first on a machine with AES instructions.
const AES_GCM: &str = "aes128-gcm@openssh.com";

pub(crate) const HOW_TO_READ: &str = "\
each payload is a directory of files of 256 KiB of pseudo-random bytes (splitmix64 output; 40 \
files = 10 MiB, 400 = 100 MiB, 4096 = 1 GiB, plus `index.html`, `version` and `up`), which \
gzip cannot shrink: the tar.gz cutover ships is as large as the input. `--quick` runs 10 MiB \
on 1 and 4 hosts only. Each host count gets a fresh lab (cutover `parallel = 16`, so all hosts \
are served at once). Before every repetition the hosts' site roots and cutover's data dir \
(history and artifact store) are emptied. *cutover 1st* is `cutover deploy --json --artifact \
A` onto empty hosts; *cutover 2nd* is the deploy of a different directory B of the same size \
right after (the hosts serve A, whose artifact is in the store, so cutover first guesses \
whether a delta would pay: a quarter or more of B's file bytes in files whose path, mode, \
size and first 4 KiB match A's manifest; here none do, so B is streamed whole like A); \
both are timed from spawn to exit \
0, which includes checking the directory's tree (names, symlinks, file types, limits: no \
content read), the SSH connection per host and the host lock, then one pass that packs the \
directory (the tar stream checked by a second thread as it is produced, SHA-256 of the \
artifact and of every file for the manifest, gzip -1 only if a 2 MiB sample shrinks to 90% \
or less, else stored deflate blocks; *cutover's packing* says which: `gzip1` or `stored`), \
writes it into the artifact store (fsync) and, as it is produced, streams it to every host, \
which unpacks it as it arrives (the tar stream itself when stored, the gzip stream when \
compressed); then staging gives each upload its release id (flush, rename), the switch, \
the health gate (2 healthy probes 100 ms apart per host) and pruning; every host is then checked \
over HTTP to serve the new version (untimed). *Capistrano 1st* and *2nd* are `cap bench deploy` \
(Debian's capistrano, its default git strategy) of the same two directories, committed as two \
commits (B a child of A) of a bare repository on this machine served by `git daemon` over \
`git://` (the repository has `core.bigFileThreshold = 128k`, so git stores and sends the \
random files whole instead of searching for deltas they do not have); the branch points at A \
for the 1st deploy onto emptied hosts (Capistrano clones the repository into a mirror on each \
host, then `git archive`s it into a release) and at B for the 2nd (the mirror fetches B's \
objects); Capistrano's own default of at most 10 hosts at a time for its git steps applies; \
timed from spawn to exit, then every host is checked to serve it (untimed). *floor tar.gz* is \
`tar czf - -C A . | ssh host 'mkdir -p D && tar xzf - -C D'` started for all hosts at once \
with the same identity and known_hosts (strict host key checking), timed from the first spawn \
to the last exit; note that it compresses once per host with gzip's default level 6, while \
cutover compresses (if at all) once at level 1. *floor tar* is the same without compression (`tar cf` / \
`tar xf`), with the cipher OpenSSH picks by default (chacha20-poly1305), as a person typing \
it gets. cutover asks for AES-GCM first on a machine with AES instructions (this one has \
them), so *floor tar over ssh, AES-GCM* is the tar floor again with `ssh -c \
aes128-gcm@openssh.com`: the floor with cutover's cipher. *cutover ÷ best floor* divides the \
*cutover 1st* median by the faster of the two default-cipher floors (the issue's goal), \
*cutover 1st ÷ floor AES-GCM* by the AES-GCM floor's median, *cutover 2nd ÷ 1st* the *cutover 2nd* median by the *cutover 1st* one. 1 GiB cells run once (not `--reps` times) and without the tar.gz floor (gzip -6 of \
1 GiB once per host takes minutes on 2 cores); before a 1 GiB cell the bench checks the free \
disk space where the hosts' `/srv` live and runs only what fits, saying so in the cell. The \
CPU table gives the same runs' CPU seconds (all processes of the run on both sides). The \
phase table comes from one more first deploy of the 100 MiB payload (10 MiB with `--quick`) \
per host count (not one of the samples) run with `--events`: each step is timed by the `time` \
of cutover's start and done events, and a phase ends when its last host reports `done`. The *redeploy \
with 1% of the files changed* table deploys A (untimed), then A' (A with every 100th file \
rewritten with new random bytes, a new `version`; 100 MiB, 10 MiB with `--quick`) and times \
that second deploy the same way for cutover and Capistrano, and the tar floor shipping A' \
whole (on every host count; on 4 hosts only with `--quick`); *rsync* is Debian's `rsync -a \
--delete -e 'ssh <cutover's ssh options>' A'/ host:/srv/rsync-copy/` to every host at once, \
into a copy of the live release A made just before (`cp -a`, untimed), timed from the first \
spawn to the last exit (the payload's unchanged files were copied without their mtimes when A' \
was made, so rsync's quick check sees them as changed and compares their blocks, sending \
little); *cutover ÷ rsync* divides the medians; *on the wire* is the bytes \
that crossed the hosts' veths during the timed run, both \
directions, per host (from the root side's `/sys/class/net/<veth>/statistics`), and \
*uploaded_bytes* is what cutover itself reports per host in `--json`.";

/// One payload size.
struct Size {
    name: &'static str,
    a: Payload,
    b: Payload,
    /// Runs per cell (1 for the 1 GiB payloads).
    reps: usize,
    /// Whether the tar.gz floor runs.
    gzip_floor: bool,
    /// Whether this size is profiled (the default payload).
    profile: bool,
}

/// Everything measured for one payload size on one host count.
struct Row {
    size: &'static str,
    bytes: u64,
    hosts: usize,
    first: Samples,
    second: Samples,
    cap_first: Samples,
    cap_second: Samples,
    floor_gz: Samples,
    floor_tar: Samples,
    /// The tar floor with `ssh -c aes128-gcm@openssh.com`, the cipher cutover asks for on
    /// this machine.
    floor_aes: Samples,
    artifact_bytes: u64,
    /// How cutover packed A (its artifact store's word: `gzip1` or `stored`).
    packing: String,
    profile: Option<Profile>,
    /// Why columns were not run: (column key, reason).
    skipped: Vec<(&'static str, String)>,
    /// Repetitions redone because other processes disturbed them.
    discarded: Vec<Value>,
}

impl Row {
    fn cell(&self, key: &'static str, s: &Samples, cpu: bool) -> String {
        if let Some((_, why)) = self.skipped.iter().find(|(k, _)| *k == key || *k == "all") {
            return format!("not run: {why}");
        }
        if cpu {
            s.cpu_cell()
        } else {
            s.cell()
        }
    }
}

/// One method's redeploy of A' after A.
#[derive(Default)]
struct Redeploy {
    time: Samples,
    wire_per_host: Vec<u64>,
    uploaded_per_host: Vec<u64>,
}

struct RedeployRow {
    hosts: usize,
    cutover: Redeploy,
    cap: Redeploy,
    floor: Redeploy,
    rsync: Redeploy,
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let (a, b) = ctx.payloads()?;
    let defaults: &[usize] = if ctx.quick { &[1, 4] } else { &[1, 4, 16] };
    let host_counts: &[usize] = if ctx.hosts.is_empty() {
        defaults
    } else {
        &ctx.hosts
    };
    let load_before = loadavg();
    let started = report::utc_now();
    let clock = std::time::Instant::now();
    let size = |name, a: &Payload, b: &Payload, big: bool, profile| Size {
        name,
        a: a.clone(),
        b: b.clone(),
        reps: if big { 1 } else { ctx.reps },
        gzip_floor: !big,
        profile,
    };
    // `--sizes`: the payload sizes asked for (all by default).
    let want =
        |name: &str| ctx.sizes.is_empty() || ctx.sizes.iter().any(|s| s == &name.replace(' ', ""));
    let mut sizes = Vec::new();
    if ctx.quick {
        if want("10 MiB") {
            sizes.push(size("10 MiB", a, b, false, true));
        }
    } else {
        let (_, file_size) = ctx.payload_shape();
        let make = |files: usize, tag: &str, seed: u64| {
            eprintln!("[deploy-speed] writing payload {tag}: {files} x 256 KiB");
            Payload::create(
                &ctx.work.join(format!("ds-{tag}")),
                &format!("bench-{tag}"),
                files,
                file_size,
                seed,
            )
        };
        if want("10 MiB") {
            let s10 = (make(40, "10m-a", 11)?, make(40, "10m-b", 12)?);
            sizes.push(size("10 MiB", &s10.0, &s10.1, false, false));
        }
        if want("100 MiB") {
            sizes.push(size("100 MiB", a, b, false, true));
        }
        if want("1 GiB") {
            let s1g = (make(4096, "1g-a", 21)?, make(4096, "1g-b", 22)?);
            sizes.push(size("1 GiB", &s1g.0, &s1g.1, true, false));
        }
    }
    if sizes.is_empty() {
        bail!(
            "--sizes: none of {:?} is a deploy-speed payload size",
            ctx.sizes
        );
    }
    let changed = a.one_percent_changed(&ctx.work.join("payload-a1"), "bench-a1", 3)?;
    let git_base = ctx.work.join("capistrano-git");

    let mut rows = Vec::new();
    let mut redeploys = Vec::new();
    for &n in host_counts {
        let mut world = World::start(n, ctx)?;
        let cap = Cap::start(&world, &git_base)?;
        for s in &sizes {
            rows.push(measure(ctx, &mut world, &cap, n, s)?);
        }
        // `--quick`: the redeploy on the largest host count only.
        if !ctx.quick || Some(&n) == host_counts.last() {
            redeploys.push(redeploy(ctx, &mut world, &cap, n, a, &changed)?);
        }
        drop(cap);
        world.reset("done")?;
    }
    for s in &sizes {
        if s.a.dir != a.dir {
            let _ = std::fs::remove_dir_all(&s.a.dir);
            let _ = std::fs::remove_dir_all(&s.b.dir);
        }
    }
    let load_after = loadavg();
    Ok(section(
        ctx,
        &rows,
        &redeploys,
        a,
        &changed,
        &load_before,
        &load_after,
        clock,
        &started,
    ))
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

fn gib(b: u64) -> String {
    format!("{:.0} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Whether the tar.gz floor runs in repetition `rep` on `n` hosts: on 16 hosts only once
/// (it takes about a minute there).
fn floor_gz_in(n: usize, rep: usize) -> bool {
    n < 16 || rep == 1
}

fn measure(ctx: &Ctx, world: &mut World, cap: &Cap, n: usize, s: &Size) -> Result<Row> {
    let (a, b) = (&s.a, &s.b);
    let mut row = Row {
        size: s.name,
        bytes: a.bytes(),
        hosts: n,
        first: Samples::default(),
        second: Samples::default(),
        cap_first: Samples::default(),
        cap_second: Samples::default(),
        floor_gz: Samples::default(),
        floor_tar: Samples::default(),
        floor_aes: Samples::default(),
        artifact_bytes: 0,
        packing: String::new(),
        profile: None,
        skipped: Vec::new(),
        discarded: Vec::new(),
    };
    if !s.gzip_floor {
        row.skipped
            .push(("floor_gz", "gzip -6 per host of 1 GiB is too slow".into()));
    }
    let Some(second) = room_for_second(world, n, s, &mut row) else {
        return Ok(row);
    };
    let ca = cap.commit(a, None)?;
    let cb = cap.commit(b, Some(&ca))?;
    let mut rep = 1;
    let mut attempt = 0;
    while rep <= s.reps {
        attempt += 1;
        let tag = format!("{}-{attempt}", s.name.replace(' ', ""));
        world.reset(&tag)?;
        let first = world.deploy(a)?;
        row.artifact_bytes = first.uploaded().into_iter().max().unwrap_or(0);
        row.packing = world.packings().join(", ");
        let second_run = if second { Some(world.deploy(b)?) } else { None };
        let gz = if s.gzip_floor && floor_gz_in(n, rep) {
            Some(world.floor(a, true, &format!("{tag}-gz"))?)
        } else {
            None
        };
        let tar = world.floor(a, false, &format!("{tag}-tar"))?;
        let aes = world.floor_with(a, false, Some(AES_GCM), &format!("{tag}-aes"))?;
        world.reset(&format!("{tag}-cap"))?;
        cap.set_main(&ca)?;
        let cap1 = cap_deploy(ctx, world, cap, a)?;
        let cap2 = if second {
            cap.set_main(&cb)?;
            Some(cap_deploy(ctx, world, cap, b)?)
        } else {
            None
        };
        let done = Repetition {
            first: first.sample,
            second: second_run.as_ref().map(|r| r.sample),
            cap_first: cap1,
            cap_second: cap2,
            floor_gz: gz,
            floor_tar: tar,
            floor_aes: aes,
        };
        eprintln!(
            "[deploy-speed] {} on {n} host(s) run {rep}/{}: {}",
            s.name,
            s.reps,
            done.line()
        );
        if done.disturbed(ctx.machine.cores) && row.discarded.len() < ctx.max_redos() {
            eprintln!("[deploy-speed] other processes took over a quarter of the CPU during that repetition: doing it again");
            row.discarded.push(done.to_json());
            continue;
        }
        done.record(&mut row);
        rep += 1;
    }
    if s.profile {
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
    }
    world.reset("cell-done")?;
    Ok(row)
}

/// Whether there is disk for a cell's second deploys (`Some(true)`), for its first only
/// (`Some(false)`, the second ones noted as skipped in `row`) or for none (`None`, noted).
/// Per host at most two releases of cutover's, or Capistrano's mirror (both commits) plus two
/// releases; here the payloads, the repository and cutover's artifact store.
fn room_for_second(world: &World, n: usize, s: &Size, row: &mut Row) -> Option<bool> {
    let bytes = s.a.bytes();
    let full = n as u64 * 4 * bytes + 4 * bytes;
    let first_only = n as u64 * 2 * bytes + 3 * bytes;
    let free = free_bytes(world.lab.dir()).unwrap_or(u64::MAX);
    let why = |needed: u64| {
        format!(
            "disk ({} free where the hosts' /srv live, {} needed)",
            gib(free),
            gib(needed)
        )
    };
    if free >= full + full / 10 {
        Some(true)
    } else if free >= first_only + first_only / 10 {
        row.skipped.push(("second", why(full)));
        row.skipped.push(("cap_second", why(full)));
        Some(false)
    } else {
        row.skipped.push(("all", why(first_only)));
        eprintln!("[deploy-speed] {} on {n} host(s): not enough disk", s.name);
        None
    }
}

/// One repetition of a cell: every timed run (those the cell skips are `None`).
struct Repetition {
    first: Sample,
    second: Option<Sample>,
    cap_first: Sample,
    cap_second: Option<Sample>,
    floor_gz: Option<Sample>,
    floor_tar: Sample,
    floor_aes: Sample,
}

impl Repetition {
    fn samples(&self) -> impl Iterator<Item = Sample> {
        [
            Some(self.first),
            self.second,
            self.floor_gz,
            Some(self.floor_tar),
            Some(self.floor_aes),
            Some(self.cap_first),
            self.cap_second,
        ]
        .into_iter()
        .flatten()
    }

    /// Whether other processes took over a quarter of the CPU during any of its runs.
    fn disturbed(&self, cores: usize) -> bool {
        self.samples().any(|s| s.disturbed(cores))
    }

    /// Its runs for the progress line.
    fn line(&self) -> String {
        let cpu = |s: &Sample| {
            s.cpu_s
                .map(|c| format!(" ({} CPU-s)", secs(c)))
                .unwrap_or_default()
        };
        let opt = |s: Option<Sample>| {
            s.map(|g| format!("{} s{}", secs(g.secs), cpu(&g)))
                .unwrap_or_else(|| "skipped".into())
        };
        let foreign: f64 = self.samples().map(|s| s.foreign_cpu_s).sum();
        format!(
            "cutover 1st {}, 2nd {}, Capistrano 1st {}, 2nd {}, floor tar.gz {}, floor tar {}, floor tar AES-GCM {}; other processes {} CPU-s",
            opt(Some(self.first)),
            opt(self.second),
            opt(Some(self.cap_first)),
            opt(self.cap_second),
            opt(self.floor_gz),
            opt(Some(self.floor_tar)),
            opt(Some(self.floor_aes)),
            secs(foreign),
        )
    }

    /// A discarded repetition, as the JSON keeps it.
    fn to_json(&self) -> Value {
        json!({
            "cutover_first": self.first.to_json(),
            "cutover_second": self.second.map(Sample::to_json),
            "capistrano_first": self.cap_first.to_json(),
            "capistrano_second": self.cap_second.map(Sample::to_json),
            "floor_tar_gz_ssh": self.floor_gz.map(Sample::to_json),
            "floor_tar_ssh": self.floor_tar.to_json(),
            "floor_tar_ssh_aes128_gcm": self.floor_aes.to_json(),
        })
    }

    /// Adds its runs to the cell's.
    fn record(self, row: &mut Row) {
        row.first.push(self.first);
        if let Some(x) = self.second {
            row.second.push(x);
        }
        if let Some(x) = self.floor_gz {
            row.floor_gz.push(x);
        }
        row.floor_tar.push(self.floor_tar);
        row.floor_aes.push(self.floor_aes);
        row.cap_first.push(self.cap_first);
        if let Some(x) = self.cap_second {
            row.cap_second.push(x);
        }
    }
}

/// `cap bench deploy` of the branch `main` (pointing at `p`'s commit), timed from spawn to
/// exit; then every host must serve `p` (untimed).
fn cap_deploy(ctx: &Ctx, world: &World, cap: &Cap, p: &Payload) -> Result<Sample> {
    let (r, sample) = ctx.meter.time(|| cap.run("deploy", "main"));
    let r = r?;
    if !r.ok {
        bail!("Capistrano deploy of {} failed: {}", p.label, r.message);
    }
    world.verify_serves(&p.label)?;
    Ok(sample)
}

/// The redeploy in which 1% of the files changed, `ctx.reps` times per method.
fn redeploy(
    ctx: &Ctx,
    world: &mut World,
    cap: &Cap,
    n: usize,
    a: &Payload,
    changed: &Payload,
) -> Result<RedeployRow> {
    let mut row = RedeployRow {
        hosts: n,
        cutover: Redeploy::default(),
        cap: Redeploy::default(),
        floor: Redeploy::default(),
        rsync: Redeploy::default(),
    };
    let ca = cap.commit(a, None)?;
    let cc = cap.commit(changed, Some(&ca))?;
    let per_host = |w0: u64, w1: u64| w1.saturating_sub(w0) / n as u64;
    for rep in 1..=ctx.reps {
        world.reset(&format!("re{rep}"))?;
        world.deploy(a)?;
        let w0 = world.wire_bytes();
        let rsync = world.rsync(changed)?;
        let w1 = world.wire_bytes();
        row.rsync.time.push(rsync);
        row.rsync.wire_per_host.push(per_host(w0, w1));

        let w0 = world.wire_bytes();
        let run = world.deploy(changed)?;
        let w1 = world.wire_bytes();
        row.cutover.time.push(run.sample);
        row.cutover.wire_per_host.push(per_host(w0, w1));
        row.cutover
            .uploaded_per_host
            .push(run.uploaded().into_iter().max().unwrap_or(0));

        world.reset(&format!("re{rep}-cap"))?;
        cap.set_main(&ca)?;
        cap_deploy(ctx, world, cap, a)?;
        cap.set_main(&cc)?;
        let w0 = world.wire_bytes();
        let cap_sample = cap_deploy(ctx, world, cap, changed)?;
        let w1 = world.wire_bytes();
        row.cap.time.push(cap_sample);
        row.cap.wire_per_host.push(per_host(w0, w1));

        let w0 = world.wire_bytes();
        let floor = world.floor(changed, false, &format!("re{rep}"))?;
        let w1 = world.wire_bytes();
        row.floor.time.push(floor);
        row.floor.wire_per_host.push(per_host(w0, w1));
        eprintln!(
            "[deploy-speed] redeploy 1% changed on {n} host(s) run {rep}/{}: cutover {} s ({} per host on the wire), rsync {} s ({}), Capistrano {} s ({}), floor tar {} s ({})",
            ctx.reps,
            secs(run.sample.secs),
            mib(*row.cutover.wire_per_host.last().unwrap_or(&0)),
            secs(rsync.secs),
            mib(*row.rsync.wire_per_host.last().unwrap_or(&0)),
            secs(cap_sample.secs),
            mib(*row.cap.wire_per_host.last().unwrap_or(&0)),
            secs(floor.secs),
            mib(*row.floor.wire_per_host.last().unwrap_or(&0)),
        );
    }
    Ok(row)
}

fn median_u64(v: &[u64]) -> u64 {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    report::spread(&f).0 as u64
}

#[allow(clippy::too_many_arguments)]
fn section(
    ctx: &Ctx,
    rows: &[Row],
    redeploys: &[RedeployRow],
    a: &Payload,
    changed: &Payload,
    load_before: &str,
    load_after: &str,
    clock: std::time::Instant,
    started: &str,
) -> Section {
    let mut md = report::measured_line(ctx, load_before, load_after, clock.elapsed());
    md.push_str(&format!(
        "\n\nPayloads of 256 KiB pseudo-random files (gzip cannot compress them); {}.\n\nWall time:\n\n",
        capistrano::version()
    ));
    wall_table(&mut md, rows);
    cpu_table(&mut md, rows);
    redeploy_table(&mut md, ctx, redeploys, a, changed);
    profile_table(&mut md, rows);
    notes(&mut md, ctx, rows, redeploys);
    let rest = json!({
        "reps": ctx.reps,
        "hosts_source_root_bashrc": ctx.host_bashrc,
        "capistrano": capistrano::version(),
        "payload": {
            "file_size": a.file_size,
            "content": "pseudo-random bytes (splitmix64), incompressible",
        },
        "results": rows.iter().map(row_json).collect::<Vec<_>>(),
        "redeploy_one_percent_changed": {
            "files": a.files,
            "changed_files": a.one_percent(),
            "bytes": changed.bytes(),
            "results": redeploys.iter().map(|r| json!({
                "hosts": r.hosts,
                "cutover": redeploy_json(&r.cutover),
                "capistrano": redeploy_json(&r.cap),
                "floor_tar_ssh": redeploy_json(&r.floor),
                "rsync": redeploy_json(&r.rsync),
            })).collect::<Vec<_>>(),
        },
        "plots": [plot(rows)],
    });
    let json = report::scenario_json(ctx, "deploy-speed", started, load_before, load_after, rest);
    Section { markdown: md, json }
}

/// The wall-time table of first and second deploys against Capistrano and the floors.
fn wall_table(md: &mut String, rows: &[Row]) {
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let floors: Vec<f64> = [&r.floor_gz, &r.floor_tar]
                .iter()
                .filter(|s| !s.0.is_empty())
                .map(|s| s.median())
                .collect();
            let best = floors.into_iter().fold(f64::INFINITY, f64::min);
            vec![
                r.size.to_string(),
                r.hosts.to_string(),
                r.cell("first", &r.first, false),
                r.cell("second", &r.second, false),
                r.cell("cap_first", &r.cap_first, false),
                r.cell("cap_second", &r.cap_second, false),
                r.cell("floor_gz", &r.floor_gz, false),
                r.cell("floor_tar", &r.floor_tar, false),
                r.cell("floor_aes", &r.floor_aes, false),
                if best.is_finite() && best > 0.0 && !r.first.0.is_empty() {
                    format!("{:.2}x", r.first.median() / best)
                } else {
                    "–".into()
                },
                if r.first.0.is_empty() || r.floor_aes.0.is_empty() {
                    "–".into()
                } else {
                    format!("{:.2}x", r.first.median() / r.floor_aes.median())
                },
                if r.first.0.is_empty() || r.second.0.is_empty() {
                    "–".into()
                } else {
                    format!("{:.2}x", r.second.median() / r.first.median())
                },
                if r.packing.is_empty() {
                    "–".into()
                } else {
                    r.packing.clone()
                },
                if r.first.0.is_empty() {
                    "–".into()
                } else {
                    format!(
                        "{:.0} MiB/s",
                        (r.hosts as u64 * r.bytes) as f64 / (1024.0 * 1024.0) / r.first.median()
                    )
                },
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "payload",
            "hosts",
            "cutover 1st",
            "cutover 2nd",
            "Capistrano 1st",
            "Capistrano 2nd",
            "floor tar.gz over ssh",
            "floor tar over ssh",
            "floor tar over ssh, AES-GCM",
            "cutover 1st ÷ best floor",
            "cutover 1st ÷ floor AES-GCM",
            "cutover 2nd ÷ 1st",
            "cutover's packing",
            "cutover 1st, MiB delivered/s",
        ],
        &table_rows,
    ));
}

/// The CPU-time table (both sides of every run).
fn cpu_table(md: &mut String, rows: &[Row]) {
    md.push_str(
        "\nCPU time (median, seconds of CPU summed over every process of the run on both \
         sides: cutover or Capistrano, ssh, git, the hosts' sshd, tar and nginx):\n\n",
    );
    let cpu_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.size.to_string(),
                r.hosts.to_string(),
                r.cell("first", &r.first, true),
                r.cell("second", &r.second, true),
                r.cell("cap_first", &r.cap_first, true),
                r.cell("cap_second", &r.cap_second, true),
                r.cell("floor_gz", &r.floor_gz, true),
                r.cell("floor_tar", &r.floor_tar, true),
                r.cell("floor_aes", &r.floor_aes, true),
            ]
        })
        .collect();
    md.push_str(&report::table(
        &[
            "payload",
            "hosts",
            "cutover 1st",
            "cutover 2nd",
            "Capistrano 1st",
            "Capistrano 2nd",
            "floor tar.gz over ssh",
            "floor tar over ssh",
            "floor tar over ssh, AES-GCM",
        ],
        &cpu_rows,
    ));
}

/// The redeploy-with-1%-changed table, with rsync as a peer.
fn redeploy_table(
    md: &mut String,
    ctx: &Ctx,
    redeploys: &[RedeployRow],
    a: &Payload,
    changed: &Payload,
) {
    md.push_str(&format!(
        "\nRedeploy with 1% of the files changed ({} of {} files of {} KiB rewritten, {} in \
         all), after a deploy of the original (medians of {} runs; bytes per host):\n\n",
        a.one_percent(),
        a.files,
        a.file_size >> 10,
        mib(changed.bytes()),
        ctx.reps
    ));
    let mut re_rows = Vec::new();
    for r in redeploys {
        let up = median_u64(&r.cutover.uploaded_per_host);
        let resent = up as f64 >= 0.9 * changed.bytes() as f64;
        let note = if resent {
            "cutover resends the whole artifact".to_string()
        } else {
            format!(
                "cutover sends {:.0}% of the artifact",
                100.0 * up as f64 / changed.bytes().max(1) as f64
            )
        };
        re_rows.push(vec![
            r.hosts.to_string(),
            "cutover".into(),
            r.cutover.time.cell(),
            mib(median_u64(&r.cutover.wire_per_host)),
            mib(up),
            note,
        ]);
        let (c, x) = (r.cutover.time.median(), r.rsync.time.median());
        let ratio = if x > 0.0 {
            format!("{:.2}x", c / x)
        } else {
            "–".into()
        };
        if let Some(row) = re_rows.last_mut() {
            row.insert(5, ratio);
        }
        re_rows.push(vec![
            r.hosts.to_string(),
            "rsync -a --delete over ssh".into(),
            r.rsync.time.cell(),
            mib(median_u64(&r.rsync.wire_per_host)),
            "–".into(),
            "–".into(),
            "into a copy of the live release; compares size and mtime, then checksums blocks of the files whose mtime differs".into(),
        ]);
        re_rows.push(vec![
            r.hosts.to_string(),
            "Capistrano".into(),
            r.cap.time.cell(),
            mib(median_u64(&r.cap.wire_per_host)),
            "–".into(),
            "–".into(),
            "git fetches the changed blobs, then archives the whole tree on the host".into(),
        ]);
        re_rows.push(vec![
            r.hosts.to_string(),
            "floor tar over ssh".into(),
            r.floor.time.cell(),
            mib(median_u64(&r.floor.wire_per_host)),
            "–".into(),
            "–".into(),
            "ships everything".into(),
        ]);
    }
    md.push_str(&report::table(
        &[
            "hosts",
            "method",
            "time",
            "on the wire per host (both directions)",
            "cutover's uploaded_bytes per host",
            "cutover ÷ rsync",
            "note",
        ],
        &re_rows,
    ));
}

/// Where the time of a first deploy goes, per phase.
fn profile_table(md: &mut String, rows: &[Row]) {
    md.push_str(
        "\nWhere the time of a first deploy goes (one more profiled run per host count, \
         seconds; the phases add up to the total):\n\n",
    );
    let mut header = vec!["hosts".to_string()];
    let mut prow = Vec::new();
    for r in rows {
        let Some(p) = &r.profile else { continue };
        let phases = p.phases();
        if header.len() == 1 {
            header.extend(phases.iter().map(|(n, _)| n.to_string()));
            header.push("total".into());
            header.push("stage per host (min–max)".into());
        }
        let mut cells = vec![format!("{} × {}", r.size, r.hosts)];
        cells.extend(phases.iter().map(|(_, s)| secs(*s)));
        cells.push(secs(p.secs));
        let (_, min, max) = report::spread(&p.stage_per_host());
        cells.push(format!("{}–{}", secs(min), secs(max)));
        prow.push(cells);
    }
    header[0] = "payload × hosts".into();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    md.push_str(&report::table(&header_refs, &prow));
}

/// How the cells were run (fewer reps, interference).
fn notes(md: &mut String, ctx: &Ctx, rows: &[Row], redeploys: &[RedeployRow]) {
    let all: Vec<&Samples> = rows
        .iter()
        .flat_map(|r| {
            [
                &r.first,
                &r.second,
                &r.cap_first,
                &r.cap_second,
                &r.floor_gz,
                &r.floor_tar,
                &r.floor_aes,
            ]
        })
        .chain(
            redeploys
                .iter()
                .flat_map(|r| [&r.cutover.time, &r.cap.time, &r.floor.time]),
        )
        .collect();
    let redone: usize = rows.iter().map(|r| r.discarded.len()).sum();
    md.push('\n');
    if ctx.reps > 1 && rows.iter().any(|r| !floor_gz_in(r.hosts, 2)) {
        md.push_str(&format!(
            "The tar.gz floor on 16 hosts ran once, not {} times: one run takes about a \
             minute there. ",
            ctx.reps
        ));
    }
    if ctx.reps > 1 && rows.iter().any(|r| r.size == "1 GiB") {
        md.push_str(&format!(
            "The 1 GiB cells ran once, not {} times. ",
            ctx.reps
        ));
    }
    md.push_str(&report::interference_line(&all, ctx.machine.cores, redone));
    md.push('\n');
}

/// The first-deploy bar chart.
fn plot(rows: &[Row]) -> Value {
    let categories: Vec<String> = rows
        .iter()
        .map(|r| format!("{} × {}", r.size, r.hosts))
        .collect();
    let bar = |f: &dyn Fn(&Row) -> &Samples| -> Vec<Value> {
        rows.iter()
            .map(|r| {
                let s = f(r);
                if s.0.is_empty() {
                    Value::Null
                } else {
                    json!(s.median())
                }
            })
            .collect()
    };
    json!({
        "file": "deploy-speed.svg",
        "kind": "bars",
        "title": "First deploy onto empty hosts (payload × hosts)",
        "y": "seconds",
        "categories": categories,
        "series": [
            {"name": "cutover", "values": bar(&|r| &r.first)},
            {"name": "Capistrano", "values": bar(&|r| &r.cap_first)},
            {"name": "floor: tar over ssh", "values": bar(&|r| &r.floor_tar)},
        ],
    })
}

fn redeploy_json(r: &Redeploy) -> Value {
    json!({
        "time": r.time.to_json(),
        "wire_bytes_per_host": r.wire_per_host,
        "uploaded_bytes_per_host": r.uploaded_per_host,
    })
}

fn row_json(r: &Row) -> Value {
    json!({
        "payload": r.size,
        "payload_bytes": r.bytes,
        "hosts": r.hosts,
        "artifact_bytes": r.artifact_bytes,
        "packing": r.packing,
        "cutover_first": r.first.to_json(),
        "cutover_second": r.second.to_json(),
        "capistrano_first": r.cap_first.to_json(),
        "capistrano_second": r.cap_second.to_json(),
        "floor_tar_gz_ssh": r.floor_gz.to_json(),
        "floor_tar_ssh": r.floor_tar.to_json(),
        "floor_tar_ssh_aes128_gcm": r.floor_aes.to_json(),
        "not_run": r.skipped.iter().map(|(k, why)| json!({"column": k, "why": why})).collect::<Vec<_>>(),
        "discarded": r.discarded,
        "profile": r.profile.as_ref().map(|p| json!({
            "run": p.sample.to_json(),
            "phases_s": p.phases().iter().map(|(n, s)| json!({"phase": n, "s": s})).collect::<Vec<_>>(),
            "stage_per_host_s": p.stage_per_host(),
            "steps": p.trace.to_json(),
            "outcome": p.outcome,
        })),
    })
}

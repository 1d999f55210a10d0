//! `switch-files`: what clients see while a files app is switched from one release to the
//! other under steady load, on one testlab host whose nginx serves `<site root>/current`, in
//! one run: cutover files (`cutover deploy --artifact A|B`), Capistrano (Debian's `cap`
//! deploying the same two trees from git, see [`crate::capistrano`]) and no switch at all.
//! The load, tables and plots are [`crate::switching`]'s, as in [`crate::switch`].

use crate::capistrano::{self, Cap};
use crate::events::Trace;
use crate::harness::{Payload, World};
use crate::report::Section;
use crate::switching::{self, Around, Cell, Head, Layout, Method, Plan, Switched};
use crate::Ctx;
use anyhow::Result;
use serde_json::json;
use std::net::SocketAddr;

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
gate; its steps, from `--events`, are in the JSON). *Capistrano* is `cap bench deploy` \
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
command, spawn to exit. The bench waits for an idle machine before each method and runs a \
method again (once) if other processes took over a quarter of the CPU during it. The plots \
show successful and failed requests per 100 ms: every method on one plot, then one per method \
with each switch marked where cutover's `switch` step ended (Capistrano: where its command \
started), then failed requests per switch and the longest gap.";

/// The table and plots: the "during switches" requests are those of the whole command.
const LAYOUT: Layout = Layout {
    name: "switch-files",
    around: Around::Command,
    columns: &[
        Cell::Method,
        Cell::Requests,
        Cell::Failed,
        Cell::FailedPerSwitch,
        Cell::LongestGap,
        Cell::DuringP99,
        Cell::DuringMax,
        Cell::SwitchTime,
    ],
    combined_timeline: Some("Files app switched under load: requests per 100 ms, every method"),
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoSwitch,
    Cutover,
    Capistrano,
}

/// One of the files methods on the world's host, switching between payloads `a` and `b`.
struct Files<'w> {
    kind: Kind,
    world: &'w World<'w>,
    cap: Option<&'w Cap>,
    a: &'w Payload,
    b: &'w Payload,
}

impl Method for Files<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::NoSwitch => "no switch",
            Kind::Cutover => "cutover files",
            Kind::Capistrano => "Capistrano",
        }
    }

    fn key(&self) -> &'static str {
        match self.kind {
            Kind::NoSwitch => "no-switch",
            Kind::Cutover => "cutover",
            Kind::Capistrano => "capistrano",
        }
    }

    fn target(&self) -> Result<SocketAddr> {
        Ok(self.world.lab.http_addr(0))
    }

    fn is_cutover(&self) -> bool {
        self.kind == Kind::Cutover
    }

    fn is_baseline(&self) -> bool {
        self.kind == Kind::NoSwitch
    }

    fn switch(&self, to: &str) -> Result<Switched> {
        let (payload, branch) = if to == self.a.label {
            (self.a, "a")
        } else {
            (self.b, "b")
        };
        Ok(match (self.kind, self.cap) {
            (Kind::Capistrano, Some(cap)) => {
                let r = cap.run("deploy", branch)?;
                Switched {
                    ok: r.ok,
                    message: r.message,
                    trace: Trace::default(),
                }
            }
            _ => {
                let d = self.world.deploy_traced(payload)?;
                Switched {
                    ok: d.ok,
                    message: d.message,
                    trace: d.trace,
                }
            }
        })
    }
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let k = if ctx.quick { 3 } else { 10 };
    let (a, b) = ctx.payloads()?;
    let plan = Plan {
        ctx,
        layout: &LAYOUT,
        k,
        versions: [a.label.as_str(), b.label.as_str()],
    };
    let mut head = Head::start("lab, payloads and Capistrano setup included");
    head.peers(capistrano::version());

    let mut world = World::start(1, ctx)?;
    eprintln!("[switch-files] untimed: cutover deploys A");
    world.deploy(a)?;
    let mut runs = Vec::new();
    let mut discarded = Vec::new();
    let mut live = a.label.clone();
    for kind in [Kind::NoSwitch, Kind::Cutover] {
        let m = Files {
            kind,
            world: &world,
            cap: None,
            a,
            b,
        };
        let (run, redone) = switching::measure(&plan, &m, &mut live)?;
        runs.push(run);
        discarded.extend(redone);
    }

    eprintln!("[switch-files] untimed: emptying the site root, Capistrano deploys A then B");
    world.reset("cap")?;
    let cap = Cap::start(&world, &ctx.work.join("capistrano-git"))?;
    let ca = cap.commit(a, None)?;
    let cb = cap.commit(b, Some(&ca))?;
    cap.set_branches(&[("main", &ca), ("a", &ca), ("b", &cb)])?;
    cap.run_ok("deploy", "a")?;
    cap.run_ok("deploy", "b")?;
    world.verify_serves(&b.label)?;
    live = b.label.clone();
    let m = Files {
        kind: Kind::Capistrano,
        world: &world,
        cap: Some(&cap),
        a,
        b,
    };
    let (run, redone) = switching::measure(&plan, &m, &mut live)?;
    runs.push(run);
    discarded.extend(redone);
    drop(cap);
    world.reset("done")?;
    drop(world);
    Ok(switching::section(
        &plan,
        &head,
        &runs,
        &discarded,
        json!({ "capistrano": capistrano::version() }),
    ))
}

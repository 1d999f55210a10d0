//! `switch`: what clients see while a container app is switched from one image to the other
//! under steady load, on one Docker host, in one run: cutover blue-green, cutover hold, the
//! naive `docker rm -f web && docker run -d --name web -p 8080:8080 IMAGE` over SSH, and the
//! peers an operator would script instead: Caddy's upstream flipped through its admin API and
//! nginx's upstream file rewritten and reloaded (see [`crate::peers`]). Every
//! request of the load is recorded (start, latency, success), so that besides failures and
//! latencies the table shows the longest time in which no request succeeded.

use crate::containers::DockerWorld;
use crate::events::{epoch_now, State, Step, Trace};
use crate::peers::{self, Kind as PeerKind, Peer, PeerTls};
use crate::report::{self, secs, spread, Section};
use crate::switching::{self, Around, Cell, Head, Layout, Method, Plan, Switched};
use crate::tls_switch::{self, Flipped, HttpsRun, SwitchRun, Target};
use crate::Ctx;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
\"blue-green\"` and *hold* the same with `strategy = \"hold\"` (their steps, timed \
by cutover's `--events`, are in the JSON), the load going through cutover's proxy (host port 8000); *naive* is \
`ssh host 'docker rm -f web; docker run -d --name web -p 8080:8080 IMAGE'` (a fresh SSH \
connection each time, like an operator's; the script stops at the first failing command and \
prints a timestamp before `docker rm` and after `docker run`), the load going straight to the \
published port 8080. *Caddy* is Debian's `caddy` running in the host's network namespace \
(`caddy run` with a JSON config: one server on port 8200 whose only route is a \
`reverse_proxy` to the container's loopback port, Caddy's defaults otherwise, admin API on \
the host's 127.0.0.1:2019) and *nginx* is Debian's nginx there (its own master process, \
one worker per core, port 8100, `proxy_pass` to an `upstream` block with `keepalive 32` in a \
file of its own, `proxy_http_version 1.1`); the load goes to their port. For both, one \
switch is one SSH command (a fresh connection) running what an operator scripting them \
would: `docker run -d -p 127.0.0.1:P:8080` of the other image on the other of two loopback \
ports, `curl /up` on it every 50 ms until it answers, then the flip (Caddy: `curl -X PATCH` \
of the route's `upstreams` through the admin API, which returns when Caddy runs the new \
config; nginx: rewrite the upstream file and `nginx -s reload`, which returns once the \
master is signalled), then a 2 s pause so that requests already on their way to the old \
container (and nginx's old workers) finish, as a careful operator would, then `docker stop -t \
2` and `docker rm` of the old container. \
*no switch* is the same load through cutover's proxy for 1 + K seconds with no switch: \
what this machine gives without any switch. A request fails on a connect error, a reset, \
a timeout, a non-2xx status or a short body (testlab's load generator); busybox httpd closes \
every connection after its response, which the keep-alive workers follow without counting a \
failure (so only through the proxy do they really keep their connection). *requests* and \
*failed* count every request of the run (failed ones are fast: a refused connect takes well \
under a millisecond, after which the worker sleeps 20 ms and tries again, so *failed* grows \
with the request rate; the gap does not). *worst* and *p99* are latencies of all requests, \
successful or not, connect included. *p99 around a switch* and *max around a switch* are \
the same over the requests started from 0.5 s before a switch's flip step began to 0.5 s \
after it ended, all K switches pooled; the flip step is cutover's `switch` step (its events) \
(for hold it includes the time requests are held), Caddy's PATCH, nginx's rewrite + reload, \
the naive `docker rm` + `docker run`. *longest gap* is the longest time between two \
consecutive successful responses (their ends) anywhere in the run, all workers together. \
*switch time* is the median (min–max) wall time of one switch command, spawn to exit: for \
cutover the whole deploy (SSH connection, resolving the tag and pulling, starting and \
gating the new container, the proxy switch, a check through the proxy, pruning old \
containers; hold stops the old container inside its switch), for naive the \
SSH command (which returns as soon as `docker run` has started the container, not when \
httpd answers), for Caddy and nginx their SSH command (start, wait, flip, stop and remove). \
Plots: `switch-timeline-<method>.svg` (successful and failed requests per 100 ms, the \
flips as vertical marks), `switch-failed.svg` and `switch-gap.svg`. The load and the \
switches share the machine's 2 cores with the host's dockerd, containers, proxy and peers. \
*Under HTTPS load* (run after the rows above and the rollbacks): cutover's proxy is given \
`tls = \"files\"` with a self-signed ECDSA P-256 certificate for `web.test` made by the bench \
(rcgen) and `listen_tls` on the host's port 8443 (`cutover setup` again, untimed: it hands \
over to a proxy with the new flags); Caddy (port 8201: the JSON config above plus the \
certificate loaded from its files and a TLS connection policy) and nginx (port 8101: \
`listen ... ssl http2` with the certificate, TLS 1.2 and 1.3) are started as for the plain \
rows with the same certificate; all three offer HTTP/2 and HTTP/1.1 by ALPN. cutover \
blue-green, Caddy and nginx are each switched K times under HTTP/2 load, then K times under \
HTTP/1.1 keep-alive load, with the same switch commands and rhythm as above (1 s of load, \
then each switch command to its exit followed by 1 s of load). The load is 8 h2load \
processes from this machine's root namespace (`h2load -t1 -c1 -m1 --rps 50`, plus `--h1` \
for HTTP/1.1, connecting to the host's address and asking for `https://web.test:PORT/`): \
8 connections, each with one request in flight and 50 requests a second, about the pace \
of the plain rows' workers. h2load (1.52) does not open a new connection when the server \
closes one during a timed run (after an HTTP/2 GOAWAY, or an HTTP/1.1 close without \
`Connection: close`): it stops that client and counts no failure. So the bench looks at each \
process every 5 ms (a socket among its open files, its log growing) and starts it again as \
soon as its connection is gone, as a browser would connect again; *connections opened \
again* counts those (server closed) and the processes whose connection did not come up \
within 3 s (never up). *requests* are the lines of h2load's `--log-file`s (one per request \
that ended), *failed* those without a 2xx status (errors, resets, 4xx and 5xx); *longest \
gap* is the longest time between the ends of two consecutive successful responses, all \
connections together, or from the last one to the end of the load; *switch time* as above. \
The zero-downtime check (the run fails if a cutover method had a failed request) covers \
cutover's HTTPS rows too.";

/// The naive method's published port on the host.
const NAIVE_PORT: u16 = 8080;
/// Where Caddy and nginx listen on the host, and the two loopback ports each of them
/// alternates its containers between.
const CADDY_PORT: u16 = 8200;
const CADDY_UPSTREAMS: [u16; 2] = [18081, 18082];
const NGINX_PORT: u16 = 8100;
const NGINX_UPSTREAMS: [u16; 2] = [18091, 18092];
/// The HTTPS rows: where cutover's proxy (`listen_tls`), Caddy and nginx serve HTTPS on the
/// host, and the name the load asks for (the test certificate's).
const TLS_PORT: u16 = 8443;
const CADDY_TLS_PORT: u16 = 8201;
const NGINX_TLS_PORT: u16 = 8101;
const TLS_NAME: &str = "web.test";
/// Requests per second on each HTTPS connection: one every [`switching::PAUSE`], about the
/// pace of a plain worker.
const HTTPS_RATE: u32 = 50;

/// The table and plots: the "around a switch" requests are those of the flip step.
const LAYOUT: Layout = Layout {
    name: "switch",
    around: Around::Flip,
    columns: &[
        Cell::Method,
        Cell::Requests,
        Cell::Failed,
        Cell::FailedPerSwitch,
        Cell::Worst,
        Cell::P99,
        Cell::AroundP99,
        Cell::AroundMax,
        Cell::LongestGap,
        Cell::SwitchTime,
    ],
    combined_timeline: None,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoSwitch,
    BlueGreen,
    Hold,
    Naive,
    Caddy,
    Nginx,
}

/// One of the container methods on the world's host.
struct Container<'w> {
    kind: Kind,
    world: &'w DockerWorld,
    /// Caddy or nginx in front of the containers, for those two.
    peer: Option<&'w PeerSide>,
}

impl Method for Container<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::NoSwitch => "no switch (through the proxy)",
            Kind::BlueGreen => "cutover blue-green",
            Kind::Hold => "cutover hold",
            Kind::Naive => "naive docker rm -f + run",
            Kind::Caddy => "Caddy upstream flip (admin API)",
            Kind::Nginx => "nginx upstream edit + reload",
        }
    }

    fn key(&self) -> &'static str {
        match self.kind {
            Kind::NoSwitch => "no-switch",
            Kind::BlueGreen => "blue-green",
            Kind::Hold => "hold",
            Kind::Naive => "naive",
            Kind::Caddy => "caddy",
            Kind::Nginx => "nginx",
        }
    }

    fn target(&self) -> Result<SocketAddr> {
        Ok(match (self.kind, self.peer) {
            (Kind::Naive, _) => SocketAddr::new(self.world.lab.ip(0).into(), NAIVE_PORT),
            (Kind::Caddy | Kind::Nginx, Some(p)) => p.peer.addr(),
            (Kind::Caddy | Kind::Nginx, None) => bail!("{} needs its peer", self.name()),
            _ => self.world.proxy_addr(),
        })
    }

    fn is_cutover(&self) -> bool {
        matches!(self.kind, Kind::BlueGreen | Kind::Hold)
    }

    fn is_baseline(&self) -> bool {
        self.kind == Kind::NoSwitch
    }

    fn switch(&self, to: &str) -> Result<Switched> {
        let world = self.world;
        Ok(match (self.kind, self.peer) {
            (Kind::Naive, _) => run_marked(
                world,
                &format!(
                    "{MARKS}m 'switch start'\n\
                     docker rm -f web\n\
                     docker run -d --name web -p {NAIVE_PORT}:8080 {} >/dev/null\n\
                     m 'switch done'\n",
                    world.image(to)
                ),
            ),
            (Kind::Caddy | Kind::Nginx, Some(p)) => {
                let (from_port, to_port) = p.next();
                let s = run_marked(world, &p.script(&world.image(to), from_port, to_port));
                if s.ok {
                    p.active.set(to_port);
                } else {
                    // The new container, removed (untimed).
                    let _ = world
                        .lab
                        .ssh(0, &format!("docker rm -f {}", p.container(to_port)));
                }
                s
            }
            _ => {
                let d = world.deploy_traced(to)?;
                Switched {
                    ok: d.ok,
                    message: d.message,
                    trace: d.trace,
                }
            }
        })
    }

    fn outside_cpu_s(&self) -> Option<f64> {
        self.world.containers_cpu_s()
    }
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let k = if ctx.quick { 3 } else { 10 };
    let mut head = Head::start("lab and image setup included");
    head.peers(format!("peers: {}", peers::versions_line(&ctx.machine)));

    let world = DockerWorld::start(ctx)?;
    eprintln!(
        "[switch] untimed: deploying web:a and web:b once, pulling both for the naive method"
    );
    world.deploy_ok("a")?;
    world.deploy_ok("b")?;
    let mut live = "b".to_string();
    world.ssh_ok(&format!(
        "docker pull -q {} && docker pull -q {}",
        world.image("a"),
        world.image("b")
    ))?;

    let plan = Plan {
        ctx,
        layout: &LAYOUT,
        k,
        versions: ["a", "b"],
    };
    let mut runs = Vec::new();
    let mut discarded = Vec::new();
    let mut go = |kind, peer: Option<&PeerSide>, live: &mut String| -> Result<()> {
        let method = Container {
            kind,
            world: &world,
            peer,
        };
        let (run, redone) = switching::measure(&plan, &method, live)?;
        runs.push(run);
        discarded.extend(redone);
        Ok(())
    };
    go(Kind::NoSwitch, None, &mut live)?;
    go(Kind::BlueGreen, None, &mut live)?;
    world.write_config("hold")?;
    go(Kind::Hold, None, &mut live)?;
    // The naive method's container, started the same way (untimed); cutover's container and
    // proxy stay up, idle.
    world.ssh_ok(&format!(
        "docker rm -f web >/dev/null 2>&1; docker run -d --name web -p {NAIVE_PORT}:8080 {}",
        world.image(&live)
    ))?;
    let naive_addr = SocketAddr::new(world.lab.ip(0).into(), NAIVE_PORT);
    world.wait_serves(naive_addr, &live, Duration::from_secs(10))?;
    go(Kind::Naive, None, &mut live)?;
    world.ssh_ok("docker rm -f web >/dev/null")?;
    for (kind, peer, listen, ports) in [
        (Kind::Caddy, PeerKind::Caddy, CADDY_PORT, CADDY_UPSTREAMS),
        (Kind::Nginx, PeerKind::Nginx, NGINX_PORT, NGINX_UPSTREAMS),
    ] {
        let side = PeerSide::start(&world, peer, listen, ports, &live, None)?;
        go(kind, Some(&side), &mut live)?;
        side.stop(&world)?;
    }
    let (rollback_md, rollback_json) = container_rollbacks(ctx, &world)?;
    // Every rollback ends with `a` served.
    let mut live = "a".to_string();
    let https = https_runs(ctx, &world, k, &mut live)?;
    drop(world);
    let (https_md, https_json) = tls_switch::https_table(&https);
    let mut out = switching::section(
        &plan,
        &head,
        &runs,
        &discarded,
        json!({ "container_rollback": rollback_json, "https": https_json }),
    );
    // The zero-downtime gate covers cutover's HTTPS rows too.
    if let Some(gate) = out.json["cutover_failed"].as_object_mut() {
        for r in https.iter().filter(|r| r.key() == "blue-green") {
            gate.insert(r.gate_name(), json!(r.failed()));
        }
    }
    out.markdown.push_str(&format!(
        "\n**Under HTTPS load** ({k} switches per method and client, the same switch \
         commands; cutover's proxy with `tls = \"files\"` on port {TLS_PORT}, Caddy on \
         {CADDY_TLS_PORT}, nginx on {NGINX_TLS_PORT}; {} h2load connections, {HTTPS_RATE} \
         requests/s each):\n\n{https_md}",
        tls_switch::CONNECTIONS
    ));
    out.markdown.push_str(&rollback_md);
    Ok(out)
}

/// The HTTPS rows (untimed setup first): a self-signed certificate for [`TLS_NAME`],
/// cutover's proxy given `tls = "files"` with it (`cutover setup` again, which hands the
/// proxy over to one with the new flags), then cutover blue-green, Caddy and nginx (both
/// terminating TLS with the same certificate), each switched K times under HTTP/2 load and
/// K times under HTTP/1.1 keep-alive load from a [`tls_switch::Pool`], with the same switch
/// commands as the plain rows. `live`: the image served, before and after.
fn https_runs(
    ctx: &Ctx,
    world: &DockerWorld,
    k: usize,
    live: &mut String,
) -> Result<Vec<SwitchRun>> {
    let dir = world.lab.dir().join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert, key) = tls_switch::write_test_cert(&dir, TLS_NAME)?;
    world.write_config_full(
        "blue-green",
        &format!(
            "tls = \"files\"\ncert = \"{}\"\nkey = \"{}\"\nlisten_tls = \"0.0.0.0:{TLS_PORT}\"\n",
            cert.display(),
            key.display()
        ),
        "",
    )?;
    eprintln!("[switch] untimed: cutover setup with tls = \"files\" (listen_tls :{TLS_PORT})");
    world
        .setup()
        .context("cutover setup with tls = \"files\"")?;
    let host = |port| SocketAddr::new(world.lab.ip(0).into(), port);
    wait_serves_https(host(TLS_PORT), live, Duration::from_secs(20))?;
    let mut runs = Vec::new();
    let method = Container {
        kind: Kind::BlueGreen,
        world,
        peer: None,
    };
    https_method(ctx, &method, host(TLS_PORT), k, live, &mut runs)?;
    let tls = PeerTls { cert, key };
    for (kind, peer, listen, ports) in [
        (
            Kind::Caddy,
            PeerKind::Caddy,
            CADDY_TLS_PORT,
            CADDY_UPSTREAMS,
        ),
        (
            Kind::Nginx,
            PeerKind::Nginx,
            NGINX_TLS_PORT,
            NGINX_UPSTREAMS,
        ),
    ] {
        let side = PeerSide::start(world, peer, listen, ports, live, Some(&tls))?;
        let method = Container {
            kind,
            world,
            peer: Some(&side),
        };
        https_method(ctx, &method, host(listen), k, live, &mut runs)?;
        side.stop(world)?;
    }
    if let Some(r) = runs.iter().find(|r| r.requests() == 0) {
        bail!(
            "{}: no request of the HTTPS load was answered",
            r.gate_name()
        );
    }
    Ok(runs)
}

/// A method's two HTTPS runs (HTTP/2, then HTTP/1.1 keep-alive), each after the bench waited
/// for an idle machine.
fn https_method(
    ctx: &Ctx,
    method: &Container<'_>,
    addr: SocketAddr,
    k: usize,
    live: &mut String,
    runs: &mut Vec<SwitchRun>,
) -> Result<()> {
    for h1 in [false, true] {
        let run = HttpsRun {
            proxy: method.name(),
            key: method.key(),
            target: Target {
                addr,
                name: TLS_NAME,
            },
            h1,
            rate: HTTPS_RATE,
            k,
            settle: switching::SETTLE,
            work: &ctx.work,
        };
        eprintln!(
            "[switch] {} over HTTPS ({}): load on {addr}",
            method.name(),
            if h1 { "HTTP/1.1" } else { "HTTP/2" }
        );
        let (r, _) = ctx.meter.time(|| {
            tls_switch::run_with_switches(&run, &mut || {
                let to = if live.as_str() == "a" { "b" } else { "a" };
                let t = Instant::now();
                let s = method.switch(to)?;
                eprintln!(
                    "[switch] {} (HTTPS) -> {to}: {} in {} s{}",
                    method.name(),
                    if s.ok { "ok" } else { "FAILED" },
                    secs(t.elapsed().as_secs_f64()),
                    if s.ok {
                        String::new()
                    } else {
                        format!(": {}", s.message)
                    }
                );
                if s.ok {
                    *live = to.to_string();
                }
                Ok(Flipped {
                    ok: s.ok,
                    message: s.message,
                })
            })
        });
        let r = r?;
        eprintln!("[switch] {}: {}", r.gate_name(), r.summary());
        runs.push(r);
    }
    Ok(())
}

/// Waits until `GET https://TLS_NAME:PORT/` on `addr` (curl, certificate not checked)
/// answers `body` (up to `limit`).
fn wait_serves_https(addr: SocketAddr, body: &str, limit: Duration) -> Result<()> {
    let t = Instant::now();
    let url = format!("https://{TLS_NAME}:{}/", addr.port());
    let to = format!("{TLS_NAME}:{}:{}:{}", addr.port(), addr.ip(), addr.port());
    loop {
        let out = std::process::Command::new("curl")
            .args(["-sSk", "--max-time", "3", "--connect-to", &to, &url])
            .output()
            .context("running curl")?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && got == body {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!(
                "{url} on {addr} does not serve {body:?} after {limit:?}: {got:?} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Container rollbacks on the same host, `--reps` times each, with `strategy = "blue-green"`:
/// *warm* (`cutover rollback`; the old container is still on the host, stopped), *cold* (the
/// same after every stopped container and unused image was removed from the host, so the old
/// digest is pulled again from the registry) and a *redeploy* of the old tag (`cutover deploy
/// --image a`). Each is timed from spawn until the proxy answers with the old version, and
/// until the command exits. Before each: `a` then `b` deployed (untimed).
fn container_rollbacks(ctx: &Ctx, world: &DockerWorld) -> Result<(String, Value)> {
    world.write_config("blue-green")?;
    let kinds = [
        "warm rollback",
        "cold rollback (old image pulled again)",
        "redeploy of the old tag",
    ];
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
    let mut errors = Vec::new();
    for _ in 0..ctx.reps {
        for (i, kind) in kinds.iter().enumerate() {
            world.deploy_ok("a")?;
            world.deploy_ok("b")?;
            if i == 1 {
                world.ssh_ok(
                    "docker container prune -f >/dev/null && docker image prune -af >/dev/null",
                )?;
            }
            let args: &[&str] = if i == 2 {
                &["deploy", "--image", "a"]
            } else {
                &["rollback"]
            };
            eprintln!("[switch] container {kind}");
            match world.timed_until_serves(args, "a") {
                Ok(t) => times[i].push(t),
                Err(e) => errors.push(format!("{kind}: {e:#}")),
            }
        }
    }
    let cell = |v: Vec<f64>| {
        if v.is_empty() {
            return "–".to_string();
        }
        let (med, min, max) = spread(&v);
        if v.len() > 1 {
            format!("{} ({}–{})", secs(med), secs(min), secs(max))
        } else {
            secs(med)
        }
    };
    let rows: Vec<Vec<String>> = kinds
        .iter()
        .zip(&times)
        .map(|(kind, t)| {
            vec![
                format!("cutover {kind}"),
                cell(t.iter().map(|x| x.0).collect()),
                cell(t.iter().map(|x| x.1).collect()),
            ]
        })
        .collect();
    let mut md = format!(
        "\n**Container rollback** (same host, blue-green; {} run(s) each; before each, `web:a` \
         then `web:b` deployed): from spawn of the command until cutover's proxy answers with \
         `a` (polled every 10 ms), and until the command exits. *warm*: `cutover rollback` \
         while `a`'s container is still on the host (stopped); *cold*: the same after `docker \
         container prune` and `docker image prune -a` on the host, so `a`'s digest is pulled \
         from the registry again; *redeploy*: `cutover deploy --image a`.\n\n",
        ctx.reps
    );
    md.push_str(&report::table(
        &[
            "method",
            "old version answers after (s)",
            "command exits after (s)",
        ],
        &rows,
    ));
    for e in &errors {
        md.push_str(&format!("\nFailed: {e}\n"));
    }
    let json = json!({
        "methods": kinds,
        "served_and_exited_s": times.iter().map(|t| t.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "errors": errors,
    });
    Ok((md, json))
}

/// The start of every marked script: stop at the first failing command; `m STEP PHASE`
/// prints a mark `host: STEP PHASE <seconds since the epoch>` (the host shares this machine's
/// clock).
const MARKS: &str = "set -e\nm() { echo \"host: $1 $(date +%s.%N)\"; }\n";

/// Runs a script of [`MARKS`] lines on the host over SSH (a fresh connection, as an
/// operator's `ssh host '...'`): whether it exited 0, its stderr as the message, and its
/// marks as steps, seconds since the spawn.
fn run_marked(world: &DockerWorld, script: &str) -> Switched {
    let t0 = epoch_now();
    let out = world.lab.ssh(0, script);
    Switched {
        ok: out.status.success(),
        message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        trace: marks(&String::from_utf8_lossy(&out.stdout), t0),
    }
}

/// The marks `host: STEP PHASE <epoch seconds>` among a script's output, as steps (seconds
/// since `t0`); other lines are skipped.
fn marks(stdout: &str, t0: f64) -> Trace {
    let steps = stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("host: ")?;
            let mut w = rest.split_whitespace();
            let (step, state, at) = (w.next()?, w.next()?, w.next()?.parse::<f64>().ok()?);
            let state = match state {
                "start" => State::Start,
                "done" => State::Done,
                "failed" => State::Failed,
                _ => return None,
            };
            Some(Step {
                at: at - t0,
                host: Some("host".into()),
                step: step.to_string(),
                state,
                detail: String::new(),
            })
        })
        .collect();
    Trace { steps }
}

/// Caddy or nginx on the host in front of containers named `<peer>-web-<port>` published on
/// the host's loopback, alternating between two ports.
struct PeerSide {
    peer: Peer,
    ports: [u16; 2],
    /// The port of the container the peer proxies to now.
    active: std::cell::Cell<u16>,
}

impl PeerSide {
    /// Starts the container of image `tag` on the first port (untimed, over SSH), then the
    /// peer in front of it (serving HTTPS with `tls`, if given), and waits until the peer
    /// serves `tag`.
    fn start(
        world: &DockerWorld,
        kind: PeerKind,
        listen: u16,
        ports: [u16; 2],
        tag: &str,
        tls: Option<&PeerTls>,
    ) -> Result<PeerSide> {
        let name = format!("{}-web-{}", kind.name(), ports[0]);
        world.ssh_ok(&format!(
            "docker rm -f {name} >/dev/null 2>&1; \
             docker run -d --name {name} -p 127.0.0.1:{}:8080 {} >/dev/null && \
             i=0; until curl -sf -o /dev/null http://127.0.0.1:{}/up; do \
               i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.05; done",
            ports[0],
            world.image(tag),
            ports[0]
        ))?;
        let peer = Peer::start_with(&world.lab, 0, kind, listen, ports[0], tls)?;
        let limit = Duration::from_secs(10);
        let served = match tls {
            None => world.wait_serves(peer.addr(), tag, limit),
            Some(_) => wait_serves_https(peer.addr(), tag, limit),
        };
        if let Err(e) = served {
            bail!("{e}; {}: {}", kind.name(), peer.log_tail());
        }
        eprintln!(
            "[switch] {} (pid {}) on {} in front of 127.0.0.1:{}",
            kind.name(),
            peer.pid(),
            peer.addr(),
            ports[0]
        );
        Ok(PeerSide {
            peer,
            ports,
            active: std::cell::Cell::new(ports[0]),
        })
    }

    fn container(&self, port: u16) -> String {
        format!("{}-web-{port}", self.peer.kind.name())
    }

    /// (the active port, the other one).
    fn next(&self) -> (u16, u16) {
        let from = self.active.get();
        let to = if from == self.ports[0] {
            self.ports[1]
        } else {
            self.ports[0]
        };
        (from, to)
    }

    /// One switch as an operator scripting the peer would do it: start the new container
    /// on the other loopback port, wait until it answers (`curl /up` every 50 ms, up to
    /// 15 s), flip the peer to it, give requests in flight to the old one 2 s to finish, then
    /// stop (`docker stop -t 2`) and remove the old one.
    fn script(&self, image: &str, from: u16, to: u16) -> String {
        format!(
            "{MARKS}m 'run start'\n\
             docker run -d --name {new} -p 127.0.0.1:{to}:8080 {image} >/dev/null\n\
             i=0; until curl -sf -o /dev/null http://127.0.0.1:{to}/up; do \
               i=$((i+1)); [ $i -lt 300 ] || {{ echo 'the new container does not answer' >&2; exit 1; }}; \
               sleep 0.05; done\n\
             m 'ready done'\n\
             m 'switch start'\n\
             {flip}\n\
             m 'switch done'\n\
             sleep 2\n\
             docker stop -t 2 {old} >/dev/null\n\
             docker rm {old} >/dev/null\n\
             m 'remove done'\n",
            new = self.container(to),
            old = self.container(from),
            flip = self.peer.switch_commands(to),
        )
    }

    /// Stops the peer and removes its container (untimed).
    fn stop(self, world: &DockerWorld) -> Result<()> {
        let name = self.container(self.active.get());
        drop(self.peer);
        world.ssh_ok(&format!("docker rm -f {name} >/dev/null"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marks a script prints (through a real `sh` with [`MARKS`]) come back as steps
    /// timed since the script's start; other output is skipped.
    #[test]
    fn marked_scripts_give_the_switch_step() {
        let t0 = epoch_now();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{MARKS}echo 3f1a2b\nm 'switch start'\nsleep 0.2\nm 'switch done'\nfalse\nm 'never here'\n"
            ))
            .output()
            .unwrap();
        assert!(!out.status.success(), "set -e stops at the first failure");
        let trace = marks(&String::from_utf8_lossy(&out.stdout), t0);
        let names: Vec<(&str, State)> = trace
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.state))
            .collect();
        assert_eq!(names, [("switch", State::Start), ("switch", State::Done)]);
        let (Some(a), Some(b)) = (trace.first_start("switch"), trace.last_end("switch")) else {
            panic!("{trace:?}")
        };
        assert!(b - a >= 0.19 && b - a < 1.0, "{a} {b}");
        assert!(
            a >= 0.0 && b < 5.0,
            "seconds since the script's start: {a} {b}"
        );
    }
}

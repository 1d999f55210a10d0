//! `rollout`: the bake judged by the edge proxy itself. A `cutover proxy run` on loopback
//! routes one service to in-process backends (an "old" release and a "new" one); after a
//! switch (or a canary) the proxy gets a `bake` request and is left alone, as after a
//! controller died. Measured: how long a bad release serves requests after its first failed
//! one until every request is back on the old release, and how many failed meanwhile
//! (canary 10% and 100%); how many healthy bakes with latency noise are reverted (false
//! reverts); and three ways back for one container app ([`crate::way_back`]): the revert
//! inside a bake (a proxy swap), a warm and a cold rollback (container starts).

use crate::report::{self, Section};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testlab::{Load, LoadOptions};

pub(crate) const HOW_TO_READ: &str = "\
no hosts and no containers: this machine's loopback. `cutover proxy run` (the binary the bench \
built) routes one service (`Host: app.test`) to backends in the bench process (plain HTTP/1.1 \
keep-alive servers, one thread per connection): the *old* release answers 200, the *bad* one \
answers 500 to every 5th request (its `/up` answers 200, so it passes every gate). The load is \
testlab's generator, 4 keep-alive workers with 2 ms pauses. A run: the old release is current, \
the bad one gets every request (*100%*: a deploy) or 10% of them (*canary 10%*), then the proxy \
gets a `bake` request (window 60 s, max_error_rate 0.01, judging interval 500 ms, 20 requests \
needed to judge) and nobody talks to it any more. *first failure → all on old* is the time from \
the first 500 the bad backend answered to the last request it received (after that the proxy \
sent every request to the old release), median (min–max) over the runs (`--reps`); *failed* is \
the number of 500s the load saw; *verdict after* is the proxy's own `finished_at - started_at` \
of the bake. The goal is under the judging interval plus 100 ms. False reverts: N bakes \
(100, 10 with `--quick`) of a healthy release against a healthy old one, both with the same \
noise (latency 1 ms plus an exponential of mean 4 ms, 1% of requests 40 to 160 ms, 0.2% of \
requests 500), 2 s windows (1 s with `--quick`) with max_error_rate 0.01 and max_p99 500ms; \
a false revert is a bake the proxy failed. The last table takes three ways back to the old \
release of one app (a testlab Docker host, blue-green, cutover's proxy; `web:a` serving): \
*revert during a bake*: `web:bad` (`/up` healthy, the load's `/cgi-bin/app` answers 500; \
2 load workers) deployed with `bake = \"30s\"`, the proxy fails it and swaps back to `a`'s \
container, still running; timed from the proxy's verdict (its `finished_at` minus the swap's \
drain and gate, from its state file) until `GET /` (polled every 10 ms) answers `a` again, and \
until the deploy exits 1; *warm rollback after the bake*: `a` then `b` deployed (`a`'s \
container stopped at the commit), then `cutover rollback` (a container start), timed from its \
spawn; *cold rollback*: the same after `docker container prune` and `docker image prune -a`, so \
`a` is pulled again. The loopback row is the swap measured above without containers.";

/// One in-process HTTP backend.
struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Since `origin`: first 500 and last request seen, in microseconds (0: none).
    first_500_us: Arc<AtomicU64>,
    last_request_us: Arc<AtomicU64>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Healthy,
    /// Every 5th request of `/` gets a 500.
    FailEvery5th,
    /// Latency 1 ms + Exp(4 ms), 1% 40-160 ms, 0.2% 500s.
    Noisy,
}

/// xorshift64*: reproducible noise without a dependency.
fn next_rand(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

impl Backend {
    fn start(behaviour: Behaviour, origin: Instant, seed: u64) -> Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let first_500_us = Arc::new(AtomicU64::new(0));
        let last_request_us = Arc::new(AtomicU64::new(0));
        let b = Backend {
            addr,
            stop: stop.clone(),
            first_500_us: first_500_us.clone(),
            last_request_us: last_request_us.clone(),
        };
        let rng = Arc::new(Mutex::new(seed | 1));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (requests, first, last, rng, stop) = (
                            requests.clone(),
                            first_500_us.clone(),
                            last_request_us.clone(),
                            rng.clone(),
                            stop.clone(),
                        );
                        std::thread::spawn(move || {
                            let _ =
                                serve(s, behaviour, origin, &requests, &first, &last, &rng, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(b)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    s: TcpStream,
    behaviour: Behaviour,
    origin: Instant,
    requests: &AtomicU64,
    first_500: &AtomicU64,
    last: &AtomicU64,
    rng: &Mutex<u64>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        let path = loop {
            match reader.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => break line.split_whitespace().nth(1).unwrap_or("/").to_string(),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        };
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let n = requests.fetch_add(1, Ordering::Relaxed) + 1;
        let now_us = origin.elapsed().as_micros() as u64;
        let health = path == "/up";
        if !health {
            last.fetch_max(now_us, Ordering::Relaxed);
        }
        let (mut code, mut delay) = (200u16, Duration::ZERO);
        match behaviour {
            Behaviour::Healthy => {}
            Behaviour::FailEvery5th => {
                if !health && n.is_multiple_of(5) {
                    code = 500;
                }
            }
            Behaviour::Noisy => {
                let (a, b, c) = {
                    let mut st = rng.lock().unwrap_or_else(|e| e.into_inner());
                    (next_rand(&mut st), next_rand(&mut st), next_rand(&mut st))
                };
                let mut ms = 1.0 - 4.0 * (1.0 - a).ln();
                if b < 0.01 {
                    ms = 40.0 + 120.0 * c;
                }
                delay = Duration::from_micros((ms * 1000.0) as u64);
                if !health && c < 0.002 {
                    code = 500;
                }
            }
        }
        if code == 500 {
            let _ =
                first_500.compare_exchange(0, now_us.max(1), Ordering::Relaxed, Ordering::Relaxed);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let body = if code == 200 { "ok\n" } else { "boom\n" };
        let reason = if code == 200 {
            "OK"
        } else {
            "Internal Server Error"
        };
        write!(
            w,
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        w.flush()?;
    }
}

/// A `cutover proxy run` on a loopback port, killed on drop.
struct ProxyProc {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl ProxyProc {
    fn start(ctx: &Ctx, dir: &Path) -> Result<ProxyProc> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(&ctx.cutover)
            .args(["proxy", "run", "--listen", &addr.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cutover proxy run")?;
        let p = ProxyProc {
            child,
            addr,
            dir: dir.to_path_buf(),
            bin: ctx.cutover.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.request(&json!({"op":"status"})).is_err() {
            if Instant::now() > deadline {
                bail!("the proxy did not answer on {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }

    fn request(&self, req: &Value) -> Result<Value> {
        let mut c = Command::new(&self.bin)
            .args(["proxy", "request", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        c.stdin
            .take()
            .ok_or_else(|| anyhow!("stdin"))?
            .write_all(format!("{req}\n").as_bytes())?;
        let out = c.wait_with_output()?;
        let v: Value = serde_json::from_slice(&out.stdout).context("proxy answer")?;
        if v["result"] == "error" {
            bail!("proxy: {}", v["error"]);
        }
        Ok(v)
    }

    fn deploy(&self, to: SocketAddr) -> Result<Value> {
        self.request(&json!({"op":"deploy","service":"app","target":to.to_string(),
            "health_path":"/up","domains":["app.test"],"healthy_after":1,"health_interval_ms":50,"drain_ms":2000}))
    }

    fn canary(&self, to: SocketAddr, percent: u8) -> Result<Value> {
        self.request(&json!({"op":"canary","service":"app","target":to.to_string(),
            "health_path":"/up","healthy_after":1,"health_interval_ms":50,"drain_ms":2000,"percent":percent}))
    }

    fn bake(
        &self,
        target: SocketAddr,
        fallback: SocketAddr,
        window_ms: u64,
        p99: Option<u64>,
    ) -> Result<Value> {
        let mut req = json!({"op":"bake","service":"app","target":target.to_string(),
            "fallback":fallback.to_string(),"health_path":"/up","window_ms":window_ms,
            "max_error_ppm":10000,"interval_ms":500,"timeout_ms":2000,"release":"new","old_release":"old"});
        if let Some(p) = p99 {
            req["max_p99_ms"] = json!(p);
        }
        self.request(&req)
    }

    /// Polls until the bake has a verdict.
    fn verdict(&self, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.request(&json!({"op":"stats","service":"app"}))?;
            if s["bake"]["state"] != "baking" {
                return Ok(s["bake"].clone());
            }
            if Instant::now() > deadline {
                bail!("no verdict: {s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(proxy: &ProxyProc) -> Load {
    Load::start(LoadOptions {
        host_header: Some("app.test".into()),
        workers_per_target: 4,
        pause: Duration::from_millis(2),
        ..LoadOptions::new(vec![proxy.addr])
    })
}

/// One bad release's bake: (first failure → last request on it in ms, failed requests,
/// verdict after ms, verdict → last request in ms).
fn bad_bake(ctx: &Ctx, dir: &Path, canary: Option<u8>, seed: u64) -> Result<(f64, u64, f64, f64)> {
    let origin = Instant::now();
    let old = Backend::start(Behaviour::Healthy, origin, seed)?;
    let bad = Backend::start(Behaviour::FailEvery5th, origin, seed + 1)?;
    let proxy = ProxyProc::start(ctx, dir)?;
    proxy.deploy(old.addr)?;
    let l = load(&proxy);
    std::thread::sleep(Duration::from_millis(500));
    match canary {
        Some(p) => proxy.canary(bad.addr, p)?,
        None => proxy.deploy(bad.addr)?,
    };
    proxy.bake(bad.addr, old.addr, 60_000, None)?;
    let v = proxy.verdict(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(500));
    let report = l.stop();
    if v["state"] != "failed" {
        bail!("the bad release passed its bake: {v}");
    }
    let first = bad.first_500_us.load(Ordering::Relaxed) as f64 / 1000.0;
    let last = bad.last_request_us.load(Ordering::Relaxed) as f64 / 1000.0;
    let verdict_ms = v["finished_at_ms"].as_u64().unwrap_or(0) as f64
        - v["started_at_ms"].as_u64().unwrap_or(0) as f64;
    // The verdict's wall-clock moment on the bench's clock is not known exactly: the swap is
    // measured as last request on the bad release minus (bake start + verdict after).
    let swap = (last - first - verdict_ms).max(0.0);
    drop(bad);
    Ok((last - first, report.failed, verdict_ms, swap))
}

/// One healthy bake with noise on both releases: whether the proxy failed it.
fn noisy_bake(ctx: &Ctx, dir: &Path, window_ms: u64, seed: u64) -> Result<(bool, String)> {
    let origin = Instant::now();
    let old = Backend::start(Behaviour::Noisy, origin, seed)?;
    let new = Backend::start(Behaviour::Noisy, origin, seed + 7)?;
    let proxy = ProxyProc::start(ctx, dir)?;
    proxy.deploy(old.addr)?;
    let l = load(&proxy);
    std::thread::sleep(Duration::from_millis(300));
    proxy.deploy(new.addr)?;
    proxy.bake(new.addr, old.addr, window_ms, Some(500))?;
    let v = proxy.verdict(Duration::from_millis(window_ms) + Duration::from_secs(30))?;
    let _ = l.stop();
    Ok((
        v["state"] == "failed",
        v["verdict"].as_str().unwrap_or("").to_string(),
    ))
}

fn median_cell(v: &[f64]) -> String {
    let (med, min, max) = report::spread(v);
    format!("{med:.0} ({min:.0}–{max:.0})")
}

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let clock = Instant::now();
    let load_before = crate::machine::loadavg();
    let dir = ctx.work.join("rollout-proxy");
    let mut rows = Vec::new();
    let mut raw = serde_json::Map::new();
    let mut swaps = Vec::new();
    for (label, canary) in [("canary 10%", Some(10u8)), ("100%", None)] {
        let (mut t, mut f, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..ctx.reps.max(3) {
            let (took, failed, verdict, swap) = bad_bake(ctx, &dir, canary, 11 + rep as u64)?;
            t.push(took);
            f.push(failed as f64);
            v.push(verdict);
            swaps.push(swap);
        }
        rows.push(vec![
            label.to_string(),
            median_cell(&t),
            median_cell(&f),
            median_cell(&v),
        ]);
        raw.insert(
            label.into(),
            json!({"first_failure_to_all_on_old_ms": t, "failed": f, "verdict_after_ms": v}),
        );
    }
    let n = if ctx.quick { 10 } else { 100 };
    let window = if ctx.quick { 1000 } else { 2000 };
    let mut false_reverts = Vec::new();
    for k in 0..n {
        let (failed, why) = noisy_bake(ctx, &dir, window, 1000 + k as u64)?;
        if failed {
            false_reverts.push(why);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ways = crate::way_back::measure(ctx)?;
    let (mut way_rows, ways_json) = crate::way_back::rows(&ways);
    way_rows.push(vec![
        "the same swap on loopback (above; verdict → last request on the bad release)".into(),
        median_cell(&swaps),
        "–".into(),
    ]);
    let load_after = crate::machine::loadavg();
    let mut body = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    body.push_str(&format!(
        " The `cutover` binary is the bench's own build ({} profile).\n\n",
        if crate::harness::RELEASE {
            "release"
        } else {
            "dev, unoptimized"
        }
    ));
    body.push_str(&report::table(
        &[
            "bad release gets",
            "first failure → all on old (ms)",
            "failed requests",
            "verdict after (ms)",
        ],
        &rows,
    ));
    body.push('\n');
    body.push_str(&report::table(
        &["healthy bakes with noise", "window", "false reverts"],
        &[vec![
            n.to_string(),
            format!("{} ms", window),
            false_reverts.len().to_string(),
        ]],
    ));
    body.push('\n');
    body.push_str(&report::table(
        &[
            "way back (one blue-green app, one Docker host)",
            "old version answers after (ms)",
            "command exits after (ms)",
        ],
        &way_rows,
    ));
    let value = json!({
        "bad": raw,
        "swap_ms": swaps,
        "way_back": ways_json,
        "false_reverts": {"bakes": n, "window_ms": window, "reverted": false_reverts},
        "cutover_failed": {},
    });
    Ok(Section {
        markdown: body,
        json: value,
    })
}

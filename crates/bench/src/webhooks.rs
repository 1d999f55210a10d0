//! `webhooks`: deploy on push, timed. A `cutover serve` on loopback with a files app whose
//! `[build]` ships a git repository's tree as it is (no build command) and a GitHub
//! `[webhook]`: from a signed `push` delivery's POST to the host serving the pushed commit;
//! the HMAC-SHA256 check's throughput (ring, the server's primitive); and a flood of forged
//! deliveries (refused per second) with a genuine push in the middle of it, still deployed;
//! and from a signed `pull_request` `opened` delivery to the new preview serving the head at its
//! host name through the host's edge proxy (a files preview, the proxy's static target).

use crate::harness::World;
use crate::report::{self, spread, Section};
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const HOW_TO_READ: &str = "\
one testlab host (nginx) and a `cutover serve` on loopback (the bench's cutover build); the app \
`site` is a files app whose `[build]` takes a bare git repository on this machine and ships the \
commit's tree as it is (no build command), with a GitHub `[webhook]` (branch `main`). *push → \
serving*: the bench commits a new `version` (and `index.html`, `up`), pushes it, POSTs a `push` \
delivery signed with HMAC-SHA256 (`X-Hub-Signature-256`) naming the full SHA, and polls the host's \
`GET /version` every 10 ms until it answers the commit's label; timed from the POST; *answered \
after* is the server's 202. The second row restarts the server on the same config with a build \
command (copying the three files into `out/`, the release's `output`). *`pull_request` opened → \
preview serves*: the config also has `[proxy]` (cutover's edge proxy on the host's port 8000, \
installed by `cutover setup`) and `[preview] domain = \"preview.bench\"`; on the first server (no \
build step) the bench commits and pushes a new labelled commit, POSTs a signed `pull_request` \
`opened` delivery of a new pull request whose head is that SHA, and polls `GET /version` on the \
proxy with `Host: pr-<n>-site.preview.bench` every 10 ms until it answers the label: the preview \
app `site-pr-<n>`'s first release, built from the repository, its route added to the proxy, \
served by the proxy as a static target. The container row does the same on a lab of its own: \
one Docker host with cutover's edge proxy (`cutover setup`), the app `web` built by the server \
(its docker CLI on the host's dockerd) from a repository holding a `Dockerfile` (`FROM scratch`, \
a static busybox serving `/www`) and the labelled files, pushed to the lab's registry, deployed \
as the preview's first container (blue-green gate through the proxy) and polled through the proxy \
with `Host: pr-<n>-web.preview.bench`; the first pull request (cloning the repository into the \
server's mirror) is untimed. *HMAC-SHA256 verify* is ring's `hmac::verify` (what the server runs) \
in the bench process over a 2 KiB push body and a 5 MiB one (the largest accepted), for 1 s each. \
*Forged flood*: 8 client threads, each on its own keep-alive connection, POST a 2 KiB push body \
with a wrong signature as fast as they are answered, for 6 s (3 s with `--quick`); each refusal is \
a 401 and an audit row in the server's SQLite history. 1 s into the flood the bench pushes a \
genuine commit (signed delivery): *genuine push during the flood* is its POST → host serving \
time, and its answer.";

const SECRET: &str = "bench-hook-secret-5e2d";

/// `cutover serve` on a free loopback port with the webhook secret, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(world: &World) -> Result<Server> {
    serve_with(|args| world.cutover(args))
}

/// `cutover serve` from the command `cutover` makes of its arguments.
fn serve_with(cutover: impl Fn(&[&str]) -> Command) -> Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = cutover(&["serve", "--listen", &addr.to_string()])
        .env("BENCH_HOOK_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cutover serve")?;
    let s = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("cutover serve did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(s)
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The app's repository: a bare origin and a work tree.
struct Repo {
    work: std::path::PathBuf,
    /// Where a commit's `version`, `index.html` and `up` go (the work tree, or an image's
    /// `rootfs/www`).
    www: std::path::PathBuf,
}

impl Repo {
    fn create(dir: &Path) -> Result<(Repo, std::path::PathBuf)> {
        let origin = dir.join("origin.git");
        let work = dir.join("work");
        std::fs::create_dir_all(&work)?;
        git(dir, &["init", "-q", "--bare", "-b", "main", "origin.git"])?;
        git(&work, &["init", "-q", "-b", "main"])?;
        git(
            &work,
            &["remote", "add", "origin", &origin.display().to_string()],
        )?;
        Ok((
            Repo {
                www: work.clone(),
                work,
            },
            origin,
        ))
    }

    /// Commits a page labelled `label` and pushes it: the full SHA.
    fn commit(&self, label: &str) -> Result<String> {
        for (name, text) in [("version", label), ("index.html", label), ("up", "ok")] {
            std::fs::write(self.www.join(name), format!("{text}\n"))?;
        }
        git(&self.work, &["add", "-A"])?;
        git(&self.work, &["commit", "-q", "-m", label])?;
        git(&self.work, &["push", "-q", "origin", "main"])?;
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A push event as GitHub sends it, padded to about 2 KiB like a real one.
fn push_body(after: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": "refs/heads/main",
        "before": "0".repeat(40),
        "after": after,
        "created": false, "deleted": false, "forced": false,
        "repository": {"full_name": "acme/site", "default_branch": "main"},
        "pusher": {"name": "ada"},
        "head_commit": {"id": after, "message": "x".repeat(1700)},
    }))
    .unwrap_or_default()
}

/// One POST on a keep-alive connection: the status and the body.
fn post(
    conn: &mut BufReader<TcpStream>,
    app: &str,
    event: &str,
    delivery: &str,
    signature: &str,
    body: &[u8],
) -> Result<(u16, String)> {
    let head = format!(
        "POST /hooks/github/{app} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: {event}\r\nX-GitHub-Delivery: {delivery}\r\n\
         X-Hub-Signature-256: sha256={signature}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let s = conn.get_mut();
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line: {line:?}"))?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        conn.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut b = vec![0u8; len];
    conn.read_exact(&mut b)?;
    Ok((status, String::from_utf8_lossy(&b).to_string()))
}

fn connect(addr: SocketAddr) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// A signed push of a new commit labelled `label`: (POST → 202 ms, POST → serving ms, answer).
fn genuine_push(world: &World, s: &Server, repo: &Repo, label: &str) -> Result<Genuine> {
    let sha = repo.commit(label)?;
    let body = push_body(&sha);
    let mut conn = connect(s.addr)?;
    let t = Instant::now();
    let (status, answer) = post(
        &mut conn,
        "site",
        "push",
        &format!("d-{label}"),
        &sign(SECRET, &body),
        &body,
    )?;
    let answered = t.elapsed().as_secs_f64() * 1000.0;
    if status != 202 {
        bail!("the genuine push of {label} got {status}: {answer}");
    }
    while !world.serves(label) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{label} was not served 120 s after its push");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((
        answered,
        t.elapsed().as_secs_f64() * 1000.0,
        format!("{status} {answer}"),
    ))
}

/// Where the bench's previews are served: `pr-<n>-site.<PREVIEW_DOMAIN>` on the host's edge
/// proxy (`[proxy] listen`).
const PREVIEW_DOMAIN: &str = "preview.bench";
const PROXY_PORT: u16 = 8000;

/// `GET path` of `addr` with `Host: host`: the body on a 200.
fn get_as(addr: SocketAddr, host: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    let (head, body) = b.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_string())
}

/// A `pull_request` event as GitHub sends it (the fields cutover reads, and a few more).
fn pull_request_body(action: &str, number: u64, head: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number, "state": "open", "merged": false, "labels": [],
            "head": {"ref": format!("feature-{number}"), "sha": head, "repo": {"full_name": "acme/site"}},
            "base": {"ref": "main", "sha": "0".repeat(40), "repo": {"full_name": "acme/site"}},
        },
        "repository": {"full_name": "acme/site"},
        "sender": {"login": "ada"},
    }))
    .unwrap_or_default()
}

/// Pull request `number` opened on a new commit labelled `label`, delivered signed: (POST →
/// answer ms, POST → its preview serves the commit's `/version` at its host name through the
/// edge proxy, ms).
fn preview_opened(
    proxy: SocketAddr,
    app: &str,
    s: &Server,
    repo: &Repo,
    number: u64,
) -> Result<(f64, f64)> {
    let label = format!("pr{number}");
    let sha = repo.commit(&label)?;
    let body = pull_request_body("opened", number, &sha);
    let host = format!("pr-{number}-{app}.{PREVIEW_DOMAIN}");
    let mut conn = connect(s.addr)?;
    let t = Instant::now();
    let (status, answer) = post(
        &mut conn,
        app,
        "pull_request",
        &format!("pr-{number}"),
        &sign(SECRET, &body),
        &body,
    )?;
    let answered = t.elapsed().as_secs_f64() * 1000.0;
    if status != 202 {
        bail!("pull request #{number} opened got {status}: {answer}");
    }
    while get_as(proxy, &host, "/version").as_deref() != Some(label.as_str()) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the preview of #{number} did not serve {label} 120 s after the delivery");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((answered, t.elapsed().as_secs_f64() * 1000.0))
}

/// The image the container previews are built into: a static busybox serving `/www`.
const DOCKERFILE: &str = "FROM scratch\nCOPY rootfs/ /\nEXPOSE 8080\n\
CMD [\"sh\", \"-c\", \"trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait\"]\n";

/// Container previews: a lab of one Docker host with cutover's edge proxy, the app `web`
/// built from a repository (a Dockerfile, a static busybox) by a `cutover serve` whose docker
/// CLI talks to the host's dockerd; `n` pull requests opened (one untimed first): (POST →
/// answer ms, POST → the preview serves its head ms) each.
fn container_previews(ctx: &Ctx, n: usize) -> Result<Times> {
    let w = crate::containers::DockerWorld::start(ctx)?;
    let dir = w.lab.dir().join("controller/git");
    std::fs::create_dir_all(&dir)?;
    let (mut repo, origin) = Repo::create(&dir)?;
    let bin = repo.work.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("/bin/busybox (Debian's busybox-static)")?;
    for applet in ["sh", "httpd"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    std::fs::write(repo.work.join("Dockerfile"), DOCKERFILE)?;
    repo.www = repo.work.join("rootfs/www");
    std::fs::create_dir_all(&repo.www)?;
    w.write_config_with(
        "blue-green",
        &format!(
            "\n[build]\nrepo = {:?}\ndockerfile = \"Dockerfile\"\n\n[webhook]\nprovider = \"github\"\n\
             secret_env = \"BENCH_HOOK_SECRET\"\nbranch = \"main\"\n\n\
             [preview]\ndomain = \"{PREVIEW_DOMAIN}\"\nmax = 50\n",
            origin.display().to_string()
        ),
    )?;
    let docker = w.lab.docker_host(0);
    let s = serve_with(|args| {
        let mut c = w.cutover(args);
        c.env("DOCKER_HOST", &docker).env_remove("DOCKER_CONTEXT");
        c
    })?;
    // The first clones the repository into the server's mirror: untimed.
    preview_opened(w.proxy_addr(), "web", &s, &repo, 100)?;
    let mut times = Times::default();
    for k in 1..=n as u64 {
        eprintln!("[webhooks] container pull request {k}/{n} opened");
        times.add(preview_opened(w.proxy_addr(), "web", &s, &repo, k)?);
    }
    Ok(times)
}

/// ring's HMAC-SHA256 verify over `size` bytes for about 1 s: verifications per second.
fn verify_rate(size: usize) -> f64 {
    let body = vec![b'x'; size];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, &body);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(1) || n < 3 {
        if ring::hmac::verify(&key, &body, tag.as_ref()).is_ok() {
            n += 1;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// A genuine push's (POST → answer ms, POST → serving ms, the answer).
type Genuine = (f64, f64, String);

/// The forged flood with a genuine push 1 s in.
fn flood(world: &World, s: &Server, repo: &Repo, secs: u64) -> Result<Flood> {
    let stop = Arc::new(AtomicBool::new(false));
    let (refused, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let forged = push_body(&"f".repeat(40));
    let wrong = sign("not-the-secret", &forged);
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|k| {
            let (stop, refused, other) = (stop.clone(), refused.clone(), other.clone());
            let (body, sig, addr) = (forged.clone(), wrong.clone(), s.addr);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = connect(addr) else {
                        other.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match post(
                            &mut c,
                            "site",
                            "push",
                            &format!("forged-{k}-{n}"),
                            &sig,
                            &body,
                        ) {
                            Ok((401, _)) => refused.fetch_add(1, Ordering::Relaxed),
                            Ok(_) => other.fetch_add(1, Ordering::Relaxed),
                            Err(_) => {
                                other.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        };
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let genuine = genuine_push(world, s, repo, "flooded");
    let rest = Duration::from_secs(secs).saturating_sub(t.elapsed());
    std::thread::sleep(rest);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        let _ = th.join();
    }
    let took = t.elapsed().as_secs_f64();
    Ok(Flood {
        refused: refused.load(Ordering::Relaxed),
        other: other.load(Ordering::Relaxed),
        took,
        genuine: genuine?,
    })
}

fn cell(v: &[f64]) -> String {
    let (med, min, max) = spread(v);
    if v.len() > 1 {
        format!("{med:.0} ({min:.0}–{max:.0})")
    } else {
        format!("{med:.0}")
    }
}

/// POST → answer and POST → serving (ms) of each timed delivery of one kind.
#[derive(Default)]
struct Times {
    answered: Vec<f64>,
    serving: Vec<f64>,
}

impl Times {
    fn add(&mut self, (answered, serving): (f64, f64)) {
        self.answered.push(answered);
        self.serving.push(serving);
    }

    /// A row of the deliveries table: what, runs, answered after, delivery → serving.
    fn row(&self, what: &str) -> Vec<String> {
        vec![
            what.into(),
            self.answered.len().to_string(),
            cell(&self.answered),
            cell(&self.serving),
        ]
    }
}

/// What the forged flood saw.
struct Flood {
    refused: u64,
    other: u64,
    /// Its length, s.
    took: f64,
    genuine: Genuine,
}

/// Everything the section reports.
struct Measured {
    pushes: Times,
    built: Times,
    previews: Times,
    container_previews: Times,
    /// Verifications per second over a 2 KiB and a 5 MiB body.
    verify: [f64; 2],
    flood: Flood,
}

/// The verify table's body sizes, as `Measured::verify` holds them.
const VERIFY_SIZES: [usize; 2] = [2048, 5 * 1024 * 1024];

pub(crate) fn run(ctx: &Ctx) -> Result<Section> {
    let clock = Instant::now();
    let load_before = crate::machine::loadavg();
    let world = World::start(1, ctx)?;
    let m = measure(ctx, &world)?;
    let load_after = crate::machine::loadavg();
    let mut md = report::measured_line(ctx, &load_before, &load_after, clock.elapsed());
    md.push_str("\n\n");
    md.push_str(&deliveries_table(&m));
    md.push('\n');
    md.push_str(&verify_table(&m));
    md.push('\n');
    md.push_str(&flood_table(&m.flood));
    Ok(Section {
        markdown: md,
        json: section_json(&m),
    })
}

/// Runs every measurement on `world` (and the container previews on a lab of their own).
fn measure(ctx: &Ctx, world: &World) -> Result<Measured> {
    let (repo, origin) = Repo::create(&world.dir)?;
    configure(world, &origin)?;
    let s = serve(world)?;
    let n = if ctx.quick { 3 } else { 10 };
    // The first push clones the repository into the server's mirror: untimed.
    genuine_push(world, &s, &repo, "v0")?;
    let pushes = timed_pushes(world, &s, &repo, n, "v", "push")?;
    let proxy = SocketAddr::new(world.lab.ip(0).into(), PROXY_PORT);
    let mut previews = Times::default();
    for k in 1..=n as u64 {
        eprintln!("[webhooks] pull request {k}/{n} opened");
        previews.add(preview_opened(proxy, "site", &s, &repo, k)?);
    }
    // The same with a small build step: the server restarted on the config with a command.
    drop(s);
    add_build_step(world)?;
    let s = serve(world)?;
    let built = timed_pushes(world, &s, &repo, n, "b", "push with a build")?;
    drop(s);
    let container_previews = container_previews(ctx, n)?;
    let s = serve(world)?;
    let verify = VERIFY_SIZES.map(verify_rate);
    let secs = if ctx.quick { 3 } else { 6 };
    eprintln!("[webhooks] forged flood for {secs} s");
    let flood = flood(world, &s, &repo, secs)?;
    Ok(Measured {
        pushes,
        built,
        previews,
        container_previews,
        verify,
        flood,
    })
}

/// Gives the world's app a `[build]` from `origin`, a GitHub `[webhook]`, the edge proxy and
/// `[preview]`, and installs the proxy on the host (`cutover setup`).
fn configure(world: &World, origin: &Path) -> Result<()> {
    let config = std::fs::read_to_string(&world.config)?;
    std::fs::write(
        &world.config,
        format!(
            "{config}\n[build]\nrepo = {:?}\n\n[webhook]\nprovider = \"github\"\nsecret_env = \"BENCH_HOOK_SECRET\"\nbranch = \"main\"\n\n\
             [proxy]\nlisten = \"0.0.0.0:{PROXY_PORT}\"\ninstall_dir = \"/srv/cutover\"\n\n\
             [preview]\ndomain = \"{PREVIEW_DOMAIN}\"\nmax = 50\n",
            origin.display().to_string()
        ),
    )?;
    // The edge proxy that serves the files app's previews, on the host.
    let out = world.cutover(&["setup", "--json"]).output()?;
    if !out.status.success() {
        bail!(
            "cutover setup exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Adds a build command (copying the three files into `out/`) to the config's `[build]`.
fn add_build_step(world: &World) -> Result<()> {
    let text = std::fs::read_to_string(&world.config)?;
    std::fs::write(
        &world.config,
        text.replace(
            "\n\n[webhook]",
            "\ncommand = \"mkdir -p out && cp index.html up version out/\"\noutput = \"out\"\n\n[webhook]",
        ),
    )?;
    Ok(())
}

/// `n` genuine pushes labelled `<prefix>1`..`<prefix>n`, timed.
fn timed_pushes(
    world: &World,
    s: &Server,
    repo: &Repo,
    n: usize,
    prefix: &str,
    what: &str,
) -> Result<Times> {
    let mut times = Times::default();
    for k in 1..=n {
        eprintln!("[webhooks] {what} {k}/{n}");
        let (a, t, _) = genuine_push(world, s, repo, &format!("{prefix}{k}"))?;
        times.add((a, t));
    }
    Ok(times)
}

fn deliveries_table(m: &Measured) -> String {
    report::table(
        &[
            "signed delivery → the commit is served (files app unless said)",
            "runs",
            "answered after (ms)",
            "delivery → serving (ms)",
        ],
        &[
            m.pushes.row("no build step (the commit's tree shipped as it is)"),
            m.built.row("a small build (`mkdir -p out && cp index.html up version out/`)"),
            m.previews.row("`pull_request` opened → its new preview serves the head (no build step; the edge proxy's static target)"),
            m.container_previews.row("`pull_request` opened → its new container preview serves the head (docker build and push, container app)"),
        ],
    )
}

fn verify_table(m: &Measured) -> String {
    report::table(
        &[
            "HMAC-SHA256 verify (ring, one core)",
            "verifications/s",
            "MiB/s",
        ],
        &VERIFY_SIZES
            .iter()
            .zip(m.verify)
            .map(|(size, rate)| {
                vec![
                    if *size == 2048 {
                        "2 KiB body".into()
                    } else {
                        "5 MiB body".into()
                    },
                    format!("{rate:.0}"),
                    format!("{:.0}", rate * *size as f64 / 1048576.0),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn flood_table(f: &Flood) -> String {
    let (g_answered, g_serving, g_answer) = &f.genuine;
    report::table(
        &[
            "forged flood (8 keep-alive clients)",
            "refused (401)",
            "other answers or errors",
            "refused/s",
            "genuine push during it: answer",
            "answered after (ms)",
            "push → serving (ms)",
        ],
        &[vec![
            format!("{:.1} s", f.took),
            f.refused.to_string(),
            f.other.to_string(),
            format!("{:.0}", f.refused as f64 / f.took),
            g_answer.chars().take(60).collect(),
            format!("{g_answered:.0}"),
            format!("{g_serving:.0}"),
        ]],
    )
}

fn section_json(m: &Measured) -> serde_json::Value {
    let f = &m.flood;
    let (g_answered, g_serving, g_answer) = &f.genuine;
    json!({
        "push_answered_ms": m.pushes.answered,
        "push_to_serving_ms": m.pushes.serving,
        "with_build": {"push_answered_ms": m.built.answered, "push_to_serving_ms": m.built.serving},
        "preview_opened": {"answered_ms": m.previews.answered, "to_serving_ms": m.previews.serving},
        "container_preview_opened": {"answered_ms": m.container_previews.answered, "to_serving_ms": m.container_previews.serving},
        "verify_per_s": {"2KiB": m.verify[0], "5MiB": m.verify[1]},
        "flood": {"seconds": f.took, "refused": f.refused, "other": f.other,
                  "genuine": {"answered_ms": g_answered, "serving_ms": g_serving, "answer": g_answer}},
    })
}

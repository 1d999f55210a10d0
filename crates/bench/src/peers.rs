//! The peers that people put in front of containers instead of cutover's edge proxy, run in a
//! testlab host's network namespace: Debian's Caddy (`caddy run` with a JSON config and its
//! own admin API on the host's loopback) and Debian's nginx (its own master process with its
//! own config, pid file and upstream file). Both reverse proxy to one `127.0.0.1:PORT` (a
//! container published on the host's loopback, as cutover publishes its containers); the
//! operator's way to move them to another port is [`Peer::switch_commands`].
//!
//! Every file of a peer (config, upstream file, pid file, logs, Caddy's HOME and XDG
//! directories) lives under `<lab dir>/peers/<name>`, a path that the host's SSH sessions see
//! at the same place (only `/srv` is private to a host), so the operator's commands over SSH
//! and the bench read and write the same files. The process is started with `nsenter
//! --net=/var/run/netns/<host's namespace>` (network namespace only) as a child of the bench,
//! so it is in the bench's cpuacct group, and it is stopped by its exact pid (nginx: its
//! master, which stops its workers) when the [`Peer`] is dropped.

use anyhow::{bail, Context as _, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testlab::Lab;

/// Debian's binaries.
const CADDY: &str = "/usr/bin/caddy";
const NGINX: &str = "/usr/sbin/nginx";
/// Caddy's admin API inside the host's namespace (its loopback is the host's own).
const CADDY_ADMIN: &str = "127.0.0.1:2019";
/// The name of the Caddy server in its JSON config.
const CADDY_SERVER: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Caddy,
    Nginx,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Caddy => "caddy",
            Kind::Nginx => "nginx",
        }
    }
}

/// A certificate and key (PEM files on this machine, which the peers read) for a peer that
/// terminates TLS (HTTP/2 and HTTP/1.1 by ALPN) on its port instead of serving plain HTTP.
pub(crate) struct PeerTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// A running Caddy or nginx in host `host` of a lab, listening on `listen` (all of the host's
/// addresses) and reverse proxying to `127.0.0.1:<upstream port>`.
pub(crate) struct Peer {
    pub(crate) kind: Kind,
    pub(crate) listen: u16,
    /// The host's address, as clients reach it.
    ip: std::net::Ipv4Addr,
    dir: PathBuf,
    child: Child,
}

impl Peer {
    /// Starts `kind` in host `host` of `lab`, proxying to `127.0.0.1:upstream`, and waits (up
    /// to 10 s) until its port accepts connections (and, for Caddy, its admin API answers).
    pub(crate) fn start(
        lab: &Lab,
        host: usize,
        kind: Kind,
        listen: u16,
        upstream: u16,
    ) -> Result<Peer> {
        Peer::start_with(lab, host, kind, listen, upstream, None)
    }

    /// [`Peer::start`], serving HTTPS on `listen` with `tls` if given.
    pub(crate) fn start_with(
        lab: &Lab,
        host: usize,
        kind: Kind,
        listen: u16,
        upstream: u16,
        tls: Option<&PeerTls>,
    ) -> Result<Peer> {
        let dir = lab
            .dir()
            .join("peers")
            .join(format!("{}-h{host}", kind.name()));
        std::fs::create_dir_all(dir.join("tmp"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let netns = format!("/var/run/netns/tl{}h{host}", lab.number());
        if !std::path::Path::new(&netns).exists() {
            bail!("no network namespace {netns} for host {host}");
        }
        let log = std::fs::File::create(dir.join("output.log"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={netns}")).arg("--");
        match kind {
            Kind::Caddy => {
                let config = dir.join("caddy.json");
                std::fs::write(&config, caddy_config(listen, upstream, tls))?;
                cmd.arg(CADDY)
                    .arg("run")
                    .arg("--config")
                    .arg(&config)
                    .env("HOME", &dir)
                    .env("XDG_DATA_HOME", dir.join("data"))
                    .env("XDG_CONFIG_HOME", dir.join("config"));
            }
            Kind::Nginx => {
                let d = dir.display().to_string();
                std::fs::write(dir.join("upstream.conf"), nginx_upstream(upstream))?;
                std::fs::write(dir.join("nginx.conf"), nginx_config(&d, listen, tls))?;
                cmd.arg(NGINX)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.join("error.log"));
            }
        }
        let child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {netns}", kind.name()))?;
        let mut peer = Peer {
            kind,
            listen,
            ip: lab.ip(host),
            dir,
            child,
        };
        peer.wait_listening(Duration::from_secs(10))?;
        Ok(peer)
    }

    /// Where clients reach the peer.
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), self.listen)
    }

    /// The pid of Caddy, or of nginx's master process.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peer's processes: Caddy, or nginx's master and its workers (the master's children
    /// now, read from `/proc`).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let pid = self.pid();
        let mut pids = vec![pid];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                    pids.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} at start: {}",
                    self.kind.name(),
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            if t.elapsed() > limit {
                bail!(
                    "{} does not accept connections on {} after {limit:?}: {}",
                    self.kind.name(),
                    self.addr(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the peer's output and error log.
    pub(crate) fn log_tail(&self) -> String {
        let mut text = String::new();
        for f in ["output.log", "error.log"] {
            if let Ok(t) = std::fs::read_to_string(self.dir.join(f)) {
                text.push_str(&t);
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// The shell commands (run on the host) that move the peer to `127.0.0.1:port`, as an
    /// operator scripting it would write them. Caddy: PATCH the route's upstreams through the
    /// admin API (Caddy loads the changed config and returns when it runs). nginx: rewrite the
    /// included upstream file and `nginx -s reload` (which returns once the master is
    /// signalled; new workers start and old ones finish their requests in the background).
    pub(crate) fn switch_commands(&self, port: u16) -> String {
        let d = self.dir.display();
        match self.kind {
            Kind::Caddy => format!(
                "curl -sS --fail-with-body -X PATCH -H 'Content-Type: application/json' \
                 -d '[{{\"dial\":\"127.0.0.1:{port}\"}}]' \
                 http://{CADDY_ADMIN}/config/apps/http/servers/{CADDY_SERVER}/routes/0/handle/0/upstreams"
            ),
            Kind::Nginx => format!(
                "{} && {NGINX} -c {d}/nginx.conf -e {d}/error.log -s reload",
                nginx_switch_rewrite(&d.to_string(), port)
            ),
        }
    }
}

impl Drop for Peer {
    /// SIGTERM to the exact pid (nginx's master stops its workers; Caddy stops), SIGKILL after
    /// 5 s (and then nginx's workers, by their exact pids).
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pids = self.pids();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let rest: Vec<String> = pids
            .iter()
            .filter(|&&p| p != self.pid())
            .map(u32::to_string)
            .collect();
        if !rest.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&rest)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Caddy's JSON config: one server on `:listen` with one route whose only handler is a
/// `reverse_proxy` to `127.0.0.1:upstream` (Caddy's defaults otherwise: HTTP/1.1 keep-alive
/// to the upstream); no automatic HTTPS; the admin API on the host's loopback. With `tls`:
/// the certificate loaded from its files and the server's connections over TLS (Caddy's
/// default connection policy: HTTP/2 and HTTP/1.1 by ALPN).
fn caddy_config(listen: u16, upstream: u16, tls: Option<&PeerTls>) -> String {
    let mut c = serde_json::json!({
        "admin": { "listen": CADDY_ADMIN },
        "logging": { "logs": { "default": { "level": "WARN" } } },
        "apps": { "http": { "servers": { CADDY_SERVER: {
            "listen": [format!(":{listen}")],
            "automatic_https": { "disable": true },
            "routes": [{
                "handle": [{
                    "handler": "reverse_proxy",
                    "upstreams": [{ "dial": format!("127.0.0.1:{upstream}") }],
                }],
            }],
        } } } },
    });
    if let Some(t) = tls {
        c["apps"]["tls"] = serde_json::json!({ "certificates": { "load_files": [{
            "certificate": t.cert,
            "key": t.key,
        }] } });
        c["apps"]["http"]["servers"][CADDY_SERVER]["tls_connection_policies"] =
            serde_json::json!([{}]);
    }
    c.to_string()
}

/// nginx's upstream file (included by [`nginx_config`]): one server and a pool of up to 32
/// idle keep-alive connections to it per worker.
fn nginx_upstream(port: u16) -> String {
    format!(
        "upstream app {{ server 127.0.0.1:{port}; keepalive 32; keepalive_requests 1000000; }}\n"
    )
}

/// The shell command that points nginx's upstream file in `dir` at `127.0.0.1:port` (written
/// aside, then renamed over the old one).
fn nginx_switch_rewrite(dir: &str, port: u16) -> String {
    format!(
        "printf '%s\\n' '{}' > {dir}/upstream.conf.new && mv {dir}/upstream.conf.new {dir}/upstream.conf",
        nginx_upstream(port).trim_end()
    )
}

/// nginx as a reverse proxy the way its documentation recommends for keep-alive upstreams
/// (`proxy_http_version 1.1`, an empty `Connection` header), one worker per core, an access
/// log written in batches (a line per request, as cutover's proxy keeps by default, so both do
/// the same work per request), clients' keep-alive connections kept for up to a million
/// requests. With `tls`:
/// `listen ... ssl http2` with the certificate, TLS 1.2 and 1.3 (Debian's nginx 1.22 leaves
/// 1.3 out by default).
fn nginx_config(dir: &str, listen: u16, tls: Option<&PeerTls>) -> String {
    let listen = match tls {
        None => format!("listen {listen};"),
        Some(t) => format!(
            "listen {listen} ssl http2;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;",
            t.cert.display(),
            t.key.display()
        ),
    };
    format!(
        "daemon off;
master_process on;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log combined buffer=64k flush=1s;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/upstream.conf;
    server {{
        {listen}
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
"
    )
}

/// "Caddy 2.6.2, nginx 1.22.1": the peers' versions as the machine read them.
pub(crate) fn versions_line(m: &crate::machine::Machine) -> String {
    format!(
        "Caddy {}, {}",
        m.caddy.trim_start_matches('v'),
        m.nginx
            .trim_start_matches("nginx version: ")
            .replace('/', " ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("cutover-bench-peers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        d
    }

    /// The nginx config the bench runs, with its upstream file as the operator's switch
    /// rewrites it, passes Debian's `nginx -t`.
    #[test]
    fn nginx_config_and_rewritten_upstream_pass_nginx_t() {
        let d = scratch("nginx");
        let ds = d.display().to_string();
        std::fs::write(d.join("nginx.conf"), nginx_config(&ds, 18100, None)).unwrap();
        std::fs::write(d.join("upstream.conf"), nginx_upstream(18091)).unwrap();
        let check = |what: &str| {
            let out = Command::new(NGINX)
                .args(["-t", "-q", "-c"])
                .arg(d.join("nginx.conf"))
                .arg("-e")
                .arg(d.join("error.log"))
                .output()
                .expect("running nginx -t (Debian's nginx-light)");
            assert!(
                out.status.success(),
                "{what}: nginx -t: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        check("as started");
        // The switch's own rewrite (everything before `&& nginx -s reload`).
        let peer_cmd = nginx_switch_rewrite(&ds, 18092);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&peer_cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{peer_cmd}: {out:?}");
        let text = std::fs::read_to_string(d.join("upstream.conf")).unwrap();
        assert!(text.contains("server 127.0.0.1:18092;"), "{text}");
        check("after the rewrite");
        let tls = test_tls(&d);
        std::fs::write(d.join("nginx.conf"), nginx_config(&ds, 18100, Some(&tls))).unwrap();
        let text = std::fs::read_to_string(d.join("nginx.conf")).unwrap();
        assert!(text.contains("listen 18100 ssl http2;"), "{text}");
        check("over TLS");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The Caddy config, plain and over TLS, passes Debian's `caddy validate`, and the admin
    /// API path the switch PATCHes exists in it.
    #[test]
    fn caddy_config_passes_caddy_validate() {
        let d = scratch("caddy");
        let tls = test_tls(&d);
        let config = d.join("caddy.json");
        for t in [None, Some(&tls)] {
            let text = caddy_config(18200, 18081, t);
            std::fs::write(&config, &text).unwrap();
            let out = Command::new(CADDY)
                .args(["validate", "--config"])
                .arg(&config)
                .env("HOME", &d)
                .env("XDG_DATA_HOME", d.join("data"))
                .env("XDG_CONFIG_HOME", d.join("config"))
                .output()
                .expect("running caddy validate (Debian's caddy)");
            assert!(
                out.status.success(),
                "caddy validate ({}): {}",
                if t.is_some() { "TLS" } else { "plain" },
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let server = &v["apps"]["http"]["servers"][CADDY_SERVER];
            assert_eq!(
                server["routes"][0]["handle"][0]["upstreams"],
                serde_json::json!([{"dial": "127.0.0.1:18081"}])
            );
            assert_eq!(server["tls_connection_policies"].is_array(), t.is_some());
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A self-signed certificate for `web.test` in `dir`.
    fn test_tls(dir: &std::path::Path) -> PeerTls {
        let (cert, key) = crate::tls_switch::write_test_cert(dir, "web.test").unwrap();
        PeerTls { cert, key }
    }
}

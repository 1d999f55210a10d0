//! Docker hosts and the lab's registry ([`LabOptions::docker`]).
//!
//! Host i runs its own `dockerd` inside its anchor's mount and network
//! namespaces (`nsenter -t ANCHOR -m -n`; not `ip netns exec`, which
//! remounts `/sys` and hides the cgroup mounts), with nothing shared with
//! the machine's own Docker daemon or the other hosts':
//!
//! - `--config-file`, `--data-root`, `--exec-root`, `--pidfile` under
//!   `h{i}/docker-{driver}/` of the lab dir; the API socket is
//!   `h{i}/docker.sock` ([`Lab::docker_socket`]), bind-mounted over
//!   `/var/run/docker.sock` in the host's mount namespace, so `docker` in an
//!   SSH session on host i (or [`Lab::exec`]) talks to host i's daemon;
//! - its default bridge `docker0` lives in the host's netns, with
//!   `--bip 10.(64+i).X.1/24`; its iptables rules too (the root namespace's
//!   are not touched), so `docker run -p 127.0.0.1:P:C` publishes on the
//!   host's loopback;
//! - `--cgroup-parent /testlab-X-h{i}`: every container of the lab can be
//!   found (and killed) through its cgroups, whatever state dockerd is in;
//! - `--insecure-registry` for the lab's registry (plain HTTP).
//!
//! The registry is Debian's `docker-registry` (no auth), run in the root
//! namespace on 10.201.X.1:5000, the root-side address of host 0's veth;
//! every other host gets a /32 route to it through its own veth (the root
//! namespace accepts packets for any of its addresses on any interface).
//! Its storage is `registry/data` in the lab dir.
//!
//! Images are never pulled from the internet: [`Lab::build_image`] makes a
//! rootfs of Debian's `busybox-static` (`/bin/busybox` plus a symlink per
//! applet) and the given files, `docker import`s it into host 0's daemon
//! and pushes it to the registry.

#[cfg(doc)]
use super::LabOptions;
use super::{lock, lossy, sh_quote, Lab};
use crate::{claim, sys};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Port of the lab's registry.
const REGISTRY_PORT: u16 = 5000;
/// How long a dockerd may take to answer after its start (a loaded 2-core
/// machine starting several of them at once).
const DOCKERD_TIMEOUT: Duration = Duration::from_secs(60);
/// The static busybox of Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// Modification time of every file in a built image (2000-01-01), so that
/// the same files give the same layer.
const IMAGE_MTIME: u64 = 946_684_800;
/// Port on which [`Lab::build_web_image`]'s containers serve HTTP.
const WEB_PORT: u16 = 8080;

/// The first of `candidates` that exists.
fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of strings, as Dockerfile's exec form wants it.
fn json_array(items: &[&str]) -> String {
    let parts: Vec<String> = items.iter().map(|s| json_string(s)).collect();
    format!("[{}]", parts.join(","))
}

/// Splits `repo:tag` or `repo@digest` into (repo, "tag" or "digest").
/// A reference without either gets the tag `latest`.
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo, digest);
    }
    let last_slash = reference.rfind('/').map_or(0, |p| p + 1);
    match reference[last_slash..].rfind(':') {
        Some(p) => (
            &reference[..last_slash + p],
            &reference[last_slash + p + 1..],
        ),
        None => (reference, "latest"),
    }
}

/// True if `bin` is a 64-bit little-endian ELF executable without a
/// program interpreter (i.e. statically linked).
fn is_static_elf(bin: &[u8]) -> bool {
    if bin.len() < 64 || &bin[..4] != b"\x7fELF" || bin[4] != 2 || bin[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bin[o], bin[o + 1]]) as usize;
    let mut off8 = [0u8; 8];
    off8.copy_from_slice(&bin[0x20..0x28]);
    let Ok(phoff) = usize::try_from(u64::from_le_bytes(off8)) else {
        return false;
    };
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for k in 0..phnum {
        let o = phoff + k * phentsize;
        if o + 4 > bin.len() {
            return false;
        }
        let p_type = u32::from_le_bytes([bin[o], bin[o + 1], bin[o + 2], bin[o + 3]]);
        if p_type == 3 {
            // PT_INTERP
            return false;
        }
    }
    true
}

/// One entry of an image's root filesystem.
enum Node {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(&'static str),
}

/// The root filesystem of a test image as an uncompressed tar: busybox
/// with its applets in /bin, minimal /etc/passwd and /etc/group, the usual
/// mount points, then `files` (relative or absolute paths; parents are
/// created; a file starting with `#!` is executable).
fn rootfs_tar(files: &[(&str, &[u8])]) -> Result<Vec<u8>, String> {
    let busybox = fs::read(BUSYBOX)
        .map_err(|e| format!("cannot read {BUSYBOX} ({e}): install Debian's busybox-static"))?;
    if !is_static_elf(&busybox) {
        return Err(format!(
            "{BUSYBOX} is not statically linked: install Debian's busybox-static"
        ));
    }
    let list = sys::run(BUSYBOX, &["--list"])?;
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for d in ["bin", "dev", "etc", "proc", "root", "sys", "var"] {
        nodes.insert(d.to_string(), Node::Dir(0o755));
    }
    nodes.insert("tmp".to_string(), Node::Dir(0o1777));
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            nodes.insert(format!("bin/{applet}"), Node::Link("busybox"));
        }
    }
    nodes.insert("bin/busybox".to_string(), Node::File(busybox, 0o755));
    nodes.insert(
        "etc/passwd".to_string(),
        Node::File(
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
            0o644,
        ),
    );
    nodes.insert(
        "etc/group".to_string(),
        Node::File(b"root:x:0:\nnogroup:x:65534:\n".to_vec(), 0o644),
    );
    for (path, data) in files {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(format!("bad image file path {path:?}"));
        }
        for k in 1..parts.len() {
            let dir = parts[..k].join("/");
            match nodes.get(&dir) {
                None => {
                    nodes.insert(dir, Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(_) => return Err(format!("{dir} is not a directory (for {path:?})")),
            }
        }
        let mode = if data.starts_with(b"#!") {
            0o755
        } else {
            0o644
        };
        nodes.insert(parts.join("/"), Node::File(data.to_vec(), mode));
    }

    let mut builder = tar::Builder::new(Vec::new());
    for (path, node) in &nodes {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(IMAGE_MTIME);
        let res = match node {
            Node::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                builder.append_data(&mut h, path, std::io::empty())
            }
            Node::File(data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, path, data.as_slice())
            }
            Node::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, path, target)
            }
        };
        res.map_err(|e| format!("cannot add {path} to the image tar: {e}"))?;
    }
    builder
        .into_inner()
        .map_err(|e| format!("cannot finish the image tar: {e}"))
}

/// True if the Docker API at `sock` answers `GET /_ping` with `OK`.
fn docker_ping(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.ends_with("OK")
}

/// Status and headers (names in lower case) of an HTTP response.
type HttpHead = (u16, Vec<(String, String)>);

/// A minimal HTTP/1.0 exchange: returns the status and the headers; the
/// body is read and dropped.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpHead, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("cannot read from {addr}: {e}"))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("bad HTTP response from {addr}"))?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line from {addr}: {head}"))?;
    let hdrs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, hdrs))
}

fn check(out: &Output, what: &str) {
    if !out.status.success() {
        panic!(
            "testlab: {what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Lab {
    fn registry_addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(10, 201, self.num, 1).into(), REGISTRY_PORT)
    }

    fn require_docker(&self, what: &str) {
        if !self.opts.docker {
            panic!("testlab: {what} needs a lab started with LabOptions {{ docker: true, .. }}");
        }
    }

    /// The lab's registry as `10.201.X.1:5000` (plain HTTP, no auth; every
    /// host's dockerd trusts it as an insecure registry), or `None` if the
    /// lab was started without [`LabOptions::docker`].
    pub fn registry(&self) -> Option<String> {
        self.opts.docker.then(|| self.registry_addr().to_string())
    }

    /// Host i's Docker API socket, as seen from the root namespace (inside
    /// host i it is also `/var/run/docker.sock`). Panics without
    /// [`LabOptions::docker`].
    pub fn docker_socket(&self, i: usize) -> PathBuf {
        self.require_docker("docker_socket");
        self.host(i).dir.join("docker.sock")
    }

    /// `unix://<docker_socket(i)>`, for `docker -H` or `DOCKER_HOST`.
    pub fn docker_host(&self, i: usize) -> String {
        format!("unix://{}", self.docker_socket(i).display())
    }

    fn docker_command(&self, i: usize) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(self.docker_host(i))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the docker CLI against host i's daemon from the root namespace
    /// (`docker -H unix://... ARGS`) and returns its output, whatever the
    /// exit status. Panics only if `docker` cannot be run.
    pub fn docker(&self, i: usize, args: &[&str]) -> Output {
        self.docker_command(i)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("testlab: cannot run docker: {e}"))
    }

    /// The full reference under which [`Lab::build_image`] pushes
    /// `name_tag`: `10.201.X.1:5000/NAME:TAG` (tag `latest` if none given;
    /// a reference that already names the registry is returned as is).
    pub fn image_reference(&self, name_tag: &str) -> String {
        self.require_docker("image_reference");
        let reg = self.registry_addr().to_string();
        let full = if name_tag.starts_with(&format!("{reg}/")) {
            name_tag.to_string()
        } else {
            format!("{reg}/{}", name_tag.trim_start_matches('/'))
        };
        let (repo, tag) = split_reference(&full);
        if full.contains('@') {
            full
        } else {
            format!("{repo}:{tag}")
        }
    }

    /// Builds an image from busybox plus `files` (path in the image,
    /// content; a file starting with `#!` is executable) with `cmd` as its
    /// `CMD` (exec form; none if empty), pushes it to the lab's registry and
    /// returns its reference `10.201.X.1:5000/NAME:TAG`. The image has
    /// `/bin/busybox` and a symlink for every applet in `/bin` (`sh`,
    /// `httpd`, `wget`, ...). Nothing is pulled from anywhere. Panics on
    /// failure.
    pub fn build_image(&self, name_tag: &str, files: &[(&str, &[u8])], cmd: &[&str]) -> String {
        let changes = if cmd.is_empty() {
            Vec::new()
        } else {
            vec![format!("CMD {}", json_array(cmd))]
        };
        let refs: Vec<&str> = changes.iter().map(String::as_str).collect();
        self.build_image_with(name_tag, files, &refs)
    }

    /// Like [`Lab::build_image`], with arbitrary Dockerfile instructions
    /// as `docker import --change` accepts them (`CMD`, `ENTRYPOINT`,
    /// `ENV`, `EXPOSE`, `LABEL`, `USER`, `WORKDIR`, ...).
    pub fn build_image_with(
        &self,
        name_tag: &str,
        files: &[(&str, &[u8])],
        changes: &[&str],
    ) -> String {
        self.require_docker("build_image");
        let reference = self.image_reference(name_tag);
        let tar = rootfs_tar(files)
            .unwrap_or_else(|e| panic!("testlab: cannot build image {reference}: {e}"));
        let dir = self.dir.join("images");
        let safe: String = name_tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{safe}.tar"));
        fs::create_dir_all(&dir)
            .and_then(|()| fs::write(&path, &tar))
            .unwrap_or_else(|e| panic!("testlab: cannot write {}: {e}", path.display()));
        let path = path.display().to_string();
        let mut args = vec!["import"];
        for c in changes {
            args.push("--change");
            args.push(c);
        }
        args.push(&path);
        args.push(&reference);
        check(
            &self.docker(0, &args),
            &format!("docker import {reference}"),
        );
        check(
            &self.docker(0, &["push", &reference]),
            &format!("docker push {reference}"),
        );
        reference
    }

    /// Builds and pushes an image whose container serves `body` at `/` on
    /// port 8080 with busybox httpd (`httpd -f -p 8080 -h /www`), and
    /// `/up` with status 200 if `healthy` (404 otherwise). It `EXPOSE`s
    /// 8080, and its shell (PID 1) exits at once on SIGTERM, so `docker
    /// stop` is fast. Returns the reference (see [`Lab::build_image`]).
    pub fn build_web_image(&self, name_tag: &str, body: &str, healthy: bool) -> String {
        let mut files: Vec<(&str, &[u8])> = vec![("www/index.html", body.as_bytes())];
        if healthy {
            files.push(("www/up", b"ok\n"));
        }
        let script = format!("trap 'exit 0' TERM INT; httpd -f -p {WEB_PORT} -h /www & wait");
        let cmd = format!("CMD {}", json_array(&["sh", "-c", &script]));
        let expose = format!("EXPOSE {WEB_PORT}/tcp");
        self.build_image_with(name_tag, &files, &[&cmd, &expose])
    }

    /// Builds and pushes an image (exposing 8080 like
    /// [`Lab::build_web_image`]) whose container prints a line to stderr
    /// and exits with status 3 as soon as it starts.
    pub fn build_crashing_image(&self, name_tag: &str) -> String {
        let cmd = format!(
            "CMD {}",
            json_array(&[
                "sh",
                "-c",
                "echo 'testlab: this image crashes on purpose' >&2; exit 3"
            ])
        );
        let expose = format!("EXPOSE {WEB_PORT}/tcp");
        self.build_image_with(name_tag, &[], &[&cmd, &expose])
    }

    /// The manifest digest (`sha256:...`) of `reference` in the lab's
    /// registry (asked over its HTTP API). Panics if the registry does not
    /// have it.
    pub fn image_digest(&self, reference: &str) -> String {
        let reference = self.image_reference(reference);
        let reg = self.registry_addr().to_string();
        let (repo, tag) = split_reference(&reference);
        let name = repo.strip_prefix(&format!("{reg}/")).unwrap_or(repo);
        let accept = "application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.oci.image.index.v1+json";
        let path = format!("/v2/{name}/manifests/{tag}");
        let (status, headers) = http(self.registry_addr(), "HEAD", &path, &[("Accept", accept)])
            .unwrap_or_else(|e| panic!("testlab: image_digest({reference}): {e}"));
        if status != 200 {
            panic!("testlab: registry has no {reference} (HTTP {status} for {path})");
        }
        headers
            .into_iter()
            .find(|(k, _)| k == "docker-content-digest")
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("testlab: registry sent no digest for {reference}"))
    }

    /// The registry digest (`sha256:...`) of `reference` as host i's
    /// daemon knows it (from its `RepoDigests`), or `None` if host i does
    /// not have the image.
    pub fn host_image_digest(&self, i: usize, reference: &str) -> Option<String> {
        let reference = self.image_reference(reference);
        let out = self.docker(
            i,
            &[
                "image",
                "inspect",
                "--format",
                "{{range .RepoDigests}}{{println .}}{{end}}",
                &reference,
            ],
        );
        if !out.status.success() {
            let err = lossy(&out.stderr);
            if err.to_ascii_lowercase().contains("no such image") {
                return None;
            }
            panic!("testlab: docker image inspect {reference} on host {i}: {err}");
        }
        let (repo, _) = split_reference(&reference);
        let prefix = format!("{repo}@");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_string))
    }

    /// Removes `reference` from host i's daemon (`docker image rm -f`), so
    /// that the next use pulls it again. No-op if host i does not have it.
    pub fn remove_image_on_host(&self, i: usize, reference: &str) {
        let reference = self.image_reference(reference);
        let out = self.docker(i, &["image", "rm", "-f", &reference]);
        if !out.status.success() {
            let err = lossy(&out.stderr);
            if !err.to_ascii_lowercase().contains("no such image") {
                panic!("testlab: docker image rm {reference} on host {i}: {err}");
            }
        }
    }

    /// Starts the registry, every host's dockerd, and wires them up.
    pub(super) fn setup_docker(&self) -> Result<(), String> {
        let dockerd = find_program(&["/usr/sbin/dockerd", "/usr/bin/dockerd"])
            .ok_or("dockerd not found: install Debian's docker.io")?;
        let registry = find_program(&["/usr/bin/docker-registry"])
            .ok_or("/usr/bin/docker-registry not found: install Debian's docker-registry")?;
        self.start_registry(&registry)?;

        // Hosts other than 0 reach the registry through their own veth.
        let reg_ip = self.registry_addr().ip().to_string();
        for (i, h) in self.hosts.iter().enumerate().skip(1) {
            let (b, j) = super::block_of(i);
            let via = Ipv4Addr::new(10, b, self.num, (4 * j + 1) as u8).to_string();
            let dst = format!("{reg_ip}/32");
            sys::run(
                "ip",
                &["-n", &h.netns, "route", "replace", &dst, "via", &via],
            )?;
        }

        let drivers: Vec<String> = match &self.opts.docker_storage_driver {
            Some(d) => vec![d.clone()],
            None => vec!["overlay2".to_string(), "vfs".to_string()],
        };
        let mut pending: Vec<usize> = (0..self.hosts.len()).collect();
        let mut errors = Vec::new();
        for driver in &drivers {
            for &i in &pending {
                let child = self.spawn_dockerd(i, &dockerd, driver)?;
                *lock(&self.hosts[i].dockerd) = Some(child);
            }
            let mut failed = Vec::new();
            for &i in &pending {
                if let Err(e) = self.wait_dockerd(i) {
                    self.stop_dockerd(i);
                    errors.push(format!("with --storage-driver {driver}: {e}"));
                    failed.push(i);
                }
            }
            pending = failed;
            if pending.is_empty() {
                break;
            }
        }
        if !pending.is_empty() {
            return Err(format!(
                "dockerd of host(s) {pending:?} did not start: {}",
                errors.join("; ")
            ));
        }
        if !errors.is_empty() {
            eprintln!(
                "testlab: fell back to another storage driver: {}",
                errors.join("; ")
            );
        }
        for i in 0..self.hosts.len() {
            self.bind_docker_socket(i)?;
        }
        Ok(())
    }

    fn start_registry(&self, program: &Path) -> Result<(), String> {
        let addr = self.registry_addr();
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            return Err(format!(
                "{addr} already accepts connections before the lab's registry started \
                 (is Debian's docker-registry service running? `service docker-registry stop`)"
            ));
        }
        let dir = self.dir.join("registry");
        let data = dir.join("data");
        fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            data.display()
        );
        let conf = dir.join("config.yml");
        fs::write(&conf, config).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let log = dir.join("registry.log");
        let out = sys::log_file(&log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot dup log file: {e}"))?;
        let mut child = Command::new(program)
            .arg("serve")
            .arg(&conf)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", program.display()))?;
        let res = sys::wait_port(addr, Some(&mut child), super::START_TIMEOUT)
            .and_then(|()| http(addr, "GET", "/v2/", &[]))
            .and_then(|(status, _)| match status {
                200 => Ok(()),
                s => Err(format!("GET /v2/ answered {s}, not 200")),
            })
            .and_then(|()| match child.try_wait() {
                Ok(None) => Ok(()),
                _ => Err("exited (another process holds the port?)".to_string()),
            });
        *lock(&self.registry) = Some(child);
        res.map_err(|e| {
            format!(
                "registry at {addr}: {e}; log {}: {}",
                log.display(),
                sys::tail(&log, 2000)
            )
        })
    }

    fn spawn_dockerd(&self, i: usize, program: &Path, driver: &str) -> Result<Child, String> {
        let h = &self.hosts[i];
        let root = h.dir.join(format!("docker-{driver}"));
        let (data, exec) = (root.join("data"), root.join("exec"));
        for d in [&data, &exec] {
            fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        // Its own (empty) config file: the machine's /etc/docker/daemon.json
        // is for the machine's daemon and may conflict with these flags.
        let conf = root.join("daemon.json");
        fs::write(&conf, "{}\n").map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let sock = self.docker_socket(i);
        let _ = fs::remove_file(&sock);
        let (conf, data, exec) = (
            conf.display().to_string(),
            data.display().to_string(),
            exec.display().to_string(),
        );
        let pidfile = root.join("docker.pid").display().to_string();
        let host = format!("unix://{}", sock.display());
        let registry = self.registry_addr().to_string();
        let bip = format!("10.{}.{}.1/24", 64 + i, self.num);
        let cgroup = format!("/{}{i}", claim::cgroup_prefix(self.num));
        let program = program.display().to_string();
        self.spawn_in(
            i,
            &[
                &program,
                "--config-file",
                &conf,
                "--data-root",
                &data,
                "--exec-root",
                &exec,
                "--pidfile",
                &pidfile,
                "-H",
                &host,
                "--insecure-registry",
                &registry,
                "--storage-driver",
                driver,
                "--bip",
                &bip,
                "--cgroup-parent",
                &cgroup,
                "--log-level",
                "warn",
            ],
            &h.dir.join("dockerd.log"),
        )
    }

    /// Waits until host i's dockerd answers `/_ping`, then `docker version`.
    fn wait_dockerd(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let sock = self.docker_socket(i);
        let log = h.dir.join("dockerd.log");
        let deadline = Instant::now() + DOCKERD_TIMEOUT;
        loop {
            if docker_ping(&sock) {
                break;
            }
            if let Some(c) = lock(&h.dockerd).as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "host {i}: dockerd exited ({st}); log {}: {}",
                        log.display(),
                        sys::tail(&log, 1500)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "host {i}: dockerd did not answer within {DOCKERD_TIMEOUT:?}; log {}: {}",
                    log.display(),
                    sys::tail(&log, 1500)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        let out = self.docker(i, &["version", "--format", "{{.Server.Version}}"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "host {i}: `docker version` failed: {}",
                lossy(&out.stderr)
            ))
        }
    }

    /// Makes `/var/run/docker.sock` inside host i its own daemon's socket.
    fn bind_docker_socket(&self, i: usize) -> Result<(), String> {
        let sock = self.docker_socket(i).display().to_string();
        // The mount point must exist; it does where the machine runs its
        // own Docker daemon. Creating it otherwise leaves an empty file.
        let script = format!(
            "[ -e /var/run/docker.sock ] || : > /var/run/docker.sock; \
             mount --bind {} /var/run/docker.sock",
            sh_quote(&sock)
        );
        let out = self.exec(i, &script);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "cannot bind-mount the docker socket in host {i}: {}",
                lossy(&out.stderr)
            ))
        }
    }

    /// Removes host i's containers (SIGKILL) and stops its dockerd (which
    /// stops its containerd). No-op if it does not run.
    fn stop_dockerd(&self, i: usize) {
        let h = &self.hosts[i];
        let Some(mut child) = lock(&h.dockerd).take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let ids = sys::output_timeout(
                self.docker_command(i).args(["ps", "-aq"]),
                Duration::from_secs(10),
            )
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
            if !ids.is_empty() {
                let _ = sys::output_timeout(
                    self.docker_command(i).args(["rm", "-f", "-v"]).args(&ids),
                    Duration::from_secs(30),
                );
            }
        }
        sys::terminate(&mut child, Duration::from_secs(15));
    }

    /// Stops every host's dockerd (in parallel), then the registry. Called
    /// by `Drop` before the hosts are torn down; no-op without Docker.
    pub(super) fn teardown_docker(&self) {
        thread::scope(|s| {
            for (i, h) in self.hosts.iter().enumerate() {
                if lock(&h.dockerd).is_some() {
                    s.spawn(move || self.stop_dockerd(i));
                }
            }
        });
        if let Some(mut c) = lock(&self.registry).take() {
            sys::terminate(&mut c, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split() {
        assert_eq!(split_reference("a:5000/web:v1"), ("a:5000/web", "v1"));
        assert_eq!(split_reference("a:5000/web"), ("a:5000/web", "latest"));
        assert_eq!(
            split_reference("a:5000/x/web@sha256:ab"),
            ("a:5000/x/web", "sha256:ab")
        );
    }

    #[test]
    fn json_arrays() {
        assert_eq!(
            json_array(&["sh", "-c", "echo \"hi\"\n"]),
            r#"["sh","-c","echo \"hi\"\n"]"#
        );
    }

    #[test]
    fn rootfs_has_busybox_and_files() {
        if !Path::new(BUSYBOX).exists() {
            return;
        }
        let tar = rootfs_tar(&[("/www/index.html", b"hi"), ("run.sh", b"#!/bin/sh\n")]).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut seen = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            seen.insert(path, (e.header().entry_type(), e.header().mode().unwrap()));
        }
        assert_eq!(seen["bin/busybox"].0, tar::EntryType::Regular);
        assert_eq!(seen["bin/sh"].0, tar::EntryType::Symlink);
        assert_eq!(seen["bin/httpd"].0, tar::EntryType::Symlink);
        assert_eq!(seen["www/index.html"], (tar::EntryType::Regular, 0o644));
        assert_eq!(seen["run.sh"], (tar::EntryType::Regular, 0o755));
        assert_eq!(seen["tmp"].1, 0o1777);
        assert!(rootfs_tar(&[("../x", b"")]).is_err());
    }
}

//! A lab of disposable Linux "hosts" on this machine, each with its own
//! network namespace, private mount namespace (its own `/srv`), sshd on
//! port 22 and nginx on port 80, reachable from the test at 10.201.X.Y.
//!
//! Host i of lab X is the network namespace `tl{X}h{i}`, joined to the root
//! namespace by the veth pair `tl{X}h{i}a` (root side, 10.B.X.(4j+1)/30)
//! and `tl{X}h{i}b` (host side, 10.B.X.(4j+2)/30), where hosts 0..63 have
//! B = 201 and j = i, and hosts 63..126 have B = 202 and j = i - 63 (a second
//! /24, so that a lab can hold 100 hosts). A long-lived anchor
//! process (`sleep infinity`) holds a private mount namespace in which the
//! host's directory `srv` of the lab dir is bind-mounted on `/srv` (and
//! `/dev/null` on this machine's `/root/.bashrc`, see
//! [`LabOptions::root_bashrc`]); sshd, nginx and [`Lab::exec`] are started
//! inside the anchor's namespaces with `nsenter`, so every SSH session of
//! host i sees host i's `/srv`.
//! Everything is torn down when the [`Lab`] is dropped.
//!
//! With [`LabOptions::docker`], every host also runs its own `dockerd` and
//! the lab runs a registry; see the `docker` submodule and [`Lab::registry`].
//!
//! With [`LabOptions::light`], a host's web server is busybox instead of
//! nginx (`nc -ll -p 80 -e httpd -i`, one small listener per host and one
//! short-lived `httpd` per connection): for labs of many hosts (100 light
//! hosts cost about 1.5 MiB of private memory each for sshd and the
//! listener, and no process per idle connection).

mod docker;

use crate::claim::{self, Claim};
use crate::sys;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for sshd/nginx to accept connections after a start.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Hosts per address block (one /30 each inside 10.B.X.0/24).
const HOSTS_PER_BLOCK: usize = 63;
/// Most hosts a lab can have: two blocks, 10.201.X.0/24 and 10.202.X.0/24.
const MAX_HOSTS: usize = 2 * HOSTS_PER_BLOCK;

/// The second octet of host i's addresses, and its /30's index in that block.
fn block_of(i: usize) -> (u8, usize) {
    (201 + (i / HOSTS_PER_BLOCK) as u8, i % HOSTS_PER_BLOCK)
}

/// The address blocks a lab of `hosts` hosts uses.
fn blocks(num: u8, hosts: usize) -> Vec<String> {
    (0..hosts.div_ceil(HOSTS_PER_BLOCK))
        .map(|b| format!("10.{}.{num}.0/24", 201 + b))
        .collect()
}

/// Options for [`Lab::start_with`].
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Number of hosts (1..=126).
    pub hosts: usize,
    /// Site root as seen inside each host; created empty (no `current`).
    /// nginx (or busybox, see `light`) serves `<site_root>/current`.
    /// Default `/srv/site`.
    pub site_root: String,
    /// If true, each host serves `<site_root>/current` on port 80 with
    /// Debian's busybox-static instead of nginx: `busybox nc -ll -p 80 -e
    /// busybox httpd -i -h <site_root>/current`, which resolves `current`
    /// afresh for every connection (a plain `busybox httpd -h` would stay in
    /// the directory `current` pointed to when it started). No keep-alive:
    /// one connection per request. For labs of many hosts.
    pub light: bool,
    /// If set, each host's `/srv` is a tmpfs of this many bytes (for
    /// disk-full tests). Otherwise it is a plain directory in the lab dir.
    pub srv_tmpfs_bytes: Option<u64>,
    /// If true, every host also runs its own `dockerd` (started inside the
    /// host's namespaces, its socket bind-mounted over
    /// `/var/run/docker.sock` there, so `docker` over SSH talks to it), and
    /// the lab runs a registry at [`Lab::registry`] that every host can
    /// pull from. Needs Debian's `docker.io` and `docker-registry`.
    pub docker: bool,
    /// Storage driver of the hosts' dockerds. `None` (default): `overlay2`,
    /// falling back to `vfs` if dockerd cannot start with it.
    pub docker_storage_driver: Option<String>,
    /// If true, the hosts' SSH sessions source this machine's `/root/.bashrc`, as Debian's
    /// bash does for every command sshd runs. By default each host's mount namespace has
    /// `/dev/null` bound over it: a test host stands for a server, not for this machine's
    /// login, and on a developer machine that file may run e.g. `pyenv init` (about 0.1 s
    /// of CPU) for every remote command.
    pub root_bashrc: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 1,
            site_root: "/srv/site".to_string(),
            light: false,
            srv_tmpfs_bytes: None,
            docker: false,
            docker_storage_driver: None,
            root_bashrc: false,
        }
    }
}

/// One host of the lab.
struct Host {
    ip: Ipv4Addr,
    netns: String,
    veth_root: String,
    veth_host: String,
    /// `<lab dir>/h{i}`: configs, keys, logs of this host.
    dir: PathBuf,
    /// `<lab dir>/h{i}/srv`: what the host sees as `/srv`.
    srv: PathBuf,
    tmpfs: bool,
    anchor: Mutex<Option<Child>>,
    anchor_pid: u32,
    sshd: Mutex<Option<Child>>,
    /// nginx, or busybox's listener with [`LabOptions::light`].
    http: Mutex<Option<Child>>,
    /// This host's dockerd (only with [`LabOptions::docker`]).
    dockerd: Mutex<Option<Child>>,
}

/// A running lab of test hosts. See the module documentation.
///
/// Dropping it kills every process it started (and every process running in
/// its hosts' network namespaces, e.g. leftover SSH sessions), deletes the
/// namespaces and veth pairs, unmounts tmpfs mounts and removes the lab dir
/// (kept if the environment variable `TESTLAB_KEEP=1`).
pub struct Lab {
    num: u8,
    dir: PathBuf,
    opts: LabOptions,
    hosts: Vec<Host>,
    /// Blackhole routes added for the lab's address blocks.
    routes: Vec<String>,
    /// The `FORWARD` rule of [`Lab::route_between_hosts`], if added.
    forwarding: Mutex<Option<String>>,
    /// The lab's registry (only with [`LabOptions::docker`]).
    registry: Mutex<Option<Child>>,
    // Released last (fields drop after Drop::drop ran).
    _claim: Claim,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Quotes a string for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Lab {
    /// Starts a lab with `hosts` hosts and default options. Panics with a
    /// clear message if setup fails.
    pub fn start(hosts: usize) -> Lab {
        Lab::start_with(LabOptions {
            hosts,
            ..LabOptions::default()
        })
    }

    /// Starts a lab. Panics with a clear message if setup fails (everything
    /// created so far is cleaned up first). Labs left behind by killed test
    /// processes are reaped first (see [`crate::reap_stale_labs`]).
    pub fn start_with(opts: LabOptions) -> Lab {
        match Lab::try_start_with(opts) {
            Ok(lab) => lab,
            Err(e) => panic!("testlab: cannot start lab: {e}"),
        }
    }

    /// Like [`Lab::start_with`] but returns the setup error instead of
    /// panicking.
    pub fn try_start_with(opts: LabOptions) -> Result<Lab, String> {
        if opts.hosts == 0 || opts.hosts > MAX_HOSTS {
            return Err(format!(
                "hosts must be in 1..={MAX_HOSTS}, got {}",
                opts.hosts
            ));
        }
        if !opts.site_root.starts_with('/') {
            return Err(format!(
                "site_root must be absolute, got {:?}",
                opts.site_root
            ));
        }
        let euid = sys::run("id", &["-u"]).map(|o| lossy(&o.stdout))?;
        if euid != "0" {
            return Err(format!("testlab needs root (euid is {euid})"));
        }
        // Clean up after test processes that were killed with a lab alive.
        claim::reap_stale();
        let claim = claim::claim()?;
        let num = claim.num;
        let dir = std::env::temp_dir().join(format!(
            "{}{}",
            claim::lab_dir_prefix(num),
            std::process::id()
        ));
        let mut lab = Lab {
            num,
            dir,
            opts,
            hosts: Vec::new(),
            routes: Vec::new(),
            forwarding: Mutex::new(None),
            registry: Mutex::new(None),
            _claim: claim,
        };
        // On error, `lab` is dropped here and cleans up what exists.
        lab.setup()?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<(), String> {
        let num = self.num;
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        fs::create_dir_all("/run/sshd").map_err(|e| format!("cannot create /run/sshd: {e}"))?;
        fs::create_dir_all("/srv").map_err(|e| format!("cannot create /srv: {e}"))?;

        // Safety net: nothing addressed to this lab's block may ever leave
        // through the default route, whatever state the veths are in.
        for block in blocks(num, self.opts.hosts) {
            sys::run("ip", &["route", "replace", "blackhole", &block])?;
            self.routes.push(block);
        }

        // Client key, authorized on every host.
        let identity = self.identity();
        keygen(&identity, &format!("testlab-{num}-client"))?;
        let pubkey = fs::read_to_string(identity.with_extension("pub"))
            .map_err(|e| format!("cannot read client public key: {e}"))?;
        fs::write(self.dir.join("authorized_keys"), pubkey)
            .map_err(|e| format!("cannot write authorized_keys: {e}"))?;

        for i in 0..self.opts.hosts {
            let hdir = self.dir.join(format!("h{i}"));
            let (b, j) = block_of(i);
            let host = Host {
                ip: Ipv4Addr::new(10, b, num, (4 * j + 2) as u8),
                netns: format!("tl{num}h{i}"),
                veth_root: format!("tl{num}h{i}a"),
                veth_host: format!("tl{num}h{i}b"),
                srv: hdir.join("srv"),
                dir: hdir,
                tmpfs: false,
                anchor: Mutex::new(None),
                anchor_pid: 0,
                sshd: Mutex::new(None),
                http: Mutex::new(None),
                dockerd: Mutex::new(None),
            };
            // Registered before creating anything, so Drop covers it.
            self.hosts.push(host);
            self.setup_host(i)?;
        }

        let mut known = String::new();
        for i in 0..self.hosts.len() {
            let _ = writeln!(known, "{}", self.host_public_key_line(i));
        }
        fs::write(self.known_hosts(), known)
            .map_err(|e| format!("cannot write known_hosts: {e}"))?;

        for i in 0..self.hosts.len() {
            self.try_start_sshd(i)?;
            self.try_start_http(i)?;
        }
        for i in 0..self.hosts.len() {
            self.wait_sshd(i)?;
            self.wait_http(i)?;
        }
        if self.opts.docker {
            self.setup_docker()?;
        }
        Ok(())
    }

    fn setup_host(&mut self, i: usize) -> Result<(), String> {
        let num = self.num;
        let root_ip = self.gateway(i);
        let tmpfs_bytes = self.opts.srv_tmpfs_bytes;
        let root_bashrc = self.opts.root_bashrc;
        let site_root = self.opts.site_root.clone();
        let lab_dir = self.dir.clone();
        let h = &mut self.hosts[i];
        fs::create_dir_all(&h.srv)
            .map_err(|e| format!("cannot create {}: {e}", h.srv.display()))?;
        add_network(h, num, i, root_ip)?;
        // Optional tmpfs, mounted in the root namespace so the test sees
        // its content through srv_dir().
        if let Some(bytes) = tmpfs_bytes {
            let srv = h.srv.to_string_lossy().to_string();
            let opt = format!("size={bytes},mode=0755");
            let name = format!("testlab-{num}-h{i}");
            sys::run("mount", &["-t", "tmpfs", "-o", &opt, &name, &srv])?;
            h.tmpfs = true;
        }
        start_anchor(h, i, root_bashrc)?;
        write_configs(h, num, i, &lab_dir, &site_root)?;
        // Empty site root (no `current` yet), created from inside the host.
        let out = self.exec(i, &format!("mkdir -p {}", sh_quote(&site_root)));
        if !out.status.success() {
            return Err(format!(
                "cannot create {site_root} on host {i}: {}",
                lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Spawns `argv` inside host i's mount and network namespaces, with
    /// stdout and stderr appended to `log`.
    fn spawn_in(&self, i: usize, argv: &[&str], log: &Path) -> Result<Child, String> {
        let h = &self.hosts[i];
        let out = sys::log_file(log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot dup log file: {e}"))?;
        Command::new("nsenter")
            .args(["-t", &h.anchor_pid.to_string(), "-m", "-n", "--"])
            .args(argv)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", argv[0]))
    }

    fn try_start_sshd(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let mut guard = lock(&h.sshd);
        if let Some(c) = guard.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let conf = h.dir.join("sshd_config").display().to_string();
        let child = self.spawn_in(
            i,
            &["/usr/sbin/sshd", "-D", "-e", "-f", &conf],
            &h.dir.join("sshd.log"),
        )?;
        *guard = Some(child);
        Ok(())
    }

    fn wait_sshd(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let mut guard = lock(&h.sshd);
        sys::wait_port(
            SocketAddr::new(h.ip.into(), 22),
            guard.as_mut(),
            START_TIMEOUT,
        )
        .map_err(|e| {
            let log = h.dir.join("sshd.log");
            format!(
                "sshd of host {i}: {e}; log {}: {}",
                log.display(),
                sys::tail(&log, 2000)
            )
        })
    }

    fn try_start_http(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        if self.opts.light {
            let home = format!("{}/current", self.opts.site_root.trim_end_matches('/'));
            let child = self.spawn_in(
                i,
                &[
                    "busybox", "nc", "-ll", "-p", "80", "-e", "busybox", "httpd", "-i", "-h", &home,
                ],
                &h.dir.join("http.log"),
            )?;
            *lock(&h.http) = Some(child);
            return Ok(());
        }
        let hd = h.dir.display().to_string();
        let child = self.spawn_in(
            i,
            &[
                "/usr/sbin/nginx",
                "-p",
                &format!("{hd}/"),
                "-c",
                &format!("{hd}/nginx.conf"),
                "-e",
                &format!("{hd}/nginx-error.log"),
            ],
            &h.dir.join("nginx.log"),
        )?;
        *lock(&h.http) = Some(child);
        Ok(())
    }

    fn wait_http(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let mut guard = lock(&h.http);
        sys::wait_port(self.http_addr(i), guard.as_mut(), START_TIMEOUT).map_err(|e| {
            let name = if self.opts.light { "http" } else { "nginx" };
            let log = h.dir.join(format!("{name}.log"));
            let elog = h.dir.join("nginx-error.log");
            format!(
                "nginx of host {i}: {e}; {}: {}; {}: {}",
                log.display(),
                sys::tail(&log, 1000),
                elog.display(),
                sys::tail(&elog, 1000)
            )
        })
    }

    /// The lab's private temp dir (keys, configs, logs; `h{i}/` per host).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lab number X (third octet of every address, part of every name).
    pub fn number(&self) -> u8 {
        self.num
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a lab has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The options the lab was started with.
    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    fn host(&self, i: usize) -> &Host {
        match self.hosts.get(i) {
            Some(h) => h,
            None => panic!("testlab: no host {i} (lab has {})", self.hosts.len()),
        }
    }

    /// `root@10.201.X.Y`, usable as an OpenSSH destination.
    pub fn destination(&self, i: usize) -> String {
        format!("root@{}", self.ip(i))
    }

    /// Address of host i (the namespace side of its veth).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.host(i).ip
    }

    /// Lets the hosts reach one another, as servers of one network do: each host routes the
    /// lab's blocks through this machine, which forwards between the lab's veths (one
    /// `iptables` rule at the top of `FORWARD`, removed when the lab is dropped). Without it a
    /// host reaches only this machine.
    pub fn route_between_hosts(&self) {
        for (i, h) in self.hosts.iter().enumerate() {
            let via = self.gateway(i).to_string();
            for block in blocks(self.num, self.opts.hosts) {
                if let Err(e) = sys::run(
                    "ip",
                    &["-n", &h.netns, "route", "replace", &block, "via", &via],
                ) {
                    panic!("testlab: route_between_hosts: {e}");
                }
            }
        }
        let _ = fs::write("/proc/sys/net/ipv4/ip_forward", "1");
        let veths = format!("tl{}h+", self.num);
        let mut added = lock(&self.forwarding);
        if added.is_none() {
            if let Err(e) = sys::run(
                "iptables",
                &[
                    "-I", "FORWARD", "1", "-i", &veths, "-o", &veths, "-j", "ACCEPT",
                ],
            ) {
                panic!("testlab: route_between_hosts (iptables is needed): {e}");
            }
            *added = Some(veths);
        }
    }

    /// The root namespace's side of host i's veth: an address of this machine that host i
    /// reaches (e.g. for a service the test runs for it, such as [`crate::Pebble`]).
    pub fn gateway(&self, i: usize) -> Ipv4Addr {
        self.host(i);
        let (b, j) = block_of(i);
        Ipv4Addr::new(10, b, self.num, (4 * j + 1) as u8)
    }

    /// nginx of host i (port 80), reachable from the root namespace.
    pub fn http_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip(i).into(), 80)
    }

    /// sshd of host i (port 22).
    pub fn ssh_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip(i).into(), 22)
    }

    /// The directory that host i sees as `/srv`.
    pub fn srv_dir(&self, i: usize) -> PathBuf {
        self.host(i).srv.clone()
    }

    /// The directory that host i sees as the site root (`/srv/site` by
    /// default). Panics if the site root is not under `/srv`.
    pub fn site_dir(&self, i: usize) -> PathBuf {
        let root = self.opts.site_root.trim_end_matches('/');
        match root.strip_prefix("/srv") {
            Some("") => self.srv_dir(i),
            Some(rest) if rest.starts_with('/') => self.srv_dir(i).join(&rest[1..]),
            _ => panic!(
                "testlab: site_root {:?} is not under /srv; use exec()",
                self.opts.site_root
            ),
        }
    }

    /// ed25519 private key (no passphrase) authorized for root on every host.
    pub fn identity(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    /// known_hosts file listing every host's key (as of start) under its IP.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// `10.201.X.Y ssh-ed25519 AAAA...` with host i's current key.
    pub fn host_public_key_line(&self, i: usize) -> String {
        let h = self.host(i);
        let path = h.dir.join("ssh_host_ed25519_key.pub");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("testlab: cannot read {}: {e}", path.display()));
        let mut it = text.split_whitespace();
        let (kind, key) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
        format!("{} {kind} {key}", h.ip)
    }

    /// Options for the OpenSSH client that authenticate to the lab's hosts
    /// with strict host key checking and no prompts (destination not
    /// included): `-i identity -o UserKnownHostsFile=... -o
    /// StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 ...`.
    pub fn ssh_options(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.identity().display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=5".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// Runs `command` on host i through the OpenSSH client with
    /// [`Lab::ssh_options`] (a real SSH session, unlike [`Lab::exec`]).
    pub fn ssh(&self, i: usize, command: &str) -> Output {
        Command::new("ssh")
            .args(self.ssh_options())
            .arg(self.destination(i))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("testlab: cannot run ssh: {e}"))
    }

    /// Stops host i's sshd (SIGTERM, waits for it to exit). Existing SSH
    /// sessions survive; new connections are refused. No-op if stopped.
    pub fn stop_sshd(&self, i: usize) {
        let h = self.host(i);
        if let Some(mut c) = lock(&h.sshd).take() {
            sys::terminate(&mut c, Duration::from_secs(5));
        }
        if !sys::wait_port_closed(self.ssh_addr(i), Duration::from_secs(5)) {
            panic!("testlab: sshd of host {i} still accepts after stop");
        }
    }

    /// Starts host i's sshd and waits until port 22 accepts. No-op if it
    /// runs. Panics (naming the log file) if it does not come up.
    pub fn start_sshd(&self, i: usize) {
        self.host(i);
        if let Err(e) = self.try_start_sshd(i).and_then(|()| self.wait_sshd(i)) {
            panic!("testlab: cannot start sshd: {e}");
        }
    }

    /// Connects (`up`) or cuts off (`!up`) host i: the host-side veth is set
    /// down, so packets are silently dropped both ways and new connections
    /// time out (established ones hang). Nothing leaks to other networks.
    pub fn set_link(&self, i: usize, up: bool) {
        let h = self.host(i);
        let state = if up { "up" } else { "down" };
        if let Err(e) = sys::run("ip", &["-n", &h.netns, "link", "set", &h.veth_host, state]) {
            panic!("testlab: set_link({i}, {up}): {e}");
        }
        if up {
            // Wait for the carrier to come back so the next connect works.
            let path = format!("/sys/class/net/{}/operstate", h.veth_root);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && fs::read_to_string(&path)
                    .map(|s| s.trim() != "up")
                    .unwrap_or(true)
            {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Gives host i a new host key and restarts its sshd (waits until it
    /// accepts). The known_hosts file is NOT updated.
    pub fn change_host_key(&self, i: usize) {
        let h = self.host(i);
        let key = h.dir.join("ssh_host_ed25519_key");
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(key.with_extension("pub"));
        if let Err(e) = keygen(&key, &format!("testlab-{}-h{i}-new", self.num)) {
            panic!("testlab: change_host_key({i}): {e}");
        }
        self.stop_sshd(i);
        self.start_sshd(i);
    }

    /// Every process living in the lab's hosts (sshd, web servers, anchors,
    /// SSH sessions, commands they run), as `ip netns pids` lists them: to
    /// measure what the lab costs (memory, file descriptors).
    pub fn host_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for h in &self.hosts {
            if let Ok(out) = sys::run("ip", &["netns", "pids", &h.netns]) {
                pids.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
        pids
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to host i's sshd listener: a
    /// stopped sshd still completes TCP handshakes (the kernel queues them)
    /// but never answers, like a hung host.
    pub fn signal_sshd(&self, i: usize, signal: &str) {
        let h = self.host(i);
        // The child is nsenter, which execs sshd: same pid.
        if let Some(c) = lock(&h.sshd).as_ref() {
            sys::signal(&[c.id()], signal);
        }
    }

    /// Runs `sh -c script` inside host i's network and mount namespaces
    /// (as root, cwd `/`, stdin null) and returns its output.
    pub fn exec(&self, i: usize, script: &str) -> Output {
        let h = self.host(i);
        Command::new("nsenter")
            .args([
                "-t",
                &h.anchor_pid.to_string(),
                "-m",
                "-n",
                "--",
                "sh",
                "-c",
                script,
            ])
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("testlab: cannot run nsenter: {e}"))
    }

    fn teardown_host(&self, h: &Host) {
        if let Some(mut c) = lock(&h.http).take() {
            sys::terminate(&mut c, Duration::from_secs(3));
        }
        if let Some(mut c) = lock(&h.sshd).take() {
            sys::terminate(&mut c, Duration::from_secs(3));
        }
        // Everything else living in the host: SSH sessions, stray children,
        // nginx workers, the anchor.
        if Path::new("/var/run/netns").join(&h.netns).exists() {
            if let Ok(out) = sys::run("ip", &["netns", "pids", &h.netns]) {
                let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                sys::kill_and_wait(&pids, Duration::from_secs(2));
            }
        }
        if let Some(mut c) = lock(&h.anchor).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        sys::run_quiet("ip", &["netns", "del", &h.netns]);
        let link = Path::new("/sys/class/net").join(&h.veth_root);
        if link.exists() {
            sys::run_quiet("ip", &["link", "del", &h.veth_root]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while link.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if h.tmpfs {
            let srv = h.srv.display().to_string();
            if sys::run("umount", &[&srv]).is_err() {
                sys::run_quiet("umount", &["-l", &srv]);
            }
        }
    }
}

/// Host i's network: its namespace, a veth pair and addresses. Deterministic, locally
/// administered MACs; the root side gets a permanent neighbour entry so that a downed link
/// drops packets silently (connects time out) instead of failing ARP with "no route to host".
fn add_network(h: &Host, num: u8, i: usize, root_ip: Ipv4Addr) -> Result<(), String> {
    let mac_root = format!("02:74:6c:{num:02x}:{i:02x}:01");
    let mac_host = format!("02:74:6c:{num:02x}:{i:02x}:02");
    let root_cidr = format!("{root_ip}/30");
    let host_cidr = format!("{}/30", h.ip);
    let host_ip = h.ip.to_string();
    let ns = h.netns.as_str();
    let (a, b) = (h.veth_root.as_str(), h.veth_host.as_str());
    sys::run("ip", &["netns", "add", ns])?;
    sys::run(
        "ip",
        &[
            "link", "add", a, "address", &mac_root, "type", "veth", "peer", "name", b, "address",
            &mac_host, "netns", ns,
        ],
    )?;
    sys::run("ip", &["addr", "add", &root_cidr, "dev", a])?;
    sys::run("ip", &["link", "set", a, "up"])?;
    sys::run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    sys::run("ip", &["-n", ns, "addr", "add", &host_cidr, "dev", b])?;
    sys::run("ip", &["-n", ns, "link", "set", b, "up"])?;
    sys::run(
        "ip",
        &[
            "neigh",
            "replace",
            &host_ip,
            "lladdr",
            &mac_host,
            "dev",
            a,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Host i's anchor: a process in the host's network namespace and a private mount namespace
/// with the host's directory on /srv (and, unless `root_bashrc`, /dev/null over
/// /root/.bashrc), that every process of the host joins. Returns once it runs.
fn start_anchor(h: &mut Host, i: usize, root_bashrc: bool) -> Result<(), String> {
    let log = h.dir.join("anchor.log");
    let out = sys::log_file(&log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot dup log file: {e}"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", h.netns))
        .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /srv && \
                 if [ \"$2\" = hide ] && [ -f /root/.bashrc ]; then \
                   mount --bind /dev/null /root/.bashrc; fi && \
                 exec sleep infinity",
        )
        .arg("testlab-anchor")
        .arg(&h.srv)
        .arg(if root_bashrc { "keep" } else { "hide" })
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot spawn nsenter: {e}"))?;
    h.anchor_pid = child.id();
    *lock(&h.anchor) = Some(child);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let comm = fs::read_to_string(format!("/proc/{}/comm", h.anchor_pid)).unwrap_or_default();
        if comm.trim() == "sleep" {
            break;
        }
        if let Some(c) = lock(&h.anchor).as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "anchor of host {i} exited ({st}): {}",
                    sys::tail(&log, 2000)
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "anchor of host {i} did not start; see {}",
                log.display()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Host i's SSH host key, `sshd_config` and `nginx.conf`, in its directory.
fn write_configs(
    h: &Host,
    num: u8,
    i: usize,
    lab_dir: &Path,
    site_root: &str,
) -> Result<(), String> {
    let key = h.dir.join("ssh_host_ed25519_key");
    keygen(&key, &format!("testlab-{num}-h{i}"))?;
    let hd = h.dir.display().to_string();
    let sshd_config = format!(
        "ListenAddress {ip}\n\
             Port 22\n\
             HostKey {key}\n\
             PidFile {hd}/sshd.pid\n\
             AuthorizedKeysFile {lab}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             UseDNS no\n\
             MaxSessions 200\n\
             MaxStartups 200\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             X11Forwarding no\n\
             Subsystem sftp internal-sftp\n\
             LogLevel ERROR\n",
        ip = h.ip,
        key = key.display(),
        lab = lab_dir.display(),
    );
    fs::write(h.dir.join("sshd_config"), sshd_config)
        .map_err(|e| format!("cannot write sshd_config: {e}"))?;
    fs::create_dir_all(h.dir.join("nginx-tmp"))
        .map_err(|e| format!("cannot create nginx-tmp: {e}"))?;
    let nginx_conf = format!(
        "daemon off;\n\
             master_process on;\n\
             worker_processes 1;\n\
             worker_rlimit_nofile 8192;\n\
             user root;\n\
             pid {hd}/nginx.pid;\n\
             error_log {hd}/nginx-error.log error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20   keepalive_timeout 120s;\n\
             \x20   client_body_temp_path {hd}/nginx-tmp/body;\n\
             \x20   proxy_temp_path {hd}/nginx-tmp/proxy;\n\
             \x20   fastcgi_temp_path {hd}/nginx-tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {hd}/nginx-tmp/uwsgi;\n\
             \x20   scgi_temp_path {hd}/nginx-tmp/scgi;\n\
             \x20   types {{\n\
             \x20       text/html html htm;\n\
             \x20       text/plain txt;\n\
             \x20       text/css css;\n\
             \x20       application/javascript js;\n\
             \x20       application/json json;\n\
             \x20   }}\n\
             \x20   default_type application/octet-stream;\n\
             \x20   server {{\n\
             \x20       listen 80;\n\
             \x20       server_name _;\n\
             \x20       root {root}/current;\n\
             \x20       index index.html;\n\
             \x20   }}\n\
             }}\n",
        root = site_root.trim_end_matches('/'),
    );
    fs::write(h.dir.join("nginx.conf"), nginx_conf)
        .map_err(|e| format!("cannot write nginx.conf: {e}"))?;
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Containers and dockerds first (they live in the hosts), then the
        // registry they may still talk to.
        self.teardown_docker();
        for h in self.hosts.iter().rev() {
            self.teardown_host(h);
        }
        // Container processes live in their own namespaces but in this
        // lab's cgroups: anything left there is killed, the cgroups removed.
        claim::kill_cgroups(&claim::cgroup_prefix(self.num));
        // Any mount left below the lab dir (should be none).
        for mp in claim::mounts_under(&self.dir) {
            sys::run_quiet("umount", &["-l", &mp]);
        }
        for block in &self.routes {
            sys::run_quiet("ip", &["route", "del", "blackhole", block]);
        }
        if let Some(veths) = lock(&self.forwarding).take() {
            sys::run_quiet(
                "iptables",
                &["-D", "FORWARD", "-i", &veths, "-o", &veths, "-j", "ACCEPT"],
            );
        }
        if std::env::var("TESTLAB_KEEP").as_deref() == Ok("1") {
            eprintln!("testlab: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("number", &self.num)
            .field("dir", &self.dir)
            .field(
                "hosts",
                &self.hosts.iter().map(|h| h.ip).collect::<Vec<_>>(),
            )
            .field("registry", &self.registry())
            .finish()
    }
}

/// Creates an ed25519 key pair without passphrase at `path` (+ `.pub`).
fn keygen(path: &Path, comment: &str) -> Result<(), String> {
    let p = path.display().to_string();
    sys::run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &p],
    )
    .map(|_| ())
}

//! OpenSSH hosts: the system `ssh`, one master connection per host per run (`ControlMaster`),
//! every command and port forward multiplexed over it. Host keys are always checked strictly
//! (`StrictHostKeyChecking=yes` on the command line, which beats any ssh_config); the user's
//! ssh_config, agent and keys work as usual, and `[ssh] config`, `known_hosts` and `identity`
//! are passed through.

use crate::local::run_child;
use crate::{Endpoint, Output, Remote, RemoteError, Script};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Options shared by every host of a run.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    pub config: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// The longest one remote command (and the start of a master connection) may take; past
    /// it the `ssh` client is killed and the host counts as unreachable. `None`: no limit.
    pub step_timeout: Option<Duration>,
    /// Private directory for control sockets and logs (short path: unix sockets are limited).
    pub control_dir: PathBuf,
}

/// One SSH host.
#[derive(Debug)]
pub struct SshHost {
    name: String,
    user: Option<String>,
    host: String,
    port: Option<u16>,
    opts: SshOptions,
    index: usize,
    forwards: AtomicU32,
}

impl SshHost {
    /// `name` is the host as written in the config; `index` makes its socket names unique.
    pub fn new(
        name: &str,
        user: Option<String>,
        host: String,
        port: Option<u16>,
        index: usize,
        opts: SshOptions,
    ) -> SshHost {
        SshHost {
            name: name.to_string(),
            user,
            host,
            port,
            opts,
            index,
            forwards: AtomicU32::new(0),
        }
    }

    fn control_path(&self) -> PathBuf {
        self.opts.control_dir.join(format!("h{}.sock", self.index))
    }

    fn log_path(&self) -> PathBuf {
        self.opts.control_dir.join(format!("h{}.log", self.index))
    }

    /// `ssh` with every option but the destination.
    fn base(&self) -> Command {
        let mut c = Command::new("ssh");
        if let Some(f) = &self.opts.config {
            c.arg("-F").arg(f);
        }
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "UpdateHostKeys=no",
        ]);
        if let Some(k) = &self.opts.known_hosts {
            c.arg("-o")
                .arg(format!("UserKnownHostsFile={}", k.display()));
            c.args(["-o", "GlobalKnownHostsFile=/dev/null"]);
        }
        if let Some(i) = &self.opts.identity {
            c.arg("-i").arg(i).args(["-o", "IdentitiesOnly=yes"]);
        }
        let secs = self.opts.connect_timeout.as_secs().max(1);
        c.arg("-o").arg(format!("ConnectTimeout={secs}"));
        c.args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]);
        if let Some(p) = self.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.user {
            c.arg("-l").arg(u);
        }
        c.arg("-S").arg(self.control_path());
        c
    }

    /// The cipher list the master connection asks for: OpenSSH's default ciphers with
    /// AES-GCM first, when this machine has AES instructions and ssh_config leaves the ciphers
    /// at OpenSSH's default for this host. With AES instructions AES-GCM costs about 40% less
    /// CPU per byte than chacha20-poly1305 (OpenSSH's first choice) on both ends, and the CPU
    /// of a 2-core host is what a large upload spends (BENCHMARKS.md, deploy speed). A
    /// `Ciphers` line in the user's ssh_config wins (a host without AES instructions, such as
    /// a Raspberry Pi 4, is better served by chacha20-poly1305).
    fn preferred_ciphers(&self) -> Option<&'static str> {
        const AES_FIRST: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
            chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";
        static DEFAULT: OnceLock<Option<String>> = OnceLock::new();
        if !cpu_has_aes() {
            return None;
        }
        // Both `ssh -G` run at once: they are on the way to every first connection.
        let mine = spawn_ciphers(self.base(), &self.host);
        let default = DEFAULT.get_or_init(|| {
            let mut c = Command::new("ssh");
            c.args(["-F", "none"]);
            spawn_ciphers(c, &self.host).and_then(read_ciphers)
        });
        let mine = mine.and_then(read_ciphers);
        (default.is_some() && *default == mine).then_some(AES_FIRST)
    }

    fn diagnose(&self, log: &str, code: Option<i32>) -> RemoteError {
        let host = self.name.clone();
        let fingerprint = log
            .lines()
            .find_map(|l| {
                l.split_once("Server host key: ")
                    .map(|(_, k)| k.trim().to_string())
            })
            .unwrap_or_else(|| "an unknown key".into());
        if log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || log.contains("Host key for") && log.contains("has changed")
        {
            return RemoteError::HostKeyChanged { host, fingerprint };
        }
        if log.contains("host key is known for") || log.contains("Host key verification failed") {
            return RemoteError::HostKeyUnknown { host, fingerprint };
        }
        let last = log
            .lines()
            .rfind(|l| {
                !l.starts_with("debug") && !l.trim().is_empty() && !l.starts_with("OpenSSH_")
            })
            .unwrap_or("")
            .trim()
            .to_string();
        if log.contains("Permission denied") {
            return RemoteError::AuthFailed { host, detail: last };
        }
        let detail = if last.is_empty() {
            format!("ssh exited with {code:?}")
        } else {
            last
        };
        RemoteError::Unreachable { host, detail }
    }
}

impl SshHost {
    /// Starts the master again if it is gone (stopped after a step timed out, or expired by
    /// `ControlPersist` while the run waited on other hosts).
    fn ensure_master(&self) -> Result<(), RemoteError> {
        if self.control_path().exists() {
            Ok(())
        } else {
            self.connect()
        }
    }
}

impl Remote for SshHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn connect(&self) -> Result<(), RemoteError> {
        let log = self.log_path();
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(self.control_path());
        let mut c = self.base();
        if let Some(list) = self.preferred_ciphers() {
            c.arg("-o").arg(format!("Ciphers={list}"));
        }
        // -f: go to the background once authenticated; ControlPersist bounds the life of a
        // master left behind by a killed run.
        c.args([
            "-M",
            "-N",
            "-f",
            "-v",
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=120",
        ])
        .arg("-E")
        .arg(&log)
        .arg("--")
        .arg(&self.host)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut child = c.spawn().map_err(|e| RemoteError::Other {
            host: self.name.clone(),
            detail: format!("cannot run ssh: {e}"),
        })?;
        // ConnectTimeout bounds the TCP connect, the banner and the key exchange; this bounds
        // the rest (authentication) too. `-f` returns once authenticated.
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {}
                Err(e) => {
                    return Err(RemoteError::Other {
                        host: self.name.clone(),
                        detail: format!("waiting for ssh: {e}"),
                    })
                }
            }
            if let Some(d) = self.opts.step_timeout {
                if started.elapsed() > d {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RemoteError::Unreachable {
                        host: self.name.clone(),
                        detail: format!(
                            "no answer within {} ([ssh] step_timeout); stopped waiting",
                            crate::local::seconds(d)
                        ),
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if status.success() && self.control_path().exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Err(self.diagnose(&text, status.code()))
    }

    fn run(
        &self,
        script: &Script,
        stdin: Option<&mut (dyn Read + Send)>,
    ) -> Result<Output, RemoteError> {
        self.ensure_master()?;
        let mut c = self.base();
        c.args(["-o", "ControlMaster=no", "-T"])
            .arg("--")
            .arg(&self.host)
            .arg(script.command_line());
        // The mux client hands its stdio to the master, so killing it alone would leave this
        // waiting for the master: on a timeout the master goes too (the next command starts
        // a new one, see `ensure_master`).
        let abort = || self.close();
        let deadline = self
            .opts
            .step_timeout
            .map(|d| (d, &abort as &(dyn Fn() + Sync)));
        let out = run_child(c, &self.name, stdin, deadline)?;
        if out.code == 255 {
            return Err(RemoteError::Unreachable {
                host: self.name.clone(),
                detail: format!("connection lost: {}", out.stderr.trim()),
            });
        }
        Ok(out)
    }

    fn forward(&self, host: &str, port: u16) -> Result<Endpoint, RemoteError> {
        self.ensure_master()?;
        let n = self.forwards.fetch_add(1, Ordering::SeqCst);
        let sock = self
            .opts
            .control_dir
            .join(format!("h{}f{n}.sock", self.index));
        let _ = std::fs::remove_file(&sock);
        let spec = format!("{}:{}:{}", sock.display(), bracket(host), port);
        let mut c = self.base();
        c.args(["-O", "forward", "-L"])
            .arg(spec)
            .arg("--")
            .arg(&self.host);
        let out = c.output().map_err(|e| RemoteError::Other {
            host: self.name.clone(),
            detail: format!("cannot run ssh: {e}"),
        })?;
        if !out.status.success() {
            return Err(RemoteError::Other {
                host: self.name.clone(),
                detail: format!(
                    "cannot forward {host}:{port}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(Endpoint::Unix(sock))
    }

    fn close(&self) {
        let mut c = self.base();
        c.args(["-O", "exit", "--"])
            .arg(&self.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }

    fn link(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        negotiated_cipher(&log)
            .map(|c| format!("cipher {c}"))
            .unwrap_or_default()
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A fresh private directory for control sockets: short, mode 0700.
pub fn control_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = Path::new("/tmp");
    for n in 0..1000u32 {
        let dir = base.join(format!("cutover-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover of a dead run with our pid: reuse it if it is ours alone.
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "no free control directory under /tmp",
    ))
}

/// Whether this machine's CPU has the instructions AES-GCM runs fast with.
fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Starts `ssh -G`, which prints the configuration `ssh` would use for `host`.
fn spawn_ciphers(mut c: Command, host: &str) -> Option<std::process::Child> {
    c.arg("-G")
        .arg("--")
        .arg(host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// The `ciphers` line of an `ssh -G` started by [`spawn_ciphers`], if it gives one.
fn read_ciphers(child: std::process::Child) -> Option<String> {
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("ciphers "))?;
    Some(line.trim().to_string())
}

/// The cipher the master's log (`-v`) says the connection uses.
fn negotiated_cipher(log: &str) -> Option<&str> {
    log.lines().find_map(|l| {
        let (_, rest) = l.split_once("kex: client->server cipher: ")?;
        rest.split_whitespace().next()
    })
}

/// The ssh command line git (gix) runs to reach an `ssh://` repository: the same options as
/// for hosts (strict host keys, batch mode, the config's ssh_config, known_hosts and
/// identity), each value quoted here, where cutover's command lines are built. The
/// destination and the remote command are appended by git.
pub fn git_ssh_command(opts: &SshOptions) -> String {
    let mut words: Vec<String> = vec!["ssh".into()];
    if let Some(f) = &opts.config {
        words.push("-F".into());
        words.push(crate::quote(&f.display().to_string()));
    }
    for o in [
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "UpdateHostKeys=no",
    ] {
        words.push("-o".into());
        words.push(o.into());
    }
    if let Some(k) = &opts.known_hosts {
        words.push("-o".into());
        words.push(crate::quote(&format!("UserKnownHostsFile={}", k.display())));
        words.push("-o".into());
        words.push("GlobalKnownHostsFile=/dev/null".into());
    }
    if let Some(i) = &opts.identity {
        words.push("-i".into());
        words.push(crate::quote(&i.display().to_string()));
        words.push("-o".into());
        words.push("IdentitiesOnly=yes".into());
    }
    words.push("-o".into());
    words.push(format!(
        "ConnectTimeout={}",
        opts.connect_timeout.as_secs().max(1)
    ));
    // A fetch from a server that stops answering ends instead of hanging the deploy.
    for o in ["ServerAliveInterval=5", "ServerAliveCountMax=3"] {
        words.push("-o".into());
        words.push(o.into());
    }
    words.join(" ")
}

#[cfg(test)]
mod git_ssh_tests {
    use super::*;

    #[test]
    fn the_cipher_is_read_from_the_masters_log() {
        let log = "debug1: kex: algorithm: sntrup761x25519-sha512@openssh.com\n\
            debug1: kex: host key algorithm: ssh-ed25519\n\
            debug1: kex: server->client cipher: aes128-gcm@openssh.com MAC: <implicit> compression: none\n\
            debug1: kex: client->server cipher: aes128-gcm@openssh.com MAC: <implicit> compression: none\n";
        assert_eq!(negotiated_cipher(log), Some("aes128-gcm@openssh.com"));
        assert_eq!(negotiated_cipher("debug1: Authenticated\n"), None);
    }

    #[test]
    fn git_ssh_command_quotes_paths_and_is_strict() {
        let cmd = git_ssh_command(&SshOptions {
            config: Some(PathBuf::from("/etc/my ssh/config")),
            known_hosts: Some(PathBuf::from("/k'h")),
            identity: Some(PathBuf::from("/id")),
            connect_timeout: Duration::from_secs(3),
            step_timeout: None,
            control_dir: PathBuf::new(),
        });
        assert!(cmd.starts_with("ssh -F '/etc/my ssh/config' "), "{cmd}");
        assert!(cmd.contains("StrictHostKeyChecking=yes"), "{cmd}");
        assert!(cmd.contains("'UserKnownHostsFile=/k'\\''h'"), "{cmd}");
        assert!(cmd.contains("-i '/id' -o IdentitiesOnly=yes"), "{cmd}");
        assert!(cmd.contains("-o ConnectTimeout=3 "), "{cmd}");
    }
}

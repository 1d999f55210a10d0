//! The engine runs cutover's deploy protocol against hosts: lock, stage, switch, gate, commit
//! or revert, record. It turns a validated [`cutover_core::Config`] into [`Remote`]s, keeps the
//! history in a [`cutover_store::Store`], keeps artifacts in an [`artifact::ArtifactStore`], and
//! tells a [`Reporter`] what happens so the binary can draw progress.
//!
//! **Invariants:** every step that changes a host is recorded as an event before and after it
//! runs; `current` on a host only ever points at a complete release; no host switches before
//! every host staged; an unhealthy host sends every switched host back to the previous release.

pub mod artifact;
pub mod build;
pub mod changes;
mod delta;
pub mod deploy;
pub mod gate;
mod gzip;
mod hostops;
pub mod identity;
pub mod inspect;
pub mod preview;
pub mod renew;
pub mod setup;
mod stream;
pub mod switch;

pub use cutover_core::State as Phase;
pub use deploy::{reconcile, run, DeployError, HostOutcome, Job, Outcome, Recovered, RunRequest};
pub use switch::container::{container_name, remote_binary};

use cutover_core::{Config, Destination};
use cutover_remote::local::LocalHost;
use cutover_remote::ssh::{control_dir, SshHost, SshOptions};
use cutover_remote::Remote;
use cutover_store::Store;
use std::path::PathBuf;

/// Exit codes, as the contract defines them.
pub mod exit {
    /// Done and verified.
    pub const OK: i32 = 0;
    /// Failed; every host is back on (or never left) a complete, verified release.
    pub const FAILED: i32 = 1;
    /// Bad usage, config or input; nothing was touched.
    pub const USAGE: i32 = 2;
    /// Hosts disagree or a rollback itself failed: a person must look.
    pub const NEEDS_PERSON: i32 = 3;
    /// Another deploy of this app holds the lock.
    pub const LOCKED: i32 = 4;
}

/// One step of a run as it happens: what the history records, and what the binary draws
/// (bars, plain lines, or one JSON object per line with `--events`).
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub run: i64,
    /// The event's sequence number in the history (`None`: it could not be recorded).
    pub seq: Option<i64>,
    pub app: &'a str,
    /// Empty while a build has not produced the release yet.
    pub release: &'a str,
    /// `None`: a step of the whole run.
    pub host: Option<&'a str>,
    pub step: cutover_core::Step,
    pub state: cutover_core::State,
    /// UTC, with milliseconds.
    pub time: Timestamp,
    pub detail: &'a str,
    /// What to show people instead of the bare step line, when the step says it better.
    pub shown: Option<&'a str>,
}

/// Milliseconds since the epoch, shown as UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub u64);

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = cutover_core::format_utc(self.0 / 1000);
        let (head, _) = secs.split_at(secs.len() - 1);
        write!(f, "{head}.{:03}Z", self.0 % 1000)
    }
}

/// Receives progress as it happens (the binary draws bars or prints lines).
pub trait Reporter: Sync {
    fn event(&self, _e: &Event<'_>) {}
    fn bytes(&self, _host: &str, _sent: u64, _total: u64) {}
    fn note(&self, _text: &str) {}
}

/// A reporter that shows nothing.
pub struct Silent;
impl Reporter for Silent {}

/// Current time as seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_utc() -> String {
    cutover_core::format_utc(now_secs())
}

/// Now, to the millisecond.
pub fn now_utc_ms() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hosts of a config, connected lazily; closed (masters exited, sockets removed) on drop.
pub struct Hosts {
    remotes: Vec<Box<dyn Remote>>,
    control_dir: Option<PathBuf>,
}

impl Hosts {
    pub fn new(config: &Config) -> std::io::Result<Hosts> {
        let needs_ssh = config.hosts.iter().any(|(_, d)| !d.is_local());
        let control_dir = if needs_ssh {
            Some(control_dir()?)
        } else {
            None
        };
        let opts = SshOptions {
            config: config.ssh.config.clone(),
            known_hosts: config.ssh.known_hosts.clone(),
            identity: config.ssh.identity.clone(),
            connect_timeout: config.ssh.connect_timeout,
            step_timeout: Some(config.ssh.step_timeout),
            control_dir: control_dir.clone().unwrap_or_default(),
        };
        let remotes = config
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (name, d))| -> Box<dyn Remote> {
                match d {
                    Destination::Local => Box::new(LocalHost),
                    Destination::Ssh { user, host, port } => Box::new(SshHost::new(
                        name,
                        user.clone(),
                        host.clone(),
                        *port,
                        i,
                        opts.clone(),
                    )),
                }
            })
            .collect();
        Ok(Hosts {
            remotes,
            control_dir,
        })
    }

    pub fn get(&self, i: usize) -> &dyn Remote {
        self.remotes[i].as_ref()
    }

    pub fn len(&self) -> usize {
        self.remotes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for r in &self.remotes {
            r.close();
        }
        if let Some(d) = &self.control_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs `f` over `0..n` on at most `limit` threads at once; results in index order.
pub fn par_map<R: Send>(n: usize, limit: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..limit.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let r = f(i);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every index ran"))
        .collect()
}

/// Test hook: `CUTOVER_CRASH_AT=<point>` makes the process kill itself with SIGKILL at that
/// point, so tests can prove crash safety at every step of the protocol.
pub(crate) fn crash_point(point: cutover_core::CrashPoint) {
    if std::env::var("CUTOVER_CRASH_AT").is_ok_and(|p| p == point.as_str()) {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(std::process::id().to_string())
            .status();
        std::thread::sleep(std::time::Duration::from_secs(10));
        std::process::abort();
    }
}

/// Opens the store in `data_dir` (created with mode 0700).
pub fn open_store(data_dir: &std::path::Path) -> Result<Store, String> {
    open_database(data_dir, None)
}

/// Opens the store: the PostgreSQL database at `database` when given (`--database`,
/// `CUTOVER_DATABASE`), else SQLite in `data_dir`. The data directory (created with mode
/// 0700) holds the artifact store either way.
pub fn open_database(
    data_dir: &std::path::Path,
    database: Option<&cutover_store::DatabaseUrl>,
) -> Result<Store, String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| {
            format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            )
        })?;
    match database {
        Some(url) => {
            url.check()?;
            Store::connect(&url.0).map_err(|e| e.to_string())
        }
        None => Store::open(&data_dir.join("cutover.db")).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_order_and_bounds_concurrency() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = par_map(20, 3, |i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            running.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, (0..20).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }
}

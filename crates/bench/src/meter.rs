//! Timing one run, and knowing how much of the machine it had. The machine is shared (other
//! builds and tests may run on the same 2 cores), so every timed run first waits, up to a
//! limit, for the CPUs to be nearly idle, and then records next to its wall time the CPU time
//! that the bench's own processes used (cutover, ssh, the hosts' sshd, tar and nginx) and the
//! CPU time everything else on the machine used meanwhile.
//!
//! A repetition in which other processes took more than a quarter of the machine during a
//! timed run is redone (up to [`MAX_REDOS`] times per host count; the discarded runs stay in
//! the JSON).
//!
//! The bench's own CPU time comes from a cgroup-v1 `cpuacct` group that the bench process
//! joins at start (children, including daemonized ssh masters, inherit it); it is left and
//! removed at exit. Without a writable cpuacct hierarchy, CPU times are not reported.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;
/// Longest wait for an idle machine before a timed run.
const QUIET_MAX_WAIT: Duration = Duration::from_secs(20);
/// Busy share of all CPUs (over a 0.5 s window) below which the machine counts as idle.
const QUIET_BUSY: f64 = 0.15;
const CPUACCT: &str = "/sys/fs/cgroup/cpuacct";

/// What one timed run measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Wall time, spawn to exit.
    pub(crate) secs: f64,
    /// CPU seconds used by the bench's processes during the run (None: no cpuacct).
    pub(crate) cpu_s: Option<f64>,
    /// CPU seconds used by all other processes on the machine during the run (estimated as
    /// all busy time minus the bench's; 0 when unknown).
    pub(crate) foreign_cpu_s: f64,
    /// Seconds waited for an idle machine before the run.
    pub(crate) waited_s: f64,
}

/// Share of the machine's CPU that other processes may use during a timed run before the
/// run counts as disturbed.
const DISTURBED_SHARE: f64 = 0.25;
/// How many times a scenario may redo a disturbed repetition per host count.
pub(crate) const MAX_REDOS: usize = 2;

impl Sample {
    /// Whether other processes used more than a quarter of the machine's CPU during the run.
    pub(crate) fn disturbed(&self, cores: usize) -> bool {
        self.foreign_cpu_s > DISTURBED_SHARE * self.secs * cores.max(1) as f64
    }

    pub(crate) fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "wall_s": self.secs,
            "cpu_s": self.cpu_s,
            "other_processes_cpu_s": self.foreign_cpu_s,
            "waited_for_idle_s": self.waited_s,
        })
    }
}

/// Times runs; owns the bench's cpuacct group (if any) for its lifetime.
pub(crate) struct Meter {
    group: Option<PathBuf>,
    /// Longest wait for an idle machine before a timed run.
    max_wait: Duration,
}

impl Meter {
    /// Joins a fresh cpuacct group `cutover-bench-<pid>` if the hierarchy is writable.
    /// `quick` runs wait at most 2 s for an idle machine (their timings are not the published
    /// ones), full runs up to [`QUIET_MAX_WAIT`].
    pub(crate) fn new(quick: bool) -> Meter {
        let dir = PathBuf::from(CPUACCT).join(format!("cutover-bench-{}", std::process::id()));
        let joined = std::fs::create_dir(&dir).is_ok()
            && std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).is_ok();
        if !joined {
            let _ = std::fs::remove_dir(&dir);
            eprintln!("[bench] no writable cpuacct cgroup: CPU seconds will not be reported");
        }
        Meter {
            group: joined.then_some(dir),
            max_wait: if quick {
                Duration::from_secs(2)
            } else {
                QUIET_MAX_WAIT
            },
        }
    }

    /// CPU seconds used so far by the bench's processes.
    fn own_cpu(&self) -> Option<f64> {
        let g = self.group.as_ref()?;
        let ns: u64 = std::fs::read_to_string(g.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(ns as f64 / 1e9)
    }

    /// Waits (up to a limit) for an idle machine, then runs `f` and measures it.
    pub(crate) fn time<T>(&self, f: impl FnOnce() -> T) -> (T, Sample) {
        let waited_s = wait_quiet(self.max_wait);
        let own0 = self.own_cpu();
        let (busy0, _) = cpu_jiffies();
        let t = Instant::now();
        let out = f();
        let secs = t.elapsed().as_secs_f64();
        let (busy1, _) = cpu_jiffies();
        let cpu_s = match (own0, self.own_cpu()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let busy_s = busy1.saturating_sub(busy0) as f64 / USER_HZ;
        let foreign_cpu_s = cpu_s.map(|c| (busy_s - c).max(0.0)).unwrap_or(0.0);
        (
            out,
            Sample {
                secs,
                cpu_s,
                foreign_cpu_s,
                waited_s,
            },
        )
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let Some(g) = &self.group else { return };
        let _ = std::fs::write(
            PathBuf::from(CPUACCT).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // Children still exiting keep the group busy for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(g).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("[bench] could not remove the cgroup {}", g.display());
    }
}

/// Waits until all CPUs are nearly idle over half a second, at most [`QUIET_MAX_WAIT`];
/// returns the seconds waited.
fn wait_quiet(max_wait: Duration) -> f64 {
    let t = Instant::now();
    loop {
        let a = cpu_jiffies();
        std::thread::sleep(Duration::from_millis(500));
        let b = cpu_jiffies();
        let busy = b.0.saturating_sub(a.0) as f64 / (b.1.saturating_sub(a.1).max(1)) as f64;
        if busy < QUIET_BUSY || t.elapsed() >= max_wait {
            return t.elapsed().as_secs_f64();
        }
    }
}

/// Busy and total ticks of all CPUs so far (the `cpu` line of `/proc/stat`; idle and iowait
/// count as not busy).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

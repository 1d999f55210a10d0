//! Who is running: the lock holder record (user, machine, pid and its start time, since when,
//! what operation), and whether a recorded holder is still alive. A holder on another machine
//! is always presumed alive: only a person can tell.

use cutover_store::Holder;

/// This process as a lock holder for `op`.
pub fn me(op: &str, since: &str) -> Holder {
    let pid = std::process::id();
    Holder {
        user: std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into()),
        machine: machine(),
        pid,
        pid_start: pid_start(pid).unwrap_or(0),
        since: since.to_string(),
        op: op.to_string(),
    }
}

/// `hostname/machine-id-prefix`: stable per machine, readable in messages.
pub fn machine() -> String {
    // Test hook: the two-server tests play a server on another machine.
    if let Some(m) = std::env::var("CUTOVER_TEST_MACHINE")
        .ok()
        .filter(|m| !m.is_empty())
    {
        return m;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let id = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().chars().take(8).collect::<String>())
        .unwrap_or_default();
    if id.is_empty() {
        host
    } else {
        format!("{host}/{id}")
    }
}

/// Field 22 of /proc/PID/stat: the process start time in clock ticks since boot.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `h` still runs. Holders on other machines are presumed alive.
pub fn alive(h: &Holder) -> bool {
    if h.machine != machine() {
        return true;
    }
    match pid_start(h.pid) {
        None => false,
        Some(start) => h.pid_start == 0 || start == h.pid_start,
    }
}

/// A holder as one line for a person.
pub fn describe(h: &Holder) -> String {
    format!(
        "{}@{} pid {} ({}) since {}",
        h.user, h.machine, h.pid, h.op, h.since
    )
}

/// The holder as written into a host's lock file (one JSON line).
pub fn to_line(h: &Holder) -> String {
    serde_json::to_string(h).unwrap_or_default()
}

/// Reads a host lock line back; `None` if it is not ours to understand.
pub fn from_line(line: &str) -> Option<Holder> {
    #[derive(serde::Deserialize)]
    struct H {
        user: String,
        machine: String,
        pid: u32,
        pid_start: u64,
        since: String,
        op: String,
    }
    let h: H = serde_json::from_str(line).ok()?;
    Some(Holder {
        user: h.user,
        machine: h.machine,
        pid: h.pid,
        pid_start: h.pid_start,
        since: h.since,
        op: h.op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_not() {
        let h = me("deploy", "now");
        assert!(alive(&h));
        let mut dead = h.clone();
        dead.pid = u32::MAX - 1;
        assert!(!alive(&dead));
        let mut reused = h.clone();
        reused.pid_start += 1;
        assert!(!alive(&reused), "a reused pid must not count as the holder");
        let mut remote = dead.clone();
        remote.machine = "elsewhere".into();
        assert!(alive(&remote));
        assert_eq!(from_line(&to_line(&h)), Some(h));
    }
}

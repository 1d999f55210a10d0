//! Small process and system helpers shared by the lab: running commands
//! with readable errors, signalling processes without `unsafe`, waiting for
//! TCP ports, and identifying processes robustly (pid plus start time).

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `prog args...` to completion and returns its output, or an error
/// message naming the command, its exit status and its stderr.
pub(crate) fn run(prog: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{} {}` failed ({}): {}",
            prog,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Like [`run`] but ignores failures (used by idempotent cleanup).
pub(crate) fn run_quiet(prog: &str, args: &[&str]) {
    let _ = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Sends `signal` (e.g. "TERM", "KILL") to every pid in `pids`.
pub(crate) fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let sig = format!("-{signal}");
    let mut args: Vec<String> = vec![sig];
    args.extend(pids.iter().map(|p| p.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_quiet("kill", &refs);
}

/// True if a process with this pid exists (zombies count as gone).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_field(&stat, 3).is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Start time (in clock ticks since boot) of a process, used together with
/// the pid to recognise a process even if its pid is later reused.
pub(crate) fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 22)?.parse().ok()
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    // Field 2 (comm) may contain spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// Terminates a child we spawned: SIGTERM, then SIGKILL after `grace`,
/// and reaps it.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(&[child.id()], "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until every pid is gone or the deadline passes; then SIGKILLs the
/// survivors and waits a little more.
pub(crate) fn kill_and_wait(pids: &[u32], grace: Duration) {
    signal(pids, "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&p| pid_alive(p)) {
        thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    if !left.is_empty() {
        signal(&left, "KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && left.iter().any(|&p| pid_alive(p)) {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Polls until `addr` accepts a TCP connection. While waiting, `child`
/// (if given) must stay alive. Errors describe what went wrong.
pub(crate) fn wait_port(
    addr: SocketAddr,
    child: Option<&mut Child>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut child = child;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("process exited ({status}) before {addr} accepted"));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{addr} did not accept connections within {timeout:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `addr` refuses (or otherwise fails) a TCP connection.
pub(crate) fn wait_port_closed(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `path` for appending (creating it), for use as a child's stdout
/// or stderr.
pub(crate) fn log_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

/// The last `max` bytes of a file, for error messages.
pub(crate) fn tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).trim().to_string()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Runs `cmd` (stdin null, output captured) like [`run`], but a command
/// still running after `timeout` is killed (SIGKILL) and reported as an
/// error; so are failures. For steps that must not hang a test's `Drop`.
pub(crate) fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| format!("cannot run {what}: {e}"))?,
        Err(_) => {
            signal(&[pid], "KILL");
            let _ = rx.recv();
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
    };
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

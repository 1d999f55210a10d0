//! `hosts = ["local"]`: this machine, through the same `sh -c` scripts as SSH hosts.

use crate::{Endpoint, Output, Remote, RemoteError, Script};
use std::io::{Read, Write};
use std::net::ToSocketAddrs;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// This machine.
#[derive(Debug, Default)]
pub struct LocalHost;

impl Remote for LocalHost {
    fn name(&self) -> &str {
        "local"
    }

    fn connect(&self) -> Result<(), RemoteError> {
        Ok(())
    }

    fn run(
        &self,
        script: &Script,
        stdin: Option<&mut (dyn Read + Send)>,
    ) -> Result<Output, RemoteError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script.text()).current_dir("/");
        run_child(cmd, "local", stdin, None)
    }

    fn forward(&self, host: &str, port: u16) -> Result<Endpoint, RemoteError> {
        let addr = (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| RemoteError::Other {
                host: "local".into(),
                detail: format!("cannot resolve {host}:{port}"),
            })?;
        Ok(Endpoint::Tcp(addr))
    }

    fn close(&self) {}
}

/// Runs a prepared child, streaming `stdin` into it while collecting stdout and stderr on
/// threads (so neither pipe can fill and stall the other). With a deadline `(d, abort)`, a
/// child still running after `d` is killed (SIGKILL), then `abort` runs, and the answer is
/// [`RemoteError::Unreachable`] saying so. `abort` must make every other holder of the
/// child's pipes let go (an OpenSSH mux client hands its stdio to the master: `abort` stops
/// the master), or this waits for them.
/// Bytes per write into a child's stdin.
const FEED: usize = 256 << 10;

/// Copies `r` into a child's stdin in writes of up to [`FEED`] bytes. `ssh` sends what it finds
/// in its stdin pipe as it wakes up: with `io::copy`'s 8 KiB writes it woke for every 8 KiB and
/// sent small packets, and the whole path (ssh, the host's sshd and tar) spent about 15% more
/// CPU per byte than with large writes (measured with `perf stat` over ssh and sshd).
fn feed(r: &mut dyn Read, w: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; FEED];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
    }
    w.flush()
}

pub(crate) fn run_child(
    mut cmd: Command,
    host: &str,
    stdin: Option<&mut (dyn Read + Send)>,
    deadline: Option<(Duration, &(dyn Fn() + Sync))>,
) -> Result<Output, RemoteError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| RemoteError::Other {
        host: host.into(),
        detail: format!("cannot start {:?}: {e}", cmd.get_program()),
    })?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let child_in = child.stdin.take();
    let pid = child.id();
    let (stop, stopped) = mpsc::channel::<()>();
    let timed_out = AtomicBool::new(false);
    let (stdout, stderr, write_err) = std::thread::scope(|s| {
        // The watchdog ends when `stop` is dropped, before the child is reaped below, so the
        // pid it may kill is still the child's (a zombie at worst), never a reused one.
        let watchdog = deadline.map(|(d, abort)| {
            let timed_out = &timed_out;
            s.spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(d) {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    abort();
                }
            })
        });
        let o = s.spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let e = s.spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let mut write_err = None;
        if let (Some(mut w), Some(r)) = (child_in, stdin) {
            if let Err(e) = feed(r, &mut w) {
                write_err = Some(e);
            }
            drop(w);
        }
        let out = (
            o.join().unwrap_or_default(),
            e.join().unwrap_or_default(),
            write_err,
        );
        drop(stop);
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        out
    });
    let status = child.wait().map_err(|e| RemoteError::Other {
        host: host.into(),
        detail: format!("waiting for the command: {e}"),
    })?;
    if let (true, Some((d, _))) = (timed_out.load(Ordering::SeqCst), deadline) {
        return Err(RemoteError::Unreachable {
            host: host.into(),
            detail: format!(
                "no answer within {} ([ssh] step_timeout); stopped waiting",
                seconds(d)
            ),
        });
    }
    let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe || status.success() {
            stderr.push_str(&format!("\n(sending input failed: {e})"));
        }
    }
    Ok(Output {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
    })
}

/// A duration as the config writes it: `90s`, `1.5s`.
pub(crate) fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_child_past_its_deadline_is_killed_and_said_so() {
        let t = Instant::now();
        let mut c = Command::new("sleep");
        c.arg("30");
        let aborted = AtomicBool::new(false);
        let abort = || aborted.store(true, Ordering::SeqCst);
        let e = run_child(c, "h1", None, Some((Duration::from_millis(300), &abort))).unwrap_err();
        assert!(aborted.load(Ordering::SeqCst));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(
            e.to_string(),
            "h1: unreachable: no answer within 0.3s ([ssh] step_timeout); stopped waiting"
        );
        // One that ends in time answers as usual.
        let mut c = Command::new("sh");
        c.args(["-c", "echo hi; exit 3"]);
        let o = run_child(c, "h1", None, Some((Duration::from_secs(30), &|| {}))).unwrap();
        assert_eq!((o.code, o.stdout.as_str()), (3, "hi\n"));
    }
}

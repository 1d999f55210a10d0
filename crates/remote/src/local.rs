//! `hosts = ["local"]`: this machine, through the same `sh -c` scripts as SSH hosts.

use crate::{Endpoint, Output, Remote, RemoteError, Script};
use std::io::{Read, Write};
use std::net::ToSocketAddrs;
use std::process::{Command, Stdio};

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
        run_child(cmd, "local", stdin)
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
/// threads (so neither pipe can fill and stall the other).
pub(crate) fn run_child(
    mut cmd: Command,
    host: &str,
    stdin: Option<&mut (dyn Read + Send)>,
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
    let (stdout, stderr, write_err) = std::thread::scope(|s| {
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
            if let Err(e) = std::io::copy(r, &mut w).and_then(|_| w.flush()) {
                write_err = Some(e);
            }
            drop(w);
        }
        (
            o.join().unwrap_or_default(),
            e.join().unwrap_or_default(),
            write_err,
        )
    });
    let status = child.wait().map_err(|e| RemoteError::Other {
        host: host.into(),
        detail: format!("waiting for the command: {e}"),
    })?;
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

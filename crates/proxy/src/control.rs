//! The control protocol and its unix socket: one JSON [`Request`] per line in, one JSON
//! [`Response`] per line out, several requests per connection allowed (answered in order).
//! It owns the framing, the socket file and the access check (the types and their JSON are
//! `cutover-proxy-wire`'s); it must not decide anything about routing (it calls
//! [`crate::Proxy`]'s operations).
//!
//! Wire examples:
//! ```text
//! {"op":"deploy","service":"api","target":"127.0.0.1:41002","health_path":"/up","drain_ms":30000}
//! {"result":"deployed","service":"api","target":"127.0.0.1:41002","previous":"127.0.0.1:41001",...}
//! {"op":"pause","service":"api","hold_ms":30000}     {"result":"paused","service":"api","drained":true,...}
//! {"op":"resume","service":"api"}                    {"result":"resumed","service":"api","released":3}
//! {"op":"status"}                                    {"result":"status","pid":..,"services":[..]}
//! {"op":"remove","service":"api"}                    {"result":"removed","service":"api"}
//! anything that fails                                {"result":"error","error":"no such service: api"}
//! ```
//!
//! Invariants:
//! - The socket file gets its final name only after it is mode 0600 (bound under a temporary
//!   name, chmod, rename), so there is no moment when others may connect to it by that name.
//! - Every connection is checked against the kernel's peer credentials before anything is
//!   read: only uid 0 and the socket owner's uid (the proxy's own) are served; anyone else
//!   gets one error line and the connection is closed.
//! - A request line is at most 64 KiB.

use std::fs;
use std::io::{self, BufRead, BufReader as StdBufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::forward::stopped;
use crate::{log, parent_dir, Error, Proxy};
use cutover_proxy_wire::{Request, Response};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Distinguishes temporary socket names of several binds in one process.
static BIND_SEQ: AtomicU64 = AtomicU64::new(0);

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached (no proxy running, or no permission).
    #[error("cannot connect to the proxy's control socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The proxy closed the connection without answering.
    #[error("the proxy closed the control connection without answering")]
    Closed,
    /// The answer was not a response.
    #[error("bad answer from the proxy: {0}")]
    Protocol(String),
    /// The proxy answered with an error.
    #[error("{0}")]
    Rejected(String),
}

/// Binds the control socket at `path`, mode 0600: removes a stale socket file (one nobody
/// listens on; a live one is an error, and so is a non-socket file), binds under a temporary
/// name in the same directory, chmods, and renames into place. Must be called inside a tokio
/// runtime.
pub fn bind_control(path: &Path) -> Result<UnixListener, Error> {
    let dir = parent_dir(path);
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::io(
                    format!("control socket {}", path.display()),
                    io::Error::new(io::ErrorKind::AddrInUse, "another proxy is listening on it"),
                ));
            }
            fs::remove_file(path)
                .map_err(|e| Error::io(format!("cannot remove stale {}", path.display()), e))?;
        }
        Ok(_) => {
            return Err(Error::io(
                format!("control socket {}", path.display()),
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; not touching it",
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot stat {}", path.display()), e)),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proxy.sock".to_string());
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        BIND_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| Error::io(format!("cannot bind {}", tmp.display()), e))?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(
            format!("cannot put the control socket at {}", path.display()),
            e,
        ));
    }
    Ok(listener)
}

/// The control socket file as `serve` found it.
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// The uid that owns the socket file: the proxy's own uid.
    pub(crate) owner_uid: u32,
}

impl SocketFile {
    /// Removes the socket file unless another process has since put its own there.
    pub(crate) fn remove_if_ours(&self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Checks the control socket at `path` (bound by [`bind_control`] or handed over), makes sure
/// it is mode 0600, and records who owns it.
pub(crate) fn prepare_socket(path: &Path) -> Result<SocketFile, Error> {
    let m = fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("control socket {}", path.display()), e))?;
    if !m.file_type().is_socket() {
        return Err(Error::Invalid(format!(
            "control socket {} is not a socket",
            path.display()
        )));
    }
    if m.mode() & 0o777 != 0o600 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))?;
    }
    Ok(SocketFile {
        path: path.to_path_buf(),
        dev: m.dev(),
        ino: m.ino(),
        owner_uid: m.uid(),
    })
}

/// Accepts control connections until `stop`.
pub(crate) async fn serve_control(
    proxy: Proxy,
    listener: UnixListener,
    owner_uid: u32,
    mut stop: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    log::line(format_args!("control accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let proxy = proxy.clone();
        let stop = stop.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            connection(proxy, stream, owner_uid, stop).await;
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

async fn connection(
    proxy: Proxy,
    stream: UnixStream,
    owner_uid: u32,
    mut stop: watch::Receiver<bool>,
) {
    let refusal = match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == owner_uid => None,
        Ok(cred) => Some(format!(
            "permission denied: uid {} may not use the proxy's control socket \
             (only root and uid {owner_uid})",
            cred.uid()
        )),
        Err(e) => Some(format!(
            "permission denied: cannot read peer credentials: {e}"
        )),
    };
    let (read, mut write) = stream.into_split();
    if let Some(error) = refusal {
        log::line(format_args!("control: refused a connection: {error}"));
        let _ = write_response(&mut write, &Response::Error { error }).await;
        let _ = write.shutdown().await;
        // Swallow what the peer already sent (briefly, boundedly): closing a unix socket with
        // unread data resets it, and the peer would lose the answer.
        let mut rest = read.take(MAX_LINE);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut reader).take(MAX_LINE);
        let n = tokio::select! {
            r = limited.read_until(b'\n', &mut line) => r,
            _ = stopped(&mut stop) => return,
        };
        match n {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() as u64 >= MAX_LINE {
            let error = format!("request line longer than {MAX_LINE} bytes");
            let _ = write_response(&mut write, &Response::Error { error }).await;
            return;
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let response = match serde_json::from_slice::<Request>(text) {
            Ok(req) => execute(&proxy, req).await,
            Err(e) => Response::Error {
                error: format!("bad request: {e}"),
            },
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.flush().await
}

async fn execute(proxy: &Proxy, req: Request) -> Response {
    let result = match req {
        Request::Deploy(d) => proxy
            .deploy(
                &d.service,
                &d.target,
                &d.health_path,
                &d.domains,
                &d.options,
            )
            .await
            .map(Response::Deployed),
        Request::Pause {
            service,
            hold_ms,
            drain_ms,
        } => proxy
            .pause(
                &service,
                hold_ms.map(Duration::from_millis),
                drain_ms.map(Duration::from_millis),
            )
            .await
            .map(Response::Paused),
        Request::Resume { service } => proxy
            .resume(&service)
            .await
            .map(|released| Response::Resumed { service, released }),
        Request::Status => Ok(Response::Status(proxy.status())),
        Request::Remove { service } => proxy
            .remove(&service)
            .await
            .map(|()| Response::Removed { service }),
        Request::Canary(c) => proxy.canary(&c).await.map(Response::Canary),
        Request::Stats { service } => proxy.stats(&service).map(Response::Stats),
        Request::Bake(b) => proxy.bake(b).await.map(Response::Baking),
        Request::Renew { domains } => proxy
            .renew(domains)
            .map(|domains| Response::Renewing { domains }),
    };
    result.unwrap_or_else(|e| Response::Error {
        error: e.to_string(),
    })
}

fn encode(req: &Request) -> Result<Vec<u8>, ControlError> {
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

fn decode(line: &str) -> Result<Response, ControlError> {
    if line.is_empty() {
        return Err(ControlError::Closed);
    }
    match serde_json::from_str::<Response>(line.trim()) {
        Ok(Response::Error { error }) => Err(ControlError::Rejected(error)),
        Ok(resp) => Ok(resp),
        Err(e) => Err(ControlError::Protocol(format!("{e}: {:?}", line.trim()))),
    }
}

/// Sends one request to the proxy listening on `socket` and returns its answer. An error
/// answer from the proxy is [`ControlError::Rejected`]. No timeout: a deploy takes as long
/// as its gate and drain.
pub async fn control_request(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    write.write_all(&encode(req)?).await?;
    write.flush().await?;
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_LINE * 64)
        .read_line(&mut line)
        .await?;
    decode(&line)
}

/// [`control_request`] for callers without a runtime (the CLI): plain blocking socket I/O.
pub fn control_request_blocking(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        }
    })?;
    stream.write_all(&encode(req)?)?;
    stream.flush()?;
    let mut line = String::new();
    io::Read::take(StdBufReader::new(stream), MAX_LINE * 64).read_line(&mut line)?;
    decode(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire types' shapes are tested in `cutover-proxy-wire`; here, the framing.
    #[test]
    fn framing_encodes_one_line_and_decodes_answers() {
        let req = Request::Pause {
            service: "a".into(),
            hold_ms: Some(5),
            drain_ms: None,
        };
        let line = encode(&req).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Request = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, req);
        assert!(matches!(
            decode(r#"{"result":"error","error":"no such service: x"}"#),
            Err(ControlError::Rejected(m)) if m == "no such service: x"
        ));
        assert!(matches!(
            decode(r#"{"result":"resumed","service":"a","released":2}"#),
            Ok(Response::Resumed { released: 2, .. })
        ));
        assert!(matches!(decode(""), Err(ControlError::Closed)));
    }
}

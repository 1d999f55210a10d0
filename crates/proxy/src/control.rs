//! The control protocol and its unix socket: one JSON [`Request`] per line in, one JSON
//! [`Response`] per line out, several requests per connection allowed (answered in order).
//! It owns the wire format, the socket file and the access check; it must not decide anything
//! about routing (it calls [`crate::Proxy`]'s operations).
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

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::forward::stopped;
use crate::switch::DeployOptions;
use crate::{log, parent_dir, Error, Proxy};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Distinguishes temporary socket names of several binds in one process.
static BIND_SEQ: AtomicU64 = AtomicU64::new(0);

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Gate a new target, switch to it, drain the old one.
    Deploy(DeployRequest),
    /// Hold new requests for a service.
    Pause {
        /// The service.
        service: String,
        /// How long each request may be held before it gets a 503 (default: the proxy's
        /// configured hold).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_ms: Option<u64>,
        /// How long to wait for requests already in flight on the current target before
        /// answering (default 30 s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain_ms: Option<u64>,
    },
    /// Release held requests to the current target.
    Resume {
        /// The service.
        service: String,
    },
    /// Report services, targets and counters.
    Status,
    /// Forget a service.
    Remove {
        /// The service.
        service: String,
    },
}

/// The body of a deploy request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The service (created if new).
    pub service: String,
    /// The new target, `host:port`.
    pub target: String,
    /// Health path on the target, e.g. `/up`.
    pub health_path: String,
    /// `Host` names routed to this service; empty keeps the service's current domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// Gate and drain options.
    #[serde(flatten)]
    pub options: DeployOptions,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// A deploy passed its gate and switched (or found the target already current).
    Deployed(DeployReport),
    /// The service is paused (and its current target drained, if `drained`).
    Paused(PauseReport),
    /// The service was resumed.
    Resumed {
        /// The service.
        service: String,
        /// Requests that were held at that moment.
        released: usize,
    },
    /// The proxy's status.
    Status(StatusReport),
    /// The service was removed.
    Removed {
        /// The service.
        service: String,
    },
    /// The request failed; nothing was changed unless the message says otherwise.
    Error {
        /// What went wrong.
        error: String,
    },
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    /// The service.
    pub service: String,
    /// Its target now.
    pub target: String,
    /// Its target before, if the pointer was swapped.
    pub previous: Option<String>,
    /// The service did not exist before.
    pub created: bool,
    /// Requests now go somewhere new (false when the target was already current).
    pub switched: bool,
    /// When the pointer was swapped, Unix milliseconds.
    pub switched_at_ms: u64,
    /// How long the health gate took.
    pub health_ms: u64,
    /// Health probes sent.
    pub health_probes: u32,
    /// All of the old target's in-flight requests finished within the drain time.
    pub drained: bool,
    /// Time from the swap to the end of the drain.
    pub drain_ms: u64,
    /// The old target's requests still in flight when the drain ended.
    pub in_flight_left: usize,
    /// Set if the switch happened but the state file could not be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

/// What a pause did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    /// The service.
    pub service: String,
    /// How long each new request will be held at most.
    pub hold_ms: u64,
    /// No request was in flight on the current target when the pause answered.
    pub drained: bool,
    /// Time the pause waited for in-flight requests.
    pub drain_ms: u64,
    /// Requests still in flight on the current target when the pause answered.
    pub in_flight_left: usize,
}

/// The proxy's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The proxy's process id.
    pub pid: u32,
    /// The proxy's version.
    pub version: String,
    /// The configured listen address.
    pub listen: String,
    /// Time since the proxy started.
    pub uptime_ms: u64,
    /// Requests received since start (all services, 404s included).
    pub requests: u64,
    /// Services by name.
    pub services: Vec<ServiceStatus>,
}

/// One service in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service.
    pub name: String,
    /// `Host` names routed to it.
    pub domains: Vec<String>,
    /// Its current target.
    pub target: String,
    /// New requests are being held.
    pub paused: bool,
    /// Requests held right now.
    pub held: usize,
    /// Requests in flight on any of its targets (old ones still draining included).
    pub in_flight: usize,
    /// Requests routed to it since the proxy started.
    pub requests: u64,
    /// Requests the current target answered since it became current.
    pub target_served: u64,
}

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

    #[test]
    fn requests_and_responses_have_the_documented_shape() {
        let req: Request = serde_json::from_str(
            r#"{"op":"deploy","service":"api","target":"127.0.0.1:9","health_path":"/up","drain_ms":100,"healthy_after":3}"#,
        )
        .unwrap();
        let Request::Deploy(d) = &req else {
            panic!("{req:?}")
        };
        assert_eq!(d.options.drain, Duration::from_millis(100));
        assert_eq!(d.options.healthy_after, 3);
        assert_eq!(d.options.timeout, Duration::from_secs(2));
        assert!(d.domains.is_empty());
        let back: Request = serde_json::from_slice(&encode(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"pause","service":"a"}"#).unwrap(),
            Request::Pause {
                service: "a".into(),
                hold_ms: None,
                drain_ms: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
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

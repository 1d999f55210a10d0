//! cutover's edge proxy: one small HTTP/1.1 reverse proxy per host that routes by `Host` to a
//! service's current target, switches that target as one atomic pointer swap after the new
//! target passes a health gate, drains the old target's in-flight requests, can hold (pause)
//! new requests during a `hold` switch, and keeps its state on disk so that a restart routes
//! as before. It is driven over a root-only unix control socket speaking one JSON object per
//! line ([`Request`] / [`Response`]).
//!
//! Facing the open internet, it also limits what a client can cost (`limits`: head size and
//! deadline, connection cap with idle reclaim, body timeout, upstream timeouts), refuses
//! requests that are ambiguous about their framing or host and strips forgeable forwarding
//! headers (`headers`), passes `Upgrade`/WebSockets through as tunnels that a switch closes at
//! its drain deadline (`upgrade`), and writes a size-rotated access log (`access`).
//!
//! This crate owns the proxy process's behaviour only. It must not start or stop containers,
//! talk SSH, or know about releases: the engine decides *what* to switch to and asks through
//! [`control_request`]; the proxy decides nothing but *how* to switch safely.
//!
//! Invariants (each is enforced in the module named):
//! - A switch never closes or fails a client-side connection: client connections are not tied
//!   to a target; a request picks its target once, when it starts (`table`, `forward`).
//! - A target is never switched to before it passed `healthy_after` consecutive health probes;
//!   a failed gate changes nothing (`switch`).
//! - After the pointer swap returns, every request that will ever use the old target is already
//!   counted in its in-flight counter, so "drained" means drained (`table`).
//! - The state file on disk is always a complete JSON document (temp file + rename), written
//!   after every change, in the order the changes happened (`state`).
//! - A half-sent request costs at most `max_header_bytes` of buffer, and the number of client
//!   connections stays within what the open-file limit allows (`limits`).
//! - A request that is ambiguous about its length or host never reaches a target (`guard`,
//!   before hyper parses its head; `headers`).
//! - The control socket serves only uid 0 and the proxy's own uid, checked per connection from
//!   the kernel's peer credentials; the socket file is mode 0600 from the moment it has its
//!   final name (`control`).

mod access;
mod acme;
mod bake;
mod canary;
mod certs;
mod control;
mod deadline;
mod direct;
mod forward;
mod guard;
mod h2exec;
mod headers;
mod limits;
mod log;
mod spread;
mod state;
mod static_target;
mod stats;
mod switch;
mod table;
mod tls;
mod upgrade;
mod upstream;
mod workers;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

pub use headers::RelayHeader;
pub use limits::Limits;

pub use control::{bind_control, control_request, control_request_blocking, ControlError};
/// The control protocol's wire types live in `cutover-proxy-wire` (serde only), so that the
/// controller side can speak the protocol without this crate's HTTP stack.
pub use cutover_proxy_wire::{
    BakeLimits, BakeRequest, BakeState, BakeStatus, CanaryReport, CanaryRequest, CertificateStatus,
    DeployOptions, DeployReport, DeployRequest, PauseReport, Request, Response, ServiceStatus,
    StatsReport, StatusReport, TargetStats, LATENCY_BOUNDS_MS,
};
pub use tls::{AcmeConfig, TlsMode, LETS_ENCRYPT};

/// Where the control socket lives unless configured otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/cutover/proxy.sock";
/// Where the proxy keeps its state unless configured otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/cutover/proxy-state.json";
/// The access log's size limit unless configured otherwise (two files of it are kept).
pub const DEFAULT_ACCESS_LOG_MAX_BYTES: u64 = 64 << 20;
/// How long a request is held during a pause unless the pause says otherwise.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(30);
/// How long `serve` waits for open client connections to finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How a proxy runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// HTTP listen address (`[proxy] listen`).
    pub listen: SocketAddr,
    /// The unix control socket (created mode 0600).
    pub control_socket: PathBuf,
    /// The JSON state file (services and their targets).
    pub state_file: PathBuf,
    /// Default for how long a request is held while its service is paused (`[proxy] hold`);
    /// a `pause` request may override it.
    pub hold: Duration,
    /// Limits against hostile clients and broken upstreams (`[proxy]` limit keys).
    pub limits: Limits,
    /// The access log (one line per request), `access.log` beside the state file by default;
    /// `None`: no access log.
    pub access_log: Option<PathBuf>,
    /// The access log is rotated (to `access.log.1`, one old file kept) past this size.
    pub access_log_max_bytes: u64,
    /// `[proxy] tls`.
    pub tls: TlsMode,
    /// `[proxy] listen_tls`: where TLS is served when `tls` is not off.
    pub listen_tls: SocketAddr,
    /// `[proxy] redirect_http`: plain HTTP to a routed domain gets a 308 to https (but for
    /// ACME's HTTP-01 path).
    pub redirect_http: bool,
    /// `[proxy] trusted_proxies`, as (network, prefix length): clients whose
    /// `X-Forwarded-For` (appended to), `-Proto` and `-Host` are kept instead of replaced (a
    /// load balancer or CDN in front); such a client saying `X-Forwarded-Proto: https` is not
    /// redirected by `redirect_http`. Empty by default.
    pub trusted_proxies: Vec<(std::net::IpAddr, u8)>,
    /// `[proxy] trusted_proxies_header`: whether those proxies say whom they relay in
    /// `X-Forwarded-*` (the default) or in `Forwarded`; the other is never believed.
    pub trusted_proxies_header: RelayHeader,
}

impl ProxyConfig {
    /// A config with the default hold.
    pub fn new(listen: SocketAddr, control_socket: PathBuf, state_file: PathBuf) -> Self {
        ProxyConfig {
            listen,
            control_socket,
            hold: DEFAULT_HOLD,
            limits: Limits::default(),
            access_log: Some(parent_dir(&state_file).join("access.log")),
            access_log_max_bytes: DEFAULT_ACCESS_LOG_MAX_BYTES,
            state_file,
            tls: TlsMode::Off,
            listen_tls: SocketAddr::from(([0, 0, 0, 0], 443)),
            redirect_http: false,
            trusted_proxies: Vec::new(),
            trusted_proxies_header: RelayHeader::default(),
        }
    }
}

/// What can go wrong in the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The state file exists but cannot be used.
    #[error("state file {path}: {message}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// TLS cannot be served as configured (a certificate or key file, the ACME setup).
    #[error("tls: {0}")]
    Tls(String),
    /// A request was malformed (bad name, target, path or domain).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The named service does not exist.
    #[error("no such service: {0}")]
    UnknownService(String),
    /// A domain is already routed to another service.
    #[error("domain {domain} already belongs to service {owner}")]
    DomainConflict {
        /// The contested domain.
        domain: String,
        /// The service that has it.
        owner: String,
    },
    /// The new target never passed its health gate; nothing was changed.
    #[error(
        "target {target} did not pass the health gate on {path} within {waited_ms} ms \
         ({probes} probes, {passes} consecutive passes of {needed} needed): {last}; nothing was changed"
    )]
    Unhealthy {
        /// The target that was probed.
        target: String,
        /// The probed path.
        path: String,
        /// Probes sent.
        probes: u32,
        /// Consecutive passes at the end.
        passes: u32,
        /// Consecutive passes needed.
        needed: u32,
        /// How long the gate ran.
        waited_ms: u64,
        /// The last probe's failure.
        last: String,
    },
}

impl Error {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// A proxy: the routing table, the upstream client and the control operations. Cheap to clone
/// (all clones are the same proxy). Requests are served by [`Proxy::serve`]; the control
/// operations ([`Proxy::deploy`] and friends) can also be called in process.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<switch::Shared>,
}

impl Proxy {
    /// Builds a proxy and restores its routing table from `config.state_file` (a missing file
    /// is an empty table). Must be called inside a tokio runtime.
    pub fn new(config: ProxyConfig) -> Result<Proxy, Error> {
        let (table, bakes) = state::restore(&config.state_file)?;
        let n = table.len();
        if n > 0 {
            log::line(format_args!(
                "restored {n} service(s) from {}",
                config.state_file.display()
            ));
        }
        Ok(Proxy {
            inner: Arc::new(switch::Shared::new(config, table, bakes)),
        })
    }

    /// Gates `target` with `health_path`, swaps the service's target to it, drains the old
    /// target and reports. Creates the service if it does not exist. On a failed gate nothing
    /// is changed and [`Error::Unhealthy`] is returned.
    pub async fn deploy(
        &self,
        service: &str,
        target: &str,
        health_path: &str,
        domains: &[String],
        opts: &DeployOptions,
    ) -> Result<DeployReport, Error> {
        self.inner.bakes.supersede(service);
        switch::deploy(&self.inner, service, target, health_path, domains, opts).await
    }

    /// Holds new requests for `service` until [`Proxy::resume`] or until each has waited `hold`
    /// (default [`ProxyConfig::hold`]), after which it gets a 503; then waits up to `drain`
    /// (default 30 s) for the requests already in flight on the current target to finish, so
    /// that the caller may stop that target once `drained` is reported.
    pub async fn pause(
        &self,
        service: &str,
        hold: Option<Duration>,
        drain: Option<Duration>,
    ) -> Result<PauseReport, Error> {
        switch::pause(&self.inner, service, hold, drain).await
    }

    /// Releases held requests for `service` to its then-current target; returns how many
    /// requests were held at that moment.
    pub async fn resume(&self, service: &str) -> Result<usize, Error> {
        switch::resume(&self.inner, service)
    }

    /// Removes a service (its held requests get a 404).
    pub async fn remove(&self, service: &str) -> Result<(), Error> {
        self.inner.bakes.supersede(service);
        switch::remove(&self.inner, service).await
    }

    /// Gates `req.deploy.target`, then sends `req.percent` of the service's new requests to
    /// it; the next [`Proxy::deploy`] promotes it (same target) or ends it (any other).
    pub async fn canary(&self, req: &CanaryRequest) -> Result<CanaryReport, Error> {
        self.inner.bakes.supersede(&req.deploy.service);
        canary::canary(&self.inner, req).await
    }

    /// Starts a bake of the service's current target or canary (see [`BakeRequest`]): the
    /// proxy judges it by its own counts and probes, swaps back to the fallback on its own if
    /// a limit is crossed, and keeps the verdict (in [`Proxy::stats`], [`Proxy::status`] and
    /// the state file). Answers at once.
    pub async fn bake(&self, req: BakeRequest) -> Result<BakeStatus, Error> {
        bake::start(&self.inner, req).await
    }

    /// `tls = "acme"`: orders new certificates for `domains` (none: every routed domain) at
    /// the ACME task's next round, whatever their renewal time; answers at once with the
    /// domains. A domain this proxy does not route, or a proxy whose certificates are not
    /// from ACME, is an error and asks for nothing.
    pub fn renew(&self, domains: Vec<String>) -> Result<Vec<String>, Error> {
        if !matches!(self.inner.config.tls, TlsMode::Acme(_)) {
            return Err(Error::Invalid(
                "this proxy's certificates are not from ACME (tls is not \"acme\"): there is nothing to renew".into(),
            ));
        }
        let routed = self.inner.table.domains();
        let domains = if domains.is_empty() {
            if routed.is_empty() {
                return Err(Error::Invalid(
                    "this proxy routes no domain: there is nothing to renew".into(),
                ));
            }
            routed.into_iter().collect()
        } else {
            let mut want: Vec<String> = domains.iter().map(|d| d.to_ascii_lowercase()).collect();
            want.sort();
            want.dedup();
            if let Some(d) = want.iter().find(|d| !routed.contains(*d)) {
                return Err(Error::Invalid(format!(
                    "{d} is not a domain this proxy routes"
                )));
            }
            want
        };
        self.inner.certs.ask_renewal(&domains);
        Ok(domains)
    }

    /// Cumulative per-target counts of `service`.
    pub fn stats(&self, service: &str) -> Result<StatsReport, Error> {
        canary::stats(&self.inner, service)
    }

    /// Services, targets, pause state and counters.
    pub fn status(&self) -> StatusReport {
        switch::status(&self.inner)
    }

    /// Serves HTTP on `listener` and the control protocol on `control` until `shutdown`
    /// completes; then stops accepting, lets open connections finish (up to 10 s), and
    /// removes the control socket file if it is still the one this proxy listened on.
    /// `control` must be listening at `config.control_socket` (see [`bind_control`]); its
    /// file's owner is taken as the proxy's own uid for the access check.
    pub async fn serve(
        &self,
        listener: TcpListener,
        control: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        self.serve_with_tls(listener, None, control, shutdown).await
    }

    /// [`Proxy::serve`], and TLS on `tls_listener` when `config.tls` is not off (it must then
    /// be given: it is where `listen_tls` was bound).
    pub async fn serve_with_tls(
        &self,
        listener: TcpListener,
        tls_listener: Option<TcpListener>,
        control: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let tls = self.start_tls(tls_listener, &stop_rx)?;
        let http = tokio::spawn(workers::serve_http(
            self.inner.clone(),
            listener,
            stop_rx.clone(),
            None,
        ));
        let http = join_both(http, tls);
        self.serve_rest(http, stop_tx, stop_rx, control, shutdown)
            .await
    }

    /// Loads the certificates (`files`) or starts obtaining them (`acme`), and serves TLS on
    /// `listener` until `stop`. Nothing when TLS is off.
    fn start_tls(
        &self,
        listener: Option<TcpListener>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
        let shared = &self.inner;
        let acme = match &shared.config.tls {
            TlsMode::Off => return Ok(None),
            TlsMode::Files { cert, key } => {
                tls::load_files(&shared.certs, cert, key).map_err(Error::Tls)?;
                tokio::spawn(tls::watch_files(
                    shared.clone(),
                    cert.clone(),
                    key.clone(),
                    stop.clone(),
                ));
                false
            }
            TlsMode::Acme(a) => {
                acme::restore(&shared.certs, a).map_err(Error::Tls)?;
                tokio::spawn(acme::run(shared.clone(), a.clone(), stop.clone()));
                true
            }
        };
        let listener = listener.ok_or_else(|| {
            Error::Tls("TLS is on but no listener was given for listen_tls".into())
        })?;
        let tls = Arc::new(tls::Tls::new(shared.certs.clone(), acme).map_err(Error::Tls)?);
        log::line(format_args!(
            "serving TLS on {} ({}), HTTP/2 and HTTP/1.1",
            shared.config.listen_tls,
            if acme {
                "ACME certificates"
            } else {
                "certificate files"
            }
        ));
        Ok(Some(tokio::spawn(workers::serve_http(
            shared.clone(),
            listener,
            stop.clone(),
            Some(tls),
        ))))
    }

    /// The rest of [`Proxy::serve`] once HTTP is being served: the control socket, then
    /// shutdown and the grace period.
    async fn serve_rest(
        &self,
        http: tokio::task::JoinHandle<()>,
        stop_tx: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
        control: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let config = &self.inner.config;
        let socket = control::prepare_socket(&config.control_socket)?;
        let ctl = tokio::spawn(control::serve_control(
            self.clone(),
            control,
            socket.owner_uid,
            stop_rx,
        ));
        log::line(format_args!(
            "listening on {}, control socket {}, state {}",
            config.listen,
            config.control_socket.display(),
            config.state_file.display()
        ));
        if !config.trusted_proxies.is_empty() {
            let ranges: Vec<String> = config
                .trusted_proxies
                .iter()
                .map(|(net, prefix)| format!("{net}/{prefix}"))
                .collect();
            let via = match config.trusted_proxies_header {
                RelayHeader::XForwardedFor => "X-Forwarded-For, -Proto and -Host",
                RelayHeader::Forwarded => "Forwarded",
            };
            log::line(format_args!(
                "forwarding headers kept from trusted proxies: {} (read from {via})",
                ranges.join(", ")
            ));
        }
        shutdown.await;
        log::line("shutting down: no new connections");
        self.inner.set_closing();
        let _ = stop_tx.send(true);
        let grace = async {
            let _ = http.await;
            let _ = ctl.await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, grace).await.is_err() {
            log::line("shutdown: some connections were still open after the grace period");
        }
        socket.remove_if_ours();
        Ok(())
    }
}

/// Restores state from `config.state_file`, then serves on the given listeners until
/// `shutdown` completes. The listeners are injected so that tests can bind port 0 and so that
/// a supervisor can hand over sockets; see [`bind_control`] for creating the control socket.
pub async fn serve(
    config: ProxyConfig,
    listener: TcpListener,
    control: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    Proxy::new(config)?.serve(listener, control, shutdown).await
}

/// [`serve`] with TLS on `tls_listener` (see [`Proxy::serve_with_tls`]).
pub async fn serve_with_tls(
    config: ProxyConfig,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    control: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    Proxy::new(config)?
        .serve_with_tls(listener, tls_listener, control, shutdown)
        .await
}

/// One task that ends when both do (plain HTTP, and TLS when it is served).
fn join_both(
    http: tokio::task::JoinHandle<()>,
    tls: Option<tokio::task::JoinHandle<()>>,
) -> tokio::task::JoinHandle<()> {
    match tls {
        None => http,
        Some(tls) => tokio::spawn(async move {
            let _ = http.await;
            let _ = tls.await;
        }),
    }
}

/// Builds a runtime, binds `config.listen` and the control socket, restores state and serves
/// until SIGTERM or SIGINT. This is `cutover proxy run`.
pub fn run_blocking(config: ProxyConfig) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("cutover-proxy")
        .build()
        .map_err(|e| Error::io("cannot build the tokio runtime", e))?;
    rt.block_on(async move {
        // Signals first (so that a SIGTERM that arrives once we answer is never fatal), then
        // state: a state file that cannot be used stops us before we bind anything.
        let shutdown = termination()?;
        let proxy = Proxy::new(config.clone())?;
        let listener = bind_shared(config.listen)?;
        let tls_listener = match config.tls {
            TlsMode::Off => None,
            _ => Some(bind_shared(config.listen_tls)?),
        };
        // Serve HTTP at once. If a predecessor (an older binary being upgraded) still holds
        // the control socket, both accept on the shared port while it is asked to stop; it
        // stops accepting, drains its in-flight requests and exits, and this proxy takes the
        // control socket over. Requests are never refused in between.
        let (stop_tx, stop_rx) = watch::channel(false);
        let tls = proxy.start_tls(tls_listener, &stop_rx)?;
        let http = tokio::spawn(workers::serve_http(
            proxy.inner.clone(),
            listener,
            stop_rx.clone(),
            None,
        ));
        let http = join_both(http, tls);
        let control = take_over_control(&config.control_socket).await?;
        proxy
            .serve_rest(http, stop_tx, stop_rx, control, shutdown)
            .await
    })
}

/// Binds the HTTP port with SO_REUSEPORT, so that a successor can bind it while this proxy
/// still serves (the binary upgrade hand-over).
fn bind_shared(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| Error::io("cannot create the listening socket", e))?;
    let bind = socket
        .set_reuseaddr(true)
        .and_then(|()| socket.set_reuseport(true))
        .and_then(|()| socket.bind(addr));
    bind.map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
    socket
        .listen(1024)
        .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))
}

/// Binds the control socket; if a live predecessor holds it, asks that process to stop
/// (SIGTERM, after asking it for its pid) and waits up to 60 s for the socket to be free.
async fn take_over_control(path: &Path) -> Result<UnixListener, Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut asked = false;
    loop {
        match bind_control(path) {
            Ok(l) => return Ok(l),
            Err(e) => {
                let pid = match control_request(path, &Request::Status).await {
                    Ok(Response::Status(s)) => Some(s.pid),
                    _ => None,
                };
                match pid {
                    Some(pid) if pid != std::process::id() => {
                        if !asked {
                            log::line(format_args!(
                                "taking over from proxy pid {pid}: asking it to drain and stop"
                            ));
                            let _ = std::process::Command::new("kill")
                                .arg("-TERM")
                                .arg(pid.to_string())
                                .status();
                            asked = true;
                        }
                    }
                    _ if asked => {}
                    _ => return Err(e),
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Registers SIGTERM and SIGINT handlers now; the future completes on either.
fn termination() -> Result<impl Future<Output = ()>, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("cannot watch SIGTERM", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("cannot watch SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::line("SIGTERM"),
            _ = int.recv() => log::line("SIGINT"),
        }
    })
}

/// The state file's directory, for error messages and temp files.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

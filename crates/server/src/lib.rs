//! `cutover serve`: one process that serves the panel (server-rendered HTML, `pages`), the
//! JSON API (`api`) and runs deploys and rollbacks as background jobs (`jobs`), over the same
//! store and the same engine entry point (`cutover_engine::run`) as the CLI.
//!
//! * [`AppState`] is everything a handler needs: the data directory, the store, the apps
//!   (loaded by the binary from `--apps DIR` and `-c FILE`), whether cookies are `Secure`, and
//!   the job runner.
//! * [`serve`] takes a bound listener and a shutdown future (tests bind port 0).
//! * [`auth`] owns who is asking: Bearer tokens and session cookies, roles and app scopes,
//!   CSRF, logins with per-(user, address) lockout. Secrets are stored only as hashes.
//! * [`error::ApiError`] is the one error: JSON `{"error": ...}` with its status.
//!
//! **Invariants:** a deploy or rollback never runs inside an HTTP request (a job runs it on a
//! worker thread with `cutover_engine::run`); one run per app at a time; every response
//! carries the security headers (CSP without inline scripts, `frame-ancestors 'none'`,
//! `nosniff`, `same-origin` referrers); nothing listens but the one listener it is given.

pub mod api;
pub mod auth;
pub mod error;
pub mod hooks;
pub mod jobs;
mod memory;
mod pages;
pub mod previews;
pub mod secret;
mod sse;

use axum::http::{header, HeaderValue};
use axum::Router;
use cutover_core::Config;
use cutover_store::Store;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use error::ApiError;

/// What `cutover serve` runs with.
pub struct Options {
    /// The data directory: `cutover.db` and the artifact store.
    pub data: PathBuf,
    /// The PostgreSQL database (`--database`); `None`: SQLite in the data directory.
    pub database: Option<cutover_store::DatabaseUrl>,
    /// The apps, loaded and validated by the binary.
    pub apps: Vec<Config>,
    /// The URL people reach the server at; `https://` makes the session cookie `Secure`.
    pub public_url: Option<String>,
}

/// Everything a handler needs, shared as one `Arc<AppState>`.
pub struct AppState {
    pub data: PathBuf,
    pub database: Option<cutover_store::DatabaseUrl>,
    pub store: Store,
    pub apps: BTreeMap<String, Arc<Config>>,
    pub public_url: Option<String>,
    /// Cookies get `Secure` (the public URL is https).
    pub secure: bool,
    pub jobs: jobs::Runner,
    /// Webhook pushes waiting for the app's run to end.
    pub hooks: hooks::Queue,
}

impl AppState {
    /// Opens the store and reconciles the jobs a previous server died in (they are marked
    /// interrupted, never re-run).
    pub fn new(opts: Options) -> Result<Arc<AppState>, String> {
        memory::return_large_blocks();
        let store = cutover_engine::open_database(&opts.data, opts.database.as_ref())?;
        let mut apps = BTreeMap::new();
        for c in opts.apps {
            if let Some(other) = apps.get(&c.app).map(|o: &Arc<Config>| o.file.clone()) {
                return Err(format!(
                    "app `{}` is configured twice: {} and {}",
                    c.app,
                    other.display(),
                    c.file.display()
                ));
            }
            apps.insert(c.app.clone(), Arc::new(c));
        }
        let secure = opts
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
        jobs::reconcile(&store).map_err(|e| e.to_string())?;
        Ok(Arc::new(AppState {
            data: opts.data,
            database: opts.database,
            store,
            apps,
            public_url: opts.public_url,
            secure,
            jobs: jobs::Runner::default(),
            hooks: hooks::Queue::default(),
        }))
    }

    /// The app's config, or 404.
    pub fn app(&self, name: &str) -> Result<&Arc<Config>, ApiError> {
        self.apps
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("no app `{name}` on this server")))
    }
}

/// The whole router: the API, the panel's pages, the security headers.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(api::router())
        .merge(hooks::router())
        .merge(pages::router())
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// Serves until `shutdown` resolves. The client's address (for lockout and audit) is the
/// TCP peer's.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // A third of the lease: a dead server's run is reconciled soon after its lease ends.
    let every = (Store::lease() / 3).max(std::time::Duration::from_secs(1));
    jobs::start_sweeper(&state, every);
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

const CSP: &str = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

//! The command line, as close to what the user types as possible. Parsing only: nothing here
//! does work.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "cutover",
    version,
    about = "Zero-downtime deploys and one-click rollback for self-hosted apps, over SSH"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct Common {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "cutover.toml",
        global = true
    )]
    pub(crate) config: PathBuf,
    /// Where the history database and the artifact store live.
    #[arg(long = "data", env = "CUTOVER_DATA", global = true)]
    pub(crate) data: Option<PathBuf>,
    /// Keep the history in this PostgreSQL database (postgres://USER:PASSWORD@HOST/DB)
    /// instead of SQLite in the data directory.
    #[arg(long = "database", env = "CUTOVER_DATABASE", global = true)]
    pub(crate) database: Option<cutover_store::DatabaseUrl>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Stage a new release on every host, switch atomically, verify, and switch back if unhealthy.
    Deploy {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        through: Through,
        /// A directory or a .tar.gz to deploy (default: [files] source).
        #[arg(long, conflicts_with = "git_ref")]
        artifact: Option<PathBuf>,
        /// Build and deploy this git revision ([build] in the config): a branch, a tag, a full
        /// or short SHA, `origin/main`, `HEAD~1`, ... It is resolved to a full commit first.
        #[arg(long = "ref", value_name = "REF")]
        git_ref: Option<String>,
        /// The image version to deploy (container apps): a tag of [container] image, or
        /// @sha256:DIGEST. It is pulled on every host and recorded by digest.
        #[arg(long, conflicts_with_all = ["artifact", "git_ref"])]
        image: Option<String>,
        /// Print one JSON document on stdout instead of progress.
        #[arg(long)]
        json: bool,
        /// Print one JSON object per line on stdout as each step starts and ends, the last
        /// line being the outcome `--json` prints.
        #[arg(long, conflicts_with = "json")]
        events: bool,
    },
    /// Go back to the newest earlier release that succeeded everywhere (or --to ID), verified.
    Rollback {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        through: Through,
        /// The release id (or its last 7+ characters) to roll back to.
        #[arg(long = "to")]
        to: Option<String>,
        #[arg(long)]
        json: bool,
        /// One JSON object per line on stdout as each step starts and ends (see deploy).
        #[arg(long, conflicts_with = "json")]
        events: bool,
    },
    /// Releases, newest first.
    History {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        through: Through,
        #[arg(long)]
        json: bool,
    },
    /// The commits and files that changed between two releases built from git.
    Diff {
        #[command(flatten)]
        common: Common,
        /// The older release: an id or its last 7+ characters (default: the release before TO).
        from: Option<String>,
        /// The newer release: an id or its last 7+ characters (default: the live release).
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// What every host serves right now, read from the hosts.
    Status {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        through: Through,
        #[arg(long)]
        json: bool,
    },
    /// Is the config valid, and is every host reachable, trusted and ready?
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// A pull request's own copy of the app, `<app>-pr-<n>` at pr-<n>-<app>.<domain> ([preview]).
    Preview {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: PreviewCommand,
    },
    /// Install or upgrade the edge proxy on every host of a container app and on the preview
    /// hosts ([preview]; a files app's previews are served by it). Harmless to re-run.
    Setup {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// New certificates now for the app's domain on every host ([proxy] tls = "acme"),
    /// whatever their renewal time (a certificate the CA revoked, a key that may have leaked);
    /// waits for each host's outcome. The old certificate serves until the new one is in.
    Renew {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// The edge proxy on this host, and its local control client.
    Proxy {
        #[command(subcommand)]
        command: ProxyCommand,
    },
    /// A self-contained demo on this machine: v1, v2, a broken v3 rolled back automatically,
    /// and a rollback. No SSH, no setup.
    Demo {
        /// Keep the demo's directory and print where it is.
        #[arg(long)]
        keep: bool,
        /// Then serve the demo's panel on 127.0.0.1 with a one-time login (user `demo`, a
        /// generated password printed once) until Ctrl-C.
        #[arg(long)]
        panel: bool,
    },
    /// The server and panel: the JSON API, the pages and background deploys, over the same
    /// history as the CLI.
    Serve(ServeArgs),
    /// The server's users: who may log in to the panel, with which role.
    User {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// The server's API tokens (for `--server` and scripts).
    Token {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The history's database: move an SQLite history into PostgreSQL.
    Db {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Copy an SQLite history (releases, runs, events, users, tokens, audit, webhooks,
    /// previews) into an empty PostgreSQL database, in one transaction.
    Copy {
        /// The SQLite database: a `cutover.db` file, or a data directory holding one
        /// (default: the data directory's).
        #[arg(long, value_name = "PATH")]
        from: Option<PathBuf>,
        /// The PostgreSQL database (postgres://USER:PASSWORD@HOST/DB, with `?sslmode=...`
        /// as for --database); it must hold no rows.
        #[arg(long, value_name = "URL")]
        to: cutover_store::DatabaseUrl,
    },
}

/// Run deploy, rollback, history or status through a `cutover serve` instead of over SSH.
#[derive(Debug, Args, Clone)]
pub(crate) struct Through {
    /// The server's URL (e.g. http://127.0.0.1:7070); the token is read from CUTOVER_TOKEN.
    #[arg(long, value_name = "URL")]
    pub(crate) server: Option<String>,
    /// The app on the server (default: the `app` of the config file).
    #[arg(long, requires = "server")]
    pub(crate) app: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PreviewCommand {
    /// Build REF (or take --image) and deploy it as pull request N's preview, through the
    /// same protocol as any deploy (gate, revert, its own history).
    Deploy {
        #[command(flatten)]
        through: Through,
        /// The pull request number.
        #[arg(long)]
        pr: u64,
        /// The git revision to build ([build] in the config), resolved to a full commit.
        #[arg(long = "ref", value_name = "REF")]
        git_ref: Option<String>,
        /// Container apps: an image version (a tag of [container] image, or @sha256:DIGEST).
        #[arg(long, conflicts_with = "git_ref")]
        image: Option<String>,
        #[arg(long)]
        json: bool,
        /// One JSON object per line on stdout as each step starts and ends (see deploy).
        #[arg(long, conflicts_with = "json")]
        events: bool,
    },
    /// The app's open previews (with --all, the removed ones too).
    List {
        #[command(flatten)]
        through: Through,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Tear pull request N's preview down on every preview host (proxy route, containers,
    /// directories); its history is kept.
    Remove {
        #[command(flatten)]
        through: Through,
        /// The pull request number.
        #[arg(long)]
        pr: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Where to listen. Loopback by default: anything else is a decision.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub(crate) listen: String,
    /// Every *.toml in this directory is an app (default: <data>/apps).
    #[arg(long)]
    pub(crate) apps: Option<PathBuf>,
    /// An app's config file (repeatable).
    #[arg(short = 'c', long = "config")]
    pub(crate) configs: Vec<PathBuf>,
    #[arg(long = "data", env = "CUTOVER_DATA")]
    pub(crate) data: Option<PathBuf>,
    /// Keep the history in this PostgreSQL database (postgres://USER:PASSWORD@HOST/DB), which
    /// several servers may share, instead of SQLite in the data directory.
    #[arg(long = "database", env = "CUTOVER_DATABASE")]
    pub(crate) database: Option<cutover_store::DatabaseUrl>,
    /// The URL people reach the server at; https:// makes the session cookie Secure.
    #[arg(long)]
    pub(crate) public_url: Option<String>,
    /// How often previews are reconciled with the hosts (expired by ttl, orphans removed,
    /// interrupted deploys finished); also once at start.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub(crate) preview_check: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum RoleArg {
    Viewer,
    Deployer,
    Admin,
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Add a user; a password is generated and printed once unless --password-stdin.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Users and their roles.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a user (their sessions end).
    Remove { name: String },
    /// Set a new password (generated and printed once unless --password-stdin); sessions end.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create an API token; it is printed once, on stdout.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Scope the token to this app (repeatable; default: every app).
        #[arg(long = "app")]
        apps: Vec<String>,
        /// How long it is valid, e.g. 90d or 12h (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Tokens, their roles, scopes, expiry and last use (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it stops working at once.
    Revoke { name: String },
}

/// `cutover proxy ...`. `--dir` holds the control socket `proxy.sock` and the state file
/// `proxy-state.json` (`cutover setup` uses [proxy] install_dir).
#[derive(Debug, Subcommand)]
pub(crate) enum ProxyCommand {
    /// Run the edge proxy in the foreground.
    Run {
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: String,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        /// Longest a request is held while its service is paused.
        #[arg(long, default_value = "30s")]
        hold: String,
        /// Limits against hostile clients, `KEY=VALUE,...` with the `[proxy]` limit keys
        /// (header_timeout, idle_timeout, max_header_bytes, max_headers, max_connections,
        /// upstream_connect_timeout, upstream_header_timeout, body_timeout,
        /// upstream_body_timeout, send_timeout, max_body_bytes); keys left out keep their
        /// defaults.
        #[arg(long, default_value = "")]
        limits: String,
        /// HTTPS: off, files (--cert and --key) or acme.
        #[arg(long, default_value = "off")]
        tls: String,
        /// Where TLS is served.
        #[arg(long, default_value = "0.0.0.0:443")]
        listen_tls: String,
        /// tls = files: the certificate chain (PEM), leaf first.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// tls = files: the private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// tls = acme: the ACME directory URL.
        #[arg(long, default_value = cutover_proxy::LETS_ENCRYPT)]
        acme_directory: String,
        /// tls = acme: the account's contact address.
        #[arg(long)]
        acme_email: Option<String>,
        /// tls = acme: the only roots trusted for the ACME directory (PEM).
        #[arg(long)]
        acme_ca_file: Option<PathBuf>,
        /// tls = acme: the other hosts' proxies (`host:port` of their plain listener,
        /// comma-separated), asked for an HTTP-01 answer this proxy does not have.
        #[arg(long, default_value = "")]
        acme_peers: String,
        /// Answer plain HTTP with a 308 to https (but ACME's HTTP-01 path).
        #[arg(long)]
        redirect_http: bool,
        /// Proxies in front (load balancers, CDNs) whose X-Forwarded-For (appended to),
        /// -Proto and -Host are kept: addresses or ranges, `10.0.0.0/8,192.0.2.7`.
        #[arg(long, default_value = "")]
        trusted_proxies: String,
        /// Where the trusted proxies say whom they relay: `x-forwarded-for` (X-Forwarded-For,
        /// -Proto, -Host) or `forwarded` (RFC 7239); the other is replaced as anyone's.
        #[arg(long, default_value = "x-forwarded-for", value_parser = ["x-forwarded-for", "forwarded"])]
        trusted_proxies_header: String,
    },
    /// Gate TARGET, then switch SERVICE to it and drain the old target.
    Deploy {
        service: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value = "/up")]
        health: String,
        /// Host names routed to the service (repeatable).
        #[arg(long)]
        domain: Vec<String>,
        #[arg(long, default_value = "30s")]
        drain: String,
        #[arg(long, default_value = "500ms")]
        interval: String,
        #[arg(long, default_value_t = 2)]
        healthy_after: u32,
        #[arg(long, default_value = "30s")]
        give_up: String,
        #[arg(long, default_value = "2s")]
        timeout: String,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Hold new requests for SERVICE (up to --hold each).
    Pause {
        service: String,
        #[arg(long)]
        hold: Option<String>,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Release held requests to SERVICE's current target.
    Resume {
        service: String,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Forget SERVICE.
    Remove {
        service: String,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Services, targets and counters.
    Status {
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// tls = acme: order new certificates for these domains now (none: every routed domain);
    /// answers at once, `status` shows the outcome.
    Renew {
        domains: Vec<String>,
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Forward one JSON control request from stdin and print the JSON answer (what cutover
    /// sends over SSH).
    Request {
        #[arg(long, default_value = "/usr/local/lib/cutover")]
        dir: PathBuf,
    },
}

//! `cutover.toml`: the raw serde model (`deny_unknown_fields`) and its validation into
//! [`Config`]. Every error names the file, the key and what is expected, and is raised before
//! any host is touched.

use crate::duration::parse_duration;
use crate::host::Destination;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config problem: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: `{}`: {}",
                self.file.display(),
                self.key,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    app: String,
    hosts: Vec<String>,
    #[serde(default)]
    ssh: RawSsh,
    files: Option<RawFiles>,
    container: Option<crate::container::RawContainer>,
    proxy: Option<crate::container::RawProxy>,
    health: Option<RawHealth>,
    build: Option<RawBuild>,
    deploy: Option<RawDeploy>,
    webhook: Option<crate::webhook::RawWebhook>,
    preview: Option<crate::preview::RawPreview>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    batches: Option<Vec<toml::Value>>,
    bake: Option<String>,
    max_error_rate: Option<toml::Value>,
    max_p99: Option<String>,
    canary: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    repo: Option<String>,
    command: Option<String>,
    output: Option<String>,
    dockerfile: Option<String>,
    context: Option<String>,
    timeout: Option<String>,
    env: Option<BTreeMap<String, String>>,
    pass_env: Option<Vec<String>>,
    cache: Option<bool>,
    token_env: Option<String>,
    token_user: Option<String>,
    ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    config: Option<String>,
    known_hosts: Option<String>,
    identity: Option<String>,
    parallel: Option<i64>,
    connect_timeout: Option<String>,
    step_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    source: Option<String>,
    root: String,
    reload: Option<String>,
    keep: Option<i64>,
    max_unpacked_bytes: Option<i64>,
    max_entries: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    url: Option<String>,
    path: Option<String>,
    expect: Option<i64>,
    timeout: Option<String>,
    interval: Option<String>,
    healthy_after: Option<i64>,
    give_up_after: Option<String>,
}

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (messages name it).
    pub file: PathBuf,
    pub app: String,
    /// Hosts in config order, as written (the name used in history and messages).
    pub hosts: Vec<(String, Destination)>,
    pub ssh: SshConfig,
    /// What kind of app this is, with the settings only that kind has.
    pub kind: AppKind,
    pub health: HealthConfig,
    /// `[build]`: releases built from git commits (`deploy --ref`).
    pub build: Option<BuildConfig>,
    /// `[deploy]`: how hosts are rolled out.
    pub deploy: DeployConfig,
    /// `[webhook]`: pushes from a forge deploy the pushed commit (`cutover serve`).
    pub webhook: Option<crate::webhook::WebhookConfig>,
    /// `[preview]`: a pull request's own copy of the app ([`Config::preview`]).
    pub preview: Option<crate::preview::PreviewConfig>,
}

/// `[deploy]`: how a run rolls out over the hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeployConfig {
    /// Host groups that switch and gate one after the other, each size the number of hosts
    /// switched once that batch is done (`[1, "25%", "100%"]`). Empty: every host at once.
    pub batches: Vec<crate::protocol::BatchSize>,
    /// After each batch's gate, how long its hosts are watched before the next batch (0: no
    /// bake).
    pub bake: Duration,
    /// The share of failed requests (5xx or unanswered) of the new release during a bake
    /// that fails it, when it is also above the old release's share; in parts per million.
    pub max_error_rate_ppm: u32,
    /// A bake fails when the new release's 99th-percentile latency is above this.
    pub max_p99: Option<Duration>,
    /// Container apps (blue-green): the percentage of new requests the new release gets
    /// during its bake (1..=99); it gets them all after.
    pub canary: Option<u8>,
}

impl DeployConfig {
    /// `max_error_rate` as a share (0.01 = 1%).
    pub fn max_error_rate(&self) -> f64 {
        f64::from(self.max_error_rate_ppm) / 1e6
    }
}

/// `[deploy]`, validated against the number of hosts; `Err` names the key.
fn parse_deploy(
    raw: Option<&RawDeploy>,
    hosts: usize,
) -> Result<DeployConfig, (&'static str, String)> {
    let bake = match raw.and_then(|d| d.bake.as_deref()) {
        None => Duration::ZERO,
        Some(b) => parse_duration(b).map_err(|m| ("deploy.bake", m))?,
    };
    let rate = match raw.and_then(|d| d.max_error_rate.as_ref()) {
        None => 0.01,
        Some(toml::Value::Float(f)) if (0.0..=1.0).contains(f) => *f,
        Some(toml::Value::Integer(i)) if (0..=1).contains(i) => *i as f64,
        Some(v) => {
            return Err((
                "deploy.max_error_rate",
                format!("expected a share from 0 to 1 (0.01 = 1% of probes may fail), got {v}"),
            ))
        }
    };
    let max_p99 = match raw.and_then(|d| d.max_p99.as_deref()) {
        None => None,
        Some(t) => match parse_duration(t) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                return Err((
                    "deploy.max_p99",
                    "expected a duration above 0, e.g. \"500ms\"".into(),
                ))
            }
            Err(m) => return Err(("deploy.max_p99", m)),
        },
    };
    let canary = match raw.and_then(|d| d.canary.as_ref()) {
        None => None,
        Some(toml::Value::Integer(n)) if (1..=99).contains(n) => Some(*n as u8),
        Some(v) => {
            return Err((
                "deploy.canary",
                format!("expected the percentage of requests the new release gets during its bake, 1 to 99, got {v}"),
            ))
        }
    };
    if canary.is_some() && bake.is_zero() {
        return Err((
            "deploy.canary",
            "a canary needs a `bake` (the time it runs before the new release gets every request)"
                .into(),
        ));
    }
    let batches = raw.and_then(|d| d.batches.as_deref());
    Ok(DeployConfig {
        batches: parse_batches(batches, hosts).map_err(|m| ("deploy.batches", m))?,
        bake,
        max_error_rate_ppm: (rate * 1e6).round() as u32,
        max_p99,
        canary,
    })
}

/// `[deploy] batches`: counts (`1`) and percentages (`"25%"`) of the hosts switched once each
/// batch is done, growing, the last one covering every host.
fn parse_batches(
    raw: Option<&[toml::Value]>,
    hosts: usize,
) -> Result<Vec<crate::protocol::BatchSize>, String> {
    use crate::protocol::BatchSize;
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let expected = "expected a list of host counts and percentages that grow and end with every host, e.g. [1, \"25%\", \"100%\"]";
    let mut out = Vec::new();
    let mut last = 0;
    for v in raw {
        let b = match v {
            toml::Value::Integer(n) if *n >= 1 => BatchSize::Count(*n as usize),
            toml::Value::String(t) => match t.strip_suffix('%').map(str::parse::<u8>) {
                Some(Ok(p)) if (1..=100).contains(&p) => BatchSize::Percent(p),
                _ => return Err(format!("{expected}; got {t:?}")),
            },
            other => return Err(format!("{expected}; got {other}")),
        };
        let upto = match b {
            BatchSize::Count(c) => c.min(hosts),
            BatchSize::Percent(p) => (hosts * p as usize).div_ceil(100),
        };
        if upto <= last && !out.is_empty() {
            return Err(format!(
                "{expected}; {v} does not add a host to the batches before it ({hosts} hosts)"
            ));
        }
        last = upto;
        out.push(b);
    }
    if last < hosts {
        return Err(format!(
            "{expected}; the last batch covers {last} of the {hosts} hosts"
        ));
    }
    Ok(out)
}

/// The two kinds of app: files switched by a symlink, containers switched by the edge proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppKind {
    /// `[files]`: `health.url` is fetched as each host sees it.
    Files(FilesConfig),
    /// `[container]` + `[proxy]`: `health.url` is the health path fetched through the host's
    /// edge proxy (the post-switch verification).
    Container(ContainerApp),
}

impl Config {
    /// The files app's settings; `None` for a container app.
    pub fn files(&self) -> Option<&FilesConfig> {
        match &self.kind {
            AppKind::Files(f) => Some(f),
            AppKind::Container(_) => None,
        }
    }

    /// The container app's settings; `None` for a files app.
    pub fn container(&self) -> Option<&ContainerApp> {
        match &self.kind {
            AppKind::Container(c) => Some(c),
            AppKind::Files(_) => None,
        }
    }

    /// The directory on every host that holds the app's lock and bookkeeping: a files app's
    /// `root`, a container app's `<install_dir>/apps/<app>`.
    pub fn state_dir(&self) -> &str {
        match &self.kind {
            AppKind::Files(f) => &f.root,
            AppKind::Container(c) => &c.state_dir,
        }
    }
}

/// A container app's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerApp {
    /// `<install_dir>/apps/<app>` on each host: the app's lock and bookkeeping.
    pub state_dir: String,
    pub container: crate::container::ContainerConfig,
    pub proxy: crate::container::ProxySettings,
    /// `[health] path`: probed on the container's port before a switch, and through the proxy
    /// after it.
    pub health_path: String,
}

/// `[build]`: where the app's repository is and how a commit becomes a files artifact
/// (`command` + `output`) or, for a container app, an image (`command`, then `docker build`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// An absolute local path (relative ones are resolved against the config file),
    /// `file://`, `ssh://` or scp-like `user@host:path`.
    pub repo: String,
    /// Run with `sh -c` in a clean checkout of the commit; `None`: ship the tree as it is.
    pub command: Option<String>,
    /// The directory the command produces, relative to the checkout (`.` = all of it).
    /// Files apps only (container apps: always `.`, unused).
    pub output: String,
    /// Container apps: the image is built with `docker build` from the checkout.
    pub docker: Option<DockerBuild>,
    pub timeout: Duration,
    /// Variables set for the build (on top of PATH, HOME and LANG).
    pub env: BTreeMap<String, String>,
    /// Names of this process's variables passed through to the build.
    pub pass_env: Vec<String>,
    /// The build is reproducible: the same commit and build config reuse the stored artifact.
    pub cache: bool,
    /// `https://` repositories: the environment variable holding the access token (its
    /// name, never the token; default `CUTOVER_GIT_TOKEN`), sent only when the server asks.
    pub token_env: String,
    /// `https://` repositories: the HTTP Basic username sent with the token.
    pub token_user: String,
    /// `https://` repositories: a PEM file with the only CAs trusted for the server.
    pub ca_file: Option<PathBuf>,
}

/// `[build] dockerfile` and `context` of a container app, both relative to the checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerBuild {
    /// The Dockerfile (`docker build -f`).
    pub dockerfile: String,
    /// The build context directory (`.` = the whole checkout).
    pub context: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    pub config: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    pub parallel: usize,
    pub connect_timeout: Duration,
    /// The longest one remote command on one host may take (default 10 minutes).
    pub step_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    pub source: Option<PathBuf>,
    /// Absolute path on every host.
    pub root: String,
    pub reload: Option<String>,
    pub keep: usize,
    pub max_unpacked_bytes: u64,
    pub max_entries: u64,
    /// The edge proxy that serves the app's previews (`[proxy]`, allowed on a files app only
    /// beside `[preview]`; defaults otherwise). `None` without `[preview]`.
    pub proxy: Option<crate::container::ProxySettings>,
    /// A preview's route: the proxy serves `<root>/current` at this host name as a static
    /// target (set by [`Config::preview`], never by a config file).
    pub route: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub url: HealthUrl,
    pub expect: u16,
    pub timeout: Duration,
    pub interval: Duration,
    pub healthy_after: u32,
    pub give_up_after: Duration,
}

/// An `http://host:port/path` URL, fetched as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl fmt::Display for HealthUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

impl HealthUrl {
    pub fn parse(text: &str) -> Result<HealthUrl, String> {
        let rest = text.strip_prefix("http://").ok_or_else(|| {
            format!("expected an http:// URL as the host sees it, e.g. \"http://127.0.0.1:8080/up\", got {text:?}")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (h, after) = inner.split_once(']').ok_or("unclosed '[' in URL")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port in {text:?}"))?,
                None => 80,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("bad port in {text:?}"))?,
                ),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
        {
            return Err(format!("bad host in {text:?}"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "URL path holds whitespace or control characters: {text:?}"
            ));
        }
        Ok(HealthUrl {
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// `^[a-z][a-z0-9-]{0,39}$`
pub fn valid_app_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 40
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl Config {
    /// Parses and validates `text`, read from `file` (relative paths in `[ssh]` and
    /// `[files] source` are resolved against the file's directory; `~/` against `home`).
    pub fn parse(file: &Path, text: &str, home: Option<&Path>) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let raw = read_raw(text, &err)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> PathBuf {
            if let (Some(rest), Some(h)) = (p.strip_prefix("~/"), home) {
                h.join(rest)
            } else {
                base.join(p)
            }
        };

        let deploy =
            parse_deploy(raw.deploy.as_ref(), raw.hosts.len()).map_err(|(k, m)| err(k, m))?;
        let webhook = match raw.webhook {
            None => None,
            Some(w) => Some(crate::webhook::parse_webhook(w).map_err(|(k, m)| err(&k, m))?),
        };
        check_app_name(&raw.app, &err)?;
        let hosts = parse_hosts(&raw.hosts, &err)?;

        let preview = match raw.preview {
            None => None,
            Some(p) => Some(crate::preview::parse_preview(p, &hosts).map_err(|(k, m)| err(&k, m))?),
        };

        let ssh = parse_ssh(&raw.ssh, &err, &resolve)?;

        if let Some(rc) = raw.container {
            let build = optional_build(raw.build, true, &err, &resolve)?;
            return Self::parse_container(
                file,
                raw.app,
                hosts,
                ssh,
                rc,
                raw.proxy,
                raw.files.is_some(),
                raw.health,
                build,
                deploy,
            )
            .map(|c| Config {
                webhook,
                preview,
                ..c
            });
        }
        let proxy = files_proxy(raw.proxy, preview.is_some(), &err)?;
        let mut files = parse_files(raw.files, &deploy, &err, &resolve)?;
        files.proxy = proxy;
        let health = files_health(raw.health, &err)?;
        let build = optional_build(raw.build, false, &err, &resolve)?;

        Ok(Config {
            deploy: deploy.clone(),
            file: file.to_path_buf(),
            app: raw.app,
            hosts,
            ssh,
            kind: AppKind::Files(files),
            health,
            build,
            webhook,
            preview,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn parse_container(
        file: &Path,
        app: String,
        hosts: Vec<(String, Destination)>,
        ssh: SshConfig,
        rc: crate::container::RawContainer,
        rp: Option<crate::container::RawProxy>,
        has_files: bool,
        h: Option<RawHealth>,
        build: Option<BuildConfig>,
        deploy: DeployConfig,
    ) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        if has_files {
            return Err(err(
                "files",
                "an app is either [files] or [container], not both".into(),
            ));
        }
        let container = crate::container::validate_container(rc).map_err(|(k, m)| err(&k, m))?;
        let proxy = crate::container::validate_proxy(rp.unwrap_or_default())
            .map_err(|(k, m)| err(&k, m))?;
        let h = h.unwrap_or_default();
        if h.url.is_some() {
            return Err(err(
                "health.url",
                "`url` is for files apps; container apps use `path` (on the container's port)"
                    .into(),
            ));
        }
        let path = h.path.clone().unwrap_or_else(|| "/up".into());
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                "health.path",
                format!("expected a path like \"/up\", got {path:?}"),
            ));
        }
        if deploy.canary.is_some() && container.strategy == crate::container::Strategy::Hold {
            return Err(err(
                "deploy.canary",
                "a canary needs the old container running beside the new one: strategy \"blue-green\", not \"hold\"".into(),
            ));
        }
        let listen: std::net::SocketAddr = proxy.listen.parse().expect("validated");
        let url = HealthUrl {
            host: "127.0.0.1".into(),
            port: listen.port(),
            path: path.clone(),
        };
        let health = health_config(&h, url, &err)?;
        Ok(Config {
            deploy: deploy.clone(),
            file: file.to_path_buf(),
            kind: AppKind::Container(ContainerApp {
                state_dir: format!("{}/apps/{app}", proxy.install_dir),
                container,
                proxy,
                health_path: path,
            }),
            app,
            hosts,
            ssh,
            health,
            build,
            webhook: None,
            preview: None,
        })
    }

    /// A stable digest input of everything that shapes a release on the host (recorded in
    /// `.cutover-release.json` as `config_digest` and kept with the release for rollback).
    pub fn release_snapshot(&self) -> String {
        format!(
            "root={}\nreload={}\nhealth={} expect={} healthy_after={}\n",
            self.state_dir(),
            self.files().and_then(|f| f.reload.as_deref()).unwrap_or(""),
            self.health.url,
            self.health.expect,
            self.health.healthy_after
        )
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`: a name a shell can export.
fn valid_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Why a repository URL cannot be used by this build, if it cannot. Plain `http://` would
/// carry the token in clear text and let anyone on the path change what gets deployed; an
/// `https://` URL must not carry credentials (they would be stored and shown with the URL).
fn unsupported_repo(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") {
        return Some(format!("plain http:// is not supported: the token and the code would cross the network unprotected; use https:// or ssh://, got {url:?}"));
    }
    if let Some(rest) = lower.strip_prefix("https://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            // The URL is not repeated: it holds a secret.
            return Some(format!("credentials in the URL are not accepted; remove the part before '@', put the token in an environment variable named by build.token_env (default {DEFAULT_TOKEN_ENV}) and, if the server wants a particular username, set build.token_user"));
        }
        if authority.is_empty() || rest.contains(['?', '#']) {
            return Some(format!(
                "expected https://host/path without a query string or fragment, got {url:?}"
            ));
        }
        return None;
    }
    match lower.split_once("://") {
        Some((scheme, _)) if scheme != "ssh" && scheme != "file" => Some(format!(
            "expected a local path, file://, ssh://, https:// or user@host:path; the {scheme}:// scheme is not supported, got {url:?}"
        )),
        _ => None,
    }
}

/// The token variable's default name (`[build] token_env`).
pub const DEFAULT_TOKEN_ENV: &str = "CUTOVER_GIT_TOKEN";

/// `[build] token_env`, `token_user` and `ca_file`: for `https://` repositories only.
/// The config's text as TOML of the config's shape, with no control character and no value
/// over its bound.
fn read_raw(
    text: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<RawConfig, ConfigError> {
    if let Some(m) = control_character(text) {
        return Err(err("", m));
    }
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e
            .span()
            .map(|s| line_col(text, s.start))
            .map(|(l, c)| format!(" (line {l}, column {c})"))
            .unwrap_or_default();
        err("", format!("{}{span}", parse_message(e.message())))
    })?;
    // The same text parsed again as plain TOML, to bound every string before any
    // validation looks at (or repeats) it.
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        check_sizes("", &table).map_err(|(k, m)| err(&k, m))?;
    }
    Ok(raw)
}

/// `app`: a name fit for paths and container names.
fn check_app_name(app: &str, err: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
    if valid_app_name(app) {
        return Ok(());
    }
    Err(err(
        "app",
        format!(
            "expected a name matching ^[a-z][a-z0-9-]{{0,39}}$ (it is used in paths and container names), got {app:?}"
        ),
    ))
}

/// `[build]`, if the config has one.
fn optional_build(
    b: Option<RawBuild>,
    container: bool,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<Option<BuildConfig>, ConfigError> {
    b.map(|b| parse_build(b, container, err, resolve))
        .transpose()
}

/// A files app's `[proxy]`: only beside `[preview]` (the edge proxy serves its previews, a
/// static target), and then set up with its defaults if the config has none.
fn files_proxy(
    raw: Option<crate::container::RawProxy>,
    has_preview: bool,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<crate::container::ProxySettings>, ConfigError> {
    if !has_preview {
        if raw.is_some() {
            return Err(err(
                "proxy",
                "[proxy] is for container apps (and for the previews of a files app, beside [preview]): add a [container] section, or remove [proxy]"
                    .into(),
            ));
        }
        return Ok(None);
    }
    crate::container::validate_proxy(raw.unwrap_or_default())
        .map(Some)
        .map_err(|(k, m)| err(&k, m))
}

/// `hosts`: at least one, each parsed as a destination, none twice.
fn parse_hosts(
    raw: &[String],
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<(String, Destination)>, ConfigError> {
    if raw.is_empty() {
        return Err(err(
            "hosts",
            "expected at least one host, e.g. [\"web1\"] or [\"local\"]".into(),
        ));
    }
    let mut hosts = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, h) in raw.iter().enumerate() {
        let d = Destination::parse(h).map_err(|m| err(&format!("hosts[{i}]"), m))?;
        if !seen.insert(h.clone()) {
            return Err(err(
                &format!("hosts[{i}]"),
                format!("{h:?} is listed twice"),
            ));
        }
        hosts.push((h.clone(), d));
    }
    Ok(hosts)
}

/// `[ssh]`: paths resolved, parallelism and deadlines bounded.
fn parse_ssh(
    raw: &RawSsh,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<SshConfig, ConfigError> {
    let parallel = match raw.parallel {
        // Measured on 100 hosts (BENCHMARKS.md, *Many hosts*): 32 at once halves the wall
        // time of 16 at the same CPU and memory; more gains nothing.
        None => 32,
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => return Err(err("ssh.parallel", format!("expected 1 to 1024, got {n}"))),
    };
    let connect_timeout = match &raw.connect_timeout {
        None => Duration::from_secs(10),
        Some(s) => parse_duration(s).map_err(|m| err("ssh.connect_timeout", m))?,
    };
    if connect_timeout < Duration::from_secs(1) {
        return Err(err("ssh.connect_timeout", "expected at least 1s".into()));
    }
    let step_timeout = match &raw.step_timeout {
        None => Duration::from_secs(600),
        Some(s) => parse_duration(s).map_err(|m| err("ssh.step_timeout", m))?,
    };
    if step_timeout < Duration::from_secs(1) {
        return Err(err("ssh.step_timeout", "expected at least 1s".into()));
    }
    Ok(SshConfig {
        config: raw.config.as_deref().map(resolve),
        known_hosts: raw.known_hosts.as_deref().map(resolve),
        identity: raw.identity.as_deref().map(resolve),
        parallel,
        connect_timeout,
        step_timeout,
    })
}

/// `[files]` of a files app (a canary is refused: only the proxy can split requests).
fn parse_files(
    raw: Option<RawFiles>,
    deploy: &DeployConfig,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<FilesConfig, ConfigError> {
    let files = raw.ok_or_else(|| {
        err(
            "files",
            "expected a [files] section (source, root, reload, keep)".into(),
        )
    })?;
    if !files.root.starts_with('/') {
        return Err(err(
            "files.root",
            format!(
                "expected an absolute path on the hosts, got {:?}",
                files.root
            ),
        ));
    }
    if files.root.split('/').any(|c| c == ".." || c == ".") {
        return Err(err(
            "files.root",
            format!(
                "expected a path without '.' or '..' components, got {:?}",
                files.root
            ),
        ));
    }
    if files.root.contains('\0') || files.root.contains('\n') {
        return Err(err(
            "files.root",
            "expected a path without NUL or newline".into(),
        ));
    }
    let root = if files.root.len() > 1 {
        files.root.trim_end_matches('/').to_string()
    } else {
        files.root.clone()
    };
    if root == "/" {
        return Err(err(
            "files.root",
            "expected a dedicated directory, not /".into(),
        ));
    }
    let keep = match files.keep {
        None => 5,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => return Err(err("files.keep", format!("expected 1 to 1000, got {n}"))),
    };
    let positive = |key: &str, v: Option<i64>, default: u64| -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if n > 0 => Ok(n as u64),
            Some(n) => Err(err(key, format!("expected a positive number, got {n}"))),
        }
    };
    if deploy.canary.is_some() {
        return Err(err(
            "deploy.canary",
            "a canary is for container apps (the edge proxy splits the requests)".into(),
        ));
    }
    Ok(FilesConfig {
        source: files.source.as_deref().map(resolve),
        root,
        reload: files.reload.filter(|r| !r.trim().is_empty()),
        keep,
        max_unpacked_bytes: positive(
            "files.max_unpacked_bytes",
            files.max_unpacked_bytes,
            4 << 30,
        )?,
        max_entries: positive("files.max_entries", files.max_entries, 200_000)?,
        proxy: None,
        route: None,
    })
}

/// `[health]` of a files app: `url` (the host's view), never `path`.
fn files_health(
    raw: Option<RawHealth>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HealthConfig, ConfigError> {
    let h = raw.ok_or_else(|| {
        err(
            "health",
            "expected a [health] section with `url`: the gate every switch must pass".into(),
        )
    })?;
    if h.path.is_some() {
        return Err(err(
            "health.path",
            "`path` is for container apps; files apps use `url`".into(),
        ));
    }
    let url = h.url.as_deref().ok_or_else(|| {
        err(
            "health.url",
            "expected the URL to probe as the host sees it, e.g. \"http://127.0.0.1/up\"".into(),
        )
    })?;
    let url = HealthUrl::parse(url).map_err(|m| err("health.url", m))?;
    health_config(&h, url, err)
}

fn parse_https(
    b: &RawBuild,
    repo: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<(String, String, Option<PathBuf>), ConfigError> {
    if !repo.to_ascii_lowercase().starts_with("https://") {
        for (key, set) in [
            ("build.token_env", b.token_env.is_some()),
            ("build.token_user", b.token_user.is_some()),
            ("build.ca_file", b.ca_file.is_some()),
        ] {
            if set {
                return Err(err(key, "only used for https:// repositories".into()));
            }
        }
    }
    let token_env = b.token_env.as_deref().unwrap_or(DEFAULT_TOKEN_ENV);
    if !valid_env_name(token_env) {
        return Err(err(
            "build.token_env",
            format!("expected the NAME of the variable that holds the token, matching ^[A-Za-z_][A-Za-z0-9_]*$ (the token itself does not belong in the config), got {} characters", token_env.len()),
        ));
    }
    let token_user = b.token_user.as_deref().unwrap_or("x-access-token");
    if token_user.is_empty() || token_user.contains(':') || token_user.chars().any(char::is_control)
    {
        return Err(err(
            "build.token_user",
            "expected a username without ':' (the token is the password)".into(),
        ));
    }
    let ca_file = match b.ca_file.as_deref().map(str::trim) {
        Some("") => return Err(err("build.ca_file", "expected a PEM file path".into())),
        Some(p) => Some(resolve(p)),
        None => None,
    };
    Ok((token_env.to_string(), token_user.to_string(), ca_file))
}

/// git's scp-like syntax: `user@host:path` or `host:path` (a colon before any slash).
fn scp_like(url: &str) -> bool {
    if url.contains("://") || url.starts_with('/') || url.starts_with('.') || url.starts_with('~') {
        return false;
    }
    match (url.find(':'), url.find('/')) {
        (Some(c), Some(s)) => c > 0 && c < s,
        (Some(c), None) => c > 0,
        _ => false,
    }
}

/// A path relative to the checkout, without `..`: `None` if it is not one.
fn checkout_path(p: &str) -> Option<String> {
    let trimmed = p.trim_end_matches('/');
    let p = if trimmed.is_empty() { p } else { trimmed };
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c == "..")
        || p.contains('\0')
        || p.contains('\n');
    (!bad).then(|| p.to_string())
}

/// `[build]`; `container`: the app is a container app (`dockerfile`, no `output`).
fn parse_build(
    b: RawBuild,
    container: bool,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<BuildConfig, ConfigError> {
    let docker = if container {
        Some(docker_build(&b, err)?)
    } else {
        files_build_keys(&b, err)?;
        None
    };
    let repo = build_repo(b.repo.as_deref(), err, resolve)?;
    let (token_env, token_user, ca_file) = parse_https(&b, &repo, err, resolve)?;
    let command = match b.command {
        Some(c) if c.trim().is_empty() => {
            return Err(err(
                "build.command",
                "expected a command, or leave `command` out to ship the tree as it is".into(),
            ))
        }
        c => c,
    };
    let output = b.output.unwrap_or_else(|| ".".into());
    let output = checkout_path(&output).ok_or_else(|| {
        err(
            "build.output",
            format!("expected a directory relative to the checkout, without '..', e.g. \"dist\", got {output:?}"),
        )
    })?;
    let timeout = build_timeout(b.timeout.as_deref(), err)?;
    let (env, pass_env) = build_env(b.env, b.pass_env, err)?;
    Ok(BuildConfig {
        repo,
        command,
        output,
        docker,
        timeout,
        env,
        pass_env,
        cache: b.cache.unwrap_or(false),
        token_env,
        token_user,
        ca_file,
    })
}

/// A container app's `[build]`: `dockerfile` and `context` in the checkout, no `output`.
fn docker_build(
    b: &RawBuild,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<DockerBuild, ConfigError> {
    if b.output.is_some() {
        return Err(err(
            "build.output",
            "`output` is for files apps; a container app's build makes an image: set `dockerfile` (and `context`) instead".into(),
        ));
    }
    let dockerfile = b.dockerfile.as_deref().ok_or_else(|| {
        err(
            "build.dockerfile",
            "a container app's build makes an image: expected the Dockerfile's path in the checkout, e.g. dockerfile = \"Dockerfile\"".into(),
        )
    })?;
    let dockerfile = checkout_path(dockerfile)
        .filter(|d| d != ".")
        .ok_or_else(|| {
            err(
                "build.dockerfile",
                format!("expected a file relative to the checkout, without '..', e.g. \"Dockerfile\" or \"deploy/Dockerfile\", got {dockerfile:?}"),
            )
        })?;
    let context = b.context.as_deref().unwrap_or(".");
    let context = checkout_path(context).ok_or_else(|| {
        err(
            "build.context",
            format!("expected a directory relative to the checkout, without '..', e.g. \".\" or \"app\", got {context:?}"),
        )
    })?;
    Ok(DockerBuild {
        dockerfile,
        context,
    })
}

/// A files app's `[build]` has no `dockerfile` or `context`.
fn files_build_keys(
    b: &RawBuild,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if b.dockerfile.is_some() {
        return Err(err(
            "build.dockerfile",
            "`dockerfile` is for container apps ([container]); a files app is built with `command` and `output`".into(),
        ));
    }
    if b.context.is_some() {
        return Err(err(
            "build.context",
            "`context` is the docker build context of container apps ([container]); a files app is built with `command` and `output`".into(),
        ));
    }
    Ok(())
}

/// `build.repo`: a URL or scp-like address as written, a path resolved.
fn build_repo(
    repo: Option<&str>,
    err: &dyn Fn(&str, String) -> ConfigError,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<String, ConfigError> {
    let repo = repo.map(str::trim).unwrap_or("");
    if repo.is_empty() {
        return Err(err(
            "build.repo",
            "expected the app's git repository: a path, file://, ssh:// URL or user@host:path"
                .into(),
        ));
    }
    if let Some(m) = unsupported_repo(repo) {
        return Err(err("build.repo", m));
    }
    if repo.contains('\0') || repo.contains('\n') || repo.starts_with('-') {
        return Err(err(
            "build.repo",
            format!("expected a path or URL, got {repo:?}"),
        ));
    }
    Ok(if repo.contains("://") || scp_like(repo) {
        repo.to_string()
    } else {
        resolve(repo).display().to_string()
    })
}

/// `build.timeout`: 10 minutes unless set, never zero.
fn build_timeout(
    timeout: Option<&str>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Duration, ConfigError> {
    let Some(s) = timeout else {
        return Ok(Duration::from_secs(600));
    };
    let d = parse_duration(s).map_err(|m| err("build.timeout", m))?;
    if d.is_zero() {
        return Err(err(
            "build.timeout",
            "expected a duration above zero".into(),
        ));
    }
    Ok(d)
}

/// `build.env` and `build.pass_env`: valid names, no NUL in a value, no name in both.
fn build_env(
    env: Option<BTreeMap<String, String>>,
    pass_env: Option<Vec<String>>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(BTreeMap<String, String>, Vec<String>), ConfigError> {
    let env = env.unwrap_or_default();
    for (k, v) in &env {
        if !valid_env_name(k) {
            return Err(err(
                &format!("build.env.{k}"),
                "expected a variable name matching ^[A-Za-z_][A-Za-z0-9_]*$".into(),
            ));
        }
        if v.contains('\0') {
            return Err(err(
                &format!("build.env.{k}"),
                "expected a value without NUL".into(),
            ));
        }
    }
    let pass_env = pass_env.unwrap_or_default();
    for (i, name) in pass_env.iter().enumerate() {
        if !valid_env_name(name) {
            return Err(err(
                &format!("build.pass_env[{i}]"),
                format!("expected a variable name matching ^[A-Za-z_][A-Za-z0-9_]*$, got {name:?}"),
            ));
        }
        if env.contains_key(name) {
            return Err(err(
                &format!("build.pass_env[{i}]"),
                format!("{name:?} is also set in build.env; keep one"),
            ));
        }
    }
    Ok((env, pass_env))
}

/// The gate settings shared by files and container apps: `expect`, `timeout`, `interval`,
/// `healthy_after`, `give_up_after`, with their defaults.
fn health_config(
    h: &RawHealth,
    url: HealthUrl,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HealthConfig, ConfigError> {
    let dur = |key: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => match parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(err(key, "expected a duration above zero".into())),
                Err(m) => Err(err(key, m)),
            },
        }
    };
    let expect = match h.expect {
        None => 200,
        Some(n) if (100..=599).contains(&n) => n as u16,
        Some(n) => {
            return Err(err(
                "health.expect",
                format!("expected an HTTP status 100-599, got {n}"),
            ))
        }
    };
    let healthy_after = match h.healthy_after {
        None => 2,
        Some(n) if (1..=100).contains(&n) => n as u32,
        Some(n) => {
            return Err(err(
                "health.healthy_after",
                format!("expected 1 to 100, got {n}"),
            ))
        }
    };
    Ok(HealthConfig {
        url,
        expect,
        timeout: dur("health.timeout", &h.timeout, Duration::from_secs(2))?,
        interval: dur("health.interval", &h.interval, Duration::from_millis(500))?,
        healthy_after,
        give_up_after: dur(
            "health.give_up_after",
            &h.give_up_after,
            Duration::from_secs(30),
        )?,
    })
}

/// The largest config file cutover reads. A `cutover.toml` is a few hundred bytes; a file near
/// this size is not a config, and a device or a FIFO is never read at all.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// `[files] reload` and `[build] command`, as sent to a shell.
pub const MAX_SCRIPT_BYTES: usize = 16 * 1024;
/// One `env` value (`[container] env`, `[build] env`).
pub const MAX_ENV_VALUE_BYTES: usize = 16 * 1024;
/// All of one `env` table, `NAME=value` for each variable.
pub const MAX_ENV_TOTAL_BYTES: usize = 64 * 1024;
/// All of `[container] volumes`.
pub const MAX_VOLUMES_TOTAL_BYTES: usize = 16 * 1024;
/// `[proxy] install_dir`: `<install_dir>/proxy.sock` and the temporary name it is bound under
/// (`.proxy.sock.<pid>-<n>.tmp`, up to 27 more bytes) must fit a unix socket address (107
/// bytes and a NUL).
pub const MAX_INSTALL_DIR_BYTES: usize = 80;
/// Every other string value (hosts, paths, URLs, durations...), unless [`value_limit`] says less.
pub const MAX_VALUE_BYTES: usize = 4096;
/// A key (e.g. an env variable's name).
pub const MAX_KEY_BYTES: usize = 256;

/// Bytes a value takes inside a remote command line: a script reaches the host as one
/// argument (`sh -c '<script>'`, itself quoted for `ssh`), and there every `'` of a value,
/// quoted twice, takes 13 bytes. Linux limits one argument to 128 KiB (`MAX_ARG_STRLEN`).
pub fn shell_cost(value: &str) -> usize {
    value.len() + 12 * value.bytes().filter(|b| *b == b'\'').count()
}

/// The bound of the string at `key` (a dotted path, `[i]` for array elements), and why.
fn value_limit(key: &str) -> (usize, &'static str) {
    const ARG: &str = "it is sent to the hosts as part of one command line, and Linux limits one argument to 128 KiB";
    match key {
        "files.reload" => (MAX_SCRIPT_BYTES, "it runs on the hosts as part of one command line, and Linux limits one argument to 128 KiB; put a longer script in a file on the hosts and make `reload` run that file"),
        "build.command" => (MAX_SCRIPT_BYTES, "it runs as one `sh -c` argument, and Linux limits one argument to 128 KiB; commit a longer script to the repository and make `command` run that file"),
        "container.image" => (255, "docker refuses longer repository names"),
        "container.domain" => (253, "a DNS name is at most 253 bytes"),
        "proxy.install_dir" => (MAX_INSTALL_DIR_BYTES, "the proxy's control socket in it must fit a unix socket address (108 bytes)"),
        "files.root" => (1024, ARG),
        "health.url" | "health.path" => (2048, ARG),
        k if k.starts_with("container.env.") || k.starts_with("build.env.") => {
            (MAX_ENV_VALUE_BYTES, ARG)
        }
        _ => (MAX_VALUE_BYTES, "a value this long is no name, path, URL or duration, and values reach command lines, where Linux limits one argument to 128 KiB"),
    }
}

/// `"16384 bytes (16 KiB)"`.
fn bytes_text(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{n} bytes ({} KiB)", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// What is wrong with `value` if it takes more than `max` bytes by [`shell_cost`].
fn over_limit(value: &str, max: usize, why: &str) -> Option<String> {
    let cost = shell_cost(value);
    if cost <= max {
        return None;
    }
    let limit = bytes_text(max);
    Some(if value.len() > max {
        format!("expected at most {limit}, got {} bytes: {why}", value.len())
    } else {
        format!(
            "expected at most {limit} as sent to the hosts' shell, where each ' takes 13 bytes once quoted, got {cost} ({} bytes, {} of them '): {why}",
            value.len(),
            value.bytes().filter(|b| *b == b'\'').count()
        )
    })
}

/// Bounds every string and key in the parsed file (see [`value_limit`]) and the totals of
/// the `env` tables and of `volumes`, so that nothing that passes `check` fails later
/// because it does not fit a command line, and no error message repeats a huge value.
fn check_sizes(prefix: &str, table: &toml::Table) -> Result<(), (String, String)> {
    let here = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    for (k, v) in table {
        if k.len() > MAX_KEY_BYTES {
            let at = if prefix.is_empty() {
                "(top level)"
            } else {
                prefix
            };
            return Err((
                at.to_string(),
                format!(
                    "a key of {} bytes; keys are at most {}",
                    k.len(),
                    bytes_text(MAX_KEY_BYTES)
                ),
            ));
        }
        check_value(&here(k), v)?;
    }
    let total = |key: &str, max: usize, cost: usize, what: &str| -> Result<(), (String, String)> {
        if cost > max {
            return Err((
                key.to_string(),
                format!(
                    "expected at most {} of {what} in all (as sent to the hosts' shell, each ' takes 13 bytes), got {cost}: they are sent together on one command line, and Linux limits one argument to 128 KiB",
                    bytes_text(max)
                ),
            ));
        }
        Ok(())
    };
    if let Some(toml::Value::Table(env)) = table.get("env") {
        if prefix == "container" || prefix == "build" {
            let cost = env
                .iter()
                .map(|(k, v)| k.len() + 1 + v.as_str().map(shell_cost).unwrap_or(0))
                .sum();
            total(&here("env"), MAX_ENV_TOTAL_BYTES, cost, "NAME=value")?;
        }
    }
    if let (Some(toml::Value::Array(vols)), "container") = (table.get("volumes"), prefix) {
        let cost = vols.iter().filter_map(|v| v.as_str()).map(shell_cost).sum();
        total(&here("volumes"), MAX_VOLUMES_TOTAL_BYTES, cost, "volumes")?;
    }
    Ok(())
}

fn check_value(key: &str, v: &toml::Value) -> Result<(), (String, String)> {
    match v {
        toml::Value::String(s) => {
            let (max, why) = value_limit(key);
            match over_limit(s, max, why) {
                Some(m) => Err((key.to_string(), m)),
                None => Ok(()),
            }
        }
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| check_value(&format!("{key}[{i}]"), x)),
        toml::Value::Table(t) => check_sizes(key, t),
        _ => Ok(()),
    }
}

/// A NUL byte or another control character that TOML does not allow anywhere in a file
/// (everything below U+0020 but tab and line feed, a carriage return only before a line feed,
/// and U+007F), as a message with its position. TOML's own error for these can have an empty
/// message.
fn control_character(text: &str) -> Option<String> {
    let (i, c) = text.char_indices().find(|&(i, c)| {
        (c < ' ' && c != '\t' && c != '\n' && c != '\r')
            || c == '\u{7f}'
            || (c == '\r' && !text[i + 1..].starts_with('\n'))
    })?;
    let (l, col) = line_col(text, i);
    let what = if c == '\0' {
        "a NUL byte".to_string()
    } else if c == '\r' {
        "a carriage return (U+000D) that does not end a line".to_string()
    } else {
        format!("a control character (U+{:04X})", c as u32)
    };
    Some(format!(
        "the file contains {what} at line {l}, column {col}: a config is plain text (inside a string, write it as the escape \\u{:04X})",
        c as u32
    ))
}

/// TOML's message for a parse error: never empty, and never a megabyte of the file.
fn parse_message(m: &str) -> String {
    const MAX: usize = 300;
    let m = m.trim();
    if m.is_empty() {
        return "not valid TOML".to_string();
    }
    if m.len() <= MAX {
        return m.to_string();
    }
    let mut end = MAX;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &m[..end], m.len())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
app = "site"
hosts = ["web1", "deploy@10.0.0.5:2222"]
[ssh]
known_hosts = "kh"
identity = "~/.ssh/id"
parallel = 4
[files]
source = "dist"
root = "/srv/site/"
reload = "systemctl reload site"
keep = 3
[health]
url = "http://127.0.0.1:8080/up"
timeout = "1s"
interval = "100ms"
healthy_after = 3
give_up_after = "10s"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/app/cutover.toml"),
            text,
            Some(Path::new("/home/u")),
        )
    }

    fn key_of(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert!(e.to_string().starts_with("/etc/app/cutover.toml"), "{e}");
        e.key
    }

    #[test]
    fn parses_a_full_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.app, "site");
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.ssh.known_hosts.as_deref(), Some(Path::new("/etc/app/kh")));
        assert_eq!(
            c.ssh.identity.as_deref(),
            Some(Path::new("/home/u/.ssh/id"))
        );
        let files = c.files().unwrap();
        assert_eq!(files.root, "/srv/site");
        assert_eq!(files.keep, 3);
        assert_eq!(files.source.as_deref(), Some(Path::new("/etc/app/dist")));
        assert!(c.container().is_none());
        assert_eq!(c.health.url.port, 8080);
        assert_eq!(c.health.url.path, "/up");
        assert_eq!(c.health.healthy_after, 3);
        assert_eq!(c.health.interval, Duration::from_millis(100));
        assert_eq!(c.ssh.step_timeout, Duration::from_secs(600), "the default");
        let no_parallel = GOOD.replace("parallel = 4\n", "");
        assert_eq!(parse(&no_parallel).unwrap().ssh.parallel, 32, "the default");
    }

    #[test]
    fn every_error_names_its_key() {
        let cases = [
            (GOOD.replace("app = \"site\"", "app = \"Site\""), "app"),
            (
                GOOD.replace("root = \"/srv/site/\"", "root = \"srv\""),
                "files.root",
            ),
            (
                GOOD.replace("root = \"/srv/site/\"", "root = \"/srv/../etc\""),
                "files.root",
            ),
            (GOOD.replace("keep = 3", "keep = 0"), "files.keep"),
            (
                GOOD.replace("timeout = \"1s\"", "timeout = \"1\""),
                "health.timeout",
            ),
            (
                GOOD.replace("interval = \"100ms\"", "interval = \"0s\""),
                "health.interval",
            ),
            (
                GOOD.replace("http://127.0.0.1:8080/up", "https://x/up"),
                "health.url",
            ),
            (GOOD.replace("\"web1\"", "\"-oProxyCommand=x\""), "hosts[0]"),
            (
                GOOD.replace("\"web1\", ", "\"deploy@10.0.0.5:2222\", "),
                "hosts[1]",
            ),
            (GOOD.replace("parallel = 4", "parallel = 0"), "ssh.parallel"),
            (
                GOOD.replace("parallel = 4", "parallel = 4\nstep_timeout = \"0.5s\""),
                "ssh.step_timeout",
            ),
            (
                GOOD.replace("[files]", "[container]\nimage=\"x\"\nport=80\n[files]"),
                "files",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(key_of(&text), key, "for {text}");
        }
    }

    const CONTAINER: &str = r#"
app = "api"
hosts = ["web1"]
[container]
image = "registry.example.com/api"
port = 8080
env = { RUST_LOG = "info", TOKEN = "hunter2" }
volumes = ["/srv/api/data:/data"]
strategy = "hold"
domain = "API.example.com"
[proxy]
listen = "0.0.0.0:8000"
drain = "5s"
install_dir = "/opt/cutover"
[health]
path = "/healthz"
interval = "100ms"
"#;

    #[test]
    fn parses_a_container_app() {
        let c = parse(CONTAINER).unwrap();
        let app = c.container().unwrap();
        assert!(c.files().is_none());
        assert_eq!(app.container.image, "registry.example.com/api");
        assert_eq!(app.container.strategy, crate::container::Strategy::Hold);
        assert_eq!(app.container.domain.as_deref(), Some("api.example.com"));
        assert_eq!(app.proxy.drain, Duration::from_secs(5));
        assert_eq!(
            *app.proxy.limits,
            crate::proxy_limits::ProxyLimits::default()
        );
        let tuned = parse(&CONTAINER.replace(
            "drain = \"5s\"",
            "drain = \"5s\"\nheader_timeout = \"10s\"\nidle_timeout = \"20s\"\nmax_header_bytes = 8192\nmax_connections = 500\nmax_body_bytes = \"50MiB\"",
        ))
        .unwrap();
        let limits = &tuned.container().unwrap().proxy.limits;
        assert_eq!(limits.header_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(20));
        assert_eq!(
            (limits.max_header_bytes, limits.max_connections),
            (8192, 500)
        );
        assert_eq!(limits.max_body_bytes, 50 << 20);
        let in_bytes =
            parse(&CONTAINER.replace("drain = \"5s\"", "drain = \"5s\"\nmax_body_bytes = 1048576"))
                .unwrap();
        assert_eq!(
            in_bytes.container().unwrap().proxy.limits.max_body_bytes,
            1 << 20
        );
        assert_eq!(app.health_path, "/healthz");
        assert_eq!(
            c.health.url.port, 8000,
            "verification goes through the proxy"
        );
        assert_eq!(c.state_dir(), "/opt/cutover/apps/api");
        let debug = format!("{c:?}");
        assert!(
            debug.contains("TOKEN") && !debug.contains("hunter2"),
            "env values never in Debug: {debug}"
        );
    }

    #[test]
    fn container_errors_name_their_key() {
        let cases = [
            (
                CONTAINER.replace("registry.example.com/api", "registry.example.com/api:v1"),
                "container.image",
            ),
            (
                CONTAINER.replace("port = 8080", "port = 0"),
                "container.port",
            ),
            (
                CONTAINER.replace("strategy = \"hold\"", "strategy = \"yolo\""),
                "container.strategy",
            ),
            (
                CONTAINER.replace("RUST_LOG", "\"BAD-NAME\""),
                "container.env.BAD-NAME",
            ),
            (
                CONTAINER.replace("/srv/api/data:/data", "-v"),
                "container.volumes[0]",
            ),
            (CONTAINER.replace("0.0.0.0:8000", "eighty"), "proxy.listen"),
            (
                CONTAINER.replace("/opt/cutover", "opt"),
                "proxy.install_dir",
            ),
            (
                CONTAINER.replace("path = \"/healthz\"", "url = \"http://x/\""),
                "health.url",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "drain = \"5\""),
                "proxy.drain",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "header_timeout = \"0s\""),
                "proxy.header_timeout",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "max_connections = 0"),
                "proxy.max_connections",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "body_timeout = \"soon\""),
                "proxy.body_timeout",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "max_body_bytes = \"lots\""),
                "proxy.max_body_bytes",
            ),
            (
                CONTAINER.replace("drain = \"5s\"", "max_body_bytes = 1.5"),
                "proxy.max_body_bytes",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(key_of(&text), key, "for {text}");
        }
        assert_eq!(
            key_of(&GOOD.replace("[files]", "[proxy]\n[files]")),
            "proxy"
        );
    }

    #[test]
    fn unknown_keys_and_types_are_refused_with_a_position() {
        let e = parse(&GOOD.replace("keep = 3", "keep = 3\nkeeep = 4")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("unknown field `keeep`"), "{s}");
        assert!(s.contains("line "), "{s}");
        let e = parse(&GOOD.replace("keep = 3", "keep = \"three\"")).unwrap_err();
        assert!(e.to_string().contains("line "), "{e}");
    }

    #[test]
    fn missing_sections_say_what_to_add() {
        let no_health = GOOD.split("[health]").next().unwrap();
        assert_eq!(key_of(no_health), "health");
        let e = parse("app = \"a\"\nhosts = []\n").unwrap_err();
        assert_eq!(e.key, "hosts");
    }

    #[test]
    fn build_section() {
        let with = |b: &str| format!("{GOOD}\n[build]\n{b}\n");
        let c = parse(&with(
            "repo = \"app\"\ncommand = \"make\"\noutput = \"dist/\"\nenv = { NODE_ENV = \"production\" }\npass_env = [\"NPM_TOKEN\"]\ncache = true",
        ))
        .unwrap();
        let b = c.build.unwrap();
        assert_eq!(b.repo, "/etc/app/app");
        assert_eq!(b.command.as_deref(), Some("make"));
        assert_eq!(b.output, "dist");
        assert_eq!(b.timeout, Duration::from_secs(600));
        assert_eq!(b.env["NODE_ENV"], "production");
        assert_eq!(b.pass_env, ["NPM_TOKEN"]);
        assert!(b.cache);
        let b = parse(&with("repo = \"ssh://git@h/r.git\"\ntimeout = \"30s\""))
            .unwrap()
            .build
            .unwrap();
        assert_eq!(b.repo, "ssh://git@h/r.git");
        assert_eq!(b.output, ".");
        assert_eq!(b.command, None);
        assert_eq!(b.timeout, Duration::from_secs(30));
        assert_eq!(
            parse(&with("repo = \"git@h:r.git\""))
                .unwrap()
                .build
                .unwrap()
                .repo,
            "git@h:r.git"
        );
        assert!(parse(GOOD).unwrap().build.is_none());
    }

    #[test]
    fn build_https() {
        let with = |b: &str| format!("{GOOD}\n[build]\n{b}\n");
        let b = parse(&with("repo = \"https://git.example.com/a/b.git\""))
            .unwrap()
            .build
            .unwrap();
        assert_eq!(b.repo, "https://git.example.com/a/b.git");
        assert_eq!(b.token_env, "CUTOVER_GIT_TOKEN");
        assert_eq!(b.token_user, "x-access-token");
        assert_eq!(b.ca_file, None);
        let b = parse(&with("repo = \"https://h/r.git\"\ntoken_env = \"GITLAB_TOKEN\"\ntoken_user = \"oauth2\"\nca_file = \"ca.pem\""))
            .unwrap()
            .build
            .unwrap();
        assert_eq!(
            (b.token_env.as_str(), b.token_user.as_str()),
            ("GITLAB_TOKEN", "oauth2")
        );
        assert_eq!(b.ca_file, Some(PathBuf::from("/etc/app/ca.pem")));
        for (body, key, secret) in [
            (
                "repo = \"https://u:hunter2@h/r.git\"",
                "build.repo",
                "hunter2",
            ),
            (
                "repo = \"https://hunter2@h/r.git\"",
                "build.repo",
                "hunter2",
            ),
            (
                "repo = \"https://h/r.git?private_token=hunter2\"",
                "build.repo",
                "",
            ),
            ("repo = \"http://h/r.git\"", "build.repo", ""),
            (
                "repo = \"https://h/r\"\ntoken_env = \"ghp_hunter2-x\"",
                "build.token_env",
                "hunter2",
            ),
            (
                "repo = \"https://h/r\"\ntoken_user = \"a:b\"",
                "build.token_user",
                "",
            ),
            (
                "repo = \"https://h/r\"\nca_file = \"\"",
                "build.ca_file",
                "",
            ),
            (
                "repo = \"ssh://h/r\"\ntoken_env = \"T\"",
                "build.token_env",
                "",
            ),
            ("repo = \"r\"\nca_file = \"ca.pem\"", "build.ca_file", ""),
        ] {
            let e = parse(&with(body)).unwrap_err().to_string();
            assert!(e.contains(key), "{body}: {e}");
            assert!(secret.is_empty() || !e.contains(secret), "{body}: {e}");
        }
        let e = parse(&with("repo = \"https://u:hunter2@h/r.git\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_env"), "{e}");
    }

    #[test]
    fn build_errors_name_their_key() {
        let with = |b: &str| format!("{GOOD}\n[build]\n{b}\n");
        let cases = [
            ("command = \"make\"", "build.repo"),
            ("repo = \"http://github.com/a/b.git\"", "build.repo"),
            ("repo = \"git://h/r.git\"", "build.repo"),
            (
                "repo = \"r\"\ndockerfile = \"Dockerfile\"",
                "build.dockerfile",
            ),
            ("repo = \"r\"\noutput = \"../x\"", "build.output"),
            ("repo = \"r\"\noutput = \"/abs\"", "build.output"),
            ("repo = \"r\"\ntimeout = \"10\"", "build.timeout"),
            ("repo = \"r\"\ncommand = \" \"", "build.command"),
            ("repo = \"r\"\nenv = { \"A-B\" = \"x\" }", "build.env.A-B"),
            ("repo = \"r\"\npass_env = [\"1X\"]", "build.pass_env[0]"),
            (
                "repo = \"r\"\nenv = { X = \"1\" }\npass_env = [\"X\"]",
                "build.pass_env[0]",
            ),
        ];
        for (b, key) in cases {
            assert_eq!(key_of(&with(b)), key, "for {b}");
        }
        let e = parse(&with("repo = \"http://x/y.git\"")).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = parse(&with("repo = \"r\"\ndockerfile = \"D\"")).unwrap_err();
        assert!(e.to_string().contains("container apps"), "{e}");
        let e = parse(&with("repo = \"r\"\nbogus = 1")).unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn container_build_section() {
        let with = |b: &str| format!("{CONTAINER}\n[build]\n{b}\n");
        let b = parse(&with(
            "repo = \"app\"\ndockerfile = \"deploy/Dockerfile\"\ncontext = \"app/\"\ncommand = \"make assets\"\ncache = true",
        ))
        .unwrap()
        .build
        .unwrap();
        assert_eq!(b.repo, "/etc/app/app");
        let d = b.docker.unwrap();
        assert_eq!(d.dockerfile, "deploy/Dockerfile");
        assert_eq!(d.context, "app");
        assert_eq!(b.command.as_deref(), Some("make assets"));
        assert!(b.cache);
        let b = parse(&with("repo = \"r\"\ndockerfile = \"Dockerfile\""))
            .unwrap()
            .build
            .unwrap();
        assert_eq!(b.docker.unwrap().context, ".");
        // A files app has no docker build.
        let b = parse(&format!("{GOOD}\n[build]\nrepo = \"r\"\n"))
            .unwrap()
            .build
            .unwrap();
        assert_eq!(b.docker, None);
    }

    #[test]
    fn container_build_errors_name_their_key() {
        let with = |b: &str| format!("{CONTAINER}\n[build]\n{b}\n");
        let cases = [
            ("repo = \"r\"", "build.dockerfile", "Dockerfile"),
            (
                "repo = \"r\"\ndockerfile = \"Dockerfile\"\noutput = \"dist\"",
                "build.output",
                "files apps",
            ),
            (
                "repo = \"r\"\ndockerfile = \"../Dockerfile\"",
                "build.dockerfile",
                "'..'",
            ),
            (
                "repo = \"r\"\ndockerfile = \"/etc/Dockerfile\"",
                "build.dockerfile",
                "relative",
            ),
            (
                "repo = \"r\"\ndockerfile = \".\"",
                "build.dockerfile",
                "file",
            ),
            (
                "repo = \"r\"\ndockerfile = \"D\"\ncontext = \"a/../..\"",
                "build.context",
                "'..'",
            ),
            (
                "repo = \"r\"\ndockerfile = \"D\"\ncontext = \"/\"",
                "build.context",
                "relative",
            ),
            ("dockerfile = \"D\"", "build.repo", "repository"),
            (
                "repo = \"r\"\ndockerfile = \"D\"\ntimeout = \"0s\"",
                "build.timeout",
                "above zero",
            ),
        ];
        for (b, key, needle) in cases {
            let e = parse(&with(b)).unwrap_err();
            assert_eq!(e.key, key, "for {b}: {e}");
            assert!(e.to_string().contains(needle), "for {b}: {e}");
        }
        let e = parse(&format!(
            "{GOOD}\n[build]\nrepo = \"r\"\ncontext = \"app\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "build.context");
        assert!(e.to_string().contains("container apps"), "{e}");
    }

    #[test]
    fn app_names() {
        assert!(valid_app_name("a"));
        assert!(valid_app_name("site-2"));
        assert!(!valid_app_name("2site"));
        assert!(!valid_app_name("a_b"));
        assert!(!valid_app_name(&"a".repeat(41)));
    }

    #[test]
    fn nul_bytes_and_control_characters_are_named_with_their_position() {
        let text = GOOD.replace("keep = 3", "keep = 3 # three\0!");
        let e = parse(&text).unwrap_err();
        let (line, col) = line_col(&text, text.find('\0').unwrap());
        assert_eq!(
            e.to_string(),
            format!("/etc/app/cutover.toml: the file contains a NUL byte at line {line}, column {col}: a config is plain text (inside a string, write it as the escape \\u0000)")
        );
        let e = parse(&GOOD.replace("site\"\nkeep", "site\x1b\"\nkeep")).unwrap_err();
        assert!(
            e.message.starts_with(
                "the file contains a control character (U+001B) at line 11, column 32"
            ),
            "{e}"
        );
        let e = parse(&GOOD.replace("keep = 3", "keep = 3 # \x7f")).unwrap_err();
        assert!(e.message.contains("(U+007F)"), "{e}");
        let e = parse(&GOOD.replace("keep = 3", "keep = 3 # old\rMac")).unwrap_err();
        assert!(
            e.message.starts_with("the file contains a carriage return (U+000D) that does not end a line at line 12, column 15"),
            "{e}"
        );
        // Tabs and CRLF line ends are text.
        parse(&GOOD.replace("keep = 3", "keep =\t3").replace('\n', "\r\n")).unwrap();
    }

    #[test]
    fn every_parse_error_has_a_message_and_a_short_one() {
        assert_eq!(parse_message(""), "not valid TOML");
        assert_eq!(parse_message("  \n"), "not valid TOML");
        assert_eq!(parse_message("unknown field"), "unknown field");
        let long = format!(
            "invalid type: string \"{}\", expected i64",
            "é".repeat(100_000)
        );
        let m = parse_message(&long);
        assert!(m.len() < 400 && m.ends_with(" bytes in all)"), "{m}");
        let e = parse(&GOOD.replace("keep = 3", &format!("keep = \"{}\"", "x".repeat(3000))))
            .unwrap_err();
        assert!(!e.message.is_empty() && e.message.len() < 400, "{e}");
        for bad in [
            "app = ",
            "[files",
            "app = \"a\"\napp = \"b\"",
            "= 1",
            "a = 1979-05-27T07:32:00Zx",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.message.trim().is_empty(), "{bad:?}: {e}");
            assert!(!e.message.starts_with(" ("), "{bad:?}: {e}");
        }
    }

    #[test]
    fn long_values_are_refused_naming_the_key_and_the_bound() {
        let reload = |r: &str| GOOD.replace("systemctl reload site", r);
        let e = parse(&reload(&"x".repeat(10 << 20))).unwrap_err();
        assert_eq!(e.key, "files.reload");
        assert_eq!(
            e.message,
            "expected at most 16384 bytes (16 KiB), got 10485760 bytes: it runs on the hosts as part of one command line, and Linux limits one argument to 128 KiB; put a longer script in a file on the hosts and make `reload` run that file"
        );
        parse(&reload(&"x".repeat(MAX_SCRIPT_BYTES))).unwrap();
        // A ' is four bytes once quoted, thirteen once quoted twice (ssh, then sh -c).
        let quotes = GOOD.replace(
            "\"systemctl reload site\"",
            &format!("\"{}\"", "'".repeat(2000)),
        );
        let e = parse(&quotes).unwrap_err();
        assert_eq!(e.key, "files.reload");
        assert!(e.message.starts_with("expected at most 16384 bytes (16 KiB) as sent to the hosts' shell, where each ' takes 13 bytes once quoted, got 26000 (2000 bytes, 2000 of them ')"), "{e}");

        let cases = [
            (
                GOOD.replace("/srv/site/", &format!("/{}", "s".repeat(1024))),
                "files.root",
                "1024 bytes (1 KiB)",
            ),
            (
                GOOD.replace(
                    "127.0.0.1:8080/up",
                    &format!("127.0.0.1:8080/{}", "u".repeat(2048)),
                ),
                "health.url",
                "2048 bytes (2 KiB)",
            ),
            (
                GOOD.replace("\"web1\"", &format!("\"{}\"", "w".repeat(5000))),
                "hosts[0]",
                "4096 bytes (4 KiB)",
            ),
            (
                GOOD.replace("\"1s\"", &format!("\"{}\"", "1".repeat(5000))),
                "health.timeout",
                "4096 bytes (4 KiB)",
            ),
            (
                CONTAINER.replace("registry.example.com/api", &"r".repeat(256)),
                "container.image",
                "255 bytes",
            ),
            (
                CONTAINER.replace("API.example.com", &"a".repeat(254)),
                "container.domain",
                "253 bytes",
            ),
            (
                CONTAINER.replace("/opt/cutover", &format!("/{}", "o".repeat(80))),
                "proxy.install_dir",
                "80 bytes",
            ),
            (
                CONTAINER.replace("\"info\"", &format!("\"{}\"", "i".repeat(16385))),
                "container.env.RUST_LOG",
                "16384 bytes (16 KiB)",
            ),
            (
                CONTAINER.replace(
                    "\"/srv/api/data:/data\"",
                    &format!("\"/{}:/data\"", "v".repeat(4096)),
                ),
                "container.volumes[0]",
                "4096 bytes (4 KiB)",
            ),
        ];
        for (text, key, bound) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(
                e.message
                    .starts_with(&format!("expected at most {bound}, got ")),
                "{e}"
            );
            assert!(
                e.to_string().len() < 600,
                "the message repeats the value: {e}"
            );
        }
        parse(&CONTAINER.replace("/opt/cutover", &format!("/{}", "o".repeat(79)))).unwrap();

        let many_env: String = (0..6)
            .map(|i| format!("V{i} = \"{}\"\n", "e".repeat(12_000)))
            .collect();
        let text = CONTAINER.replace("env = { RUST_LOG = \"info\", TOKEN = \"hunter2\" }\n", "")
            + &format!("[container.env]\n{many_env}");
        // A [container.env] table after [health] is still container.env.
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "container.env", "{e}");
        assert!(
            e.message
                .starts_with("expected at most 65536 bytes (64 KiB) of NAME=value in all"),
            "{e}"
        );
        let vols: Vec<String> = (0..5)
            .map(|i| format!("\"/{i}{}:/d\"", "v".repeat(4000)))
            .collect();
        let e = parse(&CONTAINER.replace(
            "[\"/srv/api/data:/data\"]",
            &format!("[{}]", vols.join(",")),
        ))
        .unwrap_err();
        assert_eq!(e.key, "container.volumes", "{e}");
        let e = parse(&GOOD.replace(
            "[health]",
            &format!(
                "[build]\nrepo = \"/r\"\nenv = {{ {} = \"v\" }}\n[health]",
                "K".repeat(300)
            ),
        ))
        .unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.message.as_str()),
            (
                "build.env",
                "a key of 300 bytes; keys are at most 256 bytes"
            )
        );
    }

    #[test]
    fn batches_grow_and_end_with_every_host() {
        use crate::protocol::BatchSize::*;
        let parse = |b: &str| {
            let text = format!(
                "app = \"site\"\nhosts = [\"a\", \"b\", \"c\", \"d\"]\n[files]\nroot = \"/srv/site\"\n[health]\nurl = \"http://127.0.0.1/up\"\n[deploy]\nbatches = {b}\n"
            );
            Config::parse(Path::new("/c.toml"), &text, None)
        };
        let c = parse(r#"[1, "50%", "100%"]"#).unwrap();
        assert_eq!(c.deploy.batches, [Count(1), Percent(50), Percent(100)]);
        assert_eq!(
            parse("[2, 4]").unwrap().deploy.batches,
            [Count(2), Count(4)]
        );
        let bad = [
            (r#"[1, "50%"]"#, "the last batch covers 2 of the 4 hosts"),
            (r#"[2, "50%", "100%"]"#, "\"50%\" does not add a host"),
            (r#"[0, "100%"]"#, "got 0"),
            (r#"["150%"]"#, "got \"150%\""),
        ];
        for (b, says) in bad {
            let e = parse(b).unwrap_err().to_string();
            assert!(
                e.starts_with("/c.toml: `deploy.batches`: expected a list of host counts"),
                "{e}"
            );
            assert!(e.contains(says), "{b}: {e}");
        }
        assert!(
            parse("[1, 4]\nbogus = 1").is_err(),
            "an unknown [deploy] key is refused"
        );
        let c = parse("[4]\nbake = \"2m\"\nmax_error_rate = 0.05").unwrap();
        assert_eq!(c.deploy.bake, Duration::from_secs(120));
        assert!((c.deploy.max_error_rate() - 0.05).abs() < 1e-9);
        assert!((parse("[4]").unwrap().deploy.max_error_rate() - 0.01).abs() < 1e-9);
        let e = parse("[4]\nmax_error_rate = 2.0").unwrap_err().to_string();
        assert!(
            e.contains("`deploy.max_error_rate`: expected a share from 0 to 1"),
            "{e}"
        );
        let c = parse("[4]\nbake = \"1m\"\nmax_p99 = \"250ms\"").unwrap();
        assert_eq!(c.deploy.max_p99, Some(Duration::from_millis(250)));
        assert_eq!(c.deploy.canary, None);
        for (bad, says) in [
            ("max_p99 = \"fast\"", "`deploy.max_p99`"),
            (
                "max_p99 = \"0s\"",
                "`deploy.max_p99`: expected a duration above 0",
            ),
            (
                "bake = \"1m\"\ncanary = 100",
                "`deploy.canary`: expected the percentage",
            ),
            (
                "bake = \"1m\"\ncanary = \"10%\"",
                "`deploy.canary`: expected the percentage",
            ),
            ("canary = 10", "`deploy.canary`: a canary needs a `bake`"),
        ] {
            let e = parse(&format!("[4]\n{bad}")).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse("[4]\nbake = \"1m\"\ncanary = 10")
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("`deploy.canary`: a canary is for container apps (the edge proxy splits the requests)"),
            "{e}"
        );
        let hold = format!("{CONTAINER}[deploy]\nbake = \"1m\"\ncanary = 10\n");
        let e = Config::parse(Path::new("/c.toml"), &hold, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`deploy.canary`: a canary needs the old container running beside the new one: strategy \"blue-green\", not \"hold\""), "{e}");
        let bg = hold.replace("strategy = \"hold\"", "strategy = \"blue-green\"");
        let c = Config::parse(Path::new("/c.toml"), &bg, None).unwrap();
        assert_eq!(c.deploy.canary, Some(10));
    }

    #[test]
    fn trusted_proxies_are_validated_and_carried_as_one_run_flag() {
        let with = |extra: &str| {
            CONTAINER.replace(
                "install_dir = \"/opt/cutover\"",
                &format!("install_dir = \"/opt/cutover\"\n{extra}"),
            )
        };
        let c = parse(&with(
            "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]",
        ))
        .unwrap();
        let proxy = &c.container().unwrap().proxy;
        assert_eq!(
            proxy.run_flags().join(" "),
            "--trusted-proxies 10.0.0.0/8,192.0.2.7/32,2001:db8::/32"
        );
        let tls = with("tls = \"files\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\ntrusted_proxies = [\"10.0.0.0/8\"]");
        assert_eq!(
            parse(&tls).unwrap().container().unwrap().proxy.run_flags().join(" "),
            "--tls files --cert /c.pem --key /k.pem --listen-tls 0.0.0.0:443 --trusted-proxies 10.0.0.0/8"
        );
        assert!(parse(CONTAINER)
            .unwrap()
            .container()
            .unwrap()
            .proxy
            .run_flags()
            .is_empty());
        for bad in [
            "trusted_proxies = [\"10.1.2.3/8\"]",
            "trusted_proxies = [\"lb.example.com\"]",
            "trusted_proxies = [\"10.0.0.0/8 $(reboot)\"]",
            "trusted_proxies = [10]",
            "trusted_proxies = true",
        ] {
            assert_eq!(key_of(&with(bad)), "proxy.trusted_proxies", "for {bad}");
        }
        // One range needs no list.
        let one = parse(&with("trusted_proxies = \"10.0.0.0/8\"")).unwrap();
        assert_eq!(
            one.container().unwrap().proxy.run_flags().join(" "),
            "--trusted-proxies 10.0.0.0/8"
        );
        let e = parse(&with("trusted_proxies = [\"10.1.2.3/8\"]")).unwrap_err();
        assert!(
            e.to_string().contains(
                "\"10.1.2.3/8\" has bits set past its /8 prefix: did you mean \"10.0.0.0/8\"?"
            ),
            "{e}"
        );
    }

    #[test]
    fn trusted_proxies_header_picks_forwarded_and_needs_trusted_proxies() {
        let with = |extra: &str| {
            CONTAINER.replace(
                "install_dir = \"/opt/cutover\"",
                &format!("install_dir = \"/opt/cutover\"\n{extra}"),
            )
        };
        let flags = |extra: &str| {
            parse(&with(extra))
                .unwrap()
                .container()
                .unwrap()
                .proxy
                .run_flags()
                .join(" ")
        };
        assert_eq!(
            flags("trusted_proxies = \"10.0.0.0/8\"\ntrusted_proxies_header = \"forwarded\""),
            "--trusted-proxies 10.0.0.0/8 --trusted-proxies-header forwarded"
        );
        // The default says nothing, so that a proxy's arguments stay as they were.
        assert_eq!(
            flags("trusted_proxies = \"10.0.0.0/8\"\ntrusted_proxies_header = \"x-forwarded-for\""),
            "--trusted-proxies 10.0.0.0/8"
        );
        for (bad, msg) in [
            (
                "trusted_proxies = \"10.0.0.0/8\"\ntrusted_proxies_header = \"Forwarded; rm -rf /\"",
                "expected \"x-forwarded-for\" or \"forwarded\", got \"Forwarded; rm -rf /\"",
            ),
            (
                "trusted_proxies_header = \"forwarded\"",
                "only used with trusted_proxies (none is listed)",
            ),
        ] {
            assert_eq!(key_of(&with(bad)), "proxy.trusted_proxies_header", "{bad}");
            let e = parse(&with(bad)).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn proxy_tls_keys_are_validated_and_carried_as_run_flags() {
        use crate::container::TlsKind;
        let acme = CONTAINER.replace(
            "install_dir = \"/opt/cutover\"",
            "install_dir = \"/opt/cutover\"\ntls = \"acme\"\nacme_email = \"ops@example.com\"\nredirect_http = true",
        );
        let c = parse(&acme).unwrap();
        let tls = &c.container().unwrap().proxy.tls;
        assert_eq!(
            tls.mode,
            TlsKind::Acme {
                email: Some("ops@example.com".into()),
                directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
                ca_file: None,
            }
        );
        assert_eq!(
            tls.run_flags().join(" "),
            "--tls acme --acme-directory https://acme-v02.api.letsencrypt.org/directory \
             --acme-email ops@example.com --listen-tls 0.0.0.0:443 --redirect-http"
        );
        let files = CONTAINER.replace(
            "install_dir = \"/opt/cutover\"",
            "install_dir = \"/opt/cutover\"\ntls = \"files\"\ncert = \"/etc/ssl/site.pem\"\nkey = \"/etc/ssl/site.key\"\nlisten_tls = \"127.0.0.1:8443\"",
        );
        let c = parse(&files).unwrap();
        assert_eq!(
            c.container().unwrap().proxy.tls.run_flags().join(" "),
            "--tls files --cert /etc/ssl/site.pem --key /etc/ssl/site.key --listen-tls 127.0.0.1:8443"
        );
        assert!(parse(CONTAINER)
            .unwrap()
            .container()
            .unwrap()
            .proxy
            .tls
            .run_flags()
            .is_empty());

        let with = |extra: &str| {
            CONTAINER.replace(
                "install_dir = \"/opt/cutover\"",
                &format!("install_dir = \"/opt/cutover\"\n{extra}"),
            )
        };
        let cases = [
            ("tls = \"yes\"", "proxy.tls"),
            ("tls = \"files\"\nkey = \"/k.pem\"", "proxy.cert"),
            ("tls = \"files\"\ncert = \"/c.pem\"", "proxy.key"),
            (
                "tls = \"files\"\ncert = \"c.pem\"\nkey = \"/k.pem\"",
                "proxy.cert",
            ),
            (
                "tls = \"files\"\ncert = \"/my certs/c.pem\"\nkey = \"/k.pem\"",
                "proxy.cert",
            ),
            ("cert = \"/c.pem\"", "proxy.cert"),
            (
                "tls = \"files\"\ncert = \"/c\"\nkey = \"/k\"\nacme_email = \"a@b.c\"",
                "proxy.acme_email",
            ),
            (
                "tls = \"acme\"\nacme_email = \"nobody\"",
                "proxy.acme_email",
            ),
            (
                "tls = \"acme\"\nacme_directory = \"http://ca.test/dir\"",
                "proxy.acme_directory",
            ),
            (
                "tls = \"acme\"\nacme_directory = \"https://ca.test/$(reboot)\"",
                "proxy.acme_directory",
            ),
            (
                "tls = \"acme\"\nacme_ca_file = \"ca.pem\"",
                "proxy.acme_ca_file",
            ),
            ("tls = \"acme\"\nlisten_tls = \"443\"", "proxy.listen_tls"),
            (
                "tls = \"acme\"\nlisten_tls = \"0.0.0.0:8000\"",
                "proxy.listen_tls",
            ),
            ("redirect_http = true", "proxy.redirect_http"),
        ];
        for (extra, key) in cases {
            assert_eq!(key_of(&with(extra)), key, "for {extra}");
        }
        let e = parse(&with(
            "tls = \"acme\"\nacme_directory = \"http://ca.test/dir\"",
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("`proxy.acme_directory`: expected an https:// URL like \"https://acme-v02.api.letsencrypt.org/directory\", got \"http://ca.test/dir\""),
            "{e}"
        );
    }
}

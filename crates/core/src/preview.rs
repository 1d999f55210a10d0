//! `[preview]`: a pull request's own running copy of an app. [`Config::preview`] is the one
//! place a preview's config is derived from its app's: its own name (so its own history,
//! state directory and container names), its own hosts, its own route host
//! `pr-<n>-<app>.<domain>` (one DNS label under `domain`, so one wildcard certificate covers
//! every preview) and its own environment. The engine deploys the result through the one
//! protocol like any other app.

use crate::config::{AppKind, Config, DeployConfig};
use crate::host::Destination;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPreview {
    domain: Option<String>,
    hosts: Option<Vec<String>>,
    max: Option<i64>,
    ttl: Option<String>,
    env: Option<BTreeMap<String, String>>,
    inherit_env: Option<bool>,
}

/// A validated `[preview]`. Env values may be secrets: `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct PreviewConfig {
    /// Previews are served at `pr-<n>-<app>.<domain>`.
    pub domain: String,
    /// Where previews run (default: the app's first host), as written and parsed.
    pub hosts: Vec<(String, Destination)>,
    /// Open previews per app; more are refused.
    pub max: usize,
    /// A preview idle this long is removed.
    pub ttl: Duration,
    /// Set in every preview's environment.
    pub env: BTreeMap<String, String>,
    /// Whether previews also get the production environment (`[container] env`).
    pub inherit_env: bool,
}

impl fmt::Debug for PreviewConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreviewConfig")
            .field("domain", &self.domain)
            .field("hosts", &self.hosts)
            .field("max", &self.max)
            .field("ttl", &self.ttl)
            .field(
                "env",
                &self
                    .env
                    .keys()
                    .map(|k| format!("{k}=<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("inherit_env", &self.inherit_env)
            .finish()
    }
}

/// The default of `[preview] max`.
pub const DEFAULT_MAX: usize = 5;
/// The default of `[preview] ttl` (7 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 86_400);
/// The largest pull request number a preview accepts.
pub const MAX_PR: u64 = 999_999_999;

/// `^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$`, each label at most
/// 63 bytes: a domain a wildcard certificate can cover.
fn valid_domain(d: &str) -> bool {
    d.len() <= 200
        && d.contains('.')
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// `[preview]`, validated; `app_hosts` are the app's own (the default is the first).
pub(crate) fn parse_preview(
    p: RawPreview,
    app_hosts: &[(String, Destination)],
) -> Result<PreviewConfig, (String, String)> {
    let e = |k: &str, m: String| Err((format!("preview.{k}"), m));
    let domain = match p.domain {
        None => {
            return e(
                "domain",
                "expected the domain previews are served under, e.g. \"preview.example.com\" (a preview is pr-<n>-<app>.<domain>)".into(),
            )
        }
        Some(d) if valid_domain(&d) => d,
        Some(d) => {
            return e(
                "domain",
                format!("expected a lowercase domain name like \"preview.example.com\", got {d:?}"),
            )
        }
    };
    let hosts = match p.hosts {
        None => app_hosts.iter().take(1).cloned().collect(),
        Some(list) if list.is_empty() => return e(
            "hosts",
            "expected at least one host, e.g. [\"web1\"] (or leave it out: the app's first host)"
                .into(),
        ),
        Some(list) => {
            let mut seen = BTreeSet::new();
            let mut out = Vec::new();
            for (i, h) in list.into_iter().enumerate() {
                let d = Destination::parse(&h).map_err(|m| (format!("preview.hosts[{i}]"), m))?;
                if !seen.insert(h.clone()) {
                    return e(&format!("hosts[{i}]"), format!("{h:?} is listed twice"));
                }
                out.push((h, d));
            }
            out
        }
    };
    let max = match p.max {
        None => DEFAULT_MAX,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => return e("max", format!("expected 1 to 1000 open previews, got {n}")),
    };
    let ttl = match p.ttl.as_deref() {
        None => DEFAULT_TTL,
        Some(t) => match crate::duration::parse_duration(t) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(_) => return e("ttl", format!("expected at least 1s, got {t:?}")),
            Err(m) => return e("ttl", m),
        },
    };
    let env = p.env.unwrap_or_default();
    for k in env.keys() {
        let b = k.as_bytes();
        let ok = !b.is_empty()
            && (b[0].is_ascii_alphabetic() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if !ok {
            return e(
                &format!("env.{k}"),
                "expected a variable name of letters, digits and _".into(),
            );
        }
        if k.starts_with("CUTOVER_") {
            return e(
                &format!("env.{k}"),
                "CUTOVER_ variables are set by cutover (CUTOVER_PREVIEW_URL, CUTOVER_PR)".into(),
            );
        }
    }
    Ok(PreviewConfig {
        domain,
        hosts,
        max,
        ttl,
        env,
        inherit_env: p.inherit_env.unwrap_or(false),
    })
}

/// Why a preview cannot be derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviewError {
    /// The app's config has no `[preview]`.
    NotConfigured { file: String },
    /// A pull request number out of range.
    BadNumber(u64),
}

impl fmt::Display for PreviewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PreviewError::NotConfigured { file } => write!(
                f,
                "{file} has no [preview] section: add one with at least `domain` (previews are served at pr-<n>-<app>.<domain>)"
            ),
            PreviewError::BadNumber(n) => write!(
                f,
                "expected a pull request number from 1 to {MAX_PR}, got {n}"
            ),
        }
    }
}

impl std::error::Error for PreviewError {}

/// The name of pull request `pr`'s preview of `app`.
pub fn preview_app(app: &str, pr: u64) -> String {
    format!("{app}-pr-{pr}")
}

/// The host name pull request `pr`'s preview of `app` is routed at.
pub fn preview_host(app: &str, pr: u64, domain: &str) -> String {
    format!("pr-{pr}-{app}.{domain}")
}

/// The pull request number of a preview app's name, if `name` is one of `app`'s previews.
pub fn preview_number(app: &str, name: &str) -> Option<u64> {
    let n = name.strip_prefix(app)?.strip_prefix("-pr-")?;
    if n.is_empty() || n.starts_with('0') || !n.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|n| (1..=MAX_PR).contains(n))
}

impl Config {
    /// Pull request `pr`'s preview of this app, as an app of its own: named `<app>-pr-<pr>`
    /// (its own history, state directory and container names), on `[preview] hosts`, routed
    /// at `pr-<pr>-<app>.<domain>`, with `[preview] env` plus `CUTOVER_PREVIEW_URL` and
    /// `CUTOVER_PR` (the production env only with `inherit_env`), no volumes (a preview never
    /// writes into production's data), one batch, no bake, no canary, no webhook.
    /// A files app's preview lives in `<install_dir>/apps/<app>-pr-<pr>` (no `reload`), is
    /// served by the host's edge proxy as a static target (its `current`, routed at the
    /// preview's host name) and gated through that proxy; its build gets the variables.
    pub fn preview(&self, pr: u64) -> Result<Config, PreviewError> {
        let p = self
            .preview
            .as_ref()
            .ok_or_else(|| PreviewError::NotConfigured {
                file: self.file.display().to_string(),
            })?;
        if !(1..=MAX_PR).contains(&pr) {
            return Err(PreviewError::BadNumber(pr));
        }
        let name = preview_app(&self.app, pr);
        let host = preview_host(&self.app, pr, &p.domain);
        let mut health = self.health.clone();
        let mut build = self.build.clone();
        let kind = match &self.kind {
            AppKind::Files(f) => {
                let proxy = f.proxy.clone().unwrap_or_else(|| {
                    crate::container::validate_proxy(Default::default()).expect("the defaults")
                });
                // The build learns where its preview is served (a static site's base URL).
                if let Some(b) = &mut build {
                    b.env.extend(p.env.clone());
                    b.env
                        .insert("CUTOVER_PREVIEW_URL".into(), preview_url(&proxy, &host));
                    b.env.insert("CUTOVER_PR".into(), pr.to_string());
                }
                // The gate: the health path through the host's proxy, with the preview's host.
                let listen: std::net::SocketAddr = proxy.listen.parse().expect("validated");
                health.url = crate::config::HealthUrl {
                    host: "127.0.0.1".into(),
                    port: listen.port(),
                    path: self.health.url.path.clone(),
                };
                AppKind::Files(crate::config::FilesConfig {
                    source: f.source.clone(),
                    root: format!("{}/apps/{name}", proxy.install_dir),
                    reload: None,
                    keep: f.keep,
                    max_unpacked_bytes: f.max_unpacked_bytes,
                    max_entries: f.max_entries,
                    proxy: Some(proxy),
                    route: Some(host),
                })
            }
            AppKind::Container(c) => {
                let mut c = c.clone();
                let mut env = if p.inherit_env {
                    c.container.env.clone()
                } else {
                    BTreeMap::new()
                };
                env.extend(p.env.clone());
                env.insert("CUTOVER_PREVIEW_URL".into(), preview_url(&c.proxy, &host));
                env.insert("CUTOVER_PR".into(), pr.to_string());
                c.container.env = env;
                c.container.volumes = Vec::new();
                c.container.domain = Some(host);
                c.state_dir = format!("{}/apps/{name}", c.proxy.install_dir);
                AppKind::Container(c)
            }
        };
        Ok(Config {
            file: self.file.clone(),
            app: name,
            hosts: p.hosts.clone(),
            ssh: self.ssh.clone(),
            kind,
            health,
            build,
            deploy: DeployConfig {
                max_error_rate_ppm: self.deploy.max_error_rate_ppm,
                ..DeployConfig::default()
            },
            webhook: None,
            preview: None,
        })
    }

    /// The URL pull request `pr`'s preview is served at (`None` without `[preview]`).
    pub fn preview_url(&self, pr: u64) -> Option<String> {
        let p = self.preview.as_ref()?;
        let host = preview_host(&self.app, pr, &p.domain);
        Some(match self.proxy() {
            Some(proxy) => preview_url(proxy, &host),
            None => format!("http://{host}"),
        })
    }

    /// The edge proxy's settings: a container app's, or those serving a files app's previews.
    pub fn proxy(&self) -> Option<&crate::container::ProxySettings> {
        match &self.kind {
            AppKind::Container(c) => Some(&c.proxy),
            AppKind::Files(f) => f.proxy.as_ref(),
        }
    }
}

/// `http://<host>`, or `https://` when the proxy serves TLS.
fn preview_url(proxy: &crate::container::ProxySettings, host: &str) -> String {
    match proxy.tls.mode {
        crate::container::TlsKind::Off => format!("http://{host}"),
        _ => format!("https://{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, ConfigError};
    use std::path::Path;

    const BASE: &str = r#"
app = "web"
hosts = ["web1", "web2"]
[container]
image = "registry.example.com/web"
port = 8080
env = { DATABASE_URL = "postgres://prod", GREETING = "hi" }
volumes = ["/srv/data:/data"]
[proxy]
install_dir = "/srv/cutover"
[deploy]
batches = [1, "100%"]
"#;

    fn parse(preview: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/web/cutover.toml"),
            &format!("{BASE}[preview]\n{preview}"),
            None,
        )
    }

    #[test]
    fn a_preview_is_an_app_of_its_own_with_its_own_route_and_env() {
        let c = parse("domain = \"preview.example.com\"\nenv = { API_URL = \"https://staging\" }")
            .unwrap();
        let p = c.preview(42).unwrap();
        assert_eq!(p.app, "web-pr-42");
        assert_eq!(p.hosts, c.hosts[..1].to_vec(), "default: the first host");
        let capp = p.container().unwrap();
        assert_eq!(capp.state_dir, "/srv/cutover/apps/web-pr-42");
        assert_eq!(
            capp.container.domain.as_deref(),
            Some("pr-42-web.preview.example.com")
        );
        let env: Vec<(&str, &str)> = capp
            .container
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("API_URL", "https://staging"),
                ("CUTOVER_PR", "42"),
                (
                    "CUTOVER_PREVIEW_URL",
                    "http://pr-42-web.preview.example.com"
                ),
            ]
        );
        assert!(capp.container.volumes.is_empty());
        assert!(p.deploy.batches.is_empty());
        assert_eq!(p.webhook, None);
        assert_eq!(p.preview, None);
        assert_eq!(
            c.preview_url(42).as_deref(),
            Some("http://pr-42-web.preview.example.com")
        );
        // The production app is unchanged.
        assert_eq!(c.container().unwrap().container.domain, None);
        assert_eq!(preview_number("web", "web-pr-42"), Some(42));
        assert_eq!(preview_number("web", "web-pr-042"), None);
        assert_eq!(preview_number("web", "webx-pr-1"), None);
    }

    #[test]
    fn the_production_env_only_with_inherit_env() {
        let c = parse(
            "domain = \"p.example.com\"\nhosts = [\"web2\"]\ninherit_env = true\nenv = { GREETING = \"preview\" }",
        )
        .unwrap();
        let p = c.preview(7).unwrap();
        assert_eq!(p.hosts[0].0, "web2");
        let env = &p.container().unwrap().container.env;
        assert_eq!(env["DATABASE_URL"], "postgres://prod");
        assert_eq!(env["GREETING"], "preview", "[preview] env wins");
        assert_eq!(env["CUTOVER_PR"], "7");
    }

    #[test]
    fn bad_values_name_the_key() {
        let key = |text: &str| parse(text).unwrap_err().key;
        assert_eq!(key("hosts = [\"web1\"]"), "preview.domain");
        assert_eq!(key("domain = \"*.example.com\""), "preview.domain");
        assert_eq!(key("domain = \"Example.COM\""), "preview.domain");
        assert_eq!(key("domain = \"p.example.com\"\nmax = 0"), "preview.max");
        assert_eq!(
            key("domain = \"p.example.com\"\nttl = \"7\""),
            "preview.ttl"
        );
        assert_eq!(
            key("domain = \"p.example.com\"\nhosts = [\"-oProxyCommand=x\"]"),
            "preview.hosts[0]"
        );
        assert_eq!(
            key("domain = \"p.example.com\"\nhosts = []"),
            "preview.hosts"
        );
        assert_eq!(
            key("domain = \"p.example.com\"\nenv = { CUTOVER_PR = \"1\" }"),
            "preview.env.CUTOVER_PR"
        );
        let e = parse("domain = \"p.example.com\"\nsecret = 1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/web/cutover.toml: unknown field `secret`, expected one of `domain`, `hosts`, `max`, `ttl`, `env`, `inherit_env` (line 15, column 1)"
        );
        let c = parse("domain = \"p.example.com\"\nttl = \"2d\"\nmax = 2").unwrap();
        let p = c.preview.as_ref().unwrap();
        assert_eq!((p.max, p.ttl), (2, Duration::from_secs(2 * 86_400)));
        assert_eq!(c.preview(0).unwrap_err(), PreviewError::BadNumber(0));
        let none = Config::parse(Path::new("/c.toml"), BASE, None).unwrap();
        assert_eq!(
            none.preview(1).unwrap_err().to_string(),
            "/c.toml has no [preview] section: add one with at least `domain` (previews are served at pr-<n>-<app>.<domain>)"
        );
    }

    #[test]
    fn a_files_preview_is_served_by_the_proxy_from_its_own_directory() {
        let text = r#"
app = "site"
hosts = ["web1", "web2"]
[files]
root = "/srv/site"
reload = "systemctl reload nginx"
[health]
url = "http://127.0.0.1/up"
[build]
repo = "/git/site.git"
command = "make"
output = "dist"
[proxy]
listen = "0.0.0.0:8080"
install_dir = "/srv/cutover"
[preview]
domain = "preview.example.com"
env = { API_URL = "https://staging" }
"#;
        let c = Config::parse(Path::new("/c.toml"), text, None).unwrap();
        let p = c.preview(3).unwrap();
        assert_eq!(p.app, "site-pr-3");
        let f = p.files().unwrap();
        assert_eq!(f.root, "/srv/cutover/apps/site-pr-3");
        assert_eq!(f.reload, None, "production's reload is not the preview's");
        assert_eq!(f.route.as_deref(), Some("pr-3-site.preview.example.com"));
        assert_eq!(p.health.url.to_string(), "http://127.0.0.1:8080/up");
        let env = &p.build.as_ref().unwrap().env;
        assert_eq!(
            env["CUTOVER_PREVIEW_URL"],
            "http://pr-3-site.preview.example.com"
        );
        assert_eq!(env["CUTOVER_PR"], "3");
        assert_eq!(env["API_URL"], "https://staging");
        assert_eq!(
            c.preview_url(3).as_deref(),
            Some("http://pr-3-site.preview.example.com")
        );
        // Production is unchanged, and [proxy] without [preview] is still refused.
        assert_eq!(c.files().unwrap().route, None);
        assert_eq!(c.files().unwrap().root, "/srv/site");
        let e = Config::parse(
            Path::new("/c.toml"),
            &text
                .replace("[preview]\ndomain = \"preview.example.com\"\n", "")
                .replace("env = { API_URL = \"https://staging\" }\n", ""),
            None,
        )
        .unwrap_err();
        assert_eq!(e.key, "proxy");
    }

    #[test]
    fn debug_hides_env_values() {
        let c = parse("domain = \"p.example.com\"\nenv = { TOKEN = \"hunter2\" }").unwrap();
        let d = format!("{:?}", c.preview);
        assert!(
            d.contains("TOKEN=<redacted>") && !d.contains("hunter2"),
            "{d}"
        );
    }
}

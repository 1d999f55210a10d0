//! `[container]` and `[proxy]`: a container app, deployed through cutover's own edge proxy on
//! each host. Raw serde models (`deny_unknown_fields`) and their validated forms. Env values may
//! be secrets: `Debug` never shows them.

use crate::duration::parse_duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContainer {
    image: String,
    port: i64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    volumes: Vec<String>,
    strategy: Option<String>,
    domain: Option<String>,
    keep: Option<i64>,
    stop_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    listen: Option<String>,
    drain: Option<String>,
    hold: Option<String>,
    install_dir: Option<String>,
    // Limits against hostile clients and broken upstreams (`crate::proxy_limits`).
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_bytes: Option<i64>,
    max_headers: Option<i64>,
    max_connections: Option<i64>,
    upstream_connect_timeout: Option<String>,
    upstream_header_timeout: Option<String>,
    body_timeout: Option<String>,
    upstream_body_timeout: Option<String>,
    send_timeout: Option<String>,
    /// A number of bytes or a string such as `"100MiB"`.
    max_body_bytes: Option<toml::Value>,
    // HTTPS (see `validate_tls`).
    tls: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    acme_email: Option<String>,
    acme_directory: Option<String>,
    acme_ca_file: Option<String>,
    listen_tls: Option<String>,
    redirect_http: Option<bool>,
    /// Proxies in front of this one (a load balancer, a CDN) whose forwarding headers are
    /// kept: a list of `"10.0.0.0/8"`, `"192.0.2.7"`, or one such string.
    trusted_proxies: Option<toml::Value>,
    /// Where those proxies say whom they relay: `"x-forwarded-for"` (default) or
    /// `"forwarded"` (RFC 7239).
    trusted_proxies_header: Option<String>,
}

/// How the switch happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Start the new container, gate it, flip the proxy, drain, stop the old one.
    BlueGreen,
    /// The proxy holds requests while the old container stops and the new one starts.
    Hold,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::BlueGreen => "blue-green",
            Strategy::Hold => "hold",
        }
    }
}

/// A validated `[container]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Repository without tag or digest, e.g. `registry.example.com/api`.
    pub image: String,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<String>,
    pub strategy: Strategy,
    pub domain: Option<String>,
    pub keep: usize,
    pub stop_timeout: Duration,
}

impl fmt::Debug for ContainerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerConfig")
            .field("image", &self.image)
            .field("port", &self.port)
            .field(
                "env",
                &self
                    .env
                    .keys()
                    .map(|k| format!("{k}=<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("volumes", &self.volumes)
            .field("strategy", &self.strategy)
            .field("domain", &self.domain)
            .field("keep", &self.keep)
            .finish()
    }
}

/// A validated `[proxy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub listen: String,
    pub drain: Duration,
    pub hold: Duration,
    /// Where `cutover setup` puts the binary, the proxy state and the control socket on a host.
    pub install_dir: String,
    /// Limits against hostile clients and broken upstreams (boxed: most configs never look).
    pub limits: Box<crate::proxy_limits::ProxyLimits>,
    /// HTTPS: `tls`, its certificates, `listen_tls`, `redirect_http` (boxed: most apps
    /// have none, and `AppKind` stays small).
    pub tls: Box<ProxyTls>,
    /// `trusted_proxies`: clients whose `X-Forwarded-For`, `-Proto` and `-Host` the proxy
    /// keeps (appending to the first) instead of replacing; empty by default: nothing before
    /// the proxy is trusted.
    pub trusted_proxies: Vec<crate::cidr::Cidr>,
    /// `trusted_proxies_header = "forwarded"`: those proxies say whom they relay in RFC
    /// 7239's `Forwarded` (their `X-Forwarded-*` are then replaced as anyone's), not in
    /// `X-Forwarded-*`.
    pub trusted_forwarded: bool,
}

impl ProxySettings {
    /// The `cutover proxy run` flags for HTTPS ([`ProxyTls::run_flags`]),
    /// `trusted_proxies` (one word: ranges hold no character a shell or systemd expands) and
    /// `trusted_proxies_header` (only if not the default, so that a proxy's arguments stay
    /// as they were for configs that do not set it).
    pub fn run_flags(&self) -> Vec<String> {
        let mut f = self.tls.run_flags();
        if !self.trusted_proxies.is_empty() {
            f.push("--trusted-proxies".into());
            let ranges: Vec<String> = self
                .trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect();
            f.push(ranges.join(","));
        }
        if self.trusted_forwarded {
            f.push("--trusted-proxies-header".into());
            f.push("forwarded".into());
        }
        f
    }
}

/// `[proxy] tls` and the keys that go with it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTls {
    pub mode: TlsKind,
    /// `listen_tls` (default `0.0.0.0:443`); used unless `mode` is off.
    pub listen_tls: String,
    pub redirect_http: bool,
}

/// How the proxy gets its certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsKind {
    Off,
    /// The user's PEM files, as paths on each host.
    Files {
        cert: String,
        key: String,
    },
    Acme {
        email: Option<String>,
        directory: String,
        /// Paths on each host.
        ca_file: Option<String>,
    },
}

impl ProxyTls {
    /// The `cutover proxy run` flags that carry these settings to a host's proxy; each
    /// value is one shell word with no character a shell or systemd would expand (checked
    /// by validation).
    pub fn run_flags(&self) -> Vec<String> {
        let mut f: Vec<String> = Vec::new();
        let mut add = |k: &str, v: &str| {
            f.push(k.to_string());
            f.push(v.to_string());
        };
        match &self.mode {
            TlsKind::Off => return Vec::new(),
            TlsKind::Files { cert, key } => {
                add("--tls", "files");
                add("--cert", cert);
                add("--key", key);
            }
            TlsKind::Acme {
                email,
                directory,
                ca_file,
            } => {
                add("--tls", "acme");
                add("--acme-directory", directory);
                if let Some(e) = email {
                    add("--acme-email", e);
                }
                if let Some(c) = ca_file {
                    add("--acme-ca-file", c);
                }
            }
        }
        add("--listen-tls", &self.listen_tls);
        if self.redirect_http {
            f.push("--redirect-http".into());
        }
        f
    }
}

/// Let's Encrypt's production directory: `acme_directory`'s default.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Whether `v` is one word for the shell and for systemd's `ExecStart` (no space, quote,
/// glob, `$`, `%`, `;`, ...): letters, digits and `/._-+@:,=~&`.
fn plain_word(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('-')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+@:,=~&".contains(c))
}

/// `[proxy] tls`, `cert`, `key`, `acme_email`, `acme_directory`, `acme_ca_file`,
/// `listen_tls`, `redirect_http`.
fn validate_tls(p: &RawProxy, listen: &str) -> Result<ProxyTls, Err> {
    let e = |k: &str, m: String| Err((format!("proxy.{k}"), m));
    let path = |k: &str, v: &Option<String>| -> Result<Option<String>, Err> {
        match v {
            None => Ok(None),
            Some(v) if v.starts_with('/') && plain_word(v) && !v.split('/').any(|c| c == "..") => {
                Ok(Some(v.clone()))
            }
            Some(v) => Err((
                format!("proxy.{k}"),
                format!("expected an absolute path on the hosts (letters, digits and /._-+@:,=~&), got {v:?}"),
            )),
        }
    };
    let kind = p.tls.as_deref().unwrap_or("off");
    let cert = path("cert", &p.cert)?;
    let key = path("key", &p.key)?;
    let ca_file = path("acme_ca_file", &p.acme_ca_file)?;
    let only = |k: &str, set: bool, mode: &str| -> Result<(), Err> {
        if set && kind != mode {
            return Err((
                format!("proxy.{k}"),
                format!("only used with tls = \"{mode}\" (tls is \"{kind}\")"),
            ));
        }
        Ok(())
    };
    only("cert", cert.is_some(), "files")?;
    only("key", key.is_some(), "files")?;
    only("acme_email", p.acme_email.is_some(), "acme")?;
    only("acme_directory", p.acme_directory.is_some(), "acme")?;
    only("acme_ca_file", ca_file.is_some(), "acme")?;
    let mode = match kind {
        "off" => TlsKind::Off,
        "files" => match (cert, key) {
            (Some(cert), Some(key)) => TlsKind::Files { cert, key },
            (None, _) => {
                return e(
                    "cert",
                    "tls = \"files\" needs cert = \"/path/to/fullchain.pem\" (on the hosts)".into(),
                )
            }
            (_, None) => {
                return e(
                    "key",
                    "tls = \"files\" needs key = \"/path/to/privkey.pem\" (on the hosts)".into(),
                )
            }
        },
        "acme" => {
            let email = match &p.acme_email {
                None => None,
                Some(m) if plain_word(m) && m.contains('@') && !m.contains('/') => Some(m.clone()),
                Some(m) => {
                    return e(
                        "acme_email",
                        format!("expected an address like \"ops@example.com\", got {m:?}"),
                    )
                }
            };
            let directory = p
                .acme_directory
                .clone()
                .unwrap_or_else(|| LETS_ENCRYPT_DIRECTORY.to_string());
            if !directory.starts_with("https://") || !plain_word(&directory) || directory.len() <= 8
            {
                return e(
                    "acme_directory",
                    format!("expected an https:// URL like \"{LETS_ENCRYPT_DIRECTORY}\", got {directory:?}"),
                );
            }
            TlsKind::Acme {
                email,
                directory,
                ca_file,
            }
        }
        other => {
            return e(
                "tls",
                format!("expected \"off\", \"files\" or \"acme\", got {other:?}"),
            )
        }
    };
    let listen_tls = p.listen_tls.clone().unwrap_or_else(|| "0.0.0.0:443".into());
    match listen_tls.parse::<std::net::SocketAddr>() {
        Err(_) => {
            return e(
                "listen_tls",
                format!("expected ADDRESS:PORT like \"0.0.0.0:443\", got {listen_tls:?}"),
            )
        }
        Ok(a) if mode != TlsKind::Off && listen.parse().ok() == Some(a) => {
            return e("listen_tls", format!("must differ from listen ({listen})"))
        }
        Ok(_) => {}
    }
    let redirect_http = p.redirect_http.unwrap_or(false);
    if redirect_http && mode == TlsKind::Off {
        return e(
            "redirect_http",
            "redirects to https need tls = \"acme\" or \"files\"".into(),
        );
    }
    Ok(ProxyTls {
        mode,
        listen_tls,
        redirect_http,
    })
}

type Err = (String, String);

fn dur(key: &str, v: &Option<String>, default: Duration) -> Result<Duration, Err> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|m| (key.to_string(), m)),
    }
}

pub(crate) fn validate_container(c: RawContainer) -> Result<ContainerConfig, Err> {
    let e = |k: &str, m: String| (k.to_string(), m);
    let image = c.image.trim().to_string();
    if image.is_empty()
        || image.starts_with('-')
        || !image
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "./:-_".contains(ch))
    {
        return Err(e(
            "container.image",
            format!(
                "expected an image repository like \"registry.example.com/api\", got {:?}",
                c.image
            ),
        ));
    }
    if image.contains('@') || crate::container::has_tag(&image) {
        return Err(e("container.image", format!("expected the repository without a tag or digest (pick the version with `deploy --image TAG` or `--image @sha256:...`), got {:?}", c.image)));
    }
    let port = match c.port {
        n @ 1..=65535 => n as u16,
        n => {
            return Err(e(
                "container.port",
                format!("expected a port from 1 to 65535, got {n}"),
            ))
        }
    };
    for k in c.env.keys() {
        let ok = !k.is_empty()
            && !k.starts_with(|ch: char| ch.is_ascii_digit())
            && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !ok {
            return Err(e(
                &format!("container.env.{k}"),
                "expected a variable name of letters, digits and _".into(),
            ));
        }
    }
    for (i, v) in c.volumes.iter().enumerate() {
        if v.starts_with('-') || !v.contains(':') || v.contains('\n') {
            return Err(e(
                &format!("container.volumes[{i}]"),
                format!("expected \"HOST_PATH:CONTAINER_PATH[:ro]\", got {v:?}"),
            ));
        }
    }
    let strategy = match c.strategy.as_deref() {
        None | Some("blue-green") => Strategy::BlueGreen,
        Some("hold") => Strategy::Hold,
        Some(other) => {
            return Err(e(
                "container.strategy",
                format!("expected \"blue-green\" or \"hold\", got {other:?}"),
            ))
        }
    };
    if let Some(d) = &c.domain {
        if d.is_empty()
            || !d
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ".-".contains(ch))
        {
            return Err(e(
                "container.domain",
                format!("expected a host name, got {d:?}"),
            ));
        }
    }
    let keep = match c.keep {
        None => 3,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(n) => return Err(e("container.keep", format!("expected 1 to 100, got {n}"))),
    };
    Ok(ContainerConfig {
        image,
        port,
        env: c.env,
        volumes: c.volumes,
        strategy,
        domain: c.domain.map(|d| d.to_ascii_lowercase()),
        keep,
        stop_timeout: dur(
            "container.stop_timeout",
            &c.stop_timeout,
            Duration::from_secs(10),
        )?,
    })
}

/// Whether a repository reference carries a tag (a ':' after the last '/').
pub(crate) fn has_tag(image: &str) -> bool {
    match (image.rfind(':'), image.rfind('/')) {
        (Some(c), Some(s)) => c > s,
        (Some(_), None) => true,
        _ => false,
    }
}

pub(crate) fn validate_proxy(p: RawProxy) -> Result<ProxySettings, Err> {
    let limits = proxy_limits(&p)?;
    let listen = p.listen.clone().unwrap_or_else(|| "0.0.0.0:80".into());
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return Err((
            "proxy.listen".into(),
            format!("expected ADDRESS:PORT like \"0.0.0.0:80\", got {listen:?}"),
        ));
    }
    let install_dir = p
        .install_dir
        .clone()
        .unwrap_or_else(|| "/usr/local/lib/cutover".into());
    if !install_dir.starts_with('/') || install_dir.split('/').any(|c| c == "..") {
        return Err((
            "proxy.install_dir".into(),
            format!("expected an absolute path, got {install_dir:?}"),
        ));
    }
    let trusted_proxies = trusted_proxies(p.trusted_proxies.as_ref())?;
    let trusted_forwarded = match p.trusted_proxies_header.as_deref() {
        Some(_) if trusted_proxies.is_empty() => {
            return Err((
                "proxy.trusted_proxies_header".into(),
                "only used with trusted_proxies (none is listed)".into(),
            ))
        }
        None | Some("x-forwarded-for") => false,
        Some("forwarded") => true,
        Some(other) => {
            return Err((
                "proxy.trusted_proxies_header".into(),
                format!("expected \"x-forwarded-for\" or \"forwarded\", got {other:?}"),
            ))
        }
    };
    Ok(ProxySettings {
        limits,
        trusted_proxies,
        trusted_forwarded,
        tls: Box::new(validate_tls(&p, &listen)?),
        listen,
        drain: dur("proxy.drain", &p.drain, Duration::from_secs(30))?,
        hold: dur("proxy.hold", &p.hold, Duration::from_secs(30))?,
        install_dir: install_dir.trim_end_matches('/').to_string(),
    })
}

/// `[proxy] trusted_proxies`: a list of ranges, or one.
fn trusted_proxies(v: Option<&toml::Value>) -> Result<Vec<crate::cidr::Cidr>, Err> {
    let bad = |m: String| ("proxy.trusted_proxies".to_string(), m);
    let items: Vec<&toml::Value> = match v {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a.iter().collect(),
        Some(one) => vec![one],
    };
    items
        .into_iter()
        .map(|item| match item {
            toml::Value::String(r) => crate::cidr::Cidr::parse(r).map_err(bad),
            other => Err(bad(format!(
                "expected addresses or ranges like \"10.0.0.0/8\", got {other}"
            ))),
        })
        .collect()
}

/// The `[proxy]` limit keys.
fn proxy_limits(p: &RawProxy) -> Result<Box<crate::proxy_limits::ProxyLimits>, Err> {
    use crate::proxy_limits::RawValue::{Int, Text};
    let mut limits = crate::proxy_limits::ProxyLimits::default();
    let texts = [
        ("header_timeout", &p.header_timeout),
        ("idle_timeout", &p.idle_timeout),
        ("upstream_connect_timeout", &p.upstream_connect_timeout),
        ("upstream_header_timeout", &p.upstream_header_timeout),
        ("body_timeout", &p.body_timeout),
        ("upstream_body_timeout", &p.upstream_body_timeout),
        ("send_timeout", &p.send_timeout),
    ];
    for (key, v) in texts {
        if let Some(v) = v {
            limits.set(key, Text(v))?;
        }
    }
    let ints = [
        ("max_header_bytes", p.max_header_bytes),
        ("max_headers", p.max_headers),
        ("max_connections", p.max_connections),
    ];
    for (key, v) in ints {
        if let Some(v) = v {
            limits.set(key, Int(v))?;
        }
    }
    match &p.max_body_bytes {
        None => {}
        Some(toml::Value::Integer(n)) => limits.set("max_body_bytes", Int(*n))?,
        Some(toml::Value::String(s)) => limits.set("max_body_bytes", Text(s))?,
        Some(other) => limits.set("max_body_bytes", Text(&other.to_string()))?,
    }
    Ok(Box::new(limits))
}

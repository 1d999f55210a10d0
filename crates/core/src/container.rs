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
    max_header_bytes: Option<i64>,
    max_headers: Option<i64>,
    max_connections: Option<i64>,
    upstream_connect_timeout: Option<String>,
    upstream_header_timeout: Option<String>,
    body_timeout: Option<String>,
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
    let listen = p.listen.unwrap_or_else(|| "0.0.0.0:80".into());
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return Err((
            "proxy.listen".into(),
            format!("expected ADDRESS:PORT like \"0.0.0.0:80\", got {listen:?}"),
        ));
    }
    let install_dir = p
        .install_dir
        .unwrap_or_else(|| "/usr/local/lib/cutover".into());
    if !install_dir.starts_with('/') || install_dir.split('/').any(|c| c == "..") {
        return Err((
            "proxy.install_dir".into(),
            format!("expected an absolute path, got {install_dir:?}"),
        ));
    }
    Ok(ProxySettings {
        limits,
        listen,
        drain: dur("proxy.drain", &p.drain, Duration::from_secs(30))?,
        hold: dur("proxy.hold", &p.hold, Duration::from_secs(30))?,
        install_dir: install_dir.trim_end_matches('/').to_string(),
    })
}

/// The `[proxy]` limit keys.
fn proxy_limits(p: &RawProxy) -> Result<Box<crate::proxy_limits::ProxyLimits>, Err> {
    use crate::proxy_limits::RawValue::{Int, Text};
    let mut limits = crate::proxy_limits::ProxyLimits::default();
    let texts = [
        ("header_timeout", &p.header_timeout),
        ("upstream_connect_timeout", &p.upstream_connect_timeout),
        ("upstream_header_timeout", &p.upstream_header_timeout),
        ("body_timeout", &p.body_timeout),
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
    Ok(Box::new(limits))
}

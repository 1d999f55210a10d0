//! `[proxy]` limit keys: what the edge proxy allows hostile clients and broken upstreams, and
//! how they travel to `cutover proxy run` on each host (one `--limits` argument, written by
//! [`ProxyLimits::to_arg`] and read back by [`ProxyLimits::parse_arg`] with the same checks).
//! Defaults are close to nginx's (see `cutover_proxy::Limits`, which these become).

use crate::duration::parse_duration;
use std::time::Duration;

/// Validated `[proxy]` limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLimits {
    /// `header_timeout`: to send a request head (the first from the accept).
    pub header_timeout: Duration,
    /// `idle_timeout`: how long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// `max_header_bytes`: the largest request head (431 above).
    pub max_header_bytes: u64,
    /// `max_headers`: the most header lines in a request head (431 above).
    pub max_headers: u64,
    /// `max_connections`: client connections open at once (503 above, after idle ones close).
    pub max_connections: u64,
    /// `upstream_connect_timeout`: to connect to the app (502 after).
    pub upstream_connect_timeout: Duration,
    /// `upstream_header_timeout`: for the app's response head (504 after).
    pub upstream_header_timeout: Duration,
    /// `body_timeout`: the longest pause of a client sending a body (408 after).
    pub body_timeout: Duration,
    /// `upstream_body_timeout`: the longest pause of the app in a response body (cut after).
    pub upstream_body_timeout: Duration,
    /// `send_timeout`: the longest a client may take nothing of what is sent to it (closed
    /// after).
    pub send_timeout: Duration,
    /// `max_body_bytes`: the largest request body (413 above); 0, the default: no cap.
    pub max_body_bytes: u64,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 16_384,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_body_bytes: 0,
        }
    }
}

/// A `[proxy]` limit as written in `cutover.toml`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawValue<'a> {
    Text(&'a str),
    Int(i64),
}

const KEYS: [&str; 11] = [
    "header_timeout",
    "idle_timeout",
    "max_header_bytes",
    "max_headers",
    "max_connections",
    "upstream_connect_timeout",
    "upstream_header_timeout",
    "body_timeout",
    "upstream_body_timeout",
    "send_timeout",
    "max_body_bytes",
];

/// The largest `max_body_bytes` (1 TiB).
const MAX_BODY_CAP: u64 = 1 << 40;

/// A size: a whole number of bytes, optionally followed by `B`, `K`, `KiB`, `M`, `MiB`, `G` or
/// `GiB` (any case, binary multiples, as nginx's `1m`), at most [`MAX_BODY_CAP`].
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift).filter(|n| *n <= MAX_BODY_CAP)
}

impl ProxyLimits {
    /// Sets one key; the error is `(proxy.KEY, message)`.
    pub(crate) fn set(&mut self, key: &str, value: RawValue<'_>) -> Result<(), (String, String)> {
        let name = format!("proxy.{key}");
        let err = |m: String| (name.clone(), m);
        let dur = || match value {
            RawValue::Text(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => Err(err("must be longer than 0s".into())),
                Ok(d) => Ok(d),
                Err(m) => Err(err(m)),
            },
            RawValue::Int(n) => Err(err(format!(
                "expected a duration like \"60s\", got the number {n}"
            ))),
        };
        let count = |lo: u64, hi: u64| {
            let n = match value {
                RawValue::Int(n) => n,
                RawValue::Text(s) => s
                    .parse::<i64>()
                    .map_err(|_| err(format!("expected a whole number, got {s:?}")))?,
            };
            match u64::try_from(n) {
                Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(err(format!("expected a number from {lo} to {hi}, got {n}"))),
            }
        };
        match key {
            "header_timeout" => self.header_timeout = dur()?,
            "idle_timeout" => self.idle_timeout = dur()?,
            "max_header_bytes" => self.max_header_bytes = count(1024, 1024 * 1024)?,
            "max_headers" => self.max_headers = count(1, 10_000)?,
            "max_connections" => self.max_connections = count(1, 1_000_000)?,
            "upstream_connect_timeout" => self.upstream_connect_timeout = dur()?,
            "upstream_header_timeout" => self.upstream_header_timeout = dur()?,
            "body_timeout" => self.body_timeout = dur()?,
            "upstream_body_timeout" => self.upstream_body_timeout = dur()?,
            "send_timeout" => self.send_timeout = dur()?,
            "max_body_bytes" => {
                let (size, got) = match value {
                    RawValue::Int(n) => (
                        u64::try_from(n).ok().filter(|n| *n <= MAX_BODY_CAP),
                        n.to_string(),
                    ),
                    RawValue::Text(s) => (parse_size(s), format!("{s:?}")),
                };
                self.max_body_bytes = size.ok_or_else(|| {
                    err(format!(
                        "expected a size like \"100MiB\" (bytes, or KiB, MiB, GiB; 0: no cap), got {got}"
                    ))
                })?;
            }
            other => {
                return Err((
                    "proxy.limits".into(),
                    format!("unknown limit {other:?} (known: {})", KEYS.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// The `--limits` argument of `cutover proxy run`: `key=value,...`, every key.
    pub fn to_arg(&self) -> String {
        format!(
            "header_timeout={}ms,idle_timeout={}ms,max_header_bytes={},max_headers={},max_connections={},\
             upstream_connect_timeout={}ms,upstream_header_timeout={}ms,body_timeout={}ms,\
             upstream_body_timeout={}ms,send_timeout={}ms,max_body_bytes={}",
            self.header_timeout.as_millis(),
            self.idle_timeout.as_millis(),
            self.max_header_bytes,
            self.max_headers,
            self.max_connections,
            self.upstream_connect_timeout.as_millis(),
            self.upstream_header_timeout.as_millis(),
            self.body_timeout.as_millis(),
            self.upstream_body_timeout.as_millis(),
            self.send_timeout.as_millis(),
            self.max_body_bytes,
        )
    }

    /// Reads a `--limits` argument (keys left out keep their defaults); the error names the
    /// key.
    pub fn parse_arg(arg: &str) -> Result<ProxyLimits, (String, String)> {
        let mut limits = ProxyLimits::default();
        for part in arg.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err((
                    "proxy.limits".into(),
                    format!("expected KEY=VALUE, got {part:?}"),
                ));
            };
            limits.set(k.trim(), RawValue::Text(v.trim()))?;
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_nginx_and_binary_units() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("100MiB"), Some(100 << 20));
        assert_eq!(parse_size("8 KiB"), Some(8 << 10));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1024GiB"), Some(1 << 40));
        assert_eq!(parse_size("1025GiB"), None);
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
    }

    #[test]
    fn round_trips_through_the_argument() {
        let mut l = ProxyLimits::default();
        l.set("header_timeout", RawValue::Text("5s")).unwrap();
        l.set("max_connections", RawValue::Int(100)).unwrap();
        l.set("upstream_body_timeout", RawValue::Text("10m"))
            .unwrap();
        assert_eq!(l.upstream_body_timeout, Duration::from_secs(600));
        l.set("send_timeout", RawValue::Text("90s")).unwrap();
        l.set("max_body_bytes", RawValue::Text("100MiB")).unwrap();
        assert_eq!(l.max_body_bytes, 100 << 20);
        assert_eq!(ProxyLimits::parse_arg(&l.to_arg()), Ok(l.clone()));
        assert_eq!(ProxyLimits::parse_arg(""), Ok(ProxyLimits::default()));
    }

    #[test]
    fn refuses_bad_values_naming_the_key() {
        let cases = [
            (
                "header_timeout",
                RawValue::Text("0s"),
                "must be longer than 0s",
            ),
            (
                "body_timeout",
                RawValue::Int(60),
                "expected a duration like \"60s\", got the number 60",
            ),
            (
                "max_header_bytes",
                RawValue::Int(100),
                "expected a number from 1024 to 1048576, got 100",
            ),
            (
                "max_connections",
                RawValue::Int(-1),
                "expected a number from 1 to 1000000, got -1",
            ),
            (
                "max_body_bytes",
                RawValue::Text("10 parsecs"),
                "expected a size like \"100MiB\" (bytes, or KiB, MiB, GiB; 0: no cap), got \"10 parsecs\"",
            ),
            (
                "max_body_bytes",
                RawValue::Int(-5),
                "expected a size like \"100MiB\" (bytes, or KiB, MiB, GiB; 0: no cap), got -5",
            ),
        ];
        for (key, value, msg) in cases {
            let e = ProxyLimits::default().set(key, value).unwrap_err();
            assert_eq!(e, (format!("proxy.{key}"), msg.to_string()));
        }
        let e = ProxyLimits::parse_arg("nope=1").unwrap_err();
        assert_eq!(e.0, "proxy.limits");
    }
}

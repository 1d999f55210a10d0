//! The health gate: GET the `[health] url` as the host sees it (through a port forwarded over
//! the host's SSH connection, or directly for `local`), until `healthy_after` consecutive
//! answers carry the expected status, or `give_up_after` passes. A failing gate returns a
//! diagnosis a person can act on: the last status, a body snippet, a redirect target or the
//! connection error.

use cutover_remote::Endpoint;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// One probe's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub status: Option<u16>,
    pub location: Option<String>,
    pub body: String,
    pub error: Option<String>,
}

impl Probe {
    fn error(e: impl Into<String>) -> Probe {
        Probe {
            status: None,
            location: None,
            body: String::new(),
            error: Some(e.into()),
        }
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => {
                let mut d = format!("HTTP {s}");
                if let Some(l) = &self.location {
                    d.push_str(&format!(", redirect to {l}"));
                }
                let body = self.body.trim();
                if !body.is_empty() {
                    d.push_str(&format!(", body: {body:?}"));
                }
                d
            }
            (None, None) => "no answer".into(),
        }
    }
}

/// What the gate asks for.
#[derive(Debug, Clone)]
pub struct GateSpec {
    pub host_header: String,
    pub path: String,
    pub expect: u16,
    pub timeout: Duration,
    pub interval: Duration,
    pub healthy_after: u32,
    pub give_up_after: Duration,
}

/// How the gate ended.
#[derive(Debug, Clone)]
pub struct GateResult {
    pub healthy: bool,
    pub probes: u32,
    pub last: Probe,
    pub elapsed: Duration,
}

/// Probes until healthy or out of time.
pub fn run_gate(endpoint: &Endpoint, spec: &GateSpec) -> GateResult {
    let start = Instant::now();
    let mut passes = 0;
    let mut probes = 0;
    loop {
        let p = probe(endpoint, &spec.host_header, &spec.path, spec.timeout);
        probes += 1;
        if p.error.is_none() && p.status == Some(spec.expect) {
            passes += 1;
            if passes >= spec.healthy_after {
                return GateResult {
                    healthy: true,
                    probes,
                    last: p,
                    elapsed: start.elapsed(),
                };
            }
        } else {
            passes = 0;
        }
        if start.elapsed() + spec.interval > spec.give_up_after {
            return GateResult {
                healthy: false,
                probes,
                last: p,
                elapsed: start.elapsed(),
            };
        }
        std::thread::sleep(spec.interval);
    }
}

/// What a bake saw: every probe of the window, and the last one that failed.
#[derive(Debug, Clone)]
pub struct BakeResult {
    pub probes: u32,
    pub failed: u32,
    pub last_failure: Option<Probe>,
}

impl BakeResult {
    /// Whether the failed share stayed within `max_error_rate`.
    pub fn passed(&self, max_error_rate: f64) -> bool {
        self.probes > 0 && f64::from(self.failed) <= max_error_rate * f64::from(self.probes)
    }
}

/// Probes every `spec.interval` for `window` after a gate passed; stops early once so many
/// probes failed that the window can no longer pass.
pub fn run_bake(
    endpoint: &Endpoint,
    spec: &GateSpec,
    window: Duration,
    max_error_rate: f64,
) -> BakeResult {
    let start = Instant::now();
    let expected = (window.as_secs_f64() / spec.interval.as_secs_f64().max(0.001))
        .ceil()
        .max(1.0);
    let mut r = BakeResult {
        probes: 0,
        failed: 0,
        last_failure: None,
    };
    loop {
        let p = probe(endpoint, &spec.host_header, &spec.path, spec.timeout);
        r.probes += 1;
        if p.error.is_some() || p.status != Some(spec.expect) {
            r.failed += 1;
            r.last_failure = Some(p);
            if f64::from(r.failed) > max_error_rate * expected {
                return r;
            }
        }
        if start.elapsed() + spec.interval > window {
            return r;
        }
        std::thread::sleep(spec.interval);
    }
}

/// One GET.
pub fn probe(endpoint: &Endpoint, host_header: &str, path: &str, timeout: Duration) -> Probe {
    let deadline = Instant::now() + timeout;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: cutover-gate\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let result = match endpoint {
        Endpoint::Tcp(addr) => TcpStream::connect_timeout(addr, timeout)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))
            .and_then(|s| exchange(s, &request, deadline)),
        Endpoint::Unix(p) => UnixStream::connect(p)
            .map_err(|e| format!("cannot open the forwarded port: {e}"))
            .and_then(|s| exchange(s, &request, deadline)),
    };
    match result {
        Ok(raw) if raw.is_empty() => Probe::error(format!(
            "connection closed without an answer (is anything listening on {host_header} on the host?)"
        )),
        Ok(raw) => parse_response(&raw),
        Err(e) => Probe::error(e),
    }
}

trait Stream: Read + Write {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()>;
}
impl Stream for TcpStream {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}
impl Stream for UnixStream {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

fn exchange(mut s: impl Stream, request: &str, deadline: Instant) -> Result<Vec<u8>, String> {
    let left = |d: Instant| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_timeouts(left(deadline)).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if Instant::now() >= deadline {
            return Err("timed out waiting for the answer".into());
        }
        s.set_timeouts(left(deadline)).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 * 1024 || head_and_body_complete(&buf) {
                    return Ok(buf);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out waiting for the answer".into())
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => {
                return Ok(buf)
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

fn head_and_body_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    matches!(len, Some(n) if buf.len() >= end + 4 + n.min(4096))
}

fn parse_response(raw: &[u8]) -> Probe {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok());
    let Some(status) = status else {
        return Probe::error(format!(
            "not an HTTP answer: {:?}",
            status_line.chars().take(80).collect::<String>()
        ));
    };
    let location = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("location")
            .then(|| v.trim().to_string())
    });
    let body_start = (end + 4).min(raw.len());
    let body: String = String::from_utf8_lossy(&raw[body_start..])
        .chars()
        .take(200)
        .collect();
    Probe {
        status: Some(status),
        location,
        body,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> Endpoint {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(3) {
                let mut s = s.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        Endpoint::Tcp(addr)
    }

    #[test]
    fn parses_status_location_and_body() {
        let e =
            serve_once("HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 5\r\n\r\nhello");
        let p = probe(&e, "x", "/up", Duration::from_secs(2));
        assert_eq!(p.status, Some(302));
        assert_eq!(p.location.as_deref(), Some("/login"));
        assert_eq!(p.body, "hello");
        assert!(p.describe().contains("redirect to /login"));
    }

    #[test]
    fn refused_connection_is_described() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let p = probe(&Endpoint::Tcp(addr), "x", "/", Duration::from_secs(1));
        assert!(p.error.unwrap().contains("cannot connect"));
    }

    #[test]
    fn gate_needs_consecutive_passes_and_gives_up() {
        let e = serve_once("HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom");
        let spec = GateSpec {
            host_header: "x".into(),
            path: "/up".into(),
            expect: 200,
            timeout: Duration::from_millis(500),
            interval: Duration::from_millis(50),
            healthy_after: 2,
            give_up_after: Duration::from_millis(120),
        };
        let r = run_gate(&e, &spec);
        assert!(!r.healthy);
        assert_eq!(r.last.status, Some(500));
        assert!(r.last.describe().contains("boom"));
    }

    /// A server that answers 500 to every `nth` request (from the first), 200 to the rest.
    fn serve_failing(nth: usize) -> Endpoint {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (k, c) in l.incoming().enumerate() {
                let Ok(mut c) = c else { break };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let answer = if k % nth == 0 {
                    "HTTP/1.1 500 Oops\r\nContent-Length: 4\r\nConnection: close\r\n\r\nboom"
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        Endpoint::Tcp(addr)
    }

    #[test]
    fn a_bake_fails_when_more_probes_fail_than_the_rate_allows() {
        let spec = GateSpec {
            host_header: "x".into(),
            path: "/up".into(),
            expect: 200,
            timeout: Duration::from_millis(500),
            interval: Duration::from_millis(20),
            healthy_after: 1,
            give_up_after: Duration::from_secs(1),
        };
        // One probe in five fails: 20% is over 10%, under 30%.
        let e = serve_failing(5);
        let r = run_bake(&e, &spec, Duration::from_millis(400), 0.1);
        assert!(!r.passed(0.1), "{r:?}");
        assert_eq!(r.last_failure.unwrap().status, Some(500));
        let e = serve_failing(5);
        let r = run_bake(&e, &spec, Duration::from_millis(400), 0.3);
        assert!(r.passed(0.3), "{r:?}");
        assert!(r.probes >= 10, "{r:?}");
    }
}

//! The `tls` scenario's switch table: each TLS-terminating proxy is switched K times between
//! two backends while h2load keeps it busy over HTTPS, once with HTTP/2 and once with
//! HTTP/1.1 keep-alive; per run, the failed requests and the longest time without a
//! successful response. The switches are what an operator would run on the same machine:
//! cutover's `proxy deploy` (gate, pointer swap, drain), nginx's config rewritten and
//! reloaded (SIGHUP to the master), Caddy's upstream PATCHed through its admin API.

use crate::report;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One proxy to switch: how to point it at a backend port.
pub(crate) struct Flip<'a> {
    pub(crate) name: &'static str,
    pub(crate) key: &'static str,
    pub(crate) port: u16,
    pub(crate) switch: Box<dyn Fn(u16) -> Result<()> + 'a>,
}

/// One run's result.
struct SwitchRun {
    proxy: &'static str,
    key: &'static str,
    client: &'static str,
    switches: usize,
    requests: u64,
    failed: u64,
    gap_ms: f64,
    switch_s: Vec<f64>,
}

/// The longest time (ms) between the ends of two consecutive 2xx responses in an h2load
/// `--log-file` (start µs since the epoch, status, duration µs per line).
pub(crate) fn longest_gap_ms(log: &str) -> f64 {
    let mut ends: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let start = f.first()?.trim().parse::<f64>().ok()?;
            let status = f.get(1)?.trim().parse::<u16>().ok()?;
            let dur = f.get(2)?.trim().parse::<f64>().ok()?;
            (200..300).contains(&status).then_some(start + dur)
        })
        .collect();
    ends.sort_by(f64::total_cmp);
    ends.windows(2)
        .map(|w| (w[1] - w[0]) / 1000.0)
        .fold(0.0, f64::max)
}

/// Runs h2load for `secs` against `port` (`h1`: HTTP/1.1), logging every request to `log`.
fn start_h2load(port: u16, h1: bool, secs: usize, log: &Path) -> Result<Child> {
    let _ = std::fs::remove_file(log);
    let mut cmd = Command::new("h2load");
    cmd.args(["-t2", "-c8", "-m1"])
        .arg(format!("-D{secs}"))
        .arg(format!("--connect-to=127.0.0.1:{port}"))
        .arg(format!("--log-file={}", log.display()));
    if h1 {
        cmd.arg("--h1");
    }
    cmd.arg(format!("https://localhost:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting h2load")
}

fn one_run(
    flip: &Flip<'_>,
    h1: bool,
    k: usize,
    backends: [u16; 2],
    next: &mut usize,
    work: &Path,
) -> Result<SwitchRun> {
    let client = if h1 { "HTTP/1.1 keep-alive" } else { "HTTP/2" };
    let log = work.join(format!(
        "switch-{}-{}.log",
        flip.key,
        if h1 { "h1" } else { "h2" }
    ));
    let load = start_h2load(flip.port, h1, k + 2, &log)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut switch_s = Vec::new();
    for _ in 0..k {
        *next = 1 - *next;
        let t = Instant::now();
        (flip.switch)(backends[*next])
            .with_context(|| format!("switching {} to :{}", flip.name, backends[*next]))?;
        switch_s.push(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let out = load.wait_with_output().context("waiting for h2load")?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (_, done, failed) = crate::tls::parse_h2load(&out)?;
    let text = std::fs::read_to_string(&log).with_context(|| format!("{}", log.display()))?;
    Ok(SwitchRun {
        proxy: flip.name,
        key: flip.key,
        client,
        switches: k,
        requests: done,
        failed,
        gap_ms: longest_gap_ms(&text),
        switch_s,
    })
}

/// Switches every proxy `k` times under HTTP/2 and then HTTP/1.1 load; the table (with its
/// heading) and the runs' JSON. `backends[0]` is the one every proxy serves at the start.
pub(crate) fn measure(
    flips: &[Flip<'_>],
    k: usize,
    backends: [u16; 2],
    work: &Path,
) -> Result<(String, Value)> {
    let mut runs = Vec::new();
    for flip in flips {
        let mut next = 0;
        for h1 in [false, true] {
            let r = one_run(flip, h1, k, backends, &mut next, work)?;
            eprintln!(
                "[tls] switches: {} {}: {} requests, {} failed, longest gap {:.0} ms",
                r.proxy, r.client, r.requests, r.failed, r.gap_ms
            );
            runs.push(r);
        }
    }
    if runs.iter().any(|r| r.requests == 0) {
        bail!("a switch run answered no request");
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let (m, lo, hi) = report::spread(&r.switch_s);
            vec![
                r.proxy.to_string(),
                r.client.to_string(),
                r.requests.to_string(),
                r.failed.to_string(),
                format!("{:.1}", r.failed as f64 / r.switches.max(1) as f64),
                format!("{:.0} ms", r.gap_ms),
                format!("{m:.2} s ({lo:.2}–{hi:.2})"),
            ]
        })
        .collect();
    let mut md = format!("\n**Switches under HTTPS load** ({k} per run):\n\n");
    md.push_str(&report::table(
        &[
            "proxy",
            "client",
            "requests",
            "failed",
            "failed per switch",
            "longest gap",
            "switch time",
        ],
        &rows,
    ));
    let json = runs
        .iter()
        .map(|r| {
            json!({
                "proxy": r.key,
                "client": r.client,
                "switches": r.switches,
                "requests": r.requests,
                "failed": r.failed,
                "longest_gap_ms": r.gap_ms,
                "switch_s": r.switch_s,
            })
        })
        .collect();
    Ok((md, Value::Array(json)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_between_successful_response_ends() {
        let log = "1000000\t200\t1000\n1002000\t200\t1000\n1003500\t503\t10\n1010000\t200\t500\n";
        // Ends: 1001000, 1003000, (503 ignored), 1010500: gaps 2 ms and 7.5 ms.
        assert_eq!(longest_gap_ms(log), 7.5);
        assert_eq!(longest_gap_ms(""), 0.0);
    }
}

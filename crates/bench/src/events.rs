//! cutover's event stream: `cutover deploy|rollback --events` prints on stdout one JSON object
//! per line as each step starts and ends,
//!
//! ```text
//! {"event":"step","run":12,"seq":7,"app":"site","release":"20261204T184000Z-3f9a2c1",
//!  "host":"web1","step":"stage","state":"start","time":"2026-12-04T18:40:00.123Z","detail":"..."}
//! ```
//!
//! (`host` null for run-wide steps; `state` one of `start`, `done`, `failed`; `time` UTC with
//! milliseconds), then a last line `{"event":"outcome", ...}` with the fields `--json` prints.
//! [`run`] spawns a command with `--events`, parses its stdout and puts every step on the
//! timeline of the command's spawn, from the events' own `time` (not from when the bench
//! read them), so phases are timed by cutover's clock. Unknown keys and unknown kinds of event
//! are ignored.

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Start,
    Done,
    Failed,
    /// Any other state (the engine also reports a build's output lines): no timing uses it.
    #[serde(other)]
    Other,
}

impl State {
    /// `done` or `failed`: the step is over.
    pub(crate) fn ended(self) -> bool {
        matches!(self, State::Done | State::Failed)
    }

    fn as_str(self) -> &'static str {
        match self {
            State::Start => "start",
            State::Done => "done",
            State::Failed => "failed",
            State::Other => "other",
        }
    }
}

/// One `{"event":"step", ...}` line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct StepEvent {
    pub(crate) run: i64,
    /// The event's number in cutover's history (null if it could not be recorded).
    pub(crate) seq: Option<i64>,
    pub(crate) app: String,
    pub(crate) release: Option<String>,
    /// `None` for run-wide steps.
    pub(crate) host: Option<String>,
    pub(crate) step: String,
    pub(crate) state: State,
    /// `time`, as seconds since the Unix epoch.
    #[serde(rename = "time", deserialize_with = "utc_ms")]
    pub(crate) epoch_s: f64,
    #[serde(default)]
    pub(crate) detail: Option<String>,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Event {
    Step(StepEvent),
    /// The fields `--json` prints (without `event`).
    Outcome(serde_json::Map<String, Value>),
    #[serde(other)]
    Other,
}

/// Parses one line of the stream.
pub(crate) fn parse_line(line: &str) -> Result<Event> {
    serde_json::from_str(line).with_context(|| format!("not a cutover event: {line:?}"))
}

fn utc_ms<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let s = String::deserialize(d)?;
    parse_utc(&s).ok_or_else(|| {
        serde::de::Error::custom(format!("time {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ (UTC)"))
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` as seconds since the Unix epoch.
fn parse_utc(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if d.next().is_some()
        || t.next().is_some()
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let frac: f64 = if frac.is_empty() {
        0.0
    } else if frac.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.{frac}").parse().ok()?
    } else {
        return None;
    };
    // Days from 1970-01-01 of the proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

/// A step on the timeline of its command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// Seconds since the command was spawned.
    pub(crate) at: f64,
    /// `None` for run-wide steps.
    pub(crate) host: Option<String>,
    pub(crate) step: String,
    pub(crate) state: State,
    pub(crate) detail: String,
}

impl Step {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "at_s": self.at,
            "host": self.host,
            "step": self.step,
            "state": self.state.as_str(),
            "detail": self.detail,
        })
    }
}

/// The steps of one command, in the order they were printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Trace {
    pub(crate) steps: Vec<Step>,
}

impl Trace {
    /// The step events of a stream, on the timeline of a command spawned at `spawned_epoch_s`
    /// (seconds since the Unix epoch), and the outcome (`Value::Null` without one).
    pub(crate) fn from_events(events: Vec<Event>, spawned_epoch_s: f64) -> (Trace, Value) {
        let mut steps = Vec::new();
        let mut outcome = Value::Null;
        for e in events {
            match e {
                Event::Step(s) => steps.push(Step {
                    at: s.epoch_s - spawned_epoch_s,
                    host: s.host,
                    step: s.step,
                    state: s.state,
                    detail: s.detail.unwrap_or_default(),
                }),
                Event::Outcome(o) => outcome = Value::Object(o),
                Event::Other => {}
            }
        }
        (Trace { steps }, outcome)
    }

    fn times(&self, step: &str, ended: bool) -> impl Iterator<Item = f64> + '_ {
        let step = step.to_string();
        self.steps
            .iter()
            .filter(move |s| {
                s.step == step
                    && if ended {
                        s.state.ended()
                    } else {
                        s.state == State::Start
                    }
            })
            .map(|s| s.at)
    }

    /// When `step` first started (any host, or run-wide).
    pub(crate) fn first_start(&self, step: &str) -> Option<f64> {
        self.times(step, false).reduce(f64::min)
    }

    /// When `step` last ended (`done` or `failed`; any host, or run-wide).
    pub(crate) fn last_end(&self, step: &str) -> Option<f64> {
        self.times(step, true).reduce(f64::max)
    }

    /// Per host, seconds from its `step` start to its `step` done.
    pub(crate) fn per_host(&self, step: &str) -> Vec<f64> {
        let mut starts = BTreeMap::new();
        let mut out = Vec::new();
        for s in self.steps.iter().filter(|s| s.step == step) {
            let Some(host) = &s.host else { continue };
            match s.state {
                State::Start => {
                    starts.insert(host.clone(), s.at);
                }
                State::Done => {
                    if let Some(t) = starts.get(host) {
                        out.push(s.at - t);
                    }
                }
                State::Failed | State::Other => {}
            }
        }
        out
    }

    /// Consecutive phases of a deploy as (name, seconds); they add up to `total` (the wall
    /// time). Every phase waits for all hosts before the next starts, so a phase ends when
    /// its last host reports `done` (or `failed`).
    pub(crate) fn phases(&self, total: f64) -> Vec<(&'static str, f64)> {
        let marks = [
            ("check the tree", self.first_start("connect")),
            ("connect (ssh master)", self.last_end("connect")),
            ("prepare (lock, list)", self.last_end("prepare")),
            (
                "stage (pack + upload + unpack, streamed)",
                self.last_end("stage"),
            ),
            ("switch", self.last_end("switch")),
            ("health gate", self.last_end("gate")),
            ("prune, unlock, exit", Some(total)),
        ];
        let mut out = Vec::new();
        let mut at = 0.0;
        for (name, t) in marks {
            let t = t.unwrap_or(at).max(at);
            out.push((name, t - at));
            at = t;
        }
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        Value::Array(self.steps.iter().map(Step::to_json).collect())
    }
}

/// How a command run with `--events` ended.
#[derive(Debug, Clone)]
pub(crate) struct Traced {
    pub(crate) status: ExitStatus,
    /// Exit 0 and the outcome's `status` is `succeeded`.
    pub(crate) ok: bool,
    /// The outcome's `message` (or the end of stderr without one).
    pub(crate) message: String,
    pub(crate) outcome: Value,
    pub(crate) trace: Trace,
    pub(crate) stderr: String,
}

/// Seconds since the Unix epoch, now.
pub(crate) fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs `cmd` (a `cutover deploy|rollback ...`) with `--events` added, waits for it and
/// parses its stream. A failed command is returned (`ok: false`), not an error; a stream that
/// does not parse is an error.
pub(crate) fn run(mut cmd: Command) -> Result<Traced> {
    cmd.arg("--events")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = epoch_now();
    let mut child = cmd.spawn().context("running cutover")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(|l| l.ok())
        .collect();
    let status = child.wait()?;
    let stderr = err_reader
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))?;
    let events = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_line(l))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("cutover exited with {status}; stderr: {}", stderr.trim()))?;
    let (trace, outcome) = Trace::from_events(events, spawned);
    if outcome.is_null() && status.success() {
        bail!(
            "cutover exited 0 without an outcome line; stderr: {}",
            stderr.trim()
        );
    }
    let message = outcome["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| stderr.trim().lines().last().unwrap_or("").to_string());
    Ok(Traced {
        ok: status.success() && outcome["status"] == "succeeded",
        status,
        message,
        outcome,
        trace,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"event":"step","run":12,"seq":1,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web1","step":"connect","state":"start","time":"2026-12-04T18:40:00.123Z","detail":""}
{"event":"step","run":12,"seq":2,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web1","step":"connect","state":"done","time":"2026-12-04T18:40:00.300Z","detail":""}
{"event":"step","run":12,"seq":3,"app":"site","release":"20261204T184000Z-3f9a2c1","host":null,"step":"stage","state":"start","time":"2026-12-04T18:40:00.350Z","detail":"20261204T184000Z-3f9a2c1"}
{"event":"step","run":12,"seq":4,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web1","step":"stage","state":"start","time":"2026-12-04T18:40:00.400Z","detail":"...","future_key":[1,2]}
{"event":"step","run":12,"seq":5,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web2","step":"stage","state":"start","time":"2026-12-04T18:40:00.410Z","detail":"..."}
{"event":"step","run":12,"seq":6,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web1","step":"stage","state":"done","time":"2026-12-04T18:40:01.400Z","detail":"1.0 MiB"}
{"event":"step","run":12,"seq":7,"app":"site","release":"20261204T184000Z-3f9a2c1","host":"web2","step":"stage","state":"failed","time":"2026-12-04T18:40:01.910Z","detail":"disk full"}
{"event":"step","run":12,"seq":null,"app":"site","release":"","host":null,"step":"build","state":"output","time":"2026-12-04T18:40:02.000Z","detail":"a line"}
{"event":"heartbeat","run":12}
{"event":"outcome","status":"failed","exit_code":1,"message":"web2: stage failed: disk full","hosts":{"web1":{"uploaded_bytes":1048576}}}"#;

    #[test]
    fn parses_step_and_outcome_lines() {
        let events: Vec<Event> = SAMPLE.lines().map(|l| parse_line(l).unwrap()).collect();
        let Event::Step(first) = &events[0] else {
            panic!("{:?}", events[0])
        };
        assert_eq!(
            (
                first.run,
                first.seq,
                first.app.as_str(),
                first.release.as_deref()
            ),
            (12, Some(1), "site", Some("20261204T184000Z-3f9a2c1"))
        );
        assert_eq!(
            (first.host.as_deref(), first.step.as_str(), first.state),
            (Some("web1"), "connect", State::Start)
        );
        // 2026-12-04T18:40:00Z is 1_796_409_600 s after the epoch.
        assert!(
            (first.epoch_s - 1_796_409_600.123).abs() < 1e-6,
            "{}",
            first.epoch_s
        );
        assert!(matches!(&events[2], Event::Step(s) if s.host.is_none()));
        assert!(matches!(&events[7], Event::Step(s) if s.seq.is_none() && s.state == State::Other));
        assert_eq!(events[8], Event::Other);
        let Event::Outcome(o) = &events[9] else {
            panic!("{:?}", events[9])
        };
        assert_eq!(o["status"], "failed");
        assert!(!o.contains_key("event"));

        let (trace, outcome) = Trace::from_events(events, 1_796_409_600.0);
        assert_eq!(outcome["exit_code"], 1);
        assert_eq!(trace.steps.len(), 8);
        assert_eq!(
            trace.first_start("build"),
            None,
            "an output line is no start"
        );
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
        assert!(near(trace.first_start("connect"), 0.123));
        assert!(near(trace.last_end("connect"), 0.300));
        assert!(near(trace.first_start("stage"), 0.350));
        assert!(near(trace.last_end("stage"), 1.910));
        assert_eq!(trace.last_end("switch"), None);
        let per_host = trace.per_host("stage");
        assert_eq!(per_host.len(), 1, "the failed host has no stage time");
        assert!((per_host[0] - 1.0).abs() < 1e-6);
        let phases = trace.phases(2.5);
        let sum: f64 = phases.iter().map(|(_, s)| s).sum();
        assert!((sum - 2.5).abs() < 1e-9, "{phases:?}");
        assert!((phases[0].1 - 0.123).abs() < 1e-6, "{phases:?}");
        assert!(
            (phases[3].1 - 1.61).abs() < 1e-6,
            "stage ends at its last end: {phases:?}"
        );
    }

    #[test]
    fn refuses_what_is_not_the_stream() {
        for bad in [
            "host: stage done",
            r#"{"event":"step","run":1,"seq":1,"app":"a","release":"r","host":null,"step":"x","state":7,"time":"2026-12-04T18:40:00.123Z"}"#,
            r#"{"event":"step","run":1,"seq":1,"app":"a","release":"r","host":null,"step":"x","state":"start","time":"2026-12-04 18:40:00"}"#,
            r#"{"event":"step","seq":1,"app":"a","release":"r","host":null,"step":"x","state":"start","time":"2026-12-04T18:40:00.123Z"}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utc_times() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_utc("2000-03-01T00:00:01.5Z"), Some(951_868_801.5));
        assert_eq!(
            parse_utc("2024-02-29T23:59:59.999Z"),
            Some(1_709_251_199.999)
        );
        assert_eq!(parse_utc("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("2024-01-01T00:00:00+01:00"), None);
    }
}

//! Output: per-host progress bars on a TTY, plain lines otherwise, nothing on stdout with
//! `--json`, one JSON object per event on stdout with `--events`, all drawn from the same
//! engine events; and the tables that `history`, `status` and `check` print.

use cutover_engine::{Event, Outcome, Phase, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

/// What `deploy` and `rollback` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Progress for people on stderr, the outcome in words.
    Human,
    /// `--json`: one JSON document on stdout at the end.
    Json,
    /// `--events`: one JSON object per line on stdout as it happens, the outcome last.
    Events,
}

impl Mode {
    pub(crate) fn of(json: bool, events: bool) -> Mode {
        match (json, events) {
            (_, true) => Mode::Events,
            (true, false) => Mode::Json,
            (false, false) => Mode::Human,
        }
    }
}

/// How progress is shown.
pub(crate) enum Progress {
    Bars {
        multi: MultiProgress,
        bars: Mutex<BTreeMap<String, ProgressBar>>,
    },
    Lines,
    Quiet,
    /// One JSON line per event on stdout (a lock keeps lines whole).
    Events(Mutex<std::io::Stdout>),
}

/// One `--events` line.
#[derive(serde::Serialize)]
struct EventLine<'a> {
    event: &'static str,
    run: i64,
    seq: Option<i64>,
    app: &'a str,
    release: &'a str,
    host: Option<&'a str>,
    step: &'a str,
    state: &'a str,
    time: String,
    detail: &'a str,
}

/// The last `--events` line: the outcome, as `--json` prints it, tagged.
#[derive(serde::Serialize)]
struct OutcomeLine<'a> {
    event: &'static str,
    #[serde(flatten)]
    outcome: &'a Outcome,
}

pub(crate) fn print_outcome_line(o: &Outcome) {
    let line = OutcomeLine {
        event: "outcome",
        outcome: o,
    };
    match serde_json::to_string(&line) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

impl Progress {
    pub(crate) fn new(mode: Mode) -> Progress {
        if mode == Mode::Events {
            Progress::Events(Mutex::new(std::io::stdout()))
        } else if mode == Mode::Json {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            Progress::Bars {
                multi: MultiProgress::new(),
                bars: Mutex::new(BTreeMap::new()),
            }
        } else {
            Progress::Lines
        }
    }

    fn bar(&self, host: &str) -> Option<ProgressBar> {
        let Progress::Bars { multi, bars } = self else {
            return None;
        };
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            bars.entry(host.to_string())
                .or_insert_with(|| {
                    let b = multi.add(ProgressBar::new_spinner());
                    b.set_style(step_style());
                    b.set_prefix(host.to_string());
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                })
                .clone(),
        )
    }

    pub(crate) fn finish(&self) {
        if let Progress::Bars { bars, .. } = self {
            for b in bars.lock().unwrap_or_else(|p| p.into_inner()).values() {
                b.finish();
            }
        }
    }
}

impl Reporter for Progress {
    fn event(&self, e: &Event<'_>) {
        if let Progress::Events(out) = self {
            let line = EventLine {
                event: "step",
                run: e.run,
                seq: e.seq,
                app: e.app,
                release: e.release,
                host: e.host,
                step: e.step.as_str(),
                state: e.state.as_str(),
                time: e.time.to_string(),
                detail: e.detail,
            };
            if let Ok(s) = serde_json::to_string(&line) {
                use std::io::Write;
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(out, "{s}");
                let _ = out.flush();
            }
            return;
        }
        match e.shown {
            Some("") => {}
            Some(text) => self.note(text),
            None => self.step(e.host, e.step.as_str(), e.state, e.detail),
        }
    }

    fn bytes(&self, host: &str, sent: u64, total: u64) {
        self.draw_bytes(host, sent, total);
    }

    fn note(&self, text: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Events(_) | Progress::Lines => eprintln!("{text}"),
            Progress::Bars { multi, .. } => {
                let _ = multi.println(text);
            }
        }
    }
}

impl Progress {
    fn step(&self, host: Option<&str>, step: &str, phase: Phase, detail: &str) {
        let detail = detail.lines().next().unwrap_or("");
        match self {
            Progress::Quiet | Progress::Events(_) => {}
            Progress::Lines => {
                if host.is_some() || phase != Phase::Start {
                    let who = host.unwrap_or("all");
                    if detail.is_empty() {
                        eprintln!("{who}: {step} {}", phase.as_str());
                    } else {
                        eprintln!("{who}: {step} {}: {detail}", phase.as_str());
                    }
                }
            }
            Progress::Bars { .. } => {
                if let Some(b) = host.and_then(|h| self.bar(h)) {
                    let mark = match phase {
                        Phase::Start => "…",
                        Phase::Done => "ok",
                        Phase::Failed => "FAILED",
                        Phase::Output => "|",
                    };
                    b.set_message(format!("{step} {mark} {detail}"));
                }
            }
        }
    }

    fn draw_bytes(&self, host: &str, sent: u64, total: u64) {
        if let Some(b) = self.bar(host) {
            if sent >= total {
                // Back to the step view for switch and gate.
                b.set_style(step_style());
                b.set_message(format!("staged {}", human_bytes(total)));
            } else {
                if b.length() != Some(total) {
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:<24} stage [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_length(total);
                }
                b.set_position(sent);
            }
        }
    }
}

fn step_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:<24} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A plain text table: columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100 << 20), "100.0 MiB");
    }
}

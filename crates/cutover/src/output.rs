//! Output: per-host progress bars on a TTY, plain lines otherwise, nothing on stdout with
//! `--json`; and the tables that `history`, `status` and `check` print.

use cutover_engine::{Phase, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

/// How progress is shown.
pub(crate) enum Progress {
    Bars {
        multi: MultiProgress,
        bars: Mutex<BTreeMap<String, ProgressBar>>,
    },
    Lines,
    Quiet,
}

impl Progress {
    pub(crate) fn new(json: bool) -> Progress {
        if json {
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
    fn step(&self, host: Option<&str>, step: &str, phase: Phase, detail: &str) {
        let detail = detail.lines().next().unwrap_or("");
        match self {
            Progress::Quiet => {}
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
                    };
                    b.set_message(format!("{step} {mark} {detail}"));
                }
            }
        }
    }

    fn bytes(&self, host: &str, sent: u64, total: u64) {
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

    fn note(&self, text: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => eprintln!("{text}"),
            Progress::Bars { multi, .. } => {
                let _ = multi.println(text);
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

//! The access log: one line per request the proxy answered, in `access.log` beside the state
//! file, rotated by size (`access.log` -> `access.log.1`, one old file kept), so that it never
//! fills a disk and never floods the journal. Request paths take lines through a small shared
//! buffer; a writer task moves it to the file twice a second. It owns the file; it must not
//! decide anything about requests.
//!
//! A line: `TIME CLIENT METHOD HOST PATH STATUS MSms SERVICE TARGET` (`-` for what is unknown;
//! PATH without its query, which may carry a secret, `?...` marking that there was one; TARGET
//! is the address the request went to, which is the release's container; MS is the time to
//! the response head).
//!
//! Invariants:
//! - The buffer never holds more than [`MAX_PENDING`] bytes: when the disk is slower than
//!   the traffic, lines are dropped and counted, never queued without bound.
//! - The file never grows past its size limit by more than one flush.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::log;

/// Lines waiting for the writer, at most.
const MAX_PENDING: usize = 4 << 20;
/// How often the writer moves lines to the file.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// One request, as logged.
pub(crate) struct Entry<'a> {
    pub(crate) client: &'a str,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    /// The path without its query.
    pub(crate) path: &'a str,
    /// There was a query (logged as `?...`).
    pub(crate) query: bool,
    pub(crate) status: u16,
    pub(crate) micros: u128,
    pub(crate) service: &'a str,
    pub(crate) target: &'a str,
}

/// The access log of one proxy.
pub(crate) struct AccessLog {
    path: PathBuf,
    max_bytes: u64,
    pending: Mutex<String>,
    dropped: AtomicU64,
}

/// A line being made, per thread (see [`AccessLog::record`]).
#[derive(Default)]
struct Line {
    text: String,
    /// The second `second_text` (`2026-11-26T09:15:00`) is of.
    second: u64,
    second_text: String,
}

impl Line {
    /// Appends the timestamp of `ms` (as [`log::rfc3339`] has it).
    fn stamp(&mut self, ms: u64) {
        if self.second_text.is_empty() || self.second != ms / 1000 {
            let full = log::rfc3339(ms);
            self.second = ms / 1000;
            self.second_text.clear();
            self.second_text.push_str(full.get(..19).unwrap_or(&full));
        }
        self.text.push_str(&self.second_text);
        self.text.push('.');
        push_decimal(&mut self.text, ms % 1000, 3);
        self.text.push('Z');
    }
}

/// Appends `n` in decimal, zero-padded to at least `width` digits, as `{n:0width$}` would,
/// without the formatting machinery (which took about half of each line's instructions), and
/// a char at a time: the digits are ASCII, so nothing needs checking as UTF-8 (which cost
/// more than the digits).
fn push_decimal(text: &mut String, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in len..width {
        text.push('0');
    }
    for &d in digits[..len].iter().rev() {
        text.push(char::from(d));
    }
}

thread_local! {
    static LINE: std::cell::RefCell<Line> = std::cell::RefCell::new(Line::default());
}

/// A field as it goes on a line: printable ASCII without spaces, at most 512 bytes, else `-`
/// or cut.
fn field(s: &str) -> &str {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return "-";
    }
    &s[..s.len().min(512)]
}

impl AccessLog {
    pub(crate) fn new(path: PathBuf, max_bytes: u64) -> AccessLog {
        AccessLog {
            path,
            max_bytes,
            pending: Mutex::new(String::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues one line. The line is made outside the lock, in a buffer of the calling thread
    /// (no allocation once it has grown, and the seconds of the timestamp are formatted once
    /// per second per thread), so that the lock is held for one copy only.
    pub(crate) fn record(&self, e: &Entry<'_>) {
        // `try_with`: a request finishing while the thread's locals are torn down goes unlogged.
        let _ = LINE.try_with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            let line = &mut *line;
            line.text.clear();
            line.stamp(log::unix_ms(std::time::SystemTime::now()));
            for f in [e.client, e.method, e.host, e.path] {
                line.text.push(' ');
                line.text.push_str(field(f));
            }
            if e.query {
                line.text.push_str("?...");
            }
            let micros = u64::try_from(e.micros).unwrap_or(u64::MAX);
            line.text.push(' ');
            push_decimal(&mut line.text, u64::from(e.status), 1);
            line.text.push(' ');
            push_decimal(&mut line.text, micros / 1000, 1);
            line.text.push('.');
            push_decimal(&mut line.text, micros % 1000, 3);
            line.text.push_str("ms ");
            line.text.push_str(field(e.service));
            line.text.push(' ');
            line.text.push_str(field(e.target));
            line.text.push('\n');
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            if p.len() > MAX_PENDING {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            p.push_str(&line.text);
        });
    }

    /// Moves queued lines to the file, rotating it first if it is over its limit.
    pub(crate) fn flush(&self) {
        let lines = match self.pending.lock() {
            Ok(mut p) if !p.is_empty() => std::mem::take(&mut *p),
            _ => return,
        };
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size >= self.max_bytes {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            if let Err(e) = std::fs::rename(&self.path, &old) {
                log::line(format_args!("cannot rotate {}: {e}", self.path.display()));
            }
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(lines.as_bytes())?;
                if dropped > 0 {
                    writeln!(
                        f,
                        "{} {dropped} lines dropped: the log could not keep up",
                        log::now_rfc3339()
                    )?;
                }
                Ok(())
            });
        if let Err(e) = written {
            log::line(format_args!(
                "cannot write the access log {}: {e}",
                self.path.display()
            ));
        }
    }

    /// Flushes twice a second, for ever (the caller aborts it).
    pub(crate) async fn writer(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.flush()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_the_logs_own() {
        let mut line = Line::default();
        for ms in [
            0,
            1_795_684_500_123,
            1_795_684_500_999,
            1_795_684_501_007,
            951_782_400_000,
            1_795_684_501_070,
        ] {
            line.text.clear();
            line.stamp(ms);
            assert_eq!(line.text, log::rfc3339(ms));
        }
    }

    #[test]
    fn numbers_are_written_as_format_would() {
        for (n, width) in [(0, 1), (7, 3), (42, 3), (999, 3), (1000, 3), (65_535, 1)] {
            let mut text = String::new();
            push_decimal(&mut text, n, width);
            assert_eq!(text, format!("{n:0width$}"));
        }
        let mut text = String::new();
        push_decimal(&mut text, u64::MAX, 1);
        assert_eq!(text, u64::MAX.to_string());
    }

    #[test]
    fn lines_are_one_per_request_and_rotate_by_size() {
        let dir = std::env::temp_dir().join(format!("cutover-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = AccessLog::new(dir.join("access.log"), 200);
        let e = Entry {
            client: "10.0.0.1",
            method: "GET",
            host: "evil host\n",
            path: "/a",
            query: true,
            status: 200,
            micros: 1_234,
            service: "app",
            target: "127.0.0.1:3000",
        };
        log.record(&e);
        log.flush();
        let text = std::fs::read_to_string(dir.join("access.log")).unwrap();
        let (_, rest) = text.split_once(' ').unwrap();
        assert_eq!(
            rest,
            "10.0.0.1 GET - /a?... 200 1.234ms app 127.0.0.1:3000\n"
        );
        for _ in 0..4 {
            log.record(&e);
            log.flush();
        }
        assert!(dir.join("access.log.1").exists());
        let size = std::fs::metadata(dir.join("access.log")).unwrap().len();
        assert!(size < 400, "{size}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

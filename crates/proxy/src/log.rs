//! The proxy's log: one line per event on stderr, prefixed with a UTC timestamp and
//! `cutover-proxy:`. Under systemd stderr goes to the journal. This module must not buffer,
//! filter or rotate anything; it must stay cheap enough to call once per switch and once per
//! upstream error.

use std::fmt::Display;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one log line.
pub(crate) fn line(msg: impl Display) {
    eprintln!("{} cutover-proxy: {msg}", now_rfc3339());
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-26T09:15:00.123Z`.
pub(crate) fn now_rfc3339() -> String {
    format_rfc3339_ms(unix_ms(SystemTime::now()))
}

/// `ms` since the Unix epoch as `2026-11-26T09:15:00.123Z`.
pub(crate) fn rfc3339(ms: u64) -> String {
    format_rfc3339_ms(ms)
}

fn format_rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_795_684_500_123),
            "2026-11-26T09:15:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}

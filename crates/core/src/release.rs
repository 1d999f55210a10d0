//! Release ids (`20261126T091500Z-3f9a2c1`: sortable by time, carrying a short content id) and
//! UTC timestamps, computed from a clock value the caller passes in.

use std::fmt;

/// A release id: `YYYYMMDDTHHMMSSZ-<7 hex>` plus an optional `-N` when two releases of the same
/// artifact start in the same second. Ids sort by creation time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseId(String);

impl ReleaseId {
    /// A new id for an artifact whose sha256 is `sha256`, created at `unix_secs`.
    pub fn new(unix_secs: u64, sha256: &str, attempt: u32) -> ReleaseId {
        let short = &sha256[..sha256.len().min(7)];
        let ts = compact_utc(unix_secs);
        if attempt == 0 {
            ReleaseId(format!("{ts}-{short}"))
        } else {
            ReleaseId(format!("{ts}-{short}-{attempt}"))
        }
    }

    /// Accepts a string only if it has the shape of an id (so an id read back from a host or a
    /// user can be used in a path without further checks).
    pub fn parse(text: &str) -> Option<ReleaseId> {
        let b = text.as_bytes();
        if b.len() < 24 || b.len() > 40 {
            return None;
        }
        let ok_head = b[..8].iter().all(u8::is_ascii_digit)
            && b[8] == b'T'
            && b[9..15].iter().all(u8::is_ascii_digit)
            && b[15] == b'Z'
            && b[16] == b'-';
        let tail = &text[17..];
        let (short, n) = match tail.split_once('-') {
            Some((s, n)) => (s, Some(n)),
            None => (tail, None),
        };
        let ok_short = short.len() == 7
            && short
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        let ok_n = n
            .is_none_or(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|c| c.is_ascii_digit()));
        (ok_head && ok_short && ok_n).then(|| ReleaseId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Days since 1970-01-01 to a civil (year, month, day): the usual era-based conversion.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
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

fn parts(unix_secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil(days);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `2026-11-26T09:15:00Z`
pub fn format_utc(unix_secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = parts(unix_secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// Seconds since the epoch of a [`format_utc`] text (`2026-11-26T09:15:00Z`).
pub fn parse_utc(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from civil: the inverse of `civil`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// `20261126T091500Z`
pub fn compact_utc(unix_secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = parts(unix_secs);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_684_500), "2026-11-26T09:15:00Z");
        for t in [0, 951_782_400, 1_795_684_500, 1_795_684_559] {
            assert_eq!(parse_utc(&format_utc(t)), Some(t));
        }
        assert_eq!(parse_utc("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("yesterday"), None);
    }

    #[test]
    fn ids_sort_by_time_and_round_trip() {
        let sha = "3f9a2c1d".repeat(8);
        let a = ReleaseId::new(1_795_684_500, &sha, 0);
        assert_eq!(a.as_str(), "20261126T091500Z-3f9a2c1");
        let b = ReleaseId::new(1_795_684_501, "00000000", 0);
        assert!(a < b);
        assert_eq!(ReleaseId::parse(a.as_str()), Some(a.clone()));
        let c = ReleaseId::new(1_795_684_500, &sha, 2);
        assert_eq!(ReleaseId::parse(c.as_str()), Some(c));
    }

    #[test]
    fn parse_refuses_anything_else() {
        for bad in [
            "",
            "current",
            "../x",
            "20261126T091500Z-3f9a2c1/..",
            "20261126T091500Z-3F9A2C1",
            "20261126T091500Z-3f9a2c1.partial",
            "20261126T091500Z-3f9a2c1-",
        ] {
            assert_eq!(ReleaseId::parse(bad), None, "{bad}");
        }
    }
}

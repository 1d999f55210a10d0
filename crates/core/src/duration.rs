//! Human durations as they appear in `cutover.toml`: `500ms`, `2s`, `1m30s`, `1h`, `7d`.

use std::time::Duration;

/// Parses `"500ms"`, `"2s"`, `"1m30s"`, `"1h"`. A bare number is refused: the unit is part of the
/// meaning and a missing one is a common mistake.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("an empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration like \"500ms\", \"2s\" or \"1m30s\""
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => {
                return Err(format!(
                    "`{text}` has no unit: write e.g. \"{n}s\" or \"{n}ms\""
                ))
            }
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Formats a duration the way it is read back by [`parse_duration`], for messages.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    }

    #[test]
    fn refuses_missing_or_unknown_units() {
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn formats_back() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }
}

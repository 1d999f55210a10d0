//! Decisions over plain facts: the rollback target, and which release directories a host may
//! prune. Both are the places where a wrong answer destroys the way back, so they live here,
//! pure and tested.

use std::collections::BTreeSet;

/// What the history says about one release, as far as these decisions care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseFacts {
    pub id: String,
    /// `succeeded` means: verified healthy on every host of its deploy.
    pub succeeded: bool,
    pub bad: bool,
}

/// The newest release older than `live` that succeeded everywhere and is not marked bad.
/// `releases` is newest first. With no live release, the newest such release.
pub fn rollback_target<'a>(
    releases: &'a [ReleaseFacts],
    live: Option<&str>,
) -> Option<&'a ReleaseFacts> {
    releases
        .iter()
        .filter(|r| live.is_none_or(|l| r.id.as_str() < l))
        .find(|r| r.succeeded && !r.bad)
}

/// Which of `on_host` (completed release directory names) to delete so that at most `keep`
/// remain, never touching anything in `protect` (what `current` points at, the live release and
/// the rollback target). The newest are kept; protected ones count towards `keep`.
pub fn prune(on_host: &[String], keep: usize, protect: &BTreeSet<String>) -> Vec<String> {
    let mut sorted: Vec<&String> = on_host.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut kept = sorted
        .iter()
        .filter(|r| protect.contains(r.as_str()))
        .count();
    let mut delete = Vec::new();
    for r in sorted.iter().rev() {
        if protect.contains(r.as_str()) {
            continue;
        }
        if kept < keep {
            kept += 1;
        } else {
            delete.push((*r).clone());
        }
    }
    delete.sort();
    delete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, succeeded: bool, bad: bool) -> ReleaseFacts {
        ReleaseFacts {
            id: id.into(),
            succeeded,
            bad,
        }
    }

    #[test]
    fn rollback_skips_failed_bad_and_newer() {
        let rs = [
            r("5", true, false),
            r("4", true, false),
            r("3", false, false),
            r("2", true, true),
            r("1", true, false),
        ];
        assert_eq!(rollback_target(&rs, Some("4")).unwrap().id, "1");
        assert_eq!(rollback_target(&rs, Some("5")).unwrap().id, "4");
        assert_eq!(rollback_target(&rs, None).unwrap().id, "5");
        assert_eq!(rollback_target(&rs, Some("1")), None);
    }

    #[test]
    fn prune_keeps_newest_and_protected() {
        let on: Vec<String> = ["1", "2", "3", "4", "5", "6"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let protect: BTreeSet<String> = ["6", "2"].iter().map(|s| s.to_string()).collect();
        assert_eq!(prune(&on, 3, &protect), vec!["1", "3", "4"]);
        assert_eq!(prune(&on, 10, &protect), Vec::<String>::new());
        // protected releases are never deleted even when they exceed keep
        let all: BTreeSet<String> = on.iter().cloned().collect();
        assert!(prune(&on, 1, &all).is_empty());
    }
}

//! The state file: services, their current targets and domains, and each service's last bake
//! verdict, as one JSON document, written atomically (temp file in the same directory, fsync,
//! rename, fsync the directory) and read back on start. It owns the file format; it must not
//! hold pause state, counters or anything else that would be wrong after a restart.
//!
//! Format (version 1; `bakes` only when there is one):
//! `{"version":1,"services":[{"name":"api","target":"127.0.0.1:41001","domains":["api.example.com"]}],
//!   "bakes":[{"service":"api","state":"failed","verdict":"...",...}]}`
//!
//! A bake still `baking` in the file was cut short by a restart: it is read back as
//! `interrupted` (the routing is what the file says).
//!
//! Invariants: the file at `path` is always either absent or a complete document written by
//! [`save`]; a document that does not parse or validate is refused (the proxy does not start
//! and route somewhere unexpected), never silently replaced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use cutover_proxy_wire::{BakeState, BakeStatus};
use serde::{Deserialize, Serialize};

use crate::table::{check_name, parse_domains, parse_target, Entry, Table};
use crate::{parent_dir, Error};

const VERSION: u32 = 1;

/// Distinguishes temp files of several writers in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    services: Vec<StateService>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bakes: Vec<BakeStatus>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateService {
    name: String,
    target: String,
    #[serde(default)]
    domains: Vec<String>,
}

/// Writes `entries` and `bakes` to `path` atomically.
pub(crate) fn save(path: &Path, entries: &[Entry], bakes: &[BakeStatus]) -> Result<(), Error> {
    let doc = StateFile {
        version: VERSION,
        bakes: bakes.to_vec(),
        services: entries
            .iter()
            .map(|e| StateService {
                name: e.name.clone(),
                target: e.target.clone(),
                domains: e.domains.clone(),
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&doc).map_err(|e| Error::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push(b'\n');
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_string());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let io_err = |what: &str, e: io::Error| Error::io(format!("{what} {}", tmp.display()), e);
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err("cannot create", e))?;
        f.write_all(&text).map_err(|e| io_err("cannot write", e))?;
        f.sync_all().map_err(|e| io_err("cannot sync", e))?;
        fs::rename(&tmp, path).map_err(|e| {
            Error::io(
                format!("cannot rename {} to {}", tmp.display(), path.display()),
                e,
            )
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable; failure here is not worth failing the switch for.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the table and the bake verdicts from `path`; a missing file is an empty table.
pub(crate) fn restore(path: &Path) -> Result<(Table, Vec<BakeStatus>), Error> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Table::default(), Vec::new())),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    let bad = |message: String| Error::State {
        path: path.to_path_buf(),
        message,
    };
    let doc: StateFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if doc.version != VERSION {
        return Err(bad(format!(
            "version {} (this proxy reads version {VERSION})",
            doc.version
        )));
    }
    let table = Table::default();
    for s in doc.services {
        check_name(&s.name).map_err(|e| bad(e.to_string()))?;
        let target = parse_target(&s.target).map_err(|e| bad(e.to_string()))?;
        let domains = parse_domains(&s.domains).map_err(|e| bad(e.to_string()))?;
        if table.get(&s.name).is_some() {
            return Err(bad(format!("service {} listed twice", s.name)));
        }
        table
            .install(&s.name, &target, &domains)
            .map_err(|e| bad(e.to_string()))?;
    }
    let bakes = doc
        .bakes
        .into_iter()
        .filter(|b| table.get(&b.service).is_some())
        .map(|mut b| {
            if b.state == BakeState::Baking {
                b.state = BakeState::Interrupted;
                b.verdict = "the proxy restarted during the bake".into();
            }
            b
        })
        .collect();
    Ok((table, bakes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("cutover-proxy-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_then_restore_round_trips() {
        let dir = tempdir("rt");
        let path = dir.join("sub/state.json");
        assert_eq!(restore(&path).unwrap().0.len(), 0);
        let entries = vec![
            Entry {
                name: "a".into(),
                target: "127.0.0.1:1".into(),
                domains: vec!["a.example".into()],
            },
            Entry {
                name: "b".into(),
                target: "[::1]:2".into(),
                domains: vec![],
            },
        ];
        let bake = |state| BakeStatus {
            service: "a".into(),
            target: "127.0.0.1:1".into(),
            fallback: Some("127.0.0.1:9".into()),
            release: "r2".into(),
            old_release: Some("r1".into()),
            state,
            canary: false,
            started_at_ms: 1,
            ends_at_ms: 2,
            finished_at_ms: None,
            new: None,
            old: None,
            probes: 0,
            probes_failed: 0,
            verdict: String::new(),
            action: String::new(),
        };
        save(&path, &entries, &[bake(BakeState::Failed)]).unwrap();
        let (table, bakes) = restore(&path).unwrap();
        assert_eq!(table.snapshot(), entries);
        assert_eq!(bakes, vec![bake(BakeState::Failed)]);
        // A bake cut short by a restart reads back as interrupted.
        save(&path, &entries, &[bake(BakeState::Baking)]).unwrap();
        let (_, bakes) = restore(&path).unwrap();
        assert_eq!(bakes[0].state, BakeState::Interrupted);
        assert_eq!(bakes[0].verdict, "the proxy restarted during the bake");
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_broken_state() {
        let dir = tempdir("bad");
        let path = dir.join("state.json");
        for text in [
            "{",
            r#"{"version":2,"services":[]}"#,
            r#"{"version":1,"services":[{"name":"a","target":"nope"}]}"#,
            r#"{"version":1,"services":[{"name":"a","target":"h:1"},{"name":"a","target":"h:2"}]}"#,
        ] {
            fs::write(&path, text).unwrap();
            assert!(matches!(restore(&path), Err(Error::State { .. })), "{text}");
        }
        fs::remove_dir_all(dir).unwrap();
    }
}

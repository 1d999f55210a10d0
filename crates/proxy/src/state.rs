//! The state file: services, their current targets and domains, as one JSON document,
//! written atomically (temp file in the same directory, fsync, rename, fsync the directory)
//! and read back on start. It owns the file format; it must not hold pause state, counters or
//! anything else that would be wrong after a restart.
//!
//! Format (version 1):
//! `{"version":1,"services":[{"name":"api","target":"127.0.0.1:41001","domains":["api.example.com"]}]}`
//!
//! Invariants: the file at `path` is always either absent or a complete document written by
//! [`save`]; a document that does not parse or validate is refused (the proxy does not start
//! and route somewhere unexpected), never silently replaced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateService {
    name: String,
    target: String,
    #[serde(default)]
    domains: Vec<String>,
}

/// Writes `entries` to `path` atomically.
pub(crate) fn save(path: &Path, entries: &[Entry]) -> Result<(), Error> {
    let doc = StateFile {
        version: VERSION,
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

/// Reads the table from `path`; a missing file is an empty table.
pub(crate) fn restore(path: &Path) -> Result<Table, Error> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Table::default()),
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
    Ok(table)
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
        assert_eq!(restore(&path).unwrap().len(), 0);
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
        save(&path, &entries).unwrap();
        let table = restore(&path).unwrap();
        assert_eq!(table.snapshot(), entries);
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

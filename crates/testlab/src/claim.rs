//! Lab numbers: every [`crate::Lab`] owns a number X in 1..=250 that names
//! its network namespaces (`tl{X}h{i}`), veth pairs (`tl{X}h{i}a`/`b`),
//! its address blocks (10.201.X.0/24, and 10.202.X.0/24 past 63 hosts) and its temp dir (`testlab-{X}.{pid}`).
//!
//! A number is claimed by creating `/tmp/testlab-claims/X` with
//! `create_new`, holding "pid starttime" of the owning process, so parallel
//! test processes never collide. A claim whose owner is dead is stale (the
//! process was killed before `Drop` ran); it is taken over exactly once,
//! guarded by a `create_new` marker unique to the dead owner, and the dead
//! owner's leftovers (processes, namespaces, links, mounts, dirs, routes,
//! and with Docker its daemons, containers, cgroups and registry) are
//! removed before reuse.

use crate::sys;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process;
use std::time::{Duration, SystemTime};

/// Directory holding one file per claimed lab number.
pub(crate) const CLAIMS_DIR: &str = "/tmp/testlab-claims";
/// Highest lab number (the third octet of 10.201.X.0/24).
const MAX_LAB: u32 = 250;

/// A claimed lab number; released (file removed) on drop.
pub(crate) struct Claim {
    pub(crate) num: u8,
    path: PathBuf,
    tag: String,
    marker: Option<PathBuf>,
}

/// "pid starttime" of this process.
fn my_tag() -> String {
    let pid = process::id();
    format!("{pid} {}", sys::pid_start_time(pid).unwrap_or(0))
}

/// Whether the owner recorded in a claim file still runs.
fn owner_alive(content: &str, path: &Path) -> bool {
    let mut it = content.split_whitespace();
    let pid = it.next().and_then(|p| p.parse::<u32>().ok());
    let start = it.next().and_then(|s| s.parse::<u64>().ok());
    match pid {
        Some(pid) => {
            sys::pid_alive(pid)
                && match (start, sys::pid_start_time(pid)) {
                    (Some(s), Some(now)) if s != 0 => s == now,
                    _ => true,
                }
        }
        // Empty or garbled: maybe being written right now. Only stale when old.
        None => {
            let age = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            match age {
                Some(age) => age < Duration::from_secs(60),
                None => true,
            }
        }
    }
}

/// Claims a free lab number, cleaning up after a dead previous owner.
pub(crate) fn claim() -> Result<Claim, String> {
    fs::create_dir_all(CLAIMS_DIR).map_err(|e| format!("cannot create {CLAIMS_DIR}: {e}"))?;
    let tag = my_tag();
    let first = process::id() % MAX_LAB;
    for k in 0..MAX_LAB {
        let num = ((first + k) % MAX_LAB + 1) as u8;
        let path = Path::new(CLAIMS_DIR).join(num.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(tag.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                drop(f);
                // Nobody owned it; leftovers may still exist if the claims
                // dir was wiped by hand. Cheap when there is nothing to do.
                cleanup_leftovers(num);
                return Ok(Claim {
                    num,
                    path,
                    tag,
                    marker: None,
                });
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let content = fs::read_to_string(&path).unwrap_or_default();
                if owner_alive(&content, &path) {
                    continue;
                }
                if let Some(claim) = take_over(num, &path, &content, &tag)? {
                    return Ok(claim);
                }
            }
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    Err(format!(
        "all {MAX_LAB} lab numbers in {CLAIMS_DIR} are claimed by live processes"
    ))
}

/// Takes over a stale claim if no other process has done so for this
/// particular dead owner.
fn take_over(num: u8, path: &Path, stale: &str, tag: &str) -> Result<Option<Claim>, String> {
    let owner: String = stale
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let owner = if owner.is_empty() {
        "unknown".to_string()
    } else {
        owner
    };
    let marker = Path::new(CLAIMS_DIR).join(format!("{num}.reaped-{owner}"));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(format!("cannot create {}: {e}", marker.display())),
    }
    // Re-check: the claim may have been released and re-claimed meanwhile.
    if fs::read_to_string(path).unwrap_or_default() != stale {
        let _ = fs::remove_file(&marker);
        return Ok(None);
    }
    cleanup_leftovers(num);
    let tmp = Path::new(CLAIMS_DIR).join(format!(".{num}.tmp-{}", process::id()));
    fs::write(&tmp, tag).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot rename onto {}: {e}", path.display()))?;
    Ok(Some(Claim {
        num,
        path: path.to_path_buf(),
        tag: tag.to_string(),
        marker: Some(marker),
    }))
}

/// Cleans up after every lab whose process died without dropping it, and
/// releases those lab numbers. Returns how many were reaped.
pub(crate) fn reap_stale() -> usize {
    let tag = my_tag();
    let mut n = 0;
    for num in 1..=MAX_LAB as u8 {
        let path = Path::new(CLAIMS_DIR).join(num.to_string());
        let Ok(content) = fs::read_to_string(&path) else {
            continue;
        };
        if owner_alive(&content, &path) {
            continue;
        }
        if let Ok(Some(claim)) = take_over(num, &path, &content, &tag) {
            drop(claim);
            n += 1;
        }
    }
    n
}

impl Drop for Claim {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|c| c == self.tag) {
            let _ = fs::remove_file(&self.path);
        }
        if let Some(m) = &self.marker {
            let _ = fs::remove_file(m);
        }
    }
}

/// Names of entries of `dir` that start with `prefix`.
fn entries_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Prefix of this lab number's temp dirs.
pub(crate) fn lab_dir_prefix(num: u8) -> String {
    format!("testlab-{num}.")
}

/// Mount points (deepest first) at or below any of this lab number's temp
/// dirs, as seen by this process.
pub(crate) fn mounts_under(prefix: &Path) -> Vec<String> {
    let prefix = prefix.to_string_lossy().to_string();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v.dedup();
    v
}

/// Prefix of the cgroups (one per host, in every hierarchy) in which the
/// hosts' dockerds of lab `num` put their containers (`--cgroup-parent`).
pub(crate) fn cgroup_prefix(num: u8) -> String {
    format!("testlab-{num}-h")
}

/// Top-level cgroup directories whose name starts with `prefix`, in every
/// mounted hierarchy (cgroup v1 controllers, the named/unified ones, or a
/// pure cgroup v2 mount).
fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    if let Ok(rd) = fs::read_dir(base) {
        roots.extend(
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        );
    }
    let mut found = Vec::new();
    for root in roots {
        for name in entries_with_prefix(&root.to_string_lossy(), prefix) {
            let p = root.join(name);
            if p.is_dir() {
                found.push(p);
            }
        }
    }
    found
}

/// `dir` and all cgroup directories below it, parents before children.
fn cgroup_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_tree(&p, out);
            }
        }
    }
}

/// Kills every process in the cgroups named `prefix*` (and their
/// sub-cgroups) and removes those cgroups. Idempotent; cheap when there
/// are none.
pub(crate) fn kill_cgroups(prefix: &str) {
    let mut dirs = Vec::new();
    for top in cgroups_with_prefix(prefix) {
        cgroup_tree(&top, &mut dirs);
    }
    if dirs.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids: Vec<u32> = dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .filter(|&p| sys::pid_alive(p))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        sys::signal(&pids, "KILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Children first. rmdir may briefly fail while killed tasks exit.
    for d in dirs.iter().rev() {
        while fs::remove_dir(d).is_err() && d.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Pids of processes (other than this one) one of whose arguments contains
/// `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let me = process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            })
        })
        .collect()
}

/// Removes everything a (dead) lab with this number may have left behind.
fn cleanup_leftovers(num: u8) {
    let name_prefix = format!("tl{num}h");
    let tmp = std::env::temp_dir();
    let dir_prefix = lab_dir_prefix(num);
    // Processes started from the lab dir that may live outside the hosts'
    // network namespaces (the registry), and the hosts' daemons.
    let needle = tmp.join(&dir_prefix).to_string_lossy().to_string();
    sys::kill_and_wait(&pids_mentioning(&needle), Duration::from_secs(2));
    for ns in entries_with_prefix("/var/run/netns", &name_prefix) {
        if let Ok(out) = sys::run("ip", &["netns", "pids", &ns]) {
            let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            sys::kill_and_wait(&pids, Duration::from_secs(2));
        }
        sys::run_quiet("ip", &["netns", "del", &ns]);
    }
    // Containers of the hosts' dockerds.
    kill_cgroups(&cgroup_prefix(num));
    for link in entries_with_prefix("/sys/class/net", &name_prefix) {
        sys::run_quiet("ip", &["link", "del", &link]);
    }
    for mp in mounts_under(&tmp.join(&dir_prefix)) {
        if sys::run("umount", &[&mp]).is_err() {
            sys::run_quiet("umount", &["-l", &mp]);
        }
    }
    if std::env::var("TESTLAB_KEEP").as_deref() != Ok("1") {
        for d in entries_with_prefix(&tmp.to_string_lossy(), &dir_prefix) {
            let _ = fs::remove_dir_all(tmp.join(d));
        }
    }
    // Both address blocks a lab may use (see the lab's module docs).
    for b in [201, 202] {
        let net = format!("10.{b}.{num}.0/24");
        if sys::run("ip", &["route", "show", "exact", &net])
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
        {
            sys::run_quiet("ip", &["route", "del", &net]);
        }
    }
}

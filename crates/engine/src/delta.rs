//! Delta staging: ship only what changed since the release a host serves now.
//!
//! A release is a validated tar.gz in the [`ArtifactStore`]. Its *manifest* lists every entry
//! (normalised path, kind, mode, size, SHA-256 of the content, symlink target); it is computed
//! once by reading the tarball and kept beside it as `<sha256>.manifest.json`.
//!
//! When a host already serves a release whose tarball is in the store, the new release is
//! staged from a *delta* tarball: every directory and symlink of the new release, every
//! regular file that is new or differs (content or mode) from the base release, and, as its
//! first member, [`LINKS`]: the NUL-separated paths of the regular files that are identical in
//! both. The host unpacks the delta into `releases/<id>.partial` and hard-links the listed
//! files from `releases/<base>` (`cp -l --parents`, GNU coreutils), then renames the
//! directory as for a full upload. Nothing is ever written through a hard link: the delta is
//! unpacked into a fresh directory before any link exists, so the base release is never
//! modified. Unchanged files keep the base release's inode (and so its mtime).
//!
//! A delta is only worth it when much is shared: with less than a quarter of the new
//! release's file bytes in unchanged files, or when the new release itself contains a file
//! named [`LINKS`], the full tarball is shipped instead. The manifest of a directory packed by
//! cutover is written while it is packed, so comparing two releases reads no tarball.

use crate::artifact::{ArtifactStore, StoredArtifact};
use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A delta is made only when at least this share (in percent) of the new release's file bytes
/// are unchanged files.
const MIN_SHARED_PERCENT: u64 = 25;

/// Bytes of a file's start hashed as its manifest `head`.
pub(crate) const HEAD_BYTES: u64 = 4096;

/// The delta tarball's member that lists the files to hard-link from the base release.
pub(crate) const LINKS: &str = ".cutover-delta.links";

/// One entry of a release, as far as "is it the same file?" is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Entry {
    Dir,
    File {
        mode: u32,
        size: u64,
        sha256: String,
        /// SHA-256 of the first [`HEAD_BYTES`] (or all, if fewer): whether a delta would pay
        /// is guessed from these before a directory is packed ([`shared_percent`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<String>,
    },
    Symlink {
        target: String,
    },
}

/// Every entry of a release tarball, by normalised path (no `./`, no trailing `/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) entries: BTreeMap<String, Entry>,
}

/// A delta tarball written for one (new, base) pair; removed on drop.
#[derive(Debug)]
pub(crate) struct Delta {
    pub(crate) path: PathBuf,
    /// Compressed size: what a host is sent.
    pub(crate) size: u64,
    /// Regular files shipped (new or changed).
    pub(crate) shipped: usize,
    /// Regular files hard-linked from the base release.
    pub(crate) linked: usize,
}

impl Drop for Delta {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn normalise(raw: &Path) -> Option<String> {
    let s = raw.to_str()?;
    let s = s.trim_start_matches("./").trim_end_matches('/');
    if s.is_empty() || s == "." {
        None
    } else {
        Some(s.to_string())
    }
}

fn open(art: &StoredArtifact) -> io::Result<tar::Archive<GzDecoder<BufReader<File>>>> {
    let file = File::open(&art.path)?;
    Ok(tar::Archive::new(GzDecoder::new(BufReader::new(file))))
}

fn manifest_path(store: &ArtifactStore, sha256: &str) -> PathBuf {
    store.dir().join(format!("{sha256}.manifest.json"))
}

/// The manifest of a stored artifact: read from beside it, or computed (and then stored).
pub(crate) fn manifest(store: &ArtifactStore, art: &StoredArtifact) -> io::Result<Manifest> {
    let path = manifest_path(store, &art.sha256);
    if let Some(m) = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
    {
        return Ok(m);
    }
    let m = compute_manifest(art)?;
    store_manifest(store, &art.sha256, &m);
    Ok(m)
}

/// Keeps `m` as the manifest of the stored artifact `sha256` (written when a directory is
/// packed, or when a delta first needs it). A cache only: when it cannot be written, the
/// manifest is computed from the tarball again when next needed.
pub(crate) fn store_manifest(store: &ArtifactStore, sha256: &str, m: &Manifest) {
    let path = manifest_path(store, sha256);
    let tmp = store.dir().join(format!(
        ".manifest-{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = serde_json::to_vec(m)
        .map_err(io::Error::other)
        .and_then(|bytes| fs::write(&tmp, bytes))
        .and_then(|()| fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

fn compute_manifest(art: &StoredArtifact) -> io::Result<Manifest> {
    let mut archive = open(art)?;
    let mut m = Manifest::default();
    let mut buf = vec![0u8; 64 << 10];
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(path) = normalise(&entry.path()?) else {
            continue;
        };
        let header = entry.header();
        let kind = header.entry_type();
        let e = if kind.is_dir() {
            Entry::Dir
        } else if kind.is_symlink() {
            let target = entry
                .link_name()?
                .and_then(|t| t.to_str().map(str::to_string))
                .unwrap_or_default();
            Entry::Symlink { target }
        } else if kind.is_file() {
            let mode = header.mode()? & 0o7777;
            let mut h = Heads::default();
            let mut size = 0u64;
            loop {
                let n = entry.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
            }
            let (sha256, head) = h.finish();
            Entry::File {
                mode,
                size,
                sha256,
                head: Some(head),
            }
        } else {
            // Validated artifacts hold nothing else.
            return Err(io::Error::other(format!(
                "unexpected entry type in a stored artifact: {path}"
            )));
        };
        m.entries.insert(path, e);
    }
    Ok(m)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The content digest of a file and of its first [`HEAD_BYTES`], in one pass.
#[derive(Default)]
pub(crate) struct Heads {
    all: Sha256,
    head: Sha256,
    seen: u64,
}

impl Heads {
    pub(crate) fn update(&mut self, buf: &[u8]) {
        self.all.update(buf);
        let left = HEAD_BYTES.saturating_sub(self.seen) as usize;
        self.head.update(&buf[..buf.len().min(left)]);
        self.seen += buf.len() as u64;
    }

    /// `(sha256, head)` as lowercase hex.
    pub(crate) fn finish(self) -> (String, String) {
        (
            format!("{:x}", self.all.finalize()),
            format!("{:x}", self.head.finalize()),
        )
    }
}

/// Whether two entries are the same file for a delta: kind, mode, size and content (the
/// `head`, a guess, is not compared).
fn same_file(a: &Entry, b: &Entry) -> bool {
    match (a, b) {
        (
            Entry::File {
                mode: m1,
                size: s1,
                sha256: h1,
                ..
            },
            Entry::File {
                mode: m2,
                size: s2,
                sha256: h2,
                ..
            },
        ) => m1 == m2 && s1 == s2 && h1 == h2,
        _ => a == b,
    }
}

/// Guesses, without reading more than [`HEAD_BYTES`] of any file, the share (in percent) of
/// the file bytes of directory `dir` (whose entries `tree` lists, as
/// `ArtifactStore::check_dir_tree` returns them) that are unchanged from `base`: a file
/// counts if its path, mode and size are the same and its first bytes hash to the base's
/// `head`. Only a guess that decides how to ship (a delta is then made from digests).
pub(crate) fn shared_percent(base: &Manifest, dir: &Path, tree: &Manifest) -> u64 {
    let (mut shared, mut all) = (0u64, 0u64);
    for (path, e) in &tree.entries {
        let Entry::File { mode, size, .. } = e else {
            continue;
        };
        all += size;
        let Some(Entry::File {
            mode: bm,
            size: bs,
            head: Some(head),
            ..
        }) = base.entries.get(path)
        else {
            continue;
        };
        if bm != mode || bs != size {
            continue;
        }
        let mut start = Vec::new();
        let read =
            File::open(dir.join(path)).and_then(|f| f.take(HEAD_BYTES).read_to_end(&mut start));
        if read.is_ok() && format!("{:x}", Sha256::digest(&start)) == *head {
            shared += size;
        }
    }
    (shared * 100).checked_div(all).unwrap_or(100)
}

/// Whether a delta against `base` is worth making for a release `shared` percent of whose
/// file bytes are unchanged.
pub(crate) fn pays(shared: u64) -> bool {
    shared >= MIN_SHARED_PERCENT
}

/// Writes the delta of `new` against `base` into the store's directory, or `None` when less
/// than [`MIN_SHARED_PERCENT`] of the file bytes are shared (or the new release has a file
/// named [`LINKS`]): then the full tarball is the better thing to send.
pub(crate) fn write_delta(
    store: &ArtifactStore,
    new: &StoredArtifact,
    base: &Manifest,
) -> io::Result<Option<Delta>> {
    let new_manifest = manifest(store, new)?;
    if new_manifest.entries.contains_key(LINKS) {
        return Ok(None);
    }
    let mut links: Vec<&str> = Vec::new();
    let (mut shared, mut all) = (0u64, 0u64);
    for (path, e) in &new_manifest.entries {
        if let Entry::File { size, .. } = e {
            all += size;
            if base.entries.get(path).is_some_and(|b| same_file(b, e)) {
                links.push(path);
                shared += size;
            }
        }
    }
    // Writing a delta re-reads the new tarball; with little shared, sending the whole
    // artifact costs less.
    if links.is_empty() || shared * 100 < all * MIN_SHARED_PERCENT {
        return Ok(None);
    }
    let path = store.dir().join(format!(
        ".delta-{}-{}.tar.gz",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut delta = Delta {
        path,
        size: 0,
        shipped: 0,
        linked: links.len(),
    };
    let file = File::create(&delta.path)?;
    // What did not shrink in the artifact will not shrink in the delta.
    let packing = new.packing.unwrap_or(crate::artifact::Packing::Gzip1);
    let gz = crate::gzip::GzOut::new(BufWriter::new(file), packing)?;
    let mut out = tar::Builder::new(gz);
    out.mode(tar::HeaderMode::Complete);

    let mut list = Vec::new();
    for p in &links {
        list.extend_from_slice(p.as_bytes());
        list.push(0);
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(list.len() as u64);
    h.set_mtime(0);
    out.append_data(&mut h, LINKS, list.as_slice())?;

    let linked: std::collections::HashSet<&str> = links.into_iter().collect();
    let mut archive = open(new)?;
    for entry in archive.entries()? {
        let entry = entry?;
        let Some(p) = normalise(&entry.path()?) else {
            continue;
        };
        if linked.contains(p.as_str()) {
            continue;
        }
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_symlink() {
            let target = entry
                .link_name()?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            out.append_link(&mut header, &p, target)?;
        } else {
            if kind.is_file() {
                delta.shipped += 1;
            }
            out.append_data(&mut header, &p, entry)?;
        }
    }
    let gz = out.into_inner()?;
    let mut file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.flush()?;
    delta.size = file.metadata()?.len();
    Ok(Some(delta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::Limits;

    fn tree(dir: &Path, files: &[(&str, &str)]) {
        for (p, body) in files {
            let path = dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, body).unwrap();
        }
    }

    fn read_delta(d: &Delta) -> BTreeMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(GzDecoder::new(File::open(&d.path).unwrap()));
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if !e.header().entry_type().is_file() {
                continue;
            }
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            out.insert(p, body);
        }
        out
    }

    #[test]
    fn a_delta_ships_changed_files_and_lists_the_rest() {
        let t = std::env::temp_dir().join(format!("cutover-delta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        let store = ArtifactStore::new(t.join("store"));
        tree(
            &t.join("a"),
            &[
                ("same.txt", "same"),
                ("d/kept", "k"),
                ("changed", "one"),
                ("gone", "x"),
            ],
        );
        tree(
            &t.join("b"),
            &[
                ("same.txt", "same"),
                ("d/kept", "k"),
                ("changed", "two"),
                ("new", "n"),
            ],
        );
        let a = store.import_dir(&t.join("a"), &Limits::default()).unwrap();
        let b = store.import_dir(&t.join("b"), &Limits::default()).unwrap();
        let base = manifest(&store, &a).unwrap();
        assert!(
            manifest_path(&store, &a.sha256).exists(),
            "manifest is cached"
        );
        let d = write_delta(&store, &b, &base)
            .unwrap()
            .expect("files are shared");
        assert_eq!((d.linked, d.shipped), (2, 2));
        let files = read_delta(&d);
        assert_eq!(files[LINKS], b"d/kept\0same.txt\0");
        assert_eq!(files["changed"], b"two");
        assert_eq!(files["new"], b"n");
        assert!(!files.contains_key("same.txt") && !files.contains_key("gone"));
        let path = d.path.clone();
        drop(d);
        assert!(!path.exists(), "the delta file is removed when dropped");

        // Nothing shared: no delta.
        tree(&t.join("c"), &[("other", "o")]);
        let c = store.import_dir(&t.join("c"), &Limits::default()).unwrap();
        assert!(write_delta(&store, &c, &base).unwrap().is_none());
        let _ = fs::remove_dir_all(&t);
    }

    #[test]
    fn the_manifest_kept_while_packing_is_the_tarballs() {
        use std::os::unix::fs::PermissionsExt;
        let t = std::env::temp_dir().join(format!("cutover-delta-pack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        let store = ArtifactStore::new(t.join("store"));
        let long = format!("deep/{}/file.txt", "n".repeat(120));
        tree(
            &t.join("a"),
            &[
                ("index.html", "hi"),
                ("run.sh", "echo"),
                ("empty", ""),
                (&long, "x"),
            ],
        );
        fs::set_permissions(t.join("a/run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all(t.join("a/nothing/here")).unwrap();
        std::os::unix::fs::symlink("index.html", t.join("a/link")).unwrap();
        std::os::unix::fs::symlink(format!("../../{long}"), t.join("a/nothing/here/l")).unwrap();
        let a = store.import_dir(&t.join("a"), &Limits::default()).unwrap();
        let kept: Manifest =
            serde_json::from_slice(&fs::read(manifest_path(&store, &a.sha256)).unwrap()).unwrap();
        assert_eq!(kept, compute_manifest(&a).unwrap());
        assert_eq!(kept.entries.len(), 10);
        assert_eq!(
            kept.entries["run.sh"],
            Entry::File {
                mode: 0o744,
                size: 4,
                sha256: crate::sha256_hex("echo"),
                head: Some(crate::sha256_hex("echo")),
            }
        );
        let _ = fs::remove_dir_all(&t);
    }

    #[test]
    fn a_mode_change_is_a_change() {
        use std::os::unix::fs::PermissionsExt;
        let t = std::env::temp_dir().join(format!("cutover-delta-mode-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        let store = ArtifactStore::new(t.join("store"));
        tree(&t.join("a"), &[("run.sh", "echo"), ("x", "xxxxxxxx")]);
        tree(&t.join("b"), &[("run.sh", "echo"), ("x", "xxxxxxxx")]);
        fs::set_permissions(t.join("b/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        let a = store.import_dir(&t.join("a"), &Limits::default()).unwrap();
        let b = store.import_dir(&t.join("b"), &Limits::default()).unwrap();
        let d = write_delta(&store, &b, &manifest(&store, &a).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((d.linked, d.shipped), (1, 1));
        assert!(read_delta(&d).contains_key("run.sh"));
        let _ = fs::remove_dir_all(&t);
    }
}

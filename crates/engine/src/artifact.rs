//! Release artifacts: validating `.tar.gz` streams and keeping them in a
//! content-addressed local store.
//!
//! This module owns the decision whether a release tarball is safe to hand to
//! a host's `tar xzf - -C <root>/releases/<id>.partial`
//! ([`validate_tar_gz`]), the deterministic packing of a directory into such a
//! tarball, and the store that keeps accepted tarballs as `<sha256>.tar.gz`
//! ([`ArtifactStore`]). Every archive that enters the store, user-supplied or
//! packed here, has passed validation first, and a refused one leaves nothing
//! behind in the store.
//!
//! It must not extract archives, talk to hosts, or decide release ids: it only
//! reads tar streams and writes inside its own store directory. Validation is
//! deliberately stricter than any one `tar` implementation (it parses the raw
//! headers itself and refuses constructs on which GNU tar, busybox tar and the
//! `tar` crate disagree), because the host's `tar` is the one that will act on
//! the bytes.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::delta::{Entry, Heads, Manifest};
use crate::stream::Growing;

/// Size limits applied while reading an archive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of regular-file data the archive may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most entries (files, directories, symlinks) the archive may hold.
    pub max_entries: u64,
}

impl Limits {
    /// A files app's `[files] max_unpacked_bytes` and `max_entries`.
    pub fn of(files: &cutover_core::FilesConfig) -> Limits {
        Limits {
            max_unpacked_bytes: files.max_unpacked_bytes,
            max_entries: files.max_entries,
        }
    }
}

impl Default for Limits {
    /// 4 GiB and 200 000 entries.
    fn default() -> Limits {
        Limits {
            max_unpacked_bytes: 4 << 30,
            max_entries: 200_000,
        }
    }
}

/// Why an artifact was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// An entry (or, with path `<archive>`, the stream itself) is unsafe or
    /// malformed; `reason` says why in words meant for the person deploying.
    #[error("{path}: {reason}")]
    Hostile { path: String, reason: String },
    /// The archive's regular files add up to more than the limit.
    #[error("archive unpacks to more than {limit} bytes (limit max_unpacked_bytes)")]
    TooLarge { limit: u64 },
    /// The archive has more entries than the limit.
    #[error("archive has more than {limit} entries (limit max_entries)")]
    TooManyEntries { limit: u64 },
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// `import` was given something that is neither a directory nor a tarball.
    #[error("{path}: not a directory or a .tar.gz file")]
    NotAnArtifact { path: String },
}

/// What a valid archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Files, directories and symlinks (the root `.` entry is not counted).
    pub entries: u64,
    /// Sum of the regular files' sizes.
    pub unpacked_bytes: u64,
}

/// A validated archive in the store.
#[derive(Debug, Clone)]
pub struct StoredArtifact {
    /// 64 lowercase hex digits: SHA-256 of the stored `.tar.gz` bytes.
    pub sha256: String,
    /// `<store>/<sha256>.tar.gz`.
    pub path: PathBuf,
    /// Compressed size in bytes.
    pub size: u64,
    pub summary: Summary,
    /// How cutover compressed it when it packed a directory (`None` for a user's tarball, or
    /// one stored before cutover said).
    pub packing: Option<Packing>,
}

/// Path used in errors about the stream as a whole rather than one entry.
const ARCHIVE: &str = "<archive>";
const BLOCK: usize = 512;
/// Longest entry name or symlink target accepted (Linux `PATH_MAX`).
const MAX_NAME_BYTES: usize = 4096;
/// Largest single pax header accepted.
const MAX_PAX_BYTES: u64 = 1 << 20;
/// Extension-header bytes allowed up front, plus per entry seen so far.
const META_BASE_BYTES: u64 = 16 << 20;
const META_PER_ENTRY_BYTES: u64 = 8 << 10;
/// Zero padding accepted after the end-of-archive marker.
const MAX_TRAILER_BYTES: u64 = 4 << 20;
/// Symlinks followed while resolving one target, as the kernel allows.
const MAX_SYMLINK_HOPS: u32 = 40;
/// Bytes of path looked up while resolving all symlinks of one archive.
const MAX_RESOLVE_WORK: u64 = 256 << 20;
/// pax keywords a global header may set: none of them changes where or what
/// an entry is extracted as.
const PAX_GLOBAL_ALLOWED: &[&[u8]] = &[
    b"comment",
    b"mtime",
    b"atime",
    b"ctime",
    b"charset",
    b"hdrcharset",
    b"uid",
    b"gid",
    b"uname",
    b"gname",
];

fn hostile(path: impl Into<String>, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::Hostile {
        path: path.into(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Shows raw name bytes to a person: lossy UTF-8 with control characters
/// escaped (`\n`, `\r`, `\u{0}`).
fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The bytes of a NUL-terminated header field.
fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|b| *b == 0) {
        Some(end) => &field[..end],
        None => field,
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Checks that `reader` is a gzip-compressed tar stream that is safe to
/// extract into an empty release directory, and summarises it.
///
/// Entry names are normalised (leading `./`, repeated and trailing `/` and
/// inner `.` components dropped; the root entry `.` is skipped) and refused
/// when absolute, containing `..`, empty, containing NUL, newline or carriage
/// return, longer than 4096 bytes, duplicated, or going through an earlier
/// symlink or file. Only regular files, directories and symlinks are allowed;
/// symlink targets must be relative and resolve inside the release (following
/// other symlinks in the archive); setuid/setgid bits are refused. GNU long
/// names and pax headers are interpreted here (a pax global header may only
/// carry harmless keywords). Reading stops as soon as a limit is exceeded.
pub fn validate_tar_gz(reader: impl Read, limits: &Limits) -> Result<Summary, ArtifactError> {
    let compressed = Rc::new(Cell::new(0));
    let mut stream = Stream {
        inner: MultiGzDecoder::new(Counted {
            inner: reader,
            count: Rc::clone(&compressed),
        }),
        total: 0,
        compressed,
    };
    let mut validator = Validator::new(limits);
    validator.read_entries(&mut stream)?;
    validator.check_symlinks()?;
    Ok(Summary {
        entries: validator.entries,
        unpacked_bytes: validator.file_bytes,
    })
}

/// Counts the bytes read from the compressed input.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// The decompressed tar stream, with errors turned into refusals.
struct Stream<R> {
    inner: R,
    /// Decompressed bytes read so far.
    total: u64,
    /// Compressed bytes read so far.
    compressed: Rc<Cell<u64>>,
}

impl<R: Read> Stream<R> {
    fn read_error(&self, e: io::Error) -> ArtifactError {
        let reason = match e.kind() {
            io::ErrorKind::UnexpectedEof if self.compressed.get() == 0 => {
                "empty input, not a tar.gz archive".to_string()
            }
            io::ErrorKind::UnexpectedEof => "truncated gzip stream".to_string(),
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                format!("corrupt or not a gzip stream ({e})")
            }
            _ => format!("cannot read the archive: {e}"),
        };
        hostile(ARCHIVE, reason)
    }

    /// Reads up to `buf.len()` bytes, fewer only at the end of the stream.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        self.total += got as u64;
        Ok(got)
    }

    /// Reads one header block; `false` at a clean end of the stream.
    fn block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, ArtifactError> {
        match self.fill(buf)? {
            0 => Ok(false),
            BLOCK => Ok(true),
            n => Err(hostile(
                ARCHIVE,
                format!("truncated tar stream: it ends {n} bytes into a header block"),
            )),
        }
    }

    /// Reads an entry's `size` data bytes plus padding into memory.
    fn data(&mut self, size: u64, what: &str) -> Result<Vec<u8>, ArtifactError> {
        let total = size + padding(size);
        // Callers cap `size` well below usize::MAX.
        let mut buf = vec![0u8; total as usize];
        if self.fill(&mut buf)? as u64 != total {
            return Err(truncated(what));
        }
        buf.truncate(size as usize);
        Ok(buf)
    }

    /// Skips an entry's `size` data bytes plus padding.
    fn skip(&mut self, size: u64, what: &str) -> Result<(), ArtifactError> {
        let mut left = size + padding(size);
        let mut buf = [0u8; 64 << 10];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let got = self.fill(&mut buf[..want])?;
            if got == 0 {
                return Err(truncated(what));
            }
            left -= got as u64;
        }
        Ok(())
    }
}

fn truncated(what: &str) -> ArtifactError {
    hostile(
        ARCHIVE,
        format!("truncated tar stream: it ends inside the data of {what}"),
    )
}

/// What a normalised name is in the archive seen so far.
enum Node {
    /// A parent directory of some entry, without an entry of its own (yet).
    ImplicitDir,
    Dir,
    File,
    Symlink(Vec<u8>),
}

/// GNU long-name/long-link and pax headers waiting for the entry they
/// describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxLocal>,
}

#[derive(Default)]
struct PaxLocal {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

struct Validator<'l> {
    limits: &'l Limits,
    entries: u64,
    file_bytes: u64,
    meta_bytes: u64,
    tree: HashMap<Vec<u8>, Node>,
    /// Normalised symlink names in archive order.
    symlinks: Vec<Vec<u8>>,
}

impl<'l> Validator<'l> {
    fn new(limits: &'l Limits) -> Validator<'l> {
        Validator {
            limits,
            entries: 0,
            file_bytes: 0,
            meta_bytes: 0,
            tree: HashMap::new(),
            symlinks: Vec::new(),
        }
    }

    fn read_entries<R: Read>(&mut self, stream: &mut Stream<R>) -> Result<(), ArtifactError> {
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            let offset = stream.total;
            if !stream.block(&mut block)? {
                if stream.total == 0 {
                    return Err(hostile(ARCHIVE, "empty tar stream, not a release archive"));
                }
                if !pending.is_empty() {
                    return Err(orphan_extension());
                }
                return Ok(());
            }
            if block.iter().all(|b| *b == 0) {
                if !pending.is_empty() {
                    return Err(orphan_extension());
                }
                return check_trailer(stream);
            }
            self.entry(stream, &block, offset, &mut pending)?;
        }
    }

    /// Handles one header block (and its data).
    fn entry<R: Read>(
        &mut self,
        stream: &mut Stream<R>,
        block: &[u8; BLOCK],
        offset: u64,
        pending: &mut Pending,
    ) -> Result<(), ArtifactError> {
        let header = tar::Header::from_byte_slice(block);
        let at = || format!("header at byte {offset} of the tar stream");
        check_checksum(header, block, &at)?;
        let header_size = header
            .entry_size()
            .map_err(|_| hostile(ARCHIVE, format!("{}: corrupt size field", at())))?;
        let typeflag = block[156];
        match typeflag {
            b'L' | b'K' => self.long_name(stream, typeflag, header_size, pending, &at),
            b'x' | b'g' => self.pax_header(stream, typeflag, header_size, pending, &at),
            _ => {
                let pending = std::mem::take(pending);
                self.member(stream, block, header, header_size, pending)
            }
        }
    }

    /// A GNU long-name (`L`) or long-link (`K`) header: its name waits in `pending` for the
    /// entry it belongs to.
    fn long_name<R: Read>(
        &mut self,
        stream: &mut Stream<R>,
        typeflag: u8,
        header_size: u64,
        pending: &mut Pending,
        at: &dyn Fn() -> String,
    ) -> Result<(), ArtifactError> {
        let slot = if typeflag == b'L' {
            &mut pending.long_name
        } else {
            &mut pending.long_link
        };
        if slot.is_some() {
            return Err(hostile(
                ARCHIVE,
                format!("{}: two GNU long-name headers for one entry", at()),
            ));
        }
        if header_size > MAX_NAME_BYTES as u64 + 1 {
            return Err(hostile(
                ARCHIVE,
                format!(
                    "{}: GNU long name of {header_size} bytes (more than {MAX_NAME_BYTES})",
                    at()
                ),
            ));
        }
        self.count_meta(header_size)?;
        let mut data = stream.data(header_size, "a GNU long-name header")?;
        // A C string: drop the terminator; NULs inside stay and are
        // refused with the name.
        while data.last() == Some(&0) {
            data.pop();
        }
        *slot = Some(data);
        Ok(())
    }

    /// A pax header: a local one (`x`) waits in `pending` for its entry; a global one (`g`)
    /// may only set what applies to no entry.
    fn pax_header<R: Read>(
        &mut self,
        stream: &mut Stream<R>,
        typeflag: u8,
        header_size: u64,
        pending: &mut Pending,
        at: &dyn Fn() -> String,
    ) -> Result<(), ArtifactError> {
        if pending.pax.is_some() || (typeflag == b'g' && !pending.is_empty()) {
            return Err(hostile(
                ARCHIVE,
                format!("{}: two pax headers for one entry", at()),
            ));
        }
        if header_size > MAX_PAX_BYTES {
            return Err(hostile(
                ARCHIVE,
                format!(
                    "{}: pax header of {header_size} bytes (more than {MAX_PAX_BYTES})",
                    at()
                ),
            ));
        }
        self.count_meta(header_size)?;
        let data = stream.data(header_size, "a pax header")?;
        let records =
            parse_pax(&data).map_err(|reason| hostile(ARCHIVE, format!("{}: {reason}", at())))?;
        if typeflag == b'g' {
            for (key, _) in records {
                if !PAX_GLOBAL_ALLOWED.contains(&key) {
                    return Err(hostile(
                        ARCHIVE,
                        format!(
                            "pax global header sets '{}', which would apply to every later entry",
                            show(key)
                        ),
                    ));
                }
            }
            return Ok(());
        }
        pending.pax = Some(pax_local(records, at)?);
        Ok(())
    }

    /// Handles a file-system entry (anything but an extension header).
    fn member<R: Read>(
        &mut self,
        stream: &mut Stream<R>,
        block: &[u8; BLOCK],
        header: &tar::Header,
        header_size: u64,
        pending: Pending,
    ) -> Result<(), ArtifactError> {
        let Names {
            raw: raw_name,
            display,
            link: raw_link,
        } = entry_names(block, pending, header_size)?;
        let size = header_size;

        let norm = normalize(&raw_name).map_err(|reason| hostile(&display, reason))?;
        let mode = header
            .mode()
            .map_err(|_| hostile(&display, "corrupt mode field"))?;
        if mode & 0o6000 != 0 {
            return Err(hostile(
                &display,
                format!(
                    "setuid/setgid bits are not allowed (mode {:o})",
                    mode & 0o7777
                ),
            ));
        }

        let node = node_of(block[156], &display, &raw_name, raw_link)?;
        if size != 0 && !matches!(node, Node::File) {
            return Err(hostile(
                &display,
                format!("directory or symlink entry carries {size} bytes of data"),
            ));
        }

        if norm.is_empty() {
            // The release root itself ("." or "./").
            if !matches!(node, Node::Dir) {
                return Err(hostile(&display, "the release root must be a directory"));
            }
            return Ok(());
        }

        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArtifactError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        if matches!(node, Node::File) {
            self.file_bytes = self.file_bytes.saturating_add(size);
            if self.file_bytes > self.limits.max_unpacked_bytes {
                return Err(ArtifactError::TooLarge {
                    limit: self.limits.max_unpacked_bytes,
                });
            }
        }
        let is_symlink = matches!(node, Node::Symlink(_));
        self.register(&display, &norm, node)?;
        if is_symlink {
            self.symlinks.push(norm);
        }
        if size != 0 {
            stream.skip(size, &display)?;
        }
        Ok(())
    }

    /// Counts extension-header bytes against a budget that grows with the
    /// number of entries, so a stream of huge pax headers cannot make us read
    /// gigabytes before any limit trips.
    fn count_meta(&mut self, size: u64) -> Result<(), ArtifactError> {
        self.meta_bytes = self.meta_bytes.saturating_add(size + BLOCK as u64);
        let budget =
            META_BASE_BYTES.saturating_add(META_PER_ENTRY_BYTES.saturating_mul(self.entries));
        if self.meta_bytes > budget {
            return Err(hostile(
                ARCHIVE,
                format!(
                    "extension headers (long names, pax records) add up to more than {budget} bytes"
                ),
            ));
        }
        Ok(())
    }

    /// Records `norm` in the tree, refusing duplicates and paths through
    /// symlinks or files.
    fn register(&mut self, display: &str, norm: &[u8], node: Node) -> Result<(), ArtifactError> {
        for (i, _) in norm.iter().enumerate().filter(|(_, b)| **b == b'/') {
            let parent = &norm[..i];
            match self.tree.get(parent) {
                None => {
                    self.tree.insert(parent.to_vec(), Node::ImplicitDir);
                }
                Some(Node::ImplicitDir | Node::Dir) => {}
                Some(Node::Symlink(_)) => {
                    return Err(hostile(
                        display,
                        format!(
                            "path goes through the symlink {} (an earlier entry), so tar would write through it",
                            show(parent)
                        ),
                    ))
                }
                Some(Node::File) => {
                    return Err(hostile(
                        display,
                        format!(
                            "path goes through {}, which is a regular file earlier in the archive",
                            show(parent)
                        ),
                    ))
                }
            }
        }
        match self.tree.get_mut(norm) {
            None => {
                self.tree.insert(norm.to_vec(), node);
                Ok(())
            }
            Some(existing @ Node::ImplicitDir) if matches!(node, Node::Dir) => {
                *existing = Node::Dir;
                Ok(())
            }
            Some(Node::ImplicitDir) => Err(hostile(
                display,
                format!(
                    "duplicate entry: earlier entries put a directory at {}",
                    show(norm)
                ),
            )),
            Some(_) => Err(hostile(
                display,
                format!(
                    "duplicate entry: {} appears earlier in the archive",
                    show(norm)
                ),
            )),
        }
    }

    /// Resolves every symlink against the whole tree (following symlinks to
    /// symlinks) and refuses any that ends up outside the release root.
    fn check_symlinks(&self) -> Result<(), ArtifactError> {
        let mut work = 0u64;
        for name in &self.symlinks {
            let Some(Node::Symlink(target)) = self.tree.get(name) else {
                continue;
            };
            let mut parent: Vec<&[u8]> = name.split(|b| *b == b'/').collect();
            parent.pop();
            let mut hops = 0;
            let outcome = self.resolve(parent, target, &mut hops, &mut work);
            let why = match outcome {
                Ok(_) => continue,
                Err(Unresolved::Escapes) => "resolves outside the release",
                Err(Unresolved::Loop) => "goes through too many symlinks (a loop?)",
                Err(Unresolved::TooComplex) => {
                    return Err(hostile(
                        ARCHIVE,
                        "symlinks are too many or too deeply chained to check",
                    ))
                }
            };
            let via = if hops > 0 {
                " (following symlinks in the archive)"
            } else {
                ""
            };
            return Err(hostile(
                show(name),
                format!("symlink target {} {why}{via}", show(target)),
            ));
        }
        Ok(())
    }

    /// Lexically resolves `target` from the directory `stack`, substituting
    /// symlinks of the archive as the kernel would.
    fn resolve<'a>(
        &'a self,
        mut stack: Vec<&'a [u8]>,
        target: &'a [u8],
        hops: &mut u32,
        work: &mut u64,
    ) -> Result<Vec<&'a [u8]>, Unresolved> {
        if target.starts_with(b"/") {
            return Err(Unresolved::Escapes);
        }
        for comp in target.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    if stack.pop().is_none() {
                        return Err(Unresolved::Escapes);
                    }
                }
                _ => {
                    stack.push(comp);
                    let joined = stack.join(&b'/');
                    *work += joined.len() as u64 + 1;
                    if *work > MAX_RESOLVE_WORK {
                        return Err(Unresolved::TooComplex);
                    }
                    if let Some(Node::Symlink(next)) = self.tree.get(&joined) {
                        *hops += 1;
                        if *hops > MAX_SYMLINK_HOPS {
                            return Err(Unresolved::Loop);
                        }
                        stack.pop();
                        stack = self.resolve(stack, next, hops, work)?;
                    }
                }
            }
        }
        Ok(stack)
    }
}

enum Unresolved {
    Escapes,
    Loop,
    TooComplex,
}

fn orphan_extension() -> ArtifactError {
    hostile(
        ARCHIVE,
        "the archive ends after an extension header, without the entry it describes",
    )
}

/// After the first zero block only zero padding may follow: busybox tar
/// reads on past a single zero block, GNU tar stops, so anything else there
/// could be entries one of them sees and the other does not.
fn check_trailer<R: Read>(stream: &mut Stream<R>) -> Result<(), ArtifactError> {
    let mut seen = 0u64;
    let mut buf = [0u8; 64 << 10];
    loop {
        let got = stream.fill(&mut buf)?;
        if got == 0 {
            return Ok(());
        }
        if buf[..got].iter().any(|b| *b != 0) {
            return Err(hostile(
                ARCHIVE,
                "data after the end-of-archive marker (entries hidden from some tar implementations)",
            ));
        }
        seen += got as u64;
        if seen > MAX_TRAILER_BYTES {
            return Err(hostile(
                ARCHIVE,
                format!(
                    "more than {MAX_TRAILER_BYTES} bytes of padding after the end of the archive"
                ),
            ));
        }
    }
}

/// The name in a header block, as GNU tar reads it: POSIX ustar headers
/// (magic `ustar\0`, any version) prepend the 155-byte prefix; GNU and v7
/// headers use only the name field.
fn header_name(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = cstr(&block[..100]);
    if &block[257..263] == b"ustar\0" {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(name);
            return full;
        }
    }
    name.to_vec()
}

/// Refuses names that are unsafe or ambiguous and returns the normalised
/// name: components joined by `/`, without `.` or empty components (so the
/// root entry normalises to an empty name).
fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.is_empty() {
        return Err("empty entry name".into());
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(format!("name is longer than {MAX_NAME_BYTES} bytes"));
    }
    check_bytes(raw, "name")?;
    if raw.starts_with(b"/") {
        return Err("path is absolute".into());
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path leaves the release ('..')".into()),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(comp);
            }
        }
    }
    Ok(out)
}

fn check_bytes(raw: &[u8], what: &str) -> Result<(), String> {
    for (byte, desc) in [
        (0u8, "a NUL byte"),
        (b'\n', "a newline"),
        (b'\r', "a carriage return"),
    ] {
        if raw.contains(&byte) {
            return Err(format!("{what} contains {desc}"));
        }
    }
    Ok(())
}

/// Per-entry checks of a symlink target; escapes through `..` are checked
/// once the whole tree is known ([`Validator::check_symlinks`]).
fn check_link_target(display: &str, target: &[u8]) -> Result<(), ArtifactError> {
    if target.is_empty() {
        return Err(hostile(display, "symlink has an empty target"));
    }
    if target.len() > MAX_NAME_BYTES {
        return Err(hostile(
            display,
            format!("symlink target is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    check_bytes(target, "symlink target").map_err(|reason| hostile(display, reason))?;
    if target.starts_with(b"/") {
        return Err(hostile(
            display,
            format!("symlink target {} is absolute", show(target)),
        ));
    }
    Ok(())
}

/// An entry's name and link target, as the extension headers before it (or else its header
/// block) give them, and its name for messages.
struct Names {
    raw: Vec<u8>,
    display: String,
    link: Vec<u8>,
}

/// See [`Names`]: refuses the combinations that tar implementations read differently.
fn entry_names(
    block: &[u8; BLOCK],
    pending: Pending,
    header_size: u64,
) -> Result<Names, ArtifactError> {
    let pax = pending.pax.unwrap_or_default();
    let raw_name = match (pax.path, pending.long_name) {
        (Some(_), Some(long)) => {
            return Err(hostile(
                show(&long),
                "entry has both a GNU long name and a pax path (tar implementations disagree on which wins)",
            ))
        }
        (Some(path), None) => path,
        (None, Some(long)) => long,
        (None, None) => header_name(block),
    };
    let display = if raw_name.is_empty() {
        "<empty name>".to_string()
    } else {
        show(&raw_name)
    };
    let raw_link = match (pax.linkpath, pending.long_link) {
        (Some(_), Some(_)) => {
            return Err(hostile(
                display,
                "entry has both a GNU long link and a pax linkpath (tar implementations disagree on which wins)",
            ))
        }
        (Some(link), None) | (None, Some(link)) => link,
        (None, None) => cstr(&block[157..257]).to_vec(),
    };
    if let Some(size) = pax.size {
        if size != header_size {
            return Err(hostile(
                display,
                format!(
                    "pax size {size} disagrees with the header's size {header_size} (tar implementations disagree on which wins)"
                ),
            ));
        }
    }
    Ok(Names {
        raw: raw_name,
        display,
        link: raw_link,
    })
}

/// What an entry of type `typeflag` is, if it is allowed at all (regular files, directories,
/// symlinks whose target stays inside).
fn node_of(
    typeflag: u8,
    display: &str,
    raw_name: &[u8],
    raw_link: Vec<u8>,
) -> Result<Node, ArtifactError> {
    let node = match typeflag {
        b'0' | 0 => {
            // GNU tar extracts a "regular file" whose name ends in '/' as
            // a directory; the tar crate does not.
            if raw_name.ends_with(b"/") {
                return Err(hostile(
                    display,
                    "regular-file entry whose name ends in '/' (tar implementations disagree on what it is)",
                ));
            }
            Node::File
        }
        b'5' => Node::Dir,
        b'2' => {
            check_link_target(display, &raw_link)?;
            Node::Symlink(raw_link)
        }
        b'1' => {
            return Err(hostile(
                display,
                format!(
                "hard link to {} is not allowed (hard links can reach files outside the release)",
                show(&raw_link)
            ),
            ))
        }
        b'3' => return Err(hostile(display, "character device is not allowed")),
        b'4' => return Err(hostile(display, "block device is not allowed")),
        b'6' => return Err(hostile(display, "FIFO (named pipe) is not allowed")),
        other => {
            let what = match other {
                b'7' => "contiguous file",
                b'S' => "GNU sparse file",
                b'D' => "GNU dump directory",
                b'M' => "multi-volume continuation",
                b'V' => "volume label",
                b'X' => "Solaris extended header",
                _ => "unknown",
            };
            return Err(hostile(
                display,
                format!(
                    "unsupported entry type '{}' ({what}); only regular files, directories and symlinks are allowed",
                    show(&[other])
                ),
            ));
        }
    };
    Ok(node)
}

/// The header block's checksum field agrees with its bytes.
fn check_checksum(
    header: &tar::Header,
    block: &[u8; BLOCK],
    at: &dyn Fn() -> String,
) -> Result<(), ArtifactError> {
    let stored = header
        .cksum()
        .map_err(|_| hostile(ARCHIVE, format!("{}: corrupt checksum field", at())))?;
    let computed: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    if stored != computed {
        return Err(hostile(
            ARCHIVE,
            format!("{}: checksum mismatch (corrupt archive)", at()),
        ));
    }
    Ok(())
}

/// The keys of a local pax header that matter: `path`, `linkpath`, `size`; sparse files are
/// refused.
fn pax_local(
    records: Vec<PaxRecord<'_>>,
    at: &dyn Fn() -> String,
) -> Result<PaxLocal, ArtifactError> {
    let mut pax = PaxLocal::default();
    for (key, value) in records {
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        hostile(
                            ARCHIVE,
                            format!("{}: invalid pax size '{}'", at(), show(value)),
                        )
                    })?;
                pax.size = Some(size);
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err(hostile(
                    ARCHIVE,
                    format!(
                        "{}: sparse files are not supported (pax '{}')",
                        at(),
                        show(key)
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(pax)
}

/// Parses pax extended-header records (`"<len> <key>=<value>\n"`).
/// One pax record: keyword and value, borrowed from the header data.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

fn parse_pax(data: &[u8]) -> Result<Vec<PaxRecord<'_>>, String> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let malformed = || "malformed pax header".to_string();
        let space = rest.iter().position(|b| *b == b' ').ok_or_else(malformed)?;
        let digits = &rest[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || digits.len() > 12 {
            return Err(malformed());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(malformed)?;
        if len < space + 3 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(malformed());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(malformed)?;
        records.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(records)
}

/// Content-addressed store of validated release tarballs:
/// `<dir>/<sha256>.tar.gz`, plus a `<sha256>.json` summary beside each.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// The summary kept beside a stored tarball, so `get` need not re-read it.
#[derive(Serialize, Deserialize)]
struct SummaryFile {
    entries: u64,
    unpacked_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    packing: Option<Packing>,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file in the store that is removed on drop unless kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Hashes and counts what passes through.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn hex(self) -> (String, u64, T) {
        let digest = self.hasher.finalize();
        let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
        (hex, self.bytes, self.inner)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Copies what is read through it into `out`; a write error is kept (and ends the read) so
/// that it is not mistaken for a refusal of the archive.
struct Copying<R, W> {
    inner: R,
    out: W,
    failed: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Copying<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed.is_some() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.out.write_all(&buf[..n]) {
            self.failed = Some(e);
            return Ok(0);
        }
        Ok(n)
    }
}

/// Entry and byte counts while packing a directory.
struct PackCount<'l> {
    limits: &'l Limits,
    entries: u64,
    bytes: u64,
    /// The release's manifest, built from what is packed (`None` once a name is not UTF-8:
    /// then it is computed from the tarball when a delta needs it).
    manifest: Option<Manifest>,
    /// Files are packed empty and never opened ([`ArtifactStore::check_dir`]).
    dry: bool,
}

impl PackCount<'_> {
    fn note(&mut self, rel: &[u8], entry: Entry) {
        let name = std::str::from_utf8(rel).ok().map(str::to_string);
        match (name, self.manifest.as_mut()) {
            (Some(name), Some(m)) => {
                m.entries.insert(name, entry);
            }
            _ => self.manifest = None,
        }
    }
}

/// Bytes of tar stream handed to the checker thread at a time.
const TEE_CHUNK: usize = 256 << 10;
/// Bytes of tar stream compressed up front to decide whether compressing pays.
const SAMPLE_BYTES: usize = 2 << 20;
/// Compression is used when the sample shrinks to at most this fraction (in percent).
const WORTH_COMPRESSING_PERCENT: u64 = 90;

/// How a packed artifact's tar stream is compressed inside its gzip container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Packing {
    /// Deflate level 1 (gzip's fast level): the sample shrank.
    Gzip1,
    /// Stored (uncompressed) deflate blocks: the sample did not shrink enough to pay for
    /// compressing on the way out and decompressing on every host. Still a gzip stream, so
    /// every host unpacks it with the same `tar -xz`.
    Stored,
}

impl Packing {
    /// Words for a person: `gzip -1` or `none (stored)`.
    pub fn describe(self) -> &'static str {
        match self {
            Packing::Gzip1 => "gzip -1",
            Packing::Stored => "none (stored)",
        }
    }
}

/// The store's file, telling a [`Growing`] reader how much of it is written.
struct StoreFile {
    file: File,
    written: u64,
    growing: Option<Arc<Growing>>,
}

impl Write for StoreFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(g) = &self.growing else {
            return self.file.write(buf);
        };
        if g.cancelled() {
            return Err(io::Error::other("no host is left to stream to"));
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        g.wrote(self.written);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Decides from the first [`SAMPLE_BYTES`] of the stream whether to compress it, then writes
/// the gzip stream into the hashed file, and tells a head start's readers ([`Growing`]) which
/// it is: hosts get the gzip stream when it is compressed, or else the tar stream inside its
/// stored blocks (a host spends no CPU on gzip for data that does not shrink).
enum Compressing<W: Write> {
    Sampling {
        sample: Vec<u8>,
        file: W,
        growing: Option<Arc<Growing>>,
    },
    Gz {
        gz: crate::gzip::GzOut<W>,
        packing: Packing,
    },
    Done,
}

impl<W: Write> Compressing<W> {
    fn decide(&mut self) -> io::Result<()> {
        if !matches!(self, Compressing::Sampling { .. }) {
            return Ok(());
        }
        let Compressing::Sampling {
            sample,
            file,
            growing,
        } = std::mem::replace(self, Compressing::Done)
        else {
            return Ok(());
        };
        let mut probe = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(sample.len()),
            Compression::fast(),
        );
        probe.write_all(&sample)?;
        let shrunk = probe.finish()?.len() as u64;
        let packing = if shrunk * 100 <= sample.len() as u64 * WORTH_COMPRESSING_PERCENT {
            Packing::Gzip1
        } else {
            Packing::Stored
        };
        if let Some(g) = &growing {
            g.format(packing == Packing::Gzip1);
        }
        let mut gz = crate::gzip::GzOut::new(file, packing)?;
        gz.write_all(&sample)?;
        *self = Compressing::Gz { gz, packing };
        Ok(())
    }

    /// The file, and how it was packed.
    fn finish(mut self) -> io::Result<(W, Packing)> {
        self.decide()?;
        match self {
            Compressing::Gz { gz, packing } => Ok((gz.finish()?, packing)),
            _ => Err(io::Error::other("the compressor is gone")),
        }
    }
}

impl<W: Write> Write for Compressing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressing::Sampling { sample, .. } => {
                let n = buf.len().min(SAMPLE_BYTES - sample.len());
                sample.extend_from_slice(&buf[..n]);
                if sample.len() >= SAMPLE_BYTES {
                    self.decide()?;
                }
                Ok(n)
            }
            Compressing::Gz { gz, .. } => gz.write(buf),
            Compressing::Done => Err(io::Error::other("the compressor is gone")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressing::Gz { gz, .. } => gz.flush(),
            _ => Ok(()),
        }
    }
}

/// Flushes a file being written every 0.2 s from a thread of its own, so that the flush
/// that commits it finds little left to write, not the whole artifact (the disk would
/// otherwise idle while it is written).
struct Flusher;

impl Flusher {
    fn during<T>(file: File, work: impl FnOnce() -> T) -> T {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            s.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(std::time::Duration::from_millis(200))
                {
                    if file.sync_data().is_err() {
                        return; // the final flush reports it
                    }
                }
            });
            let r = work();
            drop(stop);
            r
        })
    }
}

/// The checker thread stopped reading (it refused the stream).
#[derive(Debug)]
struct CheckerStopped;

impl std::fmt::Display for CheckerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the archive check stopped")
    }
}

impl std::error::Error for CheckerStopped {}

fn is_checker_stop(e: &ArtifactError) -> bool {
    matches!(e, ArtifactError::Io { source, .. }
        if source.get_ref().is_some_and(|s| s.is::<CheckerStopped>()))
}

/// Writes the tar stream to the compressor and a copy of it to the checker thread.
struct Tee<W: Write> {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    chunk: Vec<u8>,
    out: W,
}

impl<W: Write> Tee<W> {
    fn send(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(TEE_CHUNK));
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| io::Error::other(CheckerStopped)),
            None => Err(io::Error::other(CheckerStopped)),
        }
    }

    /// Hands the last bytes to the checker and closes its channel.
    fn close(&mut self) -> io::Result<()> {
        let sent = self.send();
        self.tx = None;
        sent
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() >= TEE_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads the chunks a [`Tee`] sends.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// [`validate_tar_gz`] for an uncompressed tar stream.
fn validate_tar(reader: impl Read, limits: &Limits) -> Result<Summary, ArtifactError> {
    let mut stream = Stream {
        inner: reader,
        total: 0,
        // Not a gzip stream: "empty input" is about the tar stream below.
        compressed: Rc::new(Cell::new(1)),
    };
    let mut validator = Validator::new(limits);
    validator.read_entries(&mut stream)?;
    validator.check_symlinks()?;
    Ok(Summary {
        entries: validator.entries,
        unpacked_bytes: validator.file_bytes,
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Replaces `<archive>` in a refusal with the file it came from.
fn name_archive(err: ArtifactError, file: &Path) -> ArtifactError {
    match err {
        ArtifactError::Hostile { path, reason } if path == ARCHIVE => ArtifactError::Hostile {
            path: file.display().to_string(),
            reason,
        },
        other => other,
    }
}

impl ArtifactStore {
    /// A store in `dir`; the directory is created (mode 0700) on first import.
    pub fn new(dir: impl Into<PathBuf>) -> ArtifactStore {
        ArtifactStore { dir: dir.into() }
    }

    /// Imports a directory (packed deterministically) or a `.tar.gz`/`.tgz`
    /// file (or any file starting with the gzip magic bytes).
    pub fn import(&self, path: &Path, limits: &Limits) -> Result<StoredArtifact, ArtifactError> {
        let meta = fs::metadata(path).map_err(io_error(path))?;
        if meta.is_dir() {
            return self.import_dir(path, limits);
        }
        if !meta.is_file() {
            return Err(ArtifactError::NotAnArtifact {
                path: path.display().to_string(),
            });
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let gzip_name = name.ends_with(".tar.gz") || name.ends_with(".tgz");
        if !gzip_name {
            let mut magic = [0u8; 2];
            let mut file = File::open(path).map_err(io_error(path))?;
            let got = file.read(&mut magic).map_err(io_error(path))?;
            if got < 2 || magic != [0x1f, 0x8b] {
                return Err(ArtifactError::NotAnArtifact {
                    path: path.display().to_string(),
                });
            }
        }
        self.import_tar_gz(path, limits)
    }

    /// Packs `dir` into a deterministic tar.gz (same tree, same bytes), checks
    /// it with [`validate_tar_gz`] and stores it.
    ///
    /// Entries are walked depth first, each directory before its contents
    /// and siblings in byte-wise name order; names are relative without
    /// `./` (directories end in `/`); uid/gid 0, no user/group names; mode
    /// 0755 for directories, `(mode & 0o755) | 0o644` for files (so exec bits
    /// survive), 0777 for symlinks; mtime is the entry's own, in seconds.
    /// Symlinks are stored as symlinks, not followed; sockets, FIFOs and
    /// devices are refused.
    pub fn import_dir(&self, dir: &Path, limits: &Limits) -> Result<StoredArtifact, ArtifactError> {
        self.import_dir_to(dir, limits, None)
    }

    /// [`ArtifactStore::import_dir`], with the store's file readable by hosts as it is
    /// written (see [`Growing`]): said whole only once every byte is written, said failed if
    /// the packing fails; stops if `growing` is cancelled.
    pub(crate) fn import_dir_growing(
        &self,
        dir: &Path,
        limits: &Limits,
        growing: Arc<Growing>,
    ) -> Result<StoredArtifact, ArtifactError> {
        let r = self.import_dir_to(dir, limits, Some(growing.clone()));
        growing.end(false); // no-op when it was said whole
        r
    }

    /// Walks `dir` as [`ArtifactStore::import_dir`] would pack it, with the same checks and
    /// the same archive checks, without reading any file's content or writing anything: what
    /// packing would refuse for the tree's shape (names, symlinks, file types, limits) is
    /// refused here, before any host is touched. Returns the archive's summary.
    pub fn check_dir(dir: &Path, limits: &Limits) -> Result<Summary, ArtifactError> {
        Self::check_dir_tree(dir, limits).map(|(summary, _)| summary)
    }

    /// [`ArtifactStore::check_dir`], and the tree's entries (files without digests; `None`
    /// when a name is not UTF-8).
    pub(crate) fn check_dir_tree(
        dir: &Path,
        limits: &Limits,
    ) -> Result<(Summary, Option<Manifest>), ArtifactError> {
        let meta = fs::metadata(dir).map_err(io_error(dir))?;
        if !meta.is_dir() {
            return Err(ArtifactError::NotAnArtifact {
                path: dir.display().to_string(),
            });
        }
        let (summary, _, tree) = pack_checked(dir, limits, io::sink(), true, Path::new("-"))?;
        Ok((summary, tree))
    }

    fn import_dir_to(
        &self,
        dir: &Path,
        limits: &Limits,
        growing: Option<Arc<Growing>>,
    ) -> Result<StoredArtifact, ArtifactError> {
        let meta = fs::metadata(dir).map_err(io_error(dir))?;
        if !meta.is_dir() {
            return Err(ArtifactError::NotAnArtifact {
                path: dir.display().to_string(),
            });
        }
        self.ensure_dir()?;
        let (temp, file) = self.temp_file("tar.gz")?;
        let flushing = file.try_clone().map_err(io_error(&temp.path))?;
        if let Some(g) = &growing {
            g.open(File::open(&temp.path).map_err(io_error(&temp.path))?);
        }
        let out = Compressing::Sampling {
            sample: Vec::with_capacity(SAMPLE_BYTES),
            file: Hashing::new(BufWriter::with_capacity(
                1 << 20,
                StoreFile {
                    file,
                    written: 0,
                    growing: growing.clone(),
                },
            )),
            growing: growing.clone(),
        };
        let (summary, out, manifest) = Flusher::during(flushing, || {
            pack_checked(dir, limits, out, false, &temp.path)
        })?;
        let (hashed, packing) = out.finish().map_err(io_error(&temp.path))?;
        let (sha256, size, buffered) = hashed.hex();
        let file = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io_error(&temp.path))?
            .file;
        // Checked, hashed and written: the hosts may now take the stream as whole and finish
        // unpacking while the store's copy is flushed. No host can serve the upload before
        // this returns: it is renamed to its release id only after the artifact is committed
        // below (and if flushing or committing fails, the run removes every upload).
        if let Some(g) = &growing {
            g.end(true);
        }
        file.sync_all().map_err(io_error(&temp.path))?;
        drop(file);
        let stored = self.commit(temp, sha256, size, summary, Some(packing))?;
        if let Some(m) = manifest {
            crate::delta::store_manifest(self, &stored.sha256, &m);
        }
        Ok(stored)
    }

    /// Validates the tarball `file` while copying it into the store and hashing it, in one
    /// read (nothing is kept in the store if it is refused).
    pub fn import_tar_gz(
        &self,
        file: &Path,
        limits: &Limits,
    ) -> Result<StoredArtifact, ArtifactError> {
        let source = File::open(file).map_err(io_error(file))?;
        let meta = source.metadata().map_err(io_error(file))?;
        if !meta.is_file() {
            return Err(ArtifactError::NotAnArtifact {
                path: file.display().to_string(),
            });
        }
        self.ensure_dir()?;
        let (temp, out) = self.temp_file("tar.gz")?;
        let mut copying = Copying {
            inner: Hashing::new(io::BufReader::with_capacity(1 << 20, source)),
            out: BufWriter::with_capacity(1 << 20, out),
            failed: None,
        };
        let validated = validate_tar_gz(&mut copying, limits);
        if let Some(e) = copying.failed.take() {
            return Err(io_error(&temp.path)(e));
        }
        let summary = validated.map_err(|e| name_archive(e, file))?;
        // What follows the archive's end (zero padding) is part of the file and its digest.
        io::copy(&mut copying, &mut io::sink()).map_err(io_error(file))?;
        if let Some(e) = copying.failed.take() {
            return Err(io_error(&temp.path)(e));
        }
        let (sha256, size, _) = copying.inner.hex();
        let out = copying
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io_error(&temp.path))?;
        out.sync_all().map_err(io_error(&temp.path))?;
        drop(out);
        self.commit(temp, sha256, size, summary, None)
    }

    /// The store's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the tarball with this digest lives: `<dir>/<sha256>.tar.gz`.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar.gz"))
    }

    /// The stored tarball with this digest, if present. Does not re-hash; the
    /// summary comes from the file stored beside it (or, if that is missing,
    /// from reading the tarball again).
    pub fn get(&self, sha256: &str) -> Option<StoredArtifact> {
        if !is_sha256_hex(sha256) {
            return None;
        }
        let path = self.path_of(sha256);
        let meta = fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() {
            return None;
        }
        let mut packing = None;
        let summary = match fs::read(self.summary_path(sha256))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<SummaryFile>(&bytes).ok())
        {
            Some(s) => {
                packing = s.packing;
                Summary {
                    entries: s.entries,
                    unpacked_bytes: s.unpacked_bytes,
                }
            }
            None => {
                let unlimited = Limits {
                    max_unpacked_bytes: u64::MAX,
                    max_entries: u64::MAX,
                };
                let file = File::open(&path).ok()?;
                validate_tar_gz(io::BufReader::new(file), &unlimited).ok()?
            }
        };
        Some(StoredArtifact {
            sha256: sha256.to_string(),
            path,
            size: meta.len(),
            summary,
            packing,
        })
    }

    fn summary_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.json"))
    }

    fn ensure_dir(&self) -> Result<(), ArtifactError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_error(&self.dir))
    }

    /// A new, empty temporary file inside the store (mode 0600).
    fn temp_file(&self, ext: &str) -> Result<(TempFile, File), ArtifactError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = self.dir.join(format!(
            ".import-{}-{}-{nanos}.{ext}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path))?;
        Ok((TempFile { path, keep: false }, file))
    }

    /// Moves a fully written and validated temp file to `<sha256>.tar.gz`
    /// (writing the summary first), or drops it if that digest is stored.
    fn commit(
        &self,
        mut temp: TempFile,
        sha256: String,
        size: u64,
        summary: Summary,
        packing: Option<Packing>,
    ) -> Result<StoredArtifact, ArtifactError> {
        let summary_json = serde_json::to_vec(&SummaryFile {
            entries: summary.entries,
            unpacked_bytes: summary.unpacked_bytes,
            packing,
        })
        .map_err(|e| ArtifactError::Io {
            path: self.summary_path(&sha256).display().to_string(),
            source: io::Error::other(e),
        })?;
        let (summary_temp, mut summary_file) = self.temp_file("json")?;
        summary_file
            .write_all(&summary_json)
            .and_then(|()| summary_file.sync_all())
            .map_err(io_error(&summary_temp.path))?;
        let summary_path = self.summary_path(&sha256);
        fs::rename(&summary_temp.path, &summary_path).map_err(io_error(&summary_path))?;
        let mut summary_temp = summary_temp;
        summary_temp.keep = true;

        let dest = self.path_of(&sha256);
        if fs::symlink_metadata(&dest).is_err() {
            fs::rename(&temp.path, &dest).map_err(io_error(&dest))?;
            temp.keep = true;
        }
        drop(temp);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(StoredArtifact {
            sha256,
            path: dest,
            size,
            summary,
            packing,
        })
    }
}

/// Packs `dir` into `out` while a thread checks a copy of the tar stream with the same checks
/// as a user's tarball (without compressing, writing and re-reading it first). `dry`: every
/// regular file is packed empty and not read (see [`ArtifactStore::check_dir`]). Returns the
/// checked summary, `out`, and the manifest (when dry, without digests; none when a name is
/// not UTF-8).
fn pack_checked<W: Write>(
    dir: &Path,
    limits: &Limits,
    out: W,
    dry: bool,
    temp: &Path,
) -> Result<(Summary, W, Option<Manifest>), ArtifactError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let limits_copy = *limits;
    let checker = std::thread::spawn(move || {
        validate_tar(
            ChannelReader {
                rx,
                chunk: Vec::new(),
                at: 0,
            },
            &limits_copy,
        )
    });
    let tee = Tee {
        tx: Some(tx),
        chunk: Vec::with_capacity(TEE_CHUNK),
        out,
    };
    let mut builder = tar::Builder::new(tee);
    let mut count = PackCount {
        limits,
        entries: 0,
        bytes: 0,
        manifest: Some(Manifest::default()),
        dry,
    };
    let packed = pack_tree(&mut builder, dir, &mut Vec::new(), &mut count, temp);
    let tee = match packed {
        Ok(()) => builder.into_inner().map_err(io_error(temp)),
        Err(e) => {
            drop(builder);
            Err(e)
        }
    }
    .and_then(|mut tee| tee.close().map(|()| tee).map_err(io_error(temp)));
    // The sender is gone with the tee (or closed): the checker ends.
    let checked = checker.join().unwrap_or_else(|_| {
        Err(ArtifactError::Io {
            path: dir.display().to_string(),
            source: io::Error::other("the archive checker panicked"),
        })
    });
    let tee = match tee {
        Ok(tee) => tee,
        // The checker refused the stream and stopped reading: its reason is the one.
        Err(e) if is_checker_stop(&e) => {
            return Err(name_archive(checked.err().unwrap_or(e), dir));
        }
        Err(e) => return Err(e),
    };
    let summary = checked.map_err(|e| name_archive(e, dir))?;
    Ok((summary, tee.out, count.manifest))
}

/// Appends the contents of `root/rel` (a directory) to `builder`, depth
/// first, siblings in byte-wise order.
fn pack_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &mut Vec<u8>,
    count: &mut PackCount<'_>,
    temp: &Path,
) -> Result<(), ArtifactError> {
    let here = root.join(std::ffi::OsStr::from_bytes(rel));
    let mut names: Vec<OsString> = fs::read_dir(&here)
        .map_err(io_error(&here))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_error(&here))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let before = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let path = root.join(std::ffi::OsStr::from_bytes(rel));
        pack_entry(builder, root, &path, rel, count, temp)?;
        rel.truncate(before);
    }
    Ok(())
}

fn pack_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    path: &Path,
    rel: &mut Vec<u8>,
    count: &mut PackCount<'_>,
    temp: &Path,
) -> Result<(), ArtifactError> {
    let meta = fs::symlink_metadata(path).map_err(io_error(path))?;
    let kind = meta.file_type();
    count.entries += 1;
    if count.entries > count.limits.max_entries {
        return Err(ArtifactError::TooManyEntries {
            limit: count.limits.max_entries,
        });
    }
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    let write_err = io_error(temp);
    if kind.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        let mut name = rel.clone();
        name.push(b'/');
        append_raw(builder, &mut header, &name, None, io::empty()).map_err(write_err)?;
        count.note(rel, Entry::Dir);
        pack_tree(builder, root, rel, count, temp)
    } else if kind.is_symlink() {
        let target = fs::read_link(path).map_err(io_error(path))?;
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        append_raw(
            builder,
            &mut header,
            rel,
            Some(target.as_os_str().as_bytes()),
            io::empty(),
        )
        .map_err(write_err)?;
        match target.to_str() {
            Some(t) => count.note(
                rel,
                Entry::Symlink {
                    target: t.to_string(),
                },
            ),
            None => count.manifest = None,
        }
        Ok(())
    } else if kind.is_file() {
        pack_file(builder, path, rel, &meta, header, count, temp)
    } else {
        let what = if kind.is_socket() {
            "a socket"
        } else if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        };
        Err(hostile(
            path.display().to_string(),
            format!("is {what}; only regular files, directories and symlinks can be shipped"),
        ))
    }
}

/// Appends the regular file `path` (whose `lstat` is `meta`) as `rel`, hashing it for the
/// manifest; when dry, an empty entry of its name and mode, unread.
fn pack_file<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    rel: &[u8],
    meta: &fs::Metadata,
    mut header: tar::Header,
    count: &mut PackCount<'_>,
    temp: &Path,
) -> Result<(), ArtifactError> {
    let size = meta.len();
    count.bytes = count.bytes.saturating_add(size);
    if count.bytes > count.limits.max_unpacked_bytes {
        return Err(ArtifactError::TooLarge {
            limit: count.limits.max_unpacked_bytes,
        });
    }
    let mode = (meta.mode() & 0o755) | 0o644;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(mode);
    if count.dry {
        header.set_size(0);
        append_raw(builder, &mut header, rel, None, io::empty()).map_err(io_error(temp))?;
        count.note(
            rel,
            Entry::File {
                mode,
                size,
                sha256: String::new(),
                head: None,
            },
        );
        return Ok(());
    }
    let file = File::open(path).map_err(io_error(path))?;
    let opened = file.metadata().map_err(io_error(path))?;
    if !opened.is_file() || opened.ino() != meta.ino() || opened.dev() != meta.dev() {
        return Err(ArtifactError::Io {
            path: path.display().to_string(),
            source: io::Error::other("the file was replaced while it was being packed"),
        });
    }
    header.set_size(size);
    let mut exact = Exact {
        inner: file.take(size),
        left: size,
        hasher: count.manifest.as_ref().map(|_| Heads::default()),
    };
    append_raw(builder, &mut header, rel, None, &mut exact).map_err(|e| {
        if exact.left > 0 {
            ArtifactError::Io {
                path: path.display().to_string(),
                source: e,
            }
        } else {
            io_error(temp)(e)
        }
    })?;
    let after = exact
        .inner
        .into_inner()
        .metadata()
        .map_err(io_error(path))?;
    if after.len() != size {
        return Err(ArtifactError::Io {
            path: path.display().to_string(),
            source: io::Error::other("the file changed size while it was being packed"),
        });
    }
    if let Some(h) = exact.hasher {
        let (sha256, head) = h.finish();
        count.note(
            rel,
            Entry::File {
                mode,
                size,
                sha256,
                head: Some(head),
            },
        );
    }
    Ok(())
}

/// Reads exactly `left` bytes or fails (a file that shrank mid-pack would
/// otherwise corrupt the archive).
struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
    /// Hashes the content for the manifest.
    hasher: Option<Heads>,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Appends one entry with `name` (and `link`) copied verbatim into the
/// header, using GNU long-name/long-link headers when they do not fit.
fn append_raw<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    name: &[u8],
    link: Option<&[u8]>,
    data: impl Read,
) -> io::Result<()> {
    let fields = header.as_old_mut();
    if name.len() > fields.name.len() {
        append_long(builder, b'L', name)?;
        fields.name.copy_from_slice(&name[..100]);
    } else {
        fields.name[..name.len()].copy_from_slice(name);
    }
    if let Some(link) = link {
        if link.len() > fields.linkname.len() {
            append_long(builder, b'K', link)?;
            fields.linkname.copy_from_slice(&link[..100]);
        } else {
            fields.linkname[..link.len()].copy_from_slice(link);
        }
    }
    header.set_cksum();
    builder.append(header, data)
}

fn append_long<W: Write>(builder: &mut tar::Builder<W>, kind: u8, value: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(value.len() as u64 + 1);
    header.set_entry_type(tar::EntryType::new(kind));
    header.set_cksum();
    builder.append(&header, value.chain(&[0u8][..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_dots_and_slashes() {
        assert_eq!(normalize(b"./a/b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"a//./b").unwrap(), b"a/b");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"a/../b").is_err());
        assert!(normalize(b"/a").is_err());
        assert!(normalize(b"").is_err());
    }

    #[test]
    fn pax_records_parse() {
        let records = parse_pax(b"12 path=abc\n17 comment=x y=z\n").unwrap();
        assert_eq!(records[0], (&b"path"[..], &b"abc"[..]));
        assert_eq!(records[1], (&b"comment"[..], &b"x y=z"[..]));
        assert!(parse_pax(b"99 path=abc\n").is_err());
        assert!(parse_pax(b"path=abc\n").is_err());
    }

    #[test]
    fn show_escapes_control_characters() {
        assert_eq!(show(b"a\nb\0"), "a\\nb\\u{0}");
    }

    #[test]
    fn sha256_hex_format() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex("../../etc/passwd"));
    }
}

//! Builders for hostile and well-formed release tarballs, for tests only.
//!
//! This module owns the byte-level fixtures that exercise cutover's artifact
//! validation: [`write_hostile`] writes one `.tar.gz` per [`Hostile`] kind,
//! [`write_good_tar_gz`] writes a valid release, and [`RawTar`] assembles tar
//! streams header by header, copying names and link targets verbatim into the
//! header fields (the `tar` crate's safe setters refuse `..` and absolute
//! paths, which is exactly what these fixtures need to contain).
//!
//! It must not validate, normalise or extract anything, and it writes only to
//! the path it is given: checking archives is the engine's job
//! (`cutover_engine::artifact`), and a fixture that "fixes" its own input would
//! hide the bugs it exists to find. Builders panic on I/O errors, as test
//! helpers do.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{EntryType, Header};

/// Name of the harmless file every hostile archive also contains.
pub const HARMLESS_NAME: &str = "index.html";
/// Contents of [`HARMLESS_NAME`].
pub const HARMLESS_BODY: &[u8] = b"<!doctype html><title>release</title>\n";

/// Fixed mtime for fixture entries, so fixtures are reproducible.
const FIXTURE_MTIME: u64 = 1_700_000_000;
const BLOCK: usize = 512;

/// One way a release tarball can try to escape or abuse the release directory.
///
/// Every archive written by [`write_hostile`] holds a harmless
/// [`HARMLESS_NAME`] first and then the hostile part; [`Hostile::entry`] is the
/// entry name (as spelled in the archive) that a validator must name when it
/// refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hostile {
    /// A regular file named `../etc/passwd`: checks that `..` components are
    /// refused (the entry would land outside the release directory).
    DotDot,
    /// A regular file with an absolute name (`/etc/cron.d/cutover-pwned`):
    /// checks that absolute paths are refused.
    Absolute,
    /// A symlink `link -> /etc/shadow`: checks that absolute symlink targets
    /// are refused (the app would read or write host files through it).
    SymlinkAbsolute,
    /// A directory `assets/` and a symlink `assets/up -> ../../etc`: checks
    /// that relative symlink targets which climb above the release root are
    /// refused.
    SymlinkEscapes,
    /// A symlink `web -> assets` (harmless on its own) followed by a file
    /// `web/evil.html`: checks that an entry whose path goes through an earlier
    /// symlink entry is refused (tar would write through the link).
    ThroughSymlink,
    /// A hard link `hard` to `/etc/shadow`: checks that hard links are refused.
    HardLink,
    /// A character device `zero` (1, 5): checks that character devices are
    /// refused.
    CharDevice,
    /// A block device `disk` (8, 0): checks that block devices are refused.
    BlockDevice,
    /// A FIFO `pipe`: checks that named pipes are refused.
    Fifo,
    /// A second `./index.html`: checks that duplicates are detected after name
    /// normalisation (the second copy would silently replace the first).
    Duplicate,
    /// A regular file `bin/tool` with mode 4755: checks that setuid/setgid
    /// bits are refused.
    Setuid,
    /// `n` entries in total (index.html plus `n - 1` empty files `f000001`,
    /// ...): checks the entry-count limit; refused when `max_entries < n`.
    TooManyEntries(u64),
    /// A regular file `big.bin` of `n` zero bytes (next to index.html's few
    /// bytes): checks the unpacked-size limit; refused when
    /// `max_unpacked_bytes < n`. The zeros really are streamed through gzip,
    /// so keep `n` just over the limit a test sets.
    TooLarge(u64),
}

impl Hostile {
    /// Every variant except the two sized ones.
    pub fn all_basic() -> Vec<Hostile> {
        vec![
            Hostile::DotDot,
            Hostile::Absolute,
            Hostile::SymlinkAbsolute,
            Hostile::SymlinkEscapes,
            Hostile::ThroughSymlink,
            Hostile::HardLink,
            Hostile::CharDevice,
            Hostile::BlockDevice,
            Hostile::Fifo,
            Hostile::Duplicate,
            Hostile::Setuid,
        ]
    }

    /// A short label for test output and fixture file names.
    pub fn name(&self) -> &'static str {
        match self {
            Hostile::DotDot => "dot-dot",
            Hostile::Absolute => "absolute",
            Hostile::SymlinkAbsolute => "symlink-absolute",
            Hostile::SymlinkEscapes => "symlink-escapes",
            Hostile::ThroughSymlink => "through-symlink",
            Hostile::HardLink => "hard-link",
            Hostile::CharDevice => "char-device",
            Hostile::BlockDevice => "block-device",
            Hostile::Fifo => "fifo",
            Hostile::Duplicate => "duplicate",
            Hostile::Setuid => "setuid",
            Hostile::TooManyEntries(_) => "too-many-entries",
            Hostile::TooLarge(_) => "too-large",
        }
    }

    /// The hostile entry's name as spelled in the archive; a validator that
    /// refuses the archive should name it. For [`Hostile::TooManyEntries`]
    /// this is the common prefix of the filler files.
    pub fn entry(&self) -> &'static str {
        match self {
            Hostile::DotDot => "../etc/passwd",
            Hostile::Absolute => "/etc/cron.d/cutover-pwned",
            Hostile::SymlinkAbsolute => "link",
            Hostile::SymlinkEscapes => "assets/up",
            Hostile::ThroughSymlink => "web/evil.html",
            Hostile::HardLink => "hard",
            Hostile::CharDevice => "zero",
            Hostile::BlockDevice => "disk",
            Hostile::Fifo => "pipe",
            Hostile::Duplicate => "./index.html",
            Hostile::Setuid => "bin/tool",
            Hostile::TooManyEntries(_) => "f",
            Hostile::TooLarge(_) => "big.bin",
        }
    }
}

/// Writes a `.tar.gz` at `path` holding a harmless `index.html` plus the
/// hostile entry (or entries) described by `kind`.
pub fn write_hostile(kind: &Hostile, path: &Path) {
    let mut tar = RawTar::new();
    tar.file(HARMLESS_NAME.as_bytes(), 0o644, HARMLESS_BODY);
    match kind {
        Hostile::DotDot => {
            tar.file(b"../etc/passwd", 0o644, b"root::0:0:root:/root:/bin/sh\n");
        }
        Hostile::Absolute => {
            tar.file(
                b"/etc/cron.d/cutover-pwned",
                0o644,
                b"* * * * * root touch /pwned\n",
            );
        }
        Hostile::SymlinkAbsolute => {
            tar.symlink(b"link", b"/etc/shadow");
        }
        Hostile::SymlinkEscapes => {
            tar.dir(b"assets/").symlink(b"assets/up", b"../../etc");
        }
        Hostile::ThroughSymlink => {
            tar.symlink(b"web", b"assets").file(
                b"web/evil.html",
                0o644,
                b"<h1>written through a link</h1>\n",
            );
        }
        Hostile::HardLink => {
            tar.hard_link(b"hard", b"/etc/shadow");
        }
        Hostile::CharDevice => {
            tar.device(b"zero", EntryType::Char, 1, 5);
        }
        Hostile::BlockDevice => {
            tar.device(b"disk", EntryType::Block, 8, 0);
        }
        Hostile::Fifo => {
            tar.device(b"pipe", EntryType::Fifo, 0, 0);
        }
        Hostile::Duplicate => {
            tar.file(b"./index.html", 0o644, b"<h1>replaced</h1>\n");
        }
        Hostile::Setuid => {
            tar.file(b"bin/tool", 0o4755, b"#!/bin/sh\nexec id\n");
        }
        Hostile::TooManyEntries(n) => {
            for i in 1..*n {
                tar.file(format!("f{i:06}").as_bytes(), 0o644, b"");
            }
        }
        Hostile::TooLarge(n) => {
            write_too_large(tar, *n, path);
            return;
        }
    }
    tar.finish().write_gz(path);
}

/// Streams `prefix`, then a `big.bin` header declaring `n` bytes and `n` zero
/// bytes, then the end-of-archive marker, through gzip into `path`.
fn write_too_large(mut prefix: RawTar, n: u64, path: &Path) {
    let header = RawTar::header(b"big.bin", EntryType::Regular, 0o644, n, b"");
    prefix.push_header(&header);
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut gz = GzEncoder::new(BufWriter::new(file), Compression::fast());
    gz.write_all(prefix.bytes()).expect("write tar prefix");
    let copied = io::copy(&mut io::repeat(0).take(n), &mut gz).expect("stream zeros");
    assert_eq!(copied, n);
    gz.write_all(&vec![0u8; padding(n) + 2 * BLOCK])
        .expect("write padding and end marker");
    gz.finish()
        .and_then(|mut w| w.flush())
        .expect("finish gzip stream");
}

/// Writes a valid release tarball at `path`: one regular file (mode 0644) per
/// `(name, contents)` pair, in the given order, using the `tar` crate's normal
/// builder (GNU long names where needed). Parent directories are left
/// implicit.
pub fn write_good_tar_gz(path: &Path, files: &[(&str, &[u8])]) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let gz = GzEncoder::new(BufWriter::new(file), Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, contents) in files {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(FIXTURE_MTIME);
        header.set_size(contents.len() as u64);
        builder
            .append_data(&mut header, name, *contents)
            .unwrap_or_else(|e| panic!("append {name}: {e}"));
    }
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|mut w| w.flush())
        .expect("finish good tarball");
}

/// Gzips `bytes` (fast level) into a new vector.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

fn padding(size: u64) -> usize {
    // `size % 512` is below 512, so the cast cannot truncate.
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// A tar stream assembled header by header, with no checks at all.
///
/// Names and link targets are copied byte for byte into the 100-byte `name`
/// and `linkname` fields of a GNU header (use [`RawTar::long_name`] or
/// [`RawTar::pax`] for longer ones); the checksum is fixed afterwards. Nothing
/// is written to disk until [`RawTar::write_gz`].
#[derive(Debug, Clone, Default)]
pub struct RawTar {
    buf: Vec<u8>,
}

impl RawTar {
    /// An empty stream.
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// A GNU header with `name` and `link` copied verbatim into the raw
    /// fields, declaring `size` bytes of data, and a correct checksum.
    ///
    /// Panics if `name` or `link` is longer than 100 bytes.
    pub fn header(name: &[u8], kind: EntryType, mode: u32, size: u64, link: &[u8]) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXTURE_MTIME);
        let old = header.as_old_mut();
        assert!(name.len() <= old.name.len(), "name longer than 100 bytes");
        assert!(
            link.len() <= old.linkname.len(),
            "link longer than 100 bytes"
        );
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        header
    }

    /// Appends a header block as is (no data follows unless you add it with
    /// [`RawTar::raw`]).
    pub fn push_header(&mut self, header: &Header) -> &mut RawTar {
        self.buf.extend_from_slice(header.as_bytes());
        self
    }

    /// Appends raw bytes (data, padding, zero blocks, garbage).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut RawTar {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Appends a header of type `kind` followed by `data`, padded to a block.
    pub fn entry(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        link: &[u8],
        data: &[u8],
    ) -> &mut RawTar {
        let header = RawTar::header(name, kind, mode, data.len() as u64, link);
        self.push_header(&header);
        self.buf.extend_from_slice(data);
        let padded = self.buf.len() + padding(data.len() as u64);
        self.buf.resize(padded, 0);
        self
    }

    /// A regular file.
    pub fn file(&mut self, name: &[u8], mode: u32, data: &[u8]) -> &mut RawTar {
        self.entry(name, EntryType::Regular, mode, b"", data)
    }

    /// A directory (mode 0755).
    pub fn dir(&mut self, name: &[u8]) -> &mut RawTar {
        self.entry(name, EntryType::Directory, 0o755, b"", b"")
    }

    /// A symlink `name -> target`.
    pub fn symlink(&mut self, name: &[u8], target: &[u8]) -> &mut RawTar {
        self.entry(name, EntryType::Symlink, 0o777, target, b"")
    }

    /// A hard link `name` to `target`.
    pub fn hard_link(&mut self, name: &[u8], target: &[u8]) -> &mut RawTar {
        self.entry(name, EntryType::Link, 0o644, target, b"")
    }

    /// A device node or FIFO (`kind` is `Char`, `Block` or `Fifo`).
    pub fn device(&mut self, name: &[u8], kind: EntryType, major: u32, minor: u32) -> &mut RawTar {
        let mut header = RawTar::header(name, kind, 0o666, 0, b"");
        header
            .set_device_major(major)
            .and_then(|()| header.set_device_minor(minor))
            .expect("GNU headers carry device numbers");
        header.set_cksum();
        self.push_header(&header)
    }

    /// A GNU long-name (`L`) header carrying `name` plus a NUL terminator; it
    /// names the next entry.
    pub fn long_name(&mut self, name: &[u8]) -> &mut RawTar {
        self.extension(b'L', name, true)
    }

    /// A GNU long-link (`K`) header carrying `target` plus a NUL terminator;
    /// it is the link target of the next entry.
    pub fn long_link(&mut self, target: &[u8]) -> &mut RawTar {
        self.extension(b'K', target, true)
    }

    /// A pax extended header (`x`) with `records` (key, value); it applies to
    /// the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut RawTar {
        let data = pax_records(records);
        self.extension(b'x', &data, false)
    }

    /// A pax global header (`g`) with `records` (key, value).
    pub fn pax_global(&mut self, records: &[(&str, &[u8])]) -> &mut RawTar {
        let data = pax_records(records);
        self.extension(b'g', &data, false)
    }

    fn extension(&mut self, kind: u8, data: &[u8], nul: bool) -> &mut RawTar {
        let mut payload = data.to_vec();
        if nul {
            payload.push(0);
        }
        let name: &[u8] = match kind {
            b'L' | b'K' => b"././@LongLink",
            _ => b"PaxHeaders/entry",
        };
        self.entry(name, EntryType::new(kind), 0o644, b"", &payload)
    }

    /// Appends one all-zero block.
    pub fn zero_block(&mut self) -> &mut RawTar {
        self.raw(&[0u8; BLOCK])
    }

    /// Appends the end-of-archive marker (two zero blocks).
    pub fn finish(&mut self) -> &mut RawTar {
        self.zero_block().zero_block()
    }

    /// The tar bytes so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The tar bytes so far, gzipped.
    pub fn gz_bytes(&self) -> Vec<u8> {
        gzip(&self.buf)
    }

    /// Gzips the stream into `path`.
    pub fn write_gz(&self, path: &Path) {
        std::fs::write(path, self.gz_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Encodes pax records: `"<len> <key>=<value>\n"`, where `<len>` counts the
/// whole record including its own digits.
fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let data = pax_records(&[("path", b"a"), ("comment", &[b'x'; 95])]);
        let text = String::from_utf8(data).unwrap();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let (len, _) = rest.split_once(' ').unwrap();
            let len: usize = len.parse().unwrap();
            assert!(rest[..len].ends_with('\n'));
            rest = &rest[len..];
        }
    }

    #[test]
    fn every_basic_fixture_is_a_gzip_stream() {
        let dir = std::env::temp_dir().join(format!("testlab-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for kind in Hostile::all_basic() {
            let path = dir.join(format!("{}.tar.gz", kind.name()));
            write_hostile(&kind, &path);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..2], &[0x1f, 0x8b], "{}", kind.name());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

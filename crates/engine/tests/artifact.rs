//! Tests for `cutover_engine::artifact`: every refusal of `validate_tar_gz`
//! (each error must name the entry), the limits, deterministic packing of
//! directories, and the store's round trip. Fixtures come from
//! `testlab::hostile`; nothing here touches anything outside its own temp
//! directories.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use cutover_engine::artifact::{
    validate_tar_gz, ArtifactError, ArtifactStore, Limits, Packing, StoredArtifact, Summary,
};
use sha2::{Digest, Sha256};
use tar::EntryType;
use testlab::hostile::{
    gzip, write_good_tar_gz, write_hostile, Hostile, RawTar, HARMLESS_BODY, HARMLESS_NAME,
};

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cutover-artifact-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn validate(bytes: &[u8]) -> Result<Summary, ArtifactError> {
    validate_tar_gz(bytes, &Limits::default())
}

/// Asserts `err` is `Hostile` for `path` with a reason containing `fragment`.
fn assert_hostile(err: &ArtifactError, path: &str, fragment: &str) {
    match err {
        ArtifactError::Hostile { path: p, reason } => {
            assert_eq!(p, path, "wrong entry named in: {err}");
            assert!(
                reason.contains(fragment),
                "reason {reason:?} lacks {fragment:?}"
            );
            assert!(err.to_string().starts_with(&format!("{path}: ")), "{err}");
        }
        other => panic!("expected a Hostile error for {path}, got {other:?}"),
    }
}

fn refused(tar: &RawTar) -> ArtifactError {
    validate(&tar.gz_bytes()).expect_err("archive should be refused")
}

fn accepted(tar: &RawTar) -> Summary {
    validate(&tar.gz_bytes()).unwrap_or_else(|e| panic!("archive should pass: {e}"))
}

/// Names in a store directory (absent counts as empty).
fn store_listing(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the hostile fixture, checks validation names the entry with
/// `fragment`, and checks an import of it leaves the store empty.
fn check_hostile(kind: Hostile, fragment: &str) {
    let tmp = TempDir::new(kind.name());
    let file = tmp.path().join(format!("{}.tar.gz", kind.name()));
    write_hostile(&kind, &file);
    let err = validate_tar_gz(fs::File::open(&file).unwrap(), &Limits::default()).unwrap_err();
    assert_hostile(&err, kind.entry(), fragment);

    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store.import(&file, &Limits::default()).unwrap_err();
    assert_hostile(&err, kind.entry(), fragment);
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

macro_rules! refuses {
    ($($test:ident: $kind:expr => $fragment:expr;)*) => {$(
        #[test]
        fn $test() {
            check_hostile($kind, $fragment);
        }
    )*};
}

refuses! {
    refuses_dot_dot: Hostile::DotDot => "path leaves the release ('..')";
    refuses_absolute_path: Hostile::Absolute => "path is absolute";
    refuses_absolute_symlink: Hostile::SymlinkAbsolute => "symlink target /etc/shadow is absolute";
    refuses_escaping_symlink: Hostile::SymlinkEscapes => "symlink target ../../etc resolves outside the release";
    refuses_path_through_symlink: Hostile::ThroughSymlink => "goes through the symlink web";
    refuses_hard_link: Hostile::HardLink => "hard link to /etc/shadow is not allowed";
    refuses_char_device: Hostile::CharDevice => "character device is not allowed";
    refuses_block_device: Hostile::BlockDevice => "block device is not allowed";
    refuses_fifo: Hostile::Fifo => "FIFO (named pipe) is not allowed";
    refuses_duplicate_after_normalization: Hostile::Duplicate => "duplicate entry: index.html appears earlier";
    refuses_setuid: Hostile::Setuid => "setuid/setgid bits are not allowed (mode 4755)";
}

#[test]
fn messages_read_well() {
    let tmp = TempDir::new("messages");
    let cases = [
        (
            Hostile::DotDot,
            "../etc/passwd: path leaves the release ('..')",
        ),
        (
            Hostile::SymlinkAbsolute,
            "link: symlink target /etc/shadow is absolute",
        ),
        (
            Hostile::SymlinkEscapes,
            "assets/up: symlink target ../../etc resolves outside the release",
        ),
    ];
    for (kind, message) in cases {
        let file = tmp.path().join(kind.name());
        write_hostile(&kind, &file);
        let err = validate_tar_gz(fs::File::open(&file).unwrap(), &Limits::default()).unwrap_err();
        assert_eq!(err.to_string(), message);
    }
}

#[test]
fn all_basic_covers_every_unsized_variant() {
    let all = Hostile::all_basic();
    assert_eq!(all.len(), 11);
    assert!(!all.contains(&Hostile::TooLarge(1)));
    assert!(!all.contains(&Hostile::TooManyEntries(1)));
}

// ---- names ----

#[test]
fn refuses_empty_name() {
    let mut tar = RawTar::new();
    tar.file(b"", 0o644, b"x").finish();
    assert_hostile(&refused(&tar), "<empty name>", "empty entry name");
}

#[test]
fn refuses_newline_carriage_return_and_nul_in_names() {
    let mut tar = RawTar::new();
    tar.file(b"a\nb", 0o644, b"").finish();
    assert_hostile(&refused(&tar), "a\\nb", "name contains a newline");

    let mut tar = RawTar::new();
    tar.file(b"a\rb", 0o644, b"").finish();
    assert_hostile(&refused(&tar), "a\\rb", "name contains a carriage return");

    let mut tar = RawTar::new();
    tar.long_name(b"a\0../../etc/x")
        .file(b"././@LongLink", 0o644, b"")
        .finish();
    assert_hostile(
        &refused(&tar),
        "a\\u{0}../../etc/x",
        "name contains a NUL byte",
    );
}

#[test]
fn refuses_dot_dot_anywhere_and_through_extensions() {
    for name in [&b"a/../b"[..], b"./../x", b"a/b/.."] {
        let mut tar = RawTar::new();
        tar.file(name, 0o644, b"").finish();
        let shown = String::from_utf8(name.to_vec()).unwrap();
        assert_hostile(&refused(&tar), &shown, "path leaves the release ('..')");
    }

    let mut tar = RawTar::new();
    tar.long_name(b"../outside")
        .file(b"harmless", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "../outside", "('..')");

    let mut tar = RawTar::new();
    tar.pax(&[("path", b"/etc/passwd")])
        .file(b"harmless", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "/etc/passwd", "path is absolute");

    // A POSIX ustar header whose prefix field holds the `..`.
    let mut header = tar::Header::new_ustar();
    header.as_ustar_mut().unwrap().prefix[..2].copy_from_slice(b"..");
    header.as_old_mut().name[..6].copy_from_slice(b"passwd");
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(0);
    header.set_cksum();
    let mut tar = RawTar::new();
    tar.push_header(&header).finish();
    assert_hostile(&refused(&tar), "../passwd", "('..')");
}

#[test]
fn refuses_long_link_to_absolute_target() {
    let mut tar = RawTar::new();
    tar.long_link(b"/etc/shadow")
        .symlink(b"link", b"x")
        .finish();
    assert_hostile(
        &refused(&tar),
        "link",
        "symlink target /etc/shadow is absolute",
    );
}

#[test]
fn refuses_name_and_pax_path_together() {
    let mut tar = RawTar::new();
    tar.pax(&[("path", b"a")])
        .long_name(b"b")
        .file(b"c", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "b", "both a GNU long name and a pax path");
}

#[test]
fn normalizes_dot_slash_and_root_entry() {
    let mut tar = RawTar::new();
    tar.dir(b"./")
        .dir(b"./assets/")
        .file(b"./assets//app.js", 0o644, b"js")
        .file(b"index.html", 0o644, HARMLESS_BODY)
        .finish();
    assert_eq!(
        accepted(&tar),
        Summary {
            entries: 3,
            unpacked_bytes: 2 + HARMLESS_BODY.len() as u64
        }
    );
}

#[test]
fn refuses_duplicate_directories_and_conflicts() {
    let mut tar = RawTar::new();
    tar.dir(b"a/").dir(b"./a").finish();
    assert_hostile(&refused(&tar), "./a", "duplicate entry");

    // A file "d/x" implies a directory d; a later symlink d would replace it.
    let mut tar = RawTar::new();
    tar.file(b"d/x", 0o644, b"").symlink(b"d", b".").finish();
    assert_hostile(&refused(&tar), "d", "earlier entries put a directory at d");

    // But an explicit directory after its contents is fine.
    let mut tar = RawTar::new();
    tar.file(b"d/x", 0o644, b"").dir(b"d/").finish();
    assert_eq!(accepted(&tar).entries, 2);
}

#[test]
fn refuses_path_through_a_regular_file() {
    let mut tar = RawTar::new();
    tar.file(b"a", 0o644, b"").file(b"a/b", 0o644, b"").finish();
    assert_hostile(
        &refused(&tar),
        "a/b",
        "goes through a, which is a regular file",
    );
}

// ---- symlinks ----

#[test]
fn accepts_symlinks_that_stay_inside() {
    let mut tar = RawTar::new();
    tar.file(b"index.html", 0o644, HARMLESS_BODY)
        .dir(b"assets/v1/")
        .symlink(b"current", b"assets/v1")
        .symlink(b"assets/v1/home", b"../../index.html")
        .symlink(b"assets/latest", b"../current/./")
        .symlink(b"dangling", b"not/there")
        .symlink(b"self", b".")
        .finish();
    assert_eq!(accepted(&tar).entries, 7);
}

#[test]
fn refuses_symlink_chains_that_escape() {
    // s1 -> "." is the root; s2 -> "s1/.." is then the root's parent,
    // although a purely lexical check of "s1/.." stays inside.
    let mut tar = RawTar::new();
    tar.symlink(b"s1", b".").symlink(b"s2", b"s1/..").finish();
    assert_hostile(
        &refused(&tar),
        "s2",
        "symlink target s1/.. resolves outside the release (following symlinks in the archive)",
    );

    // Same, with the link that is gone through defined later.
    let mut tar = RawTar::new();
    tar.dir(b"deep/")
        .symlink(b"deep/up", b"../s1/../x")
        .symlink(b"s1", b"deep")
        .finish();
    assert_eq!(accepted(&tar).entries, 3);

    let mut tar = RawTar::new();
    tar.dir(b"deep/")
        .symlink(b"deep/up", b"../s1/../x")
        .symlink(b"s1", b".")
        .finish();
    assert_hostile(&refused(&tar), "deep/up", "resolves outside the release");
}

#[test]
fn refuses_symlink_loops_and_empty_targets() {
    let mut tar = RawTar::new();
    tar.symlink(b"a", b"b").symlink(b"b", b"a").finish();
    assert_hostile(&refused(&tar), "a", "too many symlinks");

    let mut tar = RawTar::new();
    tar.symlink(b"a", b"").finish();
    assert_hostile(&refused(&tar), "a", "empty target");

    let mut tar = RawTar::new();
    tar.symlink(b"a", b"x\ny").finish();
    assert_hostile(&refused(&tar), "a", "symlink target contains a newline");
}

// ---- types, modes, sizes ----

#[test]
fn refuses_setgid_and_hard_links_inside_the_release() {
    let mut tar = RawTar::new();
    tar.dir(b"shared/").file(b"shared/x", 0o2644, b"").finish();
    assert_hostile(
        &refused(&tar),
        "shared/x",
        "setuid/setgid bits are not allowed (mode 2644)",
    );

    let mut tar = RawTar::new();
    tar.file(b"a", 0o644, b"").hard_link(b"b", b"a").finish();
    assert_hostile(&refused(&tar), "b", "hard link to a is not allowed");
}

#[test]
fn refuses_other_entry_types() {
    for (flag, what) in [
        (b'7', "contiguous file"),
        (b'S', "GNU sparse file"),
        (b'V', "volume label"),
        (b'D', "GNU dump directory"),
        (b'X', "Solaris extended header"),
        (b'Z', "unknown"),
    ] {
        let mut tar = RawTar::new();
        tar.entry(b"odd", EntryType::new(flag), 0o644, b"", b"")
            .finish();
        assert_hostile(&refused(&tar), "odd", what);
    }
}

#[test]
fn refuses_regular_file_named_like_a_directory() {
    let mut tar = RawTar::new();
    tar.file(b"dir/", 0o644, b"").finish();
    assert_hostile(&refused(&tar), "dir/", "name ends in '/'");
}

#[test]
fn refuses_data_on_directories_and_symlinks() {
    let mut tar = RawTar::new();
    tar.entry(b"d/", EntryType::Directory, 0o755, b"", b"smuggled")
        .finish();
    assert_hostile(&refused(&tar), "d/", "carries 8 bytes of data");
}

// ---- pax ----

#[test]
fn accepts_git_archive_style_global_comment() {
    let mut tar = RawTar::new();
    tar.pax_global(&[("comment", b"3f2a9c1e0b7d4e5f6a7b8c9d0e1f2a3b4c5d6e7f")])
        .pax(&[("mtime", b"1700000000.5"), ("path", b"assets/long-name.js")])
        .file(b"assets/long-name.j", 0o644, b"x")
        .finish();
    assert_eq!(
        accepted(&tar),
        Summary {
            entries: 1,
            unpacked_bytes: 1
        }
    );
}

#[test]
fn refuses_pax_global_keywords_that_change_entries() {
    let mut tar = RawTar::new();
    tar.pax_global(&[("path", b"../x")])
        .file(b"a", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "<archive>", "pax global header sets 'path'");
}

#[test]
fn refuses_pax_size_mismatch_and_sparse() {
    let mut tar = RawTar::new();
    tar.pax(&[("size", b"0")])
        .file(b"a", 0o644, b"hidden")
        .finish();
    assert_hostile(
        &refused(&tar),
        "a",
        "pax size 0 disagrees with the header's size 6",
    );

    let mut tar = RawTar::new();
    tar.pax(&[("GNU.sparse.realsize", b"1000000000000")])
        .file(b"a", 0o644, b"")
        .finish();
    assert_hostile(
        &refused(&tar),
        "<archive>",
        "sparse files are not supported",
    );

    let mut tar = RawTar::new();
    tar.raw(b"")
        .entry(
            b"PaxHeaders/a",
            EntryType::XHeader,
            0o644,
            b"",
            b"garbage\n",
        )
        .file(b"a", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "<archive>", "malformed pax header");
}

// ---- stream structure ----

#[test]
fn refuses_entries_hidden_after_a_lone_zero_block() {
    let mut tar = RawTar::new();
    tar.file(b"index.html", 0o644, HARMLESS_BODY)
        .zero_block()
        .file(b"hidden", 0o644, b"busybox would extract me")
        .finish();
    assert_hostile(
        &refused(&tar),
        "<archive>",
        "data after the end-of-archive marker",
    );
}

#[test]
fn accepts_record_padding_and_missing_end_marker() {
    let mut tar = RawTar::new();
    tar.file(b"index.html", 0o644, HARMLESS_BODY).finish();
    tar.raw(&[0u8; 10240 - 4 * 512]);
    assert_eq!(accepted(&tar).entries, 1);

    let mut tar = RawTar::new();
    tar.file(b"index.html", 0o644, HARMLESS_BODY);
    assert_eq!(accepted(&tar).entries, 1);
}

#[test]
fn refuses_entries_in_a_second_gzip_member() {
    // gzip -d (and so the host's tar) reads every member of the stream.
    let mut first = RawTar::new();
    first.file(b"index.html", 0o644, HARMLESS_BODY);
    let mut second = RawTar::new();
    second.file(b"../evil", 0o644, b"").finish();
    let mut bytes = first.gz_bytes();
    bytes.extend(second.gz_bytes());
    let err = validate(&bytes).unwrap_err();
    assert_hostile(&err, "../evil", "('..')");
}

#[test]
fn refuses_corrupt_and_truncated_streams() {
    let mut good = RawTar::new();
    good.file(b"index.html", 0o644, &[b'x'; 4000]).finish();
    let gz = good.gz_bytes();

    let err = validate(&gz[..gz.len() / 2]).unwrap_err();
    assert_hostile(&err, "<archive>", "gzip");

    let err = validate(b"this is not gzip").unwrap_err();
    assert_hostile(&err, "<archive>", "not a gzip stream");

    let err = validate(b"").unwrap_err();
    assert_hostile(&err, "<archive>", "empty");

    // Valid gzip, tar cut inside a file's data.
    let err = validate(&gzip(&good.bytes()[..1024])).unwrap_err();
    assert_hostile(&err, "<archive>", "ends inside the data of index.html");

    // Valid gzip, tar cut inside a header.
    let err = validate(&gzip(&good.bytes()[..100])).unwrap_err();
    assert_hostile(&err, "<archive>", "truncated tar stream");

    // A flipped byte in a header.
    let mut bytes = good.bytes().to_vec();
    bytes[0] = b'y';
    let err = validate(&gzip(&bytes)).unwrap_err();
    assert_hostile(&err, "<archive>", "checksum mismatch");

    // An extension header with no entry after it.
    let mut tar = RawTar::new();
    tar.long_name(b"dangling-name").finish();
    assert_hostile(
        &refused(&tar),
        "<archive>",
        "without the entry it describes",
    );
}

// ---- limits ----

#[test]
fn default_limits() {
    let limits = Limits::default();
    assert_eq!(limits.max_unpacked_bytes, 4 << 30);
    assert_eq!(limits.max_entries, 200_000);
}

#[test]
fn entry_limit() {
    let tmp = TempDir::new("entries");
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let over = tmp.path().join("over.tar.gz");
    write_hostile(&Hostile::TooManyEntries(11), &over);
    let err = validate_tar_gz(fs::File::open(&over).unwrap(), &limits).unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooManyEntries { limit: 10 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "archive has more than 10 entries (limit max_entries)"
    );

    let at = tmp.path().join("at.tar.gz");
    write_hostile(&Hostile::TooManyEntries(10), &at);
    let summary = validate_tar_gz(fs::File::open(&at).unwrap(), &limits).unwrap();
    assert_eq!(summary.entries, 10);

    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    assert!(matches!(
        store.import(&over, &limits),
        Err(ArtifactError::TooManyEntries { limit: 10 })
    ));
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

#[test]
fn size_limit() {
    let tmp = TempDir::new("size");
    let limit = 1 << 20;
    let limits = Limits {
        max_unpacked_bytes: limit,
        ..Limits::default()
    };
    let over = tmp.path().join("over.tar.gz");
    write_hostile(&Hostile::TooLarge(limit + 1), &over);
    let err = validate_tar_gz(fs::File::open(&over).unwrap(), &limits).unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooLarge { limit: l } if l == limit),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("archive unpacks to more than {limit} bytes (limit max_unpacked_bytes)")
    );

    let exact = tmp.path().join("exact.tar.gz");
    let big = vec![7u8; limit as usize - 10];
    write_good_tar_gz(&exact, &[("big.bin", &big), ("ten.txt", b"0123456789")]);
    let summary = validate_tar_gz(fs::File::open(&exact).unwrap(), &limits).unwrap();
    assert_eq!(
        summary,
        Summary {
            entries: 2,
            unpacked_bytes: limit
        }
    );

    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    assert!(matches!(
        store.import(&over, &limits),
        Err(ArtifactError::TooLarge { .. })
    ));
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

#[test]
fn size_limit_stops_at_the_header_of_a_bomb() {
    // A header declaring 10 GiB with no data behind it: if the validator
    // tried to read the data it would report truncation, not the limit.
    let mut tar = RawTar::new();
    tar.file(b"index.html", 0o644, HARMLESS_BODY)
        .push_header(&RawTar::header(
            b"bomb.bin",
            EntryType::Regular,
            0o644,
            10 << 30,
            b"",
        ));
    let started = Instant::now();
    let err = validate(&tar.gz_bytes()).unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooLarge { limit } if limit == 4 << 30),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn huge_extension_headers_are_bounded() {
    let mut tar = RawTar::new();
    tar.long_name(&[b'a'; 5000]).file(b"x", 0o644, b"").finish();
    assert_hostile(&refused(&tar), "<archive>", "GNU long name of 5001 bytes");

    let big = vec![b'v'; 2 << 20];
    let mut tar = RawTar::new();
    tar.pax(&[("comment", &big)])
        .file(b"x", 0o644, b"")
        .finish();
    assert_hostile(&refused(&tar), "<archive>", "pax header of");
}

// ---- store: tarballs ----

fn good_release(dir: &Path) -> PathBuf {
    let file = dir.join("release.tar.gz");
    write_good_tar_gz(
        &file,
        &[
            ("index.html", HARMLESS_BODY),
            ("assets/app.js", b"console.log('hi')\n"),
            (&format!("assets/{}.css", "n".repeat(150)), b"body{}\n"),
        ],
    );
    file
}

#[test]
fn store_round_trip_of_a_tarball() {
    let tmp = TempDir::new("roundtrip");
    let file = good_release(tmp.path());
    let bytes = fs::read(&file).unwrap();
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    assert!(!store_dir.exists(), "the store dir is created lazily");

    let stored = store.import(&file, &Limits::default()).unwrap();
    assert_eq!(stored.sha256, sha256_hex(&bytes));
    assert_eq!(
        stored.path,
        store_dir.join(format!("{}.tar.gz", stored.sha256))
    );
    assert_eq!(stored.path, store.path_of(&stored.sha256));
    assert_eq!(stored.size, bytes.len() as u64);
    assert_eq!(fs::read(&stored.path).unwrap(), bytes);
    assert_eq!(
        stored.summary,
        Summary {
            entries: 3,
            unpacked_bytes: (HARMLESS_BODY.len() + 18 + 7) as u64
        }
    );
    let mode = fs::metadata(&store_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let got = store.get(&stored.sha256).expect("stored artifact is found");
    assert_same(&got, &stored);

    // Importing again changes nothing and leaves no temp files.
    let again = store.import_tar_gz(&file, &Limits::default()).unwrap();
    assert_same(&again, &stored);
    assert_eq!(
        store_listing(&store_dir),
        vec![
            format!("{}.json", stored.sha256),
            format!("{}.tar.gz", stored.sha256)
        ]
    );

    // A fresh store object over the same directory sees it too.
    assert_same(
        &ArtifactStore::new(&store_dir).get(&stored.sha256).unwrap(),
        &stored,
    );
    // Without the summary file, get reads the tarball again.
    fs::remove_file(store_dir.join(format!("{}.json", stored.sha256))).unwrap();
    assert_same(&store.get(&stored.sha256).unwrap(), &stored);

    assert!(store.get(&"0".repeat(64)).is_none());
    assert!(store.get("../../etc/passwd").is_none());
    assert!(store.get(&stored.sha256.to_uppercase()).is_none());
}

fn assert_same(a: &StoredArtifact, b: &StoredArtifact) {
    assert_eq!(a.sha256, b.sha256);
    assert_eq!(a.path, b.path);
    assert_eq!(a.size, b.size);
    assert_eq!(a.summary, b.summary);
}

#[test]
fn import_dispatches_on_kind() {
    let tmp = TempDir::new("dispatch");
    let file = good_release(tmp.path());
    let store = ArtifactStore::new(tmp.path().join("store"));
    let limits = Limits::default();
    let expected = store.import(&file, &limits).unwrap().sha256;

    let tgz = tmp.path().join("release.tgz");
    fs::copy(&file, &tgz).unwrap();
    assert_eq!(store.import(&tgz, &limits).unwrap().sha256, expected);

    let bare = tmp.path().join("release-without-extension");
    fs::copy(&file, &bare).unwrap();
    assert_eq!(store.import(&bare, &limits).unwrap().sha256, expected);

    let text = tmp.path().join("notes.txt");
    fs::write(&text, "not an artifact").unwrap();
    let err = store.import(&text, &limits).unwrap_err();
    assert!(
        matches!(err, ArtifactError::NotAnArtifact { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("{}: not a directory or a .tar.gz file", text.display())
    );

    let missing = tmp.path().join("missing");
    assert!(matches!(
        store.import(&missing, &limits),
        Err(ArtifactError::Io { .. })
    ));

    let dir = tmp.path().join("site");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("index.html"), HARMLESS_BODY).unwrap();
    assert_eq!(store.import(&dir, &limits).unwrap().summary.entries, 1);
}

#[test]
fn refused_tarball_is_named_and_leaves_the_store_empty() {
    let tmp = TempDir::new("corrupt-import");
    let file = tmp.path().join("broken.tar.gz");
    let bytes = fs::read(good_release(tmp.path())).unwrap();
    fs::write(&file, &bytes[..bytes.len() - 20]).unwrap();
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store.import(&file, &Limits::default()).unwrap_err();
    assert_hostile(&err, &file.display().to_string(), "gzip");
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

#[test]
fn every_hostile_import_leaves_the_store_empty() {
    let tmp = TempDir::new("hostile-store");
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let limits = Limits {
        max_unpacked_bytes: 1 << 16,
        max_entries: 20,
    };
    let mut kinds = Hostile::all_basic();
    kinds.push(Hostile::TooManyEntries(21));
    kinds.push(Hostile::TooLarge((1 << 16) + 1));
    for kind in kinds {
        let file = tmp.path().join(format!("{}.tar.gz", kind.name()));
        write_hostile(&kind, &file);
        assert!(
            store.import(&file, &limits).is_err(),
            "{} was accepted",
            kind.name()
        );
        assert_eq!(
            store_listing(&store_dir),
            Vec::<String>::new(),
            "{}",
            kind.name()
        );
    }
}

// ---- store: directories ----

/// A small release tree with every kind of entry `import_dir` packs, and
/// fixed mtimes.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("assets/img")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("index.html"), HARMLESS_BODY).unwrap();
    fs::write(root.join("assets/app.js"), "console.log('hi')\n").unwrap();
    fs::write(root.join("assets/img/logo.svg"), "<svg/>\n").unwrap();
    fs::write(
        root.join("assets-b.txt"),
        "sorts between assets and assets/\n",
    )
    .unwrap();
    let long = format!("assets/{}.css", "l".repeat(140));
    fs::write(root.join(&long), "body{}\n").unwrap();
    fs::write(root.join("bin/run"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(root.join("bin/run"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(root.join("index.html"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("assets/app.js", root.join("app.js")).unwrap();
    let deep_target = format!("../{}.css", "l".repeat(140));
    std::os::unix::fs::symlink(&deep_target, root.join("assets/img/deep-link")).unwrap();
    set_mtimes(root, 1_600_000_000);
}

/// Sets the mtime of everything under `dir`, symlinks included, and of `dir`.
fn set_mtimes(dir: &Path, secs: u64) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            set_mtimes(&entry.path(), secs);
        }
        if kind.is_symlink() {
            // std cannot set a symlink's own mtime; coreutils can.
            let status = std::process::Command::new("touch")
                .arg("-h")
                .arg("-d")
                .arg(format!("@{secs}"))
                .arg(entry.path())
                .status()
                .unwrap();
            assert!(status.success());
        } else {
            let f = fs::File::open(entry.path()).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        }
    }
    let f = fs::File::open(dir).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn import_dir_is_deterministic() {
    let tmp = TempDir::new("determinism");
    let tree = tmp.path().join("site");
    make_tree(&tree);
    let limits = Limits::default();

    let a = ArtifactStore::new(tmp.path().join("a"));
    let first = a.import_dir(&tree, &limits).unwrap();
    let again = a.import_dir(&tree, &limits).unwrap();
    let b = ArtifactStore::new(tmp.path().join("b"));
    let other_store = b.import_dir(&tree, &limits).unwrap();
    assert_eq!(first.sha256, again.sha256);
    assert_eq!(first.sha256, other_store.sha256);
    let bytes = fs::read(&first.path).unwrap();
    assert_eq!(bytes, fs::read(&other_store.path).unwrap());
    assert_eq!(first.sha256, sha256_hex(&bytes));
    assert_eq!(first.size, bytes.len() as u64);
    assert_eq!(
        store_listing(&tmp.path().join("a")),
        vec![
            format!("{}.json", first.sha256),
            format!("{}.manifest.json", first.sha256),
            format!("{}.tar.gz", first.sha256)
        ]
    );

    // An identical tree elsewhere packs to the same bytes.
    let copy = tmp.path().join("copy");
    make_tree(&copy);
    let from_copy = b.import_dir(&copy, &limits).unwrap();
    assert_eq!(from_copy.sha256, first.sha256);

    // Changing an mtime changes the archive.
    fs::File::open(copy.join("index.html"))
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_001))
        .unwrap();
    assert_ne!(b.import_dir(&copy, &limits).unwrap().sha256, first.sha256);
}

#[test]
fn import_dir_layout() {
    let tmp = TempDir::new("layout");
    let tree = tmp.path().join("site");
    make_tree(&tree);
    let store = ArtifactStore::new(tmp.path().join("store"));
    let stored = store.import_dir(&tree, &Limits::default()).unwrap();

    let long = format!("assets/{}.css", "l".repeat(140));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        fs::File::open(&stored.path).unwrap(),
    ));
    let mut seen = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        assert_eq!(header.uid().unwrap(), 0, "{name}");
        assert_eq!(header.gid().unwrap(), 0, "{name}");
        assert_eq!(header.username_bytes(), Some(&b""[..]), "{name}");
        assert_eq!(header.groupname_bytes(), Some(&b""[..]), "{name}");
        let mode = header.mode().unwrap();
        match header.entry_type() {
            EntryType::Directory => {
                assert_eq!(mode, 0o755, "{name}");
                assert_eq!(header.mtime().unwrap(), 1_600_000_000, "{name}");
            }
            EntryType::Regular => {
                let expected = if name == "bin/run" { 0o744 } else { 0o644 };
                assert_eq!(mode, expected, "{name}");
                assert_eq!(header.mtime().unwrap(), 1_600_000_000, "{name}");
                let mut body = Vec::new();
                entry.read_to_end(&mut body).unwrap();
                assert_eq!(body, fs::read(tree.join(&name)).unwrap(), "{name}");
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap().into_owned();
                let expected = fs::read_link(tree.join(&name)).unwrap();
                assert_eq!(target, expected.as_os_str().as_encoded_bytes(), "{name}");
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
        seen.push(name);
    }
    let expected: Vec<String> = [
        "app.js",
        "assets/",
        "assets/app.js",
        "assets/img/",
        "assets/img/deep-link",
        "assets/img/logo.svg",
        &long,
        "assets-b.txt",
        "bin/",
        "bin/run",
        "empty/",
        "index.html",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(stored.summary.entries, 12);

    let gz = fs::read(&stored.path).unwrap();
    assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0], "gzip without a name");
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip mtime 0");
}

#[test]
fn import_dir_extracts_with_system_tar() {
    let status = std::process::Command::new("tar")
        .arg("--version")
        .output()
        .expect("tar is installed (.ci/run installs it)");
    assert!(status.status.success());
    let tmp = TempDir::new("system-tar");
    let tree = tmp.path().join("site");
    make_tree(&tree);
    let store = ArtifactStore::new(tmp.path().join("store"));
    let stored = store.import_dir(&tree, &Limits::default()).unwrap();
    let out = tmp.path().join("out.partial");
    fs::create_dir(&out).unwrap();
    let result = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&stored.path)
        .arg("-C")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let long = format!("assets/{}.css", "l".repeat(140));
    for file in [
        "index.html",
        "assets/app.js",
        "assets/img/logo.svg",
        "bin/run",
        &long,
    ] {
        assert_eq!(
            fs::read(out.join(file)).unwrap(),
            fs::read(tree.join(file)).unwrap()
        );
    }
    assert!(out.join("empty").is_dir());
    assert_eq!(
        fs::read_link(out.join("app.js")).unwrap(),
        PathBuf::from("assets/app.js")
    );
    assert_eq!(
        fs::read(out.join("assets/img/deep-link")).unwrap(),
        b"body{}\n"
    );
    let run = fs::metadata(out.join("bin/run")).unwrap();
    assert_ne!(run.mode() & 0o100, 0, "exec bit survives");
}

#[test]
fn import_dir_refuses_escaping_symlink() {
    let tmp = TempDir::new("dir-symlink");
    let tree = tmp.path().join("site");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("index.html"), HARMLESS_BODY).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", tree.join("link")).unwrap();
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store.import(&tree, &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "link: symlink target /etc/shadow is absolute"
    );
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());

    fs::remove_file(tree.join("link")).unwrap();
    std::os::unix::fs::symlink("../../shared", tree.join("link")).unwrap();
    let err = store.import_dir(&tree, &Limits::default()).unwrap_err();
    assert_hostile(&err, "link", "resolves outside the release");
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

#[test]
fn import_dir_refuses_sockets() {
    let tmp = TempDir::new("dir-socket");
    let tree = tmp.path().join("site");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("index.html"), HARMLESS_BODY).unwrap();
    let socket = tree.join("app.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store.import_dir(&tree, &Limits::default()).unwrap_err();
    assert_hostile(&err, &socket.display().to_string(), "is a socket");
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

#[test]
fn import_dir_enforces_limits_while_packing() {
    let tmp = TempDir::new("dir-limits");
    let tree = tmp.path().join("site");
    fs::create_dir(&tree).unwrap();
    for i in 0..5 {
        fs::write(tree.join(format!("f{i}")), [b'x'; 100]).unwrap();
    }
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store
        .import_dir(
            &tree,
            &Limits {
                max_entries: 4,
                ..Limits::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooManyEntries { limit: 4 }),
        "{err:?}"
    );
    let err = store
        .import_dir(
            &tree,
            &Limits {
                max_unpacked_bytes: 499,
                ..Limits::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooLarge { limit: 499 }),
        "{err:?}"
    );
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());

    let ok = store
        .import_dir(
            &tree,
            &Limits {
                max_unpacked_bytes: 500,
                max_entries: 5,
            },
        )
        .unwrap();
    assert_eq!(
        ok.summary,
        Summary {
            entries: 5,
            unpacked_bytes: 500
        }
    );
}

#[test]
fn import_dir_of_a_file_is_not_an_artifact() {
    let tmp = TempDir::new("dir-file");
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    let store = ArtifactStore::new(tmp.path().join("store"));
    assert!(matches!(
        store.import_dir(&file, &Limits::default()),
        Err(ArtifactError::NotAnArtifact { .. })
    ));
}

#[test]
fn good_fixture_passes() {
    let tmp = TempDir::new("good");
    let file = good_release(tmp.path());
    let summary = validate_tar_gz(fs::File::open(file).unwrap(), &Limits::default()).unwrap();
    assert_eq!(summary.entries, 3);
    // The harmless part of every hostile fixture is valid on its own.
    let mut tar = RawTar::new();
    tar.file(HARMLESS_NAME.as_bytes(), 0o644, HARMLESS_BODY)
        .finish();
    assert_eq!(accepted(&tar).entries, 1);
}

/// Pseudo-random bytes (splitmix64), which no compressor shrinks.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn a_directory_is_compressed_only_when_it_shrinks() {
    let tmp = TempDir::new("packing");
    let limits = Limits::default();
    let store = ArtifactStore::new(tmp.path().join("store"));

    let text = tmp.path().join("text");
    fs::create_dir_all(&text).unwrap();
    let page = "<p>the same paragraph of a page, again and again</p>\n".repeat(80_000);
    fs::write(text.join("index.html"), &page).unwrap();
    let packed = store.import_dir(&text, &limits).unwrap();
    assert_eq!(packed.packing, Some(Packing::Gzip1));
    assert!(
        packed.size * 10 < page.len() as u64,
        "text is compressed: {} bytes for {}",
        packed.size,
        page.len()
    );

    let random = tmp.path().join("random");
    fs::create_dir_all(random.join("data")).unwrap();
    for k in 0..12 {
        fs::write(
            random.join(format!("data/f{k}.bin")),
            random_bytes(512 << 10, k),
        )
        .unwrap();
    }
    let packed = store.import_dir(&random, &limits).unwrap();
    assert_eq!(packed.packing, Some(Packing::Stored));
    // Still a gzip stream the host's `tar -xz` reads, holding every byte.
    let summary = validate_tar_gz(fs::File::open(&packed.path).unwrap(), &limits).unwrap();
    assert_eq!(summary.unpacked_bytes, 12 * (512 << 10));
    assert_eq!(packed.summary, summary);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        fs::File::open(&packed.path).unwrap(),
    ));
    let mut found = 0;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() == EntryType::Regular {
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let k: u64 = name["data/f".len()..name.len() - 4].parse().unwrap();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            assert!(body == random_bytes(512 << 10, k), "{name} round-trips");
            found += 1;
        }
    }
    assert_eq!(found, 12);
    // What the store says survives a new handle on it.
    let again = ArtifactStore::new(tmp.path().join("store"))
        .get(&packed.sha256)
        .unwrap();
    assert_eq!(again.packing, Some(Packing::Stored));
}

#[test]
fn a_hostile_entry_deep_in_a_big_tree_is_refused_and_leaves_nothing() {
    let tmp = TempDir::new("deep-hostile");
    let tree = tmp.path().join("site");
    // Far more than the checker's channel holds, so the refusal comes while packing goes on.
    for k in 0..40 {
        let dir = tree.join(format!("a{k:02}/b/c"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f.bin"), random_bytes(256 << 10, k)).unwrap();
    }
    std::os::unix::fs::symlink("../../../../../etc/passwd", tree.join("a39/b/c/escape")).unwrap();
    let store_dir = tmp.path().join("store");
    let store = ArtifactStore::new(&store_dir);
    let err = store.import_dir(&tree, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Hostile { path, reason }
            if path == "a39/b/c/escape" && reason.contains("outside")),
        "{err}"
    );
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());

    // Early in the tree, with plenty still to pack after it.
    fs::remove_file(tree.join("a39/b/c/escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", tree.join("a00/b/abs")).unwrap();
    let err = store.import_dir(&tree, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Hostile { path, .. } if path == "a00/b/abs"),
        "{err}"
    );
    assert_eq!(store_listing(&store_dir), Vec::<String>::new());
}

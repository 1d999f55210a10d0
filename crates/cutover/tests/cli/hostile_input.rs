//! Hostile input on the command line, tried against the real binary: configs that are not
//! files or far too big, values that cannot fit a command line, control characters in the
//! TOML, and a history database that is empty or not cutover's. No host is needed: every case
//! must be refused before anything is touched, at once, with one clear error line.
//!
//! These tests need no host and hand cutover configs that are not the world's own (`-c` on a
//! FIFO, a device, a huge file), so they use a scratch directory instead of a `World`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("cutover-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A valid files-app config at `cutover.toml`, with `extra` appended to `[files]`.
    fn config(&self, files_extra: &str) -> PathBuf {
        let path = self.path("cutover.toml");
        std::fs::write(&path, config_text(&self.0, files_extra)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config_text(dir: &Path, files_extra: &str) -> String {
    format!(
        "app = \"site\"\nhosts = [\"local\"]\n[files]\nroot = \"{}/srv\"\n{files_extra}\n[health]\nurl = \"http://127.0.0.1:9/up\"\n",
        dir.display()
    )
}

/// Runs `cutover history -c CONFIG --data DATA` (which reads the config and the database and
/// touches no host), giving up after 20 s: returns the exit code and stderr.
fn history(config: &Path, data: &Path) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("history")
        .arg("-c")
        .arg(config)
        .arg("--data")
        .arg(data)
        .env_remove("CUTOVER_DATA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cutover history -c {} hung", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

/// The run exited `code` and its stderr is exactly the line `line`.
fn assert_refused(config: &Path, data: &Path, code: i32, line: &str) {
    let (got, err) = history(config, data);
    assert_eq!((got, err.as_str()), (code, format!("{line}\n").as_str()));
}

#[test]
fn configs_that_are_devices_fifos_or_huge_are_refused_at_once() {
    let s = Scratch::new("files");
    let data = s.path("data");
    let refusal = |kind: &str| {
        format!("not a regular file (it is {kind}); a config is a regular file of at most 1 MiB")
    };
    for dev in ["/dev/zero", "/dev/urandom"] {
        assert_refused(
            Path::new(dev),
            &data,
            2,
            &format!("error: {dev}: {}", refusal("a character device")),
        );
    }
    let fifo = s.path("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    assert_refused(
        &fifo,
        &data,
        2,
        &format!("error: {}: {}", fifo.display(), refusal("a FIFO")),
    );
    assert_refused(
        &s.0,
        &data,
        2,
        &format!("error: {}: {}", s.0.display(), refusal("a directory")),
    );
    let big = s.path("big.toml");
    let mut text = config_text(&s.0, "");
    text.push_str(&format!("# {}\n", "x".repeat(2 << 20)));
    std::fs::write(&big, &text).unwrap();
    assert_refused(
        &big,
        &data,
        2,
        &format!(
            "error: {}: the file is {} bytes; a config is at most 1 MiB (1048576 bytes)",
            big.display(),
            text.len()
        ),
    );
    let latin1 = s.path("latin1.toml");
    std::fs::write(&latin1, b"app = \"site\"\n# caf\xe9\n").unwrap();
    assert_refused(
        &latin1,
        &data,
        2,
        &format!("error: {}: the file is not UTF-8 text (an invalid byte at line 2, column 6); a config is a UTF-8 TOML file", latin1.display()),
    );
    assert!(!data.exists(), "nothing may be touched");
}

#[test]
fn a_reload_too_long_for_a_command_line_is_refused_by_name() {
    let s = Scratch::new("reload");
    let data = s.path("data");
    // 200 KiB: within a config's 1 MiB, beyond the 128 KiB a host's command line takes.
    let config = s.config(&format!("reload = \"{}\"", "x".repeat(200 << 10)));
    assert_refused(
        &config,
        &data,
        2,
        &format!("error: {}: `files.reload`: expected at most 16384 bytes (16 KiB), got 204800 bytes: it runs on the hosts as part of one command line, and Linux limits one argument to 128 KiB; put a longer script in a file on the hosts and make `reload` run that file", config.display()),
    );
    let config = s.config(&format!("reload = \"{}\"", "x".repeat(16 << 10)));
    let (code, err) = history(&config, &data);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_nul_byte_in_a_comment_is_named_with_its_position() {
    let s = Scratch::new("nul");
    let data = s.path("data");
    let config = s.config("keep = 3 # three\0");
    let text = std::fs::read_to_string(&config).unwrap();
    let line = text[..text.find('\0').unwrap()].lines().count();
    assert_eq!(line, 5);
    assert_refused(
        &config,
        &data,
        2,
        &format!("error: {}: the file contains a NUL byte at line 5, column 17: a config is plain text (inside a string, write it as the escape \\u0000)", config.display()),
    );
}

#[test]
fn a_history_database_that_is_empty_or_not_cutovers_needs_a_person() {
    let s = Scratch::new("db");
    let config = s.config("");
    let data = s.path("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("cutover.db");
    let todo = "If this is the wrong data directory, point cutover at the right one (--data or CUTOVER_DATA); otherwise restore the file from a backup, or move it away to start a new, empty history";

    std::fs::write(&db, b"").unwrap();
    assert_refused(
        &config,
        &data,
        3,
        &format!("error: database {}: the file is empty (0 bytes), so it holds no history: a database that was truncated must not read as \"no releases yet\"; cutover did not touch it. {todo}", db.display()),
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

    std::fs::write(&db, b"not a database\n").unwrap();
    assert_refused(
        &config,
        &data,
        3,
        &format!("error: database {}: not an SQLite database (15 bytes that do not start with SQLite's header), so not cutover's history; cutover did not touch it. {todo}", db.display()),
    );

    std::fs::remove_file(&db).unwrap();
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE notes (body TEXT);").unwrap();
    }
    assert_refused(
        &config,
        &data,
        3,
        &format!("error: database {}: an SQLite database of something else (tables: notes), not cutover's history; cutover did not touch it. {todo}", db.display()),
    );

    // A missing file is still a new, empty history.
    std::fs::remove_file(&db).unwrap();
    let (code, err) = history(&config, &data);
    assert_eq!(code, 0, "{err}");
    assert!(db.exists());
    let (code, err) = history(&config, &data);
    assert_eq!(code, 0, "{err}");
}

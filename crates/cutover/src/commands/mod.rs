//! One module per subcommand, and the shared wiring: loading the config, finding the data
//! directory, and printing an outcome.

mod check;
mod db;
mod demo;
mod deploy;
mod diff;
mod history;
mod preview;
mod proxy;
mod remote;
mod renew;
mod serve;
mod setup;
mod status;
mod users;

use crate::cli::{Cli, Command, Common};
use crate::output::Mode;
use cutover_core::Config;
use cutover_engine::exit;
use std::path::{Path, PathBuf};

pub(crate) fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Deploy {
            common,
            through,
            artifact,
            git_ref,
            image,
            json,
            events,
        } => match through.server {
            Some(_) => remote::deploy(
                &common,
                &through,
                artifact,
                git_ref,
                image,
                Mode::of(json, events),
            ),
            None => deploy::deploy(&common, artifact, git_ref, image, Mode::of(json, events)),
        },
        Command::Rollback {
            common,
            through,
            to,
            json,
            events,
        } => match through.server {
            Some(_) => remote::rollback(&common, &through, to, Mode::of(json, events)),
            None => deploy::rollback(&common, to, Mode::of(json, events)),
        },
        Command::History {
            common,
            through,
            json,
        } => match through.server {
            Some(_) => remote::history(&common, &through, json),
            None => history::run(&common, json),
        },
        Command::Diff {
            common,
            from,
            to,
            json,
        } => diff::run(&common, from, to, json),
        Command::Status {
            common,
            through,
            json,
        } => match through.server {
            Some(_) => remote::status(&common, &through, json),
            None => status::run(&common, json),
        },
        Command::Check { common } => check::run(&common),
        Command::Preview { common, command } => preview::run(&common, command),
        Command::Setup { common, json } => setup::run(&common, json),
        Command::Renew { common, json } => renew::run(&common, json),
        Command::Proxy { command } => proxy::run(command),
        Command::Demo { keep, panel } => demo::run(keep, panel),
        Command::Serve(args) => serve::run(args),
        Command::User { common, command } => users::user(&common, command),
        Command::Token { common, command } => users::token(&common, command),
        Command::Db { common, command } => db::run(&common, command),
    }
}

/// Loads and validates the config, printing the error (exit 2) if it is not usable. The file
/// must be a regular file of at most [`cutover_core::config::MAX_CONFIG_BYTES`]: anything
/// else (a device such as `/dev/zero`, a FIFO, a directory) is refused from its metadata,
/// without opening it, and the read itself is bounded.
pub(crate) fn load_config(path: &Path) -> Result<Config, i32> {
    use cutover_core::config::MAX_CONFIG_BYTES;
    use std::io::Read;
    let refuse = |what: String| {
        eprintln!("error: {}: {what}", path.display());
        Err(exit::USAGE)
    };
    let cannot_read = |e: std::io::Error| {
        eprintln!(
            "error: cannot read {}: {e}\n(create a cutover.toml, see the README, or pass -c FILE)",
            path.display()
        );
        Err(exit::USAGE)
    };
    let not_regular = |t: std::fs::FileType| {
        use std::os::unix::fs::FileTypeExt;
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        format!("not a regular file (it is {kind}); a config is a regular file of at most 1 MiB")
    };
    let too_big = |size: String| {
        format!("the file is {size}; a config is at most 1 MiB ({MAX_CONFIG_BYTES} bytes)")
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return cannot_read(e),
    };
    if !meta.is_file() {
        return refuse(not_regular(meta.file_type()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return refuse(too_big(format!("{} bytes", meta.len())));
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return cannot_read(e),
    };
    // The path may have been replaced between the two looks: trust only the open file.
    match file.metadata() {
        Ok(m) if !m.is_file() => return refuse(not_regular(m.file_type())),
        Ok(_) => {}
        Err(e) => return cannot_read(e),
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes) {
        return cannot_read(e);
    }
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return refuse(too_big(format!("more than {MAX_CONFIG_BYTES} bytes")));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let col =
                valid.len() - valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) + 1;
            return refuse(format!(
                "the file is not UTF-8 text (an invalid byte at line {line}, column {col}); a config is a UTF-8 TOML file"
            ));
        }
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    Config::parse(&abs, &text, home.as_deref()).map_err(|e| {
        eprintln!("error: {e}");
        exit::USAGE
    })
}

/// `--data`, `$CUTOVER_DATA`, `$XDG_DATA_HOME/cutover` or `~/.local/share/cutover`.
pub(crate) fn data_dir(common: &Common) -> PathBuf {
    if let Some(d) = &common.data {
        return d.clone();
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("cutover");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/cutover")
}

pub(crate) fn open_store(common: &Common) -> Result<(cutover_store::Store, PathBuf), i32> {
    let dir = data_dir(common);
    if let Some(Err(e)) = common.database.as_ref().map(|d| d.check()) {
        eprintln!("error: {e}");
        return Err(exit::USAGE);
    }
    match cutover_engine::open_database(&dir, common.database.as_ref()) {
        Ok(s) => Ok((s, dir)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(exit::NEEDS_PERSON)
        }
    }
}

/// Prints a JSON document on stdout.
pub(crate) fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

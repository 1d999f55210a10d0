//! One module per subcommand, and the shared wiring: loading the config, finding the data
//! directory, and printing an outcome.

mod check;
mod demo;
mod deploy;
mod diff;
mod history;
mod proxy;
mod setup;
mod status;

use crate::cli::{Cli, Command, Common};
use crate::output::Mode;
use cutover_core::Config;
use cutover_engine::exit;
use std::path::{Path, PathBuf};

pub(crate) fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Deploy {
            common,
            artifact,
            git_ref,
            image,
            json,
            events,
        } => deploy::deploy(&common, artifact, git_ref, image, Mode::of(json, events)),
        Command::Rollback {
            common,
            to,
            json,
            events,
        } => deploy::rollback(&common, to, Mode::of(json, events)),
        Command::History { common, json } => history::run(&common, json),
        Command::Diff {
            common,
            from,
            to,
            json,
        } => diff::run(&common, from, to, json),
        Command::Status { common, json } => status::run(&common, json),
        Command::Check { common } => check::run(&common),
        Command::Setup { common, json } => setup::run(&common, json),
        Command::Proxy { command } => proxy::run(command),
        Command::Demo { keep } => demo::run(keep),
    }
}

/// Loads and validates the config, printing the error (exit 2) if it is not usable.
pub(crate) fn load_config(path: &Path) -> Result<Config, i32> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: cannot read {}: {e}\n(create a cutover.toml, see the README, or pass -c FILE)",
                path.display()
            );
            return Err(exit::USAGE);
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
    match cutover_engine::open_store(&dir) {
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

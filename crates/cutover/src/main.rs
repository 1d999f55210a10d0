//! The `cutover` binary: flags (clap), wiring and output. The work happens in
//! `cutover-engine`; this crate parses the command line, loads the config, draws progress and
//! maps outcomes to exit codes (0 verified, 1 failed and back on a verified release, 2 bad
//! input and nothing touched, 3 a person must look, 4 locked).

mod cli;
mod commands;
mod output;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let code = commands::run(cli);
    ExitCode::from(code.clamp(0, 255) as u8)
}

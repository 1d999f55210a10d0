//! The command line, as close to what the user types as possible. Parsing only: nothing here
//! does work.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "cutover",
    version,
    about = "Zero-downtime deploys and one-click rollback for self-hosted apps, over SSH"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct Common {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "cutover.toml",
        global = true
    )]
    pub(crate) config: PathBuf,
    /// Where the history database and the artifact store live.
    #[arg(long = "data", env = "CUTOVER_DATA", global = true)]
    pub(crate) data: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Stage a new release on every host, switch atomically, verify, and switch back if unhealthy.
    Deploy {
        #[command(flatten)]
        common: Common,
        /// A directory or a .tar.gz to deploy (default: [files] source).
        #[arg(long, conflicts_with = "git_ref")]
        artifact: Option<PathBuf>,
        /// Build and deploy this git revision ([build] in the config): a branch, a tag, a full
        /// or short SHA, `origin/main`, `HEAD~1`, ... It is resolved to a full commit first.
        #[arg(long = "ref", value_name = "REF")]
        git_ref: Option<String>,
        /// A container image (container apps; not in this build yet).
        #[arg(long)]
        image: Option<String>,
        /// Print one JSON document on stdout instead of progress.
        #[arg(long)]
        json: bool,
    },
    /// Go back to the newest earlier release that succeeded everywhere (or --to ID), verified.
    Rollback {
        #[command(flatten)]
        common: Common,
        /// The release id (or its last 7+ characters) to roll back to.
        #[arg(long = "to")]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Releases, newest first.
    History {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// The commits and files that changed between two releases built from git.
    Diff {
        #[command(flatten)]
        common: Common,
        /// The older release: an id or its last 7+ characters (default: the release before TO).
        from: Option<String>,
        /// The newer release: an id or its last 7+ characters (default: the live release).
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// What every host serves right now, read from the hosts.
    Status {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// Is the config valid, and is every host reachable, trusted and ready?
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// Install or upgrade the edge proxy on the hosts (container apps; not in this build yet).
    Setup {
        #[command(flatten)]
        common: Common,
    },
    /// The edge proxy (container apps; not in this build yet).
    Proxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A self-contained demo on this machine: v1, v2, a broken v3 rolled back automatically,
    /// and a rollback. No SSH, no setup.
    Demo {
        /// Keep the demo's directory and print where it is.
        #[arg(long)]
        keep: bool,
    },
}

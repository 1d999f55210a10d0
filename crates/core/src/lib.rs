//! The pure model of cutover: the config and its validation, durations, release ids and
//! timestamps, and the decisions that must never depend on I/O: which release a rollback
//! goes to and which release directories a host may prune.
//!
//! **Invariant:** nothing in this crate touches the network, the file system (beyond parsing
//! text it is handed), a clock it was not handed, or a process. The engine feeds it facts and
//! acts on its answers, so every decision here is unit-tested with plain values.

pub mod cidr;
pub mod config;
pub mod container;
pub mod duration;
pub mod host;
pub mod plan;
pub mod preview;
pub mod protocol;
pub mod proxy_limits;
pub mod release;
pub mod webhook;

pub use config::{AppKind, BuildConfig, Config, ConfigError, FilesConfig, HealthConfig, SshConfig};
pub use duration::parse_duration;
pub use host::Destination;
pub use protocol::{CrashPoint, HostState, RunKind, State, Status, Step};
pub use release::{format_utc, parse_utc, ReleaseId};

//! Test hosts for cutover's integration tests and benchmarks: a [`Lab`] of
//! Linux network namespaces, each with its own `/srv`, sshd and nginx,
//! reachable over SSH at 10.201.X.Y like real deploy targets, plus an HTTP
//! [`Load`] generator (tokio + hyper) that counts every failed request during
//! a deploy and can keep a ledger of every request. Needs root (namespaces, veths, mounts); see [`Lab`] for details.
//!
//! With [`LabOptions::docker`], every host also runs its own `dockerd` and
//! the lab runs a registry its hosts pull from; test images are built
//! locally from Debian's busybox-static ([`Lab::build_web_image`]) and
//! pushed there, never pulled from the internet.
//!
//! [`Pebble`] is a real ACME server (Debian 13's pebble, 2.6: it answers ACME Renewal
//! Information) for the proxy's `tls = "acme"` tests.
//!
//! [`Browser`] is a headless chromium under Debian's chromedriver, driven over WebDriver
//! (fantoccini) with blocking calls, for the panel's tests and screenshots.

pub mod browser;
mod claim;
pub mod hostile;
mod lab;
mod load;
pub mod pebble;
mod sys;

pub use browser::Browser;
pub use lab::{Lab, LabOptions};
pub use load::{Load, LoadOptions, LoadReport, RequestSample};
pub use pebble::{Pebble, PebbleOptions};

/// Cleans up after labs whose test process died without dropping them
/// (e.g. killed by a test timeout): kills their processes, deletes their
/// namespaces, veths, routes, mounts and temp dirs, and frees their lab
/// numbers. [`Lab::start`] does this lazily for the number it reuses; call
/// this to clean everything at once. Returns how many labs were reaped.
pub fn reap_stale_labs() -> usize {
    claim::reap_stale()
}

//! Every way a run ends badly, with its exit code, its HTTP status (for the server) and its
//! wording. All the protocol's user-facing sentences are here, and the success sentence too,
//! so a changed message is one diff in one file.

use crate::exit;
use cutover_core::Status;
use std::fmt;

/// How the hosts of an app switch, as far as the wording cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `current` renamed, then `reload`.
    Files,
    /// The edge proxy swaps its target.
    Proxy(Box<Proxied>),
}

/// What a proxy-switched release is, for the wording: the image deployed and the strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    pub image: String,
    pub strategy: String,
}

/// The step at which a release was found wanting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedAt {
    /// A switch failed mechanically.
    Switch,
    /// The health gate after the switch (or the proxy's gate inside it).
    Gate,
    /// The bake after a batch's gate.
    Bake,
}

/// Why a run did not end with every host on the new release, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployError {
    /// Bad usage or input, said in full by the caller (exit 2, nothing touched).
    Usage(String),
    /// A hostile or unreadable artifact.
    ArtifactRefused(String),
    /// The same, found while the artifact was being streamed to the hosts (a file replaced
    /// mid-pack): their partial uploads were removed.
    ArtifactRefusedStreamed(String),
    /// `deploy --ref` without the [build] section it needs.
    NoBuildSection { file: String, container: bool },
    /// `deploy --image` with something that is not a tag or a digest.
    BadImage { given: String, image: String },
    /// A build from git found nothing to build (bad revision, bad URL): exit 2.
    BuildInput(String),
    /// A build from git failed: exit 1, no host touched.
    BuildFailed(String),
    /// No release fits `rollback` (or `--to`).
    NoRollbackTarget(String),
    /// The rollback target has no recorded config this kind of app can use.
    NoSnapshot(String),
    /// Another live process holds the app lock in the database.
    Locked { app: String, holder: String },
    /// Another deploy holds the lock on some hosts.
    HostsLocked { app: String, held: Vec<String> },
    /// The history database failed (exit 3).
    Store(String),
    /// An event that guards a host change could not be recorded, so the change was not made.
    NotRecorded,
    /// cutover could not set up its SSH control directory.
    ControlSockets(String),
    /// Some hosts could not be connected to; nothing was touched.
    Unreachable { total: usize, errors: Vec<String> },
    /// Some hosts failed their checks; nothing was touched.
    Unprepared(Vec<String>),
    /// The image could not be pulled everywhere; nothing was switched.
    PullFailed {
        reference: String,
        errors: Vec<String>,
    },
    /// Hosts resolved one reference to different digests.
    DigestsDisagree { reference: String, digests: String },
    /// Some host failed to stage; nothing was switched.
    StageFailed {
        release: String,
        via: Via,
        errors: Vec<String>,
    },
    /// A first deploy failed its gate (or its switch): nothing to go back to.
    NothingToGoBackTo {
        app: String,
        release: String,
        via: Via,
        why: Vec<String>,
    },
    /// The gate (or a switch) failed and every host went back and passed its gate again.
    Reverted {
        release: String,
        previous: String,
        why: Vec<String>,
        new_release: bool,
        failed_at: FailedAt,
    },
    /// The gate (or a switch) failed and going back failed too: a person must look.
    RevertFailed {
        release: String,
        previous: String,
        via: Via,
        why: Vec<String>,
        failed: Vec<String>,
        failed_at: FailedAt,
    },
}

impl DeployError {
    /// The process exit code the contract gives this ending.
    pub fn exit_code(&self) -> i32 {
        use DeployError::*;
        match self {
            Usage(_)
            | ArtifactRefused(_)
            | ArtifactRefusedStreamed(_)
            | NoBuildSection { .. }
            | BadImage { .. }
            | BuildInput(_)
            | NoRollbackTarget(_)
            | NoSnapshot(_) => exit::USAGE,
            Locked { .. } | HostsLocked { .. } => exit::LOCKED,
            Store(_) | DigestsDisagree { .. } | RevertFailed { .. } => exit::NEEDS_PERSON,
            BuildFailed(_)
            | NotRecorded
            | ControlSockets(_)
            | Unreachable { .. }
            | Unprepared(_)
            | PullFailed { .. }
            | StageFailed { .. }
            | NothingToGoBackTo { .. }
            | Reverted { .. } => exit::FAILED,
        }
    }

    /// The HTTP status the server answers a request that ended this way.
    pub fn http_status(&self) -> u16 {
        match self.exit_code() {
            exit::USAGE => 422,
            exit::LOCKED => 409,
            exit::NEEDS_PERSON => 500,
            _ => 502,
        }
    }

    /// How the run ends in the history.
    pub fn status(&self) -> Status {
        match self {
            DeployError::Locked { .. } => Status::Locked,
            DeployError::RevertFailed { .. } => Status::Partial,
            DeployError::Reverted { new_release, .. } => {
                cutover_core::protocol::reverted_status(*new_release)
            }
            _ if self.exit_code() == exit::USAGE => Status::Refused,
            _ => Status::Failed,
        }
    }
}

/// A switch that failed is said as such, never as a failed health gate.
fn failed_head(release: &str, at: FailedAt) -> String {
    match at {
        FailedAt::Switch => format!("release {release} could not be switched on every host"),
        FailedAt::Gate => format!("release {release} failed its health gate"),
        FailedAt::Bake => format!("release {release} passed its health gate but failed its bake"),
    }
}

fn list(items: &[String]) -> String {
    items.join("\n  ")
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DeployError::*;
        match self {
            Usage(m) | Store(m) | NoRollbackTarget(m) => f.write_str(m),
            ArtifactRefused(e) => write!(f, "artifact refused: {e}. Nothing was touched."),
            ArtifactRefusedStreamed(e) => write!(f, "artifact refused: {e}. Nothing was switched: every host still serves what it served, and the partial uploads were removed."),
            NoBuildSection { file, container: false } => write!(f, "`deploy --ref` builds from git and needs a [build] section (repo, command, output) in {file}. Nothing was touched."),
            NoBuildSection { file, container: true } => write!(f, "`deploy --ref` builds an image from git and needs a [build] section with `repo` and `dockerfile` in {file}. Nothing was touched."),
            BadImage { given, image } => write!(f, "--image takes a tag (e.g. v1.2) or @sha256:DIGEST of {image}, got {given:?}; nothing was touched"),
            BuildInput(m) => write!(f, "{m}\nNothing was built and no host was touched."),
            BuildFailed(m) => write!(f, "{m}\nNo host was touched: every host still serves what it served."),
            NoSnapshot(id) => write!(f, "release {id} has no container snapshot"),
            Locked { app, holder } => write!(f, "another run of app `{app}` holds the lock: {holder}. Wait for it to finish."),
            HostsLocked { app, held } => write!(f, "another deploy of app `{app}` holds the lock on:\n  {}", list(held)),
            NotRecorded => f.write_str("cannot write to the history database; no host was touched"),
            ControlSockets(e) => write!(f, "cannot prepare SSH control sockets: {e}"),
            Unreachable { total, errors } => write!(f, "{} of {total} hosts could not be used, so no host was touched:\n  {}", errors.len(), list(errors)),
            Unprepared(errors) => write!(f, "hosts are not ready, so no host was touched:\n  {}", list(errors)),
            PullFailed { reference, errors } => write!(f, "pulling {reference} failed, so nothing was switched anywhere:\n  {}", list(errors)),
            DigestsDisagree { reference, digests } => write!(f, "hosts resolved {reference} to different digests: {digests}; nothing was switched"),
            StageFailed { via: Via::Files, errors, .. } => write!(f, "staging failed, so no host was switched; every host still serves what it served:\n  {}", list(errors)),
            StageFailed { via: Via::Proxy(_), release, errors } => write!(f, "release {release} did not become healthy, so nothing was switched on any host; the new containers were removed:\n  {}", list(errors)),
            NothingToGoBackTo { app, release, via: Via::Files, why } => write!(f, "release {release} failed its health gate and app `{app}` has no previous release to go back to (this was its first deploy), so the hosts still serve {release}:\n  {}\nFix the app or the [health] settings and deploy again.", list(why)),
            NothingToGoBackTo { app, release, via: Via::Proxy(_), why } => write!(f, "release {release} failed its health gate and app `{app}` has no previous release to go back to (first deploy), so the proxies point at it:\n  {}\nFix the image or the [health] settings and deploy again.", list(why)),
            Reverted { release, previous, why, failed_at, .. } => write!(f, "{}:\n  {}\nEvery host was switched back to {previous} and passed its health gate again.", failed_head(release, *failed_at), list(why)),
            RevertFailed { release, previous, via: Via::Files, why, failed, failed_at } => write!(f, "{}:\n  {}\nand switching back to {previous} failed on:\n  {}\nA person must look: run `cutover status` to see what each host serves, fix the host, then `cutover rollback --to {previous}` or deploy again.", failed_head(release, *failed_at), list(why), list(failed)),
            RevertFailed { release, previous, via: Via::Proxy(_), why, failed, failed_at } => write!(f, "{}:\n  {}\nand switching back to {previous} failed on:\n  {}\nA person must look: `cutover status`, then `cutover rollback --to {previous}`.", failed_head(release, *failed_at), list(why), list(failed)),
        }
    }
}

impl std::error::Error for DeployError {}

/// The sentence of a run that ended well.
pub fn succeeded(rollback: bool, release: &str, hosts: usize, via: &Via) -> String {
    let what = if rollback {
        "rolled back to"
    } else {
        "deployed"
    };
    match via {
        Via::Files => format!(
            "{what} {release} on {hosts} host(s); every host passed its health gate"
        ),
        Via::Proxy(p) => format!("{what} {release} ({}) on {hosts} host(s) with {}; every host passed its health gate through the proxy", p.image, p.strategy),
    }
}

/// The note of a run a crash interrupted, reconciled by a later run.
pub(crate) fn reconciled(
    kind: cutover_core::RunKind,
    release: &str,
    last: &str,
    mark: Option<Status>,
    serving: &[&str],
    partial_dirs: bool,
) -> String {
    format!(
        "reconciled an interrupted {kind} of {} (last step: {last}): marked {}; hosts serving it: {}{}",
        if release.is_empty() { "a release that was still building" } else { release },
        mark.unwrap_or(Status::Interrupted),
        if serving.is_empty() { "none".to_string() } else { serving.join(", ") },
        if partial_dirs { "; stale .partial directories removed" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ending_has_the_contract_exit_code_and_an_http_status() {
        let cases = [
            (
                DeployError::ArtifactRefused("x".into()),
                2,
                422,
                Status::Refused,
            ),
            (
                DeployError::Locked {
                    app: "a".into(),
                    holder: "h".into(),
                },
                4,
                409,
                Status::Locked,
            ),
            (
                DeployError::Unreachable {
                    total: 3,
                    errors: vec!["h: down".into()],
                },
                1,
                502,
                Status::Failed,
            ),
            (
                DeployError::Reverted {
                    release: "r2".into(),
                    previous: "r1".into(),
                    why: vec![],
                    new_release: true,
                    failed_at: FailedAt::Gate,
                },
                1,
                502,
                Status::RolledBack,
            ),
            (
                DeployError::RevertFailed {
                    release: "r2".into(),
                    previous: "r1".into(),
                    via: Via::Files,
                    why: vec![],
                    failed: vec![],
                    failed_at: FailedAt::Switch,
                },
                3,
                500,
                Status::Partial,
            ),
        ];
        for (e, code, http, status) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
            assert_eq!(e.http_status(), http, "{e}");
            assert_eq!(e.status(), status, "{e}");
        }
    }

    #[test]
    fn wording_is_exact() {
        let e = DeployError::Unreachable {
            total: 3,
            errors: vec!["web3: connection refused".into()],
        };
        assert_eq!(
            e.to_string(),
            "1 of 3 hosts could not be used, so no host was touched:\n  web3: connection refused"
        );
        assert_eq!(
            succeeded(false, "r1", 2, &Via::Files),
            "deployed r1 on 2 host(s); every host passed its health gate"
        );
    }
}

//! The deploy protocol's vocabulary and its pure rules: what a run is, the states a release, a
//! run and a host go through, the steps and crash points every switcher passes, and the
//! decisions taken on plain facts (commit or revert, how to mark a run a crash interrupted,
//! which hosts switch together). The engine acts on these answers; the store keeps their
//! `as_str()` spellings, which are part of the history's format and never change.

use std::fmt;

macro_rules! spelled {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in protocol order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The spelling recorded in the history and shown to people.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
            /// The value a recorded spelling names.
            pub fn parse(text: &str) -> Option<$name> {
                match text { $($s => Some($name::$v),)+ _ => None }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled!(
    /// What a run does.
    RunKind {
        Deploy => "deploy",
        Rollback => "rollback",
    }
);

spelled!(
    /// A release's status in the history, and how a run ended.
    Status {
        /// Being deployed (or a crash interrupted it and no run has reconciled it yet).
        Running => "running",
        /// Verified healthy on every host of its deploy.
        Succeeded => "succeeded",
        /// Never served anywhere, or a rollback that went back.
        Failed => "failed",
        /// Switched, failed its gate, every host went back.
        RolledBack => "rolled_back",
        /// Some hosts may serve it: a person must look (or the next run reconciles it).
        Partial => "partial",
        /// Bad input: nothing was touched.
        Refused => "refused",
        /// Another run holds the lock.
        Locked => "locked",
        /// A crash ended the run; a later run reconciled it.
        Interrupted => "interrupted",
    }
);

spelled!(
    /// How far a step got.
    State {
        Start => "start",
        Done => "done",
        Failed => "failed",
        /// A line of a build's output.
        Output => "output",
    }
);

spelled!(
    /// What happened on one host, as the outcome and the history show it.
    HostState {
        Unreachable => "unreachable",
        Unprepared => "unprepared",
        Staged => "staged",
        StageFailed => "stage_failed",
        Healthy => "healthy",
        Unhealthy => "unhealthy",
        Reverted => "reverted",
        RevertFailed => "revert_failed",
    }
);

spelled!(
    /// The steps of a run, as events record them.
    Step {
        Run => "run",
        MarkBad => "mark-bad",
        Connect => "connect",
        Prepare => "prepare",
        LockTakeover => "lock-takeover",
        Reconcile => "reconcile",
        Pull => "pull",
        Stage => "stage",
        Start => "start",
        /// A new container gated directly on its loopback port, before any switch.
        Probe => "probe",
        Switch => "switch",
        Gate => "gate",
        /// A group of hosts that switches and gates before the next one starts.
        Batch => "batch",
        Bake => "bake",
        Commit => "commit",
        Prune => "prune",
        Revert => "revert",
        RevertGate => "revert-gate",
        Fetch => "fetch",
        Resolve => "resolve",
        Export => "export",
        Build => "build",
        Import => "import",
        DockerBuild => "docker-build",
        DockerPush => "docker-push",
    }
);

spelled!(
    /// Where `CUTOVER_CRASH_AT` can kill a run (tests prove crash safety at each). Every
    /// switcher passes every point but `MidUpload`, which only a streamed upload has.
    CrashPoint {
        AfterLock => "after-lock",
        MidUpload => "mid-upload",
        AfterStage => "after-stage",
        AfterSwitchFirst => "after-switch-first",
        AfterSwitch => "after-switch",
        AfterGate => "after-gate",
        BeforeCommit => "before-commit",
        AfterCommit => "after-commit",
        AfterRevertFirst => "after-revert-first",
        AfterRevert => "after-revert",
    }
);

impl Step {
    /// The switch step and the gate step of a direction: forward, or back to the previous
    /// release.
    pub fn switch_and_gate(back: bool) -> (Step, Step) {
        if back {
            (Step::Revert, Step::RevertGate)
        } else {
            (Step::Switch, Step::Gate)
        }
    }
}

impl CrashPoint {
    /// The points a switch (forward or back) passes: after the first host, after all hosts.
    pub fn of_switch(back: bool) -> (CrashPoint, CrashPoint) {
        if back {
            (CrashPoint::AfterRevertFirst, CrashPoint::AfterRevert)
        } else {
            (CrashPoint::AfterSwitchFirst, CrashPoint::AfterSwitch)
        }
    }
}

/// What to do once every switched host was gated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every host healthy: record the release, prune, unlock.
    Commit,
    /// Some host unhealthy and there is a release to go back to: switch every host back.
    Revert,
    /// Some host unhealthy and nothing to go back to (a first deploy): leave it to a person.
    Stay,
}

/// Commit, revert or stay, from the number of unhealthy hosts and whether a previous release
/// exists.
pub fn decide(unhealthy: usize, has_previous: bool) -> Decision {
    match (unhealthy, has_previous) {
        (0, _) => Decision::Commit,
        (_, true) => Decision::Revert,
        (_, false) => Decision::Stay,
    }
}

/// How the status of the release of an interrupted run is set when a later run reconciles
/// it: a deploy served by no host `failed`, served by any host `partial` (a person, or the
/// next deploy, settles it); a release whose commit was recorded (`recorded` is
/// `succeeded`: the crash came after it) and a rollback's release keep their status.
pub fn reconcile(kind: RunKind, recorded: Option<Status>, hosts_serving: usize) -> Option<Status> {
    match (kind, recorded, hosts_serving) {
        (RunKind::Rollback, _, _) | (_, Some(Status::Succeeded), _) => None,
        (RunKind::Deploy, _, 0) => Some(Status::Failed),
        (RunKind::Deploy, _, _) => Some(Status::Partial),
    }
}

/// The status a run's release ends with when the revert went well: a new release is
/// `rolled_back`; a rollback's target (already recorded, known good once) is not changed, but
/// the run failed.
pub fn reverted_status(new_release: bool) -> Status {
    if new_release {
        Status::RolledBack
    } else {
        Status::Failed
    }
}

/// The size of one batch of hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(usize),
    Percent(u8),
}

/// Splits `n` hosts (by index, config order) into consecutive groups that switch, gate and
/// bake together. Each size is the cumulative number of hosts switched once that batch is
/// done (as `[1, "25%", "100%"]` reads); the last group always ends at `n`. No sizes: one
/// group of every host.
pub fn batches(n: usize, sizes: &[BatchSize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut done = 0;
    for s in sizes {
        let upto = match *s {
            BatchSize::Count(c) => c,
            BatchSize::Percent(p) => (n * p as usize).div_ceil(100),
        }
        .min(n);
        if upto > done {
            out.push(done..upto);
            done = upto;
        }
    }
    if done < n {
        out.push(done..n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_are_the_recorded_ones() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(*s));
        }
        assert_eq!(Status::RolledBack.as_str(), "rolled_back");
        assert_eq!(Status::parse("nope"), None);
        assert_eq!(CrashPoint::ALL.len(), 10);
        assert_eq!(CrashPoint::MidUpload.to_string(), "mid-upload");
        assert_eq!(Step::RevertGate.as_str(), "revert-gate");
        assert_eq!(HostState::StageFailed.as_str(), "stage_failed");
    }

    #[test]
    fn decide_commits_only_when_every_host_is_healthy() {
        assert_eq!(decide(0, false), Decision::Commit);
        assert_eq!(decide(0, true), Decision::Commit);
        assert_eq!(decide(1, true), Decision::Revert);
        assert_eq!(decide(3, false), Decision::Stay);
    }

    #[test]
    fn reconcile_marks_a_served_release_partial_and_an_unserved_one_failed() {
        let running = Some(Status::Running);
        assert_eq!(reconcile(RunKind::Deploy, running, 0), Some(Status::Failed));
        assert_eq!(
            reconcile(RunKind::Deploy, running, 2),
            Some(Status::Partial)
        );
        assert_eq!(reconcile(RunKind::Rollback, running, 2), None);
        // A crash after the commit was recorded: the release stays succeeded.
        assert_eq!(reconcile(RunKind::Deploy, Some(Status::Succeeded), 2), None);
        assert_eq!(reverted_status(true), Status::RolledBack);
        assert_eq!(reverted_status(false), Status::Failed);
    }

    #[test]
    fn batches_cover_every_host_once_in_order() {
        assert_eq!(batches(3, &[]), vec![0..3]);
        assert_eq!(batches(0, &[]), Vec::<std::ops::Range<usize>>::new());
        use BatchSize::*;
        assert_eq!(
            batches(4, &[Count(1), Percent(50), Percent(100)]),
            vec![0..1, 1..2, 2..4]
        );
        assert_eq!(batches(10, &[Percent(25)]), vec![0..3, 3..10]);
        assert_eq!(batches(2, &[Count(5)]), vec![0..2]);
        assert_eq!(batches(4, &[Count(2), Count(1)]), vec![0..2, 2..4]);
    }
}

//! Switchers: one per way of switching a host from one release to another. The protocol
//! ([`crate::deploy`]) owns the order of steps, the locks, the events, the crash points, the
//! verdicts and the wording; a switcher owns what one step does on one host.
//!
//! * [`files::Files`]: upload into `releases/<id>.partial`, rename; switch = `current`
//!   renamed over, then `reload`; gate = the health URL as the host sees it.
//! * [`container::Containers`] with the blue-green strategy: start the new container beside the
//!   old one and gate it directly; switch = the edge proxy swaps its target.
//! * the same with the hold strategy: switch = pause in the proxy, stop the old container,
//!   start the new one, gate, swap, resume.
//!
//! Going back is a switch too: `switch(to = previous, staged = None)`, through the same code.

pub mod container;
pub mod files;
mod own_bake;

use crate::deploy::{DeployError, Recorder, Via};
use crate::hostops::Prepared;
use cutover_core::{State, Step};
use cutover_remote::Remote;
use cutover_store::Release;
use std::collections::BTreeSet;

/// A release as a switcher handles it: its id, its content digest and its recorded config.
#[derive(Debug, Clone)]
pub struct Target<S> {
    pub id: String,
    /// sha256 of the artifact, or the image's digest (hex).
    pub content: String,
    pub commit: Option<String>,
    pub snap: S,
}

/// What a run deploys, once pinned to content: the release row to insert.
#[derive(Debug, Clone)]
pub struct Pinned<S> {
    pub content: String,
    pub snap: S,
    pub source: String,
}

/// One host, as a step sees it.
pub struct HostCx<'a> {
    pub i: usize,
    pub name: &'a str,
    pub remote: &'a dyn Remote,
    pub(crate) prepared: &'a Prepared,
    pub rec: &'a Recorder<'a>,
}

impl HostCx<'_> {
    /// Records a sub-step of this host (best effort: the guarding event was written by the
    /// protocol before the step began).
    pub fn ev(&self, step: Step, state: State, detail: &str) {
        self.rec.ev(Some(self.name), step, state, detail);
    }
}

/// Why a host's switch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchError {
    /// The release failed a health check that is part of the switch (the proxy gates a target
    /// before it swaps to it): said as a failed health gate.
    Unhealthy(String),
    /// The switch itself failed (a command, a connection, a reload): said as such.
    Failed(String),
}

impl SwitchError {
    pub fn text(&self) -> &str {
        match self {
            SwitchError::Unhealthy(t) | SwitchError::Failed(t) => t,
        }
    }

    fn map(self, f: impl FnOnce(String) -> String) -> SwitchError {
        match self {
            SwitchError::Unhealthy(t) => SwitchError::Unhealthy(f(t)),
            SwitchError::Failed(t) => SwitchError::Failed(f(t)),
        }
    }
}

impl From<String> for SwitchError {
    fn from(t: String) -> SwitchError {
        SwitchError::Failed(t)
    }
}

/// The way a kind of app switches; see the module docs.
pub trait Switcher: Sync {
    /// The config recorded with a release and restored with it.
    type Snap: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned;
    /// What staging left on one host for its switch.
    type Staged: Send + Sync;

    /// Whether staging leaves `releases/<id>.partial` directories that `prepare` cleans.
    const STAGES_DIRECTORIES: bool;
    /// The directory on every host that holds the app's lock and bookkeeping.
    fn root(&self) -> &str;
    /// How the wording names this way of switching, for `snap`.
    fn via(&self, snap: &Self::Snap) -> Via;
    /// The recorded config of a release, if it is one of this kind.
    fn snapshot(&self, r: &Release) -> Option<Self::Snap> {
        serde_json::from_str(&r.snapshot).ok()
    }
    /// Pins a reference that only the hosts can resolve (an image tag) to content. A kind
    /// whose content is always known before connecting (files) has nothing to pin.
    fn pin(
        &self,
        _rec: &Recorder<'_>,
        _hosts: &[HostCx<'_>],
        reference: &str,
    ) -> Result<Pinned<Self::Snap>, DeployError> {
        Err(DeployError::Usage(format!(
            "this kind of app deploys content it knows before connecting, not {reference:?}"
        )))
    }
    /// Work on a reference to pin that needs no host, run while the hosts connect and are
    /// prepared (files: packing a directory into the store when a delta will likely be sent,
    /// so that the packing overlaps the connections). [`Switcher::pin`] takes its result.
    fn prepin(&self, _rec: &Recorder<'_>, _reference: &str, _hosts: usize) {}
    /// The releases a host may serve now (to reconcile an interrupted run).
    fn serving(&self, h: &HostCx<'_>) -> Vec<String>;
    /// What a host did on its own for `release` while no controller watched (containers:
    /// the proxy's bake verdict), for the reconcile message.
    fn reconcile_note(&self, _h: &HostCx<'_>, _release: &str) -> Option<String> {
        None
    }
    /// Work done once before every host stages (files: the deltas worth sending).
    fn plan_stage(&self, _rec: &Recorder<'_>, _to: &Target<Self::Snap>, _hosts: &[HostCx<'_>]) {}
    /// One host: put `to` beside what it serves, which keeps serving.
    fn stage(&self, h: &HostCx<'_>, to: &Target<Self::Snap>) -> Result<Self::Staged, String>;
    /// Bytes sent to stage.
    fn uploaded(&self, _staged: &Self::Staged) -> u64 {
        0
    }
    /// One host: undo a stage because another host failed (nothing was switched).
    fn unstage(&self, _h: &HostCx<'_>, _to: &Target<Self::Snap>, _staged: Option<&Self::Staged>) {}
    /// One host: switch from `from` to `to`. `staged` is `None` when going back.
    fn switch(
        &self,
        h: &HostCx<'_>,
        from: Option<&Target<Self::Snap>>,
        to: &Target<Self::Snap>,
        staged: Option<&Self::Staged>,
    ) -> Result<String, SwitchError>;
    /// Where and how one host's release is probed through what its users reach (files: the
    /// health URL as the host sees it; containers: the health path through the proxy): the
    /// bake re-probes it for its window.
    fn probe_at(
        &self,
        h: &HostCx<'_>,
        to: &Target<Self::Snap>,
    ) -> Result<(cutover_remote::Endpoint, crate::gate::GateSpec), String>;
    /// One host, after its batch's gate (`from`: the release it switched from): probe
    /// [`Switcher::probe_at`] for `window`; `Err` when more than `max_error_rate` of the
    /// probes failed (the host's diagnosis). Containers also judge the proxy's own counts.
    fn bake(
        &self,
        h: &HostCx<'_>,
        _from: Option<&Target<Self::Snap>>,
        to: &Target<Self::Snap>,
        window: std::time::Duration,
        max_error_rate: f64,
    ) -> Result<String, String> {
        probing_bake(self, h, to, window, max_error_rate)
    }
    /// What the gate probes, for its start event.
    fn gate_target(&self, to: &Target<Self::Snap>) -> String;
    /// One host, after its switch (whose summary is `switched`): healthy (`Ok`: the host's
    /// detail) or the diagnosis.
    fn gate(
        &self,
        h: &HostCx<'_>,
        to: &Target<Self::Snap>,
        switched: &str,
    ) -> Result<String, String>;
    /// One host, after going back from `failed` passed its gate: remove what `failed` left.
    fn drop_failed(&self, _h: &HostCx<'_>, _failed: &Target<Self::Snap>) {}
    /// How long after its controller died a host may still change on its own (a hold
    /// switch's watchdog finishing the switch): a reconciliation without a new run waits that
    /// long after the dead run's last event, so that it does not race the host.
    fn settle(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// One host, after the commit: retire `from`, and say which release directories the
    /// unlock prunes (keeping `protect`). `Ok` also carries the detail of the prune event.
    fn retire(
        &self,
        h: &HostCx<'_>,
        live: &Target<Self::Snap>,
        from: Option<&Target<Self::Snap>>,
        protect: &BTreeSet<String>,
    ) -> Result<(Vec<String>, String), String>;
}

/// The bake by probes: [`Switcher::probe_at`] every health interval for `window`; `Err` when
/// more than `max_error_rate` of the probes failed.
pub(crate) fn probing_bake<S: Switcher + ?Sized>(
    sw: &S,
    h: &HostCx<'_>,
    to: &Target<S::Snap>,
    window: std::time::Duration,
    max_error_rate: f64,
) -> Result<String, String> {
    let (endpoint, spec) = sw.probe_at(h, to)?;
    let r = crate::gate::run_bake(&endpoint, &spec, window, max_error_rate);
    let m = format!(
        "{} of {} probes of {} failed in {} (max_error_rate {max_error_rate})",
        r.failed,
        r.probes,
        spec.path,
        cutover_core::duration::format_duration(window)
    );
    if r.passed(max_error_rate) {
        return Ok(m);
    }
    Err(match r.last_failure {
        Some(p) => format!("{m}; last failure: {}", p.describe()),
        None => m,
    })
}

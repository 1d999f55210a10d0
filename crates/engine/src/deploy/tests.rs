//! The protocol against a fake fleet and a fake switcher: no root, no SSH, no processes;
//! any step can fail on any host, and every decision is checked against the history, the
//! events, what each host serves and the exact message.

use super::protocol::{execute_on, Candidate, Early, Env, Fleet, What};
use super::{DeployError, Recorder, Via};
use crate::hostops::{HostLock, OpError, Prepared};
use crate::switch::{HostCx, Pinned, SwitchError, Switcher, Target};
use crate::{Outcome, Silent};
use cutover_core::{Config, RunKind, State, Step};
use cutover_remote::local::LocalHost;
use cutover_remote::Remote;
use cutover_store::Store;
use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

/// A fault: `step` fails on host `host` for content `content`.
type Fault = (&'static str, usize, &'static str);

struct FakeHost {
    lock: Mutex<Option<String>>,
    releases: Mutex<Vec<String>>,
}

struct FakeFleet {
    names: Vec<String>,
    hosts: Vec<FakeHost>,
    local: LocalHost,
    down: HashSet<usize>,
}

impl FakeFleet {
    fn new(n: usize) -> FakeFleet {
        FakeFleet {
            names: (0..n).map(|i| format!("h{i}")).collect(),
            hosts: (0..n)
                .map(|_| FakeHost {
                    lock: Mutex::new(None),
                    releases: Mutex::new(Vec::new()),
                })
                .collect(),
            local: LocalHost,
            down: HashSet::new(),
        }
    }
}

impl Fleet for FakeFleet {
    fn names(&self) -> &[String] {
        &self.names
    }
    fn remote(&self, _i: usize) -> &dyn Remote {
        &self.local
    }
    fn connect(&self, i: usize) -> Result<(), String> {
        if self.down.contains(&i) {
            Err(format!("{}: connection refused", self.names[i]))
        } else {
            Ok(())
        }
    }
    fn prepare(&self, i: usize, _root: &str, holder: &str) -> Result<Prepared, OpError> {
        let mut lock = self.hosts[i].lock.lock().unwrap();
        let state = match lock.as_ref() {
            Some(other) => HostLock::Held(other.clone()),
            None => {
                *lock = Some(holder.to_string());
                HostLock::Acquired
            }
        };
        Ok(Prepared {
            lock: state,
            current: None,
            releases: self.hosts[i].releases.lock().unwrap().clone(),
            delta: false,
        })
    }
    fn take_over(&self, i: usize, root: &str, _old: &str, new: &str) -> Result<Prepared, OpError> {
        *self.hosts[i].lock.lock().unwrap() = None;
        self.prepare(i, root, new)
    }
    fn finish(&self, i: usize, _root: &str, holder: &str, prune: &[String]) -> Result<(), OpError> {
        let mut lock = self.hosts[i].lock.lock().unwrap();
        if lock.as_deref() == Some(holder) {
            *lock = None;
        }
        self.hosts[i]
            .releases
            .lock()
            .unwrap()
            .retain(|r| !prune.contains(r));
        Ok(())
    }
}

/// Serves a content id per host; fails the steps its faults name.
struct FakeSwitcher {
    faults: Vec<Fault>,
    serving: Mutex<Vec<Option<String>>>,
    log: Mutex<Vec<String>>,
    settle: std::time::Duration,
}

impl FakeSwitcher {
    fn new(n: usize, faults: &[Fault]) -> FakeSwitcher {
        FakeSwitcher {
            faults: faults.to_vec(),
            serving: Mutex::new(vec![None; n]),
            log: Mutex::new(Vec::new()),
            settle: std::time::Duration::ZERO,
        }
    }

    fn step(&self, step: &'static str, h: &HostCx<'_>, content: &str) -> Result<String, String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{step} {} {content}", h.name));
        if self
            .faults
            .iter()
            .any(|&(s, i, c)| s == step && i == h.i && c == content)
        {
            Err(format!("{step} broke"))
        } else {
            Ok(format!("{step} ok"))
        }
    }

    fn serving(&self) -> Vec<Option<String>> {
        self.serving.lock().unwrap().clone()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Switcher for FakeSwitcher {
    const STAGES_DIRECTORIES: bool = true;
    type Snap = String;
    type Staged = ();

    fn root(&self) -> &str {
        "/srv/fake"
    }
    fn via(&self, _snap: &String) -> Via {
        Via::Files
    }
    fn pin(
        &self,
        _rec: &Recorder<'_>,
        hosts: &[HostCx<'_>],
        reference: &str,
    ) -> Result<Pinned<String>, DeployError> {
        for h in hosts {
            self.step("pin", h, reference)
                .map_err(|e| DeployError::PullFailed {
                    reference: reference.into(),
                    errors: vec![e],
                })?;
        }
        Ok(Pinned {
            content: reference.into(),
            snap: format!("cfg-{reference}"),
            source: reference.into(),
        })
    }
    fn serving(&self, h: &HostCx<'_>) -> Vec<String> {
        self.serving.lock().unwrap()[h.i].iter().cloned().collect()
    }
    fn settle(&self) -> std::time::Duration {
        self.settle
    }
    fn stage(&self, h: &HostCx<'_>, to: &Target<String>) -> Result<(), String> {
        self.step("stage", h, &to.content).map(|_| ())
    }
    fn unstage(&self, h: &HostCx<'_>, to: &Target<String>, _staged: Option<&()>) {
        let _ = self.step("unstage", h, &to.content);
    }
    fn switch(
        &self,
        h: &HostCx<'_>,
        _from: Option<&Target<String>>,
        to: &Target<String>,
        staged: Option<&()>,
    ) -> Result<String, SwitchError> {
        let step = if staged.is_some() { "switch" } else { "back" };
        let r = self.step(step, h, &to.content);
        if r.is_ok() {
            self.serving.lock().unwrap()[h.i] = Some(to.id.clone());
        }
        r.map_err(SwitchError::Failed)
    }
    fn probe_at(
        &self,
        _h: &HostCx<'_>,
        _to: &Target<String>,
    ) -> Result<(cutover_remote::Endpoint, crate::gate::GateSpec), String> {
        Err("the fake switcher bakes without probing".into())
    }
    fn bake(
        &self,
        h: &HostCx<'_>,
        _from: Option<&Target<String>>,
        to: &Target<String>,
        _window: std::time::Duration,
        _max_error_rate: f64,
    ) -> Result<String, String> {
        self.step("bake", h, &to.content)
    }
    fn gate_target(&self, to: &Target<String>) -> String {
        format!("gate of {}", to.content)
    }
    fn gate(&self, h: &HostCx<'_>, to: &Target<String>, _switched: &str) -> Result<String, String> {
        self.step("gate", h, &to.content)
    }
    fn retire(
        &self,
        h: &HostCx<'_>,
        _live: &Target<String>,
        _from: Option<&Target<String>>,
        _protect: &BTreeSet<String>,
    ) -> Result<(Vec<String>, String), String> {
        self.step("retire", h, "")
            .map(|_| (Vec::new(), String::new()))
    }
}

/// A store in a fresh directory and a config of `n` hosts.
struct World {
    _dir: TempDir,
    store: Store,
    config: Config,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl World {
    fn new(n: usize) -> World {
        World::with(n, "")
    }

    /// `n` hosts and `extra` TOML at the end of the config.
    fn with(n: usize, extra: &str) -> World {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("cutover-protocol-{}-{k}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts: Vec<String> = (0..n).map(|i| format!("\"h{i}\"")).collect();
        let text = format!(
            "app = \"site\"\nhosts = [{}]\n[files]\nroot = \"/srv/fake\"\n[health]\nurl = \"http://127.0.0.1/up\"\n{extra}",
            hosts.join(", ")
        );
        let config = Config::parse(&dir.join("cutover.toml"), &text, None).unwrap();
        World {
            store: Store::open(&dir.join("cutover.db")).unwrap(),
            _dir: TempDir(dir),
            config,
        }
    }

    fn run(
        &self,
        sw: &FakeSwitcher,
        fleet: &FakeFleet,
        kind: RunKind,
        what: What<String>,
    ) -> Outcome {
        let env = Env {
            config: &self.config,
            store: &self.store,
            reporter: &Silent,
            run: None,
        };
        let cand = Candidate {
            what,
            commit: None,
            subject: None,
        };
        execute_on(sw, &env, kind, Early::Ready(cand), &|| {
            // The fleet outlives the run; hand the protocol a view of it.
            Ok(Box::new(Borrowed(fleet)))
        })
    }

    fn deploy(&self, sw: &FakeSwitcher, fleet: &FakeFleet, content: &str) -> Outcome {
        let p = Pinned {
            content: content.into(),
            snap: format!("cfg-{content}"),
            source: format!("dist-{content}"),
        };
        self.run(sw, fleet, RunKind::Deploy, What::New(p))
    }

    fn statuses(&self) -> Vec<(String, String)> {
        self.store
            .releases("site")
            .unwrap()
            .into_iter()
            .map(|r| (r.artifact_sha256, r.status))
            .collect()
    }

    /// `host step state` of every event of a run, in order.
    fn events(&self, o: &Outcome) -> Vec<String> {
        let run = self.store.events(self.run_id(o)).unwrap();
        run.into_iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e.host.as_deref().unwrap_or("-"),
                    e.step,
                    e.phase
                )
            })
            .collect()
    }

    fn run_id(&self, o: &Outcome) -> i64 {
        o.run_id.expect("the run has an id")
    }
}

struct Borrowed<'a>(&'a FakeFleet);
impl Fleet for Borrowed<'_> {
    fn names(&self) -> &[String] {
        self.0.names()
    }
    fn remote(&self, i: usize) -> &dyn Remote {
        self.0.remote(i)
    }
    fn connect(&self, i: usize) -> Result<(), String> {
        self.0.connect(i)
    }
    fn prepare(&self, i: usize, root: &str, holder: &str) -> Result<Prepared, OpError> {
        self.0.prepare(i, root, holder)
    }
    fn take_over(&self, i: usize, root: &str, old: &str, new: &str) -> Result<Prepared, OpError> {
        self.0.take_over(i, root, old, new)
    }
    fn finish(&self, i: usize, root: &str, holder: &str, prune: &[String]) -> Result<(), OpError> {
        self.0.finish(i, root, holder, prune)
    }
}

fn unlocked(fleet: &FakeFleet) -> bool {
    fleet.hosts.iter().all(|h| h.lock.lock().unwrap().is_none())
}

/// Release ids look like `20261204T183600Z-33d810d`: compare messages with them replaced.
fn norm(text: &str, o: &Outcome) -> String {
    let mut t = text.to_string();
    if let Some(r) = &o.release {
        t = t.replace(r.as_str(), "<new>");
    }
    if let Some(p) = &o.previous {
        t = t.replace(p.as_str(), "<prev>");
    }
    t
}

#[test]
fn every_host_healthy_commits_and_no_host_switches_before_every_host_staged() {
    let w = World::new(3);
    let (fleet, sw) = (FakeFleet::new(3), FakeSwitcher::new(3, &[]));
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 0, "{}", o.message);
    assert_eq!(
        norm(&o.message, &o),
        "deployed <new> on 3 host(s); every host passed its health gate"
    );
    let id = o.release.clone().unwrap();
    assert_eq!(sw.serving(), vec![Some(id.clone()); 3]);
    assert_eq!(w.store.live("site").unwrap(), Some(id));
    assert_eq!(
        w.statuses(),
        vec![("c1".to_string(), "succeeded".to_string())]
    );
    let log = sw.log();
    let last_stage = log.iter().rposition(|l| l.starts_with("stage")).unwrap();
    let first_switch = log.iter().position(|l| l.starts_with("switch")).unwrap();
    assert!(last_stage < first_switch, "{log:?}");
    assert!(unlocked(&fleet));
    let ev = w.events(&o);
    // Hosts connect in parallel: which one is recorded first is a race, but the run opens
    // by connecting and every host is connected before any host is staged.
    assert!(ev.first().unwrap().ends_with(" connect start"), "{ev:?}");
    assert_eq!(ev.last().unwrap(), "- run done");
    let first_stage = ev.iter().position(|e| e.contains(" stage ")).unwrap();
    for h in ["h0", "h1", "h2"] {
        let connected = ev
            .iter()
            .position(|e| *e == format!("{h} connect done"))
            .unwrap();
        assert!(connected < first_stage, "{ev:?}");
        let start = ev
            .iter()
            .position(|e| *e == format!("{h} switch start"))
            .unwrap();
        let done = ev
            .iter()
            .position(|e| *e == format!("{h} switch done"))
            .unwrap();
        let gate = ev
            .iter()
            .position(|e| *e == format!("{h} gate done"))
            .unwrap();
        assert!(start < done && done < gate, "{ev:?}");
    }
    assert!(
        ev.iter().position(|e| e == "- commit done") > ev.iter().position(|e| e == "h2 gate done")
    );
}

#[test]
fn one_unhealthy_host_sends_every_host_back_and_the_release_is_rolled_back() {
    let w = World::new(3);
    let (fleet, sw) = (
        FakeFleet::new(3),
        FakeSwitcher::new(3, &[("gate", 1, "c2")]),
    );
    let first = w.deploy(&sw, &fleet, "c1");
    let o = w.deploy(&sw, &fleet, "c2");
    assert_eq!(o.exit_code, 1);
    assert_eq!(
        norm(&o.message, &o),
        "release <new> failed its health gate:\n  h1: gate broke\nEvery host was switched back to <prev> and passed its health gate again."
    );
    assert_eq!(o.previous, first.release);
    assert_eq!(sw.serving(), vec![first.release.clone(); 3]);
    assert_eq!(w.store.live("site").unwrap(), first.release);
    assert_eq!(w.statuses()[0], ("c2".into(), "rolled_back".into()));
    let states: Vec<&str> = o
        .hosts
        .values()
        .map(|h| h.outcome.unwrap().as_str())
        .collect();
    assert_eq!(states, ["reverted", "unhealthy", "reverted"]);
    assert!(sw.log().iter().filter(|l| l.starts_with("back")).count() == 3);
    assert!(unlocked(&fleet));
}

#[test]
fn a_failed_stage_switches_nothing_and_undoes_every_stage() {
    let w = World::new(3);
    let (fleet, sw) = (
        FakeFleet::new(3),
        FakeSwitcher::new(3, &[("stage", 2, "c2")]),
    );
    let first = w.deploy(&sw, &fleet, "c1");
    let o = w.deploy(&sw, &fleet, "c2");
    assert_eq!(o.exit_code, 1);
    assert_eq!(
        o.message,
        "staging failed, so no host was switched; every host still serves what it served:\n  h2: stage broke"
    );
    assert_eq!(sw.serving(), vec![first.release.clone(); 3]);
    assert_eq!(
        sw.log().iter().filter(|l| l.starts_with("unstage")).count(),
        3
    );
    assert!(!sw.log().iter().any(|l| l.starts_with("switch h0 c2")));
    assert_eq!(w.statuses()[0], ("c2".into(), "failed".into()));
    assert!(unlocked(&fleet));
}

#[test]
fn a_first_deploy_that_fails_its_gate_stays_and_says_so() {
    let w = World::new(2);
    let (fleet, sw) = (
        FakeFleet::new(2),
        FakeSwitcher::new(2, &[("gate", 0, "c1")]),
    );
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 1);
    assert_eq!(norm(&o.message, &o), "release <new> failed its health gate and app `site` has no previous release to go back to (this was its first deploy), so the hosts still serve <new>:\n  h0: gate broke\nFix the app or the [health] settings and deploy again.");
    assert_eq!(w.statuses()[0], ("c1".into(), "failed".into()));
    assert_eq!(w.store.live("site").unwrap(), None);
}

#[test]
fn a_revert_that_fails_is_exit_3_and_partial() {
    let w = World::new(2);
    let faults = [("gate", 1, "c2"), ("back", 0, "c1")];
    let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &faults));
    w.deploy(&sw, &fleet, "c1");
    let o = w.deploy(&sw, &fleet, "c2");
    assert_eq!(o.exit_code, 3);
    assert_eq!(o.status, cutover_core::Status::Partial);
    assert_eq!(norm(&o.message, &o), "release <new> failed its health gate:\n  h1: gate broke\nand switching back to <prev> failed on:\n  h0: back broke\nA person must look: run `cutover status` to see what each host serves, fix the host, then `cutover rollback --to <prev>` or deploy again.");
    assert_eq!(w.statuses()[0], ("c2".into(), "partial".into()));
}

#[test]
fn a_failed_switch_is_reverted_like_a_failed_gate() {
    let w = World::new(2);
    let (fleet, sw) = (
        FakeFleet::new(2),
        FakeSwitcher::new(2, &[("switch", 1, "c2")]),
    );
    let first = w.deploy(&sw, &fleet, "c1");
    let o = w.deploy(&sw, &fleet, "c2");
    assert_eq!(o.exit_code, 1);
    assert_eq!(sw.serving(), vec![first.release.clone(); 2]);
    assert!(
        !sw.log().contains(&"gate h1 c2".to_string()),
        "no gate after a failed switch"
    );
}

#[test]
fn an_unreachable_host_touches_no_host_and_no_lock_is_left() {
    let w = World::new(3);
    let mut fleet = FakeFleet::new(3);
    fleet.down.insert(2);
    let sw = FakeSwitcher::new(3, &[]);
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 1);
    assert_eq!(
        o.message,
        "1 of 3 hosts could not be used, so no host was touched:\n  h2: connection refused"
    );
    assert!(sw.log().is_empty());
    assert!(unlocked(&fleet));
    assert_eq!(o.hosts["h2"].outcome.unwrap().as_str(), "unreachable");
}

#[test]
fn a_host_lock_held_by_another_deploy_is_exit_4_and_frees_the_others() {
    let w = World::new(3);
    let fleet = FakeFleet::new(3);
    *fleet.hosts[1].lock.lock().unwrap() = Some("someone else".into());
    let sw = FakeSwitcher::new(3, &[]);
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 4);
    assert_eq!(o.message, "another deploy of app `site` holds the lock on:\n  h1: unknown holder \"someone else\" (remove /srv/fake/.cutover/lock on that host if no deploy runs)");
    assert!(fleet.hosts[0].lock.lock().unwrap().is_none());
    assert!(fleet.hosts[2].lock.lock().unwrap().is_none());
    assert!(sw.log().is_empty());
}

#[test]
fn rollback_marks_the_live_release_bad_and_goes_to_the_one_before() {
    let w = World::new(2);
    let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &[]));
    let r1 = w.deploy(&sw, &fleet, "c1").release.unwrap();
    let r2 = w.deploy(&sw, &fleet, "c2").release.unwrap();
    let o = w.run(&sw, &fleet, RunKind::Rollback, What::Rollback(None));
    assert_eq!(o.exit_code, 0, "{}", o.message);
    assert_eq!(
        o.message,
        format!("rolled back to {r1} on 2 host(s); every host passed its health gate")
    );
    assert_eq!(sw.serving(), vec![Some(r1.clone()); 2]);
    let bad: Vec<bool> = w
        .store
        .releases("site")
        .unwrap()
        .iter()
        .map(|r| r.bad)
        .collect();
    assert_eq!(bad, [true, false], "{r2} is marked bad");
    // Nothing older is left that succeeded and is not bad.
    let o = w.run(&sw, &fleet, RunKind::Rollback, What::Rollback(None));
    assert_eq!(o.exit_code, 2);
    assert!(
        o.message
            .starts_with("app `site` has no release before the live one"),
        "{}",
        o.message
    );
}

#[test]
fn deploying_an_earlier_release_again_marks_nothing_bad() {
    let w = World::new(2);
    let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &[]));
    let r1 = w.deploy(&sw, &fleet, "c1").release.unwrap();
    w.deploy(&sw, &fleet, "c2").release.unwrap();
    let o = w.run(
        &sw,
        &fleet,
        RunKind::Deploy,
        What::Rollback(Some(r1.clone())),
    );
    assert_eq!(o.exit_code, 0, "{}", o.message);
    assert_eq!(
        o.message,
        format!("deployed {r1} on 2 host(s); every host passed its health gate")
    );
    assert_eq!(sw.serving(), vec![Some(r1.clone()); 2]);
    let bad: Vec<bool> = w
        .store
        .releases("site")
        .unwrap()
        .iter()
        .map(|r| r.bad)
        .collect();
    assert_eq!(bad, [false, false], "nothing is marked bad");
    // A rollback from it still goes to the newest good release before it, none here.
    assert_eq!(w.store.live("site").unwrap(), Some(r1));
}

#[test]
fn an_interrupted_deploy_is_reconciled_partial_when_a_host_serves_it_else_failed_unless_committed()
{
    let cases = [
        (true, false, "partial"),
        (false, false, "failed"),
        // The crash came after the commit was recorded: it stays succeeded.
        (true, true, "succeeded"),
    ];
    for (served, committed, want) in cases {
        let w = World::new(2);
        let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &[]));
        w.deploy(&sw, &fleet, "c1");
        // A run that died after switching host 0 (or before switching anything).
        let id = &cutover_core::ReleaseId::new(crate::now_secs() - 5, "dead000", 0).to_string();
        w.store
            .insert_release(&cutover_store::NewRelease {
                id,
                app: "site",
                created_at: "t",
                artifact_sha256: "dead",
                commit: None,
                commit_subject: None,
                source: "x",
                snapshot: "\"cfg\"",
            })
            .unwrap();
        w.store
            .start_run("site", RunKind::Deploy, id, None, "t")
            .unwrap();
        if committed {
            w.store
                .set_status("site", id, cutover_core::Status::Succeeded, None)
                .unwrap();
        }
        if served {
            sw.serving.lock().unwrap()[0] = Some(id.into());
        }
        let o = w.deploy(&sw, &fleet, "c3");
        assert_eq!(o.exit_code, 0, "{}", o.message);
        let status = w.store.release("site", id).unwrap().unwrap().status;
        assert_eq!(status, want);
        assert!(w.store.unfinished_runs("site").unwrap().is_empty());
    }
}

#[test]
fn a_reference_only_hosts_can_pin_is_recorded_after_the_pin() {
    let w = World::new(2);
    let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &[]));
    let what = What::OnHosts {
        reference: "img1".into(),
        source: Some("built from git".into()),
    };
    let o = w.run(&sw, &fleet, RunKind::Deploy, what);
    assert_eq!(o.exit_code, 0, "{}", o.message);
    let r = &w.store.releases("site").unwrap()[0];
    assert_eq!(
        (r.artifact_sha256.as_str(), r.source.as_str()),
        ("img1", "built from git")
    );
    assert_eq!(o.release.as_deref(), Some(r.id.as_str()));
    let log = sw.log();
    assert_eq!(log[0], "pin h0 img1");
    // A pin that fails touches nothing and records no release.
    let sw = FakeSwitcher::new(2, &[("pin", 1, "img2")]);
    let what = What::OnHosts {
        reference: "img2".into(),
        source: None,
    };
    let o = w.run(&sw, &fleet, RunKind::Deploy, what);
    assert_eq!(o.exit_code, 1);
    assert_eq!(w.store.releases("site").unwrap().len(), 1);
    assert!(unlocked(&fleet));
}

#[test]
fn the_app_lock_held_by_a_live_process_is_exit_4_before_anything() {
    let w = World::new(1);
    let (fleet, sw) = (FakeFleet::new(1), FakeSwitcher::new(1, &[]));
    let other = cutover_store::Holder {
        user: "u".into(),
        machine: "elsewhere".into(),
        pid: 1,
        pid_start: 0,
        op: "deploy".into(),
        since: "2026-12-04T00:00:00Z".into(),
    };
    w.store.acquire_lock("site", &other, |_| true).unwrap();
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 4);
    assert!(
        o.message
            .starts_with("another run of app `site` holds the lock: "),
        "{}",
        o.message
    );
    assert!(w.store.releases("site").unwrap().is_empty());
    let _ = (State::Done, Step::Run);
}

const BATCHES: &str = "[deploy]\nbatches = [1, \"50%\", \"100%\"]\n";

/// Where `line` first stands in the switcher's log.
fn pos(log: &[String], line: &str) -> usize {
    log.iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no {line:?} in {log:?}"))
}

#[test]
fn batches_switch_and_gate_one_after_the_other() {
    let w = World::with(4, BATCHES);
    let (fleet, sw) = (FakeFleet::new(4), FakeSwitcher::new(4, &[]));
    let o = w.deploy(&sw, &fleet, "c1");
    assert_eq!(o.exit_code, 0, "{}", o.message);
    let log = sw.log();
    assert!(
        pos(&log, "gate h0 c1") < pos(&log, "switch h1 c1"),
        "{log:?}"
    );
    assert!(
        pos(&log, "gate h1 c1") < pos(&log, "switch h2 c1"),
        "{log:?}"
    );
    assert!(
        pos(&log, "gate h1 c1") < pos(&log, "switch h3 c1"),
        "{log:?}"
    );
    let batches: Vec<String> = w
        .store
        .events(o.run_id.unwrap())
        .unwrap()
        .into_iter()
        .filter(|e| e.step == "batch")
        .map(|e| format!("{} {}", e.phase, e.detail))
        .collect();
    assert_eq!(
        batches,
        [
            "start batch 1 of 3: h0",
            "done batch 1 of 3: h0",
            "start batch 2 of 3: h1",
            "done batch 2 of 3: h1",
            "start batch 3 of 3: h2, h3",
            "done batch 3 of 3: h2, h3",
        ]
    );
}

#[test]
fn a_failure_in_a_batch_reverts_every_host_switched_so_far_and_no_later_one_switches() {
    for (bad, switched) in [(0, 1), (1, 2)] {
        let w = World::with(4, BATCHES);
        let faults = [("gate", bad, "c2")];
        let (fleet, sw) = (FakeFleet::new(4), FakeSwitcher::new(4, &faults));
        let first = w.deploy(&sw, &fleet, "c1");
        let o = w.deploy(&sw, &fleet, "c2");
        assert_eq!(o.exit_code, 1, "{}", o.message);
        assert_eq!(w.statuses()[0], ("c2".into(), "rolled_back".into()));
        assert_eq!(sw.serving(), vec![first.release.clone(); 4]);
        let log = sw.log();
        for i in 0..4 {
            let was_switched = log.contains(&format!("switch h{i} c2"));
            assert_eq!(was_switched, i < switched, "h{i}: {log:?}");
            assert_eq!(
                log.contains(&format!("back h{i} c1")),
                i < switched,
                "h{i}: {log:?}"
            );
            assert_eq!(
                log.contains(&format!("unstage h{i} c2")),
                i >= switched,
                "h{i}: {log:?}"
            );
        }
    }
}

#[test]
fn a_release_that_fails_its_bake_in_a_batch_goes_back_like_a_failed_gate() {
    let w = World::with(
        4,
        "[deploy]\nbatches = [1, \"50%\", \"100%\"]\nbake = \"1s\"\n",
    );
    let faults = [("bake", 1, "c2")];
    let (fleet, sw) = (FakeFleet::new(4), FakeSwitcher::new(4, &faults));
    let first = w.deploy(&sw, &fleet, "c1");
    assert_eq!(first.exit_code, 0, "{}", first.message);
    let log = sw.log();
    assert!(
        pos(&log, "bake h0 c1") < pos(&log, "switch h1 c1"),
        "each batch bakes first: {log:?}"
    );
    let o = w.deploy(&sw, &fleet, "c2");
    assert_eq!(o.exit_code, 1);
    assert_eq!(
        norm(&o.message, &o),
        "release <new> passed its health gate but failed its bake:\n  h1: bake broke\nEvery host was switched back to <prev> and passed its health gate again."
    );
    assert_eq!(sw.serving(), vec![first.release.clone(); 4]);
    assert!(!sw.log().contains(&"switch h2 c2".to_string()));
}

#[test]
fn a_dead_processs_run_is_reconciled_without_a_new_run_and_every_host_goes_back_to_the_live_release(
) {
    // (host 0 serves the dead run's release, its commit was recorded) -> (its status, the
    // run's exit code, what the hosts were switched back).
    let cases = [
        ((true, false), ("rolled_back", 1, vec!["back h0 c1"])),
        ((false, false), ("failed", 1, vec![])),
        ((true, true), ("succeeded", 0, vec![])),
    ];
    for ((served, committed), (want, code, back)) in cases {
        let w = World::new(2);
        let (fleet, sw) = (FakeFleet::new(2), FakeSwitcher::new(2, &[]));
        let first = w.deploy(&sw, &fleet, "c1");
        let live = first.release.clone().unwrap();
        let id = &cutover_core::ReleaseId::new(crate::now_secs() + 5, "dead000", 0).to_string();
        w.store
            .insert_release(&cutover_store::NewRelease {
                id,
                app: "site",
                created_at: "t",
                artifact_sha256: "dead",
                commit: None,
                commit_subject: None,
                source: "x",
                snapshot: "\"cfg\"",
            })
            .unwrap();
        let run = w
            .store
            .start_run("site", RunKind::Deploy, id, Some(&live), "t")
            .unwrap();
        if committed {
            w.store
                .set_status("site", id, cutover_core::Status::Succeeded, None)
                .unwrap();
            w.store.set_live("site", id).unwrap();
            *sw.serving.lock().unwrap() = vec![Some(id.clone()); 2];
        } else if served {
            sw.serving.lock().unwrap()[0] = Some(id.clone());
        }
        // A host lock the dead process left is taken over.
        let dead = cutover_store::Holder {
            user: "x".into(),
            machine: crate::identity::machine(),
            pid: 4_194_304,
            pid_start: 1,
            since: "t".into(),
            op: "deploy".into(),
        };
        *fleet.hosts[1].lock.lock().unwrap() = Some(crate::identity::to_line(&dead));
        let before = w.store.run_rows(None, 100).unwrap().len();
        let env = Env {
            config: &w.config,
            store: &w.store,
            reporter: &Silent,
            run: None,
        };
        let fleet_of =
            || -> Result<Box<dyn Fleet + '_>, DeployError> { Ok(Box::new(Borrowed(&fleet))) };
        // While a host may still be finishing the switch on its own, nothing is done.
        let waiting = FakeSwitcher {
            settle: std::time::Duration::from_secs(3600),
            ..FakeSwitcher::new(2, &[])
        };
        w.store
            .event(
                run,
                "site",
                id,
                None,
                Step::Switch,
                State::Start,
                &crate::now_utc(),
                "",
            )
            .unwrap();
        let r = super::protocol::recover_on(&waiting, &env, "server test", &fleet_of).unwrap();
        assert_eq!(r, None);
        assert_eq!(w.store.unfinished_runs("site").unwrap().len(), 1);
        let got = super::protocol::recover_on(&sw, &env, "server test", &fleet_of)
            .unwrap()
            .unwrap();
        assert_eq!(got.run, run);
        assert_eq!(w.store.release("site", id).unwrap().unwrap().status, want);
        assert_eq!(
            w.store.run_rows(None, 100).unwrap().len(),
            before,
            "no new run"
        );
        let row = w.store.run_row(run).unwrap().unwrap();
        assert_eq!(
            (row.outcome.as_deref(), row.exit_code),
            (Some("interrupted"), Some(code)),
            "{}",
            got.message
        );
        assert!(got.agreed && got.message.starts_with("reconciled by server test: "));
        let switched: Vec<String> = sw
            .log()
            .into_iter()
            .filter(|l| l.starts_with("back "))
            .collect();
        assert_eq!(switched, back);
        let now = w.store.live("site").unwrap().unwrap();
        assert!(sw
            .serving()
            .iter()
            .all(|s| s.as_deref() == Some(now.as_str())));
        assert!(unlocked(&fleet));
        assert_eq!(w.store.lock_holder("site").unwrap(), None);
        // Nothing is left to reconcile.
        let again = super::protocol::recover_on(&sw, &env, "server test", &fleet_of).unwrap();
        assert_eq!(again, None);
    }
}

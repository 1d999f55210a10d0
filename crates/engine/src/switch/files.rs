//! Files apps: pin = pack a directory into the store, streaming it to every host as it is
//! packed (into `releases/stream-<run>.partial`) unless a delta would pay; stage = name a
//! streamed upload, or upload (a delta when the host serves a release whose artifact is
//! still in the store) into `releases/<id>.partial`, then rename; switch = a symlink renamed
//! over `current`, then `reload`; gate = the health URL as the host sees it.

use super::{HostCx, Pinned, SwitchError, Switcher, Target};
use crate::artifact::{ArtifactStore, Limits, Packing, StoredArtifact};
use crate::deploy::{DeployError, Recorder, Via};
use crate::gate::{run_gate, GateSpec};
use crate::hostops::{self, OpError};
use crate::stream::Growing;
use crate::{crash_point, Reporter};
use cutover_core::config::HealthUrl;
use cutover_core::{Config, CrashPoint, FilesConfig, State, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The part of a release that is config: restored together with the artifact on rollback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    root: String,
    reload: Option<String>,
    health_url: String,
    expect: u16,
    timeout_ms: u64,
    interval_ms: u64,
    healthy_after: u32,
    give_up_after_ms: u64,
    /// A files preview's route in the host's edge proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route: Option<Route>,
}

/// A files preview is served by the host's edge proxy as a static target: the route from its
/// host name to `<root>/current`, installed by each switch (the proxy resolves `current` per
/// request, so the switch itself stays the rename of `current`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    /// The host name routed (`pr-<n>-<app>.<domain>`).
    pub domain: String,
    /// Where `cutover setup` installed the proxy.
    pub install_dir: String,
    /// `[proxy] drain`.
    pub drain_ms: u64,
}

impl Settings {
    pub fn from_config(c: &Config, files: &FilesConfig) -> Settings {
        Settings {
            root: files.root.clone(),
            reload: files.reload.clone(),
            health_url: c.health.url.to_string(),
            expect: c.health.expect,
            timeout_ms: c.health.timeout.as_millis() as u64,
            interval_ms: c.health.interval.as_millis() as u64,
            healthy_after: c.health.healthy_after,
            give_up_after_ms: c.health.give_up_after.as_millis() as u64,
            route: files
                .route
                .as_ref()
                .zip(files.proxy.as_ref())
                .map(|(d, p)| Route {
                    domain: d.clone(),
                    install_dir: p.install_dir.clone(),
                    drain_ms: p.drain.as_millis() as u64,
                }),
        }
    }

    fn gate(&self) -> Result<(HealthUrl, GateSpec), String> {
        let url = HealthUrl::parse(&self.health_url)?;
        let host_header = match &self.route {
            // Through the proxy, as the preview's own host name.
            Some(route) => route.domain.clone(),
            None if url.port == 80 => url.host.clone(),
            None => format!("{}:{}", url.host, url.port),
        };
        let spec = GateSpec {
            host_header,
            path: url.path.clone(),
            expect: self.expect,
            timeout: Duration::from_millis(self.timeout_ms),
            interval: Duration::from_millis(self.interval_ms),
            healthy_after: self.healthy_after,
            give_up_after: Duration::from_millis(self.give_up_after_ms),
        };
        Ok((url, spec))
    }
}

/// The files switcher of one app.
pub struct Files<'a> {
    pub(crate) config: &'a Config,
    pub(crate) files: &'a FilesConfig,
    pub(crate) artifacts: &'a ArtifactStore,
    pub(crate) reporter: &'a dyn Reporter,
    deltas: Mutex<HashMap<String, Arc<crate::delta::Delta>>>,
    /// The upload a host unpacked while the artifact was packed (its token and bytes), by
    /// host index: staging only names it (see [`Files::pin`]).
    streamed: Mutex<HashMap<usize, (String, u64)>>,
    /// The directory [`Files::prepin`] packed while the hosts connected, and how that went.
    prepacked: Mutex<Option<(String, Result<StoredArtifact, String>)>>,
    /// The directory [`Files::prepin`] began packing for the hosts to read as it is written.
    early: Mutex<Option<EarlyStream>>,
}

/// A head start (see [`Growing`]): a directory being packed into the store from a thread of
/// its own since the hosts began to connect. Dropped before [`EarlyStream::finish`] (no host
/// will read it: the run stopped, or the tree was refused), it cancels the packing and waits
/// for it, so the packing's temp file is gone before the process exits.
struct EarlyStream {
    dir: String,
    growing: Arc<Growing>,
    packing: Option<std::thread::JoinHandle<Result<StoredArtifact, String>>>,
}

impl EarlyStream {
    fn start(store: &ArtifactStore, dir: &str, limits: Limits) -> EarlyStream {
        let growing = Arc::new(Growing::default());
        let (store, path, g) = (store.clone(), Path::new(dir).to_path_buf(), growing.clone());
        let packing = std::thread::spawn(move || {
            store
                .import_dir_growing(&path, &limits, g)
                .map_err(|e| e.to_string())
        });
        EarlyStream {
            dir: dir.to_string(),
            growing,
            packing: Some(packing),
        }
    }

    /// The packing's outcome, once it is over.
    fn finish(mut self) -> Result<StoredArtifact, String> {
        match self.packing.take().map(|p| p.join()) {
            Some(Ok(r)) => r,
            _ => Err("the packing thread panicked".into()),
        }
    }
}

impl Drop for EarlyStream {
    fn drop(&mut self) {
        if let Some(p) = self.packing.take() {
            self.growing.cancel();
            let _ = p.join();
        }
    }
}

impl<'a> Files<'a> {
    pub fn new(
        config: &'a Config,
        files: &'a FilesConfig,
        artifacts: &'a ArtifactStore,
        reporter: &'a dyn Reporter,
    ) -> Self {
        Files {
            config,
            files,
            artifacts,
            reporter,
            deltas: Mutex::new(HashMap::new()),
            streamed: Mutex::new(HashMap::new()),
            prepacked: Mutex::new(None),
            early: Mutex::new(None),
        }
    }

    /// Whether a delta would pay for some host: it serves a release whose artifact is still
    /// in the store, and a quarter or more of the new tree's file bytes look unchanged from
    /// it (a guess from each file's first bytes, [`crate::delta::shared_percent`]). Then the
    /// artifact is packed first and deltas are made from digests ([`Files::plan_stage`]).
    fn delta_pays(
        &self,
        rec: &Recorder<'_>,
        hosts: &[HostCx<'_>],
        dir: &Path,
        tree: Option<&crate::delta::Manifest>,
    ) -> bool {
        let mut bases = BTreeSet::new();
        for p in hosts.iter().map(|h| h.prepared) {
            if let Some(base) = p.current.as_deref() {
                if p.delta && p.releases.iter().any(|r| r == base) {
                    bases.insert(base.to_string());
                }
            }
        }
        bases
            .iter()
            .any(|base| self.delta_pays_against(rec, base, dir, tree))
    }

    /// Whether a delta of `dir` against release `base` would likely pay (false when `base`'s
    /// artifact is not in the store).
    fn delta_pays_against(
        &self,
        rec: &Recorder<'_>,
        base: &str,
        dir: &Path,
        tree: Option<&crate::delta::Manifest>,
    ) -> bool {
        let Some(art) = rec
            .store
            .release(rec.app, base)
            .ok()
            .flatten()
            .and_then(|r| self.artifacts.get(&r.artifact_sha256))
        else {
            return false;
        };
        match (tree, crate::delta::manifest(self.artifacts, &art)) {
            (Some(tree), Ok(m)) => crate::delta::pays(crate::delta::shared_percent(&m, dir, tree)),
            // No way to guess: pack first and let the digests decide.
            _ => true,
        }
    }

    /// Packs `dir` into the store while every host unpacks the stream as it is produced into
    /// `releases/<token>.partial` (see [`crate::stream`]); staging then gives each its id.
    /// If the packing is refused part-way or any host fails, every streamed upload is removed.
    fn stream(
        &self,
        rec: &Recorder<'_>,
        hosts: &[HostCx<'_>],
        dir: &Path,
        early: EarlyStream,
        total: u64,
    ) -> Result<StoredArtifact, DeployError> {
        let token = format!("stream-{}", rec.run_id);
        let root = self.root();
        self.reporter.note(&format!(
            "packing {} and streaming it to {} host(s) as it is packed",
            dir.display(),
            hosts.len()
        ));
        let (packed, sent) = std::thread::scope(|s| {
            let uploads: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let reader = early.growing.reader();
                    let token = &token;
                    s.spawn(move || -> Result<u64, String> {
                        let (gz, bytes) = reader.open().map_err(|e| e.to_string())?;
                        h.ev(Step::Stage, State::Start, "streamed as it is packed");
                        let mut counting = Counting {
                            inner: bytes,
                            sent: 0,
                            total,
                            host: h.name,
                            reporter: self.reporter,
                            crash_half: h.i == 0,
                            last_report: 0,
                        };
                        let r = hostops::stage_stream(h.remote, root, token, gz, &mut counting);
                        match r {
                            Ok(()) => Ok(counting.sent),
                            Err(e) => {
                                h.ev(Step::Stage, State::Failed, &e.to_string());
                                Err(e.to_string())
                            }
                        }
                    })
                })
                .collect();
            let packed = early.finish();
            let sent: Vec<Result<u64, String>> = uploads
                .into_iter()
                .map(|u| {
                    u.join()
                        .unwrap_or_else(|_| Err("the upload thread panicked".into()))
                })
                .collect();
            (packed, sent)
        });
        let errors: Vec<String> = hosts
            .iter()
            .zip(&sent)
            .filter_map(|(h, r)| r.as_ref().err().map(|e| format!("{}: {e}", h.name)))
            .collect();
        let outcome = match packed {
            Err(e) => Err(DeployError::ArtifactRefusedStreamed(e)),
            Ok(_) if !errors.is_empty() => Err(DeployError::StageFailed {
                release: token.clone(),
                via: Via::Files,
                errors,
            }),
            Ok(stored) => Ok(stored),
        };
        if outcome.is_err() {
            crate::par_map(hosts.len(), self.config.ssh.parallel, |i| {
                hostops::stage_discard(hosts[i].remote, root, &token)
            });
            return outcome;
        }
        let mut streamed = self.streamed.lock().unwrap_or_else(|p| p.into_inner());
        for (h, r) in hosts.iter().zip(sent) {
            streamed.insert(h.i, (token.clone(), r.unwrap_or(0)));
        }
        outcome
    }

    fn meta(&self, to: &Target<Settings>) -> String {
        serde_json::json!({
            "id": to.id,
            "app": self.config.app,
            "artifact_sha256": to.content,
            "commit": to.commit,
            "created": crate::now_utc(),
            "config_digest": crate::sha256_hex(&serde_json::to_string(&to.snap).unwrap_or_default()),
        })
        .to_string()
    }

    fn delta_for(&self, base: &str) -> Option<Arc<crate::delta::Delta>> {
        self.deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base)
            .cloned()
    }

    /// Streams `path` (of `size` bytes) to a host through `send`, counting and reporting;
    /// with `plain`, the tar stream inside the gzip file is sent instead (decoded here, its
    /// CRC checked on the way).
    fn send(
        &self,
        h: &HostCx<'_>,
        path: &std::path::Path,
        size: u64,
        plain: bool,
        send: impl FnOnce(&mut Counting<'_>) -> Result<(), OpError>,
    ) -> Result<u64, OpError> {
        let file = std::fs::File::open(path)
            .map_err(|e| OpError::Host(format!("cannot read {}: {e}", path.display())))?;
        let inner: Box<dyn Read + Send> = if plain {
            Box::new(flate2::read::GzDecoder::new(
                std::io::BufReader::with_capacity(1 << 20, file),
            ))
        } else {
            Box::new(file)
        };
        let mut counting = Counting {
            inner,
            sent: 0,
            total: size,
            host: h.name,
            reporter: self.reporter,
            crash_half: h.i == 0,
            last_report: 0,
        };
        send(&mut counting).map(|()| counting.sent)
    }
}

impl Switcher for Files<'_> {
    type Snap = Settings;
    const STAGES_DIRECTORIES: bool = true;
    type Staged = u64;

    /// Packs `dir` into the store now, while the hosts connect: whole before staging when it
    /// will not be streamed (more hosts than `[ssh] parallel`) or likely will not (a delta
    /// against the live release pays), else as a head start the hosts read as it is written
    /// once they are ready ([`EarlyStream`]). The guess uses history's live release instead
    /// of what the hosts serve, which only `prepare` knows; a wrong guess costs the stream
    /// (the packed artifact is uploaded whole) or the delta (the head start is streamed),
    /// never correctness.
    fn prepin(&self, rec: &Recorder<'_>, dir: &str, hosts: usize) {
        let path = Path::new(dir);
        let limits = Limits::of(self.files);
        let pack = hosts > self.config.ssh.parallel || {
            let Ok((_, tree)) = ArtifactStore::check_dir_tree(path, &limits) else {
                return; // pin says why
            };
            let live = rec.store.live(rec.app).ok().flatten();
            live.is_some_and(|id| self.delta_pays_against(rec, &id, path, tree.as_ref()))
        };
        if !pack {
            // It will likely be streamed: the packing starts now, into the store, and the
            // hosts read the store's file as it grows once they are ready.
            let early = EarlyStream::start(self.artifacts, dir, limits);
            *self.early.lock().unwrap_or_else(|p| p.into_inner()) = Some(early);
            return;
        }
        self.reporter.note(&format!(
            "packing and checking {dir} while the hosts connect"
        ));
        let r = self
            .artifacts
            .import(path, &limits)
            .map_err(|e| e.to_string());
        *self.prepacked.lock().unwrap_or_else(|p| p.into_inner()) = Some((dir.to_string(), r));
    }

    fn pin(
        &self,
        rec: &Recorder<'_>,
        hosts: &[HostCx<'_>],
        dir: &str,
    ) -> Result<Pinned<Settings>, DeployError> {
        let prepacked = self
            .prepacked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(d, _)| d == dir);
        let early = self
            .early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|e| e.dir == dir);
        let path = Path::new(dir);
        let limits = Limits::of(self.files);
        let stored = if let Some((_, r)) = prepacked {
            r.map_err(DeployError::ArtifactRefused)?
        } else {
            let (summary, tree) = ArtifactStore::check_dir_tree(path, &limits)
                .map_err(|e| DeployError::ArtifactRefused(e.to_string()))?;
            // Begun while the hosts connected: streamed even if a host turns out to serve a
            // release a delta could have been made against (a wrong guess costs the delta).
            let early = early.or_else(|| {
                let stream = hosts.len() <= self.config.ssh.parallel
                    && !self.delta_pays(rec, hosts, path, tree.as_ref());
                stream.then(|| EarlyStream::start(self.artifacts, dir, limits))
            });
            if let Some(early) = early {
                self.stream(rec, hosts, path, early, summary.unpacked_bytes)?
            } else {
                self.reporter.note(&format!("packing and checking {dir}"));
                self.artifacts
                    .import(path, &limits)
                    .map_err(|e| DeployError::ArtifactRefused(e.to_string()))?
            }
        };
        Ok(Pinned {
            content: stored.sha256,
            snap: Settings::from_config(self.config, self.files),
            source: dir.to_string(),
        })
    }

    fn root(&self) -> &str {
        &self.files.root
    }

    fn via(&self, _snap: &Settings) -> Via {
        Via::Files
    }

    fn serving(&self, h: &HostCx<'_>) -> Vec<String> {
        h.prepared.current.iter().cloned().collect()
    }

    /// The deltas worth sending: one per distinct release that hosts needing the new release
    /// serve now, when the host can stage from a delta and that release's artifact is still in
    /// the store (see [`crate::delta`]). A delta that cannot be made is noted and the full
    /// artifact is sent.
    fn plan_stage(&self, rec: &Recorder<'_>, to: &Target<Settings>, hosts: &[HostCx<'_>]) {
        let Some(new) = self.artifacts.get(&to.content) else {
            return;
        };
        let mut tried = std::collections::HashSet::new();
        let mut deltas = self.deltas.lock().unwrap_or_else(|p| p.into_inner());
        for p in hosts.iter().map(|h| h.prepared) {
            let Some(base) = p.current.as_deref() else {
                continue;
            };
            if !p.delta
                || p.releases.contains(&to.id)
                || !p.releases.iter().any(|r| r == base)
                || !tried.insert(base.to_string())
            {
                continue;
            }
            let Some(base_art) = rec
                .store
                .release(rec.app, base)
                .ok()
                .flatten()
                .filter(|r| r.artifact_sha256 != to.content)
                .and_then(|r| self.artifacts.get(&r.artifact_sha256))
            else {
                continue;
            };
            let made = crate::delta::manifest(self.artifacts, &base_art)
                .and_then(|m| crate::delta::write_delta(self.artifacts, &new, &m));
            match made {
                Ok(Some(d)) if d.size < new.size => {
                    deltas.insert(base.to_string(), Arc::new(d));
                }
                Ok(_) => {}
                Err(e) => rec.ev(
                    None,
                    Step::Stage,
                    State::Failed,
                    &format!("cannot make a delta against release {base}: {e}; sending the whole artifact"),
                ),
            }
        }
    }

    fn stage(&self, h: &HostCx<'_>, to: &Target<Settings>) -> Result<u64, String> {
        let streamed = self
            .streamed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&h.i);
        if let Some((token, bytes)) = streamed {
            let r = hostops::stage_finish(h.remote, self.root(), &token, &to.id, &self.meta(to));
            return match r {
                Ok(()) => {
                    h.ev(
                        Step::Stage,
                        State::Done,
                        &format!("{bytes} bytes sent (streamed as it was packed)"),
                    );
                    Ok(bytes)
                }
                Err(e) => {
                    h.ev(Step::Stage, State::Failed, &e.to_string());
                    Err(e.to_string())
                }
            };
        }
        if h.prepared.releases.contains(&to.id) {
            h.ev(
                Step::Stage,
                State::Done,
                "already on the host: nothing to upload",
            );
            return Ok(0);
        }
        let Some(art) = self.artifacts.get(&to.content) else {
            let m = format!("release {} is not on the host and its artifact {} is no longer in the artifact store", to.id, to.content);
            h.ev(Step::Stage, State::Failed, &m);
            return Err(m);
        };
        let root = self.root();
        let meta = self.meta(to);
        let base = h.prepared.current.as_deref();
        if let Some((base, delta)) = base.and_then(|b| self.delta_for(b).map(|d| (b, d))) {
            h.ev(Step::Stage, State::Start, &format!(
                "{} bytes: a delta against release {base} ({} files sent, {} unchanged files hard-linked on the host)",
                delta.size, delta.shipped, delta.linked
            ));
            let sent = self.send(h, &delta.path, delta.size, false, |c| {
                hostops::stage_delta(h.remote, root, &to.id, base, &meta, c)
            });
            match sent {
                Ok(sent) => {
                    h.ev(
                        Step::Stage,
                        State::Done,
                        &format!("{sent} bytes sent (delta)"),
                    );
                    return Ok(sent);
                }
                // The connection failed: the full upload would fail the same way.
                Err(e @ OpError::Remote(_)) => {
                    h.ev(Step::Stage, State::Failed, &e.to_string());
                    return Err(e.to_string());
                }
                Err(OpError::Host(m)) => {
                    self.reporter.note(&format!(
                        "{}: staging from a delta failed ({m}); sending the whole artifact instead",
                        h.name
                    ));
                    h.ev(
                        Step::Stage,
                        State::Failed,
                        &format!("delta: {m}; sending the whole artifact"),
                    );
                }
            }
        }
        // Stored without compression: the host is sent the tar stream itself, so it spends
        // no CPU on gzip for data that does not shrink.
        let plain = art.packing == Some(Packing::Stored);
        h.ev(Step::Stage, State::Start, &format!("{} bytes", art.size));
        let r = self.send(h, &art.path, art.size, plain, |c| {
            hostops::stage(h.remote, root, &to.id, &meta, !plain, c)
        });
        match &r {
            Ok(sent) => h.ev(Step::Stage, State::Done, &format!("{sent} bytes sent")),
            Err(e) => h.ev(Step::Stage, State::Failed, &e.to_string()),
        }
        r.map_err(|e| e.to_string())
    }

    fn uploaded(&self, staged: &u64) -> u64 {
        *staged
    }

    fn switch(
        &self,
        h: &HostCx<'_>,
        _from: Option<&Target<Settings>>,
        to: &Target<Settings>,
        _staged: Option<&u64>,
    ) -> Result<String, SwitchError> {
        let out = match hostops::switch(h.remote, self.root(), &to.id, to.snap.reload.as_deref()) {
            Ok(s) => match s.reload {
                Some((code, out)) if code != 0 => Err(SwitchError::Failed(format!(
                    "switched, but reload exited with {code}: {}",
                    last_lines(&out)
                ))),
                Some((_, out)) => Ok(out),
                None => Ok(String::new()),
            },
            Err(e) => Err(SwitchError::Failed(e.to_string())),
        }?;
        match &to.snap.route {
            Some(route) => self.install_route(h, route, &to.snap),
            None => Ok(out),
        }
    }

    fn probe_at(
        &self,
        h: &HostCx<'_>,
        to: &Target<Settings>,
    ) -> Result<(cutover_remote::Endpoint, GateSpec), String> {
        let (url, spec) = to.snap.gate().map_err(|e| format!("bad health URL: {e}"))?;
        let endpoint = h
            .remote
            .forward(&url.host, url.port)
            .map_err(|e| format!("cannot reach {url} from the host: {e}"))?;
        Ok((endpoint, spec))
    }

    fn gate_target(&self, to: &Target<Settings>) -> String {
        to.snap.health_url.clone()
    }

    fn gate(
        &self,
        h: &HostCx<'_>,
        to: &Target<Settings>,
        reload_out: &str,
    ) -> Result<String, String> {
        let (endpoint, spec) = self.probe_at(h, to)?;
        let url = &to.snap.health_url;
        let g = run_gate(&endpoint, &spec);
        if g.healthy {
            return Ok(format!(
                "{url} answered {} {} times in {:.1}s",
                spec.expect,
                spec.healthy_after,
                g.elapsed.as_secs_f64()
            ));
        }
        let mut m = format!(
            "{url} not healthy after {:.1}s ({} probes, wanted {} {} times in a row); last answer: {}",
            g.elapsed.as_secs_f64(),
            g.probes,
            spec.expect,
            spec.healthy_after,
            g.last.describe()
        );
        if !reload_out.trim().is_empty() {
            m.push_str(&format!("; reload output: {}", last_lines(reload_out)));
        }
        Err(m)
    }

    fn retire(
        &self,
        h: &HostCx<'_>,
        live: &Target<Settings>,
        _from: Option<&Target<Settings>>,
        protect: &BTreeSet<String>,
    ) -> Result<(Vec<String>, String), String> {
        let mut on_host = h.prepared.releases.clone();
        on_host.push(live.id.clone());
        let del = cutover_core::plan::prune(&on_host, self.files.keep, protect);
        let detail = del.join(" ");
        Ok((del, detail))
    }
}

impl Files<'_> {
    /// Routes the preview's host name to `<root>/current` in the host's proxy (the proxy
    /// gates it with one probe of the health path first). Idempotent: after the first switch
    /// the route is already there and nothing changes in the proxy.
    fn install_route(
        &self,
        h: &HostCx<'_>,
        route: &Route,
        snap: &Settings,
    ) -> Result<String, SwitchError> {
        use cutover_proxy_wire::{DeployOptions, DeployRequest, Request, Response};
        let path = HealthUrl::parse(&snap.health_url)
            .map(|u| u.path)
            .unwrap_or_else(|_| "/".into());
        let req = Request::Deploy(DeployRequest {
            service: self.config.app.clone(),
            target: format!("{}/current", self.root()),
            health_path: path,
            domains: vec![route.domain.clone()],
            options: DeployOptions {
                health_interval: Duration::from_millis(snap.interval_ms),
                healthy_after: 1,
                give_up_after: Duration::from_millis(snap.give_up_after_ms),
                timeout: Duration::from_millis(snap.timeout_ms),
                drain: Duration::from_millis(route.drain_ms),
            },
        });
        let answer = super::container::proxy_request_at(h.remote, &route.install_dir, &req)
            .map_err(|e| {
                if e.starts_with("proxy: ") && e.contains("health gate") {
                    SwitchError::Unhealthy(e)
                } else {
                    SwitchError::Failed(format!("switched, but the proxy route failed: {e}"))
                }
            })?;
        match answer {
            Response::Deployed(d) if d.created => Ok(format!(
                "proxy routes {} to {} (static)",
                route.domain, d.target
            )),
            Response::Deployed(_) => Ok(String::new()),
            other => Err(SwitchError::Failed(format!(
                "unexpected proxy answer: {other:?}"
            ))),
        }
    }
}

pub(crate) fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Counts the bytes streamed to a host, reports them, and holds the mid-upload crash point.
struct Counting<'a> {
    inner: Box<dyn Read + Send>,
    sent: u64,
    total: u64,
    host: &'a str,
    reporter: &'a dyn Reporter,
    crash_half: bool,
    last_report: u64,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        if self.sent - self.last_report >= 256 * 1024 || n == 0 {
            self.last_report = self.sent;
            self.reporter.bytes(self.host, self.sent, self.total);
        }
        if self.crash_half && self.sent * 2 >= self.total && self.sent > 0 {
            crash_point(CrashPoint::MidUpload);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SITE: &str = r#"
app = "site"
hosts = ["web1"]
[files]
root = "/srv/site"
[health]
url = "http://127.0.0.1/up"
[proxy]
listen = "0.0.0.0:8080"
install_dir = "/srv/cutover"
[preview]
domain = "preview.example.com"
"#;

    /// A preview's settings carry its route, and its gate asks the proxy for the preview's
    /// host name; production's have no route (and read back from older records alike).
    #[test]
    fn a_files_preview_is_gated_through_the_proxy_as_its_own_host() {
        let c = Config::parse(Path::new("/c.toml"), SITE, None).unwrap();
        let prod = Settings::from_config(&c, c.files().unwrap());
        assert_eq!(prod.route, None);
        assert_eq!(prod.gate().unwrap().1.host_header, "127.0.0.1");
        let p = c.preview(4).unwrap();
        let s = Settings::from_config(&p, p.files().unwrap());
        assert_eq!(
            s.route,
            Some(Route {
                domain: "pr-4-site.preview.example.com".into(),
                install_dir: "/srv/cutover".into(),
                drain_ms: 30_000,
            })
        );
        let (url, spec) = s.gate().unwrap();
        assert_eq!((url.port, spec.path.as_str()), (8080, "/up"));
        assert_eq!(spec.host_header, "pr-4-site.preview.example.com");
        // A release recorded before routes existed.
        let mut old = serde_json::to_value(&prod).unwrap();
        assert!(old.get("route").is_none(), "not written when absent");
        old.as_object_mut().unwrap().remove("route");
        let back: Settings = serde_json::from_value(old).unwrap();
        assert_eq!(back, prod);
    }
}

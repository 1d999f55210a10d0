//! Previews: a pull request's own copy of an app (`core::preview` derives its config). A
//! preview deploy is the one protocol ([`crate::deploy::run`]) on the derived config, after
//! the preview is recorded open (so that a crash leaves nothing the store does not know of).
//! Removal tears down, on every preview host, the proxy route, the containers and the state
//! directory (a files preview's releases and `current`, the proxy's static target), and keeps
//! the history.

use crate::artifact::ArtifactStore;
use crate::deploy::{DeployError, Job, Outcome};
use crate::{identity, now_utc, par_map, Hosts, Reporter};
use cutover_core::{AppKind, Config, RunKind};
use cutover_proxy_wire::Request;
use cutover_remote::{Remote, Script};
use cutover_store::{LockOutcome, Store};

/// Deploys pull request `pr`'s preview of `app` (the production config): refused when the
/// app already has `[preview] max` other open previews; else the preview is recorded open
/// with what it is deployed from (`head_ref`), then deployed like any app.
pub fn deploy(
    app: &Config,
    pr: u64,
    head_ref: &str,
    store: &Store,
    artifacts: &ArtifactStore,
    reporter: &dyn Reporter,
    job: impl Into<Job>,
) -> Outcome {
    let job = job.into();
    let config = match app.preview(pr) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::refused(RunKind::Deploy, &app.app, DeployError::Usage(e.to_string()))
        }
    };
    if let Err(e) = admit(app, pr, store) {
        return Outcome::refused(RunKind::Deploy, &config.app, e);
    }
    let url = app.preview_url(pr).unwrap_or_default();
    if let Err(e) = store.open_preview(&app.app, pr, &url, head_ref, &now_utc()) {
        return Outcome::refused(
            RunKind::Deploy,
            &config.app,
            DeployError::Store(e.to_string()),
        );
    }
    let out = crate::deploy::run(&config, store, artifacts, reporter, job);
    if let Some(sha) = &out.commit {
        if let Err(e) = store.set_preview_sha(&app.app, pr, sha, &now_utc()) {
            reporter.note(&format!("warning: not recorded in the history: {e}"));
        }
    }
    out
}

/// `Err` when pull request `pr` would be one preview too many.
pub fn admit(app: &Config, pr: u64, store: &Store) -> Result<(), DeployError> {
    let Some(p) = &app.preview else {
        return Ok(());
    };
    let open = store
        .previews(&app.app, false)
        .map_err(|e| DeployError::Store(e.to_string()))?;
    let others: Vec<String> = open
        .iter()
        .filter(|o| o.pr != pr)
        .map(|o| format!("#{}", o.pr))
        .collect();
    if others.len() >= p.max {
        return Err(DeployError::Usage(format!(
            "{} already has {} open preview(s) ({}) and [preview] max is {}: no preview for #{pr}; remove one first (cutover preview remove --pr N)",
            app.app,
            others.len(),
            others.join(", "),
            p.max
        )));
    }
    Ok(())
}

/// What removing a preview did on one host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostRemoval {
    pub host: String,
    /// Containers removed.
    pub containers: Vec<String>,
    /// `Err`: what could not be removed (the rest was).
    pub result: Result<(), String>,
}

const REMOVE_DIR: &str = "rm -rf -- {dir} && echo REMOVED";

/// Tears pull request `pr`'s preview down on every preview host: the proxy route, every
/// container of the preview, its state directory. The history (its releases, runs and the
/// preview row) is kept; the row is marked removed with `why` once every host is clean.
/// Holds the preview's app lock meanwhile, so no deploy of it runs at the same time.
pub fn remove(app: &Config, pr: u64, why: &str, store: &Store) -> Result<Vec<HostRemoval>, String> {
    remove_after(app, pr, why, store, std::time::Duration::ZERO)
}

/// [`remove`], but while a deploy of the preview holds its lock (a pull request closed during
/// its preview's run), waits for that run to end, up to `wait`, and removes after it.
pub fn remove_after(
    app: &Config,
    pr: u64,
    why: &str,
    store: &Store,
    wait: std::time::Duration,
) -> Result<Vec<HostRemoval>, String> {
    let config = app.preview(pr).map_err(|e| e.to_string())?;
    let me = identity::me("remove", &now_utc());
    let deadline = std::time::Instant::now() + wait;
    loop {
        match store.acquire_lock(&config.app, &me, identity::alive) {
            Err(e) => return Err(e.to_string()),
            Ok(LockOutcome::Held(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Ok(LockOutcome::Held(h)) => {
                return Err(format!(
                    "{} is being deployed ({}): try again when it is done",
                    config.app,
                    identity::describe(&h)
                ))
            }
            Ok(_) => break,
        }
    }
    let result = teardown(&config);
    let done = match &result {
        Ok(hosts) if hosts.iter().all(|h| h.result.is_ok()) => store
            .remove_preview(&app.app, pr, &now_utc(), why)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => Ok(()),
    };
    let _ = store.release_lock(&config.app, &me);
    done?;
    result
}

/// Removes everything of the preview app `config` on its hosts.
pub fn teardown(config: &Config) -> Result<Vec<HostRemoval>, String> {
    let hosts = Hosts::new(config).map_err(|e| format!("cannot prepare SSH: {e}"))?;
    Ok(par_map(hosts.len(), config.ssh.parallel, |i| {
        let r = hosts.get(i);
        let host = config.hosts[i].0.clone();
        match teardown_host(config, r) {
            Ok(containers) => HostRemoval {
                host,
                containers,
                result: Ok(()),
            },
            Err((containers, e)) => HostRemoval {
                host,
                containers,
                result: Err(e),
            },
        }
    }))
}

type Partial = (Vec<String>, String);

fn teardown_host(config: &Config, r: &dyn Remote) -> Result<Vec<String>, Partial> {
    r.connect().map_err(|e| (Vec::new(), e.to_string()))?;
    let mut removed = Vec::new();
    // The route first: no request reaches a container or a directory that is about to go.
    if let Some(proxy) = config.proxy() {
        let req = Request::Remove {
            service: config.app.clone(),
        };
        match crate::switch::container::proxy_request_at(r, &proxy.install_dir, &req) {
            Ok(_) => {}
            Err(e) if e.contains("no such service") => {}
            Err(e) => return Err((removed, format!("removing the proxy route: {e}"))),
        }
    }
    if let AppKind::Container(_) = &config.kind {
        let listed = cutover_docker::list(r, &config.app).map_err(|e| (Vec::new(), e.message()))?;
        removed = listed.into_iter().map(|c| c.name).collect();
        cutover_docker::remove(r, &removed).map_err(|e| (removed.clone(), e.message()))?;
        let left =
            cutover_docker::list(r, &config.app).map_err(|e| (removed.clone(), e.message()))?;
        if !left.is_empty() {
            let names: Vec<String> = left.into_iter().map(|c| c.name).collect();
            return Err((
                removed,
                format!("containers still there: {}", names.join(" ")),
            ));
        }
    }
    let dir = config.state_dir();
    let out = r
        .run(&Script::new(REMOVE_DIR, &[("dir", dir)]), None)
        .map_err(|e| (removed.clone(), e.to_string()))?;
    if !out.stdout.contains("REMOVED") {
        return Err((removed, format!("removing {dir}: {}", out.tail())));
    }
    Ok(removed)
}

const ON_HOST: &str = r#"
docker ps -a --filter label=cutover.app --format '{{.Label "cutover.app"}}' 2>/dev/null
ls -1 {dir} 2>/dev/null
echo LISTED
"#;

/// The pull requests of `app` that have anything on a preview host (a container or a state
/// directory), whatever the store says; `Err` names a host that could not be asked.
pub fn on_hosts(app: &Config) -> Result<std::collections::BTreeSet<u64>, String> {
    let p = app.preview.as_ref().ok_or("no [preview]")?;
    let Some(proxy) = app.proxy() else {
        return Ok(Default::default());
    };
    let probe = Config {
        hosts: p.hosts.clone(),
        ..app.clone()
    };
    let hosts = Hosts::new(&probe).map_err(|e| format!("cannot prepare SSH: {e}"))?;
    let dir = format!("{}/apps", proxy.install_dir);
    let found = par_map(hosts.len(), app.ssh.parallel, |i| {
        let r = hosts.get(i);
        r.connect().map_err(|e| e.to_string())?;
        let out = r
            .run(&Script::new(ON_HOST, &[("dir", &dir)]), None)
            .map_err(|e| e.to_string())?;
        if !out.stdout.contains("LISTED") {
            return Err(format!("{}: {}", r.name(), out.tail()));
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| cutover_core::preview::preview_number(&app.app, l.trim()))
            .collect::<Vec<u64>>())
    });
    let mut all = std::collections::BTreeSet::new();
    for f in found {
        all.extend(f?);
    }
    Ok(all)
}

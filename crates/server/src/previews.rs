//! The previews' reconcile loop: at start and then every `every`, for each app with
//! `[preview]`:
//!
//! 1. a preview idle longer than `ttl` (no deploy since) is removed;
//! 2. anything on a preview host that belongs to a preview the store does not know as open
//!    (a crash between steps, a missed `closed` webhook, a row removed by hand, a preview
//!    `closing` whose removal a restart cut short) is removed;
//! 3. an open preview whose newest run never finished (the server was killed mid-deploy) is
//!    deployed again from its recorded head, so it is finished rather than left half-done.
//!
//! Removal and redeploys go through the same engine calls as the CLI and the webhooks.

use crate::auth::{Principal, Role, Via};
use crate::jobs::{self, Deploy, JobRequest};
use crate::AppState;
use cutover_store::AuditRow;
use std::sync::Arc;
use std::time::Duration;

/// Starts the loop on its own thread.
pub fn start(state: Arc<AppState>, every: Duration) {
    let _ = std::thread::Builder::new()
        .name("preview-reconcile".into())
        .spawn(move || loop {
            reconcile(&state);
            std::thread::sleep(every);
        });
}

fn server() -> Principal {
    Principal {
        name: "server:reconcile".into(),
        role: Role::Deployer,
        apps: None,
        via: Via::Session {
            csrf: String::new(),
        },
    }
}

fn audit(state: &AppState, app: &str, action: &str, detail: String) {
    let _ = state.store.audit(&AuditRow {
        at: cutover_engine::now_utc(),
        who: "server:reconcile".into(),
        action: action.into(),
        app: Some(app.to_string()),
        detail,
        ..AuditRow::default()
    });
}

/// How long a closed pull request's removal waits for the run of its preview in progress.
const CLOSE_WAIT: Duration = Duration::from_secs(3600);

/// Removes pull request `pr`'s preview now, unless a run of it is in progress (in this
/// server: the engine's lock is this process's own, so it would not stop the removal; or in
/// another process). While it removes, no run of the preview starts.
pub fn remove_now(
    state: &AppState,
    config: &cutover_core::Config,
    pr: u64,
    why: &str,
) -> Result<Vec<cutover_engine::preview::HostRemoval>, String> {
    let name = cutover_core::preview::preview_app(&config.app, pr);
    let Some(_reserved) = state.jobs.reserve(&name, why) else {
        return Err(format!(
            "{name} is being deployed (a run of this server): try again when it is done"
        ));
    };
    cutover_engine::preview::remove(config, pr, why, &state.store)
}

/// A pull request was closed: its waiting push (if any) is dropped and, on a thread of its
/// own, the preview is removed once the run of it in progress (if any) has ended; meanwhile
/// no new run of it starts.
pub fn close(
    state: &Arc<AppState>,
    config: cutover_core::Config,
    pr: u64,
    why: String,
) -> std::io::Result<()> {
    let state = state.clone();
    std::thread::Builder::new()
        .name(format!("preview-close-{pr}"))
        .spawn(move || {
            let name = cutover_core::preview::preview_app(&config.app, pr);
            crate::hooks::drop_waiting(&state, &config.app, pr, "the pull request was closed");
            // No longer open: a server restarted before the removal removes it at its start.
            if let Err(e) = state.store.close_preview(&config.app, pr, &why) {
                eprintln!("preview #{pr} of {}: {e}", config.app);
            }
            let deadline = std::time::Instant::now() + CLOSE_WAIT;
            let reserved = loop {
                if let Some(r) = state.jobs.reserve(&name, &why) {
                    break r;
                }
                if std::time::Instant::now() > deadline {
                    eprintln!(
                        "preview #{pr} of {} not removed ({why}): its run did not end within {}",
                        config.app,
                        cutover_core::duration::format_duration(CLOSE_WAIT)
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            // A run of another process (the CLI) holds the lock: the removal waits for it too.
            let r =
                cutover_engine::preview::remove_after(&config, pr, &why, &state.store, CLOSE_WAIT);
            drop(reserved);
            report(&state, &config, pr, &why, r);
        })
        .map(|_| ())
}

fn remove(state: &AppState, config: &cutover_core::Config, pr: u64, why: &str) {
    report(state, config, pr, why, remove_now(state, config, pr, why));
}

/// Logs (and audits) what a removal did.
fn report(
    state: &AppState,
    config: &cutover_core::Config,
    pr: u64,
    why: &str,
    result: Result<Vec<cutover_engine::preview::HostRemoval>, String>,
) {
    match result {
        Ok(hosts) => {
            let failed: Vec<String> = hosts
                .iter()
                .filter_map(|h| h.result.as_ref().err().map(|e| format!("{}: {e}", h.host)))
                .collect();
            if failed.is_empty() {
                eprintln!("preview #{pr} of {} removed: {why}", config.app);
                audit(
                    state,
                    &config.app,
                    "preview removed",
                    format!("#{pr}: {why}"),
                );
            } else {
                eprintln!(
                    "preview #{pr} of {} not fully removed ({why}): {}",
                    config.app,
                    failed.join("; ")
                );
            }
        }
        Err(e) => eprintln!("preview #{pr} of {} not removed ({why}): {e}", config.app),
    }
}

/// One pass over every app with `[preview]`.
pub fn reconcile(state: &Arc<AppState>) {
    let now = cutover_engine::now_secs();
    for config in state.apps.values() {
        let Some(p) = &config.preview else {
            continue;
        };
        let open = match state.store.previews(&config.app, false) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("previews of {}: {e}", config.app);
                continue;
            }
        };
        let mut kept = std::collections::BTreeSet::new();
        for o in &open {
            let name = cutover_core::preview::preview_app(&config.app, o.pr);
            let busy = state.jobs.is_running_app(&name)
                || state
                    .store
                    .lock_holder(&name)
                    .ok()
                    .flatten()
                    .is_some_and(|h| cutover_engine::identity::alive(&h));
            if busy {
                kept.insert(o.pr);
                continue;
            }
            let idle = cutover_core::parse_utc(&o.updated_at).map(|t| now.saturating_sub(t));
            if idle.is_some_and(|i| i > p.ttl.as_secs()) {
                let why = format!(
                    "idle longer than [preview] ttl ({})",
                    cutover_core::duration::format_duration(p.ttl)
                );
                remove(state, config, o.pr, &why);
                continue;
            }
            kept.insert(o.pr);
            let interrupted = state
                .store
                .unfinished_runs(&name)
                .map(|r| !r.is_empty())
                .unwrap_or(false);
            if interrupted {
                // Built from git: the recorded commit; else the image it was given.
                let (head, what) = match &o.head_sha {
                    Some(sha) => (sha.clone(), Deploy::Ref(sha.clone())),
                    None if config.build.is_some() && o.head_ref.len() == 40 => {
                        (o.head_ref.clone(), Deploy::Ref(o.head_ref.clone()))
                    }
                    None => (o.head_ref.clone(), Deploy::Image(o.head_ref.clone())),
                };
                let req = JobRequest::Preview { pr: o.pr, what };
                let from = std::net::IpAddr::from([127, 0, 0, 1]);
                match jobs::submit(state, &config.app, req, &server(), from) {
                    Ok(run) => audit(
                        state,
                        &config.app,
                        "preview redeployed",
                        format!(
                            "#{}: its last run was interrupted; run {run} deploys {head} again",
                            o.pr
                        ),
                    ),
                    Err(e) => eprintln!("preview #{} of {}: not redeployed: {e}", o.pr, config.app),
                }
            }
        }
        match cutover_engine::preview::on_hosts(config) {
            Ok(found) => {
                // Read again: a preview opened (by the CLI, say) since `open` was read is
                // recorded before anything of it is on a host, so it is in this list.
                let now_open: std::collections::BTreeSet<u64> =
                    match state.store.previews(&config.app, false) {
                        Ok(o) => o.iter().map(|o| o.pr).collect(),
                        Err(e) => {
                            eprintln!("previews of {}: {e}", config.app);
                            continue;
                        }
                    };
                for pr in found.difference(&kept) {
                    if now_open.contains(pr) {
                        continue;
                    }
                    let name = cutover_core::preview::preview_app(&config.app, *pr);
                    if state.jobs.is_running_app(&name) {
                        continue;
                    }
                    // Closed during a run that a restart cut short: as the close said.
                    let why = match state.store.preview(&config.app, *pr) {
                        Ok(Some(p)) if p.state == "closing" => p.removed_why,
                        _ => "on a preview host but not an open preview the server knows".into(),
                    };
                    remove(state, config, *pr, &why);
                }
            }
            Err(e) => eprintln!("previews of {} on the hosts: {e}", config.app),
        }
    }
}

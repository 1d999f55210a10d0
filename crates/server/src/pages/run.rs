//! A run's page: the events recorded so far, server-rendered, then followed live by the
//! script over `/api/runs/{run}/events` (SSE, the session cookie): each new event is appended,
//! each host's row shows its latest step, and the stream's final `end` event sets
//! `#run-status` and, when the run failed, the diagnosis. Without JS the page shows the run as
//! it was when loaded (reload to see more).

use super::{layout, status_class, when, PageError, PageResult};
use crate::api::{run_view, visible_run};
use crate::auth::PageAuth;
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use maud::html;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Events rendered into the page; the rest arrive over SSE.
const MAX_EVENTS: u32 = 5000;

pub(crate) async fn run(
    State(st): State<Arc<AppState>>,
    PageAuth(p): PageAuth,
    Path(run): Path<i64>,
) -> PageResult {
    let r = visible_run(&st, &p, run).map_err(|e| PageError::from(e).for_user(&p))?;
    let view = run_view(&st, &r);
    let events = st.store.events_after(run, 0, MAX_EVENTS)?;
    let final_ = view.status != "running";
    let release = match &view.release {
        Some(id) => st.store.release(&r.app, id)?,
        None => None,
    };
    // Each host of the app, then any host the events name, with its latest step.
    let mut hosts: BTreeMap<String, (String, String)> = BTreeMap::new();
    if let Ok(c) = st.app(&r.app) {
        for (h, _) in &c.hosts {
            hosts.insert(h.clone(), (String::new(), String::new()));
        }
    }
    for e in &events {
        if let Some(h) = &e.host {
            hosts.insert(h.clone(), (e.step.clone(), e.phase.clone()));
        }
    }
    let body = html! {
        div #run data-events=(format!("/api/runs/{run}/events")) {
            h1 { "Run " (run) ": " (view.kind) " of " a href={ "/apps/" (view.app) } { (view.app) } }
            p {
                "Status: " span #run-status class=(status_class(&view.status)) data-final=(if final_ { "1" } else { "0" }) { (view.status) }
            }
            p.muted {
                @if let Some(rel) = &view.release { "Release " code #release { (rel) } " " }
                @if let Some(c) = release.as_ref().and_then(|r| r.commit.as_deref()) {
                    "(" code.sha title=(c) { (c.get(..7).unwrap_or(c)) } " "
                    span.subject #subject { (release.as_ref().and_then(|r| r.commit_subject.as_deref()).unwrap_or("")) }
                    ") "
                }
                br;
                "Started " (when(&view.started)) " by " (view.by.as_deref().unwrap_or("cli"))
                ". Finished " span #finished { (view.finished.as_deref().map(when).unwrap_or_default()) }
            }
            p.error #diagnosis {
                @if final_ && view.status != "succeeded" { (view.message.as_deref().unwrap_or("")) }
            }
            h2 { "Hosts" }
            div.table-wrap {
                table #hosts {
                    thead { tr { th { "Host" } th { "Step" } th { "State" } } }
                    tbody {
                        @for (h, (step, state)) in &hosts {
                            tr data-host=(h) {
                                td { (h) }
                                td.step { (step) }
                                td.state { (state) }
                            }
                        }
                    }
                }
            }
            h2 { "Events" }
            ol #events {
                @for e in &events {
                    li data-seq=(e.seq) {
                        span.time { (when(&e.at)) " " }
                        span.host { (e.host.as_deref().unwrap_or("")) " " }
                        span.step { (e.step) " " }
                        span.state { (e.phase) " " }
                        span.detail { (e.detail) }
                    }
                }
            }
        }
    };
    Ok(layout(&format!("Run {run}"), Some(&p), body).into_response())
}

//! A run's page: the events recorded so far, server-rendered, then followed live by the
//! script over `/api/runs/{run}/events` (SSE, the session cookie): each new event is appended,
//! each host's row shows its latest step, and the stream's final `end` event sets
//! `#run-status` and, when the run failed, the diagnosis. `#release` and `#commit` (the commit
//! and `#subject`, hidden until known) are always there: a page loaded before the run chose its
//! release gets them from the first event naming it (as text). Without JS the page shows the run as
//! it was when loaded (reload to see more).
//!
//! A bake's counts get a table (`#bake`): per host, its latest `bake` event read back into each
//! release's requests, 5xx, unanswered, failed share and p99, and the verdict
//! ([`bake_rows`]; the SSE stream carries the same rows with each `bake` event).

use super::{layout, status_class, when, PageError, PageResult};
use crate::api::{run_view, visible_run};
use crate::auth::PageAuth;
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use maud::html;
use serde::Serialize;
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
    let commit = release.as_ref().and_then(|r| r.commit.as_deref());
    // Each host of the app, then any host the events name, with its latest step.
    let mut hosts: BTreeMap<String, (String, String)> = BTreeMap::new();
    if let Ok(c) = st.app(&r.app) {
        for (h, _) in &c.hosts {
            hosts.insert(h.clone(), (String::new(), String::new()));
        }
    }
    // Each host's bake as its latest bake event says it.
    let mut bakes: BTreeMap<String, Vec<BakeRow>> = BTreeMap::new();
    for e in &events {
        if let Some(h) = &e.host {
            hosts.insert(h.clone(), (e.step.clone(), e.phase.clone()));
            if let Some(rows) = bake_rows(h, &e.step, &e.phase, &e.detail) {
                bakes.insert(h.clone(), rows);
            }
        }
    }
    let body = html! {
        div #run data-events=(format!("/api/runs/{run}/events")) {
            h1 { "Run " (run) ": " (view.kind) " of " a href={ "/apps/" (view.app) } { (view.app) } }
            p {
                "Status: " span #run-status class=(status_class(&view.status)) data-final=(if final_ { "1" } else { "0" }) { (view.status) }
            }
            p.muted {
                // Always there: the script fills them in when the run records its release.
                "Release " code #release { (view.release.as_deref().unwrap_or(if final_ { "none" } else { "not chosen yet" })) } " "
                span #commit hidden[commit.is_none()] {
                    "(" code.sha title=(commit.unwrap_or("")) { (super::app::short(commit.unwrap_or(""))) } " "
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
            div #bake-section hidden[bakes.is_empty()] {
                h2 { "Bake" }
                div.table-wrap {
                    table #bake {
                        thead { tr {
                            th { "Host" } th { "Bake" } th { "Release" } th { "Requests" } th { "5xx" }
                            th { "Unanswered" } th { "Failed" } th { "p99" } th { "Verdict" }
                        } }
                        tbody {
                            @for row in bakes.values().flatten() {
                                tr data-host=(row.host) {
                                    @for c in row.cells() { td { (c) } }
                                }
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

/// One row of the bake table: one release of one host's bake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct BakeRow {
    pub host: String,
    /// `baking`, `passed`, `failed`.
    pub state: String,
    /// `new <release>`, `old <release>`; empty when the line names no release.
    pub release: String,
    pub requests: String,
    pub errors_5xx: String,
    pub failures: String,
    /// The failed share, `5.0%`.
    pub rate: String,
    /// `<= 20 ms`, `> 5000 ms`, `–`.
    pub p99: String,
    /// On the host's first row: the probes, the verdict and what the proxy did.
    pub verdict: String,
}

impl BakeRow {
    /// The cells in the table's order.
    pub(crate) fn cells(&self) -> [&str; 9] {
        [
            &self.host,
            &self.state,
            &self.release,
            &self.requests,
            &self.errors_5xx,
            &self.failures,
            &self.rate,
            &self.p99,
            &self.verdict,
        ]
    }
}

/// The bake rows of an event (`None` unless it is a host's bake `output`, `done` or `failed`):
/// its detail read back by `cutover_proxy_wire::read_bake` into each release's counts.
pub(crate) fn bake_rows(host: &str, step: &str, phase: &str, detail: &str) -> Option<Vec<BakeRow>> {
    let state = match (step, phase) {
        ("bake", "output") => "baking",
        ("bake", "done") => "passed",
        ("bake", "failed") => "failed",
        _ => return None,
    };
    let line = cutover_proxy_wire::read_bake(detail);
    let mut verdict: Vec<String> = Vec::new();
    if let Some((failed, probes)) = line.probes {
        verdict.push(format!("{failed} of {probes} probes failed"));
    }
    if !line.rest.is_empty() {
        verdict.push(line.rest.clone());
    }
    let empty = BakeRow {
        host: host.to_string(),
        state: state.to_string(),
        release: String::new(),
        requests: String::new(),
        errors_5xx: String::new(),
        failures: String::new(),
        rate: String::new(),
        p99: String::new(),
        verdict: verdict.join("; "),
    };
    if line.releases.is_empty() {
        return Some(vec![empty]);
    }
    let dash = || "–".to_string();
    let rows = line
        .releases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let counted = c.requests.is_some();
            BakeRow {
                release: format!("{} {}", c.role, c.release),
                requests: c.requests.map(|n| n.to_string()).unwrap_or_else(dash),
                errors_5xx: if counted {
                    c.errors_5xx.to_string()
                } else {
                    dash()
                },
                failures: if counted {
                    c.failures.to_string()
                } else {
                    dash()
                },
                rate: if counted { c.rate.clone() } else { dash() },
                p99: match c.p99.strip_prefix("p99 ") {
                    Some(p) => p.to_string(),
                    None => dash(),
                },
                verdict: if i == 0 {
                    empty.verdict.clone()
                } else {
                    String::new()
                },
                ..empty.clone()
            }
        })
        .collect();
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bake_event_becomes_one_row_per_release() {
        let d = "new release r2: 40 of 200 requests failed (20.0%: 38 5xx, 2 unanswered), p99 <= 20 ms; old release r1: 0 of 900 requests failed (0.0%), p99 <= 1 ms; above max_error_rate 0.05 and the old release's rate; the proxy swapped back to 127.0.0.1:4 (gate 2 ms, drained true in 0 ms)";
        let rows = bake_rows("web1", "bake", "failed", d).unwrap();
        let cells: Vec<Vec<&str>> = rows.iter().map(|r| r.cells().to_vec()).collect();
        assert_eq!(
            cells,
            [
                vec!["web1", "failed", "new r2", "200", "38", "2", "20.0%", "<= 20 ms", "above max_error_rate 0.05 and the old release's rate; the proxy swapped back to 127.0.0.1:4 (gate 2 ms, drained true in 0 ms)"],
                vec!["web1", "failed", "old r1", "900", "0", "0", "0.0%", "<= 1 ms", ""],
            ]
        );
        let live = "bake baking of 127.0.0.1:4: new release r2: 0 of 0 requests failed (0.0%), no p99; old release (none): no counts; 0 of 3 probes failed";
        let rows = bake_rows("web1", "bake", "output", live).unwrap();
        let cells: Vec<Vec<&str>> = rows.iter().map(|r| r.cells().to_vec()).collect();
        assert_eq!(
            cells,
            [
                vec![
                    "web1",
                    "baking",
                    "new r2",
                    "0",
                    "0",
                    "0",
                    "0.0%",
                    "–",
                    "0 of 3 probes failed"
                ],
                vec!["web1", "baking", "old (none)", "–", "–", "–", "–", "–", ""],
            ]
        );
        // A files app's bake (probes only) is one row with its words.
        let files = "0 of 10 probes of /up failed in 5s (max_error_rate 0.01)";
        let rows = bake_rows("web1", "bake", "done", files).unwrap();
        assert_eq!(rows[0].cells()[8], files);
        assert_eq!(bake_rows("web1", "bake", "start", "x"), None);
        assert_eq!(bake_rows("web1", "gate", "done", "x"), None);
    }
}

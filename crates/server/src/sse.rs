//! `GET /api/runs/{run}/events`: a run's events as Server-Sent Events, tailed from the store's
//! events table (so a CLI run on the same data directory streams too). Each event is
//! `id: <seq>` and `data: <one JSON event>` of the `--events` line's shape (a host's `bake`
//! event also carries `bake`, its rows of the run page's bake table); `Last-Event-ID`
//! resumes after that seq. The stream ends with `event: end` carrying the run as
//! `GET /api/runs/{run}` shows it.
//!
//! **Invariant:** the run's status is read *before* the last look at the events, so an event
//! written just before the run ended is never missed.

use crate::api::{run_view, visible_run};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often the store is looked at while a run goes on.
const POLL: Duration = Duration::from_millis(100);

/// One event as `--events` prints it.
#[derive(Serialize)]
struct Line<'a> {
    event: &'static str,
    run: i64,
    seq: i64,
    app: &'a str,
    release: &'a str,
    host: Option<&'a str>,
    step: &'a str,
    state: &'a str,
    time: &'a str,
    detail: &'a str,
    /// A host's bake event read into the run page's rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    bake: Option<Vec<crate::pages::run::BakeRow>>,
}

struct Tail {
    st: Arc<AppState>,
    run: i64,
    app: String,
    after: i64,
    queue: VecDeque<cutover_store::Event>,
    ended: bool,
}

pub(crate) async fn events(
    State(st): State<Arc<AppState>>,
    p: Principal,
    Path(run): Path<i64>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let r = visible_run(&st, &p, run)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let tail = Tail {
        st,
        run,
        app: r.app,
        after,
        queue: VecDeque::new(),
        ended: false,
    };
    let s = stream::unfold(tail, |mut t| async move {
        loop {
            if t.ended {
                return None;
            }
            if let Some(e) = t.queue.pop_front() {
                t.after = e.seq;
                let line = Line {
                    event: "step",
                    run: e.run_id,
                    seq: e.seq,
                    app: &t.app,
                    release: &e.release_id,
                    host: e.host.as_deref(),
                    step: &e.step,
                    state: &e.phase,
                    time: &e.at,
                    detail: &e.detail,
                    bake: e.host.as_deref().and_then(|h| {
                        crate::pages::run::bake_rows(h, &e.step, &e.phase, &e.detail)
                    }),
                };
                let data = serde_json::to_string(&line).unwrap_or_default();
                let ev = Event::default().id(e.seq.to_string()).data(data);
                return Some((Ok(ev), t));
            }
            // The status first, then the events: an event written before the end is seen.
            let row = t.st.store.run_row(t.run).ok().flatten();
            let running = row
                .as_ref()
                .is_some_and(|r| crate::jobs::run_status(&t.st, r) == "running");
            let fresh =
                t.st.store
                    .events_after(t.run, t.after, 500)
                    .unwrap_or_default();
            if !fresh.is_empty() {
                t.queue.extend(fresh);
                continue;
            }
            if !running {
                t.ended = true;
                let view = row.map(|r| run_view(&t.st, &r));
                let data = serde_json::to_string(&view).unwrap_or_default();
                return Some((Ok(Event::default().event("end").data(data)), t));
            }
            tokio::time::sleep(POLL).await;
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

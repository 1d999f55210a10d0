//! `GET /api/runs/{run}/events`: a run's events as Server-Sent Events, tailed from the store's
//! events table (so a CLI run on the same data directory streams too). Each event is
//! `id: <seq>` and `data: <one JSON event>` of the `--events` line's shape (a host's `bake`
//! event also carries `bake`, its rows of the run page's bake table; the first event naming a
//! release carries its `commit` and `commit_subject`, if it has them); `Last-Event-ID`
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
use futures_util::stream::{self, Stream, StreamExt};
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
    /// The release's commit and its subject, on the stream's first event naming the release.
    #[serde(skip_serializing_if = "Option::is_none")]
    commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_subject: Option<String>,
}

struct Tail {
    st: Arc<AppState>,
    run: i64,
    app: String,
    after: i64,
    queue: VecDeque<cutover_store::Event>,
    ended: bool,
    /// The release whose commit this stream sent last (the run page fills it in late).
    named: String,
}

impl Tail {
    /// The commit and subject of `release` if the stream has not named it yet.
    fn commit_of(&mut self, release: &str) -> (Option<String>, Option<String>) {
        if release.is_empty() || release == self.named {
            return (None, None);
        }
        self.named = release.to_string();
        match self.st.store.release(&self.app, release) {
            Ok(Some(r)) => (r.commit, r.commit_subject),
            _ => (None, None),
        }
    }
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
    let s = tail(st, run, r.app, after).map(|m| {
        let ev = match m.seq {
            Some(seq) => Event::default().id(seq.to_string()),
            None => Event::default().event("end"),
        };
        Ok(ev.data(m.data))
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One message of the stream: a step (its seq, the SSE id) or the end (no seq).
struct Message {
    seq: Option<i64>,
    data: String,
}

/// The run's events after seq `after`, then the end with the run.
fn tail(st: Arc<AppState>, run: i64, app: String, after: i64) -> impl Stream<Item = Message> {
    let tail = Tail {
        st,
        run,
        app,
        after,
        queue: VecDeque::new(),
        ended: false,
        named: String::new(),
    };
    stream::unfold(tail, |mut t| async move {
        loop {
            if t.ended {
                return None;
            }
            if let Some(e) = t.queue.pop_front() {
                t.after = e.seq;
                let (commit, commit_subject) = t.commit_of(&e.release_id);
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
                    commit,
                    commit_subject,
                };
                let data = serde_json::to_string(&line).unwrap_or_default();
                return Some((
                    Message {
                        seq: Some(e.seq),
                        data,
                    },
                    t,
                ));
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
                return Some((Message { seq: None, data }, t));
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_core::{RunKind, State, Status, Step};
    use futures_util::StreamExt;

    /// A run page loaded before its run chose a release learns it, with its commit and
    /// subject, from the stream: the first event naming the release carries them.
    #[test]
    fn the_first_event_naming_a_release_carries_its_commit_and_subject() {
        let data = std::env::temp_dir().join(format!(
            "cutover-sse-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let st = AppState::new(crate::Options {
            data: data.clone(),
            database: None,
            apps: Vec::new(),
            public_url: None,
        })
        .unwrap();
        let at = "2026-12-05T02:33:39Z";
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let subject = "<script>alert(1)</script>";
        let s = &st.store;
        s.insert_release(&cutover_store::NewRelease {
            id: "r1",
            app: "site",
            created_at: at,
            artifact_sha256: "",
            commit: Some(sha),
            commit_subject: Some(subject),
            source: "git",
            snapshot: "",
        })
        .unwrap();
        let run = s
            .start_run("site", RunKind::Rollback, "", None, at)
            .unwrap();
        s.event(run, "site", "", None, Step::Run, State::Start, at, "")
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut stream = Box::pin(tail(st.clone(), run, "site".into(), 0));
        let mut got: Vec<Message> = rt.block_on(stream.next()).into_iter().collect();
        // The run chooses its release after the page and its stream started.
        s.set_run_release(run, "r1").unwrap();
        for state in [State::Start, State::Done] {
            s.event(run, "site", "r1", None, Step::Switch, state, at, "")
                .unwrap();
        }
        s.finish_run(run, Status::Succeeded, at).unwrap();
        got.extend(rt.block_on(stream.collect::<Vec<Message>>()));
        let json = |m: &Message| serde_json::from_str::<serde_json::Value>(&m.data).unwrap();
        let named: Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> = got
            .iter()
            .map(json)
            .map(|v| {
                (
                    v["release"].clone(),
                    v["commit"].clone(),
                    v["commit_subject"].clone(),
                )
            })
            .collect();
        let null = serde_json::Value::Null;
        assert_eq!(
            named,
            [
                ("".into(), null.clone(), null.clone()),
                ("r1".into(), sha.into(), subject.into()),
                ("r1".into(), null.clone(), null.clone()),
                ("r1".into(), null.clone(), null.clone()),
            ]
        );
        assert_eq!(got.last().unwrap().seq, None, "the end, with the run");
        drop(st);
        let _ = std::fs::remove_dir_all(data);
    }
}

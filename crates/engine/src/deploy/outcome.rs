//! What a run did, for people, for `--json` and for the last line of `--events`.

use super::error::DeployError;
use cutover_core::{HostState, RunKind, Status};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;

fn spelled<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text)
}

fn kind_str<S: Serializer>(k: &RunKind, s: S) -> Result<S::Ok, S::Error> {
    spelled(k.as_str(), s)
}

fn status_str<S: Serializer>(k: &Status, s: S) -> Result<S::Ok, S::Error> {
    spelled(k.as_str(), s)
}

fn host_state_str<S: Serializer>(k: &Option<HostState>, s: S) -> Result<S::Ok, S::Error> {
    spelled(k.map_or("", HostState::as_str), s)
}

/// What happened on one host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostOutcome {
    /// How far the host got (empty: the run never reached it).
    #[serde(serialize_with = "host_state_str")]
    pub outcome: Option<HostState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub uploaded_bytes: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    #[serde(serialize_with = "kind_str")]
    pub kind: RunKind,
    pub app: String,
    pub release: Option<String>,
    pub previous: Option<String>,
    #[serde(serialize_with = "status_str")]
    pub status: Status,
    pub exit_code: i32,
    pub message: String,
    pub hosts: BTreeMap<String, HostOutcome>,
    /// The full commit id of the release, when it was built from git.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_subject: Option<String>,
    /// Why it ended badly (`None`: done and verified). Not part of `--json`: its text is
    /// `message`, its exit code `exit_code`.
    #[serde(skip)]
    pub error: Option<DeployError>,
    /// The run's id in the history, once it has one.
    #[serde(skip)]
    pub run_id: Option<i64>,
}

impl Outcome {
    /// A run that ended before any host was touched.
    pub fn refused(kind: RunKind, app: &str, e: DeployError) -> Outcome {
        let mut o = Outcome::new(kind, app, &[]);
        o.end(Err(e));
        o
    }

    pub(crate) fn new(kind: RunKind, app: &str, hosts: &[String]) -> Outcome {
        Outcome {
            kind,
            app: app.into(),
            release: None,
            previous: None,
            status: Status::Failed,
            exit_code: crate::exit::FAILED,
            message: String::new(),
            hosts: hosts
                .iter()
                .map(|h| (h.clone(), HostOutcome::default()))
                .collect(),
            commit: None,
            commit_subject: None,
            error: None,
            run_id: None,
        }
    }

    /// Sets status, exit code and message from how the run ended.
    pub(crate) fn end(&mut self, r: Result<String, DeployError>) {
        match r {
            Ok(message) => {
                self.status = Status::Succeeded;
                self.exit_code = crate::exit::OK;
                self.message = message;
                self.error = None;
            }
            Err(e) => {
                self.status = e.status();
                self.exit_code = e.exit_code();
                self.message = e.to_string();
                self.error = Some(e);
            }
        }
    }

    pub(crate) fn host(&mut self, name: &str) -> &mut HostOutcome {
        self.hosts.entry(name.to_string()).or_default()
    }
}

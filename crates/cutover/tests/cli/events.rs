//! `deploy|rollback --events`: one JSON object per line on stdout as each step starts and
//! ends, steps in protocol order, and a last line that is the outcome `--json` prints.

use crate::world::World;
use serde_json::Value;
use std::collections::BTreeMap;

/// The step lines and the outcome line of an `--events` stdout, checked line by line.
fn stream(stdout: &str) -> (Vec<Value>, Value) {
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l:?}: {e}"))
        })
        .collect();
    let outcome = lines.pop().expect("an outcome line");
    assert_eq!(outcome["event"], "outcome", "{outcome}");
    let keys = [
        "event", "run", "seq", "app", "release", "host", "step", "state", "time", "detail",
    ];
    let mut last_seq = 0;
    let mut open: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (k, e) in lines.iter().enumerate() {
        let got: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(got, want, "{e}");
        assert_eq!(e["event"], "step");
        assert_eq!(e["run"], outcome_run(&lines));
        let seq = e["seq"].as_i64().expect("recorded");
        assert!(seq > last_seq, "seq grows: {e}");
        last_seq = seq;
        let t = e["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[19] == b'.',
            "{t}"
        );
        let key = (
            e["host"].as_str().unwrap_or("-").to_string(),
            e["step"].as_str().unwrap().to_string(),
        );
        match e["state"].as_str().unwrap() {
            "start" => {
                open.insert(key, k);
            }
            "done" | "failed" => {
                // A step that reports only its end (`prepare`'s lock takeover, a warm stage,
                // the commit) has no start; one that started ended after it.
                if let Some(&s) = open.get(&key) {
                    assert!(s < k);
                }
            }
            other => panic!("state {other}: {e}"),
        }
    }
    (lines, outcome)
}

fn outcome_run(lines: &[Value]) -> Value {
    lines[0]["run"].clone()
}

/// Where `host step state` first stands in the stream.
fn at(lines: &[Value], host: &str, step: &str, state: &str) -> usize {
    lines
        .iter()
        .position(|e| {
            e["host"].as_str().unwrap_or("-") == host && e["step"] == step && e["state"] == state
        })
        .unwrap_or_else(|| panic!("no {host} {step} {state}"))
}

/// The outcome without what differs between two runs of the same kind.
fn shape(mut o: Value) -> Value {
    let m = o.as_object_mut().unwrap();
    m.remove("event");
    for k in ["release", "previous"] {
        m.insert(k.into(), Value::from("<id>"));
    }
    if let Some(Value::Object(hosts)) = m.get_mut("hosts") {
        for h in hosts.values_mut() {
            let h = h.as_object_mut().unwrap();
            h.remove("detail");
            h.insert("uploaded_bytes".into(), Value::from(0));
        }
    }
    m.remove("message");
    o
}

/// The protocol's order on every host: connect, prepare, stage, switch, gate; the commit after
/// every gate; the run's end last.
fn in_protocol_order(w: &World, lines: &[Value], stage: &str) {
    let mut gates = Vec::new();
    for i in 0..w.hosts() {
        let h = w.lab().destination(i);
        let order = [
            at(lines, &h, "connect", "start"),
            at(lines, &h, "prepare", "start"),
            at(lines, &h, stage, "done"),
            at(lines, &h, "switch", "start"),
            at(lines, &h, "switch", "done"),
            at(lines, &h, "gate", "start"),
            at(lines, &h, "gate", "done"),
        ];
        assert!(order.windows(2).all(|p| p[0] < p[1]), "{h}: {order:?}");
        gates.push(order[6]);
    }
    let commit = at(lines, "-", "commit", "done");
    assert!(gates.iter().all(|&g| g < commit));
    assert_eq!(at(lines, "-", "run", "done"), lines.len() - 1);
}

#[test]
fn a_files_deploy_and_rollback_stream_their_events_and_end_with_the_json_outcome() {
    let w = World::files(2).start();
    w.deploy_ok("v1");
    let v2 = w.build("v2");
    let r = w.run(&["deploy", "--events", "--artifact", v2.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (lines, outcome) = stream(&r.stdout);
    in_protocol_order(&w, &lines, "stage");
    assert_eq!(outcome["status"], "succeeded");
    assert_eq!(outcome["release"], lines.last().unwrap()["release"]);
    assert_eq!(outcome["release"], w.history()[0]["id"]);
    // The same outcome as `--json` gives for a deploy like it.
    let json = w.deploy_artifact(&w.build("v3"));
    assert_eq!(shape(outcome), shape(json.json.clone()));
    assert_eq!(
        w.norm(json.message()),
        w.norm(&format!(
            "deployed {} on 2 host(s); every host passed its health gate",
            json.release()
        ))
    );
    let r = w.run(&["rollback", "--events"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (lines, outcome) = stream(&r.stdout);
    assert_eq!(outcome["kind"], "rollback");
    assert!(lines.iter().any(|e| e["step"] == "mark-bad"));
    in_protocol_order(&w, &lines, "stage");
}

#[test]
fn a_container_deploy_streams_its_events_and_ends_with_the_json_outcome() {
    let w = World::containers(2, "blue-green").start();
    w.image("v1", true);
    w.image("v2", true);
    w.image("v3", true);
    w.deploy_ok("v1");
    let r = w.run(&["deploy", "--events", "--image", "v2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (lines, outcome) = stream(&r.stdout);
    in_protocol_order(&w, &lines, "start");
    for i in 0..2 {
        let h = w.lab().destination(i);
        // Pulled, started beside the old one and gated directly, before any switch.
        assert!(at(&lines, &h, "pull", "done") < at(&lines, &h, "start", "done"));
        assert!(
            at(&lines, &h, "start", "done")
                < at(&lines, &lines_first_switch(&lines), "switch", "start")
        );
    }
    let json = w.deploy_image("v3");
    assert_eq!(json.code, 0, "{}", json.stderr);
    assert_eq!(shape(outcome), shape(json.json.clone()));
}

/// The host that switched first.
fn lines_first_switch(lines: &[Value]) -> String {
    lines
        .iter()
        .find(|e| e["step"] == "switch" && e["state"] == "start")
        .and_then(|e| e["host"].as_str())
        .unwrap()
        .to_string()
}

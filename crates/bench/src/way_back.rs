//! The rollout scenario's last table: three ways back to the old release of ONE container app
//! (blue-green, one Docker host, cutover's proxy), side by side. *Revert during a bake*: the
//! old container still runs and the proxy swaps back on its own verdict; *warm rollback
//! after the bake*: the old container was stopped when the new release was committed, so
//! `cutover rollback` starts it again; *cold rollback*: the same after the host's stopped
//! containers and unused images were removed, so the old image is pulled again.

use crate::containers::{http_get, DockerWorld};
use crate::report::spread;
use crate::Ctx;
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The bake of the revert row: long enough that only the verdict ends it.
const BAKE: &str = "[deploy]\nbake = \"30s\"\nmax_error_rate = 0.01\n";

/// One way back's samples, milliseconds.
pub(crate) struct WayBack {
    pub(crate) label: &'static str,
    /// From the moment the way back begins until `GET /` answers the old release.
    pub(crate) answers_ms: Vec<f64>,
    /// From that moment until the command exits (the revert: the deploy's own exit after
    /// the verdict, which includes its swap back and its gate).
    pub(crate) exits_ms: Vec<f64>,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// `web:bad`: `/` answers `bad`, `/up` is healthy, `/cgi-bin/app` (the load's path) answers
/// 500 to every request.
fn build_bad(world: &DockerWorld) {
    let app = "#!/bin/sh\nprintf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nboom\\n'\n";
    let start = "#!/bin/sh\ntrap 'exit 0' TERM INT\nhttpd -f -p 8080 -h /www &\nwait\n";
    world.lab.build_image_with(
        "web:bad",
        &[
            ("www/index.html", b"bad\n"),
            ("www/up", b"ok\n"),
            ("www/cgi-bin/app", app.as_bytes()),
            ("start.sh", start.as_bytes()),
        ],
        &["CMD [\"/start.sh\"]", "EXPOSE 8080/tcp"],
    );
}

/// `a` serving, then `bad` deployed with a bake under load: the proxy's verdict fails it and
/// swaps back. (verdict → `GET /` answers `a` in ms, verdict → deploy exits in ms).
fn revert(world: &DockerWorld) -> Result<(f64, f64)> {
    world.write_config_with("blue-green", BAKE)?;
    world.deploy_ok("a")?;
    let addr = world.proxy_addr();
    let load = testlab::Load::start(testlab::LoadOptions {
        path: "/cgi-bin/app".into(),
        workers_per_target: 2,
        pause: Duration::from_millis(10),
        ..testlab::LoadOptions::new(vec![addr])
    });
    // The first `a` after `bad` served, by this machine's clock (the host shares it).
    let poller = std::thread::spawn(move || -> Option<f64> {
        let t = Instant::now();
        let mut seen_bad = false;
        while t.elapsed() < Duration::from_secs(120) {
            match http_get(addr).map(|b| b.trim().to_string()).as_deref() {
                Ok("bad") => seen_bad = true,
                Ok("a") if seen_bad => return Some(unix_ms()),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });
    let d = world.deploy("bad")?;
    let exited = unix_ms();
    let _ = load.stop();
    let back = poller
        .join()
        .map_err(|_| anyhow!("poller panicked"))?
        .ok_or_else(|| anyhow!("`a` never answered again after `bad`: {}", d.message))?;
    if d.ok {
        bail!("the bad release passed its bake: {}", d.message);
    }
    let path = world.lab.srv_dir(0).join("cutover/proxy-state.json");
    let state = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let state: Value = serde_json::from_str(&state).context("the proxy's state")?;
    let bake = &state["bakes"][0];
    if bake["state"] != "failed" {
        bail!("no failed bake in the proxy's state: {bake}");
    }
    let finished = bake["finished_at_ms"].as_f64().unwrap_or(0.0);
    let (gate, drain) = gate_and_drain(bake["action"].as_str().unwrap_or(""))
        .ok_or_else(|| anyhow!("no swap back in the bake's action: {bake}"))?;
    // The verdict came before the swap's gate, the swap before its drain.
    let verdict = finished - drain - gate;
    Ok(((back - verdict).max(0.0), exited - verdict))
}

/// `(gate G ms, drained D in T ms)` of the proxy's swap back: (G, T).
fn gate_and_drain(action: &str) -> Option<(f64, f64)> {
    let (_, tail) = action.split_once("(gate ")?;
    let (gate, tail) = tail.split_once(" ms, drained ")?;
    let (_, tail) = tail.split_once(" in ")?;
    let drain = tail.split_once(" ms)")?.0;
    Some((gate.parse().ok()?, drain.parse().ok()?))
}

/// The three ways back, `ctx.reps` times each, on one fresh Docker host.
pub(crate) fn measure(ctx: &Ctx) -> Result<Vec<WayBack>> {
    let world = DockerWorld::start(ctx)?;
    build_bad(&world);
    let mut ways = vec![
        WayBack {
            label: "revert during a bake (proxy swap; from the proxy's verdict)",
            answers_ms: Vec::new(),
            exits_ms: Vec::new(),
        },
        WayBack {
            label: "warm rollback after the bake (container start; from the command's spawn)",
            answers_ms: Vec::new(),
            exits_ms: Vec::new(),
        },
        WayBack {
            label: "cold rollback (image pulled again, container start; from the command's spawn)",
            answers_ms: Vec::new(),
            exits_ms: Vec::new(),
        },
    ];
    for rep in 0..ctx.reps {
        eprintln!(
            "[rollout] way back {}/{}: revert during a bake",
            rep + 1,
            ctx.reps
        );
        let (answers, exits) = revert(&world)?;
        ways[0].answers_ms.push(answers);
        ways[0].exits_ms.push(exits);
        // No bake for the rollbacks themselves: after `b` is committed (its bake passed) the
        // old container is stopped either way.
        world.write_config("blue-green")?;
        for (i, cold) in [(1, false), (2, true)] {
            world.deploy_ok("a")?;
            world.deploy_ok("b")?;
            if cold {
                world.ssh_ok(
                    "docker container prune -f >/dev/null && docker image prune -af >/dev/null",
                )?;
            }
            eprintln!(
                "[rollout] way back {}/{}: {}",
                rep + 1,
                ctx.reps,
                ways[i].label
            );
            let (served, exited) = world.timed_until_serves(&["rollback"], "a")?;
            ways[i].answers_ms.push(served * 1000.0);
            ways[i].exits_ms.push(exited * 1000.0);
        }
    }
    Ok(ways)
}

/// The table's rows and the JSON of the three ways back.
pub(crate) fn rows(ways: &[WayBack]) -> (Vec<Vec<String>>, Value) {
    let cell = |v: &[f64]| {
        let (med, min, max) = spread(v);
        if v.len() > 1 {
            format!("{med:.0} ({min:.0}–{max:.0})")
        } else {
            format!("{med:.0}")
        }
    };
    let rows = ways
        .iter()
        .map(|w| vec![w.label.to_string(), cell(&w.answers_ms), cell(&w.exits_ms)])
        .collect();
    let json = json!(ways
        .iter()
        .map(|w| json!({"way": w.label, "old_answers_ms": w.answers_ms, "command_exits_ms": w.exits_ms}))
        .collect::<Vec<_>>());
    (rows, json)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_swap_back_s_gate_and_drain_are_read_from_the_action() {
        assert_eq!(
            super::gate_and_drain(
                "the proxy swapped back to 127.0.0.1:4 (gate 3 ms, drained true in 12 ms)"
            ),
            Some((3.0, 12.0))
        );
        assert_eq!(super::gate_and_drain("nothing to swap back to"), None);
    }
}

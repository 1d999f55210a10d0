//! Rollout support end to end, over real sockets on loopback: per-target counts reported on
//! the control socket (exact for a scripted upstream) and a canary that gets its share of a
//! service's requests under load, then is promoted without failing a request.

mod support;

use std::time::Duration;

use cutover_proxy::{
    BakeLimits, BakeRequest, BakeState, BakeStatus, CanaryRequest, ControlError, DeployRequest,
    Request, Response, StatsReport, TargetStats, LATENCY_BOUNDS_MS,
};
use support::{fast, get, Backend, Load, LoadOpts, TempDir, TestProxy};

fn stats(proxy: &TestProxy, service: &str) -> StatsReport {
    match proxy
        .request(&Request::Stats {
            service: service.into(),
        })
        .unwrap()
    {
        Response::Stats(s) => s,
        other => panic!("unexpected answer {other:?}"),
    }
}

fn canary(
    proxy: &TestProxy,
    service: &str,
    to: &Backend,
    percent: u8,
) -> Result<Response, ControlError> {
    proxy.request(&Request::Canary(CanaryRequest {
        percent,
        deploy: DeployRequest {
            service: service.into(),
            target: to.addr.to_string(),
            health_path: "/up".into(),
            domains: vec![],
            options: fast(),
        },
    }))
}

fn bucket_of(ms: u64) -> usize {
    LATENCY_BOUNDS_MS.iter().position(|&b| ms <= b).unwrap()
}

#[test]
fn stats_count_exactly_what_a_scripted_upstream_answered() {
    let dir = TempDir::new("stats");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    // Health probes are not requests.
    let s = stats(&proxy, "app");
    assert_eq!(s.targets.len(), 1, "{s:?}");
    let first = s.role("current").unwrap().clone();
    assert_eq!(
        (first.requests, first.target.clone()),
        (0, a.addr.to_string())
    );

    for i in 0..100 {
        let path = match i % 5 {
            0 => "/status/500",
            1 => "/status/404",
            _ => "/",
        };
        get(proxy.addr, "app.test", path);
    }
    for _ in 0..3 {
        assert_eq!(get(proxy.addr, "app.test", "/slow/300").status, 200);
    }
    let s = stats(&proxy, "app");
    let cur = s.role("current").unwrap();
    assert_eq!(cur.id, first.id);
    assert_eq!((cur.requests, cur.errors_5xx, cur.failures), (103, 20, 0));
    assert_eq!(cur.latency.len(), LATENCY_BOUNDS_MS.len() + 1);
    assert_eq!(cur.latency.iter().sum::<u64>(), 103);
    assert!(
        cur.latency[bucket_of(300)..=bucket_of(1000)]
            .iter()
            .sum::<u64>()
            >= 3,
        "{cur:?}"
    );
    assert_eq!(cur.error_rate(), Some(20.0 / 103.0));
    assert!(cur.p99_ms().unwrap() >= 500, "{cur:?}");

    // A switch: the new target counts from zero, the old one is reported as previous.
    proxy.deploy("app", b.addr).unwrap();
    b.stop();
    for _ in 0..4 {
        assert_eq!(get(proxy.addr, "app.test", "/").status, 502);
    }
    let s = stats(&proxy, "app");
    let (cur, prev) = (s.role("current").unwrap(), s.role("previous").unwrap());
    assert_eq!(prev.id, first.id);
    assert_eq!(prev.requests, 103);
    assert_eq!((cur.requests, cur.errors_5xx, cur.failures), (4, 0, 4));
    assert_eq!(cur.error_rate(), Some(1.0));
    // A window is the difference of two reports of one stint.
    let window = cur.since(Some(cur));
    assert_eq!(window.requests, 0);

    match proxy.request(&Request::Stats {
        service: "nope".into(),
    }) {
        Err(ControlError::Rejected(error)) => assert_eq!(error, "no such service: nope"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_ten_percent_canary_gets_its_share_and_is_promoted_without_a_failed_request() {
    let dir = TempDir::new("canary");
    let (a, b, broken) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::broken("broken"),
    );
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();

    let keep_alive = Load::start(LoadOpts::new(proxy.addr, true));
    let fresh = Load::start(LoadOpts::new(proxy.addr, false));
    assert!(keep_alive.wait_more(50, Duration::from_secs(10)));

    // An unhealthy canary changes nothing.
    match canary(&proxy, "app", &broken, 10) {
        Err(ControlError::Rejected(error)) => {
            assert!(error.contains("did not pass the health gate"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    match canary(&proxy, "app", &b, 0) {
        Err(ControlError::Rejected(error)) => {
            assert_eq!(error, "invalid request: canary percent 0: expected 1 to 99")
        }
        other => panic!("{other:?}"),
    }
    let before = stats(&proxy, "app");
    match canary(&proxy, "app", &b, 10) {
        Ok(Response::Canary(r)) => {
            assert_eq!((r.percent, r.current.as_str()), (10, &*a.addr.to_string()));
            assert_eq!(r.target, b.addr.to_string());
        }
        other => panic!("{other:?}"),
    }
    let during = stats(&proxy, "app");
    let old_at_start = during.role("current").unwrap().clone();
    let new_at_start = during.role("canary").unwrap().clone();
    assert_eq!(old_at_start.id, before.role("current").unwrap().id);
    let measured = Load::start(LoadOpts::new(proxy.addr, true));
    assert!(measured.wait_more(5_000, Duration::from_secs(60)));
    let m = measured.stop();
    let to_new = m.bodies.get("b").copied().unwrap_or(0);
    let share = to_new as f64 / (m.ok + m.failed) as f64;
    println!(
        "canary share {:.2}% of {} requests: {m}",
        share * 100.0,
        m.ok
    );
    assert_eq!(m.failed, 0, "{m}\n{}", m.failures.join("\n"));
    assert!((0.08..=0.12).contains(&share), "{m}");

    // The proxy's own counts over the same window agree (all loads together).
    let after = stats(&proxy, "app");
    let old: TargetStats = after.role("current").unwrap().since(Some(&old_at_start));
    let new: TargetStats = after.role("canary").unwrap().since(Some(&new_at_start));
    assert!(new.requests >= to_new, "{new:?}");
    let counted = (new.requests as f64) / ((new.requests + old.requests) as f64);
    assert!((0.08..=0.12).contains(&counted), "{old:?} {new:?}");
    assert_eq!((old.errors_5xx, new.errors_5xx, new.failures), (0, 0, 0));

    // Promotion: the canary's target becomes current, its counts carry on.
    let r = proxy.deploy("app", b.addr).unwrap();
    assert!(r.switched && r.drained, "{r:?}");
    assert_eq!(r.previous, Some(a.addr.to_string()));
    assert!(keep_alive.wait_more(200, Duration::from_secs(10)));
    let promoted = stats(&proxy, "app");
    assert_eq!(promoted.role("current").unwrap().id, new_at_start.id);
    assert!(promoted.role("canary").is_none());
    let (ka, fr) = (keep_alive.stop(), fresh.stop());
    for (kind, r) in [("keep-alive", &ka), ("fresh", &fr)] {
        assert_eq!(r.failed, 0, "{kind}: {r}\n{}", r.failures.join("\n"));
    }
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "b");

    // A canary ended by deploying the current target again: everything on b.
    assert!(matches!(
        canary(&proxy, "app", &a, 50),
        Ok(Response::Canary(_))
    ));
    let r = proxy.deploy("app", b.addr).unwrap();
    assert!(!r.switched && r.drained, "{r:?}");
    assert!((0..40).all(|_| get(proxy.addr, "app.test", "/").first_line() == "b"));
}

fn bake(proxy: &TestProxy, to: &Backend, fallback: &Backend, window: Duration) -> BakeStatus {
    let req = Request::Bake(BakeRequest {
        service: "app".into(),
        target: to.addr.to_string(),
        fallback: Some(fallback.addr.to_string()),
        health_path: "/up".into(),
        window,
        limits: BakeLimits {
            max_error_ppm: 10_000,
            max_p99_ms: None,
            min_requests: 20,
        },
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        release: "r2".into(),
        old_release: Some("r1".into()),
    });
    match proxy.request(&req) {
        Ok(Response::Baking(b)) => b,
        other => panic!("{other:?}"),
    }
}

/// Polls `stats` until the bake has its verdict.
fn verdict(proxy: &TestProxy, within: Duration) -> BakeStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        let b = stats(proxy, "app").bake.expect("a bake in stats");
        if b.state != BakeState::Baking {
            return b;
        }
        assert!(std::time::Instant::now() < deadline, "still baking: {b:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Nobody polls or acts for the proxy: it judges the bake itself, swaps back on its own
/// when real requests fail (long before the window ends), persists the verdict; a bake with
/// no traffic at all is judged from its own probes.
#[test]
fn a_bake_is_judged_and_reverted_by_the_proxy_alone_and_its_verdict_survives_a_restart() {
    let dir = TempDir::new("bake");
    let (a, bad, good) = (
        Backend::start("a"),
        Backend::start("bad"),
        Backend::start("good"),
    );
    let proxy = TestProxy::start(dir.path());
    proxy.deploy("app", a.addr).unwrap();
    let mut opts = LoadOpts::new(proxy.addr, true);
    opts.path = "/app".into();
    let load = Load::start(opts);
    assert!(load.wait_more(50, Duration::from_secs(10)));

    // A release whose /up is fine and whose real requests all fail.
    proxy.deploy("app", bad.addr).unwrap();
    let started = bake(&proxy, &bad, &a, Duration::from_secs(60));
    assert_eq!(started.state, BakeState::Baking);
    let b = verdict(&proxy, Duration::from_secs(10));
    assert_eq!(b.state, BakeState::Failed, "{b:?}");
    assert!(
        b.verdict.starts_with("new release r2: ") && b.verdict.contains("; old release r1: 0 of "),
        "{b:?}"
    );
    assert!(
        b.verdict
            .ends_with("above max_error_rate 0.01 and the old release's rate"),
        "{b:?}"
    );
    assert!(
        b.action
            .starts_with(&format!("the proxy swapped back to {} (gate ", a.addr)),
        "{b:?}"
    );
    // Judged at the first judgement with enough requests, not at the end of the window.
    assert!(b.finished_at_ms.unwrap() < b.ends_at_ms - 30_000, "{b:?}");
    assert!(load.wait_more(50, Duration::from_secs(10)));
    let seen = load.stop();
    assert!(seen.failed > 0, "{seen}");
    assert!(
        seen.failures.iter().all(|f| f.contains("500")),
        "{:?}",
        seen.failures
    );
    assert_eq!(get(proxy.addr, "app.test", "/app").first_line(), "a");

    // The verdict is in the state: a restarted proxy reports it.
    proxy.stop().unwrap();
    let proxy = TestProxy::start(dir.path());
    let status = proxy.status();
    let kept = status.services[0].bake.clone().expect("the bake survives");
    assert_eq!(
        (kept.state, kept.verdict.clone()),
        (b.state, b.verdict.clone())
    );
    assert_eq!(status.services[0].target, a.addr.to_string());

    // No client traffic at all: the proxy probes /up itself, and passes on that data only.
    proxy.deploy("app", good.addr).unwrap();
    bake(&proxy, &good, &a, Duration::from_secs(2));
    let b = verdict(&proxy, Duration::from_secs(10));
    assert_eq!(b.state, BakeState::Passed, "{b:?}");
    assert!(b.probes >= 5 && b.probes_failed == 0, "{b:?}");
    assert!(
        b.verdict
            .contains("under 20 requests: judged by probes, 0 of ")
            && b.verdict
                .ends_with("probes of /up failed in 2s (max_error_rate 0.01)"),
        "{b:?}"
    );
    assert_eq!(get(proxy.addr, "app.test", "/").first_line(), "good");

    // A bake of a target the service does not route to is refused.
    match proxy.request(&Request::Bake(BakeRequest {
        service: "app".into(),
        target: bad.addr.to_string(),
        fallback: None,
        health_path: "/up".into(),
        window: Duration::from_secs(1),
        limits: BakeLimits {
            max_error_ppm: 0,
            max_p99_ms: None,
            min_requests: 20,
        },
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        release: String::new(),
        old_release: None,
    })) {
        Err(ControlError::Rejected(e)) => assert_eq!(
            e,
            format!(
                "invalid request: bake target {} is neither the current target nor the canary of app",
                bad.addr
            )
        ),
        other => panic!("{other:?}"),
    }
}

//! Container apps built from git (`[build] dockerfile`): a real repository made with the `git`
//! CLI holding a Dockerfile `FROM scratch` that copies a static busybox from the repository (no
//! image is pulled from anywhere), the real `cutover` binary running `docker build` and `docker
//! push` into the lab's registry, and real Docker hosts (testlab) pulling the pushed digest and
//! serving it through cutover's edge proxy. Needs root, Docker Engine, Debian's
//! `docker-registry`, `busybox-static` and git.
//!
//! The docker CLI of a build runs with cutover's own environment; the tests point it at lab host
//! 0's dockerd (`DOCKER_HOST`), which trusts the lab registry as an insecure registry (the
//! machine's own dockerd does not, and is not reconfigured). So host 0's daemon builds and
//! pushes, and every host, host 1 included, pulls the pushed digest from the registry.

use crate::world::World;
use std::time::Duration;

/// A Dockerfile that serves `www/` of the repository with busybox httpd on 8080, and writes the
/// commit it was built from (the `CUTOVER_COMMIT` build argument) to `/commit`.
pub(crate) const DOCKERFILE: &str = r#"FROM scratch
COPY rootfs/ /
ARG CUTOVER_COMMIT
RUN echo "stamping commit $CUTOVER_COMMIT" && echo "$CUTOVER_COMMIT" > /www/commit
EXPOSE 8080
CMD ["sh", "-c", "trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait"]
"#;

/// A container app on `hosts` lab hosts built from the world's repository, whose `rootfs/`
/// holds a static busybox and the applets the Dockerfile and the container use, as symlinks
/// (git keeps them). Builds run on host 0's dockerd.
pub(crate) fn world(hosts: usize) -> World {
    let w = World::containers(hosts, "blue-green")
        .git()
        .unset("container", "env")
        .unset("container", "volumes")
        .unset("proxy", "hold")
        .set("container", "keep", "3")
        .lines("proxy", "drain = \"1s\"")
        .lines("health", "give_up_after = \"5s\"")
        .lines("build", "dockerfile = \"Dockerfile\"\ntimeout = \"3m\"")
        .env_remove("DOCKER_CONTEXT")
        .docker_host(0)
        .start();
    let bin = w.work().join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("/bin/busybox: install Debian's busybox-static");
    for applet in ["sh", "httpd", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    w
}

/// Commits a site whose `/` says `page` with `dockerfile` (none: no Dockerfile at all) and
/// pushes it to origin's main; returns the full SHA.
pub(crate) fn commit(w: &World, page: &str, subject: &str, dockerfile: Option<&str>) -> String {
    if dockerfile.is_none() {
        let _ = std::fs::remove_file(w.work().join("Dockerfile"));
    }
    let index = format!("{page}\n");
    let mut files = vec![
        ("rootfs/www/index.html", index.as_str()),
        ("rootfs/www/up", "ok\n"),
    ];
    if let Some(d) = dockerfile {
        files.push(("Dockerfile", d));
    }
    let sha = w.commit(subject, &files);
    w.git(&["push", "-q", "--force", "origin", "main"]);
    sha
}

/// Every host serves `page` at `/` and `commit` at `/commit` through its proxy.
fn assert_all_serve(w: &World, page: &str, commit: &str) {
    for i in 0..w.hosts() {
        assert_eq!(w.get(i, "/").trim(), page, "host {i}");
        assert_eq!(w.get(i, "/commit").trim(), commit, "host {i}");
    }
}

/// Image ids host 0's daemon (the builder) has.
fn builder_images(w: &World) -> Vec<String> {
    let out = w.lab().docker(0, &["images", "-q", "--no-trunc"]);
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn steps(events: &[(String, String, String)]) -> Vec<&str> {
    events.iter().map(|(s, _, _)| s.as_str()).collect()
}

/// No event of `events` is one of `steps`.
fn assert_ran_none(events: &[(String, String, String)], none_of: &[&str], what: &str) {
    let s = steps(events);
    assert!(
        !s.iter().any(|x| none_of.contains(x)),
        "{what} ran one of {none_of:?}: {s:?}"
    );
}

const BUILD_STEPS: [&str; 5] = ["fetch", "export", "build", "docker-build", "docker-push"];

#[test]
fn a_commit_is_built_pushed_and_deployed_and_rollback_never_rebuilds() {
    let w = world(2);

    // First commit: built by host 0's daemon, pushed as web:<full sha>, pulled by digest on
    // both hosts and served through their proxies.
    let c1 = commit(&w, "v1", "first page", Some(DOCKERFILE));
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c1.as_str(), "{v}");
    assert_eq!(v["commit_subject"], "first page");
    assert_all_serve(&w, "v1", &c1);
    let pushed1 = w.lab().image_digest(&format!("web:{c1}"));
    let h = w.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["commit"], c1.as_str(), "full SHA in history");
    assert_eq!(h[0]["commit_subject"], "first page");
    assert_eq!(
        format!("sha256:{}", h[0]["artifact_sha256"].as_str().unwrap()),
        pushed1,
        "the release is exactly the pushed digest"
    );
    // Host 1 never saw the build: it pulled the digest from the registry.
    let on1 = w.lab().docker(
        1,
        &[
            "image",
            "inspect",
            &format!("{}/web@{pushed1}", w.registry()),
        ],
    );
    assert!(on1.status.success(), "host 1 pulled {pushed1}");
    let events = w.last_run_events();
    let s = steps(&events);
    let pos = |step: &str| s.iter().position(|x| *x == step);
    let pushed_at = s.iter().rposition(|x| *x == "docker-push").unwrap();
    assert!(
        pos("connect").unwrap() > pushed_at,
        "hosts are connected only after the push: {s:?}"
    );
    assert!(
        events.iter().any(|(s, p, d)| s == "docker-build"
            && p == "output"
            && d.contains(&format!("stamping commit {c1}"))),
        "docker build output is recorded line by line: {events:?}"
    );
    assert!(events
        .iter()
        .any(|(s, p, d)| s == "docker-push" && p == "done" && d == &pushed1));
    // The image carries its commit.
    let label = w.lab().docker(
        0,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
            &format!("{}/web:{c1}", w.registry()),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), c1);

    // A second commit deploys the same way (shown live without --json).
    let c2 = commit(&w, "v2", "second page", Some(DOCKERFILE));
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stderr.contains(&format!("stamping commit {c2}")),
        "docker output is shown live: {}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("commit {} second page", &c2[..7])),
        "{}",
        r.stderr
    );
    assert_all_serve(&w, "v2", &c2);
    let h = w.history();
    assert_eq!(h[0]["commit"], c2.as_str());
    let release1 = h[1]["id"].as_str().unwrap().to_string();
    // status and diff know the commits of container releases too.
    let st = w.run(&["status", "--json"]);
    assert_eq!(st.code, 0, "{}", st.json);
    assert_eq!(st.json["live_commit"], c2.as_str(), "{}", st.json);
    assert!(
        st.json["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["commit"] == c2.as_str()),
        "{}",
        st.json
    );
    let d = w.run(&["diff", "--json"]);
    assert_eq!(d.code, 0, "{}", d.json);
    let commits: Vec<&str> = d.json["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["commit"].as_str().unwrap())
        .collect();
    assert_eq!(commits, [c2.as_str()], "{}", d.json);

    // Rollback: the first release's recorded digest, no fetch, no build, no push.
    let images = builder_images(&w);
    let r = w.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0, "{}", r.json);
    assert_eq!(r.json["release"], release1.as_str());
    assert_all_serve(&w, "v1", &c1);
    let events = w.last_run_events();
    assert_ran_none(&events, &BUILD_STEPS, "a rollback");
    assert_eq!(builder_images(&w), images, "no image was built");
    assert_eq!(w.lab().image_digest(&format!("web:{c1}")), pushed1);

    // cache = true: the first deploy of c2 with it builds (and records), the second reuses
    // the pushed digest without docker build or push.
    w.configure(|t| {
        t.set("build", "cache", "true");
    });
    w.deploy_ref_ok(&c2);
    let s1: Vec<String> = steps(&w.last_run_events())
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(s1.iter().any(|x| x == "docker-build"), "{s1:?}");
    let digest2 = w.history()[0]["artifact_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let images = builder_images(&w);
    let v = w.deploy_ref_ok("main");
    assert_eq!(v["commit"], c2.as_str());
    let events = w.last_run_events();
    assert_ran_none(
        &events,
        &["docker-build", "docker-push", "export"],
        "a cached build",
    );
    assert!(
        events
            .iter()
            .any(|(s, p, d)| s == "build" && p == "done" && d.contains("reused the image")),
        "{events:?}"
    );
    assert_eq!(w.history()[0]["artifact_sha256"], digest2.as_str());
    assert_eq!(builder_images(&w), images, "no image was built");
    assert_all_serve(&w, "v2", &c2);
    // A different build config is a different key: it builds again.
    w.configure(|t| {
        t.set("build", "cache", "true").set_str(
            "build",
            "command",
            "echo prepared > rootfs/www/prepared",
        );
    });
    w.deploy_ref_ok("main");
    assert!(steps(&w.last_run_events()).contains(&"docker-build"));
    assert_eq!(w.get(0, "/prepared").trim(), "prepared");
    assert_eq!(w.get(1, "/prepared").trim(), "prepared");
}

#[test]
fn a_failed_docker_build_is_exit_1_and_touches_no_host() {
    let w = world(1);
    let c1 = commit(&w, "v1", "good", Some(DOCKERFILE));
    w.deploy_ref_ok("main");
    assert_all_serve(&w, "v1", &c1);
    let releases = w.history().len();

    // A RUN that fails.
    let broken = DOCKERFILE.replace("ARG CUTOVER_COMMIT\n", "RUN echo about to fail && exit 1\n");
    commit(&w, "v2", "broken build", Some(&broken));
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 1);
    let err = &r.stderr;
    assert!(err.contains("about to fail"), "output shown live: {err}");
    assert!(err.contains("docker build of"), "{err}");
    assert!(err.contains("No host was touched"), "{err}");
    let events = w.last_run_events();
    assert_ran_none(
        &events,
        &["connect", "prepare", "docker-push"],
        "a failed build",
    );
    assert!(events
        .iter()
        .any(|(s, p, d)| s == "docker-build" && p == "output" && d == "about to fail"));
    assert_eq!(w.history().len(), releases, "no release was recorded");
    assert_all_serve(&w, "v1", &c1);
    assert_eq!(
        std::fs::read_dir(w.dir.join("data/builds"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the build directory is gone"
    );

    // A build that runs past [build] timeout is killed (the docker CLI and, with it, the
    // build in the daemon).
    let hanging = DOCKERFILE.replace("ARG CUTOVER_COMMIT\n", "RUN echo sleeping && sleep 300\n");
    commit(&w, "v2", "hanging build", Some(&hanging));
    w.configure(|t| {
        t.set_str("build", "timeout", "4s");
    });
    let start = std::time::Instant::now();
    w.deploy_ref("main")
        .says(1, &["timed out", "[build] timeout"]);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(!steps(&w.last_run_events()).contains(&"connect"));
    // The builder daemon gives up the build too: its RUN container does not keep sleeping.
    let sleeping = || {
        let out = w
            .lab()
            .docker(0, &["ps", "--no-trunc", "--format", "{{.Command}}"]);
        String::from_utf8_lossy(&out.stdout).contains("sleep 300")
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while sleeping() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !sleeping(),
        "the timed-out build's RUN container still runs"
    );
    assert_all_serve(&w, "v1", &c1);
    w.configure(|_| {});

    // A commit without the Dockerfile; `deploy` with neither --ref nor --image builds HEAD.
    let c3 = commit(&w, "v3", "no dockerfile", None);
    let r = w.run(&["deploy", "--json"]);
    assert_eq!(r.code, 1, "{}", r.json);
    assert!(
        r.message().contains(&format!(
            "commit {} has no Dockerfile `Dockerfile`",
            &c3[..7]
        )),
        "{}",
        r.json
    );
    assert!(!steps(&w.last_run_events()).contains(&"connect"));
    assert_all_serve(&w, "v1", &c1);

    // Config errors are exit 2 before anything runs.
    w.configure(|t| {
        t.set_str("build", "output", "dist");
    });
    let r = w.run(&["deploy", "--ref", "main"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("build.output"));
    w.configure(|_| {});
    let r = w.run(&["deploy", "--ref", "main", "--image", "v1"]);
    assert_eq!(r.code, 2, "--ref and --image exclude each other");
    assert_eq!(w.history().len(), releases);
    assert_all_serve(&w, "v1", &c1);
}

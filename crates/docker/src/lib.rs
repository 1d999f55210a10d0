//! The container runtime: the host's `docker` CLI, run through a [`Remote`] (so over the
//! host's multiplexed SSH connection), with `--format '{{json .}}'` output parsed here. One
//! remote invocation per operation. This crate knows nothing of releases, proxies or gates: it
//! pulls, runs, starts, stops, removes, inspects and lists containers named and labelled by the
//! caller.
//!
//! **Invariant:** an image is run by digest (`repo@sha256:...`), never by a mutable tag; `pull`
//! returns the digest a tag resolved to.

use cutover_remote::{Arg, Output, Remote, RemoteError, Script};
use std::collections::BTreeMap;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    #[error("{0}")]
    Remote(#[from] RemoteError),
    #[error("{host}: {message}")]
    Docker { host: String, message: String },
}

impl DockerError {
    /// The message without the host name (for lists that already name the host).
    pub fn message(&self) -> String {
        match self {
            DockerError::Docker { message, .. } => message.clone(),
            DockerError::Remote(e) => e.to_string(),
        }
    }
}

type Result<T> = std::result::Result<T, DockerError>;

fn fail(r: &dyn Remote, out: &Output, what: &str) -> DockerError {
    let message = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ERR ").map(str::to_string))
        .unwrap_or_else(|| format!("{what} failed (exit {}): {}", out.code, out.tail()));
    DockerError::Docker {
        host: r.name().to_string(),
        message,
    }
}

/// `repository` of an image reference: without tag or digest.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag is the part after the last ':' if that ':' comes after the last '/'.
    match (no_digest.rfind(':'), no_digest.rfind('/')) {
        (Some(c), Some(s)) if c > s => &no_digest[..c],
        (Some(c), None) => &no_digest[..c],
        _ => no_digest,
    }
}

/// What a pull resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// `repo@sha256:...`: what is run and recorded.
    pub reference: String,
    /// `sha256:...`
    pub digest: String,
}

const PULL: &str = r#"
set -u
image={image}
if ! out=$(docker pull "$image" 2>&1); then
  printf 'ERR cannot pull %s: %s\n' "$image" "$(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
  exit 3
fi
printf 'DIGESTS %s\n' "$(docker image inspect --format '{{json .RepoDigests}}' "$image")"
"#;

/// Pulls `image` (a tag or a digest reference) and resolves its digest in `image`'s repository.
pub fn pull(r: &dyn Remote, image: &str) -> Result<Pulled> {
    let out = r.run(&Script::new(PULL, &[("image", image)]), None)?;
    if !out.success() {
        return Err(fail(r, &out, "docker pull"));
    }
    let json = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("DIGESTS "))
        .unwrap_or("[]");
    let digests: Vec<String> = serde_json::from_str(json).unwrap_or_default();
    let repo = repository(image);
    let reference = digests
        .iter()
        .find(|d| d.split('@').next() == Some(repo))
        .cloned()
        .ok_or_else(|| DockerError::Docker {
            host: r.name().to_string(),
            message: format!("pulled {image} but docker reports no digest for {repo} (was it pushed to a registry?)"),
        })?;
    let digest = reference.split('@').nth(1).unwrap_or_default().to_string();
    Ok(Pulled { reference, digest })
}

/// A container to run.
#[derive(Clone)]
pub struct ContainerSpec<'a> {
    pub name: &'a str,
    /// `repo@sha256:...`
    pub image: &'a str,
    /// The port the app listens on inside the container; published on the host's loopback
    /// at a port docker picks.
    pub port: u16,
    pub env: &'a BTreeMap<String, String>,
    pub volumes: &'a [String],
    pub labels: &'a [(String, String)],
}

impl std::fmt::Debug for ContainerSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("port", &self.port)
            .field(
                "env",
                &self
                    .env
                    .keys()
                    .map(|k| format!("{k}=<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("volumes", &self.volumes)
            .finish()
    }
}

const RUN: &str = r#"
set -u
name={name}
docker rm -f "$name" >/dev/null 2>&1
if ! out=$(docker run -d --name "$name" {labels} -p {publish} {env} {volumes} {image} 2>&1); then
  printf 'ERR cannot start container %s: %s\n' "$name" "$(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
  docker rm -f "$name" >/dev/null 2>&1
  exit 3
fi
p=$(docker port "$name" {cport} 2>/dev/null | head -n 1)
printf 'PORT %s\n' "${p##*:}"
"#;

const START: &str = r#"
set -u
name={name}
if ! out=$(docker start "$name" 2>&1); then
  printf 'ERR cannot start container %s: %s\n' "$name" "$(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
  exit 3
fi
p=$(docker port "$name" {cport} 2>/dev/null | head -n 1)
printf 'PORT %s\n' "${p##*:}"
"#;

fn port_of(r: &dyn Remote, out: &Output, what: &str) -> Result<u16> {
    if !out.success() {
        return Err(fail(r, out, what));
    }
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("PORT "))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| DockerError::Docker {
            host: r.name().to_string(),
            message: format!("{what}: the container published no port (did it exit at once?)"),
        })
}

/// Runs a new container (replacing a stopped one of the same name); returns the host port
/// its `port` is published on (127.0.0.1 only).
pub fn run(r: &dyn Remote, spec: &ContainerSpec<'_>) -> Result<u16> {
    let mut labels = Vec::new();
    for (k, v) in spec.labels {
        labels.push("--label".to_string());
        labels.push(format!("{k}={v}"));
    }
    let mut env = Vec::new();
    for (k, v) in spec.env {
        env.push("-e".to_string());
        env.push(format!("{k}={v}"));
    }
    let mut volumes = Vec::new();
    for v in spec.volumes {
        volumes.push("-v".to_string());
        volumes.push(v.clone());
    }
    let publish = format!("127.0.0.1::{}", spec.port);
    let cport = format!("{}/tcp", spec.port);
    let s = Script::with(
        RUN,
        &[
            ("name", Arg::One(spec.name)),
            ("labels", Arg::Many(&labels)),
            ("publish", Arg::One(&publish)),
            ("env", Arg::Many(&env)),
            ("volumes", Arg::Many(&volumes)),
            ("image", Arg::One(spec.image)),
            ("cport", Arg::One(&cport)),
        ],
    );
    let out = r.run(&s, None)?;
    port_of(r, &out, "docker run")
}

/// Starts an existing (stopped) container; returns its published host port (which may differ
/// from the one it had before it was stopped).
pub fn start(r: &dyn Remote, name: &str, port: u16) -> Result<u16> {
    let cport = format!("{port}/tcp");
    let out = r.run(
        &Script::new(START, &[("name", name), ("cport", &cport)]),
        None,
    )?;
    port_of(r, &out, "docker start")
}

/// Stops containers (no error if they are gone or stopped).
pub fn stop(r: &dyn Remote, names: &[String], timeout_secs: u32) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let t = timeout_secs.to_string();
    let s = Script::with(
        "docker stop -t {t} {names} >/dev/null 2>&1; exit 0",
        &[("t", Arg::One(&t)), ("names", Arg::Many(names))],
    );
    r.run(&s, None)?;
    Ok(())
}

/// Removes containers (running or not; no error if gone).
pub fn remove(r: &dyn Remote, names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let s = Script::with(
        "docker rm -f {names} >/dev/null 2>&1; exit 0",
        &[("names", Arg::Many(names))],
    );
    r.run(&s, None)?;
    Ok(())
}

/// A container's state and its last log lines, for a diagnosis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub exists: bool,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub logs: String,
}

const STATE: &str = r#"
name={name}
if docker inspect "$name" >/dev/null 2>&1; then
  docker inspect --format 'STATE {{.State.Running}} {{.State.ExitCode}}' "$name"
  echo LOGS
  docker logs --tail 20 "$name" 2>&1
else
  echo MISSING
fi
"#;

pub fn state(r: &dyn Remote, name: &str) -> Result<State> {
    let out = r.run(&Script::new(STATE, &[("name", name)]), None)?;
    if out.stdout.lines().any(|l| l == "MISSING") {
        return Ok(State {
            exists: false,
            running: false,
            exit_code: None,
            logs: String::new(),
        });
    }
    let mut words = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("STATE "))
        .unwrap_or("")
        .split_whitespace();
    let running = words.next() == Some("true");
    let exit_code = words.next().and_then(|c| c.parse().ok());
    let logs = out
        .stdout
        .split_once("LOGS\n")
        .map(|(_, l)| l.trim_end().to_string())
        .unwrap_or_default();
    Ok(State {
        exists: true,
        running,
        exit_code,
        logs,
    })
}

/// One container as `docker ps -a --format '{{json .}}'` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub state: String,
    pub labels: BTreeMap<String, String>,
    /// The first host port it publishes (`127.0.0.1:32768->8080/tcp`), while running.
    pub host_port: Option<u16>,
}

/// Containers labelled `cutover.app=<app>`.
pub fn list(r: &dyn Remote, app: &str) -> Result<Vec<Listed>> {
    let filter = format!("label=cutover.app={app}");
    let out = r.run(
        &Script::new(
            "docker ps -a --no-trunc --filter {filter} --format '{{json .}}'",
            &[("filter", &filter)],
        ),
        None,
    )?;
    if !out.success() {
        return Err(fail(r, &out, "docker ps"));
    }
    Ok(out.stdout.lines().filter_map(parse_listed).collect())
}

fn parse_listed(line: &str) -> Option<Listed> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let labels = v["Labels"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Listed {
        name: v["Names"].as_str()?.to_string(),
        state: v["State"].as_str().unwrap_or("").to_string(),
        labels,
        host_port: v["Ports"]
            .as_str()
            .and_then(|p| p.split(',').next())
            .and_then(|p| p.split_once("->"))
            .and_then(|(host, _)| host.rsplit(':').next())
            .and_then(|port| port.trim().parse().ok()),
    })
}

/// Removes an image from the host (no error if absent or in use).
pub fn remove_image(r: &dyn Remote, reference: &str) -> Result<()> {
    r.run(
        &Script::new(
            "docker image rm {image} >/dev/null 2>&1; exit 0",
            &[("image", reference)],
        ),
        None,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_strips_tag_and_digest() {
        assert_eq!(repository("10.0.0.1:5000/web:v1"), "10.0.0.1:5000/web");
        assert_eq!(
            repository("10.0.0.1:5000/web@sha256:ab"),
            "10.0.0.1:5000/web"
        );
        assert_eq!(repository("web"), "web");
        assert_eq!(repository("web:v2"), "web");
        assert_eq!(
            repository("registry:5000/team/web"),
            "registry:5000/team/web"
        );
    }

    #[test]
    fn parses_docker_ps_json() {
        let l = parse_listed(r#"{"Names":"site-20261126T091500Z-3f9a2c1","State":"exited","Labels":"cutover.app=site,cutover.release=20261126T091500Z-3f9a2c1"}"#).unwrap();
        assert_eq!(l.name, "site-20261126T091500Z-3f9a2c1");
        assert_eq!(l.state, "exited");
        assert_eq!(l.labels["cutover.release"], "20261126T091500Z-3f9a2c1");
        assert_eq!(l.host_port, None);
        let l = parse_listed(
            r#"{"Names":"a","State":"running","Labels":"","Ports":"127.0.0.1:32768->8080/tcp"}"#,
        )
        .unwrap();
        assert_eq!(l.host_port, Some(32768));
    }

    #[test]
    fn templates_have_every_placeholder_filled() {
        let none: Vec<String> = Vec::new();
        let _ = Script::new(PULL, &[("image", "x")]);
        let _ = Script::with(
            RUN,
            &[
                ("name", Arg::One("n")),
                ("labels", Arg::Many(&none)),
                ("publish", Arg::One("p")),
                ("env", Arg::Many(&none)),
                ("volumes", Arg::Many(&none)),
                ("image", Arg::One("i")),
                ("cport", Arg::One("8080/tcp")),
            ],
        );
        let _ = Script::new(START, &[("name", "n"), ("cport", "1/tcp")]);
        let _ = Script::new(STATE, &[("name", "n")]);
    }

    #[test]
    fn spec_debug_redacts_env_values() {
        let env: BTreeMap<String, String> = [("TOKEN".to_string(), "hunter2".to_string())].into();
        let spec = ContainerSpec {
            name: "n",
            image: "i",
            port: 1,
            env: &env,
            volumes: &[],
            labels: &[],
        };
        let d = format!("{spec:?}");
        assert!(d.contains("TOKEN") && !d.contains("hunter2"), "{d}");
    }
}

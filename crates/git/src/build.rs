//! Running a build command: `sh -c COMMAND` in a fresh checkout, in a clean environment, in
//! its own process group, with a timeout ([`run`]; [`run_command`] runs any prepared command,
//! e.g. `docker build`, the same way). Output (stdout and stderr) is handed over line by
//! line as it arrives. When the command overruns its timeout, or when it exits and leaves
//! processes behind, its whole process tree is killed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines kept for error messages.
const TAIL_LINES: usize = 15;
/// Longest line handed over; longer lines are cut.
const MAX_LINE: usize = 4096;

/// Why a build did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot start the build command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the build command exited with status {code} after {:.1}s; last output:\n{tail}", elapsed.as_secs_f64())]
    Failed {
        code: i32,
        elapsed: Duration,
        tail: String,
    },
    #[error("the build command was killed by signal {signal} after {:.1}s; last output:\n{tail}", elapsed.as_secs_f64())]
    Signaled {
        signal: i32,
        elapsed: Duration,
        tail: String,
    },
    #[error("the build command ran longer than its timeout of {}s and was killed, with every process it started; last output:\n{tail}", timeout.as_secs_f64())]
    TimedOut { timeout: Duration, tail: String },
}

/// A finished, successful build.
#[derive(Debug, Clone)]
pub struct Success {
    pub elapsed: Duration,
    pub lines: u64,
}

/// The environment a build sees: nothing of this process's environment but `PATH`, `HOME` and
/// `LANG`, then the names listed in `pass_env` (when set here), then `env`.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub vars: Vec<(String, String)>,
    /// `pass_env` names that are not set in this process (not passed).
    pub missing: Vec<String>,
}

impl Environment {
    pub fn clean(env: &[(String, String)], pass_env: &[String]) -> Environment {
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| {
            vars.retain(|(name, _)| name != k);
            vars.push((k.to_string(), v));
        };
        set(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        );
        if let Ok(home) = std::env::var("HOME") {
            set("HOME", home);
        }
        set(
            "LANG",
            std::env::var("LANG")
                .ok()
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| "C.UTF-8".into()),
        );
        let mut missing = Vec::new();
        for name in pass_env {
            match std::env::var(name) {
                Ok(v) => set(name, v),
                Err(_) => missing.push(name.clone()),
            }
        }
        for (k, v) in env {
            set(k, v.clone());
        }
        Environment { vars, missing }
    }
}

/// Runs `sh -c command` in `dir` with exactly `env`, calling `on_line` with every line of
/// output as it arrives, and kills the command's process tree if it runs past `timeout`.
pub fn run(
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<Success, BuildError> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    run_command(cmd, timeout, on_line)
}

/// Runs `cmd` (program, arguments, directory and environment as the caller set them) the way
/// [`run`] runs a build command: stdin from /dev/null, stdout and stderr handed to `on_line`
/// line by line as they arrive, in its own process group, its whole process tree killed when
/// it runs past `timeout` or when it exits and leaves processes behind.
pub fn run_command(
    mut cmd: Command,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<Success, BuildError> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(BuildError::Spawn)?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, tx.clone());
        readers += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, tx.clone());
        readers += 1;
    }
    drop(tx);
    let _ = readers;

    let mut tail: VecDeque<String> = VecDeque::new();
    let mut lines = 0u64;
    let mut take = |line: String, tail: &mut VecDeque<String>| {
        lines += 1;
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let mut open = true;
    let status = loop {
        if open {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    take(line, &mut tail);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(_) => {
                kill_tree(pid);
                break child.wait().map_err(BuildError::Spawn)?;
            }
        }
        if start.elapsed() > timeout {
            kill_tree(pid);
            let _ = child.wait();
            drain(&rx, Duration::from_secs(2), &mut |l| take(l, &mut tail));
            return Err(BuildError::TimedOut {
                timeout,
                tail: joined(&tail),
            });
        }
    };
    // Whatever the command left running in its group goes too: a build does not leave
    // daemons behind, and their open pipes would keep the output open.
    kill_tree(pid);
    drain(&rx, Duration::from_secs(2), &mut |l| take(l, &mut tail));
    let elapsed = start.elapsed();
    if let Some(signal) = status.signal() {
        return Err(BuildError::Signaled {
            signal,
            elapsed,
            tail: joined(&tail),
        });
    }
    match status.code() {
        Some(0) => Ok(Success { elapsed, lines }),
        code => Err(BuildError::Failed {
            code: code.unwrap_or(-1),
            elapsed,
            tail: joined(&tail),
        }),
    }
}

fn joined(tail: &VecDeque<String>) -> String {
    if tail.is_empty() {
        return "  (no output)".into();
    }
    tail.iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn drain(rx: &mpsc::Receiver<String>, within: Duration, take: &mut dyn FnMut(String)) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => take(line),
            Err(_) => return,
        }
    }
}

fn spawn_reader(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    buf.truncate(MAX_LINE);
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// SIGKILLs the process group `pid` leads and every descendant of `pid` (including those that
/// left the group with setsid), repeating until none is left or a second has passed.
fn kill_tree(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut targets = descendants(pid);
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        targets.retain(|p| *p != pid);
        if !targets.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(targets.iter().map(|p| p.to_string()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if descendants(pid).is_empty() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (not zombie) descendants of `root`, read from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0);
        if state != "Z" && state != "X" {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cutover-build-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn streams_lines_and_succeeds() {
        let d = tmp("ok");
        let env = Environment::clean(&[("GREETING".into(), "hi".into())], &[]);
        let mut got = Vec::new();
        let r = run(
            "echo $GREETING; echo err >&2; echo ${SECRET:-unset}",
            &d,
            &env.vars,
            Duration::from_secs(10),
            &mut |l| got.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(r.lines, 3);
        got.sort();
        assert_eq!(got, ["err", "hi", "unset"]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn clean_environment_has_only_what_is_declared() {
        let env = Environment::clean(
            &[("A".into(), "1".into())],
            &["CUTOVER_TEST_SURELY_UNSET".into()],
        );
        let names: Vec<&str> = env.vars.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"PATH") && names.contains(&"LANG") && names.contains(&"A"));
        assert_eq!(env.missing, ["CUTOVER_TEST_SURELY_UNSET"]);
        assert!(names.len() <= 4, "{names:?}");
    }

    #[test]
    fn run_command_keeps_the_callers_environment_and_streams() {
        let d = tmp("cmd");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo \"$CUTOVER_RUN_COMMAND_T\"; echo two >&2; exit 4",
        ])
        .current_dir(&d)
        .env("CUTOVER_RUN_COMMAND_T", "inherited");
        let mut got = Vec::new();
        let e = run_command(cmd, Duration::from_secs(10), &mut |l| {
            got.push(l.to_string())
        })
        .unwrap_err();
        got.sort();
        assert_eq!(got, ["inherited", "two"]);
        assert!(matches!(e, BuildError::Failed { code: 4, .. }), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn failure_carries_the_tail() {
        let d = tmp("fail");
        let e = run(
            "echo one; echo two; exit 3",
            &d,
            &Environment::clean(&[], &[]).vars,
            Duration::from_secs(10),
            &mut |_| {},
        )
        .unwrap_err();
        match e {
            BuildError::Failed { code, tail, .. } => {
                assert_eq!(code, 3);
                assert!(tail.contains("two"), "{tail}");
            }
            other => panic!("{other}"),
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn timeout_kills_the_tree() {
        let d = tmp("hang");
        let pidfile = d.join("pid");
        let cmd = format!(
            "sleep 300 & echo $! > {p}; setsid sleep 301 & echo started; wait",
            p = pidfile.display()
        );
        let start = Instant::now();
        let e = run(
            &cmd,
            &d,
            &Environment::clean(&[], &[]).vars,
            Duration::from_millis(500),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, BuildError::TimedOut { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(8));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone or a zombie awaiting its reaper.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "sleep {pid} survived: {stat}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}

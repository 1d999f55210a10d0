//! What the numbers were measured on, read at run time: CPU and memory from `/proc`, the
//! kernel from `uname`, the cutover commit from `git` (read-only commands), the versions of
//! the tools on the data path (OpenSSH, tar, gzip) and of the peers the bench compares
//! cutover with (nginx, Caddy, Capistrano and its Ruby, the Docker Engine that the test hosts
//! run). Missing facts read as "unknown".

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// The machine and the software versions of one bench run.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu_model: String,
    pub(crate) mem_total: String,
    pub(crate) kernel: String,
    pub(crate) os: String,
    pub(crate) cutover_version: String,
    pub(crate) commit: String,
    /// Tracked files with uncommitted changes when the bench ran.
    pub(crate) dirty_files: Vec<String>,
    pub(crate) ssh: String,
    pub(crate) tar: String,
    pub(crate) gzip: String,
    /// `nginx -v`.
    pub(crate) nginx: String,
    /// `caddy version`.
    pub(crate) caddy: String,
    /// `cap --version`.
    pub(crate) capistrano: String,
    /// `ruby --version`.
    pub(crate) ruby: String,
    /// `dockerd --version`: the engine the test hosts run (testlab starts `/usr/sbin/dockerd`).
    pub(crate) docker: String,
    /// The cargo profile of the bench and of the cutover it measures: "release" or "dev".
    pub(crate) profile: &'static str,
}

/// stdout (or, if empty, stderr) of a command, trimmed; "unknown" if it cannot run.
fn output_of(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut c = Command::new(program);
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    match c.output() {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if out.is_empty() {
                String::from_utf8_lossy(&o.stderr).trim().to_string()
            } else {
                out
            }
        }
        _ => "unknown".to_string(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("unknown").trim().to_string()
}

impl Machine {
    pub(crate) fn read(root: &Path, cutover: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        // Read-only git: `describe` without --dirty and `status` without optional locks never
        // write the index.
        let describe = output_of("git", &["describe", "--always", "--tags"], Some(root));
        let dirty = output_of(
            "git",
            &[
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            Some(root),
        );
        let dirty_files: Vec<String> = if dirty == "unknown" {
            Vec::new()
        } else {
            dirty
                .lines()
                .filter_map(|l| l.get(3..))
                .map(str::to_string)
                .collect()
        };
        let commit = if describe != "unknown" && !dirty_files.is_empty() {
            format!(
                "{describe} + uncommitted changes to {} tracked file(s)",
                dirty_files.len()
            )
        } else {
            describe
        };
        Machine {
            cores,
            cpu_model,
            mem_total,
            kernel: output_of("uname", &["-srm"], None),
            os,
            cutover_version: output_of(&cutover.display().to_string(), &["--version"], None),
            commit,
            dirty_files,
            ssh: first_line(&output_of("ssh", &["-V"], None)),
            tar: first_line(&output_of("tar", &["--version"], None)),
            gzip: first_line(&output_of("gzip", &["--version"], None)),
            nginx: first_line(&output_of("nginx", &["-v"], None)),
            caddy: first_line(&output_of("caddy", &["version"], None)),
            capistrano: first_line(&output_of("cap", &["--version"], None)),
            ruby: first_line(&output_of("ruby", &["--version"], None)),
            docker: first_line(&output_of(
                if Path::new("/usr/sbin/dockerd").exists() {
                    "/usr/sbin/dockerd"
                } else {
                    "dockerd"
                },
                &["--version"],
                None,
            )),
            profile: if crate::harness::RELEASE {
                "release"
            } else {
                "dev"
            },
        }
    }

    /// One line for the head of a section.
    pub(crate) fn one_line(&self) -> String {
        format!(
            "{} cores ({}), {} RAM, {}; cutover {} ({} profile)",
            self.cores, self.cpu_model, self.mem_total, self.kernel, self.commit, self.profile
        )
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu_model": self.cpu_model,
            "mem_total": self.mem_total,
            "kernel": self.kernel,
            "os": self.os,
            "cutover_version": self.cutover_version,
            "commit": self.commit,
            "uncommitted_changes_to": self.dirty_files,
            "ssh": self.ssh,
            "tar": self.tar,
            "gzip": self.gzip,
            "nginx": self.nginx,
            "caddy": self.caddy,
            "capistrano": self.capistrano,
            "ruby": self.ruby,
            "docker_engine": self.docker,
            "profile": self.profile,
        })
    }
}

/// `/proc/loadavg`'s three load averages, e.g. "0.52 0.61 0.70".
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

//! Reporting, shared by every scenario: timing samples summarized as "median (min–max)",
//! markdown tables, the raw JSON in `bench/results/<scenario>.json`, and `BENCHMARKS.md`,
//! whose head (machine, versions, how to reproduce, how to read) is rewritten on every run
//! and whose per-scenario sections, between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`,
//! are replaced only for the scenarios that ran.

use crate::meter::Sample;
use crate::{Ctx, Scenario, SCENARIOS};
use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use std::path::Path;

/// What a scenario hands back: the body of its BENCHMARKS.md section and its raw results.
pub(crate) struct Section {
    pub(crate) markdown: String,
    pub(crate) json: Value,
}

/// Repeated runs of one thing: wall times, and CPU seconds where known.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(pub(crate) Vec<Sample>);

/// "97% (89–105%)": the median of some ratios with their range, in percent.
pub(crate) fn ratio_cell(v: &[f64]) -> String {
    let (m, lo, hi) = spread(v);
    if v.len() > 1 {
        format!("{:.0}% ({:.0}–{:.0}%)", 100.0 * m, 100.0 * lo, 100.0 * hi)
    } else {
        format!("{:.0}%", 100.0 * m)
    }
}

/// cutover's requests/s and p99 over nginx's, one pair per run in which both took the same
/// load seconds apart. On a machine whose speed drifts by tens of percent within an hour,
/// neighbouring loads compare the proxies; medians of whole cells compare the hours.
pub(crate) struct Paired(pub(crate) Vec<(f64, f64)>);

impl Paired {
    /// The header of a table of [`Paired::row`]s, `title` naming what its rows are.
    pub(crate) fn header(title: &str) -> [&str; 5] {
        [
            title,
            "requests/s",
            "cutover ahead",
            "p99",
            "cutover's p99 no worse",
        ]
    }

    /// `label`, then the ratios' medians with their ranges and in how many runs cutover was
    /// ahead (requests/s) or no worse (p99).
    pub(crate) fn row(&self, label: &str) -> Vec<String> {
        let (rps, p99): (Vec<f64>, Vec<f64>) = self.0.iter().copied().unzip();
        let n = self.0.len();
        vec![
            label.to_string(),
            ratio_cell(&rps),
            format!("{} of {n}", rps.iter().filter(|&&r| r >= 1.0).count()),
            ratio_cell(&p99),
            format!("{} of {n}", p99.iter().filter(|&&r| r <= 1.0).count()),
        ]
    }

    /// The medians of the requests/s and p99 ratios.
    pub(crate) fn medians(&self) -> (f64, f64) {
        let (rps, p99): (Vec<f64>, Vec<f64>) = self.0.iter().copied().unzip();
        (spread(&rps).0, spread(&p99).0)
    }

    /// Issue 12's goal: at least nginx's throughput and no worse p99, at the medians.
    pub(crate) fn met(&self) -> bool {
        let (rps, p99) = self.medians();
        !self.0.is_empty() && rps >= 1.0 && p99 <= 1.0
    }
}

/// Median, min and max of some numbers (0 for none; the median of an even count is the mean
/// of the two middle ones).
pub(crate) fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

impl Samples {
    pub(crate) fn push(&mut self, s: Sample) {
        self.0.push(s);
    }

    fn walls(&self) -> Vec<f64> {
        self.0.iter().map(|s| s.secs).collect()
    }

    /// Median wall time.
    pub(crate) fn median(&self) -> f64 {
        spread(&self.walls()).0
    }

    /// Wall time as "1.23 s (1.20–1.31)", "1.23 s" for a single run, "–" for none.
    pub(crate) fn cell(&self) -> String {
        let (med, min, max) = spread(&self.walls());
        match self.0.len() {
            0 => "–".into(),
            1 => format!("{} s", secs(med)),
            _ => format!("{} s ({}–{})", secs(med), secs(min), secs(max)),
        }
    }

    /// Median CPU seconds of the bench's processes, "–" if unknown.
    pub(crate) fn cpu_cell(&self) -> String {
        let cpu: Vec<f64> = self.0.iter().filter_map(|s| s.cpu_s).collect();
        if cpu.is_empty() {
            return "–".into();
        }
        format!("{} s", secs(spread(&cpu).0))
    }

    /// Other processes' CPU seconds and the wall seconds, summed over the runs.
    pub(crate) fn foreign_and_wall(&self) -> (f64, f64) {
        self.0
            .iter()
            .fold((0.0, 0.0), |(f, w), s| (f + s.foreign_cpu_s, w + s.secs))
    }

    pub(crate) fn to_json(&self) -> Value {
        let (median, min, max) = spread(&self.walls());
        json!({
            "median_s": median,
            "min_s": min,
            "max_s": max,
            "runs": self.0.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        })
    }
}

/// How much other work on the machine disturbed these runs, in one sentence.
pub(crate) fn interference_line(all: &[&Samples], cores: usize, redone: usize) -> String {
    let (foreign, wall) = all.iter().fold((0.0, 0.0), |(f, w), s| {
        let (a, b) = s.foreign_and_wall();
        (f + a, w + b)
    });
    let waited = all
        .iter()
        .flat_map(|s| s.0.iter().map(|x| x.waited_s))
        .fold(0.0, f64::max);
    let share = if wall > 0.0 {
        100.0 * foreign / (wall * cores.max(1) as f64)
    } else {
        0.0
    };
    format!(
        "Before each timed run the bench waited for an idle machine (up to 20 s; longest wait \
         here {waited:.1} s); during the timed runs kept, processes outside the bench (other \
         work on this shared machine) used {share:.0}% of the machine's CPU time. Repetitions \
         redone because other processes took over a quarter of the CPU during one of their \
         timed runs: {redone} (their runs are in the JSON under `discarded`)."
    )
}

/// Seconds with two decimals.
pub(crate) fn secs(s: f64) -> String {
    format!("{s:.2}")
}

/// Bytes in MiB with one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A markdown table (cells must not contain `|`).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for r in rows {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    out
}

/// The line every section starts with: when, on what, with which command.
pub(crate) fn measured_line(
    ctx: &Ctx,
    load_before: &str,
    load_after: &str,
    took: std::time::Duration,
) -> String {
    let t = took.as_secs();
    format!(
        "Measured {} on {} with `{}` ({} run(s) per cell); the scenario took {}m{:02}s in all \
         (setup and untimed steps included). Load average before / after: {load_before} / \
         {load_after}.",
        utc_now(),
        ctx.machine.one_line(),
        ctx.command,
        ctx.reps,
        t / 60,
        t % 60
    )
}

/// Links to a scenario's rendered plots (file, title), for the end of its section.
pub(crate) fn plot_links(plots: &[(String, String)]) -> String {
    plots
        .iter()
        .map(|(file, title)| {
            let alt: String = title.chars().filter(|c| !matches!(c, '[' | ']')).collect();
            format!("\n\n![{alt}](bench/results/{file})")
        })
        .collect::<String>()
        + if plots.is_empty() { "" } else { "\n" }
}

/// Writes `bench/results/<name>.json` under `root` (the workspace root or `--out`).
pub(crate) fn write_json(root: &Path, name: &str, value: &Value) -> Result<()> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn open_marker(name: &str) -> String {
    format!("<!-- bench:{name} -->")
}

fn close_marker(name: &str) -> String {
    format!("<!-- /bench:{name} -->")
}

/// The sections of an existing BENCHMARKS.md, in file order: (name, whole marked block).
fn sections_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!-- bench:") {
        let after = &rest[start + "<!-- bench:".len()..];
        let Some(end_name) = after.find(" -->") else {
            break;
        };
        let name = after[..end_name].to_string();
        let close = close_marker(&name);
        let Some(close_at) = rest[start..].find(&close) else {
            break;
        };
        let end = start + close_at + close.len();
        out.push((name, rest[start..end].to_string()));
        rest = &rest[end..];
    }
    out
}

/// Rewrites BENCHMARKS.md: a fresh head, then every section; the one for `scenario` gets
/// `body`, the others keep what they had.
pub(crate) fn update_benchmarks_md(
    root: &Path,
    ctx: &Ctx,
    scenario: &Scenario,
    body: &str,
) -> Result<()> {
    let path = root.join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let known: Vec<(&str, &str)> = SCENARIOS.iter().map(|s| (s.name, s.title)).collect();
    let text = merge(
        &old,
        &head(ctx),
        &known,
        scenario.name,
        scenario.title,
        body,
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The new text of BENCHMARKS.md: `head`, then one block per known scenario in `known`
/// order (`name` gets `body`, the others their old block or a "not measured yet" line),
/// then the first block of each unknown name found in `old`, in file order.
fn merge(
    old: &str,
    head: &str,
    known: &[(&str, &str)],
    name: &str,
    title: &str,
    body: &str,
) -> String {
    let block = |n: &str, t: &str, b: &str| {
        format!(
            "{}\n## {t}\n\n{}\n{}",
            open_marker(n),
            b.trim_end(),
            close_marker(n)
        )
    };
    let existing = sections_of(old);
    let mut blocks = Vec::new();
    for &(n, t) in known {
        if n == name {
            blocks.push(block(n, title, body));
        } else if let Some((_, b)) = existing.iter().find(|(e, _)| e == n) {
            blocks.push(b.clone());
        } else {
            blocks.push(block(
                n,
                t,
                &format!("Not measured yet: run `cargo run --release -p cutover-bench -- {n}`."),
            ));
        }
    }
    let mut seen: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
    for (n, b) in &existing {
        if !seen.contains(&n.as_str()) {
            seen.push(n);
            blocks.push(b.clone());
        }
    }
    let mut text = head.to_string();
    for b in blocks {
        text.push('\n');
        text.push_str(&b);
        text.push('\n');
    }
    text
}

/// The head of BENCHMARKS.md: machine, versions, how to reproduce, how to read.
fn head(ctx: &Ctx) -> String {
    let m = &ctx.machine;
    let mut s = String::from("# cutover benchmarks\n\n");
    s.push_str(
        "Generated by `crates/bench` (`cutover-bench`); the sections below are replaced each \
         time their scenario runs, and this head is rewritten from the machine of the latest \
         run. Numbers are measurements, not guarantees: nothing here is asserted.\n\n",
    );
    s.push_str("## Machine and versions (latest run)\n\n");
    s.push_str(&format!(
        "- CPU: {} logical cores, {}\n- Memory: {}\n- Kernel: {} ({})\n",
        m.cores, m.cpu_model, m.mem_total, m.kernel, m.os
    ));
    s.push_str(&format!(
        "- cutover: {} (`{}`, {} profile)\n- OpenSSH: {}\n- {} / {}\n",
        m.commit, m.cutover_version, m.profile, m.ssh, m.tar, m.gzip
    ));
    s.push_str(&format!(
        "- Peers: nginx `{}`; Caddy `{}`; Capistrano `{}` on `{}`; Docker Engine on the test \
         hosts `{}`\n\n",
        m.nginx.trim_start_matches("nginx version: "),
        m.caddy,
        m.capistrano.trim_start_matches("Capistrano Version: "),
        m.ruby,
        m.docker
    ));
    s.push_str("## Reproduce\n\n");
    s.push_str(
        "As root, on Debian 12 with what testlab needs (`iproute2`, `util-linux`, \
         `openssh-server`, `nginx-light`, `tar`, `gzip`, `docker.io`, `docker-registry`) and \
         the peers (`caddy`, `capistrano`, `ruby-ed25519`, `ruby-bcrypt-pbkdf`, `rsync`) plus `curl` and \
         `git` installed:\n\n```sh\ncargo run --release -p cutover-bench -- all\n```\n\n",
    );
    s.push_str(&format!(
        "The latest run was `{}`. `<scenario>` instead of `all` runs one scenario; `--quick` \
         uses 10 MiB payloads, at most 4 hosts and one run per cell; `--reps N` sets the runs \
         per cell (default 3); `--host-bashrc` lets the hosts' SSH sessions source \
         `/root/.bashrc` (see below); `--out DIR` writes `BENCHMARKS.md` and `bench/results/` under \
         DIR instead of the workspace root. The bench builds `cutover` itself with its own \
         profile: `cargo build --release -p cutover` under `cargo run --release`; `--cutover \
         PATH` measures a binary built before instead. CI runs the bench with `--quick` after \
         the tests, as `target/debug/cutover-bench all --quick --cutover target/debug/cutover`, \
         both from the tests' own build (dev profile, unoptimized): its timings are not the \
         published ones and only its zero-downtime check counts (the run fails if any cutover method \
         had a failed request under load). Each section says how long its scenario took (a full \
         run of every scenario took about 37 minutes on a 2-core machine, 24 of them deploy-speed \
         with its 1 GiB cells). Raw samples: `bench/results/<scenario>.json`.\n\n",
        ctx.command
    ));
    s.push_str("## How to read the tables\n\n");
    s.push_str(
        "Every host is a testlab host: a Linux network namespace on this machine with its own \
         sshd, nginx and `/srv`, reached over a veth pair from the root namespace. So the \
         \"network\" is loopback-speed memory copies and every host's sshd, tar and nginx \
         share the same CPU cores with the cutover process: CPU, not network, is the limit, \
         and N hosts cost N times the CPU of one. Real deploys over a WAN would be bounded by \
         bandwidth instead. A cell is `median s (min–max)` of the runs; with one run it is \
         just the time. Wall times are measured by the bench around the child process \
         (`std::time::Instant` from spawn to exit). The machine may be shared with other \
         work, so before each timed run the bench waits (up to 20 s) until both cores are \
         nearly idle, and it reports how much CPU other processes still used during the \
         timed runs. CPU times (where shown) are the CPU seconds of every process the run \
         involved, on both ends (cutover, ssh and its control master, the hosts' sshd, tar and \
         nginx), read from a cpuacct cgroup that the bench process joins; they are a steadier \
         measure than wall time when the machine is busy.\n\n",
    );
    s.push_str(if ctx.host_bashrc {
        "The hosts' SSH sessions sourced this machine's `/root/.bashrc` in this run \
         (`--host-bashrc`): every SSH session pays whatever that file does.\n\n"
    } else {
        "The testlab hosts share this machine's `/root`, and Debian's bash sources \
         `~/.bashrc` for every command that sshd runs; on this development machine that file \
         runs `pyenv init`, about 0.1 s of CPU per SSH session, which a typical server does \
         not pay and which has nothing to do with cutover (cutover opens about four sessions \
         per host per deploy, the floor one). So testlab bind-mounts `/dev/null` over \
         `/root/.bashrc` inside each host's private mount namespace (never on the machine \
         itself), for the tests and the bench alike; `--host-bashrc` turns that off.\n\n"
    });
    for sc in SCENARIOS {
        s.push_str(&format!(
            "**{}** (`{}`): {}\n\n",
            sc.title, sc.name, sc.how_to_read
        ));
    }
    s
}

/// A scenario's JSON: the keys every scenario's starts with (which scenario, when it started
/// and finished, the command, whether `--quick`, the machine, the load averages before and
/// after), then `rest`'s (an object).
pub(crate) fn scenario_json(
    ctx: &Ctx,
    scenario: &str,
    started: &str,
    load_before: &str,
    load_after: &str,
    rest: Value,
) -> Value {
    let mut json = json!({
        "scenario": scenario,
        "started": started,
        "finished": utc_now(),
        "command": ctx.command,
        "quick": ctx.quick,
        "machine": ctx.machine.to_json(),
        "load_before": load_before,
        "load_after": load_after,
    });
    if let (Some(head), Value::Object(rest)) = (json.as_object_mut(), rest) {
        head.extend(rest);
    }
    json
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[1.0, 2.0]).0, 1.5);
        let at = |secs| Sample {
            secs,
            ..Sample::default()
        };
        assert_eq!(
            Samples(vec![at(3.0), at(1.0), at(2.0)]).cell(),
            "2.00 s (1.00–3.00)"
        );
        assert_eq!(Samples(vec![at(0.5)]).cell(), "0.50 s");
        assert_eq!(Samples(vec![at(0.5)]).cpu_cell(), "–");
    }

    #[test]
    fn sections_are_found_in_order() {
        let t =
            "head\n<!-- bench:a -->\nx\n<!-- /bench:a -->\nmid\n<!-- bench:b -->y<!-- /bench:b -->";
        let s = sections_of(t);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "a");
        assert_eq!(s[1].1, "<!-- bench:b -->y<!-- /bench:b -->");
    }

    #[test]
    fn merging_replaces_one_section_and_keeps_the_rest() {
        let known = [("a", "A"), ("b", "B")];
        let once = merge("", "HEAD\n", &known, "a", "A", "one");
        assert!(once.starts_with("HEAD\n"));
        assert!(once.contains("## A\n\none\n<!-- /bench:a -->"));
        assert!(once.contains("Not measured yet"));
        let twice = merge(&once, "HEAD2\n", &known, "b", "B", "two");
        let again = merge(&twice, "HEAD3\n", &known, "a", "A", "three");
        assert_eq!(again.matches("<!-- bench:a -->").count(), 1);
        assert_eq!(again.matches("<!-- bench:b -->").count(), 1);
        assert!(again.contains("three") && again.contains("two") && !again.contains("one"));
        assert!(again.starts_with("HEAD3\n") && !again.contains("HEAD2"));
        let foreign = format!("{again}\n<!-- bench:z -->\nzz\n<!-- /bench:z -->\n");
        let kept = merge(&foreign, "H\n", &known, "b", "B", "four");
        assert!(kept.contains("zz") && kept.contains("three") && kept.contains("four"));
        assert_eq!(kept.matches("<!-- bench:z -->").count(), 1);
    }

    #[test]
    fn plots_are_linked_relative_to_benchmarks_md() {
        assert_eq!(plot_links(&[]), "");
        let l = plot_links(&[
            ("a.svg".into(), "Switch [ms]".into()),
            ("b.svg".into(), "B".into()),
        ]);
        assert_eq!(
            l,
            "\n\n![Switch ms](bench/results/a.svg)\n\n![B](bench/results/b.svg)\n"
        );
    }

    #[test]
    fn tables_have_a_separator_row() {
        let t = table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}

//! `cutover-bench`: runs cutover's benchmarks against testlab hosts (network namespaces with
//! their own sshd and nginx on this machine) and reports the numbers: markdown tables on
//! stdout, a section per scenario in `BENCHMARKS.md`, raw samples in
//! `bench/results/<scenario>.json`. Numbers are reported, never asserted. Needs root.
//!
//! One module per scenario ([`deploy_speed`], [`rollback`], [`switch`], [`switch_files`],
//! [`proxy`], [`hosts`], [`tls`], [`footprint`]); to add one, write a module with a
//! `pub(crate) fn run(&Ctx) -> anyhow::Result<report::Section>` and register it in
//! [`SCENARIOS`] with the text that says how to read its table. The switch scenarios share
//! one skeleton ([`switching`]: a method trait, the load, the tables and plots); cutover's
//! steps are timed from its event stream (`--events`, [`events`]); the load comes from
//! testlab's generator (`testlab::Load`).
//!
//! After each scenario its JSON's `"plots"` are rendered to `bench/results/<file>` ([`plot`])
//! and linked from its section. After all of them, the run fails (exit 1) if any scenario's
//! `"cutover_failed"` map counts a failed request for a cutover method: the zero-downtime
//! gate that CI runs with `--quick`.

mod capistrano;
mod containers;
mod deploy_speed;
mod events;
mod footprint;
mod harness;
mod hosts;
mod machine;
mod meter;
mod panel;
mod peers;
mod plot;
mod proxy;
mod report;
mod rollback;
mod rollout;
mod switch;
mod switch_files;
mod switching;
mod tls;
mod tls_switch;
mod way_back;
mod webhooks;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use harness::Payload;
use serde_json::Value;
use std::cell::{OnceCell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A benchmark scenario: its name (CLI argument, section marker, JSON file name), a title,
/// how to read its table (goes into the head of BENCHMARKS.md) and the code that runs it.
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) title: &'static str,
    pub(crate) how_to_read: &'static str,
    pub(crate) run: fn(&Ctx) -> Result<report::Section>,
}

/// Every scenario, in the order `all` runs them and BENCHMARKS.md lists them.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "deploy-speed",
        title: "Deploy speed",
        how_to_read: deploy_speed::HOW_TO_READ,
        run: deploy_speed::run,
    },
    Scenario {
        name: "rollback",
        title: "Rollback latency",
        how_to_read: rollback::HOW_TO_READ,
        run: rollback::run,
    },
    Scenario {
        name: "rollout",
        title: "Rollout: the bake judged by the proxy",
        how_to_read: rollout::HOW_TO_READ,
        run: rollout::run,
    },
    Scenario {
        name: "switch",
        title: "Container switch under load",
        how_to_read: switch::HOW_TO_READ,
        run: switch::run,
    },
    Scenario {
        name: "switch-files",
        title: "Files app switch under load",
        how_to_read: switch_files::HOW_TO_READ,
        run: switch_files::run,
    },
    Scenario {
        name: "proxy",
        title: "Proxy overhead",
        how_to_read: proxy::HOW_TO_READ,
        run: proxy::run,
    },
    Scenario {
        name: "hosts",
        title: "Many hosts",
        how_to_read: hosts::HOW_TO_READ,
        run: hosts::run,
    },
    Scenario {
        name: "tls",
        title: "TLS and HTTP/2 termination",
        how_to_read: tls::HOW_TO_READ,
        run: tls::run,
    },
    Scenario {
        name: "panel",
        title: "Web panel",
        how_to_read: panel::HOW_TO_READ,
        run: panel::run,
    },
    Scenario {
        name: "webhooks",
        title: "Webhooks",
        how_to_read: webhooks::HOW_TO_READ,
        run: webhooks::run,
    },
    Scenario {
        name: "footprint",
        title: "Footprint",
        how_to_read: footprint::HOW_TO_READ,
        run: footprint::run,
    },
];

#[derive(Debug, Parser)]
#[command(
    name = "cutover-bench",
    about = "Benchmarks cutover against testlab hosts and writes BENCHMARKS.md (needs root)"
)]
struct Cli {
    /// A scenario name (see `SCENARIOS`: deploy-speed, rollback, switch, proxy, footprint, ...)
    /// or `all`.
    scenario: String,
    /// Small and fast: 10 MiB payloads, at most 4 hosts, one run per cell, 3 container
    /// switches per method, 3 s proxy loads.
    #[arg(long)]
    quick: bool,
    /// Runs per cell (default 3, or 1 with --quick); each cell reports median, min and max.
    #[arg(long)]
    reps: Option<usize>,
    /// Let the hosts' SSH sessions source this machine's /root/.bashrc (by default it is
    /// hidden from them; see BENCHMARKS.md).
    #[arg(long)]
    host_bashrc: bool,
    /// Where to write BENCHMARKS.md and bench/results/ (default: the workspace root, i.e. the
    /// committed files). CI's quick run may write elsewhere.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// deploy-speed only: run only these host counts (e.g. `--hosts 1,4`; default 1, 4, 16).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    hosts: Vec<usize>,
    /// deploy-speed only: run only these payload sizes (e.g. `--sizes 100MiB,1GiB`; default
    /// 10MiB, 100MiB, 1GiB).
    #[arg(long, value_delimiter = ',', value_name = "SIZE,...")]
    sizes: Vec<String>,
    /// Measure this `cutover` executable instead of building one (CI passes the one its test
    /// build made, so that no second build runs). The report names the bench's own profile for
    /// it: pass one built with that profile.
    #[arg(long, value_name = "PATH")]
    cutover: Option<PathBuf>,
}

/// What every scenario gets: settings, the cutover binary, a work dir, lazily made payloads.
pub(crate) struct Ctx {
    pub(crate) quick: bool,
    pub(crate) reps: usize,
    /// Whether the hosts' SSH sessions source this machine's `/root/.bashrc`.
    pub(crate) host_bashrc: bool,
    /// The `cutover` binary, built with the bench's own profile (release, or dev in CI).
    pub(crate) cutover: PathBuf,
    /// Scratch space for this run (payload directories); removed at the end.
    pub(crate) work: PathBuf,
    pub(crate) machine: machine::Machine,
    /// The command that reproduces this run.
    pub(crate) command: String,
    /// Times every run; owns the bench's cpuacct group.
    pub(crate) meter: meter::Meter,
    /// Where BENCHMARKS.md and bench/results/ are written.
    pub(crate) out: PathBuf,
    /// `--hosts`: the host counts deploy-speed runs (empty: its defaults).
    pub(crate) hosts: Vec<usize>,
    /// `--sizes`: the payload sizes deploy-speed runs, spaces removed (empty: its defaults).
    pub(crate) sizes: Vec<String>,
    /// The JSON of every scenario that already ran in this run, by name.
    pub(crate) results: RefCell<BTreeMap<&'static str, Value>>,
    payloads: OnceCell<(Payload, Payload)>,
}

impl Ctx {
    /// Files per payload and bytes per file: 400 x 256 KiB = 100 MiB (40 x 256 KiB with
    /// `--quick`).
    /// How often a disturbed repetition may be redone: never in a `--quick` run (its timings
    /// are not the published ones, and it must stay short).
    pub(crate) fn max_redos(&self) -> usize {
        if self.quick {
            0
        } else {
            meter::MAX_REDOS
        }
    }

    pub(crate) fn payload_shape(&self) -> (usize, usize) {
        if self.quick {
            (40, 256 << 10)
        } else {
            (400, 256 << 10)
        }
    }

    /// Two different payload directories of the same shape, "a" and "b" (made on first use).
    pub(crate) fn payloads(&self) -> Result<&(Payload, Payload)> {
        if let Some(p) = self.payloads.get() {
            return Ok(p);
        }
        let (files, size) = self.payload_shape();
        eprintln!(
            "[bench] writing two payloads of {files} x {} KiB pseudo-random files",
            size >> 10
        );
        let a = Payload::create(&self.work.join("payload-a"), "bench-a", files, size, 1)?;
        let b = Payload::create(&self.work.join("payload-b"), "bench-b", files, size, 2)?;
        Ok(self.payloads.get_or_init(|| (a, b)))
    }
}

/// Removes the work dir when the run ends, however it ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn workspace_root() -> PathBuf {
    // crates/bench -> the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let selected: Vec<&Scenario> = if cli.scenario == "all" {
        SCENARIOS.iter().collect()
    } else {
        match SCENARIOS.iter().find(|s| s.name == cli.scenario) {
            Some(s) => vec![s],
            None => bail!(
                "unknown scenario {:?}; expected one of: {}, all",
                cli.scenario,
                SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    };
    let reps = cli.reps.unwrap_or(if cli.quick { 1 } else { 3 });
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    let root = workspace_root();
    let out = match &cli.out {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.canonicalize()?
        }
        None => root.clone(),
    };
    let cutover = match &cli.cutover {
        Some(path) => harness::given_cutover(path)?,
        None => harness::build_cutover(&root)?,
    };
    let work = std::env::temp_dir().join(format!("cutover-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _work_guard = WorkDir(work.clone());

    let sizes: Vec<String> = cli.sizes.iter().map(|s| s.replace(' ', "")).collect();
    let command = reproduce_command(&cli, &sizes);
    let machine = machine::Machine::read(&root, &cutover);
    let ctx = Ctx {
        quick: cli.quick,
        reps,
        host_bashrc: cli.host_bashrc,
        cutover,
        work,
        machine,
        command,
        meter: meter::Meter::new(cli.quick),
        out,
        hosts: cli.hosts,
        sizes,
        results: RefCell::new(BTreeMap::new()),
        payloads: OnceCell::new(),
    };
    let mut failed: Vec<(String, String, u64)> = Vec::new();
    for s in selected {
        eprintln!("[bench] scenario {} ({} runs per cell)", s.name, ctx.reps);
        let mut section = (s.run)(&ctx).with_context(|| format!("scenario {}", s.name))?;
        let results_dir = ctx.out.join("bench/results");
        let (plots, plot_errors) = plot::write_all(&section.json, &results_dir);
        for e in &plot_errors {
            eprintln!("[bench] warning: scenario {}: a plot failed: {e}", s.name);
        }
        if !plots.is_empty() {
            section.markdown =
                section.markdown.trim_end().to_string() + &report::plot_links(&plots);
        }
        println!("## {}\n\n{}", s.title, section.markdown);
        report::write_json(&ctx.out, s.name, &section.json)?;
        report::update_benchmarks_md(&ctx.out, &ctx, s, &section.markdown)?;
        eprintln!(
            "[bench] wrote {1}/BENCHMARKS.md section {0}, {1}/bench/results/{0}.json and {2} plot(s)",
            s.name,
            ctx.out.display(),
            plots.len()
        );
        failed.extend(
            cutover_failures(&section.json)
                .into_iter()
                .map(|(m, n)| (s.name.to_string(), m, n)),
        );
        ctx.results.borrow_mut().insert(s.name, section.json);
    }
    if !failed.is_empty() {
        for (scenario, method, n) in &failed {
            eprintln!(
                "[bench] ZERO-DOWNTIME CHECK FAILED: scenario {scenario}: cutover method \
                 {method:?} had {n} failed request(s) under load"
            );
        }
        eprintln!("[bench] (the report was written; see its sections for the failures)");
        std::process::exit(1);
    }
    Ok(())
}

/// The command line that reproduces this run (`sizes` as `--sizes` takes them, spaces removed).
fn reproduce_command(cli: &Cli, sizes: &[String]) -> String {
    let mut command = format!(
        "cargo run {}-p cutover-bench -- {}",
        if harness::RELEASE { "--release " } else { "" },
        cli.scenario
    );
    if cli.quick {
        command.push_str(" --quick");
    }
    if let Some(r) = cli.reps {
        command.push_str(&format!(" --reps {r}"));
    }
    if cli.host_bashrc {
        command.push_str(" --host-bashrc");
    }
    if let Some(d) = &cli.out {
        command.push_str(&format!(" --out {}", d.display()));
    }
    if let Some(c) = &cli.cutover {
        command.push_str(&format!(" --cutover {}", c.display()));
    }
    let join = |v: Vec<String>| v.join(",");
    if !cli.hosts.is_empty() {
        command.push_str(&format!(
            " --hosts {}",
            join(cli.hosts.iter().map(|n| n.to_string()).collect())
        ));
    }
    if !sizes.is_empty() {
        command.push_str(&format!(" --sizes {}", sizes.join(",")));
    }
    command
}

/// The entries of a scenario's `"cutover_failed"` map that counted a failed request (a
/// count that is not a number counts as failed too: the gate must not pass by accident).
fn cutover_failures(json: &Value) -> Vec<(String, u64)> {
    json["cutover_failed"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(method, n)| match n.as_u64() {
                    Some(0) => None,
                    Some(n) => Some((method.clone(), n)),
                    None => Some((method.clone(), u64::MAX)),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_gate_names_every_cutover_method_with_failures() {
        let j = json!({"cutover_failed": {"blue-green": 0, "hold": 3, "files": "x"}});
        let mut f = cutover_failures(&j);
        f.sort();
        assert_eq!(
            f,
            vec![("files".to_string(), u64::MAX), ("hold".to_string(), 3)]
        );
        assert!(cutover_failures(&json!({"cutover_failed": {"a": 0}})).is_empty());
        assert!(cutover_failures(&json!({})).is_empty());
    }
}

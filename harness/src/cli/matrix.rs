//! The benchmark matrix on the command line: `hvbench plan`, `hvbench run --cell ID |
//! --shard K/N` (a bundle), `hvbench merge` and `hvbench matrix run` (the whole plan on
//! this machine). The logic is the matrix crate's; here are the processes and the output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use matrix::bundle::{run_bundle, BundleInfo, CellOutcome, Executor, Manifest, ToolRef};
use matrix::file::Need;
use matrix::merge::{merge, Finding, MergeOptions};
use matrix::{Cell, MatrixFile, Plan};
use reports::matrix::CellStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    /// Shards, cells and their commands, one a line.
    Text,
    /// The whole plan: cells (id, host, backend, paging, workloads, repeat, command),
    /// shards, exclusions.
    Json,
    /// `{"include": [...]}` for GitHub Actions' `strategy.matrix: ${{ fromJSON(...) }}`.
    Github,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The matrix file (e.g. ci/matrix.toml).
    pub matrix: PathBuf,
    /// Jobs to pack the cells into (default: one per host label); at least one per host
    /// label, at most one per cell.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub shards: Option<u32>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: PlanFormat,
}

/// `hvbench run --matrix FILE --cell ID | --shard K/N --bundle DIR`.
#[derive(Debug, Args)]
pub struct PartArgs {
    /// The matrix file the cell or shard is planned from.
    #[arg(long, requires = "bundle",
          conflicts_with_all = ["workloads", "out", "append", "repeat", "params", "guest"])]
    pub matrix: Option<PathBuf>,
    /// Run one cell of the plan (its id from `hvbench plan`).
    #[arg(long, requires = "matrix", conflicts_with = "shard")]
    pub cell: Option<String>,
    /// Run shard K of N (as `hvbench plan --shards N` printed it).
    #[arg(long, requires = "matrix")]
    pub shard: Option<String>,
    /// Bundle directory: the records of each cell and manifest.json.
    #[arg(long, requires = "matrix")]
    pub bundle: Option<PathBuf>,
    /// The hvbench binary of an interleaved revision, LABEL=PATH (repeatable); cells
    /// without a revision run this hvbench.
    #[arg(long = "hvbench", value_parser = parse_binary)]
    pub binaries: Vec<(String, PathBuf)>,
}

impl PartArgs {
    pub fn given(&self) -> bool {
        self.matrix.is_some()
    }
}

fn parse_binary(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((label, path)) if !label.is_empty() && !path.is_empty() => {
            Ok((label.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("`{text}` is not LABEL=PATH")),
    }
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Bundle directories (of `hvbench run --cell/--shard`).
    #[arg(required = true)]
    pub bundles: Vec<PathBuf>,
    /// The merged results directory (records, matrix.json, cell logs).
    #[arg(long)]
    pub out: PathBuf,
    /// Check against this matrix file's plan (default: the plan the bundles carry).
    #[arg(long)]
    pub matrix: Option<PathBuf>,
    /// Merge even when planned cells are missing or never ended (they are named).
    #[arg(long)]
    pub allow_missing: bool,
    /// Merge records of several hvbench revisions under one revision label.
    #[arg(long)]
    pub allow_mixed_revisions: bool,
    /// Merge records of several record schemas.
    #[arg(long)]
    pub allow_mixed_schemas: bool,
}

#[derive(Debug, Subcommand)]
pub enum MatrixAction {
    /// Run every cell whose host this machine satisfies (its `needs`), in plan order, into
    /// OUT/bundle; merge into OUT/merged and report into OUT/report.
    Run {
        /// The matrix file.
        matrix: PathBuf,
        /// Output directory (created; must not hold a bundle).
        #[arg(long)]
        out: PathBuf,
        /// The hvbench binary of an interleaved revision, LABEL=PATH (repeatable).
        #[arg(long = "hvbench", value_parser = parse_binary)]
        binaries: Vec<(String, PathBuf)>,
    },
}

fn load_plan(path: &Path) -> Result<Plan> {
    let file = MatrixFile::load(path)?;
    Plan::new(&file).with_context(|| format!("planning {}", path.display()))
}

/// `hvbench plan`.
pub fn plan(args: &PlanArgs) -> Result<i32> {
    let plan = load_plan(&args.matrix)?;
    let n = args.shards.map_or(plan.hosts().len(), |n| n as usize);
    let shards = plan.shards(n)?;
    match args.format {
        PlanFormat::Text => hvbench::tell!("{}", matrix::plan::render_text(&plan, &shards)),
        PlanFormat::Github => {
            hvbench::tell_line!("{}", matrix::plan::github_matrix(&shards));
        }
        PlanFormat::Json => {
            let value = serde_json::json!({ "plan": plan, "shards": shards });
            hvbench::tell_line!("{}", serde_json::to_string_pretty(&value)?);
        }
    }
    Ok(0)
}

/// Starts cells as `hvbench` processes, each in its own process group (Ctrl-C reaches
/// it through this process, once) and bound to this one (it gets SIGINT if hvbench
/// dies), output into the cell's log.
struct Spawner {
    own: PathBuf,
    binaries: BTreeMap<String, PathBuf>,
    cancel: &'static AtomicBool,
}

/// How long a cell may take to stop after it was asked to.
const STOP_GRACE: Duration = Duration::from_secs(120);

impl Spawner {
    fn new(binaries: &[(String, PathBuf)], plan: &Plan) -> Result<Spawner> {
        let binaries: BTreeMap<String, PathBuf> = binaries.iter().cloned().collect();
        for label in &plan.revisions {
            if !binaries.contains_key(label) {
                bail!("the plan interleaves revision `{label}`: pass --hvbench {label}=PATH");
            }
        }
        Ok(Spawner {
            own: std::env::current_exe().context("hvbench's own executable")?,
            binaries,
            cancel: hvbench::interrupt::install(),
        })
    }

    /// The cell's argv with `hvbench` as a path and its `--out` in the bundle.
    fn argv(&self, cell: &Cell, out: &Path) -> Result<Vec<String>, String> {
        let exe = match &cell.revision {
            None => &self.own,
            Some(label) => self
                .binaries
                .get(label)
                .ok_or_else(|| format!("no --hvbench {label}=PATH"))?,
        };
        let exe = exe.display().to_string();
        let placeholder = format!("cells/{}", cell.id);
        let mut argv = cell.argv.clone();
        for i in 0..argv.len() {
            let after_separator = i > 0 && argv[i - 1] == "--";
            if argv[i] == "hvbench" && (i == 0 || after_separator) {
                argv[i] = exe.clone();
            } else if argv[i] == placeholder && i > 0 && argv[i - 1] == "--out" {
                argv[i] = out.display().to_string();
            }
        }
        Ok(argv)
    }

    fn spawn(argv: &[String], log: &Path) -> std::io::Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(log)?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGINT))
                    .map_err(std::io::Error::from)
            });
        }
        command.spawn()
    }
}

impl Executor for Spawner {
    fn run(&mut self, cell: &Cell, out: &Path, log: &Path) -> CellOutcome {
        let failed = |message: String| CellOutcome {
            exit_code: None,
            message: Some(message),
            interrupted: false,
        };
        let argv = match self.argv(cell, out) {
            Ok(argv) => argv,
            Err(message) => return failed(message),
        };
        let mut child = match Self::spawn(&argv, log) {
            Ok(child) => child,
            Err(e) => return failed(format!("cannot start {}: {e}", argv[0])),
        };
        let mut asked: Option<Instant> = None;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return CellOutcome {
                        exit_code: status.code(),
                        message: status
                            .code()
                            .is_none()
                            .then(|| format!("hvbench ended by a signal ({status})")),
                        interrupted: asked.is_some(),
                    };
                }
                Ok(None) => {}
                Err(e) => return failed(format!("cannot wait for hvbench: {e}")),
            }
            if self.cancel.load(Ordering::SeqCst) {
                match asked {
                    None => {
                        let pid = nix::unistd::Pid::from_raw(child.id().cast_signed());
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                        asked = Some(Instant::now());
                    }
                    Some(at) if at.elapsed() > STOP_GRACE => {
                        let _ = child.kill();
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn now(&self) -> String {
        hostutil::rfc3339(SystemTime::now())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

fn bundle_info(part: String) -> BundleInfo {
    let tool = hvbench::run::tool_info();
    BundleInfo {
        part,
        hvbench: ToolRef {
            version: tool.version,
            git_revision: tool.git_revision,
        },
        host: hvbench::host::fingerprint(),
    }
}

/// The exit status of a bundle: 0 when every cell succeeded, 130 when interrupted,
/// 3 otherwise.
fn exit_status(manifest: &Manifest) -> i32 {
    let statuses: Vec<CellStatus> = manifest.cells.iter().map(|c| c.status).collect();
    if statuses
        .iter()
        .any(|s| matches!(s, CellStatus::Interrupted | CellStatus::Pending))
    {
        super::EXIT_INTERRUPTED
    } else if statuses.iter().all(|s| *s == CellStatus::Succeeded) {
        0
    } else {
        super::EXIT_NOT_ALL_SUCCEEDED
    }
}

fn say_progress(line: &str) {
    hvbench::say!("hvbench: {line}");
}

/// `hvbench run --matrix FILE --cell ID | --shard K/N --bundle DIR`.
pub fn run_part(args: &PartArgs) -> Result<i32> {
    let (Some(path), Some(bundle)) = (&args.matrix, &args.bundle) else {
        bail!("--matrix needs --bundle and one of --cell or --shard");
    };
    let plan = load_plan(path)?;
    let (part, cells) = match (&args.cell, &args.shard) {
        (Some(id), None) => (format!("cell {id}"), vec![plan.cell(id)?]),
        (None, Some(spec)) => {
            let shard = plan.shard(spec)?;
            (format!("shard {}", shard.name()), shard.cells)
        }
        _ => bail!("--matrix needs one of --cell ID or --shard K/N"),
    };
    let mut spawner = Spawner::new(&args.binaries, &plan)?;
    hvbench::say!(
        "hvbench: {part} of matrix {} ({} cell(s)) into {}",
        plan.name,
        cells.len(),
        bundle.display()
    );
    let manifest = run_bundle(
        &plan,
        &cells,
        bundle,
        bundle_info(part),
        &mut spawner,
        &mut say_progress,
    )?;
    hvbench::tell_line!(
        "Bundle: {}",
        bundle.join(matrix::bundle::MANIFEST_NAME).display()
    );
    Ok(exit_status(&manifest))
}

fn print_findings(findings: &[Finding]) {
    for f in findings {
        hvbench::say!("hvbench: merge: {f}");
    }
}

/// `hvbench merge`.
pub fn merge_cmd(args: &MergeArgs) -> Result<i32> {
    let options = MergeOptions {
        allow_missing: args.allow_missing,
        allow_mixed_revisions: args.allow_mixed_revisions,
        allow_mixed_schemas: args.allow_mixed_schemas,
        plan: args.matrix.as_deref().map(load_plan).transpose()?,
    };
    let merged = merge(&args.bundles, &args.out, &options)?;
    for w in &merged.warnings {
        hvbench::say!("hvbench: warning: {w}");
    }
    print_findings(&merged.findings);
    let ok = merged
        .summary
        .cells
        .iter()
        .filter(|c| c.status.completed())
        .count();
    hvbench::tell_line!(
        "{}: {} records of {} cell(s) ({} ran to their end) from {} bundle(s)",
        args.out.display(),
        merged.records,
        merged.summary.cells.len(),
        ok,
        args.bundles.len()
    );
    Ok(0)
}

/// Whether this machine offers `need`, and if not, why.
fn unmet(need: Need) -> Option<String> {
    let ok = match need {
        Need::Kvm => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        Need::Qemu => std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file())
        }),
        Need::XenLab => lab::xen_host().is_ok(),
        Need::KvmLab => lab::default_cache_dir()
            .and_then(|d| <lab::KvmLab as lab::Lab>::status(&d).ok().flatten())
            .is_some_and(|s| s.healthy()),
        Need::Libvirt => hvbench::backend::libvirt::probe(hvbench::backend::libvirt::DEFAULT_URI)
            .versions
            .is_ok(),
    };
    (!ok).then(|| match need {
        Need::Kvm => "/dev/kvm does not open".to_string(),
        Need::Qemu => "qemu-system-x86_64 is not on PATH".to_string(),
        Need::XenLab => "the Xen lab is not up (hvbench lab up xen)".to_string(),
        Need::KvmLab => "the KVM lab is not up (hvbench lab up kvm)".to_string(),
        Need::Libvirt => format!(
            "libvirt does not answer at {}",
            hvbench::backend::libvirt::DEFAULT_URI
        ),
    })
}

/// `hvbench matrix run`.
pub fn matrix_run(action: &MatrixAction) -> Result<i32> {
    let MatrixAction::Run {
        matrix: path,
        out,
        binaries,
    } = action;
    let file = MatrixFile::load(path)?;
    let plan = Plan::new(&file)?;
    let mut here = Vec::new();
    let class = hvbench::host::fingerprint().class;
    for host in &file.hosts {
        let mut reasons: Vec<String> = host.needs.iter().filter_map(|n| unmet(*n)).collect();
        if let Some(wanted) = host.class.as_ref().filter(|c| **c != class) {
            reasons.push(format!("it is a {wanted} host, this one is {class}"));
        }
        if reasons.is_empty() {
            here.push(host.label.as_str());
        } else {
            hvbench::say!(
                "hvbench: matrix: not running host {} here: {}",
                host.label,
                reasons.join("; ")
            );
        }
    }
    // The plan of this machine's hosts: the others' cells are not "missing" here.
    let plan = plan.restricted(&here);
    let cells: Vec<usize> = (0..plan.cells.len()).collect();
    if cells.is_empty() {
        bail!("no host of {} can run on this machine", path.display());
    }
    let mut spawner = Spawner::new(binaries, &plan)?;
    let started = Instant::now();
    let bundle = out.join("bundle");
    let manifest = run_bundle(
        &plan,
        &cells,
        &bundle,
        bundle_info("local".into()),
        &mut spawner,
        &mut say_progress,
    )?;
    hvbench::say!(
        "hvbench: matrix: {} cell(s) in {:.1} s",
        cells.len(),
        started.elapsed().as_secs_f64()
    );
    let merged_dir = out.join("merged");
    let options = MergeOptions {
        allow_missing: true,
        ..Default::default()
    };
    let merged = merge(&[bundle], &merged_dir, &options)?;
    print_findings(&merged.findings);
    if merged.records > 0 {
        let report = reports::report::render(
            std::slice::from_ref(&merged_dir),
            &out.join("report"),
            &reports::report::ReportOptions {
                title: format!("hvbench matrix {}", plan.name),
                ..Default::default()
            },
        )?;
        hvbench::tell_line!("Report: {}", report.index.display());
    }
    hvbench::tell_line!(
        "Merged: {} ({} records)",
        merged_dir.display(),
        merged.records
    );
    Ok(exit_status(&manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_label_equals_path() {
        assert_eq!(
            parse_binary("base=/x/hvbench"),
            Ok(("base".into(), PathBuf::from("/x/hvbench")))
        );
        assert!(parse_binary("base").is_err() && parse_binary("=x").is_err());
    }

    #[test]
    fn a_part_takes_its_options_from_the_plan() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let mut argv = vec!["hvbench", "run"];
            argv.extend(args);
            super::super::Cli::try_parse_from(argv).map_err(|e| e.to_string())
        };
        let part = ["--matrix", "m.toml", "--shard", "1/2", "--bundle", "b"];
        parse(&part).unwrap();
        for extra in [
            &["-w", "cpu.*"][..],
            &["--backend", "kvm"],
            &["--out", "x"],
            &["--repeat", "2"],
        ] {
            let mut args = part.to_vec();
            args.extend(extra);
            let e = parse(&args).unwrap_err();
            assert!(e.contains("cannot be used with"), "{extra:?}: {e}");
        }
        assert!(
            parse(&["--matrix", "m.toml", "--shard", "1/2"]).is_err(),
            "--bundle is needed"
        );
        assert!(parse(&["--cell", "c1"]).is_err(), "--matrix is needed");
        assert!(parse(&["-w", "cpu.*"]).is_err(), "--backend is needed");
    }
}

//! `hvbench report DIR... --out OUT`: one self-contained HTML page (`index.html`) with
//! charts beside it, comparing the backends found in the results directories.
//!
//! Records pool by backend kind and [`RecordKey`] across directories, runs and repeats.
//! The first backend (kvm, qemu, xen order, or `ReportOptions::baseline`) is backend A;
//! every other backend is compared with it: medians with bootstrap intervals, the ratio
//! A/B of the medians with its own interval, and a permutation test with a noise threshold
//! that decides whether one is faster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::abtest::{ab_test, AbOptions, AbResult};
use crate::bootstrap::{median_ci, ratio_of_medians_ci, BootstrapOptions, Estimate, StatsError};
use crate::format;
use crate::host::HostClass;
use crate::html;
use crate::matrix::MatrixSummary;
use crate::plot::{
    self, BarRow, ChartError, ChartFile, ChartFormat, CurveChart, GroupChart, SamplesChart,
};
use crate::pool::{group_rank, Pool, Pools, Problem};
use crate::record::{BackendInfo, GuestInfo, HostInfo, Record, RecordKey, RunParameters, ToolInfo};
use crate::results::{
    read_results_with_warnings, ResultsError, ResultsWarning, CSV_NAME, JSONL_NAME,
};

pub const INDEX_NAME: &str = "index.html";
pub const CHARTS_DIR: &str = "charts";

#[derive(Clone, Debug, PartialEq)]
pub struct ReportOptions {
    pub title: String,
    /// Backend A, which every other backend is compared with; default: the first of kvm,
    /// qemu, xen (then others by name) present in the records.
    pub baseline: Option<String>,
    pub bootstrap: BootstrapOptions,
    /// Decides "faster" versus "no significant difference".
    pub ab: AbOptions,
    /// Chart files to write; the page shows the first and links the others.
    pub formats: Vec<ChartFormat>,
    /// One strip chart of every sample per measurement (the group charts are always drawn).
    pub sample_charts: bool,
    pub group_chart_width: u32,
    pub sample_chart_width: u32,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            title: "hvbench report".into(),
            baseline: None,
            bootstrap: BootstrapOptions::default(),
            ab: AbOptions::default(),
            formats: vec![ChartFormat::Png, ChartFormat::Svg],
            sample_charts: true,
            group_chart_width: 960,
            sample_chart_width: 600,
        }
    }
}

/// What a report contains, for the command line to print.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportSummary {
    /// The page written: `<out>/index.html`.
    pub index: PathBuf,
    /// Backend kinds in report order; the first is backend A.
    pub backends: Vec<String>,
    pub records: usize,
    /// Distinct measurements (keys) shown.
    pub measurements: usize,
    /// Records that did not succeed (listed on the page with their reasons).
    pub problems: usize,
    pub charts: Vec<ChartFile>,
    /// Copies of the raw results, beside the page.
    pub raw_files: Vec<PathBuf>,
    /// The page's warning banners, as plain text.
    pub warnings: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("no results directory was given to report on")]
    NoInputs,
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("baseline backend {name:?} is not in the results, which hold: {available}")]
    UnknownBaseline { name: String, available: String },
    #[error("invalid report option: {0}")]
    Options(#[from] StatsError),
    #[error("invalid report option: chart widths must be between 200 and 10000 pixels")]
    ChartWidth,
    #[error("cannot create report directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chart(#[from] ChartError),
}

/// Reads every results directory in `dirs`, writes `<out>/index.html` with its charts
/// under `<out>/charts/` and copies of the raw results beside it, so `out` can be moved
/// or archived alone.
pub fn render(
    dirs: &[PathBuf],
    out: &Path,
    options: &ReportOptions,
) -> Result<ReportSummary, ReportError> {
    options.bootstrap.validate()?;
    options.ab.validate()?;
    let widths = [options.group_chart_width, options.sample_chart_width];
    if widths.iter().any(|w| !(200..=10_000).contains(w)) {
        return Err(ReportError::ChartWidth);
    }
    if dirs.is_empty() {
        return Err(ReportError::NoInputs);
    }
    let inputs = dirs
        .iter()
        .map(|dir| {
            let read = read_results_with_warnings(dir)?;
            Ok(Input {
                dir: dir.clone(),
                records: read.records,
                read_warnings: read.warnings,
            })
        })
        .collect::<Result<Vec<_>, ResultsError>>()?;

    let model = analyze(&inputs, options)?;

    let charts_dir = out.join(CHARTS_DIR);
    std::fs::create_dir_all(&charts_dir).map_err(|source| ReportError::CreateDir {
        path: charts_dir.clone(),
        source,
    })?;
    let raw = copy_raw_files(&inputs, &model.backend_names(), out)?;
    let curves = collect_curves(&inputs, &model.backend_names());
    let charts = draw_charts(&model, &inputs, &curves, &charts_dir, options)?;
    let matrices = read_matrices(dirs, out)?;
    let sched = crate::sched::rows(inputs.iter().flat_map(|i| &i.records));

    let page = html::render_page(&html::Page {
        title: &options.title,
        model: &model,
        charts: &charts,
        raw: &raw,
        matrices: &matrices,
        options,
        out,
        sched: &sched,
    });
    let index = out.join(INDEX_NAME);
    std::fs::write(&index, page).map_err(|source| ReportError::Write {
        path: index.clone(),
        source,
    })?;

    Ok(ReportSummary {
        index,
        backends: model.backend_names(),
        records: inputs.iter().map(|i| i.records.len()).sum(),
        measurements: model.measurements.len(),
        problems: model.problems.len(),
        charts: charts.all(),
        raw_files: raw
            .iter()
            .flat_map(|r| [Some(&r.jsonl), r.csv.as_ref()])
            .flatten()
            .map(|name| out.join(name))
            .collect(),
        warnings: model
            .warnings
            .iter()
            .map(|w| format!("{}: {}", w.title, w.detail))
            .collect(),
    })
}

/// The merged matrices among the inputs (`matrix.json`), with each cell's log copied
/// to `out/cells/` so the grid's links work wherever the report goes. A log path that is
/// not `cells/ID.log` of a plain cell id is dropped, not followed.
fn read_matrices(dirs: &[PathBuf], out: &Path) -> Result<Vec<MatrixSummary>, ReportError> {
    let mut matrices = Vec::new();
    for dir in dirs {
        let Some(mut summary) = MatrixSummary::read(dir)? else {
            continue;
        };
        for cell in &mut summary.cells {
            let Some(log) = cell.log.take() else { continue };
            let plain = cell.id.bytes().all(|b| b.is_ascii_alphanumeric()) && !cell.id.is_empty();
            if !plain || log != format!("cells/{}.log", cell.id) || !dir.join(&log).is_file() {
                continue;
            }
            let cells = out.join("cells");
            std::fs::create_dir_all(&cells).map_err(|source| ReportError::CreateDir {
                path: cells.clone(),
                source,
            })?;
            let (from, to) = (dir.join(&log), out.join(&log));
            std::fs::copy(&from, &to).map_err(|source| ReportError::Copy { from, to, source })?;
            cell.log = Some(log);
        }
        matrices.push(summary);
    }
    Ok(matrices)
}

/// One results directory and its records.
pub(crate) struct Input {
    pub dir: PathBuf,
    pub records: Vec<Record>,
    /// Lines the reader skipped (a torn last line, a damaged one).
    pub read_warnings: Vec<ResultsWarning>,
}

/// Everything known about one backend's side of the report.
#[derive(Clone, Debug, Default)]
pub(crate) struct BackendView {
    pub name: String,
    /// Distinct values across its records (usually one each).
    pub hosts: Vec<HostInfo>,
    pub infos: Vec<BackendInfo>,
    pub guests: Vec<GuestInfo>,
    pub parameters: Vec<RunParameters>,
    pub tools: Vec<ToolInfo>,
    pub run_ids: BTreeSet<String>,
    pub repeats: BTreeSet<u32>,
    pub records: usize,
    /// Indices of the input directories it came from.
    pub sources: BTreeSet<usize>,
    /// Every workload ran under full emulation (QEMU TCG): nothing is hardware-assisted.
    pub emulated_all: bool,
    /// Guest CPL0 code is emulated instruction by instruction (kvm_pvm hosts).
    pub emulated_cpl0: bool,
}

fn push_distinct<T: PartialEq + Clone>(values: &mut Vec<T>, value: &T) {
    if !values.contains(value) {
        values.push(value.clone());
    }
}

/// What makes a host the same host: not the figures measured each run (TSC rate, KSM
/// state), which vary from run to run on one machine.
fn host_identity(h: &HostInfo) -> impl PartialEq + '_ {
    (
        (&h.class, &h.hostname, &h.cpu_vendor, &h.cpu_model),
        (
            h.cpus,
            h.memory_mib,
            &h.kernel,
            &h.kvm_module,
            &h.paging,
            &h.cpl0,
        ),
    )
}

impl BackendView {
    fn add(&mut self, record: &Record, source: usize) {
        if !self
            .hosts
            .iter()
            .any(|h| host_identity(h) == host_identity(&record.host))
        {
            self.hosts.push(record.host.clone());
        }
        push_distinct(&mut self.infos, &record.backend);
        push_distinct(&mut self.guests, &record.guest);
        push_distinct(&mut self.parameters, &record.parameters);
        push_distinct(&mut self.tools, &record.hvbench);
        self.run_ids.insert(record.run_id.clone());
        self.repeats.insert(record.repeat);
        self.records += 1;
        self.sources.insert(source);
        self.emulated_all |= record.ran_under_tcg();
        self.emulated_cpl0 |= record.host.emulates_cpl0();
    }

    /// Whether `privilege` code of this backend ran emulated rather than virtualised.
    pub fn emulates(&self, privilege: &str) -> bool {
        self.emulated_all || (self.emulated_cpl0 && privilege == "cpl0")
    }
}

/// One backend's figures for one measurement.
#[derive(Clone, Debug)]
pub(crate) struct Cell {
    pub pool: Option<Pool>,
    pub median: Option<Estimate>,
    /// Why there is no median where the pool has samples (not finite, ...).
    pub error: Option<String>,
}

/// Backend A against another backend, for one measurement.
#[derive(Clone, Debug)]
pub(crate) struct Versus {
    /// median(A) / median(other).
    pub ratio: Option<Estimate>,
    /// A as the base, the other backend as B.
    pub test: Option<AbResult>,
    /// Whether the test took each run's median as one unit (enough runs on both sides);
    /// otherwise it pooled the samples of one run per side, which cannot see how much
    /// a boot moves all its samples together.
    pub per_run: bool,
}

/// One row of a group table.
#[derive(Clone, Debug)]
pub(crate) struct Measurement {
    pub key: RecordKey,
    pub group: String,
    pub unit: String,
    pub direction: Option<crate::abtest::Direction>,
    pub privilege: String,
    pub description: String,
    /// One per backend, in report order.
    pub cells: Vec<Cell>,
    /// One per backend after A (index i compares A with backend i + 1).
    pub versus: Vec<Versus>,
}

impl Measurement {
    pub fn anchor(&self) -> String {
        measurement_anchor(&self.key)
    }
}

pub(crate) fn measurement_anchor(key: &RecordKey) -> String {
    format!(
        "m-{}-{:08x}",
        format::slug(&key.workload, 48),
        format::short_hash(&key.to_string())
    )
}

/// A warning banner: the title and one explanation, plain text.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Warning {
    pub title: String,
    pub detail: String,
}

/// Non-success records of the same backend, key, status and reason, counted once.
#[derive(Clone, Debug)]
pub(crate) struct ProblemGroup {
    pub problem: Problem,
    pub count: usize,
    pub repeats: BTreeSet<u32>,
}

/// The analysed results: what the page and the charts show.
pub(crate) struct Model {
    pub inputs: Vec<InputView>,
    pub backends: Vec<BackendView>,
    pub measurements: Vec<Measurement>,
    pub problems: Vec<ProblemGroup>,
    pub warnings: Vec<Warning>,
    pub notices: Vec<String>,
    /// Instructions per operation by backend and paging mode, where records hold counts.
    pub insns: Option<crate::insns::InsnsTable>,
}

/// An input directory as the page describes it.
pub(crate) struct InputView {
    pub dir: PathBuf,
    pub records: usize,
    pub backends: Vec<String>,
}

impl Model {
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// Groups in page order with their measurements.
    pub fn groups(&self) -> Vec<(String, Vec<&Measurement>)> {
        let mut groups: BTreeMap<(usize, String), Vec<&Measurement>> = BTreeMap::new();
        for m in &self.measurements {
            groups
                .entry((group_rank(&m.group), m.group.clone()))
                .or_default()
                .push(m);
        }
        groups.into_iter().map(|((_, g), ms)| (g, ms)).collect()
    }
}

/// Seed for one statistic: the report's seed mixed with what it is about, so intervals of
/// different measurements do not share their random draws, yet every render matches.
fn seed_for(base: u64, parts: &[&str]) -> u64 {
    base ^ format::stable_hash(&parts.join("\u{1f}"))
}

fn analyze(inputs: &[Input], options: &ReportOptions) -> Result<Model, ReportError> {
    let pools = Pools::by_backend(inputs.iter().flat_map(|i| &i.records));
    let mut names = pools.backends();
    if let Some(baseline) = &options.baseline {
        let Some(position) = names.iter().position(|n| n == baseline) else {
            return Err(ReportError::UnknownBaseline {
                name: baseline.clone(),
                available: names.join(", "),
            });
        };
        let chosen = names.remove(position);
        names.insert(0, chosen);
    }

    let mut backends: Vec<BackendView> = names
        .iter()
        .map(|name| BackendView {
            name: name.clone(),
            ..Default::default()
        })
        .collect();
    for (source, input) in inputs.iter().enumerate() {
        for record in &input.records {
            if let Some(view) = backends.iter_mut().find(|b| b.name == record.backend.kind) {
                view.add(record, source);
            }
        }
    }

    let keys = pools.keys();
    let measurements: Vec<Measurement> = keys
        .par_iter()
        .map(|key| measure(key, &names, &pools, options))
        .collect();

    let inputs_view = inputs
        .iter()
        .map(|input| {
            let kinds: BTreeSet<&str> = input
                .records
                .iter()
                .map(|r| r.backend.kind.as_str())
                .collect();
            let mut kinds: Vec<String> = kinds.into_iter().map(str::to_string).collect();
            kinds.sort_by_key(|k| names.iter().position(|n| n == k));
            InputView {
                dir: input.dir.clone(),
                records: input.records.len(),
                backends: kinds,
            }
        })
        .collect();

    let (mut warnings, notices) = warnings(&backends, &measurements);
    warnings.extend(inputs.iter().flat_map(|input| {
        input.read_warnings.iter().map(|w| Warning {
            title: "A line of the results could not be read and was left out".to_string(),
            detail: w.to_string(),
        })
    }));
    Ok(Model {
        inputs: inputs_view,
        backends,
        measurements,
        problems: group_problems(&pools.problems, &names),
        warnings,
        notices,
        insns: crate::insns::table(inputs.iter().flat_map(|i| &i.records)),
    })
}

fn measure(
    key: &RecordKey,
    backends: &[String],
    pools: &Pools,
    options: &ReportOptions,
) -> Measurement {
    let cells: Vec<Cell> = backends
        .iter()
        .map(|backend| {
            let pool = pools.get(backend, key).cloned();
            let (median, error) = match &pool {
                Some(p) if p.is_measured() => {
                    let bootstrap = BootstrapOptions {
                        seed: seed_for(
                            options.bootstrap.seed,
                            &[backend, &key.to_string(), "median"],
                        ),
                        ..options.bootstrap.clone()
                    };
                    match median_ci(&p.samples, &bootstrap) {
                        Ok(e) => (Some(e), None),
                        Err(e) => (None, Some(e.to_string())),
                    }
                }
                _ => (None, None),
            };
            Cell {
                pool,
                median,
                error,
            }
        })
        .collect();
    let first = cells.iter().find_map(|c| c.pool.as_ref());
    let baseline = cells.first().and_then(|c| c.pool.as_ref());
    let direction = first.and_then(|p| p.direction);
    let versus = cells
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, cell)| {
            let a = baseline.filter(|p| p.is_measured());
            let b = cell.pool.as_ref().filter(|p| p.is_measured());
            let (Some(a), Some(b)) = (a, b) else {
                return Versus {
                    ratio: None,
                    test: None,
                    per_run: false,
                };
            };
            let name = &backends[i];
            let bootstrap = BootstrapOptions {
                seed: seed_for(options.bootstrap.seed, &[name, &key.to_string(), "ratio"]),
                ..options.bootstrap.clone()
            };
            let mut ab = options.ab.clone();
            ab.permutation.seed = seed_for(ab.permutation.seed, &[name, &key.to_string()]);
            let per_run =
                crate::abtest::smallest_attainable_p(a.run_medians.len(), b.run_medians.len())
                    < ab.p_threshold;
            let test = if per_run {
                ab_test(&a.run_medians, &b.run_medians, direction, &ab)
            } else {
                ab_test(&a.samples, &b.samples, direction, &ab)
            };
            Versus {
                ratio: ratio_of_medians_ci(&a.samples, &b.samples, &bootstrap).ok(),
                test: test.ok(),
                per_run,
            }
        })
        .collect();
    Measurement {
        key: key.clone(),
        group: first.map(|p| p.group.clone()).unwrap_or_default(),
        unit: first.map(|p| p.unit.clone()).unwrap_or_default(),
        direction,
        privilege: first.map(|p| p.privilege.clone()).unwrap_or_default(),
        description: first.map(|p| p.description.clone()).unwrap_or_default(),
        cells,
        versus,
    }
}

fn group_problems(problems: &[Problem], backends: &[String]) -> Vec<ProblemGroup> {
    let mut groups: Vec<ProblemGroup> = Vec::new();
    let mut index: BTreeMap<(String, RecordKey, String, Option<String>), usize> = BTreeMap::new();
    for p in problems {
        let id = (
            p.backend.clone(),
            p.key.clone(),
            p.status.name().to_string(),
            p.reason.clone(),
        );
        match index.get(&id) {
            Some(&i) => {
                groups[i].count += 1;
                groups[i].repeats.insert(p.repeat);
            }
            None => {
                index.insert(id, groups.len());
                groups.push(ProblemGroup {
                    problem: p.clone(),
                    count: 1,
                    repeats: BTreeSet::from([p.repeat]),
                });
            }
        }
    }
    groups.sort_by_key(|g| {
        (
            backends.iter().position(|b| *b == g.problem.backend),
            g.problem.key.clone(),
        )
    });
    groups
}

fn distinct<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let set: BTreeSet<&str> = values.into_iter().filter(|v| !v.is_empty()).collect();
    set.into_iter().map(str::to_string).collect()
}

/// Warning banners (the figures may mislead) and notices (what the page does).
fn warnings(backends: &[BackendView], measurements: &[Measurement]) -> (Vec<Warning>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut notices = Vec::new();
    match backends {
        [] => {}
        [only] => notices.push(format!(
            "Only {} records were given: this report shows {} alone, with nothing to compare \
             it against.",
            only.name, only.name
        )),
        [first, others @ ..] => {
            for other in others {
                warnings.extend(host_mismatches(first, other));
            }
        }
    }
    for (index, backend) in backends.iter().enumerate() {
        warnings.extend(backend_caveats(index, backend, measurements));
    }
    warnings.extend(unit_conflicts(measurements));
    (warnings, notices)
}

/// Where backend A and `other` ran on different kinds of host or CPU models.
fn host_mismatches(first: &BackendView, other: &BackendView) -> Vec<Warning> {
    let classes = |b: &BackendView| distinct(b.hosts.iter().map(|h| h.class.as_str()));
    let models = |b: &BackendView| distinct(b.hosts.iter().map(|h| h.cpu_model.as_str()));
    let mut warnings = Vec::new();
    if classes(first) != classes(other) {
        warnings.push(Warning {
            title: format!(
                "{} and {} ran on different kinds of host",
                first.name, other.name
            ),
            detail: format!(
                "{} ran on host class {}, {} on {}. The ratios mix the difference between the \
                 hosts with the difference between the hypervisors.",
                first.name,
                classes(first).join(" / "),
                other.name,
                classes(other).join(" / ")
            ),
        });
    }
    if models(first) != models(other) {
        warnings.push(Warning {
            title: format!(
                "{} and {} ran on different CPU models",
                first.name, other.name
            ),
            detail: format!(
                "{} ran on {}, {} on {}. Exit costs depend on the CPU generation; compare them \
                 only on the same CPU model.",
                first.name,
                models(first).join(" / "),
                other.name,
                models(other).join(" / ")
            ),
        });
    }
    warnings
}

/// What a reader must know about one backend's figures: emulation, nesting, pooled hosts.
fn backend_caveats(
    index: usize,
    backend: &BackendView,
    measurements: &[Measurement],
) -> Vec<Warning> {
    let classes = distinct(backend.hosts.iter().map(|h| h.class.as_str()));
    let mut warnings = Vec::new();
    if backend.emulated_all {
        warnings.push(Warning {
            title: format!("{} ran under emulation (TCG)", backend.name),
            detail: format!(
                "Host class {}: QEMU translated every guest instruction in software. Its \
                 figures measure that emulator, not hardware virtualization, and cannot be \
                 compared with a hardware-assisted backend.",
                classes.join(" / ")
            ),
        });
    }
    if backend.emulated_cpl0 {
        warnings.push(emulated_cpl0(index, backend, measurements, &classes));
    }
    let nested = |h: &HostInfo| h.class().machine == Some(HostClass::Nested);
    if backend.hosts.iter().any(nested) {
        warnings.push(Warning {
            title: format!(
                "{} ran nested, inside another virtual machine",
                backend.name
            ),
            detail: "Every exit of the guest is also handled by the outer hypervisor, which \
                     inflates exit costs several times over what the same hypervisor costs on \
                     bare metal."
                .into(),
        });
    }
    if backend.hosts.len() > 1 {
        warnings.push(Warning {
            title: format!(
                "{} records come from {} different hosts",
                backend.name,
                backend.hosts.len()
            ),
            detail: format!(
                "Their samples are pooled as one backend ({}): the host fingerprints below show \
                 every host. Report them separately unless the hosts are alike.",
                distinct(backend.hosts.iter().map(|h| h.hostname.as_str())).join(", ")
            ),
        });
    }
    warnings
}

/// The kvm_pvm caveat, naming the CPL0 workloads it applies to.
fn emulated_cpl0(
    index: usize,
    backend: &BackendView,
    measurements: &[Measurement],
    classes: &[String],
) -> Warning {
    let mut cpl0: Vec<&str> = measurements
        .iter()
        .filter(|m| m.privilege == "cpl0" && m.cells.get(index).is_some_and(|c| c.pool.is_some()))
        .map(|m| m.key.workload.as_str())
        .collect();
    cpl0.dedup();
    Warning {
        title: format!(
            "{} ran on a kvm_pvm host: guest CPL0 is emulated",
            backend.name
        ),
        detail: format!(
            "On this host (class {}) KVM's PVM module runs guest kernel-mode code by emulating \
             it instruction by instruction. The CPL0 workloads ({}) measure that emulator, not \
             a hardware VM exit; CPL3 workloads run natively and stay comparable.",
            classes.join(" / "),
            if cpl0.is_empty() {
                "none here".to_string()
            } else {
                cpl0.join(", ")
            }
        ),
    }
}

/// Measurements whose records disagree on the unit.
fn unit_conflicts(measurements: &[Measurement]) -> Option<Warning> {
    let conflicting: Vec<String> = measurements
        .iter()
        .filter(|m| {
            let pools = || m.cells.iter().filter_map(|c| c.pool.as_ref());
            pools().any(|p| !p.conflicting_units.is_empty() || p.unit != m.unit)
        })
        .map(|m| m.key.to_string())
        .collect();
    (!conflicting.is_empty()).then(|| Warning {
        title: "Records of the same measurement carry different units".into(),
        detail: format!(
            "{}: their samples should not be pooled or compared; regenerate the results with \
             one hvbench version.",
            conflicting.join(", ")
        ),
    })
}

/// The copies of one input's raw files, named relative to the report directory.
#[derive(Clone, Debug)]
pub(crate) struct RawCopy {
    pub input: usize,
    pub jsonl: String,
    pub csv: Option<String>,
}

fn copy_raw_files(
    inputs: &[Input],
    backends: &[String],
    out: &Path,
) -> Result<Vec<RawCopy>, ReportError> {
    let mut used = BTreeSet::new();
    let mut copies = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let kinds: BTreeSet<&str> = input
            .records
            .iter()
            .map(|r| r.backend.kind.as_str())
            .collect();
        let mut kinds: Vec<&str> = kinds.into_iter().collect();
        kinds.sort_by_key(|k| backends.iter().position(|b| b == k));
        let base = format::slug(&kinds.join("+"), 40);
        let mut stem = base.clone();
        let mut n = 2;
        while !used.insert(stem.clone()) {
            stem = format!("{base}-{n}");
            n += 1;
        }
        let copy = |name: &str, target: String| -> Result<Option<String>, ReportError> {
            let from = input.dir.join(name);
            if !from.is_file() {
                return Ok(None);
            }
            let to = out.join(&target);
            std::fs::copy(&from, &to).map_err(|source| ReportError::Copy {
                from: from.clone(),
                to: to.clone(),
                source,
            })?;
            Ok(Some(target))
        };
        let jsonl = copy(JSONL_NAME, format!("{stem}-{JSONL_NAME}"))?
            .unwrap_or_else(|| format!("{stem}-{JSONL_NAME}"));
        let csv = copy(CSV_NAME, format!("{stem}-{CSV_NAME}"))?;
        copies.push(RawCopy {
            input: i,
            jsonl,
            csv,
        });
    }
    Ok(copies)
}

/// The chart files of the report, by what they show.
#[derive(Clone, Debug, Default)]
pub(crate) struct Charts {
    /// (group, unit) -> its charts (several where the group has many measurements), each
    /// as the files of every format.
    pub groups: BTreeMap<(String, String), Vec<Vec<ChartFile>>>,
    /// measurement anchor -> files.
    pub samples: BTreeMap<String, Vec<ChartFile>>,
    /// (workload, curve name) -> files, for host-observed time series.
    pub curves: BTreeMap<(String, String), Vec<ChartFile>>,
    /// (workload, series) -> files, for the block workloads' completion-latency CDFs.
    pub cdfs: BTreeMap<(String, String), Vec<ChartFile>>,
    /// (workload, metric) -> files, for live migration's figures against the dirty rate.
    pub convergence: BTreeMap<(String, String), Vec<ChartFile>>,
}

impl Charts {
    fn all(&self) -> Vec<ChartFile> {
        self.groups
            .values()
            .flatten()
            .chain(self.samples.values())
            .chain(self.curves.values())
            .chain(self.cdfs.values())
            .chain(self.convergence.values())
            .flatten()
            .cloned()
            .collect()
    }
}

/// Measurements per group chart: beyond this a group gets several charts, so that no
/// chart grows taller than a screen or two.
const ROWS_PER_GROUP_CHART: usize = 40;

enum ChartJob {
    Group {
        group: String,
        unit: String,
        part: usize,
        chart: GroupChart,
    },
    Samples(String, SamplesChart),
    Curve((String, String), CurveChart),
    Cdf((String, String), CurveChart),
    Convergence((String, String), CurveChart),
}

impl ChartJob {
    fn stem(&self) -> String {
        match self {
            ChartJob::Group {
                group, unit, part, ..
            } => format!(
                "group-{}-{}-{:08x}-{part}",
                format::slug(group, 24),
                format::slug(unit, 16),
                format::short_hash(&format!("{group}\u{1f}{unit}"))
            ),
            ChartJob::Samples(anchor, _) => format!("samples-{anchor}"),
            ChartJob::Cdf((workload, series), _) => format!(
                "cdf-{}-{:08x}",
                format::slug(workload, 24),
                format::short_hash(&format!("{workload}\u{1f}{series}"))
            ),
            ChartJob::Convergence((workload, metric), _) => format!(
                "convergence-{}-{}-{:08x}",
                format::slug(workload, 24),
                format::slug(metric, 24),
                format::short_hash(&format!("{workload}\u{1f}{metric}"))
            ),
            ChartJob::Curve((workload, name), _) => format!(
                "curve-{}-{}-{:08x}",
                format::slug(workload, 24),
                format::slug(name, 24),
                format::short_hash(&format!("{workload}\u{1f}{name}"))
            ),
        }
    }
}

/// Percentage text of a confidence level: "95%".
pub(crate) fn level_text(level: f64) -> String {
    format!("{}%", format::tick(level * 100.0))
}

/// One host-observed time series across runs: the lines of one curve chart.
pub(crate) struct CurveSet {
    pub x_unit: String,
    pub y_unit: String,
    /// (label, points, backend index) per record that carried the curve.
    pub lines: Vec<(String, Vec<[f64; 2]>, usize)>,
}

/// Most lines one curve chart draws (one per run); further runs are left out, and the
/// chart's title says so.
const MAX_CURVE_LINES: usize = 12;

/// Every curve the records carry, by (workload, curve name).
fn collect_curves(inputs: &[Input], backends: &[String]) -> BTreeMap<(String, String), CurveSet> {
    let mut sets: BTreeMap<(String, String), CurveSet> = BTreeMap::new();
    for record in inputs.iter().flat_map(|i| &i.records) {
        let backend = backends
            .iter()
            .position(|b| *b == record.backend.kind)
            .unwrap_or(0);
        for (name, curve) in &record.curves {
            let set = sets
                .entry((record.workload.clone(), name.clone()))
                .or_insert_with(|| CurveSet {
                    x_unit: curve.x_unit.clone(),
                    y_unit: curve.y_unit.clone(),
                    lines: Vec::new(),
                });
            let short_run: String = record.run_id.chars().take(16).collect();
            set.lines.push((
                format!("{} {short_run} #{}", record.backend.kind, record.repeat),
                curve.points.clone(),
                backend,
            ));
        }
    }
    sets
}

fn draw_charts(
    model: &Model,
    inputs: &[Input],
    curves: &BTreeMap<(String, String), CurveSet>,
    dir: &Path,
    options: &ReportOptions,
) -> Result<Charts, ReportError> {
    let mut jobs = group_chart_jobs(model, options);
    if options.sample_charts {
        jobs.extend(sample_chart_jobs(model, options));
    }
    jobs.extend(curve_chart_jobs(curves, options));
    jobs.extend(cdf_chart_jobs(model, inputs, options));
    jobs.extend(convergence_chart_jobs(model, inputs, options));
    if options.formats.is_empty() {
        jobs.clear();
    }
    let drawn: Vec<Result<(ChartJob, Vec<ChartFile>), ChartError>> = jobs
        .into_par_iter()
        .map(|job| {
            let stem = job.stem();
            let files = match &job {
                ChartJob::Group { chart, .. } => {
                    plot::write_chart(chart, dir, &stem, &options.formats)?
                }
                ChartJob::Samples(_, chart) => {
                    plot::write_chart(chart, dir, &stem, &options.formats)?
                }
                ChartJob::Curve(_, chart)
                | ChartJob::Cdf(_, chart)
                | ChartJob::Convergence(_, chart) => {
                    plot::write_chart(chart, dir, &stem, &options.formats)?
                }
            };
            Ok((job, files))
        })
        .collect();
    let mut charts = Charts::default();
    for result in drawn {
        let (job, files) = result?;
        match job {
            ChartJob::Group { group, unit, .. } => {
                charts.groups.entry((group, unit)).or_default().push(files);
            }
            ChartJob::Samples(anchor, _) => {
                charts.samples.insert(anchor, files);
            }
            ChartJob::Curve(id, _) => {
                charts.curves.insert(id, files);
            }
            ChartJob::Cdf(id, _) => {
                charts.cdfs.insert(id, files);
            }
            ChartJob::Convergence(id, _) => {
                charts.convergence.insert(id, files);
            }
        }
    }
    remove_stale_charts(dir, &charts);
    Ok(charts)
}

/// One bar chart per group and unit (split in parts of `ROWS_PER_GROUP_CHART` rows).
fn group_chart_jobs(model: &Model, options: &ReportOptions) -> Vec<ChartJob> {
    let backends = model.backend_names();
    let level = level_text(options.bootstrap.level);
    let mut jobs = Vec::new();
    for (group, measurements) in model.groups() {
        let mut units: Vec<&str> = measurements.iter().map(|m| m.unit.as_str()).collect();
        units.sort();
        units.dedup();
        for unit in units {
            let rows: Vec<BarRow> = measurements
                .iter()
                .filter(|m| m.unit == unit && m.cells.iter().any(|c| c.median.is_some()))
                .map(|m| BarRow {
                    label: short_label(&m.key),
                    medians: m.cells.iter().map(|c| c.median).collect(),
                })
                .collect();
            let parts = rows.len().div_ceil(ROWS_PER_GROUP_CHART);
            for (part, chunk) in rows.chunks(ROWS_PER_GROUP_CHART).enumerate() {
                let mut title = format!("{group}: median {unit} per measurement, {level} CI");
                if parts > 1 {
                    title.push_str(&format!(" ({} of {parts})", part + 1));
                }
                jobs.push(ChartJob::Group {
                    group: group.clone(),
                    unit: unit.to_string(),
                    part,
                    chart: GroupChart {
                        title,
                        unit: unit.to_string(),
                        backends: backends.clone(),
                        rows: chunk.to_vec(),
                        width: options.group_chart_width,
                    },
                });
            }
        }
    }
    jobs
}

/// One chart of every sample per measured measurement, a series per backend.
fn sample_chart_jobs(model: &Model, options: &ReportOptions) -> Vec<ChartJob> {
    let backends = model.backend_names();
    let mut jobs = Vec::new();
    for m in &model.measurements {
        let series: Vec<(String, Vec<f64>, Option<Estimate>, usize)> = m
            .cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let pool = c.pool.as_ref().filter(|p| p.is_measured())?;
                Some((backends[i].clone(), pool.samples.clone(), c.median, i))
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let chart = SamplesChart {
            title: format!("{}: every sample", m.key),
            unit: m.unit.clone(),
            colors: series.iter().map(|s| s.3).collect(),
            series: series.into_iter().map(|(b, s, e, _)| (b, s, e)).collect(),
            width: options.sample_chart_width,
            seed: format::stable_hash(&m.key.to_string()),
        };
        jobs.push(ChartJob::Samples(m.anchor(), chart));
    }
    jobs
}

/// One line chart per host-observed curve, at most `MAX_CURVE_LINES` runs on it.
fn curve_chart_jobs(
    curves: &BTreeMap<(String, String), CurveSet>,
    options: &ReportOptions,
) -> Vec<ChartJob> {
    let mut jobs = Vec::new();
    for ((workload, name), set) in curves {
        let mut title = format!("{workload}: {name} over time");
        if set.lines.len() > MAX_CURVE_LINES {
            title.push_str(&format!(
                " (first {MAX_CURVE_LINES} of {} runs)",
                set.lines.len()
            ));
        }
        jobs.push(ChartJob::Curve(
            (workload.clone(), name.clone()),
            CurveChart {
                title,
                x_unit: set.x_unit.clone(),
                y_unit: set.y_unit.clone(),
                series: set.lines.iter().take(MAX_CURVE_LINES).cloned().collect(),
                width: options.sample_chart_width,
            },
        ));
    }
    jobs
}

/// One completion-latency CDF per block workload and series: a line per backend and one
/// for the native baseline.
fn cdf_chart_jobs(model: &Model, inputs: &[Input], options: &ReportOptions) -> Vec<ChartJob> {
    let records = inputs.iter().flat_map(|i| &i.records);
    crate::latency_cdf::collect(records, &model.backend_names())
        .into_iter()
        .map(|((workload, series), cdf)| {
            let title = format!("{workload} [{series}]: completion latency CDF");
            ChartJob::Cdf(
                (workload, series),
                CurveChart {
                    title,
                    x_unit: "µs".into(),
                    y_unit: "fraction of requests".into(),
                    series: cdf.lines,
                    width: options.sample_chart_width,
                },
            )
        })
        .collect()
}

/// Live migration's convergence: per `mig.*` workload and figure, a line per backend of
/// the figure against the dirty rate.
fn convergence_chart_jobs(
    model: &Model,
    inputs: &[Input],
    options: &ReportOptions,
) -> Vec<ChartJob> {
    let records = inputs.iter().flat_map(|i| &i.records);
    crate::convergence::collect(records, &model.backend_names())
        .into_iter()
        .map(|((workload, metric), curve)| {
            let title = format!("{workload}: {} against the dirty rate", curve.title);
            ChartJob::Convergence(
                (workload, metric),
                CurveChart {
                    title,
                    x_unit: "dirty rate, MB/s".into(),
                    y_unit: "ms".into(),
                    series: curve.lines,
                    width: options.sample_chart_width,
                },
            )
        })
        .collect()
}

/// Removes charts an earlier report left in `dir` that this one did not draw, so the
/// directory holds what the page shows. Only files named as this module names charts are
/// touched; failing to remove one is harmless, so errors are ignored.
fn remove_stale_charts(dir: &Path, charts: &Charts) {
    let current: BTreeSet<PathBuf> = charts.all().into_iter().map(|c| c.path).collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with("group-")
            || name.starts_with("samples-")
            || name.starts_with("curve-")
            || name.starts_with("cdf-")
            || name.starts_with("convergence-"))
            && (name.ends_with(".png") || name.ends_with(".svg"));
        if ours && !current.contains(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A measurement's label in charts: the workload, plus the metric and series where they
/// say something.
pub(crate) fn short_label(key: &RecordKey) -> String {
    let mut label = key.workload.clone();
    if key.metric != "latency" {
        label.push(' ');
        label.push_str(&key.metric);
    }
    if !key.series.is_empty() {
        label.push_str(&format!(" [{}]", key.series));
    }
    label
}

//! The report's model: every backend's side, each measurement's cells and comparison,
//! and the warnings, computed from the records before anything is drawn.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;

use super::error::ReportError;
use super::options::ReportOptions;

use crate::abtest::{ab_test, AbResult};
use crate::bootstrap::{median_ci, ratio_of_medians_ci, BootstrapOptions, Estimate};
use crate::format;
use crate::host::HostClass;
use crate::pool::{group_rank, Pool, Pools, Problem};
use crate::record::{BackendInfo, GuestInfo, HostInfo, Record, RecordKey, RunParameters, ToolInfo};
use crate::results::ResultsWarning;

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

pub(super) fn analyze(inputs: &[Input], options: &ReportOptions) -> Result<Model, ReportError> {
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

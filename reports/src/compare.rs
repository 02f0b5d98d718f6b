//! `hvbench compare BASE NEW`: every measurement both results directories hold, judged
//! with the A/B test of [`crate::abtest`] (permutation test and noise threshold), and the
//! measurements only one side holds. [`Comparison::has_regression`] drives the exit status.
//!
//! Measurements match by [`RecordKey`]. When each side holds a single backend they match
//! across backends (a kvm run against a qemu run compares the two); otherwise by backend
//! and key, so a kvm figure is never judged against a xen one by accident.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::abtest::{
    ab_test, judge, runs_needed, smallest_attainable_p, AbOptions, Change, Direction,
};
use crate::bootstrap::StatsError;
use crate::format::{self, terminal_safe};
use crate::matrix::MatrixSummary;
use crate::pool::{key_order, Pool, Pools};
use crate::record::{Record, RecordKey, Status};
use crate::results::{read_results_with_warnings, ResultsError};

#[derive(Clone, Debug, PartialEq)]
pub struct CompareOptions {
    /// Noise threshold, p-value threshold and permutation count.
    pub ab: AbOptions,
    /// The relative change that counts for instruction counts (`insns` records): counts
    /// under TCG are deterministic, so where both sides' spread is below this, the change
    /// of the medians decides alone, without a permutation test (see [`insns_rule`]).
    pub insns_threshold: f64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            ab: AbOptions::default(),
            insns_threshold: DEFAULT_INSNS_THRESHOLD,
        }
    }
}

/// 2%: counts of one exit path agreed within 0.1-1.9% over 5 runs in the Xen lab (a timer
/// tick inside a sample adds its handler's instructions), and a 3% change must count.
pub const DEFAULT_INSNS_THRESHOLD: f64 = 0.02;
/// The metric instruction-count records carry.
pub const INSNS_METRIC: &str = "insns";

impl CompareOptions {
    /// The options of `--noise` (a fraction: 0.05 = 5%) and `--p`.
    pub fn with_thresholds(noise: f64, p_threshold: f64) -> Self {
        CompareOptions {
            ab: AbOptions {
                noise,
                p_threshold,
                ..AbOptions::default()
            },
            insns_threshold: DEFAULT_INSNS_THRESHOLD,
        }
    }
}

#[derive(Debug, Error)]
pub enum CompareError {
    #[error("cannot read the BASE results: {0}")]
    Base(#[source] ResultsError),
    #[error("cannot read the NEW results: {0}")]
    New(#[source] ResultsError),
    #[error("invalid compare option: {0}")]
    Options(#[from] StatsError),
    #[error("invalid compare option: the insns threshold {0} must be a fraction in (0, 1)")]
    InsnsThreshold(f64),
}

/// One side of a measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    /// Pooled samples.
    pub n: usize,
    pub median: Option<f64>,
    pub mean: Option<f64>,
    /// The worst status among its records.
    pub status: Status,
    pub reason: Option<String>,
}

impl Side {
    fn of(pool: &Pool) -> Side {
        let median = crate::stats::median(&pool.samples);
        let mean = crate::stats::mean(&pool.samples);
        Side {
            n: pool.samples.len(),
            median,
            mean,
            status: pool.worst_status,
            reason: pool.reasons.iter().next().cloned(),
        }
    }
}

/// Which side lacks samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    Base,
    New,
    Both,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// NEW is significantly worse than BASE, beyond the noise threshold.
    Regression,
    /// NEW is significantly better than BASE, beyond the noise threshold.
    Improvement,
    NoSignificantChange,
    /// A significant change of a metric whose direction is unknown: counted as a
    /// regression, since it cannot be shown harmless.
    ChangedDirectionUnknown,
    /// Skipped, failed, crashed or timed out on one side (or both): nothing to compare.
    SkippedOrFailed {
        missing: Missing,
    },
    /// The samples cannot be tested (not finite numbers).
    Untestable {
        message: String,
    },
    /// Too few runs on a side for the test to reach the p threshold at all: each run (one
    /// boot) is one unit, since a boot shifts all its samples together.
    Inconclusive {
        base_runs: usize,
        new_runs: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComparisonRow {
    /// The backend (or "base → new" when single-backend sides of different kinds match).
    pub backend: String,
    pub key: RecordKey,
    pub unit: String,
    /// `None` where the records name a direction this version does not know.
    pub direction: Option<Direction>,
    pub base: Side,
    pub new: Side,
    /// (mean(new) - mean(base)) / |mean(base)| of the per-run medians: the change the
    /// noise threshold applies to (the permutation test is on those means).
    pub relative_change: Option<f64>,
    /// The same for the medians, shown beside it: heavy-tailed latencies move the mean
    /// more than the median.
    pub median_change: Option<f64>,
    /// The permutation test's p-value, Holm-adjusted over the comparison's measurements.
    pub p_value: Option<f64>,
    /// Runs (records with samples) on each side: the test's units.
    pub base_runs: usize,
    pub new_runs: usize,
    pub verdict: Verdict,
}

/// A measurement that only one side holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OneSided {
    pub backend: String,
    pub key: RecordKey,
    pub status: Status,
    pub n: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub base: PathBuf,
    pub new: PathBuf,
    pub noise: f64,
    pub p_threshold: f64,
    pub permutations: usize,
    /// The relative threshold of the instruction-count rule.
    pub insns_threshold: f64,
    pub rows: Vec<ComparisonRow>,
    pub only_in_base: Vec<OneSided>,
    pub only_in_new: Vec<OneSided>,
    /// Why the figures may not be comparable (different hosts, emulation, backends).
    pub notes: Vec<String>,
}

/// Compares the results in `new` with those in `base`.
pub fn compare(
    base: &Path,
    new: &Path,
    options: &CompareOptions,
) -> Result<Comparison, CompareError> {
    options.ab.validate()?;
    if !(options.insns_threshold > 0.0 && options.insns_threshold < 1.0) {
        return Err(CompareError::InsnsThreshold(options.insns_threshold));
    }
    let base_read = read_results_with_warnings(base).map_err(CompareError::Base)?;
    let new_read = read_results_with_warnings(new).map_err(CompareError::New)?;
    let base_matrix = MatrixSummary::read(base).map_err(CompareError::Base)?;
    let new_matrix = MatrixSummary::read(new).map_err(CompareError::New)?;
    let mut comparison = match (&base_matrix, &new_matrix) {
        (Some(b), Some(n)) => compare_matrices(
            (base, &base_read.records, b),
            (new, &new_read.records, n),
            options,
        ),
        _ => compare_records(base, new, &base_read.records, &new_read.records, options),
    };
    // Lines the reader skipped are said first: the comparison is of the rest.
    let skipped = base_read
        .warnings
        .iter()
        .chain(&new_read.warnings)
        .map(|w| format!("warning: {w}"));
    comparison.notes.splice(0..0, skipped);
    Ok(comparison)
}

fn kinds(records: &[Record]) -> BTreeSet<&str> {
    records.iter().map(|r| r.backend.kind.as_str()).collect()
}

fn compare_records(
    base_dir: &Path,
    new_dir: &Path,
    base: &[Record],
    new: &[Record],
    options: &CompareOptions,
) -> Comparison {
    let (base_kinds, new_kinds) = (kinds(base), kinds(new));
    let mut notes = Vec::new();
    let (base_pools, new_pools) = match (
        base_kinds.iter().collect::<Vec<_>>().as_slice(),
        new_kinds.iter().collect::<Vec<_>>().as_slice(),
    ) {
        ([b], [n]) => {
            let label = if b == n {
                b.to_string()
            } else {
                notes.push(format!(
                    "BASE ran on {b} and NEW on {n}: this compares the two backends, not two \
                     builds of one."
                ));
                format!("{b} → {n}")
            };
            (
                Pools::under_label(base, &label),
                Pools::under_label(new, &label),
            )
        }
        _ => (Pools::by_backend(base), Pools::by_backend(new)),
    };
    notes.extend(host_notes(base, new));
    compare_pooled(base_dir, new_dir, &base_pools, &new_pools, notes, options)
}

/// Two merged matrices, like with like: a measurement is compared only between cells of
/// the same host label, backend, paging and host fingerprint. Host labels whose
/// fingerprint changed are named, and their measurements stay one-sided.
fn compare_matrices(
    (base_dir, base, base_matrix): (&Path, &[Record], &MatrixSummary),
    (new_dir, new, new_matrix): (&Path, &[Record], &MatrixSummary),
    options: &CompareOptions,
) -> Comparison {
    let pools = |records: &[Record], matrix: &MatrixSummary| {
        let labels = matrix.labels_by_run();
        Pools::by_label(records, |r| {
            labels
                .get(r.run_id.as_str())
                .cloned()
                .unwrap_or_else(|| format!("{} (no matrix cell)", r.backend.kind))
        })
    };
    let (base_pools, new_pools) = (pools(base, base_matrix), pools(new, new_matrix));
    let fingerprints = |m: &MatrixSummary| {
        let mut map: std::collections::BTreeMap<(String, String, String), BTreeSet<String>> =
            Default::default();
        for c in m.cells.iter().filter(|c| !c.fingerprint.is_empty()) {
            map.entry((c.host.clone(), c.backend.clone(), c.paging.clone()))
                .or_default()
                .insert(c.fingerprint.clone());
        }
        map
    };
    let (b, n) = (fingerprints(base_matrix), fingerprints(new_matrix));
    let mut notes = vec![
        "Merged matrices: measurements are compared only between cells of the same host \
         label, backend, paging and host fingerprint."
            .to_string(),
    ];
    for (key, base_fp) in &b {
        if let Some(new_fp) = n.get(key).filter(|f| *f != base_fp) {
            notes.push(format!(
                "host label {} ({} paging {}): the host fingerprint differs (BASE {}, NEW {}); \
                 its measurements are not compared.",
                key.0,
                key.1,
                key.2,
                base_fp.iter().cloned().collect::<Vec<_>>().join("+"),
                new_fp.iter().cloned().collect::<Vec<_>>().join("+")
            ));
        }
    }
    notes.extend(
        host_notes(base, new)
            .into_iter()
            .filter(|n| !n.contains("different")),
    );
    compare_pooled(base_dir, new_dir, &base_pools, &new_pools, notes, options)
}

fn compare_pooled(
    base_dir: &Path,
    new_dir: &Path,
    base_pools: &Pools,
    new_pools: &Pools,
    notes: Vec<String>,
    options: &CompareOptions,
) -> Comparison {
    let base_ids: BTreeSet<(String, RecordKey)> = base_pools.pools.keys().cloned().collect();
    let new_ids: BTreeSet<(String, RecordKey)> = new_pools.pools.keys().cloned().collect();
    let one_sided = |ids: BTreeSet<&(String, RecordKey)>, pools: &Pools| -> Vec<OneSided> {
        let mut list: Vec<(&Pool, OneSided)> = ids
            .into_iter()
            .filter_map(|id| pools.pools.get(id))
            .map(|p| {
                (
                    p,
                    OneSided {
                        backend: p.backend.clone(),
                        key: p.key.clone(),
                        status: p.worst_status,
                        n: p.samples.len(),
                    },
                )
            })
            .collect();
        list.sort_by_cached_key(|(p, o)| (o.backend.clone(), key_order(&p.group, &p.key)));
        list.into_iter().map(|(_, o)| o).collect()
    };
    let only_in_base = one_sided(base_ids.difference(&new_ids).collect(), base_pools);
    let only_in_new = one_sided(new_ids.difference(&base_ids).collect(), new_pools);

    let mut common: Vec<(&Pool, &Pool)> = base_ids
        .intersection(&new_ids)
        .filter_map(|id| Some((base_pools.pools.get(id)?, new_pools.pools.get(id)?)))
        .collect();
    common.sort_by_cached_key(|(b, _)| (b.backend.clone(), key_order(&b.group, &b.key)));
    let mut rows: Vec<ComparisonRow> = common
        .into_iter()
        .map(|(b, n)| {
            insns_rule(b, n, options.insns_threshold)
                .unwrap_or_else(|| compare_pools(b, n, &options.ab))
        })
        .collect();
    apply_holm(&mut rows, &options.ab);

    Comparison {
        base: base_dir.to_path_buf(),
        new: new_dir.to_path_buf(),
        noise: options.ab.noise,
        p_threshold: options.ab.p_threshold,
        permutations: options.ab.permutation.resamples,
        insns_threshold: options.insns_threshold,
        rows,
        only_in_base,
        only_in_new,
        notes,
    }
}

fn compare_pools(base: &Pool, new: &Pool, options: &AbOptions) -> ComparisonRow {
    let mut row = ComparisonRow {
        backend: base.backend.clone(),
        key: base.key.clone(),
        unit: base.unit.clone(),
        direction: base.direction,
        base: Side::of(base),
        new: Side::of(new),
        relative_change: None,
        median_change: None,
        p_value: None,
        base_runs: base.run_medians.len(),
        new_runs: new.run_medians.len(),
        verdict: Verdict::NoSignificantChange,
    };
    if let (Some(b), Some(n)) = (row.base.median, row.new.median) {
        if b != 0.0 {
            row.median_change = Some((n - b) / b.abs());
        }
    }
    let missing = match (base.is_measured(), new.is_measured()) {
        (true, true) => None,
        (false, true) => Some(Missing::Base),
        (true, false) => Some(Missing::New),
        (false, false) => Some(Missing::Both),
    };
    if let Some(missing) = missing {
        row.verdict = Verdict::SkippedOrFailed { missing };
        return row;
    }
    // The units are runs: a boot moves all of its samples together, so a test on pooled
    // samples mistakes the machine's run-to-run drift for a change of the build.
    let (base_units, new_units) = (&base.run_medians, &new.run_medians);
    if smallest_attainable_p(base_units.len(), new_units.len()) >= options.p_threshold {
        let (mean_base, mean_new) = (
            crate::stats::mean(base_units),
            crate::stats::mean(new_units),
        );
        if let (Some(b), Some(n)) = (mean_base, mean_new) {
            if b != 0.0 {
                row.relative_change = Some((n - b) / b.abs());
            }
        }
        row.verdict = Verdict::Inconclusive {
            base_runs: base_units.len(),
            new_runs: new_units.len(),
        };
        return row;
    }
    // Each measurement gets its own permutation stream, reproducible run to run.
    let mut options = options.clone();
    options.permutation.seed ^= format::stable_hash(&format!("{}\u{1f}{}", base.backend, base.key));
    match ab_test(base_units, new_units, base.direction, &options) {
        Ok(result) => {
            row.relative_change = Some(result.relative_change);
            row.p_value = Some(result.p_value);
            row.verdict = result.change.into();
        }
        Err(e) => {
            row.verdict = Verdict::Untestable {
                message: e.to_string(),
            }
        }
    }
    row
}

/// The rule for instruction counts: where both sides measured an `insns` metric and the
/// spread of each (median absolute deviation over the median, over all its samples) is
/// below `threshold`, a change of the medians beyond `threshold` is a regression or an
/// improvement by the metric's direction, and anything less is no change; no permutation
/// test and no minimum of runs, since the counts do not drift as times do. None (the
/// usual test applies) for other metrics, failed sides, or counts that spread.
fn insns_rule(base: &Pool, new: &Pool, threshold: f64) -> Option<ComparisonRow> {
    if base.key.metric != INSNS_METRIC || !base.is_measured() || !new.is_measured() {
        return None;
    }
    let (b, n) = (
        crate::stats::median(&base.samples)?,
        crate::stats::median(&new.samples)?,
    );
    if !(b > 0.0 && n.is_finite()) || spread(&base.samples, b)? >= threshold {
        return None;
    }
    if spread(&new.samples, n)? >= threshold {
        return None;
    }
    let change = (n - b) / b;
    let verdict = if change.abs() <= threshold {
        Verdict::NoSignificantChange
    } else {
        match (base.direction, change > 0.0) {
            (Some(Direction::LowerIsBetter), true) | (Some(Direction::HigherIsBetter), false) => {
                Verdict::Regression
            }
            (Some(_), _) => Verdict::Improvement,
            (None, _) => Verdict::ChangedDirectionUnknown,
        }
    };
    Some(ComparisonRow {
        backend: base.backend.clone(),
        key: base.key.clone(),
        unit: base.unit.clone(),
        direction: base.direction,
        base: Side::of(base),
        new: Side::of(new),
        relative_change: Some(change),
        median_change: Some(change),
        p_value: None,
        base_runs: base.run_medians.len(),
        new_runs: new.run_medians.len(),
        verdict,
    })
}

/// Median absolute deviation over `median`.
fn spread(samples: &[f64], median: f64) -> Option<f64> {
    let deviations: Vec<f64> = samples.iter().map(|s| (s - median).abs()).collect();
    Some(crate::stats::median(&deviations)? / median)
}

/// Holm's step-down correction over every tested measurement: with many measurements per
/// comparison, a per-measurement p < 0.01 would still let runs of one build "regress"
/// somewhere; corrected, the chance of any false verdict stays below the threshold.
/// Replaces each tested row's p-value by its adjusted one and re-derives the verdict.
fn apply_holm(rows: &mut [ComparisonRow], options: &AbOptions) {
    let mut tested: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        // Only tested rows carry a p-value.
        .filter_map(|(i, r)| r.p_value.map(|p| (i, p)))
        .collect();
    tested.sort_by(|a, b| a.1.total_cmp(&b.1));
    let m = tested.len();
    // A measurement whose runs cannot give a p-value small enough to pass even Holm's
    // first step says so, instead of passing for "no change".
    for (i, _) in &tested {
        let row = &mut rows[*i];
        if smallest_attainable_p(row.base_runs, row.new_runs) * m as f64 >= options.p_threshold {
            row.verdict = Verdict::Inconclusive {
                base_runs: row.base_runs,
                new_runs: row.new_runs,
            };
        }
    }
    let mut running_max = 0.0f64;
    for (k, (i, p)) in tested.into_iter().enumerate() {
        running_max = running_max.max(((m - k) as f64 * p).min(1.0));
        let row = &mut rows[i];
        row.p_value = Some(running_max);
        if matches!(row.verdict, Verdict::Inconclusive { .. }) {
            continue;
        }
        let change = row.relative_change.unwrap_or(0.0);
        row.verdict = judge(running_max, change, row.direction, options).into();
    }
}

impl From<Change> for Verdict {
    fn from(change: Change) -> Self {
        match change {
            Change::Worse => Verdict::Regression,
            Change::Better => Verdict::Improvement,
            Change::Changed => Verdict::ChangedDirectionUnknown,
            Change::NoSignificantChange => Verdict::NoSignificantChange,
        }
    }
}

type RecordField = fn(&Record) -> &str;

/// Notes where BASE and NEW ran on different host classes or CPU models, or emulated.
fn host_notes(base: &[Record], new: &[Record]) -> Vec<String> {
    let distinct = |records: &[Record], field: fn(&Record) -> &str| -> Vec<String> {
        let set: BTreeSet<&str> = records
            .iter()
            .map(field)
            .filter(|v| !v.is_empty())
            .collect();
        set.into_iter().map(str::to_string).collect()
    };
    let mut notes = Vec::new();
    let fields: [(&str, RecordField); 2] = [
        ("host classes", |r| r.host.class.as_str()),
        ("CPU models", |r| r.host.cpu_model.as_str()),
    ];
    for (what, field) in fields {
        let (b, n) = (distinct(base, field), distinct(new, field));
        if b != n {
            notes.push(format!(
                "BASE and NEW ran on different {what} ({} vs {}): changes may come from the \
                 hosts, not the build.",
                b.join(" / "),
                n.join(" / ")
            ));
        }
    }
    for (side, records) in [("BASE", base), ("NEW", new)] {
        if records.iter().any(Record::ran_under_tcg) {
            notes.push(format!(
                "{side} ran under TCG emulation: its figures measure QEMU's emulator."
            ));
        }
        if records.iter().any(|r| r.host.emulates_cpl0()) {
            notes.push(format!(
                "{side} ran on a kvm_pvm host, where guest CPL0 code is emulated: cpl0 \
                 workloads measure that emulator."
            ));
        }
    }
    notes
}

impl Comparison {
    /// Whether any measurement regressed (or changed significantly in an unknown
    /// direction): the command's exit status 1.
    pub fn has_regression(&self) -> bool {
        self.rows.iter().any(|r| {
            matches!(
                r.verdict,
                Verdict::Regression | Verdict::ChangedDirectionUnknown
            )
        })
    }

    /// Runs per side with which every measurement of this comparison could reach the
    /// p threshold after Holm's correction.
    pub fn runs_needed(&self) -> usize {
        runs_needed(self.p_threshold, self.rows.len())
    }

    /// Measurements that had samples in BASE and have none in NEW (skipped, failed,
    /// crashed or timed out there). Not regressions in the statistical sense, but worth
    /// failing a pipeline on where the workload is expected to run.
    pub fn newly_failing(&self) -> Vec<&ComparisonRow> {
        self.rows
            .iter()
            .filter(|r| {
                r.verdict
                    == Verdict::SkippedOrFailed {
                        missing: Missing::New,
                    }
            })
            .collect()
    }

    /// Number of rows with each verdict kind: (regressions, improvements, unchanged,
    /// skipped or failed, untestable, inconclusive).
    fn counts(&self) -> [usize; 6] {
        let mut counts = [0; 6];
        for r in &self.rows {
            let i = match r.verdict {
                Verdict::Regression | Verdict::ChangedDirectionUnknown => 0,
                Verdict::Improvement => 1,
                Verdict::NoSignificantChange => 2,
                Verdict::SkippedOrFailed { .. } => 3,
                Verdict::Untestable { .. } => 4,
                Verdict::Inconclusive { .. } => 5,
            };
            counts[i] += 1;
        }
        counts
    }

    /// The comparison as an aligned text table for a terminal. Text from the records is
    /// made terminal-safe (no control characters or escape sequences pass through).
    pub fn render_table(&self) -> String {
        let mut out = self.render_header();
        if self.rows.is_empty() {
            out.push_str("No measurement is in both BASE and NEW.\n");
        } else {
            out.push_str(&format::columns(&self.table()));
        }
        out.push_str(&self.render_only_in());
        out.push_str(&self.render_totals());
        out
    }

    /// Which directories, the rule that makes a change count, and the notes.
    fn render_header(&self) -> String {
        let mut out = format!(
            "BASE {}\nNEW  {}\nA change counts where p < {} (permutation test, {} relabellings, \
             on the mean of each run's median: a run is one unit, since a boot shifts all its \
             samples together; P is Holm-adjusted over all measurements) and that mean moves \
             by more than {:.1}% (Δ MEAN).\n",
            terminal_safe(&self.base.display().to_string()),
            terminal_safe(&self.new.display().to_string()),
            self.p_threshold,
            self.permutations,
            self.noise * 100.0
        );
        if self.rows.iter().any(|r| r.key.metric == INSNS_METRIC) {
            let _ = writeln!(
                out,
                "Instruction counts (insns) whose spread on both sides is below {:.1}% count as \
                 changed where their median moves by more than that, without the permutation test.",
                self.insns_threshold * 100.0
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {}", terminal_safe(note));
        }
        out.push('\n');
        out
    }

    fn with_backend(&self) -> bool {
        let labels: BTreeSet<&str> = self.rows.iter().map(|r| r.backend.as_str()).collect();
        labels.len() > 1
    }

    /// The header row and one row per measurement, terminal-safe; the backend column
    /// only where the rows have more than one backend.
    fn table(&self) -> Vec<Vec<String>> {
        const HEADER: [&str; 8] = [
            "BACKEND",
            "MEASUREMENT",
            "BASE MEDIAN",
            "NEW MEDIAN",
            "Δ MEDIAN",
            "Δ MEAN",
            "P",
            "VERDICT",
        ];
        let median = |side: &Side, unit: &str| match side.median {
            Some(m) => format!("{} {} (n={})", format::number(m), unit, side.n),
            None => side.status.name().to_string(),
        };
        let rows = self.rows.iter().map(|r| {
            [
                r.backend.clone(),
                r.key.to_string(),
                median(&r.base, &r.unit),
                median(&r.new, &r.unit),
                r.median_change.map(format::percent).unwrap_or_default(),
                r.relative_change.map(format::percent).unwrap_or_default(),
                r.p_value.map(format::p_value).unwrap_or_default(),
                verdict_text(r),
            ]
        });
        let skip = usize::from(!self.with_backend());
        std::iter::once(HEADER.map(String::from))
            .chain(rows)
            .map(|row| row.iter().skip(skip).map(|c| terminal_safe(c)).collect())
            .collect()
    }

    /// The measurements only one side has.
    fn render_only_in(&self) -> String {
        let with_backend = self.with_backend();
        let mut out = String::new();
        for (title, list) in [
            ("Only in BASE", &self.only_in_base),
            ("Only in NEW", &self.only_in_new),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{title}:");
            for o in list {
                let backend = if with_backend {
                    format!("{} ", terminal_safe(&o.backend))
                } else {
                    String::new()
                };
                let key = terminal_safe(&o.key.to_string());
                let _ = writeln!(out, "  {backend}{key} ({}, n={})", o.status.name(), o.n);
            }
        }
        out
    }

    /// The count of each verdict, and how many runs an inconclusive comparison needs.
    fn render_totals(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let [regressions, improvements, unchanged, skipped, untestable, inconclusive] =
            self.counts();
        let untestable = if untestable > 0 {
            format!(", {untestable} untestable")
        } else {
            String::new()
        };
        let mut out = format!(
            "\n{regressions} regression{}, {improvements} improvement{}, {unchanged} without \
             significant change, {skipped} skipped or failed on a side{untestable}; {} only in \
             BASE, {} only in NEW.\n",
            plural(regressions),
            plural(improvements),
            self.only_in_base.len(),
            self.only_in_new.len()
        );
        if inconclusive > 0 {
            let needed = self.runs_needed();
            let _ = writeln!(
                out,
                "{inconclusive} inconclusive: too few runs on a side to reach p < {} over {} \
                 measurements. Give each side at least {needed} runs (hvbench run --repeat \
                 {needed}, or ci/ab-check.sh -r {}).",
                self.p_threshold,
                self.rows.len(),
                needed.div_ceil(2)
            );
        }
        out
    }
}

/// A row's verdict as the table says it.
fn verdict_text(r: &ComparisonRow) -> String {
    match &r.verdict {
        Verdict::Regression => "REGRESSION".to_string(),
        Verdict::Improvement => "improvement".to_string(),
        Verdict::NoSignificantChange => "no significant change".to_string(),
        Verdict::ChangedDirectionUnknown => "CHANGED (direction unknown)".to_string(),
        Verdict::SkippedOrFailed { missing } => {
            let (side, which) = match missing {
                Missing::Base => ("BASE", &r.base),
                Missing::New => ("NEW", &r.new),
                Missing::Both => ("both", &r.new),
            };
            let mut text = format!("{} on {side}", which.status.name());
            if let Some(reason) = &which.reason {
                text.push_str(": ");
                text.push_str(&format::label(reason, 60));
            }
            text
        }
        Verdict::Untestable { message } => format!("untestable: {message}"),
        Verdict::Inconclusive {
            base_runs,
            new_runs,
        } => format!("inconclusive: {base_runs} vs {new_runs} runs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{lognormal_samples, problem, record};

    /// Runs (boots) per side: enough for the Holm-corrected per-run test over the four
    /// measurements below to reach p < 0.01 (2 / C(16, 8) * 4 < 0.01).
    const RUNS: u64 = 8;
    /// Boot-to-boot drift of this host's medians (several percent).
    const DRIFT: f64 = 0.05;

    fn run(backend: &str, seed: u64, shift: f64) -> Vec<Record> {
        run_with_drift(backend, seed, shift, DRIFT)
    }

    fn run_with_drift(backend: &str, seed: u64, shift: f64, drift_sigma: f64) -> Vec<Record> {
        let mut records = Vec::new();
        for (i, workload) in ["cpu.idle", "cpu.cpuid", "io.pio-out", "io.mmio-read"]
            .iter()
            .enumerate()
        {
            let median = 100.0 * (i + 1) as f64;
            let factor = if *workload == "cpu.cpuid" { shift } else { 1.0 };
            for repeat in 0..RUNS {
                // Each boot shifts its samples together (as this host's boots do, by
                // several percent): a drift the per-run test must absorb.
                let drift = lognormal_samples(
                    seed ^ 0xd21f7 ^ (repeat * 31 + i as u64),
                    1,
                    1.0,
                    drift_sigma,
                )[0];
                let mut r = record(
                    backend,
                    workload,
                    &lognormal_samples(
                        seed + repeat * 100 + i as u64,
                        20,
                        median * factor * drift,
                        0.02,
                    ),
                );
                r.repeat = u32::try_from(repeat).unwrap();
                records.push(r);
            }
        }
        records
    }

    fn compare_runs(base: &[Record], new: &[Record]) -> Comparison {
        compare_records(
            Path::new("base"),
            Path::new("new"),
            base,
            new,
            &CompareOptions::default(),
        )
    }

    /// One lab run's instruction counts: per workload a record of 5 samples, the counts
    /// of a deterministic path with one outlier (a timer interrupt in one sample), and the
    /// time record beside it.
    fn insns_run(backend: &str, cpuid_factor: f64) -> Vec<Record> {
        let mut records = Vec::new();
        for (workload, count) in [("cpu.idle", 5014.0), ("cpu.cpuid", 3174.0)] {
            let count = if workload == "cpu.cpuid" {
                count * cpuid_factor
            } else {
                count
            };
            let mut r = record(
                backend,
                workload,
                &[count, count, count * 1.09, count, count],
            );
            r.metric = INSNS_METRIC.into();
            r.unit = "insns/op".into();
            records.push(r);
        }
        records
    }

    #[test]
    fn instruction_counts_flag_a_three_percent_change_from_one_run_each() {
        let base = insns_run("xen", 1.0);
        // A/A: the same counts (one run each side) are no change, and no regression.
        let aa = compare_runs(&base, &insns_run("xen", 1.0));
        assert!(!aa.has_regression(), "{}", aa.render_table());
        assert!(aa
            .rows
            .iter()
            .all(|r| r.verdict == Verdict::NoSignificantChange && r.p_value.is_none()));
        // A 3% longer cpuid path is a regression though each side is a single run (the
        // permutation test could not say anything from one run).
        let ab = compare_runs(&base, &insns_run("xen", 1.03));
        assert!(ab.has_regression(), "{}", ab.render_table());
        let cpuid = ab
            .rows
            .iter()
            .find(|r| r.key.workload == "cpu.cpuid")
            .unwrap();
        assert_eq!(cpuid.verdict, Verdict::Regression);
        assert!((cpuid.relative_change.unwrap() - 0.03).abs() < 1e-9);
        let idle = ab
            .rows
            .iter()
            .find(|r| r.key.workload == "cpu.idle")
            .unwrap();
        assert_eq!(idle.verdict, Verdict::NoSignificantChange);
        // Half a percent is below the threshold; a 3% shorter path is an improvement.
        let small = compare_runs(&base, &insns_run("xen", 1.005));
        assert!(!small.has_regression());
        let better = compare_runs(&base, &insns_run("xen", 0.97));
        assert!(better
            .rows
            .iter()
            .any(|r| r.verdict == Verdict::Improvement));
        assert!(ab.render_table().contains("without the permutation test"));
    }

    #[test]
    fn instruction_counts_that_spread_fall_back_to_the_permutation_test() {
        let spread = |factor: f64| {
            let mut r = record(
                "xen",
                "cpu.cpuid",
                &[100.0, 110.0, 90.0, 105.0, 95.0].map(|x| x * factor),
            );
            r.metric = INSNS_METRIC.into();
            vec![r]
        };
        let c = compare_runs(&spread(1.0), &spread(1.03));
        // One run a side: the usual test cannot conclude, and says so.
        assert!(matches!(c.rows[0].verdict, Verdict::Inconclusive { .. }));
    }

    #[test]
    fn attainable_p_values() {
        assert_eq!(smallest_attainable_p(1, 1), 1.0);
        assert!((smallest_attainable_p(3, 3) - 0.1).abs() < 1e-12);
        assert!((smallest_attainable_p(5, 5) - 2.0 / 252.0).abs() < 1e-12);
        assert!(smallest_attainable_p(6, 6) < 0.01);
    }

    #[test]
    fn runs_of_one_build_do_not_regress_though_boots_drift() {
        // The same build booted again and again: each boot shifts its samples by a few
        // percent, samples within a boot are tight. Per-run units and Holm's correction
        // keep false regressions at the test's level (1% per comparison); a test on
        // pooled samples mistakes the drift for changes far more often.
        let comparisons = 40;
        let (mut false_regressions, mut flagged_by_samples) = (0, 0);
        for seed in 0..comparisons {
            let (base, new) = (run("kvm", seed * 31, 1.0), run("kvm", seed * 31 + 7, 1.0));
            if compare_runs(&base, &new).has_regression() {
                false_regressions += 1;
            }
            for w in ["cpu.idle", "cpu.cpuid", "io.pio-out", "io.mmio-read"] {
                let pooled = |rs: &[Record]| -> Vec<f64> {
                    rs.iter()
                        .filter(|r| r.workload == w)
                        .flat_map(|r| r.samples.clone())
                        .collect()
                };
                let t = ab_test(
                    &pooled(&base),
                    &pooled(&new),
                    Some(Direction::LowerIsBetter),
                    &AbOptions::default(),
                )
                .unwrap();
                if t.change == Change::Worse {
                    flagged_by_samples += 1;
                }
            }
        }
        assert!(
            false_regressions <= 2,
            "{false_regressions} of {comparisons} A/A comparisons regressed"
        );
        assert!(
            flagged_by_samples >= 5 * false_regressions.max(1),
            "pooled samples flagged {flagged_by_samples}: the drift in this data is too small to matter"
        );
    }

    #[test]
    fn single_runs_are_inconclusive_not_regressions() {
        let one = |seed, shift| -> Vec<Record> {
            run("kvm", seed, shift)
                .into_iter()
                .filter(|r| r.repeat == 0)
                .collect()
        };
        let c = compare_runs(&one(1, 1.0), &one(2, 1.5));
        assert!(!c.has_regression());
        assert!(c.rows.iter().all(|r| matches!(
            r.verdict,
            Verdict::Inconclusive {
                base_runs: 1,
                new_runs: 1
            }
        )));
        let cpuid = c
            .rows
            .iter()
            .find(|r| r.key.workload == "cpu.cpuid")
            .unwrap();
        assert!(
            cpuid.relative_change.unwrap() > 0.3,
            "the change is still shown"
        );
        // Four measurements: 2 / C(12, 6) * 4 < 0.01 needs six runs a side.
        assert_eq!(c.runs_needed(), 6);
        assert!(
            c.render_table().contains("at least 6 runs"),
            "{}",
            c.render_table()
        );
    }

    #[test]
    fn same_build_runs_report_no_regression() {
        // Twenty pairs of runs drawn from the same distributions.
        for seed in 0..20 {
            let c = compare_runs(
                &run("kvm", seed * 7919, 1.0),
                &run("kvm", seed * 7919 + 1, 1.0),
            );
            assert_eq!(c.rows.len(), 4);
            assert!(!c.has_regression(), "seed {seed}:\n{}", c.render_table());
            assert!(c
                .rows
                .iter()
                .all(|r| r.verdict == Verdict::NoSignificantChange));
        }
    }

    #[test]
    fn a_slower_new_build_is_a_regression_and_a_faster_one_an_improvement() {
        let c = compare_runs(&run("kvm", 1, 1.0), &run("kvm", 2, 1.3));
        assert!(c.has_regression());
        let cpuid = c
            .rows
            .iter()
            .find(|r| r.key.workload == "cpu.cpuid")
            .unwrap();
        assert_eq!(cpuid.verdict, Verdict::Regression);
        assert!(cpuid.p_value.unwrap() < 0.01);
        assert!((cpuid.relative_change.unwrap() - 0.3).abs() < 0.05);
        let others = c.rows.iter().filter(|r| r.key.workload != "cpu.cpuid");
        assert!(others
            .into_iter()
            .all(|r| r.verdict == Verdict::NoSignificantChange));
        let table = c.render_table();
        assert!(table.contains("REGRESSION"), "{table}");
        assert!(table.contains("1 regression,"), "{table}");

        let c = compare_runs(&run("kvm", 1, 1.0), &run("kvm", 2, 0.7));
        assert!(!c.has_regression());
        assert!(c.rows.iter().any(|r| r.verdict == Verdict::Improvement));
    }

    #[test]
    fn a_shift_below_the_noise_threshold_is_not_a_regression() {
        // A steady machine (0.2% drift), so a 3% shift is significant: it stays below
        // the default 5% noise threshold and counts above a 1% one.
        let (base, new) = (
            run_with_drift("kvm", 1, 1.0, 0.002),
            run_with_drift("kvm", 2, 1.03, 0.002),
        );
        let c = compare_runs(&base, &new);
        assert!(!c.has_regression(), "{}", c.render_table());
        let strict = compare_records(
            Path::new("b"),
            Path::new("n"),
            &base,
            &new,
            &CompareOptions::with_thresholds(0.01, 0.01),
        );
        assert!(strict.has_regression(), "{}", strict.render_table());
    }

    #[test]
    fn failures_and_one_sided_measurements_are_listed() {
        let base = run("kvm", 1, 1.0);
        let mut new: Vec<Record> = run("kvm", 2, 1.0)
            .into_iter()
            .filter(|r| r.workload != "io.mmio-read" && r.workload != "cpu.cpuid")
            .collect();
        new.push(problem(
            "kvm",
            "cpu.cpuid",
            Status::Crash,
            "triple fault \x1b[31m<evil>",
        ));
        new.push(record("kvm", "cpu.rdtsc", &[1.0, 2.0]));
        let c = compare_runs(&base, &new);
        let cpuid = c
            .rows
            .iter()
            .find(|r| r.key.workload == "cpu.cpuid")
            .unwrap();
        assert_eq!(
            cpuid.verdict,
            Verdict::SkippedOrFailed {
                missing: Missing::New
            }
        );
        assert_eq!(c.newly_failing().len(), 1);
        assert!(!c.has_regression());
        assert_eq!(c.only_in_base.len(), 1);
        assert_eq!(c.only_in_base[0].key.workload, "io.mmio-read");
        assert_eq!(c.only_in_new.len(), 1);
        assert_eq!(c.only_in_new[0].key.workload, "cpu.rdtsc");
        let table = c.render_table();
        assert!(table.contains("crash on NEW: triple fault"), "{table}");
        assert!(
            !table.contains('\x1b'),
            "escape sequences must not reach the terminal"
        );
        assert!(table.contains("Only in BASE:\n  io.mmio-read"), "{table}");
    }

    #[test]
    fn backends_match_by_kind_when_sides_hold_several() {
        let mut base = run("kvm", 1, 1.0);
        base.extend(run("xen", 3, 1.0));
        let mut new = run("kvm", 2, 1.0);
        new.extend(run("xen", 4, 1.5));
        let c = compare_runs(&base, &new);
        assert_eq!(c.rows.len(), 8);
        let regressed: Vec<&str> = c
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Regression)
            .map(|r| r.backend.as_str())
            .collect();
        assert_eq!(regressed, ["xen"]);
        // Single-backend sides of different kinds match across backends, with a note.
        let c = compare_runs(&run("kvm", 1, 1.0), &run("qemu", 2, 1.0));
        assert_eq!(c.rows.len(), 4);
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("compares the two backends")));
    }

    #[test]
    fn bad_directories_and_options_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = compare(&missing, dir.path(), &CompareOptions::default()).unwrap_err();
        assert!(matches!(
            e,
            CompareError::Base(ResultsError::MissingDir { .. })
        ));
        assert!(e.to_string().contains("does not exist"), "{e}");
        crate::synthetic::write_results(&dir.path().join("ok"), &run("kvm", 1, 1.0)).unwrap();
        let e = compare(
            &dir.path().join("ok"),
            dir.path(),
            &CompareOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, CompareError::New(ResultsError::MissingResults { .. })),
            "{e}"
        );
        let e = compare(
            &dir.path().join("ok"),
            &dir.path().join("ok"),
            &CompareOptions::with_thresholds(-0.1, 0.01),
        )
        .unwrap_err();
        assert!(matches!(e, CompareError::Options(_)), "{e}");
        let same = compare(
            &dir.path().join("ok"),
            &dir.path().join("ok"),
            &CompareOptions::default(),
        )
        .unwrap();
        assert!(!same.has_regression());
        assert!(same.rows.iter().all(|r| r.p_value == Some(1.0)));
    }
}

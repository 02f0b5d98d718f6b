//! The report's charts: which to draw (groups, samples, curves, CDFs, convergence), drawn
//! in parallel, and the stale ones of an earlier report removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::error::ReportError;
use super::model::{Input, Model};
use super::options::ReportOptions;

use crate::bootstrap::Estimate;
use crate::format;
use crate::plot::{self, BarRow, ChartError, ChartFile, CurveChart, GroupChart, SamplesChart};
use crate::record::RecordKey;

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
    pub(super) fn all(&self) -> Vec<ChartFile> {
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
pub(super) fn collect_curves(
    inputs: &[Input],
    backends: &[String],
) -> BTreeMap<(String, String), CurveSet> {
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

pub(super) fn draw_charts(
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

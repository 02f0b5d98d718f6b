//! `hvbench report DIR... --out OUT`: one self-contained HTML page (`index.html`) with
//! charts beside it, comparing the backends found in the results directories.
//!
//! Records pool by backend kind and [`RecordKey`] across directories, runs and repeats.
//! The first backend (kvm, qemu, xen order, or `ReportOptions::baseline`) is backend A;
//! every other backend is compared with it: medians with bootstrap intervals, the ratio
//! A/B of the medians with its own interval, and a permutation test with a noise threshold
//! that decides whether one is faster.

pub(crate) mod charts;
mod error;
pub(crate) mod model;
pub(crate) mod options;
pub(crate) mod raw;

use std::path::{Path, PathBuf};

use serde::Serialize;

use self::charts::{collect_curves, draw_charts};
use self::model::{analyze, Input};
use self::raw::copy_raw_files;
use crate::html;
use crate::matrix::MatrixSummary;
use crate::plot::ChartFile;
use crate::results::{read_results_with_warnings, ResultsError};

pub use error::ReportError;
pub use options::{ReportOptions, CHARTS_DIR, INDEX_NAME};

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

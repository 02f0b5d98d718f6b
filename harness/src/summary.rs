//! The table printed at the end of a run: one row per measured quantity, pooled over
//! repetitions, with the interval that says how far to trust the median.

use std::collections::BTreeMap;

use reports::record::{Record, RecordKey};
use reports::stats::summarize;
use workloads::protocol::Status;

struct Row {
    status: Status,
    reason: Option<String>,
    unit: String,
    samples: Vec<f64>,
    medians: Vec<f64>,
    ratio: Option<f64>,
}

fn format_value(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the summary table for `records` (one run, any number of repetitions).
pub fn table(records: &[Record]) -> String {
    let mut rows: BTreeMap<RecordKey, Row> = BTreeMap::new();
    let mut order: Vec<RecordKey> = Vec::new();
    for r in records {
        let key = r.key();
        let row = rows.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            Row {
                status: Status::Success,
                reason: None,
                unit: r.unit.clone(),
                samples: Vec::new(),
                medians: Vec::new(),
                ratio: None,
            }
        });
        if r.status > row.status || (r.status == row.status && row.reason.is_none()) {
            row.reason = r.reason.clone();
        }
        row.status = row.status.ratchet(r.status);
        row.samples.extend_from_slice(&r.samples);
        if let Some(s) = &r.summary {
            row.medians.push(s.median);
        }
        if let Some(n) = &r.native {
            row.ratio = n.ratio.or(row.ratio);
        }
    }
    // Table order (the order of `hvbench list`), whatever order the records came in.
    let position = |name: &str| {
        workloads::WORKLOADS
            .iter()
            .position(|w| w.name == name)
            .unwrap_or(usize::MAX)
    };
    order.sort_by_key(|k| (position(&k.workload), k.clone()));
    let header = [
        "WORKLOAD",
        "METRIC",
        "STATUS",
        "N",
        "MEDIAN",
        "95% CI OF MEDIAN",
        "UNIT",
        "CV",
        "RUNS CV",
        "VS NATIVE",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut notes = Vec::new();
    for key in &order {
        let row = &rows[key];
        let stats = summarize(&row.samples);
        let runs_cv = summarize(&row.medians)
            .filter(|s| s.n > 1)
            .map(|s| format!("{:.1}%", s.cv * 100.0))
            .unwrap_or_else(|| "-".into());
        let mut name = key.workload.clone();
        if !key.series.is_empty() {
            name = format!("{name} [{}]", key.series);
        }
        lines.push(vec![
            name.clone(),
            key.metric.clone(),
            row.status.name().to_string(),
            stats
                .as_ref()
                .map(|s| s.n.to_string())
                .unwrap_or_else(|| "0".into()),
            stats
                .as_ref()
                .map(|s| format_value(s.median))
                .unwrap_or_else(|| "-".into()),
            stats
                .as_ref()
                .map(|s| {
                    format!(
                        "[{}, {}]",
                        format_value(s.median_ci95.low),
                        format_value(s.median_ci95.high)
                    )
                })
                .unwrap_or_else(|| "-".into()),
            row.unit.clone(),
            stats
                .as_ref()
                .map(|s| format!("{:.1}%", s.cv * 100.0))
                .unwrap_or_else(|| "-".into()),
            runs_cv,
            row.ratio
                .map(|r| format!("{r:.3}x"))
                .unwrap_or_else(|| "-".into()),
        ]);
        if let Some(reason) = &row.reason {
            notes.push(format!("{name}: {} - {reason}", row.status.name()));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

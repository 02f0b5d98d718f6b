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
    let (rows, order) = pool(records);
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
    let mut notes = String::new();
    for key in &order {
        let row = &rows[key];
        let name = if key.series.is_empty() {
            key.workload.clone()
        } else {
            format!("{} [{}]", key.workload, key.series)
        };
        if let Some(reason) = &row.reason {
            notes.push_str(&format!("{name}: {} - {reason}\n", row.status.name()));
        }
        lines.push(cells(name, key, row));
    }
    let mut out = reports::format::columns(&lines);
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}

/// The records pooled by measurement, and the measurements in table order (the order of
/// `hvbench list`, whatever order the records came in).
fn pool(records: &[Record]) -> (BTreeMap<RecordKey, Row>, Vec<RecordKey>) {
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
    let position = |name: &str| {
        workloads::WORKLOADS
            .iter()
            .position(|w| w.name == name)
            .unwrap_or(usize::MAX)
    };
    order.sort_by_key(|k| (position(&k.workload), k.clone()));
    (rows, order)
}

/// One measurement's cells, in the header's order.
fn cells(name: String, key: &RecordKey, row: &Row) -> Vec<String> {
    let stats = summarize(&row.samples);
    let dash = || "-".to_string();
    let runs_cv = summarize(&row.medians)
        .filter(|s| s.n > 1)
        .map_or_else(dash, |s| format!("{:.1}%", s.cv * 100.0));
    let ci = |s: &reports::stats::Summary| {
        format!(
            "[{}, {}]",
            format_value(s.median_ci95.low),
            format_value(s.median_ci95.high)
        )
    };
    vec![
        name,
        key.metric.clone(),
        row.status.name().to_string(),
        stats
            .as_ref()
            .map_or_else(|| "0".into(), |s| s.n.to_string()),
        stats.as_ref().map_or_else(dash, |s| format_value(s.median)),
        stats.as_ref().map_or_else(dash, ci),
        row.unit.clone(),
        stats
            .as_ref()
            .map_or_else(dash, |s| format!("{:.1}%", s.cv * 100.0)),
        runs_cv,
        row.ratio.map_or_else(dash, |r| format!("{r:.3}x")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use reports::synthetic::{problem, record};

    #[test]
    fn rows_are_in_table_order_aligned_with_reasons_below() {
        let mut compute = record("kvm", "cpu.compute", &[10.0, 11.0, 12.0]);
        compute.native = Some(reports::record::NativeComparison {
            samples: vec![9.0],
            median: 9.0,
            ratio: Some(0.9),
        });
        let records = [
            compute,
            problem("kvm", "cpu.hlt", Status::Skip, "no exit to the VMM"),
            record("kvm", "cpu.idle", &[1.0, 2.0, 3.0]),
        ];
        let out = table(&records);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("WORKLOAD  "), "{out}");
        // cpu.idle, cpu.hlt, cpu.compute: the order of `hvbench list`.
        let order: Vec<&str> = lines[1..4]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(order, ["cpu.idle", "cpu.hlt", "cpu.compute"], "{out}");
        // Every column starts where its header does.
        let metric_at = lines[0].find("METRIC").unwrap();
        for line in &lines[1..4] {
            assert_eq!(&line[metric_at..metric_at + 7], "latency", "{out}");
        }
        assert!(lines[3].trim_end().ends_with("0.900x"), "{out}");
        assert!(lines[2].contains(" skip "), "{out}");
        assert_eq!(lines[4], "");
        assert_eq!(lines[5], "cpu.hlt: skip - no exit to the VMM");
    }
}

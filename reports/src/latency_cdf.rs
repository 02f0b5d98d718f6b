//! Completion-latency CDFs of the block workloads (`io.blk-*`): one chart per workload and
//! series, a line per backend and one for the native baseline (the records' fio twin).
//! Each line's points are the medians, over every sample the records kept, of the
//! per-sample percentiles the guest reported (p50, p90, p99, p99.9, max), at cumulative
//! fractions 0.5, 0.9, 0.99, 0.999 and 1: a coarse CDF, but every point is a measured one.

use std::collections::BTreeMap;

use crate::record::Record;
use crate::stats::median;

/// The percentile metrics and the fraction of requests each one bounds.
const POINTS: [(&str, f64); 5] = [
    ("lat_p50", 0.5),
    ("lat_p90", 0.9),
    ("lat_p99", 0.99),
    ("lat_p999", 0.999),
    ("lat_max", 1.0),
];

/// Where a record belongs among the CDFs: its workload and series text.
fn series_text(record: &Record) -> String {
    record
        .series
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One CDF chart's lines: (label, points in (µs, fraction), colour index).
pub(crate) struct Cdf {
    pub lines: Vec<(String, Vec<[f64; 2]>, usize)>,
}

/// Samples gathered per (workload, series) and line (backend index, or native).
type Gathered =
    BTreeMap<(String, String), BTreeMap<(usize, String), BTreeMap<&'static str, Vec<f64>>>>;

/// The CDFs the records allow, by (workload, series text).
pub(crate) fn collect<'a>(
    records: impl Iterator<Item = &'a Record>,
    backends: &[String],
) -> BTreeMap<(String, String), Cdf> {
    let mut gathered: Gathered = BTreeMap::new();
    for r in records.filter(|r| r.workload.starts_with("io.blk-") && r.unit == "ns") {
        let Some((metric, _)) = POINTS.iter().find(|(m, _)| *m == r.metric) else {
            continue;
        };
        let backend = backends
            .iter()
            .position(|b| *b == r.backend.kind)
            .unwrap_or(0);
        let lines = gathered
            .entry((r.workload.clone(), series_text(r)))
            .or_default();
        lines
            .entry((backend, r.backend.kind.clone()))
            .or_default()
            .entry(metric)
            .or_default()
            .extend(r.samples.iter().copied());
        if let Some(native) = &r.native {
            lines
                .entry((backends.len(), "native (fio)".into()))
                .or_default()
                .entry(metric)
                .or_default()
                .extend(native.samples.iter().copied());
        }
    }
    gathered
        .into_iter()
        .map(|(key, lines)| {
            let lines = lines
                .into_iter()
                .filter_map(|((color, label), by_metric)| {
                    let points: Vec<[f64; 2]> = POINTS
                        .iter()
                        .filter_map(|(m, fraction)| {
                            let ns = median(by_metric.get(m)?)?;
                            (ns.is_finite() && ns > 0.0).then_some([ns / 1000.0, *fraction])
                        })
                        .collect();
                    (points.len() >= 2).then_some((label, points, color))
                })
                .collect();
            (key, Cdf { lines })
        })
        .filter(|(_, cdf)| !cdf.lines.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::NativeComparison;

    fn record(backend: &str, metric: &str, samples: &[f64], native: Option<f64>) -> Record {
        let mut r = crate::synthetic::record(backend, "io.blk-randread", samples);
        r.metric = metric.into();
        r.unit = "ns".into();
        r.series.insert("qd".into(), "32".into());
        r.native = native.map(|m| NativeComparison {
            samples: vec![m],
            median: m,
            ratio: None,
        });
        r
    }

    #[test]
    fn each_backend_and_the_native_baseline_get_a_line_of_medians() {
        let records = [
            record("kvm", "lat_p50", &[1000.0, 3000.0, 2000.0], Some(500.0)),
            record("kvm", "lat_p99", &[9000.0], Some(900.0)),
            record("qemu", "lat_p50", &[4000.0], None),
            record("qemu", "lat_p99", &[8000.0], None),
            record("kvm", "iops", &[1.0], None),
        ];
        let backends = vec!["kvm".to_string(), "qemu".to_string()];
        let cdfs = collect(records.iter(), &backends);
        let cdf = &cdfs[&("io.blk-randread".to_string(), "qd:32".to_string())];
        let line = |label: &str| cdf.lines.iter().find(|l| l.0 == label).unwrap();
        assert_eq!(line("kvm").1, vec![[2.0, 0.5], [9.0, 0.99]]);
        assert_eq!(line("qemu").2, 1);
        assert_eq!(line("native (fio)").1, vec![[0.5, 0.5], [0.9, 0.99]]);
        assert_eq!(line("native (fio)").2, 2);
    }
}

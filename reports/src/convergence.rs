//! Live migration's convergence curves (`mig.*`): per workload and figure (downtime as the
//! heartbeat ruler saw it, the hypervisor's own downtime, total time), a line per backend
//! of the figure's median against the dirty rate the guest was asked for. Each point is
//! the median over every sample the records kept at that rate. Rate 0 means "as fast as
//! the guest can write": it has no place on a rate axis and is left out (its records stay
//! in the tables).

use std::collections::BTreeMap;

use crate::record::Record;
use crate::stats::median;

/// The figures drawn, and how each is named on the chart.
pub(crate) const FIGURES: [(&str, &str); 3] = [
    ("downtime", "downtime (heartbeat ruler)"),
    ("downtime_hypervisor", "downtime (hypervisor's own)"),
    ("total_time", "total migration time"),
];

/// One chart's lines: (backend, points in (MB/s, ms), colour index).
pub(crate) struct Convergence {
    pub title: &'static str,
    pub lines: Vec<(String, Vec<[f64; 2]>, usize)>,
}

/// Samples in ms per (workload, metric), line (colour, backend) and rate.
type Gathered = BTreeMap<(String, String), BTreeMap<(usize, String), BTreeMap<u64, Vec<f64>>>>;

/// The rate a record was measured at, when it names a positive one.
fn rate(record: &Record) -> Option<u64> {
    record.series.get("rate")?.parse().ok().filter(|r| *r > 0)
}

/// The curves the records allow, by (workload, metric); a line needs two rates.
pub(crate) fn collect<'a>(
    records: impl Iterator<Item = &'a Record>,
    backends: &[String],
) -> BTreeMap<(String, String), Convergence> {
    let mut gathered: Gathered = BTreeMap::new();
    for r in records.filter(|r| r.workload.starts_with("mig.") && r.unit == "s") {
        let (Some(rate), true) = (rate(r), FIGURES.iter().any(|(m, _)| *m == r.metric)) else {
            continue;
        };
        let color = backends
            .iter()
            .position(|b| *b == r.backend.kind)
            .unwrap_or(0);
        gathered
            .entry((r.workload.clone(), r.metric.clone()))
            .or_default()
            .entry((color, r.backend.kind.clone()))
            .or_default()
            .entry(rate)
            .or_default()
            .extend(r.samples.iter().map(|s| s * 1000.0));
    }
    gathered
        .into_iter()
        .filter_map(|((workload, metric), lines)| {
            let title = FIGURES.iter().find(|(m, _)| *m == metric)?.1;
            let lines: Vec<_> = lines
                .into_iter()
                .filter_map(|((color, backend), by_rate)| {
                    let points: Vec<[f64; 2]> = by_rate
                        .iter()
                        .filter_map(|(rate, ms)| Some([*rate as f64, median(ms)?]))
                        .filter(|p| p[1].is_finite())
                        .collect();
                    (points.len() >= 2).then_some((backend, points, color))
                })
                .collect();
            (!lines.is_empty()).then_some(((workload, metric), Convergence { title, lines }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(backend: &str, metric: &str, rate: &str, seconds: &[f64]) -> Record {
        let mut r = crate::synthetic::record(backend, "mig.dirty", seconds);
        r.metric = metric.into();
        r.unit = "s".into();
        r.series.insert("rate".into(), rate.into());
        r
    }

    #[test]
    fn a_line_per_backend_of_medians_against_the_rate_without_flat_out() {
        let records = [
            record("kvm", "downtime", "100", &[0.010, 0.030, 0.020]),
            record("kvm", "downtime", "1000", &[0.040]),
            record("kvm", "downtime", "0", &[0.070]),
            record("qemu", "downtime", "100", &[0.060]),
            record("qemu", "downtime", "1000", &[0.035]),
            record("qemu", "total_time", "100", &[0.6]),
            record("kvm", "slowdown", "100", &[2.0]),
        ];
        let backends = vec!["kvm".to_string(), "qemu".to_string()];
        let curves = collect(records.iter(), &backends);
        let downtime = &curves[&("mig.dirty".to_string(), "downtime".to_string())];
        assert_eq!(downtime.title, "downtime (heartbeat ruler)");
        let line = |label: &str| downtime.lines.iter().find(|l| l.0 == label).unwrap();
        assert_eq!(line("kvm").1, vec![[100.0, 20.0], [1000.0, 40.0]]);
        assert_eq!(line("qemu").1, vec![[100.0, 60.0], [1000.0, 35.0]]);
        assert_eq!(line("qemu").2, 1);
        // One rate is no curve, and a ratio is not a time.
        assert_eq!(curves.len(), 1, "{:?}", curves.keys().collect::<Vec<_>>());
    }
}

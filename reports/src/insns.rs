//! The report's table of instructions per operation (`insns` records, counted under TCG by
//! the hvbench-insns plugin): one row per workload and series, one column per backend and
//! paging mode (KVM npt / shadow, Xen hap / shadow side by side, where the report's
//! backends pool them), each cell the median of the runs' medians with their range, and
//! the time of the same runs beside it, still an emulation artefact.

use std::collections::BTreeMap;

use crate::record::{Record, Status};
use crate::stats::median;

/// The metric instruction-count records carry.
pub const INSNS_METRIC: &str = "insns";

/// One column: a backend with one paging mode.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Column {
    pub backend: String,
    pub paging: String,
}

impl Column {
    pub fn label(&self) -> String {
        if self.paging.is_empty() {
            self.backend.clone()
        } else {
            format!("{} {}", self.backend, self.paging)
        }
    }
}

/// One cell: the runs' medians of one workload in one column.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub median: f64,
    pub low: f64,
    pub high: f64,
    pub runs: usize,
    /// The same runs' time (median of the timed records' medians) and its unit.
    pub time: Option<(f64, String)>,
}

impl Cell {
    /// The range of the run medians relative to their median.
    pub fn spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.high - self.low) / self.median
        } else {
            0.0
        }
    }
}

/// The table: rows (workload and series) by columns.
#[derive(Clone, Debug, PartialEq)]
pub struct InsnsTable {
    pub columns: Vec<Column>,
    pub rows: Vec<(String, Vec<Option<Cell>>)>,
}

type RowKey = (String, String);

/// The table of `records`' successful `insns` records; None when there are none.
pub fn table<'a>(records: impl IntoIterator<Item = &'a Record>) -> Option<InsnsTable> {
    let mut counts: BTreeMap<(RowKey, Column), Vec<f64>> = BTreeMap::new();
    let mut times: BTreeMap<(RowKey, Column), (Vec<f64>, String)> = BTreeMap::new();
    for r in records {
        let Some(summary) = r.summary.as_ref().filter(|_| r.status == Status::Success) else {
            continue;
        };
        let series: Vec<String> = r.series.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let row = (r.workload.clone(), series.join(" "));
        let column = Column {
            backend: r.backend.kind.clone(),
            paging: r.host.paging.clone(),
        };
        if r.metric == INSNS_METRIC {
            counts
                .entry((row, column))
                .or_default()
                .push(summary.median);
        } else {
            let entry = times
                .entry((row, column))
                .or_insert_with(|| (Vec::new(), r.unit.clone()));
            entry.0.push(summary.median);
        }
    }
    if counts.is_empty() {
        return None;
    }
    let mut columns: Vec<Column> = counts.keys().map(|(_, c)| c.clone()).collect();
    columns.sort();
    columns.dedup();
    let mut row_keys: Vec<RowKey> = counts.keys().map(|(r, _)| r.clone()).collect();
    row_keys.dedup();
    let rows = row_keys
        .into_iter()
        .map(|row| {
            let cells = columns
                .iter()
                .map(|column| {
                    let key = (row.clone(), column.clone());
                    let values = counts.get(&key)?;
                    cell(values, times.get(&key))
                })
                .collect();
            let label = if row.1.is_empty() {
                row.0
            } else {
                format!("{} [{}]", row.0, row.1)
            };
            (label, cells)
        })
        .collect();
    Some(InsnsTable { columns, rows })
}

fn cell(values: &[f64], time: Option<&(Vec<f64>, String)>) -> Option<Cell> {
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Cell {
        median: median(values)?,
        low,
        high,
        runs: values.len(),
        time: time.and_then(|(v, unit)| Some((median(v)?, unit.clone()))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::record;

    fn run(kind: &str, paging: &str, workload: &str, count: f64, time: f64) -> [Record; 2] {
        let mut insns = record(kind, workload, &[count, count, count]);
        insns.metric = INSNS_METRIC.into();
        insns.unit = "insns/op".into();
        insns.host.paging = paging.into();
        let mut timed = record(kind, workload, &[time, time, time]);
        timed.host.paging = paging.into();
        [insns, timed]
    }

    #[test]
    fn columns_split_backends_by_paging_and_cells_hold_run_medians_and_times() {
        let mut records = Vec::new();
        for count in [3000.0, 3100.0] {
            records.extend(run("kvm", "npt", "cpu.cpuid", count, 300.0));
        }
        records.extend(run("kvm", "shadow", "cpu.cpuid", 2900.0, 250.0));
        records.extend(run("xen", "xen-hap", "cpu.cpuid", 5600.0, 150.0));
        records.extend(run("xen", "xen-shadow", "mem.pt-update", 16800.0, 600.0));
        let t = table(&records).unwrap();
        let labels: Vec<String> = t.columns.iter().map(Column::label).collect();
        assert_eq!(
            labels,
            ["kvm npt", "kvm shadow", "xen xen-hap", "xen xen-shadow"]
        );
        assert_eq!(t.rows.len(), 2);
        let (label, cells) = &t.rows[0];
        assert_eq!(label, "cpu.cpuid");
        let npt = cells[0].as_ref().unwrap();
        assert_eq!(
            (npt.median, npt.low, npt.high, npt.runs),
            (3050.0, 3000.0, 3100.0, 2)
        );
        assert!((npt.spread() - 100.0 / 3050.0).abs() < 1e-12);
        assert_eq!(npt.time, Some((300.0, "ns".to_string())));
        assert!(cells[3].is_none(), "no cpuid count under xen shadow");
        // No insns records: no table.
        assert!(table(&records[1..2]).is_none());
    }
}

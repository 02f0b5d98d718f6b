//! The report's scheduling summary (`sched.*`): one row per backend, host scheduler,
//! cgroup hierarchy and measured quantity, so that IPI and wake-up latency per backend,
//! steal agreement and Jain's index per weight ratio sit side by side with the scheduler
//! that produced them (the records name it: `notes.host_scheduler`, `notes.cgroups`).

use std::collections::BTreeMap;

use crate::record::{Record, RecordKey, Status};
use crate::stats::median;

/// The workloads' group.
pub const GROUP: &str = "sched";

/// One row: the median over runs of each run's median.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedRow {
    pub backend: String,
    pub scheduler: String,
    pub cgroups: String,
    pub key: RecordKey,
    pub unit: String,
    pub runs: usize,
    pub median: f64,
}

/// The host's CPU scheduler by kernel release: EEVDF from Linux 6.6, CFS before.
pub fn linux_scheduler(release: &str) -> &'static str {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (6, 6) {
        "EEVDF"
    } else {
        "CFS"
    }
}

/// The scheduler under a record: what a host-driven workload noted, else (KVM and QEMU,
/// whose vCPUs are Linux threads) the one its host's kernel release implies.
fn scheduler(record: &Record) -> String {
    if let Some(named) = record.notes.get("host_scheduler") {
        return named.clone();
    }
    // `host.kernel` is the release and the build line (`6.18.0 #1 SMP ...`).
    let release = record.host.kernel.split_whitespace().next().unwrap_or("");
    match record.backend.kind.as_str() {
        "kvm" | "qemu" if !release.is_empty() => {
            format!("{} (Linux {release})", linux_scheduler(release))
        }
        _ => "-".to_string(),
    }
}

/// What a record says about the scheduler under it; `-` where it says nothing.
fn note(record: &Record, key: &str) -> String {
    record
        .notes
        .get(key)
        .cloned()
        .unwrap_or_else(|| "-".to_string())
}

/// The rows of every successful `sched.*` record, in a stable order.
pub fn rows<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<SchedRow> {
    type Key = (String, String, String, RecordKey);
    let mut by: BTreeMap<Key, (String, Vec<f64>)> = BTreeMap::new();
    for r in records {
        if r.group != GROUP || r.status != Status::Success {
            continue;
        }
        let Some(summary) = &r.summary else { continue };
        let key = (
            r.backend.kind.clone(),
            scheduler(r),
            note(r, "cgroups"),
            r.key(),
        );
        let entry = by
            .entry(key)
            .or_insert_with(|| (r.unit.clone(), Vec::new()));
        entry.1.push(summary.median);
    }
    by.into_iter()
        .filter_map(|((backend, scheduler, cgroups, key), (unit, medians))| {
            Some(SchedRow {
                backend,
                scheduler,
                cgroups,
                key,
                unit,
                runs: medians.len(),
                median: median(&medians)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    #[test]
    fn rows_pool_runs_per_backend_scheduler_and_series_and_skip_the_rest() {
        let mut a = synthetic::record("kvm", "sched.fairness", &[0.99]);
        a.metric = "jain".into();
        a.notes
            .insert("host_scheduler".into(), "EEVDF (Linux 6.18)".into());
        a.series.insert("ratio".into(), "2".into());
        let mut b = a.clone();
        b.summary.as_mut().unwrap().median = 0.97;
        let mut c = a.clone();
        c.series.insert("ratio".into(), "4".into());
        let mut skipped = a.clone();
        skipped.status = Status::Skip;
        let mut other = a.clone();
        other.group = "cpu".into();
        let rows = rows([&a, &b, &c, &skipped, &other]);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].runs, 2);
        assert!((rows[0].median - 0.98).abs() < 1e-12);
        assert_eq!(rows[0].scheduler, "EEVDF (Linux 6.18)");
        assert_eq!(rows[0].cgroups, "-");
        assert!(rows[1].key.series.contains("ratio=4"));
    }

    #[test]
    fn the_scheduler_is_named_by_kernel_release_where_no_record_names_it() {
        assert_eq!(linux_scheduler("6.18.0-pvm"), "EEVDF");
        assert_eq!(linux_scheduler("6.6.1"), "EEVDF");
        assert_eq!(linux_scheduler("6.1.0-56-amd64"), "CFS");
        assert_eq!(linux_scheduler("5.15.0"), "CFS");
        assert_eq!(linux_scheduler("garbage"), "CFS");
        let mut r = synthetic::record("kvm", "sched.ipi", &[1.0]);
        r.host.kernel = "6.1.0 #1 SMP PREEMPT_DYNAMIC".into();
        assert_eq!(scheduler(&r), "CFS (Linux 6.1.0)");
        r.backend.kind = "xen".into();
        assert_eq!(scheduler(&r), "-");
    }
}

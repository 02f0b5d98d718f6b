//! Results directories as hvbench found them in the wild (issue 8, defects 7 and 12):
//! `report` and `compare` read a record whose native ratio an older hvbench wrote as `null`,
//! and a directory whose last line was torn by a killed run, instead of refusing it.

use std::io::Write;
use std::path::{Path, PathBuf};

use reports::compare::{compare, CompareOptions};
use reports::record::NativeComparison;
use reports::report::{render, ReportOptions};
use reports::results::{read_results_with_warnings, ResultsWarning, JSONL_NAME};
use reports::synthetic::{lognormal_samples, record, write_results};

/// A results directory of `backend`: two measured workloads, then (appended by hand, as
/// an older hvbench wrote it) a `cpu.compute` record whose native ratio is `null`, then a
/// torn last line.
fn old_directory(root: &Path, backend: &str, seed: u64) -> PathBuf {
    let dir = root.join(backend);
    let records: Vec<_> = ["cpu.cpuid", "cpu.idle"]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            record(
                backend,
                w,
                &lognormal_samples(seed + i as u64, 12, 100.0, 0.1),
            )
        })
        .collect();
    write_results(&dir, &records).unwrap();

    let mut compute = record(backend, "cpu.compute", &[0.0; 5]);
    compute.native = Some(NativeComparison {
        samples: vec![2.0; 5],
        median: 2.0,
        ratio: Some(0.5),
    });
    let line = serde_json::to_string(&compute)
        .unwrap()
        .replace("\"ratio\":0.5", "\"ratio\":null");
    assert!(line.contains("\"ratio\":null"), "{line}");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(JSONL_NAME))
        .unwrap();
    writeln!(file, "{line}").unwrap();
    file.write_all(b"{\"schema\":1,\"run_id\":\"torn").unwrap();
    dir
}

#[test]
fn null_ratio_and_torn_line_are_read_with_a_warning() {
    let root = tempfile::tempdir().unwrap();
    let dir = old_directory(root.path(), "kvm", 1);
    let read = read_results_with_warnings(&dir).unwrap();
    assert_eq!(read.records.len(), 3);
    let compute = &read.records[2];
    assert_eq!(compute.native.as_ref().unwrap().ratio, None);
    assert!(matches!(
        &read.warnings[..],
        [ResultsWarning::UnreadableLine { line: 4, .. }]
    ));
}

#[test]
fn report_renders_an_old_directory() {
    let root = tempfile::tempdir().unwrap();
    let kvm = old_directory(root.path(), "kvm", 1);
    let qemu = old_directory(root.path(), "qemu", 7);
    let out = root.path().join("report");
    let summary = render(&[kvm, qemu], &out, &ReportOptions::default()).unwrap();
    assert_eq!(summary.records, 6);
    let skipped: Vec<&String> = summary
        .warnings
        .iter()
        .filter(|w| w.contains("line 4") && w.contains("could not be read"))
        .collect();
    assert_eq!(skipped.len(), 2, "{:?}", summary.warnings);
    let html = std::fs::read_to_string(&summary.index).unwrap();
    assert!(html.contains("cpu.compute"));
}

#[test]
fn compare_reads_old_directories() {
    let root = tempfile::tempdir().unwrap();
    let base = old_directory(root.path(), "kvm", 1);
    let new = old_directory(&root.path().join("new"), "kvm", 3);
    let c = compare(&base, &new, &CompareOptions::with_thresholds(0.05, 0.01)).unwrap();
    assert!(c.rows.iter().any(|r| r.key.workload == "cpu.compute"));
    let warned = c.notes.iter().filter(|n| n.contains("line 4")).count();
    assert_eq!(warned, 2, "{:?}", c.notes);
    assert!(c.render_table().contains("line 4"));
}

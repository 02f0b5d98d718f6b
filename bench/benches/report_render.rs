//! Report rendering at scale: `hvbench report` over 10,000 records (kvm and xen, 50
//! repeats of 100 measurements, 10 samples each: 500 pooled samples per measurement and
//! backend), with and without its charts.
//!
//! `cargo bench -p hvbench-bench --bench report_render`. Not a test: criterion prints the
//! figures and nothing is asserted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use reports::record::Record;
use reports::report::{render, ReportOptions};
use reports::synthetic::{suite, write_results};

const REPEATS: u32 = 50;
const MEASUREMENTS: usize = 100;
const SAMPLES: usize = 10;

/// Two results directories (kvm, xen) holding 10,000 records between them.
fn inputs(root: &Path) -> Vec<PathBuf> {
    let records = suite(&["kvm", "xen"], REPEATS, MEASUREMENTS, SAMPLES);
    assert_eq!(records.len(), 10_000);
    ["kvm", "xen"]
        .iter()
        .map(|backend| {
            let dir = root.join(backend);
            let own: Vec<Record> = records
                .iter()
                .filter(|r| r.backend.kind == *backend)
                .cloned()
                .collect();
            write_results(&dir, &own).expect("write synthetic results");
            dir
        })
        .collect()
}

fn report_render(c: &mut Criterion) {
    let root = std::env::temp_dir().join(format!("hvbench-report-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dirs = inputs(&root);
    let out = root.join("report");

    let mut group = c.benchmark_group("report_render");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("10k_records_with_charts", |b| {
        b.iter(|| render(&dirs, &out, &ReportOptions::default()).expect("render"))
    });
    let no_charts = ReportOptions {
        formats: Vec::new(),
        ..ReportOptions::default()
    };
    group.bench_function("10k_records_no_charts", |b| {
        b.iter(|| render(&dirs, &out, &no_charts).expect("render"))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, report_render);
criterion_main!(benches);

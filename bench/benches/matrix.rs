//! The benchmark matrix's own overhead at 1,000 cells: `hvbench plan` (parse, expand,
//! hash, shard, print for GitHub), `hvbench merge` of the 10 bundles (every check, 5,000
//! records written, 1,000 cell logs copied) and `hvbench report` of the merged matrix
//! (charts and the grid), apart and together. The cells' records are synthetic (5
//! workloads a cell, 10 samples each), written before anything is timed.
//!
//! `cargo bench -p hvbench-bench --bench matrix`. Not a test: criterion prints the
//! figures and nothing is asserted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use matrix::bundle::{run_bundle, BundleInfo, CellOutcome, Executor, ToolRef};
use matrix::merge::{merge, MergeOptions};
use matrix::{Cell, MatrixFile, Plan};
use reports::report::{render, ReportOptions};

const HOSTS: usize = 10;
const SELECTIONS: usize = 5;
const REPEATS: u32 = 10;
const WORKLOADS: [&str; 5] = [
    "cpu.cpuid",
    "cpu.idle",
    "cpu.compute",
    "io.pio-out",
    "io.mmio-read",
];

/// 10 hosts x 2 backends x 5 selections x 10 repeats = 1,000 cells.
fn matrix_text() -> String {
    let mut text = format!("name = \"bench\"\nrepeats = {REPEATS}\n[run]\nsamples = 10\n");
    for h in 0..HOSTS {
        let _ = write!(
            text,
            "[[host]]\nlabel = \"host-{h}\"\nbackends = [\"kvm\", \"qemu\"]\n"
        );
    }
    text.push_str("[[backend]]\nname = \"kvm\"\nkind = \"kvm\"\n");
    text.push_str("[[backend]]\nname = \"qemu\"\nkind = \"qemu\"\n");
    for s in 0..SELECTIONS {
        let _ = write!(
            text,
            "[[workloads]]\nname = \"sel-{s}\"\nselect = [\"cpu.*\", \"io.*\"]\n"
        );
    }
    text
}

/// What `hvbench plan --shards 10 --format github` does: parse, expand, shard, print.
fn plan_of(text: &str) -> (Plan, String) {
    let file = MatrixFile::parse(text, Path::new("bench.toml")).expect("matrix file");
    let plan = Plan::new(&file).expect("plan");
    let shards = plan.shards(HOSTS).expect("shards");
    let github = matrix::plan::github_matrix(&shards).to_string();
    (plan, github)
}

/// Writes each cell's records as `hvbench run` would, at once.
struct Synthetic;

impl Executor for Synthetic {
    fn run(&mut self, cell: &Cell, out: &Path, log: &Path) -> CellOutcome {
        let records: Vec<reports::Record> = WORKLOADS
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let seed = reports::format::stable_hash(&format!("{}{w}", cell.id));
                let samples =
                    reports::synthetic::lognormal_samples(seed, 10, 100.0 + i as f64, 0.05);
                let mut r = reports::synthetic::record(cell.kind.name(), w, &samples);
                r.run_id = format!("run-{}", cell.id);
                r.repeat = cell.repeat;
                r
            })
            .collect();
        let written =
            reports::ResultsWriter::create(out, false).and_then(|mut w| w.write_batch(&records));
        let _ = std::fs::write(log, format!("hvbench run for {}\n", cell.id));
        CellOutcome {
            exit_code: Some(if written.is_ok() { 0 } else { 2 }),
            message: written.err().map(|e| e.to_string()),
            interrupted: false,
        }
    }
    fn now(&self) -> String {
        "2026-12-05T00:00:00Z".into()
    }
    fn cancelled(&self) -> bool {
        false
    }
}

fn bundles(plan: &Plan, root: &Path) -> Vec<PathBuf> {
    plan.shards(HOSTS)
        .expect("shards")
        .iter()
        .map(|s| {
            let dir = root.join(s.bundle_name());
            let info = BundleInfo {
                part: format!("shard {}", s.name()),
                hvbench: ToolRef {
                    version: "0.1.0".into(),
                    git_revision: "synthetic".into(),
                },
                host: reports::synthetic::host("bare-metal", "bench CPU"),
            };
            run_bundle(plan, &s.cells, &dir, info, &mut Synthetic, &mut |_| {}).expect("bundle");
            dir
        })
        .collect()
}

fn matrix_overhead(c: &mut Criterion) {
    let root = std::env::temp_dir().join(format!("hvbench-matrix-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let text = matrix_text();
    let (plan, _) = plan_of(&text);
    assert_eq!(plan.cells.len(), 1000);
    let bundles = bundles(&plan, &root.join("bundles"));
    let merged = root.join("merged");
    let report = root.join("report");
    let clear = |dirs: &[&Path]| {
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    let options = ReportOptions::default();

    let mut group = c.benchmark_group("matrix_1000_cells");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("plan", |b| b.iter(|| plan_of(&text)));
    group.bench_function("merge", |b| {
        b.iter_batched(
            || clear(&[&merged]),
            |()| merge(&bundles, &merged, &MergeOptions::default()).expect("merge"),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("report", |b| {
        b.iter(|| render(std::slice::from_ref(&merged), &report, &options).expect("report"))
    });
    group.bench_function("plan_merge_report", |b| {
        b.iter_batched(
            || clear(&[&merged, &report]),
            |()| {
                let (plan, _) = plan_of(&text);
                let options_merge = MergeOptions {
                    plan: Some(plan),
                    ..MergeOptions::default()
                };
                merge(&bundles, &merged, &options_merge).expect("merge");
                render(std::slice::from_ref(&merged), &report, &options).expect("report")
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, matrix_overhead);
criterion_main!(benches);

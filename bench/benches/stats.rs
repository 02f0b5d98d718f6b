//! Statistics over the most samples a run allows (10,000 per measurement): the summary
//! with its order-statistic median interval (what the summary table computes for every
//! measurement, once the records are on disk), the bootstrap interval and the permutation
//! test the report uses.
//!
//! `cargo bench -p hvbench-bench --bench stats`. Not a test: criterion prints the figures
//! and nothing is asserted.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use reports::abtest::{permutation_test, PermutationOptions};
use reports::bootstrap::{median_ci, BootstrapOptions};
use reports::stats::{median_ci_ranks, summarize};

/// Exponential-looking latencies from a fixed-seed xorshift, so runs are comparable.
fn samples(n: usize) -> Vec<f64> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            1000.0 - 200.0 * u.ln()
        })
        .collect()
}

fn median_interval(c: &mut Criterion) {
    let mut group = c.benchmark_group("stats/summarize");
    for n in [1_000, 10_000] {
        let xs = samples(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &xs, |b, xs| {
            b.iter(|| black_box(summarize(black_box(xs))))
        });
    }
    group.finish();
    c.bench_function("stats/median_ci_ranks 10000", |b| {
        b.iter(|| black_box(median_ci_ranks(black_box(10_000), 0.95)))
    });
    let xs = samples(10_000);
    c.bench_function("bootstrap/median_ci 10000 samples", |b| {
        b.iter(|| black_box(median_ci(black_box(&xs), &BootstrapOptions::default())))
    });
    // The report's test on pooled samples where there are too few runs for the per-run
    // test: linear in the samples, times 9,999 relabellings.
    let ys: Vec<f64> = samples(10_001).into_iter().skip(1).collect();
    let mut group = c.benchmark_group("abtest/permutation_test");
    group.sample_size(10);
    group.bench_function("10000 vs 10000 samples", |b| {
        b.iter(|| black_box(permutation_test(&xs, &ys, &PermutationOptions::default())))
    });
    group.finish();
}

criterion_group!(benches, median_interval);
criterion_main!(benches);

//! Criterion benchmarks of the harness's own hot paths: what runs per VM exit and per
//! console line. `cargo bench -p hvbench-bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hvbench::console::LineAssembler;
use vmm::Devices;
use workloads::abi::{PIO_TEST_PORT, UART_PORT};
use workloads::protocol::{decode_event, LineBuilder, LineKind};

fn sample_line() -> Vec<u8> {
    LineBuilder::new(LineKind::Sample)
        .text("w", "cpu.cpuid")
        .text("m", "latency")
        .num("n", 7)
        .num("ops", 4096)
        .num("cycles", 15_193_088)
        .finish()
        .to_vec()
}

fn exit_dispatch(c: &mut Criterion) {
    let mut devices = Devices::new();
    c.bench_function("devices/pio_out test port (one exit's dispatch)", |b| {
        b.iter(|| black_box(devices.pio_out(black_box(PIO_TEST_PORT), black_box(&[0u8]))))
    });
    let line = sample_line();
    let mut group = c.benchmark_group("devices/uart line");
    group.throughput(Throughput::Bytes(line.len() as u64));
    group.bench_function("pio_out + take_console_output", |b| {
        b.iter(|| {
            devices.pio_out(UART_PORT, black_box(&line));
            black_box(devices.take_console_output(false))
        })
    });
    group.finish();
}

fn line_decoding(c: &mut Criterion) {
    let line = sample_line();
    let body = &line[..line.len() - 1];
    c.bench_function("protocol/decode_event sample line", |b| {
        b.iter(|| black_box(decode_event(black_box(body))))
    });
    let chunk: Vec<u8> = std::iter::repeat_n(line.clone(), 100).flatten().collect();
    let mut group = c.benchmark_group("console/assemble+decode");
    group.throughput(Throughput::Elements(100));
    group.bench_function("100 lines", |b| {
        b.iter(|| {
            let mut assembler = LineAssembler::new();
            for l in assembler.push(black_box(&chunk)) {
                if let hvbench::console::ConsoleLine::Line(bytes) = l {
                    black_box(decode_event(&bytes).ok());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, exit_dispatch, line_decoding);
criterion_main!(benches);

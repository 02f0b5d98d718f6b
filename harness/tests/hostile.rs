//! The guest is untrusted: a hostile guest (tests/common/hostile.rs, built here in
//! milliseconds) says what it likes through the real `hvbench run --backend kvm`, and the
//! host must end the run, record what happened, and keep the terminal and its memory safe.

mod common;

use std::time::Duration;

use common::hostile::{run_hostile, Lines, Script};
use workloads::protocol::LineKind;

/// A run that should finish long before this is a hang.
const BOUND: Duration = Duration::from_secs(60);

#[test]
fn the_fixture_reports_like_a_real_guest() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let guest = Lines::new()
        .hello()
        .measured("cpu.idle", 5)
        .end("success")
        .bytes();
    let run = run_hostile(&Script::once(guest), &["-w", "cpu.idle"], BOUND);
    assert_eq!(run.code(), Some(0), "{}", run.stderr_text());
    let idle = run.of("cpu.idle");
    assert_eq!(idle.len(), 1, "{:?}", run.records);
    assert_eq!(idle[0]["status"], "success", "{:?}", idle[0]);
    assert_eq!(idle[0]["samples"].as_array().map(Vec::len), Some(5));
}

/// Defect 1: a guest's `skip` was never written as a record, so the run booted the guest
/// again for it, forever.
#[test]
fn a_guest_that_only_skips_ends_the_run_with_skip_records() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let guest = Lines::new()
        .hello()
        .skip("cpu.idle", "hostile says no")
        .skip("cpu.rdtsc", "hostile says no")
        .end("skip")
        .bytes();
    let run = run_hostile(
        &Script::once(guest),
        &["-w", "cpu.idle", "-w", "cpu.rdtsc"],
        Duration::from_secs(30),
    );
    assert_eq!(
        run.code(),
        Some(0),
        "{:?}\n{}",
        run.status,
        run.stderr_text()
    );
    for w in ["cpu.idle", "cpu.rdtsc"] {
        let r = run.of(w);
        assert_eq!(r.len(), 1, "{w}: {:?}", run.records);
        assert_eq!(r[0]["status"], "skip");
        assert_eq!(r[0]["reason"], "hostile says no");
    }
}

/// Defect 4: the workload limit was recomputed on every poll, so a guest that said hello
/// and spun was never stopped.
#[test]
fn a_guest_that_says_hello_and_spins_times_out() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let guest = Lines::new().hello().bytes();
    let run = run_hostile(
        &Script::then_spin(guest),
        &["-w", "cpu.idle", "--timeout-s", "2"],
        Duration::from_secs(30),
    );
    assert!(run.status.is_some(), "still running after 30 s");
    assert!(run.elapsed < Duration::from_secs(20), "{:?}", run.elapsed);
    assert_eq!(run.code(), Some(3), "{}", run.stderr_text());
    let idle = run.of("cpu.idle");
    assert_eq!(idle.len(), 1, "{:?}", run.records);
    assert_eq!(idle[0]["status"], "timeout", "{:?}", idle[0]);
}

/// Defect 5: empty lines and problem lines were kept without limit (and the backend's
/// channel was unbounded): a flooding guest grew the host's memory and output.
#[test]
fn a_console_flood_is_counted_not_kept() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    // Per round: 64 Ki empty lines and 128 protocol lines the host cannot use (a note for a
    // workload that is not running, a second hello). 16 rounds: 1 Mi empty lines, 2 Ki
    // problems. (kvm_pvm emulates the guest's `rep outsb` a byte an exit, about 25 us a
    // byte: this takes half a minute.)
    let mut blob = vec![b'\n'; 64 * 1024];
    let mut problems = Lines::new();
    for _ in 0..64 {
        problems = problems.note("cpu.rdtsc", "k", "v").hello();
    }
    blob.extend(problems.bytes());
    let mut guest = Lines::new().hello().bytes();
    guest.extend(&blob);
    let script = Script {
        blob: guest,
        repeat: 16,
        ending: common::hostile::Ending::Exit(0),
    };
    let run = run_hostile(
        &script,
        &["-w", "cpu.idle", "--timeout-s", "300"],
        Duration::from_secs(300),
    );
    let stderr = run.stderr_text();
    assert!(run.status.is_some(), "still running after 300 s");
    assert_eq!(run.code(), Some(3), "{stderr}");
    let rss = run.peak_rss_kib.expect("VmHWM of hvbench");
    eprintln!(
        "flood of 1 Mi empty lines and 2 Ki problems: {:?}, peak RSS {rss} KiB, {} bytes on stderr, {} of records",
        run.elapsed,
        run.stderr.len(),
        run.jsonl_bytes
    );
    assert!(rss < 32 * 1024, "hvbench peaked at {rss} KiB");
    assert!(
        run.stderr.len() < 64 * 1024,
        "{} bytes on stderr",
        run.stderr.len()
    );
    assert!(
        run.jsonl_bytes < 64 * 1024,
        "{} bytes of records",
        run.jsonl_bytes
    );
    assert!(
        stderr.contains("more problems of this boot were counted"),
        "{stderr}"
    );
    assert!(
        stderr.contains("more console lines than the host keeps"),
        "{stderr}"
    );
}

/// Defect 11: guest text (notes, reasons, problems) reached the terminal raw, escape
/// sequences included.
#[test]
fn guest_text_never_reaches_the_terminal_raw() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let evil = "clear\x1b[2J bell\x07 cr\r csi\u{9b}31m";
    let guest = Lines::new()
        .hello()
        .note("cpu.rdtsc", evil, evil)
        .skip("cpu.idle", evil)
        .start("cpu.rdtsc")
        .sample("cpu.rdtsc", 0)
        .note("cpu.rdtsc", "k", evil)
        .result("cpu.rdtsc", "error")
        .raw(b"noise \x1b[31m\x9b\x07\r\n")
        .line(
            |b| {
                b.text("w", "cpu.rdtsc")
                    .text("status", "error")
                    .text("reason", evil)
            },
            workloads::protocol::LineKind::Result,
        )
        .end("error")
        .bytes();
    let run = run_hostile(
        &Script::once(guest),
        &["-w", "cpu.idle", "-w", "cpu.rdtsc"],
        BOUND,
    );
    assert!(run.status.is_some(), "{}", run.stderr_text());
    assert!(
        run.stderr_text().contains("clear"),
        "the texts were printed: {}",
        run.stderr_text()
    );
    for (name, out) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        for raw in [&b"\x1b"[..], b"\x07", b"\r", b"\x9b"] {
            assert!(
                !out.windows(raw.len()).any(|w| w == raw),
                "{name} holds {raw:?} raw: {}",
                String::from_utf8_lossy(out)
            );
        }
    }
}

/// `start`, one measured sample of `metric` in series `p` with `ops` and `cycles`, `result`.
fn one_series(lines: Lines, w: &str, metric: &str, p: &str, ops: u64, cycles: u64) -> Lines {
    lines
        .start(w)
        .line(
            |b| {
                b.text("w", w)
                    .text("m", metric)
                    .text("p", p)
                    .num("n", 0)
                    .num("ops", ops)
                    .num("cycles", cycles)
            },
            LineKind::Sample,
        )
        .result(w, "success")
}

/// Defect 2: a 15-byte line whose checksum trailer overlaps the prefix panicked the host.
#[test]
fn a_line_of_only_prefix_and_trailer_is_an_error_not_a_panic() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let guest = Lines::new()
        .hello()
        .start("cpu.idle")
        .raw(b"@hvb1 ~362a6d45\n")
        .sample("cpu.idle", 0)
        .result("cpu.idle", "success")
        .end("success")
        .bytes();
    let run = run_hostile(&Script::once(guest), &["-w", "cpu.idle"], BOUND);
    let stderr = run.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(run.code(), Some(3), "{stderr}");
    let idle = run.of("cpu.idle");
    assert_eq!(idle.len(), 1, "{:?}", run.records);
    assert_eq!(idle[0]["status"], "error", "{:?}", idle[0]);
}

/// Defect 3: native twins sized their buffers and loops from the guest's numbers: `ws:0`
/// and `ws:2^64-1` crashed the host, a huge `ops` pinned it.
#[test]
fn guest_sizes_never_size_the_native_twins() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let mut guest = Lines::new().hello();
    for (p, ops) in [
        ("ws:0,page:4k", 100),
        ("ws:18446744073709551615,page:4k", 100),
        ("ws:16k,page:4k", u64::MAX / 2),
    ] {
        guest = one_series(guest, "mem.tlb-chase", "latency", p, ops, 1_000_000);
    }
    let mut seq = Lines::new();
    for (p, ops) in [
        ("size:0", 64),
        ("size:18446744073709551615", 64),
        ("size:64m", u64::MAX / 2),
    ] {
        seq = one_series(seq, "mem.seq-read", "bandwidth", p, ops, 1_000_000);
    }
    let mut bytes = guest.bytes();
    bytes.extend(seq.end("success").bytes());
    let run = run_hostile(
        &Script::once(bytes),
        &["-w", "mem.tlb-chase", "-w", "mem.seq-read"],
        Duration::from_secs(60),
    );
    assert!(run.status.is_some(), "still running after 60 s");
    assert!(run.elapsed < Duration::from_secs(30), "{:?}", run.elapsed);
    // An exit status, not a signal.
    assert_eq!(
        run.code(),
        Some(3),
        "{:?}\n{}",
        run.status,
        run.stderr_text()
    );
}

/// Defect 6: series were keyed by guest text without limit: 3,000 distinct `p=` values made
/// 3,000 records.
#[test]
fn a_guest_cannot_invent_series() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let mut guest = Lines::new().hello().start("mem.tlb-chase");
    for k in 1..=3000u64 {
        guest = guest.line(
            |b| {
                b.text("w", "mem.tlb-chase")
                    .text("m", "latency")
                    .text("p", &format!("ws:{}k,page:4k", 4 * k))
                    .num("n", 0)
                    .num("ops", 100)
                    .num("cycles", 10_000)
            },
            LineKind::Sample,
        );
    }
    let guest = guest
        .result("mem.tlb-chase", "success")
        .end("success")
        .bytes();
    let run = run_hostile(
        &Script::once(guest),
        &["-w", "mem.tlb-chase"],
        Duration::from_secs(120),
    );
    assert!(run.status.is_some(), "still running after 120 s");
    assert!(run.code().is_some(), "{:?}", run.status);
    // The host's default parameters define 6 working sets x 2 page sizes.
    let chase = run.of("mem.tlb-chase");
    assert!(chase.len() <= 12, "{} records", chase.len());
}

/// Defect 7: a guest median of 0 made the native ratio infinite, written as `null`, and
/// `hvbench report` then refused the whole directory.
#[test]
fn a_zero_guest_median_still_leaves_a_readable_directory() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let mut guest = Lines::new().hello().start("mem.tlb-chase");
    for n in 0..5 {
        guest = guest.line(
            |b| {
                b.text("w", "mem.tlb-chase")
                    .text("m", "latency")
                    .text("p", "ws:16k,page:4k")
                    .num("n", n)
                    .num("ops", 100)
                    .num("cycles", 0)
            },
            LineKind::Sample,
        );
    }
    let guest = guest
        .result("mem.tlb-chase", "success")
        .end("success")
        .bytes();
    let run = run_hostile(
        &Script::once(guest),
        &[
            "-w",
            "mem.tlb-chase",
            "--param",
            "mem.tlb-chase.ws=16k",
            "--param",
            "mem.tlb-chase.page=4k",
            "--samples",
            "5",
        ],
        BOUND,
    );
    assert!(run.status.is_some(), "{}", run.stderr_text());
    assert!(!run.records.is_empty(), "{}", run.stderr_text());
    let html = run.out.with_file_name("report");
    let report = common::hvbench()
        .arg("report")
        .arg(&run.out)
        .arg("--out")
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
}

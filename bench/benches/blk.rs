//! Block I/O through hvbench's VMM (virtio-blk, io_uring I/O thread) against QEMU microvm
//! (virtio-blk-device, cache=none, aio=native), both against the host's fio on the same
//! disk file: `io.blk-randread` (4 KiB) at queue depth 1 and 32, IOPS and p99 completion
//! latency, in interleaved rounds (KVM QEMU, QEMU KVM, ...) so drift in the host's disk
//! cancels. The fio figures are each record's native twin (same file, pattern, block size,
//! depth and region; --direct=1 --ioengine=io_uring).
//!
//! `cargo bench -p hvbench-bench --bench blk` (needs /dev/kvm, qemu-system-x86_64, fio;
//! HVBENCH_BENCH_DISK_DIR picks the disk's directory, default the target directory).
//! Not a test: it prints figures and asserts nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuAccel, QemuBackend, QemuOptions};
use hvbench::backend::Hypervisor;
use hvbench::disk::{DiskOptions, TestDisk};
use hvbench::guest_image::GuestImage;
use hvbench::run::{self, RunOptions, WorkloadParam};
use reports::stats::median;
use workloads::WorkloadId;

const ROUNDS: usize = 4;
const SAMPLES: u32 = 10;
const SAMPLE_US: u32 = 50_000;

/// (backend, qd, metric) -> medians of each round; and the same for fio.
type Figures = BTreeMap<(String, String, String), Vec<f64>>;

fn run_once(
    backend: &dyn Hypervisor,
    image: &GuestImage,
    guest: &mut Figures,
    native: &mut Figures,
) {
    let dir = std::env::temp_dir().join(format!(
        "hvbench-bench-blk-{}-{}",
        std::process::id(),
        guest.values().map(Vec::len).sum::<usize>()
    ));
    let options = RunOptions {
        workloads: vec![WorkloadId::IoBlkRandread],
        samples: SAMPLES,
        warmup: 1,
        sample_us: SAMPLE_US,
        repeat: 1,
        workload_timeout: Duration::from_secs(300),
        boot_timeout: Duration::from_secs(60),
        memory_mib: 128,
        vcpus: 1,
        guest_path: None,
        out: dir.clone(),
        params: vec![WorkloadParam::parse("io.blk-randread.region=256m").expect("param")],
        insn_markers: true,
    };
    let mut writer = reports::ResultsWriter::create(&dir, false).expect("results dir");
    let flag = AtomicBool::new(false);
    let summary = run::run(backend, image, &options, &mut writer, &flag).expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    let kind = backend.kind().name().to_string();
    for r in &summary.records {
        if !(r.metric == "iops" || r.metric == "lat_p99") {
            continue;
        }
        let qd = r.series.get("qd").cloned().unwrap_or_default();
        let key = (kind.clone(), qd.clone(), r.metric.clone());
        if let Some(m) = median(&r.samples) {
            guest.entry(key).or_default().push(m);
        }
        if let Some(n) = &r.native {
            native
                .entry(("fio".into(), qd, r.metric.clone()))
                .or_default()
                .push(n.median);
        }
    }
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("blk bench: /dev/kvm cannot be opened; nothing to measure");
        return;
    }
    let dir = std::env::var_os("HVBENCH_BENCH_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let disk = TestDisk::create(&DiskOptions {
        dir,
        size: 256 << 20,
        direct: true,
    })
    .expect("the disk file");
    let image = GuestImage::embedded().expect("embedded guest");
    let kvm = KvmBackend::new(hvbench::host::fingerprint())
        .expect("kvm")
        .with_disk(Some(&disk));
    let qemu = QemuBackend::new(
        QemuOptions {
            binary: "qemu-system-x86_64".into(),
            accel: QemuAccel::Kvm,
            machine: hvbench::backend::qemu::QemuMachine::Microvm,
            cpu: None,
            insns: false,
        },
        hvbench::host::fingerprint(),
    )
    .expect("qemu")
    .with_disk(Some(&disk));
    let details = kvm.info().details;
    eprintln!(
        "blk bench: disk {} on {} ({}), {} rounds of {} x {} ms samples",
        details["disk_path"],
        details["disk_filesystem"],
        details["disk_device"],
        ROUNDS,
        SAMPLES,
        SAMPLE_US / 1000
    );
    let (mut guest, mut native) = (Figures::new(), Figures::new());
    for round in 0..ROUNDS {
        let order: [&dyn Hypervisor; 2] = if round % 2 == 0 {
            [&kvm, &qemu]
        } else {
            [&qemu, &kvm]
        };
        for b in order {
            run_once(b, &image, &mut guest, &mut native);
        }
    }
    println!(
        "io.blk-randread 4 KiB, medians over {ROUNDS} rounds (each a median of {SAMPLES} samples)"
    );
    println!(
        "{:<6} {:>3} {:>12} {:>12} {:>14}",
        "who", "qd", "IOPS", "p99 us", "IOPS / fio"
    );
    for who in ["kvm", "qemu", "fio"] {
        for qd in ["1", "32"] {
            let table = if who == "fio" { &native } else { &guest };
            let get = |metric: &str, t: &Figures, w: &str| {
                t.get(&(w.to_string(), qd.to_string(), metric.to_string()))
                    .and_then(|v| median(v))
            };
            let iops = get("iops", table, who).unwrap_or(f64::NAN);
            let p99 = get("lat_p99", table, who).unwrap_or(f64::NAN) / 1000.0;
            let fio = get("iops", &native, "fio").unwrap_or(f64::NAN);
            println!(
                "{who:<6} {qd:>3} {iops:>12.0} {p99:>12.1} {:>14.3}",
                iops / fio
            );
        }
    }
}

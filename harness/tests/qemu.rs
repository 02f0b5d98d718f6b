//! The same guest image under QEMU's own PVH loader (microvm): proof that the image
//! follows the PVH ABI, not our VMM's habits.

mod common;

use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use reports::record::Status;
use workloads::WorkloadId;

#[test]
fn qemu_boots_the_same_image_and_reports_the_same_way() {
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = QemuBackend::new(
        QemuOptions {
            binary,
            accel: "auto".into(),
            cpu: None,
        },
        hvbench::host::fingerprint(),
    )
    .unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuIdle,
            WorkloadId::CpuCpuid,
            WorkloadId::CpuCompute,
            WorkloadId::IoPioOut,
            WorkloadId::IoMmioRead,
            WorkloadId::IoPioOutKernel,
            WorkloadId::CpuHlt,
            WorkloadId::SelftestTripleFault,
        ],
        dir.path(),
    );
    options.workload_timeout = std::time::Duration::from_secs(20);
    let summary = common::run_with(&backend, &options);
    let get = |name: &str| summary.records.iter().find(|r| r.workload == name).unwrap();
    for name in [
        "cpu.idle",
        "cpu.cpuid",
        "cpu.compute",
        "io.pio-out",
        "io.mmio-read",
    ] {
        let r = get(name);
        assert_eq!(r.status, Status::Success, "{name}: {:?}", r.reason);
        assert!(r.samples.iter().all(|s| *s > 0.0));
        assert_eq!(r.backend.kind, "qemu");
        assert!(r.backend.version.contains("QEMU"), "{}", r.backend.version);
        assert!(r.reproduce.contains("--backend qemu"));
    }
    // QEMU's unassigned MMIO reads as zero: the guest reports what it got, not what it
    // expected.
    assert!(get("io.mmio-read").notes.contains_key("value"));
    // Paths QEMU does not have are skipped, with the reason.
    for name in ["io.pio-out-kernel", "cpu.hlt"] {
        let r = get(name);
        assert_eq!(r.status, Status::Skip, "{name}");
        assert!(r.reason.as_deref().unwrap_or("").contains("QEMU"), "{name}");
    }
    let r = get("selftest.triple-fault");
    assert_eq!(r.status, Status::Crash);
    assert!(r.reason.as_deref().unwrap().contains("triple fault"));
    // No QEMU is left behind.
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", "hvbench-qemu"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert!(leftover.is_empty(), "QEMU processes left: {leftover}");
}

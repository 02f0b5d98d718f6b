//! `sched.*` on the real /dev/kvm (and QEMU where installed): an SMP guest whose
//! application processors start by INIT/SIPI, the IPI round trip and the timer wake-up.

mod common;

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use reports::record::{Record, Status};
use workloads::WorkloadId;

const SCHED_GUEST: [WorkloadId; 2] = [WorkloadId::SchedIpi, WorkloadId::SchedWakeup];

fn assert_positive_latencies(records: &[Record]) {
    assert_eq!(records.len(), 2, "{records:?}");
    for r in records {
        assert_eq!(r.status, Status::Success, "{}: {:?}", r.workload, r.reason);
        assert_eq!(r.samples.len(), 5, "{}", r.workload);
        assert!(
            r.samples.iter().all(|s| *s > 0.0),
            "{}: {:?}",
            r.workload,
            r.samples
        );
    }
}

#[test]
fn a_two_vcpu_guest_on_our_vmm_gives_positive_ipi_and_wakeup_latencies() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint())
        .unwrap()
        .with_vcpus(2);
    let mut options = common::quick_options(&SCHED_GUEST, dir.path());
    options.vcpus = 2;
    let summary = common::run_with(&backend, &options);
    assert_positive_latencies(&summary.records);
    let irqchip = &summary.records[0].backend.details["irqchip"];
    assert!(irqchip.starts_with("in-kernel"), "{irqchip}");
}

#[test]
fn a_uniprocessor_guest_on_our_vmm_skips_sched_and_still_times_hlt() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let mut workloads = SCHED_GUEST.to_vec();
    workloads.push(WorkloadId::CpuHlt);
    let summary = common::run_with(&backend, &common::quick_options(&workloads, dir.path()));
    for r in &summary.records {
        let expected = if r.workload == "cpu.hlt" {
            Status::Success
        } else {
            Status::Skip
        };
        assert_eq!(r.status, expected, "{}: {:?}", r.workload, r.reason);
    }
    let ipi = summary.records.iter().find(|r| r.workload == "sched.ipi");
    let reason = ipi.and_then(|r| r.reason.clone()).unwrap_or_default();
    assert!(reason.contains("--vcpus 2"), "{reason}");
}

#[test]
fn a_two_vcpu_guest_on_qemu_gives_positive_ipi_and_wakeup_latencies() {
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = QemuBackend::new(
        QemuOptions {
            binary,
            accel: hvbench::backend::qemu::QemuAccel::Auto,
            cpu: None,
        },
        hvbench::host::fingerprint(),
    )
    .unwrap();
    let mut options = common::quick_options(&SCHED_GUEST, dir.path());
    options.vcpus = 2;
    let summary = common::run_with(&backend, &options);
    assert_positive_latencies(&summary.records);
}

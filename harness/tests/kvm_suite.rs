//! The guest on hvbench's own VMM, on the real /dev/kvm: every workload, the self-tests,
//! and the records they leave.

mod common;

use std::time::Duration;

use hvbench::backend::kvm::KvmBackend;
use reports::read_results;
use reports::record::Status;
use workloads::{BackendFeature, Group, Requirement, WorkloadId, WORKLOADS};

#[test]
fn every_workload_succeeds_with_positive_figures() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let host = hvbench::host::fingerprint();
    let backend = KvmBackend::new(host.clone()).unwrap();
    let all: Vec<WorkloadId> = WORKLOADS
        .iter()
        // The CPU and I/O suite; memory workloads have their own test (tests/memory.rs),
        // and so have the block workloads, which need a disk (tests/blk.rs).
        .filter(|w| !w.explicit_only && matches!(w.group, Group::Cpu | Group::Io))
        .filter(|w| {
            !w.requires
                .contains(&Requirement::Backend(BackendFeature::BlockDevice))
        })
        .map(|w| w.id)
        .collect();
    let summary = common::run_with(&backend, &common::quick_options(&all, dir.path()));
    let records = read_results(dir.path()).unwrap();
    assert!(
        records == summary.records,
        "what was written differs from what was returned"
    );
    assert_eq!(records.len(), all.len());

    for r in &records {
        if r.workload == "cpu.hypercall-kernel" && host.kvm_module == "kvm_pvm" {
            // kvm_pvm refuses hypercalls from emulated CPL0 with #UD: skipped, with why.
            assert_eq!(r.status, Status::Skip, "{r:?}");
            assert!(r.reason.as_deref().unwrap_or("").contains("#UD"), "{r:?}");
            continue;
        }
        assert_eq!(r.status, Status::Success, "{}: {:?}", r.workload, r.reason);
        assert_eq!(r.samples.len(), 5, "{}", r.workload);
        assert_eq!(r.warmup_samples.len(), 1, "{}", r.workload);
        assert!(
            r.samples.iter().all(|s| *s > 0.0),
            "{}: {:?}",
            r.workload,
            r.samples
        );
        assert!(r.samples_cycles.iter().all(|s| *s > 0.0), "{}", r.workload);
        let summary = r.summary.as_ref().unwrap();
        assert!(
            summary.median_ci95.low <= summary.median && summary.median <= summary.median_ci95.high
        );
        assert_eq!(r.unit, "ns");
        assert_eq!(r.backend.kind, "kvm");
        assert_eq!(r.host.class, host.class);
        assert_eq!(r.guest.hypervisor, "kvm");
        assert_eq!(r.guest.image_sha256.len(), 64);
        assert!(r.guest.tsc_khz.unwrap_or(0) > 0);
        assert!(
            r.reproduce.contains(&format!("--workload {}", r.workload)),
            "{}",
            r.reproduce
        );
        assert!(!r.hvbench.git_revision.is_empty());
    }

    let by_name = |n: &str| records.iter().find(|r| r.workload == n).unwrap();
    // Exits are charged to the workload that caused them.
    assert!(
        by_name("io.pio-out")
            .exits
            .get("pio_test")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert!(
        by_name("io.mmio-read")
            .exits
            .get("mmio_test")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert!(by_name("cpu.hlt").exits.get("hlt").copied().unwrap_or(0) > 0);
    // The ioeventfd port is handled in the kernel: no exit for it reaches the VMM.
    assert_eq!(
        by_name("io.pio-out-kernel")
            .exits
            .get("pio_kernel_port_fallback"),
        None
    );
    // Values the VMM answered reach the guest.
    assert_eq!(
        by_name("io.pio-in").notes.get("value").map(String::as_str),
        Some("0x000000000000005a")
    );
    assert_eq!(
        by_name("io.mmio-read")
            .notes
            .get("value")
            .map(String::as_str),
        Some("0x000000005a5aa5a5")
    );
    // The compute kernel's result was checked and its native twin measured.
    let compute = by_name("cpu.compute");
    let native = compute.native.as_ref().expect("native twin");
    assert_eq!(native.samples.len(), 5);
    let ratio = native.ratio.expect("a finite ratio");
    // Same work per operation on both sides: a twin that timed other work (a sample for
    // an operation, another round count) is off by orders of magnitude. Guest and twin
    // run one after the other, so a busy 2-core host (load average 5 and more) moves the
    // ratio by up to 2x either way without anything being wrong.
    assert!(ratio > 0.25 && ratio < 4.0, "guest/native {ratio}");
    // The guest saw the memory it was given.
    assert_eq!(
        by_name("cpu.idle").guest.ram_bytes,
        Some((64 << 20) - 0x10_0000 + 0x9_fc00)
    );
}

#[test]
fn triple_fault_and_hang_are_reported_and_the_run_goes_on() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuIdle,
            WorkloadId::SelftestTripleFault,
            WorkloadId::SelftestHang,
        ],
        dir.path(),
    );
    options.workload_timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let summary = common::run_with(&backend, &options);
    assert!(started.elapsed() < Duration::from_secs(20));
    let status = |name: &str| {
        let r = summary.records.iter().find(|r| r.workload == name).unwrap();
        (r.status, r.reason.clone().unwrap_or_default())
    };
    assert_eq!(status("cpu.idle").0, Status::Success);
    let (s, reason) = status("selftest.triple-fault");
    assert_eq!(s, Status::Crash);
    assert!(
        reason.contains("triple fault") && reason.contains("rip="),
        "{reason}"
    );
    // A fresh guest ran the next workload after the crash.
    let (s, reason) = status("selftest.hang");
    assert_eq!(s, Status::Timeout);
    assert!(reason.contains("2.0 s"), "{reason}");
    assert_eq!(summary.status(), Status::Crash);
}

#[test]
fn a_guest_exception_is_a_crash_naming_vector_rip_and_address() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let options = common::quick_options(
        &[WorkloadId::CpuRdtsc, WorkloadId::SelftestPageFault],
        dir.path(),
    );
    let summary = common::run_with(&backend, &options);
    let r = summary
        .records
        .iter()
        .find(|r| r.workload == "selftest.page-fault")
        .unwrap();
    assert_eq!(r.status, Status::Crash);
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.contains("guest exception 14 (#PF page fault)"),
        "{reason}"
    );
    assert!(
        reason.contains("cr2=0x4000000000") && reason.contains("rip=0x"),
        "{reason}"
    );
    assert!(
        reason.contains("cs=0x23"),
        "the fault was taken at CPL3: {reason}"
    );
}

#[test]
fn a_refused_command_line_ends_with_an_error_status() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    // The guest refuses a bad command line with a note and an error status, not a hang.
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let image = hvbench::guest_image::GuestImage::embedded().unwrap();
    use hvbench::backend::{BootRequest, GuestEnd, GuestMessage, Hypervisor};
    let session = backend
        .boot(&BootRequest {
            image: &image,
            cmdline: "hvbench run=cpu.idle samples=0",
            memory_mib: 32,
            vcpus: 1,
            name: "refused".into(),
        })
        .unwrap();
    let mut text = Vec::new();
    let end = loop {
        match session
            .messages()
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
        {
            GuestMessage::Console { bytes, .. } => text.extend(bytes),
            GuestMessage::Notice(n) => panic!("the KVM backend's stream needs no notices: {n}"),
            GuestMessage::Ended(end) => break end,
        }
    };
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("cmdline_error"), "{text}");
    assert!(text.contains("end status=error"), "{text}");
    assert_eq!(end, GuestEnd::Exited { code: 2 });
}

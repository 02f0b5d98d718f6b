//! The memory workloads on hvbench's VMM and the real /dev/kvm.

mod common;

use hvbench::backend::kvm::KvmBackend;
use hvbench::run::WorkloadParam;
use reports::record::Status;
use workloads::WorkloadId;

#[test]
fn every_guest_driven_memory_workload_succeeds() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::MemFirstTouch,
            WorkloadId::MemProtFault,
            WorkloadId::MemTlbChase,
            WorkloadId::MemSeqRead,
            WorkloadId::MemCopy,
            WorkloadId::MemPtUpdate,
            WorkloadId::MemCr3Switch,
        ],
        dir.path(),
    );
    options.samples = 3;
    options.memory_mib = 128;
    for p in [
        "mem.first-touch.pages=256",
        "mem.prot-fault.pages=64",
        "mem.tlb-chase.ws=16k,4m",
        "mem.seq-read.size=4m",
        "mem.copy.size=2m",
    ] {
        options.params.push(WorkloadParam::parse(p).unwrap());
    }
    let summary = common::run_with(&backend, &options);
    for r in &summary.records {
        assert_eq!(
            r.status,
            Status::Success,
            "{} {:?}: {:?}",
            r.workload,
            r.series,
            r.reason
        );
        assert_eq!(r.samples.len(), 3, "{}", r.workload);
        assert!(
            r.samples.iter().all(|s| *s > 0.0 && s.is_finite()),
            "{}: {:?}",
            r.workload,
            r.samples
        );
    }
    let find = |w: &str, series: &[(&str, &str)]| {
        summary
            .records
            .iter()
            .find(|r| {
                r.workload == w
                    && series
                        .iter()
                        .all(|(k, v)| r.series.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no record for {w} {series:?}"))
    };
    // Both page sizes of first touch, each series carrying its parameters.
    for page in ["4k", "2m"] {
        let r = find("mem.first-touch", &[("page", page)]);
        assert_eq!(r.ops_per_sample, vec![256; 3]);
        assert_eq!(
            r.parameters
                .workload_params
                .get("pages")
                .map(String::as_str),
            Some("256")
        );
        assert!(
            r.reproduce.contains("--param mem.first-touch.pages=256"),
            "{}",
            r.reproduce
        );
    }
    // The sweep: 2 sizes x 2 page sizes, each with a native twin.
    for ws in ["16k", "4m"] {
        for page in ["4k", "2m"] {
            let r = find("mem.tlb-chase", &[("ws", ws), ("page", page)]);
            let native = r.native.as_ref().expect("native twin");
            let ratio = native.ratio.expect("a finite ratio");
            assert!(ratio > 0.2 && ratio < 5.0, "{ws} {page}: {ratio}");
        }
    }
    for w in ["mem.seq-read", "mem.copy"] {
        let r = find(w, &[]);
        assert_eq!(r.unit, "MB/s");
        assert_eq!(r.direction, "higher_is_better");
        assert!(r.native.is_some(), "{w}");
    }
    // Each repaired fault went through the kernel's handler.
    assert_eq!(find("mem.prot-fault", &[]).ops_per_sample, vec![64; 3]);
}

#[test]
fn first_touch_refuses_to_reuse_touched_memory() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    // 32 MiB cannot hold 11 samples x 2 page sizes x 4 MiB of untouched pages: the
    // workload must say so rather than touch pages twice.
    let mut options = common::quick_options(&[WorkloadId::MemFirstTouch], dir.path());
    options.memory_mib = 32;
    options
        .params
        .push(WorkloadParam::parse("mem.first-touch.pages=1024").unwrap());
    let summary = common::run_with(&backend, &options);
    let r = &summary.records[0];
    assert_eq!(r.status, Status::Error);
    assert!(
        r.reason
            .as_deref()
            .unwrap_or("")
            .contains("untouched memory"),
        "{:?}",
        r.reason
    );
}

#[test]
fn host_huge_pages_are_recorded_and_reproduced() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint())
        .unwrap()
        .with_huge_pages(true);
    let mut options = common::quick_options(&[WorkloadId::MemTlbChase], dir.path());
    options.samples = 2;
    options
        .params
        .push(WorkloadParam::parse("mem.tlb-chase.ws=4m").unwrap());
    options
        .params
        .push(WorkloadParam::parse("mem.tlb-chase.page=2m").unwrap());
    let summary = common::run_with(&backend, &options);
    let r = &summary.records[0];
    assert_eq!(r.status, Status::Success, "{:?}", r.reason);
    assert!(r.backend.details["guest_ram"].contains("MADV_HUGEPAGE"));
    assert!(r.reproduce.contains("--host-hugepages"), "{}", r.reproduce);
}

//! `mem.balloon` on hvbench's VMM and the real /dev/kvm, the VMM's answer to a guest that
//! corrupts the balloon's queues, and `mem.balloon` on Xen in the lab (only when asked for
//! with HVBENCH_REQUIRE_XEN_LAB=1: it boots a TCG-nested Xen).

mod common;

use std::time::{Duration, Instant};

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::xen::xl::Paging;
use hvbench::backend::xen::{XenBackend, XenHostSpec};
use hvbench::run::WorkloadParam;
use reports::record::{Record, Status};
use workloads::WorkloadId;

fn record<'a>(records: &'a [Record], workload: &str, metric: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.workload == workload && r.metric == metric)
        .unwrap_or_else(|| panic!("no {workload} {metric} record in {records:#?}"))
}

/// Checks the four records of a successful `mem.balloon` run; returns the reclaimed ratios.
fn check_balloon_records(records: &[Record], samples: usize) -> Vec<f64> {
    for metric in ["inflate", "reclaimed", "deflate", "touch_after_deflate"] {
        let r = record(records, "mem.balloon", metric);
        assert_eq!(r.status, Status::Success, "{metric}: {:?}", r.reason);
        assert_eq!(r.samples.len(), samples, "{metric}: {:?}", r.samples);
        assert!(
            r.samples.iter().all(|s| s.is_finite() && *s > 0.0),
            "{metric}: {:?}",
            r.samples
        );
    }
    // The guest timed its samples; the host measured the memory.
    let inflate = record(records, "mem.balloon", "inflate");
    assert_eq!(inflate.unit, "MB/s");
    assert_eq!(inflate.samples_cycles.len(), samples);
    assert!(inflate.notes.contains_key("host_memory"));
    let reclaimed = record(records, "mem.balloon", "reclaimed");
    assert!(
        reclaimed.curves.contains_key("guest_memory"),
        "{:?}",
        reclaimed.curves
    );
    reclaimed.samples.clone()
}

#[test]
fn mem_balloon_reclaims_at_least_90_percent_of_a_64_mib_inflate() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let mut options = common::quick_options(&[WorkloadId::MemBalloon], dir.path());
    options.samples = 3;
    options.memory_mib = 256;
    options
        .params
        .push(WorkloadParam::parse("mem.balloon.size=64m").unwrap());
    let summary = common::run_with(&backend, &options);
    let reclaimed = check_balloon_records(&summary.records, 3);
    assert!(
        reclaimed.iter().all(|r| *r >= 0.9),
        "reclaimed {reclaimed:?} of 64 MiB"
    );
    let r = record(&summary.records, "mem.balloon", "reclaimed");
    assert_eq!(r.guest.hypervisor, "kvm", "the balloon guest's own hello");
    assert!(r.guest.tsc_khz.is_some());
    assert!(r.reproduce.contains("--param mem.balloon.size=64m"));
    // The curve went up by the pool and back down by the balloon.
    let points = &r.curves["guest_memory"].points;
    let top = points.iter().map(|p| p[1]).fold(f64::MIN, f64::max);
    let bottom_after_top = points
        .iter()
        .skip_while(|p| p[1] < top)
        .map(|p| p[1])
        .fold(f64::MAX, f64::min);
    assert!(top - bottom_after_top >= 57.0, "{points:?}");
    // Every exit the balloon caused was one the VMM handled in userspace.
    let inflate = record(&summary.records, "mem.balloon", "inflate");
    assert!(inflate.exits.get("mmio_balloon").copied().unwrap_or(0) >= 64 * 4);
}

#[test]
fn a_guest_that_corrupts_the_balloon_queue_gets_an_error_and_the_vmm_keeps_working() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    // One run, one VMM process: the corrupting guest first, then a balloon that must work.
    let mut options = common::quick_options(
        &[WorkloadId::SelftestBalloonCorrupt, WorkloadId::MemBalloon],
        dir.path(),
    );
    options.samples = 2;
    options.memory_mib = 128;
    options
        .params
        .push(WorkloadParam::parse("mem.balloon.size=16m").unwrap());
    let summary = common::run_with(&backend, &options);
    let corrupt = record(&summary.records, "selftest.balloon-corrupt", "outcome");
    assert_eq!(corrupt.status, Status::Error, "{:?}", corrupt.reason);
    let reason = corrupt.reason.as_deref().unwrap();
    assert!(reason.contains("the VMM refused 8 malformed"), "{reason}");
    assert!(reason.contains("outside guest RAM"), "{reason}");
    for case in [
        "head_outside_queue",
        "buffer_outside_ram",
        "pfn_outside_ram",
        "write_only_buffer",
        "ragged_length",
        "oversized_buffer",
        "broken_chain",
        "avail_index_jump",
    ] {
        assert_eq!(
            corrupt.notes.get(case).map(String::as_str),
            Some("refused"),
            "{case}: {:?}",
            corrupt.notes
        );
    }
    assert_eq!(
        corrupt.notes.get("recovered").map(String::as_str),
        Some("yes")
    );
    check_balloon_records(&summary.records, 2);
}

#[test]
fn a_balloon_larger_than_the_guest_is_an_error_before_any_boot() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = KvmBackend::new(hvbench::host::fingerprint()).unwrap();
    let mut options = common::quick_options(&[WorkloadId::MemBalloon], dir.path());
    options.memory_mib = 64;
    options
        .params
        .push(WorkloadParam::parse("mem.balloon.size=64m").unwrap());
    let started = Instant::now();
    let summary = common::run_with(&backend, &options);
    for r in &summary.records {
        assert_eq!(r.status, Status::Error);
        assert!(
            r.reason.as_deref().unwrap().contains("--memory-mib"),
            "{:?}",
            r.reason
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn mem_balloon_succeeds_on_xen_in_the_lab() {
    if !common::required("HVBENCH_REQUIRE_XEN_LAB") {
        eprintln!(
            "notice: mem.balloon on Xen needs the TCG-nested Xen lab; set \
             HVBENCH_REQUIRE_XEN_LAB=1 to run it (HVBENCH_XEN_LAB_CACHE_DIR picks the lab)"
        );
        return;
    }
    assert!(
        common::qemu_binary().is_some(),
        "the Xen lab needs qemu-system-x86_64"
    );
    let _serial = common::exclusive();
    let started = Instant::now();
    let lab = common::XenLabUse::new();
    let cache = lab.cache.clone();
    let already_up = lab.already_up;
    lab.up(&[]);
    let host = XenHostSpec::lab(
        "lab",
        lab::xen_host_in(&cache).expect("the lab as --xen-host"),
    );
    let backend = XenBackend::new(host.clone(), Paging::Hap).expect("xen backend");
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::quick_options(&[WorkloadId::MemBalloon], dir.path());
    options.samples = 2;
    options.warmup = 0;
    options.memory_mib = 128;
    options.workload_timeout = Duration::from_secs(60);
    options.boot_timeout = Duration::from_secs(60);
    options
        .params
        .push(WorkloadParam::parse("mem.balloon.size=32m").unwrap());
    let summary = common::run_with(&backend, &options);
    let reclaimed = check_balloon_records(&summary.records, 2);
    // `xl list` counts MiB: a 32 MiB balloon shows whole.
    assert!(reclaimed.iter().all(|r| *r >= 0.9), "{reclaimed:?}");
    let r = record(&summary.records, "mem.balloon", "reclaimed");
    assert_eq!(r.backend.kind, "xen");
    assert_eq!(r.guest.hypervisor, "xen");
    assert_eq!(r.host.class, "nested-tcg", "labelled as emulation");
    assert!(r.notes["host_memory"].contains("xl list"));
    // No domain is left behind.
    let list = host
        .transport
        .run("xl list", None, Duration::from_secs(60))
        .unwrap();
    let leftovers = common::guest_domains(&list.stdout);
    assert!(leftovers.is_empty(), "leftover domains: {leftovers:?}");
    lab.finish();
    eprintln!(
        "mem.balloon on the Xen lab took {:.1} s (lab already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
}

//! The block workloads on hvbench's VMM and on QEMU, both over a disk file hvbench made:
//! every `io.blk-*` workload succeeds with IOPS above zero, the guest's writes read back
//! (the guest verifies the region, the host checks the file), the VMM refuses a guest's
//! malformed requests and carries on, and a disk directory that cannot hold the disk is a
//! clear error before any guest boots. On Xen in the lab (only when asked for with
//! HVBENCH_REQUIRE_XEN_LAB=1: it boots a TCG-nested Xen) the same workloads run through
//! blkfront/blkback, and no domain or loop device is left behind.

mod common;

use std::path::Path;

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuAccel, QemuBackend, QemuOptions};
use hvbench::backend::xen::xl::Paging;
use hvbench::backend::xen::{XenBackend, XenHostSpec};
use hvbench::backend::Hypervisor;
use hvbench::disk::{DiskOptions, TestDisk};
use hvbench::run::WorkloadParam;
use reports::record::{Record, Status};
use workloads::WorkloadId;

const BLOCK_WORKLOADS: [WorkloadId; 5] = [
    WorkloadId::IoBlkRandread,
    WorkloadId::IoBlkRandwrite,
    WorkloadId::IoBlkSeqread,
    WorkloadId::IoBlkSeqwrite,
    WorkloadId::IoBlkFlush,
];

/// A disk on a real filesystem (the target directory), not /tmp, which may be tmpfs.
fn disk() -> TestDisk {
    TestDisk::create(&DiskOptions {
        dir: Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf(),
        size: 16 << 20,
        direct: true,
    })
    .expect("a disk in the target directory")
}

/// Small regions and few, short samples: the path is what is checked here, not the speed.
fn options(workloads: &[WorkloadId], out: &Path) -> hvbench::run::RunOptions {
    let mut options = common::quick_options(workloads, out);
    options.samples = 2;
    options.sample_us = 1_000;
    options.memory_mib = 128;
    options.workload_timeout = std::time::Duration::from_secs(120);
    for w in ["randread", "randwrite", "seqread", "seqwrite", "flush"] {
        options
            .params
            .push(WorkloadParam::parse(&format!("io.blk-{w}.region=4m")).unwrap());
    }
    options
}

fn check_block_records(records: &[Record]) {
    for w in BLOCK_WORKLOADS {
        let of: Vec<&Record> = records.iter().filter(|r| r.workload == w.name()).collect();
        assert!(!of.is_empty(), "no {} records", w.name());
        for r in &of {
            assert_eq!(
                r.status,
                Status::Success,
                "{} {}: {:?}",
                r.workload,
                r.metric,
                r.reason
            );
            assert!(r.samples.iter().all(|s| s.is_finite() && *s > 0.0), "{r:?}");
        }
        let iops = of
            .iter()
            .find(|r| r.metric == "iops")
            .expect("an iops record");
        assert_eq!(iops.unit, "IOPS");
        for metric in ["lat_p50", "lat_p99", "lat_max"] {
            assert!(
                of.iter().any(|r| r.metric == metric),
                "{} has no {metric}",
                w.name()
            );
        }
        // The host's fio on the same file, where fio is installed.
        if common::on_path("fio") {
            assert!(
                iops.native.is_some(),
                "{}: no native twin: {:?}",
                w.name(),
                iops.notes
            );
        }
    }
    let randread: Vec<_> = records
        .iter()
        .filter(|r| r.workload == "io.blk-randread" && r.metric == "iops")
        .map(|r| r.series.get("qd").cloned().unwrap_or_default())
        .collect();
    assert!(randread.contains(&"1".to_string()) && randread.contains(&"32".to_string()));
}

fn check_disk(disk: &TestDisk) {
    let check = disk.check().unwrap();
    assert_eq!(check.corrupt, 0, "{check:?}");
    assert!(
        check.written > 0,
        "the guest's writes are not in the file: {check:?}"
    );
}

#[test]
fn every_block_workload_runs_on_the_vmm_and_the_data_reads_back() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk();
    let backend = KvmBackend::new(hvbench::host::fingerprint())
        .unwrap()
        .with_disk(Some(&disk));
    backend
        .supports(workloads::BackendFeature::VirtioBlk)
        .expect("the VMM with a disk has its virtio-blk");
    let summary = common::run_with(&backend, &options(&BLOCK_WORKLOADS, dir.path()));
    check_block_records(&summary.records);
    let r = &summary.records[0];
    assert_eq!(r.backend.details["disk_mode"], "O_DIRECT");
    assert!(r.backend.details.contains_key("disk_filesystem"));
    check_disk(&disk);
}

#[test]
fn malformed_requests_are_refused_and_the_vmm_carries_on() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk();
    let backend = KvmBackend::new(hvbench::host::fingerprint())
        .unwrap()
        .with_disk(Some(&disk));
    let workloads = [WorkloadId::IoBlkFlush, WorkloadId::SelftestBlkCorrupt];
    let summary = common::run_with(&backend, &options(&workloads, dir.path()));
    let selftest = summary
        .records
        .iter()
        .find(|r| r.workload == "selftest.blk-corrupt")
        .expect("a self-test record");
    assert_eq!(selftest.status, Status::Error, "{:?}", selftest.reason);
    let reason = selftest.reason.as_deref().unwrap_or("");
    assert!(reason.contains("refused as it must"), "{reason}");
    assert!(
        reason.contains("a good request was served after"),
        "{reason}"
    );
    // Nothing the malformed requests carried reached the disk.
    assert_eq!(disk.check().unwrap().corrupt, 0);
}

#[test]
fn every_block_workload_runs_on_qemu_over_the_same_kind_of_disk() {
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk();
    let backend = QemuBackend::new(
        QemuOptions {
            binary,
            accel: QemuAccel::Auto,
            machine: hvbench::backend::qemu::QemuMachine::Microvm,
            cpu: None,
            insns: false,
        },
        hvbench::host::fingerprint(),
    )
    .unwrap()
    .with_disk(Some(&disk));
    let summary = common::run_with(&backend, &options(&BLOCK_WORKLOADS, dir.path()));
    check_block_records(&summary.records);
    assert!(summary.records[0].backend.details["blk"].contains("cache=none"));
    check_disk(&disk);
}

#[test]
fn a_missing_disk_directory_is_an_error_before_any_guest_boots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let output = common::hvbench()
        .args([
            "run",
            "--backend",
            "kvm",
            "-w",
            "io.blk-randread",
            "--disk-dir",
        ])
        .arg(dir.path().join("missing"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !stderr.contains("io.blk-randread iops"),
        "a guest ran: {stderr}"
    );
    let records = std::fs::read_to_string(out.join("results.jsonl")).unwrap_or_default();
    assert!(records.is_empty(), "records were written: {records}");
}

/// What the dom0 runs of ours: domains other than dom0, and loop devices.
fn leftovers(host: &XenHostSpec) -> (Vec<String>, String) {
    let limit = std::time::Duration::from_secs(60);
    let list = host.transport.run("xl list", None, limit).unwrap();
    let domains = common::guest_domains(&list.stdout);
    let loops = host.transport.run("losetup -a", None, limit).unwrap();
    (
        domains,
        String::from_utf8_lossy(&loops.stdout).trim().to_string(),
    )
}

#[test]
fn every_block_workload_runs_on_xen_in_the_lab_through_blkfront() {
    if !common::required("HVBENCH_REQUIRE_XEN_LAB") {
        eprintln!(
            "notice: the block workloads on Xen need the TCG-nested Xen lab; set \
             HVBENCH_REQUIRE_XEN_LAB=1 to run them (HVBENCH_XEN_LAB_CACHE_DIR picks the lab)"
        );
        return;
    }
    assert!(
        common::qemu_binary().is_some(),
        "the Xen lab needs qemu-system-x86_64"
    );
    let _serial = common::exclusive();
    let started = std::time::Instant::now();
    let lab = common::XenLabUse::new();
    let cache = lab.cache.clone();
    let already_up = lab.already_up;
    lab.up(&[]);
    let host = XenHostSpec::lab("lab", lab::xen_host_in(&cache).expect("the lab"));
    let disk = TestDisk::create(&DiskOptions {
        dir: Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf(),
        size: 8 << 20,
        direct: true,
    })
    .unwrap();
    let backend = XenBackend::new(host.clone(), Paging::Hap)
        .unwrap()
        .with_disk(Some(&disk))
        .expect("the disk on the dom0");
    backend
        .supports(workloads::BackendFeature::BlockDevice)
        .expect("blkfront with a disk");
    backend
        .supports(workloads::BackendFeature::VirtioBlk)
        .expect_err("no virtio-blk on Xen");
    let dir = tempfile::tempdir().unwrap();
    // As `options`, with a 1 MiB region: TCG is slow.
    let mut options = common::quick_options(&BLOCK_WORKLOADS, dir.path());
    options.samples = 2;
    options.sample_us = 1_000;
    options.memory_mib = 128;
    options.warmup = 0;
    options.boot_timeout = std::time::Duration::from_secs(120);
    options.workload_timeout = std::time::Duration::from_secs(300);
    for w in ["randread", "randwrite", "seqread", "seqwrite", "flush"] {
        options
            .params
            .push(WorkloadParam::parse(&format!("io.blk-{w}.region=1m")).unwrap());
    }
    // 128 KiB requests still take three ring requests each; 1 MiB ones take minutes here.
    for w in ["seqread", "seqwrite"] {
        options
            .params
            .push(WorkloadParam::parse(&format!("io.blk-{w}.bs=128k")).unwrap());
    }
    let summary = common::run_with(&backend, &options);
    for w in BLOCK_WORKLOADS {
        let of: Vec<&Record> = summary
            .records
            .iter()
            .filter(|r| r.workload == w.name())
            .collect();
        assert!(
            of.iter().any(|r| r.metric == "iops"),
            "{}: {of:?}",
            w.name()
        );
        for r in &of {
            assert_eq!(
                r.status,
                Status::Success,
                "{} {}: {:?}",
                r.workload,
                r.metric,
                r.reason
            );
            assert!(r.samples.iter().all(|s| s.is_finite() && *s > 0.0), "{r:?}");
        }
    }
    let r = &summary.records[0];
    assert_eq!(r.backend.kind, "xen");
    assert_eq!(r.host.class, "nested-tcg", "labelled as emulation");
    assert!(r.backend.details.contains_key("disk_dom0_path"));
    // The guest's writes, fetched from the dom0, read back here.
    backend.fetch_disk().expect("the disk from the dom0");
    check_disk(&disk);
    let (domains, _) = leftovers(&host);
    assert!(domains.is_empty(), "leftover domains: {domains:?}");
    drop(backend);
    let (_, loops) = leftovers(&host);
    assert!(loops.is_empty(), "leftover loop devices: {loops}");
    lab.finish();
    eprintln!(
        "the block workloads on the Xen lab took {:.1} s (lab already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
}

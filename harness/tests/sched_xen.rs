//! `sched.*` on Xen in the lab (only when asked for; HVBENCH_XEN_LAB_CACHE_DIR picks the
//! lab): a 2-vCPU PVH guest whose AP comes up by VCPUOP_initialise/VCPUOP_up gives
//! positive IPI and wake-up latencies, and `sched.fairness` at weights 1:2 on credit2
//! records shares and Jain's index with no dom0 process faulting on the way (both with
//! HVBENCH_REQUIRE_XEN_LAB=1); no domain and no cpupool of hvbench's is left. Under TCG
//! the latencies are emulation time; the shares are ratios of Xen's CPU accounting.

mod common;

use std::time::{Duration, Instant};

use hvbench::backend::xen::xl::Paging;
use hvbench::backend::xen::{XenBackend, XenHostSpec};
use hvbench::run::WorkloadParam;
use reports::record::{Record, Status};
use workloads::WorkloadId;

fn record<'a>(records: &'a [Record], workload: &str, metric: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.workload == workload && r.metric == metric)
        .unwrap_or_else(|| panic!("no {workload} {metric} record in {records:?}"))
}

fn dom0(host: &XenHostSpec, command: &str) -> String {
    let out = host
        .transport
        .run(command, None, Duration::from_secs(60))
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ipi_and_wakeup(backend: &XenBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        common::quick_options(&[WorkloadId::SchedIpi, WorkloadId::SchedWakeup], dir.path());
    options.vcpus = 2;
    options.samples = 3;
    options.sample_us = 100;
    options.workload_timeout = Duration::from_secs(90);
    options.boot_timeout = Duration::from_secs(120);
    let records = common::run_with(backend, &options).records;
    for workload in ["sched.ipi", "sched.wakeup"] {
        let r = record(&records, workload, "latency");
        assert_eq!(r.status, Status::Success, "{workload}: {:?}", r.reason);
        assert_eq!(r.host.class, "nested-tcg", "labelled as emulation");
        assert!(r.samples.len() == 3 && r.samples.iter().all(|s| *s > 0.0));
    }
    let ipi = record(&records, "sched.ipi", "latency");
    assert_eq!(ipi.notes["ap_start"], "xen-vcpuop-up");
    assert_eq!(ipi.notes["ipi_path"], "xen-emulated-lapic");
    assert_eq!(ipi.notes["ipi_answer"], "ipi");
    let wakeup = record(&records, "sched.wakeup", "latency");
    assert!(wakeup.notes["timer"].starts_with("lapic-"));
}

/// dom0's kernel lines in the lab's serial log that say a process faulted.
fn dom0_faults(serial: &str) -> Vec<&str> {
    serial
        .lines()
        .filter(|l| l.contains("segfault at") || l.contains("general protection fault"))
        .collect()
}

/// The lab's serial log from byte `from` on (lossy: it is the lab's, not ours).
fn serial_since(cache: &std::path::Path, from: usize) -> String {
    let log = std::fs::read(cache.join("xen/run/serial.log")).unwrap_or_default();
    String::from_utf8_lossy(log.get(from..).unwrap_or_default()).into_owned()
}

fn fairness(backend: &XenBackend, cache: &std::path::Path) {
    let serial_before = std::fs::read(cache.join("xen/run/serial.log")).map_or(0, |l| l.len());
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::quick_options(&[WorkloadId::SchedFairness], dir.path());
    options.params = [
        "sched.fairness.ratio=2",
        "sched.fairness.duration_s=30",
        "sched.fairness.window_ms=1000",
    ]
    .iter()
    .map(|p| WorkloadParam::parse(p).unwrap())
    .collect();
    let records = common::run_with(backend, &options).records;
    let jain = record(&records, "sched.fairness", "jain");
    assert_eq!(jain.status, Status::Success, "{:?}", jain.reason);
    assert!(jain.samples[0] > 0.0 && jain.samples[0] <= 1.0 + 1e-9);
    let error = record(&records, "sched.fairness", "share_error");
    assert!(error.samples[0].is_finite() && error.samples[0] >= 0.0);
    assert!(jain.notes["xen_scheduler"].starts_with("credit2 in cpupool"));
    assert_eq!(jain.notes["weights"], "1:2");
    assert!(jain.notes.contains_key("received_over_entitled"));
    assert!(jain.notes.contains_key("cpupool_removed"));
    // Issue 12: with a dom0 vCPU per CPU, two busy domains made dom0's processes fault.
    let serial = serial_since(cache, serial_before);
    let faults = dom0_faults(&serial);
    assert!(faults.is_empty(), "dom0 processes faulted: {faults:#?}");
}

/// Runs `check` against the lab (deployed here with 3 CPUs where it is not up: the
/// domains' cpupool takes one, dom0 keeps two), then checks that no domain and no
/// cpupool of hvbench's is left, and takes the lab down if this test brought it up.
fn with_lab(what: &str, check: impl FnOnce(&XenBackend, &std::path::Path)) {
    let _serial = common::exclusive();
    let started = Instant::now();
    let lab = common::XenLabUse::new();
    let cache = lab.cache.clone();
    let already_up = lab.already_up;
    lab.up(&["--cpus", "3"]);
    let host = XenHostSpec::lab(
        "lab",
        lab::xen_host_in(&cache).expect("the lab as --xen-host"),
    );
    let backend = XenBackend::new(host.clone(), Paging::Hap).expect("xen backend");
    check(&backend, &cache);
    let domains = common::guest_domains(dom0(&host, "xl list").as_bytes());
    assert!(domains.is_empty(), "leftover domains: {domains:?}");
    let pools = dom0(&host, "xl cpupool-list");
    assert!(!pools.contains("hvbench"), "a cpupool was left: {pools}");
    drop(backend);
    lab.finish();
    eprintln!(
        "{what} on the Xen lab took {:.1} s (lab already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
}

fn lab_wanted(what: &str, variable: &str) -> bool {
    if !common::required(variable) {
        eprintln!(
            "notice: {what} on Xen needs the TCG-nested Xen lab; set {variable}=1 to run it \
             (HVBENCH_XEN_LAB_CACHE_DIR picks the lab)"
        );
        return false;
    }
    true
}

#[test]
fn dom0_faults_are_found_in_the_serial_log() {
    let log = "[   22.3] exe[243]: segfault at 0 ip 00000000004a4d02 sp 00007ffc70eda418 \
               error 4 in busybox[401000+184000]\n(XEN) d1v0 ok\n[   36.3] traps: exe[434] \
               general protection fault ip:4a4d02 sp:7ffd8eddb5b8 error:0 in busybox\n";
    assert_eq!(dom0_faults(log).len(), 2);
    assert!(dom0_faults("(XEN) Xen version 4.17.7\nHVBENCH-XEN-LAB-READY\n").is_empty());
}

#[test]
fn a_two_vcpu_pvh_guest_on_xen_gives_positive_ipi_and_wakeup_latencies() {
    if lab_wanted("sched.ipi/sched.wakeup", "HVBENCH_REQUIRE_XEN_LAB") {
        with_lab("sched.ipi and sched.wakeup", |backend, _| {
            ipi_and_wakeup(backend)
        });
    }
}

/// Two busy domains in a pool of one CPU; dom0 keeps the others with one vCPU (issue 12).
#[test]
fn fairness_at_1_to_2_on_credit2_in_the_lab_records_shares_and_jain() {
    if lab_wanted("sched.fairness", "HVBENCH_REQUIRE_XEN_LAB") {
        with_lab("sched.fairness", fairness);
    }
}

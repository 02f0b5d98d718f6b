//! `mig.*` on the real /dev/kvm through the real binary: two `hvbench vmm` processes, the
//! guest dirtying memory at a moderate rate is migrated, its memory check passes, the
//! downtime (ruler and VMM) and total time are positive and recorded, the ruler's
//! calibration is recorded, and no VMM process or socket is left behind.

mod common;

use reports::read_results;
use reports::record::{Record, Status};

fn mig_run(workload: &str, extra: &[&str]) -> Vec<Record> {
    mig_run_on("kvm", workload, extra)
}

fn mig_run_on(backend: &str, workload: &str, extra: &[&str]) -> Vec<Record> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let status = common::hvbench()
        .args(["run", "--backend", backend, "-w", workload])
        .args(["--memory-mib", "64", "--out", out.to_str().unwrap()])
        .args(extra)
        .status()
        .unwrap();
    assert!(status.code().is_some(), "hvbench ended by a signal");
    read_results(&out).unwrap()
}

fn metric<'a>(records: &'a [Record], name: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.metric == name)
        .unwrap_or_else(|| panic!("no {name} record"))
}

fn no_vmm_left() {
    let me = std::process::id().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(" vmm ") && c.contains("hvbench-mig-") && !c.contains(&me))
        .collect();
    assert!(left.is_empty(), "VMMs left behind: {left:?}");
}

#[test]
fn a_guest_dirtying_memory_migrates_with_its_memory_intact() {
    if !common::kvm_available() {
        return;
    }
    let _one = common::exclusive();
    let records = mig_run(
        "mig.dirty",
        &[
            "--param",
            "mig.dirty.ws=16m",
            "--param",
            "mig.dirty.rate=200",
            "--param",
            "mig.dirty.duration_ms=2500",
        ],
    );
    let downtime = metric(&records, "downtime");
    assert_eq!(downtime.status, Status::Success, "{:?}", downtime.reason);
    assert_eq!(downtime.notes["memory_check"], "passed");
    assert_eq!(
        downtime.series.get("rate").map(String::as_str),
        Some("200"),
        "each dirty rate is a series of its own"
    );
    assert!(downtime.samples[0] >= 0.0);
    assert!(downtime.notes.contains_key("calibration"));
    assert_eq!(downtime.notes["ruler_resolution_ms"], "5");
    for name in ["downtime_hypervisor", "total_time"] {
        let r = metric(&records, name);
        assert!(r.samples[0] > 0.0, "{name}: {:?}", r.samples);
    }
    assert!(
        metric(&records, "total_time").samples[0]
            >= metric(&records, "downtime_hypervisor").samples[0]
    );
    no_vmm_left();
}

#[test]
fn out_of_range_migration_parameters_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let output = common::hvbench()
        .args(["run", "--backend", "kvm", "-w", "mig.idle"])
        .args(["--param", "mig.idle.migrate_at_ms=100"])
        .args(["--out", dir.path().join("r").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("migrate_at_ms"), "{stderr}");
}

#[test]
fn qemu_migrates_the_same_guest_through_qmp_with_its_own_figures() {
    if !common::kvm_available() || common::qemu_binary().is_none() {
        return;
    }
    let _one = common::exclusive();
    let records = mig_run_on(
        "qemu",
        "mig.dirty",
        &[
            "--param",
            "mig.dirty.ws=16m",
            "--param",
            "mig.dirty.rate=200",
            "--param",
            "mig.dirty.duration_ms=2500",
        ],
    );
    let downtime = metric(&records, "downtime");
    assert_eq!(downtime.status, Status::Success, "{:?}", downtime.reason);
    assert_eq!(downtime.backend.kind, "qemu");
    assert_eq!(downtime.notes["memory_check"], "passed");
    assert!(downtime.notes["qemu_query_migrate"].contains("\"completed\""));
    assert!(downtime.notes["downtime_hypervisor_is"].starts_with("QEMU's"));
    assert!(metric(&records, "total_time").samples[0] > 0.0);
}

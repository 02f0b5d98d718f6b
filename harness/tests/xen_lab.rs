//! Xen, for real: hvbench deploys a Xen 4.17 host nested in QEMU (the lab), runs the
//! guest there through `xl`, and leaves no domain and no QEMU behind. Under TCG its
//! figures are emulation artefacts; this test proves the path, not the speed.
//!
//! The lab boots a hypervisor built from Debian's xen source with shadow paging (built
//! once per machine, then cached), with the instruction-count plugin loaded: `--paging
//! hap` and `--paging shadow` both run, and timed records get `insns` records.

mod common;

use std::time::{Duration, Instant};

use hostutil::transport::{SshTarget, Transport};
use hvbench::backend::xen::xl::Paging;
use hvbench::backend::xen::{XenBackend, XenHostSpec};
use hvbench::backend::Hypervisor;
use reports::record::Status;
use workloads::WorkloadId;

/// Whether a lab can be deployed here (QEMU and Debian's apt); CI requires it.
fn lab_possible() -> bool {
    let ok = common::qemu_binary().is_some()
        && ["apt-get", "dpkg-deb", "ssh"]
            .iter()
            .all(|cmd| common::on_path(cmd));
    if !ok {
        assert!(
            !common::required("HVBENCH_REQUIRE_XEN_LAB"),
            "the Xen lab cannot be deployed here (needs qemu-system-x86_64, apt-get, dpkg-deb, ssh)"
        );
        eprintln!("notice: cannot deploy the Xen lab here; skipping");
    }
    ok
}

#[test]
fn xen_lab_runs_the_guest_and_leaves_nothing_behind() {
    if !lab_possible() {
        return;
    }
    let _serial = common::exclusive();
    let cache = lab::default_cache_dir().expect("HOME is set");
    let already_up =
        matches!(<lab::XenLab as lab::Lab>::status(&cache), Ok(Some(s)) if s.healthy());
    let mut down_on_drop =
        common::LabDownOnDrop::new(<lab::XenLab as lab::Lab>::down, &cache, already_up);
    // Through the CLI, as a user deploys it.
    let started = Instant::now();
    let up = common::hvbench()
        .args(["lab", "up", "xen", "--hypervisor", "shadow", "--insns"])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(String::from_utf8_lossy(&up.stdout).contains("--xen-host lab"));
    eprintln!(
        "lab up in {:.1} s (already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
    let state = <lab::XenLab as lab::Lab>::status(&cache)
        .unwrap()
        .expect("state")
        .state;
    let build = state
        .hypervisor
        .clone()
        .expect("the lab names its hypervisor");
    assert_eq!(build.origin, "debian-source");
    assert_eq!(build.config_delta, ["CONFIG_SHADOW_PAGING=y"]);
    assert!(state.insns_log.is_some(), "the plugin is loaded");

    let host = XenHostSpec::lab(
        "lab",
        lab::xen_host_in(&cache).expect("the lab as --xen-host"),
    );
    let info = host
        .transport
        .run("xl info", None, Duration::from_secs(60))
        .expect("xl info answers");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("xen_version"));
    assert!(
        info.lines()
            .any(|l| l.starts_with("virt_caps") && l.contains(" shadow")),
        "{info}"
    );

    let backend = XenBackend::new(host.clone(), Paging::Hap).expect("xen backend");
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuIdle,
            WorkloadId::CpuRdtsc,
            WorkloadId::CpuCpuid,
            WorkloadId::CpuHypercall,
            WorkloadId::CpuCompute,
            WorkloadId::IoPioOut,
            WorkloadId::MemFirstTouch,
            WorkloadId::MemTlbChase,
            WorkloadId::SelftestTripleFault,
            WorkloadId::SelftestHang,
        ],
        dir.path(),
    );
    options.samples = 3;
    options.params = ["mem.first-touch.pages=64", "mem.tlb-chase.ws=16k,1m"]
        .iter()
        .map(|p| hvbench::run::WorkloadParam::parse(p).unwrap())
        .collect();
    // dom0 has one vCPU in the counting lab: it once took more than 10 s to tell a
    // triple fault (under 60 s).
    options.workload_timeout = Duration::from_secs(30);
    options.boot_timeout = Duration::from_secs(120);
    let mut records = common::run_with(&backend, &options).records;
    // The lab's emulated SVM triple-faults a guest now and then (seen at CPL3 just after a
    // cpuid exit, 3 times in about 27 boots, each while dom0 was busy): a workload that
    // crashed runs once more, and a crash that repeats fails the test.
    let crashed: Vec<WorkloadId> = records
        .iter()
        .filter(|r| r.status == Status::Crash && !r.workload.starts_with("selftest."))
        .filter_map(|r| WorkloadId::from_name(&r.workload))
        .fold(Vec::new(), |mut ids, id| {
            if !ids.contains(&id) {
                ids.push(id);
            }
            ids
        });
    if !crashed.is_empty() {
        for r in records
            .iter()
            .filter(|r| crashed.iter().any(|w| w.name() == r.workload))
        {
            eprintln!(
                "notice: {} crashed in the lab ({:?}); running it again",
                r.workload, r.reason
            );
        }
        let again_dir = tempfile::tempdir().unwrap();
        let mut again = options.clone();
        again.workloads = crashed.clone();
        again.out = again_dir.path().to_path_buf();
        records.retain(|r| !crashed.iter().any(|w| w.name() == r.workload));
        records.extend(common::run_with(&backend, &again).records);
    }
    let get = |name: &str| {
        records
            .iter()
            .find(|r| r.workload == name && r.metric != "insns")
            .unwrap()
    };
    for name in ["cpu.rdtsc", "cpu.cpuid", "cpu.hypercall", "cpu.compute"] {
        let r = get(name);
        assert_eq!(r.status, Status::Success, "{name}: {:?}", r.reason);
        assert!(
            r.samples.iter().all(|s| *s > 0.0),
            "{name}: {:?}",
            r.samples
        );
        assert_eq!(r.backend.kind, "xen");
        assert_eq!(r.guest.hypervisor, "xen", "the guest detected Xen");
        assert_eq!(r.guest.tsc_source, "guest: xen-cpuid-leaf4");
        assert_eq!(r.host.class, "nested-tcg", "labelled as emulation");
        assert_eq!(
            r.backend.details.get("guest_type").map(String::as_str),
            Some("pvh")
        );
        assert!(r.reproduce.contains("--xen-host lab"));
        // The lab's domains read the TSC natively, as on a real host, and say so.
        let tsc_mode = r.backend.details.get("tsc_mode").map(String::as_str);
        assert!(tsc_mode.unwrap_or("").starts_with("native"), "{tsc_mode:?}");
        // Counting instructions, the lab runs QEMU's instruction clock, and says so.
        assert_eq!(
            r.backend.details.get("lab_clock").map(String::as_str),
            Some(lab::INSNS_CLOCK)
        );
    }
    assert!(get("cpu.hypercall").notes.contains_key("return"));
    assert_eq!(
        get("cpu.cpuid").backend.details.get("lab_hypervisor"),
        Some(&build.describe())
    );
    // Memory on Xen: both page sizes of first touch, the sweep, with Xen's paging named.
    for r in records
        .iter()
        .filter(|r| r.group == "mem" && r.metric != "insns")
    {
        assert_eq!(
            r.status,
            Status::Success,
            "{} {:?}: {:?}",
            r.workload,
            r.series,
            r.reason
        );
        assert!(r.samples.iter().all(|s| *s > 0.0));
        assert_eq!(r.host.paging, "xen-hap");
    }
    let mem_series = records
        .iter()
        .filter(|r| r.group == "mem" && r.metric != "insns")
        .count();
    assert_eq!(
        mem_series,
        2 + 4,
        "first-touch 4k/2m and the chase's 2 sizes x 2 pages"
    );
    assert_eq!(get("io.pio-out").status, Status::Skip);
    assert_eq!(get("selftest.triple-fault").status, Status::Crash);
    assert_eq!(
        get("selftest.hang").status,
        Status::Timeout,
        "{:?}",
        get("selftest.hang").reason
    );

    check_insns(&records);
    shadow_paging_runs(&host, &build.describe());
    markers_off_yield_no_count(&backend);

    // No domain is left behind.
    let list = host
        .transport
        .run("xl list", None, Duration::from_secs(60))
        .unwrap();
    let domains: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    assert_eq!(domains, vec!["Domain-0".to_string()], "leftover domains");

    if !already_up {
        down_on_drop.disarm();
        let down = common::hvbench().args(["lab", "down"]).output().unwrap();
        assert!(down.status.success());
        assert!(String::from_utf8_lossy(&down.stdout).contains("stopped"));
        assert!(
            !common::qemu_alive(state.qemu_pid, &state.qemu_pid_file),
            "the lab's QEMU survived lab down"
        );
    }
}

/// The median of the `insns` record of `workload`, which must have succeeded.
fn insns_median(records: &[reports::record::Record], workload: &str) -> f64 {
    let r = records
        .iter()
        .find(|r| r.workload == workload && r.metric == "insns")
        .unwrap_or_else(|| panic!("{workload} has no insns record"));
    assert_eq!(r.status, Status::Success, "{workload}: {:?}", r.reason);
    assert_eq!(r.unit, "insns/op");
    assert_eq!(r.direction, "lower_is_better");
    assert!(r.notes.contains_key("insns_method"));
    r.summary.as_ref().expect("a summary").median
}

/// Instruction counts: cpu.cpuid's exit path is far longer than the guest's own loop
/// (cpu.idle: RDTSC is not trapped, the lab's domains run tsc_mode native), and a workload
/// that times its samples itself is counted too.
fn check_insns(records: &[reports::record::Record]) {
    let idle = insns_median(records, "cpu.idle");
    let cpuid = insns_median(records, "cpu.cpuid");
    assert!(idle > 0.0 && idle < 100.0, "idle {idle}");
    assert!(cpuid > 10.0 * idle, "cpuid {cpuid}, idle {idle}");
    let first_touch = insns_median(records, "mem.first-touch");
    assert!(first_touch > 0.0, "first touch {first_touch}");
}

/// `--paging shadow` on the lab's shadow-paging build: the CPU and page-table workloads
/// succeed, and the records say shadow and which hypervisor build.
fn shadow_paging_runs(host: &XenHostSpec, build: &str) {
    let shadow = XenBackend::new(host.clone(), Paging::Shadow).expect("shadow backend");
    assert_eq!(shadow.unavailable(), None);
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuCpuid,
            WorkloadId::MemPtUpdate,
            WorkloadId::MemCr3Switch,
            WorkloadId::MemProtFault,
        ],
        dir.path(),
    );
    options.workload_timeout = Duration::from_secs(30);
    options.boot_timeout = Duration::from_secs(120);
    let records = common::run_with(&shadow, &options).records;
    for r in records.iter().filter(|r| r.metric != "insns") {
        assert_eq!(r.status, Status::Success, "{}: {:?}", r.workload, r.reason);
        assert_eq!(r.host.paging, "xen-shadow", "{}", r.workload);
        assert_eq!(
            r.backend.details.get("lab_hypervisor").map(String::as_str),
            Some(build)
        );
    }
    assert_eq!(records.iter().filter(|r| r.metric != "insns").count(), 4);
    assert!(insns_median(&records, "cpu.cpuid") > 500.0);
}

/// A guest told to place no markers yields no count, and its insns record says so.
fn markers_off_yield_no_count(backend: &XenBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::quick_options(&[WorkloadId::CpuCpuid], dir.path());
    options.insn_markers = false;
    options.boot_timeout = Duration::from_secs(120);
    let records = common::run_with(backend, &options).records;
    let insns = records
        .iter()
        .find(|r| r.metric == "insns")
        .expect("an insns record");
    assert_eq!(insns.status, Status::Skip);
    assert!(insns.samples.is_empty());
    assert!(
        insns.reason.as_deref().unwrap_or("").contains("no markers"),
        "{:?}",
        insns.reason
    );
}

#[test]
fn an_unreachable_or_wrong_xen_host_is_a_clear_error_within_seconds() {
    let started = Instant::now();
    let unreachable = XenHostSpec {
        transport: Transport::Ssh(SshTarget::parse("ssh://root@127.0.0.1:1").unwrap()),
        spec: "ssh://root@127.0.0.1:1".into(),
        lab: None,
    };
    let e = XenBackend::new(unreachable, Paging::Hap).expect_err("refused");
    assert!(
        e.to_string()
            .contains("cannot reach ssh://root@127.0.0.1:1"),
        "{e}"
    );
    // This machine is no dom0: `xl` is missing or answers without a Xen version.
    let local = XenHostSpec {
        transport: Transport::Local,
        spec: "local".into(),
        lab: None,
    };
    let e = XenBackend::new(local, Paging::Hap).expect_err("refused");
    assert!(e.to_string().contains("xl"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

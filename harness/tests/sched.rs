//! `sched.*` on the real /dev/kvm (and QEMU where installed): an SMP guest whose
//! application processors start by INIT/SIPI, the IPI round trip and the timer wake-up.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use hvbench::run::WorkloadParam;
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
    let ipi = records.iter().find(|r| r.workload == "sched.ipi").unwrap();
    assert_eq!(ipi.notes["ipi_answer"], "ipi", "an IPI each way by default");
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
    // The AP's memory write as the answer instead.
    options.workloads = vec![WorkloadId::SchedIpi];
    options.params = vec![WorkloadParam::parse("sched.ipi.ipi_back=0").unwrap()];
    options.out = dir.path().join("memory");
    let memory = common::run_with(&backend, &options).records;
    assert_eq!(memory[0].status, Status::Success, "{:?}", memory[0].reason);
    assert_eq!(memory[0].notes["ipi_answer"], "memory");
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
            machine: hvbench::backend::qemu::QemuMachine::Microvm,
            cpu: None,
            insns: false,
        },
        hvbench::host::fingerprint(),
    )
    .unwrap();
    let mut options = common::quick_options(&SCHED_GUEST, dir.path());
    options.vcpus = 2;
    let summary = common::run_with(&backend, &options);
    assert_positive_latencies(&summary.records);
}

/// The CPU controller's root here, where fairness runs may create groups; `None` (the
/// cgroup tests are skipped) without root or a CPU controller.
fn cgroup_root() -> Option<PathBuf> {
    let hierarchy = cgroup::Hierarchy::detect(Path::new("/sys/fs/cgroup")).ok()?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("notice: not root: the cgroup tests are skipped");
        return None;
    }
    Some(hierarchy.root().to_path_buf())
}

/// hvbench's groups under `root` (`hvbench-<pid>`), of any run.
fn hvbench_groups(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("hvbench-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `hvbench run` options that select a backend whose vCPUs are KVM threads.
const OUR_VMM: &[&str] = &["--backend", "kvm"];
const QEMU_KVM: &[&str] = &["--backend", "qemu", "--qemu-accel", "kvm"];

/// Whether the backend `args` select can run here (QEMU: installed, or a skip).
fn backend_here(args: &[&str]) -> bool {
    common::kvm_available() && (args != QEMU_KVM || common::qemu_binary().is_some())
}

fn sched_run(
    backend: &[&str],
    out: &Path,
    workload: &str,
    params: &[&str],
) -> std::process::Command {
    let mut command = common::hvbench();
    command
        .arg("run")
        .args(backend)
        .args(["-w", workload, "--out"]);
    command.arg(out);
    for p in params {
        command.args(["--param", p]);
    }
    command
}

fn only(records: &[Record], metric: &str) -> Record {
    let found: Vec<&Record> = records.iter().filter(|r| r.metric == metric).collect();
    assert_eq!(found.len(), 1, "{metric}: {records:?}");
    found[0].clone()
}

/// QEMU processes still running that a sched run of hvbench `pid` started (its guests are
/// named `hvbench-<pid>-sched-<n>`).
fn qemus_left_by(pid: u32) -> Vec<String> {
    let name = format!("hvbench-{pid}-sched-");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&name))
        .collect()
}

/// Runs `command` to its end; its output and pid.
fn run_to_end(mut command: std::process::Command) -> (std::process::Output, u32) {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

fn steal_agrees(backend: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    // Pinned to 2 host CPUs, so that 4 spinning vCPUs overcommit any host.
    let params = ["sched.steal.duration_s=4", "sched.steal.pin=2"];
    let (output, pid) = run_to_end(sched_run(backend, dir.path(), "sched.steal", &params));
    assert!(output.status.success(), "{output:?}");
    assert!(qemus_left_by(pid).is_empty(), "{:?}", qemus_left_by(pid));
    let records = reports::read_results(dir.path()).unwrap();
    for metric in ["steal_guest", "steal_host"] {
        let r = only(&records, metric);
        assert_eq!(r.status, Status::Success, "{r:?}");
        // 2 guests x 2 vCPUs, each spinning, on 2 host CPUs: all steal.
        assert_eq!(r.samples.len(), 4, "{r:?}");
        assert!(
            r.samples.iter().all(|s| *s > 0.0),
            "{metric}: {:?}",
            r.samples
        );
    }
    let d = only(&records, "steal_disagreement");
    assert!(
        d.samples[0] < 0.10,
        "guest and host differ by {}",
        d.samples[0]
    );
}

#[test]
fn steal_time_as_the_guest_reads_it_agrees_with_the_hosts_run_delay() {
    if !backend_here(OUR_VMM) {
        return;
    }
    let _serial = common::exclusive();
    steal_agrees(OUR_VMM);
}

#[test]
fn on_qemu_steal_time_agrees_with_the_run_delay_of_its_vcpu_threads() {
    if !backend_here(QEMU_KVM) {
        return;
    }
    let _serial = common::exclusive();
    steal_agrees(QEMU_KVM);
}

fn fairness_meets_1_to_2(backend: &[&str], root: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let params = [
        "sched.fairness.duration_s=10",
        "sched.fairness.ratio=2",
        "sched.fairness.pin=2",
    ];
    let (output, pid) = run_to_end(sched_run(backend, dir.path(), "sched.fairness", &params));
    assert!(output.status.success(), "{output:?}");
    assert!(qemus_left_by(pid).is_empty(), "{:?}", qemus_left_by(pid));
    let records = reports::read_results(dir.path()).unwrap();
    let error = only(&records, "share_error");
    assert_eq!(error.status, Status::Success, "{error:?}");
    assert!(
        error.samples[0] < 0.10,
        "shares off 1:2 by {}",
        error.samples[0]
    );
    assert!(
        error.notes["cgroups"].starts_with("cgroup v"),
        "{:?}",
        error.notes
    );
    assert_eq!(error.curves.len(), 2, "a share curve per guest");
    assert!(only(&records, "jain").samples[0] > 0.9);
    assert!(
        hvbench_groups(root).is_empty(),
        "{:?}",
        hvbench_groups(root)
    );
}

#[test]
fn fairness_at_weights_1_to_2_meets_them_and_leaves_no_cgroup() {
    if !backend_here(OUR_VMM) {
        return;
    }
    let Some(root) = cgroup_root() else { return };
    let _serial = common::exclusive();
    fairness_meets_1_to_2(OUR_VMM, &root);
}

#[test]
fn on_qemu_fairness_at_weights_1_to_2_meets_them_and_leaves_no_cgroup_nor_qemu() {
    if !backend_here(QEMU_KVM) {
        return;
    }
    let Some(root) = cgroup_root() else { return };
    let _serial = common::exclusive();
    fairness_meets_1_to_2(QEMU_KVM, &root);
}

/// Waits for a fairness run (pid) to have created its groups.
fn wait_for_groups(root: &Path, pid: u32) -> PathBuf {
    let group = root.join(format!("hvbench-{pid}"));
    let started = std::time::Instant::now();
    while !group.join("g1").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no groups appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    group
}

#[test]
fn ctrl_c_leaves_no_cgroup_and_a_killed_runs_are_removed_by_the_next_run() {
    if !common::kvm_available() {
        return;
    }
    let Some(root) = cgroup_root() else { return };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let params = ["sched.fairness.duration_s=60"];
    // Ctrl-C: hvbench removes its groups on the way out.
    let mut child = sched_run(OUR_VMM, &dir.path().join("a"), "sched.fairness", &params)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let group = wait_for_groups(&root, child.id());
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!group.exists(), "Ctrl-C left {}", group.display());
    // SIGKILL: the groups stay, and the next run removes them and says so.
    let mut child = sched_run(OUR_VMM, &dir.path().join("b"), "sched.fairness", &params)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let group = wait_for_groups(&root, child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(group.exists(), "a killed run cannot remove its groups");
    let mut next = common::hvbench();
    next.args([
        "run",
        "--backend",
        "kvm",
        "-w",
        "cpu.idle",
        "--samples",
        "1",
        "--out",
    ]);
    let output = next.arg(dir.path().join("c")).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("cgroups left by hvbench pid"), "{stderr}");
    assert!(!group.exists(), "the next run left {}", group.display());
}

#[test]
fn on_qemu_ctrl_c_leaves_no_cgroup_nor_qemu() {
    if !backend_here(QEMU_KVM) {
        return;
    }
    let Some(root) = cgroup_root() else { return };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let params = ["sched.fairness.duration_s=60"];
    let mut child = sched_run(QEMU_KVM, dir.path(), "sched.fairness", &params)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let group = wait_for_groups(&root, child.id());
    // The QEMUs are up and in their groups before the interruption.
    let started = std::time::Instant::now();
    while qemus_left_by(child.id()).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no QEMU started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!group.exists(), "Ctrl-C left {}", group.display());
    assert!(
        qemus_left_by(child.id()).is_empty(),
        "{:?}",
        qemus_left_by(child.id())
    );
}

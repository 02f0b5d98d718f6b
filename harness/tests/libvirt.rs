//! The guest as a libvirt domain (`--backend libvirt`), through the real `hvbench run`:
//! workloads succeed, a hang is a timeout, Ctrl-C is an interruption, and no domain of
//! ours is left behind on any of those paths. libvirt's daemons are started by the
//! fixture where none runs (ci/test.sh installs the packages and sets
//! HVBENCH_REQUIRE_LIBVIRT=1).

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::{domains, Daemons};
use reports::record::Status;

/// Waits for `child` up to `limit`; kills it and fails the test past that.
fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hvbench still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first record of workload `w`; the test fails without one.
fn record_of<'a>(records: &'a [reports::record::Record], w: &str) -> &'a reports::record::Record {
    records
        .iter()
        .find(|r| r.workload == w)
        .unwrap_or_else(|| panic!("no record of {w}"))
}

fn ours(pid: u32) -> Vec<String> {
    let prefix = format!("hvbench-{pid}-");
    domains()
        .into_iter()
        .filter(|d| d.starts_with(&prefix))
        .collect()
}

#[test]
fn workloads_run_as_a_domain_and_a_hang_leaves_no_domain_behind() {
    if !common::kvm_available() {
        return;
    }
    // Before the daemons: two fixtures must not start them side by side.
    let _serial = common::exclusive();
    let Some(_daemons) = Daemons::ensure() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let mut child = common::hvbench()
        .args([
            "run",
            "--backend",
            "libvirt",
            "--libvirt-uri",
            common::libvirt::URI,
        ])
        .args(["-w", "cpu.idle", "-w", "cpu.cpuid", "-w", "cpu.compute"])
        .args([
            "-w",
            "mem.first-touch",
            "-w",
            "mem.seq-read",
            "-w",
            "io.pio-out",
        ])
        .args([
            "-w",
            "selftest.hang",
            "-w",
            "mem.balloon",
            "-w",
            "vm.lifecycle",
        ])
        .args(["--param", "vm.lifecycle.boots=2"])
        .args(["--samples", "5", "--warmup", "1", "--sample-us", "2000"])
        .args(["--timeout-s", "10", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = wait(&mut child, Duration::from_secs(240));
    // 3: not every workload succeeded (the hang).
    assert_eq!(status.code(), Some(3));
    let records = reports::read_results(&out).unwrap();
    for r in &records {
        match r.workload.as_str() {
            "selftest.hang" => assert_eq!(r.status, Status::Timeout, "{r:?}"),
            "mem.balloon" => {
                assert_eq!(r.status, Status::Skip);
                assert!(r.reason.as_deref().unwrap().contains("virtio-mmio"));
            }
            name => {
                assert_eq!(r.status, Status::Success, "{name}: {:?}", r.reason);
                assert!(r.samples.iter().all(|s| *s > 0.0), "{name}");
            }
        }
        assert_eq!(r.backend.kind, "libvirt");
        assert!(
            r.backend.version.contains("libvirt"),
            "{}",
            r.backend.version
        );
        assert!(r.backend.version.contains("QEMU"), "{}", r.backend.version);
        let xml = &r.backend.details["domain_xml"];
        assert!(
            xml.contains("machine='q35'") && xml.contains("isa-debug-exit"),
            "{xml}"
        );
        assert!(r.reproduce.contains("--backend libvirt"), "{}", r.reproduce);
    }
    for w in ["cpu.cpuid", "mem.seq-read", "io.pio-out", "selftest.hang"] {
        assert!(records.iter().any(|r| r.workload == w), "no record of {w}");
    }
    // The lifecycle: two boots timed, and the daemons' memory on top of QEMU's.
    let life = |metric: &str| {
        let r = records
            .iter()
            .find(|r| r.workload == "vm.lifecycle" && r.metric == metric)
            .unwrap_or_else(|| panic!("no vm.lifecycle {metric}"));
        assert_eq!(r.samples.len(), 2, "{metric}: {r:?}");
        r.samples.clone()
    };
    assert!(life("define_to_result").iter().all(|s| *s > 0.1));
    assert!(life("destroy").iter().all(|s| *s > 0.0));
    // libvirt's per-domain QEMU logs went with the domains (none ended in a failure).
    let prefix = format!("hvbench-{pid}-");
    let logs: Vec<String> = std::fs::read_dir("/var/log/libvirt/qemu")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(logs.is_empty(), "logs left: {logs:?}");
    let (vmm, stack) = (life("vmm_pss"), life("stack_pss"));
    assert!(
        vmm.iter().zip(&stack).all(|(v, s)| s > v && *v > 1.0),
        "{vmm:?} {stack:?}"
    );
    assert!(ours(pid).is_empty(), "domains left: {:?}", ours(pid));
}

/// Ctrl-C while a guest runs: the run ends as interrupted and its domain is destroyed.
#[test]
fn ctrl_c_destroys_the_domain() {
    use std::os::unix::process::CommandExt;
    if !common::kvm_available() {
        return;
    }
    // Before the daemons: two fixtures must not start them side by side.
    let _serial = common::exclusive();
    let Some(_daemons) = Daemons::ensure() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = common::hvbench()
        .args(["run", "--backend", "libvirt", "-w", "selftest.hang"])
        .args(["--timeout-s", "600", "--out"])
        .arg(dir.path().join("results"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        // As in a terminal: hvbench and whatever shares its group get the Ctrl-C.
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    while ours(pid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no domain of hvbench {pid} appeared: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past create and resume, the guest spinning.
    std::thread::sleep(Duration::from_secs(2));
    let group = nix::unistd::Pid::from_raw(pid.cast_signed());
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = wait(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(130));
    assert!(ours(pid).is_empty(), "domains left: {:?}", ours(pid));
}

/// A libvirt that does not answer is one clear error, within seconds, before any record.
#[test]
fn an_unreachable_uri_is_a_clear_error_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = common::hvbench()
        .args([
            "run",
            "--backend",
            "libvirt",
            "-w",
            "cpu.idle",
            "--libvirt-uri",
        ])
        .arg("qemu:///system?socket=/nonexistent/hvbench/libvirt-sock")
        .arg("--out")
        .arg(dir.path().join("results"))
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach libvirt"), "{stderr}");
    let written = std::fs::read_to_string(dir.path().join("results").join("results.jsonl"));
    assert!(
        written.unwrap_or_default().trim().is_empty(),
        "a record was written"
    );
}

/// The `mktemp -d` directories hvbench makes on a remote libvirt host (here: this one).
fn remote_dirs() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("hvbench-libvirt."))
        })
        .collect()
}

/// What a `qemu+ssh://` test needs, in the order it goes: the sshd, the daemons, the lock.
struct RemoteLibvirt {
    sshd: common::libvirt::Sshd,
    _daemons: Daemons,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl RemoteLibvirt {
    fn start() -> Option<Self> {
        if !common::kvm_available() {
            return None;
        }
        // Before the daemons: two fixtures must not start them side by side.
        let serial = common::exclusive();
        let daemons = Daemons::ensure()?;
        Some(RemoteLibvirt {
            sshd: common::libvirt::Sshd::start()?,
            _daemons: daemons,
            _serial: serial,
        })
    }
}

#[test]
fn a_qemu_ssh_uri_runs_the_guest_there_and_leaves_nothing_behind() {
    let Some(remote) = RemoteLibvirt::start() else {
        return;
    };
    let sshd = &remote.sshd;
    let before = remote_dirs();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let uri = sshd.uri();
    let mut child = common::hvbench()
        .args(["run", "--backend", "libvirt", "--libvirt-uri", &uri])
        .args([
            "-w",
            "cpu.cpuid",
            "-w",
            "selftest.hang",
            "-w",
            "vm.lifecycle",
        ])
        .args(["--param", "vm.lifecycle.boots=1"])
        .args([
            "--samples",
            "3",
            "--warmup",
            "1",
            "--timeout-s",
            "10",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = wait(&mut child, Duration::from_secs(180));
    assert_eq!(status.code(), Some(3));
    let records = reports::read_results(&out).unwrap();
    let status_of = |w: &str| record_of(&records, w);
    let cpuid = status_of("cpu.cpuid");
    assert_eq!(cpuid.status, Status::Success, "{:?}", cpuid.reason);
    assert_eq!(cpuid.backend.details["uri"], uri);
    assert_eq!(status_of("selftest.hang").status, Status::Timeout);
    // The stack's memory, read on the libvirt host: its QEMU, and its daemons on top.
    let memory = |metric: &str| {
        let r = records
            .iter()
            .find(|r| r.workload == "vm.lifecycle" && r.metric == metric)
            .unwrap_or_else(|| panic!("no vm.lifecycle {metric}: {records:?}"));
        r.samples[0]
    };
    let (vmm, stack) = (memory("vmm_pss"), memory("stack_pss"));
    assert!(stack > vmm && vmm > 1.0, "{vmm} {stack}");
    assert!(ours(pid).is_empty(), "left behind: {:?}", ours(pid));
    let left: Vec<_> = remote_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(left.is_empty(), "left on the libvirt host: {left:?}");
}

#[test]
fn xen_through_libvirt_in_the_lab_runs_the_guest_and_leaves_nothing_in_dom0() {
    if !common::required("HVBENCH_REQUIRE_XEN_LAB") {
        eprintln!(
            "notice: Xen through libvirt needs the TCG-nested Xen lab; set \
             HVBENCH_REQUIRE_XEN_LAB=1 to run it (HVBENCH_XEN_LAB_CACHE_DIR picks the lab)"
        );
        return;
    }
    let _serial = common::exclusive();
    let lab = common::XenLabUse::new();
    let cache = lab.cache.clone();
    let said = lab.up(&["--with-libvirt"]);
    assert!(said.contains("xen:///system answers"), "{said}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let mut child = common::hvbench()
        .args([
            "run",
            "--backend",
            "libvirt",
            "--libvirt-uri",
            "xen:///system",
        ])
        .arg("--xen-host")
        .arg(format!("lab:{}", cache.display()))
        .args(["-w", "cpu.cpuid", "-w", "io.pio-out", "-w", "selftest.hang"])
        .args(["--samples", "3", "--timeout-s", "20", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait(&mut child, Duration::from_secs(300));
    assert_eq!(status.code(), Some(3));
    let records = reports::read_results(&out).unwrap();
    let record = |w: &str| record_of(&records, w);
    let cpuid = record("cpu.cpuid");
    assert_eq!(cpuid.status, Status::Success, "{:?}", cpuid.reason);
    assert_eq!(cpuid.backend.details["machine"], "xenpvh");
    assert!(
        cpuid.backend.version.contains("Xen"),
        "{}",
        cpuid.backend.version
    );
    assert_eq!(record("io.pio-out").status, Status::Skip);
    assert_eq!(record("selftest.hang").status, Status::Timeout);
    // Nothing of the run is left in dom0: domains, files, virsh or tail processes. A
    // watcher whose SSH link closed may still be exiting under TCG (busybox `ps` shows it
    // as `[virsh]` until init reaps it): it must be gone within 30 s.
    let transport = lab::xen_host_in(&cache).unwrap().transport;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let left = loop {
        let left = transport
            .run(
                "virsh -q -c xen:///system list --all --name; ls -d /tmp/hvbench-libvirt.* \
                 /var/log/xen/console/guest-hvbench-* 2>/dev/null; ps | grep -E 'virsh|tail' \
                 | grep -v grep; true",
                None,
                Duration::from_secs(60),
            )
            .unwrap();
        let left = String::from_utf8_lossy(&left.stdout).trim().to_string();
        if left == "Domain-0" || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(left, "Domain-0", "left in dom0: {left}");
}

/// A run killed outright (SIGKILL: nothing of it can clean up) leaves its domain and its
/// directory on the libvirt host it reached over SSH; the next run there destroys the
/// domain (its metadata names the dead run) and removes the directory, and says so.
#[test]
fn a_killed_runs_domain_and_files_on_a_remote_host_go_with_the_next_run() {
    let Some(remote) = RemoteLibvirt::start() else {
        return;
    };
    let sshd = &remote.sshd;
    let uri = sshd.uri();
    let before = remote_dirs();
    let dir = tempfile::tempdir().unwrap();
    let mut killed = common::hvbench()
        .args(["run", "--backend", "libvirt", "--libvirt-uri", &uri])
        .args(["-w", "selftest.hang", "--timeout-s", "600", "--out"])
        .arg(dir.path().join("killed"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = killed.id();
    let started = Instant::now();
    while ours(pid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no domain of hvbench {pid} appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(
        ours(pid).len(),
        1,
        "the killed run's domain is gone already"
    );
    let new_dirs = || -> Vec<_> {
        remote_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect()
    };
    assert_eq!(new_dirs().len(), 1, "{:?}", new_dirs());
    let next = common::hvbench()
        .args(["run", "--backend", "libvirt", "--libvirt-uri", &uri])
        .args([
            "-w",
            "cpu.cpuid",
            "--samples",
            "3",
            "--warmup",
            "1",
            "--out",
        ])
        .arg(dir.path().join("next"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&next.stderr);
    assert_eq!(next.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("destroyed libvirt domain hvbench-{pid}-")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("left by hvbench process {pid}")),
        "{stderr}"
    );
    assert!(ours(pid).is_empty(), "left behind: {:?}", ours(pid));
    assert!(
        new_dirs().is_empty(),
        "left on the libvirt host: {:?}",
        new_dirs()
    );
}

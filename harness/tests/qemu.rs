//! The same guest image under QEMU's own PVH loader (microvm): proof that the image
//! follows the PVH ABI, not our VMM's habits.

mod common;

use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use reports::record::Status;
use workloads::WorkloadId;

#[test]
fn qemu_boots_the_same_image_and_reports_the_same_way() {
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
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuIdle,
            WorkloadId::CpuCpuid,
            WorkloadId::CpuCompute,
            WorkloadId::IoPioOut,
            WorkloadId::IoMmioRead,
            WorkloadId::IoPioOutKernel,
            WorkloadId::CpuHlt,
            WorkloadId::SelftestTripleFault,
            WorkloadId::VmLifecycle,
        ],
        dir.path(),
    );
    options.workload_timeout = std::time::Duration::from_secs(20);
    options.params = vec![hvbench::run::WorkloadParam::parse("vm.lifecycle.boots=2").unwrap()];
    let summary = common::run_with(&backend, &options);
    let get = |name: &str| summary.records.iter().find(|r| r.workload == name).unwrap();
    for name in [
        "cpu.idle",
        "cpu.cpuid",
        "cpu.compute",
        "io.pio-out",
        "io.mmio-read",
    ] {
        let r = get(name);
        assert_eq!(r.status, Status::Success, "{name}: {:?}", r.reason);
        assert!(r.samples.iter().all(|s| *s > 0.0));
        assert_eq!(r.backend.kind, "qemu");
        assert!(r.backend.version.contains("QEMU"), "{}", r.backend.version);
        assert!(r.reproduce.contains("--backend qemu"));
    }
    // QEMU's unassigned MMIO reads as zero: the guest reports what it got, not what it
    // expected.
    assert!(get("io.mmio-read").notes.contains_key("value"));
    // Paths QEMU does not have are skipped, with the reason.
    for name in ["io.pio-out-kernel", "cpu.hlt"] {
        let r = get(name);
        assert_eq!(r.status, Status::Skip, "{name}");
        assert!(r.reason.as_deref().unwrap_or("").contains("QEMU"), "{name}");
    }
    // The lifecycle: QEMU's own memory, and no daemons on top of it.
    let life = |metric: &str| {
        let r = summary
            .records
            .iter()
            .find(|r| r.workload == "vm.lifecycle" && r.metric == metric)
            .unwrap();
        assert_eq!(r.status, Status::Success, "{metric}: {:?}", r.reason);
        assert_eq!(r.samples.len(), 2, "{metric}");
        r.samples.clone()
    };
    assert!(life("define_to_result").iter().all(|s| *s > 0.0));
    assert!(life("vmm_rss").iter().all(|s| *s > 1.0));
    assert_eq!(life("vmm_pss"), life("stack_pss"));
    let r = get("selftest.triple-fault");
    assert_eq!(r.status, Status::Crash);
    assert!(r.reason.as_deref().unwrap().contains("triple fault"));
    // No QEMU is left behind.
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", "hvbench-qemu"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert!(leftover.is_empty(), "QEMU processes left: {leftover}");
}

/// The ladder's third rung: the same image on q35 (SeaBIOS, then QEMU's PVH option ROM),
/// as libvirt would start it; what q35 lacks is skipped with the reason.
#[test]
fn q35_boots_the_same_image_and_skips_the_balloon() {
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let backend = QemuBackend::new(
        QemuOptions {
            binary,
            accel: hvbench::backend::qemu::QemuAccel::Kvm,
            machine: hvbench::backend::qemu::QemuMachine::Q35,
            cpu: None,
            insns: false,
        },
        hvbench::host::fingerprint(),
    )
    .unwrap();
    let mut options = common::quick_options(
        &[
            WorkloadId::CpuCpuid,
            WorkloadId::IoPioOut,
            WorkloadId::MemBalloon,
        ],
        dir.path(),
    );
    options.workload_timeout = std::time::Duration::from_secs(30);
    let summary = common::run_with(&backend, &options);
    let get = |name: &str| summary.records.iter().find(|r| r.workload == name).unwrap();
    for name in ["cpu.cpuid", "io.pio-out"] {
        let r = get(name);
        assert_eq!(r.status, Status::Success, "{name}: {:?}", r.reason);
        assert_eq!(r.backend.kind, "qemu-q35");
        assert_eq!(r.backend.details["machine"], "q35");
        assert!(
            r.reproduce.contains("--qemu-machine q35"),
            "{}",
            r.reproduce
        );
    }
    let balloon = get("mem.balloon");
    assert_eq!(balloon.status, Status::Skip);
    assert!(
        balloon.reason.as_deref().unwrap().contains("virtio-mmio"),
        "{:?}",
        balloon.reason
    );
}

/// Defect 1, as found: the real guest skips `cpu.hypercall*` under TCG, and the skip was
/// never written, so `hvbench run` booted QEMU again for it forever.
#[test]
fn a_tcg_run_whose_guest_skips_everything_ends() {
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let mut child = common::hvbench()
        .args(["run", "--backend", "qemu", "--qemu-accel", "tcg", "--qemu"])
        .arg(&binary)
        .args(["-w", "cpu.hypercall*", "--memory-mib", "64", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "still running after 120 s"
    );
    let records = reports::read_results(&out).unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records.iter().all(|r| r.status == Status::Skip),
        "{records:?}"
    );
}

/// Defect 9: QEMU shared hvbench's process group, so Ctrl-C reached it too; it exited 0,
/// which read as a triple fault, and the interrupted workload was recorded as a crash.
#[test]
fn ctrl_c_on_qemu_is_an_interruption_not_a_crash() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let Some(binary) = common::qemu_binary() else {
        return;
    };
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    // cpu.idle finishes at once; selftest.hang then runs until it is stopped.
    let mut child = common::hvbench()
        .args(["run", "--backend", "qemu", "--qemu"])
        .arg(&binary)
        .args(["-w", "cpu.idle", "-w", "selftest.hang", "--samples", "5"])
        .args(["--sample-us", "1000", "--memory-mib", "64", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // As in a terminal: hvbench and whatever shares its group get the Ctrl-C.
        .process_group(0)
        .spawn()
        .unwrap();
    let group = nix::unistd::Pid::from_raw(child.id().cast_signed());
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut text = String::new();
    loop {
        let line = seen
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no result of cpu.idle: {text}"));
        text.push_str(&line);
        text.push('\n');
        if line.contains("cpu.idle latency") {
            break;
        }
    }
    // Let selftest.hang start; its QEMU must be in a group of its own.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let qemu = children(child.id());
    assert!(!qemu.is_empty(), "no QEMU under hvbench");
    for pid in qemu {
        assert_ne!(
            process_group(pid),
            Some(child.id()),
            "QEMU {pid} shares hvbench's group"
        );
    }
    // Ctrl-C.
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT).unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "hvbench did not stop after Ctrl-C"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    while let Ok(line) = seen.recv_timeout(std::time::Duration::from_secs(1)) {
        text.push_str(&line);
        text.push('\n');
    }
    assert_eq!(status.code(), Some(130), "{text}");
    let records = reports::read_results(&out).unwrap();
    assert!(
        records.iter().all(|r| r.status != Status::Crash),
        "{:?}\n{text}",
        records
            .iter()
            .map(|r| (&r.workload, r.status, &r.reason))
            .collect::<Vec<_>>()
    );
    if let Some(hang) = records.iter().find(|r| r.workload == "selftest.hang") {
        assert!(
            hang.reason.as_deref().unwrap_or("").contains("interrupted"),
            "{:?}",
            hang.reason
        );
    }
}

/// The children of `pid` (of all its threads).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The process group of `pid`, from /proc/PID/stat.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, ppid, pgrp.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// `--insns` under plain TCG: the plugin's counts are exact and the same every run, the
/// workloads that time their own samples are counted too, QEMU runs one TCG thread, and a
/// guest without markers has no count and says so.
#[test]
fn tcg_with_the_plugin_counts_every_marked_sample() {
    let Some(_binary) = common::qemu_binary() else {
        return;
    };
    if let Err(e) = hvbench::insns::find_plugin() {
        assert!(!common::required("HVBENCH_REQUIRE_QEMU"), "{e}");
        eprintln!("notice: skipped, {e}");
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let status = common::hvbench()
            .args(["run", "--backend", "qemu", "--qemu-accel", "tcg", "--insns"])
            .args([
                "-w",
                "cpu.idle",
                "-w",
                "mem.prot-fault",
                "-w",
                "mem.first-touch",
            ])
            .args(["--samples", "3", "--param", "mem.first-touch.page=4k"])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        reports::read_results(&out).unwrap()
    };
    let records = run("counted", &["--repeat", "2"]);
    let counts = |workload: &str| -> Vec<f64> {
        records
            .iter()
            .filter(|r| r.workload == workload && r.metric == "insns")
            .map(|r| {
                assert_eq!(r.status, Status::Success, "{workload}: {:?}", r.reason);
                r.summary.as_ref().unwrap().median
            })
            .collect()
    };
    for workload in ["cpu.idle", "mem.prot-fault", "mem.first-touch"] {
        let c = counts(workload);
        assert_eq!(c.len(), 2, "{workload}: {c:?}");
        // No hypervisor, one vCPU: the same path counts the same, run after run.
        assert_eq!(c[0], c[1], "{workload}: {c:?}");
        assert!(c[0] > 0.0, "{workload}: {c:?}");
    }
    let idle = counts("cpu.idle")[0];
    assert!(idle > 10.0 && idle < 30.0, "cpu.idle {idle}");
    let timing = records.iter().find(|r| r.metric != "insns").unwrap();
    assert_eq!(
        timing.backend.details.get("accel").map(String::as_str),
        Some("tcg")
    );
    // Markers off: no count, and the record says why.
    let bare = run("bare", &["--no-insn-markers"]);
    let idle = bare
        .iter()
        .find(|r| r.workload == "cpu.idle" && r.metric == "insns")
        .unwrap();
    assert_eq!(idle.status, Status::Skip);
    assert!(idle.reason.as_deref().unwrap_or("").contains("no markers"));
}

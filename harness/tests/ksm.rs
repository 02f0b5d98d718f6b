//! `mem.ksm` on the real /dev/kvm and the real /sys/kernel/mm/ksm: two small guests
//! merge, memory is saved, and KSM's settings are as they were afterwards, also when the
//! run that changed them was killed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use hvbench::run::ksm::{restore_stale_at_start, system_paths};
use ksm::KsmSysfs;
use reports::read_results;
use reports::record::{Record, Status};

/// Whether this host can run mem.ksm; CI (HVBENCH_REQUIRE_KVM=1) must not skip.
fn ksm_usable() -> bool {
    if !common::kvm_available() {
        return false;
    }
    let run = Path::new("/sys/kernel/mm/ksm/run");
    let writable = nix::unistd::access(run, nix::unistd::AccessFlags::W_OK).is_ok();
    if !writable {
        assert!(
            std::env::var("HVBENCH_REQUIRE_KVM").as_deref() != Ok("1"),
            "/sys/kernel/mm/ksm/run is missing or not writable, and HVBENCH_REQUIRE_KVM=1"
        );
        eprintln!("notice: KSM cannot be driven here (not root, or no KSM); skipping");
    }
    writable
}

/// Small and quick: two 32 MiB guests, a fast scan rate, four samples a second.
const SMALL: &[&str] = &[
    "--memory-mib",
    "32",
    "--samples",
    "5",
    "--param",
    "mem.ksm.guests=2",
    "--param",
    "mem.ksm.pages_to_scan=5000",
    "--param",
    "mem.ksm.sleep_millisecs=10",
    "--param",
    "mem.ksm.sample_ms=250",
    "--param",
    "mem.ksm.max_s=60",
];

/// Puts KSM back if a test fails half-way (the next hvbench run would, too).
struct RestoreOnExit;

impl Drop for RestoreOnExit {
    fn drop(&mut self) {
        if let Err(e) = restore_stale_at_start() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// `hvbench vmm` processes started with a doorbell (mem.ksm's guests) still alive.
fn surviving_guest_vmms() -> Vec<String> {
    let exe = env!("CARGO_BIN_EXE_hvbench");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.starts_with(exe) && text.contains("--doorbell-stdin"))
                .then(|| format!("{pid}: {text}"))
        })
        .collect()
}

fn metric<'a>(records: &'a [Record], name: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.metric == name)
        .unwrap_or_else(|| panic!("no {name} record in {records:#?}"))
}

fn only_sample(r: &Record) -> f64 {
    assert_eq!(r.samples.len(), 1, "{}: {:?}", r.metric, r.samples);
    r.samples[0]
}

#[test]
fn two_small_guests_merge_save_memory_and_leave_ksm_as_found() {
    if !ksm_usable() {
        return;
    }
    let _serial = common::exclusive();
    let _cleanup = RestoreOnExit;
    let ksm = KsmSysfs::system();
    let before = ksm.tunables().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = common::hvbench()
        .args(["run", "--backend", "kvm", "-w", "mem.ksm", "--out"])
        .arg(dir.path())
        .args(SMALL)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("mem.ksm took {:.1} s", started.elapsed().as_secs_f64());

    // Everything KSM lets an owner write reads as it did before the run.
    assert_eq!(ksm.tunables().unwrap(), before, "{stderr}");
    assert!(!system_paths().state_file().exists());
    assert_eq!(surviving_guest_vmms(), Vec::<String>::new());

    let records = read_results(dir.path()).unwrap();
    for r in &records {
        assert_eq!(r.status, Status::Success, "{}: {:?}", r.metric, r.reason);
        assert_eq!(r.workload, "mem.ksm");
        assert_eq!(
            r.parameters
                .workload_params
                .get("guests")
                .map(String::as_str),
            Some("2")
        );
        assert!(
            r.reproduce.contains("--param mem.ksm.guests=2"),
            "{}",
            r.reproduce
        );
    }
    let notes = &records[0].notes;
    let identical: f64 = notes["identical_pages_per_guest"].parse().unwrap();
    assert!(identical > 1000.0, "{notes:?}");

    // Every identical page of both guests was merged, and KSM's own counters show sharing.
    let merged = metric(&records, "pages_merged");
    assert!(only_sample(merged) >= 2.0 * identical, "{notes:?}");
    let sharing = &merged.curves["ksm_pages_sharing"].points;
    assert!(sharing.last().unwrap()[1] > 0.0, "{sharing:?}");
    assert!(merged.curves["vmm_merging_pages"].points.len() >= 3);

    // The host holds at least the identical pages of one guest less (PSS, 4 KiB pages).
    let saved = only_sample(metric(&records, "saved_pss"));
    assert!(
        saved >= 0.9 * identical * 4096.0 / (1 << 20) as f64,
        "saved {saved} MiB"
    );

    let t90 = only_sample(metric(&records, "time_to_90"));
    assert!(t90 > 0.0 && t90 <= 60.0, "{t90}");
    assert!(only_sample(metric(&records, "ksmd_cpu")) > 0.0);

    // Breaking a merge (copy-on-write through the hypervisor) costs more than a write to a
    // page that is the guest's own.
    let median = |name: &str| {
        let r = metric(&records, name);
        assert_eq!(r.samples.len(), 5, "{name}");
        r.summary.as_ref().unwrap().median
    };
    let (merged_ns, unmerged_ns) = (median("write_merged"), median("write_unmerged"));
    assert!(
        merged_ns > 2.0 * unmerged_ns,
        "merged {merged_ns} ns, unmerged {unmerged_ns} ns"
    );
}

#[test]
fn a_killed_runs_settings_are_restored_by_the_next_start_with_a_message() {
    if !ksm_usable() {
        return;
    }
    let _serial = common::exclusive();
    let _cleanup = RestoreOnExit;
    let ksm = KsmSysfs::system();
    let before = ksm.tunables().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A run that dies (SIGKILL) while KSM runs with its settings.
    let mut child = common::hvbench()
        .args(["run", "--backend", "kvm", "-w", "mem.ksm", "--out"])
        .arg(dir.path().join("killed"))
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("KSM on")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the run never turned KSM on ({e}): {seen:#?}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ksm.read("run").unwrap(), "1", "the dead run left KSM on");
    assert!(system_paths().state_file().exists());
    // Its guests died with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !surviving_guest_vmms().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(surviving_guest_vmms(), Vec::<String>::new());

    // The next start of any run restores them and says so.
    let out = common::hvbench()
        .args([
            "run",
            "--backend",
            "kvm",
            "-w",
            "cpu.idle",
            "--samples",
            "1",
        ])
        .args(["--memory-mib", "32", "--out"])
        .arg(dir.path().join("next"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("did not finish") && stderr.contains("were restored"),
        "{stderr}"
    );
    assert_eq!(ksm.tunables().unwrap(), before, "{stderr}");
    assert!(!system_paths().state_file().exists());
}

#[test]
fn ctrl_c_stops_the_guests_and_restores_the_settings_at_once() {
    stops_the_guests_and_restores_the_settings_at_once(nix::sys::signal::Signal::SIGINT);
}

/// A closed terminal (SIGHUP) is an interruption like Ctrl-C, not a death that leaves KSM
/// changed until the next run.
#[test]
fn a_closed_terminal_stops_the_guests_and_restores_the_settings_at_once() {
    stops_the_guests_and_restores_the_settings_at_once(nix::sys::signal::Signal::SIGHUP);
}

fn stops_the_guests_and_restores_the_settings_at_once(signal: nix::sys::signal::Signal) {
    if !ksm_usable() {
        return;
    }
    let _serial = common::exclusive();
    let _cleanup = RestoreOnExit;
    let ksm = KsmSysfs::system();
    let before = ksm.tunables().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::hvbench()
        .args(["run", "--backend", "kvm", "-w", "mem.ksm", "--out"])
        .arg(dir.path())
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("KSM on")) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the run never turned KSM on ({e}): {seen:#?}");
            }
        }
    }
    let pid = nix::unistd::Pid::from_raw(child.id().cast_signed());
    nix::sys::signal::kill(pid, signal).unwrap();
    let status = child.wait().unwrap();
    seen.extend(rx.iter());
    assert_eq!(status.code(), Some(130), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("KSM settings restored")),
        "{seen:#?}"
    );
    assert_eq!(ksm.tunables().unwrap(), before);
    assert!(!system_paths().state_file().exists());
    assert_eq!(surviving_guest_vmms(), Vec::<String>::new());
    // The interrupted workload's records say so.
    let records = read_results(dir.path()).unwrap();
    assert!(!records.is_empty());
    for r in &records {
        assert_eq!(r.status, Status::Error);
        assert!(
            r.reason.as_deref().unwrap_or("").contains("interrupted"),
            "{:?}",
            r.reason
        );
    }
}

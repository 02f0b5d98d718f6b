//! Shared by the integration tests: where the suite's external needs (/dev/kvm, QEMU)
//! come from, and the rule that CI (HVBENCH_REQUIRE_*=1) must not skip them silently.

#![allow(dead_code)]

pub mod hostile;
pub mod libvirt;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hvbench::backend::Hypervisor;
use hvbench::guest_image::GuestImage;
use hvbench::run::{self, RunOptions, RunSummary};
use reports::ResultsWriter;
use workloads::WorkloadId;

/// Whether CI asks for what `var` names (HVBENCH_REQUIRE_*=1).
pub fn required(var: &str) -> bool {
    std::env::var(var).map(|v| v == "1").unwrap_or(false)
}

/// Whether `cmd` is on PATH.
pub fn on_path(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether `pid` is a live QEMU started with `pid_file` (a recycled pid is not).
pub fn qemu_alive(pid: u32, pid_file: &Path) -> bool {
    let Ok(command_line) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.contains(") Z "))
        .unwrap_or(true);
    let names_pid_file = command_line
        .split(|&b| b == 0)
        .any(|argument| argument == pid_file.as_os_str().as_encoded_bytes());
    names_pid_file && !zombie
}

/// Whether /dev/kvm can be used. Without it the test returns early, unless CI requires it.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            !required("HVBENCH_REQUIRE_KVM"),
            "/dev/kvm cannot be opened, and HVBENCH_REQUIRE_KVM=1"
        );
        eprintln!("notice: /dev/kvm cannot be opened; skipping this test");
    }
    ok
}

/// qemu-system-x86_64, installed with apt-get when missing and allowed (root).
pub fn qemu_binary() -> Option<PathBuf> {
    let found = |name: &str| {
        Command::new(name)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| PathBuf::from(name))
    };
    if let Some(p) = found("qemu-system-x86_64") {
        return Some(p);
    }
    let is_root = nix::unistd::Uid::effective().is_root();
    if is_root {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-q", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        if let Some(p) = found("qemu-system-x86_64") {
            return Some(p);
        }
    }
    assert!(
        !required("HVBENCH_REQUIRE_QEMU"),
        "qemu-system-x86_64 is missing and could not be installed, and HVBENCH_REQUIRE_QEMU=1"
    );
    eprintln!("notice: qemu-system-x86_64 is not available; skipping this test");
    None
}

/// Options for quick runs: few, short samples.
pub fn quick_options(workloads: &[WorkloadId], out: &Path) -> RunOptions {
    RunOptions {
        workloads: workloads.to_vec(),
        samples: 5,
        warmup: 1,
        sample_us: 2_000,
        repeat: 1,
        workload_timeout: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(30),
        memory_mib: 64,
        vcpus: 1,
        guest_path: None,
        out: out.to_path_buf(),
        params: Vec::new(),
        insn_markers: true,
    }
}

pub fn run_with(backend: &dyn Hypervisor, options: &RunOptions) -> RunSummary {
    let image = GuestImage::embedded().expect("embedded guest image");
    let mut writer = ResultsWriter::create(&options.out, false).expect("results directory");
    let flag = std::sync::atomic::AtomicBool::new(false);
    run::run(backend, &image, options, &mut writer, &flag).expect("run")
}

/// Tests in one binary run in parallel; guests measured side by side on two cores would
/// disturb each other's figures (and the native twins'). Each VM-running test holds this.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn hvbench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hvbench"))
}

/// Brings a lab down when the test ends, a failed assertion included (a TCG QEMU left
/// behind would eat a shared machine's CPU), unless the lab was up before the test (then it
/// is someone's, and stays).
pub struct LabDownOnDrop {
    down: fn(&Path) -> Result<bool, lab::LabError>,
    cache: PathBuf,
    armed: bool,
}

impl LabDownOnDrop {
    pub fn new(
        down: fn(&Path) -> Result<bool, lab::LabError>,
        cache: &Path,
        already_up: bool,
    ) -> Self {
        LabDownOnDrop {
            down,
            cache: cache.to_path_buf(),
            armed: !already_up,
        }
    }

    /// The test takes the lab down itself (and checks that it went).
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for LabDownOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = (self.down)(&self.cache);
        }
    }
}

/// The Xen lab's cache directory: HVBENCH_XEN_LAB_CACHE_DIR, else hvbench's default.
pub fn xen_lab_cache_dir() -> PathBuf {
    match std::env::var_os("HVBENCH_XEN_LAB_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => lab::default_cache_dir().expect("HOME is set"),
    }
}

/// The Xen lab one test uses (at `xen_lab_cache_dir`): whether it was up before the test,
/// and a guard that takes it down again if this test brought it up, a panic included.
pub struct XenLabUse {
    pub cache: PathBuf,
    pub already_up: bool,
    down_on_drop: LabDownOnDrop,
}

impl XenLabUse {
    /// Notes whether the lab is up; starts nothing.
    pub fn new() -> Self {
        let cache = xen_lab_cache_dir();
        let already_up =
            matches!(<lab::XenLab as lab::Lab>::status(&cache), Ok(Some(s)) if s.healthy());
        let down_on_drop = LabDownOnDrop::new(<lab::XenLab as lab::Lab>::down, &cache, already_up);
        XenLabUse {
            cache,
            already_up,
            down_on_drop,
        }
    }

    /// `hvbench lab up xen ARGS --cache-dir CACHE`, which must succeed; returns its stdout.
    pub fn up(&self, args: &[&str]) -> String {
        let up = hvbench()
            .args(["lab", "up", "xen"])
            .args(args)
            .arg("--cache-dir")
            .arg(&self.cache)
            .output()
            .unwrap();
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        String::from_utf8_lossy(&up.stdout).into_owned()
    }

    /// Takes down a lab this test brought up, and checks that it went.
    pub fn finish(mut self) {
        if self.already_up {
            return;
        }
        self.down_on_drop.disarm();
        let down = hvbench()
            .args(["lab", "down", "--cache-dir"])
            .arg(&self.cache)
            .output()
            .unwrap();
        assert!(down.status.success());
    }
}

/// The domains in `xl list` output other than Domain-0 (each its whole line).
pub fn guest_domains(xl_list: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(xl_list)
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("Domain-0"))
        .map(str::to_string)
        .collect()
}

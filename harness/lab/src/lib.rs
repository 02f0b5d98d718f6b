//! Labs: hypervisor hosts that hvbench deploys itself, nested in QEMU, where no such host
//! exists. `hvbench lab up xen` boots a real Xen dom0 reachable over SSH on loopback;
//! `hvbench lab up kvm` boots a Linux host whose kvm_amd hvbench may reload with npt=1 or
//! npt=0, with hvbench inside it (see `kvm`).
//!
//! The Xen lab is Debian 12's Xen 4.17 with a busybox dom0 under QEMU (TCG by default);
//! only QEMU's forward on 127.0.0.1 reaches dom0's sshd. Downloads, builds, keys and logs
//! live in a cache directory (default `~/.cache/hvbench/lab`). Numbers measured inside a
//! TCG lab are emulation artefacts: it proves the Xen path end to end, never Xen's speed.
//!
//! Both labs are one [`Lab`] each ([`XenLab`], [`KvmLab`]), brought up, checked and stopped
//! by one bring-up (`recipe`); the rest of this crate is crate-private.

#![warn(unreachable_pub)]

mod bringup;
mod cpio;
mod elf;
mod initramfs;
mod kvm;
mod libvirt;
mod packages;
mod qemu;
mod quiet;
mod recipe;
mod tools;
mod xen;
mod xen_build;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use hostutil::transport::Transport;

pub use initramfs::READY_MARKER;
pub use kvm::{
    check_lab_run_args, kvm_ssh_target, lab_fetch_kvm, lab_reproduce, lab_run_kvm, BinaryIdentity,
    KvmLab, KvmLabFetch, KvmLabOptions, KvmLabRun, KvmLabRunOutcome, KvmLabState,
    KVM_HOST_KEY_ALIAS, KVM_READY_MARKER, LAB_HVBENCH,
};
pub use libvirt::add_libvirt;
pub use qemu::INSNS_CLOCK;
pub use recipe::{Lab, LabStatus, MachineOptions};
pub use xen::{XenLab, XenLabOptions, XenLabState, DOM0_MEMORY_MIB, HOST_KEY_ALIAS};
pub use xen_build::{HypervisorBuild, XenHypervisor};

#[derive(Debug, Error)]
pub enum LabError {
    #[error(
        "`{tool}` was not found: install the Debian package {package} (apt-get install {package})"
    )]
    MissingTool { tool: String, package: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("downloading the lab's Debian packages: {reason}")]
    Packages { reason: String },
    #[error("building the lab's initramfs: {reason}")]
    Initramfs { reason: String },
    #[error("QEMU: {reason}")]
    Qemu { reason: String },
    #[error("the {lab} lab failed to boot: {reason} (serial log {serial_log}):\n{serial_tail}")]
    BootFailed {
        lab: String,
        reason: String,
        serial_log: PathBuf,
        serial_tail: String,
    },
    #[error("ssh to the lab: {reason}")]
    Ssh { reason: String },
    #[error("interrupted; the lab's QEMU was stopped")]
    Interrupted,
    #[error("invalid lab options: {reason}")]
    InvalidOptions { reason: String },
    #[error(
        "a {lab} lab {running} is up from {cache_dir}, not one {wanted}: add --replace to \
         `hvbench lab up` to stop it and boot the one asked for, or stop it first with \
         `hvbench lab down {kind} --cache-dir {cache_dir}`"
    )]
    SettingsDiffer {
        lab: &'static str,
        kind: &'static str,
        running: String,
        wanted: String,
        cache_dir: String,
    },
    #[error("cannot use KVM for the lab: {reason}; use TCG")]
    AccelUnavailable { reason: String },
    #[error("lab state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("no Xen lab is running: start one with `hvbench lab up xen`")]
    NoLab,
    #[error("the Xen lab's state is unusable: {reason}")]
    Unusable { reason: String },
}

impl From<hostutil::statefile::StateFileError> for LabError {
    fn from(e: hostutil::statefile::StateFileError) -> Self {
        use hostutil::statefile::StateFileError;
        match e {
            StateFileError::Io { path, source, .. } => LabError::Io { path, source },
            StateFileError::Json { path, reason } => LabError::State { path, reason },
        }
    }
}

impl LabError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What kind of nested host a lab is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabKind {
    /// `tcg` or `kvm`: QEMU's accelerator under the lab.
    pub accel: String,
    /// What the lab's hypervisor is, when it says (the Xen lab: Debian's binary, or a
    /// build from Debian's source with its configuration delta).
    pub hypervisor: Option<String>,
    /// The log the lab's hvbench-insns plugin appends instruction counts to, when loaded.
    pub insns_log: Option<PathBuf>,
}

/// A running lab as a host to measure on: how to reach it, and what it is.
#[derive(Clone, Debug)]
pub struct LabHost {
    pub transport: Transport,
    pub kind: LabKind,
}

/// How QEMU runs the lab's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabAccel {
    /// Full emulation: slow, works everywhere.
    Tcg,
    /// Hardware virtualization with nested VMX/SVM. Not with kvm_pvm (Xen stops at once).
    Kvm,
}

impl LabAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            LabAccel::Tcg => "tcg",
            LabAccel::Kvm => "kvm",
        }
    }

    /// KVM when the host can run Xen nested under it, otherwise TCG.
    pub fn detect() -> LabAccel {
        if kvm_unusable_reason().is_none() {
            LabAccel::Kvm
        } else {
            LabAccel::Tcg
        }
    }
}

/// Why `-accel kvm` cannot run Xen on this host, or None when it can.
pub fn kvm_unusable_reason() -> Option<String> {
    // Only read /sys: the host's kvm modules are never loaded, unloaded or reconfigured.
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is provided by kvm_pvm (no VMX/SVM), under which Xen stops at its \
             first instruction"
                .into(),
        );
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| line.split_whitespace().any(|word| word == flag))
    };
    let nested_parameter = if has_flag("vmx") {
        "/sys/module/kvm_intel/parameters/nested"
    } else if has_flag("svm") {
        "/sys/module/kvm_amd/parameters/nested"
    } else {
        return Some("the CPU has no vmx/svm flag".into());
    };
    match fs::read_to_string(nested_parameter) {
        Ok(value) if matches!(value.trim(), "Y" | "y" | "1") => None,
        _ => Some(format!("nested virtualization is off ({nested_parameter})")),
    }
}

/// Progress lines for the person waiting (the CLI prints them on stderr).
pub fn progress_to_stderr(message: &str) {
    hostutil::say!("hvbench lab: {message}");
}

/// `$XDG_CACHE_HOME/hvbench/lab`, else `~/.cache/hvbench/lab`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(cache).join("hvbench/lab"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".cache/hvbench/lab"))
}

/// What `lab up` says of a lab under TCG.
const TCG_CAVEAT: &str =
    "Figures measured in this lab are TCG emulation artefacts: they prove function, not performance.";

/// The running Xen lab (default cache directory) as a host to measure on.
pub fn xen_host() -> Result<LabHost, LabError> {
    let cache_dir = default_cache_dir().ok_or_else(|| LabError::Unusable {
        reason: "neither XDG_CACHE_HOME nor HOME is set".into(),
    })?;
    xen_host_in(&cache_dir)
}

/// The Xen lab brought up from `cache_dir` as a host; `NoLab` unless its QEMU runs.
pub fn xen_host_in(cache_dir: &Path) -> Result<LabHost, LabError> {
    let cache_dir = &bringup::absolute_cache_dir(cache_dir);
    let state = recipe::read_state::<XenLab>(cache_dir)
        .map_err(|e| LabError::Unusable {
            reason: e.to_string(),
        })?
        .ok_or(LabError::NoLab)?;
    if !qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file) {
        return Err(LabError::NoLab);
    }
    Ok(LabHost {
        transport: Transport::Ssh(xen::ssh_target(&state)),
        kind: LabKind {
            accel: state.accel.clone(),
            hypervisor: state.hypervisor.as_ref().map(HypervisorBuild::describe),
            insns_log: state.insns_log.clone(),
        },
    })
}

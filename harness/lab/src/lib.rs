//! Labs: hypervisor hosts that hvbench deploys itself, nested in QEMU, where no such host
//! exists. `hvbench lab up xen` boots a real Xen dom0 reachable over SSH on loopback;
//! `hvbench lab up kvm` boots a Linux host whose kvm_amd hvbench may reload with npt=1 or
//! npt=0, with hvbench inside it (see `kvm`).
//!
//! The Xen lab is Debian 12's Xen 4.17 with a busybox dom0 under QEMU (TCG by default);
//! only QEMU's forward on 127.0.0.1 reaches dom0's sshd. Downloads, builds, keys and logs
//! live in a cache directory (default `~/.cache/hvbench/lab`). Numbers measured inside a
//! TCG lab are emulation artefacts: it proves the Xen path end to end, never Xen's speed.

mod bringup;
mod cpio;
mod elf;
mod initramfs;
mod kvm;
mod packages;
mod qemu;
pub(crate) mod tools;
mod xen;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use hostutil::transport::{SshTarget, Transport};

pub use initramfs::READY_MARKER;
pub use kvm::{
    check_lab_run_args, kvm_lab_down, kvm_lab_status, kvm_ssh_target, lab_reproduce, lab_run_kvm,
    lab_up_kvm, BinaryIdentity, KvmLabOptions, KvmLabRun, KvmLabRunOutcome, KvmLabState,
    KvmLabStatus, KVM_HOST_KEY_ALIAS, KVM_READY_MARKER, LAB_HVBENCH,
};
pub use xen::{lab_up_xen, DOM0_MEMORY_MIB};

/// The name dom0's host key is pinned under in the lab's known_hosts, whatever the port.
pub const HOST_KEY_ALIAS: &str = "hvbench-xen-lab";

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

#[derive(Debug)]
pub struct XenLabOptions {
    /// Downloads, builds, keys, logs and the state file live here.
    pub cache_dir: PathBuf,
    /// The emulated machine's memory; dom0 gets `DOM0_MEMORY_MIB` of it.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Host port on 127.0.0.1 forwarded to dom0's sshd; None picks a free one.
    pub ssh_port: Option<u16>,
    pub accel: LabAccel,
    /// From QEMU's start to `xl info` answering over ssh.
    pub boot_timeout: Duration,
    pub progress: fn(&str),
    /// When set (e.g. by a Ctrl-C handler), bring-up stops and its QEMU is killed.
    pub cancel: Option<&'static AtomicBool>,
}

impl XenLabOptions {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            memory_mib: 3072,
            cpus: 2,
            ssh_port: None,
            accel: LabAccel::Tcg,
            boot_timeout: Duration::from_secs(300),
            progress: progress_to_stderr,
            cancel: None,
        }
    }
}

/// `$XDG_CACHE_HOME/hvbench/lab`, else `~/.cache/hvbench/lab`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(cache).join("hvbench/lab"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".cache/hvbench/lab"))
}

/// A running lab, as saved in `<cache_dir>/xen-lab.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// "xen".
    pub kind: String,
    pub qemu_pid: u32,
    /// QEMU's `-pidfile`; its path in QEMU's command line identifies our QEMU.
    pub qemu_pid_file: PathBuf,
    pub ssh_port: u16,
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    /// As `xl info` reports it, e.g. "4.17.7".
    pub xen_version: String,
    /// The Debian package versions the lab was built from.
    pub xen_package_version: String,
    pub dom0_kernel_package: String,
    /// "tcg" or "kvm": with tcg, every timing inside the lab is an emulation artefact.
    pub accel: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// From QEMU's start to `xl info` answering over ssh.
    pub boot_seconds: f64,
    pub serial_log: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LabStatus {
    pub state: LabState,
    /// The pid is alive, not a zombie, and its command line is our QEMU's.
    pub qemu_running: bool,
    /// `xl info` answered over ssh.
    pub ssh_answers: bool,
}

impl LabStatus {
    pub fn healthy(&self) -> bool {
        self.qemu_running && self.ssh_answers
    }
}

const STATE_FILE: &str = "xen-lab.json";
const STATUS_SSH_TIMEOUT: Duration = Duration::from_secs(30);

use bringup::absolute_cache_dir;

fn state_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(STATE_FILE)
}

fn read_state(cache_dir: &Path) -> Result<Option<LabState>, LabError> {
    Ok(hostutil::statefile::read_json(&state_path(cache_dir))?)
}

fn write_state(cache_dir: &Path, state: &LabState) -> Result<(), LabError> {
    packages::write_json(&state_path(cache_dir), state)
}

/// Where to ssh into the lab described by `state`: root@127.0.0.1 on the forwarded port,
/// with the lab's own key and its pinned host key.
pub fn ssh_target(state: &LabState) -> SshTarget {
    bringup::loopback_ssh_target(
        state.ssh_port,
        &state.ssh_key,
        &state.known_hosts,
        HOST_KEY_ALIAS,
    )
}

/// `xen_version` from `xl info` run in the lab's dom0.
fn xen_version_over_ssh(state: &LabState, timeout: Duration) -> Result<String, LabError> {
    let output = Transport::Ssh(ssh_target(state))
        .run("xl info", None, timeout)
        .map_err(|e| LabError::Ssh {
            reason: e.to_string(),
        })?;
    xl_info_value(&String::from_utf8_lossy(&output.stdout), "xen_version").ok_or_else(|| {
        LabError::Ssh {
            reason: "`xl info` printed no xen_version".into(),
        }
    })
}

/// The value of `key` in `xl info`'s `key : value` lines.
fn xl_info_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, value)| value.trim().to_string())
}

/// The running Xen lab (default cache directory) as a host to measure on.
pub fn xen_host() -> Result<LabHost, LabError> {
    let cache_dir = default_cache_dir().ok_or_else(|| LabError::Unusable {
        reason: "neither XDG_CACHE_HOME nor HOME is set".into(),
    })?;
    xen_host_in(&cache_dir)
}

/// The Xen lab brought up from `cache_dir` as a host; `NoLab` unless its QEMU runs.
pub fn xen_host_in(cache_dir: &Path) -> Result<LabHost, LabError> {
    let cache_dir = &absolute_cache_dir(cache_dir);
    let state = read_state(cache_dir)
        .map_err(|e| LabError::Unusable {
            reason: e.to_string(),
        })?
        .ok_or(LabError::NoLab)?;
    if !qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file) {
        return Err(LabError::NoLab);
    }
    Ok(LabHost {
        transport: Transport::Ssh(ssh_target(&state)),
        kind: LabKind {
            accel: state.accel.clone(),
        },
    })
}

/// The lab's state and health; None when no lab was brought up from `cache_dir`.
pub fn lab_status(cache_dir: &Path) -> Result<Option<LabStatus>, LabError> {
    let cache_dir = &absolute_cache_dir(cache_dir);
    let Some(state) = read_state(cache_dir)? else {
        return Ok(None);
    };
    let qemu_running = qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file);
    let ssh_answers = qemu_running && xen_version_over_ssh(&state, STATUS_SSH_TIMEOUT).is_ok();
    Ok(Some(LabStatus {
        state,
        qemu_running,
        ssh_answers,
    }))
}

/// Stops the lab's QEMU (SIGTERM, then SIGKILL) and forgets its state. True if one was
/// running. Also stops a QEMU left by a bring-up that was killed before saving its state.
pub fn lab_down(cache_dir: &Path) -> Result<bool, LabError> {
    let cache_dir = &absolute_cache_dir(cache_dir);
    bringup::stop_lab(cache_dir, &state_path(cache_dir), bringup::Layout::xen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state(cache_dir: &Path) -> LabState {
        LabState {
            kind: "xen".into(),
            qemu_pid: u32::MAX,
            qemu_pid_file: cache_dir.join("xen/run/qemu.pid"),
            ssh_port: 10022,
            ssh_key: cache_dir.join("xen/keys/id_ed25519"),
            known_hosts: cache_dir.join("xen/keys/known_hosts"),
            xen_version: "4.17.7".into(),
            xen_package_version: "4.17.7+13-g2445b30a44-0+deb12u1".into(),
            dom0_kernel_package: "linux-image-6.1.0-56-amd64 6.1.192-2".into(),
            accel: "tcg".into(),
            memory_mib: 3072,
            cpus: 2,
            started_at: "2026-11-26T05:00:00Z".into(),
            boot_seconds: 9.0,
            serial_log: cache_dir.join("xen/run/serial.log"),
        }
    }

    #[test]
    fn state_round_trips_and_a_dead_lab_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        assert!(lab_status(dir.path()).unwrap().is_none());
        let state = sample_state(dir.path());
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(state.clone()));
        let status = lab_status(dir.path()).unwrap().unwrap();
        assert!(!status.qemu_running && !status.ssh_answers && !status.healthy());
        // Nothing of ours runs: down reports false and forgets the state.
        assert!(!lab_down(dir.path()).unwrap());
        assert!(lab_status(dir.path()).unwrap().is_none());
    }

    #[test]
    fn down_never_kills_a_foreign_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample_state(dir.path());
        // This test process is alive but is not a QEMU naming our pid file.
        state.qemu_pid = std::process::id();
        write_state(dir.path(), &state).unwrap();
        assert!(!lab_down(dir.path()).unwrap());
    }

    #[test]
    fn corrupt_state_is_an_error_for_status_but_not_for_down() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(state_path(dir.path()), "{not json").unwrap();
        assert!(matches!(
            lab_status(dir.path()),
            Err(LabError::State { .. })
        ));
        assert!(!lab_down(dir.path()).unwrap());
    }

    #[test]
    fn ssh_target_uses_the_state() {
        let state = sample_state(Path::new("/c"));
        let target = ssh_target(&state);
        assert_eq!(target.port, 10022);
        assert_eq!(target.user, "root");
        assert_eq!(target.host, "127.0.0.1");
        assert_eq!(
            target.identity,
            Some(PathBuf::from("/c/xen/keys/id_ed25519"))
        );
        assert_eq!(target.host_key_alias.as_deref(), Some(HOST_KEY_ALIAS));
    }

    #[test]
    fn xen_host_needs_a_running_lab() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(xen_host_in(dir.path()), Err(LabError::NoLab)));
        write_state(dir.path(), &sample_state(dir.path())).unwrap();
        assert!(matches!(xen_host_in(dir.path()), Err(LabError::NoLab)));
    }

    #[test]
    fn xl_info_values_are_found_by_key() {
        let text = "host : lab\nxen_version : 4.17.7\nxen caps : x\n";
        assert_eq!(
            xl_info_value(text, "xen_version").as_deref(),
            Some("4.17.7")
        );
        assert_eq!(xl_info_value(text, "xen_major"), None);
    }
}

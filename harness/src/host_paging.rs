//! `hvbench host paging`: which paging mode KVM gives its guests (two-dimensional paging,
//! EPT on Intel or NPT on AMD, or shadow paging), and switching it for the length of one
//! command by reloading kvm_intel (`ept=`) or kvm_amd (`npt=`).
//!
//! A switch is only made when asked, refused while anything holds the module (a running VM
//! or an open /dev/kvm), refused outright on kvm_pvm (shadow paging is all it has, and
//! reloading it would take /dev/kvm away from everyone), and undone afterwards on every
//! exit path: the previous value is saved in a state file first, so a switch whose process
//! was killed is undone by the next `hvbench host paging`, which says so.

use reports::host::Cpl0;
use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::statefile;

/// Set in the environment of the command run under a switch: the mode it runs with.
pub(crate) const PAGING_ENV: &str = "HVBENCH_HOST_PAGING";

const STATE_FILE: &str = "host-paging.json";
const LOCK_FILE: &str = "host-paging.lock";
/// modprobe of kvm_amd takes well under a second on hardware, seconds under TCG.
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(120);
const CHILD_POLL: Duration = Duration::from_millis(50);

pub use hostutil::PagingMode;

/// The KVM vendor module whose parameter picks the paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VendorModule {
    Intel,
    Amd,
}

impl VendorModule {
    pub fn module_name(self) -> &'static str {
        match self {
            VendorModule::Intel => "kvm_intel",
            VendorModule::Amd => "kvm_amd",
        }
    }

    /// The boolean module parameter that turns two-dimensional paging on.
    pub fn parameter(self) -> &'static str {
        match self {
            VendorModule::Intel => "ept",
            VendorModule::Amd => "npt",
        }
    }

    pub fn from_module_name(name: &str) -> Option<Self> {
        match name {
            "kvm_intel" => Some(VendorModule::Intel),
            "kvm_amd" => Some(VendorModule::Amd),
            _ => None,
        }
    }

    /// The word records use for the mode this module gives: `ept`/`npt` or `shadow`.
    pub fn paging_label(self, tdp: bool) -> &'static str {
        match (self, tdp) {
            (_, false) => "shadow",
            (VendorModule::Intel, true) => "ept",
            (VendorModule::Amd, true) => "npt",
        }
    }
}

/// Where the facts live: /sys/module, /proc/cpuinfo and the state directory (tests point
/// these at a scratch tree).
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub sys_module: PathBuf,
    pub cpuinfo: PathBuf,
    /// Holds the state file and its lock; /run, so that a reboot (which reloads every
    /// module with its defaults) also forgets the switch.
    pub state_dir: PathBuf,
}

impl HostPaths {
    pub fn system() -> Self {
        Self {
            sys_module: PathBuf::from("/sys/module"),
            cpuinfo: PathBuf::from("/proc/cpuinfo"),
            state_dir: PathBuf::from(statefile::SYSTEM_STATE_DIR),
        }
    }

    fn module_dir(&self, module: &str) -> PathBuf {
        self.sys_module.join(module)
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    fn lock_file(&self) -> PathBuf {
        self.state_dir.join(LOCK_FILE)
    }
}

/// KVM as the host fingerprint records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmFingerprint {
    /// `kvm_intel`, `kvm_amd`, `kvm_pvm`, or empty without KVM.
    pub module: &'static str,
    /// `ept`, `npt` or `shadow`; `None` when unknown.
    pub paging: Option<&'static str>,
    /// How guest CPL0 code runs; `None` without KVM.
    pub cpl0: Option<Cpl0>,
}

/// What KVM on this host is, as far as paging goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmPaging {
    /// kvm_pvm: shadow paging only, guest CPL0 emulated; never reloaded by hvbench.
    Pvm,
    /// kvm_intel or kvm_amd is loaded.
    Vendor {
        module: VendorModule,
        /// `ept`/`npt` as the module reports it; None when unreadable or not a boolean.
        tdp: Option<bool>,
        /// The module's reference count: open /dev/kvm files, VMs and vCPUs hold it.
        users: Option<u32>,
    },
    /// No KVM vendor module; `vendor` is the one this CPU could load (None: no vmx/svm).
    NotLoaded { vendor: Option<VendorModule> },
}

impl KvmPaging {
    /// What the host fingerprint records of KVM.
    pub fn fingerprint(&self) -> KvmFingerprint {
        match self {
            KvmPaging::Pvm => KvmFingerprint {
                module: "kvm_pvm",
                paging: Some("shadow"),
                cpl0: Some(Cpl0::Emulated),
            },
            KvmPaging::Vendor { module, tdp, .. } => KvmFingerprint {
                module: module.module_name(),
                paging: tdp.map(|t| module.paging_label(t)),
                cpl0: Some(Cpl0::Native),
            },
            KvmPaging::NotLoaded { .. } => KvmFingerprint {
                module: "",
                paging: None,
                cpl0: None,
            },
        }
    }

    /// One line for `hvbench host paging`.
    pub fn describe(&self) -> String {
        match self {
            KvmPaging::Pvm => "kvm_pvm: shadow paging, fixed (PVM has no EPT/NPT; hvbench never \
                               reloads kvm_pvm)"
                .into(),
            KvmPaging::Vendor { module, tdp, users } => {
                let parameter = module.parameter();
                let mode = match tdp {
                    Some(t) => format!(
                        "{} ({parameter}={})",
                        module.paging_label(*t),
                        if *t { "Y" } else { "N" }
                    ),
                    None => format!("unknown ({parameter} unreadable)"),
                };
                let use_note = match users {
                    Some(0) => "not in use".to_string(),
                    Some(n) => format!("in use by {n} reference(s): VMs or open /dev/kvm"),
                    None => "use count unknown".to_string(),
                };
                format!("{}: {mode}, {use_note}", module.module_name())
            }
            KvmPaging::NotLoaded { vendor: Some(v) } => format!(
                "no KVM module loaded ({} could be, with {}=1 or {}=0)",
                v.module_name(),
                v.parameter(),
                v.parameter()
            ),
            KvmPaging::NotLoaded { vendor: None } => {
                "no KVM module loaded, and the CPU has no vmx/svm".into()
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum PagingError {
    #[error("refusing to switch paging: {0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("{what} failed: {detail}")]
    Module { what: String, detail: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(
        "{module} {parameter} was not restored to {expected} ({detail}); the state file {state} \
         keeps the value: run `hvbench host paging --restore` once nothing uses {module}"
    )]
    RestoreFailed {
        module: String,
        parameter: String,
        expected: String,
        detail: String,
        state: PathBuf,
    },
}

impl From<statefile::StateFileError> for PagingError {
    fn from(e: statefile::StateFileError) -> Self {
        match e {
            statefile::StateFileError::Io { path, source, .. } => PagingError::Io { path, source },
            statefile::StateFileError::Json { path, reason } => PagingError::State { path, reason },
        }
    }
}

impl PagingError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a boolean module parameter as sysfs prints it (`Y`/`N`, or `1`/`0`).
pub(crate) fn parse_bool_parameter(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// The vendor module this CPU takes, from the `flags` line of /proc/cpuinfo.
pub(crate) fn vendor_from_cpuinfo(cpuinfo: &str) -> Option<VendorModule> {
    let flags = cpuinfo.lines().find(|line| line.starts_with("flags"))?;
    let has = |flag: &str| flags.split_whitespace().any(|word| word == flag);
    if has("vmx") {
        Some(VendorModule::Intel)
    } else if has("svm") {
        Some(VendorModule::Amd)
    } else {
        None
    }
}

/// What KVM is on the host `paths` describe. Reads only.
pub fn read_kvm_paging(paths: &HostPaths) -> KvmPaging {
    if paths.module_dir("kvm_pvm").exists() {
        return KvmPaging::Pvm;
    }
    for module in [VendorModule::Intel, VendorModule::Amd] {
        let dir = paths.module_dir(module.module_name());
        if dir.exists() {
            return KvmPaging::Vendor {
                module,
                tdp: hostutil::read_trimmed(dir.join("parameters").join(module.parameter()))
                    .and_then(|v| parse_bool_parameter(&v)),
                users: hostutil::read_trimmed(dir.join("refcnt")).and_then(|v| v.parse().ok()),
            };
        }
    }
    let cpuinfo = fs::read_to_string(&paths.cpuinfo).unwrap_or_default();
    KvmPaging::NotLoaded {
        vendor: vendor_from_cpuinfo(&cpuinfo),
    }
}

/// A switch in progress, saved before the module is touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchState {
    /// `kvm_intel` or `kvm_amd`.
    pub module: String,
    /// `ept` or `npt`.
    pub parameter: String,
    /// The value before the switch; None when the module was not loaded (restoring then
    /// unloads it).
    pub previous: Option<bool>,
    pub requested: bool,
    /// The `hvbench host paging` process that made the switch.
    pub pid: u32,
    pub started_unix: u64,
    pub command: Vec<String>,
}

impl SwitchState {
    fn vendor(&self, path: &Path) -> Result<VendorModule, PagingError> {
        let vendor =
            VendorModule::from_module_name(&self.module).ok_or_else(|| PagingError::State {
                path: path.to_path_buf(),
                reason: format!("unknown module {:?}", self.module),
            })?;
        if vendor.parameter() != self.parameter {
            return Err(PagingError::State {
                path: path.to_path_buf(),
                reason: format!("{} has no parameter {:?}", self.module, self.parameter),
            });
        }
        Ok(vendor)
    }
}

pub fn read_state(path: &Path) -> Result<Option<SwitchState>, PagingError> {
    Ok(statefile::read_json(path)?)
}

/// Writes the state file whole: a crash leaves the old file or the new one, never half.
pub(crate) fn write_state(path: &Path, state: &SwitchState) -> Result<(), PagingError> {
    Ok(statefile::write_json(path, state)?)
}

fn remove_state(path: &Path) -> Result<(), PagingError> {
    Ok(statefile::remove(path)?)
}

/// Loading and unloading the vendor module: the kernel in `SystemModules`, a scratch
/// sysfs tree in tests.
pub trait ModuleControl {
    /// Why this process may not reload modules, if it may not.
    fn forbidden(&self) -> Option<String>;
    fn unload(&mut self, module: &str) -> Result<(), PagingError>;
    fn load(&mut self, module: &str, parameter: &str, enabled: bool) -> Result<(), PagingError>;
}

/// The running kernel: `delete_module(2)` for the vendor module alone (`modprobe -r` would
/// also unload kvm.ko and reset its parameters), `modprobe` to load it with one parameter
/// (it finds compressed modules, dependencies and /etc/modprobe.d options).
#[derive(Debug)]
pub struct SystemModules;

impl ModuleControl for SystemModules {
    fn forbidden(&self) -> Option<String> {
        (!nix::unistd::Uid::effective().is_root())
            .then(|| "reloading a kernel module needs root (CAP_SYS_MODULE)".to_string())
    }

    fn unload(&mut self, module: &str) -> Result<(), PagingError> {
        let name = CString::new(module).map_err(|_| PagingError::Module {
            what: format!("unloading {module}"),
            detail: "the name holds a NUL byte".into(),
        })?;
        match nix::kmod::delete_module(&name, nix::kmod::DeleteModuleFlags::O_NONBLOCK) {
            Ok(()) => Ok(()),
            Err(Errno::ENOENT) => Ok(()),
            Err(errno @ (Errno::EBUSY | Errno::EWOULDBLOCK)) => Err(PagingError::Module {
                what: format!("unloading {module}"),
                detail: format!("{errno}: a VM or another /dev/kvm user appeared"),
            }),
            Err(errno) => Err(PagingError::Module {
                what: format!("unloading {module}"),
                detail: errno.to_string(),
            }),
        }
    }

    fn load(&mut self, module: &str, parameter: &str, enabled: bool) -> Result<(), PagingError> {
        let argument = format!("{parameter}={}", u8::from(enabled));
        let what = format!("modprobe {module} {argument}");
        let mut child = Command::new("modprobe")
            .args([module, &argument])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| PagingError::Module {
                what: what.clone(),
                detail: format!("{e} (modprobe comes with Debian's kmod package)"),
            })?;
        let deadline = Instant::now() + MODPROBE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(CHILD_POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(PagingError::Module {
                        what,
                        detail: format!("no answer within {} s", MODPROBE_TIMEOUT.as_secs()),
                    });
                }
                Err(e) => {
                    return Err(PagingError::Module {
                        what,
                        detail: e.to_string(),
                    })
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        Err(PagingError::Module {
            what,
            detail: format!("{status}: {}", stderr.trim()),
        })
    }
}

/// Holds the state directory's lock for as long as a switch (or its restore) runs.
struct StateLock {
    _lock: Flock<fs::File>,
}

fn lock_state(paths: &HostPaths) -> Result<StateLock, PagingError> {
    let path = paths.lock_file();
    let file = statefile::open_lock_file(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(StateLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) => {
            let owner = read_state(&paths.state_file())
                .ok()
                .flatten()
                .map(|s| format!(" (pid {}, running {:?})", s.pid, s.command.join(" ")))
                .unwrap_or_default();
            Err(PagingError::Refused(format!(
                "another `hvbench host paging` holds {}{owner}",
                path.display()
            )))
        }
        Err((_, e)) => Err(PagingError::io(&path, std::io::Error::from(e))),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sets `module`'s paging parameter to `enabled` (None: leave it unloaded) and checks that
/// the module reports that value afterwards.
fn reload(
    paths: &HostPaths,
    control: &mut dyn ModuleControl,
    vendor: VendorModule,
    enabled: Option<bool>,
) -> Result<(), PagingError> {
    let module = vendor.module_name();
    let parameter = vendor.parameter();
    control.unload(module)?;
    let Some(enabled) = enabled else {
        return Ok(());
    };
    control.load(module, parameter, enabled)?;
    match read_kvm_paging(paths) {
        KvmPaging::Vendor {
            module: loaded,
            tdp: Some(value),
            ..
        } if loaded == vendor && value == enabled => Ok(()),
        other => Err(PagingError::Module {
            what: format!("loading {module} {parameter}={}", u8::from(enabled)),
            detail: format!(
                "the module now reports {} (does this CPU have {}?)",
                other.describe(),
                vendor.paging_label(true)
            ),
        }),
    }
}

/// Puts the saved value back, removes the state file, and says what it did.
fn restore(
    paths: &HostPaths,
    control: &mut dyn ModuleControl,
    state: &SwitchState,
    progress: &dyn Fn(&str),
) -> Result<(), PagingError> {
    let state_path = paths.state_file();
    let vendor = state.vendor(&state_path)?;
    let expected = match state.previous {
        Some(value) => format!("{}={}", state.parameter, u8::from(value)),
        None => "unloaded".into(),
    };
    let failed = |detail: String| PagingError::RestoreFailed {
        module: state.module.clone(),
        parameter: state.parameter.clone(),
        expected: expected.clone(),
        detail,
        state: state_path.clone(),
    };
    let current = read_kvm_paging(paths);
    let already = match (&current, state.previous) {
        (KvmPaging::Vendor { module, tdp, .. }, Some(previous)) => {
            *module == vendor && *tdp == Some(previous)
        }
        (KvmPaging::NotLoaded { .. }, None) => true,
        _ => false,
    };
    if !already {
        if let KvmPaging::Vendor {
            users: Some(users), ..
        } = current
        {
            if users > 0 {
                return Err(failed(format!(
                    "{} is in use by {users} reference(s)",
                    state.module
                )));
            }
        }
        reload(paths, control, vendor, state.previous).map_err(|e| failed(e.to_string()))?;
    }
    remove_state(&state_path)?;
    progress(&format!("{} restored to {expected}", state.module));
    Ok(())
}

/// Undoes a switch whose process died before restoring it. Returns what it undid.
pub fn restore_stale(
    paths: &HostPaths,
    control: &mut dyn ModuleControl,
    progress: &dyn Fn(&str),
) -> Result<Option<SwitchState>, PagingError> {
    if matches!(read_kvm_paging(paths), KvmPaging::Pvm) {
        return Ok(None);
    }
    if !paths.state_file().exists() {
        return Ok(None);
    }
    let _lock = lock_state(paths)?;
    restore_stale_locked(paths, control, progress)
}

fn restore_stale_locked(
    paths: &HostPaths,
    control: &mut dyn ModuleControl,
    progress: &dyn Fn(&str),
) -> Result<Option<SwitchState>, PagingError> {
    let Some(state) = read_state(&paths.state_file())? else {
        return Ok(None);
    };
    if let Some(reason) = control.forbidden() {
        return Err(PagingError::Refused(format!(
            "a switch left by pid {} must be undone, but {reason}",
            state.pid
        )));
    }
    progress(&format!(
        "pid {} switched {} to {}={} for `{}` and never restored it (killed?); restoring",
        state.pid,
        state.module,
        state.parameter,
        u8::from(state.requested),
        state.command.join(" ")
    ));
    restore(paths, control, &state, progress)?;
    Ok(Some(state))
}

/// Restores the saved setting if dropped while armed: early returns and panics between the
/// switch and the normal restore still undo it.
struct RestoreGuard<'a> {
    paths: &'a HostPaths,
    control: &'a mut dyn ModuleControl,
    state: SwitchState,
    progress: &'a dyn Fn(&str),
    armed: bool,
}

impl RestoreGuard<'_> {
    fn restore_now(mut self) -> Result<(), PagingError> {
        self.armed = false;
        restore(self.paths, self.control, &self.state, self.progress)
    }
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Nobody is left to return the error to: say it.
            if let Err(error) = restore(self.paths, self.control, &self.state, self.progress) {
                (self.progress)(&error.to_string());
            }
        }
    }
}

/// Why `current` cannot be switched at all, if so.
fn refusal(current: &KvmPaging) -> Option<String> {
    match current {
        KvmPaging::Pvm => Some(
            "/dev/kvm here is kvm_pvm, which has shadow paging only and no ept/npt parameter; \
             reloading it would take /dev/kvm away from every user of this machine"
                .into(),
        ),
        KvmPaging::NotLoaded { vendor: None } => Some(
            "no kvm_intel or kvm_amd is loaded and the CPU has no vmx/svm flag: there is no \
             hardware paging mode to choose"
                .into(),
        ),
        KvmPaging::Vendor {
            module,
            users: Some(users),
            ..
        } if *users > 0 => Some(format!(
            "{} is in use ({users} reference(s) in {}/refcnt): a VM or another /dev/kvm user \
             is running; stop it first",
            module.module_name(),
            module.module_name()
        )),
        _ => None,
    }
}

/// Runs `command` with KVM's paging set to `mode`, then puts the previous setting back.
/// Returns the command's exit status (128 + signal when a signal ended it).
///
/// `cancel` (the Ctrl-C flag) is forwarded once as SIGINT to the command, which runs in its
/// own process group so that a terminal's Ctrl-C reaches it only through us.
pub fn run_with_paging(
    paths: &HostPaths,
    control: &mut dyn ModuleControl,
    mode: PagingMode,
    command: &[String],
    cancel: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<i32, PagingError> {
    let Some(program) = command.first() else {
        return Err(PagingError::Refused(
            "no command to run under the switch (hvbench host paging MODE -- COMMAND...)".into(),
        ));
    };
    // kvm_pvm and hosts without vmx/svm are refused before anything is written.
    let initial = read_kvm_paging(paths);
    if matches!(
        initial,
        KvmPaging::Pvm | KvmPaging::NotLoaded { vendor: None }
    ) {
        return Err(PagingError::Refused(refusal(&initial).unwrap_or_default()));
    }
    if let Some(reason) = control.forbidden() {
        return Err(PagingError::Refused(reason));
    }
    let _lock = lock_state(paths)?;
    restore_stale_locked(paths, control, progress)?;

    let current = read_kvm_paging(paths);
    if let Some(reason) = refusal(&current) {
        return Err(PagingError::Refused(reason));
    }
    let (vendor, previous) = match current {
        KvmPaging::Vendor {
            module,
            tdp: Some(tdp),
            ..
        } => (module, Some(tdp)),
        KvmPaging::Vendor {
            module, tdp: None, ..
        } => {
            return Err(PagingError::Refused(format!(
                "{}/parameters/{} cannot be read as Y/N",
                module.module_name(),
                module.parameter()
            )))
        }
        KvmPaging::NotLoaded {
            vendor: Some(vendor),
        } => (vendor, None),
        KvmPaging::Pvm | KvmPaging::NotLoaded { vendor: None } => {
            return Err(PagingError::Refused(refusal(&current).unwrap_or_default()))
        }
    };
    let wanted = mode.tdp_enabled();
    let label = vendor.paging_label(wanted);
    if previous == Some(wanted) {
        progress(&format!(
            "{} already gives {label} ({}={}); running the command without a reload",
            vendor.module_name(),
            vendor.parameter(),
            u8::from(wanted)
        ));
        return run_child(program, &command[1..], mode, cancel);
    }

    let state = SwitchState {
        module: vendor.module_name().into(),
        parameter: vendor.parameter().into(),
        previous,
        requested: wanted,
        pid: std::process::id(),
        started_unix: unix_now(),
        command: command.to_vec(),
    };
    write_state(&paths.state_file(), &state)?;
    let guard = RestoreGuard {
        paths,
        control,
        state,
        progress,
        armed: true,
    };
    progress(&format!(
        "reloading {} with {}={} ({label}); {} is restored afterwards",
        vendor.module_name(),
        vendor.parameter(),
        u8::from(wanted),
        match previous {
            Some(value) => format!("{}={}", vendor.parameter(), u8::from(value)),
            None => "the unloaded state".into(),
        }
    ));
    // A failed switch drops the guard, which restores the previous value.
    reload(paths, &mut *guard.control, vendor, Some(wanted))?;
    let outcome = run_child(program, &command[1..], mode, cancel);
    guard.restore_now()?;
    outcome
}

fn run_child(
    program: &str,
    arguments: &[String],
    mode: PagingMode,
    cancel: &AtomicBool,
) -> Result<i32, PagingError> {
    use std::os::unix::process::CommandExt;
    let describe = || {
        std::iter::once(program.to_string())
            .chain(arguments.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut child = Command::new(program)
        .args(arguments)
        .env(PAGING_ENV, mode.name())
        .process_group(0)
        .spawn()
        .map_err(|source| PagingError::Spawn {
            command: describe(),
            source,
        })?;
    let mut forwarded = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(PagingError::Spawn {
                    command: describe(),
                    source,
                })
            }
        }
        if cancel.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            if let Ok(pid) = i32::try_from(child.id()) {
                // The whole group: the command and whatever it started.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGINT,
                );
            }
        }
        std::thread::sleep(CHILD_POLL);
    };
    Ok(exit_code(status))
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}

/// The paging mode the command was started under by `hvbench host paging`, if any.
pub fn mode_from_env() -> Option<PagingMode> {
    std::env::var(PAGING_ENV)
        .ok()
        .and_then(|value| PagingMode::parse(&value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A scratch /sys/module whose vendor module "reloads" by rewriting its files.
    struct FakeSysfs {
        dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn paths(&self) -> HostPaths {
            HostPaths {
                sys_module: self.dir.path().join("sys/module"),
                cpuinfo: self.dir.path().join("cpuinfo"),
                state_dir: self.dir.path().join("run/hvbench"),
            }
        }

        fn set_module(&self, module: &str, parameter: &str, value: &str, refcnt: u32) {
            let dir = self.paths().sys_module.join(module);
            fs::create_dir_all(dir.join("parameters")).unwrap();
            fs::write(dir.join("parameters").join(parameter), format!("{value}\n")).unwrap();
            fs::write(dir.join("refcnt"), format!("{refcnt}\n")).unwrap();
        }

        fn set_cpuinfo(&self, flags: &str) {
            fs::write(
                self.paths().cpuinfo,
                format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\n"),
            )
            .unwrap();
        }
    }

    #[derive(Default)]
    struct Log {
        calls: Vec<String>,
    }

    struct FakeControl {
        sysfs: HostPaths,
        log: Rc<RefCell<Log>>,
        fail_load_of: Option<bool>,
    }

    impl FakeControl {
        fn new(sysfs: &FakeSysfs) -> (Self, Rc<RefCell<Log>>) {
            let log = Rc::new(RefCell::new(Log::default()));
            (
                Self {
                    sysfs: sysfs.paths(),
                    log: log.clone(),
                    fail_load_of: None,
                },
                log,
            )
        }
    }

    impl ModuleControl for FakeControl {
        fn forbidden(&self) -> Option<String> {
            None
        }

        fn unload(&mut self, module: &str) -> Result<(), PagingError> {
            self.log.borrow_mut().calls.push(format!("unload {module}"));
            let _ = fs::remove_dir_all(self.sysfs.sys_module.join(module));
            Ok(())
        }

        fn load(
            &mut self,
            module: &str,
            parameter: &str,
            enabled: bool,
        ) -> Result<(), PagingError> {
            self.log
                .borrow_mut()
                .calls
                .push(format!("load {module} {parameter}={}", u8::from(enabled)));
            if self.fail_load_of == Some(enabled) {
                return Err(PagingError::Module {
                    what: "fake load".into(),
                    detail: "refused".into(),
                });
            }
            let dir = self.sysfs.sys_module.join(module);
            fs::create_dir_all(dir.join("parameters")).unwrap();
            fs::write(
                dir.join("parameters").join(parameter),
                if enabled { "Y\n" } else { "N\n" },
            )
            .unwrap();
            fs::write(dir.join("refcnt"), "0\n").unwrap();
            Ok(())
        }
    }

    fn quiet(_: &str) {}

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn parameters_parse_as_sysfs_prints_them() {
        assert_eq!(parse_bool_parameter("Y\n"), Some(true));
        assert_eq!(parse_bool_parameter("N"), Some(false));
        assert_eq!(parse_bool_parameter("1"), Some(true));
        assert_eq!(parse_bool_parameter("0"), Some(false));
        assert_eq!(parse_bool_parameter(""), None);
        assert_eq!(parse_bool_parameter("maybe"), None);
    }

    #[test]
    fn vendor_comes_from_the_cpu_flags() {
        assert_eq!(
            vendor_from_cpuinfo("flags\t: fpu vmx ept\n"),
            Some(VendorModule::Intel)
        );
        assert_eq!(
            vendor_from_cpuinfo("flags\t: fpu svm npt\n"),
            Some(VendorModule::Amd)
        );
        assert_eq!(vendor_from_cpuinfo("flags\t: fpu svmx\n"), None);
        assert_eq!(vendor_from_cpuinfo(""), None);
    }

    #[test]
    fn reads_each_kind_of_host() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_cpuinfo("svm");
        assert_eq!(
            read_kvm_paging(&paths),
            KvmPaging::NotLoaded {
                vendor: Some(VendorModule::Amd)
            }
        );
        sysfs.set_module("kvm_amd", "npt", "Y", 0);
        let amd = read_kvm_paging(&paths);
        assert_eq!(
            amd,
            KvmPaging::Vendor {
                module: VendorModule::Amd,
                tdp: Some(true),
                users: Some(0)
            }
        );
        assert_eq!(
            amd.fingerprint(),
            KvmFingerprint {
                module: "kvm_amd",
                paging: Some("npt"),
                cpl0: Some(Cpl0::Native)
            }
        );
        sysfs.set_module("kvm_amd", "npt", "N", 2);
        let shadow = read_kvm_paging(&paths);
        assert_eq!(shadow.fingerprint().paging, Some("shadow"));
        assert!(
            shadow.describe().contains("in use by 2"),
            "{}",
            shadow.describe()
        );
        sysfs.set_module("kvm_amd", "npt", "garbage", 0);
        assert_eq!(read_kvm_paging(&paths).fingerprint().paging, None);

        let intel = FakeSysfs::new();
        intel.set_module("kvm_intel", "ept", "N", 0);
        assert_eq!(
            read_kvm_paging(&intel.paths()).fingerprint(),
            KvmFingerprint {
                module: "kvm_intel",
                paging: Some("shadow"),
                cpl0: Some(Cpl0::Native)
            }
        );
        intel.set_module("kvm_intel", "ept", "Y", 0);
        assert_eq!(
            read_kvm_paging(&intel.paths()).fingerprint().paging,
            Some("ept")
        );

        let pvm = FakeSysfs::new();
        fs::create_dir_all(pvm.paths().sys_module.join("kvm_pvm")).unwrap();
        // kvm_pvm wins even if a vendor module directory is present.
        pvm.set_module("kvm_amd", "npt", "Y", 0);
        assert_eq!(read_kvm_paging(&pvm.paths()), KvmPaging::Pvm);
        assert_eq!(
            KvmPaging::Pvm.fingerprint(),
            KvmFingerprint {
                module: "kvm_pvm",
                paging: Some("shadow"),
                cpl0: Some(Cpl0::Emulated)
            }
        );
    }

    #[test]
    fn state_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert_eq!(read_state(&path).unwrap(), None);
        let state = SwitchState {
            module: "kvm_amd".into(),
            parameter: "npt".into(),
            previous: Some(true),
            requested: false,
            pid: 42,
            started_unix: 1_700_000_000,
            command: vec!["hvbench".into(), "run".into()],
        };
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(state.clone()));
        assert!(!path.with_extension("json.tmp").exists());
        state.vendor(&path).unwrap();
        let mut wrong = state;
        wrong.parameter = "ept".into();
        wrong.vendor(&path).unwrap_err();
        fs::write(&path, "{half").unwrap();
        assert!(matches!(read_state(&path), Err(PagingError::State { .. })));
    }

    #[test]
    fn pvm_is_refused_before_anything_changes() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        fs::create_dir_all(paths.sys_module.join("kvm_pvm")).unwrap();
        let (mut control, log) = FakeControl::new(&sysfs);
        let marker = sysfs.dir.path().join("ran");
        let error = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh(&format!("touch {}", marker.display())),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("kvm_pvm"), "{message}");
        assert!(message.contains("shadow paging only"), "{message}");
        assert!(log.borrow().calls.is_empty());
        assert!(!marker.exists(), "the command must not run");
        assert!(!paths.state_dir.exists(), "no state may be written");
    }

    #[test]
    fn a_module_in_use_is_refused() {
        let sysfs = FakeSysfs::new();
        sysfs.set_module("kvm_amd", "npt", "Y", 1);
        let (mut control, log) = FakeControl::new(&sysfs);
        let error = run_with_paging(
            &sysfs.paths(),
            &mut control,
            PagingMode::Shadow,
            &sh("true"),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("in use"), "{error}");
        assert!(log.borrow().calls.is_empty());
        assert!(!sysfs.paths().state_file().exists());
    }

    #[test]
    fn switches_runs_and_restores() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_module("kvm_amd", "npt", "Y", 0);
        let (mut control, log) = FakeControl::new(&sysfs);
        let seen = sysfs.dir.path().join("seen");
        let npt = paths.sys_module.join("kvm_amd/parameters/npt");
        // The command sees npt=N and the environment variable, and its status comes back.
        let code = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh(&format!(
                "cat {} > {seen}; echo ${PAGING_ENV} >> {seen}; cat {} >> {seen}; exit 7",
                npt.display(),
                paths.state_file().display(),
                seen = seen.display()
            )),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap();
        assert_eq!(code, 7);
        let seen = fs::read_to_string(&seen).unwrap();
        assert!(seen.starts_with("N\nshadow\n"), "{seen}");
        assert!(seen.contains("\"previous\": true"), "{seen}");
        assert_eq!(fs::read_to_string(&npt).unwrap().trim(), "Y");
        assert!(!paths.state_file().exists());
        assert_eq!(
            log.borrow().calls,
            [
                "unload kvm_amd",
                "load kvm_amd npt=0",
                "unload kvm_amd",
                "load kvm_amd npt=1"
            ]
        );
    }

    #[test]
    fn the_mode_already_set_needs_no_reload() {
        let sysfs = FakeSysfs::new();
        sysfs.set_module("kvm_intel", "ept", "Y", 0);
        let (mut control, log) = FakeControl::new(&sysfs);
        let code = run_with_paging(
            &sysfs.paths(),
            &mut control,
            PagingMode::Tdp,
            &sh("exit 0"),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap();
        assert_eq!(code, 0);
        assert!(log.borrow().calls.is_empty());
    }

    #[test]
    fn a_failed_switch_restores_the_previous_value() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_module("kvm_amd", "npt", "Y", 0);
        let (mut control, log) = FakeControl::new(&sysfs);
        control.fail_load_of = Some(false);
        let marker = sysfs.dir.path().join("ran");
        let error = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh(&format!("touch {}", marker.display())),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap_err();
        assert!(matches!(error, PagingError::Module { .. }), "{error}");
        assert!(!marker.exists());
        assert_eq!(
            fs::read_to_string(paths.sys_module.join("kvm_amd/parameters/npt"))
                .unwrap()
                .trim(),
            "Y"
        );
        assert!(!paths.state_file().exists());
        assert_eq!(log.borrow().calls.last().unwrap(), "load kvm_amd npt=1");
    }

    #[test]
    fn an_unloaded_module_is_loaded_for_the_command_and_unloaded_after() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_cpuinfo("svm");
        let (mut control, _log) = FakeControl::new(&sysfs);
        let code = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh(&format!(
                "grep -q N {}",
                paths.sys_module.join("kvm_amd/parameters/npt").display()
            )),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap();
        assert_eq!(code, 0);
        assert!(!paths.sys_module.join("kvm_amd").exists());
    }

    #[test]
    fn a_stale_switch_is_restored_at_the_next_start_and_says_so() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        // A killed run left npt=N behind.
        sysfs.set_module("kvm_amd", "npt", "N", 0);
        fs::create_dir_all(&paths.state_dir).unwrap();
        let stale = SwitchState {
            module: "kvm_amd".into(),
            parameter: "npt".into(),
            previous: Some(true),
            requested: false,
            pid: 999_999,
            started_unix: 1,
            command: vec!["hvbench".into(), "run".into()],
        };
        write_state(&paths.state_file(), &stale).unwrap();
        let (mut control, _log) = FakeControl::new(&sysfs);
        let said = RefCell::new(Vec::new());
        let progress = |m: &str| said.borrow_mut().push(m.to_string());
        assert_eq!(
            restore_stale(&paths, &mut control, &progress).unwrap(),
            Some(stale.clone())
        );
        assert!(said.borrow().iter().any(|m| m.contains("never restored")));
        assert!(said
            .borrow()
            .iter()
            .any(|m| m.contains("restored to npt=1")));
        assert!(!paths.state_file().exists());
        assert_eq!(read_kvm_paging(&paths).fingerprint().paging, Some("npt"));
        assert_eq!(
            restore_stale(&paths, &mut control, &progress).unwrap(),
            None
        );

        // A switch finds the stale state first, restores it, then does its own.
        sysfs.set_module("kvm_amd", "npt", "N", 0);
        write_state(&paths.state_file(), &stale).unwrap();
        said.borrow_mut().clear();
        let code = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh("exit 0"),
            &AtomicBool::new(false),
            &progress,
        )
        .unwrap();
        assert_eq!(code, 0);
        assert!(said.borrow().iter().any(|m| m.contains("never restored")));
        assert_eq!(read_kvm_paging(&paths).fingerprint().paging, Some("npt"));
    }

    #[test]
    fn a_stale_switch_is_kept_while_the_module_is_in_use() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_module("kvm_amd", "npt", "N", 3);
        fs::create_dir_all(&paths.state_dir).unwrap();
        let stale = SwitchState {
            module: "kvm_amd".into(),
            parameter: "npt".into(),
            previous: Some(true),
            requested: false,
            pid: 999_999,
            started_unix: 1,
            command: vec!["x".into()],
        };
        write_state(&paths.state_file(), &stale).unwrap();
        let (mut control, log) = FakeControl::new(&sysfs);
        let error = restore_stale(&paths, &mut control, &quiet).unwrap_err();
        assert!(
            matches!(error, PagingError::RestoreFailed { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("--restore"), "{error}");
        assert!(paths.state_file().exists());
        assert!(log.borrow().calls.is_empty());
    }

    #[test]
    fn a_second_switch_is_refused_while_one_runs() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_module("kvm_amd", "npt", "Y", 0);
        let _held = lock_state(&paths).unwrap();
        let (mut control, _log) = FakeControl::new(&sysfs);
        let error = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh("true"),
            &AtomicBool::new(false),
            &quiet,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("another `hvbench host paging`"), "{error}");
    }

    #[test]
    fn ctrl_c_reaches_the_command_and_the_switch_is_still_undone() {
        let sysfs = FakeSysfs::new();
        let paths = sysfs.paths();
        sysfs.set_module("kvm_amd", "npt", "Y", 0);
        let (mut control, _log) = FakeControl::new(&sysfs);
        static CANCEL: AtomicBool = AtomicBool::new(false);
        let setter = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            CANCEL.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        let code = run_with_paging(
            &paths,
            &mut control,
            PagingMode::Shadow,
            &sh("sleep 20"),
            &CANCEL,
            &quiet,
        )
        .unwrap();
        setter.join().unwrap();
        assert_eq!(code, 128 + 2, "ended by SIGINT");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(read_kvm_paging(&paths).fingerprint().paging, Some("npt"));
    }

    #[test]
    fn modes_parse() {
        assert_eq!(PagingMode::parse("tdp"), Some(PagingMode::Tdp));
        assert_eq!(PagingMode::parse("shadow"), Some(PagingMode::Shadow));
        assert_eq!(PagingMode::parse("ept"), None);
        assert!(PagingMode::Tdp.tdp_enabled());
        assert_eq!(VendorModule::Amd.paging_label(true), "npt");
        assert_eq!(VendorModule::Intel.paging_label(false), "shadow");
    }
}

//! `lab up|status|down|run kvm`: a Linux host whose kvm_amd (or kvm_intel) is ours to
//! reload, nested in QEMU, with hvbench inside it. It exercises the paging axis end to end
//! where the real host's KVM is kvm_pvm: `lab run kvm --paging shadow` runs `hvbench host
//! paging shadow -- hvbench run --backend kvm ...` in the lab over ssh and brings the
//! records back.
//!
//! Under TCG (the default here) QEMU emulates AMD SVM with nested paging, and every figure
//! measured in the lab is an emulation artefact: the records say so (host class
//! `nested-tcg`), and they prove the path, never the speed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use reports::record::Record;
use reports::ResultsWriter;
use serde::{Deserialize, Serialize};

use crate::bringup::{self, check_cancelled, now_rfc3339, sha256_hex, BootWatch, Layout};
use crate::initramfs::{self, InitramfsSpec};
use crate::packages::{self, PackageManifest};
use crate::qemu::{self, LinuxBoot};
use crate::quiet;
use crate::recipe::{self, Booted, Lab, LabStatus, MachineOptions, Recipe};
use crate::LabError;
use hostutil::transport::{shell_quote, SshTarget, Transport, TransportError};
use hostutil::PagingMode;

/// The line the boot script prints on the serial console once dropbear listens.
pub const KVM_READY_MARKER: &str = "HVBENCH-KVM-LAB-READY";
/// The name the lab's host key is pinned under in its known_hosts, whatever the port.
pub const KVM_HOST_KEY_ALIAS: &str = "hvbench-kvm-lab";
/// Where hvbench lives inside the lab (dropbear's PATH lacks /usr/local/bin: always use
/// the full path).
pub const LAB_HVBENCH: &str = "/usr/local/bin/hvbench";

const RC_SCRIPT: &str = include_str!("assets/kvm-rc");
/// The NIC for QEMU's user-mode network, and KVM with both vendor modules (the boot script
/// loads the one the CPU takes).
/// 9p over virtio mounts the instruction-count log's directory when the lab counts.
const LAB_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "kvm_amd",
    "kvm_intel",
];
/// Where the lab's Linux mounts the host's instruction-count log directory.
pub(crate) const LAB_INSNS_LOG: &str = "/mnt/insns/insns.log";
const STATE_FILE: &str = "kvm-lab.json";
/// Bump when the initramfs recipe changes in a way the inputs below do not capture.
const BUILD_FORMAT: u32 = 1;
/// Copying hvbench (tens of MB) into the lab through QEMU's user network and an emulated
/// sshd.
const PUSH_TIMEOUT: Duration = Duration::from_secs(600);
/// One short ssh command to the lab (a poll, a fetch, a kill).
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a detached run in the lab is polled.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long the lab may fail to answer polls before the run is given up.
const LAB_SILENCE_LIMIT: Duration = Duration::from_secs(180);
const REMOTE_RUNS_DIR: &str = "/tmp/hvbench-lab-runs";
/// After Ctrl-C, how long the remote run gets to save its records and restore paging.
const INTERRUPT_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct KvmLabOptions {
    /// The emulated machine (1536 MiB by default): Linux, hvbench, and the guests it
    /// boots. Its files live under `kvm/` in the cache directory.
    pub machine: MachineOptions,
    /// The hvbench binary put into the lab (default: this process's own executable).
    pub hvbench: PathBuf,
}

impl KvmLabOptions {
    /// Defaults, with hvbench taken from `std::env::current_exe()`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Result<Self, LabError> {
        let hvbench = std::env::current_exe().map_err(|e| LabError::InvalidOptions {
            reason: format!("cannot find hvbench's own executable: {e}"),
        })?;
        Ok(Self {
            machine: MachineOptions::new(cache_dir, 1536),
            hvbench,
        })
    }
}

/// Which hvbench binary is in the lab: enough to tell a rebuild without hashing tens of MB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub modified_unix_ns: u64,
}

impl BinaryIdentity {
    pub fn of(path: &Path) -> Result<Self, LabError> {
        let metadata = fs::metadata(path).map_err(|e| LabError::io(path, e))?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            size: metadata.len(),
            modified_unix_ns: modified,
        })
    }
}

/// A running KVM lab, as saved in `<cache_dir>/kvm-lab.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvmLabState {
    /// "kvm".
    pub kind: String,
    pub qemu_pid: u32,
    /// QEMU's `-pidfile`; its path in QEMU's command line identifies our QEMU.
    pub qemu_pid_file: PathBuf,
    pub ssh_port: u16,
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    /// The Debian kernel package the lab's Linux comes from, and its release.
    pub kernel_package: String,
    pub kernel_release: String,
    /// What `hvbench host paging` said in the lab once it was up, e.g.
    /// "kvm_amd: npt (npt=Y), not in use".
    pub kvm_at_boot: String,
    /// "tcg" or "kvm": with tcg, every timing inside the lab is an emulation artefact.
    pub accel: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// From QEMU's start to hvbench answering over ssh.
    pub boot_seconds: f64,
    pub serial_log: PathBuf,
    /// The hvbench binary the lab runs (put in at boot or copied in later).
    pub hvbench: BinaryIdentity,
    /// Where the hvbench-insns plugin appends its counts (shared with the lab's Linux at
    /// `LAB_INSNS_LOG`), when the lab loaded it.
    #[serde(default)]
    pub insns_log: Option<PathBuf>,
}

/// Inputs of a build; a rebuild happens when any of them changes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BuildStamp {
    format: u32,
    inputs_sha256: String,
    kernel_package: String,
    kernel_release: String,
    hvbench: BinaryIdentity,
}

fn read_state(cache_dir: &Path) -> Result<Option<KvmLabState>, LabError> {
    recipe::read_state::<KvmLab>(cache_dir)
}

fn write_state(cache_dir: &Path, state: &KvmLabState) -> Result<(), LabError> {
    recipe::write_state::<KvmLab>(cache_dir, state)
}

/// Where to ssh into the lab: root@127.0.0.1 on the forwarded port, with the lab's own
/// key and its pinned host key.
pub fn kvm_ssh_target(state: &KvmLabState) -> SshTarget {
    bringup::loopback_ssh_target(
        state.ssh_port,
        &state.ssh_key,
        &state.known_hosts,
        KVM_HOST_KEY_ALIAS,
    )
}

fn lab_transport(state: &KvmLabState) -> Transport {
    Transport::Ssh(kvm_ssh_target(state))
}

fn ssh_error(error: TransportError) -> LabError {
    LabError::Ssh {
        reason: error.to_string(),
    }
}

/// `hvbench host paging` run in the lab: its one line.
fn kvm_over_ssh(state: &KvmLabState, timeout: Duration) -> Result<String, LabError> {
    let output = lab_transport(state)
        .run(&format!("{LAB_HVBENCH} host paging"), None, timeout)
        .map_err(ssh_error)?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .ok_or_else(|| LabError::Ssh {
            reason: "`hvbench host paging` printed nothing in the lab".into(),
        })
}

/// The KVM lab: a Debian Linux host whose kvm_amd/kvm_intel hvbench may reload, with
/// hvbench in it.
#[derive(Debug, Clone, Copy)]
pub struct KvmLab;

impl Lab for KvmLab {
    const NAME: &'static str = "KVM";
    type Options = KvmLabOptions;
    type State = KvmLabState;

    fn options(cache_dir: PathBuf) -> Result<KvmLabOptions, LabError> {
        KvmLabOptions::new(cache_dir)
    }

    fn machine_mut(options: &mut KvmLabOptions) -> &mut MachineOptions {
        &mut options.machine
    }

    fn up(options: &KvmLabOptions) -> Result<KvmLabState, LabError> {
        recipe::up::<Self>(options)
    }

    fn status(cache_dir: &Path) -> Result<Option<LabStatus<KvmLabState>>, LabError> {
        recipe::status::<Self>(cache_dir)
    }

    fn down(cache_dir: &Path) -> Result<bool, LabError> {
        recipe::down::<Self>(cache_dir)
    }

    fn up_report(state: &KvmLabState) -> Vec<String> {
        let mut lines = vec![
            format!(
                "KVM lab is up (Linux {} under QEMU {}, booted in {:.1} s): {}",
                state.kernel_release, state.accel, state.boot_seconds, state.kvm_at_boot
            ),
            format!(
                "ssh:  ssh -i {} -p {} -o UserKnownHostsFile={} -o HostKeyAlias={KVM_HOST_KEY_ALIAS} root@127.0.0.1",
                state.ssh_key.display(),
                state.ssh_port,
                state.known_hosts.display(),
            ),
            "run:  hvbench lab run kvm --paging tdp|shadow --out DIR -- <hvbench run options>"
                .to_string(),
        ];
        if state.accel == "tcg" {
            lines.push(crate::TCG_CAVEAT.to_string());
        }
        lines
    }

    fn status_line(status: &LabStatus<KvmLabState>) -> String {
        format!(
            "KVM lab (Linux {}, QEMU {}), started {}, ssh port {}: QEMU {}, {}",
            status.state.kernel_release,
            status.state.accel,
            status.state.started_at,
            status.state.ssh_port,
            if status.qemu_running {
                "running"
            } else {
                "not running"
            },
            status
                .answer
                .as_deref()
                .unwrap_or("hvbench in the lab does not answer"),
        )
    }
}

impl Recipe for KvmLab {
    const STATE_FILE: &'static str = STATE_FILE;
    const PACKAGES: &'static [&'static str] = packages::KVM_LAB_PACKAGES;
    const DOWNLOAD_SIZE: &'static str = "about 75 MB, the kernel most of it";
    const READY_MARKER: &'static str = KVM_READY_MARKER;
    const BOOTED: &'static str = "Linux";
    const PROBE: &'static str = "`hvbench host paging`";
    type Stamp = BuildStamp;

    fn machine(options: &KvmLabOptions) -> &MachineOptions {
        &options.machine
    }

    fn layout(cache_dir: &Path) -> Layout {
        Layout::kvm(cache_dir)
    }

    fn validate(options: &KvmLabOptions) -> Result<(), LabError> {
        let invalid = |reason: String| Err(LabError::InvalidOptions { reason });
        if options.machine.memory_mib < 768 {
            return invalid(format!(
                "memory_mib must be at least 768 (Linux, hvbench and a guest), not {}",
                options.machine.memory_mib
            ));
        }
        if !options.hvbench.is_file() {
            return invalid(format!(
                "the hvbench binary {} does not exist",
                options.hvbench.display()
            ));
        }
        Ok(())
    }

    fn ensure_boot_files(
        layout: &Layout,
        manifest: &PackageManifest,
        options: &KvmLabOptions,
        progress: fn(&str),
    ) -> Result<BuildStamp, LabError> {
        ensure_boot_files(layout, manifest, &options.hvbench, progress)
    }

    fn booting(stamp: &BuildStamp) -> String {
        format!("Linux {}", stamp.kernel_release)
    }

    fn start_qemu(
        layout: &Layout,
        machine: &MachineOptions,
        ssh_port: u16,
    ) -> Result<u32, LabError> {
        LinuxBoot {
            kernel: &layout.kernel,
            initramfs: &layout.initramfs,
            // Under TCG every mitigation is emulated work for nothing.
            extra_append: "loglevel=4 mitigations=off",
            serial_log: &layout.serial_log,
            pid_file: &layout.pid_file,
            ssh_port,
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            accel: machine.accel,
            insns: machine
                .insns_plugin
                .as_deref()
                .map(|plugin| (plugin, layout.insns_log.as_path())),
        }
        .start()
    }

    fn new_state(booted: &Booted<'_>, stamp: BuildStamp) -> KvmLabState {
        let (layout, machine) = (booted.layout, booted.machine);
        KvmLabState {
            kind: "kvm".into(),
            qemu_pid: booted.qemu_pid,
            qemu_pid_file: layout.pid_file.clone(),
            ssh_port: booted.ssh_port,
            ssh_key: layout.client_key.clone(),
            known_hosts: layout.known_hosts.clone(),
            kernel_package: stamp.kernel_package,
            kernel_release: stamp.kernel_release,
            kvm_at_boot: String::new(),
            accel: machine.accel.as_str().into(),
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            started_at: booted.started_at.clone(),
            boot_seconds: 0.0,
            serial_log: layout.serial_log.clone(),
            hvbench: stamp.hvbench,
            insns_log: machine
                .insns_plugin
                .as_ref()
                .map(|_| layout.insns_log.clone()),
        }
    }

    fn qemu(state: &KvmLabState) -> (u32, &Path) {
        (state.qemu_pid, &state.qemu_pid_file)
    }

    fn probe(state: &KvmLabState, timeout: Duration) -> Result<String, LabError> {
        kvm_over_ssh(state, timeout)
    }

    /// Every step of the boot script is needed (network, sshd, KVM): fail at once rather
    /// than wait for an ssh that cannot come.
    fn check_boot_log(layout: &Layout) -> Result<(), LabError> {
        if bringup::serial_text(layout).contains("hvbench-lab: FAILED") {
            return Err(bringup::boot_failed(
                layout,
                "KVM",
                "the boot script reported failures",
            ));
        }
        Ok(())
    }

    fn accept(watch: &BootWatch<'_>, line: String) -> Result<String, LabError> {
        if line.starts_with("kvm_amd") || line.starts_with("kvm_intel") {
            Ok(line)
        } else {
            // Up, but without a KVM module: the boot script's FAILED lines say why.
            Err(bringup::boot_failed(
                watch.layout,
                watch.lab,
                format!("the lab has no usable KVM: {line}"),
            ))
        }
    }

    fn finish(state: &mut KvmLabState, answer: String, boot_seconds: f64) {
        state.kvm_at_boot = answer;
        state.boot_seconds = boot_seconds;
    }

    fn up_message(state: &KvmLabState, total_seconds: f64) -> String {
        format!(
            "KVM lab is up: {:.1} s from QEMU start to hvbench answering over ssh ({total_seconds:.1} s in all); {}",
            state.boot_seconds, state.kvm_at_boot
        )
    }

    /// With the current hvbench copied in if it changed.
    fn reuse(
        cache_dir: &Path,
        status: LabStatus<KvmLabState>,
        options: &KvmLabOptions,
    ) -> Result<KvmLabState, LabError> {
        let counting = |on: bool| {
            if on {
                "counting instructions"
            } else {
                "not counting"
            }
        };
        let running = counting(status.state.insns_log.is_some());
        let wanted = counting(options.machine.insns_plugin.is_some());
        if running != wanted {
            return Err(LabError::SettingsDiffer {
                lab: "KVM",
                kind: "kvm",
                running: running.into(),
                wanted: wanted.into(),
                cache_dir: cache_dir.display().to_string(),
            });
        }
        let progress = options.machine.progress;
        progress(&format!(
            "KVM lab already up (QEMU pid {}, ssh port {}): {}",
            status.state.qemu_pid,
            status.state.ssh_port,
            status.answer.as_deref().unwrap_or_default()
        ));
        let mut state = status.state;
        ensure_lab_hvbench(cache_dir, &mut state, &options.hvbench, progress)?;
        Ok(state)
    }
}

/// Kernel, keys and initramfs (with hvbench in it); rebuilt only when their inputs changed.
fn ensure_boot_files(
    layout: &Layout,
    manifest: &PackageManifest,
    hvbench: &Path,
    progress: fn(&str),
) -> Result<BuildStamp, LabError> {
    let kernel_package = manifest
        .kernel_package()
        .ok_or_else(|| LabError::Packages {
            reason: "no linux-image package among the downloads".into(),
        })?;
    let keys = bringup::ensure_keys(layout, KVM_HOST_KEY_ALIAS)?;
    let release = initramfs::kernel_release(&layout.stage_dir)?;
    let identity = BinaryIdentity::of(hvbench)?;
    let modules = LAB_MODULES.join(",");
    let expected = BuildStamp {
        format: BUILD_FORMAT,
        inputs_sha256: sha256_hex(&[
            manifest.fingerprint().as_bytes(),
            RC_SCRIPT.as_bytes(),
            initramfs::INITTAB.as_bytes(),
            modules.as_bytes(),
            &keys.host_key,
            &keys.client_public,
        ]),
        kernel_package: format!("{} {}", kernel_package.name, kernel_package.version),
        kernel_release: release.clone(),
        hvbench: identity,
    };
    let current: Option<BuildStamp> = fs::read(&layout.build_stamp)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    if current.as_ref() == Some(&expected) && layout.kernel.is_file() && layout.initramfs.is_file()
    {
        return Ok(expected);
    }

    fs::create_dir_all(&layout.boot_dir).map_err(|e| LabError::io(&layout.boot_dir, e))?;
    let _ = fs::remove_file(&layout.build_stamp);
    let kernel = layout.stage_dir.join(format!("boot/vmlinuz-{release}"));
    fs::copy(&kernel, &layout.kernel).map_err(|e| LabError::io(&kernel, e))?;

    progress(&format!(
        "building the lab's initramfs (with {})",
        hvbench.display()
    ));
    let authorized_key = String::from_utf8_lossy(&keys.client_public).into_owned();
    let summary = initramfs::build_initramfs(
        &InitramfsSpec {
            stage_dir: &layout.stage_dir,
            kernel_release: &release,
            stage_trees: &[],
            stage_files: &["usr/sbin/dropbear", "usr/bin/dropbearkey"],
            host_files: &[(LAB_HVBENCH.trim_start_matches('/'), hvbench)],
            modules: LAB_MODULES,
            rc_script: RC_SCRIPT,
            hostname: "hvbench-kvm-lab",
            authorized_key: &authorized_key,
            host_key: &keys.host_key,
        },
        &layout.initramfs,
    )?;
    progress(&format!(
        "initramfs: {} entries, {:.1} MiB, shared libraries {}, kernel modules {}",
        summary.entries,
        summary.bytes as f64 / (1024.0 * 1024.0),
        summary
            .libraries
            .iter()
            .filter_map(|l| Path::new(l)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" "),
        summary
            .modules
            .iter()
            .filter_map(|m| Path::new(m)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    packages::write_json(&layout.build_stamp, &expected)?;
    Ok(expected)
}

/// Copies `hvbench` into the running lab when it is not the binary the lab has.
fn ensure_lab_hvbench(
    cache_dir: &Path,
    state: &mut KvmLabState,
    hvbench: &Path,
    progress: fn(&str),
) -> Result<(), LabError> {
    let identity = BinaryIdentity::of(hvbench)?;
    if identity == state.hvbench {
        return Ok(());
    }
    let started = Instant::now();
    // The lab's sshd is emulated and slow (about 3 MB/s): gzip -1 (a second here) more
    // than halves the copy; busybox gunzips it in the lab.
    let (bytes, unpack) = match gzip_fast(hvbench) {
        Some(compressed) => (compressed, "gunzip -c"),
        None => (
            fs::read(hvbench).map_err(|e| LabError::io(hvbench, e))?,
            "cat",
        ),
    };
    progress(&format!(
        "copying {} ({:.1} MiB{}) into the lab: it changed since the lab was booted",
        hvbench.display(),
        bytes.len() as f64 / (1024.0 * 1024.0),
        if unpack == "cat" { "" } else { " gzipped" }
    ));
    let staging = format!("{LAB_HVBENCH}.new");
    lab_transport(state)
        .run(
            &format!(
                "{unpack} > {staging} && chmod 755 {staging} && mv -f {staging} {LAB_HVBENCH}"
            ),
            Some(&bytes),
            PUSH_TIMEOUT,
        )
        .map_err(ssh_error)?;
    progress(&format!(
        "copied in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    state.hvbench = identity;
    write_state(cache_dir, state)
}

/// `file` compressed by the host's gzip -1; None when gzip is missing or fails (the copy
/// then goes uncompressed).
fn gzip_fast(file: &Path) -> Option<Vec<u8>> {
    let gzip = super::tools::find_tool("gzip")?;
    let mut command = std::process::Command::new(gzip);
    command.arg("-1").arg("-c").arg(file);
    let output = super::tools::run_with_timeout(&mut command, None, Duration::from_secs(120))
        .ok()
        .flatten()?;
    (output.status.success() && !output.stdout.is_empty()).then_some(output.stdout)
}

/// `hvbench run` options that `lab run` sets itself, or that name things outside the lab.
const OPTIONS_LAB_RUN_OWNS: &[(&str, &str)] = &[
    ("--backend", "the lab runs --backend kvm"),
    (
        "--out",
        "give `lab run` its --out: records are copied back there",
    ),
    ("--append", "give `lab run` its --append"),
    (
        "--guest",
        "the image must be inside the lab; the embedded guest is used",
    ),
    ("--qemu", "the lab runs hvbench's own VMM"),
    ("--qemu-accel", "the lab runs hvbench's own VMM"),
    ("--qemu-cpu", "the lab runs hvbench's own VMM"),
    ("--xen-host", "the lab runs KVM"),
    (
        "--paging",
        "that is Xen's; KVM's paging is `lab run kvm --paging tdp|shadow`",
    ),
];

/// Refuses `hvbench run` arguments that `lab run` owns; Err names the option and why.
pub fn check_lab_run_args(arguments: &[String]) -> Result<(), LabError> {
    for argument in arguments {
        for (option, why) in OPTIONS_LAB_RUN_OWNS {
            if argument == option || argument.starts_with(&format!("{option}=")) {
                return Err(LabError::InvalidOptions {
                    reason: format!("{option} cannot be passed to the run in the lab: {why}"),
                });
            }
        }
    }
    Ok(())
}

/// The reproduce command of a record made in the lab, as one would run it from outside:
/// `[hvbench host paging M --] hvbench run --backend kvm ARGS --out DIR` becomes
/// `hvbench lab run kvm [--paging M] --out DIR -- ARGS`. Anything else is kept as is.
pub fn lab_reproduce(inner: &str) -> String {
    let (mode, rest) = match inner.strip_prefix("hvbench host paging ") {
        Some(after) => match after.split_once(" -- ") {
            Some((mode, rest)) => (Some(mode), rest),
            None => return inner.to_string(),
        },
        None => (None, inner),
    };
    let Some(arguments) = rest.strip_prefix("hvbench run --backend kvm") else {
        return inner.to_string();
    };
    let (arguments, out) = match arguments.rsplit_once(" --out ") {
        Some((arguments, out)) => (arguments.trim(), Some(out.trim())),
        None => (arguments.trim(), None),
    };
    let mut command = "hvbench lab run kvm".to_string();
    if let Some(mode) = mode {
        command.push_str(&format!(" --paging {mode}"));
    }
    if let Some(out) = out {
        command.push_str(&format!(" --out {out}"));
    }
    command.push_str(" --");
    if !arguments.is_empty() {
        command.push(' ');
        command.push_str(arguments);
    }
    command
}

/// Marks a record made in the lab as such: the lab in the backend's details, and a
/// reproduce command that goes through the lab.
fn relabel(record: &mut Record, state: &KvmLabState) {
    record.backend.details.extend(lab_details(state));
    record.reproduce = lab_reproduce(&record.reproduce);
}

/// How `lab run` follows a run while the lab counts (`quiet`): ssh polls would be counted.
const LAB_WATCH_COUNTING: &str = "quiet: one ssh waits in the lab's shell (builtins only) \
    until the run ends, no polls while it runs (each would be counted)";

/// What a record made in the lab says of it: the lab, and when counting instructions the
/// instruction clock and Linux on one of the CPUs (maxcpus=1).
fn lab_details(state: &KvmLabState) -> Vec<(String, String)> {
    let mut details = vec![(
        "lab".to_string(),
        format!(
            "hvbench KVM lab: Linux {} under QEMU {} ({} MiB, {} CPUs)",
            state.kernel_release, state.accel, state.memory_mib, state.cpus
        ),
    )];
    if state.insns_log.is_some() {
        details.push(("lab_clock".into(), crate::INSNS_CLOCK.into()));
        details.push(("lab_linux_cpus".into(), "1 (maxcpus=1)".into()));
        details.push(("lab_watch".into(), LAB_WATCH_COUNTING.into()));
    }
    details
}

#[derive(Debug)]
pub struct KvmLabRun<'a> {
    pub cache_dir: &'a Path,
    /// None: KVM's paging as the lab has it; else switched for this run.
    pub paging: Option<PagingMode>,
    /// `hvbench run` arguments (without --backend, --out, ...: see `check_lab_run_args`).
    pub run_args: &'a [String],
    /// Local results directory the records are copied into.
    pub out: &'a Path,
    pub append: bool,
    /// The whole run in the lab.
    pub timeout: Duration,
    /// The hvbench to run in the lab (copied in if it changed).
    pub hvbench: &'a Path,
    pub progress: fn(&str),
    pub cancel: Option<&'a AtomicBool>,
}

#[derive(Debug)]
pub struct KvmLabRunOutcome {
    /// The exit status of `hvbench run` in the lab (130 after Ctrl-C).
    pub exit_code: i32,
    pub records: usize,
    pub jsonl: PathBuf,
    pub csv: PathBuf,
    /// What the run printed on stdout (the summary table), less its lines about paths
    /// inside the lab.
    pub summary: String,
    pub interrupted: bool,
}

/// Runs `hvbench run --backend kvm` in the lab (under `hvbench host paging` when a mode is
/// asked), streaming its progress to stderr, and copies its records into `out`.
pub fn lab_run_kvm(run: &KvmLabRun<'_>) -> Result<KvmLabRunOutcome, LabError> {
    check_lab_run_args(run.run_args)?;
    let cache_dir = &bringup::absolute_cache_dir(run.cache_dir);
    let mut state = read_state(cache_dir)?
        .filter(|s| qemu::is_our_qemu(s.qemu_pid, &s.qemu_pid_file))
        .ok_or_else(|| LabError::InvalidOptions {
            reason: format!(
                "no KVM lab is up from {}: run `hvbench lab up kvm` first",
                cache_dir.display()
            ),
        })?;
    // Refuse to mix with earlier results before spending minutes in the lab.
    let writer =
        ResultsWriter::create(run.out, run.append).map_err(|e| LabError::InvalidOptions {
            reason: e.to_string(),
        })?;
    ensure_lab_hvbench(cache_dir, &mut state, run.hvbench, run.progress)?;

    let remote_run = format!(
        "{REMOTE_RUNS_DIR}/{}-{}",
        now_rfc3339().replace(':', ""),
        std::process::id()
    );
    let mut invocation = String::new();
    if let Some(mode) = run.paging {
        invocation.push_str(&format!("{LAB_HVBENCH} host paging {} -- ", mode.name()));
    }
    invocation.push_str(&format!("{LAB_HVBENCH} run --backend kvm"));
    for argument in run.run_args {
        invocation.push(' ');
        invocation.push_str(&shell_quote(argument));
    }
    if state.insns_log.is_some() {
        // The lab's QEMU counts; the run in it reads the counts through the 9p share.
        invocation.push_str(&format!(" --insns-log {LAB_INSNS_LOG}"));
    }
    invocation.push_str(&format!(" --out {remote_run}/results"));
    (run.progress)(&format!(
        "in the KVM lab (QEMU {}{}): {invocation}",
        state.accel,
        if state.accel == "tcg" {
            ", every figure an emulation artefact"
        } else {
            ""
        }
    ));

    let transport = lab_transport(&state);
    let mut copy = RecordCopy::new(writer, &state);
    let finished = run_detached(&transport, &state, &remote_run, &invocation, run, &mut copy);
    let finished = match finished {
        Ok(finished) => finished,
        Err(error) => return Err(lost_run_error(error, &copy, &remote_run, run.out)),
    };

    // The summary table; the records came back while the run went on.
    let summary: String = transport
        .run(
            &format!("cat {remote_run}/stdout 2>/dev/null; true"),
            None,
            FETCH_TIMEOUT,
        )
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_else(|error| {
            (run.progress)(&format!(
                "cannot fetch the run's summary from the lab ({error}); the records are saved"
            ));
            String::new()
        })
        .lines()
        // Paths inside the lab mean nothing here; `lab run` prints its own.
        .filter(|line| !line.starts_with("Records: "))
        .map(|line| format!("{line}\n"))
        .collect();
    // The lab's /tmp is memory: leave nothing behind.
    let _ = transport.run(&format!("rm -rf {remote_run}"), None, FETCH_TIMEOUT);
    Ok(KvmLabRunOutcome {
        exit_code: finished.exit_code,
        records: copy.records,
        jsonl: copy.writer.jsonl_path().to_path_buf(),
        csv: copy.writer.csv_path().to_path_buf(),
        summary,
        interrupted: finished.interrupted,
    })
}

/// The error of a run whose lab stopped answering (or whose records could not be
/// written): it says how many records are saved and exactly how to fetch the rest.
fn lost_run_error(
    error: LabError,
    copy: &RecordCopy<'_>,
    remote_run: &str,
    out: &Path,
) -> LabError {
    LabError::Command {
        what: "the run in the KVM lab".into(),
        detail: format!(
            "{error}. The {} record(s) measured before are saved in {}. If the lab answers \
             again, the rest is fetched (labelled as the lab's, into both files) by: \
             hvbench lab fetch kvm --run {remote_run} --offset {} --out {}; \
             `hvbench lab down kvm` stops the lab",
            copy.records,
            out.display(),
            copy.offset,
            shell_quote(&out.to_string_lossy()),
        ),
    }
}

/// `hvbench lab fetch kvm`: the records of a run whose lab went silent, from where the
/// copy stopped.
#[derive(Debug)]
pub struct KvmLabFetch<'a> {
    pub cache_dir: &'a Path,
    /// The run's directory in the lab, as the lost run's error names it.
    pub remote_run: &'a str,
    /// Bytes of its results.jsonl already copied.
    pub offset: u64,
    /// The local results directory the run was copying into (appended to).
    pub out: &'a Path,
    pub progress: fn(&str),
}

/// Copies the rest of a lost run's records (whole lines after `offset`), relabelled, into
/// `out`; returns how many. The run's directory in the lab is left for the user.
pub fn lab_fetch_kvm(fetch: &KvmLabFetch<'_>) -> Result<usize, LabError> {
    let name = fetch
        .remote_run
        .strip_prefix(REMOTE_RUNS_DIR)
        .and_then(|r| r.strip_prefix('/'));
    let plain = name.is_some_and(|n| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    });
    if !plain {
        return Err(LabError::InvalidOptions {
            reason: format!(
                "--run {:?} is not a run directory of the lab (a name under {REMOTE_RUNS_DIR})",
                fetch.remote_run
            ),
        });
    }
    let cache_dir = &bringup::absolute_cache_dir(fetch.cache_dir);
    let state = read_state(cache_dir)?.ok_or_else(|| LabError::InvalidOptions {
        reason: format!("no KVM lab is up from {}", cache_dir.display()),
    })?;
    let writer = ResultsWriter::create(fetch.out, true).map_err(|e| LabError::InvalidOptions {
        reason: e.to_string(),
    })?;
    let mut copy = RecordCopy::new(writer, &state);
    copy.offset = fetch.offset;
    let rest = lab_transport(&state)
        .run(
            &format!(
                "tail -c +{} {}/results/results.jsonl",
                fetch.offset.saturating_add(1),
                fetch.remote_run
            ),
            None,
            FETCH_TIMEOUT,
        )
        .map_err(ssh_error)?;
    copy.take(&rest.stdout, &|m| (fetch.progress)(m))
}

/// Copies the records of the lab's results.jsonl into the local results while the run
/// goes on: whole lines only (a line still being written waits for the next poll), each
/// exactly once, relabelled as made in the lab. What was measured before the lab went
/// silent is then already here.
struct RecordCopy<'a> {
    writer: ResultsWriter,
    state: &'a KvmLabState,
    /// Bytes of the remote results.jsonl consumed: whole lines, copied or reported.
    offset: u64,
    records: usize,
}

impl<'a> RecordCopy<'a> {
    fn new(writer: ResultsWriter, state: &'a KvmLabState) -> Self {
        Self {
            writer,
            state,
            offset: 0,
            records: 0,
        }
    }

    /// `bytes`: the remote file from `self.offset` on. Writes the record of every whole
    /// line and moves past it; a line that is not a record is reported through `warn`
    /// and skipped, so one bad line loses nothing else. Err only when the local results
    /// cannot be written (the offset then stays at the line that failed).
    fn take(&mut self, bytes: &[u8], warn: &dyn Fn(&str)) -> Result<usize, LabError> {
        let mut written = 0;
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                match serde_json::from_slice::<Record>(line) {
                    Ok(mut record) => {
                        relabel(&mut record, self.state);
                        self.writer.write(&record).map_err(|e| LabError::Command {
                            what: "writing the records copied from the lab".into(),
                            detail: e.to_string(),
                        })?;
                        self.records += 1;
                        written += 1;
                    }
                    Err(e) => warn(&format!(
                        "skipped a line of the lab's results.jsonl at byte {} that is not a \
                         record: {e}",
                        self.offset
                    )),
                }
            }
            self.offset = self.offset.saturating_add(end as u64 + 1);
            rest = &rest[end + 1..];
        }
        Ok(written)
    }
}

struct Finished {
    exit_code: i32,
    interrupted: bool,
}

/// Separates the exit status from the rest in a poll's output.
const POLL_SEPARATOR: &str = "@@hvbench-lab-poll@@";

/// What one poll of a detached run found.
#[derive(Debug, PartialEq)]
struct Poll {
    /// The run's exit status, once it has one.
    status: Option<i32>,
    /// The remote results.jsonl from the offset asked for to its size when polled.
    records: Vec<u8>,
    /// The stderr bytes after the offset asked for.
    stderr: Vec<u8>,
}

/// The shell command of one poll. The status is read before the results' size: once the
/// run has a status, the records in the same answer are all it wrote.
fn poll_command(remote_run: &str, records_offset: u64, stderr_offset: usize) -> String {
    format!(
        "cd {remote_run} 2>/dev/null; cat status 2>/dev/null; echo; echo {POLL_SEPARATOR}; \
         n=$(( $(wc -c < results/results.jsonl 2>/dev/null || echo 0) + 0 )); echo $n; \
         if [ $n -gt {records_offset} ]; then tail -c +{} results/results.jsonl | \
         head -c $(( n - {records_offset} )); fi; tail -c +{} stderr 2>/dev/null",
        records_offset.saturating_add(1),
        stderr_offset.saturating_add(1)
    )
}

/// Parses the answer to `poll_command(_, records_offset, _)`: `STATUS\n@@SEP@@\nSIZE\n`,
/// then `SIZE - records_offset` bytes of records, then stderr. None when the answer is
/// cut short or malformed (the poll is then as good as unanswered).
fn parse_poll(output: &[u8], records_offset: u64) -> Option<Poll> {
    let separator = format!("\n{POLL_SEPARATOR}\n");
    let at = output
        .windows(separator.len())
        .position(|window| window == separator.as_bytes())?;
    let status = String::from_utf8_lossy(&output[..at]).trim().parse().ok();
    let after = &output[at + separator.len()..];
    let size_end = after.iter().position(|&b| b == b'\n')?;
    let size: u64 = std::str::from_utf8(&after[..size_end])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let body = &after[size_end + 1..];
    let records_len = usize::try_from(size.saturating_sub(records_offset)).ok()?;
    if body.len() < records_len {
        return None;
    }
    Some(Poll {
        status,
        records: body[..records_len].to_vec(),
        stderr: body[records_len..].to_vec(),
    })
}

/// Starts `invocation` in the lab detached from the ssh session (its own session, output
/// to files under `remote_run`), then polls it over short ssh connections, copying its
/// stderr to ours and its records into `copy` as they grow, until it has an exit status.
/// A TCG lab on a loaded host can stall an ssh session past its keep-alive limit; a
/// detached run does not care, and polls are retried. Ctrl-C is passed on as SIGINT;
/// past `run.timeout` the run is stopped the same way.
fn run_detached(
    transport: &Transport,
    state: &KvmLabState,
    remote_run: &str,
    invocation: &str,
    run: &KvmLabRun<'_>,
    copy: &mut RecordCopy<'_>,
) -> Result<Finished, LabError> {
    // Counting: every poll would be counted in the lab's one CPU (see `quiet`).
    let quiet_wait = state
        .insns_log
        .as_ref()
        .map(|_| quiet::wait_bound(lab_silence_limit()));
    launch(transport, remote_run, invocation, quiet_wait)?;
    let mut watch = Watch::new(run);
    loop {
        watch.stop_if_asked(transport, remote_run, run)?;
        if !qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file) {
            return Err(LabError::Command {
                what: "the run in the KVM lab".into(),
                detail: format!(
                    "the lab's QEMU exited (serial log {})",
                    state.serial_log.display()
                ),
            });
        }
        if let Some(finished) = watch.poll(transport, remote_run, run, copy)? {
            return Ok(finished);
        }
        match quiet_wait {
            Some(bound) => watch.wait_quietly(transport, remote_run, bound),
            None => thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Starts `invocation` in the lab, detached from the ssh session, in `remote_run`: its
/// output, pid and exit status go to files there. With `quiet_wait`, the same ssh session
/// then waits quietly (see `quiet`) for up to that long; should it fail, the run counts as
/// started when its directory exists.
fn launch(
    transport: &Transport,
    remote_run: &str,
    invocation: &str,
    quiet_wait: Option<Duration>,
) -> Result<(), LabError> {
    let script = format!(
        "{invocation} > stdout 2> stderr < /dev/null & echo $! > pid; wait $!; \
         echo $? > status.tmp; mv status.tmp status; {}",
        quiet::wake_command()
    );
    let mut command = format!(
        "mkdir -p {remote_run} && cd {remote_run} && mkfifo {} && \
         {{ setsid sh -c {} > /dev/null 2>&1 < /dev/null & }}",
        quiet::DONE_FIFO,
        shell_quote(&script)
    );
    let Some(bound) = quiet_wait else {
        transport
            .run(&command, None, FETCH_TIMEOUT)
            .map_err(ssh_error)?;
        return Ok(());
    };
    command.push_str(" && ");
    command.push_str(&quiet::lab_wait_command(remote_run, bound));
    match transport.run(&command, None, FETCH_TIMEOUT + bound) {
        Ok(_) => Ok(()),
        Err(error) => match transport.run(&format!("test -d {remote_run}"), None, FETCH_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(_) => Err(ssh_error(error)),
        },
    }
}

/// What the host knows of a detached run while it polls it.
struct Watch {
    deadline: Instant,
    interrupt_sent: bool,
    interrupted: bool,
    timed_out: bool,
    stderr_offset: usize,
    /// The run's stderr after its last complete line.
    partial_line: Vec<u8>,
    last_answer: Instant,
    silence_limit: Duration,
}

impl Watch {
    fn new(run: &KvmLabRun<'_>) -> Self {
        Watch {
            deadline: Instant::now() + run.timeout,
            interrupt_sent: false,
            interrupted: false,
            timed_out: false,
            stderr_offset: 0,
            partial_line: Vec::new(),
            last_answer: Instant::now(),
            silence_limit: lab_silence_limit(),
        }
    }

    /// Waits without polling (see `quiet`) until the run has a status or `bound` passed;
    /// a wait that ends normally is an answer from the lab.
    fn wait_quietly(&mut self, transport: &Transport, remote_run: &str, bound: Duration) {
        if self.interrupted || self.timed_out {
            thread::sleep(POLL_INTERVAL);
            return;
        }
        let command = quiet::lab_wait_command(remote_run, bound);
        let timeout = bound + poll_timeout(self.silence_limit);
        if transport.run(&command, None, timeout).is_ok() {
            self.last_answer = Instant::now();
        }
    }

    /// On Ctrl-C or past the run's limit, asks the run in the lab to stop (SIGINT: it
    /// saves its records) and gives it `INTERRUPT_GRACE`; an error once that has passed.
    fn stop_if_asked(
        &mut self,
        transport: &Transport,
        remote_run: &str,
        run: &KvmLabRun<'_>,
    ) -> Result<(), LabError> {
        if !self.interrupted && check_cancelled(run.cancel).is_err() {
            self.interrupted = true;
            (run.progress)("interrupted: asking the run in the lab to stop and save its records");
            self.deadline = self.deadline.min(Instant::now() + INTERRUPT_GRACE);
        }
        if !self.timed_out && Instant::now() >= self.deadline && !self.interrupted {
            self.timed_out = true;
            (run.progress)(&format!(
                "the run in the lab took longer than {} s: stopping it",
                run.timeout.as_secs()
            ));
            self.deadline = Instant::now() + INTERRUPT_GRACE;
        }
        let stopping = self.interrupted || self.timed_out;
        if stopping && !self.interrupt_sent {
            // The pid file may not be written yet: tried again on the next round.
            self.interrupt_sent = transport
                .run(
                    &format!("kill -INT $(cat {remote_run}/pid)"),
                    None,
                    FETCH_TIMEOUT,
                )
                .is_ok();
        }
        if stopping && Instant::now() >= self.deadline {
            return Err(LabError::Command {
                what: "the run in the KVM lab".into(),
                detail: format!(
                    "it did not stop within {} s of SIGINT; it may still run in the lab ({remote_run})",
                    INTERRUPT_GRACE.as_secs()
                ),
            });
        }
        Ok(())
    }

    /// One poll: new records copied, new stderr lines shown; the run's end once it has
    /// one. A lab silent for longer than the limit is an error.
    fn poll(
        &mut self,
        transport: &Transport,
        remote_run: &str,
        run: &KvmLabRun<'_>,
        copy: &mut RecordCopy<'_>,
    ) -> Result<Option<Finished>, LabError> {
        let command = poll_command(remote_run, copy.offset, self.stderr_offset);
        let answer = transport
            .run(&command, None, poll_timeout(self.silence_limit))
            .map_err(|e| e.to_string())
            .and_then(|output| {
                parse_poll(&output.stdout, copy.offset).ok_or_else(|| {
                    format!(
                        "unexpected answer {:?}",
                        String::from_utf8_lossy(&output.stdout)
                    )
                })
            });
        let poll = match answer {
            Ok(poll) => poll,
            Err(last_error) if self.last_answer.elapsed() > self.silence_limit => {
                return Err(LabError::Ssh {
                    reason: format!(
                        "the lab has not answered for {} s (last error: {last_error}); the \
                         run may still be going there ({remote_run})",
                        self.silence_limit.as_secs()
                    ),
                });
            }
            Err(_) => return Ok(None),
        };
        self.last_answer = Instant::now();
        copy.take(&poll.records, &|m| (run.progress)(m))?;
        self.show_stderr(&poll.stderr, poll.status.is_some());
        let Some(code) = poll.status else {
            return Ok(None);
        };
        if self.timed_out {
            return Err(LabError::Command {
                what: "the run in the KVM lab".into(),
                detail: format!(
                    "it took longer than {} s and was stopped (exit status {code})",
                    run.timeout.as_secs()
                ),
            });
        }
        Ok(Some(Finished {
            exit_code: code,
            interrupted: self.interrupted,
        }))
    }

    /// Shows the run's stderr a whole line at a time (the rest too, at its end).
    fn show_stderr(&mut self, bytes: &[u8], ended: bool) {
        self.stderr_offset += bytes.len();
        self.partial_line.extend_from_slice(bytes);
        while let Some(end) = self.partial_line.iter().position(|&b| b == b'\n') {
            hostutil::say!(
                "[lab] {}",
                String::from_utf8_lossy(&self.partial_line[..end])
            );
            self.partial_line.drain(..=end);
        }
        if ended && !self.partial_line.is_empty() {
            hostutil::say!("[lab] {}", String::from_utf8_lossy(&self.partial_line));
            self.partial_line.clear();
        }
    }
}

/// One poll's ssh: a quarter of the silence limit, 5 to 30 s, so a poll that hangs on a
/// stalled lab is retried several times before the run is given up.
fn poll_timeout(silence_limit: Duration) -> Duration {
    (silence_limit / 4).clamp(Duration::from_secs(5), Duration::from_secs(30))
}

/// How long the lab may stay silent before a run is given up: `LAB_SILENCE_LIMIT`, or
/// `HVBENCH_LAB_SILENCE_S` seconds (1 to 3600; the tests use a short one).
fn lab_silence_limit() -> Duration {
    std::env::var("HVBENCH_LAB_SILENCE_S")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .map(Duration::from_secs)
        .unwrap_or(LAB_SILENCE_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state(cache_dir: &Path) -> KvmLabState {
        KvmLabState {
            kind: "kvm".into(),
            qemu_pid: u32::MAX,
            qemu_pid_file: cache_dir.join("kvm/run/qemu.pid"),
            ssh_port: 10023,
            ssh_key: cache_dir.join("kvm/keys/id_ed25519"),
            known_hosts: cache_dir.join("kvm/keys/known_hosts"),
            kernel_package: "linux-image-6.1.0-56-amd64 6.1.192-2".into(),
            kernel_release: "6.1.0-56-amd64".into(),
            kvm_at_boot: "kvm_amd: npt (npt=Y), not in use".into(),
            accel: "tcg".into(),
            memory_mib: 1536,
            cpus: 2,
            started_at: "2026-11-26T05:00:00Z".into(),
            boot_seconds: 9.0,
            serial_log: cache_dir.join("kvm/run/serial.log"),
            hvbench: BinaryIdentity {
                path: "/x/hvbench".into(),
                size: 1,
                modified_unix_ns: 2,
            },
            insns_log: None,
        }
    }

    #[test]
    fn records_of_a_counting_lab_name_its_clock_and_cpus() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample_state(dir.path());
        let keys = |state: &KvmLabState| -> Vec<String> {
            lab_details(state).into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys(&plain), ["lab"]);
        let counting = KvmLabState {
            insns_log: Some(dir.path().join("kvm/run/insns/insns.log")),
            ..plain
        };
        let details = lab_details(&counting);
        assert_eq!(
            keys(&counting),
            ["lab", "lab_clock", "lab_linux_cpus", "lab_watch"]
        );
        assert!(details[1].1.contains("-icount shift=0"), "{details:?}");
    }

    #[test]
    fn state_round_trips_and_a_dead_lab_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        assert!(KvmLab::status(dir.path()).unwrap().is_none());
        let state = sample_state(dir.path());
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(state));
        let status = KvmLab::status(dir.path()).unwrap().unwrap();
        assert!(!status.qemu_running && status.answer.is_none() && !status.healthy());
        assert!(!KvmLab::down(dir.path()).unwrap());
        assert!(KvmLab::status(dir.path()).unwrap().is_none());
    }

    #[test]
    fn down_never_kills_a_foreign_pid_and_survives_a_corrupt_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample_state(dir.path());
        state.qemu_pid = std::process::id();
        write_state(dir.path(), &state).unwrap();
        assert!(!KvmLab::down(dir.path()).unwrap());
        fs::write(recipe::state_path::<KvmLab>(dir.path()), "{not json").unwrap();
        assert!(matches!(
            KvmLab::status(dir.path()),
            Err(LabError::State { .. })
        ));
        assert!(!KvmLab::down(dir.path()).unwrap());
    }

    #[test]
    fn the_kvm_lab_keeps_apart_from_the_xen_lab() {
        let kvm = Layout::kvm(Path::new("/c"));
        let xen = Layout::xen(Path::new("/c"));
        assert_eq!(kvm.debs_dir, PathBuf::from("/c/kvm/debs"));
        assert_eq!(kvm.apt_dir, PathBuf::from("/c/kvm/apt"));
        assert_eq!(kvm.lock_file, PathBuf::from("/c/kvm-lab.lock"));
        assert_ne!(kvm.pid_file, xen.pid_file);
        assert_ne!(kvm.stage_dir, xen.stage_dir);
        assert_eq!(xen.debs_dir, PathBuf::from("/c/debs"));
        assert_eq!(
            recipe::state_path::<KvmLab>(Path::new("/c")),
            PathBuf::from("/c/kvm-lab.json")
        );
    }

    #[test]
    fn options_lab_run_owns_are_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_lab_run_args(&args(&["-w", "mem.*", "--samples", "3"])).unwrap();
        for bad in [
            &["--out", "x"][..],
            &["--out=x"],
            &["--backend", "qemu"],
            &["--guest", "g.elf"],
            &["--paging", "shadow"],
            &["--append"],
        ] {
            let error = check_lab_run_args(&args(bad)).unwrap_err().to_string();
            assert!(error.contains(bad[0].split('=').next().unwrap()), "{error}");
        }
    }

    #[test]
    fn polls_parse() {
        let running = format!("\n{POLL_SEPARATOR}\n0\nhvbench: 2 workload(s)\nhalf");
        assert_eq!(
            parse_poll(running.as_bytes(), 0),
            Some(Poll {
                status: None,
                records: Vec::new(),
                stderr: b"hvbench: 2 workload(s)\nhalf".to_vec(),
            })
        );
        // 11 bytes of records after the 4 already copied, then stderr.
        let ended = format!("130\n\n{POLL_SEPARATOR}\n15\n{{\"a\":1}}\n{{\"bdone\n");
        assert_eq!(
            parse_poll(ended.as_bytes(), 4),
            Some(Poll {
                status: Some(130),
                records: b"{\"a\":1}\n{\"b".to_vec(),
                stderr: b"done\n".to_vec(),
            })
        );
        // Cut short: fewer record bytes than the size says; no size; garbage.
        let cut = format!("\n{POLL_SEPARATOR}\n100\n{{\"a\"");
        assert_eq!(parse_poll(cut.as_bytes(), 0), None);
        assert_eq!(
            parse_poll(format!("\n{POLL_SEPARATOR}\n").as_bytes(), 0),
            None
        );
        assert_eq!(parse_poll(b"garbage", 0), None);
    }

    #[test]
    fn the_poll_command_asks_from_the_offsets() {
        let command = poll_command("/tmp/r", 41, 7);
        assert!(
            command.contains("tail -c +42 results/results.jsonl"),
            "{command}"
        );
        assert!(command.contains("head -c $(( n - 41 ))"), "{command}");
        assert!(command.contains("tail -c +8 stderr"), "{command}");
        // The status is read before the size of the results.
        assert!(
            command.find("cat status") < command.find("wc -c"),
            "{command}"
        );
    }

    fn jsonl_line(workload: &str) -> String {
        let record = reports::synthetic::record("kvm", workload, &[1.0, 2.0, 3.0]);
        format!("{}\n", serde_json::to_string(&record).unwrap())
    }

    /// Feeds `remote` to a copy the way polls do: each poll sees the file from the
    /// copy's offset to `cuts[i]` bytes (a growing file, cut anywhere).
    fn copy_in_polls(out: &Path, state: &KvmLabState, remote: &[u8], cuts: &[usize]) -> usize {
        let writer = ResultsWriter::create(out, false).unwrap();
        let mut copy = RecordCopy::new(writer, state);
        let warnings = std::cell::Cell::new(0);
        for &cut in cuts {
            let from = usize::try_from(copy.offset).unwrap();
            copy.take(&remote[from..cut], &|_| warnings.set(warnings.get() + 1))
                .unwrap();
        }
        assert_eq!(
            copy.offset,
            remote.len() as u64,
            "every whole line consumed"
        );
        warnings.get()
    }

    #[test]
    fn records_are_copied_once_each_and_a_torn_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample_state(dir.path());
        let lines = [
            jsonl_line("cpu.idle"),
            jsonl_line("cpu.cpuid"),
            jsonl_line("mem.tlb-chase"),
        ];
        let remote = lines.concat().into_bytes();
        let first = lines[0].len();
        // Polls: nothing yet; half of the first line; the first line and half of the
        // second; the same again (nothing new); all of it; all of it again.
        let cuts = [
            0,
            first / 2,
            first + 10,
            first + 10,
            remote.len(),
            remote.len(),
        ];
        let out = dir.path().join("out");
        assert_eq!(copy_in_polls(&out, &state, &remote, &cuts), 0);
        let records = reports::read_results(&out).unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.workload.as_str()).collect();
        assert_eq!(names, ["cpu.idle", "cpu.cpuid", "mem.tlb-chase"]);
        assert!(records.iter().all(|r| r
            .backend
            .details
            .get("lab")
            .is_some_and(|l| l.contains("KVM lab"))));
    }

    #[test]
    fn a_line_that_is_no_record_is_reported_and_loses_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample_state(dir.path());
        let remote = [
            jsonl_line("cpu.idle"),
            "{not a record\n\n".to_string(),
            jsonl_line("cpu.hlt"),
        ]
        .concat()
        .into_bytes();
        let out = dir.path().join("out");
        assert_eq!(copy_in_polls(&out, &state, &remote, &[remote.len()]), 1);
        let records = reports::read_results(&out).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].workload, "cpu.hlt");
    }

    #[test]
    fn a_lost_run_says_what_is_saved_and_how_to_fetch_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample_state(dir.path());
        let out = dir.path().join("out");
        let mut copy = RecordCopy::new(ResultsWriter::create(&out, false).unwrap(), &state);
        let line = jsonl_line("cpu.idle");
        copy.take(line.as_bytes(), &|_| {}).unwrap();
        let error = lost_run_error(
            LabError::Ssh {
                reason: "the lab has not answered for 180 s".into(),
            },
            &copy,
            "/tmp/hvbench-lab-runs/x",
            &out,
        )
        .to_string();
        assert!(
            error.contains("The 1 record(s) measured before are saved"),
            "{error}"
        );
        assert!(
            error.contains(&format!(
                "hvbench lab fetch kvm --run /tmp/hvbench-lab-runs/x --offset {} --out {}",
                line.len(),
                shell_quote(&out.to_string_lossy())
            )),
            "{error}"
        );
    }

    #[test]
    fn fetch_refuses_a_run_outside_the_labs_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        for run in [
            "/etc",
            "/tmp/hvbench-lab-runs/",
            "/tmp/hvbench-lab-runs/x;rm -rf /",
            "/tmp/hvbench-lab-runs/../x",
        ] {
            let error = lab_fetch_kvm(&KvmLabFetch {
                cache_dir: dir.path(),
                remote_run: run,
                offset: 0,
                out: &dir.path().join("out"),
                progress: |_| {},
            })
            .unwrap_err()
            .to_string();
            assert!(
                error.contains("is not a run directory of the lab"),
                "{run}: {error}"
            );
        }
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn reproduce_commands_go_through_the_lab() {
        assert_eq!(
            lab_reproduce(
                "hvbench host paging shadow -- hvbench run --backend kvm --workload mem.pt-update \
                 --samples 3 --memory-mib 64 --out hvbench-reproduce-mem.pt-update"
            ),
            "hvbench lab run kvm --paging shadow --out hvbench-reproduce-mem.pt-update -- \
             --workload mem.pt-update --samples 3 --memory-mib 64"
        );
        assert_eq!(
            lab_reproduce("hvbench run --backend kvm --workload cpu.cpuid --out o"),
            "hvbench lab run kvm --out o -- --workload cpu.cpuid"
        );
        assert_eq!(
            lab_reproduce("hvbench run --backend xen --out o"),
            "hvbench run --backend xen --out o"
        );
    }

    #[test]
    fn small_machines_and_missing_binaries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = KvmLabOptions::new(dir.path()).unwrap();
        assert!(
            recipe::validate::<KvmLab>(&options).is_ok(),
            "the test binary itself is a file"
        );
        options.machine.memory_mib = 256;
        assert!(recipe::validate::<KvmLab>(&options).is_err());
        options.machine.memory_mib = 1536;
        options.machine.ssh_port = Some(0);
        assert!(recipe::validate::<KvmLab>(&options).is_err());
        options.machine.ssh_port = None;
        options.hvbench = dir.path().join("missing");
        assert!(recipe::validate::<KvmLab>(&options).is_err());
    }

    #[test]
    fn a_run_needs_a_lab() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let error = lab_run_kvm(&KvmLabRun {
            cache_dir: dir.path(),
            paging: Some(PagingMode::Shadow),
            run_args: &[],
            out: &out,
            append: false,
            timeout: Duration::from_secs(10),
            hvbench: Path::new("/bin/true"),
            progress: |_| {},
            cancel: None,
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("hvbench lab up kvm"), "{error}");
        assert!(!out.exists(), "nothing written without a lab");
    }
}

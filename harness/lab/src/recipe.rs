//! One bring-up for every lab. A lab is a [`Recipe`]: the Debian packages it is built
//! from, its boot files (kernel, initramfs, and whatever else boots), how QEMU boots them,
//! the serial line that says the boot script is done, and the question over ssh that says
//! the lab is ready. [`up`], [`status`] and [`down`] do the rest the same way for each:
//! the cache and its lock, downloads, keys, QEMU on a free loopback port, the boot watch,
//! the state file. Every recipe is a [`Lab`], the public face the CLI drives, whose `up`, `status`
//! and `down` are the ones here.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bringup::{self, check_cancelled, now_rfc3339, open_cache, BootWatch, Layout};
use crate::packages::{self, PackageManifest};
use crate::{progress_to_stderr, qemu, LabAccel, LabError};

/// How long `status` waits for the lab's answer over ssh.
const STATUS_SSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The emulated machine every lab runs on, and how its bring-up reports and stops.
#[derive(Debug)]
pub struct MachineOptions {
    /// Downloads, builds, keys, logs and the state file live here.
    pub cache_dir: PathBuf,
    /// The emulated machine's memory.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Host port on 127.0.0.1 forwarded to the lab's sshd; None picks a free one.
    pub ssh_port: Option<u16>,
    pub accel: LabAccel,
    /// From QEMU's start to the lab answering over ssh.
    pub boot_timeout: Duration,
    pub progress: fn(&str),
    /// When set (e.g. by a Ctrl-C handler), bring-up stops and its QEMU is killed.
    pub cancel: Option<&'static AtomicBool>,
    /// The hvbench-insns QEMU plugin (TCG only): load it, and count instructions per
    /// operation into the lab's `run/insns.log`.
    pub insns_plugin: Option<PathBuf>,
    /// When a lab with other settings (hypervisor, plugin) is up: stop it and boot the
    /// one asked for, instead of refusing.
    pub replace: bool,
}

impl MachineOptions {
    /// Two CPUs under TCG, a free port, 300 s to boot, progress on stderr.
    pub fn new(cache_dir: impl Into<PathBuf>, memory_mib: u32) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            memory_mib,
            cpus: 2,
            ssh_port: None,
            accel: LabAccel::Tcg,
            boot_timeout: Duration::from_secs(300),
            progress: progress_to_stderr,
            cancel: None,
            insns_plugin: None,
            replace: false,
        }
    }
}

/// A lab's saved state and its health now.
#[derive(Debug, Clone, PartialEq)]
pub struct LabStatus<S> {
    pub state: S,
    /// The pid is alive, not a zombie, and its command line is our QEMU's.
    pub qemu_running: bool,
    /// What the lab's readiness question answered over ssh (Xen: `xl info`'s
    /// xen_version; KVM: `hvbench host paging`'s line); None when it did not answer.
    pub answer: Option<String>,
}

impl<S> LabStatus<S> {
    pub fn healthy(&self) -> bool {
        self.qemu_running && self.answer.is_some()
    }
}

/// One kind of lab, as the CLI drives it: `lab up|status|down`.
pub trait Lab {
    /// "Xen" or "KVM", as messages name the lab.
    const NAME: &'static str;
    /// What `up` takes: the machine, and what this lab needs besides.
    type Options: fmt::Debug;
    /// What a running lab saves in its state file.
    type State: fmt::Debug + Clone;

    /// This lab's defaults, from `cache_dir`.
    fn options(cache_dir: PathBuf) -> Result<Self::Options, LabError>;
    fn machine_mut(options: &mut Self::Options) -> &mut MachineOptions;
    /// Brings the lab up, or returns the one already up and healthy.
    fn up(options: &Self::Options) -> Result<Self::State, LabError>;
    /// The lab's state and health; None when none was brought up from `cache_dir`.
    fn status(cache_dir: &Path) -> Result<Option<LabStatus<Self::State>>, LabError>;
    /// Stops the lab's QEMU (SIGTERM, then SIGKILL) and forgets its state. True if one
    /// was running. Also stops a QEMU left by a bring-up killed before saving its state.
    fn down(cache_dir: &Path) -> Result<bool, LabError>;
    /// What `lab up` tells the user: the lab, how to ssh in, how to use it.
    fn up_report(state: &Self::State) -> Vec<String>;
    /// `lab status` in one line.
    fn status_line(status: &LabStatus<Self::State>) -> String;
}

/// What QEMU booted, for a recipe to make its state from.
pub(crate) struct Booted<'a> {
    pub layout: &'a Layout,
    pub machine: &'a MachineOptions,
    pub qemu_pid: u32,
    pub ssh_port: u16,
    pub started_at: String,
}

/// One lab, described: a third lab is one more implementation of this (and of [`Lab`],
/// whose `up`, `status` and `down` are this module's).
pub(crate) trait Recipe: Lab<State: Serialize + DeserializeOwned> {
    /// Its state file, in the cache directory.
    const STATE_FILE: &'static str;
    /// The Debian packages it is built from, and their size for the person waiting.
    const PACKAGES: &'static [&'static str];
    const DOWNLOAD_SIZE: &'static str;
    /// The serial line the boot script prints when it is done, and what prints it.
    const READY_MARKER: &'static str;
    const BOOTED: &'static str;
    /// The readiness question over ssh, as messages name it.
    const PROBE: &'static str;
    /// What the build of the boot files recorded.
    type Stamp;

    fn machine(options: &Self::Options) -> &MachineOptions;
    /// Where its files live under the cache directory.
    fn layout(cache_dir: &Path) -> Layout;
    /// Its own checks of the options (`up` checks the machine's common ones).
    fn validate(options: &Self::Options) -> Result<(), LabError>;
    /// Kernel, initramfs and the rest, rebuilt only when their inputs changed.
    fn ensure_boot_files(
        layout: &Layout,
        manifest: &PackageManifest,
        options: &Self::Options,
        progress: fn(&str),
    ) -> Result<Self::Stamp, LabError>;
    /// What boots, for the person waiting ("Xen", "Linux 6.1.0-...").
    fn booting(stamp: &Self::Stamp) -> String;
    /// Starts QEMU on the boot files with the lab's sshd forwarded from `ssh_port`.
    fn start_qemu(
        layout: &Layout,
        machine: &MachineOptions,
        ssh_port: u16,
    ) -> Result<u32, LabError>;
    /// The state of the lab just booted (its answer not yet known).
    fn new_state(booted: &Booted<'_>, stamp: Self::Stamp) -> Self::State;
    /// QEMU's pid and pid file, from the state.
    fn qemu(state: &Self::State) -> (u32, &Path);
    /// The readiness question over ssh; `LabError::Ssh` when the lab did not answer.
    fn probe(state: &Self::State, timeout: Duration) -> Result<String, LabError>;
    /// After the ready marker: what the serial log says about the boot script.
    fn check_boot_log(_layout: &Layout) -> Result<(), LabError> {
        Ok(())
    }
    /// The answer, if it is one this lab can be used with.
    fn accept(_watch: &BootWatch<'_>, answer: String) -> Result<String, LabError> {
        Ok(answer)
    }
    /// Records the answer and the boot time in the state.
    fn finish(state: &mut Self::State, answer: String, boot_seconds: f64);
    /// The last progress line of a bring-up.
    fn up_message(state: &Self::State, total_seconds: f64) -> String;
    /// The lab already up and healthy, as `up` returns it.
    fn reuse(
        cache_dir: &Path,
        status: LabStatus<Self::State>,
        options: &Self::Options,
    ) -> Result<Self::State, LabError>;
}

pub(crate) fn state_path<R: Recipe>(cache_dir: &Path) -> PathBuf {
    cache_dir.join(R::STATE_FILE)
}

pub(crate) fn read_state<R: Recipe>(cache_dir: &Path) -> Result<Option<R::State>, LabError> {
    Ok(hostutil::statefile::read_json(&state_path::<R>(cache_dir))?)
}

pub(crate) fn write_state<R: Recipe>(cache_dir: &Path, state: &R::State) -> Result<(), LabError> {
    packages::write_json(&state_path::<R>(cache_dir), state)
}

/// The lab's state and health; None when none was brought up from `cache_dir`.
pub(crate) fn status<R: Recipe>(cache_dir: &Path) -> Result<Option<LabStatus<R::State>>, LabError> {
    let cache_dir = &bringup::absolute_cache_dir(cache_dir);
    let Some(state) = read_state::<R>(cache_dir)? else {
        return Ok(None);
    };
    let (pid, pid_file) = R::qemu(&state);
    let qemu_running = qemu::is_our_qemu(pid, pid_file);
    let answer = if qemu_running {
        R::probe(&state, STATUS_SSH_TIMEOUT).ok()
    } else {
        None
    };
    Ok(Some(LabStatus {
        state,
        qemu_running,
        answer,
    }))
}

/// Stops the lab's QEMU and forgets its state; true if one was running.
pub(crate) fn down<R: Recipe>(cache_dir: &Path) -> Result<bool, LabError> {
    let cache_dir = &bringup::absolute_cache_dir(cache_dir);
    bringup::stop_lab(cache_dir, &state_path::<R>(cache_dir), R::layout)
}

/// The lab's own checks of its options, then the machine's.
pub(crate) fn validate<R: Recipe>(options: &R::Options) -> Result<(), LabError> {
    R::validate(options)?;
    let machine = R::machine(options);
    if machine.insns_plugin.is_some() && machine.accel != LabAccel::Tcg {
        return Err(LabError::InvalidOptions {
            reason: "the instruction-count plugin is a TCG plugin: it needs --accel tcg".into(),
        });
    }
    bringup::check_machine(machine.cpus, machine.ssh_port, machine.accel)
}

/// Brings the lab up, or returns the one already up and healthy.
pub(crate) fn up<R: Recipe>(options: &R::Options) -> Result<R::State, LabError> {
    validate::<R>(options)?;
    let machine = R::machine(options);
    let progress = machine.progress;
    let cache = open_cache(&machine.cache_dir, R::layout, progress)?;
    let (cache_dir, layout) = (&cache.dir, &cache.layout);

    if let Some(status) = status::<R>(cache_dir)? {
        if status.healthy() {
            match R::reuse(cache_dir, status, options) {
                Err(LabError::SettingsDiffer { running, .. }) if machine.replace => {
                    progress(&format!(
                        "a {} lab {running} is up; stopping it (--replace)",
                        R::NAME
                    ));
                }
                reused => return reused,
            }
        } else {
            progress(&format!(
                "a previous {} lab is not healthy; stopping it",
                R::NAME
            ));
        }
    }
    // Also catches a QEMU whose bring-up was killed before it saved any state.
    down::<R>(cache_dir)?;

    let started = Instant::now();
    let manifest = bringup::fetch_and_stage(
        layout,
        R::PACKAGES,
        R::DOWNLOAD_SIZE,
        machine.cancel,
        progress,
    )?;
    let stamp = R::ensure_boot_files(layout, &manifest, options, progress)?;
    progress(&format!(
        "boot files ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    check_cancelled(machine.cancel)?;

    fs::create_dir_all(&layout.run_dir).map_err(|e| LabError::io(&layout.run_dir, e))?;
    if let (Some(_), Some(dir)) = (&machine.insns_plugin, layout.insns_log.parent()) {
        fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
    }
    let (pid, port, guard, boot_started) =
        bringup::start_qemu(layout, machine.ssh_port, &|port| {
            R::start_qemu(layout, machine, port)
        })?;
    progress(&format!(
        "booting {} under QEMU ({}, {} MiB, {} CPUs; QEMU pid {pid}, ssh on 127.0.0.1:{port}; serial log {})",
        R::booting(&stamp),
        machine.accel.as_str(),
        machine.memory_mib,
        machine.cpus,
        layout.serial_log.display()
    ));
    let mut state = R::new_state(
        &Booted {
            layout,
            machine,
            qemu_pid: pid,
            ssh_port: port,
            started_at: now_rfc3339(),
        },
        stamp,
    );
    let watch = BootWatch {
        layout,
        lab: R::NAME,
        pid,
        deadline: boot_started + machine.boot_timeout,
        boot_timeout: machine.boot_timeout,
        cancel: machine.cancel,
    };
    watch.wait_for_marker(R::READY_MARKER)?;
    R::check_boot_log(layout)?;
    progress(&format!(
        "{} ready after {:.1} s; asking {} over ssh",
        R::BOOTED,
        boot_started.elapsed().as_secs_f64(),
        R::PROBE
    ));
    let answer = watch.wait_for_ssh(R::PROBE, |limit| R::probe(&state, limit))?;
    let answer = R::accept(&watch, answer)?;
    R::finish(&mut state, answer, boot_started.elapsed().as_secs_f64());
    write_state::<R>(cache_dir, &state)?;
    guard.disarm();
    progress(&R::up_message(&state, started.elapsed().as_secs_f64()));
    Ok(state)
}

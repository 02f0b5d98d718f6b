//! `hvbench lab up|run|status|down`: the labs crate, one `Lab` at a time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hvbench::interrupt;

use super::Cli;

#[derive(Debug, Subcommand)]
pub enum LabAction {
    /// Deploy a lab, reachable over SSH on 127.0.0.1. Idempotent. `xen`: Debian's Xen 4.17
    /// with a busybox dom0 (`--xen-host lab` uses it). `kvm`: a Debian Linux host whose
    /// kvm_amd/kvm_intel may be reloaded (npt/ept on or off), with this hvbench in it
    /// (`hvbench lab run kvm` uses it).
    Up {
        #[arg(value_enum)]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
        /// Host port forwarded to the lab's SSH (default: a free one).
        #[arg(long)]
        ssh_port: Option<u16>,
        /// QEMU accelerator under the lab: kvm needs nested VMX/SVM (never on kvm_pvm).
        #[arg(long, value_parser = ["auto", "tcg", "kvm"], default_value = "auto")]
        accel: String,
        /// The emulated machine's memory in MiB (default: 3072 for xen, 1536 for kvm).
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Its CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Seconds from QEMU's start until the lab must answer over SSH.
        #[arg(long, default_value_t = 300)]
        boot_timeout_s: u64,
        /// Xen lab only: `debian` boots Debian's hypervisor as it ships (no shadow paging);
        /// `shadow` builds one from Debian's xen source package with
        /// CONFIG_SHADOW_PAGING=y (about 1-2 minutes once, then cached), so that
        /// `--paging shadow` runs.
        #[arg(long, value_enum, default_value = "debian")]
        hypervisor: HypervisorArg,
        /// Load the hvbench-insns TCG plugin into the lab's QEMU, so that runs on the lab
        /// record instructions per operation (an `insns` metric; the KVM lab shares the
        /// plugin's log with its Linux over 9p for `lab run kvm`).
        #[arg(long)]
        insns: bool,
        /// If a lab with other settings (`--hypervisor`, `--insns`) is up from this cache
        /// directory, stop it and boot the one asked for (without it, `up` refuses and
        /// says how).
        #[arg(long)]
        replace: bool,
        /// Xen lab only: add libvirt's libxl driver to dom0 once it is up (Debian 12's
        /// libvirt 9.0, about 20 MB more to download and copy), for `--backend libvirt
        /// --libvirt-uri xen:///system --xen-host lab`.
        #[arg(long)]
        with_libvirt: bool,
    },
    /// Run `hvbench run --backend kvm` inside the KVM lab, optionally with KVM's paging
    /// switched (`hvbench host paging MODE --` in the lab), and copy its records into
    /// --out. Every figure is a TCG emulation artefact: it proves the path, not the speed.
    Run {
        #[arg(value_enum)]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
        /// KVM's paging for this run: tdp (npt=1/ept=1) or shadow (0); default as the lab
        /// has it.
        #[arg(long, value_enum)]
        paging: Option<hvbench::host_paging::PagingMode>,
        /// Local results directory for the copied records.
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// Add to an existing results directory.
        #[arg(long)]
        append: bool,
        /// Seconds the whole run in the lab may take.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
        /// `hvbench run` arguments, after `--` (not --backend, --out, --guest, ...).
        #[arg(last = true)]
        run_args: Vec<String>,
    },
    /// Copy the rest of the records of a `lab run` whose lab went silent (its error says
    /// this command, with the run and the offset), labelled as the lab's, into --out.
    Fetch {
        #[arg(value_enum)]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
        /// The run's directory in the lab.
        #[arg(long = "run")]
        remote_run: String,
        /// Bytes of its results.jsonl already copied.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// The local results directory the run copied into (appended to).
        #[arg(long)]
        out: PathBuf,
    },
    /// Is the lab up, and does its dom0 answer?
    Status {
        #[arg(value_enum, default_value = "xen")]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
    },
    /// Stop the lab's QEMU and forget it.
    Down {
        #[arg(value_enum, default_value = "xen")]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HypervisorArg {
    Debian,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabKindArg {
    Xen,
    Kvm,
}

#[derive(Debug, Args)]
pub struct LabDir {
    /// Where downloads, images, keys and the lab's state live (default
    /// ~/.cache/hvbench/lab).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

impl LabDir {
    fn resolve(&self) -> Result<PathBuf> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => lab::default_cache_dir()
                .context("neither XDG_CACHE_HOME nor HOME is set: pass --cache-dir"),
        }
    }
}

fn lab_accel(accel: &str) -> Result<lab::LabAccel> {
    Ok(match accel {
        "tcg" => lab::LabAccel::Tcg,
        "kvm" => {
            if let Some(reason) = lab::kvm_unusable_reason() {
                bail!("--accel kvm: {reason}");
            }
            lab::LabAccel::Kvm
        }
        _ => lab::LabAccel::detect(),
    })
}

/// `hvbench lab up|status|down` on one kind of lab.
fn lab_action<L: lab::Lab>(
    action: &LabAction,
    lab_options: impl FnOnce(&mut L::Options) -> Result<()>,
) -> Result<i32> {
    match action {
        LabAction::Up {
            where_,
            ssh_port,
            accel,
            memory_mib,
            cpus,
            boot_timeout_s,
            replace,
            ..
        } => {
            let mut opts = L::options(where_.resolve()?)?;
            let machine = L::machine_mut(&mut opts);
            machine.ssh_port = *ssh_port;
            machine.boot_timeout = Duration::from_secs(*boot_timeout_s);
            machine.cancel = Some(interrupt::install());
            machine.accel = lab_accel(accel)?;
            machine.cpus = *cpus;
            machine.replace = *replace;
            if let Some(memory_mib) = memory_mib {
                machine.memory_mib = *memory_mib;
            }
            lab_options(&mut opts)?;
            let state = L::up(&opts)?;
            for line in L::up_report(&state) {
                hvbench::tell_line!("{line}");
            }
            Ok(0)
        }
        LabAction::Status { where_, .. } => match L::status(&where_.resolve()?)? {
            None => {
                hvbench::tell_line!("no {} lab", L::NAME);
                Ok(1)
            }
            Some(status) => {
                hvbench::tell_line!("{}", L::status_line(&status));
                Ok(if status.healthy() { 0 } else { 1 })
            }
        },
        LabAction::Down { where_, .. } => {
            if L::down(&where_.resolve()?)? {
                hvbench::tell_line!("{} lab stopped", L::NAME);
            } else {
                hvbench::tell_line!("no {} lab was running", L::NAME);
            }
            Ok(0)
        }
        LabAction::Run { .. } | LabAction::Fetch { .. } => {
            bail!("`lab run` and `lab fetch` are for the KVM lab")
        }
    }
}

/// `hvbench lab run kvm`.
fn kvm_lab_run(
    where_: &LabDir,
    paging: Option<hvbench::host_paging::PagingMode>,
    out: &std::path::Path,
    append: bool,
    timeout_s: u64,
    run_args: &[String],
) -> Result<i32> {
    lab::check_lab_run_args(run_args)?;
    // The arguments must make a valid `hvbench run` before minutes go into the lab.
    let mut probe = vec!["hvbench", "run", "--backend", "kvm"];
    probe.extend(run_args.iter().map(String::as_str));
    if let Err(error) = Cli::try_parse_from(probe) {
        let text = error.to_string();
        bail!(
            "the arguments after `--` are not valid for `hvbench run`: {}",
            text.lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
        );
    }
    let hvbench = std::env::current_exe().context("hvbench's own executable")?;
    let outcome = lab::lab_run_kvm(&lab::KvmLabRun {
        cache_dir: &where_.resolve()?,
        paging,
        run_args,
        out,
        append,
        timeout: Duration::from_secs(timeout_s),
        hvbench: &hvbench,
        progress: |m| hvbench::say!("hvbench lab: {m}"),
        cancel: Some(interrupt::install()),
    })?;
    hvbench::tell!("{}", outcome.summary);
    hvbench::tell_line!(
        "\nRecords ({} copied from the KVM lab): {} and {}",
        outcome.records,
        outcome.jsonl.display(),
        outcome.csv.display()
    );
    if outcome.interrupted {
        hvbench::say!("hvbench: interrupted; every record measured so far is saved");
    }
    Ok(outcome.exit_code)
}

/// `lab up --hypervisor` (Debian's for the other actions).
fn hypervisor_of(action: &LabAction) -> HypervisorArg {
    match action {
        LabAction::Up { hypervisor, .. } => *hypervisor,
        _ => HypervisorArg::Debian,
    }
}

/// `hvbench lab ...`.
pub fn lab(action: &LabAction) -> Result<i32> {
    match action {
        LabAction::Run {
            kind: LabKindArg::Kvm,
            where_,
            paging,
            out,
            append,
            timeout_s,
            run_args,
        } => kvm_lab_run(where_, *paging, out, *append, *timeout_s, run_args),
        LabAction::Fetch {
            kind: LabKindArg::Kvm,
            where_,
            remote_run,
            offset,
            out,
        } => {
            let records = lab::lab_fetch_kvm(&lab::KvmLabFetch {
                cache_dir: &where_.resolve()?,
                remote_run,
                offset: *offset,
                out,
                progress: |m| hvbench::say!("hvbench lab: {m}"),
            })?;
            hvbench::tell_line!(
                "{records} record(s) fetched from the KVM lab into {}",
                out.display()
            );
            Ok(0)
        }
        LabAction::Run {
            kind: LabKindArg::Xen,
            ..
        }
        | LabAction::Fetch {
            kind: LabKindArg::Xen,
            ..
        } => {
            bail!("`lab run` is for the KVM lab; on the Xen lab use `hvbench run --backend xen --xen-host lab`")
        }
        LabAction::Up { kind, .. }
        | LabAction::Status { kind, .. }
        | LabAction::Down { kind, .. } => match kind {
            LabKindArg::Xen => {
                let status = lab_action::<lab::XenLab>(action, |options| {
                    if matches!(action, LabAction::Up { insns: true, .. }) {
                        options.machine.insns_plugin = Some(hvbench::insns::find_plugin()?);
                    }
                    options.hypervisor = match hypervisor_of(action) {
                        HypervisorArg::Debian => lab::XenHypervisor::Debian,
                        HypervisorArg::Shadow => lab::XenHypervisor::Shadow,
                    };
                    Ok(())
                })?;
                if let LabAction::Up {
                    with_libvirt: true,
                    where_,
                    ..
                } = action
                {
                    let line = lab::add_libvirt(&where_.resolve()?, &lab::progress_to_stderr)?;
                    hvbench::tell_line!("libvirt in dom0: xen:///system answers ({line})");
                }
                Ok(status)
            }
            LabKindArg::Kvm => lab_action::<lab::KvmLab>(action, |options| {
                if matches!(
                    action,
                    LabAction::Up {
                        with_libvirt: true,
                        ..
                    }
                ) {
                    bail!("--with-libvirt is for the Xen lab");
                }
                if hypervisor_of(action) != HypervisorArg::Debian {
                    bail!("--hypervisor is for the Xen lab (the KVM lab's KVM is Debian's kernel)");
                }
                if matches!(action, LabAction::Up { insns: true, .. }) {
                    options.machine.insns_plugin = Some(hvbench::insns::find_plugin()?);
                }
                Ok(())
            }),
        },
    }
}

//! The command line: `hvbench list | host | run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use reports::ResultsWriter;
use workloads::params::SetBy;
use workloads::protocol::Status;
use workloads::WORKLOADS;

use crate::backend::kvm::KvmBackend;
use crate::backend::qemu::{QemuBackend, QemuOptions};
use crate::backend::xen::xl::Paging;
use crate::backend::xen::{XenBackend, XenHostSpec};
use crate::backend::{BackendKind, Hypervisor};
use crate::guest_image::GuestImage;
use crate::run::{self, plan, RunOptions, WorkloadParam};
use crate::{host, interrupt, summary};
use hostutil::transport::{SshTarget, Transport};

#[derive(Debug, Parser)]
#[command(
    name = "hvbench",
    version,
    about = "Boots one identical guest on KVM, QEMU and Xen, measures them, and keeps every sample."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the workloads: id, group, unit, privilege level, description.
    List,
    /// Fingerprint this host: CPU, virtualization, KVM paging mode, TSC, THP, KSM.
    #[command(args_conflicts_with_subcommands = true)]
    Host {
        /// Print the fingerprint as JSON (the `host` object of every record).
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<HostAction>,
    },
    /// Boot the guest on a backend, run workloads, write results.jsonl and results.csv.
    Run(RunArgs),
    /// Our VMM as a plain process: boot the guest with a command line, copy its console to
    /// stdout, exit with its status. For debugging guests and timing the VMM's start.
    Vmm(VmmArgs),
    /// Render results directories as one HTML page with charts: KVM beside Xen (or
    /// whichever backends the records hold), with intervals, ratios and warnings.
    Report(ReportArgs),
    /// A/B check: every measurement common to BASE and NEW, with its change and verdict.
    /// Exit status 1 when any measurement regressed significantly.
    Compare(CompareArgs),
    /// Deploy, inspect or remove a hypervisor host nested in QEMU (a lab), for machines
    /// where none exists.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Results directories (of `hvbench run`), any backends.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Output directory: index.html, the charts and copies of the raw results.
    #[arg(long)]
    pub out: PathBuf,
    /// The backend every other is compared with (default: kvm, else qemu, else xen).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Page title.
    #[arg(long)]
    pub title: Option<String>,
    /// Leave out the per-workload sample charts (the group charts stay).
    #[arg(long)]
    pub no_sample_charts: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Results directory of the base (e.g. the main branch).
    pub base: PathBuf,
    /// Results directory of the new build.
    pub new: PathBuf,
    /// Noise threshold: a change smaller than this fraction never counts (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub noise: f64,
    /// p-value threshold of the permutation test (Holm-adjusted over all measurements).
    #[arg(long, default_value_t = 0.01)]
    pub p: f64,
    /// Also exit 1 when a measurement that succeeded in BASE was skipped, failed, crashed
    /// or timed out in NEW.
    #[arg(long)]
    pub fail_on_new_failures: bool,
}

#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// KVM's paging mode: print it, or run one command with EPT/NPT (`tdp`) or shadow
    /// paging by reloading kvm_intel (ept=) or kvm_amd (npt=), restoring it afterwards.
    /// Refused on kvm_pvm and while any VM runs; needs root.
    Paging(PagingArgs),
}

#[derive(Debug, Args)]
pub struct PagingArgs {
    /// The mode to run COMMAND with; without it, print the current mode.
    #[arg(value_enum, requires = "command")]
    pub mode: Option<crate::host_paging::PagingMode>,
    /// Undo a switch whose `hvbench host paging` was killed before it could.
    #[arg(long, conflicts_with_all = ["mode", "command"])]
    pub restore: bool,
    /// The command to run under MODE, after `--`.
    #[arg(last = true, requires = "mode")]
    pub command: Vec<String>,
}

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
        paging: Option<crate::host_paging::PagingMode>,
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

#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The guest's command line.
    #[arg(
        long,
        default_value = "hvbench run=cpu.idle samples=1 warmup=0 sample_us=100"
    )]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u32,
    /// Guest image to boot instead of the one built into hvbench.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Seconds before the guest is stopped.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Mark guest RAM MADV_MERGEABLE, so that KSM may merge it (`mem.ksm` uses this).
    #[arg(long)]
    pub mergeable: bool,
    /// Read the doorbell from stdin: a line `ring N` sets the value the guest reads from
    /// the doorbell port; end of input stops the guest (so a VMM never outlives whoever
    /// drives it).
    #[arg(long)]
    pub doorbell_stdin: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Which hypervisor stack runs the guest.
    #[arg(long, value_enum)]
    pub backend: BackendKind,
    /// Workloads to run, as globs over `hvbench list` (repeatable; default: all but
    /// self-tests, which run only when named exactly).
    #[arg(long = "workload", short = 'w')]
    pub workloads: Vec<String>,
    /// Boot and run the whole selection this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Results directory (created; refused if it already holds results, see --append).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Add to an existing results directory.
    #[arg(long)]
    pub append: bool,
    /// Measured samples per workload.
    #[arg(long, default_value_t = workloads::cmdline::DEFAULT_SAMPLES,
          value_parser = clap::value_parser!(u32).range(1..=workloads::cmdline::MAX_SAMPLES as i64))]
    pub samples: u32,
    /// Warm-up samples per workload, kept in the record but not in the statistics.
    #[arg(long, default_value_t = workloads::cmdline::DEFAULT_WARMUP,
          value_parser = clap::value_parser!(u32).range(0..=workloads::cmdline::MAX_WARMUP as i64))]
    pub warmup: u32,
    /// Minimum duration of one sample, in microseconds; the iteration count doubles until
    /// a sample lasts this long.
    #[arg(long, default_value_t = workloads::cmdline::DEFAULT_SAMPLE_US,
          value_parser = clap::value_parser!(u32).range(workloads::cmdline::MIN_SAMPLE_US as i64..=workloads::cmdline::MAX_SAMPLE_US as i64))]
    pub sample_us: u32,
    /// Seconds a workload may run before the guest is stopped and the workload recorded
    /// as `timeout`.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_s: u64,
    /// Seconds from boot to the guest's first line.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub boot_timeout_s: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(GUEST_MEMORY_MIB))]
    pub memory_mib: u32,
    /// vCPUs of the guest. The guest runs on the first; the others are created and stay
    /// offline (as application processors before their start-up IPI).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: u32,
    /// Guest image to boot instead of the one built into hvbench.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// A workload's parameter, WORKLOAD.KEY=VALUE (repeatable), e.g.
    /// mem.tlb-chase.ws=64k,16m or mem.first-touch.page=4k.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<WorkloadParam>,
    /// `--backend kvm`: back guest RAM with transparent huge pages (MADV_HUGEPAGE), so
    /// that the guest's 2 MiB mappings can meet 2 MiB host pages.
    #[arg(long)]
    pub host_hugepages: bool,
    /// QEMU binary for `--backend qemu`.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU accelerator for `--backend qemu`: kvm where /dev/kvm opens, else tcg.
    #[arg(long, value_enum, default_value = "auto")]
    pub qemu_accel: crate::backend::qemu::QemuAccel,
    /// QEMU `-cpu` model for `--backend qemu` (default: the host's CPU with an invariant
    /// TSC under KVM, `max` under TCG).
    #[arg(long)]
    pub qemu_cpu: Option<String>,
    /// Xen host for `--backend xen`: `lab` (the one `hvbench lab up xen` deployed),
    /// `lab:DIR` (one deployed with `--cache-dir DIR`), `local` (hvbench runs in dom0), or
    /// ssh://[user@]host[:port].
    #[arg(long, default_value = "lab")]
    pub xen_host: String,
    /// Guest paging on Xen: hardware-assisted (hap=1) or shadow (hap=0).
    #[arg(long, value_enum, default_value = "hap")]
    pub paging: Paging,
}

fn parse_param(text: &str) -> Result<WorkloadParam, String> {
    WorkloadParam::parse(text)
}

/// Guest memory `--memory-mib` accepts, checked before anything is created: what the
/// image and its boot data need, up to the MMIO hole below 4 GiB (the guest maps 0..4 GiB).
const GUEST_MEMORY_MIB: std::ops::RangeInclusive<i64> =
    vmm::MIN_MEMORY_MIB as i64..=(workloads::abi::MAX_LOW_RAM >> 20).cast_signed();

/// Exit status of `hvbench run` when some workloads did not succeed (records written).
pub const EXIT_NOT_ALL_SUCCEEDED: i32 = 3;
/// Exit status after Ctrl-C (records so far written).
pub const EXIT_INTERRUPTED: i32 = 130;

pub fn list() -> String {
    let width = WORKLOADS.iter().map(|w| w.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for w in WORKLOADS {
        let units: Vec<&str> = w.metrics.iter().map(|m| m.unit.name()).collect();
        out.push_str(&format!(
            "{:<width$}  {:<8}  {:<5}  cpl{}  {}{}\n",
            w.name,
            w.group.name(),
            if units.is_empty() {
                "-".to_string()
            } else {
                units.join(",")
            },
            w.privilege.cpl(),
            w.description,
            if w.explicit_only {
                " (runs only when named)"
            } else {
                ""
            },
        ));
        for p in w.params.iter().filter(|p| p.set_by == SetBy::User) {
            out.push_str(&format!(
                "{:<width$}    --param {}.{}={}  ({}, {}) {}\n",
                "",
                w.name,
                p.key,
                p.default.unwrap_or("VALUE"),
                p.kind.name(),
                p.bounds(),
                p.description
            ));
        }
    }
    out
}

/// `--xen-host` to a transport.
pub fn resolve_xen_host(spec: &str) -> Result<XenHostSpec> {
    Ok(match spec {
        "local" => XenHostSpec {
            transport: Transport::Local,
            spec: spec.to_string(),
            lab: None,
        },
        "lab" => XenHostSpec::lab(spec, lab::xen_host()?),
        // A lab brought up with `lab up xen --cache-dir DIR`.
        dir if dir.starts_with("lab:") => XenHostSpec::lab(
            spec,
            lab::xen_host_in(std::path::Path::new(&dir["lab:".len()..]))?,
        ),
        url => XenHostSpec {
            transport: Transport::Ssh(SshTarget::parse(url)?),
            spec: spec.to_string(),
            lab: None,
        },
    })
}

fn make_backend(
    args: &RunArgs,
    host_info: reports::record::HostInfo,
) -> Result<Box<dyn Hypervisor>> {
    Ok(match args.backend {
        BackendKind::Kvm => Box::new(
            KvmBackend::new(host_info)
                .context("the kvm backend cannot start")?
                .with_paging_switch(crate::host_paging::mode_from_env())
                .with_huge_pages(args.host_hugepages),
        ),
        BackendKind::Xen => Box::new(
            XenBackend::new(resolve_xen_host(&args.xen_host)?, args.paging)
                .context("the xen backend cannot start")?,
        ),
        BackendKind::Qemu => Box::new(
            QemuBackend::new(
                QemuOptions {
                    binary: args.qemu.clone(),
                    accel: args.qemu_accel,
                    cpu: args.qemu_cpu.clone(),
                },
                host_info,
            )
            .context("the qemu backend cannot start")?,
        ),
    })
}

/// `hvbench run`; returns the process exit status.
pub fn run(args: &RunArgs) -> Result<i32> {
    // A run that died while it drove KSM left its settings changed: put them back before
    // anything is measured.
    match crate::run::ksm::restore_stale_at_start() {
        Ok(Some(message)) => crate::say!("hvbench: {message}"),
        Ok(None) => {}
        Err(e) => crate::say!("hvbench: warning: {e}"),
    }
    let workloads = plan::select(&args.workloads)?;
    plan::check_params(&args.params, &workloads, args.memory_mib)?;
    let image = GuestImage::load(args.guest.as_deref())?;
    let backend = make_backend(args, host::fingerprint())?;
    // The machine the guest runs on: this one, or the Xen host.
    let host_info = backend.host();
    let mut writer = ResultsWriter::create(&args.out, args.append)?;
    for repair in writer.repairs() {
        crate::say!("hvbench: warning: {repair}");
    }
    let interrupted = interrupt::install();
    let options = RunOptions {
        workloads,
        samples: args.samples,
        warmup: args.warmup,
        sample_us: args.sample_us,
        repeat: args.repeat,
        workload_timeout: Duration::from_secs(args.timeout_s),
        boot_timeout: Duration::from_secs(args.boot_timeout_s),
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        guest_path: args.guest.clone(),
        out: args.out.clone(),
        params: args.params.clone(),
    };
    crate::say!(
        "hvbench: {} workload(s) x {} on {} (host class {}, paging {}, guest CPL0 {}); results in {}",
        options.workloads.len(),
        options.repeat,
        backend.kind().name(),
        host_info.class,
        if host_info.paging.is_empty() { "?" } else { &host_info.paging },
        if host_info.cpl0.is_empty() { "?" } else { &host_info.cpl0 },
        args.out.display()
    );
    let summary = run::run(backend.as_ref(), &image, &options, &mut writer, interrupted)?;
    crate::tell!("{}", summary::table(&summary.records));
    for problem in &summary.problems {
        crate::say!("hvbench: note: {problem}");
    }
    if host_info.class().under_tcg {
        crate::tell!(
            "\nNote: the guest ran under QEMU's TCG translator ({}): these figures are \
             emulation artefacts. They prove that the path works, not how fast it is.\n",
            host_info.class
        );
    } else if host_info.cpl0() == Some(reports::host::Cpl0::Emulated) {
        crate::tell!(
            "\nNote: this host ({}) emulates guest CPL0 code instruction by instruction; \
             cpl0 workloads measure that emulator, cpl3 workloads run natively.\n",
            host_info.kvm_module
        );
    }
    crate::tell!(
        "\nRecords: {} and {}\n",
        writer.jsonl_path().display(),
        writer.csv_path().display()
    );
    if summary.interrupted {
        crate::say!("hvbench: interrupted; every record measured so far is saved");
        return Ok(EXIT_INTERRUPTED);
    }
    if summary.records.is_empty() {
        bail!("no records were produced");
    }
    Ok(match summary.status() {
        Status::Success | Status::Skip => 0,
        _ => EXIT_NOT_ALL_SUCCEEDED,
    })
}

/// Dispatches a parsed command line; returns the exit status.
pub fn main(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::List => {
            crate::tell!("{}", list());
            Ok(0)
        }
        Command::Host {
            action: Some(HostAction::Paging(args)),
            ..
        } => host_paging(&args),
        Command::Host { json, action: None } => {
            let host = host::fingerprint();
            if json {
                crate::tell_line!("{}", serde_json::to_string_pretty(&host)?);
            } else {
                crate::tell!("{}", host::describe(&host));
            }
            Ok(0)
        }
        Command::Run(args) => run(&args),
        Command::Vmm(args) => vmm(&args),
        Command::Lab { action } => lab(&action),
        Command::Report(args) => report(&args),
        Command::Compare(args) => compare(&args),
    }
}

/// `hvbench report`.
pub fn report(args: &ReportArgs) -> Result<i32> {
    let mut options = reports::report::ReportOptions {
        baseline: args.baseline.clone(),
        sample_charts: !args.no_sample_charts,
        ..Default::default()
    };
    if let Some(title) = &args.title {
        options.title = title.clone();
    }
    let summary = reports::report::render(&args.dirs, &args.out, &options)?;
    for warning in &summary.warnings {
        crate::say!("hvbench: warning: {warning}");
    }
    crate::tell_line!(
        "{}: {} records, {} measurements, backends {} ({} charts, {} not successful)",
        summary.index.display(),
        summary.records,
        summary.measurements,
        summary.backends.join(", "),
        summary.charts.len(),
        summary.problems
    );
    Ok(0)
}

/// `hvbench compare`; exit status 1 on a significant regression.
pub fn compare(args: &CompareArgs) -> Result<i32> {
    let options = reports::compare::CompareOptions::with_thresholds(args.noise, args.p);
    let comparison = reports::compare::compare(&args.base, &args.new, &options)?;
    crate::tell!("{}", comparison.render_table());
    let failing = comparison.newly_failing();
    if comparison.has_regression() {
        return Ok(1);
    }
    if args.fail_on_new_failures && !failing.is_empty() {
        crate::say!(
            "hvbench: {} measurement(s) succeeded in BASE and not in NEW",
            failing.len()
        );
        return Ok(1);
    }
    Ok(0)
}

/// `hvbench host paging ...`; returns the command's exit status under a switch.
pub fn host_paging(args: &PagingArgs) -> Result<i32> {
    use crate::host_paging::{self as paging, HostPaths, SystemModules};
    let paths = HostPaths::system();
    // Never a panic on a closed stderr (an ssh session gone): the restore must still run.
    let progress = |message: &str| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "hvbench host paging: {message}");
    };
    let mut control = SystemModules;
    if args.restore {
        match paging::restore_stale(&paths, &mut control, &progress)? {
            Some(_) => {}
            None => crate::say!("hvbench host paging: no switch to undo"),
        }
        crate::tell_line!("{}", paging::read_kvm_paging(&paths).describe());
        return Ok(0);
    }
    let Some(mode) = args.mode else {
        crate::tell_line!("{}", paging::read_kvm_paging(&paths).describe());
        if let Some(state) = paging::read_state(&paths.state_file())? {
            crate::tell_line!(
                "switched by pid {} to {}={} for `{}`; `hvbench host paging --restore` undoes \
                 it if that process is gone",
                state.pid,
                state.parameter,
                u8::from(state.requested),
                state.command.join(" ")
            );
        }
        return Ok(0);
    };
    let cancel = interrupt::install();
    Ok(paging::run_with_paging(
        &paths,
        &mut control,
        mode,
        &args.command,
        cancel,
        &progress,
    )?)
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
fn lab_action<L: lab::Lab>(action: &LabAction) -> Result<i32> {
    match action {
        LabAction::Up {
            where_,
            ssh_port,
            accel,
            memory_mib,
            cpus,
            boot_timeout_s,
            ..
        } => {
            let mut opts = L::options(where_.resolve()?)?;
            let machine = L::machine_mut(&mut opts);
            machine.ssh_port = *ssh_port;
            machine.boot_timeout = Duration::from_secs(*boot_timeout_s);
            machine.cancel = Some(interrupt::install());
            machine.accel = lab_accel(accel)?;
            machine.cpus = *cpus;
            if let Some(memory_mib) = memory_mib {
                machine.memory_mib = *memory_mib;
            }
            let state = L::up(&opts)?;
            for line in L::up_report(&state) {
                crate::tell_line!("{line}");
            }
            Ok(0)
        }
        LabAction::Status { where_, .. } => match L::status(&where_.resolve()?)? {
            None => {
                crate::tell_line!("no {} lab", L::NAME);
                Ok(1)
            }
            Some(status) => {
                crate::tell_line!("{}", L::status_line(&status));
                Ok(if status.healthy() { 0 } else { 1 })
            }
        },
        LabAction::Down { where_, .. } => {
            if L::down(&where_.resolve()?)? {
                crate::tell_line!("{} lab stopped", L::NAME);
            } else {
                crate::tell_line!("no {} lab was running", L::NAME);
            }
            Ok(0)
        }
        LabAction::Run { .. } => bail!("`lab run` is for the KVM lab"),
    }
}

/// `hvbench lab run kvm`.
fn kvm_lab_run(
    where_: &LabDir,
    paging: Option<crate::host_paging::PagingMode>,
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
        progress: |m| crate::say!("hvbench lab: {m}"),
        cancel: Some(interrupt::install()),
    })?;
    crate::tell!("{}", outcome.summary);
    crate::tell_line!(
        "\nRecords ({} copied from the KVM lab): {} and {}",
        outcome.records,
        outcome.jsonl.display(),
        outcome.csv.display()
    );
    if outcome.interrupted {
        crate::say!("hvbench: interrupted; every record measured so far is saved");
    }
    Ok(outcome.exit_code)
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
        LabAction::Run {
            kind: LabKindArg::Xen,
            ..
        } => {
            bail!("`lab run` is for the KVM lab; on the Xen lab use `hvbench run --backend xen --xen-host lab`")
        }
        LabAction::Up { kind, .. }
        | LabAction::Status { kind, .. }
        | LabAction::Down { kind, .. } => match kind {
            LabKindArg::Xen => lab_action::<lab::XenLab>(action),
            LabKindArg::Kvm => lab_action::<lab::KvmLab>(action),
        },
    }
}

/// What `hvbench vmm --doorbell-stdin` understands on stdin: `ring N`.
pub fn parse_doorbell_line(line: &str) -> Option<u32> {
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("ring"), Some(value), None) => value.parse().ok(),
        _ => None,
    }
}

/// Exit status of `hvbench vmm` when the guest ran past `--timeout-s`.
pub const EXIT_VMM_TIMEOUT: i32 = 124;
/// Exit status of `hvbench vmm` when the guest died without an exit code, or the
/// doorbell's input ended first.
pub const EXIT_VMM_NO_STATUS: i32 = 125;

/// `hvbench vmm`; the exit status is the guest's (its exit code, 124 on timeout, 125 if
/// it died without one or, with `--doorbell-stdin`, stdin ended first).
pub fn vmm(args: &VmmArgs) -> Result<i32> {
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::RecvTimeoutError;
    use std::sync::Arc;

    use crate::backend::{BootRequest, GuestEnd, GuestMessage};

    let image = GuestImage::load(args.guest.as_deref())?;
    // No fingerprint: it would only delay the boot being timed.
    let backend = KvmBackend::new(reports::record::HostInfo::default())?
        .with_mergeable_memory(args.mergeable);
    let input_ended = Arc::new(AtomicBool::new(false));
    if args.doorbell_stdin {
        let doorbell = backend.doorbell();
        let ended = input_ended.clone();
        std::thread::Builder::new()
            .name("doorbell-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    match parse_doorbell_line(&line) {
                        Some(value) => doorbell.ring(value),
                        None => crate::say!("hvbench: vmm: ignored doorbell input {line:?}"),
                    }
                }
                ended.store(true, Ordering::Release);
            })
            .context("starting the doorbell reader")?;
    }
    let mut session = backend.boot(&BootRequest {
        image: &image,
        cmdline: &args.cmdline,
        memory_mib: args.memory_mib,
        vcpus: 1,
        name: "vmm".into(),
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let mut stdout = std::io::stdout().lock();
    let code = loop {
        if input_ended.load(Ordering::Acquire) {
            crate::say!("hvbench: vmm: the doorbell's input ended; stopping the guest");
            break EXIT_VMM_NO_STATUS;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            crate::say!("hvbench: guest stopped after {} s", args.timeout_s);
            break EXIT_VMM_TIMEOUT;
        }
        // Wake at least every 100 ms to look at the doorbell's input.
        match session
            .messages()
            .recv_timeout(left.min(Duration::from_millis(100)))
        {
            Ok(GuestMessage::Console { bytes, .. }) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            Ok(GuestMessage::Notice(text)) => crate::say!("hvbench: {text}"),
            Ok(GuestMessage::Ended(GuestEnd::Exited { code })) => break code.cast_signed(),
            Ok(GuestMessage::Ended(end)) => {
                crate::say!("hvbench: guest ended: {end:?}");
                break EXIT_VMM_NO_STATUS;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                crate::say!("hvbench: the vCPU stopped without saying how the guest ended");
                break EXIT_VMM_NO_STATUS;
            }
        }
    };
    session.stop()?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_lines() {
        assert_eq!(parse_doorbell_line("ring 1"), Some(1));
        assert_eq!(parse_doorbell_line("  ring   4294967295 "), Some(u32::MAX));
        assert_eq!(parse_doorbell_line("ring"), None);
        assert_eq!(parse_doorbell_line("ring -1"), None);
        assert_eq!(parse_doorbell_line("ring 1 2"), None);
        assert_eq!(parse_doorbell_line("ring 4294967296"), None);
        assert_eq!(parse_doorbell_line("knock 1"), None);
    }

    #[test]
    fn bad_params_are_refused_when_the_arguments_are_parsed() {
        let out = std::env::temp_dir().join(format!("hvbench-param-{}", std::process::id()));
        let out_arg = out.display().to_string();
        for (param, says) in [
            ("mem.tlb-chase.ws=0", "4k..=3g"),
            ("mem.tlb-chase.wss=1m", "mem.tlb-chase takes ws"),
            ("cpu.idle.p=1", "cpu.idle takes no parameters"),
        ] {
            let args = [
                "hvbench",
                "run",
                "--backend",
                "kvm",
                "--param",
                param,
                "--out",
                &out_arg,
            ];
            let e = Cli::try_parse_from(args).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(says)),
                "{param}: {e:?}"
            );
        }
        assert!(!out.exists(), "the results directory was created");
    }
}

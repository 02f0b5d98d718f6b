//! The command line: `hvbench list | host | run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use reports::ResultsWriter;
use workloads::protocol::Status;
use workloads::WORKLOADS;

use crate::backend::kvm::KvmBackend;
use crate::backend::qemu::{QemuBackend, QemuOptions};
use crate::backend::xen::transport::{SshTarget, Transport};
use crate::backend::xen::xl::Paging;
use crate::backend::xen::{XenBackend, XenHostSpec};
use crate::backend::{BackendKind, Hypervisor};
use crate::guest_image::GuestImage;
use crate::run::{self, plan, RunOptions, WorkloadParam};
use crate::{host, interrupt, summary};

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
    Host {
        /// Print the fingerprint as JSON (the `host` object of every record).
        #[arg(long)]
        json: bool,
    },
    /// Boot the guest on a backend, run workloads, write results.jsonl and results.csv.
    Run(RunArgs),
    /// Our VMM as a plain process: boot the guest with a command line, copy its console to
    /// stdout, exit with its status. For debugging guests and timing the VMM's start.
    Vmm(VmmArgs),
    /// Deploy, inspect or remove a hypervisor host nested in QEMU (a lab), for machines
    /// where none exists.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabAction {
    /// Deploy a lab: Debian's Xen 4.17 with a busybox dom0, reachable over SSH on
    /// 127.0.0.1 (`--xen-host lab` uses it). Idempotent.
    Up {
        #[arg(value_enum)]
        kind: LabKindArg,
        #[command(flatten)]
        where_: LabDir,
        /// Host port forwarded to dom0's SSH (default: a free one).
        #[arg(long)]
        ssh_port: Option<u16>,
        /// QEMU accelerator under the lab: kvm needs nested VMX/SVM (never on kvm_pvm).
        #[arg(long, value_parser = ["auto", "tcg", "kvm"], default_value = "auto")]
        accel: String,
        /// Seconds from QEMU's start until `xl info` must answer.
        #[arg(long, default_value_t = 300)]
        boot_timeout_s: u64,
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LabKindArg {
    Xen,
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
            None => crate::lab::default_cache_dir()
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
          value_parser = clap::value_parser!(u32).range(0..=100))]
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
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u32,
    /// Guest image to boot instead of the one built into hvbench.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// A workload's parameter, WORKLOAD.KEY=VALUE (repeatable), e.g.
    /// mem.tlb-chase.ws=64k,16m or mem.first-touch.page=4k.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<WorkloadParam>,
    /// QEMU binary for `--backend qemu`.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU accelerator for `--backend qemu`: kvm where /dev/kvm opens, else tcg.
    #[arg(long, value_parser = ["auto", "kvm", "tcg"], default_value = "auto")]
    pub qemu_accel: String,
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
        "lab" => crate::lab::xen_host()?,
        // A lab brought up with `lab up xen --cache-dir DIR`.
        lab if lab.starts_with("lab:") => XenHostSpec {
            spec: spec.to_string(),
            ..crate::lab::xen_host_in(std::path::Path::new(&lab["lab:".len()..]))?
        },
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
        BackendKind::Kvm => {
            Box::new(KvmBackend::new(host_info).context("the kvm backend cannot start")?)
        }
        BackendKind::Xen => Box::new(
            XenBackend::new(resolve_xen_host(&args.xen_host)?, args.paging)
                .context("the xen backend cannot start")?,
        ),
        BackendKind::Qemu => Box::new(
            QemuBackend::new(
                QemuOptions {
                    binary: args.qemu.clone(),
                    accel: args.qemu_accel.clone(),
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
    let workloads = plan::select(&args.workloads)?;
    let image = GuestImage::load(args.guest.as_deref())?;
    let backend = make_backend(args, host::fingerprint())?;
    // The machine the guest runs on: this one, or the Xen host.
    let host_info = backend.host();
    let mut writer = ResultsWriter::create(&args.out, args.append)?;
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
        vcpus: 1,
        guest_path: args.guest.clone(),
        out: args.out.clone(),
        params: args.params.clone(),
    };
    eprintln!(
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
    print!("{}", summary::table(&summary.records));
    for problem in &summary.problems {
        eprintln!("hvbench: note: {problem}");
    }
    if host_info.class.contains("tcg") {
        println!(
            "\nNote: the guest ran under QEMU's TCG translator ({}): these figures are \
             emulation artefacts. They prove that the path works, not how fast it is.",
            host_info.class
        );
    } else if host_info.cpl0 == "emulated" {
        println!(
            "\nNote: this host ({}) emulates guest CPL0 code instruction by instruction; \
             cpl0 workloads measure that emulator, cpl3 workloads run natively.",
            host_info.kvm_module
        );
    }
    println!(
        "\nRecords: {} and {}",
        writer.jsonl_path().display(),
        writer.csv_path().display()
    );
    if summary.interrupted {
        eprintln!("hvbench: interrupted; every record measured so far is saved");
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
            print!("{}", list());
            Ok(0)
        }
        Command::Host { json } => {
            let host = host::fingerprint();
            if json {
                println!("{}", serde_json::to_string_pretty(&host)?);
            } else {
                print!("{}", host::describe(&host));
            }
            Ok(0)
        }
        Command::Run(args) => run(&args),
        Command::Vmm(args) => vmm(&args),
        Command::Lab { action } => lab(&action),
    }
}

/// `hvbench lab ...`.
pub fn lab(action: &LabAction) -> Result<i32> {
    use crate::lab;
    match action {
        LabAction::Up {
            kind: LabKindArg::Xen,
            where_,
            ssh_port,
            accel,
            boot_timeout_s,
        } => {
            let mut opts = lab::XenLabOptions::new(where_.resolve()?);
            opts.ssh_port = *ssh_port;
            opts.boot_timeout = Duration::from_secs(*boot_timeout_s);
            opts.cancel = Some(interrupt::install());
            opts.accel = match accel.as_str() {
                "tcg" => lab::LabAccel::Tcg,
                "kvm" => {
                    if let Some(reason) = lab::kvm_unusable_reason() {
                        bail!("--accel kvm: {reason}");
                    }
                    lab::LabAccel::Kvm
                }
                _ => lab::LabAccel::detect(),
            };
            let state = lab::lab_up_xen(&opts)?;
            println!(
                "Xen {} lab is up ({} under QEMU, booted in {:.1} s).",
                state.xen_version, state.accel, state.boot_seconds
            );
            println!(
                "dom0: ssh -i {} -p {} -o UserKnownHostsFile={} -o HostKeyAlias=hvbench-xen-lab root@127.0.0.1",
                state.ssh_key.display(),
                state.ssh_port,
                state.known_hosts.display()
            );
            println!("run:  hvbench run --backend xen --xen-host lab");
            if state.accel == "tcg" {
                println!("Figures measured in this lab are TCG emulation artefacts: they prove function, not performance.");
            }
            Ok(0)
        }
        LabAction::Status {
            kind: LabKindArg::Xen,
            where_,
        } => match lab::lab_status(&where_.resolve()?)? {
            None => {
                println!("no Xen lab");
                Ok(1)
            }
            Some(status) => {
                println!(
                    "Xen {} lab ({}), started {}, ssh port {}: QEMU {}, dom0 {}",
                    status.state.xen_version,
                    status.state.accel,
                    status.state.started_at,
                    status.state.ssh_port,
                    if status.qemu_running {
                        "running"
                    } else {
                        "not running"
                    },
                    if status.ssh_answers {
                        "answers"
                    } else {
                        "does not answer"
                    },
                );
                Ok(if status.healthy() { 0 } else { 1 })
            }
        },
        LabAction::Down {
            kind: LabKindArg::Xen,
            where_,
        } => {
            let was_up = lab::lab_down(&where_.resolve()?)?;
            println!(
                "{}",
                if was_up {
                    "Xen lab stopped"
                } else {
                    "no Xen lab was running"
                }
            );
            Ok(0)
        }
    }
}

/// `hvbench vmm`; the exit status is the guest's (its exit code, 124 on timeout, 125 if
/// it died without one).
pub fn vmm(args: &VmmArgs) -> Result<i32> {
    use std::io::Write;

    use crate::backend::{BootRequest, GuestEnd, GuestMessage};

    let image = GuestImage::load(args.guest.as_deref())?;
    // No fingerprint: it would only delay the boot being timed.
    let backend = KvmBackend::new(reports::record::HostInfo::default())?;
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
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match session.messages().recv_timeout(left) {
            Ok(GuestMessage::Console { bytes, .. }) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            Ok(GuestMessage::Ended(GuestEnd::Exited { code })) => break code as i32,
            Ok(GuestMessage::Ended(end)) => {
                eprintln!("hvbench: guest ended: {end:?}");
                break 125;
            }
            Err(_) => {
                eprintln!("hvbench: guest stopped after {} s", args.timeout_s);
                break 124;
            }
        }
    };
    session.stop()?;
    Ok(code)
}

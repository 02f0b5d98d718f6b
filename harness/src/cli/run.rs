//! `hvbench run`: one backend, a selection of workloads, a results directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hostutil::transport::{SshTarget, Transport};
use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use hvbench::backend::xen::xl::Paging;
use hvbench::backend::xen::{XenBackend, XenHostSpec};
use hvbench::backend::{BackendKind, Hypervisor};
use hvbench::guest_image::GuestImage;
use hvbench::run::{self, plan, RunOptions, WorkloadParam};
use hvbench::{host, interrupt, summary};
use reports::ResultsWriter;
use workloads::protocol::Status;

use super::{EXIT_INTERRUPTED, EXIT_NOT_ALL_SUCCEEDED};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Which hypervisor stack runs the guest.
    #[arg(
        long,
        value_enum,
        required_unless_present = "matrix",
        conflicts_with = "matrix"
    )]
    pub backend: Option<BackendKind>,
    /// A part of a benchmark matrix instead: its cells' commands say the rest.
    #[command(flatten)]
    pub part: super::matrix::PartArgs,
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
    /// vCPUs of the guest. Workloads run on the first; `sched.*` start the others by
    /// INIT/SIPI (hvbench's VMM then has KVM's in-kernel irqchip).
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
    pub qemu_accel: hvbench::backend::qemu::QemuAccel,
    /// QEMU machine for `--backend qemu`: microvm, or q35 (the machine libvirt uses).
    #[arg(long, value_enum, default_value = "microvm")]
    pub qemu_machine: hvbench::backend::qemu::QemuMachine,
    /// QEMU `-cpu` model for `--backend qemu` (default: the host's CPU with an invariant
    /// TSC under KVM, `max` under TCG).
    #[arg(long)]
    pub qemu_cpu: Option<String>,
    /// Count instructions per operation with the hvbench-insns TCG plugin (`--backend
    /// qemu --qemu-accel tcg`; a lab brought up with `--insns` counts without it): each
    /// record gets an `insns` record beside it.
    #[arg(long)]
    pub insns: bool,
    /// With instruction counting, tell the guest to place no markers (its `insns` records
    /// then say there is no count): a check of the counting path.
    #[arg(long, hide = true)]
    pub no_insn_markers: bool,
    /// `--backend kvm` inside a QEMU that counts instructions (the KVM lab with `--insns`;
    /// `lab run kvm` passes it): the plugin's log as this machine sees it.
    #[arg(long)]
    pub insns_log: Option<PathBuf>,
    /// libvirt connection for `--backend libvirt`: local, or `qemu+ssh://[user@]host/system`
    /// (the guest image and console file then go to that host over SSH).
    #[arg(long, default_value = hvbench::backend::libvirt::DEFAULT_URI)]
    pub libvirt_uri: String,
    /// Xen host for `--backend xen`: `lab` (the one `hvbench lab up xen` deployed),
    /// `lab:DIR` (one deployed with `--cache-dir DIR`), `local` (hvbench runs in dom0), or
    /// ssh://[user@]host[:port].
    #[arg(long, default_value = "lab")]
    pub xen_host: String,
    /// Guest paging on Xen: hardware-assisted (hap=1) or shadow (hap=0).
    #[arg(long, value_enum, default_value = "hap")]
    pub paging: Paging,
    #[command(flatten)]
    pub disk: super::disk::DiskArgs,
}

fn parse_param(text: &str) -> Result<WorkloadParam, String> {
    WorkloadParam::parse(text)
}

/// Guest memory `--memory-mib` accepts, checked before anything is created: what the
/// image and its boot data need, up to the MMIO hole below 4 GiB (the guest maps 0..4 GiB).
const GUEST_MEMORY_MIB: std::ops::RangeInclusive<i64> =
    vmm::MIN_MEMORY_MIB as i64..=(workloads::abi::MAX_LOW_RAM >> 20).cast_signed();

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
    kind: BackendKind,
    host_info: reports::record::HostInfo,
    disk: Option<&hvbench::disk::TestDisk>,
) -> Result<Box<dyn Hypervisor>> {
    Ok(match kind {
        BackendKind::Kvm => Box::new(
            KvmBackend::new(host_info)
                .context("the kvm backend cannot start")?
                .with_paging_switch(hvbench::host_paging::mode_from_env())
                .with_huge_pages(args.host_hugepages)
                .with_insns_log(args.insns_log.clone())
                .with_disk(disk)
                .with_vcpus(args.vcpus),
        ),
        BackendKind::Xen => Box::new(
            XenBackend::new(resolve_xen_host(&args.xen_host)?, args.paging)
                .context("the xen backend cannot start")?
                .with_disk(disk)
                .context("the xen backend cannot set up the disk on the dom0")?,
        ),
        BackendKind::Qemu => Box::new(
            QemuBackend::new(
                QemuOptions {
                    binary: args.qemu.clone(),
                    accel: args.qemu_accel,
                    machine: args.qemu_machine,
                    cpu: args.qemu_cpu.clone(),
                    insns: args.insns,
                },
                host_info,
            )
            .context("the qemu backend cannot start")?
            .with_disk(disk),
        ),
        BackendKind::Libvirt => Box::new(libvirt_backend(args, host_info)?),
    })
}

/// `--backend libvirt`: virsh here, or for a `xen://` URI in the dom0 `--xen-host` names
/// (the Xen lab's, by default), where libvirt's libxl driver runs beside `xl`.
fn libvirt_backend(
    args: &RunArgs,
    host_info: reports::record::HostInfo,
) -> Result<hvbench::backend::libvirt::LibvirtBackend> {
    use hvbench::backend::libvirt::{flavour::Flavour, LibvirtBackend};
    let (at, host_info) = match Flavour::of_uri(&args.libvirt_uri) {
        Flavour::XenPvh if !args.libvirt_uri.contains('+') => {
            if args.paging != Paging::Hap {
                bail!("--paging shadow is not passed through libvirt's libxl driver yet: run it with --backend xen");
            }
            let spec = resolve_xen_host(&args.xen_host)?;
            // The records describe the Xen host the guest runs on, as `--backend xen`
            // fingerprints it (`xl info` and dom0), not this machine.
            let xen = XenBackend::new(spec.clone(), args.paging)
                .context("reading the Xen host libvirt drives")?;
            (spec.transport, xen.host())
        }
        _ => (Transport::Local, host_info),
    };
    LibvirtBackend::on(&args.libvirt_uri, host_info, at).context("the libvirt backend cannot start")
}

/// `hvbench run`; returns the process exit status.
pub fn run(args: &RunArgs) -> Result<i32> {
    // A run that died while it drove KSM left its settings changed: put them back before
    // anything is measured.
    match hvbench::run::ksm::restore_stale_at_start() {
        Ok(Some(message)) => hvbench::say!("hvbench: {message}"),
        Ok(None) => {}
        Err(e) => hvbench::say!("hvbench: warning: {e}"),
    }
    let Some(kind) = args.backend else {
        bail!("--backend is needed (or --matrix with --cell or --shard)");
    };
    // Likewise the CPU cgroups of a killed sched.fairness run.
    match hvbench::run::sched::remove_stale_at_start() {
        Ok(Some(message)) => hvbench::say!("hvbench: {message}"),
        Ok(None) => {}
        Err(e) => hvbench::say!("hvbench: warning: {e}"),
    }
    let workloads = plan::select(&args.workloads)?;
    run::check_params(&args.params, &workloads, args.memory_mib)?;
    let image = GuestImage::load(args.guest.as_deref())?;
    // Made (and refused) before any guest boots; removed when this function returns.
    let disk = super::disk::prepare(&args.disk, &workloads, &args.out)?;
    let backend = make_backend(args, kind, host::fingerprint(), disk.as_ref())?;
    // The machine the guest runs on: this one, or the Xen host.
    let host_info = backend.host();
    let mut writer = ResultsWriter::create(&args.out, args.append)?;
    for repair in writer.repairs() {
        hvbench::say!("hvbench: warning: {repair}");
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
        insn_markers: !args.no_insn_markers,
    };
    hvbench::say!(
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
    hvbench::tell!("{}", summary::table(&summary.records));
    for problem in &summary.problems {
        hvbench::say!("hvbench: note: {problem}");
    }
    if host_info.class().under_tcg {
        hvbench::tell!(
            "\nNote: the guest ran under QEMU's TCG translator ({}): these figures are \
             emulation artefacts. They prove that the path works, not how fast it is.\n",
            host_info.class
        );
    } else if host_info.cpl0() == Some(reports::host::Cpl0::Emulated) {
        hvbench::tell!(
            "\nNote: this host ({}) emulates guest CPL0 code instruction by instruction; \
             cpl0 workloads measure that emulator, cpl3 workloads run natively.\n",
            host_info.kvm_module
        );
    }
    hvbench::tell!(
        "\nRecords: {} and {}\n",
        writer.jsonl_path().display(),
        writer.csv_path().display()
    );
    if summary.interrupted {
        hvbench::say!("hvbench: interrupted; every record measured so far is saved");
        return Ok(EXIT_INTERRUPTED);
    }
    if summary.records.is_empty() {
        bail!("no records were produced");
    }
    // Xen's guest wrote to a copy on the dom0: fetch it before the check.
    let fetched = match backend.fetch_disk() {
        Ok(()) => true,
        Err(e) => {
            hvbench::say!("hvbench: disk check failed: {e}");
            false
        }
    };
    let disk_ok = fetched && disk.as_ref().is_none_or(super::disk::check);
    Ok(match summary.status() {
        Status::Success | Status::Skip if disk_ok => 0,
        _ => EXIT_NOT_ALL_SUCCEEDED,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::Cli;

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

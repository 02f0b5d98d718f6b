//! `hvbench vmm`: our VMM as a plain process (the library's `standalone`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use hvbench::standalone;

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
    /// vCPUs; with more than one the VM has KVM's in-kernel irqchip and the guest starts
    /// the others by INIT/SIPI (`sched.steal` and `sched.fairness` use this).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=254))]
    pub vcpus: u32,
}

impl VmmArgs {
    fn options(&self) -> standalone::Options {
        standalone::Options {
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory_mib,
            guest: self.guest.clone(),
            timeout: Duration::from_secs(self.timeout_s),
            mergeable: self.mergeable,
            doorbell_stdin: self.doorbell_stdin,
            vcpus: self.vcpus,
        }
    }
}

/// `hvbench vmm`; the exit status is the guest's (its exit code, 124 on timeout, 125 if
/// it died without one or, with `--doorbell-stdin`, stdin ended first).
pub fn vmm(args: &VmmArgs) -> Result<i32> {
    Ok(standalone::run(&args.options())?)
}

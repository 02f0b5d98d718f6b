//! `hvbench vmm`: our VMM as a plain process (the library's `standalone`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use hvbench::migration::{Pause, Role};
use hvbench::standalone;
use vmm::migration::{MigrateOptions, MigrationAddr};

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
    /// Receive a live-migrated guest on `tcp:HOST:PORT` or `unix:PATH` instead of
    /// booting one (port 0: the kernel picks; stderr says which).
    #[arg(long, value_name = "ADDR", conflicts_with = "migrate_to")]
    pub incoming: Option<MigrationAddr>,
    /// Live-migrate the guest to a `hvbench vmm --incoming` at this address.
    #[arg(long, value_name = "ADDR")]
    pub migrate_to: Option<MigrationAddr>,
    /// Milliseconds after the boot at which the migration starts.
    #[arg(long, default_value_t = 1000, requires = "migrate_to")]
    pub migrate_after_ms: u64,
    /// Stop the pre-copy rounds once what is left would be sent within this.
    #[arg(long, default_value_t = 300, requires = "migrate_to")]
    pub downtime_ms: u64,
    /// Stop the pre-copy rounds after this many, whatever is left.
    #[arg(long, default_value_t = 30, requires = "migrate_to", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_rounds: u32,
    /// Before migrating, pause the guest for `--pause-ms` at this many ms after the boot
    /// (the downtime ruler's calibration).
    #[arg(long, requires_all = ["migrate_to", "pause_ms"])]
    pub pause_at_ms: Option<u64>,
    /// Length of that pause.
    #[arg(long, requires = "pause_at_ms")]
    pub pause_ms: Option<u64>,
    /// Instead of the timers, wait for `pause MS` and `migrate` lines on stdin.
    #[arg(long, requires = "migrate_to", conflicts_with_all = ["doorbell_stdin", "pause_at_ms"])]
    pub control_stdin: bool,
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
            migration: self.migration(),
            vcpus: self.vcpus,
        }
    }

    fn migration(&self) -> Option<Role> {
        if let Some(addr) = &self.incoming {
            return Some(Role::Incoming(addr.clone()));
        }
        self.migrate_to.as_ref().map(|to| Role::Outgoing {
            to: to.clone(),
            after: Duration::from_millis(self.migrate_after_ms),
            options: MigrateOptions {
                downtime_limit: Duration::from_millis(self.downtime_ms),
                max_rounds: self.max_rounds,
                ..MigrateOptions::default()
            },
            pause: self
                .pause_at_ms
                .zip(self.pause_ms)
                .map(|(at, length)| Pause {
                    at: Duration::from_millis(at),
                    length: Duration::from_millis(length),
                }),
            on_stdin: self.control_stdin,
        })
    }
}

/// `hvbench vmm`; the exit status is the guest's (its exit code, 124 on timeout, 125 if
/// it died without one or, with `--doorbell-stdin`, stdin ended first).
pub fn vmm(args: &VmmArgs) -> Result<i32> {
    Ok(standalone::run(&args.options())?)
}

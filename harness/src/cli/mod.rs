//! The command line: parsing (clap) and one module per subcommand, each turning its
//! arguments into a call on the hvbench library and its result into output and an exit
//! status. Errors become `anyhow` here, at the binary's edge.

mod disk;
mod host;
mod lab;
mod list;
mod matrix;
mod report;
mod run;
mod vmm;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use host::HostAction;
pub use lab::LabAction;
pub use matrix::{MatrixAction, MergeArgs, PlanArgs};
pub use report::{CompareArgs, ReportArgs};
pub use run::RunArgs;
pub use vmm::VmmArgs;

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
    Run(Box<RunArgs>),
    /// Our VMM as a plain process: boot the guest with a command line, copy its console to
    /// stdout, exit with its status. For debugging guests and timing the VMM's start.
    Vmm(VmmArgs),
    /// Render results directories as one HTML page with charts: KVM beside Xen (or
    /// whichever backends the records hold), with intervals, ratios and warnings.
    Report(ReportArgs),
    /// A/B check: every measurement common to BASE and NEW, with its change and verdict.
    /// Exit status 1 when any measurement regressed significantly.
    Compare(CompareArgs),
    /// The cells of a benchmark matrix file, each with its id, host label and command,
    /// packed into shards: as text, JSON, or a GitHub Actions matrix.
    Plan(PlanArgs),
    /// Merge the bundles of a matrix (`hvbench run --cell/--shard`) into one results
    /// directory, checking that every planned cell is there exactly once.
    Merge(MergeArgs),
    /// A benchmark matrix on this machine: every cell it can run, merged and reported.
    Matrix {
        #[command(subcommand)]
        action: MatrixAction,
    },
    /// Deploy, inspect or remove a hypervisor host nested in QEMU (a lab), for machines
    /// where none exists.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

/// Exit status of `hvbench run` (and of a matrix part) when some workloads did not
/// succeed (records written).
pub const EXIT_NOT_ALL_SUCCEEDED: i32 = 3;
/// Exit status after Ctrl-C (records so far written).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Dispatches a parsed command line; returns the exit status.
pub fn main(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::List => {
            hvbench::tell!("{}", list::list());
            Ok(0)
        }
        Command::Host { json, action } => host::host(json, action.as_ref()),
        Command::Run(args) if args.part.given() => matrix::run_part(&args.part),
        Command::Run(args) => run::run(&args),
        Command::Vmm(args) => vmm::vmm(&args),
        Command::Lab { action } => lab::lab(&action),
        Command::Report(args) => report::report(&args),
        Command::Compare(args) => report::compare(&args),
        Command::Plan(args) => matrix::plan(&args),
        Command::Merge(args) => matrix::merge_cmd(&args),
        Command::Matrix { action } => matrix::matrix_run(&action),
    }
}

//! `mem.ksm`: Linux kernel samepage merging across several guests, driven by the host.
//!
//! N guests (separate `hvbench vmm` processes with MADV_MERGEABLE RAM) fill their memory
//! partly with pages identical across guests and wait on a doorbell. hvbench takes the KSM
//! lock, saves KSM's settings, starts KSM with the stated ones, and samples
//! `/sys/kernel/mm/ksm`, the VMMs' `smaps_rollup` and ksmd's CPU time until the sharing
//! settles. It then puts KSM's settings back, rings guest 0 to time first writes to merged
//! and unmerged pages, and ends every guest.
//!
//! The KSM controller (counters, the settings guard, procfs, the arithmetic) is the `ksm`
//! crate; this module is the workload on top of it:
//!
//! - [`guests`]: the VMM processes;
//! - [`params`]: the workload's parameters;
//! - [`workload`]: the sequence above, ending in a [`crate::run::session::WorkloadOutcome`];
//! - here: where the guard keeps its files on this host.

pub(crate) mod guests;
pub(crate) mod params;
pub(crate) mod workload;

use ksm::KsmPaths;
use thiserror::Error;
use workloads::protocol::Status;

pub(crate) use self::workload::run;

/// The real /sys/kernel/mm/ksm, with the guard's files in hvbench's state directory.
pub fn system_paths() -> KsmPaths {
    KsmPaths::system()
}

/// Why `mem.ksm` did not finish: the controller's errors, and the workload's own.
#[derive(Debug, Error)]
pub(crate) enum MemKsmError {
    #[error(transparent)]
    Controller(#[from] ksm::KsmError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Param(String),
    #[error("guest {index}: {problem}")]
    Guest { index: usize, problem: String },
    #[error("guest {index} crashed: {detail}")]
    Crash { index: usize, detail: String },
    #[error("guest {index} skipped the workload: {reason}")]
    Skipped { index: usize, reason: String },
    #[error("{0}")]
    Timeout(String),
    #[error("interrupted (Ctrl-C) while {0}")]
    Interrupted(String),
    #[error("{0}")]
    Host(String),
}

impl MemKsmError {
    /// The record status this error stands for.
    pub(crate) fn status(&self) -> Status {
        match self {
            MemKsmError::Timeout(_) => Status::Timeout,
            MemKsmError::Crash { .. } => Status::Crash,
            MemKsmError::Skipped { .. } => Status::Skip,
            _ => Status::Error,
        }
    }
}

/// At the start of every `hvbench run`: puts back KSM settings a dead run left changed.
/// Returns the message to show, if there was anything to restore.
pub fn restore_stale_at_start() -> Result<Option<String>, ksm::KsmError> {
    ksm::restore_stale(&system_paths())
}

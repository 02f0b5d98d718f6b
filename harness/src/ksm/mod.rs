//! `mem.ksm`: Linux kernel samepage merging across several guests, driven by the host.
//!
//! N guests (separate `hvbench vmm` processes with MADV_MERGEABLE RAM) fill their memory
//! partly with pages identical across guests and wait on a doorbell. hvbench takes the KSM
//! lock, saves KSM's settings, starts KSM with the stated ones, and samples
//! `/sys/kernel/mm/ksm`, the VMMs' `smaps_rollup` and ksmd's CPU time until the sharing
//! settles. It then puts KSM's settings back, rings guest 0 to time first writes to merged
//! and unmerged pages, and ends every guest.
//!
//! - [`sysfs`]: KSM's counters and tunables;
//! - [`guard`]: the only writer of those tunables, with the state file and lock;
//! - [`procstat`]: RSS/PSS, CPU time and per-process KSM figures from procfs;
//! - [`guests`]: the VMM processes;
//! - [`analysis`]: convergence and time to 90%;
//! - [`params`]: the workload's parameters;
//! - [`workload`]: the sequence above, ending in a [`crate::run::session::WorkloadOutcome`].

pub mod analysis;
pub mod guard;
pub mod guests;
pub mod params;
pub mod procstat;
pub mod sysfs;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;
use workloads::protocol::Status;

pub use self::guard::{restore_stale, KsmGuard, KsmPaths};
pub use self::workload::run;

impl From<crate::statefile::StateFileError> for KsmError {
    fn from(e: crate::statefile::StateFileError) -> Self {
        use crate::statefile::StateFileError;
        match e {
            StateFileError::Io {
                action,
                path,
                source,
            } => KsmError::Io {
                what: format!("{action} {}", path.display()),
                source,
            },
            StateFileError::Json { path, reason } => KsmError::StateFile {
                path,
                problem: reason,
            },
        }
    }
}

#[derive(Debug, Error)]
pub enum KsmError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} is not what hvbench expected: {text:?}")]
    Parse { what: String, text: String },
    #[error("{0}")]
    Param(String),
    #[error(
        "the KSM state file {path} cannot be used ({problem}): put /sys/kernel/mm/ksm back \
         by hand if needed, then remove it"
    )]
    StateFile { path: PathBuf, problem: String },
    #[error("restoring KSM's settings: {0}")]
    Restore(String),
    #[error("another hvbench run (pid {holder}) is using KSM; gave up after {waited:.0?}")]
    Busy { holder: String, waited: Duration },
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

impl KsmError {
    /// The record status this error stands for.
    pub fn status(&self) -> Status {
        match self {
            KsmError::Timeout(_) => Status::Timeout,
            KsmError::Crash { .. } => Status::Crash,
            KsmError::Skipped { .. } => Status::Skip,
            _ => Status::Error,
        }
    }
}

/// At the start of every `hvbench run`: puts back KSM settings a dead run left changed.
/// Returns the message to show, if there was anything to restore.
pub fn restore_stale_at_start() -> Result<Option<String>, KsmError> {
    restore_stale(&KsmPaths::system())
}

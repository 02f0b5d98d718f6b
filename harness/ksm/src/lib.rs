//! hvbench's KSM controller: what a program needs to drive Linux kernel samepage merging
//! and leave it as it found it.
//!
//! - [`KsmSysfs`]: `/sys/kernel/mm/ksm`, its [`KsmCounters`] and tunables, read only;
//! - [`KsmGuard`]: the only writer of those tunables, which saves them to a state file
//!   under a lock before it writes and puts them back when it goes; [`restore_stale`]
//!   puts back what a dead run left changed;
//! - [`procstat`]: RSS/PSS, CPU time and per-process KSM figures from procfs;
//! - [`analysis`]: when the sharing has settled, the time to 90%, the memory saved.
//!
//! The `mem.ksm` workload that uses these (its guests, parameters and sequence) is
//! hvbench's runner policy and lives in the harness.

pub mod analysis;
mod guard;
pub mod procstat;
mod sysfs;

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use self::guard::{restore_stale, KsmGuard, KsmPaths, SavedSetting, SavedSettings};
pub use self::sysfs::{KsmCounters, KsmSysfs};

#[derive(Debug, Error)]
pub enum KsmError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} is not what hvbench expected: {text:?}")]
    Parse { what: String, text: String },
    #[error(
        "the KSM state file {path} cannot be used ({problem}): put /sys/kernel/mm/ksm back \
         by hand if needed, then remove it"
    )]
    StateFile { path: PathBuf, problem: String },
    #[error("restoring KSM's settings: {0}")]
    Restore(String),
    #[error("another hvbench run (pid {holder}) is using KSM; gave up after {waited:.0?}")]
    Busy { holder: String, waited: Duration },
}

impl From<hostutil::statefile::StateFileError> for KsmError {
    fn from(e: hostutil::statefile::StateFileError) -> Self {
        use hostutil::statefile::StateFileError;
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

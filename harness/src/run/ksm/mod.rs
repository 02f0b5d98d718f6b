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
//! - here: the guard's state files, kept by [`crate::statefile`], and its messages.

pub(crate) mod guests;
pub(crate) mod params;
pub(crate) mod workload;

use std::fs::File;
use std::path::Path;

use ksm::{GuardEnv, KsmPaths, SavedSettings};
use thiserror::Error;
use workloads::protocol::Status;

use crate::statefile::{self, StateFileError};

pub(crate) use self::workload::run;

/// The guard's state and lock files as hvbench keeps all of its own ([`statefile`]), and
/// its messages through `say!`.
#[derive(Debug)]
struct HvbenchGuardEnv;

fn ksm_error(e: StateFileError) -> ksm::KsmError {
    match e {
        StateFileError::Io {
            action,
            path,
            source,
        } => ksm::KsmError::Io {
            what: format!("{action} {}", path.display()),
            source,
        },
        StateFileError::Json { path, reason } => ksm::KsmError::StateFile {
            path,
            problem: reason,
        },
    }
}

impl GuardEnv for HvbenchGuardEnv {
    fn open_lock(&self, path: &Path) -> Result<File, ksm::KsmError> {
        statefile::open_lock_file(path).map_err(ksm_error)
    }

    fn read_state(&self, path: &Path) -> Result<Option<SavedSettings>, ksm::KsmError> {
        statefile::read_json(path).map_err(ksm_error)
    }

    fn write_state(&self, path: &Path, saved: &SavedSettings) -> Result<(), ksm::KsmError> {
        statefile::write_json(path, saved).map_err(ksm_error)
    }

    fn say(&self, line: &str) {
        crate::say!("{line}");
    }
}

/// The real /sys/kernel/mm/ksm, with the guard's files in hvbench's state directory.
pub fn system_paths() -> KsmPaths {
    KsmPaths::system(statefile::SYSTEM_STATE_DIR, &HvbenchGuardEnv)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use ksm::{KsmGuard, KsmSysfs};

    use super::*;

    /// The guard on hvbench's own state files: the settings go back, and a damaged state
    /// file is refused with the message that says what to do.
    #[test]
    fn the_guard_keeps_its_state_through_statefile() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("ksm");
        std::fs::create_dir(&sysfs).unwrap();
        std::fs::write(sysfs.join("run"), "0\n").unwrap();
        let paths = KsmPaths {
            sysfs: KsmSysfs::at(&sysfs),
            state_dir: dir.path().join("run/hvbench"),
            env: &HvbenchGuardEnv,
        };
        let never = AtomicBool::new(false);
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &never).unwrap();
        guard.apply(&[("run", "1".into())]).unwrap();
        let saved: SavedSettings = statefile::read_json(&paths.state_file()).unwrap().unwrap();
        assert_eq!(saved.settings[0].before, "0");
        assert_eq!(guard.restore().unwrap().unwrap(), "run 1 -> 0");
        drop(guard);
        assert!(!paths.state_file().exists());

        std::fs::write(paths.state_file(), "{ not json").unwrap();
        let e = ksm::restore_stale(&paths).unwrap_err();
        assert!(matches!(e, ksm::KsmError::StateFile { .. }), "{e}");
        assert!(e.to_string().contains("ksm-settings.json"), "{e}");
    }
}

//! hvbench's CPU cgroups: the host set-up of `sched.fairness` and `sched.steal`. Each
//! guest's VMM process goes into a group of its own with a weight (and, capped, a quota),
//! on whichever hierarchy the host has ([`Hierarchy`]: cgroup v2's `cpu.weight` and
//! `cpu.max`, or v1's `cpu.shares` and `cpu.cfs_quota_us`); groups are created and removed
//! only through [`CgroupGuard`], so none outlives a run, not even a killed one.
//!
//! Direct cgroupfs rather than the cgroups-rs crate: the workloads need five files (a
//! weight, a cap, `cgroup.procs`, and v2's `subtree_control`), and the guard's state file
//! must name every directory before it exists, which a wrapper that creates groups itself
//! would hide.

mod guard;
mod hierarchy;

use std::time::Duration;

use thiserror::Error;

pub use self::guard::{remove_stale, CgroupGuard, CgroupPaths, GroupLimits, SavedGroups};
pub use self::hierarchy::{Hierarchy, CAP_PERIOD_US};

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no CPU cgroup controller: {0}")]
    NoCpuController(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    StateFile(#[from] hostutil::statefile::StateFileError),
    #[error("removing cgroups: {0}")]
    Remove(String),
    #[error(
        "another hvbench run (pid {holder}) holds the cgroup lock; gave up after {waited:.0?}"
    )]
    Busy { holder: String, waited: Duration },
}

//! The only way hvbench creates cgroups: a guard that writes each group's path to a state
//! file before it creates it, and removes every group it made when dropped (the workload's
//! end, an error, Ctrl-C). A run killed outright leaves the state file; the next run that
//! takes the lock removes the groups it lists and says so. The lock (an exclusive `flock`
//! beside the state file, held for the guard's life) makes a state file whose lock nobody
//! holds certainly a dead run's. Files live in `/run`, emptied at boot like cgroupfs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use hostutil::{rfc3339, statefile};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use crate::hierarchy::{parent_dir, Hierarchy};
use crate::CgroupError;

const LOCK_FILE: &str = "cgroups.lock";
const STATE_FILE: &str = "cgroups.json";
const STATE_FORMAT: u32 = 1;

/// Where cgroupfs is mounted, and where the guard keeps its lock and state file.
#[derive(Clone, Debug)]
pub struct CgroupPaths {
    pub fs_root: PathBuf,
    pub state_dir: PathBuf,
}

impl CgroupPaths {
    /// `/sys/fs/cgroup`, with the files in hvbench's state directory.
    pub fn system() -> Self {
        CgroupPaths {
            fs_root: "/sys/fs/cgroup".into(),
            state_dir: statefile::SYSTEM_STATE_DIR.into(),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    fn lock_file(&self) -> PathBuf {
        self.state_dir.join(LOCK_FILE)
    }
}

/// The state file: the groups a run made (parents first), to remove without that run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGroups {
    pub format: u32,
    pub pid: u32,
    pub saved_at: String,
    pub groups: Vec<PathBuf>,
}

impl statefile::Versioned for SavedGroups {
    fn format(&self) -> u32 {
        self.format
    }
}

/// How one group is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimits {
    /// Relative weight (1 = the default share).
    pub weight: u32,
    /// CPU time per 100 ms period, in microseconds; `None` for work-conserving.
    pub quota_us: Option<u64>,
}

/// Holds the cgroup lock; removes every group it created when dropped.
#[derive(Debug)]
pub struct CgroupGuard {
    paths: CgroupPaths,
    hierarchy: Hierarchy,
    lock: Option<Flock<File>>,
    saved: SavedGroups,
    /// What was removed of a dead run's groups when the lock was taken, if anything.
    pub stale_removed: Option<String>,
}

fn try_lock(paths: &CgroupPaths) -> Result<Option<Flock<File>>, CgroupError> {
    Ok(statefile::try_lock(&paths.lock_file())?)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CgroupError {
    move |source| CgroupError::Io { what, source }
}

fn write_file(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(name);
    std::fs::write(&path, value).map_err(io(format!("writing {value} to {}", path.display())))
}

/// How long a group may stay busy while its last tasks finish exiting (a killed run's
/// VMMs end when their input closes; the kernel lets the group go only once they are
/// gone, and this machine's init reaps late).
const BUSY_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Moves whatever still runs in `group` to the hierarchy's root (so it can be removed),
/// then removes it, retrying while the kernel says it is busy (tasks still exiting), up
/// to [`BUSY_LIMIT`]. A group that is already gone is fine.
fn remove_group(group: &Path, root: &Path) -> Result<bool, CgroupError> {
    let deadline = std::time::Instant::now() + BUSY_LIMIT;
    loop {
        if !group.exists() {
            return Ok(false);
        }
        move_tasks_out(group, root);
        match std::fs::remove_dir(group) {
            Ok(()) => return Ok(true),
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(BUSY_RETRY);
            }
            Err(e) => {
                return Err(io(format!("removing cgroup {}", group.display()))(e));
            }
        }
    }
}

/// Moves the processes (`cgroup.procs`) and, on v1, the threads (`tasks`) of `group` to
/// `root`. A task that ended meanwhile cannot be moved, and need not be.
fn move_tasks_out(group: &Path, root: &Path) {
    for file in ["cgroup.procs", "tasks"] {
        let listed = std::fs::read_to_string(group.join(file)).unwrap_or_default();
        for id in listed.split_ascii_whitespace() {
            let _ = std::fs::write(root.join(file), id);
        }
    }
}

/// Removes the listed groups, children first; tries every one. Returns those removed.
fn remove_all(groups: &[PathBuf], root: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for group in groups.iter().rev() {
        match remove_group(group, root) {
            Ok(true) => removed.push(group.clone()),
            Ok(false) => {}
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(removed)
    } else {
        Err(CgroupError::Remove(failures.join("; ")))
    }
}

/// The root a saved group belongs to: the directory above its `hvbench-<pid>` parent.
fn root_of(group: &Path) -> PathBuf {
    group
        .ancestors()
        .find(|a| {
            a.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("hvbench-"))
        })
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// With the lock held: removes the groups a dead run's state file lists.
fn remove_stale_locked(paths: &CgroupPaths) -> Result<Option<String>, CgroupError> {
    let path = paths.state_file();
    let Some(saved) = statefile::read_versioned::<SavedGroups>(&path, STATE_FORMAT)? else {
        return Ok(None);
    };
    let root = saved.groups.first().map(|g| root_of(g)).unwrap_or_default();
    let removed = remove_all(&saved.groups, &root)?;
    statefile::remove(&path)?;
    let names: Vec<String> = removed.iter().map(|g| g.display().to_string()).collect();
    Ok(Some(format!(
        "cgroups left by hvbench pid {} (which did not finish; saved {}) were removed: {}",
        saved.pid,
        saved.saved_at,
        if names.is_empty() {
            "none was still there".to_string()
        } else {
            names.join(", ")
        }
    )))
}

/// At the start of a run: removes the groups a dead run left, if its state file is there
/// and no live run holds the lock. Never waits.
pub fn remove_stale(paths: &CgroupPaths) -> Result<Option<String>, CgroupError> {
    if !paths.state_file().exists() {
        return Ok(None);
    }
    match try_lock(paths)? {
        None => Ok(None),
        Some(_lock) => remove_stale_locked(paths),
    }
}

impl CgroupGuard {
    /// Takes the lock (waiting up to `wait` while another run holds it, unless
    /// `interrupted`), removes a dead run's groups, and finds the CPU controller.
    pub fn acquire(
        paths: CgroupPaths,
        wait: Duration,
        interrupted: &AtomicBool,
    ) -> Result<Self, CgroupError> {
        let lock = statefile::lock_waiting(&paths.lock_file(), wait, interrupted, |_| {})?
            .map_err(|busy| CgroupError::Busy {
                holder: busy.holder,
                waited: busy.waited,
            })?;
        let stale_removed = remove_stale_locked(&paths)?;
        let hierarchy = Hierarchy::detect(&paths.fs_root)?;
        Ok(CgroupGuard {
            paths,
            hierarchy,
            lock: Some(lock),
            saved: SavedGroups {
                format: STATE_FORMAT,
                pid: std::process::id(),
                saved_at: rfc3339(SystemTime::now()),
                groups: Vec::new(),
            },
            stale_removed,
        })
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Records `dir` in the state file, then creates it.
    fn make(&mut self, dir: PathBuf) -> Result<(), CgroupError> {
        self.saved.groups.push(dir.clone());
        statefile::write_json(&self.paths.state_file(), &self.saved)?;
        std::fs::create_dir(&dir).map_err(io(format!("creating cgroup {}", dir.display())))
    }

    /// Creates group `index` (and, first, this run's parent group) with `limits`.
    pub fn create(&mut self, index: usize, limits: GroupLimits) -> Result<PathBuf, CgroupError> {
        let parent = parent_dir(&self.hierarchy, self.saved.pid);
        if !self.saved.groups.contains(&parent) {
            self.make(parent.clone())?;
            if let Some((file, value)) = self.hierarchy.enable_for_children() {
                write_file(&parent, file, value)?;
            }
        }
        let group = parent.join(format!("g{index}"));
        self.make(group.clone())?;
        for (file, value) in self.hierarchy.weight_files(limits.weight) {
            write_file(&group, file, &value)?;
        }
        if let Some(quota) = limits.quota_us {
            for (file, value) in self.hierarchy.cap_files(quota) {
                write_file(&group, file, &value)?;
            }
        }
        Ok(group)
    }

    /// Moves process `pid` (all its threads) into `group`.
    pub fn add_process(&self, group: &Path, pid: u32) -> Result<(), CgroupError> {
        write_file(group, "cgroup.procs", &pid.to_string())
    }

    /// Removes every group this guard made and its state file. Idempotent.
    pub fn remove(&mut self) -> Result<Vec<PathBuf>, CgroupError> {
        if self.saved.groups.is_empty() {
            return Ok(Vec::new());
        }
        let removed = remove_all(&self.saved.groups, self.hierarchy.root())?;
        self.saved.groups.clear();
        statefile::remove(&self.paths.state_file())?;
        Ok(removed)
    }

    /// Lets go of the lock without removing anything, as a killed run would (tests only).
    #[cfg(test)]
    fn die(mut self) {
        self.saved.groups.clear();
        self.lock = None;
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            hostutil::say!(
                "hvbench: removing cgroups failed: {e}; {} lists them for the next run to remove",
                self.paths.state_file().display()
            );
        }
        self.lock = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 layout in a temporary directory. cgroupfs removes a group's control files with
    /// it; a plain directory does not, so the tests write none inside groups they remove
    /// (the weight goes to a file only real cgroupfs would have: see `real_cgroupfs`).
    fn fake_v1() -> (tempfile::TempDir, CgroupPaths) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fs/cpu")).unwrap();
        std::fs::write(dir.path().join("fs/cpu/cpu.shares"), "1024").unwrap();
        let paths = CgroupPaths {
            fs_root: dir.path().join("fs"),
            state_dir: dir.path().join("state"),
        };
        (dir, paths)
    }

    #[test]
    fn a_killed_runs_groups_are_removed_by_the_next_and_said_so() {
        let (_dir, paths) = fake_v1();
        let no = AtomicBool::new(false);
        let mut guard = CgroupGuard::acquire(paths.clone(), Duration::ZERO, &no).unwrap();
        assert!(guard.stale_removed.is_none());
        let parent = parent_dir(guard.hierarchy(), std::process::id());
        guard.make(parent.clone()).unwrap();
        guard.make(parent.join("g0")).unwrap();
        let saved: SavedGroups = statefile::read_json(&paths.state_file()).unwrap().unwrap();
        assert_eq!(saved.groups, vec![parent.clone(), parent.join("g0")]);
        guard.die();
        assert!(parent.join("g0").exists(), "a killed run removes nothing");
        let message = remove_stale(&paths).unwrap().unwrap();
        assert!(
            message.contains("were removed") && message.contains("g0"),
            "{message}"
        );
        assert!(!parent.exists());
        assert!(!paths.state_file().exists());
        assert_eq!(remove_stale(&paths).unwrap(), None);
    }

    #[test]
    fn a_live_runs_groups_are_left_alone_and_a_second_run_waits() {
        let (_dir, paths) = fake_v1();
        let no = AtomicBool::new(false);
        let mut guard = CgroupGuard::acquire(paths.clone(), Duration::ZERO, &no).unwrap();
        let parent = parent_dir(guard.hierarchy(), std::process::id());
        guard.make(parent.clone()).unwrap();
        assert_eq!(remove_stale(&paths).unwrap(), None);
        assert!(parent.exists());
        let busy = CgroupGuard::acquire(paths.clone(), Duration::ZERO, &no).unwrap_err();
        assert!(matches!(busy, CgroupError::Busy { .. }), "{busy}");
        drop(guard);
        assert!(!parent.exists(), "dropping the guard removes its groups");
        assert!(!paths.state_file().exists());
    }

    /// On the real cgroupfs (root, a CPU controller): groups with weights, a process in
    /// one, and nothing left after the guard is dropped.
    #[test]
    fn real_cgroupfs() {
        let system = CgroupPaths::system();
        if Hierarchy::detect(&system.fs_root).is_err() || !nix::unistd::geteuid().is_root() {
            eprintln!("notice: no writable CPU cgroup controller here; skipping");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let paths = CgroupPaths {
            fs_root: system.fs_root,
            state_dir: state.path().to_path_buf(),
        };
        let no = AtomicBool::new(false);
        let mut guard = CgroupGuard::acquire(paths, Duration::ZERO, &no).unwrap();
        let limits = GroupLimits {
            weight: 2,
            quota_us: Some(50_000),
        };
        let group = guard.create(0, limits).unwrap();
        let (file, value) = guard.hierarchy().weight_files(2)[0].clone();
        assert_eq!(
            std::fs::read_to_string(group.join(file)).unwrap().trim(),
            value
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        guard.add_process(&group, child.id()).unwrap();
        let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap();
        assert!(procs
            .split_whitespace()
            .any(|p| p == child.id().to_string()));
        let removed = guard.remove().unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!group.exists() && !group.parent().unwrap().exists());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

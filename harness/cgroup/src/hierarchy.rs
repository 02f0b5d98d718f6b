//! Which cgroup hierarchy controls CPU time on this host, and how each spells a weight and
//! a cap: cgroup v2 (`cpu.weight` 1..10000, default 100; `cpu.max` "QUOTA PERIOD") or
//! the v1 `cpu` controller (`cpu.shares` 2..262144, default 1024; `cpu.cfs_quota_us` and
//! `cpu.cfs_period_us`). Hosts with systemd's legacy or hybrid layout (this development
//! host among them) have v1's `cpu` controller and an empty v2 mount.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CgroupError;

/// The CPU controller's hierarchy and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hierarchy {
    /// The unified hierarchy with the `cpu` controller enabled for the root's children.
    V2 { root: PathBuf },
    /// The v1 `cpu` controller's own mount (`/sys/fs/cgroup/cpu`).
    V1 { root: PathBuf },
}

/// Period of a cap, in microseconds (both hierarchies' default).
pub const CAP_PERIOD_US: u64 = 100_000;

impl Hierarchy {
    /// Finds the CPU controller under `fs_root` (normally `/sys/fs/cgroup`).
    pub fn detect(fs_root: &Path) -> Result<Self, CgroupError> {
        let controllers = std::fs::read_to_string(fs_root.join("cgroup.controllers"));
        if let Ok(controllers) = controllers {
            if !has_word(&controllers, "cpu") {
                return Err(CgroupError::NoCpuController(format!(
                    "{} is cgroup v2 without the cpu controller",
                    fs_root.display()
                )));
            }
            let enabled =
                std::fs::read_to_string(fs_root.join("cgroup.subtree_control")).unwrap_or_default();
            if !has_word(&enabled, "cpu") {
                return Err(CgroupError::NoCpuController(format!(
                    "the cpu controller is not enabled in {}/cgroup.subtree_control (hvbench \
                     does not change that host-wide setting)",
                    fs_root.display()
                )));
            }
            return Ok(Hierarchy::V2 {
                root: fs_root.to_path_buf(),
            });
        }
        let v1 = fs_root.join("cpu");
        if v1.join("cpu.shares").exists() {
            return Ok(Hierarchy::V1 { root: v1 });
        }
        Err(CgroupError::NoCpuController(format!(
            "neither cgroup v2 ({}/cgroup.controllers) nor v1's cpu controller ({}/cpu.shares)",
            fs_root.display(),
            v1.display()
        )))
    }

    pub fn root(&self) -> &Path {
        match self {
            Hierarchy::V2 { root } | Hierarchy::V1 { root } => root,
        }
    }

    /// How records name it.
    pub fn describe(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "cgroup v2 (cpu.weight, cpu.max)",
            Hierarchy::V1 { .. } => "cgroup v1 (cpu.shares, cpu.cfs_quota_us)",
        }
    }

    /// The files and values that give a group `weight` (relative: 1 is the default
    /// share; 2 is twice that).
    pub fn weight_files(&self, weight: u32) -> Vec<(&'static str, String)> {
        let w = u64::from(weight.max(1));
        match self {
            Hierarchy::V2 { .. } => vec![("cpu.weight", (w * 100).clamp(1, 10_000).to_string())],
            Hierarchy::V1 { .. } => {
                vec![("cpu.shares", (w * 1024).clamp(2, 262_144).to_string())]
            }
        }
    }

    /// The files and values that cap a group at `quota_us` per [`CAP_PERIOD_US`].
    pub fn cap_files(&self, quota_us: u64) -> Vec<(&'static str, String)> {
        let quota = quota_us.max(1000);
        match self {
            Hierarchy::V2 { .. } => vec![("cpu.max", format!("{quota} {CAP_PERIOD_US}"))],
            Hierarchy::V1 { .. } => vec![
                ("cpu.cfs_period_us", CAP_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
        }
    }

    /// What a new parent group must be told so its children have the cpu controller.
    pub(crate) fn enable_for_children(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Hierarchy::V2 { .. } => Some(("cgroup.subtree_control", "+cpu")),
            Hierarchy::V1 { .. } => None,
        }
    }
}

fn has_word(text: &str, word: &str) -> bool {
    text.split_ascii_whitespace().any(|w| w == word)
}

/// The host's CPU scheduler by kernel release: EEVDF from Linux 6.6, CFS before.
pub fn linux_scheduler(release: &str) -> &'static str {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (6, 6) {
        "EEVDF"
    } else {
        "CFS"
    }
}

/// A group's directory: `hvbench-<pid>` under the hierarchy's root, children `g<i>`.
pub(crate) fn parent_dir(hierarchy: &Hierarchy, pid: u32) -> PathBuf {
    hierarchy.root().join(format!("hvbench-{pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_are_found_and_spell_weights_and_caps_their_own_way() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cpu")).unwrap();
        std::fs::write(dir.path().join("cpu/cpu.shares"), "1024\n").unwrap();
        let v1 = Hierarchy::detect(dir.path()).unwrap();
        assert_eq!(v1.root(), dir.path().join("cpu"));
        assert_eq!(v1.weight_files(2), vec![("cpu.shares", "2048".to_string())]);
        assert_eq!(
            v1.cap_files(50_000),
            vec![
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string())
            ]
        );
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io\n").unwrap();
        let refused = Hierarchy::detect(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("subtree_control"), "{refused}");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu io\n").unwrap();
        let v2 = Hierarchy::detect(dir.path()).unwrap();
        assert_eq!(v2.weight_files(4), vec![("cpu.weight", "400".to_string())]);
        assert_eq!(
            v2.weight_files(1000),
            vec![("cpu.weight", "10000".to_string())]
        );
        assert_eq!(
            v2.cap_files(25_000),
            vec![("cpu.max", "25000 100000".to_string())]
        );
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset io\n").unwrap();
        Hierarchy::detect(dir.path()).unwrap_err();
    }

    #[test]
    fn nothing_to_control_is_an_error_naming_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let e = Hierarchy::detect(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("cgroup.controllers") && e.contains("cpu.shares"),
            "{e}"
        );
    }

    #[test]
    fn the_scheduler_is_named_by_kernel_release() {
        assert_eq!(linux_scheduler("6.18.0-pvm"), "EEVDF");
        assert_eq!(linux_scheduler("6.6.1"), "EEVDF");
        assert_eq!(linux_scheduler("6.1.0-56-amd64"), "CFS");
        assert_eq!(linux_scheduler("5.15.0"), "CFS");
        assert_eq!(linux_scheduler("garbage"), "CFS");
    }
}

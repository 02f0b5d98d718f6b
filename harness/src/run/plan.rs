//! Which workloads a run executes: the table filtered by `--workload` globs, and the
//! backend's answer on whether each can mean anything there.

use thiserror::Error;
use workloads::table::glob_matches;
use workloads::{Requirement, WorkloadId, WORKLOADS};

use crate::backend::Hypervisor;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--workload {0:?} matches no workload (see `hvbench list`)")]
    NoMatch(String),
    #[error("no workload selected")]
    Empty,
}

/// Selects workloads by glob, in table order. Self-tests (which crash or hang the guest on
/// purpose) are taken only when named exactly.
pub fn select(patterns: &[String]) -> Result<Vec<WorkloadId>, PlanError> {
    let default = ["*".to_string()];
    let patterns = if patterns.is_empty() {
        &default[..]
    } else {
        patterns
    };
    let mut selected = Vec::new();
    for pattern in patterns {
        let mut matched = false;
        for w in WORKLOADS {
            let hit = if w.explicit_only {
                pattern == w.name
            } else {
                glob_matches(pattern, w.name)
            };
            if hit {
                matched = true;
                if !selected.contains(&w.id) {
                    selected.push(w.id);
                }
            }
        }
        if !matched {
            return Err(PlanError::NoMatch(pattern.clone()));
        }
    }
    if selected.is_empty() {
        return Err(PlanError::Empty);
    }
    selected.sort();
    Ok(selected)
}

/// Why the backend cannot run a workload, if it cannot.
pub fn backend_skip(id: WorkloadId, backend: &dyn Hypervisor) -> Option<String> {
    if let Some(reason) = backend.unavailable() {
        return Some(reason);
    }
    id.spec().requires.iter().find_map(|req| match req {
        Requirement::Backend(feature) => backend.supports(*feature).err(),
        Requirement::OnHypervisor(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        let all = select(&[]).unwrap();
        assert!(all.contains(&WorkloadId::CpuCpuid));
        assert!(
            !all.contains(&WorkloadId::SelftestHang),
            "self-tests only when named"
        );

        let cpu = select(&["cpu.*".into()]).unwrap();
        assert!(cpu.iter().all(|w| w.spec().group == workloads::Group::Cpu));

        let named =
            select(&["selftest.hang".into(), "cpu.idle".into(), "cpu.idle".into()]).unwrap();
        assert_eq!(named, vec![WorkloadId::CpuIdle, WorkloadId::SelftestHang]);

        assert_eq!(
            select(&["selftest.*".into()]),
            Err(PlanError::NoMatch("selftest.*".into()))
        );
        assert_eq!(
            select(&["nope".into()]),
            Err(PlanError::NoMatch("nope".into()))
        );
    }
}

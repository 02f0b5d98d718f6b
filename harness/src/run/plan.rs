//! Which workloads a run executes: the table filtered by `--workload` globs, the backend's
//! answer on whether each can mean anything there, and what each is asked for: its
//! parameters (the user's, else its row's defaults) and from them the series it may
//! report.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;
use workloads::table::glob_matches;
use workloads::{ParamSpec, Requirement, WorkloadId, WORKLOADS};

use super::WorkloadParam;
use crate::backend::Hypervisor;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--workload {0:?} matches no workload (see `hvbench list`)")]
    NoMatch(String),
    #[error("no workload selected")]
    Empty,
    #[error("--param {0}.{1} is given twice")]
    DuplicateParam(&'static str, String),
    #[error("{0}")]
    Param(String),
}

/// Refuses a parameter given twice (each was checked against its row when parsed), before
/// anything starts. `run::check_params` adds the host-driven workloads' own checks.
pub fn check_duplicates(params: &[WorkloadParam]) -> Result<(), PlanError> {
    for (i, p) in params.iter().enumerate() {
        if params[..i]
            .iter()
            .any(|q| q.workload == p.workload && q.key == p.key)
        {
            return Err(PlanError::DuplicateParam(p.workload.name(), p.key.clone()));
        }
    }
    Ok(())
}

/// The value of `spec` for `workload` in this run: the user's, else the row's default.
pub fn param_value<'a>(
    params: &'a [WorkloadParam],
    workload: WorkloadId,
    spec: &ParamSpec,
) -> Option<&'a str> {
    params
        .iter()
        .find(|p| p.workload == workload && p.key == spec.key)
        .map(|p| p.value.as_str())
        .or(spec.default)
}

/// Every parameter of `workload`'s row with its value in this run, for the records.
pub fn effective_params(
    params: &[WorkloadParam],
    workload: WorkloadId,
) -> BTreeMap<String, String> {
    workload
        .spec()
        .params
        .iter()
        .filter(|spec| spec.set_by == workloads::params::SetBy::User)
        .filter_map(|spec| {
            Some((
                spec.key.to_string(),
                param_value(params, workload, spec)?.to_string(),
            ))
        })
        .collect()
}

/// One series the host asked for: its name as the guest writes it (`ws:16k,page:4k`) and
/// the value of each series parameter, parsed and bounded by the host from its own
/// parameters (never from the guest's line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesPoint {
    pub name: String,
    values: Vec<(&'static str, u64)>,
}

impl SeriesPoint {
    /// The value of series parameter `spec` in this series.
    pub fn value(&self, spec: &ParamSpec) -> Option<u64> {
        self.values
            .iter()
            .find(|(k, _)| *k == spec.key)
            .map(|(_, v)| *v)
    }
}

/// The series `workload` may report in this run: every combination of the entries of its
/// series parameters, in row order (one unnamed series if it has none). Values that do not
/// check against the row make no series.
pub fn series_points(params: &[WorkloadParam], workload: WorkloadId) -> Vec<SeriesPoint> {
    let mut points = vec![SeriesPoint {
        name: String::new(),
        values: Vec::new(),
    }];
    for spec in workload.spec().series_params() {
        let Some(text) = param_value(params, workload, spec) else {
            return Vec::new();
        };
        if spec.check(text).is_err() {
            return Vec::new();
        }
        let mut next = Vec::new();
        for point in &points {
            for entry in spec.entries(text) {
                let Ok(value) = spec.parse_one(entry) else {
                    return Vec::new();
                };
                let mut p = point.clone();
                if !p.name.is_empty() {
                    p.name.push(',');
                }
                p.name.push_str(&format!("{}:{entry}", spec.key));
                p.values.push((spec.key, value));
                next.push(p);
            }
        }
        points = next;
    }
    points
}

/// The (metric, series) pairs each workload of a run may report; a sample of any other is
/// an error on the workload and is not kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedSeries {
    by_workload: BTreeMap<WorkloadId, BTreeSet<(&'static str, String)>>,
}

impl ExpectedSeries {
    pub fn new(workloads: &[WorkloadId], params: &[WorkloadParam]) -> Self {
        let by_workload = workloads
            .iter()
            .map(|&w| {
                let points = series_points(params, w);
                let set = w
                    .spec()
                    .metrics
                    .iter()
                    .flat_map(|m| points.iter().map(move |p| (m.name, p.name.clone())))
                    .collect();
                (w, set)
            })
            .collect();
        ExpectedSeries { by_workload }
    }

    /// Whether `workload` may report `metric` for series `params`.
    pub fn allows(&self, workload: WorkloadId, metric: &str, params: &str) -> bool {
        self.by_workload.get(&workload).is_some_and(|set| {
            set.iter()
                .any(|(m, p)| *m == metric && p.as_str() == params)
        })
    }

    /// How many series `workload` may report.
    pub fn count(&self, workload: WorkloadId) -> usize {
        self.by_workload.get(&workload).map_or(0, BTreeSet::len)
    }
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
        Requirement::Backend(feature) => backend.supports(*feature).err().map(|u| u.to_string()),
        Requirement::OnHypervisor(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(texts: &[&str]) -> Vec<WorkloadParam> {
        texts
            .iter()
            .map(|t| WorkloadParam::parse(t).unwrap())
            .collect()
    }

    #[test]
    fn series_come_from_the_hosts_parameters_and_the_rows_defaults() {
        let given = params(&["mem.tlb-chase.ws=64k,16m"]);
        let points = series_points(&given, WorkloadId::MemTlbChase);
        let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ws:64k,page:4k",
                "ws:64k,page:2m",
                "ws:16m,page:4k",
                "ws:16m,page:2m"
            ]
        );
        let ws = &workloads::table::param::TLB_CHASE_WS;
        assert_eq!(points[2].value(ws), Some(16 << 20));
        // Defaults: six working sets times two page sizes.
        assert_eq!(series_points(&[], WorkloadId::MemTlbChase).len(), 12);
        assert_eq!(series_points(&[], WorkloadId::CpuCpuid).len(), 1);

        let expected = ExpectedSeries::new(&[WorkloadId::MemTlbChase, WorkloadId::CpuIdle], &given);
        assert!(expected.allows(WorkloadId::MemTlbChase, "latency", "ws:16m,page:2m"));
        assert!(!expected.allows(WorkloadId::MemTlbChase, "latency", "ws:1m,page:2m"));
        assert!(!expected.allows(WorkloadId::MemTlbChase, "bandwidth", "ws:16m,page:2m"));
        assert!(expected.allows(WorkloadId::CpuIdle, "latency", ""));
        assert!(!expected.allows(WorkloadId::CpuIdle, "latency", "p=1"));
        assert!(!expected.allows(WorkloadId::CpuCpuid, "latency", ""));
        assert_eq!(expected.count(WorkloadId::MemTlbChase), 4);
    }

    #[test]
    fn parameters_given_twice_are_refused_and_defaults_fill_the_rest() {
        use crate::run::check_params;
        let twice = params(&["mem.copy.size=1m", "mem.copy.size=2m"]);
        assert_eq!(
            check_params(&twice, &[], 256),
            Err(PlanError::DuplicateParam("mem.copy", "size".into()))
        );
        // Sizes that cannot fit in the guest are refused before anything starts.
        let ksm = params(&["mem.ksm.size=64m"]);
        check_params(&ksm, &[WorkloadId::MemKsm], 256).unwrap();
        assert!(check_params(&ksm, &[WorkloadId::MemKsm], 64).is_err());
        check_params(&ksm, &[WorkloadId::CpuIdle], 64).unwrap();
        let balloon = params(&["mem.balloon.size=3g"]);
        assert!(check_params(&balloon, &[WorkloadId::MemBalloon], 256).is_err());
        assert_eq!(
            check_params(
                &params(&["mem.copy.size=1m", "mem.seq-read.size=1m"]),
                &[],
                256
            ),
            Ok(())
        );
        let effective = effective_params(&params(&["mem.ksm.guests=2"]), WorkloadId::MemKsm);
        assert_eq!(effective.get("guests").map(String::as_str), Some("2"));
        assert_eq!(effective.get("identical").map(String::as_str), Some("0.5"));
        assert!(
            !effective.contains_key("size"),
            "no default: depends on the guest"
        );
    }

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

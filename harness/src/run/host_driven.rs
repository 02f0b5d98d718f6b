//! Workloads the host orchestrates (`Driver::Host` in the table names the runner): several guests, or
//! measurements only the host can take (KSM sharing, reclaimed memory). Each has a module
//! of its own; this is where the run hands them over.

use workloads::protocol::Status;
use workloads::{Driver, HostRunner, WorkloadId};

use super::host_context::{HostContext, HostDriven, Runner};
use super::plan::PlanError;
use super::session::WorkloadOutcome;
use super::WorkloadParam;

fn ksm(_: WorkloadId, ctx: &HostContext) -> HostDriven {
    // KSM's guests run in VMM processes of their own; their words are in the notes.
    super::ksm::run(ctx).into()
}

/// The host's runner of `id`; `None` for workloads the guest drives.
pub fn runner(id: WorkloadId) -> Option<Runner> {
    match id.spec().driver {
        Driver::Guest => None,
        Driver::Host(HostRunner::Ksm) => Some(ksm),
        Driver::Host(HostRunner::Balloon) => Some(super::balloon::run),
        Driver::Host(HostRunner::Lifecycle) => Some(super::lifecycle::run),
        Driver::Host(HostRunner::SchedSteal) => Some(super::sched::run_steal),
        Driver::Host(HostRunner::SchedFairness) => Some(super::sched::run_fairness),
    }
}

/// Refuses, before anything starts, parameters of the selected host-driven workloads
/// that cannot work together or do not fit in the guest's `memory_mib`.
pub fn check_params(
    workloads: &[WorkloadId],
    params: &[WorkloadParam],
    memory_mib: u32,
) -> Result<(), PlanError> {
    for id in workloads {
        let Driver::Host(runner) = id.spec().driver else {
            continue;
        };
        match runner {
            HostRunner::Ksm => super::ksm::params::KsmParams::from_run(params, memory_mib)
                .map(drop)
                .map_err(|e| PlanError::Param(e.to_string()))?,
            HostRunner::Balloon => super::balloon::balloon_size(params, memory_mib)
                .map(drop)
                .map_err(PlanError::Param)?,
            // `boots` is checked against its bounds with every parameter.
            HostRunner::Lifecycle => {}
            HostRunner::SchedSteal | HostRunner::SchedFairness => {
                super::sched::check_params(*id, params).map_err(PlanError::Param)?
            }
        }
    }
    Ok(())
}

/// Runs one host-driven workload to its outcome (never panics; failures are statuses).
pub fn run(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    match runner(id) {
        Some(run) => run(id, ctx),
        None => WorkloadOutcome::failed(
            id,
            Status::Error,
            format!("{} is driven by the guest, not the host", id.name()),
        )
        .into(),
    }
}

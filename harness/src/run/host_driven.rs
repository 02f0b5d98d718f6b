//! Workloads the host orchestrates (`Driver::Host` in the table names the runner): several guests, or
//! measurements only the host can take (KSM sharing, reclaimed memory). Each has a module
//! of its own; this is where the run hands them over.

use std::sync::atomic::AtomicBool;

use workloads::protocol::{Hello, Status};
use workloads::{Driver, HostRunner, WorkloadId};

use super::session::WorkloadOutcome;
use super::RunOptions;
use crate::backend::Hypervisor;
use crate::guest_image::GuestImage;

/// What a host-driven workload gets to work with.
#[derive(Debug)]
pub struct HostContext<'a> {
    pub backend: &'a dyn Hypervisor,
    pub image: &'a GuestImage,
    pub options: &'a RunOptions,
    pub interrupted: &'a AtomicBool,
}

/// What a host-driven workload produced: its outcome, and what the guest it booted said
/// about itself (for the record's guest section and TSC conversion), if it booted one.
#[derive(Debug)]
pub struct HostDriven {
    pub outcome: WorkloadOutcome,
    pub hello: Option<Hello>,
}

/// A workload that booted no guest of its own (or none that said hello).
impl From<WorkloadOutcome> for HostDriven {
    fn from(outcome: WorkloadOutcome) -> Self {
        HostDriven {
            outcome,
            hello: None,
        }
    }
}

/// How the host runs one workload it drives.
pub type Runner = fn(WorkloadId, &HostContext) -> HostDriven;

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
    }
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

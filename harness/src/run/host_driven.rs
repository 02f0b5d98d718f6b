//! Workloads the host orchestrates (`Driver::Host` in the table): several guests, or
//! measurements only the host can take (KSM sharing, reclaimed memory). Each has a module
//! of its own; this is where the run hands them over.

use std::sync::atomic::AtomicBool;

use workloads::protocol::{Hello, Status};
use workloads::WorkloadId;

use super::session::WorkloadOutcome;
use super::RunOptions;
use crate::backend::Hypervisor;
use crate::guest_image::GuestImage;

/// What a host-driven workload gets to work with.
pub struct HostContext<'a> {
    pub backend: &'a dyn Hypervisor,
    pub image: &'a GuestImage,
    pub options: &'a RunOptions,
    pub interrupted: &'a AtomicBool,
}

/// What a host-driven workload produced: its outcome, and what the guest it booted said
/// about itself (for the record's guest section and TSC conversion), if it booted one.
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

/// Runs one host-driven workload to its outcome (never panics; failures are statuses).
pub fn run(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    match id {
        // KSM's guests run in VMM processes of their own; their words are in the notes.
        WorkloadId::MemKsm => crate::ksm::run(ctx).into(),
        WorkloadId::MemBalloon | WorkloadId::SelftestBalloonCorrupt => super::balloon::run(id, ctx),
        _ => WorkloadOutcome::failed(
            id,
            Status::Error,
            format!("{} is not implemented yet", id.name()),
        )
        .into(),
    }
}

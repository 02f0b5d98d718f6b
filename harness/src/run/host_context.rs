//! What a host-driven workload (`Driver::Host`) is given and gives back: below the
//! runners themselves (run/ksm, run/balloon) and the dispatch over them (host_driven).

use std::sync::atomic::AtomicBool;

use workloads::protocol::Hello;
use workloads::WorkloadId;

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

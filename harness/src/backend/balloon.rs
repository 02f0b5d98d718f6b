//! What `mem.balloon` needs from a backend beyond a plain boot: a way to set the balloon's
//! target while the guest runs, and the host's own view of the guest's memory. A backend
//! that has a balloon says so through [`super::Hypervisor::balloon`]; the workload itself
//! (`run::balloon`) is the same for every backend.

use std::time::Duration;

use super::{BackendError, BootRequest, GuestSession};

/// A guest booted with a balloon, and the host's handle on it.
#[derive(Debug)]
pub struct BalloonBoot {
    pub session: Box<dyn GuestSession>,
    pub control: Box<dyn BalloonControl>,
}

/// A backend that can boot the guest with a balloon the host drives.
pub trait BalloonBackend {
    fn boot_with_balloon(&self, request: &BootRequest) -> Result<BalloonBoot, BackendError>;
}

/// The host's view of the guest's memory at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    /// Host memory backing the guest's RAM now (KVM: resident pages of the guest's RAM
    /// mapping; Xen: the pages the domain holds).
    pub guest_bytes: u64,
    /// Memory the hypervisor has free, where it says (Xen's `free_memory`).
    pub host_free_bytes: Option<u64>,
}

// Requests a VMM refused, as hvbench's VMM's balloon keeps them.
pub use vmm::Refusals;

/// The running guest's balloon, as the host drives it.
pub trait BalloonControl: std::fmt::Debug {
    /// Asks the guest to hand `bytes` of its memory back (0: take everything back).
    fn set_balloon(&mut self, bytes: u64) -> Result<(), BackendError>;
    /// The host's view of the guest's memory now.
    fn measure(&mut self) -> Result<HostMemory, BackendError>;
    /// Measures, then sets the target: one step at a phase boundary (one round trip where
    /// the backend is remote).
    fn measure_then_set(&mut self, bytes: u64) -> Result<HostMemory, BackendError> {
        let memory = self.measure()?;
        self.set_balloon(bytes)?;
        Ok(memory)
    }
    /// The pages the guest's driver says the balloon holds, where the interface has such a
    /// field (virtio-balloon's `actual`; Xen has none).
    fn reported_pages(&self) -> Option<u64> {
        None
    }
    /// Anything about how the host got its figures that the record should say (retries).
    fn diagnostics(&self) -> Option<String> {
        None
    }
    /// What [`BalloonControl::measure`] reads, in a few words, for the record's notes.
    fn method(&self) -> &'static str;
    /// How often the memory curve may be sampled while the guest works; `None` where a
    /// measurement is too slow to take except between phases (a toolstack over SSH).
    fn curve_interval(&self) -> Option<Duration>;
    /// Requests the VMM refused, where a VMM of hvbench's sees them (`None` on Xen, whose
    /// hypervisor answers the guest's hypercalls itself).
    fn refusals(&self) -> Option<Refusals>;
}

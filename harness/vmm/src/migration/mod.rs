//! Pre-copy live migration between two VMMs (Clark et al., NSDI 2005).
//!
//! The source ([`crate::RunningVm::migrate`]) turns on KVM's dirty log, sends every page
//! of RAM while the guest runs (round 0), then the pages written meanwhile, round after
//! round, until what is left would go within the downtime limit at the bandwidth the
//! last round reached (or the round limit is hit). It then parks the vCPU, sends the last
//! dirty pages, the vCPU and device state and `Done`. The switchover is a handshake in
//! which at most one side ever runs the guest: the destination ([`crate::Vmm::incoming`])
//! checks every chunk (see [`wire`]), builds the VM without starting it and answers
//! `Ready`; the source answers `Go`, after which it never runs the guest again; the
//! destination starts the guest only on `Go`, and then sends `Ack`. Any failure before
//! `Go` (a broken or refused stream, a destination that dies, no `Ready`) resumes the
//! guest on the source; a lost `Go` or `Ack` leaves the guest handed over
//! ([`MigrationError::Unconfirmed`]): it runs at the destination or nowhere, never twice.

pub(crate) mod dest;
pub(crate) mod dirty;
mod pagemap;
pub(crate) mod park;
pub(crate) mod ring;
mod source;
pub mod state;
mod transport;
pub mod wire;

pub(crate) use self::source::Source;
pub use self::transport::{MigrationAddr, MigrationListener, MigrationStream};

use std::time::Duration;

use thiserror::Error;

use self::wire::WireError;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    #[error("vCPU state: {0}")]
    State(String),
    #[error("pausing the guest: {0}")]
    Pause(String),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// After `Go` the source never runs the guest again, whatever happens next.
    #[error(
        "the guest was handed over (Go sent) but the destination did not confirm that it \
         runs ({0}); the source does not run it again: it runs at the destination or is lost"
    )]
    Unconfirmed(String),
    #[error("building the destination VM: {0}")]
    Vmm(#[from] crate::VmmError),
}

/// How the source migrates.
#[derive(Clone, Copy, Debug)]
pub struct MigrateOptions {
    /// Stop iterating once the pages left would be sent within this (QEMU's default is
    /// 300 ms).
    pub downtime_limit: Duration,
    /// Stop iterating after this many rounds, whatever is left.
    pub max_rounds: u32,
    /// How long the source waits for the destination's `Ready` after `Done`, and for its
    /// `Ack` after `Go`.
    pub ack_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            ack_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the pages the guest wrote come from (the VMM's own writes are ORed in either
/// way, from vm-memory's bitmap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    /// `KVM_MEM_LOG_DIRTY_PAGES` and `KVM_GET_DIRTY_LOG` per round.
    #[default]
    DirtyLog,
    /// `KVM_CAP_DIRTY_LOG_RING`: each vCPU's ring of dirtied pages (see `ring`).
    DirtyRing,
}

impl DirtyTracking {
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::DirtyLog => "dirty_log",
            DirtyTracking::DirtyRing => "dirty_ring",
        }
    }
}

/// One round of page copying.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundReport {
    /// Pages sent with their contents.
    pub pages: u64,
    /// Pages sent as "all zero" (no contents on the wire).
    pub zero_pages: u64,
    /// Bytes written to the stream in this round (frames included).
    pub bytes: u64,
    pub duration: Duration,
    /// Pages the guest dirtied while this round was sent (the next round's work).
    pub dirtied: u64,
    /// Whether the guest was paused (the stop-and-copy round).
    pub paused: bool,
}

/// What a migration did, as the source saw it.
#[derive(Clone, Debug, Default)]
pub struct MigrationReport {
    pub ram_bytes: u64,
    /// From the call to the destination's `Ack`.
    pub total: Duration,
    /// From the call to the first page sent (dirty logging on, `Hello` sent).
    pub setup: Duration,
    /// The VMM's own downtime: from asking the vCPU to park to the destination's `Ack`
    /// (the guest runs there by then), so it includes two network round trips (`Done`
    /// to `Ready`, `Go` to `Ack`).
    pub downtime: Duration,
    /// Of the downtime, how long the vCPU took to park and hand its state over.
    pub pause: Duration,
    /// The pre-copy rounds, then the stop-and-copy round.
    pub rounds: Vec<RoundReport>,
    /// Whether the pre-copy converged (what was left fit the downtime limit) rather than
    /// hit the round limit.
    pub converged: bool,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// MSRs KVM listed but would not read.
    pub msrs_unreadable: u32,
    /// MSRs read but deliberately not carried (see `state::MSR_KVM_ASYNC_PF_INT`).
    pub msrs_left_out: Vec<u32>,
    /// How the pages the guest wrote were found.
    pub dirty_tracking: DirtyTracking,
    /// With the dirty ring: how often a vCPU's ring filled and its thread harvested
    /// (over the VM's life so far).
    pub ring_full_exits: u64,
    /// The destination's CLOCK_REALTIME (ns) when its vCPU started.
    pub resumed_realtime_ns: u64,
}

/// What the destination did.
#[derive(Clone, Debug, Default)]
pub struct IncomingReport {
    pub ram_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    /// From the first byte of `Hello` to the guest running.
    pub total: Duration,
    /// The guest runs here but its `Ack` could not be sent (why).
    pub ack_error: Option<String>,
    /// From `State` received to the vCPU thread started.
    pub restore: Duration,
    /// MSRs KVM would not take back (skipped), by index, every vCPU's.
    pub msrs_refused: Vec<u32>,
    /// The source's and this host's TSC frequency (a guest told one frequency at boot
    /// keeps it; KVM here cannot scale the TSC when they differ).
    pub tsc_khz: (u32, u32),
}

#[cfg(test)]
mod tests;

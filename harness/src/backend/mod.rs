//! One trait for every way of running the guest, one module per backend (Cloud
//! Hypervisor's layout): `kvm` (hvbench's own VMM), `qemu`, `xen`,
//! `libvirt`.
//!
//! A backend boots the guest with a command line and hands back a session: a stream of
//! console bytes and, at the end, how the guest ended. Everything after that (lines,
//! events, records) is common to all backends.

pub mod balloon;
pub mod kvm;
pub mod libvirt;
pub mod qemu;
pub mod stale;
pub mod xen;

use std::sync::mpsc::Receiver;

use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use workloads::BackendFeature;

use crate::guest_image::GuestImage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum BackendKind {
    /// hvbench's own VMM on /dev/kvm (kvm-ioctls, vm-memory, vm-superio, linux-loader).
    Kvm,
    /// QEMU's microvm machine with its own PVH loader (KVM acceleration where possible).
    Qemu,
    /// Xen through `xl` on a dom0 (local, over SSH, or hvbench's lab).
    Xen,
    /// A libvirt domain (QEMU q35 started by libvirt's QEMU driver), through `virsh`.
    Libvirt,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Qemu => "qemu",
            BackendKind::Xen => "xen",
            BackendKind::Libvirt => "libvirt",
        }
    }
}

/// What the guest is booted with.
#[derive(Clone, Debug)]
pub struct BootRequest<'a> {
    pub image: &'a GuestImage,
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// A name unique to this boot (`hvbench-<run>-<n>`), for backends that name guests.
    pub name: String,
}

// What every backend's guest sends back, defined where hvbench's own VMM produces it.
pub use vmm::{ExitCounts, GuestEnd, GuestMessage};

/// Why a backend cannot provide a [`BackendFeature`]: one sentence, which becomes the
/// reason of the workload's `skip` record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub std::borrow::Cow<'static, str>);

impl From<&'static str> for Unsupported {
    fn from(reason: &'static str) -> Self {
        Unsupported(reason.into())
    }
}

impl From<String> for Unsupported {
    fn from(reason: String) -> Self {
        Unsupported(reason.into())
    }
}

/// The host processes a guest's stack is made of, for the memory it costs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackProcesses {
    /// The process that runs the guest (QEMU, hvbench's VMM), where it runs here.
    pub vmm: Option<u32>,
    /// Management daemons serving it (libvirtd, virtqemud, virtlogd).
    pub daemons: Vec<u32>,
    /// What the figures include besides the VMM, where that needs saying.
    pub note: Option<&'static str>,
    /// The host these pids are on, reached through this transport; `None`: this machine.
    pub on: Option<hostutil::transport::Transport>,
}

/// A booted guest.
pub trait GuestSession: std::fmt::Debug {
    fn messages(&self) -> &Receiver<GuestMessage>;
    /// The host processes running this guest (none known by default: a remote host).
    fn stack_processes(&self) -> StackProcesses {
        StackProcesses::default()
    }
    /// Stops the guest and releases everything it holds. Idempotent; also run on drop.
    fn stop(&mut self) -> Result<(), BackendError>;
}

/// A way of running the guest.
pub trait Hypervisor: std::fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// The backend section of every record.
    fn info(&self) -> BackendInfo;
    /// Fingerprint of the machine the guest runs on.
    fn host(&self) -> HostInfo;
    /// Whether a workload's device or path exists on this backend; `Err` says why not.
    fn supports(&self, feature: BackendFeature) -> Result<(), Unsupported>;
    /// Whether the guest runs on this machine, so that native twins of a workload,
    /// measured here, are comparable.
    fn guest_runs_locally(&self) -> bool;
    /// For live migration (`mig.*`) between two processes of this backend: the program
    /// and the arguments that run `request` (the guest image written where they name
    /// it), to which the runner adds each side's own; `None` where the backend is not
    /// migrated that way.
    fn migration_command(
        &self,
        _request: &BootRequest,
    ) -> Option<Result<(std::path::PathBuf, Vec<String>), BackendError>> {
        None
    }
    /// The Xen backend itself, for what only it does (`xl migrate` for `mig.*`).
    fn as_xen(&self) -> Option<&xen::XenBackend> {
        None
    }
    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError>;
    /// Why this backend can run nothing at all as configured (every workload is then
    /// skipped with the reason), if so.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Options of `hvbench run` that select this backend as configured (beyond
    /// `--backend`), for the reproduce command of every record.
    fn reproduce_args(&self) -> Vec<String> {
        Vec::new()
    }
    /// The words that must precede `hvbench run` to reproduce the host's set-up (e.g.
    /// `hvbench host paging shadow --`), for the reproduce command of every record.
    fn reproduce_prefix(&self) -> Vec<String> {
        Vec::new()
    }

    /// The balloon the host drives for `mem.balloon`, where this backend has one (it then
    /// also answers `supports(BackendFeature::Balloon)` with `Ok`).
    fn balloon(&self) -> Option<&dyn balloon::BalloonBackend> {
        None
    }

    /// Xen's toolstack on the host, for the `sched.*` runners that weigh, cap and account
    /// domains (`xl`); `None` on backends whose vCPUs are host threads.
    fn xl_host(&self) -> Option<&dyn xen::sched::XlHost> {
        None
    }

    /// The log the hvbench-insns TCG plugin appends instruction counts to, where this
    /// backend loaded it (QEMU under TCG with `--insns`, a lab brought up with it). The
    /// guest then places its markers, and records get an `insns` metric.
    fn insns_log(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// The block workloads' disk file on this machine and whether the backend opens it
    /// with O_DIRECT, where the run has one (the native twin runs fio on it).
    fn disk(&self) -> Option<(&std::path::Path, bool)> {
        None
    }

    /// Brings the disk file here up to date after the run, where the guest's disk was a
    /// copy elsewhere (Xen's dom0), so that the host's disk check sees the guest's writes.
    fn fetch_disk(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// The huge-page advice guest RAM is mapped with on this machine, where the backend
    /// maps it here (native twins map their buffers the same way).
    fn guest_ram_advice(&self) -> Option<hostutil::huge_pages::HugePageAdvice> {
        None
    }
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error(transparent)]
    Kvm(#[from] kvm::VmmError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error(transparent)]
    Xen(#[from] xen::XenError),
    #[error(transparent)]
    Libvirt(#[from] libvirt::LibvirtError),
}

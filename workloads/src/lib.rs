//! What the hvbench guest and harness must agree on, in one `no_std` crate:
//!
//! - [`table`]: the declarative table of workloads (one row per workload);
//! - [`abi`]: the ports, addresses and exit codes that connect the guest to its host;
//! - [`cmdline`]: how the harness tells the guest what to run;
//! - [`protocol`]: the result lines the guest prints and the harness decodes;
//! - [`compute`]: the compute kernel that runs in the guest and natively on the host;
//! - [`balloon`]: the pool size and phase notes of `mem.balloon`;
//! - [`ksm`]: the page contents and doorbell values of `mem.ksm`, which the host checks;
//! - [`virtio`]: the virtio-mmio balloon's registers, shared by the guest's driver and the VMM;
//! - [`virtio_blk`]: the virtio block device's layout and where hvbench's VMM puts it;
//! - [`blk`]: the block workloads' access patterns and data the guest writes and checks.
//!
//! The guest builds this crate without features; the harness enables `std` for decoding.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod abi;
pub mod balloon;
pub mod blk;
pub mod cmdline;
pub mod compute;
pub mod crc32;
pub mod ksm;
pub mod memory;
pub mod params;
pub mod protocol;
pub mod table;
pub mod virtio;
pub mod virtio_blk;

pub use params::{ParamKind, ParamSpec};
pub use table::{
    BackendFeature, Direction, Driver, Group, HostRunner, Hypervisor, MetricSpec, NativeTwin,
    Privilege, Requirement, Unit, Workload, WorkloadId, WORKLOADS,
};

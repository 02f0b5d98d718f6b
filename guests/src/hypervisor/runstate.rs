//! Xen's runstate of each vCPU (vcpu.h: `struct vcpu_runstate_info`): the time it spent
//! running, runnable (waiting for a physical CPU: steal), blocked and offline. Steal is
//! runnable + offline, as Linux counts it.
//!
//! Read with `VCPUOP_get_runstate_info`, which copies Xen's accounting into a buffer of
//! the calling vCPU when asked, rather than through a registered area
//! (`VCPUOP_register_runstate_memory_area`) that Xen rewrites at every context switch:
//! each tick then reads every vCPU's figure at one moment, from the boot vCPU, and Xen
//! writes nothing into the guest behind its back. The accounting is the same.

use super::xen::{hypercall3, HYPERVISOR_VCPU_OP};
use crate::arch::smp::MAX_CPUS;

const VCPUOP_GET_RUNSTATE_INFO: u64 = 4;
/// Indexes of `time[]`: running, runnable, blocked, offline.
const RUNNABLE: usize = 1;
const OFFLINE: usize = 3;

/// `struct vcpu_runstate_info`: state (int, padded), state_entry_time, time[4].
#[repr(C)]
#[derive(Default)]
struct RunstateInfo {
    state: u32,
    pad: u32,
    state_entry_time: u64,
    time: [u64; 4],
}

/// vCPU `cpu`'s steal so far in ns (runnable + offline), or Xen's negative errno. CPL0.
pub fn steal_ns(cpu: usize) -> Result<u64, i64> {
    if cpu >= MAX_CPUS {
        return Err(-22);
    }
    let mut info = RunstateInfo::default();
    match hypercall3(
        HYPERVISOR_VCPU_OP,
        VCPUOP_GET_RUNSTATE_INFO,
        cpu as u64,
        &mut info as *mut RunstateInfo as u64,
    ) {
        0 => Ok(info.time[RUNNABLE].wrapping_add(info.time[OFFLINE])),
        rc => Err(rc),
    }
}

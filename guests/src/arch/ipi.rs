//! `sched.ipi`'s round trip with an IPI each way: the boot vCPU, at CPL0 with interrupts
//! on, sends the request to an AP halted in its kernel; the AP's handler answers with an
//! IPI of its own (`smp::set_ipi_reply`), whose handler here notes the answer
//! (`smp::IPI_REPLY_SEEN`) while the boot vCPU spins on it, as kvm-unit-tests' `ipi` test
//! spins for its one leg.

use core::sync::atomic::Ordering;

use super::apic;
use super::cpu::{rdtsc_fenced, with_interrupts};
use super::smp::{IPI_ANSWER, IPI_REPLY_SEEN, IPI_REQUEST};

/// What `KernelOp::IpiRoundTrip` is given (user mode owns it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IpiArgs {
    /// The AP's APIC ID.
    pub target: u32,
    /// TSC cycles one round trip may take before the loop gives up.
    pub limit_cycles: u64,
}

/// `iterations` round trips to AP `args.target`; the cycles of all, or `None` when an
/// answer did not come back within the limit. CPL0; the AP's reply must be set.
pub fn round_trip_loop(iterations: u64, args: IpiArgs) -> Option<u64> {
    let target = u8::try_from(args.target).ok()?;
    let mut sequence = IPI_ANSWER.load(Ordering::Acquire);
    let mut total = 0u64;
    for _ in 0..iterations {
        sequence = sequence.wrapping_add(1);
        IPI_REQUEST.store(sequence, Ordering::Release);
        let start = rdtsc_fenced();
        apic::send_ipi(target, apic::IPI_VECTOR);
        let answered = with_interrupts(|| loop {
            if IPI_REPLY_SEEN.load(Ordering::Acquire) == sequence {
                break true;
            }
            if rdtsc_fenced().wrapping_sub(start) > args.limit_cycles {
                break false;
            }
            core::hint::spin_loop();
        });
        if !answered {
            return None;
        }
        total = total.wrapping_add(rdtsc_fenced().wrapping_sub(start));
    }
    Some(total)
}

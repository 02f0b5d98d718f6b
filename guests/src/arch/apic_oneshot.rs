//! The local APIC timer in one-shot mode (TMICT counting down at the bus clock over the
//! divider), for `sched.wakeup` where CPUID offers no TSC-deadline mode: Xen's emulated
//! local APIC for PVH under this lab's CPU. The timer's rate is not given by CPUID on
//! every vendor, so it is measured against the TSC first ([`calibrate`]).

use super::apic;
use super::cpu::{rdtsc_fenced, sti_hlt_cli};

/// Register offsets: initial count, current count, divide configuration.
const TMICT: u64 = 0x380;
const TMCCT: u64 = 0x390;
const TDCR: u64 = 0x3e0;
/// TDCR: divide by 1.
const DIVIDE_BY_1: u32 = 0b1011;

/// The timer's rate against the TSC: `ticks` counted down in `cycles` TSC cycles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub ticks: u64,
    pub cycles: u64,
}

impl Rate {
    /// Timer ticks for `cycles` TSC cycles (at least 1, at most a full count).
    pub fn ticks_for(&self, cycles: u64) -> u32 {
        let ticks = u128::from(cycles) * u128::from(self.ticks) / u128::from(self.cycles.max(1));
        u32::try_from(ticks).unwrap_or(u32::MAX).max(1)
    }
}

/// Counts the masked timer down from its largest count for about `span` TSC cycles and
/// reads how far it went. Any CPL (the APIC page is mapped to user mode). `None` when
/// the count did not move (no timer behind the page) or ran out.
pub fn calibrate(span: u64) -> Option<Rate> {
    apic::write(
        apic::LVT_TIMER,
        apic::LVT_MASKED | u32::from(apic::TIMER_VECTOR),
    );
    apic::write(TDCR, DIVIDE_BY_1);
    apic::write(TMICT, u32::MAX);
    let (first, at_first) = timed_count();
    while rdtsc_fenced().wrapping_sub(at_first) < span {
        core::hint::spin_loop();
    }
    let (last, at_last) = timed_count();
    apic::write(TMICT, 0);
    let cycles = at_last.wrapping_sub(at_first);
    let ticks = u64::from(first.checked_sub(last)?);
    (ticks > 0 && last > 0 && cycles > 0).then_some(Rate { ticks, cycles })
}

/// The current count and when it was read: the midpoint of the TSC reads around it (an
/// emulated APIC read can take far longer than the TSC reads).
fn timed_count() -> (u32, u64) {
    let before = rdtsc_fenced();
    let count = apic::read(TMCCT);
    let after = rdtsc_fenced();
    (count, before / 2 + after / 2)
}

/// What user mode passes to the kernel loop: the initial count, and the TSC cycles it
/// stands for (the deadline is the arming TSC plus these).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OneShotArgs {
    pub count: u32,
    pub delay_cycles: u64,
}

/// Most HLTs one wake-up may take (a stray interrupt wakes the vCPU early).
const MAX_EARLY_WAKES: u32 = 1000;

/// Arms the one-shot timer `iterations` times, halting (STI; HLT) until it fires; the sum
/// of deadline -> running again in TSC cycles. A timer that has run out ends the wait
/// even before the computed deadline (the rate was measured, so the two may differ by
/// its error; such a wake counts 0). CPL0.
pub fn wake_loop(iterations: u64, args: OneShotArgs) -> u64 {
    apic::write(TDCR, DIVIDE_BY_1);
    apic::write(apic::LVT_TIMER, u32::from(apic::TIMER_VECTOR));
    let mut late = 0u64;
    for _ in 0..iterations {
        let armed = rdtsc_fenced();
        apic::write(TMICT, args.count);
        let deadline = armed.wrapping_add(args.delay_cycles);
        let mut now = deadline;
        for _ in 0..MAX_EARLY_WAKES {
            sti_hlt_cli();
            now = rdtsc_fenced();
            if now >= deadline || apic::read(TMCCT) == 0 {
                break;
            }
        }
        late = late.wrapping_add(now.saturating_sub(deadline));
    }
    apic::write(TMICT, 0);
    apic::write(apic::LVT_TIMER, apic::LVT_MASKED);
    late
}

//! The local APIC in xAPIC mode: its registers are a page of MMIO at 0xfee00000, which the
//! boot page tables map (uncached, user-accessible), so user mode reaches them too and the
//! measured side of an IPI runs at CPL3.

use core::ptr::{read_volatile, write_volatile};

use super::cpu::cpuid;

pub const BASE: u64 = 0xfee0_0000;

/// Register offsets.
pub const ID: u64 = 0x20;
pub const TPR: u64 = 0x80;
/// (EOI, 0xb0, is written by the interrupt stubs in `smp`.)
pub const SVR: u64 = 0xf0;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;

/// Interrupt vectors the guest uses (above the 32 exceptions).
pub const IPI_VECTOR: u8 = 0x40;
pub const TIMER_VECTOR: u8 = 0x41;
/// The AP's answer to `sched.ipi`, sent back to the boot vCPU.
pub const IPI_REPLY_VECTOR: u8 = 0x42;
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// ICR delivery modes (bits 10:8) and level assert (bit 14).
const ICR_INIT: u32 = 0b101 << 8 | 1 << 14;
const ICR_STARTUP: u32 = 0b110 << 8 | 1 << 14;
/// LVT timer: TSC-deadline mode (bits 18:17 = 10), masked (bit 16).
pub const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
pub const LVT_MASKED: u32 = 1 << 16;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// What the local APIC offers, as CPUID tells the kernel (read at CPL0: at CPL3 some
/// hosts show their own CPUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicCaps {
    pub present: bool,
    pub tsc_deadline: bool,
}

/// CPUID.1: EDX bit 9 (APIC), ECX bit 24 (TSC-deadline timer). CPL0 for a true answer.
pub fn caps() -> LapicCaps {
    let leaf = cpuid(1, 0);
    LapicCaps {
        present: leaf.edx & (1 << 9) != 0,
        tsc_deadline: leaf.ecx & (1 << 24) != 0,
    }
}

#[inline(always)]
pub fn read(register: u64) -> u32 {
    // SAFETY: an APIC register of the identity-mapped MMIO page; reading has no effect on
    // this program's memory.
    unsafe { read_volatile((BASE + register) as *const u32) }
}

#[inline(always)]
pub fn write(register: u64, value: u32) {
    // SAFETY: as for `read`; callers write registers whose effect they intend.
    unsafe { write_volatile((BASE + register) as *mut u32, value) }
}

/// This CPU's APIC ID (bits 31:24 of the ID register).
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Software-enables this CPU's APIC and accepts every priority.
pub fn enable() {
    write(TPR, 0);
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// Sends a fixed interrupt `vector` to the APIC `destination` (physical mode).
#[inline(always)]
pub fn send_ipi(destination: u8, vector: u8) {
    write(ICR_HIGH, u32::from(destination) << 24);
    write(ICR_LOW, u32::from(vector));
}

/// INIT, then a start-up IPI whose vector names the 4 KiB page the AP starts in.
pub fn send_init(destination: u8) {
    write(ICR_HIGH, u32::from(destination) << 24);
    write(ICR_LOW, ICR_INIT);
}

pub fn send_startup(destination: u8, page: u8) {
    write(ICR_HIGH, u32::from(destination) << 24);
    write(ICR_LOW, ICR_STARTUP | u32::from(page));
}

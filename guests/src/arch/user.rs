//! The switch to user mode (CPL3, IOPL 3) and the system call that comes back.
//!
//! Measurement loops run at CPL3: there they run natively on every host, including those
//! that emulate guest CPL0 code.

use core::arch::asm;

use super::boot::{USER_CS, USER_DS};

/// RFLAGS for user mode: IOPL 3 (port I/O allowed), interrupts off, bit 1 (reserved, set).
const USER_RFLAGS: u64 = (3 << 12) | (1 << 1);

/// Leaves the kernel for `entry` at CPL3 on `stack_top` (16-byte aligned). CPL0 only.
pub fn enter_user(entry: extern "C" fn() -> !, stack_top: u64) -> ! {
    // A function expects RSP = 8 (mod 16) on entry, as if CALL had pushed a return address.
    let stack_top = stack_top - 8;
    // SAFETY: builds an IRETQ frame for a 64-bit CPL3 code segment of our GDT; `entry`
    // and the stack are mapped user-accessible by the boot page tables.
    unsafe {
        asm!(
            "mov ds, {ss:e}",
            "mov es, {ss:e}",
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) USER_DS as u64,
            rsp = in(reg) stack_top,
            rflags = in(reg) USER_RFLAGS,
            cs = in(reg) USER_CS as u64,
            rip = in(reg) entry as usize as u64,
            options(noreturn)
        )
    }
}

extern "C" {
    fn hvbench_syscall(nr: u64, a0: u64, a1: u64, a2: u64) -> u64;
}

/// A system call: number and three arguments; returns the kernel's answer.
#[inline(always)]
pub fn syscall(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    // SAFETY: the trampoline follows the C ABI; the kernel runs the call on its own stack
    // and resumes after the trap with every register but RAX as it was.
    unsafe { hvbench_syscall(nr, a0, a1, a2) }
}

//! Application processors on Xen. A PVH domain's vCPUs do not start by INIT/SIPI (Xen's
//! emulated local APIC has no real-mode start for PVH): the boot vCPU describes each AP's
//! first state with `VCPUOP_initialise` and starts it with `VCPUOP_up`, as Mini-OS, XTF
//! and Linux's PVH code do.
//!
//! Layouts from Xen's public headers: vcpu.h (VCPUOP_*) and hvm/hvm_vcpu.h
//! (`struct vcpu_hvm_context`). The AP starts in 64-bit mode (VCPU_HVM_MODE_64B: flat
//! segments, no GDT or IDT) on the kernel stack and page tables the boot vCPU chose, at
//! `xen_ap_entry`, which loads the boot GDT and its selectors and joins the INIT/SIPI
//! path at `ap_entry` (per-CPU GDT, TSS, stacks, the shared IDT, the local APIC).

use core::arch::{asm, global_asm};

use super::xen::{hypercall3, HYPERVISOR_VCPU_OP};
use crate::arch::cpu::rdmsr;
use crate::arch::smp::{self, MAX_CPUS};

const VCPUOP_INITIALISE: u64 = 0;
const VCPUOP_UP: u64 = 1;
const VCPU_HVM_MODE_64B: u32 = 1;
const MSR_EFER: u32 = 0xc000_0080;
/// RFLAGS with only the always-one bit: the AP starts with interrupts off.
const RFLAGS_START: u64 = 0x2;

/// `struct vcpu_hvm_context` with its 64-bit member: mode, pad, then rax, rcx, rdx, rbx,
/// rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer. The union is as long as its
/// 32-bit member (120 bytes), and Xen copies the whole 128-byte structure.
#[repr(C)]
struct VcpuHvmContext {
    mode: u32,
    pad: u32,
    regs: [u64; 14],
    rest_of_union: u64,
}

const _: () = assert!(core::mem::size_of::<VcpuHvmContext>() == 128);

/// Register indexes in `VcpuHvmContext::regs`.
const RSP: usize = 4;
const RDI: usize = 7;
const RIP: usize = 8;
const RFLAGS: usize = 9;
const CR0: usize = 10;
const CR3: usize = 11;
const CR4: usize = 12;
const EFER: usize = 13;

extern "C" {
    fn xen_ap_entry();
}

fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no effect; CPL0.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no effect; CPL0.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Why an AP could not be started: the hypercall and Xen's negative errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpError {
    NotAnAp,
    Initialise(i64),
    Up(i64),
}

/// Initialises vCPU `cpu` to enter `xen_ap_entry` in long mode with this vCPU's control
/// registers, page tables and EFER, on its own kernel stack, then starts it. CPL0.
pub fn vcpu_up(cpu: usize) -> Result<(), UpError> {
    if cpu == 0 || cpu >= MAX_CPUS {
        return Err(UpError::NotAnAp);
    }
    let mut regs = [0u64; 14];
    regs[RSP] = smp::stack_top(cpu, smp::STACK_KERNEL);
    regs[RDI] = cpu as u64;
    regs[RIP] = xen_ap_entry as *const () as u64;
    regs[RFLAGS] = RFLAGS_START;
    regs[CR0] = read_cr0();
    regs[CR3] = crate::arch::cpu::read_cr3();
    regs[CR4] = read_cr4();
    regs[EFER] = rdmsr(MSR_EFER);
    let context = VcpuHvmContext {
        mode: VCPU_HVM_MODE_64B,
        pad: 0,
        regs,
        rest_of_union: 0,
    };
    let id = cpu as u64;
    let at = &context as *const VcpuHvmContext as u64;
    match hypercall3(HYPERVISOR_VCPU_OP, VCPUOP_INITIALISE, id, at) {
        0 => {}
        rc => return Err(UpError::Initialise(rc)),
    }
    match hypercall3(HYPERVISOR_VCPU_OP, VCPUOP_UP, id, 0) {
        0 => Ok(()),
        rc => Err(UpError::Up(rc)),
    }
}

global_asm!(
    r#"
    .section .text
    /* A Xen AP's first instruction: flat 64-bit segments without a GDT (hvm_vcpu.h).
       Load the boot GDT (its first five entries), reload CS by a far return and the data
       selectors, then go on as an AP started by SIPI (RSP and RDI as ap_entry wants). */
    .global xen_ap_entry
xen_ap_entry:
    subq $16, %rsp
    movw $39, (%rsp)
    leaq gdt(%rip), %rax
    movq %rax, 2(%rsp)
    lgdt (%rsp)
    addq $16, %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    jmp ap_entry
"#,
    options(att_syntax)
);

/// Step codes in the `XenVcpuUp` system call's answer (bits 32 and up).
pub const UP_STEP_INITIALISE: u64 = 1;
pub const UP_STEP_UP: u64 = 2;
pub const UP_STEP_NOT_AN_AP: u64 = 3;

/// `vcpu_up` as the system call's answer: 0, or the step << 32 | Xen's errno. CPL0.
pub fn vcpu_up_status(cpu: usize) -> u64 {
    let errno = |rc: i64| u64::from(u32::try_from(rc.unsigned_abs()).unwrap_or(u32::MAX));
    match vcpu_up(cpu) {
        Ok(()) => 0,
        Err(UpError::NotAnAp) => UP_STEP_NOT_AN_AP << 32,
        Err(UpError::Initialise(rc)) => UP_STEP_INITIALISE << 32 | errno(rc),
        Err(UpError::Up(rc)) => UP_STEP_UP << 32 | errno(rc),
    }
}

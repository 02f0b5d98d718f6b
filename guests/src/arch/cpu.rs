//! Thin wrappers over single instructions. Each is `inline(always)` so a measured loop
//! holds the instruction itself, not a call.
//!
//! The guest is a freestanding kernel with the whole machine to itself, so these
//! instructions cannot break memory safety of the Rust program: they are safe functions
//! with the privilege they need stated in their documentation.

use core::arch::asm;

/// TSC read ordered after all earlier instructions (LFENCE before RDTSC). RDTSCP is avoided
/// on purpose: QEMU's TCG cannot run it under Xen.
#[inline(always)]
pub fn rdtsc_fenced() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: LFENCE and RDTSC only read the time stamp counter.
    unsafe {
        asm!("lfence", "rdtsc", "lfence", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    ((hi as u64) << 32) | lo as u64
}

/// Times `n` runs of `op` at the current privilege level.
#[inline(always)]
pub fn timed(n: u64, mut op: impl FnMut()) -> u64 {
    let start = rdtsc_fenced();
    for _ in 0..n {
        op();
    }
    rdtsc_fenced().wrapping_sub(start)
}

/// Plain RDTSC, unserialised: the instruction measured by `cpu.rdtsc`.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the time stamp counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    ((hi as u64) << 32) | lo as u64
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// OUT of one byte. Needs CPL0 or IOPL 3 (user mode runs with IOPL 3).
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory of this program.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// OUT of four bytes. Needs CPL0 or IOPL 3.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O touches no memory of this program.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// IN of one byte. Needs CPL0 or IOPL 3.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O touches no memory of this program.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// IN of four bytes. Needs CPL0 or IOPL 3.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O touches no memory of this program.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// OUTSB repeated over `bytes`: one string I/O instruction for a whole buffer, which
/// hypervisors hand to the device model as one exit.
#[inline(always)]
pub fn rep_outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads exactly `bytes.len()` bytes from `bytes`; the direction flag is clear
    // (the kernel clears it at entry and nothing sets it).
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    }
}

/// RDMSR. CPL0 only.
#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR has no effect on this program's memory.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    ((hi as u64) << 32) | lo as u64
}

/// WRMSR. CPL0 only. The caller picks an MSR whose write cannot break the kernel.
#[inline(always)]
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: see above; used for hypervisor-defined MSRs (the Xen hypercall page).
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") crate::convert::low32(value), in("edx") (value >> 32) as u32,
             options(nostack))
    }
}

/// HLT with interrupts off. CPL0 only. Returns when the host resumes the vCPU.
#[inline(always)]
pub fn hlt() {
    // SAFETY: HLT only stops the vCPU until the host resumes it.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// STI; HLT; CLI: waits for an interrupt (STI's shadow makes the pair atomic: one that
/// is already pending wakes the HLT), runs its handler, and turns interrupts off again.
/// CPL0 only; the IDT must have a handler for every interrupt that may come.
#[inline(always)]
pub fn sti_hlt_cli() {
    // SAFETY: the handlers are the kernel's own and return with every register intact.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Runs `f` with interrupts on (STI before, CLI after): the handlers may run between any
/// two of its instructions. CPL0 only; the IDT must have a handler for every interrupt
/// that may come.
#[inline(always)]
pub fn with_interrupts<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the handlers are the kernel's own and return with every register intact;
    // no `nomem`: what they write must be read again after.
    unsafe { asm!("sti", options(nostack)) };
    let value = f();
    // SAFETY: as above.
    unsafe { asm!("cli", options(nostack)) };
    value
}

/// Reads CR3. CPL0 only.
#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Loads CR3 (and so flushes the TLB). CPL0 only; `root` must map the running kernel.
#[inline(always)]
pub fn write_cr3(root: u64) {
    // SAFETY: callers pass a PML4 that maps the kernel and user code identically.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) }
}

/// Drops the TLB entry of one address. CPL0 only.
#[inline(always)]
pub fn invlpg(va: u64) {
    // SAFETY: INVLPG only invalidates a translation.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects. CPL0 only.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// The hypercall instruction of this CPU's vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallInsn {
    /// Intel VMX.
    Vmcall,
    /// AMD SVM.
    Vmmcall,
}

/// Raw hypercall: `nr` in RAX and up to three arguments (RBX/RCX/RDX for KVM, RDI/RSI/RDX
/// for Xen: both are loaded, so one function serves both ABIs). Returns RAX.
#[inline(always)]
pub fn hypercall(insn: HypercallInsn, nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    // SAFETY: the hypervisor defines the effect; callers use hypercalls that only read
    // their register arguments (or pass addresses of buffers they own).
    unsafe {
        match insn {
            HypercallInsn::Vmcall => asm!(
                "xchg rbx, {a0}",
                "vmcall",
                "xchg rbx, {a0}",
                a0 = inout(reg) a0 => _,
                inout("rax") nr => ret,
                inout("rcx") a1 => _,
                inout("rdx") a2 => _,
                in("rdi") a0, in("rsi") a1,
                options(nostack)
            ),
            HypercallInsn::Vmmcall => asm!(
                "xchg rbx, {a0}",
                "vmmcall",
                "xchg rbx, {a0}",
                a0 = inout(reg) a0 => _,
                inout("rax") nr => ret,
                inout("rcx") a1 => _,
                inout("rdx") a2 => _,
                in("rdi") a0, in("rsi") a1,
                options(nostack)
            ),
        }
    }
    ret
}

extern "C" {
    fn hypercall_probe_vmcall(nr: u64) -> u64;
    fn hypercall_probe_vmmcall(nr: u64) -> u64;
    static hypercall_probe_vmcall_insn: u8;
    static hypercall_probe_vmmcall_insn: u8;
    static hypercall_probe_resume: u8;
}

/// What `probe_hypercall` returns when the instruction faulted.
pub const PROBE_FAULTED: u64 = 0xdead_0000_0000_0000;

core::arch::global_asm!(
    r#"
    .section .text
    /* One hypercall whose fault (#UD on hosts that refuse it) is survivable: the kernel's
       exception handler sends execution from the instruction to the resume point. */
    .global hypercall_probe_vmcall
hypercall_probe_vmcall:
    movq %rdi, %rax
    xorq %rbx, %rbx
    .global hypercall_probe_vmcall_insn
hypercall_probe_vmcall_insn:
    vmcall
    ret
    .global hypercall_probe_vmmcall
hypercall_probe_vmmcall:
    movq %rdi, %rax
    xorq %rbx, %rbx
    .global hypercall_probe_vmmcall_insn
hypercall_probe_vmmcall_insn:
    vmmcall
    ret
    .global hypercall_probe_resume
hypercall_probe_resume:
    movabsq $0xdead000000000000, %rax
    ret
"#,
    options(att_syntax)
);

/// Whether `rip` is a probe instruction; if so, where execution resumes after its fault.
pub fn probe_resume_address(rip: u64) -> Option<u64> {
    let vmcall = core::ptr::addr_of!(hypercall_probe_vmcall_insn) as u64;
    let vmmcall = core::ptr::addr_of!(hypercall_probe_vmmcall_insn) as u64;
    (rip == vmcall || rip == vmmcall).then_some(core::ptr::addr_of!(hypercall_probe_resume) as u64)
}

/// One hypercall `nr` (no arguments) that reports a fault instead of crashing. CPL0.
pub fn probe_hypercall(insn: HypercallInsn, nr: u64) -> u64 {
    let ret: u64;
    // SAFETY: calls one of the probe stubs above, which follow the C ABI except that RBX
    // is cleared (saved here). The stack pointer moves past the red zone first: a fault
    // in the stub pushes its frame on this stack.
    unsafe {
        let f = match insn {
            HypercallInsn::Vmcall => hypercall_probe_vmcall as *const () as usize,
            HypercallInsn::Vmmcall => hypercall_probe_vmmcall as *const () as usize,
        };
        asm!(
            "push rbx",
            "sub rsp, 128",
            "call {f}",
            "add rsp, 128",
            "pop rbx",
            f = in(reg) f,
            inout("rdi") nr => _,
            lateout("rax") ret,
            clobber_abi("C"),
        );
    }
    ret
}

/// The instruction-count markers: 8-byte NOPs (`nop dword [rax+rax*1+disp32]`) whose
/// displacement spells "hvbS" (start) or "hvbE" (stop). No-ops everywhere; under TCG the
/// hvbench-insns plugin counts the instructions a vCPU executes between them.
#[inline(always)]
pub fn insns_marker_start() {
    // SAFETY: a NOP: it reads nothing (the address is never formed) and changes nothing.
    unsafe {
        asm!(
            ".byte 0x0f, 0x1f, 0x84, 0x00, 0x68, 0x76, 0x62, 0x53",
            options(nomem, nostack, preserves_flags)
        );
    }
}

/// The stop marker (see [`insns_marker_start`]).
#[inline(always)]
pub fn insns_marker_stop() {
    // SAFETY: a NOP, as the start marker.
    unsafe {
        asm!(
            ".byte 0x0f, 0x1f, 0x84, 0x00, 0x68, 0x76, 0x62, 0x45",
            options(nomem, nostack, preserves_flags)
        );
    }
}

//! Application processors (APs): the real-mode trampoline an INIT/SIPI starts them in,
//! their per-CPU GDT, TSS and stacks (the IDT is shared), and the interrupt stubs.
//!
//! An AP runs only kernel code: after start-up it enables its local APIC, says it is
//! online and halts with interrupts on. Its IPI handler copies the boot vCPU's request
//! number into the answer (`sched.ipi`) and, when asked, sends it back as an IPI. An exception on an AP is recorded
//! ([`ap_fault`]) and the AP stops; the boot vCPU, waiting on it, reports it.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::apic;
use super::boot::TSS_SELECTOR;
use super::traps;

/// Most CPUs the guest brings up (the boot vCPU included).
pub const MAX_CPUS: usize = 8;
/// Where the trampoline is copied: a page below 1 MiB (the SIPI vector is its page number).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// Bytes of each AP stack: a kernel stack, an IST stack (exceptions, interrupts), #DF,
/// and a user stack (the spinning and lock-contending loops run at CPL3).
const AP_STACK: u64 = 16384;
const STACKS_PER_CPU: u64 = 4;
/// Which of a CPU's stacks `stack_top` names.
pub const STACK_KERNEL: u64 = 0;
pub const STACK_IST: u64 = 1;
pub const STACK_DF: u64 = 2;
pub const STACK_USER: u64 = 3;

/// What the APs do: halt and answer IPIs, spin counting work, or contend for a lock.
/// The boot vCPU sets it, then sends each AP an IPI to wake it from HLT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ApMode {
    Halt = 0,
    Spin = 1,
    Lock = 2,
}

pub static AP_MODE: AtomicU32 = AtomicU32::new(ApMode::Halt as u32);

pub fn ap_mode() -> ApMode {
    match AP_MODE.load(Ordering::Acquire) {
        1 => ApMode::Spin,
        2 => ApMode::Lock,
        _ => ApMode::Halt,
    }
}

/// Work each CPU counted while spinning (`sched.steal`, `sched.fairness`), and lock
/// acquisitions (`sched.lock-holder`), written by that CPU alone at CPL3.
pub static WORK: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// KVM's steal-time area of each CPU (`struct kvm_steal_time`, 64-byte aligned): the
/// steal in ns at word 0, the version (odd while KVM writes) in the low half of word 1.
#[repr(C, align(64))]
pub struct StealArea(pub [AtomicU64; 8]);

pub static STEAL: [StealArea; MAX_CPUS] =
    [const { StealArea([const { AtomicU64::new(0) }; 8]) }; MAX_CPUS];
/// Set by the boot vCPU before the APs spin: each registers its area on the way.
pub static STEAL_WANTED: AtomicU32 = AtomicU32::new(0);
/// KVM's steal-time MSR; the value is the area's physical address | enable.
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;

/// Registers `cpu`'s steal-time area with KVM, on that CPU. CPL0.
pub fn enable_steal_time(cpu: usize) {
    if let Some(area) = STEAL.get(cpu) {
        super::cpu::wrmsr(MSR_KVM_STEAL_TIME, area as *const StealArea as u64 | 1);
    }
}

/// `cpu`'s steal time so far, in ns (a consistent read of KVM's versioned area). Any CPL.
pub fn steal_ns(cpu: usize) -> u64 {
    let Some(area) = STEAL.get(cpu) else {
        return 0;
    };
    for _ in 0..1000 {
        let before = area.0[1].load(Ordering::Acquire) & 0xffff_ffff;
        let steal = area.0[0].load(Ordering::Acquire);
        let after = area.0[1].load(Ordering::Acquire) & 0xffff_ffff;
        if before == after && before % 2 == 0 {
            return steal;
        }
        core::hint::spin_loop();
    }
    0
}

/// The trampoline's parameters, at the end of its copy (see the assembly below).
#[repr(C)]
pub struct TrampolineParams {
    pub cr3: u64,
    pub stack: u64,
    pub cpu: u64,
    pub entry: u64,
}

/// The boot vCPU's request and the AP's answer (`sched.ipi`), read by the stubs below.
#[no_mangle]
pub static IPI_REQUEST: AtomicU32 = AtomicU32::new(0);
#[no_mangle]
pub static IPI_ANSWER: AtomicU32 = AtomicU32::new(0);
/// The ICR words the AP's handler sends its answer back with, as an IPI of its own
/// (`sched.ipi` with `ipi_back=1`); a zero low word: the answer is the write alone.
#[no_mangle]
pub static IPI_REPLY_ICR_HIGH: AtomicU32 = AtomicU32::new(0);
#[no_mangle]
pub static IPI_REPLY_ICR_LOW: AtomicU32 = AtomicU32::new(0);
/// The answer the boot vCPU's reply handler saw when the answer's IPI arrived.
#[no_mangle]
pub static IPI_REPLY_SEEN: AtomicU32 = AtomicU32::new(0);

/// Makes the AP's handler answer `reply_to` (an APIC ID) with an IPI on
/// `apic::IPI_REPLY_VECTOR` too, or (`None`) with the memory write alone.
pub fn set_ipi_reply(reply_to: Option<u8>) {
    let (high, low) = reply_to.map_or((0, 0), |id| {
        (
            u32::from(id) << 24,
            u32::from(super::apic::IPI_REPLY_VECTOR),
        )
    });
    IPI_REPLY_ICR_HIGH.store(high, Ordering::Release);
    IPI_REPLY_ICR_LOW.store(low, Ordering::Release);
}

/// Per CPU: 0 while offline, else its APIC ID + 1.
pub static ONLINE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The first AP exception: vector + 1 (0: none), and its RIP.
pub static FAULT_VECTOR: AtomicU64 = AtomicU64::new(0);
pub static FAULT_RIP: AtomicU64 = AtomicU64::new(0);

/// A 64-bit TSS without an I/O bitmap (APs never run user code), as 32-bit words: its
/// 64-bit fields are not 8-byte aligned, and each word is written with a volatile store
/// (the compiler may not merge them into SSE stores, which kvm_pvm's CPL0 emulator lacks).
const AP_TSS_SIZE: u16 = 104;
const AP_TSS_WORDS: usize = AP_TSS_SIZE as usize / 4;
/// Word offsets of RSP0 and IST1, and the word whose high half is the I/O map base.
const TSS_RSP0: usize = 1;
const TSS_IST1: usize = 9;
const TSS_IOMAP: usize = 25;

#[repr(C, align(16))]
struct ApCpu {
    gdt: [u64; 7],
    tss: [u32; AP_TSS_WORDS],
}

struct ApTables(UnsafeCell<[ApCpu; MAX_CPUS]>);

// SAFETY: entry `i` is written only by AP `i` itself, once, before it takes interrupts.
unsafe impl Sync for ApTables {}

/// An AP's GDT limit: 7 entries of 8 bytes, less one.
const GDT_LIMIT: u16 = 7 * 8 - 1;

const EMPTY_CPU: ApCpu = ApCpu {
    gdt: [0; 7],
    tss: [0; AP_TSS_WORDS],
};

static AP_TABLES: ApTables = ApTables(UnsafeCell::new([EMPTY_CPU; MAX_CPUS]));

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_stacks: u8;
    static ap_stacks_end: u8;
    static gdt: [u64; 5];
    pub fn ap_entry();
}

/// The trampoline's bytes (position-independent: it is assembled for TRAMPOLINE_ADDR).
pub fn trampoline() -> &'static [u8] {
    let start = core::ptr::addr_of!(ap_trampoline_start);
    let end = core::ptr::addr_of!(ap_trampoline_end) as usize;
    // SAFETY: both symbols delimit the trampoline in .rodata.
    unsafe { core::slice::from_raw_parts(start, end - start as usize) }
}

/// Top of stack `which` (0 kernel, 1 IST, 2 #DF) of CPU `cpu`.
pub fn stack_top(cpu: usize, which: u64) -> u64 {
    core::ptr::addr_of!(ap_stacks) as u64 + (cpu as u64 * STACKS_PER_CPU + which + 1) * AP_STACK
}

/// Whether `address` lies on an AP's stacks (so the code using it runs on an AP).
pub fn on_ap_stack(address: u64) -> bool {
    let start = core::ptr::addr_of!(ap_stacks) as u64;
    let end = core::ptr::addr_of!(ap_stacks_end) as u64;
    (start..end).contains(&address)
}

/// An exception on an AP: recorded for the boot vCPU, then the AP stops for good. CPL0.
pub fn ap_fault(vector: u64, rip: u64) -> ! {
    if FAULT_VECTOR
        .compare_exchange(0, vector + 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        FAULT_RIP.store(rip, Ordering::Release);
    }
    loop {
        // SAFETY: stops this vCPU with interrupts off; nothing else runs on it.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// The AP's first Rust code, on its kernel stack, from the trampoline. CPL0.
#[no_mangle]
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = crate::convert::usize_from(cpu);
    if cpu == 0 || cpu >= MAX_CPUS {
        ap_fault(0xff, 0);
    }
    load_tables(cpu);
    apic::enable();
    ONLINE[cpu].store(u32::from(apic::id()) + 1, Ordering::Release);
    ap_idle(cpu)
}

/// The CPL3 function APs run when the mode leaves `Halt` (0 until user mode names it): the
/// kernel side never names a workload.
static AP_USER_ENTRY: AtomicUsize = AtomicUsize::new(0);

/// Names the CPL3 function APs run (user mode, once, before it sets any mode).
pub fn set_ap_user_entry(entry: extern "C" fn() -> !) {
    AP_USER_ENTRY.store(entry as usize, Ordering::Release);
}

fn ap_user_entry() -> Option<extern "C" fn() -> !> {
    let raw = AP_USER_ENTRY.load(Ordering::Acquire);
    // SAFETY: a non-zero value was stored by `set_ap_user_entry` from a function of
    // exactly this type, and functions are never unloaded.
    (raw != 0).then(|| unsafe { core::mem::transmute::<usize, extern "C" fn() -> !>(raw) })
}

/// The AP's kernel loop: halt with interrupts on until the mode asks for user mode, then
/// run the user entry at CPL3 on the AP's user stack (the kernel stack's frames are
/// abandoned: a later `ApIdle` system call comes back here afresh). CPL0.
pub fn ap_idle(cpu: usize) -> ! {
    loop {
        if let (false, Some(entry)) = (ap_mode() == ApMode::Halt, ap_user_entry()) {
            // Registering again is harmless: KVM keeps adding to the same area.
            if STEAL_WANTED.load(Ordering::Acquire) != 0 {
                enable_steal_time(cpu);
            }
            super::user::enter_user(entry, stack_top(cpu, STACK_USER));
        }
        super::cpu::sti_hlt_cli();
    }
}

/// This AP's GDT (the boot GDT's segments and its own TSS) and TSS, and the shared IDT.
/// Every store is a volatile scalar one (see `AP_TSS_WORDS`).
fn load_tables(cpu: usize) {
    // SAFETY: entry `cpu` belongs to this AP alone (see `ApTables`); the boot GDT is
    // static and only its first five (constant) entries are read.
    unsafe {
        let this = &mut (*AP_TABLES.0.get())[cpu];
        let boot = core::ptr::addr_of!(gdt).cast::<u64>();
        for i in 0..5 {
            core::ptr::write_volatile(&mut this.gdt[i], boot.add(i).read_volatile());
        }
        let tss = this.tss.as_mut_ptr();
        let set64 = |word: usize, value: u64| {
            tss.add(word).write_volatile(crate::convert::low32(value));
            tss.add(word + 1).write_volatile((value >> 32) as u32);
        };
        set64(TSS_RSP0, stack_top(cpu, STACK_KERNEL));
        set64(TSS_IST1, stack_top(cpu, STACK_IST));
        set64(TSS_IST1 + 2, stack_top(cpu, STACK_DF));
        tss.add(TSS_IOMAP)
            .write_volatile(u32::from(AP_TSS_SIZE) << 16);
        let [low, high] = traps::tss_descriptor(tss as u64, u64::from(AP_TSS_SIZE) - 1);
        core::ptr::write_volatile(&mut this.gdt[5], low);
        core::ptr::write_volatile(&mut this.gdt[6], high);
        traps::load_gdt(this.gdt.as_ptr() as u64, GDT_LIMIT);
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }
    traps::load_shared_idt();
}

global_asm!(
    r#"
    /* The AP trampoline, copied to 0x8000 (TRAMPOLINE_ADDR): real mode -> protected mode
       -> long mode with the boot page tables -> ap_entry on the stack the boot vCPU chose.
       Addresses are 0x8000 + offset: the code runs from the copy. */
    .section .rodata.trampoline, "a"
    .balign 16
    .global ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl 0x8000 + (tramp_gdt_pointer - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(0x8000 + (tramp32 - ap_trampoline_start))
    .code32
tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl 0x8000 + (tramp_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax          /* clear EM */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmpl $0x08, $(0x8000 + (tramp64 - ap_trampoline_start))
    .code64
tramp64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq 0x8000 + (tramp_stack - ap_trampoline_start), %rsp
    movq 0x8000 + (tramp_cpu - ap_trampoline_start), %rdi
    movq 0x8000 + (tramp_entry - ap_trampoline_start), %rax
    jmpq *%rax
    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 data */
    .quad 0x00cf9a000000ffff        /* 0x18 code, 32-bit */
tramp_gdt_pointer:
    .word 31
    .long 0x8000 + (tramp_gdt - ap_trampoline_start)
    .balign 8
    /* TrampolineParams, filled in the copy by the boot vCPU before each SIPI. */
    .global ap_trampoline_params
ap_trampoline_params:
tramp_cr3:
    .quad 0
tramp_stack:
    .quad 0
tramp_cpu:
    .quad 0
tramp_entry:
    .quad 0
    .global ap_trampoline_end
ap_trampoline_end:

    .section .text
    /* Long mode, boot GDT's selectors: a call frame for ap_main (RSP 8 mod 16). */
    .global ap_entry
ap_entry:
    xorl %ebp, %ebp
    call ap_main
1:  cli
    hlt
    jmp 1b

    /* sched.ipi's handler on the AP: answer the request, and (when asked) send the
       answer back as an IPI (ICR high, then low: the low write sends), EOI. */
    .global ipi_interrupt
ipi_interrupt:
    pushq %rax
    pushq %rcx
    pushq %rdx
    movl IPI_REQUEST(%rip), %eax
    movl %eax, IPI_ANSWER(%rip)
    movl IPI_REPLY_ICR_LOW(%rip), %eax
    testl %eax, %eax
    jz 1f
    movl IPI_REPLY_ICR_HIGH(%rip), %edx
    movabsq $0xfee00310, %rcx
    movl %edx, (%rcx)
    movabsq $0xfee00300, %rcx
    movl %eax, (%rcx)
1:  movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    /* sched.ipi's answer arriving on the boot vCPU: note it, EOI. */
    .global ipi_reply_interrupt
ipi_reply_interrupt:
    pushq %rax
    movl IPI_ANSWER(%rip), %eax
    movl %eax, IPI_REPLY_SEEN(%rip)
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq

    /* The local APIC timer (sched.wakeup): EOI, and back to after the HLT. */
    .global timer_interrupt
timer_interrupt:
    pushq %rax
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq

    /* Spurious interrupts need no EOI. */
    .global spurious_interrupt
spurious_interrupt:
    iretq

    .section .bss
    .balign 4096
    .global ap_stacks
ap_stacks:
    .skip 8 * 4 * 16384
    .global ap_stacks_end
ap_stacks_end:
"#,
    options(att_syntax)
);

/// Offset of the parameters in the trampoline.
pub fn params_offset() -> usize {
    extern "C" {
        static ap_trampoline_params: u8;
    }
    core::ptr::addr_of!(ap_trampoline_params) as usize
        - core::ptr::addr_of!(ap_trampoline_start) as usize
}

const _: () = assert!(MAX_CPUS as u64 * STACKS_PER_CPU * AP_STACK == 8 * 4 * 16384);

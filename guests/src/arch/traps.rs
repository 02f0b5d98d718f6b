//! TSS, IDT and the entry stubs: every exception becomes a `crash` line naming the vector
//! and RIP, except the #UD of the system-call trampoline, which is how user mode reaches
//! CPL0 (see `hvbench_syscall` below).
//!
//! Exceptions run on IST stacks (the Rust code uses the red zone, which an interrupt on
//! the current stack would overwrite); #DF has a stack of its own.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use super::apic;
use super::boot::{KERNEL_CS, TSS_SELECTOR};

/// #UD: the system-call trap. It arrives from user mode, so it runs on the TSS's RSP0
/// stack rather than an IST one, leaving the IST stacks to exceptions raised inside a call.
pub const VECTOR_UD: u64 = 6;

/// Registers saved by the exception stub, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    /// One bit per port, all clear: every port is open to user mode. IOPL 3 should be
    /// enough, but kvm_pvm checks the bitmap for CPL3 port I/O regardless.
    io_bitmap: [u8; IO_BITMAP_BYTES],
    /// The byte after the bitmap must be all ones.
    io_bitmap_end: u8,
}

const IO_BITMAP_BYTES: usize = 65536 / 8;
/// Offset of `io_bitmap` in the TSS.
const IO_BITMAP_OFFSET: u16 = 104;
const _: () = assert!(core::mem::offset_of!(Tss, io_bitmap) == IO_BITMAP_OFFSET as usize);

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// The IDTR's limit: 256 gates of 16 bytes, less one, 4095 (checked below).
#[allow(clippy::cast_possible_truncation)]
const IDT_LIMIT: u16 = (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16;
const _: () = assert!(IDT_LIMIT as usize == core::mem::size_of::<[IdtEntry; 256]>() - 1);

const EMPTY_GATE: IdtEntry = IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

/// Kernel data the CPU reads by address; written once by `init` before user mode starts.
struct CpuTables {
    tss: UnsafeCell<Tss>,
    idt: UnsafeCell<[IdtEntry; 256]>,
}

// SAFETY: the tables are written only by `init`, on the boot vCPU, before anything else
// runs and before any AP starts; afterwards every CPU only reads them.
unsafe impl Sync for CpuTables {}

static TABLES: CpuTables = CpuTables {
    tss: UnsafeCell::new(Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: IO_BITMAP_OFFSET,
        io_bitmap: [0; IO_BITMAP_BYTES],
        io_bitmap_end: 0xff,
    }),
    idt: UnsafeCell::new([EMPTY_GATE; 256]),
};

extern "C" {
    /// The TSS descriptor slot of the boot GDT, which `init` fills in: `mut`, because it
    /// is written.
    static mut gdt_tss: [u64; 2];
    static exception_stubs: [u64; 32];
    static kernel_stack_top: u8;
    static ist_stack_top: u8;
    static df_stack_top: u8;
    static hvbench_syscall_trap: u8;
    fn ipi_interrupt();
    fn ipi_reply_interrupt();
    fn timer_interrupt();
    fn spurious_interrupt();
}

/// Address of the UD2 that user mode executes to make a system call.
pub fn syscall_trap_address() -> u64 {
    core::ptr::addr_of!(hvbench_syscall_trap) as u64
}

// The gate holds the handler's address in 16-, 16- and 32-bit pieces: each cast keeps the
// piece it is meant to.
#[allow(clippy::cast_possible_truncation)]
fn gate(handler: u64, ist: u8) -> IdtEntry {
    IdtEntry {
        offset_low: handler as u16,
        selector: KERNEL_CS,
        ist,
        // Present, interrupt gate (IF cleared on entry).
        type_attr: 0x8e,
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        reserved: 0,
    }
}

/// Loads the TSS and an IDT whose every exception vector reports a crash. CPL0.
pub fn init() {
    // SAFETY: called once at CPL0 before user mode; nothing else touches these tables.
    unsafe {
        let tss = &mut *TABLES.tss.get();
        tss.rsp[0] = core::ptr::addr_of!(kernel_stack_top) as u64;
        tss.ist[0] = core::ptr::addr_of!(ist_stack_top) as u64;
        tss.ist[1] = core::ptr::addr_of!(df_stack_top) as u64;

        let base = TABLES.tss.get() as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let [low, high] = tss_descriptor(base, limit);
        let descriptor = core::ptr::addr_of_mut!(gdt_tss).cast::<u64>();
        descriptor.write_volatile(low);
        descriptor.add(1).write_volatile(high);
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));

        let idt = &mut *TABLES.idt.get();
        let stubs = &*core::ptr::addr_of!(exception_stubs);
        for (vector, &stub) in stubs.iter().enumerate() {
            let ist = match vector as u64 {
                8 => 2,
                VECTOR_UD => 0,
                _ => 1,
            };
            idt[vector] = gate(stub, ist);
        }
        // Interrupts (local APIC), on the IST stack like exceptions: the kernel code they
        // interrupt uses the red zone.
        let interrupts = [
            (apic::IPI_VECTOR, ipi_interrupt as *const () as usize),
            (
                apic::IPI_REPLY_VECTOR,
                ipi_reply_interrupt as *const () as usize,
            ),
            (apic::TIMER_VECTOR, timer_interrupt as *const () as usize),
            (
                apic::SPURIOUS_VECTOR,
                spurious_interrupt as *const () as usize,
            ),
        ];
        for (vector, handler) in interrupts {
            idt[usize::from(vector)] = gate(handler as u64, 1);
        }
        load_shared_idt();
    }
}

/// A 64-bit available TSS descriptor (two GDT slots) for a TSS at `base`.
pub fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// Loads the IDT every CPU shares (filled by `init`). CPL0.
pub fn load_shared_idt() {
    load_idt(TABLES.idt.get() as u64, IDT_LIMIT);
}

/// LGDT. CPL0; the table must hold the boot GDT's selectors.
pub fn load_gdt(base: u64, limit: u16) {
    let pointer = DescriptorPointer { limit, base };
    // SAFETY: LGDT reads the 10-byte pointer; callers pass a static table whose code and
    // data selectors match the ones loaded, so the segment registers stay valid.
    unsafe { asm!("lgdt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn load_idt(base: u64, limit: u16) {
    let pointer = DescriptorPointer { limit, base };
    // SAFETY: LIDT reads the 10-byte pointer; the table it names is static.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

/// Triple-faults the vCPU on purpose (`selftest.triple-fault`): with an empty IDT the
/// #UD cannot be delivered, nor can the #GP and #DF that follow. CPL0.
pub fn triple_fault() -> ! {
    load_idt(0, 0);
    // SAFETY: UD2 raises #UD; with no IDT the CPU shuts down, which is the point.
    unsafe { asm!("ud2", options(noreturn)) }
}

global_asm!(
    r#"
    .section .bss
    .balign 16
    .skip 65536
    .global kernel_stack_top
kernel_stack_top:
    .skip 16384
    .global ist_stack_top
ist_stack_top:
    .skip 16384
    .global df_stack_top
df_stack_top:

    .section .text
    .macro exception_stub vector, has_error
    .balign 16
exception_stub_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp exception_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    exception_stub \v, 0
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    exception_stub \v, 1
    .endr

exception_common:
    cld
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call exception_handler
    /* Returns only for a system call: resume user mode. */
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    /* The system call: user mode calls this (SysV: rdi = number, rsi/rdx/rcx = arguments)
       and the UD2 traps to the kernel, which recognises the address, runs the call and
       resumes after the UD2 with the result in rax. Neither SYSCALL (it stays at CPL3)
       nor INT (it raises #UD) reaches CPL0 from user mode under kvm_pvm; an exception
       does, everywhere. */
    .section .text
    .global hvbench_syscall
hvbench_syscall:
    movq %rdi, %rax
    movq %rsi, %rdi
    movq %rdx, %rsi
    movq %rcx, %rdx
    .global hvbench_syscall_trap
hvbench_syscall_trap:
    ud2
    ret

    .section .rodata
    .balign 8
    .global exception_stubs
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
    .endr
"#,
    options(att_syntax)
);

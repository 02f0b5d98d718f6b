//! The PVH entry: 32-bit protected mode with paging off (the PVH ABI), to long mode, to
//! `kernel_main`. Everything the switch needs (GDT, page tables) is assembled into the
//! image, so no loop runs before long mode: on hosts that emulate CPL0 code each
//! instruction costs about a microsecond.

use core::arch::global_asm;

/// Selectors of the GDT below. User selectors carry RPL 3.
pub const KERNEL_CS: u16 = 0x08;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* struct hvm_start_info, for kernel_main */
    lgdt (gdt_pointer)
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT: long mode, SSE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax          /* clear EM: SSE instructions must not trap */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq kernel_stack_top(%rip), %rsp
    movl %esi, %edi
    xorl %ebp, %ebp
    call kernel_main
1:  hlt
    jmp 1b

    .section .data.pagetables, "aw"
    /* Identity map of 0..4 GiB with 2 MiB pages, user-accessible: measurement code runs
       at CPL3 and touches any address. The top GiB (MMIO) is uncached. */
    .balign 4096
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    /* A second root with the same low mapping, for mem.cr3-switch. */
    .global pml4_alt
pml4_alt:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .global pdpt
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
    .global pd
pd:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9f
    .set page, page + 1
    .endr

    .section .data, "aw"
    .balign 16
    .global gdt
gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data, DPL 3 */
    .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit, DPL 3 */
    .global gdt_tss
gdt_tss:
    .quad 0                         /* 0x28 TSS, filled in by the kernel */
    .quad 0
gdt_end:
    .balign 16
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt
"#,
    options(att_syntax)
);

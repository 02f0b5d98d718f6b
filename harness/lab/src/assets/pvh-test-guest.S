/* Source of the PVH test guest whose bytes xen.rs tests embed (gcc -m32 -c; ld -m elf_i386
 * -T with . = 0x100000 and sections .note.Xen .text .data .bss in that order; objcopy -O binary). */
/* Minimal flat PVH guest for Xen: prints on port 0xE9 and on the PV console,
 * then SCHEDOP_shutdown(poweroff). 32-bit, paging off, identity-mapped. */
        .code32
        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .text
        .globl _start
_start:
        cli
        mov $stack_top, %esp
        cld
        /* port 0xE9 (Xen's log with guest_loglvl=all) */
        mov $msg, %esi
1:      lodsb
        test %al, %al
        jz 2f
        outb %al, $0xe9
        jmp 1b
2:
        /* find Xen CPUID leaves */
        mov $0x40000000, %edi
3:      mov %edi, %eax
        cpuid
        cmp $0x566e6558, %ebx   /* "XenV" */
        jne 4f
        cmp $0x65584d4d, %ecx   /* "MMXe" */
        jne 4f
        cmp $0x4d4d566e, %edx   /* "nVMM" */
        je 5f
4:      add $0x100, %edi
        cmp $0x40010000, %edi
        jb 3b
        jmp dead
5:      lea 2(%edi), %eax
        cpuid                   /* ebx = hypercall page MSR */
        mov %ebx, %ecx
        mov $hypercall_page, %eax
        xor %edx, %edx
        wrmsr

        /* console pfn: HVMOP_get_param(HVM_PARAM_CONSOLE_PFN=17) */
        movl $17, param_index
        mov $1, %ebx
        mov $param, %ecx
        call hypercall_page + 34*32
        test %eax, %eax
        jnz shutdown
        mov param_value, %eax
        shl $12, %eax
        mov %eax, cons_page
        movl $18, param_index
        mov $1, %ebx
        mov $param, %ecx
        call hypercall_page + 34*32
        test %eax, %eax
        jnz shutdown
        mov param_value, %eax
        mov %eax, evtchn_port

        /* copy msg into the out ring */
        mov cons_page, %ebp
        mov 3084(%ebp), %edx    /* out_prod */
        mov $msg, %esi
6:      lodsb
        test %al, %al
        jz 7f
        mov %edx, %ecx
        and $2047, %ecx
        mov %al, 1024(%ebp,%ecx)
        inc %edx
        jmp 6b
7:      sfence
        mov %edx, 3084(%ebp)
        mov $4, %ebx            /* EVTCHNOP_send */
        mov $evtchn_port, %ecx
        call hypercall_page + 32*32
        /* wait until xenconsoled consumed everything */
8:      mov cons_page, %ebp
        mov 3080(%ebp), %eax
        cmp 3084(%ebp), %eax
        je shutdown
        xor %ebx, %ebx          /* SCHEDOP_yield */
        xor %ecx, %ecx
        call hypercall_page + 29*32
        jmp 8b

shutdown:
        mov $2, %ebx            /* SCHEDOP_shutdown */
        mov $shutdown_reason, %ecx
        call hypercall_page + 29*32
dead:   hlt
        jmp dead

        .data
        .balign 8
param:                          /* struct xen_hvm_param */
        .word 0x7ff0, 0         /* DOMID_SELF, pad */
param_index: .long 0
param_value: .quad 0
evtchn_port: .long 0
cons_page:   .long 0
shutdown_reason: .long 0        /* SHUTDOWN_poweroff */
msg:    .asciz "hvbench-pvh-test: hello from a PVH guest\n"

        .bss
        .balign 4096
hypercall_page: .skip 4096
        .skip 4096
stack_top:

//! CPL0: boot, the system calls user mode makes, kernel-mode measurement loops, exceptions
//! and the final exit. Kept small on purpose: on `kvm_pvm` hosts every instruction here
//! is emulated (about 1 us each), so the kernel does only what needs CPL0.

use workloads::abi::{ExitCode, EXIT_PORT, UART_PORT};
use workloads::Hypervisor;

use crate::arch::cpu::{self, hlt, outl, rdmsr, timed};
use crate::arch::{apic, apic_oneshot, ipi, smp, traps, user};
use crate::console::{self, Console};
use crate::global::Global;
use crate::hypervisor::{self, xen, KVM_HC_VAPIC_POLL_IRQ};
use crate::sysabi::{
    self, boot_info, BootInfo, CrashInfo, KernelOp, PtUpdateArgs, Syscall, KERNEL_LOOP_FAULTED,
    KERNEL_LOOP_TIMED_OUT, NO_KERNEL_LOOP,
};

/// Pages of `mem.prot-fault` whose write faults the kernel repairs.
#[derive(Clone, Copy)]
struct ProtWindow {
    va: u64,
    pages: u64,
    first_pt: u64,
}

static PROT_WINDOW: Global<Option<ProtWindow>> = Global::new(None);

/// Longest buffer one ConsoleWrite takes (a result line is at most 513 bytes).
const MAX_CONSOLE_WRITE: u64 = 4096;

extern "C" {
    static user_stack_top: u8;
}

core::arch::global_asm!(
    r#"
    .section .bss
    .balign 16
    .skip 262144
    .global user_stack_top
user_stack_top:
"#,
    options(att_syntax)
);

/// Entered from the PVH boot code in long mode with the start info's address.
#[no_mangle]
extern "C" fn kernel_main(start_info: u32) -> ! {
    traps::init();
    let hv = hypervisor::detect();
    let vendor = hypervisor::cpu_vendor();
    let (tsc_khz, tsc_source) = hypervisor::tsc_khz(&hv);
    let mut platform_error = None;
    if hv.kind == Hypervisor::Xen {
        match xen::init(&hv) {
            Ok(()) => console::select(Console::XenRing),
            Err(e) => platform_error = Some(e),
        }
    }
    sysabi::set_boot_info(BootInfo {
        start_info: start_info as u64,
        hypervisor: hv,
        vendor,
        hypercall: hypervisor::hypercall_insn(&vendor),
        tsc_khz,
        tsc_source,
        platform_error,
        lapic: apic::caps(),
        steal_time: hypervisor::kvm_steal_time(&hv),
    });
    user::enter_user(
        crate::runner::user_main,
        core::ptr::addr_of!(user_stack_top) as u64,
    )
}

fn syscall_dispatch(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    match nr {
        n if n == Syscall::Exit as u64 => {
            let code = u8::try_from(a0).ok().and_then(ExitCode::from_u8);
            exit(code.unwrap_or(ExitCode::Error))
        }
        n if n == Syscall::KernelLoop as u64 => kernel_loop(a0, a1, a2),
        n if n == Syscall::ConsoleKick as u64 => {
            if xen::is_ready() {
                xen::notify_console();
            }
            0
        }
        n if n == Syscall::Yield as u64 => {
            if xen::is_ready() {
                xen::yield_cpu();
            }
            0
        }
        n if n == Syscall::TripleFault as u64 => traps::triple_fault(),
        n if n == Syscall::ConsoleWrite as u64 => {
            let len = a1.min(MAX_CONSOLE_WRITE) as usize;
            // SAFETY: user mode passes a buffer it owns; all memory is identity-mapped and
            // the length is bounded, so the read stays within mapped memory.
            let bytes = unsafe { core::slice::from_raw_parts(a0 as *const u8, len) };
            cpu::rep_outsb(UART_PORT, bytes);
            0
        }
        n if n == Syscall::FlushTlb as u64 => {
            cpu::write_cr3(cpu::read_cr3());
            0
        }
        n if n == Syscall::SetWindow as u64 => {
            crate::mem::paging::set_window_entry(a0);
            cpu::write_cr3(cpu::read_cr3());
            0
        }
        n if n == Syscall::XenMemoryOp as u64 => match a0 {
            xen::XENMEM_DECREASE_RESERVATION
            | xen::XENMEM_POPULATE_PHYSMAP
            | xen::XENMEM_ADD_TO_PHYSMAP
                if xen::is_ready() =>
            {
                // Xen's signed result travels as its bits: the caller compares them with the
                // count it asked for, which an error (negative) never equals.
                u64::from_ne_bytes(xen::memory_op(a0, a1).to_ne_bytes())
            }
            _ => u64::MAX,
        },
        n if n == Syscall::XenEventSend as u64 => {
            // An event channel port is 32 bits (evtchn_port_t): anything wider names none.
            match u32::try_from(a0) {
                Ok(port) if xen::is_ready() => {
                    xen::send_event(port);
                    0
                }
                Ok(_) => 0,
                Err(_) => u64::MAX,
            }
        }
        n if n == Syscall::XenAllocUnbound as u64 => match u16::try_from(a0) {
            Ok(remote) if xen::is_ready() => xen::alloc_unbound(remote)
                .map(u64::from)
                .unwrap_or(u64::MAX),
            _ => u64::MAX,
        },
        n if n == Syscall::XenSuspend as u64 && xen::is_ready() => {
            hypervisor::suspend::suspend_now()
        }
        n if n == Syscall::XenVcpuUp as u64 && xen::is_ready() => {
            hypervisor::xen_smp::vcpu_up_status(crate::convert::usize_from(a0))
        }
        n if n == Syscall::XenSteal as u64 && xen::is_ready() => {
            hypervisor::runstate::steal_ns(crate::convert::usize_from(a0)).unwrap_or(u64::MAX)
        }
        n if n == Syscall::EnableStealTime as u64 && boot_info().steal_time => {
            smp::enable_steal_time(0);
            0
        }
        n if n == Syscall::SetProtWindow as u64 => {
            PROT_WINDOW.set((a1 > 0).then_some(ProtWindow {
                va: a0,
                pages: a1,
                first_pt: a2,
            }));
            0
        }
        _ => u64::MAX,
    }
}

extern "C" {
    /// The alternate root `mem.cr3-switch` fills in: `mut`, because it is written.
    static mut pml4_alt: [u64; 512];
}

/// Kernel-mode workloads: the instruction runs in a loop at CPL0, timed at CPL0.
fn kernel_loop(op: u64, iterations: u64, arg: u64) -> u64 {
    let Some(op) = KernelOp::from_raw(op) else {
        return NO_KERNEL_LOOP;
    };
    match op {
        KernelOp::Hlt => timed(iterations, hlt),
        KernelOp::MsrRead => timed(iterations, || {
            // IA32_APIC_BASE: intercepted by KVM and Xen.
            core::hint::black_box(rdmsr(0x1b));
        }),
        KernelOp::Hypercall => hypercall_loop(iterations),
        KernelOp::PtUpdate => pt_update_loop(iterations, arg),
        KernelOp::Cr3Switch => cr3_switch_loop(iterations),
        KernelOp::TimerWake => timer_wake_loop(iterations, arg),
        KernelOp::TimerWakeOneShot => {
            // SAFETY: user mode passes a `OneShotArgs` it owns (all memory is mapped).
            let args = unsafe { (arg as *const apic_oneshot::OneShotArgs).read_volatile() };
            apic_oneshot::wake_loop(iterations, args)
        }
        KernelOp::IpiRoundTrip => {
            // SAFETY: user mode passes an `IpiArgs` it owns (all memory is mapped).
            let args = unsafe { (arg as *const ipi::IpiArgs).read_volatile() };
            ipi::round_trip_loop(iterations, args).unwrap_or(KERNEL_LOOP_TIMED_OUT)
        }
    }
}

/// Most HLTs one wake-up may take before the deadline passes (a stray interrupt wakes the
/// vCPU early; each HLT is then repeated), so a broken timer cannot hold the kernel.
const MAX_EARLY_WAKES: u32 = 1000;

/// `KernelOp::TimerWake`: the local APIC must be enabled and the TSC-deadline timer
/// present (user mode checks both first).
fn timer_wake_loop(iterations: u64, delay: u64) -> u64 {
    apic::write(
        apic::LVT_TIMER,
        apic::LVT_TSC_DEADLINE | u32::from(apic::TIMER_VECTOR),
    );
    let mut late = 0u64;
    for _ in 0..iterations {
        let deadline = cpu::rdtsc_fenced().wrapping_add(delay);
        cpu::wrmsr(apic::MSR_TSC_DEADLINE, deadline);
        let mut now = deadline;
        for _ in 0..MAX_EARLY_WAKES {
            cpu::sti_hlt_cli();
            now = cpu::rdtsc_fenced();
            if now >= deadline {
                break;
            }
        }
        late = late.wrapping_add(now.saturating_sub(deadline));
    }
    cpu::wrmsr(apic::MSR_TSC_DEADLINE, 0);
    apic::write(apic::LVT_TIMER, apic::LVT_MASKED);
    late
}

/// `KernelOp::Hypercall` on the hypervisor the kernel detected.
fn hypercall_loop(iterations: u64) -> u64 {
    let info = boot_info();
    match info.hypervisor.kind {
        Hypervisor::Kvm => {
            // Some hosts (kvm_pvm) refuse hypercalls from CPL0 with #UD: try one first.
            if cpu::probe_hypercall(info.hypercall, KVM_HC_VAPIC_POLL_IRQ) == cpu::PROBE_FAULTED {
                return KERNEL_LOOP_FAULTED;
            }
            timed(iterations, || {
                core::hint::black_box(cpu::hypercall(
                    info.hypercall,
                    KVM_HC_VAPIC_POLL_IRQ,
                    0,
                    0,
                    0,
                ));
            })
        }
        Hypervisor::Xen if xen::is_ready() => timed(iterations, || {
            core::hint::black_box(xen::version());
        }),
        _ => NO_KERNEL_LOOP,
    }
}

/// `KernelOp::PtUpdate`: `arg` points at the caller's `PtUpdateArgs`.
fn pt_update_loop(iterations: u64, arg: u64) -> u64 {
    {
        // SAFETY: user mode passes a `PtUpdateArgs` it owns (all memory is mapped).
        let a = unsafe { (arg as *const PtUpdateArgs).read_volatile() };
        let pte = a.pte as *mut u64;
        let mut which = 0;
        timed(iterations, || {
            which ^= 1;
            // SAFETY: `pte` is a PTE of the caller's window; both entries map pages
            // the caller allocated.
            unsafe { pte.write_volatile(a.entries[which]) };
            cpu::invlpg(a.va);
            // SAFETY: the page is mapped by the entry just written.
            core::hint::black_box(unsafe { (a.va as *const u64).read_volatile() });
        })
    }
}

/// `KernelOp::Cr3Switch`: between the boot root and an alternate that maps the same.
fn cr3_switch_loop(iterations: u64) -> u64 {
    {
        let main = crate::mem::paging::root() as u64;
        let alt = core::ptr::addr_of_mut!(pml4_alt).cast::<u64>();
        // The alternate root must map what the main one maps (the window too).
        for i in 0..2 {
            // SAFETY: both roots are statics of the boot code, 512 entries each.
            unsafe {
                alt.add(i)
                    .write_volatile((main as *const u64).add(i).read_volatile())
            };
        }
        let roots = [alt as u64, main];
        let mut which = 0;
        let cycles = timed(iterations, || {
            which ^= 1;
            cpu::write_cr3(roots[which]);
        });
        cpu::write_cr3(main);
        cycles
    }
}

/// A write fault in the protection-fault window: make the page writable and go on.
fn repair_prot_fault(frame: &traps::ExceptionFrame) -> bool {
    let Some(w) = PROT_WINDOW.get() else {
        return false;
    };
    let cr2 = cpu::read_cr2();
    // Error code: present (bit 0) and write (bit 1).
    if frame.vector != 14 || frame.error_code & 3 != 3 || cr2 < w.va || cr2 >= w.va + w.pages * 4096
    {
        return false;
    }
    let pte = (w.first_pt + (cr2 - w.va) / 4096 * 8) as *mut u64;
    // SAFETY: the window's page tables were set up by user mode for this purpose.
    unsafe { pte.write_volatile(pte.read_volatile() | 2) };
    cpu::invlpg(cr2);
    true
}

/// Ends the run: the exit port on KVM-based hosts, SCHEDOP_shutdown on Xen. CPL0.
pub fn exit(code: ExitCode) -> ! {
    console::drain();
    if xen::is_ready() {
        let reason = if code == ExitCode::Crash {
            xen::ShutdownReason::Crash
        } else {
            xen::ShutdownReason::Poweroff
        };
        xen::shutdown(reason);
    }
    loop {
        outl(EXIT_PORT, code as u32);
        // A host without an exit device: stop here.
        hlt();
    }
}

extern "C" {
    static crash_stack_top: u8;
}

core::arch::global_asm!(
    r#"
    .section .bss
    .balign 16
    .skip 65536
    .global crash_stack_top
crash_stack_top:
"#,
    options(att_syntax)
);

/// Every exception ends here; only a system call returns. The report is formatted in user mode, on a stack of its
/// own: formatting at CPL0 would be slow on hosts that emulate CPL0 and could itself
/// fault there (their emulators lack most SSE instructions).
#[no_mangle]
extern "C" fn exception_handler(frame: &mut traps::ExceptionFrame) {
    if smp::on_ap_stack(core::ptr::addr_of!(*frame) as u64) {
        let ap_idle = frame.vector == traps::VECTOR_UD
            && frame.rip == traps::syscall_trap_address()
            && frame.cs & 3 == 3
            && frame.rax == Syscall::ApIdle as u64;
        match crate::convert::usize_from(frame.rdi) {
            cpu if ap_idle && cpu > 0 && cpu < smp::MAX_CPUS => smp::ap_idle(cpu),
            _ => smp::ap_fault(frame.vector, frame.rip),
        }
    }
    if frame.vector == traps::VECTOR_UD
        && frame.rip == traps::syscall_trap_address()
        && frame.cs & 3 == 3
    {
        frame.rax = syscall_dispatch(frame.rax, frame.rdi, frame.rsi, frame.rdx);
        // Resume after the UD2.
        frame.rip += 2;
        return;
    }
    if repair_prot_fault(frame) {
        return;
    }
    if frame.cs & 3 == 0 {
        if let Some(resume) = cpu::probe_resume_address(frame.rip) {
            frame.rip = resume;
            return;
        }
    }
    if sysabi::crash_info().is_some() {
        // The reporter itself faulted: stop without a report.
        exit(ExitCode::Crash);
    }
    sysabi::set_crash_info(CrashInfo {
        workload: sysabi::current(),
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rsp: frame.rsp,
        cr2: cpu::read_cr2(),
    });
    user::enter_user(
        crate::runner::report_crash,
        core::ptr::addr_of!(crash_stack_top) as u64,
    )
}

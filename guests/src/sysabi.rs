//! What user mode and the kernel share: the system-call numbers and their arguments, and
//! what the kernel learnt at boot or saw crash (all memory is user-accessible, so user
//! mode reads it directly). User code imports this, never the kernel.

use workloads::WorkloadId;

use crate::arch::apic;
use crate::arch::cpu::HypercallInsn;
use crate::global::Global;
use crate::hypervisor;

/// What the kernel learnt at boot; read by user mode (all memory is user-accessible).
#[derive(Clone, Copy)]
pub struct BootInfo {
    pub start_info: u64,
    pub hypervisor: hypervisor::Detected,
    pub vendor: [u8; 12],
    pub hypercall: HypercallInsn,
    pub tsc_khz: u64,
    pub tsc_source: &'static str,
    /// Why the hypervisor's own interface could not be set up (Xen), if it could not.
    pub platform_error: Option<&'static str>,
    /// The local APIC, as CPUID tells the kernel.
    pub lapic: apic::LapicCaps,
    /// KVM's steal-time MSR is offered (KVM_FEATURE_STEAL_TIME).
    pub steal_time: bool,
}

static BOOT: Global<Option<BootInfo>> = Global::new(None);

/// The workload running now, named in crash reports.
static CURRENT: Global<Option<WorkloadId>> = Global::new(None);

pub fn boot_info() -> BootInfo {
    // kernel_main sets it before user mode exists, so it is always there.
    match BOOT.get() {
        Some(info) => info,
        None => panic!("boot info read before the kernel set it"),
    }
}

/// Set once, by the kernel at boot, before user mode exists.
pub fn set_boot_info(info: BootInfo) {
    BOOT.set(Some(info));
}

/// The workload running now (the kernel names it in a crash report).
pub fn current() -> Option<WorkloadId> {
    CURRENT.get()
}

pub fn set_current(workload: Option<WorkloadId>) {
    CURRENT.set(workload);
}

/// System call numbers (see `arch::user::syscall`).
#[repr(u64)]
pub enum Syscall {
    /// Ends the run with the exit code in the first argument.
    Exit = 0,
    /// Runs `iterations` of a kernel-mode workload; returns the cycles taken,
    /// `KERNEL_LOOP_FAULTED` if the host refused the instruction, or `NO_KERNEL_LOOP` for a
    /// workload with no kernel loop (on this hypervisor).
    KernelLoop = 1,
    /// Signals the console backend (Xen).
    ConsoleKick = 2,
    /// Gives the CPU to the hypervisor once (Xen).
    Yield = 3,
    /// Triple-faults on purpose.
    TripleFault = 4,
    /// Writes a buffer (address, length) to the UART.
    ConsoleWrite = 5,
    /// Flushes the TLB (reloads CR3).
    FlushTlb = 6,
    /// Sets the protection-fault window (virtual base, pages, first page table): a write
    /// fault there makes the page writable again and resumes.
    SetProtWindow = 7,
    /// Xen `memory_op` (command, address of a `xen::MemoryReservation` or, for blkfront's
    /// grant table, a `xen::AddToPhysmap` in user memory): only decrease_reservation,
    /// populate_physmap and add_to_physmap are passed on.
    /// Returns Xen's answer (extents done, or a negative errno) as a u64.
    XenMemoryOp = 8,
    /// Signals a Xen event channel (port): the xenstore ring's, for the balloon.
    XenEventSend = 9,
    /// Registers the calling (boot) vCPU's KVM steal-time area; returns 0, or u64::MAX
    /// where KVM offers no steal time.
    EnableStealTime = 10,
    /// From an AP's user mode: back to its kernel's halt loop (the argument: its index).
    ApIdle = 11,
    /// Links the mapping window's PDPT (its entry, flags included) into the live PML4, or
    /// unlinks it (0), and flushes the TLB. In the kernel because the live PML4 is a page
    /// table in use: Xen's shadow paging takes a user-mode write to a page table as a sign
    /// that it is no longer one, and crashes the domain when that table is the one in CR3.
    SetWindow = 12,
    /// Xen EVTCHNOP_alloc_unbound for blkfront (the backend's domain id): the port, or
    /// u64::MAX.
    XenAllocUnbound = 13,
    /// Xen: starts application processor `cpu` (VCPUOP_initialise + VCPUOP_up); returns
    /// 0, or the failed step in bits 32.. (1 initialise, 2 up, 3 not an AP) and Xen's
    /// errno in the low bits.
    XenVcpuUp = 14,
    /// Xen: vCPU `cpu`'s steal so far in ns (VCPUOP_get_runstate_info: runnable +
    /// offline), or u64::MAX where Xen refuses.
    XenSteal = 15,
    /// Xen: drains the console, suspends the domain (`SHUTDOWN_suspend`) and, when it runs
    /// again, sets its Xen interfaces up again (`hypervisor::suspend`): 0 or 1 from Xen,
    /// `suspend::RESUME_FAILED`, or a negative errno's bits.
    XenSuspend = 24,
}

/// Arguments of the `mem.pt-update` kernel loop, in user memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PtUpdateArgs {
    /// The PTE rewritten each iteration.
    pub pte: u64,
    /// The address it maps.
    pub va: u64,
    /// The two physical pages it alternates between (with their flags).
    pub entries: [u64; 2],
}

/// The loops the kernel times at CPL0 for user mode (`Syscall::KernelLoop`). A workload
/// whose instruction only the kernel may execute adds a variant here, and `kernel_loop`
/// does not build until it has its arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum KernelOp {
    /// HLT with interrupts off.
    Hlt = 0,
    /// RDMSR of IA32_APIC_BASE (intercepted by KVM and Xen).
    MsrRead = 1,
    /// A no-op hypercall the hypervisor executes.
    Hypercall = 2,
    /// Rewrite a PTE, INVLPG, touch the page (the argument is a `PtUpdateArgs`).
    PtUpdate = 3,
    /// CR3 writes between two roots.
    Cr3Switch = 4,
    /// Arm the TSC-deadline timer (the argument: cycles ahead), STI; HLT until it fires;
    /// the cycles summed are deadline -> running again, not the whole loop.
    TimerWake = 5,
    /// As `TimerWake` with the local APIC timer in one-shot mode, where there is no
    /// TSC-deadline mode (the argument points at an `apic_oneshot::OneShotArgs`).
    TimerWakeOneShot = 6,
    /// `sched.ipi` with the answer sent back as an IPI, taken with interrupts on (the
    /// argument points at an `ipi::IpiArgs`); the cycles summed are whole round trips.
    IpiRoundTrip = 7,
}

impl KernelOp {
    const ALL: [KernelOp; 8] = [
        KernelOp::Hlt,
        KernelOp::MsrRead,
        KernelOp::Hypercall,
        KernelOp::PtUpdate,
        KernelOp::Cr3Switch,
        KernelOp::TimerWake,
        KernelOp::TimerWakeOneShot,
        KernelOp::IpiRoundTrip,
    ];

    /// The operation user mode named, if it names one.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u64 == raw)
    }
}

/// KernelLoop's answer when the instruction faulted (the host refuses it at CPL0).
pub const KERNEL_LOOP_FAULTED: u64 = u64::MAX - 1;
/// What `KernelLoop` returns for a workload without a kernel loop (on this hypervisor).
pub const NO_KERNEL_LOOP: u64 = u64::MAX;
/// KernelLoop's answer when what it waited for did not come within its limit.
pub const KERNEL_LOOP_TIMED_OUT: u64 = u64::MAX - 2;

/// What an exception handler saw, for the user-mode reporter.
#[derive(Clone, Copy)]
pub struct CrashInfo {
    pub workload: Option<WorkloadId>,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rsp: u64,
    pub cr2: u64,
}

static CRASH: Global<Option<CrashInfo>> = Global::new(None);

pub fn crash_info() -> Option<CrashInfo> {
    CRASH.get()
}

/// Set by the kernel's exception handler, once, before it enters the reporter.
pub fn set_crash_info(info: CrashInfo) {
    CRASH.set(Some(info));
}

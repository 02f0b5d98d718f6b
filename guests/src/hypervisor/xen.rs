//! The guest's side of Xen: the hypercall page, the PV console ring, the xenstore ring's
//! whereabouts, memory reservation, shutdown.
//!
//! Layouts and numbers from Xen's public headers (xen/include/public): xen.h (hypercall
//! numbers), hvm/hvm_op.h and hvm/params.h (HVMOP_get_param, CONSOLE_PFN/EVTCHN,
//! STORE_PFN/EVTCHN), io/console.h (struct xencons_interface), memory.h
//! (XENMEM_decrease_reservation, XENMEM_populate_physmap, struct xen_memory_reservation),
//! sched.h (SCHEDOP_*), event_channel.h.
//! Hypercalls need CPL0 (Xen refuses them from CPL3), so user mode reaches them through
//! the kernel's system call.

use core::arch::{asm, global_asm};
use core::sync::atomic::{fence, Ordering};

use super::Detected;
use crate::arch::cpu::{cpuid, wrmsr};
use crate::global::Global;

const HYPERVISOR_MEMORY_OP: u64 = 12;
const HYPERVISOR_SCHED_OP: u64 = 29;
pub const HYPERVISOR_XEN_VERSION: u64 = 17;
/// VCPUOP_*: bringing up APs (`xen_smp`) and reading a vCPU's runstate (`runstate`).
pub const HYPERVISOR_VCPU_OP: u64 = 24;
const HYPERVISOR_EVENT_CHANNEL_OP: u64 = 32;
const HYPERVISOR_HVM_OP: u64 = 34;

const SCHEDOP_YIELD: u64 = 0;
const SCHEDOP_SHUTDOWN: u64 = 2;
const EVTCHNOP_SEND: u64 = 4;
const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;
const HVMOP_GET_PARAM: u64 = 1;
const HVM_PARAM_STORE_PFN: u32 = 1;
const HVM_PARAM_STORE_EVTCHN: u32 = 2;
const HVM_PARAM_CONSOLE_PFN: u32 = 17;
const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;
pub const DOMID_SELF: u16 = 0x7ff0;
pub const XENVER_VERSION: u64 = 0;

/// `memory_op` commands the kernel passes on for user mode (balloon).
pub const XENMEM_DECREASE_RESERVATION: u64 = 1;
pub const XENMEM_POPULATE_PHYSMAP: u64 = 6;
/// `memory_op` command the kernel passes on for blkfront: maps a grant-table frame.
pub const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
/// `XENMAPSPACE_grant_table`: `idx` is a grant-table frame (memory.h).
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;

/// `struct xen_add_to_physmap` (64-bit layout, memory.h).
#[repr(C)]
pub struct AddToPhysmap {
    pub domid: u16,
    pub size: u16,
    pub space: u32,
    pub idx: u64,
    pub gpfn: u64,
}

/// `struct xen_memory_reservation` (64-bit layout): the GFN array (`xen_pfn_t`, 64-bit
/// each), how many extents, their order, flags, and the domain.
#[repr(C)]
pub struct MemoryReservation {
    pub extent_start: u64,
    pub nr_extents: u64,
    pub extent_order: u32,
    pub mem_flags: u32,
    pub domid: u16,
}

/// `SCHEDOP_shutdown` reasons.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum ShutdownReason {
    Poweroff = 0,
    Crash = 3,
}

/// `struct xencons_interface`: in[1024], out[2048], then the four indexes.
const CONS_OUT: usize = 1024;
const CONS_OUT_SIZE: u32 = 2048;
const CONS_OUT_CONS: usize = 3080;
const CONS_OUT_PROD: usize = 3084;

#[derive(Clone, Copy)]
struct XenState {
    ready: bool,
    console_page: u64,
    console_port: u32,
    /// The xenstore ring (0 if Xen named none below 4 GiB) and its event channel.
    store_page: u64,
    store_port: u32,
}

static STATE: Global<XenState> = Global::new(XenState {
    ready: false,
    console_page: 0,
    console_port: 0,
    store_page: 0,
    store_port: 0,
});

global_asm!(
    r#"
    .section .bss
    .balign 4096
    .global xen_hypercall_page
xen_hypercall_page:
    .skip 4096
"#,
    options(att_syntax)
);

extern "C" {
    static xen_hypercall_page: [u8; 4096];
}

/// Calls hypercall `nr` with two arguments (the third is 0) through the hypercall page.
/// CPL0 only.
fn hypercall(nr: u64, a0: u64, a1: u64) -> i64 {
    hypercall3(nr, a0, a1, 0)
}

/// Calls hypercall `nr` with three arguments through the hypercall page (installed by
/// `init`). CPL0 only.
pub fn hypercall3(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let entry = core::ptr::addr_of!(xen_hypercall_page) as u64 + nr * 32;
    let ret: i64;
    // SAFETY: Xen filled the page with one 32-byte stub per hypercall (mov $nr, %eax;
    // vmcall or vmmcall; ret). The stack pointer is moved past the red zone before the
    // call pushes its return address. Argument registers are clobbered (Xen's debug
    // builds poison them).
    unsafe {
        asm!(
            "sub rsp, 128",
            "call {entry}",
            "add rsp, 128",
            entry = in(reg) entry,
            inout("rdi") a0 => _,
            inout("rsi") a1 => _,
            inout("rdx") a2 => _,
            out("r10") _, out("r8") _,
            lateout("rax") ret,
        );
    }
    ret
}

#[repr(C)]
struct HvmParam {
    domid: u16,
    pad: u16,
    index: u32,
    value: u64,
}

fn get_param(index: u32) -> Result<u64, i64> {
    let mut param = HvmParam {
        domid: DOMID_SELF,
        pad: 0,
        index,
        value: 0,
    };
    let rc = hypercall(
        HYPERVISOR_HVM_OP,
        HVMOP_GET_PARAM,
        &mut param as *mut _ as u64,
    );
    if rc == 0 {
        Ok(param.value)
    } else {
        Err(rc)
    }
}

/// Installs the hypercall page and finds the console ring. CPL0. Inlined into each caller
/// (boot, and the resume after a suspend): out of line, it changed how `kernel_main` was
/// compiled, which then used SSE stores that kvm_pvm's CPL0 emulator cannot run.
#[inline(always)]
pub fn init(hv: &Detected) -> Result<(), &'static str> {
    if hv.max_leaf < hv.base + 2 {
        return Err("Xen CPUID leaf 3 (hypercall MSR) missing");
    }
    let leaf = cpuid(hv.base + 2, 0);
    if leaf.eax == 0 {
        return Err("Xen offers no hypercall page");
    }
    wrmsr(leaf.ebx, core::ptr::addr_of!(xen_hypercall_page) as u64);
    let pfn = get_param(HVM_PARAM_CONSOLE_PFN).map_err(|_| "HVM_PARAM_CONSOLE_PFN failed")?;
    let port =
        get_param(HVM_PARAM_CONSOLE_EVTCHN).map_err(|_| "HVM_PARAM_CONSOLE_EVTCHN failed")?;
    // An event channel port is 32 bits (evtchn_port_t).
    let port = u32::try_from(port).map_err(|_| "HVM_PARAM_CONSOLE_EVTCHN is not a port")?;
    if pfn == 0 || pfn >= (1 << 20) {
        // The boot page tables map the low 4 GiB only.
        return Err("console ring outside the low 4 GiB");
    }
    // Only `mem.balloon` needs xenstore: without it the console still works.
    let store = match (
        get_param(HVM_PARAM_STORE_PFN),
        get_param(HVM_PARAM_STORE_EVTCHN),
    ) {
        (Ok(pfn), Ok(port)) if pfn != 0 && pfn < (1 << 20) => {
            u32::try_from(port).ok().map(|port| (pfn << 12, port))
        }
        _ => None,
    };
    let (store_page, store_port) = store.unwrap_or((0, 0));
    STATE.set(XenState {
        ready: true,
        console_page: pfn << 12,
        console_port: port,
        store_page,
        store_port,
    });
    Ok(())
}

pub fn is_ready() -> bool {
    STATE.get().ready
}

/// The xenstore ring's address and event channel, if Xen named them.
pub fn store() -> Option<(u64, u32)> {
    let state = STATE.get();
    (state.ready && state.store_page != 0).then_some((state.store_page, state.store_port))
}

/// Signals event channel `port` (EVTCHNOP_send). CPL0.
pub fn send_event(port: u32) {
    let send = port;
    hypercall(
        HYPERVISOR_EVENT_CHANNEL_OP,
        EVTCHNOP_SEND,
        &send as *const u32 as u64,
    );
}

/// `struct evtchn_alloc_unbound` (event_channel.h).
#[repr(C)]
struct AllocUnbound {
    dom: u16,
    remote_dom: u16,
    port: u32,
}

/// A fresh event channel port that domain `remote` may bind to (EVTCHNOP_alloc_unbound),
/// or Xen's negative errno. CPL0.
pub fn alloc_unbound(remote: u16) -> Result<u32, i64> {
    let mut arg = AllocUnbound {
        dom: DOMID_SELF,
        remote_dom: remote,
        port: 0,
    };
    match hypercall(
        HYPERVISOR_EVENT_CHANNEL_OP,
        EVTCHNOP_ALLOC_UNBOUND,
        &mut arg as *mut AllocUnbound as u64,
    ) {
        0 => Ok(arg.port),
        rc => Err(rc),
    }
}

/// Signals the console's event channel. CPL0.
pub fn notify_console() {
    send_event(STATE.get().console_port);
}

/// `memory_op(cmd, reservation)`: the number of extents done, or a negative errno. CPL0.
pub fn memory_op(cmd: u64, reservation: u64) -> i64 {
    hypercall(HYPERVISOR_MEMORY_OP, cmd, reservation)
}

/// Gives the CPU back to Xen once. CPL0.
pub fn yield_cpu() {
    hypercall(HYPERVISOR_SCHED_OP, SCHEDOP_YIELD, 0);
}

/// `xen_version(XENVER_version)`: the cheapest hypercall Xen executes. CPL0.
#[inline(always)]
pub fn version() -> i64 {
    hypercall(HYPERVISOR_XEN_VERSION, XENVER_VERSION, 0)
}

/// Shuts the domain down with `reason`. CPL0.
pub fn shutdown(reason: ShutdownReason) -> ! {
    let arg = reason as u32;
    loop {
        hypercall(
            HYPERVISOR_SCHED_OP,
            SCHEDOP_SHUTDOWN,
            &arg as *const u32 as u64,
        );
    }
}

/// `SCHEDOP_shutdown` once with the raw `reason`; Xen's answer (for `SHUTDOWN_suspend`, it
/// returns when the domain runs again: see `suspend`). CPL0.
pub fn sched_shutdown_once(reason: u32) -> i64 {
    hypercall(
        HYPERVISOR_SCHED_OP,
        SCHEDOP_SHUTDOWN,
        &reason as *const u32 as u64,
    )
}

fn ring_index(offset: usize) -> *mut u32 {
    (STATE.get().console_page + offset as u64) as *mut u32
}

/// Copies `bytes` into the console ring, waiting for room; `kick` signals the backend
/// (directly at CPL0, through a system call at CPL3) and `wait` gives Xen the CPU.
pub fn console_write(bytes: &[u8], kick: fn(), wait: fn()) {
    let state = STATE.get();
    if !state.ready {
        return;
    }
    let out = (state.console_page + CONS_OUT as u64) as *mut u8;
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: the ring page is the one Xen named for this domain, mapped by the boot
        // page tables; indexes are read and written as whole u32s, as the backend does.
        let (cons, prod) = unsafe {
            (
                ring_index(CONS_OUT_CONS).read_volatile(),
                ring_index(CONS_OUT_PROD).read_volatile(),
            )
        };
        fence(Ordering::Acquire);
        let used = prod.wrapping_sub(cons);
        if used >= CONS_OUT_SIZE {
            kick();
            wait();
            continue;
        }
        let room = CONS_OUT_SIZE - used;
        let n = room.min(u32::try_from(rest.len()).unwrap_or(u32::MAX));
        for (i, &b) in (0..n).zip(rest) {
            let at = (prod.wrapping_add(i) % CONS_OUT_SIZE) as usize;
            // SAFETY: `at` < CONS_OUT_SIZE, inside the ring's out[] array.
            unsafe { out.add(at).write_volatile(b) };
        }
        // The backend must see the bytes before the new producer index.
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { ring_index(CONS_OUT_PROD).write_volatile(prod.wrapping_add(n)) };
        rest = &rest[n as usize..];
    }
    kick();
}

/// Waits (boundedly) until the backend has consumed everything written, so the last
/// lines are not lost at shutdown.
pub fn console_drain(kick: fn(), wait: fn()) {
    let state = STATE.get();
    if !state.ready {
        return;
    }
    for _ in 0..100_000 {
        // SAFETY: as in `console_write`.
        let (cons, prod) = unsafe {
            (
                ring_index(CONS_OUT_CONS).read_volatile(),
                ring_index(CONS_OUT_PROD).read_volatile(),
            )
        };
        if cons == prod {
            return;
        }
        kick();
        wait();
    }
}

//! What every vCPU thread (the boot vCPU's loop and the APs') does besides running: the
//! kick signal that interrupts KVM_RUN, finishing a pending I/O exit before its state is
//! taken, and harvesting the dirty rings when one fills.

use std::sync::Once;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::migration::ring::DirtyRings;
use crate::VmmError;

/// The signal that interrupts KVM_RUN when the host stops a guest.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), VmmError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(VmmError::KickSignal);
    });
    result
}

/// An I/O exit is finished by the next KVM_RUN (an IN's value reaches RAX, RIP moves past
/// the instruction): with `immediate_exit` set, KVM does that and returns at once
/// without running the guest, so the captured registers are those after the I/O.
pub(crate) fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(format!("completing pending I/O before the pause: {e}")),
    }
}

/// A vCPU's dirty ring filled: harvests every ring so that it may run on.
pub(crate) fn harvest(rings: Option<&DirtyRings>) -> Result<(), String> {
    match rings {
        Some(rings) => rings
            .harvest_full()
            .map_err(|e| format!("harvesting the dirty rings: {e}")),
        None => Err("KVM_EXIT_DIRTY_RING_FULL without a dirty ring".into()),
    }
}

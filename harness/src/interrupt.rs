//! Ctrl-C, SIGTERM and SIGHUP (the terminal closed, the ssh session gone): the first one
//! asks the run to stop after saving what it measured and restoring what it changed (KSM's
//! settings, the host's paging mode); a second one ends the process at once (the handler
//! resets itself).

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The signals that interrupt a run.
pub(crate) const INTERRUPTS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers and returns the flag they set.
pub fn install() -> &'static AtomicBool {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in INTERRUPTS {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(signal, &action) };
    }
    &INTERRUPTED
}

pub fn flag() -> &'static AtomicBool {
    &INTERRUPTED
}

//! Xen's suspend request, answered the way Linux (drivers/xen/manage.c) and Mini-OS do, so
//! that `xl save` and `xl migrate` can move the domain.
//!
//! The toolstack asks a PVH guest through xenstore: it writes `suspend` to the domain's
//! `control/shutdown` and waits (60 s) for the guest to acknowledge by changing the value
//! (libxl's `domain_suspend_pvcontrol_acked`: anything but `suspend`), then (60 s more)
//! for the domain to shut down with `SHUTDOWN_suspend`. libxl 4.11 and later send a PVH
//! domain this request without looking at `HVM_PARAM_CALLBACK_IRQ` (commit 1b33150fe0,
//! "force PVH guests to use the xenstore shutdown"), so the guest installs no upcall.
//!
//! `SCHEDOP_shutdown(SHUTDOWN_suspend)` returns in one of two domains:
//! - the new one, after a migration or restore: the return value is 0; the domain id,
//!   the event channels of the console and xenstore rings are new (the restore sets the
//!   HVM params to fresh ports), both ring pages were cleared (xg_sr_restore_x86_hvm.c),
//!   and xenstored knows nothing of the guest's watches;
//! - the same one, when the save failed and the toolstack resumed it at the source:
//!   libxl's cooperative resume sets the return value to 1 only for a domain that has
//!   `HVM_PARAM_CALLBACK_IRQ` (xg_resume.c `modify_returncode`); without one, as here,
//!   it too reads 0.
//!
//! So the return value cannot tell the two apart here, and the guest re-establishes
//! everything after either: the hypercall page, the console and xenstore pages and
//! ports (re-read from the HVM params), and its watch (dropped first, which fails
//! harmlessly in a new domain). Whether it moved it learns from xenstore's `domid`.
//! The guest maps no shared-info page and binds no other event channel, so there is
//! nothing else to redo; code that registers more with Xen at boot (runstate areas,
//! timers, grant frames) must redo it in [`resume`].
//!
//! Before the hypercall the console ring is drained: a restore clears the page, so
//! whatever xenconsoled had not taken yet would be lost.

use crate::arch::user::syscall;
use crate::hypervisor::xen;
use crate::hypervisor::xenstore::{Xenstore, MAX_REPLY};
use crate::sysabi::Syscall;

/// `SHUTDOWN_suspend` (sched.h).
const SHUTDOWN_SUSPEND: u32 = 2;
/// Where the toolstack asks.
const CONTROL: &str = "control/shutdown";
const TOKEN: &str = "hvbench-suspend";
/// What [`Syscall::XenSuspend`] returns when the domain could not be set up again.
pub const RESUME_FAILED: u64 = u64::MAX;

/// CPL0: drains the console, suspends, and sets the domain's Xen interfaces up again.
/// Returns the hypercall's value (0, 1, or a negative errno as its bits), or
/// [`RESUME_FAILED`].
pub fn suspend_now() -> u64 {
    xen::console_drain(xen::notify_console, xen::yield_cpu);
    let rc = xen::sched_shutdown_once(SHUTDOWN_SUSPEND);
    match resume() {
        Ok(()) => u64::from_ne_bytes(rc.to_ne_bytes()),
        Err(_) => RESUME_FAILED,
    }
}

/// CPL0: what boot set up, again (idempotent, so also right in the same domain).
fn resume() -> Result<(), &'static str> {
    xen::init(&crate::sysabi::boot_info().hypervisor)
}

/// How a suspend request went, as the guest saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The domain id changed: the guest runs in a new domain.
    Moved,
    /// The same domain id: the save failed or was cancelled, the guest ran on.
    Stayed,
}

/// The guest's watch on `control/shutdown`, polled between steps of a workload.
pub struct SuspendWatch {
    store: Xenstore,
    domid: u64,
    /// Suspend requests answered, and how many of them ended in a new domain.
    pub suspends: u64,
    pub moves: u64,
    /// The domain id at the start.
    pub first_domid: u64,
}

fn watch(store: &mut Xenstore) -> Result<(), &'static str> {
    // In the same domain the old watch still stands (a second would be refused); in a new
    // one there is none to drop, and xenstored says so.
    let _ = store.unwatch(CONTROL, TOKEN);
    store.watch(CONTROL, TOKEN)
}

impl SuspendWatch {
    /// The watch, on Xen with a xenstore ring; `None` elsewhere.
    pub fn open() -> Result<Option<Self>, &'static str> {
        let Some(mut store) = Xenstore::open() else {
            return Ok(None);
        };
        watch(&mut store)?;
        let domid = store.read_number("domid")?;
        Ok(Some(SuspendWatch {
            store,
            domid,
            suspends: 0,
            moves: 0,
            first_domid: domid,
        }))
    }

    /// The domain id now.
    pub fn domid(&self) -> u64 {
        self.domid
    }

    /// Answers a suspend request if one came: `None` when none did. Costs two memory
    /// reads when nothing changed.
    pub fn poll(&mut self) -> Result<Option<Outcome>, &'static str> {
        if !self.store.watch_fired()? {
            return Ok(None);
        }
        let mut value = [0u8; MAX_REPLY];
        // Absent (xenstored answers ENOENT) or anything else: not a request for us.
        let len = match self.store.read(CONTROL, &mut value) {
            Ok(len) => len,
            Err("xenstore answered with an error") => return Ok(None),
            Err(e) => return Err(e),
        };
        if value[..len].split(|&b| b == 0).next() != Some(b"suspend".as_slice()) {
            return Ok(None);
        }
        // The acknowledgement libxl waits for: the value changed from `suspend`.
        self.store.write(CONTROL, b"")?;
        let rc = syscall(Syscall::XenSuspend as u64, 0, 0, 0);
        if rc == RESUME_FAILED {
            return Err("Xen's interfaces could not be set up again after a suspend");
        }
        if rc != 0 && rc != 1 {
            return Err("Xen refused SCHEDOP_shutdown(SHUTDOWN_suspend)");
        }
        // The ring may have a new port and was cleared in a new domain: open it again.
        self.store = Xenstore::open().ok_or("no xenstore ring after a suspend")?;
        watch(&mut self.store)?;
        let domid = self.store.read_number("domid")?;
        self.suspends += 1;
        let outcome = if domid == self.domid {
            Outcome::Stayed
        } else {
            self.moves += 1;
            Outcome::Moved
        };
        self.domid = domid;
        Ok(Some(outcome))
    }
}

//! Application processors: vCPUs 1.., each run on a thread of its own.
//!
//! With KVM's in-kernel irqchip an AP starts in the wait-for-SIPI state, inside KVM: its
//! thread sits in KVM_RUN until the guest's INIT/SIPI starts it at the guest's trampoline,
//! exactly as on a real machine. The VMM defines no AP state of its own. APs have no
//! devices: a port or MMIO access from one reads as all ones and writes are dropped (the
//! guest's APs do no I/O). A fatal exit on an AP (triple fault, KVM failure) ends the
//! guest: it is stored for the boot vCPU, whose thread is woken and reports it.
//!
//! A migration holds the APs ([`Aps::hold`]): each leaves KVM_RUN, completes any
//! pending I/O, captures its own state and waits until released (the migration failed)
//! or stopped (the guest was handed over).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::Killable;

use super::vcpu_ops::{complete_pending_io, kick_signal};
use crate::channel::GuestEnd;
use crate::migration::ring::{DirtyRings, KVM_EXIT_DIRTY_RING_FULL};
use crate::migration::state::VcpuState;
use crate::VmmError;

/// What the APs share with the boot vCPU's thread.
#[derive(Debug)]
pub(crate) struct ApShared {
    /// Set by the boot vCPU when the guest ends: every AP thread returns.
    stop: AtomicBool,
    /// The first fatal end of an AP, for the boot vCPU to report.
    failure: Mutex<Option<GuestEnd>>,
    /// The VM-wide stop flag, which an AP sets on a fatal exit.
    vm_stop: Arc<AtomicBool>,
    /// The boot vCPU's thread, kicked out of KVM_RUN after an AP's fatal exit.
    boot_thread: libc::pthread_t,
    /// Set while a migration holds the APs.
    hold: AtomicBool,
    /// The VM's dirty rings, harvested by an AP whose ring filled.
    rings: Option<Arc<DirtyRings>>,
    held: Mutex<Held>,
    held_changed: Condvar,
}

/// What a hold asked for and what each AP captured (slot `n - 1` for vCPU `n`).
#[derive(Debug, Default)]
struct Held {
    /// Counts holds: an AP stores and waits only for the hold it captured for (a new
    /// hold right after a release must not get an old state, nor wait unanswered).
    epoch: u64,
    msr_indices: Vec<u32>,
    states: Vec<Option<Result<VcpuState, String>>>,
}

impl ApShared {
    /// The first AP failure, if one happened.
    pub(crate) fn take_failure(&self) -> Option<GuestEnd> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    fn fail(&self, end: GuestEnd) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(end);
        }
        self.vm_stop.store(true, Ordering::Release);
        // SAFETY: `boot_thread` is the thread that started the APs, and it joins every AP
        // before it returns (`Aps::stop`), so it is alive; the kick signal's handler does
        // nothing but interrupt KVM_RUN.
        unsafe { libc::pthread_kill(self.boot_thread, kick_signal()) };
    }
}

/// The running APs; [`Aps::stop`] ends and joins them.
#[derive(Debug)]
pub(crate) struct Aps {
    shared: Arc<ApShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Aps {
    /// Starts a thread per AP (`vcpu<N>-<name>`). Called on the boot vCPU's thread.
    pub(crate) fn start(
        vcpus: Vec<VcpuFd>,
        name: &str,
        vm_stop: Arc<AtomicBool>,
        rings: Option<Arc<DirtyRings>>,
    ) -> Result<Self, VmmError> {
        let shared = Arc::new(ApShared {
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            vm_stop,
            // SAFETY: pthread_self has no preconditions.
            boot_thread: unsafe { libc::pthread_self() },
            hold: AtomicBool::new(false),
            rings,
            held: Mutex::default(),
            held_changed: Condvar::new(),
        });
        let mut aps = Aps {
            shared: shared.clone(),
            threads: Vec::with_capacity(vcpus.len()),
        };
        for (i, fd) in vcpus.into_iter().enumerate() {
            let shared = shared.clone();
            let index = i + 1;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}-{name}"))
                .spawn(move || run(fd, index, &shared));
            match spawned {
                Ok(thread) => aps.threads.push(thread),
                Err(e) => {
                    aps.stop();
                    return Err(VmmError::Thread(e));
                }
            }
        }
        Ok(aps)
    }

    pub(crate) fn shared(&self) -> &ApShared {
        &self.shared
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Plain values: a panic elsewhere leaves them usable.
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds every AP out of KVM_RUN and returns their states (vCPU 1 first), capturing
    /// `msr_indices`; waits up to `limit`. On an error the APs are released again.
    pub(crate) fn hold(
        &self,
        msr_indices: &[u32],
        limit: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        {
            let mut held = self.held();
            held.epoch += 1;
            held.msr_indices = msr_indices.to_vec();
            held.states = (0..self.threads.len()).map(|_| None).collect();
        }
        self.shared.hold.store(true, Ordering::Release);
        // An AP still waiting out the last hold sees the new epoch and captures afresh.
        self.shared.held_changed.notify_all();
        let started = Instant::now();
        let mut held = self.held();
        while held.states.iter().any(Option::is_none) {
            if started.elapsed() > limit {
                drop(held);
                self.release();
                return Err(format!(
                    "the application processors did not pause within {limit:?}"
                ));
            }
            drop(held);
            for thread in &self.threads {
                let _ = thread.kill(kick_signal());
            }
            held = self.held();
            held = self
                .shared
                .held_changed
                .wait_timeout(held, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let states: Result<Vec<VcpuState>, String> =
            held.states.iter_mut().filter_map(Option::take).collect();
        drop(held);
        if states.is_err() {
            self.release();
        }
        states
    }

    /// Lets held APs run on.
    pub(crate) fn release(&self) {
        self.shared.hold.store(false, Ordering::Release);
        let _held = self.held();
        self.shared.held_changed.notify_all();
    }

    /// Stops every AP and waits for its thread. Kicks until each has noticed: a signal
    /// that lands between an AP's check of the flag and KVM_RUN would otherwise be lost.
    pub(crate) fn stop(self) {
        self.shared.stop.store(true, Ordering::Release);
        self.release();
        for thread in self.threads {
            while !thread.is_finished() {
                let _ = thread.kill(kick_signal());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = thread.join();
        }
    }
}

/// On an AP's thread while a migration holds it: captures the state, waits for the end
/// of the hold (or the guest's).
fn held(fd: &mut VcpuFd, index: usize, shared: &ApShared) {
    let lock = || shared.held.lock().unwrap_or_else(|p| p.into_inner());
    let (epoch, indices) = {
        let held = lock();
        (held.epoch, held.msr_indices.clone())
    };
    let state = complete_pending_io(fd)
        .and_then(|()| VcpuState::capture(fd, &indices).map_err(|e| e.to_string()));
    let mut held = lock();
    if held.epoch != epoch {
        // A newer hold began meanwhile: the run loop captures again for it.
        return;
    }
    if let Some(slot) = held.states.get_mut(index - 1) {
        *slot = Some(state);
    }
    shared.held_changed.notify_all();
    while shared.hold.load(Ordering::Acquire)
        && !shared.stop.load(Ordering::Acquire)
        && held.epoch == epoch
    {
        held = shared
            .held_changed
            .wait(held)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// One AP's run loop.
fn run(mut fd: VcpuFd, index: usize, shared: &ApShared) {
    while !shared.stop.load(Ordering::Acquire) {
        if shared.hold.load(Ordering::Acquire) {
            held(&mut fd, index, shared);
            continue;
        }
        let end = match fd.run() {
            Ok(VcpuExit::InternalError) => Some(GuestEnd::Failed {
                detail: format!(
                    "KVM could not emulate vCPU {index} (KVM_EXIT_INTERNAL_ERROR): {}",
                    registers(&fd)
                ),
            }),
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                super::vcpu_ops::harvest(shared.rings.as_deref())
                    .err()
                    .map(|detail| GuestEnd::Failed { detail })
            }
            Ok(exit) => on_exit(exit, index),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(GuestEnd::Failed {
                detail: format!("KVM_RUN failed on vCPU {index}: {e}"),
            }),
        };
        if let Some(end) = end {
            shared.fail(end);
            return;
        }
    }
}

fn registers(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} cs={:#x} cs.base={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, s.cs.selector, s.cs.base, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "registers unavailable".to_string(),
    }
}

/// What an AP's exit means: `None` to run on, or how the guest ends.
fn on_exit(exit: VcpuExit, index: usize) -> Option<GuestEnd> {
    match exit {
        VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            None
        }
        VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::Hlt | VcpuExit::Intr => None,
        VcpuExit::Shutdown => Some(GuestEnd::TripleFault {
            detail: format!("triple fault on vCPU {index} (KVM_EXIT_SHUTDOWN)"),
        }),
        other => Some(GuestEnd::Failed {
            detail: format!("unexpected VM exit on vCPU {index}: {other:?}"),
        }),
    }
}

//! The hand-shake between the migration (on the caller's thread) and the vCPU thread:
//! the migration asks the vCPU to park; the vCPU thread, at the top of its run loop,
//! completes any pending I/O, captures its state and the devices', hands them over and
//! waits for the verdict: resume (the migration failed: the guest runs on here) or
//! handed over (the destination runs it: the vCPU thread ends).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::state::{DeviceState, MachineState, VcpuState};
use crate::devices::Devices;
use crate::vstate::ap::Aps;
use crate::vstate::vcpu_ops::complete_pending_io;

/// How long the application processors may take to pause.
const AP_PAUSE_LIMIT: Duration = Duration::from_secs(2);

/// Where the hand-shake stands.
#[derive(Debug, Default)]
enum Stage {
    #[default]
    Running,
    /// Asked to park, capturing these MSRs.
    Asked(Vec<u32>),
    /// Parked: the state it captured (or why it could not).
    Parked(Result<Box<MachineState>, String>),
    /// The migration's verdict, not yet seen by the vCPU thread.
    Verdict(Verdict),
}

/// What the parked vCPU does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Resume,
    HandedOver,
}

#[derive(Debug, Default)]
pub(crate) struct Park {
    asked: AtomicBool,
    stage: Mutex<Stage>,
    changed: Condvar,
}

impl Park {
    fn stage(&self) -> std::sync::MutexGuard<'_, Stage> {
        // The stage is a plain value: a panic elsewhere leaves it usable.
        self.stage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cheap check for the run loop.
    pub(crate) fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// Asks the vCPU to park and capture `msr_indices`; `kick` interrupts KVM_RUN and
    /// says whether the vCPU thread still lives. Waits up to `limit` for the state.
    pub(crate) fn request(
        &self,
        msr_indices: Vec<u32>,
        limit: Duration,
        mut kick: impl FnMut() -> bool,
    ) -> Result<Box<MachineState>, String> {
        let started = Instant::now();
        {
            // The last verdict must reach the vCPU first: asking over it would leave the
            // vCPU waiting for a verdict that never comes.
            let mut stage = self.stage();
            while matches!(*stage, Stage::Verdict(_)) {
                if started.elapsed() > limit {
                    return Err(format!("the vCPU did not resume within {limit:?}"));
                }
                stage = self
                    .changed
                    .wait_timeout(stage, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *stage = Stage::Asked(msr_indices);
        }
        self.asked.store(true, Ordering::Release);
        loop {
            let stage = self.stage();
            let (mut stage, _) = self
                .changed
                .wait_timeout(stage, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner());
            if matches!(*stage, Stage::Parked(_)) {
                let Stage::Parked(state) = std::mem::take(&mut *stage) else {
                    unreachable!("matched above")
                };
                return state;
            }
            drop(stage);
            let alive = kick();
            if !alive || started.elapsed() > limit {
                self.asked.store(false, Ordering::Release);
                *self.stage() = Stage::Running;
                return Err(if alive {
                    format!("the vCPU did not pause within {limit:?}")
                } else {
                    "the guest ended before it could be paused".into()
                });
            }
        }
    }

    /// Tells the parked vCPU what to do.
    pub(crate) fn decide(&self, verdict: Verdict) {
        *self.stage() = Stage::Verdict(verdict);
        self.changed.notify_all();
    }

    /// On the boot vCPU's thread, when [`Park::asked`]: parks (holding the application
    /// processors too) and returns the verdict.
    pub(crate) fn park(&self, fd: &mut VcpuFd, devices: &Devices, aps: Option<&Aps>) -> Verdict {
        let indices = match std::mem::take(&mut *self.stage()) {
            Stage::Asked(indices) => indices,
            // Asked and withdrawn (a timed-out request): run on.
            _ => {
                self.asked.store(false, Ordering::Release);
                return Verdict::Resume;
            }
        };
        let state = capture(fd, devices, aps, &indices);
        let failed = state.is_err();
        *self.stage() = Stage::Parked(state);
        self.changed.notify_all();
        if failed {
            self.asked.store(false, Ordering::Release);
            return Verdict::Resume;
        }
        let mut stage = self.stage();
        let verdict = loop {
            if let Stage::Verdict(v) = *stage {
                *stage = Stage::Running;
                self.asked.store(false, Ordering::Release);
                break v;
            }
            stage = self.changed.wait(stage).unwrap_or_else(|p| p.into_inner());
        };
        drop(stage);
        if verdict == Verdict::Resume {
            devices.resume_blk();
            if let Some(aps) = aps {
                aps.release();
            }
        }
        verdict
    }
}

/// The boot vCPU's state, the devices', and each AP's (held until the verdict).
fn capture(
    fd: &mut VcpuFd,
    devices: &Devices,
    aps: Option<&Aps>,
    indices: &[u32],
) -> Result<Box<MachineState>, String> {
    complete_pending_io(fd)?;
    let vcpu = VcpuState::capture(fd, indices).map_err(|e| e.to_string())?;
    let ap_states = match aps {
        Some(aps) => aps.hold(indices, AP_PAUSE_LIMIT)?,
        None => Vec::new(),
    };
    let devices = DeviceState::capture(devices).inspect_err(|_| {
        if let Some(aps) = aps {
            aps.release();
        }
    })?;
    Ok(Box::new(MachineState {
        vcpu,
        aps: ap_states,
        irqchip: None,
        devices,
    }))
}

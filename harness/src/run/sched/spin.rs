//! The spinning guests of `sched.steal` and `sched.fairness`: one VMM process each, every
//! vCPU spinning at CPL3: `hvbench vmm --vcpus N` (mem.ksm's fleet: none outlives
//! hvbench) for `--backend kvm`, or QEMU booted by its backend ([`super::booted`]).
//! The host collects each guest's `tick` notes with the schedstat of its vCPU threads at
//! that moment, and every window samples all guests' vCPU threads at once.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use workloads::protocol::{Event, Hello, Status};
use workloads::WorkloadId;

use super::analysis::{parse_tick, Tick};
use super::booted::BootedGuests;
use super::threads::{pin, schedstat, vcpu_threads, SchedStat, VcpuNaming, VcpuThread};
use super::{SchedError, SpinParams};
use crate::backend::BackendKind;
use crate::run::host_context::HostContext;
use crate::run::ksm::guests::{hvbench_exe, runs_vmm, ConsoleEvent, Fleet, GuestSpec};

/// Most ticks kept per guest (the guest is untrusted).
const MAX_TICKS: usize = 100_000;
/// Time the guests get to boot and start their APs, beyond the spinning itself.
const BOOT_SLACK: Duration = Duration::from_secs(60);

/// What the host saw of one guest.
#[derive(Debug, Default)]
pub(crate) struct GuestView {
    pub pid: u32,
    pub hello: Option<Hello>,
    pub threads: Vec<VcpuThread>,
    /// Each tick, with the schedstat of the vCPU threads (by index) when it arrived.
    pub ticks: Vec<(Tick, Vec<SchedStat>)>,
    pub steal_msr: Option<String>,
    pub done: bool,
}

/// Everything a run of spinning guests produced.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub guests: Vec<GuestView>,
    /// Host samples: seconds since the first, and each guest's vCPU time so far (ns).
    pub samples: Vec<(f64, Vec<u64>)>,
}

const PROC: &str = "/proc";

fn run_ns(view: &GuestView) -> u64 {
    view.threads
        .iter()
        .filter_map(|t| schedstat(Path::new(PROC), view.pid, t.tid))
        .map(|s| s.run_ns)
        .sum()
}

/// The guests' VMM processes, by how they are started.
enum Spinners {
    /// `hvbench vmm` processes.
    Vmm(Fleet),
    /// Processes the backend started (QEMU).
    Booted(BootedGuests),
}

impl Spinners {
    fn naming(&self) -> VcpuNaming {
        match self {
            Spinners::Vmm(_) => VcpuNaming::Hvbench,
            Spinners::Booted(_) => VcpuNaming::Qemu,
        }
    }

    fn pids(&self) -> Result<Vec<u32>, SchedError> {
        match self {
            Spinners::Vmm(fleet) => Ok(fleet.pids()),
            Spinners::Booted(booted) => booted.pids(),
        }
    }

    /// The next event of any guest within `wait`, `None` if none came.
    fn next_event(&mut self, wait: Duration) -> Result<Option<(usize, ConsoleEvent)>, SchedError> {
        match self {
            Spinners::Vmm(fleet) => match fleet.next_event(wait) {
                Ok(event) => Ok(Some(event)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    Err(SchedError::Host("every guest's console had closed".into()))
                }
            },
            Spinners::Booted(booted) => booted.next_event(wait),
        }
    }
}

/// Finds guest `view`'s vCPU threads (once), and pins them if asked.
fn discover(view: &mut GuestView, p: &SpinParams, naming: VcpuNaming) -> Result<(), SchedError> {
    if !view.threads.is_empty() {
        return Ok(());
    }
    let threads = vcpu_threads(Path::new(PROC), view.pid, naming)
        .map_err(|e| SchedError::Host(format!("listing the threads of VMM {}: {e}", view.pid)))?;
    if threads.len() != p.vcpus as usize {
        return Err(SchedError::Host(format!(
            "VMM {} has {} vCPU threads, expected {}",
            view.pid,
            threads.len(),
            p.vcpus
        )));
    }
    if p.pin > 0 {
        for t in &threads {
            pin(t.tid, p.pin).map_err(SchedError::Host)?;
        }
    }
    view.threads = threads;
    Ok(())
}

/// The host's view of guest `view`'s vCPU threads at one of its ticks (our VMM's and
/// QEMU's: found once, pinned if asked, their schedstat by index).
fn thread_stats(
    view: &mut GuestView,
    p: &SpinParams,
    naming: VcpuNaming,
) -> Result<Vec<SchedStat>, SchedError> {
    discover(view, p, naming)?;
    Ok(view
        .threads
        .iter()
        .map(|t| schedstat(Path::new(PROC), view.pid, t.tid).unwrap_or_default())
        .collect())
}

/// Handles one console event of guest `index`; `Err` ends the workload. Each tick kept
/// carries what `tick_stats` says the host saw at it (Xen's dom0 samples apart: nothing).
pub(crate) fn on_event(
    id: WorkloadId,
    view: &mut GuestView,
    index: usize,
    event: ConsoleEvent,
    tick_stats: &mut dyn FnMut(&mut GuestView) -> Result<Vec<SchedStat>, SchedError>,
) -> Result<(), SchedError> {
    let guest = |problem: String| SchedError::Guest { index, problem };
    match event {
        ConsoleEvent::Event(Event::Hello(hello)) => view.hello = Some(hello),
        ConsoleEvent::Event(Event::Note { key, value, .. }) if key == "tick" => {
            let stats = if view.ticks.len() < MAX_TICKS {
                Some(tick_stats(view)?)
            } else {
                None
            };
            let tick = parse_tick(&value).map_err(guest)?;
            if let Some(stats) = stats {
                view.ticks.push((tick, stats));
            }
        }
        ConsoleEvent::Event(Event::Note { key, value, .. }) if key == "steal_msr" => {
            view.steal_msr = Some(value);
        }
        ConsoleEvent::Event(Event::Skip { reason, .. }) => {
            return Err(SchedError::Skipped { index, reason })
        }
        ConsoleEvent::Event(Event::Result {
            workload,
            status,
            reason,
        }) if workload == id && status != Status::Success => {
            return Err(guest(format!(
                "{}: {}",
                status.name(),
                reason.unwrap_or_default()
            )))
        }
        ConsoleEvent::Event(Event::Crash(c)) => {
            return Err(SchedError::Crash {
                index,
                detail: format!("vector {} at rip {:#x}", c.vector, c.rip),
            })
        }
        ConsoleEvent::Event(Event::End(_)) | ConsoleEvent::Closed => view.done = true,
        ConsoleEvent::Damaged(line) => return Err(guest(format!("a damaged line: {line}"))),
        ConsoleEvent::Event(_) => {}
    }
    Ok(())
}

/// Starts the guests, hands each VMM's pid to `place` (cgroups), and collects until every
/// guest has ended.
pub(crate) fn run_guests(
    ctx: &HostContext,
    id: WorkloadId,
    p: &SpinParams,
    place: &mut dyn FnMut(usize, u32) -> Result<(), SchedError>,
) -> Result<Observed, SchedError> {
    let mut options = ctx.options.clone();
    options.vcpus = p.vcpus;
    let cmdline = options.guest_cmdline(&[id]);
    let mut spinners = match ctx.backend.kind() {
        BackendKind::Qemu => Spinners::Booted(BootedGuests::boot(
            ctx,
            &cmdline,
            p.vcpus,
            p.guests,
            &mut |_| Ok(()),
        )?),
        _ => Spinners::Vmm(spawn_fleet(ctx, p, &cmdline)?),
    };
    let mut observed = Observed::default();
    for (index, pid) in spinners.pids()?.into_iter().enumerate() {
        place(index, pid)?;
        observed.guests.push(GuestView {
            pid,
            ..Default::default()
        });
    }
    collect(ctx, id, p, &mut spinners, &mut observed)?;
    Ok(observed)
}

/// `p.guests` `hvbench vmm` processes running `cmdline`.
fn spawn_fleet(ctx: &HostContext, p: &SpinParams, cmdline: &str) -> Result<Fleet, SchedError> {
    let exe = hvbench_exe().map_err(|e| SchedError::Host(e.to_string()))?;
    if !runs_vmm(&exe) {
        return Err(SchedError::Host(format!(
            "{} cannot start guests (`vmm --vcpus`): set HVBENCH_EXE to the hvbench binary",
            exe.display()
        )));
    }
    let spec = GuestSpec {
        exe,
        guest_image: ctx.options.guest_path.clone(),
        memory_mib: ctx.options.memory_mib,
        timeout: p.duration + BOOT_SLACK * 2,
        vcpus: p.vcpus,
        mergeable: false,
    };
    Fleet::spawn(&spec, &vec![cmdline.to_string(); p.guests])
        .map_err(|e| SchedError::Host(e.to_string()))
}

/// The event loop: guests' lines, and a host sample every window while all spin.
fn collect(
    ctx: &HostContext,
    id: WorkloadId,
    p: &SpinParams,
    spinners: &mut Spinners,
    observed: &mut Observed,
) -> Result<(), SchedError> {
    let naming = spinners.naming();
    let deadline = Instant::now() + p.duration + BOOT_SLACK;
    let mut first_sample: Option<Instant> = None;
    let mut next_sample = Instant::now();
    while !observed.guests.iter().all(|g| g.done) {
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(SchedError::Interrupted("the guests spun".into()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(SchedError::Timeout(format!(
                "the guests did not end within {:?} of starting",
                p.duration + BOOT_SLACK
            )));
        }
        let all_spinning = observed
            .guests
            .iter()
            .all(|g| !g.ticks.is_empty() && !g.done);
        if all_spinning && now >= next_sample {
            let start = *first_sample.get_or_insert(now);
            let used = observed.guests.iter().map(run_ns).collect();
            observed.samples.push(((now - start).as_secs_f64(), used));
            next_sample = now + p.window;
        }
        let wait = next_sample
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), p.window);
        if let Some((index, event)) = spinners.next_event(wait)? {
            if let Some(view) = observed.guests.get_mut(index) {
                on_event(id, view, index, event, &mut |v| thread_stats(v, p, naming))?;
            }
        }
    }
    Ok(())
}

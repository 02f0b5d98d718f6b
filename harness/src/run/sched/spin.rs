//! The spinning guests of `sched.steal` and `sched.fairness`: one `hvbench vmm --vcpus N`
//! process each (mem.ksm's fleet: none outlives hvbench), every vCPU spinning at CPL3.
//! The host collects each guest's `tick` notes with the schedstat of its vCPU threads at
//! that moment, and every window samples all guests' vCPU threads at once.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use workloads::protocol::{Event, Hello, Status};
use workloads::WorkloadId;

use super::analysis::{parse_tick, Tick};
use super::threads::{pin, schedstat, vcpu_threads, SchedStat, VcpuThread};
use super::{SchedError, SpinParams};
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

/// Finds guest `view`'s vCPU threads (once), and pins them if asked.
fn discover(view: &mut GuestView, p: &SpinParams) -> Result<(), SchedError> {
    if !view.threads.is_empty() {
        return Ok(());
    }
    let threads = vcpu_threads(Path::new(PROC), view.pid)
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

/// Handles one console event of guest `index`; `Err` ends the workload.
fn on_event(
    id: WorkloadId,
    view: &mut GuestView,
    index: usize,
    event: ConsoleEvent,
    p: &SpinParams,
) -> Result<(), SchedError> {
    let guest = |problem: String| SchedError::Guest { index, problem };
    match event {
        ConsoleEvent::Event(Event::Hello(hello)) => view.hello = Some(hello),
        ConsoleEvent::Event(Event::Note { key, value, .. }) if key == "tick" => {
            discover(view, p)?;
            let tick = parse_tick(&value).map_err(guest)?;
            if view.ticks.len() < MAX_TICKS {
                let stats = view
                    .threads
                    .iter()
                    .map(|t| schedstat(Path::new(PROC), view.pid, t.tid).unwrap_or_default())
                    .collect();
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
    let exe = hvbench_exe().map_err(|e| SchedError::Host(e.to_string()))?;
    if !runs_vmm(&exe) {
        return Err(SchedError::Host(format!(
            "{} cannot start guests (`vmm --vcpus`): set HVBENCH_EXE to the hvbench binary",
            exe.display()
        )));
    }
    let mut options = ctx.options.clone();
    options.vcpus = p.vcpus;
    let cmdline = options.guest_cmdline(&[id]);
    let spec = GuestSpec {
        exe,
        guest_image: ctx.options.guest_path.clone(),
        memory_mib: ctx.options.memory_mib,
        timeout: p.duration + BOOT_SLACK * 2,
        vcpus: p.vcpus,
        mergeable: false,
    };
    let fleet = Fleet::spawn(&spec, &vec![cmdline; p.guests])
        .map_err(|e| SchedError::Host(e.to_string()))?;
    let mut observed = Observed::default();
    for (index, pid) in fleet.pids().into_iter().enumerate() {
        place(index, pid)?;
        observed.guests.push(GuestView {
            pid,
            ..Default::default()
        });
    }
    collect(ctx, id, p, &fleet, &mut observed)?;
    Ok(observed)
}

/// The event loop: guests' lines, and a host sample every window while all spin.
fn collect(
    ctx: &HostContext,
    id: WorkloadId,
    p: &SpinParams,
    fleet: &Fleet,
    observed: &mut Observed,
) -> Result<(), SchedError> {
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
        match fleet.next_event(wait) {
            Ok((index, event)) => match observed.guests.get_mut(index) {
                Some(view) => on_event(id, view, index, event, p)?,
                None => continue,
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

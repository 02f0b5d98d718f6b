//! `vm.lifecycle`: the guest's life as a user of the stack feels it. `boots` times, one
//! after another: ask the backend for a guest and time until the guest's first result
//! (define-to-first-result: VMM start, or `virsh create` and resume, firmware, boot, up to
//! the `up` note the workload prints first); read the host memory of the stack while the
//! guest holds there (the VMM process's RSS and PSS, and the PSS of the VMM plus any
//! management daemons); then time the destruction of the running guest (`stop`: VMM
//! stop, QEMU kill, `virsh destroy`).
//!
//! Every figure is measured by the host; the guest only has to reach its first result.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use workloads::abi::LIFECYCLE_UP_KEY;
use workloads::protocol::{Event, Hello, Status};
use workloads::table::param::LIFECYCLE_BOOTS;
use workloads::WorkloadId;

use super::host_context::{HostContext, HostDriven};
use super::plan::param_value;
use super::session::WorkloadOutcome;
use crate::backend::{BootRequest, GuestMessage, GuestSession, StackProcesses};
use crate::console::{ConsoleLine, LineAssembler};

/// Longest wait for one console message before the loop looks at the clock again.
const POLL: Duration = Duration::from_millis(20);
const KIB_PER_MIB: f64 = 1024.0;

static BOOTS: AtomicU32 = AtomicU32::new(0);

/// What one boot measured.
#[derive(Debug)]
struct Life {
    define_to_result: Duration,
    destroy: Duration,
    /// (VMM RSS, VMM PSS, stack PSS) in KiB, where the VMM's process is known here.
    memory: Option<(u64, u64, u64)>,
    note: Option<&'static str>,
}

/// Runs `vm.lifecycle` to its outcome.
pub fn run(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    let mut outcome = WorkloadOutcome::new(id);
    let boots = param_value(&ctx.options.params, id, &LIFECYCLE_BOOTS)
        .and_then(|text| LIFECYCLE_BOOTS.parse_one(text).ok())
        .unwrap_or(1);
    let mut hello = None;
    for _ in 0..boots {
        if ctx.interrupted.load(Ordering::Relaxed) {
            outcome.ratchet(Status::Error, "interrupted (Ctrl-C); samples so far kept");
            break;
        }
        match one_life(id, ctx, &mut hello) {
            Ok(life) => keep(&mut outcome, &life),
            Err(reason) => {
                outcome.ratchet(Status::Error, reason);
                break;
            }
        }
    }
    HostDriven { outcome, hello }
}

fn keep(outcome: &mut WorkloadOutcome, life: &Life) {
    let mut push = |metric: &'static str, value: f64| {
        outcome
            .series
            .entry((metric, String::new()))
            .or_default()
            .direct
            .push(value);
    };
    push("define_to_result", life.define_to_result.as_secs_f64());
    push("destroy", life.destroy.as_secs_f64());
    if let Some((rss, pss, stack)) = life.memory {
        push("vmm_rss", rss as f64 / KIB_PER_MIB);
        push("vmm_pss", pss as f64 / KIB_PER_MIB);
        push("stack_pss", stack as f64 / KIB_PER_MIB);
    }
    if let Some(note) = life.note {
        outcome.note("memory".into(), note.into());
    }
}

/// One boot, first result, memory reading and destruction.
fn one_life(id: WorkloadId, ctx: &HostContext, hello: &mut Option<Hello>) -> Result<Life, String> {
    let options = ctx.options;
    let line = options.guest_cmdline(&[id]);
    let request = BootRequest {
        image: ctx.image,
        cmdline: &line,
        memory_mib: options.memory_mib,
        vcpus: options.vcpus,
        name: format!(
            "hvbench-{}-life-{}",
            std::process::id(),
            BOOTS.fetch_add(1, Ordering::Relaxed) + 1
        ),
    };
    let started = Instant::now();
    let mut session = ctx
        .backend
        .boot(&request)
        .map_err(|e| format!("booting the guest: {e}"))?;
    let limit = options.boot_timeout + options.workload_timeout;
    let waited = first_result(session.as_mut(), id, started + limit, ctx, hello);
    let define_to_result = started.elapsed();
    let stack = session.stack_processes();
    let memory = waited.as_ref().ok().and_then(|()| read_memory(&stack));
    // The destruction is timed on a running guest only.
    let waited = waited.and_then(|()| still_running(session.as_ref()));
    let stopping = Instant::now();
    let stopped = session.stop();
    let destroy = stopping.elapsed();
    drop(session);
    waited?;
    stopped.map_err(|e| format!("destroying the guest: {e}"))?;
    Ok(Life {
        define_to_result,
        destroy,
        memory,
        note: stack.note,
    })
}

/// Whether the guest is still up (its hold after the `up` note lasts seconds, but a host
/// slow enough may see it end first; its destruction would then time nothing).
fn still_running(session: &dyn GuestSession) -> Result<(), String> {
    while let Ok(message) = session.messages().try_recv() {
        if let GuestMessage::Ended(end) = message {
            return Err(format!(
                "the guest ended ({end:?}) before the host could destroy it running"
            ));
        }
    }
    Ok(())
}

/// Reads the console until the guest's result of `id`.
fn first_result(
    session: &mut dyn GuestSession,
    id: WorkloadId,
    deadline: Instant,
    ctx: &HostContext,
    hello: &mut Option<Hello>,
) -> Result<(), String> {
    let mut lines = LineAssembler::new();
    loop {
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err("interrupted (Ctrl-C); samples so far kept".into());
        }
        if Instant::now() > deadline {
            return Err("no result from the guest within the boot and workload limits".into());
        }
        let bytes = match session.messages().recv_timeout(POLL) {
            Ok(GuestMessage::Console { bytes, .. }) => bytes,
            Ok(GuestMessage::Notice(_)) | Err(RecvTimeoutError::Timeout) => continue,
            Ok(GuestMessage::Ended(end)) => {
                return Err(format!("the guest ended before its first result: {end:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err("the guest's console closed before its first result".into())
            }
        };
        for line in lines.push(&bytes) {
            let ConsoleLine::Line(bytes) = line else {
                continue;
            };
            let bytes = bytes.strip_suffix(b"\r").unwrap_or(&bytes);
            match crate::console::decode(bytes) {
                Ok(Some(Event::Hello(h))) => *hello = Some(h),
                Ok(Some(Event::Note {
                    workload: Some(w),
                    key,
                    ..
                })) if w == id && key == LIFECYCLE_UP_KEY => return Ok(()),
                Ok(Some(Event::Result {
                    workload, reason, ..
                })) if workload == id => {
                    return Err(format!(
                        "the guest ended the workload before saying it was up: {}",
                        reason.unwrap_or_default()
                    ));
                }
                Ok(Some(Event::Skip { workload, reason })) if workload == id => {
                    return Err(format!("the guest skipped the workload: {reason}"));
                }
                Ok(Some(Event::Crash(c))) => {
                    return Err(super::session::describe_crash(&c));
                }
                _ => {}
            }
        }
    }
}

/// (VMM RSS, VMM PSS, VMM + daemons PSS) in KiB; `None` where the VMM is not here.
fn read_memory(stack: &StackProcesses) -> Option<(u64, u64, u64)> {
    let pids: Vec<u32> = std::iter::once(stack.vmm?)
        .chain(stack.daemons.iter().copied())
        .collect();
    let rollups = match &stack.on {
        None => pids
            .iter()
            .map(|&pid| ksm::procstat::smaps_rollup(pid).ok())
            .collect(),
        Some(transport) => remote_rollups(transport, &pids),
    };
    let vmm = rollups.first()?.as_ref()?;
    let daemons: u64 = rollups[1..].iter().flatten().map(|m| m.pss_kib).sum();
    Some((vmm.rss_kib, vmm.pss_kib, vmm.pss_kib + daemons))
}

/// Longest `smaps_rollup` read from another host, per process.
const MAX_ROLLUP: usize = 4096;

/// The `smaps_rollup` of each of `pids` on the host `transport` reaches, in one command.
fn remote_rollups(
    transport: &hostutil::transport::Transport,
    pids: &[u32],
) -> Vec<Option<ksm::procstat::SmapsRollup>> {
    let words: Vec<String> = pids.iter().map(u32::to_string).collect();
    let command = format!(
        "for p in {}; do echo =; head -c {MAX_ROLLUP} /proc/$p/smaps_rollup 2>/dev/null; done",
        words.join(" ")
    );
    let Ok(out) = transport.run(&command, None, Duration::from_secs(30)) else {
        return vec![None; pids.len()];
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rollups: Vec<_> = text
        .split("=\n")
        .skip(1)
        .map(ksm::procstat::parse_smaps_rollup)
        .collect();
    rollups.resize(pids.len(), None);
    rollups
}

#[cfg(test)]
mod tests {
    use hostutil::transport::Transport;

    use super::*;

    /// The remote reading (run here through the local transport): one rollup per pid, in
    /// order; a pid that is gone reads as none, and the answer never has more entries
    /// than pids asked for.
    #[test]
    fn remote_rollups_read_one_per_pid_in_order() {
        let me = std::process::id();
        let gone = u32::MAX - 1;
        let rollups = remote_rollups(&Transport::Local, &[gone, me]);
        assert_eq!(rollups.len(), 2);
        assert!(rollups[0].is_none(), "{rollups:?}");
        let mine = rollups[1].expect("this process's smaps_rollup");
        assert!(mine.rss_kib > 0 && mine.pss_kib > 0, "{mine:?}");
        assert_eq!(remote_rollups(&Transport::Local, &[]).len(), 0);
    }
}

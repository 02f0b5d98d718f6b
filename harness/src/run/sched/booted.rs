//! The spinning guests where the backend itself starts one host process per guest (QEMU):
//! each booted through `Hypervisor::boot` with the run's arguments, its process found
//! through `GuestSession::stack_processes`, its console lines turned into the same events
//! as the fleet's. Dropping them stops every session (QEMU killed and reaped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use crate::backend::{BootRequest, GuestEnd, GuestMessage, GuestSession};
use crate::console::LineAssembler;
use crate::run::host_context::HostContext;
use crate::run::ksm::guests::{console_event, ConsoleEvent};

use super::SchedError;

/// Boots of this process, for unique guest names.
static BOOTS: AtomicUsize = AtomicUsize::new(0);
/// Most messages taken from one session before the others get a turn.
const BURST: usize = 64;
/// How long `next_event` sleeps between looks at quiet sessions.
const POLL: Duration = Duration::from_millis(1);

struct Booted {
    session: Box<dyn GuestSession>,
    lines: LineAssembler,
    events: VecDeque<ConsoleEvent>,
    ended: bool,
    /// How the VMM ended, where that is an error: returned once its events are out.
    failure: Option<SchedError>,
}

/// The guests and what their consoles said, not yet handed out.
pub(crate) struct BootedGuests {
    guests: Vec<Booted>,
}

impl std::fmt::Debug for BootedGuests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootedGuests")
            .field("guests", &self.guests.len())
            .finish()
    }
}

impl BootedGuests {
    /// Boots `count` guests of `vcpus` vCPUs, each with `cmdline`. On an error the guests
    /// already booted are stopped as the partial set drops.
    pub fn boot(
        ctx: &HostContext,
        cmdline: &str,
        vcpus: u32,
        count: usize,
    ) -> Result<Self, SchedError> {
        let mut booted = BootedGuests { guests: Vec::new() };
        for _ in 0..count {
            let name = format!(
                "hvbench-{}-sched-{}",
                std::process::id(),
                BOOTS.fetch_add(1, Ordering::Relaxed) + 1
            );
            let request = BootRequest {
                image: ctx.image,
                cmdline,
                memory_mib: ctx.options.memory_mib,
                vcpus,
                name: name.clone(),
            };
            let session = ctx
                .backend
                .boot(&request)
                .map_err(|e| SchedError::Host(format!("booting guest {name}: {e}")))?;
            booted.guests.push(Booted {
                session,
                lines: LineAssembler::new(),
                events: VecDeque::new(),
                ended: false,
                failure: None,
            });
        }
        Ok(booted)
    }

    /// Each guest's VMM process on this host.
    pub fn pids(&self) -> Result<Vec<u32>, SchedError> {
        self.guests
            .iter()
            .enumerate()
            .map(|(index, g)| {
                g.session.stack_processes().vmm.ok_or_else(|| {
                    SchedError::Host(format!("guest {index} has no local VMM process"))
                })
            })
            .collect()
    }

    /// The next event of any guest within `timeout` (`None`: nothing came). A guest whose
    /// VMM ended other than by the guest's own exit is an error (`Crash`).
    pub fn next_event(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(usize, ConsoleEvent)>, SchedError> {
        let deadline = Instant::now() + timeout;
        loop {
            for index in 0..self.guests.len() {
                let g = &mut self.guests[index];
                if g.events.is_empty() && !g.ended {
                    g.pump(index);
                }
                if let Some(event) = g.events.pop_front() {
                    return Ok(Some((index, event)));
                }
                if let Some(failure) = g.failure.take() {
                    return Err(failure);
                }
            }
            if self.guests.iter().all(|g| g.ended) {
                return Err(SchedError::Host("every guest's console had closed".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
}

impl Booted {
    /// Moves what the session has into `events`; its end becomes `Closed`, or the failure
    /// returned after the events.
    fn pump(&mut self, index: usize) {
        for _ in 0..BURST {
            let end = match self.session.messages().try_recv() {
                Ok(GuestMessage::Console { bytes, .. }) => {
                    let lines = self.lines.push(&bytes);
                    self.events
                        .extend(lines.into_iter().filter_map(console_event));
                    continue;
                }
                Ok(GuestMessage::Notice(_)) => continue,
                Err(TryRecvError::Empty) => return,
                Ok(GuestMessage::Ended(end)) => Some(end),
                Err(TryRecvError::Disconnected) => None,
            };
            self.events
                .extend(self.lines.finish().and_then(console_event));
            self.ended = true;
            match abnormal(index, end) {
                Ok(()) => self.events.push_back(ConsoleEvent::Closed),
                Err(failure) => self.failure = Some(failure),
            }
            return;
        }
    }
}

/// A VMM that ended without the guest's own exit (a triple fault, QEMU failing).
fn abnormal(index: usize, end: Option<GuestEnd>) -> Result<(), SchedError> {
    match end {
        Some(GuestEnd::Exited { .. } | GuestEnd::Stopped) => Ok(()),
        Some(GuestEnd::TripleFault { detail } | GuestEnd::Failed { detail }) => {
            Err(SchedError::Crash { index, detail })
        }
        None => Err(SchedError::Crash {
            index,
            detail: "its session ended without saying how".into(),
        }),
    }
}

impl Drop for BootedGuests {
    fn drop(&mut self) {
        for g in &mut self.guests {
            if let Err(e) = g.session.stop() {
                hostutil::say!("hvbench: warning: stopping a sched guest: {e}");
            }
        }
    }
}

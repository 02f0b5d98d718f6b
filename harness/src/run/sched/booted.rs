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
    name: String,
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
    /// Boots `count` guests of `vcpus` vCPUs, each with `cmdline`, handing each name to
    /// `after_boot` as it comes up (Xen pauses each until all are up). On an error the
    /// guests already booted are stopped as the partial set drops.
    pub fn boot(
        ctx: &HostContext,
        cmdline: &str,
        vcpus: u32,
        count: usize,
        after_boot: &mut dyn FnMut(&str) -> Result<(), SchedError>,
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
                name: name.clone(),
                session,
                lines: LineAssembler::new(),
                events: VecDeque::new(),
                ended: false,
                failure: None,
            });
            after_boot(&name)?;
        }
        Ok(booted)
    }

    /// The guests' names (their domain names, where the backend names domains).
    pub fn names(&self) -> Vec<String> {
        self.guests.iter().map(|g| g.name.clone()).collect()
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::Arc;

    use workloads::protocol::{Event, LineBuilder, LineKind};

    use super::*;
    use crate::backend::BackendError;

    #[derive(Debug)]
    struct Scripted {
        messages: Receiver<GuestMessage>,
        pid: Option<u32>,
        stops: Arc<AtomicUsize>,
    }

    impl GuestSession for Scripted {
        fn messages(&self) -> &Receiver<GuestMessage> {
            &self.messages
        }
        fn stack_processes(&self) -> crate::backend::StackProcesses {
            crate::backend::StackProcesses {
                vmm: self.pid,
                ..Default::default()
            }
        }
        fn stop(&mut self) -> Result<(), BackendError> {
            self.stops.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Senders kept open: a session whose sender is dropped has ended.
    type Open = Vec<std::sync::mpsc::Sender<GuestMessage>>;

    /// Guests whose sessions say `script` each, and the count of stops they saw.
    fn guests(scripts: Vec<Vec<GuestMessage>>) -> (BootedGuests, Arc<AtomicUsize>, Open) {
        let stops = Arc::new(AtomicUsize::new(0));
        let mut open = Vec::new();
        let guests = scripts
            .into_iter()
            .enumerate()
            .map(|(i, script)| {
                let (tx, rx) = channel();
                script.into_iter().for_each(|m| tx.send(m).unwrap());
                open.push(tx);
                let session = Scripted {
                    messages: rx,
                    pid: u32::try_from(i).ok().filter(|i| *i > 0).map(|i| 100 + i),
                    stops: stops.clone(),
                };
                Booted {
                    name: format!("g{i}"),
                    session: Box::new(session),
                    lines: LineAssembler::new(),
                    events: VecDeque::new(),
                    ended: false,
                    failure: None,
                }
            })
            .collect();
        (BootedGuests { guests }, stops, open)
    }

    fn console(bytes: &[u8]) -> GuestMessage {
        GuestMessage::Console {
            bytes: bytes.to_vec(),
            exits: None,
        }
    }

    fn next(g: &mut BootedGuests) -> Result<Option<(usize, ConsoleEvent)>, SchedError> {
        g.next_event(Duration::from_millis(5))
    }

    #[test]
    fn lines_become_events_and_a_crashed_vmm_is_an_error_after_them() {
        let skip = LineBuilder::new(LineKind::Skip)
            .text("w", "sched.steal")
            .text("reason", "no")
            .finish()
            .to_vec();
        let (head, tail) = skip.split_at(7);
        let crashed = vec![
            console(head),
            console(tail),
            console(b"not a result line\n"),
            GuestMessage::Ended(GuestEnd::TripleFault {
                detail: "reset".into(),
            }),
        ];
        let (mut g, stops, _open) = guests(vec![crashed]);
        assert!(matches!(
            next(&mut g),
            Ok(Some((0, ConsoleEvent::Event(Event::Skip { .. }))))
        ));
        match next(&mut g) {
            Err(SchedError::Crash { index: 0, detail }) => assert_eq!(detail, "reset"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(next(&mut g), Err(SchedError::Host(_))));
        drop(g);
        assert_eq!(stops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_exit_closes_the_console_quiet_guests_time_out_and_every_session_is_stopped() {
        let exited = vec![GuestMessage::Ended(GuestEnd::Exited { code: 0 })];
        let (mut g, stops, open) = guests(vec![Vec::new(), exited]);
        assert!(matches!(next(&mut g), Ok(Some((1, ConsoleEvent::Closed)))));
        assert!(matches!(next(&mut g), Ok(None)));
        // Guest 0 has no VMM process here: named, not guessed.
        assert!(matches!(g.pids(), Err(SchedError::Host(m)) if m.contains("guest 0")));
        // A session gone without an end is a crash, not a quiet guest.
        drop(open);
        assert!(matches!(
            next(&mut g),
            Err(SchedError::Crash { index: 0, .. })
        ));
        drop(g);
        assert_eq!(stops.load(Ordering::Relaxed), 2);
    }
}

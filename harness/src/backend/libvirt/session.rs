//! A running libvirt domain: its console (a file QEMU writes and hvbench follows), its
//! lifecycle events (from the backend's watcher), and its destruction on every path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hostutil::transport::{shell_quote, Transport};
use workloads::abi::ExitCode;
use workloads::protocol::{Event, Status};

use super::events::Events;
use super::files::{Console, Files};
use super::flavour::Flavour;
use super::virsh::{Stopped, Virsh, COMMAND_TIMEOUT};
use super::LibvirtError;
use crate::backend::{BackendError, GuestEnd, GuestMessage, GuestSession};
use crate::console::{ConsoleLine, GuestSender, LineAssembler};

/// How long the console reader sleeps when it has read everything QEMU wrote.
const FOLLOW_POLL: Duration = Duration::from_millis(2);
/// Console silence after which the reader asks libvirt whether the domain still exists
/// (a stop the watcher missed: it was restarted, or registered after the domain ended).
const QUIET_CHECK: Duration = Duration::from_secs(2);
/// Most console bytes read from one guest: past this the domain is destroyed (a guest
/// that floods its console would otherwise fill the disk; the other backends stall it).
pub const MAX_CONSOLE_BYTES: u64 = 64 << 20;

/// What the session's threads share.
#[derive(Debug)]
struct Shared {
    /// Set before the host destroys the domain: the reader then reports `Stopped` and
    /// gives up on a full channel.
    stopping: Arc<AtomicBool>,
    virsh: Virsh,
    name: String,
    /// The domain ended in a way its QEMU log may explain: the log is kept.
    keep_log: AtomicBool,
    /// libvirt said the domain stopped on its own: the host's destroy may race libvirt's
    /// own clean-up of it, so the stop checks that it is gone.
    ended: AtomicBool,
}

/// A domain `virsh create` has just started, and what belongs to it.
#[derive(Debug)]
pub struct Created {
    pub virsh: Virsh,
    pub name: String,
    pub files: Arc<Files>,
    pub events: Arc<Events>,
    /// Its stop, from the backend's watcher (registered before the create).
    pub verdicts: Receiver<Stopped>,
    /// The console file, as the hypervisor's host names it.
    pub console: String,
    /// The log libvirt writes for it there.
    pub log: String,
    pub flavour: Flavour,
}

#[derive(Debug)]
pub struct LibvirtSession {
    virsh: Virsh,
    name: String,
    messages: Receiver<GuestMessage>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    files: Arc<Files>,
    events: Arc<Events>,
    console: String,
    log: String,
    destroyed: bool,
    /// How long `virsh destroy` took, once the host destroyed the domain.
    pub destroy_latency: Option<Duration>,
}

impl LibvirtSession {
    /// Follows the console of the domain `virsh create` started (running: the console
    /// file holds every byte from the first, so nothing is lost by reading it after the
    /// start). The domain is destroyed on every path from here on.
    pub fn start(created: Created) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crate::console::guest_channel(stopping.clone());
        let shared = Arc::new(Shared {
            stopping,
            virsh: created.virsh.clone(),
            name: created.name.clone(),
            keep_log: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        let opened = created.files.follow(&created.console);
        let verdicts = created.verdicts;
        let flavour = created.flavour;
        let reader_shared = shared.clone();
        let reader = std::thread::spawn(move || {
            read_console(opened, &verdicts, flavour, &reader_shared, &tx)
        });
        LibvirtSession {
            virsh: created.virsh,
            name: created.name,
            messages: rx,
            shared,
            reader: Some(reader),
            files: created.files,
            events: created.events,
            console: created.console,
            log: created.log,
            destroyed: false,
            destroy_latency: None,
        }
    }
}

/// Follows the console until the domain has stopped and everything QEMU wrote is read,
/// then reports how the domain ended. The last complete line is kept (bounded by the line
/// assembler), because libvirt does not pass on QEMU's exit status: the guest's `end`
/// line says it.
fn read_console(
    opened: Result<Console, String>,
    verdicts: &Receiver<Stopped>,
    flavour: Flavour,
    shared: &Shared,
    tx: &GuestSender,
) {
    let end = match opened {
        Ok(console) => follow(console, verdicts, flavour, shared, tx),
        Err(detail) => GuestEnd::Failed { detail },
    };
    let end = if shared.stopping.load(Ordering::Acquire) {
        GuestEnd::Stopped
    } else {
        end
    };
    if matches!(end, GuestEnd::Failed { .. } | GuestEnd::TripleFault { .. }) {
        shared.keep_log.store(true, Ordering::Release);
    }
    let _ = tx.send(GuestMessage::Ended(end));
}

/// The console's bytes so far, the last line, and the bound on both.
struct Progress {
    lines: LineAssembler,
    last_line: Option<ConsoleLine>,
    total: u64,
}

impl Progress {
    /// Passes `bytes` on; false once the guest wrote more than the bound.
    fn take(&mut self, bytes: Vec<u8>, tx: &GuestSender) -> bool {
        self.total += bytes.len() as u64;
        if let Some(line) = self.lines.push(&bytes).pop() {
            self.last_line = Some(line);
        }
        let _ = tx.send(GuestMessage::Console { bytes, exits: None });
        self.total <= MAX_CONSOLE_BYTES
    }
}

fn flooded(shared: &Shared) -> GuestEnd {
    let _ = destroy(&shared.virsh, &shared.name);
    GuestEnd::Failed {
        detail: format!(
            "the guest wrote more than {MAX_CONSOLE_BYTES} bytes to its console; the host \
             destroyed it"
        ),
    }
}

/// Copies what QEMU appends to the console to the session; returns once the domain
/// stopped (libvirt's verdict, then the rest of the console) or the host stops it.
fn follow(
    mut console: Console,
    verdicts: &Receiver<Stopped>,
    flavour: Flavour,
    shared: &Shared,
    tx: &GuestSender,
) -> GuestEnd {
    let mut progress = Progress {
        lines: LineAssembler::new(),
        last_line: None,
        total: 0,
    };
    let mut buf = [0u8; 4096];
    let mut quiet_since = Instant::now();
    loop {
        let bytes = console.read_new(&mut buf);
        if !bytes.is_empty() {
            quiet_since = Instant::now();
            if !progress.take(bytes, tx) {
                return flooded(shared);
            }
            continue;
        }
        if shared.stopping.load(Ordering::Acquire) {
            return GuestEnd::Stopped;
        }
        let stopped = match verdicts.try_recv() {
            Ok(stopped) => flavour.normalise(stopped),
            // The watcher is gone (its link dropped): libvirt is asked instead.
            Err(TryRecvError::Empty | TryRecvError::Disconnected)
                if quiet_since.elapsed() > QUIET_CHECK =>
            {
                quiet_since = Instant::now();
                if domain_exists(&shared.virsh, &shared.name) {
                    continue;
                }
                // Gone without a word from the watcher: QEMU ended on its own.
                Stopped::Failed
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                std::thread::sleep(FOLLOW_POLL);
                continue;
            }
        };
        shared.ended.store(true, Ordering::Release);
        // Once libvirt said the domain stopped, QEMU writes no more: read to the end.
        let limit = (MAX_CONSOLE_BYTES + 1).saturating_sub(progress.total);
        let rest = console.finish(limit);
        if !rest.is_empty() && !progress.take(rest, tx) {
            return flooded(shared);
        }
        loop {
            let bytes = console.read_new(&mut buf);
            if bytes.is_empty() {
                break;
            }
            if !progress.take(bytes, tx) {
                return flooded(shared);
            }
        }
        return end_of(&stopped, progress.last_line.as_ref());
    }
}

/// Whether libvirt still has the domain `name` (false only when it says there is none).
fn domain_exists(virsh: &Virsh, name: &str) -> bool {
    match virsh.run_idempotent(&["domstate", name], COMMAND_TIMEOUT) {
        Ok(_) => true,
        Err(e) => !e.stderr().is_some_and(gone),
    }
}

/// What virsh says of a domain that does not exist.
fn gone(stderr: &str) -> bool {
    stderr.contains("ailed to get domain") || stderr.contains("Domain not found")
}

/// How the guest ended, from libvirt's word and the guest's last line.
fn end_of(stopped: &Stopped, last_line: Option<&ConsoleLine>) -> GuestEnd {
    match stopped {
        Stopped::Failed => match last_line.and_then(end_status) {
            Some(code) => GuestEnd::Exited { code },
            None => GuestEnd::Failed {
                detail: "the domain ended without the guest's end line (libvirt: stopped); \
                         libvirt's log of it is kept"
                    .into(),
            },
        },
        Stopped::Shutdown => GuestEnd::TripleFault {
            detail: "the guest reset the machine (a triple fault; the domain has \
                     on_reboot=destroy) and libvirt shut the domain down"
                .into(),
        },
        Stopped::Destroyed => GuestEnd::Failed {
            detail: "the domain was destroyed by another libvirt client".into(),
        },
        Stopped::Other(detail) => GuestEnd::Failed {
            detail: format!(
                "libvirt stopped the domain ({})",
                crate::console::escape_text(detail)
            ),
        },
    }
}

/// The exit status of a checked `end status=...` line, as the exit device would carry it.
fn end_status(line: &ConsoleLine) -> Option<u32> {
    let ConsoleLine::Line(bytes) = line else {
        return None;
    };
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let Ok(Some(Event::End(status))) = crate::console::decode(bytes) else {
        return None;
    };
    let code = match status {
        Status::Success => ExitCode::Success,
        Status::Skip => ExitCode::Skip,
        Status::Error => ExitCode::Error,
        Status::Failure => ExitCode::Failure,
        Status::Crash => ExitCode::Crash,
        Status::Timeout => return None,
    };
    Some(code as u32)
}

/// The log libvirt's system daemon keeps for the domain `name` in `dir`.
pub fn domain_log(dir: &str, name: &str) -> String {
    format!("{dir}/{name}.log")
}

/// Where libvirt notes the pid of the QEMU running domain `name`.
fn vmm_pid_file(name: &str) -> String {
    format!("/run/libvirt/qemu/{name}.pid")
}

/// libvirt's daemons (they serve every domain, so their memory is the management stack's
/// cost).
const DAEMONS: [&str; 4] = ["libvirtd", "virtqemud", "virtlogd", "virtlockd"];

/// libvirt's daemons running here.
pub fn daemon_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            hostutil::read_trimmed(format!("/proc/{pid}/comm"))
                .is_some_and(|comm| DAEMONS.contains(&comm.as_str()))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The domain's QEMU and libvirt's daemons on the host `transport` reaches (one command:
/// the pid file's line, then `pidof`'s).
fn remote_stack(transport: &Transport, name: &str) -> crate::backend::StackProcesses {
    let command = format!(
        "head -c 20 {} 2>/dev/null; echo; pidof {} 2>/dev/null; echo",
        shell_quote(&vmm_pid_file(name)),
        DAEMONS.join(" ")
    );
    let out = transport
        .run(&command, None, COMMAND_TIMEOUT)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut lines = out.lines();
    let vmm = lines.next().and_then(|l| l.trim().parse().ok());
    let daemons = lines
        .next()
        .unwrap_or("")
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .take(16)
        .collect();
    crate::backend::StackProcesses {
        vmm,
        daemons,
        note: vmm.is_none().then_some(
            "no QEMU pid file for the domain on the libvirt host (a Xen domain has no VMM \
             process of its own)",
        ),
        on: Some(transport.clone()),
    }
}

/// How often a domain that stopped on its own is looked for after its destruction.
const GONE_CHECKS: u32 = 10;

/// Waits until libvirt no longer lists `name`, destroying it again each time it still
/// does (seen once with the libxl driver: a domain that powered off while hvbench
/// destroyed it stayed listed).
fn destroyed_for_sure(virsh: &Virsh, name: &str) -> Result<(), LibvirtError> {
    for _ in 0..GONE_CHECKS {
        if !domain_exists(virsh, name) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
        destroy(virsh, name)?;
    }
    Err(LibvirtError::Lingering {
        name: crate::console::escape_text(name),
    })
}

/// `virsh destroy NAME`; a domain that is already gone is not an error.
pub fn destroy(virsh: &Virsh, name: &str) -> Result<(), LibvirtError> {
    match virsh.run_idempotent(&["destroy", name], COMMAND_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(e)
            if e.stderr()
                .is_some_and(|s| gone(s) || s.contains("not running")) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

impl GuestSession for LibvirtSession {
    fn messages(&self) -> &Receiver<GuestMessage> {
        &self.messages
    }

    fn stack_processes(&self) -> crate::backend::StackProcesses {
        match self.files.transport() {
            None => crate::backend::StackProcesses {
                vmm: hostutil::read_trimmed(vmm_pid_file(&self.name))
                    .and_then(|pid| pid.parse().ok()),
                daemons: daemon_pids(),
                ..Default::default()
            },
            Some(transport) => remote_stack(transport, &self.name),
        }
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        self.shared.stopping.store(true, Ordering::Release);
        let started = Instant::now();
        // A transient domain is undefined by its destruction: nothing of it stays.
        let mut result = destroy(&self.virsh, &self.name);
        if result.is_ok() && self.shared.ended.load(Ordering::Acquire) {
            result = destroyed_for_sure(&self.virsh, &self.name);
        }
        self.destroy_latency = Some(started.elapsed());
        self.events.unregister(&self.name);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        // libvirt writes a log per domain name, and every boot has a new name: it goes
        // with the domain unless the domain ended in a way it may explain.
        let mut remove = vec![self.console.clone()];
        if !self.shared.keep_log.load(Ordering::Acquire) {
            remove.push(self.log.clone());
        }
        self.files.remove(&remove);
        result.map_err(Into::into)
    }
}

impl Drop for LibvirtSession {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workloads::protocol::{LineBuilder, LineKind};

    fn line(kind: LineKind, status: &str) -> ConsoleLine {
        let bytes = LineBuilder::new(kind)
            .text("status", status)
            .finish()
            .to_vec();
        ConsoleLine::Line(bytes[..bytes.len() - 1].to_vec())
    }

    #[test]
    fn the_exit_status_is_the_guests_checked_end_line() {
        let end = line(LineKind::End, "success");
        assert_eq!(
            end_of(&Stopped::Failed, Some(&end)),
            GuestEnd::Exited { code: 0 }
        );
        let crash = line(LineKind::End, "crash");
        assert_eq!(
            end_of(&Stopped::Failed, Some(&crash)),
            GuestEnd::Exited {
                code: ExitCode::Crash as u32
            }
        );
        // A damaged line, another line or none: QEMU ended, the guest did not say why.
        let ConsoleLine::Line(mut bytes) = line(LineKind::End, "success") else {
            unreachable!()
        };
        bytes[8] ^= 1;
        for last in [
            Some(ConsoleLine::Line(bytes)),
            Some(ConsoleLine::Line(b"x".to_vec())),
            None,
        ] {
            assert!(matches!(
                end_of(&Stopped::Failed, last.as_ref()),
                GuestEnd::Failed { .. }
            ));
        }
        assert!(matches!(
            end_of(&Stopped::Shutdown, Some(&end)),
            GuestEnd::TripleFault { .. }
        ));
    }

    /// A guest that writes past `MAX_CONSOLE_BYTES` is refused at that byte, and what
    /// was read is handed on without being kept whole (only the last line is).
    #[test]
    fn the_console_bound_holds_at_its_byte() {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crate::console::guest_channel(stop);
        let drain = std::thread::spawn(move || rx.into_iter().count());
        let mut progress = Progress {
            lines: LineAssembler::new(),
            last_line: None,
            total: 0,
        };
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_CONSOLE_BYTES >> 20) {
            assert!(progress.take(chunk.clone(), &tx));
        }
        assert!(!progress.take(vec![b'\n'], &tx));
        drop(tx);
        assert_eq!(drain.join().unwrap() as u64, (MAX_CONSOLE_BYTES >> 20) + 1);
    }
}

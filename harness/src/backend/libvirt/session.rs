//! A running libvirt domain: its console (a file QEMU writes and hvbench follows), a
//! watcher of its lifecycle events (`virsh event`), and its destruction on every path.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use workloads::abi::ExitCode;
use workloads::protocol::{Event, Status};

use super::virsh::{parse_stopped, Stopped, Virsh, COMMAND_TIMEOUT};
use super::LibvirtError;
use crate::backend::{BackendError, GuestEnd, GuestMessage, GuestSession};
use crate::console::{ConsoleLine, GuestSender, LineAssembler};

/// How long the console reader sleeps when it has read everything QEMU wrote.
const FOLLOW_POLL: Duration = Duration::from_millis(2);
/// Most console bytes read from one guest: past this the domain is destroyed (a guest
/// that floods its console would otherwise fill the disk; the other backends stall it).
pub const MAX_CONSOLE_BYTES: u64 = 64 << 20;

/// What the session's threads share.
#[derive(Debug)]
struct Shared {
    /// Set before the host destroys the domain: the reader then reports `Stopped` and
    /// gives up on a full channel.
    stopping: Arc<AtomicBool>,
    watcher: Mutex<Option<Child>>,
    virsh: Virsh,
    name: String,
    /// The domain ended in a way its QEMU log may explain: the log is kept.
    keep_log: AtomicBool,
}

#[derive(Debug)]
pub struct LibvirtSession {
    virsh: Virsh,
    name: String,
    messages: Receiver<GuestMessage>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// Files of this domain (console socket, XML), removed with it.
    files: Vec<PathBuf>,
    destroyed: bool,
    /// How long `virsh destroy` took, once the host destroyed the domain.
    pub destroy_latency: Option<Duration>,
}

impl LibvirtSession {
    /// Watches the domain `name` (created paused), follows its console file (the first of
    /// `files`), then resumes it. From the first line on, the domain is destroyed on
    /// every path: a failure here destroys it before returning.
    pub fn start(virsh: Virsh, name: String, files: Vec<PathBuf>) -> Result<Self, BackendError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crate::console::guest_channel(stopping.clone());
        let shared = Arc::new(Shared {
            stopping,
            watcher: Mutex::new(None),
            virsh: virsh.clone(),
            name: name.clone(),
            keep_log: AtomicBool::new(false),
        });
        let mut session = LibvirtSession {
            virsh: virsh.clone(),
            name: name.clone(),
            messages: rx,
            shared: shared.clone(),
            reader: None,
            files,
            destroyed: false,
            destroy_latency: None,
        };
        let watcher = virsh
            .spawn(&["event", "--domain", &name, "--event", "lifecycle", "--loop"])
            .map_err(LibvirtError::from);
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                let _ = session.stop();
                return Err(e.into());
            }
        };
        let verdicts = read_verdicts(watcher.stdout.take());
        if let Ok(mut slot) = shared.watcher.lock() {
            *slot = Some(watcher);
        }
        let console = session.files.first().cloned().unwrap_or_default();
        session.reader = Some(std::thread::spawn(move || {
            read_console(&console, &verdicts, &shared, &tx)
        }));
        if let Err(e) = virsh.run(&["resume", &name], None, COMMAND_TIMEOUT) {
            let _ = session.stop();
            return Err(LibvirtError::from(e).into());
        }
        Ok(session)
    }
}

/// The watcher's verdicts, one per stop it reports, on a thread of their own.
fn read_verdicts(stdout: Option<std::process::ChildStdout>) -> Receiver<Stopped> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Some(out) = stdout else { return };
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(stopped) = parse_stopped(&line) {
                let _ = tx.send(stopped);
            }
        }
    });
    rx
}

/// Follows the console file until the domain has stopped and everything QEMU wrote is
/// read, then reports how the domain ended. The last complete line is kept (bounded by
/// the line assembler), because libvirt does not pass on QEMU's exit status: the guest's
/// `end` line says it.
fn read_console(console: &Path, verdicts: &Receiver<Stopped>, shared: &Shared, tx: &GuestSender) {
    let end = match std::fs::File::open(console) {
        Ok(file) => follow(file, verdicts, shared, tx),
        Err(e) => GuestEnd::Failed {
            detail: format!("cannot read the console file {}: {e}", console.display()),
        },
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

/// Copies what QEMU appends to `file` to the session; returns once the domain stopped
/// (libvirt's verdict, then the rest of the file) or the host stops it.
fn follow(
    mut file: std::fs::File,
    verdicts: &Receiver<Stopped>,
    shared: &Shared,
    tx: &GuestSender,
) -> GuestEnd {
    let mut lines = LineAssembler::new();
    let mut last_line = None;
    let mut total = 0u64;
    let mut verdict = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            total += n as u64;
            if let Some(line) = lines.push(&buf[..n]).pop() {
                last_line = Some(line);
            }
            let _ = tx.send(GuestMessage::Console {
                bytes: buf[..n].to_vec(),
                exits: None,
            });
            if total > MAX_CONSOLE_BYTES {
                let _ = destroy(&shared.virsh, &shared.name);
                return GuestEnd::Failed {
                    detail: format!(
                        "the guest wrote more than {MAX_CONSOLE_BYTES} bytes to its console; \
                         the host destroyed it"
                    ),
                };
            }
            continue;
        }
        // Everything written so far is read: once libvirt said the domain stopped, QEMU
        // writes no more.
        if let Some(stopped) = verdict {
            return end_of(&stopped, last_line.as_ref());
        }
        if shared.stopping.load(Ordering::Acquire) {
            return GuestEnd::Stopped;
        }
        match verdicts.try_recv() {
            Ok(stopped) => verdict = Some(stopped),
            Err(TryRecvError::Disconnected) => {
                return GuestEnd::Failed {
                    detail: "libvirt's event stream ended before the domain stopped".into(),
                }
            }
            Err(TryRecvError::Empty) => std::thread::sleep(FOLLOW_POLL),
        }
    }
}

/// How the guest ended, from libvirt's word and the guest's last line.
fn end_of(stopped: &Stopped, last_line: Option<&ConsoleLine>) -> GuestEnd {
    match stopped {
        Stopped::Failed => match last_line.and_then(end_status) {
            Some(code) => GuestEnd::Exited { code },
            None => GuestEnd::Failed {
                detail: "QEMU exited without the guest's end line (libvirt: stopped, failed); \
                         its log is in /var/log/libvirt/qemu/"
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

/// The QEMU log libvirt's system daemon keeps for the domain `name`.
pub fn domain_log(name: &str) -> PathBuf {
    Path::new("/var/log/libvirt/qemu").join(format!("{name}.log"))
}

/// libvirt's daemons running here (they serve every domain, so their memory is the
/// management stack's cost).
pub fn daemon_pids() -> Vec<u32> {
    const DAEMONS: [&str; 4] = ["libvirtd", "virtqemud", "virtlogd", "virtlockd"];
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

/// `virsh destroy NAME`; a domain that is already gone is not an error.
pub fn destroy(virsh: &Virsh, name: &str) -> Result<(), LibvirtError> {
    match virsh.run(&["destroy", name], None, COMMAND_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(e)
            if e.stderr().is_some_and(|s| {
                s.contains("ailed to get domain")
                    || s.contains("Domain not found")
                    || s.contains("not running")
            }) =>
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
        crate::backend::StackProcesses {
            vmm: hostutil::read_trimmed(format!("/run/libvirt/qemu/{}.pid", self.name))
                .and_then(|pid| pid.parse().ok()),
            daemons: daemon_pids(),
            note: None,
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
        let result = destroy(&self.virsh, &self.name);
        self.destroy_latency = Some(started.elapsed());
        if let Ok(mut watcher) = self.shared.watcher.lock() {
            if let Some(w) = watcher.as_mut() {
                let _ = w.kill();
                let _ = w.wait();
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
        // libvirt writes a log per domain name, and every boot has a new name: it goes
        // with the domain unless the domain ended in a way it may explain.
        if !self.shared.keep_log.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(domain_log(&self.name));
        }
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
}

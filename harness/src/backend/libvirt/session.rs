//! A running libvirt domain: its console (a unix socket QEMU connects to), a watcher of
//! its lifecycle events (`virsh event`), and its destruction on every path.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use workloads::abi::ExitCode;
use workloads::protocol::{Event, Status};

use super::virsh::{parse_stopped, Stopped, Virsh, COMMAND_TIMEOUT};
use super::LibvirtError;
use crate::backend::{BackendError, GuestEnd, GuestMessage, GuestSession};
use crate::console::{ConsoleLine, GuestSender, LineAssembler};

/// How long the console reader waits for libvirt's word once the console has closed.
const VERDICT_WAIT: Duration = Duration::from_secs(10);
/// How often a reader that waits for QEMU to connect looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// What the session's threads share.
#[derive(Debug)]
struct Shared {
    /// Set before the host destroys the domain: the reader then reports `Stopped` and
    /// gives up on a full channel.
    stopping: Arc<AtomicBool>,
    watcher: Mutex<Option<Child>>,
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
    /// Watches the domain `name` (created paused), reads its console from `listener`,
    /// then resumes it. From the first line on, the domain is destroyed on every path:
    /// a failure here destroys it before returning.
    pub fn start(
        virsh: Virsh,
        name: String,
        listener: UnixListener,
        files: Vec<PathBuf>,
    ) -> Result<Self, BackendError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crate::console::guest_channel(stopping.clone());
        let shared = Arc::new(Shared {
            stopping,
            watcher: Mutex::new(None),
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
        session.reader = Some(std::thread::spawn(move || {
            read_console(listener, verdicts, &shared, tx)
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

/// Waits for QEMU to connect to the console socket (or the host to give up on it).
fn accept(listener: &UnixListener, stopping: &AtomicBool) -> Option<UnixStream> {
    if listener.set_nonblocking(true).is_err() {
        return None;
    }
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                return stream.set_nonblocking(false).ok().map(|()| stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stopping.load(Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(_) => return None,
        }
    }
}

/// Copies the console to the session until QEMU closes it, then reports how the domain
/// ended. The last complete line is kept (bounded by the line assembler), because
/// libvirt does not pass on QEMU's exit status: the guest's `end` line says it.
fn read_console(
    listener: UnixListener,
    verdicts: Receiver<Stopped>,
    shared: &Shared,
    tx: GuestSender,
) {
    let mut last_line = None;
    if let Some(mut stream) = accept(&listener, &shared.stopping) {
        drop(listener);
        let mut lines = LineAssembler::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(line) = lines.push(&buf[..n]).pop() {
                last_line = Some(line);
            }
            let _ = tx.send(GuestMessage::Console {
                bytes: buf[..n].to_vec(),
                exits: None,
            });
        }
    }
    let end = if shared.stopping.load(Ordering::Acquire) {
        GuestEnd::Stopped
    } else {
        match verdicts.recv_timeout(VERDICT_WAIT) {
            Ok(stopped) => end_of(&stopped, last_line.as_ref()),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => GuestEnd::Failed {
                detail: "the console closed but libvirt reported no stop of the domain".into(),
            },
        }
    };
    let _ = tx.send(GuestMessage::Ended(end));
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

/// `virsh destroy NAME`; a domain that is already gone is not an error.
pub fn destroy(virsh: &Virsh, name: &str) -> Result<(), LibvirtError> {
    match virsh.run(&["destroy", name], None, COMMAND_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(e)
            if e.stderr().is_some_and(|s| {
                s.contains("ailed to get domain") || s.contains("not running")
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

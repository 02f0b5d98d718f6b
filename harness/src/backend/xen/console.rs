//! The guest's console as `xl console` passes it on, kept attached for the whole boot.
//!
//! `xl console` is one process (over SSH, two) that can end while the domain still runs:
//! the TCG lab's dom0 loses freshly started processes now and then, and an SSH link can
//! drop. xenconsoled keeps what the guest wrote until a reader comes, so the link attaches
//! again and the stream goes on; what the dead reader had taken but not passed on is lost,
//! and the session reports the damaged or missing lines that leaves. Every reattach is
//! reported with the stream.

use std::io::Read;
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::GuestMessage;
use crate::console::GuestSender;
use hostutil::transport::{shell_quote, Transport, TransportError};

/// Reattaches allowed per boot before the link gives up.
const MAX_REATTACHES: u32 = 5;
/// Pause before a reattach, so a reader that cannot start does not spin.
const REATTACH_PAUSE: Duration = Duration::from_millis(200);
/// After the domain stopped, the console counts as drained once it has been quiet this long.
const QUIET: Duration = Duration::from_millis(300);
/// A reader that has passed on nothing yet gets this long to connect before its silence
/// counts (under TCG, `xl console` takes most of a second to start).
const CONNECT_GRACE: Duration = Duration::from_secs(3);
/// The longest the session waits for the console to drain after the domain stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// What the reader thread and the session share.
#[derive(Debug)]
struct LinkState {
    child: Option<Child>,
    /// Set once the host is done with the stream: no more reattaching.
    closed: bool,
    /// When the current reader was started, and when it last passed bytes on.
    attached_at: Instant,
    last_bytes_at: Option<Instant>,
}

/// The console link of one domain.
#[derive(Debug)]
pub struct ConsoleLink {
    state: Arc<Mutex<LinkState>>,
    /// The shell command that reads the console (`xl console <domain>`).
    command: String,
    reader: Mutex<Option<JoinHandle<()>>>,
}

fn lock(state: &Mutex<LinkState>) -> MutexGuard<'_, LinkState> {
    // A reader thread that panicked leaves the state as consistent as any other.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConsoleLink {
    /// Starts `xl console` for `domain` (created paused, so nothing is missed).
    pub fn attach(transport: &Transport, domain: &str) -> Result<Self, TransportError> {
        Self::attach_command(
            transport,
            format!("exec xl console {}", shell_quote(domain)),
        )
    }

    fn attach_command(transport: &Transport, command: String) -> Result<Self, TransportError> {
        let child = transport.spawn(&command, false)?;
        Ok(ConsoleLink {
            command,
            state: Arc::new(Mutex::new(LinkState {
                child: Some(child),
                closed: false,
                attached_at: Instant::now(),
                last_bytes_at: None,
            })),
            reader: Mutex::new(None),
        })
    }

    /// Passes the console on to `tx` until the link is closed, reattaching as needed.
    pub fn start_reading(&self, transport: Transport, tx: GuestSender) {
        let state = self.state.clone();
        let command = self.command.clone();
        let reader =
            std::thread::spawn(move || read_until_closed(&state, &transport, &command, &tx));
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
    }

    /// Waits, after the domain stopped, until the console has passed on what the guest
    /// wrote: quiet for a moment with a reader that has had time to connect.
    pub fn wait_drained(&self) {
        let stopped_at = Instant::now();
        while stopped_at.elapsed() < DRAIN_LIMIT {
            let drained = {
                let s = lock(&self.state);
                s.closed
                    || s.child.is_some() && {
                        let heard_from = s
                            .last_bytes_at
                            .unwrap_or(s.attached_at + CONNECT_GRACE)
                            .max(stopped_at);
                        heard_from.elapsed() >= QUIET
                    }
            };
            if drained {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops reattaching, before the host destroys the domain (which ends the reader).
    pub fn shut(&self) {
        lock(&self.state).closed = true;
    }

    /// Ends the link: no more reattaching; the reader is killed and its thread joined.
    pub fn close(&self) {
        {
            let mut s = lock(&self.state);
            s.closed = true;
            if let Some(child) = s.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
    }
}

impl Drop for ConsoleLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// How a reader whose output ended went: it exits on its own within a moment (an SSH
/// client once its remote command is gone), else it is killed.
fn exit_status(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return "stopped writing; killed".to_string();
            }
            Err(e) => return format!("status unknown: {e}"),
        }
    }
}

fn read_until_closed(
    state: &Mutex<LinkState>,
    transport: &Transport,
    command: &str,
    tx: &GuestSender,
) {
    let mut reattaches = 0;
    loop {
        let out = lock(state).child.as_mut().and_then(|c| c.stdout.take());
        if let Some(mut out) = out {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                lock(state).last_bytes_at = Some(Instant::now());
                let _ = tx.send(GuestMessage::Console {
                    bytes: buf[..n].to_vec(),
                    exits: None,
                });
            }
        }
        // The stream ended: the host closed it, or the reader died under a live domain.
        let ended = {
            let mut s = lock(state);
            if s.closed {
                return;
            }
            s.child.take()
        };
        let how = ended.map_or_else(|| "no reader".to_string(), exit_status);
        if reattaches == MAX_REATTACHES {
            lock(state).closed = true;
            let _ = tx.send(GuestMessage::Notice(format!(
                "`xl console` ended ({how}) again after {MAX_REATTACHES} reattaches while the \
                 domain ran; gave up on the console"
            )));
            return;
        }
        std::thread::sleep(REATTACH_PAUSE);
        let respawned = {
            let mut s = lock(state);
            if s.closed {
                return;
            }
            match transport.spawn(command, false) {
                Ok(child) => {
                    s.child = Some(child);
                    s.attached_at = Instant::now();
                    s.last_bytes_at = None;
                    Ok(())
                }
                Err(e) => {
                    // Without a reader there is nothing more to wait for.
                    s.closed = true;
                    Err(e)
                }
            }
        };
        reattaches += 1;
        match respawned {
            Ok(()) => {
                let _ = tx.send(GuestMessage::Notice(format!(
                    "`xl console` ended ({how}) while the domain ran; reattached \
                     ({reattaches} of {MAX_REATTACHES}): lines in flight may be lost, and are \
                     reported if so"
                )));
            }
            Err(e) => {
                let _ = tx.send(GuestMessage::Notice(format!(
                    "`xl console` ended ({how}) and could not be restarted: {e}"
                )));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::Receiver;

    fn channel() -> (GuestSender, Receiver<GuestMessage>) {
        crate::console::guest_channel(Arc::new(AtomicBool::new(false)))
    }

    /// A reader whose first `deaths` runs print `part<n>` and die; the next prints `last`
    /// and stays, as `xl console` does on a live domain.
    fn flaky_reader(dir: &std::path::Path, deaths: u32) -> String {
        format!(
            "n=$(cat {d}/n 2>/dev/null || echo 0); echo $((n + 1)) > {d}/n; \
             if [ $n -lt {deaths} ]; then echo part$n; exit 3; fi; echo last; exec sleep 30",
            d = dir.display()
        )
    }

    /// Everything the link passed on within `limit`: console text and notices.
    fn collect(rx: &Receiver<GuestMessage>, until: &str, limit: Duration) -> (String, Vec<String>) {
        let (mut text, mut notices) = (String::new(), Vec::new());
        let deadline = Instant::now() + limit;
        while !text.contains(until) && !notices.iter().any(|n: &String| n.contains(until)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(GuestMessage::Console { bytes, .. }) => {
                    text.push_str(&String::from_utf8_lossy(&bytes))
                }
                Ok(GuestMessage::Notice(n)) => notices.push(n),
                Ok(GuestMessage::Ended(_)) | Err(_) => break,
            }
        }
        (text, notices)
    }

    #[test]
    fn a_reader_that_dies_is_replaced_and_the_stream_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let link =
            ConsoleLink::attach_command(&Transport::Local, flaky_reader(dir.path(), 2)).unwrap();
        let (tx, rx) = channel();
        link.start_reading(Transport::Local, tx);
        let (text, notices) = collect(&rx, "last", Duration::from_secs(20));
        assert_eq!(text, "part0\npart1\nlast\n");
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(notices[0].contains("reattached (1 of 5)"), "{notices:?}");
        assert!(notices[0].contains("exit status: 3"), "{notices:?}");
        // The live reader has passed everything on: the stream counts as drained.
        let started = Instant::now();
        link.wait_drained();
        assert!(started.elapsed() < DRAIN_LIMIT, "{:?}", started.elapsed());
        link.close();
    }

    #[test]
    fn a_reader_that_keeps_dying_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let link =
            ConsoleLink::attach_command(&Transport::Local, flaky_reader(dir.path(), 100)).unwrap();
        let (tx, rx) = channel();
        link.start_reading(Transport::Local, tx);
        let (text, notices) = collect(&rx, "gave up", Duration::from_secs(20));
        assert_eq!(text, "part0\npart1\npart2\npart3\npart4\npart5\n");
        assert_eq!(notices.len(), 6, "{notices:?}");
        assert!(notices[5].contains("gave up"), "{notices:?}");
        // With no reader left there is nothing to wait for.
        let started = Instant::now();
        link.wait_drained();
        assert!(started.elapsed() < Duration::from_secs(1));
        link.close();
    }

    #[test]
    fn a_shut_link_does_not_reattach() {
        let dir = tempfile::tempdir().unwrap();
        let link =
            ConsoleLink::attach_command(&Transport::Local, flaky_reader(dir.path(), 0)).unwrap();
        let (tx, rx) = channel();
        link.start_reading(Transport::Local, tx);
        let (text, _) = collect(&rx, "last", Duration::from_secs(20));
        assert_eq!(text, "last\n");
        // As when the host destroys the domain: shut, then the reader ends.
        link.shut();
        link.close();
        let (_, notices) = collect(&rx, "never", Duration::from_millis(500));
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("n"))
                .unwrap()
                .trim(),
            "1"
        );
    }
}

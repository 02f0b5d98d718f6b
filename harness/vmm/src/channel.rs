//! What a running guest sends back to the host, and the bounded channel it travels on.
//! The VMM produces these; the harness's other backends (QEMU, Xen) send the same messages
//! on the same channel, so every session reads one stream whatever runs the guest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// VM exits the VMM handled, by reason, at one point in time.
pub type ExitCounts = BTreeMap<&'static str, u64>;

/// How a guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest reported a status through the exit port or its shutdown reason.
    Exited { code: u32 },
    /// The guest shut the vCPU down without a status: a triple fault, with its registers.
    TripleFault { detail: String },
    /// The hypervisor or VMM could not go on (emulation failure, failed entry, VMM died).
    Failed { detail: String },
    /// The host stopped it (timeout, Ctrl-C).
    Stopped,
}

/// What a running guest sends back, in order.
#[derive(Clone, Debug)]
pub enum GuestMessage {
    /// Console output, with the exit counters as they were when it was written (where the
    /// backend counts exits), so exits can be charged to the workload that caused them.
    Console {
        bytes: Vec<u8>,
        exits: Option<ExitCounts>,
    },
    /// Something the host saw about the stream itself (a console that had to be
    /// reattached), for the record of whatever was running.
    Notice(String),
    /// The last message of every session.
    Ended(GuestEnd),
}

/// Messages a backend may have in flight to its session. A console message is at most a
/// read or an exit's worth of bytes (a page or so), so a guest that floods the console
/// holds at most a few MiB of the host's memory; past that its VMM or reader waits.
pub const CHANNEL_CAPACITY: usize = 256;
/// How long a backend waits before it looks again at a full channel.
const FULL_WAIT: Duration = Duration::from_millis(1);

/// A backend's end of the bounded console channel to its session.
#[derive(Clone, Debug)]
pub struct GuestSender {
    tx: SyncSender<GuestMessage>,
    /// Set when the host stops the session: it then reads no more than what is queued.
    stop: Arc<AtomicBool>,
}

/// The bounded channel from a backend to its session; `stop` is the flag the session's
/// `stop` sets before it waits for the backend's threads.
pub fn guest_channel(stop: Arc<AtomicBool>) -> (GuestSender, Receiver<GuestMessage>) {
    let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
    (GuestSender { tx, stop }, rx)
}

impl GuestSender {
    /// Sends `message`, waiting while the channel is full: a guest that prints faster than
    /// the host reads is slowed, never buffered without limit. Once the host has stopped
    /// the session, a full channel is not waited on (nobody would empty it, and `stop`
    /// waits for this thread): the message is dropped, and the session, which has stopped
    /// the guest itself, takes the closed channel as the guest's `Stopped` end. Returns
    /// whether the message was sent.
    pub fn send(&self, message: GuestMessage) -> bool {
        let mut message = message;
        loop {
            match self.tx.try_send(message) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if self.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    message = back;
                    std::thread::sleep(FULL_WAIT);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_makes_the_backend_wait_until_read_or_stopped() {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = guest_channel(stop.clone());
        let console = || GuestMessage::Console {
            bytes: vec![b'\n'; 8],
            exits: None,
        };
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let writer = std::thread::spawn(move || {
            let delivered = (0..CHANNEL_CAPACITY * 4)
                .filter(|_| tx.send(console()))
                .inspect(|_| {
                    counter.fetch_add(1, Ordering::SeqCst);
                })
                .count();
            (delivered, tx.send(GuestMessage::Ended(GuestEnd::Stopped)))
        });
        std::thread::sleep(Duration::from_millis(200));
        // Bounded: with nobody reading, the writer waits once the channel is full.
        assert_eq!(sent.load(Ordering::SeqCst), CHANNEL_CAPACITY);
        assert!(
            !writer.is_finished(),
            "the writer waits instead of dropping"
        );
        // Read on, everything arrives, the end last.
        let mut got = 0;
        while got < CHANNEL_CAPACITY * 4 {
            if let Ok(GuestMessage::Console { .. }) = rx.recv_timeout(Duration::from_secs(5)) {
                got += 1;
            }
        }
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(GuestMessage::Ended(_))
        ));
        assert_eq!(writer.join().unwrap(), (CHANNEL_CAPACITY * 4, true));

        // Stopped with a full channel: the writer gives up instead of blocking `stop`.
        let (tx, rx) = guest_channel(stop.clone());
        let writer =
            std::thread::spawn(move || (0..CHANNEL_CAPACITY * 2).all(|_| tx.send(console())));
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Release);
        assert!(!writer.join().unwrap(), "later messages were dropped");
        assert_eq!(rx.try_iter().count(), CHANNEL_CAPACITY);
    }
}

//! libvirt's lifecycle events for every domain of the backend, from one long-lived
//! `virsh event --event lifecycle --loop` (all domains) started with the backend, not a
//! watcher per boot: a boot then costs one `virsh create` and nothing else before the
//! guest runs (the watcher process, its connection and its registration are off the
//! define-to-first-result path, and it is registered long before the first domain exists).
//!
//! Each boot registers its domain's name before `virsh create`; the watcher's reader
//! hands the domain's `Stopped` line to that registration. Should the watcher die, the
//! registrations see their channel close (the session says so), and the next boot starts
//! a new watcher.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use super::virsh::{parse_event, Stopped, Virsh, VirshError};

/// Domains at most registered at once (one per live session; a bound, not a tuning).
const MAX_WAITING: usize = 1024;

#[derive(Debug, Default)]
struct State {
    child: Option<Child>,
    /// Which watcher the registrations belong to: a reader of an older one that ends
    /// leaves a newer one's registrations alone.
    generation: u64,
    waiting: HashMap<String, Sender<Stopped>>,
}

/// The backend's lifecycle watcher.
#[derive(Debug)]
pub struct Events {
    virsh: Virsh,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Events {
    /// Starts the watcher on `virsh`'s connection.
    pub fn start(virsh: Virsh) -> Result<Self, VirshError> {
        let events = Events {
            virsh,
            state: Arc::new(Mutex::new(State::default())),
        };
        let mut state = lock(&events.state);
        events.respawn(&mut state)?;
        drop(state);
        Ok(events)
    }

    fn respawn(&self, state: &mut State) -> Result<(), VirshError> {
        if let Some(mut old) = state.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let mut child = self
            .virsh
            .spawn(&["event", "--event", "lifecycle", "--loop"])?;
        state.generation += 1;
        let stdout = child.stdout.take();
        state.child = Some(child);
        let shared = self.state.clone();
        let generation = state.generation;
        std::thread::spawn(move || read(stdout, &shared, generation));
        Ok(())
    }

    /// Registers `name` before its domain is created; the receiver gets how it stopped.
    /// A watcher that has died since the last boot is started again first.
    pub fn register(&self, name: &str) -> Result<Receiver<Stopped>, VirshError> {
        let mut state = lock(&self.state);
        let alive = state
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !alive {
            self.respawn(&mut state)?;
        }
        if state.waiting.len() >= MAX_WAITING {
            return Err(VirshError::Spawn(format!(
                "more than {MAX_WAITING} domains watched at once"
            )));
        }
        let (tx, rx) = channel();
        state.waiting.insert(name.to_string(), tx);
        Ok(rx)
    }

    /// Forgets `name` (its session has ended).
    pub fn unregister(&self, name: &str) {
        lock(&self.state).waiting.remove(name);
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(mut child) = state.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        state.waiting.clear();
    }
}

/// Hands each `Stopped` line to its domain's registration; when the watcher ends, closes
/// every registration of its generation.
fn read(stdout: Option<ChildStdout>, state: &Mutex<State>, generation: u64) {
    if let Some(out) = stdout {
        // Lines are bounded: virsh writes one short line per event, and a longer one
        // (another client's domain with a huge name) is cut at the bound.
        let mut reader = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(4096).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, stopped)) = parse_event(text.trim_end()) else {
                continue;
            };
            if let Some(tx) = lock(state).waiting.remove(name) {
                let _ = tx.send(stopped);
            }
        }
    }
    let mut state = lock(state);
    if state.generation == generation {
        state.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_reaches_its_own_domain_only_and_the_end_closes_the_rest() {
        let state = Mutex::new(State {
            generation: 1,
            ..State::default()
        });
        let (tx_a, rx_a) = channel();
        let (tx_b, rx_b) = channel();
        lock(&state).waiting.insert("hvbench-1-1".into(), tx_a);
        lock(&state).waiting.insert("hvbench-1-2".into(), tx_b);
        let mut child = std::process::Command::new("printf")
            .arg(
                "event 'lifecycle' for domain 'hvbench-1-1': Resumed Unpaused\n\
                 event 'lifecycle' for domain 'other': Stopped Failed\n\
                 event 'lifecycle' for domain 'hvbench-1-1': Stopped Failed\n",
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        read(child.stdout.take(), &state, 1);
        let _ = child.wait();
        assert_eq!(rx_a.try_recv(), Ok(Stopped::Failed));
        // The watcher ended before hvbench-1-2 stopped: its channel is closed.
        assert_eq!(
            rx_b.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        );
        assert!(lock(&state).waiting.is_empty());
    }

    #[test]
    fn an_older_watcher_ending_leaves_a_newer_ones_registrations() {
        let state = Mutex::new(State {
            generation: 2,
            ..State::default()
        });
        let (tx, rx) = channel();
        lock(&state).waiting.insert("hvbench-1-3".into(), tx);
        read(None, &state, 1);
        assert_eq!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty));
    }
}

//! `mem.ksm`'s guests: one `hvbench vmm` process each, so that procfs reports each VMM's
//! memory on its own. Their consoles come back as protocol events on one channel; their
//! doorbells are rung through their stdin. None outlives hvbench: the kernel kills each
//! when the thread that started it exits (PR_SET_PDEATHSIG), each stops when its stdin
//! closes, and dropping the fleet kills and reaps whatever is left.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use workloads::protocol::Event;

use super::MemKsmError;
use crate::console::{printable, ConsoleLine, LineAssembler};

/// What one guest's console said, in order.
#[derive(Debug)]
pub enum ConsoleEvent {
    Event(Event),
    /// A result line that did not decode (the guest is untrusted).
    Damaged(String),
    /// The console closed: the VMM process is ending.
    Closed,
}

/// How each guest is started.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// The hvbench binary that runs `vmm`.
    pub exe: PathBuf,
    pub guest_image: Option<PathBuf>,
    pub memory_mib: u32,
    /// The VMM stops the guest after this long, whatever happens.
    pub timeout: Duration,
    /// vCPUs of each guest (`hvbench vmm --vcpus`).
    pub vcpus: u32,
    /// Guest RAM MADV_MERGEABLE (KSM's guests).
    pub mergeable: bool,
}

#[derive(Debug)]
struct Member {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
}

/// The running guests.
#[derive(Debug)]
pub struct Fleet {
    members: Vec<Member>,
    events: Receiver<(usize, ConsoleEvent)>,
}

/// Most bytes of a VMM's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// The hvbench binary to start VMMs from: `HVBENCH_EXE` where set (for callers that are
/// not hvbench themselves), else this executable.
pub fn hvbench_exe() -> Result<PathBuf, MemKsmError> {
    match std::env::var_os("HVBENCH_EXE") {
        Some(path) => Ok(PathBuf::from(path)),
        None => std::env::current_exe().map_err(|source| MemKsmError::Io {
            what: "finding hvbench's own executable".into(),
            source,
        }),
    }
}

/// What one console line says: an event, a damaged result line, or nothing (a line that
/// is not the protocol's). Every guest text is escaped, as for any other guest.
pub fn console_event(line: ConsoleLine) -> Option<ConsoleEvent> {
    match line {
        ConsoleLine::Line(bytes) => match crate::console::decode(&bytes) {
            Ok(Some(event)) => Some(ConsoleEvent::Event(event)),
            Ok(None) => None,
            Err(e) => Some(ConsoleEvent::Damaged(format!(
                "{e}: {}",
                printable(&bytes[..bytes.len().min(120)])
            ))),
        },
        ConsoleLine::Overlong { head, length } => head
            .starts_with(workloads::protocol::PREFIX.as_bytes())
            .then(|| ConsoleEvent::Damaged(format!("a result line of {length} bytes"))),
    }
}

fn read_console(index: usize, stdout: impl Read, tx: SyncSender<(usize, ConsoleEvent)>) {
    let mut stdout = stdout;
    let mut lines = LineAssembler::new();
    let mut buf = [0u8; 4096];
    let send = |line: ConsoleLine| match console_event(line) {
        Some(event) => tx.send((index, event)).is_ok(),
        None => true,
    };
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for line in lines.push(&buf[..n]) {
                    if !send(line) {
                        return;
                    }
                }
            }
        }
    }
    if let Some(rest) = lines.finish() {
        send(rest);
    }
    let _ = tx.send((index, ConsoleEvent::Closed));
}

fn keep_stderr(stderr: impl Read, tail: Arc<Mutex<Vec<u8>>>) {
    let mut stderr = stderr;
    let mut buf = [0u8; 1024];
    while let Ok(n) = stderr.read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Ok(mut t) = tail.lock() {
            t.extend_from_slice(&buf[..n]);
            let excess = t.len().saturating_sub(STDERR_TAIL);
            t.drain(..excess);
        }
    }
}

fn spawn_one(
    spec: &GuestSpec,
    cmdline: &str,
    index: usize,
    tx: SyncSender<(usize, ConsoleEvent)>,
) -> Result<Member, MemKsmError> {
    let mut command = Command::new(&spec.exe);
    command
        .args(["vmm", "--doorbell-stdin", "--cmdline", cmdline])
        .args(["--vcpus", &spec.vcpus.to_string()])
        .args(["--memory-mib", &spec.memory_mib.to_string()])
        .args(["--timeout-s", &spec.timeout.as_secs().max(1).to_string()]);
    if let Some(image) = &spec.guest_image {
        command.arg("--guest").arg(image);
    }
    if spec.mergeable {
        command.arg("--mergeable");
    }
    // A process group of its own: Ctrl-C reaches hvbench alone, which then stops the
    // guests and restores KSM in order.
    command
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::child::die_with_this_thread(&mut command);
    let mut child = command.spawn().map_err(|source| MemKsmError::Io {
        what: format!("starting {} vmm", spec.exe.display()),
        source,
    })?;
    let stdin = child.stdin.take();
    let stderr_tail = Arc::new(Mutex::new(Vec::new()));
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || read_console(index, stdout, tx));
    }
    if let Some(stderr) = child.stderr.take() {
        let tail = stderr_tail.clone();
        std::thread::spawn(move || keep_stderr(stderr, tail));
    }
    Ok(Member {
        child,
        stdin,
        stderr_tail,
    })
}

impl Fleet {
    /// Starts one VMM per command line. Call from the thread that also drops the fleet:
    /// the VMMs die with that thread.
    pub fn spawn(spec: &GuestSpec, cmdlines: &[String]) -> Result<Self, MemKsmError> {
        // Bounded: a guest that floods its console makes its reader wait (and so its
        // VMM, on a full pipe); dropping the fleet drops the receiver and ends the readers.
        let (tx, events) = sync_channel(crate::console::CHANNEL_CAPACITY);
        let mut fleet = Fleet {
            members: Vec::new(),
            events,
        };
        for (index, cmdline) in cmdlines.iter().enumerate() {
            // On an error the VMMs already started are killed as `fleet` drops.
            fleet
                .members
                .push(spawn_one(spec, cmdline, index, tx.clone())?);
        }
        Ok(fleet)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.child.id()).collect()
    }

    /// Sets the value guest `index` reads from its doorbell.
    pub fn ring(&mut self, index: usize, value: u32) -> Result<(), MemKsmError> {
        let stdin = self
            .members
            .get_mut(index)
            .and_then(|m| m.stdin.as_mut())
            .ok_or(MemKsmError::Guest {
                index,
                problem: "its VMM has no input to ring the doorbell through".into(),
            })?;
        writeln!(stdin, "ring {value}")
            .and_then(|()| stdin.flush())
            .map_err(|e| MemKsmError::Guest {
                index,
                problem: format!("ringing its doorbell: {e}"),
            })
    }

    /// The next console event of any guest.
    pub fn next_event(&self, timeout: Duration) -> Result<(usize, ConsoleEvent), RecvTimeoutError> {
        self.events.recv_timeout(timeout)
    }

    /// The last lines guest `index`'s VMM wrote to stderr.
    pub fn stderr_tail(&self, index: usize) -> String {
        self.members
            .get(index)
            .and_then(|m| m.stderr_tail.lock().ok().map(|t| printable(&t)))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for every VMM to exit; returns their statuses (`None` for
    /// those still running, which the drop kills).
    pub fn wait_all(&mut self, timeout: Duration) -> Vec<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses: Vec<Option<ExitStatus>> = self
                .members
                .iter_mut()
                .map(|m| m.child.try_wait().ok().flatten())
                .collect();
            if statuses.iter().all(Option::is_some) || Instant::now() >= deadline {
                return statuses;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            // Closing stdin asks the VMM to stop; SIGKILL makes sure.
            m.stdin = None;
            if let Ok(None) = m.child.try_wait() {
                let _ = m.child.kill();
            }
            let _ = m.child.wait();
        }
    }
}

/// Whether `path` looks like an hvbench binary that has the `vmm` command (a test
/// harness calling the library in-process is not one).
pub fn runs_vmm(path: &Path) -> bool {
    Command::new(path)
        .args(["vmm", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--doorbell-stdin")
        })
        .unwrap_or(false)
}

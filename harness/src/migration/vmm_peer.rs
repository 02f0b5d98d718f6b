//! One `mig.*` run on our VMM: two `hvbench vmm` processes on this host, the destination
//! listening on a Unix socket, the source booting the guest, pausing it once for the
//! ruler's calibration and migrating it. Both consoles are read here, every line stamped
//! with CLOCK_REALTIME as it arrives; both stderrs are read for the processes' JSON lines.
//! Neither process outlives this run: each dies with the thread that started it
//! (PR_SET_PDEATHSIG), and the guard kills and reaps them and removes the socket on
//! every way out.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use serde_json::Value;
use workloads::protocol::{decode_line, LineKind, Status};

use super::ruler::Beat;
use super::{realtime_ns, FAILED, INCOMING, LISTENING, PAUSED, REPORT};
use crate::console::{printable, ConsoleLine, LineAssembler};

/// Which pair of VMMs.
#[derive(Clone, Debug)]
pub enum PeerKind {
    /// Two `hvbench vmm` processes.
    Vmm {
        exe: PathBuf,
        guest_image: Option<PathBuf>,
    },
    /// Two QEMUs with these arguments (machine, memory, kernel, command line, console on
    /// stdout); the destination gets `-incoming`, the source a QMP socket.
    Qemu { binary: PathBuf, args: Vec<String> },
}

/// How one run is set up.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub kind: PeerKind,
    pub memory_mib: u32,
    /// vCPUs of our VMM's guest (more than one: the in-kernel irqchip, which migrates
    /// with it); QEMU's arguments carry their own.
    pub vcpus: u32,
    pub cmdline: String,
    /// A backstop for both VMMs (each stops its guest after this).
    pub timeout: Duration,
    /// When to migrate and when to pause (for `pause`), after the first heartbeat.
    pub migrate_at: Duration,
    pub pause_at: Duration,
    pub pause: Duration,
    pub downtime_limit: Duration,
    pub max_rounds: u32,
}

/// Which VMM a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// What the two processes said.
#[derive(Debug, Default)]
pub struct PeerRun {
    pub beats: Vec<Beat>,
    /// The guest's other notes (checksums, pages), from whichever side printed them.
    pub notes: BTreeMap<String, String>,
    /// The guest's result line.
    pub result: Option<(Status, Option<String>)>,
    /// Protocol lines that did not decode.
    pub damaged: u32,
    pub report: Option<Value>,
    pub incoming: Option<Value>,
    pub pause: Option<Value>,
    /// The source's `migration-error` lines (the migration, or the pause, failed).
    pub errors: Vec<String>,
    pub source_status: Option<i32>,
    pub destination_status: Option<i32>,
    pub stderr_tails: [String; 2],
}

/// Lines kept of a VMM's stderr for error messages.
const STDERR_LINES: usize = 20;
/// Longest stderr line taken (the JSON report of a long migration is the longest).
const MAX_STDERR_LINE: usize = 1 << 20;
/// Guest notes kept.
const MAX_NOTES: usize = 64;

pub(crate) enum Event {
    Console(u64, Vec<u8>),
    Stderr(Side, String),
    Closed,
}

/// The two VMMs; killed, reaped and cleaned up on drop.
struct Pair {
    children: Vec<Child>,
    socket: PathBuf,
    qmp: Option<PathBuf>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(qmp) = &self.qmp {
            let _ = std::fs::remove_file(qmp);
        }
    }
}

pub(crate) fn read_console(out: impl Read, tx: SyncSender<Event>) {
    let mut out = out;
    let mut lines = LineAssembler::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        let at = realtime_ns();
        for line in lines.push(&buf[..n]) {
            let bytes = match line {
                ConsoleLine::Line(bytes) => bytes,
                ConsoleLine::Overlong { head, .. } => head,
            };
            if tx.send(Event::Console(at, bytes)).is_err() {
                return;
            }
        }
    }
    let _ = tx.send(Event::Closed);
}

pub(crate) fn read_stderr(side: Side, err: impl Read, tx: SyncSender<Event>) {
    let mut reader = BufReader::new(err.take(64 << 20));
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(MAX_STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if tx.send(Event::Stderr(side, text)).is_err() {
                    return;
                }
            }
        }
    }
}

pub(crate) fn spawn(
    program: &std::path::Path,
    args: &[String],
    side: Side,
    tx: &SyncSender<Event>,
) -> Result<Child, String> {
    let mut command = Command::new(program);
    command.args(args);
    command
        .process_group(0)
        .stdin(if side == Side::Source {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe. The VMM dies with the thread that
    // started it; if hvbench died before the prctl took effect, it refuses to start.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid().cast_unsigned() != parent {
                return Err(std::io::Error::other("hvbench exited"));
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_console(out, tx));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_stderr(side, err, tx));
    }
    Ok(child)
}

/// The arguments of `hvbench vmm` common to both sides.
fn vmm_common(spec: &PeerSpec, guest_image: Option<&PathBuf>) -> Vec<String> {
    let mut args = vec![
        "vmm".to_string(),
        "--timeout-s".into(),
        spec.timeout.as_secs().max(1).to_string(),
    ];
    if let Some(image) = guest_image {
        args.push("--guest".into());
        args.push(image.display().to_string());
    }
    args
}

fn source_args(spec: &PeerSpec, socket: &str) -> Vec<String> {
    let ms = |d: Duration| d.as_millis().to_string();
    [
        "--cmdline".into(),
        spec.cmdline.clone(),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--migrate-to".into(),
        socket.into(),
        "--downtime-ms".into(),
        ms(spec.downtime_limit),
        "--max-rounds".into(),
        spec.max_rounds.to_string(),
        "--control-stdin".into(),
    ]
    .into()
}

/// Runs the pair to its end (or `limit`, or an interrupt) and gathers what they said.
pub fn run(spec: &PeerSpec, limit: Duration, interrupted: &AtomicBool) -> Result<PeerRun, String> {
    let base = std::env::temp_dir().join(format!(
        "hvbench-mig-{}-{}",
        std::process::id(),
        realtime_ns()
    ));
    let socket = base.with_extension("sock");
    let address = format!("unix:{}", socket.display());
    let (tx, rx) = sync_channel(crate::console::CHANNEL_CAPACITY);
    let mut pair = Pair {
        children: Vec::new(),
        socket,
        qmp: None,
    };
    let mut run = PeerRun::default();
    let control = match &spec.kind {
        PeerKind::Vmm { exe, guest_image } => {
            let mut dest = vmm_common(spec, guest_image.as_ref());
            dest.extend(["--incoming".to_string(), address.clone()]);
            pair.children
                .push(spawn(exe, &dest, Side::Destination, &tx)?);
            wait_listening(&rx, &mut run, Duration::from_secs(10))?;
            let mut source = vmm_common(spec, guest_image.as_ref());
            source.extend(source_args(spec, &address));
            pair.children.push(spawn(exe, &source, Side::Source, &tx)?);
            let stdin = pair.children.last_mut().and_then(|c| c.stdin.take());
            Control::new(spec, Sink::Stdin(stdin))
        }
        PeerKind::Qemu { binary, args } => {
            let qmp = base.with_extension("qmp");
            pair.qmp = Some(qmp.clone());
            let control = super::qemu_peer::start(
                spec,
                binary,
                args,
                &address,
                &pair.socket,
                &qmp,
                &tx,
                &mut pair.children,
            )?;
            Control::new(spec, Sink::Thread(control))
        }
    };
    drop(tx);
    collect(&rx, &mut run, &mut pair, control, limit, interrupted);
    run.beats.sort_by_key(|b| b.at_ns);
    Ok(run)
}

fn wait_listening(rx: &Receiver<Event>, run: &mut PeerRun, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Stderr(Side::Destination, line)) if line.starts_with(LISTENING) => {
                return Ok(())
            }
            Ok(event) => take(event, run),
            Err(_) => {
                return Err(format!(
                    "the destination VMM did not listen within {limit:?}: {}",
                    run.stderr_tails[1]
                ))
            }
        }
    }
}

/// Where the host's triggers go: the source VMM's stdin, or the thread that speaks QMP
/// to the source QEMU.
pub(crate) enum Sink {
    Stdin(Option<ChildStdin>),
    Thread(std::sync::mpsc::Sender<String>),
    Closed,
}

impl Sink {
    fn send(&mut self, line: &str) -> bool {
        match self {
            Sink::Stdin(Some(s)) => writeln!(s, "{line}").and_then(|()| s.flush()).is_ok(),
            Sink::Thread(tx) => tx.send(line.to_string()).is_ok(),
            Sink::Stdin(None) | Sink::Closed => false,
        }
    }
}

/// The host's triggers, timed from the guest's first heartbeat.
struct Control {
    sink: Sink,
    /// (after the first beat, the line), in order; sent as their time comes.
    due: Vec<(Duration, String)>,
}

impl Control {
    fn new(spec: &PeerSpec, sink: Sink) -> Self {
        Control {
            sink,
            due: vec![
                (spec.pause_at, format!("pause {}", spec.pause.as_millis())),
                (spec.migrate_at, "migrate".into()),
            ],
        }
    }

    /// Sends what is due `since` the first beat; a failed write is recorded.
    fn tick(&mut self, since: Duration, run: &mut PeerRun) {
        while self.due.first().is_some_and(|(at, _)| *at <= since) {
            let (_, line) = self.due.remove(0);
            if !self.sink.send(&line) {
                run.errors
                    .push(format!("could not tell the source VMM `{line}`"));
            }
        }
    }
}

fn collect(
    rx: &Receiver<Event>,
    run: &mut PeerRun,
    pair: &mut Pair,
    mut control: Control,
    limit: Duration,
    interrupted: &AtomicBool,
) {
    let deadline = Instant::now() + limit;
    let mut first_beat: Option<Instant> = None;
    let mut finished: Option<Instant> = None;
    loop {
        if first_beat.is_none() && !run.beats.is_empty() {
            first_beat = Some(Instant::now());
        }
        if let Some(t0) = first_beat {
            control.tick(t0.elapsed(), run);
        }
        if interrupted.load(Ordering::Relaxed) || Instant::now() >= deadline {
            run.errors.push(if interrupted.load(Ordering::Relaxed) {
                "interrupted".into()
            } else {
                format!("the VMMs had not finished after {limit:?}")
            });
            break;
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(event) => take(event, run),
            // Every reader has finished: both processes closed their output.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if control.due.is_empty() && run.result.is_some() => {
                // The guest is done: closing the source's control input lets it end, and
                // a destination still waiting (the migration failed) is not waited for.
                control.sink = Sink::Closed;
                let done = *finished.get_or_insert_with(Instant::now);
                if done.elapsed() > Duration::from_millis(500) {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    for (i, child) in pair.children.iter_mut().enumerate() {
        let status = child.try_wait().ok().flatten().and_then(|s| s.code());
        match i {
            0 => run.destination_status = status,
            _ => run.source_status = status,
        }
    }
}

fn take(event: Event, run: &mut PeerRun) {
    match event {
        Event::Console(at, line) => take_console(at, &line, run),
        Event::Stderr(side, line) => take_stderr(side, line, run),
        Event::Closed => {}
    }
}

pub(crate) fn take_console(at_ns: u64, line: &[u8], run: &mut PeerRun) {
    let raw = match decode_line(line) {
        Ok(Some(raw)) => raw,
        Ok(None) => return,
        Err(_) => {
            run.damaged += 1;
            return;
        }
    };
    match raw.kind {
        LineKind::Note if raw.get("k") == Some("beat") => {
            match (raw.number("v"), raw.number("pages")) {
                (Ok(seq), Ok(pages)) => run.beats.push(Beat { at_ns, seq, pages }),
                _ => run.damaged += 1,
            }
        }
        LineKind::Note => {
            if let (Some(k), Some(v)) = (raw.get("k"), raw.get("v")) {
                if run.notes.len() < MAX_NOTES && k.len() <= 64 && v.len() <= 128 {
                    run.notes.insert(k.to_string(), v.to_string());
                }
            }
        }
        LineKind::Result => match raw.status() {
            Ok(status) => {
                let reason = raw.get("reason").map(|r| r.chars().take(400).collect());
                run.result = Some((status, reason));
            }
            Err(_) => run.damaged += 1,
        },
        LineKind::Skip => {
            let reason = raw.get("reason").map(|r| r.chars().take(400).collect());
            run.result = Some((Status::Skip, reason));
        }
        _ => {}
    }
}

fn take_stderr(side: Side, line: String, run: &mut PeerRun) {
    let json = |rest: &str| serde_json::from_str::<Value>(rest).ok();
    if let Some(rest) = line.strip_prefix(REPORT) {
        run.report = json(rest);
    } else if let Some(rest) = line.strip_prefix(INCOMING) {
        run.incoming = json(rest);
    } else if let Some(rest) = line.strip_prefix(PAUSED) {
        run.pause = json(rest);
    } else if let Some(rest) = line.strip_prefix(FAILED) {
        run.errors
            .push(printable(rest.as_bytes()).chars().take(600).collect());
    }
    let tail = &mut run.stderr_tails[usize::from(side == Side::Destination)];
    let mut lines: Vec<&str> = tail.lines().collect();
    let kept = printable(line.as_bytes())
        .chars()
        .take(300)
        .collect::<String>();
    lines.push(&kept);
    let skip = lines.len().saturating_sub(STDERR_LINES);
    *tail = lines[skip..].join("\n");
}

//! One `mig.*` run on our VMM or QEMU: the destination listening on a Unix socket, the
//! source booting the guest, pausing it once for the ruler's calibration and migrating it
//! (our VMM: two `hvbench vmm` processes; QEMU: `qemu_peer` over QMP). Neither process
//! outlives this run: the guard kills and reaps them and removes the sockets on every way
//! out.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::peer::{spawn, take, Event, PeerKind, PeerRun, PeerSpec, Side};
use super::{realtime_ns, LISTENING};

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

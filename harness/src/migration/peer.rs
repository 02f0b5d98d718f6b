//! What a migration peer pair is and says: the spec, the two sides' events (console lines
//! stamped with CLOCK_REALTIME as they arrive; the processes' JSON lines on stderr), and
//! what a run gathered from them. Each process dies with the thread that started it
//! (PR_SET_PDEATHSIG).
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use serde_json::Value;
use workloads::protocol::{decode_line, LineKind, Status};

use super::ruler::Beat;
use super::{realtime_ns, FAILED, INCOMING, PAUSED, REPORT};
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
/// Heartbeats kept: an honest guest beats at most every 1 ms for at most 600 s (the
/// table's bounds), 600,000 beats; past this a guest is flooding.
const MAX_BEATS: usize = 1 << 20;
/// `migration-error` lines kept.
const MAX_ERRORS: usize = 16;
/// Longest reason, error line and stderr tail line kept, in characters.
const MAX_REASON: usize = 400;
const MAX_ERROR_LINE: usize = 600;
const MAX_TAIL_LINE: usize = 300;

pub(crate) enum Event {
    Console(u64, Vec<u8>),
    Stderr(Side, String),
    Closed,
}

/// Reads a console's output into lines (cut as `LineAssembler` cuts them), each stamped
/// with CLOCK_REALTIME as its read arrived, and hands them to `take` until it says stop.
pub(crate) fn stamp_lines(mut out: impl Read, mut take: impl FnMut(u64, Vec<u8>) -> bool) {
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
            if !take(at, bytes) {
                return;
            }
        }
    }
}

pub(crate) fn read_console(out: impl Read, tx: SyncSender<Event>) {
    stamp_lines(out, |at, bytes| tx.send(Event::Console(at, bytes)).is_ok());
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
    crate::child::die_with_this_thread(&mut command);
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

pub(crate) fn take(event: Event, run: &mut PeerRun) {
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
            run.damaged = run.damaged.saturating_add(1);
            return;
        }
    };
    match raw.kind {
        LineKind::Note if raw.get("k") == Some("beat") => {
            match (raw.number("v"), raw.number("pages")) {
                (Ok(seq), Ok(pages)) if run.beats.len() < MAX_BEATS => {
                    run.beats.push(Beat { at_ns, seq, pages })
                }
                (Ok(_), Ok(_)) => {}
                _ => run.damaged = run.damaged.saturating_add(1),
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
                let reason = raw
                    .get("reason")
                    .map(|r| r.chars().take(MAX_REASON).collect());
                run.result = Some((status, reason));
            }
            Err(_) => run.damaged = run.damaged.saturating_add(1),
        },
        LineKind::Skip => {
            let reason = raw
                .get("reason")
                .map(|r| r.chars().take(MAX_REASON).collect());
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
        if run.errors.len() < MAX_ERRORS {
            run.errors.push(
                printable(rest.as_bytes())
                    .chars()
                    .take(MAX_ERROR_LINE)
                    .collect(),
            );
        }
    }
    let tail = &mut run.stderr_tails[usize::from(side == Side::Destination)];
    let mut lines: Vec<&str> = tail.lines().collect();
    let kept = printable(line.as_bytes())
        .chars()
        .take(MAX_TAIL_LINE)
        .collect::<String>();
    lines.push(&kept);
    let skip = lines.len().saturating_sub(STDERR_LINES);
    *tail = lines[skip..].join("\n");
}

#[cfg(test)]
mod tests {
    use workloads::protocol::LineBuilder;

    use super::*;

    fn line(kind: LineKind, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = LineBuilder::new(kind);
        for (k, v) in fields {
            b.text(k, v);
        }
        // As `stamp_lines` hands them on: without the newline.
        b.finish().trim_ascii_end().to_vec()
    }

    /// What a hostile guest prints during a migration is kept within bounds: notes,
    /// their keys and values, its reason, and its heartbeats.
    #[test]
    fn a_guests_console_lines_are_bounded() {
        let mut run = PeerRun::default();
        for i in 0..100 {
            take_console(
                0,
                &line(LineKind::Note, &[("k", &format!("n{i}")), ("v", "1")]),
                &mut run,
            );
        }
        assert_eq!(run.notes.len(), MAX_NOTES);
        let mut run = PeerRun::default();
        let long = "x".repeat(129);
        take_console(
            0,
            &line(LineKind::Note, &[("k", &"k".repeat(65)), ("v", "1")]),
            &mut run,
        );
        take_console(
            0,
            &line(LineKind::Note, &[("k", "k"), ("v", &long)]),
            &mut run,
        );
        assert!(run.notes.is_empty(), "{:?}", run.notes);
        let reason = "r".repeat(MAX_REASON * 3);
        let result = [
            ("w", "mig.dirty"),
            ("status", "error"),
            ("reason", reason.as_str()),
        ];
        take_console(0, &line(LineKind::Result, &result), &mut run);
        let kept = run.result.as_ref().and_then(|r| r.1.as_ref()).unwrap();
        assert!(
            kept.len() <= MAX_REASON && !kept.is_empty(),
            "{}",
            kept.len()
        );
        take_console(0, b"@hvb1 note k=beat v=1 ~00000000", &mut run);
        assert_eq!(run.damaged, 1);
        let beat = line(LineKind::Note, &[("k", "beat"), ("v", "7"), ("pages", "1")]);
        for _ in 0..MAX_BEATS + 10 {
            take_console(0, &beat, &mut run);
        }
        assert_eq!(run.beats.len(), MAX_BEATS);
    }

    /// A VMM's stderr: lines cut at 1 MiB, 64 MiB read at most, the tails and the
    /// migration errors kept short.
    #[test]
    fn a_vmms_stderr_is_bounded() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let reader = std::thread::spawn(move || {
            read_stderr(Side::Source, std::io::repeat(b'x'), tx);
        });
        let mut lines = 0;
        for event in rx {
            let Event::Stderr(_, text) = event else {
                panic!("not a stderr line");
            };
            assert!(text.len() <= MAX_STDERR_LINE);
            lines += 1;
        }
        reader.join().unwrap();
        assert_eq!(lines, (64 << 20) / MAX_STDERR_LINE);
        let mut run = PeerRun::default();
        for _ in 0..100 {
            take_stderr(
                Side::Source,
                format!("{FAILED}{}", "e".repeat(5000)),
                &mut run,
            );
        }
        assert_eq!(run.errors.len(), MAX_ERRORS);
        assert!(run
            .errors
            .iter()
            .all(|e| e.chars().count() <= MAX_ERROR_LINE));
        let tail = &run.stderr_tails[0];
        assert_eq!(tail.lines().count(), STDERR_LINES);
        assert!(tail.lines().all(|l| l.chars().count() <= MAX_TAIL_LINE));
    }
}

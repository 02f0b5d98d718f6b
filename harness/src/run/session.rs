//! One boot of the guest, driven to its end: console bytes -> lines -> events -> one
//! outcome per workload. The guest is untrusted: a damaged line, a line out of order, a
//! crash, a hang or a VMM failure each end as a status with its reason, never a panic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use workloads::abi::ExitCode;
use workloads::protocol::{CrashReport, Event, Hello, Sample, Status};
use workloads::WorkloadId;

use super::plan::ExpectedSeries;
use crate::backend::{ExitCounts, GuestEnd, GuestMessage, GuestSession};
use crate::console::{escape_text, printable, ConsoleLine, LineAssembler};

/// Most samples kept per series: far above any sane `--samples`, so a guest that floods
/// the console cannot exhaust the host's memory.
const MAX_SAMPLES_PER_SERIES: usize = 100_000;
/// Console noise kept for the run log (each line counts at least one byte, so a flood of
/// empty lines is bounded too).
const MAX_NOISE_BYTES: usize = 64 * 1024;
/// Problems of one boot kept for the user; the rest are counted.
pub(crate) const MAX_PROBLEMS: usize = 64;
/// How often a wait is cut short to look at the interrupt flag.
const POLL: Duration = Duration::from_millis(100);
/// The record note where the host says what happened to the console stream.
const HOST_CONSOLE_NOTE: &str = "host_console";
/// Most notes kept per record, so a guest cannot flood one.
pub(crate) const MAX_NOTES: usize = 64;

/// Samples of one metric of one series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesSamples {
    /// (operations, cycles) per measured sample, as the guest timed them.
    pub measured: Vec<(u64, u64)>,
    /// The instruction-count marker pair of each measured sample (`mk`), where the guest
    /// placed one.
    pub markers: Vec<Option<u64>>,
    pub warmup: Vec<(u64, u64)>,
    /// Values already in the metric's unit, measured by the host (host-driven workloads:
    /// seconds, MiB, pages). Used instead of `measured` when not empty.
    pub direct: Vec<f64>,
}

/// Everything one workload produced in one boot.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadOutcome {
    pub workload: WorkloadId,
    pub status: Status,
    pub reason: Option<String>,
    /// Keyed by (metric, series parameters).
    pub series: BTreeMap<(&'static str, String), SeriesSamples>,
    pub notes: BTreeMap<String, String>,
    /// Exits between the workload's `start` and its end, where the backend counts them.
    pub exits: ExitCounts,
    /// Host-observed time series (host-driven workloads), by name, with the metric whose
    /// record carries each.
    pub curves: BTreeMap<String, (String, reports::record::Curve)>,
}

impl WorkloadOutcome {
    /// Adds what the host saw about the console stream to the record's notes.
    pub fn note_console(&mut self, text: &str) {
        let note = self.notes.entry(HOST_CONSOLE_NOTE.to_string()).or_default();
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(text);
    }

    /// Keeps a note, up to `MAX_NOTES` of them.
    pub fn note(&mut self, key: String, value: String) {
        if self.notes.len() < MAX_NOTES {
            self.notes.insert(key, value);
        }
    }

    /// Keeps one of this workload's samples: only of a series the host asked for (any other
    /// is an error and is not kept, so the guest cannot make series without end), at most
    /// `MAX_SAMPLES_PER_SERIES` a series, and measured samples in the order the guest
    /// numbered them (a gap means a lost line).
    pub fn add_sample(&mut self, s: Sample, expected: &ExpectedSeries) {
        if !expected.allows(self.workload, s.metric, &s.params) {
            let text = format!(
                "the guest sent a sample of metric {} for series {:?}, which the host did not ask \
                 for (it asked for {} series); not kept",
                s.metric,
                s.params,
                expected.count(self.workload)
            );
            self.ratchet(Status::Error, text);
            return;
        }
        let series = self.series.entry((s.metric, s.params)).or_default();
        let list = if s.warmup {
            &mut series.warmup
        } else {
            &mut series.measured
        };
        let problem = if list.len() >= MAX_SAMPLES_PER_SERIES {
            Some("guest sent more samples than the host keeps".to_string())
        } else {
            let expected = list.len() as u64;
            list.push((s.ops, s.cycles));
            if !s.warmup {
                series.markers.push(s.marker);
            }
            (!s.warmup && s.index != expected).then(|| {
                format!(
                    "sample index {} arrived where {expected} was expected",
                    s.index
                )
            })
        };
        if let Some(text) = problem {
            self.ratchet(Status::Error, text);
        }
    }

    pub fn new(workload: WorkloadId) -> Self {
        WorkloadOutcome {
            workload,
            status: Status::Success,
            reason: None,
            series: BTreeMap::new(),
            notes: BTreeMap::new(),
            exits: ExitCounts::new(),
            curves: BTreeMap::new(),
        }
    }

    /// Raises the status (never lowers it) and keeps the first reason of the worst status.
    pub fn ratchet(&mut self, status: Status, reason: impl Into<String>) {
        if status > self.status || (status == self.status && self.reason.is_none()) {
            self.reason = Some(reason.into());
        }
        self.status = self.status.ratchet(status);
    }

    pub fn skipped(workload: WorkloadId, reason: impl Into<String>) -> Self {
        Self::failed(workload, Status::Skip, reason)
    }

    /// An outcome that is `status` for `reason` without a sample.
    pub fn failed(workload: WorkloadId, status: Status, reason: impl Into<String>) -> Self {
        let mut o = Self::new(workload);
        o.ratchet(status, reason);
        o
    }
}

/// Limits for one boot.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From boot to the guest's first line.
    pub boot: Duration,
    /// From a workload's `start` to its result.
    pub workload: Duration,
}

/// What one console line is to the host.
pub(crate) enum LineMeaning {
    Event(Event),
    /// Not a protocol line: console output for the run log.
    Noise(Vec<u8>),
    /// A protocol line the host cannot use.
    Problem(String),
}

/// Decodes one line of the guest's console: a protocol line becomes its event; a damaged
/// or overlong protocol line a problem.
pub(crate) fn interpret(line: ConsoleLine) -> LineMeaning {
    let bytes = match line {
        ConsoleLine::Line(bytes) => bytes,
        ConsoleLine::Overlong { head, length } => {
            return if head.starts_with(workloads::protocol::PREFIX.as_bytes()) {
                LineMeaning::Problem(format!(
                    "guest printed a result line of {length} bytes, over the limit of {}",
                    crate::console::LINE_LIMIT
                ))
            } else {
                LineMeaning::Noise(head)
            };
        }
    };
    match crate::console::decode(&bytes) {
        Ok(None) => LineMeaning::Noise(bytes),
        Ok(Some(event)) => LineMeaning::Event(event),
        Err(e) => LineMeaning::Problem(format!(
            "guest printed a damaged result line ({e}): {}",
            printable(&bytes[..bytes.len().min(120)])
        )),
    }
}

/// How one boot went.
#[derive(Debug)]
pub struct BootReport {
    pub hello: Option<Hello>,
    /// When the hello line arrived.
    pub hello_at: Option<Instant>,
    /// Outcomes of the workloads this boot reached, in order.
    pub outcomes: Vec<WorkloadOutcome>,
    /// How the guest ended.
    pub end: GuestEnd,
    /// The guest's own final status line, if it printed one.
    pub guest_status: Option<Status>,
    /// Problems not tied to a workload (damaged lines before the first workload, ...), at
    /// most `MAX_PROBLEMS`; the last says how many more were dropped, if any.
    pub problems: Vec<String>,
    /// Console lines that were not protocol lines, up to `MAX_NOISE_BYTES`.
    pub noise: Vec<String>,
    /// Noise lines and problems seen but not kept.
    pub dropped_noise: u64,
    pub dropped_problems: u64,
    pub interrupted: bool,
}

impl BootReport {
    fn new() -> Self {
        BootReport {
            hello: None,
            hello_at: None,
            outcomes: Vec::new(),
            end: GuestEnd::Stopped,
            guest_status: None,
            problems: Vec::new(),
            noise: Vec::new(),
            dropped_noise: 0,
            dropped_problems: 0,
            interrupted: false,
        }
    }

    /// Keeps a problem of the boot (escaped: it may quote the guest), up to `MAX_PROBLEMS`.
    fn problem(&mut self, text: &str) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(escape_text(text));
        } else {
            self.dropped_problems += 1;
        }
    }

    /// Says what was dropped, once the boot is over.
    fn count_dropped(&mut self) {
        if self.dropped_problems > 0 {
            self.problems.push(format!(
                "{} more problems of this boot were counted but not kept",
                self.dropped_problems
            ));
        }
        if self.dropped_noise > 0 {
            self.problems.push(format!(
                "the guest printed {} more console lines than the host keeps ({} bytes); \
                 they were counted but not kept",
                self.dropped_noise, MAX_NOISE_BYTES
            ));
        }
    }
}

/// The exits counted between two snapshots (`before` taken at a workload's start).
pub(crate) fn difference(after: &ExitCounts, before: &ExitCounts) -> ExitCounts {
    after
        .iter()
        .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD exception",
        _ => "exception",
    }
}

pub(crate) fn describe_crash(c: &CrashReport) -> String {
    format!(
        "guest exception {} ({}) at rip={:#x} cs={:#x} rsp={:#x} error={:#x} cr2={:#x}",
        c.vector,
        exception_name(c.vector),
        c.rip,
        c.cs,
        c.rsp,
        c.error_code,
        c.cr2
    )
}

/// Called with each workload's outcome the moment it is settled, so records reach the
/// disk while the guest runs on.
pub type OutcomeSink<'a> = &'a mut dyn FnMut(&WorkloadOutcome, Option<(&Hello, Instant)>);

struct Driver<'a> {
    plan: &'a [WorkloadId],
    expected: &'a ExpectedSeries,
    sink: OutcomeSink<'a>,
    limits: Limits,
    report: BootReport,
    current: Option<(WorkloadOutcome, ExitCounts, Instant)>,
    noise_bytes: usize,
    last_exits: ExitCounts,
    /// The guest's first line, its hello, or the last settled workload: between workloads
    /// the workload limit counts from here.
    last_progress: Option<Instant>,
    /// Lines the host could not use while the current workload ran.
    current_problems: u64,
    /// The console stream, cut into lines.
    lines: LineAssembler,
}

impl Driver<'_> {
    /// One message of the backend; the guest's end where it says how the guest ended.
    fn message(&mut self, message: GuestMessage) -> Option<GuestEnd> {
        match message {
            GuestMessage::Console { bytes, exits } => {
                if let Some(exits) = exits {
                    self.last_exits = exits;
                }
                for line in self.lines.push(&bytes) {
                    self.line(line);
                }
                None
            }
            GuestMessage::Notice(text) => {
                self.notice(text);
                None
            }
            GuestMessage::Ended(end) => Some(end),
        }
    }

    /// Reads the guest until it ends (`Ok`), or until the host must stop it: `Err` with
    /// what it was waiting for when a limit ran out, `Err(None)` on an interruption.
    fn watch(
        &mut self,
        session: &dyn GuestSession,
        interrupted: &AtomicBool,
    ) -> Result<GuestEnd, Option<Waiting>> {
        let booted_at = Instant::now();
        loop {
            let (waiting, deadline) = self.deadline(booted_at);
            if interrupted.load(Ordering::Relaxed) {
                self.report.interrupted = true;
                return Err(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Some(waiting));
            }
            match session.messages().recv_timeout((deadline - now).min(POLL)) {
                Ok(message) => {
                    if let Some(end) = self.message(message) {
                        return Ok(end);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Ok(GuestEnd::Failed {
                        detail: "the backend stopped without saying how the guest ended".into(),
                    })
                }
            }
        }
    }

    /// Stops the guest; whatever it printed before it was stopped still counts.
    fn stop_and_drain(&mut self, session: &mut dyn GuestSession) -> GuestEnd {
        if let Err(e) = session.stop() {
            self.report.problem(&format!("stopping the guest: {e}"));
        }
        while let Ok(message) = session.messages().recv_timeout(Duration::from_millis(500)) {
            if let Some(end) = self.message(message) {
                return end;
            }
        }
        GuestEnd::Stopped
    }

    /// A line the host cannot use: the running workload's error (its record keeps the first
    /// reason and counts the rest), else a problem of the boot.
    fn problem(&mut self, text: String) {
        match &mut self.current {
            Some((o, _, _)) => {
                self.current_problems += 1;
                o.ratchet(Status::Error, escape_text(&text));
            }
            None => self.report.problem(&text),
        }
    }

    /// What the host saw about the stream: a note on the running workload's record (its
    /// figures stand; a line the stream lost shows as a gap or damage on its own), else a
    /// problem of the boot.
    fn notice(&mut self, text: String) {
        match &mut self.current {
            Some((o, _, _)) => o.note_console(&escape_text(&text)),
            None => self.report.problem(&text),
        }
    }

    fn finish_current(&mut self, status: Status, reason: Option<String>) {
        if let Some((mut outcome, start_exits, _)) = self.current.take() {
            if let Some(r) = reason {
                outcome.ratchet(status, r);
            } else {
                outcome.status = outcome.status.ratchet(status);
            }
            outcome.exits = difference(&self.last_exits, &start_exits);
            let problems = std::mem::take(&mut self.current_problems);
            if problems > 1 {
                outcome.note_console(&format!(
                    "{problems} lines the host could not use while it ran; the reason is the first"
                ));
            }
            self.settled(outcome);
        }
    }

    fn settled(&mut self, outcome: WorkloadOutcome) {
        self.last_progress = Some(Instant::now());
        let hello = self.report.hello.as_ref().zip(self.report.hello_at);
        (self.sink)(&outcome, hello);
        self.report.outcomes.push(outcome);
    }

    fn planned(&self, w: WorkloadId) -> bool {
        self.plan.contains(&w)
            && !self.report.outcomes.iter().any(|o| o.workload == w)
            && self.current.as_ref().map(|(o, _, _)| o.workload) != Some(w)
    }

    fn line(&mut self, line: ConsoleLine) {
        // The guest is up: from now on the workload limit applies.
        self.last_progress.get_or_insert_with(Instant::now);
        match interpret(line) {
            LineMeaning::Event(event) => self.event(event),
            LineMeaning::Noise(bytes) => self.noise(&bytes),
            LineMeaning::Problem(text) => self.problem(text),
        }
    }

    fn noise(&mut self, bytes: &[u8]) {
        if self.noise_bytes < MAX_NOISE_BYTES {
            self.noise_bytes += bytes.len().max(1);
            self.report.noise.push(printable(bytes));
        } else {
            self.report.dropped_noise += 1;
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Hello(hello) => {
                if self.report.hello.is_some() {
                    self.problem("guest said hello twice".into());
                } else {
                    self.report.hello = Some(hello);
                    self.report.hello_at = Some(Instant::now());
                    self.last_progress = self.report.hello_at;
                }
            }
            Event::Start(w) => {
                if let Some((o, _, _)) = &self.current {
                    let previous = o.workload.name();
                    self.finish_current(
                        Status::Error,
                        Some(format!(
                            "guest started {} before reporting a result",
                            w.name()
                        )),
                    );
                    self.report
                        .problem(&format!("{previous} had no result line"));
                }
                if self.planned(w) {
                    self.current = Some((
                        WorkloadOutcome::new(w),
                        self.last_exits.clone(),
                        Instant::now(),
                    ));
                } else {
                    self.problem(format!(
                        "guest started {}, which was not asked for or ran already",
                        w.name()
                    ));
                }
            }
            Event::Sample(s) => self.sample(s),
            Event::Skip { workload, reason } => {
                if self.current.is_some() {
                    self.problem(format!(
                        "guest skipped {} inside another workload",
                        workload.name()
                    ));
                } else if self.planned(workload) {
                    // Settled like any other outcome, so its record is written and the run
                    // does not boot the guest again for it.
                    self.settled(WorkloadOutcome::skipped(workload, reason));
                } else {
                    self.problem(format!(
                        "guest skipped {}, which was not asked for",
                        workload.name()
                    ));
                }
            }
            Event::Result {
                workload,
                status,
                reason,
            } => match &self.current {
                Some((o, _, _)) if o.workload == workload => {
                    let reason = reason.or_else(|| {
                        (status != Status::Success).then(|| "guest gave no reason".to_string())
                    });
                    self.finish_current(status, reason);
                }
                _ => self.problem(format!(
                    "result for {}, which is not running",
                    workload.name()
                )),
            },
            Event::Note {
                workload,
                key,
                value,
            } => match &mut self.current {
                Some((o, _, _)) if workload.is_none() || workload == Some(o.workload) => {
                    o.note(key, value)
                }
                _ => self.report.problem(&format!("guest note {key}={value}")),
            },
            Event::Crash(c) => {
                let text = describe_crash(&c);
                if self.current.is_some() {
                    self.finish_current(Status::Crash, Some(text));
                } else {
                    self.report.problem(&text);
                }
            }
            Event::End(status) => self.report.guest_status = Some(status),
        }
    }

    fn sample(&mut self, s: Sample) {
        let Some((o, _, _)) = &mut self.current else {
            self.problem(format!(
                "sample for {} outside its workload",
                s.workload.name()
            ));
            return;
        };
        if o.workload != s.workload {
            let text = format!(
                "sample for {} while {} runs",
                s.workload.name(),
                o.workload.name()
            );
            o.ratchet(Status::Error, text);
            return;
        }
        o.add_sample(s, self.expected);
    }

    /// What the host waits for now, and until when.
    fn deadline(&self, booted_at: Instant) -> (Waiting, Instant) {
        match (&self.current, self.last_progress) {
            (Some((_, _, started)), _) => (Waiting::Result, *started + self.limits.workload),
            // Between workloads the guest goes on at once: the limit counts from its last
            // step forward (first line, hello, last settled workload), not from the last poll.
            (None, Some(at)) => (Waiting::NextWorkload, at + self.limits.workload),
            (None, None) => (Waiting::FirstLine, booted_at + self.limits.boot),
        }
    }

    /// The host stopped the guest for taking too long while it waited for `waiting`.
    fn timed_out(&mut self, waiting: Waiting) {
        let text = |what: &str, limit: Duration| {
            format!(
                "no {what} within {:.1} s; the host stopped the guest",
                limit.as_secs_f64()
            )
        };
        match waiting {
            Waiting::Result => {
                let text = text("result", self.limits.workload);
                self.finish_current(Status::Timeout, Some(text));
            }
            // The guest hangs between workloads: the next it was asked for is charged, so
            // the boot makes progress and the rest get a fresh guest.
            Waiting::NextWorkload => {
                let text = text(
                    "next workload after the guest's last step",
                    self.limits.workload,
                );
                match self.plan.iter().copied().find(|&w| self.planned(w)) {
                    Some(w) => self.settled(WorkloadOutcome::failed(w, Status::Timeout, text)),
                    None => self.report.problem(&text),
                }
            }
            Waiting::FirstLine => self
                .report
                .problem(&text("first line from the guest", self.limits.boot)),
        }
    }

    /// The guest is gone: settle the running workload from how it ended.
    fn ended(&mut self, end: &GuestEnd, timed_out: Option<Waiting>) {
        let crashed_code = ExitCode::Crash as u32;
        if let (GuestEnd::Stopped, Some(waiting)) = (end, timed_out) {
            self.timed_out(waiting);
            return;
        }
        match end {
            GuestEnd::Stopped => self.finish_current(
                Status::Error,
                Some("interrupted (Ctrl-C); samples so far kept".into()),
            ),
            GuestEnd::TripleFault { detail } | GuestEnd::Failed { detail } => {
                if self.current.is_some() {
                    self.finish_current(Status::Crash, Some(escape_text(detail)));
                } else {
                    self.report.problem(detail);
                }
            }
            GuestEnd::Exited { code } if self.current.is_some() => {
                let text = if *code == crashed_code {
                    "guest stopped with a crash status and no crash report".to_string()
                } else {
                    format!("guest exited (code {code}) while the workload ran")
                };
                let status = if *code == crashed_code {
                    Status::Crash
                } else {
                    Status::Error
                };
                self.finish_current(status, Some(text));
            }
            GuestEnd::Exited { .. } => {}
        }
    }
}

/// What the host waits for from a running guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// Its first line (the boot limit).
    FirstLine,
    /// The running workload's result (the workload limit, from its start).
    Result,
    /// The next workload (the workload limit, from the last step forward).
    NextWorkload,
}

/// Drives one booted guest to its end. `plan` is what the guest was asked to run; `sink`
/// sees every outcome as it is settled (they are in the report too).
pub fn drive(
    session: &mut dyn GuestSession,
    plan: &[WorkloadId],
    expected: &ExpectedSeries,
    limits: Limits,
    interrupted: &AtomicBool,
    sink: OutcomeSink,
) -> BootReport {
    let mut d = Driver {
        plan,
        expected,
        sink,
        limits,
        report: BootReport::new(),
        current: None,
        noise_bytes: 0,
        last_exits: ExitCounts::new(),
        last_progress: None,
        current_problems: 0,
        lines: LineAssembler::new(),
    };
    let (end, timed_out) = match d.watch(session, interrupted) {
        Ok(end) => (end, None),
        Err(waiting) => (d.stop_and_drain(session), waiting),
    };
    if let Some(rest) = d.lines.finish() {
        d.line(rest);
    }
    d.ended(&end, timed_out);
    if let Err(e) = session.stop() {
        d.report.problem(&format!("stopping the guest: {e}"));
    }
    d.report.count_dropped();
    d.report.end = end;
    d.report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use workloads::protocol::{LineBuilder, LineKind};

    /// A guest that says exactly what the test scripts, then ends (or hangs).
    #[derive(Debug)]
    struct Scripted {
        rx: Receiver<GuestMessage>,
        _tx: Option<Sender<GuestMessage>>,
        stopped: bool,
    }

    impl GuestSession for Scripted {
        fn messages(&self) -> &Receiver<GuestMessage> {
            &self.rx
        }
        fn stop(&mut self) -> Result<(), crate::backend::BackendError> {
            self.stopped = true;
            self._tx = None;
            Ok(())
        }
    }

    fn scripted(chunks: Vec<Vec<u8>>, end: Option<GuestEnd>) -> Scripted {
        let (tx, rx) = channel();
        for bytes in chunks {
            tx.send(GuestMessage::Console { bytes, exits: None })
                .unwrap();
        }
        let keep = match end {
            Some(end) => {
                tx.send(GuestMessage::Ended(end)).unwrap();
                None
            }
            // No end: the guest hangs with the channel open.
            None => Some(tx),
        };
        Scripted {
            rx,
            _tx: keep,
            stopped: false,
        }
    }

    fn line(b: &mut LineBuilder) -> Vec<u8> {
        b.finish().to_vec()
    }

    fn hello() -> Vec<u8> {
        line(
            LineBuilder::new(LineKind::Hello)
                .num("proto", 1)
                .text("hv", "kvm")
                .text("sig", "KVMKVMKVM")
                .text("vendor", "AuthenticAMD")
                .num("tsc_khz", 2_000_000)
                .text("tsc_src", "test"),
        )
    }

    fn start(w: &str) -> Vec<u8> {
        line(LineBuilder::new(LineKind::Start).text("w", w))
    }

    fn sample(w: &str, n: u64) -> Vec<u8> {
        line(
            LineBuilder::new(LineKind::Sample)
                .text("w", w)
                .text("m", "latency")
                .num("n", n)
                .num("ops", 100)
                .num("cycles", 1000 + n),
        )
    }

    fn result(w: &str) -> Vec<u8> {
        line(
            LineBuilder::new(LineKind::Result)
                .text("w", w)
                .text("status", "success"),
        )
    }

    const LIMITS: Limits = Limits {
        boot: Duration::from_secs(5),
        workload: Duration::from_secs(5),
    };

    fn drive_script(
        chunks: Vec<Vec<u8>>,
        end: Option<GuestEnd>,
        plan: &[WorkloadId],
        limits: Limits,
    ) -> BootReport {
        let mut s = scripted(chunks, end);
        let flag = AtomicBool::new(false);
        let expected = ExpectedSeries::new(plan, &[]);
        drive(&mut s, plan, &expected, limits, &flag, &mut |_, _| {})
    }

    #[test]
    fn console_notices_go_on_the_running_workload_or_the_boot() {
        let plan = [WorkloadId::CpuRdtsc];
        let (tx, rx) = channel();
        let console = |bytes: Vec<u8>| GuestMessage::Console { bytes, exits: None };
        let notice = |text: &str| GuestMessage::Notice(text.to_string());
        for msg in [
            notice("before hello"),
            console(hello()),
            console(start("cpu.rdtsc")),
            console(sample("cpu.rdtsc", 0)),
            notice("reattached once"),
            notice("reattached twice"),
            console(sample("cpu.rdtsc", 1)),
            console(result("cpu.rdtsc")),
            GuestMessage::Ended(GuestEnd::Exited { code: 0 }),
        ] {
            tx.send(msg).unwrap();
        }
        let mut s = Scripted {
            rx,
            _tx: None,
            stopped: false,
        };
        let r = drive(
            &mut s,
            &plan,
            &ExpectedSeries::new(&plan, &[]),
            LIMITS,
            &AtomicBool::new(false),
            &mut |_, _| {},
        );
        let rdtsc = &r.outcomes[0];
        // The figures stand (a lost line would show as a gap); the record says what happened.
        assert_eq!(rdtsc.status, Status::Success, "{:?}", rdtsc.reason);
        assert_eq!(
            rdtsc.notes.get(HOST_CONSOLE_NOTE).map(String::as_str),
            Some("reattached once; reattached twice")
        );
        assert_eq!(r.problems, vec!["before hello".to_string()]);
    }

    #[test]
    fn a_clean_run() {
        let plan = [WorkloadId::CpuIdle, WorkloadId::CpuRdtsc];
        let mut stream = hello();
        stream.extend(start("cpu.idle"));
        stream.extend(sample("cpu.idle", 0));
        stream.extend(sample("cpu.idle", 1));
        stream.extend(result("cpu.idle"));
        stream.extend(start("cpu.rdtsc"));
        stream.extend(sample("cpu.rdtsc", 0));
        stream.extend(result("cpu.rdtsc"));
        // Delivered in awkward pieces, as a console would.
        let chunks = stream.chunks(7).map(|c| c.to_vec()).collect();
        let r = drive_script(chunks, Some(GuestEnd::Exited { code: 0 }), &plan, LIMITS);
        assert_eq!(r.outcomes.len(), 2);
        assert!(
            r.outcomes.iter().all(|o| o.status == Status::Success),
            "{:?}",
            r.outcomes
        );
        let idle = &r.outcomes[0].series[&("latency", String::new())];
        assert_eq!(idle.measured, vec![(100, 1000), (100, 1001)]);
        assert_eq!(r.hello.as_ref().map(|h| h.tsc_khz), Some(Some(2_000_000)));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn garbage_and_overlong_lines_are_errors_not_panics() {
        let plan = [WorkloadId::CpuIdle];
        let mut damaged = sample("cpu.idle", 0);
        damaged[20] ^= 0x20;
        let mut overlong = b"@hvb1 sample ".to_vec();
        overlong.extend(std::iter::repeat_n(b'9', 100_000));
        overlong.push(b'\n');
        let chunks = vec![
            hello(),
            b"\xff\xfe\x00 random boot noise \x1b[0m\n".to_vec(),
            start("cpu.idle"),
            damaged,
            overlong,
            b"@hvb1 sample w=cpu.idle ~zzzzzzzz\n".to_vec(),
            sample("cpu.idle", 0),
            result("cpu.idle"),
        ];
        let r = drive_script(chunks, Some(GuestEnd::Exited { code: 0 }), &plan, LIMITS);
        let o = &r.outcomes[0];
        assert_eq!(o.status, Status::Error);
        let reason = o.reason.as_deref().unwrap();
        assert!(reason.contains("damaged result line"), "{reason}");
        // The first is the reason; the record counts them all.
        assert_eq!(
            o.notes.get(HOST_CONSOLE_NOTE).map(String::as_str),
            Some("3 lines the host could not use while it ran; the reason is the first")
        );
        // The good sample still counts; the noise is kept for the log.
        assert_eq!(o.series[&("latency", String::new())].measured.len(), 1);
        assert_eq!(r.noise.len(), 1);
    }

    #[test]
    fn a_guest_that_prints_forever_without_newline_is_bounded() {
        let plan = [WorkloadId::CpuIdle];
        let mut chunks = vec![hello(), start("cpu.idle")];
        for _ in 0..256 {
            chunks.push(vec![b'A'; 4096]);
        }
        let r = drive_script(chunks, Some(GuestEnd::Exited { code: 0 }), &plan, LIMITS);
        assert_eq!(r.outcomes[0].status, Status::Error);
    }

    #[test]
    fn crash_line_and_triple_fault_are_crashes() {
        let plan = [WorkloadId::CpuIdle, WorkloadId::CpuRdtsc];
        let crash = line(
            LineBuilder::new(LineKind::Crash)
                .text("w", "cpu.idle")
                .num("vector", 14)
                .hex("err", 2)
                .hex("rip", 0x1234)
                .hex("cs", 0x23)
                .hex("rsp", 0x8000)
                .hex("cr2", 0xdead),
        );
        let r = drive_script(
            vec![hello(), start("cpu.idle"), crash],
            Some(GuestEnd::Exited { code: 4 }),
            &plan,
            LIMITS,
        );
        assert_eq!(r.outcomes.len(), 1, "only the crashed workload is settled");
        assert_eq!(r.outcomes[0].status, Status::Crash);
        let reason = r.outcomes[0].reason.as_deref().unwrap();
        assert!(
            reason.contains("#PF") && reason.contains("0xdead"),
            "{reason}"
        );

        let r = drive_script(
            vec![hello(), start("cpu.rdtsc")],
            Some(GuestEnd::TripleFault {
                detail: "triple fault (test)".into(),
            }),
            &plan,
            LIMITS,
        );
        assert_eq!(r.outcomes[0].status, Status::Crash);
        assert_eq!(r.outcomes[0].reason.as_deref(), Some("triple fault (test)"));
    }

    #[test]
    fn a_hang_is_a_timeout_and_the_session_is_stopped() {
        let plan = [WorkloadId::SelftestHang];
        let limits = Limits {
            boot: Duration::from_secs(5),
            workload: Duration::from_millis(300),
        };
        let mut s = scripted(vec![hello(), start("selftest.hang")], None);
        let flag = AtomicBool::new(false);
        let started = Instant::now();
        let r = drive(
            &mut s,
            &plan,
            &ExpectedSeries::new(&plan, &[]),
            limits,
            &flag,
            &mut |_, _| {},
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(s.stopped);
        assert_eq!(r.outcomes[0].status, Status::Timeout);
    }

    #[test]
    fn out_of_order_and_unasked_lines_are_errors() {
        let plan = [WorkloadId::CpuIdle];
        let r = drive_script(
            vec![
                hello(),
                start("cpu.rdtsc"),
                start("cpu.idle"),
                sample("cpu.rdtsc", 0),
                sample("cpu.idle", 5),
                result("cpu.idle"),
            ],
            Some(GuestEnd::Exited { code: 0 }),
            &plan,
            LIMITS,
        );
        assert!(
            r.problems.iter().any(|p| p.contains("not asked for")),
            "{:?}",
            r.problems
        );
        let o = &r.outcomes[0];
        assert_eq!(o.status, Status::Error);
        assert!(o
            .reason
            .as_deref()
            .unwrap()
            .contains("cpu.rdtsc while cpu.idle runs"));
    }

    /// Drives `s` on another thread; `None` if it has not finished within `bound` (a hang).
    fn drive_bounded(
        mut s: Scripted,
        plan: Vec<WorkloadId>,
        limits: Limits,
        bound: Duration,
    ) -> Option<(BootReport, Vec<WorkloadId>)> {
        let (done, result) = channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let flag = AtomicBool::new(false);
            let expected = ExpectedSeries::new(&plan, &[]);
            let r = drive(&mut s, &plan, &expected, limits, &flag, &mut |o, _| {
                seen.push(o.workload)
            });
            let _ = done.send((r, seen));
        });
        result.recv_timeout(bound).ok()
    }

    fn skip(w: &str, reason: &str) -> Vec<u8> {
        line(
            LineBuilder::new(LineKind::Skip)
                .text("w", w)
                .text("reason", reason),
        )
    }

    #[test]
    fn a_skip_is_settled_where_the_run_sees_it() {
        let plan = [WorkloadId::CpuIdle, WorkloadId::CpuRdtsc];
        let mut s = scripted(
            vec![
                hello(),
                skip("cpu.idle", "not here"),
                start("cpu.rdtsc"),
                sample("cpu.rdtsc", 0),
                result("cpu.rdtsc"),
            ],
            Some(GuestEnd::Exited { code: 0 }),
        );
        let mut seen = Vec::new();
        let r = drive(
            &mut s,
            &plan,
            &ExpectedSeries::new(&plan, &[]),
            LIMITS,
            &AtomicBool::new(false),
            &mut |o, _| seen.push((o.workload, o.status)),
        );
        assert_eq!(
            seen,
            vec![
                (WorkloadId::CpuIdle, Status::Skip),
                (WorkloadId::CpuRdtsc, Status::Success)
            ],
            "the sink (which writes records) saw the skip"
        );
        assert_eq!(r.outcomes[0].reason.as_deref(), Some("not here"));
    }

    #[test]
    fn a_guest_that_hangs_between_workloads_times_out() {
        let plan = vec![WorkloadId::CpuIdle, WorkloadId::CpuRdtsc];
        let limits = Limits {
            boot: Duration::from_secs(5),
            workload: Duration::from_millis(300),
        };
        // Hello, one workload, then silence with the guest alive.
        let s = scripted(
            vec![
                hello(),
                start("cpu.idle"),
                sample("cpu.idle", 0),
                result("cpu.idle"),
            ],
            None,
        );
        let started = Instant::now();
        let (r, seen) = drive_bounded(s, plan, limits, Duration::from_secs(10))
            .expect("the workload limit ends a guest that hangs between workloads");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(seen, vec![WorkloadId::CpuIdle, WorkloadId::CpuRdtsc]);
        assert_eq!(r.outcomes[1].status, Status::Timeout);
        assert!(
            r.outcomes[1]
                .reason
                .as_deref()
                .unwrap()
                .contains("next workload"),
            "{:?}",
            r.outcomes[1].reason
        );

        // Hello and nothing more: the limit counts from the hello.
        let s = scripted(vec![hello()], None);
        let (r, _) = drive_bounded(
            s,
            vec![WorkloadId::CpuIdle],
            limits,
            Duration::from_secs(10),
        )
        .expect("a guest that only says hello is stopped");
        assert_eq!(r.outcomes[0].status, Status::Timeout);
    }

    #[test]
    fn console_floods_are_counted_not_kept() {
        let plan = vec![WorkloadId::CpuIdle];
        let stray_note = line(
            LineBuilder::new(LineKind::Note)
                .text("w", "cpu.rdtsc")
                .text("k", "k")
                .text("v", "v"),
        );
        let mut chunks = vec![hello()];
        // A million empty lines and ten thousand problems, in console-sized pieces.
        chunks.extend(std::iter::repeat_n(vec![b'\n'; 4096], 250));
        chunks.extend(std::iter::repeat_n(stray_note.repeat(100), 100));
        let s = scripted(chunks, Some(GuestEnd::Exited { code: 0 }));
        let (r, _) = drive_bounded(s, plan, LIMITS, Duration::from_secs(60)).expect("ends");
        assert!(r.noise.len() <= MAX_NOISE_BYTES, "{}", r.noise.len());
        assert!(
            r.dropped_noise >= 1_000_000 - MAX_NOISE_BYTES as u64,
            "{}",
            r.dropped_noise
        );
        assert!(r.problems.len() <= MAX_PROBLEMS + 3, "{}", r.problems.len());
        assert_eq!(r.dropped_problems, 10_000 - MAX_PROBLEMS as u64);
        assert!(
            r.problems.iter().any(|p| p.contains("9936 more problems")),
            "{:?}",
            &r.problems[MAX_PROBLEMS - 1..]
        );
    }

    #[test]
    fn guest_text_in_problems_and_reasons_is_escaped() {
        let plan = [WorkloadId::CpuIdle, WorkloadId::CpuRdtsc];
        let evil = "\x1b[2J\x07\r\u{9b}31m";
        let stray = line(
            LineBuilder::new(LineKind::Note)
                .text("k", evil)
                .text("v", evil),
        );
        let r = drive_script(
            vec![hello(), stray, skip("cpu.idle", evil), start("cpu.rdtsc")],
            Some(GuestEnd::Failed {
                detail: format!("VMM says {evil}"),
            }),
            &plan,
            LIMITS,
        );
        let raw = |t: &str| t.chars().any(|c| c.is_control());
        assert!(!r.problems.iter().any(|p| raw(p)), "{:?}", r.problems);
        for o in &r.outcomes {
            assert!(!raw(o.reason.as_deref().unwrap_or("")), "{:?}", o.reason);
        }
        assert_eq!(r.outcomes.len(), 2);
    }

    #[test]
    fn interruption_keeps_samples() {
        let plan = [WorkloadId::CpuIdle];
        let mut s = scripted(
            vec![hello(), start("cpu.idle"), sample("cpu.idle", 0)],
            None,
        );
        let flag = AtomicBool::new(true);
        let mut seen = Vec::new();
        let r = drive(
            &mut s,
            &plan,
            &ExpectedSeries::new(&plan, &[]),
            LIMITS,
            &flag,
            &mut |o, _| seen.push(o.workload),
        );
        assert_eq!(seen, vec![WorkloadId::CpuIdle], "the sink saw the outcome");
        assert!(r.interrupted);
        // Nothing was read before the flag was seen; what the guest printed is drained.
        let o = &r.outcomes[0];
        assert_eq!(o.status, Status::Error);
        assert_eq!(o.series[&("latency", String::new())].measured.len(), 1);
    }

    #[test]
    fn samples_of_series_the_host_did_not_ask_for_are_errors_and_not_kept() {
        let expected = ExpectedSeries::new(&[WorkloadId::MemTlbChase], &[]);
        let mut o = WorkloadOutcome::new(WorkloadId::MemTlbChase);
        let sample = |params: &str, n: u64| Sample {
            workload: WorkloadId::MemTlbChase,
            metric: "latency",
            params: params.to_string(),
            index: n,
            ops: 1,
            cycles: 1,
            warmup: false,
            marker: None,
        };
        o.add_sample(sample("ws:16k,page:4k", 0), &expected);
        assert_eq!(o.status, Status::Success);
        for p in 0..3000 {
            o.add_sample(sample(&format!("p={p}"), 0), &expected);
        }
        o.add_sample(sample("ws:32k,page:4k", 0), &expected);
        assert_eq!(o.series.len(), 1, "only the asked-for series is kept");
        assert_eq!(o.status, Status::Error);
        let reason = o.reason.as_deref().unwrap_or("");
        assert!(
            reason.contains("\"p=0\"") && reason.contains("12 series"),
            "{reason}"
        );
    }
}

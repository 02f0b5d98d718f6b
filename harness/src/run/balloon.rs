//! `mem.balloon` and `selftest.balloon-corrupt`: the host boots the guest with a balloon
//! and drives it, phase by phase, from the guest's notes.
//!
//! One cycle of `mem.balloon`: the guest says `ready`; the host measures its view of the
//! guest's memory, sets the target to `size`; the guest hands the pages back, says
//! `inflated`; the host measures again (reclaimed = fall in the guest's memory / size),
//! sets the target to 0; the guest takes the pages back, touches them, says `deflated`.
//! Cycles repeat `--warmup` + `--samples` times. The guest times inflate, deflate and the
//! touches (its samples); the host supplies `reclaimed` and the memory curve, and notes how
//! long each phase took as it saw it (target set -> guest's note).
//!
//! What "the host's view" is depends on the backend (`BalloonControl::method`): on KVM the
//! resident pages of the guest's RAM mapping in the VMM process, on Xen the domain's memory
//! in `xl list`. Both are the memory the host spends on the guest, so the records of both
//! carry the same metrics.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use reports::record::Curve;
use workloads::balloon::{PHASE_DEFLATED, PHASE_INFLATED, PHASE_KEY, PHASE_READY};
use workloads::protocol::{Event, Hello, Status};
use workloads::table::param::BALLOON_SIZE;
use workloads::WorkloadId;

use super::host_context::{HostContext, HostDriven};
use super::plan::{param_value, ExpectedSeries};
use super::session::{describe_crash, difference, interpret, LineMeaning, WorkloadOutcome};
use super::WorkloadParam;
use crate::backend::balloon::{BalloonControl, HostMemory, Refusals};
use crate::backend::{BootRequest, ExitCounts, GuestEnd, GuestMessage, GuestSession};
use crate::console::{ConsoleLine, LineAssembler};

/// Guest memory the guest needs besides the pool: image, stacks, queues, the pool's 2 MiB
/// alignment.
const GUEST_RESERVE: u64 = 24 << 20;
/// Longest wait for one console message before the loop looks at the clock again.
const POLL: Duration = Duration::from_millis(50);
/// Points kept per curve (a few per phase at the KVM interval for a default run).
const MAX_CURVE_POINTS: usize = 20_000;
const MIB: f64 = (1u64 << 20) as f64;

static BOOTS: AtomicU32 = AtomicU32::new(0);

/// Runs `mem.balloon` or `selftest.balloon-corrupt` to its outcome.
pub fn run(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    let mut outcome = WorkloadOutcome::new(id);
    let Some(backend) = ctx.backend.balloon() else {
        outcome.ratchet(
            Status::Skip,
            "this backend has no balloon the host can drive",
        );
        return outcome.into();
    };
    let size = match balloon_size(&ctx.options.params, ctx.options.memory_mib) {
        Ok(size) => size,
        Err(reason) => {
            outcome.ratchet(Status::Error, reason);
            return outcome.into();
        }
    };
    let options = ctx.options;
    let line = options.guest_cmdline(&[id]);
    let request = BootRequest {
        image: ctx.image,
        cmdline: &line,
        memory_mib: options.memory_mib,
        vcpus: options.vcpus,
        name: format!(
            "hvbench-{}-balloon-{}",
            std::process::id(),
            BOOTS.fetch_add(1, Ordering::Relaxed) + 1
        ),
    };
    let boot = match backend.boot_with_balloon(&request) {
        Ok(boot) => boot,
        Err(e) => {
            outcome.ratchet(
                Status::Error,
                format!("booting the guest with a balloon: {e}"),
            );
            return outcome.into();
        }
    };
    let mut driver = Driver {
        id,
        size,
        cycles_wanted: options.warmup + options.samples,
        warmup: options.warmup,
        control: boot.control,
        outcome,
        hello: None,
        phase: Phase::Waiting,
        cycles_done: 0,
        started: Instant::now(),
        curves: Curves::default(),
        host_inflate_s: Vec::new(),
        host_deflate_s: Vec::new(),
        free_gained: Vec::new(),
        result_seen: false,
        start_exits: None,
        last_exits: None,
        measure_failed: false,
    };
    let mut session = boot.session;
    let end = driver.drive(session.as_mut(), ctx);
    if let Err(e) = session.stop() {
        driver
            .outcome
            .ratchet(Status::Error, format!("stopping the guest: {e}"));
    }
    driver.finish(end)
}

/// The pool size: `--param mem.balloon.size`, checked against the guest's memory.
pub fn balloon_size(params: &[WorkloadParam], memory_mib: u32) -> Result<u64, String> {
    let spec = &BALLOON_SIZE;
    let text =
        param_value(params, WorkloadId::MemBalloon, spec).ok_or("mem.balloon.size has no value")?;
    let size = spec.parse_one(text).map_err(|e| {
        format!(
            "mem.balloon.size={text}: {}; it takes {}",
            e.message(),
            spec.bounds()
        )
    })?;
    let memory = u64::from(memory_mib) << 20;
    if size.saturating_add(GUEST_RESERVE) > memory {
        return Err(format!(
            "a balloon of {} MiB leaves the guest too little of its {} MiB (it needs about {} \
             MiB besides): raise --memory-mib or lower mem.balloon.size",
            size >> 20,
            memory >> 20,
            GUEST_RESERVE >> 20
        ));
    }
    Ok(size)
}

/// Where the cycle is, as the host drives it.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Until the guest says `ready`.
    Waiting,
    /// Target set; until the guest says `inflated`.
    Inflating { before: HostMemory, since: Instant },
    /// Target back at zero; until the guest says `deflated`.
    Deflating { since: Instant },
}

#[derive(Default)]
struct Curves {
    guest: Vec<[f64; 2]>,
    host_free: Vec<[f64; 2]>,
}

/// One console item, as the host sees it.
enum Item {
    Event(Event),
    Problem(String),
    /// What the host saw about the stream itself.
    Notice(String),
    Ended(GuestEnd),
    Nothing,
}

struct Stream {
    lines: LineAssembler,
    pending: VecDeque<Item>,
}

impl Stream {
    fn take(&mut self, line: ConsoleLine) {
        match interpret(line) {
            LineMeaning::Event(event) => self.pending.push_back(Item::Event(event)),
            LineMeaning::Noise(_) => {}
            LineMeaning::Problem(text) => self.pending.push_back(Item::Problem(text)),
        }
    }

    fn next(
        &mut self,
        session: &mut dyn GuestSession,
        wait: Duration,
        exits: &mut Option<ExitCounts>,
    ) -> Item {
        if let Some(item) = self.pending.pop_front() {
            return item;
        }
        match session.messages().recv_timeout(wait) {
            Ok(GuestMessage::Console { bytes, exits: e }) => {
                if e.is_some() {
                    *exits = e;
                }
                for line in self.lines.push(&bytes) {
                    self.take(line);
                }
            }
            Ok(GuestMessage::Notice(text)) => self.pending.push_back(Item::Notice(text)),
            Ok(GuestMessage::Ended(end)) => {
                if let Some(rest) = self.lines.finish() {
                    self.take(rest);
                }
                self.pending.push_back(Item::Ended(end));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                self.pending.push_back(Item::Ended(GuestEnd::Failed {
                    detail: "the backend stopped without saying how the guest ended".into(),
                }))
            }
        }
        self.pending.pop_front().unwrap_or(Item::Nothing)
    }
}

struct Driver {
    id: WorkloadId,
    size: u64,
    cycles_wanted: u32,
    warmup: u32,
    control: Box<dyn BalloonControl>,
    outcome: WorkloadOutcome,
    hello: Option<Hello>,
    phase: Phase,
    cycles_done: u32,
    started: Instant,
    curves: Curves,
    host_inflate_s: Vec<f64>,
    host_deflate_s: Vec<f64>,
    /// Xen's free memory gained per inflate (bytes), where the backend reports it.
    free_gained: Vec<f64>,
    result_seen: bool,
    start_exits: Option<ExitCounts>,
    last_exits: Option<ExitCounts>,
    measure_failed: bool,
}

/// Why the drive loop stopped.
enum Stop {
    Ended(GuestEnd),
    TimedOut(Duration),
    Interrupted,
    /// The host could not drive the balloon (its reason is in the outcome).
    HostFailed,
}

impl Driver {
    fn drive(&mut self, session: &mut dyn GuestSession, ctx: &HostContext) -> Stop {
        let mut stream = Stream {
            lines: LineAssembler::new(),
            pending: VecDeque::new(),
        };
        let interval = self.control.curve_interval();
        let mut next_sample = Instant::now();
        let mut workload_started: Option<Instant> = None;
        loop {
            if ctx.interrupted.load(Ordering::Relaxed) {
                return Stop::Interrupted;
            }
            let (limit, since) = match workload_started {
                Some(at) => (ctx.options.workload_timeout, at),
                None => (ctx.options.boot_timeout, self.started),
            };
            let now = Instant::now();
            if now >= since + limit {
                return Stop::TimedOut(limit);
            }
            if let Some(every) = interval {
                if workload_started.is_some() && now >= next_sample {
                    self.sample_curve();
                    next_sample = now + every;
                }
            }
            let mut wait = (since + limit - now).min(POLL);
            if interval.is_some() && workload_started.is_some() {
                wait = wait.min(next_sample.saturating_duration_since(now));
            }
            let mut exits = self.last_exits.take();
            let item = stream.next(session, wait, &mut exits);
            self.last_exits = exits;
            match item {
                Item::Nothing => {}
                Item::Ended(end) => return Stop::Ended(end),
                Item::Problem(text) => self.outcome.ratchet(Status::Error, text),
                Item::Notice(text) => self.outcome.note_console(&text),
                Item::Event(Event::Hello(hello)) => self.hello = Some(hello),
                Item::Event(Event::Start(w)) if w == self.id => {
                    workload_started = Some(Instant::now());
                    self.start_exits = self.last_exits.clone();
                }
                Item::Event(Event::Note {
                    workload,
                    key,
                    value,
                }) if workload == Some(self.id) && key == PHASE_KEY => {
                    if !self.phase(&value) {
                        return Stop::HostFailed;
                    }
                }
                Item::Event(event) => self.event(event, ctx),
            }
        }
    }

    fn event(&mut self, event: Event, ctx: &HostContext) {
        match event {
            Event::Sample(s) if s.workload == self.id => {
                let expected = ExpectedSeries::new(&[self.id], &ctx.options.params);
                self.outcome.add_sample(s, &expected)
            }
            Event::Note { key, value, .. } => self.outcome.note(key, value),
            Event::Result {
                workload,
                status,
                reason,
            } if workload == self.id => {
                self.result_seen = true;
                match reason {
                    Some(r) => self.outcome.ratchet(status, r),
                    None if status != Status::Success => {
                        self.outcome.ratchet(status, "guest gave no reason")
                    }
                    None => {}
                }
            }
            Event::Skip { workload, reason } if workload == self.id => {
                self.result_seen = true;
                self.outcome.ratchet(Status::Skip, reason);
            }
            Event::Crash(c) => {
                self.result_seen = true;
                self.outcome.ratchet(Status::Crash, describe_crash(&c));
            }
            Event::End(_) | Event::Hello(_) | Event::Start(_) => {}
            other => self.outcome.ratchet(
                Status::Error,
                format!("unexpected line from the guest: {other:?}"),
            ),
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn push_curve(&mut self, memory: &HostMemory) {
        let t = self.elapsed();
        if self.curves.guest.len() < MAX_CURVE_POINTS {
            self.curves.guest.push([t, memory.guest_bytes as f64 / MIB]);
        }
        if let Some(free) = memory.host_free_bytes {
            if self.curves.host_free.len() < MAX_CURVE_POINTS {
                self.curves.host_free.push([t, free as f64 / MIB]);
            }
        }
    }

    fn sample_curve(&mut self) {
        match self.control.measure() {
            Ok(m) => self.push_curve(&m),
            Err(e) if !self.measure_failed => {
                self.measure_failed = true;
                self.outcome
                    .ratchet(Status::Error, format!("measuring the guest's memory: {e}"));
            }
            Err(_) => {}
        }
    }

    /// The host's measurement at a phase boundary, then (if given) the new target; a
    /// failure ends the workload.
    fn measure(&mut self, then_set: Option<u64>) -> Option<HostMemory> {
        let result = match then_set {
            Some(bytes) => self.control.measure_then_set(bytes),
            None => self.control.measure(),
        };
        match result {
            Ok(m) => {
                self.push_curve(&m);
                Some(m)
            }
            Err(e) => {
                let what = match then_set {
                    Some(bytes) => format!(
                        "measuring the guest's memory and setting the balloon to {bytes} bytes"
                    ),
                    None => "measuring the guest's memory".to_string(),
                };
                self.outcome.ratchet(Status::Error, format!("{what}: {e}"));
                None
            }
        }
    }

    /// Reacts to the guest's phase note; false when the host cannot go on.
    fn phase(&mut self, value: &str) -> bool {
        match (value, self.phase) {
            (PHASE_READY, Phase::Waiting) => {
                let Some(before) = self.measure(Some(self.size)) else {
                    return false;
                };
                self.phase = Phase::Inflating {
                    before,
                    since: Instant::now(),
                };
            }
            (PHASE_INFLATED, Phase::Inflating { before, since }) => {
                self.host_inflate_s.push(since.elapsed().as_secs_f64());
                let pages = self.size / 4096;
                if let Some(reported) = self.control.reported_pages().filter(|r| *r != pages) {
                    self.outcome.ratchet(
                        Status::Error,
                        format!(
                            "the guest said it inflated, but its driver reports {reported} of \
                             {pages} pages in the balloon"
                        ),
                    );
                }
                let Some(after) = self.measure(Some(0)) else {
                    return false;
                };
                let fell = before.guest_bytes as f64 - after.guest_bytes as f64;
                if self.cycles_done >= self.warmup {
                    self.outcome
                        .series
                        .entry(("reclaimed", String::new()))
                        .or_default()
                        .direct
                        .push(fell / self.size as f64);
                }
                if let (Some(b), Some(a)) = (before.host_free_bytes, after.host_free_bytes) {
                    self.free_gained.push(a as f64 - b as f64);
                }
                self.phase = Phase::Deflating {
                    since: Instant::now(),
                };
            }
            (PHASE_DEFLATED, Phase::Deflating { since }) => {
                self.host_deflate_s.push(since.elapsed().as_secs_f64());
                if self.measure(None).is_none() {
                    return false;
                }
                self.cycles_done += 1;
                self.phase = Phase::Waiting;
            }
            (value, phase) => {
                self.outcome.ratchet(
                    Status::Error,
                    format!("the guest reported balloon phase {value:?} while the host was in {phase:?}"),
                );
                return false;
            }
        }
        true
    }

    fn finish(mut self, stop: Stop) -> HostDriven {
        match stop {
            Stop::Ended(end) => self.ended(end),
            Stop::TimedOut(limit) => self.outcome.ratchet(
                Status::Timeout,
                format!(
                    "no result within {:.1} s; the host stopped the guest",
                    limit.as_secs_f64()
                ),
            ),
            Stop::Interrupted => self
                .outcome
                .ratchet(Status::Error, "interrupted (Ctrl-C); samples so far kept"),
            Stop::HostFailed => {}
        }
        if let Some(refusals) = self.control.refusals() {
            self.judge_refusals(&refusals);
        }
        if self.id == WorkloadId::MemBalloon
            && self.outcome.status == Status::Success
            && self.cycles_done < self.cycles_wanted
        {
            self.outcome.ratchet(
                Status::Error,
                format!(
                    "the guest finished after {} of {} balloon cycles",
                    self.cycles_done, self.cycles_wanted
                ),
            );
        }
        self.notes();
        if let (Some(after), Some(before)) = (&self.last_exits, &self.start_exits) {
            self.outcome.exits = difference(after, before);
        }
        HostDriven {
            outcome: self.outcome,
            hello: self.hello,
        }
    }

    fn ended(&mut self, end: GuestEnd) {
        if self.result_seen {
            return;
        }
        let (status, text) = match end {
            GuestEnd::TripleFault { detail } | GuestEnd::Failed { detail } => {
                (Status::Crash, detail)
            }
            GuestEnd::Exited { code } => (
                Status::Error,
                format!("the guest exited (code {code}) before reporting a result"),
            ),
            GuestEnd::Stopped => (Status::Error, "the guest was stopped".to_string()),
        };
        self.outcome.ratchet(status, text);
    }

    fn judge_refusals(&mut self, refusals: &Refusals) {
        for (i, text) in refusals.kept.iter().enumerate() {
            self.outcome.note(format!("vmm_refusal_{i}"), text.clone());
        }
        let listed = refusals.kept.join("; ");
        match (self.id, refusals.total) {
            (WorkloadId::SelftestBalloonCorrupt, 0) => self.outcome.ratchet(
                Status::Failure,
                "the guest corrupted the balloon's queues but the VMM reported no refusal",
            ),
            (WorkloadId::SelftestBalloonCorrupt, n) => self.outcome.ratchet(
                Status::Error,
                format!(
                    "the VMM refused {n} malformed balloon request(s) and kept running, as this \
                     self-test expects: {listed}"
                ),
            ),
            (_, 0) => {}
            (_, n) => self.outcome.ratchet(
                Status::Error,
                format!("the VMM refused {n} balloon request(s) from the guest: {listed}"),
            ),
        }
    }

    fn notes(&mut self) {
        if self.id != WorkloadId::MemBalloon {
            return;
        }
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.6}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut notes = BTreeMap::new();
        notes.insert("host_memory".to_string(), self.control.method().to_string());
        if let Some(text) = self.control.diagnostics() {
            notes.insert("host_retries".to_string(), text);
        }
        notes.insert("size_bytes".to_string(), self.size.to_string());
        notes.insert("cycles".to_string(), self.cycles_done.to_string());
        notes.insert(
            "host_inflate_s".to_string(),
            format!(
                "{} (target set -> guest's note, per cycle, warm-up included; over SSH, from \
                 the toolstack command's return)",
                list(&self.host_inflate_s)
            ),
        );
        notes.insert(
            "host_deflate_s".to_string(),
            format!(
                "{} (target cleared -> guest's note, touches included)",
                list(&self.host_deflate_s)
            ),
        );
        if !self.free_gained.is_empty() {
            let mib: Vec<f64> = self.free_gained.iter().map(|b| b / MIB).collect();
            notes.insert(
                "host_free_gained_mib".to_string(),
                format!("{} (the hypervisor's free memory, per inflate)", list(&mib)),
            );
        }
        for (k, v) in notes {
            self.outcome.notes.entry(k).or_insert(v);
        }
        let curves = std::mem::take(&mut self.curves);
        if !curves.guest.is_empty() {
            self.outcome.curves.insert(
                "guest_memory".into(),
                (
                    "reclaimed".into(),
                    Curve {
                        x_unit: "s".into(),
                        y_unit: "MiB".into(),
                        points: curves.guest,
                    },
                ),
            );
        }
        if !curves.host_free.is_empty() {
            self.outcome.curves.insert(
                "host_free_memory".into(),
                (
                    "reclaimed".into(),
                    Curve {
                        x_unit: "s".into(),
                        y_unit: "MiB".into(),
                        points: curves.host_free,
                    },
                ),
            );
        }
    }
}

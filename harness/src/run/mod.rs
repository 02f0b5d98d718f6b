//! A run: the selected workloads, booted on one backend `--repeat` times. A guest that
//! crashes or hangs costs only the workload it was running: the host records it and boots
//! a fresh guest for the rest. Records are written as each workload finishes, so an
//! interrupted run keeps everything measured so far.

pub mod balloon;

pub mod host_context;
pub mod host_driven;
pub mod ksm;
pub mod lifecycle;
pub mod migration;
pub(crate) mod native;
pub mod plan;
pub mod records;
pub mod sched;
pub mod session;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use reports::record::{BackendInfo, GuestInfo, HostInfo, Record, RunParameters, ToolInfo};
use reports::{ResultsError, ResultsWriter};
use thiserror::Error;
use workloads::cmdline::{self, GuestConfig};
use workloads::protocol::{Hello, Status};
use workloads::{Driver, WorkloadId};

use self::records::{insns_records, RecordContext};
use self::session::{BootReport, Limits, WorkloadOutcome};
use crate::backend::{BackendError, BootRequest, GuestEnd, Hypervisor};
use crate::guest_image::GuestImage;
use crate::insns::InsnLog;

/// Everything that shapes a run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub workloads: Vec<WorkloadId>,
    pub samples: u32,
    pub warmup: u32,
    pub sample_us: u32,
    pub repeat: u32,
    pub workload_timeout: Duration,
    pub boot_timeout: Duration,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub guest_path: Option<PathBuf>,
    pub out: PathBuf,
    /// Workload parameters (`--param WORKLOAD.KEY=VALUE`), checked.
    pub params: Vec<WorkloadParam>,
    /// Ask the guest for its instruction-count markers where the backend counts
    /// instructions (off: the guest places none, and `insns` records say so).
    pub insn_markers: bool,
}

impl RunOptions {
    /// The guest's configuration for `workloads`, with this run's sampling options.
    pub fn guest_config(&self, workloads: &[WorkloadId]) -> GuestConfig {
        let mut config = GuestConfig {
            samples: self.samples,
            warmup: self.warmup,
            sample_us: self.sample_us,
            cpus: self.vcpus,
            ..Default::default()
        };
        for &w in workloads {
            config.select(w);
        }
        config
    }

    /// The command line of a guest that runs `workloads` with this run's options and
    /// parameters (those of workloads it does not run are left out).
    pub fn guest_cmdline(&self, workloads: &[WorkloadId]) -> String {
        let params: Vec<(WorkloadId, &str, &str)> = self
            .params
            .iter()
            .map(|p| (p.workload, p.key.as_str(), p.value.as_str()))
            .collect();
        cmdline::encode_with_params(&self.guest_config(workloads), &params)
    }
}

/// One `--param`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadParam {
    pub workload: WorkloadId,
    pub key: String,
    pub value: String,
}

impl WorkloadParam {
    /// Parses `WORKLOAD.KEY=VALUE` (e.g. `mem.tlb-chase.ws=64k,1m`) and checks it against
    /// the workload's row: a known key, a value within its bounds.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("--param {text:?} is not WORKLOAD.KEY=VALUE");
        let (name, value) = text.split_once('=').ok_or_else(bad)?;
        let (workload, key) = name.rsplit_once('.').ok_or_else(bad)?;
        let id = cmdline::check_param(workload, key, value).map_err(|e| e.explain(text))?;
        Ok(WorkloadParam {
            workload: id,
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("booting the guest on {backend}: {source}")]
    Boot {
        backend: &'static str,
        source: BackendError,
    },
}

/// What a finished (or interrupted) run produced.
#[derive(Debug)]
pub struct RunSummary {
    pub run_id: String,
    pub records: Vec<Record>,
    pub interrupted: bool,
    /// Problems not tied to one workload (boot failures, stray lines), for the user.
    pub problems: Vec<String>,
}

impl RunSummary {
    /// The worst status of any record (success for an empty run).
    pub fn status(&self) -> Status {
        self.records
            .iter()
            .fold(Status::Success, |s, r| s.ratchet(r.status))
    }
}

pub fn tool_info() -> ToolInfo {
    ToolInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        git_revision: env!("HVBENCH_GIT_REVISION").to_string(),
    }
}

fn run_id(backend: &str) -> String {
    let stamp: String = records::rfc3339(SystemTime::now())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("{stamp}-{backend}-{:x}", std::process::id())
}

/// Progress lines on stderr.
fn progress(text: &str) {
    crate::say!("hvbench: {text}");
}

fn one_line(record: &Record) -> String {
    match (&record.summary, record.status) {
        (Some(s), Status::Success) => format!(
            "{} {}: median {:.1} {} [{:.1}, {:.1}] over {} samples",
            record.workload,
            record.metric,
            s.median,
            record.unit,
            s.median_ci95.low,
            s.median_ci95.high,
            s.n
        ),
        _ => format!(
            "{} {}: {}{}",
            record.workload,
            record.metric,
            record.status.name(),
            record
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    }
}

/// Refuses, before anything is created, parameters given twice and the parameters of the
/// selected host-driven workloads that cannot work (sizes that do not fit in the guest).
pub fn check_params(
    params: &[WorkloadParam],
    workloads: &[WorkloadId],
    memory_mib: u32,
) -> Result<(), plan::PlanError> {
    plan::check_duplicates(params)?;
    host_driven::check_params(workloads, params, memory_mib)
}

/// The run: boots, drives, records. Stops early (keeping what it wrote) when
/// `interrupted` is set.
pub fn run(
    backend: &dyn Hypervisor,
    image: &GuestImage,
    options: &RunOptions,
    writer: &mut ResultsWriter,
    interrupted: &AtomicBool,
) -> Result<RunSummary, RunError> {
    let mut run = Run::new(backend, image, options, writer, interrupted);
    for repeat in 0..options.repeat {
        if run.repeat(repeat)? == Flow::Interrupted {
            run.summary.interrupted = true;
            break;
        }
    }
    Ok(run.summary)
}

/// Whether the run goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Interrupted,
}

/// What one run shares across its repeats and boots.
struct Run<'a> {
    backend: &'a dyn Hypervisor,
    image: &'a GuestImage,
    options: &'a RunOptions,
    writer: &'a mut ResultsWriter,
    interrupted: &'a AtomicBool,
    backend_info: BackendInfo,
    host: HostInfo,
    tool: ToolInfo,
    parameters: RunParameters,
    native_here: bool,
    summary: RunSummary,
    boots: u32,
}

impl<'a> Run<'a> {
    fn new(
        backend: &'a dyn Hypervisor,
        image: &'a GuestImage,
        options: &'a RunOptions,
        writer: &'a mut ResultsWriter,
        interrupted: &'a AtomicBool,
    ) -> Self {
        let parameters = RunParameters {
            samples: options.samples,
            warmup: options.warmup,
            sample_us: options.sample_us,
            timeout_s: options.workload_timeout.as_secs(),
            memory_mib: options.memory_mib,
            vcpus: options.vcpus,
            repeats: options.repeat,
            workload_params: Default::default(),
        };
        Run {
            backend,
            image,
            options,
            writer,
            interrupted,
            backend_info: backend.info(),
            host: backend.host(),
            tool: tool_info(),
            parameters,
            native_here: backend.guest_runs_locally(),
            summary: RunSummary {
                run_id: run_id(backend.kind().name()),
                records: Vec::new(),
                interrupted: false,
                problems: Vec::new(),
            },
            boots: 0,
        }
    }

    fn stopped(&self) -> bool {
        self.interrupted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The records of one outcome, written and kept for the summary.
    fn write(
        &mut self,
        outcome: &WorkloadOutcome,
        guest: &GuestInfo,
        repeat: u32,
        insns: Option<&InsnLog>,
    ) -> Result<(), RunError> {
        let (backend, options) = (self.backend, self.options);
        let reproduce = |w: WorkloadId| reproduce_command(backend, options, w);
        let ctx = RecordContext {
            run_id: &self.summary.run_id,
            repeat,
            backend: &self.backend_info,
            host: &self.host,
            guest,
            parameters: &self.parameters,
            tool: &self.tool,
            tsc_khz: guest.tsc_khz.or(if self.native_here {
                self.host.tsc_khz
            } else {
                None
            }),
            native_here: self.native_here,
            reproduce: &reproduce,
            workload_params: &options.params,
            guest_ram: backend.guest_ram_advice(),
            disk: backend.disk(),
        };
        let kind = backend.kind().name();
        let mut built = records::build(outcome, &ctx);
        if let Some(log) = insns {
            built.extend(insns_records(&built, outcome, log));
        }
        for record in built {
            self.writer.write(&record)?;
            progress(&format!("[{kind} #{repeat}] {}", one_line(&record)));
            self.summary.records.push(record);
        }
        Ok(())
    }

    fn guest_info(&self, hello: &Hello) -> GuestInfo {
        guest_info(self.image, hello, self.native_here, self.host.tsc_khz)
    }

    /// One repeat of the selection: host-side skips, the guest-driven workloads over as
    /// many boots as they take, then the host-driven ones.
    fn repeat(&mut self, repeat: u32) -> Result<Flow, RunError> {
        let mut pending: Vec<WorkloadId> = Vec::new();
        let mut host_driven: Vec<WorkloadId> = Vec::new();
        let mut guest = GuestInfo {
            image_sha256: self.image.sha256().to_string(),
            ..Default::default()
        };
        for &w in &self.options.workloads {
            match plan::backend_skip(w, self.backend) {
                // Written at once, with what is known before any boot.
                Some(reason) => {
                    self.write(&WorkloadOutcome::skipped(w, reason), &guest, repeat, None)?
                }
                None if matches!(w.spec().driver, Driver::Host(_)) => host_driven.push(w),
                None => pending.push(w),
            }
        }
        while !pending.is_empty() {
            if self.stopped() || self.boot(repeat, &mut pending, &mut guest)? == Flow::Interrupted {
                return Ok(Flow::Interrupted);
            }
        }
        for w in host_driven {
            if self.stopped() {
                return Ok(Flow::Interrupted);
            }
            self.host_driven(w, &guest, repeat)?;
        }
        Ok(if self.stopped() {
            Flow::Interrupted
        } else {
            Flow::Continue
        })
    }

    /// One boot for the `pending` workloads: drives it, writes what it settled and
    /// removes those from `pending`. Every boot makes progress or ends the plan.
    fn boot(
        &mut self,
        repeat: u32,
        pending: &mut Vec<WorkloadId>,
        guest: &mut GuestInfo,
    ) -> Result<Flow, RunError> {
        let (backend, image, options) = (self.backend, self.image, self.options);
        let interrupted = self.interrupted;
        let insns = backend.insns_log().map(|log| InsnLog::begin(&log));
        let mut line = options.guest_cmdline(pending);
        if insns.is_some() && options.insn_markers {
            line.push_str(" markers=1");
        }
        self.boots += 1;
        let request = BootRequest {
            image,
            cmdline: &line,
            memory_mib: options.memory_mib,
            vcpus: options.vcpus,
            name: format!("hvbench-{}-{}", std::process::id(), self.boots),
        };
        let boot_started = std::time::Instant::now();
        let mut session = backend.boot(&request).map_err(|source| RunError::Boot {
            backend: backend.kind().name(),
            source,
        })?;
        // Each outcome is written the moment the guest settles it, except those whose
        // native twin must run here: that waits until the guest is down, so the guest
        // (busy on the next workload) cannot slow the native run (on SMT siblings it
        // did, by 2.6x). A write error stops the run once the guest is down.
        let mut write_error = None;
        let mut deferred = Vec::new();
        let mut sink = |outcome: &WorkloadOutcome, hello: Option<(&Hello, std::time::Instant)>| {
            if let Some((hello, at)) = hello {
                *guest = self.guest_info(hello);
                guest.boot_ms = Some(at.duration_since(boot_started).as_secs_f64() * 1e3);
            }
            if self.native_here && outcome.workload.spec().native_twin.is_some() {
                deferred.push(outcome.clone());
            } else if write_error.is_none() {
                write_error = self.write(outcome, guest, repeat, insns.as_ref()).err();
            }
        };
        let limits = Limits {
            boot: options.boot_timeout,
            workload: options.workload_timeout,
        };
        let expected = plan::ExpectedSeries::new(pending, &options.params);
        let report = session::drive(
            session.as_mut(),
            pending,
            &expected,
            limits,
            interrupted,
            &mut sink,
        );
        drop(session);
        if let Some(e) = write_error {
            return Err(e);
        }
        if let (Some(hello), Some(at)) = (&report.hello, report.hello_at) {
            *guest = self.guest_info(hello);
            guest.boot_ms = Some(at.duration_since(boot_started).as_secs_f64() * 1e3);
        }
        for outcome in &deferred {
            self.write(outcome, guest, repeat, insns.as_ref())?;
        }
        self.settle_rest(&report, pending, guest, repeat)?;
        self.summary
            .problems
            .extend(report.problems.iter().cloned());
        Ok(if report.interrupted {
            Flow::Interrupted
        } else {
            Flow::Continue
        })
    }

    /// Writes what the guest left unsettled, and takes what is written off `pending`. A
    /// boot that settled nothing would be booted again for the same workloads, forever:
    /// then the rest of the plan ends as errors.
    fn settle_rest(
        &mut self,
        report: &BootReport,
        pending: &mut Vec<WorkloadId>,
        guest: &GuestInfo,
        repeat: u32,
    ) -> Result<(), RunError> {
        let reached: Vec<WorkloadId> = report.outcomes.iter().map(|o| o.workload).collect();
        for outcome in settle(report, pending) {
            if !reached.contains(&outcome.workload) {
                self.write(&outcome, guest, repeat, None)?;
            }
        }
        let before = pending.len();
        let records = &self.summary.records;
        pending.retain(|w| {
            !records
                .iter()
                .any(|r| r.repeat == repeat && r.workload == w.name())
        });
        if pending.len() == before && !report.interrupted {
            for outcome in no_progress(pending, self.boots) {
                self.write(&outcome, guest, repeat, None)?;
            }
            pending.clear();
        }
        Ok(())
    }

    /// One host-driven workload; the guest it booted describes itself in its records,
    /// else the last guest's words stand.
    fn host_driven(
        &mut self,
        w: WorkloadId,
        guest: &GuestInfo,
        repeat: u32,
    ) -> Result<(), RunError> {
        let ctx = host_context::HostContext {
            backend: self.backend,
            image: self.image,
            options: self.options,
            interrupted: self.interrupted,
        };
        let done = host_driven::run(w, &ctx);
        let booted = done.hello.as_ref().map(|hello| self.guest_info(hello));
        self.write(
            &done.outcome,
            booted.as_ref().unwrap_or(guest),
            repeat,
            None,
        )
    }
}

/// The outcomes of `pending` after boot number `boot` settled none of them.
fn no_progress(pending: &[WorkloadId], boot: u32) -> Vec<WorkloadOutcome> {
    pending
        .iter()
        .map(|&w| {
            WorkloadOutcome::failed(
                w,
                Status::Error,
                format!(
                    "boot {boot} settled none of the workloads it was asked for; the run gives \
                     up on them rather than boot the guest again"
                ),
            )
        })
        .collect()
}

/// What the guest said about itself, for its records.
fn guest_info(
    image: &GuestImage,
    hello: &Hello,
    local: bool,
    host_tsc_khz: Option<u64>,
) -> GuestInfo {
    let (tsc_khz, tsc_source) = match hello.tsc_khz {
        Some(khz) => (Some(khz), format!("guest: {}", hello.tsc_source)),
        None if local => (
            host_tsc_khz,
            "host: measured (the guest's hypervisor advertises none)".into(),
        ),
        None => (None, "none".into()),
    };
    GuestInfo {
        image_sha256: image.sha256().to_string(),
        hypervisor: hello.hypervisor.name().to_string(),
        signature: hello.signature.clone(),
        cpu_vendor: hello.cpu_vendor.clone(),
        tsc_khz,
        tsc_source,
        ram_bytes: hello.ram_bytes,
        boot_ms: None,
    }
}

/// The outcomes a boot settled: those it reached, and, if it ended before reaching any
/// of the rest without a crash to blame, the rest as errors (so no run loops forever).
fn settle(report: &BootReport, plan: &[WorkloadId]) -> Vec<WorkloadOutcome> {
    let mut settled = report.outcomes.clone();
    let reached_all = plan
        .iter()
        .all(|w| settled.iter().any(|o| o.workload == *w));
    let charged = settled
        .iter()
        .any(|o| matches!(o.status, Status::Crash | Status::Timeout));
    if reached_all || charged || report.interrupted {
        return settled;
    }
    // The guest ended (or hung) with nothing to charge it to: boot failure, a damaged
    // stream, a guest that stopped early. Everything left gets the reason.
    let why = match &report.end {
        GuestEnd::Exited { code } => format!("the guest exited (code {code}) before running it"),
        GuestEnd::TripleFault { detail } | GuestEnd::Failed { detail } => format!(
            "the guest died before running it: {}",
            crate::console::escape_text(detail)
        ),
        GuestEnd::Stopped => "the guest never started it before the time limit".to_string(),
    };
    let others: Vec<&String> = report
        .problems
        .iter()
        .filter(|p| !why.contains(p.as_str()))
        .collect();
    let context = if others.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            others
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    // A guest that triple-faults before its first line crashed; a VMM that fails, or a
    // guest that stops early, is an error of the run.
    let status = match &report.end {
        GuestEnd::TripleFault { .. } if report.hello.is_none() => Status::Crash,
        _ => Status::Error,
    };
    for &w in plan {
        if !settled.iter().any(|o| o.workload == w) {
            settled.push(WorkloadOutcome::failed(
                w,
                status,
                format!("{why}{context}"),
            ));
        }
    }
    settled
}

/// One command that measures workload `w` again, as this run did: each argument quoted
/// for a POSIX shell, so that it can be pasted as it is.
pub fn reproduce_command(backend: &dyn Hypervisor, options: &RunOptions, w: WorkloadId) -> String {
    let mut words = backend.reproduce_prefix();
    words.extend(
        [
            "hvbench",
            "run",
            "--backend",
            backend.kind().name(),
            "--workload",
            w.name(),
        ]
        .map(String::from),
    );
    for (option, value) in [
        ("--samples", u64::from(options.samples)),
        ("--warmup", u64::from(options.warmup)),
        ("--sample-us", u64::from(options.sample_us)),
        ("--timeout-s", options.workload_timeout.as_secs()),
        ("--memory-mib", u64::from(options.memory_mib)),
        ("--vcpus", u64::from(options.vcpus)),
    ] {
        words.extend([option.to_string(), value.to_string()]);
    }
    words.extend(backend.reproduce_args());
    for p in options.params.iter().filter(|p| p.workload == w) {
        words.extend([
            "--param".to_string(),
            format!("{}.{}={}", w.name(), p.key, p.value),
        ]);
    }
    if let Some(path) = &options.guest_path {
        words.extend(["--guest".to_string(), path.to_string_lossy().into_owned()]);
    }
    words.extend([
        "--out".to_string(),
        format!("hvbench-reproduce-{}", w.name()),
    ]);
    words
        .iter()
        .map(|word| shell_word(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `word` as one word of a POSIX shell command: as it is when it holds only characters
/// no shell treats specially, else in single quotes (a `'` inside becomes `'\''`).
pub fn shell_word(word: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,:=@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        std::borrow::Cow::Borrowed(word)
    } else {
        std::borrow::Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

#[cfg(test)]
mod reproduce_tests {
    use super::*;
    use crate::backend::{BackendKind, GuestSession};
    use reports::record::{BackendInfo, HostInfo};
    use workloads::BackendFeature;

    /// A backend that only says how it is reproduced.
    #[derive(Debug)]
    struct Awkward;

    impl Hypervisor for Awkward {
        fn kind(&self) -> BackendKind {
            BackendKind::Xen
        }
        fn info(&self) -> BackendInfo {
            BackendInfo::default()
        }
        fn host(&self) -> HostInfo {
            HostInfo::default()
        }
        fn supports(&self, _: BackendFeature) -> Result<(), crate::backend::Unsupported> {
            Ok(())
        }
        fn guest_runs_locally(&self) -> bool {
            false
        }
        fn boot(&self, _: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
            unimplemented!("never booted")
        }
        fn reproduce_args(&self) -> Vec<String> {
            [
                "--xen-host",
                "ssh://it's a \"host\" $HOME `id`",
                "--paging",
                "",
            ]
            .map(String::from)
            .to_vec()
        }
        fn reproduce_prefix(&self) -> Vec<String> {
            ["env", "A=$PATH", "--"].map(String::from).to_vec()
        }
    }

    /// The words a POSIX shell makes of `command`.
    fn shell_words(command: &str) -> Vec<String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("set -- {command}; printf '%s\\0' \"$@\""))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(String::from)
            .collect()
    }

    #[test]
    fn reproduce_commands_survive_the_shell() {
        let options = RunOptions {
            workloads: vec![WorkloadId::CpuIdle],
            samples: 3,
            warmup: 1,
            sample_us: 100,
            repeat: 1,
            workload_timeout: Duration::from_secs(60),
            boot_timeout: Duration::from_secs(60),
            memory_mib: 64,
            vcpus: 1,
            guest_path: Some(PathBuf::from("/tmp/my guest's $HOME\\.elf")),
            out: PathBuf::from("o"),
            params: Vec::new(),
            insn_markers: true,
        };
        let command = reproduce_command(&Awkward, &options, WorkloadId::CpuIdle);
        let words = shell_words(&command);
        assert_eq!(words[..3], ["env", "A=$PATH", "--"], "{command}");
        assert!(
            words
                .windows(2)
                .any(|w| w == ["--xen-host", "ssh://it's a \"host\" $HOME `id`"]),
            "{command}"
        );
        assert!(words.windows(2).any(|w| w == ["--paging", ""]), "{command}");
        assert!(
            words
                .windows(2)
                .any(|w| w == ["--guest", "/tmp/my guest's $HOME\\.elf"]),
            "{command}"
        );
        // Plain words stay readable.
        assert!(
            command.contains("hvbench run --backend xen --workload cpu.idle --samples 3"),
            "{command}"
        );
    }

    #[test]
    fn shell_words_quote_only_what_needs_it() {
        assert_eq!(
            shell_word("mem.tlb-chase.ws=64k,16m"),
            "mem.tlb-chase.ws=64k,16m"
        );
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$x"), "'$x'");
        assert_eq!(shell_word("~"), "'~'");
    }
}

#[cfg(test)]
mod run_loop_tests {
    use super::*;
    use crate::backend::{GuestMessage, GuestSession};
    use std::cell::Cell;
    use std::sync::mpsc::{channel, Receiver};
    use workloads::protocol::{LineBuilder, LineKind};

    /// A guest that prints `console`, then exits.
    #[derive(Debug)]
    struct Printed(Receiver<GuestMessage>);

    impl GuestSession for Printed {
        fn messages(&self) -> &Receiver<GuestMessage> {
            &self.0
        }
        fn stop(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    /// A backend whose every boot prints the same lines; it refuses a boot past `max_boots`,
    /// so a run that would boot forever ends with an error instead of hanging the test.
    #[derive(Debug)]
    struct Scripted {
        console: Vec<u8>,
        boots: Cell<u32>,
        max_boots: u32,
    }

    impl Hypervisor for Scripted {
        fn kind(&self) -> crate::backend::BackendKind {
            crate::backend::BackendKind::Kvm
        }
        fn info(&self) -> reports::record::BackendInfo {
            Default::default()
        }
        fn host(&self) -> reports::record::HostInfo {
            Default::default()
        }
        fn supports(
            &self,
            _: workloads::BackendFeature,
        ) -> Result<(), crate::backend::Unsupported> {
            Ok(())
        }
        fn guest_runs_locally(&self) -> bool {
            false
        }
        fn boot(&self, _: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
            self.boots.set(self.boots.get() + 1);
            if self.boots.get() > self.max_boots {
                return Err(crate::backend::kvm::VmmError::Load("booted again".into()).into());
            }
            let (tx, rx) = channel();
            let _ = tx.send(GuestMessage::Console {
                bytes: self.console.clone(),
                exits: None,
            });
            let _ = tx.send(GuestMessage::Ended(GuestEnd::Exited { code: 1 }));
            Ok(Box::new(Printed(rx)))
        }
    }

    fn line(b: &mut LineBuilder) -> Vec<u8> {
        b.finish().to_vec()
    }

    #[test]
    fn a_guest_that_skips_everything_is_booted_once() {
        let mut console = line(
            LineBuilder::new(LineKind::Hello)
                .num("proto", 1)
                .text("hv", "kvm")
                .text("sig", "KVMKVMKVM")
                .text("vendor", "test")
                .text("tsc_src", "none"),
        );
        for w in ["cpu.idle", "cpu.rdtsc"] {
            console.extend(line(
                LineBuilder::new(LineKind::Skip)
                    .text("w", w)
                    .text("reason", "not here"),
            ));
        }
        let backend = Scripted {
            console,
            boots: Cell::new(0),
            max_boots: 3,
        };
        let dir = tempfile::tempdir().unwrap();
        let options = RunOptions {
            workloads: vec![WorkloadId::CpuIdle, WorkloadId::CpuRdtsc],
            samples: 5,
            warmup: 1,
            sample_us: 1000,
            repeat: 1,
            workload_timeout: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(5),
            memory_mib: 64,
            vcpus: 1,
            guest_path: None,
            out: dir.path().to_path_buf(),
            params: Vec::new(),
            insn_markers: true,
        };
        let image = GuestImage::embedded().unwrap();
        let mut writer = ResultsWriter::create(dir.path(), false).unwrap();
        let summary = run(
            &backend,
            &image,
            &options,
            &mut writer,
            &AtomicBool::new(false),
        )
        .unwrap_or_else(|e| panic!("after {} boots: {e}", backend.boots.get()));
        assert_eq!(backend.boots.get(), 1);
        let statuses: Vec<_> = summary
            .records
            .iter()
            .map(|r| (r.workload.as_str(), r.status))
            .collect();
        assert_eq!(
            statuses,
            vec![("cpu.idle", Status::Skip), ("cpu.rdtsc", Status::Skip)]
        );
    }

    #[test]
    fn a_boot_that_settles_nothing_ends_the_plan() {
        let outcomes = no_progress(&[WorkloadId::CpuIdle, WorkloadId::CpuRdtsc], 7);
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(|o| o.status == Status::Error
            && o.reason
                .as_deref()
                .unwrap_or("")
                .contains("boot 7 settled none")));
    }
}

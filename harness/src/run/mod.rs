//! A run: the selected workloads, booted on one backend `--repeat` times. A guest that
//! crashes or hangs costs only the workload it was running: the host records it and boots
//! a fresh guest for the rest. Records are written as each workload finishes, so an
//! interrupted run keeps everything measured so far.

pub mod balloon;
pub mod host_driven;
pub mod plan;
pub mod records;
pub mod session;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use reports::record::{GuestInfo, Record, RunParameters, ToolInfo};
use reports::{ResultsError, ResultsWriter};
use thiserror::Error;
use workloads::cmdline::{self, GuestConfig};
use workloads::protocol::{Hello, Status};
use workloads::{Driver, WorkloadId};

use self::records::RecordContext;
use self::session::{BootReport, Limits, WorkloadOutcome};
use crate::backend::{BackendError, BootRequest, GuestEnd, Hypervisor};
use crate::guest_image::GuestImage;

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
}

impl RunOptions {
    /// The guest's configuration for `workloads`, with this run's sampling options.
    pub fn guest_config(&self, workloads: &[WorkloadId]) -> GuestConfig {
        let mut config = GuestConfig {
            samples: self.samples,
            warmup: self.warmup,
            sample_us: self.sample_us,
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
    eprintln!("hvbench: {text}");
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

/// The run: boots, drives, records. Stops early (keeping what it wrote) when
/// `interrupted` is set.
pub fn run(
    backend: &dyn Hypervisor,
    image: &GuestImage,
    options: &RunOptions,
    writer: &mut ResultsWriter,
    interrupted: &AtomicBool,
) -> Result<RunSummary, RunError> {
    let kind = backend.kind().name();
    let run_id = run_id(kind);
    let backend_info = backend.info();
    let host = backend.host();
    let tool = tool_info();
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
    let reproduce = |w: WorkloadId| reproduce_command(backend, options, w);
    let limits = Limits {
        boot: options.boot_timeout,
        workload: options.workload_timeout,
    };
    let mut summary = RunSummary {
        run_id: run_id.clone(),
        records: Vec::new(),
        interrupted: false,
        problems: Vec::new(),
    };
    let mut boots = 0u32;

    for repeat in 0..options.repeat {
        let mut outcomes: Vec<WorkloadOutcome> = Vec::new();
        let mut pending: Vec<WorkloadId> = Vec::new();
        let mut host_driven: Vec<WorkloadId> = Vec::new();
        for &w in &options.workloads {
            match plan::backend_skip(w, backend) {
                Some(reason) => outcomes.push(WorkloadOutcome::skipped(w, reason)),
                None if w.spec().driver == Driver::Host => host_driven.push(w),
                None => pending.push(w),
            }
        }
        let mut guest = GuestInfo {
            image_sha256: image.sha256().to_string(),
            ..Default::default()
        };
        let native_here = backend.guest_runs_locally();
        let mut write = |outcome: &WorkloadOutcome,
                         guest: &GuestInfo,
                         summary: &mut RunSummary|
         -> Result<(), RunError> {
            let ctx = RecordContext {
                run_id: &run_id,
                repeat,
                backend: &backend_info,
                host: &host,
                guest,
                parameters: &parameters,
                tool: &tool,
                tsc_khz: guest
                    .tsc_khz
                    .or(if native_here { host.tsc_khz } else { None }),
                native_here,
                reproduce: &reproduce,
                workload_params: &options.params,
                guest_ram: backend.guest_ram_advice(),
            };
            for record in records::build(outcome, &ctx) {
                writer.write(&record)?;
                progress(&format!("[{kind} #{repeat}] {}", one_line(&record)));
                summary.records.push(record);
            }
            Ok(())
        };
        // Host-side skips are written at once, with what is known before any boot.
        for outcome in &outcomes {
            write(outcome, &guest, &mut summary)?;
        }

        while !pending.is_empty() {
            if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
                summary.interrupted = true;
                return Ok(summary);
            }
            let line = options.guest_cmdline(&pending);
            boots += 1;
            let request = BootRequest {
                image,
                cmdline: &line,
                memory_mib: options.memory_mib,
                vcpus: options.vcpus,
                name: format!("hvbench-{}-{boots}", std::process::id()),
            };
            let boot_started = std::time::Instant::now();
            let mut session = backend.boot(&request).map_err(|source| RunError::Boot {
                backend: kind,
                source,
            })?;
            // Each outcome is written the moment the guest settles it, except those whose
            // native twin must run here: that waits until the guest is down, so the guest
            // (busy on the next workload) cannot slow the native run (on SMT siblings it
            // did, by 2.6x). A write error stops the run once the guest is down.
            let mut write_error = None;
            let mut deferred = Vec::new();
            let mut sink =
                |outcome: &WorkloadOutcome, hello: Option<(&Hello, std::time::Instant)>| {
                    if let Some((hello, at)) = hello {
                        guest =
                            guest_info(image, hello, backend.guest_runs_locally(), host.tsc_khz);
                        guest.boot_ms = Some(at.duration_since(boot_started).as_secs_f64() * 1e3);
                    }
                    if native_here && outcome.workload.spec().native_twin {
                        deferred.push(outcome.clone());
                    } else if write_error.is_none() {
                        if let Err(e) = write(outcome, &guest, &mut summary) {
                            write_error = Some(e);
                        }
                    }
                };
            let expected = plan::ExpectedSeries::new(&pending, &options.params);
            let report = session::drive(
                session.as_mut(),
                &pending,
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
                guest = guest_info(image, hello, backend.guest_runs_locally(), host.tsc_khz);
                guest.boot_ms = Some(at.duration_since(boot_started).as_secs_f64() * 1e3);
            }
            for outcome in &deferred {
                write(outcome, &guest, &mut summary)?;
            }
            let reached: Vec<WorkloadId> = report.outcomes.iter().map(|o| o.workload).collect();
            for outcome in settle(&report, &pending) {
                if !reached.contains(&outcome.workload) {
                    write(&outcome, &guest, &mut summary)?;
                }
            }
            pending.retain(|w| {
                !summary
                    .records
                    .iter()
                    .any(|r| r.repeat == repeat && r.workload == w.name())
            });
            summary.problems.extend(report.problems.iter().cloned());
            if report.interrupted {
                summary.interrupted = true;
                return Ok(summary);
            }
        }
        for &w in &host_driven {
            if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
                summary.interrupted = true;
                return Ok(summary);
            }
            let ctx = host_driven::HostContext {
                backend,
                image,
                options,
                interrupted,
            };
            let done = host_driven::run(w, &ctx);
            // The guest this workload booted describes itself; else the last one's words.
            let booted = done
                .hello
                .as_ref()
                .map(|hello| guest_info(image, hello, backend.guest_runs_locally(), host.tsc_khz));
            write(
                &done.outcome,
                booted.as_ref().unwrap_or(&guest),
                &mut summary,
            )?;
            if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
                summary.interrupted = true;
                return Ok(summary);
            }
        }
    }
    Ok(summary)
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
        GuestEnd::TripleFault { detail } | GuestEnd::Failed { detail } => {
            format!("the guest died before running it: {detail}")
        }
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

/// One command that measures workload `w` again, as this run did.
pub fn reproduce_command(backend: &dyn Hypervisor, options: &RunOptions, w: WorkloadId) -> String {
    let mut cmd = backend
        .reproduce_prefix()
        .map(|prefix| format!("{prefix} "))
        .unwrap_or_default();
    cmd += &format!(
        "hvbench run --backend {} --workload {} --samples {} --warmup {} --sample-us {} --timeout-s {} --memory-mib {} --vcpus {}",
        backend.kind().name(),
        w.name(),
        options.samples,
        options.warmup,
        options.sample_us,
        options.workload_timeout.as_secs(),
        options.memory_mib,
        options.vcpus,
    );
    for arg in backend.reproduce_args() {
        cmd.push(' ');
        cmd.push_str(&arg);
    }
    for p in options.params.iter().filter(|p| p.workload == w) {
        cmd.push_str(&format!(" --param {}.{}={}", w.name(), p.key, p.value));
    }
    if let Some(path) = &options.guest_path {
        cmd.push_str(&format!(" --guest {}", path.display()));
    }
    cmd.push_str(&format!(" --out hvbench-reproduce-{}", w.name()));
    cmd
}

//! From a workload's outcome to records: cycles converted to the table's unit, every
//! sample kept, statistics, the native twin, and the command that reproduces the figure.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use reports::record::{
    BackendInfo, GuestInfo, HostInfo, NativeComparison, Record, RunParameters, ToolInfo,
    SCHEMA_VERSION,
};
use reports::stats::{median, summarize};
use workloads::protocol::Status;
use workloads::{Direction, Privilege, Unit, WorkloadId};

use super::plan::{effective_params, series_points, SeriesPoint};
use super::session::{SeriesSamples, WorkloadOutcome};
use hostutil::huge_pages::{self, HugePageAdvice};

use super::native::{self, TwinPlan};
use crate::insns::InsnLog;

/// TSC rate assumed for sizing native runs where this host gives none (as the guest does).
const FALLBACK_TSC_KHZ: u64 = 1_000_000;
/// Record notes where the host says how guest RAM and the native twin's buffers were
/// backed, and why a ratio is absent.
const NOTE_GUEST_RAM: &str = "host_backing_guest_ram";
const NOTE_NATIVE: &str = "host_backing_native";
const NOTE_RATIO: &str = "native_ratio";

/// What every record of one boot shares.
pub struct RecordContext<'a> {
    pub run_id: &'a str,
    pub repeat: u32,
    pub backend: &'a BackendInfo,
    pub host: &'a HostInfo,
    pub guest: &'a GuestInfo,
    pub parameters: &'a RunParameters,
    pub tool: &'a ToolInfo,
    /// TSC frequency for converting cycles (the guest's, else the host's when local).
    pub tsc_khz: Option<u64>,
    /// Whether native twins measured here compare with the guest (same machine).
    pub native_here: bool,
    /// The command that re-runs one workload.
    pub reproduce: &'a dyn Fn(WorkloadId) -> String,
    pub workload_params: &'a [super::WorkloadParam],
    /// The huge-page advice the guest's RAM was mapped with, where the backend says.
    pub guest_ram: Option<HugePageAdvice>,
    /// The block workloads' disk file and whether it is used with O_DIRECT.
    pub disk: Option<(&'a std::path::Path, bool)>,
}

impl std::fmt::Debug for RecordContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordContext")
            .field("run_id", &self.run_id)
            .field("repeat", &self.repeat)
            .field("backend", &self.backend.kind)
            .finish_non_exhaustive()
    }
}

pub use hostutil::rfc3339;

fn parse_series(params: &str) -> BTreeMap<String, String> {
    params
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

/// Converts the guest's cycles per operation into the metric's unit.
fn to_unit(cycles_per_op: f64, unit: Unit, tsc_khz: Option<u64>) -> Option<f64> {
    let khz = tsc_khz? as f64;
    match unit {
        Unit::Ns => Some(cycles_per_op * 1e6 / khz),
        // Operations are bytes: bytes per second / 1e6.
        Unit::MBps => (cycles_per_op > 0.0).then(|| khz / (1000.0 * cycles_per_op)),
        // Operations are requests: requests per second.
        Unit::Iops => (cycles_per_op > 0.0).then(|| khz * 1000.0 / cycles_per_op),
        // Host-measured units never come as cycles.
        Unit::Seconds | Unit::MiB | Unit::Pages | Unit::Ratio => None,
    }
}

/// The records of one workload outcome: one per metric and series.
pub fn build(outcome: &WorkloadOutcome, ctx: &RecordContext) -> Vec<Record> {
    let spec = outcome.workload.spec();
    let mut keys: Vec<(&'static str, String)> = outcome.series.keys().cloned().collect();
    if keys.is_empty() {
        keys = spec
            .metrics
            .iter()
            .map(|m| (m.name, String::new()))
            .collect();
    }
    if keys.is_empty() {
        // Self-tests measure nothing; their record carries the outcome alone.
        keys.push(("outcome", String::new()));
    }
    keys.iter()
        .map(|(metric, params)| {
            let empty = SeriesSamples::default();
            let series = outcome
                .series
                .get(&(*metric, params.clone()))
                .unwrap_or(&empty);
            build_one(outcome, ctx, metric, params, series)
        })
        .collect()
}

fn build_one(
    outcome: &WorkloadOutcome,
    ctx: &RecordContext,
    metric: &str,
    params: &str,
    series: &SeriesSamples,
) -> Record {
    let spec = outcome.workload.spec();
    let metric_spec = spec.metrics.iter().find(|m| m.name == metric);
    let unit = metric_spec.map(|m| m.unit).unwrap_or(Unit::Ns);
    let mut verdict = Verdict {
        status: outcome.status,
        reason: outcome.reason.clone(),
    };
    let figures = Figures::of(series, unit, ctx.tsc_khz, &mut verdict);
    let samples = figures.samples;
    let (samples_cycles, warmup_samples) = (figures.cycles, figures.warmup);

    // The series the host asked for that this record is of (only those are kept).
    let point = series_points(ctx.workload_params, outcome.workload)
        .into_iter()
        .find(|p| p.name == params);
    let interrupted = crate::interrupt::flag();
    if outcome.workload == WorkloadId::CpuCompute && verdict.status == Status::Success {
        let check = point
            .as_ref()
            .ok_or_else(|| "the host asked for no such series".to_string())
            .and_then(|point| verify_compute(outcome, &twin_plan(ctx, point, interrupted, metric)));
        if let Err(text) = check {
            verdict.ratchet(Status::Failure, text);
        }
    }
    let series_map = parse_series(params);
    let mut notes = outcome.notes.clone();
    let mut native = None;
    if spec.native_twin.is_some() && ctx.native_here && verdict.status == Status::Success {
        let direction = metric_spec
            .map(|m| m.direction)
            .unwrap_or(Direction::LowerIsBetter);
        let twin = Twin {
            metric,
            workload: outcome.workload,
            unit,
            direction,
            guest_samples: &samples,
        };
        native = twin.compare(ctx, point.as_ref(), interrupted, &mut notes, &mut verdict);
    }

    Record {
        schema: SCHEMA_VERSION,
        run_id: ctx.run_id.to_string(),
        repeat: ctx.repeat,
        timestamp: rfc3339(SystemTime::now()),
        workload: spec.name.to_string(),
        group: spec.group.name().to_string(),
        description: spec.description.to_string(),
        privilege: match spec.privilege {
            Privilege::Kernel => "cpl0",
            Privilege::User => "cpl3",
        }
        .to_string(),
        metric: metric.to_string(),
        unit: metric_spec.map(|m| m.unit.name()).unwrap_or("").to_string(),
        direction: metric_spec
            .map(|m| m.direction.name())
            .unwrap_or("")
            .to_string(),
        series: series_map,
        status: verdict.status,
        reason: verdict.reason,
        summary: summarize(&samples),
        samples,
        samples_cycles,
        ops_per_sample: series.measured.iter().map(|(ops, _)| *ops).collect(),
        warmup_samples,
        native,
        notes,
        exits: outcome
            .exits
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        curves: outcome
            .curves
            .iter()
            .filter(|(_, (m, _))| m == metric)
            .map(|(name, (_, c))| (name.clone(), c.clone()))
            .collect(),
        backend: ctx.backend.clone(),
        host: ctx.host.clone(),
        guest: ctx.guest.clone(),
        parameters: RunParameters {
            // Every parameter of the row, the user's value or the row's default.
            workload_params: effective_params(ctx.workload_params, outcome.workload),
            ..ctx.parameters.clone()
        },
        hvbench: ctx.tool.clone(),
        reproduce: (ctx.reproduce)(outcome.workload),
    }
}

/// The metric, unit and direction of instruction-count records.
pub const INSNS_METRIC: &str = "insns";
pub const INSNS_UNIT: &str = "insns/op";

/// Beside each guest-timed record of `outcome`, its `insns` record: instructions per
/// operation for each measured sample, joined by the sample's marker number with the
/// plugin's count. A series without markers, or whose markers the plugin never counted,
/// gets an `insns` record with status skip that says why; the counts are never guessed.
pub fn insns_records(built: &[Record], outcome: &WorkloadOutcome, log: &InsnLog) -> Vec<Record> {
    let timed: Vec<(&Record, &SeriesSamples)> = built
        .iter()
        .filter(|r| r.status == Status::Success)
        .filter_map(|r| {
            let key = outcome
                .series
                .keys()
                .find(|(m, p)| *m == r.metric && parse_series(p) == r.series)?;
            let series = &outcome.series[key];
            (!series.measured.is_empty() && series.direct.is_empty()).then_some((r, series))
        })
        .collect();
    if timed.is_empty() {
        return Vec::new();
    }
    let pairs = log.pairs();
    timed
        .into_iter()
        .map(|(record, series)| match &pairs {
            Ok(pairs) => insns_record(record, series, pairs),
            Err(e) => insns_skip(record, format!("the plugin's log could not be read: {e}")),
        })
        .collect()
}

fn insns_record(
    record: &Record,
    series: &SeriesSamples,
    pairs: &BTreeMap<u64, Option<u64>>,
) -> Record {
    if series.markers.iter().all(Option::is_none) {
        return insns_skip(
            record,
            "no instruction count: the guest placed no markers around its samples \
             (markers off, or a workload that times its samples itself)"
                .into(),
        );
    }
    let mut samples = Vec::new();
    let mut ops = Vec::new();
    let mut uncounted = 0usize;
    for (&(n, _), marker) in series.measured.iter().zip(&series.markers) {
        match marker.and_then(|m| pairs.get(&m).copied().flatten()) {
            Some(count) if n > 0 => {
                samples.push(count as f64 / n as f64);
                ops.push(n);
            }
            _ => uncounted += 1,
        }
    }
    if samples.is_empty() {
        return insns_skip(
            record,
            "no instruction count: the guest placed markers but the plugin counted none of \
             them (not under TCG with the hvbench-insns plugin, or every sample moved vCPU)"
                .into(),
        );
    }
    let mut insns = insns_base(record);
    if uncounted > 0 {
        insns.notes.insert(
            "insns_uncounted".into(),
            format!(
                "{uncounted} sample(s) had no count (stop marker on another vCPU, or QEMU \
                 ran vCPUs on several threads)"
            ),
        );
    }
    insns.summary = summarize(&samples);
    insns.samples = samples;
    insns.ops_per_sample = ops;
    insns
}

/// The record's context with the `insns` metric and nothing measured yet.
fn insns_base(record: &Record) -> Record {
    let mut notes = BTreeMap::new();
    notes.insert("insns_method".into(), crate::insns::METHOD.into());
    notes.insert(
        "insns_plugin".into(),
        format!("hvbench-insns-plugin {}", env!("CARGO_PKG_VERSION")),
    );
    Record {
        metric: INSNS_METRIC.into(),
        unit: INSNS_UNIT.into(),
        direction: Direction::LowerIsBetter.name().into(),
        status: Status::Success,
        reason: None,
        samples: Vec::new(),
        samples_cycles: Vec::new(),
        ops_per_sample: Vec::new(),
        warmup_samples: Vec::new(),
        summary: None,
        native: None,
        notes,
        curves: BTreeMap::new(),
        ..record.clone()
    }
}

fn insns_skip(record: &Record, reason: String) -> Record {
    Record {
        status: Status::Skip,
        reason: Some(reason),
        ..insns_base(record)
    }
}

/// A series' samples: per operation in cycles, and in the metric's unit.
struct Figures {
    cycles: Vec<f64>,
    samples: Vec<f64>,
    warmup: Vec<f64>,
}

impl Figures {
    /// Converts the guest's cycles with the TSC frequency (host-measured series are in
    /// their unit already); without a frequency only cycles are kept, and that is an error.
    fn of(series: &SeriesSamples, unit: Unit, tsc_khz: Option<u64>, verdict: &mut Verdict) -> Self {
        if series.direct.is_empty() {
            Self::check_clock(&series.measured, verdict);
        }
        let per_op = |(ops, cycles): &(u64, u64)| *cycles as f64 / (*ops).max(1) as f64;
        let cycles: Vec<f64> = series.measured.iter().map(per_op).collect();
        let convert = |cycles: &[f64]| -> Option<Vec<f64>> {
            cycles.iter().map(|c| to_unit(*c, unit, tsc_khz)).collect()
        };
        let warmup_cycles: Vec<f64> = series.warmup.iter().map(per_op).collect();
        let converted = if series.direct.is_empty() {
            (convert(&cycles), convert(&warmup_cycles))
        } else {
            (Some(series.direct.clone()), Some(Vec::new()))
        };
        let (samples, warmup) = match converted {
            (Some(s), Some(w)) => (s, w),
            _ => {
                verdict.ratchet(
                    Status::Error,
                    "no TSC frequency is known (neither the guest's hypervisor nor this host \
                     gave one): only cycles are kept"
                        .into(),
                );
                (Vec::new(), Vec::new())
            }
        };
        if verdict.status == Status::Success && samples.is_empty() {
            verdict.ratchet(Status::Error, "the guest reported no samples".into());
        }
        Figures {
            cycles,
            samples,
            warmup,
        }
    }
}

impl Figures {
    /// kvm-unit-tests' validity predicate for a timed sample: the guest's clock must have
    /// advanced over it. A sample of zero cycles (a TSC too coarse for the operation, as
    /// under some emulators) measured nothing: the series is an error, its samples kept.
    fn check_clock(measured: &[(u64, u64)], verdict: &mut Verdict) {
        let stopped: Vec<u64> = measured
            .iter()
            .filter(|(_, cycles)| *cycles == 0)
            .map(|(ops, _)| *ops)
            .collect();
        if let Some(most_ops) = stopped.iter().max() {
            verdict.ratchet(
                Status::Error,
                format!(
                    "the guest's clock did not advance during {} of {} samples (0 cycles for \
                     up to {most_ops} operations): too coarse a TSC to time this operation \
                     here; the samples are kept",
                    stopped.len(),
                    measured.len()
                ),
            );
        }
    }
}

/// What the native comparison of one series needs from its record.
struct Twin<'a> {
    metric: &'a str,
    workload: WorkloadId,
    unit: Unit,
    direction: Direction,
    guest_samples: &'a [f64],
}

impl Twin<'_> {
    /// Runs the native twin for the series the host asked for (`point`), with the guest
    /// RAM's page backing; notes both backings and why a ratio is missing; a twin that
    /// fails is an error of the record.
    fn compare(
        &self,
        ctx: &RecordContext,
        point: Option<&SeriesPoint>,
        interrupted: &AtomicBool,
        notes: &mut BTreeMap<String, String>,
        verdict: &mut Verdict,
    ) -> Option<NativeComparison> {
        let result = match point {
            Some(point) => {
                let plan = twin_plan(ctx, point, interrupted, self.metric);
                let thp = huge_pages::thp_mode();
                let guest_ram = ctx
                    .guest_ram
                    .map_or("unknown".into(), |a| a.describe(thp.as_deref()));
                notes.insert(NOTE_GUEST_RAM.into(), guest_ram);
                notes.insert(NOTE_NATIVE.into(), plan.backing.describe(thp.as_deref()));
                let samples = self.guest_samples;
                native_twin(
                    self.workload,
                    &plan,
                    self.unit,
                    self.direction,
                    ctx,
                    samples,
                )
            }
            None => Err("the host asked for no such series".into()),
        };
        match result {
            Ok(Comparison::Twin(n, why)) => {
                if let Some(why) = why {
                    notes.insert(NOTE_RATIO.into(), why);
                }
                Some(n)
            }
            Ok(Comparison::NoRatio(why)) => {
                notes.insert(NOTE_RATIO.into(), why);
                None
            }
            Ok(Comparison::NoTwin) => None,
            Err(text) => {
                verdict.ratchet(Status::Error, format!("native twin: {text}"));
                None
            }
        }
    }
}

/// A record's status and the reason for it; only ratchets upwards.
struct Verdict {
    status: Status,
    reason: Option<String>,
}

impl Verdict {
    fn ratchet(&mut self, status: Status, reason: String) {
        if status > self.status {
            self.status = status;
            self.reason = Some(reason);
        }
    }
}

/// What a native run of `point` is sized by: the host's series, `--sample-us` at this
/// host's TSC rate, the guest RAM's huge-page advice.
fn twin_plan<'a>(
    ctx: &RecordContext<'a>,
    point: &'a SeriesPoint,
    interrupted: &'a std::sync::atomic::AtomicBool,
    metric: &'a str,
) -> TwinPlan<'a> {
    let khz = ctx.host.tsc_khz.unwrap_or(FALLBACK_TSC_KHZ);
    TwinPlan {
        metric,
        sample_us: ctx.parameters.sample_us,
        tsc_khz: ctx.tsc_khz.unwrap_or(khz),
        run_id: ctx.run_id,
        repeat: ctx.repeat,
        params: ctx.workload_params,
        disk: ctx.disk,
        point,
        backing: ctx.guest_ram.unwrap_or(HugePageAdvice::NoAdvice),
        min_cycles: native::cycles_from_tsc_khz(ctx.parameters.sample_us, khz),
        warmup: ctx.parameters.warmup,
        samples: ctx.parameters.samples,
        interrupted,
    }
}

/// Checks the guest's compute checksum against the host's for the rounds it reported
/// (bounded by what the host needs for one sample).
fn verify_compute(outcome: &WorkloadOutcome, plan: &TwinPlan) -> Result<(), String> {
    let rounds = outcome
        .notes
        .get("rounds")
        .and_then(|r| parse_hex(r))
        .ok_or("the guest did not report its round count")?;
    let reported = outcome
        .notes
        .get("checksum")
        .and_then(|c| parse_hex(c))
        .ok_or("the guest did not report its checksum")?;
    let expected = native::compute_checksum(rounds, plan)
        .map_err(|e| format!("the checksum was not verified: {e}"))?;
    if reported != expected {
        return Err(format!(
            "wrong result: the guest's checksum {reported:#x} differs from the host's {expected:#x} for {rounds} rounds"
        ));
    }
    Ok(())
}

/// What a native twin gave the record.
#[derive(Debug, PartialEq)]
enum Comparison {
    /// The workload has no twin.
    NoTwin,
    /// The twin ran; its ratio is absent where it would not be a finite positive number,
    /// and the reason is given (for the record's notes).
    Twin(NativeComparison, Option<String>),
    /// No medians to compare (no samples on one side); why.
    NoRatio(String),
}

/// The guest's performance relative to native from the medians (1.0 = native speed), or
/// why there is none: never an infinite or NaN ratio.
fn ratio(native_median: f64, guest_median: f64, direction: Direction) -> Result<f64, String> {
    let usable = |v: f64| v.is_finite() && v > 0.0;
    if !usable(guest_median) {
        return Err(format!(
            "no guest/native ratio: the guest's median is {guest_median}"
        ));
    }
    if !usable(native_median) {
        return Err(format!(
            "no guest/native ratio: the native median is {native_median}"
        ));
    }
    let ratio = match direction {
        Direction::LowerIsBetter => native_median / guest_median,
        Direction::HigherIsBetter => guest_median / native_median,
    };
    if ratio.is_finite() && ratio > 0.0 {
        Ok(ratio)
    } else {
        Err(format!(
            "no guest/native ratio: {native_median} native against {guest_median} in the guest"
        ))
    }
}

/// Runs the workload's native twin on the host's series and compares: the ratio is the
/// guest's performance relative to native (1.0 = native speed).
fn native_twin(
    workload: WorkloadId,
    plan: &TwinPlan,
    unit: Unit,
    direction: Direction,
    ctx: &RecordContext,
    guest_samples: &[f64],
) -> Result<Comparison, String> {
    let Some(result) = native::twin(workload, plan) else {
        return Ok(Comparison::NoTwin);
    };
    let cycles = match result {
        // A baseline this host cannot run (no fio) leaves the guest's figures standing.
        Err(native::TwinError::Unavailable(why)) => {
            return Ok(Comparison::NoRatio(format!("no native twin: {why}")))
        }
        other => other.map_err(|e| e.to_string())?,
    };
    let samples: Vec<f64> = cycles
        .iter()
        .map(|c| to_unit(*c, unit, ctx.tsc_khz))
        .collect::<Option<_>>()
        .ok_or("no TSC frequency to convert native cycles")?;
    let (Some(native_median), Some(guest_median)) = (median(&samples), median(guest_samples))
    else {
        return Ok(Comparison::NoRatio(
            "no guest/native ratio: no samples on one side".into(),
        ));
    };
    let (ratio, why) = match ratio(native_median, guest_median, direction) {
        Ok(ratio) => (Some(ratio), None),
        Err(why) => (None, Some(why)),
    };
    let native = NativeComparison {
        samples,
        median: native_median,
        ratio,
    };
    Ok(Comparison::Twin(native, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        let at = |s: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_664_096), "2026-11-26T03:34:56Z");
    }

    #[test]
    fn series_parameters() {
        let s = parse_series("ws:64k,page:4k");
        assert_eq!(s.get("ws").map(String::as_str), Some("64k"));
        assert_eq!(s.get("page").map(String::as_str), Some("4k"));
        assert!(parse_series("").is_empty());
    }

    #[test]
    fn a_sample_the_clock_did_not_time_is_an_error() {
        let series = |measured: Vec<(u64, u64)>| SeriesSamples {
            measured,
            markers: Vec::new(),
            warmup: vec![(8, 0)],
            direct: Vec::new(),
        };
        let mut verdict = Verdict {
            status: Status::Success,
            reason: None,
        };
        let timed = series(vec![(8, 100), (8, 120)]);
        Figures::of(&timed, Unit::Ns, Some(1_000_000), &mut verdict);
        assert_eq!(verdict.status, Status::Success, "{:?}", verdict.reason);
        let untimed = series(vec![(8, 100), (1 << 20, 0), (1 << 20, 0)]);
        let figures = Figures::of(&untimed, Unit::MBps, Some(1_000_000), &mut verdict);
        assert_eq!(verdict.status, Status::Error);
        let reason = verdict.reason.unwrap_or_default();
        assert!(reason.contains("2 of 3 samples"), "{reason}");
        assert_eq!(
            figures.cycles,
            [12.5, 0.0, 0.0],
            "every sample is kept, as cycles"
        );
    }

    #[test]
    fn a_zero_or_non_finite_median_gives_no_ratio() {
        use Direction::*;
        assert_eq!(ratio(2.0, 4.0, LowerIsBetter), Ok(0.5));
        assert_eq!(ratio(2.0, 4.0, HigherIsBetter), Ok(2.0));
        for (native, guest) in [
            (2.0, 0.0),
            (0.0, 2.0),
            (2.0, f64::NAN),
            (f64::INFINITY, 2.0),
            (f64::MAX, f64::MIN_POSITIVE),
        ] {
            for d in [LowerIsBetter, HigherIsBetter] {
                let r = ratio(native, guest, d);
                assert!(r.is_err(), "{native} {guest} {d:?}: {r:?}");
            }
        }
        assert!(ratio(2.0, 0.0, LowerIsBetter)
            .unwrap_err()
            .contains("the guest's median is 0"));
    }

    /// A record context for tests: local, 1 GHz, 3 samples of 100 us.
    fn with_context(params: &[super::super::WorkloadParam], test: impl FnOnce(&RecordContext)) {
        let parameters = RunParameters {
            samples: 3,
            warmup: 0,
            sample_us: 100,
            ..Default::default()
        };
        let host = HostInfo {
            tsc_khz: Some(1_000_000),
            ..Default::default()
        };
        let ctx = RecordContext {
            run_id: "test",
            repeat: 0,
            backend: &BackendInfo::default(),
            host: &host,
            guest: &GuestInfo::default(),
            parameters: &parameters,
            tool: &ToolInfo::default(),
            tsc_khz: Some(1_000_000),
            native_here: true,
            reproduce: &|_| String::new(),
            workload_params: params,
            guest_ram: Some(HugePageAdvice::NoAdvice),
            disk: None,
        };
        test(&ctx);
    }

    fn chase_outcome(series: &str, ops: u64) -> WorkloadOutcome {
        let mut o = WorkloadOutcome::new(WorkloadId::MemTlbChase);
        o.series.insert(
            ("latency", series.to_string()),
            SeriesSamples {
                measured: vec![(ops, 5000); 3],
                ..Default::default()
            },
        );
        o
    }

    #[test]
    fn native_twins_ignore_the_guests_sizes_and_counts() {
        with_context(&[], |ctx| {
            // Hostile series (never kept by the session, but here directly): no twin runs.
            for series in ["ws:0,page:4k", "ws:18446744073709551615,page:4k"] {
                let records = build(&chase_outcome(series, u64::MAX), ctx);
                assert_eq!(records[0].status, Status::Error, "{series}");
                assert!(records[0].native.is_none());
                let reason = records[0].reason.as_deref().unwrap_or("");
                assert!(reason.contains("no such series"), "{reason}");
            }
            // A series the host asked for, with a hostile `ops`: the twin is sized by the
            // host (16 KiB, calibrated to 100 us), so it ends at once.
            let started = std::time::Instant::now();
            let records = build(&chase_outcome("ws:16k,page:4k", u64::MAX), ctx);
            assert_eq!(
                records[0].status,
                Status::Success,
                "{:?}",
                records[0].reason
            );
            assert!(records[0].native.is_some());
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            assert_eq!(
                records[0]
                    .notes
                    .get(NOTE_NATIVE)
                    .map(String::as_str)
                    .map(|n| n.starts_with("no huge-page advice")),
                Some(true)
            );
            assert_eq!(
                records[0]
                    .parameters
                    .workload_params
                    .get("ws")
                    .map(String::as_str),
                Some("16k,256k,1m,4m,16m,64m")
            );
        });
    }

    #[test]
    fn a_zero_guest_median_leaves_the_ratio_out_with_a_note() {
        with_context(&[], |ctx| {
            let mut o = chase_outcome("ws:16k,page:4k", 1);
            if let Some(s) = o.series.values_mut().next() {
                s.measured = vec![(1, 0); 3];
            }
            let records = build(&o, ctx);
            // Zero cycles timed nothing: an error that says so, never a 0 ns figure.
            assert_eq!(records[0].status, Status::Error);
            let reason = records[0].reason.clone().unwrap_or_default();
            assert!(reason.contains("clock did not advance"), "{reason}");
            // Whatever the twin gave, no ratio is made from a zero median.
            if let Some(native) = records[0].native.as_ref() {
                assert!(native.ratio.is_none(), "{native:?}");
            }
        });
    }
}

//! From a workload's outcome to records: cycles converted to the table's unit, every
//! sample kept, statistics, the native twin, and the command that reproduces the figure.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use reports::record::{
    BackendInfo, GuestInfo, HostInfo, NativeComparison, Record, RunParameters, ToolInfo,
    SCHEMA_VERSION,
};
use reports::stats::{median, summarize};
use workloads::protocol::Status;
use workloads::{Direction, Privilege, Unit, WorkloadId};

use super::session::{SeriesSamples, WorkloadOutcome};
use crate::native;

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
}

/// UTC time as RFC 3339 (`2026-11-26T05:12:00Z`), without a date crate.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

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

    let per_op = |(ops, cycles): &(u64, u64)| *cycles as f64 / (*ops).max(1) as f64;
    let samples_cycles: Vec<f64> = series.measured.iter().map(per_op).collect();
    let convert = |cycles: &[f64]| -> Option<Vec<f64>> {
        cycles
            .iter()
            .map(|c| to_unit(*c, unit, ctx.tsc_khz))
            .collect()
    };
    let warmup_cycles: Vec<f64> = series.warmup.iter().map(per_op).collect();
    let converted = if series.direct.is_empty() {
        (convert(&samples_cycles), convert(&warmup_cycles))
    } else {
        (Some(series.direct.clone()), Some(Vec::new()))
    };
    let (samples, warmup_samples) = match converted {
        (Some(s), Some(w)) => (s, w),
        _ => {
            verdict.ratchet(
                Status::Error,
                "no TSC frequency is known (neither the guest's hypervisor nor this host gave one): only cycles are kept".into(),
            );
            (Vec::new(), Vec::new())
        }
    };
    if verdict.status == Status::Success && samples.is_empty() {
        verdict.ratchet(Status::Error, "the guest reported no samples".into());
    }

    if outcome.workload == WorkloadId::CpuCompute && verdict.status == Status::Success {
        if let Err(text) = verify_compute(outcome) {
            verdict.ratchet(Status::Failure, text);
        }
    }
    let series_map = parse_series(params);
    let mut native = None;
    if spec.native_twin && ctx.native_here && verdict.status == Status::Success {
        let ops = series.measured.first().map(|(ops, _)| *ops).unwrap_or(0);
        let direction = metric_spec
            .map(|m| m.direction)
            .unwrap_or(Direction::LowerIsBetter);
        match native_twin(
            outcome.workload,
            &series_map,
            ops,
            unit,
            direction,
            ctx,
            &samples,
        ) {
            Ok(n) => native = n,
            Err(text) => verdict.ratchet(Status::Error, format!("native twin: {text}")),
        }
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
        notes: outcome.notes.clone(),
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
            workload_params: ctx
                .workload_params
                .iter()
                .filter(|p| p.workload == outcome.workload)
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect(),
            ..ctx.parameters.clone()
        },
        hvbench: ctx.tool.clone(),
        reproduce: (ctx.reproduce)(outcome.workload),
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

/// Checks the guest's compute checksum against the host's for the rounds it reported.
fn verify_compute(outcome: &WorkloadOutcome) -> Result<(), String> {
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
    let expected = native::compute_checksum(rounds);
    if reported != expected {
        return Err(format!(
            "wrong result: the guest's checksum {reported:#x} differs from the host's {expected:#x} for {rounds} rounds"
        ));
    }
    Ok(())
}

/// Runs the workload's native twin for the same work per sample and compares: the ratio
/// is the guest's performance relative to native (1.0 = native speed).
fn native_twin(
    workload: WorkloadId,
    series: &BTreeMap<String, String>,
    ops: u64,
    unit: Unit,
    direction: Direction,
    ctx: &RecordContext,
    guest_samples: &[f64],
) -> Result<Option<NativeComparison>, String> {
    let Some(result) = native::twin(
        workload,
        series,
        ops,
        ctx.parameters.warmup,
        ctx.parameters.samples,
    ) else {
        return Ok(None);
    };
    let cycles = result?;
    let samples: Vec<f64> = cycles
        .iter()
        .map(|c| to_unit(*c, unit, ctx.tsc_khz))
        .collect::<Option<_>>()
        .ok_or("no TSC frequency to convert native cycles")?;
    let (Some(native_median), Some(guest_median)) = (median(&samples), median(guest_samples))
    else {
        return Ok(None);
    };
    let ratio = match direction {
        Direction::LowerIsBetter => native_median / guest_median,
        Direction::HigherIsBetter => guest_median / native_median,
    };
    Ok(Some(NativeComparison {
        samples,
        median: native_median,
        ratio: Some(ratio),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(s));
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
}

//! The native twin of the block workloads: Debian's fio on the host, on the same disk file
//! with the same pattern, block size, queue depth and region (`--direct=1` unless the run
//! is buffered, `--ioengine=io_uring`), one fio run of `--sample-us` per sample (warm-ups
//! first, discarded), so the record's guest/native ratio compares like with like. Writes
//! are zero-filled (`--zero_buffers`): the disk check after the run takes zeros for
//! unwritten blocks, and fio's random data would read as corruption. One outcome's series
//! are measured once and kept for each of its metrics' records.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;
use workloads::table::param::{
    BLK_BS_RANDOM, BLK_BS_SEQUENTIAL, BLK_DURATION_MS, BLK_QD_RANDOM, BLK_QD_SEQUENTIAL,
    BLK_RANDOM, BLK_REGION, BLK_SEQUENTIAL,
};
use workloads::{ParamSpec, WorkloadId};

use super::twin::{TwinError, TwinPlan};
use crate::run::plan::param_value;

/// One fio run's figures: requests and bytes per second, completion latencies in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FioFigures {
    pub iops: f64,
    pub bytes_per_s: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The measured runs of the outcomes seen last (run, repeat, workload, series).
type Key = (String, u32, WorkloadId, String);
static MEASURED: Mutex<BTreeMap<Key, Vec<FioFigures>>> = Mutex::new(BTreeMap::new());
/// Outcomes kept at most (one workload's series, a few times over).
const KEPT: usize = 32;

/// fio's arguments for `workload` at the series `plan` names.
fn arguments(
    workload: WorkloadId,
    plan: &TwinPlan,
    disk: &Path,
    direct: bool,
) -> Result<Vec<String>, TwinError> {
    let value = |spec: &ParamSpec| -> Result<u64, TwinError> {
        plan.point
            .value(spec)
            .or_else(|| {
                let text = param_value(plan.params, workload, spec)?;
                spec.parse_one(text).ok()
            })
            .ok_or(TwinError::NoSeriesValue(spec.key))
    };
    let region = value(&BLK_REGION)?;
    // Each sample's length: `duration_ms` where given, as in the guest.
    let runtime_us = param_value(plan.params, workload, &BLK_DURATION_MS)
        .and_then(|t| BLK_DURATION_MS.parse_one(t).ok())
        .map_or(u64::from(plan.sample_us), |ms| ms.saturating_mul(1000));
    let (rw, bs, qd, random) = match workload {
        WorkloadId::IoBlkRandread => (
            "randread",
            value(&BLK_BS_RANDOM)?,
            value(&BLK_QD_RANDOM)?,
            value(&BLK_RANDOM)?,
        ),
        WorkloadId::IoBlkRandwrite => (
            "randwrite",
            value(&BLK_BS_RANDOM)?,
            value(&BLK_QD_RANDOM)?,
            value(&BLK_RANDOM)?,
        ),
        WorkloadId::IoBlkSeqread => (
            "randread",
            value(&BLK_BS_SEQUENTIAL)?,
            value(&BLK_QD_SEQUENTIAL)?,
            value(&BLK_SEQUENTIAL)?,
        ),
        WorkloadId::IoBlkSeqwrite => (
            "randwrite",
            value(&BLK_BS_SEQUENTIAL)?,
            value(&BLK_QD_SEQUENTIAL)?,
            value(&BLK_SEQUENTIAL)?,
        ),
        // A 4 KiB write, then fdatasync, one at a time.
        WorkloadId::IoBlkFlush => ("randwrite", 4096, 1, 1_000_000),
        _ => return Err(TwinError::NoSeriesValue("bs")),
    };
    let mut args: Vec<String> = vec![
        "--name=hvbench".into(),
        format!("--filename={}", disk.display()),
        format!("--direct={}", u8::from(direct)),
        "--ioengine=io_uring".into(),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        format!("--size={region}"),
        "--offset=0".into(),
        format!("--percentage_random={}", random / 10_000),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--zero_buffers".into(),
        "--time_based".into(),
        format!("--runtime={runtime_us}us"),
        "--percentile_list=50:90:99:99.9".into(),
        "--output-format=json".into(),
    ];
    if workload == WorkloadId::IoBlkFlush {
        args.push("--fdatasync=1".into());
    }
    Ok(args)
}

fn number(v: &Value) -> f64 {
    v.as_f64().filter(|x| x.is_finite()).unwrap_or(0.0)
}

/// The figures of fio's JSON: the job's read or write side; for flush, the write rate
/// and the fdatasync latencies.
pub fn parse(json: &str, flush: bool) -> Result<FioFigures, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("fio's JSON: {e}"))?;
    let job = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or("fio's JSON has no job")?;
    let side = ["read", "write"]
        .into_iter()
        .filter_map(|k| job.get(k))
        .max_by(|a, b| number(&a["iops"]).total_cmp(&number(&b["iops"])))
        .ok_or("fio's JSON has no read or write figures")?;
    let lat = if flush {
        &job["sync"]["lat_ns"]
    } else {
        &side["clat_ns"]
    };
    let pct = |k: &str| number(&lat["percentile"][k]);
    let figures = FioFigures {
        iops: number(&side["iops"]),
        bytes_per_s: number(&side["bw_bytes"]),
        p50: pct("50.000000"),
        p90: pct("90.000000"),
        p99: pct("99.000000"),
        p999: pct("99.900000"),
        max: number(&lat["max"]),
    };
    if figures.iops <= 0.0 {
        return Err("fio completed no request".into());
    }
    Ok(figures)
}

fn run_fio(args: &[String], flush: bool) -> Result<FioFigures, TwinError> {
    let out = Command::new("fio").args(args).output().map_err(|e| {
        TwinError::Unavailable(format!("cannot run fio ({e}): install Debian's fio"))
    })?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        return Err(TwinError::Fio(crate::console::escape_text(text.trim())));
    }
    parse(&String::from_utf8_lossy(&out.stdout), flush).map_err(TwinError::Fio)
}

/// The twin's samples of `plan.metric`, in cycles per operation (request, byte or ns).
pub fn samples(workload: WorkloadId, plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    let (disk, direct) = plan
        .disk
        .ok_or(TwinError::Unavailable("this run has no disk file".into()))?;
    let key = (
        plan.run_id.to_string(),
        plan.repeat,
        workload,
        plan.point.name.clone(),
    );
    let cached = MEASURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let figures = match cached {
        Some(f) => f,
        None => {
            let args = arguments(workload, plan, disk, direct)?;
            let flush = workload == WorkloadId::IoBlkFlush;
            let mut runs = Vec::new();
            for i in 0..plan.warmup + plan.samples {
                plan.check_interrupt()?;
                let f = run_fio(&args, flush)?;
                if i >= plan.warmup {
                    runs.push(f);
                }
            }
            let mut kept = MEASURED.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() >= KEPT {
                kept.clear();
            }
            kept.insert(key, runs.clone());
            runs
        }
    };
    let khz = plan.tsc_khz as f64;
    let per_op = |f: &FioFigures| -> f64 {
        match plan.metric {
            "iops" => khz * 1000.0 / f.iops,
            "bandwidth" => khz / (1000.0 * f.bytes_per_s / 1e6),
            "lat_p50" => f.p50 * khz / 1e6,
            "lat_p90" => f.p90 * khz / 1e6,
            "lat_p99" => f.p99 * khz / 1e6,
            "lat_p999" => f.p999 * khz / 1e6,
            _ => f.max * khz / 1e6,
        }
    };
    Ok(figures.iter().map(per_op).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_read_for_transfers_and_flushes() {
        let json = r#"{"jobs":[{"read":{"iops":1000.0,"bw_bytes":4096000,
            "clat_ns":{"max":900,"percentile":{"50.000000":100,"90.000000":200,
            "99.000000":300,"99.900000":400}}},"write":{"iops":0,"bw_bytes":0},
            "sync":{"lat_ns":{"max":77,"percentile":{"50.000000":7}}}}]}"#;
        let f = parse(json, false).unwrap();
        assert_eq!(
            (f.iops, f.bytes_per_s, f.p50, f.p999, f.max),
            (1000.0, 4_096_000.0, 100.0, 400.0, 900.0)
        );
        let f = parse(json, true).unwrap();
        assert_eq!((f.p50, f.max), (7.0, 77.0));
        assert!(parse("{}", false).unwrap_err().contains("no job"));
        assert!(parse("not json", false).unwrap_err().contains("JSON"));
        let idle = parse(r#"{"jobs":[{"read":{"iops":0}}]}"#, false);
        assert!(idle.unwrap_err().contains("no request"));
    }
}

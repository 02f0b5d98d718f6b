//! `mem.ksm`'s parameters (`--param mem.ksm.KEY=VALUE`), checked before anything starts.

use std::time::Duration;

use workloads::table::param::{
    KSM_GUESTS, KSM_IDENTICAL, KSM_MAX_S, KSM_PAGES_TO_SCAN, KSM_SAMPLE_MS, KSM_SIZE,
    KSM_SLEEP_MILLISECS,
};
use workloads::{ParamSpec, WorkloadId};

use super::MemKsmError;
use crate::run::plan::param_value;
use crate::run::WorkloadParam;

/// What one `mem.ksm` run does.
#[derive(Clone, Debug, PartialEq)]
pub struct KsmParams {
    pub guests: u32,
    /// Guest RAM (the run's --memory-mib).
    pub guest_mib: u32,
    /// Bytes each guest fills, as given; `None`: all its free RAM.
    pub size: Option<String>,
    /// The identical fraction as given, and in parts per million.
    pub identical: String,
    pub identical_ppm: u32,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
    pub max: Duration,
    pub sample_interval: Duration,
}

/// The value of `spec` in this run (the user's, else the row's default), parsed; `None`
/// where the row has no default and none was given.
fn value(params: &[WorkloadParam], spec: &ParamSpec) -> Result<Option<(u64, String)>, MemKsmError> {
    let Some(text) = param_value(params, WorkloadId::MemKsm, spec) else {
        return Ok(None);
    };
    let v = spec.parse_one(text).map_err(|e| {
        MemKsmError::Param(format!(
            "mem.ksm.{}={text}: {}; it takes {}, {}",
            spec.key,
            e.message(),
            spec.kind.name(),
            spec.bounds()
        ))
    })?;
    Ok(Some((v, text.to_string())))
}

/// A parameter the row gives a default for.
fn number<T: TryFrom<u64>>(params: &[WorkloadParam], spec: &ParamSpec) -> Result<T, MemKsmError> {
    value(params, spec)?
        .and_then(|(v, _)| T::try_from(v).ok())
        .ok_or_else(|| MemKsmError::Param(format!("mem.ksm.{} has no usable value", spec.key)))
}

impl KsmParams {
    /// The row's defaults, overridden by the run's `--param mem.ksm.*` (checked against the
    /// row when parsed; the size is checked here against the guest's RAM).
    pub fn from_run(params: &[WorkloadParam], guest_mib: u32) -> Result<Self, MemKsmError> {
        let size = value(params, &KSM_SIZE)?;
        if let Some((bytes, text)) = &size {
            if *bytes >= u64::from(guest_mib) << 20 {
                return Err(MemKsmError::Param(format!(
                    "mem.ksm.size={text}: expected less than the guest's {guest_mib} MiB \
                     (--memory-mib)"
                )));
            }
        }
        let (identical_ppm, identical) = value(params, &KSM_IDENTICAL)?
            .ok_or_else(|| MemKsmError::Param("mem.ksm.identical has no value".into()))?;
        Ok(KsmParams {
            guests: number(params, &KSM_GUESTS)?,
            guest_mib,
            size: size.map(|(_, text)| text),
            identical,
            identical_ppm: u32::try_from(identical_ppm)
                .map_err(|_| MemKsmError::Param("mem.ksm.identical out of range".into()))?,
            pages_to_scan: number(params, &KSM_PAGES_TO_SCAN)?,
            sleep_millisecs: number(params, &KSM_SLEEP_MILLISECS)?,
            max: Duration::from_secs(number(params, &KSM_MAX_S)?),
            sample_interval: Duration::from_millis(number(params, &KSM_SAMPLE_MS)?),
        })
    }

    /// Every effective value, for the records' notes.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            (KSM_GUESTS.key, self.guests.to_string()),
            ("guest_mib", self.guest_mib.to_string()),
            (
                KSM_SIZE.key,
                self.size.clone().unwrap_or_else(|| "all free RAM".into()),
            ),
            (KSM_IDENTICAL.key, self.identical.clone()),
            (KSM_PAGES_TO_SCAN.key, self.pages_to_scan.to_string()),
            (KSM_SLEEP_MILLISECS.key, self.sleep_millisecs.to_string()),
            (KSM_MAX_S.key, self.max.as_secs().to_string()),
            (
                KSM_SAMPLE_MS.key,
                self.sample_interval.as_millis().to_string(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(texts: &[&str], mib: u32) -> Result<KsmParams, String> {
        let params: Vec<WorkloadParam> = texts
            .iter()
            .map(|t| WorkloadParam::parse(t).unwrap())
            .collect();
        KsmParams::from_run(&params, mib).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse(&[], 256).unwrap();
        assert_eq!((d.guests, d.guest_mib, d.identical_ppm), (4, 256, 500_000));
        assert_eq!((d.pages_to_scan, d.sleep_millisecs), (1000, 20));
        let p = parse(
            &[
                "mem.ksm.guests=2",
                "mem.ksm.size=16m",
                "mem.ksm.identical=0.25",
                "mem.ksm.pages_to_scan=5000",
                "mem.ksm.sleep_millisecs=0",
                "mem.ksm.max_s=60",
                "mem.ksm.sample_ms=250",
                // Another workload's parameter is not mem.ksm's business.
                "mem.copy.size=1m",
            ],
            32,
        )
        .unwrap();
        assert_eq!(p.guests, 2);
        assert_eq!(p.size.as_deref(), Some("16m"));
        assert_eq!(p.identical_ppm, 250_000);
        assert_eq!((p.pages_to_scan, p.sleep_millisecs), (5000, 0));
        assert_eq!(p.max, Duration::from_secs(60));
        assert_eq!(p.sample_interval, Duration::from_millis(250));
        // Every key the row lets the user set, and the guest's RAM.
        let user_keys = WorkloadId::MemKsm
            .spec()
            .params
            .iter()
            .filter(|p| p.set_by == workloads::params::SetBy::User)
            .count();
        assert_eq!(p.describe().len(), user_keys + 1);
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        // Bounds are checked when `--param` is parsed (the row's); the guest's RAM here.
        for text in [
            "mem.ksm.guests=1",
            "mem.ksm.guests=many",
            "mem.ksm.size=1000",
            "mem.ksm.identical=1.5",
            "mem.ksm.pages_to_scan=0",
            "mem.ksm.max_s=1",
            "mem.ksm.seed=3",
            "mem.ksm.nope=3",
        ] {
            assert!(WorkloadParam::parse(text).is_err(), "{text}");
        }
        let e = parse(&["mem.ksm.size=32m"], 32).unwrap_err();
        assert!(e.contains("less than the guest's 32 MiB"), "{e}");
    }
}

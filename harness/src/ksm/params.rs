//! `mem.ksm`'s parameters (`--param mem.ksm.KEY=VALUE`), checked before anything starts.

use std::time::Duration;

use workloads::cmdline::parse_size;
use workloads::ksm::{parse_fraction_ppm, DEFAULT_IDENTICAL_PPM, PAGE_BYTES};
use workloads::WorkloadId;

use super::KsmError;
use crate::run::WorkloadParam;

/// Every key `mem.ksm` takes, with what it means (for error messages and the README).
pub const KEYS: &[(&str, &str)] = &[
    (
        "guests",
        "number of guests, each a VMM process (2..=16, default 4)",
    ),
    (
        "size",
        "bytes each guest fills, e.g. 128m (default: all of its free RAM)",
    ),
    (
        "identical",
        "fraction of the filled pages identical across guests (0..=1, default 0.5)",
    ),
    (
        "pages_to_scan",
        "KSM pages_to_scan while the workload runs (1..=100000, default 1000)",
    ),
    (
        "sleep_millisecs",
        "KSM sleep_millisecs while the workload runs (0..=10000, default 20)",
    ),
    (
        "max_s",
        "seconds to wait for the sharing to settle (5..=7200, default 300)",
    ),
    (
        "sample_ms",
        "milliseconds between samples of the counters (100..=10000, default 1000)",
    ),
];

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

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    key: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T, KsmError> {
    match value.parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(KsmError::Param(format!(
            "mem.ksm.{key}={value}: expected a number from {min} to {max}"
        ))),
    }
}

impl KsmParams {
    /// The defaults, overridden by the run's `--param mem.ksm.*`.
    pub fn from_run(params: &[WorkloadParam], guest_mib: u32) -> Result<Self, KsmError> {
        let mut p = KsmParams {
            guests: 4,
            guest_mib,
            size: None,
            identical: "0.5".into(),
            identical_ppm: DEFAULT_IDENTICAL_PPM,
            pages_to_scan: 1000,
            sleep_millisecs: 20,
            max: Duration::from_secs(300),
            sample_interval: Duration::from_millis(1000),
        };
        for param in params.iter().filter(|p| p.workload == WorkloadId::MemKsm) {
            let (key, value) = (param.key.as_str(), param.value.as_str());
            match key {
                "guests" => p.guests = number(key, value, 2, 16)?,
                "size" => {
                    let guest_bytes = (guest_mib as u64) << 20;
                    match parse_size(value) {
                        Some(v) if v >= PAGE_BYTES && v % PAGE_BYTES == 0 && v < guest_bytes => {
                            p.size = Some(value.to_string())
                        }
                        _ => {
                            return Err(KsmError::Param(format!(
                                "mem.ksm.size={value}: expected whole 4 KiB pages, less than \
                                 the guest's {guest_mib} MiB (--memory-mib)"
                            )))
                        }
                    }
                }
                "identical" => {
                    p.identical_ppm = parse_fraction_ppm(value).ok_or_else(|| {
                        KsmError::Param(format!(
                            "mem.ksm.identical={value}: expected a fraction from 0 to 1 \
                             (e.g. 0.5)"
                        ))
                    })?;
                    p.identical = value.to_string();
                }
                "pages_to_scan" => p.pages_to_scan = number(key, value, 1, 100_000)?,
                "sleep_millisecs" => p.sleep_millisecs = number(key, value, 0, 10_000)?,
                "max_s" => p.max = Duration::from_secs(number(key, value, 5, 7200)?),
                "sample_ms" => {
                    p.sample_interval = Duration::from_millis(number(key, value, 100, 10_000)?)
                }
                _ => {
                    let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                    return Err(KsmError::Param(format!(
                        "mem.ksm has no parameter {key:?} (it takes {})",
                        known.join(", ")
                    )));
                }
            }
        }
        Ok(p)
    }

    /// Every effective value, for the records' notes.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("guests", self.guests.to_string()),
            ("guest_mib", self.guest_mib.to_string()),
            (
                "size",
                self.size.clone().unwrap_or_else(|| "all free RAM".into()),
            ),
            ("identical", self.identical.clone()),
            ("pages_to_scan", self.pages_to_scan.to_string()),
            ("sleep_millisecs", self.sleep_millisecs.to_string()),
            ("max_s", self.max.as_secs().to_string()),
            ("sample_ms", self.sample_interval.as_millis().to_string()),
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
        assert_eq!(p.describe().len(), KEYS.len() + 1);
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (text, expect) in [
            ("mem.ksm.guests=1", "mem.ksm.guests=1"),
            ("mem.ksm.guests=many", "from 2 to 16"),
            ("mem.ksm.size=32m", "less than the guest's 32 MiB"),
            ("mem.ksm.size=1000", "whole 4 KiB pages"),
            ("mem.ksm.identical=1.5", "fraction"),
            ("mem.ksm.pages_to_scan=0", "pages_to_scan"),
            ("mem.ksm.max_s=1", "max_s"),
            ("mem.ksm.seed=3", "no parameter \"seed\""),
        ] {
            let e = parse(&[text], 32).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }
}

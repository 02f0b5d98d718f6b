//! What a native twin is asked for (the host's own series and sampling) and how it fails.

use std::sync::atomic::{AtomicBool, Ordering};

use hostutil::huge_pages::HugePageAdvice;
use thiserror::Error;
use workloads::ParamSpec;

use crate::run::plan::SeriesPoint;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TwinError {
    #[error("interrupted")]
    Interrupted,
    #[error("the series has no `{0}` value the host asked for")]
    NoSeriesValue(&'static str),
    #[error("a buffer of {0} bytes is not possible here")]
    BadSize(u64),
    #[error("cannot map {len} bytes for the native twin: {error}")]
    Map { len: usize, error: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("fio failed: {0}")]
    Fio(String),
    #[error(
        "the guest reports {reported} rounds; the host, which needs {needed} for one sample, \
         verifies at most {allowed}"
    )]
    TooManyRounds {
        reported: u64,
        needed: u64,
        allowed: u64,
    },
}

/// What one twin run is asked for, all of it the host's own.
#[derive(Debug)]
pub struct TwinPlan<'a> {
    /// The series, as the host derived it from its parameters.
    pub point: &'a SeriesPoint,
    /// The advice the guest's RAM was mapped with.
    pub backing: HugePageAdvice,
    /// TSC cycles one sample must last at least (`--sample-us` at the host's TSC rate).
    pub min_cycles: u64,
    pub warmup: u32,
    pub samples: u32,
    pub interrupted: &'a AtomicBool,
    /// The record's metric (a twin measuring several metrics at once picks this one).
    pub metric: &'a str,
    /// `--sample-us`, for twins that run for a time rather than an iteration count.
    pub sample_us: u32,
    /// The TSC rate the record converts cycles with.
    pub tsc_khz: u64,
    /// The run and repeat, so a twin measured once per outcome serves its every metric.
    pub run_id: &'a str,
    pub repeat: u32,
    /// The run's workload parameters (those that make no series too).
    pub params: &'a [crate::run::WorkloadParam],
    /// The block workloads' disk file, and whether it is used with O_DIRECT.
    pub disk: Option<(&'a std::path::Path, bool)>,
}

impl TwinPlan<'_> {
    pub(crate) fn check_interrupt(&self) -> Result<(), TwinError> {
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(TwinError::Interrupted);
        }
        Ok(())
    }

    pub(super) fn size(&self, spec: &ParamSpec) -> Result<usize, TwinError> {
        let v = self
            .point
            .value(spec)
            .ok_or(TwinError::NoSeriesValue(spec.key))?;
        // The row's bounds hold already; a size of 0 or beyond the address space is refused.
        usize::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or(TwinError::BadSize(v))
    }
}

/// TSC cycles in `sample_us` microseconds at `tsc_khz`.
pub fn cycles_from_tsc_khz(sample_us: u32, tsc_khz: u64) -> u64 {
    u64::from(sample_us).saturating_mul(tsc_khz) / 1000
}

//! Native twins: the identical code of a guest workload, run here on the host, so a
//! record can give the guest's performance relative to native. Timed the way the guest
//! times itself (TSC reads fenced with LFENCE, the iteration count doubled until one run
//! lasts a sample), and run only while no guest runs (on SMT siblings a busy guest slowed
//! the native run 2.6-fold).
//!
//! Everything a twin sizes or loops over comes from the host's own parameters (the series
//! the host asked for, bounded by the workload's row, and `--sample-us`), never from a
//! guest line; a twin checks the interrupt flag between runs. Its buffers get the same
//! huge-page advice as the guest's RAM, so the ratio compares like with like.

use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use workloads::compute::{compute_init, compute_rounds, COMPUTE_WORDS};
use workloads::memory::{build_chase, chase, copy_bytes, sum_words, CHASE_SEED, CHASE_STRIDE};
use workloads::table::param::{COPY_SIZE, SEQ_READ_SIZE, TLB_CHASE_WS};
use workloads::{NativeTwin, ParamSpec, WorkloadId};

use hostutil::huge_pages::HugePageAdvice;

use super::plan::SeriesPoint;

/// Most iterations of one timed run, as in the guest.
pub const MAX_ITERATIONS: u64 = 1 << 32;
/// A guest may report at most this many times the rounds the host needs for one sample
/// before the host refuses to verify its checksum (a guest twice as fast as native, with
/// the doubling's factor of two).
const VERIFY_ROUNDS_FACTOR: u64 = 4;
const HUGE_PAGE: usize = 2 << 20;

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
    pub params: &'a [super::WorkloadParam],
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

    fn size(&self, spec: &ParamSpec) -> Result<usize, TwinError> {
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

fn rdtsc_fenced() -> u64 {
    // SAFETY: LFENCE and RDTSC only order execution and read the time stamp counter.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        let t = core::arch::x86_64::_rdtsc();
        core::arch::x86_64::_mm_lfence();
        t
    }
}

fn timed(n: u64, op: &mut impl FnMut(u64)) -> u64 {
    let t0 = rdtsc_fenced();
    op(n);
    rdtsc_fenced().wrapping_sub(t0)
}

/// The iteration count at which one run of `op` lasts `min_cycles` (doubling from 1, at
/// most [`MAX_ITERATIONS`]), the guest's method.
fn calibrate(plan: &TwinPlan, op: &mut impl FnMut(u64)) -> Result<u64, TwinError> {
    let mut n = 1u64;
    loop {
        plan.check_interrupt()?;
        if timed(n, op) >= plan.min_cycles || n >= MAX_ITERATIONS {
            return Ok(n);
        }
        n = n.saturating_mul(2).min(MAX_ITERATIONS);
    }
}

/// Calibrates `op`, then times `warmup` discarded and `samples` kept runs; returns cycles
/// per unit of work, where one iteration is `units` units (bytes, or 1).
fn measure(plan: &TwinPlan, units: u64, mut op: impl FnMut(u64)) -> Result<Vec<f64>, TwinError> {
    let n = calibrate(plan, &mut op)?;
    let per_run = n as f64 * units.max(1) as f64;
    for _ in 0..plan.warmup {
        plan.check_interrupt()?;
        timed(n, &mut op);
    }
    (0..plan.samples)
        .map(|_| {
            plan.check_interrupt()?;
            Ok(timed(n, &mut op) as f64 / per_run)
        })
        .collect()
}

fn compute_run(rounds: u64) -> u64 {
    let mut buf = [0u64; COMPUTE_WORDS];
    compute_init(&mut buf);
    compute_rounds(&mut buf, std::hint::black_box(rounds))
}

/// The checksum the guest must report for `rounds` rounds, computed only when `rounds` is
/// within what the host itself needs for one sample (times a margin): a guest cannot make
/// the host loop for as long as it likes.
pub fn compute_checksum(rounds: u64, plan: &TwinPlan) -> Result<u64, TwinError> {
    let needed = calibrate(plan, &mut |n| {
        std::hint::black_box(compute_run(n));
    })?;
    let allowed = needed.saturating_mul(VERIFY_ROUNDS_FACTOR);
    if rounds > allowed {
        return Err(TwinError::TooManyRounds {
            reported: rounds,
            needed,
            allowed,
        });
    }
    plan.check_interrupt()?;
    Ok(compute_run(rounds))
}

/// A byte count as u64 (lossless on the 64-bit hosts hvbench runs on; saturating else).
fn bytes(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// An anonymous mapping of `len` bytes, 2 MiB aligned, with the guest RAM's advice,
/// touched once (the twin measures the workload, not first touches).
struct Buffer {
    base: *mut u8,
    len: usize,
    mapping: *mut libc::c_void,
    mapping_len: usize,
}

impl Buffer {
    fn new(len: usize, advice: HugePageAdvice) -> Result<Self, TwinError> {
        let mapping_len = len
            .checked_add(HUGE_PAGE)
            .filter(|_| len > 0)
            .ok_or(TwinError::BadSize(bytes(len)))?;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(TwinError::Map {
                len,
                error: std::io::Error::last_os_error().to_string(),
            });
        }
        let offset = (mapping as usize).next_multiple_of(HUGE_PAGE) - mapping as usize;
        let buffer = Buffer {
            // The offset is below HUGE_PAGE, so [base, base + len) lies inside the mapping.
            base: mapping.cast::<u8>().wrapping_add(offset),
            len,
            mapping,
            mapping_len,
        };
        if advice == HugePageAdvice::HugePages {
            // SAFETY: advice on our own mapping; it changes only how the kernel backs it.
            unsafe { libc::madvise(buffer.base.cast(), len, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: [base, base + len) lies inside the mapping.
        unsafe { std::ptr::write_bytes(buffer.base, 1, len) };
        Ok(buffer)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}

fn tlb_chase(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    let ws = plan.size(&TLB_CHASE_WS)?;
    let pages = ws / CHASE_STRIDE;
    if pages == 0 {
        return Err(TwinError::BadSize(bytes(ws)));
    }
    let buf = Buffer::new(ws, plan.backing)?;
    // SAFETY: the buffer holds `pages` strides and stays alive while chased.
    let mut p = unsafe { build_chase(buf.base, pages, CHASE_SEED) };
    measure(plan, 1, |n| {
        // SAFETY: `p` is an element of the chain in `buf`.
        p = unsafe { chase(p, n) };
    })
}

fn seq_read(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    let size = plan.size(&SEQ_READ_SIZE)?;
    let buf = Buffer::new(size, plan.backing)?;
    measure(plan, bytes(buf.len), |passes| {
        for _ in 0..passes {
            // SAFETY: the buffer holds `size` bytes, 2 MiB aligned.
            std::hint::black_box(unsafe { sum_words(buf.base as *const u64, buf.len) });
        }
    })
}

fn copy(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    let size = plan.size(&COPY_SIZE)?;
    let src = Buffer::new(size, plan.backing)?;
    let dst = Buffer::new(size, plan.backing)?;
    measure(plan, bytes(size), |passes| {
        for _ in 0..passes {
            // SAFETY: two distinct buffers of `size` bytes.
            unsafe { copy_bytes(dst.base, src.base, size) };
        }
    })
}

/// The native twin of a workload's series: cycles per operation (per round, per chase
/// step, per byte). `None` for a workload whose row names no twin.
pub fn twin(workload: WorkloadId, plan: &TwinPlan) -> Option<Result<Vec<f64>, TwinError>> {
    Some(match workload.spec().native_twin? {
        NativeTwin::Compute => measure(plan, 1, |n| {
            std::hint::black_box(compute_run(n));
        }),
        NativeTwin::TlbChase => tlb_chase(plan),
        NativeTwin::SeqRead => seq_read(plan),
        NativeTwin::Copy => copy(plan),
        NativeTwin::Fio => super::fio::samples(workload, plan),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::plan::series_points;
    use crate::run::WorkloadParam;

    fn point(workload: WorkloadId, params: &[&str]) -> SeriesPoint {
        let params: Vec<WorkloadParam> = params
            .iter()
            .map(|t| WorkloadParam::parse(t).unwrap())
            .collect();
        series_points(&params, workload).remove(0)
    }

    fn plan<'a>(point: &'a SeriesPoint, flag: &'a AtomicBool) -> TwinPlan<'a> {
        TwinPlan {
            point,
            backing: HugePageAdvice::NoAdvice,
            min_cycles: 100_000,
            warmup: 0,
            samples: 2,
            interrupted: flag,
            metric: "latency",
            sample_us: 100,
            tsc_khz: 1_000_000,
            run_id: "test",
            repeat: 0,
            params: &[],
            disk: None,
        }
    }

    #[test]
    fn twins_run_on_the_hosts_series() {
        let flag = AtomicBool::new(false);
        let compute = point(WorkloadId::CpuCompute, &[]);
        let c = twin(WorkloadId::CpuCompute, &plan(&compute, &flag))
            .unwrap()
            .unwrap();
        assert!(c.len() == 2 && c.iter().all(|c| *c > 0.0), "{c:?}");
        let chase = point(WorkloadId::MemTlbChase, &["mem.tlb-chase.ws=64k"]);
        let c = twin(WorkloadId::MemTlbChase, &plan(&chase, &flag))
            .unwrap()
            .unwrap();
        assert!(c.iter().all(|c| *c > 0.0), "{c:?}");
        let read = point(WorkloadId::MemSeqRead, &["mem.seq-read.size=1m"]);
        let r = twin(WorkloadId::MemSeqRead, &plan(&read, &flag))
            .unwrap()
            .unwrap();
        assert!(
            r.iter().all(|c| *c > 0.0 && *c < 100.0),
            "{r:?} cycles per byte"
        );
        let copy = point(WorkloadId::MemCopy, &["mem.copy.size=1m"]);
        assert_eq!(
            twin(WorkloadId::MemCopy, &plan(&copy, &flag))
                .unwrap()
                .unwrap()
                .len(),
            2
        );
        // A series without the value the twin needs is an error, not a guess.
        let none = point(WorkloadId::CpuIdle, &[]);
        assert_eq!(
            twin(WorkloadId::MemTlbChase, &plan(&none, &flag)).unwrap(),
            Err(TwinError::NoSeriesValue("ws"))
        );
    }

    #[test]
    fn hostile_sizes_are_errors_not_crashes() {
        // What `ws:0` and `ws:18446744073709551615` used to size: refused before mmap.
        assert_eq!(
            Buffer::new(0, HugePageAdvice::NoAdvice).err(),
            Some(TwinError::BadSize(0))
        );
        assert_eq!(
            Buffer::new(usize::MAX, HugePageAdvice::NoAdvice).err(),
            Some(TwinError::BadSize(u64::MAX))
        );
        assert!(matches!(
            Buffer::new(usize::MAX - (4 << 20), HugePageAdvice::NoAdvice),
            Err(TwinError::Map { .. })
        ));
    }

    #[test]
    fn a_huge_round_count_is_refused_and_an_interrupt_stops_the_twin() {
        let flag = AtomicBool::new(false);
        let p = point(WorkloadId::CpuCompute, &[]);
        let plan = plan(&p, &flag);
        assert_eq!(compute_checksum(1000, &plan), Ok(compute_run(1000)));
        assert!(matches!(
            compute_checksum(u64::MAX, &plan),
            Err(TwinError::TooManyRounds { .. })
        ));
        flag.store(true, Ordering::Relaxed);
        assert_eq!(
            twin(WorkloadId::CpuCompute, &plan).unwrap(),
            Err(TwinError::Interrupted)
        );
        assert_eq!(compute_checksum(1000, &plan), Err(TwinError::Interrupted));
    }
}

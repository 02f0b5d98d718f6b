//! The in-process twins: the guest's own loops, timed here the way the guest times them.

use workloads::compute::{compute_init, compute_rounds, COMPUTE_WORDS};
use workloads::memory::{build_chase, chase, copy_bytes, sum_words, CHASE_SEED, CHASE_STRIDE};
use workloads::table::param::{COPY_SIZE, SEQ_READ_SIZE, TLB_CHASE_WS};

use hostutil::huge_pages::HugePageAdvice;

use super::twin::{TwinError, TwinPlan};

/// Most iterations of one timed run, as in the guest.
pub const MAX_ITERATIONS: u64 = 1 << 32;
/// A guest may report at most this many times the rounds the host needs for one sample
/// before the host refuses to verify its checksum: the doubling's factor of two, times a
/// guest that looks up to four times as fast as native because the host's calibration
/// was preempted (a busy host; the nested TCG lab) while the guest's was not.
const VERIFY_ROUNDS_FACTOR: u64 = 8;
/// Calibrations of the host's round count; the largest (the least preempted) counts.
const VERIFY_CALIBRATIONS: usize = 3;
const HUGE_PAGE: usize = 2 << 20;

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

pub(super) fn compute_run(rounds: u64) -> u64 {
    let mut buf = [0u64; COMPUTE_WORDS];
    compute_init(&mut buf);
    compute_rounds(&mut buf, std::hint::black_box(rounds))
}

/// The checksum the guest must report for `rounds` rounds, computed only when `rounds` is
/// within what the host itself needs for one sample (times a margin): a guest cannot make
/// the host loop for as long as it likes.
pub fn compute_checksum(rounds: u64, plan: &TwinPlan) -> Result<u64, TwinError> {
    let mut needed = 1;
    for _ in 0..VERIFY_CALIBRATIONS {
        let once = calibrate(plan, &mut |n| {
            std::hint::black_box(compute_run(n));
        })?;
        needed = needed.max(once);
    }
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
pub(super) struct Buffer {
    base: *mut u8,
    len: usize,
    mapping: *mut libc::c_void,
    mapping_len: usize,
}

impl Buffer {
    pub(super) fn new(len: usize, advice: HugePageAdvice) -> Result<Self, TwinError> {
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

pub(super) fn tlb_chase(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
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

pub(super) fn seq_read(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    let size = plan.size(&SEQ_READ_SIZE)?;
    let buf = Buffer::new(size, plan.backing)?;
    measure(plan, bytes(buf.len), |passes| {
        for _ in 0..passes {
            // SAFETY: the buffer holds `size` bytes, 2 MiB aligned.
            std::hint::black_box(unsafe { sum_words(buf.base as *const u64, buf.len) });
        }
    })
}

pub(super) fn copy(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
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

/// `cpu.compute`'s twin: the guest's compute rounds.
pub(super) fn compute(plan: &TwinPlan) -> Result<Vec<f64>, TwinError> {
    measure(plan, 1, |n| {
        std::hint::black_box(compute_run(n));
    })
}

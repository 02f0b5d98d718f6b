//! Native twins: the identical code of a guest workload, run here on the host, so a
//! record can give the guest's performance relative to native. Timed the way the guest
//! times itself (TSC reads fenced with LFENCE), and run only while no guest runs (on SMT
//! siblings a busy guest slowed the native run 2.6-fold).

use std::collections::BTreeMap;

use workloads::cmdline::parse_size;
use workloads::compute::{compute_init, compute_rounds, COMPUTE_WORDS};
use workloads::memory::{build_chase, chase, copy_bytes, sum_words, CHASE_SEED, CHASE_STRIDE};
use workloads::WorkloadId;

fn rdtsc_fenced() -> u64 {
    // SAFETY: LFENCE and RDTSC only order execution and read the time stamp counter.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        let t = core::arch::x86_64::_rdtsc();
        core::arch::x86_64::_mm_lfence();
        t
    }
}

/// One native sample of the compute kernel: (cycles, checksum) for `rounds` rounds.
fn compute_sample(rounds: u64) -> (u64, u64) {
    let mut buf = [0u64; COMPUTE_WORDS];
    compute_init(&mut buf);
    let start = rdtsc_fenced();
    let checksum = compute_rounds(&mut buf, std::hint::black_box(rounds));
    let cycles = rdtsc_fenced().wrapping_sub(start);
    (cycles, std::hint::black_box(checksum))
}

/// The checksum the guest must report for `rounds` rounds.
pub fn compute_checksum(rounds: u64) -> u64 {
    let mut buf = [0u64; COMPUTE_WORDS];
    compute_init(&mut buf);
    compute_rounds(&mut buf, rounds)
}

/// `warmup` discarded and `samples` kept native samples, in cycles per round.
fn compute_cycles_per_round(rounds: u64, warmup: u32, samples: u32) -> Vec<f64> {
    for _ in 0..warmup {
        compute_sample(rounds);
    }
    (0..samples)
        .map(|_| compute_sample(rounds).0 as f64 / rounds.max(1) as f64)
        .collect()
}

/// An anonymous mapping, 2 MiB aligned, with huge pages asked for or refused.
struct Buffer {
    base: *mut u8,
    len: usize,
    mapping: *mut libc::c_void,
    mapping_len: usize,
}

impl Buffer {
    fn new(len: usize, huge: bool) -> Result<Self, String> {
        const HUGE: usize = 2 << 20;
        let mapping_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(format!("cannot map {len} bytes for the native twin"));
        }
        let base = ((mapping as usize).div_ceil(HUGE) * HUGE) as *mut u8;
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on our own mapping; it changes only how the kernel backs it.
        unsafe { libc::madvise(base as *mut libc::c_void, len, advice) };
        // Touch every page: the twin measures the workload, not first touches.
        // SAFETY: [base, base + len) lies inside the mapping.
        unsafe { std::ptr::write_bytes(base, 1, len) };
        Ok(Buffer {
            base,
            len,
            mapping,
            mapping_len,
        })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}

fn size_of(series: &BTreeMap<String, String>, key: &str) -> Result<u64, String> {
    series
        .get(key)
        .and_then(|v| parse_size(v))
        .ok_or_else(|| format!("the record has no usable `{key}` series parameter"))
}

/// Times `samples` runs (after `warmup` discarded ones) of `op`, which does `ops`
/// operations and returns nothing; returns cycles per operation.
fn time(warmup: u32, samples: u32, ops: u64, mut op: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        op();
    }
    (0..samples)
        .map(|_| {
            let t0 = rdtsc_fenced();
            op();
            rdtsc_fenced().wrapping_sub(t0) as f64 / ops.max(1) as f64
        })
        .collect()
}

/// The native twin of a workload's series: cycles per operation for the same amount of
/// work per sample as the guest's (`ops`). `None` for workloads without a twin.
pub fn twin(
    workload: WorkloadId,
    series: &BTreeMap<String, String>,
    ops: u64,
    warmup: u32,
    samples: u32,
) -> Option<Result<Vec<f64>, String>> {
    let result = match workload {
        WorkloadId::CpuCompute => Ok(compute_cycles_per_round(ops, warmup, samples)),
        WorkloadId::MemTlbChase => (|| {
            let ws = size_of(series, "ws")?;
            let huge = series.get("page").map(String::as_str) == Some("2m");
            let buf = Buffer::new(ws as usize, huge)?;
            let pages = buf.len / CHASE_STRIDE;
            // SAFETY: the buffer holds `pages` strides and stays alive while chased.
            let start = unsafe { build_chase(buf.base, pages, CHASE_SEED) };
            let mut p = start;
            Ok(time(warmup, samples, ops, || {
                // SAFETY: `p` is an element of the chain in `buf`.
                p = unsafe { chase(p, ops) };
            }))
        })(),
        WorkloadId::MemSeqRead => (|| {
            let size = size_of(series, "size")?;
            let buf = Buffer::new(size as usize, true)?;
            let passes = (ops / size.max(1)).max(1);
            Ok(time(warmup, samples, passes * size, || {
                for _ in 0..passes {
                    // SAFETY: the buffer holds `size` bytes.
                    std::hint::black_box(unsafe {
                        sum_words(buf.base as *const u64, size as usize)
                    });
                }
            }))
        })(),
        WorkloadId::MemCopy => (|| {
            let size = size_of(series, "size")?;
            let src = Buffer::new(size as usize, true)?;
            let dst = Buffer::new(size as usize, true)?;
            let passes = (ops / size.max(1)).max(1);
            Ok(time(warmup, samples, passes * size, || {
                for _ in 0..passes {
                    // SAFETY: two distinct buffers of `size` bytes.
                    unsafe { copy_bytes(dst.base, src.base, size as usize) };
                }
            }))
        })(),
        _ => return None,
    };
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_twin_is_deterministic_and_positive() {
        let (cycles, sum) = compute_sample(1000);
        assert!(cycles > 0);
        assert_eq!(sum, compute_checksum(1000));
        let per_round = compute_cycles_per_round(1000, 1, 3);
        assert_eq!(per_round.len(), 3);
        assert!(per_round.iter().all(|c| *c > 0.0));
    }

    #[test]
    fn memory_twins_run() {
        let series = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let chase = twin(
            WorkloadId::MemTlbChase,
            &series(&[("ws", "64k"), ("page", "4k")]),
            1000,
            0,
            2,
        )
        .unwrap()
        .unwrap();
        assert_eq!(chase.len(), 2);
        assert!(chase.iter().all(|c| *c > 0.0));
        let read = twin(
            WorkloadId::MemSeqRead,
            &series(&[("size", "1m")]),
            2 << 20,
            0,
            2,
        )
        .unwrap()
        .unwrap();
        assert!(
            read.iter().all(|c| *c > 0.0 && *c < 100.0),
            "{read:?} cycles per byte"
        );
        let copy = twin(
            WorkloadId::MemCopy,
            &series(&[("size", "1m")]),
            1 << 20,
            0,
            1,
        )
        .unwrap()
        .unwrap();
        assert_eq!(copy.len(), 1);
        assert!(twin(WorkloadId::MemSeqRead, &series(&[]), 1, 0, 1)
            .unwrap()
            .is_err());
        assert!(twin(WorkloadId::CpuIdle, &series(&[]), 1, 0, 1).is_none());
    }
}

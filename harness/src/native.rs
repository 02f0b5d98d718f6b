//! Native twins: the identical code of a guest workload, run here on the host, so a
//! record can give the guest/native ratio. Timed the way the guest times itself (TSC
//! reads fenced with LFENCE), so the same conversion applies to both.

use workloads::compute::{compute_init, compute_rounds, COMPUTE_WORDS};

#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
pub fn compute_sample(rounds: u64) -> (u64, u64) {
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
#[cfg(target_arch = "x86_64")]
pub fn compute_cycles_per_round(rounds: u64, warmup: u32, samples: u32) -> Vec<f64> {
    for _ in 0..warmup {
        compute_sample(rounds);
    }
    (0..samples)
        .map(|_| compute_sample(rounds).0 as f64 / rounds.max(1) as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_twin_is_deterministic_and_positive() {
        let (cycles, sum) = compute_sample(1000);
        assert!(cycles > 0);
        assert_eq!(sum, compute_checksum(1000));
        let per_round = compute_cycles_per_round(1000, 1, 3);
        assert_eq!(per_round.len(), 3);
        assert!(per_round.iter().all(|c| *c > 0.0));
    }
}

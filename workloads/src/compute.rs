//! The compute kernel of `cpu.compute`: identical code in the guest and on the host, so the
//! ratio of their times is the cost of running under the hypervisor.

/// Words in the kernel's working buffer: 4 KiB, so it stays in L1 on any x86 core.
pub const COMPUTE_WORDS: usize = 512;

/// The seed both sides start from.
pub const COMPUTE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fills `buf` from `COMPUTE_SEED` with xorshift64.
pub fn compute_init(buf: &mut [u64; COMPUTE_WORDS]) {
    let mut x = COMPUTE_SEED;
    for word in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *word = x;
    }
}

/// Runs `rounds` rounds of dependent multiply-xor-rotate mixing over `buf` and returns a
/// checksum that depends on every step, so the work cannot be skipped or reordered.
#[inline(never)]
pub fn compute_rounds(buf: &mut [u64; COMPUTE_WORDS], rounds: u64) -> u64 {
    let mut acc = COMPUTE_SEED;
    let mut r = 0;
    // One round is a fixed 64 words: 8 of them per 64-byte line, touched in order; round
    // `r` starts at word `(r * 64) % COMPUTE_WORDS`, kept as a running offset.
    let mut base = 0;
    while r < rounds {
        let mut i = 0;
        while i < 64 {
            let w = buf[base + i];
            acc = (acc ^ w)
                .wrapping_mul(0xff51_afd7_ed55_8ccd)
                .rotate_left(29);
            buf[base + i] = w.wrapping_add(acc);
            i += 1;
        }
        base = (base + 64) % COMPUTE_WORDS;
        r += 1;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_work_dependent() {
        let mut a = [0u64; COMPUTE_WORDS];
        let mut b = [0u64; COMPUTE_WORDS];
        compute_init(&mut a);
        compute_init(&mut b);
        assert_eq!(a, b);
        let ca = compute_rounds(&mut a, 100);
        let cb = compute_rounds(&mut b, 100);
        assert_eq!(ca, cb);
        let mut c = [0u64; COMPUTE_WORDS];
        compute_init(&mut c);
        assert_ne!(compute_rounds(&mut c, 101), ca);
    }

    /// The kernel's result and final buffer for 1000 rounds (125 trips round the buffer),
    /// as computed before its offset became a running one: the work is unchanged.
    #[test]
    fn golden_checksum() {
        let mut a = [0u64; COMPUTE_WORDS];
        compute_init(&mut a);
        assert_eq!(compute_rounds(&mut a, 1000), 0x0c60_f505_f450_6928);
        let digest = a
            .iter()
            .fold(0u64, |x, y| x.wrapping_mul(31).wrapping_add(*y));
        assert_eq!(digest, 0x005a_56b8_fb27_8648);
    }
}

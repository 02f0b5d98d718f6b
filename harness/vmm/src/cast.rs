//! Integer conversions that are lossless on the hosts hvbench builds for, named so that the
//! cast lints stay on everywhere else (as Firecracker's `u64_to_usize`). The VMM runs
//! x86-64 guests on x86-64 hosts: a build where usize is not 64 bits fails here, at
//! compile time, instead of truncating addresses somewhere.

const _: () = assert!(
    usize::BITS == u64::BITS,
    "hvbench builds for 64-bit hosts only"
);

/// `v` as a usize: lossless, usize is 64 bits (asserted above).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn u64_to_usize(v: u64) -> usize {
    v as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_extremes() {
        for v in [0, 1, u64::from(u32::MAX) + 1, u64::MAX] {
            assert_eq!(u64::try_from(u64_to_usize(v)).ok(), Some(v));
        }
    }
}

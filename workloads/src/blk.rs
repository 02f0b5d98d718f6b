//! What the block workloads (`io.blk-*`) share between the guest, the VMM's tests and the
//! host's check of the disk file: the data the guest writes (a function of the byte offset
//! alone, so any block holds either zeros or its pattern, whoever wrote it last), the
//! random offsets, and the fixed log-bucket latency histogram the guest keeps.

/// The seed of the written data; the host checks the disk file against the same pattern.
pub const DATA_SEED: u64 = 0x6876_6265_6e63_6862;

/// splitmix64: one step (also the pattern's word function).
pub const fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes per stamped unit: the first word of every 512-byte sector names its offset.
pub const STAMP_UNIT: u64 = 512;
const STAMP_BYTES: usize = 512;

/// The 8-byte word the guest writes at byte `offset` (a multiple of 8) of the disk: the
/// first word of each sector is derived from the sector's offset (a block written to the
/// wrong place is caught), the others from their place in the sector (so a buffer is
/// filled once and only stamped per request).
pub const fn pattern_word(offset: u64) -> u64 {
    let within = offset % STAMP_UNIT;
    let key = if within == 0 { offset } else { within };
    // Never zero, so a written word is never mistaken for an unwritten one.
    mix(DATA_SEED ^ key) | 1
}

/// Fills `buf` with the pattern of the disk bytes from `offset` (a multiple of 512).
pub fn fill(buf: &mut [u8], offset: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(offset + 8 * i as u64).to_le_bytes());
    }
}

/// Re-stamps a buffer [`fill`]ed for any sector-aligned offset so that it holds the
/// pattern of `offset` (a multiple of 512): only the first word of each sector changes.
pub fn stamp(buf: &mut [u8], offset: u64) {
    for (i, sector) in buf.chunks_exact_mut(STAMP_BYTES).enumerate() {
        let at = offset + STAMP_UNIT * i as u64;
        sector[..8].copy_from_slice(&pattern_word(at).to_le_bytes());
    }
}

/// What a block of the disk holds, as the guest wrote it or as it was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockContent {
    /// Never written: zeros (the file is created zero-filled).
    Zero,
    /// Exactly the pattern of its offset.
    Pattern,
    /// Anything else: corrupted.
    Other,
}

/// Classifies `buf`, the disk bytes from `offset` (a multiple of 8).
pub fn classify(buf: &[u8], offset: u64) -> BlockContent {
    if buf.iter().all(|b| *b == 0) {
        return BlockContent::Zero;
    }
    let pattern = buf
        .chunks_exact(8)
        .enumerate()
        .all(|(i, c)| c == pattern_word(offset + 8 * i as u64).to_le_bytes());
    if pattern && buf.len().is_multiple_of(8) {
        BlockContent::Pattern
    } else {
        BlockContent::Other
    }
}

/// xorshift64*: the random block offsets.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64) -> Self {
        Rng(mix(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        // The product's high half is below n: it fits.
        u64::try_from((self.next_u64() as u128 * n as u128) >> 64).unwrap_or(0)
    }
}

/// Sub-buckets per power of two: bucket bounds within 1/16 (6.25%) of a value.
pub const HIST_SUB_BITS: u32 = 4;
/// Buckets: 16 exact ones below 16, then 16 per power of two from 2^4 to 2^63.
pub const HIST_BUCKETS: usize = (64 - HIST_SUB_BITS as usize + 1) << HIST_SUB_BITS;

/// A fixed log-bucket histogram of cycle counts (HdrHistogram's layout, 4 bits of
/// precision): no allocation, constant time per value, so the guest can keep one.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: [u32; HIST_BUCKETS],
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            counts: [0; HIST_BUCKETS],
            total: 0,
            max: 0,
        }
    }

    /// The bucket of `v`: values below 16 exactly; above, the power of two and the next
    /// four bits.
    /// (Every bucket index is below [`HIST_BUCKETS`], so the casts to usize are lossless.)
    #[allow(clippy::cast_possible_truncation)]
    pub const fn bucket(v: u64) -> usize {
        let sub = 1u64 << HIST_SUB_BITS;
        if v < sub {
            return v as usize;
        }
        let top = 63 - v.leading_zeros();
        let shift = top - HIST_SUB_BITS;
        let mantissa = (v >> shift) & (sub - 1);
        (((shift + 1) as u64) << HIST_SUB_BITS | mantissa) as usize
    }

    /// The largest value bucket `b` holds (its upper bound).
    pub const fn bucket_high(b: usize) -> u64 {
        let sub = 1u64 << HIST_SUB_BITS;
        let b = b as u64;
        if b < sub {
            return b;
        }
        let shift = (b >> HIST_SUB_BITS) - 1;
        let mantissa = b & (sub - 1);
        let low = (sub | mantissa) << shift;
        low + ((1u64 << shift) - 1)
    }

    pub fn record(&mut self, v: u64) {
        let b = Self::bucket(v);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn clear(&mut self) {
        *self = Self::new();
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `per_million` / 1e6: the upper bound of the bucket holding
    /// it, capped by the largest value seen (so p100 is the exact maximum).
    pub fn quantile(&self, per_million: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // per_million is at most 1e6, so the rank is at most the total: it fits.
        let per_million = per_million.min(1_000_000);
        let rank = u64::try_from((self.total as u128 * per_million as u128).div_ceil(1_000_000))
            .unwrap_or(self.total)
            .max(1);
        let mut seen = 0u64;
        for (b, c) in self.counts.iter().enumerate() {
            seen += *c as u64;
            if seen >= rank {
                return Self::bucket_high(b).min(self.max);
            }
        }
        self.max
    }

    /// Non-empty buckets as (upper bound, count), in order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(b, c)| (Self::bucket_high(b), *c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values_within_a_sixteenth() {
        let mut rng = Rng::new(1);
        for v in (0..5000).chain((0..5000).map(|_| rng.next_u64() >> (rng.next_u64() % 64))) {
            let b = Histogram::bucket(v);
            let high = Histogram::bucket_high(b);
            assert!(high >= v, "{v}: bucket {b} ends at {high}");
            assert!(b == 0 || Histogram::bucket_high(b - 1) < v, "{v}");
            assert!(high - v <= v / 16, "{v}: {high}");
        }
        assert_eq!(Histogram::bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(Histogram::bucket_high(HIST_BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 100);
        }
        let close = |got: u64, want: u64| got >= want && got - want <= want / 16;
        assert!(
            close(h.quantile(500_000), 50_000),
            "{}",
            h.quantile(500_000)
        );
        assert!(close(h.quantile(990_000), 99_000));
        assert_eq!(h.quantile(1_000_000), 100_000);
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.total(), 1000);
        assert_eq!(h.buckets().map(|(_, c)| c as u64).sum::<u64>(), 1000);
        h.clear();
        assert_eq!(h.quantile(500_000), 0);
    }

    #[test]
    fn written_blocks_classify_as_pattern_and_others_do_not() {
        let mut buf = [0u8; 4096];
        assert_eq!(classify(&buf, 8192), BlockContent::Zero);
        fill(&mut buf, 8192);
        assert_eq!(classify(&buf, 8192), BlockContent::Pattern);
        // The same bytes at another offset are not that offset's pattern.
        assert_eq!(classify(&buf, 4096), BlockContent::Other);
        buf[100] ^= 1;
        assert_eq!(classify(&buf, 8192), BlockContent::Other);
        // A buffer filled for one offset and stamped for another is that offset's pattern.
        let mut other = [0u8; 4096];
        fill(&mut other, 0);
        stamp(&mut other, 12_288);
        assert_eq!(classify(&other, 12_288), BlockContent::Pattern);
        assert_eq!(classify(&other, 0), BlockContent::Other);
    }

    #[test]
    fn random_offsets_stay_below_their_bound() {
        let mut rng = Rng::new(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = rng.below(10);
            seen[usize::try_from(v).unwrap()] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}

//! Statistics of a sample set: location, spread, and a distribution-free confidence
//! interval for the median.
//!
//! The interval is the order-statistic (binomial) interval: exact for any continuous
//! distribution, deterministic (the same samples always give the same interval), and
//! honest for small n, where it reports the confidence it actually reaches.

use crate::bootstrap::median_of_sorted;
use serde::{Deserialize, Serialize};

/// A confidence interval and how it was obtained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// Confidence actually reached (at least the target where n allows it).
    pub level: f64,
    pub method: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for a single sample.
    pub stddev: f64,
    pub min: f64,
    pub max: f64,
    /// Coefficient of variation, stddev / mean (0 when the mean is 0).
    pub cv: f64,
    /// 95% confidence interval of the median.
    pub median_ci95: Interval,
}

impl Summary {
    /// Whether every figure is a finite number (JSON can hold it).
    pub fn is_finite(&self) -> bool {
        [
            self.median,
            self.mean,
            self.stddev,
            self.min,
            self.max,
            self.cv,
            self.median_ci95.low,
            self.median_ci95.high,
            self.median_ci95.level,
        ]
        .iter()
        .all(|v| v.is_finite())
    }
}

/// Arithmetic mean; `None` for an empty slice.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Median of a non-empty slice (the mean of the middle two for even n).
pub fn median(values: &[f64]) -> Option<f64> {
    let sorted = sorted(values)?;
    Some(median_of_sorted(&sorted))
}

fn sorted(values: &[f64]) -> Option<Vec<f64>> {
    crate::bootstrap::sorted_finite(values).ok()
}

/// The binomial(n, 1/2) distribution's cumulative probabilities P(B <= 0), P(B <= 1), ...
/// in one pass, O(1) each: ln C(n, k) is carried from one k to the next.
///
/// The arithmetic is the same, operation by operation and in the same order, as summing
/// each CDF from scratch (the former O(n^2)-per-call code, kept in the tests as the
/// reference): ln C(n, k) accumulates `ln(n - i) - ln(i + 1)` from 0.0 for i < k, each
/// term is `exp(ln C(n, k) - n ln 2)`, the CDF is their running sum from the first term,
/// capped at 1. So the intervals are bit for bit what they were.
struct BinomialHalfCdf {
    n: usize,
    /// The next k.
    k: usize,
    ln_choose: f64,
    sum: f64,
}

impl BinomialHalfCdf {
    fn new(n: usize) -> Self {
        BinomialHalfCdf {
            n,
            k: 0,
            ln_choose: 0.0,
            sum: 0.0,
        }
    }

    /// P(B <= k) for the next k (0 first); k must stay below n.
    fn next(&mut self) -> f64 {
        let k = self.k;
        if k > 0 {
            let i = k - 1;
            self.ln_choose += ((self.n - i) as f64).ln() - ((i + 1) as f64).ln();
        }
        let term = (self.ln_choose - self.n as f64 * std::f64::consts::LN_2).exp();
        // The first term starts the sum (a float sum from 0.0 or -0.0 gives it exactly).
        self.sum = if k == 0 { term } else { self.sum + term };
        self.k += 1;
        self.sum.min(1.0)
    }
}

/// 0.5^n, which underflows to 0 long before n leaves the range of `powi`'s exponent.
fn half_pow(n: usize) -> f64 {
    i32::try_from(n).map_or(0.0, |n| 0.5f64.powi(n))
}

/// Order-statistic confidence interval for the median at `target` confidence.
/// Returns (low index, high index, achieved level) into the sorted samples.
/// O(n): one binomial CDF term per candidate rank.
pub fn median_ci_ranks(n: usize, target: f64) -> (usize, usize, f64) {
    // The interval [x(j), x(n-1-j)] (0-based) covers the median with probability
    // 1 - 2 P(B <= j) where B ~ Binomial(n, 1/2). Take the largest j that keeps the
    // coverage at or above the target; with too few samples, the full range.
    let mut best = (0, n.saturating_sub(1), 1.0 - 2.0 * half_pow(n));
    let mut cdf = BinomialHalfCdf::new(n);
    let mut j = 0;
    while 2 * j + 1 < n {
        let level = 1.0 - 2.0 * cdf.next();
        if level >= target {
            best = (j, n - 1 - j, level);
            j += 1;
        } else {
            break;
        }
    }
    best
}

/// Summary statistics of `values`; `None` if empty or not all finite.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let v = sorted(values)?;
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let stddev = if n > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let (lo, hi, level) = median_ci_ranks(n, 0.95);
    Some(Summary {
        n,
        median: median_of_sorted(&v),
        mean,
        stddev,
        min: v[0],
        max: v[n - 1],
        cv: if mean != 0.0 {
            stddev / mean.abs()
        } else {
            0.0
        },
        median_ci95: Interval {
            low: v[lo],
            high: v[hi],
            level,
            method: "order-statistic".to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `0.5f64.powi(n as i32)` wrapped for n of 2^31 and more: 2^32 samples read as 0.5^0,
    /// a coverage of -1 for the full range.
    #[test]
    fn half_pow_never_wraps() {
        assert_eq!(half_pow(0), 1.0);
        assert_eq!(half_pow(3), 0.125);
        assert_eq!(half_pow(1 << 31), 0.0);
        assert_eq!(half_pow(1 << 32), 0.0);
        assert_eq!(half_pow(usize::MAX), 0.0);
    }

    /// The former O(n^3) implementation, the reference the O(n) one must match exactly.
    mod reference {
        fn ln_binomial_pmf_half(n: usize, k: usize) -> f64 {
            let mut ln_choose = 0.0;
            for i in 0..k {
                ln_choose += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
            }
            ln_choose - n as f64 * std::f64::consts::LN_2
        }

        fn binomial_half_cdf(n: usize, k: usize) -> f64 {
            (0..=k.min(n))
                .map(|i| ln_binomial_pmf_half(n, i).exp())
                .sum::<f64>()
                .min(1.0)
        }

        pub fn median_ci_ranks(n: usize, target: f64) -> (usize, usize, f64) {
            let mut best = (
                0,
                n.saturating_sub(1),
                1.0 - 2.0 * crate::stats::half_pow(n),
            );
            let mut j = 0;
            while 2 * j + 1 < n {
                let level = 1.0 - 2.0 * binomial_half_cdf(n, j);
                if level >= target {
                    best = (j, n - 1 - j, level);
                    j += 1;
                } else {
                    break;
                }
            }
            best
        }
    }

    fn same_ranks(n: usize, target: f64) {
        let (lo, hi, level) = median_ci_ranks(n, target);
        let (rlo, rhi, rlevel) = reference::median_ci_ranks(n, target);
        assert_eq!(
            (lo, hi, level.to_bits()),
            (rlo, rhi, rlevel.to_bits()),
            "n = {n}, target = {target}: {level} vs {rlevel}"
        );
    }

    /// Issue 8, defect 8: the linear-time ranks are exactly the former cubic ones.
    #[test]
    fn linear_ranks_equal_the_cubic_reference() {
        for n in 0..=200 {
            for target in [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0] {
                same_ranks(n, target);
            }
        }
        let mut rng = Rng::new(8);
        for _ in 0..500 {
            let n = 1 + rng.below(200);
            same_ranks(n, rng.uniform_nonzero());
        }
        for n in [1000, 1001] {
            same_ranks(n, 0.95);
        }
    }

    /// Whole summaries of random samples, sizes 1..200, against the reference ranks.
    #[test]
    fn summaries_are_unchanged_on_random_samples() {
        let mut rng = Rng::new(0x0808);
        for _ in 0..1_000 {
            let n = 1 + rng.below(199);
            let xs: Vec<f64> = (0..n).map(|_| -rng.uniform_nonzero().ln() * 1e3).collect();
            let s = summarize(&xs).unwrap();
            let mut sorted = xs.clone();
            sorted.sort_by(f64::total_cmp);
            let (lo, hi, level) = reference::median_ci_ranks(n, 0.95);
            assert_eq!(s.median_ci95.low.to_bits(), sorted[lo].to_bits());
            assert_eq!(s.median_ci95.high.to_bits(), sorted[hi].to_bits());
            assert_eq!(s.median_ci95.level.to_bits(), level.to_bits());
        }
    }

    /// 10,000 samples (the most a run allows) took minutes; now well under a second even
    /// in a debug build. The bound is loose: it catches a return to super-linear time.
    #[test]
    fn ten_thousand_samples_are_fast() {
        let mut rng = Rng::new(10_000);
        let xs: Vec<f64> = (0..10_000).map(|_| rng.uniform_nonzero()).collect();
        let start = std::time::Instant::now();
        let s = summarize(&xs).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert!(s.median_ci95.low < s.median && s.median < s.median_ci95.high);
        assert!(s.median_ci95.level >= 0.95);
    }

    #[test]
    fn known_values() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!(s.n, 5);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.mean, 3.0);
        assert!((s.stddev - 2.5f64.sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max), (1.0, 5.0));
        // n = 5 cannot reach 95%: the full range, at 1 - 2/32.
        assert_eq!((s.median_ci95.low, s.median_ci95.high), (1.0, 5.0));
        assert!((s.median_ci95.level - 0.9375).abs() < 1e-12);

        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
        let one = summarize(&[7.0]).unwrap();
        assert_eq!((one.stddev, one.median), (0.0, 7.0));
    }

    #[test]
    fn ranks_match_published_tables() {
        // Classic table values for the 95% median interval (1-based ranks):
        // n = 10 -> (2, 9) at 97.9%; n = 20 -> (6, 15) at 95.9%; n = 100 -> (40, 61).
        let (lo, hi, level) = median_ci_ranks(10, 0.95);
        assert_eq!((lo + 1, hi + 1), (2, 9));
        assert!((level - 0.978_515_625).abs() < 1e-9);
        let (lo, hi, level) = median_ci_ranks(20, 0.95);
        assert_eq!((lo + 1, hi + 1), (6, 15));
        assert!((0.95..0.96).contains(&level));
        let (lo, hi, _) = median_ci_ranks(100, 0.95);
        assert_eq!((lo + 1, hi + 1), (40, 61));
    }

    #[test]
    fn interval_covers_true_median_at_stated_rate() {
        // Exponential samples (median ln 2) from a fixed-seed generator: the interval
        // must contain the true median in at least ~95% of 2000 trials.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let true_median = std::f64::consts::LN_2;
        let trials = 2000;
        let mut covered = 0;
        for _ in 0..trials {
            let xs: Vec<f64> = (0..30).map(|_| -(1.0 - uniform()).ln()).collect();
            let s = summarize(&xs).unwrap();
            if s.median_ci95.low <= true_median && true_median <= s.median_ci95.high {
                covered += 1;
            }
        }
        let rate = covered as f64 / trials as f64;
        assert!(rate > 0.93 && rate < 0.995, "coverage {rate}");
    }
}

//! A/B testing in Firecracker's manner: a permutation test on the difference of the means,
//! and a change counts only where it is both significant (p below a threshold, 0.01 by
//! default) and larger than the noise every benchmark has run to run (5% by default).
//! Either condition alone flags too much: with thousands of samples a 0.3% shift is
//! "significant", and without a test a noisy workload's 6% wobble would be a regression.

use serde::{Deserialize, Serialize};

use crate::bootstrap::{StatsError, DEFAULT_SEED};
use crate::rng::Rng;

pub const DEFAULT_PERMUTATIONS: usize = 9_999;
pub const DEFAULT_NOISE: f64 = 0.05;
pub const DEFAULT_P_THRESHOLD: f64 = 0.01;

/// Whether a smaller or a larger figure is the better one: the table's own type. Where a
/// record names a direction this version does not know, it is `None`, and a change is
/// reported, never judged.
pub use workloads::Direction;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PermutationOptions {
    pub resamples: usize,
    pub seed: u64,
}

impl Default for PermutationOptions {
    fn default() -> Self {
        PermutationOptions {
            resamples: DEFAULT_PERMUTATIONS,
            seed: DEFAULT_SEED,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PermutationTest {
    /// mean(b) - mean(a).
    pub observed: f64,
    /// Two-sided: the share of relabellings whose |difference| reaches the observed one,
    /// counting the observed labelling itself, so it is never 0.
    pub p_value: f64,
    pub resamples: usize,
}

/// Two-sided permutation test of mean(b) - mean(a).
pub fn permutation_test(
    a: &[f64],
    b: &[f64],
    options: &PermutationOptions,
) -> Result<PermutationTest, StatsError> {
    if a.is_empty() || b.is_empty() {
        return Err(StatsError::NoSamples);
    }
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return Err(StatsError::NotFinite);
    }
    if options.resamples == 0 {
        return Err(StatsError::InvalidOption(
            "the permutation test needs at least one resample".into(),
        ));
    }
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let observed = mean(b) - mean(a);
    let mut pooled: Vec<f64> = a.iter().chain(b).copied().collect();
    let total: f64 = pooled.iter().sum();
    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    // Draw a random subset of the smaller size (a partial Fisher-Yates shuffle); the rest
    // is the other group, whose sum is the total minus the subset's.
    let subset = a.len().min(b.len());
    let subset_is_a = a.len() <= b.len();
    // Relabellings that tie the observed difference must count as reaching it; summing in
    // another order moves the last bits, hence the relative tolerance.
    let threshold = observed.abs() * (1.0 - 1e-9);
    let mut rng = Rng::new(options.seed);
    let mut reaching = 0usize;
    for _ in 0..options.resamples {
        let mut subset_sum = 0.0;
        for i in 0..subset {
            let j = i + rng.below(pooled.len() - i);
            pooled.swap(i, j);
            subset_sum += pooled[i];
        }
        let (sum_a, sum_b) = if subset_is_a {
            (subset_sum, total - subset_sum)
        } else {
            (total - subset_sum, subset_sum)
        };
        let difference = sum_b / n_b - sum_a / n_a;
        if difference.abs() >= threshold {
            reaching += 1;
        }
    }
    Ok(PermutationTest {
        observed,
        p_value: (reaching + 1) as f64 / (options.resamples + 1) as f64,
        resamples: options.resamples,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbOptions {
    /// Smallest relative change of the mean that counts (0.05 = 5%).
    pub noise: f64,
    /// A change counts only where the permutation test's p-value is below this.
    pub p_threshold: f64,
    pub permutation: PermutationOptions,
}

impl Default for AbOptions {
    fn default() -> Self {
        AbOptions {
            noise: DEFAULT_NOISE,
            p_threshold: DEFAULT_P_THRESHOLD,
            permutation: PermutationOptions::default(),
        }
    }
}

impl AbOptions {
    pub fn validate(&self) -> Result<(), StatsError> {
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(StatsError::InvalidOption(format!(
                "noise threshold {} must be a non-negative fraction (0.05 = 5%)",
                self.noise
            )));
        }
        if !(self.p_threshold > 0.0 && self.p_threshold <= 1.0) {
            return Err(StatsError::InvalidOption(format!(
                "p-value threshold {} must be in (0, 1]",
                self.p_threshold
            )));
        }
        Ok(())
    }
}

/// How B stands against A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Significant and above the noise threshold, in the bad direction.
    Worse,
    /// Significant and above the noise threshold, in the good direction.
    Better,
    /// Significant and above the noise threshold, for a metric of unknown direction.
    Changed,
    NoSignificantChange,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbResult {
    pub mean_a: f64,
    pub mean_b: f64,
    /// (mean(b) - mean(a)) / |mean(a)|: +0.10 is B 10% above A.
    pub relative_change: f64,
    pub p_value: f64,
    pub change: Change,
}

/// Compares B against A: A is the base (or backend A), B the new run (or backend B).
pub fn ab_test(
    a: &[f64],
    b: &[f64],
    direction: Option<Direction>,
    options: &AbOptions,
) -> Result<AbResult, StatsError> {
    options.validate()?;
    let test = permutation_test(a, b, &options.permutation)?;
    let mean_a = a.iter().sum::<f64>() / a.len() as f64;
    let mean_b = mean_a + test.observed;
    let relative_change = if mean_a != 0.0 {
        test.observed / mean_a.abs()
    } else if test.observed == 0.0 {
        0.0
    } else {
        test.observed.signum() * f64::INFINITY
    };
    Ok(AbResult {
        mean_a,
        mean_b,
        relative_change,
        p_value: test.p_value,
        change: judge(test.p_value, relative_change, direction, options),
    })
}

/// The smallest two-sided p-value a permutation test of `a` against `b` units can give
/// (all values distinct): 2 / C(a + b, a).
pub fn smallest_attainable_p(a: usize, b: usize) -> f64 {
    let mut combinations = 1.0f64;
    for i in 0..a.min(b) {
        combinations = combinations * (a + b - i) as f64 / (i + 1) as f64;
    }
    (2.0 / combinations).min(1.0)
}

/// Runs per side with which `tests` permutation tests on runs, Holm-corrected together,
/// can each reach `p_threshold` (64 at most).
pub fn runs_needed(p_threshold: f64, tests: usize) -> usize {
    let m = tests.max(1) as f64;
    (1..=64)
        .find(|&n| smallest_attainable_p(n, n) * m < p_threshold)
        .unwrap_or(64)
}

/// The verdict rule: a change counts only where p is below the threshold AND the relative
/// change exceeds the noise threshold; then the metric's direction says which way it went.
pub fn judge(
    p_value: f64,
    relative_change: f64,
    direction: Option<Direction>,
    options: &AbOptions,
) -> Change {
    let significant = p_value < options.p_threshold && relative_change.abs() > options.noise;
    match (significant, direction) {
        (false, _) => Change::NoSignificantChange,
        (true, None) => Change::Changed,
        (true, Some(Direction::LowerIsBetter)) if relative_change > 0.0 => Change::Worse,
        (true, Some(Direction::HigherIsBetter)) if relative_change < 0.0 => Change::Worse,
        (true, _) => Change::Better,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normal(mean, sd) samples.
    fn normal(rng: &mut Rng, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        (0..n).map(|_| mean + sd * rng.normal()).collect()
    }

    #[test]
    fn runs_needed_follows_the_threshold_and_the_number_of_tests() {
        // 2 / C(10, 5) = 0.0079 < 0.01; with 4 tests Holm needs 2 / C(12, 6) * 4 < 0.01.
        assert_eq!(runs_needed(0.01, 1), 5);
        assert_eq!(runs_needed(0.01, 4), 6);
        assert_eq!(runs_needed(0.05, 1), 4);
        assert!(smallest_attainable_p(4, 4) >= 0.01);
    }

    #[test]
    fn identical_samples_give_p_one_and_no_change() {
        let mut rng = Rng::new(1);
        let a = normal(&mut rng, 50, 100.0, 5.0);
        let test = permutation_test(&a, &a, &PermutationOptions::default()).unwrap();
        assert_eq!(test.observed, 0.0);
        assert_eq!(test.p_value, 1.0);
        let r = ab_test(
            &a,
            &a,
            Some(Direction::LowerIsBetter),
            &AbOptions::default(),
        )
        .unwrap();
        assert_eq!(r.change, Change::NoSignificantChange);
        assert_eq!(r.relative_change, 0.0);
    }

    #[test]
    fn a_clear_shift_is_significant_and_judged_by_direction() {
        let mut rng = Rng::new(2);
        let a = normal(&mut rng, 40, 100.0, 3.0);
        let b = normal(&mut rng, 40, 120.0, 3.0);
        let options = AbOptions::default();
        let slower = ab_test(&a, &b, Some(Direction::LowerIsBetter), &options).unwrap();
        assert!(slower.p_value < 0.01, "p = {}", slower.p_value);
        // Nothing of 9,999 relabellings reaches a 6-sigma shift: p is the floor 1/10,000.
        assert_eq!(slower.p_value, 1.0 / 10_000.0);
        assert!((slower.relative_change - 0.2).abs() < 0.03);
        assert_eq!(slower.change, Change::Worse);
        let throughput = ab_test(&a, &b, Some(Direction::HigherIsBetter), &options).unwrap();
        assert_eq!(throughput.change, Change::Better);
        let back = ab_test(&b, &a, Some(Direction::LowerIsBetter), &options).unwrap();
        assert_eq!(back.change, Change::Better);
        let unknown = ab_test(&a, &b, None, &options).unwrap();
        assert_eq!(unknown.change, Change::Changed);
    }

    #[test]
    fn a_significant_shift_below_the_noise_threshold_is_no_change() {
        // 2% shift with tiny spread: p is at its floor, but 2% < 5% noise.
        let mut rng = Rng::new(3);
        let a = normal(&mut rng, 200, 100.0, 0.5);
        let b = normal(&mut rng, 200, 102.0, 0.5);
        let r = ab_test(
            &a,
            &b,
            Some(Direction::LowerIsBetter),
            &AbOptions::default(),
        )
        .unwrap();
        assert!(r.p_value < 0.01);
        assert_eq!(r.change, Change::NoSignificantChange);
        // With a 1% threshold, the same data is a regression.
        let strict = AbOptions {
            noise: 0.01,
            ..Default::default()
        };
        let r = ab_test(&a, &b, Some(Direction::LowerIsBetter), &strict).unwrap();
        assert_eq!(r.change, Change::Worse);
    }

    #[test]
    fn a_large_but_insignificant_difference_is_no_change() {
        // Three samples each, hugely noisy: a 30% difference of means cannot reach
        // p < 0.01 (there are only 20 distinct relabellings).
        let a = [100.0, 60.0, 140.0];
        let b = [130.0, 80.0, 180.0];
        let r = ab_test(
            &a,
            &b,
            Some(Direction::LowerIsBetter),
            &AbOptions::default(),
        )
        .unwrap();
        assert!(r.p_value > 0.01, "p = {}", r.p_value);
        assert_eq!(r.change, Change::NoSignificantChange);
    }

    #[test]
    fn same_distribution_rarely_significant() {
        // Under the null, p < 0.01 about 1% of the time; with the noise threshold on
        // top, no regression at all in 100 same-distribution pairs.
        let mut rng = Rng::new(4);
        let options = AbOptions {
            permutation: PermutationOptions {
                resamples: 999,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut p_small = 0;
        for _ in 0..100 {
            let a = normal(&mut rng, 30, 100.0, 3.0);
            let b = normal(&mut rng, 30, 100.0, 3.0);
            let r = ab_test(&a, &b, Some(Direction::LowerIsBetter), &options).unwrap();
            p_small += usize::from(r.p_value < 0.01);
            assert_ne!(r.change, Change::Worse);
        }
        assert!(p_small <= 5, "{p_small} of 100 null tests had p < 0.01");
    }

    #[test]
    fn bad_input_is_an_error() {
        let options = AbOptions::default();
        assert_eq!(
            ab_test(&[], &[1.0], Some(Direction::LowerIsBetter), &options),
            Err(StatsError::NoSamples)
        );
        assert_eq!(
            ab_test(
                &[f64::INFINITY],
                &[1.0],
                Some(Direction::LowerIsBetter),
                &options
            ),
            Err(StatsError::NotFinite)
        );
        let negative_noise = AbOptions {
            noise: -1.0,
            ..Default::default()
        };
        assert!(matches!(
            ab_test(
                &[1.0],
                &[1.0],
                Some(Direction::LowerIsBetter),
                &negative_noise
            ),
            Err(StatsError::InvalidOption(_))
        ));
        assert_eq!(Direction::from_name("sideways"), None);
        assert_eq!(
            Direction::from_name("higher_is_better"),
            Some(Direction::HigherIsBetter)
        );
    }
}

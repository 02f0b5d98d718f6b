//! A small seeded random number generator, so that every interval and p-value in a report
//! is reproducible: the same samples and the same seed give the same figures, byte for byte.
//!
//! xoshiro256++ (Blackman and Vigna), seeded through SplitMix64 as its authors recommend.
//! Statistical quality is far beyond what resampling needs; no `rand` dependency.

#[derive(Clone, Debug)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut splitmix = seed;
        let mut next = || {
            splitmix = splitmix.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = splitmix;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            state: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1]: safe to take the logarithm of.
    pub fn uniform_nonzero(&mut self) -> f64 {
        1.0 - self.uniform()
    }

    /// Uniform integer in `0..bound`; 0 when `bound` is 0. Lemire's multiply-shift: the bias
    /// is below bound / 2^64, far under anything a resampling test can see.
    // (r * bound) >> 64 < bound, a usize: the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    pub fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }

    /// Standard normal variate (Box-Muller; the second variate is dropped for simplicity).
    pub fn normal(&mut self) -> f64 {
        let radius = (-2.0 * self.uniform_nonzero().ln()).sqrt();
        radius * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// Gamma(shape, 1) variate for `shape > 0` (Marsaglia and Tsang, 2000).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            // Gamma(a) = Gamma(a + 1) * U^(1/a).
            let u = self.uniform_nonzero();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.uniform_nonzero();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b) variate for `a, b > 0`.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_seeds_differ() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(8);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn moments_of_the_variates() {
        let mut r = Rng::new(42);
        let n = 200_000;
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let uniforms: Vec<f64> = (0..n).map(|_| r.uniform()).collect();
        assert!((mean(&uniforms) - 0.5).abs() < 0.005);
        assert!(uniforms.iter().all(|u| (0.0..1.0).contains(u)));
        let normals: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = mean(&normals);
        let var = normals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{m} {var}");
        for shape in [0.5, 1.0, 3.0, 250.0] {
            let g: Vec<f64> = (0..n).map(|_| r.gamma(shape)).collect();
            assert!((mean(&g) / shape - 1.0).abs() < 0.02, "gamma({shape})");
        }
        // Beta(a, b) has mean a / (a + b).
        let b: Vec<f64> = (0..n).map(|_| r.beta(2.0, 6.0)).collect();
        assert!((mean(&b) - 0.25).abs() < 0.005);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[r.below(7)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(r.below(0), 0);
    }
}

//! Small, pure statistics for the bench report: percentiles, a seedable RNG and a
//! percentile bootstrap for confidence intervals.

/// The `p` quantile (0..=1) of `v`, nearest rank (sorts `v`); NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The `p` quantile of `v`, without touching `v`.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    pct(&mut v.to_vec(), p)
}

/// The median of `v`, without touching `v`.
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// A small seedable PRNG (SplitMix64): the same seed gives the same report.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// A confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ci {
    pub lo: f64,
    pub hi: f64,
}

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 2000;

/// Percentile-bootstrap `level` (e.g. 0.95) confidence interval of `stat` over `samples`,
/// with `resamples` resamples drawn from `rng`. `None` when there are no samples.
pub fn bootstrap_ci(
    samples: &[f64],
    stat: impl Fn(&mut [f64]) -> f64,
    resamples: usize,
    level: f64,
    rng: &mut Rng,
) -> Option<Ci> {
    bootstrap_ci2(samples, &[0.0], |a, _| stat(a), resamples, level, rng)
}

/// Like [`bootstrap_ci`] for a statistic of two independent samples (a ratio or a
/// difference of their medians): each is resampled on its own.
pub fn bootstrap_ci2(
    a: &[f64],
    b: &[f64],
    stat: impl Fn(&mut [f64], &mut [f64]) -> f64,
    resamples: usize,
    level: f64,
    rng: &mut Rng,
) -> Option<Ci> {
    if a.is_empty() || b.is_empty() || resamples == 0 {
        return None;
    }
    let (mut ra, mut rb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for x in ra.iter_mut() {
            *x = a[rng.below(a.len())];
        }
        for x in rb.iter_mut() {
            *x = b[rng.below(b.len())];
        }
        let s = stat(&mut ra, &mut rb);
        if s.is_finite() {
            stats.push(s);
        }
    }
    if stats.is_empty() {
        return None;
    }
    let tail = (1.0 - level) / 2.0;
    Some(Ci {
        lo: pct(&mut stats, tail),
        hi: pct(&mut stats, 1.0 - tail),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn med(v: &mut [f64]) -> f64 {
        pct(v, 0.5)
    }

    #[test]
    fn pct_nearest_rank() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(pct(&mut v, 0.5), 3.0);
        assert_eq!(pct(&mut v, 0.0), 1.0);
        assert_eq!(pct(&mut v, 1.0), 5.0);
        assert!(pct(&mut [], 0.5).is_nan());
        assert_eq!(median(&[2.0, 9.0, 1.0]), 2.0);
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..10).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..10).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
        let mut r = Rng::new(1);
        let mut seen = [0usize; 10];
        for _ in 0..10_000 {
            seen[r.below(10)] += 1;
        }
        // Every bucket near 1000.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn bootstrap_empty_and_constant() {
        let mut r = Rng::new(1);
        assert_eq!(bootstrap_ci(&[], med, 100, 0.95, &mut r), None);
        let ci = bootstrap_ci(&[3.0; 20], med, 100, 0.95, &mut r);
        assert_eq!(ci, Some(Ci { lo: 3.0, hi: 3.0 }));
    }

    #[test]
    fn bootstrap_is_reproducible() {
        let v: Vec<f64> = (0..50).map(|i| f64::from(i * 7 % 23)).collect();
        let a = bootstrap_ci(&v, med, 500, 0.95, &mut Rng::new(42));
        let b = bootstrap_ci(&v, med, 500, 0.95, &mut Rng::new(42));
        assert_eq!(a, b);
    }

    #[test]
    fn bootstrap_covers_the_median_and_narrows_with_more_samples() {
        // Uniform-ish samples on 0..1000 (true median 500).
        let mut g = Rng::new(3);
        let small: Vec<f64> = (0..30).map(|_| g.below(1000) as f64).collect();
        let big: Vec<f64> = (0..3000).map(|_| g.below(1000) as f64).collect();
        let cs = bootstrap_ci(&small, med, 1000, 0.95, &mut Rng::new(1)).expect("samples");
        let cb = bootstrap_ci(&big, med, 1000, 0.95, &mut Rng::new(1)).expect("samples");
        assert!(cs.lo <= cs.hi && cb.lo <= cb.hi);
        assert!(cb.lo < 500.0 && 500.0 < cb.hi, "{cb:?}");
        assert!(cb.hi - cb.lo < cs.hi - cs.lo, "{cs:?} vs {cb:?}");
        // The point estimate lies inside its interval.
        let m = median(&big);
        assert!(cb.lo <= m && m <= cb.hi);
    }

    #[test]
    fn bootstrap_of_a_ratio() {
        let a: Vec<f64> = (0..200).map(|i| 200.0 + f64::from(i % 10)).collect();
        let b: Vec<f64> = (0..200).map(|i| 100.0 + f64::from(i % 10) / 2.0).collect();
        let ci = bootstrap_ci2(&a, &b, |a, b| med(a) / med(b), 500, 0.95, &mut Rng::new(9))
            .expect("samples");
        assert!(ci.lo > 1.9 && ci.hi < 2.1, "{ci:?}");
    }
}

//! Online drift detection of one score's distribution — the statistical core of the drift
//! alarms (`crate::pipeline::drift` runs them in the pipelines): the two-sample Cramér–von Mises
//! statistic (Anderson 1962, "On the distribution of the two-sample Cramér-von Mises
//! criterion"; the definition of `scipy.stats.cramervonmises_2samp`, ties by average ranks) of
//! the last W live scores against a reference sample (the calibration's held-out inliers), for
//! several window sizes, evaluated every `stride` records, with thresholds set for an expected
//! run time (ERT) between false alarms — the design of alibi-detect's online CVM detector
//! (Cobb et al., AISTATS 2022), simplified: each window size's threshold is the (1 - a) quantile
//! of the statistic under no drift, a = stride / (ERT x number of window sizes), estimated by
//! permutation (random W-subsets of the reference against the rest). Overlapping windows are
//! correlated, so the real run time is at least about ERT; measure it on inlier data.

use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};

/// Two-sample Cramér–von Mises statistic T of `x` against `y` (any order; NaN-free):
/// `T = U / (n m (n + m)) - (4 n m - 1) / (6 (n + m))` with
/// `U = n sum_i (r_i - i)^2 + m sum_j (s_j - j)^2`, where r_i, s_j are the average ranks of the
/// sorted x and y in the pooled sample (scipy's definition). Larger = more different.
pub fn cvm_two_sample(x: &[f64], y: &[f64]) -> f64 {
    let (mut x, mut y) = (x.to_vec(), y.to_vec());
    x.sort_by(f64::total_cmp);
    y.sort_by(f64::total_cmp);
    cvm_sorted(&x, &y)
}

/// [`cvm_two_sample`] of samples already sorted ascending: the pooled order is a merge.
pub fn cvm_sorted(x: &[f64], y: &[f64]) -> f64 {
    let (n, m) = (x.len(), y.len());
    if n == 0 || m == 0 {
        return 0.0;
    }
    let mut pooled: Vec<(f64, bool)> = Vec::with_capacity(n + m);
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if j == m || (i < n && x[i] <= y[j]) {
            pooled.push((x[i], true));
            i += 1;
        } else {
            pooled.push((y[j], false));
            j += 1;
        }
    }
    let ranks = average_ranks(&pooled.iter().map(|p| p.0).collect::<Vec<_>>());
    let (mut ix, mut iy) = (0f64, 0f64);
    let (mut ux, mut uy) = (0f64, 0f64);
    for ((_, is_x), r) in pooled.iter().zip(&ranks) {
        if *is_x {
            ix += 1.0;
            ux += (r - ix).powi(2);
        } else {
            iy += 1.0;
            uy += (r - iy).powi(2);
        }
    }
    finish(n as f64 * ux + m as f64 * uy, n as f64, m as f64)
}

fn finish(u: f64, n: f64, m: f64) -> f64 {
    u / (n * m * (n + m)) - (4.0 * m * n - 1.0) / (6.0 * (m + n))
}

/// 1-based average ranks of sorted values (ties share the mean of their positions).
fn average_ranks(sorted: &[f64]) -> Vec<f64> {
    let mut ranks = vec![0.0; sorted.len()];
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[i] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        ranks[i..=j].fill(avg);
        i = j + 1;
    }
    ranks
}

/// Settings of a [`CvmDetector`].
#[derive(Debug, Clone, PartialEq)]
pub struct DriftConfig {
    /// Window sizes W (records), e.g. `[64, 256]`: small ones react fast to big shifts, large
    /// ones see small shifts.
    pub windows: Vec<usize>,
    /// Expected run time between false alarms, in records.
    pub ert: f64,
    /// Records between two evaluations.
    pub stride: usize,
    /// Permutations per window size for the thresholds (at least 10 / a).
    pub simulations: usize,
    /// Seed of the permutations.
    pub seed: u64,
}

/// One evaluation: the statistic and threshold per window size, and whether any exceeded.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftCheck {
    /// Records seen so far.
    pub records: u64,
    /// (window size, statistic, threshold) for every window already full.
    pub windows: Vec<(usize, f64, f64)>,
    /// Whether a statistic exceeded its threshold.
    pub alarm: bool,
}

/// The online detector of one score (see the module docs).
#[derive(Debug, Clone)]
pub struct CvmDetector {
    reference: Vec<f64>,
    windows: Vec<usize>,
    thresholds: Vec<f64>,
    stride: usize,
    recent: std::collections::VecDeque<f64>,
    seen: u64,
}

impl CvmDetector {
    /// Sets the thresholds from `reference` (non-finite values are dropped).
    ///
    /// Errors: no window sizes, a window not smaller than half the reference, ERT below the
    /// stride, or too few simulations for the false-alarm level.
    pub fn calibrate(reference: &[f64], cfg: &DriftConfig) -> Result<Self, String> {
        Ok(Self::calibrate_all(&[reference], cfg)?.remove(0))
    }

    /// Detectors for several references with the same settings (errors as [`Self::calibrate`]).
    /// The permutation null of the statistic depends on the reference only through its ranks:
    /// references whose finite values are distinct and equally many share one set of
    /// thresholds, computed once; the distinct sets are computed in parallel.
    pub fn calibrate_all(references: &[&[f64]], cfg: &DriftConfig) -> Result<Vec<Self>, String> {
        use rayon::prelude::*;
        let sorted: Vec<Vec<f64>> = references
            .iter()
            .map(|r| {
                let mut v: Vec<f64> = r.iter().copied().filter(|v| v.is_finite()).collect();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        let mut alpha = 0.0;
        for r in &sorted {
            alpha = Self::level(r.len(), cfg)?;
        }
        // Tie-free references of one length share thresholds; others get their own.
        let key = |r: &Vec<f64>| r.windows(2).all(|p| p[0] < p[1]).then_some(r.len());
        let keys: Vec<Option<usize>> = sorted.iter().map(key).collect();
        let jobs: Vec<usize> = (0..sorted.len())
            .filter(|&i| keys[i].is_none() || !keys[..i].contains(&keys[i]))
            .collect();
        let thresholds: Vec<Vec<f64>> = jobs
            .par_iter()
            .map(|&i| Self::null_thresholds(&sorted[i], cfg, alpha))
            .collect();
        Ok(sorted
            .into_iter()
            .enumerate()
            .map(|(i, reference)| {
                let j = jobs
                    .iter()
                    .position(|&j| j == i || (keys[i].is_some() && keys[j] == keys[i]))
                    .expect("every reference has a job");
                Self {
                    reference,
                    windows: cfg.windows.clone(),
                    thresholds: thresholds[j].clone(),
                    stride: cfg.stride,
                    recent: std::collections::VecDeque::new(),
                    seen: 0,
                }
            })
            .collect())
    }

    /// The false-alarm level per check, after checking the settings against a reference of
    /// `m` finite values.
    fn level(m: usize, cfg: &DriftConfig) -> Result<f64, String> {
        if cfg.windows.is_empty() || cfg.stride == 0 {
            return Err("drift: need at least one window size and a stride >= 1".into());
        }
        if let Some(w) = cfg.windows.iter().find(|&&w| w < 2 || 2 * w > m) {
            return Err(format!(
                "drift: window {w} needs 2 <= W <= half the reference ({m} finite scores)"
            ));
        }
        let alpha = cfg.stride as f64 / (cfg.ert * cfg.windows.len() as f64);
        if !(alpha > 0.0 && alpha < 1.0) {
            return Err(format!(
                "drift: ERT {} must exceed the stride {}",
                cfg.ert, cfg.stride
            ));
        }
        if (cfg.simulations as f64) * alpha < 10.0 {
            return Err(format!(
                "drift: {} simulations are too few for a false-alarm level of {alpha:.2e} per \
                 check (need {})",
                cfg.simulations,
                (10.0 / alpha).ceil()
            ));
        }
        Ok(alpha)
    }

    /// Each window size's (1 - alpha) quantile of the statistic of random W-subsets of the
    /// sorted `reference` against the rest.
    fn null_thresholds(reference: &[f64], cfg: &DriftConfig, alpha: f64) -> Vec<f64> {
        let m = reference.len();
        let pooled = PooledRanks::new(reference);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut order: Vec<usize> = (0..m).collect();
        let mut chosen = Vec::new();
        cfg.windows
            .iter()
            .map(|&w| {
                let mut stats: Vec<f64> = (0..cfg.simulations)
                    .map(|_| {
                        let (pick, _) = order.partial_shuffle(&mut rng, w);
                        chosen.clear();
                        chosen.extend_from_slice(pick);
                        chosen.sort_unstable();
                        pooled.statistic(&chosen)
                    })
                    .collect();
                stats.sort_by(f64::total_cmp);
                let k = ((1.0 - alpha) * stats.len() as f64).ceil() as usize;
                stats[k.min(stats.len() - 1)]
            })
            .collect()
    }

    /// The window sizes, in the order configured.
    pub fn windows(&self) -> &[usize] {
        &self.windows
    }

    /// The threshold of each window size, in the order configured.
    pub fn thresholds(&self) -> &[f64] {
        &self.thresholds
    }

    /// Adds one live score (non-finite scores are skipped: they are flagged, not drift);
    /// every `stride` records returns the check.
    pub fn push(&mut self, score: f64) -> Option<DriftCheck> {
        if !score.is_finite() {
            return None;
        }
        let max_w = *self.windows.iter().max().expect("windows checked");
        if self.recent.len() == max_w {
            self.recent.pop_front();
        }
        self.recent.push_back(score);
        self.seen += 1;
        if !self.seen.is_multiple_of(self.stride as u64) {
            return None;
        }
        let mut check = DriftCheck {
            records: self.seen,
            windows: vec![],
            alarm: false,
        };
        for (&w, &t) in self.windows.iter().zip(&self.thresholds) {
            if self.recent.len() < w {
                continue;
            }
            let mut window: Vec<f64> = self
                .recent
                .iter()
                .skip(self.recent.len() - w)
                .copied()
                .collect();
            window.sort_by(f64::total_cmp);
            let s = cvm_sorted(&window, &self.reference);
            check.alarm |= s > t;
            check.windows.push((w, s, t));
        }
        Some(check)
    }
}

/// The reference's average ranks with prefix sums of their tie offsets, for the statistic of a
/// random subset (a window) against the rest in O(W): the pooled sample of the two is the
/// reference itself. At pooled position p (1-based) with rank R_p and offset e_p = R_p - p, a
/// rest element preceded by c window elements has index p - c among the rest, so its term is
/// (e_p + c)^2, constant in c over each gap between window positions.
struct PooledRanks {
    ranks: Vec<f64>,
    /// Prefix sums of e_p and e_p^2 (index p = sum over positions < p, 0-based).
    e1: Vec<f64>,
    e2: Vec<f64>,
}

impl PooledRanks {
    fn new(sorted: &[f64]) -> Self {
        let ranks = average_ranks(sorted);
        let (mut e1, mut e2) = (vec![0.0], vec![0.0]);
        for (p, r) in ranks.iter().enumerate() {
            let e = r - (p + 1) as f64;
            e1.push(e1[p] + e);
            e2.push(e2[p] + e * e);
        }
        Self { ranks, e1, e2 }
    }

    /// T of the elements at the sorted 0-based positions `chosen` against the rest.
    fn statistic(&self, chosen: &[usize]) -> f64 {
        let (n, total) = (chosen.len(), self.ranks.len());
        let m = total - n;
        let mut ux = 0.0;
        for (i, &p) in chosen.iter().enumerate() {
            ux += (self.ranks[p] - (i + 1) as f64).powi(2);
        }
        let mut uy = 0.0;
        let mut start = 0; // first position of the current gap
        let ends = chosen.iter().copied().chain(std::iter::once(total)); // exclusive
        for (k, end) in ends.enumerate() {
            if end > start {
                let len = (end - start) as f64;
                let (s1, s2) = (self.e1[end] - self.e1[start], self.e2[end] - self.e2[start]);
                let c = k as f64;
                uy += len * c * c + 2.0 * c * s1 + s2;
            }
            start = end + 1;
        }
        finish(n as f64 * ux + m as f64 * uy, n as f64, m as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn statistic_matches_scipy() {
        // scipy.stats.cramervonmises_2samp(x, y).statistic (scipy 1.17.1).
        let t = cvm_two_sample(&[1.0, 2.0, 3.5, 2.0], &[0.5, 2.0, 4.0, 5.0, 1.0, 3.0]);
        assert!((t - 0.068_750_000_000_000_09).abs() < 1e-12, "{t}");
        let t = cvm_two_sample(&[0.1, 0.4, 0.7], &[0.2, 0.3, 0.5, 0.6, 0.8]);
        assert!((t - 0.0625).abs() < 1e-12, "{t}");
        // The O(W) permutation form equals the direct statistic of the subset against the rest,
        // on random subsets of a reference with ties.
        let mut sorted: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64 / 7.0).collect();
        sorted.sort_by(f64::total_cmp);
        let pooled = PooledRanks::new(&sorted);
        let mut rng = StdRng::seed_from_u64(5);
        let mut order: Vec<usize> = (0..300).collect();
        for w in [1, 2, 17, 64, 150] {
            order.shuffle(&mut rng);
            let mut pick = order[..w].to_vec();
            pick.sort_unstable();
            let x: Vec<f64> = pick.iter().map(|&i| sorted[i]).collect();
            let rest: Vec<f64> = (0..300)
                .filter(|i| pick.binary_search(i).is_err())
                .map(|i| sorted[i])
                .collect();
            let direct = cvm_two_sample(&x, &rest);
            assert!(
                (pooled.statistic(&pick) - direct).abs() < 1e-9 * direct.abs().max(1.0),
                "W {w}"
            );
        }
    }

    fn normal(n: usize, mean: f64, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = Normal::new(mean, 1.0).unwrap();
        (0..n).map(|_| d.sample(&mut rng)).collect()
    }

    /// Thresholds depend on a tie-free reference only through its length (the statistic is a
    /// function of ranks), so such references share them; a reference with ties gets its own.
    #[test]
    fn tie_free_references_of_one_length_share_thresholds() {
        let cfg = DriftConfig {
            windows: vec![16, 64],
            ert: 1_000.0,
            stride: 8,
            simulations: 5_000,
            seed: 3,
        };
        let a = normal(400, 0.0, 1);
        let b: Vec<f64> = normal(400, 5.0, 2).iter().map(|x| x.exp()).collect();
        let ties: Vec<f64> = (0..400).map(|i| (i / 4) as f64).collect();
        let alone = |r: &[f64]| {
            CvmDetector::calibrate(r, &cfg)
                .unwrap()
                .thresholds()
                .to_vec()
        };
        assert_eq!(alone(&a), alone(&b));
        assert_ne!(alone(&a), alone(&ties));
        let all = CvmDetector::calibrate_all(&[&a, &ties, &b], &cfg).unwrap();
        assert_eq!(all[0].thresholds(), alone(&a));
        assert_eq!(all[1].thresholds(), alone(&ties));
        assert_eq!(all[2].thresholds(), alone(&b));
    }

    /// On a stream from the reference's distribution the false alarms are no more frequent
    /// than the ERT says; a shift of half a standard deviation is caught within a few windows.
    #[test]
    fn false_alarms_respect_the_ert_and_a_shift_is_caught() {
        let cfg = DriftConfig {
            windows: vec![64, 256],
            ert: 2_000.0,
            stride: 16,
            simulations: 4_000,
            seed: 7,
        };
        let reference = normal(3_000, 0.0, 1);
        let fresh = CvmDetector::calibrate(&reference, &cfg).unwrap();
        // 40,000 inlier records: expect at most ~20 false alarms at ERT 2,000 (counted as
        // separate alarms when 256 records apart).
        let mut d = fresh.clone();
        let mut alarms = 0;
        let mut last = 0u64;
        for v in normal(40_000, 0.0, 2) {
            if let Some(c) = d.push(v)
                && c.alarm
                && (alarms == 0 || c.records - last >= 256)
            {
                alarms += 1;
                last = c.records;
            }
        }
        println!("{alarms} false alarms in 40,000 inlier records (ERT 2,000)");
        assert!(alarms <= 30, "{alarms} false alarms in 40,000 records");
        // After 1,000 inliers the stream shifts by 0.5 sd.
        let mut d = fresh;
        let stream: Vec<f64> = normal(1_000, 0.0, 3)
            .into_iter()
            .chain(normal(2_000, 0.5, 4))
            .collect();
        let first = stream
            .iter()
            .filter_map(|&v| d.push(v))
            .find(|c| c.alarm && c.records > 1_000)
            .map(|c| c.records - 1_000);
        let delay = first.expect("the shift raises an alarm");
        println!("0.5 sd shift detected after {delay} records");
        assert!(delay <= 256, "detection delay {delay} records");
    }

    #[test]
    fn bad_settings_are_refused() {
        let reference = normal(100, 0.0, 1);
        let cfg = DriftConfig {
            windows: vec![64],
            ert: 1_000.0,
            stride: 8,
            simulations: 2_000,
            seed: 1,
        };
        assert!(
            CvmDetector::calibrate(&reference, &cfg)
                .unwrap_err()
                .contains("half the reference")
        );
        let few = DriftConfig {
            windows: vec![16],
            simulations: 10,
            ..cfg
        };
        assert!(
            CvmDetector::calibrate(&reference, &few)
                .unwrap_err()
                .contains("too few")
        );
    }
}

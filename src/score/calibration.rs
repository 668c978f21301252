//! Calibration: the decision threshold of a score from in-distribution validation data only
//! (no anomalies needed), at a target false-positive rate. An image is flagged when its score
//! is above the threshold or not finite.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ScoreKind;
use super::reference::ComplexityReference;

/// A calibrated threshold of one score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// Flag when `score > threshold` (or the score is not finite).
    pub threshold: f64,
    /// The false-positive rate asked for.
    pub target_fpr: f64,
    /// Fraction of the calibration images the threshold flags.
    pub expected_flag_rate: f64,
    /// 95 % Wilson interval of the flag rate on new in-distribution data.
    pub flag_rate_ci95: (f64, f64),
    /// Calibration images.
    pub n: usize,
    /// Calibration images whose score was not finite (always flagged).
    pub non_finite: usize,
    /// Where the calibration images came from.
    pub data: String,
    /// When (RFC 3339).
    pub created: String,
    /// The score's distribution on the calibration images: 1,001 quantiles (0, 0.1 %, ...,
    /// 100 %) of its finite values, the reference of the drift alarms. Empty in calibrations
    /// written before they existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantiles: Vec<f64>,
}

/// Number of quantiles a calibration stores per score.
pub const QUANTILES: usize = 1001;

/// `QUANTILES` evenly spaced quantiles (linear interpolation) of the finite `scores`; empty when
/// there are none.
pub fn quantiles(scores: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return vec![];
    }
    v.sort_by(f64::total_cmp);
    (0..QUANTILES)
        .map(|i| {
            let pos = i as f64 / (QUANTILES - 1) as f64 * (v.len() - 1) as f64;
            let (lo, frac) = (pos.floor() as usize, pos.fract());
            let hi = (lo + 1).min(v.len() - 1);
            v[lo] + frac * (v[hi] - v[lo])
        })
        .collect()
}

/// The thresholds calibrated for one pair of models, stored beside the model
/// (`<model>.calibration.json`) and named by pipelines.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Model id of the in-distribution model the thresholds belong to.
    pub in_model: String,
    /// Model id of the general model, when any calibrated score uses it.
    pub general_model: Option<String>,
    /// Threshold per score name.
    pub thresholds: BTreeMap<ScoreKind, Threshold>,
    /// Reference inliers of the conditional-complexity and combined scores, when calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ComplexityReference>,
}

impl Calibration {
    /// Reads a calibration file (and checks its complexity reference, if any).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let c: Self =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(r) = &c.reference {
            r.validate()
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(c)
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("calibration serialises");
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    /// True when the calibration was made for these models: the same in-distribution model, and
    /// the same general model unless it was calibrated without one.
    pub fn belongs_to(&self, in_model: &str, general_model: Option<&str>) -> bool {
        self.in_model == in_model
            && (self.general_model.is_none() || self.general_model.as_deref() == general_model)
    }

    /// The default calibration path of a model file.
    pub fn path_for_model(model: &Path) -> std::path::PathBuf {
        model.with_extension("calibration.json")
    }
}

/// Picks the threshold flagging at most `target_fpr` of `scores` (the in-distribution
/// calibration scores): the `floor(target_fpr * n) + 1`-th largest score, so at most
/// `floor(target_fpr * n)` scores lie strictly above it. Returns the threshold, the number of
/// scores flagged by it (above it or not finite) and the number of non-finite scores.
pub fn threshold_at_fpr(scores: &[f64], target_fpr: f64) -> (f64, usize, usize) {
    assert!(!scores.is_empty(), "calibration needs scores");
    let mut desc: Vec<f64> = scores
        .iter()
        .map(|&v| if v.is_finite() { v } else { f64::INFINITY })
        .collect();
    desc.sort_by(|a, b| b.total_cmp(a));
    let n = desc.len();
    let k = ((target_fpr.clamp(0.0, 1.0) * n as f64).floor() as usize).min(n - 1);
    let t = desc[k];
    let non_finite = scores.iter().filter(|v| !v.is_finite()).count();
    let flagged = scores.iter().filter(|&&v| !v.is_finite() || v > t).count();
    (t, flagged, non_finite)
}

/// 95 % Wilson score interval of a proportion `k / n`.
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / d;
    ((c - h).max(0.0), (c + h).min(1.0))
}

/// Calibrates one score: threshold, expected flag rate and its interval.
pub fn calibrate(scores: &[f64], target_fpr: f64, data: &str) -> Threshold {
    let (threshold, flagged, non_finite) = threshold_at_fpr(scores, target_fpr);
    Threshold {
        threshold,
        target_fpr,
        expected_flag_rate: flagged as f64 / scores.len() as f64,
        flag_rate_ci95: wilson95(flagged, scores.len()),
        n: scores.len(),
        non_finite,
        data: data.into(),
        created: crate::glow::file::now_rfc3339(),
        quantiles: quantiles(scores),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_flags_the_target_share() {
        let scores: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let (t, flagged, _) = threshold_at_fpr(&scores, 0.01);
        assert_eq!(t, 989.0);
        assert_eq!(flagged, 10);
        let c = calibrate(&scores, 0.05, "test");
        assert_eq!(c.expected_flag_rate, 0.05);
        assert_eq!(c.quantiles.len(), QUANTILES);
        assert_eq!(
            (c.quantiles[0], c.quantiles[500], c.quantiles[1000]),
            (0.0, 499.5, 999.0)
        );
        assert!(c.flag_rate_ci95.0 < 0.05 && c.flag_rate_ci95.1 > 0.05);
        // Ties never push the flag rate above the target; non-finite scores are flagged.
        let mut tied = vec![1.0; 100];
        tied[0] = f64::NAN;
        let (t, flagged, nf) = threshold_at_fpr(&tied, 0.1);
        assert_eq!((t, flagged, nf), (1.0, 1, 1));
    }

    #[test]
    fn wilson_matches_a_known_value() {
        // k=10, n=100: (0.0552, 0.1744) to 4 decimals.
        let (lo, hi) = wilson95(10, 100);
        assert!(
            (lo - 0.0552).abs() < 1e-4 && (hi - 0.1744).abs() < 1e-4,
            "{lo} {hi}"
        );
    }
}

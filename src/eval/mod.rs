//! Evaluation of scores (their thresholds live in [`crate::score::calibration`]):
//! - [`metrics`]: AUROC / AUPR / FPR at 95 % TPR with exact tie handling;
//! - [`report`]: HTML report with score histograms and ROC curves (plotters, SVG).

pub mod metrics;
pub mod report;

use serde::Serialize;

use crate::glow::bits_per_dim;
use crate::glow::config::GlowConfig;
use crate::score::calibration::Calibration;
use crate::score::{ImageScores, ScoreKind};
pub use metrics::{DetectionMetrics, detection_metrics, flagged_share, roc_curve};

/// Scores of one image set under the models.
#[derive(Debug, Clone)]
pub struct ScoredSet {
    /// Name (e.g. `fashion_mnist_test`, `mnist`).
    pub name: String,
    /// Per-image scores.
    pub scores: Vec<ImageScores>,
}

impl ScoredSet {
    /// Values of `kind` for every image.
    pub fn values(&self, kind: ScoreKind) -> Vec<f64> {
        self.scores.iter().map(|s| kind.value(s)).collect()
    }

    /// Mean bits/dim under the in-distribution model (finite values only).
    pub fn mean_bpd(&self, dims: usize) -> f64 {
        finite_mean(self.scores.iter().map(|s| bits_per_dim(s.log_p_in(), dims))).unwrap_or(0.0)
    }

    /// Mean bits per dimension of each scale's exit, `8 - lp_k / (D_k ln 2)` (finite values
    /// only), under the in-distribution model or, with `general`, the general model (empty
    /// when there is none). The total is their mix: `bpd = sum_k D_k / D * bpd_k`.
    pub fn mean_scale_bpd(&self, cfg: &GlowConfig, general: bool) -> Vec<f64> {
        let shape = cfg.shape();
        let mut out = Vec::new();
        for (k, sc) in shape.scales.iter().enumerate() {
            let bpd = self
                .scores
                .iter()
                .filter_map(|s| match general {
                    false => s.lp_in.get(k).copied(),
                    true => s.lp_gen.as_ref().and_then(|g| g.get(k).copied()),
                })
                .map(|lp| bits_per_dim(lp, sc.exit_dims()));
            match finite_mean(bpd) {
                Some(m) => out.push(m),
                None => return Vec::new(),
            }
        }
        out
    }
}

/// Mean of the finite values, `None` when there are none.
fn finite_mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Metrics of one score against one OOD set.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreResult {
    /// The score.
    pub score: ScoreKind,
    /// The OOD set.
    pub ood: String,
    /// Its metrics.
    #[serde(flatten)]
    pub metrics: DetectionMetrics,
    /// What the calibrated threshold of the score does on these sets, when the calibration
    /// has one.
    pub calibrated: Option<CalibratedRates>,
}

/// The calibrated threshold of a score (chosen on held-out training inliers, never on these
/// sets) applied to the evaluation sets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CalibratedRates {
    /// The threshold.
    pub threshold: f64,
    /// The false-positive rate it was calibrated for.
    pub target_fpr: f64,
    /// Share of the OOD set flagged (recall).
    pub recall: f64,
    /// Share of the in-distribution test set flagged (the false-positive rate met).
    pub fpr: f64,
}

/// Everything `glowwatch eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// In-distribution model id.
    pub in_model: String,
    /// General model id, if any.
    pub general_model: Option<String>,
    /// In-distribution set name and size.
    pub in_set: (String, usize),
    /// OOD set names and sizes.
    pub ood_sets: Vec<(String, usize)>,
    /// Mean bits/dim under the in-distribution model, per set (in-distribution first).
    pub mean_bpd: Vec<(String, f64)>,
    /// Mean bits/dim under the general model, per set, if any.
    pub mean_bpd_general: Vec<(String, f64)>,
    /// Mean bits/dim of each scale's exit under the in-distribution model, per set
    /// ([`ScoredSet::mean_scale_bpd`]): which scale the sets differ at.
    pub scale_bpd: Vec<(String, Vec<f64>)>,
    /// The same under the general model, if any: where the ratio's terms come from.
    pub scale_bpd_general: Vec<(String, Vec<f64>)>,
    /// One row per (score, OOD set).
    pub results: Vec<ScoreResult>,
}

impl EvalReport {
    /// Computes every metric of every score the scored sets carry (the reference scores
    /// when the sets were scored with a complexity reference), and what `calibration`'s
    /// thresholds do on them.
    pub fn compute(
        in_model: &str,
        general_model: Option<&str>,
        cfg: &GlowConfig,
        in_set: &ScoredSet,
        oods: &[ScoredSet],
        calibration: Option<&Calibration>,
    ) -> Self {
        let dims = cfg.dims();
        let reference = in_set
            .scores
            .first()
            .is_some_and(|s| s.expected_complexity.is_some());
        let kinds = ScoreKind::all(cfg.scales, general_model.is_some(), reference);
        let mut results = Vec::new();
        for &k in &kinds {
            let neg = in_set.values(k);
            let threshold = calibration.and_then(|c| c.thresholds.get(&k));
            for o in oods {
                let pos = o.values(k);
                results.push(ScoreResult {
                    score: k,
                    ood: o.name.clone(),
                    metrics: detection_metrics(&neg, &pos),
                    calibrated: threshold.map(|t| CalibratedRates {
                        threshold: t.threshold,
                        target_fpr: t.target_fpr,
                        recall: flagged_share(&pos, t.threshold),
                        fpr: flagged_share(&neg, t.threshold),
                    }),
                });
            }
        }
        let sets = std::iter::once(in_set).chain(oods.iter());
        let gen_bpd = |s: &ScoredSet| {
            finite_mean(
                s.scores
                    .iter()
                    .filter_map(|x| x.log_p_gen())
                    .map(|lp| bits_per_dim(lp, dims)),
            )
            .unwrap_or(0.0)
        };
        Self {
            in_model: in_model.into(),
            general_model: general_model.map(String::from),
            in_set: (in_set.name.clone(), in_set.scores.len()),
            ood_sets: oods
                .iter()
                .map(|o| (o.name.clone(), o.scores.len()))
                .collect(),
            mean_bpd: sets
                .clone()
                .map(|s| (s.name.clone(), s.mean_bpd(dims)))
                .collect(),
            mean_bpd_general: if general_model.is_some() {
                sets.clone().map(|s| (s.name.clone(), gen_bpd(s))).collect()
            } else {
                Vec::new()
            },
            scale_bpd: sets
                .clone()
                .map(|s| (s.name.clone(), s.mean_scale_bpd(cfg, false)))
                .collect(),
            scale_bpd_general: if general_model.is_some() {
                sets.map(|s| (s.name.clone(), s.mean_scale_bpd(cfg, true)))
                    .collect()
            } else {
                Vec::new()
            },
            results,
        }
    }

    /// The best score by AUROC against `ood` (or the first OOD set).
    pub fn best(&self, ood: Option<&str>) -> Option<&ScoreResult> {
        let ood = ood.or(self.ood_sets.first().map(|o| o.0.as_str()))?;
        self.results
            .iter()
            .filter(|r| r.ood == ood)
            .max_by(|a, b| a.metrics.auroc.total_cmp(&b.metrics.auroc))
    }

    /// A fixed-width table: one row per score; per OOD set AUROC, AUPR, FPR at 95 % TPR,
    /// TPR at 1 % FPR and the recall at the calibrated threshold (`-` without one). Below it,
    /// the false-positive rate each calibrated threshold met on the in-distribution set.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        const W: usize = 45;
        let mut s = String::new();
        let _ = write!(s, "{:<16}", "score");
        for (o, _) in &self.ood_sets {
            let _ = write!(s, " | {:^W$}", format!("vs {o}"));
        }
        s.push('\n');
        let _ = write!(s, "{:<16}", "");
        for _ in &self.ood_sets {
            let _ = write!(
                s,
                " | {:>8}{:>8}{:>8}{:>10}{:>11}",
                "AUROC", "AUPR", "FPR95", "TPR@1%", "recall@cal"
            );
        }
        s.push('\n');
        s.push_str(&"-".repeat(16 + (W + 3) * self.ood_sets.len()));
        s.push('\n');
        let mut kinds: Vec<ScoreKind> = self.results.iter().map(|r| r.score).collect();
        kinds.dedup();
        let mut met = Vec::new();
        for k in kinds {
            let _ = write!(s, "{:<16}", k.to_string());
            for (o, _) in &self.ood_sets {
                if let Some(r) = self.results.iter().find(|r| r.score == k && &r.ood == o) {
                    let m = &r.metrics;
                    let cal = r
                        .calibrated
                        .map_or("-".to_string(), |c| format!("{:.4}", c.recall));
                    let _ = write!(
                        s,
                        " | {:>8.4}{:>8.4}{:>8.4}{:>10.4}{:>11}",
                        m.auroc, m.aupr, m.fpr_at_95_tpr, m.tpr_at_1pct_fpr, cal
                    );
                    if r.calibrated.is_some() && met.last() != Some(&k) {
                        met.push(k);
                    }
                }
            }
            s.push('\n');
        }
        if !met.is_empty() {
            let _ = write!(
                s,
                "false-positive rate of the calibrated thresholds on {}:",
                self.in_set.0
            );
            for k in &met {
                if let Some(c) = self
                    .results
                    .iter()
                    .find(|r| r.score == *k)
                    .and_then(|r| r.calibrated)
                {
                    let _ = write!(s, " {k} {:.4} (target {});", c.fpr, c.target_fpr);
                }
            }
            s.push('\n');
        }
        let _ = write!(s, "mean bpd (in-distribution model):");
        for (n, b) in &self.mean_bpd {
            let _ = write!(s, " {n} {b:.3};");
        }
        if !self.mean_bpd_general.is_empty() {
            let _ = write!(s, "\nmean bpd (general model):");
            for (n, b) in &self.mean_bpd_general {
                let _ = write!(s, " {n} {b:.3};");
            }
        }
        let by_scale = |s: &mut String, what: &str, rows: &[(String, Vec<f64>)]| {
            let _ = write!(s, "\nbpd of each scale's exit, first to last ({what}):");
            for (n, v) in rows {
                let v: Vec<String> = v.iter().map(|b| format!("{b:.3}")).collect();
                let _ = write!(s, " {n} {};", v.join(" / "));
            }
        };
        by_scale(&mut s, "in-distribution model", &self.scale_bpd);
        if !self.scale_bpd_general.is_empty() {
            by_scale(&mut s, "general model", &self.scale_bpd_general);
        }
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_bpd_mixes_back_to_the_total_bpd() {
        let cfg = GlowConfig {
            scales: 3,
            ..GlowConfig::small(1)
        };
        let set = ScoredSet {
            name: "a".into(),
            scores: vec![
                ImageScores::from_lp(
                    vec![900.0, 300.0, -50.0],
                    Some(vec![700.0, 250.0, 10.0]),
                    1024,
                ),
                ImageScores::from_lp(
                    vec![500.0, 100.0, 20.0],
                    Some(vec![400.0, 120.0, 30.0]),
                    1024,
                ),
            ],
        };
        let shape = cfg.shape();
        let d: Vec<usize> = shape.scales.iter().map(|s| s.exit_dims()).collect();
        assert_eq!(d, vec![512, 256, 256]);
        let per = set.mean_scale_bpd(&cfg, false);
        // Scale 0: mean lp 700 nats over 512 dims.
        let want0 = 8.0 - 700.0 / (512.0 * std::f64::consts::LN_2);
        assert!((per[0] - want0).abs() < 1e-12, "{} vs {want0}", per[0]);
        let mixed: f64 = per
            .iter()
            .zip(&d)
            .map(|(b, &dk)| b * dk as f64)
            .sum::<f64>()
            / 1024.0;
        assert!((mixed - set.mean_bpd(1024)).abs() < 1e-12);
        let gen_ = set.mean_scale_bpd(&cfg, true);
        assert!((gen_[2] - (8.0 - 20.0 / (256.0 * std::f64::consts::LN_2))).abs() < 1e-12);
        // A set without a general model has no general breakdown.
        let none = ScoredSet {
            name: "b".into(),
            scores: vec![ImageScores::from_lp(vec![1.0, 2.0, 3.0], None, 1024)],
        };
        assert!(none.mean_scale_bpd(&cfg, true).is_empty());
    }
}

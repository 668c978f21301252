//! Detection metrics with in-distribution images as negatives and OOD images as positives;
//! higher score = more anomalous. Non-finite scores rank as the most anomalous (they are
//! mapped to +inf, never dropped). Ties are handled exactly: AUROC by mid-ranks (a tie counts
//! one half), AUPR and ROC points by grouping equal scores into one threshold.

use serde::Serialize;

use crate::score::calibration::threshold_at_fpr;

/// AUROC, AUPR and FPR at 95 % TPR of one score on one in-vs-OOD pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DetectionMetrics {
    /// Area under the ROC curve (probability that a random OOD image outscores a random
    /// in-distribution one, ties counting one half).
    pub auroc: f64,
    /// Area under the precision-recall curve (average precision, OOD = positive class).
    pub aupr: f64,
    /// False-positive rate at the first threshold reaching 95 % true-positive rate.
    pub fpr_at_95_tpr: f64,
    /// True-positive rate at 1 % false-positive rate: the share of OOD scores above the
    /// threshold that flags at most 1 % of these negatives
    /// ([`crate::score::calibration::threshold_at_fpr`]; non-finite scores count as flagged).
    pub tpr_at_1pct_fpr: f64,
    /// In-distribution (negative) scores that were not finite.
    pub non_finite_in: usize,
    /// OOD (positive) scores that were not finite.
    pub non_finite_ood: usize,
}

fn finite_or_inf(v: f64) -> f64 {
    if v.is_finite() { v } else { f64::INFINITY }
}

/// Scores sorted descending, each with its label (true = OOD).
fn ranked(neg: &[f64], pos: &[f64]) -> Vec<(f64, bool)> {
    let mut all: Vec<(f64, bool)> = neg
        .iter()
        .map(|&v| (finite_or_inf(v), false))
        .chain(pos.iter().map(|&v| (finite_or_inf(v), true)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    all
}

/// ROC curve points (FPR, TPR), one per distinct score from the highest down, starting at
/// (0, 0) and ending at (1, 1).
pub fn roc_curve(neg: &[f64], pos: &[f64]) -> Vec<(f64, f64)> {
    let all = ranked(neg, pos);
    let (np, nn) = (pos.len().max(1) as f64, neg.len().max(1) as f64);
    let mut pts = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < all.len() {
        let v = all[i].0;
        while i < all.len() && all[i].0 == v {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        pts.push((fp as f64 / nn, tp as f64 / np));
    }
    pts
}

/// Share of `scores` a threshold flags (above it, or not finite).
pub fn flagged_share(scores: &[f64], threshold: f64) -> f64 {
    let n = scores
        .iter()
        .filter(|&&v| !v.is_finite() || v > threshold)
        .count();
    n as f64 / scores.len().max(1) as f64
}

/// Computes the metrics; `neg` are in-distribution scores, `pos` OOD scores. Both must be
/// non-empty.
pub fn detection_metrics(neg: &[f64], pos: &[f64]) -> DetectionMetrics {
    assert!(
        !neg.is_empty() && !pos.is_empty(),
        "metrics need both classes"
    );
    let all = ranked(neg, pos);
    let n = all.len();
    // Mid-ranks in ascending order: rank 1 = lowest score.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j < n && all[j].0 == all[i].0 {
            j += 1;
        }
        // Descending positions i..j hold ascending ranks n-j+1 ..= n-i.
        let mid = ((n - j + 1) + (n - i)) as f64 / 2.0;
        rank_sum_pos += mid * all[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    let auroc = (rank_sum_pos - np * (np + 1.0) / 2.0) / (np * nn);

    // Average precision over tie groups, and FPR at the first group reaching 95 % TPR.
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut ap, mut prev_recall) = (0.0, 0.0);
    let mut fpr95 = 1.0;
    let mut found = false;
    let mut i = 0;
    while i < n {
        let v = all[i].0;
        while i < n && all[i].0 == v {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let recall = tp as f64 / np;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
        if !found && recall >= 0.95 - 1e-12 {
            fpr95 = fp as f64 / nn;
            found = true;
        }
    }
    DetectionMetrics {
        auroc,
        aupr: ap,
        fpr_at_95_tpr: fpr95,
        tpr_at_1pct_fpr: flagged_share(pos, threshold_at_fpr(neg, 0.01).0),
        non_finite_in: neg.iter().filter(|v| !v.is_finite()).count(),
        non_finite_ood: pos.iter().filter(|v| !v.is_finite()).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example_with_ties() {
        // neg: 0.1, 0.4, 0.4, 0.8 ; pos: 0.4, 0.9, 0.35
        // Pairs (pos > neg = 1, tie = 1/2):
        //  0.4 : > 0.1, tie 0.4, tie 0.4, < 0.8  -> 1 + 0.5 + 0.5 = 2
        //  0.9 : beats all four                  -> 4
        //  0.35: > 0.1 only                      -> 1
        // AUROC = 7 / 12.
        let neg = [0.1, 0.4, 0.4, 0.8];
        let pos = [0.4, 0.9, 0.35];
        let m = detection_metrics(&neg, &pos);
        assert!((m.auroc - 7.0 / 12.0).abs() < 1e-12, "{}", m.auroc);
        // Descending groups: 0.9 (1 pos) -> P=1, R=1/3; 0.8 (1 neg) -> R unchanged;
        // 0.4 (1 pos, 2 neg) -> P=2/5, R=2/3; 0.35 (1 pos) -> P=3/6, R=1; 0.1 (neg).
        // AP = 1/3*1 + 1/3*2/5 + 1/3*1/2 = (1 + 0.4 + 0.5)/3.
        assert!((m.aupr - 1.9 / 3.0).abs() < 1e-12, "{}", m.aupr);
        // 95 % TPR is first reached at 0.35, where 3 of 4 negatives score higher or equal.
        assert!((m.fpr_at_95_tpr - 0.75).abs() < 1e-12);
        // 1 % of 4 negatives is 0 images: the threshold is the top negative, 0.8; only 0.9
        // is above it.
        assert!((m.tpr_at_1pct_fpr - 1.0 / 3.0).abs() < 1e-12);
        let roc = roc_curve(&neg, &pos);
        assert_eq!(
            roc,
            vec![
                (0.0, 0.0),
                (0.0, 1.0 / 3.0),
                (0.25, 1.0 / 3.0),
                (0.75, 2.0 / 3.0),
                (0.75, 1.0),
                (1.0, 1.0)
            ]
        );
    }

    #[test]
    fn perfect_inverted_and_all_tied() {
        let m = detection_metrics(&[0.0, 1.0], &[2.0, 3.0]);
        assert_eq!((m.auroc, m.aupr, m.fpr_at_95_tpr), (1.0, 1.0, 0.0));
        assert_eq!(m.tpr_at_1pct_fpr, 1.0);
        let m = detection_metrics(&[2.0, 3.0], &[0.0, 1.0]);
        assert_eq!((m.auroc, m.fpr_at_95_tpr), (0.0, 1.0));
        let m = detection_metrics(&[5.0; 3], &[5.0; 2]);
        assert_eq!(m.auroc, 0.5);
        assert!((m.aupr - 0.4).abs() < 1e-12);
    }

    #[test]
    fn tpr_at_1pct_fpr_uses_the_hundredth_highest_negative() {
        // 200 negatives 0..199: at most 2 may lie above the threshold, so it is 197.
        let neg: Vec<f64> = (0..200).map(f64::from).collect();
        let pos = [196.0, 197.0, 197.5, 500.0, f64::NAN];
        let m = detection_metrics(&neg, &pos);
        assert!((m.tpr_at_1pct_fpr - 3.0 / 5.0).abs() < 1e-12);
        assert_eq!(flagged_share(&pos, 197.0), 0.6);
    }

    #[test]
    fn non_finite_scores_rank_most_anomalous_and_are_counted() {
        let m = detection_metrics(&[0.0, 1.0, f64::NAN], &[f64::INFINITY, 0.5]);
        // inf/NaN tie at the top: pos inf vs neg NaN = 1/2; pos inf beats 0, 1; pos 0.5
        // beats 0. Total (0.5 + 2 + 1) / 6.
        assert!((m.auroc - 3.5 / 6.0).abs() < 1e-12);
        assert_eq!((m.non_finite_in, m.non_finite_ood), (1, 1));
    }
}

//! The complexity reference: what input complexity to expect of an in-distribution image that
//! *looks like* a given image at a coarse scale, and the scale of the combined score's parts.
//!
//! Input complexity `S = -log2 p_in(x) - L(x)` (Serra et al., ICLR 2020) fixes the average
//! bias of likelihoods towards simple images, but not its spread: a small model codes some
//! in-distribution kinds far worse than their compressed size suggests (Fashion-MNIST sandals,
//! thin straps on black: 192 of the 200 highest S of the test set), and those set the 1 %-FPR
//! threshold. Conditioning on the coarse layout (where the ink is, [`super::complexity::layout`])
//! removes that spread: the **conditional complexity** is
//!
//! `S_cond(x) = S(x) - mean{ S(r) : r among the k reference inliers nearest to x in layout }`
//!
//! (k-nearest-neighbour regression of S on the layout, squared Euclidean distance on the
//! 8-bit block means, ties to the earlier row). Reference images are in-distribution rows the
//! calibration does not use; nothing about outliers is fitted. An image whose layout is
//! common among inliers but whose fine structure the model codes badly for that layout stands
//! out; sandals no longer do, since sandal-like layouts come with sandal-like S.
//!
//! The **combined** score flags what either of two complementary scores finds extreme:
//! `combined = max_j (v_j - median_j) / (q99_j - median_j)` over `v = (S_cond, llr)`, with the
//! median and 99th percentile of each part over the reference rows (S_cond leave-one-out, so
//! a row is never its own neighbour). S_cond catches images simpler or stranger than their
//! layout allows (digits, glyphs); the likelihood ratio catches images the general model
//! explains better (photos, icons). Each part is scaled by its own inlier tail, so neither
//! dominates by units.

use serde::{Deserialize, Serialize};

/// Median and (99th percentile - median) of one score over the reference rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailScale {
    /// Median over the reference rows.
    pub median: f64,
    /// 99th percentile minus the median (a positive spread; 1.0 where it would be 0).
    pub scale: f64,
}

impl TailScale {
    /// From the finite values of `v` (linear interpolation between order statistics).
    pub fn fit(v: &[f64]) -> Self {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return Self {
                median: 0.0,
                scale: 1.0,
            };
        }
        let q = |p: f64| {
            let pos = p * (s.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
        };
        let median = q(0.5);
        let scale = q(0.99) - median;
        Self {
            median,
            scale: if scale > 0.0 { scale } else { 1.0 },
        }
    }

    /// `(v - median) / scale`.
    pub fn apply(&self, v: f64) -> f64 {
        (v - self.median) / self.scale
    }
}

/// Reference inliers for the conditional complexity and the combined score; stored in the
/// calibration file of a pair of models (`glowwatch calibrate` builds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComplexityReference {
    /// Layout grid: images are averaged over `grid x grid` blocks.
    pub grid: usize,
    /// Neighbours averaged.
    pub k: usize,
    /// Values per layout (`channels * grid * grid`).
    pub layout_dims: usize,
    /// Layouts of the reference rows, row-major `n x layout_dims`, base64 in the file.
    #[serde(with = "base64_bytes")]
    pub layouts: Vec<u8>,
    /// S (zlib) of each reference row, bits.
    pub complexity: Vec<f64>,
    /// Median and tail of S_cond over the reference rows (leave-one-out).
    pub complexity_cond: TailScale,
    /// Median and tail of the likelihood ratio over the reference rows (with a general model).
    pub llr: Option<TailScale>,
    /// Where the reference rows came from.
    pub data: String,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Default layout grid (8 x 8 blocks).
pub const DEFAULT_GRID: usize = 8;
/// Default number of neighbours.
pub const DEFAULT_K: usize = 20;

impl ComplexityReference {
    /// Builds the reference from `n` rows: their layouts (`n * layout_dims` bytes), their S
    /// (zlib, bits) and, with a general model, their likelihood ratios (nats).
    ///
    /// Errors: mismatched lengths, fewer than `k + 1` rows, or `k = 0`.
    pub fn build(
        grid: usize,
        k: usize,
        layouts: Vec<u8>,
        complexity: Vec<f64>,
        llr: Option<&[f64]>,
        data: &str,
    ) -> Result<Self, String> {
        let n = complexity.len();
        if k == 0 || n < k + 1 {
            return Err(format!(
                "complexity reference: {n} rows for k = {k} neighbours (need at least k + 1)"
            ));
        }
        if !layouts.len().is_multiple_of(n) || llr.is_some_and(|l| l.len() != n) {
            return Err(format!(
                "complexity reference: {} layout bytes / {} llr values for {n} rows",
                layouts.len(),
                llr.map_or(0, |l| l.len())
            ));
        }
        let mut r = Self {
            grid,
            k,
            layout_dims: layouts.len() / n,
            layouts,
            complexity,
            complexity_cond: TailScale {
                median: 0.0,
                scale: 1.0,
            },
            llr: None,
            data: data.into(),
        };
        use rayon::prelude::*;
        let cond: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|i| r.complexity[i] - r.expected(r.row(i), Some(i)))
            .collect();
        r.complexity_cond = TailScale::fit(&cond);
        r.llr = llr.map(TailScale::fit);
        Ok(r)
    }

    /// Number of reference rows.
    pub fn len(&self) -> usize {
        self.complexity.len()
    }

    /// True when there are no rows (never for a built or loaded reference).
    pub fn is_empty(&self) -> bool {
        self.complexity.is_empty()
    }

    fn row(&self, i: usize) -> &[u8] {
        &self.layouts[i * self.layout_dims..(i + 1) * self.layout_dims]
    }

    /// Checks the stored arrays agree with each other (a loaded file).
    pub fn validate(&self) -> Result<(), String> {
        let n = self.len();
        if self.layout_dims == 0 || self.layouts.len() != n * self.layout_dims {
            return Err(format!(
                "complexity reference: {} layout bytes for {n} rows of {} values",
                self.layouts.len(),
                self.layout_dims
            ));
        }
        if self.k == 0 || n < self.k + 1 || self.grid == 0 {
            return Err(format!(
                "complexity reference: {n} rows, k = {}, grid = {}",
                self.k, self.grid
            ));
        }
        Ok(())
    }

    /// E_ref[S | layout]: mean S of the `k` reference rows nearest to `layout` (skipping row
    /// `skip`, for leave-one-out), bits.
    fn expected(&self, layout: &[u8], skip: Option<usize>) -> f64 {
        // The k best (distance, row) so far, sorted ascending; strict < keeps earlier rows on
        // ties, so the result does not depend on thread scheduling.
        let mut best: Vec<(u32, usize)> = Vec::with_capacity(self.k + 1);
        for (i, row) in self.layouts.chunks_exact(self.layout_dims).enumerate() {
            if skip == Some(i) {
                continue;
            }
            // u8 differences squared fit u16; summed in u32 (64 values: < 2^22).
            let d: u32 = row
                .iter()
                .zip(layout)
                .map(|(&a, &b)| {
                    let e = a.abs_diff(b) as u32;
                    e * e
                })
                .sum();
            if best.len() < self.k || d < best[best.len() - 1].0 {
                let at = best.partition_point(|&(bd, _)| bd <= d);
                best.insert(at, (d, i));
                best.truncate(self.k);
            }
        }
        best.iter().map(|&(_, i)| self.complexity[i]).sum::<f64>() / best.len() as f64
    }

    /// E_ref[S | layout] of an image's layout (bits).
    ///
    /// Errors: a layout of another length than the reference's (another channel count or grid).
    pub fn expected_complexity(&self, layout: &[u8]) -> Result<f64, String> {
        if layout.len() != self.layout_dims {
            return Err(format!(
                "complexity reference holds layouts of {} values, the image has {}",
                self.layout_dims,
                layout.len()
            ));
        }
        Ok(self.expected(layout, None))
    }

    /// The combined score of an image from its S_cond and (when the reference has a general
    /// model's scale) its likelihood ratio; `None` without one.
    pub fn combined(&self, complexity_cond: f64, llr: Option<f64>) -> Option<f64> {
        let (l, scale) = (llr?, self.llr?);
        let (a, b) = (self.complexity_cond.apply(complexity_cond), scale.apply(l));
        // A non-finite part makes the image as anomalous as it gets (metrics rank NaN last).
        Some(if a.is_finite() && b.is_finite() {
            a.max(b)
        } else {
            f64::INFINITY
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five 2-value layouts on a line with known S; k = 2.
    fn small() -> ComplexityReference {
        let layouts = vec![0, 0, 10, 0, 20, 0, 30, 0, 100, 0];
        let s = vec![1.0, 3.0, 5.0, 7.0, 100.0];
        ComplexityReference::build(8, 2, layouts, s, Some(&[0.0, 1.0, 2.0, 3.0, 4.0]), "t").unwrap()
    }

    #[test]
    fn expected_complexity_is_the_mean_s_of_the_nearest_layouts() {
        let r = small();
        // Query (12, 0): nearest rows 1 (d = 4) and 2 (d = 64): (3 + 5) / 2.
        assert_eq!(r.expected_complexity(&[12, 0]).unwrap(), 4.0);
        // Query (90, 0): row 4 (d = 100) and row 3 (d = 3600): (100 + 7) / 2.
        assert_eq!(r.expected_complexity(&[90, 0]).unwrap(), 53.5);
        // Equidistant rows 0 and 2 from (10, 0) after row 1 itself: ties keep the earlier row.
        assert_eq!(r.expected_complexity(&[10, 0]).unwrap(), (3.0 + 1.0) / 2.0);
        assert!(r.expected_complexity(&[1, 2, 3]).is_err());
    }

    #[test]
    fn leave_one_out_fits_the_tail_scale_of_s_cond() {
        let r = small();
        // Leave-one-out S_cond: row 0: 1 - (3 + 5)/2 = -3; row 1: 3 - (1 + 5)/2 = 0;
        // row 2: 5 - (3 + 7)/2 = 0; row 3: 7 - (5 + 3)/2 = 3; row 4: 100 - (7 + 5)/2 = 94.
        // Sorted -3, 0, 0, 3, 94: median 0, q99 at position 3.96 = 3 + 0.96 * 91.
        assert_eq!(r.complexity_cond.median, 0.0);
        assert!((r.complexity_cond.scale - (3.0 + 0.96 * 91.0)).abs() < 1e-9);
        let l = r.llr.unwrap();
        assert_eq!(l.median, 2.0);
        assert!((l.scale - (3.96 - 2.0)).abs() < 1e-9);
        // combined = max of the two scaled parts.
        let c = r.combined(90.36, Some(2.0)).unwrap();
        assert!((c - 1.0).abs() < 1e-9, "{c}");
        assert_eq!(r.combined(0.0, Some(2.0 + 2.0 * 1.96)).unwrap(), 2.0);
        assert_eq!(r.combined(f64::NAN, Some(0.0)).unwrap(), f64::INFINITY);
        assert_eq!(r.combined(0.0, None), None);
    }

    #[test]
    fn a_reference_survives_its_file_form_and_refuses_bad_shapes() {
        let r = small();
        let text = serde_json::to_string(&r).unwrap();
        let back: ComplexityReference = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        back.validate().unwrap();
        let mut bad = r.clone();
        bad.layouts.pop();
        assert!(bad.validate().is_err());
        assert!(ComplexityReference::build(8, 5, vec![0; 10], vec![0.0; 5], None, "t").is_err());
    }
}

//! The anomaly scores of the product and what one image carries to compute them.

use std::fmt;
use std::str::FromStr;

use super::complexity::Compressor;

/// An anomaly score (higher = more anomalous). Formulas and sources in [`crate::score`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScoreKind {
    /// `-log p_in(x)` (nats).
    Nll,
    /// `-lp_k,in(x)`: one scale's contribution alone (nats).
    Scale(usize),
    /// `-lp_{L-1},in(x)`: the final scale (the method's second fix).
    LastScale,
    /// `log p_gen(x) - log p_in(x)`: the likelihood ratio (the method's first fix; nats).
    Llr,
    /// `lp_k,gen(x) - lp_k,in(x)` (nats).
    LlrScale(usize),
    /// Input complexity `S = -log2 p_in(x) - L(x)` with compressor L (bits; Serra et al.).
    Complexity(Compressor),
    /// Conditional complexity `S_zlib(x) - E_ref[S_zlib | layout(x)]` (bits;
    /// [`super::reference`]). Needs a complexity reference.
    ComplexityCond,
    /// `max` of S_cond and llr, each scaled by its reference tail ([`super::reference`]).
    /// Needs a complexity reference and a general model.
    Combined,
}

impl ScoreKind {
    /// True when the score needs the general model.
    pub fn needs_general(self) -> bool {
        matches!(self, Self::Llr | Self::LlrScale(_) | Self::Combined)
    }

    /// True when the score needs a complexity reference (from a calibration file).
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::ComplexityCond | Self::Combined)
    }

    /// The compressor the score needs computed, if any.
    pub fn compressor(self) -> Option<Compressor> {
        match self {
            Self::Complexity(c) => Some(c),
            Self::ComplexityCond | Self::Combined => Some(Compressor::Zlib),
            _ => None,
        }
    }

    /// Every score available for `scales` scales, with or without a general model and a
    /// complexity reference.
    pub fn all(scales: usize, general: bool, reference: bool) -> Vec<ScoreKind> {
        let mut v = vec![Self::Nll];
        v.extend((0..scales - 1).map(Self::Scale));
        v.push(Self::LastScale);
        if general {
            v.push(Self::Llr);
            v.extend((0..scales).map(Self::LlrScale));
        }
        v.extend(Compressor::ALL.map(Self::Complexity));
        if reference {
            v.push(Self::ComplexityCond);
            if general {
                v.push(Self::Combined);
            }
        }
        v
    }

    /// The score of one image; NaN where an input it needs is missing (no general model, no
    /// reference, compressor not computed).
    pub fn value(self, s: &ImageScores) -> f64 {
        let l = s.lp_in.len();
        let gen_ = |k: usize| s.lp_gen.as_ref().map(|g| g[k]).unwrap_or(f64::NAN);
        match self {
            Self::Nll => -s.log_p_in(),
            Self::Scale(k) => -s.lp_in.get(k).copied().unwrap_or(f64::NAN),
            Self::LastScale => -s.lp_in[l - 1],
            Self::Llr => s.log_p_gen().unwrap_or(f64::NAN) - s.log_p_in(),
            Self::LlrScale(k) => gen_(k) - s.lp_in.get(k).copied().unwrap_or(f64::NAN),
            Self::Complexity(c) => s.complexity(c),
            Self::ComplexityCond => {
                s.complexity(Compressor::Zlib) - s.expected_complexity.unwrap_or(f64::NAN)
            }
            Self::Combined => s.combined.unwrap_or(f64::NAN),
        }
    }
}

impl fmt::Display for ScoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nll => write!(f, "nll"),
            Self::Scale(k) => write!(f, "scale_{k}"),
            Self::LastScale => write!(f, "last_scale"),
            Self::Llr => write!(f, "llr"),
            Self::LlrScale(k) => write!(f, "llr_scale_{k}"),
            Self::Complexity(Compressor::Zlib) => write!(f, "complexity"),
            Self::Complexity(c) => write!(f, "complexity_{c}"),
            Self::ComplexityCond => write!(f, "complexity_cond"),
            Self::Combined => write!(f, "combined"),
        }
    }
}

impl FromStr for ScoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |p: &str| s.strip_prefix(p).and_then(|k| k.parse::<usize>().ok());
        Ok(match s {
            "nll" => Self::Nll,
            "last_scale" => Self::LastScale,
            "llr" => Self::Llr,
            "complexity" => Self::Complexity(Compressor::Zlib),
            "complexity_cond" => Self::ComplexityCond,
            "combined" => Self::Combined,
            _ => {
                if let Some(k) = num("llr_scale_") {
                    Self::LlrScale(k)
                } else if let Some(k) = num("scale_") {
                    Self::Scale(k)
                } else if let Some(c) = s
                    .strip_prefix("complexity_")
                    .and_then(Compressor::from_name)
                    .filter(|&c| c != Compressor::Zlib)
                {
                    Self::Complexity(c)
                } else {
                    return Err(format!(
                        "unknown score `{s}` (expected nll, scale_K, last_scale, llr, llr_scale_K, \
                         complexity, complexity_zstd, complexity_lzma, complexity_png, \
                         complexity_webp, complexity_cond or combined)"
                    ));
                }
            }
        })
    }
}

impl serde::Serialize for ScoreKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ScoreKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What one image's scores are computed from: per-scale log-likelihoods under both models,
/// the compressed sizes of its model-input pixels, and the reference terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// lp_k under the in-distribution model (nats).
    pub lp_in: Vec<f64>,
    /// lp_k under the general model, when configured.
    pub lp_gen: Option<Vec<f64>>,
    /// D = C * S * S, the dimensions of the model input.
    pub dims: usize,
    /// L_c(x) in bits per compressor, indexed by [`Compressor::index`]; NaN where not
    /// computed.
    pub input_bits: [f64; Compressor::COUNT],
    /// E_ref[S_zlib | layout(x)] in bits, with a complexity reference.
    pub expected_complexity: Option<f64>,
    /// The combined score, with a complexity reference and a general model.
    pub combined: Option<f64>,
}

impl ImageScores {
    /// Scores from log-likelihoods alone (no compressed sizes, no reference terms).
    pub fn from_lp(lp_in: Vec<f64>, lp_gen: Option<Vec<f64>>, dims: usize) -> Self {
        Self {
            lp_in,
            lp_gen,
            dims,
            input_bits: [f64::NAN; Compressor::COUNT],
            expected_complexity: None,
            combined: None,
        }
    }

    /// log p_in(x).
    pub fn log_p_in(&self) -> f64 {
        self.lp_in.iter().sum()
    }

    /// log p_gen(x).
    pub fn log_p_gen(&self) -> Option<f64> {
        self.lp_gen.as_ref().map(|g| g.iter().sum())
    }

    /// `-log2 P_in(x)` of the 8-bit image in bits: `-log p_in(x) / ln 2 + 8 D` (the density is
    /// over bins of width 1/256 per dimension), i.e. bits/dim times D.
    pub fn nll_bits(&self) -> f64 {
        -self.log_p_in() / std::f64::consts::LN_2 + 8.0 * self.dims as f64
    }

    /// Input complexity S = nll_bits - L_c(x) (bits); NaN when L_c was not computed.
    pub fn complexity(&self, c: Compressor) -> f64 {
        self.nll_bits() - self.input_bits[c.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_names_round_trip_and_values_follow_the_method() {
        for k in ScoreKind::all(3, true, true) {
            assert_eq!(k.to_string().parse::<ScoreKind>().unwrap(), k);
        }
        assert!("llr_scale_x".parse::<ScoreKind>().is_err());
        assert!("complexity_zlib".parse::<ScoreKind>().is_err());
        assert!("complexity_gzip".parse::<ScoreKind>().is_err());
        let s = ImageScores::from_lp(vec![-10.0, -5.0, -2.0], Some(vec![-9.0, -7.0, -1.0]), 4);
        assert_eq!(ScoreKind::Nll.value(&s), 17.0);
        assert_eq!(ScoreKind::LastScale.value(&s), 2.0);
        assert_eq!(ScoreKind::Scale(0).value(&s), 10.0);
        assert_eq!(ScoreKind::Llr.value(&s), -17.0 + 17.0);
        assert_eq!(ScoreKind::LlrScale(1).value(&s), -2.0);
        let no_gen = ImageScores {
            lp_gen: None,
            ..s.clone()
        };
        assert!(ScoreKind::Llr.value(&no_gen).is_nan());
        assert!(ScoreKind::Complexity(Compressor::Zlib).value(&s).is_nan());
        assert!(ScoreKind::ComplexityCond.value(&s).is_nan());
    }

    #[test]
    fn complexity_is_image_bits_minus_compressed_bits() {
        // log p = -(4 ln 2) nats over D = 4 dims: 4 bits + 8 * 4 = 36 bits for the 8-bit image.
        let ln2 = std::f64::consts::LN_2;
        let mut s = ImageScores::from_lp(vec![-3.0 * ln2, -ln2], None, 4);
        assert!((s.nll_bits() - 36.0).abs() < 1e-12);
        s.input_bits[Compressor::Zlib.index()] = 30.0;
        s.input_bits[Compressor::Png.index()] = 40.0;
        let z = ScoreKind::Complexity(Compressor::Zlib).value(&s);
        assert!((z - 6.0).abs() < 1e-12);
        let p = ScoreKind::Complexity(Compressor::Png).value(&s);
        assert!((p + 4.0).abs() < 1e-12);
        // Conditional: S minus the reference's expectation for the layout.
        s.expected_complexity = Some(2.5);
        assert!((ScoreKind::ComplexityCond.value(&s) - 3.5).abs() < 1e-12);
        s.combined = Some(0.25);
        assert_eq!(ScoreKind::Combined.value(&s), 0.25);
        assert_eq!(
            ScoreKind::ComplexityCond.compressor(),
            Some(Compressor::Zlib)
        );
        assert!(ScoreKind::Combined.needs_general() && ScoreKind::Combined.needs_reference());
    }
}

//! Score stage: decoded pixels -> per-scale log-likelihoods under the in-distribution model
//! and, when configured, the general model; and the anomaly scores of the method built from
//! them (higher = more anomalous; method.md, "Per-scale log-likelihood").

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;

use candle_core::Device;

use crate::bench::Precision;

use super::flag::{Flag, Flagger};
use crate::glow::config::GlowConfig;
use crate::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use crate::glow::{GlowError, GlowModel, GlowScorer};

/// An anomaly score of the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScoreKind {
    /// `-log p_in(x)`.
    Nll,
    /// `-lp_k,in(x)`: one scale's contribution alone.
    Scale(usize),
    /// `-lp_{L-1},in(x)`: the final scale (the method's second fix).
    LastScale,
    /// `log p_gen(x) - log p_in(x)`: the likelihood ratio (the method's first fix).
    Llr,
    /// `lp_k,gen(x) - lp_k,in(x)`.
    LlrScale(usize),
}

impl ScoreKind {
    /// True when the score needs the general model.
    pub fn needs_general(self) -> bool {
        matches!(self, Self::Llr | Self::LlrScale(_))
    }

    /// Every score available for `scales` scales, with or without a general model.
    pub fn all(scales: usize, general: bool) -> Vec<ScoreKind> {
        let mut v = vec![Self::Nll];
        v.extend((0..scales - 1).map(Self::Scale));
        v.push(Self::LastScale);
        if general {
            v.push(Self::Llr);
            v.extend((0..scales).map(Self::LlrScale));
        }
        v
    }

    /// The score of one image.
    pub fn value(self, s: &ImageScores) -> f64 {
        let l = s.lp_in.len();
        let gen_ = |k: usize| s.lp_gen.as_ref().map(|g| g[k]).unwrap_or(f64::NAN);
        match self {
            Self::Nll => -s.log_p_in(),
            Self::Scale(k) => -s.lp_in.get(k).copied().unwrap_or(f64::NAN),
            Self::LastScale => -s.lp_in[l - 1],
            Self::Llr => s.log_p_gen().unwrap_or(f64::NAN) - s.log_p_in(),
            Self::LlrScale(k) => gen_(k) - s.lp_in.get(k).copied().unwrap_or(f64::NAN),
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
            _ => {
                if let Some(k) = num("llr_scale_") {
                    Self::LlrScale(k)
                } else if let Some(k) = num("scale_") {
                    Self::Scale(k)
                } else {
                    return Err(format!(
                        "unknown score `{s}` (expected nll, scale_K, last_scale, llr or llr_scale_K)"
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

/// Per-scale log-likelihoods of one image under both models.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// lp_k under the in-distribution model (nats).
    pub lp_in: Vec<f64>,
    /// lp_k under the general model, when configured.
    pub lp_gen: Option<Vec<f64>>,
}

impl ImageScores {
    /// log p_in(x).
    pub fn log_p_in(&self) -> f64 {
        self.lp_in.iter().sum()
    }

    /// log p_gen(x).
    pub fn log_p_gen(&self) -> Option<f64> {
        self.lp_gen.as_ref().map(|g| g.iter().sum())
    }
}

/// The in-distribution model and optionally the general model, ready to score.
pub struct ModelScorer {
    config: GlowConfig,
    in_scorer: GlowScorer,
    in_id: String,
    version: Option<String>,
    general: Option<(GlowScorer, String)>,
    device: Device,
    batch: usize,
}

impl ModelScorer {
    /// Builds fused scorers for the models on `device` in `precision` (see
    /// [`Precision`]). Both models must take the same input (channels, size, preprocessing).
    pub fn new(
        in_model: &GlowModel,
        general: Option<&GlowModel>,
        device: &Device,
        precision: Precision,
        batch: usize,
    ) -> Result<Self, GlowError> {
        precision.apply();
        let (dtype, state) = precision.dtypes();
        let cfg = in_model.config().clone();
        if let Some(g) = general {
            let gc = g.config();
            if (gc.in_channels, gc.image_size, &gc.preprocess)
                != (cfg.in_channels, cfg.image_size, &cfg.preprocess)
            {
                return Err(GlowError::Input(format!(
                    "the general model takes {}x{}x{} ({:?}), the in-distribution model {}x{}x{} ({:?})",
                    gc.in_channels,
                    gc.image_size,
                    gc.image_size,
                    gc.preprocess,
                    cfg.in_channels,
                    cfg.image_size,
                    cfg.image_size,
                    cfg.preprocess
                )));
            }
        }
        Ok(Self {
            in_scorer: in_model.scorer_with_state(device, dtype, state)?,
            in_id: in_model.model_id()?,
            version: None,
            general: match general {
                Some(g) => Some((g.scorer_with_state(device, dtype, state)?, g.model_id()?)),
                None => None,
            },
            config: cfg,
            device: device.clone(),
            batch: batch.max(1),
        })
    }

    /// Loads the model files (and the general model's) on `device` and builds their scorers.
    pub fn load(
        model: &std::path::Path,
        general: Option<&std::path::Path>,
        device: crate::device::DeviceSpec,
        precision: Precision,
        batch: usize,
    ) -> Result<Self, GlowError> {
        let dev = device.open().map_err(GlowError::Input)?;
        let m = GlowModel::load(model, &dev)?;
        let g = general.map(|p| GlowModel::load(p, &dev)).transpose()?;
        Self::new(&m, g.as_ref(), &dev, precision, batch)
    }

    /// The input configuration (channels, size, preprocessing) both models share.
    pub fn config(&self) -> &GlowConfig {
        &self.config
    }

    /// Model id of the in-distribution model.
    pub fn in_model_id(&self) -> &str {
        &self.in_id
    }

    /// The registry version of the in-distribution model, when it came from a registry.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Names the registry version of the in-distribution model (written to `model_version`).
    pub fn set_version(&mut self, version: Option<String>) {
        self.version = version;
    }

    /// Model id of the general model, if any.
    pub fn general_model_id(&self) -> Option<&str> {
        self.general.as_ref().map(|g| g.1.as_str())
    }

    /// Number of scales L.
    pub fn scales(&self) -> usize {
        self.config.scales
    }

    /// Scores concatenated (C, S, S) 8-bit images (bin-centre dequantisation), in batches.
    pub fn score_pixels(&self, pixels: &[u8]) -> Result<Vec<ImageScores>, GlowError> {
        let per = self.config.dims();
        let mut out = Vec::with_capacity(pixels.len() / per.max(1));
        for chunk in pixels.chunks(self.batch * per) {
            let x = pixels_to_tensor(chunk, &self.config, BIN_CENTRE, &self.device)?;
            let a = self.in_scorer.score(&x)?;
            let g = match &self.general {
                Some((s, _)) => Some(s.score(&x)?),
                None => None,
            };
            for (i, lp) in a.per_scale.into_iter().enumerate() {
                out.push(ImageScores {
                    lp_in: lp,
                    lp_gen: g.as_ref().map(|g| g.per_scale[i].clone()),
                });
            }
        }
        Ok(out)
    }
}

/// Appends the score and flag columns ([`crate::pipeline::schema::score_fields`]) to the
/// decodable input rows; `schema` is [`crate::pipeline::schema::scored_schema`] of the input,
/// computed once per run. Returns the scored batch and each row's flag.
pub fn scored_batch(
    schema: &arrow::datatypes::SchemaRef,
    rows: &RecordBatch,
    scores: &[ImageScores],
    scorer: &ModelScorer,
    flagger: &Flagger,
    at: std::time::SystemTime,
) -> Result<(RecordBatch, Vec<Flag>), crate::pipeline::PipelineError> {
    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, StringArray, TimestampMicrosecondArray,
    };
    let n = rows.num_rows();
    if scores.len() != n {
        return Err(crate::pipeline::PipelineError::Stage(format!(
            "score: {} scores for {n} rows",
            scores.len()
        )));
    }
    let l = scorer.scales();
    let dims = scorer.config().dims();
    let f64s = |f: &dyn Fn(&ImageScores) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(scores.iter().map(f)))
    };
    let opt = |f: &dyn Fn(&ImageScores) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(scores.iter().map(f)))
    };
    let mut cols: Vec<ArrayRef> = rows.columns().to_vec();
    cols.push(f64s(&|s| s.log_p_in()));
    cols.push(f64s(&|s| crate::glow::bits_per_dim(s.log_p_in(), dims)));
    for k in 0..l {
        cols.push(f64s(&|s| s.lp_in[k]));
    }
    cols.push(opt(&|s| s.log_p_gen()));
    for k in 0..l {
        cols.push(opt(&|s| s.lp_gen.as_ref().map(|g| g[k])));
    }
    cols.push(opt(&|s| s.log_p_gen().map(|g| g - s.log_p_in())));
    for k in 0..l {
        cols.push(opt(&|s| s.lp_gen.as_ref().map(|g| g[k] - s.lp_in[k])));
    }
    let flags: Vec<Flag> = scores.iter().map(|s| flagger.flag(s)).collect();
    let name = flagger.score.to_string();
    cols.push(Arc::new(StringArray::from(vec![name.as_str(); n])));
    cols.push(Arc::new(Float64Array::from_iter_values(
        flags.iter().map(|f| f.score),
    )));
    cols.push(Arc::new(Float64Array::from(vec![flagger.threshold; n])));
    cols.push(Arc::new(BooleanArray::from(
        flags.iter().map(|f| f.is_ood).collect::<Vec<_>>(),
    )));
    cols.push(Arc::new(StringArray::from(vec![scorer.in_model_id(); n])));
    cols.push(Arc::new(StringArray::from(vec![scorer.version(); n])));
    cols.push(Arc::new(StringArray::from(vec![
        scorer.general_model_id();
        n
    ])));
    let micros = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    cols.push(Arc::new(
        TimestampMicrosecondArray::from(vec![micros; n]).with_timezone("UTC"),
    ));
    cols.push(Arc::new(StringArray::from_iter_values(
        flags.iter().map(|f| f.status.as_str()),
    )));
    Ok((RecordBatch::try_new(Arc::clone(schema), cols)?, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_names_round_trip_and_values_follow_the_method() {
        for k in ScoreKind::all(3, true) {
            assert_eq!(k.to_string().parse::<ScoreKind>().unwrap(), k);
        }
        assert!("llr_scale_x".parse::<ScoreKind>().is_err());
        let s = ImageScores {
            lp_in: vec![-10.0, -5.0, -2.0],
            lp_gen: Some(vec![-9.0, -7.0, -1.0]),
        };
        assert_eq!(ScoreKind::Nll.value(&s), 17.0);
        assert_eq!(ScoreKind::LastScale.value(&s), 2.0);
        assert_eq!(ScoreKind::Scale(0).value(&s), 10.0);
        assert_eq!(ScoreKind::Llr.value(&s), -17.0 + 17.0);
        assert_eq!(ScoreKind::LlrScale(1).value(&s), -2.0);
        let no_gen = ImageScores { lp_gen: None, ..s };
        assert!(ScoreKind::Llr.value(&no_gen).is_nan());
    }
}

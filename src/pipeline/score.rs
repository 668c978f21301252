//! Score stage: decoded pixels -> per-scale log-likelihoods under the in-distribution model
//! and, when configured, the general model; the compressed sizes of the pixels and, with a
//! complexity reference, the reference terms; and the columns of every score
//! ([`crate::score`] defines them).

use std::sync::Arc;

use arrow::record_batch::RecordBatch;

use candle_core::Device;

use super::flag::{Flag, Flagger};
use crate::glow::Precision;
use crate::glow::config::GlowConfig;
use crate::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use crate::glow::{GlowError, GlowModel, GlowScorer};
use crate::score::complexity::layout;
use crate::score::{ComplexityReference, Compressor, ImageScores, ScoreKind};

/// The in-distribution model and optionally the general model, ready to score.
pub struct ModelScorer {
    config: GlowConfig,
    in_scorer: GlowScorer,
    in_id: String,
    version: Option<String>,
    general: Option<(GlowScorer, String)>,
    device: Device,
    batch: usize,
    compressors: Vec<Compressor>,
    reference: Option<Arc<ComplexityReference>>,
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
            compressors: vec![Compressor::Zlib],
            reference: None,
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

    /// Which compressed sizes [`ModelScorer::score_pixels`] computes (zlib always: the
    /// `complexity` column needs it). Every codec costs time per image (models/README.md).
    pub fn set_compressors(&mut self, extra: &[Compressor]) {
        let mut c = vec![Compressor::Zlib];
        c.extend(extra.iter().copied().filter(|&x| x != Compressor::Zlib));
        c.sort();
        c.dedup();
        self.compressors = c;
    }

    /// Attaches the complexity reference of a calibration (for `complexity_cond` and
    /// `combined`).
    ///
    /// Errors: a reference built for another layout size than this model's input.
    pub fn set_reference(
        &mut self,
        reference: Option<Arc<ComplexityReference>>,
    ) -> Result<(), GlowError> {
        if let Some(r) = &reference {
            let want = self.config.in_channels * r.grid * r.grid;
            if r.layout_dims != want || !self.config.image_size.is_multiple_of(r.grid) {
                return Err(GlowError::Input(format!(
                    "the complexity reference holds {} layout values on a {}x{} grid; this model's {}x{}x{} input needs {want}",
                    r.layout_dims,
                    r.grid,
                    r.grid,
                    self.config.in_channels,
                    self.config.image_size,
                    self.config.image_size
                )));
            }
        }
        self.reference = reference;
        Ok(())
    }

    /// Builds a complexity reference from in-distribution images this scorer's models did
    /// not calibrate on (concatenated (C, S, S) 8-bit pixels): their layouts on an 8 x 8 grid
    /// (4 x 4 when the size is not a multiple of 8), their S (zlib) and, with a general
    /// model, their likelihood ratios; k = 20 neighbours ([`crate::score::reference`]).
    ///
    /// Errors: fewer than 21 images, or a model failure.
    pub fn build_reference(
        &self,
        pixels: &[u8],
        data: &str,
    ) -> Result<ComplexityReference, GlowError> {
        use crate::score::reference::{DEFAULT_GRID, DEFAULT_K};
        let (c, size) = (self.config.in_channels, self.config.image_size);
        let grid = if size.is_multiple_of(DEFAULT_GRID) {
            DEFAULT_GRID
        } else {
            4
        };
        let scores = self.score_pixels_with(pixels, &[Compressor::Zlib], None)?;
        let mut layouts = Vec::with_capacity(scores.len() * c * grid * grid);
        for px in pixels.chunks(self.config.dims()) {
            layouts.extend(layout(px, c, size, grid).map_err(GlowError::Input)?);
        }
        let s: Vec<f64> = scores
            .iter()
            .map(|x| ScoreKind::Complexity(Compressor::Zlib).value(x))
            .collect();
        let llr: Option<Vec<f64>> = self
            .general
            .as_ref()
            .map(|_| scores.iter().map(|x| ScoreKind::Llr.value(x)).collect());
        ComplexityReference::build(grid, DEFAULT_K, layouts, s, llr.as_deref(), data)
            .map_err(GlowError::Input)
    }

    /// True when a complexity reference is attached.
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// Scores concatenated (C, S, S) 8-bit images (bin-centre dequantisation), in batches:
    /// log-likelihoods under both models, compressed sizes ([`ModelScorer::set_compressors`])
    /// and, with a reference, the conditional complexity and the combined score.
    pub fn score_pixels(&self, pixels: &[u8]) -> Result<Vec<ImageScores>, GlowError> {
        self.score_pixels_with(pixels, &self.compressors, self.reference.as_deref())
    }

    /// [`ModelScorer::score_pixels`] computing the compressed sizes of `compressors` instead
    /// of the configured ones (for a query that asks for one codec's score).
    pub fn score_pixels_for(
        &self,
        pixels: &[u8],
        compressors: &[Compressor],
    ) -> Result<Vec<ImageScores>, GlowError> {
        self.score_pixels_with(pixels, compressors, self.reference.as_deref())
    }

    /// [`ModelScorer::score_pixels`] with explicit input terms: the compressed sizes of
    /// `compressors` and the terms of `reference` (none of either: the models alone).
    pub fn score_pixels_with(
        &self,
        pixels: &[u8],
        compressors: &[Compressor],
        reference: Option<&ComplexityReference>,
    ) -> Result<Vec<ImageScores>, GlowError> {
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
                out.push(ImageScores::from_lp(
                    lp,
                    g.as_ref().map(|g| g.per_scale[i].clone()),
                    per,
                ));
            }
        }
        self.add_input_terms(pixels, &mut out, compressors, reference)?;
        Ok(out)
    }

    /// Fills the compressed sizes and the reference terms of each image (in parallel: the
    /// codecs and the neighbour search run on the CPU beside the models).
    fn add_input_terms(
        &self,
        pixels: &[u8],
        scores: &mut [ImageScores],
        compressors: &[Compressor],
        reference: Option<&ComplexityReference>,
    ) -> Result<(), GlowError> {
        use rayon::prelude::*;
        let (c, s) = (self.config.in_channels, self.config.image_size);
        let per = self.config.dims();
        scores
            .par_iter_mut()
            .zip(pixels.par_chunks(per))
            .try_for_each(|(sc, px)| -> Result<(), String> {
                for &codec in compressors {
                    sc.input_bits[codec.index()] = codec.compressed_bits(px, c, s)?;
                }
                if let Some(r) = reference {
                    let e = r.expected_complexity(&layout(px, c, s, r.grid)?)?;
                    sc.expected_complexity = Some(e);
                    sc.combined = r.combined(
                        ScoreKind::ComplexityCond.value(sc),
                        sc.log_p_gen().map(|g| g - sc.log_p_in()),
                    );
                }
                Ok(())
            })
            .map_err(GlowError::Input)
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
    cols.push(f64s(&|s| s.input_bits[Compressor::Zlib.index()]));
    cols.push(f64s(&|s| ScoreKind::Complexity(Compressor::Zlib).value(s)));
    let with_ref = |k: ScoreKind| move |s: &ImageScores| s.expected_complexity.map(|_| k.value(s));
    cols.push(opt(&with_ref(ScoreKind::ComplexityCond)));
    cols.push(opt(&|s| s.combined));
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

/// The scores of scored records read back ([`scored_batch`]'s inverse for what the score kinds
/// need): per-scale likelihoods of both models, the zlib input bits, the expected complexity
/// (`complexity - complexity_cond`) and `combined`. `dims` is the model input's C*H*W.
///
/// Errors: a `lp_scale_k`, `input_bits` or `complexity` column is missing or not Float64.
pub fn scores_from_scored(
    batch: &RecordBatch,
    scales: usize,
    dims: usize,
) -> Result<Vec<ImageScores>, crate::pipeline::PipelineError> {
    use arrow::array::{Array, AsArray, Float64Array};
    use arrow::datatypes::Float64Type;
    let col = |name: &str| -> Result<Option<&Float64Array>, crate::pipeline::PipelineError> {
        match batch.column_by_name(name) {
            None => Ok(None),
            Some(c) => c
                .as_primitive_opt::<Float64Type>()
                .map(Some)
                .ok_or_else(|| {
                    crate::pipeline::PipelineError::Schema(format!(
                        "scored column `{name}` is {}, not Float64",
                        c.data_type()
                    ))
                }),
        }
    };
    let need = |name: &str| {
        col(name)?.ok_or_else(|| {
            crate::pipeline::PipelineError::Schema(format!("scored records lack `{name}`"))
        })
    };
    let lp: Vec<&Float64Array> = (0..scales)
        .map(|k| need(&format!("lp_scale_{k}")))
        .collect::<Result<_, _>>()?;
    let gen_lp: Vec<Option<&Float64Array>> = (0..scales)
        .map(|k| col(&format!("gen_lp_scale_{k}")))
        .collect::<Result<_, _>>()?;
    let bits = need("input_bits")?;
    let complexity = need("complexity")?;
    let cond = col("complexity_cond")?;
    let combined = col("combined")?;
    let value =
        |a: Option<&Float64Array>, i: usize| a.filter(|a| a.is_valid(i)).map(|a| a.value(i));
    Ok((0..batch.num_rows())
        .map(|i| {
            let lp_gen = gen_lp
                .iter()
                .map(|g| value(*g, i))
                .collect::<Option<Vec<f64>>>();
            let mut s = ImageScores::from_lp(lp.iter().map(|a| a.value(i)).collect(), lp_gen, dims);
            s.input_bits[Compressor::Zlib.index()] = bits.value(i);
            s.expected_complexity = value(cond, i).map(|c| complexity.value(i) - c);
            s.combined = value(combined, i);
            s
        })
        .collect())
}

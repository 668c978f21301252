//! Scoring inside SQL: scalar UDFs that decode an image column and score it with the
//! configured models, a whole Arrow array per call (one batched model call per DataFusion
//! batch, on the GPU when the models are there), plus bits/dim <-> log p helpers.
//!
//! | function | returns |
//! |---|---|
//! | `ood_log_p(image)` | log p_in(x), nats |
//! | `ood_bpd(image)` | bits/dim under the in-distribution model |
//! | `ood_lp_scale(image, k)` | lp_k under the in-distribution model |
//! | `ood_gen_log_p(image)` | log p_gen(x) (needs a general model) |
//! | `ood_llr(image)` | log p_gen(x) - log p_in(x) (needs a general model) |
//! | `ood_complexity(image)` | input complexity S = -log2 P_in(x) - L_zlib(x), bits |
//! | `ood_score(image)` | the configured score (the pipeline's `flag.score`) |
//! | `ood_score(image, 'name')` | any score by name ([`crate::score`]), if its models and reference are there |
//! | `log_p_to_bpd(log_p, dims)`, `bpd_to_log_p(bpd, dims)` | conversions |
//!
//! An image that cannot be decoded scores NULL (the pipeline would dead-letter it).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

use crate::glow::bits_per_dim;
use crate::pipeline::decode::{DecodeLimits, binary_values, decode_values, is_byte_column};
use crate::pipeline::score::ModelScorer;
use crate::score::calibration::Calibration;
use crate::score::{Compressor, ImageScores, ScoreKind};

/// The models behind the scoring UDFs.
pub struct SqlModels {
    /// In-distribution and optional general model.
    pub scorer: ModelScorer,
    /// What `ood_score` returns.
    pub score: ScoreKind,
    /// Decode limits (as the pipeline's).
    pub limits: DecodeLimits,
}

impl std::fmt::Debug for SqlModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlModels")
            .field("in", &self.scorer.in_model_id())
            .field("general", &self.scorer.general_model_id())
            .field("score", &self.score)
            .finish()
    }
}

impl SqlModels {
    /// Loads `model` (and `general`) on `device` in f32, with the complexity reference of
    /// `calibration` when it names one and belongs to these models.
    pub fn load(
        model: &std::path::Path,
        general: Option<&std::path::Path>,
        calibration: Option<&std::path::Path>,
        device: crate::device::DeviceSpec,
        batch: usize,
        score: ScoreKind,
        limits: DecodeLimits,
    ) -> anyhow::Result<Self> {
        let mut scorer =
            ModelScorer::load(model, general, device, crate::glow::Precision::F32, batch)?;
        if let Some(path) = calibration {
            let cal = Calibration::load(path).map_err(anyhow::Error::msg)?;
            if cal.belongs_to(scorer.in_model_id(), scorer.general_model_id()) {
                scorer.set_reference(cal.reference.map(Arc::new))?;
            }
        }
        scorer.set_compressors(score.compressor().as_slice());
        Ok(Self {
            scorer,
            score,
            limits,
        })
    }

    /// The models, score and decode limits of a pipeline (on `device`, not the pipeline's
    /// device, so a query can run where the pipeline does not).
    pub fn from_pipeline(
        cfg: &crate::pipeline::config::PipelineConfig,
        device: crate::device::DeviceSpec,
    ) -> anyhow::Result<Self> {
        let (model, _, _) = crate::pipeline::models::in_model(cfg)?;
        Self::load(
            &model,
            cfg.models.general.as_deref(),
            cfg.flag.calibration.as_deref(),
            device,
            cfg.models.batch,
            cfg.flag.score,
            cfg.decode.limits(),
        )
    }

    /// Decodes and scores one array of images with the configured compressed sizes; `None`
    /// where a row does not decode.
    pub fn score_array(&self, images: &ArrayRef) -> Result<Vec<Option<ImageScores>>> {
        self.score_array_for(images, None)
    }

    /// [`SqlModels::score_array`], computing `kind`'s compressed size when it needs one.
    fn score_array_for(
        &self,
        images: &ArrayRef,
        kind: Option<ScoreKind>,
    ) -> Result<Vec<Option<ImageScores>>> {
        let bytes = binary_values(images).map_err(|e| DataFusionError::External(e.into()))?;
        let decoded = decode_values(&bytes, self.scorer.config(), &self.limits);
        let mut pixels = Vec::new();
        for px in decoded.iter().flatten() {
            pixels.extend_from_slice(px);
        }
        let scored = match kind.and_then(|k| k.compressor()) {
            Some(c) => self.scorer.score_pixels_for(&pixels, &[c]),
            None => self.scorer.score_pixels(&pixels),
        };
        let mut scores = scored
            .map_err(|e| DataFusionError::External(e.into()))?
            .into_iter();
        Ok(decoded
            .iter()
            .map(|d| d.as_ref().ok().and_then(|_| scores.next()))
            .collect())
    }
}

/// What a scoring UDF returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Output {
    LogP,
    Bpd,
    LpScale,
    GenLogP,
    Llr,
    Complexity,
    Score,
}

/// A scoring UDF over an image column.
#[derive(Debug)]
struct ScoreUdf {
    name: &'static str,
    output: Output,
    signature: Signature,
    models: Arc<SqlModels>,
}

// DataFusion compares functions to deduplicate expressions: equal = same name, same models.
impl PartialEq for ScoreUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.models, &other.models)
    }
}
impl Eq for ScoreUdf {}
impl Hash for ScoreUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        (Arc::as_ptr(&self.models) as usize).hash(state);
    }
}

impl ScalarUDFImpl for ScoreUdf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        // A NULL argument (`ood_score(NULL)`) plans, and gives NULL.
        if args.iter().any(|a| a == &DataType::Null) {
            return Ok(DataType::Float64);
        }
        if !is_byte_column(&args[0]) {
            return plan_err!(
                "{}(image): image must be a binary column of encoded images, got {}",
                self.name,
                args[0]
            );
        }
        if self.output == Output::Score && args.len() == 2 && !is_string(&args[1]) {
            return plan_err!(
                "ood_score(image, name): name must be a score name (a string), got {}",
                args[1]
            );
        }
        if self.output == Output::LpScale && !args[1].is_integer() {
            return plan_err!(
                "ood_lp_scale(image, k): k must be an integer, got {}",
                args[1]
            );
        }
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let is_null = |a: &ColumnarValue| match a {
            ColumnarValue::Scalar(s) => s.is_null(),
            ColumnarValue::Array(a) => a.data_type() == &DataType::Null,
        };
        if args.args.iter().skip(1).any(is_null) || is_null(&args.args[0]) {
            return Ok(ColumnarValue::Array(Arc::new(Float64Array::new_null(n))));
        }
        let images = args.args[0].to_array(n)?;
        let scales = self.models.scorer.scales();
        let scale: Option<usize> = match self.output {
            Output::LpScale => match &args.args[1] {
                ColumnarValue::Scalar(s) => match s.cast_to(&DataType::Int64)? {
                    ScalarValue::Int64(Some(k)) if k >= 0 && (k as usize) < scales => {
                        Some(k as usize)
                    }
                    other => {
                        return exec_err!(
                            "ood_lp_scale(image, k): k must be 0..{} (the model has {scales} scales), got {other}",
                            scales - 1
                        );
                    }
                },
                ColumnarValue::Array(_) => {
                    return exec_err!("ood_lp_scale(image, k): k must be a constant");
                }
            },
            _ => None,
        };
        let dims = self.models.scorer.config().dims();
        let score = match (self.output, args.args.get(1)) {
            (Output::Score, Some(arg)) => self.named_score(arg)?,
            (Output::Complexity, _) => ScoreKind::Complexity(Compressor::Zlib),
            _ => self.models.score,
        };
        let scores = self.models.score_array_for(&images, Some(score))?;
        let out: Float64Array = scores
            .iter()
            .map(|s| {
                s.as_ref().map(|s| match self.output {
                    Output::LogP => s.log_p_in(),
                    Output::Bpd => bits_per_dim(s.log_p_in(), dims),
                    Output::LpScale => s.lp_in[scale.expect("set above")],
                    Output::GenLogP => s.log_p_gen().unwrap_or(f64::NAN),
                    Output::Llr => ScoreKind::Llr.value(s),
                    Output::Complexity | Output::Score => score.value(s),
                })
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

impl ScoreUdf {
    /// The score named by `ood_score`'s second argument, if these models can compute it.
    fn named_score(&self, arg: &ColumnarValue) -> Result<ScoreKind> {
        let name = match arg {
            ColumnarValue::Scalar(s) => match s.cast_to(&DataType::Utf8)? {
                ScalarValue::Utf8(Some(n)) => n,
                other => return exec_err!("ood_score(image, name): name is {other}"),
            },
            ColumnarValue::Array(_) => {
                return exec_err!("ood_score(image, name): name must be a constant");
            }
        };
        let k: ScoreKind = name
            .parse()
            .map_err(|e: String| DataFusionError::Execution(format!("ood_score: {e}")))?;
        let scorer = &self.models.scorer;
        if k.needs_general() && scorer.general_model_id().is_none() {
            return exec_err!("ood_score(image, '{k}'): the score needs a general model");
        }
        if k.needs_reference() && !scorer.has_reference() {
            return exec_err!(
                "ood_score(image, '{k}'): the score needs the complexity reference of a calibration file (glowwatch calibrate --holdout F)"
            );
        }
        Ok(k)
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// `log_p_to_bpd(log_p, dims)` and `bpd_to_log_p(bpd, dims)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct BpdUdf {
    to_bpd: bool,
    signature: Signature,
}

impl ScalarUDFImpl for BpdUdf {
    fn name(&self) -> &str {
        if self.to_bpd {
            "log_p_to_bpd"
        } else {
            "bpd_to_log_p"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let v = args.args[0].to_array(n)?;
        let d = args.args[1].to_array(n)?;
        let v = v.as_primitive::<Float64Type>();
        let d = d.as_primitive::<Int64Type>();
        let ln2 = std::f64::consts::LN_2;
        let out: Float64Array = (0..n)
            .map(|i| {
                (v.is_valid(i) && d.is_valid(i) && d.value(i) > 0).then(|| {
                    let dims = d.value(i) as f64;
                    if self.to_bpd {
                        8.0 - v.value(i) / (dims * ln2)
                    } else {
                        (8.0 - v.value(i)) * dims * ln2
                    }
                })
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

/// The bpd <-> log p helpers (need no model).
pub fn helper_udfs() -> Vec<ScalarUDF> {
    [true, false]
        .into_iter()
        .map(|to_bpd| {
            ScalarUDF::from(BpdUdf {
                to_bpd,
                signature: Signature::exact(
                    vec![DataType::Float64, DataType::Int64],
                    Volatility::Immutable,
                ),
            })
        })
        .collect()
}

/// The scoring UDFs for `models` (the general-model ones only when there is a general model;
/// `ood_score` only when its score can be computed).
pub fn scoring_udfs(models: Arc<SqlModels>) -> Vec<ScalarUDF> {
    let general = models.scorer.general_model_id().is_some();
    let one = || Signature::any(1, Volatility::Immutable);
    let mut v = vec![
        ("ood_log_p", Output::LogP, one()),
        ("ood_bpd", Output::Bpd, one()),
        ("ood_complexity", Output::Complexity, one()),
        (
            "ood_lp_scale",
            Output::LpScale,
            Signature::any(2, Volatility::Immutable),
        ),
    ];
    if general {
        v.push(("ood_gen_log_p", Output::GenLogP, one()));
        v.push(("ood_llr", Output::Llr, one()));
    }
    if (general || !models.score.needs_general())
        && (models.scorer.has_reference() || !models.score.needs_reference())
    {
        v.push((
            "ood_score",
            Output::Score,
            Signature::one_of(
                vec![TypeSignature::Any(1), TypeSignature::Any(2)],
                Volatility::Immutable,
            ),
        ));
    }
    v.into_iter()
        .map(|(name, output, signature)| {
            ScalarUDF::from(ScoreUdf {
                name,
                output,
                signature,
                models: models.clone(),
            })
        })
        .collect()
}

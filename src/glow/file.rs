//! Model files: one safetensors file holding the weights (f32, or f16/bf16 when saved so with
//! [`GlowModel::save_as`]; always loaded as f32) and, in its metadata, the format
//! version, the config (JSON), a model card (JSON) and the model id, a content hash of config and
//! weights that is verified on load. Loading never panics: a missing, truncated, corrupted or
//! mismatched file is a [`GlowError::File`] naming the file and the problem.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::GlowConfig;
use super::flow::Glow;
use super::init::ParamWriter;
use super::scorer::GlowScorer;
use super::{GlowError, Result};

/// Value of the `format` metadata key of every glowwatch model file.
pub const FORMAT: &str = "glowwatch-glow";
/// The model file format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// What a model is and how it came to be; stored inside the model file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelCard {
    /// Short human name, e.g. `fashion-mnist-in`.
    pub name: String,
    /// Training data, e.g. `fashion_mnist_train.parquet (60,000 images)`.
    pub trained_on: String,
    /// When the weights were produced (RFC 3339, UTC).
    pub created: String,
    /// Optimisation steps taken.
    pub train_steps: u64,
    /// Final held-out bits/dim, when measured.
    pub final_bpd: Option<f64>,
    /// Model id of the model this one was fine-tuned from, if any.
    pub parent: Option<String>,
    /// Free text.
    pub notes: String,
    /// How well the model detects out-of-distribution images with its recommended score,
    /// as last measured (`glowwatch model card --detection`). Not part of the model id.
    pub detection: Option<DetectionCard>,
    /// The checkpoint this model was imported from, when it was (`glowwatch model
    /// import-torch`).
    pub imported_from: Option<ImportedFrom>,
}

/// Where an imported model's weights came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportedFrom {
    /// File name of the source checkpoint.
    pub file: String,
    /// SHA-256 of the source checkpoint's bytes (hex).
    pub sha256: String,
    /// Which form the checkpoint was (whole module or state dict).
    pub form: String,
}

/// The detection figures of a model card: one score, measured against named OOD sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectionCard {
    /// The recommended score (its name, e.g. `combined`).
    pub score: String,
    /// The general model it needs, if any.
    pub general_model: Option<String>,
    /// In-distribution set the false-positive rates were measured on.
    pub in_set: String,
    /// One entry per OOD set.
    pub results: Vec<DetectionResult>,
    /// How the figures were produced (the command) and when.
    pub measured: String,
}

/// The score against one OOD set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectionResult {
    /// OOD set name.
    pub ood: String,
    /// Area under the ROC curve.
    pub auroc: f64,
    /// True-positive rate at 1 % false positives on the in-distribution set.
    pub tpr_at_1pct_fpr: f64,
    /// Recall at the calibrated threshold, when there was one.
    pub recall_at_threshold: Option<f64>,
}

/// A Glow with its parameter store, configuration, card and content-hash id.
pub struct GlowModel {
    /// Parameters as trainable variables (names as in the file).
    pub varmap: VarMap,
    /// The model built on those variables.
    pub glow: Glow,
    /// The model card.
    pub card: ModelCard,
    device: Device,
}

impl GlowModel {
    /// A freshly initialised model (random orthogonal 1x1 convs, zero couplings) from `seed`.
    /// Call [`GlowModel::init_from_data`] before use: ActNorms start as identities.
    pub fn new_random(config: &GlowConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::new_random_dtype(config, seed, device, DType::F32)
    }

    /// As [`GlowModel::new_random`] with parameters of `dtype` (F64 for brute-force checks).
    pub fn new_random_dtype(
        config: &GlowConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (varmap, glow) = Self::build(config, device, dtype)?;
        glow.randomize(seed, &ParamWriter::new(&varmap))?;
        Ok(Self {
            varmap,
            glow,
            card: ModelCard::default(),
            device: device.clone(),
        })
    }

    fn build(config: &GlowConfig, device: &Device, dtype: DType) -> Result<(VarMap, Glow)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let glow = Glow::new(config, vb)?;
        Ok((varmap, glow))
    }

    /// The configuration.
    pub fn config(&self) -> &GlowConfig {
        self.glow.config()
    }

    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Data-dependent ActNorm initialisation on a batch of model inputs (N, C, S, S).
    pub fn init_from_data(&self, x: &Tensor) -> Result<()> {
        self.glow.init_from_data(x, &ParamWriter::new(&self.varmap))
    }

    /// Adds N(0, scale^2) noise to every trainable parameter (not the fixed ones, see
    /// [`super::is_fixed_param`]). A fresh model's couplings are exact linear maps (their last conv
    /// starts at zero), so checks that must exercise the coupling networks, such as
    /// `glowwatch doctor` and the layer tests, perturb first.
    pub fn perturb(&self, seed: u64, scale: f64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let writer = ParamWriter::new(&self.varmap);
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            if super::is_fixed_param(name) {
                continue;
            }
            let t = data[name].as_tensor();
            let noise: Vec<f64> = (0..t.elem_count())
                .map(|_| scale * rng.sample::<f64, _>(rand_distr::StandardNormal))
                .collect();
            let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu)?
                .to_dtype(t.dtype())?
                .to_device(t.device())?;
            writer.set(t, &(t + noise)?)?;
        }
        Ok(())
    }

    /// The fused inference form on `device`, coupling networks in `dtype` (see
    /// [`GlowScorer::new`]).
    pub fn scorer(&self, device: &Device, dtype: DType) -> Result<GlowScorer> {
        GlowScorer::new(&self.glow, device, dtype)
    }

    /// The fused inference form with the flow state in `state` too (see
    /// [`GlowScorer::with_state_dtype`]).
    pub fn scorer_with_state(
        &self,
        device: &Device,
        dtype: DType,
        state: DType,
    ) -> Result<GlowScorer> {
        GlowScorer::with_state_dtype(&self.glow, device, dtype, state)
    }

    /// The trainable variables (everything but [`super::is_fixed_param`]), sorted by name so optimizer state lines up across runs and checkpoints.
    pub fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(String, candle_core::Var)> = data
            .iter()
            .filter(|(k, _)| !super::is_fixed_param(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Number of parameters (trainable and fixed).
    pub fn param_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// Content hash of config and weights: `glow-` + 16 hex digits of SHA-256.
    pub fn model_id(&self) -> Result<String> {
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        model_id(self.config(), &tensors)
    }

    /// Writes the model atomically (temporary file, fsync, rename) as f32 safetensors.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<String> {
        self.save_as(path, DType::F32)
    }

    /// Writes the model with its weights stored as `dtype` (F32, F16 or BF16): half the size
    /// in 16 bits, for moving models within a file-size limit (the GPU machine returns files
    /// of at most 16 MiB). The weights are rounded to `dtype` first; the id is that of the
    /// rounded weights, so [`GlowModel::load`] restores exactly what was saved (as f32) and a
    /// 16-bit file has another id than its f32 source. Returns the id.
    pub fn save_as(&self, path: impl AsRef<Path>, dtype: DType) -> Result<String> {
        let path = path.as_ref();
        let file_err = |problem: String| GlowError::File {
            path: path.display().to_string(),
            problem,
        };
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(file_err(format!(
                "weights can be stored as f32, f16 or bf16, not {dtype:?}"
            )));
        }
        let stored = self
            .named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.to_dtype(dtype)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let rounded = stored
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let id = model_id(self.config(), &rounded)?;
        let tensors = stored;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(self.config()).expect("config serialises"),
        );
        meta.insert(
            "card".to_string(),
            serde_json::to_string(&self.card).expect("card serialises"),
        );
        meta.insert("model_id".to_string(), id.clone());
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
                .map_err(|e| file_err(format!("cannot serialise: {e}")))?;
        crate::fsutil::write_atomic(path, &bytes)
            .map_err(|e| file_err(format!("cannot write: {e}")))?;
        Ok(id)
    }

    /// Reads a model file written by [`GlowModel::save`] onto `device` (parameters in f32).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| GlowError::File {
            path: path.display().to_string(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::from_bytes(&bytes, &path.display().to_string(), device)
    }

    /// Reads a model file's bytes (`origin` names it in errors). Never panics: anything that
    /// is not a complete, consistent model file is a [`GlowError::File`].
    pub fn from_bytes(bytes: &[u8], origin: &str, device: &Device) -> Result<Self> {
        let err = |problem: String| GlowError::File {
            path: origin.to_string(),
            problem,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            err(format!(
                "not a valid safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("unreadable header: {e}")))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| err("no glowwatch metadata (not a glowwatch model file)".into()))?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| err(format!("metadata key `{k}` is missing")))
        };
        if get("format")? != FORMAT {
            return Err(err(format!(
                "format is `{}`, expected `{FORMAT}`",
                get("format")?
            )));
        }
        let version = get("format_version")?;
        if version != &FORMAT_VERSION.to_string() {
            return Err(err(format!(
                "unknown format version {version} (this build reads version {FORMAT_VERSION})"
            )));
        }
        let config = GlowConfig::parse(get("config")?).map_err(|e| err(e.to_string()))?;
        let card: ModelCard =
            serde_json::from_str(get("card")?).map_err(|e| err(format!("bad model card: {e}")))?;
        let stored_id = get("model_id")?.clone();

        let (varmap, glow) = Self::build(&config, device, DType::F32)?;
        let mut loaded = BTreeMap::new();
        {
            let vars = varmap.data().lock().expect("varmap lock");
            let mut expected: Vec<&String> = vars.keys().collect();
            expected.sort();
            for name in expected {
                let var = &vars[name];
                let view = st
                    .tensor(name)
                    .map_err(|_| err(format!("tensor `{name}` is missing")))?;
                if !matches!(
                    view.dtype(),
                    safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
                ) {
                    return Err(err(format!(
                        "tensor `{name}` has dtype {:?}, expected F32 (or F16, BF16)",
                        view.dtype()
                    )));
                }
                if view.shape() != var.dims() {
                    return Err(err(format!(
                        "tensor `{name}` has shape {:?}, the config needs {:?}",
                        view.shape(),
                        var.dims()
                    )));
                }
                let t = view
                    .load(&Device::Cpu)
                    .map_err(|e| err(e.to_string()))?
                    .to_dtype(DType::F32)?;
                var.set(&t.to_device(device)?)?;
                loaded.insert(name.clone(), t);
            }
            if let Some(extra) = st.names().into_iter().find(|n| !vars.contains_key(*n)) {
                return Err(err(format!("unexpected tensor `{extra}` for this config")));
            }
        }
        let id = model_id(&config, &loaded)?;
        if id != stored_id {
            return Err(err(format!(
                "content hash {id} does not match the stored model id {stored_id} (file corrupted?)"
            )));
        }
        Ok(Self {
            varmap,
            glow,
            card,
            device: device.clone(),
        })
    }
}

fn model_id(config: &GlowConfig, tensors: &BTreeMap<String, Tensor>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(
        serde_json::to_string(config)
            .expect("config serialises")
            .as_bytes(),
    );
    for (name, t) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(format!("glow-{}", &hex::encode(h.finalize())[..16]))
}

/// Current UTC time as RFC 3339 (for model cards).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Regression: the data-dependent initialisation pass kept the whole autograd graph alive
    /// (the parameters are variables), which took 21 GiB for 512 images at K = 16, width 256.
    /// Its outputs must come out of the graph, so intermediates are freed step by step.
    #[test]
    fn actnorm_initialisation_does_not_keep_the_graph() {
        let cfg = GlowConfig::small(1);
        let m = GlowModel::new_random(&cfg, 1, &Device::Cpu).unwrap();
        let x = Tensor::rand(
            -0.5f32,
            0.5,
            (4, cfg.in_channels, cfg.image_size, cfg.image_size),
            &Device::Cpu,
        )
        .unwrap();
        let out = m.glow.run(&x, Some(&ParamWriter::new(&m.varmap))).unwrap();
        assert!(!out.total_logdet.track_op());
        assert!(out.latents.iter().all(|y| !y.track_op()));
        assert!(out.flow_logdet.iter().all(|f| !f.track_op()));
        // The ordinary forward pass of the now-initialised model is unaffected: training
        // still differentiates through it.
        let fwd = m.glow.forward(&x).unwrap();
        assert!(fwd.total_logdet.track_op());
        assert_eq!(fwd.total_logdet.dtype(), DType::F64);
    }
}

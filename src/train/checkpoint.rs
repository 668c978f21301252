//! Checkpoints: a directory with the model in the core's model-file format
//! (`checkpoint.safetensors`, loadable and scorable like any model) and the rest of the
//! training state beside it (`checkpoint.state.safetensors`: Adamax moments per variable, and
//! in its metadata the step counters, data positions and the job description as JSON).
//! Both files are written atomically, state first; the state names the model id it belongs to,
//! so a crash between the two renames is detected instead of resuming from a mismatched pair.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::optimizer::Adamax;
use super::{TrainError, TrainResult};
use crate::glow::GlowModel;

/// Where training stands: enough to take the identical next step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Batches consumed (applied and skipped steps).
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches of the current epoch already consumed.
    pub batch_in_epoch: u64,
    /// Epoch of the general-data stream of the outlier loss.
    pub outlier_epoch: u64,
    /// Batches of that epoch already consumed.
    pub outlier_batch: u64,
    /// Images trained on (in-distribution batches).
    pub images_seen: u64,
    /// Training wall time so far, over all runs, in seconds.
    pub elapsed_s: f64,
    /// Held-out bits/dim measured so far.
    pub history: Vec<ValPoint>,
}

/// One validation measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValPoint {
    /// Step at which it was measured.
    pub step: u64,
    /// Epoch at which it was measured.
    pub epoch: u64,
    /// Mean held-out bits/dim.
    pub val_bpd: f64,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// The model, on the requested device.
    pub model: GlowModel,
    /// Optimizer and loop state.
    pub resume: ResumeState,
    /// The job description the run was started with (JSON), so `--resume` needs no flags.
    pub job: serde_json::Value,
}

/// Everything of a checkpoint but the model: what [`super::Trainer::run`] resumes from.
pub struct ResumeState {
    /// First moments, one per trainable variable (sorted by name).
    pub m: Vec<Tensor>,
    /// Infinity norms, likewise.
    pub u: Vec<Tensor>,
    /// Applied optimizer steps.
    pub opt_steps: u64,
    /// Skipped optimizer steps.
    pub opt_skipped: u64,
    /// Loop state.
    pub state: TrainState,
}

/// Model file of a checkpoint directory.
pub fn model_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

/// State file of a checkpoint directory.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.state.safetensors")
}

/// The variables a run with the first `freeze_scales` scales frozen optimises, sorted by name:
/// the order of the optimizer's state, in the trainer and in checkpoints alike.
pub fn optimised_vars(model: &GlowModel, freeze_scales: usize) -> Vec<(String, candle_core::Var)> {
    let frozen: Vec<String> = (0..freeze_scales).map(|i| format!("scale{i}.")).collect();
    model
        .trainable_vars()
        .into_iter()
        .filter(|(name, _)| !frozen.iter().any(|f| name.starts_with(f)))
        .collect()
}

/// Writes a checkpoint of `model`, `opt` (which optimises the variables of
/// [`optimised_vars`] with `freeze_scales`) and `state` into `dir`.
pub fn save(
    dir: &Path,
    model: &GlowModel,
    opt: &Adamax,
    freeze_scales: usize,
    state: &TrainState,
    job: &serde_json::Value,
) -> TrainResult<PathBuf> {
    let vars = optimised_vars(model, freeze_scales);
    let (m, u) = opt.state();
    if m.len() != vars.len() {
        return Err(TrainError::Checkpoint(format!(
            "the optimizer holds state for {} variables, the model has {} to optimise",
            m.len(),
            vars.len()
        )));
    }
    let mut tensors = Vec::with_capacity(2 * vars.len());
    for (i, (name, _)) in vars.iter().enumerate() {
        tensors.push((format!("m.{name}"), m[i].to_device(&Device::Cpu)?));
        tensors.push((format!("u.{name}"), u[i].to_device(&Device::Cpu)?));
    }
    let model_id = model.model_id()?;
    let mut meta = HashMap::new();
    meta.insert("format".into(), "glowwatch-train-state".into());
    meta.insert("model_id".into(), model_id);
    meta.insert("opt_steps".into(), opt.steps().to_string());
    meta.insert("opt_skipped".into(), opt.skipped().to_string());
    meta.insert("freeze_scales".into(), freeze_scales.to_string());
    meta.insert("state".into(), serde_json::to_string(state).expect("state"));
    meta.insert("job".into(), job.to_string());
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| TrainError::Checkpoint(format!("cannot serialise state: {e}")))?;
    let sp = state_path(dir);
    crate::fsutil::write_atomic(&sp, &bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", sp.display())))?;
    let mp = model_path(dir);
    model.save(&mp)?;
    Ok(mp)
}

/// Reads a checkpoint directory written by [`save`].
pub fn load(dir: &Path, device: &Device) -> TrainResult<Checkpoint> {
    let mp = model_path(dir);
    let sp = state_path(dir);
    let err = |p: &Path, m: String| TrainError::Checkpoint(format!("{}: {m}", p.display()));
    let model = GlowModel::load(&mp, device)?;
    let bytes = std::fs::read(&sp).map_err(|e| err(&sp, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(&sp, e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| err(&sp, e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| err(&sp, "no metadata".into()))?;
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| err(&sp, format!("metadata key `{k}` missing")))
    };
    let id = model.model_id()?;
    if get("model_id")? != id {
        return Err(err(
            &sp,
            format!(
                "belongs to model {}, but {} is {id} (interrupted while checkpointing?)",
                get("model_id")?,
                mp.display()
            ),
        ));
    }
    let parse_u64 = |k: &str| -> TrainResult<u64> {
        get(k)?.parse().map_err(|e| err(&sp, format!("`{k}`: {e}")))
    };
    let state: TrainState =
        serde_json::from_str(&get("state")?).map_err(|e| err(&sp, e.to_string()))?;
    let job = serde_json::from_str(&get("job")?).map_err(|e| err(&sp, e.to_string()))?;
    // Checkpoints from before frozen scales existed have no key: nothing was frozen.
    let freeze_scales = match meta.get("freeze_scales") {
        Some(v) => v
            .parse()
            .map_err(|e| err(&sp, format!("`freeze_scales`: {e}")))?,
        None => 0,
    };
    let (mut m, mut u) = (Vec::new(), Vec::new());
    for (name, _) in optimised_vars(&model, freeze_scales) {
        for (prefix, out) in [("m", &mut m), ("u", &mut u)] {
            let key = format!("{prefix}.{name}");
            let view = st
                .tensor(&key)
                .map_err(|_| err(&sp, format!("tensor `{key}` missing")))?;
            use candle_core::safetensors::Load;
            out.push(view.load(device)?);
        }
    }
    Ok(Checkpoint {
        model,
        resume: ResumeState {
            m,
            u,
            opt_steps: parse_u64("opt_steps")?,
            opt_skipped: parse_u64("opt_skipped")?,
            state,
        },
        job,
    })
}

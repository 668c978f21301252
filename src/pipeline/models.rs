//! Which models a pipeline scores with: a model file, or the `current` version of a model
//! registry ([`crate::registry`]), watched between batches so a promoted (or rolled back)
//! version is picked up without a restart. A batch is always scored by one version, and every
//! scored row names it (`model_id`, `model_version`).

use tracing::{info, warn};

use super::config::{FlagConfig, PipelineConfig};
use super::flag::Flagger;
use std::sync::Arc;

use super::score::ModelScorer;
use super::{PipelineError, Result};
use crate::device::DeviceSpec;
use crate::registry::Registry;
use crate::score::calibration::Calibration;

fn registry_err(e: crate::registry::RegistryError) -> PipelineError {
    PipelineError::Config(format!("models.registry: {e}"))
}

/// The in-distribution model file a pipeline uses now: its `in` file, or its registry's current
/// version (with that version's name and calibration file).
pub fn in_model(
    cfg: &PipelineConfig,
) -> Result<(
    std::path::PathBuf,
    Option<String>,
    Option<std::path::PathBuf>,
)> {
    Ok(match &cfg.models.registry {
        Some(dir) => {
            let r = Registry::open(dir).map_err(registry_err)?;
            let v = r.current().map_err(registry_err)?.ok_or_else(|| {
                PipelineError::Config(format!(
                    "models.registry {}: no current version (promote one first)",
                    dir.display()
                ))
            })?;
            (v.model(), Some(v.name.clone()), Some(v.calibration()))
        }
        None => (cfg.models.in_model.clone(), None, None),
    })
}

/// The pipeline's flag section with the calibration it uses: its own, or the registry
/// version's (`registry_cal`) when it names neither a calibration nor a fixed threshold.
fn resolved_flag(cfg: &PipelineConfig, registry_cal: Option<std::path::PathBuf>) -> FlagConfig {
    match (&cfg.flag, registry_cal) {
        (
            FlagConfig {
                calibration: None,
                threshold: None,
                ..
            },
            Some(c),
        ) => FlagConfig {
            calibration: Some(c),
            ..cfg.flag.clone()
        },
        _ => cfg.flag.clone(),
    }
}

/// A pipeline's models, its flag stage, and the calibration the threshold came from.
pub struct LoadedModels {
    /// Both models on the pipeline's device.
    pub scorer: ModelScorer,
    /// The flagged score and its threshold.
    pub flagger: Flagger,
    /// The calibration file's contents (its own or its registry version's) when it belongs to
    /// the scorer's models; `None` with a fixed threshold. Drift alarms and the dashboard read
    /// their references from it.
    pub calibration: Option<Calibration>,
}

/// Loads a pipeline's models on its device, and its flag threshold (from the registry
/// version's calibration when the pipeline names no other); the calibration file is read once.
pub fn load_scorer(cfg: &PipelineConfig) -> Result<LoadedModels> {
    let (model, version, calibration) = in_model(cfg)?;
    let device: DeviceSpec = cfg
        .models
        .device
        .parse()
        .map_err(|e: String| PipelineError::Config(format!("models.device: {e}")))?;
    let mut scorer = ModelScorer::load(
        &model,
        cfg.models.general.as_deref(),
        device,
        cfg.models.precision()?,
        cfg.models.batch,
    )?;
    scorer.set_version(version);
    let flag = resolved_flag(cfg, calibration);
    scorer.set_compressors(flag.score.compressor().as_slice());
    let cal = match (&flag.threshold, &flag.calibration) {
        (None, Some(path)) => Some(Calibration::load(path).map_err(PipelineError::Config)?),
        _ => None,
    };
    // A calibration of other models gets its own error from the flagger below.
    let belongs =
        |c: &Calibration, s: &ModelScorer| c.belongs_to(s.in_model_id(), s.general_model_id());
    if let Some(c) = cal.as_ref().filter(|c| belongs(c, &scorer)) {
        scorer.set_reference(c.reference.clone().map(Arc::new))?;
    }
    let flagger = Flagger::from_config(&flag, cal.as_ref(), &scorer)?;
    Ok(LoadedModels {
        calibration: cal.filter(|c| belongs(c, &scorer)),
        scorer,
        flagger,
    })
}

/// The drift alarms of a pipeline scoring with `scorer` and `flagger`: referenced by the same
/// calibration `cal` the threshold comes from ([`LoadedModels::calibration`]); `None` without
/// one (a fixed threshold), when it has no quantiles, or with `[drift] enabled = false`.
pub fn drift_monitor(
    cfg: &PipelineConfig,
    scorer: &ModelScorer,
    flagger: &Flagger,
    cal: Option<&Calibration>,
) -> Result<Option<super::drift::DriftMonitor>> {
    super::drift::DriftMonitor::new(
        &cfg.drift,
        cal,
        flagger.score,
        scorer.scales(),
        scorer.general_model_id().is_some(),
    )
    .map_err(PipelineError::Config)
}

/// Watches a registry's `current` pointer (a small file read per batch).
pub struct ModelWatcher {
    registry: Registry,
    current: Option<String>,
}

impl ModelWatcher {
    /// A watcher for pipelines whose models come from a registry; `current` is the version
    /// loaded now.
    pub fn new(cfg: &PipelineConfig, current: Option<&str>) -> Result<Option<Self>> {
        match &cfg.models.registry {
            None => Ok(None),
            Some(dir) => Ok(Some(Self {
                registry: Registry::open(dir).map_err(registry_err)?,
                current: current.map(String::from),
            })),
        }
    }

    /// When `current` points somewhere new, loads that version (scorer and threshold) and
    /// returns it. A version that cannot be loaded, or takes different input or a different
    /// number of scales than `scorer`, is refused with a warning and the pipeline keeps
    /// scoring with the model it has.
    pub fn poll(&mut self, cfg: &PipelineConfig, scorer: &ModelScorer) -> Option<LoadedModels> {
        let now = match self.registry.current() {
            Ok(v) => v.map(|v| v.name),
            Err(e) => {
                warn!("model registry: {e}; keeping {:?}", self.current);
                return None;
            }
        };
        if now.is_none() || now == self.current {
            return None;
        }
        let from = self.current.replace(now.clone().unwrap_or_default());
        match load_scorer(cfg) {
            Ok(m) => {
                let (a, b) = (m.scorer.config(), scorer.config());
                if (a.in_channels, a.image_size, &a.preprocess, a.scales)
                    != (b.in_channels, b.image_size, &b.preprocess, b.scales)
                {
                    warn!(
                        version = ?now,
                        "model registry: the new version takes different input or scales; keeping {from:?}"
                    );
                    return None;
                }
                info!(from = ?from, to = ?m.scorer.version(), model_id = m.scorer.in_model_id(), threshold = m.flagger.threshold, "switched model version");
                Some(m)
            }
            Err(e) => {
                warn!(version = ?now, "model registry: cannot load the new version ({e}); keeping {from:?}");
                None
            }
        }
    }
}

//! Importing Glow checkpoints saved by the paper authors' PyTorch code (`invglow`,
//! <https://github.com/boschresearch/hierarchical_anomaly_detection>, `create_glow_model`),
//! without Python: [`checkpoint`] reads torch's zip container, its pickle and strided
//! storages; [`invglow`] finds the parameters in either form their code saves (the whole
//! pickled module, `torch.save(model, f)`, or its state dict) and maps them onto [`GlowModel`].
//!
//! The mapping (`../shared/fixtures/torch-glow/FORMAT.md` §5) is exact: their squeeze, step
//! ActNorm, LU 1x1 convolution, affine coupling (interleaved shift/scale, `sigmoid(raw + 2)`,
//! output scale `exp(3 logs)`), exit ActNorms (eps 1e-8) and split order are ours
//! (`../shared/docs/method.md`); their prior's per-dimension mean and log-std become a
//! [`Prior::DiagonalGaussian`]. Variants their code can also build and ours cannot score are
//! refused with an [`ImportError::Unsupported`] naming what was found.

pub mod checkpoint;
pub mod invglow;

use std::path::Path;

use candle_core::Device;
use sha2::{Digest, Sha256};

use super::config::{Prior, ResizeMode};
use super::file::{GlowModel, ImportedFrom, ModelCard, now_rfc3339};

/// Why a checkpoint could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a readable torch checkpoint (truncated, corrupt, not torch at all).
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
    /// A torch checkpoint of something glowwatch cannot score: says what was found.
    #[error("unsupported checkpoint: {0}")]
    Unsupported(String),
    /// The parameters found do not form the Glow of the authors' `create_glow_model`.
    #[error("unexpected model structure: {0}")]
    Structure(String),
    /// Building our model from the parameters failed.
    #[error(transparent)]
    Glow(#[from] super::GlowError),
}

/// Which of the two forms the authors' code saves a checkpoint was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointForm {
    /// The whole pickled module (`torch.save(model, f)`, how their training script saves).
    WholeModule,
    /// The plain state dict (`torch.save(model.state_dict(), f)`).
    StateDict,
}

impl CheckpointForm {
    /// Human name, as written into model cards.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WholeModule => "whole module (torch.save(model))",
            Self::StateDict => "state dict (torch.save(model.state_dict()))",
        }
    }
}

/// Options of an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// How inputs that are not 32x32 reach the model's size. The authors' code zero-pads
    /// 28x28 images to 32x32, hence [`ResizeMode::Pad`] by default.
    pub resize: ResizeMode,
    /// Model card name (default: the checkpoint's file stem).
    pub name: Option<String>,
    /// What the model was trained on, for the card.
    pub trained_on: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            resize: ResizeMode::Pad,
            name: None,
            trained_on: "unknown (imported from a PyTorch checkpoint)".into(),
        }
    }
}

/// An imported model and what it came from.
pub struct Imported {
    /// The model (on the CPU), its card filled in.
    pub model: GlowModel,
    /// The checkpoint's form.
    pub form: CheckpointForm,
}

/// Imports the checkpoint at `path` (see the module docs).
///
/// Errors: every [`ImportError`]; a corrupt or truncated file is an error, never a panic.
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "imported".into());
    let mut imported = import_bytes(&bytes, opts)?;
    let card = &mut imported.model.card;
    if opts.name.is_none() {
        card.name = stem;
    }
    if let Some(from) = card.imported_from.as_mut() {
        from.file = file_name;
    }
    Ok(imported)
}

/// Imports a checkpoint from its bytes; the card's `imported_from.file` is left empty.
pub fn import_bytes(bytes: &[u8], opts: &ImportOptions) -> Result<Imported, ImportError> {
    let ck = checkpoint::Checkpoint::from_bytes(bytes)?;
    let found = invglow::find_parameters(&ck.object)?;
    let form = found.form;
    let mut model = invglow::build_model(&ck, &found, opts.resize, &Device::Cpu)?;
    debug_assert_eq!(model.config().prior, Prior::DiagonalGaussian);
    model.card = ModelCard {
        name: opts.name.clone().unwrap_or_else(|| "imported".into()),
        trained_on: opts.trained_on.clone(),
        created: now_rfc3339(),
        notes: format!(
            "Imported from a checkpoint of the paper authors' PyTorch code (invglow \
             create_glow_model), {}.",
            form.as_str()
        ),
        imported_from: Some(ImportedFrom {
            file: String::new(),
            sha256: hex::encode(Sha256::digest(bytes)),
            form: form.as_str().to_string(),
        }),
        ..ModelCard::default()
    };
    Ok(Imported { model, form })
}

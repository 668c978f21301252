//! Training: the method's recipe (dequantisation noise, translation/flip augmentation, Adamax
//! with coupled weight decay, skipped non-finite steps, data-dependent ActNorm init) on the same
//! model code that scores ([`crate::glow::Glow::scale_log_p`] is the differentiable likelihood),
//! reading data through the pipeline's source and decode stages.
//!
//! - [`data`]: Parquet image datasets, stable splits, seeded shuffled epochs, augmentation.
//! - [`trainer`]: the loop (three modes: from scratch, fine-tune, fine-tune with outlier loss).
//! - [`checkpoint`]: checkpoints and exact resume.
//! - [`optimizer`]: the Adamax optimizer.
//! - [`progress`]: progress bar or JSON lines.

pub mod checkpoint;
pub mod data;
pub mod optimizer;
pub mod progress;
pub mod trainer;

pub use optimizer::{Adamax, AdamaxConfig, StepOutcome};

/// Warm-up steps of a fine-tune when none is given (`glowwatch train --init-from`, retrain).
///
/// Fine-tuning needs one: Adamax's first update moves every parameter by about `lr` in the
/// direction of its gradient's sign, which knocked a trained Fashion-MNIST parent from 3.97 to
/// ~10 bpd within ten steps (it recovered, but lost what it had in common with the general model,
/// which is what the likelihood ratio relies on). 300 linear steps kept it at 3.9-4.0.
pub const FINE_TUNE_WARMUP_STEPS: u64 = 300;

pub use trainer::{OutlierLoss, TrainOptions, TrainReport, Trainer};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Model core error.
    #[error(transparent)]
    Glow(#[from] crate::glow::GlowError),
    /// Data reading error.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A checkpoint could not be written or read.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// The data yields nothing to train on.
    #[error("no data: {0}")]
    NoData(String),
    /// Contradictory training options.
    #[error("training options: {0}")]
    Config(String),
}

/// Result alias of training.
pub type TrainResult<T> = std::result::Result<T, TrainError>;

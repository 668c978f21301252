//! Multi-scale Glow (Kingma & Dhariwal 2018, <https://arxiv.org/abs/1807.03039>) as used for
//! out-of-distribution detection by Schirrmeister et al., NeurIPS 2020
//! (<https://arxiv.org/abs/2006.10848>). `../shared/docs/method.md` is the contract for every number
//! emitted here: channel orders, log-sigmoid coupling scales, per-dimension exit ActNorms and the
//! per-scale decomposition `log p(x) = sum_k lp_k` with `lp_k = F_k + A_k + P_k`.
//!
//! Layout: one file per layer kind ([`squeeze`], [`actnorm`], [`invconv`], [`coupling`], [`exit`]),
//! the trainable multi-scale model in [`flow`], the fused inference fast path in [`scorer`], the
//! fused CPU kernels with hand-written gradients that train and (on the CPU) score in
//! [`fused_train`], model files in [`file`] and pixel preprocessing in [`preprocess`].

pub mod actnorm;
pub mod config;
pub mod coupling;
pub mod exit;
pub mod file;
pub mod flow;
pub mod fused_train;
pub mod init;
pub mod invconv;
pub mod kernels;
pub mod preprocess;
pub mod scorer;
pub mod squeeze;
pub mod torch;

pub use config::{GlowConfig, GlowShape, Prior, ScaleShape};
pub use file::{GlowModel, ModelCard};
pub use flow::{FlowOutput, Glow};
pub use scorer::{GlowScorer, Precision, ScaleScores};

use candle_core::{DType, Tensor};

/// Whether the parameter `name` is fixed when the model is built or imported and never
/// trained: the permutation and signs of the 1x1 convs and the exit priors' mean and log-std.
pub fn is_fixed_param(name: &str) -> bool {
    invconv::FIXED_PARAMS
        .iter()
        .chain(exit::FIXED_PARAMS.iter())
        .any(|f| name.ends_with(&format!(".{f}")))
}

/// ln(2*pi)/2: the per-dimension constant of the standard normal log-density.
pub const HALF_LN_2PI: f64 = 0.918_938_533_204_672_7;

/// Errors of the model core. Every variant says what was wrong and, for files, which file.
#[derive(Debug, thiserror::Error)]
pub enum GlowError {
    /// The configuration is invalid (names the offending key or value).
    #[error("invalid model config: {0}")]
    Config(String),
    /// A model file could not be used; `path` names it and `problem` says why.
    #[error("model file {path}: {problem}")]
    File { path: String, problem: String },
    /// An input does not fit the model (names expected and actual shapes).
    #[error("input: {0}")]
    Input(String),
    /// A tensor operation failed (carries candle's message, which prints shapes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model core.
pub type Result<T> = std::result::Result<T, GlowError>;

/// Sums every dimension but the first, in f64: per-sample likelihood terms are accumulated in
/// double precision so per-scale sums add up to the total exactly (method.md, parity).
pub fn per_sample_sum(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F64)?.flatten_from(1)?.sum(1)
}

/// Numerically stable log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)); never log(sigmoid(x)).
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    let softplus_tail = (neg_abs.exp()? + 1.0)?.log()?;
    x.minimum(0f64)?.sub(&softplus_tail)
}

/// bits/dim of a log-likelihood over `dims` dimensions in the k/256 - 0.5 pixel space.
pub fn bits_per_dim(log_p: f64, dims: usize) -> f64 {
    8.0 - log_p / (dims as f64 * std::f64::consts::LN_2)
}

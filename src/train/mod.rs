//! Training (issue: model lifecycle). So far: the optimizer of the method's recipe. The training
//! loop, data loading, outlier loss and checkpoints build on it and on
//! [`crate::glow::Glow::scale_log_p`], the differentiable channels-last likelihood.

pub mod optimizer;

pub use optimizer::{Adamax, AdamaxConfig, StepOutcome};

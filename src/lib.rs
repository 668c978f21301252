//! glowwatch: out-of-distribution detection for production image feeds with hierarchical
//! Glow likelihoods (Schirrmeister et al., NeurIPS 2020).
//!
//! - [`glow`]: the model (per-scale log-likelihoods, inverse, model files), shared by scoring
//!   and training.
//! - [`device`]: `--device auto|cpu|cuda:N`.
//! - [`bench`]: scoring throughput measurements behind `glowwatch bench`.
//! - [`train`]: training: data, the trainer, checkpoints, the optimizer.
//! - [`pipeline`]: the pipeline's stages (source, decode, score, flag, sink) and the batch
//!   (Parquet) and streaming (Kafka) runners.
//! - [`registry`]: model versions on disk with an atomically moved `current` pointer.
//! - [`retrain`]: scheduled retraining: SQL selection, fine-tune, gates, promotion (feature `sql`).
//! - [`eval`]: AUROC/AUPR/FPR95, calibration and reports.
//! - [`sql`]: SQL over scored data with DataFusion, scoring UDFs (feature `sql`, default).
//! - [`cli`]: the command-line interface (`main.rs` only calls into it).

pub mod bench;
pub mod cli;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod glow;
pub mod pipeline;
pub mod registry;
#[cfg(feature = "sql")]
pub mod retrain;
#[cfg(feature = "sql")]
pub mod sql;
pub mod train;

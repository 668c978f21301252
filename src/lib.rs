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
//! - [`score`]: the anomaly scores (likelihood, ratio, input complexity), their calibrated
//!   thresholds and complexity reference; below both `pipeline` and `eval`.
//! - [`eval`]: AUROC/AUPR/FPR95/TPR at 1 % FPR and reports.
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
pub mod score;
#[cfg(feature = "sql")]
pub mod sql;
pub mod train;

//! The training loop. One loop serves the three modes of the lifecycle:
//! 1. a general model from scratch (ActNorms initialised from the first data);
//! 2. an in-distribution model fine-tuned from a general model (no ActNorm re-init);
//! 3. the same with the method's **outlier loss**, each step also drawing a batch `x_g` of
//!    general images:
//!    `L = mean NLL_in(x_in) + w * mean softplus((log p_in(x_g) - log p_gen(x_g)) / T)`
//!    with the general model frozen (scored by its fused scorer, no gradients).
//!
//! The loss is expressed in bits/dim: both terms are divided by `D ln 2` (the NLL term then
//! reads as the usual training bpd minus the constant 8). `w` and `T` stay in nats as in the
//! method. Everything random in a step (augmentation, dequantisation noise) comes from an RNG
//! seeded by (seed, step), and epoch order from (seed, epoch), so `--resume` replays exactly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, ResumeState, TrainState, ValPoint};
use super::data::{Augment, ImageDataset, PixelBatch, SkippedRows};
use super::optimizer::{Adamax, AdamaxConfig, StepOutcome};
use super::progress::{Progress, RateWindow, TrainEvent};
use super::{TrainError, TrainResult};
use crate::glow::config::GlowConfig;
use crate::glow::fused_train::{Backprop, loss_and_gradients};
use crate::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use crate::glow::{GlowModel, GlowScorer, bits_per_dim, log_sigmoid};

/// Weight and temperature of the outlier loss (nats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OutlierLoss {
    /// `w`: weight of the outlier term.
    pub weight: f64,
    /// `T`: temperature dividing `log p_in(x_g) - log p_gen(x_g)`.
    pub temperature: f64,
}

impl OutlierLoss {
    /// Defaults for 1024-dim grey images. The paper's w=6000, T=1000 (3072-dim RGB) pushed
    /// general images ~60 bpd down and cost 1.2 bpd in-distribution on 1024-dim data (see
    /// `../shared/datasets/README.md`). A Fashion-MNIST model fine-tuned from our general model
    /// already puts general images ~280 nats below the general model, where T=100 would have
    /// saturated the term (weight sigmoid(-2.8) = 0.06); T=300 keeps pushing there (0.28) and
    /// stops near -1000 nats (~1.4 bpd at D=1024); w/T = 1 weighs the initial push like the
    /// NLL term.
    pub fn grey_default() -> Self {
        Self {
            weight: 300.0,
            temperature: 300.0,
        }
    }

    /// The outlier term in bits/dim, `w * mean softplus((lp_in - lp_gen) / T) * to_bpd`, from
    /// per-image log-likelihoods (N) of the general batch under the trained model (`lp_in`,
    /// differentiable) and the frozen general model (`lp_gen`); `to_bpd = 1 / (D ln 2)`.
    pub fn term(
        &self,
        lp_in: &Tensor,
        lp_gen: &Tensor,
        to_bpd: f64,
    ) -> candle_core::Result<Tensor> {
        let delta = ((lp_in - lp_gen)? / self.temperature)?;
        // softplus(d) = -log_sigmoid(-d), stable for large |d|.
        let sp = log_sigmoid(&delta.neg()?)?.neg()?;
        sp.mean(0)? * (self.weight * to_bpd)
    }
}

/// The NLL term in bits/dim, `8 - mean_n(sum_k lp_nk) * to_bpd` (the usual training bpd minus
/// the constant 8, see the module docs), from per-scale log-likelihoods `lp` (N, L) in nats;
/// `to_bpd = 1 / (D ln 2)`.
pub fn mean_nll_bpd(lp: &Tensor, to_bpd: f64) -> candle_core::Result<Tensor> {
    (lp.sum(1)?.mean(0)? * -to_bpd)? + 8.0
}

/// Options of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Epochs over the training data.
    pub epochs: u64,
    /// Stop after this many steps in all (over resumes).
    pub max_steps: Option<u64>,
    /// Stop this run after this much wall time (seconds); a checkpoint is written.
    pub max_time_s: Option<f64>,
    /// Images per step.
    pub batch: usize,
    /// Seed of epoch order, augmentation and noise.
    pub seed: u64,
    /// Adamax settings.
    pub optimizer: AdamaxConfig,
    /// Augmentation of in-distribution images.
    pub augment: Augment,
    /// Initialise ActNorms from data before the first step (models trained from scratch).
    pub init_actnorm: bool,
    /// Images used for the data-dependent ActNorm initialisation.
    pub init_rows: usize,
    /// Rows held in the shuffle buffer.
    pub shuffle_rows: usize,
    /// Write a checkpoint every this many steps (0: only at epoch ends and at the end).
    pub checkpoint_every: u64,
    /// Report progress every this many steps.
    pub log_every: u64,
    /// Validate every this many steps as well as at epoch ends (0: epoch ends only).
    pub val_every: u64,
    /// The outlier loss, when fine-tuning with it.
    pub outlier: Option<OutlierLoss>,
    /// Fine-tuning only: keep the first this many scales (their flow steps and exit ActNorm)
    /// at the parent's values. With the parent the general model, the frozen scales give both
    /// models identical per-scale log-likelihoods there, so those scales drop out of the
    /// likelihood ratio, which then compares only the coarser scales. 0 (the default): train
    /// everything, as method.md describes.
    #[serde(default)]
    pub freeze_scales: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            max_time_s: None,
            batch: 64,
            seed: 0,
            optimizer: AdamaxConfig::default(),
            augment: Augment {
                translate: 0.1,
                flip: false,
            },
            init_actnorm: true,
            init_rows: 512,
            shuffle_rows: 32_768,
            checkpoint_every: 1000,
            log_every: 10,
            val_every: 0,
            outlier: None,
            freeze_scales: 0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Steps taken in all (over resumes), applied and skipped.
    pub steps: u64,
    /// Steps skipped for non-finite gradients.
    pub skipped_steps: u64,
    /// In-distribution images trained on (over resumes).
    pub images_seen: u64,
    /// Wall time in seconds (over resumes).
    pub wall_s: f64,
    /// Last held-out bits/dim.
    pub final_val_bpd: Option<f64>,
    /// Held-out bits/dim history.
    pub history: Vec<ValPoint>,
    /// Rows that could not be decoded (first epoch read in this run).
    pub skipped_rows: SkippedRowsReport,
    /// Why the run ended: `finished`, `max_steps`, `max_time` or `interrupted`.
    pub ended: String,
    /// The last loop state (for checkpoints).
    #[serde(skip)]
    pub state: TrainState,
}

/// Undecodable rows, for reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SkippedRowsReport {
    /// Count.
    pub total: u64,
    /// Count per reason.
    pub by_reason: std::collections::BTreeMap<String, u64>,
    /// First ids.
    pub ids: Vec<String>,
}

impl From<&SkippedRows> for SkippedRowsReport {
    fn from(s: &SkippedRows) -> Self {
        Self {
            total: s.total(),
            by_reason: s
                .by_reason
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            ids: s.ids.clone(),
        }
    }
}

/// The general model and data of the outlier loss.
pub struct OutlierSetup<'a> {
    /// General images (`x_g`).
    pub data: &'a ImageDataset,
    /// The frozen general model.
    pub general: &'a GlowScorer,
    /// Weight and temperature.
    pub loss: OutlierLoss,
}

/// A training job: the model to train, its data and options, and where checkpoints go.
pub struct Trainer<'a> {
    /// The model being trained (on its device).
    pub model: &'a GlowModel,
    /// Training images.
    pub data: &'a ImageDataset,
    /// Held-out images for validation bits/dim.
    pub val: &'a PixelBatch,
    /// Outlier-loss setup, if any.
    pub outlier: Option<OutlierSetup<'a>>,
    /// Options.
    pub options: TrainOptions,
    /// Checkpoint directory, if any.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// The job description stored in checkpoints (so a resume needs no flags).
    pub job: serde_json::Value,
}

fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ step.wrapping_add(1))
}

/// Model inputs with dequantisation noise U[0, 1/256) per value from `rng`.
fn noisy_input(px: &[u8], cfg: &GlowConfig, rng: &mut StdRng, dev: &Device) -> TrainResult<Tensor> {
    let v: Vec<f32> = px
        .iter()
        .map(|&k| (k as f64 / 256.0 - 0.5 + rng.random::<f64>() / 256.0) as f32)
        .collect();
    let n = px.len() / cfg.dims();
    Ok(Tensor::from_vec(
        v,
        (n, cfg.in_channels, cfg.image_size, cfg.image_size),
        dev,
    )?)
}

/// Mean held-out bits/dim through the fused scorer (bin-centre dequantisation) and the
/// number of images whose likelihood was not finite (left out of the mean).
pub fn validation_bpd(model: &GlowModel, val: &PixelBatch) -> TrainResult<(f64, usize)> {
    let cfg = model.config();
    let scorer = model.scorer(model.device(), DType::F32)?;
    let (mut sum, mut n, mut bad) = (0.0, 0usize, 0usize);
    for chunk in val.pixels.chunks(256 * cfg.dims()) {
        let x = pixels_to_tensor(chunk, cfg, BIN_CENTRE, model.device())?;
        for lp in scorer.score(&x)?.log_p {
            if lp.is_finite() {
                sum += bits_per_dim(lp, cfg.dims());
                n += 1;
            } else {
                bad += 1;
            }
        }
    }
    Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, bad))
}

impl Trainer<'_> {
    fn steps_per_epoch(&self) -> u64 {
        (self.data.total_rows() / self.options.batch as u64).max(1)
    }

    /// Runs (or, given a checkpoint, resumes) training until the epochs are done, a limit is
    /// hit or `stop` is set (Ctrl-C); writes a checkpoint at every stop, finished or not.
    pub fn run(
        &self,
        resume: Option<ResumeState>,
        stop: &AtomicBool,
        progress: &Progress,
    ) -> TrainResult<TrainReport> {
        let o = &self.options;
        let cfg = self.model.config().clone();
        let dev = self.model.device().clone();
        let dims = cfg.dims() as f64;
        let to_bpd = 1.0 / (dims * std::f64::consts::LN_2);
        if o.freeze_scales > 0 && (o.init_actnorm || o.freeze_scales >= cfg.scales) {
            return Err(TrainError::Config(format!(
                "freeze_scales = {} needs a fine-tune (no ActNorm initialisation) of a model with more \
                 scales ({} here)",
                o.freeze_scales, cfg.scales
            )));
        }
        let vars: Vec<_> = checkpoint::optimised_vars(self.model, o.freeze_scales)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let mut opt = Adamax::new(vars, o.optimizer.clone())?;
        let backprop = Backprop::auto(&self.model.glow, &dev);
        let mut tapes = Vec::new();
        let mut state = TrainState::default();
        if let Some(ck) = resume {
            opt.restore(ck.m, ck.u, ck.opt_steps, ck.opt_skipped)?;
            state = ck.state;
        } else if o.init_actnorm {
            let mut skipped = SkippedRows::default();
            let mut reader = self
                .data
                .epoch(o.seed, u64::MAX, o.init_rows, o.shuffle_rows);
            let first = match reader.next() {
                Some(b) => b?,
                None => self.data.read_head(o.init_rows, &mut skipped)?,
            };
            if first.is_empty() {
                return Err(TrainError::NoData(format!(
                    "{} has no decodable rows",
                    self.data.describe()
                )));
            }
            let mut rng = step_rng(o.seed, u64::MAX);
            let x = noisy_input(&first.pixels, &cfg, &mut rng, &dev)?;
            self.model.init_from_data(&x)?;
        }
        let total_steps = o
            .max_steps
            .unwrap_or(u64::MAX)
            .min(o.epochs * self.steps_per_epoch());
        let started = Instant::now();
        let base_elapsed = state.elapsed_s;
        // Training time of the whole run: this process's plus that of the runs it resumes.
        let run_elapsed = move || base_elapsed + started.elapsed().as_secs_f64();
        let deadline = o.max_time_s.map(|s| started + Duration::from_secs_f64(s));
        let mut recent: Vec<(f64, Option<f64>)> = Vec::new();
        let mut window = RateWindow::starting_at(state.step);
        let mut skipped_rows: Option<SkippedRows> = None;
        let mut ended = "finished".to_string();
        let mut last_val = state.history.last().map(|v| v.val_bpd);

        // The general-data stream of the outlier loss, positioned where the state says.
        let mut greader = self.outlier.as_ref().map(|s| {
            let mut r = s
                .data
                .epoch(o.seed ^ 0x0ff, state.outlier_epoch, o.batch, o.shuffle_rows);
            for _ in 0..state.outlier_batch {
                if r.next().is_none() {
                    break;
                }
            }
            r
        });

        let validate = |state: &mut TrainState, last: &mut Option<f64>| -> TrainResult<()> {
            if self.val.is_empty() {
                return Ok(());
            }
            let (bpd, bad) = validation_bpd(self.model, self.val)?;
            state.history.push(ValPoint {
                step: state.step,
                epoch: state.epoch,
                val_bpd: bpd,
            });
            *last = Some(bpd);
            progress.report(&TrainEvent::Validation {
                epoch: state.epoch,
                step: state.step,
                val_bpd: bpd,
                non_finite: bad,
            });
            Ok(())
        };
        let checkpoint = |state: &mut TrainState, opt: &Adamax| -> TrainResult<()> {
            state.elapsed_s = run_elapsed();
            if let Some(dir) = &self.checkpoint_dir {
                let p = checkpoint::save(dir, self.model, opt, o.freeze_scales, state, &self.job)?;
                progress.report(&TrainEvent::Checkpoint {
                    step: state.step,
                    path: p.display().to_string(),
                });
            }
            Ok(())
        };

        'epochs: while state.epoch < o.epochs {
            let mut reader = self
                .data
                .epoch(o.seed, state.epoch, o.batch, o.shuffle_rows);
            let mut b = 0u64;
            loop {
                let Some(batch) = reader.next() else { break };
                let batch = batch?;
                b += 1;
                if b <= state.batch_in_epoch {
                    continue; // replaying a resumed epoch
                }
                if o.max_steps.is_some_and(|m| state.step >= m) {
                    ended = "max_steps".into();
                    break 'epochs;
                }
                if stop.load(Ordering::SeqCst) {
                    ended = "interrupted".into();
                    break 'epochs;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    ended = "max_time".into();
                    break 'epochs;
                }
                let mut rng = step_rng(o.seed, state.step);
                let mut px = batch.pixels;
                o.augment
                    .apply(&mut px, cfg.in_channels, cfg.image_size, &mut rng);
                let x = noisy_input(&px, &cfg, &mut rng, &dev)?;
                let mut outlier_batch = None;
                if let (Some(setup), Some(gr)) = (&self.outlier, greader.as_mut()) {
                    let gb = match gr.next() {
                        Some(b) => b?,
                        None => {
                            state.outlier_epoch += 1;
                            state.outlier_batch = 0;
                            *gr = setup.data.epoch(
                                o.seed ^ 0x0ff,
                                state.outlier_epoch,
                                o.batch,
                                o.shuffle_rows,
                            );
                            gr.next().ok_or_else(|| {
                                TrainError::NoData("general data has no full batch".into())
                            })??
                        }
                    };
                    state.outlier_batch += 1;
                    let mut gpx = gb.pixels;
                    o.augment
                        .apply(&mut gpx, cfg.in_channels, cfg.image_size, &mut rng);
                    let xg = noisy_input(&gpx, &cfg, &mut rng, &dev)?;
                    let lp_gen = setup
                        .general
                        .forward(&xg.to_device(setup.general.device())?)?
                        .sum(1)?
                        .to_device(&dev)?
                        .detach();
                    outlier_batch = Some((xg, lp_gen, setup.loss));
                }
                let mut inputs = vec![&x];
                inputs.extend(outlier_batch.as_ref().map(|(xg, _, _)| xg));
                let (mut nll, mut outlier_term) = (None, None);
                let (_, grads) =
                    loss_and_gradients(&self.model.glow, backprop, &inputs, &mut tapes, |lps| {
                        let n = mean_nll_bpd(&lps[0], to_bpd)?;
                        let mut loss = n.clone();
                        nll = Some(n);
                        if let Some((_, lp_gen, ol)) = &outlier_batch {
                            let term = ol.term(&lps[1].sum(1)?, lp_gen, to_bpd)?;
                            outlier_term = Some(term.to_scalar::<f64>()?);
                            loss = (loss + term)?;
                        }
                        Ok(loss)
                    })?;
                let nll = nll.expect("the loss closure ran");
                let outcome = opt.step(&grads)?;
                state.step += 1;
                state.batch_in_epoch = b;
                state.images_seen += o.batch as u64;
                if outcome == StepOutcome::Applied {
                    recent.push((nll.to_scalar::<f64>()?, outlier_term));
                }
                if state.step.is_multiple_of(o.log_every.max(1)) {
                    let k = recent.len().max(1) as f64;
                    let bpd = recent.iter().map(|r| r.0).sum::<f64>() / k;
                    let out =
                        outlier_term.map(|_| recent.iter().filter_map(|r| r.1).sum::<f64>() / k);
                    recent.clear();
                    let now = Instant::now();
                    let ips;
                    (ips, window) = window.close(state.step, o.batch, now);
                    let rem = total_steps.saturating_sub(state.step) as f64;
                    let mut eta_s = rem * o.batch as f64 / ips.max(1e-9);
                    if let Some(d) = deadline {
                        eta_s = eta_s.min(d.saturating_duration_since(now).as_secs_f64());
                    }
                    progress.report(&TrainEvent::Step {
                        epoch: state.epoch,
                        step: state.step,
                        total_steps,
                        bpd,
                        outlier: out,
                        images_per_s: ips,
                        eta_s,
                        elapsed_s: run_elapsed(),
                        skipped_steps: opt.skipped(),
                    });
                }
                if o.val_every > 0 && state.step.is_multiple_of(o.val_every) {
                    validate(&mut state, &mut last_val)?;
                }
                if o.checkpoint_every > 0 && state.step.is_multiple_of(o.checkpoint_every) {
                    checkpoint(&mut state, &opt)?;
                }
            }
            if skipped_rows.is_none() {
                skipped_rows = Some(reader.skipped().clone());
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
            validate(&mut state, &mut last_val)?;
            if state.epoch < o.epochs {
                checkpoint(&mut state, &opt)?;
            }
        }
        if state.images_seen == 0 && state.step == 0 && ended == "finished" {
            return Err(TrainError::NoData(format!(
                "{} yields no full batch of {} decodable rows",
                self.data.describe(),
                o.batch
            )));
        }
        if ended != "finished"
            && (last_val.is_none() || state.history.last().is_some_and(|v| v.step != state.step))
        {
            validate(&mut state, &mut last_val)?;
        }
        // Also after a finished run: `--resume --epochs N` extends it.
        checkpoint(&mut state, &opt)?;
        state.elapsed_s = run_elapsed();
        progress.report(&TrainEvent::Done {
            step: state.step,
            reason: ended.clone(),
        });
        Ok(TrainReport {
            steps: state.step,
            skipped_steps: opt.skipped(),
            images_seen: state.images_seen,
            wall_s: state.elapsed_s,
            final_val_bpd: last_val,
            history: state.history.clone(),
            skipped_rows: skipped_rows
                .as_ref()
                .map(SkippedRowsReport::from)
                .unwrap_or_default(),
            ended,
            state,
        })
    }
}

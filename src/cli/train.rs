//! `glowwatch train`: train a general model from scratch, fine-tune an in-distribution model
//! from it, or fine-tune with the outlier loss (see [`crate::train::trainer`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::Args;
use serde::{Deserialize, Serialize};

use super::bench::named_config;
use crate::device::DeviceSpec;
use crate::glow::GlowModel;
use crate::glow::file::now_rfc3339;
use crate::train::FINE_TUNE_WARMUP_STEPS;
use crate::train::checkpoint;
use crate::train::data::{Augment, ImageDataset, SkippedRows, Split};
use crate::train::progress::Progress;
use crate::train::trainer::OutlierSetup;
use crate::train::{AdamaxConfig, OutlierLoss, TrainOptions, Trainer};

/// Arguments of `glowwatch train` (also stored in checkpoints, so `--resume` needs no others).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Training data: Parquet files or directories with an image column.
    #[arg(long, required_unless_present = "resume", num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Validation data (Parquet). Without it, --val-fraction of the training rows (by id
    /// hash) is held out.
    #[arg(long, num_args = 1..)]
    pub val: Vec<PathBuf>,
    /// Fraction of training rows held out for validation when --val is not given.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Validation images used (the first ones, in file order).
    #[arg(long, default_value_t = 2000)]
    pub val_max: usize,
    /// Output model file (.safetensors).
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Architecture for a new model: `small`, `paper1`, ... or a config file. Ignored with
    /// --init-from (the parent's config is used).
    #[arg(long, default_value = "small")]
    pub config: String,
    /// Fine-tune from this model (no ActNorm re-initialisation).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Frozen general model of the outlier loss (enables it, with --outlier-data).
    #[arg(long, requires = "outlier_data")]
    pub general_model: Option<PathBuf>,
    /// General images for the outlier loss (Parquet).
    #[arg(long, num_args = 1.., requires = "general_model")]
    pub outlier_data: Vec<PathBuf>,
    /// Outlier-loss weight w (nats; default for 1024-dim grey images).
    #[arg(long, default_value_t = OutlierLoss::grey_default().weight)]
    pub outlier_weight: f64,
    /// Outlier-loss temperature T (nats).
    #[arg(long, default_value_t = OutlierLoss::grey_default().temperature)]
    pub outlier_temperature: f64,
    /// Fine-tuning: keep the first N scales at the parent's values, so that with a general
    /// parent those scales cancel in the likelihood ratio (0: train every scale, the method's
    /// default).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub freeze_scales: usize,
    /// Epochs [default: 1]. With --resume, raises the stored count to extend a run.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop this run after this long (e.g. 45m, counted from launch); the model and a checkpoint are
    /// written.
    #[arg(long)]
    #[serde(skip)]
    pub max_time: Option<humantime::Duration>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Coupled weight decay.
    #[arg(long, default_value_t = 5e-5)]
    pub weight_decay: f64,
    /// Linear learning-rate warm-up steps [default: 300 with --init-from, else 0].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest random translation as a fraction of the side.
    #[arg(long, default_value_t = 0.1)]
    pub translate: f64,
    /// Random horizontal flips (natural images).
    #[arg(long)]
    pub flip: bool,
    /// Checkpoint directory (default: `<out>.ckpt/`).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Validate every this many steps as well as at epoch ends (0: epoch ends only).
    #[arg(long, default_value_t = 0)]
    pub val_every: u64,
    /// Report progress every this many steps.
    #[arg(long, default_value_t = 10)]
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Resume from a checkpoint directory (continues exactly; other flags come from it, except
    /// --max-time, --max-steps and --epochs).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Where the images are.
    #[command(flatten)]
    #[serde(flatten)]
    pub image: super::ImageArgs,
    /// Id column (ids in reports; `file#row` when absent).
    #[arg(long, default_value = "id")]
    pub id_column: String,
    /// Model name for the card.
    #[arg(long)]
    pub name: Option<String>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    #[serde(skip, default)]
    pub device: DeviceSpec,
    /// Also write the final report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn default_log_every() -> u64 {
    10
}

/// Runs `glowwatch train`.
pub fn run(mut a: TrainArgs) -> Result<()> {
    // --max-time counts from here: opening data and decoding the validation set are part of it.
    let launched = std::time::Instant::now();
    let device = a.device.open().map_err(anyhow::Error::msg)?;
    let resume = match &a.resume {
        Some(dir) => {
            let ck = checkpoint::load(dir, &device)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            let mut stored: TrainArgs =
                serde_json::from_value(ck.job.clone()).context("checkpoint job description")?;
            stored.max_time = a.max_time;
            stored.max_steps = a.max_steps.or(stored.max_steps);
            stored.epochs = a.epochs.or(stored.epochs);
            stored.resume = a.resume.clone();
            stored.device = a.device;
            a = stored;
            Some(ck)
        }
        None => None,
    };
    let out = a.out.clone().context("--out is required")?;
    let ckpt_dir = a
        .checkpoint_dir
        .clone()
        .unwrap_or_else(|| out.with_extension("ckpt"));

    let (mut model, resume) = match resume {
        Some(ck) => (ck.model, Some(ck.resume)),
        None => match &a.init_from {
            Some(p) => {
                let m = GlowModel::load(p, &device)?;
                let parent = m.model_id()?;
                let mut m = m;
                m.card = crate::glow::ModelCard {
                    parent: Some(parent),
                    ..Default::default()
                };
                (m, None)
            }
            None => (
                GlowModel::new_random(&named_config(&a.config)?, a.seed, &device)?,
                None,
            ),
        },
    };
    let parent = model.card.parent.clone();
    let cfg = model.config().clone();

    let split_train = if a.val.is_empty() {
        Split::Train(a.val_fraction)
    } else {
        Split::All
    };
    let data = ImageDataset::open_columns(&a.data, &a.image.columns(), &a.id_column, &cfg)?
        .with_split(split_train);
    let val_set = if a.val.is_empty() {
        ImageDataset::open_columns(&a.data, &a.image.columns(), &a.id_column, &cfg)?
            .with_split(Split::Holdout(a.val_fraction))
    } else {
        ImageDataset::open_columns(&a.val, &a.image.columns(), &a.id_column, &cfg)?
    };
    let val = val_set.read_head(a.val_max, &mut SkippedRows::default())?;

    let general = match &a.general_model {
        Some(p) => {
            let g = GlowModel::load(p, &device)?;
            if g.config().dims() != cfg.dims() {
                bail!(
                    "general model {} takes {} dims, the model being trained {}",
                    p.display(),
                    g.config().dims(),
                    cfg.dims()
                );
            }
            Some(g.scorer(&device, DType::F32)?)
        }
        None => None,
    };
    let outlier_data = match &general {
        Some(_) => Some(ImageDataset::open_columns(
            &a.outlier_data,
            &a.image.columns(),
            &a.id_column,
            &cfg,
        )?),
        None => None,
    };
    let outlier_loss = OutlierLoss {
        weight: a.outlier_weight,
        temperature: a.outlier_temperature,
    };
    let options = TrainOptions {
        epochs: a.epochs.unwrap_or(1),
        max_steps: a.max_steps,
        max_time_s: a
            .max_time
            .map(|d| (d.as_secs_f64() - launched.elapsed().as_secs_f64()).max(0.0)),
        batch: a.batch,
        seed: a.seed,
        optimizer: AdamaxConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            warmup_steps: warmup_steps(a.warmup, a.init_from.is_some()),
            ..Default::default()
        },
        augment: Augment {
            translate: a.translate,
            flip: a.flip,
        },
        init_actnorm: a.init_from.is_none(),
        checkpoint_every: a.checkpoint_every,
        val_every: a.val_every,
        log_every: a.log_every,
        outlier: general.as_ref().map(|_| outlier_loss),
        freeze_scales: a.freeze_scales,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C kills the process the usual way.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "interrupt: finishing the step and writing a checkpoint (Ctrl-C again to abort)"
            );
        });
    }
    let trainer = Trainer {
        model: &model,
        data: &data,
        val: &val,
        outlier: match (&general, &outlier_data) {
            (Some(g), Some(d)) => Some(OutlierSetup {
                data: d,
                general: g,
                loss: outlier_loss,
            }),
            _ => None,
        },
        options: options.clone(),
        checkpoint_dir: Some(ckpt_dir.clone()),
        job: serde_json::to_value(&a)?,
    };
    let total = options
        .max_steps
        .unwrap_or(u64::MAX)
        .min(options.epochs * (data.total_rows() / options.batch as u64).max(1));
    let progress = Progress::auto(total);
    let report = trainer.run(resume, &stop, &progress)?;

    let summary = serde_json::json!({
        "model": out.display().to_string(),
        "report": &report,
        "options": &options,
        "val_rows": val.len(),
    });
    // A budget (--max-steps, --max-time) ends a run as planned: the model is written. Only an
    // interrupted run leaves just its checkpoint.
    if report.ended != "interrupted" {
        model.card = crate::glow::ModelCard {
            name: a.name.clone().unwrap_or_else(|| {
                out.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            trained_on: data.describe(),
            created: now_rfc3339(),
            train_steps: report.steps,
            final_bpd: report.final_val_bpd,
            parent,
            notes: serde_json::to_string(&serde_json::json!({
                "options": &options,
                "wall_s": report.wall_s,
                "images_seen": report.images_seen,
                "skipped_steps": report.skipped_steps,
                "skipped_rows": report.skipped_rows.total,
                "val": if a.val.is_empty() { format!("{} held out of the training files", a.val_fraction) } else { val_set.describe() },
            }))?,
            detection: None,
            imported_from: None,
        };
        let id = model.save(&out)?;
        println!(
            "trained {} ({id}): {} steps, {:.0} s, validation bpd {}",
            out.display(),
            report.steps,
            report.wall_s,
            report
                .final_val_bpd
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into())
        );
    } else {
        println!(
            "stopped ({}) after {} steps; resume with: glowwatch train --resume {}",
            report.ended,
            report.steps,
            ckpt_dir.display()
        );
    }
    if report.skipped_rows.total > 0 {
        eprintln!(
            "skipped {} undecodable rows ({:?}); first ids: {}",
            report.skipped_rows.total,
            report.skipped_rows.by_reason,
            report
                .skipped_rows
                .ids
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(p) = &a.report {
        crate::fsutil::write_atomic(p, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    Ok(())
}

/// `--warmup` as given, else [`FINE_TUNE_WARMUP_STEPS`] when fine-tuning and 0 from scratch.
pub fn warmup_steps(given: Option<u64>, fine_tuning: bool) -> u64 {
    given.unwrap_or(if fine_tuning {
        FINE_TUNE_WARMUP_STEPS
    } else {
        0
    })
}

#[cfg(test)]
mod warmup_tests {
    use super::*;

    #[test]
    fn fine_tuning_defaults_to_a_warmup_and_an_explicit_value_wins() {
        assert_eq!(warmup_steps(None, true), FINE_TUNE_WARMUP_STEPS);
        assert_eq!(warmup_steps(None, false), 0);
        assert_eq!(warmup_steps(Some(0), true), 0);
        assert_eq!(warmup_steps(Some(7), false), 7);
    }
}

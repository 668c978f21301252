//! `glowwatch calibrate`: the threshold of a score at a target false-positive rate, from
//! in-distribution validation images only, stored beside the model.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;

use super::eval::{load_scorer, named_path, score_set};
use crate::device::DeviceSpec;
use crate::eval::calibration::{Calibration, calibrate};
use crate::pipeline::score::ScoreKind;
use crate::train::data::Split;

/// Arguments of `glowwatch calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// In-distribution model file.
    #[arg(long)]
    pub model: PathBuf,
    /// General model file (needed for llr scores).
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// In-distribution validation images (Parquet); no anomalies needed.
    #[arg(long)]
    pub data: PathBuf,
    /// Scores to calibrate: nll, scale_K, last_scale, llr, llr_scale_K.
    #[arg(long, num_args = 1.., default_value = "llr")]
    pub score: Vec<ScoreKind>,
    /// Target false-positive rate.
    #[arg(long, default_value_t = 0.01)]
    pub fpr: f64,
    /// Use only the rows `glowwatch train --val-fraction F` held out of the same file (rows
    /// the model never trained on).
    #[arg(long)]
    pub holdout: Option<f64>,
    /// Use at most this many images.
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Calibration file to write or update (default: `<model>.calibration.json`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the images are.
    #[command(flatten)]
    pub image: super::ImageArgs,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

/// Runs `glowwatch calibrate`.
pub fn run(a: CalibrateArgs) -> Result<()> {
    ensure!(
        a.fpr > 0.0 && a.fpr < 1.0,
        "--fpr must be between 0 and 1, got {}",
        a.fpr
    );
    let scorer = load_scorer(
        &a.model,
        a.general.as_deref(),
        &a.device,
        crate::bench::Precision::F32,
        256,
    )?;
    for s in &a.score {
        ensure!(
            !s.needs_general() || a.general.is_some(),
            "score {s} needs --general"
        );
    }
    let (name, _) = named_path(&a.data.display().to_string());
    let split = a.holdout.map(Split::Holdout).unwrap_or(Split::All);
    let set = score_set(
        &scorer,
        &name,
        &a.data,
        &a.image.columns(),
        a.max_rows,
        split,
    )?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| Calibration::path_for_model(&a.model));
    // Keep other scores' thresholds when the file belongs to the same models.
    let mut cal = match Calibration::load(&out) {
        Ok(c)
            if c.in_model == scorer.in_model_id()
                && (c.general_model.is_none()
                    || c.general_model.as_deref() == scorer.general_model_id()) =>
        {
            c
        }
        _ => Calibration::default(),
    };
    cal.in_model = scorer.in_model_id().to_string();
    if a.score.iter().any(|s| s.needs_general()) || cal.general_model.is_some() {
        cal.general_model = scorer.general_model_id().map(String::from);
    }
    let desc = format!(
        "{}{} ({} images)",
        a.data.display(),
        a.holdout
            .map(|f| format!(", rows held out by --val-fraction {f}"))
            .unwrap_or_default(),
        set.scores.len()
    );
    for &s in &a.score {
        let t = calibrate(&set.values(s), a.fpr, &desc);
        println!(
            "{s}: threshold {:.4} at target FPR {:.2}% -> expected flag rate {:.2}% (95% CI {:.2}-{:.2}%), {} images, {} non-finite",
            t.threshold,
            100.0 * a.fpr,
            100.0 * t.expected_flag_rate,
            100.0 * t.flag_rate_ci95.0,
            100.0 * t.flag_rate_ci95.1,
            t.n,
            t.non_finite
        );
        cal.thresholds.insert(s, t);
    }
    cal.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}

//! `glowwatch calibrate`: the threshold of a score at a target false-positive rate, from
//! in-distribution validation images only, stored beside the model.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, ensure};
use clap::Args;

use super::eval::{load_scorer, named_path, score_set};
use crate::device::DeviceSpec;
use crate::pipeline::score::ModelScorer;
use crate::score::calibration::{Calibration, calibrate};
use crate::score::{ComplexityReference, ScoreKind};
use crate::train::data::{ImageDataset, SkippedRows, Split};

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
    /// Scores to calibrate: nll, scale_K, last_scale, llr, llr_scale_K, complexity,
    /// complexity_<codec>, complexity_cond, combined.
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
    /// In-distribution images of the complexity reference (`complexity_cond`, `combined`).
    /// Default: the rows of `--data` outside the `--holdout` fraction (rows the thresholds
    /// are not calibrated on). Without `--holdout` or this option no reference is built.
    #[arg(long)]
    pub reference_data: Option<PathBuf>,
    /// Reference rows to use (the first ones); 0 builds no reference.
    #[arg(long, default_value_t = 5000)]
    pub reference_rows: usize,
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
    let mut scorer = load_scorer(
        &a.model,
        a.general.as_deref(),
        &a.device,
        crate::glow::Precision::F32,
        256,
    )?;
    for s in &a.score {
        ensure!(
            !s.needs_general() || a.general.is_some(),
            "score {s} needs --general"
        );
    }
    scorer.set_compressors(
        &a.score
            .iter()
            .filter_map(|s| s.compressor())
            .collect::<Vec<_>>(),
    );
    let reference = build_reference(&a, &scorer)?;
    if reference.is_none()
        && let Some(s) = a.score.iter().find(|s| s.needs_reference())
    {
        anyhow::bail!(
            "score {s} needs a complexity reference: give --holdout F (the reference comes from the other rows of --data) or --reference-data, and --reference-rows > 20"
        );
    }
    scorer.set_reference(reference.clone().map(Arc::new))?;
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
    let general_reference = reference.as_ref().is_some_and(|r| r.llr.is_some());
    if a.score.iter().any(|s| s.needs_general()) || cal.general_model.is_some() || general_reference
    {
        cal.general_model = scorer.general_model_id().map(String::from);
    }
    if reference.is_some() {
        // Thresholds of reference scores belong to the reference they were calibrated with.
        cal.thresholds.retain(|k, _| !k.needs_reference());
        cal.reference = reference;
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

/// The complexity reference of `--reference-data`, or of the rows of `--data` outside the
/// holdout; `None` when neither applies, `--reference-rows` is 0, or (with a note) there are
/// too few rows and no reference score was asked for.
fn build_reference(a: &CalibrateArgs, scorer: &ModelScorer) -> Result<Option<ComplexityReference>> {
    let (path, split) = match (&a.reference_data, a.holdout) {
        _ if a.reference_rows == 0 => return Ok(None),
        (Some(p), _) => (p, Split::All),
        (None, Some(f)) => (&a.data, Split::Train(f)),
        (None, None) => return Ok(None),
    };
    let data = ImageDataset::open_columns(
        std::slice::from_ref(path),
        &a.image.columns(),
        "id",
        scorer.config(),
    )?
    .with_split(split);
    let mut skipped = SkippedRows::default();
    let batch = data.read_head(a.reference_rows, &mut skipped)?;
    let desc = format!(
        "{}{} ({} images)",
        path.display(),
        match split {
            Split::Train(f) => format!(", rows outside the --holdout {f} fraction"),
            _ => String::new(),
        },
        batch.len()
    );
    let wanted = a.score.iter().any(|s| s.needs_reference());
    match scorer.build_reference(&batch.pixels, &desc) {
        Ok(r) => {
            println!(
                "complexity reference: {} rows, k = {}, {}x{} layout grid, S_cond median {:.1} bits, spread to q99 {:.1} bits",
                r.len(),
                r.k,
                r.grid,
                r.grid,
                r.complexity_cond.median,
                r.complexity_cond.scale
            );
            Ok(Some(r))
        }
        Err(e) if !wanted => {
            eprintln!("note: no complexity reference ({e})");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

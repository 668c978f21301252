//! `glowwatch eval`: AUROC / AUPR / FPR95 of every score, in-distribution test set vs one or
//! more OOD sets; table on stdout, `eval.json` and `report.html` in the output directory.

use std::path::{Path, PathBuf};

use crate::glow::Precision;
use anyhow::{Context, Result};
use clap::Args;

use std::sync::Arc;

use crate::device::DeviceSpec;
use crate::eval::{EvalReport, ScoredSet, report};
use crate::pipeline::decode::ImageColumns;
use crate::pipeline::score::ModelScorer;
use crate::score::Compressor;
use crate::score::calibration::Calibration;
use crate::train::data::{ImageDataset, SkippedRows, Split};

/// Arguments of `glowwatch eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// In-distribution model file.
    #[arg(long)]
    pub model: PathBuf,
    /// General model file (enables the likelihood-ratio scores).
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// In-distribution test images (Parquet): the negatives.
    #[arg(long)]
    pub in_data: PathBuf,
    /// OOD images (Parquet), as `name=path` or `path` (name = file stem); repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub ood: Vec<String>,
    /// Use at most this many images of each set (the first ones).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Output directory for eval.json and report.html.
    #[arg(long, default_value = "eval-out")]
    pub out_dir: PathBuf,
    /// Where the images are.
    #[command(flatten)]
    pub image: super::ImageArgs,
    /// Scoring batch size.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// f32, tf32 (CUDA), bf16 or bf16-all.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Calibration file whose thresholds (recall at the calibrated threshold) and complexity
    /// reference (the `complexity_cond` and `combined` scores) to use. Default:
    /// `<model>.calibration.json` when it exists and belongs to these models.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
}

/// A `name=path` or `path` argument.
pub(super) fn named_path(s: &str) -> (String, PathBuf) {
    match s.split_once('=') {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => {
            let p = PathBuf::from(s);
            let n = p
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.to_string());
            (n, p)
        }
    }
}

/// Decodes and scores the first `max` images of a Parquet set; reports undecodable rows.
pub(super) fn score_set(
    scorer: &ModelScorer,
    name: &str,
    path: &Path,
    image: &ImageColumns,
    max: Option<usize>,
    split: Split,
) -> Result<ScoredSet> {
    let data = ImageDataset::open_columns(&[path.to_path_buf()], image, "id", scorer.config())?
        .with_split(split);
    let mut skipped = SkippedRows::default();
    let batch = data.read_head(max.unwrap_or(usize::MAX), &mut skipped)?;
    if skipped.total() > 0 {
        eprintln!(
            "{name}: {} undecodable rows skipped ({:?})",
            skipped.total(),
            skipped.by_reason
        );
    }
    anyhow::ensure!(!batch.is_empty(), "{}: no decodable images", path.display());
    let scores = scorer
        .score_pixels(&batch.pixels)
        .with_context(|| format!("scoring {}", path.display()))?;
    Ok(ScoredSet {
        name: name.to_string(),
        scores,
    })
}

/// Loads the in-distribution and (optional) general model into one scorer.
pub(super) fn load_scorer(
    model: &Path,
    general: Option<&Path>,
    device: &DeviceSpec,
    precision: Precision,
    batch: usize,
) -> Result<ModelScorer> {
    Ok(ModelScorer::load(
        model, general, *device, precision, batch,
    )?)
}

/// The calibration of these models: `path`, or the model's default file when it exists.
/// A named file must exist and match the models; a default file of other models is skipped
/// with a note.
pub(super) fn matching_calibration(
    path: Option<&Path>,
    model: &Path,
    scorer: &ModelScorer,
) -> Result<Option<Calibration>> {
    let (p, named) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (Calibration::path_for_model(model), false),
    };
    if !named && !p.exists() {
        return Ok(None);
    }
    let cal = Calibration::load(&p).map_err(anyhow::Error::msg)?;
    if !cal.belongs_to(scorer.in_model_id(), scorer.general_model_id()) {
        let msg = format!(
            "calibration {} belongs to models {} / {:?}, not {} / {:?}",
            p.display(),
            cal.in_model,
            cal.general_model,
            scorer.in_model_id(),
            scorer.general_model_id()
        );
        anyhow::ensure!(!named, "{msg}");
        eprintln!("note: {msg}; evaluating without it");
        return Ok(None);
    }
    Ok(Some(cal))
}

/// Runs `glowwatch eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    let mut scorer = load_scorer(
        &a.model,
        a.general.as_deref(),
        &a.device,
        a.precision,
        a.batch,
    )?;
    scorer.set_compressors(&Compressor::ALL);
    let calibration = matching_calibration(a.calibration.as_deref(), &a.model, &scorer)?;
    if let Some(c) = &calibration {
        scorer.set_reference(c.reference.clone().map(Arc::new))?;
    }
    let (in_name, _) = named_path(&a.in_data.display().to_string());
    let in_set = score_set(
        &scorer,
        &in_name,
        &a.in_data,
        &a.image.columns(),
        a.max_rows,
        Split::All,
    )?;
    let oods = a
        .ood
        .iter()
        .map(|s| {
            let (n, p) = named_path(s);
            score_set(&scorer, &n, &p, &a.image.columns(), a.max_rows, Split::All)
        })
        .collect::<Result<Vec<_>>>()?;
    let rep = EvalReport::compute(
        scorer.in_model_id(),
        scorer.general_model_id(),
        scorer.config(),
        &in_set,
        &oods,
        calibration.as_ref(),
    );
    print!("{}", rep.table());
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let json = a.out_dir.join("eval.json");
    crate::fsutil::write_atomic(&json, serde_json::to_string_pretty(&rep)?.as_bytes())?;
    let html = report::html(&rep, &in_set, &oods).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let html_path = a.out_dir.join("report.html");
    crate::fsutil::write_atomic(&html_path, html.as_bytes())?;
    if let Some(b) = rep.best(None) {
        println!(
            "best score vs {}: {} (AUROC {:.4})",
            b.ood, b.score, b.metrics.auroc
        );
    }
    println!("wrote {} and {}", json.display(), html_path.display());
    Ok(())
}

//! `glowwatch score`: the one-off form of a pipeline: Parquet in, scored Parquet out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::run::print_summary;
use crate::pipeline::config::{
    DecodeConfig, FlagConfig, ModelsConfig, ParquetSinkConfig, PipelineConfig, SinksConfig,
    SourceConfig, SummaryConfig,
};
use crate::pipeline::run::run_pipeline;
use crate::pipeline::sink::parquet::{is_own_file, is_own_temp};
use crate::score::ScoreKind;

/// Arguments of `glowwatch score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Input Parquet files or directories.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output directory of scored Parquet (dead letters go to `<output>/_dead_letter`).
    #[arg(long)]
    pub output: PathBuf,
    /// In-distribution model.
    #[arg(long)]
    pub model: PathBuf,
    /// General model (for llr scores).
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// Flagged score.
    #[arg(long, default_value = "llr")]
    pub score: ScoreKind,
    /// Calibration file (default `<model>.calibration.json`), unless --threshold is given.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// A fixed threshold instead of a calibration.
    #[arg(long, conflicts_with = "calibration")]
    pub threshold: Option<f64>,
    /// Where the images are.
    #[command(flatten)]
    pub image: super::ImageArgs,
    /// Id column.
    #[arg(long, default_value = "id")]
    pub id_column: String,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace the scored and dead-letter files of an earlier run in --output.
    #[arg(long, conflicts_with = "append")]
    pub overwrite: bool,
    /// Add this run's files beside an earlier run's in --output.
    #[arg(long)]
    pub append: bool,
}

/// Parquet files a scoring run writes (`part-<run>-<seq>.parquet`) under `dir`, partition and
/// `_dead_letter` folders included, and anything else found there.
fn output_files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut ours, mut other) = (vec![], vec![]);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (ours, other);
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            let (o, x) = output_files(&p);
            ours.extend(o);
            other.extend(x);
        } else if is_own_file(&name) {
            ours.push(p);
        } else if !is_own_temp(&name) {
            other.push(p);
        }
    }
    (ours, other)
}

/// An output directory that already holds a run is refused unless --overwrite or --append
/// says what to do: scoring into it again would silently add a second copy of every row.
fn prepare_output(a: &ScoreArgs) -> Result<()> {
    let (ours, other) = output_files(&a.output);
    if ours.is_empty() && other.is_empty() {
        return Ok(());
    }
    if a.append {
        return Ok(());
    }
    anyhow::ensure!(
        a.overwrite,
        "output {} already holds {} scored/dead-letter file(s){}: pass --overwrite to replace \
         them or --append to add this run beside them",
        a.output.display(),
        ours.len(),
        if other.is_empty() {
            String::new()
        } else {
            format!(" and {} other file(s)", other.len())
        }
    );
    anyhow::ensure!(
        other.is_empty(),
        "--overwrite replaces only glowwatch's own part-*.parquet files, but {} also holds {}",
        a.output.display(),
        other
            .iter()
            .take(5)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for p in ours {
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Runs `glowwatch score`.
pub fn run(a: ScoreArgs) -> Result<()> {
    prepare_output(&a)?;
    let calibration =
        match a.threshold {
            Some(_) => None,
            None => Some(a.calibration.clone().unwrap_or_else(|| {
                crate::score::calibration::Calibration::path_for_model(&a.model)
            })),
        };
    let cfg = PipelineConfig {
        name: "score".into(),
        source: SourceConfig::parquet(a.input.clone(), a.image.columns(), &a.id_column),
        decode: DecodeConfig::default(),
        models: ModelsConfig {
            in_model: a.model.clone(),
            registry: None,
            general: a.general.clone(),
            device: a.device.clone(),
            batch: 256,
            precision: "f32".into(),
        },
        flag: FlagConfig {
            score: a.score,
            calibration,
            threshold: a.threshold,
        },
        sinks: SinksConfig::parquet(
            ParquetSinkConfig::unpartitioned(a.output.clone()),
            ParquetSinkConfig::unpartitioned(a.output.join("_dead_letter")),
        ),
        summary: SummaryConfig::default(),
        metrics: Default::default(),
        drift: Default::default(),
    };
    let s = run_pipeline(&cfg)?;
    print_summary(&s, a.json)
}

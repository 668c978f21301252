//! `glowwatch score`: the one-off form of a pipeline: Parquet in, scored Parquet out.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::run::print_summary;
use crate::pipeline::config::{
    DecodeConfig, FlagConfig, ModelsConfig, ParquetSinkConfig, PipelineConfig, SinksConfig,
    SourceConfig, SummaryConfig,
};
use crate::pipeline::run::run_pipeline;
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
}

/// Runs `glowwatch score`.
pub fn run(a: ScoreArgs) -> Result<()> {
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
    };
    let s = run_pipeline(&cfg)?;
    print_summary(&s, a.json)
}

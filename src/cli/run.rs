//! `glowwatch run pipelines/<name>.toml`: run a pipeline and print its summary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::pipeline::config::PipelineConfig;
use crate::pipeline::run::{RunSummary, run_pipeline};

/// Arguments of `glowwatch run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline config (TOML).
    #[arg(default_value = "pipelines/demo.toml")]
    pub pipeline: PathBuf,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Prints a run summary.
pub(super) fn print_summary(s: &RunSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "pipeline {}: {} rows in {:.1} s ({:.0} rows/s)",
        s.pipeline, s.rows_in, s.elapsed_s, s.rows_per_s
    );
    println!(
        "  scored {} | flagged {} ({:.1}%) by {} > {:.3} | non-finite {} | dead-lettered {}{}",
        s.scored,
        s.flagged,
        100.0 * s.flag_rate(),
        s.score,
        s.threshold,
        s.non_finite,
        s.dead_lettered,
        if s.dead_by_reason.is_empty() {
            String::new()
        } else {
            format!(" {:?}", s.dead_by_reason)
        }
    );
    if let Some(a) = s.auroc {
        println!("  AUROC of {} against the truth column: {a:.4}", s.score);
    }
    println!(
        "  models: {} (in), {}",
        s.model_id,
        s.general_model_id.as_deref().unwrap_or("no general model")
    );
    for f in &s.scored_files {
        println!("  scored:      {f}");
    }
    for f in &s.dead_letter_files {
        println!("  dead letter: {f}");
    }
    Ok(())
}

/// Runs `glowwatch run`.
pub fn run(a: RunArgs) -> Result<()> {
    let cfg = PipelineConfig::load(&a.pipeline)?;
    let s = run_pipeline(&cfg).with_context(|| format!("pipeline {}", a.pipeline.display()))?;
    print_summary(&s, a.json)
}

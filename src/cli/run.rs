//! `glowwatch run pipelines/<name>.toml`: run a pipeline (Parquet batch or Kafka stream) and
//! print its summary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::pipeline::config::{PipelineConfig, SourceKind};
use crate::pipeline::run::{RunSummary, run_pipeline};
use crate::pipeline::stream::{StreamSummary, run_stream};

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

/// Dead letters by reason, for summaries (empty when there are none).
fn reasons(by_reason: &std::collections::BTreeMap<String, u64>) -> String {
    if by_reason.is_empty() {
        String::new()
    } else {
        format!(" {by_reason:?}")
    }
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
        reasons(&s.dead_by_reason)
    );
    if let Some(a) = s.auroc {
        println!("  AUROC of {} against the truth column: {a:.4}", s.score);
    }
    if !s.drift_alarms.is_empty() {
        let list: Vec<String> = s
            .drift_alarms
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("  drift alarms: {}", list.join(", "));
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

/// Prints the summary of a stopped streaming run.
fn print_stream_summary(s: &StreamSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "pipeline {}: stopped after {:.1} s; consumed {} | scored {} | flagged {} | non-finite {} | dead-lettered {}{} | {} commits",
        s.pipeline,
        s.elapsed_s,
        s.consumed,
        s.scored,
        s.flagged,
        s.non_finite,
        s.dead_lettered,
        reasons(&s.dead_by_reason),
        s.commits
    );
    for f in &s.scored_files {
        println!("  scored:      {f}");
    }
    for f in &s.dead_letter_files {
        println!("  dead letter: {f}");
    }
    Ok(())
}

/// Structured logs on stderr; `RUST_LOG` overrides the default `info` level.
pub(super) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `glowwatch run`: a Parquet pipeline to completion, or a Kafka pipeline until SIGINT or
/// SIGTERM (then it drains, flushes, commits and exits 0).
pub fn run(a: RunArgs) -> Result<()> {
    let cfg = PipelineConfig::load(&a.pipeline)?;
    let what = || format!("pipeline {}", a.pipeline.display());
    init_logging();
    match cfg.source.kind {
        SourceKind::Parquet => {
            let s = run_pipeline(&cfg).with_context(what)?;
            print_summary(&s, a.json)
        }
        SourceKind::Kafka => {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let first = std::sync::OnceLock::<std::time::Instant>::new();
            ctrlc::set_handler(move || {
                if !flag.swap(true, Ordering::SeqCst) {
                    first.get_or_init(std::time::Instant::now);
                    tracing::info!("signal received: draining, flushing and committing");
                    return;
                }
                // A signal sent to the process and its group arrives twice; only a deliberate
                // second one (a second Ctrl-C) skips the drain.
                if first.get().is_some_and(|t| t.elapsed().as_secs_f64() > 2.0) {
                    eprintln!("second signal: exiting without draining (uncommitted records will be read again)");
                    std::process::exit(130);
                }
            })
            .context("installing the SIGINT/SIGTERM handler")?;
            let s = run_stream(&cfg, &stop).with_context(what)?;
            print_stream_summary(&s, a.json)
        }
    }
}

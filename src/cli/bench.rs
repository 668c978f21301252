//! `glowwatch bench`: scoring throughput table.

use anyhow::{Context, Result};
use clap::Args;

use crate::bench::{BenchCase, BenchMode, BenchOptions, profile_table, run_case, table};
use crate::device::DeviceSpec;
use crate::glow::Precision;
use crate::glow::config::GlowConfig;

/// Arguments of `glowwatch bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Configurations: `paper` (L3 K32 w512, RGB), `small` (L3 K8 w128, grey), `paper1`/`small3`
    /// for the other channel count, or a config file (JSON/TOML).
    #[arg(long, value_delimiter = ',', default_value = "paper,small")]
    config: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    batch: Vec<usize>,
    /// Precisions: f32, tf32 (CUDA), bf16.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    precision: Vec<Precision>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Timed runs per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed warm-up runs per case.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Device peak TFLOP/s, for the "% peak" column (H200 bf16 dense: 790).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Reference images/s (e.g. from ../shared/docs/performance.md), for the "x ref" column.
    #[arg(long)]
    reference_ips: Option<f64>,
    /// What to time: score (the scorer the product runs), score-kernels (the scorer's
    /// candle-kernel path), reference (trainable path's forward), train-step (forward + backward
    /// of the mean NLL + Adamax update, as `glowwatch train` runs it), train-step-outlier (the
    /// outlier loss's step), train-step-autograd (train-step through candle's autograd) or
    /// train-step-reference.
    #[arg(long, default_value = "score")]
    mode: BenchMode,
    /// Also time the stages of one forward pass per row and print their shares.
    #[arg(long)]
    profile: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub(super) fn named_config(name: &str) -> Result<GlowConfig> {
    Ok(match name {
        "paper" | "paper3" => GlowConfig::paper(3),
        "paper1" => GlowConfig::paper(1),
        "small" | "small1" => GlowConfig::small(1),
        "small3" => GlowConfig::small(3),
        path => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading config {path}"))?;
            GlowConfig::parse(&text).with_context(|| format!("config {path}"))?
        }
    })
}

/// Runs the benchmark and prints the table (rows appear as they finish).
pub fn run(a: BenchArgs) -> Result<()> {
    let device = a.device.open().map_err(anyhow::Error::msg)?;
    let opts = BenchOptions {
        runs: a.runs,
        warmup: a.warmup,
        peak_tflops: a.peak_tflops,
        reference_ips: a.reference_ips,
        profile: a.profile,
        mode: a.mode,
    };
    let mut rows = Vec::new();
    for name in &a.config {
        let case = BenchCase {
            name: name.clone(),
            config: named_config(name)?,
            batches: a.batch.clone(),
            precisions: a.precision.clone(),
        };
        let measured = run_case(&case, &device, &opts, |r| {
            eprintln!(
                "{name} {:?} batch {}: {:.1} images/s",
                r.precision, r.batch, r.images_per_s_median
            )
        })
        .with_context(|| format!("bench {name}"))?;
        rows.extend(measured);
    }
    print!("{}", table(&rows));
    print!("{}", profile_table(&rows));
    if let Some(mib) = crate::bench::peak_rss_mib() {
        println!("peak resident memory of this process: {mib:.0} MiB");
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

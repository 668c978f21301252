//! `glowwatch bench-pipeline`: Parquet -> score -> Parquet throughput against pure model
//! scoring of the same images, decode throughput per core, the cost of the input terms
//! (compressed size, complexity reference) beside the models, and peak memory, in one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::glow::Precision;
use anyhow::{Context, Result};
use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use clap::Args;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;

use crate::device::DeviceSpec;
use crate::pipeline::config::{
    DecodeConfig, FlagConfig, ModelsConfig, ParquetSinkConfig, PipelineConfig, SinksConfig,
    SourceConfig, SummaryConfig,
};
use crate::pipeline::decode::{DecodeLimits, ImageColumns, decode_array};
use crate::pipeline::run::run_pipeline;
use crate::pipeline::score::ModelScorer;
use crate::score::calibration::Calibration;
use crate::score::{ComplexityReference, Compressor, ScoreKind};

/// Arguments of `glowwatch bench-pipeline`.
#[derive(Debug, Args)]
pub struct BenchPipelineArgs {
    /// Input Parquet file (id, image columns).
    #[arg(long)]
    pub input: PathBuf,
    /// Repeat the input this many times (ids made unique) to build a larger run.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// In-distribution model.
    #[arg(long)]
    pub model: PathBuf,
    /// General model.
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// Images used for the decode and pure-scoring measurements.
    #[arg(long, default_value_t = 8192)]
    pub sample: usize,
    /// Model batch size.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Working directory for the generated input and the outputs (default: a temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Flagged score of the pipeline run (default: llr with a general model, else nll).
    #[arg(long)]
    pub score: Option<ScoreKind>,
    /// Calibration file of the models: its threshold for `--score` and its complexity
    /// reference (needed for complexity_cond and combined). Without it the pipeline flags at 0.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Timed rounds of each pure-scoring variant (interleaved; medians reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Whole-pipeline runs without and with the dashboard fed and served (`[metrics] listen`
    /// on a free port), alternating, each this many times; medians reported.
    #[arg(long, default_value_t = 1)]
    pub pipeline_rounds: usize,
}

/// Runs `glowwatch bench-pipeline`.
pub fn run(a: BenchPipelineArgs) -> Result<()> {
    let tmp = tempdir(a.work_dir.clone())?;
    let f = std::fs::File::open(&a.input).with_context(|| a.input.display().to_string())?;
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(f)?
        .build()?
        .collect::<Result<_, _>>()?;
    let schema = batches[0].schema();
    let input = tmp.join("input.parquet");
    {
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(8192))
            .build();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&input)?, schema.clone(), Some(props))?;
        let id_idx = schema.index_of("id")?;
        for r in 0..a.repeat.max(1) {
            for b in &batches {
                let mut cols = b.columns().to_vec();
                let ids =
                    arrow::compute::cast(b.column(id_idx), &arrow::datatypes::DataType::Utf8)?;
                let ids = ids.as_string::<i32>();
                cols[id_idx] = Arc::new(StringArray::from_iter_values(
                    (0..ids.len()).map(|i| format!("{}-{r}", ids.value(i))),
                ));
                w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
            }
        }
        w.close()?;
    }

    let mut scorer = ModelScorer::load(
        &a.model,
        a.general.as_deref(),
        a.device,
        Precision::F32,
        a.batch,
    )?;
    let cfg = scorer.config().clone();
    let score = a.score.unwrap_or(if a.general.is_some() {
        ScoreKind::Llr
    } else {
        ScoreKind::Nll
    });
    let reference = match &a.calibration {
        Some(p) => Calibration::load(p).map_err(anyhow::Error::msg)?.reference,
        None => None,
    };
    scorer.set_reference(reference.clone().map(Arc::new))?;

    // Decode throughput: one core, then all cores.
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let n = a.sample.min(all.num_rows());
    let images = all
        .column_by_name("image")
        .context("no image column")?
        .slice(0, n);
    let lim = DecodeLimits::default();
    let time_decode = |threads: usize| -> Result<(f64, Vec<u8>)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let t = Instant::now();
        let out = pool.install(|| decode_array(&images, &cfg, &lim))?;
        let dt = t.elapsed().as_secs_f64();
        let px: Vec<u8> = out.into_iter().filter_map(|r| r.ok()).flatten().collect();
        Ok((n as f64 / dt, px))
    };
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let (dec1, _) = time_decode(1)?;
    let (decn, pixels) = time_decode(cores)?;

    // Pure scoring of the decoded images (warm-up batch first): the models alone, with the
    // zlib size, and with the complexity reference too; rounds interleaved, medians.
    scorer.score_pixels(&pixels[..cfg.dims() * a.batch.min(n)])?;
    let zlib = [Compressor::Zlib];
    let variants: Vec<(&str, &[Compressor], Option<&ComplexityReference>)> = vec![
        ("models only", &[], None),
        ("models + zlib size", &zlib, None),
        ("models + zlib size + reference", &zlib, reference.as_ref()),
    ];
    let variants = &variants[..if reference.is_some() { 3 } else { 2 }];
    let mut rates = vec![Vec::new(); variants.len()];
    let mut alone = Vec::new();
    for round in 0..a.rounds.max(1) {
        // Rotate the order each round so no variant always runs first or last.
        for j in 0..variants.len() {
            let i = (j + round) % variants.len();
            let (_, c, r) = variants[i];
            let t = Instant::now();
            scorer.score_pixels_with(&pixels, c, r)?;
            rates[i].push(n as f64 / t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        input_terms_alone(&pixels, &cfg, variants.last().expect("variants"))?;
        alone.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    // Each codec alone on one core (the scores of other codecs pay this per image).
    let codecs: Vec<(Compressor, f64)> = Compressor::ALL
        .iter()
        .map(|&c| -> Result<(Compressor, f64)> {
            let t = Instant::now();
            for px in pixels.chunks(cfg.dims()) {
                c.compressed_bits(px, cfg.in_channels, cfg.image_size)
                    .map_err(anyhow::Error::msg)?;
            }
            Ok((c, n as f64 / t.elapsed().as_secs_f64()))
        })
        .collect::<Result<_>>()?;
    let pure = *medians.last().expect("variants");

    // The whole pipeline.
    let pcfg = PipelineConfig {
        name: "bench".into(),
        source: SourceConfig::parquet(vec![input.clone()], ImageColumns::encoded("image"), "id"),
        decode: DecodeConfig::default(),
        models: ModelsConfig {
            in_model: a.model.clone(),
            registry: None,
            general: a.general.clone(),
            device: a.device.to_string(),
            batch: a.batch,
            precision: "f32".into(),
        },
        flag: FlagConfig {
            score,
            calibration: a.calibration.clone(),
            threshold: a.calibration.is_none().then_some(0.0),
        },
        sinks: SinksConfig::parquet(
            ParquetSinkConfig::unpartitioned(tmp.join("scored")),
            ParquetSinkConfig::unpartitioned(tmp.join("dead")),
        ),
        summary: SummaryConfig::default(),
        metrics: Default::default(),
        drift: Default::default(),
    };
    let (mut plain, mut board) = (vec![], vec![]);
    let mut s = None;
    for r in 0..a.pipeline_rounds.max(1) {
        for with_board in [r % 2 == 1, r % 2 == 0] {
            let mut c = pcfg.clone();
            if with_board {
                c.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            }
            let run = run_pipeline(&c)?;
            if with_board { &mut board } else { &mut plain }.push(run.rows_per_s);
            s = Some(run);
        }
    }
    let s = s.expect("at least one run");
    println!("{:<44} {:>12}", "measurement", "value");
    println!("{}", "-".repeat(57));
    println!("{:<44} {:>12}", "rows through the pipeline", s.rows_in);
    println!("{:<44} {:>12.0}", "decode images/s, 1 core", dec1);
    println!(
        "{:<44} {:>12.0}",
        format!("decode images/s, {cores} cores"),
        decn
    );
    for ((name, _, _), m) in variants.iter().zip(&medians) {
        println!(
            "{:<44} {:>12.0}",
            format!("pure scoring images/s, {name}"),
            m
        );
    }
    for ((name, _, _), m) in variants.iter().zip(&medians).skip(1) {
        println!(
            "{:<44} {:>12.3}",
            format!("{name} / models only"),
            m / medians[0]
        );
    }
    println!(
        "{:<44} {:>12.0}",
        "input terms alone images/s (last variant)",
        median(&mut alone)
    );
    for (c, r) in &codecs {
        println!(
            "{:<44} {:>12.0}",
            format!("codec {c} alone, images/s on 1 core"),
            r
        );
    }
    println!("{:<44} {:>12}", "pipeline flags by", score.to_string());
    let (plain, board) = (median(&mut plain), median(&mut board));
    println!(
        "{:<44} {:>12.0}",
        "pipeline rows/s (Parquet -> Parquet)", plain
    );
    println!(
        "{:<44} {:>12.0}",
        "pipeline rows/s, dashboard fed and served", board
    );
    println!("{:<44} {:>12.3}", "with dashboard / without", board / plain);
    println!(
        "{:<44} {:>12.3}",
        "pipeline / pure scoring (all terms)",
        plain / pure
    );
    if let Some(mib) = crate::bench::peak_rss_mib() {
        println!("{:<44} {:>12.0}", "peak resident memory, MiB", mib);
    }
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

/// The compressed sizes and reference terms of every image without the models, in parallel
/// as the scorer computes them: what the input terms cost on their own.
fn input_terms_alone(
    pixels: &[u8],
    cfg: &crate::glow::GlowConfig,
    variant: &(&str, &[Compressor], Option<&ComplexityReference>),
) -> Result<()> {
    use rayon::prelude::*;
    let (c, s) = (cfg.in_channels, cfg.image_size);
    pixels
        .par_chunks(cfg.dims())
        .try_for_each(|px| -> Result<(), String> {
            for codec in variant.1 {
                codec.compressed_bits(px, c, s)?;
            }
            if let Some(r) = variant.2 {
                r.expected_complexity(&crate::score::complexity::layout(px, c, s, r.grid)?)?;
            }
            Ok(())
        })
        .map_err(anyhow::Error::msg)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tempdir(given: Option<PathBuf>) -> Result<PathBuf> {
    let p = given.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("glowwatch-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

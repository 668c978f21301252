//! `glowwatch bench-sql`: analyst queries over generated scored data (Hive-partitioned Parquet
//! with the pipeline's scored schema) and the scoring UDF against the batch scorer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use clap::Args;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::device::DeviceSpec;
use crate::pipeline::decode::{DecodeLimits, decode_array};
use crate::pipeline::schema::scored_schema;
use crate::score::ScoreKind;
use crate::sql::SqlSession;
use crate::sql::udf::SqlModels;

/// Arguments of `glowwatch bench-sql`.
#[derive(Debug, Args)]
pub struct BenchSqlArgs {
    /// Scored rows to generate.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: usize,
    /// Days of hourly partitions the rows are spread over.
    #[arg(long, default_value_t = 2)]
    pub days: usize,
    /// Timed runs per query (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Working directory (default: a temp dir, removed afterwards). Reused if it already holds
    /// generated data of the same size.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// In-distribution model, for the UDF measurement.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// General model (the UDF then computes the likelihood ratio).
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// Parquet file with an `image` column, for the UDF measurement.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Images used for the UDF measurement.
    #[arg(long, default_value_t = 4096)]
    pub sample: usize,
    /// Model batch size.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

/// The analyst queries of the README, timed over the generated table.
pub const QUERIES: [(&str, &str); 4] = [
    (
        "flag rate per hour",
        "SELECT date, hour, count(*) AS n, avg(CAST(is_ood AS DOUBLE)) AS flag_rate \
         FROM scored GROUP BY date, hour ORDER BY date, hour",
    ),
    (
        "top 20 anomalies, per-scale breakdown",
        "SELECT id, score, llr_scale_0, llr_scale_1, llr_scale_2 FROM scored \
         ORDER BY score DESC LIMIT 20",
    ),
    (
        "which scale drives the flags",
        "SELECT CASE WHEN llr_scale_0 >= greatest(llr_scale_1, llr_scale_2) THEN 0 \
         WHEN llr_scale_1 >= llr_scale_2 THEN 1 ELSE 2 END AS scale, count(*) AS flagged \
         FROM scored WHERE is_ood GROUP BY 1 ORDER BY 1",
    ),
    (
        "score drift between days",
        "SELECT date, count(*) AS n, avg(score) AS mean, stddev(score) AS sd, \
         approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY score) AS p99 \
         FROM scored GROUP BY date ORDER BY date",
    ),
];

/// Runs `glowwatch bench-sql`.
pub fn run(a: BenchSqlArgs) -> Result<()> {
    let tmp = a.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("glowwatch-bench-sql-{}", std::process::id()))
    });
    let scored = tmp.join("scored");
    let marker = tmp.join(format!("generated-{}-{}", a.rows, a.days));
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&scored);
        let t = Instant::now();
        generate(&scored, a.rows, a.days)?;
        std::fs::write(&marker, b"")?;
        eprintln!(
            "generated {} scored rows in {:.1} s",
            a.rows,
            t.elapsed().as_secs_f64()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let session = SqlSession::new(false);
    rt.block_on(session.register("scored", &scored.display().to_string()))?;
    println!(
        "{:<40} {:>10} {:>10} {:>12}",
        "query", "rows", "median s", "rows/s"
    );
    println!("{}", "-".repeat(75));
    for (name, sql) in QUERIES {
        let mut times = Vec::new();
        let mut out_rows = 0;
        for _ in 0..a.runs.max(1) {
            let t = Instant::now();
            let r = rt.block_on(session.run(sql))?;
            times.push(t.elapsed().as_secs_f64());
            out_rows = r[0].rows();
        }
        let med = median(&mut times);
        println!(
            "{:<40} {:>10} {:>10.3} {:>12.0}",
            name,
            out_rows,
            med,
            a.rows as f64 / med
        );
    }

    if let (Some(model), Some(images)) = (&a.model, &a.images) {
        udf_vs_batch(&a, &rt, model, images, &tmp)?;
    }
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Scoring UDF images/s against decode + the batch scorer on the same images.
fn udf_vs_batch(
    a: &BenchSqlArgs,
    rt: &tokio::runtime::Runtime,
    model: &Path,
    images: &Path,
    tmp: &Path,
) -> Result<()> {
    let f = std::fs::File::open(images).with_context(|| images.display().to_string())?;
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(f)?
        .with_limit(a.sample)
        .build()?
        .collect::<Result<_, _>>()?;
    let schema = batches[0].schema();
    let sample = arrow::compute::concat_batches(&schema, &batches)?;
    let n = sample.num_rows();
    let path = tmp.join("images.parquet");
    let mut w = ArrowWriter::try_new(std::fs::File::create(&path)?, schema, None)?;
    w.write(&sample)?;
    w.close()?;

    let score = if a.general.is_some() {
        ScoreKind::Llr
    } else {
        ScoreKind::Nll
    };
    let models = Arc::new(SqlModels::load(
        model,
        a.general.as_deref(),
        None,
        a.device,
        a.batch,
        score,
        DecodeLimits::default(),
    )?);
    let session = SqlSession::new(false);
    session.add_models(models.clone());
    rt.block_on(session.register("images", &path.display().to_string()))?;
    let images_col = sample.column_by_name("image").context("no image column")?;
    let cfg = models.scorer.config().clone();
    let (mut udf, mut batch) = (Vec::new(), Vec::new());
    // Warm-up of both paths, then alternate so machine noise hits both alike.
    rt.block_on(session.run("SELECT sum(ood_score(image)) FROM images"))?;
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        rt.block_on(session.run("SELECT sum(ood_score(image)) FROM images"))?;
        udf.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let decoded = decode_array(images_col, &cfg, &DecodeLimits::default())?;
        let px: Vec<u8> = decoded
            .into_iter()
            .filter_map(|r| r.ok())
            .flatten()
            .collect();
        models.scorer.score_pixels(&px)?;
        batch.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let (u, b) = (median(&mut udf), median(&mut batch));
    println!();
    println!("{:<44} {:>12}", "scoring (decode + models)", "images/s");
    println!("{}", "-".repeat(57));
    println!("{:<44} {:>12.0}", format!("batch scorer, {n} images"), b);
    println!("{:<44} {:>12.0}", "SQL UDF ood_score(image)", u);
    println!("{:<44} {:>12.3}", "UDF / batch scorer", u / b);
    Ok(())
}

/// Writes `rows` synthetic scored rows as `date=/hour=` partitions, one file per hour.
fn generate(dir: &Path, rows: usize, days: usize) -> Result<()> {
    let input = Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
    ]);
    let schema = scored_schema(&input, 3);
    let parts = (days * 24).max(1);
    let per = rows.div_ceil(parts);
    let start_us: i64 = 1_795_910_400_000_000; // 2026-11-28T00:00:00Z
    let mut next = 0usize;
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(131_072))
        .build();
    for p in 0..parts {
        let n = per.min(rows - next);
        if n == 0 {
            break;
        }
        let (day, hour) = (p / 24, p % 24);
        let d = dir
            .join(format!("date=2026-11-{:02}", 28 + day))
            .join(format!("hour={hour:02}"));
        std::fs::create_dir_all(&d)?;
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(d.join("part-00001.parquet"))?,
            schema.clone(),
            Some(props.clone()),
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
        let mut done = 0;
        while done < n {
            let m = (n - done).min(65_536);
            let t0 = start_us + p as i64 * 3_600_000_000;
            w.write(&synthetic_batch(
                &schema,
                next + done,
                m,
                day,
                t0,
                &mut rng,
            )?)?;
            done += m;
        }
        w.close()?;
        next += n;
    }
    Ok(())
}

/// One batch of plausible scored rows: per-scale log-likelihoods around the shipped models'
/// values, the ratio and flag derived from them as the pipeline does (later days drift).
fn synthetic_batch(
    schema: &SchemaRef,
    first: usize,
    n: usize,
    day: usize,
    t0: i64,
    rng: &mut impl Rng,
) -> Result<RecordBatch> {
    let scale = |mean: f64, sd: f64, rng: &mut dyn rand::RngCore| -> Vec<f64> {
        let d = Normal::new(mean, sd).expect("valid");
        (0..n).map(|_| d.sample(rng)).collect()
    };
    let lp: Vec<Vec<f64>> = vec![
        scale(-1900.0, 60.0, rng),
        scale(-500.0, 25.0, rng),
        scale(-420.0, 20.0, rng),
    ];
    let gen_lp: Vec<Vec<f64>> = (0..3)
        .map(|k| {
            let drift = 3.0 * day as f64;
            lp[k]
                .iter()
                .map(|v| v + Normal::new(-40.0 + drift, 15.0).expect("valid").sample(rng))
                .collect()
        })
        .collect();
    let log_p: Vec<f64> = (0..n).map(|i| lp.iter().map(|s| s[i]).sum()).collect();
    let gen_log_p: Vec<f64> = (0..n).map(|i| gen_lp.iter().map(|s| s[i]).sum()).collect();
    let llr: Vec<f64> = (0..n).map(|i| gen_log_p[i] - log_p[i]).collect();
    let threshold = -80.0;
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let name = f.name().as_str();
        let floats = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
        let col: ArrayRef = match name {
            "id" => Arc::new(StringArray::from_iter_values(
                (first..first + n).map(|i| format!("img-{i:09}")),
            )),
            "label" => Arc::new(Int32Array::from_iter_values(
                (first..first + n).map(|i| (i % 10) as i32),
            )),
            "log_p" => floats(log_p.clone()),
            "bpd" => floats(
                log_p
                    .iter()
                    .map(|l| crate::glow::bits_per_dim(*l, 1024))
                    .collect(),
            ),
            "gen_log_p" => floats(gen_log_p.clone()),
            // A plausible zlib size (Fashion-MNIST: ~4,900 bits) and S from it; the generated
            // data has no complexity reference, so the reference scores are null.
            "input_bits" => floats((0..n).map(|i| 4000.0 + (i % 1800) as f64).collect()),
            "complexity" => floats(
                (0..n)
                    .map(|i| {
                        -log_p[i] / std::f64::consts::LN_2 + 8192.0 - (4000.0 + (i % 1800) as f64)
                    })
                    .collect(),
            ),
            "complexity_cond" | "combined" => Arc::new(Float64Array::from(vec![None; n])),
            "llr" | "score" => floats(llr.clone()),
            "threshold" => floats(vec![threshold; n]),
            "score_name" => Arc::new(StringArray::from(vec!["llr"; n])),
            "is_ood" => Arc::new(BooleanArray::from(
                llr.iter().map(|v| *v > threshold).collect::<Vec<_>>(),
            )),
            "model_id" => Arc::new(StringArray::from(vec!["glow-synthetic-in"; n])),
            "general_model_id" => Arc::new(StringArray::from(vec!["glow-synthetic-gen"; n])),
            "status" => Arc::new(StringArray::from(vec!["ok"; n])),
            "scored_at" => Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|i| t0 + (i as i64 * 3_600_000_000) / n as i64),
                )
                .with_timezone("UTC"),
            ),
            _ => {
                if let Some(k) = name.strip_prefix("gen_lp_scale_") {
                    floats(gen_lp[k.parse::<usize>()?].clone())
                } else if let Some(k) = name.strip_prefix("llr_scale_") {
                    let k: usize = k.parse()?;
                    floats((0..n).map(|i| gen_lp[k][i] - lp[k][i]).collect())
                } else if let Some(k) = name.strip_prefix("lp_scale_") {
                    floats(lp[k.parse::<usize>()?].clone())
                } else {
                    anyhow::bail!("bench-sql: no generator for scored column `{name}`");
                }
            }
        };
        cols.push(col);
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

//! Command-line interface: one file per subcommand; `main.rs` only calls [`main`].

mod bench;
mod bench_pipeline;
#[cfg(feature = "sql")]
mod bench_sql;
mod bench_stream;
mod calibrate;
mod dashboard;
mod doctor;
mod eval;
mod import;
mod model;
mod produce;
mod registry;
#[cfg(feature = "sql")]
mod retrain;
mod run;
mod score;
#[cfg(feature = "sql")]
mod sql;
mod train;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::pipeline::decode::{ImageColumns, PixelFormat};

/// Where the input's images are (shared by every command that reads Parquet images).
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
pub struct ImageArgs {
    /// Image column.
    #[arg(long, default_value = "image")]
    pub image_column: String,
    /// How the image column stores images: encoded files (PNG/JPEG/...) or raw 8-bit pixels.
    #[arg(long, value_enum, default_value_t = PixelFormat::Encoded)]
    #[serde(default)]
    pub pixels: PixelFormat,
    /// Raw pixels: the height, width and channels columns.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 3,
        default_value = "height,width,channels"
    )]
    #[serde(default = "default_shape_columns")]
    pub shape_columns: Vec<String>,
}

fn default_shape_columns() -> Vec<String> {
    crate::pipeline::decode::DEFAULT_SHAPE_COLUMNS
        .map(String::from)
        .to_vec()
}

impl ImageArgs {
    /// As the decoder's column description.
    pub fn columns(&self) -> ImageColumns {
        let s = &self.shape_columns;
        ImageColumns {
            image: self.image_column.clone(),
            format: self.pixels,
            shape: [s[0].clone(), s[1].clone(), s[2].clone()],
        }
    }
}

/// glowwatch: out-of-distribution detection for image feeds with hierarchical Glow likelihoods.
#[derive(Debug, Parser)]
#[command(name = "glowwatch", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure scoring throughput (images/s, TFLOP/s) of Glow configurations.
    Bench(bench::BenchArgs),
    /// Check a device's scores against the CPU reference in every precision.
    Doctor(doctor::DoctorArgs),
    /// Create and inspect model files.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Train a general model, fine-tune an in-distribution model, optionally with the outlier loss.
    Train(Box<train::TrainArgs>),
    /// AUROC / AUPR / FPR95 of every score: in-distribution test set vs OOD sets, with a report.
    Eval(eval::EvalArgs),
    /// Pick a score's threshold at a target false-positive rate from in-distribution data.
    Calibrate(calibrate::CalibrateArgs),
    /// Run a pipeline (pipelines/*.toml): Parquet or Kafka in -> decode -> score -> flag -> Parquet / Kafka out.
    Run(run::RunArgs),
    /// Serve the dashboard of a pipeline's output files (a running pipeline serves its own on `[metrics] listen`).
    Dashboard(dashboard::DashboardArgs),
    /// One-off scoring: Parquet in, scored Parquet out (dead letters in <output>/_dead_letter).
    Score(score::ScoreArgs),
    /// Turn an image folder (PNG/JPEG) or IDX files into Parquet of the input schema.
    Import(import::ImportArgs),
    /// Measure Parquet -> score -> Parquet throughput against pure scoring, decode speed, memory.
    BenchPipeline(bench_pipeline::BenchPipelineArgs),
    /// Retrain the current registry version on fresh inliers selected with SQL; promote it if it passes the gates.
    #[cfg(feature = "sql")]
    Retrain(retrain::RetrainArgs),
    /// Model versions: list, add, promote, roll back.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Publish images from Parquet to a Kafka topic (optionally at a fixed rate).
    Produce(produce::ProduceArgs),
    /// Kafka pipeline against a running broker: saturation, latency at a fixed load, memory under overload.
    BenchStream(bench_stream::BenchStreamArgs),
    /// SQL over scored data (DataFusion): one query, or a shell without one.
    #[cfg(feature = "sql")]
    Sql(sql::SqlArgs),
    /// Time the README's analyst queries over generated scored data, and the scoring UDF.
    #[cfg(feature = "sql")]
    BenchSql(bench_sql::BenchSqlArgs),
}

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Model(c) => model::run(c),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Run(a) => run::run(a),
        Command::Dashboard(a) => dashboard::run(a),
        Command::Score(a) => score::run(a),
        Command::Import(a) => import::run(a),
        Command::BenchPipeline(a) => bench_pipeline::run(a),
        Command::Produce(a) => produce::run(a),
        Command::Registry(c) => registry::run(c),
        #[cfg(feature = "sql")]
        Command::Retrain(a) => retrain::run(a),
        Command::BenchStream(a) => bench_stream::run(a),
        #[cfg(feature = "sql")]
        Command::Sql(a) => sql::run(a),
        #[cfg(feature = "sql")]
        Command::BenchSql(a) => bench_sql::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! The scoring path, one stage per module: [`source`] (Parquet files, row group by row group) ->
//! [`decode`] (image bytes -> model-sized 8-bit pixels, failures become dead-letter reasons) ->
//! [`score`] -> [`flag`] -> [`sink`]s, wired by [`run`] (Parquet, to completion) or [`stream`] (Kafka, until stopped; commits
//! per [`offsets`], exports [`metrics`]) with bounded channels; [`drift`] watches the score
//! distributions and [`dashboard`] shows a run to its operators. Training reads
//! its data through the same source and decode code. [`schema`] defines the records written.

pub mod config;
pub mod dashboard;
pub mod decode;
pub mod drift;
pub mod error_log;
pub mod flag;
pub mod metrics;
pub mod models;
pub mod offsets;
pub mod run;
pub mod schema;
pub mod score;
pub mod sink;
pub mod source;
pub mod stream;

/// Errors of the pipeline stages; each names the file, column or key it is about.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A Parquet file could not be read.
    #[error("{path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An Arrow operation failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// A pipeline config is invalid (names the key).
    #[error("pipeline config: {0}")]
    Config(String),
    /// A stage thread failed or stopped unexpectedly.
    #[error("pipeline stage {0}")]
    Stage(String),
    /// The input does not have the columns or types the stage needs.
    #[error("schema: {0}")]
    Schema(String),
    /// An error of the model core.
    #[error(transparent)]
    Glow(#[from] crate::glow::GlowError),
}

/// Result alias of the pipeline.
pub type Result<T> = std::result::Result<T, PipelineError>;

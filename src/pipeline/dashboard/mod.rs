//! The operator's dashboard: a live web page of a feed — records/s, lag, dead letters by reason,
//! flag rate over the feed per score and per scale, recent histograms against the calibration
//! with thresholds, the top anomalies as thumbnails, drift alarms.
//!
//! A running pipeline with `[metrics] listen` feeds a [`Board`] from its scoring thread and
//! serves it beside `/metrics` ([`server`]); `glowwatch dashboard --pipeline P` feeds one from a
//! pipeline's scored and dead-letter Parquet files instead. The page is an askama template
//! with a little inline JavaScript that refreshes it; charts are SVG drawn on the server by
//! `plotters`; nothing is loaded from elsewhere.

pub mod board;
pub mod charts;
pub mod files;
pub mod server;

use std::sync::Arc;

pub use board::{Board, BoardConfig, BoardModels, ScoredRows, Snapshot};

use super::Result;
use super::config::PipelineConfig;
use super::flag::Flagger;
use super::score::ModelScorer;
use crate::score::calibration::Calibration;

/// The board of a running pipeline scoring with `scorer`, `flagger` and the calibration `cal`
/// they came with, served with `/metrics` on `[metrics] listen` while the returned server
/// lives; `None` without a listener.
///
/// Errors: the address cannot be bound, another metrics recorder is installed.
pub fn serve_pipeline(
    cfg: &PipelineConfig,
    scorer: &ModelScorer,
    flagger: &Flagger,
    cal: Option<&Calibration>,
) -> Result<Option<(Arc<Board>, server::Server)>> {
    let Some(listen) = cfg.metrics.listen else {
        return Ok(None);
    };
    let board = Arc::new(Board::new(
        &cfg.name,
        BoardModels::new(scorer, flagger, cal),
        true,
        BoardConfig::default(),
    ));
    let handle = super::metrics::install()?;
    let server = server::spawn(listen, Arc::clone(&board), Some(handle))?;
    let addr = server.addr;
    tracing::info!(%addr, "serving the dashboard on http://{addr}/ and /metrics");
    Ok(Some((board, server)))
}

/// Feeds one scored micro-batch (`scored`, with `scores`, `flags` and the (C, S, S) model-input
/// `pixels` of its rows) and its dead letters (`dead`, the dead-letter schema) to a board.
#[allow(clippy::too_many_arguments)]
pub fn observe_batch(
    board: &Board,
    scored: &arrow::record_batch::RecordBatch,
    id_column: &str,
    scores: &[crate::score::ImageScores],
    flags: &[super::flag::Flag],
    pixels: &[u8],
    dead: &arrow::record_batch::RecordBatch,
    at: std::time::SystemTime,
) {
    use arrow::array::AsArray;
    let ids = scored
        .column_by_name(id_column)
        .cloned()
        .unwrap_or_else(|| {
            arrow::array::new_null_array(&arrow::datatypes::DataType::Utf8, scored.num_rows())
        });
    board.observe(ScoredRows {
        ids: &ids,
        scores,
        flags,
        versions: None,
        pixels,
        at,
    });
    if let Some(r) = dead.column_by_name("reason") {
        board.dead_letters(r.as_string::<i32>().iter().flatten(), at);
    }
}

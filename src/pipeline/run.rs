//! The batch runner: source -> decode -> score + flag -> sinks, one thread per stage, joined by
//! bounded channels (`std::sync::mpsc::sync_channel`, capacity [`CHANNEL_DEPTH`] batches).
//!
//! Back-pressure: a full channel blocks the stage before it, so when scoring is the slowest
//! stage the source stops reading and at most `CHANNEL_DEPTH` batches wait between any two
//! stages; memory is bounded by about `3 * CHANNEL_DEPTH + 3` batches whatever the input size.
//! Decoding of the next batch overlaps scoring of the current one.
//!
//! Every input row ends up exactly once in the scored output or in the dead-letter output.
//! Output files become visible only when complete (see [`super::sink::parquet`]); if any stage
//! fails the run fails, and abandoned temporary files are removed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Instant, SystemTime};

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use super::config::{PipelineConfig, SourceKind};
use super::decode::{BatchOrigin, DecodedBatch, decode_batch};
use super::flag::Status;
use metrics::counter;

use super::dashboard::{self, BoardModels};
use super::metrics as m;
use super::models::{LoadedModels, ModelWatcher, drift_monitor, load_scorer};
use super::schema::{dead_letter_schema, scored_schema};
use super::score::scored_batch;
use super::sink::{ParquetSink, WrittenFile};
use super::source::ParquetSource;
use super::{PipelineError, Result};

/// Batches that may wait between two stages.
pub const CHANNEL_DEPTH: usize = 2;

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Pipeline name.
    pub pipeline: String,
    /// Input rows read.
    pub rows_in: u64,
    /// Rows written to the scored output.
    pub scored: u64,
    /// Scored rows flagged as out of distribution.
    pub flagged: u64,
    /// Scored rows with a non-finite likelihood.
    pub non_finite: u64,
    /// Rows written to the dead-letter output.
    pub dead_lettered: u64,
    /// Dead-letter rows by reason.
    pub dead_by_reason: BTreeMap<String, u64>,
    /// The flagged score.
    pub score: String,
    /// Its threshold.
    pub threshold: f64,
    /// In-distribution model id.
    pub model_id: String,
    /// General model id.
    pub general_model_id: Option<String>,
    /// Scored files written.
    pub scored_files: Vec<String>,
    /// Dead-letter files written.
    pub dead_letter_files: Vec<String>,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// Input rows per second.
    pub rows_per_s: f64,
    /// AUROC of the flagged score against the truth column, when configured.
    pub auroc: Option<f64>,
    /// Drift alarms started, per watched score (empty when none, or drift is off).
    pub drift_alarms: BTreeMap<String, u64>,
    /// Record (among the scored) of each score's first drift alarm.
    pub drift_first_alarm: BTreeMap<String, u64>,
}

impl RunSummary {
    /// Flagged share of scored rows.
    pub fn flag_rate(&self) -> f64 {
        self.flagged as f64 / self.scored.max(1) as f64
    }
}

struct SourceBatch {
    origin: BatchOrigin,
    batch: RecordBatch,
}

struct Scored {
    scored: RecordBatch,
    dead: RecordBatch,
    at: SystemTime,
}

/// A unique id for output file names: UTC time and process id.
pub fn run_id() -> String {
    let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    format!(
        "{}-{}",
        ts.replace(['-', ':'], "").trim_end_matches('Z'),
        std::process::id()
    )
}

pub(crate) fn send<T>(tx: &SyncSender<T>, v: T, stage: &str) -> Result<()> {
    tx.send(v)
        .map_err(|_| PipelineError::Stage(format!("{stage}: the next stage stopped")))
}

pub(crate) fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>, stage: &str) -> Result<T> {
    h.join()
        .map_err(|_| PipelineError::Stage(format!("{stage} panicked")))?
}

/// Runs a pipeline over its Parquet source to completion.
pub fn run_pipeline(cfg: &PipelineConfig) -> Result<RunSummary> {
    let started = Instant::now();
    if cfg.source.kind != SourceKind::Parquet {
        return Err(PipelineError::Config(
            "run_pipeline reads Parquet sources; Kafka sources run with pipeline::stream".into(),
        ));
    }
    let LoadedModels {
        mut scorer,
        mut flagger,
        calibration,
    } = load_scorer(cfg)?;
    let mut drift = drift_monitor(cfg, &scorer, &flagger, calibration.as_ref())?;
    let mut watcher = ModelWatcher::new(cfg, scorer.version())?;
    let served = dashboard::serve_pipeline(cfg, &scorer, &flagger, calibration.as_ref())?;
    let board = served.as_ref().map(|(b, _)| Arc::clone(b));

    // Check the input before any work.
    let source = ParquetSource::open(&cfg.source.paths)?;
    let schema = source.schema().clone();
    let image_columns = cfg.source.image_columns();
    image_columns.check(&schema)?;
    let truth_idx = match &cfg.summary.truth_column {
        Some(t) => {
            let i = source.column_index(t)?;
            if schema.field(i).data_type() != &DataType::Boolean {
                return Err(PipelineError::Schema(format!(
                    "summary.truth_column `{t}` must be boolean, it is {}",
                    schema.field(i).data_type()
                )));
            }
            Some(i)
        }
        None => None,
    };
    let out_schema = scored_schema(&schema, scorer.scales());
    let run = run_id();
    let (Some(scored_cfg), Some(dead_cfg)) = (&cfg.sinks.scored, &cfg.sinks.dead_letter) else {
        return Err(PipelineError::Config(
            "a Parquet source needs sinks.scored and sinks.dead_letter".into(),
        ));
    };
    let mut scored_sink = ParquetSink::new(scored_cfg, out_schema.clone(), &run)?;
    let mut dead_sink = ParquetSink::new(dead_cfg, dead_letter_schema(), &run)?;

    let (src_tx, src_rx) = sync_channel::<SourceBatch>(CHANNEL_DEPTH);
    let (dec_tx, dec_rx) = sync_channel::<DecodedBatch>(CHANNEL_DEPTH);
    let (out_tx, out_rx) = sync_channel::<Scored>(CHANNEL_DEPTH);
    let all_columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let batch_rows = cfg.source.batch_rows;

    std::thread::scope(|s| -> Result<RunSummary> {
        let source_h = s.spawn(|| -> Result<u64> {
            let tx = src_tx;
            let cols: Vec<&str> = all_columns.iter().map(String::as_str).collect();
            let mut rows = 0u64;
            for rg in source.row_groups() {
                let batch = source.read(rg, &cols)?;
                let mut off = 0;
                while off < batch.num_rows() {
                    let n = batch_rows.min(batch.num_rows() - off);
                    let origin = BatchOrigin {
                        source: source.files()[rg.file].display().to_string(),
                        row_group: Some(rg.index as u64),
                        first_row: rg.first_row + off as u64,
                    };
                    send(
                        &tx,
                        SourceBatch {
                            origin,
                            batch: batch.slice(off, n),
                        },
                        "source",
                    )?;
                    rows += n as u64;
                    off += n;
                }
            }
            Ok(rows)
        });
        let model_cfg = scorer.config().clone();
        let limits = cfg.decode.limits();
        let decode_h = s.spawn(move || -> Result<()> {
            let rx: Receiver<SourceBatch> = src_rx;
            for b in rx {
                let d = decode_batch(
                    b.origin,
                    &b.batch,
                    &image_columns,
                    &cfg.source.id_column,
                    &model_cfg,
                    &limits,
                    SystemTime::now(),
                )?;
                send(&dec_tx, d, "decode")?;
            }
            Ok(())
        });
        let sink_h = s.spawn(move || -> Result<(Vec<WrittenFile>, Vec<WrittenFile>)> {
            for o in out_rx {
                scored_sink.write(&o.scored, o.at)?;
                dead_sink.write(&o.dead, o.at)?;
            }
            Ok((scored_sink.close()?, dead_sink.close()?))
        });

        // Score + flag on this thread.
        let mut sum = RunSummary {
            pipeline: cfg.name.clone(),
            rows_in: 0,
            scored: 0,
            flagged: 0,
            non_finite: 0,
            dead_lettered: 0,
            dead_by_reason: BTreeMap::new(),
            score: flagger.score.to_string(),
            threshold: flagger.threshold,
            model_id: scorer.in_model_id().to_string(),
            general_model_id: scorer.general_model_id().map(String::from),
            scored_files: vec![],
            dead_letter_files: vec![],
            elapsed_s: 0.0,
            rows_per_s: 0.0,
            auroc: None,
            drift_alarms: BTreeMap::new(),
            drift_first_alarm: BTreeMap::new(),
        };
        let mut truth: (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        let score_result = (|| -> Result<()> {
            for d in dec_rx {
                if let Some(w) = &mut watcher
                    && let Some(m) = w.poll(cfg, &scorer)
                {
                    (scorer, flagger) = (m.scorer, m.flagger);
                    // A new version comes with its own calibration: fresh detectors.
                    if let Some(d) = drift.take() {
                        merge_alarms(&mut sum.drift_alarms, &mut sum.drift_first_alarm, d);
                    }
                    drift = drift_monitor(cfg, &scorer, &flagger, m.calibration.as_ref())?;
                    if let Some(b) = &board {
                        b.set_models(BoardModels::new(&scorer, &flagger, m.calibration.as_ref()));
                    }
                }
                let at = SystemTime::now();
                let scores = scorer.score_pixels(&d.pixels)?;
                let (scored, flags) =
                    scored_batch(&out_schema, &d.rows, &scores, &scorer, &flagger, at)?;
                if let Some(b) = &board {
                    let id = &cfg.source.id_column;
                    dashboard::observe_batch(
                        b, &scored, id, &scores, &flags, &d.pixels, &d.dead, at,
                    );
                }
                if let Some(m) = &mut drift {
                    let events = m.observe(&scores);
                    if let Some(b) = &board {
                        b.drift(m.status(), &events, at);
                    }
                }
                let flagged = flags.iter().filter(|f| f.is_ood).count() as u64;
                sum.scored += scored.num_rows() as u64;
                sum.flagged += flagged;
                counter!(m::SCORED).increment(scored.num_rows() as u64);
                counter!(m::FLAGGED, "score" => sum.score.clone()).increment(flagged);
                sum.non_finite += flags
                    .iter()
                    .filter(|f| f.status == Status::NonFinite)
                    .count() as u64;
                sum.dead_lettered += d.dead.num_rows() as u64;
                for r in &d.reasons {
                    *sum.dead_by_reason
                        .entry(r.as_str().to_string())
                        .or_default() += 1;
                    counter!(m::DEAD_LETTERS, "reason" => r.as_str()).increment(1);
                }
                if let Some(ti) = truth_idx {
                    let t = d.rows.column(ti).as_boolean();
                    for (i, f) in flags.iter().enumerate() {
                        if t.is_valid(i) {
                            if t.value(i) {
                                &mut truth.1
                            } else {
                                &mut truth.0
                            }
                            .push(f.score);
                        }
                    }
                }
                send(
                    &out_tx,
                    Scored {
                        scored,
                        dead: d.dead,
                        at,
                    },
                    "score",
                )?;
            }
            Ok(())
        })();
        drop(out_tx);
        // Join every stage; report the first failure in pipeline order.
        let rows_in = join(source_h, "source");
        let decoded = join(decode_h, "decode");
        let sunk = join(sink_h, "sink");
        let rows_in = rows_in?;
        decoded?;
        let (scored_files, dead_files) = sunk?;
        score_result?;
        if let Some(d) = drift.take() {
            merge_alarms(&mut sum.drift_alarms, &mut sum.drift_first_alarm, d);
        }
        sum.rows_in = rows_in;
        sum.scored_files = scored_files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        sum.dead_letter_files = dead_files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        if !truth.0.is_empty() && !truth.1.is_empty() {
            sum.auroc = Some(crate::eval::detection_metrics(&truth.0, &truth.1).auroc);
        }
        sum.elapsed_s = started.elapsed().as_secs_f64();
        sum.rows_per_s = sum.rows_in as f64 / sum.elapsed_s.max(1e-9);
        if sum.scored + sum.dead_lettered != sum.rows_in {
            return Err(PipelineError::Stage(format!(
                "accounting: {} rows in, {} scored + {} dead-lettered",
                sum.rows_in, sum.scored, sum.dead_lettered
            )));
        }
        Ok(sum)
    })
}

/// Adds one monitor's alarms to a run's (first alarms: the earliest kept).
pub(super) fn merge_alarms(
    into: &mut BTreeMap<String, u64>,
    first: &mut BTreeMap<String, u64>,
    from: super::drift::DriftMonitor,
) {
    for (k, v) in from.alarms {
        *into.entry(k).or_default() += v;
    }
    for (k, v) in from.first_alarm {
        first.entry(k).or_insert(v);
    }
}

//! Prometheus metrics of a pipeline, served as text on `http://<listen>/metrics` beside the
//! dashboard (`[metrics] listen = "127.0.0.1:9898"` in a pipeline file).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `glowwatch_records_consumed_total` | counter | |
//! | `glowwatch_kafka_client_errors_total` | counter | | (errors of the Kafka clients; logged rate-limited) |
//! | `glowwatch_drift_alarm` | gauge | `score` (1 while drifting) |
//! | `glowwatch_drift_statistic`, `glowwatch_drift_threshold` | gauge | `score`, `window` |
//! | `glowwatch_records_scored_total` | counter | |
//! | `glowwatch_records_flagged_total` | counter | `score` |
//! | `glowwatch_dead_letters_total` | counter | `reason` |
//! | `glowwatch_batch_seconds` | histogram | (dispatch of a micro-batch -> durable in every sink) |
//! | `glowwatch_end_to_end_seconds` | histogram | (Kafka message timestamp -> durable) |
//! | `glowwatch_consumer_lag` | gauge | `topic`, `partition` (from librdkafka statistics) |
//! | `glowwatch_queue_depth` | gauge | `stage` (batches waiting before decode, score, sink) |
//! | `glowwatch_consumer_paused` | gauge | (1 while back-pressure pauses consumption) |
//! | `glowwatch_commits_total`, `glowwatch_rebalances_total` | counter | |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::{PipelineError, Result};

/// Records read from Kafka.
/// Errors reported by the Kafka clients (consumer polls, librdkafka error callbacks).
pub const KAFKA_CLIENT_ERRORS: &str = "glowwatch_kafka_client_errors_total";
/// 1 while the last drift check of a score exceeded a threshold (`score`).
pub const DRIFT_ALARM: &str = "glowwatch_drift_alarm";
/// Last Cramér–von Mises statistic of a score's window (`score`, `window`).
pub const DRIFT_STATISTIC: &str = "glowwatch_drift_statistic";
/// The threshold it is compared with (`score`, `window`).
pub const DRIFT_THRESHOLD: &str = "glowwatch_drift_threshold";
pub const CONSUMED: &str = "glowwatch_records_consumed_total";
/// Records scored.
pub const SCORED: &str = "glowwatch_records_scored_total";
/// Records flagged, by score.
pub const FLAGGED: &str = "glowwatch_records_flagged_total";
/// Dead letters, by reason.
pub const DEAD_LETTERS: &str = "glowwatch_dead_letters_total";
/// Micro-batch latency: dispatch -> durable.
pub const BATCH_SECONDS: &str = "glowwatch_batch_seconds";
/// End-to-end latency: message timestamp -> durable.
pub const END_TO_END_SECONDS: &str = "glowwatch_end_to_end_seconds";
/// Consumer lag per partition.
pub const CONSUMER_LAG: &str = "glowwatch_consumer_lag";
/// Batches waiting before a stage.
pub const QUEUE_DEPTH: &str = "glowwatch_queue_depth";
/// 1 while consumption is paused by back-pressure.
pub const PAUSED: &str = "glowwatch_consumer_paused";
/// Offset commits.
pub const COMMITS: &str = "glowwatch_commits_total";
/// Partition revocations and assignments.
pub const REBALANCES: &str = "glowwatch_rebalances_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the global Prometheus recorder (once per process; later calls return the same
/// handle). Its text is served at `/metrics` by the dashboard's server
/// ([`super::dashboard::server`]).
///
/// Errors: another recorder was installed first.
pub fn install() -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| PipelineError::Config(format!("metrics: {e}")))?
        .install_recorder()
        .map_err(|e| PipelineError::Config(format!("metrics: {e}")))?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

/// Depth of a bounded channel between two stages, kept beside it (std channels do not expose
/// their length) and published as `glowwatch_queue_depth{stage}`.
#[derive(Debug)]
pub struct QueueDepth {
    stage: &'static str,
    depth: AtomicI64,
}

impl QueueDepth {
    /// A gauge for the queue in front of `stage`.
    pub const fn new(stage: &'static str) -> Self {
        Self {
            stage,
            depth: AtomicI64::new(0),
        }
    }

    /// A batch entered the queue.
    pub fn push(&self) {
        let d = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(QUEUE_DEPTH, "stage" => self.stage).set(d as f64);
    }

    /// A batch left the queue.
    pub fn pop(&self) {
        let d = self.depth.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(QUEUE_DEPTH, "stage" => self.stage).set(d as f64);
    }
}

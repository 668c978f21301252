//! The streaming runner: Kafka consumer -> decode -> score + flag -> sinks (Kafka topics and/or
//! rolling Parquet files), one thread per stage, joined by bounded channels of
//! [`CHANNEL_DEPTH`] micro-batches, until stopped.
//!
//! **Delivery: at least once, nothing lost.** The consumer stores no offsets by itself
//! (`enable.auto.commit = false`). A micro-batch is acknowledged by the sink stage only when
//! every sink has made it durable (Kafka: the broker acknowledged every message; Parquet: the
//! file holding it was closed, fsynced and renamed, which happens at least every
//! `max_file_age_s`, 10 s by default). Acknowledgements go back to the consumer thread, which
//! commits per partition only the contiguous prefix of durable batches
//! ([`super::offsets::OffsetTracker`]). After a crash the group resumes from the last commit,
//! so duplicates come only from the uncommitted window; every output record carries
//! `(kafka_topic, kafka_partition, kafka_offset, model_id)` to remove them downstream.
//!
//! **Micro-batching**: a batch is dispatched when it holds `max_batch_rows` records or its
//! first record has waited `max_wait_ms`.
//!
//! **Back-pressure**: when the queue in front of decoding is full the consumer stops taking
//! messages, so librdkafka's prefetch queue fills (bounded: `queued.max.messages.kbytes`,
//! 16 MiB here, and `fetch.max.bytes`, 8 MiB) and fetching stops; when the stall lasts longer
//! than `pause_after_ms` (30 s: the scorer is stuck, not busy) the consumer also pauses its
//! partitions and polls only to stay in the group. Memory stays bounded by the channels and
//! that queue when producers outpace the scorer. (Pausing on every full queue would be simpler,
//! but librdkafka purges its prefetched messages on pause and discards in-flight fetches, so
//! every resume costs a fetch round trip. With a broker whose fetches are slow — tansu on SQLite
//! took 30 s to fetch 1 MiB from a partition 20,000 records deep — a 1 s pause threshold made a slow
//! scorer pause and resume once per batch and starve on discarded fetches.)
//!
//! **Rebalance**: on revocation the consumer asks the sinks to flush, waits up to
//! `drain_timeout_ms` for in-flight batches of the revoked partitions, commits what is durable
//! and forgets the rest (the new owner reads it again). **Shutdown** (the stop flag, set by
//! SIGINT/SIGTERM): stop consuming, dispatch what was read, drain every stage, flush the sinks,
//! commit, and return.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TrySendError, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMillisecondType;
use metrics::{counter, gauge, histogram};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use tracing::{info, warn};

use super::config::{KafkaSourceConfig, PipelineConfig, SourceKind};
use super::dashboard::{self, Board, BoardModels};
use super::decode::{BatchOrigin, ImageColumns, decode_batch};
use super::drift::DriftEvent;
use super::error_log::{ErrorLog, log_librdkafka};
use super::flag::Status;
use super::metrics::{self as m, QueueDepth};
use super::models::{LoadedModels, ModelWatcher, drift_monitor, load_scorer};
use super::offsets::{BatchSeq, OffsetTracker, PartitionRange, TopicPartition};
use super::run::merge_alarms;
use super::run::{join, run_id, send};
use super::schema::{dead_letter_schema, scored_schema};
use super::score::scored_batch;
use super::sink::{KafkaSink, ParquetSink};
use super::source::kafka::{
    KafkaRecord, envelope_dead_letters, kafka_input_schema, locate_dead_letters, records_to_batch,
};
use super::{PipelineError, Result};

/// Micro-batches that may wait between two stages.
pub const CHANNEL_DEPTH: usize = 2;

/// Default interval at which a streaming Parquet sink closes its file (and so lets offsets be
/// committed) when the sink config sets no `max_file_age_s`.
pub const DEFAULT_PARQUET_FLUSH_S: f64 = 10.0;

/// What a streaming run did before it was stopped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamSummary {
    /// Pipeline name.
    pub pipeline: String,
    /// Messages consumed.
    pub consumed: u64,
    /// Records scored.
    pub scored: u64,
    /// Records flagged.
    pub flagged: u64,
    /// Records with a non-finite likelihood.
    pub non_finite: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Dead letters by reason.
    pub dead_by_reason: BTreeMap<String, u64>,
    /// Successful offset commits.
    pub commits: u64,
    /// Records read but dropped because their partition was revoked before dispatch.
    pub dropped_on_revoke: u64,
    /// In-distribution model id.
    pub model_id: String,
    /// Scored Parquet files written.
    pub scored_files: Vec<String>,
    /// Dead-letter Parquet files written.
    pub dead_letter_files: Vec<String>,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// Drift alarms started, per watched score.
    pub drift_alarms: BTreeMap<String, u64>,
    /// Record (among the scored) of each score's first drift alarm.
    pub drift_first_alarm: BTreeMap<String, u64>,
}

/// State shared by the consumer loop and the rebalance callback (both run on the consumer
/// thread; the mutex is never held across `poll`).
struct Shared {
    tracker: OffsetTracker,
    acks: Receiver<BatchSeq>,
    commits: u64,
}

impl Shared {
    fn drain_acks(&mut self) {
        while let Ok(seq) = self.acks.try_recv() {
            self.tracker.complete(seq);
        }
    }

    /// Takes acknowledgements until `busy` is false, `deadline` passes or the sinks are gone.
    fn wait_acks(&mut self, deadline: Option<Instant>, busy: impl Fn(&OffsetTracker) -> bool) {
        while busy(&self.tracker) && deadline.is_none_or(|d| Instant::now() < d) {
            match self.acks.recv_timeout(Duration::from_millis(20)) {
                Ok(seq) => self.tracker.complete(seq),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }
}

struct StreamContext {
    errors: Arc<ErrorLog>,
    shared: Arc<Mutex<Shared>>,
    flush_now: Arc<AtomicBool>,
    drain_timeout: Duration,
    board: Option<Arc<Board>>,
}

impl ClientContext for StreamContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(&self.errors, "consumer", level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.errors
            .error("consumer", &format_args!("{error}: {reason}"));
    }

    fn stats(&self, s: Statistics) {
        for (topic, t) in &s.topics {
            for (p, ps) in &t.partitions {
                if *p >= 0 && ps.consumer_lag >= 0 {
                    gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => p.to_string())
                        .set(ps.consumer_lag as f64);
                    if let Some(b) = &self.board {
                        b.lag(topic, *p, ps.consumer_lag);
                    }
                }
            }
        }
    }
}

fn commit(consumer: &BaseConsumer<StreamContext>, commits: &[(TopicPartition, i64)]) -> bool {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in commits {
        if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
            warn!(topic = %t, partition = p, "commit list: {e}");
            return false;
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            counter!(m::COMMITS).increment(1);
            true
        }
        Err(e) => {
            warn!("offset commit failed (retried at the next commit): {e}");
            false
        }
    }
}

impl ConsumerContext for StreamContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        counter!(m::REBALANCES).increment(1);
        let Rebalance::Revoke(tpl) = r else {
            return;
        };
        let tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        self.flush_now.store(true, Ordering::SeqCst);
        let mut st = self.shared.lock().expect("consumer state");
        st.wait_acks(Some(Instant::now() + self.drain_timeout), |t| {
            tps.iter().any(|tp| t.in_flight(tp) > 0)
        });
        let abandoned: usize = tps.iter().map(|tp| st.tracker.in_flight(tp)).sum();
        let commits: Vec<(TopicPartition, i64)> = tps
            .iter()
            .filter_map(|tp| st.tracker.revoke(tp).map(|o| (tp.clone(), o)))
            .collect();
        if !commits.is_empty() && commit(consumer, &commits) {
            st.commits += 1;
        }
        info!(
            partitions = ?tps,
            committed = ?commits,
            abandoned_batches = abandoned,
            "partitions revoked"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            let tps: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            info!(partitions = ?tps, "partitions assigned");
        }
    }
}

/// A micro-batch on its way from the consumer to the sinks.
struct SourceBatch {
    seq: BatchSeq,
    dispatched: Instant,
    batch: RecordBatch,
    /// Dead letters made before decoding (unreadable envelopes).
    early_dead: Option<RecordBatch>,
}

struct Decoded {
    seq: BatchSeq,
    dispatched: Instant,
    rows: RecordBatch,
    pixels: Vec<u8>,
    dead: RecordBatch,
}

struct Out {
    seq: BatchSeq,
    dispatched: Instant,
    scored: RecordBatch,
    dead: RecordBatch,
    at: SystemTime,
    /// Drift alarms that started or cleared in this batch.
    alarms: Vec<DriftEvent>,
}

/// Builds the consumer of a Kafka source (manual commits; `options` override the defaults).
fn consumer(k: &KafkaSourceConfig, context: StreamContext) -> Result<BaseConsumer<StreamContext>> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.offset_reset)
        .set("statistics.interval.ms", "5000")
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "8388608");
    for (key, v) in &k.options {
        cc.set(key, v);
    }
    let c: BaseConsumer<StreamContext> = cc
        .create_with_context(context)
        .map_err(|e| PipelineError::Stage(format!("kafka consumer for {}: {e}", k.brokers)))?;
    let topics: Vec<&str> = k.topics.iter().map(String::as_str).collect();
    c.subscribe(&topics)
        .map_err(|e| PipelineError::Stage(format!("subscribing to {topics:?}: {e}")))?;
    Ok(c)
}

/// Splits read records into a batch to decode and early dead letters; records of partitions
/// revoked since they were read are dropped. Returns `None` when nothing is left.
fn build_batch(
    seq: BatchSeq,
    records: Vec<KafkaRecord>,
    tracker: &OffsetTracker,
    dropped: &mut u64,
) -> Result<Option<(SourceBatch, Vec<PartitionRange>)>> {
    let mut parts: BTreeMap<TopicPartition, (u64, i64)> = BTreeMap::new();
    let mut good = Vec::with_capacity(records.len());
    let mut bad = Vec::new();
    for r in records {
        let tp = (r.topic.clone(), r.partition);
        if r.generation != tracker.generation(&tp) {
            *dropped += 1;
            continue;
        }
        let e = parts.entry(tp).or_insert((r.generation, r.offset));
        e.1 = e.1.max(r.offset);
        if r.envelope_error.is_some() {
            bad.push(r);
        } else {
            good.push(r);
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let early_dead = if bad.is_empty() {
        None
    } else {
        let refs: Vec<&KafkaRecord> = bad.iter().collect();
        Some(envelope_dead_letters(&refs, SystemTime::now())?)
    };
    let batch = records_to_batch(&good)?;
    let parts = parts.into_iter().map(|(tp, (g, o))| (tp, g, o)).collect();
    Ok(Some((
        SourceBatch {
            seq,
            dispatched: Instant::now(),
            batch,
            early_dead,
        },
        parts,
    )))
}

/// Runs a Kafka pipeline until `stop` is set (then drains, flushes, commits and returns) or a
/// stage fails.
pub fn run_stream(cfg: &PipelineConfig, stop: &AtomicBool) -> Result<StreamSummary> {
    let started = Instant::now();
    let k = match (&cfg.source.kind, &cfg.source.kafka) {
        (SourceKind::Kafka, Some(k)) => k.clone(),
        _ => {
            return Err(PipelineError::Config(
                "run_stream needs a Kafka source ([source] kind = \"kafka\" with [source.kafka])"
                    .into(),
            ));
        }
    };
    let LoadedModels {
        mut scorer,
        mut flagger,
        calibration,
    } = load_scorer(cfg)?;
    let mut watcher = ModelWatcher::new(cfg, scorer.version())?;
    let served = dashboard::serve_pipeline(cfg, &scorer, &flagger, calibration.as_ref())?;
    let board = served.as_ref().map(|(b, _)| Arc::clone(b));
    let out_schema = scored_schema(&kafka_input_schema(), scorer.scales());
    let run = run_id();
    let mut scored_pq = cfg
        .sinks
        .scored
        .as_ref()
        .map(|c| ParquetSink::new(c, out_schema.clone(), &run))
        .transpose()?;
    let mut dead_pq = cfg
        .sinks
        .dead_letter
        .as_ref()
        .map(|c| ParquetSink::new(c, dead_letter_schema(), &run))
        .transpose()?;
    let flush_every = [&cfg.sinks.scored, &cfg.sinks.dead_letter]
        .iter()
        .filter_map(|s| s.as_ref())
        .map(|s| s.max_file_age_s.unwrap_or(DEFAULT_PARQUET_FLUSH_S))
        .fold(f64::INFINITY, f64::min);
    let kafka_sink = cfg
        .sinks
        .kafka
        .as_ref()
        .map(|c| KafkaSink::new(c, &k.brokers))
        .transpose()?;

    let (ack_tx, ack_rx) = channel::<BatchSeq>();
    let shared = Arc::new(Mutex::new(Shared {
        tracker: OffsetTracker::new(),
        acks: ack_rx,
        commits: 0,
    }));
    let flush_now = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(ErrorLog::new(Duration::from_secs(30)));
    let consumer = consumer(
        &k,
        StreamContext {
            errors: Arc::clone(&errors),
            shared: Arc::clone(&shared),
            flush_now: Arc::clone(&flush_now),
            drain_timeout: Duration::from_millis(k.drain_timeout_ms),
            board: board.clone(),
        },
    )?;
    info!(
        pipeline = %cfg.name,
        brokers = %k.brokers,
        group = %k.group,
        topics = ?k.topics,
        model = scorer.in_model_id(),
        "consuming"
    );

    let (src_tx, src_rx) = sync_channel::<SourceBatch>(CHANNEL_DEPTH);
    let (dec_tx, dec_rx) = sync_channel::<Decoded>(CHANNEL_DEPTH);
    let (out_tx, out_rx) = sync_channel::<Out>(CHANNEL_DEPTH);
    static DECODE_Q: QueueDepth = QueueDepth::new("decode");
    static SCORE_Q: QueueDepth = QueueDepth::new("score");
    static SINK_Q: QueueDepth = QueueDepth::new("sink");
    let image_columns = ImageColumns::encoded("image");
    let limits = cfg.decode.limits();
    let model_cfg = scorer.config().clone();
    let mut summary = StreamSummary {
        pipeline: cfg.name.clone(),
        model_id: scorer.in_model_id().to_string(),
        ..StreamSummary::default()
    };

    std::thread::scope(|s| -> Result<StreamSummary> {
        // Consumer: poll, micro-batch, dispatch (pausing when decoding is behind), commit.
        let consumer_h = s.spawn(|| -> Result<(u64, u64)> {
            let tx = src_tx;
            let mut consumed = 0u64;
            let mut dropped = 0u64;
            let mut seq: BatchSeq = 0;
            let mut pending: Vec<KafkaRecord> = Vec::new();
            let mut pending_since: Option<Instant> = None;
            let mut held: Option<(SourceBatch, Vec<PartitionRange>)> = None;
            let mut paused = false;
            let mut blocked_since: Option<Instant> = None;
            let pause_after = Duration::from_millis(k.pause_after_ms);
            let mut last_commit = Instant::now();
            let max_wait = Duration::from_millis(k.max_wait_ms);
            let commit_every = Duration::from_millis(k.commit_interval_ms);
            let commit_now = |force: bool, last: &mut Instant| {
                let mut st = shared.lock().expect("consumer state");
                st.drain_acks();
                if !force && last.elapsed() < commit_every {
                    return;
                }
                *last = Instant::now();
                let c = st.tracker.pending_commits();
                if !c.is_empty() && commit(&consumer, &c) {
                    st.tracker.committed(&c);
                    st.commits += 1;
                }
            };
            // A batch entered the decode queue: its offsets are tracked from now on.
            let dispatched = |seq: BatchSeq, parts: &[PartitionRange]| {
                DECODE_Q.push();
                shared
                    .lock()
                    .expect("consumer state")
                    .tracker
                    .dispatch(seq, parts);
            };
            let set_paused = |pause: bool| {
                if let Ok(a) = consumer.assignment() {
                    let r = if pause {
                        consumer.pause(&a)
                    } else {
                        consumer.resume(&a)
                    };
                    if let Err(e) = r {
                        warn!(pause, "pausing/resuming partitions: {e}");
                    }
                }
                gauge!(m::PAUSED).set(if pause { 1.0 } else { 0.0 });
            };
            loop {
                commit_now(false, &mut last_commit);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                // A batch refused by a full queue goes first. While it waits the consumer
                // takes no messages: librdkafka's prefetch queue (bounded) fills and fetching
                // stops. A stall longer than `pause_after_ms` pauses the partitions, and then
                // polling only serves the group (rebalances) until the batch is taken.
                if let Some((b, parts)) = held.take() {
                    let seq_b = b.seq;
                    match tx.try_send(b) {
                        Ok(()) => {
                            dispatched(seq_b, &parts);
                            blocked_since = None;
                            if paused {
                                set_paused(false);
                                paused = false;
                            }
                        }
                        Err(TrySendError::Full(b)) => {
                            held = Some((b, parts));
                            let since = *blocked_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= pause_after {
                                // Every time: an assignment may have arrived meanwhile.
                                set_paused(true);
                                paused = true;
                            }
                            if !paused {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            return Err(PipelineError::Stage(
                                "consumer: the decode stage stopped".into(),
                            ));
                        }
                    }
                }
                let timeout = if held.is_some() {
                    Duration::from_millis(20)
                } else {
                    match pending_since {
                        Some(t) => max_wait
                            .saturating_sub(t.elapsed())
                            .min(Duration::from_millis(100)),
                        None => Duration::from_millis(100),
                    }
                };
                match consumer.poll(timeout) {
                    Some(Ok(msg)) => {
                        errors.success("consumer");
                        let tp = (msg.topic().to_string(), msg.partition());
                        let generation = shared
                            .lock()
                            .expect("consumer state")
                            .tracker
                            .generation(&tp);
                        pending.push(KafkaRecord::from_message(&msg, k.format, generation));
                        pending_since.get_or_insert_with(Instant::now);
                        consumed += 1;
                        counter!(m::CONSUMED).increment(1);
                    }
                    Some(Err(e)) => errors.error("consumer", &e),
                    None => {}
                }
                let due = pending.len() >= k.max_batch_rows
                    || pending_since.is_some_and(|t| t.elapsed() >= max_wait);
                if held.is_none() && !pending.is_empty() && due {
                    seq += 1;
                    let records = std::mem::take(&mut pending);
                    pending_since = None;
                    let tracker_view = shared.lock().expect("consumer state");
                    let built = build_batch(seq, records, &tracker_view.tracker, &mut dropped)?;
                    drop(tracker_view);
                    held = built;
                }
            }
            // Stop: pause fetching, dispatch what was read (in order), then let the stages drain.
            set_paused(true);
            let mut queue: Vec<_> = held.take().into_iter().collect();
            if !pending.is_empty() {
                seq += 1;
                let st = shared.lock().expect("consumer state");
                let built =
                    build_batch(seq, std::mem::take(&mut pending), &st.tracker, &mut dropped)?;
                drop(st);
                queue.extend(built);
            }
            for (b, parts) in queue {
                let seq_b = b.seq;
                send(&tx, b, "consumer")?;
                dispatched(seq_b, &parts);
            }
            drop(tx);
            shared
                .lock()
                .expect("consumer state")
                .wait_acks(None, |t| t.in_flight_batches() > 0);
            commit_now(true, &mut last_commit);
            let st = shared.lock().expect("consumer state");
            info!(
                consumed,
                commits = st.commits,
                unfinished_batches = st.tracker.in_flight_batches(),
                "consumer stopped"
            );
            drop(st);
            consumer.unsubscribe();
            Ok((consumed, dropped))
        });

        let decode_h = s.spawn(move || -> Result<()> {
            let rx: Receiver<SourceBatch> = src_rx;
            for b in rx {
                DECODE_Q.pop();
                let at = SystemTime::now();
                let origin = BatchOrigin {
                    source: "kafka".into(),
                    row_group: None,
                    first_row: 0,
                };
                let d = decode_batch(
                    origin,
                    &b.batch,
                    &image_columns,
                    "id",
                    &model_cfg,
                    &limits,
                    at,
                )?;
                let mut dead = locate_dead_letters(&d.dead, &b.batch)?;
                if let Some(e) = b.early_dead {
                    dead = arrow::compute::concat_batches(&dead_letter_schema(), [&dead, &e])?;
                }
                send(
                    &dec_tx,
                    Decoded {
                        seq: b.seq,
                        dispatched: b.dispatched,
                        rows: d.rows,
                        pixels: d.pixels,
                        dead,
                    },
                    "decode",
                )?;
                SCORE_Q.push();
            }
            Ok(())
        });

        let ack_tx = ack_tx;
        let flush_now = Arc::clone(&flush_now);
        let sink_h = s.spawn(move || -> Result<(Vec<String>, Vec<String>)> {
            let has_parquet = scored_pq.is_some() || dead_pq.is_some();
            // Batches written to Parquet but not yet durable: (seq, dispatched, message times).
            let mut pending: Vec<(BatchSeq, Instant, Vec<i64>)> = Vec::new();
            let mut oldest: Option<Instant> = None;
            let ack = |pending: &mut Vec<(BatchSeq, Instant, Vec<i64>)>| {
                let now_ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                for (seq, dispatched, times) in pending.drain(..) {
                    histogram!(m::BATCH_SECONDS).record(dispatched.elapsed().as_secs_f64());
                    for t in times {
                        histogram!(m::END_TO_END_SECONDS).record((now_ms - t).max(0) as f64 / 1e3);
                    }
                    // The consumer may have stopped waiting (error path): nothing to do then.
                    let _ = ack_tx.send(seq);
                }
            };
            let flush = |scored_pq: &mut Option<ParquetSink>,
                         dead_pq: &mut Option<ParquetSink>|
             -> Result<()> {
                if let Some(p) = scored_pq {
                    p.flush()?;
                }
                if let Some(p) = dead_pq {
                    p.flush()?;
                }
                Ok(())
            };
            loop {
                match out_rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(o) => {
                        SINK_Q.pop();
                        if let Some(kafka) = &kafka_sink {
                            kafka.send_scored(&o.scored)?;
                            kafka.send_dead_letters(&o.dead)?;
                            kafka.send_alarms(&cfg.name, &o.alarms, o.at)?;
                        }
                        if let Some(p) = &mut scored_pq {
                            p.write(&o.scored, o.at)?;
                        }
                        if let Some(p) = &mut dead_pq {
                            p.write(&o.dead, o.at)?;
                        }
                        let times = o
                            .scored
                            .column_by_name("kafka_timestamp")
                            .map(|c| {
                                let c = c.as_primitive::<TimestampMillisecondType>();
                                c.iter().flatten().collect()
                            })
                            .unwrap_or_default();
                        pending.push((o.seq, o.dispatched, times));
                        oldest.get_or_insert_with(Instant::now);
                        if !has_parquet {
                            ack(&mut pending);
                            oldest = None;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                let due = oldest.is_some_and(|t| t.elapsed().as_secs_f64() >= flush_every)
                    || flush_now.swap(false, Ordering::SeqCst);
                if due && !pending.is_empty() {
                    flush(&mut scored_pq, &mut dead_pq)?;
                    ack(&mut pending);
                    oldest = None;
                }
            }
            flush(&mut scored_pq, &mut dead_pq)?;
            ack(&mut pending);
            if let Some(kafka) = &kafka_sink {
                kafka.flush(Duration::from_secs(30))?;
            }
            let files = |p: Option<ParquetSink>| -> Result<Vec<String>> {
                Ok(match p {
                    Some(p) => p
                        .close()?
                        .iter()
                        .map(|f| f.path.display().to_string())
                        .collect(),
                    None => vec![],
                })
            };
            Ok((files(scored_pq)?, files(dead_pq)?))
        });

        // Score + flag on this thread.
        let score_name = flagger.score.to_string();
        let mut drift = drift_monitor(cfg, &scorer, &flagger, calibration.as_ref())?;
        let score_result = (|| -> Result<()> {
            for d in dec_rx {
                SCORE_Q.pop();
                if let Some(w) = &mut watcher
                    && let Some(m) = w.poll(cfg, &scorer)
                {
                    (scorer, flagger) = (m.scorer, m.flagger);
                    if let Some(m) = drift.take() {
                        merge_alarms(&mut summary.drift_alarms, &mut summary.drift_first_alarm, m);
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
                    dashboard::observe_batch(
                        b, &scored, "id", &scores, &flags, &d.pixels, &d.dead, at,
                    );
                }
                let mut alarms = vec![];
                if let Some(m) = &mut drift {
                    alarms = m.observe(&scores);
                    if let Some(b) = &board {
                        b.drift(m.status(), &alarms, at);
                    }
                }
                let flagged = flags.iter().filter(|f| f.is_ood).count() as u64;
                summary.scored += scored.num_rows() as u64;
                summary.flagged += flagged;
                summary.non_finite += flags
                    .iter()
                    .filter(|f| f.status == Status::NonFinite)
                    .count() as u64;
                counter!(m::SCORED).increment(scored.num_rows() as u64);
                counter!(m::FLAGGED, "score" => score_name.clone()).increment(flagged);
                summary.dead_lettered += d.dead.num_rows() as u64;
                let reasons = d.dead.column(1).as_string::<i32>();
                for r in reasons.iter().flatten() {
                    *summary.dead_by_reason.entry(r.to_string()).or_default() += 1;
                    counter!(m::DEAD_LETTERS, "reason" => r.to_string()).increment(1);
                }
                send(
                    &out_tx,
                    Out {
                        seq: d.seq,
                        dispatched: d.dispatched,
                        scored,
                        dead: d.dead,
                        at,
                        alarms,
                    },
                    "score",
                )?;
                SINK_Q.push();
            }
            Ok(())
        })();
        drop(out_tx);
        let consumed = join(consumer_h, "consumer");
        let decoded = join(decode_h, "decode");
        let sunk = join(sink_h, "sink");
        let (consumed, dropped) = consumed?;
        decoded?;
        let (scored_files, dead_files) = sunk?;
        score_result?;
        if let Some(m) = drift.take() {
            merge_alarms(&mut summary.drift_alarms, &mut summary.drift_first_alarm, m);
        }
        summary.consumed = consumed;
        summary.dropped_on_revoke = dropped;
        summary.commits = shared.lock().expect("consumer state").commits;
        summary.scored_files = scored_files;
        summary.dead_letter_files = dead_files;
        summary.elapsed_s = started.elapsed().as_secs_f64();
        Ok(summary)
    })
}

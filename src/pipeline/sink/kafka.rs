//! Kafka sink: scored records to a topic (JSON per record, or one Arrow IPC stream per
//! micro-batch), dead letters to a dead-letter topic. Every `send_*` returns only when the
//! broker has acknowledged every message (`acks=all` by default), so the caller may treat
//! the batch as durable and commit its input offsets.
//!
//! Dead letters follow the Kafka Connect convention: the value is the original bytes, the key
//! the record id, and headers say what failed and where it came from
//! (`__connect.errors.topic`, `.partition`, `.offset`, `.exception.class.name` = reason,
//! `.exception.message` = detail).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::pipeline::error_log::{ErrorLog, LimitedLogContext};

use crate::pipeline::config::{KafkaSinkConfig, ScoredFormat};
use crate::pipeline::{PipelineError, Result};

/// Produces scored records and dead letters; see the module docs.
pub struct KafkaSink {
    producer: FutureProducer<LimitedLogContext>,
    errors: Arc<ErrorLog>,
    scored_topic: Option<String>,
    dead_letter_topic: Option<String>,
    alarm_topic: Option<String>,
    format: ScoredFormat,
    include_image: bool,
    runtime: tokio::runtime::Runtime,
}

fn kafka_err(what: &str, e: KafkaError) -> PipelineError {
    PipelineError::Stage(format!("kafka sink: {what}: {e}"))
}

impl KafkaSink {
    /// A producer for `config`; `default_brokers` are the source's.
    pub fn new(config: &KafkaSinkConfig, default_brokers: &str) -> Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set(
            "bootstrap.servers",
            config.brokers.as_deref().unwrap_or(default_brokers),
        )
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", "16777216");
        for (k, v) in &config.options {
            cc.set(k, v);
        }
        let errors = Arc::new(ErrorLog::new(Duration::from_secs(30)));
        let producer: FutureProducer<LimitedLogContext> = cc
            .create_with_context(LimitedLogContext {
                client: "producer",
                errors: Arc::clone(&errors),
            })
            .map_err(|e| kafka_err("creating the producer", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| PipelineError::Stage(format!("kafka sink runtime: {e}")))?;
        Ok(Self {
            producer,
            errors,
            scored_topic: config.scored_topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            alarm_topic: config.alarm_topic.clone(),
            format: config.format,
            include_image: config.include_image,
            runtime,
        })
    }

    /// Enqueues one message, waiting while the producer's queue is full.
    fn enqueue(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<DeliveryFuture> {
        let mut record = FutureRecord::to(topic).key(key).payload(value);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(kafka_err(&format!("producing to {topic}"), e)),
            }
        }
    }

    /// Waits for every delivery; the first failure is the error.
    fn wait(&self, topic: &str, futures: Vec<DeliveryFuture>) -> Result<()> {
        self.runtime.block_on(async {
            for f in futures {
                match f.await {
                    Ok(Ok(_)) => self.errors.success("producer"),
                    Ok(Err((e, _))) => {
                        return Err(kafka_err(&format!("delivery to {topic}"), e));
                    }
                    Err(_) => {
                        return Err(PipelineError::Stage(format!(
                            "kafka sink: delivery to {topic} cancelled"
                        )));
                    }
                }
            }
            Ok(())
        })
    }

    /// Sends scored records (schema: the Kafka input columns + score columns) and waits until
    /// the broker has them. Without a scored topic this does nothing.
    pub fn send_scored(&self, batch: &RecordBatch) -> Result<()> {
        let Some(topic) = &self.scored_topic else {
            return Ok(());
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = if self.include_image {
            batch.clone()
        } else {
            let keep: Vec<usize> = (0..batch.num_columns())
                .filter(|&i| batch.schema().field(i).name() != "image")
                .collect();
            batch.project(&keep)?
        };
        let ids = batch
            .column_by_name("id")
            .ok_or_else(|| PipelineError::Schema("scored batch has no `id`".into()))?
            .as_string::<i32>();
        let futures = match self.format {
            ScoredFormat::Json => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(&batch)?;
                w.finish()?;
                let buf = w.into_inner();
                let lines: Vec<&[u8]> = buf
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .collect();
                if lines.len() != batch.num_rows() {
                    return Err(PipelineError::Stage(format!(
                        "kafka sink: {} JSON lines for {} records",
                        lines.len(),
                        batch.num_rows()
                    )));
                }
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| self.enqueue(topic, ids.value(i), l, None))
                    .collect::<Result<Vec<_>>>()?
            }
            ScoredFormat::Arrow => {
                let mut buf = Vec::new();
                {
                    let mut w =
                        arrow::ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema())?;
                    w.write(&batch)?;
                    w.finish()?;
                }
                let headers = OwnedHeaders::new().insert(Header {
                    key: "glowwatch.rows",
                    value: Some(&batch.num_rows().to_string()),
                });
                vec![self.enqueue(topic, ids.value(0), &buf, Some(headers))?]
            }
        };
        self.wait(topic, futures)
    }

    /// Sends dead letters (schema [`crate::pipeline::schema::dead_letter_schema`], Kafka
    /// coordinates) and waits until the broker has them. Without a dead-letter topic this does
    /// nothing.
    pub fn send_dead_letters(&self, dead: &RecordBatch) -> Result<()> {
        let Some(topic) = &self.dead_letter_topic else {
            return Ok(());
        };
        let id = dead.column(0).as_string::<i32>();
        let reason = dead.column(1).as_string::<i32>();
        let detail = dead.column(2).as_string::<i32>();
        let source = dead.column(3).as_string::<i32>();
        let partition = dead.column(4).as_primitive::<UInt64Type>();
        let offset = dead.column(5).as_primitive::<UInt64Type>();
        let image = dead.column(6).as_binary::<i32>();
        let mut futures = Vec::with_capacity(dead.num_rows());
        for i in 0..dead.num_rows() {
            let src_topic = source
                .value(i)
                .strip_prefix("kafka:")
                .unwrap_or(source.value(i));
            let part = partition
                .is_valid(i)
                .then(|| partition.value(i).to_string());
            let off = offset.value(i).to_string();
            let mut h = OwnedHeaders::new()
                .insert(Header {
                    key: "__connect.errors.topic",
                    value: Some(src_topic),
                })
                .insert(Header {
                    key: "__connect.errors.offset",
                    value: Some(&off),
                })
                .insert(Header {
                    key: "__connect.errors.exception.class.name",
                    value: Some(reason.value(i)),
                })
                .insert(Header {
                    key: "__connect.errors.exception.message",
                    value: Some(detail.value(i)),
                });
            if let Some(p) = &part {
                h = h.insert(Header {
                    key: "__connect.errors.partition",
                    value: Some(p),
                });
            }
            let key = if id.is_valid(i) { id.value(i) } else { "" };
            let value: &[u8] = if image.is_valid(i) {
                image.value(i)
            } else {
                &[]
            };
            futures.push(self.enqueue(topic, key, value, Some(h))?);
        }
        self.wait(topic, futures)
    }

    /// Sends drift alarms that started or cleared (JSON: `pipeline`, `score`, `event` =
    /// `started` | `cleared`, `record`, `detail`, `at` RFC 3339), keyed by score, and waits
    /// until the broker has them. Without an alarm topic this does nothing.
    pub fn send_alarms(
        &self,
        pipeline: &str,
        events: &[crate::pipeline::drift::DriftEvent],
        at: std::time::SystemTime,
    ) -> Result<()> {
        let Some(topic) = &self.alarm_topic else {
            return Ok(());
        };
        let at = humantime::format_rfc3339_millis(at).to_string();
        let mut futures = Vec::with_capacity(events.len());
        for e in events {
            let value = serde_json::json!({
                "pipeline": pipeline,
                "score": e.score,
                "event": if e.started { "started" } else { "cleared" },
                "record": e.record,
                "detail": e.detail,
                "at": at,
            })
            .to_string();
            futures.push(self.enqueue(topic, &e.score, value.as_bytes(), None)?);
        }
        self.wait(topic, futures)
    }

    /// Waits for anything still queued in the producer (on shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer
            .flush(timeout)
            .map_err(|e| kafka_err("flush", e))
    }
}

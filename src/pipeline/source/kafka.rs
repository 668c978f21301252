//! Kafka source: messages -> Arrow records of [`kafka_input_schema`].
//!
//! A message's value is the encoded image, its key the record id (when there is no key the id
//! is `<topic>-<partition>-<offset>`; a key that is not UTF-8 is `hex:<its bytes>`), and the
//! headers `content-type` / `content_type`,
//! `source` and `capture-time` / `capture_time` (RFC 3339 or epoch milliseconds) become
//! columns. In JSON-envelope mode the value is
//! `{"id": ..., "image_b64": ..., "content_type": ..., "source": ..., "capture_time": ...}`
//! for producers that cannot set headers; a value that is not such an envelope becomes a
//! `bad_envelope` dead letter, never an error of the pipeline.
//!
//! Every record carries its coordinates (`kafka_topic`, `kafka_partition`, `kafka_offset`)
//! into the scored output so duplicates after a crash can be removed downstream.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit};
use base64::Engine;
use rdkafka::Message;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use serde::Deserialize;

use crate::pipeline::Result;
use crate::pipeline::config::MessageFormat;
use crate::pipeline::schema::{dead_letter_schema, timestamp_type};

/// Headers readable through librdkafka directly (both rdkafka header types).
pub trait AsBorrowedHeaders {
    /// The headers as rdkafka's zero-copy view.
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl AsBorrowedHeaders for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl AsBorrowedHeaders for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

/// A message's header names (lossily as UTF-8) and values, read through librdkafka's C API:
/// rdkafka's own `Headers` accessors panic on a header name that is not UTF-8
/// (`CStr::to_str().unwrap()`), which would take the consumer down on one odd message.
pub fn raw_headers(h: &BorrowedHeaders) -> Vec<(String, Option<&[u8]>)> {
    use rdkafka::bindings as rd;
    // `BorrowedHeaders` is rdkafka's zero-sized view whose address is the native
    // `rd_kafka_headers_t` (how rdkafka itself converts it).
    let ptr = h as *const BorrowedHeaders as *const rd::rd_kafka_headers_t;
    let n = unsafe { rd::rd_kafka_header_cnt(ptr) };
    (0..n)
        .filter_map(|idx| {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            // SAFETY: `ptr` is valid while `h` is borrowed; librdkafka returns pointers into
            // the headers it owns (name NUL-terminated, value of `size` bytes or null).
            let err =
                unsafe { rd::rd_kafka_header_get_all(ptr, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            let key = unsafe { std::ffi::CStr::from_ptr(name) };
            let value = (!value.is_null())
                .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) });
            Some((String::from_utf8_lossy(key.to_bytes()).into_owned(), value))
        })
        .collect()
}

/// The Arrow schema of records read from Kafka (what the scored output of a Kafka pipeline
/// starts with).
pub fn kafka_input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Binary, true),
        Field::new("content_type", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("capture_time", timestamp_type(), true),
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new(
            "kafka_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]))
}

/// One consumed message, before batching.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaRecord {
    /// Record id (key, envelope id, or coordinates).
    pub id: String,
    /// The encoded image (for a bad envelope: the original value).
    pub image: Option<Vec<u8>>,
    /// `content-type` header or envelope field.
    pub content_type: Option<String>,
    /// `source` header or envelope field.
    pub source: Option<String>,
    /// Capture time, microseconds since the epoch.
    pub capture_time_us: Option<i64>,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The message's timestamp (create or log-append time), milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Why the value is not a valid JSON envelope (envelope mode only).
    pub envelope_error: Option<String>,
    /// The partition's assignment generation when it was read (see
    /// [`crate::pipeline::offsets::OffsetTracker::generation`]).
    pub generation: u64,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    id: Option<serde_json::Value>,
    image_b64: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    capture_time: Option<serde_json::Value>,
}

/// Parses a capture time: RFC 3339 text or epoch milliseconds.
pub fn parse_capture_time(v: &str) -> Option<i64> {
    let v = v.trim();
    if let Ok(ms) = v.parse::<i64>() {
        return Some(ms.saturating_mul(1000));
    }
    let t = humantime::parse_rfc3339_weak(v).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(d.as_micros() as i64)
}

impl KafkaRecord {
    /// Reads a consumed message.
    pub fn from_message<M>(m: &M, format: MessageFormat, generation: u64) -> Self
    where
        M: Message,
        M::Headers: AsBorrowedHeaders,
    {
        let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
        // A key that is not UTF-8 becomes `hex:<bytes>`, so distinct keys stay distinct ids.
        let key_id = m.key().map(|k| match std::str::from_utf8(k) {
            Ok(k) => k.to_string(),
            Err(_) => format!("hex:{}", hex::encode(k)),
        });
        let mut r = KafkaRecord {
            id: key_id.unwrap_or_else(|| format!("{topic}-{partition}-{offset}")),
            image: m.payload().map(<[u8]>::to_vec),
            content_type: None,
            source: None,
            capture_time_us: None,
            topic,
            partition,
            offset,
            timestamp_ms: m.timestamp().to_millis(),
            envelope_error: None,
            generation,
        };
        if let Some(h) = m.headers() {
            for (key, value) in raw_headers(h.borrowed()) {
                let Some(v) = value.map(|v| String::from_utf8_lossy(v).into_owned()) else {
                    continue;
                };
                match key.as_str() {
                    "content-type" | "content_type" => r.content_type = Some(v),
                    "source" => r.source = Some(v),
                    "capture-time" | "capture_time" => r.capture_time_us = parse_capture_time(&v),
                    _ => {}
                }
            }
        }
        if format == MessageFormat::JsonEnvelope {
            r.open_envelope();
        }
        r
    }

    /// Replaces the value by the image inside a JSON envelope (envelope fields win over
    /// headers); on failure keeps the original value and notes why.
    pub fn open_envelope(&mut self) {
        let Some(value) = &self.image else {
            self.envelope_error = Some("empty value (no envelope)".into());
            return;
        };
        let e: Envelope = match serde_json::from_slice(value) {
            Ok(e) => e,
            Err(e) => {
                self.envelope_error = Some(format!("not a JSON envelope: {e}"));
                return;
            }
        };
        let image = match base64::engine::general_purpose::STANDARD.decode(e.image_b64.trim()) {
            Ok(b) => b,
            Err(err) => {
                self.envelope_error = Some(format!("image_b64 is not base64: {err}"));
                return;
            }
        };
        self.image = Some(image);
        match e.id {
            Some(serde_json::Value::String(s)) => self.id = s,
            Some(serde_json::Value::Null) | None => {}
            Some(v) => self.id = v.to_string(),
        }
        self.content_type = e.content_type.or(self.content_type.take());
        self.source = e.source.or(self.source.take());
        if let Some(t) = e.capture_time {
            let t = match t {
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            };
            self.capture_time_us = parse_capture_time(&t);
        }
    }
}

/// Records -> one Arrow batch of [`kafka_input_schema`].
pub fn records_to_batch(records: &[KafkaRecord]) -> Result<RecordBatch> {
    let col = |f: &dyn Fn(&KafkaRecord) -> Option<&str>| -> ArrayRef {
        Arc::new(records.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        col(&|r| Some(r.id.as_str())),
        Arc::new(
            records
                .iter()
                .map(|r| r.image.as_deref())
                .collect::<BinaryArray>(),
        ),
        col(&|r| r.content_type.as_deref()),
        col(&|r| r.source.as_deref()),
        Arc::new(
            TimestampMicrosecondArray::from(
                records
                    .iter()
                    .map(|r| r.capture_time_us)
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        col(&|r| Some(r.topic.as_str())),
        Arc::new(Int32Array::from_iter_values(
            records.iter().map(|r| r.partition),
        )),
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| r.offset),
        )),
        Arc::new(
            arrow::array::TimestampMillisecondArray::from(
                records.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(kafka_input_schema(), columns)?)
}

/// Dead-letter records for messages whose envelope could not be read: reason
/// `bad_envelope`, the original value, and Kafka coordinates (`source` = `kafka:<topic>`,
/// `row_group` = partition, `row` = offset).
pub fn envelope_dead_letters(
    records: &[&KafkaRecord],
    at: std::time::SystemTime,
) -> Result<RecordBatch> {
    let micros = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let n = records.len();
    Ok(RecordBatch::try_new(
        dead_letter_schema(),
        vec![
            Arc::new(StringArray::from_iter(records.iter().map(|r| Some(&r.id)))),
            Arc::new(StringArray::from(vec!["bad_envelope"; n])),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.envelope_error.as_deref()),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| format!("kafka:{}", r.topic)),
            )),
            Arc::new(UInt64Array::from_iter(
                records.iter().map(|r| Some(r.partition as u64)),
            )),
            Arc::new(UInt64Array::from_iter_values(
                records.iter().map(|r| r.offset as u64),
            )),
            Arc::new(BinaryArray::from_iter(
                records.iter().map(|r| r.image.as_deref()),
            )),
            Arc::new(TimestampMicrosecondArray::from(vec![micros; n]).with_timezone("UTC")),
        ],
    )?)
}

/// Rewrites the coordinates of dead letters that [`crate::pipeline::decode::decode_batch`]
/// made from `input` (decoded with `first_row = 0`, so `row` is the index into `input`)
/// into Kafka coordinates: `source` = `kafka:<topic>`, `row_group` = partition,
/// `row` = offset.
pub fn locate_dead_letters(dead: &RecordBatch, input: &RecordBatch) -> Result<RecordBatch> {
    let idx = dead
        .column(5)
        .as_primitive::<arrow::datatypes::UInt64Type>();
    let topics = input
        .column_by_name("kafka_topic")
        .expect("kafka input schema")
        .as_string::<i32>();
    let parts = input
        .column_by_name("kafka_partition")
        .expect("kafka input schema")
        .as_primitive::<Int32Type>();
    let offs = input
        .column_by_name("kafka_offset")
        .expect("kafka input schema")
        .as_primitive::<Int64Type>();
    let rows: Vec<usize> = idx.values().iter().map(|&i| i as usize).collect();
    let mut cols = dead.columns().to_vec();
    cols[3] = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|&i| format!("kafka:{}", topics.value(i))),
    ));
    cols[4] = Arc::new(UInt64Array::from_iter(
        rows.iter().map(|&i| Some(parts.value(i) as u64)),
    ));
    cols[5] = Arc::new(UInt64Array::from_iter_values(
        rows.iter().map(|&i| offs.value(i) as u64),
    ));
    Ok(RecordBatch::try_new(dead.schema(), cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn message(key: Option<&[u8]>, value: Option<&[u8]>, headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "images".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            2,
            41,
            Some(headers),
        )
    }

    #[test]
    fn key_headers_and_coordinates_become_columns() {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("image/png"),
            })
            .insert(Header {
                key: "source",
                value: Some("cam-7"),
            })
            .insert(Header {
                key: "capture-time",
                value: Some("2026-11-29T03:00:00Z"),
            });
        let r = KafkaRecord::from_message(
            &message(Some(b"img-1"), Some(b"\x89PNG"), h),
            MessageFormat::Image,
            3,
        );
        assert_eq!(r.id, "img-1");
        assert_eq!(r.content_type.as_deref(), Some("image/png"));
        assert_eq!(r.source.as_deref(), Some("cam-7"));
        assert_eq!(
            r.capture_time_us,
            parse_capture_time("2026-11-29T03:00:00Z")
        );
        assert_eq!((r.partition, r.offset, r.generation), (2, 41, 3));
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_000));
        // No key: the coordinates are the id.
        let r = KafkaRecord::from_message(
            &message(None, None, OwnedHeaders::new()),
            MessageFormat::Image,
            0,
        );
        assert_eq!(r.id, "images-2-41");
        assert_eq!(r.image, None);
        let b = records_to_batch(&[r]).unwrap();
        assert_eq!(b.schema(), kafka_input_schema());
        assert!(b.column(1).is_null(0));
        assert_eq!(
            parse_capture_time("1700000000000"),
            Some(1_700_000_000_000_000)
        );
    }

    #[test]
    fn envelopes_are_opened_or_dead_lettered() {
        let good = br#"{"id": 17, "image_b64": "iVBORw==", "source": "cam", "capture_time": 5}"#;
        let r = KafkaRecord::from_message(
            &message(None, Some(good), OwnedHeaders::new()),
            MessageFormat::JsonEnvelope,
            0,
        );
        assert_eq!(r.envelope_error, None);
        assert_eq!(r.id, "17");
        assert_eq!(r.image.as_deref(), Some(&b"\x89PNG"[..]));
        assert_eq!(r.source.as_deref(), Some("cam"));
        assert_eq!(r.capture_time_us, Some(5000));
        for bad in [
            &b"not json"[..],
            br#"{"id": "x"}"#,
            br#"{"image_b64": "@@@"}"#,
        ] {
            let r = KafkaRecord::from_message(
                &message(Some(b"k"), Some(bad), OwnedHeaders::new()),
                MessageFormat::JsonEnvelope,
                0,
            );
            assert!(r.envelope_error.is_some(), "{bad:?}");
            assert_eq!(r.image.as_deref(), Some(bad), "original bytes kept");
            let d = envelope_dead_letters(&[&r], std::time::SystemTime::now()).unwrap();
            assert_eq!(d.column(1).as_string::<i32>().value(0), "bad_envelope");
            assert_eq!(d.column(3).as_string::<i32>().value(0), "kafka:images");
            assert_eq!(
                d.column(5)
                    .as_primitive::<arrow::datatypes::UInt64Type>()
                    .value(0),
                41
            );
        }
    }

    /// Regression: a header name that is not UTF-8 panicked inside rdkafka's header accessor.
    #[test]
    fn a_header_name_that_is_not_utf8_is_read_not_a_panic() {
        use rdkafka::bindings as rd;
        let h = OwnedHeaders::new().insert(Header {
            key: "source",
            value: Some(&b"cam-\xff"[..]),
        });
        let ptr = h.as_borrowed() as *const BorrowedHeaders as *mut rd::rd_kafka_headers_t;
        let name = b"bad-\xfe-name";
        let value = b"x";
        let err = unsafe {
            rd::rd_kafka_header_add(
                ptr,
                name.as_ptr() as *const std::ffi::c_char,
                name.len() as isize,
                value.as_ptr() as *const std::ffi::c_void,
                value.len() as isize,
            )
        };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        let r =
            KafkaRecord::from_message(&message(None, Some(b"\x89PNG"), h), MessageFormat::Image, 1);
        assert_eq!(r.source.as_deref(), Some("cam-\u{fffd}"));
        assert_eq!(r.id, "images-2-41");
    }
}

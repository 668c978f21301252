//! Sinks: where records go. [`parquet`] writes rolling, atomically renamed Parquet files in
//! Hive-style partitions; the dead-letter output is a second Parquet sink with its own schema
//! ([`crate::pipeline::schema::dead_letter_schema`]). [`kafka`] produces scored records and
//! dead letters to topics and reports when they are durable.

pub mod kafka;
pub mod parquet;

pub use self::kafka::KafkaSink;
pub use self::parquet::{ParquetSink, WrittenFile};

//! Sinks: where records go. [`parquet`] writes rolling, atomically renamed Parquet files in
//! Hive-style partitions; the dead-letter output is a second Parquet sink with its own schema
//! ([`crate::pipeline::schema::dead_letter_schema`]).

pub mod parquet;

pub use self::parquet::{ParquetSink, WrittenFile};

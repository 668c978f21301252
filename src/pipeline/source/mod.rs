//! Sources: where records come from. [`parquet`] reads files row group by row group;
//! [`kafka`] turns consumed messages into records (the consumer itself lives in
//! [`crate::pipeline::stream`]).

pub mod kafka;
pub mod parquet;

pub use self::parquet::{ParquetSource, RowGroupRef};

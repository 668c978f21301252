//! Sources: where records come from. [`parquet`] reads files row group by row group.

pub mod parquet;

pub use self::parquet::{ParquetSource, RowGroupRef};

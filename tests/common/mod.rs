//! Helpers shared by the integration tests: paths of the shared real datasets and small
//! Parquet subsets of them written with the parquet crate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;

/// A file of `../shared/datasets` (present locally and in CI).
pub fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/datasets")
        .join(name)
}

/// Writes the first `rows` rows of `src` to `dst` in row groups of `group` rows.
pub fn subset(src: &Path, rows: usize, group: usize, dst: &Path) -> PathBuf {
    let f = std::fs::File::open(src).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .with_batch_size(rows)
        .with_limit(rows)
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
    let schema = batches[0].schema();
    let out = std::fs::File::create(dst).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut w = ArrowWriter::try_new(out, Arc::clone(&schema), Some(props)).unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    dst.to_path_buf()
}

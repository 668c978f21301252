//! Rolling Parquet sink. Files are written under a hidden temporary name (`.part-*.tmp`, which
//! readers and [`crate::pipeline::source::ParquetSource`] skip), then on roll or close:
//! footer written, fsync, rename to `part-<run>-<n>.parquet`, fsync of the directory. An
//! interrupted run therefore never leaves a partial file under a final name. Files roll by
//! rows, bytes and age; partitions are `date=YYYY-MM-DD[/hour=HH]` of the processing time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::fsutil::{sync_dir, temp_path};
use crate::pipeline::config::{ParquetSinkConfig, Partitioning};
use crate::pipeline::{PipelineError, Result};

/// Parses a compression name.
pub fn compression(name: &str) -> std::result::Result<Compression, String> {
    Ok(match name {
        "zstd" => Compression::ZSTD(ZstdLevel::default()),
        "snappy" => Compression::SNAPPY,
        "lz4" => Compression::LZ4_RAW,
        "none" | "uncompressed" => Compression::UNCOMPRESSED,
        other => {
            return Err(format!(
                "unknown compression `{other}` (zstd, snappy, lz4 or none)"
            ));
        }
    })
}

/// A file the sink finished (durable under its final name).
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    /// Final path.
    pub path: PathBuf,
    /// Rows in it.
    pub rows: usize,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    partition: String,
    rows: usize,
    opened: Instant,
}

/// A rolling Parquet writer for one schema.
pub struct ParquetSink {
    config: ParquetSinkConfig,
    schema: SchemaRef,
    props: WriterProperties,
    run_id: String,
    seq: usize,
    open: Option<OpenFile>,
    written: Vec<WrittenFile>,
}

/// The partition directory (relative) of a processing time.
pub fn partition_dir(p: Partitioning, at: SystemTime) -> String {
    let ts = humantime::format_rfc3339_seconds(at).to_string(); // 2026-11-28T21:33:45Z
    let (date, hour) = (&ts[..10], &ts[11..13]);
    match p {
        Partitioning::None => String::new(),
        Partitioning::Date => format!("date={date}"),
        Partitioning::DateHour => format!("date={date}/hour={hour}"),
    }
}

/// Whether `name` is one of this sink's own temporary files (`.part-*.parquet.tmp`).
pub fn is_own_temp(name: &str) -> bool {
    name.starts_with(".part-") && name.ends_with(".parquet.tmp")
}

/// Whether `name` is a file this sink finished (`part-<run>-<seq>.parquet`).
pub fn is_own_file(name: &str) -> bool {
    name.starts_with("part-") && name.ends_with(".parquet")
}

/// Removes the temporary files a killed run left under `dir` (partition folders included) and
/// returns how many. Only this sink's own pattern is touched; one pipeline writes a directory.
fn remove_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            removed += remove_leftovers(&path);
        } else if is_own_temp(&name) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl ParquetSink {
    /// A sink writing `schema` records under `config.path`; `run_id` makes file names unique
    /// across runs.
    pub fn new(config: &ParquetSinkConfig, schema: SchemaRef, run_id: &str) -> Result<Self> {
        let c = compression(&config.compression).map_err(PipelineError::Config)?;
        let removed = remove_leftovers(&config.path);
        if removed > 0 {
            tracing::info!(
                path = %config.path.display(),
                removed,
                "removed temporary files left by an interrupted run"
            );
        }
        let props = WriterProperties::builder()
            .set_compression(c)
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .build();
        Ok(Self {
            config: config.clone(),
            schema,
            props,
            run_id: run_id.into(),
            seq: 0,
            open: None,
            written: Vec::new(),
        })
    }

    /// Appends a batch (its schema must be the sink's), rolling files as configured.
    pub fn write(&mut self, batch: &RecordBatch, at: SystemTime) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.schema().fields() != self.schema.fields() {
            return Err(PipelineError::Schema(format!(
                "sink {} got a batch with schema {:?}, expected {:?}",
                self.config.path.display(),
                batch.schema().fields(),
                self.schema.fields()
            )));
        }
        let partition = partition_dir(self.config.partition, at);
        let roll = match &self.open {
            None => false,
            Some(f) => {
                f.partition != partition
                    || f.rows >= self.config.max_file_rows
                    || f.writer.bytes_written() + f.writer.in_progress_size()
                        >= self.config.max_file_bytes
                    || self
                        .config
                        .max_file_age_s
                        .is_some_and(|s| f.opened.elapsed().as_secs_f64() >= s)
            }
        };
        if roll {
            self.finish_file()?;
        }
        if self.open.is_none() {
            self.open_file(&partition)?;
        }
        // Split so no file exceeds max_file_rows.
        let mut offset = 0;
        while offset < batch.num_rows() {
            let f = self.open.as_mut().expect("open file");
            let room = self.config.max_file_rows.saturating_sub(f.rows).max(1);
            let n = room.min(batch.num_rows() - offset);
            let part = batch.slice(offset, n);
            f.writer.write(&part).map_err(|e| self.parquet_err(e))?;
            let f = self.open.as_mut().expect("open file");
            f.rows += n;
            offset += n;
            if offset < batch.num_rows() {
                self.finish_file()?;
                self.open_file(&partition)?;
            }
        }
        Ok(())
    }

    fn parquet_err(&self, source: parquet::errors::ParquetError) -> PipelineError {
        PipelineError::Parquet {
            path: self.config.path.display().to_string(),
            source,
        }
    }

    fn io_err(path: &Path) -> impl Fn(std::io::Error) -> PipelineError + '_ {
        move |source| PipelineError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn open_file(&mut self, partition: &str) -> Result<()> {
        let dir = if partition.is_empty() {
            self.config.path.clone()
        } else {
            self.config.path.join(partition)
        };
        std::fs::create_dir_all(&dir).map_err(Self::io_err(&dir))?;
        self.seq += 1;
        let path = dir.join(format!("part-{}-{:05}.parquet", self.run_id, self.seq));
        let tmp = temp_path(&path);
        let file = File::create(&tmp).map_err(Self::io_err(&tmp))?;
        let writer = ArrowWriter::try_new(file, Arc::clone(&self.schema), Some(self.props.clone()))
            .map_err(|e| self.parquet_err(e))?;
        self.open = Some(OpenFile {
            writer,
            tmp,
            path,
            partition: partition.into(),
            rows: 0,
            opened: Instant::now(),
        });
        Ok(())
    }

    fn finish_file(&mut self) -> Result<()> {
        let Some(f) = self.open.take() else {
            return Ok(());
        };
        let file = f.writer.into_inner().map_err(|e| self.parquet_err(e))?;
        file.sync_all().map_err(Self::io_err(&f.tmp))?;
        drop(file);
        std::fs::rename(&f.tmp, &f.path).map_err(Self::io_err(&f.path))?;
        if let Some(dir) = f.path.parent() {
            sync_dir(dir);
        }
        self.written.push(WrittenFile {
            path: f.path,
            rows: f.rows,
        });
        Ok(())
    }

    /// Makes everything written so far durable under final names (closes the open file; the
    /// next write opens a new one).
    pub fn flush(&mut self) -> Result<()> {
        self.finish_file()
    }

    /// Closes the sink; returns every file it wrote.
    pub fn close(mut self) -> Result<Vec<WrittenFile>> {
        self.finish_file()?;
        Ok(std::mem::take(&mut self.written))
    }

    /// Files finished so far.
    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        // Abandoned (error path): remove the hidden temporary file rather than leave it.
        if let Some(f) = self.open.take() {
            let _ = std::fs::remove_file(&f.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn cfg(dir: &Path, max_rows: usize) -> ParquetSinkConfig {
        ParquetSinkConfig {
            path: dir.to_path_buf(),
            partition: Partitioning::DateHour,
            compression: "zstd".into(),
            row_group_rows: 4,
            max_file_rows: max_rows,
            max_file_bytes: 1 << 30,
            max_file_age_s: None,
        }
    }

    #[test]
    fn rolls_by_rows_and_partitions_by_hour() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let mut sink = ParquetSink::new(&cfg(dir.path(), 10), schema.clone(), "r1").unwrap();
        let batch = |n: i32| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int32Array::from_iter_values(0..n))],
            )
            .unwrap()
        };
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_366_000);
        sink.write(&batch(7), t0).unwrap();
        // Nothing visible under a final name until the file is finished.
        assert!(sink.written().is_empty());
        sink.write(&batch(7), t0).unwrap(); // 14 rows -> a file of 10, then 4
        let t1 = t0 + std::time::Duration::from_secs(3600);
        sink.write(&batch(3), t1).unwrap(); // new hour -> new file
        let files = sink.close().unwrap();
        let rows: Vec<usize> = files.iter().map(|f| f.rows).collect();
        assert_eq!(rows, vec![10, 4, 3]);
        let p = |f: &WrittenFile| {
            f.path
                .strip_prefix(dir.path())
                .unwrap()
                .display()
                .to_string()
        };
        assert!(
            p(&files[0]).starts_with("date=2025-11-28/hour=21/part-r1-"),
            "{}",
            p(&files[0])
        );
        assert!(
            p(&files[2]).starts_with("date=2025-11-28/hour=22/"),
            "{}",
            p(&files[2])
        );
        // Files are complete Parquet files with the rows.
        let total: usize = files
            .iter()
            .map(|f| {
                let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                    File::open(&f.path).unwrap(),
                )
                .unwrap()
                .build()
                .unwrap();
                r.map(|b| b.unwrap().num_rows()).sum::<usize>()
            })
            .sum();
        assert_eq!(total, 17);
    }

    #[test]
    fn abandoned_sink_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let mut c = cfg(dir.path(), 100);
        c.partition = Partitioning::None;
        let mut sink = ParquetSink::new(&c, schema.clone(), "r").unwrap();
        let b = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2]))]).unwrap();
        sink.write(&b, SystemTime::now()).unwrap();
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn leftover_temporary_files_of_a_killed_run_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("date=2026-11-30");
        std::fs::create_dir_all(&part).unwrap();
        for f in [
            dir.path().join(".part-old-00001.parquet.tmp"),
            part.join(".part-old-00002.parquet.tmp"),
            dir.path().join("part-done-00001.parquet"),
            dir.path().join(".someone-else.tmp"),
            dir.path().join("notes.parquet.tmp"),
        ] {
            std::fs::write(f, b"x").unwrap();
        }
        let schema = Arc::new(arrow::datatypes::Schema::empty());
        ParquetSink::new(
            &ParquetSinkConfig::unpartitioned(dir.path().to_path_buf()),
            schema,
            "new",
        )
        .unwrap();
        let mut left: Vec<String> = walkdir(dir.path());
        left.sort();
        assert_eq!(
            left,
            [
                ".someone-else.tmp",
                "notes.parquet.tmp",
                "part-done-00001.parquet"
            ]
        );
    }

    fn walkdir(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                if e.path().is_dir() {
                    walkdir(&e.path())
                } else {
                    vec![e.file_name().to_string_lossy().into_owned()]
                }
            })
            .collect()
    }
}

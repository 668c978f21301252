//! Parquet source: one or many files, or directories searched recursively for `*.parquet`,
//! read one row group at a time so memory is bounded by a row group, not by the dataset.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::basic::Type as PhysicalType;

use crate::pipeline::{PipelineError, Result};

/// One row group of one file, with its position in the whole source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroupRef {
    /// Index into [`ParquetSource::files`].
    pub file: usize,
    /// Row group index within that file.
    pub index: usize,
    /// Rows in the row group.
    pub rows: usize,
    /// Row number of its first row within its file.
    pub first_row: u64,
}

/// A set of Parquet files sharing one Arrow schema.
#[derive(Debug, Clone)]
pub struct ParquetSource {
    files: Vec<PathBuf>,
    schema: SchemaRef,
    row_groups: Vec<RowGroupRef>,
}

fn parquet_err(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> PipelineError + '_ {
    move |source| PipelineError::Parquet {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a file for reading. INT96 timestamps (Spark's, Impala's) are read as microseconds:
/// the Arrow reader's default, nanoseconds, wraps every date outside 1677-2262 silently
/// (year 1000 came out as 2169), whatever Arrow schema the footer holds.
fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let f = File::open(path).map_err(|source| PipelineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let meta =
        ArrowReaderMetadata::load(&f, ArrowReaderOptions::new()).map_err(parquet_err(path))?;
    let meta = match int96_as_micros(&meta) {
        Some(hint) => ArrowReaderMetadata::try_new(
            Arc::clone(meta.metadata()),
            ArrowReaderOptions::new().with_schema(hint),
        )
        .map_err(parquet_err(path))?,
        None => meta,
    };
    Ok(ParquetRecordBatchReaderBuilder::new_with_metadata(f, meta))
}

/// The file's Arrow schema with every top-level INT96 column as Timestamp(µs), or `None` when
/// it has none. Microseconds span ±290,000 years; INT96's nanosecond digits below a
/// microsecond are dropped.
fn int96_as_micros(meta: &ArrowReaderMetadata) -> Option<SchemaRef> {
    let roots = meta.parquet_schema().root_schema().get_fields();
    let base = meta.schema();
    let mut changed = false;
    let fields: Vec<FieldRef> = base
        .fields()
        .iter()
        .zip(roots)
        .map(|(f, t)| {
            let int96 = t.is_primitive() && t.get_physical_type() == PhysicalType::INT96;
            match f.data_type() {
                DataType::Timestamp(unit, tz) if int96 && *unit != TimeUnit::Microsecond => {
                    changed = true;
                    Arc::new(
                        f.as_ref()
                            .clone()
                            .with_data_type(DataType::Timestamp(TimeUnit::Microsecond, tz.clone())),
                    )
                }
                _ => Arc::clone(f),
            }
        })
        .collect();
    changed.then(|| Arc::new(Schema::new_with_metadata(fields, base.metadata().clone())))
}

/// The type two files' columns are read as when they differ only in encoding: the string
/// types (`string`, `large_string`, `string_view`, as pyarrow, polars and others write them)
/// as `string`, the binary types as `binary`, dictionary-encoded values as their value type.
/// `None` when they hold different kinds of values.
pub fn unify(a: &DataType, b: &DataType) -> Option<DataType> {
    use DataType::*;
    if a == b {
        return Some(a.clone());
    }
    let plain = |t: &DataType| match t {
        Dictionary(_, v) => v.as_ref().clone(),
        t => t.clone(),
    };
    let (a, b) = (plain(a), plain(b));
    match (&a, &b) {
        _ if a == b => Some(a),
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => Some(Utf8),
        (Binary | LargeBinary | BinaryView, Binary | LargeBinary | BinaryView) => Some(Binary),
        _ => None,
    }
}

/// The Parquet files at `path` (the file itself, or every `*.parquet` below a directory, skipping
/// hidden and `_`-prefixed entries), in sorted order.
pub fn parquet_files(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect_files(path, &mut out)?;
    Ok(out)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| PipelineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| PipelineError::Io {
            path: path.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Hidden and temporary files (e.g. a sink's in-progress `.tmp`) are not data.
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        if e.is_dir() {
            collect_files(&e, out)?;
        } else if name.ends_with(".parquet") {
            out.push(e);
        }
    }
    Ok(())
}

fn describe(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ParquetSource {
    /// Opens files and directories (recursively, sorted by path). Every file must have the
    /// same columns as the first, holding the same kinds of values ([`unify`]).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        for p in paths {
            collect_files(p, &mut files)?;
        }
        if files.is_empty() {
            return Err(PipelineError::Schema(format!(
                "no Parquet files found in {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut schema: Option<Schema> = None;
        let mut row_groups = Vec::new();
        for (fi, path) in files.iter().enumerate() {
            let b = open(path)?;
            let this = b.schema();
            match &mut schema {
                None => schema = Some(this.as_ref().clone()),
                Some(s) => {
                    let names = |s: &Schema| {
                        s.fields()
                            .iter()
                            .map(|f| f.name().clone())
                            .collect::<Vec<_>>()
                    };
                    let unified: Option<Vec<Field>> = (names(s) == names(this))
                        .then(|| {
                            s.fields()
                                .iter()
                                .zip(this.fields())
                                .map(|(a, b)| {
                                    let ty = unify(a.data_type(), b.data_type())?;
                                    // A column nullable in any file is nullable.
                                    Some(
                                        a.as_ref()
                                            .clone()
                                            .with_data_type(ty)
                                            .with_nullable(a.is_nullable() || b.is_nullable()),
                                    )
                                })
                                .collect()
                        })
                        .flatten();
                    let Some(fields) = unified else {
                        return Err(PipelineError::Schema(format!(
                            "{} has columns {}, but {} has {}",
                            path.display(),
                            describe(this),
                            files[0].display(),
                            describe(s)
                        )));
                    };
                    *s = Schema::new_with_metadata(fields, s.metadata().clone());
                }
            }
            let mut first_row = 0u64;
            for (index, rg) in b.metadata().row_groups().iter().enumerate() {
                let rows = rg.num_rows() as usize;
                row_groups.push(RowGroupRef {
                    file: fi,
                    index,
                    rows,
                    first_row,
                });
                first_row += rows as u64;
            }
        }
        Ok(Self {
            files,
            schema: Arc::new(schema.expect("at least one file")),
            row_groups,
        })
    }

    /// The files, in reading order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The Arrow schema shared by every file.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Every row group of every file, in file order.
    pub fn row_groups(&self) -> &[RowGroupRef] {
        &self.row_groups
    }

    /// Total number of rows.
    pub fn total_rows(&self) -> u64 {
        self.row_groups.iter().map(|r| r.rows as u64).sum()
    }

    /// Checks that `column` exists; returns its index.
    pub fn column_index(&self, column: &str) -> Result<usize> {
        self.schema.index_of(column).map_err(|_| {
            PipelineError::Schema(format!(
                "{} has no column `{column}` (columns: {})",
                self.files[0].display(),
                self.schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Reads one row group, only the named top-level columns, as one record batch.
    pub fn read(&self, rg: &RowGroupRef, columns: &[&str]) -> Result<RecordBatch> {
        let path = &self.files[rg.file];
        let b = open(path)?;
        let roots = columns
            .iter()
            .map(|c| self.column_index(c))
            .collect::<Result<Vec<_>>>()?;
        let mask = ProjectionMask::roots(b.parquet_schema(), roots.clone());
        let reader = b
            .with_row_groups(vec![rg.index])
            .with_projection(mask)
            .with_batch_size(rg.rows.max(1))
            .build()
            .map_err(parquet_err(path))?;
        let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
        // Batches carry the source's merged schema (nullability widened over all files).
        let mut roots_sorted = roots;
        roots_sorted.sort_unstable();
        let schema = Arc::new(self.schema.project(&roots_sorted)?);
        let Some(first) = batches.first() else {
            return Ok(RecordBatch::new_empty(schema));
        };
        let batch = arrow::compute::concat_batches(&first.schema(), &batches)?;
        // Columns this file encodes differently from the source's unified types are cast.
        let columns = batch
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(Arc::clone(c))
                } else {
                    arrow::compute::cast(c, f.data_type())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_encodings_unify_and_different_kinds_do_not() {
        use DataType::*;
        let dict = |v: DataType| Dictionary(Box::new(Int32), Box::new(v));
        assert_eq!(unify(&Utf8, &LargeUtf8), Some(Utf8));
        assert_eq!(unify(&Utf8View, &Utf8), Some(Utf8));
        assert_eq!(unify(&LargeBinary, &Binary), Some(Binary));
        assert_eq!(unify(&dict(Binary), &LargeBinary), Some(Binary));
        assert_eq!(unify(&dict(Utf8), &dict(Utf8)), Some(dict(Utf8)));
        assert_eq!(unify(&Int64, &Int64), Some(Int64));
        assert_eq!(unify(&Utf8, &Binary), None);
        assert_eq!(unify(&Int32, &Int64), None);
    }
}

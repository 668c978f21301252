//! Output formats of `glowwatch sql`: an aligned table, CSV, JSON lines or Parquet.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::pipeline::decode::{binary_values, is_byte_column};

/// How results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text table (binary values shown as `<N bytes>`).
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per row.
    Json,
    /// Parquet (needs an output file).
    Parquet,
}

/// Writes `batches` in `format` to `out`.
pub fn write(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            let shown: Vec<RecordBatch> = batches
                .iter()
                .map(abbreviate_binary)
                .collect::<anyhow::Result<_>>()?;
            if shown.is_empty() {
                let empty = abbreviate_binary(&RecordBatch::new_empty(schema.clone()))?;
                writeln!(
                    out,
                    "{}",
                    arrow::util::pretty::pretty_format_batches(&[empty])?
                )?;
            } else {
                writeln!(
                    out,
                    "{}",
                    arrow::util::pretty::pretty_format_batches(&shown)?
                )?;
            }
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            if batches.is_empty() {
                w.write(&RecordBatch::new_empty(schema.clone()))?;
            }
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Parquet => {
            let mut buf = Vec::new();
            {
                let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema.clone(), None)?;
                for b in batches {
                    w.write(b)?;
                }
                w.close()?;
            }
            out.write_all(&buf)?;
        }
    }
    Ok(())
}

/// Replaces binary columns by `<N bytes>` strings: an image in a text table is noise.
fn abbreviate_binary(b: &RecordBatch) -> anyhow::Result<RecordBatch> {
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        if is_byte_column(f.data_type()) {
            let v = binary_values(c)?;
            let s: StringArray = v
                .iter()
                .map(|x| x.map(|x| format!("<{} bytes>", x.len())))
                .collect();
            fields.push(Field::new(f.name(), DataType::Utf8, true));
            cols.push(Arc::new(s));
        } else {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
        }
    }
    let schema = Arc::new(Schema::new(fields));
    if cols.is_empty() || cols[0].is_empty() {
        return Ok(RecordBatch::new_empty(schema));
    }
    Ok(RecordBatch::try_new(schema, cols)?)
}

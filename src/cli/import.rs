//! `glowwatch import`: an image folder (recursive) or IDX files (the MNIST format) -> Parquet of
//! the input schema (`id`, `label`, `image`), with a progress bar. Folder files are recognised
//! by their content, not their extension (`.jfif`, `.jpe`, upper case, none at all), and must
//! decode with the pipeline's own decoder; every other file is listed by name with the reason
//! it was skipped. Folder images keep their original bytes; IDX images are encoded as PNG.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use arrow::array::{BinaryArray, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// Arguments of `glowwatch import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An image folder, or an IDX image file (e.g. `t10k-images-idx3-ubyte`).
    pub input: PathBuf,
    /// IDX label file matching an IDX image file.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Output Parquet file.
    #[arg(long)]
    pub output: PathBuf,
    /// Rows per row group.
    #[arg(long, default_value_t = 8192)]
    pub row_group_rows: usize,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
        Field::new("image", DataType::Binary, false),
    ]))
}

struct Writer {
    w: ArrowWriter<std::fs::File>,
    ids: Vec<String>,
    labels: Vec<Option<i32>>,
    images: Vec<Vec<u8>>,
    rows: usize,
}

impl Writer {
    fn push(&mut self, id: String, label: Option<i32>, image: Vec<u8>) -> Result<()> {
        self.ids.push(id);
        self.labels.push(label);
        self.images.push(image);
        if self.ids.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let b = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(std::mem::take(&mut self.ids))),
                Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
                Arc::new(BinaryArray::from_iter_values(std::mem::take(
                    &mut self.images,
                ))),
            ],
        )?;
        self.rows += b.num_rows();
        self.w.write(&b)?;
        Ok(())
    }
}

/// Every file under `dir`, recursively, in sorted order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The file's bytes when the pipeline's decoder reads it as an image, else why not.
fn importable(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    crate::pipeline::decode::decode_upright(
        &bytes,
        &crate::pipeline::decode::DecodeLimits::default(),
    )
    .map(|_| bytes)
    .map_err(|f| f.to_string())
}

/// Reads an IDX file: (dimensions, data bytes). Only unsigned-byte data (type 0x08).
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 4];
    f.read_exact(&mut head)
        .with_context(|| format!("{}: too short for an IDX header", path.display()))?;
    ensure!(
        head[0] == 0 && head[1] == 0,
        "{}: not an IDX file (magic {:02x?})",
        path.display(),
        head
    );
    ensure!(
        head[2] == 0x08,
        "{}: IDX data type 0x{:02x} is not unsigned bytes",
        path.display(),
        head[2]
    );
    let mut dims = Vec::new();
    for _ in 0..head[3] {
        let mut d = [0u8; 4];
        f.read_exact(&mut d)?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    let want: usize = dims.iter().product();
    ensure!(
        data.len() == want,
        "{}: header says {dims:?} = {want} bytes, file has {}",
        path.display(),
        data.len()
    );
    Ok((dims, data))
}

/// Runs `glowwatch import`.
pub fn run(a: ImportArgs) -> Result<()> {
    let tmp = crate::fsutil::temp_path(&a.output);
    if let Some(d) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(a.row_group_rows.max(1)))
        .build();
    let file = std::fs::File::create(&tmp)?;
    let mut w = Writer {
        w: ArrowWriter::try_new(file, schema(), Some(props))?,
        ids: vec![],
        labels: vec![],
        images: vec![],
        rows: 0,
    };
    let bar = |n: usize| {
        let b = ProgressBar::new(n as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, ETA {eta}")
                .expect("template"),
        );
        b
    };
    let mut skipped: Vec<(String, String)> = Vec::new();
    if a.input.is_dir() {
        let mut files = Vec::new();
        walk(&a.input, &mut files)?;
        let pb = bar(files.len());
        for p in &files {
            let id = p.strip_prefix(&a.input).unwrap_or(p).display().to_string();
            match importable(p) {
                Ok(bytes) => w.push(id, None, bytes)?,
                Err(why) => skipped.push((id, why)),
            }
            pb.inc(1);
        }
        pb.finish();
    } else {
        let (dims, data) = read_idx(&a.input)?;
        if dims.len() != 3 {
            bail!(
                "{}: IDX images need 3 dimensions (n, rows, cols), got {dims:?}",
                a.input.display()
            );
        }
        let (n, h, wd) = (dims[0], dims[1], dims[2]);
        let labels = match &a.labels {
            Some(p) => {
                let (ld, l) = read_idx(p)?;
                ensure!(
                    ld == vec![n],
                    "{}: {ld:?} labels for {n} images",
                    p.display()
                );
                Some(l)
            }
            None => None,
        };
        let pb = bar(n);
        for i in 0..n {
            let img = image::GrayImage::from_raw(
                wd as u32,
                h as u32,
                data[i * h * wd..(i + 1) * h * wd].to_vec(),
            )
            .expect("sizes checked");
            let mut png = std::io::Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png)?;
            w.push(
                i.to_string(),
                labels.as_ref().map(|l| l[i] as i32),
                png.into_inner(),
            )?;
            pb.inc(1);
        }
        pb.finish();
    }
    w.flush()?;
    let rows = w.rows;
    let file = w.w.into_inner()?;
    file.sync_all()?;
    for (id, why) in &skipped {
        eprintln!("skipped {id}: {why}");
    }
    if rows == 0 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{}: no decodable images ({} files skipped, listed above)",
            a.input.display(),
            skipped.len()
        );
    }
    std::fs::rename(&tmp, &a.output)?;
    println!(
        "wrote {rows} images to {} ({} files skipped)",
        a.output.display(),
        skipped.len()
    );
    Ok(())
}

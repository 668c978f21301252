//! Helpers shared by the integration tests: paths of the shared real datasets and small
//! Parquet subsets of them written with the parquet crate.

#![allow(dead_code)]

pub mod broker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{BinaryArray, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::pixels_to_tensor;
use glowwatch::train::data::{ImageDataset, SkippedRows};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;

/// A file of `../shared/datasets` (present locally and in CI).
pub fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/datasets")
        .join(name)
}

/// A path in this repository.
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The `[models]` and `[flag]` sections of a pipeline with the demo's detector: the shipped
/// outlier model and general model on the CPU (batch 64), flagging by `combined` at the shipped
/// calibration's threshold (whose quantiles turn the drift alarms on).
pub fn demo_detector() -> String {
    format!(
        r#"
[models]
in = "{}"
general = "{}"
device = "cpu"
batch = 64
[flag]
score = "combined"
calibration = "{}"
"#,
        repo("models/fashion-mnist-outlier.safetensors").display(),
        repo("models/general-mix.safetensors").display(),
        repo("models/fashion-mnist-outlier.calibration.json").display(),
    )
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

/// A tiny random Glow (L3 K1 w8, grey 32x32) with ActNorm initialised on 256 real
/// Fashion-MNIST images, saved as `tiny-<seed>.safetensors` in `dir`.
pub fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let cfg = GlowConfig {
        scales: 3,
        steps: 1,
        hidden: 8,
        ..GlowConfig::small(1)
    };
    let m = GlowModel::new_random(&cfg, seed, &Device::Cpu).unwrap();
    let data =
        ImageDataset::open(&[shared("fashion_mnist_test.parquet")], "image", "id", &cfg).unwrap();
    let px = data.read_head(256, &mut SkippedRows::default()).unwrap();
    let x = pixels_to_tensor(&px.pixels, &cfg, 0.0, &Device::Cpu).unwrap();
    let x =
        (x.clone() + Tensor::rand(0f32, 1.0 / 256.0, x.shape(), &Device::Cpu).unwrap()).unwrap();
    m.init_from_data(&x).unwrap();
    m.perturb(1, 0.02).unwrap();
    let p = dir.join(format!("tiny-{seed}.safetensors"));
    m.save(&p).unwrap();
    p
}

/// Writes `rows` as a Parquet file with the shared datasets' schema.
pub fn write_images(path: &Path, rows: &[(String, Option<Vec<u8>>)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
        Field::new("image", DataType::Binary, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.clone()),
            )),
            Arc::new(Int32Array::from(vec![None; rows.len()])),
            Arc::new(BinaryArray::from(
                rows.iter().map(|r| r.1.as_deref()).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    write_batch(path, &batch);
}

/// Every record batch of the given Parquet files, in order.
pub fn read_parquet(files: &[PathBuf]) -> Vec<RecordBatch> {
    files
        .iter()
        .flat_map(|f| {
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every record batch of a Parquet file, or of the files a pipeline would read below a
/// directory (the product's own listing: recursive, sorted, hidden and `_` entries skipped, so
/// a run's `_dead_letter` folder is not part of its scored output); none when it is missing.
pub fn parquet_batches(path: &Path) -> Vec<RecordBatch> {
    if !path.exists() {
        return vec![];
    }
    read_parquet(&glowwatch::pipeline::source::parquet::parquet_files(path).unwrap())
}

/// Writes one record batch to a Parquet file.
pub fn write_batch(path: &Path, batch: &RecordBatch) {
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// Runs the glowwatch binary with `stdin`: (success, stdout, stderr).
pub fn glowwatch(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

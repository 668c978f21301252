//! The batch pipeline end to end on real Parquet data: every row exactly once in the scored or
//! dead-letter output, schemas as in `schemas/`, exact per-scale sums, bad images to the
//! dead letter, no partial files after a kill, schema errors before any work.
//!
//! `GLOWWATCH_BLESS=1 cargo test --test pipeline` rewrites `schemas/*.json` and the bundled
//! demo sample from the code and the shared datasets.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BinaryArray, BooleanArray, Int32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};
use candle_core::{Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::pixels_to_tensor;
use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::run::run_pipeline;
use glowwatch::pipeline::schema::{JsonSchema, dead_letter_schema, input_schema, scored_schema};
use glowwatch::train::data::{ImageDataset, SkippedRows};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn bless() -> bool {
    std::env::var("GLOWWATCH_BLESS").is_ok_and(|v| v == "1")
}

fn read_all(files: &[PathBuf]) -> Vec<RecordBatch> {
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

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.exists() {
        return out;
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(parquet_files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn schema_files_match_the_code() {
    let cases = [
        (
            "input.json",
            JsonSchema::from_arrow(
                "Columns every input record needs (other columns pass through to the scored output).",
                &input_schema(),
            ),
        ),
        (
            "scored.json",
            JsonSchema::from_arrow(
                "Scored record for a 3-scale model (the shipped models) over the shared datasets' input (id, label, image): input columns, then the score columns. lp_scale_k exist for k < L.",
                &scored_schema(
                    &Schema::new(vec![
                        Field::new("id", DataType::Utf8, true),
                        Field::new("label", DataType::Int32, true),
                        Field::new("image", DataType::Binary, true),
                    ]),
                    3,
                ),
            ),
        ),
        (
            "dead_letter.json",
            JsonSchema::from_arrow(
                "Record of an input row that could not be decoded: id, reason, detail, coordinates and the original bytes.",
                &dead_letter_schema(),
            ),
        ),
    ];
    for (file, want) in cases {
        let path = repo("schemas").join(file);
        if bless() {
            std::fs::write(&path, serde_json::to_string_pretty(&want).unwrap() + "\n").unwrap();
        }
        let have: JsonSchema =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(have, want, "{file} differs from the code's schema");
    }
}

/// The bundled demo sample: the first 300 Fashion-MNIST test images (in distribution) and
/// the first 300 MNIST digits (out of distribution), with an `is_ood` truth column.
#[test]
fn demo_sample_is_the_documented_subset() {
    let path = repo("pipelines/demo/sample.parquet");
    let take = |file: &str| -> RecordBatch {
        let f = std::fs::File::open(common::shared(file)).unwrap();
        let mut r = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .with_batch_size(300)
            .with_limit(300)
            .build()
            .unwrap();
        r.next().unwrap().unwrap()
    };
    let (fm, mn) = (take("fashion_mnist_test.parquet"), take("mnist.parquet"));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("dataset", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
        Field::new("truth_ood", DataType::Boolean, false),
        Field::new("image", DataType::Binary, false),
    ]));
    let mut cols: Vec<Vec<Arc<dyn Array>>> = Vec::new();
    for (b, name, ood) in [(&fm, "fashion_mnist", false), (&mn, "mnist", true)] {
        let n = b.num_rows();
        let ids = b.column_by_name("id").unwrap().as_string::<i32>();
        cols.push(vec![
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("{name}-{}", ids.value(i))),
            )),
            Arc::new(StringArray::from(vec![name; n])),
            Arc::new(
                b.column_by_name("label")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .clone(),
            ) as Arc<dyn Array>,
            Arc::new(BooleanArray::from(vec![ood; n])),
            Arc::new(BinaryArray::from(
                b.column_by_name("image")
                    .unwrap()
                    .as_binary::<i32>()
                    .clone(),
            )),
        ]);
    }
    let want: Vec<RecordBatch> = cols
        .into_iter()
        .map(|c| RecordBatch::try_new(schema.clone(), c).unwrap())
        .collect();
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        for b in &want {
            w.write(b).unwrap();
        }
        w.close().unwrap();
    }
    let have = arrow::compute::concat_batches(&schema, &read_all(&[path])).unwrap();
    assert_eq!(
        have,
        arrow::compute::concat_batches(&schema, &want).unwrap()
    );
}

fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = GlowConfig {
        scales: 3,
        steps: 1,
        hidden: 8,
        ..GlowConfig::small(1)
    };
    let m = GlowModel::new_random(&cfg, 5, &Device::Cpu).unwrap();
    let data = ImageDataset::open(
        &[common::shared("fashion_mnist_test.parquet")],
        "image",
        "id",
        &cfg,
    )
    .unwrap();
    let px = data.read_head(256, &mut SkippedRows::default()).unwrap();
    let x = pixels_to_tensor(&px.pixels, &cfg, 0.0, &Device::Cpu).unwrap();
    let x =
        (x.clone() + Tensor::rand(0f32, 1.0 / 256.0, x.shape(), &Device::Cpu).unwrap()).unwrap();
    m.init_from_data(&x).unwrap();
    m.perturb(1, 0.02).unwrap();
    let p = dir.join("tiny.safetensors");
    m.save(&p).unwrap();
    p
}

fn pipeline_toml(
    input: &Path,
    model: &Path,
    general: Option<&Path>,
    out: &Path,
    extra: &str,
) -> String {
    format!(
        r#"
name = "test"
[source]
kind = "parquet"
paths = ["{}"]
batch_rows = 100
[models]
in = "{}"
{}
device = "cpu"
batch = 64
[flag]
score = "{}"
threshold = 1500.0
[sinks.scored]
path = "{}"
max_file_rows = 700
row_group_rows = 128
[sinks.dead_letter]
path = "{}"
partition = "none"
{extra}
"#,
        input.display(),
        model.display(),
        general
            .map(|g| format!("general = \"{}\"", g.display()))
            .unwrap_or_default(),
        if general.is_some() { "llr" } else { "nll" },
        out.join("scored").display(),
        out.join("dead").display(),
    )
}

/// Writes `rows` as a Parquet file with the shared datasets' schema.
fn write_images(path: &Path, rows: &[(String, Option<Vec<u8>>)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
        Field::new("image", DataType::Binary, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
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
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn every_row_once_schemas_sums_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    // 1,500 real rows in row groups of 256, plus a file of bad rows among good ones.
    common::subset(
        &common::shared("mnist.parquet"),
        1500,
        256,
        &input.join("a.parquet"),
    );
    let good = {
        let f = std::fs::File::open(common::shared("fashion_mnist_test.parquet")).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .with_batch_size(2)
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        b.column_by_name("image")
            .unwrap()
            .as_binary::<i32>()
            .value(0)
            .to_vec()
    };
    let mut huge = good.clone();
    huge[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let crc = {
        let mut c = 0xFFFF_FFFFu32;
        for &b in &huge[12..29] {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let bad = vec![
        ("good-1".to_string(), Some(good.clone())),
        ("empty".to_string(), Some(vec![])),
        ("null".to_string(), None),
        ("junk".to_string(), Some(b"\x00\x01garbage".to_vec())),
        (
            "truncated".to_string(),
            Some(good[..good.len() / 2].to_vec()),
        ),
        ("huge-header".to_string(), Some(huge)),
        ("good-2".to_string(), Some(good)),
    ];
    write_images(&input.join("b.parquet"), &bad);
    let out = dir.path().join("out");
    let cfg = PipelineConfig::parse(
        &pipeline_toml(&input, &model, Some(&model), &out, ""),
        dir.path(),
    )
    .unwrap();
    let s = run_pipeline(&cfg).unwrap();
    assert_eq!(s.rows_in, 1507);
    assert_eq!((s.scored, s.dead_lettered), (1502, 5));
    assert!(
        s.scored_files.len() >= 3,
        "rolled by max_file_rows: {:?}",
        s.scored_files
    );

    // Scored output: ids exactly the good input ids, schema as documented, sums exact.
    let scored = read_all(&parquet_files(&out.join("scored")));
    let mut ids: Vec<String> = scored
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name("id").unwrap().as_string::<i32>().clone();
            (0..a.len()).map(move |i| a.value(i).to_string())
        })
        .collect();
    let schema = scored[0].schema();
    let file: JsonSchema =
        serde_json::from_str(&std::fs::read_to_string(repo("schemas/scored.json")).unwrap())
            .unwrap();
    let got = JsonSchema::from_arrow(&file.description, &schema);
    let names = |s: &JsonSchema| {
        s.fields
            .iter()
            .map(|f| (f.name.clone(), f.data_type.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&got),
        names(&file),
        "scored columns/types differ from schemas/scored.json"
    );
    for b in &scored {
        let col = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (lp, l0, l1, l2) = (
            col("log_p"),
            col("lp_scale_0"),
            col("lp_scale_1"),
            col("lp_scale_2"),
        );
        let (glp, llr) = (col("gen_log_p"), col("llr"));
        for i in 0..b.num_rows() {
            assert_eq!(l0.value(i) + l1.value(i) + l2.value(i), lp.value(i));
            assert_eq!(glp.value(i) - lp.value(i), llr.value(i));
        }
        let status = b.column_by_name("status").unwrap().as_string::<i32>();
        assert!((0..b.num_rows()).all(|i| status.value(i) == "ok"));
    }
    let dead = read_all(&parquet_files(&out.join("dead")));
    let dead_schema = JsonSchema::from_arrow("", &dead[0].schema());
    let dead_file: JsonSchema =
        serde_json::from_str(&std::fs::read_to_string(repo("schemas/dead_letter.json")).unwrap())
            .unwrap();
    assert_eq!(names(&dead_schema), names(&dead_file));
    let d = arrow::compute::concat_batches(&dead[0].schema(), &dead).unwrap();
    let col = |n: &str| d.column_by_name(n).unwrap().as_string::<i32>().clone();
    let (did, reason) = (col("id"), col("reason"));
    let got: Vec<(String, String)> = (0..d.num_rows())
        .map(|i| (did.value(i).to_string(), reason.value(i).to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("empty".into(), "empty".into()),
            ("null".into(), "null".into()),
            ("junk".into(), "unknown_format".into()),
            ("truncated".into(), "corrupt".into()),
            ("huge-header".into(), "too_large".into()),
        ]
    );
    // Coordinates and original bytes travel with the dead letter.
    let rows = d
        .column_by_name("row")
        .unwrap()
        .as_primitive::<arrow::datatypes::UInt64Type>();
    assert_eq!(rows.values().to_vec(), vec![1, 2, 3, 4, 5]);
    let img = d.column_by_name("image").unwrap().as_binary::<i32>();
    assert_eq!(img.value(2), b"\x00\x01garbage");
    assert!(img.is_null(1));
    ids.sort();
    let mut want: Vec<String> = Vec::new();
    let src = read_all(&[input.join("a.parquet")]);
    for b in &src {
        let a = b.column_by_name("id").unwrap().as_string::<i32>();
        want.extend((0..a.len()).map(|i| a.value(i).to_string()));
    }
    want.push("good-1".into());
    want.push("good-2".into());
    want.sort();
    assert_eq!(
        ids, want,
        "each good input row exactly once in the scored output"
    );
}

#[test]
fn schema_mismatch_is_an_error_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("wrong.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Int32, false),
    ]));
    let b = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Int32Array::from(vec![1])),
        ],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&input).unwrap(), schema, None)
            .unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
    let out = dir.path().join("out");
    let cfg =
        PipelineConfig::parse(&pipeline_toml(&input, &model, None, &out, ""), dir.path()).unwrap();
    let e = run_pipeline(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("column `image` has type Int32, expected binary"),
        "{e}"
    );
    assert!(!out.exists(), "no output before the input is checked");
    let toml = pipeline_toml(&input, &model, None, &out, "").replace(
        "kind = \"parquet\"",
        "kind = \"parquet\"\nimage_column = \"picture\"",
    );
    let cfg = PipelineConfig::parse(&toml, dir.path()).unwrap();
    let e = run_pipeline(&cfg).unwrap_err().to_string();
    assert!(e.contains("no column `picture`"), "{e}");
}

#[test]
fn killed_run_leaves_no_partial_file_under_a_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = common::subset(
        &common::shared("fashion_mnist_train.parquet"),
        20_000,
        1000,
        &dir.path().join("big.parquet"),
    );
    let out = dir.path().join("out");
    let toml = dir.path().join("p.toml");
    std::fs::write(&toml, pipeline_toml(&input, &model, None, &out, "")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["run", toml.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once the first file has been finished (so a second one is being written).
    let t0 = std::time::Instant::now();
    loop {
        let finished = parquet_files(&out.join("scored"))
            .iter()
            .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
            .count();
        if finished >= 1 || t0.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let files = parquet_files(&out.join("scored"));
    let visible: Vec<&PathBuf> = files
        .iter()
        .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .collect();
    assert!(
        !visible.is_empty(),
        "the run should have finished a file before the kill"
    );
    for f in &visible {
        // Every visible file is a complete Parquet file with whole row groups.
        let rows: usize = read_all(&[f.to_path_buf()])
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 700, "{} is not a complete rolled file", f.display());
    }
    // The source skips hidden temporaries, so a reader of the output sees only complete files.
    let src = glowwatch::pipeline::source::ParquetSource::open(&[out.join("scored")]).unwrap();
    assert_eq!(src.files().len(), visible.len());
}

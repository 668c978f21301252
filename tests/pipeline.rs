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
use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::run::run_pipeline;
use glowwatch::pipeline::schema::{JsonSchema, dead_letter_schema, input_schema, scored_schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn bless() -> bool {
    std::env::var("GLOWWATCH_BLESS").is_ok_and(|v| v == "1")
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
            "kafka_input.json",
            JsonSchema::from_arrow(
                "Record read from a Kafka message (the start of a Kafka pipeline's scored record): key or envelope id, value (encoded image), headers content-type/source/capture-time, and the message's coordinates and timestamp for de-duplication.",
                &glowwatch::pipeline::source::kafka::kafka_input_schema(),
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
        let path = common::repo("schemas").join(file);
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
    let path = common::repo("pipelines/demo/sample.parquet");
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
    let have = arrow::compute::concat_batches(&schema, &common::read_parquet(&[path])).unwrap();
    assert_eq!(
        have,
        arrow::compute::concat_batches(&schema, &want).unwrap()
    );
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

#[test]
fn every_row_once_schemas_sums_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 5);
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
    common::write_images(&input.join("b.parquet"), &bad);
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
    let scored = common::read_parquet(&parquet_files(&out.join("scored")));
    let mut ids: Vec<String> = scored
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name("id").unwrap().as_string::<i32>().clone();
            (0..a.len()).map(move |i| a.value(i).to_string())
        })
        .collect();
    let schema = scored[0].schema();
    let file: JsonSchema = serde_json::from_str(
        &std::fs::read_to_string(common::repo("schemas/scored.json")).unwrap(),
    )
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
    let dead = common::read_parquet(&parquet_files(&out.join("dead")));
    let dead_schema = JsonSchema::from_arrow("", &dead[0].schema());
    let dead_file: JsonSchema = serde_json::from_str(
        &std::fs::read_to_string(common::repo("schemas/dead_letter.json")).unwrap(),
    )
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
            ("truncated".into(), "truncated".into()),
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
    let src = common::read_parquet(&[input.join("a.parquet")]);
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
    let model = common::tiny_model(dir.path(), 5);
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
    let model = common::tiny_model(dir.path(), 5);
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
        let rows: usize = common::read_parquet(&[f.to_path_buf()])
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 700, "{} is not a complete rolled file", f.display());
    }
    // The source skips hidden temporaries, so a reader of the output sees only complete files.
    let src = glowwatch::pipeline::source::ParquetSource::open(&[out.join("scored")]).unwrap();
    assert_eq!(src.files().len(), visible.len());
}

/// Reads `id` and the `log_p` column of every scored file under `dir`, by id.
fn log_p_by_id(dir: &Path) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for b in common::read_parquet(&parquet_files(dir)) {
        let ids = b.column_by_name("id").unwrap().as_string::<i32>().clone();
        let lp = b
            .column_by_name("log_p")
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i).to_string(), lp.value(i));
        }
    }
    out
}

#[test]
fn raw_pixel_columns_score_exactly_like_the_encoded_images() {
    use arrow::array::{ListBuilder, UInt8Builder, UInt16Array};
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 5);
    let encoded = common::subset(
        &common::shared("fashion_mnist_test.parquet"),
        300,
        128,
        &dir.path().join("encoded.parquet"),
    );
    // The same 300 images as raw grey pixels in a list<uint8> column with shape columns of
    // two integer types, plus an RGB copy of one image and three bad rows.
    let src = common::read_parquet(std::slice::from_ref(&encoded));
    let (mut ids, mut hs, mut ws, mut cs) = (vec![], vec![], vec![], vec![]);
    let mut px = ListBuilder::new(UInt8Builder::new());
    let mut push = |id: &str, bytes: Option<&[u8]>, h: Option<i32>, w: i32, c: u16| {
        ids.push(id.to_string());
        match bytes {
            Some(b) => px.append_value(b.iter().map(|v| Some(*v))),
            None => px.append_null(),
        }
        hs.push(h);
        ws.push(w);
        cs.push(c);
    };
    let mut first_rgb = None;
    for b in &src {
        let id = b.column_by_name("id").unwrap().as_string::<i32>();
        let img = b.column_by_name("image").unwrap().as_binary::<i32>();
        for i in 0..b.num_rows() {
            let g = image::load_from_memory(img.value(i)).unwrap().to_luma8();
            let (w, h) = g.dimensions();
            push(id.value(i), Some(g.as_raw()), Some(h as i32), w as i32, 1);
            if first_rgb.is_none() {
                first_rgb = Some((image::DynamicImage::ImageLuma8(g).to_rgb8(), w, h));
            }
        }
    }
    let (rgb, w, h) = first_rgb.unwrap();
    push("rgb", Some(rgb.as_raw()), Some(h as i32), w as i32, 3);
    push("short", Some(&[7u8; 100]), Some(28), 28, 1);
    push("five-channels", Some(&[7u8; 28 * 28 * 5]), Some(28), 28, 5);
    push("no-height", Some(&[7u8; 28 * 28]), None, 28, 1);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new(
            "pixels",
            DataType::List(Arc::new(Field::new("item", DataType::UInt8, true))),
            true,
        ),
        Field::new("h", DataType::Int32, true),
        Field::new("width", DataType::Int32, false),
        Field::new("channels", DataType::UInt16, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(px.finish()),
            Arc::new(Int32Array::from(hs)),
            Arc::new(Int32Array::from(ws)),
            Arc::new(UInt16Array::from(cs)),
        ],
    )
    .unwrap();
    let raw = dir.path().join("raw.parquet");
    let mut wr =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&raw).unwrap(), schema, None)
            .unwrap();
    wr.write(&batch).unwrap();
    wr.close().unwrap();

    let run = |input: &Path, out: &Path, extra_source: &str| {
        let toml = pipeline_toml(input, &model, None, out, "").replace(
            "kind = \"parquet\"",
            &format!("kind = \"parquet\"\n{extra_source}"),
        );
        run_pipeline(&PipelineConfig::parse(&toml, dir.path()).unwrap())
    };
    let raw_source = "image_column = \"pixels\"\npixels = \"raw\"\nheight_column = \"h\"";
    // A raw layout whose shape column is missing fails before any work.
    let e = run(
        &raw,
        &dir.path().join("bad"),
        "image_column = \"pixels\"\npixels = \"raw\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no column `height`"), "{e}");
    assert!(!dir.path().join("bad").exists());

    let enc = run(&encoded, &dir.path().join("enc"), "").unwrap();
    let rawsum = run(&raw, &dir.path().join("raw"), raw_source).unwrap();
    assert_eq!(enc.scored, 300);
    assert_eq!((rawsum.scored, rawsum.dead_lettered), (301, 3));
    let a = log_p_by_id(&dir.path().join("enc/scored"));
    let b = log_p_by_id(&dir.path().join("raw/scored"));
    assert_eq!(a.len(), 300);
    // Same pixels, same score up to f32 summation order: the CPU scorer splits each batch
    // into per-thread chunks and GEMM blocking depends on their size, so an image scored in a
    // batch of another composition moved by more than 1e-9 of its log-likelihood in one run
    // (a flaky failure at that bar); 1e-6 is still well inside f32 accuracy of a sum over
    // 1,024 dimensions.
    let same = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs();
    for (id, lp) in &a {
        let r = b[id];
        assert!(same(*lp, r), "{id}: {lp} vs {r}");
    }
    // Grey -> RGB -> the model's grey is lossless for grey pixels: the grey image's score.
    let first = src[0]
        .column_by_name("id")
        .unwrap()
        .as_string::<i32>()
        .value(0);
    let (rgb, grey) = (b["rgb"], a[first]);
    assert!(same(grey, rgb), "{rgb} vs {grey}");
    let dead = common::read_parquet(&parquet_files(&dir.path().join("raw/dead")));
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .flat_map(|d| {
            let id = d.column_by_name("id").unwrap().as_string::<i32>().clone();
            let r = d
                .column_by_name("reason")
                .unwrap()
                .as_string::<i32>()
                .clone();
            (0..d.num_rows())
                .map(move |i| (id.value(i).to_string(), r.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("five-channels", "wrong_size"),
            ("no-height", "null"),
            ("short", "wrong_size")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
}

/// The output is plain Parquet that other readers take as it is: pyarrow (with the Hive
/// partitions) and duckdb read the same rows, ids, sums and dead letters as the parquet crate.
/// Needs `python3` with pyarrow and duckdb (`.ci/run` installs them).
#[test]
fn output_reads_the_same_in_pyarrow_and_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 5);
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    common::subset(
        &common::shared("mnist.parquet"),
        400,
        128,
        &input.join("a.parquet"),
    );
    common::write_images(
        &input.join("b.parquet"),
        &[
            ("empty".to_string(), Some(vec![])),
            ("junk".to_string(), Some(b"junk".to_vec())),
        ],
    );
    // A first run finds the median score, so the real run flags about half of the rows.
    let probe = dir.path().join("probe");
    let toml = pipeline_toml(&input, &model, None, &probe, "");
    run_pipeline(&PipelineConfig::parse(&toml, dir.path()).unwrap()).unwrap();
    let mut scores: Vec<f64> = common::read_parquet(&parquet_files(&probe.join("scored")))
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("score")
                .unwrap()
                .as_primitive::<Float64Type>();
            a.values().to_vec()
        })
        .collect();
    scores.sort_by(f64::total_cmp);
    let out = dir.path().join("out");
    let toml = pipeline_toml(&input, &model, None, &out, "").replace(
        "threshold = 1500.0",
        &format!("threshold = {:?}", scores[scores.len() / 2]),
    );
    let s = run_pipeline(&PipelineConfig::parse(&toml, dir.path()).unwrap()).unwrap();
    assert_eq!((s.scored, s.dead_lettered), (400, 2));

    let py = std::process::Command::new("python3")
        .arg(common::repo("tests/interop/read_outputs.py"))
        .arg(out.join("scored"))
        .arg(out.join("dead"))
        .output()
        .expect("python3 runs (the interop test needs python3 with pyarrow and duckdb)");
    assert!(
        py.status.success(),
        "read_outputs.py failed (pip install pyarrow duckdb?):\n{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();

    // What the parquet crate reads.
    let scored = common::read_parquet(&parquet_files(&out.join("scored")));
    let mut ids = Vec::new();
    let (mut sum, mut flagged) = (0.0f64, 0u64);
    for b in &scored {
        let id = b.column_by_name("id").unwrap().as_string::<i32>();
        let lp = b
            .column_by_name("log_p")
            .unwrap()
            .as_primitive::<Float64Type>();
        let ood = b.column_by_name("is_ood").unwrap().as_boolean();
        for i in 0..b.num_rows() {
            ids.push(id.value(i).to_string());
            sum += lp.value(i);
            flagged += ood.value(i) as u64;
        }
    }
    ids.sort();
    assert!(flagged > 0 && flagged < 400, "threshold splits the rows");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();

    let pa = &v["pyarrow"];
    assert_eq!(pa["rows"], 400);
    assert_eq!(pa["ids"], serde_json::json!(ids));
    assert!(close(pa["log_p_sum"].as_f64().unwrap(), sum));
    assert_eq!(pa["flagged"], flagged);
    // Hive partition directories become columns; our columns keep their types.
    let cols: Vec<&str> = pa["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(cols.ends_with(&["date", "hour"]), "{cols:?}");
    assert_eq!(pa["types"]["log_p"], "double");
    assert_eq!(pa["types"]["is_ood"], "bool");
    assert_eq!(pa["types"]["scored_at"], "timestamp[us, tz=UTC]");
    assert_eq!(
        v["pyarrow_dead"]["reasons"],
        serde_json::json!(["empty", "unknown_format"])
    );

    let dk = &v["duckdb"];
    assert_eq!(dk["rows"], 400);
    assert_eq!(dk["flagged"], flagged);
    assert!(close(dk["log_p_sum"].as_f64().unwrap(), sum));
    assert_eq!(dk["max_scale_sum_error"].as_f64().unwrap(), 0.0);
    assert_eq!(dk["dates"], 1);
    assert_eq!(dk["dead_rows"], 2);
}

/// Every pipeline config we ship parses, names model files that load (ids checked against their
/// content), and, where it flags by a calibration file, that file was made for exactly these
/// models and holds a threshold for the flagged score. (Found missing when the K = 8 demo
/// pipeline was added: nothing checked the shipped configs until someone ran them.)
#[test]
fn shipped_pipeline_configs_fit_the_shipped_models() {
    use glowwatch::glow::GlowModel;
    use glowwatch::score::calibration::Calibration;
    let dev = candle_core::Device::Cpu;
    let mut checked = Vec::new();
    for e in std::fs::read_dir(common::repo("pipelines")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // retrain-*.toml are retraining jobs, not pipelines (tests/registry.rs runs one).
        if !name.ends_with(".toml") || name.starts_with("retrain") {
            continue;
        }
        let cfg = PipelineConfig::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        let in_model = GlowModel::load(&cfg.models.in_model, &dev)
            .unwrap_or_else(|e| panic!("{name}: {:?}: {e}", cfg.models.in_model));
        let general = cfg
            .models
            .general
            .as_ref()
            .map(|g| GlowModel::load(g, &dev).unwrap_or_else(|e| panic!("{name}: {g:?}: {e}")));
        if let Some(g) = &general {
            let input = |m: &GlowModel| {
                let c = m.config();
                (c.in_channels, c.image_size, c.preprocess.clone())
            };
            assert_eq!(
                input(g),
                input(&in_model),
                "{name}: both models must see the same pixels"
            );
        }
        if let Some(c) = &cfg.flag.calibration {
            let cal = Calibration::load(c).unwrap_or_else(|e| panic!("{name}: {c:?}: {e}"));
            assert_eq!(cal.in_model, in_model.model_id().unwrap(), "{name}");
            assert_eq!(
                cal.general_model,
                general.as_ref().map(|g| g.model_id().unwrap()),
                "{name}"
            );
            assert!(
                cal.thresholds.contains_key(&cfg.flag.score),
                "{name}: no threshold for {}",
                cfg.flag.score
            );
            assert!(
                !cfg.flag.score.needs_reference() || cal.reference.is_some(),
                "{name}: {} needs the calibration's complexity reference",
                cfg.flag.score
            );
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "demo-k8w128.toml",
            "demo.toml",
            "kafka-fashion.toml",
            "parquet-batch.toml"
        ]
    );
}

/// The complexity columns of every scored row follow their definitions (src/score/mod.rs), and
/// a pipeline flagging by `combined` takes its complexity reference from the calibration file.
#[test]
fn scored_rows_carry_input_complexity_and_the_reference_scores() {
    use glowwatch::glow::{GlowModel, Precision};
    use glowwatch::pipeline::score::ModelScorer;
    use glowwatch::score::ScoreKind;
    use glowwatch::score::calibration::{Calibration, calibrate};
    use glowwatch::train::data::{ImageDataset, SkippedRows, Split};
    let dir = tempfile::tempdir().unwrap();
    let (m, g) = (
        common::tiny_model(dir.path(), 11),
        common::tiny_model(dir.path(), 12),
    );
    let dev = candle_core::Device::Cpu;
    let (mm, gm) = (
        GlowModel::load(&m, &dev).unwrap(),
        GlowModel::load(&g, &dev).unwrap(),
    );
    let mut scorer = ModelScorer::new(&mm, Some(&gm), &dev, Precision::F32, 64).unwrap();
    let mcfg = scorer.config().clone();
    let rows = |split: Split, n: usize| {
        ImageDataset::open(
            &[common::shared("fashion_mnist_train.parquet")],
            "image",
            "id",
            &mcfg,
        )
        .unwrap()
        .with_split(split)
        .read_head(n, &mut SkippedRows::default())
        .unwrap()
    };
    let reference = scorer
        .build_reference(&rows(Split::Train(0.1), 300).pixels, "test rows")
        .unwrap();
    scorer
        .set_reference(Some(std::sync::Arc::new(reference.clone())))
        .unwrap();
    let held = scorer
        .score_pixels(&rows(Split::Holdout(0.1), 200).pixels)
        .unwrap();
    let values: Vec<f64> = held.iter().map(|s| ScoreKind::Combined.value(s)).collect();
    let cal = Calibration {
        in_model: mm.model_id().unwrap(),
        general_model: Some(gm.model_id().unwrap()),
        thresholds: [(ScoreKind::Combined, calibrate(&values, 0.05, "test"))]
            .into_iter()
            .collect(),
        reference: Some(reference),
    };
    let cal_path = dir.path().join("cal.json");
    cal.save(&cal_path).unwrap();
    let threshold = cal.thresholds[&ScoreKind::Combined].threshold;

    let input = dir.path().join("in.parquet");
    common::subset(&common::shared("mnist.parquet"), 300, 128, &input);
    let out = dir.path().join("out");
    let toml = |flag: &str| {
        format!(
            "name = \"t\"\n[source]\nkind = \"parquet\"\npaths = [\"{}\"]\n[models]\nin = \"{}\"\ngeneral = \"{}\"\ndevice = \"cpu\"\n[flag]\nscore = \"combined\"\n{flag}\n[sinks.scored]\npath = \"{}\"\npartition = \"none\"\n[sinks.dead_letter]\npath = \"{}\"\npartition = \"none\"\n",
            input.display(),
            m.display(),
            g.display(),
            out.join("scored").display(),
            out.join("dead").display()
        )
    };
    // The reference lives in a calibration file; a bare threshold cannot carry it.
    let e = PipelineConfig::parse(&toml("threshold = 1.0"), dir.path()).unwrap_err();
    assert!(e.to_string().contains("complexity reference"), "{e}");
    let cfg = PipelineConfig::parse(
        &toml(&format!("calibration = \"{}\"", cal_path.display())),
        dir.path(),
    )
    .unwrap();
    let s = run_pipeline(&cfg).unwrap();
    assert_eq!(s.scored, 300);
    let mut flagged = 0;
    for b in common::read_parquet(&parquet_files(&out.join("scored"))) {
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (bpd, bits, cx, cond, comb, score) = (
            f("bpd"),
            f("input_bits"),
            f("complexity"),
            f("complexity_cond"),
            f("combined"),
            f("score"),
        );
        let ood = b.column_by_name("is_ood").unwrap().as_boolean().clone();
        for i in 0..b.num_rows() {
            // S = bits/dim * D - L(x); zlib sizes are whole bytes.
            assert!((cx.value(i) - (bpd.value(i) * 1024.0 - bits.value(i))).abs() < 1e-6);
            assert_eq!(bits.value(i) % 8.0, 0.0);
            assert!(bits.value(i) > 64.0 && bits.value(i) < 9000.0);
            assert!(cond.is_valid(i) && comb.is_valid(i));
            assert_eq!(score.value(i), comb.value(i));
            assert_eq!(ood.value(i), comb.value(i) > threshold);
            flagged += ood.value(i) as usize;
        }
    }
    assert_eq!(
        flagged as u64, s.flagged,
        "the summary counts what was written"
    );
}

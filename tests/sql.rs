//! SQL over a real pipeline run: the sqllogictest files in `tests/sql/*.slt` (tables, partition
//! columns, scoring UDFs against the batch scorer's columns, errors), and aggregate queries
//! checked against the parquet crate reading the same files.
#![cfg(feature = "sql")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::run::run_pipeline;
use glowwatch::sql::udf::SqlModels;
use glowwatch::sql::{SqlError, SqlSession, StatementResult};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sqllogictest::{DBOutput, DefaultColumnType};

/// One pipeline run shared by the tests: 300 Fashion-MNIST + 200 MNIST images and two bad
/// rows, scored by two tiny models (in-distribution and general), Hive-partitioned output.
struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: PathBuf,
    scored: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let input = d.join("in");
        std::fs::create_dir_all(&input).unwrap();
        common::subset(
            &common::shared("fashion_mnist_test.parquet"),
            300,
            128,
            &input.join("fashion.parquet"),
        );
        common::subset(
            &common::shared("mnist.parquet"),
            200,
            128,
            &input.join("mnist.parquet"),
        );
        common::write_images(
            &input.join("bad.parquet"),
            &[
                ("empty".to_string(), Some(vec![])),
                ("junk".to_string(), Some(b"junk".to_vec())),
            ],
        );
        let model = common::tiny_model(d, 5);
        let general = common::tiny_model(d, 6);
        let toml = format!(
            r#"
name = "sql-test"
[source]
kind = "parquet"
paths = ["{}"]
batch_rows = 100
[models]
in = "{}"
general = "{}"
device = "cpu"
batch = 64
[flag]
score = "llr"
threshold = 0.0
[sinks.scored]
path = "{}"
partition = "date_hour"
[sinks.dead_letter]
path = "{}"
partition = "none"
"#,
            input.display(),
            model.display(),
            general.display(),
            d.join("out/scored").display(),
            d.join("out/dead").display(),
        );
        let pipeline = d.join("pipeline.toml");
        std::fs::write(&pipeline, &toml).unwrap();
        let s = run_pipeline(&PipelineConfig::load(&pipeline).unwrap()).unwrap();
        assert_eq!((s.scored, s.dead_lettered), (500, 2));
        Fixture {
            scored: d.join("out/scored"),
            pipeline,
            _dir: dir,
        }
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A session over the fixture's pipeline, with its models, as `glowwatch sql --pipeline` opens.
async fn session(allow_write: bool) -> SqlSession {
    let f = fixture();
    let cfg = PipelineConfig::load(&f.pipeline).unwrap();
    let s = SqlSession::new(allow_write);
    let names = s.register_pipeline(&cfg).await.unwrap();
    assert_eq!(names, ["scored", "dead_letter", "input"]);
    let models = SqlModels::from_pipeline(&cfg, Default::default()).unwrap();
    s.add_models(Arc::new(models));
    s
}

/// sqllogictest adapter: runs statements on a shared session from its own tokio runtime.
struct Db {
    rt: Arc<tokio::runtime::Runtime>,
    session: Arc<SqlSession>,
}

impl sqllogictest::DB for Db {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let results = self.rt.block_on(self.session.run(sql))?;
        let Some(r) = results.last() else {
            return Ok(DBOutput::StatementComplete(0));
        };
        Ok(to_output(r))
    }
}

fn to_output(r: &StatementResult) -> DBOutput<DefaultColumnType> {
    if r.schema.fields().is_empty() {
        return DBOutput::StatementComplete(0);
    }
    let types = r
        .schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            t if t.is_integer() => DefaultColumnType::Integer,
            t if t.is_floating() => DefaultColumnType::FloatingPoint,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DefaultColumnType::Text,
            _ => DefaultColumnType::Any,
        })
        .collect();
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for b in &r.batches {
        let fmts: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| {
                        let s = f.value(i).to_string();
                        if s.is_empty() { "(empty)".into() } else { s }
                    })
                    .collect(),
            );
        }
    }
    DBOutput::Rows { types, rows }
}

#[test]
fn sqllogictest_files() {
    let rt = Arc::new(runtime());
    let session = Arc::new(rt.block_on(session(false)));
    // errors.slt exports with COPY TO under target/ (the slt runner's `__TEST_DIR__`
    // substitution wrote into the checkout instead of a temporary directory).
    let _ =
        std::fs::remove_dir_all(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/slt-scratch"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "slt files in {}", dir.display());
    for file in files {
        let (rt, session) = (rt.clone(), session.clone());
        let mut runner = sqllogictest::Runner::new(move || {
            let db = Db {
                rt: rt.clone(),
                session: session.clone(),
            };
            async move { Ok(db) }
        });
        if let Err(e) = runner.run_file(&file) {
            panic!("{}: {e}", file.display());
        }
    }
}

/// Reads every Parquet file under `dir` with the parquet crate (not DataFusion).
fn read_dir_batches(dir: &Path) -> Vec<(PathBuf, arrow::array::RecordBatch)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(read_dir_batches(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&p).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for b in r {
                out.push((p.clone(), b.unwrap()));
            }
        }
    }
    out
}

#[test]
fn aggregates_equal_an_independent_parquet_reader() {
    let f = fixture();
    // Independently: rows, sum of log_p, flagged rows, rows per hour partition, max llr.
    let mut rows = 0usize;
    let (mut sum_lp, mut max_llr, mut flagged) = (0.0f64, f64::MIN, 0usize);
    let mut per_hour = std::collections::BTreeMap::<String, usize>::new();
    for (path, b) in read_dir_batches(&f.scored) {
        let lp = b
            .column_by_name("log_p")
            .unwrap()
            .as_primitive::<Float64Type>();
        let llr = b
            .column_by_name("llr")
            .unwrap()
            .as_primitive::<Float64Type>();
        let ood = b.column_by_name("is_ood").unwrap().as_boolean();
        rows += b.num_rows();
        sum_lp += lp.values().iter().sum::<f64>();
        max_llr = llr.values().iter().copied().fold(max_llr, f64::max);
        flagged += ood.true_count();
        let hour = path
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .find_map(|c| c.strip_prefix("hour="))
            .unwrap()
            .to_string();
        *per_hour.entry(hour).or_default() += b.num_rows();
    }
    assert_eq!(rows, 500);

    let rt = runtime();
    let s = rt.block_on(session(false));
    let q = |sql: &str| {
        let r = rt.block_on(s.run(sql)).unwrap();
        arrow::compute::concat_batches(&r[0].schema, &r[0].batches).unwrap()
    };
    let b = q("SELECT count(*) AS n, sum(log_p) AS s, max(llr) AS m, \
               count(*) FILTER (WHERE is_ood) AS f FROM scored");
    let int = |c: usize| {
        b.column(c)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };
    let float = |c: usize| b.column(c).as_primitive::<Float64Type>().value(0);
    assert_eq!(int(0), 500);
    assert!((float(1) - sum_lp).abs() <= 1e-9 * sum_lp.abs());
    assert_eq!(float(2), max_llr);
    assert_eq!(int(3) as usize, flagged);
    assert!(
        flagged > 0 && flagged < 500,
        "the threshold splits the rows"
    );

    let b = q("SELECT CAST(hour AS VARCHAR) AS h, count(*) AS n FROM scored GROUP BY 1 ORDER BY 1");
    let hours = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
    let hours = hours.as_string::<i32>();
    let counts = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
    let got: std::collections::BTreeMap<String, usize> = (0..b.num_rows())
        .map(|i| (hours.value(i).to_string(), counts.value(i) as usize))
        .collect();
    assert_eq!(got, per_hour);
}

#[test]
fn missing_table_path_and_write_policy_are_clear_errors() {
    let rt = runtime();
    let s = SqlSession::new(false);
    let e = rt
        .block_on(s.register("nope", "/definitely/not/here"))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "table `nope`: /definitely/not/here does not exist");
    let e = rt
        .block_on(s.register("remote", "s3://bucket/scored/"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no object store for `s3` URLs in this build"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = rt
        .block_on(s.register("empty", &empty.path().display().to_string()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("table `empty`"), "{e}");

    // With --allow-write an INSERT into a memory table goes through; without it, it is refused.
    for allow in [false, true] {
        let s = SqlSession::new(allow);
        rt.block_on(s.run("CREATE TABLE t (a INT)")).unwrap();
        let r = rt.block_on(s.run("INSERT INTO t VALUES (1)"));
        assert_eq!(r.is_ok(), allow, "{r:?}");
        if !allow {
            let e = r.unwrap_err().to_string();
            assert!(
                e.starts_with("refused: Insert Into t would modify data"),
                "{e}"
            );
        }
    }
}

#[test]
fn command_formats_and_shell() {
    let f = fixture();
    let p = f.pipeline.display().to_string();
    let base = ["sql", "--pipeline", p.as_str(), "--device", "cpu"];
    let q = "SELECT label, count(*) AS n FROM scored WHERE label < 2 GROUP BY label ORDER BY label";
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (ok, out, err) = common::glowwatch(&args, "");
        assert!(ok, "{err}");
        out
    };
    let table = run(&[q]);
    assert!(table.contains("| label | n   |"), "{table}");
    assert_eq!(run(&["--format", "csv", q]), "label,n\n0,232\n1,35\n");
    assert_eq!(
        run(&["--format", "json", q]),
        "{\"label\":0,\"n\":232}\n{\"label\":1,\"n\":35}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("out.parquet");
    run(&["--format", "parquet", "--output", pq.to_str().unwrap(), q]);
    let b: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&pq).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    // Images show as sizes in a text table, not as kilobytes of hex.
    let t = run(&["SELECT image FROM input WHERE id = 'junk'"]);
    assert!(t.contains("<4 bytes>"), "{t}");

    // A bad query fails with DataFusion's message and position, exit status 1.
    let (ok, _, err) = common::glowwatch(&[&base[..], &["SELEC 1"]].concat(), "");
    assert!(!ok);
    assert!(err.contains("found: SELEC at Line: 1, Column: 1"), "{err}");

    // The shell: \d lists tables, a statement may span lines, errors do not end it.
    let (ok, out, err) = common::glowwatch(
        &base,
        "\\d\n\\d dead_letter\nSELECT count(*)\n  AS n FROM scored;\nSELECT nope;\n\\q\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("dead_letter\ninput\nscored\n"), "{out}");
    assert!(out.contains("reason"), "{out}");
    assert!(out.contains("| 500 |"), "{out}");
    assert!(err.contains("No field named nope"), "{err}");
}

/// `ood_score(image, 'combined')` with the shipped models finds the complexity reference in the
/// model's calibration file and gives the values the batch scorer gives.
#[test]
fn reference_scores_in_sql_come_from_the_model_calibration() {
    use glowwatch::glow::{GlowModel, Precision};
    use glowwatch::pipeline::score::ModelScorer;
    use glowwatch::score::ScoreKind;
    use glowwatch::score::calibration::Calibration;
    use glowwatch::train::data::{ImageDataset, SkippedRows};
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (m, g) = (
        repo.join("models/fashion-mnist-outlier.safetensors"),
        repo.join("models/general-mix.safetensors"),
    );
    let dir = tempfile::tempdir().unwrap();
    let rows = common::subset(
        &common::shared("mnist.parquet"),
        40,
        40,
        &dir.path().join("d.parquet"),
    );
    let table = format!("d={}", rows.display());
    let (ok, out, err) = common::glowwatch(
        &[
            "sql",
            "--device",
            "cpu",
            "--format",
            "csv",
            "--table",
            &table,
            "--model",
            m.to_str().unwrap(),
            "--general",
            g.to_str().unwrap(),
            "SELECT ood_score(image, 'combined') AS c FROM d ORDER BY id",
        ],
        "",
    );
    assert!(ok, "{err}");
    let got: Vec<f64> = out.lines().skip(1).map(|l| l.parse().unwrap()).collect();
    let dev = candle_core::Device::Cpu;
    let (mm, gm) = (
        GlowModel::load(&m, &dev).unwrap(),
        GlowModel::load(&g, &dev).unwrap(),
    );
    let mut scorer = ModelScorer::new(&mm, Some(&gm), &dev, Precision::F32, 256).unwrap();
    let cal = Calibration::load(&Calibration::path_for_model(&m)).unwrap();
    scorer
        .set_reference(cal.reference.map(std::sync::Arc::new))
        .unwrap();
    let px = ImageDataset::open(&[rows], "image", "id", scorer.config())
        .unwrap()
        .read_head(40, &mut SkippedRows::default())
        .unwrap();
    let want: Vec<f64> = scorer
        .score_pixels(&px.pixels)
        .unwrap()
        .iter()
        .map(|s| ScoreKind::Combined.value(s))
        .collect();
    assert_eq!(got.len(), 40);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
    }
}

/// Real-world layouts in SQL as in pipelines: a directory of files from different writers is one
/// table, INT96 timestamps outside 1677-2262 read as written, and a NULL argument to a scoring
/// function plans and gives NULL.
#[test]
fn mixed_writers_int96_and_null_arguments() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/cases");
    let m = format!("m={}", cases.join("mixed-writers/in").display());
    let t = format!("t={}", cases.join("int96-timestamps").display());
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist.safetensors");
    let (ok, out, err) = common::glowwatch(
        &[
            "sql",
            "--device",
            "cpu",
            "--format",
            "csv",
            "--table",
            &m,
            "--table",
            &t,
            "--model",
            model.to_str().unwrap(),
            "SELECT (SELECT count(ood_log_p(image)) FROM m) AS scored, \
             (SELECT min(capture_time) FROM t) AS lo, (SELECT max(capture_time) FROM t) AS hi, \
             ood_score(NULL) IS NULL AS a, ood_log_p(NULL) IS NULL AS b, \
             ood_score(image, NULL) IS NULL AS c FROM m LIMIT 1",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().nth(1).unwrap(),
        "6,1000-01-01T00:00:00,3000-01-01T00:00:00,true,true,true",
        "{out}"
    );
}

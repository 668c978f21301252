//! Scheduled retraining end to end on a small real window: a batch pipeline scores Fashion-MNIST
//! images with the registry's current version (named in every row); `retrain` selects them with
//! SQL, fine-tunes, evaluates against MNIST by conditional complexity (a complexity reference is
//! built for each model), promotes and recalibrates; a failing gate keeps the
//! current version (exit 3); a second retrain while one holds the lock exits 75 with a message.

#![cfg(feature = "sql")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::AsArray;
use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::run::run_pipeline;
use glowwatch::registry::Registry;
use glowwatch::retrain::{Outcome, RetrainConfig, retrain};
use glowwatch::train::progress::Progress;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn versions_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(dir) {
        let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(e).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let c = b
                .column_by_name("model_version")
                .unwrap()
                .as_string::<i32>();
            out.extend(c.iter().map(|v| v.unwrap_or("<null>").to_string()));
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out
}

fn retrain_toml(dir: &Path, registry: &Path, scored: &Path, max_bpd_increase: f64) -> PathBuf {
    let text = format!(
        r#"
name = "fm-retrain"
registry = "{registry}"
device = "cpu"
target_fpr = 0.05
[select]
tables = {{ scored = "{scored}" }}
days = 7
sample = 500
holdout_fraction = 0.2
[train]
steps = 40
batch = 32
lr = 0.002
warmup = 5
[evaluate]
score = "complexity_cond"
reference_ood = ["{mnist}"]
reference_rows = 300
[gates]
max_auroc_drop = 1.0
max_bpd_increase = {max_bpd_increase}
"#,
        registry = registry.display(),
        scored = scored.display(),
        mnist = common::shared("mnist.parquet").display(),
    );
    let p = dir.join(format!("retrain-{max_bpd_increase}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn retrain_promotes_a_better_model_keeps_on_failed_gates_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg_dir = d.join("registry/fashion-mnist");
    let registry = Registry::open(&reg_dir).unwrap();
    let v1 = registry
        .add_version(&common::tiny_model(d, 5), &[])
        .unwrap();
    registry.promote(&v1.name).unwrap();
    let input = common::subset(
        &common::shared("fashion_mnist_test.parquet"),
        600,
        200,
        &d.join("window.parquet"),
    );
    let pipeline = format!(
        r#"
name = "window"
[source]
kind = "parquet"
paths = ["{input}"]
[models]
registry = "{registry}"
device = "cpu"
[flag]
score = "nll"
threshold = 1e9
[sinks.scored]
path = "scored"
[sinks.dead_letter]
path = "dead"
"#,
        input = input.display(),
        registry = reg_dir.display()
    );
    let cfg = PipelineConfig::parse(&pipeline, d).unwrap();
    let s = run_pipeline(&cfg).unwrap();
    assert_eq!(s.scored, 600);
    let scored = d.join("scored");
    assert!(versions_in(&scored).iter().all(|v| v == "v0001"));

    // A candidate that passes the bpd gate is promoted with a fresh calibration.
    let rcfg = RetrainConfig::load(&retrain_toml(d, &reg_dir, &scored, 0.0)).unwrap();
    let r = retrain(&rcfg, &Progress::Quiet).unwrap();
    assert_eq!(r.outcome, Outcome::Promoted, "{r:#?}");
    assert_eq!(r.rows_selected, 600);
    assert_eq!(r.rows_sampled, 500);
    assert!(
        r.holdout_rows > 50 && r.holdout_rows < 150,
        "{}",
        r.holdout_rows
    );
    assert!(r.candidate.holdout_bpd < r.current.holdout_bpd, "{r:#?}");
    assert_eq!(r.current_version, "v0002");
    let v2 = registry.current().unwrap().unwrap();
    assert_eq!(v2.name, "v0002");
    let cal = glowwatch::score::calibration::Calibration::load(&v2.calibration()).unwrap();
    assert_eq!(cal.in_model, r.candidate.model_id);
    // The gated score needs a complexity reference: the new version's calibration carries one,
    // built from the selection's training rows (never its held-out rows).
    let reference = cal.reference.as_ref().expect("a complexity reference");
    assert_eq!(reference.len(), r.rows_sampled - r.holdout_rows);
    assert!(
        cal.thresholds
            .contains_key(&"complexity_cond".parse().unwrap())
    );
    assert!(v2.dir.join("retrain.json").is_file());
    assert!(r.current.auroc.contains_key("mnist") && r.candidate.auroc.contains_key("mnist"));

    // The pipeline now scores with v0002 (and its rows say so).
    let s2 = run_pipeline(&cfg).unwrap();
    assert_eq!(s2.model_id, r.candidate.model_id);
    let versions = versions_in(&scored);
    assert_eq!(versions.iter().filter(|v| *v == "v0002").count(), 600);

    // An impossible gate: the current version stays, exit status 3, the report says why.
    let bad = retrain_toml(d, &reg_dir, &scored, -100.0);
    let out = Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["retrain", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "kept");
    assert!(
        report["reasons"][0]
            .as_str()
            .unwrap()
            .contains("held-out bpd"),
        "{report}"
    );
    assert_eq!(registry.current().unwrap().unwrap().name, "v0002");
    assert_eq!(registry.versions().unwrap().len(), 2);

    // Two retrains of one model never overlap: the second exits 75 with a clear message.
    let lock = registry.lock_retrain().unwrap();
    let good = retrain_toml(d, &reg_dir, &scored, 0.0);
    let out = Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["retrain", good.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("another retrain") && err.contains("lock"),
        "{err}"
    );
    drop(lock);
    assert_eq!(registry.versions().unwrap().len(), 2);

    // Rollback points current back atomically.
    assert_eq!(registry.rollback(None).unwrap().name, "v0001");
    let s3 = glowwatch::pipeline::models::load_scorer(&cfg)
        .unwrap()
        .scorer;
    assert_eq!(s3.version(), Some("v0001"));

    // Starting again from the general model instead of the current version.
    let general = common::tiny_model(d, 9);
    let text = std::fs::read_to_string(retrain_toml(d, &reg_dir, &scored, 1000.0))
        .unwrap()
        .replace(
            "device = \"cpu\"",
            &format!("device = \"cpu\"\ngeneral = \"{}\"", general.display()),
        )
        .replace(
            "[train]",
            &format!(
                "[train]\nfrom = \"general\"\noutlier_data = [\"{}\"]",
                common::shared("mnist.parquet").display()
            ),
        );
    let p = d.join("retrain-general.toml");
    std::fs::write(&p, text).unwrap();
    let r = retrain(&RetrainConfig::load(&p).unwrap(), &Progress::Quiet).unwrap();
    assert_eq!(r.outcome, Outcome::Promoted, "{r:#?}");
    assert_eq!(r.current_version, "v0003");
    let m = glowwatch::glow::GlowModel::load(
        registry.current().unwrap().unwrap().model(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let gid = glowwatch::glow::GlowModel::load(&general, &candle_core::Device::Cpu)
        .unwrap()
        .model_id()
        .unwrap();
    assert_eq!(m.card.parent.as_deref(), Some(gid.as_str()));
}

#[test]
fn every_runs_again_after_each_run() {
    // A job that fails at once (empty registry) shows the scheduler loop without training.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let toml = retrain_toml(d, &d.join("registry/empty"), &d.join("nothing"), 0.0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["retrain", toml.to_str().unwrap(), "--every", "300ms"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let runs = err
        .matches("run ended with status 1; next in 300ms")
        .count();
    assert!(runs >= 2, "{err}");
    assert!(err.contains("no current version"), "{err}");
}

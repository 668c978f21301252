//! `glowwatch eval`, `calibrate` and `import` through the binary on real data with a small
//! model: the table, eval.json and an HTML report with plots are written; calibration stores a
//! threshold beside the model; IDX files import to Parquet that decodes back to the same pixels.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::pixels_to_tensor;
use glowwatch::train::data::{ImageDataset, SkippedRows};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glowwatch"))
}

fn small_model(dir: &Path, name: &str, seed: u64) -> std::path::PathBuf {
    let cfg = GlowConfig {
        scales: 3,
        steps: 1,
        hidden: 8,
        ..GlowConfig::small(1)
    };
    let m = GlowModel::new_random(&cfg, seed, &Device::Cpu).unwrap();
    let data = ImageDataset::open(
        &[common::shared("fashion_mnist_train.parquet")],
        "image",
        "id",
        &cfg,
    )
    .unwrap();
    let px = data.read_head(512, &mut SkippedRows::default()).unwrap();
    let x = pixels_to_tensor(&px.pixels, &cfg, 0.0, &Device::Cpu).unwrap();
    let x =
        (x.clone() + Tensor::rand(0f32, 1.0 / 256.0, x.shape(), &Device::Cpu).unwrap()).unwrap();
    m.init_from_data(&x).unwrap();
    m.perturb(seed, 0.02).unwrap();
    let p = dir.join(name);
    m.save(&p).unwrap();
    p
}

/// `glowwatch eval` of 300 Fashion-MNIST test images against 300 digits; its table.
fn eval_digits(m: &Path, g: &Path, out: &Path) -> String {
    let o = bin()
        .args(["eval", "--device", "cpu", "--max-rows", "300", "--model"])
        .arg(m)
        .arg("--general")
        .arg(g)
        .arg("--in-data")
        .arg(common::shared("fashion_mnist_test.parquet"))
        .arg("--ood")
        .arg(format!(
            "digits={}",
            common::shared("mnist.parquet").display()
        ))
        .arg("--out-dir")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

#[test]
fn eval_writes_table_json_and_plots_and_calibrate_stores_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path(), "in.safetensors", 1);
    let g = small_model(dir.path(), "gen.safetensors", 2);
    let out = dir.path().join("eval");
    let stdout = eval_digits(&m, &g, &out);
    for score in [
        "nll",
        "scale_0",
        "scale_1",
        "last_scale",
        "llr",
        "llr_scale_2",
    ] {
        assert!(stdout.contains(score), "table lacks {score}:\n{stdout}");
    }
    assert!(stdout.contains("vs digits"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let results = json["results"].as_array().unwrap();
    // nll, scale_0, scale_1, last_scale, llr, llr_scale_0..2, complexity with five codecs
    // (no calibration yet, so no reference scores).
    assert_eq!(results.len(), 13, "one row per score");
    assert!(stdout.contains("complexity_lzma") && stdout.contains("TPR@1%"));
    for r in results {
        let a = r["auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // A histogram and a ROC curve per score.
    assert_eq!(html.matches("<svg").count(), 2 * results.len());
    assert!(html.contains("ROC llr"));

    let o = bin()
        .args([
            "calibrate",
            "--device",
            "cpu",
            "--max-rows",
            "500",
            "--fpr",
            "0.05",
        ])
        .args(["--score", "llr", "nll", "--model"])
        .arg(&m)
        .arg("--general")
        .arg(&g)
        .arg("--data")
        .arg(common::shared("fashion_mnist_train.parquet"))
        .args(["--holdout", "0.2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cal =
        glowwatch::score::calibration::Calibration::load(&m.with_extension("calibration.json"))
            .unwrap();
    assert_eq!(cal.thresholds.len(), 2);
    let t = &cal.thresholds[&"llr".parse().unwrap()];
    assert_eq!(t.n, 500);
    assert!(t.expected_flag_rate <= 0.05 && t.expected_flag_rate > 0.03);
    assert!(t.data.contains("held out"));
    // --holdout also built a complexity reference from the other rows.
    let r = cal.reference.as_ref().expect("a complexity reference");
    assert_eq!((r.len(), r.k, r.grid), (5000, 20, 8));
    assert!(r.data.contains("outside the --holdout"), "{}", r.data);
    assert!(r.llr.is_some());
}

#[test]
fn reference_scores_are_calibrated_then_evaluated_with_recall_at_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model(dir.path(), "in.safetensors", 3);
    let g = small_model(dir.path(), "gen.safetensors", 4);
    let calibrate = |extra: &[&str]| {
        bin()
            .args(["calibrate", "--device", "cpu", "--max-rows", "400"])
            .args([
                "--score",
                "complexity",
                "complexity_cond",
                "combined",
                "--model",
            ])
            .arg(&m)
            .arg("--general")
            .arg(&g)
            .arg("--data")
            .arg(common::shared("fashion_mnist_train.parquet"))
            .args(extra)
            .output()
            .unwrap()
    };
    // Without held-out rows there is nowhere disjoint to take the reference from.
    let o = calibrate(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("complexity_cond") && err.contains("--holdout"),
        "{err}"
    );
    let o = calibrate(&["--holdout", "0.2", "--reference-rows", "600"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("eval");
    let stdout = eval_digits(&m, &g, &out);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 15, "{stdout}");
    for r in results {
        let name = r["score"].as_str().unwrap();
        let tpr = r["tpr_at_1pct_fpr"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&tpr));
        let cal = &r["calibrated"];
        if ["complexity", "complexity_cond", "combined"].contains(&name) {
            let recall = cal["recall"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&recall), "{name}: {cal}");
            // Thresholds from held-out training rows flag about 1 % of the test set.
            assert!(cal["fpr"].as_f64().unwrap() < 0.05, "{name}: {cal}");
        } else {
            assert!(cal.is_null(), "{name} was not calibrated: {cal}");
        }
    }
    assert!(stdout.contains("recall@cal") && stdout.contains("combined"));

    // The figures go into the model card; the weights and the id stay.
    let id = GlowModel::load(&m, &Device::Cpu)
        .unwrap()
        .model_id()
        .unwrap();
    let card = |model: &Path| {
        bin()
            .args(["model", "card"])
            .arg(model)
            .arg("--detection")
            .arg(out.join("eval.json"))
            .args(["--score", "combined", "--measured", "test eval"])
            .output()
            .unwrap()
    };
    let o = card(&m);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = GlowModel::load(&m, &Device::Cpu).unwrap();
    assert_eq!(after.model_id().unwrap(), id);
    let d = after.card.detection.expect("detection figures in the card");
    let want = results.iter().find(|r| r["score"] == "combined").unwrap();
    assert_eq!(d.score, "combined");
    assert_eq!(d.results.len(), 1);
    assert_eq!(d.results[0].ood, "digits");
    assert_eq!(d.results[0].auroc, want["auroc"].as_f64().unwrap());
    assert_eq!(
        d.results[0].recall_at_threshold,
        want["calibrated"]["recall"].as_f64()
    );
    assert!(d.measured.starts_with("test eval"));
    // Another model's evaluation is refused.
    let o = card(&g);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("evaluates model"));
}

#[test]
fn idx_files_import_to_parquet_that_decodes_to_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    // Three 4x5 images and their labels in the MNIST IDX format.
    let (n, h, w) = (3usize, 4usize, 5usize);
    let pixels: Vec<u8> = (0..n * h * w).map(|i| (i * 7 % 256) as u8).collect();
    let mut img = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        img.extend((d as u32).to_be_bytes());
    }
    img.extend(&pixels);
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    lab.extend([7u8, 1, 4]);
    std::fs::write(dir.path().join("img.idx"), &img).unwrap();
    std::fs::write(dir.path().join("lab.idx"), &lab).unwrap();
    let out = dir.path().join("out.parquet");
    let o = bin()
        .arg("import")
        .arg(dir.path().join("img.idx"))
        .arg("--labels")
        .arg(dir.path().join("lab.idx"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = GlowConfig {
        image_size: 4,
        scales: 2,
        ..GlowConfig::small(1)
    };
    let mut cfg = cfg;
    cfg.preprocess.resize = glowwatch::glow::config::ResizeMode::Pad;
    // Decoded by the pipeline's decoder: a 4x5 image does not fit a 4x4 model in pad mode.
    let data = ImageDataset::open(std::slice::from_ref(&out), "image", "id", &cfg).unwrap();
    let mut skipped = SkippedRows::default();
    let got = data.read_head(10, &mut skipped).unwrap();
    assert_eq!((got.len(), skipped.total()), (0, 3));
    assert_eq!(skipped.by_reason["wrong_size"], 3);
    // With a model size that fits, pixels come back exactly (zero-padded to 8x8).
    cfg.image_size = 8;
    let data = ImageDataset::open(std::slice::from_ref(&out), "image", "id", &cfg).unwrap();
    let got = data.read_head(10, &mut SkippedRows::default()).unwrap();
    assert_eq!(got.ids, vec!["0", "1", "2"]);
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                let want = pixels[i * h * w + y * w + x];
                // pad offsets: (8-5)/2 = 1 column, (8-4)/2 = 2 rows.
                assert_eq!(got.pixels[i * 64 + (y + 2) * 8 + x + 1], want);
            }
        }
    }
    // A file that is not IDX is a clear error.
    std::fs::write(dir.path().join("bad.idx"), b"hello").unwrap();
    let o = bin()
        .arg("import")
        .arg(dir.path().join("bad.idx"))
        .arg("--output")
        .arg(dir.path().join("bad.parquet"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an IDX file"));
}

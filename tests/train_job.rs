//! The training job on real data (small subsets of `../shared/datasets`): the loss falls,
//! a resumed run takes exactly the steps an uninterrupted one takes, the outlier loss lowers
//! log p_in - log p_gen on general images, and undecodable rows are skipped and reported.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::array::{BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{DType, Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use glowwatch::train::checkpoint;
use glowwatch::train::data::{Augment, ImageDataset, PixelBatch, SkippedRows, Split};
use glowwatch::train::progress::Progress;
use glowwatch::train::trainer::{OutlierSetup, validation_bpd};
use glowwatch::train::{AdamaxConfig, OutlierLoss, TrainOptions, Trainer};

fn tiny() -> GlowConfig {
    GlowConfig {
        scales: 2,
        steps: 2,
        hidden: 16,
        ..GlowConfig::small(1)
    }
}

fn options(steps: u64) -> TrainOptions {
    TrainOptions {
        epochs: 10,
        max_steps: Some(steps),
        max_time_s: None,
        batch: 16,
        seed: 7,
        optimizer: AdamaxConfig {
            lr: 2e-3,
            ..Default::default()
        },
        augment: Augment {
            translate: 0.1,
            flip: false,
        },
        init_actnorm: false,
        init_rows: 64,
        shuffle_rows: 128,
        checkpoint_every: 0,
        log_every: 1000,
        val_every: 0,
        outlier: None,
        freeze_scales: 0,
    }
}

fn params(m: &GlowModel) -> Vec<f32> {
    m.trainable_vars()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn dataset(dir: &std::path::Path, file: &str, rows: usize) -> ImageDataset {
    let p = common::subset(
        &common::shared(file),
        rows,
        64,
        &dir.join(format!("{file}.{rows}")),
    );
    ImageDataset::open(&[p], "image", "id", &tiny()).unwrap()
}

fn fresh_model(data: &ImageDataset) -> GlowModel {
    let m = GlowModel::new_random(&tiny(), 3, &Device::Cpu).unwrap();
    let first = data.read_head(512, &mut SkippedRows::default()).unwrap();
    // Initialise on dequantised inputs, as training does (constant pixels would otherwise
    // get a zero standard deviation).
    let x = pixels_to_tensor(&first.pixels, &tiny(), 0.0, &Device::Cpu).unwrap();
    let noise = Tensor::rand(0f32, 1.0 / 256.0, x.shape(), &Device::Cpu).unwrap();
    m.init_from_data(&(x + noise).unwrap()).unwrap();
    m
}

#[test]
fn loss_falls_on_fashion_mnist_and_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "fashion_mnist_train.parquet", 512);
    let val_set = dataset(dir.path(), "fashion_mnist_test.parquet", 128);
    let val = val_set.read_head(128, &mut SkippedRows::default()).unwrap();
    let stop = AtomicBool::new(false);

    // Uninterrupted: 40 steps.
    let a = fresh_model(&data);
    let init = dir.path().join("init.safetensors");
    a.save(&init).unwrap();
    let before = validation_bpd(&a, &val).unwrap().0;
    let job = Trainer {
        model: &a,
        data: &data,
        val: &val,
        outlier: None,
        options: options(40),
        checkpoint_dir: None,
        job: serde_json::Value::Null,
    };
    let rep = job.run(None, &stop, &Progress::Quiet).unwrap();
    assert_eq!((rep.steps, rep.skipped_steps), (40, 0));
    let after = rep.final_val_bpd.unwrap();
    eprintln!("validation bpd {before:.3} -> {after:.3}");
    assert!(after < before - 0.3, "bpd {before:.3} -> {after:.3}");

    // Interrupted after 25 steps (checkpoint), resumed from the files to 40.
    let b = GlowModel::load(&init, &Device::Cpu).unwrap();
    let ck = dir.path().join("ck");
    let job = Trainer {
        model: &b,
        data: &data,
        val: &val,
        outlier: None,
        options: options(25),
        checkpoint_dir: Some(ck.clone()),
        job: serde_json::json!({"note": "test"}),
    };
    let rep = job.run(None, &stop, &Progress::Quiet).unwrap();
    assert_eq!(rep.ended, "max_steps");
    let loaded = checkpoint::load(&ck, &Device::Cpu).unwrap();
    assert_eq!(loaded.job, serde_json::json!({"note": "test"}));
    assert_eq!(loaded.resume.state.step, 25);
    let c = loaded.model;
    let job = Trainer {
        model: &c,
        data: &data,
        val: &val,
        outlier: None,
        options: options(40),
        checkpoint_dir: None,
        job: serde_json::Value::Null,
    };
    let rep = job
        .run(Some(loaded.resume), &stop, &Progress::Quiet)
        .unwrap();
    assert_eq!(rep.steps, 40);
    let (pa, pc) = (params(&a), params(&c));
    let diff = pa
        .iter()
        .zip(&pc)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert_eq!(diff, 0.0, "resumed parameters differ by up to {diff}");

    // A mismatched pair (model replaced after the state was written) is refused.
    let other = fresh_model(&data);
    other.save(checkpoint::model_path(&ck)).unwrap();
    let err = checkpoint::load(&ck, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("belongs to model"), "{err}");
}

#[test]
fn outlier_loss_is_finite_and_pushes_general_images_below_the_general_model() {
    let dir = tempfile::tempdir().unwrap();
    let general_data = dataset(dir.path(), "general_mix_train.parquet", 512);
    let in_data = dataset(dir.path(), "fashion_mnist_train.parquet", 512);
    let general = fresh_model(&general_data);
    let stop = AtomicBool::new(false);
    let empty = PixelBatch {
        pixels: vec![],
        ids: vec![],
    };
    Trainer {
        model: &general,
        data: &general_data,
        val: &empty,
        outlier: None,
        options: options(10),
        checkpoint_dir: None,
        job: serde_json::Value::Null,
    }
    .run(None, &stop, &Progress::Quiet)
    .unwrap();
    let gen_scorer = general.scorer(&Device::Cpu, DType::F32).unwrap();
    let probe = general_data
        .read_head(128, &mut SkippedRows::default())
        .unwrap();
    let x = pixels_to_tensor(&probe.pixels, &tiny(), BIN_CENTRE, &Device::Cpu).unwrap();
    let gap = |m: &GlowModel| -> f64 {
        let lp_in = m
            .scorer(&Device::Cpu, DType::F32)
            .unwrap()
            .score(&x)
            .unwrap();
        let lp_gen = gen_scorer.score(&x).unwrap();
        lp_in
            .log_p
            .iter()
            .zip(&lp_gen.log_p)
            .map(|(a, b)| a - b)
            .sum::<f64>()
            / lp_in.log_p.len() as f64
    };
    // Fine-tune a copy of the general model with and without the outlier loss.
    let run = |outlier: bool| -> (f64, f64) {
        let path = dir.path().join("gen.safetensors");
        general.save(&path).unwrap();
        let m = GlowModel::load(&path, &Device::Cpu).unwrap();
        let loss = OutlierLoss {
            weight: 2000.0,
            temperature: 100.0,
        };
        let mut opts = options(15);
        opts.outlier = outlier.then_some(loss);
        let rep = Trainer {
            model: &m,
            data: &in_data,
            val: &empty,
            outlier: outlier.then_some(OutlierSetup {
                data: &general_data,
                general: &gen_scorer,
                loss,
            }),
            options: opts,
            checkpoint_dir: None,
            job: serde_json::Value::Null,
        }
        .run(None, &stop, &Progress::Quiet)
        .unwrap();
        assert_eq!(rep.skipped_steps, 0, "outlier loss must stay finite");
        (gap(&m), gap(&general))
    };
    let (plain, zero) = run(false);
    let (with_outlier, _) = run(true);
    assert_eq!(zero, 0.0);
    eprintln!(
        "mean log p_in - log p_gen on general images: plain fine-tune {plain:.1}, with outlier loss {with_outlier:.1}"
    );
    assert!(with_outlier.is_finite());
    assert!(
        with_outlier < plain - 20.0,
        "outlier loss did not push general images down: {with_outlier:.1} vs {plain:.1}"
    );
}

#[test]
fn non_finite_batch_is_skipped_without_touching_weights() {
    use glowwatch::train::{Adamax, StepOutcome};
    let m = GlowModel::new_random(&tiny(), 1, &Device::Cpu).unwrap();
    let before = params(&m);
    let vars = m.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = Adamax::new(vars, AdamaxConfig::default()).unwrap();
    let mut x = vec![0f32; 4 * 32 * 32];
    x[17] = f32::NAN;
    let x = Tensor::from_vec(x, (4, 1, 32, 32), &Device::Cpu).unwrap();
    let loss = m.glow.scale_log_p(&x).unwrap().sum_all().unwrap();
    let out = opt.step(&loss.backward().unwrap()).unwrap();
    assert_eq!(out, StepOutcome::SkippedNonFinite);
    assert_eq!((opt.steps(), opt.skipped()), (0, 1));
    assert_eq!(params(&m), before);
}

#[test]
fn undecodable_rows_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dataset(dir.path(), "fashion_mnist_test.parquet", 4)
        .read_head(4, &mut SkippedRows::default())
        .unwrap();
    // Re-encode two good rows and add three bad ones.
    let png = |px: &[u8]| {
        let img = image::GrayImage::from_raw(32, 32, px.to_vec()).unwrap();
        let mut c = std::io::Cursor::new(Vec::new());
        img.write_to(&mut c, image::ImageFormat::Png).unwrap();
        c.into_inner()
    };
    let a = png(&good.pixels[..1024]);
    let b = png(&good.pixels[1024..2048]);
    let rows: Vec<(&str, &[u8])> = vec![
        ("ok-1", &a),
        ("empty", b""),
        ("junk", b"not an image at all"),
        ("truncated", &b[..b.len() / 3]),
        ("ok-2", &b),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(BinaryArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let path = dir.path().join("mixed.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let data = ImageDataset::open(std::slice::from_ref(&path), "image", "id", &tiny()).unwrap();
    let mut skipped = SkippedRows::default();
    let read = data.read_head(100, &mut skipped).unwrap();
    assert_eq!(read.ids, vec!["ok-1", "ok-2"]);
    assert_eq!(read.pixels, good.pixels[..2048].to_vec());
    assert_eq!(skipped.total(), 3);
    assert_eq!(skipped.ids, vec!["empty", "junk", "truncated"]);
    assert_eq!(skipped.by_reason["truncated"], 1);
    // Splits partition the rows.
    let n = |s: Split| {
        data.clone()
            .with_split(s)
            .read_head(100, &mut SkippedRows::default())
            .unwrap()
            .len()
    };
    assert_eq!(n(Split::Train(0.5)) + n(Split::Holdout(0.5)), 2);
    // A file without an image column, or with the wrong type, fails before any work.
    let err = ImageDataset::open(std::slice::from_ref(&path), "pixels", "id", &tiny())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no column `pixels`"), "{err}");
    let err = ImageDataset::open(&[path], "id", "id", &tiny())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("expected binary"), "{err}");
}

/// `freeze_scales`: a fine-tune that keeps scale 0 at the parent's values gives exactly the
/// parent's scale-0 log-likelihoods (so that scale cancels in the ratio), while the other scale
/// trains; freezing every scale, or freezing in a run from scratch, is refused.
#[test]
fn frozen_scales_keep_the_parent_s_per_scale_log_likelihood() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "fashion_mnist_train.parquet", 256);
    let val = data.read_head(64, &mut SkippedRows::default()).unwrap();
    let parent = fresh_model(&data);
    let file = dir.path().join("parent.safetensors");
    parent.save(&file).unwrap();
    let child = GlowModel::load(&file, &Device::Cpu).unwrap();
    let stop = AtomicBool::new(false);
    let run = |freeze: usize, init_actnorm: bool| {
        Trainer {
            model: &child,
            data: &data,
            val: &val,
            outlier: None,
            options: TrainOptions {
                freeze_scales: freeze,
                init_actnorm,
                ..options(6)
            },
            checkpoint_dir: Some(dir.path().join("ck")),
            job: serde_json::Value::Null,
        }
        .run(None, &stop, &Progress::Quiet)
    };
    for (freeze, init) in [(2, false), (1, true)] {
        let e = run(freeze, init).err().unwrap().to_string();
        assert!(e.contains("freeze_scales"), "{e}");
    }
    assert_eq!(run(1, false).unwrap().steps, 6);
    // Regression: the checkpoint indexed the optimizer's state by every trainable variable
    // and panicked when scales were frozen. Its state covers the optimised variables only.
    let ck = checkpoint::load(&dir.path().join("ck"), &Device::Cpu).unwrap();
    assert_eq!(ck.resume.state.step, 6);
    let optimised = checkpoint::optimised_vars(&child, 1).len();
    assert_eq!(ck.resume.m.len(), optimised);
    assert!(optimised < child.trainable_vars().len());

    let x = pixels_to_tensor(&val.pixels, &tiny(), BIN_CENTRE, &Device::Cpu).unwrap();
    let lp = |m: &GlowModel| {
        m.scorer(&Device::Cpu, DType::F32)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
    };
    let (before, after) = (lp(&parent), lp(&child));
    let moved = |k: usize| {
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| (b[k] - a[k]).abs())
            .fold(0f64, f64::max)
    };
    assert_eq!(moved(0), 0.0, "scale 0 changed");
    assert!(moved(1) > 1e-3, "scale 1 did not train: {}", moved(1));
}

/// Regression: a finished `glowwatch train` left no checkpoint, so `--resume` could not extend
/// it, and `--epochs` was not taken from the command line on resume; a run stopped by
/// `--max-time` wrote no model file.
#[test]
fn a_finished_run_is_extended_by_resume_with_more_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = common::subset(
        &common::shared("fashion_mnist_train.parquet"),
        160,
        64,
        &d.join("train.parquet"),
    );
    let val = common::subset(
        &common::shared("fashion_mnist_test.parquet"),
        32,
        32,
        &d.join("val.parquet"),
    );
    std::fs::write(
        d.join("tiny.toml"),
        "in_channels = 1\nimage_size = 32\nscales = 2\nsteps = 1\nhidden = 8\n",
    )
    .unwrap();
    let out = d.join("m.safetensors");
    let train = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_glowwatch"))
            .arg("train")
            .args(extra)
            .args(["--device", "cpu"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        stderr
    };
    let (data, val, cfg, out_s) = (
        data.to_str().unwrap(),
        val.to_str().unwrap(),
        d.join("tiny.toml"),
        out.to_str().unwrap().to_string(),
    );
    train(&[
        "--data",
        data,
        "--val",
        val,
        "--config",
        cfg.to_str().unwrap(),
        "--batch",
        "32",
        "--out",
        &out_s,
    ]);
    // 160 rows / 32 = 5 steps in the default single epoch; the finished run left a checkpoint.
    let ck = d.join("m.ckpt");
    let first = checkpoint::load(&ck, &Device::Cpu).unwrap();
    assert_eq!((first.resume.state.step, first.resume.state.epoch), (5, 1));
    assert_eq!(
        GlowModel::load(&out, &Device::Cpu)
            .unwrap()
            .card
            .train_steps,
        5
    );

    let log = train(&["--resume", ck.to_str().unwrap(), "--epochs", "3"]);
    let ext = checkpoint::load(&ck, &Device::Cpu).unwrap();
    // Not a terminal: JSON lines, each with its wall-clock time; step reports count the run's
    // whole training time, the first process's included.
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(events.iter().all(|e| e["time"].as_str().is_some()), "{log}");
    let steps: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "step").collect();
    assert!(!steps.is_empty(), "{log}");
    for s in &steps {
        let elapsed = s["elapsed_s"].as_f64().unwrap();
        assert!(elapsed > first.resume.state.elapsed_s, "{s}");
        assert!(elapsed <= ext.resume.state.elapsed_s, "{s}");
    }
    // The first rate after the resume counts only this process's steps (6-10, batch 32) over
    // this process's time: rate x time ~ 160 images, not the 320 of all ten steps.
    let s = steps[0];
    assert_eq!(s["step"], 10);
    let this_process_s = s["elapsed_s"].as_f64().unwrap() - first.resume.state.elapsed_s;
    let images = s["images_per_s"].as_f64().unwrap() * this_process_s;
    assert!((150.0..240.0).contains(&images), "{images} images: {s}");
    assert_eq!((ext.resume.state.step, ext.resume.state.epoch), (15, 3));
    assert_eq!(
        ext.resume.state.history.len(),
        3,
        "one validation per epoch"
    );
    let m = GlowModel::load(&out, &Device::Cpu).unwrap();
    assert_eq!(m.card.train_steps, 15);
    assert_ne!(
        params(&m),
        params(&first.model),
        "the extension trained the model"
    );

    // A run that --max-time stops is a planned end: the model file is written, not only the
    // checkpoint (a zero budget stops before the first step).
    std::fs::remove_file(&out).unwrap();
    train(&[
        "--resume",
        ck.to_str().unwrap(),
        "--epochs",
        "4",
        "--max-time",
        "0s",
    ]);
    let m = GlowModel::load(&out, &Device::Cpu).unwrap();
    assert_eq!(m.card.train_steps, 15);
}

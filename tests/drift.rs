//! Drift alarms on real data (issue 20's alarms; the dashboard is not built yet): the shipped
//! Fashion-MNIST pair, thresholds and quantiles calibrated on held-out Fashion-MNIST training
//! rows; a feed of Fashion-MNIST test images raises no alarm, a feed that then switches to 30 %
//! MNIST digits raises one within the documented delay.

mod common;

use std::path::Path;

use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::decode::id_image_rows;
use glowwatch::pipeline::run::run_pipeline;

fn rows(name: &str, skip: usize, n: usize, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let p = common::subset(
        &common::shared(name),
        skip + n,
        4096,
        &dir.join(format!("{name}.sub")),
    );
    common::parquet_batches(&p)
        .iter()
        .flat_map(|b| id_image_rows(b).unwrap())
        .skip(skip)
        .collect()
}

#[test]
fn an_inlier_feed_raises_no_alarm_and_a_switch_to_30_percent_digits_raises_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, general) = (
        common::repo("models/fashion-mnist-outlier.safetensors")
            .display()
            .to_string(),
        common::repo("models/general-mix.safetensors")
            .display()
            .to_string(),
    );
    // Calibration with quantiles: 600 held-out Fashion-MNIST training rows.
    let train = common::subset(
        &common::shared("fashion_mnist_train.parquet"),
        1_200,
        4096,
        &d.join("train.parquet"),
    );
    let cal = d.join("cal.json");
    let (ok, _, err) = common::glowwatch(
        &[
            "calibrate",
            "--device",
            "cpu",
            "--model",
            &model,
            "--general",
            &general,
            "--data",
            train.to_str().unwrap(),
            "--holdout",
            "0.5",
            "--reference-rows",
            "0",
            "--score",
            "llr",
            "llr_scale_0",
            "llr_scale_1",
            "llr_scale_2",
            "--out",
            cal.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    // Feeds: 800 Fashion-MNIST test images; then 800 more with 30 % MNIST digits.
    let fm = rows("fashion_mnist_test.parquet", 0, 1_360, d);
    let digits = rows("mnist.parquet", 0, 240, d);
    let inliers = &fm[..800];
    let mut switched: Vec<(String, Vec<u8>)> = inliers.to_vec();
    let (mut f, mut m) = (fm[800..].iter(), digits.iter());
    for i in 0..800 {
        let next = if i % 10 < 3 { m.next() } else { f.next() };
        switched.push(next.unwrap().clone());
    }
    let run = |name: &str, feed: &[(String, Vec<u8>)]| {
        let input = d.join(format!("{name}.parquet"));
        let feed: Vec<(String, Option<Vec<u8>>)> = feed
            .iter()
            .map(|(i, b)| (i.clone(), Some(b.clone())))
            .collect();
        common::write_images(&input, &feed);
        let toml = format!(
            r#"
name = "{name}"
[source]
kind = "parquet"
paths = ["{input}"]
[models]
in = "{model}"
general = "{general}"
device = "cpu"
[flag]
score = "llr"
calibration = "{cal}"
[sinks.scored]
path = "{out}/scored"
partition = "none"
[sinks.dead_letter]
path = "{out}/dead"
partition = "none"
[drift]
windows = [64, 256]
ert = 4000
stride = 32
"#,
            input = input.display(),
            cal = cal.display(),
            out = d.join(name).display(),
        );
        run_pipeline(&PipelineConfig::parse(&toml, d).unwrap()).unwrap()
    };
    let calm = run("inliers", inliers);
    assert_eq!(calm.scored, 800);
    assert!(
        calm.drift_alarms.is_empty(),
        "false alarm: {:?}",
        calm.drift_alarms
    );
    let drifting = run("switched", &switched);
    println!(
        "first alarms (record; the switch is at 800): {:?}",
        drifting.drift_first_alarm
    );
    let first = drifting
        .drift_first_alarm
        .values()
        .min()
        .copied()
        .expect("an alarm");
    assert!(first > 800, "alarm before the switch: {first}");
    assert!(
        first - 800 <= 512,
        "detection delay {} records",
        first - 800
    );
}

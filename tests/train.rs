//! Training groundwork: the channels-last likelihood and Adamax together lower the loss of a
//! small model on a fixed image set, with gradients from candle's autograd and from the fused
//! CPU path alike (the full training job is tested in train_job.rs).

use candle_core::{Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::fused_train::{Backprop, loss_and_gradients};
use glowwatch::glow::preprocess::pixels_to_tensor;
use glowwatch::train::{Adamax, AdamaxConfig, StepOutcome};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Images with structure: soft diagonal stripes of random phase and contrast.
fn stripes(n: usize, cfg: &GlowConfig) -> Vec<u8> {
    let s = cfg.image_size;
    let mut px = Vec::with_capacity(n * cfg.dims());
    for i in 0..n {
        let (phase, amp) = ((i * 37 % 11) as f64, 60.0 + (i * 13 % 7) as f64 * 20.0);
        for y in 0..s {
            for x in 0..s {
                let v = 128.0 + amp * (((x + y) as f64 + phase) * 0.6).sin();
                px.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    px
}

/// bits/dim after each of 40 Adamax steps on the stripes through `backprop`, from the same
/// initial model and the same noise whichever path computes the gradients.
fn train_stripes(backprop: Backprop) -> Vec<f64> {
    let cfg = GlowConfig {
        image_size: 16,
        scales: 2,
        steps: 2,
        hidden: 16,
        ..GlowConfig::small(1)
    };
    let dev = Device::Cpu;
    let px = stripes(32, &cfg);
    let model = GlowModel::new_random(&cfg, 1, &dev).unwrap();
    let x0 = pixels_to_tensor(&px, &cfg, 1.0 / 512.0, &dev).unwrap();
    model.init_from_data(&x0).unwrap();
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = Adamax::new(
        vars,
        AdamaxConfig {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let dims = cfg.dims() as f64;
    let mut rng = StdRng::seed_from_u64(9);
    let mut tapes = Vec::new();
    let mut history = Vec::new();
    for step in 0..40u64 {
        // Dequantisation noise U[0, 1/256) per value, the same sequence for both paths.
        let noise: Vec<f32> = (0..x0.elem_count())
            .map(|_| rng.random::<f32>() / 256.0)
            .collect();
        let noise = Tensor::from_vec(noise, x0.shape(), &dev).unwrap();
        let x = (pixels_to_tensor(&px, &cfg, 0.0, &dev).unwrap() + noise).unwrap();
        let (loss, grads) = loss_and_gradients(&model.glow, backprop, &[&x], &mut tapes, |lp| {
            Ok(((lp[0].sum(1)?.mean(0)? / (-dims * std::f64::consts::LN_2))? + 8.0)?)
        })
        .unwrap();
        history.push(loss.to_scalar::<f64>().unwrap());
        let outcome = opt.step(&grads).unwrap();
        assert_eq!(outcome, StepOutcome::Applied, "step {step}");
    }
    assert_eq!(opt.steps(), 40);
    history
}

#[test]
fn adamax_on_the_training_path_lowers_bits_per_dim() {
    for backprop in [Backprop::Autograd, Backprop::Fused] {
        let history = train_stripes(backprop);
        let first: f64 = history[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = history[35..].iter().sum::<f64>() / 5.0;
        eprintln!("{backprop:?}: bpd {first:.3} -> {last:.3} over 40 steps");
        assert!(
            last < first - 0.2,
            "{backprop:?}: bpd did not fall enough: {first:.3} -> {last:.3}"
        );
    }
}

#[test]
fn fused_and_autograd_training_follow_the_same_bits_per_dim() {
    let (a, f) = (
        train_stripes(Backprop::Autograd),
        train_stripes(Backprop::Fused),
    );
    let worst = a
        .iter()
        .zip(&f)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    eprintln!("largest per-step bpd difference over 40 steps: {worst:.2e}");
    assert!(
        worst < 1e-5,
        "paths drift apart: {worst:.2e} bpd\n{a:?}\n{f:?}"
    );
}

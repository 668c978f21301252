//! Training groundwork: the channels-last likelihood and Adamax together lower the loss of a
//! small model on a fixed image set (the full training job arrives with the lifecycle issue).

use candle_core::{DType, Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::invconv::FIXED_PARAMS;
use glowwatch::glow::preprocess::pixels_to_tensor;
use glowwatch::train::{Adamax, AdamaxConfig, StepOutcome};

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

#[test]
fn adamax_on_the_training_path_lowers_bits_per_dim() {
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
    let vars = {
        let data = model.varmap.data().lock().unwrap();
        let mut named: Vec<_> = data
            .iter()
            .filter(|(k, _)| !FIXED_PARAMS.iter().any(|f| k.ends_with(&format!(".{f}"))))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.into_iter().map(|(_, v)| v).collect::<Vec<_>>()
    };
    let mut opt = Adamax::new(
        vars,
        AdamaxConfig {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let dims = cfg.dims() as f64;
    let bpd = |log_p: &Tensor| -> Tensor {
        ((log_p.mean(0).unwrap() / (-dims * std::f64::consts::LN_2)).unwrap() + 8.0).unwrap()
    };
    let mut history = Vec::new();
    for step in 0..40u64 {
        // Dequantisation noise U[0, 1/256) per value, fixed per step for reproducibility.
        let noise = Tensor::rand(0f32, 1.0 / 256.0, x0.shape(), &dev).unwrap();
        let x = (pixels_to_tensor(&px, &cfg, 0.0, &dev).unwrap() + noise).unwrap();
        let loss = bpd(&model.glow.scale_log_p(&x).unwrap().sum(1).unwrap());
        history.push(loss.to_scalar::<f64>().unwrap());
        let outcome = opt.step(&loss.backward().unwrap()).unwrap();
        assert_eq!(outcome, StepOutcome::Applied, "step {step}");
    }
    let first: f64 = history[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = history[35..].iter().sum::<f64>() / 5.0;
    eprintln!("bpd {first:.3} -> {last:.3} over 40 steps");
    assert!(
        last < first - 0.2,
        "bpd did not fall enough: {first:.3} -> {last:.3}"
    );
    assert_eq!(opt.steps(), 40);
    // The trained model still scores through the fused scorer consistently with training.
    let s = model.scorer(&dev, DType::F32).unwrap().score(&x0).unwrap();
    let fused = s.bpd(cfg.dims()).iter().sum::<f64>() / 32.0;
    let train = bpd(&model.glow.scale_log_p(&x0).unwrap().sum(1).unwrap())
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (fused - train).abs() < 1e-4,
        "fused {fused} vs training path {train}"
    );
}

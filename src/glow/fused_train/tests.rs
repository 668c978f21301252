//! The fused path against candle's autograd over [`Glow::scale_log_p`]: same lp, same
//! gradient for every variable, for grey and RGB models, uneven chunk splits and a loss over
//! two input batches (the outlier loss's shape).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::glow::{GlowConfig, GlowModel};

fn model(in_channels: usize, steps: usize, hidden: usize) -> GlowModel {
    let cfg = GlowConfig {
        steps,
        hidden,
        ..GlowConfig::small(in_channels)
    };
    let m = GlowModel::new_random(&cfg, 7, &Device::Cpu).unwrap();
    m.init_from_data(&images(&cfg, 16, 1)).unwrap();
    // Off the identity start: the last coupling convs and every ActNorm move, so each
    // gradient path carries signal.
    m.perturb(3, 0.05).unwrap();
    m
}

fn images(cfg: &GlowConfig, n: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = cfg.image_size;
    let v: Vec<f32> = (0..n * cfg.in_channels * s * s)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    Tensor::from_vec(v, (n, cfg.in_channels, s, s), &Device::Cpu).unwrap()
}

/// max |a - b| / max |a| over the whole tensor (0 when both are 0).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 { diff } else { diff / scale }
}

/// Runs both paths on `inputs` with per-(image, scale) weights in the loss and compares lp
/// and every trainable variable's gradient.
fn check(m: &GlowModel, inputs: &[&Tensor]) {
    let levels = m.config().scales;
    // A loss with a different weight per image and scale, so dL/dlp differs everywhere.
    let loss = |lps: &[Tensor]| -> Result<Tensor> {
        let mut total = Tensor::new(0.0f64, &Device::Cpu)?;
        for (i, lp) in lps.iter().enumerate() {
            let n = lp.dim(0)?;
            let w: Vec<f64> = (0..n * levels)
                .map(|j| ((j * 7 + i * 3) % 11) as f64 / 11.0 - 0.3)
                .collect();
            let w = Tensor::from_vec(w, (n, levels), &Device::Cpu)?;
            total = (total + (lp * w)?.sum_all()?)?;
        }
        Ok(total)
    };
    let mut tapes = Vec::new();
    let (la, ga) =
        loss_and_gradients(&m.glow, Backprop::Autograd, inputs, &mut tapes, loss).unwrap();
    let (lf, gf) = loss_and_gradients(&m.glow, Backprop::Fused, inputs, &mut tapes, loss).unwrap();
    let (la, lf) = (
        la.to_scalar::<f64>().unwrap(),
        lf.to_scalar::<f64>().unwrap(),
    );
    assert!(
        (la - lf).abs() <= 1e-5 * la.abs().max(1.0),
        "loss {la} vs fused {lf}"
    );
    for x in inputs {
        let want = m.glow.scale_log_p(x).unwrap();
        let got = FusedPath::new(&m.glow)
            .unwrap()
            .forward(x, &mut Tape::default())
            .unwrap();
        assert!(
            rel(&want, &got) < 1e-5,
            "lp differs by {}",
            rel(&want, &got)
        );
    }
    for (name, var) in m.trainable_vars() {
        let a = ga.get(var.as_tensor());
        let f = gf.get(var.as_tensor());
        match (a, f) {
            (Some(a), Some(f)) => {
                let r = rel(a, f);
                assert!(
                    r < 1e-4,
                    "{name}: gradient differs by {r:.2e} of its largest entry"
                );
            }
            (None, None) => {}
            (a, f) => panic!(
                "{name}: autograd has a gradient {}, fused {}",
                a.is_some(),
                f.is_some()
            ),
        }
    }
}

#[test]
fn fused_gradients_equal_autograd_for_a_grey_model() {
    let m = model(1, 2, 16);
    check(&m, &[&images(m.config(), 6, 2)]);
}

#[test]
fn fused_gradients_equal_autograd_for_an_rgb_model_and_an_uneven_batch() {
    let m = model(3, 2, 8);
    // 5 images over the rayon threads: chunks of different sizes.
    check(&m, &[&images(m.config(), 5, 4)]);
}

#[test]
fn fused_gradients_of_a_loss_over_two_batches_add_up() {
    let m = model(1, 1, 8);
    check(&m, &[&images(m.config(), 4, 5), &images(m.config(), 3, 6)]);
}

#[test]
fn a_reused_tape_gives_the_same_result_for_a_smaller_batch() {
    let m = model(1, 1, 8);
    let path = FusedPath::new(&m.glow).unwrap();
    let mut tape = Tape::default();
    let big = images(m.config(), 8, 8);
    let small = images(m.config(), 3, 9);
    path.forward(&big, &mut tape).unwrap();
    let reused = path.forward(&small, &mut tape).unwrap();
    let fresh = path.forward(&small, &mut Tape::default()).unwrap();
    assert_eq!(rel(&fresh, &reused), 0.0);
}

#[test]
fn a_wrong_input_shape_is_an_error_naming_the_expected_shape() {
    let m = model(1, 1, 8);
    let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = FusedPath::new(&m.glow)
        .unwrap()
        .forward(&x, &mut Tape::default())
        .unwrap_err();
    assert!(e.to_string().contains("(N, 1,"), "{e}");
}

/// The f32 CPU scorer of `m` (the fused forward).
fn cpu_scorer(m: &GlowModel) -> crate::glow::GlowScorer {
    m.scorer(&Device::Cpu, DType::F32).unwrap()
}

/// lp of the CPU scorer's fused forward against its candle-kernel path.
fn scorer_paths_agree(m: &GlowModel, x: &Tensor) {
    let fused = cpu_scorer(m);
    let kernels = cpu_scorer(m).kernel_path();
    let (a, b) = (kernels.forward(x).unwrap(), fused.forward(x).unwrap());
    assert!(
        rel(&a, &b) < 1e-5,
        "scorer paths differ by {:.2e}",
        rel(&a, &b)
    );
    assert_eq!(fused.score(x).unwrap().per_scale.len(), x.dim(0).unwrap());
}

#[test]
fn the_cpu_scorer_s_fused_forward_equals_its_kernel_path() {
    let m = model(3, 2, 8);
    scorer_paths_agree(&m, &images(m.config(), 5, 10));
    // More images than one scoring slice holds on any thread count up to 4.
    let big = super::SCORING_IMAGES_PER_THREAD * 4 + 3;
    let grey = model(1, 1, 8);
    scorer_paths_agree(&grey, &images(grey.config(), big, 13));
}

#[test]
fn the_fused_forward_folds_a_diagonal_gaussian_prior_as_the_scorer_does() {
    let cfg = GlowConfig {
        steps: 1,
        hidden: 8,
        prior: crate::glow::Prior::DiagonalGaussian,
        ..GlowConfig::small(1)
    };
    let m = GlowModel::new_random(&cfg, 7, &Device::Cpu).unwrap();
    m.init_from_data(&images(&cfg, 8, 1)).unwrap();
    m.perturb(3, 0.05).unwrap();
    // The prior's mean and log-std are fixed parameters (perturb leaves them): set them.
    let writer = crate::glow::init::ParamWriter::new(&m.varmap);
    let mut rng = StdRng::seed_from_u64(11);
    for s in m.glow.scales() {
        let (mean, logstd) = s.exit.prior.as_ref().expect("a diagonal Gaussian prior");
        for (t, scale) in [(mean, 0.5f32), (logstd, 0.3)] {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| scale * (rng.random::<f32>() - 0.5))
                .collect();
            writer
                .set(t, &Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    assert_eq!(Backprop::auto(&m.glow, &Device::Cpu), Backprop::Autograd);
    let x = images(&cfg, 4, 12);
    scorer_paths_agree(&m, &x);
    let want = m.glow.forward(&x).unwrap().log_p().unwrap();
    let got = cpu_scorer(&m).forward(&x).unwrap().sum(1).unwrap();
    assert!(
        rel(&want, &got) < 1e-5,
        "fused scorer vs reference: {:.2e}",
        rel(&want, &got)
    );
}

#[test]
fn a_wrong_input_shape_is_an_error_for_the_fused_scorer_too() {
    let m = model(1, 1, 8);
    let x = Tensor::zeros((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = cpu_scorer(&m).forward(&x).unwrap_err();
    assert!(e.to_string().contains("(N, 1, 32, 32)"), "{e}");
}

#[test]
fn an_empty_batch_scores_to_an_empty_result() {
    let m = model(1, 1, 8);
    let x = Tensor::zeros((0, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let lp = cpu_scorer(&m).forward(&x).unwrap();
    assert_eq!(lp.dims(), &[0, m.config().scales]);
}

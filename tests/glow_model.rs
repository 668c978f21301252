//! Model-core tests of the Glow (issue: Glow model core). Each asserts a property method.md
//! states: invertibility, brute-force log-determinants, exact per-scale sums, ~8.2 bpd at init,
//! ActNorm statistics, fast path == reference path, and model-file round trips and errors.

use candle_core::{DType, Device, Tensor};
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::exit::standard_normal_log_density;
use glowwatch::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use glowwatch::glow::squeeze::squeeze;
use glowwatch::glow::{GlowModel, bits_per_dim};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn tiny_config() -> GlowConfig {
    GlowConfig {
        image_size: 8,
        steps: 2,
        hidden: 8,
        scales: 2,
        ..GlowConfig::small(1)
    }
}

fn random_pixels(n: usize, cfg: &GlowConfig, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * cfg.dims()).map(|_| rng.random::<u8>()).collect()
}

fn random_images(n: usize, cfg: &GlowConfig, seed: u64, dtype: DType) -> Tensor {
    pixels_to_tensor(&random_pixels(n, cfg, seed), cfg, BIN_CENTRE, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Smooth, image-like inputs (a blurred random field) so a model has structure to fit.
fn smooth_images(n: usize, cfg: &GlowConfig, seed: u64) -> Tensor {
    let x = random_images(n, cfg, seed, DType::F32);
    let k = Tensor::ones((cfg.in_channels, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    (x.conv2d(&(k / 9.0).unwrap(), 1, 1, 1, cfg.in_channels)
        .unwrap()
        * 1.5)
        .unwrap()
}

/// An f32 model initialised on `n` smooth images (returned too), then moved off its init values
/// by N(0, noise^2) so no layer is an identity or a linear map by accident (the last coupling
/// conv starts at zero).
fn perturbed_model(cfg: &GlowConfig, seed: u64, n: usize, noise: f64) -> (GlowModel, Tensor) {
    let m = GlowModel::new_random(cfg, seed, &Device::Cpu).unwrap();
    let x = smooth_images(n, cfg, seed + 1);
    m.init_from_data(&x).unwrap();
    m.perturb(seed + 2, noise).unwrap();
    (m, x)
}

fn to_vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// log|det J| of `f` at the single input `x` (1, ...) by central differences in f64:
/// all 2*D perturbed inputs go through `f` as one batch.
fn brute_force_logdet(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> f64 {
    let shape = x.dims().to_vec();
    let base = to_vec64(x);
    let d = base.len();
    let eps = 1e-6;
    let mut batch = Vec::with_capacity(2 * d * d);
    for i in 0..d {
        for sgn in [1.0, -1.0] {
            let mut v = base.clone();
            v[i] += sgn * eps;
            batch.extend(v);
        }
    }
    let mut bshape = shape.clone();
    bshape[0] = 2 * d;
    let out = to_vec64(&f(&Tensor::from_vec(batch, bshape, &Device::Cpu).unwrap()));
    assert_eq!(out.len(), 2 * d * d, "layer must map R^D to R^D");
    let jac = DMatrix::from_fn(d, d, |r, c| {
        (out[2 * c * d + r] - out[(2 * c + 1) * d + r]) / (2.0 * eps)
    });
    // Sum of log|pivots| rather than log|det|: the determinant itself can underflow.
    jac.lu().u().diagonal().iter().map(|v| v.abs().ln()).sum()
}

fn f64_model(cfg: &GlowConfig, seed: u64) -> GlowModel {
    let m = GlowModel::new_random_dtype(cfg, seed, &Device::Cpu, DType::F64).unwrap();
    m.init_from_data(&random_images(16, cfg, seed + 1, DType::F64))
        .unwrap();
    m.perturb(seed + 2, 0.05).unwrap();
    m
}

#[test]
fn layer_log_determinants_match_brute_force_jacobians() {
    let cfg = tiny_config();
    let m = f64_model(&cfg, 7);
    let sc = &m.glow.scales()[0];
    let step = &sc.steps[1];
    // A (1, 4, 4, 4) input at scale 0.
    let x = squeeze(&random_images(1, &cfg, 11, DType::F64)).unwrap();
    let hw = 16;
    let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();

    let an = brute_force_logdet(&x, |b| step.actnorm.forward(b, None).unwrap());
    assert!(
        (an - scalar(step.actnorm.logdet(hw).unwrap())).abs() < 1e-6,
        "actnorm {an}"
    );

    let ic = brute_force_logdet(&x, |b| step.invconv.forward(b).unwrap());
    assert!(
        (ic - scalar(step.invconv.logdet(hw).unwrap())).abs() < 1e-6,
        "invconv {ic}"
    );

    let cp = brute_force_logdet(&x, |b| step.coupling.forward(b, None).unwrap().0);
    let cp_ld = to_vec64(&step.coupling.forward(&x, None).unwrap().1)[0];
    assert!(
        cp.abs() > 0.1,
        "coupling must be non-trivial here, got {cp}"
    );
    assert!((cp - cp_ld).abs() < 1e-6, "coupling brute {cp} vs {cp_ld}");

    let sq = brute_force_logdet(&random_images(1, &cfg, 3, DType::F64), |b| {
        squeeze(b).unwrap()
    });
    assert!(sq.abs() < 1e-9, "squeeze is volume preserving, got {sq}");

    let z = x.narrow(1, 0, 2).unwrap();
    let ex = brute_force_logdet(&z, |b| sc.exit.forward(b, None).unwrap());
    assert!(
        (ex - scalar(sc.exit.logdet().unwrap())).abs() < 1e-6,
        "exit {ex}"
    );
}

#[test]
fn whole_flow_log_likelihood_matches_change_of_variables() {
    let cfg = tiny_config();
    let m = f64_model(&cfg, 17);
    let x = random_images(1, &cfg, 5, DType::F64);
    let flat_latents = |b: &Tensor| {
        let out = m.glow.forward(b).unwrap();
        let parts: Vec<Tensor> = out
            .latents
            .iter()
            .map(|y| y.flatten_from(1).unwrap())
            .collect();
        Tensor::cat(&parts, 1).unwrap()
    };
    let logdet = brute_force_logdet(&x, flat_latents);
    let prior = to_vec64(&standard_normal_log_density(&flat_latents(&x)).unwrap())[0];
    let out = m.glow.forward(&x).unwrap();
    let lp_sum: f64 = (0..cfg.scales)
        .map(|k| to_vec64(&out.scale_log_p(k).unwrap())[0])
        .sum();
    assert!(
        (lp_sum - (logdet + prior)).abs() < 1e-6 * (1.0 + lp_sum.abs()),
        "sum lp_k {lp_sum} vs brute force {}",
        logdet + prior
    );
    // The fused scorer gives the same per-scale terms in f64.
    let s = m
        .scorer(&Device::Cpu, DType::F64)
        .unwrap()
        .score(&x)
        .unwrap();
    for k in 0..cfg.scales {
        let r = to_vec64(&out.scale_log_p(k).unwrap())[0];
        assert!(
            (s.per_scale[0][k] - r).abs() < 1e-9 * (1.0 + r.abs()),
            "scale {k}"
        );
    }
}

#[test]
fn inverse_of_forward_reconstructs_images_f32() {
    for in_channels in [1, 3] {
        let cfg = GlowConfig {
            steps: 4,
            hidden: 32,
            ..GlowConfig::small(in_channels)
        };
        let (m, x) = perturbed_model(&cfg, 1, 8, 0.02);
        let out = m.glow.forward(&x).unwrap();
        let back = m.glow.inverse(&out.latents).unwrap();
        let err = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            err < 1e-4,
            "C={in_channels}: max abs reconstruction error {err}"
        );
        let samples = m.glow.sample(4, 0.7, 9).unwrap();
        assert_eq!(samples.dims(), &[4, in_channels, 32, 32]);
        assert!(to_vec64(&samples).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn per_scale_terms_sum_to_the_total_in_f64() {
    let cfg = GlowConfig {
        steps: 3,
        hidden: 24,
        ..GlowConfig::small(1)
    };
    let (m, x) = perturbed_model(&cfg, 4, 16, 0.02);
    let out = m.glow.forward(&x).unwrap();
    // Independent accumulation: one running log-det sum + the prior of all latents at once.
    let total = to_vec64(&(&out.total_logdet + &out.total_prior).unwrap());
    let by_scale = to_vec64(&out.log_p().unwrap());
    let scorer = m
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&x)
        .unwrap();
    for i in 0..16 {
        assert!(
            (total[i] - by_scale[i]).abs() <= 1e-6 * total[i].abs(),
            "image {i}: sum_k lp_k {} vs total {}",
            by_scale[i],
            total[i]
        );
        let s: f64 = scorer.per_scale[i].iter().sum();
        assert_eq!(s, scorer.log_p[i]);
        // Fused f32 fast path vs the f32 reference path: same numbers to f32 rounding.
        assert!(
            (scorer.log_p[i] - total[i]).abs() <= 2e-5 * total[i].abs(),
            "image {i}: fused {} vs reference {}",
            scorer.log_p[i],
            total[i]
        );
        for k in 0..cfg.scales {
            let r = to_vec64(&out.scale_log_p(k).unwrap())[i];
            assert!(
                (scorer.per_scale[i][k] - r).abs() <= 2e-5 * (1.0 + r.abs()),
                "scale {k}"
            );
        }
    }
}

#[test]
fn fresh_model_gives_about_8_2_bpd_on_uniform_noise() {
    let cfg = GlowConfig::small(1);
    let m = GlowModel::new_random(&cfg, 8, &Device::Cpu).unwrap();
    let init = random_images(64, &cfg, 9, DType::F32);
    m.init_from_data(&init).unwrap();
    let test = random_images(32, &cfg, 10, DType::F32);
    let s = m
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&test)
        .unwrap();
    let bpd = s.bpd(cfg.dims());
    let mean = bpd.iter().sum::<f64>() / bpd.len() as f64;
    // Entropy 8 bits + the Gaussian-vs-uniform gap (0.25 bits) at a linear initialisation.
    assert!((8.1..8.4).contains(&mean), "mean bpd {mean}");
    // Per-scale bits/dim average back to the total, weighted by exit dimensions.
    let shape = cfg.shape();
    let weighted: f64 = shape
        .scales
        .iter()
        .enumerate()
        .map(|(k, sc)| s.scale_bpd(k, sc.exit_dims())[0] * sc.exit_dims() as f64)
        .sum::<f64>()
        / cfg.dims() as f64;
    assert!((weighted - bpd[0]).abs() < 1e-9);
    assert!((bits_per_dim(s.log_p[0], cfg.dims()) - bpd[0]).abs() < 1e-12);
}

#[test]
fn actnorm_outputs_are_standardised_after_data_dependent_init() {
    let cfg = GlowConfig {
        steps: 3,
        hidden: 16,
        ..GlowConfig::small(1)
    };
    let m = GlowModel::new_random(&cfg, 12, &Device::Cpu).unwrap();
    let x = smooth_images(32, &cfg, 13);
    m.init_from_data(&x).unwrap();
    let check = |t: &Tensor, what: &str| {
        let c = t.dim(1).unwrap();
        let flat = t
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((c, ()))
            .unwrap();
        for (ch, row) in flat
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
            .iter()
            .enumerate()
        {
            let mean = row.iter().sum::<f64>() / row.len() as f64;
            let std =
                (row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / row.len() as f64).sqrt();
            assert!(mean.abs() < 1e-4, "{what} channel {ch}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-3, "{what} channel {ch}: std {std}");
        }
    };
    let mut h = squeeze(&x).unwrap();
    for (j, step) in m.glow.scales()[0].steps.iter().enumerate() {
        h = step.actnorm.forward(&h, None).unwrap();
        check(&h, &format!("scale 0 step {j} actnorm"));
        h = step.invconv.forward(&h).unwrap();
        h = step.coupling.forward(&h, None).unwrap().0;
    }
    // Exit ActNorms standardise every latent dimension over the batch.
    for (k, y) in m.glow.forward(&x).unwrap().latents.iter().enumerate() {
        let flat = y.flatten_from(1).unwrap().unsqueeze(2).unwrap();
        check(
            &flat
                .transpose(0, 1)
                .unwrap()
                .transpose(0, 2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .transpose(0, 1)
                .unwrap(),
            &format!("exit {k}"),
        );
    }
}

#[test]
fn bf16_scorers_track_the_f32_scores() {
    let cfg = GlowConfig {
        steps: 2,
        hidden: 16,
        ..GlowConfig::small(1)
    };
    let (m, x) = perturbed_model(&cfg, 21, 8, 0.01);
    let f32s = m
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&x)
        .unwrap();
    let mixed = m
        .scorer(&Device::Cpu, DType::BF16)
        .unwrap()
        .score(&x)
        .unwrap();
    let all = m
        .scorer_with_state(&Device::Cpu, DType::BF16, DType::BF16)
        .unwrap()
        .score(&x)
        .unwrap();
    let max_rel = |s: &glowwatch::glow::ScaleScores| {
        s.per_scale
            .iter()
            .flatten()
            .zip(f32s.per_scale.iter().flatten())
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0.0, f64::max)
    };
    let (rm, ra) = (max_rel(&mixed), max_rel(&all));
    assert!(rm > 0.0 && rm < 1e-2, "bf16 networks: {rm}");
    assert!(ra > 0.0 && ra < 5e-2, "bf16 everywhere: {ra}");
}

#[test]
#[allow(clippy::needless_range_loop)] // [image][scale] indexing mirrors the decomposition
fn training_path_matches_the_reference_in_values_and_gradients() {
    let cfg = tiny_config();
    let m = f64_model(&cfg, 31);
    let x = random_images(3, &cfg, 32, DType::F64);
    let fast = m.glow.scale_log_p(&x).unwrap();
    let reference = m.glow.forward(&x).unwrap();
    let fast_v = fast.to_vec2::<f64>().unwrap();
    for k in 0..cfg.scales {
        let r = to_vec64(&reference.scale_log_p(k).unwrap());
        for i in 0..3 {
            assert!(
                (fast_v[i][k] - r[i]).abs() < 1e-9 * (1.0 + r[i].abs()),
                "scale {k} image {i}"
            );
        }
    }
    // Same gradients for every parameter: the two paths are one function.
    let g_fast = fast
        .sum(1)
        .unwrap()
        .mean(0)
        .unwrap()
        .neg()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = reference
        .log_p()
        .unwrap()
        .mean(0)
        .unwrap()
        .neg()
        .unwrap()
        .backward()
        .unwrap();
    let vars = m.varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, var) in vars.iter() {
        let (a, b) = (g_fast.get(var.as_tensor()), g_ref.get(var.as_tensor()));
        match (a, b) {
            (Some(a), Some(b)) => {
                let (a, b) = (to_vec64(a), to_vec64(b));
                let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-8 * scale.max(1.0),
                    "{name}: max grad diff {diff} (scale {scale})"
                );
                checked += 1;
            }
            (None, None) => {}
            _ => panic!("{name}: gradient present in only one path"),
        }
    }
    assert!(checked > 20, "only {checked} parameters had gradients");
}

/// A diagonal Gaussian exit prior (imported models) scores each exit's ActNorm output y under
/// N(m, e^{2s}): P_k = sum_d -((y_d - m_d) e^-s_d)^2 / 2 - ln sqrt(2 pi) - s_d, checked by hand
/// against the same weights under N(0, I); the fused scorer, the training path, the inverse and
/// the model file agree with it, and training leaves m and s alone.
#[test]
fn diagonal_gaussian_prior_matches_a_hand_computed_density() {
    use glowwatch::glow::Prior;
    let std_cfg = tiny_config();
    let cfg = GlowConfig {
        prior: Prior::DiagonalGaussian,
        ..std_cfg.clone()
    };
    let (plain, x) = perturbed_model(&std_cfg, 11, 6, 0.05);
    let (m, _) = perturbed_model(&cfg, 11, 6, 0.05);
    // Same weights, then a prior off N(0, I).
    let mut rng = StdRng::seed_from_u64(3);
    {
        let ours = m.varmap.data().lock().unwrap();
        for (name, var) in plain.varmap.data().lock().unwrap().iter() {
            ours[name].set(var.as_tensor()).unwrap();
        }
        for (name, var) in ours.iter() {
            if name.ends_with(".prior_mean") || name.ends_with(".prior_logstd") {
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|_| rng.random_range(-0.3f32..0.3))
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }
    let base = plain.glow.forward(&x).unwrap();
    let out = m.glow.forward(&x).unwrap();
    for (k, scale) in m.glow.scales().iter().enumerate() {
        let (mean, logstd) = scale.exit.prior.as_ref().unwrap();
        let (mean, logstd) = (to_vec64(mean), to_vec64(logstd));
        let y = to_vec64(&base.latents[k]); // under N(0, I) the latent is y itself
        let d = mean.len();
        let got = to_vec64(&out.prior[k]);
        for i in 0..6 {
            let hand: f64 = (0..d)
                .map(|j| {
                    let u = (y[i * d + j] - mean[j]) * (-logstd[j]).exp();
                    -u * u / 2.0 - 0.918_938_533_204_672_7 - logstd[j]
                })
                .sum();
            assert!(
                (got[i] - hand).abs() <= 1e-4 * hand.abs().max(1.0),
                "{k} {i}"
            );
        }
        // The exit ActNorm and the flow are untouched by the prior.
        assert_eq!(
            to_vec64(&out.flow_logdet[k]),
            to_vec64(&base.flow_logdet[k])
        );
    }
    let total = to_vec64(&(&out.total_logdet + &out.total_prior).unwrap());
    let fused = m
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&x)
        .unwrap();
    let train = m.glow.scale_log_p(&x).unwrap().to_vec2::<f64>().unwrap();
    for i in 0..6 {
        assert!((fused.log_p[i] - total[i]).abs() <= 2e-5 * total[i].abs());
        let t: f64 = train[i].iter().sum();
        assert!((t - total[i]).abs() <= 2e-5 * total[i].abs());
    }
    let back = m.glow.inverse(&out.latents).unwrap();
    let err = to_vec64(&(back - &x).unwrap())
        .iter()
        .fold(0f64, |a, v| a.max(v.abs()));
    assert!(err < 1e-4, "{err}");
    // Stored and read back; never among the trained variables.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let id = m.save(&path).unwrap();
    let loaded = GlowModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.model_id().unwrap(), id);
    assert_eq!(loaded.config().prior, Prior::DiagonalGaussian);
    assert!(
        m.trainable_vars()
            .iter()
            .all(|(n, _)| !n.contains("prior_"))
    );
    // A standard-normal model's stored config (and so its id) does not mention the prior.
    assert!(!serde_json::to_string(&std_cfg).unwrap().contains("prior"));
}

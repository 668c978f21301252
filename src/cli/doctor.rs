//! `glowwatch doctor`: checks that a device computes the same scores as the CPU reference
//! (per-scale log-likelihoods of a random model) in every precision, and that the model inverts
//! there. Exits non-zero when f32 parity fails. Meant for new GPU machines and CUDA builds.

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::device::{DeviceSpec, device_name};
use crate::glow::GlowModel;
use crate::glow::config::GlowConfig;
use crate::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};

/// Arguments of `glowwatch doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Device to check against the CPU.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// `small`, `paper`, ... or a config file.
    #[arg(long, default_value = "small")]
    config: String,
    /// Std of the noise added to every parameter before the check (0 keeps the fresh model,
    /// whose coupling networks do not yet influence the output).
    #[arg(long, default_value_t = 0.002)]
    perturb: f64,
    /// Images in the check batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// Largest |a - b| / (1 + |b|) over all images and scales.
fn max_rel(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// Runs the checks and prints one line per precision.
pub fn run(a: DoctorArgs) -> Result<()> {
    let device = a.device.open().map_err(anyhow::Error::msg)?;
    let cfg: GlowConfig = super::bench::named_config(&a.config)?;
    let mut rng = StdRng::seed_from_u64(1);
    // Smooth-ish images: a random walk along each row, so couplings see structure.
    let mut px = Vec::with_capacity(a.batch * cfg.dims());
    for _ in 0..a.batch * cfg.dims() / cfg.image_size {
        let mut v: i32 = rng.random_range(0..256);
        for _ in 0..cfg.image_size {
            v = (v + rng.random_range(-12..=12)).clamp(0, 255);
            px.push(v as u8);
        }
    }
    let x = pixels_to_tensor(&px, &cfg, BIN_CENTRE, &Device::Cpu)?;
    let cpu_model = GlowModel::new_random(&cfg, 5, &Device::Cpu)?;
    cpu_model.init_from_data(&x)?;
    // Every check goes through a model file, as a deployment would.
    let dir = std::env::temp_dir().join(format!("glowwatch-doctor-{}", std::process::id()));
    let fresh_path = dir.join("fresh.safetensors");
    cpu_model.save(&fresh_path)?;
    // Off the initial values, so the coupling networks (zero last conv at init) take part in
    // the scores; a randomly perturbed deep flow can be too ill-conditioned to invert, so the
    // inverse is checked on the freshly initialised model, as method.md's sanity check does.
    cpu_model.perturb(6, a.perturb)?;
    let reference = cpu_model.scorer(&Device::Cpu, DType::F32)?.score(&x)?;
    let path = dir.join("perturbed.safetensors");
    cpu_model.save(&path)?;
    let model = GlowModel::load(&path, &device)?;
    let fresh = GlowModel::load(&fresh_path, &device)?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "device {} vs cpu, config {} (batch {})",
        device_name(&device),
        a.config,
        a.batch
    );
    let ref_bpd = reference.bpd(cfg.dims());
    println!(
        "  cpu: reference mean bpd {:.3} (perturbed model)",
        ref_bpd.iter().sum::<f64>() / ref_bpd.len() as f64
    );
    let mut f32_rel = f64::INFINITY;
    for (name, dtype, state, tf32) in [
        ("f32", DType::F32, DType::F32, false),
        ("tf32", DType::F32, DType::F32, true),
        ("bf16", DType::BF16, DType::F32, false),
        ("bf16-all", DType::BF16, DType::BF16, false),
    ] {
        if device.is_cpu() && name != "f32" {
            continue;
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
        let s = model.scorer_with_state(&device, dtype, state)?.score(&x)?;
        let rel = max_rel(&s.per_scale, &reference.per_scale);
        let bpd_diff = s
            .bpd(cfg.dims())
            .iter()
            .zip(reference.bpd(cfg.dims()))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!("{name:>8}: max rel diff of lp_k {rel:.2e}, max |bpd diff| {bpd_diff:.2e}");
        if name == "f32" {
            f32_rel = rel;
        }
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let xd = x.to_device(&device)?;
    let out = fresh.glow.forward(&xd)?;
    let back = fresh.glow.inverse(&out.latents)?;
    let err = (back - &xd)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(" inverse(forward(x)) max abs error {err:.2e}");
    // Written so that NaN fails too.
    if !(f32_rel <= 1e-4 && err <= 1e-3) {
        bail!(
            "device results differ from the CPU beyond tolerance (f32 rel {f32_rel:.2e}, inverse {err:.2e})"
        );
    }
    println!("ok");
    Ok(())
}

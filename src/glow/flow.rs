//! The multi-scale Glow: squeeze -> K x (ActNorm -> 1x1 conv -> coupling) -> exit, per scale.
//! This is the trainable, differentiable reference path; [`super::GlowScorer`] is the fused
//! inference path built from it and tested against it.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

use super::actnorm::ActNorm;
use super::config::{GlowConfig, ScaleShape};
use super::coupling::Coupling;
use super::exit::{Exit, standard_normal_log_density};
use super::init::ParamWriter;
use super::invconv::InvConv;
use super::squeeze::{squeeze, unsqueeze};
use super::{GlowError, Result};

/// Channels-last building blocks of the training path, from standard candle ops only (so
/// autograd covers them); the fused scorer uses kernel versions of the same operations.
pub mod nhwc {
    use candle_core::{Result, Tensor};

    /// (N, H, W, C) -> (N, H/2, W/2, 4C), channel c*4 + 2i + j.
    pub fn squeeze(x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        x.reshape((n, h / 2, 2, w / 2, 2, c))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((n, h / 2, w / 2, c * 4))
    }

    /// (N, H, W, C) -> (N*H*W, 9*C) zero-padded 3x3 patches, columns (tap = 3*dy + dx, channel).
    pub fn im2col3x3(x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let p = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
        let taps: Vec<Tensor> = (0..9)
            .map(|t| p.narrow(1, t / 3, h)?.narrow(2, t % 3, w))
            .collect::<Result<_>>()?;
        Tensor::cat(&taps, 3)?.reshape((n * h * w, 9 * c))
    }

    /// taps (N, H, W, 9, C) -> out[y, x] = sum over taps of taps[y + dy - 1, x + dx - 1, tap].
    pub fn tap_sum3x3(taps: &Tensor) -> Result<Tensor> {
        let (_, h, w, _, _) = taps.dims5()?;
        let p = taps.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
        let mut acc: Option<Tensor> = None;
        for t in 0..9 {
            let part = p
                .narrow(1, t / 3, h)?
                .narrow(2, t % 3, w)?
                .narrow(3, t, 1)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        acc.expect("nine taps").squeeze(3)
    }
}

/// One flow step: ActNorm -> invertible 1x1 conv -> affine coupling.
#[derive(Debug, Clone)]
pub struct Step {
    /// Per-channel ActNorm.
    pub actnorm: ActNorm,
    /// LU 1x1 convolution.
    pub invconv: InvConv,
    /// Affine coupling.
    pub coupling: Coupling,
}

/// One scale: K steps and the exit of the channels that leave here.
#[derive(Debug, Clone)]
pub struct Scale {
    /// The K steps, in forward order.
    pub steps: Vec<Step>,
    /// The exit ActNorm of this scale's latents.
    pub exit: Exit,
    /// Shapes at this scale.
    pub shape: ScaleShape,
}

/// The terms of the per-scale decomposition for a batch, all per sample in f64.
#[derive(Debug, Clone)]
pub struct FlowOutput {
    /// F_k: sum of the step log-determinants of scale k, (N) each.
    pub flow_logdet: Vec<Tensor>,
    /// A_k: exit ActNorm log-determinant of scale k, (N) each.
    pub exit_logdet: Vec<Tensor>,
    /// P_k: prior log-density of the exit-k ActNorm outputs, (N) each.
    pub prior: Vec<Tensor>,
    /// The latents of each exit that are N(0, I) under the model (the exit ActNorm outputs,
    /// standardised by the prior's mean and std when it has them), (N, C_k, H_k, W_k).
    pub latents: Vec<Tensor>,
    /// Sum of every log-determinant, accumulated layer by layer in a single running sum (N).
    pub total_logdet: Tensor,
    /// Prior log-density of all latents, computed over their concatenation (N).
    pub total_prior: Tensor,
}

impl FlowOutput {
    /// lp_k = F_k + A_k + P_k for scale k, (N) f64.
    pub fn scale_log_p(&self, k: usize) -> Result<Tensor> {
        Ok(((&self.flow_logdet[k] + &self.exit_logdet[k])? + &self.prior[k])?)
    }

    /// log p(x) = sum_k lp_k, (N) f64.
    pub fn log_p(&self) -> Result<Tensor> {
        let mut acc = self.scale_log_p(0)?;
        for k in 1..self.prior.len() {
            acc = (acc + self.scale_log_p(k)?)?;
        }
        Ok(acc)
    }
}

/// Multi-scale Glow with its parameters (see the module docs of [`crate::glow`]).
#[derive(Debug, Clone)]
pub struct Glow {
    config: GlowConfig,
    scales: Vec<Scale>,
}

impl Glow {
    /// Builds the model from `vb`: scopes `scale{k}.step{j}.{actnorm,invconv,coupling}` and
    /// `scale{k}.exit`. With a fresh `VarMap` every parameter starts at its zero/identity value.
    pub fn new(config: &GlowConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let mut scales = Vec::with_capacity(config.scales);
        for (k, shape) in config.shape().scales.into_iter().enumerate() {
            let vs = vb.pp(format!("scale{k}"));
            let steps = (0..config.steps)
                .map(|j| {
                    let v = vs.pp(format!("step{j}"));
                    Ok(Step {
                        actnorm: ActNorm::new(v.pp("actnorm"), shape.channels)?,
                        invconv: InvConv::new(v.pp("invconv"), shape.channels)?,
                        coupling: Coupling::new(v.pp("coupling"), shape.channels, config.hidden)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let exit = Exit::new(vs.pp("exit"), shape.exit_channels, shape.size, config.prior)?;
            scales.push(Scale { steps, exit, shape });
        }
        Ok(Self {
            config: config.clone(),
            scales,
        })
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &GlowConfig {
        &self.config
    }

    /// The scales, finest first.
    pub fn scales(&self) -> &[Scale] {
        &self.scales
    }

    /// Random initial values from `seed`: orthogonal 1x1 convs, N(0, 0.05^2) coupling convs.
    pub fn randomize(&self, seed: u64, writer: &ParamWriter) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(seed);
        for step in self.scales.iter().flat_map(|s| &s.steps) {
            step.invconv.randomize(&mut rng, writer)?;
            step.coupling.randomize(&mut rng, writer)?;
        }
        Ok(())
    }

    /// Data-dependent initialisation of every ActNorm (flow, coupling-hidden and exit) on the
    /// batch `x`, each on the outputs of the already-initialised layers before it.
    pub fn init_from_data(&self, x: &Tensor, writer: &ParamWriter) -> Result<()> {
        self.run(x, Some(writer)).map(|_| ())
    }

    /// x: (N, C, S, S) in the model's pixel space -> the per-scale decomposition.
    pub fn forward(&self, x: &Tensor) -> Result<FlowOutput> {
        self.run(x, None)
    }

    /// Checks that x is (N, C, S, S) for this model.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let c = &self.config;
        match x.dims() {
            [_, ch, h, w] if *ch == c.in_channels && *h == c.image_size && *w == c.image_size => {
                Ok(())
            }
            d => Err(GlowError::Input(format!(
                "expected images of shape (N, {}, {}, {}), got {:?}",
                c.in_channels, c.image_size, c.image_size, d
            ))),
        }
    }

    pub(super) fn run(&self, x: &Tensor, init: Option<&ParamWriter>) -> Result<FlowOutput> {
        self.check_input(x)?;
        let n = x.dim(0)?;
        let dev = x.device();
        let zeros = Tensor::zeros(n, DType::F64, dev)?;
        let mut out = FlowOutput {
            flow_logdet: vec![],
            exit_logdet: vec![],
            prior: vec![],
            latents: vec![],
            total_logdet: zeros.clone(),
            total_prior: zeros.clone(),
        };
        // The initialisation pass needs no gradients, but the ActNorm parameters are
        // variables, so every intermediate would stay referenced by the graph until the pass
        // ends: 21 GiB for 512 images at K = 16, width 256. Cutting the graph after each step
        // keeps only the live activations. The ordinary pass keeps its graph for training.
        let cut = |t: Tensor| if init.is_some() { t.detach() } else { t };
        let mut total_log_std = 0.0;
        let mut h = x.clone();
        for scale in &self.scales {
            h = squeeze(&h)?;
            let hw = scale.shape.size * scale.shape.size;
            let mut f = zeros.clone();
            for step in &scale.steps {
                h = step.actnorm.forward(&h, init)?;
                let a = step.actnorm.logdet(hw)?;
                h = step.invconv.forward(&h)?;
                let w = step.invconv.logdet(hw)?;
                let (y, c) = step.coupling.forward(&h, init)?;
                h = y;
                f = f.broadcast_add(&(a.clone() + w.clone())?)?.add(&c)?;
                out.total_logdet = out.total_logdet.broadcast_add(&a)?;
                out.total_logdet = out.total_logdet.broadcast_add(&w)?;
                out.total_logdet = (&out.total_logdet + &c)?;
                h = cut(h);
                f = cut(f);
                out.total_logdet = cut(out.total_logdet);
            }
            let z = h.narrow(1, 0, scale.shape.exit_channels)?;
            if scale.shape.exit_channels < scale.shape.channels {
                h = h.narrow(1, scale.shape.exit_channels, scale.shape.channels / 2)?;
            }
            let y = cut(scale.exit.forward(&z, init)?);
            let a = scale.exit.logdet()?;
            out.total_logdet = cut(out.total_logdet.broadcast_add(&a)?);
            out.exit_logdet.push(zeros.broadcast_add(&a)?);
            out.prior.push(scale.exit.log_prior(&y, false)?);
            out.flow_logdet.push(f);
            let (u, log_std_sum) = scale.exit.standardize(&y, false)?;
            total_log_std += log_std_sum;
            out.latents.push(u);
        }
        let all: Vec<Tensor> = out
            .latents
            .iter()
            .map(|y| y.flatten_from(1))
            .collect::<candle_core::Result<_>>()?;
        out.total_prior = (standard_normal_log_density(&Tensor::cat(&all, 1)?)? - total_log_std)?;
        Ok(out)
    }

    /// lp_k per image and scale as an (N, L) f64 tensor, differentiable with respect to every
    /// parameter: the training path. Same numbers as [`Glow::forward`], computed channels-last
    /// so every convolution is a plain matrix multiplication (3x3 convs through im2col and
    /// through a matmul to their taps plus a shifted sum), whose backward passes are matmuls
    /// too; candle's conv2d backward on the CPU is several times slower.
    pub fn scale_log_p(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let n = x.dim(0)?;
        let mut h = x.permute((0, 2, 3, 1))?.contiguous()?;
        let mut lps = Vec::with_capacity(self.scales.len());
        for scale in &self.scales {
            h = nhwc::squeeze(&h)?;
            let (hh, ww, c) = (scale.shape.size, scale.shape.size, scale.shape.channels);
            let hw = hh * ww;
            let rows = n * hw;
            let mut lp = Tensor::zeros(n, DType::F64, x.device())?;
            for step in &scale.steps {
                // ActNorm then the 1x1 conv, over the last (channel) dimension.
                let an = &step.actnorm;
                let t = h.broadcast_add(&an.loc)?.broadcast_mul(&an.logs.exp()?)?;
                let w = step.invconv.weight()?;
                h = t
                    .reshape((rows, c))?
                    .matmul(&w.t()?)?
                    .reshape((n, hh, ww, c))?;
                let constant = (an.logdet(hw)? + step.invconv.logdet(hw)?)?;
                lp = lp.broadcast_add(&constant)?;
                // Affine coupling.
                let cp = &step.coupling;
                let half = c / 2;
                let xa = h.narrow(3, 0, half)?;
                let xb = h.narrow(3, half, c - half)?;
                let hidden = cp.conv2.dim(0)?;
                let w1 = cp
                    .conv1
                    .permute((2, 3, 1, 0))?
                    .reshape((9 * half, hidden))?;
                let t = nhwc::im2col3x3(&xa)?.matmul(&w1)?;
                let t = t
                    .broadcast_add(&cp.norm1.loc)?
                    .broadcast_mul(&cp.norm1.logs.exp()?)?
                    .relu()?;
                let t = t.matmul(&cp.conv2.t()?)?;
                let t = t
                    .broadcast_add(&cp.norm2.loc)?
                    .broadcast_mul(&cp.norm2.logs.exp()?)?
                    .relu()?;
                let w3 = cp.conv3.permute((1, 2, 3, 0))?.reshape((hidden, 9 * c))?;
                let taps = t.matmul(&w3)?.reshape((n, hh, ww, 9, c))?;
                let net = nhwc::tap_sum3x3(&taps)?
                    .broadcast_add(&cp.conv3_bias)?
                    .broadcast_mul(&(&cp.conv3_logs * 3.0)?.exp()?)?;
                // Interleaved channels: shift = even, raw = odd.
                let pairs = net.reshape((n, hh, ww, half, 2))?;
                let shift = pairs.narrow(4, 0, 1)?.squeeze(4)?;
                let raw = pairs.narrow(4, 1, 1)?.squeeze(4)?;
                let log_s = super::log_sigmoid(&(raw + 2.0)?)?;
                let yb = (xb + shift)?.mul(&log_s.exp()?)?;
                lp = (lp + super::per_sample_sum(&log_s)?)?;
                h = Tensor::cat(&[&xa, &yb], 3)?;
            }
            let sh = scale.shape;
            let z = h.narrow(3, 0, sh.exit_channels)?;
            if sh.exit_channels < sh.channels {
                h = h.narrow(3, sh.exit_channels, sh.channels - sh.exit_channels)?;
            }
            let loc = scale.exit.loc.permute((1, 2, 0))?;
            let exit_scale =
                (scale.exit.logs.permute((1, 2, 0))?.exp()? + super::exit::EXIT_SCALE_EPS)?;
            let y = z.broadcast_add(&loc)?.broadcast_mul(&exit_scale)?;
            lp = lp
                .broadcast_add(&scale.exit.logdet()?)?
                .add(&scale.exit.log_prior(&y, true)?)?;
            lps.push(lp);
        }
        Ok(Tensor::stack(&lps, 1)?)
    }

    /// Latents (one standard-normal tensor per exit, shapes as [`FlowOutput::latents`]) -> images.
    pub fn inverse(&self, latents: &[Tensor]) -> Result<Tensor> {
        if latents.len() != self.scales.len() {
            return Err(GlowError::Input(format!(
                "expected {} latent tensors, got {}",
                self.scales.len(),
                latents.len()
            )));
        }
        let mut h: Option<Tensor> = None;
        for (scale, y) in self.scales.iter().zip(latents).rev() {
            let z = scale.exit.inverse(&scale.exit.unstandardize(y)?)?;
            let mut x = match h {
                Some(rest) => Tensor::cat(&[&z, &rest], 1)?,
                None => z,
            };
            for step in scale.steps.iter().rev() {
                x = step.coupling.inverse(&x)?;
                x = step.invconv.inverse(&x)?;
                x = step.actnorm.inverse(&x)?;
            }
            h = Some(unsqueeze(&x)?);
        }
        Ok(h.expect("at least two scales"))
    }

    /// Draws `n` images: latents from N(0, temperature^2 I), mapped back through the flow.
    pub fn sample(&self, n: usize, temperature: f64, seed: u64) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let dev = self.scales[0].exit.loc.device();
        let latents = self
            .scales
            .iter()
            .map(|s| {
                let sh = s.shape;
                let len = n * sh.exit_dims();
                let v: Vec<f32> = (0..len)
                    .map(|_| (temperature * rng.sample::<f64, _>(StandardNormal)) as f32)
                    .collect();
                Ok(
                    Tensor::from_vec(v, (n, sh.exit_channels, sh.size, sh.size), dev)?
                        .to_dtype(s.exit.loc.dtype())?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.inverse(&latents)
    }
}

//! Inference fast path. At load time every data-independent quantity is computed once (in f64,
//! on the CPU): each step's ActNorm is folded into its 1x1 conv (`M = W diag(exp(s))`,
//! `c = M loc`), the coupling networks' ActNorms and output scale are folded into their convs,
//! and the log-determinants of ActNorms, 1x1 convs and exit ActNorms become one constant per
//! scale. Per image only the coupling log-determinants and the prior remain. 1x1 convolutions
//! run as matrix multiplications. Tests hold it to the reference path of [`super::Glow`].

use candle_core::{D, DType, Device, Tensor};
use nalgebra::DMatrix;

use super::config::{GlowConfig, ScaleShape};
use super::coupling::{affine_forward, halves};
use super::exit::{EXIT_SCALE_EPS, standard_normal_log_density};
use super::flow::Glow;
use super::invconv::{mix_channels, to_tensor, to_vec};
use super::squeeze::squeeze;
use super::{Result, bits_per_dim};

/// A conv (or matrix) with its folded bias.
#[derive(Debug, Clone)]
struct Affine {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct FusedStep {
    /// ActNorm folded into the 1x1 conv: y = M x + c.
    mix: Affine,
    /// conv3x3 with its ActNorm folded in.
    conv1: Affine,
    /// conv1x1 (matrix) with its ActNorm folded in.
    conv2: Affine,
    /// conv3x3 with exp(3*logs) folded in.
    conv3: Affine,
}

#[derive(Debug, Clone)]
struct FusedScale {
    steps: Vec<FusedStep>,
    exit_loc: Tensor,
    exit_scale: Tensor,
    /// Data-independent part of lp_k: ActNorm + 1x1 conv log-determinants of all K steps plus
    /// the exit ActNorm's log-determinant (A_k).
    constant: f64,
    shape: ScaleShape,
}

/// Per-image scores of a batch: the per-scale log-likelihoods lp_k and their total.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleScores {
    /// lp_k per image and scale, `[image][scale]`.
    pub per_scale: Vec<Vec<f64>>,
    /// log p(x) = sum_k lp_k per image.
    pub log_p: Vec<f64>,
}

impl ScaleScores {
    /// Bits/dim of the whole image: `8 - log p / (D ln 2)`.
    pub fn bpd(&self, dims: usize) -> Vec<f64> {
        self.log_p.iter().map(|&l| bits_per_dim(l, dims)).collect()
    }

    /// Bits per exiting dimension of scale k: `8 - lp_k / (D_k ln 2)`; the D_k-weighted mean
    /// over scales equals the total bits/dim.
    pub fn scale_bpd(&self, k: usize, exit_dims: usize) -> Vec<f64> {
        self.per_scale
            .iter()
            .map(|r| bits_per_dim(r[k], exit_dims))
            .collect()
    }
}

/// The fused, inference-only form of a [`Glow`], on one device and dtype.
#[derive(Debug, Clone)]
pub struct GlowScorer {
    config: GlowConfig,
    scales: Vec<FusedScale>,
    device: Device,
    dtype: DType,
    /// dtype of the elementwise likelihood work: f32, or f64 for f64 models.
    elem: DType,
}

fn scale_rows(w: &Tensor, row_scale: &[f64]) -> Result<Tensor> {
    let o = w.dim(0)?;
    let s = Tensor::from_vec(row_scale.to_vec(), o, &Device::Cpu)?;
    let shape: Vec<usize> = std::iter::once(o)
        .chain(std::iter::repeat_n(1, w.rank() - 1))
        .collect();
    Ok(w.detach()
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .broadcast_mul(&s.reshape(shape)?)?)
}

impl GlowScorer {
    /// Precomputes the fused weights and constants of `glow` for `device` in `dtype`.
    pub fn new(glow: &Glow, device: &Device, dtype: DType) -> Result<Self> {
        let put = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let elem = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let put_elem = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(elem)?.to_device(device)?) };
        let mut scales = Vec::new();
        for scale in glow.scales() {
            let hw = (scale.shape.size * scale.shape.size) as f64;
            let mut constant = 0.0;
            let mut steps = Vec::new();
            for step in &scale.steps {
                let s = to_vec(&step.actnorm.logs)?;
                let loc = to_vec(&step.actnorm.loc)?;
                let logw = to_vec(&step.invconv.logw)?;
                constant += hw * (s.iter().sum::<f64>() + logw.iter().sum::<f64>());
                let (w, _) = step.invconv.weight_and_inverse_f64()?;
                let m = &w * DMatrix::from_diagonal(&s.iter().map(|v| v.exp()).collect::<Vec<_>>().into());
                let c = &m * nalgebra::DVector::from_vec(loc);
                let mix = Affine {
                    weight: put(&to_tensor(&m, &Device::Cpu)?)?,
                    bias: put(&Tensor::from_vec(c.as_slice().to_vec(), c.len(), &Device::Cpu)?)?,
                };
                let cp = &step.coupling;
                let folded = |conv: &Tensor, norm: &super::actnorm::ActNorm| -> Result<Affine> {
                    let e: Vec<f64> = to_vec(&norm.logs)?.iter().map(|v| v.exp()).collect();
                    let b: Vec<f64> = to_vec(&norm.loc)?.iter().zip(&e).map(|(l, e)| l * e).collect();
                    Ok(Affine {
                        weight: put(&scale_rows(conv, &e)?)?,
                        bias: put(&Tensor::from_vec(b, e.len(), &Device::Cpu)?)?,
                    })
                };
                let e3: Vec<f64> = to_vec(&cp.conv3_logs)?.iter().map(|v| (3.0 * v).exp()).collect();
                let b3: Vec<f64> = to_vec(&cp.conv3_bias)?.iter().zip(&e3).map(|(b, e)| b * e).collect();
                steps.push(FusedStep {
                    mix,
                    conv1: folded(&cp.conv1, &cp.norm1)?,
                    conv2: folded(&cp.conv2, &cp.norm2)?,
                    conv3: Affine {
                        weight: put(&scale_rows(&cp.conv3, &e3)?)?,
                        bias: put(&Tensor::from_vec(b3, e3.len(), &Device::Cpu)?)?,
                    },
                });
            }
            let exit_logs = scale.exit.logs.detach().to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
            let exit_scale = (exit_logs.exp()? + EXIT_SCALE_EPS)?;
            constant += exit_scale.log()?.sum_all()?.to_scalar::<f64>()?;
            scales.push(FusedScale {
                steps,
                exit_loc: put_elem(&scale.exit.loc.detach())?,
                exit_scale: put_elem(&exit_scale)?,
                constant,
                shape: scale.shape,
            });
        }
        Ok(Self {
            config: glow.config().clone(),
            scales,
            device: device.clone(),
            dtype,
            elem,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &GlowConfig {
        &self.config
    }

    /// Device the fused weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Compute dtype of the fused weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// x: (N, C, S, S) in pixel space (any dtype/device) -> lp_k per image and scale as an
    /// (N, L) f64 tensor on the scorer's device.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let mut h = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut lps = Vec::with_capacity(self.scales.len());
        for scale in &self.scales {
            h = squeeze(&h)?;
            let mut coupling = Tensor::zeros(n, DType::F64, &self.device)?;
            for step in &scale.steps {
                h = mix_channels(&h, &step.mix.weight, Some(&step.mix.bias))?;
                let (xa, xb) = halves(&h)?;
                let t = conv3x3(&xa, &step.conv1)?.relu()?;
                let t = mix_channels(&t, &step.conv2.weight, Some(&step.conv2.bias))?.relu()?;
                let t = conv3x3(&t, &step.conv3)?;
                // Half-precision runs keep the coupling's exp/log-sigmoid work in f32.
                let (yb, ld) = affine_forward(&xb.to_dtype(self.elem)?, &t.to_dtype(self.elem)?)?;
                let yb = yb.to_dtype(self.dtype)?;
                coupling = (coupling + ld)?;
                h = Tensor::cat(&[&xa, &yb], 1)?;
            }
            let sh = scale.shape;
            let z = h.narrow(1, 0, sh.exit_channels)?;
            if sh.exit_channels < sh.channels {
                h = h.narrow(1, sh.exit_channels, sh.channels - sh.exit_channels)?;
            }
            let y = z
                .to_dtype(self.elem)?
                .broadcast_add(&scale.exit_loc)?
                .broadcast_mul(&scale.exit_scale)?;
            let lp = ((coupling + standard_normal_log_density(&y)?)? + scale.constant)?;
            lps.push(lp);
        }
        Ok(Tensor::stack(&lps, D::Minus1)?)
    }

    /// Scores a batch and copies the result to the host.
    pub fn score(&self, x: &Tensor) -> Result<ScaleScores> {
        let per_scale = self.forward(x)?.to_device(&Device::Cpu)?.to_vec2::<f64>()?;
        let log_p = per_scale.iter().map(|r| r.iter().sum()).collect();
        Ok(ScaleScores { per_scale, log_p })
    }
}

fn conv3x3(x: &Tensor, a: &Affine) -> Result<Tensor> {
    Ok(x.conv2d(&a.weight, 1, 1, 1, 1)?
        .broadcast_add(&a.bias.reshape((1, (), 1, 1))?)?)
}

//! Inference fast path, channels-last. At load time every data-independent quantity is computed
//! once (in f64, on the CPU):
//! - each step's ActNorm is folded into its 1x1 conv (`M = W diag(exp(s))`, `c = M loc`);
//! - the coupling networks' ActNorms and output scale `exp(3 logs)` are folded into their convs,
//!   and the last conv's output channels are reordered to [shift..., raw...] so both halves are
//!   contiguous column blocks;
//! - the log-determinants of ActNorms, 1x1 convs and exit ActNorms become one constant per scale.
//!
//! Biases of the coupling convolutions ride inside their matrix multiplications (a ones column
//! in the im2col patches and a constant-1 hidden unit), so no separate broadcast pass touches the
//! wide hidden activations; only ReLU does.
//!
//! Per image only the coupling log-determinants and the prior remain. Activations stay in
//! (N, H, W, C) layout so every convolution is one large matrix multiplication over N*H*W rows:
//! 1x1 convs directly, the first 3x3 conv (few input channels) through im2col, and the last 3x3
//! conv (many inputs, few outputs) as a matmul to its 9 taps followed by a shifted sum, which
//! never materialises a 9x copy of the wide hidden activations. Patches, tap sums and the narrow
//! 1x1 mixes are single fused kernels ([`super::kernels`]). Tests hold this path to the
//! reference path of [`super::Glow`]. On the CPU in f32 [`GlowScorer::forward`] runs the
//! training path's fused forward instead ([`super::fused_train::FusedForward`], faster there;
//! tested equal to this path).

use candle_core::{D, DType, Device, Tensor};
use nalgebra::DMatrix;
use serde::Serialize;

use super::config::{GlowConfig, ScaleShape};
use super::exit::standard_normal_log_density;
use super::flow::Glow;
use super::fused_train::FusedForward;
use super::invconv::{to_matrix, to_vec};
use super::kernels::{coupling_affine, im2col3x3_ones, matmul_relu, small_linear, tap_sum3x3};
use super::{Result, bits_per_dim, per_sample_sum};

/// Numeric precision of scoring: which dtypes the coupling networks and the flow state use
/// (the likelihood sums are always f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain f32 everywhere.
    F32,
    /// f32 storage, TF32 tensor-core matmuls (CUDA only).
    Tf32,
    /// bf16 coupling networks; flow state and likelihood terms in f32, sums in f64.
    Bf16,
    /// bf16 coupling networks and flow state (faster, less exact); likelihood terms in f32.
    #[serde(rename = "bf16-all")]
    Bf16All,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Ok(Self::Bf16),
            "bf16-all" => Ok(Self::Bf16All),
            _ => Err(format!(
                "unknown precision `{s}`: use f32, tf32, bf16 or bf16-all"
            )),
        }
    }
}

impl Precision {
    /// (coupling-network dtype, flow-state dtype).
    pub fn dtypes(self) -> (DType, DType) {
        match self {
            Self::Bf16 => (DType::BF16, DType::F32),
            Self::Bf16All => (DType::BF16, DType::BF16),
            _ => (DType::F32, DType::F32),
        }
    }

    /// Lower-case name as accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
            Self::Bf16All => "bf16-all",
        }
    }

    /// Switches cuBLAS's reduced-precision f32 GEMMs on for TF32 (a no-op on the CPU).
    pub fn apply(self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self == Self::Tf32);
    }
}

#[derive(Debug, Clone)]
struct FusedStep {
    /// (C, C) = (W diag(exp s))^T: y = x @ mix + mix_bias.
    mix: Tensor,
    mix_bias: Tensor,
    /// (9 * C/2 + 1, hidden') im2col weight, rows ordered (tap, in-channel) then the bias row
    /// that meets the im2col ones column; ActNorm folded in. Output column `hidden` is the
    /// constant 1 that carries the next biases; hidden' rounds hidden + 1 up to a multiple of 8.
    conv1: Tensor,
    /// (hidden', hidden') transposed, ActNorm folded in, bias in the constant row.
    conv2: Tensor,
    /// (hidden', 9 * C) weights to the 9 taps, columns ordered (tap, out) with the outputs
    /// reordered to [shift..., raw...]; exp(3 logs) folded in; the bias sits in the constant
    /// row of the centre tap, which every output position receives exactly once.
    conv3: Tensor,
}

#[derive(Debug, Clone)]
struct FusedScale {
    steps: Vec<FusedStep>,
    /// Exit ActNorm location and scale, (H, W, C_exit).
    exit_loc: Tensor,
    exit_scale: Tensor,
    /// Data-independent part of lp_k: ActNorm and 1x1-conv log-determinants of all K steps
    /// plus the exit ActNorm's log-determinant A_k.
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

/// Wall time per stage of the fused forward pass, for `glowwatch bench --profile`. Every mark
/// synchronises the device, so profiled runs are slower than plain ones; use it for shares.
pub struct StageTimer {
    device: Device,
    last: std::time::Instant,
    /// Seconds spent per stage label, summed over all marks.
    pub totals: std::collections::BTreeMap<&'static str, f64>,
}

impl StageTimer {
    /// Starts timing work on `device` (after waiting for what is already queued).
    pub fn new(device: &Device) -> Result<Self> {
        device.synchronize()?;
        Ok(Self {
            device: device.clone(),
            last: std::time::Instant::now(),
            totals: Default::default(),
        })
    }

    fn mark(&mut self, label: &'static str) -> Result<()> {
        self.device.synchronize()?;
        let now = std::time::Instant::now();
        *self.totals.entry(label).or_default() += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }
}

fn mark(timer: &mut Option<&mut StageTimer>, label: &'static str) -> Result<()> {
    match timer {
        Some(t) => t.mark(label),
        None => Ok(()),
    }
}

/// The fused, inference-only form of a [`Glow`], on one device and dtype.
#[derive(Debug, Clone)]
pub struct GlowScorer {
    config: GlowConfig,
    scales: Vec<FusedScale>,
    device: Device,
    dtype: DType,
    /// dtype of the flow state (f32 by default). Only the coupling networks need run in
    /// `dtype`: rounding the state itself to bf16 at each of the K*L steps compounds, while
    /// the networks' errors only perturb shift and scale.
    state: DType,
    /// dtype of the likelihood terms: f32, or f64 for f64 scorers.
    elem: DType,
    /// For f32 on the CPU: the training path's fused forward kernels
    /// ([`super::fused_train::FusedForward`]), which [`GlowScorer::forward`] runs instead of
    /// the candle kernels below (one chunk of the batch per thread, AVX-512/AVX2 passes).
    fused: Option<std::sync::Arc<FusedForward>>,
}

/// Row-major f64 matrix -> tensor.
fn mat_tensor(m: &DMatrix<f64>) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        m.transpose().as_slice().to_vec(),
        (m.nrows(), m.ncols()),
        &Device::Cpu,
    )?)
}

/// An ActNorm after a linear map, as per-output (scale, bias) to fold into that map:
/// `exp(s) * (y + loc) = exp(s) * y + exp(s) * loc`.
fn folded_actnorm(norm: &super::actnorm::ActNorm) -> Result<(Vec<f64>, Vec<f64>)> {
    let scale: Vec<f64> = to_vec(&norm.logs)?.iter().map(|v| v.exp()).collect();
    let bias = to_vec(&norm.loc)?
        .iter()
        .zip(&scale)
        .map(|(l, e)| l * e)
        .collect();
    Ok((scale, bias))
}

/// A (Cout, Cin, 3, 3) conv weight as f64 values indexed [o][ci][dy][dx].
fn conv_values(w: &Tensor) -> Result<(Vec<f64>, usize, usize)> {
    let (o, i, _, _) = w.dims4()?;
    Ok((
        w.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
        o,
        i,
    ))
}

impl GlowScorer {
    /// Precomputes the fused weights and constants of `glow` for `device`: the coupling
    /// networks compute in `dtype`, the flow state and likelihood terms in f32 (f64 when
    /// `dtype` is f64).
    pub fn new(glow: &Glow, device: &Device, dtype: DType) -> Result<Self> {
        let state = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        Self::with_state_dtype(glow, device, dtype, state)
    }

    /// As [`GlowScorer::new`], with the flow state (1x1 mixes, tap sums, coupling outputs) held
    /// in `state`. bf16 state is faster on GPUs but rounds the state at every step, which
    /// compounds over the K*L steps (see the README for measured deviations); the likelihood
    /// terms stay in f32 either way.
    pub fn with_state_dtype(
        glow: &Glow,
        device: &Device,
        dtype: DType,
        state: DType,
    ) -> Result<Self> {
        let elem = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let put = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let put_elem = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(elem)?.to_device(device)?) };
        let put_state = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(state)?.to_device(device)?) };
        let vec_t = |v: Vec<f64>| -> Result<Tensor> {
            let n = v.len();
            put_state(Tensor::from_vec(v, n, &Device::Cpu)?)
        };
        let mut scales = Vec::new();
        for scale in glow.scales() {
            let hw = (scale.shape.size * scale.shape.size) as f64;
            let c = scale.shape.channels;
            let half = c / 2;
            let mut constant = 0.0;
            let mut steps = Vec::new();
            for step in &scale.steps {
                let s = to_vec(&step.actnorm.logs)?;
                let loc = to_vec(&step.actnorm.loc)?;
                let logw = to_vec(&step.invconv.logw)?;
                constant += hw * (s.iter().sum::<f64>() + logw.iter().sum::<f64>());
                let (w, _) = step.invconv.weight_and_inverse_f64()?;
                let es: Vec<f64> = s.iter().map(|v| v.exp()).collect();
                let m = &w * DMatrix::from_diagonal(&es.into());
                let mix_bias = &m * nalgebra::DVector::from_vec(loc);

                let cp = &step.coupling;
                let (e1, b1) = folded_actnorm(&cp.norm1)?;
                let (w1, hidden, cin) = conv_values(&cp.conv1)?;
                let one = hidden; // index of the constant-1 hidden unit
                let wide = (hidden + 1).next_multiple_of(8);
                let conv1 = DMatrix::from_fn(9 * cin + 1, wide, |r, o| match (r == 9 * cin, o) {
                    (true, o) if o < hidden => b1[o],
                    (true, o) if o == one => 1.0,
                    (false, o) if o < hidden => {
                        let (t, ci) = (r / cin, r % cin);
                        e1[o] * w1[((o * cin + ci) * 3 + t / 3) * 3 + t % 3]
                    }
                    _ => 0.0,
                });

                let (e2, b2) = folded_actnorm(&cp.norm2)?;
                let w2 = to_matrix(&cp.conv2)?; // (out, in)
                let conv2 = DMatrix::from_fn(wide, wide, |i, o| match (i, o) {
                    (i, o) if i < hidden && o < hidden => e2[o] * w2[(o, i)],
                    (i, o) if i == one && o < hidden => b2[o],
                    (i, o) if i == one && o == one => 1.0,
                    _ => 0.0,
                });

                // New output column j holds old channel 2j (shift) or 2(j - C/2) + 1 (raw).
                let old = |j: usize| if j < half { 2 * j } else { 2 * (j - half) + 1 };
                let e3: Vec<f64> = to_vec(&cp.conv3_logs)?
                    .iter()
                    .map(|v| (3.0 * v).exp())
                    .collect();
                let b3 = to_vec(&cp.conv3_bias)?;
                let (w3, _, _) = conv_values(&cp.conv3)?;
                const CENTRE: usize = 4;
                let conv3 = DMatrix::from_fn(wide, 9 * c, |i, col| {
                    let (t, j) = (col / c, col % c);
                    let o = old(j);
                    match i {
                        i if i < hidden => e3[o] * w3[((o * hidden + i) * 3 + t / 3) * 3 + t % 3],
                        i if i == one && t == CENTRE => e3[o] * b3[o],
                        _ => 0.0,
                    }
                });

                steps.push(FusedStep {
                    mix: put_state(mat_tensor(&m.transpose())?)?,
                    mix_bias: vec_t(mix_bias.as_slice().to_vec())?,
                    conv1: put(mat_tensor(&conv1)?)?,
                    conv2: put(mat_tensor(&conv2)?)?,
                    conv3: put(mat_tensor(&conv3)?)?,
                });
            }
            let (exit_loc, exit_scale, exit_constant) = scale.exit.folded_hwc()?;
            constant += exit_constant;
            scales.push(FusedScale {
                steps,
                exit_loc: put_elem(exit_loc)?,
                exit_scale: put_elem(exit_scale)?,
                constant,
                shape: scale.shape,
            });
        }
        let fused = (device.is_cpu() && dtype == DType::F32 && state == DType::F32)
            .then(|| FusedForward::new(glow).map(std::sync::Arc::new))
            .transpose()?;
        Ok(Self {
            config: glow.config().clone(),
            scales,
            device: device.clone(),
            dtype,
            state,
            elem,
            fused,
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

    /// Compute dtype of the coupling networks' matrix multiplications (the flow's own state,
    /// its 1x1 mixes, the affine coupling and every likelihood term stay in f32, or f64).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// x: (N, C, S, S) in pixel space (any dtype/device) -> lp_k per image and scale as an
    /// (N, L) f64 tensor on the scorer's device.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_timed(x, None)
    }

    /// The same scorer without the CPU fused forward: always the candle-kernel path below
    /// (for comparisons: `glowwatch bench --mode score-kernels`).
    pub fn kernel_path(mut self) -> Self {
        self.fused = None;
        self
    }

    /// [`GlowScorer::forward`] with optional per-stage timing. Timing covers the candle-kernel
    /// path's stages, so with a timer that path runs even where the fused forward exists.
    pub fn forward_timed(&self, x: &Tensor, mut timer: Option<&mut StageTimer>) -> Result<Tensor> {
        if let (Some(f), None) = (&self.fused, &timer) {
            return f.log_p(x);
        }
        let n = x.dim(0)?;
        let mut h = x
            .to_device(&self.device)?
            .to_dtype(self.state)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let mut lps = Vec::with_capacity(self.scales.len());
        for scale in &self.scales {
            h = super::flow::nhwc::squeeze(&h)?;
            mark(&mut timer, "squeeze")?;
            let mut coupling = Tensor::zeros(n, DType::F64, &self.device)?;
            for step in &scale.steps {
                let (y, ld) = self.step(&h, step, &mut timer)?;
                h = y;
                coupling = (coupling + ld)?;
            }
            let sh = scale.shape;
            let z = h.narrow(3, 0, sh.exit_channels)?;
            if sh.exit_channels < sh.channels {
                h = h.narrow(3, sh.exit_channels, sh.channels - sh.exit_channels)?;
            }
            let y = z
                .to_dtype(self.elem)?
                .broadcast_add(&scale.exit_loc)?
                .broadcast_mul(&scale.exit_scale)?;
            let lp = ((coupling + standard_normal_log_density(&y)?)? + scale.constant)?;
            lps.push(lp);
            mark(&mut timer, "exit+prior")?;
        }
        Ok(Tensor::stack(&lps, D::Minus1)?)
    }

    /// One step on h: (N, H, W, C) -> (y, per-sample coupling log-determinant (N) f64).
    fn step(
        &self,
        h: &Tensor,
        st: &FusedStep,
        timer: &mut Option<&mut StageTimer>,
    ) -> Result<(Tensor, Tensor)> {
        let (n, hh, ww, c) = h.dims4()?;
        let rows = n * hh * ww;
        let half = c / 2;
        let h =
            small_linear(&h.reshape((rows, c))?, &st.mix, &st.mix_bias)?.reshape((n, hh, ww, c))?;
        mark(timer, "1x1 mix")?;
        let xa = h.narrow(3, 0, half)?;
        let cols = im2col3x3_ones(&xa)?.to_dtype(self.dtype)?;
        mark(timer, "im2col")?;
        let t = matmul_relu(&cols, &st.conv1)?;
        mark(timer, "conv1 matmul+relu")?;
        let t = matmul_relu(&t, &st.conv2)?;
        mark(timer, "conv2 matmul+relu")?;
        let taps = t
            .matmul(&st.conv3)?
            .to_dtype(self.state)?
            .reshape((n, hh, ww, 9, c))?;
        mark(timer, "conv3 matmul")?;
        let out = tap_sum3x3(&taps)?;
        mark(timer, "conv3 tap sum")?;
        let (y, ld) = coupling_affine(&h, &out)?;
        let ld = per_sample_sum(&ld)?;
        mark(timer, "affine+logdet")?;
        Ok((y, ld))
    }

    /// Scores a batch and copies the result to the host.
    pub fn score(&self, x: &Tensor) -> Result<ScaleScores> {
        let per_scale = self.forward(x)?.to_device(&Device::Cpu)?.to_vec2::<f64>()?;
        let log_p = per_scale.iter().map(|r| r.iter().sum()).collect();
        Ok(ScaleScores { per_scale, log_p })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_and_tap_sum_match_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (2, 3, 5, 4), &dev)?; // NCHW
        let w = Tensor::randn(0f64, 1., (6, 3, 3, 3), &dev)?;
        let want = x.conv2d(&w, 1, 1, 1, 1)?.permute((0, 2, 3, 1))?; // NHWC
        let xh = x.permute((0, 2, 3, 1))?.contiguous()?;
        let (wv, o, i) = conv_values(&w)?;
        let cols = DMatrix::from_fn(9 * i, o, |r, oo| {
            wv[((oo * i + r % i) * 3 + (r / i) / 3) * 3 + (r / i) % 3]
        });
        let patches = im2col3x3_ones(&xh)?;
        assert_eq!(patches.dims(), &[40, 28]);
        let ones = patches.narrow(1, 27, 1)?.flatten_all()?.to_vec1::<f64>()?;
        assert!(ones.iter().all(|&v| v == 1.0));
        let got = patches
            .narrow(1, 0, 27)?
            .matmul(&mat_tensor(&cols)?)?
            .reshape((2, 5, 4, 6))?;
        assert!((got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        let taps_w = DMatrix::from_fn(i, 9 * o, |ci, col| {
            let (t, oo) = (col / o, col % o);
            wv[((oo * i + ci) * 3 + t / 3) * 3 + t % 3]
        });
        let taps = xh
            .reshape((40, 3))?
            .matmul(&mat_tensor(&taps_w)?)?
            .reshape((2, 5, 4, 9, 6))?;
        let got = tap_sum3x3(&taps)?;
        assert!((got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }

    #[test]
    fn nhwc_squeeze_matches_nchw_squeeze() -> Result<()> {
        let x = Tensor::arange(0f32, 2. * 3. * 4. * 4., &Device::Cpu)?.reshape((2, 3, 4, 4))?;
        let want = super::super::squeeze::squeeze(&x)?.permute((0, 2, 3, 1))?;
        let got = super::super::flow::nhwc::squeeze(&x.permute((0, 2, 3, 1))?.contiguous()?)?;
        assert_eq!((got - want)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}

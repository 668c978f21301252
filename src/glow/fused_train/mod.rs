//! The fused CPU training path: lp_k per image (as [`Glow::scale_log_p`]) and the gradients of
//! any loss of them with respect to every model variable, from hand-written forward and
//! backward kernels instead of candle's per-op autograd graph.
//!
//! Why: a training step through candle's graph spends its time allocating a tensor per op and
//! in one-pass elementwise kernels (perf, issue 18), not in arithmetic. Here a step is, per
//! flow step, 3 matrix products forward and 6 backward on the gemm crate, a few fused passes
//! over the activations, and buffers reused from step to step ([`Tape`]); the batch is split
//! into one chunk per rayon thread, each run start to end on its own thread.
//!
//! How the gradients reach the variables: the kernels work on *effective* parameters
//! (`exp(logs)`, the LU product W of the 1x1 conv, conv kernels laid out as matrices; see
//! [`params`]) and return dL/d(effective). With G those gradients and c_k the parameter-only
//! part of lp_k (the ActNorm, 1x1-conv and exit log-determinants), the surrogate
//! `S = sum_i <eff_i, G_i> + sum_k c_k sum_n dL/dlp_nk` has dS/dθ = dL/dθ for every variable θ,
//! so one candle backward over the small parameter graph finishes the chain rule.
//!
//! Scope: CPU, f32 variables and the N(0, I) prior ([`Backprop::auto`] picks the candle graph
//! otherwise: GPUs, imported models with a diagonal Gaussian prior). Tests hold lp and every
//! gradient to the candle path (`tests` below).

mod ops;
mod params;
mod step;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use self::params::{Effective, Params, effective_tensors};
use self::step::ChunkTape;
use super::{Glow, Prior, Result};

/// How a training step computes its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backprop {
    /// The fused CPU kernels of this module.
    Fused,
    /// Candle's autograd over [`Glow::scale_log_p`] (any device).
    Autograd,
}

impl Backprop {
    /// Fused where it applies (CPU, f32, N(0, I) prior), otherwise candle's autograd.
    pub fn auto(glow: &Glow, device: &Device) -> Self {
        let dtype = glow.scales()[0].exit.loc.dtype();
        if device.is_cpu() && dtype == DType::F32 && glow.config().prior == Prior::StandardNormal {
            Self::Fused
        } else {
            Self::Autograd
        }
    }
}

/// Activations kept between the forward and backward pass of one input batch; reuse one per
/// input across training steps so its buffers are allocated once.
#[derive(Debug, Default)]
pub struct Tape {
    chunks: Vec<ChunkTape>,
    sizes: Vec<usize>,
}

/// Evaluates lp (N, L) for each of `inputs` (N_i, C, S, S), lets `loss` turn them into a
/// scalar with ordinary candle ops, and returns that loss and the gradients of every model
/// variable (keyed as `loss.backward()` would key them). `tapes` are reused buffers (one per
/// input; grown as needed). Both paths give the same values and gradients up to f32 rounding
/// (tests: relative 1e-4).
pub fn loss_and_gradients(
    glow: &Glow,
    backprop: Backprop,
    inputs: &[&Tensor],
    tapes: &mut Vec<Tape>,
    loss: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, GradStore)> {
    if backprop == Backprop::Autograd {
        let lps = inputs
            .iter()
            .map(|x| glow.scale_log_p(x))
            .collect::<Result<Vec<_>>>()?;
        let l = loss(&lps)?;
        let grads = l.backward()?;
        return Ok((l, grads));
    }
    let path = FusedPath::new(glow)?;
    tapes.resize_with(inputs.len().max(tapes.len()), Tape::default);
    let mut leaves = Vec::with_capacity(inputs.len());
    for (x, tape) in inputs.iter().zip(tapes.iter_mut()) {
        leaves.push(Var::from_tensor(&path.forward(x, tape)?)?);
    }
    let lps: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
    let l = loss(&lps)?;
    let mut outer = l.backward()?;
    let mut acc = path.zero_gradients();
    for (leaf, tape) in leaves.iter().zip(tapes.iter_mut()) {
        if let Some(dlp) = outer.remove(leaf.as_tensor()) {
            path.backward(tape, &dlp, &mut acc)?;
        }
    }
    Ok((l, path.variable_gradients(acc)?))
}

/// Images per chunk and thread in one pass of a forward without a tape: a scorer's buffers
/// stay the same size whatever the batch (~8k rows per GEMM at the first scale, plenty for
/// the GEMM kernels).
const SCORING_IMAGES_PER_THREAD: usize = 32;

/// The forward pass over the batch in chunks, one per rayon thread: x (N, C, S, S) -> lp
/// (N, L) f64 with each scale's parameter-only term `constants[k]` added. With `record` the
/// whole batch goes through at once (the tape keeps it for the backward pass); without, in
/// slices of [`SCORING_IMAGES_PER_THREAD`] images per thread. Errors on a wrong input shape.
fn run_forward(
    p: &Params,
    constants: &[f64],
    x: &Tensor,
    tape: &mut Tape,
    record: bool,
) -> Result<Tensor> {
    let (n, levels) = (x.dim(0)?, p.scales.len());
    let per_image = p.in_channels * p.image_size * p.image_size;
    if x.dims() != [n, p.in_channels, p.image_size, p.image_size] {
        return Err(super::GlowError::Input(format!(
            "expected images of shape (N, {}, {}, {}), got {:?}",
            p.in_channels,
            p.image_size,
            p.image_size,
            x.dims()
        )));
    }
    let xv = x
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let mut lp = vec![0.0f64; n * levels];
    let slice = if record {
        n.max(1)
    } else {
        SCORING_IMAGES_PER_THREAD * rayon::current_num_threads()
    };
    for (xs, lps) in xv
        .chunks(slice * per_image)
        .zip(lp.chunks_mut(slice * levels))
    {
        forward_chunks(p, xs, lps, tape, record);
    }
    for row in lp.chunks_exact_mut(levels) {
        for (v, c) in row.iter_mut().zip(constants) {
            *v += c;
        }
    }
    Ok(Tensor::from_vec(lp, (n, levels), x.device())?)
}

/// The images `x` (NCHW values) split into one chunk per rayon thread, each run through
/// [`ChunkTape::forward`] on its own thread; lp terms added to `lp` (n, L).
fn forward_chunks(p: &Params, x: &[f32], lp: &mut [f64], tape: &mut Tape, record: bool) {
    let levels = p.scales.len();
    let per_image = p.in_channels * p.image_size * p.image_size;
    let n = x.len() / per_image;
    let parts = rayon::current_num_threads().clamp(1, n.max(1));
    tape.sizes = (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect();
    tape.chunks.resize_with(parts, ChunkTape::default);
    let mut xs: Vec<&[f32]> = Vec::new();
    let mut lps: Vec<&mut [f64]> = Vec::new();
    let (mut xr, mut lr) = (x, lp);
    for &m in &tape.sizes {
        let (a, b) = xr.split_at(m * per_image);
        let (c, d) = std::mem::take(&mut lr).split_at_mut(m * levels);
        xs.push(a);
        lps.push(c);
        (xr, lr) = (b, d);
    }
    tape.chunks
        .par_iter_mut()
        .zip(xs)
        .zip(lps)
        .zip(tape.sizes.par_iter())
        .for_each(|(((chunk, x), lp), &m)| chunk.forward(p, x, m, lp, record));
}

/// The fused forward kernels as a CPU scorer: lp (N, L) without gradients or a tape, buffers
/// reused across calls. Used by [`super::GlowScorer`] for f32 scoring on the CPU.
#[derive(Debug)]
pub struct FusedForward {
    params: Params,
    constants: Vec<f64>,
    buffers: std::sync::Mutex<Tape>,
}

impl FusedForward {
    /// Snapshot of `glow`'s current parameters (later updates to the model are not seen);
    /// a diagonal Gaussian prior is folded into the exit ([`crate::glow::exit::Exit::folded_hwc`]).
    pub fn new(glow: &Glow) -> Result<Self> {
        let (eff, steps_constants) = effective_tensors(glow)?;
        let mut params = Params::from_effective(glow, &eff)?;
        let mut constants = Vec::new();
        for ((sp, scale), c) in params
            .scales
            .iter_mut()
            .zip(glow.scales())
            .zip(&steps_constants)
        {
            let (loc, s, exit_constant) = scale.exit.folded_hwc()?;
            sp.exit.loc = loc.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            sp.exit.s = s.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            constants.push(c.to_scalar::<f64>()? + exit_constant);
        }
        Ok(Self {
            params,
            constants,
            buffers: Default::default(),
        })
    }

    /// x (N, C, S, S) in the model's pixel space -> lp_k per image and scale, (N, L) f64.
    /// Errors on a wrong input shape.
    pub fn log_p(&self, x: &Tensor) -> Result<Tensor> {
        let mut own = Tape::default();
        // Concurrent callers get fresh buffers instead of waiting.
        let mut shared = self.buffers.try_lock().ok();
        let tape = shared.as_deref_mut().unwrap_or(&mut own);
        run_forward(&self.params, &self.constants, x, tape, false)
    }
}

/// Gradients with respect to the effective parameters, and per scale sum_n dL/dlp_nk.
struct Gradients {
    params: Params,
    lp_weight: Vec<f64>,
}

/// The fused path for the model's current parameter values (built once per training step).
struct FusedPath {
    params: Params,
    eff: Vec<Effective>,
    /// Per scale the parameter-only part of lp_k, differentiable (f64 scalars) ...
    constants: Vec<Tensor>,
    /// ... and its value.
    constant_values: Vec<f64>,
}

impl FusedPath {
    fn new(glow: &Glow) -> Result<Self> {
        let (eff, steps_constants) = effective_tensors(glow)?;
        let params = Params::from_effective(glow, &eff)?;
        let constants = steps_constants
            .iter()
            .zip(glow.scales())
            .map(|(c, s)| Ok((c + s.exit.logdet()?)?))
            .collect::<Result<Vec<_>>>()?;
        let constant_values = constants
            .iter()
            .map(|c| c.to_scalar::<f64>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            eff,
            constants,
            constant_values,
        })
    }

    /// x (N, C, S, S) -> lp (N, L) f64, recording `tape`. Errors on a wrong input shape.
    fn forward(&self, x: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        run_forward(&self.params, &self.constant_values, x, tape, true)
    }

    fn zero_gradients(&self) -> Gradients {
        Gradients {
            params: self.params.zeros_like(),
            lp_weight: vec![0.0; self.params.scales.len()],
        }
    }

    /// Adds the gradients of a loss with dL/dlp = `dlp` (N, L) through `tape` to `acc`.
    fn backward(&self, tape: &mut Tape, dlp: &Tensor, acc: &mut Gradients) -> Result<()> {
        let levels = self.params.scales.len();
        let d = dlp.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        for row in d.chunks_exact(levels) {
            for (w, v) in acc.lp_weight.iter_mut().zip(row) {
                *w += v;
            }
        }
        let mut parts: Vec<&[f64]> = Vec::new();
        let mut rest = &d[..];
        for &m in &tape.sizes {
            let (a, b) = rest.split_at(m * levels);
            parts.push(a);
            rest = b;
        }
        let p = &self.params;
        let per_chunk: Vec<Params> = tape
            .chunks
            .par_iter_mut()
            .zip(parts)
            .map(|(chunk, dl)| {
                let mut g = p.zeros_like();
                chunk.backward(p, dl, &mut g);
                g
            })
            .collect();
        // Added in chunk order, so a step's gradients do not depend on thread scheduling.
        for g in per_chunk {
            acc.params.add(g);
        }
        Ok(())
    }

    /// dL/dθ for every variable θ: permuted back for direct parameters, through the
    /// surrogate of the module docs for the others.
    fn variable_gradients(&self, mut acc: Gradients) -> Result<GradStore> {
        let mut s = Tensor::new(0.0f64, &Device::Cpu)?;
        let mut direct = Vec::new();
        for (e, g) in self.eff.iter().zip(acc.params.vectors_mut()) {
            let g = std::mem::take(g);
            if e.direct.is_some() {
                direct.extend(e.variable_gradient(g)?);
            } else {
                let g = Tensor::from_vec(g, e.value.shape(), e.value.device())?;
                s = (s + (&e.value * g)?.sum_all()?.to_dtype(DType::F64)?)?;
            }
        }
        for (c, w) in self.constants.iter().zip(&acc.lp_weight) {
            s = (s + (c * *w)?)?;
        }
        let mut grads = s.backward()?;
        for (var, g) in direct {
            grads.insert(&var, g);
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests;

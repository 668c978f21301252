//! The effective parameters of the fused training path as host f32 vectors, in the layouts its
//! kernels read (channels-last, matrices row-major), and the same structure for gradients.
//! Each effective parameter is a differentiable candle expression of the model's variables
//! (e.g. `exp(logs)`, the LU product of the 1x1 conv, a permuted conv kernel), built by
//! [`effective_tensors`]; the chain rule through those small expressions is left to candle.

use candle_core::{DType, Tensor};

use crate::glow::exit::EXIT_SCALE_EPS;
use crate::glow::{Glow, Result, ScaleShape};

/// One flow step's effective parameters (C channels, `hd` hidden channels).
#[derive(Debug, Clone)]
pub(super) struct StepParams {
    /// ActNorm location (C) and scale exp(logs) (C).
    pub an_loc: Vec<f32>,
    pub an_s: Vec<f32>,
    /// 1x1 conv weight W, (C_out, C_in).
    pub w: Vec<f32>,
    /// First coupling conv as a matrix, (9 C/2, hd): row (tap, input channel).
    pub w1: Vec<f32>,
    /// Its ActNorm: location (hd), scale (hd).
    pub n1_loc: Vec<f32>,
    pub n1_s: Vec<f32>,
    /// Second coupling conv, (hd_out, hd_in).
    pub w2: Vec<f32>,
    /// Its ActNorm.
    pub n2_loc: Vec<f32>,
    pub n2_s: Vec<f32>,
    /// Last coupling conv as a matrix, (hd, 9 C): column (tap, output channel).
    pub w3: Vec<f32>,
    /// Its bias (C) and output scale exp(3 logs) (C).
    pub b3: Vec<f32>,
    pub s3: Vec<f32>,
}

/// A scale exit's effective parameters, per dimension in (H, W, C_exit) order.
#[derive(Debug, Clone)]
pub(super) struct ExitParams {
    pub loc: Vec<f32>,
    /// exp(logs) + 1e-8.
    pub s: Vec<f32>,
}

/// One scale's effective parameters.
#[derive(Debug, Clone)]
pub(super) struct ScaleParams {
    pub steps: Vec<StepParams>,
    pub exit: ExitParams,
    pub shape: ScaleShape,
}

/// The whole model's effective parameters (or their gradients: same shapes).
#[derive(Debug, Clone)]
pub(super) struct Params {
    pub scales: Vec<ScaleParams>,
    pub in_channels: usize,
    pub image_size: usize,
    pub hidden: usize,
}

impl StepParams {
    fn fields_mut(&mut self) -> [&mut Vec<f32>; 12] {
        [
            &mut self.an_loc, &mut self.an_s, &mut self.w, &mut self.w1, &mut self.n1_loc,
            &mut self.n1_s, &mut self.w2, &mut self.n2_loc, &mut self.n2_s, &mut self.w3,
            &mut self.b3, &mut self.s3,
        ]
    }
}

impl Params {
    /// Every vector in a fixed order (the order of [`effective_tensors`]).
    pub fn vectors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = Vec::new();
        for s in &mut self.scales {
            for st in &mut s.steps {
                out.extend(st.fields_mut());
            }
            out.push(&mut s.exit.loc);
            out.push(&mut s.exit.s);
        }
        out
    }

    /// Builds the structure from vectors in [`effective_tensors`] order.
    fn from_vectors(glow: &Glow, mut v: impl Iterator<Item = Vec<f32>>) -> Self {
        let mut next = || v.next().expect("one vector per effective parameter");
        let scales = glow
            .scales()
            .iter()
            .map(|s| ScaleParams {
                steps: s
                    .steps
                    .iter()
                    .map(|_| StepParams {
                        an_loc: next(), an_s: next(), w: next(), w1: next(), n1_loc: next(),
                        n1_s: next(), w2: next(), n2_loc: next(), n2_s: next(), w3: next(),
                        b3: next(), s3: next(),
                    })
                    .collect(),
                exit: ExitParams { loc: next(), s: next() },
                shape: s.shape,
            })
            .collect();
        let c = glow.config();
        Self {
            scales,
            in_channels: c.in_channels,
            image_size: c.image_size,
            hidden: c.hidden,
        }
    }

    /// Host copies of `tensors` (from [`effective_tensors`] of `glow`).
    pub fn from_tensors(glow: &Glow, tensors: &[Tensor]) -> Result<Self> {
        let v = tensors
            .iter()
            .map(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self::from_vectors(glow, v.into_iter()))
    }

    /// The same structure filled with zeros (a gradient accumulator).
    pub fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        for v in z.vectors_mut() {
            v.fill(0.0);
        }
        z
    }

    /// self += other, elementwise.
    pub fn add(&mut self, mut other: Self) {
        for (a, b) in self.vectors_mut().into_iter().zip(other.vectors_mut()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
    }
}

/// The effective parameters as differentiable expressions of `glow`'s variables, in the
/// order of [`Params::vectors_mut`], and per scale the parameter-only part of lp_k (f64
/// scalar): the log-determinants of its ActNorms, 1x1 convs and exit.
pub(super) fn effective_tensors(glow: &Glow) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut eff = Vec::new();
    let mut constants = Vec::new();
    for scale in glow.scales() {
        let (c, size) = (scale.shape.channels, scale.shape.size);
        let hw = size * size;
        let mut constant = scale.exit.logdet()?;
        for step in &scale.steps {
            let (an, cp) = (&step.actnorm, &step.coupling);
            let hidden = cp.conv2.dim(0)?;
            eff.extend([
                an.loc.clone(),
                an.logs.exp()?,
                step.invconv.weight()?,
                cp.conv1.permute((2, 3, 1, 0))?.reshape((9 * (c / 2), hidden))?,
                cp.norm1.loc.clone(),
                cp.norm1.logs.exp()?,
                cp.conv2.clone(),
                cp.norm2.loc.clone(),
                cp.norm2.logs.exp()?,
                cp.conv3.permute((1, 2, 3, 0))?.reshape((hidden, 9 * c))?,
                cp.conv3_bias.clone(),
                (&cp.conv3_logs * 3.0)?.exp()?,
            ]);
            constant = ((constant + an.logdet(hw)?)? + step.invconv.logdet(hw)?)?;
        }
        eff.push(scale.exit.loc.permute((1, 2, 0))?);
        eff.push((scale.exit.logs.permute((1, 2, 0))?.exp()? + EXIT_SCALE_EPS)?);
        constants.push(constant);
    }
    Ok((eff, constants))
}

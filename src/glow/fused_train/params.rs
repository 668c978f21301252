//! The effective parameters of the fused training path as host f32 vectors, in the layouts its
//! kernels read (channels-last, matrices row-major), and the same structure for gradients.
//! Each effective parameter is a differentiable candle expression of the model's variables
//! (e.g. `exp(logs)`, the LU product of the 1x1 conv, a permuted conv kernel), built by
//! [`effective_tensors`]; the chain rule through those small expressions is left to candle,
//! except for variables that are only laid out differently, whose gradients are permuted back.

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
            &mut self.an_loc,
            &mut self.an_s,
            &mut self.w,
            &mut self.w1,
            &mut self.n1_loc,
            &mut self.n1_s,
            &mut self.w2,
            &mut self.n2_loc,
            &mut self.n2_s,
            &mut self.w3,
            &mut self.b3,
            &mut self.s3,
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
                        an_loc: next(),
                        an_s: next(),
                        w: next(),
                        w1: next(),
                        n1_loc: next(),
                        n1_s: next(),
                        w2: next(),
                        n2_loc: next(),
                        n2_s: next(),
                        w3: next(),
                        b3: next(),
                        s3: next(),
                    })
                    .collect(),
                exit: ExitParams {
                    loc: next(),
                    s: next(),
                },
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

    /// Host copies of `eff` (from [`effective_tensors`] of `glow`).
    pub fn from_effective(glow: &Glow, eff: &[Effective]) -> Result<Self> {
        let v = eff
            .iter()
            .map(|e| {
                e.value
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()
            })
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

/// One effective parameter: its value and, when it is a model variable itself or only a
/// permutation of one, that variable and the permutation (so its gradient is mapped back
/// directly instead of through candle's backward pass).
pub(super) struct Effective {
    /// The value (a differentiable expression of the variables).
    pub value: Tensor,
    /// The variable and the axes that take `value`'s layout back to the variable's.
    pub direct: Option<(Tensor, Vec<usize>)>,
}

impl Effective {
    fn expr(value: Tensor) -> Self {
        Self {
            value,
            direct: None,
        }
    }

    fn var(var: &Tensor) -> Self {
        Self::permuted(var, &(0..var.rank()).collect::<Vec<_>>())
    }

    /// `var` with its axes in the order `perm`.
    fn permuted(var: &Tensor, perm: &[usize]) -> Self {
        let mut back = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            back[p] = i;
        }
        Self {
            value: var
                .permute(perm)
                .expect("a permutation of the variable's axes"),
            direct: Some((var.clone(), back)),
        }
    }

    /// The gradient of the variable behind a direct parameter from the gradient `g` of
    /// its value (flat, in `value`'s layout).
    pub fn variable_gradient(&self, g: Vec<f32>) -> Result<Option<(Tensor, Tensor)>> {
        let Some((var, back)) = &self.direct else {
            return Ok(None);
        };
        let g = Tensor::from_vec(g, self.value.shape(), var.device())?
            .permute(back.as_slice())?
            .contiguous()?
            .to_dtype(var.dtype())?;
        Ok(Some((var.clone(), g)))
    }
}

/// The effective parameters of `glow`, in the order of [`Params::vectors_mut`], and per scale
/// the log-determinants of its flow steps' ActNorms and 1x1 convs (f64 scalar; with the exit's,
/// the parameter-only part of lp_k).
pub(super) fn effective_tensors(glow: &Glow) -> Result<(Vec<Effective>, Vec<Tensor>)> {
    let mut eff = Vec::new();
    let mut constants = Vec::new();
    for scale in glow.scales() {
        let hw = scale.shape.size * scale.shape.size;
        let mut constant = Tensor::new(0.0f64, scale.exit.loc.device())?;
        for step in &scale.steps {
            let (an, cp) = (&step.actnorm, &step.coupling);
            eff.extend([
                Effective::var(&an.loc),
                Effective::expr(an.logs.exp()?),
                Effective::expr(step.invconv.weight()?),
                // (hd, C/2, 3, 3) -> (3, 3, C/2, hd): rows (tap, input channel).
                Effective::permuted(&cp.conv1, &[2, 3, 1, 0]),
                Effective::var(&cp.norm1.loc),
                Effective::expr(cp.norm1.logs.exp()?),
                Effective::var(&cp.conv2),
                Effective::var(&cp.norm2.loc),
                Effective::expr(cp.norm2.logs.exp()?),
                // (C, hd, 3, 3) -> (hd, 3, 3, C): columns (tap, output channel).
                Effective::permuted(&cp.conv3, &[1, 2, 3, 0]),
                Effective::var(&cp.conv3_bias),
                Effective::expr((&cp.conv3_logs * 3.0)?.exp()?),
            ]);
            constant = ((constant + an.logdet(hw)?)? + step.invconv.logdet(hw)?)?;
        }
        // (C, H, W) -> (H, W, C): channels-last.
        eff.push(Effective::permuted(&scale.exit.loc, &[1, 2, 0]));
        let s = (scale.exit.logs.permute((1, 2, 0))?.exp()? + EXIT_SCALE_EPS)?;
        eff.push(Effective::expr(s));
        constants.push(constant);
    }
    Ok((eff, constants))
}

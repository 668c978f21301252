//! Adamax (Kingma & Ba 2015, <https://arxiv.org/abs/1412.6980>, section 7.1) with *coupled*
//! weight decay, as in the method's recipe: the decay term `wd * theta` is added to the gradient
//! before the moment updates (L2 regularisation, not AdamW's decoupled decay).
//!
//! ```text
//! g = grad + wd * theta
//! m = b1 * m + (1 - b1) * g
//! u = max(b2 * u, |g| + eps)
//! theta = theta - lr_t / (1 - b1^t) * m / u        (lr_t: optional linear warm-up)
//! ```
//! A step whose gradients contain a non-finite value is skipped entirely (no parameter or state
//! changes) and reported, so one bad batch cannot poison the moments.

use candle_core::{Tensor, Var, backprop::GradStore};
use serde::{Deserialize, Serialize};

use crate::glow::Result;

/// Hyper-parameters; the defaults are the method's (lr 5e-4, wd 5e-5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamaxConfig {
    /// Learning rate after warm-up.
    pub lr: f64,
    /// Coupled L2 weight decay added to every gradient.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Infinity-norm decay.
    pub beta2: f64,
    /// Added to |g| in the infinity norm so the division is safe.
    pub eps: f64,
    /// Steps of linear learning-rate warm-up (0: none).
    pub warmup_steps: u64,
}

impl Default for AdamaxConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            weight_decay: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
        }
    }
}

/// What one call of [`Adamax::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Parameters and optimizer state were updated.
    Applied,
    /// A gradient was NaN or infinite; nothing changed.
    SkippedNonFinite,
}

/// Adamax over a fixed list of variables (state kept per variable, in the variables' dtype).
pub struct Adamax {
    config: AdamaxConfig,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    u: Vec<Tensor>,
    step: u64,
    skipped: u64,
}

impl Adamax {
    /// An optimizer for `vars` with zeroed moments.
    pub fn new(vars: Vec<Var>, config: AdamaxConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let u = m.clone();
        Ok(Self {
            config,
            vars,
            m,
            u,
            step: 0,
            skipped: 0,
        })
    }

    /// Updates applied so far (the `t` of the bias correction).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps skipped because of non-finite gradients.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The first moments and infinity norms, in the order of the variables (for checkpoints).
    pub fn state(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.u)
    }

    /// Restores moments, norms and the step counters saved from an optimizer over the same
    /// variables (shapes are checked), so a resumed run takes the identical next step.
    pub fn restore(
        &mut self,
        m: Vec<Tensor>,
        u: Vec<Tensor>,
        step: u64,
        skipped: u64,
    ) -> Result<()> {
        for (i, (a, b)) in m.iter().zip(&u).enumerate() {
            let want = self.vars[i].shape();
            if a.shape() != want || b.shape() != want || m.len() != self.vars.len() {
                return Err(crate::glow::GlowError::Input(format!(
                    "optimizer state {i} has shapes {:?}/{:?}, the variable is {:?}",
                    a.shape(),
                    b.shape(),
                    want
                )));
            }
        }
        self.m = m;
        self.u = u;
        self.step = step;
        self.skipped = skipped;
        Ok(())
    }

    /// Learning rate of the next step (after warm-up scaling).
    pub fn current_lr(&self) -> f64 {
        let w = self.config.warmup_steps;
        if w == 0 || self.step >= w {
            self.config.lr
        } else {
            self.config.lr * (self.step + 1) as f64 / w as f64
        }
    }

    /// One update from `grads`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepOutcome> {
        // Check every gradient first: a skipped step must not touch anything.
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let s = g
                    .abs()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
                if !s.is_finite() {
                    self.skipped += 1;
                    return Ok(StepOutcome::SkippedNonFinite);
                }
            }
        }
        let c = &self.config;
        let lr = self.current_lr();
        let t = (self.step + 1) as i32;
        let step_size = lr / (1.0 - c.beta1.powi(t));
        for (i, v) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            // Detached: optimizer arithmetic must not record autograd history, or every m and
            // u would keep the previous step's tensors alive (memory growing with each step).
            let theta = v.as_tensor().detach();
            let g = (g.detach() + (&theta * c.weight_decay)?)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let u = (&self.u[i] * c.beta2)?.maximum(&(g.abs()? + c.eps)?)?;
            v.set(&(&theta - ((&m / &u)? * step_size)?)?)?;
            self.m[i] = m;
            self.u[i] = u;
        }
        self.step += 1;
        Ok(StepOutcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Regression: the moments once kept the autograd history of every previous step alive
    /// (memory grew by megabytes per step in a real training run).
    #[test]
    fn optimizer_state_records_no_autograd_history() {
        let x = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adamax::new(vec![x.clone()], AdamaxConfig::default()).unwrap();
        for _ in 0..3 {
            let loss = (x.as_tensor() * x.as_tensor()).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let (m, u) = opt.state();
        assert!(!m[0].track_op() && !u[0].track_op());
    }

    #[test]
    fn matches_a_hand_computed_adamax_step_with_coupled_decay() {
        let x = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamaxConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = Adamax::new(vec![x.clone()], cfg).unwrap();
        // loss = sum(3 x) -> grad 3; with decay g = 3 + 0.5 x = [3.5, 2.0].
        let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        assert_eq!(
            opt.step(&loss.backward().unwrap()).unwrap(),
            StepOutcome::Applied
        );
        // m = 0.1 g, u = |g| + eps, step = 0.1 / (1 - 0.9) = 1 -> theta -= 0.1 g / (|g| + eps).
        let v = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!((v[0] - (1.0 - 0.1)).abs() < 1e-7, "{v:?}");
        assert!((v[1] - (-2.0 - 0.1)).abs() < 1e-7, "{v:?}");
        // Second step: g = 3 + 0.5 * [0.9, -2.1] = [3.45, 1.95].
        let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let (g0, g1) = (3.45f64, 1.95f64);
        let m = [0.9 * 0.35 + 0.1 * g0, 0.9 * 0.2 + 0.1 * g1];
        let u = [(0.999f64 * 3.5).max(g0), (0.999f64 * 2.0).max(g1)];
        let step = 0.1 / (1.0 - 0.81);
        let want = [0.9 - step * m[0] / u[0], -2.1 - step * m[1] / u[1]];
        let v = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!(
            (v[0] - want[0]).abs() < 1e-6 && (v[1] - want[1]).abs() < 1e-6,
            "{v:?} vs {want:?}"
        );
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn non_finite_gradients_skip_the_step_without_touching_anything() {
        let x = Var::new(&[1.0f32, 4.0], &Device::Cpu).unwrap();
        let mut opt = Adamax::new(vec![x.clone()], AdamaxConfig::default()).unwrap();
        let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let before = x.as_tensor().to_vec1::<f32>().unwrap();
        let (m_before, u_before) = (
            opt.state().0[0].to_vec1::<f32>().unwrap(),
            opt.state().1[0].to_vec1::<f32>().unwrap(),
        );
        // sqrt of a negative number: NaN gradient.
        let bad = (x.as_tensor() - 10.0)
            .unwrap()
            .sqrt()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(
            opt.step(&bad.backward().unwrap()).unwrap(),
            StepOutcome::SkippedNonFinite
        );
        assert_eq!(x.as_tensor().to_vec1::<f32>().unwrap(), before);
        assert_eq!(opt.state().0[0].to_vec1::<f32>().unwrap(), m_before);
        assert_eq!(opt.state().1[0].to_vec1::<f32>().unwrap(), u_before);
        assert_eq!((opt.steps(), opt.skipped()), (1, 1));
    }

    #[test]
    fn restored_state_takes_the_identical_next_step() {
        let run = |restore_after: Option<usize>| -> Vec<f64> {
            let x = Var::new(&[0.5f64, -1.5, 2.0], &Device::Cpu).unwrap();
            let cfg = AdamaxConfig {
                lr: 0.05,
                warmup_steps: 3,
                ..Default::default()
            };
            let mut opt = Adamax::new(vec![x.clone()], cfg.clone()).unwrap();
            for i in 0..5 {
                if restore_after == Some(i) {
                    // A fresh optimizer (and variable copy) resumed from the saved state.
                    let (m, u) = opt.state();
                    let (m, u) = (m.to_vec(), u.to_vec());
                    let (s, k) = (opt.steps(), opt.skipped());
                    let x2 = Var::from_tensor(x.as_tensor()).unwrap();
                    let mut opt2 = Adamax::new(vec![x2.clone()], cfg.clone()).unwrap();
                    opt2.restore(m, u, s, k).unwrap();
                    for _ in i..5 {
                        let loss = x2.as_tensor().powf(4.0).unwrap().sum_all().unwrap();
                        opt2.step(&loss.backward().unwrap()).unwrap();
                    }
                    return x2.as_tensor().to_vec1().unwrap();
                }
                let loss = x.as_tensor().powf(4.0).unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            x.as_tensor().to_vec1().unwrap()
        };
        let straight = run(None);
        assert_eq!(run(Some(2)), straight);
        assert_ne!(run(Some(2)), vec![0.5, -1.5, 2.0]);
        // Wrong shapes are refused.
        let x = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut opt = Adamax::new(vec![x], AdamaxConfig::default()).unwrap();
        let z = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
        assert!(opt.restore(vec![z.clone()], vec![z], 0, 0).is_err());
    }
}

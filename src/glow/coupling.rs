//! Affine coupling: the first half of the channels conditions the second.
//! `h = NN(x_a)`, shift = even channels of h, raw = odd channels,
//! `s = sigmoid(raw + 2)`, `y_b = (x_b + shift) * s`, log-determinant `sum log_sigmoid(raw + 2)`.
//! NN = conv3x3 (C/2 -> hidden, no bias) -> ActNorm -> ReLU -> conv1x1 (hidden -> hidden, no bias)
//! -> ActNorm -> ReLU -> conv3x3 (hidden -> C, bias) times exp(3 * logs); the last conv starts at
//! zero so every coupling starts as `y_b = sigmoid(2) * x_b = 0.881 * x_b`.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::actnorm::ActNorm;
use super::init::ParamWriter;
use super::invconv::mix_channels;
use super::{Result, log_sigmoid, per_sample_sum};

/// Standard deviation of the random init of the first two coupling convolutions (as Glow).
pub const CONV_INIT_STD: f64 = 0.05;

/// Affine coupling layer for (N, C, H, W) tensors, C even.
#[derive(Debug, Clone)]
pub struct Coupling {
    /// conv3x3 C/2 -> hidden, (hidden, C/2, 3, 3).
    pub conv1: Tensor,
    /// ActNorm after conv1.
    pub norm1: ActNorm,
    /// conv1x1 hidden -> hidden as a matrix, (hidden, hidden).
    pub conv2: Tensor,
    /// ActNorm after conv2.
    pub norm2: ActNorm,
    /// Zero-initialised conv3x3 hidden -> C, (C, hidden, 3, 3).
    pub conv3: Tensor,
    /// Bias of conv3, (C).
    pub conv3_bias: Tensor,
    /// Per-channel log output scale of conv3 (multiplied by 3), (C).
    pub conv3_logs: Tensor,
}

impl Coupling {
    /// Creates the parameters (random convs are set by [`Coupling::randomize`]).
    pub fn new(vb: VarBuilder, channels: usize, hidden: usize) -> Result<Self> {
        let half = channels / 2;
        let z = Init::Const(0.);
        Ok(Self {
            conv1: vb.get_with_hints((hidden, half, 3, 3), "conv1.weight", z)?,
            norm1: ActNorm::new(vb.pp("norm1"), hidden)?,
            conv2: vb.get_with_hints((hidden, hidden), "conv2.weight", z)?,
            norm2: ActNorm::new(vb.pp("norm2"), hidden)?,
            conv3: vb.get_with_hints((channels, hidden, 3, 3), "conv3.weight", z)?,
            conv3_bias: vb.get_with_hints(channels, "conv3.bias", z)?,
            conv3_logs: vb.get_with_hints(channels, "conv3.logs", z)?,
        })
    }

    /// Draws the first two convolutions from N(0, 0.05^2); the last stays zero.
    pub fn randomize(&self, rng: &mut impl Rng, writer: &ParamWriter) -> Result<()> {
        let normal = Normal::new(0.0f32, CONV_INIT_STD as f32).expect("valid std");
        for t in [&self.conv1, &self.conv2] {
            let v: Vec<f32> = (0..t.elem_count()).map(|_| normal.sample(rng)).collect();
            writer.set(t, &Tensor::from_vec(v, t.shape(), t.device())?)?;
        }
        Ok(())
    }

    /// The conditioning network: x_a (N, C/2, H, W) -> h (N, C, H, W).
    fn network(&self, xa: &Tensor, init: Option<&ParamWriter>) -> Result<Tensor> {
        let h = xa.conv2d(&self.conv1, 1, 1, 1, 1)?;
        let h = self.norm1.forward(&h, init)?.relu()?;
        let h = mix_channels(&h, &self.conv2, None)?;
        let h = self.norm2.forward(&h, init)?.relu()?;
        let h = h
            .conv2d(&self.conv3, 1, 1, 1, 1)?
            .broadcast_add(&self.conv3_bias.reshape((1, (), 1, 1))?)?;
        let scale = (&self.conv3_logs * 3.0)?.exp()?.reshape((1, (), 1, 1))?;
        Ok(h.broadcast_mul(&scale)?)
    }

    /// x: (N, C, H, W) -> (y, per-sample log-determinant (N) f64).
    pub fn forward(&self, x: &Tensor, init: Option<&ParamWriter>) -> Result<(Tensor, Tensor)> {
        let (xa, xb) = halves(x)?;
        let h = self.network(&xa, init)?;
        let (yb, logdet) = affine_forward(&xb, &h)?;
        Ok((Tensor::cat(&[&xa, &yb], 1)?, logdet))
    }

    /// y: (N, C, H, W) -> x; exact inverse of [`Coupling::forward`].
    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let (ya, yb) = halves(y)?;
        let h = self.network(&ya, None)?;
        let (shift, raw) = shift_and_raw(&h)?;
        let s = log_sigmoid(&(raw + 2.0)?)?.exp()?;
        let xb = (yb.div(&s)? - shift)?;
        Ok(Tensor::cat(&[&ya, &xb], 1)?)
    }
}

/// Splits channels into the conditioning half x_a and the transformed half x_b.
pub fn halves(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = x.dim(1)?;
    Ok((x.narrow(1, 0, c / 2)?, x.narrow(1, c / 2, c - c / 2)?))
}

/// h (N, C, H, W) -> (shift = even channels, raw = odd channels), each (N, C/2, H, W).
pub fn shift_and_raw(h: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c, hh, ww) = h.dims4()?;
    let pairs = h.reshape((n, c / 2, 2, hh, ww))?;
    Ok((
        pairs.narrow(2, 0, 1)?.squeeze(2)?,
        pairs.narrow(2, 1, 1)?.squeeze(2)?,
    ))
}

/// The affine transform shared by the training path and the fused scorer:
/// `y_b = (x_b + shift) * sigmoid(raw + 2)`, log-determinant summed per sample in f64.
pub fn affine_forward(xb: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
    let (shift, raw) = shift_and_raw(h)?;
    let log_s = log_sigmoid(&(raw + 2.0)?)?;
    let yb = (xb + shift)?.mul(&log_s.exp()?)?;
    Ok((yb, per_sample_sum(&log_s)?))
}

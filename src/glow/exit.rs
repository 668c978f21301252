//! Scale exits: latents leaving the flow pass an ActNorm with one location/log-scale *per
//! dimension* (`y = (z + loc) * (exp(logs) + 1e-8)`, log-determinant `sum log(exp(logs) + 1e-8)`)
//! and are scored under the prior: N(0, I) (method.md), or, for models imported from the paper
//! authors' code ([`super::Prior::DiagonalGaussian`]), N(m, diag(exp(2 s))) with a fixed mean and
//! log-std per dimension, `log N(y; m, e^s) = log N((y - m) e^-s; 0, I) - sum_d s_d`. There is no
//! learned conditional prior.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use super::actnorm::dimension_init;
use super::config::Prior;
use super::init::ParamWriter;
use super::{HALF_LN_2PI, Result, per_sample_sum};

/// Added to exp(logs) so the exit scale never reaches zero (method.md).
pub const EXIT_SCALE_EPS: f64 = 1e-8;

/// Names of the exit parameters that are fixed and never trained (the prior's).
pub const FIXED_PARAMS: [&str; 2] = ["prior_mean", "prior_logstd"];

/// Per-dimension exit ActNorm for latents of shape (N, C, H, W), and the prior of its output.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Per-dimension location, (C, H, W).
    pub loc: Tensor,
    /// Per-dimension log-scale, (C, H, W).
    pub logs: Tensor,
    /// Mean and log-std of a diagonal Gaussian prior, each (C, H, W); `None` for N(0, I).
    pub prior: Option<(Tensor, Tensor)>,
}

impl Exit {
    /// Zero-initialised parameters for latents of shape (channels, size, size); with `prior`
    /// a diagonal Gaussian, also its mean and log-std (zero: N(0, I) until set).
    pub fn new(vb: VarBuilder, channels: usize, size: usize, prior: Prior) -> Result<Self> {
        let shape = (channels, size, size);
        let prior = match prior {
            Prior::StandardNormal => None,
            Prior::DiagonalGaussian => Some((
                vb.get_with_hints(shape, "prior_mean", Init::Const(0.))?,
                vb.get_with_hints(shape, "prior_logstd", Init::Const(0.))?,
            )),
        };
        Ok(Self {
            loc: vb.get_with_hints(shape, "loc", Init::Const(0.))?,
            logs: vb.get_with_hints(shape, "logs", Init::Const(0.))?,
            prior,
        })
    }

    /// Per-sample prior log-density P_k of exit-ActNorm outputs y: (N, C, H, W) or
    /// (N, H, W, C) with `channels_last`, in f64.
    pub fn log_prior(&self, y: &Tensor, channels_last: bool) -> Result<Tensor> {
        match &self.prior {
            None => standard_normal_log_density(y),
            Some(_) => {
                let (u, log_std_sum) = self.standardize(y, channels_last)?;
                Ok((standard_normal_log_density(&u)? - log_std_sum)?)
            }
        }
    }

    /// y -> u = (y - m) e^-s, the latent that is N(0, I) under the prior, and sum_d s_d (f64).
    /// The identity for N(0, I).
    pub fn standardize(&self, y: &Tensor, channels_last: bool) -> Result<(Tensor, f64)> {
        let Some((mean, logstd)) = &self.prior else {
            return Ok((y.clone(), 0.0));
        };
        let (mean, logstd) = if channels_last {
            (mean.permute((1, 2, 0))?, logstd.permute((1, 2, 0))?)
        } else {
            (mean.clone(), logstd.clone())
        };
        let u = y
            .broadcast_sub(&mean.to_dtype(y.dtype())?)?
            .broadcast_mul(&logstd.neg()?.exp()?.to_dtype(y.dtype())?)?;
        let sum = logstd.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        Ok((u, sum))
    }

    /// u -> y = u e^s + m; exact inverse of [`Exit::standardize`].
    pub fn unstandardize(&self, u: &Tensor) -> Result<Tensor> {
        match &self.prior {
            None => Ok(u.clone()),
            Some((mean, logstd)) => Ok(u.broadcast_mul(&logstd.exp()?)?.broadcast_add(mean)?),
        }
    }

    fn scale(&self) -> Result<Tensor> {
        Ok((self.logs.exp()? + EXIT_SCALE_EPS)?)
    }

    /// z: (N, C, H, W) -> y (N, C, H, W), the standard-normal latent. With `init`, first sets
    /// loc/logs from z's per-dimension batch statistics.
    pub fn forward(&self, z: &Tensor, init: Option<&ParamWriter>) -> Result<Tensor> {
        if let Some(w) = init {
            let (loc, logs) = dimension_init(z)?;
            w.set(&self.loc, &loc)?;
            w.set(&self.logs, &logs)?;
        }
        Ok(z.broadcast_add(&self.loc)?.broadcast_mul(&self.scale()?)?)
    }

    /// y (N, C, H, W) -> z; exact inverse of [`Exit::forward`].
    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        Ok(y.broadcast_div(&self.scale()?)?.broadcast_sub(&self.loc)?)
    }

    /// The exit and its prior folded for inference, channels-last, in f64 on the CPU:
    /// `(loc', scale', constant)` with per-dimension (H, W, C) tensors such that
    /// `log N(y; prior) + A_k = log N((z + loc') scale'; 0, I) + constant`. For N(0, I)
    /// `loc' = loc`, `scale' = exp(logs) + 1e-8`, `constant = A_k`; a diagonal Gaussian
    /// prior's `(y - m) e^-s` with `y = (z + loc) scale` is `(z + loc - m / scale) (scale e^-s)`,
    /// and `-sum s` joins the constant.
    pub fn folded_hwc(&self) -> Result<(Tensor, Tensor, f64)> {
        let hwc = |t: &Tensor| -> Result<Tensor> {
            Ok(t.detach()
                .to_dtype(DType::F64)?
                .to_device(&candle_core::Device::Cpu)?
                .permute((1, 2, 0))?
                .contiguous()?)
        };
        let mut scale = (hwc(&self.logs)?.exp()? + EXIT_SCALE_EPS)?;
        let mut loc = hwc(&self.loc)?;
        let mut constant = scale.log()?.sum_all()?.to_scalar::<f64>()?;
        if let Some((mean, logstd)) = &self.prior {
            let (mean, logstd) = (hwc(mean)?, hwc(logstd)?);
            loc = (loc - mean.div(&scale)?)?;
            scale = scale.mul(&logstd.neg()?.exp()?)?;
            constant -= logstd.sum_all()?.to_scalar::<f64>()?;
        }
        Ok((loc, scale, constant))
    }

    /// Scalar f64 log-determinant A_k = sum_d log(exp(logs_d) + 1e-8) (data independent).
    pub fn logdet(&self) -> Result<Tensor> {
        Ok((self.logs.to_dtype(DType::F64)?.exp()? + EXIT_SCALE_EPS)?
            .log()?
            .sum_all()?)
    }
}

/// Per-sample N(0, I) log-density P_k of y: (N, ...), accumulated in f64.
pub fn standard_normal_log_density(y: &Tensor) -> Result<Tensor> {
    let dims = y.elem_count() / y.dim(0)?;
    let sq = per_sample_sum(&y.to_dtype(DType::F64)?.sqr()?)?;
    Ok(((sq * -0.5)? - dims as f64 * HALF_LN_2PI)?)
}

//! Scale exits: latents leaving the flow pass an ActNorm with one location/log-scale *per
//! dimension* (`y = (z + loc) * (exp(logs) + 1e-8)`, log-determinant `sum log(exp(logs) + 1e-8)`)
//! and are scored under N(0, I). There is no learned conditional prior.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use super::actnorm::dimension_init;
use super::init::ParamWriter;
use super::{HALF_LN_2PI, Result, per_sample_sum};

/// Added to exp(logs) so the exit scale never reaches zero (method.md).
pub const EXIT_SCALE_EPS: f64 = 1e-8;

/// Per-dimension exit ActNorm for latents of shape (N, C, H, W).
#[derive(Debug, Clone)]
pub struct Exit {
    /// Per-dimension location, (C, H, W).
    pub loc: Tensor,
    /// Per-dimension log-scale, (C, H, W).
    pub logs: Tensor,
}

impl Exit {
    /// Zero-initialised parameters for latents of shape (channels, size, size).
    pub fn new(vb: VarBuilder, channels: usize, size: usize) -> Result<Self> {
        let shape = (channels, size, size);
        Ok(Self {
            loc: vb.get_with_hints(shape, "loc", Init::Const(0.))?,
            logs: vb.get_with_hints(shape, "logs", Init::Const(0.))?,
        })
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

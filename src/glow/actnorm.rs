//! Per-channel activation normalisation: `y = exp(logs_c) * (x + loc_c)`,
//! log-determinant `H*W*sum_c logs_c`, with data-dependent initialisation
//! (`loc = -mean`, `logs = -log(max(std, 1e-6))` over batch x H x W).

use candle_core::{D, DType, Tensor};
use candle_nn::{Init, VarBuilder};

use super::Result;
use super::init::ParamWriter;

/// Smallest standard deviation data-dependent init divides by.
pub const MIN_INIT_STD: f64 = 1e-6;

/// Per-channel ActNorm on (N, C, H, W) tensors.
#[derive(Debug, Clone)]
pub struct ActNorm {
    /// Location b, shape (C).
    pub loc: Tensor,
    /// Log-scale s, shape (C).
    pub logs: Tensor,
}

impl ActNorm {
    /// Parameters `loc` and `logs` of shape (channels), zero until initialised.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            loc: vb.get_with_hints(channels, "loc", Init::Const(0.))?,
            logs: vb.get_with_hints(channels, "logs", Init::Const(0.))?,
        })
    }

    fn per_channel(t: &Tensor) -> candle_core::Result<Tensor> {
        t.reshape((1, t.dim(0)?, 1, 1))
    }

    /// x: (N, C, H, W) -> y: (N, C, H, W). With `init`, first sets loc/logs from x's statistics.
    pub fn forward(&self, x: &Tensor, init: Option<&ParamWriter>) -> Result<Tensor> {
        if let Some(w) = init {
            let (loc, logs) = channel_init(x)?;
            w.set(&self.loc, &loc)?;
            w.set(&self.logs, &logs)?;
        }
        let y = x
            .broadcast_add(&Self::per_channel(&self.loc)?)?
            .broadcast_mul(&Self::per_channel(&self.logs.exp()?)?)?;
        Ok(y)
    }

    /// y: (N, C, H, W) -> x; exact inverse of [`ActNorm::forward`].
    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        Ok(
            y.broadcast_mul(&Self::per_channel(&self.logs.neg()?.exp()?)?)?
                .broadcast_sub(&Self::per_channel(&self.loc)?)?,
        )
    }

    /// Scalar f64 log-determinant for a spatial area of `hw` pixels (data independent).
    pub fn logdet(&self, hw: usize) -> Result<Tensor> {
        Ok((self.logs.to_dtype(DType::F64)?.sum_all()? * hw as f64)?)
    }
}

/// Data-dependent init values (loc, logs) per channel of x: (N, C, H, W), over batch x H x W.
fn channel_init(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = x.dim(1)?;
    let flat = x
        .detach()
        .to_dtype(DType::F64)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((c, ()))?;
    let mean = flat.mean(D::Minus1)?;
    let var = flat
        .broadcast_sub(&mean.unsqueeze(1)?)?
        .sqr()?
        .mean(D::Minus1)?;
    let logs = var.sqrt()?.maximum(MIN_INIT_STD)?.log()?.neg()?;
    Ok((mean.neg()?, logs))
}

/// Data-dependent init values (loc, logs) per *dimension* of x: (N, ...), over the batch.
pub fn dimension_init(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.detach().to_dtype(DType::F64)?;
    let mean = x.mean(0)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    let logs = var.sqrt()?.maximum(MIN_INIT_STD)?.log()?.neg()?;
    Ok((mean.neg()?, logs))
}

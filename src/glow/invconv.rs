//! LU-parametrised invertible 1x1 convolution:
//! `W = P (L + I) (U + diag(sign * exp(logw)))`, log-determinant `H*W*sum(logw)` (no determinant
//! is ever computed). P and sign are fixed at initialisation, which takes a random orthogonal
//! matrix (QR of a Gaussian matrix) apart with a pivoted LU, once, on the CPU in f64.
//! The convolution itself runs as a matrix multiplication over channels.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use nalgebra::DMatrix;
use rand::Rng;
use rand_distr::StandardNormal;

use super::Result;
use super::init::ParamWriter;

/// Invertible 1x1 convolution on (N, C, H, W) tensors.
#[derive(Debug, Clone)]
pub struct InvConv {
    /// Fixed permutation matrix P, (C, C).
    pub perm: Tensor,
    /// Strictly lower part of L (the diagonal and above are masked out), (C, C).
    pub lower: Tensor,
    /// Strictly upper part of U (the diagonal and below are masked out), (C, C).
    pub upper: Tensor,
    /// Log of |diag(U)|, (C).
    pub logw: Tensor,
    /// Fixed sign of diag(U), (C).
    pub sign: Tensor,
    channels: usize,
}

/// Names of the parameters that are fixed at initialisation and never trained.
pub const FIXED_PARAMS: [&str; 2] = ["perm", "sign"];

impl InvConv {
    /// Creates zeroed parameters (an identity until [`InvConv::randomize`] or a load).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let c = channels;
        Ok(Self {
            perm: vb.get_with_hints((c, c), "perm", Init::Const(0.))?,
            lower: vb.get_with_hints((c, c), "lower", Init::Const(0.))?,
            upper: vb.get_with_hints((c, c), "upper", Init::Const(0.))?,
            logw: vb.get_with_hints(c, "logw", Init::Const(0.))?,
            sign: vb.get_with_hints(c, "sign", Init::Const(1.))?,
            channels,
        })
    }

    /// Sets a random orthogonal initial weight via QR + pivoted LU (f64, CPU).
    pub fn randomize(&self, rng: &mut impl Rng, writer: &ParamWriter) -> Result<()> {
        let c = self.channels;
        let g = DMatrix::<f64>::from_fn(c, c, |_, _| rng.sample(StandardNormal));
        let q = g.qr().q();
        let lu = q.lu();
        // nalgebra: P_n * Q = L * U, so Q = P_n^T L U and our P is P_n^T.
        let mut pn = DMatrix::<f64>::identity(c, c);
        lu.p().permute_rows(&mut pn);
        let p = pn.transpose();
        let l = lu.l();
        let u = lu.u();
        let diag = u.diagonal();
        let dev = self.perm.device();
        writer.set(&self.perm, &to_tensor(&p, dev)?)?;
        writer.set(&self.lower, &to_tensor(&l.lower_triangle(), dev)?)?; // masked later
        writer.set(&self.upper, &to_tensor(&u.upper_triangle(), dev)?)?;
        let logw: Vec<f64> = diag.iter().map(|d| d.abs().ln()).collect();
        let sign: Vec<f64> = diag.iter().map(|d| d.signum()).collect();
        writer.set(&self.logw, &Tensor::new(logw, dev)?)?;
        writer.set(&self.sign, &Tensor::new(sign, dev)?)?;
        Ok(())
    }

    fn masks(&self) -> Result<(Tensor, Tensor)> {
        let c = self.channels;
        let dev = self.lower.device();
        let lower: Vec<f32> = (0..c * c)
            .map(|k| if k % c < k / c { 1. } else { 0. })
            .collect();
        let lmask = Tensor::from_vec(lower, (c, c), dev)?.to_dtype(self.lower.dtype())?;
        Ok((lmask.clone(), lmask.t()?.contiguous()?))
    }

    /// The weight W (C_out, C_in) from its LU parameters; differentiable (training path).
    pub fn weight(&self) -> Result<Tensor> {
        let (lmask, umask) = self.masks()?;
        let dev = self.lower.device();
        let eye = Tensor::eye(self.channels, self.lower.dtype(), dev)?;
        let l = ((&self.lower * &lmask)? + &eye)?;
        let d = (&self.sign * self.logw.exp()?)?.reshape((1, self.channels))?;
        let u = ((&self.upper * &umask)? + eye.broadcast_mul(&d)?)?;
        Ok(self.perm.matmul(&l)?.matmul(&u)?)
    }

    /// W and W^-1 in f64 on the CPU, the inverse by triangular solves only
    /// (W^-1 = U^-1 (L^-1 P^T)); for load-time precomputation and the inverse pass.
    pub fn weight_and_inverse_f64(&self) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
        let c = self.channels;
        let p = to_matrix(&self.perm)?;
        let lower = to_matrix(&self.lower)?;
        let upper = to_matrix(&self.upper)?;
        let logw = to_vec(&self.logw)?;
        let sign = to_vec(&self.sign)?;
        let l = DMatrix::from_fn(c, c, |i, j| match i.cmp(&j) {
            std::cmp::Ordering::Greater => lower[(i, j)],
            std::cmp::Ordering::Equal => 1.0,
            std::cmp::Ordering::Less => 0.0,
        });
        let u = DMatrix::from_fn(c, c, |i, j| match i.cmp(&j) {
            std::cmp::Ordering::Less => upper[(i, j)],
            std::cmp::Ordering::Equal => sign[i] * logw[i].exp(),
            std::cmp::Ordering::Greater => 0.0,
        });
        let w = &p * &l * &u;
        let linv_pt = l
            .solve_lower_triangular(&p.transpose())
            .expect("unit lower triangular matrix is invertible");
        let winv = u.solve_upper_triangular(&linv_pt).ok_or_else(|| {
            super::GlowError::Config("1x1 conv: U has a zero on its diagonal".into())
        })?;
        Ok((w, winv))
    }

    /// x: (N, C, H, W) -> W x per pixel, as one batched matmul over channels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        mix_channels(x, &self.weight()?, None)
    }

    /// y: (N, C, H, W) -> W^-1 y.
    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let (_, winv) = self.weight_and_inverse_f64()?;
        let winv = to_tensor(&winv, y.device())?.to_dtype(y.dtype())?;
        mix_channels(y, &winv, None)
    }

    /// Scalar f64 log-determinant for a spatial area of `hw` pixels (data independent).
    pub fn logdet(&self, hw: usize) -> Result<Tensor> {
        Ok((self.logw.to_dtype(DType::F64)?.sum_all()? * hw as f64)?)
    }
}

/// y = M x (+ bias) over the channel dimension of x: (N, C, H, W); M: (C_out, C_in).
pub fn mix_channels(x: &Tensor, m: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let y = m.broadcast_matmul(&x.reshape((n, c, h * w))?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1))?)?,
        None => y,
    };
    Ok(y.reshape((n, (), h, w))?)
}

/// A CPU f64 copy of a 2-d tensor.
pub fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t
        .detach()
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(r, c, &v))
}

/// A CPU f64 copy of a 1-d tensor.
pub fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach()
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f64>()?)
}

/// An f64 (rows, cols) tensor on `dev` from a matrix.
pub fn to_tensor(m: &DMatrix<f64>, dev: &Device) -> Result<Tensor> {
    let rows: Vec<f64> = m.transpose().as_slice().to_vec(); // column-major -> row-major
    Ok(Tensor::from_vec(rows, (m.nrows(), m.ncols()), dev)?)
}

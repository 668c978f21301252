//! Fused data-movement kernels of the scorer, as candle custom ops with one CPU implementation
//! (rayon) and one CUDA implementation (CUDA C compiled at first use with NVRTC). Each replaces
//! a chain of small candle ops (pads, narrows, strided adds, broadcast adds) whose launches and
//! stride uploads dominated GPU time in `glowwatch bench --profile`:
//! - [`im2col3x3_ones`]: (N, H, W, C) strided view -> (N*H*W, 9*C + 1) zero-padded 3x3 patches
//!   plus a ones column;
//! - [`tap_sum3x3`]: (N, H, W, 9, C) per-tap partial convolutions -> (N, H, W, C);
//! - [`small_linear`]: x @ w + b for the narrow 1x1 channel mixes (C <= a few dozen).
//!
//! The unit tests hold every op to the plain candle formulation on the CPU; `glowwatch doctor`
//! holds the CUDA kernels to the CPU on a GPU machine.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail,
};
use half::bf16;
use rayon::prelude::*;

/// Strides (in elements) and offset of a rank-4 layout.
fn strides4(l: &Layout) -> Result<([usize; 4], usize)> {
    let s = l.stride();
    if s.len() != 4 {
        bail!("expected a rank-4 layout, got strides {s:?}");
    }
    Ok(([s[0], s[1], s[2], s[3]], l.start_offset()))
}

/// Element types of the CPU kernels; they compute and accumulate in f64 (the CUDA kernels in
/// f32, or f64 for f64 data).
trait Real: Copy + Send + Sync + 'static {
    fn get(self) -> f64;
    fn put(v: f64) -> Self;
}
impl Real for f32 {
    fn get(self) -> f64 {
        self as f64
    }
    fn put(v: f64) -> Self {
        v as f32
    }
}
impl Real for f64 {
    fn get(self) -> f64 {
        self
    }
    fn put(v: f64) -> Self {
        v
    }
}
impl Real for bf16 {
    fn get(self) -> f64 {
        self.to_f64()
    }
    fn put(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

macro_rules! dispatch_cpu {
    ($storage:expr, $body:ident, $($arg:expr),*) => {
        match $storage {
            CpuStorage::F32(v) => CpuStorage::F32($body::<f32>(v, $($arg),*)),
            CpuStorage::BF16(v) => CpuStorage::BF16($body::<bf16>(v, $($arg),*)),
            CpuStorage::F64(v) => CpuStorage::F64($body::<f64>(v, $($arg),*)),
            s => bail!("unsupported dtype {:?}", s.dtype()),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// im2col

struct Im2Col;

fn im2col_cpu<E: Real>(src: &[E], dims: [usize; 4], st: [usize; 4], off: usize) -> Vec<E> {
    let [n, h, w, c] = dims;
    let k = 9 * c + 1;
    let mut out = vec![E::put(0.0); n * h * w * k];
    out.par_chunks_mut(k).enumerate().for_each(|(row, o)| {
        let (b, y, x) = (row / (h * w), (row / w) % h, row % w);
        for t in 0..9 {
            let (yy, xx) = (
                y as isize + t as isize / 3 - 1,
                x as isize + t as isize % 3 - 1,
            );
            if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                continue; // stays zero: padding
            }
            let base = off + b * st[0] + yy as usize * st[1] + xx as usize * st[2];
            for ci in 0..c {
                o[t * c + ci] = src[base + ci * st[3]];
            }
        }
        o[9 * c] = E::put(1.0);
    });
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "glowwatch-im2col3x3-ones"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = l.shape().dims4()?;
        let (st, off) = strides4(l)?;
        let out = dispatch_cpu!(s, im2col_cpu, [n, h, w, c], st, off);
        Ok((out, Shape::from((n * h * w, 9 * c + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, h, w, c) = l.shape().dims4()?;
        let (st, off) = strides4(l)?;
        let total = n * h * w * (9 * c + 1);
        let u = |v: usize| v as u32;
        let args = [
            u(total),
            u(h),
            u(w),
            u(c),
            u(st[0]),
            u(st[1]),
            u(st[2]),
            u(st[3]),
            u(off),
        ];
        let out = cuda::launch(&[s], "im2col", total, &args)?;
        Ok((out, Shape::from((n * h * w, 9 * c + 1))))
    }
}

/// (N, H, W, C) tensor (any strides, e.g. a channel narrow) -> (N*H*W, 9*C + 1): zero-padded
/// 3x3 patches, columns ordered (tap = 3*dy + dx, channel), then a column of ones.
pub fn im2col3x3_ones(x: &Tensor) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Im2Col)
}

// ---------------------------------------------------------------------------------------------
// tap sum

struct TapSum;

fn tap_sum_cpu<E: Real>(src: &[E], dims: [usize; 4], off: usize) -> Vec<E> {
    let [n, h, w, c] = dims;
    let src = &src[off..];
    let mut out = vec![E::put(0.0); n * h * w * c];
    // Taps outer, channels inner: contiguous reads that vectorise; each output still sums its
    // taps in the order 0..9 in f64, so the result is the same as summing channel by channel.
    out.par_chunks_mut(c).enumerate().for_each_init(
        || vec![0f64; c],
        |acc, (row, o)| {
            let (b, y, x) = (row / (h * w), (row / w) % h, row % w);
            acc.fill(0.0);
            for t in 0..9 {
                let (yy, xx) = (
                    y as isize + t as isize / 3 - 1,
                    x as isize + t as isize % 3 - 1,
                );
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let p = (b * h + yy as usize) * w + xx as usize;
                let tap = &src[(p * 9 + t) * c..(p * 9 + t + 1) * c];
                for (a, v) in acc.iter_mut().zip(tap) {
                    *a += v.get();
                }
            }
            for (oj, a) in o.iter_mut().zip(acc.iter()) {
                *oj = E::put(*a);
            }
        },
    );
    out
}

impl CustomOp1 for TapSum {
    fn name(&self) -> &'static str {
        "glowwatch-tap-sum3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, nine, c) = l.shape().dims5()?;
        if nine != 9 || !l.is_contiguous() {
            bail!(
                "tap sum needs a contiguous (N, H, W, 9, C) tensor, got {:?}",
                l.shape()
            );
        }
        let out = dispatch_cpu!(s, tap_sum_cpu, [n, h, w, c], l.start_offset());
        Ok((out, Shape::from((n, h, w, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, h, w, nine, c) = l.shape().dims5()?;
        if nine != 9 || !l.is_contiguous() {
            bail!(
                "tap sum needs a contiguous (N, H, W, 9, C) tensor, got {:?}",
                l.shape()
            );
        }
        let total = n * h * w * c;
        let u = |v: usize| v as u32;
        let args = [u(total), u(h), u(w), u(c), u(l.start_offset())];
        let out = cuda::launch(&[s], "tap_sum", total, &args)?;
        Ok((out, Shape::from((n, h, w, c))))
    }
}

/// Completes a 3x3 convolution computed per input pixel and tap: taps (N, H, W, 9, C)
/// contiguous -> out[y, x] = sum over taps (dy, dx) of taps[y + dy - 1, x + dx - 1, tap],
/// zero outside the image.
pub fn tap_sum3x3(taps: &Tensor) -> Result<Tensor> {
    taps.contiguous()?.apply_op1_no_bwd(&TapSum)
}

// ---------------------------------------------------------------------------------------------
// small linear

struct SmallLinear;

fn small_linear_cpu<E: Real>(x: &[E], w: &[E], b: &[E], rows: usize, k: usize, n: usize) -> Vec<E> {
    let mut out = vec![E::put(0.0); rows * n];
    // Inputs outer, outputs inner (rows of w are contiguous): each output still adds its terms
    // in the order 0..k in f64, as an inner product per output would.
    out.par_chunks_mut(n).enumerate().for_each_init(
        || vec![0f64; n],
        |acc, (r, o)| {
            let xr = &x[r * k..(r + 1) * k];
            for (a, bj) in acc.iter_mut().zip(b) {
                *a = bj.get();
            }
            for (kk, &xv) in xr.iter().enumerate() {
                let xv = xv.get();
                for (a, wv) in acc.iter_mut().zip(&w[kk * n..(kk + 1) * n]) {
                    *a += xv * wv.get();
                }
            }
            for (oj, a) in o.iter_mut().zip(acc.iter()) {
                *oj = E::put(*a);
            }
        },
    );
    out
}

impl CustomOp3 for SmallLinear {
    fn name(&self) -> &'static str {
        "glowwatch-small-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = linear_dims(l1, l2, l3)?;
        let (o1, o2, o3) = (l1.start_offset(), l2.start_offset(), l3.start_offset());
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(
                small_linear_cpu::<f32>(&x[o1..], &w[o2..], &b[o3..], rows, k, n),
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => CpuStorage::BF16(
                small_linear_cpu::<bf16>(&x[o1..], &w[o2..], &b[o3..], rows, k, n),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(
                small_linear_cpu::<f64>(&x[o1..], &w[o2..], &b[o3..], rows, k, n),
            ),
            _ => bail!("small linear: unsupported or mixed dtypes {:?}", s1.dtype()),
        };
        Ok((out, Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, k, n) = linear_dims(l1, l2, l3)?;
        let u = |v: usize| v as u32;
        let args = [
            u(rows * n),
            u(k),
            u(n),
            u(l1.start_offset()),
            u(l2.start_offset()),
            u(l3.start_offset()),
        ];
        let out = cuda::launch(&[s1, s2, s3], "small_linear", rows * n, &args)?;
        Ok((out, Shape::from((rows, n))))
    }
}

fn linear_dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize)> {
    let (rows, k) = l1.shape().dims2()?;
    let (k2, n) = l2.shape().dims2()?;
    let n3 = l3.shape().dims1()?;
    if k != k2 || n != n3 || !l1.is_contiguous() || !l2.is_contiguous() || !l3.is_contiguous() {
        bail!(
            "small linear needs contiguous x (rows, k), w (k, n), b (n); got {:?}, {:?}, {:?}",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    Ok((rows, k, n))
}

/// x @ w + b, x: (rows, k), w: (k, n), b: (n), for small k and n (one thread per output on
/// CUDA; no cuBLAS call and no broadcast pass).
pub fn small_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(w, b, &SmallLinear)
}

// ---------------------------------------------------------------------------------------------
// coupling: y = [x_a, (x_b + shift) * sigmoid(raw + 2)] and per-pixel sum of log sigmoid(raw + 2)

/// log(sigmoid(v)) = min(v, 0) - log1p(exp(-|v|)).
fn log_sigmoid_f64(v: f64) -> f64 {
    v.min(0.0) - (-v.abs()).exp().ln_1p()
}

struct CouplingApply;

fn coupling_apply_cpu<E: Real>(h: &[E], out: &[E], c: usize) -> Vec<E> {
    let half = c / 2;
    let mut y = vec![E::put(0.0); h.len()];
    y.par_chunks_mut(c).enumerate().for_each(|(p, yr)| {
        let (hr, or) = (&h[p * c..(p + 1) * c], &out[p * c..(p + 1) * c]);
        yr[..half].copy_from_slice(&hr[..half]);
        for j in 0..c - half {
            let s = log_sigmoid_f64(or[half + j].get() + 2.0).exp();
            yr[half + j] = E::put((hr[half + j].get() + or[j].get()) * s);
        }
    });
    y
}

fn check_coupling(l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() != l2.shape()
        || !l1.is_contiguous()
        || !l2.is_contiguous()
        || l1.dims().len() != 4
    {
        bail!(
            "coupling kernel needs contiguous (N, H, W, C) h and net output of one shape, got {:?} and {:?}",
            l1.shape(),
            l2.shape()
        );
    }
    Ok(())
}

impl CustomOp2 for CouplingApply {
    fn name(&self) -> &'static str {
        "glowwatch-coupling-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_coupling(l1, l2)?;
        let c = l1.dims()[3];
        let (o1, o2, n) = (
            l1.start_offset(),
            l2.start_offset(),
            l1.shape().elem_count(),
        );
        let y = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(o)) => {
                CpuStorage::F32(coupling_apply_cpu(&h[o1..o1 + n], &o[o2..o2 + n], c))
            }
            (CpuStorage::BF16(h), CpuStorage::BF16(o)) => {
                CpuStorage::BF16(coupling_apply_cpu(&h[o1..o1 + n], &o[o2..o2 + n], c))
            }
            (CpuStorage::F64(h), CpuStorage::F64(o)) => {
                CpuStorage::F64(coupling_apply_cpu(&h[o1..o1 + n], &o[o2..o2 + n], c))
            }
            _ => bail!(
                "coupling kernel: unsupported or mixed dtypes {:?}",
                s1.dtype()
            ),
        };
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_coupling(l1, l2)?;
        let total = l1.shape().elem_count();
        let u = |v: usize| v as u32;
        let args = [
            u(total),
            u(l1.dims()[3]),
            u(l1.start_offset()),
            u(l2.start_offset()),
        ];
        let y = cuda::launch(&[s1, s2], "coupling_apply", total, &args)?;
        Ok((y, l1.shape().clone()))
    }
}

struct CouplingLogdet;

fn coupling_logdet_cpu<E: Real>(out: &[E], c: usize) -> Vec<E> {
    let half = c / 2;
    out.par_chunks(c)
        .map(|r| {
            E::put(
                r[half..]
                    .iter()
                    .map(|v| log_sigmoid_f64(v.get() + 2.0))
                    .sum(),
            )
        })
        .collect()
}

impl CustomOp1 for CouplingLogdet {
    fn name(&self) -> &'static str {
        "glowwatch-coupling-logdet"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        check_coupling(l, l)?;
        let (n, h, w, c) = l.shape().dims4()?;
        let (o, len) = (l.start_offset(), l.shape().elem_count());
        let v = match s {
            CpuStorage::F32(v) => CpuStorage::F32(coupling_logdet_cpu(&v[o..o + len], c)),
            CpuStorage::BF16(v) => CpuStorage::BF16(coupling_logdet_cpu(&v[o..o + len], c)),
            CpuStorage::F64(v) => CpuStorage::F64(coupling_logdet_cpu(&v[o..o + len], c)),
            s => bail!("coupling kernel: unsupported dtype {:?}", s.dtype()),
        };
        Ok((v, Shape::from((n, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_coupling(l, l)?;
        let (n, h, w, c) = l.shape().dims4()?;
        let total = n * h * w;
        let u = |v: usize| v as u32;
        let out = cuda::launch(
            &[s],
            "coupling_logdet",
            total,
            &[u(total), u(c), u(l.start_offset())],
        )?;
        Ok((out, Shape::from((n, h, w))))
    }
}

/// The affine coupling on channels-last tensors in one pass: h (N, H, W, C) is the step input
/// after its 1x1 conv, `net` (N, H, W, C) the coupling network's output with channels ordered
/// [shift..., raw...]. Returns y = [x_a, (x_b + shift) * sigmoid(raw + 2)] (N, H, W, C) and the
/// log-determinant per pixel, sum_c log sigmoid(raw + 2), as (N, H, W) (f32, or f64 for f64).
pub fn coupling_affine(h: &Tensor, net: &Tensor) -> Result<(Tensor, Tensor)> {
    let net = net.contiguous()?;
    let y = h.contiguous()?.apply_op2_no_bwd(&net, &CouplingApply)?;
    let acc = if net.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logdet = net.to_dtype(acc)?.apply_op1_no_bwd(&CouplingLogdet)?;
    Ok((y, logdet))
}

/// relu(x @ w) for x: (rows, k), w: (k, n). On CUDA in bf16 (or f32 with TF32 switched on) this
/// is one cuBLASLt call with a ReLU epilogue, so the wide hidden activations are written once;
/// elsewhere it is candle's matmul followed by relu.
pub fn matmul_relu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && cuda::lt_supported(x.dtype()) {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &cuda::MatmulRelu);
    }
    x.matmul(w)?.relu()
}

// ---------------------------------------------------------------------------------------------
// CUDA

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt::{
        Activation, CudaBlasLT, Matmul, MatmulConfig,
    };
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
    use candle_core::{CudaStorage, DType, Result, bail};
    use half::bf16;

    const MODULE: &str = "glowwatch_kernels";

    /// Kernels for float (f32), double (f64) and bf16 (as raw 16-bit words, so no CUDA headers
    /// are needed at run time). Accumulation is in float (double for f64).
    const SOURCE: &str = r#"
__device__ __forceinline__ float ld(const float* p, unsigned i) { return p[i]; }
__device__ __forceinline__ double ld(const double* p, unsigned i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short* p, unsigned i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, unsigned i, float v) { p[i] = v; }
__device__ __forceinline__ void st(double* p, unsigned i, double v) { p[i] = v; }
__device__ __forceinline__ void st(unsigned short* p, unsigned i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) { p[i] = (unsigned short)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (unsigned short)(u >> 16);
}

#define KERNELS(SUF, T, A) \
extern "C" __global__ void im2col_##SUF(const T* src, T* out, unsigned total, unsigned h, unsigned w, \
        unsigned c, unsigned s0, unsigned s1, unsigned s2, unsigned s3, unsigned off) { \
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= total) return; \
    unsigned k = 9 * c + 1, row = i / k, col = i % k; \
    if (col == 9 * c) { st(out, i, (A)1); return; } \
    unsigned t = col / c, ci = col % c, b = row / (h * w), y = (row / w) % h, x = row % w; \
    int yy = (int)y + (int)(t / 3) - 1, xx = (int)x + (int)(t % 3) - 1; \
    A v = 0; \
    if (yy >= 0 && xx >= 0 && yy < (int)h && xx < (int)w) \
        v = ld(src, off + b * s0 + (unsigned)yy * s1 + (unsigned)xx * s2 + ci * s3); \
    st(out, i, v); \
} \
extern "C" __global__ void tap_sum_##SUF(const T* src, T* out, unsigned total, unsigned h, unsigned w, \
        unsigned c, unsigned off) { \
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= total) return; \
    unsigned row = i / c, j = i % c, b = row / (h * w), y = (row / w) % h, x = row % w; \
    A acc = 0; \
    for (unsigned t = 0; t < 9; ++t) { \
        int yy = (int)y + (int)(t / 3) - 1, xx = (int)x + (int)(t % 3) - 1; \
        if (yy < 0 || xx < 0 || yy >= (int)h || xx >= (int)w) continue; \
        unsigned p = (b * h + (unsigned)yy) * w + (unsigned)xx; \
        acc += ld(src, off + (p * 9 + t) * c + j); \
    } \
    st(out, i, acc); \
} \
extern "C" __global__ void small_linear_##SUF(const T* x, const T* wt, const T* bias, T* out, \
        unsigned total, unsigned k, unsigned n, unsigned ox, unsigned ow, unsigned ob) { \
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= total) return; \
    unsigned r = i / n, j = i % n; \
    A acc = ld(bias, ob + j); \
    for (unsigned kk = 0; kk < k; ++kk) acc += ld(x, ox + r * k + kk) * ld(wt, ow + kk * n + j); \
    st(out, i, acc); \
}

#define COUPLING(SUF, T, A, LOG1P, EXP, FABS) \
extern "C" __global__ void coupling_apply_##SUF(const T* hin, const T* net, T* y, unsigned total, \
        unsigned c, unsigned oh, unsigned on) { \
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= total) return; \
    unsigned half = c / 2, j = i % c, p = i - j; \
    if (j < half) { st(y, i, ld(hin, oh + i)); return; } \
    A raw = ld(net, on + i) + (A)2; \
    A ls = (raw < (A)0 ? raw : (A)0) - LOG1P(EXP(-FABS(raw))); \
    st(y, i, (ld(hin, oh + i) + ld(net, on + p + (j - half))) * EXP(ls)); \
} \
extern "C" __global__ void coupling_logdet_##SUF(const T* net, T* out, unsigned total, unsigned c, \
        unsigned on) { \
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= total) return; \
    A acc = 0; \
    for (unsigned j = c / 2; j < c; ++j) { \
        A raw = ld(net, on + i * c + j) + (A)2; \
        acc += (raw < (A)0 ? raw : (A)0) - LOG1P(EXP(-FABS(raw))); \
    } \
    st(out, i, acc); \
}

KERNELS(f32, float, float)
KERNELS(f64, double, double)
KERNELS(bf16, unsigned short, float)
COUPLING(f32, float, float, log1pf, expf, fabsf)
COUPLING(f64, double, double, log1p, exp, fabs)
COUPLING(bf16, unsigned short, float, log1pf, expf, fabsf)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        match PTX.get_or_init(|| {
            compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| e.to_string())
        }) {
            Ok(s) => Ok(s.as_str()),
            Err(e) => bail!("NVRTC could not compile glowwatch kernels: {e}"),
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            d => bail!("glowwatch kernels: unsupported dtype {d:?}"),
        })
    }

    fn cfg(total: usize) -> LaunchConfig {
        LaunchConfig::for_num_elems(total as u32)
    }

    fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        inputs: &[&CudaStorage],
        name: &str,
        total: usize,
        args: &[u32],
    ) -> Result<CudaStorage> {
        let dev = &inputs[0].device;
        let func = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(inputs[0].dtype())?),
            MODULE,
            ptx()?,
        )?;
        let slices = inputs
            .iter()
            .map(|s| s.as_cuda_slice::<T>())
            .collect::<Result<Vec<&CudaSlice<T>>>>()?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let mut b = func.builder();
        for s in &slices {
            b.arg(*s);
        }
        b.arg(&out);
        for a in args {
            b.arg(a);
        }
        unsafe { b.launch(cfg(total)) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Launches kernel `name` (dtype suffix added) with one thread per output element:
    /// arguments are the input buffers, the output buffer, then `args`.
    pub fn launch(
        inputs: &[&CudaStorage],
        name: &str,
        total: usize,
        args: &[u32],
    ) -> Result<CudaStorage> {
        let dtype = inputs[0].dtype();
        if inputs.iter().any(|s| s.dtype() != dtype) {
            bail!("glowwatch kernels: mixed dtypes");
        }
        match dtype {
            DType::F32 => run::<f32>(inputs, name, total, args),
            DType::F64 => run::<f64>(inputs, name, total, args),
            DType::BF16 => run::<bf16>(inputs, name, total, args),
            d => bail!("glowwatch kernels: unsupported dtype {d:?}"),
        }
    }

    /// cuBLASLt's f32 path computes in TF32, so it is used for f32 only when TF32 is on.
    pub fn lt_supported(dtype: DType) -> bool {
        match dtype {
            DType::BF16 => true,
            DType::F32 => candle_core::cuda_backend::gemm_reduced_precision_f32(),
            _ => false,
        }
    }

    fn blas_lt(dev: &candle_core::CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
        static LT: std::sync::Mutex<
            Option<(
                candle_core::cuda_backend::DeviceId,
                std::sync::Arc<CudaBlasLT>,
            )>,
        > = std::sync::Mutex::new(None);
        let mut g = LT.lock().expect("cublasLt handle lock");
        if let Some((id, lt)) = g.as_ref() {
            if *id == dev.id() {
                return Ok(lt.clone());
            }
        }
        let lt = std::sync::Arc::new(
            CudaBlasLT::new(dev.cuda_stream())
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?,
        );
        *g = Some((dev.id(), lt.clone()));
        Ok(lt)
    }

    /// relu(x @ w) through one cuBLASLt matmul with a ReLU epilogue (row-major operands).
    pub struct MatmulRelu;

    fn lt_matmul_relu<T>(
        s1: &CudaStorage,
        l1: &candle_core::Layout,
        s2: &CudaStorage,
        l2: &candle_core::Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)>
    where
        T: DeviceRepr + candle_core::cuda_backend::CudaDType,
        CudaBlasLT: Matmul<T>,
    {
        let (rows, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 || !l1.is_contiguous() || !l2.is_contiguous() {
            bail!(
                "matmul_relu: bad operands {:?} @ {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let dev = &s1.device;
        let lt = blas_lt(dev)?;
        let x = s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..);
        let w = s2.as_cuda_slice::<T>()?.slice(l2.start_offset()..);
        let mut out = unsafe { dev.alloc::<T>(rows * n)? };
        // Row-major out (rows, n) is column-major out^T (n, rows) = w^T (n, k) x^T (k, rows).
        let cfg = MatmulConfig {
            transa: false,
            transb: false,
            transc: false,
            m: n as u64,
            n: rows as u64,
            k: k as u64,
            alpha: 1.0,
            lda: n as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        unsafe { lt.matmul(cfg, &w, &x, &mut out, None, Some(&Activation::Relu)) }
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            candle_core::Shape::from((rows, n)),
        ))
    }

    impl candle_core::CustomOp2 for MatmulRelu {
        fn name(&self) -> &'static str {
            "glowwatch-matmul-relu"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
            bail!("matmul_relu: the cuBLASLt op runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &candle_core::Layout,
            s2: &CudaStorage,
            l2: &candle_core::Layout,
        ) -> Result<(CudaStorage, candle_core::Shape)> {
            match s1.dtype() {
                DType::F32 => lt_matmul_relu::<f32>(s1, l1, s2, l2),
                DType::BF16 => lt_matmul_relu::<bf16>(s1, l1, s2, l2),
                d => bail!("matmul_relu: unsupported dtype {d:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::glow::flow::nhwc;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Plain candle formulation of the patches (the training path's), plus the ones column.
    fn im2col_reference(x: &Tensor) -> Tensor {
        let (n, h, w, _) = x.dims4().unwrap();
        let ones = Tensor::ones((n * h * w, 1), x.dtype(), x.device()).unwrap();
        Tensor::cat(&[&nhwc::im2col3x3(x).unwrap(), &ones], 1).unwrap()
    }

    fn tap_sum_reference(taps: &Tensor) -> Tensor {
        nhwc::tap_sum3x3(taps).unwrap()
    }

    #[test]
    fn im2col_matches_the_candle_formulation_on_strided_views() {
        let full = Tensor::randn(0f64, 1., (2, 5, 4, 6), &Device::Cpu).unwrap();
        for (start, len) in [(0, 3), (3, 3), (0, 6)] {
            let x = full.narrow(3, start, len).unwrap();
            let got = im2col3x3_ones(&x).unwrap();
            assert_eq!(got.dims(), &[40, 9 * len + 1]);
            assert_eq!(max_diff(&got, &im2col_reference(&x)), 0.0);
            let got32 = im2col3x3_ones(&x.to_dtype(DType::F32).unwrap()).unwrap();
            assert!(max_diff(&got32, &got) < 1e-6);
            let got16 = im2col3x3_ones(&x.to_dtype(DType::BF16).unwrap()).unwrap();
            assert!(max_diff(&got16, &got) < 2e-2);
        }
    }

    #[test]
    fn tap_sum_matches_the_candle_formulation() {
        let taps = Tensor::randn(0f64, 1., (2, 5, 4, 9, 3), &Device::Cpu).unwrap();
        let got = tap_sum3x3(&taps).unwrap();
        assert_eq!(got.dims(), &[2, 5, 4, 3]);
        assert!(max_diff(&got, &tap_sum_reference(&taps)) < 1e-12);
        let got32 = tap_sum3x3(&taps.to_dtype(DType::F32).unwrap()).unwrap();
        assert!(max_diff(&got32, &got) < 1e-5);
    }

    #[test]
    fn coupling_kernel_matches_the_reference_affine() {
        use crate::glow::coupling::affine_forward;
        let h = Tensor::randn(0f64, 1., (2, 3, 4, 6), &Device::Cpu).unwrap();
        let net = (Tensor::randn(0f64, 1., (2, 3, 4, 6), &Device::Cpu).unwrap() * 3.0).unwrap();
        let (y, ld) = coupling_affine(&h, &net).unwrap();
        // Reference in NCHW with the network output in its original interleaved order.
        let nchw = |t: &Tensor| t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let shift = net.narrow(3, 0, 3).unwrap();
        let raw = net.narrow(3, 3, 3).unwrap();
        let interleaved = Tensor::stack(&[&shift, &raw], 4)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let (yb, ld_ref) =
            affine_forward(&nchw(&h.narrow(3, 3, 3).unwrap()), &nchw(&interleaved)).unwrap();
        assert_eq!(
            max_diff(&y.narrow(3, 0, 3).unwrap(), &h.narrow(3, 0, 3).unwrap()),
            0.0
        );
        let yb_nhwc = yb.permute((0, 2, 3, 1)).unwrap();
        assert!(max_diff(&y.narrow(3, 3, 3).unwrap(), &yb_nhwc) < 1e-12);
        let ld_sum = ld.flatten_from(1).unwrap().sum(1).unwrap();
        assert!(max_diff(&ld_sum, &ld_ref) < 1e-10);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (y32, ld32) = coupling_affine(&f(&h), &f(&net)).unwrap();
        assert!(max_diff(&y32, &y) < 1e-5);
        assert!(max_diff(&ld32, &ld) < 1e-5);
        assert_eq!(ld32.dtype(), DType::F32);
    }

    #[test]
    fn small_linear_matches_matmul_plus_bias() {
        let x = Tensor::randn(0f64, 1., (37, 12), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f64, 1., (12, 7), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f64, 1., 7, &Device::Cpu).unwrap();
        let want = x.matmul(&w).unwrap().broadcast_add(&b).unwrap();
        assert!(max_diff(&small_linear(&x, &w, &b).unwrap(), &want) < 1e-12);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&small_linear(&f(&x), &f(&w), &f(&b)).unwrap(), &want) < 1e-4);
        assert!(small_linear(&x, &w.t().unwrap(), &b).is_err());
    }
}

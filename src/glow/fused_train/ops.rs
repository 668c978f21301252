//! Slice-level building blocks of the fused training path, channels-last `(n, H, W, C)` with
//! rows `(image, y, x)`: matrix products on the gemm crate (the kernels candle's CPU matmul
//! runs, AVX-512 where the CPU has it), 3x3 patch gathers and their adjoints, the squeeze
//! permutation and its inverse. Every function here is single-threaded: the fused path runs
//! one chunk of the batch per rayon thread.

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major (rows, cols) storage with row stride `cols`.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of row-major storage whose rows have `cols` entries.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "{what}: a ({rows}, {cols}) view with strides ({}, {}) needs {} values, has {}",
            self.rs,
            self.cs,
            last + 1,
            self.data.len()
        );
    }
}

/// `dst (m, n, row-major) = a (m, k) @ b (k, n)`, or `dst += a @ b` with `accumulate`.
/// Panics when a view or `dst` is too short for the shapes (a bug, never data).
pub fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, a: View, b: View, accumulate: bool) {
    assert!(
        dst.len() >= m * n,
        "matmul: dst has {} values, needs {}",
        dst.len(),
        m * n
    );
    a.check(m, k, "matmul lhs");
    b.check(k, n, "matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the checks above keep every index gemm touches inside the three slices; dst is
    // borrowed mutably, so it cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// How a layer's weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// (in, out) row-major: the layer computes `y = x @ w`.
    InOut,
    /// (out, in) row-major, a conv's own layout: the layer computes `y = x @ w^T`.
    OutIn,
}

/// A linear layer `y (rows, n) = x (rows, k) @ M` with M (k, n) stored as `stored` in `w`.
pub fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    stored: Stored,
    rows: usize,
    k: usize,
    n: usize,
) {
    let m = match stored {
        Stored::InOut => View::rows(w, n),
        Stored::OutIn => View::transposed(w, k),
    };
    matmul(y, rows, n, k, View::rows(x, k), m, false);
}

/// Backward of [`linear`]: adds dL/dM to `gw` (stored like `w`) and writes `dx = dy @ M^T`.
#[allow(clippy::too_many_arguments)] // the forward's operands plus the two gradients
pub fn linear_backward(
    dx: &mut [f32],
    gw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    stored: Stored,
    rows: usize,
    k: usize,
    n: usize,
) {
    match stored {
        Stored::InOut => {
            matmul(
                gw,
                k,
                n,
                rows,
                View::transposed(x, k),
                View::rows(dy, n),
                true,
            );
            matmul(
                dx,
                rows,
                k,
                n,
                View::rows(dy, n),
                View::transposed(w, n),
                false,
            );
        }
        Stored::OutIn => {
            matmul(
                gw,
                n,
                k,
                rows,
                View::transposed(dy, n),
                View::rows(x, k),
                true,
            );
            matmul(dx, rows, k, n, View::rows(dy, n), View::rows(w, k), false);
        }
    }
}

/// Spatial layout of one chunk: `n` images of `h` x `w` pixels.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

impl Grid {
    /// Rows of a channels-last matrix over this grid.
    pub fn rows(&self) -> usize {
        self.n * self.h * self.w
    }

    /// Calls `f(dst_row, src_row, len, tap)` for every run of `len` horizontally adjacent
    /// in-bounds pairs of a 3x3 neighbourhood: `src_row + i` is pixel
    /// (y + dy - 1, x + dx - 1) of `dst_row + i`'s image, tap = 3 dy + dx, or
    /// (y - dy + 1, x - dx + 1) when `mirrored` (the adjoint's direction).
    fn for_each_run(&self, mirrored: bool, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (h, w) = (self.h as isize, self.w as isize);
        for img in 0..self.n {
            let base = (img * self.h * self.w) as isize;
            for t in 0..9 {
                let (mut dy, mut dx) = ((t / 3) as isize - 1, (t % 3) as isize - 1);
                if mirrored {
                    (dy, dx) = (-dy, -dx);
                }
                let (x0, x1) = ((-dx).max(0), (w - dx).min(w));
                for y in (-dy).max(0)..(h - dy).min(h) {
                    let dst = base + y * w + x0;
                    let src = dst + dy * w + dx;
                    f(dst as usize, src as usize, (x1 - x0) as usize, t);
                }
            }
        }
    }

    /// 3x3 zero-padded patches of channels `[0, c)` of `src` (row stride `src_cols`) into
    /// `dst` (rows, 9c), columns (tap, channel). With `mirrored`, tap t reads the pixel at the
    /// opposite offset: the patches of the adjoint of [`Grid::tap_sum`].
    pub fn im2col(&self, src: &[f32], src_cols: usize, c: usize, mirrored: bool, dst: &mut [f32]) {
        dst[..self.rows() * 9 * c].fill(0.0);
        self.for_each_run(mirrored, |d, s, len, t| {
            let dst = dst[d * 9 * c..(d + len) * 9 * c].chunks_exact_mut(9 * c);
            for (dr, sr) in dst.zip(src[s * src_cols..].chunks(src_cols)) {
                dr[t * c..(t + 1) * c].copy_from_slice(&sr[..c]);
            }
        });
    }

    /// Adjoint of [`Grid::im2col`] (not mirrored): adds each patch entry back to the pixel it
    /// was read from, into channels `[0, c)` of `dst` (row stride `dst_cols`).
    pub fn col2im_add(&self, cols: &[f32], c: usize, dst: &mut [f32], dst_cols: usize) {
        self.for_each_run(false, |d, s, len, t| {
            let from = cols[d * 9 * c..(d + len) * 9 * c].chunks_exact(9 * c);
            for (sr, dr) in from.zip(dst[s * dst_cols..].chunks_mut(dst_cols)) {
                for (v, g) in dr[..c].iter_mut().zip(&sr[t * c..(t + 1) * c]) {
                    *v += g;
                }
            }
        });
    }

    /// Per-tap partial convolutions `taps` (rows, 9c) -> `dst` (rows, c):
    /// `dst[y, x] = sum_t taps[(y + dy - 1, x + dx - 1), t]`, the 3x3 convolution's sum.
    pub fn tap_sum(&self, taps: &[f32], c: usize, dst: &mut [f32]) {
        dst[..self.rows() * c].fill(0.0);
        self.for_each_run(false, |d, s, len, t| {
            let from = taps[s * 9 * c..(s + len) * 9 * c].chunks_exact(9 * c);
            for (sr, dr) in from.zip(dst[d * c..(d + len) * c].chunks_exact_mut(c)) {
                for (v, g) in dr.iter_mut().zip(&sr[t * c..(t + 1) * c]) {
                    *v += g;
                }
            }
        });
    }

    /// (n, h, w, c) -> (n, h/2, w/2, 4c), channel `c*4 + 2i + j` (method.md's squeeze order).
    pub fn squeeze(&self, src: &[f32], c: usize, dst: &mut [f32]) {
        self.squeeze_map(c, |s, d| dst[d] = src[s]);
    }

    /// Exact inverse (and adjoint) of [`Grid::squeeze`]; `self` is the unsqueezed grid.
    pub fn unsqueeze(&self, src: &[f32], c: usize, dst: &mut [f32]) {
        self.squeeze_map(c, |s, d| dst[s] = src[d]);
    }

    fn squeeze_map(&self, c: usize, mut f: impl FnMut(usize, usize)) {
        let (h2, w2) = (self.h / 2, self.w / 2);
        for img in 0..self.n {
            for y in 0..self.h {
                for x in 0..self.w {
                    let s = ((img * self.h + y) * self.w + x) * c;
                    let d = ((img * h2 + y / 2) * w2 + x / 2) * 4 * c + 2 * (y % 2) + x % 2;
                    for ch in 0..c {
                        f(s + ch, d + 4 * ch);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_the_naive_product_for_transposed_views_and_accumulation() {
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|v| 1.0 - v as f32 * 0.25).collect();
        let want = naive(&a, &b, m, n, k);
        let mut c = vec![0.0; m * n];
        matmul(&mut c, m, n, k, View::rows(&a, k), View::rows(&b, n), false);
        assert_eq!(c, want);
        // b^T stored row-major (n, k), read through a transposed view.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(
            &mut c,
            m,
            n,
            k,
            View::rows(&a, k),
            View::transposed(&bt, k),
            true,
        );
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert_eq!(c, twice);
    }

    #[test]
    fn linear_backward_gives_the_gradients_of_a_dot_product_for_both_weight_layouts() {
        // L = <dy, x @ M>: dL/dM = x^T dy, dL/dx = dy M^T, checked by finite differences
        // (exact here: L is linear in each).
        let (rows, k, n) = (4, 3, 2);
        let x: Vec<f32> = (0..rows * k).map(|v| (v as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.3).cos()).collect();
        let dy: Vec<f32> = (0..rows * n).map(|v| v as f32 * 0.1 - 0.3).collect();
        for stored in [Stored::InOut, Stored::OutIn] {
            let loss = |x: &[f32], w: &[f32]| {
                let mut y = vec![0.0; rows * n];
                linear(&mut y, x, w, stored, rows, k, n);
                y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
            };
            let (mut dx, mut gw) = (vec![0.0; rows * k], vec![0.0; k * n]);
            linear_backward(&mut dx, &mut gw, &dy, &x, &w, stored, rows, k, n);
            for i in 0..w.len() {
                let mut w1 = w.clone();
                w1[i] += 1.0;
                assert!((loss(&x, &w1) - loss(&x, &w) - gw[i] as f64).abs() < 1e-5);
            }
            for i in 0..x.len() {
                let mut x1 = x.clone();
                x1[i] += 1.0;
                assert!((loss(&x1, &w) - loss(&x, &w) - dx[i] as f64).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col_and_mirrored_patches_the_adjoint_of_tap_sum() {
        let g = Grid { n: 2, h: 3, w: 4 };
        let c = 2;
        let x: Vec<f32> = (0..g.rows() * c).map(|v| (v as f32 * 0.37).sin()).collect();
        let u: Vec<f32> = (0..g.rows() * 9 * c)
            .map(|v| (v as f32 * 0.11).cos())
            .collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p * q) as f64).sum::<f64>();
        // <im2col(x), u> = <x, col2im(u)>
        let mut p = vec![0.0; g.rows() * 9 * c];
        g.im2col(&x, c, c, false, &mut p);
        let mut back = vec![0.0; g.rows() * c];
        g.col2im_add(&u, c, &mut back, c);
        assert!((dot(&p, &u) - dot(&x, &back)).abs() < 1e-5);
        // <tap_sum(u), x> = <u, im2col_mirrored(x)>
        let mut s = vec![0.0; g.rows() * c];
        g.tap_sum(&u, c, &mut s);
        g.im2col(&x, c, c, true, &mut p);
        assert!((dot(&s, &x) - dot(&u, &p)).abs() < 1e-5);
    }

    #[test]
    fn unsqueeze_inverts_squeeze_in_the_c4_2i_j_order() {
        let g = Grid { n: 1, h: 4, w: 4 };
        let c = 2;
        // Channels-last pixel (y, x, ch) holds ch * 16 + y * 4 + x.
        let x: Vec<f32> = (0..32).map(|i| ((i % 2) * 16 + i / 2) as f32).collect();
        let mut s = vec![0.0; 32];
        g.squeeze(&x, c, &mut s);
        // Output pixel (0, 1), channel 1*4 + 2*1 + 0: input (y 1, x 2), channel 1.
        assert_eq!(s[8 + 6], (16 + 4 + 2) as f32);
        let mut back = vec![0.0; 32];
        g.unsqueeze(&s, c, &mut back);
        assert_eq!(back, x);
    }
}

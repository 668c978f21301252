//! One chunk of the batch through the flow, forward with a tape and backward from it, on one
//! thread. The forward computes exactly the operations of [`crate::glow::Glow::scale_log_p`]
//! (same layer definitions, channels-last, f32 activations, per-sample sums in f64); the
//! backward is their hand-written adjoint (the chain rule of each layer, written out in the
//! comments), so one step costs 3 matmuls forward and 6 backward per convolution plus a few
//! passes over the activations, with every buffer reused from step to step.

use super::ops::{Grid, Stored, linear, linear_backward};
use super::params::{ExitParams, Params, StepParams};
use crate::glow::HALF_LN_2PI;

/// What the backward pass of one flow step needs from its forward pass.
#[derive(Debug, Default)]
pub(super) struct StepTape {
    /// Output of the 1x1 conv, (rows, C).
    h1: Vec<f32>,
    /// 3x3 patches of x_a = h1[:, :C/2], (rows, 9 C/2).
    pat: Vec<f32>,
    /// First coupling conv after its ActNorm and ReLU, (rows, hidden).
    r1: Vec<f32>,
    /// Second coupling conv after its ActNorm and ReLU, (rows, hidden).
    r2: Vec<f32>,
    /// Last coupling conv's tap sum before bias and scale, (rows, C).
    net: Vec<f32>,
}

/// Buffers reused by every step of a chunk (contents never carried between uses).
#[derive(Debug, Default)]
struct Scratch {
    t: Vec<f32>,
    wide: Vec<f32>,
    d1: Vec<f32>,
    d2: Vec<f32>,
    dh1: Vec<f32>,
    dout: Vec<f32>,
    dx: Vec<f32>,
    drest: Vec<f32>,
}

/// A chunk's tape: per scale the K + 1 activations between steps (`xs[0]` is the squeezed
/// input, `xs[j + 1]` step j's output) and the step tapes.
#[derive(Debug, Default)]
pub(super) struct ChunkTape {
    n: usize,
    xs: Vec<Vec<Vec<f32>>>,
    steps: Vec<Vec<StepTape>>,
    scratch: Scratch,
}

/// Resizes `v` to `len` values and returns them (old contents are not cleared: callers
/// overwrite every value or clear what they accumulate into).
fn buf(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    &mut v[..len]
}

/// `xs[a]` to read and `xs[b]` to write (a != b).
fn pair(xs: &mut [Vec<f32>], a: usize, b: usize) -> (&[f32], &mut Vec<f32>) {
    if a < b {
        let (lo, hi) = xs.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = xs.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// log(sigmoid(u)) = min(u, 0) - log(1 + exp(-|u|)) in f32, as [`crate::glow::log_sigmoid`].
fn log_sigmoid(u: f32) -> f32 {
    u.min(0.0) - ((-u.abs()).exp() + 1.0).ln()
}

/// The shift, log-scale and scale of coupling output pair i of a row of `net`.
#[inline]
fn affine_terms(p: &StepParams, net: &[f32], i: usize) -> (f32, f32, f32) {
    let shift = (net[2 * i] + p.b3[2 * i]) * p.s3[2 * i];
    let raw = (net[2 * i + 1] + p.b3[2 * i + 1]) * p.s3[2 * i + 1];
    let ls = log_sigmoid(raw + 2.0);
    (shift, ls, ls.exp())
}

// The elementwise passes below zip equal-length slices so the compiler drops the bounds
// checks and vectorises across the channels of a row, and run under `simd` so that
// vectorisation uses the widest instructions the CPU has (the crate is built for x86-64's
// baseline SSE2).

/// Runs `f` compiled for the best instruction set available at run time (pulp's dispatch:
/// AVX-512, AVX2 + FMA or the baseline), detected once per process.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// t = (x + loc) * s per column of (rows, cols) matrices (the ActNorm).
fn actnorm(x: &[f32], loc: &[f32], s: &[f32], t: &mut [f32]) {
    simd(|| {
        let cols = loc.len();
        for (tr, xr) in t.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            for (((t, &x), &l), &s) in tr.iter_mut().zip(xr).zip(loc).zip(s) {
                *t = (x + l) * s;
            }
        }
    })
}

/// Backward of [`actnorm`] in place: `d` holds dL/dt and becomes dL/dx; dL/dloc and dL/ds
/// are added to `gloc`, `gs`.
fn actnorm_backward(
    x: &[f32],
    loc: &[f32],
    s: &[f32],
    d: &mut [f32],
    gloc: &mut [f32],
    gs: &mut [f32],
) {
    simd(|| {
        let cols = loc.len();
        for (dr, xr) in d.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            let it = dr
                .iter_mut()
                .zip(xr)
                .zip(loc.iter().zip(s))
                .zip(gloc.iter_mut().zip(gs.iter_mut()));
            for (((d, &x), (&l, &s)), (gl, gs)) in it {
                *gs += *d * (x + l);
                *gl += *d * s;
                *d *= s;
            }
        }
    })
}

/// In place a -> relu((a + loc) * s) per column of (rows, cols) matrices.
fn norm_relu(a: &mut [f32], loc: &[f32], s: &[f32]) {
    simd(|| {
        let cols = loc.len();
        for ar in a.chunks_exact_mut(cols) {
            for ((a, &l), &s) in ar.iter_mut().zip(loc).zip(s) {
                *a = ((*a + l) * s).max(0.0);
            }
        }
    })
}

/// Backward of [`norm_relu`] from its output `r`, in place: `d` holds dL/dr and becomes
/// dL/da; dL/dloc and dL/ds are added to `gloc`, `gs`. Where the ReLU passes, r = (a + loc) s,
/// so dL/ds = sum dz r / s needs no copy of a.
fn norm_relu_backward(
    r: &[f32],
    loc: &[f32],
    s: &[f32],
    d: &mut [f32],
    gloc: &mut [f32],
    gs: &mut [f32],
) {
    simd(|| {
        let cols = loc.len();
        let mut dz_r = vec![0.0f32; cols];
        for (dr, rr) in d.chunks_exact_mut(cols).zip(r.chunks_exact(cols)) {
            let it = dr
                .iter_mut()
                .zip(rr)
                .zip(s)
                .zip(gloc.iter_mut().zip(dz_r.iter_mut()));
            for (((d, &r), &s), (gl, acc)) in it {
                let dz = if r > 0.0 { *d } else { 0.0 };
                *acc += dz * r;
                *gl += dz * s;
                *d = dz * s;
            }
        }
        for ((g, acc), s) in gs.iter_mut().zip(dz_r).zip(s) {
            *g += acc / s;
        }
    })
}

impl ChunkTape {
    /// Forward pass of `n` images `x` (n, C, S, S) in NCHW order: adds lp_k of image i to
    /// `lp[i * L + k]` (without the parameter-only terms: log-determinants of the ActNorms,
    /// 1x1 convs and exits, which the callers add). With `record`, keeps every step's
    /// activations for [`ChunkTape::backward`]; without, reuses one step's buffers throughout
    /// (inference: memory independent of the number of steps).
    pub(super) fn forward(
        &mut self,
        p: &Params,
        x: &[f32],
        n: usize,
        lp: &mut [f64],
        record: bool,
    ) {
        let (cin, size, levels) = (p.in_channels, p.image_size, p.scales.len());
        self.n = n;
        self.xs.resize_with(levels, Vec::new);
        self.steps.resize_with(levels, Vec::new);
        // NCHW -> NHWC.
        let mut cur = std::mem::take(&mut self.scratch.drest);
        let plane = size * size;
        buf(&mut cur, n * cin * plane);
        for img in 0..n {
            for ch in 0..cin {
                for q in 0..plane {
                    cur[(img * plane + q) * cin + ch] = x[(img * cin + ch) * plane + q];
                }
            }
        }
        let (mut side, mut c_in) = (size, cin);
        for (k, sp) in p.scales.iter().enumerate() {
            let sh = sp.shape;
            let g = Grid {
                n,
                h: sh.size,
                w: sh.size,
            };
            let (c, rows, steps) = (sh.channels, g.rows(), sp.steps.len());
            // Activation j lives in xs[j] when recording, else in xs[j % 2].
            let slot = |j: usize| if record { j } else { j % 2 };
            let xs = &mut self.xs[k];
            xs.resize_with(if record { steps + 1 } else { 2 }, Vec::new);
            Grid {
                n,
                h: side,
                w: side,
            }
            .squeeze(&cur, c_in, buf(&mut xs[0], rows * c));
            self.steps[k].resize_with(if record { steps } else { 1 }, StepTape::default);
            for (j, step) in sp.steps.iter().enumerate() {
                let (x0, out) = pair(xs, slot(j), slot(j + 1));
                let tape = &mut self.steps[k][if record { j } else { 0 }];
                step_forward(
                    step,
                    g,
                    c,
                    p.hidden,
                    x0,
                    out,
                    tape,
                    &mut self.scratch,
                    |r, ls| {
                        lp[(r / (sh.size * sh.size)) * levels + k] += ls as f64;
                    },
                );
            }
            let out = &xs[slot(steps)];
            exit_forward(&sp.exit, g, c, sh.exit_channels, out, |img, v| {
                lp[img * levels + k] += v
            });
            // The channels that stay flow on to the next scale.
            let rest = c - sh.exit_channels;
            let dst = buf(&mut cur, rows * rest);
            for r in 0..rows {
                dst[r * rest..(r + 1) * rest]
                    .copy_from_slice(&out[r * c + sh.exit_channels..(r + 1) * c]);
            }
            (side, c_in) = (sh.size, rest);
        }
        self.scratch.drest = cur;
    }

    /// Backward pass from dL/dlp `dlp` (n, L) for this chunk's images: adds dL/dθ of every
    /// effective parameter to `g`.
    pub(super) fn backward(&mut self, p: &Params, dlp: &[f64], g: &mut Params) {
        let (n, levels) = (self.n, p.scales.len());
        let sc = &mut self.scratch;
        let mut have_rest = false;
        for k in (0..levels).rev() {
            let (sp, gp) = (&p.scales[k], &mut g.scales[k]);
            let sh = sp.shape;
            let grid = Grid {
                n,
                h: sh.size,
                w: sh.size,
            };
            let (c, ce, rows) = (sh.channels, sh.exit_channels, grid.rows());
            let dl: Vec<f32> = (0..n).map(|i| dlp[i * levels + k] as f32).collect();
            let xs = &self.xs[k];
            let mut dout = std::mem::take(&mut sc.dout);
            buf(&mut dout, rows * c);
            exit_backward(
                &sp.exit,
                &mut gp.exit,
                grid,
                c,
                ce,
                &xs[sp.steps.len()],
                &dl,
                &mut dout,
            );
            if ce < c {
                let rest = c - ce;
                for r in 0..rows {
                    let d = &mut dout[r * c + ce..(r + 1) * c];
                    if have_rest {
                        d.copy_from_slice(&sc.drest[r * rest..(r + 1) * rest]);
                    } else {
                        d.fill(0.0);
                    }
                }
            }
            let mut dx = std::mem::take(&mut sc.dx);
            for j in (0..sp.steps.len()).rev() {
                step_backward(
                    &sp.steps[j],
                    &mut gp.steps[j],
                    grid,
                    c,
                    p.hidden,
                    &xs[j],
                    &xs[j + 1],
                    &self.steps[k][j],
                    &dl,
                    &dout,
                    &mut dx,
                    sc,
                );
                std::mem::swap(&mut dout, &mut dx);
            }
            // dout now holds dL/d(squeezed input): unsqueeze onto the finer grid.
            if k > 0 {
                let fine = Grid {
                    n,
                    h: 2 * sh.size,
                    w: 2 * sh.size,
                };
                fine.unsqueeze(&dout, c / 4, buf(&mut sc.drest, rows * c));
                have_rest = true;
            }
            sc.dout = dout;
            sc.dx = dx;
        }
    }
}

/// One flow step forward: x0 -> ActNorm -> 1x1 conv -> affine coupling -> `out`;
/// `on_logdet(row, log s)` sees every coupling log-scale.
#[allow(clippy::too_many_arguments)] // one step's operands; grouping them would only rename them
fn step_forward(
    p: &StepParams,
    g: Grid,
    c: usize,
    hd: usize,
    x0: &[f32],
    out: &mut Vec<f32>,
    tape: &mut StepTape,
    sc: &mut Scratch,
    mut on_logdet: impl FnMut(usize, f32),
) {
    let (rows, half) = (g.rows(), c / 2);
    let t = buf(&mut sc.t, rows * c);
    actnorm(x0, &p.an_loc, &p.an_s, t);
    let h1 = buf(&mut tape.h1, rows * c);
    linear(h1, t, &p.w, Stored::OutIn, rows, c, c);
    let pat = buf(&mut tape.pat, rows * 9 * half);
    g.im2col(h1, c, half, false, pat);
    let r1 = buf(&mut tape.r1, rows * hd);
    linear(r1, pat, &p.w1, Stored::InOut, rows, 9 * half, hd);
    norm_relu(r1, &p.n1_loc, &p.n1_s);
    let r2 = buf(&mut tape.r2, rows * hd);
    linear(r2, r1, &p.w2, Stored::OutIn, rows, hd, hd);
    norm_relu(r2, &p.n2_loc, &p.n2_s);
    let taps = buf(&mut sc.wide, rows * 9 * c);
    linear(taps, r2, &p.w3, Stored::InOut, rows, hd, 9 * c);
    let net = buf(&mut tape.net, rows * c);
    g.tap_sum(taps, c, net);
    let o = buf(out, rows * c);
    let rows_in = h1.chunks_exact(c).zip(net.chunks_exact(c));
    for (r, ((hr, nr), or)) in rows_in.zip(o.chunks_exact_mut(c)).enumerate() {
        or[..half].copy_from_slice(&hr[..half]);
        for i in 0..half {
            let (shift, ls, s) = affine_terms(p, nr, i);
            or[half + i] = (hr[half + i] + shift) * s;
            on_logdet(r, ls);
        }
    }
}

/// One flow step backward: from dL/d(out) `dout` to dL/dx0 in `dx`, parameter gradients
/// added to `gp`; `dl[img]` = dL/dlp_k of each image (the coupling log-determinant's weight).
#[allow(clippy::too_many_arguments)] // as step_forward, plus the gradients
fn step_backward(
    p: &StepParams,
    gp: &mut StepParams,
    g: Grid,
    c: usize,
    hd: usize,
    x0: &[f32],
    out: &[f32],
    tape: &StepTape,
    dl: &[f32],
    dout: &[f32],
    dx: &mut Vec<f32>,
    sc: &mut Scratch,
) {
    let (rows, half) = (g.rows(), c / 2);
    let dh1 = buf(&mut sc.dh1, rows * c);
    let dnet = buf(&mut sc.d1, rows * c);
    affine_backward(p, gp, g, c, tape, out, dl, dout, dh1, dnet);
    // net = tap_sum(r2 @ W3): dtaps = mirrored patches of dnet.
    let (r1, r2) = (&tape.r1, &tape.r2);
    let dtaps = buf(&mut sc.wide, rows * 9 * c);
    g.im2col(dnet, c, c, true, dtaps);
    let d2 = buf(&mut sc.d2, rows * hd);
    linear_backward(
        d2,
        &mut gp.w3,
        dtaps,
        r2,
        &p.w3,
        Stored::InOut,
        rows,
        hd,
        9 * c,
    );
    norm_relu_backward(r2, &p.n2_loc, &p.n2_s, d2, &mut gp.n2_loc, &mut gp.n2_s);
    let d1 = buf(&mut sc.d1, rows * hd);
    linear_backward(d1, &mut gp.w2, d2, r1, &p.w2, Stored::OutIn, rows, hd, hd);
    norm_relu_backward(r1, &p.n1_loc, &p.n1_s, d1, &mut gp.n1_loc, &mut gp.n1_s);
    // a1 = patches(x_a) @ W1: the patches' gradient goes back to x_a's pixels.
    let dpat = buf(&mut sc.wide, rows * 9 * half);
    linear_backward(
        dpat,
        &mut gp.w1,
        d1,
        &tape.pat,
        &p.w1,
        Stored::InOut,
        rows,
        9 * half,
        hd,
    );
    g.col2im_add(dpat, half, dh1, c);
    // h1 = ActNorm(x0) @ W^T.
    let t = buf(&mut sc.t, rows * c);
    actnorm(x0, &p.an_loc, &p.an_s, t);
    let dt = buf(dx, rows * c);
    linear_backward(dt, &mut gp.w, dh1, t, &p.w, Stored::OutIn, rows, c, c);
    actnorm_backward(x0, &p.an_loc, &p.an_s, dt, &mut gp.an_loc, &mut gp.an_s);
}

/// Backward of the affine coupling `y_b = (x_b + shift) s`, `s = sigmoid(raw + 2)`,
/// `lp += log s`, with `(shift, raw)` = `(net + b3) s3` interleaved: dx_b = dy s,
/// dshift = dy s, dlog s = dy y_b + dlp, draw = dlog s (1 - s). Writes dL/dh1 (x_a passes
/// through; the network's share is added later) and dL/dnet; adds dL/db3, dL/ds3 to `gp`.
#[allow(clippy::too_many_arguments)] // the coupling's operands and gradients
fn affine_backward(
    p: &StepParams,
    gp: &mut StepParams,
    g: Grid,
    c: usize,
    tape: &StepTape,
    out: &[f32],
    dl: &[f32],
    dout: &[f32],
    dh1: &mut [f32],
    dnet: &mut [f32],
) {
    let (half, hw) = (c / 2, g.h * g.w);
    let rows = dout
        .chunks_exact(c)
        .zip(out.chunks_exact(c))
        .zip(tape.net.chunks_exact(c));
    let grads = dh1.chunks_exact_mut(c).zip(dnet.chunks_exact_mut(c));
    for (r, (((dor, orow), nr), (dhr, dnr))) in rows.zip(grads).enumerate() {
        let dlr = dl[r / hw];
        dhr[..half].copy_from_slice(&dor[..half]);
        for i in 0..half {
            let (_, _, s) = affine_terms(p, nr, i);
            let dy = dor[half + i];
            dhr[half + i] = dy * s;
            let draw = (dy * orow[half + i] + dlr) * (1.0 - s);
            for (ch, d_o) in [(2 * i, dy * s), (2 * i + 1, draw)] {
                gp.s3[ch] += d_o * (nr[ch] + p.b3[ch]);
                gp.b3[ch] += d_o * p.s3[ch];
                dnr[ch] = d_o * p.s3[ch];
            }
        }
    }
}

/// Exit forward: y = (z + loc) * s per dimension over the first `ce` channels of `out`;
/// `on_prior(img, log N(y; 0, I))` once per image.
fn exit_forward(
    e: &ExitParams,
    g: Grid,
    c: usize,
    ce: usize,
    out: &[f32],
    mut on_prior: impl FnMut(usize, f64),
) {
    let hw = g.h * g.w;
    for img in 0..g.n {
        let mut sq = 0.0f64;
        for q in 0..hw {
            let z = &out[(img * hw + q) * c..(img * hw + q) * c + ce];
            for (ch, zv) in z.iter().enumerate() {
                let d = q * ce + ch;
                let y = ((zv + e.loc[d]) * e.s[d]) as f64;
                sq += y * y;
            }
        }
        on_prior(img, -0.5 * sq - (hw * ce) as f64 * HALF_LN_2PI);
    }
}

/// Exit backward: dy = -y dlp (the N(0, I) log-density's gradient), written as dL/dz into
/// the first `ce` channels of `dout`; dL/dloc and dL/ds added to `ge`.
#[allow(clippy::too_many_arguments)] // the exit's operands and gradients
fn exit_backward(
    e: &ExitParams,
    ge: &mut ExitParams,
    g: Grid,
    c: usize,
    ce: usize,
    out: &[f32],
    dl: &[f32],
    dout: &mut [f32],
) {
    let hw = g.h * g.w;
    for (img, &dl) in dl.iter().enumerate().take(g.n) {
        for q in 0..hw {
            let r = img * hw + q;
            for ch in 0..ce {
                let d = q * ce + ch;
                let zl = out[r * c + ch] + e.loc[d];
                let dy = -(zl * e.s[d]) * dl;
                ge.s[d] += dy * zl;
                ge.loc[d] += dy * e.s[d];
                dout[r * c + ch] = dy * e.s[d];
            }
        }
    }
}

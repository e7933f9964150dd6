//! The dense convolution: im2col and GEMM (the `gemm` crate) over the live channels only —
//! the output channels with a nonzero (the rows of the compact weight matrix) and the input
//! channels with a nonzero (its columns, `taps` each) — which is the "dense convolution over
//! empty channels" speed-up. It runs every conv op for the `dense` strategy, and
//! `conv_dense_grad` (every channel) for every strategy.
//!
//! Output positions are taken in chunks whose im2col matrix (`live input channels · k²` rows
//! × `positions · batch` columns) stays within [`CHUNK_FLOATS`]; each chunk is one GEMM, its
//! result scattered into the feature-major output (`conv`), added back through the taps
//! (`conv_t`), or accumulated into the compact gradient (`conv_grad`, `conv_dense_grad`).

use std::sync::Mutex;

use sparse_ir::{ConvGeometry, Pattern};

use crate::conv::{Direction, Sides};
use crate::dense::{gemm_par, Par, View};

/// The most floats of one chunk's im2col matrix (4 MiB).
const CHUNK_FLOATS: usize = 1 << 20;

/// Scratch matrices reused between runs.
#[derive(Default)]
struct Scratch {
    /// The compact weights, live output channels × (live input channels · taps).
    w: Vec<f32>,
    /// One chunk's im2col matrix (or its gradient, for `conv_t`).
    col: Vec<f32>,
    /// One chunk of the live output channels (`Y` computed, or `dY` gathered).
    out: Vec<f32>,
    /// The compact weight gradient.
    grad: Vec<f32>,
}

/// What a dense convolution launch computes.
pub(crate) enum DenseConvArgs<'a> {
    /// `Y = conv(X) (+ bias) (ReLU)`.
    Forward {
        /// Weight values in the pattern's order.
        values: &'a [f32],
        /// Input.
        x: &'a [f32],
        /// Bias per output channel.
        bias: Option<&'a [f32]>,
        /// Apply ReLU.
        relu: bool,
        /// Output.
        y: &'a mut [f32],
    },
    /// `dX = conv_t(dY)`.
    BackwardData {
        /// Weight values.
        values: &'a [f32],
        /// Upstream gradient.
        dy: &'a [f32],
        /// Output.
        dx: &'a mut [f32],
    },
    /// `dW[k]` for the pattern's nonzeros.
    WeightGrad {
        /// Upstream gradient.
        dy: &'a [f32],
        /// Layer input.
        x: &'a [f32],
        /// Output, `nnz`.
        dw: &'a mut [f32],
    },
    /// The dense gradient of every weight, `out × C·k²`.
    DenseGrad {
        /// Upstream gradient.
        dy: &'a [f32],
        /// Layer input.
        x: &'a [f32],
        /// Output.
        grad: &'a mut [f32],
    },
}

/// The compiled dense convolution of one pattern (or of every channel, for
/// `conv_dense_grad`).
pub(crate) struct DenseConv {
    sides: Sides,
    g: ConvGeometry,
    out_channels: usize,
    /// Output channels with a nonzero.
    live_out: Vec<u32>,
    /// Input channels with a nonzero.
    live_in: Vec<u32>,
    /// Position of nonzero `k` in the compact weight matrix.
    pos: Vec<u32>,
    scratch: Mutex<Scratch>,
}

impl DenseConv {
    /// The dense convolution of `p`'s live channels.
    pub(crate) fn new(p: &Pattern, g: &ConvGeometry) -> DenseConv {
        let taps = g.taps();
        let live_out: Vec<u32> = (0..p.rows())
            .filter(|&o| !p.row_range(o).is_empty())
            .map(|o| o as u32)
            .collect();
        let mut used = vec![false; g.in_channels];
        for &c in p.col_idx() {
            used[c as usize / taps] = true;
        }
        let live_in: Vec<u32> = (0..g.in_channels)
            .filter(|&c| used[c])
            .map(|c| c as u32)
            .collect();
        let mut in_index = vec![0u32; g.in_channels];
        for (i, &c) in live_in.iter().enumerate() {
            in_index[c as usize] = i as u32;
        }
        let kc = live_in.len() * taps;
        let mut pos = Vec::with_capacity(p.nnz());
        for (row, &o) in live_out.iter().enumerate() {
            for &col in p.row(o as usize) {
                let (c, t) = (col as usize / taps, col as usize % taps);
                pos.push((row * kc + in_index[c] as usize * taps + t) as u32);
            }
        }
        DenseConv {
            sides: Sides::new(*g, Direction::Forward),
            g: *g,
            out_channels: p.rows(),
            live_out,
            live_in,
            pos,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// Every channel live: `conv_dense_grad`'s shape for `out_channels`.
    pub(crate) fn all_channels(out_channels: usize, g: &ConvGeometry) -> DenseConv {
        let p = Pattern::empty(out_channels, g.pattern_cols()).expect("the spec's shape");
        DenseConv {
            live_out: (0..out_channels as u32).collect(),
            live_in: (0..g.in_channels as u32).collect(),
            ..DenseConv::new(&p, g)
        }
    }

    /// Runs one launch (lengths checked by the caller with `Args::check`).
    pub(crate) fn run(&self, par: Par<'_>, batch: usize, ld: usize, args: DenseConvArgs<'_>) {
        let mut fresh = Scratch::default();
        let mut guard = self.scratch.try_lock();
        let s = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        };
        let taps = self.g.taps();
        let (m, kc) = (self.live_out.len(), self.live_in.len() * taps);
        let (oh_n, ow_n) = self.sides.out_dims();
        let positions = oh_n * ow_n;
        let out_plane = positions * ld;
        let chunk = (CHUNK_FLOATS / (kc * batch).max(1)).clamp(1, positions.max(1));
        // The compact weights.
        if let DenseConvArgs::Forward { values, .. } | DenseConvArgs::BackwardData { values, .. } =
            &args
        {
            s.w.clear();
            s.w.resize(m * kc, 0.0);
            for (&p, &v) in self.pos.iter().zip(values.iter()) {
                s.w[p as usize] = v;
            }
        }
        let grads = matches!(
            args,
            DenseConvArgs::WeightGrad { .. } | DenseConvArgs::DenseGrad { .. }
        );
        if grads {
            s.grad.clear();
            s.grad.resize(m * kc, 0.0);
        }
        let mut args = args;
        // Outputs the chunks do not cover: dead output channels, and `dX` (added to).
        match &mut args {
            DenseConvArgs::Forward { bias, relu, y, .. } => {
                let mut live = self.live_out.iter().peekable();
                for o in 0..self.out_channels {
                    if live.peek().is_some_and(|&&l| l as usize == o) {
                        live.next();
                        continue;
                    }
                    let v = bias.map_or(0.0, |b| b[o]);
                    let v = if *relu { v.max(0.0) } else { v };
                    for pos in 0..positions {
                        let at = o * out_plane + pos * ld;
                        y[at..at + batch].fill(v);
                    }
                }
            }
            DenseConvArgs::BackwardData { dx, .. } => {
                for f in 0..self.g.in_channels * self.g.in_positions() {
                    dx[f * ld..f * ld + batch].fill(0.0);
                }
            }
            _ => {}
        }
        let mut first = 0;
        while first < positions {
            let np = chunk.min(positions - first);
            let n = np * batch;
            s.col.clear();
            s.col.resize(kc * n, 0.0);
            s.out.clear();
            s.out.resize(m * n, 0.0);
            let x_in = match &args {
                DenseConvArgs::Forward { x, .. }
                | DenseConvArgs::WeightGrad { x, .. }
                | DenseConvArgs::DenseGrad { x, .. } => Some(*x),
                DenseConvArgs::BackwardData { .. } => None,
            };
            if let Some(x) = x_in {
                self.im2col(x, batch, ld, first, np, &mut s.col);
            }
            if let DenseConvArgs::BackwardData { dy, .. }
            | DenseConvArgs::WeightGrad { dy, .. }
            | DenseConvArgs::DenseGrad { dy, .. } = &args
            {
                for (row, &o) in self.live_out.iter().enumerate() {
                    for j in 0..np {
                        let at = o as usize * out_plane + (first + j) * ld;
                        s.out[row * n + j * batch..row * n + (j + 1) * batch]
                            .copy_from_slice(&dy[at..at + batch]);
                    }
                }
            }
            let view = |data, rows, cols, rs, cs| View {
                data,
                rows,
                cols,
                rs,
                cs,
            };
            match &mut args {
                DenseConvArgs::Forward { bias, relu, y, .. } => {
                    gemm_par(
                        par,
                        &mut s.out,
                        n,
                        view(&s.w, m, kc, kc, 1),
                        view(&s.col, kc, n, n, 1),
                        false,
                    );
                    for (row, &o) in self.live_out.iter().enumerate() {
                        let o = o as usize;
                        let b0 = bias.map_or(0.0, |b| b[o]);
                        for j in 0..np {
                            let at = o * out_plane + (first + j) * ld;
                            let src = &s.out[row * n + j * batch..row * n + (j + 1) * batch];
                            for (d, &v) in y[at..at + batch].iter_mut().zip(src) {
                                let v = v + b0;
                                *d = if *relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
                DenseConvArgs::BackwardData { dx, .. } => {
                    gemm_par(
                        par,
                        &mut s.col,
                        n,
                        view(&s.w, kc, m, 1, kc),
                        view(&s.out, m, n, n, 1),
                        false,
                    );
                    self.col2im_add(&s.col, batch, ld, first, np, dx);
                }
                DenseConvArgs::WeightGrad { .. } | DenseConvArgs::DenseGrad { .. } => {
                    gemm_par(
                        par,
                        &mut s.grad,
                        kc,
                        view(&s.out, m, n, n, 1),
                        view(&s.col, n, kc, 1, n),
                        true,
                    );
                }
            }
            first += np;
        }
        match args {
            DenseConvArgs::WeightGrad { dw, .. } => {
                for (d, &p) in dw.iter_mut().zip(&self.pos) {
                    *d = s.grad[p as usize];
                }
            }
            DenseConvArgs::DenseGrad { grad, .. } => {
                // Every channel is live here, so the compact gradient is the whole one.
                grad[..m * kc].copy_from_slice(&s.grad);
            }
            _ => {}
        }
    }

    /// The im2col matrix of positions `first..first + np`: row `(c_i, t)` (live input
    /// channel `i`, tap `t`), column `(j, b)`, zero where the tap falls outside the input.
    fn im2col(&self, x: &[f32], batch: usize, ld: usize, first: usize, np: usize, col: &mut [f32]) {
        let taps = self.g.taps();
        let (_, ow_n) = self.sides.out_dims();
        let n = np * batch;
        let in_plane = self.g.in_positions() * ld;
        for (i, &c) in self.live_in.iter().enumerate() {
            for t in 0..taps {
                let row = &mut col[(i * taps + t) * n..(i * taps + t + 1) * n];
                for j in 0..np {
                    let pos = first + j;
                    if let Some(src) = self.sides.tap(pos / ow_n, pos % ow_n, t) {
                        let at = c as usize * in_plane + src * ld;
                        row[j * batch..(j + 1) * batch].copy_from_slice(&x[at..at + batch]);
                    }
                }
            }
        }
    }

    /// Adds the im2col-shaped gradient `col` of positions `first..first + np` back into the
    /// input positions its taps read.
    #[allow(clippy::too_many_arguments)]
    fn col2im_add(
        &self,
        col: &[f32],
        batch: usize,
        ld: usize,
        first: usize,
        np: usize,
        dx: &mut [f32],
    ) {
        let taps = self.g.taps();
        let (_, ow_n) = self.sides.out_dims();
        let n = np * batch;
        let in_plane = self.g.in_positions() * ld;
        for (i, &c) in self.live_in.iter().enumerate() {
            for t in 0..taps {
                let row = &col[(i * taps + t) * n..(i * taps + t + 1) * n];
                for j in 0..np {
                    let pos = first + j;
                    if let Some(src) = self.sides.tap(pos / ow_n, pos % ow_n, t) {
                        let at = c as usize * in_plane + src * ld;
                        for (d, &v) in dx[at..at + batch]
                            .iter_mut()
                            .zip(&row[j * batch..(j + 1) * batch])
                        {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}
